//! Where fcvm keeps things on the host.
//!
//! Every path fcvm uses is built here, so the layout can be read in one place:
//!
//! ```text
//! $FCVM_BASE_DIR                     default: /var/lib/fcvm as root, else $XDG_DATA_HOME/fcvm
//! ├── bin/firecracker, bin/jailer    installed by `fcvm setup firecracker`
//! ├── kernels/                       guest kernels (probe guest, built Linux kernels)
//! ├── rootfs/                        guest root filesystem images (content-addressed)
//! ├── initrd/                        agent initrds (content-addressed)
//! ├── images/                        cached container image archives
//! ├── vms/<vm-id>/                   per-VM runtime dir: API socket, vsock, console log, disks
//! ├── snapshots/<tag>/               published snapshots
//! ├── state/<vm-id>.json             one record per VM (see `state`)
//! ├── jail/firecracker/<vm-id>/root  jailed VMs' chroot paths (see `vm::jail`); jail/uids: uid claims
//! ├── cache/                         downloads (wheels, .deb files)
//! └── tmp/                           scratch on the same filesystem, for write-then-rename
//! ```
//!
//! Runtime paths are kept short because Unix socket paths are limited to 107 bytes and
//! Firecracker appends `_<port>` to the vsock socket path.

use std::path::{Path, PathBuf};

/// Environment variable overriding the base directory.
pub const BASE_DIR_ENV: &str = "FCVM_BASE_DIR";

/// Longest Unix socket path the kernel accepts (`sun_path` is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// The on-disk layout rooted at one base directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    base: PathBuf,
}

impl Paths {
    /// Layout rooted at `base`.
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Self { base: base.into() }
    }

    /// Layout from `$FCVM_BASE_DIR`, or the default for the current user.
    pub fn from_env() -> Self {
        if let Some(dir) = std::env::var_os(BASE_DIR_ENV).filter(|v| !v.is_empty()) {
            return Self::new(dir);
        }
        Self::new(default_base_dir())
    }

    /// The base directory itself.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Installed binaries (firecracker, jailer).
    pub fn bin_dir(&self) -> PathBuf {
        self.base.join("bin")
    }

    /// Guest kernels.
    pub fn kernels_dir(&self) -> PathBuf {
        self.base.join("kernels")
    }

    /// Guest root filesystem images.
    pub fn rootfs_dir(&self) -> PathBuf {
        self.base.join("rootfs")
    }

    /// Agent initrds.
    pub fn initrd_dir(&self) -> PathBuf {
        self.base.join("initrd")
    }

    /// Cached container image archives.
    pub fn images_dir(&self) -> PathBuf {
        self.base.join("images")
    }

    /// Parent of all per-VM runtime directories.
    pub fn vms_dir(&self) -> PathBuf {
        self.base.join("vms")
    }

    /// Runtime directory of one VM.
    pub fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.vms_dir().join(vm_id)
    }

    /// Container logs of one VM: apart from its runtime directory, which goes when the VM
    /// stops, while the logs stay until the record is removed (`fcvm rm`).
    pub fn log_dir(&self, vm_id: &str) -> PathBuf {
        self.base.join("logs").join(vm_id)
    }

    /// Published snapshots.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.base.join("snapshots")
    }

    /// One published snapshot.
    pub fn snapshot_dir(&self, tag: &str) -> PathBuf {
        self.snapshots_dir().join(tag)
    }

    /// VM state records.
    pub fn state_dir(&self) -> PathBuf {
        self.base.join("state")
    }

    /// The jailer's `--chroot-base-dir` (and the uid claims).
    pub fn jail_dir(&self) -> PathBuf {
        self.base.join("jail")
    }

    /// The image cache of container VMs (snapshots taken once the image is loaded).
    pub fn image_cache_dir(&self) -> PathBuf {
        self.base.join("image-cache")
    }

    /// Download cache.
    pub fn cache_dir(&self) -> PathBuf {
        self.base.join("cache")
    }

    /// Scratch space on the same filesystem as everything else, so renames are atomic.
    pub fn tmp_dir(&self) -> PathBuf {
        self.base.join("tmp")
    }
}

/// Where every VMM sees its own runtime directory.
///
/// Each VMM runs in a private mount namespace in which its runtime directory is
/// bind-mounted here. Firecracker records the paths it was given (vsock socket, drives)
/// inside snapshots, and v1.12 cannot override them on restore; because every VM sees the
/// same path, a clone restored anywhere finds *its own* files at the recorded paths.
pub const VMM_VIEW_DIR: &str = "/run/fcvm/vm";

/// File name of a VM's private root disk copy inside its runtime directory.
pub const ROOTFS_DISK: &str = "rootfs.img";

/// Files inside one VM's runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    dir: PathBuf,
}

impl VmPaths {
    /// Files of the VM whose runtime directory is `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The same files as the VMM sees them (see [`VMM_VIEW_DIR`]).
    pub fn vmm_view() -> VmPaths {
        VmPaths::new(VMM_VIEW_DIR)
    }

    /// The runtime directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Firecracker's API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("fc.sock")
    }

    /// Host side of the hybrid vsock; Firecracker adds `_<port>` for guest-initiated streams.
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    /// Host listener for guest-initiated vsock connections to `port`.
    pub fn vsock_listener(&self, port: u32) -> PathBuf {
        self.dir.join(format!("v.sock_{port}"))
    }

    /// Serial console output.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Firecracker's own log.
    pub fn firecracker_log(&self) -> PathBuf {
        self.dir.join("firecracker.log")
    }

    /// The VM's private copy of its root disk.
    pub fn rootfs_disk(&self) -> PathBuf {
        self.dir.join(ROOTFS_DISK)
    }
}

fn default_base_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/fcvm");
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(data).join("fcvm");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/share/fcvm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_rooted_at_base() {
        let p = Paths::new("/x");
        assert_eq!(p.vm_dir("abc"), PathBuf::from("/x/vms/abc"));
        assert_eq!(p.snapshot_dir("t"), PathBuf::from("/x/snapshots/t"));
        let vm = VmPaths::new(p.vm_dir("abc"));
        assert_eq!(
            vm.vsock_listener(4999),
            PathBuf::from("/x/vms/abc/v.sock_4999")
        );
    }
}
