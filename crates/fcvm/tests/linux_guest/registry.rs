//! Registry pulls on the real path: `fcvm podman run --network bridged --tls-verify=false
//! ADDR/NAME:TAG` with no archive, the guest's podman pulling from a real registry (Debian's
//! `docker-registry`, the distribution project's server) that the test starts on the host
//! side, loaded with the tests' busybox image by `skopeo copy`. Needs root, `nft`,
//! `docker-registry` and `skopeo` (Debian packages nftables, docker-registry, skopeo; in
//! `scripts/lib.sh`'s HOST_PACKAGES); runs inside the emulated KVM host like `network`.
//!
//! The registry listens on [`REGISTRY_IP`], an address the test adds to `lo` (the emulated
//! host has no other interface): a bridged guest reaches every local address of the host
//! through its veth, and the reference must name the registry before any VM exists.

use std::io::Read;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::network::network_leftovers;
use super::podman_cli::{guest_or_skip, run_to_end};
use crate::common::{scratch_root, wait_until, TestEnv};

/// The registry's address: from 198.18.0.0/15 (RFC 2544, for network tests), far from the
/// bridged pool (10.209.0.0/16).
const REGISTRY_IP: &str = "198.18.0.1";
/// Oldest `docker-registry` accepted: 2.x serves the registry API v2 podman speaks.
const MIN_REGISTRY_MAJOR: u32 = 2;

/// A facility is missing: fail under CI, else a loud SKIPPED.
fn missing(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {why} (required under CI)"
    );
    eprintln!("SKIPPED {test}: {why}");
}

/// A program's `--version` output, or None when it cannot be run.
fn version_of(program: &str) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The first `MAJOR.` number in a version line (`docker-registry github.com/docker/distribution
/// 2.8.2+ds1`).
fn major_version(text: &str) -> Option<u32> {
    text.split_whitespace().find_map(|w| {
        w.split('.')
            .next()?
            .parse::<u32>()
            .ok()
            .filter(|_| w.contains('.'))
    })
}

/// A pseudo-terminal (120 columns) for fcvm's stderr: (master, slave).
fn terminal() -> (OwnedFd, OwnedFd) {
    let size = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let p = nix::pty::openpty(Some(&size), None).unwrap();
    // openpty's descriptors are inherited across exec: the fcvm processes the test starts
    // meanwhile (and their VMMs) would hold the terminal open long after this fcvm ended.
    // The child still gets the slave as its stderr (dup2 clears the flag).
    for fd in [&p.master, &p.slave] {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
    }
    (p.master, p.slave)
}

/// Reads all that is written to the terminal of `master` while it is written (a full
/// terminal would block the writer), until every slave is closed (EIO).
fn read_terminal(master: OwnedFd) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = std::fs::File::from(master).read_to_end(&mut out);
        let _ = tx.send(String::from_utf8_lossy(&out).into_owned());
    });
    rx
}

/// The address on `lo`, removed again when dropped.
struct LoAddress;

impl LoAddress {
    fn add() -> LoAddress {
        let cidr = format!("{REGISTRY_IP}/32");
        let out = Command::new("ip")
            .args(["addr", "add", &cidr, "dev", "lo"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip addr add {cidr} dev lo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoAddress
    }
}

impl Drop for LoAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{REGISTRY_IP}/32"), "dev", "lo"])
            .output();
    }
}

/// A running `docker-registry serve`, its config and storage in `dir`; killed when dropped.
struct Registry {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = std::net::TcpListener::bind(format!("{REGISTRY_IP}:0"))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("{REGISTRY_IP}:{port}");
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        // Plain HTTP, no auth; info level logs every request (the test counts manifest GETs).
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n",
                storage.display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::fs::File::create(dir.join("registry.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start docker-registry");
        let mut reg = Registry { child, addr, log };
        wait_until(Duration::from_secs(30), "the registry to listen", || {
            if let Ok(Some(status)) = reg.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", reg.log_text());
            }
            TcpStream::connect(&reg.addr).ok()
        });
        reg
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times the registry served the manifest of `name:tag`.
    fn manifest_gets(&self, name: &str, tag: &str) -> usize {
        let uri = format!("/v2/{name}/manifests/{tag}");
        self.log_text()
            .lines()
            .filter(|l| l.contains(&uri) && l.contains("GET") && l.contains("response completed"))
            .count()
    }

