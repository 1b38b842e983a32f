//! The image cache of container VMs: a Full snapshot of a VM taken once its image is loaded,
//! restored by later `fcvm podman run`s of the same image instead of a cold boot.
//!
//! # Entries
//!
//! `image-cache/<key>/` has the layout of a snapshot (see [`super::store`]: `memory.bin`,
//! `vmstate.bin`, `disk-<drive>.img`, `snapshot.json`) plus `cache.json` ([`CacheMeta`]) and
//! `last-used` (its mtime is the last hit). Entries are built in a hidden staging dir and
//! renamed into place by the same code as `fcvm snapshot create`, so an entry is either
//! complete or absent: a SIGKILLed creator leaves only a staging dir whose creator is dead,
//! removed by the next run's [`ImageCache::open`]. A snapshot that fails (no space left on
//! the cache's filesystem, say) removes its staging dir at once, and the run goes on without
//! the entry, saying why (lack of space is named as such). `image-cache/` may be a mount of
//! its own: a jailed VMM writes the memory file in its runtime dir, from where it is moved,
//! or copied across filesystems, into the staging dir.
//!
//! # The key
//!
//! [`KeyInputs::key`] is the SHA-256 (first 32 hex digits) of the JSON of [`KeyInputs`]:
//! exactly what the snapshotted state depends on:
//!
//! - the cache's format ([`CACHE_FORMAT`]) and fcvm's version (the agent's protocol, the
//!   drive layout and the boot arguments it builds all come with it);
//! - the image: the plan's image source (archive device and the reference run from it) and
//!   the identity of the archive file (see below); `localhost/` images are exported once to
//!   an archive named by their image id, so a new image under the same name is a new key;
//!   registry images are not cached (their digest is only known after the guest's pull, and
//!   a key of the name and tag would restore a stale image once the tag moves; see
//!   `commands::podman::cached`);
//! - the guest kernel, the rootfs image and the agent initrd (which is built from the agent
//!   binary), by identity;
//! - the Firecracker binary, by identity (a snapshot is loaded by the VMM that made it);
//! - the kernel command line, vCPUs and memory;
//! - the network mode ([`NETWORK_MODE`]: its own namespace with a TAP named [`CACHE_TAP`],
//!   so any number of restores of one entry can run at once).
//!
//! A file's identity is its canonical path, length, mtime (ns), inode and device: a file
//! rebuilt or replaced in place gets a new one, without hashing a kernel or an image on
//! every run. What the snapshot does *not* depend on is left out, because the agent applies
//! it after a restore (it arrives in [`fcvm_proto::status::Status::Proceed`]): the VM name
//! and hostname, environment, command, `-i`/`-t` and the terminal size.
//!
//! # The startup tier
//!
//! With `--health-check`, the first pass of the check in a run that created (or restored)
//! the image's entry snapshots the warm application into a second entry of this cache,
//! keyed by [`StartupInputs::key`]: the base entry's key plus everything the running
//! container depends on (the health check itself, command, entrypoint, environment, proxy
//! settings, user, workdir, `--init`, labels, `--privileged`). On a miss it is a Diff
//! snapshot merged onto the base entry (the creating VM tracks dirty pages from its boot;
//! its Full snapshot reset the log, so the diff is exactly what initialisation wrote); from
//! a restored VM (a hit without a startup entry yet) it is Full, since a restored VM's dirty
//! log does not start at its base. The entry holds `startup.json` ([`StartupInputs`]) beside
//! `cache.json`. A restore of it resumes the container already serving; it keeps the
//! creator's container hostname (the VM's name is the run's own). Runs with `-i`/`-t` or
//! volumes have no startup tier (their input and FUSE channels are not rewired after a
//! restore).
//!
//! # Concurrency
//!
//! `image-cache/.<key>.lock` is an flock: the run that creates an entry holds it exclusively
//! from before its boot until the entry is published (or its attempt failed); restores hold
//! it shared while they load the files; prune takes it exclusively without waiting and skips
//! busy entries. Of two concurrent first runs of one image, the one that gets the lock
//! creates the entry; the other does not wait: it boots cold without snapshotting (and says
//! so). The kernel drops the lock of a killed process.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fcvm_proto::plan::ImageSource;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::fsutil::{self, io_at, FileLock, PathIoError};
use crate::paths::Paths;

