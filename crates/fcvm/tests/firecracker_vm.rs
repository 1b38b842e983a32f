//! The real Firecracker booting the probe guest through `fcvm run`.

use std::process::Stdio;
use std::time::Duration;

use fcvm::firecracker::FirecrackerClient;
use fcvm::process::ProcessRef;

use crate::common::{console_of, field, firecracker_or_skip, ticks, wait_until, TestEnv};

const BOOT: Duration = Duration::from_secs(20);

fn detach(env: &TestEnv, name: &str, extra: &[&str]) {
    let mut args = vec!["run", "--name", name, "--kernel", "probe", "--detach"];
    args.extend_from_slice(extra);
    env.ok(&args);
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn wait_ticks(env: &TestEnv, name: &str, at_least: usize) -> Vec<u64> {
    let log = console_of(env, name);
    wait_until(BOOT, "probe ticks", || {
        let t = ticks(&read(&log));
        (t.len() >= at_least).then_some(t)
    })
}

fn runtime(env: &TestEnv, name: &str) -> serde_json::Value {
    env.ls()
        .into_iter()
        .find(|v| v["name"] == name)
        .expect("listed")
}

#[test]
fn foreground_run_streams_the_console_and_exits_with_the_guest() {
    if firecracker_or_skip("foreground_run").is_none() {
        return;
    }
    let env = TestEnv::new();
    let out = env.fcvm(&[
        "run",
        "--name",
        "fg",
        "--kernel",
        "probe",
        "--mem",
        "128",
        "--boot-args",
        "probe.mem_mib=16 probe.tick_ms=20 probe.exit_after=5 probe.seed=7",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("PROBE BANNER"), "{stdout}");
    assert_eq!(field(&stdout, "PROBE BANNER", "seed"), Some("7"));
    assert_eq!(ticks(&stdout), vec![1, 2, 3, 4, 5], "{stdout}");
    assert!(stdout.contains("PROBE SHUTDOWN"), "{stdout}");
    for line in stdout.lines().filter(|l| l.contains("PROBE TICK")) {
        assert!(line.contains("bad=0"), "memory verification failed: {line}");
    }
    env.assert_clean();
}

#[test]
fn detached_vm_is_listed_configured_pausable_and_stoppable() {
    if firecracker_or_skip("detached_vm").is_none() {
        return;
    }
    let env = TestEnv::new();
    detach(
        &env,
        "det",
        &[
            "--cpu",
            "2",
            "--mem",
            "256",
            "--boot-args",
            "probe.mem_mib=32 probe.tick_ms=50",
        ],
    );

    // ls --json shows the VM; its pid is the Firecracker process.
    let vm = runtime(&env, "det");
    assert_eq!(vm["status"], "running");
    assert_eq!(vm["live"], true);
    let pid = vm["pid"].as_u64().unwrap() as u32;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert!(
        comm.starts_with("firecracker") || comm.starts_with("fc_vcpu"),
        "{comm}"
    );
    let by_pid: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["ls", "--json", "--pid", &pid.to_string()])).unwrap();
    assert_eq!(by_pid.len(), 1);
    assert!(env.ok(&["ls"]).contains("det"));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = FirecrackerClient::new(vm["api_socket"].as_str().unwrap());

    // GET /vm/config matches what fcvm set.
    let cfg = rt.block_on(client.vm_config()).unwrap();
    let mc = cfg.machine_config.unwrap();
    assert_eq!((mc.vcpu_count, mc.mem_size_mib), (2, 256));
    let boot = cfg.boot_source.unwrap();
    assert_eq!(
        boot.boot_args.as_deref(),
        Some("probe.mem_mib=32 probe.tick_ms=50")
    );
    assert!(boot.kernel_image_path.contains("fcvm-probe-"));

    // Pause stops the ticks; resume continues them from where they were.
    wait_ticks(&env, "det", 2);
    rt.block_on(client.pause()).unwrap();
    std::thread::sleep(Duration::from_millis(150)); // let a tick in flight land
    let log = console_of(&env, "det");
    let paused = ticks(&read(&log));
    std::thread::sleep(Duration::from_millis(500)); // 10 tick periods
    assert_eq!(ticks(&read(&log)), paused, "ticks advanced while paused");
    rt.block_on(client.resume()).unwrap();
    let after = wait_ticks(&env, "det", paused.len() + 2);
    let last = *paused.last().unwrap();
    assert_eq!(
        after[paused.len()],
        last + 1,
        "resume continues the tick sequence"
    );

    // Stop: graceful (the probe honours Ctrl+Alt+Del), and nothing is left.
    let out = env.fcvm(&["stop", "det"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("guest shut down"));
    assert!(
        !ProcessRef::of_pid(pid).is_some_and(|p| p.is_alive() && p.pid == pid && comm_is_fc(pid))
    );
    env.assert_clean();
}

fn comm_is_fc(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("firecracker"))
}

