//! fcvm host library: everything the `fcvm` command does, as typed modules.

pub mod firecracker;
pub mod paths;
