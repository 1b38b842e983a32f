//! How a VM's network device reaches the host, as recorded in its state record.

use serde::{Deserialize, Serialize};

use crate::cleanup::CleanupStep;
use crate::firecracker::models::NetworkInterface;

use super::bridged::BridgedNet;
use super::{NetError, NetOps};

/// The guest interface every attached VM gets.
pub const GUEST_IFACE: &str = "eth0";

/// The network of one VM. New modes (bridged, routed, slirp) are new variants: the record,
/// the launch and the teardown all go through this type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum NetworkAttachment {
    /// No network device.
    #[default]
    None,
    /// A persistent TAP made by fcvm inside the VM's own network namespace, where the VMM
    /// runs. Every VM's TAP has the same name in its own namespace, so snapshot clones find
    /// the TAP name their vmstate records (Firecracker 1.12 cannot retarget it on load).
    NamespacedTap {
        /// Namespace name under `/run/netns`.
        netns: String,
        /// TAP name inside it.
        tap: String,
    },
    /// A TAP the VMM creates itself (in fcvm's namespace) when it opens it, and that goes
    /// away with the VMM: nothing for fcvm to make or undo. Carries MMDS to the guest.
    VmmTap {
        /// TAP name (unique per VM, at most 15 bytes).
        tap: String,
    },
    /// A TAP in the VM's own namespace, a veth pair to the host, NAT and published ports
    /// (see [`super::bridged`]).
    Bridged(BridgedNet),
}

impl NetworkAttachment {
    /// A TAP named `tap` in the namespace `fcvm-<id>`.
    pub fn namespaced(id: &str, tap: &str) -> NetworkAttachment {
        NetworkAttachment::NamespacedTap {
            netns: format!("fcvm-{id}"),
            tap: tap.to_owned(),
        }
    }

    /// A TAP the VMM makes itself, named after the VM id.
    pub fn vmm_tap(id: &str) -> NetworkAttachment {
        NetworkAttachment::VmmTap {
            tap: format!("fcvm{}", &id[..id.len().min(11)]),
        }
    }

    /// The namespace the VMM must run in.
    pub fn netns(&self) -> Option<&str> {
        match self {
            NetworkAttachment::NamespacedTap { netns, .. } => Some(netns),
            NetworkAttachment::Bridged(b) => Some(&b.netns),
            _ => None,
        }
    }

    /// The TAP the guest's interface is backed by.
    pub fn tap(&self) -> Option<&str> {
        match self {
            NetworkAttachment::None => None,
            NetworkAttachment::NamespacedTap { tap, .. } | NetworkAttachment::VmmTap { tap } => {
                Some(tap)
            }
            NetworkAttachment::Bridged(b) => Some(&b.tap),
        }
    }

    /// Steps that undo [`NetworkAttachment::create`]; recorded before it runs.
    pub fn undo_steps(&self) -> Vec<CleanupStep> {
        match self {
            NetworkAttachment::NamespacedTap { netns, .. } => vec![CleanupStep::DeleteNetns {
                name: netns.clone(),
            }],
            // The table first (no rule may outlive its addresses), then the veth (its route
            // goes with it), then the namespace (TAP and the veth's other end).
            NetworkAttachment::Bridged(b) => vec![
                CleanupStep::DeleteNftTable {
                    table: b.nft_table.clone(),
                },
                CleanupStep::DeleteLink {
                    name: b.veth_host.clone(),
                },
                CleanupStep::DeleteNetns {
                    name: b.netns.clone(),
                },
            ],
            _ => Vec::new(),
        }
    }

    /// The guest's `ip=` configuration, when the host decides its address.
    pub fn ip_config(&self) -> Option<fcvm_proto::boot::IpConfig> {
        match self {
            NetworkAttachment::Bridged(b) => Some(b.ip_config()),
            _ => None,
        }
    }

    /// Make what fcvm must make before the VMM starts; `tap_owner` is the jailed VMM's uid,
    /// which must be able to attach to the TAP. On failure nothing is left.
    pub fn create(&self, net: &dyn NetOps, tap_owner: Option<u32>) -> Result<(), NetError> {
        match self {
            NetworkAttachment::NamespacedTap { netns, tap } => {
                net.create_netns(netns, Some(tap), tap_owner)
            }
            NetworkAttachment::Bridged(b) => {
                let made = create_bridged(b, net, tap_owner);
                if made.is_err() {
                    for step in self.undo_steps() {
                        let _ = step.run(net);
                    }
                }
                made
            }
            _ => Ok(()),
        }
    }

    /// The `PUT /network-interfaces` body, if there is a device; the MAC is derived from
    /// `seed` (the VM id) so it is stable for the VM's life.
    pub fn interface(&self, seed: &str) -> Option<NetworkInterface> {
        let tap = self.tap()?;
        let guest_mac = match self {
            NetworkAttachment::NamespacedTap { .. } | NetworkAttachment::Bridged(_) => {
                Some(super::mac_for(seed))
            }
            _ => None,
        };
        Some(NetworkInterface {
            iface_id: GUEST_IFACE.into(),
            host_dev_name: tap.to_owned(),
            guest_mac,
            ..Default::default()
        })
    }
}

