//! `fcvm exec`: run a command in a container VM's container (default) or in the VM itself
//! (`--vm`), through the agent's exec server on vsock port 4998.
//!
//! The exit code is the command's (fcvm's own failures 125, a command the guest cannot run
//! 126, one it cannot find 127). With `-i -t` the local terminal is switched to raw mode
//! (refused when standard input is not a terminal); Ctrl-C then travels as a byte to the
//! guest's terminal. With `-t` alone size changes are forwarded and the terminal stays
//! cooked. Without raw mode, SIGINT/SIGTERM sent to fcvm are forwarded to the command as
//! signals.

use std::time::Duration;

use fcvm_proto::exec::ExecRequest;
use fcvm_proto::frame::tokio_io::{read_frame, write_frame};
use fcvm_proto::frame::{Frame, FrameError};
use fcvm_proto::vsock::EXEC_PORT;
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::commands::podman::{plan, tty};
use crate::paths::{Paths, VmPaths};
use crate::state::{Store, StoreError, VmRecord};
use crate::vsock::{self, VsockError};

/// How long the exec server may take to accept. Generous: a clone restored through the page
/// server faults in every page the agent's exec path touches first (in the emulated KVM host,
/// under load, that handshake once took over 10 s); a VM that is gone fails at once anyway
/// (its socket refuses), so only a stuck guest waits this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Which VM.
#[derive(Debug, Clone)]
pub enum Target {
    /// By name.
    Name(String),
    /// By the pid of its fcvm or VMM process.
    Pid(u32),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// The VM.
    pub target: Target,
    /// Run in the VM rather than the container.
    pub in_vm: bool,
    /// Forward standard input.
    pub interactive: bool,
    /// Allocate a terminal.
    pub tty: bool,
    /// `--env` occurrences.
    pub env: Vec<String>,
    /// `-w`: working directory of the command.
    pub workdir: Option<String>,
    /// Program and arguments.
    pub command: Vec<String>,
}

/// Why `fcvm exec` failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// `-i -t` without a terminal on standard input.
    #[error(transparent)]
    Tty(#[from] tty::TtyError),
    /// No such VM.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Not a container VM.
    #[error(
        "VM {0} runs a raw kernel, not the fcvm agent; exec works on `fcvm podman run` VMs only"
    )]
    NotContainer(String),
    /// Empty command.
    #[error("no command given: put it after the VM's name, e.g. `fcvm exec NAME ls /`")]
    NoCommand,
    /// Bad `--env`.
    #[error(transparent)]
    Args(#[from] plan::PlanArgsError),
    /// The exec server is not reachable.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The agent could not start the command.
    #[error("{0}")]
    Guest(String),
    /// The stream broke.
    #[error("the exec connection broke")]
    Stream(#[from] FrameError),
    /// The agent closed the connection without an exit code.
    #[error("the VM closed the exec connection without an exit status (did the VM stop?)")]
    NoExit,
    /// Signal setup failed.
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
    /// The terminal could not be set up.
    #[error("cannot set the terminal to raw mode: {0}")]
    Terminal(std::io::Error),
}

impl ExecError {
    /// Exit code for this error, following podman: 127 when the program does not exist,
    /// 126 when it cannot be run, 125 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExecError::Guest(text) => guest_error_code(text),
            _ => crate::commands::podman::EXIT_FCVM_FAILED,
        }
    }
}

/// The exit code for the guest's refusal to run a command: 127 when it does not exist,
/// 126 when it exists but cannot be run (podman's convention).
pub fn guest_error_code(text: &str) -> u8 {
    let t = text.to_ascii_lowercase();
    if t.contains("no such file") || t.contains("not found") {
        127
    } else {
        126
    }
}

/// Find the VM for `target`.
pub fn find_vm(paths: &Paths, target: &Target) -> Result<VmRecord, ExecError> {
    let store = Store::open(paths)?;
    let record = match target {
        Target::Name(n) => store.find_by_name(n)?,
        Target::Pid(p) => store.find_by_pid(*p)?,
    };
    if !record.runs_container() {
        return Err(ExecError::NotContainer(record.name.as_str().to_owned()));
    }
    Ok(record)
}

