//! Starting a clone: a fresh Firecracker restored from a published snapshot.
//!
//! Per clone, in order (each step timed, see [`CloneTimings`]):
//! 1. a state record (kind `clone`, naming the snapshot and the page server it depends on);
//! 2. its own network namespace `fcvm-<id>` with the same TAP name as the original, when the
//!    original had one (Firecracker 1.12 cannot retarget TAPs on load);
//! 3. reflinked copies of the snapshot's disks into its runtime dir;
//! 4. the VMM, in a private mount namespace where the runtime dir is [`VMM_VIEW_DIR`], so
//!    every path recorded in the vmstate resolves to *this* clone's files;
//! 5. `PUT /snapshot/load` without resuming (File backend: the memory file, mapped
//!    privately; Uffd: the page server's socket), with dirty tracking on so the clone can
//!    itself be diff-snapshotted against this snapshot;
//! 6. `PATCH /drives/<id>` to the clone's own copies, then resume.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cleanup::CleanupStep;
use crate::firecracker::binary::{self, BinaryError, Program};
use crate::firecracker::models::{MemBackend, MemBackendType, PartialDrive, SnapshotLoadParams};
use crate::firecracker::TransportError;
use crate::names::{Name, NameError};
use crate::network::{self, NetError};
use crate::paths::{Paths, VmPaths, VMM_VIEW_DIR};
use crate::process::ProcessRef;
use crate::state::{new_vm_id, Store, StoreError as StateError, VmKind, VmRecord, VmStatus};
use crate::storage;
use crate::vm::spawn::SpawnError;
use crate::vm::{spawn_vmm_with, SpawnExtras, SpawnOptions, SpawnedVmm};

use super::meta::{SnapshotMeta, MEMORY_FILE, VMSTATE_FILE};
use super::store::{SnapshotStore, StoreError};

/// Where a clone's memory comes from.
#[derive(Debug, Clone)]
pub enum MemorySource {
    /// Map the snapshot's memory file privately.
    File,
    /// A page server.
    Uffd {
        /// Its socket.
        socket: PathBuf,
        /// The serving process (recorded so its death is noticed).
        server: ProcessRef,
    },
}

/// One clone to start.
#[derive(Debug, Clone)]
pub struct CloneRequest {
    /// Snapshot tag.
    pub tag: String,
    /// Clone name; `<tag>-<id>` when unset.
    pub name: Option<String>,
    /// Memory source.
    pub memory: MemorySource,
    /// The clone outlives this process (PR_SET_PDEATHSIG off; Firecracker owns the record).
    pub detach: bool,
    /// Mark the VMM's memory mergeable by KSM.
    pub ksm: bool,
    /// Track dirty pages so the clone itself can be Diff-snapshotted. Off by default:
    /// tracking write-protects guest memory and slows the restored guest's first writes.
    pub track_dirty_pages: bool,
}

/// Time spent in each step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CloneTimings {
    /// State record.
    pub record: Duration,
    /// Network namespace + TAP.
    pub netns: Duration,
    /// Disk reflinks.
    pub disks: Duration,
    /// VMM spawn until its API answers.
    pub spawn: Duration,
    /// `PUT /snapshot/load`.
    pub load: Duration,
    /// Drive patches.
    pub patch: Duration,
    /// `PATCH /vm Resumed`.
    pub resume: Duration,
    /// Everything.
    pub total: Duration,
}

/// A running clone.
#[derive(Debug)]
pub struct StartedClone {
    /// Its record as last written.
    pub record: VmRecord,
    /// The VMM.
    pub vmm: SpawnedVmm,
    /// Its runtime files.
    pub vm_paths: VmPaths,
    /// Step timings.
    pub timings: CloneTimings,
    /// The snapshot's metadata.
    pub meta: SnapshotMeta,
}

