//! Running a command with its standard streams relayed as frames.
//!
//! Shared by the container run and the exec server. A process gets either pipes (stdout and
//! stderr stay separate) or a pseudo-terminal (one output stream; the process is a session
//! leader with the terminal as its controlling tty, so resizes raise SIGWINCH in it and Ctrl-C
//! typed by the user becomes SIGINT through the line discipline).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fcvm_proto::frame::{write_frame, Frame, WindowSize, CHUNK};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::pty::{openpty, Winsize};
use nix::sys::signal::{kill, Signal};

use crate::reaper::{self, Watched};

/// Errors starting a process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Creating the pseudo-terminal failed.
    #[error("Cannot allocate a pseudo-terminal: {0}")]
    Pty(nix::Error),
    /// The command could not be started.
    #[error("Cannot start {program}: {source}")]
    Spawn {
        /// Program name.
        program: String,
        /// Cause.
        source: io::Error,
    },
}

nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, Winsize);

fn winsize(ws: WindowSize) -> Winsize {
    Winsize {
        ws_row: ws.rows,
        ws_col: ws.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Where frames go: a shared connection, dropped after the first write error (the host left;
/// the process keeps running and its output is discarded), unless the sink can dial its
/// connection again ([`FrameSink::redialing`]).
#[derive(Clone, Default)]
pub struct FrameSink {
    conn: Arc<Mutex<Option<Box<dyn Write + Send>>>>,
    redial: Option<Arc<crate::rewire::Redial>>,
}

impl FrameSink {
    /// A sink writing to `w`.
    pub fn new(w: impl Write + Send + 'static) -> Self {
        Self {
            conn: Arc::new(Mutex::new(Some(Box::new(w)))),
            redial: None,
        }
    }

    /// A sink on a vsock connection that a snapshot restore may reset: a write that fails
    /// dials again with `redial` and sends the whole frame once more on the new connection
    /// (a frame never straddles two connections).
    pub fn redialing(redial: crate::rewire::Redial) -> io::Result<Self> {
        let first = redial.dial()?;
        Ok(Self {
            conn: Arc::new(Mutex::new(Some(Box::new(first)))),
            redial: Some(Arc::new(redial)),
        })
    }

    /// Sends one frame; returns false if the sink is gone.
    pub fn send(&self, frame: &Frame) -> bool {
        let mut g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = g.as_mut() else { return false };
        if let Err(e) = write_frame(w, frame) {
            crate::debug!("frame sink closed: {e}");
            *g = None;
            let Some(r) = &self.redial else { return false };
            *g = r.redial();
            let Some(w) = g.as_mut() else { return false };
            if let Err(e) = write_frame(w, frame) {
                crate::info!("frame sink closed after redialing: {e}");
                *g = None;
                return false;
            }
        }
        true
    }

    /// Dials again if the connection was reset (a restore): called when the status channel
    /// found itself reset, so a container that writes nothing after a restore still has its
    /// output connection (the host waits for it to close at the end).
    pub fn renew_if_reset(&self) {
        let Some(r) = &self.redial else { return };
        let mut g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_some() && r.is_reset() {
            *g = r.redial();
        }
    }

    /// Drops the connection (the peer sees end of stream once all clones are gone).
    pub fn close(&self) {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(r) = &self.redial {
            r.close();
        }
    }
}

enum Input {
    Pipe(Option<std::process::ChildStdin>),
    Pty(File),
    None,
}

/// A running process whose output is being pumped into a [`FrameSink`].
pub struct Running {
    watched: Watched,
    input: Mutex<Input>,
    /// Terminal master, for resizes.
    pty: Option<File>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
    /// Set once the exit code was collected: the pid may be reused after that.
    exited: AtomicBool,
}

/// How to start a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdioMode {
    /// Use a pseudo-terminal.
    pub tty: bool,
    /// Keep stdin open for input frames.
    pub interactive: bool,
    /// Initial terminal size.
    pub size: Option<WindowSize>,
}

fn cloexec(fd: &impl AsRawFd) {
    let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
}

/// Starts `cmd` and begins relaying its output to `sink` as Stdout/Stderr frames.
pub fn start(mut cmd: Command, mode: StdioMode, sink: &FrameSink) -> Result<Running, ProcessError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let spawn_err = |source| ProcessError::Spawn {
        program: program.clone(),
        source,
    };
    if mode.tty {
        let ws = winsize(mode.size.unwrap_or(WindowSize { rows: 24, cols: 80 }));
        let pty = openpty(Some(&ws), None).map_err(ProcessError::Pty)?;
        cloexec(&pty.master);
        cloexec(&pty.slave);
        let slave: OwnedFd = pty.slave;
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|e| ProcessError::Spawn {
                program: program.clone(),
                source: e,
            })
        };
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (_child, watched) = reaper::spawn(&mut cmd).map_err(spawn_err)?;
        // `cmd` still owns the parent's copies of the slave; dropping it lets the master see EIO
        // once the process and its children have closed the terminal.
        drop(cmd);
        let master = File::from(pty.master);
        let reader = master.try_clone().map_err(spawn_err)?;
        let writer = master.try_clone().map_err(spawn_err)?;
        let pump = pump(reader, sink.clone(), Frame::Stdout);
        Ok(Running {
            watched,
            input: Mutex::new(Input::Pty(writer)),
            pty: Some(master),
            pumps: Mutex::new(vec![pump]),
            exited: AtomicBool::new(false),
        })
    } else {
        cmd.stdin(if mode.interactive {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let (mut child, watched) = reaper::spawn(&mut cmd).map_err(spawn_err)?;
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, sink.clone(), Frame::Stdout));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, sink.clone(), Frame::Stderr));
        }
        let input = match child.stdin.take() {
            Some(s) => Input::Pipe(Some(s)),
            None => Input::None,
        };
        Ok(Running {
            watched,
            input: Mutex::new(input),
            pty: None,
            pumps: Mutex::new(pumps),
            exited: AtomicBool::new(false),
        })
    }
}

