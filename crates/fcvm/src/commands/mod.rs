//! The operations behind each `fcvm` subcommand, as library functions with typed errors.

pub mod exec;
pub mod ls;
pub mod podman;
pub mod ps;
pub mod run;
