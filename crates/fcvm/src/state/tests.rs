use std::process::Command;
use std::sync::{Arc, Barrier};

use super::*;
use crate::cleanup::CleanupStep;
use crate::names::Name;
use crate::process::ProcessRef;

fn record(name: &str) -> VmRecord {
    VmRecord::new(
        new_vm_id(),
        Name::parse(name).unwrap(),
        VmKind::Raw,
        "/nonexistent".into(),
    )
}

fn dead_process() -> ProcessRef {
    let mut child = Command::new("true").spawn().unwrap();
    let r = ProcessRef::of_pid(child.id()).unwrap();
    child.wait().unwrap();
    r
}

#[test]
fn create_update_list_remove() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().join("state")).unwrap();
    let r = record("web");
    store.create(&r).unwrap();
    let updated = store
        .update(&r.id, |r| r.status = VmStatus::Running)
        .unwrap();
    assert_eq!(updated.status, VmStatus::Running);
    let all = store.list().unwrap();
    assert_eq!(all, vec![updated]);
    assert_eq!(store.find_by_name("web").unwrap().id, r.id);
    assert_eq!(store.find_by_pid(std::process::id()).unwrap().id, r.id);
    store.remove(&r.id).unwrap();
    store.remove(&r.id).unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(matches!(
        store.find_by_name("web"),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn live_name_clash_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().to_owned()).unwrap();
    store.create(&record("db")).unwrap();
    let err = store.create(&record("db")).unwrap_err();
    assert!(matches!(err, StoreError::NameTaken { .. }));
    assert!(err.to_string().contains("already running"), "{err}");
}

#[test]
fn stale_record_is_reaped_with_its_cleanup_and_frees_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().join("state")).unwrap();
    let runtime = dir.path().join("vm");
    std::fs::create_dir_all(&runtime).unwrap();
    let mut orphan = Command::new("sleep").arg("60").spawn().unwrap();
    let orphan_ref = ProcessRef::of_pid(orphan.id()).unwrap();
    let reaper = std::thread::spawn(move || orphan.wait());

    let mut stale = record("api");
    stale.owner = dead_process();
    stale.cleanup = vec![
        CleanupStep::KillProcess {
            process: orphan_ref,
        },
        CleanupStep::RemoveDir {
            path: runtime.clone(),
        },
    ];
    store.create(&stale).unwrap();

    // The same name is free again because the first owner is dead.
    let fresh = record("api");
    let reaped = store.create(&fresh).unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].report.record.as_ref().unwrap().id, stale.id);
    assert_eq!(reaped[0].reason, ReapReason::OwnerGone);
    assert!(reaped[0].report.failures.is_empty());
    assert!(!runtime.exists());
    reaper.join().unwrap().unwrap();
    assert!(!orphan_ref.is_alive());
    assert_eq!(
        store
            .list()
            .unwrap()
            .iter()
            .map(|r| &r.id)
            .collect::<Vec<_>>(),
        [&fresh.id]
    );
}

#[test]
fn recycled_pid_counts_as_dead() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().to_owned()).unwrap();
    let mut r = record("x");
    r.owner.start_time += 1; // our pid, but a different process "incarnation"
    store.create(&r).unwrap();
    assert_eq!(store.reap_stale().unwrap().len(), 1);
}

#[test]
fn concurrent_creators_of_one_name_get_exactly_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().to_owned()).unwrap();
    let n = 16;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let store = store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                store.create(&record("same")).is_ok()
            })
        })
        .collect();
    let winners = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|w| *w)
        .count();
    assert_eq!(winners, 1);
    assert_eq!(store.list().unwrap().len(), 1);
}

