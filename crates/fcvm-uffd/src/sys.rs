//! The few raw kernel calls this crate needs: userfaultfd ioctls, `pidfd_open` and the KSM
//! `prctl`s. Nothing else in the crate calls `libc::ioctl`/`libc::syscall` directly.
//!
//! ABI structs and ioctl numbers come from `linux-raw-sys` (pre-generated kernel UAPI bindings)
//! rather than the `userfaultfd` crate: that crate runs bindgen at build time and so needs
//! libclang on every build machine, which ours do not have.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use linux_raw_sys::general as uapi;
use linux_raw_sys::ioctl as uioctl;
use nix::errno::Errno;

/// Size of one `struct uffd_msg` as the kernel writes it on `read(2)`.
pub const UFFD_MSG_SIZE: usize = std::mem::size_of::<uapi::uffd_msg>();

/// `UFFD_FEATURE_EVENT_REMOVE`: deliver `UFFD_EVENT_REMOVE` on `MADV_DONTNEED`/`MADV_REMOVE`.
pub const FEATURE_EVENT_REMOVE: u64 = uapi::UFFD_FEATURE_EVENT_REMOVE as u64;

/// `USERFAULTFD_IOC_NEW`, i.e. `_IO(0xAA, 0x00)`, on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: libc::Ioctl =
    nix::request_code_none!(uapi::USERFAULTFD_IOC, 0x00) as libc::Ioctl;

/// `PR_SET_MEMORY_MERGE` / `PR_GET_MEMORY_MERGE` (Linux 6.4+).
pub const PR_SET_MEMORY_MERGE: libc::c_int = linux_raw_sys::prctl::PR_SET_MEMORY_MERGE as _;
pub const PR_GET_MEMORY_MERGE: libc::c_int = linux_raw_sys::prctl::PR_GET_MEMORY_MERGE as _;

/// One decoded message from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread faulted on a missing page at `addr` (not page-aligned).
    Pagefault { addr: u64, flags: u64 },
    /// `MADV_DONTNEED`/`MADV_REMOVE` dropped `[start, end)`.
    Remove { start: u64, end: u64 },
    /// `munmap` of `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// `mremap` moved a registered range.
    Remap { from: u64, to: u64, len: u64 },
    /// The process forked; `ufd` is a new userfaultfd for the child.
    Fork { ufd: u32 },
    /// An event type this crate does not know.
    Unknown(u8),
}

fn decode(msg: &uapi::uffd_msg) -> UffdEvent {
    let arg = msg.arg;
    match u32::from(msg.event) {
        // In every arm below, `arg` is a union of plain integer structs (any bit pattern is a
        // valid value of each member) and the kernel filled the member named by `event`.
        uapi::UFFD_EVENT_PAGEFAULT => {
            // SAFETY: plain-integer union member selected by `event`, see above.
            let pf = unsafe { arg.pagefault };
            UffdEvent::Pagefault {
                addr: pf.address,
                flags: pf.flags,
            }
        }
        uapi::UFFD_EVENT_REMOVE => {
            // SAFETY: plain-integer union member selected by `event`, see above.
            let r = unsafe { arg.remove };
            UffdEvent::Remove {
                start: r.start,
                end: r.end,
            }
        }
        uapi::UFFD_EVENT_UNMAP => {
            // SAFETY: plain-integer union member selected by `event`, see above.
            let r = unsafe { arg.remove };
            UffdEvent::Unmap {
                start: r.start,
                end: r.end,
            }
        }
        uapi::UFFD_EVENT_REMAP => {
            // SAFETY: plain-integer union member selected by `event`, see above.
            let r = unsafe { arg.remap };
            UffdEvent::Remap {
                from: r.from,
                to: r.to,
                len: r.len,
            }
        }
        uapi::UFFD_EVENT_FORK => {
            // SAFETY: plain-integer union member selected by `event`, see above.
            let f = unsafe { arg.fork };
            UffdEvent::Fork { ufd: f.ufd }
        }
        other => UffdEvent::Unknown(other as u8),
    }
}

/// Reads every message currently queued on a non-blocking userfaultfd (at most `max`),
/// appending them to `out`. Returns how many were read; 0 means the queue is empty.
pub fn read_events(
    uffd: BorrowedFd<'_>,
    out: &mut Vec<UffdEvent>,
    max: usize,
) -> Result<usize, Errno> {
    const BATCH: usize = 64;
    let mut buf = [0u8; UFFD_MSG_SIZE * BATCH];
    let mut total = 0;
    while total < max {
        let want = (max - total).min(BATCH) * UFFD_MSG_SIZE;
        // SAFETY: `buf` is valid for writes of `want <= buf.len()` bytes for the whole call.
        let n = unsafe { libc::read(uffd.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
        if n < 0 {
            match Errno::last() {
                Errno::EAGAIN => break,
                Errno::EINTR => continue,
                e => return Err(e),
            }
        }
        let n = n as usize;
        if n == 0 {
            break;
        }
        for chunk in buf[..n].chunks_exact(UFFD_MSG_SIZE) {
            // SAFETY: `chunk` holds exactly `size_of::<uffd_msg>()` initialised bytes; the struct
            // is packed plain data for which any bit pattern is valid, and `read_unaligned`
            // imposes no alignment requirement on the source.
            let msg = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast::<uapi::uffd_msg>()) };
            out.push(decode(&msg));
        }
        total += n / UFFD_MSG_SIZE;
        if n < want {
            break;
        }
    }
    Ok(total)
}

