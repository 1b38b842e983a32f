//! Firecracker's UFFD handshake: one message on a Unix stream socket whose bytes are JSON guest
//! region mappings and whose `SCM_RIGHTS` ancillary data is the userfaultfd.
//!
//! Accepted JSON shapes (unknown fields are ignored in all of them):
//!
//! | shape | sent by | page size taken from |
//! |---|---|---|
//! | `[{"base_host_virt_addr","size","offset"}]` | v1.0 – ~v1.5 | host page size |
//! | the same plus `"page_size_kib"` | ~v1.6 – v1.9 | `page_size_kib`, see below |
//! | the same plus `"page_size"` (and usually `page_size_kib`) | v1.10+ (v1.12.1 sends both) | `page_size` |
//! | `{"LoadSnapshot":{"guest_mappings":[...]}}` | a development branch | as per region |
//!
//! **`page_size_kib` rule.** Every released Firecracker fills `page_size_kib` with a size in
//! *bytes* (4096, or 2097152 for 2 MiB hugetlbfs) despite its name. So a value that is a power of
//! two and at least 4096 is taken as bytes. A value below 4096 cannot be a page size in bytes on
//! any Linux host, so if it is a power of two whose KiB reading is a page size (4 → 4 KiB, 2048 → 2
//! MiB) it is taken as KiB, for a peer that fixed the unit without renaming the field. Anything
//! else is rejected. `page_size`, when present, wins over `page_size_kib`.
//!
//! Validation: at least one region; page size a power of two between the host page size and
//! 1 GiB; `base_host_virt_addr` and `size` multiples of the region's page size; `offset` a multiple
//! of the host page size; `size > 0`; no address overflow; no two regions overlapping in the
//! clone's address space; every `[offset, offset+size)` inside the memory file.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// Largest handshake message accepted. A VM has a handful of regions (~120 bytes each), so
/// 64 KiB is far above any real message and small enough to bound a hostile peer.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// Largest page size accepted (x86_64 1 GiB hugetlb pages).
pub const MAX_PAGE_SIZE: u64 = 1 << 30;

/// Why a handshake was refused. Every variant leaves the server serving other clones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // variant fields are spelled out in each message
pub enum HandshakeError {
    /// The server already serves its maximum number of clones.
    #[error("already serving the maximum of {max} clones; raise max_clones or stop some clones")]
    TooManyClones { max: usize },
    /// The peer's uid (`SO_PEERCRED`) is neither ours, root's, nor in the allowed range.
    #[error("peer uid {uid} is not allowed to be served (not root, not ours, not a jailed VM's)")]
    PeerNotAllowed { uid: u32 },
    /// The peer closed the connection before sending anything.
    #[error("peer closed the socket before sending the handshake; was it a UFFD client?")]
    PeerClosed,
    /// Nothing complete arrived within the handshake timeout.
    #[error("no complete handshake within the timeout; the peer is stuck or not Firecracker")]
    Timeout,
    /// Reading the socket failed.
    #[error("reading the handshake failed: {0}")]
    Io(Errno),
    /// The message had no `SCM_RIGHTS` fd.
    #[error("handshake carried no file descriptor; the uffd must be sent with SCM_RIGHTS")]
    MissingFd,
    /// More than one fd, or truncated ancillary data.
    #[error("handshake carried {0} file descriptors (or truncated control data); expected exactly one uffd")]
    UnexpectedFds(usize),
    /// The fd received is not a userfaultfd.
    #[error("the received fd is {0:?}, not a userfaultfd")]
    NotUserfaultfd(String),
    /// The JSON was larger than [`MAX_MESSAGE_LEN`].
    #[error("handshake message exceeds {max} bytes (got at least {len}); refusing to buffer it")]
    TooLarge { len: usize, max: usize },
    /// The bytes were not valid JSON of any accepted shape.
    #[error("handshake is not valid mapping JSON: {0}")]
    Json(String),
    /// The region list was empty.
    #[error("handshake lists no guest memory regions")]
    NoRegions,
    /// A region's page size is unusable.
    #[error(
        "region {index}: page size {value} is not a power of two between {min} and {max} bytes"
    )]
    BadPageSize {
        index: usize,
        value: u64,
        min: u64,
        max: u64,
    },
    /// A region's `size` is zero.
    #[error("region {index}: size is zero")]
    ZeroSize { index: usize },
    /// A field is not aligned as required.
    #[error("region {index}: {field}={value:#x} is not a multiple of {align:#x}")]
    Unaligned {
        index: usize,
        field: &'static str,
        value: u64,
        align: u64,
    },
    /// `base + size` or `offset + size` overflows.
    #[error("region {index}: address range overflows 64 bits")]
    Overflow { index: usize },
    /// Two regions overlap in the clone's address space.
    #[error("regions {first} and {second} overlap in the clone's address space")]
    Overlap { first: usize, second: usize },
    /// A region reaches past the end of the memory file.
    #[error("region {index}: file range ends at {end:#x} but the memory file is only {file_len:#x} bytes; wrong snapshot?")]
    BeyondFile {
        index: usize,
        end: u64,
        file_len: u64,
    },
}

