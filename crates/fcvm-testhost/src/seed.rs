//! `--seed HOST_FILE[:NAME]`: host files copied onto the scratch filesystem before L1 boots,
//! natively (copying them inside L1 from the 9p root costs ~45 s for a 2 GiB sparse rootfs:
//! 9p has no `SEEK_DATA`, so every zero crosses virtio in emulated code).
//!
//! How: after `mkfs.btrfs`, one short-lived thread of ours unshares its mount namespace (made
//! private, so nothing propagates to the host's), attaches the (already unlinked) image to a
//! loop device with `LO_FLAGS_AUTOCLEAR` in one `LOOP_CONFIGURE`, mounts it, copies each file
//! sparsely (data extents only, found with `SEEK_DATA`/`SEEK_HOLE`; all-zero blocks inside them
//! become holes too, as with `cp --sparse=always`), unmounts and closes the loop device, which
//! then detaches itself. If fcvm-testhost dies at any point (SIGKILL included), the mount goes
//! with the thread's namespace and the loop device detaches when its last fd closes: nothing
//! remains.

use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::unistd::Whence;

use crate::error::{Error, Result};

/// `--seed HOST_FILE[:NAME]`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// The file on this host.
    pub host: PathBuf,
    /// Where it goes, relative to the scratch filesystem's root.
    pub name: String,
}

/// Test hook: sleep this long (ms) with the scratch image mounted, before copying, so that a
/// test can kill fcvm-testhost mid-seed.
pub const PAUSE_ENV: &str = "FCVM_TESTHOST_TEST_SEED_PAUSE_MS";

const LOOP_CONTROL: &str = "/dev/loop-control";
// <linux/loop.h>
const LOOP_CONFIGURE: u64 = 0x4C0A;
const LOOP_CTL_GET_FREE: u64 = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (`LOOP_CONFIGURE`, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Checks a `NAME`: a plain relative path (`a` or `a/b/c`), no `..`, `.`, empty components,
/// leading or trailing `/`.
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("NAME is empty".into());
    }
    if name.starts_with('/') {
        return Err("NAME must be relative to /scratch, not absolute".into());
    }
    if name.contains('\0') {
        return Err("NAME contains a NUL byte".into());
    }
    for part in name.split('/') {
        match part {
            "" => return Err("NAME has an empty path component (`//` or a trailing `/`)".into()),
            "." | ".." => return Err(format!("NAME must not contain `{part}`")),
            _ => {}
        }
    }
    Ok(())
}

/// Parses `HOST_FILE[:NAME]` (split at the last `:`; a HOST_FILE with a `:` in it needs an
/// explicit `:NAME`). The default NAME is HOST_FILE's file name.
pub fn parse(arg: &str) -> Result<Seed> {
    let bad = |why: String| Error::Usage(format!("--seed {arg:?}: {why}"));
    let (host, name) = match arg.rsplit_once(':') {
        Some((h, n)) => (h, n.to_string()),
        None => {
            let name = match Path::new(arg).components().next_back() {
                Some(Component::Normal(n)) => n.to_string_lossy().into_owned(),
                _ => return Err(bad("HOST_FILE has no file name to use as NAME".into())),
            };
            (arg, name)
        }
    };
    if host.is_empty() {
        return Err(bad("HOST_FILE is empty".into()));
    }
    validate_name(&name).map_err(bad)?;
    Ok(Seed {
        host: PathBuf::from(host),
        name,
    })
}

/// A seed whose host file is open (checked before anything is booted).
#[derive(Debug)]
pub struct Source {
    /// What was asked.
    pub seed: Seed,
    file: File,
    size: u64,
    mode: u32,
}

