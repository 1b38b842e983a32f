//! `fcvm podman run`: one container in a new microVM, in the foreground.
//!
//! Order of work, so that bad input never leaves anything behind:
//!
//! 1. Check every argument and find every input (VMM, kernel, rootfs, agent initrd, image):
//!    nothing is created yet.
//! 2. Claim the name in the state store, with the cleanup steps recorded up front.
//! 3. Copy the rootfs for this VM (reflink where possible), bind the vsock listeners,
//!    start the VMM (it dies with fcvm), configure it, put the plan in MMDS, boot.
//! 4. Relay the container's output and input until the agent reports the exit code; on
//!    SIGINT/SIGTERM ask the guest to stop the container (Ctrl+Alt+Del: SIGTERM to the
//!    container, a second one kills it), and stop the VM by force if it does not end.
//! 5. Undo everything recorded and forget the VM.

pub mod image;
pub mod machine;
pub mod plan;
pub mod session;
pub mod tty;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fcvm_proto::status::Status;
use tokio::signal::unix::{signal, SignalKind};

use crate::cleanup::CleanupStep;
use crate::firecracker::models::{ActionType, Drive, MmdsConfig, NetworkInterface, Vsock};
use crate::firecracker::TransportError;
use crate::names::{Name, NameError};
use crate::paths::{Paths, VmPaths};
use crate::state::{new_vm_id, Health, Store, StoreError, VmKind, VmRecord, VmStatus};
use crate::vm::config::{validate_sizing, SizingError};
use crate::vm::spawn::{tail, SpawnError};
use crate::vm::{spawn_vmm, SpawnOptions, SpawnedVmm, VmConfig};
use crate::vsock::VsockError;
pub use machine::VmmKind;

/// Kernel command line of container VMs (the agent mounts `/dev/vda` itself).
pub const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw";

/// Environment variable: when set, fcvm prints step timings (and the agent's console lines)
/// to stderr at the end of a run, as `fcvm-timing` lines. Used by the benchmark.
pub const TIMINGS_ENV: &str = "FCVM_PODMAN_TIMINGS";

