//! Tests that need a booted Linux guest: the real Firecracker booting fcvm's guest kernel with
//! the agent, rootfs and podman. `scripts/test.sh` runs this module apart (`linux_guest::`):
//! natively where the host's KVM boots Linux guests, otherwise inside the emulated KVM host
//! (`fcvm-testhost`). Elsewhere they skip loudly, and fail under CI.

pub mod clones;
pub mod network;
pub mod podman;
pub mod podman_cli;
pub mod registry;
pub mod volumes;
