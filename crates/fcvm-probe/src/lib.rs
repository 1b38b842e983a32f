//! The fcvm probe: a tiny x86_64 guest kernel for real-Firecracker tests.
//!
//! Firecracker boots the probe as its `kernel_image_path`. The guest fills a
//! region of its RAM with a self-describing page pattern, then wakes up on a
//! timer tick, optionally rewrites some pages (so diff snapshots have
//! something to capture), verifies the region and prints one line per tick
//! on the serial console. Everything it knows lives in guest memory, so a VM
//! restored from a snapshot carries on with the same boot id and tick count.
//!
//! The crate gives the host side everything it needs:
//!
//! * [`kernel_image`] / [`write_kernel`]: the ELF, built from
//!   `src/probe.S` by `build.rs` (needs gcc and binutils);
//! * [`ProbeArgs`]: the `probe.*` kernel command line parameters;
//! * [`output`]: a parser for the serial lines ([`output::ProbeLine`]);
//! * [`model`]: a reference model that recomputes every checksum the guest
//!   prints, from (pages, seed, dirty pages, tick).
//!
//! ```no_run
//! use fcvm_probe::{model::ProbeModel, output::ProbeLine, ProbeArgs};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! fcvm_probe::write_kernel("/tmp/probe.elf")?;
//! let args = ProbeArgs { mem_mib: 64, dirty_pages: 8, ..ProbeArgs::default() };
//! let boot_args = args.to_boot_args(); // put into Firecracker's boot-source
//! # let serial_line = "";
//! // ... later, for each line read from Firecracker's stdout:
//! if let Some(ProbeLine::Tick(tick)) = ProbeLine::parse(serial_line)? {
//!     let model = ProbeModel::from_args(&args);
//!     assert_eq!(tick, model.expected_tick(tick.n));
//! }
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod args;
pub mod model;
pub mod output;

use std::io::{self, Write};
use std::path::Path;

pub use args::ProbeArgs;

/// Guest physical address of the probe's only `PT_LOAD` segment and of its
/// entry point.
pub const KERNEL_LOAD_ADDR: u64 = 0x10_0000;

/// Guest physical address where the fill region starts; everything below is
/// the probe itself, Firecracker's boot structures and the BIOS area.
pub const FILL_BASE: u64 = 0x20_0000;

/// Highest guest physical address (exclusive) the probe maps: RAM above it
/// is not used for the fill.
pub const MAX_PHYS: u64 = 64 << 30;

static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fcvm-probe.elf"));

/// The probe kernel as an ELF64 image, ready to be written to disk and used
/// as Firecracker's `kernel_image_path`.
pub fn kernel_image() -> &'static [u8] {
    IMAGE
}

/// Writes the probe kernel to `path` atomically: into a temporary file in
/// the same directory, which is then renamed over `path`. Concurrent writers
/// and readers therefore never see a half-written kernel.
pub fn write_kernel(path: impl AsRef<Path>) -> io::Result<()> {
    let path = path.as_ref();
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".fcvm-probe-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(IMAGE)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(w)
    }

    #[test]
    fn image_has_one_load_segment_at_the_kernel_address() {
        let img = kernel_image();
        assert_eq!(&img[..4], b"\x7fELF");
        assert_eq!(img[4], 2, "ELFCLASS64");
        assert_eq!(u16_at(img, 0x12), 62, "EM_X86_64");
        assert_eq!(u64_at(img, 0x18), KERNEL_LOAD_ADDR, "entry point");
        let phoff = u64_at(img, 0x20) as usize;
        let phentsize = usize::from(u16_at(img, 0x36));
        let loads: Vec<usize> = (0..usize::from(u16_at(img, 0x38)))
            .map(|i| phoff + i * phentsize)
            .filter(|&ph| u32_at(img, ph) == 1)
            .collect();
        assert_eq!(loads.len(), 1);
        let ph = loads[0];
        assert_eq!(u64_at(img, ph + 0x18), KERNEL_LOAD_ADDR, "p_paddr");
        assert!(
            KERNEL_LOAD_ADDR + u64_at(img, ph + 0x28) <= FILL_BASE,
            "p_memsz"
        );
        let (off, filesz) = (
            u64_at(img, ph + 0x08) as usize,
            u64_at(img, ph + 0x20) as usize,
        );
        assert!(off + filesz <= img.len(), "segment lies inside the file");
    }

    #[test]
    fn write_kernel_replaces_the_file_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("probe.elf");
        std::fs::write(&path, b"old contents").unwrap();
        write_kernel(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), kernel_image());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("probe.elf")]);
    }

    #[test]
    fn write_kernel_reports_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_kernel(dir.path().join("missing/probe.elf")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
