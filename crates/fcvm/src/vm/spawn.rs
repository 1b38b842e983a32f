//! Starting a Firecracker process for one VM, behind the [`Spawner`] seam (the launch
//! sequence is unit-tested with a fake one).
//!
//! The VMM's stdout is the guest serial console; it goes straight into the VM's console
//! log file so output is kept whether or not an fcvm process is watching. The VMM gets its
//! own session, so a Ctrl-C at the terminal reaches fcvm (which shuts the VM down in order)
//! rather than killing the VMM mid-way.

use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

use crate::firecracker::{FirecrackerClient, TransportError};
use crate::paths::{VmPaths, MAX_SOCKET_PATH, VMM_VIEW_DIR};
use crate::process::ProcessRef;

use super::api::VmmApi;
use super::jail::{self, JailPlan, JailerConfig};

/// `prctl` option (Linux 6.4+), not in every libc crate version.
const PR_SET_MEMORY_MERGE: libc::c_int = 67;

/// How long a VMM may take to open its API socket (and the jailer to set up its chroot and
/// exit). Natively that is milliseconds, but a busy host is much slower: ten jailed clones
/// started at once in the emulated KVM host took more than 10 s, and a VMM killed for
/// slowness fails a launch that would have worked. A VMM that dies is noticed at once.
pub const API_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a VMM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// A socket path would exceed the kernel's limit.
    #[error("socket path {path} is {len} bytes, over the {MAX_SOCKET_PATH}-byte limit of Unix sockets; use a shorter FCVM_BASE_DIR")]
    SocketPathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Filesystem trouble preparing the runtime dir.
    #[error("cannot prepare {}", path.display())]
    Prepare {
        /// Where.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The network namespace does not exist.
    #[error("network namespace {name} is not available")]
    Netns {
        /// Its name.
        name: String,
        /// Cause.
        source: io::Error,
    },
    /// exec failed.
    #[error("cannot start {}", binary.display())]
    Exec {
        /// The VMM binary.
        binary: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The jailer refused or failed.
    #[error("the jailer ({}) failed ({status}); its output ends with:\n{log}", jailer.display())]
    Jailer {
        /// The jailer binary.
        jailer: PathBuf,
        /// Exit status.
        status: String,
        /// Tail of the log it wrote to.
        log: String,
    },
    /// Preparing the chroot.
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    /// The VMM died before its API came up.
    #[error("{} exited ({status}) before opening its API socket; its log ends with:\n{log}", binary.display())]
    DiedEarly {
        /// The VMM binary.
        binary: PathBuf,
        /// Exit status.
        status: String,
        /// Tail of its log.
        log: String,
    },
    /// The API never answered.
    #[error("{} did not answer on {} in time", binary.display(), socket.display())]
    NotReady {
        /// The VMM binary.
        binary: PathBuf,
        /// The socket.
        socket: PathBuf,
        /// Cause.
        source: Box<TransportError>,
    },
}

/// What to start.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The VMM binary.
    pub binary: PathBuf,
    /// Instance id passed as `--id` (alphanumeric and `-`).
    pub id: String,
    /// The VM's runtime directory.
    pub vm_paths: VmPaths,
    /// Run inside this named network namespace (`/run/netns/<name>`).
    pub netns: Option<String>,
    /// Kill the VMM if the spawning thread dies (foreground VMs). Must be spawned from a
    /// thread that lives as long as the VM: PR_SET_PDEATHSIG follows the thread.
    pub die_with_parent: bool,
    /// Mark all of the VMM's anonymous memory mergeable by KSM
    /// (`prctl(PR_SET_MEMORY_MERGE)`, set in the child before exec; it survives exec).
    /// Clones restored from one snapshot hold mostly identical pages, which ksmd then
    /// shares; it only has an effect while `/sys/kernel/mm/ksm/run` is 1.
    pub ksm: bool,
    /// Run under the jailer with this plan (uid claimed, chroot path chosen).
    pub jail: Option<(JailerConfig, JailPlan)>,
}

/// The VMM process: our child, or (under the jailer with `--new-pid-ns`) the grandchild
/// that the exiting jailer left behind, which fcvm adopts as child subreaper.
#[derive(Debug)]
pub enum VmmChild {
    /// Spawned directly.
    Direct(Child),
    /// Reparented to this process; waited for with waitpid.
    Adopted {
        /// Its pid.
        process: ProcessRef,
        /// Its exit status, once reaped.
        exit: Option<ExitStatus>,
    },
}

