//! Request and response bodies of the Firecracker API calls fcvm makes. They live in the
//! `fcvm-fc-api` crate, which the stand-in VMM shares, so both sides of the contract use one
//! definition.

pub use fcvm_fc_api::*;
