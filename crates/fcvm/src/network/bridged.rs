//! Bridged mode (root): the VM's TAP in its own namespace, a veth pair to the host, NAT and
//! published ports in an nftables table of that VM only.
//!
//! Addresses come from one pool, [`POOL_BASE`]/16 cut into /29 slots; a slot is picked under
//! the state store's lock among the slots no record holds (see [`free_slot`]), so concurrent
//! VMs never collide. In slot `n` (block `b = POOL_BASE + 8n`):
//!
//! - `b+1/30`: the host end of the veth (in the host's namespace; the guest's route out);
//! - `b+2/30`: the namespace end of the veth;
//! - `b+5/30`: the TAP in the namespace (the guest's gateway);
//! - `b+6/30`: the guest's `eth0` (written to the kernel command line as `ip=`).
//!
//! The host routes `b+4/30` to `b+2`; the namespace forwards. Every rule is in the table
//! `ip fcvm-<id>` (NAT for the guest's egress, DNAT for `--publish`, forwarding accepts), so
//! teardown is one idempotent `nft delete table`, and one VM's teardown never touches another's.
//!
//! A clone restored from a snapshot of a bridged VM ([`BridgedNet::clone_of`]) cannot be
//! given a new address: its guest configured `eth0` before the snapshot. It keeps the
//! source's guest address, gateway and TAP (name and MAC, so the guest's neighbour entry for
//! its gateway is still right) inside its own namespace, and takes a slot of its own for the
//! host side. The host reaches it at that slot's guest address (`routed_addr`), and a table
//! in the clone's namespace ([`BridgedNet::ns_ruleset`]) maps that address to the guest's
//! one to one, so the original and any number of clones share a guest address while each
//! has its own veth, NAT and published ports.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::VmRecord;

/// First address of the pool (a /16).
pub const POOL_BASE: Ipv4Addr = Ipv4Addr::new(10, 209, 0, 0);
/// Slots in the pool (/29 each).
pub const POOL_SLOTS: u32 = 1 << 13;
/// The namespace end of every VM's veth (the same name in each namespace, like the TAP).
pub const NS_VETH: &str = "veth0";
/// Oldest `nft` accepted (`dnat ip to`, `fib`, named priorities).
pub const MIN_NFT: (u32, u32, u32) = (0, 9, 3);

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One `--publish`: host address and port to the guest's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// Host address it is bound on; None: every host address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
    /// Host port.
    pub host_port: u16,
    /// Guest (container) port.
    pub guest_port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(
            f,
            "{}->{}/{}",
            self.host_port,
            self.guest_port,
            self.protocol.as_str()
        )
    }
}

/// A refused `--publish`.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not `[HOST_IP:]HOST_PORT:GUEST_PORT[/PROTO]`.
    #[error("--publish {spec:?}: expected [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]")]
    Malformed {
        /// The spec.
        spec: String,
    },
    /// A port that is not 1-65535.
    #[error("--publish {spec:?}: {which} port {port:?} is not a number from 1 to 65535")]
    BadPort {
        /// The spec.
        spec: String,
        /// `host` or `guest`.
        which: &'static str,
        /// The text given.
        port: String,
    },
    /// Not tcp or udp.
    #[error("--publish {spec:?}: unknown protocol {protocol:?} (use tcp or udp)")]
    BadProtocol {
        /// The spec.
        spec: String,
        /// The text given.
        protocol: String,
    },
    /// Not an IPv4 address.
    #[error("--publish {spec:?}: host address {ip:?} is not an IPv4 address")]
    BadHostIp {
        /// The spec.
        spec: String,
        /// The text given.
        ip: String,
    },
    /// The same host port twice.
    #[error("--publish {spec:?}: host port {port}/{protocol} is published twice")]
    Duplicate {
        /// The spec.
        spec: String,
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: &'static str,
    },
    /// A running VM publishes the port already.
    #[error("--publish {spec:?}: host port {port}/{protocol} is already published by VM {vm}")]
    Published {
        /// The spec.
        spec: String,
        /// The port.
        port: u16,
        /// Its protocol.
        protocol: &'static str,
        /// The VM that publishes it.
        vm: String,
    },
    /// Something on the host holds the port already.
    #[error("--publish {spec:?}: host port {addr}/{protocol} is already in use")]
    InUse {
        /// The spec.
        spec: String,
        /// What was tried.
        addr: SocketAddrV4,
        /// Its protocol.
        protocol: &'static str,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
}

