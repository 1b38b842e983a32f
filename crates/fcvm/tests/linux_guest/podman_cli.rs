//! The issue-8 defects that need a booted Linux guest: `podman run -t` without `-i`, a
//! forced `fcvm stop`, SIGHUP; and the issue-12 run flags as the container sees them. They cannot run on a host whose KVM boots no Linux guest
//! (nested PVM), so they SKIP loudly there and fail under CI. Run them where guests boot
//! (a real KVM host, or the emulated one), with:
//!
//! - `FCVM_FIRECRACKER_BIN`: Firecracker;
//! - `FCVM_TEST_KERNEL`: a guest kernel (`fcvm setup kernel`);
//! - `FCVM_TEST_ROOTFS`: a guest rootfs (`fcvm setup rootfs`);
//! - `FCVM_TEST_IMAGE_ARCHIVE`: an OCI archive of a busybox image, and
//!   `FCVM_TEST_IMAGE_REF` its reference; by default one is built from /bin/busybox with
//!   `fcvm_testkit::testimage`, as the `podman` module does;
//! - `FCVM_AGENT_BIN` when the static agent is not where `fcvm setup agent` finds it.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{firecracker_or_skip, scratch_root, wait_until, TestEnv};

/// A cold container start inside the emulated KVM host takes 40-60 s alone, twice that beside
/// another emulated host on 2 cores.
const READY: Duration = Duration::from_secs(300);

pub(super) struct Guest {
    kernel: PathBuf,
    rootfs: PathBuf,
    archive: PathBuf,
    image: String,
}

/// A facility `test` needs is missing: a loud SKIPPED on a developer's machine, a failure
/// under CI.
fn skip_or_fail(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why} (required under CI)");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// What a Linux guest needs, or None after a loud SKIPPED (a failure under CI).
pub(super) fn guest_or_skip(test: &str) -> Option<Guest> {
    firecracker_or_skip(test)?;
    let skip = |why: String| skip_or_fail(test, &why);
    let env = TestEnv::new_in(&scratch_root());
    if !fcvm::doctor::check(&fcvm::paths::Paths::new(env.base())).guest_kernels_boot {
        skip("this host's KVM cannot boot a Linux guest (see `fcvm doctor`)".into());
        return None;
    }
    let var = |k: &str| {
        std::env::var_os(k)
            .map(PathBuf::from)
            .filter(|p| p.is_file())
    };
    let (Some(kernel), Some(rootfs)) = (var("FCVM_TEST_KERNEL"), var("FCVM_TEST_ROOTFS")) else {
        skip(
            "set FCVM_TEST_KERNEL and FCVM_TEST_ROOTFS (`fcvm setup kernel`, `fcvm setup rootfs`)"
                .into(),
        );
        return None;
    };
    let (archive, image) = match var("FCVM_TEST_IMAGE_ARCHIVE") {
        Some(a) => (
            a,
            std::env::var("FCVM_TEST_IMAGE_REF")
                .unwrap_or_else(|_| "localhost/fcvm-test-busybox:1".into()),
        ),
        None => {
            let busybox = std::path::Path::new(fcvm_testkit::testimage::DEFAULT_BUSYBOX);
            let out = scratch_root().join("podman-cli-busybox.oci.tar");
            if let Err(e) = fcvm_testkit::testimage::build_busybox_archive(
                busybox,
                &out,
                "fcvm-test-busybox",
                "1",
            ) {
                skip(format!("cannot build the busybox image: {e}"));
                return None;
            }
            (out, "localhost/fcvm-test-busybox:1".to_owned())
        }
    };
    Some(Guest {
        kernel,
        rootfs,
        archive,
        image,
    })
}

/// A static binary the busybox image lacks, for [`Guest::with_tools`]: found at `$env`, or
/// at `default` under the workspace (where `scripts/lib.sh`'s `build_test_tools` puts it).
pub(super) struct Tool {
    /// Its name in the image's `/bin`.
    pub name: &'static str,
    pub env: &'static str,
    /// Relative to the workspace root.
    pub default: &'static str,
}

/// The test tool binary (`crates/fcvm-testkit/src/bin/fcvm-test-tool.rs`).
pub(super) const TEST_TOOL: Tool = Tool {
    name: "fcvm-test-tool",
    env: "FCVM_TEST_TOOL",
    default: "target/x86_64-unknown-linux-gnu/release/fcvm-test-tool",
};

