//! Where the container image comes from, and how it reaches the guest.
//!
//! - A registry reference: the agent pulls it (the guest needs network access).
//! - `--image-archive FILE`: an OCI or docker archive, attached read-only as the second drive
//!   (`/dev/vdb`); the agent runs `podman load` on it.
//! - `localhost/...`: an image in this host's podman storage, exported once with
//!   `podman save` into `images/` and then attached like an archive. For hosts without a
//!   registry.

use std::path::{Path, PathBuf};
use std::process::Command;

use fcvm_proto::plan::ImageSource;

use crate::paths::Paths;

/// Guest device of the image drive: the second drive Firecracker attaches.
pub use fcvm_proto::cmdline::IMAGE_DEVICE;

/// Prefix of references taken from the host's podman storage.
pub const LOCAL_PREFIX: &str = "localhost/";

/// Block devices are made of 512-byte sectors; a file of another size loses its tail.
const SECTOR: u64 = 512;

/// Why the image cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Neither an image nor an archive.
    #[error("no image given: pass an image reference, or --image-archive FILE")]
    Missing,
    /// The archive file is unusable.
    #[error("--image-archive {path}: {reason}")]
    Archive {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `--tls-verify` for an image that is not pulled.
    #[error("--tls-verify applies to images pulled from a registry; {0} is not pulled")]
    TlsVerifyWithoutPull(String),
    /// A reference with whitespace or control characters.
    #[error("invalid image reference {0:?}")]
    BadReference(String),
    /// `localhost/` image but no podman on the host.
    #[error("{0} names an image in this host's podman storage, but podman is not installed here; install podman, or export the image elsewhere (`podman save -o img.tar {0}`) and pass --image-archive img.tar")]
    NoHostPodman(String),
    /// Host podman does not know the image.
    #[error("host podman has no image {reference}: {detail}\n  (list local images with `podman images`)")]
    NotInHostStorage {
        /// The reference.
        reference: String,
        /// podman's message.
        detail: String,
    },
    /// `podman save` failed.
    #[error("`podman save {reference}` failed: {detail}")]
    Save {
        /// The reference.
        reference: String,
        /// What went wrong.
        detail: String,
    },
}

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRequest {
    /// Pulled by the agent.
    Registry {
        /// The reference.
        reference: String,
        /// `--tls-verify`.
        tls_verify: bool,
    },
    /// An archive file; `reference` may be empty (the agent then uses what `podman load` names).
    Archive {
        /// The file.
        file: PathBuf,
        /// Reference to run.
        reference: String,
    },
    /// From the host's podman storage.
    HostPodman(String),
}

/// The image as the VM gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// What the plan says.
    pub source: ImageSource,
    /// Read-only drive to attach, if any.
    pub drive: Option<PathBuf>,
    /// Name for `fcvm ls`.
    pub display: String,
}

/// Decide where the image comes from; checks only what costs nothing. `tls_verify` is
/// `--tls-verify` (None: not given), which only a registry pull takes.
pub fn classify(
    image: Option<&str>,
    archive: Option<&Path>,
    tls_verify: Option<bool>,
) -> Result<ImageRequest, ImageError> {
    if let Some(r) = image {
        if r.is_empty() || r.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ImageError::BadReference(r.to_owned()));
        }
    }
    let req = match (image, archive) {
        (reference, Some(file)) => ImageRequest::Archive {
            file: file.to_owned(),
            reference: reference.unwrap_or_default().to_owned(),
        },
        (Some(r), None) if r.starts_with(LOCAL_PREFIX) => ImageRequest::HostPodman(r.into()),
        (Some(r), None) => ImageRequest::Registry {
            reference: r.into(),
            tls_verify: tls_verify.unwrap_or(true),
        },
        (None, None) => return Err(ImageError::Missing),
    };
    match (&req, tls_verify) {
        (ImageRequest::Archive { file, .. }, Some(_)) => Err(ImageError::TlsVerifyWithoutPull(
            format!("the image from --image-archive {}", file.display()),
        )),
        (ImageRequest::HostPodman(r), Some(_)) => Err(ImageError::TlsVerifyWithoutPull(format!(
            "{r} (from this host's podman storage)"
        ))),
        _ => Ok(req),
    }
}

