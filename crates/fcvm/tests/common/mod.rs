//! Shared helpers for fcvm's integration tests: a private base dir per test, running the
//! real `fcvm` binary, and finding the real Firecracker.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fcvm::process::ProcessRef;

/// A private FCVM_BASE_DIR that stops every VM it recorded when dropped, so a failing
/// test leaves nothing running.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
}

/// The real Firecracker, or None (after a loud message) when this machine lacks it.
/// Under CI a missing Firecracker is a failure, never a skip.
pub fn firecracker_or_skip(test: &str) -> Option<PathBuf> {
    let env = std::env::var_os("FCVM_FIRECRACKER_BIN").map(PathBuf::from);
    let found = env.filter(|p| p.is_file()).or_else(|| which("firecracker"));
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: Firecracker is required under CI; run `fcvm setup firecracker` and set FCVM_FIRECRACKER_BIN");
        }
        eprintln!("SKIPPED {test}: no Firecracker (set FCVM_FIRECRACKER_BIN); this test needs the real one");
    }
    if !Path::new("/dev/kvm").exists() {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: /dev/kvm is required under CI");
        }
        eprintln!("SKIPPED {test}: no /dev/kvm");
        return None;
    }
    found
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl TestEnv {
    pub fn new() -> TestEnv {
        TestEnv::new_in(Path::new("/tmp"))
    }

    /// A base dir under `parent` (keep it short: Unix socket paths are limited to 107 bytes).
    pub fn new_in(parent: &Path) -> TestEnv {
        std::fs::create_dir_all(parent).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("fcvm-t")
            .tempdir_in(parent)
            .unwrap();
        TestEnv { dir }
    }

    pub fn base(&self) -> &Path {
        self.dir.path()
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fcvm"));
        cmd.env("FCVM_BASE_DIR", self.base()).stdin(Stdio::null());
        // Guests boot 10-50 times slower inside the emulated KVM host, five at once slower
        // still: give the agent more than the 90 s a user's `podman run` waits.
        cmd.env("FCVM_AGENT_TIMEOUT", "400");
        // Container tests boot cold, as they were written: a cache snapshot per run would add
        // seconds each in the emulated host. The image cache's own tests remove this.
        cmd.env("FCVM_NO_SNAPSHOT", "1");
        cmd
    }

    pub fn fcvm(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run fcvm")
    }

    /// Run fcvm and require success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.fcvm(args);
        assert!(
            out.status.success(),
            "fcvm {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `fcvm ls --json` parsed.
    pub fn ls(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["ls", "--json"])).expect("ls --json is JSON")
    }

    pub fn vm_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.base().join("vms")) {
            Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
            Err(_) => vec![],
        }
    }

    pub fn state_files(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.base().join("state")) {
            Ok(rd) => rd
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect(),
            Err(_) => vec![],
        }
    }

    /// Assert that nothing of any VM is left: no record, no runtime dir.
    pub fn assert_clean(&self) {
        assert!(
            self.state_files().is_empty(),
            "state left: {:?}",
            self.state_files()
        );
        assert!(
            self.vm_dirs().is_empty(),
            "runtime dirs left: {:?}",
            self.vm_dirs()
        );
        for sub in ["jail/firecracker", "jail/uids"] {
            let left: Vec<_> = std::fs::read_dir(self.base().join(sub))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "jailer leftovers in {sub}: {left:?}");
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Kill whatever the records name, then let fcvm reap.
        for path in self.state_files() {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            for key in ["vmm", "owner"] {
                if let Ok(p) = serde_json::from_value::<ProcessRef>(v[key].clone()) {
                    if p.pid != std::process::id() {
                        p.terminate(Duration::from_secs(1));
                    }
                }
            }
        }
        let _ = self.fcvm(&["ls"]);
    }
}

/// Where tests keep files that VMs use: the emulated KVM host's scratch disk when there is one
/// (btrfs: reflinks; the host's files are read-only there), else cargo's tmpdir.
pub fn scratch_root() -> PathBuf {
    std::env::var_os("FCVM_TESTHOST_SCRATCH")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
}

/// Poll `f` until it returns Some, or panic after `timeout` with `what`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Tick numbers in probe output, in order.
pub fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("PROBE TICK "))
        .filter_map(|rest| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// Value of `key=` on the first line starting with `prefix`.
pub fn field<'a>(text: &'a str, prefix: &str, key: &str) -> Option<&'a str> {
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with(prefix))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        })
}

/// The console log of the VM recorded under `name`.
pub fn console_of(env: &TestEnv, name: &str) -> PathBuf {
    let vms = env.ls();
    let vm = vms.iter().find(|v| v["name"] == name).expect("vm listed");
    PathBuf::from(vm["console_log"].as_str().unwrap())
}
