//! The content-addressed cache (kernel trees, initramfs images) and finding host programs.
//!
//! Every entry is named after a hash of what it was made from and is published with a rename
//! from a private temporary name, so concurrent runs never see half-written entries: the loser of
//! a race just deletes its copy and uses the winner's.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The cache root: `$FCVM_TESTHOST_CACHE`, else `/var/cache/fcvm-testhost` for root, else
/// `$XDG_CACHE_HOME/fcvm-testhost` (`~/.cache/fcvm-testhost`).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FCVM_TESTHOST_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/cache/fcvm-testhost");
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("fcvm-testhost");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/fcvm-testhost")
}

/// A unique temporary name next to `final_path` (same filesystem, so rename is atomic).
pub fn temp_sibling(final_path: &Path) -> PathBuf {
    let name = final_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    final_path.with_file_name(format!(".tmp-{name}-{}-{nanos:x}", std::process::id()))
}

/// Moves `tmp` to `final_path` unless another run published it first (then `tmp` is removed).
pub fn publish(tmp: &Path, final_path: &Path) -> Result<()> {
    if final_path.exists() {
        remove_any(tmp);
        return Ok(());
    }
    match fs::rename(tmp, final_path) {
        Ok(()) => Ok(()),
        // A directory rename onto an existing non-empty directory fails: someone won the race.
        Err(_) if final_path.exists() => {
            remove_any(tmp);
            Ok(())
        }
        Err(e) => {
            remove_any(tmp);
            Err(Error::Io {
                action: "publishing cache entry",
                path: final_path.to_path_buf(),
                source: e,
            })
        }
    }
}

/// Best-effort removal of a file or directory tree.
pub fn remove_any(p: &Path) {
    if fs::remove_dir_all(p).is_err() {
        let _ = fs::remove_file(p);
    }
}

/// Finds `program` in `PATH` (plus the sbin directories, which a non-root PATH may lack).
pub fn find_program(program: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
        .ok_or_else(|| Error::MissingProgram {
            program: program.to_string(),
            package: package.to_string(),
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs a host command and turns a non-zero exit into [`Error::Command`] with its stderr.
pub fn run_checked(cmd: &mut std::process::Command, what: &str) -> Result<std::process::Output> {
    let out = cmd.output().map_err(|e| Error::Command {
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            what: what.to_string(),
            detail: format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        });
    }
    Ok(out)
}

/// Removes cache entries named `<prefix>*` other than `keep` that were not modified for
/// `max_age` (entries of other pins or older builds, which another checkout may still use for a
/// while), and temporary `.tmp-*` leftovers of killed runs older than an hour.
pub fn prune(cache: &Path, prefix: &str, keep: &str, max_age: std::time::Duration) {
    let Ok(rd) = fs::read_dir(cache) else { return };
    let now = std::time::SystemTime::now();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .unwrap_or_default();
        let stale_entry = name.starts_with(prefix) && !name.starts_with(keep) && age > max_age;
        let stale_tmp = name.starts_with(".tmp-") && age > std::time::Duration::from_secs(3600);
        if stale_entry || stale_tmp {
            remove_any(&e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn publish_race_keeps_the_winner_and_prune_spares_fresh_entries() {
        let d = tempfile::tempdir().unwrap();
        let fin = d.path().join("initramfs-aaaa.cpio");
        let t1 = temp_sibling(&fin);
        fs::write(&t1, "first").unwrap();
        publish(&t1, &fin).unwrap();
        let t2 = temp_sibling(&fin);
        fs::write(&t2, "second").unwrap();
        publish(&t2, &fin).unwrap();
        assert_eq!(fs::read_to_string(&fin).unwrap(), "first");
        assert!(!t1.exists() && !t2.exists());
        // Directories too (the kernel entry).
        let dfin = d.path().join("kernel-x");
        for content in ["a", "b"] {
            let t = temp_sibling(&dfin);
            fs::create_dir(&t).unwrap();
            fs::write(t.join("f"), content).unwrap();
            publish(&t, &dfin).unwrap();
            assert!(!t.exists());
        }
        assert_eq!(fs::read_to_string(dfin.join("f")).unwrap(), "a");
        fs::write(d.path().join("initramfs-old.cpio"), "").unwrap();
        prune(
            d.path(),
            "initramfs-",
            "initramfs-aaaa",
            Duration::from_secs(3600),
        );
        assert!(d.path().join("initramfs-old.cpio").exists(), "fresh: kept");
        prune(d.path(), "initramfs-", "initramfs-aaaa", Duration::ZERO);
        assert!(!d.path().join("initramfs-old.cpio").exists());
        assert!(fin.exists() && dfin.exists());
    }
}
