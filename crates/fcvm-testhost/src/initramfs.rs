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

/// Bump when the layout of the image changes in a way the inputs below do not capture.
const FORMAT: &str = "fcvm-testhost-initramfs-1";

/// `/init`. Runs as PID 1 in the initramfs; ends by exec'ing the runner (`fcvm-testhost
/// guest-run`, from the host's filesystem) inside the chroot. On any fatal error it prints the
/// reason on the console (which the host prints) and powers off, so the host never waits for a
/// timeout.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
die() { echo "fcvm-testhost-init: FATAL: $*"; poweroff -f; sleep 60; }
RUNNER=
V=
for a in $(cat /proc/cmdline); do
  case "$a" in
    fcvm.runner=*) RUNNER="${a#fcvm.runner=}" ;;
    fcvm.verbose=1) V=1 ;;
  esac
done
say() { [ -z "$V" ] || echo "fcvm-testhost-init: $*"; }
[ -n "$RUNNER" ] || die "no fcvm.runner= on the kernel command line"
say "loading modules"
while read -r name req params; do
  if ! insmod "/lib/fcvm/$name.ko" $params; then
    [ "$req" = 1 ] && die "insmod $name $params failed"
    echo "fcvm-testhost-init: warning: insmod $name failed"
  fi
done </modules.list
[ -e /dev/kvm ] || die "/dev/kvm missing after loading kvm_amd (does the CPU model have svm?)"
ip link set lo up
hostname fcvm-testhost
say "mounting the host root"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
  || die "mounting the host root (9p hostroot) failed"
mount -t tmpfs -o mode=0755 rw /rw || die "tmpfs /rw"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || die "overlay on the host root failed"
R=/newroot
mount -t proc proc $R/proc || die "proc"
mount -t sysfs sysfs $R/sys || die "sysfs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup || die "cgroup2"
mount -t devtmpfs devtmpfs $R/dev || die "devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts || die "devpts"
mount -t tmpfs -o mode=1777 shm $R/dev/shm || die "/dev/shm"
mount -t tmpfs -o mode=0755 run $R/run || die "/run"
mount -t tmpfs -o mode=1777 tmp $R/tmp || die "/tmp"
mount -t tmpfs -o mode=1777 vartmp $R/var/tmp || die "/var/tmp"
# The host's limit is not ours: fcvm opens many fds (one Firecracker per VM, vsock, logs).
ulimit -n 1048576 2>/dev/null || ulimit -n 65536
[ -x "$R$RUNNER" ] || die "the runner $RUNNER is not visible inside L1"
say "starting the runner"
exec chroot $R "$RUNNER" guest-run
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
    let f = object::File::parse(&*data).map_err(|e| Error::BadModule {
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
    let required: std::collections::HashSet<String> = wanted
        .iter()
        .filter(|w| w.required)
        .map(|w| modules::normalize(w.name))
        .collect();
    let mut blobs = Vec::new();
    let mut list = String::new();
    for l in &plan.order {
        let p = &idx.files[&l.name];
        blobs.push((
            format!("lib/fcvm/{}.ko", l.name),
            fs::read(p).map_err(Error::io("reading", p))?,
        ));
        // Only the modules asked for as required are fatal: a failed dependency makes the
        // required module that needs it fail anyway.
        list.push_str(&format!(
            "{} {} {}\n",
            l.name,
            u8::from(required.contains(&l.name)),
            l.params
        ));
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
        name: "modules.list",
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
    Ok(Built {
        path,
        cached: false,
        missing_optional: plan.missing_optional,
    })
}
