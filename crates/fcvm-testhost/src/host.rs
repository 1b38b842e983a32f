//! The host side of a run: prepare kernel, initramfs and scratch disk, start QEMU, relay stdio,
//! signals and window size over the control port, and return the command's exit status.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

use crate::cache::{cache_dir, find_program, run_checked};
use crate::error::{Error, Result};
use crate::proto::{read_frame, Frame, ShareMount, Start, CHUNK};
use crate::qemu::{self, Share};
use crate::rundir::RunDir;
use crate::{initramfs, kernel, modules};

/// The fd number the scratch image has in QEMU (`-add-fd fd=N`).
const SCRATCH_FD: i32 = 3;
/// Extra memory QEMU itself needs beyond the guest RAM (TCG translation cache, devices).
const QEMU_OVERHEAD_MIB: u64 = 512;
/// How long QEMU + L1 may take to connect the control port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// After the exit status: how long L1 may take to power off before QEMU is killed.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(10);
/// After a forwarded SIGINT/SIGTERM: how long the command may take to end before we give up.
const SIGNAL_GRACE: Duration = Duration::from_secs(10);

/// What `fcvm-testhost run` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// L1 RAM.
    pub mem_mib: u64,
    /// L1 vCPUs.
    pub cpus: u32,
    /// Extra shares: host path, writable.
    pub shares: Vec<(PathBuf, bool)>,
    /// `--env NAME[=VALUE]`: `None` takes the caller's value.
    pub env: Vec<(String, Option<String>)>,
    /// Scratch disk size in GiB (0: none).
    pub scratch_gib: u64,
    /// Timings and the console log on stderr.
    pub verbose: bool,
    /// The command.
    pub argv: Vec<String>,
}