impl VmmChild {
    /// Its exit status if it has exited (never blocks).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self {
            VmmChild::Direct(c) => c.try_wait(),
            VmmChild::Adopted { process, exit } => {
                if exit.is_some() {
                    return Ok(*exit);
                }
                use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
                let pid = nix::unistd::Pid::from_raw(process.pid as i32);
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => {
                        *exit = Some(ExitStatus::from_raw(code << 8))
                    }
                    Ok(WaitStatus::Signaled(_, sig, _)) => {
                        *exit = Some(ExitStatus::from_raw(sig as i32))
                    }
                    Ok(_) => {}
                    // Not our child (this process is not its subreaper): watch it instead.
                    Err(nix::errno::Errno::ECHILD) => {
                        if !process.is_alive() {
                            *exit = Some(ExitStatus::from_raw(0));
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
                Ok(*exit)
            }
        }
    }

    /// SIGKILL it.
    pub fn kill(&mut self) -> io::Result<()> {
        match self {
            VmmChild::Direct(c) => c.kill(),
            VmmChild::Adopted { process, .. } => {
                process.signal(nix::sys::signal::Signal::SIGKILL);
                Ok(())
            }
        }
    }

    /// Wait for it to exit.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        if let VmmChild::Direct(c) = self {
            return c.wait();
        }
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A boxed spawn future (the trait is used as `dyn`).
pub type SpawnFuture<'a> =
    Pin<Box<dyn Future<Output = Result<SpawnedVmm, SpawnError>> + Send + 'a>>;

/// Starts VMM processes: [`DirectSpawner`] runs Firecracker; tests use a fake.
pub trait Spawner: Send + Sync + std::fmt::Debug {
    /// Start the VMM and return once its API answers.
    fn spawn<'a>(&'a self, opts: &'a SpawnOptions) -> SpawnFuture<'a>;
}

/// Runs `SpawnOptions::binary` directly.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectSpawner;

impl Spawner for DirectSpawner {
    fn spawn<'a>(&'a self, opts: &'a SpawnOptions) -> SpawnFuture<'a> {
        Box::pin(spawn_vmm(opts))
    }
}

/// Whether ksmd is running (`/sys/kernel/mm/ksm/run` is 1).
pub fn ksm_running() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/ksm/run").is_ok_and(|s| s.trim() == "1")
}

/// A VMM process we started.
#[derive(Debug)]
pub struct SpawnedVmm {
    /// The process.
    pub process: ProcessRef,
    /// Its handle (for waiting on the exit status).
    pub child: VmmChild,
    /// Its API.
    pub api: Box<dyn VmmApi>,
    /// Time spent from spawn until the API answered.
    pub api_ready_after: Duration,
}

fn prepare(path: &Path) -> impl FnOnce(io::Error) -> SpawnError {
    let path = path.to_owned();
    move |source| SpawnError::Prepare { path, source }
}

fn check_socket_len(path: &Path) -> Result<(), SpawnError> {
    // Firecracker appends `_<port>` (up to 11 bytes) to the vsock path.
    let len = path.as_os_str().len();
    if len + 11 > MAX_SOCKET_PATH {
        return Err(SpawnError::SocketPathTooLong {
            path: path.to_owned(),
            len: len + 11,
        });
    }
    Ok(())
}

fn append(path: &Path) -> Result<File, SpawnError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(prepare(path))
}

