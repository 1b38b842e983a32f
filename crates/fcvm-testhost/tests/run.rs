//! End-to-end tests: each boots a real emulated KVM host (QEMU TCG), ~8-15 s per boot, so the
//! checks are combined into few runs. Without QEMU or the pinned kernel package they print
//! `SKIPPED: <reason>` and pass, unless `CI` is set: then they fail.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One emulated host at a time: each wants both cores, and parallel boots only make every
/// test slower and the timings meaningless.
static SERIAL: Mutex<()> = Mutex::new(());

const BIN: &str = env!("CARGO_BIN_EXE_fcvm-testhost");
/// Small L1s for the tests: they run nothing big.
const MEM: &str = "2048";

fn on_path(p: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
        .unwrap_or(false)
}

/// Why the tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    if !on_path("qemu-system-x86_64") {
        return Some("qemu-system-x86_64 not found (apt-get install qemu-system-x86)".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("/bin/busybox not found (apt-get install busybox-static)".into());
    }
    if !on_path("mkfs.btrfs") && !Path::new("/usr/sbin/mkfs.btrfs").exists() {
        return Some("mkfs.btrfs not found (apt-get install btrfs-progs)".into());
    }
    let cache = fcvm_testhost::cache::cache_dir();
    if fcvm_testhost::kernel::cached(&cache).is_none() {
        let ok = Command::new("apt-cache")
            .args([
                "show",
                &format!(
                    "{}={}",
                    fcvm_testhost::kernel::PACKAGE,
                    fcvm_testhost::kernel::VERSION
                ),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Some(format!(
                "kernel package {}={} neither cached nor in the apt archive",
                fcvm_testhost::kernel::PACKAGE,
                fcvm_testhost::kernel::VERSION
            ));
        }
    }
    None
}

/// Returns the lock if the test should run; prints SKIPPED (or panics under CI) otherwise.
fn prepare() -> Option<std::sync::MutexGuard<'static, ()>> {
    if let Some(why) = missing_prerequisite() {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set and the emulated host cannot run: {why}");
        }
        println!("SKIPPED: {why}");
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|p| p.into_inner()))
}

fn testhost(extra: &[&str], cmd: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["run", "--mem", MEM, "--scratch-size", "2"])
        .args(extra)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::null());
    c
}

