//! fcvm-sandbox-vmm: a stand-in for Firecracker on hosts that cannot boot a guest kernel.
//!
//! It speaks the subset of Firecracker's HTTP API fcvm uses and, on `InstanceStart`, runs the
//! real agent from the configured initrd inside fresh Linux namespaces with the configured
//! drives as block devices. See `README.md` for what is and is not simulated.

#![deny(missing_docs)]

pub mod api;
pub mod cgroup;
pub mod hvsock;
pub mod loopdev;
pub mod mmds;
pub mod netns;
pub mod sandbox_init;
pub mod spec;
pub mod testimage;
pub mod vmm;