fn vlog(verbose: bool, msg: impl AsRef<str>) {
    if verbose {
        eprintln!("fcvm-testhost: {}", msg.as_ref());
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// `MemAvailable` in MiB.
fn mem_available_mib() -> Option<u64> {
    let s = fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Builds the command's environment: a clean one, not the caller's.
pub fn build_env(
    caller: impl Fn(&str) -> Option<String>,
    extra: &[(String, Option<String>)],
    scratch: Option<&str>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| {
        env.retain(|(n, _)| n != k);
        env.push((k.to_string(), v));
    };
    set(
        "PATH",
        caller("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into()),
    );
    set("HOME", "/root".into());
    for k in ["TERM", "CI"] {
        if let Some(v) = caller(k) {
            set(k, v);
        }
    }
    if let Some(s) = scratch {
        set("FCVM_TESTHOST_SCRATCH", s.into());
    }
    for (k, v) in extra {
        match v {
            Some(v) => set(k, v.clone()),
            None => {
                if let Some(v) = caller(k) {
                    set(k, v)
                }
            }
        }
    }
    env
}

/// Kills QEMU on every way out of [`run`] (errors, panics).
struct QemuGuard(Child);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Puts the local terminal in raw mode for a tty run; restores it on drop.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let orig = tcgetattr(&stdin).ok()?;
        let mut raw = orig.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal(orig))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

fn winsize() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a `winsize` into the valid local `ws`.
    let r = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    (r == 0).then_some((ws.ws_row, ws.ws_col))
}

fn read_console(f: &mut File) -> String {
    let mut s = Vec::new();
    let _ = f.rewind();
    let _ = f.read_to_end(&mut s);
    String::from_utf8_lossy(&s).into_owned()
}

fn print_console(f: &mut File, why: &str) {
    eprintln!("fcvm-testhost: ---- L1 console ({why}) ----");
    // QEMU warns once per vCPU about EPYC features TCG lacks: noise, not news.
    for l in read_console(f)
        .lines()
        .filter(|l| !l.contains("TCG doesn't support requested feature"))
    {
        eprintln!("{l}");
    }
    eprintln!("fcvm-testhost: ---- end of L1 console ----");
}

/// Creates the sparse scratch image, formats it btrfs on the host (fast: no emulation), opens
/// it and unlinks it, so nothing remains on disk once QEMU and we are gone.
fn scratch_image(dir: &std::path::Path, gib: u64) -> Result<(OwnedFd, OwnedFd)> {
    let mkfs = find_program("mkfs.btrfs", "btrfs-progs")?;
    let p = dir.join("scratch.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(Error::io("creating", &p))?;
    let res = (|| {
        f.set_len(gib << 30)
            .map_err(Error::io("sizing the scratch image", &p))?;
        run_checked(
            std::process::Command::new(&mkfs)
                .args(["-q", "-f", "-L", "fcvm-scratch"])
                .arg(&p),
            "mkfs.btrfs (formatting the scratch disk)",
        )?;
        Ok(())
    })();
    // QEMU's fd sets hand out a descriptor whose access mode matches each open it does, and it
    // opens the image read-only as well as read-write: give it one of each.
    let ro = res.and_then(|()| File::open(&p).map_err(Error::io("opening", &p)));
    let _ = fs::remove_file(&p);
    ro.map(|ro| (OwnedFd::from(f), OwnedFd::from(ro)))
}

fn accept_with_timeout(
    listener: &UnixListener,
    qemu: &mut Child,
    console: &mut File,
) -> Result<UnixStream> {
    listener
        .set_nonblocking(true)
        .map_err(Error::io("configuring", "control socket"))?;
    let t0 = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(Error::io("configuring", "control socket"))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::io("accepting on", "control socket")(e)),
        }
        if let Ok(Some(st)) = qemu.try_wait() {
            print_console(console, "QEMU exited at start-up");
            return Err(Error::Vm(format!("QEMU exited at start-up ({st})")));
        }
        if t0.elapsed() > CONNECT_TIMEOUT {
            print_console(console, "QEMU did not connect");
            return Err(Error::Vm(format!(
                "QEMU did not connect its control port within {} s",
                CONNECT_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

type Sender = Arc<dyn Fn(&Frame) -> bool + Send + Sync>;

/// Our stdin -> Stdin frames, then StdinEof. The thread may stay blocked in read(2) after the
/// run; the process exits without joining it.
fn spawn_stdin_pump(send: Sender) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => {
                    send(&Frame::StdinEof);
                    break;
                }
                Ok(n) => {
                    if !send(&Frame::Stdin(buf[..n].to_vec())) {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    send(&Frame::StdinEof);
                    break;
                }
            }
        }
    });
}

/// Takes the blocked signals synchronously: SIGWINCH -> Resize; SIGINT/TERM/HUP -> forwarded
/// to the command (before the command has started: abort at once). If the command has not ended SIGNAL_GRACE after the first one, or on a
/// second one, the control connection is shut down (`abort`): the relay loop ends, QEMU is
/// killed by its owner and we exit 128+signal. Returns the last signal received (0: none).
fn spawn_signal_relay(
    sigs: SigSet,
    send: Sender,
    abort: UnixStream,
    started: Arc<AtomicBool>,
) -> Arc<AtomicI32> {
    let got_signal = Arc::new(AtomicI32::new(0));
    let got = got_signal.clone();
    let abort = Arc::new(abort);
    std::thread::spawn(move || loop {
        let Ok(sig) = sigs.wait() else { continue };
        if sig == Signal::SIGWINCH {
            if let Some((r, c)) = winsize() {
                send(&Frame::Resize(r, c));
            }
            continue;
        }
        let first = got.swap(sig as i32, Ordering::SeqCst) == 0;
        if !started.load(Ordering::SeqCst) {
            // Still booting: no command to tell, and booting on only to kill it is a waste.
            let _ = abort.shutdown(std::net::Shutdown::Both);
            continue;
        }
        send(&Frame::Signal(sig as i32));
        if first {
            let abort = abort.clone();
            std::thread::spawn(move || {
                std::thread::sleep(SIGNAL_GRACE);
                let _ = abort.shutdown(std::net::Shutdown::Both);
            });
        } else {
            let _ = abort.shutdown(std::net::Shutdown::Both);
        }
    });
    got_signal
}

/// Guest frames -> our stdout/stderr until the exit status. Returns (exit status, protocol
/// error); both `None` when the connection just ended (QEMU died or we aborted).
fn relay(
    mut reader: UnixStream,
    v: bool,
    t_start: Instant,
    t_qemu: Instant,
    send: &Sender,
    started: &AtomicBool,
) -> (Option<i32>, Option<String>) {
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    let result = loop {
        match read_frame(&mut reader) {
            Ok(Some(Frame::Started)) => {
                started.store(true, Ordering::SeqCst);
                vlog(
                    v,
                    format!(
                        "L1 boot to CMD start: {} ms (QEMU start {} ms after fcvm-testhost start)",
                        ms(t_qemu.elapsed()),
                        ms(t_qemu.duration_since(t_start))
                    ),
                );
            }
            Ok(Some(Frame::Stdout(d))) => {
                // A closed stdout (e.g. `| head`) is not our failure: keep draining.
                let _ = stdout.write_all(&d).and_then(|()| stdout.flush());
            }
            Ok(Some(Frame::Stderr(d))) => {
                let _ = stderr.write_all(&d);
            }
            Ok(Some(Frame::Message(m))) => {
                let _ = stdout.flush();
                let _ = stderr.write_all(m.as_bytes());
            }
            Ok(Some(Frame::Exit(code))) => {
                send(&Frame::Bye);
                break (Some(code), None);
            }
            Ok(Some(other)) => {
                break (
                    None,
                    Some(format!("unexpected frame from the guest: {other:?}")),
                )
            }
            // The connection dropping (QEMU died) is reported by the caller with the console.
            Ok(None) | Err(crate::proto::ProtoError::Io(_)) => break (None, None),
            Err(e) => break (None, Some(e.to_string())),
        }
    };
    let _ = stdout.flush();
    result
}

/// Runs the command in a fresh emulated KVM host; returns its exit status.
pub fn run(opts: &Options) -> Result<i32> {
    let v = opts.verbose;
    let t_start = Instant::now();
    if opts.argv.is_empty() {
        return Err(Error::Usage(
            "no command given (fcvm-testhost run -- CMD ...)".into(),
        ));
    }
    if opts.cpus == 0 || opts.mem_mib < 256 {
        return Err(Error::Usage("--cpus must be >= 1 and --mem >= 256".into()));
    }
    let qemu_bin = find_program("qemu-system-x86_64", "qemu-system-x86")?;
    if let Some(avail) = mem_available_mib() {
        if avail < opts.mem_mib + QEMU_OVERHEAD_MIB {
            return Err(Error::NotEnoughMemory {
                want_mib: opts.mem_mib + QEMU_OVERHEAD_MIB,
                avail_mib: avail,
            });
        }
    }
    let runner =
        std::env::current_exe().map_err(Error::io("finding", "the fcvm-testhost binary"))?;
    let workers = std::env::var("FCVM_TESTHOST_MODLOAD_WORKERS")
        .ok()
        .and_then(|w| w.parse().ok());
    let append = qemu::kernel_cmdline(&runner, v, workers)?;

    let cache = cache_dir();
    let t = Instant::now();
    let (k, src) = kernel::ensure(&cache)?;
    vlog(
        v,
        format!(
            "kernel {} {}: {} ms ({})",
            kernel::PACKAGE,
            kernel::VERSION,
            ms(t.elapsed()),
            match src {
                kernel::Source::Cached => "cache hit",
                kernel::Source::Fetched => "fetched",
            }
        ),
    );
    let t = Instant::now();
    let initrd = initramfs::ensure(&cache, &k, modules::WANTED)?;
    vlog(
        v,
        format!(
            "initramfs: {} ms ({})",
            ms(t.elapsed()),
            if initrd.cached { "cache hit" } else { "built" }
        ),
    );
    for m in &initrd.missing_optional {
        vlog(v, format!("warning: optional kernel module missing: {m}"));
    }

    let mut shares = Vec::new();
    for (i, (p, rw)) in opts.shares.iter().enumerate() {
        let c = fs::canonicalize(p).map_err(Error::io("--share", p))?;
        if !c.is_dir() {
            return Err(Error::Usage(format!(
                "--share {}: not a directory",
                p.display()
            )));
        }
        shares.push(Share {
            path: c,
            tag: format!("share{i}"),
            rw: *rw,
        });
    }
    let scratch_dir = (opts.scratch_gib > 0).then(|| "/scratch".to_string());
    let env = build_env(|k| std::env::var(k).ok(), &opts.env, scratch_dir.as_deref());
    let cwd = std::env::current_dir()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "/".into());
    let tty = nix::unistd::isatty(0).unwrap_or(false);

    let rundir = RunDir::create()?;
    let t = Instant::now();
    let scratch = match opts.scratch_gib {
        0 => None,
        g => Some(scratch_image(&rundir.path, g)?),
    };
    if scratch.is_some() {
        vlog(
            v,
            format!(
                "scratch disk ({} GiB btrfs): {} ms",
                opts.scratch_gib,
                ms(t.elapsed())
            ),
        );
    }
    let console_path = rundir.path.join("console.log");
    let mut console = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&console_path)
        .map_err(Error::io("creating", &console_path))?;
    let ctl_path = rundir.path.join("ctl.sock");
    let listener = UnixListener::bind(&ctl_path).map_err(Error::io("binding", &ctl_path))?;

    let cfg = qemu::Config {
        run_id: rundir.id.clone(),
        cpus: opts.cpus,
        mem_mib: opts.mem_mib,
        kernel: k.vmlinux.clone().unwrap_or_else(|| k.vmlinuz.clone()),
        initrd: initrd.path.clone(),
        append,
        shares: shares.clone(),
        scratch_fd: scratch.as_ref().map(|_| SCRATCH_FD),
        ctl_socket: ctl_path.clone(),
    };
    if v {
        vlog(
            v,
            format!("{} {}", qemu_bin.display(), qemu::args(&cfg).join(" ")),
        );
    }

    // Signals are taken synchronously by one thread (sigwait); block them before any thread
    // exists so that every thread inherits the mask. QEMU gets a clean mask (std resets it).
    let mut sigs = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGWINCH,
    ] {
        sigs.add(s);
    }
    sigs.thread_block()
        .map_err(|e| Error::Vm(format!("blocking signals: {e}")))?;

    let t_qemu = Instant::now();
    let console_for_qemu = console
        .try_clone()
        .map_err(Error::io("duplicating", &console_path))?;
    // Spawned from this thread, which lives for the whole run (PR_SET_PDEATHSIG is per thread).
    let child = qemu::spawn(&qemu_bin, &cfg, console_for_qemu, scratch)?;
    let mut qemu_guard = QemuGuard(child);
    let _ = fs::remove_file(&console_path);
    let stream = accept_with_timeout(&listener, &mut qemu_guard.0, &mut console)?;
    drop(listener);
    let _ = fs::remove_file(&ctl_path);
    drop(rundir);
    vlog(
        v,
        format!(
            "QEMU start to control port connected: {} ms",
            ms(t_qemu.elapsed())
        ),
    );

    let writer = Arc::new(Mutex::new(
        stream
            .try_clone()
            .map_err(Error::io("duplicating", "control socket"))?,
    ));
    let send: Sender = Arc::new(move |f: &Frame| -> bool {
        let mut g = writer.lock().unwrap_or_else(|p| p.into_inner());
        f.write_to(&mut *g).is_ok()
    });
    let start = Start {
        version: crate::proto::PROTOCOL_VERSION,
        argv: opts.argv.clone(),
        env,
        cwd,
        tty,
        winsize: if tty { winsize() } else { None },
        shares: shares
            .iter()
            .map(|s| ShareMount {
                tag: s.tag.clone(),
                path: s.path.to_string_lossy().into_owned(),
                rw: s.rw,
            })
            .collect(),
        scratch: scratch_dir,
        verbose: v,
    };
    if !send(&Frame::Start(start)) {
        print_console(&mut console, "control port closed");
        return Err(Error::Vm("the control port closed before the start".into()));
    }

    let raw_term = if tty { RawTerminal::enter() } else { None };

    spawn_stdin_pump(send.clone());
    let abort = stream
        .try_clone()
        .map_err(Error::io("duplicating", "control socket"))?;
    let started = Arc::new(AtomicBool::new(false));
    let got_signal = spawn_signal_relay(sigs, send.clone(), abort, started.clone());

    let (exit, proto_err) = relay(stream, v, t_start, t_qemu, &send, &started);
    drop(raw_term);

    // After the exit status L1 powers off by itself; otherwise (QEMU died, protocol error,
    // abort on a signal) there is nothing to wait for.
    let t = Instant::now();
    let mut qemu_status = None;
    if exit.is_some() {
        while t.elapsed() < POWEROFF_TIMEOUT {
            if let Ok(Some(st)) = qemu_guard.0.try_wait() {
                qemu_status = Some(st);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match qemu_status {
            Some(_) => vlog(
                v,
                format!("exit status to QEMU exit: {} ms", ms(t.elapsed())),
            ),
            None => vlog(v, "L1 did not power off in time: killing QEMU"),
        }
    } else {
        qemu_status = qemu_guard.0.try_wait().ok().flatten();
    }
    drop(qemu_guard);
    vlog(v, format!("total: {} ms", ms(t_start.elapsed())));

    let sig = got_signal.load(Ordering::SeqCst);
    match exit {
        Some(code) => {
            if v {
                print_console(&mut console, "-v");
            }
            Ok(code)
        }
        None if sig != 0 => {
            if v {
                print_console(&mut console, "interrupted");
            }
            eprintln!("fcvm-testhost: interrupted by signal {sig}; L1 stopped");
            Ok(128 + sig)
        }
        None => {
            print_console(&mut console, "failure");
            Err(Error::Vm(match proto_err {
                Some(e) => format!("the guest runner broke the control protocol: {e}"),
                None => format!(
                    "L1 ended before the command's exit status arrived (QEMU: {})",
                    qemu_status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "killed".into())
                ),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_is_clean_and_explicit() {
        let caller = |k: &str| match k {
            "PATH" => Some("/p".to_string()),
            "TERM" => Some("xterm".to_string()),
            "SECRET" => Some("s".to_string()),
            "FOO" => Some("caller-foo".to_string()),
            _ => None,
        };
        let env = build_env(
            caller,
            &[
                ("FOO".into(), None),
                ("BAR".into(), Some("b=c".into())),
                ("UNSET".into(), None),
                ("HOME".into(), Some("/h".into())),
            ],
            Some("/scratch"),
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some("/p"));
        assert_eq!(get("TERM"), Some("xterm"));
        assert_eq!(get("CI"), None);
        assert_eq!(get("SECRET"), None);
        assert_eq!(get("FOO"), Some("caller-foo"));
        assert_eq!(get("BAR"), Some("b=c"));
        assert_eq!(get("UNSET"), None);
        assert_eq!(get("HOME"), Some("/h"));
        assert_eq!(get("FCVM_TESTHOST_SCRATCH"), Some("/scratch"));
        assert_eq!(env.iter().filter(|(n, _)| n == "HOME").count(), 1);
    }
}