/// Run the command and return its exit code.
pub async fn exec(paths: &Paths, opts: &ExecOptions) -> Result<i32, ExecError> {
    tty::check_request(opts.interactive, opts.tty, tty::stdin_is_terminal())?;
    if opts.command.is_empty() {
        return Err(ExecError::NoCommand);
    }
    let env = plan::parse_env(&opts.env)?;
    let workdir = plan::workdir(opts.workdir.as_deref())?;
    let t0 = std::time::Instant::now();
    let record = find_vm(paths, &opts.target)?;
    tracing::debug!(vm = %record.name, "exec: found the VM in {:?}", t0.elapsed());
    let uds = VmPaths::new(&record.runtime_dir).vsock_socket();
    let mut conn = vsock::connect(&uds, EXEC_PORT, CONNECT_TIMEOUT).await?;
    tracing::debug!("exec: connected to the agent at {:?}", t0.elapsed());
    let request = ExecRequest {
        command: opts.command.clone(),
        in_container: !opts.in_vm,
        interactive: opts.interactive,
        tty: opts.tty,
        tty_size: if opts.tty {
            Some(
                tty::terminal_size()
                    .unwrap_or(fcvm_proto::frame::WindowSize { rows: 24, cols: 80 }),
            )
        } else {
            None
        },
        env,
        workdir,
    };
    request
        .validate()
        .map_err(|e| ExecError::Guest(e.to_string()))?;
    write_frame(&mut conn, &Frame::Exec(request)).await?;
    tracing::debug!("exec: request sent at {:?}", t0.elapsed());

    // Raw only with -i -t: without -i, Ctrl-C stays a signal here and is forwarded.
    let _raw = if opts.tty && opts.interactive {
        tty::RawMode::enable().map_err(ExecError::Terminal)?
    } else {
        None
    };
    let (rd, mut wr) = conn.into_split();
    let mut sigint = signal(SignalKind::interrupt()).map_err(ExecError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(ExecError::Signals)?;
    let mut winch = signal(SignalKind::window_change()).map_err(ExecError::Signals)?;
    let mut stdin: Option<mpsc::Receiver<Option<Vec<u8>>>> =
        (opts.interactive).then(tty::stdin_chunks);
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();

    let (mut frames, reader) = spawn_frame_reader(rd);

    let result = loop {
        let outgoing = tokio::select! {
            f = frames.recv() => match f {
                Some(Ok(Some(Frame::Stdout(b)))) => { let _ = tty::emit(&mut stdout, &b).await; continue }
                Some(Ok(Some(Frame::Stderr(b)))) => { let _ = tty::emit(&mut stderr, &b).await; continue }
                Some(Ok(Some(Frame::Exit(code)))) => break Ok(code),
                Some(Ok(Some(Frame::Error(text)))) => break Err(ExecError::Guest(text)),
                Some(Ok(Some(other))) => {
                    tracing::warn!("ignoring unexpected exec frame {other:?}");
                    continue
                }
                Some(Ok(None)) | None => break Err(ExecError::NoExit),
                Some(Err(e)) => break Err(e.into()),
            },
            chunk = tty::next_chunk(&mut stdin) => match chunk {
                Some(Some(b)) => Frame::Stdin(b),
                _ => { stdin = None; Frame::Eof }
            },
            _ = winch.recv(), if opts.tty => match tty::terminal_size() {
                Some(ws) => Frame::Resize(ws),
                None => continue,
            },
            _ = sigint.recv() => Frame::Signal(libc::SIGINT),
            _ = sigterm.recv() => Frame::Signal(libc::SIGTERM),
        };
        // A failed write means the guest is closing; its last frames are still read.
        let _ = write_frame(&mut wr, &outgoing).await;
    };
    reader.abort();
    tracing::debug!(result = ?result.as_ref().map_err(|_| ()), "exec: done at {:?}", t0.elapsed());
    let _ = wr.shutdown().await;
    result
}

/// Frames read from `rd` by a task of their own, until the end or an error (both are
/// delivered): reading a frame is not cancel-safe, so a `select!` waits on the channel.
pub fn spawn_frame_reader(
    mut rd: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> (
    mpsc::Receiver<Result<Option<Frame>, FrameError>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        loop {
            let f = read_frame(&mut rd).await;
            let done = !matches!(f, Ok(Some(_)));
            if tx.send(f).await.is_err() || done {
                return;
            }
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_sort_fcvm_failures_from_the_guest_refusing() {
        assert_eq!(
            guest_error_code("exec /no/such: No such file or directory"),
            127
        );
        assert_eq!(guest_error_code("executable file not found in $PATH"), 127);
        assert_eq!(guest_error_code("permission denied"), 126);
        assert_eq!(ExecError::NoExit.exit_code(), 125);
        assert_eq!(ExecError::Tty(tty::TtyError).exit_code(), 125);
        assert_eq!(
            ExecError::Guest("Permission denied".into()).exit_code(),
            126
        );
    }
}
