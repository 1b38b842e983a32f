//! `fcvm snapshot create|serve|run` and `fcvm snapshots [ls|rm|prune]`.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use crate::cleanup::{CleanupStep, Disposition};
use crate::commands::podman::clone as container_clone;
use crate::paths::Paths;
use crate::snapshot::cache::{CacheEntryInfo, ImageCache};
use crate::snapshot::clone::{self, CloneRequest, MemorySource};
use crate::snapshot::create::{self, CreateRequest};
use crate::snapshot::{self, guard, serve, SnapshotStore};
use crate::state::{GuestKind, Store, VmKind, VmRecord, VmStatus};
use crate::vm::spawn::ksm_running;
use crate::vm::{follow_console, Event, Signals};

/// `fcvm snapshot ...`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a running VM (it is paused briefly and keeps running).
    Create(CreateArgs),
    /// Serve a snapshot's memory to clones over userfaultfd.
    Serve(ServeArgs),
    /// Start a clone of a snapshot (from a page server with --pid, or the memory file).
    Run(RunArgs),
}

/// `fcvm snapshot create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM to snapshot.
    pub vm: String,
    /// Name of the new snapshot.
    #[arg(long)]
    pub tag: String,
    /// Write only the pages dirtied since the VM's last snapshot and merge them onto that
    /// snapshot's memory. Needs dirty-page tracking: a VM or clone started with
    /// --track-dirty-pages.
    #[arg(long)]
    pub diff: bool,
}

/// `fcvm snapshot serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The snapshot to serve.
    pub tag: String,
    /// Name in `fcvm ls` (default `serve-TAG-PID`).
    #[arg(long)]
    pub name: Option<String>,
    /// Run in the background; prints the server's pid.
    #[arg(short, long)]
    pub detach: bool,
    /// Fault-around window in pages: a page fault also copies the rest of its aligned
    /// window, so a guest walking memory takes one fault per window (1 = off).
    #[arg(long, default_value_t = fcvm_uffd::DEFAULT_FAULT_AROUND_PAGES,
          value_parser = clap::value_parser!(u64).range(1..=512))]
    pub fault_around: u64,
    /// Internal: log file of a detached server, removed when it exits.
    #[arg(long, hide = true)]
    pub log_file: Option<PathBuf>,
}

/// KSM choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KsmMode {
    /// On when ksmd runs (/sys/kernel/mm/ksm/run is 1).
    Auto,
    /// Always mark the VMM's memory mergeable.
    On,
    /// Never.
    Off,
}

impl KsmMode {
    /// Resolve `auto`.
    pub fn enabled(self) -> bool {
        match self {
            KsmMode::Auto => ksm_running(),
            KsmMode::On => true,
            KsmMode::Off => false,
        }
    }
}

/// `fcvm snapshot run`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).multiple(true).args(["pid", "snapshot"])))]
pub struct RunArgs {
    /// Page server pid (`fcvm snapshot serve`): memory is served lazily over userfaultfd.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Snapshot to restore from its memory file (or to check against --pid's).
    #[arg(long)]
    pub snapshot: Option<String>,
    /// Clone name (default `TAG-RANDOM`).
    #[arg(long)]
    pub name: Option<String>,
    /// Return once the clone runs; it keeps running.
    #[arg(short, long)]
    pub detach: bool,
    /// Run a command in the clone through the guest agent.
    #[arg(long)]
    pub exec: Option<String>,
    /// Let KSM merge identical pages across clones.
    #[arg(long, value_enum, default_value_t = KsmMode::Auto)]
    pub ksm: KsmMode,
    /// Track dirty pages so this clone can itself be Diff-snapshotted (slows its first
    /// writes to each page a little).
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// Network (default: the snapshot's source's). `bridged` (a clone of a bridged VM, as
    /// root): the guest keeps its address in the clone's own namespace, with a veth, NAT
    /// and published ports of the clone's own; `none`: the guest's interface leads nowhere.
    #[arg(long, value_enum)]
    pub network: Option<crate::cli::podman::PodmanNetwork>,
    /// Publish a container port of this clone: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp];
    /// repeat it, or join with commas. Needs a bridged clone.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub publish: Vec<String>,
}

