//! Starting a clone: a fresh Firecracker restored from a published snapshot.
//!
//! Per clone, in order (each step timed, see [`CloneTimings`]):
//! 1. a state record (kind `clone`, naming the snapshot and the page server it depends on);
//! 2. its own network namespace `fcvm-<id>` with the same TAP name as the original, when the
//!    original had one (Firecracker 1.12 cannot retarget TAPs on load); a clone of a bridged
//!    VM gets a bridged network of its own there, the guest keeping its address (see
//!    [`CloneNetwork`]);
//! 3. reflinked copies of the snapshot's disks into its runtime dir;
//! 4. the VMM, in a private mount namespace where the runtime dir is [`VMM_VIEW_DIR`], so
//!    every path recorded in the vmstate resolves to *this* clone's files;
//! 5. `PUT /snapshot/load` without resuming (File backend: the memory file, mapped
//!    privately; Uffd: the page server's socket), with dirty tracking on so the clone can
//!    itself be diff-snapshotted against this snapshot;
//! 6. `PATCH /drives/<id>` to the clone's own copies, then resume.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::firecracker::binary::{self, BinaryError, Program};
use crate::names::{Name, NameError};
use crate::network::NetworkAttachment;
use crate::paths::{Paths, VMM_VIEW_DIR};
use crate::process::ProcessRef;
use crate::state::{Store, StoreError as StateError, VmKind, VmRecord};
use crate::vm::{
    self, launch, DriveSpec, Host, LaunchError, Launcher, Lifetime, Resources, VmHandle, VmSpec,
};

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
    /// Its network.
    pub network: CloneNetwork,
}

/// The network of a clone. The restored guest's `eth0` keeps what the snapshot's source
/// configured (its address, gateway, name servers, the neighbour entry of its gateway), so
/// every clone's TAP is the source's (name and MAC) in a namespace of the clone's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CloneNetwork {
    /// As the source had it: a bridged VM's clone is bridged (with no published ports),
    /// any other gets the TAP alone.
    #[default]
    Inherit,
    /// The TAP alone in the clone's namespace: nothing reaches the guest, nor leaves it.
    None,
    /// Bridged (the source must have been): its own veth, pool slot, NAT and ports.
    Bridged {
        /// Published ports (checked by the caller; a port another VM publishes is refused
        /// at launch, under the store lock).
        publish: Vec<crate::network::bridged::PortMapping>,
    },
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
    /// `PUT /snapshot/load` and the drive patches.
    pub load: Duration,
    /// Drive patches (included in `load`; kept for the benchmark's columns).
    pub patch: Duration,
    /// `PATCH /vm Resumed`.
    pub resume: Duration,
    /// Everything.
    pub total: Duration,
}

/// A running clone.
#[derive(Debug)]
pub struct StartedClone {
    /// Its owner.
    pub handle: VmHandle,
    /// Step timings.
    pub timings: CloneTimings,
    /// The snapshot's metadata.
    pub meta: SnapshotMeta,
}

impl StartedClone {
    /// Its record as last written.
    pub fn record(&self) -> &VmRecord {
        self.handle.record()
    }
}

/// Why a clone did not start. Everything created for it has been removed again.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// Bad name.
    #[error("invalid --name")]
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
    /// The launch failed.
    #[error(transparent)]
    Launch(Box<LaunchError>),
    /// `--network bridged` for a clone of a VM that was not bridged.
    #[error("--network bridged: snapshot {0} is of a VM without --network bridged, whose guest has no address to keep; run its clones without --network bridged")]
    NotBridged(String),
    /// A clone of a VM without a network device cannot get one.
    #[error(
        "--network: snapshot {0} is of a VM without a network device; its clones have none either"
    )]
    NoDevice(String),
}

impl From<LaunchError> for CloneError {
    fn from(e: LaunchError) -> CloneError {
        CloneError::Launch(Box::new(e))
    }
}

