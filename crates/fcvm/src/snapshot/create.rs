//! `fcvm snapshot create`: pause, snapshot, copy disks, resume, publish atomically.
//!
//! Order and why:
//! 1. Lock `snapshots/.lock`, sweep staging dirs of dead creators, refuse a taken tag.
//! 2. Read the VM's configuration (drives, boot args) while it runs.
//! 3. Start the [resume guard](super::guard) *before* pausing, so a killed create never
//!    leaves the source paused.
//! 4. Mark the VM's record: its dirty-page log is about to be reset, so until this snapshot
//!    is published there is no valid Diff parent.
//! 5. Pause, `PUT /snapshot/create` into the staging dir, reflink the disks (the VM is
//!    paused, so they are consistent with memory), resume, dismiss the guard.
//! 6. Diff only, after resuming: reflink the parent's `memory.bin` (or make an all-zero
//!    sparse file when the VM never snapshotted: its dirty log then covers everything since
//!    boot), write the diff's data extents over it, fsync. Every snapshot thus ends with a
//!    complete memory file: no chains to keep.
//! 7. Write `snapshot.json`, fsync everything, rename into place, fsync `snapshots/`.
//!
//! A failure or kill at any point leaves at most a hidden staging dir (removed on drop, or
//! by the next sweep), never a listed snapshot. `FCVM_FAULT=<point>` SIGKILLs fcvm at a
//! named point, for tests: `snapshot:after-pause`, `snapshot:after-memory`,
//! `snapshot:after-resume`, `snapshot:before-publish`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::firecracker::models::{SnapshotCreateParams, SnapshotType};
use crate::firecracker::{FirecrackerClient, TransportError};
use crate::paths::{Paths, VMM_VIEW_DIR};
use crate::state::{now_ms, Store, StoreError as StateError, VmKind, VmRecord};
use crate::storage::{self, CopyMethod};

use super::guard::ResumeGuard;
use super::meta::{
    SnapshotDrive, SnapshotKind, SnapshotMeta, DISK_PREFIX, FORMAT_VERSION, MEMORY_FILE, META_FILE,
    VMSTATE_FILE,
};
use super::store::{write_synced, SnapshotStore, StoreError};

/// Environment variable naming a fault-injection point.
pub const FAULT_ENV: &str = "FCVM_FAULT";

/// Kill ourselves (SIGKILL, no cleanup at all) if `FCVM_FAULT` names `point`.
pub fn fault_point(point: &str) {
    if std::env::var(FAULT_ENV).is_ok_and(|v| v == point) {
        eprintln!("fcvm: FCVM_FAULT={point}: killing myself");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// What to snapshot.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// VM name.
    pub vm: String,
    /// Snapshot tag.
    pub tag: String,
    /// Diff instead of Full.
    pub diff: bool,
    /// More files (name, content) written into the snapshot directory before it is
    /// published (the image cache's `cache.json`).
    pub extra_files: Vec<(String, Vec<u8>)>,
}

/// What was made.
#[derive(Debug, Clone)]
pub struct CreateOutcome {
    /// Its metadata.
    pub meta: SnapshotMeta,
    /// Its directory.
    pub path: PathBuf,
    /// How long the source VM was paused.
    pub paused_for: Duration,
    /// Warnings worth printing (implausible diff size, slow disk copy).
    pub warnings: Vec<String>,
}

/// Why a snapshot could not be made. The source VM is running again in every case.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// VM lookup failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Snapshot store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Not a VM that can be snapshotted.
    #[error("{0}")]
    NotSnapshottable(String),
    /// Diff impossible.
    #[error("cannot take a Diff snapshot of {vm}: {why}")]
    NoDiff {
        /// The VM.
        vm: String,
        /// Why.
        why: String,
    },
    /// The API failed.
    #[error("{step} (Firecracker log: {log})")]
    Api {
        /// What was being done.
        step: &'static str,
        /// Cause.
        source: Box<TransportError>,
        /// Log path.
        log: PathBuf,
    },
    /// Local file trouble (disk copies, diff merge, metadata).
    #[error("{step} ({path})")]
    Io {
        /// What was being done.
        step: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The guard could not start: we refuse to pause without it.
    #[error("cannot start the resume guard (refusing to pause the VM without one): {0}")]
    Guard(std::io::Error),
}

impl CreateError {
    /// Whether the snapshot failed for lack of space (ENOSPC or EDQUOT): an I/O error of
    /// fcvm's own anywhere in the chain, or Firecracker's report of one (which arrives as
    /// text in its API reply).
    pub fn out_of_space(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                    return true;
                }
            }
            cur = e.source();
        }
        if !matches!(self, CreateError::Api { .. }) {
            return false;
        }
        let text = crate::report::chain(self);
        text.contains("No space left on device") || text.contains("Disk quota exceeded")
    }
}

fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CreateError {
    let path = path.to_owned();
    move |source| CreateError::Io { step, path, source }
}

/// Where the VMM writes a snapshot's files: the staging paths themselves, or for a jailed
/// VMM (which sees only its runtime dir) `snap/` in its runtime dir, moved to the staging
/// paths once written. Either way they end up root's, mode 0600 (guest memory is secret).
struct VmmOutput {
    /// (host path the VMM writes, its path as the VMM sees it, final path)
    files: Vec<(PathBuf, String, PathBuf)>,
}

impl VmmOutput {
    fn new(record: &VmRecord, finals: &[&Path]) -> Result<VmmOutput, CreateError> {
        let Some(jail) = &record.jail else {
            return Ok(VmmOutput {
                files: finals
                    .iter()
                    .map(|f| (f.to_path_buf(), f.display().to_string(), f.to_path_buf()))
                    .collect(),
            });
        };
        let dir = record.runtime_dir.join("snap");
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        crate::vm::jail::private_to(&dir, jail.uid)
            .and_then(|()| {
                std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .map_err(|e| crate::vm::jail::JailError::Io {
                        action: "chmod",
                        path: dir.clone(),
                        source: e,
                    })
            })
            .map_err(|e| CreateError::Io {
                step: "preparing",
                path: dir.clone(),
                source: std::io::Error::other(crate::report::chain(&e)),
            })?;
        let files = finals
            .iter()
            .map(|f| {
                let name = f.file_name().expect("snapshot files have names");
                let host = dir.join(name);
                let _ = std::fs::remove_file(&host);
                let vmm = format!("{VMM_VIEW_DIR}/snap/{}", name.to_string_lossy());
                (host, vmm, f.to_path_buf())
            })
            .collect();
        Ok(VmmOutput { files })
    }

    /// Remove what a jailed VMM left in its runtime dir (a partial file after a failure
    /// would hold space there until the VM stops).
    fn discard(&self) {
        for (host, _, dst) in &self.files {
            if host != dst {
                let _ = std::fs::remove_file(host);
            }
        }
    }

    fn vmm_path(&self, i: usize) -> String {
        self.files[i].1.clone()
    }

    /// Move what the VMM wrote to its final place, root's and 0600.
    fn collect(&self) -> Result<(), CreateError> {
        for (host, _, dst) in &self.files {
            if host != dst {
                move_file(host, dst)?;
            }
            let me = nix::unistd::geteuid().as_raw();
            std::os::unix::fs::chown(dst, Some(me), Some(me)).map_err(io("chown", dst))?;
            crate::fsutil::set_mode(dst, 0o600).map_err(io("chmod", dst))?;
        }
        Ok(())
    }
}

/// Move a file the jailed VMM wrote to its place in the staging dir: a rename, or where the
/// store is on another filesystem than the VM's runtime dir (e.g. `image-cache/` mounted
/// from a disk of its own) a copy, then the original removed. The copy can run out of
/// space; a partial copy is removed with the staging dir.
fn move_file(host: &Path, dst: &Path) -> Result<(), CreateError> {
    match std::fs::rename(host, dst) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            storage::clone_file(host, dst).map_err(io("copying", host))?;
            std::fs::remove_file(host).map_err(io("removing", host))
        }
        r => r.map_err(io("moving", host)),
    }
}

/// The host path of a file the VMM names by its view path (see [`VMM_VIEW_DIR`]).
pub fn host_path(record: &VmRecord, vmm_path: &str) -> PathBuf {
    match Path::new(vmm_path).strip_prefix(VMM_VIEW_DIR) {
        Ok(rel) => record.runtime_dir.join(rel),
        Err(_) => PathBuf::from(vmm_path),
    }
}

