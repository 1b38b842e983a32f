//! `fcvm snapshot create|serve|run` and `fcvm snapshots`.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use crate::paths::Paths;

/// `fcvm snapshot ...`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {}

/// `fcvm snapshots ...`.
#[derive(Debug, Subcommand)]
pub enum SnapshotsCommand {}

/// Dispatch `fcvm snapshot`.
pub async fn snapshot(_paths: &Paths, cmd: SnapshotCommand) -> Result<ExitCode> {
    match cmd {}
}

/// Dispatch `fcvm snapshots`.
pub async fn snapshots(_paths: &Paths, cmd: SnapshotsCommand) -> Result<ExitCode> {
    match cmd {}
}
