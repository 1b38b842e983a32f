//! Typed Firecracker API client: one method per call fcvm makes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::models::*;
use super::transport::{Transport, TransportError};

/// Deadline for configuration calls, which Firecracker answers in microseconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for snapshot create/load, which copy or map guest memory.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Client for one Firecracker (or compatible VMM) API socket.
#[derive(Debug, Clone)]
pub struct FirecrackerClient {
    transport: Transport,
    timeout: Duration,
}

impl FirecrackerClient {
    /// Client for the API socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            transport: Transport::new(socket),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Use `timeout` for ordinary calls.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Wait until the socket accepts an API request, or fail after `deadline`.
    pub async fn wait_ready(&self, deadline: Duration) -> Result<InstanceInfo, TransportError> {
        let start = Instant::now();
        loop {
            match self.instance_info().await {
                Ok(info) => return Ok(info),
                Err(e @ TransportError::Connect { .. }) if start.elapsed() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `GET /`.
    pub async fn instance_info(&self) -> Result<InstanceInfo, TransportError> {
        self.get("/").await
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<FirecrackerVersion, TransportError> {
        self.get("/version").await
    }

    /// `GET /vm/config`.
    pub async fn vm_config(&self) -> Result<FullVmConfig, TransportError> {
        self.get("/vm/config").await
    }

    /// `PUT /machine-config`.
    pub async fn put_machine_config(&self, cfg: &MachineConfig) -> Result<(), TransportError> {
        self.send(Method::PUT, "/machine-config", cfg, self.timeout)
            .await
    }

    /// `PUT /boot-source`.
    pub async fn put_boot_source(&self, boot: &BootSource) -> Result<(), TransportError> {
        self.send(Method::PUT, "/boot-source", boot, self.timeout)
            .await
    }

    /// `PUT /drives/{id}`.
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), TransportError> {
        let uri = format!("/drives/{}", drive.drive_id);
        self.send(Method::PUT, &uri, drive, self.timeout).await
    }

    /// `PATCH /drives/{id}`.
    pub async fn patch_drive(&self, drive: &PartialDrive) -> Result<(), TransportError> {
        let uri = format!("/drives/{}", drive.drive_id);
        self.send(Method::PATCH, &uri, drive, self.timeout).await
    }

    /// `PUT /network-interfaces/{id}`.
    pub async fn put_network_interface(
        &self,
        iface: &NetworkInterface,
    ) -> Result<(), TransportError> {
        let uri = format!("/network-interfaces/{}", iface.iface_id);
        self.send(Method::PUT, &uri, iface, self.timeout).await
    }

    /// `PUT /vsock`.
    pub async fn put_vsock(&self, vsock: &Vsock) -> Result<(), TransportError> {
        self.send(Method::PUT, "/vsock", vsock, self.timeout).await
    }

    /// `PUT /mmds/config`.
    pub async fn put_mmds_config(&self, cfg: &MmdsConfig) -> Result<(), TransportError> {
        self.send(Method::PUT, "/mmds/config", cfg, self.timeout)
            .await
    }

    /// `PUT /mmds`: replace the metadata store.
    pub async fn put_mmds(&self, data: &serde_json::Value) -> Result<(), TransportError> {
        self.send(Method::PUT, "/mmds", data, self.timeout).await
    }

    /// `PATCH /mmds`: merge into the metadata store.
    pub async fn patch_mmds(&self, data: &serde_json::Value) -> Result<(), TransportError> {
        self.send(Method::PATCH, "/mmds", data, self.timeout).await
    }

    /// `GET /mmds`.
    pub async fn get_mmds(&self) -> Result<serde_json::Value, TransportError> {
        self.get("/mmds").await
    }

    /// `PUT /actions`.
    pub async fn action(&self, action_type: ActionType) -> Result<(), TransportError> {
        self.send(
            Method::PUT,
            "/actions",
            &InstanceAction { action_type },
            self.timeout,
        )
        .await
    }

    /// Boot the configured VM.
    pub async fn start(&self) -> Result<(), TransportError> {
        self.action(ActionType::InstanceStart).await
    }

    /// `PATCH /vm {"state":"Paused"}`.
    pub async fn pause(&self) -> Result<(), TransportError> {
        self.set_vm_state(VmState::Paused).await
    }

    /// `PATCH /vm {"state":"Resumed"}`.
    pub async fn resume(&self) -> Result<(), TransportError> {
        self.set_vm_state(VmState::Resumed).await
    }

    async fn set_vm_state(&self, state: VmState) -> Result<(), TransportError> {
        self.send(Method::PATCH, "/vm", &Vm { state }, self.timeout)
            .await
    }

    /// `PUT /snapshot/create` (the VM must be paused).
    pub async fn create_snapshot(
        &self,
        params: &SnapshotCreateParams,
    ) -> Result<(), TransportError> {
        self.send(Method::PUT, "/snapshot/create", params, SNAPSHOT_TIMEOUT)
            .await
    }

    /// `PUT /snapshot/load` (only on a fresh Firecracker process).
    pub async fn load_snapshot(&self, params: &SnapshotLoadParams) -> Result<(), TransportError> {
        self.send(Method::PUT, "/snapshot/load", params, SNAPSHOT_TIMEOUT)
            .await
    }

    async fn get<T: DeserializeOwned>(&self, uri: &str) -> Result<T, TransportError> {
        let body = self
            .transport
            .request(Method::GET, uri, None, self.timeout)
            .await?;
        serde_json::from_slice(&body).map_err(|source| TransportError::Json {
            method: Method::GET,
            uri: uri.to_owned(),
            source,
        })
    }

    async fn send<B: Serialize>(
        &self,
        method: Method,
        uri: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let bytes = serde_json::to_vec(body).map_err(|source| TransportError::Json {
            method: method.clone(),
            uri: uri.to_owned(),
            source,
        })?;
        self.transport
            .request(method, uri, Some(bytes), timeout)
            .await
            .map(|_| ())
    }
}
