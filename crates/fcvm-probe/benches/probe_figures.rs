//! Figures for the probe under the real Firecracker: boot latency, ring-3
//! fill and verify speed, idle CPU cost. Prints them; asserts nothing.
//!
//! `cargo bench -p fcvm-probe --bench probe_figures` with
//! FCVM_FIRECRACKER_BIN set. FCVM_PROBE_BENCH_SIZES (MiB, comma-separated,
//! default `64,512,3072`) picks the fill sizes; each runs in a VM with 128 MiB
//! more RAM than it fills.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use fcvm_probe::output::ProbeLine;
use fcvm_probe::ProbeArgs;
use support::{firecracker_bin, Start, Vm};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "median {:.1} min {:.1} max {:.1} (n={})",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1],
        v.len()
    )
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn filled(vm: &mut Vm, timeout: Duration) -> (Instant, u64) {
    vm.until(timeout, |l| match l {
        ProbeLine::Filled(f) => Some(f.ms),
        _ => None,
    })
}

fn tick_times(vm: &mut Vm, count: usize, timeout: Duration) -> Vec<Instant> {
    (0..count)
        .map(|_| {
            vm.until(timeout, |l| match l {
                ProbeLine::Tick(t) if t.bad == 0 => Some(()),
                ProbeLine::Tick(t) => panic!("bad pages: {t:?}"),
                _ => None,
            })
            .0
        })
        .collect()
}

fn main() {
    let Some(bin) = firecracker_bin("probe_figures bench") else {
        return;
    };

    // Boot latency with the default 32 MiB fill.
    let mut to_banner = Vec::new();
    let mut to_filled = Vec::new();
    for _ in 0..7 {
        let args = ProbeArgs::default();
        let mut vm = Vm::start(
            &bin,
            Start::Boot {
                mem_mib: 128,
                args: &args,
                api: false,
            },
        );
        let seen = vm.next(Duration::from_secs(10));
        assert!(matches!(seen.line, ProbeLine::Banner(_)));
        to_banner.push(ms(seen.at - vm.spawned));
        let (at, _) = filled(&mut vm, Duration::from_secs(10));
        to_filled.push(ms(at - vm.spawned));
    }
    println!("spawn -> BANNER (ms): {}", stats(to_banner));
    println!("spawn -> FILLED 32 MiB (ms): {}", stats(to_filled));

    // Fill and full-region verify speed per size. tick_ms=1 keeps the guest
    // busy, so the spacing of TICK lines is the cost of one tick's verify.
    let sizes = std::env::var("FCVM_PROBE_BENCH_SIZES").unwrap_or_else(|_| "64,512,3072".into());
    for mib in sizes
        .split(',')
        .filter_map(|s| s.trim().parse::<u64>().ok())
    {
        let args = ProbeArgs {
            mem_mib: mib,
            tick_ms: 1,
            ..ProbeArgs::default()
        };
        let mut vm = Vm::start(
            &bin,
            Start::Boot {
                mem_mib: mib + 128,
                args: &args,
                api: false,
            },
        );
        let slow = Duration::from_secs(60 + mib / 20);
        let (_, fill_ms) = filled(&mut vm, slow);
        let times = tick_times(&mut vm, 6, slow);
        let gaps: Vec<f64> = times.windows(2).map(|w| ms(w[1] - w[0])).collect();
        let verify = stats(gaps.clone());
        let median = {
            let mut g = gaps;
            g.sort_by(f64::total_cmp);
            g[g.len() / 2]
        };
        println!(
            "{mib} MiB: fill {fill_ms} ms ({:.0} MiB/s, first touch of guest RAM); verify per tick (ms): {verify} ({:.0} MiB/s)",
            mib as f64 * 1e3 / fill_ms.max(1) as f64,
            mib as f64 * 1e3 / median.max(0.001)
        );
    }

    // Idle cost: CPU used by Firecracker while the probe ticks every 200 ms.
    for (mib, dirty) in [(32u64, 0u64), (64, 0), (64, 256)] {
        let args = ProbeArgs {
            mem_mib: mib,
            dirty_pages: dirty,
            ..ProbeArgs::default()
        };
        let mut vm = Vm::start(
            &bin,
            Start::Boot {
                mem_mib: 128,
                args: &args,
                api: false,
            },
        );
        filled(&mut vm, Duration::from_secs(10));
        tick_times(&mut vm, 1, Duration::from_secs(5));
        let (cpu0, t0) = (cpu_seconds(vm.pid()), Instant::now());
        tick_times(&mut vm, 15, Duration::from_secs(5));
        let used = (cpu_seconds(vm.pid()) - cpu0) / t0.elapsed().as_secs_f64();
        println!(
            "steady state, {mib} MiB verified every 200 ms, {dirty} dirty pages/tick: {:.1}% of one core",
            used * 100.0
        );
    }
}
