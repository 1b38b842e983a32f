//! [`PageServer`]: serves guest memory of many Firecracker clones from one memory file.
//!
//! Threads: one accept thread, and one thread per clone that blocks in `poll(2)` on the clone's
//! userfaultfd, its handshake socket and (for other processes) its pidfd. A clone's faults are
//! serialised by its vCPUs anyway, a blocked thread wakes with the lowest latency, and nothing a
//! clone does (a flood of faults, a stuck handshake) can delay another clone. See the README for
//! the measurements behind this choice.
//!
//! Safety rule: a clone's uffd is closed only once the clone is gone. Closing it earlier would
//! make the clone's later faults resolve to zero pages, silently corrupting the guest, so
//! dropping the [`PageServer`] only stops accepting: serving threads carry on until their clone
//! exits.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::linux::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use memmap2::{Mmap, MmapMut};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, recv, sockopt::PeerCredentials, MsgFlags};
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

use crate::handshake::{self, GuestRegion, HandshakeError, Mappings};
use crate::stats::{
    unix_ms, CloneStats, Counters, DisconnectReason, RejectedHandshake, ServerEvent, ServerStats,
};
use crate::sys::{self, UffdEvent};

/// Settings of a [`PageServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Unix socket to listen on (Firecracker's `mem_backend.backend_path`).
    pub socket_path: PathBuf,
    /// Snapshot memory file to serve.
    pub memory_file: PathBuf,
    /// How long a connected peer may take to send its handshake.
    pub handshake_timeout: Duration,
    /// Clones (plus pending handshakes) served at once; further connections are refused.
    pub max_clones: usize,
    /// How many finished clones and refused handshakes [`PageServer::stats`] remembers.
    pub history_limit: usize,
    /// Capacity of each event subscriber's queue before it starts lagging.
    pub event_capacity: usize,
    /// Fault-around window in pages: a fault also copies the rest of its aligned window of
    /// this many pages (without waking anyone), so a guest walking its memory takes one
    /// fault per window instead of one per page. 1 disables it.
    pub fault_around_pages: u64,
    /// Besides root and this process's uid, serve only peers (by `SO_PEERCRED`) whose uid
    /// is in this inclusive range (the jailed VMMs' uids). None: anyone who can connect.
    pub peer_uids: Option<(u32, u32)>,
}

/// Default fault-around window: 16 pages (64 KiB with 4 KiB pages).
pub const DEFAULT_FAULT_AROUND_PAGES: u64 = 16;

impl ServerConfig {
    /// Defaults: 30 s handshake timeout, 4096 clones, 1024 history entries, 1024 queued events.
    pub fn new(socket_path: impl Into<PathBuf>, memory_file: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            memory_file: memory_file.into(),
            handshake_timeout: Duration::from_secs(30),
            max_clones: 4096,
            history_limit: 1024,
            event_capacity: 1024,
            fault_around_pages: DEFAULT_FAULT_AROUND_PAGES,
            peer_uids: None,
        }
    }
}

/// Failures starting a [`PageServer`].
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // variant fields are spelled out in each message
pub enum ServerError {
    /// The memory file could not be opened or inspected.
    #[error("cannot open memory file {path}: {source}")]
    OpenMemoryFile { path: PathBuf, source: io::Error },
    /// The memory file is empty.
    #[error("memory file {path} is empty; is the snapshot complete?")]
    EmptyMemoryFile { path: PathBuf },
    /// mmap of the memory file failed.
    #[error("cannot map memory file {path}: {source}")]
    MapMemoryFile { path: PathBuf, source: io::Error },
    /// Another server answers on the socket path.
    #[error("another process is already serving on {path}; stop it or pick another socket path")]
    SocketInUse { path: PathBuf },
    /// bind/listen failed.
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    /// Creating the accept thread or its wake-up pipe failed.
    #[error("cannot start the accept thread: {0}")]
    Start(io::Error),
}

/// Serves page faults of any number of clones restored from one memory file.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use fcvm_uffd::{PageServer, ServerConfig};
/// let server = PageServer::bind(ServerConfig::new("/run/fcvm/uffd.sock", "memory.bin"))?;
/// // The socket is listening now: send PUT /snapshot/load with backend_path = the socket.
/// let mut events = server.subscribe();
/// // ... on SIGTERM:
/// server.stop_accepting();
/// server.wait_idle_blocking(None);
/// println!("{}", serde_json::to_string(&server.stats())?);
/// # drop(events); Ok(()) }
/// ```
pub struct PageServer {
    shared: Arc<Shared>,
    accept: Mutex<Option<AcceptHandle>>,
}

