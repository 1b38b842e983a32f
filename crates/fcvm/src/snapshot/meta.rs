//! `snapshot.json`: what a published snapshot is, written last before publication.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Layout version of `snapshot.json` and the snapshot directory.
pub const FORMAT_VERSION: u32 = 1;

/// File names inside a snapshot directory.
pub const META_FILE: &str = "snapshot.json";
/// Guest memory (always complete: diffs are merged at creation).
pub const MEMORY_FILE: &str = "memory.bin";
/// Firecracker's device and vCPU state.
pub const VMSTATE_FILE: &str = "vmstate.bin";
/// Prefix of reflinked disk copies (`disk-<drive_id>.img`).
pub const DISK_PREFIX: &str = "disk-";

/// How the memory file was produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// Firecracker wrote every page.
    Full,
    /// Firecracker wrote the dirty pages, merged onto a copy of the parent's memory.
    Diff,
}

/// One block device as recorded in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDrive {
    /// Firecracker's drive id.
    pub drive_id: String,
    /// The path Firecracker recorded in the vmstate (it reopens it on load).
    pub path_on_host: String,
    /// The copy inside the snapshot directory (file name).
    pub file: String,
    /// Root device.
    #[serde(default)]
    pub is_root_device: bool,
    /// Read-only.
    #[serde(default)]
    pub is_read_only: bool,
}

/// Contents of `snapshot.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// The snapshot's name.
    pub tag: String,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Name of the VM it was taken from.
    pub source_vm: String,
    /// Id of that VM.
    pub source_vm_id: String,
    /// Kind of that VM.
    pub source_kind: crate::state::VmKind,
    /// What runs inside (clones inherit it: `--exec` needs the agent).
    #[serde(default)]
    pub guest: crate::state::GuestKind,
    /// Full or Diff.
    pub kind: SnapshotKind,
    /// The snapshot a Diff was merged onto (or the snapshot a cloned source came from).
    #[serde(default)]
    pub parent: Option<String>,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Kernel image the source booted.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line of the source.
    #[serde(default)]
    pub boot_args: Option<String>,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<SnapshotDrive>,
    /// TAP name the source's eth0 used inside its namespace; clones get the same.
    #[serde(default)]
    pub tap: Option<String>,
    /// The source's bridged network (`--network bridged`): its clones keep the guest's
    /// address, gateway, name servers and TAP (see
    /// [`crate::network::bridged::BridgedNet::clone_of`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridged: Option<crate::network::bridged::BridgedNet>,
    /// Memory file length.
    pub memory_bytes: u64,
    /// Memory file blocks actually allocated, in bytes.
    pub memory_allocated_bytes: u64,
    /// For a Diff: bytes Firecracker reported dirty.
    #[serde(default)]
    pub diff_dirty_bytes: Option<u64>,
    /// fcvm version that wrote it.
    pub fcvm_version: String,
    /// Firecracker version of the source VMM.
    #[serde(default)]
    pub firecracker_version: Option<String>,
}

impl SnapshotMeta {
    /// Read `snapshot.json` in `dir`.
    pub fn read(dir: &Path) -> std::io::Result<SnapshotMeta> {
        let bytes = std::fs::read(dir.join(META_FILE))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}
