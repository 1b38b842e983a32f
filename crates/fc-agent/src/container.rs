//! The container: image preparation and the podman command lines.

use std::path::Path;
use std::process::Command;

use fcvm_proto::exec::ExecRequest;
use fcvm_proto::plan::{ImageSource, Plan, CONTAINER_NAME};

use crate::reaper;

/// podman configuration for a guest without systemd: cgroupfs manager, no journald events.
/// Written at boot and selected with `CONTAINERS_CONF` for everything the agent starts.
/// `tmp_dir` is root's default, pinned because conmon's exit files are found beneath it
/// ([`exit_code_after_podman_was_killed`]).
pub const CONTAINERS_CONF: &str = "\
[engine]
cgroup_manager = \"cgroupfs\"
events_logger = \"none\"
tmp_dir = \"/run/libpod\"
[containers]
log_driver = \"none\"
";

/// The datagram socket podman's conmon notifies when the container has started.
pub const NOTIFY_SOCKET_PATH: &str = "/run/fcvm/notify.sock";

/// podman's run directory ([`CONTAINERS_CONF`]'s `tmp_dir`); conmon writes each container's
/// exit code to `exits/<container id>` beneath it.
const PODMAN_TMP_DIR: &str = "/run/libpod";

/// Where `podman run` writes the container's ID (`--cidfile`), to find conmon's exit file.
/// podman refuses to start if it exists: the agent removes it first.
pub const CIDFILE_PATH: &str = "/run/fcvm/container.id";

/// Where [`CONTAINERS_CONF`] is written.
pub const CONTAINERS_CONF_PATH: &str = "/run/fcvm/containers.conf";

/// Errors preparing the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// podman could not be started.
    #[error("Cannot run podman (is it in the rootfs?): {0}")]
    Spawn(std::io::Error),
    /// `podman load` failed.
    #[error("podman load -i {device} failed (exit {code}): {stderr}")]
    Load {
        /// Device.
        device: String,
        /// Exit code.
        code: i32,
        /// podman's error output.
        stderr: String,
    },
    /// `podman load` succeeded but named no image and the plan gave none.
    #[error("podman load -i {0} reported no image name and the plan gives no reference")]
    NoName(String),
    /// `podman image inspect` failed.
    #[error("podman image inspect {image} failed (exit {code}): {stderr}")]
    Inspect {
        /// Image.
        image: String,
        /// Exit code.
        code: i32,
        /// podman's error output.
        stderr: String,
    },
    /// `podman pull` failed.
    #[error("podman pull {reference} failed (exit {code}): {stderr}")]
    Pull {
        /// Reference.
        reference: String,
        /// Exit code.
        code: i32,
        /// podman's error output.
        stderr: String,
    },
}

/// Makes the plan's image available in local storage; returns the reference to run.
/// `progress` gets each line of `podman pull`'s progress output as podman writes it.
pub fn prepare_image(plan: &Plan, progress: &mut dyn FnMut(&str)) -> Result<String, ImageError> {
    match &plan.image {
        ImageSource::Archive { device, reference } => {
            let out = reaper::run(Command::new("podman").args(["load", "-q", "-i", device]))
                .map_err(ImageError::Spawn)?;
            if out.code != 0 {
                return Err(ImageError::Load {
                    device: device.clone(),
                    code: out.code,
                    stderr: out.stderr.trim().to_owned(),
                });
            }
            if !reference.is_empty() {
                return Ok(reference.clone());
            }
            loaded_name(&out.stdout).ok_or_else(|| ImageError::NoName(device.clone()))
        }
        ImageSource::Registry {
            reference,
            tls_verify,
        } => {
            let exists = reaper::run(Command::new("podman").args(["image", "exists", reference]))
                .map_err(ImageError::Spawn)?;
            if exists.code == 0 {
                return Ok(reference.clone());
            }
            // Not -q: podman's progress lines (on stderr, without bars since it is a pipe)
            // are what the host shows. The proxy variables are podman's for the pull.
            let out = reaper::run_lines(
                Command::new("podman")
                    .args(pull_args(reference, *tls_verify))
                    .envs(&plan.proxy),
                |line| {
                    crate::debug!("pull: {line}");
                    progress(line);
                },
            )
            .map_err(ImageError::Spawn)?;
            if out.code != 0 {
                return Err(ImageError::Pull {
                    reference: reference.clone(),
                    code: out.code,
                    stderr: pull_reason(&out.stderr),
                });
            }
            Ok(reference.clone())
        }
    }
}

