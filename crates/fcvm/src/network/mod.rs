//! Per-VM network namespaces and TAP devices, made in-process (no `ip` calls on the hot
//! path of a clone).
//!
//! Firecracker v1.12 has no `network_overrides` on snapshot load: a restored VM reopens the
//! TAP by the name recorded in its snapshot. Every VM therefore lives in its own named
//! network namespace (`/run/netns/fcvm-<id>`), where its TAP can have the same name as the
//! original's (`tap0`) without clashing with other clones.
//!
//! A namespace is made by a short-lived thread: it unshares `CLONE_NEWNET` (which moves only
//! that thread), bind-mounts `/proc/thread-self/ns/net` onto `/run/netns/<name>` so the
//! namespace outlives the thread, creates the persistent TAP there and brings it up. Removal
//! is [`delete_netns`] (or the recorded `CleanupStep::DeleteNetns`), which unmounts and
//! unlinks the file; the TAP disappears with the namespace.
//!
//! How a VM is attached is recorded as a [`NetworkAttachment`] in its state record. The
//! namespace and TAP system calls sit behind [`NetOps`] ([`HostNet`] is the real one,
//! [`fake::RecordingNet`] records calls and injects failures), so the launch and teardown
//! logic is tested without root.

pub mod args;
pub mod attachment;
pub mod bridged;
pub mod fake;

pub use attachment::NetworkAttachment;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Where named network namespaces live (the `ip netns` convention).
pub const NETNS_DIR: &str = "/run/netns";

/// The TAP name every fcvm VM with a network uses inside its own namespace.
pub const DEFAULT_TAP: &str = "tap0";

/// Linux interface names are at most 15 bytes.
const IFNAMSIZ: usize = 16;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 203, int)`.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// What went wrong making or removing a namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Bad namespace or interface name.
    #[error("invalid name {0:?}: use 1-15 letters, digits, '-', '_' or '.'")]
    BadName(String),
    /// The namespace already exists.
    #[error("network namespace {0} already exists; remove it with `ip netns delete {0}` if no VM uses it")]
    Exists(String),
    /// A step failed.
    #[error("{step} for network namespace {name} (fcvm needs root, /dev/net/tun and network namespaces)")]
    Step {
        /// What was being done.
        step: &'static str,
        /// The namespace.
        name: String,
        /// Cause.
        source: io::Error,
    },
    /// The helper thread panicked or could not start.
    #[error("network namespace helper thread failed: {0}")]
    Thread(String),
    /// `ip` or `nft` failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its error output (or why it could not run).
        stderr: String,
    },
    /// A sysctl could not be written.
    #[error("cannot set {key}={value}{}", netns.as_deref().map(|n| format!(" in network namespace {n}")).unwrap_or_default())]
    Sysctl {
        /// The key, as a path under /proc/sys (`net/ipv4/ip_forward`).
        key: String,
        /// The value.
        value: String,
        /// The namespace (None: the host's).
        netns: Option<String>,
        /// Cause.
        source: io::Error,
    },
    /// A port another VM publishes.
    #[error(transparent)]
    Publish(#[from] bridged::PublishError),
    /// No pool slot left.
    #[error(
        "no bridged address left in {}/16: its {} slots are held by VMs or overlap the host's own networks (see `ip route`)",
        bridged::POOL_BASE,
        bridged::POOL_SLOTS
    )]
    PoolExhausted,
}

/// The namespace and TAP operations a VM's network needs, so that the logic using them can
/// be tested with a recording fake (youki's syscall seam).
pub trait NetOps: Send + Sync + std::fmt::Debug {
    /// See [`create_netns`].
    fn create_netns(
        &self,
        name: &str,
        tap: Option<&str>,
        tap_owner: Option<u32>,
    ) -> Result<(), NetError>;
    /// See [`delete_netns`].
    fn delete_netns(&self, name: &str) -> Result<(), NetError>;
    /// Run `ip [-n NETNS] ARGS...`.
    fn ip(&self, netns: Option<&str>, args: &[&str]) -> Result<(), NetError>;
    /// Run each of `commands` (the arguments of one `ip` call each) in order, in one `ip
    /// [-n NETNS] -batch -`; it stops at the first that fails.
    fn ip_batch(&self, netns: Option<&str>, commands: &[Vec<String>]) -> Result<(), NetError>;
    /// Write `value` to `/proc/sys/<key>` in namespace `netns` (None: the host's).
    fn sysctl(&self, netns: Option<&str>, key: &str, value: &str) -> Result<(), NetError>;
    /// Load a ruleset with `nft -f -`.
    fn nft_apply(&self, ruleset: &str) -> Result<(), NetError>;
    /// Load a ruleset with `nft -f -` inside namespace `netns` (its tables go with it).
    fn nft_apply_in(&self, netns: &str, ruleset: &str) -> Result<(), NetError>;
    /// Delete nftables table `ip <name>`; a missing table is success.
    fn nft_delete_table(&self, name: &str) -> Result<(), NetError>;
    /// Delete interface `name` in the host's namespace; a missing one is success.
    fn delete_link(&self, name: &str) -> Result<(), NetError>;
}

