//! The operations behind each `fcvm` subcommand, as library functions with typed errors.

pub mod exec;
pub mod ls;
pub mod podman;
pub mod run;
