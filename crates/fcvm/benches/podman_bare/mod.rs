//! The same container run as `fcvm podman run`, against bare Firecracker driven by the smallest
//! client that can do it: what a user writing their own client would write.
//!
//! Per run: a reflink (or sparse) copy of the rootfs, two Unix listeners for the agent's status
//! and output ports, a config file and the plan document, then
//! `firecracker --no-api --config-file CFG --metadata PLAN.json` (the VM boots at once, MMDS
//! preloaded with the plan; Firecracker creates the TAP, which goes with it). The client reads
//! the output frames and the status messages, then waits for Firecracker to exit (the agent resets
//! the VM, `reboot=k`) and removes the VM's directory. No API socket, no state store, no fcvm
//! process.
//!
//! From fcvm it takes only what makes the runs the same: the kernel command line, the initrd
//! layout (built once, outside the timed runs; a user would keep one) and the rootfs copy.
//! Everything on the wire is fcvm-proto's.

use std::fs::{self, File};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fcvm_proto::frame::{read_frame, Frame};
use fcvm_proto::plan::{ImageSource, Plan};
use fcvm_proto::status::{read_status, Status};
use fcvm_proto::vsock::{host_listener_path, GUEST_CID, OUTPUT_PORT, STATUS_PORT};

/// How long one run may take before it counts as hung.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// How long Firecracker gets to exit after the exit status.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// What every run boots with.
pub struct Inputs {
    pub firecracker: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub initrd: PathBuf,
    pub archive: PathBuf,
    pub image_ref: String,
    /// fcvm's defaults for `fcvm podman run`.
    pub vcpus: u8,
    pub mem_mib: u32,
}

/// Times from the start of the run (before the rootfs copy).
pub struct Times {
    pub first_stdout: Duration,
    pub exit_status: Duration,
    pub vmm_exited: Duration,
    /// VM directory removed: the run is over.
    pub done: Duration,
}

/// Write the agent initrd once (the same bytes fcvm boots with).
pub fn write_initrd(agent: &Path, dest: &Path) -> std::io::Result<()> {
    fs::write(dest, fcvm::setup::initrd::initrd_bytes(&fs::read(agent)?))
}

enum Event {
    FirstStdout(Instant, Vec<u8>),
    Status(Instant, Status),
    OutputClosed,
}

