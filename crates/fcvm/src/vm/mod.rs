//! The VM lifecycle, with one owner: a [`VmSpec`] says what a VM is made of, [`launch()`]
//! records and creates it, and the returned [`VmHandle`] starts, follows and ends it.
//! Teardown is always [`crate::cleanup::teardown`].
//!
//! - `spec`: the typed description (resources, boot or snapshot source, drives, network,
//!   vsock, MMDS, launcher).
//! - `launch`: the sequence from spec to configured VM, and its errors.
//! - `handle`: start, wait, shutdown, detach, and the `Drop` backstop.
//! - `follow`: signals, events, the console loop.
//! - `api`, `spawn`: the seams to the VMM (its API calls, its process), faked in tests.
//! - `jail`: the jailer launcher (chroot, uid, cgroup, namespaces).
//! - `stop`: `fcvm stop` of a VM owned by another process.
//! - `config`: sizing limits; `console`: reading the console log.

pub mod api;
pub mod config;
pub mod console;
pub mod follow;
pub mod handle;
pub mod jail;
pub mod launch;
pub mod spawn;
pub mod spec;
pub mod stop;

#[cfg(test)]
mod tests;

pub use follow::{follow_console, Event, Signals};
pub use handle::{LaunchTimings, StopReport, VmHandle, VmState};
pub use launch::{launch, Host, LaunchError};
pub use spec::{DriveSpec, Launcher, Lifetime, MemorySource, Mmds, Resources, Source, VmSpec};
