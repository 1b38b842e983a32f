//! Child reaping for PID 1.
//!
//! As PID 1 the agent inherits every orphan in the VM (conmon, podman helpers, ...), so one thread
//! calls `waitpid(-1)` for all of them. Processes the agent started itself are registered here and
//! their exit status is handed to whoever waits for them; everything else is reaped and dropped.
//! Nothing else in the agent may call `wait` (std's `Child::wait` would race with this thread).

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

#[derive(Default)]
struct Table {
    /// Exit codes of registered children that have ended, not yet collected.
    done: HashMap<i32, i32>,
    /// Pids a caller will collect.
    watched: HashMap<i32, ()>,
    /// Codes of children that ended before they were registered.
    early: HashMap<i32, i32>,
}

struct Reaper {
    table: Mutex<Table>,
    changed: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

fn reaper() -> &'static Reaper {
    REAPER.get_or_init(|| Reaper {
        table: Mutex::new(Table::default()),
        changed: Condvar::new(),
    })
}

/// Exit code as a shell reports it: the code, or 128 + signal number.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Starts the reaper thread. Call once, before spawning children.
pub fn start() {
    reaper();
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(reap_loop)
        .map(drop)
        .unwrap_or_else(|e| crate::info!("cannot start the reaper thread: {e}"));
}

/// Held (shared) while std spawns a child. std itself reaps a child whose exec failed, so the
/// reaper must not reap a pid before `spawn` returned; it takes this lock exclusively first.
static SPAWNING: RwLock<()> = RwLock::new(());

/// Blocks until some child has exited, without reaping it; returns its pid.
fn wait_any_exited() -> Result<i32, Errno> {
    // SAFETY: siginfo_t is plain data; all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes one siginfo_t through a valid pointer.
    let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
    if rc < 0 {
        return Err(Errno::last());
    }
    // SAFETY: waitid filled in a SIGCHLD siginfo, for which si_pid is valid.
    Ok(unsafe { info.si_pid() })
}

fn reap_loop() {
    loop {
        let pid = match wait_any_exited() {
            Ok(pid) => pid,
            Err(Errno::ECHILD) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                crate::info!("waitid failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let guard = SPAWNING.write().unwrap_or_else(|p| p.into_inner());
        let res = waitpid(
            Pid::from_raw(pid),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        drop(guard);
        // An error means std already reaped it (a failed exec).
        if let Ok(status) = res {
            let (Some(pid), Some(code)) = (status.pid(), exit_code(status)) else {
                continue;
            };
            let r = reaper();
            let mut t = r.table.lock().unwrap_or_else(|p| p.into_inner());
            if t.watched.remove(&pid.as_raw()).is_some() {
                t.done.insert(pid.as_raw(), code);
            } else {
                // Either an orphan or a child not registered yet; keep a bounded record.
                if t.early.len() > 4096 {
                    t.early.clear();
                }
                t.early.insert(pid.as_raw(), code);
            }
            r.changed.notify_all();
        }
    }
}

/// A child started through [`spawn`]; collect it with [`Watched::wait`].
#[derive(Debug, Clone, Copy)]
pub struct Watched {
    pid: i32,
}

impl Watched {
    /// Process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.pid)
    }

    /// Whether the child has ended (without collecting its code).
    pub fn has_exited(&self) -> bool {
        let t = reaper().table.lock().unwrap_or_else(|p| p.into_inner());
        t.done.contains_key(&self.pid)
    }

    /// Blocks until the child ends; returns its exit code.
    pub fn wait(&self) -> i32 {
        self.wait_timeout(None).unwrap_or(-1)
    }

    /// Waits at most `timeout` (forever with `None`); `None` if it is still running.
    pub fn wait_timeout(&self, timeout: Option<Duration>) -> Option<i32> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let r = reaper();
        let mut t = r.table.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(code) = t.done.remove(&self.pid) {
                return Some(code);
            }
            match deadline {
                None => t = r.changed.wait(t).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    t = r
                        .changed
                        .wait_timeout(t, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

/// Registers an already spawned child.
pub fn watch(child: &Child) -> Watched {
    let pid = child.id() as i32;
    let r = reaper();
    let mut t = r.table.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(code) = t.early.remove(&pid) {
        t.done.insert(pid, code);
    } else {
        t.watched.insert(pid, ());
    }
    Watched { pid }
}

/// Spawns `cmd` and registers it. The returned `Child` gives access to its pipes; never call
/// its `wait`.
pub fn spawn(cmd: &mut Command) -> std::io::Result<(Child, Watched)> {
    use std::os::unix::process::CommandExt;
    // The agent blocks SIGINT/SIGTERM in all its threads (see `agent::run`) and std does not
    // reset the mask for children: without this, commands could not be interrupted.
    // SAFETY: sigemptyset and sigprocmask are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let guard = SPAWNING.read().unwrap_or_else(|p| p.into_inner());
    let child = cmd.spawn()?;
    let w = watch(&child);
    drop(guard);
    Ok((child, w))
}

/// Result of [`run`].
#[derive(Debug)]
pub struct Output {
    /// Exit code.
    pub code: i32,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
}

/// Runs `cmd` to completion capturing its output (stdin is /dev/null).
pub fn run(cmd: &mut Command) -> std::io::Result<Output> {
    run_lines(cmd, |_| {})
}

/// [`run`], handing each line of the child's standard error to `on_line` as it comes (a line
/// ends at `\n` or `\r`, so a redrawn progress line counts too; empty ones are skipped). The
/// whole standard error is still returned.
pub fn run_lines(cmd: &mut Command, mut on_line: impl FnMut(&str)) -> std::io::Result<Output> {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, w) = spawn(cmd)?;
    let mut out_pipe = child.stdout.take();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_string(&mut s);
        }
        s
    });
    let mut stderr = String::new();
    if let Some(p) = child.stderr.take() {
        let mut r = BufReader::new(p);
        let mut chunk = Vec::new();
        // Split on '\n'; a chunk may hold several '\r'-separated redraws.
        while r.read_until(b'\n', &mut chunk).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&chunk);
            stderr.push_str(&text);
            for line in text.split(['\n', '\r']).map(str::trim_end) {
                if !line.trim().is_empty() {
                    on_line(line);
                }
            }
            chunk.clear();
        }
    }
    let stdout = out_thread.join().unwrap_or_default();
    Ok(Output {
        code: w.wait(),
        stdout,
        stderr,
    })
}
