//! The agent initrd: `fc-agent` packed as `/init` in an uncompressed newc cpio archive.
//!
//! The agent is delivered by initrd rather than inside the root filesystem, so a new agent
//! build never forces a rootfs rebuild. The file is content-addressed by the agent's bytes
//! (`initrd/fc-agent-<sha256 prefix>.cpio`) and published by write-then-rename, so concurrent
//! callers and crashes never leave a half-written initrd under the final name. Both
//! Firecracker takes it as `boot-source.initrd_path`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::paths::Paths;

/// Environment variable naming the agent binary to use.
pub const AGENT_ENV: &str = "FCVM_AGENT_BIN";
/// File name of the agent binary when it is looked up next to the `fcvm` executable.
pub const AGENT_FILE_NAME: &str = "fc-agent";
/// Bumped when the archive layout changes, so old initrds are not reused.
const LAYOUT_VERSION: &[u8] = b"fcvm-initrd-v1";

/// Errors building the initrd.
#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    /// No agent binary was found.
    #[error("Cannot find the fc-agent binary: set {AGENT_ENV} or put `fc-agent` next to the fcvm executable (build it with `RUSTFLAGS='-C target-feature=+crt-static' cargo build --release -p fc-agent --target x86_64-unknown-linux-gnu`)")]
    AgentNotFound,
    /// The agent binary cannot be read.
    #[error("cannot read the agent binary {0}")]
    ReadAgent(PathBuf, #[source] io::Error),
    /// The agent binary is not a static ELF executable.
    #[error("{0} is not a static x86_64 ELF executable (it has a dynamic loader or is not ELF); the agent runs before any root filesystem exists, so build it with `RUSTFLAGS='-C target-feature=+crt-static'`")]
    NotStatic(PathBuf),
    /// Writing the initrd failed.
    #[error("cannot write the initrd {0}")]
    Write(PathBuf, #[source] io::Error),
}

/// A ready initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInitrd {
    /// The archive (pass it as `boot-source.initrd_path`).
    pub path: PathBuf,
    /// sha256 of the layout version and the agent bytes, hex.
    pub digest: String,
}

/// Finds the agent: `$FCVM_AGENT_BIN`, else `fc-agent` next to the running executable, else
/// (in a development checkout, where fcvm runs from `target/{debug,release}`) the static
/// build at `target/x86_64-unknown-linux-gnu/release/fc-agent`.
pub fn find_agent_binary() -> Result<PathBuf, InitrdError> {
    if let Some(p) = std::env::var_os(AGENT_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|_| InitrdError::AgentNotFound)?;
    let dir = exe.parent().ok_or(InitrdError::AgentNotFound)?;
    let static_build = Path::new("x86_64-unknown-linux-gnu/release").join(AGENT_FILE_NAME);
    let candidates = [
        dir.join(AGENT_FILE_NAME),
        dir.join("..").join(&static_build),
        // Where the integration tests build the static agent.
        dir.join("../agent-static").join(&static_build),
    ];
    // A plain `cargo build` also leaves a dynamic fc-agent next to fcvm; skip it.
    candidates
        .into_iter()
        .find(|c| looks_static(c))
        .ok_or(InitrdError::AgentNotFound)
}

/// Whether `path` is a static ELF, judged from its first page (headers only).
fn looks_static(path: &Path) -> bool {
    use std::io::Read;
    let mut head = vec![0u8; 4096];
    let Ok(n) = File::open(path).and_then(|mut f| f.read(&mut head)) else {
        return false;
    };
    head.truncate(n);
    is_static_elf(&head)
}

/// True if `elf` is an x86_64 ELF executable without a `PT_INTERP` (dynamic loader) header.
pub fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // ELF magic, 64-bit, little endian, machine x86_64 (62).
    if elf.get(..4) != Some(b"\x7fELF")
        || elf.get(4) != Some(&2)
        || elf.get(5) != Some(&1)
        || u16_at(18) != Some(62)
    {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum as usize).all(|i| {
        let at = (phoff as usize).saturating_add(i * phentsize as usize);
        matches!(u32_at(at), Some(t) if t != PT_INTERP)
    })
}

