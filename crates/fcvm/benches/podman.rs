//! `fcvm podman run` and `fcvm exec` timings on the real path (the real Firecracker booting
//! fcvm's guest kernel), and the same container run against bare Firecracker driven by a
//! minimal client (`podman_bare/mod.rs`), in the same process, runs interleaved. Prints figures;
//! never fails on speed.
//!
//! Needs what the podman integration tests need; set FCVM_ROOTFS (a guest rootfs image),
//! FCVM_AGENT_BIN (static fc-agent), FCVM_TEST_KERNEL (the guest kernel) and
//! FCVM_FIRECRACKER_BIN, or it says what is missing and exits 0. On hosts whose KVM cannot boot
//! Linux guests, run it inside the emulated KVM host: build it with
//! `cargo bench -p fcvm --bench podman --no-run` and run the binary it names with
//! `on_real_kvm BINARY --bench` (scripts/lib.sh); there the base dir goes on its scratch disk
//! (FCVM_TESTHOST_SCRATCH). `BENCH_RUNS` changes the number of runs (default 10).
//!
//! Each cold run is a fresh VM of the busybox test image (`--image-archive`): rootfs copy,
//! VMM start, agent boot, `podman load`, `podman run`, poweroff, cleanup. The breakdown comes
//! from fcvm's own step marks (FCVM_PODMAN_TIMINGS) and the agent's console timestamps. Each
//! fcvm run is followed by a bare run, so drift in the machine's load hits both alike.
//!
//! First, the image cache: one miss, then `BENCH_CACHE_RUNS` (default 3) cold runs
//! (`--no-snapshot`) and cache hits interleaved, command -> first output line side by side.
//! `BENCH_CACHE_ONLY=1` stops after that section. The other sections run cold.
mod common;

mod podman_bare;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE_REF: &str = "localhost/fcvm-bench-busybox:1";

