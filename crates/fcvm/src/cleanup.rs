//! Teardown: the undo steps recorded ahead of time, and the one function that runs them.
//!
//! Before fcvm creates anything that must not outlive a VM (a process, a directory, a
//! network namespace, a mount), it records how to undo it in the VM's state record. Every
//! path that ends a VM (a foreground run ending, `fcvm stop`, the reaper finding a dead
//! owner, a failed start, a clone losing its page server, a page server draining) calls
//! [`teardown`], which:
//!
//! 1. marks the record `stopping` (or `failed`) and takes its steps, under the store lock;
//! 2. runs the steps *outside* the lock (killing a process may take seconds), continuing
//!    past failures;
//! 3. writes back exactly the steps that failed, and deletes the record only when none
//!    remain (and the VM is not being kept as failed). A namespace or VMM that survived is
//!    therefore never forgotten: the next fcvm command retries it.
//!
//! Every step is idempotent: replaying a half-done teardown, or two fcvm processes running
//! the same one, is harmless.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::network::{HostNet, NetOps};
use crate::process::ProcessRef;
use crate::state::{Store, StoreError, VmRecord, VmStatus};

/// One undo action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum CleanupStep {
    /// Terminate a process (SIGTERM, then SIGKILL after a grace period).
    KillProcess {
        /// The process.
        process: ProcessRef,
    },
    /// Lazily unmount a path (MNT_DETACH), ignoring "not mounted".
    Unmount {
        /// Mount point.
        path: PathBuf,
    },
    /// Delete a named network namespace (`ip netns` style, under /run/netns).
    DeleteNetns {
        /// Namespace name.
        name: String,
    },
    /// Delete nftables table `ip <table>` (all of one VM's rules).
    DeleteNftTable {
        /// Table name.
        table: String,
    },
    /// Delete a network interface in the host's namespace (a veth end).
    DeleteLink {
        /// Interface name.
        name: String,
    },
    /// Remove a file.
    RemoveFile {
        /// The file.
        path: PathBuf,
    },
    /// Remove a directory tree.
    RemoveDir {
        /// The directory.
        path: PathBuf,
    },
    /// Delete a persistent TAP in fcvm's own network namespace (made for a jailed VMM).
    DeleteTap {
        /// The TAP's name.
        name: String,
    },
    /// Give a file back to its owner (a drive lent to a jailed VMM's uid).
    RestoreOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its group.
        gid: u32,
    },
    /// Remove a (by then empty) cgroup directory with rmdir; a missing one is fine.
    RemoveCgroup {
        /// The cgroup's directory.
        path: PathBuf,
    },
}

/// A step that could not be completed.
#[derive(Debug, thiserror::Error)]
#[error("cleanup step {step:?} failed: {reason}")]
pub struct CleanupError {
    /// The step.
    pub step: CleanupStep,
    /// Why.
    pub reason: String,
}

impl CleanupStep {
    /// Carry out this step; namespaces go through `net`.
    pub fn run(&self, net: &dyn NetOps) -> Result<(), CleanupError> {
        let fail = |reason: String| CleanupError {
            step: self.clone(),
            reason,
        };
        match self {
            CleanupStep::KillProcess { process } => {
                process.terminate(Duration::from_secs(2));
                if process.is_alive() {
                    return Err(fail("process survived SIGKILL".into()));
                }
                Ok(())
            }
            CleanupStep::Unmount { path } => {
                match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
                    Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {
                        Ok(())
                    }
                    Err(e) => Err(fail(e.to_string())),
                }
            }
            CleanupStep::DeleteNetns { name } => net
                .delete_netns(name)
                .map_err(|e| fail(crate::report::chain(&e))),
            CleanupStep::DeleteNftTable { table } => net
                .nft_delete_table(table)
                .map_err(|e| fail(crate::report::chain(&e))),
            CleanupStep::DeleteLink { name } => net
                .delete_link(name)
                .map_err(|e| fail(crate::report::chain(&e))),
            CleanupStep::RemoveFile { path } => {
                fsutil::remove_file_idempotent(path).map_err(|e| fail(e.to_string()))
            }
            CleanupStep::RemoveDir { path } => {
                fsutil::remove_dir_all_idempotent(path).map_err(|e| fail(e.to_string()))
            }
            CleanupStep::RemoveCgroup { path } => remove_cgroup(path).map_err(fail),
            CleanupStep::DeleteTap { name } => {
                crate::network::delete_tap(name).map_err(|e| fail(e.to_string()))
            }
            CleanupStep::RestoreOwner { path, uid, gid } => {
                match std::os::unix::fs::chown(path, Some(*uid), Some(*gid)) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(fail(e.to_string())),
                }
            }
        }
    }
}

