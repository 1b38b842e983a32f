//! `fcvm podman run -d`: the container keeps running after the command returns.
//!
//! fcvm stays daemonless (as podman): the command re-executes itself as the run's
//! supervisor, in a session of its own (so the terminal's hangup never reaches it), with
//! standard input from /dev/null and a pipe back to the command. The supervisor is an
//! ordinary foreground run in every other way: it owns the VM through its handle, tears
//! it down, records the exit code, and writes the container's output to the VM's log only.
//! Until the container has started, its standard error is the user's, so every refusal
//! (bad input, a missing image, a failed boot) reads exactly as in a foreground run, with
//! the same exit code; once the agent reports the container started (or already ended),
//! the supervisor moves its own stdout/stderr to `fcvm.log` in the VM's log directory and
//! writes `ready NAME` on the pipe. The command prints NAME and exits 0.
//!
//! Why not fork: the process is multi-threaded (tokio) by the time it could fork, and a
//! fresh exec of the same binary and arguments is what `snapshot serve --detach` does too.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

/// Internal: set in the supervisor's environment to the pipe's file descriptor.
pub const NOTIFY_FD_ENV: &str = "FCVM_DETACH_NOTIFY_FD";

/// Why the supervisor could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    /// fcvm's own executable cannot be found or run.
    #[error("cannot start the detached supervisor (fcvm itself)")]
    Spawn(#[source] io::Error),
    /// The notification pipe.
    #[error("cannot create the detached supervisor's pipe")]
    Pipe(#[source] nix::Error),
}

/// How the detached start went.
#[derive(Debug, PartialEq, Eq)]
pub enum Started {
    /// The container started (or already ended): its VM's name.
    Ready(String),
    /// The supervisor ended first, with this exit code; it said why on standard error.
    Failed(i32),
}

/// Start `fcvm ARGS...` (this process's own arguments) as the supervisor and wait until
/// it reports the container started, or ends.
pub fn spawn_supervisor(args: &[OsString]) -> Result<Started, DetachError> {
    let exe = std::env::current_exe().map_err(DetachError::Spawn)?;
    // The supervisor outlives this command: whatever descriptor it inherited would stay
    // open as long as the VM runs (a terminal never hanging up, a pipe never reaching EOF
    // for whoever started us). Only 0-2, and the pipe below, go across the exec.
    close_on_exec_above_stdio();
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(DetachError::Pipe)?;
    let fd = write_end.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(NOTIFY_FD_ENV, fd.to_string())
        .stdin(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls: setsid(2) and fcntl(2) on
    // a descriptor this process owns (the pipe's write end, kept open across the exec).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(DetachError::Spawn)?;
    // Only the supervisor holds the write end now: EOF means it is done with the pipe.
    drop(write_end);
    let mut line = String::new();
    let _ = BufReader::new(File::from(read_end)).read_line(&mut line);
    if let Some(name) = line.trim_end().strip_prefix("ready ") {
        // The supervisor lives on; it is not this process's child to wait for any more
        // (init adopts it when this process exits).
        return Ok(Started::Ready(name.to_owned()));
    }
    let code = child
        .wait()
        .map_err(DetachError::Spawn)?
        .code()
        .unwrap_or(super::EXIT_FCVM_FAILED.into());
    Ok(Started::Failed(code))
}

/// Mark every descriptor above standard error close-on-exec (this process is about to
/// exit, so its own use of them is unaffected).
fn close_on_exec_above_stdio() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // The directory's own descriptor is among them, closed by now: EBADF is fine.
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

/// The supervisor's end of the pipe, taken from the environment. The variable stays set
/// (changing the environment of a multi-threaded process is not sound); what the supervisor
/// starts inherits it but not the descriptor, which is close-on-exec, and only `-d` reads it.
#[derive(Debug)]
pub struct Notifier {
    pipe: Option<File>,
}

impl Notifier {
    /// The pipe named by [`NOTIFY_FD_ENV`], if this process is a detached supervisor.
    pub fn from_env() -> Option<Notifier> {
        let fd: i32 = std::env::var(NOTIFY_FD_ENV).ok()?.parse().ok()?;
        // Only a descriptor that is really open is taken over.
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
            return None;
        }
        // SAFETY: the descriptor was opened by the parent for this process alone (its
        // write end of the pipe) and nothing else in this process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        nix::fcntl::fcntl(
            owned.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .ok()?;
        Some(Notifier {
            pipe: Some(File::from(owned)),
        })
    }

    /// Whether the command is still waiting.
    pub fn pending(&self) -> bool {
        self.pipe.is_some()
    }

    /// The container started: move this process's stdout and stderr to `log` (the user's
    /// terminal is no longer ours to write to) and release the command with `name`.
    pub fn ready(&mut self, name: &str, log: &Path) {
        let Some(mut pipe) = self.pipe.take() else {
            return;
        };
        let target = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .or_else(|e| {
                tracing::warn!(
                    "cannot open {} ({e}); fcvm's messages are dropped",
                    log.display()
                );
                std::fs::OpenOptions::new().write(true).open("/dev/null")
            });
        if let Ok(file) = target {
            let fd = file.into_raw_fd();
            // SAFETY: dup2 onto the standard descriptors, which this process owns;
            // Rust's stdout/stderr handles write through fds 1 and 2 and stay valid.
            unsafe {
                libc::dup2(fd, libc::STDOUT_FILENO);
                libc::dup2(fd, libc::STDERR_FILENO);
                libc::close(fd);
            }
        }
        let _ = writeln!(pipe, "ready {name}");
    }
}