/// The real kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostNet;

impl NetOps for HostNet {
    fn create_netns(
        &self,
        name: &str,
        tap: Option<&str>,
        tap_owner: Option<u32>,
    ) -> Result<(), NetError> {
        create_netns(name, tap, tap_owner)
    }
    fn delete_netns(&self, name: &str) -> Result<(), NetError> {
        delete_netns(name)
    }
    fn ip(&self, netns: Option<&str>, args: &[&str]) -> Result<(), NetError> {
        let mut full: Vec<&str> = Vec::new();
        if let Some(ns) = netns {
            full.extend(["-n", ns]);
        }
        full.extend(args);
        run_program("ip", &full, None).map(drop)
    }
    fn ip_batch(&self, netns: Option<&str>, commands: &[Vec<String>]) -> Result<(), NetError> {
        let mut args: Vec<&str> = Vec::new();
        if let Some(ns) = netns {
            args.extend(["-n", ns]);
        }
        args.extend(["-batch", "-"]);
        let script: String = commands.iter().map(|c| c.join(" ") + "\n").collect();
        run_program("ip", &args, Some(&script)).map(drop)
    }
    fn sysctl(&self, netns: Option<&str>, key: &str, value: &str) -> Result<(), NetError> {
        write_sysctl(netns, key, value).map_err(|source| NetError::Sysctl {
            key: key.to_owned(),
            value: value.to_owned(),
            netns: netns.map(str::to_owned),
            source,
        })
    }
    fn nft_apply(&self, ruleset: &str) -> Result<(), NetError> {
        run_program("nft", &["-f", "-"], Some(ruleset)).map(drop)
    }
    fn nft_apply_in(&self, netns: &str, ruleset: &str) -> Result<(), NetError> {
        let ns = File::open(netns_path(netns)).map_err(|source| NetError::Step {
            step: "open",
            name: netns.to_owned(),
            source,
        })?;
        let ruleset = ruleset.to_owned();
        let name = netns.to_owned();
        // A child starts in the namespaces of the thread that forks it: this one, moved.
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetError::Step {
                    step: "enter",
                    name,
                    source: e.into(),
                }
            })?;
            run_program("nft", &["-f", "-"], Some(&ruleset)).map(drop)
        })
        .join()
        .map_err(|_| NetError::Thread("panicked".into()))?
    }
    fn nft_delete_table(&self, name: &str) -> Result<(), NetError> {
        match run_program("nft", &["delete", "table", "ip", name], None) {
            Err(NetError::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
            other => other.map(drop),
        }
    }
    fn delete_link(&self, name: &str) -> Result<(), NetError> {
        match run_program("ip", &["link", "del", name], None) {
            Err(NetError::Command { stderr, .. }) if stderr.contains("Cannot find device") => {
                Ok(())
            }
            other => other.map(drop),
        }
    }
}

/// Run `program args...` (found in PATH or sbin), feeding `stdin`; its stderr is the error.
fn run_program(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let command = format!("{program} {}", args.join(" "));
    let fail = |stderr: String| NetError::Command {
        command: command.clone(),
        stderr,
    };
    let path = bridged::find_program(program).ok_or_else(|| fail("not found in PATH".into()))?;
    let mut child = Command::new(path)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `/proc/sys/net` shows the namespace of the thread that opens it, so a namespaced write
/// happens on a throwaway thread that joined the namespace first.
fn write_sysctl(netns: Option<&str>, key: &str, value: &str) -> io::Result<()> {
    let path = Path::new("/proc/sys").join(key);
    let value = value.to_owned();
    let Some(ns) = netns else {
        return fs::write(&path, value);
    };
    let ns = File::open(netns_path(ns))?;
    std::thread::spawn(move || -> io::Result<()> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        fs::write(&path, value)
    })
    .join()
    .map_err(|_| io::Error::other("thread panicked"))?
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn check_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() < IFNAMSIZ.max(64)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NetError::BadName(name.to_owned()))
    }
}

/// Create network namespace `name` and, when `tap` is given, a persistent TAP device of
/// that name inside it, up; `tap_owner` is the uid of a jailed VMM, which may attach to it
/// without CAP_NET_ADMIN. On failure nothing is left behind.
pub fn create_netns(name: &str, tap: Option<&str>, tap_owner: Option<u32>) -> Result<(), NetError> {
    check_name(name)?;
    if let Some(t) = tap {
        if t.len() >= IFNAMSIZ {
            return Err(NetError::BadName(t.to_owned()));
        }
        check_name(t)?;
    }
    let path = netns_path(name);
    let step = |step: &'static str| {
        let name = name.to_owned();
        move |source| NetError::Step { step, name, source }
    };
    fs::create_dir_all(NETNS_DIR).map_err(step("create /run/netns"))?;
    match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(NetError::Exists(name.to_owned()))
        }
        Err(e) => return Err(step("create the namespace file")(e)),
    }
    let target = path.clone();
    let tap = tap.map(str::to_owned);
    let result = std::thread::Builder::new()
        .name("fcvm-netns".into())
        .spawn(move || in_new_netns(&target, tap.as_deref(), tap_owner))
        .map_err(|e| NetError::Thread(e.to_string()))?
        .join()
        .map_err(|_| NetError::Thread("panicked".into()))?;
    if let Err((what, e)) = result {
        let _ = delete_netns(name);
        return Err(step(what)(e));
    }
    Ok(())
}