/// After the first Ctrl+Alt+Del, how long the container gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// After the kill, how long the VM gets to power off before the VMM is killed.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long output may trail the exit status.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct PodmanRunRequest {
    /// VM name.
    pub name: String,
    /// Image reference (optional with `image_archive`).
    pub image: Option<String>,
    /// `--image-archive`.
    pub image_archive: Option<PathBuf>,
    /// Trailing command.
    pub command: Vec<String>,
    /// `--cmd`.
    pub cmd: Option<String>,
    /// `--env` occurrences.
    pub env: Vec<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// `-i`.
    pub interactive: bool,
    /// `-t`.
    pub tty: bool,
    /// `--vmm`; automatic when `None`.
    pub vmm: Option<VmmKind>,
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--rootfs`.
    pub rootfs: Option<PathBuf>,
}

/// Why `fcvm podman run` failed.
#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    /// Bad name.
    #[error("invalid --name")]
    Name(#[from] NameError),
    /// Bad sizing.
    #[error(transparent)]
    Sizing(#[from] SizingError),
    /// Bad container arguments.
    #[error(transparent)]
    Args(#[from] plan::PlanArgsError),
    /// The plan is invalid (caught before booting).
    #[error("invalid container settings")]
    Plan(#[from] fcvm_proto::plan::PlanError),
    /// The image cannot be prepared.
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// A boot input is missing.
    #[error(transparent)]
    Machine(Box<machine::MachineError>),
    /// State store failure (includes name clashes).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Preparing the VM's files failed.
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        /// Where.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Listening for the guest failed.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The VMM did not start.
    #[error(transparent)]
    Spawn(Box<SpawnError>),
    /// The VMM refused the configuration or the boot.
    #[error("{source}\n(VMM log: {log})")]
    Api {
        /// Cause.
        source: TransportError,
        /// Log tail.
        log: String,
    },
    /// The VM ended without an exit status from the agent.
    #[error("the VM stopped before the container reported an exit status; last console lines:\n{console}")]
    VmEnded {
        /// Console tail.
        console: String,
    },
    /// Installing signal handlers failed.
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
}

impl From<machine::MachineError> for PodmanError {
    fn from(e: machine::MachineError) -> Self {
        PodmanError::Machine(Box::new(e))
    }
}

impl From<SpawnError> for PodmanError {
    fn from(e: SpawnError) -> Self {
        PodmanError::Spawn(Box::new(e))
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct PodmanOutcome {
    /// The container's exit code (125 when it could not be started).
    pub exit_code: i32,
    /// The agent's error, when the container could not be started.
    pub guest_error: Option<String>,
    /// The signal that interrupted fcvm (SIGINT or SIGTERM), if any.
    pub interrupted: Option<i32>,
    /// The notice printed when the VMM was chosen automatically.
    pub vmm: VmmKind,
}

/// Everything found in step 1.
struct Prepared {
    name: Name,
    vcpus: u8,
    mem_mib: u32,
    vmm: VmmKind,
    vmm_binary: PathBuf,
    kernel: PathBuf,
    rootfs: PathBuf,
    initrd: PathBuf,
    image: image::ResolvedImage,
    plan: fcvm_proto::plan::Plan,
}

/// Step timings for [`TIMINGS_ENV`].
struct Timeline {
    start: Instant,
    marks: Vec<(&'static str, Instant)>,
}

impl Timeline {
    fn new() -> Self {
        Timeline {
            start: Instant::now(),
            marks: Vec::new(),
        }
    }
    fn mark(&mut self, step: &'static str) {
        self.marks.push((step, Instant::now()));
    }
    fn at(&mut self, step: &'static str, when: Instant) {
        self.marks.push((step, when));
    }
    fn print(&self, console: &std::path::Path) {
        let mut marks = self.marks.clone();
        marks.sort_by_key(|m| m.1);
        for (step, t) in marks {
            eprintln!(
                "fcvm-timing host {step} {:.1}",
                t.duration_since(self.start).as_secs_f64() * 1000.0
            );
        }
        let text = std::fs::read_to_string(console).unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with("fc-agent [")) {
            eprintln!("fcvm-timing agent {line}");
        }
    }
}

/// Run the container described by `req` in the foreground. Notices go to stderr; the
/// container's stdout is the only thing written to stdout.
pub async fn run(paths: &Paths, req: &PodmanRunRequest) -> Result<PodmanOutcome, PodmanError> {
    let mut timeline = Timeline::new();
    // Registered first: from here on Ctrl-C is ours to handle, never a silent death.
    let mut sigint = signal(SignalKind::interrupt()).map_err(PodmanError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(PodmanError::Signals)?;

    let (vmm, notice) = machine::choose_vmm(req.vmm, paths);
    let prepared = prepare(paths, req, vmm)?;
    timeline.mark("checked");

    let store = Store::open(paths)?;
    let id = new_vm_id();
    let vm_paths = VmPaths::new(paths.vm_dir(&id));
    let mut record = VmRecord::new(
        id.clone(),
        prepared.name.clone(),
        VmKind::Container,
        vm_paths.dir().to_owned(),
    );
    record.vmm_kind = prepared.vmm.as_str().into();
    record.vcpus = prepared.vcpus;
    record.mem_mib = prepared.mem_mib;
    record.kernel = Some(prepared.kernel.clone());
    record.image = Some(prepared.image.display.clone());
    record.api_socket = Some(vm_paths.api_socket());
    record.console_log = Some(vm_paths.console_log());
    record.cleanup = vec![CleanupStep::RemoveDir {
        path: vm_paths.dir().to_owned(),
    }];
    store.create(&record)?;
    if let Some(n) = notice {
        eprintln!("{n}");
    }

    let result = boot_and_follow(
        &store,
        &record,
        &vm_paths,
        &prepared,
        &mut timeline,
        &mut sigint,
        &mut sigterm,
    )
    .await;
    if std::env::var_os(TIMINGS_ENV).is_some() {
        timeline.print(&vm_paths.console_log());
    }
    teardown(&store, &id);
    result
}

fn prepare(paths: &Paths, req: &PodmanRunRequest, vmm: VmmKind) -> Result<Prepared, PodmanError> {
    let name = Name::parse(&req.name)?;
    let (vcpus, mem_mib) = validate_sizing(req.vcpus, req.mem_mib)?;
    let env = plan::parse_env(&req.env)?;
    let cmd = plan::command(&req.command, req.cmd.as_deref())?;
    let image_req = image::classify(req.image.as_deref(), req.image_archive.as_deref())?;
    if let image::ImageRequest::Archive { file, .. } = &image_req {
        image::check_archive(file)?;
    }
    let vmm_binary = machine::vmm_binary(vmm, paths)?;
    let kernel = machine::guest_kernel(vmm, paths, req.kernel.as_deref())?;
    let rootfs = machine::guest_rootfs(paths, req.rootfs.as_deref())?;
    let initrd = machine::agent_initrd(paths)?;
    // Last: exporting a host image may take a while, so do it once the rest is known good.
    let image = image::resolve(paths, &image_req)?;
    let plan = plan::build(
        image.source.clone(),
        plan::PlanOptions {
            cmd,
            env,
            interactive: req.interactive,
            tty: req.tty,
            tty_size: if req.tty { tty::terminal_size() } else { None },
            hostname: Some(name.as_str().to_owned()),
        },
    );
    plan.validate()?;
    Ok(Prepared {
        name,
        vcpus,
        mem_mib,
        vmm,
        vmm_binary,
        kernel,
        rootfs,
        initrd,
        image,
        plan,
    })
}

fn prep_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> PodmanError + '_ {
    move |source| PodmanError::Prepare {
        path: path.to_owned(),
        source,
    }
}

/// A TAP name unique to this VM (at most 15 bytes). Firecracker creates it when it opens it
/// and it disappears with Firecracker; it carries MMDS to the guest.
fn tap_name(id: &str) -> String {
    format!("fcvm{}", &id[..id.len().min(11)])
}

#[allow(clippy::too_many_arguments)]
async fn boot_and_follow(
    store: &Store,
    record: &VmRecord,
    vm_paths: &VmPaths,
    p: &Prepared,
    timeline: &mut Timeline,
    sigint: &mut tokio::signal::unix::Signal,
    sigterm: &mut tokio::signal::unix::Signal,
) -> Result<PodmanOutcome, PodmanError> {
    std::fs::create_dir_all(vm_paths.dir()).map_err(prep_err(vm_paths.dir()))?;
    let disk = vm_paths.rootfs_disk();
    crate::storage::clone_file(&p.rootfs, &disk).map_err(prep_err(&disk))?;
    timeline.mark("rootfs-copied");

    let with_input = p.plan.interactive || p.plan.tty;
    let listeners = session::Listeners::bind(&vm_paths.vsock_socket(), with_input)?;

    let opts = SpawnOptions {
        binary: p.vmm_binary.clone(),
        id: record.id.clone(),
        vm_paths: vm_paths.clone(),
        netns: None,
        die_with_parent: true,
    };
    let mut vmm = spawn_vmm(&opts).await?;
    let process = vmm.process;
    store.update(&record.id, |r| {
        r.vmm = Some(process);
        r.cleanup.insert(0, CleanupStep::KillProcess { process });
    })?;
    timeline.mark("vmm-api-ready");

    // The VMM sees its runtime directory at the view path (see `paths::VMM_VIEW_DIR`).
    let view = VmPaths::vmm_view();
    let mut drives = vec![Drive {
        drive_id: "rootfs".into(),
        path_on_host: view.rootfs_disk().display().to_string(),
        is_root_device: true,
        is_read_only: false,
        ..Default::default()
    }];
    if let Some(archive) = &p.image.drive {
        drives.push(Drive {
            drive_id: "image".into(),
            path_on_host: archive.display().to_string(),
            is_root_device: false,
            is_read_only: true,
            ..Default::default()
        });
    }
    let config = VmConfig {
        vcpus: p.vcpus,
        mem_mib: p.mem_mib,
        track_dirty_pages: false,
        kernel: p.kernel.clone(),
        initrd: Some(p.initrd.clone()),
        boot_args: BOOT_ARGS.into(),
        drives,
        network: Some(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: tap_name(&record.id),
            guest_mac: None,
            ..Default::default()
        }),
        vsock: Some(Vsock {
            guest_cid: fcvm_proto::vsock::GUEST_CID,
            uds_path: view.vsock_socket().display().to_string(),
            ..Default::default()
        }),
        mmds: Some(MmdsConfig {
            version: "V2".into(),
            network_interfaces: vec!["eth0".into()],
            ipv4_address: None,
            imds_compat: None,
        }),
    };
    let api = |source| PodmanError::Api {
        source,
        log: tail(&vm_paths.firecracker_log(), 10),
    };
    config.apply(&vmm.client).await.map_err(api)?;
    vmm.client
        .put_mmds(&p.plan.mmds_document())
        .await
        .map_err(api)?;
    timeline.mark("configured");

    let raw = if p.plan.tty {
        tty::RawMode::enable().map_err(prep_err(std::path::Path::new("/dev/stdin")))?
    } else {
        None
    };
    let mut session = session::Session::start(
        listeners,
        session::InputMode {
            stdin: p.plan.interactive,
            resize: p.plan.tty,
        },
    );
    vmm.client.start().await.map_err(api)?;
    store.update(&record.id, |r| r.status = VmStatus::Running)?;
    timeline.mark("instance-started");

    let end = follow(
        store,
        record,
        &mut vmm,
        &mut session,
        timeline,
        sigint,
        sigterm,
    )
    .await;
    session.stop_input();
    // All output is written before fcvm exits: the agent closes the output stream first.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, &mut session.output).await;
    if let Some(t) = session.first_output.get() {
        timeline.at("first-output", *t);
    }
    drop(raw);
    timeline.mark("output-drained");
    wait_vmm_exit(&mut vmm, KILL_GRACE).await;
    timeline.mark("vmm-exited");

    let _ = store.update(&record.id, |r| {
        r.exit_code = end.exit_code;
        r.error = end.guest_error.clone();
    });
    match end.exit_code {
        Some(code) => Ok(PodmanOutcome {
            exit_code: code,
            guest_error: end.guest_error,
            interrupted: end.interrupted,
            vmm: p.vmm,
        }),
        None if end.interrupted.is_some() => Ok(PodmanOutcome {
            exit_code: 128 + end.interrupted.unwrap_or(0),
            guest_error: end.guest_error,
            interrupted: end.interrupted,
            vmm: p.vmm,
        }),
        None => Err(PodmanError::VmEnded {
            console: tail(&vm_paths.console_log(), 15),
        }),
    }
}

struct End {
    exit_code: Option<i32>,
    guest_error: Option<String>,
    interrupted: Option<i32>,
}

/// Wait for the container's exit status, handling signals and a VMM that dies.
async fn follow(
    store: &Store,
    record: &VmRecord,
    vmm: &mut SpawnedVmm,
    session: &mut session::Session,
    timeline: &mut Timeline,
    sigint: &mut tokio::signal::unix::Signal,
    sigterm: &mut tokio::signal::unix::Signal,
) -> End {
    let mut end = End {
        exit_code: None,
        guest_error: None,
        interrupted: None,
    };
    // Escalation after a signal: 1 = container asked to stop, 2 = killed, 3 = VMM killed.
    let mut stage = 0u8;
    let mut next_stage_at: Option<tokio::time::Instant> = None;
    let mut status_open = true;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        let mut escalate = false;
        tokio::select! {
            st = session.status.recv(), if status_open => match st {
                Some(Status::Ready) => {
                    timeline.mark("ready");
                    let _ = store.update(&record.id, |r| r.health = Health::Healthy);
                }
                Some(Status::Error(text)) => end.guest_error = Some(text),
                Some(Status::Exit(code)) => {
                    timeline.mark("exit-status");
                    end.exit_code = Some(code);
                    return end;
                }
                None => status_open = false,
            },
            _ = sigint.recv() => {
                end.interrupted.get_or_insert(libc::SIGINT);
                escalate = true;
            }
            _ = sigterm.recv() => {
                end.interrupted.get_or_insert(libc::SIGTERM);
                escalate = true;
            }
            _ = tick.tick() => {
                if matches!(vmm.child.try_wait(), Ok(Some(_))) {
                    return end;
                }
                if next_stage_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
                    escalate = true;
                }
            }
        }
        if escalate && stage < 3 {
            stage += 1;
            let wait = if stage < 3 {
                let _ = vmm.client.action(ActionType::SendCtrlAltDel).await;
                if stage == 1 {
                    STOP_GRACE
                } else {
                    KILL_GRACE
                }
            } else {
                let process = vmm.process;
                let _ =
                    tokio::task::spawn_blocking(move || process.terminate(Duration::from_secs(1)))
                        .await;
                KILL_GRACE
            };
            next_stage_at = Some(tokio::time::Instant::now() + wait);
        }
    }
}

async fn wait_vmm_exit(vmm: &mut SpawnedVmm, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !matches!(vmm.child.try_wait(), Ok(None)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = vmm.child.kill();
    let _ = vmm.child.wait();
}

/// Undo everything recorded for VM `id` and forget it (the record goes last, so a failed
/// step is retried by the next fcvm command's reaper).
fn teardown(store: &Store, id: &str) {
    let Ok(record) = store.update(id, |r| r.status = VmStatus::Stopping) else {
        return;
    };
    let failures = crate::cleanup::run_all(&record.cleanup);
    for f in &failures {
        eprintln!("fcvm: warning: {f}");
    }
    if failures.is_empty() {
        let _ = store.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifnamsiz() {
        assert_eq!(tap_name("0123456789abcdef"), "fcvm0123456789a");
        assert!(tap_name(&new_vm_id()).len() <= 15);
    }
}
