//! What a snapshot of a container VM records of its volumes (`volumes.json` in the
//! snapshot directory), and how a clone's `--map`/`-v` remaps them.
//!
//! Per volume: its guest path, port and host directory, the guest kernel's `FUSE_INIT`
//! request (a clone's server replays it: the guest never sends it again), and the node
//! ids and handles the guest holds, each node by its path under the volume's root (see
//! [`super::mapped`]).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{MapError, VolumeSpec};

/// The file in a snapshot directory.
pub const VOLUMES_FILE: &str = "volumes.json";

/// Every volume of a snapshotted VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumesState {
    /// In port order.
    pub volumes: Vec<VolumeState>,
}

/// One volume at the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    /// Mount point in the container.
    pub guest_path: String,
    /// The host directory served.
    pub host_dir: PathBuf,
    /// `:ro`.
    pub read_only: bool,
    /// Its vsock port.
    pub port: u32,
    /// The guest kernel's `FUSE_INIT` request, whole (none before the guest mounted it).
    #[serde(default)]
    pub init: Option<Vec<u8>>,
    /// The nodes the guest knows (the root, node 1, is implied).
    #[serde(default)]
    pub nodes: Vec<NodeState>,
    /// The handles it holds.
    #[serde(default)]
    pub handles: Vec<HandleState>,
    /// The next node id to give out (above every id the guest may hold).
    #[serde(default)]
    pub next_node: u64,
    /// The next handle to give out.
    #[serde(default)]
    pub next_handle: u64,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The guest's node id.
    pub id: u64,
    /// Its path under the root ([`encode_path`]); none when it was already gone.
    pub path: Option<String>,
    /// File type (`S_IFMT` bits): a path that is now another kind of file is stale.
    pub kind: u32,
    /// The guest's lookup count.
    pub refs: u64,
}

/// One open handle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleState {
    /// The guest's handle.
    pub fh: u64,
    /// The node it is open on.
    pub node: u64,
    /// Open flags (creation flags removed).
    pub flags: u32,
    /// A directory handle.
    pub dir: bool,
}

impl VolumeState {
    /// What serving it needs, with the host directory of `remaps` for its guest path if
    /// one is given there (`:ro` there adds to the snapshot's, it never lifts it: the
    /// guest's mount stays as it was).
    pub fn spec(&self, remaps: &[VolumeSpec]) -> VolumeSpec {
        let remap = remaps.iter().find(|r| r.guest_path == self.guest_path);
        VolumeSpec {
            host_dir: remap.map_or_else(|| self.host_dir.clone(), |r| r.host_dir.clone()),
            guest_path: self.guest_path.clone(),
            read_only: self.read_only || remap.is_some_and(|r| r.read_only),
            port: self.port,
        }
    }
}

/// Why a clone's `--map` is refused.
#[derive(Debug, thiserror::Error)]
pub enum RemapError {
    /// Bad syntax or host directory.
    #[error(transparent)]
    Map(#[from] MapError),
    /// The snapshot has no volume there.
    #[error("--map {guest:?}: snapshot {tag} has no volume at {guest} (its volumes: {known}); a clone can only give its volumes other host directories")]
    NotInSnapshot {
        /// The guest path given.
        guest: String,
        /// The snapshot.
        tag: String,
        /// The guest paths it has.
        known: String,
    },
}

impl VolumesState {
    /// The snapshot's volumes with `args` (`--map`/`-v` of `snapshot run`) applied.
    pub fn specs(&self, tag: &str, args: &[String]) -> Result<Vec<VolumeSpec>, RemapError> {
        let remaps = super::parse_maps(args)?;
        for r in &remaps {
            if !self.volumes.iter().any(|v| v.guest_path == r.guest_path) {
                let known: Vec<&str> = self.volumes.iter().map(|v| v.guest_path.as_str()).collect();
                return Err(RemapError::NotInSnapshot {
                    guest: r.guest_path.clone(),
                    tag: tag.to_owned(),
                    known: if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    },
                });
            }
        }
        Ok(self.volumes.iter().map(|v| v.spec(&remaps)).collect())
    }

    /// Read `volumes.json` of snapshot directory `dir`; empty when there is none.
    pub fn read(dir: &Path) -> std::io::Result<VolumesState> {
        match std::fs::read(dir.join(VOLUMES_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(VolumesState::default()),
            Err(e) => Err(e),
        }
    }
}

/// A path as text: bytes other than printable ASCII, and `%`, as `%XX` (names need not be
/// UTF-8).
pub fn encode_path(p: &Path) -> String {
    let mut out = String::new();
    for &b in p.as_os_str().as_bytes() {
        if (0x21..0x7f).contains(&b) && b != b'%' || b == b' ' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_path`]; `None` for malformed text.
pub fn decode_path(s: &str) -> Option<PathBuf> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(PathBuf::from(OsStr::from_bytes(&out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip_whatever_their_bytes() {
        for p in [
            &b"a/b c/d.txt"[..],
            b"100%/x",
            b"\xff\xfe/\n\t",
            b"caf\xc3\xa9",
        ] {
            let path = Path::new(OsStr::from_bytes(p));
            let s = encode_path(path);
            assert!(s.is_ascii(), "{s}");
            assert_eq!(decode_path(&s).unwrap(), path, "{s}");
        }
        assert_eq!(encode_path(Path::new("100%")), "100%25");
        assert_eq!(decode_path("%4"), None);
        assert_eq!(decode_path("%zz"), None);
    }

    #[test]
    fn remaps_replace_host_dirs_and_refuse_unknown_guest_paths() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let state = VolumesState {
            volumes: vec![
                VolumeState {
                    guest_path: "/data".into(),
                    host_dir: a.path().into(),
                    port: 5100,
                    ..VolumeState::default()
                },
                VolumeState {
                    guest_path: "/ro".into(),
                    host_dir: a.path().into(),
                    read_only: true,
                    port: 5101,
                    ..VolumeState::default()
                },
            ],
        };
        let kept = state.specs("t", &[]).unwrap();
        assert_eq!(kept[0].host_dir, a.path());
        assert_eq!(kept[1].port, 5101);
        assert!(kept[1].read_only && !kept[0].read_only);

        let bp = std::fs::canonicalize(b.path()).unwrap();
        let moved = state
            .specs(
                "t",
                &[format!("{}:/data:ro,{}:/ro:rw", bp.display(), bp.display())],
            )
            .unwrap();
        assert_eq!(moved[0].host_dir, bp);
        assert!(moved[0].read_only, ":ro on the clone is enforced");
        assert_eq!(moved[1].host_dir, bp);
        assert!(moved[1].read_only, ":rw cannot lift the snapshot's :ro");
        assert_eq!(moved[0].port, 5100);

        let e = state
            .specs("t", &[format!("{}:/elsewhere", bp.display())])
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/elsewhere") && msg.contains("/data, /ro"),
            "{msg}"
        );
        let e = state.specs("t", &["nope:/data".into()]).unwrap_err();
        assert!(matches!(e, RemapError::Map(_)), "{e}");
    }
}
