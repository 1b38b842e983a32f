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

fn ip(args: &[&str]) -> Result<(), NetError> {
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
    ip(&["link", "set", "lo", "up"])?;
    let dev = ipcfg.map(|c| c.device.as_str()).unwrap_or("eth0");
    if !Path::new("/sys/class/net").join(dev).exists() {
        crate::debug!("no {dev}: loopback only");
        return Ok(());
    }
    ip(&["link", "set", dev, "up"])?;
    if let Some(c) = ipcfg {
        ip(&[
            "addr",
            "add",
            &format!("{}/{}", c.address, c.prefix_len),
            "dev",
            dev,
        ])?;
        if let Some(gw) = c.gateway {
            ip(&[
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                dev,
            ])?;
        }
        if !c.dns.is_empty() {
            let text: String = c.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
            let _ = std::fs::write("/etc/resolv.conf", text);
        }
    } else {
        ip(&["addr", "add", MMDS_CLIENT_CIDR, "dev", dev])?;
    }
    ip(&["route", "replace", &format!("{MMDS_ADDR}/32"), "dev", dev])?;
    Ok(())
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