fn run_with_input(mut c: Command, input: &[u8]) -> Output {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let t = std::thread::spawn(move || {
        stdin.write_all(&input).unwrap();
        // Dropping stdin: EOF, which must reach the command.
    });
    let out = child.wait_with_output().unwrap();
    t.join().unwrap();
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn stdio_stdin_and_exit_status() {
    let Some(_g) = prepare() else { return };
    let big: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let out = run_with_input(
        testhost(
            &[],
            &[
                "sh",
                "-c",
                "cat > /tmp/in; wc -l < /tmp/in >&2; head -n 1 /tmp/in; echo out; echo err >&2; exit 3",
            ],
        ),
        &big,
    );
    assert_eq!(out.status.code(), Some(3), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "0\nout\n");
    assert_eq!(text(&out.stderr), "200000\nerr\n");

    // Plain `cat`: stdin to stdout byte for byte, EOF ends it, exit 0.
    let out = run_with_input(testhost(&[], &["cat"]), b"hello\nworld");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\nworld");
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn missing_and_unexecutable_commands() {
    let Some(_g) = prepare() else { return };
    let out = testhost(&[], &["/nonexistent/cmd-xyz"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(127),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("/nonexistent/cmd-xyz: command not found"),
        "{}",
        text(&out.stderr)
    );
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let f = dir.path().join("not-executable");
    std::fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
    let out = testhost(&[], &[f.to_str().unwrap()]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(126),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("permission denied"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn host_view_shares_kvm_and_scratch() {
    let Some(_g) = prepare() else { return };
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let rw = base.path().join("rw");
    let ro = base.path().join("ro");
    let plain = base.path().join("plain");
    for d in [&rw, &ro, &plain] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(ro.join("seen"), "from-host").unwrap();
    // The host's /tmp is visible inside (a checkout there must work), and writes stay inside.
    let host_tmp = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::write(host_tmp.path().join("seen"), "tmp-from-host").unwrap();
    let script = format!(
        r#"
set -u
echo "tmp-read: $(cat {tmp}/seen)"
echo "tmp-write: $(echo inside > {tmp}/written && echo ok)"
echo "rw-write: $(echo from-guest > {rw}/out && echo ok)"
echo "ro-read: $(cat {ro}/seen)"
echo "ro-write: $(touch {ro}/x 2>/dev/null && echo ok || echo refused)"
echo "root-write: $(touch {plain}/x 2>/dev/null && echo ok || echo refused)"
echo "kvm: $(test -c /dev/kvm && echo yes)"
echo "npt: $(cat /sys/module/kvm_amd/parameters/npt)"
echo "scratch-env: $FCVM_TESTHOST_SCRATCH"
echo "scratch-fs: $(stat -f -c %T /scratch)"
dd if=/dev/urandom of=/scratch/a bs=1M count=4 2>/dev/null
echo "reflink: $(cp --reflink=always /scratch/a /scratch/b && cmp /scratch/a /scratch/b && echo ok)"
echo "loop: $(losetup -f)"
echo "home: $HOME"
echo "foo: $FOO bar: $BAR"
echo "secret: ${{SECRET_X-unset}}"
echo "pwd: $(pwd)"
echo "uid: $(id -u)"
echo "process-substitution: $(bash -c 'cat <(echo works)')"
"#,
        rw = rw.display(),
        ro = ro.display(),
        plain = plain.display(),
        tmp = host_tmp.path().display()
    );
    let out = testhost(
        &[
            "--share",
            &format!("{}:rw", rw.display()),
            "--share",
            ro.to_str().unwrap(),
            "--env",
            "FOO=f o",
            "--env",
            "BAR",
        ],
        &["sh", "-c", &script],
    )
    .env("BAR", "from-caller")
    .env("SECRET_X", "must-not-pass")
    .current_dir(base.path())
    .output()
    .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    let expect = [
        "tmp-read: tmp-from-host",
        "tmp-write: ok",
        // bash's <(...) needs /dev/fd: scripts run inside must work as on the host.
        "process-substitution: works",
        "rw-write: ok",
        "ro-read: from-host",
        "ro-write: refused",
        // The host root is an overlay: writes succeed inside but never reach the host.
        "root-write: ok",
        "kvm: yes",
        "npt: N",
        "scratch-env: /scratch",
        "scratch-fs: btrfs",
        "reflink: ok",
        "loop: /dev/loop",
        "home: /root",
        "foo: f o bar: from-caller",
        "secret: unset",
        &format!("pwd: {}", base.path().display()),
        "uid: 0",
    ];
    for e in expect {
        assert!(
            stdout.lines().any(|l| l.starts_with(e)),
            "missing {e:?} in:\n{stdout}\nstderr: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "from-guest\n"
    );
    assert!(!ro.join("x").exists());
    assert!(
        !plain.join("x").exists(),
        "a write to the host root reached the host"
    );
    assert!(
        !host_tmp.path().join("written").exists(),
        "a write to /tmp inside reached the host"
    );
}

fn wait_for_line(r: &mut impl BufRead, want: &str, timeout: Duration) {
    let t = Instant::now();
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).unwrap();
        assert!(n > 0, "EOF before {want:?}");
        if line.trim() == want {
            return;
        }
        assert!(t.elapsed() < timeout, "no {want:?} within {timeout:?}");
    }
}

fn qemu_of(pid: u32) -> Vec<String> {
    let out = Command::new("pgrep")
        .args([
            "-a",
            "-f",
            &format!("qemu-system.*-name fcvm-testhost-{pid}-"),
        ])
        .output()
        .unwrap();
    text(&out.stdout).lines().map(str::to_string).collect()
}

fn leftovers_of(pid: u32) -> Vec<String> {
    let base = fcvm_testhost::rundir::base_dir();
    std::fs::read_dir(base)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{pid}-")))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn signals_sigterm_forwarded_and_sigkill_leaves_nothing() {
    let Some(_g) = prepare() else { return };
    // SIGTERM reaches the command, which handles it; its status is ours.
    let mut child = testhost(
        &[],
        &[
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done",
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    wait_for_line(&mut out, "ready", Duration::from_secs(120));
    let pid = child.id();
    assert_eq!(
        qemu_of(pid).len(),
        1,
        "the run's QEMU is findable by its -name"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_for_line(&mut out, "got-term", Duration::from_secs(30));
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(7));

    // SIGKILL: QEMU goes too, and no run files remain.
    let mut child = testhost(&[], &["sh", "-c", "echo ready; exec sleep 1000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    wait_for_line(&mut out, "ready", Duration::from_secs(120));
    let pid = child.id();
    assert_eq!(qemu_of(pid).len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    while !qemu_of(pid).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "QEMU survived SIGKILL of fcvm-testhost: {:?}",
            qemu_of(pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(leftovers_of(pid).is_empty(), "{:?}", leftovers_of(pid));
}

#[test]
fn tty_mode_follows_window_size() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let Some(_g) = prepare() else { return };
    let ws = |rows, cols| nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws(30, 100)), None).unwrap();
    let slave = pty.slave;
    let mut cmd = testhost(
        &[],
        &[
            "sh",
            "-c",
            "stty size; echo ready; read x; stty size; echo \"got $x\"; exit 4",
        ],
    );
    cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe; this runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let master = std::fs::File::from(pty.master);
    let mut r = BufReader::new(master.try_clone().unwrap());
    let mut lines = Vec::new();
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "EOF; so far {lines:?}");
        lines.push(line.trim().to_string());
    }
    // Resizing the terminal sends SIGWINCH to its foreground group: fcvm-testhost.
    // SAFETY: TIOCSWINSZ reads the valid winsize for the duration of the call.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws(50, 160)) };
    std::thread::sleep(Duration::from_millis(1500));
    (&master).write_all(b"typed\r").unwrap();
    loop {
        line.clear();
        // EIO once the child has closed the slave side.
        match r.read_line(&mut line) {
            Ok(n) if n > 0 => lines.push(line.trim().to_string()),
            _ => break,
        }
        if line.contains("got ") {
            break;
        }
    }
    assert_eq!(child.wait().unwrap().code(), Some(4), "{lines:?}");
    assert!(lines.contains(&"30 100".to_string()), "{lines:?}");
    assert!(lines.contains(&"50 160".to_string()), "{lines:?}");
    assert!(lines.contains(&"got typed".to_string()), "{lines:?}");
}

/// Why `--seed` cannot work here (it mounts the scratch image on a host loop device), if so.
fn missing_seed_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("--seed needs root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (modprobe loop)".into());
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs
        .lines()
        .any(|l| l.split_whitespace().last() == Some("btrfs"))
    {
        return Some("the host kernel has no btrfs (modprobe btrfs)".into());
    }
    None
}

/// [`prepare`] plus the `--seed` prerequisites.
fn prepare_seed() -> Option<std::sync::MutexGuard<'static, ()>> {
    if let Some(why) = missing_seed_prerequisite() {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set and --seed cannot run: {why}");
        }
        println!("SKIPPED: {why}");
        return None;
    }
    prepare()
}

/// `losetup -a` lines whose backing file is in the run directory of fcvm-testhost `pid`.
fn loop_devices_of(pid: u32) -> Vec<String> {
    let out = Command::new("losetup").arg("-a").output().unwrap();
    let base = fcvm_testhost::rundir::base_dir();
    let marker = format!("{}/{pid}-", base.display());
    text(&out.stdout)
        .lines()
        .filter(|l| l.contains(&marker))
        .map(str::to_string)
        .collect()
}

/// Lines of our own /proc/self/mounts that mention `what`.
fn mounts_with(what: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_string)
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[test]
fn seed_refusals_before_boot() {
    // None of these boots anything, so they need no QEMU.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let f = dir.path().join("f.img");
    std::fs::write(&f, "x").unwrap();
    let fs = f.to_str().unwrap();
    let missing = dir.path().join("missing.img");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![format!("{fs}:../x")], "must not contain `..`"),
        (vec![format!("{fs}:/etc/x")], "not absolute"),
        (
            vec![missing.to_str().unwrap().to_string()],
            "No such file or directory",
        ),
        (
            vec![dir.path().to_str().unwrap().to_string()],
            "not a regular file",
        ),
        (
            vec![fifo.to_str().unwrap().to_string()],
            "not a regular file",
        ),
        (vec![fs.to_string(), format!("{fs}:f.img")], "collide"),
    ];
    for (seeds, want) in cases {
        let mut args = vec![];
        for s in &seeds {
            args.extend(["--seed", s.as_str()]);
        }
        let t = Instant::now();
        let out = testhost(&args, &["true"]).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{seeds:?}: {err}");
        assert!(err.contains(want), "{seeds:?}: want {want:?} in {err}");
        assert!(!err.contains("L1 console"), "{seeds:?} booted: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{seeds:?} took {:?}",
            t.elapsed()
        );
    }
    let out = Command::new(BIN)
        .args(["run", "--scratch-size", "0", "--seed", fs, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("--scratch-size"),
        "{}",
        text(&out.stderr)
    );

    // Not root: refused with the reason (as nobody when we are root).
    let mut c = Command::new(BIN);
    c.args(["run", "--seed", "/etc/hostname", "--", "true"]);
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::process::CommandExt;
        c.uid(65534).gid(65534).env("HOME", "/nonexistent");
    }
    let out = c.output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("--seed: needs root"), "{err}");
}

