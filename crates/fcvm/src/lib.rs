//! fcvm host library: everything the `fcvm` command does, as typed modules.

#![deny(missing_docs)]

pub mod cleanup;
pub mod cli;
pub mod commands;
pub mod doctor;
pub mod firecracker;
pub mod fsutil;
pub mod logs;
pub mod names;
pub mod network;
pub mod paths;
pub mod process;
pub mod report;
pub mod setup;
pub mod snapshot;
pub mod state;
pub mod storage;
pub mod vm;
pub mod volume;
pub mod vsock;
