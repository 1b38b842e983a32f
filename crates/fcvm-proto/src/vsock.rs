//! Vsock addressing and Firecracker's hybrid-vsock handshake.
//!
//! Firecracker exposes the guest's virtio-vsock device on the host as Unix sockets:
//!
//! - **host → guest**: connect to `uds_path`, send `CONNECT <port>\n`, read `OK <host_port>\n`;
//!   from then on the stream belongs to the guest listener on `<port>`. If nothing listens in
//!   the guest, the VMM closes the connection without an `OK` line.
//! - **guest → host**: a guest connecting to host CID 2 port `P` is spliced onto a connection
//!   to the Unix socket `<uds_path>_P`, which the host must be listening on beforehand.

use std::path::{Path, PathBuf};

/// Context ID Firecracker assigns to the host.
pub const HOST_CID: u32 = 2;
/// Context ID fcvm gives every guest (`PUT /vsock {"guest_cid": 3}`).
pub const GUEST_CID: u32 = 3;

/// guest → host: lifecycle lines, see [`crate::status`].
pub const STATUS_PORT: u32 = 4999;
/// host → guest: exec server, see [`crate::exec`].
pub const EXEC_PORT: u32 = 4998;
/// guest → host: container stdout/stderr as [`crate::frame`] frames.
pub const OUTPUT_PORT: u32 = 4997;
/// guest → host: container input (stdin, resize, signals) as frames, for `-i`/`-t` runs.
pub const INPUT_PORT: u32 = 4996;

/// guest → host: the first `--map` volume's FUSE channel; volume `i` is on
/// `VOLUME_PORT_BASE + i`.
pub const VOLUME_PORT_BASE: u32 = 5100;

/// Longest handshake line accepted (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_HANDSHAKE_LINE: usize = 64;

/// Errors of the hybrid-vsock handshake.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The peer sent something other than `CONNECT <port>`.
    #[error("Malformed vsock CONNECT line {0:?}: expected \"CONNECT <port>\"")]
    BadConnect(String),
    /// The VMM answered something other than `OK <port>`.
    #[error(
        "Malformed vsock reply {0:?}: expected \"OK <port>\"; is anything listening in the guest?"
    )]
    BadReply(String),
}

/// Host-side Unix socket path a guest connection to host `port` is forwarded to.
pub fn host_listener_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// The line a host sends on `uds_path` to reach guest `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// Parses a `CONNECT <port>` line (trailing newline optional).
pub fn parse_connect_line(line: &str) -> Result<u32, HandshakeError> {
    let bad = || HandshakeError::BadConnect(line.to_owned());
    let rest = line
        .trim_end_matches('\n')
        .strip_prefix("CONNECT ")
        .ok_or_else(bad)?;
    rest.trim().parse::<u32>().map_err(|_| bad())
}

/// The reply the VMM sends once the guest accepted a host connection.
pub fn ok_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

/// Parses an `OK <port>` reply (trailing newline optional).
pub fn parse_ok_line(line: &str) -> Result<u32, HandshakeError> {
    let bad = || HandshakeError::BadReply(line.to_owned());
    let rest = line
        .trim_end_matches('\n')
        .strip_prefix("OK ")
        .ok_or_else(bad)?;
    rest.trim().parse::<u32>().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_path_appends_port() {
        assert_eq!(
            host_listener_path(Path::new("/run/vm/v.sock"), 4999),
            PathBuf::from("/run/vm/v.sock_4999")
        );
    }

    #[test]
    fn connect_roundtrip_and_rejects() {
        assert_eq!(parse_connect_line(&connect_line(4998)), Ok(4998));
        assert_eq!(parse_connect_line("CONNECT 52000"), Ok(52000));
        for bad in [
            "",
            "CONNECT",
            "CONNECT x\n",
            "connect 1\n",
            "CONNECT -1\n",
            "OK 5\n",
        ] {
            assert!(parse_connect_line(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ok_roundtrip_and_rejects() {
        assert_eq!(parse_ok_line(&ok_line(1073741824)), Ok(1073741824));
        for bad in ["", "OK\n", "OK 99999999999\n", "ERR 1\n"] {
            assert!(parse_ok_line(bad).is_err(), "{bad:?} accepted");
        }
    }
}
