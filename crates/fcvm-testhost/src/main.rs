//! `fcvm-testhost`: the command line. All the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Runs a command inside an emulated KVM host (QEMU TCG with AMD SVM), where the real
/// Firecracker can boot real Linux guests. A development and test tool.
#[derive(Parser, Debug)]
#[command(name = "fcvm-testhost", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot an emulated KVM host and run CMD in it (as root, host root read-only, cwd kept).
    Run(RunArgs),
    /// Internal: the runner inside L1 (PID 1 of the chroot).
    #[command(hide = true)]
    GuestRun,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// L1 memory in MiB.
    #[arg(long, default_value_t = 6144)]
    mem: u64,
    /// L1 vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Export a host directory at the same path inside; read-only unless `:rw`.
    #[arg(long = "share", value_name = "PATH[:rw]")]
    shares: Vec<String>,
    /// Pass NAME=VALUE to CMD, or NAME with the caller's value.
    #[arg(long = "env", value_name = "NAME[=VALUE]")]
    env: Vec<String>,
    /// Size of the btrfs scratch disk mounted at /scratch, GiB (sparse; 0: none).
    #[arg(long, default_value_t = 20)]
    scratch_size: u64,
    /// Timings and the L1 console on stderr.
    #[arg(short, long)]
    verbose: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn parse_share(s: &str) -> (PathBuf, bool) {
    match s.strip_suffix(":rw") {
        Some(p) => (PathBuf::from(p), true),
        None => (PathBuf::from(s.strip_suffix(":ro").unwrap_or(s)), false),
    }
}

fn parse_env(s: &str) -> anyhow::Result<(String, Option<String>)> {
    let (k, v) = match s.split_once('=') {
        Some((k, v)) => (k, Some(v.to_string())),
        None => (s, None),
    };
    if k.is_empty() || k.contains('\0') {
        anyhow::bail!("--env {s:?}: expected NAME or NAME=VALUE");
    }
    Ok((k.to_string(), v))
}

fn run(a: RunArgs) -> anyhow::Result<i32> {
    let opts = fcvm_testhost::host::Options {
        mem_mib: a.mem,
        cpus: a.cpus,
        shares: a.shares.iter().map(|s| parse_share(s)).collect(),
        env: a
            .env
            .iter()
            .map(|s| parse_env(s))
            .collect::<anyhow::Result<_>>()?,
        scratch_gib: a.scratch_size,
        verbose: a.verbose,
        argv: a.cmd,
    };
    Ok(fcvm_testhost::host::run(&opts)?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::GuestRun => fcvm_testhost::guest::main(),
        Cmd::Run(a) => match run(a) {
            Ok(code) => {
                // The stdin reader thread may still be blocked in read(2): exit explicitly.
                std::process::exit(code.clamp(0, 255));
            }
            Err(e) => {
                // `{e}`: the library's messages already include their causes.
                eprintln!("fcvm-testhost: error: {e}");
                // 125: fcvm-testhost's own failure, as `docker run` / `podman run` do.
                ExitCode::from(125)
            }
        },
    }
}