/// Parse every `--publish` value (each may be a comma list), refusing duplicates.
pub fn parse_publish(values: &[String]) -> Result<Vec<PortMapping>, PublishError> {
    let mut out: Vec<PortMapping> = Vec::new();
    for spec in values.iter().flat_map(|v| v.split(',')) {
        let m = parse_one(spec)?;
        if out
            .iter()
            .any(|o| o.host_port == m.host_port && o.protocol == m.protocol)
        {
            return Err(PublishError::Duplicate {
                spec: spec.to_owned(),
                port: m.host_port,
                protocol: m.protocol.as_str(),
            });
        }
        out.push(m);
    }
    Ok(out)
}

fn parse_one(spec: &str) -> Result<PortMapping, PublishError> {
    let (ports, protocol) = match spec.split_once('/') {
        Some((p, proto)) => (
            p,
            match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => {
                    return Err(PublishError::BadProtocol {
                        spec: spec.to_owned(),
                        protocol: proto.to_owned(),
                    })
                }
            },
        ),
        None => (spec, Protocol::Tcp),
    };
    let parts: Vec<&str> = ports.split(':').collect();
    let (host_ip, host, guest) = match parts.as_slice() {
        [h, g] => (None, *h, *g),
        [ip, h, g] => {
            let addr = ip
                .parse::<Ipv4Addr>()
                .map_err(|_| PublishError::BadHostIp {
                    spec: spec.to_owned(),
                    ip: (*ip).to_owned(),
                })?;
            (Some(addr), *h, *g)
        }
        _ => {
            return Err(PublishError::Malformed {
                spec: spec.to_owned(),
            })
        }
    };
    let port = |which: &'static str, text: &str| {
        text.parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| PublishError::BadPort {
                spec: spec.to_owned(),
                which,
                port: text.to_owned(),
            })
    };
    Ok(PortMapping {
        host_ip,
        host_port: port("host", host)?,
        guest_port: port("guest", guest)?,
        protocol,
    })
}

/// Refuse a mapping whose host port something already holds, by binding it for a moment.
pub fn check_free(spec: &PortMapping) -> Result<(), PublishError> {
    let addr = SocketAddrV4::new(
        spec.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        spec.host_port,
    );
    let bound = match spec.protocol {
        Protocol::Tcp => TcpListener::bind(addr).map(drop),
        Protocol::Udp => UdpSocket::bind(addr).map(drop),
    };
    bound.map_err(|source| PublishError::InUse {
        spec: spec.to_string(),
        addr,
        protocol: spec.protocol.as_str(),
        source,
    })
}

/// A bridged VM's network, as its record holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgedNet {
    /// Namespace under `/run/netns`.
    pub netns: String,
    /// TAP inside it.
    pub tap: String,
    /// The host end of the veth (in the host's namespace).
    pub veth_host: String,
    /// The nftables table (family `ip`) holding every rule of this VM.
    pub nft_table: String,
    /// Pool slot (decided under the store lock; see [`free_slot`]).
    pub slot: u32,
    /// The host end's address.
    pub host_addr: Ipv4Addr,
    /// The guest's gateway (the TAP's address in the namespace).
    pub gateway: Ipv4Addr,
    /// The guest's address.
    pub guest_addr: Ipv4Addr,
    /// Name servers given to the guest.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Published ports.
    #[serde(default)]
    pub publish: Vec<PortMapping>,
    /// The MAC address of the TAP (the guest's gateway). Derived from the id of the VM that
    /// booted, and kept by its clones: a restored guest's neighbour cache names it, so the
    /// clone's TAP answers to it from the first packet on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_mac: Option<String>,
    /// A clone's own pool address (its slot's guest address) when its guest keeps the
    /// address of the VM it was cloned from: the host routes and DNATs to this one, and the
    /// clone's namespace translates it 1:1 to the guest's (see [`BridgedNet::ns_ruleset`]).
    /// None for a VM that booted with its own address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed_addr: Option<Ipv4Addr>,
}

