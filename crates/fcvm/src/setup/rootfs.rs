//! `fcvm setup rootfs`: the guest root filesystem, built from Debian packages.
//!
//! # What is built
//!
//! An ext4 image holding a Debian system with podman, crun, conmon, netavark and the tools
//! fc-agent calls (see `crates/fcvm/guest/packages.list`), plus a few configuration files
//! from `crates/fcvm/guest/rootfs/` that adapt podman to a guest without systemd. The image
//! has no init system and no fc-agent: the agent arrives through the initrd at boot, so a new
//! agent build never requires a new root filesystem.
//!
//! # How
//!
//! 1. `mmdebstrap --mode=root --variant=essential --format=directory` installs the package
//!    list into a directory under `tmp/`. The `essential` variant starts from the
//!    Essential:yes set only: no apt, no init system, none of `minbase`'s Priority:required
//!    extras. A guest that never installs packages at run time needs none of them, and
//!    every package left out is time saved on each build. mmdebstrap runs in a private
//!    mount namespace
//!    (`unshare --mount`) so the `/proc`, `/sys` and `/dev` mounts it makes inside the tree
//!    die with it even if it is killed, and can never be followed when the tree is deleted.
//! 2. Our configuration files are written into the tree (refusing to follow symlinks, so a
//!    package cannot redirect a write to the host).
//! 3. `mkfs.ext4 -d` turns the tree into a sparse image of the requested size
//!    ([`DEFAULT_IMAGE_SIZE_MIB`] by default); the free space is the guest's room for
//!    container images and layers.
//! 4. The image and a list of the installed package versions are renamed into
//!    `rootfs/` under an exclusive lock.
//!
//! # Content addressing
//!
//! The file name carries a hash of every input that shapes the image: the suite,
//! architecture, mirror, package list, the mmdebstrap arguments, the bytes and modes of our
//! configuration files, the image size and [`FORMAT_VERSION`] (bumped when this code starts
//! producing different images from the same inputs). Building again with the same inputs is
//! a `stat`. The archive itself is not an input: a rebuild months later may pick newer
//! package versions, which is what a security update should do; the `.packages` file beside
//! the image records what was installed.
//!
//! Needs root (mmdebstrap's root mode and `mkfs.ext4 -d` must preserve file ownership), the
//! `mmdebstrap` and `e2fsprogs` packages, and network access to the Debian mirror
//! (`deb.debian.org` unless [`RootfsOptions::mirror`] says otherwise). A build takes about
//! a minute (60-80 s measured on two busy cores) and ~250 MB of scratch space; the image
//! holds ~200 MiB of files.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::artifact::{self, InputHash, Scratch};
pub use super::artifact::{RunFailure, ToolError};
use super::progress::Progress;
pub use super::progress::ProgressMode;
use crate::fsutil::{io_at, PathIoError};
use crate::paths::Paths;

/// Bumped whenever this module changes how an image is made from the same inputs, so old
/// images are not reused.
pub const FORMAT_VERSION: u32 = 1;

/// Debian release installed by default.
pub const DEFAULT_SUITE: &str = "bookworm";

/// Default image size. The file is sparse: only the ~300 MB actually written use disk.
pub const DEFAULT_IMAGE_SIZE_MIB: u64 = 2048;

/// The package list shipped with fcvm.
pub const PACKAGE_LIST: &str = include_str!("../../guest/packages.list");

/// Smallest image we make; below this the ext4 journal and metadata dominate.
const MIN_IMAGE_SIZE_MIB: u64 = 256;

/// mmdebstrap 1.0 is the oldest release tested (bookworm has 1.3.5).
const MIN_MMDEBSTRAP: (u32, u32, u32) = (1, 0, 0);

/// `mkfs.ext4 -d` (populate from a directory) appeared in e2fsprogs 1.43.
const MIN_E2FSPROGS: (u32, u32, u32) = (1, 43, 0);

/// A configuration file written into the tree after the packages are installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    /// Path inside the guest, relative to `/`.
    pub path: &'static str,
    /// Permission bits.
    pub mode: u32,
    /// Content.
    pub contents: &'static str,
}