/// Take a snapshot of a running VM into `snapshots/`.
pub async fn create(paths: &Paths, req: &CreateRequest) -> Result<CreateOutcome, CreateError> {
    let record = Store::open(paths)?.find_by_name(&req.vm)?;
    if let Some(why) = container_refusal(&record, req.diff) {
        return Err(CreateError::NotSnapshottable(format!(
            "cannot snapshot container VM {}: {why}",
            req.vm
        )));
    }
    create_in(paths, &SnapshotStore::open(paths)?, req).await
}

/// Why a snapshot of container VM `record` (for clones) is refused, if it is. What the
/// running container depends on must come back in a clone, and what does not is refused
/// rather than broken: its volumes' FUSE channels are not reconnected after a snapshot, and
/// its terminal and input belong to the original's session. (A bridged VM's clones keep its
/// guest address in namespaces of their own and publish their own ports: see
/// [`crate::network::bridged::BridgedNet::clone_of`].)
pub fn container_refusal(record: &VmRecord, diff: bool) -> Option<String> {
    if !record.runs_container() {
        return None;
    }
    if diff {
        return Some(
            "Diff snapshots of container VMs are not supported (they do not track dirty pages); take a Full snapshot (without --diff)".into(),
        );
    }
    let vm = crate::paths::VmPaths::new(&record.runtime_dir);
    let uds = vm.vsock_socket();
    let listening = |port: u32| fcvm_proto::vsock::host_listener_path(&uds, port).exists();
    let base = fcvm_proto::vsock::VOLUME_PORT_BASE;
    if (base..base + crate::volume::MAX_VOLUMES as u32).any(listening) {
        return Some(
            "it has volumes (--map/-v), whose FUSE connections a snapshot resets and fcvm does not reconnect yet; run it without volumes to clone it".into(),
        );
    }
    if listening(fcvm_proto::vsock::INPUT_PORT) {
        return Some(
            "it runs with -i or -t, and its input and terminal belong to the session that started it; run it without -i/-t to clone it".into(),
        );
    }
    None
}

