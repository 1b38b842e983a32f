//! Test support shared by fcvm's integration tests, benchmarks and demo.
//!
//! No container registry is reachable on our build machines, so the tests' container image is
//! built here from Debian's `busybox-static` ([`testimage`]).

#![deny(missing_docs)]

pub mod testimage;
