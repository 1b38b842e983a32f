//! The state record kept for every VM fcvm manages.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cleanup::CleanupStep;
use crate::names::Name;
use crate::network::NetworkAttachment;
use crate::process::ProcessRef;

/// Version of the record layout; bumped when a field changes meaning.
/// 2: `network` replaces `netns` and `tap`; `vmm_kind` and `guest` are enums.
pub const SCHEMA_VERSION: u32 = 2;

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmKind {
    /// No VMM (a page server).
    #[default]
    None,
    /// Firecracker.
    Firecracker,
}

/// What runs inside a VM, as far as fcvm knows: decides what fcvm can do with it
/// (exec needs the agent), and is carried into snapshots and their clones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestKind {
    /// A kernel fcvm knows nothing about.
    #[default]
    Unknown,
    /// The built-in probe guest (serial output only, no agent).
    Probe,
    /// Linux with fc-agent as PID 1 (container VMs).
    Agent,
}

/// What sort of process a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmKind {
    /// A raw kernel booted by `fcvm run`.
    Raw,
    /// A container VM from `fcvm podman run`.
    Container,
    /// A VM restored from a snapshot by `fcvm snapshot run`.
    Clone,
    /// A UFFD memory server from `fcvm snapshot serve` (no VM of its own).
    PageServer,
}

/// Lifecycle of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    /// Being set up; not booted yet.
    Starting,
    /// Guest running.
    Running,
    /// vCPUs paused.
    Paused,
    /// Shutting down.
    Stopping,
    /// A page server that stopped accepting clones and serves its live ones until they end.
    Draining,
    /// Failed; see `error`.
    Failed,
    /// A container VM whose container ended (`exit_code`); the VM is gone, its record and
    /// logs are kept until `fcvm rm` (as podman keeps an exited container).
    Exited,
}

/// Health as last observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// No check applies (a plain VM), or none has run yet.
    #[default]
    Unknown,
    /// A container VM whose container has not started yet, or whose health check has not
    /// passed yet (`--health-check`).
    Starting,
    /// The guest reported the container started (no `--health-check`), or the health check
    /// passed last.
    Healthy,
    /// The health check failed `--health-retries` times in a row.
    Unhealthy,
}

/// One VM (or page server) as recorded on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Layout version.
    pub schema_version: u32,
    /// Unique id, also the runtime directory name.
    pub id: String,
    /// User-visible name, unique among live VMs.
    pub name: Name,
    /// What this is.
    pub kind: VmKind,
    /// Lifecycle state.
    pub status: VmStatus,
    /// Health.
    #[serde(default)]
    pub health: Health,
    /// The process whose life is the VM's life: the foreground fcvm, or Firecracker itself
    /// once detached. When it is gone the record is stale and gets reaped.
    pub owner: ProcessRef,
    /// The VMM process, once spawned.
    #[serde(default)]
    pub vmm: Option<ProcessRef>,
    /// Which VMM runs it.
    #[serde(default)]
    pub vmm_kind: VmmKind,
    /// What runs inside.
    #[serde(default)]
    pub guest: GuestKind,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Runtime directory.
    pub runtime_dir: PathBuf,
    /// Firecracker API socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// Serial console log.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// vCPUs.
    #[serde(default)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default)]
    pub mem_mib: u32,
    /// Kernel image.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Container image, for container VMs.
    #[serde(default)]
    pub image: Option<String>,
    /// Snapshot this VM was cloned from, or that this page server serves.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// How the VM's network device reaches the host (namespace and TAP).
    #[serde(default)]
    pub network: NetworkAttachment,
    /// Page server socket (page servers), or the server a clone depends on.
    #[serde(default)]
    pub uffd_socket: Option<PathBuf>,
    /// The page server a clone's memory comes from.
    #[serde(default)]
    pub page_server: Option<ProcessRef>,
    /// Exit code of the workload, once known.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Why the VM failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Dirty pages are tracked, so Diff snapshots can be taken.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// How to undo what was created for this VM, in order.
    #[serde(default)]
    pub cleanup: Vec<CleanupStep>,
    /// The snapshot whose memory file equals this VM's memory as of the last reset of its
    /// dirty-page log: the parent of its next Diff snapshot. For a clone, the snapshot it
    /// was restored from; after `snapshot create`, that snapshot.
    #[serde(default)]
    pub diff_parent: Option<String>,
    /// Set once a snapshot was attempted: the dirty log no longer covers everything since
    /// boot, so a Diff without a `diff_parent` is impossible.
    #[serde(default)]
    pub snapshot_attempted: bool,
    /// Page servers: clones being served right now.
    #[serde(default)]
    pub served_live: Option<u64>,
    /// Page servers: pages copied into clones so far.
    #[serde(default)]
    pub served_pages: Option<u64>,
    /// The VMM runs under the jailer: its uid, chroot and cgroups.
    #[serde(default)]
    pub jail: Option<crate::vm::jail::JailInfo>,
    /// Container VMs: the directory of the container's log (see [`crate::logs`]). Outside
    /// the runtime dir, so it outlives the VM; removed with the record.
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
}

