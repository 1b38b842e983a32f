//! `fcvm podman run` and `fcvm exec` end to end on the real path: the real `fcvm` binary, the
//! real Firecracker, the guest kernel from `fcvm setup kernel`, the real agent (static build) as
//! PID 1, a real Debian rootfs with podman, and a busybox image built from Debian's
//! busybox-static.
//!
//! Needs root, /dev/kvm on a host where Linux guests boot (hardware-assisted KVM: bare metal,
//! or the emulated KVM host of `fcvm-testhost`, which is how `scripts/test.sh` runs this module
//! on our nested-PVM machines), Firecracker (FCVM_FIRECRACKER_BIN), the guest kernel
//! (FCVM_TEST_KERNEL), the rootfs (FCVM_TEST_ROOTFS, or built once) and the agent
//! (FCVM_AGENT_BIN, or built once). Missing facilities skip loudly, and fail under CI.
//!
//! Inside `fcvm-testhost` (FCVM_TESTHOST_SCRATCH set), base dirs and a one-time copy of the
//! rootfs live on the emulated host's btrfs scratch disk, so every VM's disk is a reflink.
//!
//! The tests run one at a time (a lock) so that the global checks after each see only their
//! own VMs; every fcvm they start runs in a cgroup of its own, and after each test that cgroup
//! must hold no process and no child cgroup.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::common::{scratch_root, wait_until, TestEnv};

const IMAGE_REF: &str = "localhost/fcvm-test-busybox:1";
/// Longest any one fcvm command of these tests may take (inside the emulated KVM host a
/// container run takes 30-60 s on a busy 2-core machine).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(400);
/// Longest a container may take to start (a cold boot inside the emulated KVM host takes
/// 40-60 s alone, twice that beside another emulated host on 2 cores).
const READY_TIMEOUT: Duration = Duration::from_secs(300);

struct Assets {
    rootfs: PathBuf,
    agent: PathBuf,
    kernel: PathBuf,
    firecracker: PathBuf,
    archive: PathBuf,
}

static ASSETS: OnceLock<Result<Assets, String>> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

fn skip_or_panic(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why} (required under CI)");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Shared assets, or None after a loud SKIPPED message.
fn assets(test: &str) -> Option<&'static Assets> {
    match ASSETS.get_or_init(build_assets) {
        Ok(a) => Some(a),
        Err(why) => {
            skip_or_panic(test, why);
            None
        }
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// Build with cargo into a separate target dir (the running `cargo test` holds the lock of
/// its own).
fn cargo_build(args: &[&str], rustflags: Option<&str>) -> Result<(), String> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.arg("build")
        .args(args)
        .arg("--target-dir")
        .arg(target_dir().join("agent-static"))
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match rustflags {
        Some(f) => cmd.env("RUSTFLAGS", f),
        None => cmd.env_remove("RUSTFLAGS"),
    };
    let st = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    st.success()
        .then_some(())
        .ok_or_else(|| format!("cargo build {args:?} failed"))
}

/// Whether `fcvm doctor` finds that Linux guests can boot on this host.
fn guests_boot() -> Result<(), String> {
    let out = Command::new(env!("CARGO_BIN_EXE_fcvm"))
        .args(["doctor", "--json"])
        .output()
        .map_err(|e| format!("cannot run fcvm doctor: {e}"))?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("fcvm doctor --json is not JSON: {e}"))?;
    let checks = report["checks"].as_array().cloned().unwrap_or_default();
    let boot = checks
        .iter()
        .find(|c| c["name"] == "guest-boot")
        .ok_or("fcvm doctor has no guest-boot check")?;
    if boot["level"] == "ok" {
        Ok(())
    } else {
        Err(format!(
            "Linux guests cannot boot on this host ({}); run this module inside the emulated KVM host: `fcvm-testhost run -- <test binary> podman::` (scripts/test.sh does)",
            boot["detail"].as_str().unwrap_or("?")
        ))
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn build_assets() -> Result<Assets, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("podman tests need root".into());
    }
    guests_boot()?;
    let firecracker = crate::common::firecracker_or_skip("podman")
        .ok_or("no Firecracker (set FCVM_FIRECRACKER_BIN)")?;
    let kernel = env_path("FCVM_TEST_KERNEL")
        .ok_or("no guest kernel: set FCVM_TEST_KERNEL to the vmlinux `fcvm setup kernel` built")?;
    if !kernel.is_file() {
        return Err(format!(
            "FCVM_TEST_KERNEL {} does not exist",
            kernel.display()
        ));
    }
    let busybox = Path::new(fcvm_testkit::testimage::DEFAULT_BUSYBOX);
    if !busybox.exists() {
        return Err("/bin/busybox missing (apt-get install busybox-static)".into());
    }
    let scratch = scratch_root();
    let agent = match env_path("FCVM_AGENT_BIN") {
        Some(p) => p,
        None => {
            cargo_build(
                &[
                    "--release",
                    "-p",
                    "fc-agent",
                    "--target",
                    "x86_64-unknown-linux-gnu",
                ],
                Some("-C target-feature=+crt-static"),
            )?;
            target_dir().join("agent-static/x86_64-unknown-linux-gnu/release/fc-agent")
        }
    };
    let rootfs = match env_path("FCVM_TEST_ROOTFS") {
        Some(p) => p,
        None => build_rootfs(&scratch.join("podman-rootfs"))?,
    };
    if !rootfs.is_file() {
        return Err(format!("rootfs {} does not exist", rootfs.display()));
    }
    // On the scratch disk, one copy of the rootfs makes every VM's copy a reflink (the
    // original is on the host's filesystem, seen through 9p: no reflinks, no SEEK_DATA).
    let rootfs = if env_path("FCVM_TESTHOST_SCRATCH").is_some() {
        let local = scratch.join("rootfs.ext4");
        if !local.is_file() {
            let t = Instant::now();
            let st = Command::new("cp")
                .arg("--sparse=always")
                .arg(&rootfs)
                .arg(&local)
                .status()
                .map_err(|e| format!("cannot run cp: {e}"))?;
            if !st.success() {
                return Err(format!(
                    "copying {} to the scratch disk failed",
                    rootfs.display()
                ));
            }
            eprintln!("rootfs copied to the scratch disk in {:?}", t.elapsed());
        }
        local
    } else {
        rootfs
    };
    let images = scratch.join("podman-images");
    std::fs::create_dir_all(&images).map_err(|e| e.to_string())?;
    let archive = fcvm_testkit::testimage::build_busybox_archive(
        busybox,
        &images.join("busybox.oci.tar"),
        "fcvm-test-busybox",
        "1",
    )
    .map_err(|e| e.to_string())?;
    Ok(Assets {
        rootfs,
        agent,
        kernel,
        firecracker,
        archive: archive.path,
    })
}

/// `fcvm setup rootfs` into a base dir kept across runs (content-addressed: a no-op later).
fn build_rootfs(base: &Path) -> Result<PathBuf, String> {
    if Command::new("mmdebstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("no FCVM_TEST_ROOTFS and no mmdebstrap to build one (apt-get install mmdebstrap e2fsprogs)".into());
    }
    eprintln!("building the guest rootfs with `fcvm setup rootfs` (once, about a minute)");
    let st = Command::new(env!("CARGO_BIN_EXE_fcvm"))
        .args(["setup", "rootfs"])
        .env("FCVM_BASE_DIR", base)
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err("fcvm setup rootfs failed".into());
    }
    std::fs::read_dir(base.join("rootfs"))
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "ext4"))
        .ok_or_else(|| "fcvm setup rootfs produced no image".into())
}