/// The steps of a bridged network, each timed in the debug log.
fn create_bridged(
    b: &BridgedNet,
    net: &dyn NetOps,
    tap_owner: Option<u32>,
) -> Result<(), NetError> {
    let ns = Some(b.netns.as_str());
    let cidr = |a: std::net::Ipv4Addr| format!("{a}/30");
    let step = |what: &str, f: &mut dyn FnMut() -> Result<(), NetError>| {
        let t = std::time::Instant::now();
        let r = f();
        tracing::debug!(netns = %b.netns, "bridged setup: {what} took {:?}", t.elapsed());
        r
    };
    step("namespace and TAP", &mut || {
        net.create_netns(&b.netns, Some(&b.tap), tap_owner)
    })?;
    let cmd = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
    let (host_cidr, ns_cidr, gw_cidr) = (cidr(b.host_addr), cidr(b.ns_addr()), cidr(b.gateway));
    let host_addr = b.host_addr.to_string();
    let veth = super::bridged::NS_VETH;
    // One `ip -batch` per namespace and order: each `ip` process costs 0.1-2 s in the
    // emulated KVM host, and ten clones start at once.
    step("veth pair and host address", &mut || {
        net.ip_batch(
            None,
            &[
                cmd(&[
                    "link",
                    "add",
                    &b.veth_host,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    veth,
                    "netns",
                    &b.netns,
                ]),
                cmd(&["addr", "add", &host_cidr, "dev", &b.veth_host]),
                cmd(&["link", "set", &b.veth_host, "up"]),
            ],
        )
    })?;
    step("namespace addresses and route", &mut || {
        let mut lines = Vec::new();
        if let Some(mac) = &b.tap_mac {
            lines.push(cmd(&["link", "set", &b.tap, "address", mac]));
        }
        lines.extend([
            cmd(&["addr", "add", &ns_cidr, "dev", veth]),
            cmd(&["link", "set", veth, "up"]),
            cmd(&["addr", "add", &gw_cidr, "dev", &b.tap]),
            cmd(&["route", "add", "default", "via", &host_addr]),
        ]);
        net.ip_batch(ns, &lines)
    })?;
    step("host route", &mut || {
        net.ip(
            None,
            &[
                "route",
                "add",
                &cidr(b.guest_net()),
                "via",
                &b.ns_addr().to_string(),
                "dev",
                &b.veth_host,
            ],
        )
    })?;
    step("forwarding", &mut || {
        net.sysctl(ns, "net/ipv4/ip_forward", "1")?;
        net.sysctl(None, "net/ipv4/ip_forward", "1")?;
        // DNAT of connections the host makes to 127.0.0.1 (published ports on localhost).
        net.sysctl(
            None,
            &format!("net/ipv4/conf/{}/route_localnet", b.veth_host),
            "1",
        )
    })?;
    if let Some(rules) = b.ns_ruleset() {
        step("clone address translation", &mut || {
            net.nft_apply_in(&b.netns, &rules)
        })?;
    }
    step("nftables table", &mut || net.nft_apply(&b.nft_ruleset()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachments_round_trip_and_say_what_to_undo() {
        let a = NetworkAttachment::namespaced("abc", "tap0");
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"mode":"namespaced_tap","netns":"fcvm-abc","tap":"tap0"})
        );
        assert_eq!(
            serde_json::from_value::<NetworkAttachment>(json).unwrap(),
            a
        );
        assert_eq!(a.netns(), Some("fcvm-abc"));
        assert_eq!(
            a.undo_steps(),
            vec![CleanupStep::DeleteNetns {
                name: "fcvm-abc".into()
            }]
        );
        let v = NetworkAttachment::vmm_tap("0123456789abcdef");
        assert_eq!(v.tap(), Some("fcvm0123456789a"));
        assert!(v.undo_steps().is_empty() && v.netns().is_none());
        assert!(NetworkAttachment::None.interface("x").is_none());
        assert_eq!(v.interface("x").unwrap().host_dev_name, "fcvm0123456789a");
    }

    #[test]
    fn create_goes_through_the_seam() {
        let net = super::super::fake::RecordingNet::default();
        NetworkAttachment::namespaced("abc", "tap0")
            .create(&net, None)
            .unwrap();
        NetworkAttachment::vmm_tap("abc")
            .create(&net, None)
            .unwrap();
        assert_eq!(net.calls(), vec!["create_netns fcvm-abc tap0".to_owned()]);
    }

    fn bridged(id: &str) -> NetworkAttachment {
        let publish = super::super::bridged::parse_publish(&["8080:80".into()]).unwrap();
        NetworkAttachment::Bridged(BridgedNet::new(id, 2, "tap0", vec![], publish))
    }

    /// A jailed VMM has no CAP_NET_ADMIN: its TAP, in a namespace or bridged, is made for its
    /// uid.
    #[test]
    fn the_tap_of_a_jailed_vmm_is_made_for_its_uid() {
        for a in [
            bridged("abc"),
            NetworkAttachment::NamespacedTap {
                netns: "fcvm-abc".into(),
                tap: "tap0".into(),
            },
        ] {
            let net = super::super::fake::RecordingNet::default();
            a.create(&net, Some(2_000_001)).unwrap();
            assert_eq!(net.calls()[0], "create_netns fcvm-abc tap0 owner=2000001");
        }
    }

    #[test]
    fn bridged_creates_in_order_and_records_its_undo() {
        let net = super::super::fake::RecordingNet::default();
        let a = bridged("abc");
        a.create(&net, None).unwrap();
        let calls = net.calls();
        assert_eq!(calls[0], "create_netns fcvm-abc tap0");
        // The TAP's MAC is the VM's own, fixed before the guest ever sees it.
        let NetworkAttachment::Bridged(b) = &a else {
            unreachable!()
        };
        let mac = b.tap_mac.clone().unwrap();
        assert_eq!(
            calls[1],
            "ip link add vhabc type veth peer name veth0 netns fcvm-abc"
        );
        assert_eq!(
            calls[4],
            format!("ip -n fcvm-abc link set tap0 address {mac}")
        );
        // A VM that booted with its own address needs no translation in its namespace.
        assert!(
            !calls.iter().any(|c| c.starts_with("nft_apply_in")),
            "{calls:?}"
        );
        assert!(calls.contains(&"ip addr add 10.209.0.17/30 dev vhabc".to_owned()));
        assert!(calls.contains(&"ip -n fcvm-abc addr add 10.209.0.21/30 dev tap0".to_owned()));
        assert!(calls.contains(&"ip route add 10.209.0.20/30 via 10.209.0.18 dev vhabc".to_owned()));
        assert!(calls.contains(&"sysctl fcvm-abc net/ipv4/ip_forward=1".to_owned()));
        assert_eq!(calls.last().unwrap(), "nft_apply table ip fcvm-abc");
        assert_eq!(
            a.undo_steps(),
            vec![
                CleanupStep::DeleteNftTable {
                    table: "fcvm-abc".into()
                },
                CleanupStep::DeleteLink {
                    name: "vhabc".into()
                },
                CleanupStep::DeleteNetns {
                    name: "fcvm-abc".into()
                },
            ]
        );
        let ip = a.ip_config().unwrap();
        assert_eq!(ip.address.to_string(), "10.209.0.22");
        assert_eq!(ip.gateway.unwrap().to_string(), "10.209.0.21");
        assert!(a.interface("abc").unwrap().guest_mac.is_some());
        // The record keeps all of it.
        let back: NetworkAttachment =
            serde_json::from_value(serde_json::to_value(&a).unwrap()).unwrap();
        assert_eq!(back, a);
    }

    /// A clone of a bridged VM: the source's TAP MAC, its own veth and slot, the 1:1
    /// translation loaded in its namespace before the host's table, the same undo.
    #[test]
    fn a_bridged_clone_keeps_the_guest_side_and_translates_in_its_namespace() {
        let NetworkAttachment::Bridged(original) = bridged("abc") else {
            unreachable!()
        };
        let publish = super::super::bridged::parse_publish(&["9090:80".into()]).unwrap();
        let mut c = BridgedNet::clone_of("def", 0, &original, publish);
        c.assign(5);
        let a = NetworkAttachment::Bridged(c.clone());
        let net = super::super::fake::RecordingNet::default();
        a.create(&net, None).unwrap();
        let calls = net.calls();
        let mac = original.tap_mac.clone().unwrap();
        assert_eq!(calls[0], "create_netns fcvm-def tap0");
        assert_eq!(
            calls[4],
            format!("ip -n fcvm-def link set tap0 address {mac}")
        );
        // The guest's gateway is the source's; the host routes the clone's own slot.
        assert!(calls.contains(&format!(
            "ip -n fcvm-def addr add {}/30 dev tap0",
            original.gateway
        )));
        assert!(calls.contains(&"ip route add 10.209.0.44/30 via 10.209.0.42 dev vhdef".to_owned()));
        let n = calls.len();
        assert_eq!(
            &calls[n - 2..],
            [
                "nft_apply_in fcvm-def table ip fcvm-clone",
                "nft_apply table ip fcvm-def"
            ]
        );
        assert_eq!(
            a.undo_steps()[0],
            CleanupStep::DeleteNftTable {
                table: "fcvm-def".into()
            }
        );
        // The guest is configured already: no `ip=` for a restore.
        assert_eq!(a.ip_config().unwrap().address, original.guest_addr);
    }

    #[test]
    fn a_failed_bridged_step_undoes_what_was_made() {
        for fail in ["ip link add", "ip -n", "sysctl", "nft_apply"] {
            let net = super::super::fake::RecordingNet::default();
            net.fail_once(fail);
            assert!(bridged("abc").create(&net, None).is_err(), "{fail}");
            let calls = net.calls();
            let n = calls.len();
            assert_eq!(
                &calls[n - 3..],
                [
                    "nft_delete_table fcvm-abc",
                    "delete_link vhabc",
                    "delete_netns fcvm-abc"
                ],
                "after {fail}: {calls:?}"
            );
        }
    }
}
