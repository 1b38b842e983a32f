//! `fcvm setup storage`: make the base directory reflink-capable, and `fcvm setup ksm`.
//!
//! Snapshots and clones copy disks and memory files with reflinks (milliseconds whatever the
//! size). ext4 and tmpfs cannot reflink; there fcvm falls back to sparse copies, which cost
//! time (and space) proportional to the data. This step, when the base directory cannot
//! reflink, creates a loop-file btrfs next to it (`<parent>/.<name>.btrfs.img`), moves the
//! current contents in, and mounts it on the base directory. It refuses while VMs run.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::paths::Paths;
use crate::state::Store;
use crate::storage;

/// Default size of the loop filesystem.
pub const DEFAULT_SIZE: &str = "20G";

/// What `ensure` found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageOutcome {
    /// The base dir already supports reflinks.
    AlreadyReflink,
    /// A loop btrfs was created and mounted.
    LoopBtrfs {
        /// The image file.
        image: PathBuf,
        /// mkfs.btrfs version line.
        mkfs_version: String,
    },
}

/// Why storage could not be set up (fcvm still works, with slower sparse copies).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No mkfs.btrfs.
    #[error("{base} cannot reflink and mkfs.btrfs is not installed: `apt-get install btrfs-progs` and run `fcvm setup storage` again; until then fcvm copies disks and memory files byte by byte (sparse), which takes time proportional to their data")]
    NoBtrfsProgs {
        /// Base dir.
        base: PathBuf,
    },
    /// VMs are running.
    #[error("{0} VM(s) or page server(s) are running; stop them (`fcvm ls`) before moving the base directory onto new storage")]
    Busy(usize),
    /// Bad size.
    #[error("invalid --size {0:?}: use a number with K, M, G or T (e.g. 20G), at least 256M")]
    Size(String),
    /// A step failed.
    #[error("{step}: {detail}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// Output or error.
        detail: String,
    },
}

/// Parse `20G`-style sizes.
pub fn parse_size(s: &str) -> Result<u64, StorageError> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|b| *b >= 256 << 20)
        .ok_or_else(|| StorageError::Size(s.to_owned()))
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/sbin", "/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run(step: &'static str, cmd: &mut Command) -> Result<String, StorageError> {
    let out = cmd.output().map_err(|e| StorageError::Step {
        step,
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(StorageError::Step {
            step,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Make `paths.base()` reflink-capable (see the module docs).
pub fn ensure(paths: &Paths, size: u64) -> Result<StorageOutcome, StorageError> {
    let base = paths.base();
    let step = |step: &'static str| {
        move |e: std::io::Error| StorageError::Step {
            step,
            detail: e.to_string(),
        }
    };
    std::fs::create_dir_all(base).map_err(step("creating the base dir"))?;
    if storage::supports_reflink(base).map_err(step("probing reflink support"))? {
        return Ok(StorageOutcome::AlreadyReflink);
    }
    let Some(mkfs) = find_tool("mkfs.btrfs") else {
        return Err(StorageError::NoBtrfsProgs {
            base: base.to_owned(),
        });
    };
    if paths.state_dir().exists() {
        let live = Store::open(paths)
            .and_then(|s| s.list())
            .map(|l| l.iter().filter(|r| r.is_live()).count())
            .unwrap_or(0);
        if live > 0 {
            return Err(StorageError::Busy(live));
        }
    }
    let mkfs_version = run("mkfs.btrfs --version", Command::new(&mkfs).arg("--version"))?;
    let parent = base.parent().unwrap_or(Path::new("/"));
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "fcvm".into());
    let image = parent.join(format!(".{name}.btrfs.img"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&image)
        .map_err(step("creating the image file"))?;
    f.set_len(size).map_err(step("sizing the image file"))?;
    drop(f);
    let result = (|| {
        run("mkfs.btrfs", Command::new(&mkfs).arg("-q").arg(&image))?;
        // Fill the new filesystem with the current contents, then mount it over them.
        let staging = tempfile::tempdir_in(parent).map_err(step("making a mount point"))?;
        run(
            "mount the new filesystem",
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(staging.path()),
        )?;
        let copied = run(
            "copy the base dir in",
            Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", base.display()))
                .arg(staging.path()),
        );
        run("unmount", Command::new("umount").arg(staging.path()))?;
        copied?;
        for e in std::fs::read_dir(base)
            .map_err(step("reading the base dir"))?
            .flatten()
        {
            let p = e.path();
            if p.is_dir() {
                crate::fsutil::remove_dir_all_idempotent(&p)
            } else {
                crate::fsutil::remove_file_idempotent(&p)
            }
            .map_err(step("clearing the old base dir"))?;
        }
        run(
            "mount on the base dir",
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(base),
        )?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&image);
        return Err(e);
    }
    Ok(StorageOutcome::LoopBtrfs {
        image,
        mkfs_version,
    })
}

/// `fcvm setup ksm`: start ksmd (`/sys/kernel/mm/ksm/run` = 1), so VMs started with
/// `--ksm auto` (the default) get merged pages. Returns whether it was already on.
pub fn enable_ksm() -> std::io::Result<bool> {
    let was = crate::vm::spawn::ksm_running();
    if !was {
        std::fs::write("/sys/kernel/mm/ksm/run", "1")?;
    }
    Ok(was)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("1M").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("").is_err());
    }
}
