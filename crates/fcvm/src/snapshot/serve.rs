//! `fcvm snapshot serve`: one UFFD page server (crate `fcvm-uffd`) for many clones.
//!
//! The server listens on `<base>/uffd/<tag>-<pid>.sock` (kept short: Unix socket paths are
//! limited to 107 bytes) before any clone loads, and records itself in the state store
//! (kind `page_server`, the snapshot, the socket) so `snapshot run --pid` can find it and
//! clones can name it as their memory source. Every second it refreshes `stats.json` in its
//! runtime dir and the live/served counters in its record (`fcvm ls` shows them).
//!
//! On SIGTERM or SIGINT it stops accepting new clones but keeps serving the live ones until
//! they exit: closing a live clone's uffd would hand it zero pages, silently corrupting
//! it. If the server itself is killed, clones notice through their records (see the reaper
//! in `state`) and are stopped loudly.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use fcvm_uffd::{PageServer, ServerConfig, ServerError, ServerEvent};
use tokio::signal::unix::{signal, SignalKind};

use crate::cleanup::CleanupStep;
use crate::fsutil;
use crate::names::{Name, NameError};
use crate::paths::{Paths, MAX_SOCKET_PATH};
use crate::state::{new_vm_id, Store, StoreError as StateError, VmKind, VmRecord, VmStatus};

