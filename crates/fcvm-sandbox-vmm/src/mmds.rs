//! MMDS: the data store the host fills through the API and the guest-facing HTTP service.
//!
//! Guest side semantics follow Firecracker: with V2, `PUT /latest/api/token` (header
//! `X-metadata-token-ttl-seconds`, 1..=21600) returns a token that `GET` requests must present
//! in `X-metadata-token`; V1 needs no token. `GET /a/b` returns the JSON at that path: as JSON
//! with `Accept: application/json`, otherwise strings as plain text and objects as a list of keys.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;

/// Largest token lifetime Firecracker accepts.
const MAX_TTL: u64 = 21600;

/// The store plus issued tokens.
#[derive(Debug)]
pub struct Mmds {
    data: Mutex<Value>,
    version_v2: Mutex<bool>,
    tokens: Mutex<HashMap<String, Instant>>,
}

impl Default for Mmds {
    fn default() -> Self {
        Self {
            data: Mutex::new(Value::Object(Default::default())),
            version_v2: Mutex::new(false),
            tokens: Mutex::default(),
        }
    }
}

/// RFC 7396 JSON merge patch, as `PATCH /mmds` applies it.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mmds {
    /// `PUT /mmds`.
    pub fn put(&self, v: Value) {
        *lock(&self.data) = v;
    }

    /// `PATCH /mmds`.
    pub fn patch(&self, v: &Value) {
        merge_patch(&mut lock(&self.data), v);
    }

    /// `GET /mmds`.
    pub fn get(&self) -> Value {
        lock(&self.data).clone()
    }

    /// Sets the version from `PUT /mmds/config`.
    pub fn set_v2(&self, v2: bool) {
        *lock(&self.version_v2) = v2;
    }

    fn new_token(&self, ttl: u64) -> String {
        let mut raw = [0u8; 24];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            let _ = f.read_exact(&mut raw);
        }
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut t = lock(&self.tokens);
        let now = Instant::now();
        t.retain(|_, exp| *exp > now);
        t.insert(token.clone(), now + Duration::from_secs(ttl));
        token
    }

    fn token_valid(&self, token: &str) -> bool {
        lock(&self.tokens)
            .get(token)
            .is_some_and(|exp| *exp > Instant::now())
    }

    /// Serves one guest request.
    pub fn serve_guest(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let header = |n: &str| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let path = req.uri().path().to_owned();
        if req.method() == Method::PUT && path == "/latest/api/token" {
            let ttl = header("x-metadata-token-ttl-seconds").and_then(|t| t.parse::<u64>().ok());
            return match ttl {
                Some(ttl) if (1..=MAX_TTL).contains(&ttl) => {
                    text(StatusCode::OK, self.new_token(ttl))
                }
                _ => text(
                    StatusCode::BAD_REQUEST,
                    "Token time to live value not found or invalid.".into(),
                ),
            };
        }
        if req.method() != Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "Not allowed HTTP method.".into(),
            );
        }
        let v2 = *lock(&self.version_v2);
        match header("x-metadata-token") {
            Some(t) if !self.token_valid(&t) => {
                return text(
                    StatusCode::UNAUTHORIZED,
                    "Token is expired or invalid.".into(),
                )
            }
            None if v2 => {
                return text(
                    StatusCode::UNAUTHORIZED,
                    "No MMDS token provided. Use `X-metadata-token` header.".into(),
                )
            }
            _ => {}
        }
        let data = lock(&self.data);
        let mut node = &*data;
        for seg in path.split('/').filter(|s| !s.is_empty()) {
            match node.get(seg) {
                Some(n) => node = n,
                None => {
                    return text(
                        StatusCode::NOT_FOUND,
                        format!("Resource not found: {path}."),
                    )
                }
            }
        }
        let json = header("accept").is_some_and(|a| a.contains("application/json"));
        let body = match (json, node) {
            (true, v) => v.to_string(),
            (false, Value::String(s)) => s.clone(),
            (false, Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/")
                    } else {
                        k.clone()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n"),
            (false, v) => v.to_string(),
        };
        let mut r = text(StatusCode::OK, body);
        if json {
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/json"),
            );
        }
        r
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Serves the guest side on `listener` (inside the sandbox's network namespace).
pub async fn serve(mmds: Arc<Mmds>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let mmds = mmds.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let r = mmds.serve_guest(&req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7396() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "d": 3});
        merge_patch(&mut v, &json!({"a": {"b": null, "e": 4}, "d": [1]}));
        assert_eq!(v, json!({"a": {"c": 2, "e": 4}, "d": [1]}));
    }
}
