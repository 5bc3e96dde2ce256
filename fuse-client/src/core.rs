//! The filesystem logic behind the mount, free of FUSE types so it can be driven directly:
//! open-file handles with write buffers, directory listings with stable offsets, read-only
//! enforcement, and the bookkeeping that keeps the kernel's caches coherent.

use mortar_client::mortar_proto::attrs::check_xattr;
use mortar_client::mortar_proto::chunk_map::{check_size, end_of};
use mortar_client::mortar_proto::wire::{MetaOp, SetAttr, TimeSet, XattrMode};
use mortar_client::mortar_proto::{
    Attr, Content, DirEntry, FileKind, FsError, Inode, InodeId, StatFs, Timestamp,
};
use mortar_client::{Access, Volume};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Buffered bytes per open file before a write flushes on its own.
pub const FLUSH_THRESHOLD: usize = 4 * 1024 * 1024;

struct FileState {
    /// The inode as of open (or our last flush): what reads through this handle see. Kept after
    /// an unlink, so an open file stays readable until it is closed. Shared, so a read takes
    /// it and lets the lock go: the kernel's readahead reads one handle in parallel.
    inode: Arc<Inode>,
    /// Refetch `inode` before the next read (our own flush changed it).
    stale: bool,
}

/// An open directory: its listing, read at the first readdir.
struct DirHandle {
    ino: InodeId,
    entries: tokio::sync::OnceCell<Arc<Vec<DirEntry>>>,
}

/// Writes not yet flushed, in the order the kernel sent them.
#[derive(Default)]
struct Pending {
    ranges: Vec<(u64, Vec<u8>)>,
    bytes: usize,
    /// Highest end offset among `ranges` (0 when empty), for getattr.
    end: u64,
    /// chmod/chown/utimens/setxattr of this file made while its data was buffered, with the
    /// time each was made: committed after the data in the same Raft entry (so the flush does
    /// not overwrite `cp -a`'s mtime, and costs one commit instead of four), and shown by this
    /// mount until then.
    after: Vec<(MetaOp, Timestamp)>,
}

pub struct OpenFile {
    pub ino: InodeId,
    pub writable: bool,
    /// Held across a flush, so flushes of one handle do not overlap.
    state: tokio::sync::Mutex<FileState>,
    /// Appended synchronously by the FUSE thread, so buffered writes keep request order.
    pending: Mutex<Pending>,
    /// The end of everything written through this handle (buffered, being flushed, or
    /// committed), lowered only by a truncate. The size this mount reports never drops below
    /// it: a flush in progress holds data that is neither buffered nor yet on the server, and
    /// any close of a shared descriptor (a forked child exec'ing) starts one.
    size_floor: AtomicU64,
    /// Where the last read through this handle ended: a read starting there is sequential.
    next_read: AtomicU64,
}

impl OpenFile {
    fn dirty_end(&self) -> u64 {
        self.pending.lock().expect("pending lock").end
    }
}

/// What the kernel should do with its page cache for this file at open.
pub struct Opened {
    pub fh: u64,
    pub keep_cache: bool,
    /// The file changed since the kernel last saw it: its cached attributes are stale.
    pub changed: bool,
}

pub struct Core {
    pub vol: Arc<Volume>,
    pub read_only: bool,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    /// (version, size) of each inode as last reported to the kernel.
    seen: Mutex<HashMap<InodeId, (u64, u64)>>,
    /// (version, size) of each file when it was last opened: what the kernel's cached pages of
    /// it may hold. Kept apart from `seen`, which a getattr moves on without the pages: after
    /// a watch break (a leader failover) nothing drops the kernel's pages, and a stat before
    /// the next open must not make stale pages look current.
    paged: Mutex<HashMap<InodeId, (u64, u64)>>,
}

fn rofs() -> FsError {
    FsError::ReadOnly("mounted read-only".into())
}

impl Core {
    pub fn new(vol: Arc<Volume>, read_only: bool) -> Core {
        Core {
            vol,
            read_only,
            files: Mutex::default(),
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(1),
            seen: Mutex::default(),
            paged: Mutex::default(),
        }
    }

    fn writable(&self) -> Result<(), FsError> {
        if self.read_only {
            Err(rofs())
        } else {
            Ok(())
        }
    }

