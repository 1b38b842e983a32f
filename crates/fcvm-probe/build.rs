//! Assembles `src/probe.S` and links it with `src/probe.ld` into
//! `$OUT_DIR/fcvm-probe.elf`.
//!
//! The guest is plain GNU assembly so it builds with the host toolchain that
//! every machine has (gcc + binutils): no extra rustup target is needed.
//! `CC` and `LD` override the tools; defaults are `cc` and `ld`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = manifest.join("src/probe.S");
    let script = manifest.join("src/probe.ld");
    println!("cargo:rerun-if-changed={}", source.display());
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-env-changed=LD");

    let object = out.join("probe.o");
    let elf = out.join("fcvm-probe.elf");
    let cc = env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let ld = env::var("LD").unwrap_or_else(|_| "ld".to_owned());

    run(
        Command::new(&cc)
            .args(["-c", "-x", "assembler-with-cpp", "-m64", "-nostdinc"])
            .args(["-Wa,--fatal-warnings", "-Wa,--noexecstack"])
            .arg(&source)
            .arg("-o")
            .arg(&object),
        &cc,
    );
    run(
        Command::new(&ld)
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "-static",
                "--no-dynamic-linker",
            ])
            .args([
                "--build-id=none",
                "-z",
                "max-page-size=0x1000",
                "-z",
                "noexecstack",
            ])
            .args(["--orphan-handling=error", "--no-warn-rwx-segments", "-T"])
            .arg(&script)
            .arg("-o")
            .arg(&elf)
            .arg(&object),
        &ld,
    );
    check_elf(&elf);
}

fn run(cmd: &mut Command, tool: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("fcvm-probe: cannot run `{tool}` ({e}); the probe guest needs gcc and binutils (apt-get install gcc binutils)")
    });
    if !status.success() {
        panic!("fcvm-probe: `{cmd:?}` failed with {status}");
    }
}

/// Guards the contract Firecracker relies on: ELF64, a single PT_LOAD at
/// physical 0x100000, entry at its first byte.
fn check_elf(path: &Path) {
    let bytes = std::fs::read(path).expect("linked probe ELF is readable");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    assert_eq!(&bytes[..5], b"\x7fELF\x02", "probe is not ELF64");
    let entry = u64_at(0x18);
    let phoff = u64_at(0x20) as usize;
    let phentsize = u16_at(0x36) as usize;
    let phnum = u16_at(0x38) as usize;
    let loads: Vec<(u64, u64)> = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32_at(ph) == 1)
        .map(|ph| (u64_at(ph + 0x18), u64_at(ph + 0x28)))
        .collect();
    assert_eq!(
        loads.len(),
        1,
        "probe must have exactly one PT_LOAD, has {loads:?}"
    );
    assert_eq!(loads[0].0, 0x10_0000, "PT_LOAD p_paddr must be 0x100000");
    assert_eq!(entry, 0x10_0000, "entry must be 0x100000");
    assert!(
        loads[0].1 <= 0x10_0000,
        "image must end below 0x200000 (fill base)"
    );
}