use super::meta::MEMORY_FILE;
use super::store::{SnapshotStore, StoreError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Bad name.
    #[error("invalid --name")]
    Name(#[from] NameError),
    /// Snapshot store.
    #[error(transparent)]
    Snapshots(#[from] StoreError),
    /// State store.
    #[error(transparent)]
    State(#[from] StateError),
    /// Socket path too long.
    #[error(
        "page server socket path {} is over {MAX_SOCKET_PATH} bytes; use a shorter FCVM_BASE_DIR", .0.display()
    )]
    SocketPath(PathBuf),
    /// The server failed.
    #[error("page server")]
    Server(#[from] ServerError),
    /// Local I/O.
    #[error("page server I/O")]
    Io(#[from] std::io::Error),
}

/// The socket a server with pid `pid` uses for `tag`.
pub fn socket_path(paths: &Paths, tag: &str, pid: u32) -> PathBuf {
    paths.base().join("uffd").join(format!("{tag}-{pid}.sock"))
}

/// Serve `tag` until SIGTERM/SIGINT and then until the last clone exits. Progress lines go
/// to `log` (stderr for the CLI). `extra_cleanup` is recorded too (e.g. a detached
/// server's log file).
pub async fn serve(
    paths: &Paths,
    tag: &str,
    name: Option<String>,
    fault_around_pages: u64,
    extra_cleanup: Vec<CleanupStep>,
    log: &mut (dyn Write + Send),
) -> Result<(), ServeError> {
    let snapshots = SnapshotStore::open(paths)?;
    let meta = snapshots.get(tag)?;
    let pid = std::process::id();
    let socket = socket_path(paths, tag, pid);
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ServeError::SocketPath(socket));
    }
    let socket_dir = socket.parent().expect("has a parent");
    std::fs::create_dir_all(socket_dir)?;
    // Only root passes this directory; a jailed clone reaches the socket through the hard
    // link in its chroot, and the server checks its uid (SO_PEERCRED).
    fsutil::set_mode(socket_dir, 0o700)?;
    let id = new_vm_id();
    let name = Name::parse(&name.unwrap_or_else(|| format!("serve-{tag}-{pid}")))?;
    let dir = paths.vm_dir(&id);
    let mut record = VmRecord::new(id.clone(), name, VmKind::PageServer, dir.clone());
    record.snapshot = Some(tag.to_owned());
    record.uffd_socket = Some(socket.clone());
    record.mem_mib = meta.mem_mib;
    record.vcpus = meta.vcpus;
    record.kernel = meta.kernel.clone();
    record.cleanup = vec![
        CleanupStep::RemoveFile {
            path: socket.clone(),
        },
        CleanupStep::RemoveDir { path: dir.clone() },
    ];
    record.cleanup.extend(extra_cleanup);
    let state = Store::open(paths)?;
    state.create(&record)?;
    let mut config = ServerConfig::new(&socket, snapshots.path(tag).join(MEMORY_FILE));
    config.fault_around_pages = fault_around_pages;
    config.peer_uids = Some(crate::vm::jail::uid_range());
    let result = run(&state, &record, tag, config, log).await;
    match crate::cleanup::teardown(&state, &id, crate::cleanup::Disposition::Forget) {
        Ok(report) => {
            for f in &report.failures {
                let _ = writeln!(log, "warning: {f}");
            }
        }
        Err(e) => {
            let _ = writeln!(log, "warning: {}", crate::report::chain(&e));
        }
    }
    result
}

async fn run(
    state: &Store,
    record: &VmRecord,
    tag: &str,
    config: ServerConfig,
    log: &mut (dyn Write + Send),
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&record.runtime_dir)?;
    let socket = config.socket_path.clone();
    let server = PageServer::bind(config)?;
    let mut events = server.subscribe();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    state.update(&record.id, |r| {
        r.status = VmStatus::Running;
        r.served_live = Some(0);
        r.served_pages = Some(0);
    })?;
    let _ = writeln!(
        log,
        "serving snapshot {tag} ({} MiB) on {} (pid {}); clones: `fcvm snapshot run --pid {}`",
        server.memory_len() >> 20,
        socket.display(),
        std::process::id(),
        std::process::id()
    );
    let stats_path = record.runtime_dir.join("stats.json");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = (u64::MAX, u64::MAX);
    let mut draining = false;
    loop {
        tokio::select! {
            _ = sigterm.recv(), if !draining => draining = true,
            _ = sigint.recv(), if !draining => draining = true,
            ev = events.recv() => match ev {
                Ok(ServerEvent::Connected { id, pid, guest_bytes }) => {
                    let _ = writeln!(log, "clone #{id} (pid {}) connected: {} MiB of guest memory",
                        pid.unwrap_or(-1), guest_bytes >> 20);
                }
                Ok(ServerEvent::Disconnected { id, pid, stats }) => {
                    let _ = writeln!(log,
                        "clone #{id} (pid {}) gone ({}): {} faults served ({} MiB), {} zero pages, {} EEXIST, {} unhandled",
                        pid.unwrap_or(-1),
                        stats.disconnect_reason.as_ref().map(|r| format!("{r:?}")).unwrap_or_default(),
                        stats.pages_copied, stats.bytes_served >> 20, stats.zero_pages,
                        stats.eexist, stats.unhandled_faults);
                }
                Ok(ServerEvent::HandshakeRejected { pid, reason }) => {
                    let _ = writeln!(log, "refused a connection (pid {}): {reason}", pid.unwrap_or(-1));
                }
                Err(_) => {}
            },
            _ = tick.tick() => {}
        }
        if draining && server.is_accepting() {
            server.stop_accepting();
            // `fcvm ls` shows it, and `snapshot run --pid` refuses with a clear message.
            state.update(&record.id, |r| r.status = VmStatus::Draining)?;
            let _ = writeln!(
                log,
                "stopping: no new clones; serving {} live clone(s) until they exit",
                server.active()
            );
        }
        let stats = server.stats();
        let now = (stats.live.len() as u64, stats.total_pages_copied());
        if now != last {
            last = now;
            if let Ok(bytes) = serde_json::to_vec_pretty(&stats) {
                let _ = fsutil::atomic_write(&stats_path, &bytes);
            }
            state.update(&record.id, |r| {
                r.served_live = Some(now.0);
                r.served_pages = Some(now.1);
            })?;
        }
        if draining && server.active() == 0 {
            let _ = writeln!(
                log,
                "page server for {tag} done: {} clone(s) served, {} pages",
                stats.connections_accepted, now.1
            );
            return Ok(());
        }
    }
}
