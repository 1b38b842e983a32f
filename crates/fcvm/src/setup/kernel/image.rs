//! What Firecracker's x86_64 loader can boot: checking a `--kernel` file before use.

#[allow(unused_imports)]
use super::*;

/// The Firecracker x86_64 loader refuses segments below 1 MiB (`HIMEM_START`).
const HIMEM_START: u64 = 0x10_0000;

/// Larger "kernels" are certainly something else; don't read them into memory.
const MAX_KERNEL_BYTES: u64 = 512 << 20;

/// Why a file is not a bootable x86_64 vmlinux.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageProblem {
    /// A compressed kernel.
    #[error("it is a {0}; Firecracker on x86_64 boots the uncompressed ELF vmlinux (extract it with the kernel's scripts/extract-vmlinux)")]
    Compressed(&'static str),
    /// Not ELF at all.
    #[error("it is not an ELF file")]
    NotElf,
    /// ELF32.
    #[error("it is a 32-bit ELF file; a 64-bit vmlinux is needed")]
    NotElf64,
    /// Big endian.
    #[error("it is a big-endian ELF file")]
    BigEndian,
    /// Wrong machine.
    #[error("it is built for {0}, not x86_64")]
    WrongMachine(String),
    /// Not an executable.
    #[error("its ELF type is {0}, not an executable (ET_EXEC)")]
    NotExecutable(u16),
    /// No loadable segment.
    #[error("it has no loadable (PT_LOAD) segment")]
    NoLoadSegment,
    /// A segment below 1 MiB.
    #[error("a segment loads at {0:#x}, below 1 MiB where Firecracker keeps its boot structures")]
    LoadAddressTooLow(u64),
    /// Truncated.
    #[error("a segment reaches past the end of the file (truncated copy?)")]
    Truncated,
    /// Too big to be a kernel.
    #[error("it is {0} bytes, far larger than any kernel")]
    TooLarge(u64),
    /// The ELF structures do not parse.
    #[error("its ELF headers are malformed: {0}")]
    Malformed(String),
}

/// What [`validate_kernel_image`] learnt about a kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    /// The file.
    pub path: PathBuf,
    /// File size in bytes.
    pub size: u64,
    /// ELF entry point.
    pub entry: u64,
    /// Number of PT_LOAD segments.
    pub load_segments: usize,
    /// Lowest physical load address.
    pub lowest_load_address: u64,
    /// The `Linux version ...` banner, when the file is a Linux kernel.
    pub linux_version: Option<String>,
}

/// Check that `path` is something Firecracker's x86_64 loader accepts: an uncompressed
/// little-endian ELF64 executable for x86_64 whose segments load at or above 1 MiB and
/// lie inside the file.
pub fn validate_kernel_image(path: &Path) -> Result<KernelInfo, KernelError> {
    use object::elf::{FileHeader64, EM_386, EM_AARCH64, EM_RISCV, EM_X86_64, ET_EXEC, PT_LOAD};
    use object::read::elf::{FileHeader, ProgramHeader};
    use object::Endianness;

    let invalid = |problem| KernelError::InvalidImage {
        path: path.to_path_buf(),
        problem,
    };
    let size = fs::metadata(path)
        .map_err(io_at("cannot read kernel", path))?
        .len();
    if size > MAX_KERNEL_BYTES {
        return Err(invalid(ImageProblem::TooLarge(size)));
    }
    let data = fs::read(path).map_err(io_at("cannot read kernel", path))?;
    if let Some(kind) = compressed_kind(&data) {
        return Err(invalid(ImageProblem::Compressed(kind)));
    }
    if !data.starts_with(b"\x7fELF") {
        return Err(invalid(ImageProblem::NotElf));
    }
    if data.get(4) != Some(&2) {
        return Err(invalid(ImageProblem::NotElf64));
    }
    let malformed = |e: object::read::Error| invalid(ImageProblem::Malformed(e.to_string()));
    let header = FileHeader64::<Endianness>::parse(&*data).map_err(malformed)?;
    let endian = header.endian().map_err(malformed)?;
    if endian != Endianness::Little {
        return Err(invalid(ImageProblem::BigEndian));
    }
    let machine = header.e_machine(endian);
    if machine != EM_X86_64 {
        let name = match machine {
            EM_AARCH64 => "aarch64".to_string(),
            EM_386 => "i386".to_string(),
            EM_RISCV => "riscv".to_string(),
            other => format!("ELF machine {other}"),
        };
        return Err(invalid(ImageProblem::WrongMachine(name)));
    }
    let e_type = header.e_type(endian);
    if e_type != ET_EXEC {
        return Err(invalid(ImageProblem::NotExecutable(e_type)));
    }
    let mut load_segments = 0;
    let mut lowest = u64::MAX;
    for ph in header.program_headers(endian, &*data).map_err(malformed)? {
        if ph.p_type(endian) != PT_LOAD {
            continue;
        }
        load_segments += 1;
        let paddr = ph.p_paddr(endian);
        if paddr < HIMEM_START {
            return Err(invalid(ImageProblem::LoadAddressTooLow(paddr)));
        }
        lowest = lowest.min(paddr);
        let end = ph.p_offset(endian).checked_add(ph.p_filesz(endian));
        if end.is_none_or(|end| end > size) {
            return Err(invalid(ImageProblem::Truncated));
        }
    }
    if load_segments == 0 {
        return Err(invalid(ImageProblem::NoLoadSegment));
    }
    Ok(KernelInfo {
        path: path.to_path_buf(),
        size,
        entry: header.e_entry(endian),
        load_segments,
        lowest_load_address: lowest,
        linux_version: linux_banner(&data),
    })
}

