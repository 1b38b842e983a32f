//! `fcvm setup kernel`: a guest kernel for Firecracker on real KVM hosts.
//!
//! # What is built
//!
//! An uncompressed x86_64 ELF `vmlinux` (the format Firecracker loads on x86_64), built from
//! Debian's `linux-source-6.1` package with the configuration fragment in
//! `crates/fcvm/guest/kernel.fragment`. The fragment is applied to `make allnoconfig`
//! (`KCONFIG_ALLCONFIG`), so the kernel holds only what a microVM running podman needs:
//! virtio-mmio devices from the command line (block, net, vsock, balloon, rng), ext4,
//! overlayfs, FUSE, every namespace, the v1 and v2 cgroup controllers, seccomp,
//! nftables with the iptables compatibility layer, bridge/veth/tun, the 8250 console and
//! the i8042 reset Firecracker uses to notice a guest reboot. Modules are off; everything
//! is built in. Starting from nothing rather than trimming a distribution config is what
//! makes the build take minutes instead of an hour.
//!
//! **It cannot be booted on fcvm's own build machines**: their `/dev/kvm` is nested PVM,
//! where guest ring 0 is emulated and stock Linux kernels die early. On bare-metal KVM hosts
//! (what users run) it boots like any Firecracker guest kernel. fcvm's tests therefore only
//! check how it is configured and built, never that it boots.
//!
//! # Checking the configuration
//!
//! Kconfig drops an option silently when one of its dependencies is off. After
//! `allnoconfig` + `olddefconfig`, [`check_config`] compares the resulting `.config` with
//! every line of the fragment *and* with [`REQUIRED_OPTIONS`] (fcvm's own list, so that
//! deleting a line from the fragment is caught as well), and the build fails with the
//! names of the options that did not survive.
//!
//! # Caching
//!
//! The kernel is content-addressed like the root filesystem: its name carries a hash of the
//! source package and version (or the tarball's SHA-256 when it is not from a package), the
//! normalised fragment, the architecture and [`FORMAT_VERSION`]. Comments in the fragment
//! do not count. It is built in `tmp/`, checked with [`validate_kernel_image`], and renamed
//! into `kernels/` under a lock, with its `.config` beside it.
//!
//! Users with a kernel of their own pass `--kernel PATH`; [`validate_kernel_image`] tells
//! them early, and why, when the file is not something Firecracker can load.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::artifact::{self, InputHash, Scratch};
pub use super::artifact::{RunFailure, ToolError};
use super::progress::Progress;
pub use super::progress::ProgressMode;
use crate::fsutil::{self, io_at, PathIoError};
use crate::paths::Paths;

mod config;
mod image;

use config::list_mismatches;
pub use config::*;
pub use image::*;

/// Bumped whenever this module changes how a kernel is built from the same inputs.
pub const FORMAT_VERSION: u32 = 1;

/// The configuration fragment shipped with fcvm.
pub const FRAGMENT: &str = include_str!("../../../guest/kernel.fragment");

/// Where Debian's `linux-source-*` packages put their tarball.
pub const DEFAULT_SOURCE_DIR: &str = "/usr/src";

/// Debian package suggested when no source is installed.
pub const SOURCE_PACKAGE_HINT: &str = "linux-source-6.1";

