//! `fcvm run`: boot a raw kernel in a Firecracker microVM, like firectl.

use std::io::Write;
use std::path::PathBuf;

use crate::firecracker::binary::{self, BinaryError, Program};
use crate::names::{Name, NameError};
use crate::network::args::{NetworkRequest, PreparedNetwork};
use crate::network::{self, NetworkAttachment};
use crate::paths::Paths;
use crate::setup::probe::{self, PROBE_KEYWORD};
use crate::state::{GuestKind, Store, StoreError, VmKind, VmRecord};
use crate::vm::config::{validate_sizing, SizingError};
use crate::vm::{
    follow_console, launch, DriveSpec, Event, Host, LaunchError, Launcher, Lifetime, Resources,
    Signals, Source, VmSpec,
};

/// Kernel command line used when the user gives none.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// VM name.
    pub name: String,
    /// Kernel image path, or `probe`.
    pub kernel: String,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Root filesystem image (attached read-write as /dev/vda).
    pub rootfs: Option<PathBuf>,
    /// Kernel command line; the default when unset.
    pub boot_args: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// Enable dirty page tracking (diff snapshots).
    pub track_dirty_pages: bool,
    /// Return once booted, leaving the VM running.
    pub detach: bool,
    /// Its network.
    pub network: RunNetwork,
    /// `--publish` values, unchecked (bridged only).
    pub publish: Vec<String>,
    /// Mark the VMM's memory mergeable by KSM.
    pub ksm: bool,
}

/// `fcvm run --network`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RunNetwork {
    /// No network device.
    #[default]
    None,
    /// An eth0 backed by a TAP ([`network::DEFAULT_TAP`]) in the VM's own network namespace
    /// `fcvm-<id>`, so its snapshots can be cloned with the same TAP name.
    Tap,
    /// As `podman run --network bridged` (see [`crate::network::bridged`]): the guest's
    /// address, gateway and name servers go on the kernel command line (`ip=`), which the
    /// kernel applies itself when it has `CONFIG_IP_PNP`.
    Bridged,
}

/// Why `fcvm run` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad name.
    #[error("invalid --name")]
    Name(#[from] NameError),
    /// Bad sizing.
    #[error(transparent)]
    Sizing(#[from] SizingError),
    /// Bad `--network` or `--publish`.
    #[error(transparent)]
    Network(#[from] crate::network::args::NetworkArgsError),
    /// A file argument is missing.
    #[error("{what} {} does not exist", path.display())]
    MissingFile {
        /// Which argument.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The probe kernel could not be written.
    #[error("cannot write the probe kernel")]
    Probe(#[source] std::io::Error),
    /// Firecracker is unusable.
    #[error(transparent)]
    Binary(#[from] BinaryError),
    /// State store failure (includes name clashes).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VM could not be launched (everything made for it is gone again).
    #[error(transparent)]
    Launch(Box<LaunchError>),
    /// Console I/O failed.
    #[error("cannot copy the console")]
    Console(#[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot handle signals")]
    Signals(#[source] std::io::Error),
}

impl From<LaunchError> for RunError {
    fn from(e: LaunchError) -> Self {
        RunError::Launch(Box::new(e))
    }
}

/// How the VM ended (foreground) or where it runs (detached).
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The record as last written.
    pub record: VmRecord,
    /// The VMM's exit code (foreground only). Firecracker exits 0 when the guest resets.
    pub exit_code: Option<i32>,
    /// The signal to fcvm that ended the run, if any.
    pub interrupted: Option<i32>,
}

/// Resolve `--kernel`: a path, or the built-in probe guest (then also says so).
pub fn resolve_kernel(paths: &Paths, kernel: &str) -> Result<(PathBuf, GuestKind), RunError> {
    if kernel == PROBE_KEYWORD {
        let path = probe::ensure(paths).map_err(RunError::Probe)?;
        return Ok((path, GuestKind::Probe));
    }
    let path = PathBuf::from(kernel);
    if !path.is_file() {
        return Err(RunError::MissingFile {
            what: "kernel",
            path,
        });
    }
    Ok((path, GuestKind::Unknown))
}

fn require_file(what: &'static str, path: &Option<PathBuf>) -> Result<(), RunError> {
    match path {
        Some(p) if !p.is_file() => Err(RunError::MissingFile {
            what,
            path: p.clone(),
        }),
        _ => Ok(()),
    }
}

/// Boot the VM described by `req`. In the foreground, the console is copied to `out` until
/// the VM ends or fcvm gets SIGINT/SIGTERM/SIGHUP.
pub async fn run(
    paths: &Paths,
    req: &RunRequest,
    out: &mut (dyn Write + Send),
) -> Result<RunOutcome, RunError> {
    let mut signals = Signals::new().map_err(RunError::Signals)?;
    let name = Name::parse(&req.name)?;
    let (vcpus, mem_mib) = validate_sizing(req.vcpus, req.mem_mib)?;
    let (kernel, guest) = resolve_kernel(paths, &req.kernel)?;
    require_file("initrd", &req.initrd)?;
    require_file("rootfs", &req.rootfs)?;
    // Checked before anything starts, as `podman run` checks them.
    let wanted = match req.network {
        RunNetwork::Bridged => NetworkRequest::Bridged,
        RunNetwork::None | RunNetwork::Tap => NetworkRequest::None,
    };
    let prepared = crate::network::args::prepare(wanted, &req.publish)?;
    let firecracker = binary::find(Program::Firecracker, paths)?;

    let mut spec = VmSpec::new(
        paths,
        name,
        VmKind::Raw,
        Resources {
            vcpus,
            mem_mib,
            track_dirty_pages: req.track_dirty_pages,
        },
        Source::Boot {
            kernel,
            initrd: req.initrd.clone(),
            cmdline: req
                .boot_args
                .clone()
                .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_owned()),
        },
        Launcher::for_host(paths, firecracker.path)
            .map_err(|e| RunError::Launch(Box::new(e.into())))?,
    );
    spec.guest = guest;
    spec.ksm = req.ksm;
    spec.lifetime = if req.detach {
        Lifetime::Detached
    } else {
        Lifetime::Foreground
    };
    spec.drives = req
        .rootfs
        .iter()
        .map(|p| DriveSpec {
            id: "rootfs".into(),
            file: p.clone(),
            copy_to: None,
            root: true,
            read_only: false,
        })
        .collect();
    spec.network = match prepared {
        PreparedNetwork::None if req.network == RunNetwork::Tap => {
            NetworkAttachment::namespaced(&spec.id, network::DEFAULT_TAP)
        }
        PreparedNetwork::None => NetworkAttachment::None,
        // Slot 0 until launch takes a free one under the store lock.
        PreparedNetwork::Bridged { dns, publish } => NetworkAttachment::Bridged(
            network::bridged::BridgedNet::new(&spec.id, 0, network::DEFAULT_TAP, dns, publish),
        ),
    };

    let host = Host::new(Store::open(paths)?);
    let mut vm = launch(&host, spec).await?;
    vm.start().await?;
    if req.detach {
        return Ok(RunOutcome {
            record: vm.detach(),
            exit_code: None,
            interrupted: None,
        });
    }
    let record = vm.record().clone();
    let event = follow_console(&mut vm, out, &mut signals).await;
    vm.finish(crate::cleanup::Disposition::Forget).warn();
    let (exit_code, interrupted) = match event.map_err(RunError::Console)? {
        Event::Exited(code) => (code, None),
        Event::Signal(sig) => (None, Some(sig)),
        Event::MemorySourceLost(_) => (None, None),
    };
    Ok(RunOutcome {
        record,
        exit_code,
        interrupted,
    })
}