/// The spec of a clone of `meta` (in `snap_dir`).
pub fn clone_spec(
    paths: &Paths,
    req: &CloneRequest,
    meta: &SnapshotMeta,
    snap_dir: &Path,
    launcher: Launcher,
) -> Result<VmSpec, CloneError> {
    let memory = match &req.memory {
        MemorySource::File => vm::MemorySource::File(snap_dir.join(MEMORY_FILE)),
        MemorySource::Uffd { socket, server } => vm::MemorySource::Uffd {
            socket: socket.clone(),
            server: *server,
        },
    };
    // The name needs the id, which the spec makes: build with a placeholder first.
    let mut spec = VmSpec::new(
        paths,
        Name::parse(req.name.as_deref().unwrap_or(&req.tag))?,
        VmKind::Clone,
        Resources {
            vcpus: meta.vcpus,
            mem_mib: meta.mem_mib,
            track_dirty_pages: req.track_dirty_pages,
        },
        vm::Source::Snapshot {
            vmstate: snap_dir.join(VMSTATE_FILE),
            memory,
        },
        launcher,
    );
    if req.name.is_none() {
        spec.name = Name::parse(&format!("{}-{}", req.tag, &spec.id[..6]))?;
    }
    spec.guest = meta.guest;
    spec.ksm = req.ksm;
    spec.lifetime = if req.detach {
        Lifetime::Detached
    } else {
        Lifetime::Foreground
    };
    spec.labels.kernel = meta.kernel.clone();
    spec.labels.snapshot = Some(req.tag.clone());
    spec.network = clone_network(&spec.id, &req.network, meta)?;
    spec.drives = meta
        .drives
        .iter()
        .map(|d| {
            // A drive the original had inside its runtime dir is expected at the same
            // place in ours (the vmstate names the view path); others get a file of their
            // own. Both are repointed by PATCH after the load.
            let copy_to = match Path::new(&d.path_on_host).strip_prefix(VMM_VIEW_DIR) {
                Ok(rel) => rel.to_owned(),
                Err(_) => PathBuf::from(&d.file),
            };
            DriveSpec {
                id: d.drive_id.clone(),
                file: snap_dir.join(&d.file),
                copy_to: Some(copy_to),
                root: false,
                read_only: false,
            }
        })
        .collect();
    Ok(spec)
}

/// The attachment of clone `id` of `meta`'s source. A bridged one takes pool slot 0 here:
/// launch assigns a free one under the store lock.
fn clone_network(
    id: &str,
    wanted: &CloneNetwork,
    meta: &SnapshotMeta,
) -> Result<NetworkAttachment, CloneError> {
    use crate::network::bridged::BridgedNet;
    let Some(tap) = &meta.tap else {
        return match wanted {
            CloneNetwork::Bridged { .. } => Err(CloneError::NotBridged(meta.tag.clone())),
            _ => Ok(NetworkAttachment::None),
        };
    };
    Ok(match (wanted, &meta.bridged) {
        (CloneNetwork::Inherit, Some(b)) => {
            NetworkAttachment::Bridged(BridgedNet::clone_of(id, 0, b, Vec::new()))
        }
        (CloneNetwork::Bridged { publish }, Some(b)) => {
            NetworkAttachment::Bridged(BridgedNet::clone_of(id, 0, b, publish.clone()))
        }
        (CloneNetwork::Bridged { .. }, None) => {
            return Err(CloneError::NotBridged(meta.tag.clone()))
        }
        (CloneNetwork::Inherit | CloneNetwork::None, _) => NetworkAttachment::namespaced(id, tap),
    })
}

/// Start one clone. On error, everything made for it is undone and its record removed.
pub async fn start_clone(paths: &Paths, req: &CloneRequest) -> Result<StartedClone, CloneError> {
    let t0 = Instant::now();
    let snapshots = SnapshotStore::open(paths)?;
    let meta = snapshots.get(&req.tag)?;
    let snap_dir = snapshots.path(&req.tag);
    let firecracker = binary::find(Program::Firecracker, paths)?;
    let launcher = Launcher::for_host(paths, firecracker.path).map_err(LaunchError::from)?;
    let spec = clone_spec(paths, req, &meta, &snap_dir, launcher)?;
    let host = Host::new(Store::open(paths)?);
    let mut handle = launch(&host, spec).await?;
    handle.start().await?;
    let t = handle.timings;
    let timings = CloneTimings {
        record: t.record,
        netns: t.network,
        disks: t.files,
        spawn: t.spawn,
        load: t.configure,
        patch: Duration::ZERO,
        resume: t.start,
        total: t0.elapsed(),
    };
    Ok(StartedClone {
        handle,
        timings,
        meta,
    })
}