struct AcceptHandle {
    thread: JoinHandle<()>,
    stop_tx: OwnedFd,
}

struct Shared {
    cfg: ServerConfig,
    mem: Mmap,
    host_page: u64,
    state: Mutex<State>,
    idle_cv: Condvar,
    active_tx: watch::Sender<usize>,
    events: broadcast::Sender<ServerEvent>,
    events_unobserved: AtomicU64,
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    accepting: bool,
    accepted: u64,
    pending: usize,
    live: BTreeMap<u64, Arc<LiveClone>>,
    finished: VecDeque<CloneStats>,
    rejected: VecDeque<RejectedHandshake>,
    rejected_total: u64,
}

impl State {
    fn active(&self) -> usize {
        self.pending + self.live.len()
    }
}

struct LiveClone {
    base: CloneStats,
    counters: Counters,
}

impl LiveClone {
    fn snapshot(&self) -> CloneStats {
        let mut s = self.base.clone();
        s.fill_from(&self.counters);
        s
    }
}

impl PageServer {
    /// Maps the memory file read-only, binds and listens on the socket, and starts accepting.
    /// When this returns the socket accepts connections, so `/snapshot/load` may be sent.
    ///
    /// A stale socket file (nobody answering) is replaced; a live one is an error.
    pub fn bind(cfg: ServerConfig) -> Result<Self, ServerError> {
        let file = std::fs::File::open(&cfg.memory_file).map_err(|source| {
            ServerError::OpenMemoryFile {
                path: cfg.memory_file.clone(),
                source,
            }
        })?;
        let len = file
            .metadata()
            .map_err(|source| ServerError::OpenMemoryFile {
                path: cfg.memory_file.clone(),
                source,
            })?
            .len();
        if len == 0 {
            return Err(ServerError::EmptyMemoryFile {
                path: cfg.memory_file.clone(),
            });
        }
        // SAFETY: the mapping is read-only and shared; we never create references into it from
        // Rust code (only its address is handed to UFFDIO_COPY, where the kernel reads it with
        // copy_from_user), so a concurrent truncation of the file cannot cause SIGBUS here, only
        // EFAULT from the ioctl.
        let mem = unsafe { Mmap::map(&file) }.map_err(|source| ServerError::MapMemoryFile {
            path: cfg.memory_file.clone(),
            source,
        })?;

        let listener = bind_listener(&cfg.socket_path)?;
        if cfg.peer_uids.is_some() {
            // Peers are vetted by uid (SO_PEERCRED), so any may connect: jailed clones
            // reach the socket as their own uids, through hard links in their chroots.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cfg.socket_path, std::fs::Permissions::from_mode(0o666))
                .map_err(ServerError::Start)?;
        }
        let listener_ino = std::fs::metadata(&cfg.socket_path).map(|m| m.st_ino()).ok();
        let (stop_rx, stop_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| ServerError::Start(e.into()))?;

        let (active_tx, _) = watch::channel(0usize);
        let (events, _) = broadcast::channel(cfg.event_capacity.max(1));
        let shared = Arc::new(Shared {
            host_page: sys::host_page_size(),
            mem,
            state: Mutex::new(State {
                accepting: true,
                ..State::default()
            }),
            idle_cv: Condvar::new(),
            active_tx,
            events,
            events_unobserved: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            cfg,
        });
        info!(
            socket = %shared.cfg.socket_path.display(),
            memory_file = %shared.cfg.memory_file.display(),
            bytes = len,
            "uffd page server listening"
        );

        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("uffd-accept".into())
            .spawn(move || accept_loop(s, listener, listener_ino, stop_rx))
            .map_err(ServerError::Start)?;
        Ok(Self {
            shared,
            accept: Mutex::new(Some(AcceptHandle { thread, stop_tx })),
        })
    }

    /// The socket clones connect to.
    pub fn socket_path(&self) -> &Path {
        &self.shared.cfg.socket_path
    }

