//! [`launch`]: from a [`VmSpec`] to a configured VM with a [`VmHandle`].
//!
//! Order, each step's undo recorded before the step runs (so a crash at any point is
//! finished by the next fcvm command's reaper):
//!
//! 1. the state record, with `RemoveDir` for the runtime directory and the network's undo
//!    steps (name claimed here; a clash fails before anything exists);
//! 2. the network attachment (namespace and TAP);
//! 3. the runtime directory and private drive copies;
//! 4. the VMM process (its `KillProcess` goes first in the record as soon as its pid is
//!    known; a foreground VMM also dies with fcvm through PR_SET_PDEATHSIG);
//! 5. configuration through the API: machine, boot source, drives, network, vsock, MMDS;
//!    or, for a snapshot, the load (paused) and the drive patches.
//!
//! [`VmHandle::start`] then boots or resumes it. On any failure everything made so far is
//! torn down with [`crate::cleanup::teardown`] and the error quotes the end of the VMM's
//! log (the log itself goes with the runtime directory).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::cleanup::CleanupStep;
use crate::firecracker::models::{
    BootSource, Drive, MachineConfig, MemBackend, MemBackendType, MmdsConfig, PartialDrive,
    SnapshotLoadParams, Vsock,
};
use crate::firecracker::TransportError;
use crate::network::{attachment::GUEST_IFACE, HostNet, NetError, NetOps, NetworkAttachment};
use crate::paths::VmPaths;
use crate::state::{Store, StoreError, VmRecord, VmmKind};

use super::api::ApiCall;
use super::handle::VmHandle;
use super::spawn::{tail, DirectSpawner, SpawnError, SpawnOptions, Spawner};
use super::spec::{Launcher, Lifetime, MemorySource, Source, VmSpec};

/// Lines of the VMM log quoted in an error.
const LOG_LINES: usize = 15;

/// What a launch works with: the state store, the network seam and the VMM seam.
#[derive(Debug, Clone)]
pub struct Host {
    /// The state store.
    pub store: Store,
    /// Namespace and TAP operations.
    pub net: Arc<dyn NetOps>,
    /// Starts VMM processes.
    pub spawner: Arc<dyn Spawner>,
}

impl Host {
    /// The real host around `store`.
    pub fn new(store: Store) -> Host {
        Host {
            store,
            net: Arc::new(HostNet),
            spawner: Arc::new(DirectSpawner),
        }
    }
}

/// The end of a VMM log, quoted in errors (empty when the log says nothing).
#[derive(Debug, Clone, Default)]
pub struct LogTail(pub String);

impl LogTail {
    fn of(paths: &VmPaths) -> LogTail {
        LogTail(tail(&paths.firecracker_log(), LOG_LINES))
    }
}

impl std::fmt::Display for LogTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.trim().is_empty() {
            Ok(())
        } else {
            write!(f, "\nFirecracker's log ends with:\n{}", self.0)
        }
    }
}

