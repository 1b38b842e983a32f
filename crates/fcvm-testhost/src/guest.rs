//! The guest side: `fcvm-testhost guest-run`, PID 1 inside L1's chroot (the host's root seen
//! through 9p + overlay). Mounts the shares and the scratch disk, runs the command, relays its
//! stdio over the control port and reports its exit status, then powers L1 off.
//!
//! Running the host's own binary here (rather than a shell script in the initramfs) keeps the
//! protocol in one place, in Rust, on both ends.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use crate::proto::{read_frame, Frame, Start, CHUNK};

/// The virtio-serial port name (QEMU `virtserialport,name=`).
pub const PORT_NAME: &str = "fcvm.ctl";
/// Where the scratch disk appears (the only virtio-blk device).
pub const SCRATCH_DEV: &str = "/dev/vda";

type Shared = Arc<Mutex<File>>;

fn send(port: &Shared, f: &Frame) -> bool {
    let mut g = port.lock().unwrap_or_else(|p| p.into_inner());
    f.write_to(&mut *g).is_ok()
}

/// Finds `/dev/vportNpM` for the named port (no udev here, so no `/dev/virtio-ports/` links).
fn find_port(name: &str) -> Option<PathBuf> {
    for e in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let n = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

fn wait_for<T>(what: impl Fn() -> Option<T>, timeout: Duration) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = what() {
            return Some(v);
        }
        if t0.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Progress on the console with L1's uptime, when the kernel command line has `fcvm.verbose=1`.
fn say(msg: &str) {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let v = *VERBOSE.get_or_init(|| {
        fs::read_to_string("/proc/cmdline")
            .map(|c| c.split_whitespace().any(|a| a == "fcvm.verbose=1"))
            .unwrap_or(false)
    });
    if v {
        let up = fs::read_to_string("/proc/uptime").unwrap_or_default();
        let up = up.split_whitespace().next().unwrap_or("?");
        eprintln!("fcvm-testhost guest-run: [{up}] {msg}");
    }
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Only reached when not PID 1 / not permitted: nothing sensible is left to do.
    std::process::exit(125)
}

/// Entry point of `guest-run`. Never returns: ends by powering off L1.
pub fn main() -> ! {
    // This mounts over /proc, /dev, /tmp... and powers the machine off: never on a real host.
    // (/proc is not mounted yet, so: PID 1 holding the module directory /init passes as fd 3.)
    let modules = crate::l1::modules_dir();
    let in_l1 = std::process::id() == 1 && modules.is_some();
    if !in_l1 {
        eprintln!(
            "fcvm-testhost guest-run is internal: it runs as PID 1 inside the emulated host only"
        );
        std::process::exit(125);
    }
    if let Err(e) = crate::l1::mount_system() {
        eprintln!("fcvm-testhost guest-run: {e}");
        power_off();
    }
    crate::l1::tune();
    say("system mounts done");
    // The modules load while we wait for the port and the start frame.
    let loader = modules.map(|dir| {
        std::thread::spawn(move || {
            let list = crate::l1::read_list(&dir)?;
            let workers = fs::read_to_string("/proc/cmdline")
                .ok()
                .and_then(|c| {
                    c.split_whitespace()
                        .find_map(|a| a.strip_prefix("fcvm.modload_workers=")?.parse().ok())
                })
                // One loader by default: in parallel, module loading needs more cross-vCPU
                // synchronisation, which under TCG on busy host cores cost 7-8 s instead of
                // 3.7-3.9 s serially (2 workers won only on an idle machine: 1.7 s).
                .unwrap_or(1);
            let r = crate::l1::load_late(dir, list, workers);
            say("late modules loaded");
            r
        })
    });
    let Some(dev) = wait_for(|| find_port(PORT_NAME), Duration::from_secs(20)) else {
        eprintln!("fcvm-testhost guest-run: virtio-serial port {PORT_NAME} not found");
        power_off();
    };
    let file = match OpenOptions::new().read(true).write(true).open(&dev) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fcvm-testhost guest-run: opening {}: {e}", dev.display());
            power_off();
        }
    };
    let mut reader = match file.try_clone() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fcvm-testhost guest-run: {e}");
            power_off();
        }
    };
    say("control port open");
    let port: Shared = Arc::new(Mutex::new(file));
    let start = match read_frame(&mut reader) {
        Ok(Some(Frame::Start(s))) => s,
        other => {
            eprintln!("fcvm-testhost guest-run: expected a Start frame, got {other:?}");
            power_off();
        }
    };
    say("start frame received");
    if start.version != crate::proto::PROTOCOL_VERSION {
        send(
            &port,
            &Frame::Message(format!(
                "fcvm-testhost: the binary inside L1 speaks protocol {} but the host speaks {}: \
                 was fcvm-testhost rebuilt while L1 booted? Run again.\n",
                crate::proto::PROTOCOL_VERSION,
                start.version
            )),
        );
        send(&port, &Frame::Exit(125));
        power_off_after_bye();
    }
    let ready = match loader.map(|h| h.join()) {
        Some(Ok(Ok(warnings))) => {
            if start.verbose {
                for w in warnings {
                    send(
                        &port,
                        &Frame::Message(format!("fcvm-testhost: warning: {w}\n")),
                    );
                }
            }
            Ok(())
        }
        Some(Ok(Err(e))) => Err(e),
        Some(Err(_)) => Err("the module loader panicked".to_string()),
        None => Err("no module directory from /init (fd 3)".to_string()),
    }
    .and_then(|()| {
        if Path::new("/dev/kvm").exists() {
            Ok(())
        } else {
            Err("/dev/kvm is missing inside L1 after loading kvm_amd".to_string())
        }
    });
    let result = match ready {
        Ok(()) => run(&start, &port, reader),
        Err(e) => Err((125, e)),
    };
    let code = match result {
        Ok(c) => c,
        Err((code, msg)) => {
            send(&port, &Frame::Message(format!("fcvm-testhost: {msg}\n")));
            code
        }
    };
    // Data written to rw shares through the page cache must reach the host before it exits.
    nix::unistd::sync();
    send(&port, &Frame::Exit(code));
    // The host answers Bye once it has the status; powering off before that could lose the
    // frame in QEMU's buffers. The host kills QEMU anyway if we hang here.
    power_off_after_bye();
}

