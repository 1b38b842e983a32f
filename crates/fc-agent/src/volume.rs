//! Guest side of `--map` volumes: a FUSE mount per volume whose channel is relayed over
//! vsock to the host's file server (`fcvm::volume::server`).
//!
//! For each volume, before the container starts: connect to host port `vsock_port`, open
//! `/dev/fuse`, mount a `fuse` file system on it at a staging directory (read-only for
//! `:ro`), then relay whole messages both ways: each `read` of `/dev/fuse` is one request,
//! written to the stream as it is; replies are read from the stream by the length in their
//! `fuse_out_header` and written to `/dev/fuse` in one `write` each, as the device requires.
//! The kernel's first request is `FUSE_INIT`, which the host answers (it decides the
//! writeback cache and the message sizes). podman then bind-mounts the staging directory.
//!
//! Each volume has [`CHANNELS`] channels: the mount's `/dev/fuse` descriptor and clones of
//! it (`FUSE_DEV_IOC_CLONE`), each relayed over a vsock connection of its own and served by
//! a host thread of its own. Any idle channel takes the next request, so one slow request
//! (a large read, an fsync) does not hold up the others. A reply must go back through the
//! clone that read its request, which the one-connection-per-clone relay guarantees.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::Context;
use fcvm_proto::plan::{Plan, Volume};
use nix::mount::{mount, MsFlags};

use crate::vsock::{Conn, Vsock};

/// Where volume `i` is mounted before podman bind-mounts it (`/run` is the agent's tmpfs).
pub const STAGING_DIR: &str = "/run/fcvm/volumes";
/// How long to wait for the host's file server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A request read from `/dev/fuse` needs room for `max_write` (1 MiB, the host's choice)
/// and its headers; the kernel refuses smaller read buffers.
const REQUEST_BUFFER: usize = (1 << 20) + 4096 * 2;
/// Largest reply accepted from the host (a 1 MiB read and its header, or a directory listing
/// of at most the size asked for).
const MAX_REPLY: usize = (1 << 20) + 4096 * 2;
/// Size of `fuse_out_header`.
const OUT_HEADER: usize = 16;
/// FUSE channels per volume.
pub const CHANNELS: usize = 4;
/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)` (`linux/fuse.h`).
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

/// The staging directory of volume `index`.
pub fn staging(index: usize) -> String {
    format!("{STAGING_DIR}/{index}")
}

/// Mount every volume of the plan and start relaying; the relays run until the VM ends.
pub fn mount_all(plan: &Plan, vsock: Vsock) -> anyhow::Result<()> {
    for (i, v) in plan.volumes.iter().enumerate() {
        mount_one(i, v, vsock).with_context(|| {
            format!(
                "cannot mount volume {} (vsock port {})",
                v.guest_path, v.vsock_port
            )
        })?;
    }
    Ok(())
}

fn open_fuse_device() -> io::Result<File> {
    let open = || File::options().read(true).write(true).open("/dev/fuse");
    match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // devtmpfs makes it when FUSE is built in; make it by hand otherwise.
            nix::sys::stat::mknod(
                "/dev/fuse",
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(10, 229),
            )
            .map_err(io::Error::from)?;
            open()
        }
        r => r,
    }
}

/// A second channel of the FUSE connection `fuse` belongs to.
fn clone_channel(fuse: &File) -> io::Result<File> {
    let clone = File::options().read(true).write(true).open("/dev/fuse")?;
    let mut source = fuse.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the source descriptor) from the pointer,
    // which points at a live u32; both descriptors are open for the whole call.
    let r = unsafe { libc::ioctl(clone.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut source) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(clone)
}

fn mount_one(index: usize, v: &Volume, vsock: Vsock) -> anyhow::Result<()> {
    // Connect first: a FUSE mount without its server would hang whoever touches it.
    let mut conns = Vec::with_capacity(CHANNELS);
    for _ in 0..CHANNELS {
        conns.push(
            vsock
                .connect(v.vsock_port, CONNECT_TIMEOUT)
                .context("the host's file server does not answer")?,
        );
    }
    let dir = staging(index);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {dir}"))?;
    let fuse = open_fuse_device().context("cannot open /dev/fuse")?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if v.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        fuse.as_raw_fd()
    );
    mount(
        Some("fcvm-volume"),
        dir.as_str(),
        Some("fuse"),
        flags,
        Some(data.as_str()),
    )
    .with_context(|| format!("cannot mount fuse at {dir}"))?;
    crate::debug!("volume {} mounted at {dir}", v.guest_path);

    let mut channels = Vec::with_capacity(CHANNELS);
    for _ in 1..CHANNELS {
        channels.push(clone_channel(&fuse).context("cannot clone the FUSE channel")?);
    }
    channels.insert(0, fuse);
    for (ch, (dev, conn)) in channels.into_iter().zip(conns).enumerate() {
        relay(index, ch, v.vsock_port, dev, conn)?;
    }
    Ok(())
}

/// Relay one channel, a thread each way.
fn relay(index: usize, ch: usize, port: u32, dev: File, conn: Conn) -> anyhow::Result<()> {
    let to_host = conn.try_clone().context("cannot clone the vsock stream")?;
    let from_kernel = dev.try_clone().context("cannot clone /dev/fuse")?;
    std::thread::Builder::new()
        .name(format!("vol{index}.{ch}-req"))
        .spawn(move || {
            if let Err(e) = requests(from_kernel, to_host) {
                crate::info!("volume port {port} channel {ch}: request relay ended: {e}");
            }
        })
        .context("cannot start a relay thread")?;
    std::thread::Builder::new()
        .name(format!("vol{index}.{ch}-rep"))
        .spawn(move || {
            if let Err(e) = replies(conn, dev) {
                crate::info!("volume port {port} channel {ch}: reply relay ended: {e}");
            }
        })
        .context("cannot start a relay thread")?;
    Ok(())
}

/// `/dev/fuse` to the host: one read is one whole request.
fn requests(mut dev: File, mut host: Conn) -> io::Result<()> {
    let mut buf = vec![0u8; REQUEST_BUFFER];
    loop {
        let n = match dev.read(&mut buf) {
            Ok(n) => n,
            // ENOENT: the request was interrupted before it was read; EINTR/EAGAIN: retry.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::EINTR | libc::EAGAIN)
                ) =>
            {
                continue
            }
            // ENODEV: unmounted.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(());
        }
        host.write_all(&buf[..n])?;
    }
}

/// The host to `/dev/fuse`: each reply by its header's length, in one write.
fn replies(mut host: Conn, mut dev: File) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_REPLY];
    loop {
        match host.read_exact(&mut buf[..OUT_HEADER]) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if !(OUT_HEADER..=MAX_REPLY).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("FUSE reply of {len} bytes"),
            ));
        }
        host.read_exact(&mut buf[OUT_HEADER..len])?;
        match dev.write(&buf[..len]) {
            Ok(_) => {}
            // The request was interrupted and is gone: its reply has no taker.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
            Err(e) => crate::info!("FUSE reply refused by the kernel: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_dirs_are_per_index_under_run() {
        assert_eq!(staging(0), "/run/fcvm/volumes/0");
        assert_eq!(staging(12), "/run/fcvm/volumes/12");
    }
}
