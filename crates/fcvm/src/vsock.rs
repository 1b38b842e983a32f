//! Host side of Firecracker's hybrid vsock.
//!
//! Firecracker exposes the guest's vsock device as Unix sockets:
//! the host reaches a guest port by connecting to the VM's `uds_path` and sending
//! `CONNECT <port>\n`, and guest connections to host port `P` arrive on a Unix listener the
//! host must have bound at `<uds_path>_P` before the guest dials. The line formats live in
//! [`fcvm_proto::vsock`]; this module does the I/O, with deadlines so that a guest that never
//! answers turns into an error instead of a hang.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fcvm_proto::vsock::{connect_line, host_listener_path, parse_ok_line, MAX_HANDSHAKE_LINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Why a vsock connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The VMM's vsock socket does not accept connections.
    #[error("cannot connect to the VM's vsock socket {path} (is the VM still running?)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Nothing listens on the guest port, or the VMM closed the stream.
    #[error("the guest did not accept a connection on vsock port {port}: {reason}")]
    Refused {
        /// Guest port.
        port: u32,
        /// What happened.
        reason: String,
    },
    /// The handshake took too long.
    #[error("the guest did not answer on vsock port {port} within {timeout:?}")]
    Timeout {
        /// Guest port.
        port: u32,
        /// The deadline.
        timeout: Duration,
    },
    /// Binding a host listener failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Accepting a guest connection failed or took too long.
    #[error("the guest did not connect to host port {port} ({reason})")]
    Accept {
        /// Host port.
        port: u32,
        /// What happened.
        reason: String,
    },
}

/// Connect to guest `port` through the hybrid vsock at `uds`, completing the
/// `CONNECT`/`OK` handshake within `timeout`.
pub async fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    match tokio::time::timeout(timeout, handshake(uds, port)).await {
        Ok(result) => result,
        Err(_) => Err(VsockError::Timeout { port, timeout }),
    }
}

async fn handshake(uds: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|source| VsockError::Connect {
            path: uds.to_owned(),
            source,
        })?;
    let refused = |reason: String| VsockError::Refused { port, reason };
    stream
        .write_all(connect_line(port).as_bytes())
        .await
        .map_err(|e| refused(e.to_string()))?;
    // Byte by byte: whatever follows the newline already belongs to the guest's stream.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        match stream.read(&mut b).await {
            Ok(0) => {
                return Err(refused(
                    "the VMM closed the connection (nothing listens on that port yet?)".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(refused(e.to_string())),
        }
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
        if line.len() > MAX_HANDSHAKE_LINE {
            return Err(refused("handshake reply too long".into()));
        }
    }
    parse_ok_line(&String::from_utf8_lossy(&line)).map_err(|e| refused(e.to_string()))?;
    Ok(stream)
}

/// Hand a listening socket to the owner of its directory, 0600: under the jailer the VM's
/// runtime directory belongs to the VMM's uid, which must be able to connect to it.
fn give_to_dir_owner(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = std::fs::metadata(path.parent().unwrap_or(Path::new("/")))?;
    if dir.uid() != nix::unistd::geteuid().as_raw() {
        std::os::unix::fs::chown(path, Some(dir.uid()), Some(dir.gid()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// A host listener for guest connections to one port.
#[derive(Debug)]
pub struct HostListener {
    port: u32,
    path: PathBuf,
    listener: UnixListener,
}

impl HostListener {
    /// Bind `<uds>_<port>`, replacing a stale socket file.
    pub fn bind(uds: &Path, port: u32) -> Result<HostListener, VsockError> {
        let path = host_listener_path(uds, port);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| VsockError::Bind {
            path: path.clone(),
            source,
        })?;
        give_to_dir_owner(&path).map_err(|source| VsockError::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(HostListener {
            port,
            path,
            listener,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wait for the guest's connection.
    pub async fn accept(&self) -> Result<UnixStream, VsockError> {
        self.listener
            .accept()
            .await
            .map(|(s, _)| s)
            .map_err(|e| VsockError::Accept {
                port: self.port,
                reason: e.to_string(),
            })
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the VMM's side of the handshake.
    async fn fake_vmm(listener: UnixListener, reply: &'static [u8]) {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 13];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"CONNECT 4998\n");
        s.write_all(reply).await.unwrap();
        if !reply.is_empty() {
            s.write_all(b"payload").await.unwrap();
        }
    }

    #[tokio::test]
    async fn handshake_ok_keeps_following_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        let vmm = tokio::spawn(fake_vmm(l, b"OK 1073741824\n"));
        let mut s = connect(&uds, 4998, Duration::from_secs(5)).await.unwrap();
        let mut rest = [0u8; 7];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"payload");
        vmm.await.unwrap();
    }

    #[tokio::test]
    async fn closed_without_ok_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = UnixListener::bind(&uds).unwrap();
        let vmm = tokio::spawn(fake_vmm(l, b""));
        let err = connect(&uds, 4998, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, VsockError::Refused { port: 4998, .. }),
            "{err}"
        );
        vmm.await.unwrap();
    }

    #[tokio::test]
    async fn silent_vmm_times_out_and_missing_socket_fails() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let _l = UnixListener::bind(&uds).unwrap();
        let err = connect(&uds, 4998, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Timeout { .. }), "{err}");
        let err = connect(&dir.path().join("none"), 1, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn listener_uses_the_port_suffix_and_removes_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let l = HostListener::bind(&uds, 4999).unwrap();
        assert_eq!(l.path(), dir.path().join("v.sock_4999"));
        let guest = UnixStream::connect(dir.path().join("v.sock_4999"));
        let (a, b) = tokio::join!(l.accept(), guest);
        a.unwrap();
        b.unwrap();
        drop(l);
        assert!(!dir.path().join("v.sock_4999").exists());
    }
}
