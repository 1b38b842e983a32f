//! Fetching the run plan from MMDS (V2: session token, then GET).
//!
//! A dozen lines of HTTP/1.1 over a `TcpStream` to a link-local address are all this needs; a
//! client library would add more code to the static binary than it saves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fcvm_proto::plan::{Plan, MMDS_ADDR, MMDS_PLAN_KEY, MMDS_ROOT_KEY};

/// Largest response accepted.
const MAX_RESPONSE: u64 = 4 << 20;

/// Errors fetching the plan.
#[derive(Debug, thiserror::Error)]
pub enum MmdsError {
    /// Network error talking to MMDS.
    #[error("MMDS request failed: {0}")]
    Io(#[from] std::io::Error),
    /// MMDS answered with an error status.
    #[error("MMDS {request} answered HTTP {status}: {body}")]
    Status {
        /// Request line.
        request: String,
        /// HTTP status.
        status: u16,
        /// Body.
        body: String,
    },
    /// The response is not HTTP.
    #[error("MMDS sent a malformed HTTP response")]
    Malformed,
    /// The plan is not valid JSON for [`Plan`].
    #[error("The container plan in MMDS is not valid: {0}")]
    BadPlan(String),
    /// No plan within the timeout.
    #[error("No container plan in MMDS after {0:?} (last error: {1}); did the host PUT /mmds before InstanceStart?")]
    Timeout(Duration, String),
}

fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Result<String, MmdsError> {
    let addr = SocketAddr::new(MMDS_ADDR.parse().map_err(|_| MmdsError::Malformed)?, 80);
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {MMDS_ADDR}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "PUT" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let raw = read_response(&mut s)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(MmdsError::Malformed)?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(MmdsError::Malformed)?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body).ok_or(MmdsError::Malformed)?
    } else {
        body.to_owned()
    };
    if !(200..300).contains(&status) {
        return Err(MmdsError::Status {
            request: format!("{method} {path}"),
            status,
            body,
        });
    }
    Ok(body)
}

/// Reads one response: the head, then `Content-Length` bytes of body (or up to EOF when there
/// is no length). Firecracker's MMDS keeps the connection open after answering, even when asked
/// to close it, so reading to EOF would wait for the read timeout on every request.
fn read_response(s: &mut impl Read) -> Result<Vec<u8>, MmdsError> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let body_start = end + 4;
            if let Some(len) = content_length(&raw[..end]) {
                if raw.len() >= body_start + len {
                    raw.truncate(body_start + len);
                    return Ok(raw);
                }
            }
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() as u64 > MAX_RESPONSE {
            return Err(MmdsError::Malformed);
        }
    }
}

/// The `Content-Length` of a response head, when it has one.
fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..n)?);
        body = rest.get(n..)?.strip_prefix("\r\n")?;
    }
}

/// One attempt: token, then the plan.
pub fn fetch_once() -> Result<Plan, MmdsError> {
    let token = request(
        "PUT",
        "/latest/api/token",
        &[("X-metadata-token-ttl-seconds", "21600")],
    )?;
    let body = request(
        "GET",
        &format!("/{MMDS_ROOT_KEY}/{MMDS_PLAN_KEY}"),
        &[
            ("X-metadata-token", token.trim()),
            ("Accept", "application/json"),
        ],
    )?;
    let plan: Plan = serde_json::from_str(&body).map_err(|e| MmdsError::BadPlan(e.to_string()))?;
    plan.validate()
        .map_err(|e| MmdsError::BadPlan(e.to_string()))?;
    Ok(plan)
}

/// Retries until a plan is available or `timeout` passes. A plan that is present but invalid is
/// returned at once: waiting would not fix it.
pub fn fetch(timeout: Duration) -> Result<Plan, MmdsError> {
    let deadline = Instant::now() + timeout;
    loop {
        match fetch_once() {
            Ok(p) => return Ok(p),
            Err(e @ MmdsError::BadPlan(_)) => return Err(e),
            Err(e) if Instant::now() >= deadline => {
                return Err(MmdsError::Timeout(timeout, e.to_string()))
            }
            Err(e) => {
                crate::debug!("MMDS not ready: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_ends_at_its_content_length_even_if_the_connection_stays_open() {
        // A reader that would block (here: fail) after the response, like MMDS's open socket.
        struct OpenSocket(std::io::Cursor<Vec<u8>>);
        impl Read for OpenSocket {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                match self.0.read(b)? {
                    0 => Err(std::io::ErrorKind::WouldBlock.into()),
                    n => Ok(n),
                }
            }
        }
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        let got = read_response(&mut OpenSocket(std::io::Cursor::new(wire.clone()))).unwrap();
        assert_eq!(got, wire);
        // Without a length, EOF ends it.
        let wire = b"HTTP/1.1 200 OK\r\n\r\nabc".to_vec();
        let got = read_response(&mut std::io::Cursor::new(wire.clone())).unwrap();
        assert_eq!(got, wire);
        assert_eq!(
            content_length(b"HTTP/1.1 200 OK\r\ncontent-length:  12"),
            Some(12)
        );
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").as_deref(),
            Some("abcde")
        );
        assert_eq!(dechunk("zz\r\n"), None);
        assert_eq!(dechunk("5\r\nab"), None);
    }
}
