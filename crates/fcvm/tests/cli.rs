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
