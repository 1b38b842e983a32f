//! Container snapshot figures on the real path (the real Firecracker booting fcvm's guest
//! kernel with the agent and podman), through the `fcvm` CLI as a user runs it. Prints
//! medians and ratios, side by side from the same host; never fails on speed.
//!
//! Needs what the podman bench needs (FCVM_ROOTFS, FCVM_AGENT_BIN, FCVM_TEST_KERNEL,
//! FCVM_FIRECRACKER_BIN, root), or it says what is missing and exits 0. Where this host's KVM
//! cannot boot Linux guests, run it inside the emulated KVM host: build it with
//! `cargo bench -p fcvm --bench containers --no-run`, then
//! `on_real_kvm env BENCH_RUNS=3 BINARY --bench` (scripts/lib.sh; `env` carries the bench's
//! own variables in). `BENCH_RUNS` (default 5) is the repeat count of each timed figure;
//! `BENCH_ONLY=tiers` or `BENCH_ONLY=clones` runs one section, `BENCH_ONLY=at-once` the
//! clones section without the `--exec` cycle.
//!
//! 1. **Tiers**: command -> first output line of one container (busybox httpd in the
//!    background, then a line every 100 ms) started cold (`--no-snapshot`), from the image
//!    cache (a hit on the image's entry) and from the startup tier (`--health-check`: the
//!    application restored warm), runs interleaved. One miss first creates both entries.
//! 2. **Clones** of a container snapshot (`--mem 256` so that ten fit in the emulated host):
//!    the `snapshot run --exec 'echo hi'` cycle (restore, exec, output, teardown: command ->
//!    exit) from the memory file and from a page server; ten clones started at once (`-d`,
//!    wall time until all ten run); the host memory of those ten clones, restored with the
//!    File backend (unwritten pages are the memory file's page cache, shared by all clones
//!    that map the same file: unjailed ones; a jailed VMM maps a copy in its chroot), from a
//!    page server (UFFD: each served page is a private copy), and from a page server with
//!    KSM merging the clones' identical pages: the sum of PSS over the ten Firecrackers (and
//!    the page server), which counts each shared page once, beside the sum of RSS.
mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE_REF: &str = "localhost/fcvm-bench-busybox:1";

/// The tiers' container: an httpd the health check reaches, then a line every 100 ms; a TERM
/// ends it at once.
const SERVER: &str = "trap 'exit 0' TERM; mkdir -p /tmp/www; echo ok > /tmp/www/ok; \
                      httpd -p 8080 -h /tmp/www; i=0; \
                      while :; do i=$((i+1)); echo line-$i; sleep 0.1; done";

/// The clones' container: idle, a TERM ends it.
const IDLE: &str = "trap 'exit 0' TERM; echo up; while :; do sleep 1; done";

/// Clones restore and reconnect in seconds natively, tens of seconds in the emulated host.
const LIMIT: Duration = Duration::from_secs(600);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Bench {
    fcvm: PathBuf,
    base: PathBuf,
    kernel: String,
    archive: PathBuf,
    runs: usize,
}

