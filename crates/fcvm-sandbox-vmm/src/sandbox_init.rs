//! The sandbox helper: `fcvm-sandbox-vmm --sandbox-init`, started by the VMM on InstanceStart.
//!
//! A separate, single-threaded process because namespaces are per process and `fork` is only
//! safe without other threads. It joins the sandbox cgroups, unshares the mount, PID, network,
//! UTS, IPC and cgroup namespaces, readies loopback with the MMDS address, waits for the VMM to
//! bind its sockets in the new network namespace, builds a root that looks like a booted
//! initrd (tmpfs with `/init`, and `/dev` with the drives), and forks the guest's PID 1, which
//! execs the agent. It then waits for PID 1 and exits with its status.
//!
//! Lifetime: the helper and PID 1 both have `PR_SET_PDEATHSIG(SIGKILL)`, so killing the VMM
//! kills the helper, which kills PID 1, which makes the kernel kill the whole PID namespace.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, execve, fork, pivot_root, ForkResult};

use crate::spec::{Spec, GO_FD, MMDS_IP, READY_FD, SPEC_ENV};

/// Entry point of the helper; never returns.
pub fn main() -> ! {
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("fcvm-sandbox-vmm: sandbox setup failed: {e:#}");
            std::process::exit(1)
        }
    }
}

fn run() -> Result<i32> {
    let spec: Spec = serde_json::from_str(&std::env::var(SPEC_ENV).context("no sandbox spec")?)?;
    // SAFETY: the VMM placed these descriptors at fixed numbers for us and nothing else owns them.
    let mut ready = unsafe { fs::File::from_raw_fd(READY_FD) };
    // SAFETY: as above.
    let mut go = unsafe { fs::File::from_raw_fd(GO_FD) };

    for procs in &spec.cgroup_procs {
        fs::write(procs, "0").with_context(|| format!("cannot join cgroup {}", procs.display()))?;
    }
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWCGROUP,
    )
    .context("unshare (needs root)")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making mounts private")?;
    nix::unistd::sethostname("fcvm").context("sethostname")?;
    loopback_with_mmds().context("configuring loopback")?;

    ready.write_all(b"R").context("reporting readiness")?;
    drop(ready);
    let mut b = [0u8; 1];
    if go.read(&mut b).unwrap_or(0) != 1 {
        bail!("VMM aborted the start");
    }
    drop(go);

    build_root(&spec)?;
    // SAFETY: this process is single-threaded (nothing in `run` spawns threads), so the child
    // may allocate and exec freely.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            let err = exec_init(&spec);
            eprintln!("fcvm-sandbox-vmm: cannot start /init: {err:#}");
            std::process::exit(127)
        }
        ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                // A guest "reboot" in a PID namespace ends PID 1 with SIGHUP/SIGINT: a normal end.
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    return Ok(match sig {
                        nix::sys::signal::Signal::SIGHUP | nix::sys::signal::Signal::SIGINT => 0,
                        s => 128 + s as i32,
                    })
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => bail!("waitpid: {e}"),
            }
        },
    }
}

fn exec_init(spec: &Spec) -> anyhow::Error {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and has no memory effects.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let path = c"/init";
    let env = [
        CString::new(format!(
            "{}={}",
            fcvm_proto::boot::CMDLINE_ENV,
            spec.cmdline
        )),
        CString::new("TERM=linux"),
        CString::new("HOME=/"),
    ];
    let env: Vec<CString> = match env.into_iter().collect::<Result<_, _>>() {
        Ok(e) => e,
        Err(e) => return e.into(),
    };
    match execve(path, &[path], &env) {
        Ok(never) => match never {},
        Err(e) => e.into(),
    }
}

