//! Versioned binary framing for byte streams between host and guest.
//!
//! Used on the output port (guest → host), the input port (host → guest) and both directions of
//! an exec connection. Every frame is a 6-byte header followed by a payload:
//!
//! ```text
//!  0         1         2                   6
//!  +---------+---------+-------------------+----------------------+
//!  | version |  type   | payload length    | payload ...          |
//!  |  (= 1)  |  (u8)   | (u32 little end.) | (length bytes)       |
//!  +---------+---------+-------------------+----------------------+
//! ```
//!
//! | type | name     | payload | direction |
//! |------|----------|---------|-----------|
//! | 1    | Stdin    | bytes   | host → guest |
//! | 2    | Stdout   | bytes   | guest → host (with a TTY this is the terminal output) |
//! | 3    | Stderr   | bytes   | guest → host (never sent with a TTY) |
//! | 4    | Exit     | i32 LE: exit code (128+N when killed by signal N) | guest → host, last frame |
//! | 5    | Resize   | u16 LE rows, u16 LE cols | host → guest |
//! | 6    | Signal   | i32 LE: signal number 1..=64 | host → guest |
//! | 7    | Eof      | empty: no more stdin | host → guest |
//! | 8    | Error    | UTF-8 text | guest → host, then the connection closes |
//! | 9    | Exec     | JSON [`ExecRequest`] | host → guest, first frame of an exec connection |
//!
//! Type 0 is reserved as invalid. A receiver rejects an unknown version or type, a payload longer
//! than [`MAX_PAYLOAD`], and a fixed-size payload of the wrong length, without reading further:
//! the stream is then out of sync and must be closed. Versioning policy: a new version number is
//! used for incompatible header changes; new frame types may be added within a version, and a peer
//! that receives an unknown type reports [`FrameError::UnknownType`].

use std::io::{self, Read, Write};

use crate::exec::ExecRequest;

/// Protocol version written in every header.
pub const VERSION: u8 = 1;
/// Header size in bytes.
pub const HEADER_LEN: usize = 6;
/// Largest payload a receiver accepts.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Chunk size senders use for stream data (well under [`MAX_PAYLOAD`]).
pub const CHUNK: usize = 32 * 1024;

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes for the process's standard input.
    Stdin(Vec<u8>),
    /// Bytes the process wrote to standard output (or the terminal).
    Stdout(Vec<u8>),
    /// Bytes the process wrote to standard error.
    Stderr(Vec<u8>),
    /// The process ended with this code.
    Exit(i32),
    /// The terminal changed size.
    Resize(WindowSize),
    /// Deliver this signal to the process.
    Signal(i32),
    /// Standard input is closed.
    Eof,
    /// The request failed; the text says why.
    Error(String),
    /// Start a command (first frame on the exec port).
    Exec(ExecRequest),
}

/// Errors decoding or transporting frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header's version byte is not [`VERSION`].
    #[error("Unsupported frame version {0} (this side speaks {VERSION}); are host and agent from the same build?")]
    UnsupportedVersion(u8),
    /// The header's type byte is not a known frame type.
    #[error("Unknown frame type {0}")]
    UnknownType(u8),
    /// The declared payload is larger than [`MAX_PAYLOAD`].
    #[error("Frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD} bytes")]
    TooLarge {
        /// Declared length.
        len: usize,
    },
    /// A fixed-size payload has the wrong length.
    #[error("{kind} frame payload must be {expected} bytes, got {len}")]
    BadLength {
        /// Frame type name.
        kind: &'static str,
        /// Required length.
        expected: usize,
        /// Actual length.
        len: usize,
    },
    /// A signal number outside 1..=64.
    #[error("Signal frame carries invalid signal number {0}")]
    BadSignal(i32),
    /// An Error frame's text is not UTF-8.
    #[error("Error frame text is not valid UTF-8")]
    BadUtf8,
    /// An Exec frame's JSON does not parse.
    #[error("Exec frame is not a valid exec request: {0}")]
    BadRequest(String),
    /// The stream ended inside a frame.
    #[error("Stream ended in the middle of a frame")]
    Truncated,
    /// The payload to encode exceeds [`MAX_PAYLOAD`].
    #[error("Cannot send a frame of {0} bytes: larger than {MAX_PAYLOAD}; split it into chunks")]
    EncodeTooLarge(usize),
    /// Reading or writing the underlying stream failed.
    #[error("Frame I/O failed")]
    Io(#[from] io::Error),
}

