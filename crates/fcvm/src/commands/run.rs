//! `fcvm run`: boot a raw kernel in a Firecracker microVM, like firectl.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::cleanup::CleanupStep;
use crate::firecracker::binary::{self, BinaryError, Program};
use crate::firecracker::models::{Drive, NetworkInterface};
use crate::firecracker::TransportError;
use crate::names::{Name, NameError};
use crate::network;
use crate::paths::{Paths, VmPaths};
use crate::setup::probe::{self, PROBE_KEYWORD};
use crate::state::{new_vm_id, Store, StoreError, VmKind, VmRecord, VmStatus};
use crate::vm::config::{validate_sizing, SizingError};
use crate::vm::console::ConsoleFollower;
use crate::vm::spawn::{tail, SpawnError};
use crate::vm::{spawn_vmm_with, SpawnExtras, SpawnOptions, VmConfig};

/// Kernel command line used when the user gives none.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// VM name.
    pub name: String,
    /// Kernel image path, or `probe`.
    pub kernel: String,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Root filesystem image (attached read-write as /dev/vda).
    pub rootfs: Option<PathBuf>,
    /// Kernel command line; the default when unset.
    pub boot_args: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// Enable dirty page tracking (diff snapshots).
    pub track_dirty_pages: bool,
    /// Return once booted, leaving the VM running.
    pub detach: bool,
    /// Give the VM an eth0 backed by a TAP ([`network::DEFAULT_TAP`]) in its own network
    /// namespace `fcvm-<id>`, so its snapshots can be cloned with the same TAP name.
    pub network_tap: bool,
    /// Mark the VMM's memory mergeable by KSM.
    pub ksm: bool,
}