impl Bench {
    /// `fcvm ARGS` on the bench's base dir, the image cache off unless the caller removes
    /// FCVM_NO_SNAPSHOT.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.fcvm);
        c.args(args)
            .env("FCVM_BASE_DIR", &self.base)
            .env("FCVM_NO_SNAPSHOT", "1")
            // Ten restores at once in the emulated host (beside others) take minutes.
            .env("FCVM_AGENT_TIMEOUT", "600")
            .stdin(Stdio::null());
        c
    }

    /// `fcvm ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args).output().expect("run fcvm");
        assert!(
            o.status.success(),
            "fcvm {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `podman run --name NAME FLAGS --image-archive A --kernel K IMAGE -- sh -c SCRIPT`.
    fn run_args(&self, name: &str, flags: &[&str], script: &str) -> Vec<String> {
        let mut v: Vec<String> = ["podman", "run", "--name", name]
            .iter()
            .chain(flags)
            .map(|s| s.to_string())
            .collect();
        v.push("--image-archive".into());
        v.push(self.archive.display().to_string());
        v.push("--kernel".into());
        v.push(self.kernel.clone());
        v.push(IMAGE_REF.into());
        v.extend(["--", "sh", "-c", script].map(String::from));
        v
    }

    fn cache_entries(&self) -> usize {
        std::fs::read_dir(self.base.join("image-cache"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The pid of VM `name`'s Firecracker, from its state record.
    fn vmm_pid(&self, name: &str) -> Option<u32> {
        let rd = std::fs::read_dir(self.base.join("state")).ok()?;
        rd.flatten()
            .find_map(|e| {
                let v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
                (v["name"] == name).then(|| v["vmm"]["pid"].as_u64())?
            })
            .map(|p| p as u32)
    }
}

/// A foreground `fcvm podman run` whose first stdout line is timed; stopped by SIGINT.
struct Timed {
    child: Child,
    started: Instant,
    out: BufReader<std::process::ChildStdout>,
    err: std::sync::mpsc::Receiver<String>,
}

impl Timed {
    fn spawn(mut c: Command) -> Timed {
        let started = Instant::now();
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fcvm");
        let mut stderr = child.stderr.take().unwrap();
        let (tx, err) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            let _ = tx.send(s);
        });
        Timed {
            out: BufReader::new(child.stdout.take().unwrap()),
            child,
            started,
            err,
        }
    }

    /// Command -> first output line, in ms.
    fn first_line(&mut self) -> f64 {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let t = ms(self.started.elapsed());
        assert!(
            line.starts_with("line-"),
            "not the container's line: {line:?}"
        );
        t
    }

    /// SIGINT fcvm (the container's TERM trap ends it), wait; fcvm's stderr.
    fn stop(mut self) -> String {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let mut rest = Vec::new();
        let _ = self.out.read_to_end(&mut rest);
        let _ = self.child.wait();
        self.err.recv_timeout(LIMIT).unwrap_or_default()
    }
}

fn main() {
    if !common::can_run(
        "containers",
        &[
            "FCVM_ROOTFS",
            "FCVM_AGENT_BIN",
            "FCVM_TEST_KERNEL",
            "FCVM_FIRECRACKER_BIN",
        ],
    ) {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let parent = std::env::var_os("FCVM_TESTHOST_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let base = tempfile::Builder::new()
        .prefix("fcvm-c")
        .tempdir_in(parent)
        .unwrap();
    let archive = fcvm_testkit::testimage::build_busybox_archive(
        Path::new(fcvm_testkit::testimage::DEFAULT_BUSYBOX),
        &base.path().join("busybox.oci.tar"),
        "fcvm-bench-busybox",
        "1",
    )
    .expect("build the busybox test image");
    let b = Bench {
        fcvm: PathBuf::from(env!("CARGO_BIN_EXE_fcvm")),
        base: base.path().join("fcvm"),
        kernel: std::env::var("FCVM_TEST_KERNEL").unwrap(),
        archive: archive.path.clone(),
        runs,
    };
    if only.is_empty() || only == "tiers" {
        tiers(&b);
    }
    if only.is_empty() || only == "clones" || only == "at-once" {
        clones(&b, only != "at-once");
    }
}

/// Cold vs cache hit vs startup tier, command -> first output line.
fn tiers(b: &Bench) {
    let health = [
        "--rm",
        "--health-check",
        "http://127.0.0.1:8080/ok",
        "--health-interval",
        "1s",
    ];
    let run = |name: &str, flags: &[&str], cached: bool| {
        let args = b.run_args(name, flags, SERVER);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = b.cmd(&args);
        if cached {
            c.env_remove("FCVM_NO_SNAPSHOT");
        }
        Timed::spawn(c)
    };
    // The miss: boots cold, creates the image's entry, then at the check's first pass the
    // startup tier.
    let mut miss = run("miss", &health, true);
    let miss_first = miss.first_line();
    let deadline = Instant::now() + LIMIT;
    while b.cache_entries() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let miss_all = ms(miss.started.elapsed());
    let err = miss.stop();
    assert!(
        err.contains("fcvm: cache created (entry") && err.contains("fcvm: cache created (startup)"),
        "the miss made no startup tier:\n{err}"
    );
    let (mut cold, mut hit, mut startup) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..b.runs {
        let mut r = run(&format!("cold{i}"), &health, false);
        cold.push(r.first_line());
        let err = r.stop();
        assert!(err.contains("fcvm: cold"), "{err}");

        let mut r = run(&format!("hit{i}"), &["--rm"], true);
        hit.push(r.first_line());
        let err = r.stop();
        assert!(err.contains("fcvm: cache hit (entry"), "{err}");

        let mut r = run(&format!("warm{i}"), &health, true);
        startup.push(r.first_line());
        let err = r.stop();
        assert!(err.contains("fcvm: cache hit (startup)"), "{err}");
    }
    let (c, h, s) = (
        common::median(&mut cold),
        common::median(&mut hit),
        common::median(&mut startup),
    );
    println!(
        "tiers: podman run of busybox (httpd, then a line every 100 ms), command -> first output line, median of {}:",
        b.runs
    );
    println!("  cold (--no-snapshot)        {c:10.1} ms");
    println!(
        "  cache hit (image entry)     {h:10.1} ms   cold/hit     {:.2}x",
        c / h
    );
    println!(
        "  startup tier (warm app)     {s:10.1} ms   cold/startup {:.2}x   hit/startup {:.2}x",
        c / s,
        h / s
    );
    println!(
        "  the miss: first line {miss_first:.1} ms, both entries made {miss_all:.1} ms after its start"
    );
    println!("  all runs (ms): cold {cold:.0?} hit {hit:.0?} startup {startup:.0?}");
}

/// (Rss, Pss, Pss_Anon, Pss_File) in bytes from `/proc/PID/smaps_rollup`.
fn smaps_rollup(pid: u32) -> [u64; 4] {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    [
        field("Rss"),
        field("Pss"),
        field("Pss_Anon"),
        field("Pss_File"),
    ]
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

/// Start `n` clones at once with `flags` (`-d`): wall time until every `snapshot run -d`
/// returned (each once its clone runs).
fn start_at_once(
    b: &Bench,
    prefix: &str,
    flags: &[&str],
    vars: &[(&str, &str)],
    n: usize,
) -> (f64, Vec<String>) {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let t = Instant::now();
    let children: Vec<Child> = names
        .iter()
        .map(|name| {
            let mut args = vec!["snapshot", "run", "--name", name, "-d"];
            args.extend(flags);
            b.cmd(&args)
                .envs(vars.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn fcvm snapshot run")
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "snapshot run -d: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    (ms(t.elapsed()), names)
}

/// Host memory of `clones` (and `server`, a page server's pid), in MiB: sum of PSS, of RSS,
/// and PSS split into anonymous and file-backed (the memory file's page cache).
fn memory(b: &Bench, clones: &[String], server: Option<u32>) -> String {
    let mut sum = [0u64; 4];
    let mut pids: Vec<u32> = clones
        .iter()
        .map(|n| {
            b.vmm_pid(n)
                .unwrap_or_else(|| panic!("no Firecracker pid for {n}"))
        })
        .collect();
    pids.extend(server);
    for pid in pids {
        for (s, v) in sum.iter_mut().zip(smaps_rollup(pid)) {
            *s += v;
        }
    }
    let mib = |v: u64| v as f64 / f64::from(1 << 20);
    let per = mib(sum[1]) / clones.len() as f64;
    format!(
        "sum PSS {:6.0} MiB (anon {:.0}, file {:.0}), sum RSS {:6.0} MiB, PSS per clone {per:.0} MiB",
        mib(sum[1]),
        mib(sum[2]),
        mib(sum[3]),
        mib(sum[0]),
    )
}

fn teardown(b: &Bench, names: &[String]) {
    for n in names {
        let _ = b.cmd(&["stop", n, "--timeout", "1"]).output();
        let _ = b.cmd(&["rm", n]).output();
    }
}

/// The clone figures (see the module docs).
fn clones(b: &Bench, exec_cycle: bool) {
    const N: usize = 10;
    // The source: a detached container VM, snapshotted once its container runs.
    let args = b.run_args("src", &["-d", "--mem", "256"], IDLE);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    b.ok(&args);
    let deadline = Instant::now() + LIMIT;
    while !b.ok(&["logs", "src"]).contains("up") {
        assert!(Instant::now() < deadline, "the source container never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    b.ok(&["snapshot", "create", "src", "--tag", "t1"]);
    teardown(b, &["src".to_owned()]);
    let server: u32 = b
        .ok(&["snapshot", "serve", "t1", "--detach"])
        .trim()
        .parse()
        .expect("the page server's pid");
    let server_s = server.to_string();

    // The --exec cycle, File and page server interleaved.
    let (mut file, mut uffd) = (Vec::new(), Vec::new());
    for _ in 0..b.runs * usize::from(exec_cycle) {
        for (v, src) in [
            (&mut file, ["--snapshot", "t1"]),
            (&mut uffd, ["--pid", server_s.as_str()]),
        ] {
            let t = Instant::now();
            let out = b.ok(&["snapshot", "run", src[0], src[1], "--exec", "echo hi"]);
            v.push(ms(t.elapsed()));
            assert_eq!(out, "hi\n");
        }
    }
    if exec_cycle {
        let (f, u) = (common::median(&mut file), common::median(&mut uffd));
        println!(
            "clones of a container snapshot (--mem 256), `snapshot run --exec 'echo hi'` (restore, exec, teardown), median of {}:",
            b.runs
        );
        println!("  memory file (File)   {f:10.1} ms");
        println!(
            "  page server (UFFD)   {u:10.1} ms   UFFD/File {:.2}x",
            u / f
        );
    }

    // Ten at once, then their memory: File, UFFD, UFFD + KSM.
    println!("{N} clones started at once (`snapshot run -d`, wall time until all run), then their host memory:");
    let (t, names) = start_at_once(b, "f", &["--snapshot", "t1"], &[], N);
    std::thread::sleep(Duration::from_secs(10));
    println!("  File (jailed) {t:10.1} ms   {}", memory(b, &names, None));
    teardown(b, &names);
    // Unjailed, the clones map the snapshot's memory file itself (a jailed VMM gets a copy
    // of it in its chroot: a reflink where the filesystem has them, a page cache of its own
    // either way).
    let (td, names) = start_at_once(b, "d", &["--snapshot", "t1"], &[("FCVM_NO_JAILER", "1")], N);
    std::thread::sleep(Duration::from_secs(10));
    println!("  File, no jail {td:10.1} ms   {}", memory(b, &names, None));
    teardown(b, &names);
    let (tu, names) = start_at_once(b, "u", &["--pid", &server_s, "--ksm", "off"], &[], N);
    std::thread::sleep(Duration::from_secs(10));
    let uffd_mem = memory(b, &names, Some(server));
    teardown(b, &names);
    println!(
        "  UFFD          {tu:10.1} ms   {uffd_mem} (page server included)   UFFD/File {:.2}x",
        tu / t
    );
    if Path::new("/sys/kernel/mm/ksm/run").exists() {
        let saved: Vec<(&str, String)> = ["run", "pages_to_scan", "sleep_millisecs"]
            .into_iter()
            .map(|k| (k, ksm_get(k)))
            .collect();
        ksm_set("pages_to_scan", "5000");
        ksm_set("sleep_millisecs", "20");
        ksm_set("run", "1");
        let (tk, names) = start_at_once(b, "k", &["--pid", &server_s, "--ksm", "on"], &[], N);
        // Let ksmd converge: until pages_sharing stops growing (or two minutes).
        let started = Instant::now();
        let mut last = 0u64;
        let mut still = 0;
        while still < 3 && started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_secs(2));
            let now: u64 = ksm_get("pages_sharing").parse().unwrap_or(0);
            still = if now > 0 && now <= last { still + 1 } else { 0 };
            last = last.max(now);
        }
        let ksm_mem = memory(b, &names, Some(server));
        println!(
            "  UFFD + KSM    {tk:10.1} ms   {ksm_mem} (page server included; ksmd ran {:.0} s, pages_sharing {})",
            started.elapsed().as_secs_f64(),
            ksm_get("pages_sharing")
        );
        teardown(b, &names);
        for (k, v) in saved.iter().rev() {
            ksm_set(k, v);
        }
    } else {
        println!("  UFFD + KSM    n/a: this kernel has no KSM (/sys/kernel/mm/ksm)");
    }
    let _ = b
        .cmd(&["stop", "--pid", &server_s, "--timeout", "1"])
        .output();
    let _ = b.cmd(&["snapshots", "rm", "t1"]).output();
}