/// As `podman run` without `--name` claims a name: draw, create, draw again on a clash.
#[test]
fn ten_concurrent_runs_without_a_name_all_get_distinct_names() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().to_owned()).unwrap();
    let n = 10;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let store = store.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                loop {
                    let mut r = record("x");
                    r.name = crate::names::generate();
                    match store.create(&r) {
                        Ok(_) => return r.name,
                        Err(StoreError::NameTaken { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let names: std::collections::BTreeSet<Name> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(names.len(), n);
    let stored: std::collections::BTreeSet<Name> =
        store.list().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(stored, names);
}

#[test]
fn concurrent_updates_are_not_lost_and_files_never_torn() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().to_owned()).unwrap();
    let r = record("counter");
    store.create(&r).unwrap();
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            let id = r.id.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    store.update(&id, |r| r.mem_mib += 1).unwrap();
                }
            })
        })
        .collect();
    // A reader racing the writers must always parse a whole record.
    let path = dir.path().join(format!("{}.json", r.id));
    for _ in 0..200 {
        let bytes = std::fs::read(&path).unwrap();
        serde_json::from_slice::<VmRecord>(&bytes).expect("torn record");
    }
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(store.find_by_name("counter").unwrap().mem_mib, 200);
}

#[test]
fn corrupt_record_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().to_owned()).unwrap();
    std::fs::write(dir.path().join("bad.json"), b"{not json").unwrap();
    let err = store.list().unwrap_err();
    assert!(err.to_string().contains("bad.json"), "{err}");
}

#[test]
fn a_failed_vm_holds_no_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().to_owned()).unwrap();
    let mut failed = record("c2");
    failed.status = VmStatus::Failed;
    failed.error = Some("page server died".into());
    failed.owner = dead_process();
    store.create(&failed).unwrap();
    // Shown until replaced: `fcvm ls` and `fcvm stop c2` still find it.
    assert_eq!(store.find_by_name("c2").unwrap().id, failed.id);
    let fresh = record("c2");
    store.create(&fresh).unwrap();
    let all = store.list().unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].id, fresh.id);
}

#[test]
fn a_failed_vm_with_pending_steps_is_retried_then_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().join("state")).unwrap();
    let leftover = dir.path().join("leftover");
    std::fs::create_dir_all(&leftover).unwrap();
    let mut failed = record("c3");
    failed.status = VmStatus::Failed;
    failed.owner = dead_process();
    failed.cleanup = vec![CleanupStep::RemoveDir {
        path: leftover.clone(),
    }];
    store.create(&failed).unwrap();
    let fresh = record("c3");
    let reaped = store.create(&fresh).unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].reason, ReapReason::Retry);
    assert!(!leftover.exists());
    // Nothing is left to undo, so the new VM replaces the failed record.
    assert_eq!(store.find_by_name("c3").unwrap().id, fresh.id);
    assert!(store.get(&failed.id).unwrap().is_none());
}

#[test]
fn teardown_keeps_exactly_the_failed_steps_and_the_next_run_finishes_them() {
    use crate::cleanup::{teardown_with, Disposition};
    use crate::network::fake::RecordingNet;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().join("state")).unwrap();
    let runtime = dir.path().join("vm");
    std::fs::create_dir_all(&runtime).unwrap();
    let mut r = record("net");
    r.cleanup = vec![
        CleanupStep::DeleteNetns {
            name: "fcvm-x".into(),
        },
        CleanupStep::RemoveDir {
            path: runtime.clone(),
        },
    ];
    store.create(&r).unwrap();
    let net = RecordingNet::default();
    net.fail_once("delete_netns");
    let report = teardown_with(&store, &r.id, Disposition::Forget, &net).unwrap();
    assert_eq!(report.failures.len(), 1);
    assert!(!report.removed);
    assert!(!runtime.exists(), "the other steps still ran");
    let kept = store.get(&r.id).unwrap().unwrap();
    assert_eq!(
        kept.cleanup,
        vec![CleanupStep::DeleteNetns {
            name: "fcvm-x".into()
        }]
    );
    assert_eq!(kept.status, VmStatus::Stopping);
    let report = teardown_with(&store, &r.id, Disposition::Forget, &net).unwrap();
    assert!(report.is_clean() && report.removed);
    assert!(store.get(&r.id).unwrap().is_none());
    assert_eq!(
        net.calls(),
        vec!["delete_netns fcvm-x", "delete_netns fcvm-x"]
    );
    // A teardown of a record that is gone is a no-op.
    let again = teardown_with(&store, &r.id, Disposition::Forget, &net).unwrap();
    assert!(again.record.is_none());
}