/// Builds the sandbox root (tmpfs with /init and a populated /dev) and pivots into it.
fn build_root(spec: &Spec) -> Result<()> {
    let root = &spec.root_dir;
    mount(
        Some("rootfs"),
        root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .context("mounting the root tmpfs")?;
    fs::copy(&spec.init_path, root.join("init")).context("copying the agent to /init")?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;
    for d in ["proc", "sys", "dev", "newroot"] {
        fs::create_dir_all(root.join(d))?;
    }
    // /dev must be a mount of its own: the agent moves it into the root drive.
    let dev = root.join("dev");
    mount(
        Some("dev"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .context("mounting /dev")?;
    let chr = |name: &str, major: u64, minor: u64| -> Result<()> {
        mknod(
            &dev.join(name),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            libc::makedev(major as u32, minor as u32),
        )
        .with_context(|| format!("mknod /dev/{name}"))
    };
    chr("null", 1, 3)?;
    chr("zero", 1, 5)?;
    chr("full", 1, 7)?;
    chr("random", 1, 8)?;
    chr("urandom", 1, 9)?;
    chr("tty", 5, 0)?;
    if Path::new("/dev/fuse").exists() {
        chr("fuse", 10, 229)?;
    }
    fs::create_dir_all(dev.join("net"))?;
    chr("net/tun", 10, 200)?;
    for d in &spec.devices {
        let mode = if d.read_only { 0o440 } else { 0o660 };
        mknod(
            &dev.join(&d.name),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(mode),
            d.rdev,
        )
        .with_context(|| format!("mknod /dev/{}", d.name))?;
    }
    let old = root.join(".oldroot");
    fs::create_dir_all(&old)?;
    pivot_root(root, &old).context("pivot_root into the sandbox root")?;
    chdir("/")?;
    umount2("/.oldroot", MntFlags::MNT_DETACH).context("detaching the host root")?;
    fs::remove_dir("/.oldroot")?;
    Ok(())
}

/// Brings `lo` up and adds the MMDS address to it, with ioctls (no `ip` binary needed).
fn loopback_with_mmds() -> Result<()> {
    // SAFETY: plain socket creation; the fd is owned by the File below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { fs::File::from_raw_fd(fd) };
    use std::os::fd::AsRawFd;
    let ifreq = |name: &str| {
        // SAFETY: ifreq is plain data; all-zero is valid.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        r
    };
    let ioctl = |req: libc::c_ulong, r: &mut libc::ifreq, what: &str| -> Result<()> {
        // SAFETY: every request used here reads or writes one ifreq through a valid pointer.
        if unsafe { libc::ioctl(sock.as_raw_fd(), req as _, r as *mut libc::ifreq) } < 0 {
            bail!("{what}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    };
    let mut r = ifreq("lo");
    ioctl(libc::SIOCGIFFLAGS, &mut r, "SIOCGIFFLAGS lo")?;
    // SAFETY: ifru_flags is the active member after SIOCGIFFLAGS.
    unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(libc::SIOCSIFFLAGS, &mut r, "SIOCSIFFLAGS lo")?;

    let sin = |ip: [u8; 4]| {
        // SAFETY: sockaddr_in is plain data; all-zero is valid.
        let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        a.sin_family = libc::AF_INET as libc::sa_family_t;
        a.sin_addr.s_addr = u32::from_ne_bytes(ip);
        a
    };
    let set_addr = |req: libc::c_ulong, ip: [u8; 4], what: &str| -> Result<()> {
        let mut r = ifreq("lo:0");
        let a = sin(ip);
        // SAFETY: sockaddr_in fits in the sockaddr member of the union (both 16 bytes).
        unsafe {
            std::ptr::write(
                &mut r.ifr_ifru.ifru_addr as *mut libc::sockaddr as *mut libc::sockaddr_in,
                a,
            )
        };
        ioctl(req, &mut r, what)
    };
    set_addr(libc::SIOCSIFADDR, MMDS_IP, "SIOCSIFADDR lo:0")?;
    set_addr(
        libc::SIOCSIFNETMASK,
        [255, 255, 255, 255],
        "SIOCSIFNETMASK lo:0",
    )?;
    Ok(())
}
