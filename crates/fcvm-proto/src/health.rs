//! Container health checks (`fcvm podman run --health-check URL`): the check the host puts in
//! the plan, the URL form both sides agree on, the states the agent reports (the status
//! message [`crate::status::Status::Health`]) and the state machine that turns check results
//! into states.
//!
//! The agent runs the check inside the guest: an HTTP/1.0 GET of the URL in the VM's network
//! namespace, which the container shares (`podman run --network=host` in the guest). A 2xx
//! or 3xx answer within the timeout passes; anything else (refused, timed out, 4xx, 5xx, not
//! HTTP) fails. As with podman: the state is `starting` until the first pass, `healthy`
//! after a pass, and `unhealthy` after `retries` failures in a row.

use std::fmt;
use std::time::Duration;

/// Default time between checks (podman's is 30 s; a warm-start snapshot wants the first
/// pass seen soon, and a GET of a local port is cheap).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Default time one check may take (connect, send, first line of the answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default failures in a row that make a container unhealthy (podman's default too).
pub const DEFAULT_RETRIES: u32 = 3;
/// Largest interval or timeout accepted (a day: anything longer is a typo).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// The check, as the plan carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// The URL, checked with [`HttpTarget::parse`].
    pub url: String,
    /// Milliseconds between the start of one check and the next.
    pub interval_ms: u64,
    /// Milliseconds one check may take.
    pub timeout_ms: u64,
    /// Failures in a row that make the container unhealthy (at least 1).
    pub retries: u32,
}

impl HealthCheck {
    /// A check of `url` with the default interval, timeout and retries.
    pub fn new(url: &str) -> Result<HealthCheck, HealthCheckError> {
        HttpTarget::parse(url)?;
        Ok(HealthCheck {
            url: url.to_owned(),
            interval_ms: DEFAULT_INTERVAL.as_millis() as u64,
            timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64,
            retries: DEFAULT_RETRIES,
        })
    }

    /// Checks every field (the agent refuses a plan whose check does not pass this).
    pub fn validate(&self) -> Result<HttpTarget, HealthCheckError> {
        let target = HttpTarget::parse(&self.url)?;
        for (flag, ms) in [
            ("--health-interval", self.interval_ms),
            ("--health-timeout", self.timeout_ms),
        ] {
            check_duration(flag, Duration::from_millis(ms))?;
        }
        if self.retries == 0 {
            return Err(HealthCheckError::ZeroRetries);
        }
        Ok(target)
    }

    /// Time between checks.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// Time one check may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Refuses a zero or oversized duration given with `flag`.
pub fn check_duration(flag: &'static str, d: Duration) -> Result<Duration, HealthCheckError> {
    if d.is_zero() {
        return Err(HealthCheckError::ZeroDuration(flag));
    }
    if d > MAX_DURATION {
        return Err(HealthCheckError::TooLong(flag));
    }
    Ok(d)
}

/// A refused health check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthCheckError {
    /// Not `scheme://...`.
    #[error("--health-check {0:?} is not a URL (expected http://HOST[:PORT][/PATH], e.g. http://127.0.0.1:80/)")]
    NotUrl(String),
    /// Another scheme than `http`.
    #[error("--health-check {url:?}: scheme {scheme:?} is not supported; only http:// (the check runs inside the guest, without TLS)")]
    Scheme {
        /// The URL.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// No host, or one with characters no host name has.
    #[error("--health-check {0:?} has no valid host")]
    BadHost(String),
    /// A port that is not 1-65535.
    #[error("--health-check {0:?} has an invalid port (1-65535)")]
    BadPort(String),
    /// `user@host`, a fragment, spaces or control characters.
    #[error("--health-check {0:?}: user info, fragments, spaces and control characters are not supported")]
    Unsupported(String),
    /// A zero interval or timeout.
    #[error("{0} must be more than zero")]
    ZeroDuration(&'static str),
    /// An interval or timeout over [`MAX_DURATION`].
    #[error("{0} must be at most 24h")]
    TooLong(&'static str),
    /// `--health-retries 0`.
    #[error("--health-retries must be at least 1")]
    ZeroRetries,
}

/// Where an `http://` URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// Host name or address as written (IPv6 without its brackets).
    pub host: String,
    /// Port (80 when the URL has none).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HttpTarget {
    /// Parses `http://HOST[:PORT][/PATH][?QUERY]`.
    pub fn parse(url: &str) -> Result<HttpTarget, HealthCheckError> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(HealthCheckError::NotUrl(url.to_owned()));
        };
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return Err(HealthCheckError::NotUrl(url.to_owned()));
        }
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(HealthCheckError::Scheme {
                url: url.to_owned(),
                scheme: scheme.to_owned(),
            });
        }
        if url.contains('#') || url.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(HealthCheckError::Unsupported(url.to_owned()));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(HealthCheckError::Unsupported(url.to_owned()));
        }
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((host, after)) = v6.split_once(']') else {
                return Err(HealthCheckError::BadHost(url.to_owned()));
            };
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(HealthCheckError::BadHost(url.to_owned()));
            }
            match after {
                "" => (host, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(HealthCheckError::BadHost(url.to_owned())),
                },
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let host_ok = !host.is_empty()
            && (authority.starts_with('[')
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
        if !host_ok {
            return Err(HealthCheckError::BadHost(url.to_owned()));
        }
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(HealthCheckError::BadPort(url.to_owned())),
            },
        };
        Ok(HttpTarget {
            host: host.to_owned(),
            port,
            path,
        })
    }
}

