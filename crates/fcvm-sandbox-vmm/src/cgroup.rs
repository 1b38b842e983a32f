//! One cgroup per sandbox in every hierarchy the VMM itself is in.
//!
//! The sandbox joins these before creating its cgroup namespace, so inside it they are the
//! roots: podman's `libpod_parent` and container cgroups end up below them and are removed with
//! them. The v1 freezer (or cgroup v2 `cgroup.freeze`) implements `PATCH /vm Paused`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Prefix of sandbox cgroup directory names; followed by the VMM's pid.
pub const PREFIX: &str = "fcvm-sandbox-";

/// Errors managing cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Creating a directory failed.
    #[error("Cannot create cgroup {0}: {1}")]
    Create(PathBuf, io::Error),
    /// Neither a v1 freezer nor cgroup v2 is available.
    #[error("No freezer available (no v1 freezer hierarchy and no cgroup v2); cannot pause")]
    NoFreezer,
    /// Writing a control file failed.
    #[error("Cannot write {0}: {1}")]
    Write(PathBuf, io::Error),
}

/// A cgroup in one hierarchy.
#[derive(Debug, Clone)]
struct Node {
    dir: PathBuf,
    /// v1 controllers ("" for the v2 hierarchy).
    controllers: String,
}

/// The sandbox's cgroups.
#[derive(Debug, Default)]
pub struct SandboxCgroups {
    nodes: Vec<Node>,
}

/// (mount point, fstype, super options) of cgroup mounts.
fn cgroup_mounts() -> Vec<(PathBuf, String, String)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let _src = r.next()?;
            let opts = r.next()?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| {
                (
                    PathBuf::from(mount_point),
                    fstype.to_owned(),
                    opts.to_owned(),
                )
            })
        })
        .collect()
}

/// Each (hierarchy mount point, our path in it, controllers).
fn our_cgroups() -> Vec<(PathBuf, String)> {
    let mounts = cgroup_mounts();
    let text = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrls), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let mount = if ctrls.is_empty() {
            mounts.iter().find(|(_, t, _)| t == "cgroup2")
        } else {
            mounts.iter().find(|(_, t, o)| {
                t == "cgroup" && ctrls.split(',').all(|c| o.split(',').any(|x| x == c))
            })
        };
        if let Some((mp, _, _)) = mount {
            out.push((mp.join(path.trim_start_matches('/')), ctrls.to_owned()));
        }
    }
    out
}

impl SandboxCgroups {
    /// Creates `<our cgroup>/fcvm-sandbox-<pid>-<tag>` in every hierarchy we are in.
    pub fn create(tag: &str) -> Result<Self, CgroupError> {
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        let mut nodes = Vec::new();
        for (base, controllers) in our_cgroups() {
            let dir = base.join(&name);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    let me = Self { nodes };
                    me.remove(Duration::ZERO);
                    return Err(CgroupError::Create(dir, e));
                }
            }
            // A new cpuset starts with no CPUs or memory nodes, and joining it fails (ENOSPC)
            // until they are set: inherit the parent's.
            if controllers.split(',').any(|c| c == "cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(v) = fs::read_to_string(base.join(f)) {
                        let _ = fs::write(dir.join(f), v.trim());
                    }
                }
            }
            nodes.push(Node { dir, controllers });
        }
        Ok(Self { nodes })
    }

    /// `cgroup.procs` files the sandbox writes its pid into.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.nodes
            .iter()
            .map(|n| n.dir.join("cgroup.procs"))
            .collect()
    }

    /// Freezes (`true`) or thaws every process in the sandbox.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        if let Some(n) = self
            .nodes
            .iter()
            .find(|n| n.controllers.split(',').any(|c| c == "freezer"))
        {
            let f = n.dir.join("freezer.state");
            let v = if frozen { "FROZEN" } else { "THAWED" };
            return fs::write(&f, v).map_err(|e| CgroupError::Write(f, e));
        }
        if let Some(n) = self
            .nodes
            .iter()
            .find(|n| n.controllers.is_empty() && n.dir.join("cgroup.freeze").exists())
        {
            let f = n.dir.join("cgroup.freeze");
            return fs::write(&f, if frozen { "1" } else { "0" })
                .map_err(|e| CgroupError::Write(f, e));
        }
        Err(CgroupError::NoFreezer)
    }

    /// Removes the cgroups (children first), waiting up to `patience` for processes to leave.
    /// Returns the directories that could not be removed.
    pub fn remove(&self, patience: Duration) -> Vec<PathBuf> {
        let _ = self.freeze(false);
        let deadline = Instant::now() + patience;
        let mut left = Vec::new();
        for n in &self.nodes {
            loop {
                match remove_tree(&n.dir) {
                    Ok(()) => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => {
                        left.push(n.dir.clone());
                        break;
                    }
                }
            }
        }
        left
    }
}

/// rmdir of a cgroup tree, deepest first (cgroup directories only contain control files,
/// which rmdir ignores).
fn remove_tree(dir: &Path) -> io::Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    remove_tree(&e.path())?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes sandbox cgroups left by VMMs that died without cleaning up (SIGKILL), i.e. whose
/// pid is no longer alive. Best effort.
pub fn collect_stale() {
    for (base, _) in our_cgroups() {
        let Ok(entries) = fs::read_dir(&base) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = remove_tree(&e.path());
            }
        }
    }
}
