//! What the VMM tells the sandbox helper process (`--sandbox-init`), as JSON in
//! [`SPEC_ENV`]. Kept separate so both sides share one definition.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Environment variable carrying the JSON [`Spec`].
pub const SPEC_ENV: &str = "FCVM_SANDBOX_SPEC";
/// Fd on which the helper reports that its namespaces exist (one byte), then closes.
pub const READY_FD: i32 = 3;
/// Fd on which the helper waits for the VMM's go-ahead (one byte; EOF means abort).
pub const GO_FD: i32 = 4;
/// Address MMDS is served on inside the sandbox.
pub const MMDS_IP: [u8; 4] = [169, 254, 169, 254];

/// A block device node to create in the sandbox's /dev.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Name under /dev (`vda`, `vdb`, ...).
    pub name: String,
    /// Device number of the loop device.
    pub rdev: u64,
    /// Read-only node.
    pub read_only: bool,
}

/// Sandbox description.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    /// Empty directory the sandbox root (a tmpfs) is mounted on.
    pub root_dir: PathBuf,
    /// The agent binary extracted from the initrd.
    pub init_path: PathBuf,
    /// Drives.
    pub devices: Vec<DeviceNode>,
    /// `cgroup.procs` files to join before creating the cgroup namespace.
    pub cgroup_procs: Vec<PathBuf>,
    /// Kernel command line for the agent.
    pub cmdline: String,
}
