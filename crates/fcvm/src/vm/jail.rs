//! Firecracker under its jailer: the default launcher when fcvm runs as root.
//!
//! Layout (facts from Firecracker's `docs/jailer.md`, v1.12): the jailer chroots into
//! `<chroot_base>/firecracker/<id>/root`, copies the Firecracker binary there, makes
//! `/dev/kvm`, `/dev/net/tun` and `/dev/userfaultfd`, chowns the chroot to `--uid/--gid`,
//! puts itself in the cgroup `<cgroup mount>/<parent>/<id>` with the `--cgroup` values,
//! joins `--netns`, and with `--new-pid-ns` forks Firecracker as PID 1 of a new PID
//! namespace (writing its host pid to `firecracker.pid` in the chroot) and exits.
//!
//! fcvm's chroot *is* the VM's runtime directory: the jailer is started in a private mount
//! namespace in which the runtime directory is bind-mounted on the (empty) chroot path, and
//! the jailer's own non-recursive bind of the chroot onto itself takes exactly that mount.
//! So the VMM sees only its runtime directory, and fcvm keeps using the runtime paths it
//! always used. Inside it, `run/fcvm/vm` is a symlink to `/`, so the VMM sees the same
//! [`crate::paths::VMM_VIEW_DIR`] paths with or without the jailer: snapshots restore in
//! any VM's chroot, jailed or not. Files from outside (kernel, initrd, shared drives, a
//! clone's vmstate, the page server's socket) are hard-linked (or copied) into `in/`.
//!
//! Everything the jailer leaves on the host (the chroot path, the cgroups, the uid claim)
//! is an undo step in the VM's record before it exists ([`JailPlan::undo_steps`]).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::cleanup::CleanupStep;
use crate::firecracker::binary::{self, BinaryError, Program};
use crate::paths::{Paths, VMM_VIEW_DIR};

/// Opting out of the jailer (as `--no-jailer` does).
pub const NO_JAILER_ENV: &str = "FCVM_NO_JAILER";
/// The uid range jailed VMMs get their uid and gid from, `FIRST-LAST`.
pub const UID_RANGE_ENV: &str = "FCVM_JAILER_UIDS";
/// Default uid range: above the usual `/etc/subuid` allotments (100000 + 65536 * n).
pub const DEFAULT_UIDS: (u32, u32) = (2_000_000, 2_065_535);
/// Parent cgroup of every jailed VM's cgroup (`--parent-cgroup`).
pub const PARENT_CGROUP: &str = "fcvm";
/// Memory a jailed VMM uses beyond guest memory, in MiB: Firecracker's own heap, vCPU and
/// device threads' stacks, page tables. Measured on a probe guest under the jailer (peak
/// usage minus guest memory was under 20 MiB, see `jailed_vmm_is_confined`); doubled for
/// headroom, since hitting the limit kills the VM.
pub const VMM_OVERHEAD_MIB: u64 = 48;
/// `cpu.weight` (cgroup v2) per vCPU; 100 is the kernel's default for one cgroup.
pub const CPU_WEIGHT_PER_VCPU: u64 = 100;
/// `cpu.shares` (cgroup v1) per vCPU; 1024 is the kernel's default.
pub const CPU_SHARES_PER_VCPU: u64 = 1024;
/// The name of the Firecracker binary inside the chroot (must contain `firecracker`).
pub const EXEC_FILE_NAME: &str = "firecracker";
/// Where staged inputs live, inside the runtime directory.
pub const INPUTS_DIR: &str = "in";

static OPTED_OUT: AtomicBool = AtomicBool::new(false);

/// Record `--no-jailer` for this process (the CLI calls this once).
pub fn set_opt_out(no_jailer: bool) {
    OPTED_OUT.store(no_jailer, Ordering::Relaxed);
}