/// What the health check says about a container (`fcvm ls`'s HEALTH column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// No check passed yet and fewer than `retries` failed in a row.
    Starting,
    /// The last check passed (or fewer than `retries` failed since).
    Healthy,
    /// `retries` checks failed in a row.
    Unhealthy,
}

impl HealthState {
    /// Its byte on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            HealthState::Starting => 1,
            HealthState::Healthy => 2,
            HealthState::Unhealthy => 3,
        }
    }

    /// The state of a wire byte.
    pub fn from_byte(b: u8) -> Option<HealthState> {
        match b {
            1 => Some(HealthState::Starting),
            2 => Some(HealthState::Healthy),
            3 => Some(HealthState::Unhealthy),
            _ => None,
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthState::Starting => "starting",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        })
    }
}

/// Check results in, states out.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    state: HealthState,
    failures: u32,
    retries: u32,
    passed_once: bool,
}

impl HealthTracker {
    /// A container just started: `starting`.
    pub fn new(retries: u32) -> HealthTracker {
        HealthTracker {
            state: HealthState::Starting,
            failures: 0,
            retries: retries.max(1),
            passed_once: false,
        }
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        self.state
    }

    /// Whether any check passed yet.
    pub fn passed_once(&self) -> bool {
        self.passed_once
    }

    /// Records one check's result; returns the new state when it changed.
    pub fn observe(&mut self, passed: bool) -> Option<HealthState> {
        let next = if passed {
            self.failures = 0;
            self.passed_once = true;
            HealthState::Healthy
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.retries {
                HealthState::Unhealthy
            } else {
                self.state
            }
        };
        (next != self.state).then(|| {
            self.state = next;
            next
        })
    }
}

/// Whether an HTTP status code passes (2xx and 3xx, as most orchestrators count it).
pub fn passes(code: u16) -> bool {
    (200..400).contains(&code)
}

