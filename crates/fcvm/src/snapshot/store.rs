//! The `snapshots/` directory: published snapshots, staging dirs, and the lock.
//!
//! A snapshot is built in a hidden staging dir `snapshots/.<tag>.creating-<rand>/` on the
//! same filesystem, fsynced, then renamed to `snapshots/<tag>` and the parent dir fsynced:
//! readers see either the whole snapshot or nothing. A staging dir holds a `creator` file
//! naming the creating process; if that process is gone, the dir is garbage and is removed
//! by the next `snapshot create` or `snapshots` command.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::fsutil::{self, io_at, FileLock, PathIoError};
use crate::paths::Paths;
use crate::process::ProcessRef;

use super::meta::{SnapshotMeta, META_FILE};

const CREATOR_FILE: &str = "creator";
const STAGING_MARK: &str = ".creating-";

/// Failures of the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// Bad tag.
    #[error(
        "invalid snapshot tag {0:?}: use letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadTag(String),
    /// Tag taken.
    #[error(
        "snapshot {0} already exists; pick another --tag or remove it with `fcvm snapshots rm {0}`"
    )]
    Exists(String),
    /// No such snapshot.
    #[error("no snapshot named {0}; see `fcvm snapshots`")]
    NotFound(String),
    /// Metadata unreadable.
    #[error("snapshot {tag} is unreadable; remove it with `fcvm snapshots rm {tag}`")]
    BadMeta {
        /// The tag.
        tag: String,
        /// Cause.
        source: io::Error,
    },
}

/// Check a user-supplied tag.
pub fn check_tag(tag: &str) -> Result<(), StoreError> {
    let ok = !tag.is_empty()
        && tag.len() <= 64
        && !tag.starts_with('.')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadTag(tag.to_owned()))
    }
}

/// A published snapshot with its sizes on disk.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Its metadata.
    #[serde(flatten)]
    pub meta: SnapshotMeta,
    /// Directory.
    pub path: PathBuf,
    /// Sum of file lengths.
    pub apparent_bytes: u64,
    /// Sum of allocated blocks (shared reflinked extents count in full for each snapshot).
    pub allocated_bytes: u64,
}

/// Handle on `snapshots/`.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

/// A staging directory being filled; removed on drop unless published.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    published: bool,
}

impl Staging {
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fsutil::remove_dir_all_idempotent(&self.dir);
        }
    }
}

impl SnapshotStore {
    /// Open (creating) `snapshots/`.
    pub fn open(paths: &Paths) -> Result<SnapshotStore, StoreError> {
        SnapshotStore::at(paths.snapshots_dir())
    }

