//! What fcvm knows about the VMs it runs, persisted so that every fcvm command (and a
//! later one after a crash) sees the same picture.

mod record;
mod store;

pub use record::{new_vm_id, now_ms, Health, VmKind, VmRecord, VmStatus, SCHEMA_VERSION};
pub use store::{Reaped, Store, StoreError};

#[cfg(test)]
mod tests;
