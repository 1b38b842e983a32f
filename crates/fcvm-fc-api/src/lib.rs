//! The Firecracker HTTP API as fcvm uses it: request and response bodies of the calls fcvm
//! makes, with the field names of Firecracker's swagger spec (v1.12).
//!
//! Request bodies reject unknown fields, as Firecracker does, so a typo fails loudly in
//! tests that deserialize what fcvm sends. Enumerated values (MMDS version, drive cache and
//! I/O engine, memory backend, actions) are enums, never strings. Optional
//! fields are skipped when unset so that Firecracker applies its own defaults.

#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

/// `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (1..=32).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u32,
    /// Simultaneous multithreading; Firecracker rejects `true` on some hosts.
    #[serde(default)]
    pub smt: bool,
    /// CPU template name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Needed for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// `None`, `2M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    /// Firecracker's own defaults: 1 vCPU, 128 MiB.
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

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Uncompressed ELF kernel on the host.
    pub kernel_image_path: String,
    /// Optional initrd on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Identifier, also the last path segment.
    pub drive_id: String,
    /// Backing file on the host.
    pub path_on_host: String,
    /// Whether the guest boots from it (it then becomes /dev/vda).
    pub is_root_device: bool,
    /// Read-only to the guest.
    #[serde(default)]
    pub is_read_only: bool,
    /// Partition UUID of the root partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Host page cache use; Firecracker's default is [`CacheType::Unsafe`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Block I/O engine; Firecracker's default is [`IoEngine::Sync`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// Rate limiter, passed through as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

impl Drive {
    /// A drive backed by `path_on_host`; `root` makes it the boot device (`/dev/vda`).
    pub fn new(
        drive_id: impl Into<String>,
        path_on_host: impl Into<String>,
        root: bool,
        read_only: bool,
    ) -> Drive {
        Drive {
            drive_id: drive_id.into(),
            path_on_host: path_on_host.into(),
            is_root_device: root,
            is_read_only: read_only,
            ..Drive::default()
        }
    }
}

/// `Drive::cache_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes from the guest are ignored (fast, not crash-safe on the host).
    Unsafe,
    /// Flushes from the guest reach the backing file.
    Writeback,
}

/// `Drive::io_engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking I/O on Firecracker's device thread.
    Sync,
    /// io_uring (developer preview in v1.12).
    Async,
}

/// `PATCH /drives/{drive_id}`: retarget a drive after a snapshot load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Identifier of an existing drive.
    pub drive_id: String,
    /// New backing file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// New rate limiter, passed through as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Identifier, e.g. `eth0`.
    pub iface_id: String,
    /// TAP device name in Firecracker's network namespace.
    pub host_dev_name: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Receive rate limiter, passed through as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Transmit rate limiter, passed through as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `PUT /vsock`: a hybrid vsock backed by a Unix socket on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Guest context id (3 or higher).
    pub guest_cid: u32,
    /// Host Unix socket; guest-initiated streams go to `<uds_path>_<port>`.
    pub uds_path: String,
    /// Deprecated device id, still accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /mmds/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// Protocol version; Firecracker defaults to [`MmdsVersion::V1`].
    #[serde(default)]
    pub version: MmdsVersion,
    /// Interfaces through which the guest reaches MMDS.
    pub network_interfaces: Vec<String>,
    /// Defaults to 169.254.169.254.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
    /// EC2 IMDS compatibility.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_compat: Option<bool>,
}

/// `MmdsConfig::version`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Plain GETs (Firecracker's default).
    #[default]
    V1,
    /// Session tokens (`PUT /latest/api/token` first), like EC2 IMDSv2.
    V2,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Inject Ctrl+Alt+Del through the i8042 controller (x86_64 graceful stop).
    SendCtrlAltDel,
    /// Flush the metrics file.
    FlushMetrics,
}

/// Body of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    /// What to do.
    pub action_type: ActionType,
}

/// Run state for `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// vCPUs stopped; required before a snapshot.
    Paused,
    /// vCPUs running.
    Resumed,
}

/// Body of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Requested state.
    pub state: VmState,
}

/// Kind of memory snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// Every guest page.
    Full,
    /// Only pages dirtied since the last snapshot (needs `track_dirty_pages`).
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreateParams {
    /// Where the guest memory goes.
    pub mem_file_path: String,
    /// Where the device and vCPU state goes.
    pub snapshot_path: String,
    /// Full when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// How a restored VM gets its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// Map the memory file privately.
    File,
    /// Ask a userfaultfd page server listening on `backend_path`.
    Uffd,
}

/// Memory backend of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file, or the page server's socket.
    pub backend_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotLoadParams {
    /// Device and vCPU state file.
    pub snapshot_path: String,
    /// Where memory comes from.
    pub mem_backend: MemBackend,
    /// Keep tracking dirty pages, so the restored VM can itself take diff snapshots.
    /// Sent under its older name: v1.12.1 rejects `track_dirty_pages` on load, and later
    /// versions still accept `enable_diff_snapshots` as an alias.
    #[serde(
        default,
        rename = "enable_diff_snapshots",
        skip_serializing_if = "Option::is_none"
    )]
    pub track_dirty_pages: Option<bool>,
    /// Resume right after loading. fcvm loads paused, patches drives, then resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
}