    /// Open (creating) a store of the same layout in `dir` (the image cache's).
    pub fn at(dir: PathBuf) -> Result<SnapshotStore, StoreError> {
        fs::create_dir_all(&dir).map_err(io_at("create", &dir))?;
        Ok(SnapshotStore { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Serialise creators and removers.
    pub fn lock(&self) -> Result<FileLock, StoreError> {
        let path = self.dir.join(".lock");
        fsutil::lock_exclusive(&path)
            .map_err(io_at("lock", &path))
            .map_err(Into::into)
    }

    /// Directory of a published snapshot.
    pub fn path(&self, tag: &str) -> PathBuf {
        self.dir.join(tag)
    }

    /// Whether `tag` is published.
    pub fn exists(&self, tag: &str) -> bool {
        self.path(tag).join(META_FILE).is_file()
    }

    /// Metadata of a published snapshot.
    pub fn get(&self, tag: &str) -> Result<SnapshotMeta, StoreError> {
        check_tag(tag)?;
        let dir = self.path(tag);
        if !dir.is_dir() {
            return Err(StoreError::NotFound(tag.to_owned()));
        }
        SnapshotMeta::read(&dir).map_err(|source| StoreError::BadMeta {
            tag: tag.to_owned(),
            source,
        })
    }

    /// A new staging dir for `tag` (call with the lock held; `tag` must be free).
    pub fn stage(&self, tag: &str) -> Result<Staging, StoreError> {
        check_tag(tag)?;
        if self.path(tag).exists() {
            return Err(StoreError::Exists(tag.to_owned()));
        }
        let dir = self
            .dir
            .join(format!(".{tag}{STAGING_MARK}{}", crate::state::new_vm_id()));
        fs::create_dir(&dir).map_err(io_at("create", &dir))?;
        let staging = Staging {
            dir,
            published: false,
        };
        let me = serde_json::to_vec(&ProcessRef::current()).expect("serialises");
        let creator = staging.dir.join(CREATOR_FILE);
        fs::write(&creator, me).map_err(io_at("write", &creator))?;
        Ok(staging)
    }

    /// Publish a filled staging dir as `tag`: fsync every file and the dir, rename, fsync
    /// `snapshots/`.
    pub fn publish(&self, mut staging: Staging, tag: &str) -> Result<PathBuf, StoreError> {
        let dir = staging.dir.clone();
        let _ = fs::remove_file(dir.join(CREATOR_FILE));
        for entry in fs::read_dir(&dir).map_err(io_at("read", &dir))? {
            let path = entry.map_err(io_at("read", &dir))?.path();
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_at("fsync", &path))?;
        }
        fsync_dir(&dir)?;
        let target = self.path(tag);
        if target.exists() {
            return Err(StoreError::Exists(tag.to_owned()));
        }
        fs::rename(&dir, &target).map_err(io_at("rename into place", &target))?;
        staging.published = true;
        fsync_dir(&self.dir)?;
        Ok(target)
    }

    /// Remove staging dirs whose creator is gone. Returns the removed paths.
    pub fn sweep_stale_staging(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_at("read", &self.dir))? {
            let entry = entry.map_err(io_at("read", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with('.') && name.contains(STAGING_MARK)) {
                continue;
            }
            let path = entry.path();
            let creator = fs::read(path.join(CREATOR_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<ProcessRef>(&b).ok());
            if creator.is_some_and(|c| c.is_alive()) {
                continue;
            }
            fsutil::remove_dir_all_idempotent(&path).map_err(io_at("remove", &path))?;
            removed.push(path);
        }
        Ok(removed)
    }

    /// Every published snapshot, oldest first. Unreadable ones are skipped with a warning.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_at("read", &self.dir))? {
            let entry = entry.map_err(io_at("read", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            match SnapshotMeta::read(&entry.path()) {
                Ok(meta) => {
                    let (apparent_bytes, allocated_bytes) = dir_sizes(&entry.path());
                    out.push(SnapshotInfo {
                        meta,
                        path: entry.path(),
                        apparent_bytes,
                        allocated_bytes,
                    });
                }
                Err(e) => {
                    tracing::warn!("skipping snapshot dir {name}: {}", crate::report::chain(&e))
                }
            }
        }
        out.sort_by_key(|s| s.meta.created_at_ms);
        Ok(out)
    }

    /// Remove a published snapshot (the caller checks it is unused). The directory is
    /// first renamed out of sight so a half-removed snapshot is never listed.
    pub fn remove(&self, tag: &str) -> Result<(), StoreError> {
        check_tag(tag)?;
        let dir = self.path(tag);
        if !dir.exists() {
            return Err(StoreError::NotFound(tag.to_owned()));
        }
        let doomed = self
            .dir
            .join(format!(".{tag}.removing-{}", crate::state::new_vm_id()));
        fs::rename(&dir, &doomed).map_err(io_at("rename", &dir))?;
        fsync_dir(&self.dir)?;
        fsutil::remove_dir_all_idempotent(&doomed)
            .map_err(io_at("remove", &doomed))
            .map_err(Into::into)
    }

    /// Remove leftovers of interrupted removals (`.<tag>.removing-*`).
    pub fn sweep_removals(&self) -> Result<(), StoreError> {
        for entry in fs::read_dir(&self.dir).map_err(io_at("read", &self.dir))? {
            let entry = entry.map_err(io_at("read", &self.dir))?;
            if entry.file_name().to_string_lossy().contains(".removing-") {
                let p = entry.path();
                fsutil::remove_dir_all_idempotent(&p).map_err(io_at("remove", &p))?;
            }
        }
        Ok(())
    }
}

/// fsync a directory so a rename or new entry in it is durable.
pub fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_at("fsync", dir))
        .map_err(Into::into)
}

/// (apparent, allocated) bytes of the files directly in `dir`.
pub fn dir_sizes(dir: &Path) -> (u64, u64) {
    let mut apparent = 0;
    let mut allocated = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                if m.is_file() {
                    apparent += m.len();
                    allocated += m.blocks() * 512;
                }
            }
        }
    }
    (apparent, allocated)
}

/// Write `bytes` to a new file and fsync it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
