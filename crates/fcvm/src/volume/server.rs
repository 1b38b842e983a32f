//! The host's file server for `--map` volumes: FUSE messages over Firecracker's hybrid vsock.
//!
//! The guest's agent relays its kernel's FUSE channel (`/dev/fuse`) over a vsock stream to
//! host port [`VolumeSpec::port`]; Firecracker forwards that to the Unix socket
//! `<vsock uds>_<port>`, which this module listens on. FUSE messages carry their own length
//! (`fuse_in_header.len`, `fuse_out_header.len`), so requests and replies travel back to back
//! on the stream without any framing of ours.
//!
//! **Why `fuse-backend-rs`**: the FUSE protocol (every opcode's layout, `FUSE_INIT`
//! negotiation, protocol-minor compatibility) and passthrough semantics (inode table of
//! `O_PATH` descriptors, per-request credentials, xattrs, POSIX/flock locks, readdirplus)
//! are large and subtle; the crate is the one cloud-hypervisor's and Kata's virtio-fs
//! daemons are built on, it serves raw FUSE messages from memory buffers
//! ([`Reader::from_fuse_buffer`], [`FuseDevWriter`] writing to any file descriptor) so a
//! socket can stand in for `/dev/fuse`, and its `PassthroughFs` opens every name one
//! component at a time with `O_NOFOLLOW` relative to its parent's descriptor (a symlink is
//! never followed on the host: the guest kernel resolves it in the guest), reopens only
//! regular files and directories, and maps `..` of the root to the root. Hand-written FUSE
//! code would duplicate all of that with less review behind it.
//!
//! **What this module adds in front of it**, on every request before the file system sees
//! it ([`screen`]):
//! - names (`LOOKUP`, `MKDIR`, `CREATE`, `RENAME`, `LINK`, `SYMLINK`, ...) that are empty,
//!   `.`, `..`, or contain `/` are refused with `EINVAL`: a hostile guest kernel cannot walk
//!   up from any directory, whatever `PassthroughFs` would do with them;
//! - `mknod` of block and character devices is refused (`EPERM`): the container's root
//!   must not leave a device node in a host directory;
//! - on a `:ro` volume every writing request (`SETATTR`, `WRITE`, `CREATE`, `MKNOD`,
//!   `MKDIR`, `UNLINK`, `RMDIR`, `RENAME`/`RENAME2`, `LINK`, `SYMLINK`, `SETXATTR`,
//!   `REMOVEXATTR`, `FALLOCATE`, `COPY_FILE_RANGE`, `TMPFILE`, `IOCTL`, an `OPEN` for
//!   writing or truncation, an `ACCESS` for `W_OK`) gets `EROFS` from the host, whatever
//!   mount flags the guest used.
//!
//! **Lifetime**: [`VolumeServers`] is held by the run that owns the VM (`podman run`'s
//! `attach_and_follow`, which returns only once the VMM has exited); dropping it stops
//! accepting and removes the socket files. Each connection is served by a thread of its own
//! that ends when the VMM closes the stream (the VM ended). When fcvm itself is killed the
//! threads die with it, and the socket files live in the VM's runtime directory, which the
//! next command's reaping removes with the rest of the VM.
//!
//! **Channels**: the agent opens several connections per volume (one per clone of its FUSE
//! device); each is served by its own thread on the one shared [`Volume`], so a slow
//! request on one channel never holds up the others.
//!
//! **Limits** (this first slice): locks are `PassthroughFs`'s (POSIX locks are not forwarded to the host: the
//! guest kernel enforces them among the guest's processes); no reconnection after a snapshot
//! restore yet.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{Config, PassthroughFs};
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader, Writer};

use super::VolumeSpec;
use crate::vsock::{HostListener, VsockError};

/// Environment variable: `1` turns the guest's writeback cache off (the original's name).
pub const NO_WRITEBACK_CACHE_ENV: &str = "FCVM_NO_WRITEBACK_CACHE";