    /// Push the OCI archive `archive` as `name:tag` (plain HTTP).
    fn push(&self, archive: &Path, name: &str, tag: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{}/{name}:{tag}", self.addr))
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy to the registry failed: {}\nregistry log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn bridged_pull_from_a_local_registry() {
    let test = "bridged_pull_from_a_local_registry";
    if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("--version").output().is_err() {
        return missing(test, "needs root and nft (Debian package nftables)");
    }
    let Some(registry_version) = version_of("docker-registry") else {
        return missing(
            test,
            "needs docker-registry (Debian package docker-registry)",
        );
    };
    assert!(
        major_version(&registry_version).is_some_and(|m| m >= MIN_REGISTRY_MAJOR),
        "docker-registry {registry_version:?}: version {MIN_REGISTRY_MAJOR} or later needed"
    );
    let Some(skopeo_version) = version_of("skopeo") else {
        return missing(test, "needs skopeo (Debian package skopeo)");
    };
    eprintln!("{test}: {registry_version}; {skopeo_version}");

    // The registry, loaded, before any VM: a broken registry fails fast.
    let dir = tempfile::tempdir_in(scratch_root()).unwrap();
    let archive = fcvm_testkit::testimage::build_busybox_archive(
        Path::new(fcvm_testkit::testimage::DEFAULT_BUSYBOX),
        &dir.path().join("busybox.oci.tar"),
        "busybox-test",
        "1",
    )
    .unwrap();
    let _lo = LoAddress::add();
    let registry = Registry::start(dir.path());
    registry.push(&archive.path, "busybox-test", "1");
    let image = format!("{}/busybox-test:1", registry.addr);
    // The push's own requests are not the guests' pulls.
    let pushed = registry.manifest_gets("busybox-test", "1");

    let Some(guest) = guest_or_skip(test) else {
        return;
    };
    assert!(
        network_leftovers().is_empty(),
        "before: {:?}",
        network_leftovers()
    );
    let env = TestEnv::new_in(&scratch_root());
    // With the image cache as a user has it: the runs must say what it does with a pull.
    let run = |flags: &[&str], image: &str, args: &[&str]| {
        let mut all = vec!["--network", "bridged"];
        all.extend_from_slice(flags);
        let mut cmd = guest.run_pulled(&env, &all, image, args);
        cmd.env_remove("FCVM_NO_SNAPSHOT");
        cmd
    };
    let cold_line = "fcvm: cold (images pulled from a registry are not cached";

    // A pull and the container's output; stderr a pipe: no progress there, stdout the
    // container's alone. Without --rm: the record stays, as for any container that ran.
    let (code, out, err) = run_to_end(
        run(
            &["--name", "first", "--tls-verify=false"],
            &image,
            &["echo", "hello-from-registry"],
        ),
        "the first pull",
    );
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert_eq!(out, "hello-from-registry\n", "stderr: {err}");
    assert!(err.contains(cold_line), "{err}");
    for progress in [
        "Copying",
        "Trying to pull",
        "pulling ",
        "fcvm: pulled",
        "blob",
    ] {
        assert!(
            !err.contains(progress),
            "{progress:?} in piped stderr: {err}"
        );
    }
    assert_eq!(registry.manifest_gets("busybox-test", "1"), pushed + 1);
    env.ok(&["rm", "first"]);

    // Then three at once (each VM boots from its own copy of the rootfs, so none shares
    // another's pull): the same image again (`--tls-verify false`, the spaced spelling) with
    // stderr on a terminal, where the pull shows; a tag the registry does not have; and TLS
    // verification on against plain HTTP. The two failures leave no record even without
    // --rm: no container ever existed.
    let mut again = run(
        &["--rm", "--tls-verify", "false"],
        &image,
        &["echo", "again"],
    );
    let (master, slave) = terminal();
    again.stderr(Stdio::from(slave));
    let again = std::thread::spawn(move || {
        let mut child = again.stdout(Stdio::piped()).spawn().unwrap();
        // The Command holds a copy of the slave: dropped, the terminal ends with fcvm.
        drop(again);
        let term = read_terminal(master);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = wait_until(Duration::from_secs(300), "the second pull", || {
            child.try_wait().unwrap()
        });
        // Bounded: a process still holding the terminal fails the test instead of hanging it.
        let term = term
            .recv_timeout(Duration::from_secs(30))
            .expect("the terminal stayed open 30 s after fcvm exited");
        (status.code(), out, term)
    });
    let missing_tag = run(
        &["--tls-verify=false"],
        &format!("{}/busybox-test:nope", registry.addr),
        &["true"],
    );
    let tls_on = run(&[], &image, &["true"]);
    let failures: Vec<_> = [("missing tag", missing_tag), ("tls on", tls_on)]
        .into_iter()
        .map(|(what, cmd)| std::thread::spawn(move || (what, run_to_end(cmd, what))))
        .collect();
    let (code, out, term) = again.join().unwrap();
    assert_eq!(code, Some(0), "again: stdout: {out}\nterminal: {term}");
    assert_eq!(out, "again\n", "terminal: {term}");
    assert!(term.contains(cold_line), "{term}");
    // podman's lines under a spinner, then one line for the whole pull.
    assert!(term.contains(&format!("pulling {image}")), "{term}");
    assert!(
        term.contains(&format!("fcvm: pulled {image} (1 blob, ")),
        "{term}"
    );
    for h in failures {
        let (what, (code, out, err)) = h.join().unwrap();
        assert_eq!(code, Some(125), "{what}: stdout: {out}\nstderr: {err}");
        assert!(out.is_empty(), "{what}: {out}");
        let reason = if what == "tls on" {
            "server gave HTTP response to HTTPS client"
        } else {
            "manifest unknown"
        };
        assert!(
            err.contains("podman pull") && err.contains(reason),
            "{what}: podman's reason expected: {err}"
        );
        for progress in ["Copying", "pulling "] {
            assert!(
                !err.contains(progress),
                "{what}: {progress:?} in piped stderr: {err}"
            );
        }
    }
    // The second run pulled on its own: the registry served the manifest once more.
    assert_eq!(registry.manifest_gets("busybox-test", "1"), pushed + 2);
    assert_eq!(network_leftovers(), Vec::<String>::new(), "after the runs");
    env.assert_clean();
    // The registry's stderr, for the record of a failure.
    let mut tail = String::new();
    let _ = std::fs::File::open(&registry.log).map(|mut f| f.read_to_string(&mut tail));
    assert!(!tail.contains("level=fatal"), "{tail}");
}

#[test]
fn versions_are_read_from_the_tools_own_lines() {
    assert_eq!(
        major_version("docker-registry github.com/docker/distribution 2.8.2+ds1"),
        Some(2)
    );
    assert_eq!(major_version("skopeo version 1.9.3"), Some(1));
    assert_eq!(major_version("registry"), None);
}
