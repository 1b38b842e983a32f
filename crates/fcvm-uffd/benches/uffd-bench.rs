//! Fault-serving figures for fcvm-uffd.
//!
//! Run: `cargo bench -p fcvm-uffd --bench uffd-bench -- [MIB] [CLONES]` or `-- ksm [MIB] [SECS]`.
//!
//! `uffd-bench [MIB] [CLONES]` (defaults 256, 4): memcpy baselines, then faults/s and per-fault
//! latency (timed in the faulting thread, one first touch per page) for a minimal blocking
//! handler, a tokio `AsyncFd` handler, the `PageServer` with one clone and with CLONES clones at
//! once.
//!
//! `uffd-bench ksm [MIB] [SECS] [PAGES_TO_SCAN]` (defaults 64, 60, 4096): two clone processes with
//! `PR_SET_MEMORY_MERGE` fault in the same file through the `PageServer`; reports how many of
//! their pages KSM merges over time and the CPU time of ksmd. Needs root; restores the KSM
//! settings it changes.

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow_free::{Context, Result};
use fcvm_uffd::client::{firecracker_v1_12_json, GuestMemory, UffdClient};
use fcvm_uffd::{ksm, PageServer, ServerConfig};

const PAGE: usize = 4096;

/// Minimal error plumbing: the bench is a binary, but this crate does not depend on anyhow.
mod anyhow_free {
    pub type Result<T> = std::result::Result<T, String>;
    pub trait Context<T> {
        fn context(self, what: &str) -> Result<T>;
    }
    impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
        fn context(self, what: &str) -> Result<T> {
            self.map_err(|e| format!("{what}: {e}"))
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; keep only our positional arguments.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let num = |i: usize, d: u64| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let res = match args.first().map(String::as_str) {
        Some("ksm") => ksm_bench(num(1, 64) as usize, num(2, 60), num(3, 4096) as i64),
        Some("ksm-child") => ksm_child(Path::new(&args[1]), num(2, 64) as usize),
        _ => fault_bench(num(0, 256) as usize, num(1, 4) as usize),
    };
    if let Err(e) = res {
        eprintln!("uffd-bench: {e}");
        std::process::exit(1);
    }
}

/// First byte of file page `page` (pages start with their index, little-endian).
fn byte_of(page: usize) -> u8 {
    page as u8
}

/// File page `page`: its index as a u64, then a filler; every page differs from every other,
/// so KSM can only merge pages across clones, never within one.
fn page_bytes(page: usize) -> [u8; PAGE] {
    let mut b = [(page % 251) as u8 + 1; PAGE];
    b[..8].copy_from_slice(&(page as u64).to_le_bytes());
    b
}

/// A temp dir holding a memory file of `page_bytes` pages.
fn memory_file(mib: usize) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir().context("tempdir")?;
    let path = dir.path().join("memory.bin");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).context("create")?);
    for p in 0..mib * 256 {
        f.write_all(&page_bytes(p)).context("write")?;
    }
    f.flush().context("flush")?;
    Ok((dir, path))
}

struct Figures {
    pages: usize,
    total: Duration,
    lat_ns: Vec<u64>,
}

impl Figures {
    fn print(&mut self, name: &str) {
        self.lat_ns.sort_unstable();
        let pct = |q: f64| {
            let i = ((self.lat_ns.len() as f64 - 1.0) * q).round() as usize;
            self.lat_ns[i] as f64 / 1000.0
        };
        let secs = self.total.as_secs_f64();
        println!(
            "{name:<38} {:>9.0} faults/s  {:>7.0} MiB/s  p50 {:>6.1} us  p99 {:>6.1} us  max {:>7.1} us",
            self.pages as f64 / secs,
            (self.pages * PAGE) as f64 / secs / (1 << 20) as f64,
            pct(0.50),
            pct(0.99),
            pct(1.0),
        );
    }
}

/// Touches every page once, timing each first touch, and checks the first byte.
fn touch_all(mem: &GuestMemory, expect: impl Fn(usize) -> u8) -> Result<Figures> {
    let pages = mem.len() / PAGE;
    let mut lat_ns = Vec::with_capacity(pages);
    let start = Instant::now();
    for p in 0..pages {
        let t = Instant::now();
        let b = mem.touch(p * PAGE).context("touch")?;
        lat_ns.push(t.elapsed().as_nanos() as u64);
        if b != expect(p) {
            return Err(format!("page {p}: read {b}, expected {}", expect(p)));
        }
    }
    Ok(Figures {
        pages,
        total: start.elapsed(),
        lat_ns,
    })
}

