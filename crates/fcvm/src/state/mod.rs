//! What fcvm knows about the VMs it runs, persisted so that every fcvm command (and a
//! later one after a crash) sees the same picture.

mod record;
mod store;

pub use record::{
    new_vm_id, now_ms, GuestKind, Health, VmKind, VmRecord, VmStatus, VmmKind, SCHEMA_VERSION,
};
pub use store::{reap_reason, ReapReason, Reaped, Store, StoreError};

#[cfg(test)]
mod tests;