fn block(slot: u32) -> u32 {
    u32::from(POOL_BASE) + slot * 8
}

impl BridgedNet {
    /// The network of VM `id` in pool slot `slot`.
    pub fn new(
        id: &str,
        slot: u32,
        tap: &str,
        dns: Vec<Ipv4Addr>,
        publish: Vec<PortMapping>,
    ) -> BridgedNet {
        let mut net = BridgedNet {
            netns: format!("fcvm-{id}"),
            tap: tap.to_owned(),
            veth_host: format!("vh{}", &id[..id.len().min(12)]),
            nft_table: format!("fcvm-{id}"),
            slot: 0,
            host_addr: Ipv4Addr::UNSPECIFIED,
            gateway: Ipv4Addr::UNSPECIFIED,
            guest_addr: Ipv4Addr::UNSPECIFIED,
            dns,
            publish,
            tap_mac: Some(super::mac_for(&format!("tap:{id}"))),
            routed_addr: None,
        };
        net.assign(slot);
        net
    }

    /// The network of clone `id` of a VM whose network was `original`: the same TAP (name
    /// and MAC), guest address, gateway and name servers (the restored guest has them
    /// configured), its own namespace, veth, table, pool slot (`slot`, as for
    /// [`BridgedNet::new`]) and published ports.
    pub fn clone_of(
        id: &str,
        slot: u32,
        original: &BridgedNet,
        publish: Vec<PortMapping>,
    ) -> BridgedNet {
        let mut net = BridgedNet::new(id, slot, &original.tap, original.dns.clone(), publish);
        net.tap_mac = original.tap_mac.clone();
        net.guest_addr = original.guest_addr;
        net.gateway = original.gateway;
        net.routed_addr = Some(Ipv4Addr::UNSPECIFIED);
        net.assign(slot);
        net
    }

    /// Take pool slot `slot` (addresses follow from it; a clone's guest keeps its own and
    /// the slot's guest address becomes its routed one).
    pub fn assign(&mut self, slot: u32) {
        let b = block(slot);
        self.slot = slot;
        self.host_addr = Ipv4Addr::from(b + 1);
        if self.routed_addr.is_some() {
            self.routed_addr = Some(Ipv4Addr::from(b + 6));
        } else {
            self.gateway = Ipv4Addr::from(b + 5);
            self.guest_addr = Ipv4Addr::from(b + 6);
        }
    }

    /// The address the host reaches the guest at: its own, or a clone's routed one.
    pub fn reached_at(&self) -> Ipv4Addr {
        self.routed_addr.unwrap_or(self.guest_addr)
    }

