//! Clones of a container VM: `fcvm snapshot run` of a snapshot that `fcvm snapshot create`
//! took of a `fcvm podman run` VM.
//!
//! The clone is launched by the lifecycle owner from [`clone_spec`] (its own record, network
//! namespace and disk copies, the VMM in a private mount view) and then followed exactly as
//! a container run is ([`super::attach_and_follow`]): the host's listeners are bound before
//! the resume, the restored agent finds its channels reset, connects them again, says
//! Reconnected, gets the host's clock and entropy (Resync) and reports Ready. From there:
//!
//! - in the foreground, the container's output from the restore on goes to fcvm's stdout
//!   and stderr, and fcvm exits with the container's code;
//! - with `-d` this process is the clone's supervisor (as for `podman run -d`): it writes
//!   the output to the clone's log (`fcvm logs`), releases the command at Ready, and keeps
//!   the record as exited when the container ends (`fcvm rm` removes it);
//! - with `--exec CMD` it waits for Ready, runs `sh -c CMD` in the container through the
//!   exec server, prints its output (stdout and stderr apart), stops the clone and removes
//!   everything, and exits with CMD's code.

use std::time::Duration;

use fcvm_proto::plan::{ImageSource, Plan};
use fcvm_proto::status::Status;

use crate::cleanup::Disposition;
use crate::commands::exec::{self, ExecError, ExecOptions, Target};
use crate::firecracker::binary::{self, Program};
use crate::paths::Paths;
use crate::snapshot::clone::{clone_spec, CloneError, CloneRequest};
use crate::snapshot::store::SnapshotStore;
use crate::state::{GuestKind, Store};
use crate::vm::{launch, Event, Host, LaunchError, Launcher, Lifetime, Signals, VmHandle};

use super::{attach_and_follow, detach, session, Gate, PodmanError, Run, Timeline};

/// What to do with the clone.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Follow the container (in the foreground, or as a `-d` supervisor).
    Follow,
    /// Run this shell command in the container, then remove the clone.
    Exec(String),
}

/// Why a container clone failed. Everything made for it is gone again.
#[derive(Debug, thiserror::Error)]
pub enum ContainerCloneError {
    /// The snapshot, the name or the launch.
    #[error(transparent)]
    Clone(#[from] CloneError),
    /// Following the container failed.
    #[error(transparent)]
    Podman(#[from] PodmanError),
    /// `--exec` failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The snapshot is not of a container VM.
    #[error("snapshot {0} is not of a container VM (`fcvm podman run`)")]
    NotContainer(String),
    /// The restored agent never said it was back.
    #[error("the clone's agent did not report within {} s after the restore (set {} to wait longer); the clone was removed; last console lines:\n{console}", waited.as_secs(), super::AGENT_TIMEOUT_ENV)]
    AgentSilent {
        /// How long it was given (`super::agent_timeout`).
        waited: Duration,
        /// Console tail.
        console: String,
    },
    /// The container or the VM ended before `--exec` could run.
    #[error(
        "the clone's container ended before the command could run ({0}); the clone was removed"
    )]
    Ended(String),
    /// Interrupted while waiting.
    #[error("interrupted by signal {0}; the clone was removed")]
    Interrupted(i32),
}

impl ContainerCloneError {
    /// Exit code: the guest's refusal of a command follows podman (126/127); everything
    /// else is fcvm's own failure (125).
    pub fn exit_code(&self) -> u8 {
        match self {
            ContainerCloneError::Exec(e) => e.exit_code(),
            _ => super::EXIT_FCVM_FAILED,
        }
    }
}

/// Whether snapshot `tag` is of a container VM (its clones run through this module).
pub fn is_container_snapshot(
    paths: &Paths,
    tag: &str,
) -> Result<bool, crate::snapshot::StoreError> {
    let meta = SnapshotStore::open(paths)?.get(tag)?;
    // Only container VMs (and their clones) run the agent.
    Ok(meta.guest == GuestKind::Agent)
}

