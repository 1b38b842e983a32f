//! Boot benchmark: `fcvm run --detach` of the probe guest, from command start to the first
//! serial line, under the jailer (the default as root) and with `--no-jailer`, against bare
//! Firecracker driven by a minimal client making the same API calls. Prints medians and the
//! jailer's ratio; never fails on speed.
//!
//! Run: `cargo bench -p fcvm --bench boot` (needs root, /dev/kvm, FCVM_FIRECRACKER_BIN).
//! `FCVM_BENCH_ROUNDS` sets the number of rounds (default 20).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fcvm::firecracker::models::{BootSource, MachineConfig};
use fcvm::firecracker::FirecrackerClient;
use fcvm::paths::Paths;

const BOOT_ARGS: &str = "probe.mem_mib=8 probe.tick_ms=1000";

fn main() {
    let Some(firecracker) = std::env::var_os("FCVM_FIRECRACKER_BIN").map(PathBuf::from) else {
        eprintln!("SKIPPED boot bench: set FCVM_FIRECRACKER_BIN");
        return;
    };
    let rounds: usize = std::env::var("FCVM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let fcvm_bin = fcvm_binary();
    let base = tempfile::Builder::new()
        .prefix("fcvm-b")
        .tempdir_in("/tmp")
        .unwrap();
    let kernel = fcvm::setup::probe::ensure(&Paths::new(base.path())).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut bare = Vec::new();
    let mut ours = Vec::new();
    let mut unjailed = Vec::new();
    for i in 0..rounds {
        // Interleave them so drift in machine load hits all alike.
        bare.push(rt.block_on(bare_boot(&firecracker, &kernel, base.path(), i)));
        ours.push(fcvm_boot(&fcvm_bin, base.path(), i, &[]));
        unjailed.push(fcvm_boot(&fcvm_bin, base.path(), i, &["--no-jailer"]));
    }
    let u = median(&mut unjailed);
    let (b, o) = (median(&mut bare), median(&mut ours));
    println!("boot to first serial line, probe guest, {rounds} rounds (median, min, max):");
    println!(
        "  bare firecracker + minimal client: {}",
        summary(&mut bare)
    );
    println!(
        "  fcvm run --detach:                 {}",
        summary(&mut ours)
    );
    println!(
        "  fcvm run --detach --no-jailer:     {}",
        summary(&mut unjailed)
    );
    println!(
        "  overhead: {:+.1} ms ({:.3}x)",
        (o.as_secs_f64() - b.as_secs_f64()) * 1e3,
        o.as_secs_f64() / b.as_secs_f64()
    );
    println!(
        "  jailer vs --no-jailer: {:+.1} ms ({:.3}x)",
        (o.as_secs_f64() - u.as_secs_f64()) * 1e3,
        o.as_secs_f64() / u.as_secs_f64()
    );
}

fn fcvm_binary() -> PathBuf {
    // benches run from target/<profile>/deps; the fcvm binary sits one level up.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("fcvm");
    assert!(
        bin.is_file(),
        "build the fcvm binary first (cargo build -p fcvm --release)"
    );
    bin
}

fn summary(v: &mut [Duration]) -> String {
    v.sort();
    format!(
        "{:.1} ms ({:.1} .. {:.1})",
        median(v).as_secs_f64() * 1e3,
        v[0].as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    )
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn wait_first_line(path: &Path, start: Instant) -> Duration {
    loop {
        if let Ok(text) = std::fs::read(path) {
            if text.contains(&b'\n') {
                return start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no serial output in {path:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

async fn bare_boot(fc: &Path, kernel: &Path, base: &Path, i: usize) -> Duration {
    let dir = base.join(format!("bare{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("fc.sock");
    let console = dir.join("console.log");
    let start = Instant::now();
    let mut child = Command::new(fc)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(File::create(&console).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = FirecrackerClient::new(&sock);
    client.wait_ready(Duration::from_secs(10)).await.unwrap();
    client
        .put_machine_config(&MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .put_boot_source(&BootSource {
            kernel_image_path: kernel.display().to_string(),
            initrd_path: None,
            boot_args: Some(BOOT_ARGS.into()),
        })
        .await
        .unwrap();
    client.start().await.unwrap();
    let t = wait_first_line(&console, start);
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    t
}

fn fcvm_boot(fcvm: &Path, base: &Path, i: usize, extra: &[&str]) -> Duration {
    let name = format!("bench{i}");
    let start = Instant::now();
    let status = Command::new(fcvm)
        .env("FCVM_BASE_DIR", base)
        .args(extra)
        .args([
            "run",
            "--name",
            &name,
            "--kernel",
            "probe",
            "--detach",
            "--boot-args",
            BOOT_ARGS,
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let vm_dir = std::fs::read_dir(base.join("vms"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let t = wait_first_line(&vm_dir.join("console.log"), start);
    let stopped = Command::new(fcvm)
        .env("FCVM_BASE_DIR", base)
        .args(["stop", &name, "--timeout", "0"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(stopped.success());
    t
}
