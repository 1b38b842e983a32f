//! The host <-> guest control protocol, carried over one virtio-serial port (`fcvm.ctl`).
//!
//! One byte stream in each direction, made of frames:
//!
//! ```text
//!  +--------+---------------------+------------------+
//!  | kind   | payload length      | payload ...      |
//!  | (u8)   | (u32 little endian) | (length bytes)   |
//!  +--------+---------------------+------------------+
//! ```
//!
//! The kind doubles as the stream id (stdin, stdout, stderr) so that stdout and stderr stay
//! separate end to end. A receiver rejects an unknown kind, a payload over [`MAX_PAYLOAD`] and a
//! fixed-size payload of the wrong size: the stream is then out of sync and the run fails
//! (exit 125) rather than guessing.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Header size: kind + length.
pub const HEADER_LEN: usize = 5;
/// Largest payload accepted. Data frames are written in chunks well under this.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Chunk size for stdio data frames.
pub const CHUNK: usize = 32 * 1024;

/// Bumped on any change of frames or of [`Start`]. The guest runner is the binary found at the
/// host binary's path when L1 boots: if it was rebuilt in between, the two may differ.
pub const PROTOCOL_VERSION: u32 = 1;

/// What the guest runner needs to start the command. Sent once, first, by the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// [`PROTOCOL_VERSION`] of the host.
    pub version: u32,
    /// argv, argv[0] looked up in the `PATH` of `env`.
    pub argv: Vec<String>,
    /// The complete environment of the command.
    pub env: Vec<(String, String)>,
    /// Working directory (falls back to `/` with a warning when it does not exist inside).
    pub cwd: String,
    /// Run the command on a pty (the caller's stdin is a terminal).
    pub tty: bool,
    /// Initial window size (rows, cols) when `tty`.
    pub winsize: Option<(u16, u16)>,
    /// Extra 9p exports to mount.
    pub shares: Vec<ShareMount>,
    /// Where to mount the scratch disk (`/dev/vda`), if any.
    pub scratch: Option<String>,
    /// Print progress on the console (`-v`).
    pub verbose: bool,
}

/// A 9p export the guest mounts at the same path the host has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareMount {
    /// The QEMU `mount_tag`.
    pub tag: String,
    /// Absolute path, the same inside and outside.
    pub path: String,
    /// Writable (writes land on the host).
    pub rw: bool,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// host -> guest, first frame: JSON [`Start`].
    Start(Start),
    /// host -> guest: bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// host -> guest: the caller's stdin reached EOF.
    StdinEof,
    /// host -> guest: terminal size changed (rows, cols).
    Resize(u16, u16),
    /// host -> guest: deliver this signal to the command's process group.
    Signal(i32),
    /// host -> guest: the exit status arrived; the guest may power off now.
    Bye,
    /// guest -> host: the command was started (for the boot-to-command timing).
    Started,
    /// guest -> host: the command's stdout (the pty output with a tty).
    Stdout(Vec<u8>),
    /// guest -> host: the command's stderr (never sent with a tty).
    Stderr(Vec<u8>),
    /// guest -> host: a message for the caller's stderr from the runner itself.
    Message(String),
    /// guest -> host, last frame: exit status (128+N when killed by signal N).
    Exit(i32),
}

/// A frame that cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// Unknown frame kind: the peers disagree on the protocol, or the stream is out of sync.
    #[error("control protocol: unknown frame kind {0}")]
    UnknownKind(u8),
    /// Payload length over [`MAX_PAYLOAD`].
    #[error(
        "control protocol: frame kind {kind} has a payload of {len} bytes (limit {MAX_PAYLOAD})"
    )]
    TooLong {
        /// Frame kind.
        kind: u8,
        /// Announced length.
        len: usize,
    },
    /// A fixed-size or structured payload is malformed.
    #[error("control protocol: bad payload for frame kind {kind}: {why}")]
    BadPayload {
        /// Frame kind.
        kind: u8,
        /// What is wrong.
        why: String,
    },
    /// Reading or writing the port failed.
    #[error("control protocol: {0}")]
    Io(#[from] io::Error),
}