/// Options fcvm cannot work without, checked in the final `.config` whatever the fragment
/// says. Each must be built in (`=y`).
pub const REQUIRED_OPTIONS: &[&str] = &[
    // Boot under Firecracker: KVM clock, serial console, virtio devices from the command line.
    "CONFIG_KVM_GUEST",
    "CONFIG_PARAVIRT",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_VIRTIO_MMIO",
    "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
    "CONFIG_VIRTIO_BLK",
    "CONFIG_VIRTIO_NET",
    "CONFIG_VSOCKETS",
    "CONFIG_VIRTIO_VSOCKETS",
    // Clean shutdown: `reboot=k` goes through the i8042 controller.
    "CONFIG_SERIO_I8042",
    "CONFIG_KEYBOARD_ATKBD",
    // fc-agent arrives in a gzip initrd and mounts the basics itself.
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_RD_GZIP",
    "CONFIG_DEVTMPFS",
    "CONFIG_DEVTMPFS_MOUNT",
    "CONFIG_TMPFS",
    "CONFIG_EXT4_FS",
    "CONFIG_UNIX98_PTYS",
    // Containers.
    "CONFIG_OVERLAY_FS",
    "CONFIG_FUSE_FS",
    "CONFIG_NAMESPACES",
    "CONFIG_UTS_NS",
    "CONFIG_IPC_NS",
    "CONFIG_PID_NS",
    "CONFIG_NET_NS",
    "CONFIG_USER_NS",
    "CONFIG_CGROUPS",
    "CONFIG_MEMCG",
    "CONFIG_CGROUP_PIDS",
    "CONFIG_CPUSETS",
    "CONFIG_CGROUP_FREEZER",
    "CONFIG_CGROUP_DEVICE",
    "CONFIG_CGROUP_BPF",
    "CONFIG_CGROUP_SCHED",
    "CONFIG_SECCOMP",
    "CONFIG_SECCOMP_FILTER",
    "CONFIG_POSIX_MQUEUE",
    // Container networking.
    "CONFIG_VETH",
    "CONFIG_BRIDGE",
    "CONFIG_TUN",
    "CONFIG_NF_TABLES",
    "CONFIG_NFT_COMPAT",
    "CONFIG_NF_NAT",
    "CONFIG_NETFILTER_XTABLES",
];

/// Options that must be off.
pub const FORBIDDEN_OPTIONS: &[&str] = &[
    // Nothing may need loading from a root filesystem that does not carry modules.
    "CONFIG_MODULES",
];

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelOptions {
    /// Source tarball; `None` picks the newest `/usr/src/linux-source-*.tar.*`.
    pub source: Option<PathBuf>,
    /// Parallel compile jobs; `None` uses every CPU.
    pub jobs: Option<usize>,
    /// How progress is shown.
    pub progress: ProgressMode,
}

/// Why no kernel could be configured, built or accepted.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No source tarball.
    #[error("no Linux source tarball (linux-source-*.tar.*) in {}; install one with `apt-get install {SOURCE_PACKAGE_HINT}`", .0.display())]
    NoSource(PathBuf),
    /// The tarball is not laid out as expected.
    #[error("{}: {reason}", tarball.display())]
    SourceLayout {
        /// The tarball.
        tarball: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The fragment is for x86_64 guests.
    #[error(
        "fcvm builds guest kernels for x86_64 only (this host is {0}); pass your own with --kernel"
    )]
    UnsupportedArch(&'static str),
    /// A required tool is missing or too old.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// A fragment line is not `CONFIG_X=value` or `# CONFIG_X is not set`.
    #[error("kernel config fragment line {line_no}: {reason}: {line:?}")]
    BadFragment {
        /// 1-based line number.
        line_no: usize,
        /// The line.
        line: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The fragment contradicts [`REQUIRED_OPTIONS`] or [`FORBIDDEN_OPTIONS`].
    #[error("kernel config fragment sets {name}={value}, but fcvm requires {required}")]
    FragmentConflict {
        /// The option.
        name: String,
        /// What the fragment says.
        value: String,
        /// What fcvm needs.
        required: String,
    },
    /// `make allnoconfig`/`olddefconfig` failed.
    #[error("configuring the kernel failed: {0}")]
    Configure(RunFailure),
    /// Options were dropped by Kconfig.
    #[error("the kernel configuration lacks options fcvm needs (usually a dependency missing from the fragment): {}", list_mismatches(.0))]
    MissingOptions(Vec<ConfigMismatch>),
    /// `make vmlinux` failed.
    #[error("compiling the kernel failed: {0}")]
    Build(RunFailure),
    /// The file is not a kernel Firecracker can boot.
    #[error("{} is not a kernel image Firecracker can boot: {problem}", path.display())]
    InvalidImage {
        /// The file.
        path: PathBuf,
        /// Why.
        problem: ImageProblem,
    },
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// The kernel source a build starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSource {
    /// The tarball.
    pub tarball: PathBuf,
    /// `package version` when a Debian package owns the tarball, else `sha256:<hex>`.
    pub identity: String,
}

impl KernelSource {
    /// Resolve the tarball named in `opts`, or the newest one in [`DEFAULT_SOURCE_DIR`].
    pub fn find(opts: &KernelOptions) -> Result<Self, KernelError> {
        let tarball = match &opts.source {
            Some(path) => {
                if !path.is_file() {
                    return Err(io_at("cannot read kernel source", path)(
                        io::ErrorKind::NotFound.into(),
                    )
                    .into());
                }
                path.clone()
            }
            None => newest_source_tarball(Path::new(DEFAULT_SOURCE_DIR))?,
        };
        let identity = match debian_package_of(&tarball) {
            Some(pkg) => pkg,
            None => format!(
                "sha256:{}",
                fsutil::sha256_file(&tarball).map_err(io_at("cannot hash", &tarball))?
            ),
        };
        Ok(Self { tarball, identity })
    }
}

/// `linux-source-X.Y.tar.*` with the highest X.Y in `dir`.
fn newest_source_tarball(dir: &Path) -> Result<PathBuf, KernelError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(KernelError::NoSource(dir.into()))
        }
        Err(e) => return Err(io_at("cannot list", dir)(e).into()),
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name
                .strip_prefix("linux-source-")?
                .split(".tar.")
                .next()?
                .to_string();
            let parsed = artifact::parse_version(&version)?;
            name.contains(".tar.").then_some((parsed, e.path()))
        })
        .max()
        .map(|(_, path)| path)
        .ok_or_else(|| KernelError::NoSource(dir.into()))
}

