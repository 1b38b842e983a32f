use std::time::Duration;

use crate::common::TestEnv;

fn stderr_of(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let out = env.fcvm(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_sizes_and_missing_kernel_are_clear_errors_and_leave_nothing() {
    let env = TestEnv::new();
    let (code, err) = stderr_of(
        &env,
        &["run", "--name", "a", "--kernel", "probe", "--mem", "1"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("--mem 1 MiB is out of range"), "{err}");
    let (code, err) = stderr_of(
        &env,
        &["run", "--name", "a", "--kernel", "probe", "--cpu", "0"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("--cpu 0 is out of range"), "{err}");
    let (code, err) = stderr_of(&env, &["run", "--name", "a", "--kernel", "/nope/vmlinux"]);
    assert_eq!(code, 1);
    assert!(err.contains("kernel /nope/vmlinux does not exist"), "{err}");
    let (code, err) = stderr_of(
        &env,
        &[
            "run",
            "--name",
            "a",
            "--kernel",
            "probe",
            "--rootfs",
            "/nope.img",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("rootfs /nope.img does not exist"), "{err}");
    let (code, _) = stderr_of(
        &env,
        &["run", "--name", "a", "--kernel", "probe", "--mem", "abc"],
    );
    assert_eq!(code, 2, "clap rejects non-numbers");
    env.assert_clean();
}

#[test]
fn bad_names_are_refused() {
    let env = TestEnv::new();
    for (name, needle) in [
        ("../x", "contains '/'"),
        ("-x", "must start"),
        ("", "empty"),
    ] {
        let arg = format!("--name={name}");
        let (code, err) = stderr_of(&env, &["run", &arg, "--kernel", "probe"]);
        assert_eq!(code, 1, "{name:?}: {err}");
        assert!(err.contains(needle), "{name:?}: {err}");
    }
    env.assert_clean();
}

#[test]
fn stop_of_unknown_vm_says_so() {
    let env = TestEnv::new();
    let (code, err) = stderr_of(&env, &["stop", "ghost"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no running VM matches name \"ghost\""),
        "{err}"
    );
}

#[test]
fn ls_on_a_fresh_base_dir_is_empty() {
    let env = TestEnv::new();
    assert!(env.ls().is_empty());
    assert_eq!(env.ok(&["ls"]).lines().count(), 1, "only the header");
}

#[test]
fn bad_container_flags_exit_125_naming_the_bad_part_and_leave_nothing() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let bad_line = dir.path().join("bad.env");
    std::fs::write(&bad_line, "# ok\nA=1\nnot a name\n").unwrap();
    let bad_line = bad_line.to_str().unwrap().to_owned();
    for (args, needle) in [
        (
            vec!["--env-file", "/nope/vars.env"],
            "--env-file /nope/vars.env: No such file",
        ),
        (vec!["--env-file", &bad_line], "bad.env:3:"),
        (vec!["-e", "=x"], "invalid --env \"=x\""),
        (vec!["-w", "tmp"], "invalid --workdir \"tmp\""),
        (vec!["--user", ""], "invalid --user \"\""),
        (vec!["--label", "novalue"], "invalid --label \"novalue\""),
    ] {
        let mut argv = vec!["podman", "run"];
        argv.extend(args);
        argv.extend(["busybox", "ls", "-la"]);
        let (code, err) = stderr_of(&env, &argv);
        assert_eq!(code, 125, "{argv:?}: {err}");
        assert!(err.contains(needle), "{argv:?}: {err}");
    }
    env.assert_clean();
}

/// `--health-check` and its durations are checked before anything exists (no Firecracker
/// needed: the run never gets that far).
#[test]
fn bad_health_checks_exit_125_naming_the_bad_part_and_leave_nothing() {
    let env = TestEnv::new();
    for (args, needle) in [
        (
            vec!["--health-check", "localhost:80"],
            "\"localhost:80\" is not a URL",
        ),
        (
            vec!["--health-check", "https://127.0.0.1/"],
            "scheme \"https\" is not supported; only http://",
        ),
        (vec!["--health-check", "http://:80/"], "has no valid host"),
        (
            vec!["--health-check", "http://h:99999/"],
            "has an invalid port",
        ),
        (
            vec!["--health-check", "http://h/", "--health-interval", "0s"],
            "--health-interval must be more than zero",
        ),
        (
            vec!["--health-check", "http://h/", "--health-timeout=-1s"],
            "--health-timeout \"-1s\" is not a duration",
        ),
        (
            vec!["--health-check", "http://h/", "--health-interval", "soon"],
            "--health-interval \"soon\" is not a duration",
        ),
        (
            vec!["--health-check", "http://h/", "--health-retries", "0"],
            "--health-retries must be at least 1",
        ),
    ] {
        let mut argv = vec!["podman", "run"];
        argv.extend(args);
        argv.extend(["busybox", "true"]);
        let (code, err) = stderr_of(&env, &argv);
        assert_eq!(code, 125, "{argv:?}: {err}");
        assert!(err.contains(needle), "{argv:?}: {err}");
    }
    // The settings need the check (a usage error: podman's 125).
    let (code, err) = stderr_of(
        &env,
        &[
            "podman",
            "run",
            "--health-interval",
            "1s",
            "busybox",
            "true",
        ],
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("--health-check"), "{err}");
    env.assert_clean();
}

/// `--map` / `-v` items are checked before anything exists (no Firecracker needed: the run
/// never gets that far).
#[test]
fn bad_volumes_exit_125_naming_the_bad_part_and_leave_nothing() {
    let env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let f = file.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec!["--map".into(), format!("{d}/missing:/data")],
            format!("host directory \"{d}/missing\" does not exist"),
        ),
        (
            vec!["-v".into(), format!("{f}:/data")],
            format!("host path \"{f}\" is not a directory"),
        ),
        (
            vec!["--volume".into(), "rel:/data".into()],
            "the host directory \"rel\" is not an absolute path".into(),
        ),
        (
            vec!["--map".into(), ":/data".into()],
            "the host directory is empty".into(),
        ),
        (
            vec!["--map".into(), format!("{d}:data")],
            "the container path \"data\" must be an absolute path".into(),
        ),
        (
            vec!["--map".into(), format!("{d}:/")],
            "the container path cannot be /".into(),
        ),
        (
            vec!["--map".into(), format!("{d}:/a,{d}:/a:ro")],
            "container path \"/a\" is mapped twice".into(),
        ),
        (
            vec![
                "-v".into(),
                format!("{d}:/a"),
                "--map".into(),
                format!("{d}:/a/"),
            ],
            "container path \"/a\" is mapped twice".into(),
        ),
        (
            vec!["--map".into(), format!("{d}:/a:rx")],
            "unknown option \"rx\"".into(),
        ),
        (
            vec!["--map".into(), d.clone()],
            "expected HOST_DIR:GUEST_PATH[:ro]".into(),
        ),
    ];
    for (args, needle) in cases {
        let mut argv = vec!["podman", "run"];
        argv.extend(args.iter().map(String::as_str));
        argv.extend(["busybox", "ls"]);
        let (code, err) = stderr_of(&env, &argv);
        assert_eq!(code, 125, "{argv:?}: {err}");
        assert!(
            err.contains(&needle),
            "{argv:?}: wanted {needle:?} in: {err}"
        );
    }
    env.assert_clean();
}

#[test]
fn bash_completion_loads_and_completes_run_flags() {
    let script = format!(
        "source <({} completions bash) && complete -p fcvm && \
         COMP_WORDS=(fcvm podman run --env-f) COMP_CWORD=3 COMP_LINE='fcvm podman run --env-f' \
         COMP_POINT=23 && _fcvm fcvm --env-f run && echo \"reply: ${{COMPREPLY[*]}}\"",
        env!("CARGO_BIN_EXE_fcvm")
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("-F _fcvm fcvm"), "{text}");
    assert!(text.contains("reply: --env-file"), "{text}");
}

#[test]
fn version_names_fcvm_the_agent_and_firecracker_and_never_fails() {
    let env = TestEnv::new();
    let out = env
        .command()
        .arg("--version")
        .env("FCVM_FIRECRACKER_BIN", "/nope/firecracker")
        .env("FCVM_AGENT_BIN", "/nope/fc-agent")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("fcvm {}", env!("CARGO_PKG_VERSION")));
    assert!(
        lines[1].starts_with("agent: /nope/fc-agent (version unknown"),
        "{text}"
    );
    assert_eq!(
        lines[2], "firecracker: not found (`fcvm setup firecracker`)",
        "{text}"
    );
}

#[test]
fn ps_inspect_and_rm_of_container_vms() {
    use fcvm::names::Name;
    use fcvm::state::{new_vm_id, Health, Store, VmKind, VmRecord, VmStatus};
    let env = TestEnv::new();
    let store = Store::open(&fcvm::paths::Paths::new(env.base())).unwrap();
    // A running container VM, owned by a process that stands in for its foreground fcvm.
    let mut owner = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let record = |name: &str| {
        let id = new_vm_id();
        let mut r = VmRecord::new(
            id.clone(),
            Name::parse(name).unwrap(),
            VmKind::Container,
            env.base().join("vms").join(id),
        );
        r.image = Some("localhost/bb:1".into());
        r
    };
    let mut web = record("web");
    web.status = VmStatus::Running;
    web.health = Health::Healthy;
    web.owner = fcvm::process::ProcessRef::of_pid(owner.id()).unwrap();
    store.create(&web).unwrap();
    let mut broken = record("broken");
    broken.status = VmStatus::Failed;
    broken.error = Some("the guest agent did not connect".into());
    store.create(&broken).unwrap();

    let ps = env.ok(&["ps"]);
    assert!(ps.contains("web") && ps.contains("Up "), "{ps}");
    assert!(!ps.contains("broken"), "{ps}");
    let all: serde_json::Value =
        serde_json::from_str(&env.ok(&["ps", "-a", "--format", "json"])).unwrap();
    let states: Vec<(String, String)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["Names"][0].to_string(), e["State"].to_string()))
        .collect();
    assert!(
        states.contains(&("\"web\"".into(), "\"running\"".into())),
        "{all}"
    );
    assert!(
        states.contains(&("\"broken\"".into(), "\"failed\"".into())),
        "{all}"
    );

    let inspect: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", "web"])).unwrap();
    assert_eq!(inspect[0]["name"], "web");
    assert_eq!(inspect[0]["id"], web.id.as_str());
    let (code, err) = stderr_of(&env, &["inspect", "ghost"]);
    assert_ne!(code, 0);
    assert!(err.contains("ghost"), "{err}");

    // A running one needs -f; an ended one goes at once.
    let (code, err) = stderr_of(&env, &["rm", "web"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("it is running"), "{err}");
    assert_eq!(env.ok(&["rm", "broken"]).trim(), "broken");
    assert!(!env.ok(&["ps", "-a"]).contains("broken"));
    assert_eq!(env.ok(&["rm", "-f", "-t", "0", "web"]).trim(), "web");
    // -f stopped the stand-in owner.
    let status = crate::common::wait_until(Duration::from_secs(10), "the owner to stop", || {
        owner.try_wait().unwrap()
    });
    assert!(!status.success());
    assert_eq!(env.ok(&["ps", "-a", "--format", "json"]).trim(), "[]");
    env.assert_clean();
}

#[test]
fn detached_and_log_flags_are_checked_before_anything_starts() {
    let env = TestEnv::new();
    let (code, err) = stderr_of(
        &env,
        &[
            "podman",
            "run",
            "--log-opt",
            "max-file=2",
            "--name",
            "a",
            "img",
        ],
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("--log-opt \"max-file=2\""), "{err}");
    // The same refusal through a detached run's supervisor: on this terminal, same code.
    let (code, err) = stderr_of(
        &env,
        &[
            "podman",
            "run",
            "-d",
            "--log-opt",
            "max-size=1",
            "--name",
            "a",
            "img",
        ],
    );
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("max-size=\"1\""), "{err}");
    env.assert_clean();
}

#[test]
fn setup_failing_stops_a_podman_run_with_its_reason() {
    let env = TestEnv::new();
    // A base "directory" that is a file: the first setup step cannot create bin/ in it.
    let file = env.base().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let out = env
        .command()
        .arg("--base-dir")
        .arg(&file)
        .args(["podman", "run", "--setup", "--name", "a", "img"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("--setup:") && err.contains("Firecracker"),
        "{err}"
    );
}