const K_START: u8 = 1;
const K_STDIN: u8 = 2;
const K_STDIN_EOF: u8 = 3;
const K_RESIZE: u8 = 4;
const K_SIGNAL: u8 = 5;
const K_BYE: u8 = 6;
const K_STARTED: u8 = 16;
const K_STDOUT: u8 = 17;
const K_STDERR: u8 = 18;
const K_MESSAGE: u8 = 19;
const K_EXIT: u8 = 20;

impl Frame {
    /// Serializes the frame (header + payload).
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, Vec<u8>) = match self {
            Frame::Start(s) => (
                K_START,
                serde_json::to_vec(s).expect("Start serializes to JSON"),
            ),
            Frame::Stdin(d) => (K_STDIN, d.clone()),
            Frame::StdinEof => (K_STDIN_EOF, Vec::new()),
            Frame::Resize(r, c) => {
                let mut p = r.to_le_bytes().to_vec();
                p.extend_from_slice(&c.to_le_bytes());
                (K_RESIZE, p)
            }
            Frame::Signal(s) => (K_SIGNAL, s.to_le_bytes().to_vec()),
            Frame::Bye => (K_BYE, Vec::new()),
            Frame::Started => (K_STARTED, Vec::new()),
            Frame::Stdout(d) => (K_STDOUT, d.clone()),
            Frame::Stderr(d) => (K_STDERR, d.clone()),
            Frame::Message(m) => (K_MESSAGE, m.as_bytes().to_vec()),
            Frame::Exit(c) => (K_EXIT, c.to_le_bytes().to_vec()),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes one frame from its kind and payload.
    pub fn decode(kind: u8, payload: Vec<u8>) -> Result<Frame, ProtoError> {
        let bad = |why: &str| ProtoError::BadPayload {
            kind,
            why: why.to_string(),
        };
        let fixed = |p: &[u8], n: usize| -> Result<(), ProtoError> {
            if p.len() == n {
                Ok(())
            } else {
                Err(bad(&format!("{} bytes, expected {n}", p.len())))
            }
        };
        Ok(match kind {
            K_START => Frame::Start(
                serde_json::from_slice(&payload).map_err(|e| bad(&format!("JSON: {e}")))?,
            ),
            K_STDIN => Frame::Stdin(payload),
            K_STDIN_EOF => {
                fixed(&payload, 0)?;
                Frame::StdinEof
            }
            K_RESIZE => {
                fixed(&payload, 4)?;
                Frame::Resize(
                    u16::from_le_bytes([payload[0], payload[1]]),
                    u16::from_le_bytes([payload[2], payload[3]]),
                )
            }
            K_SIGNAL => {
                fixed(&payload, 4)?;
                let s = i32::from_le_bytes(payload[..4].try_into().expect("4 bytes"));
                if !(1..=64).contains(&s) {
                    return Err(bad(&format!("signal {s} out of range")));
                }
                Frame::Signal(s)
            }
            K_BYE => {
                fixed(&payload, 0)?;
                Frame::Bye
            }
            K_STARTED => {
                fixed(&payload, 0)?;
                Frame::Started
            }
            K_STDOUT => Frame::Stdout(payload),
            K_STDERR => Frame::Stderr(payload),
            K_MESSAGE => {
                Frame::Message(String::from_utf8(payload).map_err(|_| bad("message is not UTF-8"))?)
            }
            K_EXIT => {
                fixed(&payload, 4)?;
                Frame::Exit(i32::from_le_bytes(
                    payload[..4].try_into().expect("4 bytes"),
                ))
            }
            k => return Err(ProtoError::UnknownKind(k)),
        })
    }

    /// Writes the frame in one `write_all`, so frames from several threads sharing a locked
    /// writer never interleave.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.encode())?;
        w.flush()
    }
}