    /// Length of the memory file in bytes.
    pub fn memory_len(&self) -> u64 {
        self.shared.mem.len() as u64
    }

    /// A new receiver of [`ServerEvent`]s from now on. A receiver that falls more than
    /// `event_capacity` events behind gets `RecvError::Lagged` and skips ahead.
    pub fn subscribe(&self) -> broadcast::Receiver<ServerEvent> {
        self.shared.events.subscribe()
    }

    /// Clones being served plus handshakes in progress.
    pub fn active(&self) -> usize {
        self.shared.lock().active()
    }

    /// Whether the listener is still open.
    pub fn is_accepting(&self) -> bool {
        self.shared.lock().accepting
    }

    /// Closes the listener and removes the socket file; connected clones keep being served.
    /// Returns once the listener is closed, so later connects fail. Idempotent.
    pub fn stop_accepting(&self) {
        let handle = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            // Wake the accept thread; if the write fails the pipe is full, which also wakes it.
            let _ = nix::unistd::write(&h.stop_tx, &[1]);
            let _ = h.thread.join();
        }
    }

    /// Resolves when no clone is being served and no handshake is pending. Call it after
    /// [`Self::stop_accepting`]; otherwise a new clone may connect right after it resolves.
    pub async fn wait_idle(&self) {
        let mut rx = self.shared.active_tx.subscribe();
        // wait_for only fails if the sender is dropped, and `self` owns it.
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Blocking form of [`Self::wait_idle`]; returns false if `timeout` passed first.
    pub fn wait_idle_blocking(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.shared.lock();
        while st.active() > 0 {
            match deadline {
                None => {
                    st = self
                        .shared
                        .idle_cv
                        .wait(st)
                        .unwrap_or_else(|e| e.into_inner())
                }
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    st = self
                        .shared
                        .idle_cv
                        .wait_timeout(st, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        true
    }

    /// A consistent snapshot of every counter.
    pub fn stats(&self) -> ServerStats {
        let st = self.shared.lock();
        ServerStats {
            socket_path: self.shared.cfg.socket_path.clone(),
            memory_file: self.shared.cfg.memory_file.clone(),
            memory_file_len: self.memory_len(),
            accepting: st.accepting,
            connections_accepted: st.accepted,
            pending_handshakes: st.pending,
            live: st.live.values().map(|c| c.snapshot()).collect(),
            finished: st.finished.iter().cloned().collect(),
            rejected: st.rejected.iter().cloned().collect(),
            rejected_total: st.rejected_total,
            events_unobserved: self.shared.events_unobserved.load(Relaxed),
        }
    }
}

impl Drop for PageServer {
    /// Stops accepting; live clones stay served by their detached threads (see module docs).
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, ev: ServerEvent) {
        if self.events.send(ev).is_err() {
            self.events_unobserved.fetch_add(1, Relaxed);
        }
    }

    /// Publishes a change of the active count to both waiters.
    fn active_changed(&self, st: &State) {
        let n = st.active();
        self.active_tx.send_replace(n);
        if n == 0 {
            self.idle_cv.notify_all();
        }
    }

    fn reject(&self, pid: Option<i32>, reason: HandshakeError) {
        warn!(?pid, %reason, "uffd handshake rejected");
        let mut st = self.lock();
        st.pending -= 1;
        st.rejected_total += 1;
        st.rejected.push_back(RejectedHandshake {
            pid,
            at_unix_ms: unix_ms(SystemTime::now()),
            reason: reason.to_string(),
        });
        while st.rejected.len() > self.cfg.history_limit {
            st.rejected.pop_front();
        }
        self.active_changed(&st);
        drop(st);
        self.emit(ServerEvent::HandshakeRejected { pid, reason });
    }
}

/// Binds the listening socket, replacing a stale socket file but never a live server's.
fn bind_listener(path: &Path) -> Result<UnixListener, ServerError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::SocketInUse {
                    path: path.to_owned(),
                });
            }
            debug!(path = %path.display(), "replacing stale uffd socket");
            std::fs::remove_file(path).map_err(|source| ServerError::Bind {
                path: path.to_owned(),
                source,
            })?;
            UnixListener::bind(path).map_err(|source| ServerError::Bind {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(ServerError::Bind {
            path: path.to_owned(),
            source,
        }),
    }
}

