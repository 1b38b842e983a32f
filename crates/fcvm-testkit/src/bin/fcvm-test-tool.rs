//! What the tests' busybox image lacks, as one static binary put into the image at
//! `/bin/fcvm-test-tool` (busybox-static in Debian has no UDP server and nothing that writes
//! through a shared mapping):
//!
//! - `udp-echo PORT`: answer every datagram on 0.0.0.0:PORT with `echo: ` and its bytes.
//! - `mmap-write FILE OFFSET TEXT`: write TEXT into FILE at OFFSET through a shared mapping
//!   (the file grows to fit), `msync` it, and print `mmap-write ok`.
//! - `write-noise FILE MIB SEED`: write MIB MiB of reproducible bytes that do not compress
//!   (xorshift from SEED), `fsync`, and print `sha256=HEX` of what was written: a guest-side
//!   big file for the volume tests without /dev/urandom's cost (in the emulated host, the
//!   kernel's generator and busybox's sha256sum each took over a minute for 100 MiB).
//! - `fs-bench DIR MIB FILES`: time, in DIR, a sequential write of MIB MiB (then `fsync`), a
//!   sequential read of it after dropping its cached pages, FILES creates of empty files, and a
//!   `stat` of each (from the attribute cache, then forced to the file system with
//!   `AT_STATX_FORCE_SYNC`); print one `fs-bench` line of `key=value` figures and remove what
//!   it made. For `benches/volumes.rs` (busybox's `dd` reports no rate one can trust across
//!   file systems, and has no way to time a `stat`).
//!
//! Built like the agent (`+crt-static`, `--target x86_64-unknown-linux-gnu`), since the image
//! has no C library.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use nix::sys::mman::{mmap, msync, munmap, MapFlags, MsFlags, ProtFlags};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["udp-echo", port] => udp_echo(port),
        ["mmap-write", file, offset, text] => mmap_write(file, offset, text),
        ["fs-bench", dir, mib, files] => fs_bench(dir, mib, files),
        ["write-noise", file, mib, seed] => write_noise(file, mib, seed),
        _ => Err("usage: fcvm-test-tool udp-echo PORT | mmap-write FILE OFFSET TEXT | write-noise FILE MIB SEED | fs-bench DIR MIB FILES".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fcvm-test-tool: {e}");
            ExitCode::from(1)
        }
    }
}

fn udp_echo(port: &str) -> Result<(), String> {
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let socket =
        UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("cannot bind udp {port}: {e}"))?;
    println!("udp-echo listening on {port}");
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket
            .recv_from(&mut buf)
            .map_err(|e| format!("recv: {e}"))?;
        let mut reply = b"echo: ".to_vec();
        reply.extend_from_slice(&buf[..n]);
        // A reply that cannot be sent (the peer went) is the peer's problem, not the server's.
        if let Err(e) = socket.send_to(&reply, from) {
            eprintln!("udp-echo: send to {from}: {e}");
        }
    }
}

fn mmap_write(file: &str, offset: &str, text: &str) -> Result<(), String> {
    let offset: usize = offset
        .parse()
        .map_err(|_| format!("bad offset {offset:?}"))?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(file)
        .map_err(|e| format!("open {file}: {e}"))?;
    let end = offset + text.len();
    let len = f.metadata().map_err(|e| format!("stat {file}: {e}"))?.len();
    if (len as usize) < end {
        f.set_len(end as u64)
            .map_err(|e| format!("grow {file}: {e}"))?;
    }
    let size = NonZeroUsize::new(end).ok_or("nothing to write")?;
    // SAFETY: a fresh shared mapping of `end` bytes of a file at least that long, not aliased
    // by any Rust reference; it is written only inside its bounds below and unmapped before
    // the function returns.
    let map = unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            &f,
            0,
        )
    }
    .map_err(|e| format!("mmap {file}: {e}"))?;
    // SAFETY: `map` is valid for `end` bytes and `offset + text.len() == end`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            text.as_ptr(),
            map.as_ptr().cast::<u8>().add(offset),
            text.len(),
        );
    }
    // SAFETY: `map` and `end` are the mapping made above.
    let synced = unsafe { msync(map, end, MsFlags::MS_SYNC) };
    // SAFETY: as above; nothing uses the mapping after this.
    unsafe { munmap(map, end) }.map_err(|e| format!("munmap: {e}"))?;
    synced.map_err(|e| format!("msync {file}: {e}"))?;
    println!("mmap-write ok");
    Ok(())
}

