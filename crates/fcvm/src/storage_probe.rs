//! Whether a filesystem can make reflink (copy-on-write) copies.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// `FICLONE` ioctl number (`_IOW(0x94, 9, int)`).
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Make `dst` a reflink copy of `src` (whole file). Fails with EOPNOTSUPP/EXDEV/EINVAL
/// where the filesystem cannot share extents.
pub fn reflink(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are open.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Try a reflink between two scratch files in `dir`.
pub fn supports_reflink(dir: &Path) -> io::Result<bool> {
    let mut src = tempfile::tempfile_in(dir)?;
    src.write_all(&[0x5a; 4096])?;
    let dst = tempfile::tempfile_in(dir)?;
    match reflink(&src, &dst) {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP)
                    | Some(libc::EXDEV)
                    | Some(libc::EINVAL)
                    | Some(libc::ENOTTY)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}