fn fault_bench(mib: usize, clones: usize) -> Result<()> {
    let (_dir, path) = memory_file(mib)?;
    let file = std::fs::File::open(&path).context("open")?;
    // SAFETY: read-only shared mapping of a file only this process writes (and it no longer does).
    let src = unsafe { memmap2::Mmap::map(&file) }.context("mmap")?;
    let len = src.len();
    let pages = len / PAGE;
    // Warm the page cache and our page tables for the source, as a long-running server has.
    let sum: u64 = src.iter().step_by(PAGE).map(|&b| u64::from(b)).sum();
    println!("{mib} MiB = {pages} pages of 4 KiB, file page cache warm (checksum {sum})");

    // memcpy baselines.
    let mut dst = vec![1u8; len];
    let t = Instant::now();
    dst.copy_from_slice(&src);
    let d = t.elapsed();
    println!(
        "{:<38} {:>7.2} GiB/s ({:.1} ms)",
        "memcpy, destination prefaulted",
        len as f64 / d.as_secs_f64() / (1u64 << 30) as f64,
        d.as_secs_f64() * 1e3
    );
    drop(dst);
    let fresh = GuestMemory::new(len).context("anon")?;
    let t = Instant::now();
    for p in 0..pages {
        fresh
            .write(p * PAGE, &src[p * PAGE..(p + 1) * PAGE])
            .context("write")?;
    }
    let d = t.elapsed();
    println!(
        "{:<38} {:>7.2} GiB/s ({:.1} ms)",
        "memcpy, destination fresh anonymous",
        len as f64 / d.as_secs_f64() / (1u64 << 30) as f64,
        d.as_secs_f64() * 1e3
    );
    drop(fresh);
    let fresh = GuestMemory::new(len).context("anon")?;
    touch_all(&fresh, |_| 0)?.print("first touch, no uffd (kernel zero page)");
    drop(fresh);

    // Minimal single-threaded blocking handler.
    {
        let (mem, uffd) = registered(len)?;
        let fd = uffd.as_fd().try_clone_to_owned().context("dup")?;
        let (dst_base, src_base) = (mem.addr(), src.as_ptr() as u64);
        let h = std::thread::spawn(move || minimal_blocking_handler(fd, dst_base, src_base, pages));
        touch_all(&mem, byte_of)?.print("uffd, minimal blocking handler");
        h.join().map_err(|_| "handler panicked".to_string())??;
    }

    // tokio AsyncFd handler on a 2-worker runtime (the alternative design).
    {
        let (mem, uffd) = registered(len)?;
        let fd = uffd.as_fd().try_clone_to_owned().context("dup")?;
        let (dst_base, src_base) = (mem.addr(), src.as_ptr() as u64);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_io()
            .build()
            .context("runtime")?;
        let task = rt.spawn(tokio_handler(fd, dst_base, src_base, pages));
        touch_all(&mem, byte_of)?.print("uffd, tokio AsyncFd handler");
        rt.block_on(task).map_err(|e| e.to_string())??;
    }

    // PageServer.
    let sock_dir = tempfile::tempdir().context("tempdir")?;
    let socket = sock_dir.path().join("uffd.sock");
    let server = PageServer::bind(ServerConfig::new(&socket, &path)).context("bind")?;
    {
        let (mem, uffd) = registered(len)?;
        let json = firecracker_v1_12_json(mem.addr(), len as u64, 0, PAGE as u64);
        let _stream = uffd.connect(&socket, json.as_bytes()).context("connect")?;
        touch_all(&mem, byte_of)?.print("PageServer, 1 clone");
    }
    let workers: Vec<_> = (0..clones)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || -> Result<Figures> {
                let (mem, uffd) = registered(len)?;
                let json = firecracker_v1_12_json(mem.addr(), len as u64, 0, PAGE as u64);
                let _stream = uffd.connect(&socket, json.as_bytes()).context("connect")?;
                touch_all(&mem, byte_of)
            })
        })
        .collect();
    let t = Instant::now();
    let mut all = Figures {
        pages: 0,
        total: Duration::ZERO,
        lat_ns: Vec::new(),
    };
    for w in workers {
        let f = w.join().map_err(|_| "clone panicked".to_string())??;
        all.pages += f.pages;
        all.lat_ns.extend(f.lat_ns);
    }
    all.total = t.elapsed();
    all.print(&format!("PageServer, {clones} clones at once (sum)"));
    server.stop_accepting();
    if !server.wait_idle_blocking(Some(Duration::from_secs(10))) {
        return Err("clones still live after the bench".into());
    }
    let st = server.stats();
    println!(
        "PageServer totals: {} pages copied, {} EEXIST, {} EAGAIN retries over {} clones",
        st.total_pages_copied(),
        st.finished.iter().map(|c| c.eexist).sum::<u64>(),
        st.finished.iter().map(|c| c.eagain_retries).sum::<u64>(),
        st.finished.len()
    );
    Ok(())
}

