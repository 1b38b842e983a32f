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
use super::jail::{self, CgroupLayout, JailError, JailPlan, Stage};
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
    /// The jail could not be prepared.
    #[error(transparent)]
    Jail(Box<JailError>),
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

impl From<JailError> for LaunchError {
    fn from(e: JailError) -> LaunchError {
        LaunchError::Jail(Box::new(e))
    }
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
        Launcher::Direct { .. } | Launcher::Jailer(_) => VmmKind::Firecracker,
    };
    r.guest = spec.guest;
    r.vcpus = spec.resources.vcpus;
    r.mem_mib = spec.resources.mem_mib;
    r.track_dirty_pages = spec.resources.track_dirty_pages;
    r.kernel = spec.kernel();
    r.image = spec.labels.image.clone();
    r.log_dir = spec.log_dir.clone();
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
    let plan = match &spec.launcher {
        Launcher::Jailer(cfg) => Some(JailPlan::claim(
            cfg,
            &spec.id,
            spec.resources.mem_mib,
            spec.resources.vcpus,
            CgroupLayout::detect(),
        )?),
        Launcher::Direct { .. } => None,
    };
    if let Some(plan) = &plan {
        if plan.cgroups.is_none() {
            tracing::warn!("no cgroup memory and cpu controllers found: the jailed VM runs without a memory limit or CPU weight");
        }
        record.jail = Some(plan.info());
        record.cleanup.extend(plan.undo_steps());
    }
    // Read before taking the store's lock, which the slot choice holds.
    let host_nets = match &record.network {
        NetworkAttachment::Bridged(_) => crate::network::bridged::host_networks(),
        _ => Vec::new(),
    };
    let created = host.store.create_with(&mut record, |all, r| {
        if let NetworkAttachment::Bridged(b) = &mut r.network {
            crate::network::bridged::check_unpublished(all, &b.publish).map_err(NetError::from)?;
            b.assign(
                crate::network::bridged::free_slot(all, &host_nets)
                    .ok_or(NetError::PoolExhausted)?,
            );
        }
        Ok(())
    });
    match created {
        Ok(reaped) => reaped.iter().for_each(|r| r.report.warn()),
        Err(e) => {
            if let Some(plan) = &plan {
                plan.release();
            }
            return Err(e.into());
        }
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
    match build(&mut handle, plan).await {
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

async fn build(handle: &mut VmHandle, plan: Option<JailPlan>) -> Result<(), LaunchError> {
    let host = handle.host().clone();
    let spec = handle.spec().clone();
    let t = Instant::now();
    spec.network
        .create(host.net.as_ref(), plan.as_ref().map(|p| p.uid))?;
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
            if let Some(plan) = &plan {
                jail::private_to(&dst, plan.uid)?;
            }
        }
    }
    let inputs = match &plan {
        Some(plan) => {
            lend_written_drives(handle, &spec, plan).map_err(|e| *e)?;
            if let crate::network::NetworkAttachment::VmmTap { tap } = &spec.network {
                // The jailed VMM may not create a TAP: fcvm makes it, for the VM's uid.
                let step = CleanupStep::DeleteTap { name: tap.clone() };
                handle.update(|r| r.cleanup.push(step))?;
                crate::network::create_owned_tap(tap, plan.uid)
                    .map_err(files("create the TAP", Path::new(tap)))?;
            }
            stage_inputs(&spec, plan)?
        }
        None => Inputs::default(),
    };
    handle.timings.files = t.elapsed();
    tracing::debug!(
        drives = spec.drives.len(),
        "files ready in {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    let opts = SpawnOptions {
        binary: spec.launcher.firecracker().to_owned(),
        id: spec.id.clone(),
        vm_paths: spec.paths.clone(),
        netns: spec.network.netns().map(str::to_owned),
        die_with_parent: spec.lifetime == Lifetime::Foreground,
        ksm: spec.ksm,
        jail: match (&spec.launcher, plan) {
            (Launcher::Jailer(cfg), Some(plan)) => Some((cfg.clone(), plan)),
            _ => None,
        },
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
        Source::Boot { .. } => configure_boot(handle, &spec, &inputs).await?,
        Source::Snapshot { .. } => restore(handle, &spec, &inputs).await?,
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

/// The paths a jailed VMM knows files from outside its runtime directory by (empty for a
/// VMM that sees the host's files).
#[derive(Debug, Default)]
struct Inputs(std::collections::HashMap<PathBuf, String>);

impl Inputs {
    fn of(&self, host: &Path) -> String {
        self.0
            .get(host)
            .cloned()
            .unwrap_or_else(|| host.display().to_string())
    }

    /// The path the VMM sees for a drive (copies live in its view of the runtime dir).
    fn drive(&self, rel: Option<&PathBuf>, file: &Path) -> String {
        match rel {
            Some(rel) => VmPaths::vmm_view().dir().join(rel).display().to_string(),
            None => self.of(file),
        }
    }
}

/// A drive the guest writes in place (`fcvm run --rootfs FILE`) must be writable by the
/// jailed VMM's uid: it is lent to that uid for the VM's life, the owner restored at
/// teardown (recorded before the chown).
fn lend_written_drives(
    handle: &mut VmHandle,
    spec: &VmSpec,
    plan: &JailPlan,
) -> Result<(), Box<LaunchError>> {
    use std::os::unix::fs::MetadataExt;
    for d in spec
        .drives
        .iter()
        .filter(|d| d.copy_to.is_none() && !d.read_only)
    {
        let meta = std::fs::metadata(&d.file).map_err(|e| Box::new(files("read", &d.file)(e)))?;
        if meta.uid() == plan.uid || meta.mode() & 0o006 == 0o006 {
            continue;
        }
        let step = CleanupStep::RestoreOwner {
            path: d.file.clone(),
            uid: meta.uid(),
            gid: meta.gid(),
        };
        handle
            .update(|r| r.cleanup.push(step))
            .map_err(|e| Box::new(e.into()))?;
        std::os::unix::fs::chown(&d.file, Some(plan.uid), Some(plan.uid))
            .map_err(|e| Box::new(files("lend to the jailed VMM", &d.file)(e)))?;
    }
    Ok(())
}

/// Put what the jailed VMM must open from outside its runtime directory into it.
fn stage_inputs(spec: &VmSpec, plan: &JailPlan) -> Result<Inputs, JailError> {
    let dir = spec.paths.dir();
    let mut map = std::collections::HashMap::new();
    let mut stage = |what: &str, name: &str, src: &Path, how: Stage| -> Result<(), JailError> {
        let p = jail::stage_input(dir, plan.uid, what, name, src, how)?;
        map.insert(src.to_owned(), p);
        Ok(())
    };
    match &spec.source {
        Source::Boot { kernel, initrd, .. } => {
            // Named as on the host, so the VM's configuration still says which kernel.
            let name = |p: &Path, default: &str| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| default.to_owned())
            };
            stage(
                "kernel",
                &name(kernel, "kernel"),
                kernel,
                Stage::Link { write: false },
            )?;
            if let Some(initrd) = initrd {
                let n = format!("initrd-{}", name(initrd, "initrd"));
                stage("initrd", &n, initrd, Stage::Link { write: false })?;
            }
        }
        Source::Snapshot { vmstate, memory } => {
            stage("snapshot state", "vmstate", vmstate, Stage::Copy)?;
            match memory {
                MemorySource::File(f) => stage("snapshot memory", "memory", f, Stage::Copy)?,
                MemorySource::Uffd { socket, .. } => {
                    stage("page server socket", "uffd.sock", socket, Stage::Socket)?
                }
            }
        }
    }
    for d in spec.drives.iter().filter(|d| d.copy_to.is_none()) {
        let name = format!("drive-{}", d.id);
        stage(
            &format!("drive {}", d.id),
            &name,
            &d.file,
            Stage::Link {
                write: !d.read_only,
            },
        )?;
    }
    Ok(Inputs(map))
}

