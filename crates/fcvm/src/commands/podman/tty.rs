//! The local terminal and standard input, for `-i` and `-t`.
//!
//! Standard input is read by a plain thread, never by the async runtime: a read blocked on
//! a terminal cannot be cancelled, and a runtime waits for its blocking tasks when it shuts
//! down, which would keep fcvm alive after the container ended. A detached thread simply
//! ends with the process.

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd};

use fcvm_proto::frame::{WindowSize, CHUNK};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::sync::mpsc;

/// `-i -t` asked for with no terminal on standard input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the input device is not a TTY; drop -t (or -i), or run from a terminal")]
pub struct TtyError;

/// Refuse `-i -t` when standard input is not a terminal, as docker does: a pipe or
/// `/dev/null` cannot be put in raw mode, and its end would never reach a terminal in the
/// guest (a terminal has no end of file), so the command would never return. `-t` alone
/// reads no input and is allowed.
pub fn check_request(interactive: bool, tty: bool, stdin_is_tty: bool) -> Result<(), TtyError> {
    if interactive && tty && !stdin_is_tty {
        Err(TtyError)
    } else {
        Ok(())
    }
}

/// Whether standard input is a terminal.
pub fn stdin_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&io::stdin())
}

/// Size of the terminal on standard input (or output), if there is one.
pub fn terminal_size() -> Option<WindowSize> {
    [io::stdin().as_fd(), io::stdout().as_fd()]
        .into_iter()
        .find_map(size_of)
}

fn size_of(fd: BorrowedFd<'_>) -> Option<WindowSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we own; the fd is borrowed and open.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::TIOCGWINSZ,
            &mut ws,
        )
    };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(WindowSize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// Puts the terminal on standard input in raw mode (no echo, no line editing, no signals
/// from Ctrl-C: those bytes go to the guest's terminal) and restores it when dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Raw mode if standard input is a terminal; `None` otherwise.
    pub fn enable() -> io::Result<Option<RawMode>> {
        if !stdin_is_terminal() {
            return Ok(None);
        }
        let stdin = io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

/// Standard input as a stream of chunks; `None` is end of input.
pub fn stdin_chunks() -> mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(16);
    let spawned = std::thread::Builder::new()
        .name("fcvm-stdin".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = vec![0u8; CHUNK];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.blocking_send(None);
        });
    if spawned.is_err() {
        // Without a reader thread, behave as if input were empty.
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(None);
        return rx;
    }
    rx
}

/// The next chunk of [`stdin_chunks`]; pending forever once there is no more input to
/// read (`rx` is `None`), so a `select!` branch on it simply never fires.
pub async fn next_chunk(
    rx: &mut Option<mpsc::Receiver<Option<Vec<u8>>>>,
) -> Option<Option<Vec<u8>>> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Write `bytes` and flush: relayed output must reach the user as it comes.
pub async fn emit(w: &mut (impl tokio::io::AsyncWrite + Unpin), bytes: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(bytes).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interactive_tty_needs_a_terminal() {
        assert_eq!(check_request(true, true, false), Err(TtyError));
        assert!(check_request(true, true, true).is_ok());
        assert!(check_request(false, true, false).is_ok());
        assert!(check_request(true, false, false).is_ok());
        assert!(TtyError
            .to_string()
            .starts_with("the input device is not a TTY"));
    }
}
