//! Starting a Firecracker process for one VM, behind the [`Spawner`] seam (the launch
//! sequence is unit-tested with a fake one).
//!
//! The VMM's stdout is the guest serial console; it goes straight into the VM's console
//! log file so output is kept whether or not an fcvm process is watching. The VMM gets its
//! own session, so a Ctrl-C at the terminal reaches fcvm (which shuts the VM down in order)
//! rather than killing the VMM mid-way.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

use crate::firecracker::{FirecrackerClient, TransportError};
use crate::paths::{VmPaths, MAX_SOCKET_PATH, VMM_VIEW_DIR};
use crate::process::ProcessRef;

use super::api::VmmApi;

/// `prctl` option (Linux 6.4+), not in every libc crate version.
const PR_SET_MEMORY_MERGE: libc::c_int = 67;

/// How long a VMM may take to open its API socket.
pub const API_READY_TIMEOUT: Duration = Duration::from_secs(10);

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
    pub child: Child,
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
        child,
        api: Box::new(client),
        api_ready_after: started.elapsed(),
    })
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
    let deadline = Instant::now() + API_READY_TIMEOUT;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
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
