//! Request and response bodies of the Firecracker API calls fcvm makes. They live in the
//! `fcvm-fc-api` crate so that test doubles of the API share them: every side of the
//! contract uses one definition.

pub use fcvm_fc_api::*;
