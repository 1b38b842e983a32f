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

use crate::cleanup::{self, CleanupStep, Disposition, TeardownReport};
use crate::fsutil::{self, io_at, FileLock, PathIoError};
use crate::names::Name;
use crate::paths::Paths;
use crate::process::ProcessRef;

use super::record::{VmRecord, VmStatus};

/// Failure of a store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Every bridged address is held by a VM.
    #[error(transparent)]
    AddressPool(#[from] crate::network::NetError),
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
    /// A record file is not valid JSON.
    #[error("state record {path} is corrupt; remove it if no VM uses it")]
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
    /// Name held by an exited container VM (kept for its logs and exit code).
    #[error("the name \"{name}\" is in use by an exited container VM (exit code {code}); remove it with `fcvm rm {name}` or pick another --name")]
    NameTakenByExited {
        /// The name.
        name: Name,
        /// Its exit code.
        code: i32,
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

/// Why the reaper took a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReapReason {
    /// Its owner process is gone.
    OwnerGone,
    /// A clone whose page server died: it would hang (or read zero pages) at its next
    /// fault, so it is stopped and kept as failed.
    PageServerGone(ProcessRef),
    /// A failed VM with undo steps still pending from an earlier attempt.
    Retry,
}

/// A record the reaper tore down.
#[derive(Debug)]
pub struct Reaped {
    /// Why.
    pub reason: ReapReason,
    /// What teardown did (the record as it was, the steps that failed).
    pub report: TeardownReport,
}

/// What the reaper does with `record`, if anything.
pub fn reap_reason(record: &VmRecord) -> Option<ReapReason> {
    if record.has_ended() {
        let retry = !record.cleanup.is_empty() && !record.is_live();
        return retry.then_some(ReapReason::Retry);
    }
    if let Some(server) = record.page_server {
        let running = record.status != VmStatus::Stopping;
        if running && !server.is_alive() && record.vmm.is_some_and(|v| v.is_alive()) {
            return Some(ReapReason::PageServerGone(server));
        }
    }
    (!record.is_live()).then_some(ReapReason::OwnerGone)
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
    /// reaped first so that the name of a crashed VM can be reused at once; a failed VM
    /// holds no name (its record, if nothing is left to undo, is replaced).
    pub fn create(&self, record: &VmRecord) -> Result<Vec<Reaped>, StoreError> {
        self.create_with(&mut record.clone(), |_, _| Ok(()))
    }

    /// [`Store::create`], letting `decide` fill in what must not collide between VMs (a
    /// network address) from every other record, under the same lock as the write.
    pub fn create_with(
        &self,
        record: &mut VmRecord,
        decide: impl FnOnce(&[VmRecord], &mut VmRecord) -> Result<(), StoreError>,
    ) -> Result<Vec<Reaped>, StoreError> {
        let reaped = self.reap_stale()?;
        let _lock = self.lock()?;
        let all = self.read_all()?;
        for other in all.iter().filter(|r| r.name == record.name).cloned() {
            if other.status == VmStatus::Failed && other.cleanup.is_empty() {
                // Shown until replaced: nothing is left to undo but its logs.
                if let Some(dir) = &other.log_dir {
                    let _ = fsutil::remove_dir_all_idempotent(dir);
                }
                self.remove_locked(&other.id)?;
                continue;
            }
            if !other.holds_name() {
                continue;
            }
            if other.status == VmStatus::Exited {
                return Err(StoreError::NameTakenByExited {
                    name: other.name,
                    code: other.exit_code.unwrap_or(-1),
                });
            }
            let pid = other.pid();
            return Err(StoreError::NameTaken {
                name: other.name,
                pid,
            });
        }
        decide(&all, record)?;
        self.write_locked(record)?;
        Ok(reaped)
    }

    /// Apply `change` to the record `id` and save it. Returns the updated record.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmRecord, StoreError> {
        self.try_update(id, change)?
            .ok_or_else(|| StoreError::NotFound(format!("id {id}")))
    }

    /// [`Store::update`], with `None` when the record is gone.
    pub fn try_update(
        &self,
        id: &str,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<Option<VmRecord>, StoreError> {
        let _lock = self.lock()?;
        let Some(mut record) = self.read_if_exists(&self.record_path(id))? else {
            return Ok(None);
        };
        change(&mut record);
        self.write_locked(&record)?;
        Ok(Some(record))
    }

    /// The record `id`, if it exists.
    pub fn get(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        let _lock = self.lock()?;
        self.read_if_exists(&self.record_path(id))
    }

    /// End of a teardown: keep exactly the steps in `left`, and delete the record unless
    /// `keep` is set. Returns whether it was deleted.
    pub fn finish_teardown(
        &self,
        id: &str,
        left: Vec<CleanupStep>,
        keep: bool,
    ) -> Result<bool, StoreError> {
        let _lock = self.lock()?;
        let Some(mut record) = self.read_if_exists(&self.record_path(id))? else {
            return Ok(true);
        };
        if !keep && left.is_empty() {
            self.remove_locked(id)?;
            return Ok(true);
        }
        record.cleanup = left;
        self.write_locked(&record)?;
        Ok(false)
    }

    /// Delete the record `id` (idempotent).
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        self.remove_locked(id)
    }

    fn remove_locked(&self, id: &str) -> Result<(), StoreError> {
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

    /// Reap every stale record (see [`reap_reason`]). Records are claimed under the lock
    /// (their owner becomes this process, so a concurrent reaper leaves them alone) and
    /// torn down after it is released.
    pub fn reap_stale(&self) -> Result<Vec<Reaped>, StoreError> {
        let claimed = {
            let _lock = self.lock()?;
            let mut claimed = Vec::new();
            for mut record in self.read_all()? {
                let Some(reason) = reap_reason(&record) else {
                    continue;
                };
                record.owner = ProcessRef::current();
                self.write_locked(&record)?;
                claimed.push((record, reason));
            }
            claimed
        };
        let mut reaped = Vec::new();
        for (record, reason) in claimed {
            let how = match &reason {
                ReapReason::OwnerGone => Disposition::Forget,
                ReapReason::PageServerGone(server) => Disposition::Fail(format!(
                    "page server (pid {}) serving snapshot {} died; the clone lost its memory source and was stopped",
                    server.pid,
                    record.snapshot.as_deref().unwrap_or("?")
                )),
                ReapReason::Retry if record.status == VmStatus::Exited => Disposition::Exited,
                ReapReason::Retry => {
                    Disposition::Fail(record.error.clone().unwrap_or_else(|| "failed".into()))
                }
            };
            let report = cleanup::teardown(self, &record.id, how)?;
            reaped.push(Reaped { reason, report });
        }
        Ok(reaped)
    }

    /// Find a live record by name, or else an ended one (exited or failed, kept for the
    /// user to see).
    pub fn find_by_name(&self, name: &str) -> Result<VmRecord, StoreError> {
        let mut matching: Vec<VmRecord> = self
            .list()?
            .into_iter()
            .filter(|r| r.name.as_str() == name)
            .collect();
        let live = matching.iter().position(|r| r.is_live() && !r.has_ended());
        let exited = matching.iter().position(|r| r.status == VmStatus::Exited);
        let failed = matching.iter().position(|r| r.status == VmStatus::Failed);
        match live.or(exited).or(failed) {
            Some(i) => Ok(matching.swap_remove(i)),
            None => Err(StoreError::NotFound(format!("name {name:?}"))),
        }
    }

    /// Find a live record by the pid of its owner or its VMM.
    pub fn find_by_pid(&self, pid: u32) -> Result<VmRecord, StoreError> {
        self.list()?
            .into_iter()
            .find(|r| r.is_live() && (r.owner.pid == pid || r.vmm.is_some_and(|v| v.pid == pid)))
            .ok_or_else(|| StoreError::NotFound(format!("pid {pid}")))
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

    fn read_if_exists(&self, path: &Path) -> Result<Option<VmRecord>, StoreError> {
        match self.read(path) {
            Ok(r) => Ok(Some(r)),
            Err(StoreError::Io(e)) if e.source.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
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