/// Configuration files from `crates/fcvm/guest/rootfs/`; each explains itself in comments.
pub const GUEST_FILES: &[GuestFile] = &[
    GuestFile {
        path: "etc/containers/containers.conf",
        mode: 0o644,
        contents: include_str!("../../guest/rootfs/etc/containers/containers.conf"),
    },
    GuestFile {
        path: "etc/containers/registries.conf",
        mode: 0o644,
        contents: include_str!("../../guest/rootfs/etc/containers/registries.conf"),
    },
    GuestFile {
        path: "etc/containers/storage.conf",
        mode: 0o644,
        contents: include_str!("../../guest/rootfs/etc/containers/storage.conf"),
    },
    GuestFile {
        path: "etc/hosts",
        mode: 0o644,
        contents: include_str!("../../guest/rootfs/etc/hosts"),
    },
    GuestFile {
        path: "etc/hostname",
        mode: 0o644,
        contents: "fcvm\n",
    },
    // fc-agent writes the real resolver list from the kernel command line at boot; an
    // empty file keeps the host's resolver (which mmdebstrap copies in for apt) out of the
    // image.
    GuestFile {
        path: "etc/resolv.conf",
        mode: 0o644,
        contents: "",
    },
];

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsOptions {
    /// Debian suite (`bookworm`).
    pub suite: String,
    /// Debian mirror URL; `None` uses mmdebstrap's default, `http://deb.debian.org/debian`.
    pub mirror: Option<String>,
    /// Packages added to [`PACKAGE_LIST`].
    pub extra_packages: Vec<String>,
    /// Size of the ext4 image in MiB.
    pub image_size_mib: u64,
    /// How progress is shown.
    pub progress: ProgressMode,
}

impl Default for RootfsOptions {
    fn default() -> Self {
        Self {
            suite: DEFAULT_SUITE.into(),
            mirror: None,
            extra_packages: Vec::new(),
            image_size_mib: DEFAULT_IMAGE_SIZE_MIB,
            progress: ProgressMode::Auto,
        }
    }
}

/// Why the root filesystem could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// An option is malformed.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidOption {
        /// Which option.
        what: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Not running as root.
    #[error("building the guest root filesystem needs root (mmdebstrap's root mode and mkfs.ext4 -d must keep file owners); run `sudo fcvm setup rootfs`")]
    NotRoot,
    /// A required tool is missing or too old.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// mmdebstrap failed.
    #[error("installing the Debian packages failed: {0}\n  (check the package names and that the mirror is reachable; nothing was published)")]
    Mmdebstrap(RunFailure),
    /// mkfs.ext4 failed.
    #[error("making the ext4 image failed: {0}")]
    Mkfs(RunFailure),
    /// The tree does not fit.
    #[error("the installed tree needs about {needed_mib} MiB but the image size is {size_mib} MiB; ask for a larger image")]
    ImageTooSmall {
        /// Requested size.
        size_mib: u64,
        /// Estimated need.
        needed_mib: u64,
    },
    /// A path inside the tree is a symlink where a directory or file of ours goes.
    #[error("{0} inside the new tree is a symlink; refusing to write through it")]
    UnsafePath(PathBuf),
    /// A filesystem operation failed.
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// The fully resolved inputs of one image: everything that goes into its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsRecipe {
    /// Debian suite.
    pub suite: String,
    /// Debian architecture (`amd64`, `arm64`).
    pub arch: &'static str,
    /// Mirror URL, if not the default.
    pub mirror: Option<String>,
    /// Sorted, de-duplicated package names.
    pub packages: Vec<String>,
    /// Configuration files written into the tree.
    pub files: Vec<GuestFile>,
    /// Image size in MiB.
    pub image_size_mib: u64,
}

impl RootfsRecipe {
    /// Validate `opts` and resolve them against the shipped package list and files.
    pub fn new(opts: &RootfsOptions) -> Result<Self, RootfsError> {
        Self::with_parts(opts, PACKAGE_LIST, GUEST_FILES)
    }