static BYE: (Mutex<bool>, std::sync::Condvar) = (Mutex::new(false), std::sync::Condvar::new());

fn power_off_after_bye() -> ! {
    let (m, cv) = &BYE;
    let g = m.lock().unwrap_or_else(|p| p.into_inner());
    let _ = cv.wait_timeout_while(g, Duration::from_secs(5), |bye| !*bye);
    power_off();
}

fn mount_all(start: &Start) -> Result<(), String> {
    for s in &start.shares {
        fs::create_dir_all(&s.path).map_err(|e| format!("creating mount point {}: {e}", s.path))?;
        let mut flags = MsFlags::empty();
        if !s.rw {
            flags |= MsFlags::MS_RDONLY;
        }
        // Read-only shares cache freely; writable ones stay coherent with the host (mmap mode
        // still allows shared mmap).
        let cache = if s.rw { "mmap" } else { "loose" };
        let opts = format!("trans=virtio,version=9p2000.L,msize=512000,cache={cache}");
        mount(
            Some(s.tag.as_str()),
            s.path.as_str(),
            Some("9p"),
            flags,
            Some(opts.as_str()),
        )
        .map_err(|e| format!("mounting share {} ({}): {e}", s.path, s.tag))?;
    }
    if let Some(dir) = &start.scratch {
        fs::create_dir_all(dir).map_err(|e| format!("creating {dir}: {e}"))?;
        if wait_for(
            || Path::new(SCRATCH_DEV).exists().then_some(()),
            Duration::from_secs(10),
        )
        .is_none()
        {
            return Err(format!("scratch disk {SCRATCH_DEV} did not appear"));
        }
        mount(
            Some(SCRATCH_DEV),
            dir.as_str(),
            Some("btrfs"),
            MsFlags::empty(),
            Some("discard=async"),
        )
        .map_err(|e| format!("mounting the scratch disk at {dir}: {e}"))?;
    }
    Ok(())
}

/// The command's stdin side, fed by a dedicated thread so a command that does not read its
/// stdin never stalls the control reader (which must keep handling signals and resizes).
enum StdinMsg {
    Data(Vec<u8>),
    Eof,
}

