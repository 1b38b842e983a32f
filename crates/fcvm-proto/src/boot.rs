//! The kernel command line as the agent reads it.
//!
//! The host builds the command line (Firecracker `boot-source.boot_args`); the agent, running as
//! PID 1, parses it. Keys the agent understands:
//!
//! | key | values | default | meaning |
//! |-----|--------|---------|---------|
//! | `root=` | device path | `/dev/vda` | root filesystem (ext4) the agent switches into |
//! | `rootfstype=` | fs type | `ext4` | filesystem type of `root=` |
//! | `ip=` | kernel `ip=` syntax, see [`IpConfig`] | none | static IPv4 for the guest NIC |
//! | `fcvm.debug=` | `1` | off | verbose agent logging on the console |
//!

use std::net::Ipv4Addr;

/// Errors parsing the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// `ip=` could not be parsed.
    #[error("Kernel command line: cannot parse ip={0:?}; expected <addr>::<gw>:<netmask>::<dev>:off[:<dns>]")]
    BadIp(String),
}

/// A parsed kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    args: Vec<(String, Option<String>)>,
}

impl Cmdline {
    /// Splits a command line into `key[=value]` words (no quoting, like the kernel for our keys).
    pub fn parse(text: &str) -> Self {
        let args = text
            .split_ascii_whitespace()
            .map(|w| match w.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (w.to_owned(), None),
            })
            .collect();
        Self { args }
    }

    /// Value of the last `key=value` (later words override earlier ones, as in the kernel).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The root device.
    pub fn root(&self) -> &str {
        self.get("root").unwrap_or("/dev/vda")
    }

    /// The root filesystem type.
    pub fn rootfstype(&self) -> &str {
        self.get("rootfstype").unwrap_or("ext4")
    }

    /// `fcvm.debug=1`.
    pub fn debug(&self) -> bool {
        self.get("fcvm.debug") == Some("1")
    }

    /// `ip=`, if present and not `off`/`dhcp`.
    pub fn ip(&self) -> Result<Option<IpConfig>, CmdlineError> {
        match self.get("ip") {
            None | Some("off") | Some("none") | Some("dhcp") => Ok(None),
            Some(v) => IpConfig::parse(v).map(Some),
        }
    }
}

/// Static IPv4 configuration in the kernel's `ip=` syntax:
/// `<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// Guest address.
    pub address: Ipv4Addr,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Prefix length derived from the netmask (24 when absent).
    pub prefix_len: u8,
    /// Interface name (`eth0` when absent).
    pub device: String,
    /// DNS servers.
    pub dns: Vec<Ipv4Addr>,
}

impl IpConfig {
    /// Parses the value of `ip=`.
    pub fn parse(value: &str) -> Result<Self, CmdlineError> {
        let bad = || CmdlineError::BadIp(value.to_owned());
        let f: Vec<&str> = value.split(':').collect();
        let field = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
        let address = field(0).ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let gateway = field(2).map(|g| g.parse()).transpose().map_err(|_| bad())?;
        let prefix_len = match field(3) {
            None => 24,
            Some(m) => {
                let mask: Ipv4Addr = m.parse().map_err(|_| bad())?;
                let bits = u32::from(mask);
                // A netmask must be contiguous ones followed by zeros.
                if bits.leading_ones() + bits.trailing_zeros() != 32 {
                    return Err(bad());
                }
                bits.leading_ones() as u8
            }
        };
        let device = field(5).unwrap_or("eth0").to_owned();
        let dns = [7, 8]
            .iter()
            .filter_map(|&i| field(i))
            .map(|d| d.parse().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            address,
            gateway,
            prefix_len,
            device,
            dns,
        })
    }

    /// Renders the `ip=` value (without the `ip=` key).
    pub fn to_arg(&self) -> String {
        let mask = Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.prefix_len))
                .unwrap_or(0),
        );
        let gw = self.gateway.map(|g| g.to_string()).unwrap_or_default();
        let mut s = format!("{}::{}:{}::{}:off", self.address, gw, mask, self.device);
        for d in &self.dns {
            s.push_str(&format!(":{d}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_defaults() {
        let c = Cmdline::parse("console=ttyS0 reboot=k root=/dev/vdb rw fcvm.debug=1");
        assert_eq!(c.root(), "/dev/vdb");
        assert!(c.debug());
        assert_eq!(c.get("rw"), None);
        let d = Cmdline::parse("");
        assert_eq!(d.root(), "/dev/vda");
        assert_eq!(d.rootfstype(), "ext4");
        assert!(!d.debug());
    }

    #[test]
    fn later_words_win() {
        assert_eq!(
            Cmdline::parse("root=/dev/vdb root=/dev/vdc").root(),
            "/dev/vdc"
        );
    }

    #[test]
    fn ip_roundtrip() {
        let v = "172.16.0.2::172.16.0.1:255.255.255.0::eth0:off:8.8.8.8";
        let ip = IpConfig::parse(v).unwrap();
        assert_eq!(ip.address, Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(ip.gateway, Some(Ipv4Addr::new(172, 16, 0, 1)));
        assert_eq!(ip.prefix_len, 24);
        assert_eq!(ip.dns, vec![Ipv4Addr::new(8, 8, 8, 8)]);
        assert_eq!(ip.to_arg(), v);
        assert_eq!(IpConfig::parse(&ip.to_arg()), Ok(ip));
    }

    #[test]
    fn ip_rejects_garbage() {
        for v in [
            "",
            "x",
            "10.0.0.1::zz",
            "10.0.0.1:::255.0.255.0",
            "10.0.0.1::::::off:nope",
        ] {
            assert!(IpConfig::parse(v).is_err(), "{v:?} accepted");
        }
        assert_eq!(Cmdline::parse("ip=off").ip(), Ok(None));
    }
}
