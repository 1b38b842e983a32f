//! The probe under the real Firecracker (v1.12.1, from FCVM_FIRECRACKER_BIN).
//!
//! Each test boots its own microVM and checks the serial output against the
//! reference model in `fcvm_probe::model`, so a wrong page, generation or
//! checksum anywhere in the guest fails here. Timings are printed, never
//! asserted (the figures bench reports them properly).

mod support;

use std::time::Duration;

use fcvm_probe::model::{page_bytes, ProbeModel, PAGE_SIZE};
use fcvm_probe::output::{Banner, PageError, ProbeLine, Shutdown, ShutdownReason, Tick};
use fcvm_probe::{ProbeArgs, FILL_BASE, KERNEL_LOAD_ADDR};
use serde_json::json;
use support::{firecracker_bin, Start, Vm};

const BOOT: Duration = Duration::from_secs(10);
const STEP: Duration = Duration::from_secs(5);

fn banner(vm: &mut Vm) -> Banner {
    let seen = vm.next(BOOT);
    match seen.line {
        ProbeLine::Banner(b) => b,
        other => panic!("first probe line is not the banner: {other}"),
    }
}

fn tick(vm: &mut Vm) -> Tick {
    vm.until(STEP, |l| match l {
        ProbeLine::Tick(t) => Some(*t),
        ProbeLine::Error(e) => panic!("unexpected {}", ProbeLine::Error(*e)),
        _ => None,
    })
    .1
}

