//! `fcvm attach NAME`: this terminal to a detached container's input and output (the
//! supervisor's end is [`crate::commands::podman::attach`]), until the container ends (exit
//! with its code) or the detach keys are typed (exit 0; the container keeps running).
//!
//! Detach keys are docker's: Ctrl-P Ctrl-Q by default, `--detach-keys` to change them
//! (`ctrl-x,q`; empty: none). A prefix of the sequence is held back until the next key shows
//! whether the sequence goes on; if it does not, the held keys go to the container after all.

use std::time::Duration;

use fcvm_proto::frame::tokio_io::write_frame;
use fcvm_proto::frame::Frame;
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};

use crate::commands::podman::{attach::socket_path, tty};
use crate::paths::Paths;
use crate::state::{Store, StoreError};

/// docker's default.
pub const DEFAULT_DETACH_KEYS: &str = "ctrl-p,ctrl-q";

/// Why `fcvm attach` failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No such VM.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Not a container VM, or one that has ended.
    #[error("{0} is not a running container VM")]
    NotRunning(String),
    /// A VM that keeps no input open for attaching.
    #[error("{0} cannot be attached to: only `fcvm podman run -d` with -i and/or -t keeps the container's input for `fcvm attach` (use `fcvm exec -it {0} sh` for a shell, `fcvm logs -f {0}` for its output)")]
    NotAttachable(String),
    /// A bad `--detach-keys`.
    #[error("--detach-keys {0:?}: expected a comma list of keys, each a single character or ctrl-<letter or one of @[\\]^_> (e.g. ctrl-p,ctrl-q)")]
    DetachKeys(String),
    /// The supervisor refused (another terminal is attached).
    #[error("{0}")]
    Refused(String),
    /// The connection broke without an exit code.
    #[error("the connection to {0}'s supervisor closed without the container's exit code")]
    Lost(String),
    /// Local terminal or I/O.
    #[error("attach I/O")]
    Io(#[from] std::io::Error),
}

/// How an attach ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachEnd {
    /// The container ended with this code.
    Exited(i32),
    /// The user typed the detach keys.
    Detached,
}

/// The bytes of a detach key spec (`ctrl-p,ctrl-q`); empty for none.
pub fn parse_detach_keys(spec: &str) -> Result<Vec<u8>, AttachError> {
    let bad = || AttachError::DetachKeys(spec.to_owned());
    if spec.is_empty() {
        return Ok(Vec::new());
    }
    spec.split(',')
        .map(|key| {
            let lower = key.to_ascii_lowercase();
            if let Some(c) = lower.strip_prefix("ctrl-") {
                match c.as_bytes() {
                    [b @ b'a'..=b'z'] => Ok(b - b'a' + 1),
                    [b'@'] => Ok(0),
                    [b @ (b'[' | b'\\' | b']' | b'^' | b'_')] => Ok(b - b'@'),
                    _ => Err(bad()),
                }
            } else {
                match key.as_bytes() {
                    [b] if b.is_ascii() && !b.is_ascii_control() => Ok(*b),
                    _ => Err(bad()),
                }
            }
        })
        .collect()
}

/// Finds the detach sequence in what is typed.
#[derive(Debug, Clone)]
pub struct DetachKeys {
    seq: Vec<u8>,
    matched: usize,
}

impl DetachKeys {
    /// A matcher for `seq` (empty: never detaches).
    pub fn new(seq: Vec<u8>) -> Self {
        DetachKeys { seq, matched: 0 }
    }