fn accept_loop(
    shared: Arc<Shared>,
    listener: UnixListener,
    listener_ino: Option<u64>,
    stop_rx: OwnedFd,
) {
    if let Err(e) = listener.set_nonblocking(true) {
        warn!(error = %e, "uffd listener: cannot make it non-blocking; accepting anyway");
    }
    'outer: loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop_rx.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                warn!(error = %e, "uffd listener: poll failed; no longer accepting");
                break;
            }
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            break;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => on_accept(&shared, stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on a readable listener.
                    warn!(error = %e, "uffd listener: accept failed");
                    std::thread::sleep(Duration::from_millis(20));
                    continue 'outer;
                }
            }
        }
    }
    shared.lock().accepting = false;
    drop(listener);
    // Remove the socket file only if it is still ours (not replaced by a newer server).
    let path = &shared.cfg.socket_path;
    if listener_ino.is_some() && std::fs::metadata(path).map(|m| m.st_ino()).ok() == listener_ino {
        let _ = std::fs::remove_file(path);
    }
    info!(socket = %path.display(), "uffd page server stopped accepting");
}

fn on_accept(shared: &Arc<Shared>, stream: UnixStream) {
    let accepted_at = SystemTime::now();
    let cred = getsockopt(&stream, PeerCredentials).ok();
    let pid = cred.map(|c| c.pid()).filter(|p| *p > 0);
    let uid = cred.map(|c| c.uid());
    // Open the pidfd right away, before the pid could be reused. Our own pid (an in-process
    // peer, as in tests) is useless to watch, and sockets are enough there.
    let pidfd = pid
        .filter(|p| *p != std::process::id() as i32)
        .and_then(|p| sys::pidfd_open(p).ok());
    let id = shared.next_id.fetch_add(1, Relaxed);
    {
        let mut st = shared.lock();
        st.accepted += 1;
        st.pending += 1;
        shared.active_changed(&st);
        if let (Some((first, last)), Some(uid)) = (shared.cfg.peer_uids, uid) {
            let me = nix::unistd::geteuid().as_raw();
            if uid != 0 && uid != me && !(first..=last).contains(&uid) {
                drop(st);
                shared.reject(pid, HandshakeError::PeerNotAllowed { uid });
                return;
            }
        }
        if st.active() > shared.cfg.max_clones {
            drop(st);
            shared.reject(
                pid,
                HandshakeError::TooManyClones {
                    max: shared.cfg.max_clones,
                },
            );
            return;
        }
    }
    let s = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("uffd-clone-{id}"))
        .stack_size(256 * 1024)
        .spawn(move || connection(s, stream, id, pid, pidfd, accepted_at));
    if let Err(e) = spawned {
        shared.reject(
            pid,
            HandshakeError::Io(Errno::from_raw(e.raw_os_error().unwrap_or(0))),
        );
    }
}