/// `package version` of the Debian package that installed `path`, if any.
fn debian_package_of(path: &Path) -> Option<String> {
    let owner = Command::new("dpkg-query")
        .arg("-S")
        .arg(path)
        .output()
        .ok()?;
    if !owner.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&owner.stdout);
    let package = text.lines().next()?.split(':').next()?.trim().to_string();
    let version = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}"])
        .arg(&package)
        .output()
        .ok()?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    (!version.is_empty()).then(|| format!("{package} {version}"))
}

/// The resolved inputs of one kernel build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRecipe {
    /// Where the source comes from.
    pub source: KernelSource,
    /// The fragment text given to Kconfig.
    pub fragment: String,
    /// What the final `.config` must contain.
    pub requirements: Vec<ConfigRequirement>,
}

impl KernelRecipe {
    /// Resolve `opts` with the shipped [`FRAGMENT`].
    pub fn new(opts: &KernelOptions) -> Result<Self, KernelError> {
        Self::with_fragment(KernelSource::find(opts)?, FRAGMENT)
    }

    /// A recipe for `source` with an explicit fragment.
    pub fn with_fragment(source: KernelSource, fragment: &str) -> Result<Self, KernelError> {
        let requirements = requirements(fragment)?;
        Ok(Self {
            source,
            fragment: fragment.to_string(),
            requirements,
        })
    }

    /// Hex SHA-256 of the inputs. The fragment counts by its requirements, so editing a
    /// comment does not cost a 20-minute rebuild.
    pub fn hash(&self) -> String {
        let mut lines: Vec<String> = self
            .requirements
            .iter()
            .map(|r| format!("{}={}", r.name, r.value.as_deref().unwrap_or("n")))
            .collect();
        lines.sort();
        let mut h = InputHash::new("fcvm-kernel");
        h.field("format", FORMAT_VERSION.to_string());
        h.field("arch", std::env::consts::ARCH);
        h.field("source", &self.source.identity);
        h.field("config", lines.join("\n"));
        h.finish()
    }

    /// File name of the kernel: `vmlinux-fcvm-<hash16>`.
    pub fn file_name(&self) -> String {
        format!("vmlinux-fcvm-{}", artifact::short(&self.hash()))
    }
}

/// Where the kernel for `opts` lives (whether or not it has been built).
pub fn kernel_path(paths: &Paths, opts: &KernelOptions) -> Result<PathBuf, KernelError> {
    Ok(paths
        .kernels_dir()
        .join(KernelRecipe::new(opts)?.file_name()))
}

/// The `.config` published beside a built kernel.
pub fn config_path(kernel: &Path) -> PathBuf {
    let mut name = kernel.file_name().unwrap_or_default().to_os_string();
    name.push(".config");
    kernel.with_file_name(name)
}