/// Everything `--seed` needs that can be checked before the run starts: a scratch disk, root,
/// loop devices, regular readable files, NAMEs that do not collide.
pub fn prepare(seeds: &[Seed], scratch_gib: u64) -> Result<Vec<Source>> {
    if seeds.is_empty() {
        return Ok(Vec::new());
    }
    if scratch_gib == 0 {
        return Err(Error::Usage(
            "--seed needs the scratch disk: --scratch-size must be > 0".into(),
        ));
    }
    for (i, a) in seeds.iter().enumerate() {
        for b in &seeds[i + 1..] {
            let (x, y) = (&a.name, &b.name);
            if x == y || y.starts_with(&format!("{x}/")) || x.starts_with(&format!("{y}/")) {
                return Err(Error::Usage(format!(
                    "--seed: NAMEs {x:?} and {y:?} collide"
                )));
            }
        }
    }
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        return Err(Error::Seed(format!(
            "needs root: it mounts the scratch image on a loop device on this host \
             (running as uid {euid}); run as root or copy the files inside instead"
        )));
    }
    if !Path::new(LOOP_CONTROL).exists() {
        return Err(Error::Seed(format!(
            "no loop devices on this host: {LOOP_CONTROL} is missing \
             (modprobe loop; in a container, pass the loop devices in)"
        )));
    }
    let mut out = Vec::new();
    for s in seeds {
        let not_regular =
            || Error::Usage(format!("--seed {}: not a regular file", s.host.display()));
        // stat before open: opening a FIFO would block.
        let meta = fs::metadata(&s.host).map_err(Error::io("--seed: opening", &s.host))?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        let file = File::open(&s.host).map_err(Error::io("--seed: opening", &s.host))?;
        let meta = file
            .metadata()
            .map_err(Error::io("--seed: reading", &s.host))?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        out.push(Source {
            seed: s.clone(),
            file,
            size: meta.len(),
            mode: meta.permissions().mode() & 0o7777,
        });
    }
    Ok(out)
}

/// What one seed cost.
#[derive(Debug, Clone)]
pub struct Copied {
    /// NAME.
    pub name: String,
    /// Apparent size.
    pub size: u64,
    /// Bytes actually written (data, without holes and zero blocks).
    pub written: u64,
    /// Copy time.
    pub elapsed: Duration,
}

/// A loop device bound to the scratch image, detaching itself once its last fd closes.
struct LoopDevice {
    path: PathBuf,
    _dev: File,
}

fn seed_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Seed(format!("{what}: {e}"))
}

