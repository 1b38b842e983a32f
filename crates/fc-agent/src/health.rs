//! The container's health check (`--health-check URL`): an HTTP GET from the agent, in the
//! VM's network namespace (the container's too: it runs with `--network=host`), every
//! interval; each change of state goes to the host as [`Status::Health`] (see
//! [`fcvm_proto::health`] for what passes and the states).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fcvm_proto::health::{
    passes, status_code, HealthCheck, HealthState, HealthTracker, HttpTarget,
};
use fcvm_proto::status::Status;

use crate::agent::StatusSink;

/// The check's current state, shared with whoever must report it again (after a restore).
#[derive(Clone)]
pub struct Current(Arc<Mutex<HealthState>>);

impl Current {
    /// The state now.
    pub fn get(&self) -> HealthState {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Starts checking; returns the shared state. Ends when `done` is set.
pub fn start(check: &HealthCheck, status: StatusSink, done: Arc<AtomicBool>) -> Current {
    let current = Current(Arc::new(Mutex::new(HealthState::Starting)));
    let target = match check.validate() {
        Ok(t) => t,
        Err(e) => {
            // The host validated it: only a mismatched host and agent get here.
            crate::info!("health check refused: {e}");
            return current;
        }
    };
    let (interval, timeout, retries) = (check.interval(), check.timeout(), check.retries);
    let shared = current.clone();
    let spawned = std::thread::Builder::new()
        .name("health".into())
        .spawn(move || {
            let mut tracker = HealthTracker::new(retries);
            while !done.load(Ordering::SeqCst) {
                let started = Instant::now();
                let result = probe(&target, timeout);
                if let Err(e) = &result {
                    crate::debug!("health check failed: {e}");
                }
                if let Some(state) = tracker.observe(result.is_ok()) {
                    crate::info!("health: {state}");
                    *shared.0.lock().unwrap_or_else(|p| p.into_inner()) = state;
                    status.send(&Status::Health(state));
                }
                std::thread::sleep(interval.saturating_sub(started.elapsed()));
            }
        });
    if let Err(e) = spawned {
        crate::info!("cannot start the health check thread: {e}");
    }
    current
}

/// One check: `Ok(code)` for a passing answer, else why it failed.
pub fn probe(target: &HttpTarget, timeout: Duration) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let addr = address(target)?;
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let left = |what: &str| {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("timed out before {what}"))
    };
    s.set_write_timeout(Some(left("sending")?))
        .map_err(|e| e.to_string())?;
    let host = if target.host.contains(':') {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    };
    write!(
        s,
        "GET {} HTTP/1.0\r\nHost: {host}:{}\r\nUser-Agent: fcvm-health\r\nConnection: close\r\n\r\n",
        target.path, target.port
    )
    .map_err(|e| format!("send: {e}"))?;
    s.set_read_timeout(Some(left("the answer")?))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    // A status line is short: more than this without a newline is not HTTP.
    BufReader::new(std::io::Read::take(s, 1024))
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    match status_code(&line) {
        Some(code) if passes(code) => Ok(code),
        Some(code) => Err(format!("HTTP {code}")),
        None => Err(format!("not an HTTP answer: {:?}", line.trim_end())),
    }
}

/// `localhost` is the loopback address whatever the guest's /etc/hosts says.
fn address(target: &HttpTarget) -> Result<SocketAddr, String> {
    if target.host.eq_ignore_ascii_case("localhost") {
        return Ok(SocketAddr::from(([127, 0, 0, 1], target.port)));
    }
    (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| format!("resolve {}: {e}", target.host))?
        .next()
        .ok_or_else(|| format!("{} has no address", target.host))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    fn serve_once(answer: &'static [u8]) -> (u16, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            // The whole request head: the probe may write it in more than one piece.
            let mut req = Vec::new();
            let mut buf = [0u8; 512];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            c.write_all(answer).unwrap();
            String::from_utf8_lossy(&req).into_owned()
        });
        (port, h)
    }

    fn target(port: u16, path: &str) -> HttpTarget {
        HttpTarget::parse(&format!("http://localhost:{port}{path}")).unwrap()
    }

    #[test]
    fn a_2xx_or_3xx_answer_passes_and_the_request_is_a_plain_get() {
        let (port, h) = serve_once(b"HTTP/1.0 200 OK\r\n\r\nhello");
        assert_eq!(
            probe(&target(port, "/stamp?x"), Duration::from_secs(5)),
            Ok(200)
        );
        let req = h.join().unwrap();
        assert!(req.starts_with("GET /stamp?x HTTP/1.0\r\n"), "{req}");
        assert!(
            req.contains(&format!("Host: localhost:{port}\r\n")),
            "{req}"
        );
        let (port, _h) = serve_once(b"HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n");
        assert_eq!(probe(&target(port, "/"), Duration::from_secs(5)), Ok(302));
    }

    #[test]
    fn errors_refusals_and_garbage_fail() {
        let (port, _h) = serve_once(b"HTTP/1.1 503 Unavailable\r\n\r\n");
        assert_eq!(
            probe(&target(port, "/"), Duration::from_secs(5)),
            Err("HTTP 503".into())
        );
        let (port, _h) = serve_once(b"SSH-2.0-nope\r\n");
        assert!(probe(&target(port, "/"), Duration::from_secs(5))
            .unwrap_err()
            .starts_with("not an HTTP answer"));
        // Nothing listens: refused.
        let free = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(probe(&target(free, "/"), Duration::from_secs(5))
            .unwrap_err()
            .starts_with("connect"));
    }

    #[test]
    fn a_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = Instant::now();
        let r = probe(&target(port, "/"), Duration::from_millis(300));
        assert!(r.is_err(), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(3));
        drop(l);
    }
}
