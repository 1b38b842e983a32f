//! Guest network: loopback, the NIC from `ip=`, the MMDS route, DNS, hostname.
//!
//! Uses `ip` from the root filesystem (iproute2) rather than netlink code: it runs once per
//! boot, after switch_root, and keeps this module small.

use std::path::Path;
use std::process::Command;

use fcvm_proto::boot::IpConfig;
use fcvm_proto::plan::{MMDS_ADDR, MMDS_CLIENT_CIDR};

use crate::reaper;

/// Errors configuring the network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// `ip` could not be started.
    #[error("Cannot run ip (is iproute2 in the rootfs?): {0}")]
    Spawn(std::io::Error),
    /// `ip` failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip {
        /// Arguments.
        args: String,
        /// Its error output.
        stderr: String,
    },
    /// Setting the hostname failed.
    #[error("Cannot set hostname {0:?}: {1}")]
    Hostname(String, nix::Error),
}

fn ip(args: &[String]) -> Result<(), NetError> {
    let out = reaper::run(Command::new("ip").args(args)).map_err(NetError::Spawn)?;
    if out.code != 0 {
        return Err(NetError::Ip {
            args: args.join(" "),
            stderr: out.stderr.trim().to_owned(),
        });
    }
    Ok(())
}

/// Brings up loopback, and the NIC when present. Without `ip=`, the NIC gets a link-local
/// address ([`MMDS_CLIENT_CIDR`]) so that MMDS, which Firecracker answers on that interface,
/// can be reached at all.
pub fn configure(ipcfg: Option<&IpConfig>) -> Result<(), NetError> {
    let dev = ipcfg.map(|c| c.device.as_str()).unwrap_or("eth0");
    let has_nic = Path::new("/sys/class/net").join(dev).exists();
    if !has_nic {
        crate::debug!("no {dev}: loopback only");
    }
    for args in ip_commands(ipcfg, has_nic) {
        ip(&args)?;
    }
    if let Some(c) = ipcfg.filter(|c| has_nic && !c.dns.is_empty()) {
        let _ = std::fs::write("/etc/resolv.conf", resolv_conf(c));
    }
    Ok(())
}

/// The `ip` invocations, in order, that [`configure`] runs: kept apart from running them so
/// the configuration a command line asks for can be checked without a guest.
fn ip_commands(ipcfg: Option<&IpConfig>, has_nic: bool) -> Vec<Vec<String>> {
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut cmds = vec![v(&["link", "set", "lo", "up"])];
    if !has_nic {
        return cmds;
    }
    let dev = ipcfg.map(|c| c.device.as_str()).unwrap_or("eth0");
    cmds.push(v(&["link", "set", dev, "up"]));
    match ipcfg {
        Some(c) => {
            let addr = format!("{}/{}", c.address, c.prefix_len);
            cmds.push(v(&["addr", "add", &addr, "dev", dev]));
            if let Some(gw) = c.gateway {
                cmds.push(v(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw.to_string(),
                    "dev",
                    dev,
                ]));
            }
        }
        None => cmds.push(v(&["addr", "add", MMDS_CLIENT_CIDR, "dev", dev])),
    }
    let mmds = format!("{MMDS_ADDR}/32");
    cmds.push(v(&["route", "replace", &mmds, "dev", dev]));
    cmds
}

/// Makes MMDS unreachable from the guest once the plan is read: a `prohibit` route in place of
/// the one [`configure`] added (connections then fail at once with EACCES). Changing it takes
/// CAP_NET_ADMIN, which a container has only with `--privileged`.
pub fn close_mmds() -> Result<(), NetError> {
    ip(&close_mmds_command())
}

fn close_mmds_command() -> Vec<String> {
    ["route", "replace", "prohibit", &format!("{MMDS_ADDR}/32")]
        .map(str::to_owned)
        .to_vec()
}

/// `/etc/resolv.conf` for the DNS servers of `ip=`.
fn resolv_conf(c: &IpConfig) -> String {
    c.dns.iter().map(|d| format!("nameserver {d}\n")).collect()
}

/// Sets the hostname and makes it resolve locally.
pub fn set_hostname(name: &str) -> Result<(), NetError> {
    nix::unistd::sethostname(name).map_err(|e| NetError::Hostname(name.to_owned(), e))?;
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    if !hosts
        .lines()
        .any(|l| l.split_whitespace().skip(1).any(|h| h == name))
    {
        let _ = std::fs::write("/etc/hosts", format!("{hosts}127.0.1.1\t{name}\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fcvm_proto::boot::Cmdline;
    use fcvm_proto::cmdline::CmdlineBuilder;
    use std::net::Ipv4Addr;

    fn joined(cmds: &[Vec<String>]) -> Vec<String> {
        cmds.iter().map(|c| c.join(" ")).collect()
    }

    /// A line built the way the host builds it configures the NIC as the host meant.
    #[test]
    fn the_host_s_ip_setting_becomes_the_guest_s_address_route_and_dns() {
        let ip = IpConfig {
            address: Ipv4Addr::new(10, 0, 2, 15),
            gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
            prefix_len: 24,
            device: "eth0".into(),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
        };
        let line = CmdlineBuilder::parse("console=ttyS0 quiet reboot=k panic=1 rw")
            .root(fcvm_proto::cmdline::ROOT_DEVICE)
            .ip(&ip)
            .build()
            .unwrap();
        let parsed = Cmdline::parse(&line).ip().unwrap().unwrap();
        assert_eq!(
            joined(&ip_commands(Some(&parsed), true)),
            [
                "link set lo up",
                "link set eth0 up",
                "addr add 10.0.2.15/24 dev eth0",
                "route add default via 10.0.2.2 dev eth0",
                "route replace 169.254.169.254/32 dev eth0",
            ]
        );
        assert_eq!(resolv_conf(&parsed), "nameserver 10.0.2.3\n");
        // Once the plan is read, the same prefix becomes a prohibit route.
        assert_eq!(
            close_mmds_command().join(" "),
            "route replace prohibit 169.254.169.254/32"
        );
    }

    /// Without `ip=` (MMDS only) the NIC still gets the link-local address MMDS needs.
    #[test]
    fn without_ip_the_nic_gets_the_mmds_link_local_address() {
        let line = CmdlineBuilder::parse("console=ttyS0 rw").build().unwrap();
        let cfg = Cmdline::parse(&line).ip().unwrap();
        assert!(cfg.is_none());
        let cmds = joined(&ip_commands(cfg.as_ref(), true));
        assert_eq!(cmds[2], format!("addr add {MMDS_CLIENT_CIDR} dev eth0"));
        assert_eq!(
            cmds.last().unwrap(),
            "route replace 169.254.169.254/32 dev eth0"
        );
        // No NIC at all: loopback only.
        assert_eq!(joined(&ip_commands(None, false)), ["link set lo up"]);
    }
}