#[test]
fn same_name_twice_is_refused_and_the_loser_leaves_nothing() {
    if firecracker_or_skip("same_name_twice").is_none() {
        return;
    }
    let env = TestEnv::new();
    detach(&env, "dup", &["--boot-args", "probe.mem_mib=8"]);
    let out = env.fcvm(&["run", "--name", "dup", "--kernel", "probe", "--detach"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a VM named \"dup\" is already running"),
        "{err}"
    );
    assert_eq!(env.vm_dirs().len(), 1);
    assert_eq!(env.state_files().len(), 1);
    env.ok(&["stop", "dup"]);
    env.assert_clean();
}

#[test]
fn sigkill_of_foreground_fcvm_takes_firecracker_down_and_the_next_command_reaps() {
    if firecracker_or_skip("sigkill_foreground").is_none() {
        return;
    }
    let env = TestEnv::new();
    let mut child = env
        .command()
        .args([
            "run",
            "--name",
            "victim",
            "--kernel",
            "probe",
            "--boot-args",
            "probe.mem_mib=8",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the guest to run, then find Firecracker's pid from the record.
    let vmm = wait_until(BOOT, "vm running", || {
        let text = env
            .state_files()
            .first()
            .and_then(|p| std::fs::read_to_string(p).ok())?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        (v["status"] == "running")
            .then(|| serde_json::from_value::<ProcessRef>(v["vmm"].clone()).ok())?
    });
    let jailed = runtime(&env, "victim")["jail"].is_object();
    wait_ticks(&env, "victim", 1);
    child.kill().unwrap(); // SIGKILL: fcvm gets no chance to clean up
    child.wait().unwrap();
    if !jailed {
        assert!(
            vmm.wait_gone(Duration::from_secs(5)),
            "firecracker outlived its fcvm"
        );
    }
    // The record is stale now; any command reaps it and its files. A jailed Firecracker
    // (PID 1 of its own namespace, its uid dropped, so no parent-death signal) is killed
    // by that command.
    assert!(env.ls().is_empty());
    assert!(
        vmm.wait_gone(Duration::from_secs(5)),
        "the reaper left firecracker running"
    );
    env.assert_clean();
}

#[test]
fn killed_detached_firecracker_is_reaped_by_the_next_command() {
    if firecracker_or_skip("killed_detached").is_none() {
        return;
    }
    let env = TestEnv::new();
    detach(&env, "gone", &["--boot-args", "probe.mem_mib=8"]);
    let vm = runtime(&env, "gone");
    let vmm: ProcessRef = serde_json::from_value(vm["vmm"].clone()).unwrap();
    assert!(vmm.signal(nix::sys::signal::Signal::SIGKILL));
    assert!(vmm.wait_gone(Duration::from_secs(5)));
    assert!(env.ls().is_empty());
    env.assert_clean();
}

fn uid_line(pid: u32) -> String {
    read(std::path::Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_owned()
}

fn mode_and_owner(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.mode() & 0o777, m.uid())
}

#[test]
fn jailed_vmm_is_confined_and_leaves_nothing_and_no_jailer_still_works() {
    use std::os::unix::fs::MetadataExt;
    if firecracker_or_skip("jailed_vmm").is_none() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "the jailer needs root");
        eprintln!("SKIPPED jailed_vmm: the jailer needs root");
        return;
    }
    let env = TestEnv::new();
    detach(&env, "jailed", &["--boot-args", "probe.mem_mib=8"]);
    wait_ticks(&env, "jailed", 1);
    let vm = runtime(&env, "jailed");
    let id = vm["id"].as_str().unwrap().to_owned();
    let jail = &vm["jail"];
    assert!(jail.is_object(), "root runs go through the jailer: {vm}");
    let uid = jail["uid"].as_u64().unwrap() as u32;
    let (first, last) = fcvm::vm::jail::DEFAULT_UIDS;
    assert!((first..=last).contains(&uid), "uid {uid} from the range");
    let vmm: ProcessRef = serde_json::from_value(vm["vmm"].clone()).unwrap();
    let dir = std::path::PathBuf::from(vm["runtime_dir"].as_str().unwrap());

    // Its uid, its root (the runtime dir), its own PID namespace.
    assert_eq!(
        uid_line(vmm.pid),
        format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")
    );
    let root = std::fs::metadata(format!("/proc/{}/root/", vmm.pid)).unwrap();
    let rt = std::fs::metadata(&dir).unwrap();
    assert_eq!(
        (root.dev(), root.ino()),
        (rt.dev(), rt.ino()),
        "chroot is the runtime dir"
    );
    let status = read(std::path::Path::new(&format!("/proc/{}/status", vmm.pid)));
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(
        nspid.trim_end().ends_with("\t1"),
        "PID 1 of a new namespace: {nspid}"
    );
    // Its cgroup, with the memory limit.
    let cgroups: Vec<std::path::PathBuf> = serde_json::from_value(jail["cgroups"].clone()).unwrap();
    assert!(
        !cgroups.is_empty(),
        "this host has cgroup memory and cpu controllers"
    );
    let membership = read(std::path::Path::new(&format!("/proc/{}/cgroup", vmm.pid)));
    assert!(membership.contains(&format!("/fcvm/{id}")), "{membership}");
    let limit = jail["memory_limit"].as_u64().unwrap();
    let mem_mib = vm["mem_mib"].as_u64().unwrap();
    assert_eq!(limit, (mem_mib + fcvm::vm::jail::VMM_OVERHEAD_MIB) << 20);
    let mem_cg = cgroups
        .iter()
        .find(|c| c.join("memory.max").exists() || c.join("memory.limit_in_bytes").exists())
        .expect("a memory cgroup");
    let set = ["memory.max", "memory.limit_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(mem_cg.join(f)).ok())
        .unwrap();
    assert_eq!(set.trim().parse::<u64>().unwrap(), limit);
    // Secrets on disk: the VM's directory and console log are its uid's alone.
    assert_eq!(mode_and_owner(&dir), (0o700, uid));
    assert_eq!(mode_and_owner(&dir.join("console.log")), (0o600, uid));
    // A second jailed VM has another uid, which cannot read the first one's files.
    detach(&env, "other", &["--boot-args", "probe.mem_mib=8"]);
    let other = runtime(&env, "other")["jail"]["uid"].as_u64().unwrap() as u32;
    assert_ne!(other, uid, "concurrent VMs get distinct uids");
    let cat_as = |as_uid: u32| {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("cat")
            .arg(dir.join("console.log"))
            .uid(as_uid)
            .gid(as_uid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(cat_as(uid), "the VM's own uid reads its console log");
    assert!(!cat_as(other), "another VM's uid cannot");
    env.ok(&["stop", "other"]);
    // A snapshot of it is root's, 0600.
    env.ok(&["snapshot", "create", "jailed", "--tag", "js"]);
    let snap = env.base().join("snapshots/js");
    for f in std::fs::read_dir(&snap).unwrap().flatten() {
        if f.file_name() == "memory" || f.file_name() == "vmstate" {
            assert_eq!(mode_and_owner(&f.path()), (0o600, 0), "{:?}", f.path());
        }
    }
    let peak = ["memory.peak", "memory.max_usage_in_bytes"]
        .iter()
        .find_map(|f| std::fs::read_to_string(mem_cg.join(f)).ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(peak) = peak {
        eprintln!(
            "jailed VMM peak memory {} MiB for a {mem_mib} MiB guest (limit {} MiB)",
            peak >> 20,
            limit >> 20
        );
    }

    env.ok(&["stop", "jailed"]);
    assert!(vmm.wait_gone(Duration::from_secs(5)));
    for c in &cgroups {
        assert!(!c.exists(), "cgroup {c:?} left");
    }
    env.ok(&["snapshots", "rm", "js"]);
    env.assert_clean();

    // --no-jailer: Firecracker as root, no jail in the record.
    env.ok(&[
        "--no-jailer",
        "run",
        "--name",
        "plain",
        "--kernel",
        "probe",
        "--detach",
        "--boot-args",
        "probe.mem_mib=8",
    ]);
    let vm = runtime(&env, "plain");
    assert!(vm["jail"].is_null(), "{vm}");
    let vmm: ProcessRef = serde_json::from_value(vm["vmm"].clone()).unwrap();
    assert_eq!(uid_line(vmm.pid), "Uid:\t0\t0\t0\t0");
    env.ok(&["stop", "plain"]);
    env.assert_clean();
}
