//! Teardown steps recorded ahead of time.
//!
//! Before fcvm creates anything that must not outlive a VM (a process, a directory, a
//! network namespace, a mount), it records how to undo it in the VM's state record. Any
//! later fcvm command that finds the VM's owner dead replays those steps, so a SIGKILLed
//! fcvm still gets cleaned up. Every step is idempotent: replaying a half-done teardown, or
//! two fcvm processes replaying the same one, is harmless.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::process::ProcessRef;

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
    /// Carry out this step.
    pub fn run(&self) -> Result<(), CleanupError> {
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
            CleanupStep::DeleteNetns { name } => {
                let path = PathBuf::from("/run/netns").join(name);
                if !path.exists() {
                    return Ok(());
                }
                let out = Command::new("ip")
                    .args(["netns", "delete", name])
                    .output()
                    .map_err(|e| fail(format!("cannot run ip: {e}")))?;
                if out.status.success() || !path.exists() {
                    Ok(())
                } else {
                    Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
                }
            }
            CleanupStep::RemoveFile { path } => {
                fsutil::remove_file_idempotent(path).map_err(|e| fail(e.to_string()))
            }
            CleanupStep::RemoveDir { path } => {
                fsutil::remove_dir_all_idempotent(path).map_err(|e| fail(e.to_string()))
            }
        }
    }
}

/// Run every step in order, continuing past failures, and return the failures.
pub fn run_all(steps: &[CleanupStep]) -> Vec<CleanupError> {
    steps.iter().filter_map(|s| s.run().err()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(run_all(&steps).is_empty());
        reaper.join().unwrap().unwrap();
        assert!(!sub.exists() && !file.exists());
        // Replaying is harmless.
        assert!(run_all(&steps).is_empty());
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