fn registered(len: usize) -> Result<(GuestMemory, UffdClient)> {
    let mem = GuestMemory::new(len).context("anon")?;
    let uffd = UffdClient::new(true).context("uffd")?;
    uffd.register(&mem).context("register")?;
    Ok((mem, uffd))
}

/// Reads one uffd_msg; returns the fault address of a page fault, None for other events.
fn decode_fault(buf: &[u8; 32]) -> Option<u64> {
    // uffd_msg: u8 event, then padding to 8, then {u64 flags, u64 address, ...}.
    (u32::from(buf[0]) == linux_raw_sys::general::UFFD_EVENT_PAGEFAULT)
        .then(|| u64::from_ne_bytes(buf[16..24].try_into().unwrap_or([0; 8])))
}

fn copy_page(fd: &OwnedFd, dst: u64, src: u64) -> std::result::Result<(), i32> {
    let mut arg = linux_raw_sys::general::uffdio_copy {
        dst,
        src,
        len: PAGE as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: UFFDIO_COPY reads/writes only `arg`; the kernel checks `dst` against the uffd's
    // registrations and reads `src` with copy_from_user.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            linux_raw_sys::ioctl::UFFDIO_COPY as libc::Ioctl,
            &mut arg,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// The simplest possible server: blocking read of one message, one UFFDIO_COPY, repeat.
fn minimal_blocking_handler(fd: OwnedFd, dst_base: u64, src_base: u64, pages: usize) -> Result<()> {
    nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .context("clear O_NONBLOCK")?;
    let mut served = 0;
    let mut buf = [0u8; 32];
    while served < pages {
        // SAFETY: `buf` is valid for 32 bytes of writes for the whole call.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n != 32 {
            return Err(format!("read uffd: {}", std::io::Error::last_os_error()));
        }
        if let Some(addr) = decode_fault(&buf) {
            let page = addr & !(PAGE as u64 - 1);
            match copy_page(&fd, page, src_base + (page - dst_base)) {
                Ok(()) | Err(libc::EEXIST) => served += 1,
                Err(e) => return Err(format!("UFFDIO_COPY errno {e}")),
            }
        }
    }
    Ok(())
}

async fn tokio_handler(fd: OwnedFd, dst_base: u64, src_base: u64, pages: usize) -> Result<()> {
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and keeps its number
    // until the AsyncFd is dropped.
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| format!("AsyncFd: {e}"))?;
    let mut served = 0;
    let mut buf = [0u8; 32];
    while served < pages {
        let mut guard = afd.readable().await.context("readable")?;
        loop {
            // SAFETY: `buf` is valid for 32 bytes of writes for the whole call.
            let n = unsafe { libc::read(afd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n != 32 {
                guard.clear_ready();
                break;
            }
            if let Some(addr) = decode_fault(&buf) {
                let page = addr & !(PAGE as u64 - 1);
                match copy_page(afd.get_ref(), page, src_base + (page - dst_base)) {
                    Ok(()) | Err(libc::EEXIST) => served += 1,
                    Err(e) => return Err(format!("UFFDIO_COPY errno {e}")),
                }
            }
        }
    }
    Ok(())
}

/// Child of `ksm`: opt in to KSM, fault in the whole file as a clone, report, wait.
fn ksm_child(socket: &Path, mib: usize) -> Result<()> {
    ksm::enable_ksm_merge_any().context("PR_SET_MEMORY_MERGE")?;
    let len = mib << 20;
    let (mem, uffd) = registered(len)?;
    let json = firecracker_v1_12_json(mem.addr(), len as u64, 0, PAGE as u64);
    let _stream = uffd.connect(socket, json.as_bytes()).context("connect")?;
    touch_all(&mem, byte_of)?;
    println!("ready");
    std::io::stdout().flush().context("stdout")?;
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    Ok(())
}

fn ksmd_cpu_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in dir.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim() == "ksmd" {
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let after = stat.rsplit(')').next().unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm.
            return f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    0
}

fn ksm_bench(mib: usize, secs: u64, pages_to_scan: i64) -> Result<()> {
    let (_dir, path) = memory_file(mib)?;
    let sock_dir = tempfile::tempdir().context("tempdir")?;
    let socket = sock_dir.path().join("uffd.sock");
    let server = PageServer::bind(ServerConfig::new(&socket, &path)).context("bind")?;

    let before = ksm::global_stat().context("read ksm sysfs")?;
    let knobs = ["run", "pages_to_scan", "sleep_millisecs"];
    let saved: Vec<(&str, i64)> = knobs
        .iter()
        .filter_map(|k| before.get(k).map(|v| (*k, v)))
        .collect();
    let restore = || {
        // Unmerge everything we caused, then put the knobs back.
        let _ = ksm::set_global("run", 2);
        for (k, v) in saved.iter().rev() {
            let _ = ksm::set_global(k, *v);
        }
    };
    let sleep_ms = 20;
    let res = (|| -> Result<()> {
        ksm::set_global("pages_to_scan", pages_to_scan).context("pages_to_scan")?;
        ksm::set_global("sleep_millisecs", sleep_ms).context("sleep_millisecs")?;
        ksm::set_global("run", 1).context("run")?;

        let exe = std::env::current_exe().context("current_exe")?;
        let mut children = Vec::new();
        for _ in 0..2 {
            let mut c = std::process::Command::new(&exe)
                .args(["ksm-child", &socket.display().to_string(), &mib.to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .context("spawn child")?;
            let mut line = String::new();
            std::io::BufReader::new(c.stdout.take().ok_or("no stdout")?)
                .read_line(&mut line)
                .context("child ready")?;
            if line.trim() != "ready" {
                return Err(format!("child said {line:?}"));
            }
            children.push(c);
        }
        let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
        let pages = mib * 256;
        println!(
            "2 clone processes x {mib} MiB ({pages} pages each, identical content), pages_to_scan={pages_to_scan} sleep_millisecs={sleep_ms}"
        );
        let ticks0 = ksmd_cpu_ticks();
        let t0 = Instant::now();
        let mut merged_all = false;
        while t0.elapsed() < Duration::from_secs(secs) {
            std::thread::sleep(Duration::from_millis(1000));
            let per: Vec<u64> = pids
                .iter()
                .map(|p| ksm::process_stat(*p).map(|s| s.merging_pages).unwrap_or(0))
                .collect();
            let g = ksm::global_stat().context("ksm stat")?;
            println!(
                "t={:>4.1}s merging_pages {:?}  pages_shared {} pages_sharing {} full_scans {}",
                t0.elapsed().as_secs_f64(),
                per,
                g.get("pages_shared").unwrap_or(0),
                g.pages_sharing(),
                g.get("full_scans").unwrap_or(0),
            );
            if per.iter().all(|&m| m as usize >= pages) {
                merged_all = true;
                break;
            }
        }
        let ticks = ksmd_cpu_ticks().saturating_sub(ticks0);
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let wall = t0.elapsed().as_secs_f64();
        println!(
            "{} after {wall:.1} s; ksmd CPU {:.2} s ({:.0}% of one core)",
            if merged_all {
                "all pages merged"
            } else {
                "NOT all pages merged"
            },
            ticks as f64 / hz,
            ticks as f64 / hz / wall * 100.0
        );
        // What ksmd costs once everything is merged and it just keeps rescanning.
        let (t1, k1) = (Instant::now(), ksmd_cpu_ticks());
        std::thread::sleep(Duration::from_secs(5));
        let steady = ksmd_cpu_ticks().saturating_sub(k1) as f64 / hz / t1.elapsed().as_secs_f64();
        println!(
            "ksmd steady state afterwards: {:.0}% of one core",
            steady * 100.0
        );
        for mut c in children {
            drop(c.stdin.take());
            let _ = c.wait();
        }
        Ok(())
    })();
    restore();
    server.stop_accepting();
    server.wait_idle_blocking(Some(Duration::from_secs(10)));
    res
}