impl LoopDevice {
    fn attach(image: &impl AsFd) -> Result<LoopDevice> {
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open(LOOP_CONTROL)
            .map_err(|e| seed_err(&format!("no loop devices: opening {LOOP_CONTROL}"), e))?;
        let mut last = Errno::EBUSY;
        // Another process may take the free device between GET_FREE and CONFIGURE: retry.
        for _ in 0..20 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument; it returns a device number or -1.
            let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
            if n < 0 {
                return Err(seed_err(
                    "no free loop device (LOOP_CTL_GET_FREE)",
                    Errno::last(),
                ));
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| {
                    seed_err(
                        &format!("opening the free loop device {}", path.display()),
                        e,
                    )
                })?;
            let mut name = [0u8; 64];
            let tag = b"fcvm-testhost-scratch";
            name[..tag.len()].copy_from_slice(tag);
            let cfg = LoopConfig {
                fd: image.as_fd().as_raw_fd() as u32,
                block_size: 0,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: LO_FLAGS_AUTOCLEAR,
                    lo_file_name: name,
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` (matching #[repr(C)] layout)
            // from the valid local `cfg` during the call; the image fd in it is open.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg) };
            if r == 0 {
                return Ok(LoopDevice { path, _dev: dev });
            }
            last = Errno::last();
            match last {
                Errno::EBUSY => continue,
                Errno::EINVAL | Errno::ENOTTY => {
                    return Err(seed_err(
                        "LOOP_CONFIGURE is not supported (the host kernel is older than 5.8)",
                        last,
                    ))
                }
                _ => break,
            }
        }
        Err(seed_err(
            "attaching the scratch image to a loop device (LOOP_CONFIGURE)",
            last,
        ))
    }
}

/// Unmounts on every way out of the seeding thread (the namespace would drop it anyway).
struct Mounted<'a>(&'a Path, bool);

impl Mounted<'_> {
    fn unmount(mut self) -> Result<()> {
        self.1 = false;
        umount2(self.0, MntFlags::empty())
            .map_err(|e| seed_err("unmounting the scratch image after seeding", e))
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if self.1 {
            let _ = umount2(self.0, MntFlags::MNT_DETACH);
        }
    }
}

/// Copies the sources onto the btrfs in `image` (read-write fd), mounted at `mountpoint` (an
/// existing empty directory) in a private mount namespace of a short-lived thread.
/// `on_mounted` is told the loop device once the filesystem is mounted.
pub fn seed_image(
    image: &impl AsFd,
    mountpoint: &Path,
    sources: &[Source],
    on_mounted: &(dyn Fn(&Path) + Sync),
) -> Result<Vec<Copied>> {
    let pause = std::env::var(PAUSE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    let image = image.as_fd();
    std::thread::scope(|s| {
        let worker = s.spawn(move || -> Result<Vec<Copied>> {
            // Only this thread changes namespace (unshare implies CLONE_FS for it alone).
            nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(|e| {
                seed_err(
                    "creating a private mount namespace (unshare CLONE_NEWNS; needs CAP_SYS_ADMIN)",
                    e,
                )
            })?;
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(|e| seed_err("making the private mount namespace private", e))?;
            let lo = LoopDevice::attach(&image)?;
            mount(
                Some(&lo.path),
                mountpoint,
                Some("btrfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .map_err(|e| {
                let hint = if e == Errno::ENODEV {
                    " (the host kernel has no btrfs: modprobe btrfs)"
                } else {
                    ""
                };
                seed_err(
                    &format!(
                        "mounting the scratch image ({}) on this host{hint}",
                        lo.path.display()
                    ),
                    e,
                )
            })?;
            let mounted = Mounted(mountpoint, true);
            on_mounted(&lo.path);
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
            let mut done = Vec::new();
            for src in sources {
                done.push(copy_one(src, mountpoint)?);
            }
            mounted.unmount()?;
            drop(lo);
            Ok(done)
        });
        worker
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn copy_one(src: &Source, root: &Path) -> Result<Copied> {
    let t = Instant::now();
    let dst_path = root.join(&src.seed.name);
    let shown = format!("/scratch/{}", src.seed.name);
    let io = |what: &str, e: std::io::Error| {
        let hint = if e.raw_os_error() == Some(libc::ENOSPC) {
            " (raise --scratch-size)"
        } else {
            ""
        };
        Error::Seed(format!(
            "{what} {} to {shown}: {e}{hint}",
            src.seed.host.display()
        ))
    };
    if let Some(parent) = dst_path.parent() {
        fs::create_dir_all(parent).map_err(|e| io("creating the directory for", e))?;
    }
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&dst_path)
        .map_err(|e| io("creating the copy of", e))?;
    let written = copy_sparse(&src.file, &dst, src.size).map_err(|e| io("copying", e))?;
    dst.set_permissions(fs::Permissions::from_mode(src.mode))
        .map_err(|e| io("setting the mode of the copy of", e))?;
    Ok(Copied {
        name: src.seed.name.clone(),
        size: src.size,
        written,
        elapsed: t.elapsed(),
    })
}

/// The granularity at which zeros inside data extents become holes.
const BLOCK: usize = 4096;
static ZEROS: [u8; BLOCK] = [0; BLOCK];

/// Copies the first `size` bytes of `src` to `dst` (empty, same offsets), writing only data:
/// holes of `src` (`SEEK_DATA`/`SEEK_HOLE`) and all-zero blocks stay holes. Returns the bytes
/// written.
pub fn copy_sparse(src: &File, dst: &File, size: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let data = match nix::unistd::lseek(src.as_raw_fd(), pos as i64, Whence::SeekData) {
            Ok(o) => o as u64,
            Err(Errno::ENXIO) => break,
            // No SEEK_DATA on this filesystem: all of it is data.
            Err(Errno::EINVAL) => pos,
            Err(e) => return Err(e.into()),
        };
        let end = match nix::unistd::lseek(src.as_raw_fd(), data as i64, Whence::SeekHole) {
            Ok(o) => (o as u64).min(size),
            Err(_) => size,
        };
        let mut off = data;
        while off < end {
            let want = ((end - off) as usize).min(buf.len());
            let n = src.read_at(&mut buf[..want], off)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file shrank while being copied",
                ));
            }
            written += write_nonzero(dst, &buf[..n], off)?;
            off += n as u64;
        }
        pos = end.max(data + 1);
    }
    dst.set_len(size)?;
    Ok(written)
}

/// Writes the runs of non-zero blocks of `chunk` (at file offset `off`); returns the bytes
/// written.
fn write_nonzero(dst: &File, chunk: &[u8], off: u64) -> std::io::Result<u64> {
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    let mut i = 0;
    while i < chunk.len() {
        let blk = &chunk[i..(i + BLOCK).min(chunk.len())];
        // Slice equality is a memcmp: fast even in debug builds.
        let zero = blk == &ZEROS[..blk.len()];
        match (zero, run) {
            (false, None) => run = Some(i),
            (true, Some(s)) => {
                dst.write_all_at(&chunk[s..i], off + s as u64)?;
                written += (i - s) as u64;
                run = None;
            }
            _ => {}
        }
        i += blk.len();
    }
    if let Some(s) = run {
        dst.write_all_at(&chunk[s..], off + s as u64)?;
        written += (chunk.len() - s) as u64;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn names() {
        for ok in [
            "a",
            "rootfs.ext4",
            "fcvm/rootfs/x.ext4",
            ".hidden",
            "a..b",
            "a b",
        ] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "/abs", "../x", "a/../b", "a/..", "..", ".", "./a", "a/./b", "a//b", "a/",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parsing() {
        let s = parse("/var/lib/x.ext4").unwrap();
        assert_eq!(s.host, PathBuf::from("/var/lib/x.ext4"));
        assert_eq!(s.name, "x.ext4");
        let s = parse("/var/lib/x.ext4:fcvm/rootfs/y.ext4").unwrap();
        assert_eq!(s.host, PathBuf::from("/var/lib/x.ext4"));
        assert_eq!(s.name, "fcvm/rootfs/y.ext4");
        let s = parse("/a:b/c:d").unwrap();
        assert_eq!((s.host.to_str().unwrap(), s.name.as_str()), ("/a:b/c", "d"));
        for bad in [
            "/a:../x",
            "/a:/etc/passwd",
            "/a:",
            ":x",
            "/",
            "/a/..",
            "/a:x/",
        ] {
            assert!(
                matches!(parse(bad), Err(Error::Usage(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn colliding_names_and_no_scratch_refused() {
        let s = |n: &str| Seed {
            host: "/nonexistent".into(),
            name: n.into(),
        };
        assert!(matches!(prepare(&[s("a")], 0), Err(Error::Usage(_))));
        for pair in [["a", "a"], ["a", "a/b"], ["a/b", "a"]] {
            let e = prepare(&[s(pair[0]), s(pair[1])], 2).unwrap_err();
            assert!(e.to_string().contains("collide"), "{pair:?}: {e}");
        }
    }

    #[test]
    fn sparse_copy_keeps_bytes_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let f = File::create(&a).unwrap();
        let size = 64u64 << 20;
        f.set_len(size).unwrap();
        let pat: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        for off in [0u64, 5 << 20, (32 << 20) + 7, size - pat.len() as u64] {
            f.write_all_at(&pat, off).unwrap();
        }
        // Explicitly written zeros: data on the source, a hole on the copy.
        f.write_all_at(&vec![0u8; 1 << 20], 16 << 20).unwrap();
        drop(f);
        let src = File::open(&a).unwrap();
        let dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&b)
            .unwrap();
        let written = copy_sparse(&src, &dst, size).unwrap();
        drop(dst);
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        assert!(written < 200 << 10, "wrote {written} bytes");
        let mb = fs::metadata(&b).unwrap();
        assert_eq!(mb.len(), size);
        // Holes on filesystems that have them (the temp dir's may not tell).
        assert!(mb.blocks() * 512 < 4 << 20, "{} blocks", mb.blocks());
    }
}
