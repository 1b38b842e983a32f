//! The host end of a running container: status messages (both ways), output frames and input
//! frames over the hybrid vsock listeners.
//!
//! Output goes to fcvm's own stdout and stderr, kept apart, and nothing else is ever
//! written to stdout, so `fcvm podman run ... > file` captures exactly the container's
//! standard output.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use fcvm_proto::frame::tokio_io::write_frame;
use fcvm_proto::frame::Frame;
use fcvm_proto::status::tokio_io::{read_status, write_status};
use fcvm_proto::status::Status;
use fcvm_proto::vsock::{INPUT_PORT, OUTPUT_PORT, STATUS_PORT};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::tty;
use crate::logs::{LogWriter, Stream};
use crate::vsock::{HostListener, VsockError};

/// The guest-facing listeners, bound before the VM starts.
#[derive(Debug)]
pub struct Listeners {
    status: HostListener,
    output: HostListener,
    input: Option<HostListener>,
}

impl Listeners {
    /// Bind `<uds>_4999`, `<uds>_4997` and, with `-i`/`-t`, `<uds>_4996`.
    pub fn bind(uds: &Path, with_input: bool) -> Result<Listeners, VsockError> {
        Ok(Listeners {
            status: HostListener::bind(uds, STATUS_PORT)?,
            output: HostListener::bind(uds, OUTPUT_PORT)?,
            input: if with_input {
                Some(HostListener::bind(uds, INPUT_PORT)?)
            } else {
                None
            },
        })
    }
}

/// What to feed the input connection.
#[derive(Debug)]
pub struct InputMode {
    /// Forward standard input (`-i`).
    pub stdin: bool,
    /// Forward terminal size changes (`-t`).
    pub resize: bool,
    /// Frames from elsewhere (an attached client's input, in a detached run).
    pub remote: Option<mpsc::UnboundedReceiver<Frame>>,
}

/// Where the container's output goes.
#[derive(Debug)]
pub struct OutputSink {
    /// fcvm's own stdout and stderr (a foreground run).
    pub terminal: bool,
    /// The VM's log (see [`crate::logs`]).
    pub log: Option<LogWriter>,
    /// A terminal attached with `fcvm attach` (detached runs).
    pub attached: Option<Arc<super::attach::AttachHub>>,
}

/// Tasks relaying one container's streams.
pub struct Session {
    /// Status messages in order, from every status connection the agent makes (it
    /// reconnects after a snapshot restore).
    pub status: mpsc::UnboundedReceiver<Status>,
    /// Accepts the agent's status connections.
    status_task: JoinHandle<()>,
    /// The write side of the agent's latest status connection.
    status_writer: Arc<tokio::sync::Mutex<Option<OwnedWriteHalf>>>,
    /// Ends when the agent closes the output connection (all output written).
    pub output: JoinHandle<()>,
    input: Option<JoinHandle<()>>,
    signals: mpsc::UnboundedSender<i32>,
    /// When the first byte of container output arrived.
    pub first_output: Arc<OnceLock<Instant>>,
    /// When the agent connected to the status port (its first sign of life).
    pub agent_connected: Arc<OnceLock<Instant>>,
}

impl Session {
    /// Start relaying.
    pub fn start(listeners: Listeners, input: InputMode, sink: OutputSink) -> Session {
        let (tx, status) = mpsc::unbounded_channel();
        let Listeners {
            status: status_l,
            output: output_l,
            input: input_l,
        } = listeners;
        let agent_connected = Arc::new(OnceLock::new());
        let connected = agent_connected.clone();
        let status_writer = Arc::new(tokio::sync::Mutex::new(None));
        let writer = status_writer.clone();
        // A snapshot resets the agent's connections, and the host's end of a reset one may
        // never learn of it: each new connection replaces the one before (see
        // fc-agent's `channels`).
        let status_task = tokio::spawn(async move {
            let mut reader: Option<JoinHandle<()>> = None;
            while let Ok(conn) = status_l.accept().await {
                let _ = connected.set(Instant::now());
                let (r, w) = conn.into_split();
                *writer.lock().await = Some(w);
                if let Some(old) = reader.take() {
                    old.abort();
                }
                let tx = tx.clone();
                reader = Some(tokio::spawn(async move {
                    relay_status(r, &tx).await;
                }));
            }
        });
        let first_output = Arc::new(OnceLock::new());
        let first = first_output.clone();
        let output = tokio::spawn(relay_output(output_l, first, sink));
        let (signals, signal_rx) = mpsc::unbounded_channel();
        let input = input_l.map(|l| tokio::spawn(relay_input(l, input, signal_rx)));
        Session {
            status,
            status_task,
            status_writer,
            output,
            input,
            signals,
            first_output,
            agent_connected,
        }
    }