const T_STDIN: u8 = 1;
const T_STDOUT: u8 = 2;
const T_STDERR: u8 = 3;
const T_EXIT: u8 = 4;
const T_RESIZE: u8 = 5;
const T_SIGNAL: u8 = 6;
const T_EOF: u8 = 7;
const T_ERROR: u8 = 8;
const T_EXEC: u8 = 9;

/// A validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    kind: u8,
    len: usize,
}

fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
    if h[0] != VERSION {
        return Err(FrameError::UnsupportedVersion(h[0]));
    }
    let kind = h[1];
    if !(T_STDIN..=T_EXEC).contains(&kind) {
        return Err(FrameError::UnknownType(kind));
    }
    let len = u32::from_le_bytes([h[2], h[3], h[4], h[5]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge { len });
    }
    let fixed = match kind {
        T_EXIT => Some(("Exit", 4)),
        T_RESIZE => Some(("Resize", 4)),
        T_SIGNAL => Some(("Signal", 4)),
        T_EOF => Some(("Eof", 0)),
        _ => None,
    };
    if let Some((name, expected)) = fixed {
        if len != expected {
            return Err(FrameError::BadLength {
                kind: name,
                expected,
                len,
            });
        }
    }
    Ok(Header { kind, len })
}

fn i32_of(p: &[u8]) -> i32 {
    i32::from_le_bytes([p[0], p[1], p[2], p[3]])
}

fn build(h: Header, p: Vec<u8>) -> Result<Frame, FrameError> {
    Ok(match h.kind {
        T_STDIN => Frame::Stdin(p),
        T_STDOUT => Frame::Stdout(p),
        T_STDERR => Frame::Stderr(p),
        T_EXIT => Frame::Exit(i32_of(&p)),
        T_RESIZE => Frame::Resize(WindowSize {
            rows: u16::from_le_bytes([p[0], p[1]]),
            cols: u16::from_le_bytes([p[2], p[3]]),
        }),
        T_SIGNAL => {
            let sig = i32_of(&p);
            if !(1..=64).contains(&sig) {
                return Err(FrameError::BadSignal(sig));
            }
            Frame::Signal(sig)
        }
        T_EOF => Frame::Eof,
        T_ERROR => Frame::Error(String::from_utf8(p).map_err(|_| FrameError::BadUtf8)?),
        T_EXEC => {
            let req: ExecRequest =
                serde_json::from_slice(&p).map_err(|e| FrameError::BadRequest(e.to_string()))?;
            req.validate()
                .map_err(|e| FrameError::BadRequest(e.to_string()))?;
            Frame::Exec(req)
        }
        other => return Err(FrameError::UnknownType(other)),
    })
}

impl Frame {
    fn kind(&self) -> u8 {
        match self {
            Frame::Stdin(_) => T_STDIN,
            Frame::Stdout(_) => T_STDOUT,
            Frame::Stderr(_) => T_STDERR,
            Frame::Exit(_) => T_EXIT,
            Frame::Resize(_) => T_RESIZE,
            Frame::Signal(_) => T_SIGNAL,
            Frame::Eof => T_EOF,
            Frame::Error(_) => T_ERROR,
            Frame::Exec(_) => T_EXEC,
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        let json;
        let small;
        let payload: &[u8] = match self {
            Frame::Stdin(b) | Frame::Stdout(b) | Frame::Stderr(b) => b,
            Frame::Exit(c) | Frame::Signal(c) => {
                small = c.to_le_bytes();
                &small
            }
            Frame::Resize(ws) => {
                let (r, c) = (ws.rows.to_le_bytes(), ws.cols.to_le_bytes());
                small = [r[0], r[1], c[0], c[1]];
                &small
            }
            Frame::Eof => &[],
            Frame::Error(t) => t.as_bytes(),
            Frame::Exec(req) => {
                // Serializing a struct of strings, bools and integers cannot fail.
                json =
                    serde_json::to_vec(req).map_err(|e| FrameError::BadRequest(e.to_string()))?;
                &json
            }
        };
        if payload.len() > MAX_PAYLOAD {
            return Err(FrameError::EncodeTooLarge(payload.len()));
        }
        out.push(VERSION);
        out.push(self.kind());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        Ok(())
    }

    /// The encoded frame.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let mut v = Vec::new();
        self.encode_into(&mut v)?;
        Ok(v)
    }

