//! What a container VM boots with: Firecracker, kernel, root filesystem and agent initrd.
//!
//! Everything here is looked up before any VM state is created, so a missing piece is
//! reported with the exact `fcvm setup` step that provides it and nothing is left behind.

use std::path::{Path, PathBuf};

use crate::firecracker::binary::{self, BinaryError, Program};
use crate::paths::Paths;
use crate::setup::{initrd, kernel, probe, rootfs};

/// Environment variable naming the guest root filesystem image (instead of `fcvm setup rootfs`'s).
pub const ROOTFS_ENV: &str = "FCVM_ROOTFS";

/// Something needed to boot is missing.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Firecracker missing.
    #[error(transparent)]
    Firecracker(#[from] BinaryError),
    /// No guest kernel for Firecracker.
    #[error("no guest kernel: run `sudo fcvm setup kernel` (needs the linux-source-6.1 package) or pass --kernel PATH")]
    NoKernel,
    /// A given file does not exist.
    #[error("{what} {} does not exist{hint}", path.display())]
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
    /// The probe kernel could not be written.
    #[error("cannot write the probe kernel")]
    Probe(#[source] std::io::Error),
    /// The jailer is needed and unusable.
    #[error(transparent)]
    Jailer(#[from] crate::vm::jail::JailError),
}

/// Firecracker as `fcvm setup firecracker` installed it (or `FCVM_FIRECRACKER_BIN`).
pub fn firecracker(paths: &Paths) -> Result<PathBuf, MachineError> {
    Ok(binary::find(Program::Firecracker, paths)?.path)
}

/// How the VMM is started: under the jailer as root (see [`crate::vm::jail`]).
pub fn launcher(paths: &Paths) -> Result<crate::vm::Launcher, MachineError> {
    Ok(crate::vm::Launcher::for_host(paths, firecracker(paths)?)?)
}

/// The guest kernel: `--kernel` (a path, or `probe` as for `fcvm run`), else the newest
/// from `fcvm setup kernel`.
pub fn guest_kernel(paths: &Paths, explicit: Option<&Path>) -> Result<PathBuf, MachineError> {
    match explicit {
        Some(k) if k.as_os_str() == probe::PROBE_KEYWORD => {
            probe::ensure(paths).map_err(MachineError::Probe)
        }
        Some(k) => existing("kernel", k, ""),
        None => kernel::built_kernels(paths)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_probe_is_the_probe_guest_as_for_fcvm_run() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let k = guest_kernel(&paths, Some(Path::new("probe"))).unwrap();
        assert!(k.is_file());
        let err = guest_kernel(&paths, Some(Path::new("/nope/vmlinux"))).unwrap_err();
        assert_eq!(err.to_string(), "kernel /nope/vmlinux does not exist");
    }
}