/// Runs on a throwaway thread: after `unshare` this thread alone is in the new namespace.
fn in_new_netns(
    target: &Path,
    tap: Option<&str>,
    tap_owner: Option<u32>,
) -> Result<(), (&'static str, io::Error)> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| ("unshare(CLONE_NEWNET)", e.into()))?;
    nix::mount::mount(
        Some("/proc/thread-self/ns/net"),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| ("bind-mount the namespace", io::Error::from(e)))?;
    if let Some(tap) = tap {
        create_tap(tap, tap_owner).map_err(|e| ("create the TAP device", e))?;
        set_up(tap).map_err(|e| ("bring the TAP device up", e))?;
    }
    set_up("lo").map_err(|e| ("bring lo up", e))?;
    Ok(())
}

fn ifreq_with_name(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// `/dev/net/tun` attached to the TAP `name` (made if missing): what both creating a
/// persistent TAP and removing one start from.
fn open_tap(name: &str) -> io::Result<std::fs::File> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = ifreq_with_name(name);
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which lives for the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

/// `_IOW('T', 204, int)`.
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;

/// A persistent TAP named `name` in the calling thread's namespace. With `owner`, only that
/// uid (or CAP_NET_ADMIN) may attach to it: for a jailed VMM, which cannot create one itself.
fn create_tap(name: &str, owner: Option<u32>) -> io::Result<()> {
    let tun = open_tap(name)?;
    if let Some(uid) = owner {
        // SAFETY: TUNSETOWNER takes an integer argument.
        if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETOWNER, uid as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A persistent TAP named `name` in this namespace that only `uid` (or CAP_NET_ADMIN) may
/// attach to: for a jailed VMM, which cannot create one itself.
pub fn create_owned_tap(name: &str, uid: u32) -> io::Result<()> {
    check_name(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    create_tap(name, Some(uid))
}

/// Remove the persistent TAP `name` from this namespace (a missing one is fine: attaching
/// then makes a transient device that goes with the fd).
pub fn delete_tap(name: &str) -> io::Result<()> {
    let tun = open_tap(name)?;
    // SAFETY: TUNSETPERSIST takes an integer argument.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 0 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `ip link set <name> up` in the calling thread's namespace.
fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is owned by `sock` right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let sock: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let mut req = ifreq_with_name(name);
    // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the union was just filled as flags by SIOCGIFFLAGS.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as i16 };
    // SAFETY: SIOCSIFFLAGS reads the ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Remove namespace `name` (idempotent): detach the bind mount and unlink the file. The
/// namespace (and its TAP) goes away once no process is inside it any more.
pub fn delete_netns(name: &str) -> Result<(), NetError> {
    check_name(name)?;
    let path = netns_path(name);
    match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(NetError::Step {
                step: "unmount",
                name: name.to_owned(),
                source: e.into(),
            })
        }
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetError::Step {
            step: "remove",
            name: name.to_owned(),
            source,
        }),
    }
}

/// A locally administered, unicast MAC derived from `seed` (e.g. the VM id).
pub fn mac_for(seed: &str) -> String {
    let digest = crate::fsutil::sha256_bytes(seed.as_bytes());
    let b = hex::decode(&digest[..10]).unwrap_or_else(|_| vec![0; 5]);
    format!(
        "06:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

/// Whether `name` exists as an interface in namespace `netns` (tests, diagnostics).
pub fn interface_in_netns(netns: &str, name: &str) -> io::Result<bool> {
    let ns = File::open(netns_path(netns))?;
    let name = name.to_owned();
    std::thread::spawn(move || -> io::Result<bool> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        // Not /sys/class/net: sysfs shows the namespace of whoever mounted it.
        let c = std::ffi::CString::new(name).map_err(io::Error::other)?;
        // SAFETY: the string is NUL-terminated and lives for the call.
        Ok(unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
    })
    .join()
    .map_err(|_| io::Error::other("thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_macs() {
        assert!(check_name("fcvm-0123456789ab").is_ok());
        assert!(check_name("a/b").is_err());
        assert!(check_name("").is_err());
        let m = mac_for("abc");
        assert_eq!(m.len(), 17);
        assert!(m.starts_with("06:"));
        assert_ne!(m, mac_for("abd"));
    }

    #[test]
    fn netns_with_tap_round_trip() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED netns_with_tap_round_trip: needs root");
            return;
        }
        let name = format!("fcvm-ut-{}", std::process::id());
        create_netns(&name, Some("tap0"), None).unwrap();
        assert!(netns_path(&name).exists());
        assert!(interface_in_netns(&name, "tap0").unwrap());
        assert!(matches!(
            create_netns(&name, None, None),
            Err(NetError::Exists(_))
        ));
        delete_netns(&name).unwrap();
        assert!(!netns_path(&name).exists());
        delete_netns(&name).unwrap();
    }
}
