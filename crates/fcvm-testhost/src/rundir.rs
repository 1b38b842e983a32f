//! Per-run temporary files, and sweeping the ones a killed run left behind.
//!
//! A run's files live in `<base>/<pid>-<starttime>-<nanos>/`. Each is unlinked as soon as QEMU
//! holds it open (the scratch image is passed as an fd, the console log is QEMU's stdout, the
//! control socket goes once QEMU has connected), so the window in which a SIGKILL can leave
//! something behind is the start-up second. For that window every start sweeps directories
//! whose owner (pid + start time, so a reused pid does not count) is gone.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The directory holding all run directories of this user.
pub fn base_dir() -> PathBuf {
    let uid = nix::unistd::geteuid().as_raw();
    std::env::temp_dir().join(format!("fcvm-testhost-{uid}"))
}

/// A process's start time (field 22 of `/proc/<pid>/stat`), to tell a live owner from a reused
/// pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Parses a run directory name into (pid, start time).
pub fn parse_name(name: &str) -> Option<(u32, u64)> {
    let mut it = name.split('-');
    let pid = it.next()?.parse().ok()?;
    let st = it.next()?.parse().ok()?;
    it.next()?;
    Some((pid, st))
}

/// This run's directory. Removes the directory on drop (it is normally empty by then).
#[derive(Debug)]
pub struct RunDir {
    /// The directory.
    pub path: PathBuf,
    /// Unique id (also in QEMU's `-name`).
    pub id: String,
}

impl RunDir {
    /// Sweeps stale run directories, then creates this run's.
    pub fn create() -> Result<RunDir> {
        let base = base_dir();
        fs::create_dir_all(&base).map_err(Error::io("creating", &base))?;
        sweep(&base);
        let pid = std::process::id();
        let st = start_time(pid).unwrap_or(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!("{pid}-{st}-{nanos:x}");
        let path = base.join(&id);
        fs::create_dir(&path).map_err(Error::io("creating", &path))?;
        Ok(RunDir { path, id })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes run directories whose owner is dead.
pub fn sweep(base: &Path) {
    let Ok(rd) = fs::read_dir(base) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((pid, st)) = parse_name(&name) else {
            continue;
        };
        if start_time(pid) != Some(st) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_liveness() {
        assert_eq!(parse_name("12-345-abc"), Some((12, 345)));
        assert_eq!(parse_name("12-345"), None);
        assert_eq!(parse_name("x-1-2"), None);
        let me = std::process::id();
        assert!(start_time(me).is_some());
        let dir = tempfile::tempdir().unwrap();
        let live = dir
            .path()
            .join(format!("{me}-{}-1", start_time(me).unwrap()));
        let dead = dir.path().join(format!("{me}-1-1"));
        let other = dir.path().join("keep-me");
        for d in [&live, &dead, &other] {
            fs::create_dir(d).unwrap();
        }
        sweep(dir.path());
        assert!(live.exists() && other.exists() && !dead.exists());
    }
}
