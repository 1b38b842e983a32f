//! The operations behind each `fcvm` subcommand, as library functions with typed errors.

pub mod ls;
pub mod run;
