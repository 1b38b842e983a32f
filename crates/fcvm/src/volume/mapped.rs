//! The node ids and file handles the guest kernel holds, kept apart from `PassthroughFs`'s
//! own, so that a snapshot can carry them to a clone.
//!
//! A guest kernel that was snapshotted keeps using the FUSE node ids and file handles it
//! was given before the snapshot; a clone's file server is a new process that never gave
//! them. `PassthroughFs` cannot be told to answer ids it did not allocate: its inode and
//! handle tables are private and it numbers entries itself (from 2, in lookup order). So
//! this layer sits between the FUSE [`Server`](fuse_backend_rs::api::server::Server) and
//! `PassthroughFs` and numbers everything the guest sees itself:
//!
//! - every `Entry` going to the guest gets a guest node id of ours, mapped to
//!   `PassthroughFs`'s inode (the same host file keeps one guest id while the guest knows
//!   it); every handle gets a guest handle of ours, mapped to `PassthroughFs`'s handle;
//! - the guest's lookup count of each node is kept here, and `PassthroughFs` is told to
//!   forget its own count of that inode when the guest's reaches zero (the two differ in a
//!   clone, where one preloading lookup stands for the guest's count);
//! - [`MappedFs::dump`] (the VM is paused) writes down each node's path under the root (as
//!   the host sees it now, from the node's `O_PATH` descriptor) and each handle's node and
//!   open flags; [`MappedFs::preload`] in the clone's server looks each path up again, one
//!   component at a time below the root exactly as a guest lookup would (`O_NOFOLLOW`,
//!   names screened as [`super::server::screen`] screens them), reopens the handles, and
//!   maps the guest's old ids to the results. A node whose path is gone (deleted, moved out
//!   of the root, or now another kind of file) and the handles on it answer `ESTALE`.
//!
//! The root is node 1 in both numberings and is never forgotten.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::SetattrValid;
use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, FsOptions, OpenOptions};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;

use super::state::{HandleState, NodeState, VolumeState};

/// FUSE's root node id.
const ROOT: u64 = 1;

/// One node the guest knows.
#[derive(Debug, Clone, Copy)]
struct Node {
    /// `PassthroughFs`'s inode; `None` when a clone could not find the node's path again.
    inner: Option<u64>,
    /// The guest kernel's lookup count (how many `Entry`s it was sent, less its forgets).
    refs: u64,
    /// `PassthroughFs`'s lookup count of `inner` that this node holds.
    inner_refs: u64,
}

/// One handle the guest holds.
#[derive(Debug, Clone, Copy)]
struct Handle {
    /// `PassthroughFs`'s handle; `None` when a clone could not reopen it.
    inner: Option<u64>,
    /// The guest node it was opened on.
    node: u64,
    /// The open flags the guest sent (without creation flags).
    flags: u32,
    /// Opened with `OPENDIR`.
    dir: bool,
}

#[derive(Default)]
struct Tables {
    nodes: HashMap<u64, Node>,
    /// `PassthroughFs` inode -> guest node id.
    by_inner: HashMap<u64, u64>,
    handles: HashMap<u64, Handle>,
}

/// What [`MappedFs::preload`] could not bring back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PreloadReport {
    /// Nodes found again.
    pub nodes: usize,
    /// Nodes whose path is gone (they answer ESTALE).
    pub stale_nodes: usize,
    /// Handles reopened.
    pub handles: usize,
    /// Handles that could not be reopened (they answer ESTALE).
    pub stale_handles: usize,
}

/// `PassthroughFs` behind guest ids of this layer's own (see the module documentation).
pub struct MappedFs {
    inner: PassthroughFs<()>,
    /// The root directory, canonical (as the host names the nodes' descriptors).
    root: PathBuf,
    tables: RwLock<Tables>,
    next_node: AtomicU64,
    next_handle: AtomicU64,
}