fn opted_out() -> bool {
    OPTED_OUT.load(Ordering::Relaxed)
        || std::env::var(NO_JAILER_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Why the jailer cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jailer binary is missing or too old.
    #[error("the jailer is needed to run Firecracker as root (run `fcvm setup firecracker`, or pass --no-jailer / FCVM_NO_JAILER=1 to run without it)")]
    Binary(#[source] BinaryError),
    /// `FCVM_JAILER_UIDS` is malformed.
    #[error(
        "{UID_RANGE_ENV}={0:?} is not a uid range like 2000000-2065535 (first > 0, first <= last)"
    )]
    UidRange(String),
    /// Every uid of the range is in use.
    #[error("no free jailer uid in {first}-{last}: {count} VMs hold them all (see {})", dir.display())]
    UidsExhausted {
        /// First uid.
        first: u32,
        /// Last uid.
        last: u32,
        /// How many.
        count: u64,
        /// The claims directory.
        dir: PathBuf,
    },
    /// A file the VM needs cannot be given to its jailed VMM.
    #[error("{what} {} cannot be used under the jailer: {why} (use --no-jailer to run without it)", path.display())]
    Input {
        /// What it is.
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Filesystem trouble.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JailError {
    let path = path.to_owned();
    move |source| JailError::Io {
        action,
        path,
        source,
    }
}

/// The jailer launcher's settings (a [`super::Launcher`] variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    /// The jailer binary.
    pub jailer: PathBuf,
    /// The Firecracker binary it copies into each chroot.
    pub firecracker: PathBuf,
    /// `--chroot-base-dir`.
    pub chroot_base: PathBuf,
    /// Where uid claims are kept (one file per uid in use).
    pub uid_claims: PathBuf,
    /// First and last uid handed out (gid = uid).
    pub uids: (u32, u32),
}

impl JailerConfig {
    /// Settings under `paths`, the jailer beside `firecracker` (or `FCVM_JAILER_BIN`, or on
    /// `PATH`), uids from `FCVM_JAILER_UIDS`.
    pub fn for_host(paths: &Paths, firecracker: &Path) -> Result<JailerConfig, JailError> {
        let beside = firecracker.with_file_name("jailer");
        let jailer = if std::env::var_os(Program::Jailer.env()).is_none() && beside.is_file() {
            beside
        } else {
            binary::find(Program::Jailer, paths)
                .map_err(JailError::Binary)?
                .path
        };
        let uids = match std::env::var(UID_RANGE_ENV) {
            Ok(v) if !v.is_empty() => parse_uid_range(&v).ok_or(JailError::UidRange(v))?,
            _ => DEFAULT_UIDS,
        };
        Ok(JailerConfig {
            jailer,
            firecracker: firecracker.to_owned(),
            chroot_base: paths.jail_dir(),
            uid_claims: paths.jail_dir().join("uids"),
            uids,
        })
    }
}

/// The configured uid range (`FCVM_JAILER_UIDS`, or the default when unset or malformed;
/// a malformed value fails the launch itself, see [`JailerConfig::for_host`]).
pub fn uid_range() -> (u32, u32) {
    std::env::var(UID_RANGE_ENV)
        .ok()
        .and_then(|v| parse_uid_range(&v))
        .unwrap_or(DEFAULT_UIDS)
}

/// `FIRST-LAST` as a uid range.
pub fn parse_uid_range(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a > 0 && a <= b).then_some((a, b))
}

/// Whether VMs launched by this process go through the jailer: as root, unless opted out
/// (with a warning, once per call).
pub fn wanted() -> bool {
    if !nix::unistd::geteuid().is_root() {
        return false;
    }
    if opted_out() {
        tracing::warn!(
            "running Firecracker without its jailer (--no-jailer / {NO_JAILER_ENV}): the VMM runs as root with the host's filesystem in view"
        );
        return false;
    }
    true
}

/// The cgroup hierarchy the jailer will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Unified hierarchy with the memory and cpu controllers available.
    V2 {
        /// Its mount point.
        mount: PathBuf,
    },
    /// Legacy hierarchies.
    V1 {
        /// The memory controller's mount.
        memory: PathBuf,
        /// The cpu controller's mount.
        cpu: PathBuf,
    },
}

