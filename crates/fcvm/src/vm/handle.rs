//! [`VmHandle`]: the one owner of a launched VM.
//!
//! A handle moves through [`VmState`]: `Creating` (inside `launch`), `Configured`,
//! `Running`, `Ended`. Ending is always one of: [`VmHandle::shutdown`] (ask the guest,
//! then force), [`VmHandle::finish`] (the VMM is gone or must go now), [`VmHandle::fail`]
//! (kept as failed), or [`VmHandle::detach`] (the VM outlives us). If none happens, `Drop`
//! kills the VMM and tears down, logging what failed (ripgrep's `CommandReader` idea:
//! explicit calls return errors, drop only logs).

use std::process::ExitStatus;
use std::time::Duration;

use crate::cleanup::{self, Disposition, TeardownReport};
use crate::paths::VmPaths;
use crate::process::ProcessRef;
use crate::state::{StoreError, VmRecord, VmStatus};

use super::api::{ApiCall, VmmApi};
use super::launch::{call, Host, LaunchError};
use super::spawn::SpawnedVmm;
use super::spec::{Lifetime, Source, VmSpec};

/// Where a handle is in the VM's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// `launch` is still building it.
    Creating,
    /// Configured (or restored, paused); not running yet.
    Configured,
    /// Running.
    Running,
    /// Torn down or detached: the handle no longer owns anything.
    Ended,
}

impl VmState {
    /// Whether `self -> next` is a legal move.
    pub fn can_become(self, next: VmState) -> bool {
        use VmState::*;
        matches!(
            (self, next),
            (Creating, Configured) | (Configured, Running) | (_, Ended)
        )
    }
}

/// How a stop went.
#[derive(Debug, Default)]
pub struct StopReport {
    /// The guest shut down by itself after Ctrl+Alt+Del.
    pub graceful: bool,
    /// The VMM's exit status, when this process was its parent.
    pub exit: Option<ExitStatus>,
    /// What the teardown did.
    pub teardown: TeardownReport,
    /// A page server still serving live clones: it stopped accepting new ones and exits by
    /// itself when the last one ends.
    pub draining: bool,
}

/// Time spent in each launch step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LaunchTimings {
    /// The state record (name claimed).
    pub record: Duration,
    /// Network namespace and TAP.
    pub network: Duration,
    /// Runtime directory and drive copies.
    pub files: Duration,
    /// VMM spawn until its API answered.
    pub spawn: Duration,
    /// Configuration, or snapshot load and drive patches.
    pub configure: Duration,
    /// Boot or resume.
    pub start: Duration,
}

/// The owner of one VM (see the module docs).
#[derive(Debug)]
pub struct VmHandle {
    host: Host,
    spec: VmSpec,
    record: VmRecord,
    vmm: Option<SpawnedVmm>,
    exit: Option<ExitStatus>,
    state: VmState,
    /// Step timings, filled in as the steps run.
    pub timings: LaunchTimings,
}

impl VmHandle {
    pub(super) fn new(host: Host, spec: VmSpec, record: VmRecord) -> VmHandle {
        VmHandle {
            host,
            spec,
            record,
            vmm: None,
            exit: None,
            state: VmState::Creating,
            timings: LaunchTimings::default(),
        }
    }

    pub(super) fn attach_vmm(&mut self, vmm: SpawnedVmm) {
        self.vmm = Some(vmm);
    }

    pub(super) fn host(&self) -> &Host {
        &self.host
    }

    /// What the VM was made from.
    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// The record as last written by this handle.
    pub fn record(&self) -> &VmRecord {
        &self.record
    }

    /// The runtime files.
    pub fn paths(&self) -> &VmPaths {
        &self.spec.paths
    }

    /// Where the handle is.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// The VMM's API, once spawned.
    pub fn api(&self) -> Option<&dyn VmmApi> {
        self.vmm.as_ref().map(|v| v.api.as_ref())
    }

    /// The VMM process, once spawned.
    pub fn process(&self) -> Option<ProcessRef> {
        self.vmm.as_ref().map(|v| v.process)
    }

    /// Time from spawning the VMM until its API answered.
    pub fn api_ready_after(&self) -> Option<Duration> {
        self.vmm.as_ref().map(|v| v.api_ready_after)
    }

    fn set_state(&mut self, next: VmState) {
        debug_assert!(self.state.can_become(next), "{:?} -> {next:?}", self.state);
        self.state = next;
    }

    /// Change the record (and keep the copy here current).
    pub fn update(&mut self, change: impl FnOnce(&mut VmRecord)) -> Result<&VmRecord, StoreError> {
        self.record = self.host.store.update(&self.record.id, change)?;
        Ok(&self.record)
    }