    fn file(&self, fh: u64) -> Result<Arc<OpenFile>, FsError> {
        self.files
            .lock()
            .expect("files lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::Invalid(format!("unknown file handle {fh}")))
    }

    fn handles_of(&self, ino: InodeId) -> Vec<Arc<OpenFile>> {
        self.files
            .lock()
            .expect("files lock")
            .values()
            .filter(|f| f.ino == ino)
            .cloned()
            .collect()
    }

    /// Hold back an attribute or xattr change of `ino` until the flush of a handle that has
    /// buffered data, and return that handle (None when none has: the caller commits it now).
    fn defer(&self, ino: InodeId, op: MetaOp) -> Option<Arc<OpenFile>> {
        for f in self.handles_of(ino) {
            let mut p = f.pending.lock().expect("pending lock");
            if !p.ranges.is_empty() {
                p.after.push((op, Timestamp::now()));
                drop(p);
                return Some(f);
            }
        }
        None
    }

    /// Commit what is held back for `ino` before an operation that must see or follow it.
    async fn flush_deferred(&self, ino: InodeId) -> Result<(), FsError> {
        for f in self.handles_of(ino) {
            if !f.pending.lock().expect("pending lock").after.is_empty() {
                self.flush_file(&f, false).await?;
            }
        }
        Ok(())
    }

    /// Attributes as this mount sees them: a writer sees its buffered extension and its
    /// held-back attribute changes at once.
    fn present(&self, mut a: Attr) -> Attr {
        if a.kind == FileKind::Regular {
            let server = a.size;
            for f in self.handles_of(a.ino) {
                a.size = a.size.max(f.size_floor.load(Ordering::Acquire));
                let p = f.pending.lock().expect("pending lock");
                if !p.after.is_empty() {
                    let mut shown = Inode {
                        attr: a,
                        content: Content::None,
                        xattrs: Vec::new(),
                    };
                    for (op, at) in &p.after {
                        mortar_client::apply_to_inode(&mut shown, op, *at);
                    }
                    a = shown.attr;
                }
            }
            tracing::debug!(
                ino = a.ino,
                server,
                presented = a.size,
                version = a.version,
                "attributes"
            );
        }
        self.seen
            .lock()
            .expect("seen lock")
            .insert(a.ino, (a.version, a.size));
        a
    }

    pub async fn lookup(&self, parent: InodeId, name: &[u8]) -> Result<Attr, FsError> {
        Ok(self.present(self.vol.lookup(parent, name).await?))
    }

    pub async fn getattr(&self, ino: InodeId) -> Result<Attr, FsError> {
        match self.vol.getattr(ino).await {
            Ok(a) => Ok(self.present(a)),
            // Unlinked while open: the open handle still describes it, with no links left.
            Err(FsError::NotFound) => {
                let Some(f) = self.handles_of(ino).into_iter().next() else {
                    return Err(FsError::NotFound);
                };
                let mut a = f.state.lock().await.inode.attr.clone();
                a.nlink = 0;
                a.size = a.size.max(f.size_floor.load(Ordering::Acquire));
                Ok(a)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn setattr(
        &self,
        ino: InodeId,
        size: Option<u64>,
        set: SetAttr,
    ) -> Result<Attr, FsError> {
        self.writable()?;
        let mut attr = None;
        if let Some(size) = size {
            check_size(size)?;
            // Buffered writes land first, so the truncate applies after them as the app expects.
            for f in self.handles_of(ino) {
                self.flush_file(&f, false).await?;
            }
            match self.vol.truncate(ino, size).await {
                Ok(a) => {
                    attr = Some(a);
                    for f in self.handles_of(ino) {
                        f.state.lock().await.stale = true;
                        f.size_floor.store(size, Ordering::Release);
                    }
                }
                // Unlinked while open (ftruncate of a handle): its handles' copies change.
                Err(FsError::NotFound) if !self.handles_of(ino).is_empty() => {
                    for f in self.handles_of(ino) {
                        let mut st = f.state.lock().await;
                        st.inode = Arc::new(self.vol.truncate_detached(&st.inode, size).await?);
                        f.size_floor.store(size, Ordering::Release);
                        attr = Some(Attr {
                            nlink: 0,
                            ..st.inode.attr.clone()
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if set != SetAttr::default() {
            let op = MetaOp::SetAttr {
                ino,
                set: set.clone(),
            };
            if let Some(f) = attr.is_none().then(|| self.defer(ino, op)).flatten() {
                // Answer from this mount's view: the handle's inode plus what is held back.
                let base = f.state.lock().await.inode.attr.clone();
                return Ok(self.present(base));
            }
            attr = Some(self.vol.setattr(ino, set).await?);
        }
        let attr = match attr {
            Some(a) => a,
            None => self.vol.getattr(ino).await?,
        };
        Ok(self.present(attr))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn mknod(
        &self,
        parent: InodeId,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
    ) -> Result<Attr, FsError> {
        self.writable()?;
        Ok(self.present(
            self.vol
                .mknod(parent, name, kind, perm, uid, gid, rdev, true)
                .await?,
        ))
    }

    pub async fn mkdir(
        &self,
        parent: InodeId,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr, FsError> {
        self.writable()?;
        Ok(self.present(self.vol.mkdir(parent, name, perm, uid, gid).await?))
    }

    pub async fn symlink(
        &self,
        parent: InodeId,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr, FsError> {
        self.writable()?;
        Ok(self.present(self.vol.symlink(parent, name, target, uid, gid).await?))
    }

    pub async fn readlink(&self, ino: InodeId) -> Result<Vec<u8>, FsError> {
        self.vol.readlink(ino).await
    }

    pub async fn link(
        &self,
        ino: InodeId,
        new_parent: InodeId,
        new_name: &[u8],
    ) -> Result<Attr, FsError> {
        self.writable()?;
        Ok(self.present(self.vol.link(ino, new_parent, new_name).await?))
    }

    pub async fn unlink(&self, parent: InodeId, name: &[u8]) -> Result<(), FsError> {
        self.writable()?;
        self.vol.unlink(parent, name).await
    }

    pub async fn rmdir(&self, parent: InodeId, name: &[u8]) -> Result<(), FsError> {
        self.writable()?;
        self.vol.rmdir(parent, name).await
    }

    pub async fn rename(
        &self,
        parent: InodeId,
        name: &[u8],
        new_parent: InodeId,
        new_name: &[u8],
        flags: u32,
    ) -> Result<(), FsError> {
        self.writable()?;
        self.vol
            .rename(parent, name, new_parent, new_name, flags)
            .await
    }

    /// Open a file. `truncate` is O_TRUNC; `write` whether the handle may write.
    pub async fn open(&self, ino: InodeId, write: bool, truncate: bool) -> Result<Opened, FsError> {
        if write || truncate {
            self.writable()?;
        }
        if truncate {
            for f in self.handles_of(ino) {
                self.flush_file(&f, false).await?;
            }
            self.vol.truncate(ino, 0).await?;
            for f in self.handles_of(ino) {
                f.size_floor.store(0, Ordering::Release);
            }
        }
        let inode = self.vol.inode(ino).await?;
        self.open_inode(inode, write)
    }

    fn open_inode(&self, inode: Inode, write: bool) -> Result<Opened, FsError> {
        let ino = inode.attr.ino;
        match inode.attr.kind {
            FileKind::Regular => {}
            FileKind::Directory => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid("not a regular file".into())),
        }
        let now = (inode.attr.version, inode.attr.size);
        let told = self.seen.lock().expect("seen lock").insert(ino, now);
        let paged = self.paged.lock().expect("paged lock").insert(ino, now);
        let changed = told.is_some_and(|b| b != now);
        // Close-to-open: keep the kernel's pages only if the file is as it was at the last
        // open (this mount's own writes since count as a change too: safe, a re-read).
        let keep_cache = paged == Some(now);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let file = OpenFile {
            ino,
            writable: write,
            state: tokio::sync::Mutex::new(FileState {
                inode: Arc::new(inode),
                stale: false,
            }),
            next_read: AtomicU64::new(0),
            pending: Mutex::default(),
            size_floor: AtomicU64::new(0),
        };
        self.files
            .lock()
            .expect("files lock")
            .insert(fh, Arc::new(file));
        Ok(Opened {
            fh,
            keep_cache,
            changed,
        })
    }

    /// O_CREAT: make the file (exclusive) and open it.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        parent: InodeId,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    ) -> Result<(Attr, Opened), FsError> {
        self.writable()?;
        let attr = self
            .vol
            .mknod(
                parent,
                name,
                FileKind::Regular,
                perm,
                uid,
                gid,
                0,
                exclusive,
            )
            .await?;
        let opened = if attr.version == 0 {
            // Never written: its content is the empty inline file mknod made; no need to ask.
            let inode = Inode {
                attr: attr.clone(),
                content: Content::Inline(Vec::new()),
                xattrs: Vec::new(),
            };
            self.open_inode(inode, true)?
        } else {
            self.open(attr.ino, true, false).await?
        };
        Ok((self.present(attr), opened))
    }

    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let f = self.file(fh)?;
        if f.dirty_end() > 0 {
            self.flush_file(&f, false).await?;
        }
        let inode = {
            let mut st = f.state.lock().await;
            if st.stale {
                match self.vol.inode(f.ino).await {
                    Ok(i) => st.inode = Arc::new(i),
                    // Unlinked while open: keep reading what we had.
                    Err(FsError::NotFound) => {}
                    Err(e) => return Err(e),
                }
                st.stale = false;
            }
            Arc::clone(&st.inode)
        };
        // A read that starts the file or where the last one ended is a stream: whole chunks,
        // and those after it fetched ahead of the reader. Others are random accesses. A file's
        // first read also fetches ahead for a reader going on to the directory's next files.
        let end = offset.saturating_add(size as u64);
        let access = match f.next_read.swap(end, Ordering::Relaxed) == offset {
            true => Access::Stream,
            false => Access::Random,
        };
        if offset == 0 {
            self.vol.read_ahead_next_files(f.ino);
        } else if access == Access::Stream {
            self.vol.read_ahead(&inode, end);
        }
        self.vol
            .read_inode_as(&inode, offset, size as u64, access)
            .await
    }

    /// Buffer a write without waiting (call in request order). Returns true when the buffer
    /// is full and the caller should [`Core::flush`] before answering.
    pub fn buffer_write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<bool, FsError> {
        self.writable()?;
        let f = self.file(fh)?;
        if !f.writable {
            return Err(FsError::Invalid("file not open for writing".into()));
        }
        let end = end_of(offset, data.len() as u64)?;
        let mut p = f.pending.lock().expect("pending lock");
        match p.ranges.last_mut() {
            // Sequential writes extend one range instead of piling up small ones.
            Some((o, buf)) if *o + buf.len() as u64 == offset => buf.extend_from_slice(data),
            _ => p.ranges.push((offset, data.to_vec())),
        }
        p.bytes += data.len();
        p.end = p.end.max(end);
        // A write after a held-back utimens changes mtime again (the commit puts changes after
        // the data, so say so explicitly).
        let touch = MetaOp::SetAttr {
            ino: f.ino,
            set: SetAttr {
                mtime: Some(TimeSet::Now),
                ..SetAttr::default()
            },
        };
        if p.after.last().is_some_and(|(op, _)| *op != touch) {
            p.after.push((touch, Timestamp::now()));
        }
        f.size_floor.fetch_max(p.end, Ordering::AcqRel);
        Ok(p.bytes >= FLUSH_THRESHOLD)
    }

    /// Buffer a write and flush if the buffer filled.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        if self.buffer_write(fh, offset, data)? {
            self.flush(fh).await?;
        }
        Ok(data.len() as u32)
    }

    async fn flush_file(&self, f: &OpenFile, sync: bool) -> Result<(), FsError> {
        let mut st = f.state.lock().await;
        let taken = std::mem::take(&mut *f.pending.lock().expect("pending lock"));
        if taken.ranges.is_empty() {
            // Nothing buffered: what this handle wrote is already on a quorum. (Changes are
            // held back only behind buffered data, so none are waiting either.)
            debug_assert!(taken.after.is_empty());
            return Ok(());
        }
        let then: Vec<MetaOp> = taken.after.iter().map(|(op, _)| op.clone()).collect();
        let ranges: Vec<(u64, &[u8])> = taken
            .ranges
            .iter()
            .map(|(o, d)| (*o, d.as_slice()))
            .collect();
        // Commit against our own copy of the inode: no round trip to read it first, and if
        // someone else changed the file meanwhile, the version check makes us re-read.
        let base = (!st.stale).then(|| Inode::clone(&st.inode));
        let mut result = self
            .vol
            .write_ranges_on(f.ino, base, &ranges, sync, &then)
            .await;
        if matches!(result, Err(FsError::NotFound)) {
            // Unlinked while open: only this mount's handles reach it now, and they see the
            // writes through their copy of the inode (nothing is committed).
            result = self.vol.write_detached(&st.inode, &ranges).await;
        }
        match result {
            Ok(committed) => {
                st.inode = Arc::new(committed);
                st.stale = false;
                Ok(())
            }
            Err(e) => {
                // Keep the data for a retry at the next flush or release; later writes stay later.
                let mut p = f.pending.lock().expect("pending lock");
                let newer = std::mem::replace(&mut *p, taken);
                p.ranges.extend(newer.ranges);
                p.after.extend(newer.after);
                p.bytes += newer.bytes;
                p.end = p.end.max(newer.end);
                Err(e)
            }
        }
    }

    /// close(2): what the handle buffered is committed; a change of the file shown earlier
    /// and since found impossible to commit is reported here (EIO).
    pub async fn flush(&self, fh: u64) -> Result<(), FsError> {
        let f = self.file(fh)?;
        self.flush_file(&f, false).await?;
        self.vol.lost_change(f.ino)
    }

    pub async fn fsync(&self, fh: u64) -> Result<(), FsError> {
        let f = self.file(fh)?;
        self.flush_file(&f, true).await?;
        // A file made under a delegation reaches the bricks with what is held.
        self.vol.commit_held().await?;
        self.vol.lost_change(f.ino)
    }

    /// fsyncdir of `dir`: everything made under delegations is committed, and a create in
    /// `dir` that could not be is reported (EIO).
    pub async fn fsyncdir(&self, dir: InodeId) -> Result<(), FsError> {
        self.vol.commit_held().await?;
        self.vol.lost_change(dir)
    }

    pub async fn release(&self, fh: u64) -> Result<(), FsError> {
        let f = self.file(fh)?;
        let result = self.flush_file(&f, false).await;
        self.files.lock().expect("files lock").remove(&fh);
        result
    }

    /// fallocate: plain preallocation extends the size; punch-hole and zero-range are refused
    /// honestly rather than silently accepted.
    pub async fn fallocate(
        &self,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), FsError> {
        self.writable()?;
        let f = self.file(fh)?;
        if mode != 0 {
            return Err(FsError::NotSupported(format!("fallocate mode {mode:#x}")));
        }
        let end = end_of(offset, length)?;
        self.flush_file(&f, false).await?;
        let attr = self.vol.getattr(f.ino).await?;
        if end > attr.size {
            self.vol.truncate(f.ino, end).await?;
            f.state.lock().await.stale = true;
        }
        Ok(())
    }

    /// Open a directory. Its listing is read at the first readdir, not here: the kernel keeps
    /// listings it has read (the directory is opened with FOPEN_CACHE_DIR) and then asks for
    /// none, so an open that only walks a cached directory costs no round trip to a brick.
    pub fn opendir(&self, ino: InodeId) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = DirHandle {
            ino,
            entries: tokio::sync::OnceCell::new(),
        };
        self.dirs
            .lock()
            .expect("dirs lock")
            .insert(fh, Arc::new(handle));
        fh
    }

    /// The snapshot of the directory open as `fh`, taken at its first read; offsets index
    /// into it, so they stay stable however the directory changes while it is being read.
    pub async fn dir_entries(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>, FsError> {
        let handle = self
            .dirs
            .lock()
            .expect("dirs lock")
            .get(&fh)
            .cloned()
            .ok_or_else(|| FsError::Invalid(format!("unknown directory handle {fh}")))?;
        handle
            .entries
            .get_or_try_init(|| async {
                let entries = self.vol.readdir_all(handle.ino).await?;
                for e in &entries {
                    self.present(e.attr.clone());
                }
                Ok(Arc::new(entries))
            })
            .await
            .cloned()
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.lock().expect("dirs lock").remove(&fh);
    }

    pub async fn statfs(&self) -> Result<StatFs, FsError> {
        self.vol.statfs().await
    }

    pub async fn setxattr(
        &self,
        ino: InodeId,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<(), FsError> {
        self.writable()?;
        // Only a plain set can be held back: it fails only on what check_xattr sees here, while
        // XATTR_CREATE / XATTR_REPLACE depend on the committed state.
        if mode == XattrMode::Any {
            check_xattr(name, value)?;
            let op = MetaOp::SetXattr {
                ino,
                name: name.to_vec(),
                value: value.to_vec(),
                mode,
            };
            if self.defer(ino, op).is_some() {
                return Ok(());
            }
        }
        self.flush_deferred(ino).await?;
        self.vol.setxattr(ino, name, value, mode).await
    }

    pub async fn getxattr(&self, ino: InodeId, name: &[u8]) -> Result<Vec<u8>, FsError> {
        self.flush_deferred(ino).await?;
        self.vol.getxattr(ino, name).await
    }

    pub async fn listxattr(&self, ino: InodeId) -> Result<Vec<Vec<u8>>, FsError> {
        self.flush_deferred(ino).await?;
        self.vol.listxattr(ino).await
    }

    pub async fn removexattr(&self, ino: InodeId, name: &[u8]) -> Result<(), FsError> {
        self.writable()?;
        self.flush_deferred(ino).await?;
        self.vol.removexattr(ino, name).await
    }
}