/// Size of `fuse_in_header`.
const IN_HEADER: usize = 40;
/// Size of `fuse_out_header`.
const OUT_HEADER: usize = 16;
/// Largest request accepted: 1 MiB of data (the `max_write` the server negotiates with
/// `max_pages` 256) plus room for the header and arguments.
pub const MAX_MESSAGE: usize = (1 << 20) + 4096;

/// FUSE opcodes this module looks at (`linux/fuse.h`).
mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const SETATTR: u32 = 4;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const WRITE: u32 = 16;
    pub const SETXATTR: u32 = 21;
    pub const REMOVEXATTR: u32 = 24;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const IOCTL: u32 = 39;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const RENAME2: u32 = 45;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const TMPFILE: u32 = 51;
}

/// Why a volume cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The passthrough file system cannot open the host directory.
    #[error("cannot serve host directory {dir}")]
    Fs {
        /// The directory.
        dir: std::path::PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The vsock listener cannot be bound.
    #[error(transparent)]
    Listen(#[from] VsockError),
}

/// Options of every volume of a run.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Let the guest kernel cache writes (FUSE writeback cache).
    pub writeback: bool,
}

impl ServeOptions {
    /// From this process's environment ([`NO_WRITEBACK_CACHE_ENV`]).
    pub fn from_env() -> ServeOptions {
        ServeOptions {
            writeback: std::env::var_os(NO_WRITEBACK_CACHE_ENV).is_none_or(|v| v != "1"),
        }
    }
}

/// One volume's file system, shared by its connections (a channel reconnecting finds its
/// inodes again).
pub struct Volume {
    server: Server<Arc<PassthroughFs>>,
    read_only: bool,
}

impl Volume {
    /// A passthrough file system rooted at `dir`.
    pub fn new(dir: &Path, read_only: bool, opts: ServeOptions) -> Result<Volume, ServeError> {
        let fs_err = |source| ServeError::Fs {
            dir: dir.to_owned(),
            source,
        };
        let cfg = Config {
            root_dir: dir.display().to_string(),
            xattr: true,
            writeback: opts.writeback && !read_only,
            do_import: true,
            ..Config::default()
        };
        let fs = PassthroughFs::<()>::new(cfg).map_err(fs_err)?;
        fs.import().map_err(fs_err)?;
        Ok(Volume {
            server: Server::new(Arc::new(fs)),
            read_only,
        })
    }

    /// Serve FUSE requests from `conn` until the peer closes it (`Ok`) or it breaks.
    pub fn serve(&self, mut conn: UnixStream) -> io::Result<()> {
        let mut request = vec![0u8; MAX_MESSAGE];
        let mut reply = vec![0u8; MAX_MESSAGE];
        loop {
            if !read_full_or_eof(&mut conn, &mut request[..IN_HEADER])? {
                return Ok(());
            }
            let len = u32::from_le_bytes(request[0..4].try_into().expect("4 bytes")) as usize;
            if !(IN_HEADER..=MAX_MESSAGE).contains(&len) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("FUSE request of {len} bytes"),
                ));
            }
            conn.read_exact(&mut request[IN_HEADER..len])?;
            let msg = &request[..len];
            match screen(msg, self.read_only) {
                Verdict::Pass => {
                    let r = Reader::<()>::from_fuse_buffer(FuseBuf::new(&mut request[..len]))
                        .map_err(to_io)?;
                    let w =
                        FuseDevWriter::<()>::new(conn.as_raw_fd(), &mut reply).map_err(to_io)?;
                    if let Err(e) = self
                        .server
                        .handle_message(r, Writer::FuseDev(w), None, None)
                    {
                        use fuse_backend_rs::Error as E;
                        match e {
                            // The reply could not be sent: the stream is gone.
                            E::EncodeMessage(e) => return Err(e),
                            // Replied with an error already, or nothing to reply to.
                            e => tracing::debug!("volume request: {e}"),
                        }
                    }
                }
                Verdict::Refuse(errno) => {
                    send_error(&mut conn, unique(msg), errno)?;
                }
                Verdict::Drop => {}
            }
        }
    }
}

fn to_io(e: fuse_backend_rs::transport::Error) -> io::Error {
    io::Error::other(e.to_string())
}