/// Start the VMM and wait until its API socket answers.
pub async fn spawn_vmm(opts: &SpawnOptions) -> Result<SpawnedVmm, SpawnError> {
    if let Some((cfg, plan)) = &opts.jail {
        return spawn_jailed(opts, cfg, plan).await;
    }
    let vm = &opts.vm_paths;
    check_socket_len(&vm.api_socket())?;
    check_socket_len(&vm.vsock_socket())?;
    fs::create_dir_all(vm.dir()).map_err(prepare(vm.dir()))?;
    let _ = fs::remove_file(vm.api_socket());
    let console = append(&vm.console_log())?;
    let log = append(&vm.firecracker_log())?;
    let log_err = log.try_clone().map_err(prepare(&vm.firecracker_log()))?;

    let netns_fd: Option<OwnedFd> = match &opts.netns {
        Some(name) => {
            let path = crate::network::netns_path(name);
            Some(
                File::open(&path)
                    .map_err(|source| SpawnError::Netns {
                        name: name.clone(),
                        source,
                    })?
                    .into(),
            )
        }
        None => None,
    };

    // The VMM is told the view paths; see `VMM_VIEW_DIR`.
    let view = VmPaths::vmm_view();
    fs::create_dir_all(VMM_VIEW_DIR).map_err(prepare(Path::new(VMM_VIEW_DIR)))?;
    let bind_source = CString::new(vm.dir().as_os_str().as_bytes())
        .map_err(|e| prepare(vm.dir())(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let bind_target = CString::new(VMM_VIEW_DIR).expect("constant has no NUL");

    let mut cmd = Command::new(&opts.binary);
    cmd.arg("--api-sock")
        .arg(view.api_socket())
        .arg("--id")
        .arg(&opts.id)
        .arg("--log-path")
        .arg(view.firecracker_log())
        .arg("--level")
        .arg("Info")
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(log_err);
    drop(log);
    let die_with_parent = opts.die_with_parent;
    let ksm = opts.ksm;
    let netns_raw = netns_fd.as_ref().map(|fd| fd.as_raw_fd());
    let child_setup = move || -> io::Result<()> {
        nix::unistd::setsid()?;
        enter_private_view(&bind_source, &bind_target)?;
        if die_with_parent {
            // SAFETY: PR_SET_PDEATHSIG takes a signal number; no pointers are involved.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if ksm {
            // SAFETY: PR_SET_MEMORY_MERGE takes an integer flag; no pointers.
            if unsafe { libc::prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(fd) = netns_raw {
            // SAFETY: the namespace fd stays open in the parent, and so in this child,
            // until after spawn returns; borrowing it for the call is sound.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            nix::sched::setns(fd, CloneFlags::CLONE_NEWNET)?;
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (setsid, unshare, mount, prctl, setns); it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(child_setup);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| SpawnError::Exec {
        binary: opts.binary.clone(),
        source,
    })?;
    drop(netns_fd);
    let process = ProcessRef::of_pid(child.id()).unwrap_or(ProcessRef {
        pid: child.id(),
        start_time: 0,
    });
    let client = FirecrackerClient::new(vm.api_socket());

    let ready = wait_api(&client, &mut child).await;
    if let Err(err) = ready {
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        return Err(match err {
            WaitError::Exited => SpawnError::DiedEarly {
                binary: opts.binary.clone(),
                status,
                log: tail(&vm.firecracker_log(), 20),
            },
            WaitError::Api(source) => SpawnError::NotReady {
                binary: opts.binary.clone(),
                socket: vm.api_socket(),
                source: Box::new(source),
            },
        });
    }
    Ok(SpawnedVmm {
        process,
        child: VmmChild::Direct(child),
        api: Box::new(client),
        api_ready_after: started.elapsed(),
    })
}

/// Firecracker's own arguments, with the paths it sees.
fn firecracker_args(view: &VmPaths) -> Vec<OsString> {
    vec![
        "--api-sock".into(),
        view.api_socket().into(),
        "--log-path".into(),
        view.firecracker_log().into(),
        "--level".into(),
        "Info".into(),
    ]
}

/// Start Firecracker under the jailer (see [`super::jail`] for the layout).
async fn spawn_jailed(
    opts: &SpawnOptions,
    cfg: &JailerConfig,
    plan: &JailPlan,
) -> Result<SpawnedVmm, SpawnError> {
    let vm = &opts.vm_paths;
    check_socket_len(&vm.api_socket())?;
    check_socket_len(&vm.vsock_socket())?;
    fs::create_dir_all(vm.dir()).map_err(prepare(vm.dir()))?;
    fs::create_dir_all(&plan.chroot).map_err(prepare(&plan.chroot))?;
    let _ = fs::remove_file(vm.api_socket());
    jail::make_view_link(vm.dir())?;
    let console = append(&vm.console_log())?;
    jail::private_to(&vm.console_log(), plan.uid)?;
    let log = append(&vm.firecracker_log())?;
    // Firecracker opens its log by path, as the jail's uid.
    jail::private_to(&vm.firecracker_log(), plan.uid)?;
    let netns = opts.netns.as_ref().map(|n| crate::network::netns_path(n));
    if let Some(path) = &netns {
        if !path.exists() {
            return Err(SpawnError::Netns {
                name: opts.netns.clone().unwrap_or_default(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
    }
    let argv = plan.argv(
        cfg,
        netns.as_deref(),
        &firecracker_args(&VmPaths::vmm_view()),
    );
    let bind_source = CString::new(vm.dir().as_os_str().as_bytes())
        .map_err(|e| prepare(vm.dir())(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let bind_target = CString::new(plan.chroot.as_os_str().as_bytes())
        .map_err(|e| prepare(&plan.chroot)(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    become_subreaper();

    let mut cmd = Command::new(&cfg.jailer);
    cmd.args(&argv)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(log);
    let ksm = opts.ksm;
    let child_setup = move || -> io::Result<()> {
        nix::unistd::setsid()?;
        // The chroot path shows the runtime directory, in this namespace only.
        enter_private_view(&bind_source, &bind_target)?;
        if ksm {
            // SAFETY: PR_SET_MEMORY_MERGE takes an integer flag; no pointers. The flag is
            // kept across fork and exec, so the jailer's Firecracker child has it too.
            if unsafe { libc::prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (setsid, unshare, mount, prctl); it allocates nothing.
    unsafe {
        cmd.pre_exec(child_setup);
    }
    let started = Instant::now();
    let mut jailer = cmd.spawn().map_err(|source| SpawnError::Exec {
        binary: cfg.jailer.clone(),
        source,
    })?;
    // With --new-pid-ns the jailer forks Firecracker, writes its pid and exits.
    let deadline = Instant::now() + API_READY_TIMEOUT;
    let status = loop {
        if let Some(s) = jailer.try_wait().map_err(prepare(&cfg.jailer))? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = jailer.kill();
            break jailer.wait().map_err(prepare(&cfg.jailer))?;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    };
    let pid_file = vm.dir().join(format!("{}.pid", jail::EXEC_FILE_NAME));
    let pid = fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let (true, Some(pid)) = (status.success(), pid) else {
        return Err(SpawnError::Jailer {
            jailer: cfg.jailer.clone(),
            status: status.to_string(),
            log: tail(&vm.firecracker_log(), 20),
        });
    };
    let process = ProcessRef::of_pid(pid).unwrap_or(ProcessRef { pid, start_time: 0 });
    let mut child = VmmChild::Adopted {
        process,
        exit: None,
    };
    let client = FirecrackerClient::new(vm.api_socket());
    let ready = wait_api_of(&client, || matches!(child.try_wait(), Ok(Some(_)))).await;
    if let Err(err) = ready {
        let _ = child.kill();
        let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
        return Err(match err {
            WaitError::Exited => SpawnError::DiedEarly {
                binary: cfg.firecracker.clone(),
                status,
                log: tail(&vm.firecracker_log(), 20),
            },
            WaitError::Api(source) => SpawnError::NotReady {
                binary: cfg.firecracker.clone(),
                socket: vm.api_socket(),
                source: Box::new(source),
            },
        });
    }
    Ok(SpawnedVmm {
        process,
        child,
        api: Box::new(client),
        api_ready_after: started.elapsed(),
    })
}

/// Make this process the child subreaper, so a jailed Firecracker (whose parent, the
/// jailer, exits at once) is reparented to us and its exit status can be waited for.
fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag; no pointers.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        tracing::debug!(
            "cannot become child subreaper: {}",
            io::Error::last_os_error()
        );
    }
}

/// Give the calling (child) process its own mount namespace in which the VM's runtime
/// directory appears at `VMM_VIEW_DIR`. Mounts made on the host later still propagate in
/// (slave), and nothing done here leaks out.
fn enter_private_view(source: &CString, target: &CString) -> io::Result<()> {
    let none: *const libc::c_char = std::ptr::null();
    // SAFETY: unshare takes only flags.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let root = c"/";
    // SAFETY: all pointers are valid NUL-terminated strings or null, as mount(2) allows
    // for a propagation change.
    if unsafe {
        libc::mount(
            none,
            root.as_ptr(),
            none,
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; a bind mount ignores the type and data arguments.
    if unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            none,
            libc::MS_BIND,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

enum WaitError {
    Exited,
    Api(TransportError),
}

async fn wait_api(client: &FirecrackerClient, child: &mut Child) -> Result<(), WaitError> {
    wait_api_of(client, || matches!(child.try_wait(), Ok(Some(_)))).await
}

async fn wait_api_of(
    client: &FirecrackerClient,
    mut exited: impl FnMut() -> bool,
) -> Result<(), WaitError> {
    let deadline = Instant::now() + API_READY_TIMEOUT;
    loop {
        if exited() {
            return Err(WaitError::Exited);
        }
        match client.instance_info().await {
            Ok(_) => return Ok(()),
            Err(TransportError::Connect { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            Err(e) => return Err(WaitError::Api(e)),
        }
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
