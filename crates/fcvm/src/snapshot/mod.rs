//! Snapshots of running VMs, the UFFD page server, and clones.
//!
//! - `create`: `fcvm snapshot create` (Full or Diff, atomic publication, resume guard).
//! - `store`: the `snapshots/` directory (staging, publish, list, remove).
//! - `meta`: `snapshot.json`.
//! - `serve`: `fcvm snapshot serve`, a `fcvm_uffd::PageServer` recorded in state.
//! - `clone`: `fcvm snapshot run`, restoring a fresh Firecracker from a snapshot.
//! - `guard`: resumes a paused source VM if its creator dies.
//! - `cache`: the image cache of container VMs (`fcvm podman run`), in `image-cache/`.
//!
//! Layout of one snapshot, `snapshots/<tag>/`: `memory.bin` (always complete), `vmstate.bin`,
//! `disk-<drive>.img` (reflinks), `snapshot.json`.
//!
//! Dirty-page tracking notes that shape Diff snapshots: Firecracker resets a VM's dirty log
//! at every snapshot (Full or Diff), so the parent of a Diff is the VM's *last* snapshot
//! (recorded on its state record as `diff_parent`; for a clone, the snapshot it came from).
//! A VM that never snapshotted has a log covering everything since boot, so its first Diff
//! is merged onto an all-zero base. A snapshot attempt that did not publish leaves no valid
//! parent: the next Diff is refused until a Full is taken. A diff smaller than 0.1 % of
//! memory is reported (lost dirty bits are a known KVM issue on some hosts), and so is one
//! above 90 % (UFFD-restored clones report every served page dirty).

pub mod cache;
pub mod clone;
pub mod create;
pub mod guard;
pub mod meta;
pub mod serve;
pub mod store;

use std::collections::BTreeMap;

use crate::paths::Paths;
use crate::state::{Store, StoreError as StateError, VmRecord};

pub use meta::{SnapshotKind, SnapshotMeta};
pub use store::{SnapshotInfo, SnapshotStore, StoreError};

/// Who uses each snapshot: live records whose `snapshot` (served or cloned from) or
/// `diff_parent` (the base of that VM's next Diff) names it.
pub fn users(paths: &Paths) -> Result<BTreeMap<String, Vec<VmRecord>>, StateError> {
    let mut map: BTreeMap<String, Vec<VmRecord>> = BTreeMap::new();
    if !paths.state_dir().exists() {
        return Ok(map);
    }
    for r in Store::open(paths)?.list()? {
        if !r.is_live() {
            continue;
        }
        let mut tags: Vec<String> = r.snapshot.iter().cloned().collect();
        if let Some(p) = &r.diff_parent {
            if !tags.contains(p) {
                tags.push(p.clone());
            }
        }
        for t in tags {
            map.entry(t).or_default().push(r.clone());
        }
    }
    Ok(map)
}

/// Failures of `snapshots rm` / `prune`.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    /// Snapshot store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// State store.
    #[error(transparent)]
    State(#[from] StateError),
    /// In use.
    #[error("snapshot {tag} is in use by {users}; stop them first")]
    InUse {
        /// The tag.
        tag: String,
        /// Who, readable.
        users: String,
    },
}

fn describe(users: &[VmRecord]) -> String {
    users
        .iter()
        .map(|r| {
            let kind = serde_json::to_value(r.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            format!("{kind} {} (pid {})", r.name, r.pid())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `fcvm snapshots rm <tag>`: refused while a live server, clone, or VM (as Diff parent)
/// uses it.
pub fn remove(paths: &Paths, tag: &str) -> Result<(), RemoveError> {
    let snapshots = SnapshotStore::open(paths)?;
    let _lock = snapshots.lock()?;
    snapshots.get(tag)?;
    if let Some(u) = users(paths)?.get(tag).filter(|u| !u.is_empty()) {
        return Err(RemoveError::InUse {
            tag: tag.to_owned(),
            users: describe(u),
        });
    }
    snapshots.remove(tag)?;
    Ok(())
}

/// What `prune` removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct Pruned {
    /// Staging dirs of creators that died.
    pub staging: Vec<std::path::PathBuf>,
    /// Snapshots removed (only with `unused`).
    pub snapshots: Vec<String>,
}

/// `fcvm snapshots prune`: always removes staging dirs of dead creators and leftovers of
/// interrupted removals; with `unused`, also every published snapshot no live record uses
/// (see [`users`]).
pub fn prune(paths: &Paths, unused: bool) -> Result<Pruned, RemoveError> {
    let snapshots = SnapshotStore::open(paths)?;
    let _lock = snapshots.lock()?;
    let mut out = Pruned {
        staging: snapshots.sweep_stale_staging()?,
        ..Pruned::default()
    };
    snapshots.sweep_removals()?;
    if unused {
        let users = users(paths)?;
        for s in snapshots.list()? {
            if !users.contains_key(&s.meta.tag) {
                snapshots.remove(&s.meta.tag)?;
                out.snapshots.push(s.meta.tag);
            }
        }
    }
    Ok(out)
}

/// `fcvm snapshots ls`: published snapshots (stale staging dirs are swept first).
pub fn list(paths: &Paths) -> Result<Vec<SnapshotInfo>, StoreError> {
    let snapshots = SnapshotStore::open(paths)?;
    {
        let _lock = snapshots.lock()?;
        snapshots.sweep_stale_staging()?;
    }
    snapshots.list()
}