use super::meta::SnapshotMeta;
use super::store::{dir_sizes, SnapshotStore, StoreError};

/// Environment variable: `1` turns the image cache off (as `--no-snapshot`).
pub const NO_SNAPSHOT_ENV: &str = "FCVM_NO_SNAPSHOT";
/// Version of the key and entry layout.
pub const CACHE_FORMAT: u32 = 1;
/// The TAP name of cached container VMs, inside each VM's own network namespace (the
/// vmstate records it and Firecracker 1.12 cannot retarget it on load).
pub const CACHE_TAP: &str = "tap0";
/// The network mode cached VMs use, as it enters the key.
pub const NETWORK_MODE: &str = "namespaced-tap:tap0";
/// An entry's own metadata.
pub const CACHE_FILE: &str = "cache.json";
/// Touched on every hit: its mtime is the entry's last use.
pub const LAST_USED_FILE: &str = "last-used";

/// Whether the environment turns the cache off.
pub fn disabled_by_env() -> bool {
    switched_off(std::env::var(NO_SNAPSHOT_ENV).ok().as_deref())
}

/// Whether a value of [`NO_SNAPSHOT_ENV`] turns the cache off: anything but unset, empty
/// or `0`.
fn switched_off(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// A file as the key sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Canonical path.
    pub path: PathBuf,
    /// Length in bytes.
    pub len: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Inode number.
    pub inode: u64,
    /// Device number.
    pub device: u64,
}

impl FileIdentity {
    /// The identity of `path` (which must exist).
    pub fn of(path: &Path) -> Result<FileIdentity, PathIoError> {
        let canonical = fs::canonicalize(path).map_err(io_at("resolve", path))?;
        let m = fs::metadata(&canonical).map_err(io_at("stat", &canonical))?;
        Ok(FileIdentity {
            path: canonical,
            len: m.len(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            inode: m.ino(),
            device: m.dev(),
        })
    }
}

/// Everything the snapshotted state of a container VM depends on (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    /// [`CACHE_FORMAT`].
    pub format: u32,
    /// fcvm's version.
    pub fcvm_version: String,
    /// The plan's image source.
    pub image: ImageSource,
    /// The image archive.
    pub image_file: FileIdentity,
    /// The guest kernel.
    pub kernel: FileIdentity,
    /// The root filesystem image.
    pub rootfs: FileIdentity,
    /// The agent initrd.
    pub agent_initrd: FileIdentity,
    /// The Firecracker binary.
    pub firecracker: FileIdentity,
    /// The kernel command line.
    pub boot_args: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory in MiB.
    pub mem_mib: u32,
    /// [`NETWORK_MODE`].
    pub network: String,
}

impl KeyInputs {
    /// The entry's key: 32 hex digits of the SHA-256 of these inputs' JSON.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("serialises");
        fsutil::sha256_bytes(&json)[..32].to_owned()
    }
}

/// `cache.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheMeta {
    /// The key.
    pub key: String,
    /// The image as the user named it.
    pub image: String,
    /// The image id the agent reported.
    pub digest: String,
    /// What the key was computed from.
    pub inputs: KeyInputs,
}

/// The startup tier's file beside `cache.json`.
pub const STARTUP_FILE: &str = "startup.json";
/// Version of the startup key.
pub const STARTUP_FORMAT: u32 = 1;

/// What a startup-tier entry depends on beyond its base entry (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartupInputs {
    /// [`STARTUP_FORMAT`].
    pub format: u32,
    /// The base entry's key.
    pub base: String,
    /// The health check (URL, interval, timeout, retries: the restored agent goes on
    /// checking with the snapshot's).
    pub health_check: fcvm_proto::health::HealthCheck,
    /// The command.
    pub cmd: Option<Vec<String>>,
    /// The entrypoint.
    pub entrypoint: Option<String>,
    /// The environment.
    pub env: std::collections::BTreeMap<String, String>,
    /// Proxy settings (they reach the container's environment).
    pub proxy: std::collections::BTreeMap<String, String>,
    /// The user.
    pub user: Option<String>,
    /// The working directory.
    pub workdir: Option<String>,
    /// `--init`.
    pub init: bool,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// `--privileged`.
    pub privileged: bool,
}