/// Take a snapshot of a running VM into `snapshots` (the named snapshots, or the image
/// cache's store).
pub async fn create_in(
    paths: &Paths,
    snapshots: &SnapshotStore,
    req: &CreateRequest,
) -> Result<CreateOutcome, CreateError> {
    let state = Store::open(paths)?;
    let record = state.find_by_name(&req.vm)?;
    if record.kind == VmKind::PageServer || !record.is_live() {
        return Err(CreateError::NotSnapshottable(format!(
            "{} is not a running VM",
            req.vm
        )));
    }
    let api = record
        .api_socket
        .clone()
        .ok_or_else(|| CreateError::NotSnapshottable(format!("{} has no API socket", req.vm)))?;
    let log = record.runtime_dir.join("firecracker.log");
    let api_err = |step: &'static str| {
        let log = log.clone();
        move |source| CreateError::Api {
            step,
            source: Box::new(source),
            log,
        }
    };
    let client = FirecrackerClient::new(&api);

    let _lock = snapshots.lock()?;
    snapshots.sweep_stale_staging()?;
    snapshots.sweep_removals()?;
    if snapshots.exists(&req.tag) {
        return Err(StoreError::Exists(req.tag.clone()).into());
    }

    let config = client
        .vm_config()
        .await
        .map_err(api_err("reading the VM configuration"))?;
    let version = client.version().await.ok().map(|v| v.firecracker_version);
    let machine = config.machine_config.clone();
    let mem_mib = machine.as_ref().map_or(record.mem_mib, |m| m.mem_size_mib);
    let vcpus = machine.as_ref().map_or(record.vcpus, |m| m.vcpu_count);
    let mem_bytes = u64::from(mem_mib) << 20;

    let parent = if req.diff {
        let tracks = machine.as_ref().is_some_and(|m| m.track_dirty_pages);
        // Firecracker reports a restored VM's tracking (enabled at load) as off, so the
        // record is what tells.
        if !tracks && !record.track_dirty_pages {
            let how = if record.kind == VmKind::Clone {
                "fcvm snapshot run --track-dirty-pages"
            } else {
                "fcvm run --track-dirty-pages"
            };
            return Err(CreateError::NoDiff {
                vm: req.vm.clone(),
                why: format!("it does not track dirty pages (start it with `{how}`)"),
            });
        }
        match &record.diff_parent {
            Some(p) => {
                let meta = snapshots.get(p).map_err(|e| CreateError::NoDiff {
                    vm: req.vm.clone(),
                    why: format!(
                        "its parent snapshot {p} is gone ({}); take a Full snapshot",
                        crate::report::chain(&e)
                    ),
                })?;
                if meta.memory_bytes != mem_bytes {
                    return Err(CreateError::NoDiff {
                        vm: req.vm.clone(),
                        why: format!("parent {p} has a different memory size"),
                    });
                }
                Some(p.clone())
            }
            None if record.snapshot_attempted => {
                return Err(CreateError::NoDiff {
                    vm: req.vm.clone(),
                    why: "an earlier snapshot attempt did not complete, so no published snapshot matches its dirty-page log; take a Full snapshot".into(),
                })
            }
            None => None,
        }
    } else {
        None
    };

    let staging = snapshots.stage(&req.tag)?;
    let dir = staging.dir().to_owned();
    let vmstate = dir.join(VMSTATE_FILE);
    let memory = dir.join(MEMORY_FILE);
    let diff_file = dir.join("memory.diff");

    let guard = ResumeGuard::start(&api).map_err(CreateError::Guard)?;
    state.update(&record.id, |r| {
        r.snapshot_attempted = true;
        r.diff_parent = None;
    })?;

    // A jailed VMM writes inside its chroot (its runtime dir); the files move here after.
    let mem_target = if req.diff { &diff_file } else { &memory };
    let written = VmmOutput::new(&record, &[&vmstate, mem_target])?;
    let paused_at = Instant::now();
    let paused = async {
        client.pause().await.map_err(api_err("pausing the VM"))?;
        fault_point("snapshot:after-pause");
        client
            .create_snapshot(&SnapshotCreateParams {
                mem_file_path: written.vmm_path(1),
                snapshot_path: written.vmm_path(0),
                snapshot_type: Some(if req.diff {
                    SnapshotType::Diff
                } else {
                    SnapshotType::Full
                }),
            })
            .await
            .map_err(api_err("writing the snapshot"))?;
        written.collect()?;
        fault_point("snapshot:after-memory");
        copy_disks(&record, &config.drives, &dir)
    }
    .await;
    if paused.is_err() {
        written.discard();
    }
    let resumed = client.resume().await.map_err(api_err("resuming the VM"));
    let paused_for = paused_at.elapsed();
    if resumed.is_ok() {
        guard.done();
    } else {
        drop(guard); // it retries the resume
    }
    let (drives, mut warnings) = paused?;
    resumed?;
    fault_point("snapshot:after-resume");

    let mut diff_dirty_bytes = None;
    if req.diff {
        let dirty = merge_diff(snapshots, parent.as_deref(), &diff_file, &memory, mem_bytes)?;
        diff_dirty_bytes = Some(dirty);
        if let Some(w) = diff_warning(dirty, mem_bytes) {
            warnings.push(w);
        }
    }

    let mem_meta = std::fs::metadata(&memory).map_err(io("reading", &memory))?;
    let meta = SnapshotMeta {
        format_version: FORMAT_VERSION,
        tag: req.tag.clone(),
        created_at_ms: now_ms(),
        source_vm: record.name.to_string(),
        source_vm_id: record.id.clone(),
        source_kind: record.kind,
        guest: record.guest,
        kind: if req.diff {
            SnapshotKind::Diff
        } else {
            SnapshotKind::Full
        },
        parent: parent.clone().or_else(|| {
            (record.kind == VmKind::Clone)
                .then(|| record.snapshot.clone())
                .flatten()
        }),
        vcpus,
        mem_mib,
        kernel: config
            .boot_source
            .as_ref()
            .map(|b| PathBuf::from(&b.kernel_image_path))
            .or(record.kernel.clone()),
        boot_args: config
            .boot_source
            .as_ref()
            .and_then(|b| b.boot_args.clone()),
        drives,
        tap: record.network.tap().map(str::to_owned),
        bridged: match &record.network {
            crate::network::NetworkAttachment::Bridged(b) => Some(b.clone()),
            _ => None,
        },
        memory_bytes: mem_meta.len(),
        memory_allocated_bytes: mem_meta.blocks() * 512,
        diff_dirty_bytes,
        fcvm_version: env!("CARGO_PKG_VERSION").to_owned(),
        firecracker_version: version,
    };
    let meta_path = dir.join(META_FILE);
    write_synced(
        &meta_path,
        &serde_json::to_vec_pretty(&meta).expect("serialises"),
    )
    .map_err(io("writing", &meta_path))?;
    for (name, bytes) in &req.extra_files {
        let path = dir.join(name);
        write_synced(&path, bytes).map_err(io("writing", &path))?;
    }
    fault_point("snapshot:before-publish");
    let path = snapshots.publish(staging, &req.tag)?;
    state.update(&record.id, |r| r.diff_parent = Some(req.tag.clone()))?;
    Ok(CreateOutcome {
        meta,
        path,
        paused_for,
        warnings,
    })
}

