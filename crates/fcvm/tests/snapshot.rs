//! Snapshots, the UFFD page server and clones, on the real Firecracker with the probe guest.
//!
//! Every clone's console is checked against `fcvm_probe::model`: same boot id (no new
//! BANNER), ticks continuing from the snapshot's, and every TICK line (generation count and
//! checksum) exactly as the model computes from the source's BANNER. The handshake parser's
//! handling of garbage is covered by fcvm-uffd's `tests/server.rs` (eight bad-handshake
//! cases against a live server).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fcvm::process::ProcessRef;
use fcvm_probe::model::ProbeModel;
use fcvm_probe::output::{Banner, ProbeLine, Tick};

use crate::common::{firecracker_or_skip, wait_until, TestEnv};

const WAIT: Duration = Duration::from_secs(30);
/// Small and slow enough for many concurrent guests on two cores.
const PROBE_ARGS: &str = "probe.mem_mib=8 probe.tick_ms=100 probe.dirty_pages=16";

fn vm(env: &TestEnv, name: &str) -> serde_json::Value {
    env.ls()
        .into_iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} not listed"))
}

fn console(env: &TestEnv, name: &str) -> PathBuf {
    PathBuf::from(vm(env, name)["console_log"].as_str().unwrap())
}

/// Complete probe lines of a console log.
fn lines(path: &Path) -> Vec<ProbeLine> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| ProbeLine::parse(l).ok().flatten())
        .collect()
}

fn banner(path: &Path) -> Option<Banner> {
    lines(path).into_iter().find_map(|l| match l {
        ProbeLine::Banner(b) => Some(b),
        _ => None,
    })
}

fn tick_lines(path: &Path) -> Vec<Tick> {
    lines(path)
        .into_iter()
        .filter_map(|l| match l {
            ProbeLine::Tick(t) => Some(t),
            _ => None,
        })
        .collect()
}

fn wait_ticks(path: &Path, at_least: usize) -> Vec<Tick> {
    wait_until(
        WAIT,
        &format!("{at_least} ticks in {}", path.display()),
        || {
            let t = tick_lines(path);
            (t.len() >= at_least).then_some(t)
        },
    )
}

fn last_tick(path: &Path) -> u64 {
    tick_lines(path).last().map_or(0, |t| t.n)
}

fn boot_source(env: &TestEnv, name: &str, extra: &[&str]) -> Banner {
    let mut args = vec![
        "run",
        "--name",
        name,
        "--kernel",
        "probe",
        "--detach",
        "--boot-args",
        PROBE_ARGS,
    ];
    args.extend_from_slice(extra);
    env.ok(&args);
    let log = console(env, name);
    wait_ticks(&log, 3);
    banner(&log).expect("source printed a banner")
}

/// Create snapshot `tag` of `vm`; returns the source's last tick before and after.
fn snapshot(env: &TestEnv, vm_name: &str, tag: &str, diff: bool) -> (u64, u64) {
    let log = console(env, vm_name);
    let before = last_tick(&log);
    let mut args = vec!["snapshot", "create", vm_name, "--tag", tag];
    if diff {
        args.push("--diff");
    }
    env.ok(&args);
    (before, last_tick(&log))
}

/// A clone continues the snapshot: no new banner, ticks from the snapshot's on, each
/// exactly as the model of the source says.
fn verify_clone(env: &TestEnv, clone: &str, model: &ProbeModel, window: (u64, u64), ticks: usize) {
    let log = console(env, clone);
    let seen = wait_ticks(&log, ticks);
    assert!(
        banner(&log).is_none(),
        "{clone} rebooted instead of restoring"
    );
    let first = seen[0].n;
    assert!(
        first >= window.0 && first <= window.1 + 1,
        "{clone} resumed at tick {first}, snapshot was taken between ticks {} and {}",
        window.0,
        window.1
    );
    for (i, t) in seen.iter().enumerate() {
        assert_eq!(t.n, first + i as u64, "{clone}: ticks not consecutive");
        assert_eq!(
            *t,
            model.expected_tick(t.n),
            "{clone}: tick {} differs from the model",
            t.n
        );
    }
}

fn netns_list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Netns names of this env's records.
fn env_netns(env: &TestEnv) -> Vec<String> {
    env.ls()
        .iter()
        .filter_map(|v| v["network"]["netns"].as_str().map(str::to_owned))
        .collect()
}