/// Arguments of `podman pull` (after `podman`).
pub fn pull_args(reference: &str, tls_verify: bool) -> Vec<String> {
    let mut a = vec!["pull".to_owned()];
    if !tls_verify {
        a.push("--tls-verify=false".into());
    }
    a.push(reference.to_owned());
    a
}

/// Why a pull failed, in podman's words: its `Error:` lines (the progress lines before them
/// say nothing about the failure), or all it wrote when there is none.
pub fn pull_reason(stderr: &str) -> String {
    let errors: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Error:") || l.starts_with("Error "))
        .collect();
    if errors.is_empty() {
        stderr.trim().to_owned()
    } else {
        errors.join("\n")
    }
}

/// The image id (`sha256:<hex>`) of a loaded image, as podman reports it.
pub fn image_id(image: &str) -> Result<String, ImageError> {
    let out = reaper::run(
        Command::new("podman").args(["image", "inspect", "--format", "{{.Id}}", image]),
    )
    .map_err(ImageError::Spawn)?;
    let id = out.stdout.trim();
    if out.code != 0 || id.is_empty() {
        return Err(ImageError::Inspect {
            image: image.to_owned(),
            code: out.code,
            stderr: out.stderr.trim().to_owned(),
        });
    }
    Ok(if id.contains(':') {
        id.to_owned()
    } else {
        format!("sha256:{id}")
    })
}

/// The first image name in `podman load` output (`Loaded image: NAME` or `Loaded image(s): A,B`).
pub fn loaded_name(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        let (_, rest) = l.split_once(':')?;
        let first = rest.split(',').next()?.trim();
        (l.starts_with("Loaded image") && !first.is_empty()).then(|| first.to_owned())
    })
}

/// Arguments of `podman run` for the plan (after `podman`).
pub fn run_args(plan: &Plan, image: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--name",
        CONTAINER_NAME,
        "--network=host",
        "--pull=never",
        // conmon sends READY=1 to $NOTIFY_SOCKET once the container runs (see agent.rs).
        "--sdnotify=conmon",
    ]
    .map(String::from)
    .to_vec();
    a.push(format!("--cidfile={CIDFILE_PATH}"));
    if plan.interactive {
        a.push("-i".into());
    }
    if plan.tty {
        a.push("-t".into());
    }
    for (k, v) in &plan.env {
        a.push("-e".into());
        a.push(format!("{k}={v}"));
    }
    if let Some(w) = &plan.workdir {
        a.push(format!("--workdir={w}"));
    }
    if let Some(u) = &plan.user {
        a.push(format!("--user={u}"));
    }
    if let Some(h) = &plan.hostname {
        a.push(format!("--hostname={h}"));
    }
    if let Some(e) = &plan.entrypoint {
        a.push(format!("--entrypoint={e}"));
    }
    if plan.init {
        a.push("--init".into());
    }
    if plan.privileged {
        a.push("--privileged".into());
    }
    for (k, v) in &plan.labels {
        a.push(format!("--label={k}={v}"));
    }
    for (i, v) in plan.volumes.iter().enumerate() {
        let ro = if v.read_only { ":ro" } else { "" };
        a.push(format!(
            "--volume={}:{}{ro}",
            crate::volume::staging(i),
            v.guest_path
        ));
    }
    a.push(image.to_owned());
    if let Some(cmd) = &plan.cmd {
        a.extend(cmd.iter().cloned());
    }
    a
}

/// The container's own exit code, once `podman run` has been killed (a second stop signal)
/// and so could not report it. On a loaded machine podman's own clean-up after the container
/// exited can outlast the stop grace; the container's code is then conmon's record of it
/// (`exits/<id>` beneath podman's run directory) or, once podman's clean-up process has
/// moved that record into its database and removed the file, the container's state there.
/// None: the container had not exited (it is killed with the VM: 137 is right then).
pub fn exit_code_after_podman_was_killed() -> Option<i32> {
    if let Some(code) = exit_code_in(
        Path::new(CIDFILE_PATH),
        &Path::new(PODMAN_TMP_DIR).join("exits"),
    ) {
        return Some(code);
    }
    let out = reaper::run(Command::new("podman").args([
        "container",
        "inspect",
        "--format",
        "{{.State.Status}} {{.State.ExitCode}}",
        CONTAINER_NAME,
    ]))
    .ok()?;
    (out.code == 0).then(|| exited_code(&out.stdout)).flatten()
}