/// Reflink every drive into the staging dir (the VM is paused).
fn copy_disks(
    record: &VmRecord,
    drives: &[serde_json::Value],
    dir: &Path,
) -> Result<(Vec<SnapshotDrive>, Vec<String>), CreateError> {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for d in drives {
        let (Some(id), Some(path)) = (d["drive_id"].as_str(), d["path_on_host"].as_str()) else {
            continue;
        };
        let file = format!("{DISK_PREFIX}{id}.img");
        let src = host_path(record, path);
        let dst = dir.join(&file);
        let started = Instant::now();
        let method = storage::clone_file(&src, &dst).map_err(io("copying disk", &src))?;
        if method == CopyMethod::SparseCopy {
            warnings.push(format!(
                "disk {id} was copied, not reflinked ({} ms with the VM paused; it grows with the disk's data): run `fcvm setup storage` for a filesystem with reflinks",
                started.elapsed().as_millis()
            ));
        }
        out.push(SnapshotDrive {
            drive_id: id.to_owned(),
            path_on_host: path.to_owned(),
            file,
            is_root_device: d["is_root_device"].as_bool().unwrap_or(false),
            is_read_only: d["is_read_only"].as_bool().unwrap_or(false),
        });
    }
    Ok((out, warnings))
}

/// Build the complete `memory` from the parent (or zeros) plus the diff's data extents.
/// Returns the number of dirty bytes merged.
fn merge_diff(
    snapshots: &SnapshotStore,
    parent: Option<&str>,
    diff: &Path,
    memory: &Path,
    mem_bytes: u64,
) -> Result<u64, CreateError> {
    match parent {
        Some(p) => {
            let base = snapshots.path(p).join(MEMORY_FILE);
            storage::clone_file(&base, memory).map_err(io("copying the parent memory", &base))?;
        }
        None => {
            let f = File::create(memory).map_err(io("creating", memory))?;
            f.set_len(mem_bytes).map_err(io("sizing", memory))?;
        }
    }
    let src = File::open(diff).map_err(io("opening", diff))?;
    let len = src.metadata().map_err(io("reading", diff))?.len();
    let dst = OpenOptions::new()
        .write(true)
        .open(memory)
        .map_err(io("opening", memory))?;
    let extents = storage::data_extents(&src, len).map_err(io("walking", diff))?;
    let dirty: u64 = extents.iter().map(|(a, b)| b - a).sum();
    storage::copy_data_extents(&src, &dst, len).map_err(io("merging the diff into", memory))?;
    dst.sync_all().map_err(io("fsync", memory))?;
    drop(src);
    std::fs::remove_file(diff).map_err(io("removing", diff))?;
    Ok(dirty)
}