    fn with_parts(
        opts: &RootfsOptions,
        package_list: &str,
        files: &[GuestFile],
    ) -> Result<Self, RootfsError> {
        let invalid = |what, value: &str, reason| RootfsError::InvalidOption {
            what,
            value: value.into(),
            reason,
        };
        if opts.suite.is_empty()
            || !opts
                .suite
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(invalid(
                "suite",
                &opts.suite,
                "expected a Debian codename such as bookworm",
            ));
        }
        if let Some(mirror) = &opts.mirror {
            if mirror.is_empty() || mirror.chars().any(char::is_whitespace) {
                return Err(invalid("mirror", mirror, "expected a URL without spaces"));
            }
        }
        if opts.image_size_mib < MIN_IMAGE_SIZE_MIB {
            return Err(invalid(
                "image size",
                &opts.image_size_mib.to_string(),
                "the minimum is 256 MiB",
            ));
        }
        let mut packages: Vec<String> = parse_package_list(package_list);
        for extra in &opts.extra_packages {
            packages.push(extra.trim().to_string());
        }
        for p in &packages {
            if !is_package_name(p) {
                return Err(invalid(
                    "package name",
                    p,
                    "Debian package names use lowercase letters, digits, '+', '-' and '.'",
                ));
            }
        }
        packages.sort();
        packages.dedup();
        Ok(Self {
            suite: opts.suite.clone(),
            arch: debian_arch(),
            mirror: opts.mirror.clone(),
            packages,
            files: files.to_vec(),
            image_size_mib: opts.image_size_mib,
        })
    }

    /// mmdebstrap's arguments, minus the target directory.
    fn mmdebstrap_args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--mode=root",
            "--variant=essential",
            "--format=directory",
            "--components=main",
            // Nobody reads manuals, documentation or translations inside a microVM; leaving
            // them out saves about 60 MB per image. Copyright files stay.
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/info/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--aptopt=Acquire::Retries \"3\"",
        ]
        .map(String::from)
        .to_vec();
        args.push(format!("--architectures={}", self.arch));
        args.push(format!("--include={}", self.packages.join(",")));
        args.push(self.suite.clone());
        args
    }

    /// Hex SHA-256 of every input.
    pub fn hash(&self) -> String {
        let mut h = InputHash::new("fcvm-rootfs");
        h.field("format", FORMAT_VERSION.to_string());
        h.field("suite", &self.suite);
        h.field("arch", self.arch);
        h.field("mirror", self.mirror.as_deref().unwrap_or(""));
        h.field("packages", self.packages.join("\n"));
        h.field("mmdebstrap", self.mmdebstrap_args().join("\n"));
        for f in &self.files {
            h.field("file", f.path);
            h.field("mode", format!("{:o}", f.mode));
            h.field("contents", f.contents);
        }
        h.field("size_mib", self.image_size_mib.to_string());
        h.finish()
    }

    /// File name of the image: `debian-<suite>-<arch>-<hash16>.ext4`.
    pub fn image_name(&self) -> String {
        format!(
            "debian-{}-{}-{}.ext4",
            self.suite,
            self.arch,
            artifact::short(&self.hash())
        )
    }
}

/// Where the image for `opts` lives (whether or not it has been built).
pub fn rootfs_path(paths: &Paths, opts: &RootfsOptions) -> Result<PathBuf, RootfsError> {
    Ok(paths
        .rootfs_dir()
        .join(RootfsRecipe::new(opts)?.image_name()))
}

/// The package manifest (`<package>\t<version>` lines) written beside an image.
pub fn manifest_path(image: &Path) -> PathBuf {
    image.with_extension("packages")
}

