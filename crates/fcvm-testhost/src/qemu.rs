//! The QEMU command line of the emulated KVM host, and starting QEMU so it cannot outlive us.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::error::{Error, Result};

/// One 9p export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// Host directory (absolute, canonical): mounted at the same path inside.
    pub path: PathBuf,
    /// QEMU `mount_tag`.
    pub tag: String,
    /// Writable.
    pub rw: bool,
}

/// Everything that varies between runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Unique run id, put in `-name` so tests (and people) can find this QEMU.
    pub run_id: String,
    /// vCPUs.
    pub cpus: u32,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// bzImage.
    pub kernel: PathBuf,
    /// initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub append: String,
    /// Extra shares (the host root is always exported as `hostroot`).
    pub shares: Vec<Share>,
    /// Inherited fd numbers N (read-write) and N+1 (read-only) of the scratch image, if any
    /// (passed with `-add-fd`, so the image can be unlinked before QEMU starts).
    pub scratch_fd: Option<i32>,
    /// The control socket (we listen, QEMU connects).
    pub ctl_socket: PathBuf,
}

/// The `-name` marker of a run.
pub fn marker(run_id: &str) -> String {
    format!("fcvm-testhost-{run_id}")
}

/// QEMU's option parser splits on `,`; a literal comma is written `,,`.
pub fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

fn path_opt(p: &Path) -> String {
    escape_opt(&p.to_string_lossy())
}

/// The kernel command line. `runner` is the host path of this binary (visible in L1 via 9p);
/// `modload_workers` tunes the runner's module loader (see guest.rs), for measurements.
pub fn kernel_cmdline(
    runner: &Path,
    verbose: bool,
    modload_workers: Option<u32>,
) -> Result<String> {
    let r = runner.to_string_lossy();
    // The kernel splits its command line on spaces and the init script reads it unquoted.
    if r.chars().any(|c| c.is_whitespace() || c == '"') {
        return Err(Error::Usage(format!(
            "the fcvm-testhost binary's path {r:?} contains whitespace or quotes: the L1 kernel command line cannot carry it; move the binary"
        )));
    }
    let mut s = format!("console=ttyS0 panic=-1 quiet fcvm.runner={r}");
    if verbose {
        s.push_str(" fcvm.verbose=1");
    }
    if let Some(w) = modload_workers {
        s.push_str(&format!(" fcvm.modload_workers={w}"));
    }
    Ok(s)
}