async fn configure_boot(
    handle: &VmHandle,
    spec: &VmSpec,
    inputs: &Inputs,
) -> Result<(), LaunchError> {
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
        kernel_image_path: inputs.of(kernel),
        initrd_path: initrd.as_ref().map(|p| inputs.of(p)),
        boot_args: Some(cmdline.clone()),
    };
    call(handle, "setting the kernel", ApiCall::BootSource(&boot)).await?;
    for d in &spec.drives {
        let drive = Drive::new(
            d.id.clone(),
            inputs.drive(d.copy_to.as_ref(), &d.file),
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

async fn restore(handle: &VmHandle, spec: &VmSpec, inputs: &Inputs) -> Result<(), LaunchError> {
    let Source::Snapshot { vmstate, memory } = &spec.source else {
        unreachable!("checked by the caller")
    };
    let mem_backend = match memory {
        MemorySource::File(path) => MemBackend {
            backend_type: MemBackendType::File,
            backend_path: inputs.of(path),
        },
        MemorySource::Uffd { socket, .. } => MemBackend {
            backend_type: MemBackendType::Uffd,
            backend_path: inputs.of(socket),
        },
    };
    let load = SnapshotLoadParams {
        snapshot_path: inputs.of(vmstate),
        mem_backend,
        track_dirty_pages: spec.resources.track_dirty_pages.then_some(true),
        // Loaded paused: drives are repointed first, and `start` resumes.
        resume_vm: Some(false),
    };
    call(handle, "loading the snapshot", ApiCall::LoadSnapshot(&load)).await?;
    for d in &spec.drives {
        let patch = PartialDrive {
            drive_id: d.id.clone(),
            path_on_host: Some(inputs.drive(d.copy_to.as_ref(), &d.file)),
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