/// Why a VM could not be launched or started. Everything made for it has been removed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// State store (includes a name clash).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Namespace or TAP.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The runtime directory or a drive copy.
    #[error("cannot {action} {}", path.display())]
    Files {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The VMM did not start.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// The VMM refused a call (the cause is part of the message, with the log's end).
    #[error("{step}: {cause}{log}")]
    Api {
        /// What was being done.
        step: &'static str,
        /// The refusal.
        cause: TransportError,
        /// The end of the VMM's log.
        log: LogTail,
    },
    /// The kernel command line cannot carry the guest's network configuration.
    #[error(transparent)]
    Cmdline(#[from] fcvm_proto::cmdline::BuildError),
    /// `start` on a VM that is not configured.
    #[error("VM {name} cannot be started: it is {state:?}")]
    State {
        /// The VM.
        name: String,
        /// Its state.
        state: super::handle::VmState,
    },
}

/// The record of a VM about to be launched: claimed name, undo steps for what launch makes.
pub fn initial_record(spec: &VmSpec) -> VmRecord {
    let mut r = VmRecord::new(
        spec.id.clone(),
        spec.name.clone(),
        spec.kind,
        spec.paths.dir().to_owned(),
    );
    r.vmm_kind = match spec.launcher {
        Launcher::Direct { .. } => VmmKind::Firecracker,
    };
    r.guest = spec.guest;
    r.vcpus = spec.resources.vcpus;
    r.mem_mib = spec.resources.mem_mib;
    r.track_dirty_pages = spec.resources.track_dirty_pages;
    r.kernel = spec.kernel();
    r.image = spec.labels.image.clone();
    r.snapshot = spec.labels.snapshot.clone();
    r.diff_parent = spec.labels.snapshot.clone();
    r.api_socket = Some(spec.paths.api_socket());
    r.console_log = Some(spec.paths.console_log());
    r.network = spec.network.clone();
    if let Source::Snapshot {
        memory: MemorySource::Uffd { socket, server },
        ..
    } = &spec.source
    {
        r.uffd_socket = Some(socket.clone());
        r.page_server = Some(*server);
    }
    r.cleanup = spec.network.undo_steps();
    r.cleanup.push(CleanupStep::RemoveDir {
        path: spec.paths.dir().to_owned(),
    });
    r
}

/// Record, create and configure the VM of `spec` (steps 1–5 above). The returned handle
/// owns it: [`VmHandle::start`] boots it, and dropping the handle tears it down.
pub async fn launch(host: &Host, mut spec: VmSpec) -> Result<VmHandle, LaunchError> {
    let t0 = Instant::now();
    let mut record = initial_record(&spec);
    let reaped = host.store.create_with(&mut record, |all, r| {
        if let NetworkAttachment::Bridged(b) = &mut r.network {
            b.assign(crate::network::bridged::free_slot(all).ok_or(NetError::PoolExhausted)?);
        }
        Ok(())
    })?;
    for r in reaped {
        r.report.warn();
    }
    // The guest learns the address just decided from its kernel command line.
    spec.network = record.network.clone();
    let mut cmdline_error = None;
    if let (Some(ip), Source::Boot { cmdline, .. }) = (spec.network.ip_config(), &mut spec.source) {
        match fcvm_proto::cmdline::CmdlineBuilder::parse(cmdline)
            .ip(&ip)
            .build()
        {
            Ok(line) => *cmdline = line,
            Err(e) => cmdline_error = Some(e),
        }
    }
    tracing::debug!(vm = %spec.name, id = %spec.id, "recorded after {:?}", t0.elapsed());
    let mut handle = VmHandle::new(host.clone(), spec, record);
    handle.timings.record = t0.elapsed();
    if let Some(e) = cmdline_error {
        handle.abort();
        return Err(LaunchError::Cmdline(e));
    }
    match build(&mut handle).await {
        Ok(()) => {
            handle.configured();
            Ok(handle)
        }
        Err(e) => {
            handle.abort();
            Err(e)
        }
    }
}

async fn build(handle: &mut VmHandle) -> Result<(), LaunchError> {
    let host = handle.host().clone();
    let spec = handle.spec().clone();
    let t = Instant::now();
    spec.network.create(host.net.as_ref())?;
    handle.timings.network = t.elapsed();
    tracing::debug!(network = ?spec.network, "network ready in {:?}", t.elapsed());

    let t = Instant::now();
    let dir = spec.paths.dir();
    std::fs::create_dir_all(dir).map_err(files("create", dir))?;
    for d in &spec.drives {
        if let Some(rel) = &d.copy_to {
            let dst = dir.join(rel);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent).map_err(files("create", parent))?;
            }
            crate::storage::clone_file(&d.file, &dst).map_err(files("copy", &d.file))?;
        }
    }
    handle.timings.files = t.elapsed();
    tracing::debug!(
        drives = spec.drives.len(),
        "files ready in {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    let Launcher::Direct { binary } = &spec.launcher;
    let opts = SpawnOptions {
        binary: binary.clone(),
        id: spec.id.clone(),
        vm_paths: spec.paths.clone(),
        netns: spec.network.netns().map(str::to_owned),
        die_with_parent: spec.lifetime == Lifetime::Foreground,
        ksm: spec.ksm,
    };
    let vmm = host.spawner.spawn(&opts).await?;
    let process = vmm.process;
    handle.timings.spawn = t.elapsed();
    tracing::debug!(pid = process.pid, "VMM API ready in {:?}", t.elapsed());
    handle.attach_vmm(vmm);
    handle.update(|r| {
        r.vmm = Some(process);
        r.cleanup.insert(0, CleanupStep::KillProcess { process });
    })?;

    let t = Instant::now();
    match &spec.source {
        Source::Boot { .. } => configure_boot(handle, &spec).await?,
        Source::Snapshot { .. } => restore(handle, &spec).await?,
    }
    handle.timings.configure = t.elapsed();
    tracing::debug!("configured in {:?}", t.elapsed());
    Ok(())
}

