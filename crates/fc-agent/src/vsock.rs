//! Guest side of vsock: `AF_VSOCK` streams to the host (CID 2), which Firecracker forwards to
//! Unix sockets on the host side, wrapped in [`Conn`].

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use fcvm_proto::vsock::HOST_CID;
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

/// A connected vsock stream.
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

/// Opens vsock connections to the host and listens for the host's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Vsock;

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
    /// A connector.
    pub fn new() -> Self {
        Self
    }

    /// Connects to host `port` once.
    pub fn connect_once(&self, port: u32) -> Result<Conn, VsockError> {
        let fd = vsock_socket(port)?;
        connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, port)).map_err(sys("connect", port))?;
        Ok(Conn(fd))
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
        let fd = vsock_socket(port)?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
            .map_err(sys("bind", port))?;
        listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN)).map_err(sys("listen", port))?;
        Ok(Listener(fd))
    }
}

/// A listening vsock socket.
#[derive(Debug)]
pub struct Listener(OwnedFd);

impl Listener {
    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<Conn> {
        loop {
            match accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(raw) => {
                    // SAFETY: accept returned a new descriptor that nothing else owns.
                    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
                    return Ok(Conn(fd));
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