/// Check an archive file before a VM is made for it.
pub fn check_archive(file: &Path) -> Result<PathBuf, ImageError> {
    let bad = |reason: String| ImageError::Archive {
        path: file.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(file).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() == 0 || meta.len() % SECTOR != 0 {
        return Err(bad(format!(
            "its size ({} bytes) is not a positive multiple of {SECTOR}; is it a tar archive from `podman save`?",
            meta.len()
        )));
    }
    std::fs::canonicalize(file).map_err(|e| bad(e.to_string()))
}

/// Make the image available to a VM: check an archive, or export a host image.
pub fn resolve(paths: &Paths, req: &ImageRequest) -> Result<ResolvedImage, ImageError> {
    match req {
        ImageRequest::Registry {
            reference,
            tls_verify,
        } => Ok(ResolvedImage {
            source: ImageSource::Registry {
                reference: reference.clone(),
                tls_verify: *tls_verify,
            },
            drive: None,
            display: reference.clone(),
        }),
        ImageRequest::Archive { file, reference } => {
            let drive = check_archive(file)?;
            Ok(ResolvedImage {
                source: ImageSource::Archive {
                    device: IMAGE_DEVICE.into(),
                    reference: reference.clone(),
                },
                display: if reference.is_empty() {
                    file.display().to_string()
                } else {
                    reference.clone()
                },
                drive: Some(drive),
            })
        }
        ImageRequest::HostPodman(r) => {
            let drive = export_host_image(paths, r)?;
            Ok(ResolvedImage {
                source: ImageSource::Archive {
                    device: IMAGE_DEVICE.into(),
                    reference: r.clone(),
                },
                drive: Some(drive),
                display: r.clone(),
            })
        }
    }
}

fn find_podman() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("podman"))
        .find(|p| p.is_file())
}

/// `podman save` the image into `images/<id>.oci.tar` unless that exists (image ids are
/// content hashes, so an existing file is the same image).
fn export_host_image(paths: &Paths, reference: &str) -> Result<PathBuf, ImageError> {
    let podman = find_podman().ok_or_else(|| ImageError::NoHostPodman(reference.into()))?;
    let out = Command::new(&podman)
        .args(["image", "inspect", "--format", "{{.Id}}", reference])
        .output()
        .map_err(|e| ImageError::NotInHostStorage {
            reference: reference.into(),
            detail: e.to_string(),
        })?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ImageError::NotInHostStorage {
            reference: reference.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let dir = paths.images_dir();
    let file = dir.join(format!("{}.oci.tar", &id[..id.len().min(24)]));
    if file.is_file() {
        return Ok(file);
    }
    let save_err = |detail: String| ImageError::Save {
        reference: reference.into(),
        detail,
    };
    std::fs::create_dir_all(&dir).map_err(|e| save_err(format!("{}: {e}", dir.display())))?;
    let tmp = dir.join(format!(".{id}.tmp.{}", std::process::id()));
    let out = Command::new(&podman)
        .args(["save", "--format", "oci-archive", "-o"])
        .arg(&tmp)
        .arg(reference)
        .output()
        .map_err(|e| save_err(e.to_string()));
    let result = out.and_then(|out| {
        if out.status.success() {
            std::fs::rename(&tmp, &file).map_err(|e| save_err(e.to_string()))
        } else {
            Err(save_err(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ))
        }
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(
            classify(Some("docker.io/library/alpine"), None, None).unwrap(),
            ImageRequest::Registry {
                reference: "docker.io/library/alpine".into(),
                tls_verify: true
            }
        );
        assert_eq!(
            classify(Some("10.0.0.1:5000/a:1"), None, Some(false)).unwrap(),
            ImageRequest::Registry {
                reference: "10.0.0.1:5000/a:1".into(),
                tls_verify: false
            }
        );
        assert_eq!(
            classify(Some("localhost/app:1"), None, None).unwrap(),
            ImageRequest::HostPodman("localhost/app:1".into())
        );
        assert_eq!(
            classify(Some("localhost/app:1"), Some(Path::new("/x.tar")), None).unwrap(),
            ImageRequest::Archive {
                file: "/x.tar".into(),
                reference: "localhost/app:1".into()
            }
        );
        assert!(matches!(
            classify(None, None, None),
            Err(ImageError::Missing)
        ));
        assert!(matches!(
            classify(Some("a b"), None, None),
            Err(ImageError::BadReference(_))
        ));
        // Only a pull verifies TLS: the flag elsewhere is a mistake, named.
        for (image, archive) in [
            (Some("localhost/app:1"), None),
            (None, Some(Path::new("/x.tar"))),
        ] {
            let e = classify(image, archive, Some(false))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("--tls-verify applies to images pulled"),
                "{e}"
            );
        }
    }

    #[test]
    fn archive_checks() {
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("odd.tar");
        std::fs::write(&odd, b"abc").unwrap();
        let msg = check_archive(&odd).unwrap_err().to_string();
        assert!(msg.contains("multiple of 512"), "{msg}");
        let missing = check_archive(&dir.path().join("none.tar"))
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("--image-archive"), "{missing}");
        let good = dir.path().join("good.tar");
        std::fs::write(&good, vec![0u8; 1024]).unwrap();
        assert_eq!(check_archive(&good).unwrap(), good.canonicalize().unwrap());
    }
}
