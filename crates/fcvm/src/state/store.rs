//! The on-disk store of VM records: `state/<id>.json`, one file per VM.
//!
//! Every change happens under one store-wide `flock` and is published with
//! write-then-rename, so concurrent fcvm processes never see a torn record and two VMs can
//! never claim the same name. Records whose owner process is gone are stale: they are
//! reaped (their cleanup steps replayed, then the file removed) by whichever fcvm command
//! looks next.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::cleanup::{self, CleanupError};
use crate::fsutil::{self, io_at, FileLock, PathIoError};
use crate::names::Name;
use crate::paths::Paths;

use super::record::{VmRecord, VmStatus};
use crate::process::ProcessRef;

/// The dead page server a not-yet-failed clone depends on, if any.
fn orphaned_by(record: &VmRecord) -> Option<ProcessRef> {
    let server = record.page_server?;
    let running = record.status != VmStatus::Failed && record.status != VmStatus::Stopping;
    (running && !server.is_alive() && record.vmm.is_some_and(|v| v.is_alive())).then_some(server)
}

/// Failure of a store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// A record file is not valid JSON.
    #[error("state record {path} is corrupt ({source}); remove it if no VM uses it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// Name already used by a live VM.
    #[error("a VM named \"{name}\" is already running (pid {pid}); pick another --name or stop it with `fcvm stop {name}`")]
    NameTaken {
        /// The name.
        name: Name,
        /// Its owner.
        pid: u32,
    },
    /// No such VM.
    #[error("no running VM matches {0}; see `fcvm ls`")]
    NotFound(String),
}

/// Handle on the state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// A record reaped because its owner died, with any cleanup steps that failed.
#[derive(Debug)]
pub struct Reaped {
    /// The record as it was.
    pub record: VmRecord,
    /// Steps that could not be completed.
    pub failures: Vec<CleanupError>,
}

impl Store {
    /// Open (creating if needed) the store under `paths`.
    pub fn open(paths: &Paths) -> Result<Store, StoreError> {
        Self::open_dir(paths.state_dir())
    }

    /// Open (creating if needed) the store in `dir`.
    pub fn open_dir(dir: PathBuf) -> Result<Store, StoreError> {
        fs::create_dir_all(&dir).map_err(io_at("create", &dir))?;
        Ok(Store { dir })
    }

    fn lock(&self) -> Result<FileLock, StoreError> {
        let path = self.dir.join(".lock");
        fsutil::lock_exclusive(&path)
            .map_err(io_at("lock", &path))
            .map_err(Into::into)
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Add a new record, refusing a name that a live VM already has. Stale records are
    /// reaped first so that the name of a crashed VM can be reused at once.
    pub fn create(&self, record: &VmRecord) -> Result<Vec<Reaped>, StoreError> {
        let _lock = self.lock()?;
        let reaped = self.reap_locked()?;
        if let Some(other) = self.read_all()?.into_iter().find(|r| r.name == record.name) {
            let pid = other.pid();
            return Err(StoreError::NameTaken {
                name: other.name,
                pid,
            });
        }
        self.write_locked(record)?;
        Ok(reaped)
    }

    /// Apply `change` to the record `id` and save it. Returns the updated record.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmRecord, StoreError> {
        let _lock = self.lock()?;
        let mut record = self.read(&self.record_path(id))?;
        change(&mut record);
        self.write_locked(&record)?;
        Ok(record)
    }

    /// Delete the record `id` (idempotent).
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        let path = self.record_path(id);
        fsutil::remove_file_idempotent(&path)
            .map_err(io_at("remove", &path))
            .map_err(Into::into)
    }

    /// All records, stale ones included.
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        let _lock = self.lock()?;
        self.read_all()
    }

    /// Reap every stale record: replay its cleanup steps, then delete it.
    pub fn reap_stale(&self) -> Result<Vec<Reaped>, StoreError> {
        let _lock = self.lock()?;
        self.reap_locked()
    }

    /// Find a live (or failed, kept for the user to see) record by name.
    pub fn find_by_name(&self, name: &str) -> Result<VmRecord, StoreError> {
        self.list()?
            .into_iter()
            .find(|r| r.name.as_str() == name && (r.is_live() || r.status == VmStatus::Failed))
            .ok_or_else(|| StoreError::NotFound(format!("name {name:?}")))
    }

    /// Find a live record by the pid of its owner or its VMM.
    pub fn find_by_pid(&self, pid: u32) -> Result<VmRecord, StoreError> {
        self.list()?
            .into_iter()
            .find(|r| r.is_live() && (r.owner.pid == pid || r.vmm.is_some_and(|v| v.pid == pid)))
            .ok_or_else(|| StoreError::NotFound(format!("pid {pid}")))
    }

    fn reap_locked(&self) -> Result<Vec<Reaped>, StoreError> {
        let mut reaped = Vec::new();
        for mut record in self.read_all()? {
            if let Some(server) = orphaned_by(&record) {
                // A clone whose page server died would hang (or worse) at its next page
                // fault: stop it and keep a Failed record so the user sees why.
                let failures = cleanup::run_all(&record.cleanup);
                record.status = VmStatus::Failed;
                record.error = Some(format!(
                    "page server (pid {}) serving snapshot {} died; the clone lost its memory source and was stopped",
                    server.pid,
                    record.snapshot.as_deref().unwrap_or("?")
                ));
                record.cleanup.clear();
                self.write_locked(&record)?;
                reaped.push(Reaped { record, failures });
                continue;
            }
            // Failed records stay until `fcvm stop`, so the error remains visible.
            if record.is_live() || record.status == VmStatus::Failed {
                continue;
            }
            let failures = cleanup::run_all(&record.cleanup);
            let path = self.record_path(&record.id);
            fsutil::remove_file_idempotent(&path).map_err(io_at("remove", &path))?;
            reaped.push(Reaped { record, failures });
        }
        Ok(reaped)
    }

    fn read_all(&self) -> Result<Vec<VmRecord>, StoreError> {
        let mut records = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_at("read", &self.dir))? {
            let path = entry.map_err(io_at("read", &self.dir))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                match self.read(&path) {
                    Ok(r) => records.push(r),
                    // Removed by a concurrent reaper between readdir and open.
                    Err(StoreError::Io(e)) if e.source.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        records.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
        Ok(records)
    }

    fn read(&self, path: &Path) -> Result<VmRecord, StoreError> {
        let bytes = fs::read(path).map_err(io_at("read", path))?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
            path: path.to_owned(),
            source,
        })
    }

    fn write_locked(&self, record: &VmRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.id);
        let bytes = serde_json::to_vec_pretty(record).expect("records always serialize");
        // Records describe live processes, which a host crash ends anyway: atomic for
        // readers is what matters, durability is not worth an fsync per update.
        fsutil::atomic_replace(&path, &bytes)
            .map_err(io_at("write", &path))
            .map_err(Into::into)
    }
}
