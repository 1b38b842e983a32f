//! HTTP/1.1 over Firecracker's API Unix socket.
//!
//! One connection per request: Unix-socket connects cost microseconds, and a fresh
//! connection means a request can never be confused by a half-read earlier response
//! after a timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::models::Fault;

/// Failure of one API request.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The socket could not be reached.
    #[error("cannot connect to the Firecracker API socket {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// HTTP-level failure.
    #[error("HTTP exchange with {path} failed during {method} {uri}")]
    Http {
        /// Socket path.
        path: PathBuf,
        /// Request method.
        method: Method,
        /// Request URI.
        uri: String,
        /// Cause.
        source: hyper::Error,
    },
    /// No answer within the deadline.
    #[error("{method} {uri} got no answer within {timeout:?} (is Firecracker hung?)")]
    Timeout {
        /// Request method.
        method: Method,
        /// Request URI.
        uri: String,
        /// The deadline.
        timeout: Duration,
    },
    /// Firecracker refused the request.
    #[error("{method} {uri} was refused by Firecracker ({status}): {message}")]
    Refused {
        /// Request method.
        method: Method,
        /// Request URI.
        uri: String,
        /// HTTP status.
        status: StatusCode,
        /// Firecracker's `fault_message`, or the raw body.
        message: String,
    },
    /// A body could not be encoded or decoded.
    #[error("bad JSON in {method} {uri}")]
    Json {
        /// Request method.
        method: Method,
        /// Request URI.
        uri: String,
        /// Cause.
        source: serde_json::Error,
    },
}

/// A raw API endpoint: sends JSON, returns the status and body of successful answers.
#[derive(Debug, Clone)]
pub struct Transport {
    socket: PathBuf,
}

impl Transport {
    /// Transport to the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Send one request and return the body of a 2xx answer.
    pub async fn request(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        match tokio::time::timeout(timeout, self.exchange(method.clone(), uri, body)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout {
                method,
                uri: uri.to_owned(),
                timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        uri: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, TransportError> {
        let http_err = |source| TransportError::Http {
            path: self.socket.clone(),
            method: method.clone(),
            uri: uri.to_owned(),
            source,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| TransportError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        // The connection future must be polled for the request to progress; it ends when
        // the response is read and the sender dropped.
        let driver = tokio::spawn(conn);

        let mut builder = Request::builder()
            .method(method.clone())
            .uri(uri)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("method, URI and headers are valid by construction");
        let response = sender.send_request(request).await.map_err(http_err)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http_err)?
            .to_bytes();
        drop(sender);
        driver.abort();

        if status.is_success() {
            return Ok(bytes);
        }
        let message = serde_json::from_slice::<Fault>(&bytes)
            .map(|f| f.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_owned());
        Err(TransportError::Refused {
            method,
            uri: uri.to_owned(),
            status,
            message,
        })
    }
}
