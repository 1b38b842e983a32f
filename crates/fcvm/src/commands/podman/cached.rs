//! The image cache in `fcvm podman run` (the cache itself, its key and its locking are in
//! [`crate::snapshot::cache`]).
//!
//! - **Miss** (this run claims the key): the VM boots cold with `await_proceed` in its plan,
//!   in its own network namespace ([`CACHE_TAP`]). Once the agent reports ImageReady, the
//!   host takes a Full snapshot into the cache (published atomically), then sends Proceed
//!   with the plan and the container starts. stderr: `cache created`.
//! - **Hit**: the entry is restored (File backend) through the lifecycle owner; the restored
//!   agent finds its status connection reset, reconnects, reports ImageReady again and gets
//!   this run's plan (name, hostname, env, command, terminal) in Proceed. stderr:
//!   `cache hit`. An entry that does not restore (load refused, VM gone, agent silent) is
//!   removed and the run boots cold with a warning; nothing of the container has run then.
//! - **Startup hit** (`--health-check`, a startup-tier entry for this key and these
//!   settings, see [`crate::snapshot::cache`]): the warm VM is restored with its container
//!   running; its agent reconnects its channels (status first, then output), gets Resync
//!   for the clock and entropy, and reports Ready and its health again. stderr:
//!   `cache hit (startup)`. A miss or plain hit with a health check snapshots the startup
//!   tier at the check's first pass (stderr: `cache created (startup)`).
//! - **Cold**: `--no-snapshot`, `FCVM_NO_SNAPSHOT=1`, a registry image, a network other than
//!   `none`, or another run busy creating the entry (this run does not wait for it). stderr:
//!   `cold (why)`.
//!
//! A registry image is never cached, so every run pulls it in its own VM: an entry's key must
//! name the image by content, and a pulled image's digest is known only once the guest has
//! pulled it. A key of the name and tag alone would restore the old image after the tag moved
//! to a new digest; checking the digest after a restore needs the restored VM to reach the
//! registry, and cached VMs have `--network none` (their restores cannot carry a bridged
//! VM's pool address yet). Until both exist, pulled images run with the cache off, and the
//! `cold (...)` line says why.

use std::path::{Path, PathBuf};

use crate::network::NetworkAttachment;
use crate::paths::{Paths, VMM_VIEW_DIR};
use crate::snapshot::cache::{
    self, CacheMeta, Claim, Entry, FileIdentity, ImageCache, KeyInputs, StartupInputs, CACHE_FILE,
    CACHE_FORMAT, CACHE_TAP, NETWORK_MODE, STARTUP_FILE,
};
use crate::snapshot::create::{create_in, CreateError, CreateOutcome, CreateRequest};
use crate::snapshot::meta::{MEMORY_FILE, VMSTATE_FILE};
use crate::state::{GuestKind, VmKind};
use crate::vm::{self, DriveSpec, Resources, VmSpec};

use super::Prepared;

/// Why a pulled image boots cold (printed as `fcvm: cold (...)`).
pub const PULLED_NOT_CACHED: &str =
    "images pulled from a registry are not cached: the cache key needs the image's digest, known only after the guest's pull";

/// What this run does with the cache.
#[derive(Debug)]
pub enum Decision {
    /// Boot without the cache; the text says why.
    Cold(String),
    /// Boot, snapshot once the image is loaded.
    Create(Creator),
    /// Restore this entry.
    Hit(Entry),
    /// Restore this startup-tier entry (its container runs already).
    Startup(Entry),
}

/// The run that creates an entry: it holds the key's lock until done.
#[derive(Debug)]
pub struct Creator {
    cache: ImageCache,
    /// The key.
    pub key: String,
    inputs: KeyInputs,
    lock: Option<crate::fsutil::FileLock>,
    /// The entry was published (the VM's next Diff has it as its parent).
    pub published: bool,
}

impl Creator {
    /// Whether the snapshot was attempted already (an agent that reconnects reports the
    /// image again; it is snapshotted once).
    pub fn done(&self) -> bool {
        self.lock.is_none()
    }

    /// Snapshot VM `vm` into the cache as this key, then release the key's lock.
    pub async fn snapshot(
        &mut self,
        paths: &Paths,
        vm: &str,
        image: &str,
        digest: &str,
    ) -> Result<CreateOutcome, CreateError> {
        let meta = CacheMeta {
            key: self.key.clone(),
            image: image.to_owned(),
            digest: digest.to_owned(),
            inputs: self.inputs.clone(),
        };
        let req = CreateRequest {
            vm: vm.to_owned(),
            tag: self.key.clone(),
            diff: false,
            extra_files: vec![(
                CACHE_FILE.to_owned(),
                serde_json::to_vec_pretty(&meta).expect("serialises"),
            )],
        };
        let out = create_in(paths, self.cache.store(), &req).await;
        self.lock = None;
        self.published = out.is_ok();
        out
    }
}

