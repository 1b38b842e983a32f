//! What a container VM boots with: which VMM, kernel, root filesystem and agent initrd.
//!
//! Everything here is looked up before any VM state is created, so a missing piece is
//! reported with the exact `fcvm setup` step that provides it and nothing is left behind.

use std::path::{Path, PathBuf};

use crate::firecracker::binary::{self, BinaryError, Program};
use crate::paths::Paths;
use crate::setup::{initrd, kernel, probe, rootfs};

/// Environment variable selecting the VMM (`firecracker` or `sandbox`).
pub const VMM_ENV: &str = "FCVM_VMM";
/// Environment variable naming the sandbox VMM binary.
pub const SANDBOX_BIN_ENV: &str = "FCVM_SANDBOX_VMM_BIN";
/// Environment variable naming the guest root filesystem image (instead of `fcvm setup rootfs`'s).
pub const ROOTFS_ENV: &str = "FCVM_ROOTFS";
/// File name of the sandbox VMM binary.
pub const SANDBOX_BIN: &str = "fcvm-sandbox-vmm";

/// Which VMM runs the VM. fcvm talks to both through the same Firecracker API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VmmKind {
    /// Firecracker: a real microVM (needs hardware-assisted KVM for Linux guests).
    Firecracker,
    /// The stand-in: the real agent and rootfs in Linux namespaces, no separate kernel.
    Sandbox,
}

impl VmmKind {
    /// Name stored in state records.
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Firecracker => "firecracker",
            VmmKind::Sandbox => "sandbox",
        }
    }
}

/// Something needed to boot is missing.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Firecracker missing.
    #[error(transparent)]
    Firecracker(#[from] BinaryError),
    /// Sandbox VMM missing.
    #[error("cannot find the sandbox VMM `{SANDBOX_BIN}`: set {SANDBOX_BIN_ENV}, put it next to the fcvm binary or on PATH (build it with `cargo build --release -p fcvm-sandbox-vmm`)")]
    NoSandbox,
    /// No guest kernel for Firecracker.
    #[error("no guest kernel: run `sudo fcvm setup kernel` (needs the linux-source-6.1 package) or pass --kernel PATH")]
    NoKernel,
    /// A given file does not exist.
    #[error("{what} {path} does not exist{hint}")]
    Missing {
        /// Which input.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// No root filesystem built.
    #[error("no guest root filesystem: run `sudo fcvm setup rootfs` first (or set {ROOTFS_ENV} / pass --rootfs)")]
    NoRootfs,
    /// Rootfs options are invalid (cannot happen with defaults).
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    /// The agent initrd cannot be made.
    #[error(transparent)]
    Agent(#[from] initrd::InitrdError),
    /// Probe kernel for the sandbox.
    #[error("cannot write the probe kernel the sandbox VMM is given: {0}")]
    Probe(std::io::Error),
}

/// The VMM to use and, when it was chosen automatically, a one-line notice saying why.
pub fn choose_vmm(requested: Option<VmmKind>, paths: &Paths) -> (VmmKind, Option<String>) {
    if let Some(kind) = requested {
        return (kind, None);
    }
    if crate::doctor::check(paths).guest_kernels_boot {
        (VmmKind::Firecracker, None)
    } else {
        (
            VmmKind::Sandbox,
            Some("fcvm: this host cannot boot guest kernels (see `fcvm doctor`); using the sandbox VMM: namespace isolation only, no microVM".into()),
        )
    }
}

/// The VMM binary: Firecracker as `fcvm setup firecracker` installed it; the sandbox from
/// `$FCVM_SANDBOX_VMM_BIN`, next to the fcvm binary, or on PATH, in that order.
pub fn vmm_binary(kind: VmmKind, paths: &Paths) -> Result<PathBuf, MachineError> {
    match kind {
        VmmKind::Firecracker => Ok(binary::find(Program::Firecracker, paths)?.path),
        VmmKind::Sandbox => find_sandbox().ok_or(MachineError::NoSandbox),
    }
}

fn find_sandbox() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(SANDBOX_BIN_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(SANDBOX_BIN)))
        .filter(|p| p.is_file());
    beside.or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(SANDBOX_BIN))
            .find(|p| p.is_file())
    })
}

/// The guest kernel: `--kernel`, else the newest from `fcvm setup kernel`. The sandbox does
/// not run a kernel but the API wants a file, so it gets the probe kernel.
pub fn guest_kernel(
    kind: VmmKind,
    paths: &Paths,
    explicit: Option<&Path>,
) -> Result<PathBuf, MachineError> {
    if let Some(k) = explicit {
        return existing("kernel", k, "");
    }
    match kind {
        VmmKind::Sandbox => probe::ensure(paths).map_err(MachineError::Probe),
        VmmKind::Firecracker => kernel::built_kernels(paths)
            .ok()
            .and_then(|k| k.into_iter().next())
            .ok_or(MachineError::NoKernel),
    }
}

/// The root filesystem image: `--rootfs`, `$FCVM_ROOTFS`, or `fcvm setup rootfs`'s.
pub fn guest_rootfs(paths: &Paths, explicit: Option<&Path>) -> Result<PathBuf, MachineError> {
    let from_env = std::env::var_os(ROOTFS_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if let Some(p) = explicit.map(Path::to_owned).or(from_env) {
        return existing("rootfs", &p, " (build one with `sudo fcvm setup rootfs`)");
    }
    let built = rootfs::rootfs_path(paths, &rootfs::RootfsOptions::default())?;
    if built.is_file() {
        Ok(built)
    } else {
        Err(MachineError::NoRootfs)
    }
}

/// The agent initrd, made from the static `fc-agent` binary on first use.
pub fn agent_initrd(paths: &Paths) -> Result<PathBuf, MachineError> {
    let agent = initrd::find_agent_binary()?;
    Ok(initrd::ensure_initrd(paths, &agent)?.path)
}

fn existing(what: &'static str, p: &Path, hint: &'static str) -> Result<PathBuf, MachineError> {
    if p.is_file() {
        Ok(p.to_owned())
    } else {
        Err(MachineError::Missing {
            what,
            path: p.to_owned(),
            hint,
        })
    }
}
