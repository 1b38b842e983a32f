//! `--map` / `-v` volumes in a real guest: the container and the host see each other's
//! writes, `:ro` refuses writes and leaves the host untouched, escapes read nothing outside
//! the mapped directory, a few MiB survive the round trip both ways, and nothing is left
//! behind after a normal end or a SIGKILL of fcvm; the POSIX conformance suite pjdfstest on a
//! volume fails only where device nodes are refused; and in bulk: 100 MiB and 10,000 small
//! files each way, mmap and fsync, a symlink swap racing the opens, two VMs on one directory. Same inputs as `podman_cli`
//! (`FCVM_TEST_KERNEL`, `FCVM_TEST_ROOTFS`, the busybox image); SKIPPED where no Linux
//! guest boots, failing under CI.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::podman_cli::{guest_or_skip, report, run_to_end_within, wait_exit, Tool, TEST_TOOL};
use crate::common::{scratch_root, wait_until, TestEnv};

/// A volume run, boot to exit: a cold start alone took over 300 s in the emulated host with
/// two other emulated hosts beside it on 2 cores (the runs pass in 190-350 s).
const RUN_LIMIT: Duration = Duration::from_secs(480);

/// Size of the files checksummed each way.
const BIG: usize = 4 << 20;

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Reproducible bytes that do not compress (xorshift).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

