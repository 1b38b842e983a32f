//! Firecracker's side of the handshake: anonymous guest memory registered with a userfaultfd
//! and the one `SCM_RIGHTS` message to the page server. Used by the tests and the bench to play
//! Firecracker, and usable by a stand-in VMM that offers the `Uffd` memory backend.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use crate::sys;

/// Failures on the client side.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // variant fields are spelled out in each message
pub enum ClientError {
    /// Neither `userfaultfd(2)` nor `/dev/userfaultfd` gave us a uffd.
    #[error("cannot create a userfaultfd ({0}); run as root or set vm.unprivileged_userfaultfd=1 or make /dev/userfaultfd accessible")]
    Create(Errno),
    /// The kernel refused the API handshake or a requested feature.
    #[error("UFFDIO_API failed ({0}); the kernel lacks a requested userfaultfd feature")]
    Api(Errno),
    /// Registering memory failed.
    #[error("UFFDIO_REGISTER failed: {0}")]
    Register(Errno),
    /// Mapping, advising or unmapping guest memory failed.
    #[error("guest memory operation failed: {0}")]
    Memory(Errno),
    /// An access fell outside the mapping.
    #[error("range {offset:#x}+{len:#x} is outside the {size:#x}-byte mapping")]
    OutOfRange {
        offset: usize,
        len: usize,
        size: usize,
    },
    /// Connecting or sending failed.
    #[error("sending the handshake failed: {0}")]
    Send(#[from] std::io::Error),
}

/// Anonymous private memory, like a Firecracker guest region.
#[derive(Debug)]
pub struct GuestMemory {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving or sharing the handle between
// threads is fine, and every access goes through methods that copy bytes in or out.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; concurrent reads/writes only race on guest bytes, as vCPUs would.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `len` bytes (rounded up to whole pages by the kernel) of fresh anonymous memory.
    pub fn new(len: usize) -> Result<Self, ClientError> {
        let size = std::num::NonZeroUsize::new(len).ok_or(ClientError::Memory(Errno::EINVAL))?;
        // SAFETY: a new anonymous mapping at a kernel-chosen address aliases nothing.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(ClientError::Memory)?;
        Ok(Self { ptr, len })
    }

    /// Start address (what Firecracker reports as `base_host_virt_addr`).
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `new` refuses 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), ClientError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(ClientError::OutOfRange {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies guest bytes at `offset` into `buf` (faulting pages in through the uffd).
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), ClientError> {
        self.check(offset, buf.len())?;
        // SAFETY: `check` keeps the source inside our live mapping; `buf` is a distinct Rust
        // buffer, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().cast::<u8>().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Reads one byte at `offset` (a "first touch" of its page).
    pub fn touch(&self, offset: usize) -> Result<u8, ClientError> {
        self.check(offset, 1)?;
        // SAFETY: in bounds of the live mapping per `check`; volatile so the access (and so the
        // fault) really happens.
        Ok(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().cast::<u8>().add(offset)) })
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), ClientError> {
        self.check(offset, data.len())?;
        // SAFETY: destination in bounds of our live mapping per `check`, source a distinct slice.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.ptr.as_ptr().cast::<u8>().add(offset),
                data.len(),
            )
        };
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)` on a page-aligned range, as a balloon does; with
    /// `EVENT_REMOVE` the page server is told and serves zeros there afterwards.
    pub fn discard(&self, offset: usize, len: usize) -> Result<(), ClientError> {
        self.check(offset, len)?;
        // SAFETY: the range lies inside our own mapping; DONTNEED only drops its contents.
        unsafe { madvise(self.ptr.byte_add(offset), len, MmapAdvise::MADV_DONTNEED) }
            .map_err(ClientError::Memory)
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing borrows it once `self` is being dropped.
        let _ = unsafe { munmap(self.ptr, self.len) };
    }
}

/// A userfaultfd created as Firecracker creates it (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct UffdClient {
    uffd: OwnedFd,
}

impl UffdClient {
    /// Creates the uffd and negotiates the API; `event_remove` asks for `UFFD_EVENT_REMOVE`
    /// (current Firecracker always does).
    pub fn new(event_remove: bool) -> Result<Self, ClientError> {
        let uffd = sys::new_userfaultfd(true).map_err(ClientError::Create)?;
        let features = if event_remove {
            sys::FEATURE_EVENT_REMOVE
        } else {
            0
        };
        sys::api(uffd.as_fd(), features).map_err(ClientError::Api)?;
        Ok(Self { uffd })
    }

    /// Registers the whole of `mem` in MISSING mode.
    pub fn register(&self, mem: &GuestMemory) -> Result<(), ClientError> {
        sys::register_missing(self.uffd.as_fd(), mem.addr(), mem.len() as u64)
            .map_err(ClientError::Register)
    }

    /// Sends `json` with the uffd attached, in one `sendmsg` as Firecracker does.
    pub fn send_handshake(&self, stream: &UnixStream, json: &[u8]) -> Result<(), ClientError> {
        send_with_fd(stream, json, Some(self.uffd.as_fd()))
    }

    /// Connects to `socket` and sends the handshake; keep the returned stream open for as long
    /// as the "clone" lives: closing it tells the server the clone is gone.
    pub fn connect(&self, socket: &Path, json: &[u8]) -> Result<UnixStream, ClientError> {
        let stream = UnixStream::connect(socket)?;
        self.send_handshake(&stream, json)?;
        Ok(stream)
    }
}

impl AsFd for UffdClient {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}

/// Sends `bytes` in one `sendmsg`, with `fd` as `SCM_RIGHTS` if given.
pub fn send_with_fd(
    stream: &UnixStream,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), ClientError> {
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw
        .as_ref()
        .map(|r| vec![ControlMessage::ScmRights(r)])
        .unwrap_or_default();
    let iov = [IoSlice::new(bytes)];
    let n = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)
        .map_err(|e| ClientError::Send(e.into()))?;
    if n != bytes.len() {
        // A short first send still delivered the fd; push the rest like a stream write.
        use std::io::Write;
        (&*stream).write_all(&bytes[n..])?;
    }
    Ok(())
}

/// The exact message Firecracker v1.12.1 sends for one region.
pub fn firecracker_v1_12_json(base: u64, size: u64, offset: u64, page_size: u64) -> String {
    format!(
        r#"[{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":{page_size},"page_size_kib":{page_size}}}]"#
    )
}