/// Restore a clone of container snapshot `req.tag` and run it as `mode` says; returns the
/// exit code (the container's, or the command's).
pub async fn run(
    paths: &Paths,
    req: &CloneRequest,
    mode: Mode,
    mut signals: Signals,
) -> Result<i32, ContainerCloneError> {
    let snapshots = SnapshotStore::open(paths).map_err(CloneError::from)?;
    let meta = snapshots.get(&req.tag).map_err(CloneError::from)?;
    if meta.guest != GuestKind::Agent {
        return Err(ContainerCloneError::NotContainer(req.tag.clone()));
    }
    let firecracker = binary::find(Program::Firecracker, paths).map_err(CloneError::from)?;
    let launcher = Launcher::for_host(paths, firecracker.path)
        .map_err(|e| CloneError::from(LaunchError::from(e)))?;
    let mut spec = clone_spec(paths, req, &meta, &snapshots.path(&req.tag), launcher)?;
    // This process (or the -d supervisor) owns the clone, as `podman run` owns its VM.
    spec.lifetime = Lifetime::Foreground;
    spec.log_dir = Some(paths.log_dir(&spec.id));
    let host = Host::new(Store::open(paths).map_err(CloneError::from)?);
    let mut vm = launch(&host, spec).await.map_err(CloneError::from)?;
    let name = vm.record().name.clone();
    tracing::info!("clone {name} of {} configured", req.tag);
    match mode {
        Mode::Follow => {
            let detached = detach::Notifier::from_env().map(std::sync::Mutex::new);
            let plan = Plan::new(ImageSource::registry(String::new()));
            let image = format!("snapshot:{}", req.tag);
            let run = Run {
                name: &name,
                plan: &plan,
                image: &image,
                stop_timeout: Duration::ZERO,
                log_max_bytes: crate::logs::parse_log_opts(&[]).map_err(PodmanError::from)?,
                detached: detached.as_ref(),
                volumes: &[],
            };
            let mut timeline = Timeline::new();
            let result = attach_and_follow(
                &mut vm,
                paths,
                &run,
                &mut timeline,
                &mut signals,
                &mut Gate::Cold,
            )
            .await;
            // A detached clone is kept as exited (its code and log) until `fcvm rm`, as a
            // detached container is; a foreground one leaves nothing.
            let how = match &result {
                Ok(_) if detached.is_some() => Disposition::Exited,
                _ => Disposition::Forget,
            };
            vm.finish(how).warn();
            Ok(result?.exit_code)
        }
        Mode::Exec(cmd) => {
            let result = exec_in(paths, &mut vm, &cmd, &mut signals).await;
            vm.kill();
            let _ = vm.wait_exit(Duration::from_secs(5)).await;
            vm.finish(Disposition::Forget).warn();
            result
        }
    }
}

/// Resume the clone, wait for its agent's Ready, run `cmd` in its container.
async fn exec_in(
    paths: &Paths,
    vm: &mut VmHandle,
    cmd: &str,
    signals: &mut Signals,
) -> Result<i32, ContainerCloneError> {
    let uds = vm.paths().vsock_socket();
    let listeners = session::Listeners::bind(&uds, false).map_err(PodmanError::from)?;
    // The container's own output is not this command's: it is dropped.
    let mut session = session::Session::start(
        listeners,
        session::InputMode {
            stdin: false,
            resize: false,
            remote: None,
        },
        session::OutputSink {
            terminal: false,
            log: None,
            attached: None,
        },
    );
    vm.start().await.map_err(PodmanError::from)?;
    // How long a restored clone's agent has to reconnect and report Ready before `--exec`
    // gives up.
    let waited = super::agent_timeout();
    let deadline = tokio::time::sleep(waited);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            st = session.status.recv() => match st {
                Some(Status::Reconnected) => session.send_resync().await,
                Some(Status::Ready) => break,
                Some(Status::Exit(code)) => {
                    return Err(ContainerCloneError::Ended(format!("exit code {code}")))
                }
                Some(other) => tracing::debug!("clone agent: {other:?}"),
                None => return Err(ContainerCloneError::Ended("the agent went away".into())),
            },
            ev = vm.next_event(signals) => match ev {
                Event::Signal(sig) => return Err(ContainerCloneError::Interrupted(sig)),
                Event::Exited(_) | Event::MemorySourceLost(_) => {
                    return Err(ContainerCloneError::Ended("the VM stopped".into()))
                }
            },
            _ = &mut deadline => {
                return Err(ContainerCloneError::AgentSilent {
                    waited,
                    console: crate::vm::spawn::tail(&vm.paths().console_log(), 15),
                })
            }
        }
    }
    let opts = ExecOptions {
        target: Target::Name(vm.record().name.to_string()),
        in_vm: false,
        interactive: false,
        tty: false,
        env: Vec::new(),
        workdir: None,
        command: vec!["sh".into(), "-c".into(), cmd.to_owned()],
    };
    let code = exec::exec(paths, &opts).await?;
    drop(session);
    Ok(code)
}
