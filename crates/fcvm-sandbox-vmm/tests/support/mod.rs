//! Test harness playing the fcvm host against the stand-in VMM: it configures the VMM through
//! the Firecracker API, puts the plan in MMDS, listens on the hybrid-vsock ports and talks to
//! the real agent, exactly as `fcvm` does with Firecracker.
//!
//! Needs root, loop devices, a guest rootfs image (`FCVM_TEST_ROOTFS`), and busybox-static.
//! The agent binary comes from `FCVM_AGENT_BIN` or is built static on first use.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use fcvm_proto::frame::tokio_io::{read_frame, write_frame};
use fcvm_proto::frame::Frame;
use fcvm_proto::plan::Plan;
use fcvm_proto::status::Status;
use fcvm_proto::vsock::{host_listener_path, EXEC_PORT, INPUT_PORT, OUTPUT_PORT, STATUS_PORT};
use fcvm_sandbox_vmm::testimage::{build_busybox_archive, ImageArchive, DEFAULT_BUSYBOX};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Shared, built once per test binary.
pub struct Assets {
    pub dir: PathBuf,
    pub initrd: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub image: ImageArchive,
}

static ASSETS: OnceLock<Result<Assets, String>> = OnceLock::new();

/// Returns the assets, or prints `SKIPPED: why` and returns None when a facility is missing.
pub fn assets() -> Option<&'static Assets> {
    match ASSETS.get_or_init(build_assets) {
        Ok(a) => Some(a),
        Err(why) => {
            // CI provides every facility: a skip there would hide a broken setup.
            if std::env::var_os("CI").is_some() {
                panic!("sandbox test facility missing under CI: {why}");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

fn build_assets() -> Result<Assets, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("sandbox tests need root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control (modprobe loop)".into());
    }
    let rootfs = std::env::var_os("FCVM_TEST_ROOTFS").map(PathBuf::from).ok_or(
        "FCVM_TEST_ROOTFS is not set: build a guest rootfs (see crates/fcvm-sandbox-vmm/README.md) and point it there",
    )?;
    if !rootfs.exists() {
        return Err(format!(
            "FCVM_TEST_ROOTFS={} does not exist",
            rootfs.display()
        ));
    }
    if !Path::new(DEFAULT_BUSYBOX).exists() {
        return Err(format!(
            "{DEFAULT_BUSYBOX} missing (apt-get install busybox-static)"
        ));
    }
    let agent = agent_binary()?;
    // Build outputs, not per-run scratch: kept in cargo's test tmpdir and reused; every file
    // is written under a temporary name and renamed, so parallel test binaries never clash.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sandbox-assets");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(&agent).map_err(|e| format!("{}: {e}", agent.display()))?;
    let cpio = fcvm_proto::initrd::write_newc(&[fcvm_proto::initrd::Entry::File {
        name: "init",
        mode: 0o755,
        data: &bytes,
    }]);
    let initrd = dir.join("initrd.cpio");
    let tmp = dir.join(format!("initrd.cpio.tmp.{}", std::process::id()));
    std::fs::write(&tmp, cpio).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, &initrd).map_err(|e| e.to_string())?;
    let kernel = dir.join("vmlinux-unused");
    std::fs::write(&kernel, b"").map_err(|e| e.to_string())?;
    let image = build_busybox_archive(
        Path::new(DEFAULT_BUSYBOX),
        &dir.join("busybox.oci.tar"),
        "fcvm-test-busybox",
        "1",
    )
    .map_err(|e| e.to_string())?;
    Ok(Assets {
        dir,
        initrd,
        kernel,
        rootfs,
        image,
    })
}

/// `FCVM_AGENT_BIN`, or a static release build of fc-agent made now (gnu target, crt-static).
fn agent_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("FCVM_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let target_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/agent-static");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| PathBuf::from(d).join("agent-static"))
        .unwrap_or(target_dir);
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "-p",
                "fc-agent",
                "--target",
                "x86_64-unknown-linux-gnu",
                "--target-dir",
            ])
            .arg(&target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .map_err(|e| format!("cannot run cargo to build fc-agent: {e}"))?;
    if !status.success() {
        return Err("building fc-agent failed".into());
    }
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/fc-agent"))
}

