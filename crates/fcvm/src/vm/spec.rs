//! [`VmSpec`]: everything a VM is made of, decided before anything is created.
//!
//! `fcvm run`, `fcvm podman run` and `fcvm snapshot run` each build one and hand it to
//! [`super::launch()`]; none of them creates, spawns or removes anything itself.

use std::path::PathBuf;

use crate::firecracker::models::MmdsVersion;
use crate::names::Name;
use crate::network::NetworkAttachment;
use crate::paths::{Paths, VmPaths};
use crate::process::ProcessRef;
use crate::state::{new_vm_id, GuestKind, VmKind};

/// A VM to launch.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Unique id (runtime directory name, record file name).
    pub id: String,
    /// User-visible name.
    pub name: Name,
    /// What sort of VM.
    pub kind: VmKind,
    /// What runs inside.
    pub guest: GuestKind,
    /// The runtime directory.
    pub paths: VmPaths,
    /// vCPUs, memory, dirty tracking.
    pub resources: Resources,
    /// Boot a kernel, or restore a snapshot.
    pub source: Source,
    /// Block devices, root first.
    pub drives: Vec<DriveSpec>,
    /// Network device.
    pub network: NetworkAttachment,
    /// A hybrid vsock at the runtime directory's `vsock.sock`.
    pub vsock: bool,
    /// Metadata service (needs a network device).
    pub mmds: Option<Mmds>,
    /// How the VMM process is started.
    pub launcher: Launcher,
    /// Whether the VM outlives this process.
    pub lifetime: Lifetime,
    /// Mark the VMM's memory mergeable by KSM.
    pub ksm: bool,
    /// Labels kept in the record for `fcvm ls` and snapshots.
    pub labels: Labels,
    /// The container's log directory: kept beyond the VM, removed with its record.
    pub log_dir: Option<PathBuf>,
}

/// Sizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// vCPUs.
    pub vcpus: u8,
    /// Memory in MiB.
    pub mem_mib: u32,
    /// Track dirty pages (Diff snapshots).
    pub track_dirty_pages: bool,
}

/// Where the guest comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A fresh boot.
    Boot {
        /// Uncompressed ELF kernel.
        kernel: PathBuf,
        /// Initrd.
        initrd: Option<PathBuf>,
        /// Kernel command line.
        cmdline: String,
    },
    /// A restore.
    Snapshot {
        /// The snapshot's `vmstate` file.
        vmstate: PathBuf,
        /// Where guest memory comes from.
        memory: MemorySource,
    },
}

/// Where a restored VM's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemorySource {
    /// Map the snapshot's memory file privately.
    File(PathBuf),
    /// A UFFD page server.
    Uffd {
        /// Its socket.
        socket: PathBuf,
        /// The serving process (recorded: a clone whose server dies is stopped).
        server: ProcessRef,
    },
}

/// One block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveSpec {
    /// Firecracker drive id.
    pub id: String,
    /// The file on the host.
    pub file: PathBuf,
    /// When set, the VM gets a private copy (reflink where possible) at this path inside
    /// its runtime directory, removed with it; otherwise `file` is used in place.
    pub copy_to: Option<PathBuf>,
    /// The boot device (`/dev/vda`).
    pub root: bool,
    /// Read-only to the guest.
    pub read_only: bool,
}

/// MMDS configuration and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Mmds {
    /// Protocol version.
    pub version: MmdsVersion,
    /// The data store's contents.
    pub data: serde_json::Value,
}

/// How the VMM is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    /// Run Firecracker directly (in a private mount namespace, see `paths::VMM_VIEW_DIR`).
    Direct {
        /// The Firecracker binary.
        binary: PathBuf,
    },
    /// Run Firecracker under its jailer (see [`super::jail`]).
    Jailer(super::jail::JailerConfig),
}

impl Launcher {
    /// The default for this process: the jailer as root (unless `--no-jailer` or
    /// `FCVM_NO_JAILER=1`, which warn), Firecracker directly otherwise.
    pub fn for_host(
        paths: &Paths,
        firecracker: PathBuf,
    ) -> Result<Launcher, super::jail::JailError> {
        if super::jail::wanted() {
            Ok(Launcher::Jailer(super::jail::JailerConfig::for_host(
                paths,
                &firecracker,
            )?))
        } else {
            Ok(Launcher::Direct {
                binary: firecracker,
            })
        }
    }

    /// The Firecracker binary.
    pub fn firecracker(&self) -> &std::path::Path {
        match self {
            Launcher::Direct { binary } => binary,
            Launcher::Jailer(cfg) => &cfg.firecracker,
        }
    }
}

/// Whose life the VM's life is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Dies with this fcvm process (PR_SET_PDEATHSIG); torn down when its handle drops.
    Foreground,
    /// Outlives it: once started, the VMM owns the record.
    Detached,
}

/// Record labels with no effect on the VM itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels {
    /// The guest kernel, when not in `source` (clones).
    pub kernel: Option<PathBuf>,
    /// Container image.
    pub image: Option<String>,
    /// The snapshot it was cloned from.
    pub snapshot: Option<String>,
}

impl VmSpec {
    /// A spec with a fresh id and its runtime directory under `paths`; everything else is
    /// the caller's to fill in.
    pub fn new(
        paths: &Paths,
        name: Name,
        kind: VmKind,
        resources: Resources,
        source: Source,
        launcher: Launcher,
    ) -> VmSpec {
        let id = new_vm_id();
        VmSpec {
            paths: VmPaths::new(paths.vm_dir(&id)),
            id,
            name,
            kind,
            guest: GuestKind::Unknown,
            resources,
            source,
            drives: Vec::new(),
            network: NetworkAttachment::None,
            vsock: false,
            mmds: None,
            launcher,
            lifetime: Lifetime::Foreground,
            ksm: false,
            labels: Labels::default(),
            log_dir: None,
        }
    }

    /// The kernel the guest runs, for the record.
    pub fn kernel(&self) -> Option<PathBuf> {
        match &self.source {
            Source::Boot { kernel, .. } => Some(kernel.clone()),
            Source::Snapshot { .. } => self.labels.kernel.clone(),
        }
    }
}
