//! Request bodies of the Firecracker API subset the stand-in serves, with Firecracker's field
//! names (swagger v1.12). Unknown fields are rejected, as Firecracker does.

use serde::{Deserialize, Serialize};

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel image; must exist (its contents are not used by the stand-in).
    pub kernel_image_path: String,
    /// Initrd holding `/init` (the agent); required by the stand-in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line, handed to the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs (1..=32).
    pub vcpu_count: u8,
    /// Memory in MiB.
    pub mem_size_mib: u32,
    /// SMT.
    #[serde(default)]
    pub smt: bool,
    /// CPU template name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Dirty page tracking.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Huge pages: "None", "2M".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            cpu_template: None,
            track_dirty_pages: false,
            huge_pages: None,
        }
    }
}

/// `PUT /drives/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Drive id (must match the path).
    pub drive_id: String,
    /// Backing file.
    pub path_on_host: String,
    /// Root device (attached first, so it becomes /dev/vda).
    pub is_root_device: bool,
    /// Read-only.
    #[serde(default)]
    pub is_read_only: bool,
    /// Partition UUID (unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// "Unsafe" or "Writeback" (unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// "Sync" or "Async" (unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Rate limiter (unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PATCH /drives/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Drive id.
    pub drive_id: String,
    /// New backing file.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// New rate limiter (unused).
    #[serde(default)]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PUT /network-interfaces/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Interface id.
    pub iface_id: String,
    /// TAP device name on the host.
    pub host_dev_name: String,
    /// Guest MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Rate limiters (unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Rate limiters (unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Guest CID (3 for fcvm).
    pub guest_cid: u32,
    /// Host-side Unix socket.
    pub uds_path: String,
    /// Deprecated id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /mmds/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// "V1" or "V2".
    #[serde(default = "default_mmds_version")]
    pub version: String,
    /// Interfaces MMDS answers on.
    pub network_interfaces: Vec<String>,
    /// MMDS address (only 169.254.169.254 is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
    /// EC2 IMDS compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_compat: Option<bool>,
}

fn default_mmds_version() -> String {
    "V1".into()
}

/// `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// "InstanceStart", "SendCtrlAltDel", "FlushMetrics".
    pub action_type: String,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// "Paused" or "Resumed".
    pub state: String,
}

/// `PUT /logger` (accepted; the stand-in logs to stderr and, if given, appends to `log_path`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Log file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Show level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Show origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Module filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}
