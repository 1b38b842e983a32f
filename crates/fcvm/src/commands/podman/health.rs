//! `--health-check URL [--health-interval D] [--health-timeout D] [--health-retries N]`:
//! checked on the host before anything starts, run by the agent in the guest (see
//! [`fcvm_proto::health`]).
//!
//! Defaults: every 2 s, 2 s per check, unhealthy after 3 failures in a row (podman's are
//! 30 s, 30 s and 3: a GET of a port inside the VM is cheap, and the startup tier of the
//! image cache is taken at the first pass, so it should be seen soon).
//!
//! Without `--health-check` the container is healthy once it has started (the agent's
//! ready signal). An image's own `HEALTHCHECK` is not run: podman in the guest would need
//! systemd timers for it (`podman healthcheck run` on a schedule), which the guest lacks.

use std::time::Duration;

use fcvm_proto::health::{check_duration, HealthCheck, HealthCheckError};

/// The flags as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthRequest {
    /// `--health-check`.
    pub url: String,
    /// `--health-interval`.
    pub interval: String,
    /// `--health-timeout`.
    pub timeout: String,
    /// `--health-retries`.
    pub retries: u32,
}

/// A refused health check flag.
#[derive(Debug, thiserror::Error)]
pub enum HealthArgsError {
    /// A bad URL, a zero duration or zero retries.
    #[error(transparent)]
    Check(#[from] HealthCheckError),
    /// A duration that does not parse.
    #[error(
        "{flag} {value:?} is not a duration (e.g. 500ms, 2s, 1m; a bare number is seconds): {why}"
    )]
    Duration {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
        /// The parser's complaint.
        why: String,
    },
}

/// The check the plan carries.
pub fn parse(req: &HealthRequest) -> Result<HealthCheck, HealthArgsError> {
    let mut check = HealthCheck::new(&req.url)?;
    check.interval_ms = millis(duration("--health-interval", &req.interval)?);
    check.timeout_ms = millis(duration("--health-timeout", &req.timeout)?);
    check.retries = req.retries;
    check.validate()?;
    Ok(check)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `value` as a duration: humantime's forms, or a bare number of seconds; more than zero.
pub fn duration(flag: &'static str, value: &str) -> Result<Duration, HealthArgsError> {
    let v = value.trim();
    let bad = |why: String| HealthArgsError::Duration {
        flag,
        value: value.to_owned(),
        why,
    };
    let d = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(
            v.parse()
                .map_err(|e: std::num::ParseIntError| bad(e.to_string()))?,
        )
    } else if v.starts_with('-') {
        return Err(bad("it is negative".into()));
    } else {
        humantime::parse_duration(v).map_err(|e| bad(e.to_string()))?
    };
    Ok(check_duration(flag, d)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(url: &str, interval: &str, timeout: &str, retries: u32) -> HealthRequest {
        HealthRequest {
            url: url.into(),
            interval: interval.into(),
            timeout: timeout.into(),
            retries,
        }
    }

    #[test]
    fn parses_flags_into_the_plan_s_check() {
        let c = parse(&req("http://127.0.0.1:8080/health", "500ms", "3", 5)).unwrap();
        assert_eq!(
            (c.url.as_str(), c.interval_ms, c.timeout_ms, c.retries),
            ("http://127.0.0.1:8080/health", 500, 3000, 5)
        );
        let c = parse(&req("http://localhost/", "1m 30s", "2s", 1)).unwrap();
        assert_eq!(c.interval_ms, 90_000);
    }

    #[test]
    fn refuses_bad_flags_naming_them() {
        let e = |r: HealthRequest| parse(&r).unwrap_err().to_string();
        assert!(e(req("https://x/", "2s", "2s", 3)).contains("only http://"));
        assert!(e(req("localhost:80", "2s", "2s", 3)).contains("is not a URL"));
        assert!(
            e(req("http://x/", "0s", "2s", 3)).contains("--health-interval must be more than zero")
        );
        assert!(
            e(req("http://x/", "0", "2s", 3)).contains("--health-interval must be more than zero")
        );
        assert!(e(req("http://x/", "2s", "-1s", 3))
            .contains("--health-timeout \"-1s\" is not a duration"));
        assert!(e(req("http://x/", "2s", "-5", 3)).contains("negative"));
        assert!(e(req("http://x/", "soon", "2s", 3))
            .contains("--health-interval \"soon\" is not a duration"));
        assert!(e(req("http://x/", "2s", "2s", 0)).contains("--health-retries must be at least 1"));
        assert!(e(req("http://x/", "48h", "2s", 1)).contains("at most 24h"));
    }
}