    /// Re-read the record (another fcvm command may have changed it, e.g. `fcvm stop`).
    pub fn reload(&mut self) -> Result<&VmRecord, StoreError> {
        if let Some(r) = self.host.store.get(&self.record.id)? {
            self.record = r;
        }
        Ok(&self.record)
    }

    /// Whether another fcvm command is stopping (or has already torn down) this VM:
    /// `fcvm stop` marks the record `stopping` before it forces the VM down, and removes
    /// it once done.
    pub fn stopped_elsewhere(&self) -> bool {
        match self.host.store.get(&self.record.id) {
            Ok(Some(r)) => r.status == VmStatus::Stopping,
            Ok(None) => self.state != VmState::Ended,
            Err(_) => false,
        }
    }

    /// Boot (or, after a restore, resume) the configured VM.
    pub async fn start(&mut self) -> Result<(), LaunchError> {
        if self.state != VmState::Configured {
            return Err(LaunchError::State {
                name: self.record.name.to_string(),
                state: self.state,
            });
        }
        let (step, action) = match self.spec.source {
            Source::Boot { .. } => ("booting", ApiCall::InstanceStart),
            Source::Snapshot { .. } => ("resuming the clone", ApiCall::Resume),
        };
        let t = std::time::Instant::now();
        call(self, step, action).await?;
        self.timings.start = t.elapsed();
        let detached = self.spec.lifetime == Lifetime::Detached;
        let vmm = self.process();
        self.update(|r| {
            r.status = VmStatus::Running;
            if detached {
                // Firecracker now owns the VM's life; fcvm may exit.
                if let Some(p) = vmm {
                    r.owner = p;
                }
            }
        })?;
        self.set_state(VmState::Running);
        tracing::debug!(vm = %self.record.name, "{step} done");
        Ok(())
    }

    pub(super) fn configured(&mut self) {
        self.set_state(VmState::Configured);
    }

    /// The VMM's exit status, if it has exited (never blocks).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(vmm) = self.vmm.as_mut() {
                self.exit = vmm.child.try_wait().ok().flatten();
            }
        }
        self.exit
    }

    /// Wait up to `timeout` for the VMM to exit (None: it still runs, or there is none).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            if self.vmm.is_none() || tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Wait for the VMM to exit (None: there is no VMM).
    pub async fn wait(&mut self) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            self.vmm.as_ref()?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// SIGKILL the VMM (if still running) and reap it.
    pub fn kill(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        if let Some(vmm) = self.vmm.as_mut() {
            let _ = vmm.child.kill();
            self.exit = vmm.child.wait().ok();
        }
    }

    /// Ask the guest to stop (Ctrl+Alt+Del), wait up to `grace`, then force; tear down.
    pub async fn shutdown(&mut self, grace: Duration) -> StopReport {
        let mut graceful = false;
        if self.state == VmState::Running && self.try_exit().is_none() {
            if let Some(api) = self.api() {
                if api.call(ApiCall::CtrlAltDel).await.is_ok() {
                    graceful = self.wait_exit(grace).await.is_some();
                }
            }
        }
        let teardown = self.finish(Disposition::Forget);
        StopReport {
            graceful,
            exit: self.exit,
            teardown,
            draining: false,
        }
    }

    /// Stop the VMM now (if it still runs) and tear down, recording `how`.
    pub fn finish(&mut self, how: Disposition) -> TeardownReport {
        self.kill();
        if self.state == VmState::Ended {
            return TeardownReport::default();
        }
        self.set_state(VmState::Ended);
        match cleanup::teardown_with(
            &self.host.store,
            &self.record.id,
            how,
            self.host.net.as_ref(),
        ) {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(
                    "cannot update the record of VM {}: {}",
                    self.record.name,
                    crate::report::chain(&e)
                );
                TeardownReport::default()
            }
        }
    }

    /// Stop the VMM and keep the record as failed with `reason` (shown by `fcvm ls`).
    pub fn fail(&mut self, reason: &str) -> TeardownReport {
        self.finish(Disposition::Fail(reason.to_owned()))
    }

    /// Leave the VM running past this process (after [`VmHandle::start`] of a
    /// [`Lifetime::Detached`] spec, whose record the VMM owns).
    pub fn detach(mut self) -> VmRecord {
        self.set_state(VmState::Ended);
        self.vmm = None;
        self.record.clone()
    }

    /// Teardown after a failed launch (the error is the caller's to report).
    pub(super) fn abort(&mut self) {
        self.finish(Disposition::Forget).warn();
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if self.state != VmState::Ended {
            self.finish(Disposition::Forget).warn();
        }
    }
}