/// Build the root filesystem for `opts` unless it already exists; return the image path.
///
/// Safe to call concurrently: one caller builds, the others wait on the lock and then find
/// the image. On any error nothing is left in `rootfs/` or `tmp/`.
pub fn ensure_rootfs(paths: &Paths, opts: &RootfsOptions) -> Result<PathBuf, RootfsError> {
    let recipe = RootfsRecipe::new(opts)?;
    let rootfs_dir = paths.rootfs_dir();
    let image = rootfs_dir.join(recipe.image_name());
    if image.is_file() {
        return Ok(image);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(RootfsError::NotRoot);
    }
    let tools = Tools::find()?;

    let mut progress = Progress::new("setup rootfs", opts.progress);
    fs::create_dir_all(&rootfs_dir).map_err(io_at("cannot create", &rootfs_dir))?;
    let tmp_dir = paths.tmp_dir();
    fs::create_dir_all(&tmp_dir).map_err(io_at("cannot create", &tmp_dir))?;
    let _lock = artifact::lock_dir(&rootfs_dir, || {
        progress.note("waiting for another `fcvm setup rootfs` to finish")
    })
    .map_err(io_at("cannot lock", &rootfs_dir))?;
    if image.is_file() {
        return Ok(image);
    }
    artifact::remove_stale(&tmp_dir, SCRATCH_PREFIX)
        .map_err(io_at("cannot clean stale builds in", &tmp_dir))?;
    let scratch = Scratch::create(
        &tmp_dir,
        &format!("{SCRATCH_PREFIX}{}-", artifact::short(&recipe.hash())),
    )
    .map_err(io_at("cannot create a build directory in", &tmp_dir))?;

    let tree = scratch.path().join("tree");
    run_mmdebstrap(&tools, &recipe, &tree, &mut progress)?;

    progress.step("writing configuration");
    for file in &recipe.files {
        write_guest_file(&tree, file)?;
    }
    let manifest = scratch.path().join("manifest");
    write_manifest(&tools, &tree, &manifest)?;

    progress.step("making ext4 image");
    let (used_bytes, _) = artifact::tree_usage(&tree).map_err(io_at("cannot measure", &tree))?;
    let needed_mib = estimate_image_mib(used_bytes);
    if needed_mib > recipe.image_size_mib {
        return Err(RootfsError::ImageTooSmall {
            size_mib: recipe.image_size_mib,
            needed_mib,
        });
    }
    let staged = scratch.path().join("image.ext4");
    make_ext4(&tools, &tree, &staged, recipe.image_size_mib)?;
    // Flushing the ~250 MB mkfs wrote is the slow part of publishing; account it here.
    fs::File::open(&staged)
        .and_then(|f| f.sync_all())
        .map_err(io_at("cannot sync", &staged))?;

    progress.step("publishing");
    artifact::publish_with_companion((&manifest, &manifest_path(&image)), (&staged, &image))?;
    progress.step("removing the build tree");
    drop(scratch);
    progress.finish(&format!(
        "{} ready, {} MiB used of {} MiB",
        image.display(),
        used_bytes.div_ceil(1 << 20),
        recipe.image_size_mib
    ));
    Ok(image)
}

/// Names of build directories under `tmp/`.
const SCRATCH_PREFIX: &str = "rootfs-";

struct Tools {
    mmdebstrap: PathBuf,
    mkfs: PathBuf,
    unshare: PathBuf,
    dpkg_query: PathBuf,
}

impl Tools {
    fn find() -> Result<Self, ToolError> {
        let mmdebstrap = artifact::find_tool("mmdebstrap", "mmdebstrap")?;
        artifact::require_version(&mmdebstrap, &["--version"], MIN_MMDEBSTRAP, "mmdebstrap")?;
        let mkfs = artifact::find_tool("mkfs.ext4", "e2fsprogs")?;
        artifact::require_version(&mkfs, &["-V"], MIN_E2FSPROGS, "e2fsprogs")?;
        Ok(Self {
            mmdebstrap,
            mkfs,
            unshare: artifact::find_tool("unshare", "util-linux")?,
            dpkg_query: artifact::find_tool("dpkg-query", "dpkg")?,
        })
    }
}

fn run_mmdebstrap(
    tools: &Tools,
    recipe: &RootfsRecipe,
    tree: &Path,
    progress: &mut Progress,
) -> Result<(), RootfsError> {
    progress.step("resolving packages");
    let mut cmd = Command::new(&tools.unshare);
    cmd.args(["--mount", "--propagation", "private", "--"])
        .arg(&tools.mmdebstrap);
    cmd.args(recipe.mmdebstrap_args()).arg(tree);
    if let Some(mirror) = &recipe.mirror {
        cmd.arg(mirror);
    }
    cmd.env("LC_ALL", "C.UTF-8");
    artifact::run_streaming(cmd, |line| {
        if let Some(step) = mmdebstrap_phase(line) {
            progress.step(step);
        }
        progress.detail(line);
    })
    .map_err(|mut failure| {
        // The command line starts with `unshare`; name the tool that actually failed.
        failure.program = "mmdebstrap".into();
        RootfsError::Mmdebstrap(failure)
    })
}