/// Why `fcvm run` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad name.
    #[error("invalid --name: {0}")]
    Name(#[from] NameError),
    /// Bad sizing.
    #[error(transparent)]
    Sizing(#[from] SizingError),
    /// A file argument is missing.
    #[error("{what} {path} does not exist")]
    MissingFile {
        /// Which argument.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// The probe kernel could not be written.
    #[error("cannot write the probe kernel: {0}")]
    Probe(std::io::Error),
    /// Firecracker is unusable.
    #[error(transparent)]
    Binary(#[from] BinaryError),
    /// State store failure (includes name clashes).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The VMM did not start.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// Firecracker refused the configuration or the boot.
    #[error("{source}\n(Firecracker log: {log})")]
    Api {
        /// Cause.
        source: TransportError,
        /// Log path.
        log: PathBuf,
    },
    /// Console I/O failed.
    #[error("console: {0}")]
    Console(std::io::Error),
    /// Network namespace or TAP.
    #[error(transparent)]
    Net(#[from] network::NetError),
}

/// How the VM ended (foreground) or where it runs (detached).
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The record as last written.
    pub record: VmRecord,
    /// The VMM's exit code (foreground only). Firecracker exits 0 when the guest resets.
    pub exit_code: Option<i32>,
    /// Whether the run was ended by a signal to fcvm.
    pub interrupted: bool,
}

/// Resolve `--kernel`: a path, or the built-in probe guest.
pub fn resolve_kernel(paths: &Paths, kernel: &str) -> Result<PathBuf, RunError> {
    if kernel == PROBE_KEYWORD {
        return probe::ensure(paths).map_err(RunError::Probe);
    }
    let path = PathBuf::from(kernel);
    if !path.is_file() {
        return Err(RunError::MissingFile {
            what: "kernel",
            path,
        });
    }
    Ok(path)
}

fn require_file(what: &'static str, path: &Option<PathBuf>) -> Result<(), RunError> {
    match path {
        Some(p) if !p.is_file() => Err(RunError::MissingFile {
            what,
            path: p.clone(),
        }),
        _ => Ok(()),
    }
}

/// Boot the VM described by `req`. In the foreground, the console is copied to `out` until
/// the VM ends or fcvm gets SIGINT/SIGTERM.
pub async fn run(
    paths: &Paths,
    req: &RunRequest,
    out: &mut (dyn Write + Send),
) -> Result<RunOutcome, RunError> {
    let name = Name::parse(&req.name)?;
    let (vcpus, mem_mib) = validate_sizing(req.vcpus, req.mem_mib)?;
    let kernel = resolve_kernel(paths, &req.kernel)?;
    require_file("initrd", &req.initrd)?;
    require_file("rootfs", &req.rootfs)?;
    let firecracker = binary::find(Program::Firecracker, paths)?;

    let store = Store::open(paths)?;
    let id = new_vm_id();
    let vm_paths = VmPaths::new(paths.vm_dir(&id));
    let mut record = VmRecord::new(id.clone(), name, VmKind::Raw, vm_paths.dir().to_owned());
    record.vmm_kind = "firecracker".into();
    record.vcpus = vcpus;
    record.mem_mib = mem_mib;
    record.track_dirty_pages = req.track_dirty_pages;
    record.kernel = Some(kernel.clone());
    record.api_socket = Some(vm_paths.api_socket());
    record.console_log = Some(vm_paths.console_log());
    record.cleanup = vec![CleanupStep::RemoveDir {
        path: vm_paths.dir().to_owned(),
    }];
    if req.network_tap {
        let ns = format!("fcvm-{id}");
        // Recorded before it exists, so a crash right after creating it is still undone.
        record
            .cleanup
            .insert(0, CleanupStep::DeleteNetns { name: ns.clone() });
        record.netns = Some(ns);
        record.tap = Some(network::DEFAULT_TAP.to_owned());
    }
    store.create(&record)?;

    let booted = boot(
        &store,
        &record,
        &vm_paths,
        &firecracker.path,
        &kernel,
        vcpus,
        mem_mib,
        req,
    )
    .await;
    let (record, mut vmm) = match booted {
        Ok(ok) => ok,
        Err(e) => {
            teardown(&store, &id);
            return Err(e);
        }
    };

    if req.detach {
        // Firecracker now owns the VM's life; fcvm may exit.
        let process = vmm.process;
        let record = store.update(&id, |r| r.owner = process)?;
        return Ok(RunOutcome {
            record,
            exit_code: None,
            interrupted: false,
        });
    }

    let result = follow_until_exit(&vm_paths.console_log(), &mut vmm.child, out).await;
    teardown(&store, &id);
    let (exit_code, interrupted) = result.map_err(RunError::Console)?;
    Ok(RunOutcome {
        record,
        exit_code,
        interrupted,
    })
}

#[allow(clippy::too_many_arguments)]
async fn boot(
    store: &Store,
    record: &VmRecord,
    vm_paths: &VmPaths,
    binary: &Path,
    kernel: &Path,
    vcpus: u8,
    mem_mib: u32,
    req: &RunRequest,
) -> Result<(VmRecord, crate::vm::SpawnedVmm), RunError> {
    if let (Some(ns), Some(tap)) = (&record.netns, &record.tap) {
        network::create_netns(ns, Some(tap))?;
    }
    let opts = SpawnOptions {
        binary: binary.to_owned(),
        id: record.id.clone(),
        vm_paths: vm_paths.clone(),
        netns: record.netns.clone(),
        die_with_parent: !req.detach,
    };
    let vmm = spawn_vmm_with(&opts, SpawnExtras { ksm: req.ksm }).await?;
    let process = vmm.process;
    store.update(&record.id, |r| {
        r.vmm = Some(process);
        r.cleanup.insert(0, CleanupStep::KillProcess { process });
    })?;
    let config = VmConfig {
        vcpus,
        mem_mib,
        track_dirty_pages: req.track_dirty_pages,
        kernel: kernel.to_owned(),
        initrd: req.initrd.clone(),
        boot_args: req
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_owned()),
        drives: req
            .rootfs
            .iter()
            .map(|p| Drive {
                drive_id: "rootfs".into(),
                path_on_host: p.display().to_string(),
                is_root_device: true,
                is_read_only: false,
                ..Default::default()
            })
            .collect(),
        network: record.tap.as_ref().map(|tap| NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: tap.clone(),
            guest_mac: Some(network::mac_for(&record.id)),
            ..Default::default()
        }),
        vsock: None,
        mmds: None,
    };
    let api = |source| RunError::Api {
        source,
        log: vm_paths.firecracker_log(),
    };
    config.apply(&vmm.client).await.map_err(api)?;
    vmm.client.start().await.map_err(api)?;
    let record = store.update(&record.id, |r| r.status = VmStatus::Running)?;
    Ok((record, vmm))
}

/// Copy console output to `out` until the VMM exits (returning its exit code) or fcvm is
/// asked to stop (returning `interrupted`).
async fn follow_until_exit(
    console: &Path,
    child: &mut std::process::Child,
    out: &mut (dyn Write + Send),
) -> std::io::Result<(Option<i32>, bool)> {
    let mut follower = ConsoleFollower::open(console)?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    loop {
        let chunk = follower.read_new()?;
        if !chunk.is_empty() {
            out.write_all(&chunk)?;
            out.flush()?;
        }
        if let Some(status) = child.try_wait()? {
            let rest = follower.read_new()?;
            out.write_all(&rest)?;
            out.flush()?;
            return Ok((status.code(), false));
        }
        tokio::select! {
            _ = sigint.recv() => return Ok((None, true)),
            _ = sigterm.recv() => return Ok((None, true)),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
}

/// Undo everything recorded for VM `id` and forget it. Best effort: failures are logged,
/// and anything left is retried by the next fcvm command's reaper only if the record
/// survives, so the record is removed last.
fn teardown(store: &Store, id: &str) {
    let Ok(record) = store.update(id, |r| r.status = VmStatus::Stopping) else {
        return;
    };
    let failures = crate::cleanup::run_all(&record.cleanup);
    for f in &failures {
        tracing::warn!("{f}");
    }
    if failures.is_empty() {
        let _ = store.remove(id);
    } else {
        tracing::warn!(
            "VM {} not fully cleaned; its console log tail:\n{}",
            record.name,
            tail(&record.runtime_dir.join("console.log"), 5)
        );
    }
}
