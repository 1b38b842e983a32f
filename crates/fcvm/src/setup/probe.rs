//! The built-in probe guest kernel (crate `fcvm-probe`), written to the kernels dir on
//! demand so `--kernel probe` works without any download.

use std::io;
use std::path::PathBuf;

use crate::fsutil;
use crate::paths::Paths;

/// The keyword users pass as `--kernel` to boot the probe guest.
pub const PROBE_KEYWORD: &str = "probe";

/// Write the probe kernel (content-addressed, so re-running is a no-op) and return its path.
pub fn ensure(paths: &Paths) -> io::Result<PathBuf> {
    let image = fcvm_probe::kernel_image();
    let digest = fsutil::sha256_bytes(image);
    let dir = paths.kernels_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("fcvm-probe-{}.elf", &digest[..12]));
    if !path.exists() {
        fsutil::atomic_write(&path, image)?;
    }
    Ok(path)
}
