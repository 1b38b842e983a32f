//! `fcvm podman run`: one container in a new microVM, in the foreground.
//!
//! Order of work, so that bad input never leaves anything behind:
//!
//! 1. Check every argument and find every input (Firecracker, kernel, rootfs, agent
//!    initrd, image): nothing is created yet.
//! 2. Build a [`VmSpec`] (a private rootfs copy, the image archive read-only, vsock, MMDS
//!    with the plan) and [`launch()`] it: the one launch sequence shared with `fcvm run` and
//!    clones records, creates and configures the VM.
//! 3. Bind the vsock listeners, start relaying, boot.
//! 4. Relay the container's output and input until the agent reports the exit code; on
//!    SIGTERM/SIGHUP (and SIGINT without `-t`) ask the guest to stop the container
//!    (Ctrl+Alt+Del: SIGTERM to the container, a second one kills it), and stop the VM by
//!    force if it does not end. With `-t` but no `-i`, SIGINT is forwarded to the container.
//! 5. Tear down through the handle (`cleanup::teardown`).
//!
//! Between 1 and 2 the image cache decides whether the VM boots cold, boots and is
//! snapshotted once its image is loaded, or is restored from such a snapshot (see
//! [`cached`]).

pub mod attach;
pub mod cached;
pub mod clone;
pub mod detach;
pub mod env;
pub mod health;
pub mod image;
pub mod machine;
pub mod plan;
pub mod pull;
pub mod session;
pub mod tty;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fcvm_proto::cmdline::CmdlineBuilder;
use fcvm_proto::health::HealthState;
use fcvm_proto::status::Status;

use crate::cleanup::Disposition;
use crate::firecracker::models::MmdsVersion;
use crate::names::{Name, NameError};
use crate::network::NetworkAttachment;
use crate::paths::Paths;
use crate::state::{GuestKind, Health, Store, StoreError, VmKind};
use crate::vm::api::ApiCall;
use crate::vm::config::{validate_sizing, SizingError};
use crate::vm::spawn::tail;
use crate::vm::{
    launch, DriveSpec, Event, Host, LaunchError, Launcher, Mmds, Resources, Signals, Source,
    VmHandle, VmSpec,
};
use crate::vsock::VsockError;

/// Kernel command line of container VMs (the agent mounts `/dev/vda` itself). `quiet`: the
/// kernel's boot chatter costs a serial-port exit per byte, which adds seconds under nested
/// virtualization; warnings and panics still reach the console.
pub const BOOT_ARGS: &str = "console=ttyS0 quiet reboot=k panic=1 pci=off root=/dev/vda rw";

/// Environment variable: when set, fcvm prints step timings (and the agent's console lines)
/// to stderr at the end of a run, as `fcvm-timing` lines. Used by the benchmark.
pub const TIMINGS_ENV: &str = "FCVM_PODMAN_TIMINGS";

/// After the first Ctrl+Alt+Del, how long the container gets before it is killed, unless the
/// run says otherwise (`--stop-timeout`; podman's default too).
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// After the kill, how long the VM gets to power off before the VMM is killed.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// How long output may trail the exit status.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long output may trail a VM that ended without an exit status.
const NO_STATUS_DRAIN: Duration = Duration::from_millis(500);
/// Environment variable: seconds the guest agent has, from InstanceStart, to connect to the
/// status port (default [`AGENT_CONNECT_TIMEOUT`]).
pub const AGENT_TIMEOUT_ENV: &str = "FCVM_AGENT_TIMEOUT";
/// The agent connects once the guest kernel has booted and the root drive is mounted: about a
/// second on bare metal. Generous, because emulated and heavily loaded hosts are 10-50x slower.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(90);

/// Exit code of fcvm's own failures in the commands that forward a container's code
/// (podman's convention; 126: the command cannot be run, 127: not found).
pub const EXIT_FCVM_FAILED: u8 = 125;
/// The container was killed (SIGKILL), e.g. by a forced `fcvm stop`.
pub const EXIT_KILLED: i32 = 128 + libc::SIGKILL;

/// How many generated names are tried before giving up (each clash is a live VM that
/// drew the same name; with thousands of names and 16 bits of suffix, one retry is rare).
const NAME_ATTEMPTS: usize = 8;

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct PodmanRunRequest {
    /// VM name; generated when `None`.
    pub name: Option<String>,
    /// Image reference (optional with `image_archive`).
    pub image: Option<String>,
    /// `--image-archive`.
    pub image_archive: Option<PathBuf>,
    /// `--tls-verify` for a registry pull (None: not given, podman's default true).
    pub tls_verify: Option<bool>,
    /// Trailing command.
    pub command: Vec<String>,
    /// `--cmd`.
    pub cmd: Option<String>,
    /// `--env` occurrences.
    pub env: Vec<String>,
    /// `--env-file`s, read before `env`.
    pub env_files: Vec<PathBuf>,
    /// `--user`.
    pub user: Option<String>,
    /// `-w/--workdir`.
    pub workdir: Option<String>,
    /// `--entrypoint`.
    pub entrypoint: Option<String>,
    /// `--init`.
    pub init: bool,
    /// `--label` occurrences.
    pub labels: Vec<String>,
    /// `--privileged`.
    pub privileged: bool,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// `-i`.
    pub interactive: bool,
    /// `-t`.
    pub tty: bool,
    /// `--kernel` (a path, or `probe`).
    pub kernel: Option<PathBuf>,
    /// `--rootfs`.
    pub rootfs: Option<PathBuf>,
    /// `--stop-timeout`: from the request to stop (a signal to fcvm) to the kill. Zero means
    /// [`STOP_GRACE`] (so `Default` keeps podman's 10 s).
    pub stop_timeout: Duration,
    /// `--no-snapshot`: boot cold, neither using nor creating an image cache entry.
    pub no_snapshot: bool,
    /// `--health-check` and its settings, unchecked.
    pub health: Option<health::HealthRequest>,
    /// `--network`.
    pub network: NetworkRequest,
    /// `--publish` occurrences.
    pub publish: Vec<String>,
    /// `--rm`: forget the VM (record and logs) when the container exits; otherwise it is
    /// kept as exited until `fcvm rm`.
    pub remove: bool,
    /// `--log-opt` occurrences.
    pub log_opts: Vec<String>,
    /// This process is a detached run's supervisor (`-d`; see [`detach`]).
    pub detached: bool,
    /// `--map` and `-v` items, unchecked.
    pub volumes: Vec<String>,
}

