//! PageServer against fake clones: the test plays Firecracker (anonymous memory registered with
//! a userfaultfd, JSON + fd over SCM_RIGHTS) and checks every byte the server puts in.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fcvm_uffd::client::{firecracker_v1_12_json, send_with_fd, GuestMemory, UffdClient};
use fcvm_uffd::{
    DisconnectReason, HandshakeError, PageServer, PageSizeSource, ServerConfig, ServerEvent,
    WireShape,
};
use tokio::sync::broadcast;

const PAGE: usize = 4096;
const WAIT: Duration = Duration::from_secs(20);

/// Byte `i` of file page `p`: differs between pages and within a page, never all-zero.
fn pattern(p: usize, i: usize) -> u8 {
    ((p * 131 + i * 7 + 1) % 251) as u8 + 1
}

fn page_of(p: usize) -> Vec<u8> {
    (0..PAGE).map(|i| pattern(p, i)).collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    server: PageServer,
    events: broadcast::Receiver<ServerEvent>,
}

fn fixture_with(pages: usize, tune: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("memory.bin");
    let mut f = std::fs::File::create(&mem).unwrap();
    for p in 0..pages {
        f.write_all(&page_of(p)).unwrap();
    }
    drop(f);
    let socket = dir.path().join("uffd.sock");
    let mut cfg = ServerConfig::new(&socket, &mem);
    tune(&mut cfg);
    let server = PageServer::bind(cfg).unwrap();
    let events = server.subscribe();
    Fixture {
        _dir: dir,
        socket,
        server,
        events,
    }
}

fn fixture(pages: usize) -> Fixture {
    fixture_with(pages, |_| {})
}

/// A fake Firecracker clone: guest memory, its uffd, and the open handshake socket.
struct Clone {
    mem: GuestMemory,
    _uffd: UffdClient,
    stream: UnixStream,
}

fn clone_with_json(socket: &Path, pages: usize, json: impl Fn(u64) -> String) -> Clone {
    let mem = GuestMemory::new(pages * PAGE).unwrap();
    let uffd = UffdClient::new(true).unwrap();
    uffd.register(&mem).unwrap();
    let stream = uffd.connect(socket, json(mem.addr()).as_bytes()).unwrap();
    Clone {
        mem,
        _uffd: uffd,
        stream,
    }
}

fn clone_v1_12(socket: &Path, pages: usize, file_offset_pages: usize) -> Clone {
    clone_with_json(socket, pages, |base| {
        firecracker_v1_12_json(
            base,
            (pages * PAGE) as u64,
            (file_offset_pages * PAGE) as u64,
            PAGE as u64,
        )
    })
}

/// Runs `f` on another thread and fails the test instead of hanging if a fault is never served.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("{what}: no answer within {WAIT:?} (fault not served?)"))
}

/// Reads pages `[first, first+count)` of the clone's memory and checks them against file pages
/// starting at `file_first`.
fn assert_pages(mem: &GuestMemory, first: usize, count: usize, file_first: usize) {
    let mut buf = vec![0u8; PAGE];
    for k in 0..count {
        mem.read((first + k) * PAGE, &mut buf).unwrap();
        assert!(
            buf == page_of(file_first + k),
            "guest page {} differs from file page {}",
            first + k,
            file_first + k
        );
    }
}