impl Guest {
    /// This guest with a second image: the busybox one plus `tools` in `/bin`, or None after
    /// a loud SKIPPED (a failure under CI) when a tool is not built.
    pub(super) fn with_tools(self, test: &str, tools: &[Tool]) -> Option<Guest> {
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut extras = Vec::new();
        for t in tools {
            let path = std::env::var_os(t.env)
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join(t.default));
            if !path.is_file() {
                let why = format!(
                    "{} is not built at {} (set {} or run scripts/lib.sh's build_test_tools)",
                    t.name,
                    path.display(),
                    t.env
                );
                skip_or_fail(test, &why);
                return None;
            }
            extras.push(fcvm_testkit::testimage::ExtraBinary {
                name: t.name.into(),
                source: path,
            });
        }
        let out = scratch_root().join(format!("{test}-tools.oci.tar"));
        let archive = fcvm_testkit::testimage::build_busybox_archive_with(
            std::path::Path::new(fcvm_testkit::testimage::DEFAULT_BUSYBOX),
            &extras,
            &out,
            "fcvm-test-tools",
            "1",
        )
        .unwrap_or_else(|e| panic!("{test}: cannot build the image with tools: {e}"));
        Some(Guest {
            archive: archive.path,
            image: archive.reference,
            ..self
        })
    }

    pub(super) fn run(&self, env: &TestEnv, name: &str, flags: &[&str], script: &str) -> Command {
        // --rm: these tests check that nothing is left; kept records have their own tests.
        let mut with_rm = vec!["--rm"];
        with_rm.extend_from_slice(flags);
        self.run_kept(env, name, &with_rm, script)
    }

    /// [`Guest::run`] without `--rm`: the record and logs stay after the container exits.
    pub(super) fn run_kept(
        &self,
        env: &TestEnv,
        name: &str,
        flags: &[&str],
        script: &str,
    ) -> Command {
        let mut cmd = env.command();
        cmd.args(["podman", "run", "--name", name])
            .args(flags)
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--rootfs")
            .arg(&self.rootfs)
            .arg("--image-archive")
            .arg(&self.archive)
            .arg(&self.image)
            .args(["--", "sh", "-c", script]);
        cmd
    }

    /// `fcvm podman run FLAGS --kernel K --rootfs R IMAGE ARGS...`: no archive, so the
    /// guest pulls IMAGE from its registry.
    pub(super) fn run_pulled(
        &self,
        env: &TestEnv,
        flags: &[&str],
        image: &str,
        args: &[&str],
    ) -> Command {
        let mut cmd = env.command();
        cmd.args(["podman", "run"])
            .args(flags)
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--rootfs")
            .arg(&self.rootfs)
            .arg(image)
            .args(args);
        cmd
    }

    /// `fcvm podman run FLAGS --kernel K --rootfs R --image-archive A IMAGE ARGS...`, with no
    /// `--name` unless `flags` has one and no `--` unless `args` has one.
    fn run_bare(&self, env: &TestEnv, flags: &[&str], args: &[&str]) -> Command {
        let mut cmd = env.command();
        cmd.args(["podman", "run", "--rm"])
            .args(flags)
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--rootfs")
            .arg(&self.rootfs)
            .arg("--image-archive")
            .arg(&self.archive)
            .arg(&self.image)
            .args(args);
        cmd
    }
}

/// Run `cmd` to its end (bounded by [`READY`]: a whole cold run, boot to exit) and return
/// (exit code, stdout, stderr). Both pipes are drained while it runs, so a chatty fcvm never
/// blocks on a full pipe; the reads are bounded too.
pub(super) fn run_to_end(cmd: Command, what: &str) -> (Option<i32>, String, String) {
    run_to_end_within(cmd, what, READY)
}

/// [`run_to_end`] with a time limit of its own.
pub(super) fn run_to_end_within(
    mut cmd: Command,
    what: &str,
    limit: Duration,
) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            let _ = tx.send(text);
        });
        rx
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = wait_until(limit, what, || child.try_wait().unwrap());
    let read = |rx: std::sync::mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("an output pipe stayed open 30 s after fcvm exited")
    };
    (status.code(), read(out), read(err))
}

/// The `key=value` lines of a container's output.
pub(super) fn report(out: &str) -> std::collections::BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

pub(super) fn wait_healthy(env: &TestEnv, name: &str) {
    wait_until(READY, "the container to be ready", || {
        env.ls()
            .into_iter()
            .find(|v| v["name"] == name && v["health"] == "healthy")
            .map(|_| ())
    });
}