fn run(start: &Start, port: &Shared, mut reader: File) -> Result<i32, (i32, String)> {
    mount_all(start).map_err(|m| (125, m))?;
    say("shares and scratch mounted");
    let mut cwd = PathBuf::from(&start.cwd);
    if !cwd.is_dir() {
        send(
            port,
            &Frame::Message(format!(
                "fcvm-testhost: warning: working directory {} does not exist inside, using /\n",
                start.cwd
            )),
        );
        cwd = PathBuf::from("/");
    }
    let argv0 = start
        .argv
        .first()
        .ok_or((125, "no command given".to_string()))?;
    let mut cmd = Command::new(argv0);
    cmd.args(&start.argv[1..])
        .env_clear()
        .envs(start.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd);

    // (stdin writer, stdout-ish readers, pty master for resizes)
    let mut master: Option<OwnedFd> = None;
    let child_stdin: Box<dyn Write + Send>;
    let mut outputs: Vec<(Box<dyn Read + Send>, bool)> = Vec::new();
    if start.tty {
        let ws = start.winsize.map(|(r, c)| nix::pty::Winsize {
            ws_row: r,
            ws_col: c,
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        let pty =
            nix::pty::openpty(ws.as_ref(), None).map_err(|e| (125, format!("openpty: {e}")))?;
        set_cloexec(&pty.master);
        let slave = pty.slave;
        let dup = |f: &OwnedFd| f.try_clone().map_err(|e| (125, format!("dup: {e}")));
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        // SAFETY: runs in the forked child before exec; setsid and ioctl are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Make the pty (already on fd 0) the controlling terminal, so ^C and job control
                // work as on a local terminal.
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let m = pty.master;
        child_stdin = Box::new(File::from(
            m.try_clone().map_err(|e| (125, format!("dup: {e}")))?,
        ));
        outputs.push((
            Box::new(File::from(
                m.try_clone().map_err(|e| (125, format!("dup: {e}")))?,
            )),
            true,
        ));
        master = Some(m);
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: runs in the forked child before exec; setsid is async-signal-safe. Its own
        // session makes the command a process group we can signal as a whole.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        child_stdin = Box::new(std::io::sink());
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound => (127, format!("{argv0}: command not found")),
                std::io::ErrorKind::PermissionDenied => {
                    (126, format!("{argv0}: permission denied (not executable)"))
                }
                _ => (126, format!("{argv0}: cannot execute: {e}")),
            })
        }
    };
    // Drop our copies of the slave side held by `cmd`, or the master never sees EOF.
    drop(cmd);
    let pid = child.id() as i32;
    let child_stdin: Box<dyn Write + Send> = match child.stdin.take() {
        Some(s) => Box::new(s),
        None => child_stdin,
    };
    if let Some(o) = child.stdout.take() {
        outputs.push((Box::new(o), true));
    }
    if let Some(e) = child.stderr.take() {
        outputs.push((Box::new(e), false));
    }
    send(port, &Frame::Started);
    say("command started");

    // Output pumps. Each reports on `done` when its stream ends.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let n_outputs = outputs.len();
    for (mut r, is_stdout) in outputs {
        let port = port.clone();
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match r.read(&mut buf) {
                    // EIO: the pty master once every slave fd is closed.
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let d = buf[..n].to_vec();
                        let f = if is_stdout {
                            Frame::Stdout(d)
                        } else {
                            Frame::Stderr(d)
                        };
                        if !send(&port, &f) {
                            break;
                        }
                    }
                }
            }
            let _ = done.send(());
        });
    }
    drop(done_tx);

    // Stdin writer.
    // Bounded (256 frames, up to 8 MiB): a command that never reads its stdin must not make
    // L1 buffer all of the caller's input. When it is full, control frames wait behind it.
    let (in_tx, in_rx) = mpsc::sync_channel::<StdinMsg>(256);
    let tty = start.tty;
    std::thread::spawn(move || {
        let mut w = child_stdin;
        for m in in_rx {
            match m {
                StdinMsg::Data(d) => {
                    if w.write_all(&d).is_err() {
                        // The command closed its stdin: drop further input, as a pipe would.
                        break;
                    }
                }
                StdinMsg::Eof if tty => {
                    // A terminal has no EOF; ^D at the start of a line is the equivalent.
                    let _ = w.write_all(&[4]);
                }
                StdinMsg::Eof => break,
            }
        }
        // Dropping `w` closes the pipe: the command reads EOF.
    });

    // Control reader.
    let master_raw = master.as_ref().map(|m| m.as_raw_fd());
    std::thread::spawn(move || loop {
        match read_frame(&mut reader) {
            Ok(Some(Frame::Stdin(d))) => {
                let _ = in_tx.send(StdinMsg::Data(d));
            }
            Ok(Some(Frame::StdinEof)) => {
                let _ = in_tx.send(StdinMsg::Eof);
            }
            Ok(Some(Frame::Resize(rows, cols))) => {
                if let Some(fd) = master_raw {
                    let ws = libc::winsize {
                        ws_row: rows,
                        ws_col: cols,
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer, which is valid for
                    // the call; `fd` is the pty master, kept open by `master` for the whole run.
                    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
                }
            }
            Ok(Some(Frame::Signal(sig))) => {
                // To the whole process group (the command called setsid), as a terminal would.
                // SAFETY: plain kill(2) on our child's process group.
                unsafe { libc::kill(-pid, sig) };
            }
            Ok(Some(Frame::Bye)) => {
                let (m, cv) = &BYE;
                *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
                cv.notify_all();
            }
            Ok(Some(other)) => {
                eprintln!("fcvm-testhost guest-run: unexpected frame {other:?}");
            }
            Ok(None) | Err(_) => break,
        }
    });

    // As PID 1 we reap every orphan; the command's status is the one that counts.
    let status = loop {
        let mut st = 0;
        // SAFETY: waitpid writes the status into `st`, a valid local.
        let r = unsafe { libc::waitpid(-1, &mut st, 0) };
        if r == pid {
            break std::process::ExitStatus::from_raw(st);
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err((125, "waitpid: lost the command".to_string()));
        }
    };
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(125);
    // Let the output drain. Background processes that inherited stdout would keep it open
    // forever, so wait a bounded time for the streams to end.
    let deadline = Instant::now() + Duration::from_secs(2);
    for _ in 0..n_outputs {
        let left = deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    drop(master);
    Ok(code)
}

fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: fcntl on a descriptor we own; F_GETFD/F_SETFD touch only its flags.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFD);
        if fl >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, fl | libc::FD_CLOEXEC);
        }
    }
}
