//! The Firecracker-compatible HTTP API on `--api-sock`, routed in one place.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::vmm::{Vmm, VmmError};
use fcvm_fc_api::{
    ActionType, BootSource, Drive, InstanceAction, Logger, MachineConfig, MmdsConfig,
    NetworkInterface, PartialDrive, Vm, VmState, Vsock,
};

/// Version reported by `GET /` and `--version`.
pub const FIRECRACKER_VERSION: &str = "1.12.1";

type Resp = Response<Full<Bytes>>;

fn empty(status: StatusCode) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Firecracker's error body.
pub fn fault(status: StatusCode, msg: impl std::fmt::Display) -> Resp {
    json_resp(status, &json!({ "fault_message": msg.to_string() }))
}

/// A request failure: status and `fault_message`.
struct Fault(StatusCode, String);

fn fault_of(status: StatusCode, msg: impl std::fmt::Display) -> Fault {
    Fault(status, msg.to_string())
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Fault> {
    serde_json::from_slice(body).map_err(|e| {
        fault_of(
            StatusCode::BAD_REQUEST,
            format!("An error occurred when deserializing the json body of a request: {e}."),
        )
    })
}

fn vmm_err(e: VmmError) -> Fault {
    fault_of(StatusCode::BAD_REQUEST, e)
}

/// Serves one request.
pub async fn handle(
    vmm: Arc<Vmm>,
    req: Request<hyper::body::Incoming>,
) -> Result<Resp, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(fault(
                StatusCode::BAD_REQUEST,
                format!("Cannot read request body: {e}"),
            ))
        }
    };
    Ok(route(&vmm, &method, &path, &body)
        .await
        .unwrap_or_else(|Fault(status, msg)| fault(status, msg)))
}

