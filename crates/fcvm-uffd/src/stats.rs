//! Per-clone counters and the serialisable snapshots the CLI prints and stores.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::handshake::{HandshakeError, PageSizeSource, WireShape};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why the server stopped serving a clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum DisconnectReason {
    /// The clone closed its handshake socket (Firecracker exits) and no live process was left
    /// to serve.
    SocketClosed,
    /// The clone's process exited (its pidfd became readable).
    ProcessExited,
    /// The kernel reported the clone's address space gone (`ESRCH` from a uffd ioctl).
    AddressSpaceGone,
    /// Reading the uffd or polling failed; the clone was abandoned.
    Error(String),
}

/// Live counters of one clone; written by its serving thread, read by [`crate::PageServer::stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub pages_copied: AtomicU64,
    pub zero_pages: AtomicU64,
    pub eexist: AtomicU64,
    pub eagain_retries: AtomicU64,
    pub bytes_served: AtomicU64,
    pub remove_events: AtomicU64,
    pub unhandled_faults: AtomicU64,
    pub other_events: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

/// A point-in-time view of one clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneStats {
    /// Server-local connection number, unique for the server's lifetime.
    pub id: u64,
    /// Peer pid from `SO_PEERCRED` (None if the peer is in a pid namespace we cannot see).
    pub pid: Option<i32>,
    /// When the handshake connection was accepted (ms since the Unix epoch).
    pub connected_at_unix_ms: u64,
    /// When serving ended, if it has.
    pub disconnected_at_unix_ms: Option<u64>,
    /// Why serving ended, if it has.
    pub disconnect_reason: Option<DisconnectReason>,
    /// Outer JSON shape the clone sent.
    pub wire_shape: WireShape,
    /// Page size source of the first region (tells which Firecracker generation connected).
    pub page_size_source: PageSizeSource,
    /// Number of guest memory regions.
    pub regions: usize,
    /// Total guest memory described by the handshake, bytes.
    pub guest_bytes: u64,
    /// Pages resolved with UFFDIO_COPY from the memory file.
    pub pages_copied: u64,
    /// Pages resolved with zeros (ranges the guest had removed).
    pub zero_pages: u64,
    /// Faults on pages that were already present (EEXIST): harmless races.
    pub eexist: u64,
    /// Retries after EAGAIN (the clone's mappings were changing).
    pub eagain_retries: u64,
    /// Bytes written into the clone (copied + zeroed).
    pub bytes_served: u64,
    /// UFFD_EVENT_REMOVE events seen (balloon / MADV_DONTNEED).
    pub remove_events: u64,
    /// Faults that could not be resolved (outside every region, or an ioctl error).
    pub unhandled_faults: u64,
    /// Fork/remap/unmap/unknown events, ignored.
    pub other_events: u64,
}

impl CloneStats {
    pub(crate) fn fill_from(&mut self, c: &Counters) {
        self.pages_copied = c.pages_copied.load(Relaxed);
        self.zero_pages = c.zero_pages.load(Relaxed);
        self.eexist = c.eexist.load(Relaxed);
        self.eagain_retries = c.eagain_retries.load(Relaxed);
        self.bytes_served = c.bytes_served.load(Relaxed);
        self.remove_events = c.remove_events.load(Relaxed);
        self.unhandled_faults = c.unhandled_faults.load(Relaxed);
        self.other_events = c.other_events.load(Relaxed);
    }
}

/// A handshake the server refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedHandshake {
    /// Peer pid, if `SO_PEERCRED` told us.
    pub pid: Option<i32>,
    /// When it was refused (ms since the Unix epoch).
    pub at_unix_ms: u64,
    /// Why, as text (the typed error travels in [`crate::ServerEvent::HandshakeRejected`]).
    pub reason: String,
}

/// A point-in-time view of the whole server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStats {
    /// Socket the server listens (or listened) on.
    pub socket_path: std::path::PathBuf,
    /// Memory file being served.
    pub memory_file: std::path::PathBuf,
    /// Its length in bytes.
    pub memory_file_len: u64,
    /// Whether new clones are still accepted.
    pub accepting: bool,
    /// Connections accepted so far (including rejected handshakes).
    pub connections_accepted: u64,
    /// Handshakes in progress (accepted, not yet validated).
    pub pending_handshakes: usize,
    /// Clones being served now.
    pub live: Vec<CloneStats>,
    /// Clones that have gone, oldest first (the last [`crate::ServerConfig::history_limit`]).
    pub finished: Vec<CloneStats>,
    /// Refused handshakes, oldest first (bounded like `finished`).
    pub rejected: Vec<RejectedHandshake>,
    /// Count of all refused handshakes, including those dropped from `rejected`.
    pub rejected_total: u64,
    /// Events sent while nobody subscribed (lagging subscribers learn their own losses).
    pub events_unobserved: u64,
}

impl ServerStats {
    /// Sum of `pages_copied` over live and finished clones.
    pub fn total_pages_copied(&self) -> u64 {
        self.live
            .iter()
            .chain(&self.finished)
            .map(|c| c.pages_copied)
            .sum()
    }

    /// Sum of `bytes_served` over live and finished clones.
    pub fn total_bytes_served(&self) -> u64 {
        self.live
            .iter()
            .chain(&self.finished)
            .map(|c| c.bytes_served)
            .sum()
    }
}

/// What the server tells subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// A clone completed the handshake and is being served.
    Connected {
        /// Connection number.
        id: u64,
        /// Peer pid.
        pid: Option<i32>,
        /// Guest memory described, bytes.
        guest_bytes: u64,
    },
    /// Serving a clone ended; `stats` are final.
    Disconnected {
        /// Connection number.
        id: u64,
        /// Peer pid.
        pid: Option<i32>,
        /// Final counters, with `disconnect_reason` set.
        stats: CloneStats,
    },
    /// A connection was refused during the handshake.
    HandshakeRejected {
        /// Peer pid, if known.
        pid: Option<i32>,
        /// Why.
        reason: HandshakeError,
    },
}