/// The full argument list (without the program).
pub fn args(c: &Config) -> Vec<String> {
    let mut a: Vec<String> = [
        "-name",
        &marker(&c.run_id),
        "-M",
        "q35",
        // Pure software: the host's /dev/kvm (nested PVM) cannot run Linux guests.
        "-accel",
        "tcg,thread=multi",
        // An AMD model with SVM + NPT: inside, kvm_amd gives a real /dev/kvm.
        "-cpu",
        "EPYC,+svm,+npt",
        "-smp",
        &c.cpus.to_string(),
        "-m",
        &c.mem_mib.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        // The serial console goes to QEMU's stdout, which is our console log file.
        "-serial",
        "stdio",
        "-kernel",
        &path_opt(&c.kernel),
        "-initrd",
        &path_opt(&c.initrd),
        "-append",
        &c.append,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for s in &c.shares {
        a.push("-virtfs".into());
        a.push(format!(
            "local,path={},mount_tag={},security_model=passthrough,multidevs=remap{}",
            path_opt(&s.path),
            s.tag,
            if s.rw { "" } else { ",readonly=on" }
        ));
    }
    if let Some(fd) = c.scratch_fd {
        a.extend([
            "-add-fd".to_string(),
            format!("fd={fd},set=1"),
            "-add-fd".to_string(),
            format!("fd={},set=1", fd + 1),
            "-drive".to_string(),
            // Throwaway disk: cache=unsafe skips host flushes.
            "file=/dev/fdset/1,if=none,id=scratch,format=raw,cache=unsafe,discard=unmap"
                .to_string(),
            "-device".to_string(),
            "virtio-blk-pci,drive=scratch".to_string(),
        ]);
    }
    a.extend([
        "-device".to_string(),
        "virtio-serial-pci".to_string(),
        "-chardev".to_string(),
        format!("socket,id=ctl,path={}", path_opt(&c.ctl_socket)),
        "-device".to_string(),
        "virtserialport,chardev=ctl,name=fcvm.ctl".to_string(),
        "-device".to_string(),
        "virtio-rng-pci".to_string(),
    ]);
    a
}

/// Starts QEMU. Must be called from the thread that lives for the whole run: the parent-death
/// signal fires when the *thread* that forked the child exits, not just the process.
pub fn spawn(
    qemu: &Path,
    c: &Config,
    console: std::fs::File,
    scratch: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
) -> Result<Child> {
    use std::os::fd::AsRawFd;
    let console_err = console
        .try_clone()
        .map_err(Error::io("duplicating console log fd", "console.log"))?;
    let mut cmd = Command::new(qemu);
    cmd.args(args(c))
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(console_err);
    let scratch_raw = scratch
        .as_ref()
        .map(|(rw, ro)| [rw.as_raw_fd(), ro.as_raw_fd()]);
    let want_fd = c.scratch_fd.map(|n| [n, n + 1]);
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, getppid, setpgid, dup, dup2, fcntl, kill): no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            // Its own process group: a ^C at our terminal is for the command (we forward it),
            // not for QEMU.
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // QEMU dies with us, even when we are SIGKILLed.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // We may have died between fork and prctl: then nobody would kill QEMU.
            if libc::getppid() == 1 {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            if let (Some(src), Some(dst)) = (scratch_raw, want_fd) {
                // Move both out of the way first: a source may sit on the other's target number.
                let mut tmp = [-1; 2];
                for i in 0..2 {
                    tmp[i] = libc::fcntl(src[i], libc::F_DUPFD_CLOEXEC, 100);
                    if tmp[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for i in 0..2 {
                    // dup2 clears close-on-exec on the new descriptor.
                    if libc::dup2(tmp[i], dst[i]) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::Command {
        what: format!("starting {}", qemu.display()),
        detail: e.to_string(),
    })?;
    drop(scratch);
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            run_id: "123-abc".into(),
            cpus: 2,
            mem_mib: 6144,
            kernel: "/c/vmlinuz".into(),
            initrd: "/c/init,rd".into(),
            append: "console=ttyS0".into(),
            shares: vec![
                Share {
                    path: "/data/a,b".into(),
                    tag: "share0".into(),
                    rw: true,
                },
                Share {
                    path: "/ro".into(),
                    tag: "share1".into(),
                    rw: false,
                },
            ],
            scratch_fd: Some(3),
            ctl_socket: "/run/x/ctl.sock".into(),
        }
    }

    fn after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn machine_and_tcg_only() {
        let a = args(&cfg());
        assert_eq!(after(&a, "-name"), ["fcvm-testhost-123-abc"]);
        assert_eq!(after(&a, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(after(&a, "-cpu"), ["EPYC,+svm,+npt"]);
        assert_eq!(after(&a, "-M"), ["q35"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert_eq!(after(&a, "-m"), ["6144"]);
        assert!(
            !a.iter().any(|s| s.contains("kvm")),
            "never the host's KVM: {a:?}"
        );
        for f in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(a.iter().any(|s| s == f), "{f}");
        }
    }

    #[test]
    fn shares_escape_commas_and_default_read_only() {
        let a = args(&cfg());
        let v = after(&a, "-virtfs");
        assert_eq!(v.len(), 3);
        assert!(v[0].starts_with("local,path=/,mount_tag=hostroot,"));
        assert!(v[0].contains("readonly=on") && v[0].contains("multidevs=remap"));
        assert_eq!(
            v[1],
            "local,path=/data/a,,b,mount_tag=share0,security_model=passthrough,multidevs=remap"
        );
        assert!(v[2].ends_with(",readonly=on"));
        assert_eq!(after(&a, "-initrd"), ["/c/init,,rd"]);
    }

    #[test]
    fn scratch_and_control_port() {
        let a = args(&cfg());
        assert_eq!(after(&a, "-add-fd"), ["fd=3,set=1", "fd=4,set=1"]);
        assert!(after(&a, "-drive")[0].starts_with("file=/dev/fdset/1,"));
        assert!(after(&a, "-drive")[0].contains("cache=unsafe"));
        assert_eq!(
            after(&a, "-chardev"),
            ["socket,id=ctl,path=/run/x/ctl.sock"]
        );
        assert!(after(&a, "-device").contains(&"virtserialport,chardev=ctl,name=fcvm.ctl"));
        let mut c = cfg();
        c.scratch_fd = None;
        assert!(after(&args(&c), "-drive").is_empty());
    }

    #[test]
    fn cmdline() {
        let s = kernel_cmdline(Path::new("/t/fcvm-testhost"), false, None).unwrap();
        assert_eq!(
            s,
            "console=ttyS0 panic=-1 quiet fcvm.runner=/t/fcvm-testhost"
        );
        assert!(kernel_cmdline(Path::new("/t/x"), true, Some(2))
            .unwrap()
            .ends_with(" fcvm.verbose=1 fcvm.modload_workers=2"));
        assert!(kernel_cmdline(Path::new("/my dir/x"), false, None).is_err());
    }
}