/// Where a region's page size came from (reported so operators can see which wire shape a
/// Firecracker version speaks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageSizeSource {
    /// The `page_size` field.
    PageSize,
    /// `page_size_kib` holding bytes (all released Firecrackers).
    PageSizeKibAsBytes,
    /// `page_size_kib` holding KiB (value below 4096).
    PageSizeKibAsKib,
    /// Neither field: the host page size.
    HostDefault,
}

/// The outer shape of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireShape {
    /// A bare JSON array of mappings (mainline Firecracker).
    Array,
    /// `{"LoadSnapshot":{"guest_mappings":[...]}}`.
    LoadSnapshot,
}

/// One validated guest memory region of a clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegion {
    /// Start of the region in the clone's (Firecracker's) address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region's first byte in the memory file.
    pub offset: u64,
    /// Page size in bytes (the unit of each UFFDIO_COPY).
    pub page_size: u64,
    /// Which field `page_size` came from.
    pub page_size_source: PageSizeSource,
}

impl GuestRegion {
    /// One past the last address of the region.
    pub fn end(&self) -> u64 {
        self.base_host_virt_addr + self.size
    }

    /// Whether `addr` lies in the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base_host_virt_addr && addr < self.end()
    }
}

/// A parsed and validated handshake (without the fd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mappings {
    /// Regions sorted by `base_host_virt_addr`.
    pub regions: Vec<GuestRegion>,
    /// Outer shape of the message.
    pub shape: WireShape,
}

impl Mappings {
    /// Total bytes of guest memory described.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The region containing `addr`, if any.
    pub fn find(&self, addr: u64) -> Option<&GuestRegion> {
        let idx = self
            .regions
            .partition_point(|r| r.base_host_virt_addr <= addr);
        idx.checked_sub(1)
            .map(|i| &self.regions[i])
            .filter(|r| r.contains(addr))
    }
}

#[derive(Deserialize)]
struct WireRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    #[serde(default)]
    page_size_kib: Option<u64>,
}

#[derive(Deserialize)]
struct WireWrapper {
    #[serde(rename = "LoadSnapshot")]
    load_snapshot: WireLoad,
}

#[derive(Deserialize)]
struct WireLoad {
    guest_mappings: Vec<WireRegion>,
}

fn json_err(e: serde_json::Error) -> HandshakeError {
    HandshakeError::Json(e.to_string())
}

/// Interprets the page size fields of one region, see the module docs for the rule.
fn page_size_of(
    index: usize,
    w: &WireRegion,
    host_page: u64,
) -> Result<(u64, PageSizeSource), HandshakeError> {
    let bad = |value| HandshakeError::BadPageSize {
        index,
        value,
        min: host_page,
        max: MAX_PAGE_SIZE,
    };
    let valid = |v: u64| v.is_power_of_two() && v >= host_page && v <= MAX_PAGE_SIZE;
    match (w.page_size, w.page_size_kib) {
        (Some(v), _) if valid(v) => Ok((v, PageSizeSource::PageSize)),
        (Some(v), _) => Err(bad(v)),
        (None, Some(v)) if v >= 4096 && valid(v) => Ok((v, PageSizeSource::PageSizeKibAsBytes)),
        (None, Some(v)) if v < 4096 && v.is_power_of_two() && valid(v * 1024) => {
            Ok((v * 1024, PageSizeSource::PageSizeKibAsKib))
        }
        (None, Some(v)) => Err(bad(v)),
        (None, None) => Ok((host_page, PageSizeSource::HostDefault)),
    }
}

