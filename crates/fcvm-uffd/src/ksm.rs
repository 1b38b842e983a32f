//! Memory sharing between clones through KSM.
//!
//! UFFDIO_COPY fills each clone with private anonymous pages, so N clones of one snapshot hold
//! N copies of every touched page. KSM can merge identical anonymous pages back together if
//! the clone's process opts in. `PR_SET_MEMORY_MERGE` opts in a whole process: call
//! [`enable_ksm_merge_any`] in the child after `fork` and before `execve` of Firecracker.
//!
//! Measured on Linux 6.18: the flag survives both `fork` and `execve` (`ksm_merge_any: yes` in
//! the new program's `/proc/<pid>/ksm_stat`), and `/proc/<pid>/status` has no KSM field; use
//! [`process_stat`]. KSM only scans while `/sys/kernel/mm/ksm/run` is 1, which needs root.

use std::collections::BTreeMap;
use std::path::Path;

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use crate::sys;

const KSM_SYSFS: &str = "/sys/kernel/mm/ksm";

/// KSM failures.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // variant fields are spelled out in each message
pub enum KsmError {
    /// The prctl failed (EINVAL: kernel older than 6.4 or built without KSM).
    #[error("prctl(PR_SET/GET_MEMORY_MERGE) failed: {0}; needs Linux 6.4+ with CONFIG_KSM")]
    Prctl(Errno),
    /// A stat file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// Writing a sysfs knob failed.
    #[error("cannot write {path}: {source} (needs root)")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Opts the calling process (and, on Linux 6.18, its future children and exec'd programs) into
/// KSM merging of all its anonymous memory: `prctl(PR_SET_MEMORY_MERGE, 1)`.
pub fn enable_ksm_merge_any() -> Result<(), KsmError> {
    sys::set_memory_merge(true).map_err(KsmError::Prctl)
}

/// Whether the calling process has `PR_SET_MEMORY_MERGE` set.
pub fn ksm_merge_any_enabled() -> Result<bool, KsmError> {
    sys::get_memory_merge().map_err(KsmError::Prctl)
}

/// `/proc/<pid>/ksm_stat`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessKsmStat {
    /// `ksm_rmap_items`: pages KSM tracks for this process.
    pub rmap_items: u64,
    /// `ksm_zero_pages`: pages merged with the zero page.
    pub zero_pages: u64,
    /// `ksm_merging_pages`: pages of this process currently merged.
    pub merging_pages: u64,
    /// `ksm_process_profit`: bytes saved, minus KSM's bookkeeping (may be negative).
    pub process_profit: i64,
    /// `ksm_merge_any`: whether PR_SET_MEMORY_MERGE is on.
    pub merge_any: bool,
    /// `ksm_mergeable`: whether any of its memory is mergeable.
    pub mergeable: bool,
}

/// Reads `/proc/<pid>/ksm_stat`.
pub fn process_stat(pid: u32) -> Result<ProcessKsmStat, KsmError> {
    let path = format!("/proc/{pid}/ksm_stat");
    let text = std::fs::read_to_string(&path).map_err(|source| KsmError::Read { path, source })?;
    Ok(parse_process_stat(&text))
}

fn parse_process_stat(text: &str) -> ProcessKsmStat {
    let mut s = ProcessKsmStat::default();
    for line in text.lines() {
        let mut parts = line.splitn(2, |c: char| c == ':' || c.is_whitespace());
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let value = value.trim();
        let num = || value.parse::<u64>().unwrap_or(0);
        match key {
            "ksm_rmap_items" => s.rmap_items = num(),
            "ksm_zero_pages" => s.zero_pages = num(),
            "ksm_merging_pages" => s.merging_pages = num(),
            "ksm_process_profit" => s.process_profit = value.parse().unwrap_or(0),
            "ksm_merge_any" => s.merge_any = value == "yes",
            "ksm_mergeable" => s.mergeable = value == "yes",
            _ => {}
        }
    }
    s
}

/// The numeric files of `/sys/kernel/mm/ksm` (`run`, `pages_to_scan`, `sleep_millisecs`,
/// `pages_shared`, `pages_sharing`, `full_scans`, `general_profit`...), by file name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalKsmStat(pub BTreeMap<String, i64>);

impl GlobalKsmStat {
    /// One value by file name.
    pub fn get(&self, name: &str) -> Option<i64> {
        self.0.get(name).copied()
    }

    /// Whether the KSM daemon is scanning (`run` = 1).
    pub fn running(&self) -> bool {
        self.get("run") == Some(1)
    }

    /// Pages saved by merging right now (`pages_sharing`).
    pub fn pages_sharing(&self) -> u64 {
        self.get("pages_sharing").unwrap_or(0).max(0) as u64
    }
}

/// Reads every numeric file under `/sys/kernel/mm/ksm` (non-numeric ones such as
/// `advisor_mode` are skipped).
pub fn global_stat() -> Result<GlobalKsmStat, KsmError> {
    let dir = std::fs::read_dir(KSM_SYSFS).map_err(|source| KsmError::Read {
        path: KSM_SYSFS.into(),
        source,
    })?;
    let mut out = BTreeMap::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(text) = std::fs::read_to_string(entry.path()) {
            if let Ok(v) = text.trim().parse::<i64>() {
                out.insert(name, v);
            }
        }
    }
    Ok(GlobalKsmStat(out))
}

/// Writes one KSM knob, e.g. `set_global("run", 1)` or `set_global("pages_to_scan", 1000)`.
pub fn set_global(name: &str, value: i64) -> Result<(), KsmError> {
    let path = Path::new(KSM_SYSFS).join(name);
    std::fs::write(&path, value.to_string()).map_err(|source| KsmError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ksm_stat_text() {
        let s = parse_process_stat(
            "ksm_rmap_items 12\nksm_zero_pages 3\nksm_merging_pages 9\nksm_process_profit -4096\nksm_merge_any: yes\nksm_mergeable: no\n",
        );
        assert_eq!(
            s,
            ProcessKsmStat {
                rmap_items: 12,
                zero_pages: 3,
                merging_pages: 9,
                process_profit: -4096,
                merge_any: true,
                mergeable: false,
            }
        );
    }

    #[test]
    fn reads_own_process_stat() {
        // The field exists on 6.4+ kernels; our own pid always has the file there.
        let s = process_stat(std::process::id()).expect("ksm_stat readable");
        assert_eq!(s.merge_any, ksm_merge_any_enabled().unwrap());
    }
}
