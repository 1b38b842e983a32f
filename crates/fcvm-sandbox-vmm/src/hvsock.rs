//! Firecracker's hybrid vsock, emulated with Unix sockets.
//!
//! Host side, exactly as Firecracker: the VMM listens on `uds_path`; a host process connects,
//! sends `CONNECT <port>\n`, and gets `OK <n>\n` once the guest accepted; guest connections to
//! host port P are forwarded to the Unix socket `<uds_path>_P`.
//!
//! Guest side (agent in `fcvm.vsock=abstract` mode): guest listeners are abstract sockets
//! `@fcvm-vsock-guest-<port>` and the guest reaches the host through `@fcvm-vsock-host` with the
//! same `CONNECT`/`OK` handshake. Both names live in the sandbox's network namespace.

use std::fs::File;
use std::os::linux::net::SocketAddrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use fcvm_proto::boot::{abstract_guest_socket, ABSTRACT_HOST_SOCKET};
use fcvm_proto::vsock::{host_listener_path, ok_line, parse_connect_line, MAX_HANDSHAKE_LINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::netns::in_netns;

/// Local port numbers reported in `OK` lines, like Firecracker's (they start at 2^30).
static NEXT_LOCAL_PORT: AtomicU32 = AtomicU32::new(1 << 30);

async fn read_line(s: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < MAX_HANDSHAKE_LINE {
        if s.read(&mut b).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        line.push(b[0]);
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
    }
    Err(std::io::ErrorKind::InvalidData.into())
}

/// Host-facing listener on `uds_path`. `netns` carries the sandbox's network namespace once it
/// runs; before that, connections are closed (the guest has no listeners yet).
pub async fn serve_host(listener: UnixListener, netns: watch::Receiver<Option<Arc<File>>>) {
    loop {
        let Ok((mut host, _)) = listener.accept().await else {
            continue;
        };
        let netns = netns.borrow().clone();
        tokio::spawn(async move {
            let Ok(line) = read_line(&mut host).await else {
                return;
            };
            let Ok(port) = parse_connect_line(&line) else {
                return;
            };
            let Some(ns) = netns else { return };
            let name = abstract_guest_socket(port);
            let guest = tokio::task::spawn_blocking(move || {
                in_netns(&ns, || {
                    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                    let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
            })
            .await;
            let Ok(Ok(guest)) = guest else { return };
            let Ok(mut guest) = UnixStream::from_std(guest) else {
                return;
            };
            let local = NEXT_LOCAL_PORT.fetch_add(1, Ordering::Relaxed);
            if host.write_all(ok_line(local).as_bytes()).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
        });
    }
}

/// Binds the guest-facing `@fcvm-vsock-host` listener inside the sandbox's network namespace.
pub fn bind_guest_listener(ns: &File) -> std::io::Result<UnixListener> {
    let l = in_netns(ns, || {
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(ABSTRACT_HOST_SOCKET)?;
        let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })?;
    UnixListener::from_std(l)
}

/// Forwards guest connections to `<uds_path>_<port>` on the host.
pub async fn serve_guest(listener: UnixListener, uds_path: PathBuf) {
    loop {
        let Ok((mut guest, _)) = listener.accept().await else {
            continue;
        };
        let uds_path = uds_path.clone();
        tokio::spawn(async move {
            let Ok(line) = read_line(&mut guest).await else {
                return;
            };
            let Ok(port) = parse_connect_line(&line) else {
                return;
            };
            let target = host_listener_path(Path::new(&uds_path), port);
            // Nothing listening: close, as Firecracker resets the guest's connection.
            let Ok(mut host) = UnixStream::connect(&target).await else {
                return;
            };
            if guest.write_all(ok_line(port).as_bytes()).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut guest, &mut host).await;
        });
    }
}
