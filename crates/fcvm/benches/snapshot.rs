//! Snapshot/clone figures on the real Firecracker with the probe guest (prints, never fails).
//!
//! ```sh
//! FCVM_FIRECRACKER_BIN=/path/to/firecracker cargo bench -p fcvm --bench snapshot
//! ```
//! Env: `FCVM_BENCH_RUNS` (default 20), `FCVM_BENCH_PARALLEL` (default "10,50"),
//! `FCVM_BENCH_MEMORY=0` skips the 512 MiB memory/KSM part (it changes and restores the
//! global KSM settings, so it needs root).
//!
//! 1. core restore, spawn -> load -> resume -> first serial line: bare Firecracker driven by
//!    a minimal blocking HTTP client, fcvm with the File backend, fcvm with the Uffd backend;
//! 2. clone infrastructure step by step (record, netns+TAP, files: disk copies and a jailed
//!    VMM's staged inputs, spawn, load, patch, resume), for a snapshot with a TAP;
//! 3. 10 and 50 clones started concurrently from one page server: wall time;
//! 4. memory: PSS/RSS of 10 clones of one 512 MiB probe guest (UFFD), KSM off vs on, with
//!    ksmd's CPU time.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fcvm::paths::Paths;
use fcvm::process::ProcessRef;
use fcvm::snapshot::clone::{start_clone, CloneNetwork, CloneRequest, MemorySource};
use fcvm::state::Store;