fn serve_detached(env: &TestEnv, tag: &str) -> u32 {
    env.ok(&["snapshot", "serve", tag, "--detach"])
        .trim()
        .parse()
        .expect("serve --detach prints the pid")
}

fn clone_detached(env: &TestEnv, name: &str, source: &[&str]) {
    let mut args = vec!["snapshot", "run", "--name", name, "--detach"];
    args.extend_from_slice(source);
    env.ok(&args);
}

fn stop(env: &TestEnv, name: &str) {
    env.ok(&["stop", name, "--timeout", "1"]);
}

fn assert_all_gone(env: &TestEnv, namespaces: &[String]) {
    env.assert_clean();
    let left: Vec<_> = netns_list()
        .into_iter()
        .filter(|n| namespaces.contains(n))
        .collect();
    assert!(left.is_empty(), "network namespaces left: {left:?}");
    let uffd = env.base().join("uffd");
    let socks: Vec<_> = std::fs::read_dir(&uffd)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(socks.is_empty(), "page server files left: {socks:?}");
}

fn snapshot_tags(env: &TestEnv) -> Vec<String> {
    let v: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["snapshots", "ls", "--json"])).unwrap();
    v.iter()
        .map(|s| s["tag"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn full_snapshot_restores_from_file_and_from_page_server() {
    if firecracker_or_skip("full_snapshot_restores").is_none() {
        return;
    }
    let env = TestEnv::new();
    let b = boot_source(&env, "src", &["--network", "tap"]);
    let model = ProbeModel::from_banner(&b);
    let window = snapshot(&env, "src", "full", false);
    // The source keeps running after the snapshot.
    let src_log = console(&env, "src");
    wait_until(WAIT, "source ticks after snapshot", || {
        (last_tick(&src_log) > window.1 + 2).then_some(())
    });

    clone_detached(&env, "cf", &["--snapshot", "full"]);
    let server = serve_detached(&env, "full");
    clone_detached(&env, "cu", &["--pid", &server.to_string()]);
    for c in ["cf", "cu"] {
        verify_clone(&env, c, &model, window, 4);
        let v = vm(&env, c);
        assert_eq!(v["kind"], "clone");
        assert_eq!(v["snapshot"], "full");
        // Its own namespace, with the original's TAP name.
        let ns = v["network"]["netns"].as_str().unwrap();
        assert!(fcvm::network::interface_in_netns(ns, "tap0").unwrap());
    }
    assert_ne!(
        vm(&env, "cf")["network"]["netns"],
        vm(&env, "cu")["network"]["netns"]
    );
    // The page server served cu, and is listed with its counters.
    wait_until(WAIT, "server stats in fcvm ls", || {
        let srv = env.ls().into_iter().find(|v| v["kind"] == "page_server")?;
        (srv["served_live"] == 1 && srv["served_pages"].as_u64()? > 0).then_some(())
    });
    // In use: removal refused.
    let out = env.fcvm(&["snapshots", "rm", "full"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));

    let namespaces = env_netns(&env);
    for n in ["cf", "cu", "src"] {
        stop(&env, n);
    }
    // With its last clone gone, SIGTERM ends the server at once.
    let srv_ref = ProcessRef::of_pid(server).unwrap();
    srv_ref.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(srv_ref.wait_gone(Duration::from_secs(10)));
    env.ok(&["snapshots", "rm", "full"]);
    assert!(snapshot_tags(&env).is_empty());
    assert_all_gone(&env, &namespaces);
}

#[test]
fn diff_snapshots_and_clone_lineage_restore_correctly() {
    if firecracker_or_skip("diff_snapshots").is_none() {
        return;
    }
    let env = TestEnv::new();
    let b = boot_source(&env, "src", &["--track-dirty-pages"]);
    let model = ProbeModel::from_banner(&b);
    // The first Diff of a VM that never snapshotted is merged onto zeros.
    let w0 = snapshot(&env, "src", "d0", true);
    wait_ticks(&console(&env, "src"), w0.1 as usize + 3);
    let w1 = snapshot(&env, "src", "full1", false);
    wait_ticks(&console(&env, "src"), w1.1 as usize + 3);
    let w2 = snapshot(&env, "src", "d2", true);
    let tags: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    let d2 = tags.iter().find(|s| s["tag"] == "d2").unwrap();
    assert_eq!(d2["kind"], "diff");
    assert_eq!(d2["parent"], "full1");
    let dirty = d2["diff_dirty_bytes"].as_u64().unwrap();
    assert!(dirty > 0 && dirty < 32 << 20, "diff of {dirty} bytes");
    assert_eq!(
        tags.iter().find(|s| s["tag"] == "d0").unwrap()["parent"],
        serde_json::Value::Null
    );

    clone_detached(&env, "c0", &["--snapshot", "d0"]);
    clone_detached(&env, "c2", &["--snapshot", "d2", "--track-dirty-pages"]);
    verify_clone(&env, "c0", &model, w0, 3);
    verify_clone(&env, "c2", &model, w2, 3);

    // Lineage: a Diff of the clone is merged onto the snapshot it came from.
    let w3 = snapshot(&env, "c2", "from-clone", true);
    let meta: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["snapshots", "--json"])).unwrap();
    let fc = meta.iter().find(|s| s["tag"] == "from-clone").unwrap();
    assert_eq!(fc["parent"], "d2");
    assert_eq!(fc["source_kind"], "clone");
    let server = serve_detached(&env, "from-clone");
    clone_detached(&env, "gc", &["--pid", &server.to_string()]);
    verify_clone(&env, "gc", &model, w3, 3);

    for n in ["gc", "c2", "c0", "src"] {
        stop(&env, n);
    }
    let srv = ProcessRef::of_pid(server).unwrap();
    srv.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(srv.wait_gone(Duration::from_secs(10)));
    env.ok(&["snapshots", "prune", "--unused"]);
    assert!(snapshot_tags(&env).is_empty());
    assert_all_gone(&env, &[]);
}