/// The status code of an HTTP response's first line (`HTTP/1.x NNN reason`).
pub fn status_code(first_line: &str) -> Option<u16> {
    let mut parts = first_line.split_ascii_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(host: &str, port: u16, path: &str) -> HttpTarget {
        HttpTarget {
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn parses_http_urls() {
        let p = |u| HttpTarget::parse(u).unwrap();
        assert_eq!(p("http://127.0.0.1:80/"), t("127.0.0.1", 80, "/"));
        assert_eq!(
            p("http://localhost:8080/health"),
            t("localhost", 8080, "/health")
        );
        assert_eq!(p("http://localhost"), t("localhost", 80, "/"));
        assert_eq!(
            p("HTTP://web.local:9/a/b?x=1&y"),
            t("web.local", 9, "/a/b?x=1&y")
        );
        assert_eq!(p("http://h?q"), t("h", 80, "/?q"));
        assert_eq!(p("http://[::1]:81/x"), t("::1", 81, "/x"));
        assert_eq!(p("http://[::1]"), t("::1", 80, "/"));
    }

    #[test]
    fn refuses_bad_urls_with_the_reason() {
        use HealthCheckError::*;
        let e = |u| HttpTarget::parse(u).unwrap_err();
        assert!(matches!(e("127.0.0.1:80"), NotUrl(_)));
        assert!(matches!(e("not a url"), NotUrl(_)));
        assert!(matches!(e("://x"), NotUrl(_)));
        assert!(matches!(e("https://x/"), Scheme { scheme, .. } if scheme == "https"));
        assert!(matches!(e("tcp://x:1"), Scheme { .. }));
        assert!(matches!(e("file:///etc/passwd"), Scheme { .. }));
        assert!(matches!(e("http:///path"), BadHost(_)));
        assert!(matches!(e("http://:80/"), BadHost(_)));
        assert!(matches!(e("http://a$b/"), BadHost(_)));
        assert!(matches!(e("http://[::1/"), BadHost(_)));
        assert!(matches!(e("http://[nothex]/"), BadHost(_)));
        assert!(matches!(e("http://h:0/"), BadPort(_)));
        assert!(matches!(e("http://h:65536/"), BadPort(_)));
        assert!(matches!(e("http://h:+80/"), BadPort(_)));
        assert!(matches!(e("http://h:/"), BadPort(_)));
        assert!(matches!(e("http://h:x/"), BadPort(_)));
        assert!(matches!(e("http://u:p@h/"), Unsupported(_)));
        assert!(matches!(e("http://h/a b"), Unsupported(_)));
        assert!(matches!(e("http://h/#frag"), Unsupported(_)));
        assert!(matches!(e("http://h/\r\nX: y"), Unsupported(_)));
        // Every message names the URL or the flag.
        assert!(e("https://x/").to_string().contains("only http://"));
    }

    #[test]
    fn validates_durations_and_retries() {
        let mut c = HealthCheck::new("http://127.0.0.1/").unwrap();
        assert_eq!(c.interval(), DEFAULT_INTERVAL);
        assert!(c.validate().is_ok());
        c.interval_ms = 0;
        assert_eq!(
            c.validate().unwrap_err(),
            HealthCheckError::ZeroDuration("--health-interval")
        );
        c.interval_ms = 1;
        c.timeout_ms = MAX_DURATION.as_millis() as u64 + 1;
        assert_eq!(
            c.validate().unwrap_err(),
            HealthCheckError::TooLong("--health-timeout")
        );
        c.timeout_ms = 1;
        c.retries = 0;
        assert_eq!(c.validate().unwrap_err(), HealthCheckError::ZeroRetries);
    }

    #[test]
    fn the_state_machine_follows_podman() {
        use HealthState::*;
        let mut h = HealthTracker::new(3);
        assert_eq!(h.state(), Starting);
        // Failures before the first pass: still starting until `retries` in a row.
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert!(!h.passed_once());
        assert_eq!(h.observe(true), Some(Healthy));
        assert!(h.passed_once());
        assert_eq!(h.observe(true), None);
        // Two failures are tolerated, the third makes it unhealthy; one pass heals it.
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(Unhealthy));
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), Some(Healthy));
        // Never passing: unhealthy after `retries`.
        let mut h = HealthTracker::new(1);
        assert_eq!(h.observe(false), Some(Unhealthy));
        // Zero retries count as one.
        let mut h = HealthTracker::new(0);
        assert_eq!(h.observe(false), Some(Unhealthy));
    }

    #[test]
    fn status_codes_and_what_passes() {
        assert_eq!(status_code("HTTP/1.0 200 OK"), Some(200));
        assert_eq!(status_code("HTTP/1.1 302 Found\r"), Some(302));
        assert_eq!(status_code("HTTP/1.1 404"), Some(404));
        assert_eq!(status_code("SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code("HTTP/1.1 2000 x"), None);
        assert_eq!(status_code(""), None);
        assert!(passes(200) && passes(204) && passes(301) && passes(399));
        assert!(!passes(199) && !passes(400) && !passes(404) && !passes(500));
    }

    #[test]
    fn states_roundtrip_as_bytes_and_words() {
        for s in [
            HealthState::Starting,
            HealthState::Healthy,
            HealthState::Unhealthy,
        ] {
            assert_eq!(HealthState::from_byte(s.to_byte()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.to_string())
            );
        }
        assert_eq!(HealthState::from_byte(0), None);
        assert_eq!(HealthState::from_byte(4), None);
    }
}
