//! Integration tests that run the real `fcvm` binary. Topic modules:
//! - `cli`: argument errors and state hygiene (no VM needed)
//! - `defects`: the issue-8 defects that need no Linux guest (real Firecracker + probe)
//! - `firecracker_vm`: the real Firecracker with the probe guest
//! - `linux_guest::podman`: `fcvm podman run` and `fcvm exec` end to end (a booted Linux guest)
//! - `linux_guest::podman_cli`: issue-8 defects needing a booted Linux guest
//! - `snapshot`: snapshots, the UFFD page server and clones (real Firecracker)

mod common;

mod cli;
mod defects;
mod firecracker_vm;
mod linux_guest;
mod snapshot;