/// Map mmdebstrap's `I:` phase lines onto our progress steps.
fn mmdebstrap_phase(line: &str) -> Option<&'static str> {
    let phase = line.strip_prefix("I: ")?;
    if phase.starts_with("downloading packages") {
        Some("downloading packages")
    } else if phase.starts_with("extracting archives") || phase.starts_with("installing") {
        Some("installing packages")
    } else {
        None
    }
}

/// Write `file` under `tree`, creating parent directories, without following any symlink
/// on the way: the tree was just populated by package scripts and is not trusted to point
/// inside itself.
fn write_guest_file(tree: &Path, file: &GuestFile) -> Result<(), RootfsError> {
    let rel = Path::new(file.path);
    let mut dir = tree.to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            dir.push(part);
            match fs::symlink_metadata(&dir) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(RootfsError::UnsafePath(dir))
                }
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(RootfsError::UnsafePath(dir)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&dir).map_err(io_at("cannot create", &dir))?;
                    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
                        .map_err(io_at("cannot chmod", &dir))?;
                }
                Err(e) => return Err(io_at("cannot inspect", &dir)(e).into()),
            }
        }
    }
    let path = tree.join(rel);
    if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(RootfsError::UnsafePath(path));
    }
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(file.mode)
        .open(&path)
        .map_err(io_at("cannot write", &path))?;
    out.write_all(file.contents.as_bytes())
        .map_err(io_at("cannot write", &path))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(file.mode))
        .map_err(io_at("cannot chmod", &path))
        .map_err(Into::into)
}

fn write_manifest(tools: &Tools, tree: &Path, manifest: &Path) -> Result<(), RootfsError> {
    let admindir = tree.join("var/lib/dpkg");
    let out = Command::new(&tools.dpkg_query)
        .arg(format!("--admindir={}", admindir.display()))
        .args(["-W", "-f", "${Package}\t${Version}\n"])
        .output()
        .map_err(io_at("cannot run dpkg-query on", &admindir))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(io_at("cannot list packages in", &admindir)(io::Error::other(msg)).into());
    }
    fs::write(manifest, &out.stdout)
        .map_err(io_at("cannot write", manifest))
        .map_err(Into::into)
}

/// Room for the tree plus ext4's own metadata (journal, inode tables: roughly 5 % plus a
/// fixed part) and a little slack.
fn estimate_image_mib(used_bytes: u64) -> u64 {
    let used_mib = used_bytes.div_ceil(1 << 20);
    used_mib + used_mib / 10 + 96
}

fn make_ext4(tools: &Tools, tree: &Path, image: &Path, size_mib: u64) -> Result<(), RootfsError> {
    let mut cmd = Command::new(&tools.mkfs);
    // -m 0: the guest's only user is root, reserved blocks would just be lost space.
    // -E root_owner: the image root belongs to root whatever owns the scratch directory.
    cmd.args([
        "-q",
        "-F",
        "-L",
        "fcvm-root",
        "-m",
        "0",
        "-E",
        "root_owner=0:0",
        "-d",
    ])
    .arg(tree)
    .arg(image)
    .arg(format!("{size_mib}M"));
    artifact::run_streaming(cmd, |_| {}).map_err(RootfsError::Mkfs)
}

fn parse_package_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(String::from)
        .collect()
}

/// Debian policy §5.6.1: lowercase letters, digits, `+`, `-`, `.`; at least two
/// characters; starts with an alphanumeric.
fn is_package_name(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.len() >= 2
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.'))
}