fn fs_bench(dir: &str, mib: &str, files: &str) -> Result<(), String> {
    let mib: usize = mib.parse().map_err(|_| format!("bad MiB count {mib:?}"))?;
    let files: usize = files
        .parse()
        .map_err(|_| format!("bad file count {files:?}"))?;
    let dir = Path::new(dir);
    let data = dir.join("fs-bench.dat");
    // Bytes that are not all one value, so no layer can shortcut them.
    let chunk: Vec<u8> = (0..1usize << 20)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();

    let step = |what: &str| eprintln!("fs-bench {}: {what}", dir.display());
    step("write");
    let start = Instant::now();
    let mut f = File::create(&data).map_err(|e| format!("create {}: {e}", data.display()))?;
    for _ in 0..mib {
        f.write_all(&chunk).map_err(|e| format!("write: {e}"))?;
    }
    f.sync_all().map_err(|e| format!("fsync: {e}"))?;
    drop(f);
    let write_s = start.elapsed().as_secs_f64();

    step("read");
    let mut f = File::open(&data).map_err(|e| format!("open {}: {e}", data.display()))?;
    // Drop the file's cached pages so the read goes to the file system (the FUSE server, or
    // the VM's disk), not the guest's page cache.
    nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(|e| format!("fadvise: {e}"))?;
    let start = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        total += n;
    }
    let read_s = start.elapsed().as_secs_f64();
    if total != mib << 20 {
        return Err(format!("read back {total} bytes of {}", mib << 20));
    }
    std::fs::remove_file(&data).map_err(|e| format!("remove {}: {e}", data.display()))?;

    step("creates");
    let many = dir.join("fs-bench-files");
    std::fs::create_dir(&many).map_err(|e| format!("mkdir {}: {e}", many.display()))?;
    let names: Vec<_> = (0..files).map(|i| many.join(format!("f{i}"))).collect();
    let start = Instant::now();
    for n in &names {
        File::create(n).map_err(|e| format!("create {}: {e}", n.display()))?;
    }
    let create_s = start.elapsed().as_secs_f64();
    step("stat");
    let start = Instant::now();
    for n in &names {
        std::fs::metadata(n).map_err(|e| format!("stat {}: {e}", n.display()))?;
    }
    let stat_s = start.elapsed().as_secs_f64();
    step("statx force-sync");
    let start = Instant::now();
    for n in &names {
        stat_force_sync(n)?;
    }
    step("remove");
    let stat_sync_s = start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&many).map_err(|e| format!("remove {}: {e}", many.display()))?;

    let per = |s: f64| if files == 0 { 0.0 } else { s / files as f64 };
    println!(
        "fs-bench dir={} write_mib_s={:.1} read_mib_s={:.1} creates_per_s={:.0} stat_us={:.1} stat_sync_us={:.1}",
        dir.display(),
        mib as f64 / write_s,
        mib as f64 / read_s,
        files as f64 / create_s,
        per(stat_s) * 1e6,
        per(stat_sync_s) * 1e6,
    );
    Ok(())
}

/// `statx` with `AT_STATX_FORCE_SYNC`: the attributes from the file system itself (a FUSE
/// `GETATTR`), not the kernel's attribute cache. Neither std nor nix offers the flag.
fn stat_force_sync(path: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("a NUL in {}", path.display()))?;
    let mut out = std::mem::MaybeUninit::<libc::statx>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `out` is writable
    // memory of the size the kernel fills for a `statx` struct.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_BASIC_STATS,
            out.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "statx {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn write_noise(file: &str, mib: &str, seed: &str) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    let mib: usize = mib.parse().map_err(|_| format!("bad MiB count {mib:?}"))?;
    let mut x: u64 = seed.parse().map_err(|_| format!("bad seed {seed:?}"))?;
    if x == 0 {
        return Err("the seed must not be 0 (xorshift stays at 0)".into());
    }
    let mut f = File::create(file).map_err(|e| format!("create {file}: {e}"))?;
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        hash.update(&chunk);
        f.write_all(&chunk)
            .map_err(|e| format!("write {file}: {e}"))?;
    }
    f.sync_all().map_err(|e| format!("fsync {file}: {e}"))?;
    println!("sha256={:x}", hash.finalize());
    Ok(())
}