    /// The namespace end of the veth.
    pub fn ns_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(block(self.slot) + 2)
    }

    /// The /30 of the slot's TAP and guest addresses, which the host routes into the
    /// namespace (a clone's guest is reached there at its routed address).
    pub fn guest_net(&self) -> Ipv4Addr {
        Ipv4Addr::from(block(self.slot) + 4)
    }

    /// The guest's `ip=` configuration.
    pub fn ip_config(&self) -> fcvm_proto::boot::IpConfig {
        fcvm_proto::boot::IpConfig {
            address: self.guest_addr,
            gateway: Some(self.gateway),
            prefix_len: 30,
            device: super::attachment::GUEST_IFACE.into(),
            dns: self.dns.clone(),
        }
    }

    /// The whole table, for `nft -f -`: masquerade for the guest's egress, DNAT for each
    /// published port (from outside, and from the host itself), forwarding accepted.
    pub fn nft_ruleset(&self) -> String {
        let t = &self.nft_table;
        let veth = &self.veth_host;
        let guest = self.reached_at();
        let mut dnat = String::new();
        for p in &self.publish {
            let daddr = match p.host_ip {
                Some(ip) => format!("ip daddr {ip}"),
                None => "fib daddr type local".to_owned(),
            };
            let _ = writeln!(
                dnat,
                "    {daddr} {proto} dport {hp} dnat ip to {guest}:{gp}",
                proto = p.protocol.as_str(),
                hp = p.host_port,
                gp = p.guest_port
            );
        }
        format!(
            "table ip {t} {{\n\
             \x20 chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;\n{dnat}  }}\n\
             \x20 chain output {{\n    type nat hook output priority -100; policy accept;\n{dnat}  }}\n\
             \x20 chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n\
             \x20   ip saddr {guest} oifname != \"{veth}\" masquerade\n\
             \x20   ip saddr 127.0.0.0/8 oifname \"{veth}\" masquerade\n  }}\n\
             \x20 chain forward {{\n    type filter hook forward priority 0; policy accept;\n\
             \x20   iifname \"{veth}\" accept\n    oifname \"{veth}\" accept\n  }}\n\
             }}\n"
        )
    }
}

impl BridgedNet {
    /// For a clone whose guest keeps another VM's address: the table loaded inside its
    /// namespace (it goes with the namespace), translating the slot's routed address to the
    /// guest's address one to one. DNAT of what the host sends to the routed address, SNAT
    /// of what the guest sends out of the veth; conntrack undoes both on the replies.
    pub fn ns_ruleset(&self) -> Option<String> {
        let routed = self.routed_addr?;
        let guest = self.guest_addr;
        Some(format!(
            "table ip fcvm-clone {{\n\
             \x20 chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;\n\
             \x20   ip daddr {routed} dnat ip to {guest}\n  }}\n\
             \x20 chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n\
             \x20   ip saddr {guest} oifname \"{NS_VETH}\" snat ip to {routed}\n  }}\n\
             }}\n"
        ))
    }
}

/// Refuse a mapping of `wanted` whose host port a live VM in `records` publishes already
/// (DNAT holds no socket, so [`check_free`] cannot see it). Called under the store lock, so
/// two VMs started at once never publish the same port.
pub fn check_unpublished(records: &[VmRecord], wanted: &[PortMapping]) -> Result<(), PublishError> {
    let live = records
        .iter()
        .filter(|r| !r.has_ended())
        .filter_map(|r| match &r.network {
            super::NetworkAttachment::Bridged(b) => Some((b, r)),
            _ => None,
        });
    for (b, r) in live {
        for w in wanted {
            let clash = b.publish.iter().any(|p| {
                w.host_port == p.host_port
                    && w.protocol == p.protocol
                    && (w.host_ip.is_none() || p.host_ip.is_none() || w.host_ip == p.host_ip)
            });
            if clash {
                return Err(PublishError::Published {
                    spec: w.to_string(),
                    port: w.host_port,
                    protocol: w.protocol.as_str(),
                    vm: r.name.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// The lowest pool slot no record holds (any status: a failed VM's leftovers may still hold
/// its veth) and no network of the host's overlaps (`host_nets`, from [`host_networks`]: a
/// host that already uses part of 10.209.0.0/16, say over a VPN, keeps it). Called under the
/// store lock, with every record.
pub fn free_slot(records: &[VmRecord], host_nets: &[(Ipv4Addr, u8)]) -> Option<u32> {
    let used: std::collections::HashSet<u32> = records
        .iter()
        // An ended VM (kept for its exit code) whose teardown completed has no network left.
        .filter(|r| !(r.has_ended() && r.cleanup.is_empty()))
        .filter_map(|r| match &r.network {
            super::NetworkAttachment::Bridged(b) => Some(b.slot),
            _ => None,
        })
        .collect();
    (0..POOL_SLOTS).find(|s| {
        !used.contains(s)
            && !host_nets
                .iter()
                .any(|&(net, len)| overlaps(block(*s), 29, u32::from(net), len))
    })
}

/// Whether the prefixes `a/a_len` and `b/b_len` share an address.
fn overlaps(a: u32, a_len: u8, b: u32, b_len: u8) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    a & mask == b & mask
}

/// The host's IPv4 routes other than default routes (`/proc/net/route`: every interface's own
/// network is one), as (network, prefix length). Empty when the file cannot be read.
pub fn host_networks() -> Vec<(Ipv4Addr, u8)> {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| parse_proc_net_route(&t))
        .unwrap_or_default()
}

/// Destination and mask columns of `/proc/net/route`: the kernel prints each address's
/// network-order bytes as one native-endian hex word (`000200C0` is 192.0.2.0 on x86_64).
fn parse_proc_net_route(text: &str) -> Vec<(Ipv4Addr, u8)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let dest = u32::from_str_radix(cols.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(cols.get(7)?, 16).ok()?;
            let len = mask.count_ones() as u8;
            (len > 0).then(|| (Ipv4Addr::from(dest.to_ne_bytes()), len))
        })
        .collect()
}

/// The host's IPv4 name servers a guest can reach: from `/etc/resolv.conf`, or from
/// systemd-resolved's upstream list when that names only a loopback stub.
pub fn host_dns() -> Vec<Ipv4Addr> {
    for file in ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let found = nameservers(&text);
        if !found.is_empty() {
            return found;
        }
    }
    Vec::new()
}

/// IPv4 `nameserver` lines that are not loopback, at most three (the resolver's limit).
pub fn nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next()?.parse::<Ipv4Addr>().ok())
                .flatten()
        })
        .filter(|a| !a.is_loopback())
        .take(3)
        .collect()
}