fn files(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError {
    let path = path.to_owned();
    move |source| LaunchError::Files {
        action,
        path,
        source,
    }
}

/// Make one API call, turning a refusal into [`LaunchError::Api`] with the log's end.
pub(crate) async fn call(
    handle: &VmHandle,
    step: &'static str,
    call: ApiCall<'_>,
) -> Result<(), LaunchError> {
    let Some(api) = handle.api() else {
        return Err(LaunchError::State {
            name: handle.record().name.to_string(),
            state: handle.state(),
        });
    };
    api.call(call).await.map_err(|cause| LaunchError::Api {
        step,
        cause,
        log: LogTail::of(handle.paths()),
    })
}

/// The path the VMM sees for a drive (copies live in its view of the runtime dir).
fn vmm_path(rel: Option<&PathBuf>, file: &Path) -> String {
    match rel {
        Some(rel) => VmPaths::vmm_view().dir().join(rel).display().to_string(),
        None => file.display().to_string(),
    }
}

async fn configure_boot(handle: &VmHandle, spec: &VmSpec) -> Result<(), LaunchError> {
    let Source::Boot {
        kernel,
        initrd,
        cmdline,
    } = &spec.source
    else {
        unreachable!("checked by the caller")
    };
    let machine = MachineConfig {
        vcpu_count: spec.resources.vcpus,
        mem_size_mib: spec.resources.mem_mib,
        track_dirty_pages: spec.resources.track_dirty_pages,
        ..Default::default()
    };
    call(
        handle,
        "setting vCPUs and memory",
        ApiCall::MachineConfig(&machine),
    )
    .await?;
    let boot = BootSource {
        kernel_image_path: kernel.display().to_string(),
        initrd_path: initrd.as_ref().map(|p| p.display().to_string()),
        boot_args: Some(cmdline.clone()),
    };
    call(handle, "setting the kernel", ApiCall::BootSource(&boot)).await?;
    for d in &spec.drives {
        let drive = Drive::new(
            d.id.clone(),
            vmm_path(d.copy_to.as_ref(), &d.file),
            d.root,
            d.read_only,
        );
        call(handle, "attaching a drive", ApiCall::Drive(&drive)).await?;
    }
    if let Some(iface) = spec.network.interface(&spec.id) {
        call(
            handle,
            "attaching the network interface",
            ApiCall::Network(&iface),
        )
        .await?;
    }
    if spec.vsock {
        let vsock = Vsock {
            guest_cid: fcvm_proto::vsock::GUEST_CID,
            uds_path: VmPaths::vmm_view().vsock_socket().display().to_string(),
            ..Default::default()
        };
        call(handle, "attaching the vsock", ApiCall::Vsock(&vsock)).await?;
    }
    if let Some(mmds) = &spec.mmds {
        let config = MmdsConfig {
            version: mmds.version,
            network_interfaces: vec![GUEST_IFACE.into()],
            ipv4_address: None,
            imds_compat: None,
        };
        call(handle, "configuring MMDS", ApiCall::MmdsConfig(&config)).await?;
        call(
            handle,
            "putting the MMDS data",
            ApiCall::MmdsData(&mmds.data),
        )
        .await?;
    }
    Ok(())
}

async fn restore(handle: &VmHandle, spec: &VmSpec) -> Result<(), LaunchError> {
    let Source::Snapshot { vmstate, memory } = &spec.source else {
        unreachable!("checked by the caller")
    };
    let mem_backend = match memory {
        MemorySource::File(path) => MemBackend {
            backend_type: MemBackendType::File,
            backend_path: path.display().to_string(),
        },
        MemorySource::Uffd { socket, .. } => MemBackend {
            backend_type: MemBackendType::Uffd,
            backend_path: socket.display().to_string(),
        },
    };
    let load = SnapshotLoadParams {
        snapshot_path: vmstate.display().to_string(),
        mem_backend,
        track_dirty_pages: spec.resources.track_dirty_pages.then_some(true),
        // Loaded paused: drives are repointed first, and `start` resumes.
        resume_vm: Some(false),
    };
    call(handle, "loading the snapshot", ApiCall::LoadSnapshot(&load)).await?;
    for d in &spec.drives {
        let patch = PartialDrive {
            drive_id: d.id.clone(),
            path_on_host: Some(vmm_path(d.copy_to.as_ref(), &d.file)),
            ..Default::default()
        };
        call(
            handle,
            "pointing a drive at the clone's copy",
            ApiCall::PatchDrive(&patch),
        )
        .await?;
    }
    Ok(())
}