/// Handshake, then serve until the clone is gone.
fn connection(
    shared: Arc<Shared>,
    stream: UnixStream,
    id: u64,
    pid: Option<i32>,
    pidfd: Option<OwnedFd>,
    accepted_at: SystemTime,
) {
    let deadline = Instant::now() + shared.cfg.handshake_timeout;
    let parsed = handshake::receive(&stream, deadline).and_then(|raw| {
        let m = handshake::parse(&raw.bytes, shared.mem.len() as u64, shared.host_page)?;
        Ok((m, raw.fd))
    });
    let (mappings, uffd) = match parsed {
        Ok(v) => v,
        Err(reason) => return shared.reject(pid, reason),
    };
    // Firecracker creates the uffd non-blocking already; make sure, since we poll it.
    if let Err(e) = fcntl(uffd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)) {
        return shared.reject(pid, HandshakeError::Io(e));
    }
    let _ = stream.set_nonblocking(true);

    let first = mappings.regions[0];
    let clone = Arc::new(LiveClone {
        base: CloneStats {
            id,
            pid,
            connected_at_unix_ms: unix_ms(accepted_at),
            disconnected_at_unix_ms: None,
            disconnect_reason: None,
            wire_shape: mappings.shape,
            page_size_source: first.page_size_source,
            regions: mappings.regions.len(),
            guest_bytes: mappings.total_size(),
            pages_copied: 0,
            zero_pages: 0,
            eexist: 0,
            eagain_retries: 0,
            bytes_served: 0,
            remove_events: 0,
            unhandled_faults: 0,
            other_events: 0,
        },
        counters: Counters::default(),
    });
    {
        let mut st = shared.lock();
        st.pending -= 1;
        st.live.insert(id, Arc::clone(&clone));
        shared.active_changed(&st);
    }
    info!(
        id,
        ?pid,
        regions = mappings.regions.len(),
        bytes = mappings.total_size(),
        "uffd clone connected"
    );
    shared.emit(ServerEvent::Connected {
        id,
        pid,
        guest_bytes: mappings.total_size(),
    });

    let mut server = CloneServer::new(
        &uffd,
        &mappings,
        shared.mem.as_ptr() as u64,
        &clone.counters,
        shared.host_page,
    );
    server.fault_around_pages = shared.cfg.fault_around_pages.max(1);
    let reason = server.run(&stream, pidfd.as_ref());
    drop(server);
    // Only now, with the clone gone, may its uffd be closed.
    drop(uffd);
    drop(pidfd);
    drop(stream);

    let mut stats = clone.snapshot();
    stats.disconnected_at_unix_ms = Some(unix_ms(SystemTime::now()));
    stats.disconnect_reason = Some(reason.clone());
    {
        let mut st = shared.lock();
        st.live.remove(&id);
        st.finished.push_back(stats.clone());
        while st.finished.len() > shared.cfg.history_limit {
            st.finished.pop_front();
        }
        shared.active_changed(&st);
    }
    info!(
        id,
        ?pid,
        ?reason,
        pages = stats.pages_copied,
        zero = stats.zero_pages,
        "uffd clone disconnected"
    );
    shared.emit(ServerEvent::Disconnected { id, pid, stats });
}

/// Page ranges a clone has dropped (UFFD_EVENT_REMOVE); faults there get zeros, never file data.
#[derive(Debug, Default)]
struct RangeSet(BTreeMap<u64, u64>);

impl RangeSet {
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with every range that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    fn contains(&self, addr: u64) -> bool {
        self.0
            .range(..=addr)
            .next_back()
            .is_some_and(|(_, &e)| addr < e)
    }
}

enum Resolved {
    Done,
    Again,
    Gone,
}

/// Serves one clone's faults.
struct CloneServer<'a> {
    uffd: &'a OwnedFd,
    mappings: &'a Mappings,
    mem_base: u64,
    counters: &'a Counters,
    host_page: u64,
    removed: RangeSet,
    /// Zero source for hugepage regions (UFFDIO_ZEROPAGE supports base pages only).
    zero_src: Option<MmapMut>,
    events: Vec<UffdEvent>,
    pending: VecDeque<u64>,
    fault_around_pages: u64,
}

impl<'a> CloneServer<'a> {
    fn new(
        uffd: &'a OwnedFd,
        mappings: &'a Mappings,
        mem_base: u64,
        counters: &'a Counters,
        host_page: u64,
    ) -> Self {
        Self {
            uffd,
            mappings,
            mem_base,
            counters,
            host_page,
            removed: RangeSet::default(),
            zero_src: None,
            events: Vec::with_capacity(64),
            pending: VecDeque::new(),
            fault_around_pages: 1,
        }
    }

    fn run(&mut self, sock: &UnixStream, pidfd: Option<&OwnedFd>) -> DisconnectReason {
        let mut watch_sock = true;
        let uffd = self.uffd.as_fd();
        loop {
            // Fixed slots, no allocation on the fault path: [uffd, pidfd?, socket?].
            let pid_slot = pidfd.map(|p| p.as_fd());
            let mut fds = [
                PollFd::new(uffd, PollFlags::POLLIN),
                PollFd::new(pid_slot.unwrap_or(uffd), PollFlags::POLLIN),
                PollFd::new(sock.as_fd(), PollFlags::POLLIN),
            ];
            let (n, sock_idx) = match (pid_slot.is_some(), watch_sock) {
                (true, true) => (3, Some(2)),
                (true, false) => (2, None),
                (false, true) => {
                    fds.swap(1, 2);
                    (2, Some(1))
                }
                (false, false) => (1, None),
            };
            match poll(&mut fds[..n], PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return DisconnectReason::Error(format!("poll: {e}")),
            }
            let is_ready = |i: usize| fds[i].revents().is_some_and(|r| !r.is_empty());
            let ready = [
                is_ready(0),
                pid_slot.is_some() && is_ready(1),
                sock_idx.is_some_and(is_ready),
            ];

            // Faults first: a clone that faults and exits in one round loses nothing.
            if ready[0] {
                if let Err(reason) = self.drain() {
                    return reason;
                }
            }
            if ready[2] && socket_closed(sock) {
                match pidfd {
                    Some(p) if !is_readable(p) => {
                        // Some peer closed the socket but its process lives on: keep serving
                        // until the pidfd says it exited.
                        debug!("uffd clone closed its socket but is alive; watching its pidfd");
                        watch_sock = false;
                    }
                    Some(_) => return DisconnectReason::ProcessExited,
                    None => return DisconnectReason::SocketClosed,
                }
            }
            if ready[1] && pidfd.is_some_and(is_readable) {
                return DisconnectReason::ProcessExited;
            }
        }
    }

