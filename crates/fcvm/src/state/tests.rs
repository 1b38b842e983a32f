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
    assert_eq!(reaped[0].record.id, stale.id);
    assert!(reaped[0].failures.is_empty());
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
