//! fcvm host library: everything the `fcvm` command does, as typed modules.

pub mod firecracker;
pub mod fsutil;
pub mod paths;
pub mod setup;