pub(super) fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    wait_until(Duration::from_secs(180), what, || child.try_wait().unwrap())
}

/// What was written to the terminal whose `master` this is. Reading ends at EIO, once every
/// holder of the slave has closed it; bounded, so that a process still holding it fails the
/// test with the output instead of hanging the suite.
fn read_terminal(master: OwnedFd) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = std::fs::File::from(master).read_to_end(&mut out);
        let _ = tx.send(out);
    });
    let out = rx.recv_timeout(Duration::from_secs(30)).expect(
        "the terminal was still open 30 s after fcvm exited: a process fcvm started kept it",
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// A pseudo-terminal whose slave becomes fcvm's controlling terminal and stdio.
fn pty() -> (OwnedFd, OwnedFd) {
    let p = nix::pty::openpty(None, None).unwrap();
    (p.master, p.slave)
}

/// Make `slave` `cmd`'s standard streams and controlling terminal, in a session of its own
/// (as a shell in a terminal window starts it).
fn on_pty(cmd: &mut Command, slave: &OwnedFd) {
    let slave_fd = slave.as_raw_fd();
    cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave.try_clone().unwrap()));
    // SAFETY: runs in the forked child before exec; setsid and ioctl are
    // async-signal-safe and the fd stays open until exec (the caller keeps `slave`).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if libc::ioctl(slave_fd, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn tty_without_interactive_keeps_the_terminal_cooked_and_ctrl_c_reaches_the_container() {
    let Some(g) = guest_or_skip("tty_without_i") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let (master, slave) = pty();
    let mut cmd = g.run(
        &env,
        "t",
        &["-t"],
        "trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 1; done",
    );
    on_pty(&mut cmd, &slave);
    let mut child = cmd.spawn().unwrap();
    // The Command keeps its copies of the slave: drop them, or the terminal never closes.
    drop(cmd);
    wait_healthy(&env, "t");
    // Not raw: the line discipline still turns ^C into SIGINT.
    let mode = nix::sys::termios::tcgetattr(&slave).unwrap();
    assert!(mode
        .local_flags
        .contains(nix::sys::termios::LocalFlags::ISIG | nix::sys::termios::LocalFlags::ICANON));
    nix::unistd::write(&master, b"\x03").unwrap();
    let status = wait_exit(&mut child, "fcvm after Ctrl-C");
    drop(slave);
    let out = read_terminal(master);
    assert_eq!(status.code(), Some(3), "{out}");
    assert!(out.contains("got-int"), "{out}");
    env.assert_clean();
}

#[test]
fn forced_stop_makes_podman_run_exit_137() {
    let Some(g) = guest_or_skip("forced_stop_137") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let mut child = g
        .run(
            &env,
            "stubborn",
            &[],
            "trap '' TERM; echo ready; while :; do sleep 1; done",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_healthy(&env, "stubborn");
    env.ok(&["stop", "stubborn", "--timeout", "2"]);
    let status = wait_exit(&mut child, "podman run after fcvm stop");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(137), "{err}");
    assert!(!err.contains("before the container reported"), "{err}");
    env.assert_clean();
}

#[test]
fn sighup_gives_the_container_its_sigterm_and_leaves_nothing() {
    let Some(g) = guest_or_skip("sighup_podman") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let mut child = g
        .run(
            &env,
            "hup",
            &[],
            "trap 'echo got-term; exit 143' TERM; echo ready; while :; do sleep 1; done",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&env, "hup");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let status = wait_exit(&mut child, "podman run after SIGHUP");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(status.code(), Some(143), "{out}");
    assert!(out.contains("got-term"), "{out}");
    // Torn down by that fcvm itself, not left for the next command.
    assert!(env.state_files().is_empty() && env.vm_dirs().is_empty());
}

