//! The thin FUSE adapter: each kernel request is handed to [`Core`] on the async runtime and
//! answered when it completes, so many requests are in flight at once. Errors become errnos.

use crate::core::Core;
use crate::metrics::FUSE_OPS;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, IoctlFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use mortar_client::mortar_proto::wire::{Inval, SetAttr, TimeSet, XattrMode};
use mortar_client::mortar_proto::{
    Attr, DirEntry, FileKind, FsError, InodeId, Timestamp, ROOT_INODE,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The kernel's attribute and entry timeouts, changed while mounted by `volume set` of
/// `cache.attr-timeout` and `cache.entry-timeout` unless the mount fixed them
/// (`attr_timeout=`, `entry_timeout=`).
#[derive(Default)]
pub struct Ttls {
    attr_ns: AtomicU64,
    entry_ns: AtomicU64,
}

impl Ttls {
    pub fn set(&self, attr: Option<Duration>, entry: Option<Duration>) {
        for (to, d) in [(&self.attr_ns, attr), (&self.entry_ns, entry)] {
            if let Some(d) = d {
                to.store(d.as_nanos() as u64, Ordering::Relaxed);
            }
        }
    }

    pub fn attr(&self) -> Duration {
        Duration::from_nanos(self.attr_ns.load(Ordering::Relaxed))
    }

    pub fn entry(&self) -> Duration {
        Duration::from_nanos(self.entry_ns.load(Ordering::Relaxed))
    }
}

/// Kernel inode numbers and the volume's: the kernel's root is 1 (FUSE_ROOT_ID), a clone's
/// root has its volume's number (`mortar_proto::root_of`); every other inode has the same
/// number on both sides.
#[derive(Clone, Copy, Debug)]
pub struct Inos {
    root: InodeId,
}

impl Inos {
    pub fn new(root: InodeId) -> Inos {
        Inos { root }
    }

    /// The volume's number for a kernel inode number.
    fn ours(self, ino: INodeNo) -> INodeNo {
        if ino.0 == ROOT_INODE {
            INodeNo(self.root)
        } else {
            ino
        }
    }

    /// The kernel's number for one of the volume's.
    fn kernel(self, ino: InodeId) -> INodeNo {
        if ino == self.root {
            INodeNo(ROOT_INODE)
        } else {
            INodeNo(ino)
        }
    }

    fn attr(self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: self.kernel(a.ino),
            ..file_attr(a)
        }
    }
}

pub struct MortarFs {
    core: Arc<Core>,
    inos: Inos,
    rt: tokio::runtime::Handle,
    /// How long the kernel may keep attributes and names (volume options, or mount options).
    pub ttls: Arc<Ttls>,
    /// Set once the session exists; used to drop the kernel's stale caches.
    pub notifier: Arc<OnceLock<Notifier>>,
}

fn errno(e: &FsError) -> Errno {
    counted(Errno::from_i32(e.errno()))
}

/// Counts a request answered on the FUSE thread (no task) when it goes out of scope.
struct Timed(&'static str, Instant);

impl Timed {
    fn new(op: &'static str) -> Timed {
        Timed(op, Instant::now())
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        FUSE_OPS.observe(self.0, self.1.elapsed());
    }
}

/// Every errno the kernel is answered with passes here, for the mount's error metrics.
fn counted(errno: Errno) -> Errno {
    FUSE_OPS.failed(errno.code());
    errno
}

/// The errno of an operation on an inode the kernel named by number. When the namespace no
/// longer has it, the kernel's name for it is stale (another mount renamed or removed it, or a
/// snapshot was restored, and the invalidation is still on its way): ESTALE makes the VFS walk
/// the path again with a fresh lookup instead of failing the open or stat with ENOENT.
fn node_errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound => counted(Errno::from_i32(libc::ESTALE)),
        e => errno(e),
    }
}

fn to_time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(t.nanos as u64)
    }
}

