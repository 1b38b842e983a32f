//! `fcvm setup`: everything a host needs before the first VM.
//!
//! Each step is idempotent and publishes its artifact atomically, content-addressed by its
//! inputs where it is built (rootfs, kernel, agent initrd).

pub mod artifact;
pub mod firecracker;
pub mod initrd;
pub mod kernel;
pub mod probe;
pub mod progress;
pub mod rootfs;
pub mod storage;