/// Waits until the API socket accepts connections.
pub async fn wait_for_api(sock: &Path) {
    for _ in 0..1000 {
        if UnixStream::connect(sock).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "the VMM API socket {} never accepted connections",
        sock.display()
    );
}

/// Minimal HTTP/1.1 request over the API socket; returns (status, body).
pub async fn api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, String) {
    let mut s = UnixStream::connect(sock)
        .await
        .expect("connect to the API socket");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_owned())
}

/// One VM under test.
pub struct Vm {
    pub dir: tempfile::TempDir,
    pub api_sock: PathBuf,
    pub uds: PathBuf,
    pub vmm: Child,
    pub vmm_pid: u32,
    pub status: mpsc::UnboundedReceiver<Status>,
    pub output: Option<tokio::task::JoinHandle<(Vec<u8>, Vec<u8>)>>,
    pub input: Option<tokio::task::JoinHandle<UnixStream>>,
    pub console: tokio::task::JoinHandle<String>,
    pub started: std::time::Instant,
}

/// What the VM produced.
#[derive(Debug)]
pub struct RunResult {
    pub stdout: String,
    pub stderr: String,
    pub statuses: Vec<Status>,
    pub exit: Option<i32>,
    pub console: String,
}

impl Vm {
    /// Configures a VMM and starts the plan. `plan.image` should be the test archive.
    pub async fn boot(a: &Assets, plan: &Plan) -> Vm {
        let dir = tempfile::Builder::new()
            .prefix("fcvm-sbx-")
            .tempdir_in("/tmp")
            .unwrap();
        let rootfs = dir.path().join("rootfs.ext4");
        let st = std::process::Command::new("cp")
            .arg("--sparse=always")
            .arg(&a.rootfs)
            .arg(&rootfs)
            .status()
            .unwrap();
        assert!(st.success(), "copying the rootfs failed");
        let api_sock = dir.path().join("api.sock");
        let uds = dir.path().join("v.sock");
        let started = std::time::Instant::now();
        let mut vmm = Command::new(env!("CARGO_BIN_EXE_fcvm-sandbox-vmm"))
            .arg("--api-sock")
            .arg(&api_sock)
            .arg("--id")
            .arg("test")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the sandbox VMM");
        let vmm_pid = vmm.id().unwrap_or(0);
        let mut out = vmm.stdout.take().unwrap();
        let console = tokio::spawn(async move {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s).await;
            s
        });
        wait_for_api(&api_sock).await;

