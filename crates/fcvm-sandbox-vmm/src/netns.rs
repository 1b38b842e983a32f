//! Creating sockets inside the sandbox's network namespace.
//!
//! A socket belongs to the network namespace it was created in, for its whole life, so the VMM
//! creates sockets on a short-lived thread that has `setns`'d into the sandbox and then uses
//! them from tokio in its own namespace. Abstract Unix socket names and 169.254.169.254 on the
//! sandbox's loopback are then reachable from the guest side only.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use nix::sched::{setns, CloneFlags};

/// Runs `f` on a thread inside the network namespace `ns` and returns its result.
pub fn in_netns<T: Send>(ns: &File, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
    })
}
