//! Typed, versioned messages on the status port ([`crate::vsock::STATUS_PORT`]).
//!
//! The agent connects to the host's status listener once per boot, and again after every
//! snapshot restore (a restore resets all vsock connections). Messages go both ways on that
//! connection, each one a frame with the same 6-byte header as [`crate::frame`]:
//!
//! ```text
//!  0         1         2                   6
//!  +---------+---------+-------------------+----------------------+
//!  | version |  type   | payload length    | payload ...          |
//!  |  (= 1)  |  (u8)   | (u32 little end.) | (length bytes)       |
//!  +---------+---------+-------------------+----------------------+
//! ```
//!
//! | type | name       | payload | direction |
//! |------|------------|---------|-----------|
//! | 1    | Ready      | empty | guest → host: the container is running and the exec server accepts connections |
//! | 2    | Exit       | i32 LE: exit code (0-255; 128+N when killed by signal N) | guest → host: all output has been flushed and the output connection closed |
//! | 3    | Error      | UTF-8 text | guest → host: the agent could not run the container (bad plan, image load failed, ...); an Exit follows |
//! | 4    | ImageReady | UTF-8 image id (`sha256:...`) | guest → host: the image is loaded and the agent waits for [`Status::Proceed`] (only when the plan asks for it, see [`crate::plan::Plan::await_proceed`]); sent again after every reconnect |
//! | 5    | Proceed    | JSON [`Plan`]: the run's own settings | host → guest: start the container with this plan (after a restore it differs from the snapshotted one: name, hostname, env, command, terminal). It carries the host's wall-clock time and fresh random bytes ([`Plan::host_time_ns`], [`Plan::entropy`]): the agent sets the guest's clock and reseeds its kernel's CRNG before the container starts |
//! | 6    | PullProgress | UTF-8 text: one line of `podman pull`'s progress output, as podman wrote it | guest → host: the agent is pulling the plan's image; the host shows the lines on a terminal (nothing in a pipe) |
//! | 7    | Reconnected | empty | guest → host: the agent's channels were reset (a snapshot was taken of this VM, or it was restored from one) and it connected them again (status first, then output and input); it waits for [`Status::Resync`], applies it, then reports Ready again if the container runs |
//! | 8    | Resync     | JSON [`Resync`] | host → guest: the host's wall clock and fresh random bytes, the answer to Reconnected |
//! | 9    | Health     | 1 byte: [`HealthState::to_byte`] | guest → host: the container's health check changed state (only with [`Plan::health_check`]); sent again after a restore reconnect |
//!
//! Type 0 is reserved as invalid. Versioning policy as for [`crate::frame`]: an incompatible
//! header change takes a new version number; new types may be added within a version, and a
//! receiver that reads an unknown type skips that frame (its length is known) so the agent
//! can add messages without breaking an older host. A bad version, an oversized length or a
//! malformed payload of a known type is an error: the stream is out of sync and is closed.

use std::io::{self, Read, Write};

use crate::health::HealthState;
use crate::plan::Plan;

/// Protocol version written in every status header.
pub const VERSION: u8 = 1;
/// Header size in bytes.
pub const HEADER_LEN: usize = 6;
/// Largest payload accepted (a plan with a long command and environment fits easily).
pub const MAX_STATUS_PAYLOAD: usize = 256 * 1024;

const T_READY: u8 = 1;
const T_EXIT: u8 = 2;
const T_ERROR: u8 = 3;
const T_IMAGE_READY: u8 = 4;
const T_PROCEED: u8 = 5;
const T_PULL_PROGRESS: u8 = 6;
const T_RECONNECTED: u8 = 7;
const T_RESYNC: u8 = 8;
const T_HEALTH: u8 = 9;

/// What a VM that was snapshotted or restored gets renewed (see [`crate::plan::Plan::host_time_ns`]
/// and [`crate::plan::Plan::entropy`], which mean the same there).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resync {
    /// The host's `CLOCK_REALTIME` in nanoseconds, stamped just before the send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_time_ns: Option<u64>,
    /// Fresh random bytes for the guest kernel's pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<crate::plan::Entropy>,
}

