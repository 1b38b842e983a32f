//! The L1 kernel: Debian's own `linux-image-*-amd64-unsigned`, pinned by version and .deb hash,
//! fetched with `apt-get download` and cached, extracted, by the .deb's SHA256.
//!
//! Debian's kernel because it is what our machines' archive offers (the only reachable source),
//! it has every module we need (KVM, 9p, virtio, btrfs, netfilter) and it is signed off by the
//! archive's own checksums. Pinned so that every run and every machine boots the same L1.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::cache::{find_program, publish, remove_any, run_checked, temp_sibling};
use crate::error::{Error, Result};

/// Debian package of the L1 kernel (bookworm, newest `apt-cache policy` offered on 2026-12-01).
pub const PACKAGE: &str = "linux-image-6.1.0-57-amd64-unsigned";
/// Its exact version.
pub const VERSION: &str = "6.1.192-3";
/// SHA256 of the .deb, from `apt-cache show` (`SHA256:`).
pub const SHA256: &str = "f43a8dbe0b318a5491880233bb20982dc9cc8ef103dd361cd56499eea15c5191";
/// Where the pin lives, for error messages.
pub const PIN_FILE: &str = "crates/fcvm-testhost/src/kernel.rs";

/// An extracted, verified kernel package in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// The uncompressed ELF `vmlinux` (PVH entry), when it could be extracted: QEMU boots it
    /// directly, which skips SeaBIOS' kernel loading and the in-guest xz decompression: ~3.4 s
    /// of emulated time per boot.
    pub vmlinux: Option<PathBuf>,
    /// `lib/modules/<release>` of the package.
    pub modules: PathBuf,
    /// The .deb SHA256 (cache key for everything derived from it).
    pub sha256: String,
}

/// How [`ensure`] got the kernel (for `-v`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// It was in the cache.
    Cached,
    /// It was downloaded and extracted now.
    Fetched,
}

fn fetch_err(detail: impl Into<String>) -> Error {
    Error::KernelFetch {
        package: PACKAGE.to_string(),
        version: VERSION.to_string(),
        detail: detail.into(),
        pin_file: PIN_FILE.to_string(),
    }
}

fn entry_dir(cache: &Path) -> PathBuf {
    cache.join(format!("kernel-{}", &SHA256[..16]))
}

fn complete(entry: &Path) -> Option<Kernel> {
    let k = Kernel {
        vmlinuz: entry.join("vmlinuz"),
        vmlinux: Some(entry.join("vmlinux")).filter(|p| p.is_file()),
        modules: entry.join("modules"),
        sha256: SHA256.to_string(),
    };
    (k.vmlinuz.is_file() && k.modules.is_dir()).then_some(k)
}

/// Returns the cached kernel without fetching, if it is there.
pub fn cached(cache: &Path) -> Option<Kernel> {
    complete(&entry_dir(cache))
}

/// Returns the pinned kernel, fetching and publishing it into `cache` if needed.
pub fn ensure(cache: &Path) -> Result<(Kernel, Source)> {
    let entry = entry_dir(cache);
    if let Some(k) = complete(&entry) {
        return Ok((with_vmlinux(&entry, k), Source::Cached));
    }
    let apt_get = find_program("apt-get", "apt")?;
    let dpkg_deb = find_program("dpkg-deb", "dpkg")?;
    fs::create_dir_all(cache).map_err(Error::io("creating cache directory", cache))?;
    let tmp = temp_sibling(&entry);
    let result = fetch_into(&tmp, &apt_get, &dpkg_deb);
    if let Err(e) = result {
        remove_any(&tmp);
        return Err(e);
    }
    publish(&tmp.join("entry"), &entry)?;
    remove_any(&tmp);
    // Other pins' trees (~430 MiB each), once unused for a week.
    crate::cache::prune(
        cache,
        "kernel-",
        &format!("kernel-{}", &SHA256[..16]),
        std::time::Duration::from_secs(7 * 24 * 3600),
    );
    complete(&entry)
        .map(|k| (with_vmlinux(&entry, k), Source::Fetched))
        .ok_or_else(|| fetch_err("the published cache entry is incomplete"))
}