#[test]
fn ten_clones_from_one_server_kill_one_then_sigterm_the_server() {
    if firecracker_or_skip("ten_clones").is_none() {
        return;
    }
    let env = TestEnv::new();
    let b = boot_source(&env, "src", &["--network", "tap"]);
    let model = ProbeModel::from_banner(&b);
    let window = snapshot(&env, "src", "s", false);
    stop(&env, "src");
    let server = serve_detached(&env, "s");
    let pid = server.to_string();
    // Ten `fcvm snapshot run` at once.
    let children: Vec<_> = (0..10)
        .map(|i| {
            env.command()
                .args(["snapshot", "run", "--pid", &pid, "--detach", "--name"])
                .arg(format!("c{i}"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for i in 0..10 {
        verify_clone(&env, &format!("c{i}"), &model, window, 2);
    }
    let namespaces = env_netns(&env);
    assert_eq!(namespaces.len(), 10);

    // Kill one clone's Firecracker: the others and the server carry on.
    let victim: ProcessRef = serde_json::from_value(vm(&env, "c0")["vmm"].clone()).unwrap();
    victim.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(victim.wait_gone(Duration::from_secs(5)));
    let srv = ProcessRef::of_pid(server).unwrap();
    assert!(srv.is_alive());
    assert!(
        env.ls().iter().all(|v| v["name"] != "c0"),
        "dead clone reaped"
    );
    wait_until(WAIT, "server notices the dead clone", || {
        let s = env.ls().into_iter().find(|v| v["kind"] == "page_server")?;
        (s["served_live"] == 9).then_some(())
    });

    // SIGTERM: no new clones, but live ones keep being served correctly.
    srv.signal(nix::sys::signal::Signal::SIGTERM);
    let before: Vec<u64> = (1..10)
        .map(|i| last_tick(&console(&env, &format!("c{i}"))))
        .collect();
    // It shows as draining, and a new clone is refused with a message naming it (not a raw
    // Firecracker error about a missing socket).
    let srv_name = wait_until(WAIT, "server shows draining", || {
        let s = env.ls().into_iter().find(|v| v["kind"] == "page_server")?;
        (s["status"] == "draining").then(|| s["name"].as_str().unwrap().to_owned())
    });
    let out = env.fcvm(&[
        "snapshot", "run", "--pid", &pid, "--detach", "--name", "late",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is draining") && err.contains(&srv_name),
        "{err}"
    );
    assert!(!err.to_lowercase().contains("socket"), "{err}");
    assert!(env.ls().iter().all(|v| v["name"] != "late"));
    // `fcvm stop` of it says what happens, not "(guest shut down)".
    let out = env.fcvm(&["stop", &srv_name, "--timeout", "0"]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("stopped accepting clones") && !said.contains("guest shut down"),
        "{said}"
    );
    for (i, b) in (1..10).zip(before) {
        let name = format!("c{i}");
        let log = console(&env, &name);
        wait_until(WAIT, "clones keep ticking after SIGTERM", || {
            (last_tick(&log) >= b + 3).then_some(())
        });
        verify_clone(&env, &name, &model, window, 2);
    }
    assert!(srv.is_alive(), "server must outlive its clones");
    for i in 1..10 {
        stop(&env, &format!("c{i}"));
    }
    assert!(
        srv.wait_gone(Duration::from_secs(10)),
        "server exits once idle"
    );
    env.fcvm(&["ls"]);
    assert_all_gone(&env, &namespaces);
}

#[test]
fn killing_the_server_fails_its_clones_loudly() {
    if firecracker_or_skip("server_killed").is_none() {
        return;
    }
    let env = TestEnv::new();
    let b = boot_source(&env, "src", &[]);
    let model = ProbeModel::from_banner(&b);
    let window = snapshot(&env, "src", "s", false);
    stop(&env, "src");
    let server = serve_detached(&env, "s");
    clone_detached(&env, "bg", &["--pid", &server.to_string()]);
    // And one in the foreground, streaming its console.
    let mut fg = env
        .command()
        .args([
            "snapshot",
            "run",
            "--pid",
            &server.to_string(),
            "--name",
            "fg",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    verify_clone(&env, "bg", &model, window, 2);
    wait_until(WAIT, "fg clone listed", || {
        env.ls()
            .iter()
            .any(|v| v["name"] == "fg" && v["status"] == "running")
            .then_some(())
    });
    verify_clone(&env, "fg", &model, window, 2);
    let vmms: Vec<ProcessRef> = ["bg", "fg"]
        .iter()
        .map(|n| serde_json::from_value(vm(&env, n)["vmm"].clone()).unwrap())
        .collect();

    let srv = ProcessRef::of_pid(server).unwrap();
    srv.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(srv.wait_gone(Duration::from_secs(5)));
    let status = wait_until(WAIT, "foreground clone exits", || fg.try_wait().unwrap());
    assert!(
        !status.success(),
        "a clone without memory must not exit cleanly"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(fg.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("page server"), "{err}");
    // Any fcvm command notices the detached one.
    let listed = env.ls();
    for n in ["bg", "fg"] {
        let v = listed
            .iter()
            .find(|v| v["name"] == n)
            .expect("failed clone kept");
        assert_eq!(v["status"], "failed", "{n}: {v}");
        assert!(v["error"].as_str().unwrap().contains("page server"), "{v}");
    }
    for v in &vmms {
        assert!(
            v.wait_gone(Duration::from_secs(5)),
            "clone VMM still running"
        );
    }
    // A failed clone holds no name: a new VM may take it at once.
    env.ok(&[
        "run",
        "--name",
        "bg",
        "--kernel",
        "probe",
        "--detach",
        "--boot-args",
        PROBE_ARGS,
    ]);
    let listed = env.ls();
    let bg: Vec<_> = listed.iter().filter(|v| v["name"] == "bg").collect();
    assert_eq!(bg.len(), 1, "the failed record was replaced: {listed:?}");
    assert_eq!(bg[0]["status"], "running");
    for n in ["bg", "fg"] {
        stop(&env, n);
    }
    assert_all_gone(&env, &[]);
}

#[test]
fn stopping_an_idle_page_server_says_so() {
    if firecracker_or_skip("stop_page_server").is_none() {
        return;
    }
    let env = TestEnv::new();
    boot_source(&env, "src", &[]);
    snapshot(&env, "src", "s", false);
    stop(&env, "src");
    let server = serve_detached(&env, "s");
    let name = vm_by_pid(&env, server);
    let out = env.fcvm(&["stop", &name]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains(&format!("stopped page server {name}")),
        "{said}"
    );
    assert!(!said.contains("guest shut down"), "{said}");
    assert!(ProcessRef::of_pid(server).is_none_or(|p| p.wait_gone(Duration::from_secs(5))));
    assert_all_gone(&env, &[]);
}

fn vm_by_pid(env: &TestEnv, pid: u32) -> String {
    env.ls()
        .into_iter()
        .find(|v| v["pid"] == pid)
        .and_then(|v| v["name"].as_str().map(str::to_owned))
        .expect("listed by pid")
}

#[test]
fn killed_create_leaves_no_snapshot_and_the_source_running() {
    if firecracker_or_skip("killed_create").is_none() {
        return;
    }
    let env = TestEnv::new();
    boot_source(&env, "src", &["--track-dirty-pages"]);
    let log = console(&env, "src");
    for point in [
        "snapshot:after-pause",
        "snapshot:after-memory",
        "snapshot:before-publish",
    ] {
        let out = env
            .command()
            .env("FCVM_FAULT", point)
            .args(["snapshot", "create", "src", "--tag", "t"])
            .output()
            .unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(9),
            "{point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            snapshot_tags(&env).is_empty(),
            "{point}: partial snapshot listed"
        );
        let hidden: Vec<_> = std::fs::read_dir(env.base().join("snapshots"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name() != ".lock")
            .collect();
        assert!(hidden.is_empty(), "{point}: staging left after ls");
        // The guard resumed the source.
        let t = last_tick(&log);
        wait_until(WAIT, "source ticks again", || {
            (last_tick(&log) >= t + 2).then_some(())
        });
    }
    // No published snapshot matches the VM's dirty log now: a Diff is refused...
    let out = env.fcvm(&["snapshot", "create", "src", "--tag", "t", "--diff"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Full"));
    // ...and a Full works under the same tag.
    env.ok(&["snapshot", "create", "src", "--tag", "t"]);
    assert_eq!(snapshot_tags(&env), vec!["t".to_owned()]);
    stop(&env, "src");
    env.ok(&["snapshots", "rm", "t"]);
    assert_all_gone(&env, &[]);
}

#[test]
fn full_disk_gives_a_clear_error_and_no_partial_snapshot() {
    if firecracker_or_skip("enospc").is_none() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED enospc: needs root to mount a tmpfs");
        return;
    }
    let env = TestEnv::new();
    // 48 MiB of space for a 128 MiB guest: the memory file cannot fit.
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(env.base())
        .status()
        .unwrap();
    assert!(st.success());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        boot_source(&env, "src", &[]);
        let log = console(&env, "src");
        let out = env.fcvm(&["snapshot", "create", "src", "--tag", "big"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.to_lowercase().contains("no space") || err.contains("os error 28"),
            "{err}"
        );
        assert!(snapshot_tags(&env).is_empty());
        let t = last_tick(&log);
        wait_until(WAIT, "source ticks after ENOSPC", || {
            (last_tick(&log) >= t + 2).then_some(())
        });
        stop(&env, "src");
        env.assert_clean();
    }));
    // Stop whatever runs before the state disappears with the mount.
    for v in env.ls() {
        if let Some(n) = v["name"].as_str() {
            let _ = env.fcvm(&["stop", n, "--timeout", "1"]);
        }
    }
    let _ = nix::mount::umount2(env.base(), nix::mount::MntFlags::MNT_DETACH);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn setup_storage_gives_reflinks_and_clones_get_their_own_disk() {
    if firecracker_or_skip("setup_storage").is_none() {
        return;
    }
    let has_mkfs = [
        "/sbin/mkfs.btrfs",
        "/usr/sbin/mkfs.btrfs",
        "/usr/bin/mkfs.btrfs",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    if !nix::unistd::geteuid().is_root() || !has_mkfs {
        eprintln!("SKIPPED setup_storage: needs root and btrfs-progs");
        return;
    }
    let env = TestEnv::new();
    let image = env.base().parent().unwrap().join(format!(
        ".{}.btrfs.img",
        env.base().file_name().unwrap().to_string_lossy()
    ));
    env.ok(&["setup", "storage", "--size", "1G"]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(fcvm::storage::supports_reflink(env.base()).unwrap());
        let disk = env.base().join("disk.img");
        std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
        let b = boot_source(&env, "src", &["--rootfs", disk.to_str().unwrap()]);
        let model = ProbeModel::from_banner(&b);
        let w = snapshot(&env, "src", "withdisk", false);
        stop(&env, "src");
        clone_detached(&env, "c", &["--snapshot", "withdisk"]);
        verify_clone(&env, "c", &model, w, 2);
        let c = vm(&env, "c");
        // The clone's copy sits where the source VM's VMM saw its disk: a jailed source
        // saw its in-place disk as the hard link `in/drive-rootfs` in its chroot.
        let rel = if vm(&env, "c")["jail"].is_object() {
            "in/drive-rootfs"
        } else {
            "disk-rootfs.img"
        };
        let own = PathBuf::from(c["runtime_dir"].as_str().unwrap()).join(rel);
        assert_eq!(std::fs::read(&own).unwrap(), vec![0x5au8; 1 << 20]);
        let cfg = std::process::Command::new("curl")
            .args([
                "-s",
                "--unix-socket",
                c["api_socket"].as_str().unwrap(),
                "http://x/vm/config",
            ])
            .output();
        if let Ok(out) = cfg {
            let text = String::from_utf8_lossy(&out.stdout);
            if !text.is_empty() {
                assert!(text.contains(&format!("/run/fcvm/vm/{rel}")), "{text}");
            }
        }
        stop(&env, "c");
        env.ok(&["snapshots", "rm", "withdisk"]);
        env.assert_clean();
    }));
    for v in env.ls() {
        if let Some(n) = v["name"].as_str() {
            let _ = env.fcvm(&["stop", n, "--timeout", "1"]);
        }
    }
    let _ = nix::mount::umount2(env.base(), nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(&image);
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// What of a bridged VM's network (from its `ls --json` row) still exists on the host.
fn bridged_left(net: &serde_json::Value) -> Vec<String> {
    let mut left = Vec::new();
    let netns = net["netns"].as_str().unwrap();
    if Path::new("/run/netns").join(netns).exists() {
        left.push(format!("netns {netns}"));
    }
    let veth = net["veth_host"].as_str().unwrap();
    let link = Command::new("ip")
        .args(["link", "show", veth])
        .output()
        .unwrap();
    if link.status.success() {
        left.push(format!("link {veth}"));
    }
    let table = net["nft_table"].as_str().unwrap();
    let t = Command::new("nft")
        .args(["list", "table", "ip", table])
        .output()
        .unwrap();
    if t.status.success() {
        left.push(format!("table {table}"));
    }
    left
}

/// `ip -n NETNS ARGS...` (or the host's with None), its stdout.
fn ip_in(netns: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let out = cmd.args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nft list table ip TABLE` inside `netns` (None: the host's).
fn nft_table(netns: Option<&str>, table: &str) -> String {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft"]);
            c
        }
        None => Command::new("nft"),
    };
    let out = cmd.args(["list", "table", "ip", table]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bridged networks on the real Firecracker with the probe guest (which ignores its
/// network: this checks the plumbing, the guest side is `linux_guest::clones`): `fcvm run
/// --network bridged -p`, its clones (`snapshot run --network bridged -p`, the default,
/// `--network none`) keeping the source's TAP name and MAC and guest address, each with its
/// own namespace, veth, slot, host table and 1:1 translation; a port another VM publishes
/// and bad specs refused before anything starts; SIGKILL of a clone's VMM then `ls`, and
/// `stop`, leave nothing.
#[test]
fn bridged_vms_and_their_clones_get_networks_of_their_own() {
    let test = "bridged_vms_and_their_clones";
    if firecracker_or_skip(test).is_none() {
        return;
    }
    if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!("SKIPPED {test}: needs root and nft (Debian package nftables)");
        return;
    }
    let free_port = || {
        std::net::TcpListener::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let env = TestEnv::new();
    let (p0, p1) = (free_port(), free_port());
    let b = boot_source(
        &env,
        "src",
        &["--network", "bridged", "-p", &format!("{p0}:80")],
    );
    let model = ProbeModel::from_banner(&b);
    let src = vm(&env, "src")["network"].clone();
    assert_eq!(src["mode"], "bridged", "{src}");
    let guest = src["guest_addr"].as_str().unwrap().to_owned();
    let tap_mac = src["tap_mac"].as_str().unwrap().to_owned();
    assert!(src["routed_addr"].is_null(), "{src}");
    let src_ns = src["netns"].as_str().unwrap().to_owned();
    assert!(
        ip_in(Some(&src_ns), &["link", "show", "tap0"]).contains(&tap_mac),
        "the TAP's MAC is the record's"
    );
    let table = nft_table(None, src["nft_table"].as_str().unwrap());
    assert!(table.contains(&format!("dnat to {guest}:80")), "{table}");
    assert_eq!(src["publish"][0]["host_port"], p0, "{src}");

    // Refused before anything starts: a port src publishes, a bad spec, ports without a
    // network that carries them.
    let refused = |args: &[&str], want: &str| {
        let o = env.fcvm(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    };
    let p0_spec = format!("{p0}:80");
    let run = ["run", "--name", "x", "--kernel", "probe", "--detach"];
    refused(
        &[&run[..], &["--network", "bridged", "-p", &p0_spec]].concat(),
        &format!("host port {p0}/tcp is already published by VM src"),
    );
    refused(
        &[&run[..], &["--network", "bridged", "-p", "0:80"]].concat(),
        "host port \"0\"",
    );
    refused(
        &[&run[..], &["--network", "tap", "-p", "8080:80"]].concat(),
        "--publish needs --network bridged",
    );
    assert_eq!(env.ls().len(), 1, "only src");

    let window = snapshot(&env, "src", "bt", false);
    let p1_spec = format!("{p1}:80");
    clone_detached(
        &env,
        "c1",
        &["--snapshot", "bt", "--network", "bridged", "-p", &p1_spec],
    );
    clone_detached(&env, "c2", &["--snapshot", "bt"]);
    clone_detached(&env, "c3", &["--snapshot", "bt", "--network", "none"]);
    refused(
        &["snapshot", "run", "--snapshot", "bt", "-d", "-p", &p1_spec],
        &format!("host port {p1}/tcp is already published by VM c1"),
    );
    refused(
        &[
            "snapshot",
            "run",
            "--snapshot",
            "bt",
            "-d",
            "--network",
            "rootless",
        ],
        "--network rootless is not yet supported",
    );
    for c in ["c1", "c2", "c3"] {
        verify_clone(&env, c, &model, window, 3);
    }
    let mut seen = std::collections::HashSet::new();
    for c in ["c1", "c2"] {
        let net = vm(&env, c)["network"].clone();
        assert_eq!(
            (
                &net["mode"],
                &net["guest_addr"],
                &net["tap_mac"],
                &net["gateway"]
            ),
            (
                &src["mode"],
                &src["guest_addr"],
                &src["tap_mac"],
                &src["gateway"]
            ),
            "{c}: {net}"
        );
        let ns = net["netns"].as_str().unwrap();
        let routed = net["routed_addr"].as_str().unwrap().to_owned();
        assert!(seen.insert(routed.clone()) && seen.insert(net["host_addr"].to_string()));
        assert_ne!(net["host_addr"], src["host_addr"]);
        // The TAP the restored guest expects: its name and MAC.
        assert!(
            ip_in(Some(ns), &["link", "show", "tap0"]).contains(&tap_mac),
            "{c}: {}",
            ip_in(Some(ns), &["link", "show", "tap0"])
        );
        let inside = nft_table(Some(ns), "fcvm-clone");
        assert!(
            inside.contains(&format!("ip daddr {routed} dnat to {guest}"))
                && inside.contains(&format!(
                    "ip saddr {guest} oifname \"veth0\" snat to {routed}"
                )),
            "{c}: {inside}"
        );
        let host = nft_table(None, net["nft_table"].as_str().unwrap());
        if c == "c1" {
            assert!(
                host.contains(&format!("dport {p1} dnat to {routed}:80")),
                "{host}"
            );
        } else {
            assert!(!host.contains("dnat to"), "c2 publishes nothing: {host}");
        }
    }
    let c3 = vm(&env, "c3")["network"].clone();
    assert_eq!(c3["mode"], "namespaced_tap", "{c3}");
    let table = env.ok(&["ls"]);
    assert!(table.contains(&format!("{p1}->80/tcp")), "{table}");

    // SIGKILL of c1's VMM (a detached clone's owner): the next command removes its network,
    // and the others' stay.
    let c1 = vm(&env, "c1");
    let pid = c1["vmm"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(WAIT, "c1's VMM to die", || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    env.ok(&["ls"]);
    assert_eq!(
        bridged_left(&c1["network"]),
        Vec::<String>::new(),
        "c1 after SIGKILL + ls"
    );
    let c2 = vm(&env, "c2")["network"].clone();
    assert_eq!(bridged_left(&c2).len(), 3, "c2's network is untouched");
    assert_eq!(bridged_left(&src).len(), 3, "src's network is untouched");

    let namespaces = env_netns(&env);
    for n in ["c2", "c3", "src"] {
        stop(&env, n);
    }
    env.ok(&["snapshots", "rm", "bt"]);
    for net in [&src, &c2] {
        assert_eq!(bridged_left(net), Vec::<String>::new(), "after stop: {net}");
    }
    assert_all_gone(&env, &namespaces);
}