/// A Firecracker process that is killed if the run fails half-way.
struct Vmm(Option<Child>);

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One cold run of `name` (also the guest hostname, as fcvm sets it) in `dir` (must not
/// exist; short, since socket paths are limited to 108 bytes). `index` makes the TAP name
/// unique.
pub fn run(
    inp: &Inputs,
    dir: &Path,
    name: &str,
    index: usize,
    cmd: &[&str],
) -> Result<Times, String> {
    let start = Instant::now();
    fs::create_dir(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let disk = dir.join("rootfs.ext4");
    fcvm::storage::clone_file(&inp.rootfs, &disk).map_err(|e| format!("rootfs copy: {e}"))?;

    // Guest -> host connections land on `<uds>_<port>`: listen before the guest boots.
    let uds = dir.join("v.sock");
    let bind = |port| {
        let p = host_listener_path(&uds, port);
        UnixListener::bind(&p).map_err(|e| format!("bind {}: {e}", p.display()))
    };
    let status_l = bind(STATUS_PORT)?;
    let output_l = bind(OUTPUT_PORT)?;

    // The plan fcvm builds for `fcvm podman run --image-archive A --name NAME REF -- CMD`.
    let mut plan = Plan::new(ImageSource::Archive {
        device: "/dev/vdb".into(),
        reference: inp.image_ref.clone(),
    });
    plan.cmd = Some(cmd.iter().map(|s| s.to_string()).collect());
    plan.hostname = Some(name.into());
    plan.validate().map_err(|e| e.to_string())?;
    let plan_file = dir.join("plan.json");
    // At most 15 bytes (IFNAMSIZ); Firecracker creates it and it goes with Firecracker.
    let tap = format!("fcb{}x{}", std::process::id(), index % 10_000);
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": inp.kernel,
            "initrd_path": inp.initrd,
            "boot_args": fcvm::commands::podman::BOOT_ARGS,
        },
        "drives": [
            {"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true, "is_read_only": false},
            {"drive_id": "image", "path_on_host": inp.archive, "is_root_device": false, "is_read_only": true},
        ],
        "machine-config": {"vcpu_count": inp.vcpus, "mem_size_mib": inp.mem_mib, "smt": false},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": tap}],
        "vsock": {"guest_cid": GUEST_CID, "uds_path": uds},
        "mmds-config": {"version": "V2", "network_interfaces": ["eth0"]},
    });
    let config_file = dir.join("vm.json");
    let write = |p: &Path, v: &serde_json::Value| {
        fs::write(p, v.to_string()).map_err(|e| format!("write {}: {e}", p.display()))
    };
    write(&config_file, &config)?;
    write(&plan_file, &plan.mmds_document())?;
    let log = dir.join("firecracker.log");
    File::create(&log).map_err(|e| e.to_string())?;
    let console = File::create(dir.join("console.log")).map_err(|e| e.to_string())?;

    let (tx, rx) = mpsc::channel();
    let out_tx = tx.clone();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = output_l.accept() else {
            return;
        };
        let mut first = true;
        while let Ok(Some(frame)) = read_frame(&mut conn) {
            if let Frame::Stdout(b) = frame {
                if first {
                    first = false;
                    let _ = out_tx.send(Event::FirstStdout(Instant::now(), b));
                }
            }
        }
        let _ = out_tx.send(Event::OutputClosed);
    });
    std::thread::spawn(move || {
        let Ok((conn, _)) = status_l.accept() else {
            return;
        };
        let mut r = conn;
        while let Ok(Some(s)) = read_status(&mut r) {
            let _ = tx.send(Event::Status(Instant::now(), s));
        }
    });

    let mut command = Command::new(&inp.firecracker);
    command
        .arg("--no-api")
        .arg("--config-file")
        .arg(&config_file)
        .arg("--metadata")
        .arg(&plan_file)
        .arg("--log-path")
        .arg(&log)
        .arg("--level")
        .arg("Info")
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(Stdio::null());
    // SAFETY: prctl(PR_SET_PDEATHSIG) in the forked child takes integers only; it makes
    // Firecracker die with the bench if the bench dies.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut vmm = Vmm(Some(command.spawn().map_err(|e| format!("spawn: {e}"))?));

    let deadline = start + RUN_TIMEOUT;
    let (mut first, mut exit, mut output_closed) = (None, None, false);
    while exit.is_none() || !output_closed {
        let ev = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(ev) => ev,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let child = vmm.0.as_mut().expect("running");
                if let Ok(Some(st)) = child.try_wait() {
                    return Err(failure(dir, &format!("firecracker exited early ({st})")));
                }
                if Instant::now() > deadline {
                    return Err(failure(dir, "timed out"));
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(failure(dir, "the guest closed both streams early"))
            }
        };
        match ev {
            Event::FirstStdout(t, bytes) => first = Some((t, bytes)),
            Event::Status(t, Status::Exit(code)) => exit = Some((t, code)),
            Event::Status(_, Status::Error(e)) => return Err(failure(dir, &e)),
            Event::Status(_, _) => {}
            Event::OutputClosed => output_closed = true,
        }
    }
    let (exit_t, code) = exit.expect("loop ends with it");
    let child = vmm.0.as_mut().expect("running");
    let grace = Instant::now() + EXIT_GRACE;
    while !matches!(child.try_wait(), Ok(Some(_))) {
        if Instant::now() > grace {
            return Err(failure(
                dir,
                "firecracker did not exit after the container did",
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    vmm.0 = None;
    let vmm_exited = start.elapsed();
    fs::remove_dir_all(dir).map_err(|e| e.to_string())?;
    let done = start.elapsed();
    let Some((first_t, bytes)) = first else {
        return Err(format!("no output (exit {code})"));
    };
    if code != 0 || !bytes.starts_with(b"hello") {
        return Err(format!(
            "exit {code}, first output {:?}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    Ok(Times {
        first_stdout: first_t - start,
        exit_status: exit_t - start,
        vmm_exited,
        done,
    })
}

fn failure(dir: &Path, what: &str) -> String {
    let tail = |f: &str| {
        let text = fs::read_to_string(dir.join(f)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    format!(
        "bare run failed: {what}\nconsole:\n{}\nfirecracker log:\n{}",
        tail("console.log"),
        tail("firecracker.log")
    )
}