/// `UFFDIO_COPY` of `len` bytes from our address `src` into the faulting process at `dst`,
/// waking the threads that wait on that range. Returns the number of bytes copied.
pub fn copy(uffd: BorrowedFd<'_>, dst: u64, src: u64, len: u64) -> Result<u64, Errno> {
    copy_with_mode(uffd, dst, src, len, 0).map_err(|(e, _)| e)
}

/// `UFFDIO_COPY` without waking anyone, for pages copied ahead of any fault. On failure
/// also returns how many bytes were copied before it stopped: a range copy stops at the
/// first page that is already present (the kernel then reports EAGAIN with a positive
/// count, or EEXIST when the very first page is present).
pub fn copy_ahead(uffd: BorrowedFd<'_>, dst: u64, src: u64, len: u64) -> Result<u64, (Errno, u64)> {
    copy_with_mode(uffd, dst, src, len, uapi::UFFDIO_COPY_MODE_DONTWAKE as u64)
}

fn copy_with_mode(
    uffd: BorrowedFd<'_>,
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
) -> Result<u64, (Errno, u64)> {
    let mut arg = uapi::uffdio_copy {
        dst,
        src,
        len,
        mode,
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY reads and writes only `arg`, which lives for the whole call. The kernel
    // validates `dst` against the registered ranges of the uffd's mm and reads `src` with
    // copy_from_user, so a bad `src` yields EFAULT rather than memory unsafety in this process.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            uioctl::UFFDIO_COPY as libc::Ioctl,
            &mut arg,
        )
    };
    if r == 0 {
        Ok(arg.copy as u64)
    } else {
        let err = Errno::last();
        // `copy` holds the bytes copied, or a negated errno when nothing was.
        Err((err, u64::try_from(arg.copy).unwrap_or(0)))
    }
}

/// `UFFDIO_ZEROPAGE` on `[start, start+len)`, waking waiters.
pub fn zeropage(uffd: BorrowedFd<'_>, start: u64, len: u64) -> Result<u64, Errno> {
    let mut arg = uapi::uffdio_zeropage {
        range: uapi::uffdio_range { start, len },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: UFFDIO_ZEROPAGE reads and writes only `arg`, valid for the whole call; the kernel
    // validates the range against the uffd's registrations.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            uioctl::UFFDIO_ZEROPAGE as libc::Ioctl,
            &mut arg,
        )
    };
    if r == 0 {
        Ok(arg.zeropage as u64)
    } else {
        Err(Errno::last())
    }
}

/// `UFFDIO_WAKE` on `[start, start+len)`: wakes threads waiting on pages that are already present.
pub fn wake(uffd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), Errno> {
    let mut arg = uapi::uffdio_range { start, len };
    // SAFETY: UFFDIO_WAKE only reads `arg`, valid for the whole call.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            uioctl::UFFDIO_WAKE as libc::Ioctl,
            &mut arg,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Creates a userfaultfd the way Firecracker does: the `userfaultfd(2)` syscall, falling back to
/// `/dev/userfaultfd` when the syscall is refused (unprivileged callers on 6.1+ kernels).
pub fn new_userfaultfd(non_blocking: bool) -> Result<OwnedFd, Errno> {
    let mut flags = libc::O_CLOEXEC;
    if non_blocking {
        flags |= libc::O_NONBLOCK;
    }
    // SAFETY: userfaultfd(2) takes one integer argument and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    }
    let syscall_err = Errno::last();
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
        .map_err(|_| syscall_err)?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the open flags by value and returns a new fd or -1.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: as above, a fresh fd that only we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API` handshake with the kernel; returns the features the kernel granted.
pub fn api(uffd: BorrowedFd<'_>, features: u64) -> Result<u64, Errno> {
    let mut arg = uapi::uffdio_api {
        api: uapi::UFFD_API as u64,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes only `arg`, valid for the whole call.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            uioctl::UFFDIO_API as libc::Ioctl,
            &mut arg,
        )
    };
    if r == 0 {
        Ok(arg.features)
    } else {
        Err(Errno::last())
    }
}

/// `UFFDIO_REGISTER` of `[start, start+len)` in MISSING mode.
pub fn register_missing(uffd: BorrowedFd<'_>, start: u64, len: u64) -> Result<(), Errno> {
    let mut arg = uapi::uffdio_register {
        range: uapi::uffdio_range { start, len },
        mode: uapi::UFFDIO_REGISTER_MODE_MISSING as u64,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes only `arg`, valid for the whole call; it changes
    // how the kernel resolves faults in that range of our own mm, which the caller asked for.
    let r = unsafe {
        libc::ioctl(
            uffd.as_raw_fd(),
            uioctl::UFFDIO_REGISTER as libc::Ioctl,
            &mut arg,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// `pidfd_open(pid, 0)`: an fd that becomes readable when `pid` exits.
pub fn pidfd_open(pid: libc::pid_t) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a fresh fd that only we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `prctl(PR_SET_MEMORY_MERGE, on)` for the calling process.
pub fn set_memory_merge(on: bool) -> Result<(), Errno> {
    // SAFETY: this prctl takes integer arguments only and changes a flag on our own mm.
    let r = unsafe { libc::prctl(PR_SET_MEMORY_MERGE, libc::c_ulong::from(on), 0, 0, 0) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// `prctl(PR_GET_MEMORY_MERGE)` for the calling process.
pub fn get_memory_merge() -> Result<bool, Errno> {
    // SAFETY: this prctl takes integer arguments only and reads a flag of our own mm.
    let r = unsafe { libc::prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r != 0)
    }
}

/// The host's base page size.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf takes an integer name and has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}