use crate::network::args::PreparedNetwork;
pub use crate::network::args::{NetworkArgsError, NetworkRequest};

/// Why `fcvm podman run` failed.
#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    /// `-i -t` without a terminal on standard input.
    #[error(transparent)]
    Tty(#[from] tty::TtyError),
    /// Bad name.
    #[error("invalid --name")]
    Name(#[from] NameError),
    /// Bad sizing.
    #[error(transparent)]
    Sizing(#[from] SizingError),
    /// Bad container arguments.
    #[error(transparent)]
    Args(#[from] plan::PlanArgsError),
    /// Bad network arguments.
    #[error(transparent)]
    Network(#[from] NetworkArgsError),
    /// Bad health check arguments.
    #[error(transparent)]
    Health(#[from] health::HealthArgsError),
    /// A bad `--map` / `-v` item.
    #[error(transparent)]
    Volume(#[from] crate::volume::MapError),
    /// A volume cannot be served.
    #[error(transparent)]
    Serve(#[from] crate::volume::server::ServeError),
    /// The plan is invalid (caught before booting).
    #[error("invalid container settings")]
    Plan(#[from] fcvm_proto::plan::PlanError),
    /// Bad `--log-opt`.
    #[error(transparent)]
    LogOpt(#[from] crate::logs::LogOptError),
    /// The kernel command line cannot be built.
    #[error(transparent)]
    Cmdline(#[from] fcvm_proto::cmdline::BuildError),
    /// The image cannot be prepared.
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// A boot input is missing.
    #[error(transparent)]
    Machine(Box<machine::MachineError>),
    /// State store failure (includes name clashes).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Listening for the guest failed.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The VM could not be launched or booted.
    #[error(transparent)]
    Launch(Box<LaunchError>),
    /// The terminal could not be put in raw mode.
    #[error("cannot set the terminal to raw mode")]
    Terminal(#[source] std::io::Error),
    /// The guest never started the agent (wrong kernel, initrd or command line, or a boot
    /// that hangs): the VM was stopped.
    #[error("the guest agent did not connect within {} s (set {AGENT_TIMEOUT_ENV} to wait longer); the VM was stopped; last console lines:\n{console}", after.as_secs())]
    AgentSilent {
        /// How long fcvm waited.
        after: Duration,
        /// Console tail.
        console: String,
    },
    /// The VM ended without an exit status from the agent.
    #[error("the VM stopped before the container reported an exit status; last console lines:\n{console}")]
    VmEnded {
        /// Console tail.
        console: String,
    },
    /// Installing signal handlers failed.
    #[error("cannot handle signals")]
    Signals(#[source] std::io::Error),
    /// A cache entry did not restore into a working VM (that VM is gone again; the run
    /// falls back to a cold boot, so this never reaches the user).
    #[error("the cache entry did not restore: {why}")]
    CacheRestore {
        /// What went wrong.
        why: String,
    },
}

impl PodmanError {
    /// Exit code: every failure of fcvm itself is 125, so it never looks like the
    /// container's own code.
    pub fn exit_code(&self) -> u8 {
        EXIT_FCVM_FAILED
    }
}

impl From<machine::MachineError> for PodmanError {
    fn from(e: machine::MachineError) -> Self {
        PodmanError::Machine(Box::new(e))
    }
}

impl From<LaunchError> for PodmanError {
    fn from(e: LaunchError) -> Self {
        PodmanError::Launch(Box::new(e))
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct PodmanOutcome {
    /// The VM's name (given or generated).
    pub name: Name,
    /// The container's exit code (125 when it could not be started; 137 when it was
    /// killed, as podman reports).
    pub exit_code: i32,
    /// The agent's error, when the container could not be started.
    pub guest_error: Option<String>,
    /// The signal that interrupted fcvm (SIGINT, SIGTERM or SIGHUP), if any.
    pub interrupted: Option<i32>,
}

/// Everything found in step 1.
struct Prepared {
    name: Name,
    vcpus: u8,
    mem_mib: u32,
    launcher: Launcher,
    kernel: PathBuf,
    rootfs: PathBuf,
    initrd: PathBuf,
    image: image::ResolvedImage,
    plan: fcvm_proto::plan::Plan,
    cmdline: String,
    stop_timeout: Duration,
    network: PreparedNetwork,
    /// Bound of each container log file.
    log_max_bytes: u64,
    /// The pipe to a waiting `podman run -d` (this process is its supervisor).
    detached: Option<std::sync::Mutex<detach::Notifier>>,
    volumes: Vec<crate::volume::VolumeSpec>,
}

/// Step timings for [`TIMINGS_ENV`]; each step is also a debug log line.
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
        self.at(step, Instant::now());
    }
    fn at(&mut self, step: &'static str, when: Instant) {
        tracing::debug!(
            "podman run: {step} at {:.1} ms",
            when.duration_since(self.start).as_secs_f64() * 1000.0
        );
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
    // Registered first: from here on a signal is ours to handle, never a silent death.
    let mut signals = Signals::new().map_err(PodmanError::Signals)?;
    // A detached run's terminal is the one `fcvm attach` brings, not this standard input.
    if !req.detached {
        tty::check_request(req.interactive, req.tty, tty::stdin_is_terminal())?;
    }
    let mut prepared = prepare(paths, req)?;
    timeline.mark("checked");

    let host = Host::new(Store::open(paths)?);
    let mut decision = cached::decide(paths, req.no_snapshot, &prepared);
    // A startup entry that fails to restore falls back to its base entry, which may fail too.
    for _ in 0..2 {
        let (entry, startup) = match decision {
            cached::Decision::Hit(e) => (e, false),
            cached::Decision::Startup(e) => (e, true),
            other => {
                decision = other;
                break;
            }
        };
        let key = entry.key.clone();
        match run_hit(
            &host,
            paths,
            req,
            &prepared,
            Restore { entry, startup },
            &mut timeline,
            &mut signals,
        )
        .await
        {
            Err(PodmanError::CacheRestore { why }) => {
                eprintln!(
                    "fcvm: warning: cache entry {} failed to restore ({why}); removed it, booting {}",
                    cached::short(&key),
                    if startup { "from the image's entry or cold" } else { "cold" }
                );
                cached::discard(paths, &key);
                decision = cached::decide(paths, req.no_snapshot, &prepared);
            }
            other => return other,
        }
    }
    let mut gate = match decision {
        cached::Decision::Create(c) => Gate::Create(Box::new(c)),
        cached::Decision::Cold(why) => {
            eprintln!("fcvm: cold ({why})");
            Gate::Cold
        }
        // Restores failed twice in a row: do not loop.
        cached::Decision::Hit(_) | cached::Decision::Startup(_) => {
            eprintln!("fcvm: cold (the cache entry cannot be used)");
            Gate::Cold
        }
    };
    // The store claims names atomically: a generated name another VM holds is drawn again.
    let mut attempts = 1;
    let mut vm = loop {
        match launch(
            &host,
            with_log_dir(paths, spec_for(paths, &prepared, &gate)),
        )
        .await
        {
            Err(LaunchError::Store(
                StoreError::NameTaken { .. } | StoreError::NameTakenByExited { .. },
            )) if req.name.is_none() && attempts < NAME_ATTEMPTS => {
                attempts += 1;
                prepared.set_name(crate::names::generate());
            }
            launched => break launched?,
        }
    };
    tracing::info!("VM {}", prepared.name);
    timeline.mark("configured");
    let result = attach_and_follow(
        &mut vm,
        paths,
        &prepared.run(),
        &mut timeline,
        &mut signals,
        &mut gate,
    )
    .await;
    if std::env::var_os(TIMINGS_ENV).is_some() {
        timeline.print(&vm.paths().console_log());
    }
    vm.finish(disposition(req, &result)).warn();
    result
}

/// What becomes of the record: a container that ran is kept as exited (its code and logs)
/// unless the run said `--rm`; a run that failed is forgotten (its error was reported),
/// as is one whose container could not be created (podman keeps no container of a failed
/// pull either).
fn disposition(req: &PodmanRunRequest, result: &Result<PodmanOutcome, PodmanError>) -> Disposition {
    match result {
        // The agent's error: the container never existed (a pull or load that failed).
        Ok(o) if !req.remove && o.guest_error.is_none() => Disposition::Exited,
        _ => Disposition::Forget,
    }
}

/// What following a running container needs, whether it booted, came from the image cache
/// or is a clone of a container snapshot.
pub(crate) struct Run<'a> {
    pub name: &'a Name,
    pub plan: &'a fcvm_proto::plan::Plan,
    /// The image, as `fcvm ls` shows it.
    pub image: &'a str,
    pub stop_timeout: Duration,
    pub log_max_bytes: u64,
    /// The pipe to a waiting `-d` command (this process is its supervisor).
    pub detached: Option<&'a std::sync::Mutex<detach::Notifier>>,
    pub volumes: &'a [crate::volume::VolumeSpec],
}

impl Prepared {
    fn run(&self) -> Run<'_> {
        Run {
            name: &self.name,
            plan: &self.plan,
            image: &self.image.display,
            stop_timeout: self.stop_timeout,
            log_max_bytes: self.log_max_bytes,
            detached: self.detached.as_ref(),
            volumes: &self.volumes,
        }
    }

    /// Another name for the VM, and so for the guest's hostname.
    fn set_name(&mut self, name: Name) {
        self.plan.hostname = Some(name.as_str().to_owned());
        self.name = name;
    }
}

/// The cache entry a run restores.
struct Restore {
    entry: crate::snapshot::cache::Entry,
    /// A startup-tier entry (its container runs already).
    startup: bool,
}

/// A cache hit: restore the entry, hand the agent this run's plan, follow the container.
async fn run_hit(
    host: &Host,
    paths: &Paths,
    req: &PodmanRunRequest,
    p: &Prepared,
    restore: Restore,
    timeline: &mut Timeline,
    signals: &mut Signals,
) -> Result<PodmanOutcome, PodmanError> {
    let Restore { entry, startup } = restore;
    let key = entry.key.clone();
    let mut vm = launch(
        host,
        with_log_dir(paths, cached::hit_spec(paths, p, &entry)),
    )
    .await
    .map_err(|e| PodmanError::CacheRestore {
        why: crate::report::chain(&e),
    })?;
    timeline.mark("restored");
    let mut gate = Gate::Restored {
        key: key.clone(),
        deadline: tokio::time::Instant::now() + agent_timeout(),
        ready: false,
        startup,
    };
    let result = attach_and_follow(&mut vm, paths, &p.run(), timeline, signals, &mut gate).await;
    if std::env::var_os(TIMINGS_ENV).is_some() {
        timeline.print(&vm.paths().console_log());
    }
    let how = match &result {
        // Falls back to a cold boot: this VM is not what the user sees.
        Err(PodmanError::CacheRestore { .. }) => Disposition::Forget,
        other => disposition(req, other),
    };
    vm.finish(how).warn();
    // Held for the whole run: prune skips an entry in use.
    drop(entry);
    if result.is_ok() {
        cached::touch(paths, &key);
    }
    result
}

/// What the image cache does in this run, as the status messages see it.
enum Gate {
    /// Nothing: the plan does not ask the agent to wait.
    Cold,
    /// Snapshot at ImageReady.
    Create(Box<cached::Creator>),
    /// A restored VM: its agent must report ImageReady (Ready for a startup-tier entry,
    /// `startup`) before `deadline`.
    Restored {
        key: String,
        deadline: tokio::time::Instant,
        ready: bool,
        startup: bool,
    },
}

/// The container's log directory, kept with the record beyond the VM.
fn with_log_dir(paths: &Paths, mut spec: VmSpec) -> VmSpec {
    spec.log_dir = Some(paths.log_dir(&spec.id));
    spec
}

fn prepare(paths: &Paths, req: &PodmanRunRequest) -> Result<Prepared, PodmanError> {
    let log_max_bytes = crate::logs::parse_log_opts(&req.log_opts)?;
    let health_check = req.health.as_ref().map(health::parse).transpose()?;
    let name = match &req.name {
        Some(n) => Name::parse(n)?,
        None => crate::names::generate(),
    };
    let (vcpus, mem_mib) = validate_sizing(req.vcpus, req.mem_mib)?;
    let env = env::container_env(&req.env_files, &req.env, &env::ProcessEnv)
        .map_err(plan::PlanArgsError::from)?;
    let network = crate::network::args::prepare(req.network, &req.publish)?;
    let volumes = crate::volume::parse_maps(&req.volumes)?;
    let cmd = plan::command(&req.command, req.cmd.as_deref())?;
    let user = plan::user(req.user.as_deref())?;
    let workdir = plan::workdir(req.workdir.as_deref())?;
    let labels = plan::parse_labels(&req.labels)?;
    let image_req = image::classify(
        req.image.as_deref(),
        req.image_archive.as_deref(),
        req.tls_verify,
    )?;
    if let image::ImageRequest::Archive { file, .. } = &image_req {
        image::check_archive(file)?;
    }
    let launcher = machine::launcher(paths)?;
    let kernel = machine::guest_kernel(paths, req.kernel.as_deref())?;
    let rootfs = machine::guest_rootfs(paths, req.rootfs.as_deref())?;
    let initrd = machine::agent_initrd(paths)?;
    tracing::debug!(
        firecracker = %launcher.firecracker().display(),
        kernel = %kernel.display(),
        rootfs = %rootfs.display(),
        initrd = %initrd.display(),
        "podman run: boot inputs found"
    );
    // Last: exporting a host image may take a while, so do it once the rest is known good.
    let image = image::resolve(paths, &image_req)?;
    let mut plan = plan::build(
        image.source.clone(),
        plan::PlanOptions {
            cmd,
            env,
            interactive: req.interactive,
            tty: req.tty,
            tty_size: if req.tty { tty::terminal_size() } else { None },
            hostname: Some(name.as_str().to_owned()),
            user,
            workdir,
            entrypoint: req.entrypoint.clone(),
            init: req.init,
            labels,
            privileged: req.privileged,
            proxy: fcvm_proto::plan::proxy_settings(env::HostEnv::all(&env::ProcessEnv)),
        },
    );
    plan.volumes = volumes.iter().map(|v| v.plan_volume()).collect();
    plan.health_check = health_check;
    plan.validate()?;
    // The root device is the first drive `spec_for` attaches.
    let cmdline = CmdlineBuilder::parse(BOOT_ARGS)
        .root(fcvm_proto::cmdline::ROOT_DEVICE)
        .build()?;
    Ok(Prepared {
        name,
        vcpus,
        mem_mib,
        launcher,
        kernel,
        rootfs,
        initrd,
        image,
        plan,
        cmdline,
        stop_timeout: req.stop_timeout,
        network,
        log_max_bytes,
        detached: if req.detached {
            detach::Notifier::from_env().map(std::sync::Mutex::new)
        } else {
            None
        },
        volumes,
    })
}

/// The container VM: a private copy of the rootfs, the image archive read-only, a TAP the
/// VMM makes itself (it carries MMDS), the vsock, and the plan in MMDS. A VM that creates
/// a cache entry has its TAP in a namespace of its own instead (so its restores can have
/// the same), and its plan makes the agent wait for the snapshot.
fn spec_for(paths: &Paths, p: &Prepared, gate: &Gate) -> VmSpec {
    let mut spec = VmSpec::new(
        paths,
        p.name.clone(),
        VmKind::Container,
        Resources {
            vcpus: p.vcpus,
            mem_mib: p.mem_mib,
            // A run that creates the cache entry and may then take its startup tier tracks
            // dirty pages from its boot: the startup tier is a Diff onto the entry.
            track_dirty_pages: matches!(gate, Gate::Create(_))
                && crate::snapshot::cache::StartupInputs::of("", &p.plan).is_ok(),
        },
        Source::Boot {
            kernel: p.kernel.clone(),
            initrd: Some(p.initrd.clone()),
            cmdline: p.cmdline.clone(),
        },
        p.launcher.clone(),
    );
    spec.guest = GuestKind::Agent;
    spec.labels.image = Some(p.image.display.clone());
    spec.drives.push(DriveSpec {
        id: "rootfs".into(),
        file: p.rootfs.clone(),
        copy_to: Some(crate::paths::ROOTFS_DISK.into()),
        root: true,
        read_only: false,
    });
    if let Some(archive) = &p.image.drive {
        spec.drives.push(DriveSpec {
            id: "image".into(),
            file: archive.clone(),
            copy_to: None,
            root: false,
            read_only: true,
        });
    }
    let mut plan = p.plan.clone();
    if matches!(gate, Gate::Create(_)) {
        plan.await_proceed = true;
    }
    // A floor for the guest's clock: MMDS is written before the VM starts, so the guest is
    // at least this late (plus its uptime); a guest clock behind it is moved forward.
    plan.host_time_ns = plan::host_time_ns();
    spec.network = match (&p.network, gate) {
        (PreparedNetwork::None, Gate::Create(_)) => cached::network(&spec.id),
        (PreparedNetwork::None, _) => NetworkAttachment::vmm_tap(&spec.id),
        // Slot 0 until launch takes a free one under the store lock.
        (PreparedNetwork::Bridged { dns, publish }, _) => {
            NetworkAttachment::Bridged(crate::network::bridged::BridgedNet::new(
                &spec.id,
                0,
                crate::network::DEFAULT_TAP,
                dns.clone(),
                publish.clone(),
            ))
        }
    };
    spec.vsock = true;
    spec.mmds = Some(Mmds {
        version: MmdsVersion::V2,
        data: plan.mmds_document(),
    });
    spec
}

async fn attach_and_follow(
    vm: &mut VmHandle,
    paths: &Paths,
    p: &Run<'_>,
    timeline: &mut Timeline,
    signals: &mut Signals,
    gate: &mut Gate,
) -> Result<PodmanOutcome, PodmanError> {
    let with_input = p.plan.interactive || p.plan.tty;
    let _ = vm.update(|r| r.health = Health::Starting);
    let listeners = session::Listeners::bind(&vm.paths().vsock_socket(), with_input)?;
    // Held until this function returns, which is after the VMM has exited.
    let _volumes = crate::volume::server::VolumeServers::start(
        &vm.paths().vsock_socket(),
        p.volumes,
        crate::volume::server::ServeOptions::from_env(),
    )?;
    // Raw only with -i -t: without -i, Ctrl-C stays a signal here and is forwarded.
    let raw = if p.plan.tty && p.plan.interactive && p.detached.is_none() {
        tty::RawMode::enable().map_err(PodmanError::Terminal)?
    } else {
        None
    };
    let log_dir = paths.log_dir(&vm.spec().id);
    let log = match crate::logs::LogWriter::create(&log_dir, p.log_max_bytes) {
        Ok(w) => Some(w),
        Err(e) => {
            eprintln!(
                "fcvm: warning: cannot keep the container's log in {} ({e}); `fcvm logs` will show nothing",
                log_dir.display()
            );
            None
        }
    };
    // A detached run with -i/-t takes its input from `fcvm attach` clients instead.
    let (hub, remote) = if p.detached.is_some() && with_input {
        let socket = attach::socket_path(vm.paths().dir());
        let listener = tokio::net::UnixListener::bind(&socket).map_err(|e| {
            PodmanError::Vsock(VsockError::Bind {
                path: socket.clone(),
                source: e,
            })
        })?;
        let hub = std::sync::Arc::new(attach::AttachHub::default());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        attach::serve(listener, hub.clone(), tx);
        (Some(hub), Some(rx))
    } else {
        (None, None)
    };
    let local = p.detached.is_none();
    let mut session = session::Session::start(
        listeners,
        session::InputMode {
            stdin: p.plan.interactive && local,
            resize: p.plan.tty && local,
            remote,
        },
        session::OutputSink {
            terminal: local,
            log,
            attached: hub.clone(),
        },
    );
    vm.start().await?;
    timeline.mark("instance-started");

    let end = follow(vm, &mut session, paths, p, timeline, signals, gate).await;
    if let Some(why) = end.restore_failed {
        vm.kill();
        return Err(PodmanError::CacheRestore { why });
    }
    session.stop_input();
    // All output is written before fcvm exits: the agent ends the output stream first. A VM
    // that ended without an exit status sends no end marker: what came is all there is.
    let drain = if end.exit_code.is_some() {
        DRAIN_TIMEOUT
    } else {
        NO_STATUS_DRAIN
    };
    let _ = tokio::time::timeout(drain, &mut session.output).await;
    // All output relayed: an attached terminal learns the end (`fcvm attach` exits with it).
    if let Some(hub) = &hub {
        let code = exit_code(end.exit_code, end.interrupted, vm.stopped_elsewhere())
            .unwrap_or(EXIT_FCVM_FAILED.into());
        hub.send(&fcvm_proto::frame::Frame::Exit(code)).await;
    }
    if let Some(t) = session.first_output.get() {
        timeline.at("first-output", *t);
    }
    drop(raw);
    timeline.mark("output-drained");
    if vm.wait_exit(KILL_GRACE).await.is_none() {
        vm.kill();
    }
    timeline.mark("vmm-exited");

    if let Some(after) = end.agent_silent {
        return Err(PodmanError::AgentSilent {
            after,
            console: tail(&vm.paths().console_log(), 15),
        });
    }
    let stopped = vm.stopped_elsewhere();
    let _ = vm.update(|r| {
        r.exit_code = end.exit_code;
        r.error = end.guest_error.clone();
    });
    match exit_code(end.exit_code, end.interrupted, stopped) {
        Some(code) => Ok(PodmanOutcome {
            name: p.name.clone(),
            exit_code: code,
            guest_error: end.guest_error,
            interrupted: end.interrupted,
        }),
        None => Err(PodmanError::VmEnded {
            console: ended_console(&vm.paths().console_log()),
        }),
    }
}

/// The console's last lines for a VM that ended on its own, led by the kernel's panic line
/// when there is one: a panic's register dump alone fills the tail and hides why.
fn ended_console(console: &std::path::Path) -> String {
    let last = tail(console, 15);
    let text = std::fs::read_to_string(console).unwrap_or_default();
    match text.lines().rev().find(|l| l.contains("Kernel panic")) {
        Some(panic) if !last.contains(panic) => format!("{}\n...\n{last}", panic.trim()),
        _ => last,
    }
}

/// The code `podman run` exits with: the container's; else, when fcvm was interrupted,
/// 128 + the signal; else, when `fcvm stop` forced the VM down, 137 (killed), as podman
/// reports for a container stopped by SIGKILL. None: the VM died on its own.
pub fn exit_code(container: Option<i32>, interrupted: Option<i32>, stopped: bool) -> Option<i32> {
    match (container, interrupted) {
        (Some(code), _) => Some(code),
        (None, Some(sig)) => Some(128 + sig),
        (None, None) if stopped => Some(EXIT_KILLED),
        (None, None) => None,
    }
}

/// The agent has the image loaded and waits: snapshot it for the cache when this run creates
/// the entry, then send the run's plan.
async fn image_ready(
    vm: &VmHandle,
    session: &session::Session,
    paths: &Paths,
    p: &Run<'_>,
    timeline: &mut Timeline,
    gate: &mut Gate,
    digest: &str,
) {
    timeline.mark("image-ready");
    match gate {
        Gate::Create(creator) if !creator.done() => {
            let t = Instant::now();
            let name = vm.record().name.to_string();
            match creator.snapshot(paths, &name, p.image, digest).await {
                Ok(out) => eprintln!(
                    "fcvm: cache created (entry {}, {} MiB, VM paused {} ms, {:.1} s in all)",
                    cached::short(&creator.key),
                    out.meta.memory_allocated_bytes >> 20,
                    out.paused_for.as_millis(),
                    t.elapsed().as_secs_f64()
                ),
                Err(e) => eprintln!(
                    "fcvm: warning: the cache snapshot failed ({}); the container runs without it",
                    cached::failure(paths, &e)
                ),
            }
            timeline.mark("cache-snapshot");
        }
        Gate::Restored { key, ready, .. } if !*ready => {
            *ready = true;
            eprintln!("fcvm: cache hit (entry {})", cached::short(key));
        }
        _ => {}
    }
    // Stamped now: the guest's clock is set to this time and its CRNG reseeded with these
    // bytes before the container starts (a restored guest has the snapshot's). Sent over the
    // vsock only, never logged or stored.
    let go = plan::proceed(p.plan);
    if let Err(e) = session.send_status(&Status::Proceed(Box::new(go))).await {
        tracing::warn!(
            "cannot send the plan to the agent: {}",
            crate::report::chain(&e)
        );
    }
}

/// The health check passed for the first time: snapshot the warm application as the
/// startup tier of the entry this run created (a Diff onto it) or restored (Full).
async fn startup_tier(
    vm: &VmHandle,
    p: &Run<'_>,
    paths: &Paths,
    gate: &Gate,
    timeline: &mut Timeline,
) {
    let (base, diff) = match gate {
        Gate::Create(c) if c.published => (c.key.clone(), true),
        Gate::Restored {
            key,
            startup: false,
            ready: true,
            ..
        } => (key.clone(), false),
        _ => return,
    };
    let t = Instant::now();
    let name = vm.record().name.to_string();
    match cached::snapshot_startup(paths, &name, &base, p.plan, diff).await {
        cached::Startup::Created { key, out } => {
            let how = if diff {
                "diff merged onto the image's entry"
            } else {
                "full"
            };
            eprintln!(
                "fcvm: cache created (startup): entry {} ({how}, {} MiB, VM paused {} ms, {:.1} s in all)",
                cached::short(&key),
                out.meta.memory_allocated_bytes >> 20,
                out.paused_for.as_millis(),
                t.elapsed().as_secs_f64()
            );
        }
        cached::Startup::Skipped(why) => tracing::info!("no startup tier: {why}"),
        cached::Startup::Failed(why) => eprintln!(
            "fcvm: warning: the startup snapshot failed ({why}); the container runs without it"
        ),
    }
    timeline.mark("startup-snapshot");
}

/// What a signal to fcvm does to the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// Send it to the container as is (podman's signal proxy).
    Forward,
    /// Stop the container in order (Ctrl+Alt+Del, escalating).
    Stop,
    /// Nothing (a detached supervisor has no terminal whose hangup could mean "stop").
    Ignore,
}

/// `-t` without `-i` keeps the local terminal cooked, so Ctrl-C arrives here as SIGINT
/// and goes on to the container, as with podman. A detached supervisor ignores SIGHUP.
/// Everything else stops the container.
pub fn signal_action(sig: i32, tty: bool, interactive: bool, detached: bool) -> SignalAction {
    if sig == libc::SIGHUP && detached {
        SignalAction::Ignore
    } else if sig == libc::SIGINT && tty && !interactive {
        SignalAction::Forward
    } else {
        SignalAction::Stop
    }
}

/// Tell a waiting `podman run -d` that the container runs (once; no-op in the foreground).
fn release_detached(vm: &VmHandle, paths: &Paths, p: &Run<'_>) {
    if let Some(n) = p.detached {
        let mut n = n.lock().unwrap_or_else(|e| e.into_inner());
        if n.pending() {
            let log = paths
                .log_dir(&vm.spec().id)
                .join(crate::logs::SUPERVISOR_LOG_FILE);
            n.ready(vm.record().name.as_str(), &log);
        }
    }
}

struct End {
    exit_code: Option<i32>,
    guest_error: Option<String>,
    interrupted: Option<i32>,
    /// The agent never connected within this long; the VM was killed.
    agent_silent: Option<Duration>,
    /// A restored VM did not come back to a waiting agent (why).
    restore_failed: Option<String>,
}

/// How long the agent may take to connect after a boot, or to reconnect and report after a
/// restore: [`AGENT_TIMEOUT_ENV`] seconds, or the default. A restore is a resume, milliseconds
/// on bare metal, but in an emulated host three clones restored at once beside two running
/// VMs took more than 60 s to report; the bound only decides how long a failure takes.
pub(super) fn agent_timeout() -> Duration {
    std::env::var(AGENT_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
        .unwrap_or(AGENT_CONNECT_TIMEOUT)
}

/// Replaces MMDS's contents with an empty document. A failure is only logged: the agent's
/// prohibit route already keeps the container away from MMDS.
async fn empty_mmds(vm: &VmHandle) {
    let Some(api) = vm.api() else { return };
    let empty = serde_json::json!({});
    if let Err(e) = api.call(crate::vm::api::ApiCall::MmdsData(&empty)).await {
        tracing::warn!("cannot empty MMDS after the agent read its plan: {e}");
    }
}

/// Wait for the container's exit status, handling signals and a VMM that dies.
async fn follow(
    vm: &mut VmHandle,
    session: &mut session::Session,
    paths: &Paths,
    p: &Run<'_>,
    timeline: &mut Timeline,
    signals: &mut Signals,
    gate: &mut Gate,
) -> End {
    let plan = p.plan;
    let stop_grace = if p.stop_timeout.is_zero() {
        STOP_GRACE
    } else {
        p.stop_timeout
    };
    let mut end = End {
        exit_code: None,
        guest_error: None,
        interrupted: None,
        agent_silent: None,
        restore_failed: None,
    };
    let agent_wait = agent_timeout();
    let agent_deadline = tokio::time::Instant::now() + agent_wait;
    // Escalation after a signal: 1 = container asked to stop, 2 = killed, 3 = VMM killed.
    let mut stage = 0u8;
    let mut next_stage_at: Option<tokio::time::Instant> = None;
    let mut status_open = true;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    // Whether MMDS still holds this run's plan (a restored VM's MMDS holds none).
    let mut plan_in_mmds = vm.spec().mmds.is_some();
    // The guest's pull of a registry image, shown on a terminal (see [`pull`]).
    let mut pull = match &plan.image {
        fcvm_proto::plan::ImageSource::Registry { reference, .. } => {
            Some(pull::PullDisplay::new(reference))
        }
        fcvm_proto::plan::ImageSource::Archive { .. } => None,
    };
    let pull_over = |pull: &mut Option<pull::PullDisplay>, pulled: bool| {
        if let Some(mut d) = pull.take() {
            d.finish(pulled);
        }
    };
    // The startup tier is taken at the check's first pass, once.
    let mut startup_tried = false;
    loop {
        let mut escalate = false;
        tokio::select! {
            st = session.status.recv(), if status_open => {
                // Every frame comes after the agent read its plan: MMDS is emptied then, so
                // no process in the guest can read it later (the agent also closed the route).
                if st.is_some() && plan_in_mmds {
                    plan_in_mmds = false;
                    empty_mmds(vm).await;
                }
                match st {
                    Some(Status::PullProgress(line)) => {
                        if let Some(d) = pull.as_mut() {
                            d.line(&line);
                        }
                    }
                    Some(Status::Ready) => {
                        pull_over(&mut pull, true);
                        timeline.mark("ready");
                        // With a check, health is the check's; without, the start is it.
                        if p.plan.health_check.is_none() {
                            let _ = vm.update(|r| r.health = Health::Healthy);
                        }
                        if let Gate::Restored { key, ready: ready @ false, startup: true, .. } = gate {
                            *ready = true;
                            eprintln!(
                                "fcvm: cache hit (startup): entry {}, the container restored running",
                                cached::short(key)
                            );
                            // The clock and entropy came with Resync, the answer to the
                            // agent's Reconnected: nothing else to send a running container.
                        }
                        release_detached(vm, paths, p);
                    }
                    Some(Status::Error(text)) => {
                        pull_over(&mut pull, false);
                        end.guest_error = Some(text);
                    }
                    Some(Status::Health(state)) => {
                        tracing::debug!("health: {state}");
                        let health = match state {
                            HealthState::Starting => Health::Starting,
                            HealthState::Healthy => Health::Healthy,
                            HealthState::Unhealthy => Health::Unhealthy,
                        };
                        let _ = vm.update(|r| r.health = health);
                        if state == HealthState::Healthy && !startup_tried {
                            startup_tried = true;
                            startup_tier(vm, p, paths, gate, timeline).await;
                        }
                    }
                    Some(Status::ImageReady { digest }) => {
                        pull_over(&mut pull, true);
                        image_ready(vm, session, paths, p, timeline, gate, &digest).await;
                    }
                    Some(Status::Reconnected) => {
                        tracing::info!("the agent reconnected (its VM was snapshotted or restored)");
                        session.send_resync().await;
                    }
                    Some(Status::Proceed(_) | Status::Resync(_)) => {}
                    Some(Status::Exit(code)) => {
                        pull_over(&mut pull, false);
                        timeline.mark("exit-status");
                        end.exit_code = Some(code);
                        // Started and ended before its start was seen; a container that
                        // could not start keeps the command waiting for fcvm's error.
                        if end.guest_error.is_none() {
                            release_detached(vm, paths, p);
                        }
                        return end;
                    }
                    None => status_open = false,
                }
            },
            ev = vm.next_event(signals) => match ev {
                Event::Signal(sig) => match signal_action(sig, plan.tty, plan.interactive, p.detached.is_some()) {
                    SignalAction::Forward => session.send_signal(sig),
                    SignalAction::Ignore => tracing::debug!("signal {sig} ignored (detached)"),
                    SignalAction::Stop => {
                        tracing::debug!("signal {sig}: stopping the container");
                        end.interrupted.get_or_insert(sig);
                        escalate = true;
                    }
                },
                Event::Exited(_) | Event::MemorySourceLost(_) => {
                    if matches!(gate, Gate::Restored { ready: false, .. }) && end.interrupted.is_none() {
                        end.restore_failed = Some("the VM stopped right after the restore".into());
                    }
                    return end;
                }
            },
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                if let Gate::Restored { deadline, ready: false, .. } = gate {
                    if now >= *deadline && end.interrupted.is_none() {
                        end.restore_failed = Some(format!(
                            "its agent did not report within {} s",
                            agent_timeout().as_secs()
                        ));
                        return end;
                    }
                } else if session.agent_connected.get().is_none() && now >= agent_deadline {
                    tracing::debug!("the agent did not connect within {agent_wait:?}: killing the VM");
                    end.agent_silent = Some(agent_wait);
                    vm.kill();
                    return end;
                }
                if next_stage_at.is_some_and(|t| now >= t) {
                    escalate = true;
                }
            }
        }
        if escalate && stage < 3 {
            stage += 1;
            let wait = if stage < 3 {
                if let Some(api) = vm.api() {
                    let _ = api.call(ApiCall::CtrlAltDel).await;
                }
                if stage == 1 {
                    stop_grace
                } else {
                    KILL_GRACE
                }
            } else {
                vm.kill();
                KILL_GRACE
            };
            next_stage_at = Some(tokio::time::Instant::now() + wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_tap_names_fit_ifnamsiz() {
        let tap = NetworkAttachment::vmm_tap(&crate::state::new_vm_id());
        assert!(tap.tap().unwrap().len() <= 15);
    }

    #[test]
    fn an_ended_vm_s_console_leads_with_the_kernel_panic() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut text = String::from("[ 1.0] Kernel panic - not syncing: Out of memory\n");
        for i in 0..20 {
            text.push_str(&format!("[ 1.{i}] RIP: frame {i}\n"));
        }
        std::fs::write(&log, &text).unwrap();
        let c = ended_console(&log);
        assert!(
            c.starts_with("[ 1.0] Kernel panic - not syncing: Out of memory\n...\n"),
            "{c}"
        );
        assert!(c.ends_with("frame 19"), "{c}");
        // Without a panic (or with it already in the tail), just the tail.
        std::fs::write(&log, "a\nb\n").unwrap();
        assert_eq!(ended_console(&log), "a\nb");
    }

    #[test]
    fn exit_codes_follow_podman() {
        assert_eq!(exit_code(Some(1), None, false), Some(1));
        assert_eq!(exit_code(Some(143), Some(libc::SIGTERM), false), Some(143));
        assert_eq!(exit_code(None, Some(libc::SIGINT), false), Some(130));
        // A forced `fcvm stop`: killed, as podman reports it.
        assert_eq!(exit_code(None, None, true), Some(137));
        assert_eq!(exit_code(None, None, false), None);
    }

    #[test]
    fn sigint_is_forwarded_only_with_a_cooked_terminal() {
        use SignalAction::*;
        assert_eq!(signal_action(libc::SIGINT, true, false, false), Forward);
        assert_eq!(signal_action(libc::SIGINT, true, true, false), Stop);
        assert_eq!(signal_action(libc::SIGINT, false, false, false), Stop);
        assert_eq!(signal_action(libc::SIGTERM, true, false, false), Stop);
        assert_eq!(signal_action(libc::SIGHUP, true, false, false), Stop);
        // A detached supervisor outlives terminals; SIGTERM (`fcvm stop`) still stops it.
        assert_eq!(signal_action(libc::SIGHUP, false, false, true), Ignore);
        assert_eq!(signal_action(libc::SIGTERM, false, false, true), Stop);
    }
}
