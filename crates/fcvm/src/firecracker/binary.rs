//! Finding the Firecracker and jailer binaries and checking their versions.
//!
//! Search order: `$FCVM_FIRECRACKER_BIN` (and `$FCVM_JAILER_BIN`), then `PATH`, then
//! fcvm's own `bin/` directory where `fcvm setup firecracker` installs them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::paths::Paths;

/// Environment variable naming the firecracker binary to use.
pub const FIRECRACKER_ENV: &str = "FCVM_FIRECRACKER_BIN";
/// Environment variable naming the jailer binary to use.
pub const JAILER_ENV: &str = "FCVM_JAILER_BIN";
/// Oldest Firecracker release fcvm drives.
pub const MIN_VERSION: Version = Version {
    major: 1,
    minor: 12,
    patch: 0,
};

/// A `major.minor.patch` release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Version {
    /// Parse the first `vX.Y.Z` (or `X.Y.Z`) found in a `--version` banner.
    pub fn from_banner(text: &str) -> Option<Version> {
        text.split_whitespace().find_map(|word| {
            let word = word.strip_prefix('v').unwrap_or(word);
            let mut parts = word.split('.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            let patch_text = parts.next()?;
            let digits: String = patch_text
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            let patch = digits.parse().ok()?;
            Some(Version {
                major,
                minor,
                patch,
            })
        })
    }
}

/// Which program a lookup was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// The VMM.
    Firecracker,
    /// Firecracker's sandboxing launcher.
    Jailer,
}

impl Program {
    fn file_name(self) -> &'static str {
        match self {
            Program::Firecracker => "firecracker",
            Program::Jailer => "jailer",
        }
    }

    pub(crate) fn env(self) -> &'static str {
        match self {
            Program::Firecracker => FIRECRACKER_ENV,
            Program::Jailer => JAILER_ENV,
        }
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.file_name())
    }
}

/// A binary that was found and answered `--version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundBinary {
    /// Which program.
    pub program: Program,
    /// Where it is.
    pub path: PathBuf,
    /// What it reported.
    pub version: Version,
}

/// Why a binary is not usable.
#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    /// Not in any search location.
    #[error(
        "{program} not found (looked at ${env}, PATH and {dir}); run `fcvm setup firecracker`"
    )]
    NotFound {
        /// Which program.
        program: Program,
        /// Its environment variable.
        env: &'static str,
        /// fcvm's bin dir.
        dir: PathBuf,
    },
    /// The environment variable names a missing file.
    #[error("${env} points to {path}, which does not exist")]
    EnvPathMissing {
        /// The variable.
        env: &'static str,
        /// Its value.
        path: PathBuf,
    },
    /// Running `--version` failed.
    #[error("could not run `{path} --version`")]
    Exec {
        /// The binary.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `--version` printed nothing recognisable.
    #[error("`{path} --version` printed no version number: {output:?}")]
    NoVersion {
        /// The binary.
        path: PathBuf,
        /// What it printed.
        output: String,
    },
    /// Too old.
    #[error(
        "{path} is {program} {found}, fcvm needs {min} or newer; run `fcvm setup firecracker`"
    )]
    TooOld {
        /// Which program.
        program: Program,
        /// The binary.
        path: PathBuf,
        /// Its version.
        found: Version,
        /// The minimum.
        min: Version,
    },
}

/// Find `program` and check that it is recent enough.
///
/// The version of a given binary (identified by inode, size and mtime) is cached in the
/// base dir, so only the first command after an upgrade pays for running `--version`.
pub fn find(program: Program, paths: &Paths) -> Result<FoundBinary, BinaryError> {
    let path = locate(program, paths)?;
    let cache = VersionCache::new(paths);
    let version = match cache.get(&path) {
        Some(v) => v,
        None => {
            let v = query_version(&path)?;
            cache.put(&path, v);
            v
        }
    };
    if version < MIN_VERSION {
        return Err(BinaryError::TooOld {
            program,
            path,
            found: version,
            min: MIN_VERSION,
        });
    }
    Ok(FoundBinary {
        program,
        path,
        version,
    })
}

