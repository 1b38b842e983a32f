//! fcvm-testhost: run a command inside an emulated KVM host.
//!
//! A development and test tool, not a VMM for production. QEMU in TCG mode (pure software)
//! emulates an AMD CPU with SVM; Debian's kernel inside loads `kvm_amd` and gets a real
//! `/dev/kvm`, so the real Firecracker can boot real Linux guests on machines whose own KVM cannot
//! (nested paravirtual KVM). The host's root filesystem is visible read-only inside, at the same
//! paths, so host binaries (cargo test binaries, Firecracker) run there unchanged.
//!
//! Modules, one responsibility each:
//! - [`kernel`]: the pinned Debian kernel package: fetch, verify, extract, cache;
//! - [`modules`]: which kernel modules, in dependency order;
//! - [`initramfs`]: busybox + modules + `/init`, cached;
//! - [`qemu`]: the QEMU command line and a QEMU that dies with us;
//! - [`proto`]: the framed host <-> guest protocol;
//! - [`host`]: the host side of a run; [`guest`]: the guest side (`guest-run`), with [`l1`]
//!   setting up L1 (mounts, parallel module loading);
//! - [`rundir`]: per-run temporary files and sweeping stale ones; [`cache`]: the cache.

pub mod cache;
pub mod error;
pub mod guest;
pub mod host;
pub mod initramfs;
pub mod kernel;
pub mod l1;
pub mod modules;
pub mod proto;
pub mod qemu;
pub mod rundir;

pub use error::{Error, Result};