/// rmdir a cgroup; a cgroup whose last task is still exiting is busy for a moment.
fn remove_cgroup(path: &std::path::Path) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Run every step in order, continuing past failures, and return the failures.
pub fn run_all(steps: &[CleanupStep], net: &dyn NetOps) -> Vec<CleanupError> {
    steps
        .iter()
        .filter_map(|s| {
            let t = std::time::Instant::now();
            let r = s.run(net);
            tracing::debug!("teardown step {s:?} took {:?}", t.elapsed());
            r.err()
        })
        .collect()
}

/// What becomes of the record after its steps ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Forget the VM: delete the record once every step succeeded.
    Forget,
    /// Keep the record as `failed` with this reason, so `fcvm ls` shows why until
    /// `fcvm stop` (a failed VM holds no name).
    Fail(String),
    /// A container VM whose container ended: keep the record as `exited` (its exit code
    /// and logs stay until `fcvm rm`); everything else of the VM goes.
    Exited,
}

/// How a teardown went.
#[derive(Debug, Default)]
pub struct TeardownReport {
    /// The record as it was when teardown began (None: it was already gone).
    pub record: Option<VmRecord>,
    /// Steps that failed; they stay in the record for the next fcvm command.
    pub failures: Vec<CleanupError>,
    /// Whether the record was deleted.
    pub removed: bool,
}

impl TeardownReport {
    /// Whether everything was undone.
    pub fn is_clean(&self) -> bool {
        self.failures.is_empty()
    }

    /// Log each failed step as a warning (for paths with no one to report to).
    pub fn warn(&self) {
        for f in &self.failures {
            tracing::warn!("{f}; the next fcvm command retries it");
        }
    }
}

/// [`teardown_with`] on the real host.
pub fn teardown(store: &Store, id: &str, how: Disposition) -> Result<TeardownReport, StoreError> {
    teardown_with(store, id, how, &HostNet)
}

/// Undo everything recorded for VM `id` (see the module docs for the order). A record that
/// is already gone is not an error: someone else finished the teardown.
pub fn teardown_with(
    store: &Store,
    id: &str,
    how: Disposition,
    net: &dyn NetOps,
) -> Result<TeardownReport, StoreError> {
    let started = std::time::Instant::now();
    let claimed = store.try_update(id, |r| match &how {
        Disposition::Forget => {
            if r.status != VmStatus::Failed {
                r.status = VmStatus::Stopping;
            }
        }
        Disposition::Fail(reason) => {
            r.status = VmStatus::Failed;
            r.error = Some(reason.clone());
        }
        Disposition::Exited => {
            if r.status != VmStatus::Failed {
                r.status = VmStatus::Exited;
            }
        }
    })?;
    let Some(record) = claimed else {
        return Ok(TeardownReport::default());
    };
    let mut steps = record.cleanup.clone();
    // The logs go only with the record itself.
    if let (Disposition::Forget, Some(dir)) = (&how, &record.log_dir) {
        steps.push(CleanupStep::RemoveDir { path: dir.clone() });
    }
    // Outside the lock: these may take seconds (a VMM ignoring SIGTERM).
    let failures = run_all(&steps, net);
    let left: Vec<CleanupStep> = failures.iter().map(|f| f.step.clone()).collect();
    let keep = !matches!(how, Disposition::Forget) || !left.is_empty();
    let removed = store.finish_teardown(id, left, keep)?;
    tracing::debug!(
        vm = %record.name,
        steps = record.cleanup.len(),
        failed = failures.len(),
        removed,
        "teardown took {:?}",
        started.elapsed()
    );
    Ok(TeardownReport {
        record: Some(record),
        failures,
        removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::fake::RecordingNet;
    use std::process::Command;

    #[test]
    fn steps_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("vm");
        std::fs::create_dir_all(sub.join("x")).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let process = ProcessRef::of_pid(child.id()).unwrap();
        let steps = vec![
            CleanupStep::KillProcess { process },
            CleanupStep::RemoveFile { path: file.clone() },
            CleanupStep::RemoveDir { path: sub.clone() },
            CleanupStep::Unmount {
                path: dir.path().join("never-mounted"),
            },
        ];
        let reaper = std::thread::spawn(move || child.wait());
        let net = RecordingNet::default();
        assert!(run_all(&steps, &net).is_empty());
        reaper.join().unwrap().unwrap();
        assert!(!sub.exists() && !file.exists());
        // Replaying is harmless.
        assert!(run_all(&steps, &net).is_empty());
    }

    #[test]
    fn steps_round_trip_through_json() {
        let step = CleanupStep::DeleteNetns {
            name: "fcvm-abc".into(),
        };
        let json = serde_json::to_string(&step).unwrap();
        assert_eq!(json, r#"{"step":"delete_netns","name":"fcvm-abc"}"#);
        assert_eq!(serde_json::from_str::<CleanupStep>(&json).unwrap(), step);
    }
}