/// The clone's network from `--network` and `--publish`, checked as `podman run` checks
/// them (bad specs, ports in use, a host without bridged mode); without `--network`, the
/// source's mode.
fn clone_network(
    a: &RunArgs,
    source_bridged: bool,
) -> Result<clone::CloneNetwork, crate::network::args::NetworkArgsError> {
    use crate::cli::podman::PodmanNetwork;
    use crate::network::args::{self, NetworkRequest, PreparedNetwork};
    let wanted = match a.network {
        Some(PodmanNetwork::None) => NetworkRequest::None,
        Some(PodmanNetwork::Bridged) => NetworkRequest::Bridged,
        Some(PodmanNetwork::Rootless) => NetworkRequest::Rootless,
        None if source_bridged => NetworkRequest::Bridged,
        None => NetworkRequest::None,
    };
    Ok(match args::prepare(wanted, &a.publish)? {
        PreparedNetwork::None => clone::CloneNetwork::None,
        // The guest keeps the source's name servers: they are in its resolv.conf.
        PreparedNetwork::Bridged { publish, .. } => clone::CloneNetwork::Bridged { publish },
    })
}

/// `fcvm snapshots`.
#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// What to do (default: ls).
    #[command(subcommand)]
    pub command: Option<SnapshotsCommand>,
    /// JSON output (for the default ls): snapshots (`"kind"`: `"full"` or `"diff"`) and the
    /// image cache's entries (`"kind": "image-cache"`), one array.
    #[arg(long)]
    pub json: bool,
}

