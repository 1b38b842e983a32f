//! Small filesystem helpers shared by the state store, setup and snapshots: atomic writes,
//! advisory locks and content hashes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// A filesystem operation that failed on a path: the one I/O error shape every module
/// reports, so messages read the same everywhere ("create /var/lib/fcvm/vms: ...").
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}", path.display())]
pub struct PathIoError {
    /// What was being done (`create`, `read`, `rename` ...).
    pub action: &'static str,
    /// On which path.
    pub path: std::path::PathBuf,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

/// For `map_err`: names the action and path of a failed I/O call.
pub fn io_at<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> PathIoError + 'a {
    move |source| PathIoError {
        action,
        path: path.to_owned(),
        source,
    }
}

/// An exclusive advisory lock held until dropped.
pub type FileLock = Flock<File>;

/// Take an exclusive `flock` on `path` (created if missing), waiting for other holders.
///
/// flock locks are released by the kernel when the holder dies, so a SIGKILLed fcvm never
/// leaves a lock behind.
pub fn lock_exclusive(path: &Path) -> io::Result<FileLock> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io::Error::from(errno))
}

/// Write `bytes` to `path` atomically: a reader sees the old content or the new, never a mix.
///
/// The temporary file lives beside the target, so the rename stays on one filesystem, and
/// it is fsynced before the rename so a crash cannot publish an empty file.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Replace `path` with `bytes` atomically for concurrent readers, without forcing the data
/// to disk.
///
/// For runtime state (VM records) that describes processes which do not survive a host
/// crash anyway: the rename keeps readers from ever seeing a torn file, and skipping the
/// fsync keeps `fcvm run` fast. Use [`atomic_write`] for anything that must survive a crash.
pub fn atomic_replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Hex SHA-256 of a file's content.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Hex SHA-256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// chmod `path` to `mode`.
pub fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Remove a directory tree, treating "already gone" as success.
pub fn remove_dir_all_idempotent(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Remove a file, treating "already gone" as success.
pub fn remove_file_idempotent(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        // No temporary files are left beside the target.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn sha256_matches_known_vector() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"abc").unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file(&p).unwrap(), want);
        assert_eq!(sha256_bytes(b"abc"), want);
    }

    #[test]
    fn removal_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        remove_dir_all_idempotent(&dir.path().join("nope")).unwrap();
        remove_file_idempotent(&dir.path().join("nope")).unwrap();
    }
}
