//! `fcvm podman run` and `fcvm exec`: containers in microVMs.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::commands::exec::{self, ExecOptions, Target};
use crate::commands::podman::{self, PodmanRunRequest};
use crate::paths::Paths;

/// `fcvm podman ...`.
#[derive(Debug, Subcommand)]
pub enum PodmanCommand {
    /// Run a container in a new microVM, in the foreground; exits with the container's code.
    Run(PodmanRunArgs),
}

/// `fcvm podman run`.
#[derive(Debug, Args)]
pub struct PodmanRunArgs {
    /// VM name (letters, digits, '-', '_', '.'); unique among running VMs.
    #[arg(long)]
    pub name: String,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpu: u32,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem: u64,
    /// Environment variable NAME=VALUE for the container; repeat it, or join with commas
    /// (A=1,B=2).
    #[arg(short, long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Keep standard input open and forward it to the container.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the container a terminal (window size forwarded; with -i the local terminal
    /// goes raw, without -i Ctrl-C is forwarded to the container as SIGINT).
    #[arg(short, long)]
    pub tty: bool,
    /// Command as one string, split like a shell would (no expansion); instead of `-- CMD...`.
    #[arg(long, value_name = "COMMAND")]
    pub cmd: Option<String>,
    /// Seconds the container gets to exit after Ctrl-C, SIGTERM or SIGHUP asked it to stop,
    /// before it is killed (as podman's --stop-timeout).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub stop_timeout: u64,
    /// OCI or docker archive (`podman save`) to run; attached read-only to the VM.
    #[arg(long, value_name = "FILE")]
    pub image_archive: Option<PathBuf>,
    /// Guest kernel: a path, or `probe` (default: the one from `fcvm setup kernel`).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Guest root filesystem image (default: `fcvm setup rootfs`'s; env FCVM_ROOTFS).
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// Boot cold: neither restore nor create an image cache entry (env FCVM_NO_SNAPSHOT=1).
    #[arg(long)]
    pub no_snapshot: bool,
    /// Image: a registry reference, `localhost/NAME:TAG` from this host's podman storage,
    /// or with --image-archive the reference to run from the archive.
    #[arg(required_unless_present = "image_archive")]
    pub image: Option<String>,
    /// Command and arguments (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// `fcvm exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// VM name.
    #[arg(long, required_unless_present = "pid", conflicts_with = "pid")]
    pub name: Option<String>,
    /// Select the VM by the pid of its fcvm (or VMM) process.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Run in the VM itself instead of the container.
    #[arg(long)]
    pub vm: bool,
    /// Forward standard input.
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a terminal (raw mode here, window size forwarded).
    #[arg(short, long)]
    pub tty: bool,
    /// Extra environment variable NAME=VALUE (repeatable, comma lists).
    #[arg(short, long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Command and arguments (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Dispatch `fcvm podman`.
pub async fn podman(paths: &Paths, cmd: PodmanCommand) -> Result<ExitCode> {
    match cmd {
        PodmanCommand::Run(a) => run(paths, a).await,
    }
}

async fn run(paths: &Paths, a: PodmanRunArgs) -> Result<ExitCode> {
    let req = PodmanRunRequest {
        name: a.name,
        image: a.image,
        image_archive: a.image_archive,
        command: a.command,
        cmd: a.cmd,
        env: a.env,
        vcpus: a.cpu,
        mem_mib: a.mem,
        interactive: a.interactive,
        tty: a.tty,
        kernel: a.kernel,
        rootfs: a.rootfs,
        stop_timeout: Duration::from_secs(a.stop_timeout),
        no_snapshot: a.no_snapshot,
    };
    let outcome = match podman::run(paths, &req).await {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fcvm: error: {}", crate::report::chain(&e));
            return Ok(ExitCode::from(e.exit_code()));
        }
    };
    std::io::stdout().flush()?;
    if let Some(err) = &outcome.guest_error {
        eprintln!("fcvm: error: the container could not run: {err}");
    }
    if outcome.interrupted.is_some() {
        eprintln!("fcvm: interrupted; container and VM {} stopped", req.name);
    }
    Ok(ExitCode::from(outcome.exit_code.clamp(0, 255) as u8))
}

/// Dispatch `fcvm exec`.
pub async fn exec(paths: &Paths, a: ExecArgs) -> Result<ExitCode> {
    let target = match (a.name, a.pid) {
        (_, Some(pid)) => Target::Pid(pid),
        (Some(name), None) => Target::Name(name),
        (None, None) => unreachable!("clap requires --name or --pid"),
    };
    let opts = ExecOptions {
        target,
        in_vm: a.vm,
        interactive: a.interactive,
        tty: a.tty,
        env: a.env,
        command: a.command,
    };
    match exec::exec(paths, &opts).await {
        Ok(code) => {
            std::io::stdout().flush()?;
            Ok(ExitCode::from(code.clamp(0, 255) as u8))
        }
        Err(e) => {
            eprintln!("fcvm: error: {}", crate::report::chain(&e));
            Ok(ExitCode::from(e.exit_code()))
        }
    }
}