/// The container's own exit code, even when podman has to be killed after the container
/// exited: on a loaded machine podman's clean-up can outlast the stop grace. Here `podman run`
/// is frozen (SIGSTOP, from the guest) before the container is stopped by hand, so its 42 is
/// recorded (by conmon, then podman's clean-up) while podman never reports it; fcvm's stop
/// then ends in the second stage, which kills podman, and fcvm reports the container's 42,
/// neither podman's 137 nor the 143 of a VM that went down with fcvm's SIGTERM.
#[test]
fn a_podman_killed_after_the_container_exited_still_gives_its_code() {
    let Some(g) = guest_or_skip("killed_podman_code") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let mut child = g
        .run(
            &env,
            "frozen",
            &["--stop-timeout", "2"],
            "trap 'exit 42' TERM; echo ready; while :; do sleep 1; done",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&env, "frozen");
    // `[t]rap` and `[p]odman` keep this shell's own command line from matching. The loop
    // waits for the container's process to end.
    let script = "set -e; kill -STOP $(pgrep -f '^[p]odman run'); \
        c=$(pgrep -f '^sh -c [t]rap'); kill -TERM $c; \
        for i in $(seq 300); do kill -0 $c 2>/dev/null || break; sleep 0.2; done; \
        kill -0 $c 2>/dev/null && echo still-running || echo exited";
    let o = env
        .command()
        .args(["exec", "--name", "frozen", "--vm", "--", "sh", "-c", script])
        .output()
        .unwrap();
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout).trim()),
        (Some(0), "exited"),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_exit(&mut child, "podman run after SIGTERM with podman frozen");
    assert_eq!(status.code(), Some(42));
    assert!(env.state_files().is_empty() && env.vm_dirs().is_empty());
}

#[test]
fn interactive_tty_from_a_pipe_never_hangs() {
    let Some(g) = guest_or_skip("it_from_pipe") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let mut child = g
        .run(&env, "pipe", &["-i", "-t"], "cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"hi\n").unwrap();
    let status = wait_exit(&mut child, "podman run -it with piped stdin");
    assert_eq!(status.code(), Some(125));
    env.assert_clean();
}

/// One VM, many `podman run` flags, as the container sees them: the command right after IMAGE
/// without `--` and starting with a flag of its own (`-c`, which only works because
/// `--entrypoint /bin/sh` replaced the image's missing entrypoint), `-e NAME` from this host
/// (and one the host lacks, skipped), `-e` with commas and `=` in the value, `--env-file` with
/// comments, quotes and a value `-e` overrides, `--user 1000`, `-w /tmp`, `--init`, and a
/// generated name that is also the guest's hostname.
#[test]
fn run_flags_reach_the_container_without_a_double_dash() {
    let Some(g) = guest_or_skip("run_flags") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("vars.env");
    std::fs::write(
        &env_file,
        "# settings\n\nFILE_PLAIN=from the file\nFILE_QUOTED=\"kept\"\nFCVM_FROM_HOST=file loses\n",
    )
    .unwrap();
    let script = "echo uid=$(id -u); echo cwd=$(pwd); echo host=$FCVM_FROM_HOST; \
                  echo missing=${FCVM_NOT_ON_HOST-unset}; echo opts=$OPTS; \
                  echo plain=$FILE_PLAIN; echo quoted=$FILE_QUOTED; echo self=$$; \
                  echo pid1=$(cat /proc/1/comm); echo hostname=$(hostname); \
                  test -e /dev/vda && echo vda=visible || echo vda=hidden";
    let mut cmd = g.run_bare(
        &env,
        &[
            "-e",
            "FCVM_FROM_HOST",
            "-e",
            "FCVM_NOT_ON_HOST",
            "-e",
            "OPTS=x=1,y=2",
            "--env-file",
            env_file.to_str().unwrap(),
            "--user",
            "1000",
            "-w",
            "/tmp",
            "--entrypoint",
            "/bin/sh",
            "--init",
            "--label",
            "app=flags",
        ],
        &["-c", script],
    );
    cmd.env("FCVM_FROM_HOST", "host value")
        .env_remove("FCVM_NOT_ON_HOST");
    let (code, out, err) = run_to_end(cmd, "podman run with the run flags");
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let r = report(&out);
    let got = |k: &str| r.get(k).map(String::as_str).unwrap_or("<absent>");
    assert_eq!(got("uid"), "1000", "{out}");
    assert_eq!(got("cwd"), "/tmp", "{out}");
    assert_eq!(
        got("host"),
        "host value",
        "-e NAME wins over the file: {out}"
    );
    assert_eq!(got("missing"), "unset", "{out}");
    assert_eq!(got("opts"), "x=1,y=2", "{out}");
    assert_eq!(got("plain"), "from the file", "{out}");
    assert_eq!(got("quoted"), "\"kept\"", "{out}");
    // --init: an init process is PID 1 and the shell is not.
    assert_ne!(got("self"), "1", "{out}");
    assert_ne!(got("pid1"), "sh", "{out}");
    assert_eq!(got("vda"), "hidden", "{out}");
    let hostname = got("hostname");
    let parts: Vec<&str> = hostname.split('_').collect();
    assert!(
        parts.len() == 3 && parts[2].len() == 4,
        "a generated adjective_noun_xxxx name: {out}"
    );
    env.assert_clean();
}

/// `--privileged` gives the container mknod (CAP_MKNOD is not among podman's default
/// capabilities) and the VM's devices. Their absence without it: `/dev/vda` hidden in
/// `run_flags_reach_the_container_without_a_double_dash`, and the agent adds
/// `--privileged` to podman only when asked (unit test in fc-agent).
#[test]
fn privileged_allows_mknod_and_shows_the_vm_s_devices() {
    let Some(g) = guest_or_skip("privileged") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let script = "mknod /tmp/null2 c 1 3 && echo mknod=ok || echo mknod=denied; \
                  test -b /dev/vda && echo vda=visible || echo vda=hidden";
    let cmd = g.run_bare(&env, &["--privileged"], &["sh", "-c", script]);
    let (code, out, err) = run_to_end(cmd, "podman run --privileged");
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let r = report(&out);
    assert_eq!(
        r.get("mknod").map(String::as_str),
        Some("ok"),
        "{out}\n{err}"
    );
    assert_eq!(r.get("vda").map(String::as_str), Some("visible"), "{out}");
    env.assert_clean();
}

/// `fcvm ps -a --format json`'s row for `name`.
fn ps_row(env: &TestEnv, name: &str) -> Option<serde_json::Value> {
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["ps", "-a", "--format", "json"])).unwrap();
    rows.into_iter().find(|r| r["Names"][0] == name)
}