/// Why a clone did not start. Everything created for it has been removed again.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// Bad name.
    #[error("invalid --name: {0}")]
    Name(#[from] NameError),
    /// Snapshot store.
    #[error(transparent)]
    Snapshots(#[from] StoreError),
    /// State store.
    #[error(transparent)]
    State(#[from] StateError),
    /// Firecracker unusable.
    #[error(transparent)]
    Binary(#[from] BinaryError),
    /// Namespace/TAP.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Disk copy.
    #[error("copying disk {path}")]
    Disk {
        /// Source disk.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// VMM start.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// API failure.
    #[error("{step} (Firecracker log: {log})")]
    Api {
        /// What was being done.
        step: &'static str,
        /// Cause.
        source: TransportError,
        /// Log.
        log: PathBuf,
    },
}

/// Start one clone. On error, everything made for it is undone and its record removed.
pub async fn start_clone(paths: &Paths, req: &CloneRequest) -> Result<StartedClone, CloneError> {
    let t0 = Instant::now();
    let snapshots = SnapshotStore::open(paths)?;
    let meta = snapshots.get(&req.tag)?;
    let snap_dir = snapshots.path(&req.tag);
    let firecracker = binary::find(Program::Firecracker, paths)?;
    let id = new_vm_id();
    let name = Name::parse(
        &req.name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", req.tag, &id[..6])),
    )?;
    let vm_paths = VmPaths::new(paths.vm_dir(&id));
    let netns = meta.needs_tap().then(|| format!("fcvm-{id}"));

    let mut record = VmRecord::new(id.clone(), name, VmKind::Clone, vm_paths.dir().to_owned());
    record.vmm_kind = "firecracker".into();
    record.vcpus = meta.vcpus;
    record.mem_mib = meta.mem_mib;
    record.track_dirty_pages = req.track_dirty_pages;
    record.kernel = meta.kernel.clone();
    record.snapshot = Some(req.tag.clone());
    record.diff_parent = Some(req.tag.clone());
    record.api_socket = Some(vm_paths.api_socket());
    record.console_log = Some(vm_paths.console_log());
    record.netns = netns.clone();
    record.tap = meta.tap.clone();
    if let MemorySource::Uffd { socket, server } = &req.memory {
        record.uffd_socket = Some(socket.clone());
        record.page_server = Some(*server);
    }
    record.cleanup = vec![CleanupStep::RemoveDir {
        path: vm_paths.dir().to_owned(),
    }];
    if let Some(ns) = &netns {
        // Recorded before it exists, so a crash right after creating it is still undone.
        record
            .cleanup
            .insert(0, CleanupStep::DeleteNetns { name: ns.clone() });
    }
    let state = Store::open(paths)?;
    state.create(&record)?;
    let mut timings = CloneTimings {
        record: t0.elapsed(),
        ..CloneTimings::default()
    };

    let result = restore(
        &state,
        &record,
        &meta,
        &snap_dir,
        &vm_paths,
        &firecracker.path,
        req,
        &mut timings,
    )
    .await;
    match result {
        Ok((record, vmm)) => {
            timings.total = t0.elapsed();
            Ok(StartedClone {
                record,
                vmm,
                vm_paths,
                timings,
                meta,
            })
        }
        Err(e) => {
            if let Ok(r) = state.update(&id, |r| r.status = VmStatus::Stopping) {
                for f in crate::cleanup::run_all(&r.cleanup) {
                    tracing::warn!("{f}");
                }
            }
            let _ = state.remove(&id);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn restore(
    state: &Store,
    record: &VmRecord,
    meta: &SnapshotMeta,
    snap_dir: &std::path::Path,
    vm_paths: &VmPaths,
    binary: &std::path::Path,
    req: &CloneRequest,
    timings: &mut CloneTimings,
) -> Result<(VmRecord, SpawnedVmm), CloneError> {
    let step = Instant::now();
    if let (Some(ns), Some(tap)) = (&record.netns, &meta.tap) {
        network::create_netns(ns, Some(tap))?;
    }
    timings.netns = step.elapsed();

    let step = Instant::now();
    std::fs::create_dir_all(vm_paths.dir()).map_err(|source| CloneError::Disk {
        path: vm_paths.dir().to_owned(),
        source,
    })?;
    let mut patches = Vec::new();
    for d in &meta.drives {
        // A drive the original had inside its runtime dir is expected at the same place
        // in ours (the vmstate names the view path); others get a file of their own and
        // are retargeted by PATCH after the load.
        let file = match std::path::Path::new(&d.path_on_host).strip_prefix(VMM_VIEW_DIR) {
            Ok(rel) => rel.to_owned(),
            Err(_) => PathBuf::from(&d.file),
        };
        let src = snap_dir.join(&d.file);
        storage::clone_file(&src, &vm_paths.dir().join(&file))
            .map_err(|source| CloneError::Disk { path: src, source })?;
        patches.push(PartialDrive {
            drive_id: d.drive_id.clone(),
            path_on_host: Some(
                std::path::Path::new(VMM_VIEW_DIR)
                    .join(&file)
                    .display()
                    .to_string(),
            ),
            ..Default::default()
        });
    }
    timings.disks = step.elapsed();

    let step = Instant::now();
    let vmm = spawn_vmm_with(
        &SpawnOptions {
            binary: binary.to_owned(),
            id: record.id.clone(),
            vm_paths: vm_paths.clone(),
            netns: record.netns.clone(),
            die_with_parent: !req.detach,
        },
        SpawnExtras { ksm: req.ksm },
    )
    .await?;
    timings.spawn = step.elapsed();
    let process = vmm.process;
    let record = state.update(&record.id, |r| {
        r.vmm = Some(process);
        r.cleanup.insert(0, CleanupStep::KillProcess { process });
    })?;
    let api = |step: &'static str| {
        let log = vm_paths.firecracker_log();
        move |source| CloneError::Api { step, source, log }
    };

    let step = Instant::now();
    let mem_backend = match &req.memory {
        MemorySource::File => MemBackend {
            backend_type: MemBackendType::File,
            backend_path: snap_dir.join(MEMORY_FILE).display().to_string(),
        },
        MemorySource::Uffd { socket, .. } => MemBackend {
            backend_type: MemBackendType::Uffd,
            backend_path: socket.display().to_string(),
        },
    };
    vmm.client
        .load_snapshot(&SnapshotLoadParams {
            snapshot_path: snap_dir.join(VMSTATE_FILE).display().to_string(),
            mem_backend,
            track_dirty_pages: req.track_dirty_pages.then_some(true),
            // Load paused only when drives must be repointed first; otherwise one call.
            resume_vm: Some(patches.is_empty()),
        })
        .await
        .map_err(api("loading the snapshot"))?;
    timings.load = step.elapsed();

    let step = Instant::now();
    for p in &patches {
        vmm.client
            .patch_drive(p)
            .await
            .map_err(api("pointing a drive at the clone's copy"))?;
    }
    timings.patch = step.elapsed();

    let step = Instant::now();
    if !patches.is_empty() {
        vmm.client
            .resume()
            .await
            .map_err(api("resuming the clone"))?;
    }
    timings.resume = step.elapsed();
    let record = if req.detach {
        state.update(&record.id, |r| {
            r.status = VmStatus::Running;
            r.owner = process;
        })?
    } else {
        state.update(&record.id, |r| r.status = VmStatus::Running)?
    };
    Ok((record, vmm))
}

/// Stop a clone's VM, run its cleanup and keep its record as Failed with `reason`, so the
/// failure stays visible in `fcvm ls` until `fcvm stop`.
pub fn fail_clone(state: &Store, id: &str, reason: &str) {
    let Ok(record) = state.update(id, |r| {
        r.status = VmStatus::Failed;
        r.error = Some(reason.to_owned());
    }) else {
        return;
    };
    for f in crate::cleanup::run_all(&record.cleanup) {
        tracing::warn!("{f}");
    }
    let _ = state.update(id, |r| r.cleanup.clear());
}

/// Undo a clone completely and forget it (normal end).
pub fn teardown_clone(state: &Store, id: &str) {
    let Ok(record) = state.update(id, |r| {
        if r.status != VmStatus::Failed {
            r.status = VmStatus::Stopping
        }
    }) else {
        return;
    };
    if record.status == VmStatus::Failed {
        return;
    }
    let failures = crate::cleanup::run_all(&record.cleanup);
    for f in &failures {
        tracing::warn!("{f}");
    }
    if failures.is_empty() {
        let _ = state.remove(id);
    }
}