fn from_time(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut nanos = d.subsec_nanos();
            if nanos > 0 {
                secs -= 1;
                nanos = 1_000_000_000 - nanos;
            }
            Timestamp { secs, nanos }
        }
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(from_time(t)),
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn kind_of_mode(mode: u32) -> Option<FileKind> {
    match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => Some(FileKind::Regular),
        libc::S_IFIFO => Some(FileKind::Fifo),
        libc::S_IFSOCK => Some(FileKind::Socket),
        libc::S_IFCHR => Some(FileKind::CharDevice),
        libc::S_IFBLK => Some(FileKind::BlockDevice),
        _ => None,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: to_time(a.atime),
        mtime: to_time(a.mtime),
        ctime: to_time(a.ctime),
        crtime: to_time(a.ctime),
        kind: file_type(a.kind),
        perm: a.perm as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        // Large enough that cp and friends move data in big requests.
        blksize: 128 * 1024,
        flags: 0,
    }
}

fn open_flags(keep_cache: bool, write: bool) -> FopenFlags {
    let mut f = FopenFlags::empty();
    if keep_cache {
        f |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if !write {
        // A read-only handle has nothing to flush: spare close() a round trip to us.
        f |= FopenFlags::FOPEN_NOFLUSH;
    }
    f
}

const GENERATION: Generation = Generation(0);

/// A request still unanswered after this long is logged (the operation timeout is 30 s by
/// default, so only a wait without a deadline gets here).
const SLOW_REQUEST: std::time::Duration = std::time::Duration::from_secs(45);
const _: () = assert!(SLOW_REQUEST.as_secs() > mortar_client::DEFAULT_OP_TIMEOUT.as_secs());

/// Pass what other clients changed on to the kernel's entry, attribute and page caches. The
/// notifications run on blocking threads: the kernel may hold them while it waits for one of
/// our answers.
pub fn kernel_invalidation(
    notifier: Arc<OnceLock<Notifier>>,
    rt: tokio::runtime::Handle,
    inos: Inos,
) -> mortar_client::InvalHook {
    Box::new(move |items: &[Inval]| {
        let n = notifier.get().cloned()?;
        let items = items.to_vec();
        Some(rt.spawn_blocking(move || {
            for item in items {
                let _ = match item {
                    Inval::Inode(ino) => n.inval_inode(inos.kernel(ino), 0, 0),
                    Inval::Entry(parent, name) => {
                        n.inval_entry(inos.kernel(parent), OsStr::from_bytes(&name))
                    }
                    // The kernel keeps no "no such name" for us (an error answer is not
                    // cached), so only the mount's own cache had anything to drop.
                    Inval::Names(_) => Ok(()),
                    // Options reach the mount through the volume's config hook.
                    Inval::Volume => Ok(()),
                };
            }
        }))
    })
}

/// Answer a readdirplus from the directory snapshot `entries`, from `offset` on.
fn answer_readdirplus(
    ino: INodeNo,
    inos: Inos,
    entries: &[DirEntry],
    offset: u64,
    ttl: Duration,
    mut reply: ReplyDirectoryPlus,
) {
    // The kernel lists "." and ".." but caches nothing for them, so any attributes do.
    let mut dot = file_attr(
        &entries
            .first()
            .map(|e| e.attr.clone())
            .unwrap_or_else(|| dot_attr(ino.0)),
    );
    dot.ino = ino;
    dot.kind = FileType::Directory;
    walk_dir(entries, offset, |next, name, entry| match entry {
        Some(e) => reply.add(
            inos.kernel(e.attr.ino),
            next,
            OsStr::from_bytes(name),
            &ttl,
            &inos.attr(&e.attr),
            GENERATION,
        ),
        None => reply.add(
            ino,
            next,
            OsStr::from_bytes(name),
            &Duration::ZERO,
            &dot,
            GENERATION,
        ),
    });
    reply.ok();
}

/// What creating an entry needs from a request: the name, the permission bits the umask
/// leaves, and the caller's uid and gid as the new owner.
fn new_node(req: &Request, name: &OsStr, mode: u32, umask: u32) -> (Vec<u8>, u32, u32, u32) {
    (
        name.as_bytes().to_vec(),
        mode & !umask & 0o7777,
        req.uid(),
        req.gid(),
    )
}

/// Walk a directory snapshot from a readdir `offset`: offset 0 starts at ".", 1 at "..", and
/// n >= 2 at snapshot entry n - 2, so offsets stay stable however the directory changes. `add`
/// gets the offset of the next entry, the name, and the entry (None for the dot entries), and
/// returns true when the reply is full.
fn walk_dir(
    entries: &[DirEntry],
    offset: u64,
    mut add: impl FnMut(u64, &[u8], Option<&DirEntry>) -> bool,
) {
    let mut at = offset;
    loop {
        let full = match at {
            0 => add(1, b".", None),
            1 => add(2, b"..", None),
            n => match entries.get((n - 2) as usize) {
                Some(e) => add(n + 1, &e.name, Some(e)),
                None => return,
            },
        };
        if full {
            return;
        }
        at += 1;
    }
}

fn dot_attr(ino: u64) -> Attr {
    Attr {
        ino,
        kind: FileKind::Directory,
        perm: 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        nlink: 2,
        rdev: 0,
        atime: Timestamp::default(),
        mtime: Timestamp::default(),
        ctime: Timestamp::default(),
        version: 0,
    }
}

impl MortarFs {
    pub fn new(
        core: Arc<Core>,
        inos: Inos,
        rt: tokio::runtime::Handle,
        ttls: Arc<Ttls>,
    ) -> MortarFs {
        MortarFs {
            core,
            inos,
            rt,
            ttls,
            notifier: Arc::default(),
        }
    }

    /// Run `f`; the closure answers the kernel itself. It is polled once here first: most
    /// requests are answered from memory (the cache, a delegation) without waiting, and then
    /// the hand-over to a worker thread would cost more than the answer. What must wait
    /// continues on the runtime, which polls it again at once.
    fn spawn<F, Fut>(&self, op: &'static str, f: F)
    where
        F: FnOnce(Arc<Core>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let _in_runtime = self.rt.enter();
        let started = Instant::now();
        let mut task = Box::pin(f(self.core.clone()));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if std::future::Future::poll(task.as_mut(), &mut cx).is_ready() {
            FUSE_OPS.observe(op, started.elapsed());
        } else {
            self.rt.spawn(async move {
                let task = async {
                    task.await;
                    FUSE_OPS.observe(op, started.elapsed());
                };
                tokio::pin!(task);
                // Every wait below has a deadline; one that outlives this names its request in
                // the log, so a hang can be found.
                tokio::select! {
                    biased;
                    () = &mut task => return,
                    () = tokio::time::sleep(SLOW_REQUEST) => {}
                }
                tracing::warn!(
                    request = op,
                    "a request has been waiting for {SLOW_REQUEST:?}"
                );
                task.await;
                tracing::warn!(request = op, "the slow request ended");
            });
        }
    }
}

/// Answer an entry request from a task.
macro_rules! entry_task {
    ($self:ident, $op:literal, $reply:ident, |$core:ident| $body:expr) => {{
        let ttl = $self.ttls.entry();
        let inos = $self.inos;
        $self.spawn($op, move |$core| async move {
            match $body.await {
                Ok(a) => $reply.entry(&ttl, &inos.attr(&a), GENERATION),
                Err(e) => $reply.error(errno(&e)),
            }
        });
    }};
}

/// Answer an empty request from a task.
macro_rules! empty_task {
    ($self:ident, $op:literal, $reply:ident, |$core:ident| $body:expr) => {{
        $self.spawn($op, move |$core| async move {
            match $body.await {
                Ok(()) => $reply.ok(),
                Err(e) => $reply.error(errno(&e)),
            }
        });
    }};
}

impl Filesystem for MortarFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1024 * 1024);
        let _ = config.set_max_readahead(1024 * 1024);
        let _ = config.set_max_background(64);
        // Listing a directory fills the kernel's entry and attribute caches in one pass, so
        // the stat calls that follow (ls -l, find, PHP) need no round trips.
        // AUTO_INVAL_DATA: when attributes time out, a changed mtime drops the cached pages
        // and the cached listing of a directory, so neither outlives a cached stat.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS
                | fuser::InitFlags::FUSE_READDIRPLUS_AUTO
                | fuser::InitFlags::FUSE_AUTO_INVAL_DATA,
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = self.inos.ours(parent);
        let name = name.as_bytes().to_vec();
        entry_task!(self, "lookup", reply, |core| core.lookup(parent.0, &name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = self.inos.ours(ino);
        let inos = self.inos;
        let ttl = self.ttls.attr();
        self.spawn("getattr", move |core| async move {
            match core.getattr(ino.0).await {
                Ok(a) => reply.attr(&ttl, &inos.attr(&a)),
                Err(e) => reply.error(node_errno(&e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ino = self.inos.ours(ino);
        let inos = self.inos;
        let set = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
        };
        let ttl = self.ttls.attr();
        self.spawn("setattr", move |core| async move {
            match core.setattr(ino.0, size, set).await {
                Ok(a) => reply.attr(&ttl, &inos.attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let ino = self.inos.ours(ino);
        self.spawn("readlink", move |core| async move {
            match core.readlink(ino.0).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let parent = self.inos.ours(parent);
        let Some(kind) = kind_of_mode(mode) else {
            return reply.error(counted(Errno::EINVAL));
        };
        let (name, perm, uid, gid) = new_node(req, name, mode, umask);
        entry_task!(self, "mknod", reply, |core| core
            .mknod(parent.0, &name, kind, perm, uid, gid, rdev));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let parent = self.inos.ours(parent);
        let (name, perm, uid, gid) = new_node(req, name, mode, umask);
        entry_task!(self, "mkdir", reply, |core| core
            .mkdir(parent.0, &name, perm, uid, gid));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = self.inos.ours(parent);
        let name = name.as_bytes().to_vec();
        empty_task!(self, "unlink", reply, |core| core.unlink(parent.0, &name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let parent = self.inos.ours(parent);
        let name = name.as_bytes().to_vec();
        empty_task!(self, "rmdir", reply, |core| core.rmdir(parent.0, &name));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let parent = self.inos.ours(parent);
        let (name, target) = (
            link_name.as_bytes().to_vec(),
            target.as_os_str().as_bytes().to_vec(),
        );
        let (uid, gid) = (req.uid(), req.gid());
        entry_task!(self, "symlink", reply, |core| core
            .symlink(parent.0, &name, &target, uid, gid));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let parent = self.inos.ours(parent);
        let newparent = self.inos.ours(newparent);
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        let flags = flags.bits();
        empty_task!(self, "rename", reply, |core| core.rename(
            parent.0,
            &name,
            newparent.0,
            &newname,
            flags
        ));
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let ino = self.inos.ours(ino);
        let newparent = self.inos.ours(newparent);
        let newname = newname.as_bytes().to_vec();
        entry_task!(self, "link", reply, |core| core.link(
            ino.0,
            newparent.0,
            &newname
        ));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = self.inos.ours(ino);
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        let truncate = flags.0 & libc::O_TRUNC != 0;
        let notifier = self.notifier.clone();
        self.spawn("open", move |core| async move {
            match core.open(ino.0, write, truncate).await {
                Ok(o) => {
                    if o.changed {
                        // Another client changed the file: drop the cached attributes before
                        // the application reads (close-to-open consistency). Attributes only
                        // (offset -1): the kernel drops the pages itself at open, since the
                        // answer lacks FOPEN_KEEP_CACHE. Dropping pages from here left this
                        // thread waiting in the kernel for a page lock while fsx's next open
                        // waited for this mount.
                        if let Some(n) = notifier.get() {
                            let _ = n.inval_inode(ino, -1, 0);
                        }
                    }
                    reply.opened(FileHandle(o.fh), open_flags(o.keep_cache, write))
                }
                Err(e) => reply.error(node_errno(&e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn("read", move |core| async move {
            match core.read(fh.0, offset, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Buffer here, in request order: the kernel may send the next write before a spawned
        // task would run. Only a full buffer goes to a task to flush.
        let n = data.len() as u32;
        match self.core.buffer_write(fh.0, offset, data) {
            Ok(false) => {
                let _timed = Timed::new("write");
                reply.written(n)
            }
            Ok(true) => self.spawn("write", move |core| async move {
                match core.flush(fh.0).await {
                    Ok(()) => reply.written(n),
                    Err(e) => reply.error(errno(&e)),
                }
            }),
            Err(e) => {
                let _timed = Timed::new("write");
                reply.error(errno(&e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        empty_task!(self, "flush", reply, |core| core.flush(fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        empty_task!(self, "release", reply, |core| core.release(fh.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty_task!(self, "fsync", reply, |core| core.fsync(fh.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let ino = self.inos.ours(ino);
        let _timed = Timed::new("opendir");
        // The kernel keeps what it read of the listing across opens: it drops it when the
        // directory changes through this mount, when the leader's invalidation of the
        // directory arrives, and when the directory's mtime is found changed once its
        // attributes time out (FUSE_AUTO_INVAL_DATA) — the same bound as a cached stat.
        let fh = self.core.opendir(ino.0);
        reply.opened(
            FileHandle(fh),
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let inos = self.inos;
        self.spawn("readdir", move |core| async move {
            let entries = match core.dir_entries(fh.0).await {
                Ok(e) => e,
                Err(e) => return reply.error(node_errno(&e)),
            };
            walk_dir(&entries, offset, |next, name, entry| match entry {
                Some(e) => reply.add(
                    inos.kernel(e.attr.ino),
                    next,
                    file_type(e.attr.kind),
                    OsStr::from_bytes(name),
                ),
                None => reply.add(ino, next, FileType::Directory, OsStr::from_bytes(name)),
            });
            reply.ok();
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let inos = self.inos;
        let ttl = self.ttls.entry();
        self.spawn("readdirplus", move |core| async move {
            match core.dir_entries(fh.0).await {
                Ok(entries) => answer_readdirplus(ino, inos, &entries, offset, ttl, reply),
                Err(e) => reply.error(node_errno(&e)),
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _timed = Timed::new("releasedir");
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let ino = self.inos.ours(ino);
        // Changes made under a delegation are held in memory until committed.
        empty_task!(self, "fsyncdir", reply, |core| core.fsyncdir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn("statfs", move |core| async move {
            match core.statfs().await {
                Ok(s) => {
                    let bs = s.block_size as u64;
                    let (blocks, free) = (s.total_bytes / bs, s.free_bytes / bs);
                    let files_free = free.max(1_000_000);
                    reply.statfs(
                        blocks,
                        free,
                        free,
                        s.files + files_free,
                        files_free,
                        s.block_size,
                        s.name_max,
                        s.block_size,
                    )
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let ino = self.inos.ours(ino);
        let mode = match flags {
            0 => XattrMode::Any,
            libc::XATTR_CREATE => XattrMode::Create,
            libc::XATTR_REPLACE => XattrMode::Replace,
            _ => return reply.error(counted(Errno::EINVAL)),
        };
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        empty_task!(self, "setxattr", reply, |core| core
            .setxattr(ino.0, &name, &value, mode));
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let ino = self.inos.ours(ino);
        let name = name.as_bytes().to_vec();
        self.spawn("getxattr", move |core| async move {
            match core.getxattr(ino.0, &name).await {
                Ok(v) if size == 0 => reply.size(v.len() as u32),
                Ok(v) if v.len() > size as usize => reply.error(counted(Errno::ERANGE)),
                Ok(v) => reply.data(&v),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let ino = self.inos.ours(ino);
        self.spawn("listxattr", move |core| async move {
            match core.listxattr(ino.0).await {
                Ok(names) => {
                    let mut buf = Vec::new();
                    for n in names {
                        buf.extend_from_slice(&n);
                        buf.push(0);
                    }
                    if size == 0 {
                        reply.size(buf.len() as u32)
                    } else if buf.len() > size as usize {
                        reply.error(counted(Errno::ERANGE))
                    } else {
                        reply.data(&buf)
                    }
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let ino = self.inos.ours(ino);
        let name = name.as_bytes().to_vec();
        empty_task!(self, "removexattr", reply, |core| core
            .removexattr(ino.0, &name));
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let ino = self.inos.ours(ino);
        // Permission bits are checked by the kernel (default_permissions); here we only confirm
        // the inode exists.
        empty_task!(self, "access", reply, |core| async move {
            core.getattr(ino.0).await.map(|_| ())
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let parent = self.inos.ours(parent);
        let inos = self.inos;
        let (name, perm, uid, gid) = new_node(req, name, mode, umask);
        let exclusive = flags & libc::O_EXCL != 0;
        let ttl = self.ttls.entry();
        self.spawn("create", move |core| async move {
            match core
                .create(parent.0, &name, perm, uid, gid, exclusive)
                .await
            {
                Ok((a, o)) => reply.created(
                    &ttl,
                    &inos.attr(&a),
                    GENERATION,
                    FileHandle(o.fh),
                    open_flags(o.keep_cache, true),
                ),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty_task!(self, "fallocate", reply, |core| core
            .fallocate(fh.0, offset, length, mode));
    }

    /// No ioctls: ENOTTY, as a local filesystem answers. Asked quietly, because ordinary
    /// programs ask on every open (Python's `open` tests each file with `isatty`), and fuser's
    /// default logs a warning for each.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(counted(Errno::ENOTTY));
    }
}