/// The code in `exits/<id>` for the container ID in `cidfile`. conmon writes the file whole
/// (write, then rename), so a partial read is not a concern; no file, no code.
fn exit_code_in(cidfile: &Path, exits: &Path) -> Option<i32> {
    let id = std::fs::read_to_string(cidfile).ok()?;
    let id = id.trim();
    // An ID is hex; anything else must not become a path beneath `exits`.
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    std::fs::read_to_string(exits.join(id))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The exit code in `podman container inspect`'s `STATUS CODE`, when the status says the
/// container has exited.
fn exited_code(inspect: &str) -> Option<i32> {
    let (status, code) = inspect.trim().split_once(' ')?;
    (status == "exited" || status == "stopped")
        .then(|| code.parse().ok())
        .flatten()
}

/// Sends signal `n` to the container's main process (`podman kill`), in the background: the
/// input stream keeps flowing meanwhile.
pub fn kill(n: i32) {
    std::thread::spawn(move || {
        let out = reaper::run(Command::new("podman").args([
            "kill",
            "--signal",
            &n.to_string(),
            CONTAINER_NAME,
        ]));
        match out {
            Ok(o) if o.code == 0 => crate::debug!("signal {n} sent to the container"),
            Ok(o) => crate::info!("podman kill --signal {n} failed: {}", o.stderr.trim()),
            Err(e) => crate::info!("cannot run podman kill: {e}"),
        }
    });
}

/// The command for an exec request: `podman exec` into the container, or the program itself.
pub fn exec_command(req: &ExecRequest) -> Command {
    if req.in_container {
        let mut c = Command::new("podman");
        c.arg("exec");
        if req.interactive {
            c.arg("-i");
        }
        if req.tty {
            c.arg("-t");
        }
        for (k, v) in &req.env {
            c.arg("-e").arg(format!("{k}={v}"));
        }
        if let Some(w) = &req.workdir {
            c.arg(format!("--workdir={w}"));
        }
        c.arg(CONTAINER_NAME).args(&req.command);
        c
    } else {
        let mut c = Command::new(&req.command[0]);
        c.args(&req.command[1..]).envs(&req.env);
        if req.tty && !req.env.contains_key("TERM") {
            c.env("TERM", "xterm-256color");
        }
        if let Some(w) = &req.workdir {
            c.current_dir(w);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fcvm_proto::plan::ImageSource;

    #[test]
    fn load_output_names() {
        assert_eq!(
            loaded_name("Loaded image: localhost/bb:1\n").as_deref(),
            Some("localhost/bb:1")
        );
        assert_eq!(
            loaded_name("Loaded image(s): a:1,b:2\n").as_deref(),
            Some("a:1")
        );
        assert_eq!(loaded_name("Getting image source signatures\n"), None);
        assert_eq!(loaded_name("Loaded image: \n"), None);
    }

    #[test]
    fn pull_flags_and_podman_s_reason() {
        assert_eq!(pull_args("r/a:1", true), ["pull", "r/a:1"]);
        assert_eq!(
            pull_args("r/a:1", false),
            ["pull", "--tls-verify=false", "r/a:1"]
        );
        let stderr = "Trying to pull r/a:1...\nError: initializing source docker://r/a:1: \
                      reading manifest 1 in r/a: manifest unknown\n";
        assert_eq!(
            pull_reason(stderr),
            "Error: initializing source docker://r/a:1: reading manifest 1 in r/a: manifest unknown"
        );
        assert_eq!(pull_reason(" something else \n"), "something else");
    }

    #[test]
    fn conmon_exit_file_gives_the_container_code() {
        let dir = tempfile::tempdir().unwrap();
        let (cid, exits) = (dir.path().join("cid"), dir.path().join("exits"));
        std::fs::create_dir(&exits).unwrap();
        // No container ID yet, then an ID whose container has not exited.
        assert_eq!(exit_code_in(&cid, &exits), None);
        std::fs::write(&cid, "ab12cd\n").unwrap();
        assert_eq!(exit_code_in(&cid, &exits), None);
        std::fs::write(exits.join("ab12cd"), "143").unwrap();
        assert_eq!(exit_code_in(&cid, &exits), Some(143));
        std::fs::write(exits.join("ab12cd"), "garbage").unwrap();
        assert_eq!(exit_code_in(&cid, &exits), None);
        // An ID that is not hex never names a path.
        std::fs::write(dir.path().join("x"), "3").unwrap();
        std::fs::write(&cid, "../x").unwrap();
        assert_eq!(exit_code_in(&cid, &exits), None);
    }

    #[test]
    fn inspect_state_gives_a_code_only_once_exited() {
        assert_eq!(exited_code("exited 42\n"), Some(42));
        assert_eq!(exited_code("stopped 143"), Some(143));
        assert_eq!(exited_code("running 0"), None);
        assert_eq!(exited_code("exited"), None);
        assert_eq!(exited_code(""), None);
    }

    #[test]
    fn run_args_order_and_flags() {
        let mut p = Plan::new(ImageSource::registry("x"));
        p.tty = true;
        p.env.insert("A".into(), "1 2".into());
        p.cmd = Some(vec!["sh".into(), "-c".into(), "exit 3".into()]);
        let a = run_args(&p, "localhost/x:1");
        let img = a.iter().position(|s| s == "localhost/x:1").unwrap();
        assert_eq!(&a[img + 1..], ["sh", "-c", "exit 3"]);
        assert!(a[..img].contains(&"-t".to_string()));
        assert!(!a.contains(&"-i".to_string()));
        assert!(a.contains(&"A=1 2".to_string()));
        assert!(a[..img].contains(&format!("--cidfile={CIDFILE_PATH}")));
        for absent in [
            "--init",
            "--privileged",
            "--user",
            "--workdir",
            "--entrypoint",
        ] {
            assert!(
                !a.iter().any(|s| s.starts_with(absent)),
                "{absent} in {a:?}"
            );
        }
    }

    #[test]
    fn volumes_are_bind_mounts_of_their_staging_dirs() {
        let mut p = Plan::new(ImageSource::registry("x"));
        p.volumes = vec![
            fcvm_proto::plan::Volume {
                guest_path: "/data".into(),
                vsock_port: 5100,
                read_only: false,
            },
            fcvm_proto::plan::Volume {
                guest_path: "/etc/conf".into(),
                vsock_port: 5101,
                read_only: true,
            },
        ];
        let a = run_args(&p, "img");
        let img = a.iter().position(|s| s == "img").unwrap();
        let vols: Vec<&String> = a[..img]
            .iter()
            .filter(|s| s.starts_with("--volume="))
            .collect();
        assert_eq!(
            vols,
            [
                "--volume=/run/fcvm/volumes/0:/data",
                "--volume=/run/fcvm/volumes/1:/etc/conf:ro"
            ]
        );
    }

    #[test]
    fn run_flags_reach_podman_before_the_image() {
        let mut p = Plan::new(ImageSource::registry("x"));
        p.user = Some("1000".into());
        p.workdir = Some("/tmp".into());
        p.entrypoint = Some("/bin/sh".into());
        p.init = true;
        p.privileged = true;
        p.labels.insert("app".into(), "web=1".into());
        p.cmd = Some(vec!["-c".into(), "id -u".into()]);
        let a = run_args(&p, "img");
        let img = a.iter().position(|s| s == "img").unwrap();
        assert_eq!(&a[img + 1..], ["-c", "id -u"]);
        for flag in [
            "--user=1000",
            "--workdir=/tmp",
            "--entrypoint=/bin/sh",
            "--init",
            "--privileged",
            "--label=app=web=1",
        ] {
            assert!(a[..img].contains(&flag.to_string()), "{flag} in {a:?}");
        }
    }

    #[test]
    fn exec_in_vm_vs_container() {
        let mut r = ExecRequest {
            command: vec!["ls".into(), "/".into()],
            ..Default::default()
        };
        assert_eq!(exec_command(&r).get_program(), "ls");
        r.in_container = true;
        r.tty = true;
        let c = exec_command(&r);
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args, ["exec", "-t", CONTAINER_NAME, "ls", "/"]);
    }
}
