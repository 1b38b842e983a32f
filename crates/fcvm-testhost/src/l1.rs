//! L1 system set-up done by the runner (PID 1 in the chroot), with system calls rather than
//! busybox commands: the chroot's mounts, the kernel modules not needed to boot (loaded in
//! parallel), loopback, hostname and limits.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use nix::mount::{mount, MsFlags};

use crate::modules::ListLine;

/// The initramfs' module directory, inherited from `/init` (`exec 3</lib/fcvm`).
pub const MODULES_FD: i32 = 3;

/// The chroot's own mounts (the host's root is already the overlay at `/`).
pub fn mount_system() -> Result<(), String> {
    let m = |src: &str, dst: &str, fs: &str, flags: MsFlags, data: &str| {
        let _ = fs::create_dir_all(dst);
        mount(Some(src), dst, Some(fs), flags, Some(data))
            .map_err(|e| format!("mounting {fs} on {dst}: {e}"))
    };
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    m("proc", "/proc", "proc", nosuid | MsFlags::MS_NOEXEC, "")?;
    m("sysfs", "/sys", "sysfs", nosuid | MsFlags::MS_NOEXEC, "")?;
    m(
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        nosuid | MsFlags::MS_NOEXEC,
        "nsdelegate",
    )?;
    m(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        "mode=0755",
    )?;
    m(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    )?;
    m("shm", "/dev/shm", "tmpfs", nosuid, "mode=1777")?;
    // What udev or systemd would make: without /dev/fd, bash's `<(...)` fails inside.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("linking {link} to {target}: {e}")),
        }
    }
    m("run", "/run", "tmpfs", nosuid, "mode=0755")?;
    // /tmp and /var/tmp stay part of the root overlay: the host's files there are visible (a
    // checkout or a test binary under /tmp must run inside too) and writes land in L1's RAM.
    Ok(())
}

/// Brings up `lo`, sets the hostname, raises the open-files limit (fcvm opens many fds: a
/// Firecracker per VM, vsock sockets, logs; the host's limit is not ours) and lifts the
/// locked-memory limit.
pub fn tune() {
    let _ = nix::unistd::sethostname("fcvm-testhost");
    let lim = libc::rlimit {
        rlim_cur: 1 << 20,
        rlim_max: 1 << 20,
    };
    // Locked memory: L1's default is 8 MiB; nothing here needs a limit.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads valid `rlimit` structs.
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited);
    }
    lo_up();
}

fn lo_up() {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return;
    }
    // SAFETY: `s` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: an all-zero ifreq is a valid value (name empty, union zeroed).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the `ifreq` we own, valid for the calls;
    // reading `ifru_flags` is sound because the kernel just filled that union member.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr);
        }
    }
}

/// Reads `modules.list` from the inherited directory fd.
pub fn read_list(dir: &OwnedFd) -> Result<Vec<ListLine>, String> {
    let f = open_at(dir, "modules.list")?;
    let mut s = String::new();
    fs::File::from(f)
        .read_to_string(&mut s)
        .map_err(|e| format!("reading modules.list: {e}"))?;
    s.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| ListLine::parse(l).ok_or_else(|| format!("bad modules.list line {l:?}")))
        .collect()
}

fn open_at(dir: &OwnedFd, name: &str) -> Result<OwnedFd, String> {
    let c = CString::new(name).map_err(|_| format!("bad name {name:?}"))?;
    // SAFETY: openat with a valid directory fd and a NUL-terminated path; result checked.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!(
            "opening {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads one module with finit_module(2). Already loaded counts as success.
fn load_one(dir: &OwnedFd, m: &ListLine) -> Result<(), String> {
    let f = open_at(dir, &format!("{}.ko", m.name))?;
    let params = CString::new(m.params.as_str()).map_err(|_| "NUL in params".to_string())?;
    // SAFETY: finit_module takes a module fd, a NUL-terminated parameter string and flags; both
    // pointers/fds are valid for the call.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("loading {} {}: {e}", m.name, m.params));
        }
    }
    Ok(())
}

#[derive(Default)]
struct Sched {
    loaded: HashSet<String>,
    failed: HashSet<String>,
    pending: Vec<usize>,
    running: usize,
}

/// Picks the first pending module whose dependencies are all loaded; marks the ones with a
/// failed dependency failed. `None`: nothing ready right now.
fn pick(s: &mut Sched, mods: &[ListLine], warnings: &mut Vec<String>) -> Option<usize> {
    loop {
        let i = s.pending.iter().position(|&i| {
            mods[i]
                .deps
                .iter()
                .all(|d| s.loaded.contains(d) || s.failed.contains(d))
        })?;
        let idx = s.pending.remove(i);
        let m = &mods[idx];
        if let Some(d) = m.deps.iter().find(|d| s.failed.contains(*d)) {
            warnings.push(format!("{} not loaded: its dependency {d} failed", m.name));
            s.failed.insert(m.name.clone());
            continue;
        }
        return Some(idx);
    }
}