/// Why bridged mode cannot be used on this host.
#[derive(Debug, thiserror::Error)]
pub enum BridgedUnavailable {
    /// Not root.
    #[error("--network bridged needs root (it creates a veth pair and nftables rules)")]
    NotRoot,
    /// No usable `nft`.
    #[error("--network bridged needs nft {min} or newer (Debian package nftables): {0}", min = format_args!("{}.{}.{}", MIN_NFT.0, MIN_NFT.1, MIN_NFT.2))]
    Nft(String),
    /// No `ip`.
    #[error("--network bridged needs ip (Debian package iproute2) in PATH")]
    NoIp,
}

/// Find `nft` in PATH (or /usr/sbin, /sbin) and check its version.
pub fn find_nft() -> Result<(PathBuf, String), BridgedUnavailable> {
    let path = find_program("nft").ok_or_else(|| BridgedUnavailable::Nft("not found".into()))?;
    let out = std::process::Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|e| BridgedUnavailable::Nft(format!("{}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match nft_version(&text) {
        Some(v) if v >= MIN_NFT => Ok((path, text)),
        Some(_) => Err(BridgedUnavailable::Nft(format!("found {text}"))),
        None => Err(BridgedUnavailable::Nft(format!(
            "cannot read the version from {text:?}"
        ))),
    }
}

/// `nftables v1.0.6 (Lester Gooch #5)` -> (1, 0, 6).
pub fn nft_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v'))?;
    let mut it = v.split('.').map(|n| n.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// A program in PATH, or in the sbin directories a non-login root shell may lack.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Check that this host can run a bridged VM (before anything is created).
pub fn check_host() -> Result<(), BridgedUnavailable> {
    if !nix::unistd::geteuid().is_root() {
        return Err(BridgedUnavailable::NotRoot);
    }
    find_program("ip").ok_or(BridgedUnavailable::NoIp)?;
    find_nft().map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Name;
    use crate::network::NetworkAttachment;
    use crate::state::{new_vm_id, VmKind};

    fn pm(spec: &str) -> Result<Vec<PortMapping>, PublishError> {
        parse_publish(&[spec.to_owned()])
    }

    #[test]
    fn publish_specs_parse() {
        let got =
            parse_publish(&["8080:80,127.0.0.1:8443:443/tcp".into(), "53:53/udp".into()]).unwrap();
        assert_eq!(
            got,
            vec![
                PortMapping {
                    host_ip: None,
                    host_port: 8080,
                    guest_port: 80,
                    protocol: Protocol::Tcp
                },
                PortMapping {
                    host_ip: Some(Ipv4Addr::LOCALHOST),
                    host_port: 8443,
                    guest_port: 443,
                    protocol: Protocol::Tcp
                },
                PortMapping {
                    host_ip: None,
                    host_port: 53,
                    guest_port: 53,
                    protocol: Protocol::Udp
                },
            ]
        );
        assert_eq!(got[1].to_string(), "127.0.0.1:8443->443/tcp");
        // The same port with the other protocol is a different port.
        assert_eq!(pm("80:80,80:80/udp").unwrap().len(), 2);
    }

    #[test]
    fn bad_publish_specs_name_the_bad_part() {
        let msg = |s: &str| pm(s).unwrap_err().to_string();
        assert!(msg("0:80").contains("host port \"0\""), "{}", msg("0:80"));
        assert!(msg("80:0").contains("guest port \"0\""));
        assert!(msg("65536:80").contains("host port \"65536\""));
        assert!(msg("80:99999").contains("guest port \"99999\""));
        assert!(msg("x:80").contains("host port \"x\""));
        assert!(msg("80:80/sctp").contains("unknown protocol \"sctp\""));
        assert!(msg("80:80/").contains("unknown protocol \"\""));
        assert!(msg("80").contains("expected [HOST_IP:]HOST_PORT:GUEST_PORT"));
        assert!(msg("1:2:3:4").contains("expected"));
        assert!(msg("").contains("expected"));
        assert!(msg("nohost:80:80").contains("host address \"nohost\""));
        assert!(msg("::1:80:80").contains("expected"));
        let dup = msg("8080:80,8080:81");
        assert!(
            dup.contains("\"8080:81\"") && dup.contains("8080/tcp"),
            "{dup}"
        );
        let dup = parse_publish(&["1.2.3.4:9000:80".into(), "9000:90".into()]).unwrap_err();
        assert!(matches!(dup, PublishError::Duplicate { port: 9000, .. }));
    }

    #[test]
    fn a_port_in_use_is_refused() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let m = &pm(&format!("127.0.0.1:{port}:80")).unwrap()[0];
        let e = check_free(m).unwrap_err().to_string();
        assert!(
            e.contains(&format!("127.0.0.1:{port}/tcp is already in use")),
            "{e}"
        );
        drop(held);
        check_free(m).unwrap();
        let held = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let m = &pm(&format!("127.0.0.1:{port}:53/udp")).unwrap()[0];
        assert!(check_free(m).is_err());
    }

    fn record_in(slot: u32) -> VmRecord {
        let id = new_vm_id();
        let mut r = VmRecord::new(
            id.clone(),
            Name::parse("x").unwrap(),
            VmKind::Container,
            "/x".into(),
        );
        r.network = NetworkAttachment::Bridged(BridgedNet::new(&id, slot, "tap0", vec![], vec![]));
        r
    }

    #[test]
    fn the_pool_never_hands_out_a_held_slot() {
        let mut records = vec![record_in(0), record_in(1), record_in(3)];
        assert_eq!(free_slot(&records, &[]), Some(2));
        // An exited VM's slot is free again once its teardown is done, not before.
        let mut exited = record_in(2);
        exited.status = crate::state::VmStatus::Exited;
        exited.cleanup = vec![crate::cleanup::CleanupStep::DeleteNetns { name: "n".into() }];
        let with_pending = [records.clone(), vec![exited.clone()]].concat();
        assert_eq!(free_slot(&with_pending, &[]), Some(4));
        exited.cleanup.clear();
        assert_eq!(
            free_slot(&[records.clone(), vec![exited]].concat(), &[]),
            Some(2)
        );
        // Taking slots one after another, as concurrent launches do under the lock, gives
        // each VM its own addresses.
        let mut addrs = std::collections::HashSet::new();
        for r in &records {
            let NetworkAttachment::Bridged(b) = &r.network else {
                unreachable!()
            };
            assert!(addrs.insert(b.guest_addr) && addrs.insert(b.host_addr));
        }
        for _ in 0..100 {
            let slot = free_slot(&records, &[]).unwrap();
            let r = record_in(slot);
            let NetworkAttachment::Bridged(b) = &r.network else {
                unreachable!()
            };
            for a in [b.host_addr, b.ns_addr(), b.gateway, b.guest_addr] {
                assert!(addrs.insert(a), "{a} handed out twice");
            }
            records.push(r);
        }
        // Full pool: no slot.
        let full: Vec<VmRecord> = (0..POOL_SLOTS).map(record_in).collect();
        assert_eq!(free_slot(&full, &[]), None);
    }

    /// A slot that overlaps one of the host's own networks is never handed out; default
    /// routes do not count.
    #[test]
    fn the_pool_skips_the_host_s_networks() {
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
tun0\t0000D10A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        let nets = parse_proc_net_route(route);
        assert_eq!(
            nets,
            [
                (Ipv4Addr::new(192, 0, 2, 0), 24),
                (Ipv4Addr::new(10, 209, 0, 0), 24)
            ]
        );
        // 10.209.0.0/24 is 32 slots of /29: the first free one is 10.209.1.0/29.
        assert_eq!(free_slot(&[], &nets), Some(32));
        assert_eq!(free_slot(&[record_in(32)], &nets), Some(33));
        // A host route inside one slot takes only that slot.
        let one = [(Ipv4Addr::new(10, 209, 0, 12), 30)];
        assert_eq!(free_slot(&[record_in(0)], &one), Some(2));
        // A host on 10.0.0.0/8 leaves no slot at all.
        assert_eq!(free_slot(&[], &[(Ipv4Addr::new(10, 0, 0, 0), 8)]), None);
    }

    #[test]
    fn addresses_of_a_slot() {
        let b = BridgedNet::new("0123456789abcdef", 1, "tap0", vec![], vec![]);
        assert_eq!(b.host_addr, Ipv4Addr::new(10, 209, 0, 9));
        assert_eq!(b.ns_addr(), Ipv4Addr::new(10, 209, 0, 10));
        assert_eq!(b.guest_net(), Ipv4Addr::new(10, 209, 0, 12));
        assert_eq!(b.gateway, Ipv4Addr::new(10, 209, 0, 13));
        assert_eq!(b.guest_addr, Ipv4Addr::new(10, 209, 0, 14));
        assert_eq!(b.veth_host, "vh0123456789ab");
        assert!(b.veth_host.len() <= 15);
        let last = BridgedNet::new("x", POOL_SLOTS - 1, "tap0", vec![], vec![]);
        assert_eq!(last.guest_addr, Ipv4Addr::new(10, 209, 255, 254));
    }

    #[test]
    fn ruleset_is_one_table_of_this_vm() {
        let b = BridgedNet::new(
            "abc",
            0,
            "tap0",
            vec![],
            pm("8080:80,127.0.0.1:5353:53/udp").unwrap(),
        );
        let r = b.nft_ruleset();
        assert!(r.starts_with("table ip fcvm-abc {"), "{r}");
        assert_eq!(r.matches("table ").count(), 1);
        assert!(r.contains("fib daddr type local tcp dport 8080 dnat ip to 10.209.0.6:80"));
        assert!(r.contains("ip daddr 127.0.0.1 udp dport 5353 dnat ip to 10.209.0.6:53"));
        assert!(r.contains("ip saddr 10.209.0.6 oifname != \"vhabc\" masquerade"));
    }

    /// A clone keeps the guest side of the source (address, gateway, TAP, name servers) and
    /// takes its own slot for the host side; the host reaches it at the slot's guest
    /// address, which its namespace translates to the source's.
    #[test]
    fn a_clone_keeps_the_guest_side_and_is_reached_at_its_own_slot() {
        let dns = vec![Ipv4Addr::new(192, 0, 2, 53)];
        let original = BridgedNet::new("aaa", 1, "tap0", dns.clone(), pm("8080:80").unwrap());
        assert!(original.tap_mac.is_some() && original.ns_ruleset().is_none());
        assert_eq!(original.reached_at(), original.guest_addr);
        let mut c = BridgedNet::clone_of("bbb", 0, &original, pm("9090:80").unwrap());
        c.assign(3);
        assert_eq!(
            (c.guest_addr, c.gateway, &c.tap, &c.tap_mac, &c.dns),
            (
                original.guest_addr,
                original.gateway,
                &original.tap,
                &original.tap_mac,
                &dns
            )
        );
        assert_eq!(
            (c.netns.as_str(), c.veth_host.as_str()),
            ("fcvm-bbb", "vhbbb")
        );
        assert_eq!(c.host_addr, Ipv4Addr::new(10, 209, 0, 25));
        assert_eq!(c.routed_addr, Some(Ipv4Addr::new(10, 209, 0, 30)));
        assert_eq!(c.reached_at(), Ipv4Addr::new(10, 209, 0, 30));
        let host = c.nft_ruleset();
        assert!(
            host.contains("tcp dport 9090 dnat ip to 10.209.0.30:80"),
            "{host}"
        );
        assert!(
            host.contains("ip saddr 10.209.0.30 oifname != \"vhbbb\" masquerade"),
            "{host}"
        );
        assert!(!host.contains("8080"), "{host}");
        let ns = c.ns_ruleset().unwrap();
        assert!(
            ns.contains("ip daddr 10.209.0.30 dnat ip to 10.209.0.14"),
            "{ns}"
        );
        assert!(
            ns.contains("ip saddr 10.209.0.14 oifname \"veth0\" snat ip to 10.209.0.30"),
            "{ns}"
        );
        // The record keeps it all (a snapshot of the clone clones the same guest side).
        let back: BridgedNet = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let old: BridgedNet = serde_json::from_value(serde_json::json!({
            "netns": "n", "tap": "tap0", "veth_host": "v", "nft_table": "t", "slot": 0,
            "host_addr": "10.209.0.1", "gateway": "10.209.0.5", "guest_addr": "10.209.0.6"
        }))
        .unwrap();
        assert!(old.tap_mac.is_none() && old.routed_addr.is_none());
    }

    /// A host port a live VM publishes is refused for the next one (any host address
    /// overlapping), but not the other protocol, another address, or an ended VM's.
    #[test]
    fn a_port_published_by_a_live_vm_is_refused() {
        let mut web = record_in(0);
        web.name = Name::parse("web").unwrap();
        if let NetworkAttachment::Bridged(b) = &mut web.network {
            b.publish = pm("8080:80,127.0.0.1:9000:90").unwrap();
        }
        let records = vec![web.clone(), record_in(1)];
        let e = check_unpublished(&records, &pm("8081:81,8080:80").unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--publish \"8080->80/tcp\": host port 8080/tcp is already published by VM web"
        );
        assert!(check_unpublished(&records, &pm("9000:90").unwrap()).is_err());
        check_unpublished(&records, &pm("127.0.0.2:9000:90").unwrap()).unwrap();
        check_unpublished(&records, &pm("8080:80/udp").unwrap()).unwrap();
        web.status = crate::state::VmStatus::Exited;
        check_unpublished(&[web], &pm("8080:80").unwrap()).unwrap();
    }

    #[test]
    fn resolvers_and_versions() {
        assert_eq!(
            nameservers(
                "# x\nnameserver 127.0.0.53\nnameserver 1.1.1.1\nnameserver ::1\nsearch a\n"
            ),
            vec![Ipv4Addr::new(1, 1, 1, 1)]
        );
        assert!(nameservers("nameserver 127.0.0.53\n").is_empty());
        assert_eq!(
            nft_version("nftables v1.0.6 (Lester Gooch #5)"),
            Some((1, 0, 6))
        );
        assert_eq!(nft_version("nftables v0.9"), Some((0, 9, 0)));
        assert!(nft_version("nftables v0.9").unwrap() < MIN_NFT);
        assert_eq!(nft_version("garbage"), None);
    }
}