        // Host-side listeners must exist before the guest connects.
        let status_l = UnixListener::bind(host_listener_path(&uds, STATUS_PORT)).unwrap();
        let output_l = UnixListener::bind(host_listener_path(&uds, OUTPUT_PORT)).unwrap();
        let input_l = (plan.interactive || plan.tty)
            .then(|| UnixListener::bind(host_listener_path(&uds, INPUT_PORT)).unwrap());
        let (tx, status) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let Ok((s, _)) = status_l.accept().await else {
                return;
            };
            let mut lines = tokio::io::BufReader::new(s);
            let mut line = String::new();
            use tokio::io::AsyncBufReadExt;
            while lines.read_line(&mut line).await.unwrap_or(0) > 0 {
                if let Ok(st) = Status::parse(&line) {
                    let _ = tx.send(st);
                }
                line.clear();
            }
        });
        let output = tokio::spawn(async move {
            let (mut o, mut e) = (Vec::new(), Vec::new());
            let Ok((mut s, _)) = output_l.accept().await else {
                return (o, e);
            };
            while let Ok(Some(f)) = read_frame(&mut s).await {
                match f {
                    Frame::Stdout(b) => o.extend(b),
                    Frame::Stderr(b) => e.extend(b),
                    other => panic!("unexpected output frame {other:?}"),
                }
            }
            (o, e)
        });
        let input = input_l.map(|l| tokio::spawn(async move { l.accept().await.unwrap().0 }));

        let ok = |r: (u16, String), what: &str| assert_eq!(r.0, 204, "{what}: {}", r.1);
        let p = |x: &Path| x.display().to_string();
        ok(
            api(
                &api_sock,
                "PUT",
                "/boot-source",
                Some(serde_json::json!({
            "kernel_image_path": p(&a.kernel), "initrd_path": p(&a.initrd),
            "boot_args": "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw fcvm.debug=1"})),
            )
            .await,
            "boot-source",
        );
        ok(
            api(
                &api_sock,
                "PUT",
                "/machine-config",
                Some(serde_json::json!({"vcpu_count": 1, "mem_size_mib": 512})),
            )
            .await,
            "machine-config",
        );
        ok(api(&api_sock, "PUT", "/drives/rootfs", Some(serde_json::json!({
            "drive_id": "rootfs", "path_on_host": p(&rootfs), "is_root_device": true, "is_read_only": false}))).await, "root drive");
        ok(api(&api_sock, "PUT", "/drives/image", Some(serde_json::json!({
            "drive_id": "image", "path_on_host": p(&a.image.path), "is_root_device": false, "is_read_only": true}))).await, "image drive");
        ok(
            api(
                &api_sock,
                "PUT",
                "/vsock",
                Some(serde_json::json!({"guest_cid": 3, "uds_path": p(&uds)})),
            )
            .await,
            "vsock",
        );
        ok(
            api(
                &api_sock,
                "PUT",
                "/mmds/config",
                Some(serde_json::json!({"version": "V2", "network_interfaces": ["eth0"]})),
            )
            .await,
            "mmds config",
        );
        ok(
            api(&api_sock, "PUT", "/mmds", Some(plan.mmds_document())).await,
            "mmds",
        );
        ok(
            api(
                &api_sock,
                "PUT",
                "/actions",
                Some(serde_json::json!({"action_type": "InstanceStart"})),
            )
            .await,
            "InstanceStart",
        );
        Vm {
            dir,
            api_sock,
            uds,
            vmm,
            vmm_pid,
            status,
            output: Some(output),
            input,
            console,
            started,
        }
    }

    /// Waits for a status message.
    pub async fn next_status(&mut self, timeout: Duration) -> Option<Status> {
        tokio::time::timeout(timeout, self.status.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for `ready`, failing with the console output otherwise.
    pub async fn wait_ready(&mut self) {
        match self.next_status(Duration::from_secs(60)).await {
            Some(Status::Ready) => {}
            other => panic!("expected ready, got {other:?}"),
        }
    }

    /// The connection for `-i`/`-t` input.
    pub async fn input_conn(&mut self) -> UnixStream {
        let h = self.input.take().expect("plan without -i/-t");
        tokio::time::timeout(Duration::from_secs(60), h)
            .await
            .expect("agent connects to the input port")
            .unwrap()
    }

    /// Opens an exec connection (`CONNECT 4998`) and sends the request.
    pub async fn exec(&self, req: fcvm_proto::exec::ExecRequest) -> UnixStream {
        let mut s = UnixStream::connect(&self.uds).await.unwrap();
        s.write_all(fcvm_proto::vsock::connect_line(EXEC_PORT).as_bytes())
            .await
            .unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            assert_eq!(
                s.read(&mut b).await.unwrap(),
                1,
                "VMM closed the CONNECT without OK"
            );
            line.push(b[0]);
        }
        fcvm_proto::vsock::parse_ok_line(&String::from_utf8_lossy(&line)).unwrap();
        write_frame(&mut s, &Frame::Exec(req)).await.unwrap();
        s
    }

    /// Waits for the VM to end and collects everything.
    pub async fn finish(mut self) -> RunResult {
        let mut statuses = Vec::new();
        let mut exit = None;
        while let Some(s) = self.next_status(Duration::from_secs(90)).await {
            if let Status::Exit(c) = s {
                exit = Some(c);
            }
            statuses.push(s);
            if exit.is_some() {
                break;
            }
        }
        let (o, e) = match self.output.take() {
            Some(h) => tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default(),
            None => Default::default(),
        };
        let st = tokio::time::timeout(Duration::from_secs(60), self.vmm.wait()).await;
        let console = tokio::time::timeout(Duration::from_secs(5), self.console)
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        let st = st
            .unwrap_or_else(|_| {
                panic!("VMM did not exit after the guest ended; console:\n{console}")
            })
            .unwrap();
        assert_eq!(st.code(), Some(0), "VMM exit status; console:\n{console}");
        if std::env::var_os("FCVM_TEST_SHOW_CONSOLE").is_some() {
            eprintln!(
                "--- console ({:?} from VMM start to exit) ---\n{console}",
                self.started.elapsed()
            );
        }
        assert_nothing_left(self.vmm_pid, self.dir.path()).await;
        RunResult {
            stdout: String::from_utf8_lossy(&o).into_owned(),
            stderr: String::from_utf8_lossy(&e).into_owned(),
            statuses,
            exit,
            console,
        }
    }
}