    /// Send a message to the agent on its latest status connection.
    pub async fn send_status(&self, s: &Status) -> Result<(), fcvm_proto::status::StatusError> {
        match self.status_writer.lock().await.as_mut() {
            Some(w) => write_status(w, s).await,
            None => Err(fcvm_proto::status::StatusError::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the agent has no status connection",
            ))),
        }
    }

    /// Answer the agent's Reconnected (it was snapshotted or restored): the host's clock and
    /// fresh entropy.
    pub async fn send_resync(&self) {
        let r = fcvm_proto::status::Resync {
            entropy: super::plan::host_entropy()
                .map_err(|e| tracing::warn!("cannot read /dev/urandom for the guest: {e}"))
                .ok(),
            host_time_ns: super::plan::host_time_ns(),
        };
        if let Err(e) = self.send_status(&Status::Resync(r)).await {
            tracing::warn!("cannot resync the agent: {}", crate::report::chain(&e));
        }
    }

    /// Send signal `sig` to the container over the input connection (there is one with
    /// `-i` or `-t`; otherwise nothing happens).
    pub fn send_signal(&self, sig: i32) {
        let _ = self.signals.send(sig);
    }

    /// Stop forwarding input (the container has ended).
    pub fn stop_input(&mut self) {
        if let Some(h) = self.input.take() {
            h.abort();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop_input();
        self.output.abort();
        self.status_task.abort();
    }
}

/// Forward one connection's messages; false once nobody listens any more.
async fn relay_status(mut conn: OwnedReadHalf, tx: &mpsc::UnboundedSender<Status>) -> bool {
    loop {
        match read_status(&mut conn).await {
            Ok(Some(s)) => {
                if tx.send(s).is_err() {
                    return false;
                }
            }
            Ok(None) => return true,
            Err(e) => {
                tracing::debug!("status connection ended: {}", crate::report::chain(&e));
                return true;
            }
        }
    }
}

/// The container's output, from the agent's latest output connection, until its end marker
/// (a connection that merely ends was reset by a snapshot; the agent opens another).
async fn relay_output(listener: HostListener, first: Arc<OnceLock<Instant>>, mut sink: OutputSink) {
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut stdout_open = sink.terminal;
    let mut current: Option<FrameReader> = None;
    loop {
        let frame = tokio::select! {
            conn = listener.accept() => {
                let Ok(conn) = conn else { return };
                if let Some((_, old)) = current.take() {
                    old.abort();
                }
                current = Some(crate::commands::exec::spawn_frame_reader(conn));
                continue;
            }
            f = recv_current(&mut current) => f,
        };
        let (stream, bytes) = match frame {
            Some(Ok(Some(Frame::Stdout(b)))) => (Stream::Stdout, b),
            Some(Ok(Some(Frame::Stderr(b)))) => (Stream::Stderr, b),
            Some(Ok(Some(Frame::Eof))) => return,
            Some(Ok(Some(other))) => {
                tracing::warn!("ignoring unexpected frame on the output port: {other:?}");
                continue;
            }
            Some(Ok(None)) | None => {
                tracing::debug!(
                    "output connection ended without its end marker: waiting for the next"
                );
                current = None;
                continue;
            }
            Some(Err(e)) => {
                tracing::debug!(
                    "container output connection broke ({}): waiting for the next",
                    crate::report::chain(&e)
                );
                current = None;
                continue;
            }
        };
        first.get_or_init(Instant::now);
        if let Some(hub) = &sink.attached {
            let frame = match stream {
                Stream::Stdout => Frame::Stdout(bytes.clone()),
                Stream::Stderr => Frame::Stderr(bytes.clone()),
            };
            hub.send(&frame).await;
        }
        if let Some(log) = sink.log.as_mut() {
            if let Err(e) = log.write(stream, &bytes) {
                // A full disk must not stop the container: its output still drains.
                tracing::warn!("cannot write the container's log ({e}); it is no longer kept");
                sink.log = None;
            }
        }
        match stream {
            // Our stdout gone (a closed pipe): keep draining so the guest never blocks.
            Stream::Stdout if stdout_open => {
                stdout_open = tty::emit(&mut stdout, &bytes).await.is_ok();
            }
            Stream::Stderr if sink.terminal => {
                let _ = tty::emit(&mut stderr, &bytes).await;
            }
            _ => {}
        }
    }
}