/// Build the kernel for `opts` unless it already exists; return the vmlinux path.
///
/// Takes 10-25 minutes on two cores. Safe to call concurrently (one build, the others
/// wait); on any error nothing is left in `kernels/` or `tmp/`.
pub fn ensure_kernel(paths: &Paths, opts: &KernelOptions) -> Result<PathBuf, KernelError> {
    let recipe = KernelRecipe::new(opts)?;
    let kernels_dir = paths.kernels_dir();
    let kernel = kernels_dir.join(recipe.file_name());
    if kernel.is_file() {
        return Ok(kernel);
    }
    require_x86_64()?;
    find_tools(BUILD_TOOLS)?;
    if !Path::new("/usr/include/gelf.h").exists() {
        // objtool, which the x86_64 build always runs, links against libelf.
        return Err(ToolError::MissingFile {
            file: "/usr/include/gelf.h".into(),
            package: "libelf-dev".into(),
        }
        .into());
    }

    let mut progress = Progress::new("setup kernel", opts.progress);
    let (_lock, scratch) = lock_and_scratch(paths, &recipe, &progress)?;
    if kernel.is_file() {
        return Ok(kernel);
    }
    let src = extract(&recipe.source, scratch.path(), &mut progress)?;
    let configured = configure(&src, &recipe, scratch.path(), &mut progress)?;

    progress.step("compiling vmlinux");
    let jobs = opts
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let mut cmd = make(&src);
    cmd.arg(format!("-j{jobs}")).arg("vmlinux");
    // The banner (`uname -v`, /proc/version) names the recipe instead of this host.
    cmd.env("KBUILD_BUILD_USER", "fcvm").env(
        "KBUILD_BUILD_HOST",
        format!("fcvm-{}", artifact::short(&recipe.hash())),
    );
    let mut compiled = 0usize;
    artifact::run_streaming(cmd, |line| {
        if line.starts_with("  CC") {
            compiled += 1;
        }
        progress.detail(&format!("{compiled} files; {line}"));
    })
    .map_err(KernelError::Build)?;

    let vmlinux = src.join("vmlinux");
    let info = validate_kernel_image(&vmlinux)?;

    progress.step("publishing");
    fs::create_dir_all(&kernels_dir).map_err(io_at("cannot create", &kernels_dir))?;
    artifact::publish_with_companion(
        (&src.join(".config"), &config_path(&kernel)),
        (&vmlinux, &kernel),
    )?;
    progress.step("removing the build tree");
    drop(scratch);
    progress.finish(&format!(
        "{} ready: {} ({} MiB, {} options)",
        kernel.display(),
        info.linux_version
            .as_deref()
            .map_or("Linux", |v| v.split(" (").next().unwrap_or(v)),
        info.size.div_ceil(1 << 20),
        configured.options_set
    ));
    Ok(kernel)
}

/// What [`check_source_config`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigReport {
    /// `make kernelrelease`, e.g. `6.1.192-fcvm`.
    pub kernel_release: String,
    /// Number of options set in the final `.config`.
    pub options_set: usize,
    /// The final `.config`.
    pub config: String,
    /// Time spent unpacking the source.
    pub extract_time: Duration,
    /// Time spent in `allnoconfig` + `olddefconfig` + the check.
    pub configure_time: Duration,
}

/// Unpack the source, configure it with the fragment and check the result, without
/// compiling anything (about 25 s); the scratch tree is removed afterwards. This is what CI
/// runs on every change to the fragment, since a full build is too slow for it.
pub fn check_source_config(
    paths: &Paths,
    opts: &KernelOptions,
) -> Result<ConfigReport, KernelError> {
    let recipe = KernelRecipe::new(opts)?;
    require_x86_64()?;
    find_tools(CONFIG_TOOLS)?;
    let mut progress = Progress::new("check kernel config", opts.progress);
    let (_lock, scratch) = lock_and_scratch(paths, &recipe, &progress)?;
    let started = Instant::now();
    let src = extract(&recipe.source, scratch.path(), &mut progress)?;
    let extract_time = started.elapsed();
    let started = Instant::now();
    let configured = configure(&src, &recipe, scratch.path(), &mut progress)?;
    let configure_time = started.elapsed();
    progress.finish(&format!(
        "{} options set, all required ones present",
        configured.options_set
    ));
    Ok(ConfigReport {
        kernel_release: configured.kernel_release,
        options_set: configured.options_set,
        config: configured.config,
        extract_time,
        configure_time,
    })
}