/// One status message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// The container runs and exec requests are served.
    Ready,
    /// The container exited with this code.
    Exit(i32),
    /// The agent failed; the text says why.
    Error(String),
    /// The image is loaded (its id, e.g. `sha256:...`); the agent waits for `Proceed`.
    ImageReady {
        /// The image id podman reports.
        digest: String,
    },
    /// Host to guest: go on and start the container with this plan.
    Proceed(Box<Plan>),
    /// One line of `podman pull`'s progress (`Copying blob sha256:...`), relayed as podman
    /// wrote it: the host shows it, it never decides anything.
    PullProgress(String),
    /// Guest to host: the channels were reset and are connected again; send Resync.
    Reconnected,
    /// Host to guest: the clock and entropy after a snapshot or restore.
    Resync(Resync),
    /// The container's health check changed state.
    Health(HealthState),
}

/// Errors decoding or transporting status messages.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The header's version byte is not [`VERSION`].
    #[error("Unsupported status message version {0} (this side speaks {VERSION}); are host and agent from the same build?")]
    UnsupportedVersion(u8),
    /// Type 0.
    #[error("Status message type 0 is invalid")]
    InvalidType,
    /// The declared payload is larger than [`MAX_STATUS_PAYLOAD`].
    #[error("Status message payload of {0} bytes exceeds the limit of {MAX_STATUS_PAYLOAD} bytes")]
    TooLarge(usize),
    /// A fixed-size payload has the wrong length.
    #[error("{kind} status message must carry {expected} bytes, got {len}")]
    BadLength {
        /// Message name.
        kind: &'static str,
        /// Required length.
        expected: usize,
        /// Actual length.
        len: usize,
    },
    /// A text payload is not UTF-8.
    #[error("{0} status message text is not valid UTF-8")]
    BadUtf8(&'static str),
    /// A Proceed payload is not a valid plan.
    #[error("Proceed status message does not carry a valid plan: {0}")]
    BadPlan(String),
    /// A Resync payload is malformed.
    #[error("Resync status message is malformed: {0}")]
    BadResync(String),
    /// A Health payload is not a known state.
    #[error("Health status message carries unknown state {0}")]
    BadHealth(u8),
    /// The stream ended inside a message.
    #[error("Status stream ended in the middle of a message")]
    Truncated,
    /// Reading or writing the underlying stream failed.
    #[error("Status message I/O failed")]
    Io(#[from] io::Error),
}

/// A decoded header: the type and the payload length.
fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u8, usize), StatusError> {
    if h[0] != VERSION {
        return Err(StatusError::UnsupportedVersion(h[0]));
    }
    if h[1] == 0 {
        return Err(StatusError::InvalidType);
    }
    let len = u32::from_le_bytes([h[2], h[3], h[4], h[5]]) as usize;
    if len > MAX_STATUS_PAYLOAD {
        return Err(StatusError::TooLarge(len));
    }
    let fixed = match h[1] {
        T_READY => Some(("Ready", 0)),
        T_EXIT => Some(("Exit", 4)),
        T_RECONNECTED => Some(("Reconnected", 0)),
        T_HEALTH => Some(("Health", 1)),
        _ => None,
    };
    if let Some((kind, expected)) = fixed {
        if len != expected {
            return Err(StatusError::BadLength {
                kind,
                expected,
                len,
            });
        }
    }
    Ok((h[1], len))
}

