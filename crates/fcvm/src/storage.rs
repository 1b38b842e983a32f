//! Copy-on-write file copies for VM disks and snapshots.
//!
//! On btrfs and XFS a reflink copy shares extents and takes milliseconds whatever the file
//! size. Elsewhere we fall back to a sparse copy (only data extents are copied, holes stay
//! holes), which costs time proportional to the data in the file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// `FICLONE` ioctl number (`_IOW(0x94, 9, int)`).
const FICLONE: libc::c_ulong = 0x4004_9409;

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    /// Extents shared with the source.
    Reflink,
    /// Data extents copied byte for byte.
    SparseCopy,
}

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

fn cannot_reflink(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY)
    )
}

/// Try a reflink between two scratch files in `dir`.
pub fn supports_reflink(dir: &Path) -> io::Result<bool> {
    let mut src = tempfile::tempfile_in(dir)?;
    src.write_all(&[0x5a; 4096])?;
    let dst = tempfile::tempfile_in(dir)?;
    match reflink(&src, &dst) {
        Ok(()) => Ok(true),
        Err(e) if cannot_reflink(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Copy `src` to a new file `dst` (which must not exist): a reflink where the filesystem
/// allows, otherwise a sparse copy. The caller decides whether to warn about the cost.
pub fn clone_file(src: &Path, dst: &Path) -> io::Result<CopyMethod> {
    let source = File::open(src)?;
    let target = OpenOptions::new().write(true).create_new(true).open(dst)?;
    let result = match reflink(&source, &target) {
        Ok(()) => Ok(CopyMethod::Reflink),
        Err(e) if cannot_reflink(&e) => {
            sparse_copy(&source, &target).map(|()| CopyMethod::SparseCopy)
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// Copy the data extents of `src` into `dst` at the same offsets, leaving holes as holes,
/// and give `dst` the same length.
pub fn sparse_copy(src: &File, dst: &File) -> io::Result<()> {
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    copy_data_extents(src, dst, len)
}

/// Write every data extent of `src` (found with SEEK_DATA/SEEK_HOLE) over `dst` at the same
/// offset. Used both for sparse copies and for merging a diff snapshot onto its base.
/// Returns nothing; the number of bytes copied can be had from [`data_extents`].
pub fn copy_data_extents(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for (start, end) in data_extents(src, len)? {
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], off)?;
            dst.write_all_at(&buf[..n], off)?;
            off += n as u64;
        }
    }
    Ok(())
}

/// The `[start, end)` byte ranges of `file` that hold data, per SEEK_DATA/SEEK_HOLE.
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an open fd with a valid whence has no memory effects.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        extents.push((data as u64, (hole as u64).min(len)));
        pos = hole;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn clone_keeps_content_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (8 << 20) - 4).unwrap();
        f.write_all_at(&[7u8; 8192], 3 << 20).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        clone_file(&src, &dst).unwrap();
        let mut a = Vec::new();
        let mut b = Vec::new();
        File::open(&src).unwrap().read_to_end(&mut a).unwrap();
        File::open(&dst).unwrap().read_to_end(&mut b).unwrap();
        assert!(a == b);
        // Holes stay holes: far less than 8 MiB allocated.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 1 << 20);
        // Refuses to overwrite.
        assert!(clone_file(&src, &dst).is_err());
    }
}