/// Why a run has no startup tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoStartupTier {
    /// No `--health-check`.
    #[error("no --health-check")]
    NoHealthCheck,
    /// `-i`/`-t`: the input channel is not rewired after a restore.
    #[error("the startup tier does not cover -i/-t")]
    Interactive,
    /// Volumes: their FUSE channels are not rewired after a restore.
    #[error("the startup tier does not cover volumes")]
    Volumes,
}

impl StartupInputs {
    /// The inputs of `plan`'s startup tier on base entry `base`.
    pub fn of(base: &str, plan: &fcvm_proto::plan::Plan) -> Result<StartupInputs, NoStartupTier> {
        let Some(health_check) = plan.health_check.clone() else {
            return Err(NoStartupTier::NoHealthCheck);
        };
        if plan.interactive || plan.tty {
            return Err(NoStartupTier::Interactive);
        }
        if !plan.volumes.is_empty() {
            return Err(NoStartupTier::Volumes);
        }
        Ok(StartupInputs {
            format: STARTUP_FORMAT,
            base: base.to_owned(),
            health_check,
            cmd: plan.cmd.clone(),
            entrypoint: plan.entrypoint.clone(),
            env: plan.env.clone(),
            proxy: plan.proxy.clone(),
            user: plan.user.clone(),
            workdir: plan.workdir.clone(),
            init: plan.init,
            labels: plan.labels.clone(),
            privileged: plan.privileged,
        })
    }

    /// The startup entry's key: 32 hex digits of the SHA-256 of these inputs' JSON.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("serialises");
        fsutil::sha256_bytes(&json)[..32].to_owned()
    }
}

/// One entry, for `fcvm snapshots`.
#[derive(Debug, Clone, Serialize)]
pub struct CacheEntryInfo {
    /// Its key.
    pub key: String,
    /// The image.
    pub image: String,
    /// The image id.
    pub digest: String,
    /// Allocated bytes of its files.
    pub allocated_bytes: u64,
    /// Apparent bytes of its files.
    pub apparent_bytes: u64,
    /// Milliseconds since the epoch of its creation.
    pub created_at_ms: u64,
    /// Milliseconds since the epoch of its last hit (its creation if never hit).
    pub last_used_ms: u64,
    /// Its directory.
    pub path: PathBuf,
}

/// A published entry to restore.
#[derive(Debug)]
pub struct Entry {
    /// Its key.
    pub key: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its snapshot metadata.
    pub meta: SnapshotMeta,
    /// Held shared while the restore reads the files (prune waits for nobody: it skips).
    pub lock: FileLock,
}

/// What a lock attempt found.
#[derive(Debug)]
pub enum Claim {
    /// This run creates the entry; hold this until it is published or given up.
    Create(FileLock),
    /// Another run holds the lock (it is creating the entry).
    Busy,
    /// The entry was published meanwhile.
    Published,
}

/// The `image-cache/` directory.
#[derive(Debug, Clone)]
pub struct ImageCache {
    store: SnapshotStore,
}

impl ImageCache {
    /// Open (creating) the cache; removes staging dirs of dead creators and leftovers of
    /// interrupted removals first.
    pub fn open(paths: &Paths) -> Result<ImageCache, StoreError> {
        let store = SnapshotStore::at(paths.image_cache_dir())?;
        {
            let _lock = store.lock()?;
            store.sweep_stale_staging()?;
            store.sweep_removals()?;
        }
        Ok(ImageCache { store })
    }

    /// The underlying snapshot store (entries are its snapshots, tagged by key).
    pub fn store(&self) -> &SnapshotStore {
        &self.store
    }

