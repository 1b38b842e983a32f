//! `--map` volume throughput on the real path, side by side in one guest: sequential write
//! and read of 100 MiB, small-file creates per second and `stat` per operation, on a volume
//! (FUSE over vsock to fcvm's file server) against the guest's own disk (the container's
//! `/tmp`, on the VM's virtio block device), and on a volume with and without the guest's
//! writeback cache (`FCVM_NO_WRITEBACK_CACHE=1`). Prints medians and ratios; never fails on
//! speed.
//!
//! The figures come from `fcvm-test-tool fs-bench` (crates/fcvm-testkit) run in the
//! container, rounds alternating between the two directories so drift in the machine's load
//! hits both alike. Needs root, FCVM_ROOTFS (a guest rootfs image), FCVM_AGENT_BIN (the
//! static agent), FCVM_TEST_KERNEL, FCVM_FIRECRACKER_BIN and FCVM_TEST_TOOL (the static
//! fcvm-test-tool, `build_test_tools` in scripts/lib.sh), or it says what is missing and
//! exits 0. On hosts whose KVM cannot boot Linux guests, build it with
//! `cargo bench -p fcvm --bench volumes --no-run` and run the binary it names with
//! `on_real_kvm BINARY --bench` (scripts/lib.sh). `BENCH_RUNS` (default 3) rounds,
//! `BENCH_MIB` (default 100) MiB, `BENCH_FILES` (default 2000) small files.
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn var_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `fs-bench` lines of a run's output, as (dir, figures).
fn figures(out: &str) -> Vec<(String, BTreeMap<String, f64>)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("fs-bench "))
        .map(|l| {
            let mut dir = String::new();
            let mut f = BTreeMap::new();
            for (k, v) in l.split_whitespace().filter_map(|kv| kv.split_once('=')) {
                if k == "dir" {
                    dir = v.to_owned();
                } else if let Ok(x) = v.parse() {
                    f.insert(k.to_owned(), x);
                }
            }
            (dir, f)
        })
        .collect()
}

const KEYS: [&str; 5] = [
    "write_mib_s",
    "read_mib_s",
    "creates_per_s",
    "stat_us",
    "stat_sync_us",
];

fn main() {
    if !common::can_run(
        "volumes",
        &[
            "FCVM_ROOTFS",
            "FCVM_AGENT_BIN",
            "FCVM_TEST_KERNEL",
            "FCVM_FIRECRACKER_BIN",
            "FCVM_TEST_TOOL",
        ],
    ) {
        return;
    }
    let (runs, mib, files) = (
        var_or("BENCH_RUNS", 3),
        var_or("BENCH_MIB", 100),
        var_or("BENCH_FILES", 2000),
    );
    let fcvm = PathBuf::from(env!("CARGO_BIN_EXE_fcvm"));
    let parent = std::env::var_os("FCVM_TESTHOST_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let base = tempfile::Builder::new()
        .prefix("fcvm-vb")
        .tempdir_in(&parent)
        .unwrap();
    let archive = fcvm_testkit::testimage::build_busybox_archive_with(
        Path::new(fcvm_testkit::testimage::DEFAULT_BUSYBOX),
        &[fcvm_testkit::testimage::ExtraBinary {
            name: "fcvm-test-tool".into(),
            source: std::env::var_os("FCVM_TEST_TOOL").unwrap().into(),
        }],
        &base.path().join("tools.oci.tar"),
        "fcvm-bench-tools",
        "1",
    )
    .expect("build the test image with fcvm-test-tool");
    let volume = base.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    let kernel = std::env::var("FCVM_TEST_KERNEL").unwrap();

    // One VM per writeback setting; in it, `runs` rounds over the given directories.
    let run = |name: &str, writeback: bool, dirs: &[&str]| -> String {
        let rounds: Vec<String> = dirs
            .iter()
            .map(|d| format!("mkdir -p {d} && fcvm-test-tool fs-bench {d} {mib} {files}"))
            .collect();
        let script = format!(
            "for r in $(seq {runs}); do {} || exit 1; done",
            rounds.join(" && ")
        );
        let mut c = Command::new(&fcvm);
        c.args(["podman", "run", "--rm", "--name", name, "--mem", "1024"])
            .arg("-v")
            .arg(format!("{}:/v", volume.display()))
            .arg("--image-archive")
            .arg(&archive.path)
            .args(["--kernel", &kernel])
            .arg(&archive.reference)
            .args(["--", "sh", "-c", &script])
            .env("FCVM_BASE_DIR", base.path())
            .env("FCVM_NO_SNAPSHOT", "1");
        if !writeback {
            c.env("FCVM_NO_WRITEBACK_CACHE", "1");
        }
        // The figures as they come (a round takes minutes in the emulated host); fcvm's and
        // the tool's stderr straight through.
        let mut child = c.stdout(Stdio::piped()).spawn().unwrap();
        let mut out = String::new();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            eprintln!("{name}: {line}");
            out.push_str(&line);
            out.push('\n');
        }
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "bench run {name} failed: {status}\nstdout:\n{out}"
        );
        out
    };
    eprintln!("volumes bench: {runs} rounds of {mib} MiB and {files} files per directory");
    let mut by_case: BTreeMap<&str, Vec<BTreeMap<String, f64>>> = BTreeMap::new();
    for (dir, f) in figures(&run("vbench-wb", true, &["/v/b", "/tmp/b"])) {
        let case = if dir.starts_with("/v") {
            "volume (writeback)"
        } else {
            "guest disk"
        };
        by_case.entry(case).or_default().push(f);
    }
    for (_, f) in figures(&run("vbench-nowb", false, &["/v/b"])) {
        by_case.entry("volume (no writeback)").or_default().push(f);
    }
    let med = |case: &str, key: &str| -> f64 {
        let mut v: Vec<f64> = by_case
            .get(case)
            .map(|v| v.iter().filter_map(|f| f.get(key).copied()).collect())
            .unwrap_or_default();
        common::median(&mut v)
    };
    println!(
        "{:<24} {:>12} {:>12} {:>14} {:>10} {:>14}",
        "median of rounds", "write MiB/s", "read MiB/s", "creates/s", "stat µs", "stat sync µs"
    );
    for case in by_case.keys() {
        let row: Vec<f64> = KEYS.iter().map(|k| med(case, k)).collect();
        println!(
            "{:<24} {:>12.1} {:>12.1} {:>14.0} {:>10.1} {:>14.1}",
            case, row[0], row[1], row[2], row[3], row[4]
        );
    }
    for (a, b) in [
        ("volume (writeback)", "guest disk"),
        ("volume (writeback)", "volume (no writeback)"),
    ] {
        let ratios: Vec<String> = KEYS
            .iter()
            .map(|k| format!("{k} {:.2}x", med(a, k) / med(b, k)))
            .collect();
        println!("ratio {a} / {b}: {}", ratios.join(", "));
    }
}