impl CgroupLayout {
    /// Read `/proc/self/mounts`.
    pub fn detect() -> Option<CgroupLayout> {
        let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
        Self::from_mounts(&mounts)
    }

    /// The layout described by a mounts table: v2 when a cgroup2 mount offers the memory
    /// controller (its `cgroup.controllers`), else v1 when memory and cpu are mounted.
    pub fn from_mounts(mounts: &str) -> Option<CgroupLayout> {
        let mut v1_memory = None;
        let mut v1_cpu = None;
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            let (mount, fstype, opts) = (PathBuf::from(f[1]), f[2], f[3]);
            match fstype {
                "cgroup2" => {
                    let controllers =
                        fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
                    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
                    if has("memory") && has("cpu") {
                        return Some(CgroupLayout::V2 { mount });
                    }
                }
                "cgroup" => {
                    let has = |c: &str| opts.split(',').any(|x| x == c);
                    if has("memory") {
                        v1_memory.get_or_insert(mount.clone());
                    }
                    if has("cpu") {
                        v1_cpu.get_or_insert(mount);
                    }
                }
                _ => {}
            }
        }
        Some(CgroupLayout::V1 {
            memory: v1_memory?,
            cpu: v1_cpu?,
        })
    }

    /// `--cgroup-version`.
    pub fn version(&self) -> &'static str {
        match self {
            CgroupLayout::V2 { .. } => "2",
            CgroupLayout::V1 { .. } => "1",
        }
    }

    /// The `--cgroup` settings: the memory limit in bytes and a CPU weight for `vcpus`.
    pub fn settings(&self, memory_limit: u64, vcpus: u8) -> Vec<String> {
        let vcpus = u64::from(vcpus.max(1));
        match self {
            CgroupLayout::V2 { .. } => vec![
                format!("memory.max={memory_limit}"),
                format!("cpu.weight={}", (CPU_WEIGHT_PER_VCPU * vcpus).min(10_000)),
            ],
            CgroupLayout::V1 { .. } => vec![
                format!("memory.limit_in_bytes={memory_limit}"),
                format!("cpu.shares={}", CPU_SHARES_PER_VCPU * vcpus),
            ],
        }
    }

    /// The cgroup directories the jailer creates for VM `id`.
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self {
            CgroupLayout::V2 { mount } => vec![mount.join(PARENT_CGROUP).join(id)],
            CgroupLayout::V1 { memory, cpu } => {
                let mut v = vec![memory.join(PARENT_CGROUP).join(id)];
                let c = cpu.join(PARENT_CGROUP).join(id);
                if !v.contains(&c) {
                    v.push(c);
                }
                v
            }
        }
    }
}

/// What the record keeps about a jailed VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailInfo {
    /// The VMM's uid (and gid).
    pub uid: u32,
    /// The chroot path the runtime directory is mounted on.
    pub chroot: PathBuf,
    /// Its cgroup directories.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// Its memory limit in bytes (None: no cgroup controller was available).
    #[serde(default)]
    pub memory_limit: Option<u64>,
}

/// One VM's jail, decided before anything is made (the uid is claimed by then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPlan {
    /// The VM id (`--id`).
    pub id: String,
    /// `--uid` and `--gid`.
    pub uid: u32,
    /// `<chroot_base>/firecracker/<id>/root`.
    pub chroot: PathBuf,
    /// The claim file holding the uid.
    pub claim: PathBuf,
    /// The cgroup hierarchy (None: none usable, the VM runs without limits).
    pub cgroups: Option<CgroupLayout>,
    /// The memory limit in bytes: guest memory plus [`VMM_OVERHEAD_MIB`].
    pub memory_limit: u64,
    /// vCPUs (for the CPU weight).
    pub vcpus: u8,
}

