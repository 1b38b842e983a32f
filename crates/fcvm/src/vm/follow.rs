//! Following a running VM: the signals fcvm reacts to, the events that end a VM, and the
//! one console loop that `fcvm run` and `fcvm snapshot run` share (`fcvm podman run`
//! follows the agent's status instead, with the same events).

use std::io::{self, Write};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::process::ProcessRef;

use super::console::ConsoleFollower;
use super::handle::VmHandle;

/// How often the VMM and a clone's page server are checked.
const POLL: Duration = Duration::from_millis(10);

/// SIGINT, SIGTERM and SIGHUP: each asks fcvm to stop its VM in order. SIGHUP (the
/// terminal closed) is handled like SIGTERM, so the container still gets its SIGTERM and
/// nothing is left behind. Register these first: from then on a signal is never a silent
/// death.
#[derive(Debug)]
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    /// Install the handlers.
    pub fn new() -> io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal's number.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}

/// Something that ends (or should end) a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The VMM exited with this code (None: killed by a signal).
    Exited(Option<i32>),
    /// fcvm got this signal.
    Signal(i32),
    /// A clone's page server died: its memory is gone.
    MemorySourceLost(ProcessRef),
}

impl VmHandle {
    /// An event that has already happened, if any (never blocks).
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(status) = self.try_exit() {
            return Some(Event::Exited(status.code()));
        }
        let server = self.record().page_server?;
        (!server.is_alive()).then_some(Event::MemorySourceLost(server))
    }

    /// Wait for the next event. Cancel-safe (usable in `select!`).
    pub async fn next_event(&mut self, signals: &mut Signals) -> Event {
        loop {
            if let Some(e) = self.poll_event() {
                return e;
            }
            tokio::select! {
                sig = signals.recv() => return Event::Signal(sig),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

/// Copy the VM's console to `out` until an event; all console output written before the
/// VMM exited is copied.
pub async fn follow_console(
    handle: &mut VmHandle,
    out: &mut (dyn Write + Send),
    signals: &mut Signals,
) -> io::Result<Event> {
    let mut follower = ConsoleFollower::open(&handle.paths().console_log())?;
    loop {
        copy(&mut follower, out)?;
        if let Some(event) = handle.poll_event() {
            copy(&mut follower, out)?;
            return Ok(event);
        }
        tokio::select! {
            sig = signals.recv() => return Ok(Event::Signal(sig)),
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

fn copy(follower: &mut ConsoleFollower, out: &mut (dyn Write + Send)) -> io::Result<()> {
    let chunk = follower.read_new()?;
    if !chunk.is_empty() {
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(())
}
