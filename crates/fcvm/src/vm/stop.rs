//! `fcvm stop`: ending a VM that another process (a foreground fcvm, or Firecracker itself
//! once detached) owns: through the guest when possible, by force otherwise, then
//! [`crate::cleanup::teardown`].

use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cleanup::{self, Disposition};
use crate::firecracker::FirecrackerClient;
use crate::process::ProcessRef;
use crate::state::{Store, StoreError, VmKind, VmRecord, VmStatus};

use super::api::{ApiCall, VmmApi};
use super::handle::StopReport;

/// How long a foreground owner gets to finish its own teardown after its VMM exited.
const OWNER_GRACE: Duration = Duration::from_secs(5);

/// Stop the VM of `record` and remove its record.
///
/// Order: ask the guest (Ctrl+Alt+Del, which Linux guests and the probe guest honour) and
/// wait up to `grace`; then terminate the VMM; then give a foreground owner a moment to
/// finish its own teardown; then tear down ourselves (idempotent, so racing the owner is
/// harmless). A failed VM's record is simply torn down and removed.
pub async fn stop_vm(
    store: &Store,
    record: &VmRecord,
    grace: Duration,
) -> Result<StopReport, StoreError> {
    if record.kind == VmKind::PageServer {
        return stop_page_server(store, record, grace).await;
    }
    if record.status == VmStatus::Exited {
        // Already stopped; its record and logs stay until `fcvm rm`.
        return Ok(StopReport {
            graceful: true,
            exit: None,
            teardown: Default::default(),
            draining: false,
        });
    }
    if record.status == VmStatus::Failed {
        return Ok(StopReport {
            graceful: false,
            exit: None,
            teardown: cleanup::teardown(store, &record.id, Disposition::Forget)?,
            draining: false,
        });
    }
    let record = store.update(&record.id, |r| r.status = VmStatus::Stopping)?;
    let mut graceful = false;
    if let (Some(vmm), Some(socket)) = (record.vmm, record.api_socket.as_ref()) {
        if vmm.is_alive() {
            let client = FirecrackerClient::new(socket).with_timeout(Duration::from_secs(2));
            if client.call(ApiCall::CtrlAltDel).await.is_ok() {
                graceful = wait_gone(vmm, grace).await;
            }
            if !graceful {
                let _ = tokio::task::spawn_blocking(move || vmm.terminate(Duration::from_secs(2)))
                    .await;
            }
        }
    }
    // A foreground `fcvm` owner notices its VMM exit and tears down by itself.
    if record.vmm != Some(record.owner) && record.owner.is_alive() {
        let owner = record.owner;
        if !wait_gone(owner, OWNER_GRACE).await {
            let _ =
                tokio::task::spawn_blocking(move || owner.terminate(Duration::from_secs(2))).await;
        }
    }
    // A container VM's owner keeps the record as exited (its code and logs) unless the run
    // said --rm; stopping is not removing.
    let exited = store
        .get(&record.id)?
        .is_some_and(|r| r.status == VmStatus::Exited);
    let how = if exited {
        Disposition::Exited
    } else {
        Disposition::Forget
    };
    Ok(StopReport {
        graceful,
        exit: None,
        teardown: cleanup::teardown(store, &record.id, how)?,
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
            exit: None,
            teardown: Default::default(),
            draining: true,
        });
    }
    Ok(StopReport {
        graceful: true,
        exit: None,
        teardown: cleanup::teardown(store, &record.id, Disposition::Forget)?,
        draining: false,
    })
}

async fn wait_gone(process: ProcessRef, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while process.is_alive() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}
