//! The operations behind each `fcvm` subcommand, as library functions with typed errors.

pub mod attach;
pub mod exec;
pub mod logs;
pub mod ls;
pub mod podman;
pub mod ps;
pub mod run;