/// `GET /` (instance info).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The `--id` Firecracker was started with.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// Firecracker's version.
    pub vmm_version: String,
    /// Name of the application (`Firecracker`).
    #[serde(default)]
    pub app_name: String,
}

/// `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    /// e.g. `1.12.1`.
    pub firecracker_version: String,
}

/// Error body Firecracker returns with 4xx/5xx.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Human-readable reason.
    pub fault_message: String,
}

/// `GET /vm/config`: the full configuration as Firecracker sees it.
///
/// Kept loose (JSON values for the device lists) because Firecracker adds fields over
/// versions; the parts fcvm checks are typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullVmConfig {
    /// Boot source, if set.
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<BootSource>,
    /// Machine config.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfigOut>,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<serde_json::Value>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<serde_json::Value>,
    /// Vsock device.
    #[serde(default)]
    pub vsock: Option<Vsock>,
}

/// Machine config as reported back (carries extra read-only fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfigOut {
    /// vCPUs.
    pub vcpu_count: u8,
    /// Memory in MiB.
    pub mem_size_mib: u32,
    /// Dirty page tracking.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Log file (must exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Show the level in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Show the source location in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Module filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn optional_fields_are_omitted() {
        let mc = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 256,
            track_dirty_pages: true,
            ..MachineConfig::default()
        };
        assert_eq!(
            serde_json::to_value(&mc).unwrap(),
            json!({"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":true})
        );
        let drive = Drive {
            drive_id: "rootfs".into(),
            path_on_host: "/r".into(),
            is_root_device: true,
            ..Drive::default()
        };
        assert_eq!(
            serde_json::to_value(&drive).unwrap(),
            json!({"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":false})
        );
    }

    #[test]
    fn snapshot_load_matches_firecracker_names() {
        let p = SnapshotLoadParams {
            snapshot_path: "/s/vmstate".into(),
            mem_backend: MemBackend {
                backend_type: MemBackendType::Uffd,
                backend_path: "/s/uffd.sock".into(),
            },
            track_dirty_pages: None,
            resume_vm: Some(false),
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"snapshot_path":"/s/vmstate",
                   "mem_backend":{"backend_type":"Uffd","backend_path":"/s/uffd.sock"},
                   "resume_vm":false})
        );
    }

    #[test]
    fn enums_use_firecracker_spelling() {
        assert_eq!(
            serde_json::to_value(Vm {
                state: VmState::Paused
            })
            .unwrap(),
            json!({"state":"Paused"})
        );
        assert_eq!(
            serde_json::to_value(InstanceAction {
                action_type: ActionType::SendCtrlAltDel
            })
            .unwrap(),
            json!({"action_type":"SendCtrlAltDel"})
        );
        assert_eq!(
            serde_json::to_value(SnapshotType::Diff).unwrap(),
            json!("Diff")
        );
    }

    #[test]
    fn requests_reject_unknown_fields_like_firecracker() {
        let err = serde_json::from_value::<Drive>(
            json!({"drive_id":"a","path_on_host":"/x","is_root_device":true,"bogus":1}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        assert!(serde_json::from_value::<InstanceAction>(json!({"action_type":"Reboot"})).is_err());
        let mmds: MmdsConfig =
            serde_json::from_value(json!({"network_interfaces":["eth0"]})).unwrap();
        assert_eq!(mmds.version, MmdsVersion::V1);
        let drive: Drive = serde_json::from_value(json!({"drive_id":"a","path_on_host":"/x",
            "is_root_device":false,"cache_type":"Writeback","io_engine":"Async"}))
        .unwrap();
        assert_eq!(drive.cache_type, Some(CacheType::Writeback));
        assert_eq!(drive.io_engine, Some(IoEngine::Async));
        assert!(serde_json::from_value::<MmdsConfig>(
            json!({"version":"V3","network_interfaces":["eth0"]})
        )
        .is_err());
    }

    #[test]
    fn vm_config_parses_firecracker_output() {
        let body = json!({
            "balloon": null,
            "drives": [{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,
                        "is_read_only":false,"partuuid":null,"cache_type":"Unsafe",
                        "io_engine":"Sync","rate_limiter":null,"socket":null}],
            "boot-source": {"kernel_image_path":"/k","initrd_path":null,"boot_args":"console=ttyS0"},
            "cpu-config": null, "logger": null,
            "machine-config": {"vcpu_count":1,"mem_size_mib":128,"smt":false,
                               "track_dirty_pages":false,"huge_pages":"None"},
            "metrics": null, "mmds-config": null, "network-interfaces": [],
            "vsock": {"guest_cid":3,"uds_path":"/v.sock"}, "entropy": null
        });
        let cfg: FullVmConfig = serde_json::from_value(body).unwrap();
        assert_eq!(cfg.machine_config.unwrap().mem_size_mib, 128);
        assert_eq!(
            cfg.boot_source.unwrap().boot_args.as_deref(),
            Some("console=ttyS0")
        );
        assert_eq!(cfg.drives.len(), 1);
        assert_eq!(cfg.vsock.unwrap().guest_cid, 3);
    }
}
