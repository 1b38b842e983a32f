//! A tiny OCI image archive built from the host's static busybox, for tests without a registry.
//!
//! `podman load -i ARCHIVE` imports it as `localhost/<name>:<tag>`. The archive is an OCI image
//! layout in a tar file: `oci-layout`, `index.json` (with the `org.opencontainers.image.ref.name`
//! annotation), and `blobs/sha256/` holding the manifest, the config and one uncompressed layer
//! with `/bin/busybox` and a symlink per applet. Timestamps are zero, so the same busybox gives
//! the same bytes (and the same image id). The size is a multiple of 512 bytes, so the file can
//! be attached as a raw drive unchanged.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

/// Where Debian's `busybox-static` installs its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

/// Errors building the archive.
#[derive(Debug, thiserror::Error)]
pub enum TestImageError {
    /// busybox is missing.
    #[error("Cannot read {0}: {1} (install it with `apt-get install busybox-static`)")]
    Busybox(PathBuf, io::Error),
    /// An extra binary is missing.
    #[error("Cannot read {0}, to put into the test image: {1}")]
    Extra(PathBuf, io::Error),
    /// `busybox --list` failed.
    #[error("`{0} --list` failed; is it a busybox binary?")]
    List(PathBuf),
    /// Writing the archive failed.
    #[error("Cannot write the image archive {0}: {1}")]
    Write(PathBuf, io::Error),
}

/// A built archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageArchive {
    /// The archive file.
    pub path: PathBuf,
    /// What podman calls the image after loading it (`localhost/<name>:<tag>`).
    pub reference: String,
    /// Image id (sha256 of the config, without prefix), as `podman images --no-trunc` shows it.
    pub image_id: String,
}