fn fcvm_cli(base: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fcvm"))
        .env("FCVM_BASE_DIR", base)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run fcvm");
    assert!(
        out.status.success(),
        "fcvm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Wait until `path` holds a `PROBE TICK` line after byte `from`.
fn wait_tick(path: &Path, from: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(bytes) = std::fs::read(path) {
            if bytes.len() as u64 > from {
                let new = &bytes[from as usize..];
                if new.windows(10).any(|w| w == b"PROBE TICK") {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

fn make_source(base: &Path, name: &str, tag: &str, mem: &str, boot_args: &str, extra: &[&str]) {
    let mut args = vec![
        "run",
        "--name",
        name,
        "--kernel",
        "probe",
        "--detach",
        "--mem",
        mem,
        "--boot-args",
        boot_args,
    ];
    args.extend_from_slice(extra);
    fcvm_cli(base, &args);
    let store = Store::open(&Paths::new(base)).unwrap();
    let log = store.find_by_name(name).unwrap().console_log.unwrap();
    assert!(
        wait_tick(&log, 0, Duration::from_secs(60)),
        "source {name} never ticked"
    );
    fcvm_cli(base, &["snapshot", "create", name, "--tag", tag]);
    fcvm_cli(base, &["stop", name, "--timeout", "1"]);
}

/// Bare Firecracker: spawn, minimal HTTP PUT /snapshot/load (resume_vm), first tick.
fn bare_restore(fc: &Path, snap: &Path, scratch: &Path) -> Duration {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).unwrap();
    let sock = scratch.join("api.sock");
    let out = scratch.join("console");
    let t0 = Instant::now();
    let mut child = Command::new(fc)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_micros(100)),
        }
    };
    let body = format!(
        r#"{{"snapshot_path":"{}","mem_backend":{{"backend_type":"File","backend_path":"{}"}},"resume_vm":true}}"#,
        snap.join("vmstate.bin").display(),
        snap.join("memory.bin").display()
    );
    write!(
        stream,
        "PUT /snapshot/load HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = [0u8; 512];
    let n = stream.read(&mut resp).unwrap();
    assert!(
        resp[..n].starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&resp[..n])
    );
    assert!(wait_tick(&out, 0, Duration::from_secs(10)));
    let d = t0.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    d
}

fn kill_clone(_paths: &Paths, started: fcvm::snapshot::clone::StartedClone) {
    let mut vm = started.handle;
    vm.finish(fcvm::cleanup::Disposition::Forget).warn();
}

async fn fcvm_restore(paths: &Paths, tag: &str, memory: MemorySource) -> Duration {
    let t0 = Instant::now();
    let started = start_clone(
        paths,
        &CloneRequest {
            tag: tag.into(),
            name: None,
            memory,
            detach: false,
            ksm: false,
            track_dirty_pages: false,
            network: CloneNetwork::Inherit,
        },
    )
    .await
    .expect("clone");
    assert!(wait_tick(
        &started.handle.paths().console_log(),
        0,
        Duration::from_secs(10)
    ));
    let d = t0.elapsed();
    kill_clone(paths, started);
    d
}

fn smaps_rollup(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (get("Pss:"), get("Rss:"))
}

fn ksmd_cpu_ticks() -> u64 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "ksmd" {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let rest = &stat[stat.rfind(')').unwrap_or(0) + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            return f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        }
    }
    0
}

fn ksm_get(name: &str) -> String {
    std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{name}"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn ksm_set(name: &str, v: &str) {
    let _ = std::fs::write(format!("/sys/kernel/mm/ksm/{name}"), v);
}

async fn memory_figures(paths: &Paths, server_sock: &Path, tag: &str, ksm: bool) {
    let me = ProcessRef::current();
    let mut clones = Vec::new();
    for _ in 0..10 {
        let c = start_clone(
            paths,
            &CloneRequest {
                tag: tag.into(),
                name: None,
                memory: MemorySource::Uffd {
                    socket: server_sock.to_owned(),
                    server: me,
                },
                detach: false,
                ksm,
                track_dirty_pages: false,
                network: CloneNetwork::Inherit,
            },
        )
        .await
        .expect("clone");
        clones.push(c);
    }
    // Each clone verifies its whole fill region at its next tick: every page faulted in.
    for c in &clones {
        let len = std::fs::metadata(c.handle.paths().console_log()).map_or(0, |m| m.len());
        wait_tick(
            &c.handle.paths().console_log(),
            len,
            Duration::from_secs(60),
        );
    }
    let cpu0 = ksmd_cpu_ticks();
    let t0 = Instant::now();
    if ksm {
        // Let ksmd converge: stop when pages_sharing stops growing.
        let mut last = 0;
        let mut stable = 0;
        while t0.elapsed() < Duration::from_secs(90) && stable < 3 {
            std::thread::sleep(Duration::from_secs(2));
            let now: u64 = ksm_get("pages_sharing").parse().unwrap_or(0);
            stable = if now > 0 && now <= last {
                stable + 1
            } else {
                0
            };
            last = last.max(now);
        }
    } else {
        std::thread::sleep(Duration::from_secs(3));
    }
    let secs = t0.elapsed().as_secs_f64();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ksmd = (ksmd_cpu_ticks() - cpu0) as f64 / hz;
    let (mut pss, mut rss) = (0, 0);
    for c in &clones {
        let (p, r) = smaps_rollup(c.handle.process().unwrap().pid);
        pss += p;
        rss += r;
    }
    println!(
        "memory, 10 UFFD clones of a 512 MiB guest (448 MiB filled), KSM {}: sum PSS {:.0} MiB, sum RSS {:.0} MiB, per clone PSS {:.0} MiB; ksmd CPU {:.1} s over {:.0} s ({:.0}% of a core){}",
        if ksm { "on " } else { "off" },
        pss as f64 / 1024.0,
        rss as f64 / 1024.0,
        pss as f64 / 10240.0,
        ksmd,
        secs,
        100.0 * ksmd / secs,
        if ksm { format!(", pages_sharing {}, pages_shared {}", ksm_get("pages_sharing"), ksm_get("pages_shared")) } else { String::new() }
    );
    for c in clones {
        kill_clone(paths, c);
    }
}

/// A server that jailed clones (the default as root) may connect to, as `fcvm snapshot
/// serve` makes it.
fn jailed_ok(mut cfg: fcvm_uffd::ServerConfig) -> fcvm_uffd::ServerConfig {
    cfg.peer_uids = Some(fcvm::vm::jail::uid_range());
    cfg
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(fc) = std::env::var_os("FCVM_FIRECRACKER_BIN").map(PathBuf::from) else {
        eprintln!("SKIPPED snapshot bench: set FCVM_FIRECRACKER_BIN");
        return;
    };
    std::env::set_var("FCVM_SELF_EXE", env!("CARGO_BIN_EXE_fcvm"));
    let runs: usize = std::env::var("FCVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::Builder::new()
        .prefix("fcvm-b")
        .tempdir_in("/tmp")
        .unwrap();
    let base = dir.path();
    let paths = Paths::new(base);
    let fast = "probe.mem_mib=1 probe.tick_ms=5";
    make_source(base, "plain", "plain", "128", fast, &[]);
    make_source(base, "net", "net", "128", fast, &["--network", "tap"]);
    let server = fcvm_uffd::PageServer::bind(jailed_ok(fcvm_uffd::ServerConfig::new(
        base.join("p.sock"),
        paths.snapshot_dir("plain").join("memory.bin"),
    )))
    .unwrap();
    let me = ProcessRef::current();
    println!("== core restore: spawn -> load -> resume -> first serial line (128 MiB, 1 vCPU, {runs} runs, medians)");
    let mut bare = Vec::new();
    let mut file = Vec::new();
    let mut uffd = Vec::new();
    for _ in 0..runs {
        bare.push(ms(bare_restore(
            &fc,
            &paths.snapshot_dir("plain"),
            &base.join("bare"),
        )));
        file.push(ms(fcvm_restore(&paths, "plain", MemorySource::File).await));
        uffd.push(ms(fcvm_restore(
            &paths,
            "plain",
            MemorySource::Uffd {
                socket: base.join("p.sock"),
                server: me,
            },
        )
        .await));
    }
    let (b, f, u) = (median(&mut bare), median(&mut file), median(&mut uffd));
    println!("bare Firecracker (File)  {b:7.2} ms");
    println!("fcvm File                {f:7.2} ms  ({:.2}x bare)", f / b);
    println!("fcvm Uffd                {u:7.2} ms  ({:.2}x bare)", u / b);
    drop(server);

    println!(
        "== clone infrastructure, snapshot with a TAP, File backend ({runs} runs, medians, ms)"
    );
    let mut steps: Vec<Vec<f64>> = vec![Vec::new(); 8];
    for _ in 0..runs {
        let c = start_clone(
            &paths,
            &CloneRequest {
                tag: "net".into(),
                name: None,
                memory: MemorySource::File,
                detach: false,
                ksm: false,
                track_dirty_pages: false,
                network: CloneNetwork::Inherit,
            },
        )
        .await
        .expect("clone");
        let t = &c.timings;
        for (i, d) in [
            t.record, t.netns, t.disks, t.spawn, t.load, t.patch, t.resume, t.total,
        ]
        .into_iter()
        .enumerate()
        {
            steps[i].push(ms(d));
        }
        kill_clone(&paths, c);
    }
    let names = [
        "state record",
        "netns+TAP",
        // The launch's files step: disk copies, and for a jailed VMM the inputs staged into
        // its chroot (with the File backend a copy of the memory file).
        "files",
        "spawn (API up)",
        "load",
        "drive patch",
        "resume",
        "total",
    ];
    for (n, v) in names.iter().zip(steps.iter_mut()) {
        println!("{n:<16} {:7.2}", median(v));
    }

    let server = std::sync::Arc::new(
        fcvm_uffd::PageServer::bind(jailed_ok(fcvm_uffd::ServerConfig::new(
            base.join("n.sock"),
            paths.snapshot_dir("net").join("memory.bin"),
        )))
        .unwrap(),
    );
    let counts: Vec<usize> = std::env::var("FCVM_BENCH_PARALLEL")
        .unwrap_or_else(|_| "10,50".into())
        .split(',')
        .filter_map(|v| v.parse().ok())
        .collect();
    println!("== parallel clones from one page server (TAP snapshot, each in its own netns)");
    for n in counts {
        let t0 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let paths = paths.clone();
            let sock = base.join("n.sock");
            set.spawn(async move {
                start_clone(
                    &paths,
                    &CloneRequest {
                        tag: "net".into(),
                        name: None,
                        memory: MemorySource::Uffd {
                            socket: sock,
                            server: me,
                        },
                        // Not detached: if the bench dies, its clones die with it.
                        detach: false,
                        ksm: false,
                        track_dirty_pages: false,
                        network: CloneNetwork::Inherit,
                    },
                )
                .await
            });
        }
        let mut started = Vec::new();
        while let Some(r) = set.join_next().await {
            started.push(r.unwrap().expect("clone"));
        }
        let resumed = t0.elapsed();
        for c in &started {
            wait_tick(&c.handle.paths().console_log(), 0, Duration::from_secs(30));
        }
        let ticking = t0.elapsed();
        println!(
            "{n:>3} clones: all resumed after {:.0} ms, all printed a tick after {:.0} ms",
            ms(resumed),
            ms(ticking)
        );
        for c in started {
            kill_clone(&paths, c);
        }
    }
    drop(server);

    if std::env::var("FCVM_BENCH_MEMORY").is_ok_and(|v| v == "0") {
        return;
    }
    println!("== memory sharing");
    make_source(
        base,
        "big",
        "big",
        "512",
        "probe.mem_mib=448 probe.tick_ms=3000",
        &[],
    );
    let _server = fcvm_uffd::PageServer::bind(jailed_ok(fcvm_uffd::ServerConfig::new(
        base.join("b.sock"),
        paths.snapshot_dir("big").join("memory.bin"),
    )))
    .unwrap();
    let saved: Vec<(&str, String)> = ["run", "pages_to_scan", "sleep_millisecs"]
        .into_iter()
        .map(|k| (k, ksm_get(k)))
        .collect();
    memory_figures(&paths, &base.join("b.sock"), "big", false).await;
    ksm_set("pages_to_scan", "5000");
    ksm_set("sleep_millisecs", "20");
    ksm_set("run", "1");
    memory_figures(&paths, &base.join("b.sock"), "big", true).await;
    for (k, v) in saved {
        ksm_set(k, &v);
    }
}
