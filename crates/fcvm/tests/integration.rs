//! Integration tests that run the real `fcvm` binary. Topic modules:
//! - `cli`: argument errors and state hygiene (no VM needed)
//! - `defects`: the issue-8 defects that need no Linux guest (real Firecracker + probe)
//! - `firecracker_vm`: the real Firecracker with the probe guest
//! - `podman`: `fcvm podman run` and `fcvm exec` end to end (a booted Linux guest)
//! - `podman_cli`: issue-8 defects needing a booted Linux guest (skip where none boots)
//! - `snapshot`: snapshots, the UFFD page server and clones (real Firecracker)

mod common;

mod cli;
mod defects;
mod firecracker_vm;
mod podman;
mod podman_cli;
mod snapshot;
