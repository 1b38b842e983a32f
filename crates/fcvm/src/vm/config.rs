//! The boot configuration of a VM and how it is applied through the API.

use std::path::PathBuf;

use crate::firecracker::models::{
    BootSource, Drive, MachineConfig, MmdsConfig, NetworkInterface, Vsock,
};
use crate::firecracker::{FirecrackerClient, TransportError};

/// Largest vCPU count Firecracker accepts.
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest memory fcvm accepts, in MiB.
pub const MIN_MEM_MIB: u32 = 16;

/// Invalid VM sizing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizingError {
    /// vCPUs out of range.
    #[error("--cpu {0} is out of range: Firecracker supports 1 to {MAX_VCPUS} vCPUs")]
    Cpus(u32),
    /// Memory out of range.
    #[error("--mem {requested} MiB is out of range: use at least {MIN_MEM_MIB} MiB and at most {host} MiB (this host's memory)")]
    Memory {
        /// What was asked for.
        requested: u64,
        /// Host memory in MiB.
        host: u64,
    },
}

/// Everything needed to boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// vCPUs.
    pub vcpus: u8,
    /// Memory in MiB.
    pub mem_mib: u32,
    /// Track dirty pages (for diff snapshots).
    pub track_dirty_pages: bool,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub boot_args: String,
    /// Block devices, root first.
    pub drives: Vec<Drive>,
    /// Network interface.
    pub network: Option<NetworkInterface>,
    /// Hybrid vsock.
    pub vsock: Option<Vsock>,
    /// Metadata service (requires `network`).
    pub mmds: Option<MmdsConfig>,
}

/// Check `--cpu` and `--mem` against Firecracker's limits and this host.
pub fn validate_sizing(vcpus: u32, mem_mib: u64) -> Result<(u8, u32), SizingError> {
    if vcpus == 0 || vcpus > u32::from(MAX_VCPUS) {
        return Err(SizingError::Cpus(vcpus));
    }
    let host_mib = host_memory_mib();
    if mem_mib < u64::from(MIN_MEM_MIB) || mem_mib > host_mib {
        return Err(SizingError::Memory {
            requested: mem_mib,
            host: host_mib,
        });
    }
    Ok((vcpus as u8, mem_mib as u32))
}

fn host_memory_mib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(u64::from(u32::MAX))
}

impl VmConfig {
    /// Send the whole configuration to a freshly started VMM (before InstanceStart).
    pub async fn apply(&self, client: &FirecrackerClient) -> Result<(), TransportError> {
        client
            .put_machine_config(&MachineConfig {
                vcpu_count: self.vcpus,
                mem_size_mib: self.mem_mib,
                track_dirty_pages: self.track_dirty_pages,
                ..Default::default()
            })
            .await?;
        client
            .put_boot_source(&BootSource {
                kernel_image_path: self.kernel.display().to_string(),
                initrd_path: self.initrd.as_ref().map(|p| p.display().to_string()),
                boot_args: Some(self.boot_args.clone()),
            })
            .await?;
        for drive in &self.drives {
            client.put_drive(drive).await?;
        }
        if let Some(net) = &self.network {
            client.put_network_interface(net).await?;
        }
        if let Some(vsock) = &self.vsock {
            client.put_vsock(vsock).await?;
        }
        if let Some(mmds) = &self.mmds {
            client.put_mmds_config(mmds).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizing_limits() {
        assert_eq!(validate_sizing(2, 256), Ok((2, 256)));
        assert_eq!(validate_sizing(0, 256), Err(SizingError::Cpus(0)));
        assert_eq!(validate_sizing(33, 256), Err(SizingError::Cpus(33)));
        assert!(matches!(
            validate_sizing(1, 8),
            Err(SizingError::Memory { requested: 8, .. })
        ));
        assert!(matches!(
            validate_sizing(1, 1 << 40),
            Err(SizingError::Memory { .. })
        ));
        let msg = validate_sizing(1, 8).unwrap_err().to_string();
        assert!(msg.contains("--mem 8 MiB"), "{msg}");
    }
}