/// `fcvm snapshots ...`.
#[derive(Debug, Subcommand)]
pub enum SnapshotsCommand {
    /// List snapshots with their sizes.
    Ls {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a snapshot (refused while a server, clone or VM uses it).
    Rm {
        /// The snapshot.
        tag: String,
    },
    /// Remove leftovers of interrupted creates and the image cache's entries (all not in
    /// use, or with --cache-idle those unused for that long); with --unused, also every
    /// snapshot that no live server, clone or VM (as Diff parent) uses.
    Prune {
        /// Also remove unused snapshots.
        #[arg(long)]
        unused: bool,
        /// Remove only cache entries not used for this many seconds.
        #[arg(long, value_name = "SECONDS")]
        cache_idle: Option<u64>,
    },
}

/// Dispatch `fcvm snapshot`.
pub async fn snapshot(paths: &Paths, cmd: SnapshotCommand) -> Result<ExitCode> {
    match cmd {
        SnapshotCommand::Create(a) => cmd_create(paths, a).await,
        SnapshotCommand::Serve(a) => cmd_serve(paths, a).await,
        SnapshotCommand::Run(a) => cmd_run(paths, a).await,
    }
}

/// Dispatch `fcvm snapshots`.
pub async fn snapshots(paths: &Paths, args: SnapshotsArgs) -> Result<ExitCode> {
    match args
        .command
        .unwrap_or(SnapshotsCommand::Ls { json: args.json })
    {
        SnapshotsCommand::Ls { json } => {
            let list = snapshot::list(paths)?;
            let users = snapshot::users(paths)?;
            let cache = ImageCache::open(paths)?.list()?;
            if json {
                let rows: Vec<serde_json::Value> = list
                    .iter()
                    .map(|s| {
                        let mut v = serde_json::to_value(s).expect("serialises");
                        v["in_use_by"] = users
                            .get(&s.meta.tag)
                            .map(|u| u.iter().map(|r| r.name.to_string()).collect::<Vec<_>>())
                            .unwrap_or_default()
                            .into();
                        v
                    })
                    .chain(cache.iter().map(|e| {
                        let mut v = serde_json::to_value(e).expect("serialises");
                        v["kind"] = "image-cache".into();
                        v
                    }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", table(&list, &users));
                if !cache.is_empty() {
                    println!("\nimage cache (fcvm podman run):");
                    print!("{}", cache_table(&cache, crate::state::now_ms()));
                }
            }
        }
        SnapshotsCommand::Rm { tag } => {
            snapshot::remove(paths, &tag)?;
            eprintln!("removed snapshot {tag}");
        }
        SnapshotsCommand::Prune { unused, cache_idle } => {
            let removed = ImageCache::open(paths)?.prune(cache_idle.map(Duration::from_secs))?;
            eprintln!(
                "removed {} image cache entr{}{}",
                removed.len(),
                if removed.len() == 1 { "y" } else { "ies" },
                if removed.is_empty() {
                    String::new()
                } else {
                    format!(": {}", removed.join(", "))
                }
            );
            let p = snapshot::prune(paths, unused)?;
            eprintln!(
                "removed {} unfinished snapshot dir(s){}",
                p.staging.len(),
                if unused {
                    format!(
                        " and {} unused snapshot(s): {}",
                        p.snapshots.len(),
                        p.snapshots.join(", ")
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The image cache's entries: key, image, size on disk, last use (ago).
fn cache_table(entries: &[CacheEntryInfo], now_ms: u64) -> String {
    let mut rows = vec![["KEY", "IMAGE", "DIGEST", "ON-DISK", "LAST-USE"].map(str::to_owned)];
    for e in entries {
        let ago = now_ms.saturating_sub(e.last_used_ms) / 1000;
        rows.push([
            e.key.clone(),
            e.image.clone(),
            e.digest.chars().take(19).collect(),
            mib(e.allocated_bytes),
            format!("{ago} s ago"),
        ]);
    }
    crate::commands::ls::align_columns(&rows)
}

fn mib(bytes: u64) -> String {
    format!("{:.1}M", bytes as f64 / (1 << 20) as f64)
}

fn table(
    list: &[snapshot::SnapshotInfo],
    users: &std::collections::BTreeMap<String, Vec<crate::state::VmRecord>>,
) -> String {
    let mut rows = vec![[
        "TAG", "KIND", "PARENT", "SOURCE", "MEM", "ON-DISK", "APPARENT", "USERS",
    ]
    .map(str::to_owned)];
    for s in list {
        let m = &s.meta;
        rows.push([
            m.tag.clone(),
            format!("{:?}", m.kind).to_lowercase(),
            m.parent.clone().unwrap_or_else(|| "-".into()),
            m.source_vm.clone(),
            format!("{}M", m.mem_mib),
            mib(s.allocated_bytes),
            mib(s.apparent_bytes),
            users.get(&m.tag).map_or(0, Vec::len).to_string(),
        ]);
    }
    crate::commands::ls::align_columns(&rows)
}

async fn cmd_create(paths: &Paths, a: CreateArgs) -> Result<ExitCode> {
    let req = CreateRequest {
        vm: a.vm,
        tag: a.tag,
        diff: a.diff,
        extra_files: Vec::new(),
    };
    let out = create::create(paths, &req).await?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(dirty) = out.meta.diff_dirty_bytes {
        eprintln!(
            "diff: {:.2} MiB dirty of {} MiB, merged onto {}",
            dirty as f64 / (1 << 20) as f64,
            out.meta.memory_bytes >> 20,
            out.meta.parent.as_deref().unwrap_or("an all-zero base")
        );
    }
    eprintln!(
        "snapshot {} of {} created in {} (VM paused {} ms)",
        out.meta.tag,
        req.vm,
        out.path.display(),
        out.paused_for.as_millis()
    );
    println!("{}", out.meta.tag);
    Ok(ExitCode::SUCCESS)
}

async fn cmd_serve(paths: &Paths, a: ServeArgs) -> Result<ExitCode> {
    // Check early so a detached start reports a bad tag synchronously.
    SnapshotStore::open(paths)?.get(&a.tag)?;
    if a.detach {
        return serve_detached(paths, &a).await;
    }
    let extra = a
        .log_file
        .iter()
        .map(|p| CleanupStep::RemoveFile { path: p.clone() })
        .collect();
    let mut err = std::io::stderr();
    serve::serve(paths, &a.tag, a.name, a.fault_around, extra, &mut err).await?;
    Ok(ExitCode::SUCCESS)
}

async fn serve_detached(paths: &Paths, a: &ServeArgs) -> Result<ExitCode> {
    let dir = paths.base().join("uffd");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join(format!("serve-{}.log", crate::state::new_vm_id()));
    let file = std::fs::File::create(&log)?;
    let mut cmd = std::process::Command::new(guard::self_exe()?);
    cmd.arg("--base-dir")
        .arg(paths.base())
        .args(["snapshot", "serve", &a.tag, "--log-file"])
        .arg(&log)
        .arg("--fault-around")
        .arg(a.fault_around.to_string())
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    if let Some(n) = &a.name {
        cmd.args(["--name", n]);
    }
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid().map(|_| ()).map_err(Into::into)
        });
    }
    let mut child = cmd.spawn().context("starting the page server")?;
    let pid = child.id();
    let store = Store::open(paths)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = store.find_by_pid(pid) {
            if r.status == VmStatus::Running {
                println!("{pid}");
                eprintln!(
                    "page server for {} running (pid {pid}); clone with `fcvm snapshot run --pid {pid}`; log {}",
                    a.tag,
                    log.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let _ = std::fs::remove_file(&log);
            bail!("page server exited ({status}):\n{text}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "page server did not come up within 10 s; log {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn cmd_run(paths: &Paths, a: RunArgs) -> Result<ExitCode> {
    let signals = Signals::new()?;
    let state = Store::open(paths)?;
    let (tag, memory) = match a.pid {
        Some(pid) => {
            let r = state.find_by_pid(pid)?;
            let (Some(tag), Some(socket), VmKind::PageServer) =
                (r.snapshot.clone(), r.uffd_socket.clone(), r.kind)
            else {
                bail!("pid {pid} is not a page server (see `fcvm ls`)");
            };
            if let Some(why) = refuses_clones(&r) {
                bail!("{why}");
            }
            if let Some(t) = &a.snapshot {
                if *t != tag {
                    bail!("page server {pid} serves {tag}, not {t}");
                }
            }
            (
                tag,
                MemorySource::Uffd {
                    socket,
                    server: r.owner,
                },
            )
        }
        None => (
            a.snapshot
                .clone()
                .expect("clap requires --pid or --snapshot"),
            MemorySource::File,
        ),
    };
    let container = container_clone::is_container_snapshot(paths, &tag)?;
    if a.exec.is_some() && !container {
        let meta = SnapshotStore::open(paths)?.get(&tag)?;
        if meta.guest == GuestKind::Probe {
            bail!("--exec needs the guest agent, and snapshot {tag} is of a probe guest, which has none; run the clone without --exec");
        }
        bail!("--exec on clones needs the guest agent of a container snapshot (`fcvm podman`); snapshot {tag} was not made by it");
    }
    if container && a.exec.is_some() && a.detach {
        bail!("--exec and --detach do not go together: --exec removes the clone when the command ends");
    }
    let supervisor = std::env::var_os(crate::commands::podman::detach::NOTIFY_FD_ENV).is_some();
    if container && a.detach && !supervisor {
        // As `podman run -d`: the checks and the restore happen in the supervisor, which
        // reports on our stderr until the container is back.
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        return Ok(
            match crate::commands::podman::detach::spawn_supervisor(&args) {
                Ok(crate::commands::podman::detach::Started::Ready(name)) => {
                    println!("{name}");
                    ExitCode::SUCCESS
                }
                Ok(crate::commands::podman::detach::Started::Failed(code)) => {
                    ExitCode::from(code.clamp(0, 255) as u8)
                }
                Err(e) => {
                    eprintln!("fcvm: error: {}", crate::report::chain(&e));
                    ExitCode::from(crate::commands::podman::EXIT_FCVM_FAILED)
                }
            },
        );
    }
    let source_bridged = SnapshotStore::open(paths)?.get(&tag)?.bridged.is_some();
    let network = match clone_network(&a, source_bridged) {
        Ok(n) => n,
        // Refused before anything starts, with `podman run`'s message and exit code.
        Err(e) => {
            eprintln!("fcvm: error: {}", crate::report::chain(&e));
            return Ok(ExitCode::from(crate::commands::podman::EXIT_FCVM_FAILED));
        }
    };
    let req = CloneRequest {
        tag: tag.clone(),
        name: a.name.clone(),
        memory,
        detach: a.detach,
        ksm: a.ksm.enabled(),
        track_dirty_pages: a.track_dirty_pages,
        network,
    };
    if container {
        let mode = match a.exec {
            Some(cmd) => container_clone::Mode::Exec(cmd),
            None => container_clone::Mode::Follow,
        };
        return Ok(
            match container_clone::run(paths, &req, mode, signals).await {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("fcvm: error: {}", crate::report::chain(&e));
                    ExitCode::from(e.exit_code())
                }
            },
        );
    }
    let started = clone::start_clone(paths, &req).await?;
    let t = &started.timings;
    tracing::info!(
        "clone timings: record {:?} netns {:?} disks {:?} spawn {:?} load {:?} resume {:?} total {:?}",
        t.record, t.netns, t.disks, t.spawn, t.load, t.resume, t.total
    );
    if a.detach {
        let total = t.total;
        let r = started.handle.detach();
        println!("{}", r.name);
        eprintln!(
            "clone {} of {tag} running (firecracker pid {}), restored in {} ms; console: {}; stop with `fcvm stop {}`",
            r.name,
            r.pid(),
            total.as_millis(),
            r.console_log
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            r.name
        );
        return Ok(ExitCode::SUCCESS);
    }
    follow_clone(started, signals).await
}

/// Why the page server of `r` takes no new clones, if it does not.
pub fn refuses_clones(r: &VmRecord) -> Option<String> {
    match r.status {
        VmStatus::Running => None,
        VmStatus::Draining => Some(format!(
            "page server {} (pid {}) is draining: it was asked to stop and serves only its live clones until they exit; start a new one with `fcvm snapshot serve {}`",
            r.name,
            r.pid(),
            r.snapshot.as_deref().unwrap_or("TAG")
        )),
        other => Some(format!(
            "page server {} (pid {}) is not accepting clones (it is {})",
            r.name,
            r.pid(),
            serde_json::to_value(other)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        )),
    }
}

/// Foreground clone: stream its console until the VM exits, fcvm is interrupted, or the
/// page server dies (then the clone is stopped and marked failed: it must never run on).
async fn follow_clone(started: clone::StartedClone, mut signals: Signals) -> Result<ExitCode> {
    let mut vm = started.handle;
    let mut out = std::io::stdout();
    let event = follow_console(&mut vm, &mut out, &mut signals).await;
    let code = match event {
        Ok(Event::Exited(code)) => code.unwrap_or(1),
        Ok(Event::Signal(sig)) => 128 + sig,
        Ok(Event::MemorySourceLost(server)) => {
            let reason = format!(
                "page server (pid {}) died; the clone lost its memory source and was stopped",
                server.pid
            );
            vm.fail(&reason).warn();
            eprintln!("fcvm: error: clone {}: {reason}", vm.record().name);
            return Ok(ExitCode::from(1));
        }
        Err(e) => {
            vm.finish(Disposition::Forget).warn();
            return Err(e.into());
        }
    };
    vm.finish(Disposition::Forget).warn();
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Name;

    #[test]
    fn the_cache_table_shows_key_image_size_and_last_use() {
        let e = CacheEntryInfo {
            key: "0123456789abcdef0123456789abcdef".into(),
            image: "localhost/busybox:1".into(),
            digest: "sha256:0123456789abcdef0123".into(),
            allocated_bytes: 3 << 20,
            apparent_bytes: 512 << 20,
            created_at_ms: 1_000,
            last_used_ms: 10_000,
            path: "/x".into(),
        };
        let t = cache_table(&[e], 70_000);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "0123456789abcdef0123456789abcdef",
                "localhost/busybox:1",
                "sha256:0123456789ab",
                "3.0M",
                "60",
                "s",
                "ago"
            ]
        );
        assert!(lines[0].starts_with("KEY"));
    }

    #[test]
    fn a_draining_server_refuses_clones_naming_itself() {
        let mut r = VmRecord::new(
            "id".into(),
            Name::parse("serve-s-1").unwrap(),
            VmKind::PageServer,
            "/r".into(),
        );
        r.snapshot = Some("s".into());
        r.status = VmStatus::Running;
        assert!(refuses_clones(&r).is_none());
        r.status = VmStatus::Draining;
        let why = refuses_clones(&r).unwrap();
        assert!(
            why.contains("serve-s-1") && why.contains("draining"),
            "{why}"
        );
        assert!(why.contains("fcvm snapshot serve s"), "{why}");
        r.status = VmStatus::Stopping;
        assert!(refuses_clones(&r).unwrap().contains("stopping"));
    }
}
