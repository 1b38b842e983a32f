//! Building the kernel command line the host gives Firecracker (`boot-source.boot_args`);
//! [`crate::boot::Cmdline`] is the agent's side, parsing it. Both live here so a key the
//! host sets is a key the agent reads (the round-trip test below checks it).
//!
//! Also the guest paths both sides assume: the block devices in the order the host
//! attaches drives.

use std::fmt::Display;

use crate::boot::IpConfig;

/// The first drive (the root filesystem).
pub const ROOT_DEVICE: &str = "/dev/vda";
/// The second drive of a container VM (the image archive, read-only).
pub const IMAGE_DEVICE: &str = "/dev/vdb";
/// Longest command line Firecracker accepts on x86_64 (the kernel's `COMMAND_LINE_SIZE`,
/// including the terminating NUL).
pub const MAX_CMDLINE: usize = 2048;

/// Why a command line cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// A key or value would split into two words.
    #[error("Kernel command-line word {0:?} is empty or contains whitespace")]
    BadWord(String),
    /// Over [`MAX_CMDLINE`].
    #[error("Kernel command line is {0} bytes; Firecracker accepts at most {max}", max = MAX_CMDLINE - 1)]
    TooLong(usize),
}

/// A command line being built: `key[=value]` words in order; setting a key again replaces
/// its value in place, so a base line can be refined without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdlineBuilder {
    words: Vec<(String, Option<String>)>,
}

impl CmdlineBuilder {
    /// An empty line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Start from an existing line (e.g. a fixed base such as `console=ttyS0 reboot=k`).
    pub fn parse(text: &str) -> Self {
        let mut b = Self::new();
        for w in text.split_ascii_whitespace() {
            b = match w.split_once('=') {
                Some((k, v)) => b.set(k, v),
                None => b.flag(w),
            };
        }
        b
    }

    /// Add a bare word (`rw`, `quiet`) unless present.
    pub fn flag(mut self, key: &str) -> Self {
        if !self.words.iter().any(|(k, v)| k == key && v.is_none()) {
            self.words.push((key.to_owned(), None));
        }
        self
    }

    /// Set `key=value`, replacing an earlier value of `key` in place.
    pub fn set(mut self, key: &str, value: impl Display) -> Self {
        let value = value.to_string();
        match self.words.iter_mut().find(|(k, v)| k == key && v.is_some()) {
            Some(word) => word.1 = Some(value),
            None => self.words.push((key.to_owned(), Some(value))),
        }
        self
    }

    /// `root=<device>`.
    pub fn root(self, device: &str) -> Self {
        self.set("root", device)
    }

    /// `ip=<config>`: the guest NIC's static address (read by the agent).
    pub fn ip(self, ip: &IpConfig) -> Self {
        self.set("ip", ip.to_arg())
    }

    /// The line, checked: every word is one word, and the whole fits Firecracker's limit.
    pub fn build(&self) -> Result<String, BuildError> {
        let mut out = String::new();
        for (k, v) in &self.words {
            let bad = |w: &str| w.is_empty() || w.chars().any(char::is_whitespace);
            if bad(k)
                || v.as_deref()
                    .is_some_and(|v| v.chars().any(char::is_whitespace))
            {
                return Err(BuildError::BadWord(match v {
                    Some(v) => format!("{k}={v}"),
                    None => k.clone(),
                }));
            }
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(k);
            if let Some(v) = v {
                out.push('=');
                out.push_str(v);
            }
        }
        if out.len() >= MAX_CMDLINE {
            return Err(BuildError::TooLong(out.len()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::Cmdline;
    use std::net::Ipv4Addr;

    #[test]
    fn refines_a_base_line_without_duplicates() {
        let line = CmdlineBuilder::parse("console=ttyS0 reboot=k panic=1 root=/dev/vdb rw")
            .root(ROOT_DEVICE)
            .flag("rw")
            .set("panic", 0)
            .build()
            .unwrap();
        assert_eq!(line, "console=ttyS0 reboot=k panic=0 root=/dev/vda rw");
    }

    #[test]
    fn what_the_host_sets_the_agent_reads() {
        let ip = IpConfig {
            address: Ipv4Addr::new(172, 16, 0, 2),
            gateway: Some(Ipv4Addr::new(172, 16, 0, 1)),
            prefix_len: 30,
            device: "eth0".into(),
            dns: vec![],
        };
        let line = CmdlineBuilder::new()
            .set("console", "ttyS0")
            .root(ROOT_DEVICE)
            .ip(&ip)
            .set("fcvm.debug", 1)
            .build()
            .unwrap();
        let parsed = Cmdline::parse(&line);
        assert_eq!(parsed.root(), ROOT_DEVICE);
        assert_eq!(parsed.ip(), Ok(Some(ip)));
        assert!(parsed.debug());
    }

    #[test]
    fn refuses_what_would_not_survive_the_trip() {
        assert_eq!(
            CmdlineBuilder::new().set("a", "b c").build(),
            Err(BuildError::BadWord("a=b c".into()))
        );
        assert!(CmdlineBuilder::new().flag("").build().is_err());
        let long = "x".repeat(MAX_CMDLINE);
        assert!(matches!(
            CmdlineBuilder::new().flag(&long).build(),
            Err(BuildError::TooLong(_))
        ));
    }
}