    fn lock_file(&self, key: &str) -> Result<File, StoreError> {
        let path = self.store.dir().join(format!(".{key}.lock"));
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_at("open", &path))
            .map_err(Into::into)
    }

    fn flock(&self, key: &str, arg: FlockArg) -> Result<Option<FileLock>, StoreError> {
        let file = self.lock_file(key)?;
        match Flock::lock(file, arg) {
            Ok(l) => Ok(Some(l)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => {
                let path = self.store.dir().join(format!(".{key}.lock"));
                Err(io_at("lock", &path)(std::io::Error::from(e)).into())
            }
        }
    }

    /// The published entry `key`, locked shared; `Ok(None)` when there is none.
    pub fn lookup(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        if !self.store.exists(key) {
            return Ok(None);
        }
        let lock = self
            .flock(key, FlockArg::LockShared)?
            .expect("a blocking lock either succeeds or fails");
        // Pruned while we waited for the lock.
        if !self.store.exists(key) {
            return Ok(None);
        }
        let meta = self.store.get(key)?;
        Ok(Some(Entry {
            key: key.to_owned(),
            dir: self.store.path(key),
            meta,
            lock,
        }))
    }

    /// Try to become the creator of `key`, without waiting.
    pub fn claim(&self, key: &str) -> Result<Claim, StoreError> {
        match self.flock(key, FlockArg::LockExclusiveNonblock)? {
            None => Ok(Claim::Busy),
            Some(_) if self.store.exists(key) => Ok(Claim::Published),
            Some(lock) => Ok(Claim::Create(lock)),
        }
    }

    /// Note a hit (the mtime of `last-used`).
    pub fn touch(&self, key: &str) {
        let path = self.store.path(key).join(LAST_USED_FILE);
        if let Err(e) = fs::write(&path, b"") {
            tracing::debug!("cannot note the use of cache entry {key}: {e}");
        }
    }

    /// Remove entry `key` (e.g. one that failed to restore). Restores running from it are
    /// unaffected: their memory file stays mapped and their disks are copies.
    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        let _lock = self.store.lock()?;
        match self.store.remove(key) {
            Err(StoreError::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    /// Every published entry, oldest first.
    pub fn list(&self) -> Result<Vec<CacheEntryInfo>, StoreError> {
        let mut out = Vec::new();
        for s in self.store.list()? {
            let cache: Option<CacheMeta> = fs::read(s.path.join(CACHE_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let last_used_ms = fs::metadata(s.path.join(LAST_USED_FILE))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(s.meta.created_at_ms, |d| d.as_millis() as u64);
            let (apparent_bytes, allocated_bytes) = dir_sizes(&s.path);
            out.push(CacheEntryInfo {
                key: s.meta.tag.clone(),
                image: cache
                    .as_ref()
                    .map_or_else(|| "?".into(), |c| c.image.clone()),
                digest: cache.map_or_else(|| "?".into(), |c| c.digest),
                allocated_bytes,
                apparent_bytes,
                created_at_ms: s.meta.created_at_ms,
                last_used_ms,
                path: s.path,
            });
        }
        Ok(out)
    }

    /// Remove every entry not used within `older_than` (all with `None`), skipping entries
    /// being created or restored right now. Returns the removed keys.
    pub fn prune(&self, older_than: Option<Duration>) -> Result<Vec<String>, StoreError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut removed = Vec::new();
        for e in self.list()? {
            let idle = Duration::from_millis(now.saturating_sub(e.last_used_ms));
            if older_than.is_some_and(|min| idle < min) {
                continue;
            }
            let Some(_busy) = self.flock(&e.key, FlockArg::LockExclusiveNonblock)? else {
                tracing::debug!("cache entry {} is in use: kept", e.key);
                continue;
            };
            self.remove(&e.key)?;
            removed.push(e.key);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, content).unwrap();
        p
    }

    fn inputs(dir: &Path) -> KeyInputs {
        let id = |n: &str| FileIdentity::of(&dir.join(n)).unwrap();
        KeyInputs {
            format: CACHE_FORMAT,
            fcvm_version: "1".into(),
            image: ImageSource::Archive {
                device: "/dev/vdb".into(),
                reference: String::new(),
            },
            image_file: id("image.tar"),
            kernel: id("vmlinux"),
            rootfs: id("rootfs.ext4"),
            agent_initrd: id("initrd"),
            firecracker: id("firecracker"),
            boot_args: "console=ttyS0".into(),
            vcpus: 1,
            mem_mib: 512,
            network: NETWORK_MODE.into(),
        }
    }

    fn files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "image.tar",
            "vmlinux",
            "rootfs.ext4",
            "initrd",
            "firecracker",
        ] {
            file(dir.path(), n, n.as_bytes());
        }
        dir
    }

    #[test]
    fn the_key_changes_with_every_input_and_only_with_them() {
        let dir = files();
        let base = inputs(dir.path());
        let key = base.key();
        assert_eq!(key.len(), 32);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        // Same inputs, same key (recomputed from the files).
        assert_eq!(inputs(dir.path()).key(), key);

        let mut variants: Vec<KeyInputs> = Vec::new();
        let mut v = base.clone();
        v.vcpus = 2;
        variants.push(v);
        let mut v = base.clone();
        v.mem_mib = 1024;
        variants.push(v);
        let mut v = base.clone();
        v.boot_args.push_str(" quiet");
        variants.push(v);
        let mut v = base.clone();
        v.network = "vmm-tap".into();
        variants.push(v);
        let mut v = base.clone();
        v.fcvm_version = "2".into();
        variants.push(v);
        let mut v = base.clone();
        v.image = ImageSource::Archive {
            device: "/dev/vdb".into(),
            reference: "localhost/other:1".into(),
        };
        variants.push(v);
        let mut keys: Vec<String> = variants.iter().map(KeyInputs::key).collect();
        // Each file, rewritten (new length and mtime) or replaced by another file.
        for n in [
            "image.tar",
            "vmlinux",
            "rootfs.ext4",
            "initrd",
            "firecracker",
        ] {
            std::thread::sleep(Duration::from_millis(5));
            let p = dir.path().join(n);
            let tmp = file(dir.path(), "tmp", b"replaced content");
            fs::rename(&tmp, &p).unwrap();
            let k = inputs(dir.path()).key();
            keys.push(k);
        }
        keys.push(key.clone());
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
    }

    #[test]
    fn file_identity_follows_the_canonical_file() {
        let dir = files();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("vmlinux"), &link).unwrap();
        assert_eq!(
            FileIdentity::of(&link).unwrap(),
            FileIdentity::of(&dir.path().join("vmlinux")).unwrap()
        );
        assert!(FileIdentity::of(&dir.path().join("missing")).is_err());
    }

    /// A published entry as `snapshot::create` leaves it (the files that matter here).
    fn publish(cache: &ImageCache, key: &str, image: &str) {
        let store = cache.store();
        let _l = store.lock().unwrap();
        let staging = store.stage(key).unwrap();
        let meta = serde_json::json!({
            "format_version": 1, "tag": key, "created_at_ms": 1, "source_vm": "a",
            "source_vm_id": "x", "source_kind": "container", "kind": "full", "vcpus": 1,
            "mem_mib": 1, "memory_bytes": 4, "memory_allocated_bytes": 4096,
            "fcvm_version": "1"
        });
        fs::write(
            staging.dir().join(super::super::meta::META_FILE),
            meta.to_string(),
        )
        .unwrap();
        fs::write(staging.dir().join("memory.bin"), b"mem!").unwrap();
        let dir = files();
        let c = CacheMeta {
            key: key.into(),
            image: image.into(),
            digest: "sha256:ab".into(),
            inputs: inputs(dir.path()),
        };
        fs::write(
            staging.dir().join(CACHE_FILE),
            serde_json::to_vec(&c).unwrap(),
        )
        .unwrap();
        store.publish(staging, key).unwrap();
    }

    #[test]
    fn one_creator_per_key_and_the_loser_is_told() {
        let base = tempfile::tempdir().unwrap();
        let paths = Paths::new(base.path());
        let cache = ImageCache::open(&paths).unwrap();
        let key = "0123456789abcdef0123456789abcdef";
        assert!(cache.lookup(key).unwrap().is_none());
        let Claim::Create(lock) = cache.claim(key).unwrap() else {
            panic!("the first claim creates")
        };
        // A second run (another open file description, as another process has).
        let other = ImageCache::open(&paths).unwrap();
        assert!(matches!(other.claim(key).unwrap(), Claim::Busy));
        // Another key is independent.
        assert!(matches!(
            other.claim("ffffffffffffffffffffffffffffffff").unwrap(),
            Claim::Create(_)
        ));
        publish(&cache, key, "localhost/busybox:1");
        drop(lock);
        assert!(matches!(other.claim(key).unwrap(), Claim::Published));
        let entry = other.lookup(key).unwrap().expect("published");
        assert_eq!(entry.meta.tag, key);
        // While a restore holds it shared, prune keeps the entry.
        assert!(cache.prune(None).unwrap().is_empty());
        drop(entry);
        let listed = cache.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].image, "localhost/busybox:1");
        assert_eq!(listed[0].digest, "sha256:ab");
        assert!(listed[0].apparent_bytes > 4);
        // Never hit: last used at its creation (long ago here), so pruned by age; after a
        // hit it is kept until idle long enough.
        assert_eq!(listed[0].last_used_ms, 1);
        cache.touch(key);
        assert!(cache.list().unwrap()[0].last_used_ms > 1);
        assert!(cache
            .prune(Some(Duration::from_secs(3600)))
            .unwrap()
            .is_empty());
        assert_eq!(cache.prune(None).unwrap(), vec![key.to_owned()]);
        assert!(cache.list().unwrap().is_empty());
        assert!(cache.lookup(key).unwrap().is_none());
    }

    #[test]
    fn a_dead_creator_leaves_no_entry() {
        let base = tempfile::tempdir().unwrap();
        let paths = Paths::new(base.path());
        let cache = ImageCache::open(&paths).unwrap();
        let key = "0123456789abcdef0123456789abcdef";
        // A staging dir whose creator is gone, as a SIGKILL during the snapshot leaves it.
        let staging = cache.store().dir().join(format!(".{key}.creating-x"));
        fs::create_dir(&staging).unwrap();
        fs::write(staging.join("memory.bin"), b"partial").unwrap();
        let dead = crate::process::ProcessRef {
            pid: i32::MAX as u32,
            start_time: 1,
        };
        fs::write(staging.join("creator"), serde_json::to_vec(&dead).unwrap()).unwrap();
        assert!(cache.list().unwrap().is_empty());
        assert!(cache.lookup(key).unwrap().is_none());
        // The next run's open sweeps it.
        let _again = ImageCache::open(&paths).unwrap();
        assert!(!staging.exists());
        assert!(matches!(cache.claim(key).unwrap(), Claim::Create(_)));
    }

    #[test]
    fn the_startup_key_follows_what_the_running_container_depends_on() {
        use fcvm_proto::health::HealthCheck;
        let mut plan = fcvm_proto::plan::Plan::new(ImageSource::Archive {
            device: "/dev/vdb".into(),
            reference: String::new(),
        });
        let base = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            StartupInputs::of(base, &plan).unwrap_err(),
            NoStartupTier::NoHealthCheck
        );
        plan.health_check = Some(HealthCheck::new("http://127.0.0.1:80/").unwrap());
        plan.hostname = Some("one".into());
        let key = StartupInputs::of(base, &plan).unwrap().key();
        assert_eq!(key.len(), 32);
        // The VM's name and hostname, the clock and entropy are the run's own: same key.
        let mut same = plan.clone();
        same.hostname = Some("two".into());
        same.host_time_ns = Some(5);
        assert_eq!(StartupInputs::of(base, &same).unwrap().key(), key);
        let mut keys = vec![key.clone()];
        keys.push(
            StartupInputs::of("ffffffffffffffffffffffffffffffff", &plan)
                .unwrap()
                .key(),
        );
        let variants: Vec<fn(&mut fcvm_proto::plan::Plan)> = vec![
            |p| p.health_check.as_mut().unwrap().url = "http://127.0.0.1:81/".into(),
            |p| p.health_check.as_mut().unwrap().interval_ms += 1,
            |p| p.cmd = Some(vec!["httpd".into()]),
            |p| p.entrypoint = Some("/bin/sh".into()),
            |p| {
                p.env.insert("A".into(), "1".into());
            },
            |p| {
                p.proxy.insert("http_proxy".into(), "http://p".into());
            },
            |p| p.user = Some("nobody".into()),
            |p| p.workdir = Some("/tmp".into()),
            |p| p.init = true,
            |p| {
                p.labels.insert("l".into(), "v".into());
            },
            |p| p.privileged = true,
        ];
        for change in variants {
            let mut p = plan.clone();
            change(&mut p);
            keys.push(StartupInputs::of(base, &p).unwrap().key());
        }
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
        // Runs whose other channels a restore would break have none.
        let mut p = plan.clone();
        p.tty = true;
        assert_eq!(
            StartupInputs::of(base, &p).unwrap_err(),
            NoStartupTier::Interactive
        );
        let mut p = plan.clone();
        p.volumes.push(fcvm_proto::plan::Volume {
            guest_path: "/data".into(),
            vsock_port: 5000,
            read_only: false,
        });
        assert_eq!(
            StartupInputs::of(base, &p).unwrap_err(),
            NoStartupTier::Volumes
        );
    }

    #[test]
    fn the_environment_switch() {
        assert!(switched_off(Some("1")));
        assert!(switched_off(Some("yes")));
        assert!(!switched_off(Some("0")));
        assert!(!switched_off(Some("")));
        assert!(!switched_off(None));
    }
}