fn sha256_hex(data: &[u8]) -> String {
    hex_lower(&Sha256::digest(data))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    let _ = h.set_path(path);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn append_file(
    t: &mut tar::Builder<Vec<u8>>,
    path: &str,
    data: &[u8],
    mode: u32,
) -> io::Result<()> {
    let mut h = header(path, data.len() as u64, mode, tar::EntryType::Regular);
    h.set_cksum();
    t.append(&h, data)
}

fn append_dir(t: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> io::Result<()> {
    let mut h = header(path, 0, mode, tar::EntryType::Directory);
    h.set_cksum();
    t.append(&h, io::empty())
}

/// A host file put into the image's `/bin` (a static binary: the image has no C library).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraBinary {
    /// Its name in `/bin`.
    pub name: String,
    /// The host file.
    pub source: PathBuf,
}

/// The image's single layer: busybox, applet links, the extra binaries, and a minimal /etc.
fn layer(busybox: &Path, extras: &[ExtraBinary]) -> Result<Vec<u8>, TestImageError> {
    let bin = std::fs::read(busybox).map_err(|e| TestImageError::Busybox(busybox.to_owned(), e))?;
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| TestImageError::Busybox(busybox.to_owned(), e))?;
    if !out.status.success() {
        return Err(TestImageError::List(busybox.to_owned()));
    }
    let mut applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(String::from)
        .collect();
    applets.sort();
    applets.dedup();
    let w = |e| TestImageError::Write(PathBuf::from("<layer>"), e);
    let mut t = tar::Builder::new(Vec::new());
    for d in ["bin", "etc", "tmp", "root", "proc", "sys", "dev", "var"] {
        append_dir(&mut t, d, if d == "tmp" { 0o1777 } else { 0o755 }).map_err(w)?;
    }
    append_file(&mut t, "bin/busybox", &bin, 0o755).map_err(w)?;
    for a in &applets {
        let mut h = header(&format!("bin/{a}"), 0, 0o777, tar::EntryType::Symlink);
        h.set_link_name("busybox").map_err(w)?;
        h.set_cksum();
        t.append(&h, io::empty()).map_err(w)?;
    }
    for x in extras {
        let data =
            std::fs::read(&x.source).map_err(|e| TestImageError::Extra(x.source.clone(), e))?;
        append_file(&mut t, &format!("bin/{}", x.name), &data, 0o755).map_err(w)?;
    }
    append_file(
        &mut t,
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    )
    .map_err(w)?;
    append_file(&mut t, "etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644).map_err(w)?;
    t.into_inner().map_err(w)
}

/// Builds `out` from `busybox` (usually [`DEFAULT_BUSYBOX`]), naming the image `name:tag`.
/// Written to a temporary file next to `out` and renamed, so readers never see half an archive.
pub fn build_busybox_archive(
    busybox: &Path,
    out: &Path,
    name: &str,
    tag: &str,
) -> Result<ImageArchive, TestImageError> {
    build_busybox_archive_with(busybox, &[], out, name, tag)
}

/// [`build_busybox_archive`] with `extras` in `/bin` beside busybox.
pub fn build_busybox_archive_with(
    busybox: &Path,
    extras: &[ExtraBinary],
    out: &Path,
    name: &str,
    tag: &str,
) -> Result<ImageArchive, TestImageError> {
    let layer = layer(busybox, extras)?;
    let layer_digest = sha256_hex(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": { "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["sh"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "fcvm testimage (busybox-static)" }],
    }))
    .unwrap_or_default();
    let config_digest = sha256_hex(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_digest}"), "size": layer.len() }],
    }))
    .unwrap_or_default();
    let manifest_digest = sha256_hex(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": format!("{name}:{tag}") },
        }],
    }))
    .unwrap_or_default();

    let w = |e| TestImageError::Write(out.to_owned(), e);
    let mut t = tar::Builder::new(Vec::new());
    append_file(
        &mut t,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )
    .map_err(w)?;
    append_file(&mut t, "index.json", &index, 0o644).map_err(w)?;
    append_dir(&mut t, "blobs", 0o755).map_err(w)?;
    append_dir(&mut t, "blobs/sha256", 0o755).map_err(w)?;
    for (digest, data) in [
        (&manifest_digest, &manifest),
        (&config_digest, &config),
        (&layer_digest, &layer),
    ] {
        append_file(&mut t, &format!("blobs/sha256/{digest}"), data, 0o644).map_err(w)?;
    }
    let bytes = t.into_inner().map_err(w)?;
    let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, &bytes).map_err(w)?;
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        w(e)
    })?;
    Ok(ImageArchive {
        path: out.to_owned(),
        reference: format!("localhost/{name}:{tag}"),
        image_id: config_digest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_deterministic_and_block_aligned() {
        if !Path::new(DEFAULT_BUSYBOX).exists() {
            eprintln!("SKIPPED: {DEFAULT_BUSYBOX} missing (apt-get install busybox-static)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let a = build_busybox_archive(
            Path::new(DEFAULT_BUSYBOX),
            &dir.path().join("a.tar"),
            "bb",
            "1",
        )
        .unwrap();
        let b = build_busybox_archive(
            Path::new(DEFAULT_BUSYBOX),
            &dir.path().join("b.tar"),
            "bb",
            "1",
        )
        .unwrap();
        let (da, db) = (
            std::fs::read(&a.path).unwrap(),
            std::fs::read(&b.path).unwrap(),
        );
        assert_eq!(da, db);
        assert_eq!(da.len() % 512, 0);
        assert_eq!(a.reference, "localhost/bb:1");
        let mut ar = tar::Archive::new(&da[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"index.json".to_string()));
        assert!(names.contains(&format!("blobs/sha256/{}", a.image_id)));
    }

    #[test]
    fn extras_land_in_bin_with_their_bytes_and_a_missing_one_is_named() {
        if !Path::new(DEFAULT_BUSYBOX).exists() {
            eprintln!("SKIPPED: {DEFAULT_BUSYBOX} missing (apt-get install busybox-static)");
            return;
        }
        let extra = ExtraBinary {
            name: "tool".into(),
            source: PathBuf::from(DEFAULT_BUSYBOX),
        };
        let l = layer(Path::new(DEFAULT_BUSYBOX), std::slice::from_ref(&extra)).unwrap();
        let mut ar = tar::Archive::new(&l[..]);
        let mut found = None;
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap() == Path::new("bin/tool") {
                let mut data = Vec::new();
                io::Read::read_to_end(&mut e, &mut data).unwrap();
                found = Some((e.header().mode().unwrap(), data));
            }
        }
        let (mode, data) = found.expect("bin/tool in the layer");
        assert_eq!(mode, 0o755);
        assert_eq!(data, std::fs::read(DEFAULT_BUSYBOX).unwrap());

        let missing = ExtraBinary {
            name: "gone".into(),
            source: PathBuf::from("/nonexistent/tool"),
        };
        let err = layer(Path::new(DEFAULT_BUSYBOX), &[missing]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/tool"), "{err}");
    }
}
