//! `--map` / `-v` host directories in the container, over FUSE-over-vsock.
//!
//! - [`parse_maps`] checks `HOST_DIR:GUEST_PATH[:ro]` items before anything is created;
//! - [`server`] serves each directory to the guest on its own vsock port, for as long as the
//!   VM runs;
//! - the agent mounts each one with FUSE and hands it to podman as a bind mount (see
//!   `fc-agent/src/volume.rs`).

pub mod server;

use std::path::{Path, PathBuf};

use fcvm_proto::vsock::VOLUME_PORT_BASE;

/// Most volumes one VM can have (one vsock port each, from [`VOLUME_PORT_BASE`]).
pub const MAX_VOLUMES: usize = 64;

/// A checked `--map` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The host directory, canonical (symlinks resolved), as given when it was checked.
    pub host_dir: PathBuf,
    /// Mount point in the container: absolute, normalised (no `.`, `..`, doubled or trailing
    /// slash), never `/`.
    pub guest_path: String,
    /// Refuse every write, on the host (EROFS) and in the guest (a read-only mount).
    pub read_only: bool,
    /// The vsock port the guest reaches this volume's server on.
    pub port: u32,
}

impl VolumeSpec {
    /// What the agent needs.
    pub fn plan_volume(&self) -> fcvm_proto::plan::Volume {
        fcvm_proto::plan::Volume {
            guest_path: self.guest_path.clone(),
            vsock_port: self.port,
            read_only: self.read_only,
        }
    }
}

/// Why a `--map` / `-v` item is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// No `:` between the two paths.
    #[error("invalid volume {0:?}: expected HOST_DIR:GUEST_PATH[:ro]")]
    Syntax(String),
    /// `:/data` or `,,`.
    #[error("invalid volume {0:?}: the host directory is empty")]
    EmptyHost(String),
    /// `data:/data`.
    #[error("invalid volume {item:?}: the host directory {host:?} is not an absolute path")]
    RelativeHost {
        /// The item.
        item: String,
        /// The host part.
        host: String,
    },
    /// The host directory does not exist (or cannot be looked at).
    #[error("invalid volume {item:?}: host directory {host:?} does not exist ({reason})")]
    MissingHost {
        /// The item.
        item: String,
        /// The host part.
        host: String,
        /// The OS's word for it.
        reason: String,
    },
    /// The host path is a file (or a device, ...).
    #[error("invalid volume {item:?}: host path {host:?} is not a directory")]
    NotADirectory {
        /// The item.
        item: String,
        /// The host part.
        host: String,
    },
    /// `/data:` or `/data:data`.
    #[error("invalid volume {item:?}: the container path {guest:?} must be an absolute path")]
    RelativeGuest {
        /// The item.
        item: String,
        /// The guest part.
        guest: String,
    },
    /// `/data:/` or `/data:/x/..`.
    #[error("invalid volume {item:?}: the container path cannot be / (nor contain ..)")]
    GuestRoot {
        /// The item.
        item: String,
    },
    /// Two volumes on one mount point.
    #[error("container path {0:?} is mapped twice")]
    DuplicateGuest(String),
    /// `:rw,z` and the like.
    #[error("invalid volume {item:?}: unknown option {option:?} (only ro and rw are supported)")]
    UnknownOption {
        /// The item.
        item: String,
        /// The option.
        option: String,
    },
    /// More than [`MAX_VOLUMES`].
    #[error("too many volumes: {0} (at most {MAX_VOLUMES})")]
    TooMany(usize),
}

/// Parses every `--map` / `-v` argument: each is `HOST_DIR:GUEST_PATH[:ro|:rw]`, or several
/// joined with commas. Paths containing `:` or `,` cannot be given. The host directories are
/// checked now (they must exist and be directories) and the ports given in order.
pub fn parse_maps(args: &[String]) -> Result<Vec<VolumeSpec>, MapError> {
    let mut out: Vec<VolumeSpec> = Vec::new();
    for item in args.iter().flat_map(|a| a.split(',')) {
        let mut v = parse_one(item)?;
        if out.iter().any(|o| o.guest_path == v.guest_path) {
            return Err(MapError::DuplicateGuest(v.guest_path));
        }
        if out.len() == MAX_VOLUMES {
            return Err(MapError::TooMany(out.len() + 1));
        }
        v.port = VOLUME_PORT_BASE + out.len() as u32;
        out.push(v);
    }
    Ok(out)
}

fn parse_one(item: &str) -> Result<VolumeSpec, MapError> {
    let mut parts = item.splitn(3, ':');
    let host = parts.next().unwrap_or_default();
    let guest = parts
        .next()
        .ok_or_else(|| MapError::Syntax(item.to_owned()))?;
    let read_only = match parts.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(option) => {
            return Err(MapError::UnknownOption {
                item: item.to_owned(),
                option: option.to_owned(),
            })
        }
    };
    let host_dir = check_host(item, host)?;
    let guest_path = normalise_guest(item, guest)?;
    Ok(VolumeSpec {
        host_dir,
        guest_path,
        read_only,
        port: 0,
    })
}