async fn route(vmm: &Arc<Vmm>, method: &Method, path: &str, body: &[u8]) -> Result<Resp, Fault> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let ok = || Ok(empty(StatusCode::NO_CONTENT));
    match (method, segs.as_slice()) {
        (&Method::GET, []) => Ok(json_resp(
            StatusCode::OK,
            &json!({"id": vmm.id, "state": vmm.state().as_str(), "vmm_version": FIRECRACKER_VERSION, "app_name": "Firecracker"}),
        )),
        (&Method::GET, ["version"]) => Ok(json_resp(StatusCode::OK, &json!({"firecracker_version": FIRECRACKER_VERSION}))),
        (&Method::GET, ["vm", "config"]) => Ok(json_resp(StatusCode::OK, &full_config(vmm))),
        (&Method::GET, ["machine-config"]) => {
            let c = vmm.config.lock().unwrap_or_else(|p| p.into_inner()).machine.clone();
            Ok(json_resp(StatusCode::OK, &serde_json::to_value(c).unwrap_or_default()))
        }
        (&Method::PUT, ["boot-source"]) => {
            let b: BootSource = parse(body)?;
            vmm.ensure_not_started().map_err(vmm_err)?;
            vmm.config.lock().unwrap_or_else(|p| p.into_inner()).boot_source = Some(b);
            ok()
        }
        (&Method::PUT | &Method::PATCH, ["machine-config"]) => {
            vmm.ensure_not_started().map_err(vmm_err)?;
            let mut cfg = vmm.config.lock().unwrap_or_else(|p| p.into_inner());
            let m: MachineConfig = if method == Method::PATCH {
                let mut cur = serde_json::to_value(&cfg.machine).unwrap_or_default();
                crate::mmds::merge_patch(&mut cur, &parse::<Value>(body)?);
                parse(cur.to_string().as_bytes())?
            } else {
                parse(body)?
            };
            if !(1..=32).contains(&m.vcpu_count) {
                return Err(fault_of(StatusCode::BAD_REQUEST, "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled."));
            }
            if m.mem_size_mib == 0 {
                return Err(fault_of(StatusCode::BAD_REQUEST, "The memory size (MiB) is invalid."));
            }
            cfg.machine = m;
            ok()
        }
        (&Method::PUT, ["drives", id]) => {
            let d: Drive = parse(body)?;
            if d.drive_id != *id {
                return Err(fault_of(StatusCode::BAD_REQUEST, "The id from the path does not match the id from the body!"));
            }
            vmm.ensure_not_started().map_err(vmm_err)?;
            if !std::path::Path::new(&d.path_on_host).exists() {
                return Err(fault_of(StatusCode::BAD_REQUEST, format!("Unable to create the block device: cannot open {}: No such file or directory", d.path_on_host)));
            }
            let mut cfg = vmm.config.lock().unwrap_or_else(|p| p.into_inner());
            if d.is_root_device && cfg.drives.iter().any(|x| x.is_root_device && x.drive_id != d.drive_id) {
                return Err(fault_of(StatusCode::BAD_REQUEST, "A root block device already exists!"));
            }
            match cfg.drives.iter_mut().find(|x| x.drive_id == d.drive_id) {
                Some(x) => *x = d,
                None => cfg.drives.push(d),
            }
            ok()
        }
        (&Method::PATCH, ["drives", id]) => {
            let p: PartialDrive = parse(body)?;
            if p.drive_id != *id {
                return Err(fault_of(StatusCode::BAD_REQUEST, "The id from the path does not match the id from the body!"));
            }
            if vmm.ensure_not_started().is_err() {
                return Err(fault_of(StatusCode::BAD_REQUEST, "The sandbox VMM cannot swap a drive of a running guest."));
            }
            let mut cfg = vmm.config.lock().unwrap_or_else(|p| p.into_inner());
            let d = cfg.drives.iter_mut().find(|x| x.drive_id == p.drive_id).ok_or_else(|| fault_of(StatusCode::BAD_REQUEST, "Invalid block device ID!"))?;
            if let Some(path) = p.path_on_host {
                d.path_on_host = path;
            }
            ok()
        }
        (&Method::PUT, ["network-interfaces", id]) => {
            let n: NetworkInterface = parse(body)?;
            if n.iface_id != *id {
                return Err(fault_of(StatusCode::BAD_REQUEST, "The id from the path does not match the id from the body!"));
            }
            vmm.ensure_not_started().map_err(vmm_err)?;
            let mut cfg = vmm.config.lock().unwrap_or_else(|p| p.into_inner());
            cfg.nics.retain(|x| x.iface_id != n.iface_id);
            cfg.nics.push(n);
            ok()
        }
        (&Method::PUT, ["vsock"]) => {
            let v: Vsock = parse(body)?;
            vmm.set_vsock(v).map_err(vmm_err)?;
            ok()
        }
        (&Method::PUT, ["mmds", "config"]) => {
            let c: MmdsConfig = parse(body)?;
            vmm.ensure_not_started().map_err(vmm_err)?;
            if c.ipv4_address.as_deref().is_some_and(|a| a != "169.254.169.254") {
                return Err(fault_of(StatusCode::BAD_REQUEST, "The sandbox VMM serves MMDS on 169.254.169.254 only."));
            }
            match c.version.as_str() {
                "V1" => vmm.mmds.set_v2(false),
                "V2" => vmm.mmds.set_v2(true),
                v => return Err(fault_of(StatusCode::BAD_REQUEST, format!("Unknown MMDS version {v}"))),
            }
            vmm.config.lock().unwrap_or_else(|p| p.into_inner()).mmds_config = Some(c);
            ok()
        }
        (&Method::PUT, ["mmds"]) => {
            vmm.mmds.put(parse(body)?);
            ok()
        }
        (&Method::PATCH, ["mmds"]) => {
            vmm.mmds.patch(&parse(body)?);
            ok()
        }
        (&Method::GET, ["mmds"]) => Ok(json_resp(StatusCode::OK, &vmm.mmds.get())),
        (&Method::PUT, ["logger"]) => {
            let _: Logger = parse(body)?;
            ok()
        }
        (&Method::PUT, ["metrics"]) | (&Method::PUT, ["entropy"]) => ok(),
        (&Method::PUT, ["actions"]) => {
            let a: InstanceAction = parse(body)?;
            match a.action_type {
                ActionType::InstanceStart => vmm.start().await.map_err(vmm_err)?,
                ActionType::SendCtrlAltDel => vmm.ctrl_alt_del().map_err(vmm_err)?,
                ActionType::FlushMetrics => {}
            }
            ok()
        }
        (&Method::PATCH, ["vm"]) => {
            let v: Vm = parse(body)?;
            vmm.set_paused(v.state == VmState::Paused).map_err(vmm_err)?;
            ok()
        }
        (&Method::PUT, ["snapshot", "create" | "load"]) => Err(fault_of(
            StatusCode::BAD_REQUEST,
            "The fcvm sandbox VMM does not simulate memory snapshots: it runs the guest as processes in namespaces, with no guest memory to save or restore. Use Firecracker on a KVM host for snapshots.",
        )),
        (&Method::PUT | &Method::PATCH, ["balloon", ..]) => Err(fault_of(StatusCode::BAD_REQUEST, "The fcvm sandbox VMM has no balloon device.")),
        _ => Err(fault_of(StatusCode::BAD_REQUEST, format!("Invalid request method and/or path: {method} {path}."))),
    }
}

fn full_config(vmm: &Vmm) -> Value {
    let c = vmm.config.lock().unwrap_or_else(|p| p.into_inner()).clone();
    json!({
        "boot-source": c.boot_source,
        "machine-config": c.machine,
        "drives": c.drives,
        "network-interfaces": c.nics,
        "vsock": c.vsock,
        "mmds-config": c.mmds_config,
        "balloon": null,
        "logger": null,
        "metrics": null,
        "entropy": null,
    })
}

/// Serves the API on `listener` until the process exits.
pub async fn serve(vmm: Arc<Vmm>, listener: tokio::net::UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let vmm = vmm.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(vmm.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