fn logs_of(env: &TestEnv, args: &[&str]) -> (String, String) {
    let mut all = vec!["logs"];
    all.extend_from_slice(args);
    let o = env.fcvm(&all);
    assert!(o.status.success(), "fcvm {all:?}: {o:?}");
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn log_files(env: &TestEnv) -> Vec<PathBuf> {
    std::fs::read_dir(env.base().join("logs"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// `-d` from a terminal that then hangs up; `logs` (plain, -f, --tail, --timestamps) with the
/// streams apart; `kill -s USR1` to the container; an explicit SIGHUP to the supervisor;
/// `stop`; `wait`; `ps -a` with the exit code; the exited VM holding its name; `rm`.
#[test]
fn detached_run_logs_kill_stop_wait_ps_rm() {
    let Some(g) = guest_or_skip("detached_run") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let script = "trap 'echo got-usr1; echo usr1-err >&2' USR1; \
                  trap 'echo got-term; exit 143' TERM; \
                  echo out-1; echo err-1 >&2; while :; do sleep 1; done";
    let (master, slave) = pty();
    let mut cmd = g.run_kept(&env, "bg", &["-d"], script);
    on_pty(&mut cmd, &slave);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let status = wait_until(READY, "podman run -d to return", || {
        child.try_wait().unwrap()
    });
    drop(slave);
    // The terminal closes (the hangup): nothing holds it, the supervisor included.
    let term = read_terminal(master);
    assert_eq!(status.code(), Some(0), "{term}");
    // fcvm's own notices (stderr) until the container started, then the name on stdout; no
    // container output: it goes to the log only.
    assert_eq!(term.lines().last().map(str::trim), Some("bg"), "{term}");
    assert!(!term.contains("out-1") && !term.contains("err-1"), "{term}");
    let row = ps_row(&env, "bg").expect("ps lists the detached VM");
    assert_eq!(row["State"], "running", "{row}");
    let supervisor = row["Pid"].as_u64().unwrap() as i32;
    // In a session of its own: a terminal's hangup never reaches it.
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(supervisor))).unwrap();
    assert_eq!(sid.as_raw(), supervisor);

    let (out, err) = wait_until(READY, "the first output in the log", || {
        let (o, e) = logs_of(&env, &["bg"]);
        (o.contains("out-1") && e.contains("err-1")).then_some((o, e))
    });
    assert_eq!((out.as_str(), err.as_str()), ("out-1\n", "err-1\n"));

    let mut follow = env
        .command()
        .args(["logs", "-f", "bg"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // SIGHUP to the supervisor itself changes nothing.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ps_row(&env, "bg").unwrap()["State"], "running");

    let o = env.fcvm(&["kill", "-s", "BOGUS", "bg"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown signal \"BOGUS\""));
    env.ok(&["kill", "-s", "USR1", "bg"]);
    wait_until(READY, "the container's USR1 trap in the log", || {
        let (o, e) = logs_of(&env, &["bg"]);
        (o.contains("got-usr1") && e.contains("usr1-err")).then_some(())
    });

    env.ok(&["stop", "--timeout", "60", "bg"]);
    assert_eq!(env.ok(&["wait", "bg"]).trim(), "143");
    let status = wait_exit(&mut follow, "logs -f after the container ended");
    assert!(status.success());
    let mut followed = String::new();
    follow
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut followed)
        .unwrap();
    assert_eq!(followed, "out-1\ngot-usr1\ngot-term\n");

    let row = ps_row(&env, "bg").expect("ps -a keeps the exited VM");
    assert_eq!(
        (row["State"].as_str(), row["ExitCode"].as_i64()),
        (Some("exited"), Some(143)),
        "{row}"
    );
    assert_eq!(row["Status"], "Exited (143)");
    let running: Vec<serde_json::Value> =
        serde_json::from_str(&env.ok(&["ps", "--format", "json"])).unwrap();
    assert!(running.is_empty(), "{running:?}");
    // Its VM is gone (runtime dir, VMM), its logs are not.
    assert!(env.vm_dirs().is_empty(), "{:?}", env.vm_dirs());
    assert_eq!(logs_of(&env, &["--tail", "1", "bg"]).0, "got-term\n");
    let (stamped, _) = logs_of(&env, &["--timestamps", "bg"]);
    for line in stamped.lines() {
        let (time, text) = line.split_once(' ').unwrap();
        assert!(time.starts_with("20") && time.ends_with('Z'), "{line}");
        assert!(["out-1", "got-usr1", "got-term"].contains(&text), "{line}");
    }
    // The name stays taken until rm, as podman's.
    let (code, _, err) = run_to_end(
        g.run_kept(&env, "bg", &[], "true"),
        "a run reusing the name",
    );
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains("in use by an exited container VM") && err.contains("fcvm rm bg"),
        "{err}"
    );

    assert_eq!(env.ok(&["rm", "bg"]).trim(), "bg");
    env.assert_clean();
    assert!(log_files(&env).is_empty(), "{:?}", log_files(&env));
    let o = env.fcvm(&["logs", "bg"]);
    assert!(!o.status.success());
}

/// A foreground run without `--rm` keeps its exit code and a size-bounded log that a fast
/// printer rotates; `-d --rm` leaves nothing once its container ends.
#[test]
fn kept_foreground_logs_rotate_and_detached_rm_leaves_nothing() {
    let Some(g) = guest_or_skip("kept_logs") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let (code, out, _) = run_to_end(
        g.run_kept(
            &env,
            "fg",
            &["--log-opt", "max-size=16k"],
            "seq 1 20000; echo done >&2; exit 3",
        ),
        "a foreground run printing fast",
    );
    assert_eq!(code, Some(3));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 20000, "the terminal gets everything");
    assert_eq!(lines.last(), Some(&"20000"));
    let row = ps_row(&env, "fg").expect("kept without --rm");
    assert_eq!(row["ExitCode"], 3, "{row}");
    assert_eq!(env.ok(&["wait", "fg"]).trim(), "3");
    // The bound holds: two files of at most 16 KiB; the newest lines are there, in order.
    let dir = log_files(&env).pop().expect("a log dir");
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        let len = f.metadata().unwrap().len();
        if f.file_name().to_string_lossy().starts_with("container.log") {
            assert!(len <= 16 << 10, "{:?} is {len} bytes", f.path());
        }
    }
    let (kept, err) = logs_of(&env, &["fg"]);
    assert_eq!(err, "done\n");
    let kept: Vec<u32> = kept.lines().map(|l| l.parse().unwrap()).collect();
    // About 46 bytes a record: some 350 lines a file.
    assert!(kept.len() > 300 && kept.len() < 20000, "{}", kept.len());
    assert_eq!(kept.last(), Some(&20000));
    assert!(kept.windows(2).all(|w| w[1] == w[0] + 1));
    // --tail counts the lines of both streams, as docker's.
    assert_eq!(
        logs_of(&env, &["--tail", "2", "fg"]),
        ("20000\n".into(), "done\n".into())
    );
    assert_eq!(logs_of(&env, &["--tail", "3", "fg"]).0, "19999\n20000\n");
    env.ok(&["rm", "fg"]);
    env.assert_clean();

    let (code, out, err) = run_to_end(
        g.run_kept(&env, "gone", &["-d", "--rm"], "echo bye; sleep 2"),
        "podman run -d --rm",
    );
    assert_eq!((code, out.trim()), (Some(0), "gone"), "{err}");
    wait_until(READY, "the --rm VM to be removed", || {
        (env.state_files().is_empty() && log_files(&env).is_empty()).then_some(())
    });
    env.assert_clean();
}