/// Where `program` would be taken from, without running it.
pub fn locate(program: Program, paths: &Paths) -> Result<PathBuf, BinaryError> {
    if let Some(value) = std::env::var_os(program.env()).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(value);
        if path.is_file() {
            return Ok(path);
        }
        return Err(BinaryError::EnvPathMissing {
            env: program.env(),
            path,
        });
    }
    if let Some(path) = search_path(program.file_name()) {
        return Ok(path);
    }
    let installed = paths.bin_dir().join(program.file_name());
    if is_executable(&installed) {
        return Ok(installed);
    }
    Err(BinaryError::NotFound {
        program,
        env: program.env(),
        dir: paths.bin_dir(),
    })
}

/// Run `path --version` and parse the banner.
pub fn query_version(path: &Path) -> Result<Version, BinaryError> {
    let output = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|source| BinaryError::Exec {
            path: path.to_owned(),
            source,
        })?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    Version::from_banner(&text).ok_or_else(|| BinaryError::NoVersion {
        path: path.to_owned(),
        output: text,
    })
}

/// Versions of binaries already asked, keyed by path and identified by inode/size/mtime.
struct VersionCache {
    file: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct CachedVersion {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    version: (u32, u32, u32),
}

impl VersionCache {
    fn new(paths: &Paths) -> Self {
        Self {
            file: paths.cache_dir().join("binary-versions.json"),
        }
    }

    fn identity(path: &Path) -> Option<(u64, u64, i128)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some((
            m.ino(),
            m.size(),
            i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ))
    }

    fn load(&self) -> std::collections::BTreeMap<String, CachedVersion> {
        std::fs::read(&self.file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn get(&self, path: &Path) -> Option<Version> {
        let (ino, size, mtime_ns) = Self::identity(path)?;
        let entries = self.load();
        let e = entries.get(&path.display().to_string())?;
        (e.ino == ino && e.size == size && e.mtime_ns == mtime_ns).then_some(Version {
            major: e.version.0,
            minor: e.version.1,
            patch: e.version.2,
        })
    }

    fn put(&self, path: &Path, v: Version) {
        let Some((ino, size, mtime_ns)) = Self::identity(path) else {
            return;
        };
        let mut entries = self.load();
        let version = (v.major, v.minor, v.patch);
        entries.insert(
            path.display().to_string(),
            CachedVersion {
                ino,
                size,
                mtime_ns,
                version,
            },
        );
        // Best effort: a cache that cannot be written only costs the next `--version`.
        if let Some(dir) = self.file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(bytes) = serde_json::to_vec(&entries) {
            let _ = crate::fsutil::atomic_replace(&self.file, &bytes);
        }
    }
}

fn search_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_firecracker_and_jailer_banners() {
        let fc = "Firecracker v1.12.1\n\n2026-11-29T10:54:57 [anonymous-instance:main] exiting";
        assert_eq!(
            Version::from_banner(fc),
            Some(Version {
                major: 1,
                minor: 12,
                patch: 1
            })
        );
        assert_eq!(
            Version::from_banner("Jailer v1.12.1"),
            Some(Version {
                major: 1,
                minor: 12,
                patch: 1
            })
        );
        assert_eq!(
            Version::from_banner("Firecracker v1.13.0-dev"),
            Some(Version {
                major: 1,
                minor: 13,
                patch: 0
            })
        );
        assert_eq!(Version::from_banner("no version here"), None);
    }

    #[test]
    fn version_cache_is_invalidated_when_the_binary_changes() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let bin = dir.path().join("fc");
        std::fs::write(&bin, b"one").unwrap();
        let cache = VersionCache::new(&paths);
        assert_eq!(cache.get(&bin), None);
        let v = Version {
            major: 1,
            minor: 12,
            patch: 1,
        };
        cache.put(&bin, v);
        assert_eq!(cache.get(&bin), Some(v));
        std::fs::write(&bin, b"changed").unwrap();
        assert_eq!(
            cache.get(&bin),
            None,
            "a replaced binary must be asked again"
        );
    }

    #[test]
    fn ordering_checks_the_minimum() {
        assert!(
            Version {
                major: 1,
                minor: 11,
                patch: 9
            } < MIN_VERSION
        );
        assert!(
            Version {
                major: 1,
                minor: 12,
                patch: 0
            } >= MIN_VERSION
        );
        assert!(
            Version {
                major: 2,
                minor: 0,
                patch: 0
            } > MIN_VERSION
        );
    }
}
