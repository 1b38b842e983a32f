//! Guest side of vsock, real or emulated.
//!
//! In Firecracker the agent uses `AF_VSOCK` (host CID 2). In the stand-in VMM
//! (`fcvm.vsock=abstract`) there is no vsock device, so the same connections go over abstract
//! Unix sockets in the sandbox's network namespace:
//!
//! - guest → host port P: connect to `@fcvm-vsock-host`, send `CONNECT P\n`, read `OK P\n`; the
//!   VMM splices the stream onto the host's `<uds_path>_P` (refusing, by closing, when nothing
//!   listens there, as Firecracker resets the connection).
//! - host → guest port P: listen on `@fcvm-vsock-guest-P`.
//!
//! Both kinds end up as a connected stream socket fd, wrapped in [`Conn`].

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

use fcvm_proto::boot::{abstract_guest_socket, VsockMode, ABSTRACT_HOST_SOCKET};
use fcvm_proto::vsock::{connect_line, parse_ok_line, HOST_CID, MAX_HANDSHAKE_LINE};
use nix::sys::socket::{
    accept4, bind, connect, listen, socket, AddressFamily, Backlog, Shutdown, SockFlag, SockType,
    VsockAddr,
};

/// Errors opening vsock connections.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Socket call failed.
    #[error("vsock {op} for port {port} failed: {source}")]
    Sys {
        /// Operation.
        op: &'static str,
        /// Port.
        port: u32,
        /// Cause.
        source: io::Error,
    },
    /// The emulated handshake failed.
    #[error("vsock handshake for port {port} failed: {reason}")]
    Handshake {
        /// Port.
        port: u32,
        /// Reason.
        reason: String,
    },
    /// The host did not listen in time.
    #[error("host is not listening on vsock port {0} (timed out)")]
    Timeout(u32),
}

fn sys(op: &'static str, port: u32) -> impl FnOnce(nix::Error) -> VsockError {
    move |e| VsockError::Sys {
        op,
        port,
        source: e.into(),
    }
}

/// A connected stream (vsock or Unix).
#[derive(Debug)]
pub struct Conn(OwnedFd);

impl Conn {
    /// A second handle on the same connection (for a reader and a writer thread).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(Conn(self.0.try_clone()?))
    }

    /// Shuts down both halves, waking up a thread blocked reading this connection.
    pub fn shutdown_both(&self) {
        let _ = nix::sys::socket::shutdown(self.0.as_raw_fd(), Shutdown::Both);
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(self.0.as_raw_fd(), buf) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::write(&self.0, buf) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens connections in one mode.
#[derive(Debug, Clone, Copy)]
pub struct Vsock {
    mode: VsockMode,
}

/// A new AF_VSOCK stream socket (close-on-exec) for `port`.
fn vsock_socket(port: u32) -> Result<OwnedFd, VsockError> {
    socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sys("socket", port))
}

impl Vsock {
    /// Connector for `mode`.
    pub fn new(mode: VsockMode) -> Self {
        Self { mode }
    }

    /// Connects to host `port` once.
    pub fn connect_once(&self, port: u32) -> Result<Conn, VsockError> {
        match self.mode {
            VsockMode::Vsock => {
                let fd = vsock_socket(port)?;
                connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, port))
                    .map_err(sys("connect", port))?;
                Ok(Conn(fd))
            }
            VsockMode::Abstract => {
                let addr = SocketAddr::from_abstract_name(ABSTRACT_HOST_SOCKET).map_err(|e| {
                    VsockError::Sys {
                        op: "address",
                        port,
                        source: e,
                    }
                })?;
                let mut s = UnixStream::connect_addr(&addr).map_err(|e| VsockError::Sys {
                    op: "connect",
                    port,
                    source: e,
                })?;
                s.write_all(connect_line(port).as_bytes())
                    .map_err(|e| VsockError::Sys {
                        op: "handshake write",
                        port,
                        source: e,
                    })?;
                let line = read_line(&mut s).map_err(|e| VsockError::Handshake {
                    port,
                    reason: e.to_string(),
                })?;
                parse_ok_line(&line).map_err(|e| VsockError::Handshake {
                    port,
                    reason: e.to_string(),
                })?;
                Ok(Conn(s.into()))
            }
        }
    }

    /// Connects to host `port`, retrying while the host is not listening yet.
    pub fn connect(&self, port: u32, timeout: Duration) -> Result<Conn, VsockError> {
        let deadline = Instant::now() + timeout;
        let mut logged = false;
        loop {
            match self.connect_once(port) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => {
                    crate::info!("giving up on host port {port}: {e}");
                    return Err(VsockError::Timeout(port));
                }
                Err(e) => {
                    if !logged {
                        crate::debug!("host port {port} not ready, retrying: {e}");
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Listens on guest `port`.
    pub fn listen(&self, port: u32) -> Result<Listener, VsockError> {
        match self.mode {
            VsockMode::Vsock => {
                let fd = vsock_socket(port)?;
                bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
                    .map_err(sys("bind", port))?;
                listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))
                    .map_err(sys("listen", port))?;
                Ok(Listener::Vsock(fd))
            }
            VsockMode::Abstract => {
                let addr =
                    SocketAddr::from_abstract_name(abstract_guest_socket(port)).map_err(|e| {
                        VsockError::Sys {
                            op: "address",
                            port,
                            source: e,
                        }
                    })?;
                let l = UnixListener::bind_addr(&addr).map_err(|e| VsockError::Sys {
                    op: "bind",
                    port,
                    source: e,
                })?;
                Ok(Listener::Unix(l))
            }
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub enum Listener {
    /// AF_VSOCK.
    Vsock(OwnedFd),
    /// Abstract Unix socket.
    Unix(UnixListener),
}

impl Listener {
    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Vsock(fd) => loop {
                match accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    Ok(raw) => {
                        // SAFETY: accept returned a new descriptor that nothing else owns.
                        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                        return Ok(Conn(fd));
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            },
            Listener::Unix(l) => l.accept().map(|(s, _)| Conn(s.into())),
        }
    }
}

fn read_line(s: &mut impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < MAX_HANDSHAKE_LINE {
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during handshake (host not listening?)",
            ));
        }
        line.push(b[0]);
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "handshake line too long",
    ))
}
