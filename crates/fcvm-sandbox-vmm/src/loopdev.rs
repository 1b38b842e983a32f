//! Loop devices standing in for virtio-blk drives.
//!
//! Attached with `LOOP_CONFIGURE` and `LO_FLAGS_AUTOCLEAR`: the kernel detaches the device when
//! its last user goes away (our handle and the guest's mount), so even a SIGKILLed VMM leaves
//! no loop device behind once the sandbox's mounts are gone.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use linux_raw_sys::loop_device::{
    loop_config, LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LO_FLAGS_AUTOCLEAR, LO_FLAGS_READ_ONLY,
};

/// Errors attaching a loop device.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The backing file cannot be opened.
    #[error("Cannot open drive file {0}: {1}")]
    Backing(PathBuf, io::Error),
    /// /dev/loop-control is missing or unusable.
    #[error("Cannot use /dev/loop-control (is the loop module loaded, are we root?): {0}")]
    Control(io::Error),
    /// Configuring the device failed.
    #[error("Cannot attach {file} to {dev}: {source}")]
    Configure {
        /// Backing file.
        file: PathBuf,
        /// Loop device.
        dev: String,
        /// Cause.
        source: io::Error,
    },
}

/// An attached loop device; dropping the handle lets autoclear detach it once unused.
#[derive(Debug)]
pub struct LoopDevice {
    dev: File,
    path: PathBuf,
    rdev: u64,
}

impl LoopDevice {
    /// Attaches `file`, read-only if asked.
    pub fn attach(file: &Path, read_only: bool) -> Result<Self, LoopError> {
        let backing = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(file)
            .map_err(|e| LoopError::Backing(file.to_owned(), e))?;
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(LoopError::Control)?;
        // Another process may take the free device between GET_FREE and CONFIGURE (EBUSY): retry.
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
            if n < 0 {
                return Err(LoopError::Control(io::Error::last_os_error()));
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(&path)
                .map_err(|e| LoopError::Configure {
                    file: file.to_owned(),
                    dev: path.display().to_string(),
                    source: e,
                })?;
            // SAFETY: loop_config is plain data; all-zero is a valid value.
            let mut cfg: loop_config = unsafe { std::mem::zeroed() };
            cfg.fd = backing.as_raw_fd() as u32;
            cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR as u32
                | if read_only {
                    LO_FLAGS_READ_ONLY as u32
                } else {
                    0
                };
            // SAFETY: LOOP_CONFIGURE reads one loop_config from a valid pointer.
            let rc = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    LOOP_CONFIGURE as _,
                    &cfg as *const loop_config,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EBUSY) {
                    continue;
                }
                return Err(LoopError::Configure {
                    file: file.to_owned(),
                    dev: path.display().to_string(),
                    source: e,
                });
            }
            let rdev = dev.metadata().map(|m| m.rdev()).unwrap_or(0);
            return Ok(Self { dev, path, rdev });
        }
        Err(LoopError::Configure {
            file: file.to_owned(),
            dev: "/dev/loop*".into(),
            source: io::Error::from_raw_os_error(libc::EBUSY),
        })
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device number (for mknod in the sandbox's /dev).
    pub fn rdev(&self) -> u64 {
        self.rdev
    }

    /// Keeps the handle alive (used to pin the device until cleanup).
    pub fn fd(&self) -> &File {
        &self.dev
    }
}
