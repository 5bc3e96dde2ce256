//! `lazyfs BACKING MOUNTPOINT`: a FUSE passthrough that keeps every write in memory until the
//! file is fsynced, in the spirit of Jepsen's LazyFS. Killing it is a power cut: the backing
//! directory holds exactly what was synced (file data), and a brick restarted on it sees what a
//! machine sees after losing power. Metadata changes (create, rename, unlink, mkdir, truncate,
//! fallocate) go to the backing directory at once, as a journalling filesystem commits them
//! soon after; only unsynced file data is lost. Test tool, not part of the product.

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

const TTL: Duration = Duration::ZERO;

/// Writes to one file since its last fsync, in order, and the size they give it.
struct Dirty {
    writes: Vec<(u64, Vec<u8>)>,
    size: u64,
}

#[derive(Default)]
struct State {
    /// inode -> path relative to the backing root ("" is the root).
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next_ino: u64,
    dirty: HashMap<u64, Dirty>,
    files: HashMap<u64, (u64, Arc<File>)>,
    next_fh: u64,
}

struct LazyFs {
    root: PathBuf,
    state: Mutex<State>,
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from(e)
}

impl LazyFs {
    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("lazyfs lock")
    }

    fn real(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn path_of(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        if ino.0 == 1 {
            return Ok(PathBuf::new());
        }
        self.st().paths.get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn ino_for(st: &mut State, rel: &Path) -> u64 {
        if rel.as_os_str().is_empty() {
            return 1;
        }
        if let Some(i) = st.inos.get(rel) {
            return *i;
        }
        st.next_ino += 1;
        let i = st.next_ino + 1;
        st.paths.insert(i, rel.to_path_buf());
        st.inos.insert(rel.to_path_buf(), i);
        i
    }

    fn forget_path(st: &mut State, rel: &Path) {
        if let Some(i) = st.inos.remove(rel) {
            st.paths.remove(&i);
            st.dirty.remove(&i);
        }
    }

    fn attr(&self, ino: u64, rel: &Path) -> Result<FileAttr, Errno> {
        let m = std::fs::symlink_metadata(self.real(rel)).map_err(errno)?;
        let kind = if m.is_dir() {
            FileType::Directory
        } else if m.file_type().is_symlink() {
            FileType::Symlink
        } else {
            FileType::RegularFile
        };
        let size = self.st().dirty.get(&ino).map(|d| d.size).unwrap_or(m.len());
        let t = |s: i64, ns: i64| UNIX_EPOCH + Duration::new(s.max(0) as u64, ns as u32);
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: m.blocks(),
            atime: t(m.atime(), m.atime_nsec()),
            mtime: t(m.mtime(), m.mtime_nsec()),
            ctime: t(m.ctime(), m.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind,
            perm: (m.mode() & 0o7777) as u16,
            nlink: m.nlink() as u32,
            uid: m.uid(),
            gid: m.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path_of(parent)?.join(name))
    }

    fn entry(&self, rel: &Path, reply: ReplyEntry) {
        let ino = Self::ino_for(&mut self.st(), rel);
        match self.attr(ino, rel) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open_handle(&self, ino: u64, rel: &Path) -> Result<u64, Errno> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.real(rel))
            .map_err(errno)?;
        let mut st = self.st();
        st.next_fh += 1;
        let fh = st.next_fh;
        st.files.insert(fh, (ino, Arc::new(f)));
        Ok(fh)
    }

    /// Write what is dirty in `ino` to the backing file and sync it.
    fn sync(&self, ino: u64, file: &File) -> Result<(), Errno> {
        let dirty = self.st().dirty.remove(&ino);
        if let Some(d) = dirty {
            for (off, bytes) in &d.writes {
                file.write_all_at(bytes, *off).map_err(errno)?;
            }
            if file.metadata().map_err(errno)?.len() < d.size {
                file.set_len(d.size).map_err(errno)?;
            }
        }
        file.sync_all().map_err(errno)
    }
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name) {
            Ok(rel) if self.real(&rel).symlink_metadata().is_ok() => self.entry(&rel, reply),
            Ok(_) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path_of(ino).and_then(|rel| self.attr(ino.0, &rel)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let res = (|| {
            let rel = self.path_of(ino)?;
            if let Some(m) = mode {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(self.real(&rel), std::fs::Permissions::from_mode(m))
                    .map_err(errno)?;
            }
            if let Some(size) = size {
                // A truncate is metadata: it reaches the backing file now; unsynced writes
                // past the new end are dropped with it.
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(self.real(&rel))
                    .map_err(errno)?;
                f.set_len(size).map_err(errno)?;
                if let Some(d) = self.st().dirty.get_mut(&ino.0) {
                    for (off, bytes) in d.writes.iter_mut() {
                        bytes.truncate(size.saturating_sub(*off) as usize);
                    }
                    d.size = size;
                }
            }
            self.attr(ino.0, &rel)
        })();
        match res {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        match self.child(parent, name) {
            Ok(rel) => match std::fs::create_dir(self.real(&rel)) {
                Ok(()) => self.entry(&rel, reply),
                Err(e) => reply.error(errno(e)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.child(parent, name) {
            Ok(rel) => match std::fs::remove_file(self.real(&rel)) {
                Ok(()) => {
                    Self::forget_path(&mut self.st(), &rel);
                    reply.ok()
                }
                Err(e) => reply.error(errno(e)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.child(parent, name) {
            Ok(rel) => match std::fs::remove_dir(self.real(&rel)) {
                Ok(()) => {
                    Self::forget_path(&mut self.st(), &rel);
                    reply.ok()
                }
                Err(e) => reply.error(errno(e)),
            },
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = (|| {
            let from = self.child(parent, name)?;
            let to = self.child(newparent, newname)?;
            std::fs::rename(self.real(&from), self.real(&to)).map_err(errno)?;
            let mut st = self.st();
            Self::forget_path(&mut st, &to);
            // Everything at or under `from` moves; its unsynced data moves with its inode.
            let moved: Vec<(PathBuf, u64)> = st
                .inos
                .iter()
                .filter(|(p, _)| p.starts_with(&from))
                .map(|(p, i)| (p.clone(), *i))
                .collect();
            for (p, i) in moved {
                st.inos.remove(&p);
                let rest = p.strip_prefix(&from).expect("prefix");
                // Joining an empty rest would add a trailing slash.
                let np = if rest.as_os_str().is_empty() {
                    to.clone()
                } else {
                    to.join(rest)
                };
                st.paths.insert(i, np.clone());
                st.inos.insert(np, i);
            }
            Ok(())
        })();
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self
            .path_of(ino)
            .and_then(|rel| self.open_handle(ino.0, &rel))
        {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let res = (|| {
            let rel = self.child(parent, name)?;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(mode)
                .open(self.real(&rel))
                .map_err(errno)?;
            let ino = Self::ino_for(&mut self.st(), &rel);
            let fh = self.open_handle(ino, &rel)?;
            Ok((self.attr(ino, &rel)?, fh))
        })();
        match res {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((_, file)) = self.st().files.get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let st = self.st();
        let backing = file.metadata().map(|m| m.len()).unwrap_or(0);
        let end_of_file = st.dirty.get(&ino.0).map(|d| d.size).unwrap_or(backing);
        let end = (offset + size as u64).min(end_of_file);
        if end <= offset {
            return reply.data(&[]);
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => return reply.error(errno(e)),
            }
        }
        if let Some(d) = st.dirty.get(&ino.0) {
            for (woff, bytes) in &d.writes {
                let (ws, we) = (*woff, *woff + bytes.len() as u64);
                let (s, e) = (ws.max(offset), we.min(end));
                if s < e {
                    buf[(s - offset) as usize..(e - offset) as usize]
                        .copy_from_slice(&bytes[(s - ws) as usize..(e - ws) as usize]);
                }
            }
        }
        reply.data(&buf);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut st = self.st();
        let Some((_, file)) = st.files.get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let backing = file.metadata().map(|m| m.len()).unwrap_or(0);
        let d = st.dirty.entry(ino.0).or_insert(Dirty {
            writes: Vec::new(),
            size: backing,
        });
        d.size = d.size.max(offset + data.len() as u64);
        d.writes.push((offset, data.to_vec()));
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() syncs nothing.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.st().files.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some((_, file)) = self.st().files.get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        match self.sync(ino.0, &file) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
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
        let Some((_, file)) = self.st().files.get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        use std::os::fd::AsRawFd;
        // SAFETY: fallocate(2) on an open descriptor we own.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, length as i64) };
        if r == 0 {
            reply.ok()
        } else {
            reply.error(errno(std::io::Error::last_os_error()))
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let rel = match self.path_of(ino) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let listing = match std::fs::read_dir(self.real(&rel)) {
            Ok(l) => l,
            Err(e) => return reply.error(errno(e)),
        };
        let mut entries = vec![
            (ino.0, FileType::Directory, ".".into()),
            (1, FileType::Directory, "..".into()),
        ];
        for e in listing.flatten() {
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => FileType::Directory,
                Ok(t) if t.is_symlink() => FileType::Symlink,
                _ => FileType::RegularFile,
            };
            let crel = rel.join(e.file_name());
            let cino = Self::ino_for(&mut self.st(), &crel);
            entries.push((cino, kind, e.file_name()));
        }
        for (i, (cino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(cino), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Metadata is already in the backing directory.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let path = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()).expect("path");
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a properly sized out-parameter.
        if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
            return reply.error(errno(std::io::Error::last_os_error()));
        }
        reply.statfs(
            s.f_blocks as u64,
            s.f_bfree as u64,
            s.f_bavail as u64,
            s.f_files as u64,
            s.f_ffree as u64,
            s.f_bsize as u32,
            255,
            s.f_frsize as u32,
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: lazyfs BACKING MOUNTPOINT");
        std::process::exit(2);
    }
    let fs = LazyFs {
        root: PathBuf::from(&args[1]),
        state: Mutex::default(),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![fuser::MountOption::FSName("lazyfs".into())];
    let session = match fuser::Session::new(fs, Path::new(&args[2]), &config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lazyfs: cannot mount at {}: {e}", args[2]);
            std::process::exit(1);
        }
    };
    if let Err(e) = session.run() {
        eprintln!("lazyfs: {e}");
        std::process::exit(1);
    }
}
