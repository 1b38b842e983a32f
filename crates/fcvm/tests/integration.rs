//! Integration tests that run the real `fcvm` binary. Topic modules:
//! - `cli`: argument errors and state hygiene (no VM needed)
//! - `firecracker_vm`: the real Firecracker with the probe guest
//! - `podman`: `fcvm podman run` and `fcvm exec` through the sandbox VMM
//! - `snapshot`: snapshots, the UFFD page server and clones (real Firecracker)

mod common;

mod cli;
mod firecracker_vm;
mod podman;
mod snapshot;