/// What became of a startup-tier snapshot.
#[derive(Debug)]
pub enum Startup {
    /// Published as this key.
    Created {
        /// Its key.
        key: String,
        /// The snapshot.
        out: Box<CreateOutcome>,
    },
    /// Not attempted (why).
    Skipped(String),
    /// Attempted and failed (why); nothing was published.
    Failed(String),
}

/// Snapshot VM `vm`, whose health check just passed for the first time, as the startup
/// tier of base entry `base` for `plan`: a Diff merged onto the base entry when `diff` (the
/// VM booted tracking dirty pages and its last snapshot was that entry), else Full.
pub async fn snapshot_startup(
    paths: &Paths,
    vm: &str,
    base: &str,
    plan: &fcvm_proto::plan::Plan,
    diff: bool,
) -> Startup {
    let inputs = match StartupInputs::of(base, plan) {
        Ok(i) => i,
        Err(why) => return Startup::Skipped(why.to_string()),
    };
    let key = inputs.key();
    let failed = |e: &(dyn std::error::Error + 'static)| Startup::Failed(crate::report::chain(e));
    let cache = match ImageCache::open(paths) {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    // Held until published: a concurrent run of the same settings does not snapshot too.
    let _lock = match cache.claim(&key) {
        Ok(Claim::Create(lock)) => lock,
        Ok(Claim::Busy) => {
            return Startup::Skipped(format!("another run is creating entry {}", short(&key)))
        }
        Ok(Claim::Published) => {
            return Startup::Skipped(format!("entry {} exists already", short(&key)))
        }
        Err(e) => return failed(&e),
    };
    // The base entry's own metadata, under the startup key (`fcvm snapshots` lists both).
    let base_meta = cache.store().path(base).join(CACHE_FILE);
    let meta: CacheMeta = match std::fs::read(&base_meta)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(m) => m,
        Err(e) => {
            return Startup::Skipped(format!(
                "the base entry's {} is unreadable: {e}",
                base_meta.display()
            ))
        }
    };
    let meta = CacheMeta {
        key: key.clone(),
        ..meta
    };
    let req = CreateRequest {
        vm: vm.to_owned(),
        tag: key.clone(),
        diff,
        extra_files: vec![
            (
                CACHE_FILE.to_owned(),
                serde_json::to_vec_pretty(&meta).expect("serialises"),
            ),
            (
                STARTUP_FILE.to_owned(),
                serde_json::to_vec_pretty(&inputs).expect("serialises"),
            ),
        ],
    };
    match create_in(paths, cache.store(), &req).await {
        Ok(out) => Startup::Created {
            key,
            out: Box::new(out),
        },
        Err(e) => Startup::Failed(failure(paths, &e)),
    }
}

/// Why a cache snapshot failed, for the warning: lack of space is named as such, with where
/// and what to do about it (the staging dir is gone again, so nothing partial is left).
pub fn failure(paths: &Paths, e: &CreateError) -> String {
    let chain = crate::report::chain(e);
    if e.out_of_space() {
        format!(
            "no space left for it in {}: {chain}; free space there or remove entries with `fcvm snapshots prune`",
            paths.image_cache_dir().display()
        )
    } else {
        chain
    }
}

/// The key inputs of a run; `None` for images that are not cached (registry pulls).
pub(super) fn key_inputs(p: &Prepared) -> Result<Option<KeyInputs>, crate::fsutil::PathIoError> {
    let Some(archive) = &p.image.drive else {
        return Ok(None);
    };
    Ok(Some(KeyInputs {
        format: CACHE_FORMAT,
        fcvm_version: env!("CARGO_PKG_VERSION").to_owned(),
        image: p.image.source.clone(),
        image_file: FileIdentity::of(archive)?,
        kernel: FileIdentity::of(&p.kernel)?,
        rootfs: FileIdentity::of(&p.rootfs)?,
        agent_initrd: FileIdentity::of(&p.initrd)?,
        firecracker: FileIdentity::of(p.launcher.firecracker())?,
        boot_args: p.cmdline.clone(),
        vcpus: p.vcpus,
        mem_mib: p.mem_mib,
        network: NETWORK_MODE.to_owned(),
    }))
}

/// Decide what this run does. Cache trouble never fails the run: it boots cold.
pub(super) fn decide(paths: &Paths, no_snapshot: bool, p: &Prepared) -> Decision {
    if no_snapshot {
        return Decision::Cold("--no-snapshot".into());
    }
    if cache::disabled_by_env() {
        return Decision::Cold(format!("{} is set", cache::NO_SNAPSHOT_ENV));
    }
    // Before the network's reason: it stays true with any network (see the module docs).
    if matches!(
        p.image.source,
        fcvm_proto::plan::ImageSource::Registry { .. }
    ) {
        return Decision::Cold(PULLED_NOT_CACHED.into());
    }
    // A restored guest keeps the address it was given at boot: a bridged VM's comes from a
    // pool slot of its own, which a snapshot cannot carry to another run (yet).
    if !matches!(p.network, crate::network::args::PreparedNetwork::None) {
        return Decision::Cold("the image cache covers --network none only, for now".into());
    }
    match try_decide(paths, p) {
        Ok(d) => d,
        Err(e) => Decision::Cold(format!(
            "the image cache is unusable: {}",
            crate::report::chain(&e)
        )),
    }
}

fn try_decide(paths: &Paths, p: &Prepared) -> Result<Decision, crate::snapshot::StoreError> {
    let Some(inputs) = key_inputs(p)? else {
        return Ok(Decision::Cold(PULLED_NOT_CACHED.into()));
    };
    let key = inputs.key();
    let cache = ImageCache::open(paths)?;
    // The warm application first: it also skips the container's initialisation.
    if let Ok(startup) = StartupInputs::of(&key, &p.plan) {
        if let Some(entry) = cache.lookup(&startup.key())? {
            return Ok(Decision::Startup(entry));
        }
    }
    // Twice: an entry published between the lookup and the claim is restored too.
    for _ in 0..2 {
        if let Some(entry) = cache.lookup(&key)? {
            return Ok(Decision::Hit(entry));
        }
        match cache.claim(&key)? {
            Claim::Create(lock) => {
                return Ok(Decision::Create(Creator {
                    cache,
                    key,
                    inputs,
                    lock: Some(lock),
                    published: false,
                }))
            }
            Claim::Busy => {
                return Ok(Decision::Cold(format!(
                    "another run is creating cache entry {}; not waiting for it",
                    short(&key)
                )))
            }
            Claim::Published => continue,
        }
    }
    Ok(Decision::Cold(format!(
        "cache entry {} keeps changing",
        short(&key)
    )))
}

/// Remove an entry that failed to restore; a failure to remove is only reported.
pub fn discard(paths: &Paths, key: &str) {
    let removed = ImageCache::open(paths).and_then(|c| c.remove(key));
    if let Err(e) = removed {
        eprintln!(
            "fcvm: warning: cannot remove cache entry {key}: {}",
            crate::report::chain(&e)
        );
    }
}

/// Note a hit.
pub fn touch(paths: &Paths, key: &str) {
    if let Ok(c) = ImageCache::open(paths) {
        c.touch(key);
    }
}

/// The first 12 digits of a key, for messages.
pub fn short(key: &str) -> &str {
    &key[..key.len().min(12)]
}

/// The network of a VM that makes or restores a cache entry: its own namespace with the TAP
/// name the snapshot records.
pub fn network(id: &str) -> NetworkAttachment {
    NetworkAttachment::namespaced(id, CACHE_TAP)
}

/// The spec of a VM restored from `entry` for the run `p`.
pub(super) fn hit_spec(paths: &Paths, p: &Prepared, entry: &Entry) -> VmSpec {
    let meta = &entry.meta;
    let mut spec = VmSpec::new(
        paths,
        p.name.clone(),
        VmKind::Container,
        Resources {
            vcpus: meta.vcpus,
            mem_mib: meta.mem_mib,
            track_dirty_pages: false,
        },
        vm::Source::Snapshot {
            vmstate: entry.dir.join(VMSTATE_FILE),
            memory: vm::MemorySource::File(entry.dir.join(MEMORY_FILE)),
        },
        // The jailer's chroot shows the VMM the same paths as a direct launch, so an entry
        // made either way restores either way.
        p.launcher.clone(),
    );
    spec.guest = GuestKind::Agent;
    spec.labels.kernel = Some(p.kernel.clone());
    spec.labels.image = Some(p.image.display.clone());
    spec.network = network(&spec.id);
    spec.drives = meta
        .drives
        .iter()
        .map(|d| {
            // The rootfs lived in the creator's runtime dir: this VM gets its own copy at
            // the same place in its own. A read-only drive (the image archive) is used
            // from the entry in place.
            let copy_to = match Path::new(&d.path_on_host).strip_prefix(VMM_VIEW_DIR) {
                Ok(rel) => Some(rel.to_owned()),
                Err(_) if d.is_read_only => None,
                Err(_) => Some(PathBuf::from(&d.file)),
            };
            DriveSpec {
                id: d.drive_id.clone(),
                file: entry.dir.join(&d.file),
                copy_to,
                root: d.is_root_device,
                read_only: d.is_read_only,
            }
        })
        .collect();
    spec
}