impl VmRecord {
    /// A new record in `Starting` state owned by the calling process.
    pub fn new(id: String, name: Name, kind: VmKind, runtime_dir: PathBuf) -> VmRecord {
        VmRecord {
            schema_version: SCHEMA_VERSION,
            id,
            name,
            kind,
            status: VmStatus::Starting,
            health: Health::Unknown,
            owner: ProcessRef::current(),
            vmm: None,
            vmm_kind: VmmKind::None,
            guest: GuestKind::Unknown,
            created_at_ms: now_ms(),
            runtime_dir,
            api_socket: None,
            console_log: None,
            vcpus: 0,
            mem_mib: 0,
            kernel: None,
            image: None,
            snapshot: None,
            network: NetworkAttachment::None,
            uffd_socket: None,
            page_server: None,
            exit_code: None,
            error: None,
            track_dirty_pages: false,
            cleanup: Vec::new(),
            jail: None,
            diff_parent: None,
            snapshot_attempted: false,
            served_live: None,
            served_pages: None,
            log_dir: None,
        }
    }

    /// Whether this record keeps other VMs from taking its name: not once it failed, nor
    /// once it is stopping with its VMM gone (only undo steps are left; a concurrent
    /// reaper may be running them). An exited container keeps its name until `fcvm rm`,
    /// as with podman: its logs are found by that name.
    pub fn holds_name(&self) -> bool {
        match self.status {
            VmStatus::Failed => false,
            VmStatus::Exited => true,
            VmStatus::Stopping => self.vmm.is_some_and(|v| v.is_alive()),
            _ => true,
        }
    }

    /// Whether the VM has ended for good and only its record (and logs) are kept.
    pub fn has_ended(&self) -> bool {
        matches!(self.status, VmStatus::Failed | VmStatus::Exited)
    }

    /// Whether a container VM's end is on record: it failed, exited, or its code is in.
    pub fn container_ended(&self) -> bool {
        self.has_ended() || self.exit_code.is_some()
    }

    /// Whether the VM still runs: its end is not on record and its owner is alive (an owner
    /// that died without recording the end leaves a record the next command reaps).
    pub fn is_running(&self) -> bool {
        !self.container_ended() && self.is_live()
    }

    /// Whether a container runs in it (exec, logs, ps, rm apply): a container VM, or a
    /// clone of a snapshot of one.
    pub fn runs_container(&self) -> bool {
        self.kind == VmKind::Container
            || (self.kind == VmKind::Clone && self.guest == GuestKind::Agent)
    }

    /// Whether the owning process still runs.
    pub fn is_live(&self) -> bool {
        self.owner.is_alive()
    }

    /// The pid users see (`fcvm ls --pid`): the owner.
    pub fn pid(&self) -> u32 {
        self.owner.pid
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh random VM id (12 hex digits).
pub fn new_vm_id() -> String {
    let mut bytes = [0u8; 6];
    // getrandom(2) via std's hasher seed is not public; read the kernel's RNG directly.
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        let t = now_ms() ^ u64::from(std::process::id()) << 40;
        bytes.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    hex::encode(bytes)
}
