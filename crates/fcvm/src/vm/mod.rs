//! Supervising VMs: starting the VMM, configuring and booting it, following its console,
//! and stopping it.

pub mod config;
pub mod console;
pub mod spawn;
pub mod stop;

pub use config::VmConfig;
pub use spawn::{spawn_vmm, spawn_vmm_with, SpawnExtras, SpawnOptions, SpawnedVmm};
