//! VM state and lifecycle: configuration before boot, InstanceStart, pause, shutdown.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::cgroup::SandboxCgroups;
use crate::loopdev::LoopDevice;
use crate::mmds::Mmds;
use crate::spec::{DeviceNode, Spec, GO_FD, MMDS_IP, READY_FD, SPEC_ENV};
use crate::{hvsock, netns};
use fcvm_fc_api::{BootSource, Drive, MachineConfig, MmdsConfig, NetworkInterface, Vsock};

/// Prefix of the per-VMM work directory in the temp dir; followed by the VMM's pid.
pub const WORKDIR_PREFIX: &str = "fcvm-sandbox-";

/// Removes what VMMs killed with SIGKILL could not: empty sandbox cgroups and work
/// directories whose VMM pid is gone. Called at every VMM start.
pub fn collect_stale() {
    crate::cgroup::collect_stale();
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(WORKDIR_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Kernel command-line words the stand-in appends for the agent.
pub const SANDBOX_BOOT_ARGS: &str = "fcvm.cgroup=v1 fcvm.vsock=abstract fcvm.dev=static";

/// Errors of VM actions, reported as `{"fault_message": ...}` with status 400.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Configuration is not allowed after boot.
    #[error("The requested operation is not supported after starting the microVM.")]
    AfterBoot,
    /// Operation requires a running VM.
    #[error("The requested operation is not supported before starting the microVM.")]
    BeforeBoot,
    /// Something required for boot is missing or wrong.
    #[error("{0}")]
    Config(String),
    /// Starting the sandbox failed.
    #[error("Cannot start the sandbox: {0}")]
    Start(String),
    /// Unsupported by design.
    #[error("{0}")]
    Unsupported(String),
}

/// Lifecycle state, as `GET /` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Configuring.
    NotStarted,
    /// Sandbox running.
    Running,
    /// Frozen.
    Paused,
}

impl State {
    /// Firecracker's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            State::NotStarted => "Not started",
            State::Running => "Running",
            State::Paused => "Paused",
        }
    }
}

/// Configuration gathered through the API.
#[derive(Debug, Default, Clone)]
pub struct VmConfig {
    /// Boot source.
    pub boot_source: Option<BootSource>,
    /// Machine config.
    pub machine: MachineConfig,
    /// Drives in insertion order.
    pub drives: Vec<Drive>,
    /// NICs (recorded only).
    pub nics: Vec<NetworkInterface>,
    /// Vsock device.
    pub vsock: Option<Vsock>,
    /// MMDS config.
    pub mmds_config: Option<MmdsConfig>,
}

/// Resources of a started sandbox, released by [`Vmm::cleanup`].
struct Running {
    helper_pid: i32,
    cgroups: SandboxCgroups,
    loops: Vec<LoopDevice>,
    workdir: PathBuf,
}