#[test]
fn boots_fills_and_ticks_exactly_as_the_model_says() {
    let Some(bin) = firecracker_bin("boots_fills_and_ticks_exactly_as_the_model_says") else {
        return;
    };
    let args = ProbeArgs {
        mem_mib: 64,
        seed: 0xfeed_f00d,
        tick_ms: 50,
        dirty_pages: 5,
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
    let spawned = vm.spawned;

    let first = vm.next(BOOT);
    let ProbeLine::Banner(b) = first.line else {
        panic!("first probe line is not the banner: {}", first.line)
    };
    assert_eq!(
        (b.mem_mib, b.seed, b.tick_ms, b.dirty_pages, b.exit_after),
        (64, 0xfeed_f00d, 50, 5, 0)
    );
    assert_eq!((b.requested_mib, b.ram_mib), (64, 128));
    assert_eq!(b.avail_mib, 126, "128 MiB minus the first 2 MiB");
    assert_eq!(b.verify_pages, 64 * 256, "whole region by default");
    assert!(!b.clamped());
    assert_ne!(b.boot_id, 0);

    let (filled_at, filled) = vm.until(STEP, |l| match l {
        ProbeLine::Filled(f) => Some(*f),
        _ => None,
    });
    let model = ProbeModel::from_banner(&b);
    assert_eq!(filled.pages, 64 * 256);
    assert_eq!(filled.checksum, model.filled_checksum(), "FILLED checksum");

    let mut last = 0;
    for _ in 0..4 {
        let t = tick(&mut vm);
        assert_eq!(t.n, last + 1, "ticks go up by one");
        assert_eq!(
            t,
            model.expected_tick(t.n),
            "TICK {} matches the model",
            t.n
        );
        last = t.n;
    }
    let banner_ms = first.at.duration_since(spawned).as_secs_f64() * 1e3;
    eprintln!(
        "figures: spawn->banner {banner_ms:.1} ms, spawn->FILLED {:.1} ms, guest fill {} ms for 64 MiB ({:.0} MiB/s), boot_id source {:?}",
        filled_at.duration_since(spawned).as_secs_f64() * 1e3,
        filled.ms,
        64_000.0 / filled.ms.max(1) as f64,
        b.id_source
    );
}

#[test]
fn exit_after_prints_shutdown_and_firecracker_exits_zero() {
    let Some(bin) = firecracker_bin("exit_after_prints_shutdown_and_firecracker_exits_zero") else {
        return;
    };
    let args = ProbeArgs {
        mem_mib: 16,
        tick_ms: 20,
        exit_after: 3,
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
    let b = banner(&mut vm);
    assert_eq!(b.exit_after, 3);
    let model = ProbeModel::from_banner(&b);
    for n in 1..=3 {
        assert_eq!(tick(&mut vm), model.expected_tick(n));
    }
    let seen = vm.next(STEP);
    assert_eq!(
        seen.line,
        ProbeLine::Shutdown(Shutdown {
            reason: ShutdownReason::ExitAfter,
            n: 3
        })
    );
    let status = vm.wait_exit(STEP);
    assert!(status.success(), "firecracker exit status {status}");
}

#[test]
fn send_ctrl_alt_del_stops_the_guest_and_firecracker_exits_zero() {
    let Some(bin) = firecracker_bin("send_ctrl_alt_del_stops_the_guest_and_firecracker_exits_zero")
    else {
        return;
    };
    let args = ProbeArgs {
        mem_mib: 16,
        tick_ms: 20,
        ..ProbeArgs::default()
    };
    let mut vm = Vm::start(
        &bin,
        Start::Boot {
            mem_mib: 128,
            args: &args,
            api: true,
        },
    );
    banner(&mut vm);
    let before = tick(&mut vm);
    vm.api_ok(
        "PUT",
        "/actions",
        json!({ "action_type": "SendCtrlAltDel" }),
    );
    let (_, shutdown) = vm.until(STEP, |l| match l {
        ProbeLine::Shutdown(s) => Some(*s),
        _ => None,
    });
    assert_eq!(shutdown.reason, ShutdownReason::CtrlAltDel);
    assert!(shutdown.n > before.n, "noticed on a later tick");
    let status = vm.wait_exit(STEP);
    assert!(status.success(), "firecracker exit status {status}");
}

#[test]
fn oversized_request_is_clamped_and_rolling_windows_match_the_model() {
    let Some(bin) =
        firecracker_bin("oversized_request_is_clamped_and_rolling_windows_match_the_model")
    else {
        return;
    };
    let args = ProbeArgs {
        mem_mib: 1000,
        seed: 7,
        tick_ms: 10,
        dirty_pages: 3,
        exit_after: 6,
        verify_pages: 5000,
        fault_after: 0,
    };
    let mut vm = Vm::start(
        &bin,
        Start::Boot {
            mem_mib: 64,
            args: &args,
            api: false,
        },
    );
    let b = banner(&mut vm);
    assert!(b.clamped());
    assert_eq!(
        (b.requested_mib, b.mem_mib, b.avail_mib, b.ram_mib),
        (1000, 62, 62, 64)
    );
    assert_eq!(b.verify_pages, 5000);
    let model = ProbeModel::from_banner(&b);
    let (_, filled) = vm.until(STEP, |l| match l {
        ProbeLine::Filled(f) => Some(*f),
        _ => None,
    });
    assert_eq!(
        (filled.pages, filled.checksum),
        (62 * 256, model.filled_checksum())
    );
    // 5000-page windows over 15872 pages wrap around during tick 4.
    for n in 1..=6 {
        assert_eq!(tick(&mut vm), model.expected_tick(n), "tick {n}");
    }
    assert!(matches!(
        vm.next(STEP).line,
        ProbeLine::Shutdown(Shutdown {
            reason: ShutdownReason::ExitAfter,
            n: 6
        })
    ));
    assert!(vm.wait_exit(STEP).success());
}

#[test]
fn fault_after_reports_the_page_fault_and_firecracker_exits_zero() {
    let Some(bin) =
        firecracker_bin("fault_after_reports_the_page_fault_and_firecracker_exits_zero")
    else {
        return;
    };
    let args = ProbeArgs {
        mem_mib: 4,
        tick_ms: 10,
        fault_after: 2,
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
    assert_eq!(banner(&mut vm).fault_after, 2);
    assert_eq!(tick(&mut vm).n, 1);
    assert_eq!(tick(&mut vm).n, 2);
    let ProbeLine::Fault(fault) = vm.next(STEP).line else {
        panic!("expected a FAULT line after tick 2")
    };
    // A ring-3 write (error 4|2) to a present page (1) in the kernel window.
    assert_eq!(
        (fault.vector, fault.error, fault.cr2),
        (14, 7, KERNEL_LOAD_ADDR)
    );
    assert!(
        (0x11_0000..0x13_0000).contains(&fault.rip),
        "rip {:#x} is in the ring-3 code window",
        fault.rip
    );
    assert!(vm.wait_exit(STEP).success());
}

/// Pause/resume keeps counting; a Full snapshot restores the same run (same
/// boot id, no new banner, next tick numbers, model checksums); and a page
/// corrupted in the snapshot memory file is reported with its exact word.
#[test]
fn snapshots_restore_the_same_run_and_corruption_is_reported() {
    let Some(bin) = firecracker_bin("snapshots_restore_the_same_run_and_corruption_is_reported")
    else {
        return;
    };
    let args = ProbeArgs {
        mem_mib: 64,
        seed: 3,
        tick_ms: 100,
        dirty_pages: 11,
        ..ProbeArgs::default()
    };
    let mut vm = Vm::start(
        &bin,
        Start::Boot {
            mem_mib: 128,
            args: &args,
            api: true,
        },
    );
    let b = banner(&mut vm);
    let model = ProbeModel::from_banner(&b);
    let t = tick(&mut vm);
    assert_eq!(t, model.expected_tick(1));

    // Pause for several tick periods: no tick is lost or skipped.
    vm.api_ok("PATCH", "/vm", json!({ "state": "Paused" }));
    std::thread::sleep(Duration::from_millis(350));
    vm.api_ok("PATCH", "/vm", json!({ "state": "Resumed" }));
    let mut last = t.n;
    for _ in 0..2 {
        let t = tick(&mut vm);
        assert_eq!(t, model.expected_tick(last + 1));
        last = t.n;
    }

    // Pause and collect what the guest printed up to that point: the host
    // may lag behind (the model takes a while per tick in a debug build).
    vm.api_ok("PATCH", "/vm", json!({ "state": "Paused" }));
    for seen in vm.drain(Duration::from_millis(300)) {
        let ProbeLine::Tick(t) = seen.line else {
            panic!("unexpected {}", seen.line)
        };
        assert_eq!(t, model.expected_tick(last + 1));
        last = t.n;
    }
    let snap = vm.dir.path().join("vm.snap");
    let mem = vm.dir.path().join("vm.mem");
    vm.api_ok(
        "PUT",
        "/snapshot/create",
        json!({ "snapshot_type": "Full", "snapshot_path": snap, "mem_file_path": mem }),
    );

    // The memory file holds the pattern where the model says it is.
    let victim = 10_000u64; // far from the rewrite cursor for a long while
    let offset = FILL_BASE + victim * PAGE_SIZE;
    let mut image = std::fs::read(&mem).expect("read the snapshot memory file");
    let page = &mut image[offset as usize..(offset + PAGE_SIZE) as usize];
    assert_eq!(
        page,
        page_bytes(3, victim, model.generation(victim, last)).as_slice()
    );

    // Restore intact: same run, the very next tick numbers.
    let mut restored = Vm::start(&bin, Start::ApiOnly);
    restored.api_ok(
        "PUT",
        "/snapshot/load",
        json!({ "snapshot_path": snap, "mem_backend": { "backend_type": "File", "backend_path": mem }, "resume_vm": true }),
    );
    for n in last + 1..=last + 2 {
        match restored.next(STEP).line {
            ProbeLine::Tick(t) => assert_eq!(t, model.expected_tick(n), "restored tick"),
            other => panic!("a restored VM must only tick (no new banner), got {other}"),
        }
    }
    drop(restored);

    // Restore with one flipped word: ERROR names it, TICK counts it.
    let word = 100usize;
    let at = word * 8;
    let expected = u64::from_le_bytes(page[at..at + 8].try_into().unwrap());
    let found = expected ^ 0x0000_dead_beef_0000;
    page[at..at + 8].copy_from_slice(&found.to_le_bytes());
    let bad_mem = vm.dir.path().join("bad.mem");
    std::fs::write(&bad_mem, &image).expect("write the corrupted memory file");
    drop(image);
    vm.kill(); // keeps vm.dir, which holds the snapshot, until the end

    let mut corrupt = Vm::start(&bin, Start::ApiOnly);
    corrupt.api_ok(
        "PUT",
        "/snapshot/load",
        json!({ "snapshot_path": snap, "mem_backend": { "backend_type": "File", "backend_path": bad_mem }, "resume_vm": true }),
    );
    // The snapshot may have caught the guest mid-verify, past the victim
    // page: then the first tick ends clean and the next one sees it.
    let (_, error) = corrupt.until(STEP, |l| match l {
        ProbeLine::Error(e) => Some(*e),
        ProbeLine::Tick(t) if t.n <= last + 1 => None,
        ProbeLine::Tick(t) => panic!("tick {} after snapshot at {last}, no ERROR yet", t.n),
        _ => None,
    });
    assert_eq!(
        error,
        PageError {
            page: victim,
            expected,
            found,
            word: word as u64
        }
    );
    let t = tick(&mut corrupt);
    assert_eq!(t.bad, 1);
    assert_eq!(t.verified, model.verify_pages());
    assert_ne!(
        t.checksum,
        model.expected_tick(t.n).checksum,
        "checksum covers the corruption"
    );
}
