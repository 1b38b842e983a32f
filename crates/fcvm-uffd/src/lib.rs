//! userfaultfd page server for Firecracker snapshot clones.
//!
//! Firecracker restores a snapshot with `mem_backend {"backend_type":"Uffd", "backend_path":
//! <socket>}`: it maps anonymous guest memory, registers it with a userfaultfd, connects to the
//! socket and sends the region list plus the uffd. From then on every first touch of a guest
//! page is a fault that the server resolves by copying the page from the snapshot memory file.
//! One [`PageServer`] serves any number of clones from one read-only mapping of that file.
//!
//! Flow:
//! 1. [`PageServer::bind`]: map the file, listen on the socket (before `/snapshot/load`).
//! 2. Start clones; each connection is validated by [`handshake`] and served on its own thread.
//! 3. [`PageServer::subscribe`] for [`ServerEvent`]s, [`PageServer::stats`] for counters.
//! 4. On shutdown: [`PageServer::stop_accepting`], then [`PageServer::wait_idle`].
//!
//! [`client`] plays Firecracker's part (tests, bench, stand-in VMMs); [`ksm`] helps clones
//! share the pages they were copied.
#![deny(missing_docs)]

pub mod client;
pub mod handshake;
pub mod ksm;
pub mod server;
pub mod stats;
mod sys;

pub use handshake::{GuestRegion, HandshakeError, Mappings, PageSizeSource, WireShape};
pub use ksm::enable_ksm_merge_any;
pub use server::{PageServer, ServerConfig, ServerError, DEFAULT_FAULT_AROUND_PAGES};
pub use stats::{CloneStats, DisconnectReason, RejectedHandshake, ServerEvent, ServerStats};

/// The host's base page size in bytes.
pub fn host_page_size() -> u64 {
    sys::host_page_size()
}