/// A warning when a diff's size looks wrong (see the dirty-tracking notes in the module
/// docs of `snapshot`): too small means dirty tracking may have lost pages.
pub fn diff_warning(dirty: u64, mem_bytes: u64) -> Option<String> {
    if mem_bytes == 0 {
        return None;
    }
    let frac = dirty as f64 / mem_bytes as f64;
    if dirty > 0 && frac < 0.001 {
        Some(format!(
            "the diff holds only {} KiB of {} MiB ({:.3}%): unusually small; if the guest was busy, dirty-page tracking may have lost writes (a known KVM quirk): verify the snapshot or take a Full one",
            dirty >> 10,
            mem_bytes >> 20,
            frac * 100.0
        ))
    } else if frac > 0.9 {
        Some(format!(
            "the diff holds {} of {} MiB ({:.0}%): nearly the whole memory; a Full snapshot would cost the same (UFFD-restored clones report every served page dirty)",
            dirty >> 20,
            mem_bytes >> 20,
            frac * 100.0
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;
    use crate::names::Name;
    use crate::state::GuestKind;

    fn container(dir: &Path) -> VmRecord {
        let mut r = VmRecord::new(
            "id".into(),
            Name::parse("web").unwrap(),
            VmKind::Container,
            dir.to_owned(),
        );
        r.guest = GuestKind::Agent;
        r
    }

    fn listener(dir: &Path, port: u32) {
        std::fs::write(dir.join(format!("v.sock_{port}")), b"").unwrap();
    }

    #[test]
    fn container_snapshots_refuse_what_clones_cannot_have_and_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let r = container(dir.path());
        assert_eq!(container_refusal(&r, false), None);
        assert!(container_refusal(&r, true)
            .unwrap()
            .contains("Diff snapshots of container VMs"));
        // Raw VMs are not concerned.
        let mut raw = r.clone();
        raw.kind = VmKind::Raw;
        raw.guest = GuestKind::Unknown;
        assert_eq!(container_refusal(&raw, true), None);

        let mut bridged = r.clone();
        bridged.network = crate::network::NetworkAttachment::Bridged(
            crate::network::bridged::BridgedNet::new("id", 1, "tap0", Vec::new(), Vec::new()),
        );
        // Clones of a bridged VM get a network of their own.
        assert_eq!(container_refusal(&bridged, false), None);

        listener(dir.path(), fcvm_proto::vsock::STATUS_PORT);
        listener(dir.path(), fcvm_proto::vsock::OUTPUT_PORT);
        assert_eq!(container_refusal(&r, false), None);
        listener(dir.path(), fcvm_proto::vsock::INPUT_PORT);
        assert!(container_refusal(&r, false).unwrap().contains("-i or -t"));
        listener(dir.path(), fcvm_proto::vsock::VOLUME_PORT_BASE + 2);
        assert!(container_refusal(&r, false).unwrap().contains("volumes"));

        // A clone of a container snapshot is a container VM too.
        let mut clone = container(tempfile::tempdir().unwrap().path());
        clone.kind = VmKind::Clone;
        assert!(container_refusal(&clone, true).is_some());
    }
}

#[cfg(test)]
mod space_tests {
    use super::*;
    use crate::firecracker::TransportError;

    fn refused(message: &str) -> CreateError {
        CreateError::Api {
            step: "writing the snapshot",
            source: Box::new(TransportError::Refused {
                method: hyper::Method::PUT,
                uri: "/snapshot/create".into(),
                status: hyper::StatusCode::BAD_REQUEST,
                message: message.into(),
            }),
            log: "/x/firecracker.log".into(),
        }
    }

    #[test]
    fn lack_of_space_is_told_apart_wherever_it_was_met() {
        let io_err = |errno| CreateError::Io {
            step: "copying",
            path: "/x/memory.bin".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert!(io_err(libc::ENOSPC).out_of_space());
        assert!(io_err(libc::EDQUOT).out_of_space());
        assert!(!io_err(libc::EIO).out_of_space());
        // Nested in the store's path errors.
        let store = CreateError::Store(StoreError::Io(crate::fsutil::io_at(
            "write",
            Path::new("/x"),
        )(
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        )));
        assert!(store.out_of_space());
        // Firecracker's own write failure arrives as text.
        assert!(refused(
            "Cannot create snapshot: Memory snapshot error: Cannot write memory file: No space left on device (os error 28)"
        )
        .out_of_space());
        assert!(
            !refused("The requested operation is not supported in state Running").out_of_space()
        );
        // Text alone counts only for Firecracker's replies.
        assert!(!CreateError::NotSnapshottable("No space left on device".into()).out_of_space());
    }
}
