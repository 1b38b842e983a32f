//! `fcvm-sandbox-vmm`: command line compatible with `firecracker` for what fcvm passes.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use fcvm_sandbox_vmm::vmm::{self, Vmm};
use fcvm_sandbox_vmm::{api, sandbox_init};
use tokio::signal::unix::{signal, SignalKind};

/// Firecracker-compatible stand-in VMM (namespace sandbox, no KVM).
#[derive(Debug, Parser)]
#[command(name = "fcvm-sandbox-vmm", disable_version_flag = true)]
struct Args {
    /// Path of the API Unix socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Instance id.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Print the version and exit.
    #[arg(long)]
    version: bool,
    /// Log file (must exist, as with Firecracker); VMM messages are appended to it.
    #[arg(long)]
    log_path: Option<PathBuf>,
    /// Log level (accepted for compatibility).
    #[arg(long)]
    level: Option<String>,
    /// Accepted for compatibility.
    #[arg(long)]
    show_level: bool,
    /// Accepted for compatibility.
    #[arg(long)]
    show_log_origin: bool,
    /// Accepted for compatibility.
    #[arg(long)]
    boot_timer: bool,
    /// Accepted for compatibility (the sandbox installs no seccomp filters).
    #[arg(long)]
    no_seccomp: bool,
    /// Not supported: the stand-in is configured through the API only.
    #[arg(long)]
    no_api: bool,
    /// Not supported (see --no-api).
    #[arg(long)]
    config_file: Option<PathBuf>,
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--sandbox-init") {
        sandbox_init::main();
    }
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("fcvm-sandbox-vmm: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> anyhow::Result<i32> {
    let args = Args::parse();
    if args.version {
        println!(
            "Firecracker v{} (fcvm-sandbox-vmm: namespace sandbox, no KVM, no memory snapshots)",
            api::FIRECRACKER_VERSION
        );
        return Ok(0);
    }
    if args.no_api || args.config_file.is_some() {
        bail!("--no-api/--config-file are not supported by the sandbox VMM; configure it through --api-sock");
    }
    if let Some(p) = &args.log_path {
        if !p.exists() {
            bail!(
                "log file {} does not exist (Firecracker requires it to exist too)",
                p.display()
            );
        }
    }
    let api_sock = args.api_sock.context("--api-sock is required")?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the sandbox VMM needs root (namespaces, loop devices, cgroups)");
    }
    vmm::collect_stale();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::bind(&api_sock)
            .with_context(|| format!("cannot bind the API socket {}", api_sock.display()))?;
        let vmm = Vmm::new(args.id.clone());
        tokio::spawn(api::serve(vmm.clone(), listener));
        let mut exited = vmm.exited.subscribe();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let code = tokio::select! {
            _ = exited.changed() => exited.borrow().unwrap_or(1),
            _ = term.recv() => 128 + libc::SIGTERM,
            _ = int.recv() => 128 + libc::SIGINT,
        };
        vmm.cleanup();
        let _ = std::fs::remove_file(&api_sock);
        if let Some(p) = vmm
            .vsock_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = std::fs::remove_file(p);
        }
        Ok(code)
    })
}