fn estale() -> io::Error {
    io::Error::from_raw_os_error(libc::ESTALE)
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

/// Creation flags, which must not be replayed when a handle is reopened.
const CREATION_FLAGS: u32 = (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32;

impl MappedFs {
    /// Wrap `inner`, rooted at `root` (canonical).
    pub fn new(inner: PassthroughFs<()>, root: &Path) -> MappedFs {
        MappedFs {
            inner,
            root: root.to_owned(),
            tables: RwLock::new(Tables::default()),
            next_node: AtomicU64::new(ROOT + 1),
            next_handle: AtomicU64::new(1),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|p| p.into_inner())
    }

    /// `PassthroughFs`'s inode for guest node `g`.
    fn ino(&self, g: u64) -> io::Result<u64> {
        if g == ROOT {
            return Ok(ROOT);
        }
        match self.read().nodes.get(&g) {
            Some(n) => n.inner.ok_or_else(estale),
            None => Err(ebadf()),
        }
    }

    /// `PassthroughFs`'s handle for guest handle `fh`, which must be on node `g`.
    fn fh(&self, g: u64, fh: u64) -> io::Result<u64> {
        match self.read().handles.get(&fh) {
            Some(h) if h.node == g => h.inner.ok_or_else(estale),
            _ => Err(ebadf()),
        }
    }

    fn fh_opt(&self, g: u64, fh: Option<u64>) -> io::Result<Option<u64>> {
        fh.map(|fh| self.fh(g, fh)).transpose()
    }

    /// The guest's view of an `Entry` `PassthroughFs` returned (one more lookup of it).
    fn entry(&self, mut e: Entry) -> Entry {
        if e.inode == 0 || e.inode == ROOT {
            return e;
        }
        let mut t = self.write();
        let g = match t.by_inner.get(&e.inode).copied() {
            Some(g) => {
                let n = t.nodes.get_mut(&g).expect("by_inner names known nodes");
                n.refs += 1;
                n.inner_refs += 1;
                g
            }
            None => {
                let g = self.next_node.fetch_add(1, Ordering::Relaxed);
                t.nodes.insert(
                    g,
                    Node {
                        inner: Some(e.inode),
                        refs: 1,
                        inner_refs: 1,
                    },
                );
                t.by_inner.insert(e.inode, g);
                g
            }
        };
        e.inode = g;
        e
    }

    /// Undo one [`MappedFs::entry`] whose `Entry` never reached the guest and whose inner
    /// lookup `PassthroughFs` took back itself (a full `READDIRPLUS` buffer).
    fn unentry(&self, g: u64) {
        if g == 0 || g == ROOT {
            return;
        }
        let mut t = self.write();
        let Some(n) = t.nodes.get_mut(&g) else { return };
        n.refs = n.refs.saturating_sub(1);
        n.inner_refs = n.inner_refs.saturating_sub(1);
        if n.refs == 0 {
            let n = t.nodes.remove(&g).expect("just seen");
            Self::unmap(&mut t, g, n);
            if let (Some(i), true) = (n.inner, n.inner_refs > 0) {
                self.inner.forget(&Context::new(), i, n.inner_refs);
            }
        }
    }

    fn unmap(t: &mut Tables, g: u64, n: Node) {
        if let Some(i) = n.inner {
            if t.by_inner.get(&i) == Some(&g) {
                t.by_inner.remove(&i);
            }
        }
    }

    fn forget_locked(&self, t: &mut Tables, g: u64, count: u64) {
        if g == ROOT {
            return;
        }
        let Some(n) = t.nodes.get_mut(&g) else { return };
        n.refs = n.refs.saturating_sub(count);
        if n.refs > 0 {
            return;
        }
        let n = t.nodes.remove(&g).expect("just seen");
        Self::unmap(t, g, n);
        if let Some(i) = n.inner {
            // PassthroughFs takes its own lock; it never calls back into this layer.
            self.inner.forget(&Context::new(), i, n.inner_refs);
        }
    }

    fn new_handle(&self, g: u64, inner: Option<u64>, flags: u32, dir: bool) -> Option<u64> {
        let inner = inner?;
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.write().handles.insert(
            fh,
            Handle {
                inner: Some(inner),
                node: g,
                flags: flags & !CREATION_FLAGS,
                dir,
            },
        );
        Some(fh)
    }

    /// Remove guest handle `fh` of node `g`; the inner handle to release, if it has one.
    fn take_handle(&self, g: u64, fh: u64) -> io::Result<Option<u64>> {
        let mut t = self.write();
        match t.handles.get(&fh) {
            Some(h) if h.node == g => Ok(t.handles.remove(&fh).and_then(|h| h.inner)),
            _ => Err(ebadf()),
        }
    }

    /// What a clone needs to answer the guest's ids: each node's path under the root and
    /// each handle. Call with the VM paused (no new requests); requests being served meanwhile
    /// are either in the tables or will be sent again by the guest's agent.
    pub fn dump(&self, state: &mut VolumeState) {
        let t = self.read();
        let ctx = Context::new();
        let mut nodes: Vec<NodeState> = t
            .nodes
            .iter()
            .map(|(&g, n)| {
                let (path, kind) = match n.inner {
                    Some(i) => self.path_of(&ctx, i),
                    None => (None, 0),
                };
                NodeState {
                    id: g,
                    path: path.map(|p| super::state::encode_path(&p)),
                    kind,
                    refs: n.refs,
                }
            })
            .collect();
        nodes.sort_by_key(|n| n.id);
        let mut handles: Vec<HandleState> = t
            .handles
            .iter()
            .map(|(&fh, h)| HandleState {
                fh,
                node: h.node,
                flags: h.flags,
                dir: h.dir,
            })
            .collect();
        handles.sort_by_key(|h| h.fh);
        state.nodes = nodes;
        state.handles = handles;
        state.next_node = self.next_node.load(Ordering::Relaxed);
        state.next_handle = self.next_handle.load(Ordering::Relaxed);
    }

    /// Inode `i`'s path relative to the root and its file type; no path when it was
    /// deleted or is no longer below the root.
    fn path_of(&self, ctx: &Context, i: u64) -> (Option<PathBuf>, u32) {
        let kind = match self.inner.getattr(ctx, i, None) {
            Ok((st, _)) if st.st_nlink > 0 => st.st_mode & libc::S_IFMT,
            _ => return (None, 0),
        };
        let Ok(host) = self.inner.readlinkat_proc_file(i) else {
            return (None, kind);
        };
        match host.strip_prefix(&self.root) {
            Ok(rel) if !rel.as_os_str().is_empty() => (Some(rel.to_owned()), kind),
            _ => (None, kind),
        }
    }

    /// Answer the guest ids of `state` (a snapshot's dump) from this file system: see the
    /// module documentation. Call on a fresh one, after its `FUSE_INIT`, before serving.
    pub fn preload(&self, state: &VolumeState) -> PreloadReport {
        let ctx = Context::new();
        let mut report = PreloadReport::default();
        // Inner lookups of the directories on the way, given back at the end.
        let mut on_the_way: Vec<u64> = Vec::new();
        let mut t = self.write();
        for n in &state.nodes {
            if n.id <= ROOT {
                continue;
            }
            let found = n
                .path
                .as_deref()
                .and_then(super::state::decode_path)
                .and_then(|p| self.resolve(&ctx, &p, n.kind, &mut on_the_way));
            match found {
                Some(_) => report.nodes += 1,
                None => report.stale_nodes += 1,
            }
            let _ = found.map(|i| t.by_inner.entry(i).or_insert(n.id));
            t.nodes.insert(
                n.id,
                Node {
                    inner: found,
                    refs: n.refs.max(1),
                    inner_refs: u64::from(found.is_some()),
                },
            );
        }
        for h in &state.handles {
            let inner = t.nodes.get(&h.node).and_then(|n| n.inner);
            let reopened = inner.and_then(|i| {
                let r = if h.dir {
                    self.inner.opendir(&ctx, i, h.flags).map(|(fh, _)| fh)
                } else {
                    self.inner
                        .open(&ctx, i, h.flags & !CREATION_FLAGS, 0)
                        .map(|(fh, _, _)| fh)
                };
                r.ok().flatten()
            });
            if reopened.is_some() {
                report.handles += 1;
            } else {
                report.stale_handles += 1;
            }
            t.handles.insert(
                h.fh,
                Handle {
                    inner: reopened,
                    node: h.node,
                    flags: h.flags,
                    dir: h.dir,
                },
            );
        }
        drop(t);
        for i in on_the_way {
            self.inner.forget(&ctx, i, 1);
        }
        self.next_node
            .fetch_max(state.next_node.max(ROOT + 1), Ordering::Relaxed);
        self.next_handle
            .fetch_max(state.next_handle.max(1), Ordering::Relaxed);
        report
    }

    /// Look `rel` up below the root one component at a time; its inode when it is there
    /// and of file type `kind`. The lookups of the directories on the way go to `on_the_way`.
    fn resolve(
        &self,
        ctx: &Context,
        rel: &Path,
        kind: u32,
        on_the_way: &mut Vec<u64>,
    ) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let parts: Vec<&[u8]> = rel
            .as_os_str()
            .as_bytes()
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        let (last, dirs) = parts.split_last()?;
        let mut cur = ROOT;
        for c in dirs {
            let e = self.lookup_one(ctx, cur, c)?;
            on_the_way.push(e.inode);
            cur = e.inode;
        }
        let e = self.lookup_one(ctx, cur, last)?;
        if e.attr.st_mode & libc::S_IFMT != kind {
            self.inner.forget(ctx, e.inode, 1);
            return None;
        }
        Some(e.inode)
    }

    fn lookup_one(&self, ctx: &Context, parent: u64, name: &[u8]) -> Option<Entry> {
        if !super::server::safe_name(name) {
            return None;
        }
        let name = CString::new(name).ok()?;
        let e = self.inner.lookup(ctx, parent, &name).ok()?;
        (e.inode != 0).then_some(e)
    }
}

impl FileSystem for MappedFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        let mut t = self.write();
        *t = Tables::default();
        self.inner.destroy();
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let e = self.inner.lookup(ctx, self.ino(parent)?, name)?;
        Ok(self.entry(e))
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        let mut t = self.write();
        self.forget_locked(&mut t, inode, count);
    }

    fn batch_forget(&self, _ctx: &Context, requests: Vec<(u64, u64)>) {
        let mut t = self.write();
        for (inode, count) in requests {
            self.forget_locked(&mut t, inode, count);
        }
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let fh = self.fh_opt(inode, handle)?;
        self.inner.getattr(ctx, self.ino(inode)?, fh)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        let fh = self.fh_opt(inode, handle)?;
        self.inner.setattr(ctx, self.ino(inode)?, attr, fh, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, self.ino(inode)?)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        let e = self.inner.symlink(ctx, linkname, self.ino(parent)?, name)?;
        Ok(self.entry(e))
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let e = self
            .inner
            .mknod(ctx, self.ino(inode)?, name, mode, rdev, umask)?;
        Ok(self.entry(e))
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        let e = self
            .inner
            .mkdir(ctx, self.ino(parent)?, name, mode, umask)?;
        Ok(self.entry(e))
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, self.ino(parent)?, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, self.ino(parent)?, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.rename(
            ctx,
            self.ino(olddir)?,
            oldname,
            self.ino(newdir)?,
            newname,
            flags,
        )
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        let e = self
            .inner
            .link(ctx, self.ino(inode)?, self.ino(newparent)?, newname)?;
        Ok(self.entry(e))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let (fh, opts, passthrough) = self.inner.open(ctx, self.ino(inode)?, flags, fuse_flags)?;
        Ok((self.new_handle(inode, fh, flags, false), opts, passthrough))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let flags = args.flags;
        let (e, fh, opts, passthrough) = self.inner.create(ctx, self.ino(parent)?, name, args)?;
        let e = self.entry(e);
        Ok((
            e,
            self.new_handle(e.inode, fh, flags, false),
            opts,
            passthrough,
        ))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        let fh = self.fh(inode, handle)?;
        self.inner.read(
            ctx,
            self.ino(inode)?,
            fh,
            w,
            size,
            offset,
            lock_owner,
            flags,
        )
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let fh = self.fh(inode, handle)?;
        self.inner.write(
            ctx,
            self.ino(inode)?,
            fh,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        let fh = self.fh(inode, handle)?;
        self.inner.flush(ctx, self.ino(inode)?, fh, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        let fh = self.fh(inode, handle)?;
        self.inner.fsync(ctx, self.ino(inode)?, datasync, fh)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let fh = self.fh(inode, handle)?;
        self.inner
            .fallocate(ctx, self.ino(inode)?, fh, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let Some(fh) = self.take_handle(inode, handle)? else {
            return Ok(());
        };
        let i = match self.ino(inode) {
            Ok(i) => i,
            Err(_) => return Ok(()),
        };
        self.inner
            .release(ctx, i, flags, fh, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, self.ino(inode)?)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .setxattr(ctx, self.ino(inode)?, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, self.ino(inode)?, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, self.ino(inode)?, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(ctx, self.ino(inode)?, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let (fh, opts) = self.inner.opendir(ctx, self.ino(inode)?, flags)?;
        Ok((self.new_handle(inode, fh, flags, true), opts))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let fh = self.fh(inode, handle)?;
        self.inner
            .readdir(ctx, self.ino(inode)?, fh, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let fh = self.fh(inode, handle)?;
        self.inner
            .readdirplus(ctx, self.ino(inode)?, fh, size, offset, &mut |d, e| {
                let e = self.entry(e);
                let r = add_entry(d, e);
                // PassthroughFs gives its lookup back when the entry did not fit (0).
                if matches!(r, Ok(0)) {
                    self.unentry(e.inode);
                }
                r
            })
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        let fh = self.fh(inode, handle)?;
        self.inner.fsyncdir(ctx, self.ino(inode)?, datasync, fh)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        let Some(fh) = self.take_handle(inode, handle)? else {
            return Ok(());
        };
        let i = match self.ino(inode) {
            Ok(i) => i,
            Err(_) => return Ok(()),
        };
        self.inner.releasedir(ctx, i, flags, fh)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, self.ino(inode)?, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let fh = self.fh(inode, handle)?;
        self.inner.lseek(ctx, self.ino(inode)?, fh, offset, whence)
    }
}