fn check_host(item: &str, host: &str) -> Result<PathBuf, MapError> {
    if host.is_empty() {
        return Err(MapError::EmptyHost(item.to_owned()));
    }
    if !Path::new(host).is_absolute() {
        return Err(MapError::RelativeHost {
            item: item.to_owned(),
            host: host.to_owned(),
        });
    }
    let missing = |e: std::io::Error| MapError::MissingHost {
        item: item.to_owned(),
        host: host.to_owned(),
        reason: e.to_string(),
    };
    let canonical = std::fs::canonicalize(host).map_err(missing)?;
    let meta = std::fs::metadata(&canonical).map_err(missing)?;
    if !meta.is_dir() {
        return Err(MapError::NotADirectory {
            item: item.to_owned(),
            host: host.to_owned(),
        });
    }
    Ok(canonical)
}

fn normalise_guest(item: &str, guest: &str) -> Result<String, MapError> {
    if !guest.starts_with('/') {
        return Err(MapError::RelativeGuest {
            item: item.to_owned(),
            guest: guest.to_owned(),
        });
    }
    let mut parts = Vec::new();
    for c in guest.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(MapError::GuestRoot {
                    item: item.to_owned(),
                })
            }
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(MapError::GuestRoot {
            item: item.to_owned(),
        });
    }
    Ok(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn good_items_repeated_and_comma_lists() {
        let d = tempfile::tempdir().unwrap();
        let e = tempfile::tempdir().unwrap();
        let (dp, ep) = (d.path().display(), e.path().display());
        let v = parse_maps(&items(&[
            &format!("{dp}:/logs"),
            &format!("{ep}:/data:ro,{dp}/:/x/./y//:rw"),
        ]))
        .unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].guest_path, "/logs");
        assert!(!v[0].read_only);
        assert_eq!(v[0].port, VOLUME_PORT_BASE);
        assert_eq!(v[1].guest_path, "/data");
        assert!(v[1].read_only);
        assert_eq!(v[1].port, VOLUME_PORT_BASE + 1);
        assert_eq!(v[2].guest_path, "/x/y");
        assert!(!v[2].read_only);
        assert_eq!(v[0].host_dir, std::fs::canonicalize(d.path()).unwrap());
        assert_eq!(v[2].host_dir, v[0].host_dir);
        assert_eq!(
            v[1].plan_volume(),
            fcvm_proto::plan::Volume {
                guest_path: "/data".into(),
                vsock_port: VOLUME_PORT_BASE + 1,
                read_only: true
            }
        );
        assert_eq!(parse_maps(&[]).unwrap(), Vec::new());
    }

    #[test]
    fn a_symlinked_host_dir_is_resolved() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        let v = parse_maps(&items(&[&format!("{}/link:/l", d.path().display())])).unwrap();
        assert_eq!(v[0].host_dir, std::fs::canonicalize(&real).unwrap());
    }

    #[test]
    fn bad_items_name_the_bad_part() {
        let d = tempfile::tempdir().unwrap();
        let dp = d.path().display().to_string();
        let file = d.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let fp = file.display().to_string();
        let err = |s: &str| parse_maps(&items(&[s])).unwrap_err();

        assert!(matches!(err("/tmp"), MapError::Syntax(_)));
        assert!(matches!(err(":/data"), MapError::EmptyHost(_)));
        assert!(matches!(err(&format!("{dp}:/a,")), MapError::Syntax(_)));
        let e = err("rel/dir:/data");
        assert!(matches!(e, MapError::RelativeHost { .. }), "{e}");
        assert!(e.to_string().contains("\"rel/dir\""), "{e}");
        let e = err(&format!("{dp}/missing:/data"));
        assert!(matches!(e, MapError::MissingHost { .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
        let e = err(&format!("{fp}:/data"));
        assert!(matches!(e, MapError::NotADirectory { .. }), "{e}");
        assert!(e.to_string().contains("not a directory"), "{e}");
        let e = err(&format!("{dp}:data"));
        assert!(matches!(e, MapError::RelativeGuest { .. }), "{e}");
        assert!(matches!(
            err(&format!("{dp}:")),
            MapError::RelativeGuest { .. }
        ));
        assert!(matches!(
            err(&format!("{dp}:/")),
            MapError::GuestRoot { .. }
        ));
        assert!(matches!(
            err(&format!("{dp}://.")),
            MapError::GuestRoot { .. }
        ));
        assert!(matches!(
            err(&format!("{dp}:/a/../b")),
            MapError::GuestRoot { .. }
        ));
        let e = err(&format!("{dp}:/data:z"));
        assert_eq!(
            e,
            MapError::UnknownOption {
                item: format!("{dp}:/data:z"),
                option: "z".into()
            }
        );
        let e = err(&format!("{dp}:/data:ro:x"));
        assert!(matches!(e, MapError::UnknownOption { .. }), "{e}");
        let e = parse_maps(&items(&[
            &format!("{dp}:/data"),
            &format!("{dp}:/data/:ro"),
        ]))
        .unwrap_err();
        assert_eq!(e, MapError::DuplicateGuest("/data".into()));
    }

    #[test]
    fn too_many_volumes() {
        let d = tempfile::tempdir().unwrap();
        let many: Vec<String> = (0..=MAX_VOLUMES)
            .map(|i| format!("{}:/v{i}", d.path().display()))
            .collect();
        assert_eq!(
            parse_maps(&many).unwrap_err(),
            MapError::TooMany(MAX_VOLUMES + 1)
        );
        assert_eq!(parse_maps(&many[..MAX_VOLUMES]).unwrap().len(), MAX_VOLUMES);
    }
}