/// The archive bytes for `agent`: directories a kernel expects plus `/init`.
pub fn initrd_bytes(agent: &[u8]) -> Vec<u8> {
    use fcvm_proto::initrd::{write_newc, Entry};
    write_newc(&[
        Entry::Dir {
            name: "dev",
            mode: 0o755,
        },
        Entry::Dir {
            name: "proc",
            mode: 0o755,
        },
        Entry::Dir {
            name: "sys",
            mode: 0o755,
        },
        Entry::Dir {
            name: "newroot",
            mode: 0o755,
        },
        Entry::File {
            name: "init",
            mode: 0o755,
            data: agent,
        },
    ])
}

/// Digest naming the initrd for `agent`.
pub fn digest(agent: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update((LAYOUT_VERSION.len() as u64).to_le_bytes());
    h.update(LAYOUT_VERSION);
    h.update(agent);
    hex::encode(h.finalize())
}

/// Returns the initrd for the agent at `agent`, building it under `paths.initrd_dir()` if it
/// does not exist yet.
pub fn ensure_initrd(paths: &Paths, agent: &Path) -> Result<AgentInitrd, InitrdError> {
    let bytes = fs::read(agent).map_err(|e| InitrdError::ReadAgent(agent.to_owned(), e))?;
    if !is_static_elf(&bytes) {
        return Err(InitrdError::NotStatic(agent.to_owned()));
    }
    let digest = digest(&bytes);
    let dir = paths.initrd_dir();
    let path = dir.join(format!("fc-agent-{}.cpio", &digest[..16]));
    if path.is_file() {
        return Ok(AgentInitrd { path, digest });
    }
    fs::create_dir_all(&dir).map_err(|e| InitrdError::Write(dir.clone(), e))?;
    let werr = |e| InitrdError::Write(path.clone(), e);
    // Same directory, so the rename is atomic; a per-process name so concurrent builders do
    // not write into each other's file (they produce identical bytes, either rename wins).
    let tmp = dir.join(format!(
        ".fc-agent-{}.cpio.tmp.{}",
        &digest[..16],
        std::process::id()
    ));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&initrd_bytes(&bytes))?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(&dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(werr(e));
    }
    Ok(AgentInitrd { path, digest })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal static-looking ELF: header plus one PT_LOAD program header.
    fn fake_elf(interp: bool) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[18] = 62;
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        e[64..68].copy_from_slice(&(if interp { 3u32 } else { 1 }).to_le_bytes());
        e
    }

    #[test]
    fn static_check() {
        assert!(is_static_elf(&fake_elf(false)));
        assert!(!is_static_elf(&fake_elf(true)));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        let mut truncated = fake_elf(false);
        truncated.truncate(66); // inside the program header
        assert!(!is_static_elf(&truncated));
        if let Ok(sh) = fs::read("/bin/sh") {
            assert!(
                !is_static_elf(&sh),
                "/bin/sh is dynamically linked on Debian"
            );
        }
    }

    #[test]
    fn builds_once_content_addressed_and_readable() {
        let base = tempfile::tempdir().unwrap();
        let paths = Paths::new(base.path());
        let agent = base.path().join("fc-agent");
        fs::write(&agent, fake_elf(false)).unwrap();
        let a = ensure_initrd(&paths, &agent).unwrap();
        let data = fs::read(&a.path).unwrap();
        assert_eq!(
            fcvm_proto::initrd::find_file(&data, "init").unwrap(),
            Some(&fake_elf(false)[..])
        );
        let mtime = fs::metadata(&a.path).unwrap().modified().unwrap();
        assert_eq!(ensure_initrd(&paths, &agent).unwrap(), a);
        assert_eq!(
            fs::metadata(&a.path).unwrap().modified().unwrap(),
            mtime,
            "not rebuilt"
        );
        // A different agent gets a different file; nothing else is left in the directory.
        let mut other = fake_elf(false);
        other.push(0);
        fs::write(&agent, other).unwrap();
        let b = ensure_initrd(&paths, &agent).unwrap();
        assert_ne!(a.path, b.path);
        assert_eq!(fs::read_dir(paths.initrd_dir()).unwrap().count(), 2);
    }

    #[test]
    fn rejects_dynamic_agent() {
        let base = tempfile::tempdir().unwrap();
        let agent = base.path().join("fc-agent");
        fs::write(&agent, fake_elf(true)).unwrap();
        assert!(matches!(
            ensure_initrd(&Paths::new(base.path()), &agent),
            Err(InitrdError::NotStatic(_))
        ));
        assert!(!Paths::new(base.path()).initrd_dir().exists());
    }
}