/// Asserts that a finished VMM left no processes, cgroups, loop devices or files behind.
pub async fn assert_nothing_left(vmm_pid: u32, dir: &Path) {
    assert_left(vmm_pid, dir, true).await
}

/// Like [`assert_nothing_left`]; `cgroups: false` skips the cgroup directories (a SIGKILLed VMM
/// cannot remove them; the next VMM start collects them).
pub async fn assert_left(vmm_pid: u32, dir: &Path, cgroups: bool) {
    let tag = format!("{}{vmm_pid}-", fcvm_sandbox_vmm::cgroup::PREFIX);
    let mut last = String::new();
    for _ in 0..500 {
        last.clear();
        // Processes still in the sandbox's cgroups.
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cg) = std::fs::read_to_string(e.path().join("cgroup")) {
                if cg.contains(&tag) {
                    last.push_str(&format!(
                        "process {} still in {tag}\n",
                        e.file_name().to_string_lossy()
                    ));
                }
            }
        }
        // Cgroup directories.
        let out = std::process::Command::new("find")
            .args(["/sys/fs/cgroup", "-maxdepth", "4", "-name"])
            .arg(format!("{tag}*"))
            .output()
            .unwrap();
        if cgroups && !out.stdout.is_empty() {
            last.push_str(&format!(
                "cgroups left: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        // Loop devices backed by files of this VM.
        for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
                if b.trim().starts_with(&dir.display().to_string()) {
                    last.push_str(&format!(
                        "loop device {} still backed by {}\n",
                        e.file_name().to_string_lossy(),
                        b.trim()
                    ));
                }
            }
        }
        if cgroups
            && std::env::temp_dir()
                .join(format!(
                    "{}{vmm_pid}",
                    fcvm_sandbox_vmm::vmm::WORKDIR_PREFIX
                ))
                .exists()
        {
            last.push_str("sandbox work dir left\n");
        }
        if last.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("left behind after 10 s:\n{last}");
}

/// Reads exec frames until Exit; returns (stdout, stderr, exit code).
pub async fn collect_exec(s: &mut UnixStream) -> (String, String, i32) {
    let (mut o, mut e) = (Vec::new(), Vec::new());
    loop {
        match tokio::time::timeout(Duration::from_secs(20), read_frame(s))
            .await
            .expect("exec timed out")
        {
            Ok(Some(Frame::Stdout(b))) => o.extend(b),
            Ok(Some(Frame::Stderr(b))) => e.extend(b),
            Ok(Some(Frame::Exit(c))) => {
                return (
                    String::from_utf8_lossy(&o).into(),
                    String::from_utf8_lossy(&e).into(),
                    c,
                )
            }
            other => panic!(
                "unexpected exec frame {other:?}; stdout so far {:?}",
                String::from_utf8_lossy(&o)
            ),
        }
    }
}
