//! The supervisor's end of `fcvm attach`: a detached run with `-i` and/or `-t` keeps the
//! container's input open and lets one terminal at a time attach to it.
//!
//! The supervisor listens on `attach.sock` in the VM's runtime directory (gone with the VM).
//! The protocol is the agent's own frames: the client sends `Stdin`, `Resize` and `Eof`,
//! which go on to the container's input connection as if they came from a local terminal;
//! the supervisor sends the container's `Stdout`/`Stderr` while the client is attached, and
//! `Exit(code)` when the container has ended and all its output was relayed. Detaching is
//! the client closing the connection (after its detach keys); the container never notices.
//! A second client while one is attached is refused with an `Error` frame, so two terminals
//! never type into one container unknowingly.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fcvm_proto::frame::tokio_io::{read_frame, write_frame};
use fcvm_proto::frame::Frame;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, Mutex};

/// The socket's name in the runtime directory.
pub const ATTACH_SOCKET: &str = "attach.sock";

/// The socket of the VM whose runtime directory is `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(ATTACH_SOCKET)
}

/// The attached client, if any: where the container's output goes besides the log.
#[derive(Debug, Default)]
pub struct AttachHub {
    client: Mutex<Option<(u64, OwnedWriteHalf)>>,
    next_id: AtomicU64,
}

impl AttachHub {
    /// Send `frame` to the attached client; a client that is gone is dropped.
    pub async fn send(&self, frame: &Frame) {
        let mut client = self.client.lock().await;
        if let Some((_, w)) = client.as_mut() {
            if write_frame(w, frame).await.is_err() {
                *client = None;
            }
        }
    }

    async fn detach(&self, id: u64) {
        let mut client = self.client.lock().await;
        if client.as_ref().is_some_and(|(c, _)| *c == id) {
            *client = None;
        }
    }
}

/// Accept clients on `listener` until the supervisor ends: their input frames go to
/// `input`, the container's output comes to them through `hub`.
pub fn serve(listener: UnixListener, hub: Arc<AttachHub>, input: mpsc::UnboundedSender<Frame>) {
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let (mut rd, mut wr) = conn.into_split();
            let id = hub.next_id.fetch_add(1, Ordering::SeqCst);
            {
                let mut client = hub.client.lock().await;
                if client.is_some() {
                    let refusal = Frame::Error(
                        "another terminal is attached to this container; detach it first".into(),
                    );
                    let _ = write_frame(&mut wr, &refusal).await;
                    continue;
                }
                *client = Some((id, wr));
            }
            let (hub, input) = (hub.clone(), input.clone());
            tokio::spawn(async move {
                loop {
                    match read_frame(&mut rd).await {
                        Ok(Some(f @ (Frame::Stdin(_) | Frame::Resize(_) | Frame::Eof))) => {
                            if input.send(f).is_err() {
                                break;
                            }
                        }
                        Ok(Some(other)) => {
                            tracing::debug!("attach: ignoring {other:?} from the client");
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
                hub.detach(id).await;
            });
        }
    });
}