/// Loads the late modules with `workers` threads, each module after its dependencies (the
/// list is a dependency graph; modules on different branches load at the same time). Returns
/// warnings (optional modules that failed); `Err` if a required module failed.
pub fn load_late(dir: OwnedFd, mods: Vec<ListLine>, workers: usize) -> Result<Vec<String>, String> {
    let mut sched = Sched::default();
    for (i, m) in mods.iter().enumerate() {
        if m.boot {
            sched.loaded.insert(m.name.clone());
        } else {
            sched.pending.push(i);
        }
    }
    // Dependencies outside the list (built-in) count as loaded.
    let names: HashSet<String> = mods.iter().map(|m| m.name.clone()).collect();
    for m in &mods {
        for d in &m.deps {
            if !names.contains(d) {
                sched.loaded.insert(d.clone());
            }
        }
    }
    let state = Arc::new((Mutex::new((sched, Vec::<String>::new())), Condvar::new()));
    let mods = Arc::new(mods);
    let dir = Arc::new(dir);
    let handles: Vec<_> = (0..workers.max(1))
        .map(|_| {
            let state = state.clone();
            let mods = mods.clone();
            let dir = dir.clone();
            std::thread::spawn(move || {
                let (lock, cv) = &*state;
                let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    let (s, w) = &mut *g;
                    match pick(s, &mods, w) {
                        Some(idx) => {
                            s.running += 1;
                            drop(g);
                            let r = load_one(&dir, &mods[idx]);
                            g = lock.lock().unwrap_or_else(|p| p.into_inner());
                            let (s, w) = &mut *g;
                            s.running -= 1;
                            match r {
                                Ok(()) => {
                                    s.loaded.insert(mods[idx].name.clone());
                                }
                                Err(e) => {
                                    s.failed.insert(mods[idx].name.clone());
                                    w.push(e);
                                }
                            }
                            cv.notify_all();
                        }
                        None if s.pending.is_empty() || s.running == 0 => {
                            // Done, or stuck (a dependency that never loads): give up on the
                            // rest.
                            for i in std::mem::take(&mut s.pending) {
                                s.failed.insert(mods[i].name.clone());
                                w.push(format!(
                                    "{} not loaded: dependencies unresolved",
                                    mods[i].name
                                ));
                            }
                            cv.notify_all();
                            return;
                        }
                        None => {
                            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let (lock, _) = &*state;
    let g = lock.lock().unwrap_or_else(|p| p.into_inner());
    let (s, w) = &*g;
    if let Some(m) = mods
        .iter()
        .find(|m| m.required && s.failed.contains(&m.name))
    {
        return Err(format!(
            "required kernel module {} failed to load: {}",
            m.name,
            w.join("; ")
        ));
    }
    Ok(w.clone())
}

/// Takes the inherited module directory fd, if `/init` passed one.
pub fn modules_dir() -> Option<OwnedFd> {
    // SAFETY: fstat on fd 3 only reads its metadata into a local.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is valid for the write.
    if unsafe { libc::fstat(MODULES_FD, &mut st) } != 0
        || st.st_mode & libc::S_IFMT != libc::S_IFDIR
    {
        return None;
    }
    // SAFETY: fd 3 is open (fstat succeeded), it is a directory /init opened for us, and
    // nothing else in this process owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(MODULES_FD) };
    // Not inherited by the command.
    // SAFETY: F_SETFD on a descriptor we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(name: &str, deps: &[&str], boot: bool) -> ListLine {
        ListLine {
            name: name.into(),
            required: false,
            boot,
            deps: deps.iter().map(|s| s.to_string()).collect(),
            params: String::new(),
        }
    }

    #[test]
    fn pick_respects_dependencies_and_failures() {
        let mods = vec![
            line("a", &[], false),
            line("b", &["a"], false),
            line("c", &["b"], false),
            line("d", &[], false),
        ];
        let mut s = Sched {
            pending: vec![0, 1, 2, 3],
            ..Default::default()
        };
        let mut w = Vec::new();
        assert_eq!(pick(&mut s, &mods, &mut w), Some(0));
        // b waits for a; d is independent.
        assert_eq!(pick(&mut s, &mods, &mut w), Some(3));
        assert_eq!(pick(&mut s, &mods, &mut w), None);
        s.failed.insert("a".into());
        // b and then c are skipped because a failed.
        assert_eq!(pick(&mut s, &mods, &mut w), None);
        assert!(s.failed.contains("b") && s.failed.contains("c"), "{w:?}");
        assert_eq!(w.len(), 2);
        assert!(s.pending.is_empty());
    }
}