#[test]
fn seed_sparse_file_onto_scratch() {
    let Some(_g) = prepare_seed() else { return };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let big = dir.path().join("big.img");
    let hello = dir.path().join("hello.txt");
    std::fs::write(&hello, "hello seed\n").unwrap();
    const SIZE: u64 = 1 << 30;
    // 4 KiB blocks (block numbers) with distinct contents, the rest a hole.
    let blocks: [u64; 4] = [0, 300 << 8, (700 << 8) + 16, (SIZE >> 12) - 1];
    let content = |b: u64| -> Vec<u8> {
        (0..4096u64)
            .map(|i| ((b.wrapping_mul(31) + i * 7) % 251) as u8 + 1)
            .collect()
    };
    {
        use std::os::unix::fs::{FileExt, PermissionsExt};
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(SIZE).unwrap();
        for &b in &blocks {
            f.write_all_at(&content(b), b << 12).unwrap();
        }
        f.set_permissions(std::fs::Permissions::from_mode(0o640))
            .unwrap();
    }
    let hole_block = 500u64 << 8;
    let mut script = String::from(
        "f=/scratch/fcvm/rootfs/big.img\n\
         echo \"size: $(stat -c %s $f)\"\n\
         echo \"mode: $(stat -c %a $f)\"\n\
         echo \"du-kib: $(du -k $f | cut -f1)\"\n\
         echo \"hello: $(cat /scratch/hello.txt)\"\n\
         echo \"reflink: $(cp --reflink=always $f /scratch/big2 && stat -c %s /scratch/big2)\"\n",
    );
    for b in blocks.iter().chain([&hole_block]) {
        script.push_str(&format!(
            "echo \"block {b}: $(dd if=$f bs=4096 skip={b} count=1 status=none | sha256sum | cut -d' ' -f1)\"\n"
        ));
    }
    let child = testhost(
        &[
            "-v",
            "--seed",
            &format!("{}:fcvm/rootfs/big.img", big.display()),
            "--seed",
            hello.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let mut expect = vec![
        format!("size: {SIZE}"),
        "mode: 640".to_string(),
        "hello: hello seed".to_string(),
        format!("reflink: {SIZE}"),
        format!("block {hole_block}: {}", sha256_hex(&[0u8; 4096])),
    ];
    for &b in &blocks {
        expect.push(format!("block {b}: {}", sha256_hex(&content(b))));
    }
    for e in &expect {
        assert!(
            stdout.lines().any(|l| l == e),
            "missing {e:?} in:\n{stdout}\nstderr: {stderr}"
        );
    }
    let du: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("du-kib: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no du in {stdout}"));
    assert!(
        du < 1024,
        "the seeded file is not sparse: {du} KiB allocated"
    );
    assert!(stderr.contains("seeding (2 file(s)"), "{stderr}");
    assert!(
        loop_devices_of(pid).is_empty(),
        "{:?}",
        loop_devices_of(pid)
    );
    assert!(
        mounts_with("/seed ").is_empty(),
        "{:?}",
        mounts_with("/seed ")
    );
}

#[test]
fn seed_sigkill_leaves_no_mount_or_loop_device() {
    let Some(_g) = prepare_seed() else { return };
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let f = dir.path().join("f.img");
    std::fs::write(&f, "x").unwrap();
    // Kill fcvm-testhost while the scratch image is mounted (the test hook holds it there).
    let mut child = testhost(&["-v", "--seed", f.to_str().unwrap()], &["true"])
        .env(fcvm_testhost::seed::PAUSE_ENV, "120000")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut child = Kill(child);
    let t = Instant::now();
    let mut line = String::new();
    let dev = loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "EOF before the seed mount"
        );
        if let Some(rest) = line.strip_prefix("fcvm-testhost: seed: ") {
            if let Some((dev, _)) = rest.split_once(" (autoclear) mounted") {
                break dev.to_string();
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no seed mount in 60 s"
        );
    };
    // While mounted: the loop device is there (so the checks below can see one), the mount
    // is not visible in our namespace.
    assert_eq!(
        loop_devices_of(pid).len(),
        1,
        "{dev}: {:?}",
        loop_devices_of(pid)
    );
    assert!(mounts_with(&dev).is_empty(), "{:?}", mounts_with(&dev));
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let t = Instant::now();
    while !loop_devices_of(pid).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "loop device left after SIGKILL: {:?}",
            loop_devices_of(pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(mounts_with(&dev).is_empty(), "{:?}", mounts_with(&dev));
    assert!(qemu_of(pid).is_empty());
}
