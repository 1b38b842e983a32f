//! Limits on a VM's size, checked before anything is created.

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