/// Counters are bumped right after the ioctl that wakes the faulting thread, so a reader may see
/// them a moment late: wait until the live stats satisfy `pred`.
fn live_stats_until(
    server: &PageServer,
    pred: impl Fn(&[fcvm_uffd::CloneStats]) -> bool,
) -> Vec<fcvm_uffd::CloneStats> {
    let deadline = Instant::now() + WAIT;
    loop {
        let live = server.stats().live;
        if pred(&live) || Instant::now() > deadline {
            return live;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn next_event(rx: &mut broadcast::Receiver<ServerEvent>) -> ServerEvent {
    let deadline = Instant::now() + WAIT;
    loop {
        match rx.try_recv() {
            Ok(ev) => return ev,
            Err(broadcast::error::TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("no server event: {e:?}"),
        }
    }
}

fn expect_connected(rx: &mut broadcast::Receiver<ServerEvent>) -> u64 {
    match next_event(rx) {
        ServerEvent::Connected { id, pid, .. } => {
            assert_eq!(pid, Some(std::process::id() as i32), "SO_PEERCRED pid");
            id
        }
        other => panic!("expected Connected, got {other:?}"),
    }
}

fn expect_rejected(rx: &mut broadcast::Receiver<ServerEvent>) -> HandshakeError {
    match next_event(rx) {
        ServerEvent::HandshakeRejected { reason, .. } => reason,
        other => panic!("expected HandshakeRejected, got {other:?}"),
    }
}

#[test]
fn serves_exact_v1_12_1_handshake_and_notices_close() {
    let mut fx = fixture(256);
    let clone = clone_v1_12(&fx.socket, 256, 0);
    let id = expect_connected(&mut fx.events);
    let mem = clone.mem;
    let mem = within("touch all pages", move || {
        assert_pages(&mem, 0, 256, 0);
        mem
    });

    let live = live_stats_until(&fx.server, |l| l.len() == 1 && l[0].pages_copied == 256);
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].pages_copied, 256);
    assert_eq!(live[0].bytes_served, 256 * PAGE as u64);
    assert_eq!(live[0].page_size_source, PageSizeSource::PageSize);
    assert_eq!(live[0].guest_bytes, 256 * PAGE as u64);

    // Firecracker exiting closes the socket (and the uffd with its process).
    drop(clone.stream);
    match next_event(&mut fx.events) {
        ServerEvent::Disconnected { id: got, stats, .. } => {
            assert_eq!(got, id);
            assert_eq!(
                stats.disconnect_reason,
                Some(DisconnectReason::SocketClosed)
            );
            assert_eq!(stats.pages_copied, 256);
            assert!(stats.disconnected_at_unix_ms >= Some(stats.connected_at_unix_ms));
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(fx.server.wait_idle_blocking(Some(WAIT)));
    let stats = fx.server.stats();
    assert!(stats.live.is_empty());
    assert_eq!(stats.finished.len(), 1);
    assert_eq!(stats.total_pages_copied(), 256);
    // The snapshot struct is what the CLI stores.
    let json = serde_json::to_string(&stats).unwrap();
    assert!(json.contains("\"pages_copied\":256"), "{json}");
    drop(mem);
}

#[test]
fn accepts_every_historical_shape() {
    let mut fx = fixture(64);
    // (json builder, expected page size source, expected shape)
    type Build = Box<dyn Fn(u64) -> String>;
    let cases: Vec<(Build, PageSizeSource, WireShape)> = vec![
        (
            Box::new(|b| format!(r#"[{{"base_host_virt_addr":{b},"size":65536,"offset":8192}}]"#)),
            PageSizeSource::HostDefault,
            WireShape::Array,
        ),
        (
            Box::new(|b| {
                format!(
                    r#"[{{"base_host_virt_addr":{b},"size":65536,"offset":8192,"page_size_kib":4096}}]"#
                )
            }),
            PageSizeSource::PageSizeKibAsBytes,
            WireShape::Array,
        ),
        (
            Box::new(|b| {
                format!(
                    r#"[{{"base_host_virt_addr":{b},"size":65536,"offset":8192,"page_size":4096,"new_field":[1,2]}}]"#
                )
            }),
            PageSizeSource::PageSize,
            WireShape::Array,
        ),
        (
            Box::new(|b| {
                format!(
                    r#"{{"LoadSnapshot":{{"guest_mappings":[{{"base_host_virt_addr":{b},"size":65536,"offset":8192,"page_size":4096}}]}}}}"#
                )
            }),
            PageSizeSource::PageSize,
            WireShape::LoadSnapshot,
        ),
    ];
    for (build, source, shape) in cases {
        let clone = clone_with_json(&fx.socket, 16, build);
        expect_connected(&mut fx.events);
        let mem = clone.mem;
        let mem = within("touch", move || {
            // offset 8192 = file page 2
            assert_pages(&mem, 0, 16, 2);
            mem
        });
        drop(clone.stream);
        match next_event(&mut fx.events) {
            ServerEvent::Disconnected { stats, .. } => {
                assert_eq!((stats.page_size_source, stats.wire_shape), (source, shape));
                assert_eq!(stats.pages_copied, 16);
            }
            other => panic!("{other:?}"),
        }
        drop(mem);
    }
}

#[test]
fn serves_two_regions_of_one_clone() {
    let mut fx = fixture(32);
    // Two separate mappings, like guest memory split around the MMIO hole; the file holds them
    // back to back.
    let low = GuestMemory::new(8 * PAGE).unwrap();
    let high = GuestMemory::new(24 * PAGE).unwrap();
    let uffd = UffdClient::new(true).unwrap();
    uffd.register(&low).unwrap();
    uffd.register(&high).unwrap();
    let json = format!(
        r#"[{{"base_host_virt_addr":{},"size":{},"offset":0,"page_size":4096}},{{"base_host_virt_addr":{},"size":{},"offset":{},"page_size":4096}}]"#,
        low.addr(),
        8 * PAGE,
        high.addr(),
        24 * PAGE,
        8 * PAGE
    );
    let stream = uffd.connect(&fx.socket, json.as_bytes()).unwrap();
    expect_connected(&mut fx.events);
    let (low, high) = within("touch both", move || {
        assert_pages(&high, 0, 24, 8);
        assert_pages(&low, 0, 8, 0);
        (low, high)
    });
    assert_eq!(fx.server.stats().live[0].regions, 2);
    drop((stream, low, high));
}

#[test]
fn rejects_bad_handshakes_and_keeps_serving() {
    let mut fx = fixture_with(16, |c| c.handshake_timeout = Duration::from_millis(300));

    let send_raw = |json: &[u8], with_fd: bool| -> UnixStream {
        let uffd = UffdClient::new(true).unwrap();
        let s = UnixStream::connect(&fx.socket).unwrap();
        send_with_fd(&s, json, with_fd.then(|| std::os::fd::AsFd::as_fd(&uffd))).unwrap();
        s
    };

    let _s = send_raw(b"{this is not json", true);
    assert!(matches!(
        expect_rejected(&mut fx.events),
        HandshakeError::Json(_)
    ));

    let _s = send_raw(b"[]", true);
    assert_eq!(expect_rejected(&mut fx.events), HandshakeError::NoRegions);

    let valid = firecracker_v1_12_json(0x7f00_0000_0000, 16 * PAGE as u64, 0, PAGE as u64);
    let _s = send_raw(valid.as_bytes(), false);
    assert_eq!(expect_rejected(&mut fx.events), HandshakeError::MissingFd);

    let mut big = b"[".to_vec();
    big.extend(vec![b' '; 70 * 1024]);
    let _s = send_raw(&big, true);
    assert!(matches!(
        expect_rejected(&mut fx.events),
        HandshakeError::TooLarge { .. }
    ));

    let beyond =
        firecracker_v1_12_json(0x7f00_0000_0000, 16 * PAGE as u64, PAGE as u64, PAGE as u64);
    let _s = send_raw(beyond.as_bytes(), true);
    assert!(matches!(
        expect_rejected(&mut fx.events),
        HandshakeError::BeyondFile { index: 0, end, file_len } if end == 17 * PAGE as u64 && file_len == 16 * PAGE as u64
    ));

    // A pipe instead of a userfaultfd.
    let (r, _w) = nix::unistd::pipe().unwrap();
    let s = UnixStream::connect(&fx.socket).unwrap();
    send_with_fd(&s, valid.as_bytes(), Some(std::os::fd::AsFd::as_fd(&r))).unwrap();
    assert!(matches!(
        expect_rejected(&mut fx.events),
        HandshakeError::NotUserfaultfd(_)
    ));

    // Connected but silent: times out.
    let _silent = UnixStream::connect(&fx.socket).unwrap();
    assert_eq!(expect_rejected(&mut fx.events), HandshakeError::Timeout);

    // Half a message, then nothing: also a timeout, not a hang.
    let _half = send_raw(br#"[{"base_host_virt_addr":"#, true);
    assert_eq!(expect_rejected(&mut fx.events), HandshakeError::Timeout);

    let stats = fx.server.stats();
    assert_eq!(stats.rejected_total, 8);
    assert_eq!(stats.rejected.len(), 8);

    // Still serving.
    let clone = clone_v1_12(&fx.socket, 16, 0);
    expect_connected(&mut fx.events);
    let mem = clone.mem;
    within("touch after rejections", move || {
        assert_pages(&mem, 0, 16, 0)
    });
}

#[test]
fn serves_ten_concurrent_clones() {
    const PAGES: usize = 512;
    let mut fx = fixture(PAGES);
    let socket = fx.socket.clone();
    let workers: Vec<_> = (0..10)
        .map(|n| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let clone = clone_v1_12(&socket, PAGES, 0);
                // Each clone walks its pages in a different order.
                let mut buf = vec![0u8; PAGE];
                for k in 0..PAGES {
                    let p = (k * (2 * n + 1) + n * 37) % PAGES;
                    clone.mem.read(p * PAGE, &mut buf).unwrap();
                    assert!(buf == page_of(p), "clone {n} page {p}");
                }
                clone
            })
        })
        .collect();
    let clones = within("10 clones", move || {
        workers
            .into_iter()
            .map(|w| w.join().expect("clone thread"))
            .collect::<Vec<_>>()
    });
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..10 {
        ids.insert(expect_connected(&mut fx.events));
    }
    assert_eq!(ids.len(), 10);
    let live = live_stats_until(&fx.server, |l| {
        l.len() == 10 && l.iter().all(|c| c.pages_copied == PAGES as u64)
    });
    assert_eq!(live.len(), 10);
    for c in &live {
        assert_eq!(c.pages_copied, PAGES as u64, "clone {}", c.id);
    }
    drop(clones);
    assert!(fx.server.wait_idle_blocking(Some(WAIT)), "all clones gone");
    let stats = fx.server.stats();
    assert_eq!(stats.finished.len(), 10);
    assert_eq!(stats.total_pages_copied(), 10 * PAGES as u64);
}

#[test]
fn removed_ranges_fault_back_as_zeros() {
    let mut fx = fixture(32);
    let clone = clone_v1_12(&fx.socket, 32, 0);
    expect_connected(&mut fx.events);
    let mem = clone.mem;
    let mem = within("remove then refault", move || {
        assert_pages(&mem, 0, 32, 0);
        // Balloon-style discard of pages 4..8; the server learns it through UFFD_EVENT_REMOVE.
        mem.discard(4 * PAGE, 4 * PAGE).unwrap();
        let mut buf = vec![0xAAu8; PAGE];
        for p in 4..8 {
            mem.read(p * PAGE, &mut buf).unwrap();
            assert!(
                buf.iter().all(|&b| b == 0),
                "page {p} must read back as zeros"
            );
        }
        // Neighbours untouched.
        assert_pages(&mem, 0, 4, 0);
        assert_pages(&mem, 8, 24, 8);
        mem
    });
    let live = &live_stats_until(&fx.server, |l| {
        l[0].zero_pages == 4 && l[0].pages_copied == 32
    })[0];
    assert_eq!(live.zero_pages, 4);
    assert!(live.remove_events >= 1);
    assert_eq!(live.pages_copied, 32);
    drop(mem);
}

#[test]
fn stop_accepting_keeps_live_clones_and_refuses_new_ones() {
    let mut fx = fixture(64);
    let clone = clone_v1_12(&fx.socket, 64, 0);
    expect_connected(&mut fx.events);
    let mem = clone.mem;
    let mem = within("first half", move || {
        assert_pages(&mem, 0, 32, 0);
        mem
    });

    fx.server.stop_accepting();
    assert!(!fx.server.is_accepting());
    assert!(
        UnixStream::connect(&fx.socket).is_err(),
        "new clones must be refused"
    );
    assert!(!fx.socket.exists(), "socket file removed");

    // The live clone still faults in the rest.
    let mem = within("second half after stop", move || {
        assert_pages(&mem, 32, 32, 32);
        mem
    });
    assert!(!fx
        .server
        .wait_idle_blocking(Some(Duration::from_millis(100))));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    drop(clone.stream);
    rt.block_on(async {
        tokio::time::timeout(WAIT, fx.server.wait_idle())
            .await
            .expect("wait_idle resolves once the clone is gone")
    });
    assert_eq!(fx.server.stats().finished[0].pages_copied, 64);
    drop(mem);
}

#[test]
fn refuses_clones_beyond_max() {
    let mut fx = fixture_with(8, |c| c.max_clones = 1);
    let first = clone_v1_12(&fx.socket, 8, 0);
    expect_connected(&mut fx.events);
    // The server may refuse before the message is even sent, so a send error is fine here.
    let mut second = UnixStream::connect(&fx.socket).unwrap();
    let _ = second.write_all(b"[]");
    assert_eq!(
        expect_rejected(&mut fx.events),
        HandshakeError::TooManyClones { max: 1 }
    );
    let mem = first.mem;
    within("first still served", move || assert_pages(&mem, 0, 8, 0));
}

#[test]
fn socket_in_use_is_an_error_and_stale_socket_is_replaced() {
    let fx = fixture(1);
    let err = PageServer::bind(ServerConfig::new(
        &fx.socket,
        fx._dir.path().join("memory.bin"),
    ))
    .err()
    .expect("second server on a live socket");
    assert!(
        matches!(err, fcvm_uffd::ServerError::SocketInUse { .. }),
        "{err}"
    );

    // A socket file nobody listens on any more.
    let stale = fx._dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let s = PageServer::bind(ServerConfig::new(&stale, fx._dir.path().join("memory.bin"))).unwrap();
    assert!(UnixStream::connect(&stale).is_ok());
    drop(s);
    assert!(!stale.exists());

    let empty = fx._dir.path().join("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    let err = PageServer::bind(ServerConfig::new(fx._dir.path().join("e.sock"), &empty))
        .err()
        .unwrap();
    assert!(
        matches!(err, fcvm_uffd::ServerError::EmptyMemoryFile { .. }),
        "{err}"
    );
}

/// Env var that turns [`child_clone_process`] into a fake Firecracker in a separate process.
const CHILD_ENV: &str = "FCVM_UFFD_TEST_CHILD_SOCKET";
const CHILD_PAGES: usize = 64;

/// Not a test on its own: the body of the child process spawned by
/// `other_process_clone_is_tracked_by_pidfd`. It connects, optionally closes its handshake
/// socket (some peer could), faults in every page, reports, then lives until stdin closes.
#[test]
#[ignore = "helper process for other_process_clone_is_tracked_by_pidfd"]
fn child_clone_process() {
    let Ok(socket) = std::env::var(CHILD_ENV) else {
        return;
    };
    let close_socket = std::env::var("FCVM_UFFD_TEST_CHILD_CLOSE").is_ok();
    let clone = clone_v1_12(Path::new(&socket), CHILD_PAGES, 0);
    if close_socket {
        drop(clone.stream);
    } else {
        std::mem::forget(clone.stream);
    }
    assert_pages(&clone.mem, 0, CHILD_PAGES, 0);
    println!("CHILD-PAGES-OK");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

fn spawn_child(socket: &Path, close_socket: bool) -> std::process::Child {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "child_clone_process",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, socket)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if close_socket {
        cmd.env("FCVM_UFFD_TEST_CHILD_CLOSE", "1");
    }
    cmd.spawn().unwrap()
}

fn wait_child_ok(child: &mut std::process::Child) {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let ok = within("child faults", move || {
        std::io::BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("CHILD-PAGES-OK"))
    });
    assert!(ok, "child saw wrong page contents");
}

#[test]
fn other_process_clone_is_tracked_by_pidfd() {
    let mut fx = fixture(CHILD_PAGES);

    // 1. A peer that closes its handshake socket but keeps running is still served, and its
    //    exit is noticed through the pidfd.
    let mut child = spawn_child(&fx.socket, true);
    let pid = child.id() as i32;
    match next_event(&mut fx.events) {
        ServerEvent::Connected { pid: got, .. } => assert_eq!(got, Some(pid)),
        other => panic!("{other:?}"),
    }
    wait_child_ok(&mut child);
    assert_eq!(
        fx.server.stats().live.len(),
        1,
        "socket close of a live process is not an exit"
    );
    drop(child.stdin.take()); // let it exit
    child.wait().unwrap();
    match next_event(&mut fx.events) {
        ServerEvent::Disconnected {
            pid: got, stats, ..
        } => {
            assert_eq!(got, Some(pid));
            assert_eq!(
                stats.disconnect_reason,
                Some(DisconnectReason::ProcessExited)
            );
            assert_eq!(stats.pages_copied, CHILD_PAGES as u64);
        }
        other => panic!("{other:?}"),
    }

    // 2. A peer killed while holding its socket open.
    let mut child = spawn_child(&fx.socket, false);
    let pid = child.id() as i32;
    assert!(matches!(
        next_event(&mut fx.events),
        ServerEvent::Connected { .. }
    ));
    wait_child_ok(&mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    match next_event(&mut fx.events) {
        ServerEvent::Disconnected {
            pid: got, stats, ..
        } => {
            assert_eq!(got, Some(pid));
            assert_eq!(
                stats.disconnect_reason,
                Some(DisconnectReason::ProcessExited)
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(fx.server.wait_idle_blocking(Some(WAIT)));
}

#[test]
fn server_handle_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<PageServer>();
    assert_send_sync::<GuestMemory>();
    // And across a real thread: stats from another thread see the same server.
    let fx = std::sync::Arc::new(fixture(4));
    let other = std::sync::Arc::clone(&fx);
    let len = std::thread::spawn(move || other.server.memory_len())
        .join()
        .unwrap();
    assert_eq!(len, 4 * PAGE as u64);
}

#[test]
fn fault_around_fills_the_rest_of_the_window_and_skips_present_pages() {
    let mut fx = fixture_with(64, |c| c.fault_around_pages = 16);
    let clone = clone_v1_12(&fx.socket, 64, 0);
    expect_connected(&mut fx.events);
    let mem = clone.mem;
    // One fault on page 3 brings in 3..16: the rest of its aligned 16-page window.
    let mem = within("touch page 3", move || {
        assert_pages(&mem, 3, 1, 3);
        mem
    });
    let live = live_stats_until(&fx.server, |l| l[0].pages_copied == 13);
    assert_eq!(live[0].pages_copied, 13);
    // Page 0's window copy stops at the present page 3 and skips the present 4..16.
    let mem = within("touch page 0", move || {
        assert_pages(&mem, 0, 1, 0);
        mem
    });
    let live = live_stats_until(&fx.server, |l| l[0].pages_copied == 16);
    assert_eq!(live[0].pages_copied, 16);
    // Everything the window brought in is the file's data; the next window is untouched.
    let mem = within("read the window back", move || {
        assert_pages(&mem, 0, 16, 0);
        mem
    });
    assert_eq!(
        fx.server.stats().live[0].pages_copied,
        16,
        "no fault inside the window"
    );
    let mem = within("touch page 16", move || {
        assert_pages(&mem, 16, 1, 16);
        mem
    });
    let live = live_stats_until(&fx.server, |l| l[0].pages_copied == 32);
    assert_eq!(live[0].pages_copied, 32);
    drop(mem);
}

#[test]
fn fault_around_of_one_page_copies_only_the_faulting_page() {
    let mut fx = fixture_with(32, |c| c.fault_around_pages = 1);
    let clone = clone_v1_12(&fx.socket, 32, 0);
    expect_connected(&mut fx.events);
    let mem = clone.mem;
    let mem = within("touch page 5", move || {
        assert_pages(&mem, 5, 1, 5);
        mem
    });
    let live = live_stats_until(&fx.server, |l| l[0].pages_copied >= 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(live[0].pages_copied, 1);
    assert_eq!(fx.server.stats().live[0].pages_copied, 1);
    drop(mem);
}
