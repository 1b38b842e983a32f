//! `fcvm doctor`: what this host can do, and how to fix what it cannot.

use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use serde::Serialize;

use crate::firecracker::binary::{self, Program};
use crate::paths::Paths;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Works.
    Ok,
    /// Works with a limitation.
    Warn,
    /// Does not work.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Result.
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// How to fix it, when not ok.
    pub fix: Option<String>,
}

/// All checks.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The checks, in order.
    pub checks: Vec<Check>,
    /// Whether a stock Linux guest kernel can boot here (false on nested PVM KVM).
    pub guest_kernels_boot: bool,
}

impl Report {
    /// Whether Firecracker VMs can run at all (KVM and Firecracker present).
    pub fn ok_for_firecracker(&self) -> bool {
        self.checks
            .iter()
            .filter(|c| c.name == "kvm" || c.name == "firecracker")
            .all(|c| c.level != Level::Fail)
    }

    /// Human-readable rendering.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let tag = match c.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            out.push_str(&format!("[{tag}] {:<12} {}\n", c.name, c.detail));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("       {:<12} fix: {fix}\n", ""));
            }
        }
        out
    }
}

fn item(name: &'static str, level: Level, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
        fix: fix.map(str::to_owned),
    }
}

/// Run every check.
pub fn check(paths: &Paths) -> Report {
    let mut checks = Vec::new();
    let kvm = check_kvm();
    let kvm_ok = kvm.level != Level::Fail;
    checks.push(kvm);
    let guest_kernels_boot = kvm_ok && !is_nested_pvm();
    checks.push(if !kvm_ok {
        item("guest-boot", Level::Fail, "no KVM, no guest can boot", Some("see the kvm check"))
    } else if guest_kernels_boot {
        item("guest-boot", Level::Ok, "hardware-assisted KVM: Linux guest kernels can boot", None)
    } else {
        item("guest-boot",
            Level::Warn,
            "KVM is nested paravirtual (kvm_pvm, no vmx/svm): Firecracker runs and tiny guests like the probe boot, but stock Linux kernels cannot, so `fcvm podman run` cannot boot its guest here",
            Some("run on bare metal or a VM with nested hardware virtualization for full guests"),
        )
    });
    for program in [Program::Firecracker, Program::Jailer] {
        let name = if program == Program::Firecracker {
            "firecracker"
        } else {
            "jailer"
        };
        checks.push(match binary::find(program, paths) {
            Ok(found) => item(
                name,
                Level::Ok,
                format!("{} {} at {}", name, found.version, found.path.display()),
                None,
            ),
            Err(e) => item(
                name,
                Level::Fail,
                e.to_string(),
                Some("fcvm setup firecracker"),
            ),
        });
    }
    checks.push(device_check(
        "userfaultfd",
        "/dev/userfaultfd",
        "UFFD clones (`fcvm snapshot serve`) need it",
        "mknod /dev/userfaultfd c 10 126 (kernel >= 6.1)",
    ));
    checks.push(device_check(
        "tun",
        "/dev/net/tun",
        "TAP networking needs it",
        "modprobe tun",
    ));
    checks.push(device_check(
        "fuse",
        "/dev/fuse",
        "--map volumes need it",
        "modprobe fuse",
    ));
    checks.push(check_reflink(paths));
    checks.push(check_ksm());
    Report {
        checks,
        guest_kernels_boot,
    }
}

fn check_kvm() -> Check {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => {
            // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
            let version = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
            if version == 12 {
                item("kvm", Level::Ok, "/dev/kvm usable (API 12)", None)
            } else {
                item(
                    "kvm",
                    Level::Fail,
                    format!("/dev/kvm answered API {version}"),
                    None,
                )
            }
        }
        Err(e) => item(
            "kvm",
            Level::Fail,
            format!("cannot open /dev/kvm: {e}"),
            Some(
                "enable virtualization, load kvm_intel/kvm_amd, and add yourself to the kvm group",
            ),
        ),
    }
}

/// Nested paravirtual KVM (kvm_pvm) runs guest ring 0 by emulation and cannot boot Linux.
fn is_nested_pvm() -> bool {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return true;
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    !has_hw_virt
}

fn device_check(name: &'static str, path: &str, why: &str, fix: &str) -> Check {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => item(name, Level::Ok, format!("{path} usable"), None),
        Err(e) => item(name, Level::Warn, format!("{path}: {e}; {why}"), Some(fix)),
    }
}

fn check_reflink(paths: &Paths) -> Check {
    let dir = paths.base();
    let probe_dir = if dir.exists() {
        dir.to_owned()
    } else {
        std::env::temp_dir()
    };
    match crate::storage::supports_reflink(&probe_dir) {
        Ok(true) => item(
            "reflink",
            Level::Ok,
            format!(
                "{} supports reflink copies (instant CoW disks)",
                probe_dir.display()
            ),
            None,
        ),
        Ok(false) => item(
            "reflink",
            Level::Warn,
            format!(
                "{} cannot reflink: disks and snapshots are copied in full",
                probe_dir.display()
            ),
            Some("put FCVM_BASE_DIR on btrfs or XFS"),
        ),
        Err(e) => item("reflink", Level::Warn, format!("could not test: {e}"), None),
    }
}

fn check_ksm() -> Check {
    match fs::read_to_string("/sys/kernel/mm/ksm/run") {
        Ok(v) if v.trim() == "1" => item("ksm", Level::Ok, "KSM is running", None),
        Ok(v) => item(
            "ksm",
            Level::Warn,
            format!(
                "KSM present but run={} (clone memory is not merged)",
                v.trim()
            ),
            Some("fcvm setup ksm (starts ksmd; clones started with --ksm then share identical pages)"),
        ),
        Err(_) => item(
            "ksm",
            Level::Warn,
            "KSM not available",
            Some("kernel with CONFIG_KSM"),
        ),
    }
}
