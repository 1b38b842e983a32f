//! The L1 initramfs: Debian's static busybox, the kernel modules in load order and `/init`.
//!
//! Built here (not with initramfs-tools) so that it needs nothing but the kernel package and
//! `busybox-static`, holds exactly the modules we load, and is reproducible: it is cached under a
//! hash of everything that goes into it.

use std::fs;
use std::path::{Path, PathBuf};

use fcvm_proto::initrd::{write_newc, Entry};
use sha2::{Digest, Sha256};

use crate::cache::{publish, temp_sibling};
use crate::error::{Error, Result};
use crate::kernel::{sha256_file, Kernel};
use crate::modules::{self, Index, Want};

/// Where the static busybox comes from (package `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";

/// Bump when the layout of the image (or the `modules.list` format) changes in a way the inputs
/// hashed in [`ensure`] do not capture.
const FORMAT: &str = "fcvm-testhost-initramfs-1";

/// `/init`. Runs as PID 1 in the initramfs and does only what needs a shell: load the modules
/// that reach the host's root (9p) and build the overlay on it. Then it hands the module
/// directory to the runner as fd 3 and exec's the runner (`fcvm-testhost guest-run`, from the
/// host's filesystem) inside the chroot; the runner loads the other modules in parallel and does
/// the remaining mounts with system calls (each busybox command costs ~50 ms of emulated time).
/// On any fatal error it prints the reason on the console (which the host prints) and powers
/// off, so the host never waits for a timeout.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
mount -t proc proc /proc
die() { echo "fcvm-testhost-init: FATAL: $*"; poweroff -f; sleep 60; }
RUNNER=
V=
read -r CMDLINE </proc/cmdline
for a in $CMDLINE; do
  case "$a" in
    fcvm.runner=*) RUNNER="${a#fcvm.runner=}" ;;
    fcvm.verbose=1) V=1 ;;
  esac
done
say() { [ -z "$V" ] || { read -r up _ </proc/uptime; echo "fcvm-testhost-init: [$up] $*"; }; }
[ -n "$RUNNER" ] || die "no fcvm.runner= on the kernel command line"
say "loading boot modules"
while read -r name req stage deps params; do
  [ "$stage" = boot ] || continue
  insmod "/lib/fcvm/$name.ko" $params || die "insmod $name $params failed"
done </lib/fcvm/modules.list
say "mounting the host root"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
  || die "mounting the host root (9p hostroot) failed"
mount -t tmpfs -o mode=0755 rw /rw || die "tmpfs /rw"
mkdir /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || die "overlay on the host root failed"
[ -x "/newroot$RUNNER" ] || die "the runner $RUNNER is not visible inside L1"
say "starting the runner"
exec 3</lib/fcvm
exec chroot /newroot "$RUNNER" guest-run
"#;

/// A built (or cached) initramfs.
#[derive(Debug, Clone)]
pub struct Built {
    /// The image.
    pub path: PathBuf,
    /// It was already cached.
    pub cached: bool,
    /// Optional modules that were not found (warnings).
    pub missing_optional: Vec<String>,
}

/// Checks that `/bin/busybox` is there and static (the initramfs has no libc).
pub fn busybox() -> Result<PathBuf> {
    use object::Object;
    let p = PathBuf::from(BUSYBOX);
    let data = fs::read(&p).map_err(|_| Error::MissingProgram {
        program: BUSYBOX.to_string(),
        package: "busybox-static".to_string(),
    })?;
    let f = object::File::parse(&*data).map_err(|e| Error::BadFile {
        path: p.clone(),
        why: format!("not an ELF file: {e}"),
    })?;
    if f.section_by_name(".interp").is_some() {
        return Err(Error::MissingProgram {
            program: format!("a static {BUSYBOX} ({BUSYBOX} is dynamically linked)"),
            package: "busybox-static".to_string(),
        });
    }
    Ok(p)
}

/// Returns the initramfs for `kernel`, building and caching it if needed.
pub fn ensure(cache: &Path, kernel: &Kernel, wanted: &[Want]) -> Result<Built> {
    let busybox = busybox()?;
    let mut h = Sha256::new();
    h.update(FORMAT);
    h.update(&kernel.sha256);
    h.update(sha256_file(&busybox)?);
    h.update(INIT_SCRIPT);
    for w in wanted {
        h.update(format!("{}:{}:{};", w.name, w.required, w.params));
    }
    h.update(modules::BOOT.join(","));
    let key = hex::encode(h.finalize());
    let path = cache.join(format!("initramfs-{}.cpio", &key[..16]));
    // Warnings are remembered next to the image so a cache hit can still report them.
    let warn_path = path.with_extension("missing");
    if path.is_file() {
        let missing_optional = fs::read_to_string(&warn_path)
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default();
        return Ok(Built {
            path,
            cached: true,
            missing_optional,
        });
    }
    let idx = Index::scan(&kernel.modules)?;
    let plan = modules::resolve(
        wanted,
        |n| idx.builtin.contains(n),
        |n| match idx.files.get(n) {
            Some(p) => modules::depends_of(p).map(Some),
            None => Ok(None),
        },
    )?;
    let mut blobs = Vec::new();
    let mut list = String::new();
    for l in modules::list_lines(&plan, wanted) {
        let p = &idx.files[&l.name];
        blobs.push((
            format!("lib/fcvm/{}.ko", l.name),
            fs::read(p).map_err(Error::io("reading", p))?,
        ));
        list.push_str(&l.format());
        list.push('\n');
    }
    let bb = fs::read(&busybox).map_err(Error::io("reading", &busybox))?;
    let mut entries = Vec::new();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "lib", "lib/fcvm",
        "lower", "rw", "newroot", "tmp", "root", "etc",
    ] {
        entries.push(Entry::Dir {
            name: d,
            mode: 0o755,
        });
    }
    entries.push(Entry::File {
        name: "bin/busybox",
        mode: 0o755,
        data: &bb,
    });
    entries.push(Entry::File {
        name: "init",
        mode: 0o755,
        data: INIT_SCRIPT.as_bytes(),
    });
    entries.push(Entry::File {
        name: "lib/fcvm/modules.list",
        mode: 0o644,
        data: list.as_bytes(),
    });
    for (name, data) in &blobs {
        entries.push(Entry::File {
            name,
            mode: 0o644,
            data,
        });
    }
    let image = write_newc(&entries);
    fs::create_dir_all(cache).map_err(Error::io("creating cache directory", cache))?;
    let tmp_warn = temp_sibling(&warn_path);
    fs::write(&tmp_warn, plan.missing_optional.join("\n"))
        .map_err(Error::io("writing", &tmp_warn))?;
    publish(&tmp_warn, &warn_path)?;
    let tmp = temp_sibling(&path);
    fs::write(&tmp, &image).map_err(Error::io("writing", &tmp))?;
    publish(&tmp, &path)?;
    crate::cache::prune(
        cache,
        "initramfs-",
        &format!("initramfs-{}", &key[..16]),
        std::time::Duration::from_secs(24 * 3600),
    );
    Ok(Built {
        path,
        cached: false,
        missing_optional: plan.missing_optional,
    })
}
