//! `--network` and `--publish` as `podman run` and `snapshot run` take them: checked before
//! anything starts (bad specs, ports in use, a host that cannot do bridged mode), so both
//! commands refuse the same input with the same messages.

use std::net::Ipv4Addr;

use super::bridged::{self, BridgedUnavailable, PortMapping, PublishError};

/// `--network`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NetworkRequest {
    /// Only the agent's metadata link (a TAP the VMM makes).
    #[default]
    None,
    /// See [`crate::network::bridged`].
    Bridged,
    /// Not built yet: refused.
    Rootless,
}

/// A refused `--network`/`--publish`.
#[derive(Debug, thiserror::Error)]
pub enum NetworkArgsError {
    /// A bad publish spec.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Bridged cannot work here.
    #[error(transparent)]
    Unavailable(#[from] BridgedUnavailable),
    /// Rootless mode is not built yet.
    #[error("--network rootless is not yet supported; use --network bridged (as root) or none")]
    RootlessNotYet,
    /// Ports without a network that can carry them.
    #[error("--publish needs --network bridged")]
    PublishWithoutNetwork,
}

/// The network decided before anything starts (addresses come at launch, under the store
/// lock, which also refuses a port another VM publishes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreparedNetwork {
    /// No network.
    None,
    /// Bridged mode.
    Bridged {
        /// The host's name servers, for the guest.
        dns: Vec<Ipv4Addr>,
        /// Published ports, each free on the host when checked.
        publish: Vec<PortMapping>,
    },
}

/// Check `--network` and `--publish` (bad specs, ports in use, a host that cannot do it).
pub fn prepare(
    network: NetworkRequest,
    publish: &[String],
) -> Result<PreparedNetwork, NetworkArgsError> {
    let publish = bridged::parse_publish(publish)?;
    match network {
        NetworkRequest::Rootless => Err(NetworkArgsError::RootlessNotYet),
        NetworkRequest::None if !publish.is_empty() => Err(NetworkArgsError::PublishWithoutNetwork),
        NetworkRequest::None => Ok(PreparedNetwork::None),
        NetworkRequest::Bridged => {
            for p in &publish {
                bridged::check_free(p)?;
            }
            bridged::check_host()?;
            Ok(PreparedNetwork::Bridged {
                dns: bridged::host_dns(),
                publish,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_needs_a_network_and_rootless_is_refused() {
        let p = ["8080:80".to_owned()];
        assert!(matches!(
            prepare(NetworkRequest::None, &p),
            Err(NetworkArgsError::PublishWithoutNetwork)
        ));
        assert!(matches!(
            prepare(NetworkRequest::Rootless, &[]),
            Err(NetworkArgsError::RootlessNotYet)
        ));
        assert_eq!(
            prepare(NetworkRequest::None, &[]).unwrap(),
            PreparedNetwork::None
        );
        // A bad spec is named whatever the mode.
        let e = prepare(NetworkRequest::None, &["0:80".into()]).unwrap_err();
        assert!(e.to_string().contains("host port \"0\""), "{e}");
    }
}