/// Parses and validates handshake JSON against a memory file of `file_len` bytes.
pub fn parse(bytes: &[u8], file_len: u64, host_page: u64) -> Result<Mappings, HandshakeError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(HandshakeError::TooLarge {
            len: bytes.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    // Pick the shape by the first significant byte so that errors name the real problem
    // instead of serde's "did not match any variant".
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let (wire, shape) = match first {
        Some(b'[') => (
            serde_json::from_slice::<Vec<WireRegion>>(bytes).map_err(json_err)?,
            WireShape::Array,
        ),
        Some(b'{') => (
            serde_json::from_slice::<WireWrapper>(bytes)
                .map_err(json_err)?
                .load_snapshot
                .guest_mappings,
            WireShape::LoadSnapshot,
        ),
        _ => {
            return Err(HandshakeError::Json(
                "expected a JSON array or a {\"LoadSnapshot\":...} object".into(),
            ))
        }
    };
    if wire.is_empty() {
        return Err(HandshakeError::NoRegions);
    }

    let mut regions = Vec::with_capacity(wire.len());
    for (index, w) in wire.iter().enumerate() {
        let (page_size, page_size_source) = page_size_of(index, w, host_page)?;
        if w.size == 0 {
            return Err(HandshakeError::ZeroSize { index });
        }
        for (field, value, align) in [
            ("base_host_virt_addr", w.base_host_virt_addr, page_size),
            ("size", w.size, page_size),
            ("offset", w.offset, host_page),
        ] {
            if value % align != 0 {
                return Err(HandshakeError::Unaligned {
                    index,
                    field,
                    value,
                    align,
                });
            }
        }
        let file_end = w
            .offset
            .checked_add(w.size)
            .ok_or(HandshakeError::Overflow { index })?;
        w.base_host_virt_addr
            .checked_add(w.size)
            .ok_or(HandshakeError::Overflow { index })?;
        if file_end > file_len {
            return Err(HandshakeError::BeyondFile {
                index,
                end: file_end,
                file_len,
            });
        }
        regions.push((
            index,
            GuestRegion {
                base_host_virt_addr: w.base_host_virt_addr,
                size: w.size,
                offset: w.offset,
                page_size,
                page_size_source,
            },
        ));
    }

    regions.sort_by_key(|(_, r)| r.base_host_virt_addr);
    for pair in regions.windows(2) {
        let ((i, a), (j, b)) = (&pair[0], &pair[1]);
        if b.base_host_virt_addr < a.end() {
            return Err(HandshakeError::Overlap {
                first: *i.min(j),
                second: *i.max(j),
            });
        }
    }
    Ok(Mappings {
        regions: regions.into_iter().map(|(_, r)| r).collect(),
        shape,
    })
}

/// What [`receive`] read off the socket.
#[derive(Debug)]
pub struct RawHandshake {
    /// The message bytes.
    pub bytes: Vec<u8>,
    /// The fd passed with `SCM_RIGHTS` (owned: closed on drop).
    pub fd: OwnedFd,
}

/// Receives one handshake from `stream`: reads until the bytes form complete JSON (Firecracker
/// sends it in one `sendmsg`, but a stream socket may split a large one), the peer stops sending,
/// `MAX_MESSAGE_LEN` is exceeded or `deadline` passes. The fd is received with
/// `MSG_CMSG_CLOEXEC` so it never leaks into processes the caller spawns.
pub fn receive(stream: &UnixStream, deadline: Instant) -> Result<RawHandshake, HandshakeError> {
    let mut bytes: Vec<u8> = Vec::with_capacity(1024);
    let mut fd: Option<OwnedFd> = None;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| HandshakeError::Io(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;

        let mut cmsg_buf = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg_buf),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(HandshakeError::Timeout),
            Err(e) => return Err(HandshakeError::Io(e)),
        };
        let n = msg.bytes;
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        // Take ownership of every received fd first, so that none leaks whatever we decide.
        let mut fds: Vec<OwnedFd> = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: SCM_RIGHTS just installed these fds in our table; nothing else
                    // refers to them, so each gets exactly one owner here.
                    fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                }
            }
        }
        if truncated || fds.len() > 1 || (fd.is_some() && !fds.is_empty()) {
            return Err(HandshakeError::UnexpectedFds(
                fds.len() + usize::from(fd.is_some()),
            ));
        }
        if let Some(f) = fds.pop() {
            fd = Some(f);
        }

        if n == 0 {
            if bytes.is_empty() {
                return Err(if fd.is_some() {
                    HandshakeError::Json("empty message".into())
                } else {
                    HandshakeError::PeerClosed
                });
            }
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(HandshakeError::TooLarge {
                len: bytes.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        match serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            Err(e) if e.is_eof() => continue,
            _ => break,
        }
    }
    let fd = fd.ok_or(HandshakeError::MissingFd)?;
    check_is_userfaultfd(&fd)?;
    Ok(RawHandshake { bytes, fd })
}

