//! `fcvm setup`: everything a host needs before the first VM.

pub mod firecracker;
pub mod probe;