#[test]
fn volumes_share_files_both_ways_ro_refuses_writes_and_nothing_escapes() {
    let Some(g) = guest_or_skip("volumes_share") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let t = tempfile::tempdir().unwrap();
    let (rw, ro, outside) = (
        t.path().join("rw"),
        t.path().join("ro"),
        t.path().join("outside"),
    );
    for d in [&rw, &ro, &outside] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(rw.join("from-host.txt"), "written by the host\n").unwrap();
    let host_big = noise(BIG, 0x9e37_79b9_7f4a_7c15);
    std::fs::write(rw.join("hostbig"), &host_big).unwrap();
    std::fs::write(ro.join("ro.txt"), "read only\n").unwrap();
    let token = format!(
        "SECRET-{}-{}",
        std::process::id(),
        rw.display().to_string().len()
    );
    let secret = outside.join("secret.txt");
    std::fs::write(&secret, &token).unwrap();

    let script = format!(
        r#"
echo "written by the container" > /rw/from-container.txt && echo write=ok
echo read=$(cat /rw/from-host.txt)
echo hostbig=$(sha256sum /rw/hostbig | cut -d' ' -f1)
dd if=/dev/urandom of=/rw/guestbig bs=1M count={mib} 2>/dev/null && sync
echo guestbig=$(sha256sum /rw/guestbig | cut -d' ' -f1)
mkdir /rw/d && rmdir /rw/d && echo mkdir_rmdir=ok
mkdir /rw/keep && echo x > /rw/keep/f && mv /rw/keep/f /rw/keep/g && echo rename=ok
ln /rw/keep/g /rw/keep/hard && echo hardlinks=$(stat -c %h /rw/keep/g)
ln -s g /rw/keep/sym && echo readlink=$(readlink /rw/keep/sym) symread=$(cat /rw/keep/sym)
chmod 640 /rw/keep/g && echo mode=$(stat -c %a /rw/keep/g)
chown 1234:5678 /rw/keep/g && echo owner=$(stat -c %u:%g /rw/keep/g)
printf 0123456789 > /rw/keep/t && truncate -s 4 /rw/keep/t && echo trunc=$(cat /rw/keep/t)
echo doomed > /rw/doomed && rm /rw/doomed && echo unlink=ok
echo held-content > /rw/held && exec 3< /rw/held && : > /rw/opened
i=0; while [ ! -e /rw/renamed ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done
echo held_read=$(cat <&3) held_new=$(cat /rw/held2 2>&1); exec 3<&-
echo ro_read=$(cat /ro/ro.txt)
(echo x > /ro/new) 2>/dev/null && echo ro_create=allowed || echo ro_create=refused
(echo x >> /ro/ro.txt) 2>/dev/null && echo ro_append=allowed || echo ro_append=refused
rm -f /ro/ro.txt 2>/dev/null && echo ro_rm=allowed || echo ro_rm=refused
mkdir /ro/d 2>/dev/null && echo ro_mkdir=allowed || echo ro_mkdir=refused
chmod 777 /ro/ro.txt 2>/dev/null && echo ro_chmod=allowed || echo ro_chmod=refused
echo ro_error=$( (echo x > /ro/new) 2>&1 | grep -o 'Read-only file system' | head -n1)
ln -s / /rw/root && echo escape_hostname=$(cat /rw/root/etc/hostname 2>&1)
ln -s {secret} /rw/abs
ln -s ../outside/secret.txt /rw/rel
ln -s ../../../../../../../../{secret} /rw/deep
for p in /rw/abs /rw/rel /rw/deep /rw/../outside/secret.txt /rw/root{secret} /rw/keep/../../outside/secret.txt; do
  cat "$p" 2>/dev/null; ls "$(dirname "$p")" 2>/dev/null
done
echo done=1
"#,
        mib = BIG >> 20,
        secret = secret.display(),
    );
    let cmd = g.run(
        &env,
        "vols",
        &[
            "--map",
            &format!("{}:/rw", rw.display()),
            "-v",
            &format!("{}:/ro:ro", ro.display()),
        ],
        &script,
    );
    // The host renames a file the container holds open (detached: a container that never
    // opens it fails on `held_read` below, with its output).
    let _renamer = {
        let rw = rw.clone();
        std::thread::spawn(move || {
            wait_until(RUN_LIMIT, "the container to open /rw/held", || {
                rw.join("opened").exists().then_some(())
            });
            std::fs::rename(rw.join("held"), rw.join("held2")).unwrap();
            std::fs::write(rw.join("renamed"), "").unwrap();
        })
    };
    let started = std::time::Instant::now();
    let (code, out, err) = run_to_end_within(cmd, "podman run with two volumes", RUN_LIMIT);
    eprintln!("timing: the volume run took {:?}", started.elapsed());
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let r = report(&out);
    let got = |k: &str| r.get(k).map(String::as_str).unwrap_or("<absent>");
    let ctx = format!("stdout:\n{out}\nstderr:\n{err}");

    // Container -> host and host -> container.
    assert_eq!(got("write"), "ok", "{ctx}");
    assert_eq!(
        std::fs::read_to_string(rw.join("from-container.txt")).unwrap(),
        "written by the container\n"
    );
    assert_eq!(got("read"), "written by the host", "{ctx}");
    assert_eq!(got("hostbig"), sha256_hex(&host_big), "{ctx}");
    let guest_big = std::fs::read(rw.join("guestbig")).unwrap();
    assert_eq!(guest_big.len(), BIG);
    assert_eq!(got("guestbig"), sha256_hex(&guest_big), "{ctx}");

    // File operations, as the host sees them.
    assert_eq!(got("mkdir_rmdir"), "ok", "{ctx}");
    assert!(!rw.join("d").exists());
    assert_eq!(got("rename"), "ok", "{ctx}");
    assert!(!rw.join("keep/f").exists());
    let g_meta = std::fs::metadata(rw.join("keep/g")).unwrap();
    assert_eq!(std::fs::read_to_string(rw.join("keep/g")).unwrap(), "x\n");
    assert_eq!(got("hardlinks"), "2", "{ctx}");
    assert_eq!(g_meta.nlink(), 2);
    assert_eq!(
        std::fs::metadata(rw.join("keep/hard")).unwrap().ino(),
        g_meta.ino()
    );
    assert_eq!(got("readlink"), "g symread=x", "{ctx}");
    assert_eq!(
        std::fs::read_link(rw.join("keep/sym")).unwrap(),
        Path::new("g")
    );
    assert_eq!(got("mode"), "640", "{ctx}");
    assert_eq!(g_meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(got("owner"), "1234:5678", "{ctx}");
    assert_eq!((g_meta.uid(), g_meta.gid()), (1234, 5678));
    assert_eq!(got("trunc"), "0123", "{ctx}");
    assert_eq!(std::fs::read(rw.join("keep/t")).unwrap(), b"0123");
    assert_eq!(got("unlink"), "ok", "{ctx}");
    assert!(!rw.join("doomed").exists());
    assert_eq!(
        got("held_read"),
        "held-content held_new=held-content",
        "an open file renamed by the host: {ctx}"
    );

    // :ro refuses every write and the host is untouched.
    assert_eq!(got("ro_read"), "read only", "{ctx}");
    for k in ["ro_create", "ro_append", "ro_rm", "ro_mkdir", "ro_chmod"] {
        assert_eq!(got(k), "refused", "{k}: {ctx}");
    }
    assert_eq!(got("ro_error"), "Read-only file system", "{ctx}");
    assert_eq!(
        std::fs::read_to_string(ro.join("ro.txt")).unwrap(),
        "read only\n"
    );
    assert_eq!(
        std::fs::metadata(ro.join("ro.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
    let ro_names: Vec<_> = std::fs::read_dir(&ro)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(ro_names, ["ro.txt"]);

    // Escapes: symlinks resolve in the guest, `..` stops at the mount's root.
    assert_eq!(
        got("escape_hostname"),
        "vols",
        "/rw/root is the guest's /: {ctx}"
    );
    assert_eq!(std::fs::read_link(rw.join("root")).unwrap(), Path::new("/"));
    assert!(
        !out.contains(&token) && !err.contains(&token),
        "the secret leaked: {ctx}"
    );
    assert!(
        !out.contains("secret.txt"),
        "the outside directory was listed: {ctx}"
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), token);
    assert_eq!(got("done"), "1", "{ctx}");
    env.assert_clean();
}

/// SIGKILL of fcvm while the container uses a volume: the next command removes the VM, its
/// runtime directory (the server's socket files are in it) and its record.
#[test]
fn volume_server_goes_with_a_sigkilled_fcvm() {
    let Some(g) = guest_or_skip("volume_sigkill") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let t = tempfile::tempdir().unwrap();
    let mut child = g
        .run(
            &env,
            "volkill",
            &["-v", &format!("{}:/data", t.path().display())],
            "echo up > /data/ready; sleep 600",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        RUN_LIMIT,
        "the container to write through the volume",
        || {
            std::fs::read_to_string(t.path().join("ready"))
                .ok()
                .filter(|s| s == "up\n")
        },
    );
    let rec = env
        .ls()
        .into_iter()
        .find(|v| v["name"] == "volkill")
        .expect("the VM is listed");
    let sockets: Vec<_> = env
        .vm_dirs()
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("_5100"))
        .collect();
    assert_eq!(sockets.len(), 1, "the volume's socket: {sockets:?}");
    child.kill().unwrap();
    wait_exit(&mut child, "fcvm to die");
    let vmm_pid = rec["vmm"]["pid"].as_u64().expect("VMM pid recorded");
    let _ = env.ls();
    wait_until(
        Duration::from_secs(60),
        "the next fcvm command to end the VMM",
        || (!Path::new(&format!("/proc/{vmm_pid}")).exists()).then_some(()),
    );
    env.assert_clean();
    assert_eq!(
        std::fs::read_to_string(t.path().join("ready")).unwrap(),
        "up\n"
    );
}

/// Volumes on the image cache's paths: the run that creates the entry (the agent waits for
/// the snapshot, then mounts) and a run restored from it (the volume is served to the
/// restored VM and mounted after the go-ahead) both read and write the host directory.
#[test]
fn volumes_work_when_the_image_cache_is_created_and_hit() {
    let Some(g) = guest_or_skip("volumes_cache") else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("seed"), "from the host\n").unwrap();
    let map = format!("{}:/vol", t.path().display());
    let mut outcomes = Vec::new();
    for (name, run) in [("volcache-a", "miss"), ("volcache-b", "hit")] {
        let mut cmd = g.run(
            &env,
            name,
            &["--map", &map],
            &format!("echo {run} > /vol/{run}; cat /vol/seed; cat /vol/miss"),
        );
        cmd.env_remove("FCVM_NO_SNAPSHOT");
        let (code, out, err) = run_to_end_within(cmd, "a cached run with a volume", RUN_LIMIT);
        assert_eq!(code, Some(0), "{run}: stdout:\n{out}\nstderr:\n{err}");
        assert_eq!(out, "from the host\nmiss\n", "{run}: stderr:\n{err}");
        assert_eq!(
            std::fs::read_to_string(t.path().join(run)).unwrap(),
            format!("{run}\n")
        );
        outcomes.push(err);
        env.assert_clean();
    }
    assert!(
        outcomes[0].contains("fcvm: cache created"),
        "the first run creates the entry: {}",
        outcomes[0]
    );
    assert!(
        outcomes[1].contains("fcvm: cache hit"),
        "the second run is restored: {}",
        outcomes[1]
    );
}

/// Why a pjdfstest case may fail on a `--map` volume, or None for a failure that is a defect.
/// Measured (2026-12-02, pjdfstest 0.2.2, emulated KVM host): 267 passed, 49 skipped (features
/// the config does not enable, and cases for other systems), 82 failed, every one of them a
/// `::block` or `::char` variant: the case first makes a block or character device node, and
/// the file server refuses device mknod on purpose (EPERM), so a container cannot create a
/// device on the host. The same cases' `::regular`, `::dir`, `::fifo`, `::symlink` and
/// `::socket` variants pass.
fn pjdfstest_known_failure(case: &str) -> Option<&'static str> {
    (case.ends_with("::block") || case.ends_with("::char"))
        .then_some("device nodes are refused on volumes (mknod EPERM), by design")
}

/// The POSIX file-system conformance suite (pjdfstest, the Rust port, pinned in
/// scripts/lib.sh) run as root in a container against a mapped directory.
#[test]
fn pjdfstest_on_a_mapped_directory_fails_only_on_known_fuse_limits() {
    const PJDFSTEST: Tool = Tool {
        name: "pjdfstest",
        env: "FCVM_TEST_PJDFSTEST",
        default: "target/pjdfstest-0.2.2/bin/pjdfstest",
    };
    let Some(g) = guest_or_skip("pjdfstest").and_then(|g| g.with_tools("pjdfstest", &[PJDFSTEST]))
    else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let t = tempfile::tempdir().unwrap();
    // The suite switches to two unprivileged users, `nobody` (in the image) and `tests`.
    // It runs in /v/run and writes its report to /v/pjdfstest.out as it goes, bounded by
    // busybox's timeout: a case that hangs shows as the one after the last reported.
    let script = r#"
echo 'tests:x:1000:1000:tests:/:/bin/false' >> /etc/passwd
echo 'tests:x:1000:' >> /etc/group
printf '[settings]\nnaptime = 0.05\n' > /tmp/pjdfstest.toml
mkdir /v/run
NO_COLOR=1 timeout 330 pjdfstest -c /tmp/pjdfstest.toml -p /v/run > /v/pjdfstest.out 2>&1
echo pjdfstest_exit=$?
"#;
    let cmd = g.run(
        &env,
        "pjdfstest",
        &["-v", &format!("{}:/v", t.path().display())],
        script,
    );
    let started = std::time::Instant::now();
    let (code, shown, err) = run_to_end_within(cmd, "pjdfstest in a container", RUN_LIMIT);
    eprintln!("timing: pjdfstest took {:?}", started.elapsed());
    let out = std::fs::read_to_string(t.path().join("pjdfstest.out")).unwrap_or_default();
    assert_eq!(
        code,
        Some(0),
        "stdout:\n{shown}\nstderr:\n{err}\nreport:\n{out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        !shown.contains("pjdfstest_exit=143"),
        "pjdfstest ran out of time; the last cases it reported, in order:\n{}",
        lines[lines.len().saturating_sub(20)..].join("\n")
    );
    let summary = out
        .lines()
        .find(|l| l.starts_with("Summary: "))
        .unwrap_or_else(|| panic!("no summary: stdout:\n{out}\nstderr:\n{err}"));
    eprintln!("pjdfstest on a --map volume: {summary}");
    let count = |what: &str| -> usize {
        summary
            .split(", ")
            .find_map(|part| part.trim_start_matches("Summary: ").strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {what:?} count in {summary:?}"))
    };
    let failed: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_end().ends_with(" FAILED"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(failed.len(), count(" failed"), "{summary}\n{out}");
    let unknown: Vec<&&str> = failed
        .iter()
        .filter(|f| pjdfstest_known_failure(f).is_none())
        .collect();
    assert!(
        unknown.is_empty(),
        "pjdfstest failures that are not known FUSE limits: {unknown:?}\n{out}"
    );
    // 267 when measured; a drop means a case that used to pass fails now.
    assert!(count(" passed") >= 260, "{summary}");
    // The suite cleans up after itself; what is left is the volume's business.
    env.assert_clean();
}

/// Size of the big files, each way.
const BULK: usize = 100 << 20;
/// Small files made each way: 10,000 where guests boot natively; 300 inside the emulated KVM
/// host, where every FUSE round trip crosses emulated SVM exits. Measured there (2026-12-03,
/// beside another emulated host): a create on a volume 164 ms against 1.1 ms on the guest's
/// own disk, an open-read-close 59 ms, a `stat` 15 ms; 10,000 creates would take 27 minutes.
fn small_files() -> usize {
    let emulated = std::fs::read_to_string("/proc/cmdline")
        .map(|c| c.contains("fcvm.runner="))
        .unwrap_or(false);
    if emulated {
        300
    } else {
        10_000
    }
}
/// A bulk run, boot to exit: its parts took 80-150 s each in the emulated host with another
/// emulated host and builds beside it (load average 7 on 2 cores).
const BULK_LIMIT: Duration = Duration::from_secs(540);

/// The test's own progress marks, written by the container to `mark_file` as it goes: printed
/// while waiting, so a slow run shows where its time went, and a timeout names its last step.
fn wait_marking<T>(mark_file: &Path, what: &str, mut done: impl FnMut() -> Option<T>) -> T {
    let started = std::time::Instant::now();
    let mut last = String::new();
    wait_until(BULK_LIMIT, what, || {
        // Empty while the container's `echo >` has truncated the file and not yet written.
        let now = std::fs::read_to_string(mark_file).unwrap_or_default();
        if !now.is_empty() && now != last {
            eprintln!(
                "timing: mark {:?} after {:?}",
                now.trim(),
                started.elapsed()
            );
            last = now;
        }
        done()
    })
}

/// Big files and the file operations that move data unusually, on one volume: 100 MiB each
/// way (checksummed on both sides), a write through a shared mapping, fsync (dd's and
/// sync's), and a loop of opens while the host keeps exchanging a directory with a symlink
/// that points outside the volume (`renameat2` `RENAME_EXCHANGE`, the swap that races a
/// lookup): only the inside file is ever read.
#[test]
fn volumes_carry_100_mib_each_way_mmap_fsync_and_nothing_escapes_a_swap_race() {
    let test = "volumes_big";
    let Some(g) = guest_or_skip(test).and_then(|g| g.with_tools(test, &[TEST_TOOL])) else {
        return;
    };
    let env = TestEnv::new_in(&scratch_root());
    let t = tempfile::tempdir().unwrap();
    let (v, outside) = (t.path().join("v"), t.path().join("outside"));
    std::fs::create_dir_all(v.join("race/d")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let host_big = noise(BULK, 0x2545_f491_4f6c_dd1d);
    std::fs::write(v.join("hostbig"), &host_big).unwrap();
    // The race: `race/d` is a directory holding `f` = "inside", `race/alt` a symlink to the
    // outside directory (on the host, `../../outside`), whose `f` is the secret. The host
    // keeps exchanging the two names while the container reads `/v/race/d/f`.
    let secret = format!("OUTSIDE-{}", std::process::id());
    std::fs::write(outside.join("f"), &secret).unwrap();
    std::fs::write(v.join("race/d/f"), "inside").unwrap();
    std::os::unix::fs::symlink("../../outside", v.join("race/alt")).unwrap();

    // Builtins only in the race loop (`read`, globs): a fork costs milliseconds there. 200
    // rounds: each took 90-140 ms in the emulated host beside another one (3,000 took 263 s:
    // 414 read the inside file, the others found the symlink; 54,018 swaps).
    let script = format!(
        r#"
mark() {{ echo "$1" > /v/progress; }}
echo hostbig=$(sha256sum /v/hostbig | cut -d' ' -f1); mark hostbig
echo guestbig=$(fcvm-test-tool write-noise /v/guestbig {mib} 88172645463325252 | sed -n 's/^sha256=//p')
mark guestbig
fcvm-test-tool mmap-write /v/mapped 4096 mapped-text
echo synced-by-dd > /v/dd-synced.src
dd if=/v/dd-synced.src of=/v/dd-synced conv=fsync 2>/dev/null && echo dd_fsync=ok
echo synced-by-sync > /v/synced && sync /v/synced && echo sync_file=ok
mark race; echo go > /v/race/start; n=0; other=0; i=0
while [ $i -lt 200 ]; do
  c=; read -r c < /v/race/d/f 2>/dev/null
  case "$c" in inside) n=$((n+1));; '') ;; *) other=$((other+1)); echo "race_read=$c";; esac
  for x in /v/race/d/*; do [ "$x" = /v/race/d/f ] || [ "$x" = '/v/race/d/*' ] || echo "race_name=$x"; done
  i=$((i+1))
done
echo race_inside=$n; echo race_other=$other; echo done > /v/race/stop; mark done
echo done=1
"#,
        mib = BULK >> 20,
    );
    let swapper = {
        let race = v.join("race");
        std::thread::spawn(move || {
            wait_until(BULK_LIMIT, "the container to start the race", || {
                race.join("start").exists().then_some(())
            });
            let mut swaps = 0u64;
            while !race.join("stop").exists() {
                nix::fcntl::renameat2(
                    None,
                    &race.join("d"),
                    None,
                    &race.join("alt"),
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .unwrap();
                swaps += 1;
                // Room for the emulated host's two vCPUs to run the guest too.
                std::thread::sleep(Duration::from_millis(1));
            }
            swaps
        })
    };
    let started = std::time::Instant::now();
    let cmd = g.run(
        &env,
        "bigfiles",
        &["-v", &format!("{}:/v", v.display())],
        &script,
    );
    let run = std::thread::spawn(move || run_to_end_within(cmd, "the big-file run", BULK_LIMIT));
    wait_marking(&v.join("progress"), "the big-file run", || {
        run.is_finished().then_some(())
    });
    let (code, out, err) = run.join().unwrap();
    eprintln!("timing: the big-file run took {:?}", started.elapsed());
    let ctx = format!("stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, Some(0), "{ctx}");
    let swaps = swapper.join().unwrap();
    let r = report(&out);
    let got = |k: &str| r.get(k).map(String::as_str).unwrap_or("<absent>");

    assert_eq!(got("hostbig"), sha256_hex(&host_big), "{ctx}");
    let guest_big = std::fs::read(v.join("guestbig")).unwrap();
    assert_eq!(guest_big.len(), BULK);
    assert_eq!(got("guestbig"), sha256_hex(&guest_big), "{ctx}");
    assert!(out.contains("mmap-write ok"), "{ctx}");
    let mapped = std::fs::read(v.join("mapped")).unwrap();
    assert_eq!(mapped.len(), 4096 + "mapped-text".len());
    assert!(mapped[..4096].iter().all(|&b| b == 0));
    assert_eq!(&mapped[4096..], b"mapped-text");
    assert_eq!(got("dd_fsync"), "ok", "{ctx}");
    assert_eq!(
        std::fs::read_to_string(v.join("dd-synced")).unwrap(),
        "synced-by-dd\n"
    );
    assert_eq!(got("sync_file"), "ok", "{ctx}");
    assert_eq!(
        std::fs::read_to_string(v.join("synced")).unwrap(),
        "synced-by-sync\n"
    );
    // The race read only the inside file (or nothing, while the name was the symlink, which
    // the guest resolves to its own /outside), never the secret.
    eprintln!("race: {swaps} swaps, {} inside reads", got("race_inside"));
    assert!(swaps > 0, "the host never swapped: {ctx}");
    assert!(
        got("race_inside").parse::<u32>().unwrap_or(0) > 0,
        "no read of the inside file: {ctx}"
    );
    assert_eq!(got("race_other"), "0", "something else was read: {ctx}");
    assert!(!out.contains("race_name="), "{ctx}");
    assert!(
        !out.contains(&secret) && !err.contains(&secret),
        "the outside file leaked: {ctx}"
    );
    assert_eq!(std::fs::read_to_string(outside.join("f")).unwrap(), secret);
    assert_eq!(got("done"), "1", "{ctx}");
    env.assert_clean();
}

/// 10,000 small files each way ([`small_files`]), and a second VM on the same directory while
/// the first still runs: it lists and reads the files the first VM made, and each VM sees the
/// file the other wrote.
#[test]
fn volumes_carry_small_files_each_way_and_two_vms_share_one() {
    let test = "volumes_small";
    let Some(g) = guest_or_skip(test) else {
        return;
    };
    let files = small_files();
    eprintln!("{files} small files each way");
    let env = TestEnv::new_in(&scratch_root());
    let t = tempfile::tempdir().unwrap();
    let v = t.path().join("v");
    std::fs::create_dir_all(v.join("hostfiles")).unwrap();
    let mut names: Vec<String> = (0..files).map(|i| format!("h{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        std::fs::write(v.join("hostfiles").join(n), format!("{i}\n")).unwrap();
    }
    // What `cat /v/hostfiles/*` gives: the glob sorts the names bytewise.
    names.sort();
    let mut concat = Vec::new();
    for n in &names {
        concat.extend(std::fs::read(v.join("hostfiles").join(n)).unwrap());
    }
    // Builtins only in the create loop (`echo` with a redirection): no fork per file.
    let script = format!(
        r#"
mark() {{ echo "$1" > /v/progress; }}
echo hostfiles=$(ls /v/hostfiles | wc -l) hostfiles_sum=$(cat /v/hostfiles/* | sha256sum | cut -d' ' -f1)
mark hostfiles
mkdir /v/guestfiles; i=0
while [ $i -lt {files} ]; do echo $i > /v/guestfiles/g$i; i=$((i+1)); done; mark guestfiles
echo a > /v/a-ready; i=0
while [ ! -e /v/from-b ] && [ $i -lt 400 ]; do sleep 1; i=$((i+1)); done
echo from_b=$(cat /v/from-b)
echo from-a > /v/from-a.tmp && mv /v/from-a.tmp /v/from-a; mark done
"#,
    );
    let map = format!("{}:/v", v.display());
    let started = std::time::Instant::now();
    let a = {
        let cmd = g.run(&env, "small-a", &["-v", &map], &script);
        std::thread::spawn(move || run_to_end_within(cmd, "the small-file run", BULK_LIMIT))
    };
    wait_marking(&v.join("progress"), "the first VM's small files", || {
        (v.join("a-ready").exists() || a.is_finished()).then_some(())
    });
    eprintln!("timing: the first VM's files took {:?}", started.elapsed());
    let b = g.run(
        &env,
        "small-b",
        &["-v", &map],
        r#"echo a_ready=$(cat /v/a-ready)
echo guestfiles=$(ls /v/guestfiles | wc -l) g0=$(cat /v/guestfiles/g0) glast=$(cat /v/guestfiles/g$(( $(ls /v/guestfiles | wc -l) - 1 )))
echo from-b > /v/from-b.tmp && mv /v/from-b.tmp /v/from-b; i=0
while [ ! -e /v/from-a ] && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
echo from_a=$(cat /v/from-a)"#,
    );
    let (b_code, b_out, b_err) =
        run_to_end_within(b, "the second VM on the same volume", BULK_LIMIT);
    let (code, out, err) = a.join().unwrap();
    eprintln!("timing: both VMs done after {:?}", started.elapsed());
    let ctx = format!(
        "first VM: stdout:\n{out}\nstderr:\n{err}\nsecond VM: stdout:\n{b_out}\nstderr:\n{b_err}"
    );
    assert_eq!(code, Some(0), "{ctx}");
    assert_eq!(b_code, Some(0), "{ctx}");
    let r = report(&out);
    let got = |k: &str| r.get(k).map(String::as_str).unwrap_or("<absent>");
    assert_eq!(
        got("hostfiles"),
        format!("{files} hostfiles_sum={}", sha256_hex(&concat)),
        "{ctx}"
    );
    assert_eq!(
        std::fs::read_dir(v.join("guestfiles")).unwrap().count(),
        files
    );
    for i in [0, 1, files / 2, files - 1] {
        assert_eq!(
            std::fs::read_to_string(v.join(format!("guestfiles/g{i}"))).unwrap(),
            format!("{i}\n")
        );
    }
    // Two VMs on one directory: the second lists and reads the first's files, and each saw
    // the file the other wrote while both ran.
    let rb = report(&b_out);
    assert_eq!(rb.get("a_ready").map(String::as_str), Some("a"), "{ctx}");
    assert_eq!(
        rb.get("guestfiles").map(String::as_str),
        Some(format!("{files} g0=0 glast={}", files - 1).as_str()),
        "{ctx}"
    );
    assert_eq!(got("from_b"), "from-b", "{ctx}");
    assert_eq!(
        rb.get("from_a").map(String::as_str),
        Some("from-a"),
        "{ctx}"
    );
    env.assert_clean();
}
