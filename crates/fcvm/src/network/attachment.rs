//! How a VM's network device reaches the host, as recorded in its state record.

use serde::{Deserialize, Serialize};

use crate::cleanup::CleanupStep;
use crate::firecracker::models::NetworkInterface;

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
        }
    }

    /// Steps that undo [`NetworkAttachment::create`]; recorded before it runs.
    pub fn undo_steps(&self) -> Vec<CleanupStep> {
        match self {
            NetworkAttachment::NamespacedTap { netns, .. } => vec![CleanupStep::DeleteNetns {
                name: netns.clone(),
            }],
            _ => Vec::new(),
        }
    }

    /// Make what fcvm must make before the VMM starts. On failure nothing is left.
    pub fn create(&self, net: &dyn NetOps) -> Result<(), NetError> {
        match self {
            NetworkAttachment::NamespacedTap { netns, tap } => net.create_netns(netns, Some(tap)),
            _ => Ok(()),
        }
    }

    /// The `PUT /network-interfaces` body, if there is a device; the MAC is derived from
    /// `seed` (the VM id) so it is stable for the VM's life.
    pub fn interface(&self, seed: &str) -> Option<NetworkInterface> {
        let tap = self.tap()?;
        let guest_mac = match self {
            NetworkAttachment::NamespacedTap { .. } => Some(super::mac_for(seed)),
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
            .create(&net)
            .unwrap();
        NetworkAttachment::vmm_tap("abc").create(&net).unwrap();
        assert_eq!(net.calls(), vec!["create_netns fcvm-abc tap0".to_owned()]);
    }
}