impl JailPlan {
    /// Plan the jail of VM `id` and claim its uid.
    pub fn claim(
        cfg: &JailerConfig,
        id: &str,
        mem_mib: u32,
        vcpus: u8,
        cgroups: Option<CgroupLayout>,
    ) -> Result<JailPlan, JailError> {
        let (uid, claim) = claim_uid(&cfg.uid_claims, cfg.uids, id)?;
        Ok(JailPlan {
            id: id.to_owned(),
            uid,
            chroot: chroot_dir(&cfg.chroot_base, id),
            claim,
            cgroups,
            memory_limit: (u64::from(mem_mib) + VMM_OVERHEAD_MIB) << 20,
            vcpus,
        })
    }

    /// Give the uid back (after a launch that never recorded it).
    pub fn release(&self) {
        let _ = fs::remove_file(&self.claim);
    }

    /// The undo steps, in order: the chroot path, the cgroups (after the VMM is gone), the
    /// uid claim last (so the uid is not reused while anything of the VM remains).
    pub fn undo_steps(&self) -> Vec<CleanupStep> {
        let mut steps = vec![CleanupStep::RemoveDir {
            path: self.chroot.parent().expect("has a parent").to_owned(),
        }];
        for dir in self.cgroup_dirs() {
            steps.push(CleanupStep::RemoveCgroup { path: dir });
        }
        steps.push(CleanupStep::RemoveFile {
            path: self.claim.clone(),
        });
        steps
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroups
            .as_ref()
            .map(|c| c.dirs(&self.id))
            .unwrap_or_default()
    }

    /// What the record keeps.
    pub fn info(&self) -> JailInfo {
        JailInfo {
            uid: self.uid,
            chroot: self.chroot.clone(),
            cgroups: self.cgroup_dirs(),
            memory_limit: self.cgroups.is_some().then_some(self.memory_limit),
        }
    }

    /// The jailer's arguments, ending with `--` and Firecracker's own `fc_args`.
    pub fn argv(
        &self,
        cfg: &JailerConfig,
        netns: Option<&Path>,
        fc_args: &[OsString],
    ) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            a.push(k.into());
            a.push(v);
        };
        push("--id", self.id.clone().into());
        push("--exec-file", cfg.firecracker.clone().into());
        push("--uid", self.uid.to_string().into());
        push("--gid", self.uid.to_string().into());
        push("--chroot-base-dir", cfg.chroot_base.clone().into());
        if let Some(c) = &self.cgroups {
            push("--cgroup-version", c.version().into());
            push("--parent-cgroup", PARENT_CGROUP.into());
            for s in c.settings(self.memory_limit, self.vcpus) {
                push("--cgroup", s.into());
            }
        }
        if let Some(ns) = netns {
            push("--netns", ns.into());
        }
        a.push("--new-pid-ns".into());
        a.push("--".into());
        a.extend(fc_args.iter().cloned());
        a
    }
}

/// `<chroot_base>/firecracker/<id>/root`.
pub fn chroot_dir(chroot_base: &Path, id: &str) -> PathBuf {
    chroot_base.join(EXEC_FILE_NAME).join(id).join("root")
}

/// Claim a free uid of `range` for VM `id`: a file per uid created with `O_EXCL`, so two
/// fcvm processes never get the same one. The search starts at a point derived from the id,
/// so concurrent launches rarely probe the same files.
pub fn claim_uid(dir: &Path, range: (u32, u32), id: &str) -> Result<(u32, PathBuf), JailError> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let count = u64::from(range.1 - range.0) + 1;
    let start = id
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
        % count;
    for i in 0..count {
        let uid = range.0 + ((start + i) % count) as u32;
        let path = dir.join(uid.to_string());
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                use std::io::Write;
                let _ = f.write_all(id.as_bytes());
                return Ok((uid, path));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("claim a uid in", dir)(e)),
        }
    }
    Err(JailError::UidsExhausted {
        first: range.0,
        last: range.1,
        count,
        dir: dir.to_owned(),
    })
}