/// The whole VMM.
pub struct Vmm {
    /// Instance id (`--id`).
    pub id: String,
    /// Configuration.
    pub config: Mutex<VmConfig>,
    /// State.
    pub state: Mutex<State>,
    /// MMDS store.
    pub mmds: Arc<Mmds>,
    running: Mutex<Option<Running>>,
    netns_tx: watch::Sender<Option<Arc<File>>>,
    /// Vsock socket file created by `PUT /vsock`, removed at exit.
    pub vsock_path: Mutex<Option<PathBuf>>,
    /// Signalled with the sandbox's exit code when the guest ends.
    pub exited: watch::Sender<Option<i32>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vmm {
    /// A VMM with nothing configured.
    pub fn new(id: String) -> Arc<Self> {
        Arc::new(Self {
            id,
            config: Mutex::default(),
            state: Mutex::new(State::NotStarted),
            mmds: Arc::new(Mmds::default()),
            running: Mutex::new(None),
            netns_tx: watch::channel(None).0,
            vsock_path: Mutex::new(None),
            exited: watch::channel(None).0,
        })
    }

    /// Current state.
    pub fn state(&self) -> State {
        *lock(&self.state)
    }

    /// Fails unless the VM has not been started.
    pub fn ensure_not_started(&self) -> Result<(), VmmError> {
        if self.state() != State::NotStarted {
            return Err(VmmError::AfterBoot);
        }
        Ok(())
    }

    /// `PUT /vsock`: binds the host-side socket now, as Firecracker does.
    pub fn set_vsock(self: &Arc<Self>, v: Vsock) -> Result<(), VmmError> {
        self.ensure_not_started()?;
        if lock(&self.vsock_path).is_some() {
            return Err(VmmError::Config(
                "The vsock device is already configured.".into(),
            ));
        }
        let listener = tokio::net::UnixListener::bind(&v.uds_path).map_err(|e| {
            VmmError::Config(format!("Cannot create vsock socket {}: {e}", v.uds_path))
        })?;
        *lock(&self.vsock_path) = Some(PathBuf::from(&v.uds_path));
        tokio::spawn(hvsock::serve_host(listener, self.netns_tx.subscribe()));
        lock(&self.config).vsock = Some(v);
        Ok(())
    }

    /// `InstanceStart`.
    pub async fn start(self: &Arc<Self>) -> Result<(), VmmError> {
        self.ensure_not_started()?;
        let cfg = lock(&self.config).clone();
        let boot = cfg.boot_source.clone().ok_or_else(|| {
            VmmError::Config("Missing boot source: PUT /boot-source first.".into())
        })?;
        if !Path::new(&boot.kernel_image_path).exists() {
            return Err(VmmError::Config(format!(
                "Kernel image {} does not exist.",
                boot.kernel_image_path
            )));
        }
        let initrd = boot.initrd_path.clone().ok_or_else(|| {
            VmmError::Config(
                "The sandbox needs boot-source.initrd_path: the agent initrd provides /init."
                    .into(),
            )
        })?;
        let mut drives: Vec<Drive> = cfg
            .drives
            .iter()
            .filter(|d| d.is_root_device)
            .cloned()
            .collect();
        if drives.is_empty() {
            return Err(VmmError::Config(
                "No root drive: PUT /drives/rootfs with is_root_device=true.".into(),
            ));
        }
        drives.extend(cfg.drives.iter().filter(|d| !d.is_root_device).cloned());
        let cmdline = format!(
            "{} {SANDBOX_BOOT_ARGS}",
            boot.boot_args.clone().unwrap_or_default()
        );

        // Work directory: the extracted agent and the root mount point.
        let workdir = std::env::temp_dir().join(format!("{WORKDIR_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&workdir);
        std::fs::create_dir_all(workdir.join("root"))
            .map_err(|e| VmmError::Start(format!("{}: {e}", workdir.display())))?;
        let mut run = Running {
            helper_pid: 0,
            cgroups: SandboxCgroups::default(),
            loops: Vec::new(),
            workdir: workdir.clone(),
        };
        let result = self.start_inner(&mut run, &drives, &initrd, cmdline).await;
        let failed = result.is_err();
        *lock(&self.running) = Some(run);
        if failed {
            self.cleanup();
        } else {
            *lock(&self.state) = State::Running;
        }
        result
    }

    async fn start_inner(
        self: &Arc<Self>,
        run: &mut Running,
        drives: &[Drive],
        initrd: &str,
        cmdline: String,
    ) -> Result<(), VmmError> {
        let start_err = |e: String| VmmError::Start(e);
        let archive = std::fs::read(initrd)
            .map_err(|e| VmmError::Config(format!("Cannot read initrd {initrd}: {e}")))?;
        let init = fcvm_proto::initrd::find_file(&archive, "init")
            .map_err(|e| VmmError::Config(format!("Initrd {initrd}: {e}")))?
            .ok_or_else(|| VmmError::Config(format!("Initrd {initrd} has no /init")))?;
        let init_path = run.workdir.join("init");
        std::fs::write(&init_path, init).map_err(|e| start_err(e.to_string()))?;

        let mut devices = Vec::new();
        for (i, d) in drives.iter().enumerate() {
            let lo = LoopDevice::attach(Path::new(&d.path_on_host), d.is_read_only)
                .map_err(|e| start_err(e.to_string()))?;
            devices.push(DeviceNode {
                name: format!("vd{}", (b'a' + i as u8) as char),
                rdev: lo.rdev(),
                read_only: d.is_read_only,
            });
            run.loops.push(lo);
        }
        run.cgroups =
            SandboxCgroups::create(&self.id_tag()).map_err(|e| start_err(e.to_string()))?;
        let spec = Spec {
            root_dir: run.workdir.join("root"),
            init_path,
            devices,
            cgroup_procs: run.cgroups.procs_files(),
            cmdline,
        };

        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| start_err(e.to_string()))?;
        let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| start_err(e.to_string()))?;
        let spec_json = serde_json::to_string(&spec).map_err(|e| start_err(e.to_string()))?;
        let pid = self
            .spawn_helper(spec_json, ready_w, go_r)
            .map_err(start_err)?;
        run.helper_pid = pid;

        // Wait for the namespaces to exist (the helper closes the pipe on failure).
        let mut ready = File::from(ready_r);
        let got = tokio::task::spawn_blocking(move || {
            let mut b = [0u8; 1];
            ready.read(&mut b).unwrap_or(0)
        })
        .await
        .unwrap_or(0);
        if got != 1 {
            return Err(start_err(
                "the sandbox helper failed during setup (see the console output)".into(),
            ));
        }
        let ns = Arc::new(
            File::open(format!("/proc/{pid}/ns/net"))
                .map_err(|e| start_err(format!("netns: {e}")))?,
        );
        let mmds_listener = netns::in_netns(&ns, || {
            let addr = std::net::SocketAddr::from((MMDS_IP, 80));
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| start_err(format!("MMDS listener: {e}")))?;
        tokio::spawn(crate::mmds::serve(self.mmds.clone(), mmds_listener));
        if let Some(path) = lock(&self.vsock_path).clone() {
            let l = hvsock::bind_guest_listener(&ns)
                .map_err(|e| start_err(format!("vsock listener: {e}")))?;
            tokio::spawn(hvsock::serve_guest(l, path));
        }
        self.netns_tx.send_replace(Some(ns));
        let mut go = File::from(go_w);
        go.write_all(b"G")
            .map_err(|e| start_err(format!("go signal: {e}")))?;
        Ok(())
    }

    fn id_tag(&self) -> String {
        self.id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(40)
            .collect()
    }

    /// Starts the helper from a dedicated thread that then waits for it: PR_SET_PDEATHSIG
    /// fires when the *thread* that forked the child ends, so that thread must live as long as
    /// the sandbox.
    fn spawn_helper(
        self: &Arc<Self>,
        spec_json: String,
        ready_w: OwnedFd,
        go_r: OwnedFd,
    ) -> Result<i32, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let (tx, rx) = std::sync::mpsc::channel();
        let vmm = self.clone();
        std::thread::Builder::new()
            .name("sandbox".into())
            .spawn(move || {
                let mut cmd = Command::new(exe);
                cmd.arg("--sandbox-init")
                    .env(SPEC_ENV, spec_json)
                    .stdin(Stdio::null());
                // The console: the guest's output goes to the VMM's stdout, like a serial port.
                use std::os::fd::AsFd;
                if let Ok(out) = std::io::stdout().as_fd().try_clone_to_owned() {
                    if let Ok(err) = out.try_clone() {
                        cmd.stderr(Stdio::from(err));
                    }
                    cmd.stdout(Stdio::from(out));
                }
                let (rw, gr) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
                // SAFETY: only async-signal-safe calls (prctl, dup2, fcntl) run in the child.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::prctl(
                            libc::PR_SET_PDEATHSIG,
                            libc::SIGKILL as libc::c_ulong,
                            0,
                            0,
                            0,
                        ) < 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                        for (from, to) in [(rw, READY_FD), (gr, GO_FD)] {
                            if from == to {
                                libc::fcntl(to, libc::F_SETFD, 0);
                            } else if libc::dup2(from, to) < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                        }
                        Ok(())
                    });
                }
                let child = cmd.spawn();
                drop(ready_w);
                drop(go_r);
                let mut child = match child {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(format!("cannot start the sandbox helper: {e}")));
                        return;
                    }
                };
                let _ = tx.send(Ok(child.id() as i32));
                let code = match child.wait() {
                    Ok(s) => s.code().unwrap_or(1),
                    Err(_) => 1,
                };
                vmm.exited.send_replace(Some(code));
            })
            .map_err(|e| e.to_string())?;
        rx.recv().map_err(|e| e.to_string())?
    }

    /// `SendCtrlAltDel`: the guest's PID 1 receives SIGINT, as Linux delivers Ctrl-Alt-Del to
    /// init once the agent disabled the hard reset.
    pub fn ctrl_alt_del(&self) -> Result<(), VmmError> {
        let pid = self.guest_init_pid().ok_or(VmmError::BeforeBoot)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        )
        .map_err(|e| VmmError::Start(format!("cannot signal the guest: {e}")))
    }

    /// PID (in our namespace) of the guest's PID 1: the helper's only child.
    fn guest_init_pid(&self) -> Option<i32> {
        let helper = lock(&self.running).as_ref().map(|r| r.helper_pid)?;
        let children =
            std::fs::read_to_string(format!("/proc/{helper}/task/{helper}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// `PATCH /vm`.
    pub fn set_paused(&self, paused: bool) -> Result<(), VmmError> {
        let state = self.state();
        if state == State::NotStarted {
            return Err(VmmError::BeforeBoot);
        }
        let run = lock(&self.running);
        let r = run.as_ref().ok_or(VmmError::BeforeBoot)?;
        r.cgroups
            .freeze(paused)
            .map_err(|e| VmmError::Unsupported(e.to_string()))?;
        *lock(&self.state) = if paused {
            State::Paused
        } else {
            State::Running
        };
        Ok(())
    }

    /// Stops the sandbox (if running) and releases everything. Idempotent.
    pub fn cleanup(&self) {
        let Some(run) = lock(&self.running).take() else {
            return;
        };
        let _ = run.cgroups.freeze(false);
        // Only while the helper is unreaped is its pid still ours to signal.
        if run.helper_pid > 0 && self.exited.borrow().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(run.helper_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.netns_tx.send_replace(None);
        let left = run.cgroups.remove(Duration::from_secs(5));
        if !left.is_empty() {
            eprintln!("fcvm-sandbox-vmm: could not remove cgroups {left:?}");
        }
        drop(run.loops);
        let _ = std::fs::remove_dir_all(&run.workdir);
        *lock(&self.state) = State::NotStarted;
    }
}