/// `fcvm ARGS...` on a fresh terminal of its own: the child, the master (to type on), and
/// what the terminal shows so far (read in the background until every holder closes it).
fn on_terminal(
    env: &TestEnv,
    args: &[&str],
) -> (Child, OwnedFd, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let (master, slave) = pty();
    let mut cmd = env.command();
    cmd.args(args);
    on_pty(&mut cmd, &slave);
    let child = cmd.spawn().unwrap();
    drop(cmd);
    drop(slave);
    let shown = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (reader, sink) = (master.try_clone().unwrap(), shown.clone());
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(reader);
        let mut buf = [0u8; 4096];
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    (child, master, shown)
}

fn shows(screen: &std::sync::Mutex<Vec<u8>>, needle: &str) -> bool {
    String::from_utf8_lossy(&screen.lock().unwrap()).contains(needle)
}

/// `-dit`, then `fcvm attach` from a terminal: typing reaches the container, Ctrl-P Ctrl-Q
/// detaches and leaves it running; a second attach with `--detach-keys ctrl-x` passes Ctrl-P
/// Ctrl-Q through and exits with the container's code once it ends.
#[test]
fn attach_types_into_a_detached_terminal_and_detach_keys_leave_it_running() {
    let Some(g) = guest_or_skip("attach") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let script = "echo hello-tty; while read l; do echo \"got:$l\"; \
                  [ \"$l\" = quit ] && exit 7; done";
    let (code, out, err) = run_to_end(
        g.run_kept(&env, "at", &["-d", "-i", "-t"], script),
        "podman run -dit",
    );
    assert_eq!((code, out.trim()), (Some(0), "at"), "{err}");

    let (mut child, master, screen) = on_terminal(&env, &["attach", "at"]);
    // The shell reads once attached: type until it answers (the first keys may arrive
    // before the container's read).
    wait_until(READY, "the container to echo a typed line", || {
        nix::unistd::write(&master, b"one\r").unwrap();
        std::thread::sleep(Duration::from_secs(1));
        shows(&screen, "got:one").then_some(())
    });
    nix::unistd::write(&master, b"\x10\x11").unwrap();
    let status = wait_exit(&mut child, "attach after Ctrl-P Ctrl-Q");
    let text = String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    assert!(status.success(), "{text}");
    assert!(text.contains("detached from at"), "{text}");
    assert_eq!(ps_row(&env, "at").unwrap()["State"], "running");

    let (mut child, master, screen) =
        on_terminal(&env, &["attach", "--detach-keys", "ctrl-x", "at"]);
    wait_until(READY, "the second attach to reach the container", || {
        nix::unistd::write(&master, b"two\r").unwrap();
        std::thread::sleep(Duration::from_secs(1));
        shows(&screen, "got:two").then_some(())
    });
    // Not the detach keys now: they reach the container as a line of their own.
    nix::unistd::write(&master, b"\x10\x11\r").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        child.try_wait().unwrap().is_none(),
        "Ctrl-P Ctrl-Q detached with --detach-keys ctrl-x"
    );
    nix::unistd::write(&master, b"quit\r").unwrap();
    let status = wait_exit(&mut child, "attach until the container exits");
    let text = String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    assert_eq!(status.code(), Some(7), "{text}");
    let row = ps_row(&env, "at").unwrap();
    assert_eq!(row["ExitCode"], 7, "{row}");
    let (log, _) = logs_of(&env, &["at"]);
    assert!(
        log.contains("hello-tty") && log.contains("got:one") && log.contains("got:two"),
        "{log}"
    );
    // A VM without kept input cannot be attached to: said plainly.
    let o = env.fcvm(&["attach", "at"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a running container VM"));
    env.ok(&["rm", "at"]);
    env.assert_clean();
}
