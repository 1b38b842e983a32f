//! The host end of a running container: status messages (both ways), output frames and input
//! frames over the hybrid vsock listeners.
//!
//! Output goes to fcvm's own stdout and stderr, kept apart, and nothing else is ever
//! written to stdout, so `fcvm podman run ... > file` captures exactly the container's
//! standard output.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use fcvm_proto::frame::tokio_io::{read_frame, write_frame};
use fcvm_proto::frame::Frame;
use fcvm_proto::status::tokio_io::{read_status, write_status};
use fcvm_proto::status::Status;
use fcvm_proto::vsock::{INPUT_PORT, OUTPUT_PORT, STATUS_PORT};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
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
    /// The write side of the agent's latest status connection.
    status_writer: Arc<tokio::sync::Mutex<Option<OwnedWriteHalf>>>,
    /// Accepts the agent's output connections and relays the newest (see
    /// [`Session::output_drained`]).
    output: JoinHandle<()>,
    /// The generation of the output connection whose relay ended last (0: none yet).
    output_ended: tokio::sync::watch::Receiver<u64>,
    /// The generation of the newest output connection.
    output_gen: Arc<std::sync::atomic::AtomicU64>,
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
        tokio::spawn(async move {
            while let Ok(conn) = status_l.accept().await {
                let _ = connected.set(Instant::now());
                let (r, w) = conn.into_split();
                *writer.lock().await = Some(w);
                if !relay_status(r, &tx).await {
                    return;
                }
            }
        });
        let first_output = Arc::new(OnceLock::new());
        let first = first_output.clone();
        let (ended_tx, output_ended) = tokio::sync::watch::channel(0u64);
        let output_gen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let gen = output_gen.clone();
        // A snapshot resets the guest's vsock connections (in the VM snapshotted too, with a
        // health check's startup tier), and the agent dials its output port again: the
        // newest connection wins, an older one is gone behind its reset.
        let output = tokio::spawn(async move {
            let sink = Arc::new(tokio::sync::Mutex::new(sink));
            // Dropped with this task (the session's end), it takes its relay along.
            let mut relay: Option<AbortOnDrop> = None;
            while let Ok(conn) = output_l.accept().await {
                relay.take();
                let n = gen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let (sink, first, ended) = (sink.clone(), first.clone(), ended_tx.clone());
                relay = Some(AbortOnDrop(tokio::spawn(async move {
                    relay_output(conn, &first, &mut *sink.lock().await).await;
                    let _ = ended.send(n);
                })));
            }
        });
        let (signals, signal_rx) = mpsc::unbounded_channel();
        let input = input_l.map(|l| {
            tokio::spawn(async move {
                if let Ok(conn) = l.accept().await {
                    relay_input(conn, input, signal_rx).await;
                }
            })
        });
        Session {
            status,
            status_writer,
            output,
            output_ended,
            output_gen,
            input,
            signals,
            first_output,
            agent_connected,
        }
    }

    /// Returns once the agent closed its newest output connection (all output written).
    pub async fn output_drained(&mut self) {
        loop {
            let newest = self.output_gen.load(std::sync::atomic::Ordering::SeqCst);
            if newest > 0 && *self.output_ended.borrow_and_update() == newest {
                return;
            }
            if self.output_ended.changed().await.is_err() {
                // The acceptor is gone: nothing more will come.
                return;
            }
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
    }
}

/// A task that ends when its handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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

async fn relay_output(mut conn: UnixStream, first: &OnceLock<Instant>, sink: &mut OutputSink) {
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut stdout_open = sink.terminal;
    loop {
        let (stream, bytes) = match read_frame(&mut conn).await {
            Ok(Some(Frame::Stdout(b))) => (Stream::Stdout, b),
            Ok(Some(Frame::Stderr(b))) => (Stream::Stderr, b),
            Ok(Some(other)) => {
                tracing::warn!("ignoring unexpected frame on the output port: {other:?}");
                continue;
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(
                    "container output stream broke: {}",
                    crate::report::chain(&e)
                );
                return;
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

async fn relay_input(
    mut conn: UnixStream,
    mut mode: InputMode,
    mut signals: mpsc::UnboundedReceiver<i32>,
) {
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