    /// Reads all queued events and resolves faults, retrying those that hit EAGAIN after
    /// reading further events (which lets the concurrent remove/unmap finish).
    fn drain(&mut self) -> Result<(), DisconnectReason> {
        const MAX_READ: usize = 256;
        let mut spins = 0u32;
        loop {
            self.events.clear();
            let n = sys::read_events(self.uffd.as_fd(), &mut self.events, MAX_READ)
                .map_err(|e| DisconnectReason::Error(format!("reading uffd events: {e}")))?;
            for i in 0..self.events.len() {
                match self.events[i] {
                    UffdEvent::Pagefault { addr, .. } => self.pending.push_back(addr),
                    UffdEvent::Remove { start, end } => {
                        Counters::add(&self.counters.remove_events, 1);
                        self.removed.insert(start, end);
                    }
                    UffdEvent::Fork { .. }
                    | UffdEvent::Remap { .. }
                    | UffdEvent::Unmap { .. }
                    | UffdEvent::Unknown(_) => Counters::add(&self.counters.other_events, 1),
                }
            }
            let mut blocked = false;
            while let Some(&addr) = self.pending.front() {
                match self.resolve(addr) {
                    Resolved::Done => {
                        self.pending.pop_front();
                    }
                    Resolved::Again => {
                        Counters::add(&self.counters.eagain_retries, 1);
                        blocked = true;
                        break;
                    }
                    Resolved::Gone => return Err(DisconnectReason::AddressSpaceGone),
                }
            }
            if !blocked && n < MAX_READ {
                return Ok(());
            }
            if blocked {
                spins += 1;
                if spins % 1024 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }

    fn resolve(&mut self, addr: u64) -> Resolved {
        let fd = self.uffd.as_fd();
        let Some(region) = self.mappings.find(addr).copied() else {
            // Registered but never described to us: the kernel would hand out zeros without a
            // uffd, so do the same rather than hang the vCPU forever.
            Counters::add(&self.counters.unhandled_faults, 1);
            warn!(
                addr = format_args!("{addr:#x}"),
                "uffd fault outside every handshake region; zero-filling"
            );
            let page = addr & !(self.host_page - 1);
            return match sys::zeropage(fd, page, self.host_page) {
                Err(Errno::EAGAIN) => Resolved::Again,
                Err(Errno::ESRCH) => Resolved::Gone,
                _ => Resolved::Done,
            };
        };
        let ps = region.page_size;
        let page = addr & !(ps - 1);
        let zero = self.removed.contains(page);
        let result = if zero {
            self.zero_fill(&region, page)
        } else {
            let src = self.mem_base + region.offset + (page - region.base_host_virt_addr);
            sys::copy(fd, page, src, ps)
        };
        match result {
            Ok(_) => {
                let c = if zero {
                    &self.counters.zero_pages
                } else {
                    &self.counters.pages_copied
                };
                Counters::add(c, 1);
                Counters::add(&self.counters.bytes_served, ps);
                if !zero {
                    self.fault_around(&region, page);
                }
                Resolved::Done
            }
            Err(Errno::EEXIST) => {
                // Already present (two vCPUs raced on one page). The copy that filled it woke
                // its waiters, but wake again in case this fault's thread was not among them.
                Counters::add(&self.counters.eexist, 1);
                let _ = sys::wake(fd, page, ps);
                Resolved::Done
            }
            Err(Errno::EAGAIN) => Resolved::Again,
            Err(Errno::ESRCH) => Resolved::Gone,
            Err(Errno::ENOENT) => {
                // The mapping vanished under the fault (munmap race): nobody waits on it.
                Counters::add(&self.counters.other_events, 1);
                Resolved::Done
            }
            Err(e) => {
                Counters::add(&self.counters.unhandled_faults, 1);
                warn!(addr = format_args!("{page:#x}"), error = %e, "uffd: cannot resolve fault");
                Resolved::Done
            }
        }
    }

    /// Copy the rest of `page`'s aligned fault-around window ahead of any fault. Best
    /// effort: it stops at removed ranges and on any error, and pages it skips are simply
    /// served when they fault. Nobody waits on these pages, so nobody is woken.
    fn fault_around(&mut self, region: &GuestRegion, page: u64) {
        let ps = region.page_size;
        if self.fault_around_pages <= 1 || ps != self.host_page {
            return;
        }
        // Windows are aligned to the region (guest-physical) start, not to host addresses,
        // which carry no meaning for the guest.
        let window = ps * self.fault_around_pages;
        let base = region.base_host_virt_addr;
        let window_end = base + ((page - base) / window + 1) * window;
        let end = window_end.min(base + region.size);
        let mut cur = page + ps;
        while cur < end {
            // Never fill a range the guest gave back (balloon): it must read as zeros.
            let mut stop = cur;
            while stop < end && !self.removed.contains(stop) {
                stop += ps;
            }
            if stop == cur {
                cur += ps;
                continue;
            }
            let src = self.mem_base + region.offset + (cur - region.base_host_virt_addr);
            match sys::copy_ahead(self.uffd.as_fd(), cur, src, stop - cur) {
                Ok(n) => {
                    self.count_ahead(n);
                    cur += n.max(ps);
                }
                // Stopped at a page that is already present: skip it and go on.
                Err((Errno::EAGAIN, n)) if n > 0 => {
                    self.count_ahead(n);
                    cur += n + ps;
                }
                Err((Errno::EEXIST, _)) => cur += ps,
                // The mapping is changing, or going away: leave the rest to real faults.
                Err(_) => return,
            }
        }
    }

    fn count_ahead(&self, bytes: u64) {
        Counters::add(&self.counters.pages_copied, bytes / self.host_page);
        Counters::add(&self.counters.bytes_served, bytes);
    }

    fn zero_fill(&mut self, region: &GuestRegion, page: u64) -> Result<u64, Errno> {
        let fd = self.uffd.as_fd();
        if region.page_size == self.host_page {
            return sys::zeropage(fd, page, region.page_size);
        }
        if !matches!(&self.zero_src, Some(m) if m.len() as u64 >= region.page_size) {
            // Untouched anonymous memory reads as zeros without allocating.
            self.zero_src = Some(
                MmapMut::map_anon(region.page_size as usize)
                    .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::ENOMEM)))?,
            );
        }
        let src = self.zero_src.as_ref().map_or(0, |m| m.as_ptr() as u64);
        sys::copy(fd, page, src, region.page_size)
    }
}

/// Consumes whatever is readable on the handshake socket; true if the peer has closed it.
fn socket_closed(sock: &UnixStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match recv(sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return true,
            // Firecracker sends nothing after the handshake; discard stray bytes.
            Ok(_) => continue,
            Err(Errno::EAGAIN) => return false,
            Err(Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

fn is_readable(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

#[cfg(test)]
mod tests {
    use super::RangeSet;

    #[test]
    fn range_set_merges_and_contains() {
        let mut r = RangeSet::default();
        r.insert(0x1000, 0x3000);
        r.insert(0x5000, 0x6000);
        assert!(r.contains(0x1000) && r.contains(0x2fff));
        assert!(!r.contains(0x3000) && !r.contains(0x4fff) && !r.contains(0xfff));
        r.insert(0x3000, 0x5000); // touches both neighbours
        assert_eq!(r.0.len(), 1);
        assert!(r.contains(0x4000) && r.contains(0x5fff) && !r.contains(0x6000));
        r.insert(0x800, 0x7000); // swallows everything
        assert_eq!(r.0.into_iter().collect::<Vec<_>>(), vec![(0x800, 0x7000)]);
    }
}
