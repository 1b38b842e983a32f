//! The defects of issue 8 that need no Linux guest: each reproduced as a new user would
//! meet it, against the real `fcvm` binary (and the real Firecracker with the probe guest
//! where a VM is needed). The ones that need a booted Linux guest are in `podman_cli`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fcvm::process::ProcessRef;

use crate::common::{firecracker_or_skip, wait_until, TestEnv};

fn run_with_stdin(env: &TestEnv, args: &[&str], stdin: &[u8]) -> (i32, String, Duration) {
    let t = Instant::now();
    let mut child = env
        .command()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    // It must return by itself: a hang is the defect.
    wait_until(Duration::from_secs(30), "fcvm to return", || {
        child.try_wait().unwrap().map(|_| ())
    });
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t.elapsed(),
    )
}

fn stderr_of(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let out = env.fcvm(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn interactive_tty_with_piped_stdin_is_refused_at_once_like_docker() {
    let env = TestEnv::new();
    let (code, err, took) = run_with_stdin(
        &env,
        &[
            "podman", "run", "-it", "--name", "t", "busybox", "--", "cat",
        ],
        b"hi\n",
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("the input device is not a TTY"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let (code, err, _) = run_with_stdin(&env, &["exec", "-it", "--name", "t", "--", "cat"], b"");
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("the input device is not a TTY"), "{err}");
    env.assert_clean();
}

#[test]
fn fcvm_own_failures_exit_125_in_commands_that_forward_a_container_code() {
    let env = TestEnv::new();
    // A missing archive must not look like a container's `exit 1`.
    let (code, err) = stderr_of(
        &env,
        &[
            "podman",
            "run",
            "--name",
            "a",
            "--image-archive",
            "/nope.tar",
            "--",
            "true",
        ],
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("/nope.tar"), "{err}");
    // So must a usage error.
    let (code, err) = stderr_of(&env, &["podman", "run", "--bogus-flag", "img"]);
    assert_eq!(code, 125, "{err}");
    let (code, err) = stderr_of(&env, &["exec", "--name", "ghost", "--", "true"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("no running VM matches"), "{err}");
    // Other commands keep clap's 2 for usage errors; help is 0.
    assert_eq!(stderr_of(&env, &["ls", "--bogus"]).0, 2);
    assert_eq!(
        env.fcvm(&["podman", "run", "--help"]).status.code(),
        Some(0)
    );
    env.assert_clean();
}

#[test]
fn hidden_commands_are_never_suggested() {
    let env = TestEnv::new();
    let (code, err) = stderr_of(&env, &["snapshot", "rm", "x"]);
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("__resume-guard"), "{err}");
    let help = String::from_utf8_lossy(&env.fcvm(&["snapshot", "--help"]).stdout).into_owned();
    assert!(!help.contains("__resume-guard"), "{help}");
    let (_, err) = stderr_of(&env, &["__resume", "x"]);
    assert!(!err.contains("__resume-guard"), "{err}");
}

#[test]
fn snapshot_run_without_a_source_names_both_options() {
    let env = TestEnv::new();
    let (code, err) = stderr_of(&env, &["snapshot", "run"]);
    assert_eq!(code, 2);
    assert!(err.contains("--pid") && err.contains("--snapshot"), "{err}");
}

#[test]
fn diff_help_does_not_promise_clones_work_without_dirty_tracking() {
    let env = TestEnv::new();
    let help =
        String::from_utf8_lossy(&env.fcvm(&["snapshot", "create", "--help"]).stdout).into_owned();
    assert!(!help.contains("or a clone)"), "{help}");
    assert!(help.contains("--track-dirty-pages"), "{help}");
}

#[test]
fn an_error_cause_is_printed_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_fcvm"))
        .env("FCVM_BASE_DIR", "/proc/nope")
        .args(["stop", "foo"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(err.contains("/proc/nope/state"), "{err}");
}

#[test]
fn podman_run_accepts_kernel_probe_as_fcvm_run_does() {
    if firecracker_or_skip("podman_kernel_probe").is_none() {
        return;
    }
    let env = TestEnv::new();
    let (code, err) = stderr_of(
        &env,
        &[
            "podman",
            "run",
            "--name",
            "p",
            "--kernel",
            "probe",
            "--rootfs",
            "/nope.img",
            "docker.io/library/busybox",
            "--",
            "true",
        ],
    );
    assert_eq!(code, 125, "{err}");
    assert!(!err.contains("kernel probe does not exist"), "{err}");
    assert!(err.contains("rootfs /nope.img does not exist"), "{err}");
    env.assert_clean();
}

#[test]
fn debug_logging_shows_each_launch_step_with_its_time_and_no_colour_in_pipes() {
    if firecracker_or_skip("debug_logging").is_none() {
        return;
    }
    let env = TestEnv::new();
    let args = [
        "run",
        "--name",
        "dbg",
        "--kernel",
        "probe",
        "--detach",
        "--boot-args",
        "probe.mem_mib=8",
    ];
    let out = env
        .command()
        .env("FCVM_LOG", "debug")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(!err.contains('\x1b'), "ANSI escapes in a pipe: {err:?}");
    for step in [
        "recorded after",
        "files ready in",
        "VMM API ready in",
        "configured in",
        "booting done",
    ] {
        assert!(err.contains(step), "no {step:?} in:\n{err}");
    }
    // Lines carry a timestamp (RFC 3339, UTC).
    let line = err.lines().find(|l| l.contains("configured in")).unwrap();
    assert!(line.starts_with("20") && line.contains('T'), "{line}");
    // --verbose twice is the same as FCVM_LOG=debug (no short form: `-v` is podman's volume).
    let out = env
        .command()
        .args(["--verbose", "--verbose", "stop", "dbg"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("DEBUG") && err.contains("teardown took"),
        "{err}"
    );
    env.assert_clean();
}

#[test]
fn sighup_stops_a_foreground_vm_in_order_and_leaves_nothing() {
    if firecracker_or_skip("sighup_foreground").is_none() {
        return;
    }
    let env = TestEnv::new();
    let child = env
        .command()
        .args([
            "run",
            "--name",
            "hup",
            "--kernel",
            "probe",
            "--boot-args",
            "probe.mem_mib=8",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let vmm = wait_until(Duration::from_secs(20), "vm running", || {
        let text = env
            .state_files()
            .first()
            .and_then(|p| std::fs::read_to_string(p).ok())?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        (v["status"] == "running")
            .then(|| serde_json::from_value::<ProcessRef>(v["vmm"].clone()).ok())?
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(129),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        vmm.wait_gone(Duration::from_secs(5)),
        "firecracker survived"
    );
    // Torn down by fcvm itself, not left for the next command's reaper.
    assert!(env.state_files().is_empty() && env.vm_dirs().is_empty());
}