/// The message of a known type; `Ok(None)` for a type this side does not know (skipped).
fn build(kind: u8, p: Vec<u8>) -> Result<Option<Status>, StatusError> {
    let text = |name: &'static str, p: Vec<u8>| {
        String::from_utf8(p).map_err(|_| StatusError::BadUtf8(name))
    };
    Ok(Some(match kind {
        T_READY => Status::Ready,
        T_EXIT => Status::Exit(i32::from_le_bytes([p[0], p[1], p[2], p[3]])),
        T_ERROR => Status::Error(text("Error", p)?),
        T_PULL_PROGRESS => Status::PullProgress(text("PullProgress", p)?),
        T_IMAGE_READY => Status::ImageReady {
            digest: text("ImageReady", p)?,
        },
        T_PROCEED => {
            let plan: Plan =
                serde_json::from_slice(&p).map_err(|e| StatusError::BadPlan(e.to_string()))?;
            plan.validate()
                .map_err(|e| StatusError::BadPlan(e.to_string()))?;
            Status::Proceed(Box::new(plan))
        }
        T_RECONNECTED => Status::Reconnected,
        T_RESYNC => {
            let r: Resync =
                serde_json::from_slice(&p).map_err(|e| StatusError::BadResync(e.to_string()))?;
            if let Some(e) = &r.entropy {
                let n = e.bytes().len();
                if !(crate::plan::MIN_ENTROPY_BYTES..=crate::plan::MAX_ENTROPY_BYTES).contains(&n) {
                    return Err(StatusError::BadResync(format!("{n} bytes of entropy")));
                }
            }
            Status::Resync(r)
        }
        T_HEALTH => match HealthState::from_byte(p[0]) {
            Some(s) => Status::Health(s),
            None => return Err(StatusError::BadHealth(p[0])),
        },
        _ => return Ok(None),
    }))
}

impl Status {
    /// The encoded message. Texts longer than the limit are cut (on a character boundary).
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, Vec<u8>) = match self {
            Status::Ready => (T_READY, Vec::new()),
            Status::Exit(code) => (T_EXIT, code.to_le_bytes().to_vec()),
            Status::Error(t) => (T_ERROR, cut(t).into_bytes()),
            Status::PullProgress(t) => (T_PULL_PROGRESS, cut(t).into_bytes()),
            Status::ImageReady { digest } => (T_IMAGE_READY, cut(digest).into_bytes()),
            // A plan is strings, integers and maps: serialising cannot fail.
            Status::Proceed(plan) => (T_PROCEED, serde_json::to_vec(plan).unwrap_or_default()),
            Status::Reconnected => (T_RECONNECTED, Vec::new()),
            Status::Resync(r) => (T_RESYNC, serde_json::to_vec(r).unwrap_or_default()),
            Status::Health(h) => (T_HEALTH, vec![h.to_byte()]),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.push(VERSION);
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes one message from the start of `buf`: `Ok(None)` when `buf` does not hold a
    /// whole message yet, else the message (`None` for an unknown type) and the bytes used.
    #[allow(clippy::type_complexity)]
    pub fn decode(buf: &[u8]) -> Result<Option<(Option<Status>, usize)>, StatusError> {
        let Some(head) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(head);
        let (kind, len) = parse_header(&h)?;
        let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
            return Ok(None);
        };
        Ok(Some((build(kind, payload.to_vec())?, HEADER_LEN + len)))
    }
}

fn cut(text: &str) -> String {
    let mut t = text.to_owned();
    if t.len() > MAX_STATUS_PAYLOAD {
        let mut end = MAX_STATUS_PAYLOAD;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t.truncate(end);
    }
    t
}