    /// Decodes one frame from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole frame, and `Ok(Some((frame, n)))`
    /// with the number of bytes consumed otherwise. A bad header is reported as soon as its six
    /// bytes are present, so an oversized length is rejected before any payload is buffered.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some(head) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(head);
        let header = parse_header(&h)?;
        let end = HEADER_LEN + header.len;
        let Some(payload) = buf.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        Ok(Some((build(header, payload.to_vec())?, end)))
    }
}

/// Reads into `buf` until full; `Ok(false)` if the stream ended before the first byte.
fn fill<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<bool, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    if !fill(r, &mut h)? {
        return Ok(None);
    }
    let header = parse_header(&h)?;
    let mut payload = vec![0u8; header.len];
    if header.len > 0 && !fill(r, &mut payload)? {
        return Err(FrameError::Truncated);
    }
    build(header, payload).map(Some)
}

/// Writes one frame in a single `write_all`, so frames from different threads sharing a
/// mutex-guarded writer never interleave.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> Result<(), FrameError> {
    w.write_all(&frame.encode()?)?;
    Ok(())
}

/// Async helpers over tokio streams (feature `tokio`).
#[cfg(feature = "tokio")]
pub mod tokio_io {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    use super::*;

    /// Reads one frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
    ) -> Result<Option<Frame>, FrameError> {
        let mut h = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut h[got..]).await? {
                0 if got == 0 => return Ok(None),
                0 => return Err(FrameError::Truncated),
                n => got += n,
            }
        }
        let header = parse_header(&h)?;
        let mut payload = vec![0u8; header.len];
        r.read_exact(&mut payload)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => FrameError::Truncated,
                _ => FrameError::Io(e),
            })?;
        build(header, payload).map(Some)
    }

    /// Writes one frame.
    pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
        w: &mut W,
        frame: &Frame,
    ) -> Result<(), FrameError> {
        w.write_all(&frame.encode()?).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Stdin(b"hello\n".to_vec()),
            Frame::Stdin(Vec::new()),
            Frame::Stdout(vec![0, 255, 10, 13]),
            Frame::Stderr(b"oops".to_vec()),
            Frame::Exit(0),
            Frame::Exit(137),
            Frame::Exit(-1),
            Frame::Resize(WindowSize {
                rows: 40,
                cols: 132,
            }),
            Frame::Signal(15),
            Frame::Eof,
            Frame::Error("no such container".into()),
            Frame::Exec(ExecRequest {
                command: vec!["sh".into(), "-c".into(), "echo hi".into()],
                in_container: true,
                interactive: true,
                tty: true,
                tty_size: Some(WindowSize { rows: 24, cols: 80 }),
                ..Default::default()
            }),
        ]
    }

    #[test]
    fn roundtrip_every_type_buffer_and_stream() {
        let mut stream = Vec::new();
        for f in all_frames() {
            let enc = f.encode().unwrap();
            assert_eq!(enc[0], VERSION);
            let (back, used) = Frame::decode(&enc).unwrap().unwrap();
            assert_eq!(back, f);
            assert_eq!(used, enc.len());
            stream.extend_from_slice(&enc);
        }
        let mut r = io::Cursor::new(stream);
        let mut got = Vec::new();
        while let Some(f) = read_frame(&mut r).unwrap() {
            got.push(f);
        }
        assert_eq!(got, all_frames());
    }

    #[test]
    fn decode_waits_for_whole_frame() {
        let enc = Frame::Stdout(b"abcdef".to_vec()).encode().unwrap();
        for cut in 0..enc.len() {
            assert!(Frame::decode(&enc[..cut]).unwrap().is_none(), "cut {cut}");
        }
        let mut two = enc.clone();
        two.extend_from_slice(&Frame::Eof.encode().unwrap());
        let (f, n) = Frame::decode(&two).unwrap().unwrap();
        assert_eq!(f, Frame::Stdout(b"abcdef".to_vec()));
        assert_eq!(Frame::decode(&two[n..]).unwrap().unwrap().0, Frame::Eof);
    }

    #[test]
    fn rejects_bad_version_and_type() {
        let mut enc = Frame::Eof.encode().unwrap();
        enc[0] = 2;
        assert!(matches!(
            Frame::decode(&enc),
            Err(FrameError::UnsupportedVersion(2))
        ));
        for t in [0u8, 10, 255] {
            let mut enc = Frame::Eof.encode().unwrap();
            enc[1] = t;
            assert!(matches!(Frame::decode(&enc), Err(FrameError::UnknownType(x)) if x == t));
        }
    }

    #[test]
    fn rejects_oversize_from_header_alone() {
        let mut h = vec![VERSION, 2];
        h.extend_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
        assert!(
            matches!(Frame::decode(&h), Err(FrameError::TooLarge { len }) if len == MAX_PAYLOAD + 1)
        );
        assert!(matches!(
            read_frame(&mut io::Cursor::new(h)),
            Err(FrameError::TooLarge { .. })
        ));
        let max = Frame::Stdout(vec![7; MAX_PAYLOAD]).encode().unwrap();
        assert_eq!(
            Frame::decode(&max).unwrap().unwrap().1,
            HEADER_LEN + MAX_PAYLOAD
        );
        assert!(matches!(
            Frame::Stdin(vec![0; MAX_PAYLOAD + 1]).encode(),
            Err(FrameError::EncodeTooLarge(_))
        ));
    }

    #[test]
    fn rejects_bad_fixed_lengths() {
        for (t, len) in [(T_EXIT, 3u32), (T_RESIZE, 5), (T_SIGNAL, 0), (T_EOF, 1)] {
            let mut h = vec![VERSION, t];
            h.extend_from_slice(&len.to_le_bytes());
            h.resize(HEADER_LEN + len as usize, 0);
            assert!(
                matches!(Frame::decode(&h), Err(FrameError::BadLength { .. })),
                "type {t}"
            );
        }
    }

    #[test]
    fn rejects_bad_payloads() {
        let raw = |t: u8, p: &[u8]| {
            let mut v = vec![VERSION, t];
            v.extend_from_slice(&(p.len() as u32).to_le_bytes());
            v.extend_from_slice(p);
            v
        };
        assert!(matches!(
            Frame::decode(&raw(T_SIGNAL, &0i32.to_le_bytes())),
            Err(FrameError::BadSignal(0))
        ));
        assert!(matches!(
            Frame::decode(&raw(T_SIGNAL, &65i32.to_le_bytes())),
            Err(FrameError::BadSignal(65))
        ));
        assert!(matches!(
            Frame::decode(&raw(T_ERROR, &[0xff, 0xfe])),
            Err(FrameError::BadUtf8)
        ));
        assert!(matches!(
            Frame::decode(&raw(T_EXEC, b"{not json")),
            Err(FrameError::BadRequest(_))
        ));
        assert!(matches!(
            Frame::decode(&raw(T_EXEC, b"{\"command\":[]}")),
            Err(FrameError::BadRequest(_))
        ));
    }

    #[test]
    fn stream_truncation_is_an_error_but_clean_eof_is_not() {
        assert!(read_frame(&mut io::Cursor::new(Vec::new()))
            .unwrap()
            .is_none());
        let enc = Frame::Stdout(b"abc".to_vec()).encode().unwrap();
        for cut in 1..enc.len() {
            let r = read_frame(&mut io::Cursor::new(enc[..cut].to_vec()));
            assert!(matches!(r, Err(FrameError::Truncated)), "cut {cut}: {r:?}");
        }
    }
}
