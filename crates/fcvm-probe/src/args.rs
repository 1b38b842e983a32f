//! The probe's kernel command line parameters.
//!
//! The guest scans its command line for whitespace-separated tokens of the
//! form `probe.<key>=<decimal u64>`. Tokens it does not know (Firecracker
//! adds its own, such as `pci=off` or `virtio_mmio.device=...`) are ignored,
//! as are values that are empty, not decimal or overflow a u64; when a key
//! appears twice the last valid value wins. [`ProbeArgs::from_boot_args`]
//! applies the same rules on the host.

use std::fmt;

/// Parameters for one probe boot. `Default` gives the guest's own defaults.
///
/// The guest adjusts some of them and prints the values it really uses in its
/// banner: `mem_mib` is clamped to the whole MiB of RAM available above
/// 2 MiB, `tick_ms` to `1..=60000`, `verify_pages` of 0 (or more than the
/// region) means the whole region, and `dirty_pages` is forced to 0 when the
/// region is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeArgs {
    /// MiB of RAM to fill with the page pattern (`probe.mem_mib`, default 32).
    pub mem_mib: u64,
    /// Seed of the page pattern (`probe.seed`, default 1).
    pub seed: u64,
    /// Timer tick period in milliseconds (`probe.tick_ms`, default 200).
    pub tick_ms: u64,
    /// Pages rewritten with a new generation on every tick, cycling through
    /// the region (`probe.dirty_pages`, default 0).
    pub dirty_pages: u64,
    /// After this many ticks print `SHUTDOWN reason=exit_after` and reset,
    /// which makes Firecracker exit 0; 0 means never (`probe.exit_after`).
    pub exit_after: u64,
    /// Pages verified per tick, as a rolling window; 0 means the whole
    /// region (`probe.verify_pages`, default 0).
    pub verify_pages: u64,
    /// Crash on purpose right after printing this tick: ring 3 writes to a
    /// supervisor-only page, so the guest prints `FAULT vector=14` and
    /// resets; 0 means never (`probe.fault_after`). For testing how the host
    /// copes with a crashing guest.
    pub fault_after: u64,
}

impl Default for ProbeArgs {
    fn default() -> Self {
        Self {
            mem_mib: 32,
            seed: 1,
            tick_ms: 200,
            dirty_pages: 0,
            exit_after: 0,
            verify_pages: 0,
            fault_after: 0,
        }
    }
}

const KEYS: [&str; 7] = [
    "mem_mib",
    "seed",
    "tick_ms",
    "dirty_pages",
    "exit_after",
    "verify_pages",
    "fault_after",
];

impl ProbeArgs {
    fn values(&self) -> [u64; 7] {
        [
            self.mem_mib,
            self.seed,
            self.tick_ms,
            self.dirty_pages,
            self.exit_after,
            self.verify_pages,
            self.fault_after,
        ]
    }

    fn slot(&mut self, key: &str) -> Option<&mut u64> {
        Some(match key {
            "mem_mib" => &mut self.mem_mib,
            "seed" => &mut self.seed,
            "tick_ms" => &mut self.tick_ms,
            "dirty_pages" => &mut self.dirty_pages,
            "exit_after" => &mut self.exit_after,
            "verify_pages" => &mut self.verify_pages,
            "fault_after" => &mut self.fault_after,
            _ => return None,
        })
    }

    /// Renders every parameter as the kernel command line fragment the guest
    /// reads, e.g. `probe.mem_mib=32 probe.seed=1 probe.tick_ms=200
    /// probe.dirty_pages=0 probe.exit_after=0 probe.verify_pages=0
    /// probe.fault_after=0`.
    /// Append it to (or use it as) Firecracker's `boot_args`.
    pub fn to_boot_args(&self) -> String {
        self.to_string()
    }

    /// Reads `probe.*` parameters from a full kernel command line with the
    /// guest's rules; parameters that are absent keep their defaults.
    pub fn from_boot_args(cmdline: &str) -> Self {
        let mut args = Self::default();
        for token in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = token
                .strip_prefix("probe.")
                .and_then(|rest| rest.split_once('='))
            else {
                continue;
            };
            // The guest accepts only ASCII digits: no sign, no "0x", no "_".
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let (Some(slot), Ok(parsed)) = (args.slot(key), value.parse::<u64>()) else {
                continue;
            };
            *slot = parsed;
        }
        args
    }
}

impl fmt::Display for ProbeArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (key, value)) in KEYS.iter().zip(self.values()).enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "probe.{key}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_key_in_the_guest_syntax() {
        let args = ProbeArgs {
            mem_mib: 64,
            seed: 18_446_744_073_709_551_615,
            tick_ms: 50,
            dirty_pages: 7,
            exit_after: 3,
            verify_pages: 1024,
            fault_after: 9,
        };
        assert_eq!(
            args.to_boot_args(),
            "probe.mem_mib=64 probe.seed=18446744073709551615 probe.tick_ms=50 \
             probe.dirty_pages=7 probe.exit_after=3 probe.verify_pages=1024 probe.fault_after=9"
        );
    }

    #[test]
    fn defaults_match_the_guest_defaults() {
        assert_eq!(
            ProbeArgs::default().to_boot_args(),
            "probe.mem_mib=32 probe.seed=1 probe.tick_ms=200 \
             probe.dirty_pages=0 probe.exit_after=0 probe.verify_pages=0 probe.fault_after=0"
        );
    }

    #[test]
    fn rendered_args_survive_firecracker_style_neighbours() {
        let args = ProbeArgs {
            mem_mib: 100,
            seed: 42,
            tick_ms: 10,
            dirty_pages: 1,
            exit_after: 0,
            verify_pages: 5,
            fault_after: 2,
        };
        let cmdline = format!(
            "reboot=k panic=1 pci=off {} virtio_mmio.device=4K@0xd0000000:5",
            args.to_boot_args()
        );
        assert_eq!(ProbeArgs::from_boot_args(&cmdline), args);
    }

    #[test]
    fn parser_ignores_what_the_guest_ignores() {
        let parsed = ProbeArgs::from_boot_args(
            "probe.mem_mib= probe.seed=-4 probe.tick_ms=0x10 probe.dirty_pages=12a \
             probe.exit_after=99999999999999999999 probe.unknown=5 xprobe.verify_pages=9 \
             probe.verify_pages=3 probe.verify_pages=4",
        );
        assert_eq!(
            parsed,
            ProbeArgs {
                verify_pages: 4,
                ..ProbeArgs::default()
            }
        );
    }
}