fn compressed_kind(data: &[u8]) -> Option<&'static str> {
    if data.get(0x202..0x206) == Some(b"HdrS") {
        Some("bzImage (compressed boot image)")
    } else if data.starts_with(&[0x1f, 0x8b]) {
        Some("gzip-compressed file")
    } else if data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz-compressed file")
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd-compressed file")
    } else {
        None
    }
}

/// The `Linux version ...` banner Linux keeps in its read-only data. A vmlinux holds more
/// than one string starting that way (the banner and a shorter template); the longest is
/// the complete one, with build number and date.
fn linux_banner(data: &[u8]) -> Option<String> {
    const NEEDLE: &[u8] = b"Linux version ";
    const MAX_LEN: usize = 512;
    data.windows(NEEDLE.len())
        .enumerate()
        .filter(|(_, w)| *w == NEEDLE)
        .map(|(start, _)| {
            let rest = &data[start..data.len().min(start + MAX_LEN)];
            let end = rest
                .iter()
                .position(|&b| b == 0 || b == b'\n')
                .unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        })
        .max_by_key(String::len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 x86_64 executable: header plus one PT_LOAD at `paddr`.
    fn tiny_elf(machine: u16, e_type: u16, paddr: u64, payload: usize) -> Vec<u8> {
        let mut v = vec![0u8; 64 + 56];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2; // ELFCLASS64
        v[5] = 1; // little endian
        v[6] = 1; // EV_CURRENT
        v[16..18].copy_from_slice(&e_type.to_le_bytes());
        v[18..20].copy_from_slice(&machine.to_le_bytes());
        v[20..24].copy_from_slice(&1u32.to_le_bytes());
        v[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        v[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        v[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        v[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        v[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut v[64..120];
        ph[0..4].copy_from_slice(&object::elf::PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&(payload as u64).to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&(payload as u64).to_le_bytes()); // p_memsz
        v.extend(std::iter::repeat_n(0x90u8, payload));
        v
    }

    fn validate_bytes(bytes: &[u8]) -> Result<KernelInfo, KernelError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, bytes).unwrap();
        validate_kernel_image(&p)
    }

    fn problem(bytes: &[u8]) -> ImageProblem {
        match validate_bytes(bytes) {
            Err(KernelError::InvalidImage { problem, .. }) => problem,
            other => panic!("expected an invalid image, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_elf_is_accepted_and_described() {
        let mut bytes = tiny_elf(object::elf::EM_X86_64, object::elf::ET_EXEC, 0x100_0000, 64);
        bytes.extend_from_slice(b"Linux version 6.1.192-fcvm (fcvm@x) # SMP \0");
        bytes.extend_from_slice(b"Linux version 6.1.192-fcvm (fcvm@x) #1 SMP\n\0");
        let info = validate_bytes(&bytes).unwrap();
        assert_eq!(info.entry, 0x100_0000);
        assert_eq!(info.load_segments, 1);
        assert_eq!(info.lowest_load_address, 0x100_0000);
        assert_eq!(
            info.linux_version.as_deref(),
            Some("Linux version 6.1.192-fcvm (fcvm@x) #1 SMP")
        );
    }

    #[test]
    fn invalid_images_say_why() {
        use object::elf::{EM_AARCH64, EM_X86_64, ET_DYN, ET_EXEC};
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(matches!(problem(&bz), ImageProblem::Compressed(k) if k.contains("bzImage")));
        assert!(matches!(
            problem(&[0x1f, 0x8b, 8, 0]),
            ImageProblem::Compressed(_)
        ));
        assert_eq!(problem(b"#!/bin/sh\necho hi\n"), ImageProblem::NotElf);
        let mut elf32 = tiny_elf(EM_X86_64, ET_EXEC, 0x100_0000, 8);
        elf32[4] = 1;
        assert_eq!(problem(&elf32), ImageProblem::NotElf64);
        assert_eq!(
            problem(&tiny_elf(EM_AARCH64, ET_EXEC, 0x100_0000, 8)),
            ImageProblem::WrongMachine("aarch64".into())
        );
        assert_eq!(
            problem(&tiny_elf(EM_X86_64, ET_DYN, 0x100_0000, 8)),
            ImageProblem::NotExecutable(ET_DYN)
        );
        assert_eq!(
            problem(&tiny_elf(EM_X86_64, ET_EXEC, 0x7000, 8)),
            ImageProblem::LoadAddressTooLow(0x7000)
        );
        let mut truncated = tiny_elf(EM_X86_64, ET_EXEC, 0x100_0000, 64);
        truncated.truncate(130);
        assert_eq!(problem(&truncated), ImageProblem::Truncated);
        let err = validate_bytes(&bz).unwrap_err().to_string();
        assert!(err.contains("uncompressed ELF vmlinux"), "{err}");
    }
}
