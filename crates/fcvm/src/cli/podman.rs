//! `fcvm podman run` and `fcvm exec`: containers in microVMs.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::paths::Paths;

/// `fcvm podman ...`.
#[derive(Debug, Subcommand)]
pub enum PodmanCommand {
    /// Run a container in a new microVM.
    Run(PodmanRunArgs),
}

/// `fcvm podman run`.
#[derive(Debug, Args)]
pub struct PodmanRunArgs {
    /// VM name.
    #[arg(long)]
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Command and arguments.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// `fcvm exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// VM name.
    #[arg(long)]
    pub name: String,
    /// Command and arguments.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Dispatch `fcvm podman`.
pub async fn podman(_paths: &Paths, _cmd: PodmanCommand) -> Result<ExitCode> {
    anyhow::bail!("fcvm podman run is being built")
}

/// Dispatch `fcvm exec`.
pub async fn exec(_paths: &Paths, _args: ExecArgs) -> Result<ExitCode> {
    anyhow::bail!("fcvm exec is being built")
}
