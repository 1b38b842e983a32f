//! Early boot as PID 1: kernel filesystems, the root drive, switch_root, cgroups.
//!
//! Runs from the initrd, where `/init` (this binary) is the only file. After
//! [`switch_root`] the agent keeps running from memory with the root drive as `/`.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use fcvm_proto::boot::Cmdline;
use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot};

/// Errors during early boot.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("Cannot mount {what} on {target}: {source}")]
    Mount {
        /// What was being mounted.
        what: String,
        /// Mount point.
        target: String,
        /// Cause.
        source: nix::Error,
    },
    /// The root device never appeared.
    #[error("Root device {0} did not appear within 5 s; check the drive configuration (root=)")]
    NoRootDevice(String),
    /// chroot/chdir during switch_root failed.
    #[error("switch_root failed: {0}")]
    SwitchRoot(nix::Error),
}

fn do_mount(
    src: &str,
    target: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    let _ = fs::create_dir_all(target);
    mount(Some(src), target, fstype, flags, data).map_err(|source| InitError::Mount {
        what: fstype.unwrap_or(src).to_owned(),
        target: target.to_owned(),
        source,
    })
}

fn is_mountpoint(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(path)))
        .unwrap_or(false)
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Mounts /proc (needed to read the command line).
pub fn mount_proc() -> Result<(), InitError> {
    if is_mountpoint("/proc") {
        return Ok(());
    }
    do_mount("proc", "/proc", Some("proc"), NOSUID_NODEV_NOEXEC, None)
}

/// Mounts /sys and devtmpfs on /dev.
pub fn mount_kernel_fs() -> Result<(), InitError> {
    do_mount("sysfs", "/sys", Some("sysfs"), NOSUID_NODEV_NOEXEC, None)?;
    do_mount(
        "devtmpfs",
        "/dev",
        Some("devtmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
}

/// Mounts the root drive on /newroot, moves the kernel filesystems into it and makes it `/`
/// (mount --move + chroot, the way switch_root does: pivot_root is not allowed on initramfs).
pub fn switch_root(cmdline: &Cmdline) -> Result<(), InitError> {
    let dev = cmdline.root();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !Path::new(dev).exists() {
        if Instant::now() > deadline {
            return Err(InitError::NoRootDevice(dev.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    do_mount(
        dev,
        "/newroot",
        Some(cmdline.rootfstype()),
        MsFlags::empty(),
        None,
    )?;
    for fs in ["/proc", "/sys", "/dev"] {
        let target = format!("/newroot{fs}");
        do_mount(fs, &target, None, MsFlags::MS_MOVE, None)?;
    }
    // The initrd holds only this binary, which is already in memory; freeing it saves guest RAM.
    let _ = fs::remove_file("/init");
    chdir("/newroot").map_err(InitError::SwitchRoot)?;
    do_mount(".", "/", None, MsFlags::MS_MOVE, None)?;
    chroot(".").map_err(InitError::SwitchRoot)?;
    chdir("/").map_err(InitError::SwitchRoot)?;
    Ok(())
}

/// Mounts what podman and crun expect under /dev, /run and /tmp.
pub fn mount_runtime_fs() -> Result<(), InitError> {
    do_mount(
        "devpts",
        "/dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    // /dev/ptmx must open the instance mounted above.
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    do_mount(
        "shm",
        "/dev/shm",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    do_mount(
        "run",
        "/run",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    do_mount(
        "tmp",
        "/tmp",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    for link in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        if fs::symlink_metadata(link.1).is_err() {
            let _ = std::os::unix::fs::symlink(link.0, link.1);
        }
    }
    Ok(())
}

/// Mounts the unified cgroup hierarchy (v2) crun will use.
pub fn mount_cgroups() -> Result<(), InitError> {
    do_mount(
        "cgroup2",
        "/sys/fs/cgroup",
        Some("cgroup2"),
        NOSUID_NODEV_NOEXEC,
        Some("nsdelegate"),
    )
}
