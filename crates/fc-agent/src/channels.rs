//! The agent's connections to the host (status, container output, container input) and
//! their reconnection after a snapshot.
//!
//! Firecracker resets every vsock connection of a VM it snapshots: it queues
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` while the VM is paused, and the guest handles it at
//! the next resume, in the VM that was snapshotted and in every VM restored from the
//! snapshot. The guest's sockets then fail every read and write (listening sockets, such as
//! the exec server's, survive), while the host's end may stay open with nobody behind it.
//! So the host accepts a new connection on each listener at any time and the newest one
//! wins; here, whoever notices the reset first (the status watcher blocked in a read, or a
//! write of status or output) connects every channel again, once per reset: a generation
//! count tells the others to pick up the new connections instead of reconnecting again.
//!
//! Before the container's streams are open (the image cache's wait for Proceed) only the
//! status channel exists and is reconnected, and the host learns of it by ImageReady; once
//! they are open a reconnection also says [`Status::Reconnected`], which the host answers
//! with [`Status::Resync`] (clock and entropy).

use std::io::Write;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use fcvm_proto::status::Status;
use fcvm_proto::vsock::{INPUT_PORT, OUTPUT_PORT, STATUS_PORT};

use crate::vsock::{Conn, Vsock, VsockError};

/// How long to wait for the host's listeners after a reset.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The channels and their generation.
pub struct Channels {
    vsock: Vsock,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Bumped by every reconnection.
    gen: u64,
    status: Option<Conn>,
    output: Option<Conn>,
    input: Option<Conn>,
    /// Whether the container's output (and input) channels were opened.
    output_open: bool,
    input_open: bool,
}

impl Channels {
    /// No connection yet.
    pub fn new(vsock: Vsock) -> Self {
        Channels {
            vsock,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first status connection (a missing host only costs the messages).
    pub fn connect_status(&self, timeout: Duration) {
        match self.vsock.connect(STATUS_PORT, timeout) {
            Ok(c) => self.lock().status = Some(c),
            Err(e) => crate::info!("no status connection: {e}"),
        }
    }

    /// Opens the container's output channel and, with `input`, its input channel; returns
    /// them with their generation.
    pub fn open_streams(
        &self,
        input: bool,
        timeout: Duration,
    ) -> Result<(u64, Conn, Option<Conn>), VsockError> {
        let output = self.vsock.connect(OUTPUT_PORT, timeout)?;
        let input = if input {
            Some(self.vsock.connect(INPUT_PORT, timeout)?)
        } else {
            None
        };
        let mut g = self.lock();
        g.output = output.try_clone().ok();
        g.input = input.as_ref().and_then(|c| c.try_clone().ok());
        g.output_open = true;
        g.input_open = input.is_some();
        Ok((g.gen, output, input))
    }

    /// Sends a status message; after a failed write the channels are reconnected and the
    /// message is sent once more.
    pub fn send_status(&self, s: &Status) {
        let bytes = s.encode();
        let gen = {
            let mut g = self.lock();
            let Some(c) = g.status.as_mut() else { return };
            match c.write_all(&bytes) {
                Ok(()) => return,
                Err(e) => crate::info!("status port write failed ({e}): reconnecting"),
            }
            g.gen
        };
        if self.reconnect(gen) {
            let mut g = self.lock();
            if let Some(c) = g.status.as_mut() {
                if let Err(e) = c.write_all(&bytes) {
                    crate::info!("status port write failed again: {e}");
                }
            }
        }
    }

    /// A reading handle on the current status connection and its generation.
    pub fn status_reader(&self) -> (u64, Option<Conn>) {
        let g = self.lock();
        (g.gen, g.status.as_ref().and_then(|c| c.try_clone().ok()))
    }

    /// The output connection newer than generation `seen`: after a reconnection by someone
    /// else that one, else this caller reconnects. `None` when the host cannot be reached.
    pub fn output_after(&self, seen: u64) -> Option<(u64, Conn)> {
        self.stream_after(seen, |g| g.output.as_ref())
    }

    /// As [`Channels::output_after`], for the input connection.
    pub fn input_after(&self, seen: u64) -> Option<(u64, Conn)> {
        self.stream_after(seen, |g| g.input.as_ref())
    }

    fn stream_after(&self, seen: u64, pick: fn(&Inner) -> Option<&Conn>) -> Option<(u64, Conn)> {
        let current = self.lock().gen;
        if current == seen && !self.reconnect(seen) {
            return None;
        }
        let g = self.lock();
        let c = pick(&g)?.try_clone().ok()?;
        Some((g.gen, c))
    }

    /// Connects every open channel again, unless that happened since generation `seen`.
    /// Returns whether the channels are newer than `seen` now.
    pub fn reconnect(&self, seen: u64) -> bool {
        let mut g = self.lock();
        if g.gen != seen {
            return true;
        }
        let mut status = match self.vsock.connect(STATUS_PORT, RECONNECT_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                crate::info!("cannot reconnect the status channel: {e}");
                return false;
            }
        };
        if g.output_open {
            // The host answers with Resync (read by the status watcher).
            if let Err(e) = status.write_all(&Status::Reconnected.encode()) {
                crate::info!("status port write failed right after reconnecting: {e}");
            }
        }
        g.status = Some(status);
        if g.output_open {
            g.output = self
                .vsock
                .connect(OUTPUT_PORT, RECONNECT_TIMEOUT)
                .map_err(|e| crate::info!("cannot reconnect the output channel: {e}"))
                .ok();
        }
        if g.input_open {
            g.input = self
                .vsock
                .connect(INPUT_PORT, RECONNECT_TIMEOUT)
                .map_err(|e| crate::info!("cannot reconnect the input channel: {e}"))
                .ok();
        }
        g.gen += 1;
        crate::info!("channels reconnected (generation {})", g.gen);
        true
    }
}

/// A writer of the container's output that follows the reconnections of [`Channels`].
pub struct OutputRenewer {
    channels: std::sync::Arc<Channels>,
    gen: u64,
}

impl OutputRenewer {
    /// Starting from the connection of generation `gen`.
    pub fn new(channels: std::sync::Arc<Channels>, gen: u64) -> Self {
        OutputRenewer { channels, gen }
    }

    /// The output connection to use after a write to the current one failed.
    pub fn renew(&mut self) -> Option<Box<dyn Write + Send>> {
        let (gen, c) = self.channels.output_after(self.gen)?;
        self.gen = gen;
        Some(Box::new(c))
    }
}
