//! The spec → launch → teardown sequence against a recording VMM and network: every step
//! in order, and a failure injected at every step leaves nothing behind (or, for a failed
//! undo step, exactly that step in the record, which the next command finishes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::api::{ApiCall, ApiFuture, VmmApi};
use super::spawn::{SpawnError, SpawnFuture, SpawnOptions, SpawnedVmm, Spawner};
use super::*;
use crate::cleanup::CleanupStep;
use crate::firecracker::models::MmdsVersion;
use crate::firecracker::TransportError;
use crate::names::Name;
use crate::network::fake::RecordingNet;
use crate::network::NetworkAttachment;
use crate::paths::Paths;
use crate::process::ProcessRef;
use crate::state::{Store, VmKind, VmStatus};

/// Shared between the fake spawner and the APIs it hands out.
#[derive(Debug, Default)]
struct Script {
    calls: Mutex<Vec<String>>,
    fail: Mutex<Option<String>>,
    spawned: Mutex<Vec<ProcessRef>>,
}

impl Script {
    fn log(&self, what: &str) -> bool {
        self.calls.lock().unwrap().push(what.to_owned());
        let mut fail = self.fail.lock().unwrap();
        if fail.as_deref() == Some(what) {
            *fail = None;
            return true;
        }
        false
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[derive(Debug)]
struct FakeApi(Arc<Script>);

impl VmmApi for FakeApi {
    fn call<'a>(&'a self, call: ApiCall<'a>) -> ApiFuture<'a> {
        let failed = self.0.log(call.name());
        Box::pin(async move {
            if failed {
                Err(TransportError::Timeout {
                    method: hyper::Method::PUT,
                    uri: format!("/{}", call.name()),
                    timeout: Duration::from_secs(1),
                })
            } else {
                Ok(())
            }
        })
    }
}

/// "Spawns" a `sleep`, so the recorded KillProcess step has a real process to kill.
#[derive(Debug)]
struct FakeSpawner(Arc<Script>);

impl Spawner for FakeSpawner {
    fn spawn<'a>(&'a self, opts: &'a SpawnOptions) -> SpawnFuture<'a> {
        Box::pin(async move {
            if self.0.log("spawn") {
                return Err(SpawnError::Exec {
                    binary: opts.binary.clone(),
                    source: std::io::Error::other("injected"),
                });
            }
            std::fs::write(opts.vm_paths.firecracker_log(), "fake VMM: bad config\n").unwrap();
            let child = Command::new("sleep").arg("60").spawn().unwrap();
            let process = ProcessRef::of_pid(child.id()).unwrap();
            self.0.spawned.lock().unwrap().push(process);
            Ok(SpawnedVmm {
                process,
                child: crate::vm::spawn::VmmChild::Direct(child),
                api: Box::new(FakeApi(self.0.clone())),
                api_ready_after: Duration::ZERO,
            })
        })
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    paths: Paths,
    host: Host,
    net: Arc<RecordingNet>,
    script: Arc<Script>,
    disk: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths::new(dir.path());
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, b"disk").unwrap();
    let net = Arc::new(RecordingNet::default());
    let script = Arc::new(Script::default());
    let host = Host {
        store: Store::open(&paths).unwrap(),
        net: net.clone(),
        spawner: Arc::new(FakeSpawner(script.clone())),
    };
    Fixture {
        _dir: dir,
        paths,
        host,
        net,
        script,
        disk,
    }
}

fn boot_spec(f: &Fixture) -> VmSpec {
    let mut spec = VmSpec::new(
        &f.paths,
        Name::parse("vm1").unwrap(),
        VmKind::Container,
        Resources {
            vcpus: 1,
            mem_mib: 128,
            track_dirty_pages: false,
        },
        Source::Boot {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        },
        Launcher::Direct {
            binary: "/fc".into(),
        },
    );
    spec.drives.push(DriveSpec {
        id: "rootfs".into(),
        file: f.disk.clone(),
        copy_to: Some("rootfs.img".into()),
        root: true,
        read_only: false,
    });
    spec.network = NetworkAttachment::namespaced(&spec.id, "tap0");
    spec.vsock = true;
    spec.mmds = Some(Mmds {
        version: MmdsVersion::V2,
        data: serde_json::json!({"latest": {}}),
    });
    spec
}

const BOOT_CALLS: [&str; 9] = [
    "spawn",
    "machine-config",
    "boot-source",
    "drive",
    "network-interface",
    "vsock",
    "mmds-config",
    "mmds",
    "instance-start",
];

fn assert_nothing_left(f: &Fixture, dir: &Path) {
    assert!(f.host.store.list().unwrap().is_empty(), "record left");
    assert!(!dir.exists(), "runtime dir left");
    for p in f.script.spawned.lock().unwrap().iter() {
        assert!(!p.is_alive(), "VMM left running");
    }
}

#[tokio::test]
async fn launch_start_shutdown_in_order() {
    let f = fixture();
    let spec = boot_spec(&f);
    let dir = spec.paths.dir().to_owned();
    let netns = spec.network.netns().unwrap().to_owned();
    let mut vm = launch(&f.host, spec).await.unwrap();
    assert_eq!(vm.state(), VmState::Configured);
    assert!(dir.join("rootfs.img").is_file(), "private drive copy");
    let r = f.host.store.get(&vm.record().id).unwrap().unwrap();
    assert_eq!(r.status, VmStatus::Starting);
    assert!(matches!(r.cleanup[0], CleanupStep::KillProcess { .. }));
    assert_eq!(
        r.cleanup[1],
        CleanupStep::DeleteNetns {
            name: netns.clone()
        }
    );
    assert!(matches!(r.cleanup[2], CleanupStep::RemoveDir { .. }));
    vm.start().await.unwrap();
    assert_eq!(vm.record().status, VmStatus::Running);
    assert_eq!(f.script.calls(), BOOT_CALLS);
    // A second start is a typed error, not a second boot.
    assert!(matches!(vm.start().await, Err(LaunchError::State { .. })));

    let report = vm.shutdown(Duration::from_millis(50)).await;
    assert!(!report.graceful, "the fake VMM ignores Ctrl+Alt+Del");
    assert!(report.teardown.is_clean() && report.teardown.removed);
    assert_eq!(
        f.net.calls(),
        [
            format!("create_netns {netns} tap0"),
            format!("delete_netns {netns}")
        ]
    );
    assert_nothing_left(&f, &dir);
}

#[tokio::test]
async fn a_failure_at_every_step_leaves_nothing() {
    let steps = ["create_netns", "copy"]
        .into_iter()
        .chain(BOOT_CALLS)
        .collect::<Vec<_>>();
    for step in steps {
        let mut f = fixture();
        let spec = boot_spec(&f);
        let dir = spec.paths.dir().to_owned();
        match step {
            "create_netns" => f.net.fail_once("create_netns"),
            "copy" => f.disk = PathBuf::from("/nonexistent/disk.img"),
            other => *f.script.fail.lock().unwrap() = Some(other.to_owned()),
        }
        let spec = VmSpec {
            drives: vec![DriveSpec {
                file: f.disk.clone(),
                ..spec.drives[0].clone()
            }],
            ..spec
        };
        let err = match launch(&f.host, spec).await {
            Err(e) => e,
            Ok(mut vm) => {
                let e = vm.start().await.expect_err(step);
                drop(vm);
                e
            }
        };
        let text = crate::report::chain(&err);
        if BOOT_CALLS[1..].contains(&step) {
            assert!(text.contains("fake VMM: bad config"), "{step}: {text}");
        }
        assert_nothing_left(&f, &dir);
        let net = f.net.calls();
        if step != "create_netns" {
            assert_eq!(net.len(), 2, "{step}: {net:?}");
            assert!(net[1].starts_with("delete_netns"), "{step}: {net:?}");
        }
    }
}

#[tokio::test]
async fn a_failed_undo_step_stays_recorded_and_the_next_command_finishes_it() {
    let f = fixture();
    let spec = boot_spec(&f);
    let dir = spec.paths.dir().to_owned();
    let mut vm = launch(&f.host, spec).await.unwrap();
    vm.start().await.unwrap();
    let id = vm.record().id.clone();
    f.net.fail_once("delete_netns");
    let report = vm.finish(crate::cleanup::Disposition::Forget);
    assert_eq!(report.failures.len(), 1);
    let left = f.host.store.get(&id).unwrap().unwrap();
    assert_eq!(left.cleanup.len(), 1);
    assert!(matches!(left.cleanup[0], CleanupStep::DeleteNetns { .. }));
    assert!(!dir.exists(), "the steps after the failed one still ran");
    drop(vm);
    assert!(
        f.host.store.get(&id).unwrap().is_some(),
        "drop does not redo it"
    );

    // The next fcvm command (a new process: this one's record looks stale to it).
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_ref = ProcessRef::of_pid(dead.id()).unwrap();
    dead.wait().unwrap();
    f.host.store.update(&id, |r| r.owner = dead_ref).unwrap();
    let reaped = f.host.store.reap_stale().unwrap();
    assert_eq!(reaped.len(), 1);
    assert!(reaped[0].report.is_clean());
    assert_nothing_left(&f, &dir);
}

#[tokio::test]
async fn dropping_the_handle_tears_down() {
    let f = fixture();
    let spec = boot_spec(&f);
    let dir = spec.paths.dir().to_owned();
    let mut vm = launch(&f.host, spec).await.unwrap();
    vm.start().await.unwrap();
    drop(vm);
    assert_nothing_left(&f, &dir);
}

#[tokio::test]
async fn restore_loads_patches_and_resumes_and_detach_hands_over() {
    let f = fixture();
    let server = ProcessRef::current();
    let mut spec = VmSpec::new(
        &f.paths,
        Name::parse("clone1").unwrap(),
        VmKind::Clone,
        Resources {
            vcpus: 1,
            mem_mib: 128,
            track_dirty_pages: true,
        },
        Source::Snapshot {
            vmstate: "/snap/vmstate.bin".into(),
            memory: MemorySource::Uffd {
                socket: "/snap/uffd.sock".into(),
                server,
            },
        },
        Launcher::Direct {
            binary: "/fc".into(),
        },
    );
    spec.drives.push(DriveSpec {
        id: "rootfs".into(),
        file: f.disk.clone(),
        copy_to: Some("disk-rootfs.img".into()),
        root: false,
        read_only: false,
    });
    spec.lifetime = Lifetime::Detached;
    let mut vm = launch(&f.host, spec).await.unwrap();
    vm.start().await.unwrap();
    assert_eq!(
        f.script.calls(),
        ["spawn", "snapshot-load", "patch-drive", "resume"]
    );
    let vmm = vm.process().unwrap();
    let record = vm.detach();
    assert_eq!(record.owner, vmm, "the VMM owns a detached VM");
    assert_eq!(record.page_server, Some(server));
    assert!(vmm.is_alive(), "detach leaves it running");
    // `fcvm stop` of it later: the same teardown.
    let report = crate::cleanup::teardown_with(
        &f.host.store,
        &record.id,
        crate::cleanup::Disposition::Forget,
        f.net.as_ref(),
    )
    .unwrap();
    assert!(report.removed);
    assert!(vmm.wait_gone(Duration::from_secs(5)));
}

#[test]
fn state_transitions() {
    use VmState::*;
    assert!(Creating.can_become(Configured));
    assert!(Configured.can_become(Running));
    assert!(Running.can_become(Ended));
    assert!(!Running.can_become(Configured));
    assert!(!Ended.can_become(Running));
}
