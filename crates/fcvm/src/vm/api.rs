//! The calls fcvm makes on a VMM's API, as one enum (Firecracker's `VmmAction` idea), behind
//! a small trait so the launch sequence runs against a recording fake in unit tests.

use std::future::Future;
use std::pin::Pin;

use crate::firecracker::models::{
    ActionType, BootSource, Drive, MachineConfig, MmdsConfig, NetworkInterface, PartialDrive,
    SnapshotLoadParams, Vsock,
};
use crate::firecracker::{FirecrackerClient, TransportError};

/// One API call. Each variant notes whether it is valid before or after boot.
#[derive(Debug, Clone, Copy)]
pub enum ApiCall<'a> {
    /// Pre-boot: vCPUs, memory, dirty tracking.
    MachineConfig(&'a MachineConfig),
    /// Pre-boot: kernel, initrd, command line.
    BootSource(&'a BootSource),
    /// Pre-boot: one block device.
    Drive(&'a Drive),
    /// Pre-boot: one network interface.
    Network(&'a NetworkInterface),
    /// Pre-boot: the hybrid vsock.
    Vsock(&'a Vsock),
    /// Pre-boot: MMDS version and interfaces.
    MmdsConfig(&'a MmdsConfig),
    /// Any time: replace the MMDS data store.
    MmdsData(&'a serde_json::Value),
    /// Pre-boot: boot.
    InstanceStart,
    /// Fresh process only: restore a snapshot (paused).
    LoadSnapshot(&'a SnapshotLoadParams),
    /// After a load: point a drive at another file.
    PatchDrive(&'a PartialDrive),
    /// After boot or a load: run the vCPUs.
    Resume,
    /// After boot: press Ctrl+Alt+Del (a graceful stop for Linux and the probe guest).
    CtrlAltDel,
}

impl ApiCall<'_> {
    /// Short name, for logs and the fake.
    pub fn name(&self) -> &'static str {
        match self {
            ApiCall::MachineConfig(_) => "machine-config",
            ApiCall::BootSource(_) => "boot-source",
            ApiCall::Drive(_) => "drive",
            ApiCall::Network(_) => "network-interface",
            ApiCall::Vsock(_) => "vsock",
            ApiCall::MmdsConfig(_) => "mmds-config",
            ApiCall::MmdsData(_) => "mmds",
            ApiCall::InstanceStart => "instance-start",
            ApiCall::LoadSnapshot(_) => "snapshot-load",
            ApiCall::PatchDrive(_) => "patch-drive",
            ApiCall::Resume => "resume",
            ApiCall::CtrlAltDel => "ctrl-alt-del",
        }
    }
}

/// A boxed API future (the trait is used as `dyn`).
pub type ApiFuture<'a> = Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send + 'a>>;

/// Something that answers [`ApiCall`]s: Firecracker's API socket, or a test fake.
pub trait VmmApi: Send + Sync + std::fmt::Debug {
    /// Make one call.
    fn call<'a>(&'a self, call: ApiCall<'a>) -> ApiFuture<'a>;
}

impl VmmApi for FirecrackerClient {
    fn call<'a>(&'a self, call: ApiCall<'a>) -> ApiFuture<'a> {
        Box::pin(async move {
            match call {
                ApiCall::MachineConfig(c) => self.put_machine_config(c).await,
                ApiCall::BootSource(b) => self.put_boot_source(b).await,
                ApiCall::Drive(d) => self.put_drive(d).await,
                ApiCall::Network(n) => self.put_network_interface(n).await,
                ApiCall::Vsock(v) => self.put_vsock(v).await,
                ApiCall::MmdsConfig(m) => self.put_mmds_config(m).await,
                ApiCall::MmdsData(d) => self.put_mmds(d).await,
                ApiCall::InstanceStart => self.start().await,
                ApiCall::LoadSnapshot(p) => self.load_snapshot(p).await,
                ApiCall::PatchDrive(d) => self.patch_drive(d).await,
                ApiCall::Resume => self.resume().await,
                ApiCall::CtrlAltDel => self.action(ActionType::SendCtrlAltDel).await,
            }
        })
    }
}