/// Reads the next frame; `Ok(None)` on a clean EOF at a frame boundary.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    // A clean EOF is only allowed before the first header byte.
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(ProtoError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF inside a frame header",
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let kind = header[0];
    let len = u32::from_le_bytes(header[1..].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtoError::TooLong { kind, len });
    }
    // Check the kind before reading the payload: an unknown kind means the stream is garbage.
    if !matches!(kind, K_START..=K_BYE | K_STARTED..=K_EXIT) {
        return Err(ProtoError::UnknownKind(kind));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Frame::decode(kind, payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Start(Start {
                version: PROTOCOL_VERSION,
                argv: vec!["sh".into(), "-c".into(), "echo 'x y'".into()],
                env: vec![("PATH".into(), "/bin".into())],
                cwd: "/work".into(),
                tty: true,
                winsize: Some((24, 80)),
                shares: vec![ShareMount {
                    tag: "share0".into(),
                    path: "/a b".into(),
                    rw: true,
                }],
                scratch: Some("/scratch".into()),
                verbose: false,
            }),
            Frame::Stdin(b"hello\0\xff".to_vec()),
            Frame::Stdin(Vec::new()),
            Frame::StdinEof,
            Frame::Resize(50, 200),
            Frame::Signal(15),
            Frame::Bye,
            Frame::Started,
            Frame::Stdout(vec![7; CHUNK]),
            Frame::Stderr(b"err".to_vec()),
            Frame::Message("héllo".into()),
            Frame::Exit(-1),
            Frame::Exit(137),
        ]
    }

    #[test]
    fn round_trip_every_kind_back_to_back() {
        let frames = all_frames();
        let mut buf = Vec::new();
        for f in &frames {
            f.write_to(&mut buf).unwrap();
        }
        let mut r = &buf[..];
        for f in &frames {
            assert_eq!(read_frame(&mut r).unwrap().as_ref(), Some(f));
        }
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn byte_at_a_time_reader() {
        struct OneByte<'a>(&'a [u8]);
        impl Read for OneByte<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() || b.is_empty() {
                    return Ok(0);
                }
                b[0] = self.0[0];
                self.0 = &self.0[1..];
                Ok(1)
            }
        }
        let buf = Frame::Resize(1, 2).encode();
        assert_eq!(
            read_frame(&mut OneByte(&buf)).unwrap(),
            Some(Frame::Resize(1, 2))
        );
    }

    #[test]
    fn unknown_kind_rejected() {
        let mut buf = vec![99u8];
        buf.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &buf[..]),
            Err(ProtoError::UnknownKind(99))
        ));
        let mut buf = vec![0u8];
        buf.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &buf[..]),
            Err(ProtoError::UnknownKind(0))
        ));
    }

    #[test]
    fn too_long_rejected_before_reading_payload() {
        let mut buf = vec![K_STDOUT];
        buf.extend_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(
            read_frame(&mut &buf[..]),
            Err(ProtoError::TooLong { .. })
        ));
    }

    #[test]
    fn wrong_fixed_sizes_rejected() {
        for (kind, len) in [(K_EXIT, 3), (K_RESIZE, 5), (K_SIGNAL, 0), (K_BYE, 1)] {
            let mut buf = vec![kind];
            buf.extend_from_slice(&(len as u32).to_le_bytes());
            buf.resize(HEADER_LEN + len, 1);
            assert!(
                matches!(
                    read_frame(&mut &buf[..]),
                    Err(ProtoError::BadPayload { .. })
                ),
                "kind {kind} len {len}"
            );
        }
        // Signal 0 and 65 are not signals.
        for s in [0i32, 65] {
            let mut buf = vec![K_SIGNAL];
            buf.extend_from_slice(&4u32.to_le_bytes());
            buf.extend_from_slice(&s.to_le_bytes());
            assert!(read_frame(&mut &buf[..]).is_err());
        }
    }

    #[test]
    fn bad_json_and_utf8_rejected() {
        for (kind, p) in [(K_START, &b"{not json"[..]), (K_MESSAGE, &b"\xff\xfe"[..])] {
            let mut buf = vec![kind];
            buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
            buf.extend_from_slice(p);
            assert!(matches!(
                read_frame(&mut &buf[..]),
                Err(ProtoError::BadPayload { .. })
            ));
        }
    }

    #[test]
    fn truncated_frames_are_errors_not_eof() {
        let buf = Frame::Stdout(b"abcdef".to_vec()).encode();
        for cut in 1..buf.len() {
            assert!(read_frame(&mut &buf[..cut]).is_err(), "cut at {cut}");
        }
    }
}