/// Kernels built by [`ensure_kernel`] that are present in `kernels/`, newest first. For
/// callers that need *a* built kernel without the source package still being installed.
pub fn built_kernels(paths: &Paths) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(paths.kernels_dir()) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("vmlinux-fcvm-") && !name.contains('.') && entry.file_type()?.is_file()
        {
            found.push((entry.metadata()?.modified()?, entry.path()));
        }
    }
    found.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

fn require_x86_64() -> Result<(), KernelError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(()),
        other => Err(KernelError::UnsupportedArch(other)),
    }
}

/// Prefix of build directories under `tmp/`.
const SCRATCH_PREFIX: &str = "kernel-";

/// Tools needed to configure: (program, Debian package).
const CONFIG_TOOLS: &[(&str, &str)] = &[
    ("tar", "tar"),
    ("xz", "xz-utils"),
    ("make", "make"),
    ("gcc", "gcc"),
    ("flex", "flex"),
    ("bison", "bison"),
];

/// Tools needed to build.
const BUILD_TOOLS: &[(&str, &str)] = &[
    ("tar", "tar"),
    ("xz", "xz-utils"),
    ("make", "make"),
    ("gcc", "gcc"),
    ("ld", "binutils"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("perl", "perl"),
];

fn find_tools(tools: &[(&str, &str)]) -> Result<(), KernelError> {
    for (tool, package) in tools {
        artifact::find_tool(tool, package)?;
    }
    Ok(())
}

/// Lock `kernels/` (builds and config checks share `tmp/kernel-*`, so they take turns),
/// clear stale build trees and make a fresh one.
fn lock_and_scratch(
    paths: &Paths,
    recipe: &KernelRecipe,
    progress: &Progress,
) -> Result<(artifact::DirLock, Scratch), KernelError> {
    let kernels_dir = paths.kernels_dir();
    fs::create_dir_all(&kernels_dir).map_err(io_at("cannot create", &kernels_dir))?;
    let tmp_dir = paths.tmp_dir();
    fs::create_dir_all(&tmp_dir).map_err(io_at("cannot create", &tmp_dir))?;
    let lock = artifact::lock_dir(&kernels_dir, || {
        progress.note("waiting for another kernel build or check to finish")
    })
    .map_err(io_at("cannot lock", &kernels_dir))?;
    artifact::remove_stale(&tmp_dir, SCRATCH_PREFIX)
        .map_err(io_at("cannot clean stale builds in", &tmp_dir))?;
    let scratch = Scratch::create(
        &tmp_dir,
        &format!("{SCRATCH_PREFIX}{}-", artifact::short(&recipe.hash())),
    )
    .map_err(io_at("cannot create a build directory in", &tmp_dir))?;
    Ok((lock, scratch))
}

/// Unpack the tarball into `dir`; return the single top-level directory it holds.
fn extract(
    source: &KernelSource,
    dir: &Path,
    progress: &mut Progress,
) -> Result<PathBuf, KernelError> {
    let name = source
        .tarball
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    progress.step(format!("unpacking {name}"));
    let out = dir.join("src");
    fs::create_dir(&out).map_err(io_at("cannot create", &out))?;
    let mut cmd = Command::new("tar");
    cmd.arg("-xf")
        .arg(&source.tarball)
        .arg("-C")
        .arg(&out)
        .arg("--no-same-owner");
    artifact::run_streaming(cmd, |_| {}).map_err(|e| KernelError::SourceLayout {
        tarball: source.tarball.clone(),
        reason: crate::report::chain(&e),
    })?;
    let mut entries = fs::read_dir(&out)
        .map_err(io_at("cannot list", &out))?
        .filter_map(Result::ok);
    let layout_err = |reason: &str| KernelError::SourceLayout {
        tarball: source.tarball.clone(),
        reason: reason.into(),
    };
    let top = entries
        .next()
        .ok_or_else(|| layout_err("the archive is empty"))?;
    if entries.next().is_some() {
        return Err(layout_err("expected a single top-level directory"));
    }
    let top = top.path();
    if !top.join("Makefile").is_file() || !top.join("arch/x86/Kconfig").is_file() {
        return Err(layout_err("it does not look like a Linux source tree"));
    }
    Ok(top)
}

struct Configured {
    kernel_release: String,
    options_set: usize,
    config: String,
}

/// `allnoconfig` with the fragment, `olddefconfig`, then the requirement check.
fn configure(
    src: &Path,
    recipe: &KernelRecipe,
    scratch: &Path,
    progress: &mut Progress,
) -> Result<Configured, KernelError> {
    progress.step("configuring");
    let fragment = scratch.join("fcvm.fragment");
    fs::write(&fragment, &recipe.fragment).map_err(io_at("cannot write", &fragment))?;
    let mut all_no = make(src);
    all_no
        .arg(format!("KCONFIG_ALLCONFIG={}", fragment.display()))
        .arg("allnoconfig");
    artifact::run_streaming(all_no, |line| progress.detail(line))
        .map_err(KernelError::Configure)?;
    let mut old_def = make(src);
    old_def.arg("olddefconfig");
    artifact::run_streaming(old_def, |line| progress.detail(line))
        .map_err(KernelError::Configure)?;

    let config_file = src.join(".config");
    let config = fs::read_to_string(&config_file).map_err(io_at("cannot read", &config_file))?;
    check_config(&config, &recipe.requirements)?;

    let mut release = make(src);
    release.args(["-s", "kernelrelease"]);
    let mut kernel_release = String::new();
    artifact::run_streaming(release, |line| {
        if !line.trim().is_empty() {
            kernel_release = line.trim().to_string();
        }
    })
    .map_err(KernelError::Configure)?;
    Ok(Configured {
        kernel_release,
        options_set: parse_config(&config).len(),
        config,
    })
}

fn make(src: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C")
        .arg(src)
        .env("LC_ALL", "C")
        .env("ARCH", "x86_64");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(identity: &str) -> KernelSource {
        KernelSource {
            tarball: "/usr/src/linux-source-6.1.tar.xz".into(),
            identity: identity.into(),
        }
    }

    #[test]
    fn hash_follows_source_and_options_but_not_comments() {
        let base =
            KernelRecipe::with_fragment(source("linux-source-6.1 6.1.192-3"), FRAGMENT).unwrap();
        let h0 = base.hash();
        assert_eq!(h0, base.clone().hash());
        let newer =
            KernelRecipe::with_fragment(source("linux-source-6.1 6.1.193-1"), FRAGMENT).unwrap();
        assert_ne!(newer.hash(), h0);
        let more = format!("{FRAGMENT}\nCONFIG_STRICT_DEVMEM=y\n");
        assert_ne!(
            KernelRecipe::with_fragment(source("linux-source-6.1 6.1.192-3"), &more)
                .unwrap()
                .hash(),
            h0
        );
        let commented = format!("# a new comment\n{FRAGMENT}\n\n");
        assert_eq!(
            KernelRecipe::with_fragment(source("linux-source-6.1 6.1.192-3"), &commented)
                .unwrap()
                .hash(),
            h0
        );
        assert!(base.file_name().starts_with("vmlinux-fcvm-"));
        assert_eq!(
            config_path(Path::new("/k/vmlinux-fcvm-ab")),
            PathBuf::from("/k/vmlinux-fcvm-ab.config")
        );
    }

    #[test]
    fn newest_tarball_is_picked_by_version() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            newest_source_tarball(dir.path()),
            Err(KernelError::NoSource(_))
        ));
        for name in [
            "linux-source-6.1.tar.xz",
            "linux-source-6.12.tar.xz",
            "linux-source-6.9.tar.xz",
            "linux-config-6.1",
        ] {
            fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(
            newest_source_tarball(dir.path()).unwrap(),
            dir.path().join("linux-source-6.12.tar.xz")
        );
        let err = newest_source_tarball(&dir.path().join("none")).unwrap_err();
        assert!(
            err.to_string().contains("apt-get install linux-source-6.1"),
            "{err}"
        );
    }

    #[test]
    fn built_kernels_lists_only_kernels_newest_first() {
        let base = tempfile::tempdir().unwrap();
        let paths = Paths::new(base.path());
        assert!(built_kernels(&paths).unwrap().is_empty());
        let dir = paths.kernels_dir();
        fs::create_dir_all(&dir).unwrap();
        for name in [
            "vmlinux-fcvm-aaaa",
            "vmlinux-fcvm-aaaa.config",
            "vmlinux-other",
            "vmlinux-fcvm-bbbb",
        ] {
            fs::write(dir.join(name), b"").unwrap();
        }
        let old = fs::File::options()
            .write(true)
            .open(dir.join("vmlinux-fcvm-aaaa"))
            .unwrap();
        old.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(
            built_kernels(&paths).unwrap(),
            [dir.join("vmlinux-fcvm-bbbb"), dir.join("vmlinux-fcvm-aaaa")]
        );
    }

    /// The configuration step on the real Debian source, as CI runs it (~25 s).
    #[test]
    fn real_source_configures_with_every_required_option() {
        let opts = KernelOptions {
            progress: ProgressMode::Plain,
            ..KernelOptions::default()
        };
        let source = match KernelSource::find(&opts) {
            Ok(s) => s,
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "kernel source required under CI (apt-get install linux-source-6.1): {e}"
                );
                eprintln!("SKIPPED: real_source_configures_with_every_required_option: {e}");
                return;
            }
        };
        let base = tempfile::tempdir().unwrap();
        let paths = Paths::new(base.path());
        let report = check_source_config(&paths, &opts).unwrap();
        eprintln!(
            "kernel config check on {} ({}): unpack {:.1} s, configure {:.1} s, {} options, release {}",
            source.tarball.display(),
            source.identity,
            report.extract_time.as_secs_f64(),
            report.configure_time.as_secs_f64(),
            report.options_set,
            report.kernel_release
        );
        assert!(
            report.kernel_release.ends_with("-fcvm"),
            "{}",
            report.kernel_release
        );
        check_config(&report.config, &requirements(FRAGMENT).unwrap()).unwrap();
        // The scratch tree is gone; only the (empty) directories remain.
        assert_eq!(fs::read_dir(paths.tmp_dir()).unwrap().count(), 0);
        assert_eq!(fs::read_dir(paths.kernels_dir()).unwrap().count(), 0);
    }

    /// The full build: 10-25 minutes on two cores, so only with FCVM_TEST_KERNEL_BUILD=1.
    #[test]
    fn real_kernel_builds_and_is_cached() {
        if std::env::var_os("FCVM_TEST_KERNEL_BUILD").is_none_or(|v| v != "1") {
            eprintln!("SKIPPED: real_kernel_builds_and_is_cached: set FCVM_TEST_KERNEL_BUILD=1 to build the guest kernel (10-25 min)");
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let paths = Paths::new(base.path());
        let opts = KernelOptions {
            progress: ProgressMode::Plain,
            ..KernelOptions::default()
        };
        let started = Instant::now();
        let kernel = ensure_kernel(&paths, &opts).unwrap();
        let took = started.elapsed();
        let info = validate_kernel_image(&kernel).unwrap();
        eprintln!(
            "kernel build: {:.0} s, {} bytes, {:?}",
            took.as_secs_f64(),
            info.size,
            info.linux_version
        );
        assert_eq!(kernel, kernel_path(&paths, &opts).unwrap());
        assert!(
            info.linux_version
                .as_deref()
                .is_some_and(|v| v.contains("-fcvm")),
            "{info:?}"
        );
        let published = fs::read_to_string(config_path(&kernel)).unwrap();
        check_config(&published, &requirements(FRAGMENT).unwrap()).unwrap();

        // A second ensure finds the published file and leaves it alone (a rebuild would
        // rename a new inode into place).
        use std::os::unix::fs::MetadataExt;
        let before = fs::metadata(&kernel).unwrap();
        assert_eq!(ensure_kernel(&paths, &opts).unwrap(), kernel);
        let after = fs::metadata(&kernel).unwrap();
        assert_eq!(
            (before.ino(), before.mtime_nsec()),
            (after.ino(), after.mtime_nsec())
        );
        assert_eq!(fs::read_dir(paths.tmp_dir()).unwrap().count(), 0);
    }
}
