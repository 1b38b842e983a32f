//! Talking to Firecracker: its binary and its HTTP API.

pub mod binary;
pub mod client;
pub mod models;
pub mod transport;

pub use client::FirecrackerClient;
pub use transport::TransportError;