/// The VMM's path of a staged input named `name`.
pub fn staged_vmm_path(name: &str) -> String {
    format!("{VMM_VIEW_DIR}/{INPUTS_DIR}/{name}")
}

/// How an input is given to the jailed VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A hard link: the VMM uses the shared file (it must be readable, or writable, by
    /// anyone; a read-only input that is not is copied privately instead).
    Link {
        /// The VMM writes to it.
        write: bool,
    },
    /// A private copy owned by the VM's uid, 0600 (small secrets such as a vmstate, or a
    /// memory file when no page server serves it).
    Copy,
    /// A hard link to a socket, which the VMM connects to.
    Socket,
}

/// Put `src` into the runtime directory `vm_dir` as `in/<name>` for uid `uid`; returns the
/// VMM's path of it.
pub fn stage_input(
    vm_dir: &Path,
    uid: u32,
    what: &str,
    name: &str,
    src: &Path,
    how: Stage,
) -> Result<String, JailError> {
    let dir = vm_dir.join(INPUTS_DIR);
    if !dir.exists() {
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        chown(&dir, uid).map_err(io_err("chown", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &dir))?;
    }
    let dst = dir.join(name);
    let refuse = |why: String| JailError::Input {
        what: what.to_owned(),
        path: src.to_owned(),
        why,
    };
    match how {
        Stage::Link { write } => {
            let meta = fs::metadata(src).map_err(io_err("read", src))?;
            let mode = meta.mode();
            let others = if write { 0o006 } else { 0o004 };
            if mode & others != others && meta.uid() != uid {
                if !write {
                    // Private to someone else: the VM gets a private copy instead.
                    crate::storage::clone_file(src, &dst).map_err(io_err("copy", src))?;
                    private_to(&dst, uid)?;
                    return Ok(staged_vmm_path(name));
                }
                return Err(refuse(format!(
                    "the jailed VMM (uid {uid}) may not {} it (mode {:o}, owner {})",
                    if write { "write" } else { "read" },
                    mode & 0o777,
                    meta.uid()
                )));
            }
            link_or_copy(src, &dst, write).map_err(|e| refuse(e.to_string()))?;
        }
        Stage::Copy => {
            crate::storage::clone_file(src, &dst).map_err(io_err("copy", src))?;
            private_to(&dst, uid)?;
        }
        Stage::Socket => {
            fs::hard_link(src, &dst).map_err(|e| {
                refuse(format!(
                    "cannot link it into the chroot ({e}); it must be on the same filesystem as the base directory"
                ))
            })?;
        }
    }
    Ok(staged_vmm_path(name))
}