/// The frames of one connection, read by a task of their own (see
/// [`crate::commands::exec::spawn_frame_reader`]).
type FrameReader = (
    mpsc::Receiver<Result<Option<Frame>, fcvm_proto::frame::FrameError>>,
    JoinHandle<()>,
);

async fn recv_current(
    current: &mut Option<FrameReader>,
) -> Option<Result<Option<Frame>, fcvm_proto::frame::FrameError>> {
    match current {
        Some((rx, _)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Input frames to the agent's latest input connection (a new one replaces the one before,
/// which a snapshot reset).
async fn relay_input(
    listener: HostListener,
    mut mode: InputMode,
    mut signals: mpsc::UnboundedReceiver<i32>,
) {
    let Ok(mut conn) = listener.accept().await else {
        return;
    };
    let mut stdin = mode.stdin.then(tty::stdin_chunks);
    let mut winch = if mode.resize {
        signal(SignalKind::window_change()).ok()
    } else {
        None
    };
    if mode.resize {
        // The size may have changed between building the plan and the agent connecting.
        if let Some(ws) = tty::terminal_size() {
            if write_frame(&mut conn, &Frame::Resize(ws)).await.is_err() {
                return;
            }
        }
    }
    loop {
        let frame = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => {
                    conn = c;
                    continue;
                }
                Err(_) => return,
            },
            chunk = tty::next_chunk(&mut stdin) => match chunk {
                Some(Some(bytes)) => Frame::Stdin(bytes),
                Some(None) | None => {
                    stdin = None;
                    Frame::Eof
                }
            },
            Some(()) = recv_winch(&mut winch) => match tty::terminal_size() {
                Some(ws) => Frame::Resize(ws),
                None => continue,
            },
            Some(sig) = signals.recv() => Frame::Signal(sig),
            f = recv_remote(&mut mode.remote) => match f {
                Some(f) => f,
                None => {
                    mode.remote = None;
                    continue;
                }
            },
            else => return,
        };
        if write_frame(&mut conn, &frame).await.is_err() {
            return;
        }
    }
}

async fn recv_remote(rx: &mut Option<mpsc::UnboundedReceiver<Frame>>) -> Option<Frame> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_winch(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::UnixStream;

    async fn frame(conn: &mut UnixStream, f: Frame) {
        write_frame(conn, &f).await.unwrap();
    }

    /// What a snapshot does to the agent's output connection, as the host sees it: the old
    /// connection stays open with nobody behind it (or ends, or breaks mid-frame), and the
    /// agent opens a new one. The newest connection wins and only the end marker ends the
    /// relay.
    #[tokio::test]
    async fn output_follows_the_newest_connection_until_the_end_marker() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = HostListener::bind(&uds, OUTPUT_PORT).unwrap();
        let logs = dir.path().join("logs");
        let sink = OutputSink {
            terminal: false,
            log: Some(LogWriter::create(&logs, 1 << 20).unwrap()),
            attached: None,
        };
        let relay = tokio::spawn(relay_output(listener, Arc::new(OnceLock::new()), sink));
        let path = dir.path().join(format!("v.sock_{OUTPUT_PORT}"));
        let mut zombie = UnixStream::connect(&path).await.unwrap();
        frame(&mut zombie, Frame::Stdout(b"before\n".to_vec())).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A reset connection that stays open: the next one replaces it.
        let mut second = UnixStream::connect(&path).await.unwrap();
        frame(&mut second, Frame::Stderr(b"after\n".to_vec())).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Dropped by the host (which closed its end of the replaced connection).
        let _ = write_frame(&mut zombie, &Frame::Stdout(b"lost\n".to_vec())).await;
        // One that ends without the marker: the relay waits for the next.
        drop(second);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!relay.is_finished());
        let mut third = UnixStream::connect(&path).await.unwrap();
        frame(&mut third, Frame::Stdout(b"last\n".to_vec())).await;
        frame(&mut third, Frame::Eof).await;
        tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("the end marker ends the relay")
            .unwrap();
        let got: Vec<(Stream, Vec<u8>)> = crate::logs::read_all(&logs)
            .unwrap()
            .into_iter()
            .map(|r| (r.stream, r.text))
            .collect();
        assert_eq!(
            got,
            [
                (Stream::Stdout, b"before".to_vec()),
                (Stream::Stderr, b"after".to_vec()),
                (Stream::Stdout, b"last".to_vec()),
            ]
        );
    }
}