fn fetch_into(tmp: &Path, apt_get: &Path, dpkg_deb: &Path) -> Result<()> {
    let dl = tmp.join("dl");
    fs::create_dir_all(&dl).map_err(Error::io("creating", &dl))?;
    // apt-get download writes into the current directory.
    let out = Command::new(apt_get)
        .arg("download")
        .arg(format!("{PACKAGE}={VERSION}"))
        .current_dir(&dl)
        .output()
        .map_err(|e| fetch_err(format!("running apt-get: {e}")))?;
    if !out.status.success() {
        return Err(fetch_err(format!(
            "apt-get download: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let deb = fs::read_dir(&dl)
        .map_err(Error::io("listing", &dl))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| fetch_err("apt-get download produced no .deb"))?;
    let digest = sha256_file(&deb)?;
    if digest != SHA256 {
        return Err(fetch_err(format!(
            "{} has SHA256 {digest}, the pin says {SHA256}",
            deb.display()
        )));
    }
    let x = tmp.join("x");
    run_checked(
        Command::new(dpkg_deb).arg("-x").arg(&deb).arg(&x),
        "dpkg-deb -x (extracting the kernel package)",
    )?;
    let entry = tmp.join("entry");
    fs::create_dir_all(&entry).map_err(Error::io("creating", &entry))?;
    let vmlinuz = only_entry(&x.join("boot"), "vmlinuz-")?;
    fs::rename(&vmlinuz, entry.join("vmlinuz")).map_err(Error::io("moving", &vmlinuz))?;
    let modules = only_entry(&x.join("lib/modules"), "")?;
    fs::rename(&modules, entry.join("modules")).map_err(Error::io("moving", &modules))?;
    Ok(())
}

/// Adds the uncompressed `vmlinux` to a cache entry (once; best effort: without `xz` the
/// bzImage boots too, just slower).
fn with_vmlinux(entry: &Path, k: Kernel) -> Kernel {
    if k.vmlinux.is_some() {
        return k;
    }
    let out = entry.join("vmlinux");
    match extract_vmlinux(&k.vmlinuz, &out) {
        Ok(()) => Kernel {
            vmlinux: Some(out),
            ..k
        },
        Err(_) => k,
    }
}

/// The XZ stream magic; Debian's bzImage payload is XZ (`CONFIG_KERNEL_XZ`).
const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";

/// Decompresses the bzImage payload with the host's `xz` (trailing bytes after the stream are
/// ignored by `xz --single-stream`), checks it is an ELF and publishes it atomically.
pub fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    use std::io::Write;
    let xz = find_program("xz", "xz-utils")?;
    let data = fs::read(vmlinuz).map_err(Error::io("reading", vmlinuz))?;
    let at = data
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .ok_or_else(|| Error::Command {
            what: "extracting vmlinux".into(),
            detail: "no XZ payload in the bzImage".into(),
        })?;
    let tmp = temp_sibling(out);
    let f = fs::File::create(&tmp).map_err(Error::io("creating", &tmp))?;
    let mut child = Command::new(xz)
        .args(["-dc", "--single-stream", "-q"])
        .stdin(std::process::Stdio::piped())
        .stdout(f)
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| Error::Command {
            what: "running xz".into(),
            detail: e.to_string(),
        })?;
    let payload = data[at..].to_vec();
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&payload);
    });
    let st = child.wait().map_err(|e| Error::Command {
        what: "running xz".into(),
        detail: e.to_string(),
    })?;
    let _ = writer.join();
    let head = fs::read(&tmp)
        .ok()
        .map(|d| d.get(..4) == Some(b"\x7fELF"))
        .unwrap_or(false);
    if !st.success() || !head {
        let _ = fs::remove_file(&tmp);
        return Err(Error::Command {
            what: "extracting vmlinux".into(),
            detail: format!("xz: {st}"),
        });
    }
    publish(&tmp, out)
}

fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    fs::read_dir(dir)
        .map_err(Error::io("listing", dir))?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .ok_or_else(|| fetch_err(format!("no {prefix}* in {}", dir.display())))
}

/// Hex SHA256 of a file.
pub fn sha256_file(p: &Path) -> Result<String> {
    let mut f = fs::File::open(p).map_err(Error::io("opening", p))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(Error::io("reading", p))?;
    Ok(hex::encode(h.finalize()))
}