fn link_or_copy(src: &Path, dst: &Path, write: bool) -> io::Result<()> {
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        // Another filesystem: a read-only input can be copied; a written one cannot (the
        // guest's writes would not reach the file).
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) && !write => {
            crate::storage::clone_file(src, dst).map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// chown `path` to `uid:uid` and make it 0600: a file of the VM's that holds guest data.
pub fn private_to(path: &Path, uid: u32) -> Result<(), JailError> {
    chown(path, uid).map_err(io_err("chown", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", path))
}

fn chown(path: &Path, uid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
}

/// Make `run/fcvm/vm` inside the runtime directory lead back to it, so that inside the
/// chroot (where the runtime directory is `/`) the VMM's paths are the usual
/// [`VMM_VIEW_DIR`] ones. The link is relative, so on the host it also stays inside.
pub fn make_view_link(vm_dir: &Path) -> Result<(), JailError> {
    let rel = VMM_VIEW_DIR.trim_start_matches('/');
    let link = vm_dir.join(rel);
    let parent = link.parent().expect("view dir has a parent");
    fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    let depth = Path::new(rel).components().count() - 1;
    let target: PathBuf = std::iter::repeat_n("..", depth).collect();
    match std::os::unix::fs::symlink(&target, &link) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("link", &link)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> JailerConfig {
        JailerConfig {
            jailer: "/opt/jailer".into(),
            firecracker: "/opt/firecracker".into(),
            chroot_base: dir.join("jail"),
            uid_claims: dir.join("jail/uids"),
            uids: (5000, 5002),
        }
    }

    #[test]
    fn argv_has_the_jail_then_firecrackers_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path());
        let layout = CgroupLayout::V2 {
            mount: "/sys/fs/cgroup".into(),
        };
        let plan = JailPlan::claim(&cfg, "abc-1", 256, 2, Some(layout)).unwrap();
        let argv = plan.argv(
            &cfg,
            Some(Path::new("/run/netns/fcvm-abc")),
            &[
                "--api-sock".into(),
                "/run/fcvm/vm/firecracker.socket".into(),
            ],
        );
        let s: Vec<String> = argv.iter().map(|a| a.to_string_lossy().into()).collect();
        let uid = plan.uid.to_string();
        let limit = ((256 + VMM_OVERHEAD_MIB) << 20).to_string();
        let want = [
            "--id",
            "abc-1",
            "--exec-file",
            "/opt/firecracker",
            "--uid",
            &uid,
            "--gid",
            &uid,
            "--chroot-base-dir",
        ];
        assert_eq!(&s[..want.len()], want);
        let joined = s.join(" ");
        assert!(
            joined.contains("--cgroup-version 2 --parent-cgroup fcvm"),
            "{joined}"
        );
        assert!(
            joined.contains(&format!("--cgroup memory.max={limit}")),
            "{joined}"
        );
        assert!(joined.contains("--cgroup cpu.weight=200"), "{joined}");
        assert!(joined.contains("--netns /run/netns/fcvm-abc"), "{joined}");
        assert!(
            joined.ends_with("--new-pid-ns -- --api-sock /run/fcvm/vm/firecracker.socket"),
            "{joined}"
        );
        assert!(!joined.contains("--no-seccomp"), "{joined}");
        assert_eq!(
            plan.chroot,
            dir.path().join("jail/firecracker/abc-1/root"),
            "the jailer's layout"
        );
    }

    #[test]
    fn uids_are_claimed_once_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path());
        let plans: Vec<JailPlan> = ["a", "b", "c"]
            .iter()
            .map(|id| JailPlan::claim(&cfg, id, 64, 1, None).unwrap())
            .collect();
        let mut uids: Vec<u32> = plans.iter().map(|p| p.uid).collect();
        uids.sort();
        assert_eq!(uids, [5000, 5001, 5002]);
        let err = JailPlan::claim(&cfg, "d", 64, 1, None).unwrap_err();
        assert!(
            err.to_string().contains("no free jailer uid in 5000-5002"),
            "{err}"
        );
        plans[1].release();
        assert_eq!(
            JailPlan::claim(&cfg, "e", 64, 1, None).unwrap().uid,
            plans[1].uid
        );
    }

    #[test]
    fn concurrent_claims_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let claims = dir.path().join("uids");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let claims = claims.clone();
                std::thread::spawn(move || {
                    claim_uid(&claims, (10, 17), &format!("vm{i}")).unwrap().0
                })
            })
            .collect();
        let mut uids: Vec<u32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        uids.sort();
        assert_eq!(uids, (10..=17).collect::<Vec<_>>());
    }

    #[test]
    fn undo_steps_cover_chroot_cgroups_and_uid() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path());
        let layout = CgroupLayout::V1 {
            memory: "/cg/memory".into(),
            cpu: "/cg/cpu".into(),
        };
        let plan = JailPlan::claim(&cfg, "x1", 128, 1, Some(layout)).unwrap();
        assert_eq!(
            plan.undo_steps(),
            vec![
                CleanupStep::RemoveDir {
                    path: dir.path().join("jail/firecracker/x1")
                },
                CleanupStep::RemoveCgroup {
                    path: "/cg/memory/fcvm/x1".into()
                },
                CleanupStep::RemoveCgroup {
                    path: "/cg/cpu/fcvm/x1".into()
                },
                CleanupStep::RemoveFile {
                    path: plan.claim.clone()
                },
            ]
        );
        let s = plan.argv(&cfg, None, &[]);
        let joined: Vec<String> = s.iter().map(|a| a.to_string_lossy().into()).collect();
        let joined = joined.join(" ");
        assert!(joined.contains("--cgroup-version 1"), "{joined}");
        assert!(joined.contains("--cgroup cpu.shares=1024"), "{joined}");
        assert!(!joined.contains("--netns"), "{joined}");
    }

    #[test]
    fn cgroup_layout_from_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = dir.path().join("v2");
        fs::create_dir_all(&v2).unwrap();
        fs::write(v2.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        let table = format!("cgroup2 {} cgroup2 rw,nosuid 0 0\n", v2.display());
        assert_eq!(
            CgroupLayout::from_mounts(&table),
            Some(CgroupLayout::V2 { mount: v2.clone() })
        );
        // Hybrid: a cgroup2 mount without controllers, the controllers on v1.
        let empty = dir.path().join("unified");
        fs::create_dir_all(&empty).unwrap();
        fs::write(empty.join("cgroup.controllers"), "\n").unwrap();
        let table = format!(
            "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n\
             cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
             cgroup2 {} cgroup2 rw 0 0\n",
            empty.display()
        );
        assert_eq!(
            CgroupLayout::from_mounts(&table),
            Some(CgroupLayout::V1 {
                memory: "/sys/fs/cgroup/memory".into(),
                cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
            })
        );
        assert_eq!(CgroupLayout::from_mounts("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn staging_links_copies_and_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("vm");
        fs::create_dir_all(&vm).unwrap();
        let shared = dir.path().join("kernel");
        fs::write(&shared, b"k").unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o644)).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let p = stage_input(
            &vm,
            me,
            "kernel",
            "kernel",
            &shared,
            Stage::Link { write: false },
        )
        .unwrap();
        assert_eq!(p, "/run/fcvm/vm/in/kernel");
        assert_eq!(
            fs::metadata(vm.join("in/kernel")).unwrap().ino(),
            fs::metadata(&shared).unwrap().ino(),
            "hard link"
        );
        // A file only its owner may read is refused for another uid, naming it.
        let secret = dir.path().join("vmstate");
        fs::write(&secret, b"s").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        let other = me + 1;
        let err = stage_input(
            &vm,
            other,
            "drive",
            "d",
            &secret,
            Stage::Link { write: true },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("drive") && err.contains("may not write"),
            "{err}"
        );
        // Copied instead: private to the VM.
        if nix::unistd::geteuid().is_root() {
            stage_input(&vm, other, "vmstate", "vmstate", &secret, Stage::Copy).unwrap();
            let m = fs::metadata(vm.join("in/vmstate")).unwrap();
            assert_eq!((m.uid(), m.mode() & 0o777), (other, 0o600));
        }
    }

    #[test]
    fn view_link_leads_back_to_the_runtime_dir() {
        let dir = tempfile::tempdir().unwrap();
        make_view_link(dir.path()).unwrap();
        make_view_link(dir.path()).unwrap();
        fs::write(dir.path().join("probe"), b"x").unwrap();
        assert_eq!(
            fs::read(dir.path().join("run/fcvm/vm/probe")).unwrap(),
            b"x"
        );
        assert_eq!(
            fs::read_link(dir.path().join("run/fcvm/vm")).unwrap(),
            PathBuf::from("../..")
        );
    }

    #[test]
    fn uid_range_parsing() {
        assert_eq!(parse_uid_range("100-200"), Some((100, 200)));
        assert_eq!(parse_uid_range("0-200"), None);
        assert_eq!(parse_uid_range("300-200"), None);
        assert_eq!(parse_uid_range("x"), None);
    }
}