/// Reads into `buf` until full; `Ok(false)` if the stream ended before the first byte.
fn fill<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<bool, StatusError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(StatusError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Reads the next message of a known type (unknown types are skipped); `Ok(None)` on a clean
/// end of stream between messages.
pub fn read_status<R: Read + ?Sized>(r: &mut R) -> Result<Option<Status>, StatusError> {
    loop {
        let mut h = [0u8; HEADER_LEN];
        if !fill(r, &mut h)? {
            return Ok(None);
        }
        let (kind, len) = parse_header(&h)?;
        let mut payload = vec![0u8; len];
        if len > 0 && !fill(r, &mut payload)? {
            return Err(StatusError::Truncated);
        }
        if let Some(s) = build(kind, payload)? {
            return Ok(Some(s));
        }
    }
}

/// Writes one message in a single `write_all`.
pub fn write_status<W: Write + ?Sized>(w: &mut W, s: &Status) -> Result<(), StatusError> {
    w.write_all(&s.encode())?;
    Ok(())
}

/// Async helpers over tokio streams (feature `tokio`).
#[cfg(feature = "tokio")]
pub mod tokio_io {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;

    /// Reads the next message of a known type; `Ok(None)` on a clean end of stream.
    pub async fn read_status<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
    ) -> Result<Option<Status>, StatusError> {
        loop {
            let mut h = [0u8; HEADER_LEN];
            let mut got = 0;
            while got < HEADER_LEN {
                match r.read(&mut h[got..]).await? {
                    0 if got == 0 => return Ok(None),
                    0 => return Err(StatusError::Truncated),
                    n => got += n,
                }
            }
            let (kind, len) = parse_header(&h)?;
            let mut payload = vec![0u8; len];
            r.read_exact(&mut payload)
                .await
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => StatusError::Truncated,
                    _ => StatusError::Io(e),
                })?;
            if let Some(s) = build(kind, payload)? {
                return Ok(Some(s));
            }
        }
    }

    /// Writes one message.
    pub async fn write_status<W: AsyncWrite + Unpin + ?Sized>(
        w: &mut W,
        s: &Status,
    ) -> Result<(), StatusError> {
        w.write_all(&s.encode()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::ImageSource;

    fn plan() -> Plan {
        let mut p = Plan::new(ImageSource::Archive {
            device: "/dev/vdb".into(),
            reference: String::new(),
        });
        p.cmd = Some(vec!["echo".into(), "hi\nthere".into()]);
        p.env.insert("A".into(), "b".into());
        p.hostname = Some("web".into());
        p
    }

    fn all() -> Vec<Status> {
        vec![
            Status::Ready,
            Status::Exit(0),
            Status::Exit(137),
            Status::Exit(-1),
            Status::Error("no image\nat all".into()),
            Status::Error(String::new()),
            Status::ImageReady {
                digest: "sha256:0123abcd".into(),
            },
            Status::Proceed(Box::new(plan())),
            Status::PullProgress("Copying blob sha256:0123".into()),
            Status::Reconnected,
            Status::Resync(Resync {
                host_time_ns: Some(1_764_000_000_000_000_001),
                entropy: Some(crate::plan::Entropy::new(vec![7; 64])),
            }),
            Status::Resync(Resync {
                host_time_ns: None,
                entropy: None,
            }),
            Status::Health(HealthState::Starting),
            Status::Health(HealthState::Healthy),
            Status::Health(HealthState::Unhealthy),
        ]
    }

    fn raw(kind: u8, p: &[u8]) -> Vec<u8> {
        let mut v = vec![VERSION, kind];
        v.extend_from_slice(&(p.len() as u32).to_le_bytes());
        v.extend_from_slice(p);
        v
    }

    #[test]
    fn roundtrip_every_message_buffer_and_stream() {
        let mut stream = Vec::new();
        for s in all() {
            let enc = s.encode();
            assert_eq!(enc[0], VERSION);
            let (back, used) = Status::decode(&enc).unwrap().unwrap();
            assert_eq!(back, Some(s.clone()));
            assert_eq!(used, enc.len());
            for cut in 0..enc.len() {
                assert!(Status::decode(&enc[..cut]).unwrap().is_none(), "cut {cut}");
            }
            stream.extend_from_slice(&enc);
        }
        let mut r = io::Cursor::new(stream);
        let mut got = Vec::new();
        while let Some(s) = read_status(&mut r).unwrap() {
            got.push(s);
        }
        assert_eq!(got, all());
    }

    #[test]
    fn unknown_types_are_skipped_so_messages_can_be_added() {
        let mut stream = raw(200, b"future message");
        stream.extend_from_slice(&Status::Ready.encode());
        let mut r = io::Cursor::new(stream.clone());
        assert_eq!(read_status(&mut r).unwrap(), Some(Status::Ready));
        assert!(read_status(&mut r).unwrap().is_none());
        let (s, n) = Status::decode(&stream).unwrap().unwrap();
        assert_eq!((s, n), (None, HEADER_LEN + 14));
    }

    #[test]
    fn rejects_malformed_messages() {
        let mut bad_version = Status::Ready.encode();
        bad_version[0] = 2;
        assert!(matches!(
            Status::decode(&bad_version),
            Err(StatusError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            Status::decode(&raw(0, b"")),
            Err(StatusError::InvalidType)
        ));
        assert!(matches!(
            Status::decode(&raw(T_EXIT, &[1, 2, 3])),
            Err(StatusError::BadLength { kind: "Exit", .. })
        ));
        assert!(matches!(
            Status::decode(&raw(T_READY, b"x")),
            Err(StatusError::BadLength { kind: "Ready", .. })
        ));
        assert!(matches!(
            Status::decode(&raw(T_RECONNECTED, b"x")),
            Err(StatusError::BadLength {
                kind: "Reconnected",
                ..
            })
        ));
        // Resync: JSON, and entropy within the plan's bounds.
        assert!(matches!(
            Status::decode(&raw(T_RESYNC, b"not json")),
            Err(StatusError::BadResync(_))
        ));
        let few = format!(r#"{{"entropy":"{}"}}"#, "ab".repeat(4));
        assert!(matches!(
            Status::decode(&raw(T_RESYNC, few.as_bytes())),
            Err(StatusError::BadResync(_))
        ));
        assert!(matches!(
            Status::decode(&raw(T_RESYNC, br#"{"host_time_ns":-1}"#)),
            Err(StatusError::BadResync(_))
        ));
        // Debug never shows the bytes.
        let r = Status::Resync(Resync {
            host_time_ns: None,
            entropy: Some(crate::plan::Entropy::new(vec![0xab; 64])),
        });
        assert!(!format!("{r:?}").contains("ab, "), "{r:?}");
        assert!(matches!(
            Status::decode(&raw(T_ERROR, &[0xff, 0xfe])),
            Err(StatusError::BadUtf8("Error"))
        ));
        assert!(matches!(
            Status::decode(&raw(T_IMAGE_READY, &[0xc3])),
            Err(StatusError::BadUtf8("ImageReady"))
        ));
        assert!(matches!(
            Status::decode(&raw(T_HEALTH, &[9])),
            Err(StatusError::BadHealth(9))
        ));
        assert!(matches!(
            Status::decode(&raw(T_HEALTH, &[])),
            Err(StatusError::BadLength { kind: "Health", .. })
        ));
        assert!(matches!(
            Status::decode(&raw(T_PROCEED, b"{not json")),
            Err(StatusError::BadPlan(_))
        ));
        // Parses, but is not a valid plan (empty command).
        let mut p = plan();
        p.cmd = Some(Vec::new());
        let json = serde_json::to_vec(&p).unwrap();
        assert!(matches!(
            Status::decode(&raw(T_PROCEED, &json)),
            Err(StatusError::BadPlan(_))
        ));
        // An oversized length is refused from the header alone.
        let mut h = vec![VERSION, T_ERROR];
        h.extend_from_slice(&((MAX_STATUS_PAYLOAD + 1) as u32).to_le_bytes());
        assert!(matches!(Status::decode(&h), Err(StatusError::TooLarge(_))));
        assert!(matches!(
            read_status(&mut io::Cursor::new(h)),
            Err(StatusError::TooLarge(_))
        ));
    }

    #[test]
    fn truncation_is_an_error_but_a_clean_end_is_not() {
        assert!(read_status(&mut io::Cursor::new(Vec::new()))
            .unwrap()
            .is_none());
        let enc = Status::Error("abc".into()).encode();
        for cut in 1..enc.len() {
            let r = read_status(&mut io::Cursor::new(enc[..cut].to_vec()));
            assert!(matches!(r, Err(StatusError::Truncated)), "cut {cut}: {r:?}");
        }
    }

    #[test]
    fn long_texts_are_cut_to_the_limit_on_a_char_boundary() {
        let long = "é".repeat(MAX_STATUS_PAYLOAD);
        let enc = Status::Error(long).encode();
        let (s, _) = Status::decode(&enc).unwrap().unwrap();
        let Some(Status::Error(t)) = s else {
            panic!("{s:?}")
        };
        assert!(t.len() <= MAX_STATUS_PAYLOAD && t.len() > MAX_STATUS_PAYLOAD - 2);
    }
}