    /// Feed typed bytes: what goes to the container, and whether the sequence is complete
    /// (what follows it in `input` is dropped).
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        if self.seq.is_empty() {
            out.extend_from_slice(input);
            return (out, false);
        }
        for &b in input {
            if b == self.seq[self.matched] {
                self.matched += 1;
                if self.matched == self.seq.len() {
                    self.matched = 0;
                    return (out, true);
                }
                continue;
            }
            // Not the sequence after all: the held keys were meant for the container.
            out.extend_from_slice(&self.seq[..self.matched]);
            self.matched = 0;
            if b == self.seq[0] {
                self.matched = 1;
                if self.seq.len() == 1 {
                    self.matched = 0;
                    return (out, true);
                }
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// Attach this terminal to the container VM `name`.
pub async fn attach(paths: &Paths, name: &str, keys: &str) -> Result<AttachEnd, AttachError> {
    let mut detach = DetachKeys::new(parse_detach_keys(keys)?);
    let store = Store::open(paths)?;
    let record = store.find_by_name(name)?;
    if !record.runs_container() || !record.is_running() {
        return Err(AttachError::NotRunning(name.to_owned()));
    }
    let socket = socket_path(&record.runtime_dir);
    let conn = match tokio::net::UnixStream::connect(&socket).await {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AttachError::NotAttachable(name.to_owned()));
        }
        Err(e) => return Err(e.into()),
    };
    let (rd, mut wr) = conn.into_split();
    // Raw when this is a terminal: keys (Ctrl-C included) are the container's to read.
    let raw = if tty::stdin_is_terminal() {
        tty::RawMode::enable()?
    } else {
        None
    };
    if let Some(ws) = tty::terminal_size() {
        write_frame(&mut wr, &Frame::Resize(ws))
            .await
            .map_err(|_| AttachError::Lost(name.to_owned()))?;
    }
    let (mut frames, reader) = crate::commands::exec::spawn_frame_reader(rd);
    let mut stdin = Some(tty::stdin_chunks());
    let mut winch = signal(SignalKind::window_change())?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let end = loop {
        let outgoing = tokio::select! {
            f = frames.recv() => match f {
                Some(Ok(Some(Frame::Stdout(b)))) => { let _ = tty::emit(&mut stdout, &b).await; continue }
                Some(Ok(Some(Frame::Stderr(b)))) => { let _ = tty::emit(&mut stderr, &b).await; continue }
                Some(Ok(Some(Frame::Exit(code)))) => break Ok(AttachEnd::Exited(code)),
                Some(Ok(Some(Frame::Error(text)))) => break Err(AttachError::Refused(text)),
                Some(Ok(Some(_))) => continue,
                Some(Ok(None)) | Some(Err(_)) | None => break Err(AttachError::Lost(name.to_owned())),
            },
            chunk = tty::next_chunk(&mut stdin) => match chunk {
                Some(Some(bytes)) => {
                    let (send, detached) = detach.feed(&bytes);
                    if !send.is_empty() && write_frame(&mut wr, &Frame::Stdin(send)).await.is_err() {
                        break Err(AttachError::Lost(name.to_owned()));
                    }
                    if detached {
                        break Ok(AttachEnd::Detached);
                    }
                    continue;
                }
                _ => { stdin = None; Frame::Eof }
            },
            _ = winch.recv() => match tty::terminal_size() {
                Some(ws) => Frame::Resize(ws),
                None => continue,
            },
        };
        // A failed write: the supervisor is closing; its last frames are still read.
        let _ = write_frame(&mut wr, &outgoing).await;
    };
    reader.abort();
    let _ = wr.shutdown().await;
    // Give the terminal back before the caller prints anything.
    drop(raw);
    // The container may print its last lines as the detach happens: not worth waiting for.
    let _ = tokio::time::timeout(Duration::from_millis(50), stdout.flush()).await;
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys_parse_as_docker_spells_them() {
        assert_eq!(
            parse_detach_keys(DEFAULT_DETACH_KEYS).unwrap(),
            [0x10, 0x11]
        );
        assert_eq!(parse_detach_keys("ctrl-x,q").unwrap(), [0x18, b'q']);
        assert_eq!(parse_detach_keys("ctrl-@,ctrl-_").unwrap(), [0, 0x1f]);
        assert!(parse_detach_keys("").unwrap().is_empty());
        for bad in ["ctrl-", "ctrl-pp", "alt-x", "ab", ",", "ctrl-1"] {
            assert!(parse_detach_keys(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_sequence_detaches_and_a_broken_one_reaches_the_container() {
        let mut k = DetachKeys::new(vec![0x10, 0x11]);
        assert_eq!(k.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        // Split across reads.
        assert_eq!(k.feed(&[b'a', 0x10]), (b"a".to_vec(), false));
        assert_eq!(k.feed(&[0x11, b'z']), (vec![], true));
        // Ctrl-P then something else: both go through.
        assert_eq!(k.feed(&[0x10, b'x']), (vec![0x10, b'x'], false));
        // Ctrl-P Ctrl-P Ctrl-Q: the first one goes through, then the sequence.
        assert_eq!(k.feed(&[0x10, 0x10, 0x11]), (vec![0x10], true));
        let mut none = DetachKeys::new(vec![]);
        assert_eq!(none.feed(&[0x10, 0x11]), (vec![0x10, 0x11], false));
        let mut one = DetachKeys::new(vec![b'q']);
        assert_eq!(one.feed(b"abq"), (b"ab".to_vec(), true));
    }
}