#[test]
fn reaping_does_not_hold_the_lock_while_it_kills() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().to_owned()).unwrap();
    // A process that ignores SIGTERM: the reaper waits 2 s before SIGKILL.
    let mut stubborn = Command::new("sh")
        .args(["-c", "trap '' TERM; sleep 30 & wait"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let process = ProcessRef::of_pid(stubborn.id()).unwrap();
    let waiter = std::thread::spawn(move || stubborn.wait());
    let mut stale = record("slow");
    stale.owner = dead_process();
    stale.cleanup = vec![CleanupStep::KillProcess { process }];
    store.create(&stale).unwrap();
    let reaping = {
        let store = store.clone();
        std::thread::spawn(move || store.reap_stale().unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let t = std::time::Instant::now();
    let listed = store.list().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_millis(500),
        "list waited {:?} for the reaper",
        t.elapsed()
    );
    // Claimed by the reaper: its owner is now this (live) process, so no one else reaps it.
    assert_eq!(listed[0].owner, ProcessRef::current());
    assert_eq!(listed[0].status, VmStatus::Stopping);
    let reaped = reaping.join().unwrap();
    assert_eq!(reaped.len(), 1);
    waiter.join().unwrap().unwrap();
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn a_vm_being_torn_down_after_its_vmm_died_frees_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().to_owned()).unwrap();
    let mut going = record("web");
    going.status = VmStatus::Stopping;
    going.vmm = Some(dead_process());
    // Its owner (say, a reaper) is alive and still running its undo steps.
    store.create(&going).unwrap();
    store.create(&record("web")).unwrap();
    assert_eq!(store.list().unwrap().len(), 2);
    // While its VMM still runs, the name is held.
    let mut stopping = record("db");
    stopping.status = VmStatus::Stopping;
    stopping.vmm = Some(ProcessRef::current());
    store.create(&stopping).unwrap();
    assert!(matches!(
        store.create(&record("db")),
        Err(StoreError::NameTaken { .. })
    ));
}

#[test]
fn an_exited_container_keeps_its_record_logs_and_name_until_removed() {
    use crate::cleanup::{teardown_with, Disposition};
    use crate::network::fake::RecordingNet;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_dir(dir.path().join("state")).unwrap();
    let (runtime, logs) = (dir.path().join("vm"), dir.path().join("logs"));
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::create_dir_all(&logs).unwrap();
    let mut r = record("job");
    r.kind = VmKind::Container;
    r.log_dir = Some(logs.clone());
    r.cleanup = vec![CleanupStep::RemoveDir {
        path: runtime.clone(),
    }];
    store.create(&r).unwrap();
    store.update(&r.id, |r| r.exit_code = Some(3)).unwrap();
    let net = RecordingNet::default();
    let report = teardown_with(&store, &r.id, Disposition::Exited, &net).unwrap();
    assert!(report.is_clean() && !report.removed);
    assert!(!runtime.exists(), "the VM's own files go");
    assert!(logs.exists(), "its logs stay");
    let kept = store.get(&r.id).unwrap().unwrap();
    assert_eq!((kept.status, kept.exit_code), (VmStatus::Exited, Some(3)));
    assert!(kept.cleanup.is_empty());
    // Its owner is gone (as a finished run's is): the reaper leaves it alone.
    store.update(&r.id, |r| r.owner = dead_process()).unwrap();
    assert!(store.reap_stale().unwrap().is_empty());
    assert_eq!(store.find_by_name("job").unwrap().id, r.id);
    // The name stays taken, with a message that says how to free it.
    let err = store.create(&record("job")).unwrap_err();
    assert!(matches!(err, StoreError::NameTakenByExited { code: 3, .. }));
    assert!(err.to_string().contains("fcvm rm job"), "{err}");
    // Removing it (rm) takes the logs too.
    let report = teardown_with(&store, &r.id, Disposition::Forget, &net).unwrap();
    assert!(report.removed && !logs.exists());
    store.create(&record("job")).unwrap();
}
