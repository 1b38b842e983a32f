//! fcvm host library: everything the `fcvm` command does, as typed modules.

pub mod paths;