fn main() {
    if !common::can_run(
        "podman",
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
        .unwrap_or(10);
    let fcvm = PathBuf::from(env!("CARGO_BIN_EXE_fcvm"));
    let parent = std::env::var_os("FCVM_TESTHOST_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let base = tempfile::Builder::new()
        .prefix("fcvm-b")
        .tempdir_in(parent)
        .unwrap();
    let kernel = std::env::var("FCVM_TEST_KERNEL").unwrap();
    let archive = fcvm_testkit::testimage::build_busybox_archive(
        Path::new(fcvm_testkit::testimage::DEFAULT_BUSYBOX),
        &base.path().join("busybox.oci.tar"),
        "fcvm-bench-busybox",
        "1",
    )
    .expect("build the busybox test image");
    // Cold unless a section turns the image cache on (`cached`).
    let cmd = |args: &[&str]| {
        let mut c = Command::new(&fcvm);
        c.args(args)
            .env("FCVM_BASE_DIR", base.path())
            .env("FCVM_NO_SNAPSHOT", "1");
        c
    };
    let run_args = |name: &str, tail: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["podman", "run", "--rm", "--name", name, "--image-archive"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(archive.path.display().to_string());
        v.push("--kernel".into());
        v.push(kernel.clone());
        v.push(IMAGE_REF.into());
        v.push("--".into());
        v.extend(tail.iter().map(|s| s.to_string()));
        v
    };

    image_cache(&cmd, &run_args, cache_runs());
    if std::env::var_os("BENCH_CACHE_ONLY").is_some() {
        return;
    }

    let bare_inputs = podman_bare::Inputs {
        firecracker: std::env::var_os("FCVM_FIRECRACKER_BIN").unwrap().into(),
        kernel: kernel.clone().into(),
        rootfs: std::env::var_os("FCVM_ROOTFS").unwrap().into(),
        initrd: base.path().join("agent.cpio"),
        archive: archive.path.clone(),
        image_ref: IMAGE_REF.into(),
        vcpus: 1,
        mem_mib: 512,
    };
    podman_bare::write_initrd(
        Path::new(&std::env::var_os("FCVM_AGENT_BIN").unwrap()),
        &bare_inputs.initrd,
    )
    .expect("write the agent initrd");

    // Cold runs, fcvm and bare interleaved.
    let mut first_line = Vec::new();
    let mut total = Vec::new();
    let mut bare_first = Vec::new();
    let mut bare_status = Vec::new();
    let mut bare_vmm_exit = Vec::new();
    let mut bare_done = Vec::new();
    // In the order the steps happen (first run's order).
    let mut steps: Vec<(String, Vec<f64>)> = Vec::new();
    for i in 0..runs {
        let args = run_args(&format!("bench{i}"), &["echo", "hello"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let start = Instant::now();
        let mut child = cmd(&args)
            .env("FCVM_PODMAN_TIMINGS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let t_first = start.elapsed();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = child.wait().unwrap();
        let t_exit = start.elapsed();
        assert!(st.success() && line == "hello\n", "run failed: {st}\n{err}");
        first_line.push(ms(t_first));
        total.push(ms(t_exit));
        for (k, v) in breakdown(&err) {
            match steps.iter_mut().find(|(name, _)| *name == k) {
                Some((_, vs)) => vs.push(v),
                None => steps.push((k, vec![v])),
            }
        }

        let dir = base.path().join(format!("b{i}"));
        let t = podman_bare::run(
            &bare_inputs,
            &dir,
            &format!("bare{i}"),
            i,
            &["echo", "hello"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        bare_first.push(ms(t.first_stdout));
        bare_status.push(ms(t.exit_status));
        bare_vmm_exit.push(ms(t.vmm_exited));
        bare_done.push(ms(t.done));
    }
    let paired = |a: &[f64], b: &[f64]| -> f64 {
        let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        common::median(&mut r)
    };
    let ratio_first = paired(&first_line, &bare_first);
    let ratio_exit = paired(&total, &bare_done);
    let fcvm_first = common::median(&mut first_line);
    let fcvm_exit = common::median(&mut total);
    let bare_first_m = common::median(&mut bare_first);
    let bare_done_m = common::median(&mut bare_done);
    println!("podman run (real Firecracker, fcvm guest kernel, busybox archive, `echo hello`), median of {runs}:");
    println!("  command -> first output line  {fcvm_first:8.1} ms");
    println!("  command -> exit               {fcvm_exit:8.1} ms");
    println!("  breakdown (median of each step):");
    for (k, mut v) in steps {
        println!("    {k:<40} {:8.1} ms", common::median(&mut v));
    }
    println!("the same run, bare Firecracker (--no-api --config-file --metadata) + minimal client, median of {runs}:");
    println!("  start -> first stdout frame   {bare_first_m:8.1} ms");
    println!(
        "  start -> exit:N status        {:8.1} ms",
        common::median(&mut bare_status)
    );
    println!(
        "  start -> firecracker exited   {:8.1} ms",
        common::median(&mut bare_vmm_exit)
    );
    println!("  start -> VM dir removed       {bare_done_m:8.1} ms");
    println!("fcvm / bare (ratio of medians; median of per-pair ratios):");
    println!(
        "  first output line                     {:.3}x  {ratio_first:.3}x",
        fcvm_first / bare_first_m
    );
    println!(
        "  exit (fcvm exited; bare: dir removed) {:.3}x  {ratio_exit:.3}x",
        fcvm_exit / bare_done_m
    );

    // exec round trip on one running VM.
    let args = run_args("benchexec", &["sleep", "600"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = cmd(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Cold runs take ~40 s to `ready` in the emulated host when another one shares the cores.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let o = cmd(&["exec", "--name", "benchexec", "--", "true"])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = vm.kill();
            let _ = vm.wait();
            panic!("VM never became ready");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rtt_container = Vec::new();
    let mut rtt_vm = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let o = cmd(&["exec", "--name", "benchexec", "--", "true"])
            .output()
            .unwrap();
        assert!(o.status.success());
        rtt_container.push(ms(t.elapsed()));
        let t = Instant::now();
        let o = cmd(&["exec", "--name", "benchexec", "--vm", "--", "true"])
            .output()
            .unwrap();
        assert!(o.status.success());
        rtt_vm.push(ms(t.elapsed()));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = vm.wait();
    println!("fcvm exec round trip (whole `fcvm exec -- true` process), median of {runs}:");
    println!(
        "  in the container (podman exec)  {:8.1} ms",
        common::median(&mut rtt_container)
    );
    println!(
        "  in the VM (--vm)                {:8.1} ms",
        common::median(&mut rtt_vm)
    );
}

/// Runs per side of the image cache section (`BENCH_CACHE_RUNS`, default 3).
fn cache_runs() -> usize {
    std::env::var("BENCH_CACHE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// One `podman run`: (command -> first output line, command -> exit, stderr).
fn timed_run(mut c: Command) -> (f64, f64, String) {
    let start = Instant::now();
    let mut child = c
        .env("FCVM_PODMAN_TIMINGS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let first = start.elapsed();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let st = child.wait().unwrap();
    assert!(st.success() && line == "hello\n", "run failed: {st}\n{err}");
    (ms(first), ms(start.elapsed()), err)
}

/// The image cache: one miss (boot + snapshot), then cold runs (`--no-snapshot`) and hits
/// interleaved, `runs` of each; command -> first output line, medians side by side.
fn image_cache(
    cmd: &dyn Fn(&[&str]) -> Command,
    run_args: &dyn Fn(&str, &[&str]) -> Vec<String>,
    runs: usize,
) {
    let cached = |name: &str| {
        let args = run_args(name, &["echo", "hello"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = cmd(&args);
        c.env_remove("FCVM_NO_SNAPSHOT");
        c
    };
    let (miss_first, miss_exit, err) = timed_run(cached("miss"));
    assert!(err.contains("fcvm: cache created"), "{err}");
    let snapshot_step = breakdown(&err)
        .into_iter()
        .find(|(k, _)| k.contains("cache-snapshot"));
    let (mut cold, mut hit, mut cold_exit, mut hit_exit) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut hit_steps: Vec<(String, Vec<f64>)> = Vec::new();
    for i in 0..runs {
        let args = run_args(&format!("cold{i}"), &["echo", "hello"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (f, e, err) = timed_run(cmd(&args));
        assert!(err.contains("fcvm: cold"), "{err}");
        cold.push(f);
        cold_exit.push(e);
        let (f, e, err) = timed_run(cached(&format!("hit{i}")));
        assert!(err.contains("fcvm: cache hit"), "{err}");
        hit.push(f);
        hit_exit.push(e);
        for (k, v) in breakdown(&err) {
            match hit_steps.iter_mut().find(|(name, _)| *name == k) {
                Some((_, vs)) => vs.push(v),
                None => hit_steps.push((k, vec![v])),
            }
        }
    }
    let (c, h) = (common::median(&mut cold), common::median(&mut hit));
    let (ce, he) = (
        common::median(&mut cold_exit),
        common::median(&mut hit_exit),
    );
    println!("image cache (podman run of the busybox archive, `echo hello`), median of {runs}:");
    println!("                                  cold (--no-snapshot)   cache hit   cold/hit");
    println!(
        "  command -> first output line  {c:12.1} ms {h:12.1} ms   {:.2}x",
        c / h
    );
    println!(
        "  command -> exit               {ce:12.1} ms {he:12.1} ms   {:.2}x",
        ce / he
    );
    println!(
        "  the miss that created the entry: first line {miss_first:.1} ms, exit {miss_exit:.1} ms{}",
        snapshot_step.map_or(String::new(), |(k, v)| format!(" ({k} at {v:.1} ms)"))
    );
    println!("  cache hit breakdown (median of each step):");
    for (k, mut v) in hit_steps {
        println!("    {k:<40} {:8.1} ms", common::median(&mut v));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Step durations from `fcvm-timing` lines: host marks are ms since fcvm started; agent
/// lines carry ms since the agent started.
fn breakdown(stderr: &str) -> Vec<(String, f64)> {
    let mut host: Vec<(String, f64)> = Vec::new();
    let mut agent: Vec<(String, f64)> = Vec::new();
    for l in stderr.lines() {
        if let Some(rest) = l.strip_prefix("fcvm-timing host ") {
            if let Some((k, v)) = rest.rsplit_once(' ') {
                if let Ok(v) = v.parse() {
                    host.push((k.to_owned(), v));
                }
            }
        } else if let Some(rest) = l.strip_prefix("fcvm-timing agent fc-agent [") {
            if let Some((ms, what)) = rest.split_once(" ms] ") {
                if let Ok(v) = ms.trim().parse::<f64>() {
                    let what = what.split(':').next().unwrap_or(what);
                    let what = what.split(" (").next().unwrap_or(what);
                    agent.push((what.to_owned(), v));
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut prev = ("fcvm start".to_string(), 0.0);
    for (k, v) in host {
        out.push((format!("host {} -> {}", prev.0, k), v - prev.1));
        prev = (k, v);
    }
    let mut prev = ("agent start".to_string(), 0.0);
    for (k, v) in agent {
        if k.starts_with("container exited") || k == "powering off" {
            continue;
        }
        out.push((format!("agent {} -> {}", prev.0, k), v - prev.1));
        prev = (k, v);
    }
    out
}