fn pump(
    mut from: impl Read + Send + 'static,
    sink: FrameSink,
    make: fn(Vec<u8>) -> Frame,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from.read(&mut buf) {
                // EIO on a terminal master means every slave handle is closed.
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sink.send(&make(buf[..n].to_vec()));
                }
            }
        }
    })
}

impl Running {
    /// Applies one input frame (Stdin, Eof, Resize, Signal); other frames are ignored.
    pub fn input(&self, frame: Frame) {
        match frame {
            Frame::Stdin(data) => {
                let mut g = self.input.lock().unwrap_or_else(|p| p.into_inner());
                let res = match &mut *g {
                    Input::Pipe(Some(p)) => p.write_all(&data),
                    Input::Pty(m) => m.write_all(&data),
                    _ => Ok(()),
                };
                if let Err(e) = res {
                    crate::debug!("stdin write failed: {e}");
                }
            }
            Frame::Eof => {
                let mut g = self.input.lock().unwrap_or_else(|p| p.into_inner());
                match &mut *g {
                    Input::Pipe(p) => drop(p.take()),
                    // A terminal has no end of file; VEOF (Ctrl-D) is what a user would type.
                    Input::Pty(m) => drop(m.write_all(&[4])),
                    Input::None => {}
                }
            }
            Frame::Resize(ws) => {
                if let Some(m) = &self.pty {
                    // SAFETY: TIOCSWINSZ reads one Winsize from a valid pointer; the fd is ours.
                    if let Err(e) = unsafe { set_winsize(m.as_raw_fd(), &winsize(ws)) } {
                        crate::debug!("resize failed: {e}");
                    }
                }
            }
            Frame::Signal(n) => self.signal(n),
            other => crate::debug!("ignoring unexpected input frame {other:?}"),
        }
    }

    /// Sends signal number `n` to the process.
    pub fn signal(&self, n: i32) {
        if self.exited.load(Ordering::SeqCst) || self.watched.has_exited() {
            return;
        }
        if let Ok(sig) = Signal::try_from(n) {
            let r = kill(self.watched.pid(), sig);
            crate::debug!("{sig} to {}: {r:?}", self.watched.pid());
        }
    }

    /// Waits for the process to end, then up to `drain` for its output to be relayed (a process
    /// may leave children holding the pipes open). Returns the exit code.
    pub fn wait(&self, drain: Duration) -> i32 {
        let code = self.watched.wait();
        self.exited.store(true, Ordering::SeqCst);
        *self.input.lock().unwrap_or_else(|p| p.into_inner()) = Input::None;
        let deadline = Instant::now() + drain;
        let pumps = std::mem::take(&mut *self.pumps.lock().unwrap_or_else(|p| p.into_inner()));
        for p in pumps {
            while !p.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        code
    }
}