fn debian_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(opts: &RootfsOptions) -> RootfsRecipe {
        RootfsRecipe::new(opts).unwrap()
    }

    #[test]
    fn package_list_has_what_podman_needs() {
        let r = recipe(&RootfsOptions::default());
        for p in [
            "podman",
            "crun",
            "conmon",
            "netavark",
            "fuse-overlayfs",
            "iproute2",
            "ca-certificates",
        ] {
            assert!(
                r.packages.iter().any(|x| x == p),
                "{p} missing from {:?}",
                r.packages
            );
        }
        let mut sorted = r.packages.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, r.packages);
    }

    #[test]
    fn hash_changes_with_every_input() {
        let base = RootfsOptions::default();
        let h0 = recipe(&base).hash();
        assert_eq!(h0, recipe(&base).hash(), "hash must be deterministic");

        let variants = [
            RootfsOptions {
                suite: "trixie".into(),
                ..base.clone()
            },
            RootfsOptions {
                mirror: Some("http://mirror.example/debian".into()),
                ..base.clone()
            },
            RootfsOptions {
                extra_packages: vec!["strace".into()],
                ..base.clone()
            },
            RootfsOptions {
                image_size_mib: 4096,
                ..base.clone()
            },
        ];
        for v in &variants {
            assert_ne!(recipe(v).hash(), h0, "{v:?} should change the hash");
        }

        // A changed configuration file, mode or package list changes it too.
        let mut files = GUEST_FILES.to_vec();
        files[0].contents = "# different\n";
        assert_ne!(
            RootfsRecipe::with_parts(&base, PACKAGE_LIST, &files)
                .unwrap()
                .hash(),
            h0
        );
        let mut files = GUEST_FILES.to_vec();
        files[0].mode = 0o600;
        assert_ne!(
            RootfsRecipe::with_parts(&base, PACKAGE_LIST, &files)
                .unwrap()
                .hash(),
            h0
        );
        let fewer = PACKAGE_LIST.replace("\nprocps\n", "\n");
        assert_ne!(fewer, PACKAGE_LIST);
        assert_ne!(
            RootfsRecipe::with_parts(&base, &fewer, GUEST_FILES)
                .unwrap()
                .hash(),
            h0
        );
    }

    #[test]
    fn hash_ignores_presentation_only_differences() {
        let base = RootfsOptions::default();
        // Progress display, duplicates and order of extra packages do not change the image.
        let quiet = RootfsOptions {
            progress: ProgressMode::Quiet,
            ..base.clone()
        };
        assert_eq!(recipe(&quiet).hash(), recipe(&base).hash());
        let dup = RootfsOptions {
            extra_packages: vec!["podman".into()],
            ..base.clone()
        };
        assert_eq!(recipe(&dup).hash(), recipe(&base).hash());
        let ab = RootfsOptions {
            extra_packages: vec!["strace".into(), "less".into()],
            ..base.clone()
        };
        let ba = RootfsOptions {
            extra_packages: vec!["less".into(), "strace".into()],
            ..base
        };
        assert_eq!(recipe(&ab).hash(), recipe(&ba).hash());
    }

    #[test]
    fn image_name_carries_suite_arch_and_hash() {
        let r = recipe(&RootfsOptions::default());
        let name = r.image_name();
        assert!(name.starts_with("debian-bookworm-"), "{name}");
        assert!(name.ends_with(".ext4"), "{name}");
        assert!(name.contains(&r.hash()[..16]), "{name}");
        let p = rootfs_path(&Paths::new("/base"), &RootfsOptions::default()).unwrap();
        assert_eq!(p, PathBuf::from("/base/rootfs").join(&name));
        assert_eq!(manifest_path(&p).extension().unwrap(), "packages");
    }

    #[test]
    fn bad_options_are_rejected_before_anything_runs() {
        let base = RootfsOptions::default();
        for bad in [
            RootfsOptions {
                extra_packages: vec!["Podman".into()],
                ..base.clone()
            },
            RootfsOptions {
                extra_packages: vec!["a,b".into()],
                ..base.clone()
            },
            RootfsOptions {
                extra_packages: vec!["x".into()],
                ..base.clone()
            },
            RootfsOptions {
                suite: "book worm".into(),
                ..base.clone()
            },
            RootfsOptions {
                mirror: Some("http://a b".into()),
                ..base.clone()
            },
            RootfsOptions {
                image_size_mib: 10,
                ..base.clone()
            },
        ] {
            let err = RootfsRecipe::new(&bad).unwrap_err();
            assert!(
                matches!(err, RootfsError::InvalidOption { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn package_list_parsing_skips_comments_and_blanks() {
        assert_eq!(parse_package_list("# c\n\n a \nb # why\n"), ["a", "b"]);
    }

    #[test]
    fn mmdebstrap_phases_map_to_steps() {
        assert_eq!(
            mmdebstrap_phase("I: downloading packages with apt..."),
            Some("downloading packages")
        );
        assert_eq!(
            mmdebstrap_phase("I: extracting archives..."),
            Some("installing packages")
        );
        assert_eq!(
            mmdebstrap_phase("I: installing remaining packages inside the chroot..."),
            Some("installing packages")
        );
        assert_eq!(mmdebstrap_phase("I: running apt-get update..."), None);
        assert_eq!(mmdebstrap_phase("Get:1 http://deb.debian.org ..."), None);
    }

    #[test]
    fn guest_files_are_written_without_following_symlinks() {
        let tree = tempfile::tempdir().unwrap();
        let file = GuestFile {
            path: "etc/containers/x.conf",
            mode: 0o640,
            contents: "k = 1\n",
        };
        write_guest_file(tree.path(), &file).unwrap();
        let written = tree.path().join("etc/containers/x.conf");
        assert_eq!(fs::read_to_string(&written).unwrap(), "k = 1\n");
        assert_eq!(
            fs::metadata(&written).unwrap().permissions().mode() & 0o777,
            0o640
        );

        // A symlinked directory on the way is refused, and nothing lands at its target.
        let outside = tempfile::tempdir().unwrap();
        let tree2 = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), tree2.path().join("etc")).unwrap();
        let err = write_guest_file(tree2.path(), &file).unwrap_err();
        assert!(matches!(err, RootfsError::UnsafePath(_)), "{err}");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

        // So is a symlink in place of the file itself.
        let tree3 = tempfile::tempdir().unwrap();
        fs::create_dir_all(tree3.path().join("etc/containers")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("t"),
            tree3.path().join("etc/containers/x.conf"),
        )
        .unwrap();
        assert!(matches!(
            write_guest_file(tree3.path(), &file),
            Err(RootfsError::UnsafePath(_))
        ));
        assert!(!outside.path().join("t").exists());
    }

    #[test]
    fn image_estimate_leaves_room_for_metadata() {
        assert!(estimate_image_mib(300 << 20) > 300);
        assert!(estimate_image_mib(300 << 20) < DEFAULT_IMAGE_SIZE_MIB);
    }

    /// Real builds need root and mmdebstrap; say loudly when they cannot run.
    fn real_build_possible(test: &str) -> bool {
        let ci = std::env::var_os("CI").is_some();
        if !nix::unistd::geteuid().is_root() {
            assert!(!ci, "{test}: root is required under CI");
            eprintln!("SKIPPED: {test}: needs root (mmdebstrap --mode=root, mkfs.ext4 -d)");
            return false;
        }
        if let Err(e) = artifact::find_tool("mmdebstrap", "mmdebstrap") {
            assert!(!ci, "{test}: {e} (required under CI)");
            eprintln!("SKIPPED: {test}: {e}");
            return false;
        }
        true
    }

    /// Run one debugfs request against an image (read-only) and return its stdout.
    fn debugfs(image: &Path, request: &str) -> String {
        let out = Command::new(artifact::find_tool("debugfs", "e2fsprogs").unwrap())
            .args(["-R", request])
            .arg(image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "debugfs {request}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = match fs::read_dir(dir) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    /// Builds the real image (30-60 s, needs the Debian mirror), from two threads at once.
    #[test]
    fn real_image_has_podman_and_our_config_and_is_built_once() {
        if !real_build_possible("real_image_has_podman_and_our_config_and_is_built_once") {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let paths = Paths::new(base.path());
        let opts = RootfsOptions {
            progress: ProgressMode::Plain,
            ..RootfsOptions::default()
        };

        // Two concurrent setups: one builds, the other waits on the lock and finds the image.
        let started = std::time::Instant::now();
        let (first, second) = std::thread::scope(|s| {
            let a = s.spawn(|| ensure_rootfs(&paths, &opts));
            let b = s.spawn(|| ensure_rootfs(&paths, &opts));
            (a.join().unwrap(), b.join().unwrap())
        });
        let image = first.unwrap();
        assert_eq!(second.unwrap(), image);
        assert_eq!(image, rootfs_path(&paths, &opts).unwrap());
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(&image).unwrap();
        eprintln!(
            "rootfs build: {:.1} s, image {} MiB apparent, {} MiB allocated",
            started.elapsed().as_secs_f64(),
            meta.len() >> 20,
            (meta.blocks() * 512) >> 20
        );
        assert_eq!(meta.len(), DEFAULT_IMAGE_SIZE_MIB << 20);
        let image_name = image.file_name().unwrap().to_string_lossy().into_owned();
        let manifest_name = manifest_path(&image)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut want = vec![image_name, manifest_name];
        want.sort();
        assert_eq!(
            names_in(&paths.rootfs_dir()),
            want,
            "exactly one image and its manifest"
        );
        assert_eq!(
            names_in(&paths.tmp_dir()),
            Vec::<String>::new(),
            "build directory removed"
        );

        // The file system is clean and holds the container stack and our configuration.
        let fsck = Command::new(artifact::find_tool("e2fsck", "e2fsprogs").unwrap())
            .args(["-f", "-n"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        for file in [
            "/usr/bin/podman",
            "/usr/bin/crun",
            "/usr/bin/conmon",
            "/usr/bin/fuse-overlayfs",
            "/usr/bin/catatonit",
            "/usr/bin/ip",
            "/usr/lib/podman/netavark",
            "/usr/lib/podman/aardvark-dns",
            "/etc/ssl/certs/ca-certificates.crt",
        ] {
            let stat = debugfs(&image, &format!("stat {file}"));
            assert!(
                stat.contains("Type: regular") || stat.contains("Type: symlink"),
                "{file} missing: {stat}"
            );
        }
        for file in GUEST_FILES {
            let content = debugfs(&image, &format!("cat /{}", file.path));
            assert_eq!(content, file.contents, "/{} differs", file.path);
        }
        let manifest = fs::read_to_string(manifest_path(&image)).unwrap();
        assert!(
            manifest.lines().any(|l| l.starts_with("podman\t4.")),
            "podman 4.x in manifest:\n{manifest}"
        );

        // Building again is a no-op: the same file (a rebuild would rename a new inode in).
        let before = fs::metadata(&image).unwrap();
        assert_eq!(ensure_rootfs(&paths, &opts).unwrap(), image);
        let after = fs::metadata(&image).unwrap();
        assert_eq!(
            (before.ino(), before.mtime_nsec()),
            (after.ino(), after.mtime_nsec())
        );
    }

    /// A package that does not exist fails the build with apt's complaint, and leaves
    /// nothing behind.
    #[test]
    fn real_failure_names_the_bad_package_and_leaves_nothing() {
        if !real_build_possible("real_failure_names_the_bad_package_and_leaves_nothing") {
            return;
        }
        let base = tempfile::tempdir().unwrap();
        let paths = Paths::new(base.path());
        let opts = RootfsOptions {
            extra_packages: vec!["fcvm-no-such-package".into()],
            progress: ProgressMode::Quiet,
            ..RootfsOptions::default()
        };
        let err = ensure_rootfs(&paths, &opts).unwrap_err();
        let RootfsError::Mmdebstrap(failure) = &err else {
            panic!("expected an mmdebstrap failure, got {err}")
        };
        let msg = err.to_string();
        eprintln!("error as the user sees it:\n{msg}");
        assert!(
            failure
                .excerpt()
                .iter()
                .any(|l| l.contains("fcvm-no-such-package")),
            "the message should quote apt's complaint about the package: {msg}"
        );
        assert_eq!(names_in(&paths.rootfs_dir()), Vec::<String>::new());
        assert_eq!(names_in(&paths.tmp_dir()), Vec::<String>::new());
    }
}