/// One test's world: a base dir and a cgroup holding every process the test's fcvm commands
/// start.
struct Env {
    env: TestEnv,
    assets: &'static Assets,
    cgroup: Option<PathBuf>,
    _serial: MutexGuard<'static, ()>,
}

/// A cgroup for the test: in the v1 `pids` hierarchy where there is one, else cgroup v2.
fn make_cgroup() -> Option<PathBuf> {
    let root = [
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup",
    ]
    .into_iter()
    .map(Path::new)
    .find(|p| p.join("cgroup.procs").exists())?;
    let dir = root.join(format!("fcvm-ptest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir)
}

impl Env {
    fn new(test: &str) -> Option<Env> {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let assets = assets(test)?;
        let env = TestEnv::new_in(&scratch_root());
        Some(Env {
            env,
            assets,
            cgroup: make_cgroup(),
            _serial: serial,
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.env.command();
        cmd.args(args)
            .env("FCVM_ROOTFS", &self.assets.rootfs)
            .env("FCVM_AGENT_BIN", &self.assets.agent)
            .env("FCVM_FIRECRACKER_BIN", &self.assets.firecracker)
            .env_remove("FCVM_PODMAN_TIMINGS");
        if let Some(cg) = &self.cgroup {
            let procs =
                std::ffi::CString::new(cg.join("cgroup.procs").as_os_str().as_encoded_bytes())
                    .unwrap();
            // SAFETY: runs in the forked child before exec; open/write/close are
            // async-signal-safe and the path was allocated before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    libc::close(fd);
                    if ok {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        cmd
    }

    /// `fcvm podman run --name NAME --image-archive ARCHIVE [--kernel K] [extra...] IMAGE --
    /// cmd...` (the test kernel unless `extra` names one).
    fn run_args(&self, name: &str, extra: &[&str], cmd: &[&str]) -> Vec<String> {
        // --rm: these tests check that nothing is left; kept records have their own test.
        let mut v: Vec<String> = vec![
            "podman".into(),
            "run".into(),
            "--rm".into(),
            "--name".into(),
            name.into(),
        ];
        v.push("--image-archive".into());
        v.push(self.assets.archive.display().to_string());
        if !extra.contains(&"--kernel") {
            v.push("--kernel".into());
            v.push(self.assets.kernel.display().to_string());
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(IMAGE_REF.into());
        if !cmd.is_empty() {
            v.push("--".into());
            v.extend(cmd.iter().map(|s| s.to_string()));
        }
        v
    }

    fn output(&self, args: &[String], stdin: &[u8]) -> Output {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = self
            .command(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run fcvm");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).unwrap();
        drop(input);
        wait_output(child, &format!("fcvm {args:?}"))
    }

    fn run(&self, name: &str, extra: &[&str], cmd: &[&str]) -> Output {
        self.output(&self.run_args(name, extra, cmd), b"")
    }

    /// A run with the image cache on (the other tests turn it off), and more environment.
    fn run_cached(
        &self,
        name: &str,
        extra: &[&str],
        cmd: &[&str],
        vars: &[(&str, &str)],
    ) -> Output {
        let args = self.run_args(name, extra, cmd);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = self.command(&args);
        c.env_remove("FCVM_NO_SNAPSHOT")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = c.spawn().expect("run fcvm");
        wait_output(child, &format!("fcvm {args:?}"))
    }

    /// The image cache's entry directories.
    fn cache_entries(&self) -> Vec<PathBuf> {
        let dir = self.env.base().join("image-cache");
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.retain(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'));
        v
    }

    /// Hidden entries of the image cache other than the per-key lock files (staging dirs of
    /// unfinished entries, leftovers of removals).
    fn cache_leftovers(&self) -> Vec<PathBuf> {
        let dir = self.env.base().join("image-cache");
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.retain(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with('.') && !n.ends_with(".lock")
        });
        v
    }

    /// Starts fcvm in the background with debug logging: its stdout is read line by line with
    /// a bound, its stderr kept (every launch step with its time) for failure messages.
    fn spawn(&self, args: &[String]) -> Spawned {
        self.spawn_with_env(args, &[])
    }

    /// [`Self::spawn`] with extra variables in fcvm's environment.
    fn spawn_with_env(&self, args: &[String], vars: &[(&str, &str)]) -> Spawned {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = self
            .command(&args)
            .envs(vars.iter().copied())
            .env("FCVM_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fcvm");
        Spawned::new(child, format!("fcvm {args:?}"))
    }

    fn exec(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut v = vec!["exec".to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        self.output(&v, stdin)
    }

    /// Wait until `fcvm ls` shows `name` healthy (the agent said `ready`).
    fn wait_healthy(&self, name: &str) -> serde_json::Value {
        wait_until(READY_TIMEOUT, "the container to be ready", || {
            self.env
                .ls()
                .into_iter()
                .find(|v| v["name"] == name && v["health"] == "healthy")
        })
    }

    /// Everything gone: records, runtime dirs, processes, cgroups, loop devices, mounts, TAPs.
    fn assert_nothing_left(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "left behind:\n{}",
                left.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.env.assert_clean();
    }

    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(cg) = &self.cgroup {
            for dir in walk_dirs(cg) {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                if !procs.trim().is_empty() {
                    left.push(format!(
                        "processes in {}: {}",
                        dir.display(),
                        procs.trim().replace('\n', " ")
                    ));
                }
                if &dir != cg {
                    left.push(format!("cgroup {}", dir.display()));
                }
            }
        }
        let base = self.env.base().display().to_string();
        for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                let b = b.trim();
                if b.starts_with(&base) || b.starts_with(fcvm::paths::VMM_VIEW_DIR) {
                    left.push(format!("loop device {:?} backed by {b}", e.file_name()));
                }
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for l in mounts.lines().filter(|l| l.contains(&base)) {
            left.push(format!("mount {l}"));
        }
        if let Ok(rd) = std::fs::read_dir("/run/netns") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("fcvm-") {
                    left.push(format!("network namespace {name}"));
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir("/sys/class/net") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("fcvm") {
                    left.push(format!("network device {name}"));
                }
            }
        }
        if !self.env.state_files().is_empty() || !self.env.vm_dirs().is_empty() {
            left.push(format!(
                "state {:?} dirs {:?}",
                self.env.state_files(),
                self.env.vm_dirs()
            ));
        }
        left
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(cg) = &self.cgroup {
            // Kill stragglers of a failed test, then remove the (now empty) cgroups.
            for dir in walk_dirs(cg) {
                for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
            let mut dirs = walk_dirs(cg);
            dirs.reverse();
            for d in dirs {
                let _ = std::fs::remove_dir(&d);
            }
        }
    }
}

/// A background fcvm whose output threads drain both pipes (a full stderr pipe would block
/// fcvm), so every wait in a test has a bound and a failure shows what fcvm logged.
struct Spawned {
    child: Child,
    what: String,
    lines: std::sync::mpsc::Receiver<String>,
    stdout_done: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Spawned {
    fn new(mut child: Child, what: String) -> Self {
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout piped");
        // Lines go to the test as they come; what the test did not take is returned at the end.
        let stdout_done = std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut rest = String::new();
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return rest,
                    Ok(_) => {
                        if let Err(e) = tx.send(line) {
                            rest.push_str(&e.0);
                        }
                    }
                }
            }
        });
        let mut err = child.stderr.take().expect("stderr piped");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Spawned {
            child,
            what,
            lines,
            stdout_done: Some(stdout_done),
            stderr: Some(stderr),
        }
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    /// The next stdout line, within [`READY_TIMEOUT`]; on timeout fcvm is killed and the test
    /// fails with its log.
    fn line(&mut self) -> String {
        match self.lines.recv_timeout(READY_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                let _ = self.child.kill();
                let (_, _, err) = self.finish();
                panic!(
                    "{}: no stdout line within {READY_TIMEOUT:?}; stderr:\n{err}",
                    self.what
                )
            }
        }
    }

    /// Waits for fcvm to exit (killing it after [`COMMAND_TIMEOUT`], which fails the test) and
    /// returns its status, the stdout not yet taken by [`Spawned::line`], and its stderr.
    fn finish(&mut self) -> (std::process::ExitStatus, String, String) {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let mut timed_out = false;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait for fcvm") {
                break st;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The pipes close when fcvm and whatever inherited them are gone; a child that kept
        // them open would hang the readers, so they get a bound of their own.
        let join = |h: Option<std::thread::JoinHandle<String>>| {
            let h = h.expect("finish is called once");
            let end = Instant::now() + Duration::from_secs(30);
            while !h.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                h.join().unwrap_or_default()
            } else {
                "<pipe still open 30 s after fcvm exited: a child of fcvm kept it>".into()
            }
        };
        let mut out: String = self.lines.try_iter().collect();
        out.push_str(&join(self.stdout_done.take()));
        out.extend(self.lines.try_iter());
        let err = join(self.stderr.take());
        assert!(
            !timed_out,
            "{} did not finish within {COMMAND_TIMEOUT:?} (killed); stderr:\n{err}",
            self.what
        );
        (status, out, err)
    }
}

/// Wait for `child` and collect its output, killing it after [`COMMAND_TIMEOUT`]: a hung run
/// fails the test with what it printed instead of hanging the suite.
fn wait_output(child: Child, what: &str) -> Output {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let timed_out = done_rx.recv_timeout(COMMAND_TIMEOUT).is_err();
        if timed_out {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        timed_out
    });
    let out = child.wait_with_output().unwrap();
    let _ = done_tx.send(());
    assert!(
        !watchdog.join().unwrap(),
        "{what} did not finish within {COMMAND_TIMEOUT:?} (killed); stderr:\n{}",
        text(&out.stderr)
    );
    out
}

/// `dir` and every cgroup below it, parents first.
fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(rd) = std::fs::read_dir(&out[i]) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether a stderr line is fcvm's notice about the image cache (`fcvm: cold (...)`,
/// `fcvm: cache hit ...`, `fcvm: cache created ...`, the warning of a failed restore).
fn is_cache_notice(line: &str) -> bool {
    line.starts_with("fcvm: cold (")
        || line.starts_with("fcvm: cache ")
        || (line.starts_with("fcvm: warning: cache entry ") && line.contains("failed to restore"))
}

/// The container's stderr: fcvm adds only its image cache notice on a successful run.
fn container_stderr(o: &Output) -> String {
    text(&o.stderr)
        .split_inclusive('\n')
        .filter(|l| !is_cache_notice(l))
        .collect()
}

/// fcvm's image cache notices in a run's stderr.
fn cache_notices(o: &Output) -> Vec<String> {
    text(&o.stderr)
        .lines()
        .filter(|l| is_cache_notice(l))
        .map(str::to_owned)
        .collect()
}

#[test]
fn run_separates_streams_forwards_exit_codes_env_and_commands() {
    let Some(env) = Env::new("run_separates_streams") else {
        return;
    };
    let o = env.run(
        "streams",
        &[
            "--env",
            "A=1",
            "--env",
            "B=two,C=x y",
            "-e",
            "PATHLIKE=/a,/b",
        ],
        &[
            "sh",
            "-c",
            "echo out; echo err >&2; echo \"$A|$B|$C|$PATHLIKE\"; exit 7",
        ],
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "out\n1|two|x y|/a,/b\n");
    assert_eq!(container_stderr(&o), "err\n");
    env.assert_nothing_left();

    // --cmd is split like a shell would; the image default (sh) is not used.
    let o = env.run("cmd", &["--cmd", "sh -c 'echo \"via cmd\"; exit 0'"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "via cmd\n");
    env.assert_nothing_left();
}

#[test]
fn interactive_stdin_is_piped_to_the_container() {
    let Some(env) = Env::new("interactive_stdin") else {
        return;
    };
    let args = env.run_args("stdin", &["-i"], &["cat"]);
    let o = env.output(&args, b"hi\nthere\n");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "hi\nthere\n");
    // Without -i the container's stdin is empty.
    let o = env.run("nostdin", &[], &["sh", "-c", "cat; echo end"]);
    assert_eq!(text(&o.stdout), "end\n");
    env.assert_nothing_left();
}

#[test]
fn exec_in_container_and_vm_name_clash_and_137() {
    let Some(env) = Env::new("exec") else { return };
    let mut vm = env.spawn(&env.run_args("ex", &[], &["sh", "-c", "echo started; sleep 300"]));
    let rec = env.wait_healthy("ex");
    assert_eq!(rec["kind"], "container");
    assert_eq!(rec["image"], IMAGE_REF);
    assert_eq!(rec["vmm_kind"], "firecracker");

    let o = env.exec(
        &[
            "--name",
            "ex",
            "--",
            "sh",
            "-c",
            "hostname; echo e >&2; exit 3",
        ],
        b"",
    );
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(
        (text(&o.stdout), text(&o.stderr)),
        ("ex\n".into(), "e\n".into())
    );

    let o = env.exec(
        &[
            "--name",
            "ex",
            "--vm",
            "--",
            "sh",
            "-c",
            ". /etc/os-release; echo $ID; exit 5",
        ],
        b"",
    );
    assert_eq!(
        (text(&o.stdout), o.status.code()),
        ("debian\n".into(), Some(5))
    );

    let o = env.exec(&["--name", "ex", "-i", "--", "wc", "-c"], b"12345");
    assert_eq!((text(&o.stdout).trim(), o.status.code()), ("5", Some(0)));

    let pid = rec["pid"].as_u64().unwrap().to_string();
    let o = env.exec(&["--pid", &pid, "--vm", "--", "/no/such/program"], b"");
    assert_eq!(o.status.code(), Some(127));
    assert!(
        text(&o.stderr).contains("/no/such/program"),
        "{}",
        text(&o.stderr)
    );

    let o = env.exec(&["--name", "ghost", "--", "true"], b"");
    assert_ne!(o.status.code(), Some(0));
    assert!(
        text(&o.stderr).contains("no running VM matches"),
        "{}",
        text(&o.stderr)
    );

    // The name is taken while the VM runs; the refused run leaves nothing of its own.
    let o = env.run("ex", &[], &["true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        text(&o.stderr).contains("a VM named \"ex\" is already running"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(env.env.state_files().len(), 1);

    // Killing the container from the VM ends the run with 137.
    let o = env.exec(
        &[
            "--name",
            "ex",
            "--vm",
            "--",
            "sh",
            "-c",
            "kill -9 $(podman inspect -f '{{.State.Pid}}' fcvm-container)",
        ],
        b"",
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let (st, out, err) = vm.finish();
    assert_eq!(st.code(), Some(137), "{err}");
    assert_eq!(out, "started\n");
    env.assert_nothing_left();
}

#[test]
fn ctrl_c_stops_the_container_and_sigkill_leaves_nothing_after_next_command() {
    let Some(env) = Env::new("ctrl_c") else {
        return;
    };
    let script = "trap 'echo got-term; exit 0' TERM; echo started; while :; do sleep 0.1; done";
    // The grace is generous: in the emulated host the guest's podman alone can take more
    // than podman's default 10 s to pass SIGTERM on and report the exit; the forced stop has
    // its own test (`fcvm stop --timeout`).
    let mut vm = env.spawn(&env.run_args("cc", &["--stop-timeout", "120"], &["sh", "-c", script]));
    assert_eq!(vm.line(), "started\n");
    env.wait_healthy("cc");
    nix::sys::signal::kill(vm.pid(), nix::sys::signal::Signal::SIGINT).unwrap();
    let (st, rest, err) = vm.finish();
    // The container handled the SIGTERM and exited 0 itself: that is the code fcvm forwards
    // (128 + the signal only when the container reports none).
    assert_eq!(st.code(), Some(0), "{err}");
    assert_eq!(
        rest, "got-term\n",
        "the container got SIGTERM and could clean up; stderr:\n{err}"
    );
    env.assert_nothing_left();

    // SIGKILL of fcvm: without the jailer the VMM dies with it; the next fcvm command reaps.
    let mut vm = env.spawn(&env.run_args("kk", &[], &["sleep", "300"]));
    let rec = env.wait_healthy("kk");
    let vmm_pid = rec["vmm"]["pid"].as_u64().expect("VMM pid recorded");
    nix::sys::signal::kill(vm.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
    vm.finish();
    let jailed = rec["jail"].is_object();
    if !jailed {
        wait_until(Duration::from_secs(60), "the VMM to die with fcvm", || {
            (!Path::new(&format!("/proc/{vmm_pid}")).exists()).then_some(())
        });
    }
    // The next command reaps the record; a jailed Firecracker (its uid dropped, so no
    // parent-death signal) is killed by that command.
    let _ = env.env.ls();
    wait_until(
        Duration::from_secs(60),
        "the next fcvm command to end the VMM",
        || (!Path::new(&format!("/proc/{vmm_pid}")).exists()).then_some(()),
    );
    assert!(env.env.state_files().is_empty() && env.env.vm_dirs().is_empty());
    let o = env.run("after", &[], &["true"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    env.assert_nothing_left();
}

/// Several container VMs at once (three: inside the 2-vCPU emulated KVM host five concurrent
/// guests took from 3 to more than 10 minutes).
#[test]
fn vms_at_once() {
    let Some(env) = Env::new("vms_at_once") else {
        return;
    };
    let vms: Vec<(usize, Child)> = (0..3)
        .map(|i| {
            let name = format!("par{i}");
            let env_arg = format!("N={i}");
            let args = env.run_args(
                &name,
                &["--env", &env_arg],
                &["sh", "-c", "sleep 2; echo vm-$N"],
            );
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            // Each run's debug log (every step with its time) shows in a failure message.
            let child = env
                .command(&args)
                .env("FCVM_LOG", "debug")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run fcvm");
            (i, child)
        })
        .collect();
    for (i, vm) in vms {
        let o = wait_output(vm, &format!("par{i}"));
        assert_eq!(o.status.code(), Some(0), "par{i}: {}", text(&o.stderr));
        assert_eq!(text(&o.stdout), format!("vm-{i}\n"));
    }
    env.assert_nothing_left();
}

#[test]
fn bad_input_gives_clear_errors_and_leaves_nothing() {
    let Some(env) = Env::new("bad_input") else {
        return;
    };
    // Unknown image: the agent's error is forwarded, exit 125 like podman.
    let mut args = env.run_args("badimg", &[], &["true"]);
    let pos = args.iter().position(|a| a == IMAGE_REF).unwrap();
    args[pos] = "localhost/no-such-image:9".into();
    let o = env.output(&args, b"");
    assert_eq!(o.status.code(), Some(125), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    // podman's own message (or the agent's) reaches stderr.
    assert!(err.contains("localhost/no-such-image:9"), "{err}");
    assert!(o.stdout.is_empty());

    for (extra, needle) in [
        // (`--env NAME` alone takes the host's value, as podman's does: not an error.)
        (&["--env-file", "/nope/env"][..], "--env-file /nope/env"),
        (&["--env", "=1"][..], "expected NAME=VALUE"),
        (&["--cpu", "0"][..], "--cpu 0 is out of range"),
        (&["--cmd", "echo"][..], "not both"),
        (
            &["--kernel", "/nope/vmlinux"][..],
            "kernel /nope/vmlinux does not exist",
        ),
    ] {
        let o = env.run("bad", extra, &["true"]);
        assert_eq!(
            o.status.code(),
            Some(125),
            "{extra:?}: fcvm's own failures exit 125, as podman's do"
        );
        assert!(
            text(&o.stderr).contains(needle),
            "{extra:?}: {}",
            text(&o.stderr)
        );
    }
    let o = env.output(
        &[
            "podman".into(),
            "run".into(),
            "--name".into(),
            "x".into(),
            "--image-archive".into(),
            "/nope.tar".into(),
        ],
        b"",
    );
    assert!(
        text(&o.stderr).contains("--image-archive /nope.tar"),
        "{}",
        text(&o.stderr)
    );

    // Missing setup names the command to run.
    let kernel = env.assets.kernel.display().to_string();
    let mut cmd = env.command(&["podman", "run", "--name", "x", "--kernel", &kernel, "img"]);
    cmd.env_remove("FCVM_ROOTFS");
    let o = cmd.output().unwrap();
    assert!(
        text(&o.stderr).contains("fcvm setup rootfs"),
        "{}",
        text(&o.stderr)
    );
    // No --kernel and none built in this base dir: the error names the setup step.
    let o = env
        .command(&["podman", "run", "--name", "x", "img"])
        .output()
        .unwrap();
    assert!(
        text(&o.stderr).contains("fcvm setup kernel"),
        "{}",
        text(&o.stderr)
    );
    env.assert_nothing_left();
}

/// tmux driving a real terminal: a full-screen program, arrow keys, resize.
#[test]
fn tty_full_screen_arrows_and_resize() {
    let Some(env) = Env::new("tty") else { return };
    if Command::new("tmux").arg("-V").output().is_err() {
        skip_or_panic("tty", "tmux is not installed (apt-get install tmux)");
        return;
    }
    let session = format!("fcvm-ptest-{}", std::process::id());
    let socket = env.env.base().join("tmux.sock");
    let tmux = |args: &[&str]| -> String {
        let o = Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap();
        text(&o.stdout)
    };
    let exit_file = env.env.base().join("exit");
    let script = env.env.base().join("run.sh");
    let c = env.command(&[]);
    let mut sh = String::from("#!/bin/sh\n");
    for (k, v) in c.get_envs() {
        if let Some(v) = v {
            sh.push_str(&format!(
                "export {}='{}'\n",
                k.to_string_lossy(),
                v.to_string_lossy()
            ));
        }
    }
    let args: Vec<String> = env.run_args("tty", &["-i", "-t"], &["sh"]);
    sh.push_str(&format!(
        "echo 0 > {}/cgroup.procs 2>/dev/null\n{} {}\necho $? > {}\n",
        env.cgroup
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or("/nonexistent".into()),
        env!("CARGO_BIN_EXE_fcvm"),
        args.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" "),
        exit_file.display()
    ));
    std::fs::write(&script, sh).unwrap();
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "100",
        "-y",
        "30",
        &format!("sh {}", script.display()),
    ]);
    tmux(&["set-option", "-t", &session, "status", "off"]);
    let screen = || tmux(&["capture-pane", "-p", "-t", &session]);
    let wait_screen = |what: &str, f: &dyn Fn(&str) -> bool| {
        wait_until(READY_TIMEOUT, what, || {
            let s = screen();
            f(&s).then_some(s)
        })
    };
    // "ROWS COLS" of the tmux pane, as `stty size` prints them.
    let pane_size = || {
        let size = tmux(&[
            "display-message",
            "-p",
            "-t",
            &session,
            "#{pane_height} #{pane_width}",
        ]);
        size.trim().to_owned()
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_screen("a shell prompt", &|s| s.contains("/ #"));
        tmux(&["send-keys", "-t", &session, "stty size", "Enter"]);
        let size = pane_size();
        wait_screen("the initial size", &|s| s.contains(&size));

        // Full-screen editor: type two lines, go up with the arrow key, append there.
        tmux(&["send-keys", "-t", &session, "vi /tmp/f", "Enter"]);
        wait_screen("vi to draw", &|s| {
            s.lines().filter(|l| l.starts_with('~')).count() > 5
        });
        // Pauses between keys: vi tells a lone Escape from an arrow key's escape sequence
        // by timing.
        for keys in [
            &["i", "aaa", "Enter", "bbb"][..],
            &["Escape"],
            &["Up"],
            &["A", "!"],
            &["Escape"],
            &[":wq", "Enter"],
        ] {
            let mut a = vec!["send-keys", "-t", &session];
            a.extend_from_slice(keys);
            tmux(&a);
            std::thread::sleep(Duration::from_millis(400));
        }
        wait_screen("vi to exit", &|s| !s.lines().any(|l| l.starts_with('~')));
        tmux(&["send-keys", "-t", &session, "clear; cat /tmp/f", "Enter"]);
        wait_screen("the edited file", &|s| {
            s.contains("aaa!") && s.contains("bbb")
        });

        // Resize reaches the container's terminal.
        tmux(&["resize-window", "-t", &session, "-x", "120", "-y", "40"]);
        std::thread::sleep(Duration::from_millis(500));
        tmux(&["send-keys", "-t", &session, "clear; stty size", "Enter"]);
        let size = pane_size();
        assert!(size.ends_with(" 120"), "{size}");
        wait_screen("the new size", &|s| s.contains(&size));

        tmux(&["send-keys", "-t", &session, "exit 4", "Enter"]);
        wait_until(Duration::from_secs(180), "fcvm to exit", || {
            std::fs::read_to_string(&exit_file)
                .ok()
                .filter(|s| !s.is_empty())
        })
    }));
    let last = screen();
    tmux(&["kill-server"]);
    match result {
        Ok(code) => assert_eq!(code.trim(), "4", "screen:\n{last}"),
        Err(e) => {
            eprintln!("screen at failure:\n{last}");
            std::panic::resume_unwind(e)
        }
    }
    env.assert_nothing_left();
}

/// What only a real guest has: its own kernel sized by `--cpu`/`--mem`, cgroup v2, MMDS V2
/// answered by Firecracker over the TAP (a token is required) and closed to the guest once the
/// agent has its plan, real AF_VSOCK (exec is host to guest, the output streams guest to host),
/// the host's proxy variables in the container, and a kernel panic ending the run cleanly.
#[test]
fn real_guest_sizing_cgroup_v2_mmds_v2_and_panic() {
    let Some(env) = Env::new("real_guest") else {
        return;
    };
    let mut vm = env.spawn_with_env(
        &env.run_args(
            "rg",
            &["--cpu", "2", "--mem", "768"],
            &["sh", "-c", "echo started; sleep 300"],
        ),
        &[
            ("http_proxy", "http://10.9.9.9:3128"),
            ("NO_PROXY", "localhost,10.0.0.0/8"),
            ("ftp_proxy", "http://not-carried"),
        ],
    );
    env.wait_healthy("rg");
    let vm_sh = |script: &str| {
        let o = env.exec(&["--name", "rg", "--vm", "--", "bash", "-c", script], b"");
        assert_eq!(o.status.code(), Some(0), "{script}: {}", text(&o.stderr));
        text(&o.stdout)
    };
    assert_eq!(vm_sh("nproc").trim(), "2");
    let mem_kib: u64 = vm_sh("awk '/^MemTotal:/ {print $2}' /proc/meminfo")
        .trim()
        .parse()
        .unwrap();
    // The kernel keeps some of the 768 MiB for itself.
    assert!(
        (600 * 1024..=768 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} KiB for --mem 768"
    );
    assert_eq!(vm_sh("stat -fc %T /sys/fs/cgroup").trim(), "cgroup2fs");
    let cg = vm_sh("cat /proc/$(podman inspect -f '{{.State.Pid}}' fcvm-container)/cgroup");
    assert!(cg.starts_with("0::/"), "container cgroup: {cg}");
    // The guest runs fcvm's own kernel, not the host's.
    let guest_release = vm_sh("uname -r");
    assert!(
        guest_release.contains("fcvm"),
        "guest kernel {guest_release}"
    );

    // The host's proxy settings reach the container (through the guest's podman); other
    // variables do not.
    let o = env.exec(&["--name", "rg", "--", "env"], b"");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let container_env = text(&o.stdout);
    assert!(
        container_env.contains("http_proxy=http://10.9.9.9:3128\n")
            && container_env.contains("NO_PROXY=localhost,10.0.0.0/8\n"),
        "container env: {container_env}"
    );
    assert!(
        !container_env.contains("ftp_proxy"),
        "container env: {container_env}"
    );

    // MMDS is closed to the container (it shares the guest's network) and to the guest...
    let o = env.exec(
        &[
            "--name",
            "rg",
            "--",
            "sh",
            "-c",
            "echo | nc -w 3 169.254.169.254 80; echo rc=$?",
        ],
        b"",
    );
    let out = format!("{}{}", text(&o.stdout), text(&o.stderr));
    assert!(
        out.contains("rc=1") && out.contains("ermission denied"),
        "MMDS from the container: {out}"
    );
    // ... and even root in the guest who reopens the route finds no plan there any more: the
    // host emptied MMDS once the agent reported.
    let mmds = vm_sh(
        // Firecracker's MMDS keeps the connection open after answering: read for 2 s, not
        // to EOF.
        r#"ip route replace 169.254.169.254/32 dev eth0
req() { exec 3<>/dev/tcp/169.254.169.254/80; printf "$1" >&3; timeout 2 cat <&3; exec 3<&-; }
t=$(req 'PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n' | tail -n1)
echo "token-len=${#t}"
req 'GET /latest/container-plan HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' | head -n1
req "GET /latest/container-plan HTTP/1.1\r\nHost: x\r\nX-metadata-token: $t\r\nAccept: application/json\r\nConnection: close\r\n\r\n" | head -n1"#,
    );
    let lines: Vec<&str> = mmds.lines().map(str::trim).collect();
    assert!(
        lines.len() == 3 && lines[0] != "token-len=0",
        "MMDS V2 answers: {mmds}"
    );
    assert!(
        lines[1].starts_with("HTTP/1.1 401"),
        "no token: {}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("HTTP/1.1 404"),
        "token, after the agent read its plan: {}",
        lines[2]
    );

    // A guest kernel panic (panic=1 reboots, Firecracker exits): the run fails with the
    // console's last lines in the message, and nothing is left. fcvm's kernel has no magic
    // SysRq, so the panic comes from the OOM killer with panic_on_oom set: `tail` of a file
    // without newlines grows until the guest's memory is gone.
    let o = env.exec(
        &[
            "--name",
            "rg",
            "--vm",
            "--",
            "sh",
            "-c",
            "echo 1 > /proc/sys/vm/panic_on_oom && exec tail /dev/zero",
        ],
        b"",
    );
    assert_ne!(
        o.status.code(),
        Some(0),
        "exec into a panicking guest cannot succeed"
    );
    let (st, _, err) = vm.finish();
    assert_ne!(st.code(), Some(0), "{err}");
    assert!(err.contains("Kernel panic"), "{err}");
    assert!(err.contains("panic_on_oom"), "{err}");
    env.assert_nothing_left();
}

/// A guest whose agent never connects (busybox as `/init`: the kernel boots, nothing speaks
/// fcvm's protocol): fcvm stops the VM after FCVM_AGENT_TIMEOUT, says so with the console's
/// last lines, exits 125 (its own failure), and leaves nothing.
#[test]
fn an_agent_that_never_connects_fails_clearly_and_leaves_nothing() {
    let Some(env) = Env::new("agent_silent") else {
        return;
    };
    let args = env.run_args("silent", &[], &["true"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = env
        .command(&args)
        .env("FCVM_AGENT_BIN", fcvm_testkit::testimage::DEFAULT_BUSYBOX)
        .env("FCVM_AGENT_TIMEOUT", "30")
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(err.contains("did not connect within 30 s"), "{err}");
    assert!(err.contains("FCVM_AGENT_TIMEOUT"), "{err}");
    assert!(o.stdout.is_empty());
    env.assert_nothing_left();
}

/// The image cache on the real path: a miss boots cold and snapshots once the image is
/// loaded; hits restore it and run with their own settings (name, env, command: applied after
/// the restore); a corrupt entry is removed and the run boots cold with a warning; `fcvm
/// snapshots` lists the entry and `prune` removes it. Every run of the snapshot (the miss
/// goes on from it too) reads the host's time with `date` and its own bytes from
/// /dev/urandom: the agent set the clock and reseeded the kernel's CRNG from the host.
#[test]
fn image_cache_miss_then_hits_with_their_own_settings_and_a_corrupt_entry_falls_back() {
    let Some(env) = Env::new("image_cache_miss_then_hits") else {
        return;
    };
    let script = format!("echo \"$G $(hostname)\"; {CLOCK_AND_RANDOM}; exit 3");
    let t = WallWindow::start();
    let miss = env.run_cached("cache-a", &["-e", "G=one"], &["sh", "-c", &script], &[]);
    let t = t.end();
    assert_eq!(miss.status.code(), Some(3), "{}", text(&miss.stderr));
    let miss_random = clock_and_random(&miss, "one cache-a", t);
    let notices = cache_notices(&miss);
    assert!(
        notices.len() == 1 && notices[0].starts_with("fcvm: cache created"),
        "{}",
        text(&miss.stderr)
    );
    assert_eq!(container_stderr(&miss), "");
    assert_eq!(env.cache_entries().len(), 1);
    env.assert_nothing_left();

    // The same run again: restored, same output and exit code. The agent's console lines
    // (FCVM_PODMAN_TIMINGS prints them) say it applied the host's clock and entropy.
    let t = WallWindow::start();
    let hit = env.run_cached(
        "cache-a",
        &["-e", "G=one"],
        &["sh", "-c", &script],
        &[("FCVM_PODMAN_TIMINGS", "1")],
    );
    let t = t.end();
    assert_eq!(hit.status.code(), Some(3), "{}", text(&hit.stderr));
    let hit_random = clock_and_random(&hit, "one cache-a", t);
    let notices = cache_notices(&hit);
    assert!(
        notices.len() == 1 && notices[0].starts_with("fcvm: cache hit"),
        "{}",
        text(&hit.stderr)
    );
    let agent = text(&hit.stderr);
    assert!(
        agent.contains("fc-agent [") && agent.contains("clock set from the host"),
        "{agent}"
    );
    assert!(
        agent.contains("bytes of host entropy added to the kernel's pool and the CRNG reseeded"),
        "{agent}"
    );
    env.assert_nothing_left();

    // Another name, environment and command hit the same entry and get their own settings.
    let t = WallWindow::start();
    let other = env.run_cached(
        "cache-b",
        &["-e", "G=two"],
        &[
            "sh",
            "-c",
            &format!("echo \"$G $(hostname)\"; echo err >&2; {CLOCK_AND_RANDOM}; exit 5"),
        ],
        &[],
    );
    let t = t.end();
    assert_eq!(other.status.code(), Some(5), "{}", text(&other.stderr));
    let other_random = clock_and_random(&other, "two cache-b", t);
    // Three runs of one snapshot's RNG state: without the reseed the kernel would hand
    // them the same bytes.
    assert!(
        miss_random != hit_random && hit_random != other_random && miss_random != other_random,
        "/dev/urandom read the same in two runs of one snapshot: miss {miss_random}, hit \
         {hit_random}, other hit {other_random}"
    );
    assert_eq!(container_stderr(&other), "err\n");
    assert!(
        cache_notices(&other)[0].starts_with("fcvm: cache hit"),
        "{}",
        text(&other.stderr)
    );
    assert_eq!(env.cache_entries().len(), 1);
    let listed = text(&env.command(&["snapshots"]).output().unwrap().stdout);
    let key = env.cache_entries()[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        listed.contains(&key) && listed.contains(IMAGE_REF),
        "{listed}"
    );
    let rows: Vec<serde_json::Value> = serde_json::from_slice(
        &env.command(&["snapshots", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .expect("snapshots --json is JSON");
    let cached: Vec<_> = rows.iter().filter(|r| r["kind"] == "image-cache").collect();
    assert!(
        cached.len() == 1
            && cached[0]["key"] == key.as_str()
            && cached[0]["image"] == IMAGE_REF
            && cached[0]["allocated_bytes"].as_u64() > Some(0),
        "snapshots --json: {rows:?}"
    );
    env.assert_nothing_left();

    // A corrupt entry: the restore fails, the entry is removed, the run boots cold (and
    // makes a new entry).
    let vmstate = env.cache_entries()[0].join("vmstate.bin");
    std::fs::write(&vmstate, b"not a vmstate").unwrap();
    let t = WallWindow::start();
    let fallback = env.run_cached("cache-c", &["-e", "G=three"], &["sh", "-c", &script], &[]);
    let t = t.end();
    assert_eq!(
        fallback.status.code(),
        Some(3),
        "{}",
        text(&fallback.stderr)
    );
    clock_and_random(&fallback, "three cache-c", t);
    let notices = cache_notices(&fallback);
    assert!(
        notices.len() == 2
            && notices[0].contains("failed to restore")
            && notices[1].starts_with("fcvm: cache created"),
        "{}",
        text(&fallback.stderr)
    );
    assert_ne!(std::fs::read(&vmstate).unwrap(), b"not a vmstate");
    env.assert_nothing_left();

    let pruned = env.command(&["snapshots", "prune"]).output().unwrap();
    assert!(pruned.status.success(), "{}", text(&pruned.stderr));
    assert!(
        text(&pruned.stderr).contains("removed 1 image cache entry"),
        "{}",
        text(&pruned.stderr)
    );
    assert!(env.cache_entries().is_empty());
    assert!(
        env.cache_leftovers().is_empty(),
        "{:?}",
        env.cache_leftovers()
    );
}

/// Shell that prints the guest's `date +%s`, then 16 bytes of /dev/urandom in hex.
const CLOCK_AND_RANDOM: &str = "date +%s; od -An -tx1 -N16 /dev/urandom";

/// The host's wall clock (whole seconds) around a run.
#[derive(Clone, Copy)]
struct WallWindow {
    from: u64,
    to: u64,
}

impl WallWindow {
    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn start() -> Self {
        let now = Self::now();
        Self { from: now, to: now }
    }

    fn end(self) -> Self {
        Self {
            to: Self::now(),
            ..self
        }
    }
}

/// Checks a run of `echo LINE; CLOCK_AND_RANDOM` and returns its random bytes (hex). The
/// guest's `date` must fall inside the host's window around the run (with 2 s of slack for
/// the whole seconds): a restored guest whose clock was not reset shows the snapshot's time,
/// from before the run began.
fn clock_and_random(o: &Output, first: &str, t: WallWindow) -> String {
    let out = text(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.len() == 3 && lines[0] == first,
        "expected {first:?}, a date and random bytes: {out:?}\n{}",
        text(&o.stderr)
    );
    let date: u64 = lines[1]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("date +%s printed {:?}", lines[1]));
    let random: String = lines[2].split_whitespace().collect();
    eprintln!(
        "{first}: guest date {date}, host window {}..={}, urandom {random}",
        t.from, t.to
    );
    assert!(
        date + 2 >= t.from && date <= t.to + 2,
        "{first}: the guest's clock read {date}, the run took place from {} to {} (host \
         time): {} s off",
        t.from,
        t.to,
        if date < t.from {
            t.from - date
        } else {
            date.saturating_sub(t.to)
        }
    );
    assert!(
        random.len() == 32 && random.bytes().all(|b| b.is_ascii_hexdigit()),
        "od printed {:?}",
        lines[2]
    );
    random
}

/// `--no-snapshot` boots cold and makes no entry; fcvm SIGKILLed while the cache snapshot
/// is written leaves no entry (and the VM goes with it); the next run creates the entry.
#[test]
fn image_cache_no_snapshot_is_cold_and_a_killed_snapshot_leaves_no_entry() {
    let Some(env) = Env::new("image_cache_no_snapshot") else {
        return;
    };
    let cold = env.run_cached(
        "nocache",
        &["--no-snapshot"],
        &["sh", "-c", "echo cold; exit 4"],
        &[],
    );
    assert_eq!(cold.status.code(), Some(4), "{}", text(&cold.stderr));
    assert_eq!(text(&cold.stdout), "cold\n");
    assert_eq!(cache_notices(&cold), ["fcvm: cold (--no-snapshot)"]);
    assert!(env.cache_entries().is_empty());
    env.assert_nothing_left();

    let killed = env.run_cached(
        "killed",
        &[],
        &["sh", "-c", "echo never"],
        &[("FCVM_FAULT", "snapshot:after-memory")],
    );
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed.status),
        Some(libc::SIGKILL),
        "{}",
        text(&killed.stderr)
    );
    assert_eq!(text(&killed.stdout), "");
    // The next fcvm command reaps the dead run's VM; no entry was published.
    let listed = env.command(&["snapshots"]).output().unwrap();
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let _ = env.command(&["ls"]).output().unwrap();
    assert!(env.cache_entries().is_empty(), "{:?}", env.cache_entries());
    assert!(
        env.cache_leftovers().is_empty(),
        "{:?}",
        env.cache_leftovers()
    );
    env.assert_nothing_left();
}

/// A small tmpfs mounted over a directory for the length of a test (unmounted on drop, also
/// when the test fails), so what fcvm writes there runs out of space.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount a tmpfs on {}: {st}", dir.display());
        SmallFs {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// ENOSPC while the cache snapshot is written: `image-cache/` is a 4 MiB tmpfs (the VM's
/// memory alone is 512 MiB), on another filesystem than the VM's runtime dir, as a cache on
/// a disk of its own is; with the jailer and without. Each run warns that there was no space, leaves no entry and no staging
/// dir, and its container still runs to completion with its output and exit code. With space
/// again, the next run is a miss that creates the entry.
#[test]
fn image_cache_out_of_space_leaves_no_entry_and_the_container_still_runs() {
    let Some(env) = Env::new("image_cache_out_of_space") else {
        return;
    };
    let small = SmallFs::mount(&env.env.base().join("image-cache"), "4m");
    // Jailed (the default as root), fcvm's copy into the store runs out of space; unjailed,
    // Firecracker's own write of the memory file does.
    for (name, vars) in [
        ("nospace", &[][..]),
        ("nospace-direct", &[("FCVM_NO_JAILER", "1")][..]),
    ] {
        let full = env.run_cached(
            name,
            &["-e", "G=full"],
            &["sh", "-c", "echo ran $G; echo err >&2; exit 3"],
            vars,
        );
        let err = text(&full.stderr);
        assert_eq!(full.status.code(), Some(3), "{name}: {err}");
        assert_eq!(text(&full.stdout), "ran full\n", "{name}: {err}");
        assert!(
            err.lines().any(|l| l
                .starts_with("fcvm: warning: the cache snapshot failed (no space left for it in")
                && l.contains("No space left on device")
                && l.ends_with("the container runs without it")),
            "{name}: {err}"
        );
        assert!(!err.contains("fcvm: cache created"), "{name}: {err}");
        assert!(err.lines().any(|l| l == "err"), "{name}: {err}");
        // Nothing listed, nothing half-made left in the store.
        let listed = env.command(&["snapshots", "--json"]).output().unwrap();
        assert!(listed.status.success(), "{}", text(&listed.stderr));
        let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
        assert_eq!(rows, serde_json::json!([]), "{name}: {rows}");
        assert!(env.cache_entries().is_empty(), "{:?}", env.cache_entries());
        assert!(
            env.cache_leftovers().is_empty(),
            "{name}: {:?}",
            env.cache_leftovers()
        );
    }
    // The VM is gone with its runtime dir (where a jailed VMM writes the memory file first).
    drop(small);
    env.assert_nothing_left();

    // Space again: a miss that boots cold and creates the entry.
    let next = env.run_cached(
        "withspace",
        &["-e", "G=next"],
        &["sh", "-c", "echo ran $G; exit 3"],
        &[],
    );
    let err = text(&next.stderr);
    assert_eq!(next.status.code(), Some(3), "{err}");
    assert_eq!(text(&next.stdout), "ran next\n", "{err}");
    let notices = cache_notices(&next);
    assert!(
        notices.len() == 1 && notices[0].starts_with("fcvm: cache created"),
        "{notices:?}\n{err}"
    );
    assert!(!err.contains("cache snapshot failed"), "{err}");
    assert_eq!(env.cache_entries().len(), 1);
    env.assert_nothing_left();
}

/// An httpd that writes a start stamp into the directory it serves, then serves it: the time
/// and 8 random bytes (busybox's `date` has no `%N`; two starts within a second still differ).
/// sh stays PID 1 of the container with a TERM trap, so a stop ends it at once with code 0.
const STAMP_SERVER: &str = "mkdir -p /tmp/www; \
     echo $(date +%s).$(od -An -tx1 -N8 /dev/urandom | tr -d ' ') > /tmp/www/stamp; \
     echo serving; trap 'exit 0' TERM; httpd -f -p 8080 -h /tmp/www & wait";

/// A stop of a stamp server by SIGINT to fcvm: the container's TERM trap exits 0, unless the
/// guest's podman took longer than the 10 s grace to pass the signal on (the emulated host is
/// that slow at times) and the container was killed (137) or the VM stopped by force (130).
/// Never fcvm's own failure; signal handling has its own tests.
fn assert_stopped(st: std::process::ExitStatus, err: &str) {
    assert!(matches!(st.code(), Some(0 | 130 | 137)), "{st:?}: {err}");
}

impl Env {
    /// [`Self::spawn`] with the image cache on.
    fn spawn_cached(&self, args: &[String]) -> Spawned {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = self
            .command(&args)
            .env_remove("FCVM_NO_SNAPSHOT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fcvm");
        Spawned::new(child, format!("fcvm {args:?}"))
    }

    /// Wait until `fcvm ls` shows `name` with `health`.
    fn wait_health(&self, name: &str, health: &str) -> serde_json::Value {
        wait_until(READY_TIMEOUT, &format!("{name} to be {health}"), || {
            self.env
                .ls()
                .into_iter()
                .find(|v| v["name"] == name && v["health"] == health)
        })
    }

    /// The stamp the container's httpd serves, fetched from inside the container.
    /// Has the container of VM `name` print `word` on its stdout (its PID 1's), through exec.
    fn print_from_the_container(&self, name: &str, word: &str) {
        let script = format!("echo {word} > /proc/1/fd/1");
        let o = self.exec(&["--name", name, "--", "sh", "-c", &script], b"");
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }

    fn stamp(&self, name: &str) -> String {
        let o = self.exec(
            &[
                "--name",
                name,
                "--",
                "wget",
                "-qO-",
                "http://127.0.0.1:8080/stamp",
            ],
            b"",
        );
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        let stamp = text(&o.stdout).trim().to_owned();
        let (secs, random) = stamp.split_once('.').unwrap_or_default();
        assert!(
            secs.len() >= 10
                && secs.bytes().all(|b| b.is_ascii_digit())
                && random.len() == 16
                && random.bytes().all(|b| b.is_ascii_hexdigit()),
            "not a start stamp: {stamp:?}"
        );
        stamp
    }
}

/// `--health-check` on the real path, with the image cache: the first run boots cold, makes
/// the image's entry, is `starting` until its httpd answers, then `healthy`, and at that first
/// pass snapshots the warm application (the startup tier, a Diff merged onto the entry; its
/// output goes on reaching fcvm after the snapshot reset its channels). The
/// second run with the same settings restores it: the httpd is already serving the first
/// run's stamp (it never started again), and output the container writes after the restore
/// still reaches fcvm's stdout (the agent redialled its output channel). A check that never
/// passes makes the container `unhealthy` and takes no startup tier; a SIGKILL of fcvm while
/// a startup tier is made publishes nothing.
#[test]
fn health_check_drives_ls_and_the_startup_tier_restores_the_warm_application() {
    let Some(env) = Env::new("health_check_startup_tier") else {
        return;
    };
    let check = |port: u16| {
        vec![
            "--health-check".to_owned(),
            format!("http://127.0.0.1:{port}/stamp"),
            "--health-interval".to_owned(),
            "1s".to_owned(),
            "--health-retries".to_owned(),
            "2".to_owned(),
        ]
    };
    let args = |name: &str, port: u16| {
        let extra = check(port);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        env.run_args(name, &extra, &["sh", "-c", STAMP_SERVER])
    };

    // 1: a miss. Healthy once httpd answers; the startup tier is the second entry.
    let mut miss = env.spawn_cached(&args("hc-a", 8080));
    assert_eq!(miss.line(), "serving\n");
    let rec = env.wait_health("hc-a", "healthy");
    assert_eq!(rec["kind"], "container");
    wait_until(READY_TIMEOUT, "the startup tier", || {
        (env.cache_entries().len() == 2).then_some(())
    });
    let stamp = env.stamp("hc-a");
    // The snapshot reset the original VM's channels too: its output still reaches fcvm.
    env.print_from_the_container("hc-a", "after-snapshot");
    assert_eq!(miss.line(), "after-snapshot\n");
    nix::sys::signal::kill(miss.pid(), nix::sys::signal::Signal::SIGINT).unwrap();
    let (st, _, err) = miss.finish();
    assert_stopped(st, &err);
    assert!(err.contains("fcvm: cache created (entry"), "{err}");
    assert!(
        err.contains("fcvm: cache created (startup): entry")
            && err.contains("diff merged onto the image's entry"),
        "{err}"
    );
    let inspect = text(&env.command(&["ls", "--json"]).output().unwrap().stdout);
    assert!(!inspect.contains("hc-a"), "{inspect}");
    env.assert_nothing_left();

    // 2: the same settings restore the warm application: the same stamp, no restart.
    let mut hit = env.spawn_cached(&args("hc-b", 8080));
    env.wait_health("hc-b", "healthy");
    assert_eq!(env.stamp("hc-b"), stamp, "the restored httpd started again");
    let inspect = env.command(&["inspect", "hc-b"]).output().unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(rows[0]["health"], "healthy", "{rows}");
    // The container's stdout after the restore reaches this run's stdout.
    env.print_from_the_container("hc-b", "after-restore");
    assert_eq!(hit.line(), "after-restore\n");
    nix::sys::signal::kill(hit.pid(), nix::sys::signal::Signal::SIGINT).unwrap();
    let (st, _, err) = hit.finish();
    assert_stopped(st, &err);
    assert!(err.contains("fcvm: cache hit (startup): entry"), "{err}");
    assert!(!err.contains("cache created"), "{err}");
    env.assert_nothing_left();

    // 3: a check of a port nobody serves: unhealthy, and no startup tier for it.
    let mut bad = env.spawn_cached(&args("hc-c", 8081));
    assert_eq!(bad.line(), "serving\n");
    env.wait_health("hc-c", "unhealthy");
    nix::sys::signal::kill(bad.pid(), nix::sys::signal::Signal::SIGINT).unwrap();
    let (st, _, err) = bad.finish();
    assert_stopped(st, &err);
    assert!(err.contains("fcvm: cache hit (entry"), "{err}");
    assert!(!err.contains("(startup)"), "{err}");
    assert_eq!(env.cache_entries().len(), 2);
    env.assert_nothing_left();

    // 4: other settings hit the image's entry and take their startup tier (Full, from the
    // restored VM); fcvm SIGKILLed just before it is published leaves no entry, and the next
    // commands clean up after it.
    let extra = check(8080);
    let mut extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    extra.extend(["-e", "STAGE=4"]);
    let killed = env.run_cached(
        "hc-d",
        &extra,
        &["sh", "-c", STAMP_SERVER],
        &[("FCVM_FAULT", "snapshot:before-publish")],
    );
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed.status),
        Some(libc::SIGKILL),
        "{}",
        text(&killed.stderr)
    );
    assert_eq!(text(&killed.stdout), "serving\n");
    let listed = env.command(&["snapshots"]).output().unwrap();
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let _ = env.command(&["ls"]).output().unwrap();
    assert_eq!(env.cache_entries().len(), 2, "{:?}", env.cache_entries());
    assert!(
        env.cache_leftovers().is_empty(),
        "{:?}",
        env.cache_leftovers()
    );
    env.assert_nothing_left();
}