/// Refuses fds that are not userfaultfds, so a confused or hostile peer cannot make us read
/// "events" from, say, a pipe.
fn check_is_userfaultfd(fd: &OwnedFd) -> Result<(), HandshakeError> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("<unreadable: {e}>"));
    if link == "anon_inode:[userfaultfd]" {
        Ok(())
    } else {
        Err(HandshakeError::NotUserfaultfd(link))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn one(json: &str) -> Result<Mappings, HandshakeError> {
        parse(json.as_bytes(), 256 * MIB, 4096)
    }

    #[test]
    fn v1_12_1_exact_message() {
        let m = one(r#"[{"base_host_virt_addr":140000000000000,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]"#).unwrap();
        assert_eq!(m.shape, WireShape::Array);
        assert_eq!(m.regions.len(), 1);
        let r = m.regions[0];
        assert_eq!(r.base_host_virt_addr, 140000000000000);
        assert_eq!(r.size, 128 * MIB);
        assert_eq!(r.page_size, 4096);
        assert_eq!(r.page_size_source, PageSizeSource::PageSize);
    }

    #[test]
    fn legacy_shape_defaults_to_host_page() {
        let m = parse(
            br#"[{"base_host_virt_addr":8192,"size":8192,"offset":4096}]"#,
            MIB,
            4096,
        )
        .unwrap();
        assert_eq!(m.regions[0].page_size, 4096);
        assert_eq!(m.regions[0].page_size_source, PageSizeSource::HostDefault);
        assert_eq!(m.regions[0].offset, 4096);
    }

    #[test]
    fn page_size_kib_rule() {
        let cases = [
            (4096, 4096, PageSizeSource::PageSizeKibAsBytes),
            (2 * MIB, 2 * MIB, PageSizeSource::PageSizeKibAsBytes),
            (4, 4096, PageSizeSource::PageSizeKibAsKib),
            (2048, 2 * MIB, PageSizeSource::PageSizeKibAsKib),
        ];
        for (field, want, src) in cases {
            let json = format!(
                r#"[{{"base_host_virt_addr":0,"size":{},"offset":0,"page_size_kib":{field}}}]"#,
                4 * MIB
            );
            let m = parse(json.as_bytes(), 4 * MIB, 4096).unwrap();
            assert_eq!(
                (m.regions[0].page_size, m.regions[0].page_size_source),
                (want, src)
            );
        }
        for bad in [0, 3, 1000, 6144, 4 * MIB * 1024] {
            let json = format!(
                r#"[{{"base_host_virt_addr":0,"size":{},"offset":0,"page_size_kib":{bad}}}]"#,
                4 * MIB
            );
            assert!(
                matches!(
                    parse(json.as_bytes(), 4 * MIB, 4096),
                    Err(HandshakeError::BadPageSize { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn page_size_wins_over_kib_field() {
        let m = one(r#"[{"base_host_virt_addr":0,"size":2097152,"offset":0,"page_size":2097152,"page_size_kib":4}]"#).unwrap();
        assert_eq!(m.regions[0].page_size, 2 * MIB);
        assert_eq!(m.regions[0].page_size_source, PageSizeSource::PageSize);
    }

    #[test]
    fn wrapper_shape_and_unknown_fields() {
        let m = one(r#"{"LoadSnapshot":{"guest_mappings":[
            {"base_host_virt_addr":1048576,"size":4096,"offset":4096,"page_size":4096,"future":true},
            {"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":4096}]},"extra":1}"#)
        .unwrap();
        assert_eq!(m.shape, WireShape::LoadSnapshot);
        // Sorted by address whatever the wire order.
        assert_eq!(m.regions[0].base_host_virt_addr, 0);
        assert_eq!(m.regions[1].base_host_virt_addr, MIB);
        assert_eq!(m.total_size(), 8192);
        assert_eq!(m.find(MIB + 17).map(|r| r.offset), Some(4096));
        assert_eq!(m.find(4096), None);
    }

    #[test]
    fn rejects_bad_input_with_typed_errors() {
        let e = |j: &str| one(j).unwrap_err();
        assert!(matches!(e("not json"), HandshakeError::Json(_)));
        assert!(matches!(e("[{\"size\":4096}]"), HandshakeError::Json(_)));
        assert!(matches!(e("{\"Other\":{}}"), HandshakeError::Json(_)));
        assert!(matches!(
            e(r#"[{"base_host_virt_addr":-1,"size":4096,"offset":0}]"#),
            HandshakeError::Json(_)
        ));
        assert_eq!(e("[]"), HandshakeError::NoRegions);
        assert_eq!(
            e(r#"{"LoadSnapshot":{"guest_mappings":[]}}"#),
            HandshakeError::NoRegions
        );
        assert_eq!(
            e(r#"[{"base_host_virt_addr":0,"size":0,"offset":0}]"#),
            HandshakeError::ZeroSize { index: 0 }
        );
        assert!(matches!(
            e(r#"[{"base_host_virt_addr":100,"size":4096,"offset":0}]"#),
            HandshakeError::Unaligned {
                field: "base_host_virt_addr",
                ..
            }
        ));
        assert!(matches!(
            e(r#"[{"base_host_virt_addr":0,"size":4097,"offset":0}]"#),
            HandshakeError::Unaligned { field: "size", .. }
        ));
        // Hugepage regions need 2 MiB alignment of the address.
        assert!(matches!(
            e(r#"[{"base_host_virt_addr":4096,"size":2097152,"offset":0,"page_size":2097152}]"#),
            HandshakeError::Unaligned {
                field: "base_host_virt_addr",
                align: 2097152,
                ..
            }
        ));
        assert!(matches!(
            e(r#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":3000}]"#),
            HandshakeError::BadPageSize { value: 3000, .. }
        ));
        assert_eq!(
            e(r#"[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0}]"#),
            HandshakeError::Overflow { index: 0 }
        );
        assert_eq!(
            e(
                r#"[{"base_host_virt_addr":0,"size":8192,"offset":0},{"base_host_virt_addr":4096,"size":4096,"offset":8192}]"#
            ),
            HandshakeError::Overlap {
                first: 0,
                second: 1
            }
        );
        assert_eq!(
            e(r#"[{"base_host_virt_addr":0,"size":268435456,"offset":4096}]"#),
            HandshakeError::BeyondFile {
                index: 0,
                end: 256 * MIB + 4096,
                file_len: 256 * MIB
            }
        );
    }

    #[test]
    fn rejects_oversize() {
        let big = format!("[{}]", " ".repeat(MAX_MESSAGE_LEN));
        assert!(matches!(one(&big), Err(HandshakeError::TooLarge { .. })));
    }
}