/// Fill `buf`; `false` when the stream ended before its first byte.
fn read_full_or_eof(conn: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match conn.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn unique(msg: &[u8]) -> u64 {
    u64::from_le_bytes(msg[8..16].try_into().expect("8 bytes"))
}

fn send_error(conn: &mut impl io::Write, unique: u64, errno: i32) -> io::Result<()> {
    let mut out = [0u8; OUT_HEADER];
    out[0..4].copy_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    out[4..8].copy_from_slice(&(-errno).to_le_bytes());
    out[8..16].copy_from_slice(&unique.to_le_bytes());
    conn.write_all(&out)
}

/// What to do with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the file system.
    Pass,
    /// Answer with this errno.
    Refuse(i32),
    /// Neither (a malformed request that expects no reply).
    Drop,
}

/// The checks in front of the file system (see the module documentation). `msg` is one
/// whole request, header included.
pub fn screen(msg: &[u8], read_only: bool) -> Verdict {
    let opcode = u32::from_le_bytes(msg[4..8].try_into().expect("4 bytes"));
    let args = &msg[IN_HEADER..];
    let no_reply = matches!(
        opcode,
        op::FORGET | op::BATCH_FORGET | op::INTERRUPT | op::NOTIFY_REPLY
    );
    let refuse = |errno| {
        if no_reply {
            Verdict::Drop
        } else {
            Verdict::Refuse(errno)
        }
    };
    // Fixed argument size before the names, and how many names follow.
    let names = match opcode {
        op::LOOKUP | op::UNLINK | op::RMDIR => Some((0, 1)),
        // name, then the link's target (any text: the guest resolves it).
        op::SYMLINK => Some((0, 1)),
        op::MKNOD => Some((16, 1)),
        op::MKDIR => Some((8, 1)),
        op::RENAME => Some((8, 2)),
        op::LINK => Some((8, 1)),
        op::CREATE => Some((16, 1)),
        op::RENAME2 => Some((16, 2)),
        _ => None,
    };
    if let Some((fixed, count)) = names {
        let Some(mut rest) = args.get(fixed..) else {
            return refuse(libc::EINVAL);
        };
        for _ in 0..count {
            let Some(end) = rest.iter().position(|&b| b == 0) else {
                return refuse(libc::EINVAL);
            };
            if !safe_name(&rest[..end]) {
                return refuse(libc::EINVAL);
            }
            rest = &rest[end + 1..];
        }
    }
    if opcode == op::MKNOD {
        let mode = u32_at(args, 0).unwrap_or(0);
        if matches!(mode & libc::S_IFMT, libc::S_IFBLK | libc::S_IFCHR) {
            return refuse(libc::EPERM);
        }
    }
    if read_only {
        let writes = match opcode {
            op::SETATTR
            | op::SYMLINK
            | op::MKNOD
            | op::MKDIR
            | op::UNLINK
            | op::RMDIR
            | op::RENAME
            | op::LINK
            | op::WRITE
            | op::SETXATTR
            | op::REMOVEXATTR
            | op::CREATE
            | op::IOCTL
            | op::FALLOCATE
            | op::RENAME2
            | op::COPY_FILE_RANGE
            | op::TMPFILE => true,
            op::OPEN => {
                let flags = u32_at(args, 0).unwrap_or(u32::MAX) as i32;
                flags & libc::O_ACCMODE != libc::O_RDONLY
                    || flags & (libc::O_TRUNC | libc::O_CREAT) != 0
            }
            op::ACCESS => u32_at(args, 0).unwrap_or(u32::MAX) as i32 & libc::W_OK != 0,
            _ => false,
        };
        if writes {
            return refuse(libc::EROFS);
        }
    }
    Verdict::Pass
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// One path component, never a way up or across.
fn safe_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/')
}

