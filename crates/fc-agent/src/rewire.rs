//! The running container's host channels across a snapshot restore (the image cache's
//! startup tier restores a VM whose container is already running).
//!
//! A restore resets every vsock connection in the guest (Firecracker sends a transport reset
//! event; connected sockets read as reset and refuse writes). While the container runs, a
//! watcher thread reads the status connection: when it ends, the agent is in a restored VM
//! (or the host left), so it connects to the status port again, dials the output port again
//! if that connection was reset, and reports what the new host needs: Ready and the health
//! check's current state. The host answers with Proceed: the agent then sets the clock and
//! reseeds the CRNG from it, as after the image cache's restore ([`crate::resync`]); the rest
//! of that plan is ignored (the container runs already).
//!
//! Only the status and output channels are redialled: a run with an input channel
//! (`-i`/`-t`) or volumes (FUSE) is never snapshotted this way (the host refuses the startup
//! tier for it), and exec connections are the host's to make again.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fcvm_proto::status::{read_status, Status};
use fcvm_proto::vsock::STATUS_PORT;
use nix::sys::socket::MsgFlags;

use crate::agent::StatusSink;
use crate::process::FrameSink;
use crate::vsock::{Conn, Vsock};

/// How long a redial waits for the host's listener (a restored VM's host listens before the
/// VM resumes; a host that left never comes back, so this is what a write then costs once).
const REDIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the watcher waits for a status listener after its connection ended.
const STATUS_REDIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// How to dial one host port again, with a handle on the current connection to tell whether
/// a restore reset it.
pub struct Redial {
    vsock: Vsock,
    port: u32,
    current: Mutex<Option<Conn>>,
    closed: AtomicBool,
}

impl Redial {
    /// Dials host `port` (now and after each reset).
    pub fn new(vsock: Vsock, port: u32) -> Redial {
        Redial {
            vsock,
            port,
            current: Mutex::new(None),
            closed: AtomicBool::new(false),
        }
    }

    /// A new connection (waiting up to [`REDIAL_TIMEOUT`] for the listener).
    pub fn dial(&self) -> io::Result<Conn> {
        let conn = self
            .vsock
            .connect(self.port, REDIAL_TIMEOUT)
            .map_err(io::Error::other)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.try_clone()?);
        Ok(conn)
    }

    /// A new connection as a writer, or `None` when it cannot be had (or the sink closed).
    pub fn redial(&self) -> Option<Box<dyn Write + Send>> {
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        match self.dial() {
            Ok(c) => {
                crate::info!("host port {} dialled again", self.port);
                Some(Box::new(c))
            }
            Err(e) => {
                crate::info!("cannot dial host port {} again: {e}", self.port);
                None
            }
        }
    }

    /// Whether the current connection was reset: a zero-length send fails on a vsock stream
    /// that is no longer connected and does nothing on one that is.
    pub fn is_reset(&self) -> bool {
        let g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().is_some_and(is_reset)
    }

    /// No more redials (the sink was closed on purpose).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

fn is_reset(c: &Conn) -> bool {
    match nix::sys::socket::send(
        c.as_fd().as_raw_fd(),
        &[],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    ) {
        Ok(_) | Err(nix::errno::Errno::EAGAIN) => false,
        Err(e) => {
            crate::debug!("host port connection is gone: {e}");
            true
        }
    }
}

/// What the watcher reports after reconnecting.
pub trait Report: Send + 'static {
    /// The messages a new host needs, in order.
    fn messages(&self) -> Vec<Status>;
}

/// Watches the status connection while the container runs (until `done`); see the module
/// docs.
pub fn watch(
    vsock: Vsock,
    status: StatusSink,
    output: FrameSink,
    report: impl Report,
    done: Arc<AtomicBool>,
) {
    let spawned = std::thread::Builder::new()
        .name("rewire".into())
        .spawn(move || loop {
            if let Some(mut conn) = status.reader() {
                loop {
                    match read_status(&mut conn) {
                        Ok(Some(Status::Proceed(plan))) => {
                            if let Err(e) = crate::resync::after_proceed(&plan) {
                                crate::info!("cannot resync after the restore: {e:#}");
                            }
                        }
                        Ok(Some(other)) => crate::debug!("ignoring status message {other:?}"),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            if done.load(Ordering::SeqCst) {
                return;
            }
            crate::info!("status connection ended while the container runs: reconnecting");
            match vsock.connect(STATUS_PORT, STATUS_REDIAL_TIMEOUT) {
                Ok(c) => status.replace(Some(c)),
                Err(e) => {
                    crate::info!("cannot reconnect to the host's status port: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            }
            output.renew_if_reset();
            for m in report.messages() {
                status.send(&m);
            }
        });
    if let Err(e) = spawned {
        crate::info!("cannot start the channel watcher: {e}");
    }
}
