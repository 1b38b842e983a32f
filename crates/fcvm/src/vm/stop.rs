//! Stopping a VM: gracefully through the guest when possible, by force otherwise, and
//! then undoing everything recorded for it.

use std::time::Duration;

use crate::cleanup::{self, CleanupError};
use crate::firecracker::models::ActionType;
use crate::firecracker::FirecrackerClient;
use nix::sys::signal::Signal;

use crate::state::{Store, StoreError, VmKind, VmRecord, VmStatus};

/// How a stop went.
#[derive(Debug)]
pub struct StopReport {
    /// The guest shut down by itself after Ctrl+Alt+Del.
    pub graceful: bool,
    /// Cleanup steps that failed.
    pub failures: Vec<CleanupError>,
    /// A page server still serving live clones after the grace period: it stopped
    /// accepting new clones and exits by itself when the last one ends.
    pub draining: bool,
}

/// Stop the VM of `record` and remove its record.
///
/// Order: ask the guest (Ctrl+Alt+Del, which Linux guests and the probe guest honour) and
/// wait up to `grace`; then terminate the VMM; then give a foreground owner a moment to
/// finish its own cleanup; then replay the recorded cleanup steps ourselves (they are
/// idempotent, so racing the owner is harmless).
pub async fn stop_vm(
    store: &Store,
    record: &VmRecord,
    grace: Duration,
) -> Result<StopReport, StoreError> {
    if record.kind == VmKind::PageServer {
        return stop_page_server(store, record, grace).await;
    }
    let record = store.update(&record.id, |r| r.status = VmStatus::Stopping)?;
    let mut graceful = false;
    if let (Some(vmm), Some(socket)) = (record.vmm, record.api_socket.as_ref()) {
        if vmm.is_alive() {
            let client = FirecrackerClient::new(socket).with_timeout(Duration::from_secs(2));
            if client.action(ActionType::SendCtrlAltDel).await.is_ok() {
                graceful = wait_gone(vmm, grace).await;
            }
            if !graceful {
                let _ = tokio::task::spawn_blocking(move || vmm.terminate(Duration::from_secs(2)))
                    .await;
            }
        }
    }
    // A foreground `fcvm` owner notices its VMM exit and cleans up by itself.
    if record.vmm != Some(record.owner) && record.owner.is_alive() {
        let owner = record.owner;
        if !wait_gone(owner, Duration::from_secs(5)).await {
            let _ =
                tokio::task::spawn_blocking(move || owner.terminate(Duration::from_secs(2))).await;
        }
    }
    let failures = cleanup::run_all(&record.cleanup);
    store.remove(&record.id)?;
    Ok(StopReport {
        graceful,
        failures,
        draining: false,
    })
}

/// A page server is never killed while clones depend on it (they would hang or fail on
/// their next page fault): SIGTERM makes it stop accepting and drain; if clones are still
/// live after `grace`, it is left to exit by itself when the last one stops.
async fn stop_page_server(
    store: &Store,
    record: &VmRecord,
    grace: Duration,
) -> Result<StopReport, StoreError> {
    let owner = record.owner;
    if owner.signal(Signal::SIGTERM) && !wait_gone(owner, grace).await {
        return Ok(StopReport {
            graceful: true,
            failures: Vec::new(),
            draining: true,
        });
    }
    let failures = cleanup::run_all(&record.cleanup);
    store.remove(&record.id)?;
    Ok(StopReport {
        graceful: true,
        failures,
        draining: false,
    })
}

async fn wait_gone(process: crate::process::ProcessRef, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while process.is_alive() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}