/// Every volume of one VM, served while this value lives.
pub struct VolumeServers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl VolumeServers {
    /// Bind `<uds>_<port>` for each volume and serve it. Call before the VM starts (the
    /// guest dials as soon as its agent reaches the container step).
    pub fn start(
        uds: &Path,
        volumes: &[VolumeSpec],
        opts: ServeOptions,
    ) -> Result<VolumeServers, ServeError> {
        // Built as it goes: a volume that cannot be served stops the ones already started.
        let mut servers = VolumeServers { tasks: Vec::new() };
        for v in volumes {
            let volume = Arc::new(Volume::new(&v.host_dir, v.read_only, opts)?);
            let listener = HostListener::bind(uds, v.port)?;
            let port = v.port;
            servers.tasks.push(tokio::spawn(async move {
                // The listener (and its socket file) lives as long as this task.
                while let Ok(conn) = listener.accept().await {
                    let volume = volume.clone();
                    let conn = match conn.into_std().and_then(|c| {
                        c.set_nonblocking(false)?;
                        Ok(c)
                    }) {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!("volume port {port}: {e}");
                            continue;
                        }
                    };
                    let spawned = std::thread::Builder::new()
                        .name(format!("volume-{port}"))
                        .spawn(move || {
                            if let Err(e) = volume.serve(conn) {
                                tracing::debug!("volume port {port}: channel ended: {e}");
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!("volume port {port}: cannot start a thread: {e}");
                    }
                }
            }));
        }
        Ok(servers)
    }
}

impl Drop for VolumeServers {
    fn drop(&mut self) {
        // Aborting drops each task's listener, which removes its socket file. Threads still
        // serving a connection end when the VMM closes it.
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    //! A minimal FUSE client speaking to [`Volume::serve`] over a socket pair, as the guest
    //! kernel would through the agent's relay.
    use std::io::Write;

    use super::*;

    const ROOT: u64 = 1;
    const INIT: u32 = 26;
    const GETATTR: u32 = 3;

    struct Client {
        conn: UnixStream,
        unique: u64,
    }

    /// A reply: errno (positive, 0 for success) and payload.
    type Reply = (i32, Vec<u8>);

    impl Client {
        fn start(dir: &Path, read_only: bool) -> Client {
            let volume = Volume::new(dir, read_only, ServeOptions { writeback: false }).unwrap();
            let mut c = Client::channel(&Arc::new(volume));
            c.init();
            c
        }

        /// Another connection to `volume`, as each of the agent's channels is.
        fn channel(volume: &Arc<Volume>) -> Client {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let volume = volume.clone();
            std::thread::spawn(move || volume.serve(theirs));
            Client {
                conn: ours,
                unique: 0,
            }
        }

        fn init(&mut self) {
            let c = self;
            let mut init = Vec::new();
            for v in [7u32, 31, 1 << 17, 0] {
                init.extend_from_slice(&v.to_le_bytes());
            }
            let (err, _) = c.call(INIT, 0, &init);
            assert_eq!(err, 0, "FUSE_INIT");
        }

        fn call(&mut self, opcode: u32, nodeid: u64, args: &[u8]) -> Reply {
            self.unique += 2;
            let mut m = Vec::new();
            m.extend_from_slice(&((IN_HEADER + args.len()) as u32).to_le_bytes());
            m.extend_from_slice(&opcode.to_le_bytes());
            m.extend_from_slice(&self.unique.to_le_bytes());
            m.extend_from_slice(&nodeid.to_le_bytes());
            m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding: root
            m.extend_from_slice(args);
            self.conn.write_all(&m).unwrap();
            let mut h = [0u8; OUT_HEADER];
            self.conn.read_exact(&mut h).unwrap();
            let len = u32::from_le_bytes(h[0..4].try_into().unwrap()) as usize;
            let err = -i32::from_le_bytes(h[4..8].try_into().unwrap());
            assert_eq!(
                u64::from_le_bytes(h[8..16].try_into().unwrap()),
                self.unique
            );
            let mut body = vec![0u8; len - OUT_HEADER];
            self.conn.read_exact(&mut body).unwrap();
            (err, body)
        }

        fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<(u64, u32), i32> {
            let (err, body) = self.call(op::LOOKUP, parent, &cstr(name));
            if err != 0 {
                return Err(err);
            }
            let nodeid = u64::from_le_bytes(body[0..8].try_into().unwrap());
            // fuse_entry_out: 40 bytes, then fuse_attr whose mode is at 60.
            Ok((nodeid, u32_at(&body, 100).unwrap()))
        }

        fn mkdir(&mut self, parent: u64, name: &[u8]) -> i32 {
            let mut a = Vec::new();
            a.extend_from_slice(&0o755u32.to_le_bytes());
            a.extend_from_slice(&0u32.to_le_bytes());
            a.extend_from_slice(&cstr(name));
            self.call(op::MKDIR, parent, &a).0
        }

        fn open(&mut self, nodeid: u64, flags: i32) -> i32 {
            let mut a = Vec::new();
            a.extend_from_slice(&(flags as u32).to_le_bytes());
            a.extend_from_slice(&0u32.to_le_bytes());
            self.call(op::OPEN, nodeid, &a).0
        }
    }

    fn cstr(name: &[u8]) -> Vec<u8> {
        let mut v = name.to_vec();
        v.push(0);
        v
    }

    /// `root/` with `a` ("hello"), `sub/`, and `link -> /`; `outside/secret` beside it.
    fn tree() -> (tempfile::TempDir, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a"), b"hello").unwrap();
        std::os::unix::fs::symlink("/", root.join("link")).unwrap();
        std::fs::create_dir(t.path().join("outside")).unwrap();
        std::fs::write(t.path().join("outside/secret"), b"s").unwrap();
        (t, root)
    }

    #[test]
    fn names_that_walk_up_or_across_are_refused() {
        let (_t, root) = tree();
        let mut c = Client::start(&root, false);
        let (sub, mode) = c.lookup(ROOT, b"sub").unwrap();
        assert_eq!(mode & libc::S_IFMT, libc::S_IFDIR);
        for bad in [&b".."[..], b".", b"", b"../outside", b"sub/..", b"/etc"] {
            assert_eq!(c.lookup(ROOT, bad), Err(libc::EINVAL), "{bad:?}");
            assert_eq!(c.lookup(sub, bad), Err(libc::EINVAL), "{bad:?}");
        }
        assert_eq!(c.mkdir(sub, b"../../escaped"), libc::EINVAL);
        assert!(!root.parent().unwrap().join("escaped").exists());
        assert_eq!(c.lookup(ROOT, b"outside"), Err(libc::ENOENT));
        // A node id the server never handed out.
        assert_ne!(c.call(GETATTR, 999_999, &[0u8; 16]).0, 0);
    }

    #[test]
    fn symlinks_are_not_followed_on_the_host() {
        let (_t, root) = tree();
        let mut c = Client::start(&root, false);
        let (link, mode) = c.lookup(ROOT, b"link").unwrap();
        assert_eq!(mode & libc::S_IFMT, libc::S_IFLNK, "the link itself");
        // Opening the link's node would open "/" on the host if it were followed.
        assert_ne!(c.open(link, libc::O_RDONLY | libc::O_DIRECTORY), 0);
        assert_ne!(c.open(link, libc::O_RDONLY), 0);
        assert_eq!(c.lookup(link, b"etc"), Err(libc::ENOTDIR));
    }

    #[test]
    fn a_stalled_channel_does_not_hold_up_another() {
        let (_t, root) = tree();
        let volume =
            Arc::new(Volume::new(&root, false, ServeOptions { writeback: false }).unwrap());
        let mut first = Client::channel(&volume);
        first.init();
        // Half a request: that channel's thread waits for the rest.
        first.conn.write_all(&[200, 0, 0, 0, 1, 0]).unwrap();
        let mut second = Client::channel(&volume);
        let (sub, _) = second.lookup(ROOT, b"sub").unwrap();
        assert!(sub > ROOT);
        // The stream ending mid-request ends that channel only.
        drop(first);
        assert_eq!(second.mkdir(sub, b"more"), 0);
        assert!(root.join("sub/more").is_dir());
    }

    #[test]
    fn device_nodes_are_refused() {
        let (_t, root) = tree();
        let mut c = Client::start(&root, false);
        let mut a = Vec::new();
        for v in [libc::S_IFBLK | 0o600, 0x0800, 0, 0] {
            a.extend_from_slice(&v.to_le_bytes());
        }
        a.extend_from_slice(&cstr(b"sda"));
        assert_eq!(c.call(op::MKNOD, ROOT, &a).0, libc::EPERM);
        assert!(!root.join("sda").exists());
    }

    #[test]
    fn read_only_refuses_writes_on_the_host() {
        let (_t, root) = tree();
        let mut c = Client::start(&root, true);
        let (a, _) = c.lookup(ROOT, b"a").unwrap();
        assert_eq!(c.mkdir(ROOT, b"new"), libc::EROFS);
        assert_eq!(c.open(a, libc::O_WRONLY), libc::EROFS);
        assert_eq!(c.open(a, libc::O_RDWR), libc::EROFS);
        assert_eq!(c.open(a, libc::O_RDONLY | libc::O_TRUNC), libc::EROFS);
        assert_eq!(c.open(a, libc::O_RDONLY), 0);
        let mut create = vec![0u8; 16];
        create[0..4].copy_from_slice(&((libc::O_WRONLY | libc::O_CREAT) as u32).to_le_bytes());
        create[4..8].copy_from_slice(&0o644u32.to_le_bytes());
        create.extend_from_slice(&cstr(b"created"));
        assert_eq!(c.call(op::CREATE, ROOT, &create).0, libc::EROFS);
        assert_eq!(c.call(op::UNLINK, ROOT, &cstr(b"a")).0, libc::EROFS);
        let mut rename = ROOT.to_le_bytes().to_vec();
        rename.extend_from_slice(&cstr(b"a"));
        rename.extend_from_slice(&cstr(b"b"));
        assert_eq!(c.call(op::RENAME, ROOT, &rename).0, libc::EROFS);
        assert_eq!(c.call(op::SETATTR, a, &[0u8; 88]).0, libc::EROFS);
        let mut write = vec![0u8; 40];
        write[16..20].copy_from_slice(&3u32.to_le_bytes());
        write.extend_from_slice(b"bad");
        assert_eq!(c.call(op::WRITE, a, &write).0, libc::EROFS);
        assert_eq!(std::fs::read(root.join("a")).unwrap(), b"hello");
        assert!(!root.join("new").exists() && !root.join("created").exists());
    }

    #[test]
    fn writable_volume_creates_on_the_host() {
        let (_t, root) = tree();
        let mut c = Client::start(&root, false);
        assert_eq!(c.mkdir(ROOT, b"new"), 0);
        assert!(root.join("new").is_dir());
        let (new, _) = c.lookup(ROOT, b"new").unwrap();
        assert_eq!(c.mkdir(new, b"deeper"), 0);
        assert!(root.join("new/deeper").is_dir());
    }

    #[test]
    fn screen_without_names_or_with_short_arguments() {
        let msg = |opcode: u32, args: &[u8]| {
            let mut m = vec![0u8; IN_HEADER];
            m[4..8].copy_from_slice(&opcode.to_le_bytes());
            m.extend_from_slice(args);
            m
        };
        assert_eq!(
            screen(&msg(op::LOOKUP, b"ok"), false),
            Verdict::Refuse(libc::EINVAL)
        );
        assert_eq!(screen(&msg(op::LOOKUP, b"ok\0"), false), Verdict::Pass);
        assert_eq!(
            screen(&msg(op::MKDIR, b"x"), false),
            Verdict::Refuse(libc::EINVAL)
        );
        assert_eq!(screen(&msg(op::FORGET, &[0; 8]), true), Verdict::Pass);
        assert_eq!(screen(&msg(GETATTR, &[0; 16]), true), Verdict::Pass);
        assert_eq!(
            screen(&msg(op::WRITE, &[0; 40]), true),
            Verdict::Refuse(libc::EROFS)
        );
        assert_eq!(screen(&msg(op::WRITE, &[0; 40]), false), Verdict::Pass);
    }
}
