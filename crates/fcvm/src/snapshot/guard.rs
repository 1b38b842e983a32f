//! The resume guard: makes sure a VM paused by `snapshot create` is resumed even if the
//! creating fcvm is killed.
//!
//! Before pausing, the creator starts `fcvm __resume-guard <api-socket>` (its own
//! executable; `main` recognises the argument before the command-line parser runs, so the
//! internal command is never listed nor suggested) in its own process group, with a pipe on its stdin.
//! When the creator finishes it writes one "done" byte; if the guard instead sees EOF (the
//! creator died, whatever the signal), it resumes the VM through the API. A resume of a VM
//! that is already running is refused by Firecracker and ignored, so racing is harmless.

use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use crate::firecracker::FirecrackerClient;

/// First argument that makes `fcvm` run as a resume guard (see `main`).
pub const GUARD_SUBCOMMAND: &str = "__resume-guard";
/// Environment override of the executable that provides the subcommand (tests, benches).
pub const SELF_EXE_ENV: &str = "FCVM_SELF_EXE";
const DONE: u8 = b'd';

/// A running guard.
#[derive(Debug)]
pub struct ResumeGuard {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// The fcvm executable.
pub fn self_exe() -> io::Result<PathBuf> {
    match std::env::var_os(SELF_EXE_ENV) {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => std::env::current_exe(),
    }
}

impl ResumeGuard {
    /// Start a guard for the VM whose API socket is `api_socket`.
    pub fn start(api_socket: &Path) -> io::Result<ResumeGuard> {
        let mut child = Command::new(self_exe()?)
            .arg(GUARD_SUBCOMMAND)
            .arg(api_socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Its own group: a Ctrl-C aimed at the creator must not take the guard down too.
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take();
        Ok(ResumeGuard { child, stdin })
    }

    /// The creator resumed the VM itself: stand the guard down and reap it.
    pub fn done(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(&[DONE]);
        }
        let _ = self.child.wait();
    }
}

impl Drop for ResumeGuard {
    fn drop(&mut self) {
        // Without the done byte the guard resumes the VM: the right outcome on error paths.
        if self.stdin.take().is_some() {
            let _ = self.child.wait();
        }
    }
}

/// Body of the hidden subcommand: wait for "done" or EOF on stdin; on EOF, resume.
/// Returns whether a resume was sent.
pub async fn run_guard(api_socket: &Path) -> bool {
    let got_done = tokio::task::spawn_blocking(|| {
        let mut byte = [0u8; 1];
        loop {
            match io::stdin().read(&mut byte) {
                Ok(0) => return false,
                Ok(_) => return byte[0] == DONE,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    if got_done {
        return false;
    }
    let client = FirecrackerClient::new(api_socket).with_timeout(Duration::from_secs(120));
    for _ in 0..3 {
        match client.resume().await {
            Ok(()) => return true,
            Err(crate::firecracker::TransportError::Refused { .. }) => return true,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    false
}
