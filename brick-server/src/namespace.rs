//! The replicated namespace: how each metadata operation changes inodes and dentries, and how
//! queries read them. Pure logic over a key-value view, so it runs the same under Raft on
//! RocksDB and in unit tests on a map. An operation either succeeds with all its writes or
//! fails with none: writes collect in a [`Txn`] that is discarded on error.

pub use crate::store::Rows;
use mortar_proto::attrs::check_content;
use mortar_proto::wire::{
    Inval, Listed, MetaOk, MetaOp, OpId, Query, RefCursor, LIST_WHOLE_BYTES, LOOKUP_WHOLE_MAX,
    ONCE_WINDOW,
};
use mortar_proto::wire::{RENAME_EXCHANGE, RENAME_NOREPLACE};
use mortar_proto::{
    is_root, root_of, validate_name, validate_symlink_target, volume_of, ChunkId, Content,
    DirEntry, FileKind, FsError, Inode, InodeId, Timestamp, VolumeConfig, VolumeNo,
    INO_IN_VOLUME_MAX,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which part of the namespace a key belongs to (one column family each on a brick).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Table {
    Inodes,
    Dentries,
    Sys,
    /// Rows kept for snapshots ([`snapshots`]).
    Snap,
}

pub const TABLES: [Table; 4] = [Table::Inodes, Table::Dentries, Table::Sys, Table::Snap];

/// Read access to committed namespace state.
pub trait MetaRead {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, FsError>;
    /// Keys with `prefix`, after `after` (exclusive), up to `limit`, in key order.
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Rows, FsError>;
}

/// How an inode is stored: the client-visible inode plus, for directories, the parent (for
/// rename loop checks).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    inode: Inode,
    parent: InodeId,
}

mod clones;
pub mod snapshots;
mod volume;
pub use volume::rebalance;

const KEY_VOLUME: &[u8] = b"volume";
const KEY_REBALANCE: &[u8] = b"rebalance";
const KEY_NEXT_INO: &[u8] = b"next_ino";
const KEY_INODE_COUNT: &[u8] = b"inode_count";
const KEY_HEAL_LEASE: &[u8] = b"heal_lease";
/// `released/<chunk id>` -> when a file stopped naming the chunk (garbage collection waits a
/// grace period after that).
const PREFIX_RELEASED: &[u8] = b"released/";
/// Delegated directories: `deleg/<dir>` → (holder client, parent).
const PREFIX_DELEGATED: &[u8] = b"deleg/";

/// `once/<client><seq>` -> the outcome of that client's change, for answering its retries.
const PREFIX_ONCE: &[u8] = b"once/";
/// Most inode numbers one ReserveInodes hands out.
pub const MAX_RESERVE: u32 = 1 << 16;

/// Where `volume`'s next inode number is kept: `next_ino` for the volume the bricks were made
/// with (as before clones existed), `next_ino/<volume>` for a clone.
fn next_ino_key(volume: VolumeNo) -> Vec<u8> {
    match volume {
        0 => KEY_NEXT_INO.to_vec(),
        v => [KEY_NEXT_INO, b"/", &v.to_be_bytes()].concat(),
    }
}

/// A clone's inode count (`inode_count` counts every volume's).
fn inode_count_key(volume: VolumeNo) -> Vec<u8> {
    [KEY_INODE_COUNT, b"/", &volume.to_be_bytes()].concat()
}

/// The inodes of `volume`.
fn inodes_of<R: MetaRead>(txn: &Txn<'_, R>, volume: VolumeNo) -> Result<u64, FsError> {
    if volume != 0 {
        return Ok(u64_of(txn.get(Table::Sys, &inode_count_key(volume))?));
    }
    let mut count = u64_of(txn.get(Table::Sys, KEY_INODE_COUNT)?);
    for c in volume::clone_records(txn.base)? {
        count = count.saturating_sub(u64_of(txn.get(Table::Sys, &inode_count_key(c.volume))?));
    }
    Ok(count)
}

fn once_key(id: &OpId) -> Vec<u8> {
    let mut k = PREFIX_ONCE.to_vec();
    k.extend_from_slice(&id.client.to_be_bytes());
    k.extend_from_slice(&id.seq.to_be_bytes());
    k
}

/// The bytes a whole inode adds to an answer, when it is a regular file small enough to be
/// answered whole: inline content, or a chunked file's chunk map, plus xattrs, up to
/// [`LOOKUP_WHOLE_MAX`]. With the map, opening a large file asks the namespace nothing more.
fn whole_bytes(inode: &Inode) -> Option<usize> {
    let bytes = match &inode.content {
        Content::Inline(b) => b.len(),
        Content::Chunks(m) => m.wire_bytes(),
        _ => return None,
    } + inode.xattr_bytes();
    (inode.attr.kind == FileKind::Regular && bytes <= LOOKUP_WHOLE_MAX).then_some(bytes)
}

/// The name `op` creates, if it creates one: a file's, a snapshot's (a restore makes its undo
/// snapshot) or a clone's.
pub fn creates_name(op: &MetaOp) -> Option<&[u8]> {
    match op {
        MetaOp::Mknod { name, .. } | MetaOp::Mkdir { name, .. } | MetaOp::Symlink { name, .. } => {
            Some(name)
        }
        MetaOp::CreateSnapshot { name, .. }
        | MetaOp::RestoreSnapshot { undo: name, .. }
        | MetaOp::RestorePath { undo: name, .. }
        | MetaOp::CloneSnapshot { name, .. } => Some(name.as_bytes()),
        _ => None,
    }
}

/// Rows read at a time; tiny in unit tests, so their namespaces span many pages.
const PAGE: usize = if cfg!(test) { 3 } else { 1024 };

/// Every row of `table` under `prefix`, in key order, a page at a time.
fn each_row<R: MetaRead>(
    r: &R,
    table: Table,
    prefix: &[u8],
    mut f: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), FsError>,
) -> Result<(), FsError> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let rows = r.scan(table, prefix, after.as_deref(), PAGE)?;
        let full = rows.len() == PAGE;
        after = rows.last().map(|(k, _)| k.clone());
        for (k, v) in rows {
            f(k, v)?;
        }
        if !full {
            return Ok(());
        }
    }
}

/// Every value stored under `prefix` of the volume's own rows (snapshot and clone records),
/// decoded, in key order.
fn records<R: MetaRead, T: serde::de::DeserializeOwned>(
    r: &R,
    prefix: &[u8],
) -> Result<Vec<T>, FsError> {
    let mut out = Vec::new();
    each_row(r, Table::Sys, prefix, |_, v| {
        out.push(dec(&v)?);
        Ok(())
    })?;
    Ok(out)
}

/// The outcome of [`apply_once`].
pub struct Once {
    pub result: Result<MetaOk, FsError>,
    /// The change was applied before: `result` is what was remembered of it.
    pub replayed: bool,
}

/// Apply a change at most once per [`OpId`]. Leaves in `txn` exactly the writes to commit: the
/// change's (only if it succeeded) and the remembered outcome (either way), so a retry after a
/// lost answer or a leader change gets the first outcome instead of, say, EEXIST.
pub fn apply_once<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    op: &MetaOp,
    once: Option<OpId>,
    now: Timestamp,
) -> Once {
    if let Some(id) = &once {
        let stored = txn.get(Table::Sys, &once_key(id)).and_then(|b| match b {
            Some(b) => dec::<Result<MetaOk, FsError>>(&b).map(Some),
            None => Ok(None),
        });
        match stored {
            Ok(Some(result)) => {
                txn.writes.clear();
                return Once {
                    result,
                    replayed: true,
                };
            }
            Ok(None) => {}
            Err(e) => {
                return Once {
                    result: Err(e),
                    replayed: false,
                }
            }
        }
    }
    let out = apply(txn, op, now).and_then(|ok| {
        // A dropped clone's rows are read by no snapshot: its own go with it, and no other
        // volume's snapshot reads its keys.
        if !matches!(op, MetaOp::DropClone { .. }) {
            snapshots::keep_overwritten(txn)?;
        }
        Ok(ok)
    });
    if out.is_err() {
        txn.writes.clear();
    }
    if let Some(id) = once {
        txn.put(Table::Sys, &once_key(&id), enc(&out));
        if let Some(old) = id.seq.checked_sub(ONCE_WINDOW) {
            txn.delete(Table::Sys, &once_key(&OpId { seq: old, ..id }));
        }
    }
    Once {
        result: out,
        replayed: false,
    }
}

fn released_key(id: &ChunkId) -> Vec<u8> {
    let mut k = PREFIX_RELEASED.to_vec();
    k.extend_from_slice(&id.0);
    k
}

fn content_chunks(c: &Content) -> impl Iterator<Item = &ChunkId> {
    match c {
        Content::Chunks(m) => Some(m.ids()),
        _ => None,
    }
    .into_iter()
    .flatten()
}

fn ino_key(ino: InodeId) -> [u8; 8] {
    ino.to_be_bytes()
}

fn dentry_key(parent: InodeId, name: &[u8]) -> Vec<u8> {
    let mut k = parent.to_be_bytes().to_vec();
    k.extend_from_slice(name);
    k
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    mortar_proto::wire::encode(v)
}

fn dec<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, FsError> {
    mortar_proto::wire::decode(b).map_err(|e| FsError::Io(format!("stored value: {e}")))
}

fn u64_of(b: Option<Vec<u8>>) -> u64 {
    b.and_then(|v| v.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// What a transaction's writes modify, as clients cache it: inodes and directory entries.
pub fn touched(writes: &BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>) -> Vec<Inval> {
    writes
        .keys()
        .filter_map(|(table, key)| match table {
            Table::Inodes => Some(Inval::Inode(u64_of(Some(key.clone())))),
            Table::Dentries if key.len() >= 8 => {
                let (parent, name) = key.split_at(8);
                Some(Inval::Entry(u64_of(Some(parent.to_vec())), name.to_vec()))
            }
            // Mounts apply options and layouts as they change.
            Table::Sys if key == KEY_VOLUME => Some(Inval::Volume),
            _ => None,
        })
        .collect()
}

/// The directories a transaction modified, as they are after it: the client that made the
/// change keeps them, so the kernel's next permission check on the parent, and xattr reads of
/// the directory, need no round trip.
pub fn fresh_dirs(writes: &BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>) -> Vec<Inode> {
    writes
        .iter()
        .filter_map(|((table, _), value)| match (table, value) {
            (Table::Inodes, Some(v)) => dec::<Stored>(v).ok(),
            _ => None,
        })
        .map(|s| s.inode)
        .filter(|i| i.attr.kind == FileKind::Directory)
        .collect()
}

/// Writes of one operation, readable before they are committed.
pub struct Txn<'a, R: MetaRead> {
    base: &'a R,
    pub writes: BTreeMap<(Table, Vec<u8>), Option<Vec<u8>>>,
    /// The inode number the create being applied must use (a [`MetaOp::Local`] create).
    chosen: Option<InodeId>,
    /// The log index of the change being applied (recorded by snapshots).
    pub index: u64,
}

impl<'a, R: MetaRead> Txn<'a, R> {
    pub fn new(base: &'a R) -> Self {
        Txn {
            base,
            writes: BTreeMap::new(),
            chosen: None,
            index: 0,
        }
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, FsError> {
        match self.writes.get(&(table, key.to_vec())) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(table, key),
        }
    }
    fn put(&mut self, table: Table, key: &[u8], value: Vec<u8>) {
        self.writes.insert((table, key.to_vec()), Some(value));
    }
    fn delete(&mut self, table: Table, key: &[u8]) {
        self.writes.insert((table, key.to_vec()), None);
    }

    fn stored(&self, ino: InodeId) -> Result<Stored, FsError> {
        match self.get(Table::Inodes, &ino_key(ino))? {
            Some(b) => dec(&b),
            None => Err(FsError::NotFound),
        }
    }
    fn save(&mut self, s: &Stored) {
        self.put(Table::Inodes, &ino_key(s.inode.attr.ino), enc(s));
    }
    fn dir(&self, ino: InodeId) -> Result<Stored, FsError> {
        let s = self.stored(ino)?;
        if s.inode.attr.kind != FileKind::Directory {
            return Err(FsError::NotDir);
        }
        Ok(s)
    }
    fn child(&self, parent: InodeId, name: &[u8]) -> Result<Option<InodeId>, FsError> {
        Ok(self
            .get(Table::Dentries, &dentry_key(parent, name))?
            .map(|b| u64_of(Some(b))))
    }
    fn set_child(&mut self, parent: InodeId, name: &[u8], ino: InodeId) {
        self.put(
            Table::Dentries,
            &dentry_key(parent, name),
            ino.to_be_bytes().to_vec(),
        );
    }
    fn is_empty_dir(&self, ino: InodeId) -> Result<bool, FsError> {
        // Entries removed in this transaction do not count; entries added do.
        let prefix = ino.to_be_bytes();
        let added = self
            .writes
            .iter()
            .any(|((t, k), v)| *t == Table::Dentries && k.starts_with(&prefix) && v.is_some());
        if added {
            return Ok(false);
        }
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .base
                .scan(Table::Dentries, &prefix, after.as_deref(), 64)?;
            if page.is_empty() {
                return Ok(true);
            }
            for (k, _) in &page {
                if !matches!(self.writes.get(&(Table::Dentries, k.clone())), Some(None)) {
                    return Ok(false);
                }
            }
            after = page.last().map(|(k, _)| k.clone());
        }
    }
    /// The next inode number `volume` hands out.
    fn next_ino(&self, volume: VolumeNo) -> Result<InodeId, FsError> {
        Ok(u64_of(self.get(Table::Sys, &next_ino_key(volume))?).max(root_of(volume) + 1))
    }
    /// Hand out `count` inode numbers of `volume` from the next one.
    fn take_inos(&mut self, volume: VolumeNo, count: u64) -> Result<InodeId, FsError> {
        let first = self.next_ino(volume)?;
        if (first & INO_IN_VOLUME_MAX) + count > INO_IN_VOLUME_MAX {
            return Err(FsError::NoSpace(
                "the volume has used every inode number".into(),
            ));
        }
        self.put(
            Table::Sys,
            &next_ino_key(volume),
            (first + count).to_be_bytes().to_vec(),
        );
        Ok(first)
    }
    fn new_ino(&mut self, volume: VolumeNo) -> Result<InodeId, FsError> {
        let ino = match self.chosen.take() {
            // Only a number of this volume handed out by ReserveInodes and not in use.
            Some(ino) => {
                if volume_of(ino) != volume
                    || is_root(ino)
                    || ino >= self.next_ino(volume)?
                    || self.stored(ino).is_ok()
                {
                    return Err(FsError::Invalid(format!(
                        "inode number {ino} was not reserved or is in use"
                    )));
                }
                ino
            }
            None => self.take_inos(volume, 1)?,
        };
        self.add_inodes(volume, 1)?;
        Ok(ino)
    }
    /// Count `delta` more inodes in `volume`: the bricks' count (statfs) and, for a clone,
    /// its own.
    fn add_inodes(&mut self, volume: VolumeNo, delta: i64) -> Result<(), FsError> {
        let mut keys = vec![KEY_INODE_COUNT.to_vec()];
        if volume != 0 {
            keys.push(inode_count_key(volume));
        }
        for key in keys {
            let count = u64_of(self.get(Table::Sys, &key)?).saturating_add_signed(delta);
            self.put(Table::Sys, &key, count.to_be_bytes().to_vec());
        }
        Ok(())
    }
    /// Record when chunks of `old` that `new` no longer names were let go.
    fn release(&mut self, old: &Content, new: Option<&Content>, now: Timestamp) {
        let kept: std::collections::HashSet<&ChunkId> =
            new.map(|c| content_chunks(c).collect()).unwrap_or_default();
        for id in content_chunks(old) {
            if !kept.contains(id) {
                self.put(Table::Sys, &released_key(id), enc(&now));
            }
        }
    }
    /// Drop one link; free the inode when none is left.
    fn drop_link(&mut self, mut s: Stored, now: Timestamp) -> Result<(), FsError> {
        let dir = s.inode.attr.kind == FileKind::Directory;
        if dir || s.inode.attr.nlink <= 1 {
            self.release(&s.inode.content, None, now);
            self.delete(Table::Inodes, &ino_key(s.inode.attr.ino));
            self.add_inodes(volume_of(s.inode.attr.ino), -1)?;
        } else {
            s.inode.attr.nlink -= 1;
            s.inode.attr.ctime = now;
            self.save(&s);
        }
        Ok(())
    }
    fn touch_dir(&mut self, ino: InodeId, nlink_delta: i32, now: Timestamp) -> Result<(), FsError> {
        let mut d = self.stored(ino)?;
        d.inode.attr.touch_dir(nlink_delta, now);
        self.save(&d);
        Ok(())
    }
    fn volume(&self) -> Result<VolumeConfig, FsError> {
        match self.get(Table::Sys, KEY_VOLUME)? {
            Some(b) => dec(&b),
            None => Err(FsError::NoVolume),
        }
    }
}

/// The new inode and entry of a create whose checks passed.
fn make_entry<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    op: &MetaOp,
    now: Timestamp,
) -> Result<MetaOk, FsError> {
    let parent = match op {
        MetaOp::Mknod { parent, .. }
        | MetaOp::Mkdir { parent, .. }
        | MetaOp::Symlink { parent, .. } => *parent,
        _ => return Err(FsError::Invalid("not a create".into())),
    };
    let ino = txn.new_ino(volume_of(parent))?;
    let (parent, name, inode) =
        Inode::created_by(op, ino, now).ok_or_else(|| FsError::Invalid("not a create".into()))?;
    let attr = inode.attr.clone();
    txn.save(&Stored { inode, parent });
    txn.set_child(parent, name, ino);
    txn.touch_dir(parent, i32::from(attr.kind == FileKind::Directory), now)?;
    Ok(MetaOk::Attr(attr))
}

/// Apply one operation. On error nothing in `txn` may be committed.
pub fn apply<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    op: &MetaOp,
    now: Timestamp,
) -> Result<MetaOk, FsError> {
    match op {
        MetaOp::CreateVolume(config) => volume::create(txn, config, now),
        MetaOp::ReplaceBrick { old, new } => volume::replace(txn, *old, new),
        MetaOp::AddSets(sets) => volume::add_sets(txn, sets),
        MetaOp::SettleLayout { epoch } => volume::settle(txn, *epoch),
        MetaOp::DrainSet { set } => volume::drain_set(txn, *set),
        MetaOp::RemoveSet { set } => volume::remove_set(txn, *set),
        MetaOp::Rebalance(state) => volume::record_rebalance(txn, state),
        MetaOp::CreateSnapshot { name, keep } => snapshots::create(txn, name, *keep, now),
        MetaOp::DeleteSnapshot { name } => snapshots::delete(txn, name, now),
        MetaOp::RestoreSnapshot { name, undo } => snapshots::restore(txn, name, undo, now),
        MetaOp::RestorePath { name, undo, path } => {
            snapshots::restore_path(txn, name, undo, path, now)
        }
        MetaOp::CloneSnapshot { snapshot, name } => clones::create(txn, snapshot, name, now),
        MetaOp::DropClone { name } => clones::drop(txn, name, now),
        MetaOp::SetOption { key, value } => volume::set_option(txn, key, value.as_deref()),
        MetaOp::SetStopped { stopped } => volume::set_stopped(txn, *stopped),
        MetaOp::Revoke(r) => volume::revoke(txn, r),
        MetaOp::Mknod {
            parent,
            name,
            kind,
            exclusive,
            ..
        } => {
            validate_name(name)?;
            if *kind == FileKind::Directory || *kind == FileKind::Symlink {
                return Err(FsError::Invalid(
                    "mknod cannot make directories or symlinks".into(),
                ));
            }
            txn.dir(*parent)?;
            if let Some(existing) = txn.child(*parent, name)? {
                let s = txn.stored(existing)?;
                if *exclusive
                    || s.inode.attr.kind != FileKind::Regular
                    || *kind != FileKind::Regular
                {
                    return Err(FsError::Exists);
                }
                return Ok(MetaOk::Attr(s.inode.attr));
            }
            make_entry(txn, op, now)
        }
        MetaOp::Mkdir { parent, name, .. } | MetaOp::Symlink { parent, name, .. } => {
            validate_name(name)?;
            if let MetaOp::Symlink { target, .. } = op {
                validate_symlink_target(target)?;
            }
            txn.dir(*parent)?;
            if txn.child(*parent, name)?.is_some() {
                return Err(FsError::Exists);
            }
            make_entry(txn, op, now)
        }
        MetaOp::Link {
            ino,
            new_parent,
            new_name,
        } => {
            validate_name(new_name)?;
            let mut s = txn.stored(*ino)?;
            if s.inode.attr.kind == FileKind::Directory {
                return Err(FsError::NotPermitted("hard links to directories".into()));
            }
            txn.dir(*new_parent)?;
            same_volume(*ino, *new_parent)?;
            if txn.child(*new_parent, new_name)?.is_some() {
                return Err(FsError::Exists);
            }
            s.inode.attr.nlink += 1;
            s.inode.attr.ctime = now;
            txn.save(&s);
            txn.set_child(*new_parent, new_name, *ino);
            txn.touch_dir(*new_parent, 0, now)?;
            Ok(MetaOk::Attr(s.inode.attr))
        }
        MetaOp::Unlink { parent, name } => {
            validate_name(name)?;
            txn.dir(*parent)?;
            let ino = txn.child(*parent, name)?.ok_or(FsError::NotFound)?;
            let s = txn.stored(ino)?;
            if s.inode.attr.kind == FileKind::Directory {
                return Err(FsError::IsDir);
            }
            txn.delete(Table::Dentries, &dentry_key(*parent, name));
            txn.drop_link(s, now)?;
            txn.touch_dir(*parent, 0, now)?;
            Ok(MetaOk::Done)
        }
        MetaOp::Rmdir { parent, name } => {
            validate_name(name)?;
            txn.dir(*parent)?;
            let ino = txn.child(*parent, name)?.ok_or(FsError::NotFound)?;
            let s = txn.stored(ino)?;
            if s.inode.attr.kind != FileKind::Directory {
                return Err(FsError::NotDir);
            }
            if !txn.is_empty_dir(ino)? {
                return Err(FsError::NotEmpty);
            }
            txn.delete(Table::Dentries, &dentry_key(*parent, name));
            txn.drop_link(s, now)?;
            txn.touch_dir(*parent, -1, now)?;
            Ok(MetaOk::Done)
        }
        MetaOp::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
        } => rename(txn, *parent, name, *new_parent, new_name, *flags, now),
        MetaOp::SetAttr { ino, set } => {
            let mut s = txn.stored(*ino)?;
            s.inode.set_attr(set, now);
            txn.save(&s);
            Ok(MetaOk::Attr(s.inode.attr))
        }
        MetaOp::SetXattr {
            ino,
            name,
            value,
            mode,
        } => {
            let mut s = txn.stored(*ino)?;
            s.inode.set_xattr(name, value, *mode, now)?;
            txn.save(&s);
            Ok(MetaOk::Done)
        }
        MetaOp::RemoveXattr { ino, name } => {
            let mut s = txn.stored(*ino)?;
            s.inode.remove_xattr(name, now)?;
            txn.save(&s);
            Ok(MetaOk::Done)
        }
        MetaOp::SetContent {
            ino,
            expect_version,
            size,
            content,
        } => {
            let mut s = txn.stored(*ino)?;
            match s.inode.attr.kind {
                FileKind::Regular => {}
                FileKind::Directory => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("not a regular file".into())),
            }
            if s.inode.attr.version != *expect_version {
                return Err(FsError::Conflict(s.inode.attr.version));
            }
            check_content(*size, content)?;
            txn.release(&s.inode.content, Some(content), now);
            s.inode.set_content(*size, content.clone(), now);
            txn.save(&s);
            Ok(MetaOk::Attr(s.inode.attr))
        }
        MetaOp::PatchContent {
            ino,
            expect_version,
            size,
            patch,
        } => {
            let mut s = txn.stored(*ino)?;
            if s.inode.attr.kind != FileKind::Regular {
                return Err(FsError::Invalid("not a regular file".into()));
            }
            if s.inode.attr.version != *expect_version {
                return Err(FsError::Conflict(s.inode.attr.version));
            }
            let Content::Chunks(map) = &s.inode.content else {
                return Err(FsError::Invalid(
                    "a chunk patch applies to a file held in chunks".into(),
                ));
            };
            let mut map = map.clone();
            map.apply(patch);
            let content = Content::Chunks(map);
            check_content(*size, &content)?;
            txn.release(&s.inode.content, Some(&content), now);
            s.inode.set_content(*size, content, now);
            txn.save(&s);
            Ok(MetaOk::Attr(s.inode.attr))
        }
        MetaOp::HealLease { holder, ttl_secs } => {
            let current: Option<(String, Timestamp)> = match txn.get(Table::Sys, KEY_HEAL_LEASE)? {
                Some(b) => Some(dec(&b)?),
                None => None,
            };
            if let Some((other, until)) = &current {
                if other != holder && *until > now {
                    return Err(FsError::Busy(format!(
                        "heal run '{other}' holds the volume's heal lease for {} more seconds",
                        until.secs - now.secs
                    )));
                }
            }
            if *ttl_secs == 0 {
                if current.is_some() {
                    txn.delete(Table::Sys, KEY_HEAL_LEASE);
                }
            } else {
                let until = Timestamp {
                    secs: now.secs + *ttl_secs as i64,
                    nanos: now.nanos,
                };
                txn.put(Table::Sys, KEY_HEAL_LEASE, enc(&(holder.clone(), until)));
            }
            Ok(MetaOk::Done)
        }
        MetaOp::Batch(ops) => {
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                match op {
                    MetaOp::SetContent { .. }
                    | MetaOp::PatchContent { .. }
                    | MetaOp::SetAttr { .. }
                    | MetaOp::SetXattr { .. }
                    | MetaOp::Local { .. } => results.push(apply(txn, op, now)?),
                    _ => {
                        return Err(FsError::Invalid(
                            "only content, attribute and xattr changes and local changes may be batched".into(),
                        ))
                    }
                }
            }
            Ok(MetaOk::Batch(results))
        }
        MetaOp::ReserveInodes { count } => reserve_inodes(txn, 0, *count),
        MetaOp::ReserveInodesIn { volume, count } => {
            if *volume != 0 {
                volume::clone_by_number(txn.base, *volume)?;
            }
            reserve_inodes(txn, *volume, *count)
        }
        MetaOp::Local { at, ino, op } => {
            let create = match **op {
                MetaOp::Mknod {
                    kind, exclusive, ..
                } => {
                    if !exclusive || !kind.mknod_under_delegation() {
                        return Err(FsError::Invalid(
                            "a local mknod makes a new regular file or FIFO".into(),
                        ));
                    }
                    true
                }
                MetaOp::Mkdir { .. } | MetaOp::Symlink { .. } => true,
                MetaOp::SetAttr { .. }
                | MetaOp::SetXattr { .. }
                | MetaOp::RemoveXattr { .. }
                | MetaOp::SetContent { .. }
                | MetaOp::SetInode { .. }
                | MetaOp::Unlink { .. }
                | MetaOp::Rmdir { .. }
                | MetaOp::Rename { .. } => false,
                _ => {
                    return Err(FsError::Invalid(
                        "only creates, removals, renames and file changes may be made locally"
                            .into(),
                    ))
                }
            };
            if create != ino.is_some() {
                return Err(FsError::Invalid(
                    "a local create names its inode number; nothing else does".into(),
                ));
            }
            if let MetaOp::SetInode {
                expect_version,
                inode,
            } = &**op
            {
                let mut s = txn.stored(inode.attr.ino)?;
                let before = s.inode.content.clone();
                s.inode.set_whole(*expect_version, inode)?;
                txn.release(&before, Some(&s.inode.content), *at);
                txn.save(&s);
                return Ok(MetaOk::Attr(s.inode.attr));
            }
            txn.chosen = *ino;
            let out = apply(txn, op, *at);
            txn.chosen = None;
            out
        }
        MetaOp::SetInode { .. } => Err(FsError::Invalid(
            "a whole inode is set only as a change made under a delegation".into(),
        )),
        MetaOp::ForgetReleased(ids) => {
            for id in ids {
                txn.delete(Table::Sys, &released_key(id));
            }
            Ok(MetaOk::Done)
        }
        MetaOp::Delegated {
            dir,
            parent,
            client,
        } => {
            txn.put(Table::Sys, &delegated_key(*dir), enc(&(*client, *parent)));
            Ok(MetaOk::Done)
        }
        MetaOp::Undelegated { dir } => {
            txn.delete(Table::Sys, &delegated_key(*dir));
            Ok(MetaOk::Done)
        }
    }
}

fn delegated_key(dir: InodeId) -> Vec<u8> {
    let mut k = PREFIX_DELEGATED.to_vec();
    k.extend_from_slice(&dir.to_be_bytes());
    k
}

/// A recorded delegation: the directory, its holder, its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub dir: InodeId,
    pub client: u128,
    pub parent: InodeId,
}

/// Every delegation recorded in the namespace (a new leader starts from these).
pub fn delegations<R: MetaRead>(r: &R) -> Result<Vec<Recorded>, FsError> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = r.scan(Table::Sys, PREFIX_DELEGATED, after.as_deref(), 1024)?;
        let Some((last, _)) = page.last() else {
            return Ok(out);
        };
        after = Some(last.clone());
        for (k, v) in &page {
            let dir = k[PREFIX_DELEGATED.len()..]
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| FsError::Io("delegation key is not an inode number".into()))?;
            let (client, parent) = dec(v)?;
            out.push(Recorded {
                dir,
                client,
                parent,
            });
        }
    }
}

fn rename<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    parent: InodeId,
    name: &[u8],
    new_parent: InodeId,
    new_name: &[u8],
    flags: u32,
    now: Timestamp,
) -> Result<MetaOk, FsError> {
    validate_name(name)?;
    validate_name(new_name)?;
    if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
        || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
    {
        return Err(FsError::Invalid(format!("rename flags {flags:#x}")));
    }
    txn.dir(parent)?;
    txn.dir(new_parent)?;
    same_volume(parent, new_parent)?;
    let src_ino = txn.child(parent, name)?.ok_or(FsError::NotFound)?;
    let src = txn.stored(src_ino)?;
    let dst_ino = txn.child(new_parent, new_name)?;
    let src_is_dir = src.inode.attr.kind == FileKind::Directory;

    // A directory must not move below itself.
    let would_loop = |txn: &Txn<'_, R>, moving: InodeId, into: InodeId| -> Result<bool, FsError> {
        let mut cur = into;
        loop {
            if cur == moving {
                return Ok(true);
            }
            if is_root(cur) {
                return Ok(false);
            }
            cur = txn.stored(cur)?.parent;
        }
    };

    if flags & RENAME_EXCHANGE != 0 {
        let dst_ino = dst_ino.ok_or(FsError::NotFound)?;
        if dst_ino == src_ino {
            return Ok(MetaOk::Done);
        }
        let dst = txn.stored(dst_ino)?;
        let dst_is_dir = dst.inode.attr.kind == FileKind::Directory;
        if (src_is_dir && would_loop(txn, src_ino, new_parent)?)
            || (dst_is_dir && would_loop(txn, dst_ino, parent)?)
        {
            return Err(FsError::Invalid(
                "cannot move a directory below itself".into(),
            ));
        }
        txn.set_child(parent, name, dst_ino);
        txn.set_child(new_parent, new_name, src_ino);
        for (mut s, to) in [(src, new_parent), (dst, parent)] {
            s.inode.attr.ctime = now;
            if s.inode.attr.kind == FileKind::Directory {
                s.parent = to;
            }
            txn.save(&s);
        }
        if parent != new_parent && src_is_dir != dst_is_dir {
            let d = if src_is_dir { 1 } else { -1 };
            txn.touch_dir(new_parent, d, now)?;
            txn.touch_dir(parent, -d, now)?;
        } else {
            txn.touch_dir(parent, 0, now)?;
            txn.touch_dir(new_parent, 0, now)?;
        }
        return Ok(MetaOk::Done);
    }

    if let Some(dst_ino) = dst_ino {
        if flags & RENAME_NOREPLACE != 0 {
            return Err(FsError::Exists);
        }
        if dst_ino == src_ino {
            // Two names of one inode: POSIX says do nothing.
            return Ok(MetaOk::Done);
        }
        let dst = txn.stored(dst_ino)?;
        let dst_is_dir = dst.inode.attr.kind == FileKind::Directory;
        match (src_is_dir, dst_is_dir) {
            (true, false) => return Err(FsError::NotDir),
            (false, true) => return Err(FsError::IsDir),
            (true, true) if !txn.is_empty_dir(dst_ino)? => return Err(FsError::NotEmpty),
            _ => {}
        }
        if src_is_dir && would_loop(txn, src_ino, new_parent)? {
            return Err(FsError::Invalid(
                "cannot move a directory below itself".into(),
            ));
        }
        txn.drop_link(dst, now)?;
        if dst_is_dir {
            txn.touch_dir(new_parent, -1, now)?;
        }
    } else if src_is_dir && would_loop(txn, src_ino, new_parent)? {
        return Err(FsError::Invalid(
            "cannot move a directory below itself".into(),
        ));
    }

    txn.delete(Table::Dentries, &dentry_key(parent, name));
    txn.set_child(new_parent, new_name, src_ino);
    let mut moved = txn.stored(src_ino)?;
    moved.inode.attr.ctime = now;
    if src_is_dir {
        moved.parent = new_parent;
    }
    txn.save(&moved);
    let d = if src_is_dir && parent != new_parent {
        1
    } else {
        0
    };
    txn.touch_dir(parent, -d, now)?;
    txn.touch_dir(new_parent, d, now)?;
    Ok(MetaOk::Done)
}

fn reserve_inodes<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    volume: VolumeNo,
    count: u32,
) -> Result<MetaOk, FsError> {
    if !(1..=MAX_RESERVE).contains(&count) {
        return Err(FsError::Invalid(format!(
            "reserve between 1 and {MAX_RESERVE} inode numbers, not {count}"
        )));
    }
    let first = txn.take_inos(volume, u64::from(count))?;
    Ok(MetaOk::Inodes { first, count })
}

/// Renames and links stay within one volume: a clone shares its origin's bricks, not its tree.
fn same_volume(a: InodeId, b: InodeId) -> Result<(), FsError> {
    if volume_of(a) == volume_of(b) {
        Ok(())
    } else {
        Err(FsError::CrossDevice(
            "a volume and its clone are separate trees".into(),
        ))
    }
}

/// Answer a read from committed state.
pub fn query<R: MetaRead>(r: &R, q: &Query) -> Result<MetaOk, FsError> {
    match q {
        Query::Snapshots => Ok(MetaOk::Snapshots(snapshots::list(r)?)),
        Query::Clones => Ok(MetaOk::Clones(volume::clone_records(r)?)),
        Query::InSnapshot { name, query } if query.reads_files() => {
            read(&snapshots::SnapView::open(r, name)?, query)
        }
        _ => read(r, q),
    }
}

/// Answer a namespace read from `r` (the live namespace or a snapshot's).
fn read<R: MetaRead>(r: &R, q: &Query) -> Result<MetaOk, FsError> {
    let txn = Txn::new(r);
    match q {
        Query::Lookup { parent, name } => {
            validate_name(name)?;
            txn.dir(*parent)?;
            let ino = txn.child(*parent, name)?.ok_or(FsError::NotFound)?;
            Ok(MetaOk::Attr(txn.stored(ino)?.inode.attr))
        }
        Query::LookupWhole { parent, name } => {
            validate_name(name)?;
            txn.dir(*parent)?;
            let ino = txn.child(*parent, name)?.ok_or(FsError::NotFound)?;
            let inode = txn.stored(ino)?.inode;
            Ok(if whole_bytes(&inode).is_some() {
                MetaOk::Inode(inode)
            } else {
                MetaOk::Attr(inode.attr)
            })
        }
        Query::ListWhole { dir, limit } => {
            txn.dir(*dir)?;
            let limit = (*limit).clamp(1, 4096) as usize;
            let rows = r.scan(Table::Dentries, &dir.to_be_bytes(), None, limit + 1)?;
            let complete = rows.len() <= limit;
            let mut budget = LIST_WHOLE_BYTES;
            let mut entries = Vec::with_capacity(rows.len().min(limit));
            for (k, v) in rows.into_iter().take(limit) {
                let Ok(s) = txn.stored(u64_of(Some(v))) else {
                    continue;
                };
                let whole = match whole_bytes(&s.inode) {
                    Some(n) if n <= budget => {
                        budget -= n;
                        Some(s.inode.clone())
                    }
                    _ => None,
                };
                entries.push(Listed {
                    name: k[8..].to_vec(),
                    attr: s.inode.attr,
                    whole,
                });
            }
            Ok(MetaOk::Listed { entries, complete })
        }
        Query::GetAttr { ino } => Ok(MetaOk::Attr(txn.stored(*ino)?.inode.attr)),
        Query::GetInode { ino } => Ok(MetaOk::Inode(txn.stored(*ino)?.inode)),
        Query::ReadDir { ino, after, limit } => {
            txn.dir(*ino)?;
            let prefix = ino.to_be_bytes();
            let after_key = after.as_ref().map(|n| dentry_key(*ino, n));
            let limit = (*limit).clamp(1, 4096) as usize;
            let mut out = Vec::new();
            for (k, v) in r.scan(Table::Dentries, &prefix, after_key.as_deref(), limit)? {
                let child = u64_of(Some(v));
                // A dentry whose inode vanished would be a bug; skip rather than fail the listing.
                if let Ok(s) = txn.stored(child) {
                    out.push(DirEntry {
                        name: k[8..].to_vec(),
                        attr: s.inode.attr,
                    });
                }
            }
            Ok(MetaOk::Entries(out))
        }
        Query::Volume => Ok(MetaOk::Volume(txn.volume()?)),
        Query::Rebalance => Ok(MetaOk::Rebalance(volume::rebalance(r)?)),
        Query::StatFs => Err(FsError::Invalid("statfs is answered by the brick".into())),
        Query::Snapshots | Query::InSnapshot { .. } | Query::Clones => Err(FsError::Invalid(
            "only file and directory reads are answered from a snapshot".into(),
        )),
    }
}

/// The inode `name` in `parent` names, if any.
pub fn child_ino<R: MetaRead>(
    r: &R,
    parent: InodeId,
    name: &[u8],
) -> Result<Option<InodeId>, FsError> {
    Txn::new(r).child(parent, name)
}

/// For a delegation: the directory's parent, when `ino` is an empty directory other than the
/// root (None when it is not).
pub fn empty_dir_parent<R: MetaRead>(r: &R, ino: InodeId) -> Result<Option<InodeId>, FsError> {
    let txn = Txn::new(r);
    let s = txn.dir(ino)?;
    Ok((!is_root(ino) && txn.is_empty_dir(ino)?).then_some(s.parent))
}

/// A directory other than the root holding at most `max` entries: its parent and its entries
/// (a delegation with its listing); None for a larger one or the root.
pub fn listed_dir<R: MetaRead>(
    r: &R,
    ino: InodeId,
    max: usize,
) -> Result<Option<(InodeId, Vec<DirEntry>)>, FsError> {
    let txn = Txn::new(r);
    let s = txn.dir(ino)?;
    if is_root(ino) {
        return Ok(None);
    }
    let rows = r.scan(Table::Dentries, &ino.to_be_bytes(), None, max + 1)?;
    if rows.len() > max {
        return Ok(None);
    }
    let mut entries = Vec::with_capacity(rows.len());
    for (k, v) in rows {
        let child = txn.stored(u64_of(Some(v)))?;
        entries.push(DirEntry {
            name: k[8..].to_vec(),
            attr: child.inode.attr,
        });
    }
    Ok(Some((s.parent, entries)))
}

/// Chunks named by up to `limit` live inodes after `after`; at their end, where the kept rows
/// start.
fn live_references<R: MetaRead>(
    r: &R,
    after: Option<InodeId>,
    limit: usize,
) -> Result<(Vec<ChunkId>, Option<RefCursor>), FsError> {
    let after = after.map(ino_key);
    let rows = r.scan(Table::Inodes, &[], after.as_ref().map(|k| &k[..]), limit)?;
    let mut chunks = Vec::new();
    let mut last = None;
    for (_, v) in &rows {
        let s: Stored = dec(v)?;
        chunks.extend(content_chunks(&s.inode.content).copied());
        last = Some(s.inode.attr.ino);
    }
    Ok(if rows.len() == limit {
        (chunks, last.map(RefCursor::Inode))
    } else {
        (chunks, None)
    })
}

/// Chunks named by up to `limit` inodes after `after` — the live ones, then those kept for
/// snapshots —, and where to continue (`None` at the end).
pub fn chunk_references<R: MetaRead>(
    r: &R,
    after: Option<RefCursor>,
    limit: usize,
) -> Result<(Vec<ChunkId>, Option<RefCursor>), FsError> {
    let live_after = match after {
        Some(RefCursor::Kept(k)) => {
            let (kept, next) = snapshots::kept_references(r, Some(&k), limit)?;
            return Ok((kept, next.map(RefCursor::Kept)));
        }
        Some(RefCursor::Inode(ino)) => Some(ino),
        None => None,
    };
    let (mut chunks, next) = live_references(r, live_after, limit)?;
    if next.is_some() {
        return Ok((chunks, next));
    }
    let (kept, next) = snapshots::kept_references(r, None, limit)?;
    chunks.extend(kept);
    Ok((chunks, next.map(RefCursor::Kept)))
}

/// Release records after `after`, up to `limit`: (chunk, when released).
pub fn released<R: MetaRead>(
    r: &R,
    after: Option<&ChunkId>,
    limit: usize,
) -> Result<Vec<(ChunkId, Timestamp)>, FsError> {
    let after = after.map(released_key);
    r.scan(Table::Sys, PREFIX_RELEASED, after.as_deref(), limit)?
        .into_iter()
        .map(|(k, v)| {
            let id = k[PREFIX_RELEASED.len()..]
                .try_into()
                .map(ChunkId)
                .map_err(|_| FsError::Io("release record key is not a chunk id".into()))?;
            Ok((id, dec(&v)?))
        })
        .collect()
}

/// Bytes of file data a change adds to the namespace (inline content, extended attribute
/// values), which a brick down to its disk reserve refuses. Changes made under a delegation
/// ([`MetaOp::Local`]) count nothing: applications already saw them succeed, so they are
/// committed whatever the disk.
pub fn new_data_bytes(op: &MetaOp) -> u64 {
    match op {
        MetaOp::SetContent {
            content: Content::Inline(b),
            ..
        } => b.len() as u64,
        MetaOp::SetXattr { value, .. } => value.len() as u64,
        MetaOp::Batch(ops) => ops.iter().map(new_data_bytes).sum(),
        _ => 0,
    }
}

pub fn inode_count<R: MetaRead>(r: &R) -> Result<u64, FsError> {
    Ok(u64_of(r.get(Table::Sys, KEY_INODE_COUNT)?))
}

/// What snapshot `name` (every snapshot, without a name) holds.
pub fn snapshot_usage<R: MetaRead>(
    r: &R,
    name: Option<&str>,
) -> Result<Vec<mortar_proto::wire::SnapshotUsage>, FsError> {
    let chunk_size = Txn::new(r).volume()?.chunk_size as u64;
    snapshots::usage(r, name, chunk_size)
}

pub fn volume<R: MetaRead>(r: &R) -> Result<Option<VolumeConfig>, FsError> {
    match r.get(Table::Sys, KEY_VOLUME)? {
        Some(b) => Ok(Some(dec(&b)?)),
        None => Ok(None),
    }
}

/// An in-memory namespace for tests.
#[cfg(test)]
#[derive(Default)]
pub struct MemMeta {
    pub data: BTreeMap<(Table, Vec<u8>), Vec<u8>>,
}

#[cfg(test)]
impl MetaRead for MemMeta {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, FsError> {
        Ok(self.data.get(&(table, key.to_vec())).cloned())
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Rows, FsError> {
        Ok(self
            .data
            .range((table, prefix.to_vec())..)
            .take_while(|((t, k), _)| *t == table && k.starts_with(prefix))
            .filter(|((_, k), _)| after.is_none_or(|a| k.as_slice() > a))
            .take(limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
impl MemMeta {
    pub fn run(&mut self, op: MetaOp) -> Result<MetaOk, FsError> {
        let writes = {
            let mut txn = Txn::new(&*self);
            let out = apply_once(&mut txn, &op, None, Timestamp { secs: 1, nanos: 0 }).result;
            match out {
                Ok(ok) => (txn.writes, ok),
                Err(e) => return Err(e),
            }
        };
        for ((t, k), v) in writes.0 {
            match v {
                Some(v) => self.data.insert((t, k), v),
                None => self.data.remove(&(t, k)),
            };
        }
        Ok(writes.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortar_proto::attrs::{acl_mode, ACL_ACCESS, ACL_GROUP_OBJ, ACL_OTHER, ACL_USER_OBJ};
    use mortar_proto::wire::{SetAttr, TimeSet, XattrMode};
    use mortar_proto::{Attr, BrickRef, ReplicaSet, INLINE_MAX, ROOT_INODE};

    pub(in crate::namespace) fn vol() -> MemMeta {
        let mut m = MemMeta::default();
        m.run(MetaOp::CreateVolume(VolumeConfig::new(
            "t",
            1 << 20,
            ReplicaSet::numbered(vec![vec![BrickRef {
                id: 1,
                addr: "a:1".into(),
            }]]),
            Timestamp::default(),
        )))
        .unwrap();
        m
    }
    #[test]
    fn a_replaced_brick_takes_the_seat_and_the_old_one_is_retired_once() {
        let mut m = vol();
        let new = BrickRef {
            id: 2,
            addr: "b:1".into(),
        };
        let replace = |new: &BrickRef| MetaOp::ReplaceBrick {
            old: 1,
            new: new.clone(),
        };
        m.run(replace(&new)).unwrap();
        let v = volume(&m).unwrap().unwrap();
        assert_eq!(
            v.replica_sets,
            ReplicaSet::numbered(vec![vec![new.clone()]])
        );
        let old = BrickRef {
            id: 1,
            addr: "a:1".into(),
        };
        assert_eq!(v.retired, vec![old.clone()]);
        m.run(replace(&new))
            .expect("a retried replacement changes nothing");
        assert_eq!(volume(&m).unwrap().unwrap().retired, vec![old]);
        let other = BrickRef {
            id: 3,
            addr: "c:1".into(),
        };
        assert!(matches!(m.run(replace(&other)), Err(FsError::Invalid(_))));
        let back = MetaOp::ReplaceBrick {
            old: 2,
            new: BrickRef {
                id: 1,
                addr: "a:1".into(),
            },
        };
        assert_eq!(
            m.run(back),
            Err(FsError::Exists),
            "a retired id never comes back"
        );
    }

    #[test]
    fn options_and_the_stopped_state_are_set_checked_and_reset_and_tell_mounts() {
        use mortar_proto::options::ATTR_TIMEOUT;
        let mut m = vol();
        let set = |key: &str, value: Option<&str>| MetaOp::SetOption {
            key: key.into(),
            value: value.map(str::to_string),
        };
        let before = m.data.clone();
        for bad in [set("bogus", Some("1")), set(ATTR_TIMEOUT, Some("-1"))] {
            assert!(matches!(m.run(bad), Err(FsError::Invalid(_))));
        }
        assert_eq!(m.data, before, "a refused option changes nothing");
        let mut txn = Txn::new(&m);
        apply(
            &mut txn,
            &set(ATTR_TIMEOUT, Some("5")),
            Timestamp::default(),
        )
        .unwrap();
        assert_eq!(touched(&txn.writes), vec![Inval::Volume]);
        drop(txn);
        m.run(set(ATTR_TIMEOUT, Some("5"))).unwrap();
        let v = volume(&m).unwrap().unwrap();
        assert_eq!(v.options.attr_timeout(), std::time::Duration::from_secs(5));
        let after = m.data.clone();
        m.run(set(ATTR_TIMEOUT, Some("5"))).unwrap();
        assert_eq!(m.data, after, "setting the same value again writes nothing");
        m.run(set(ATTR_TIMEOUT, None)).unwrap();
        assert_eq!(volume(&m).unwrap().unwrap().options, Default::default());

        m.run(MetaOp::SetStopped { stopped: true }).unwrap();
        assert!(volume(&m).unwrap().unwrap().stopped);
        let stopped = m.data.clone();
        m.run(MetaOp::SetStopped { stopped: true }).unwrap();
        assert_eq!(m.data, stopped, "stopping a stopped volume writes nothing");
        m.run(MetaOp::SetStopped { stopped: false }).unwrap();
        assert!(!volume(&m).unwrap().unwrap().stopped);
    }

    #[test]
    fn a_set_is_drained_then_removed_and_the_last_set_stays() {
        let mut m = vol();
        let b = |id| BrickRef {
            id,
            addr: format!("h:{id}"),
        };
        assert_eq!(
            m.run(MetaOp::DrainSet { set: 0 }),
            Err(FsError::Invalid(
                "the volume's last replica set cannot be removed".into()
            ))
        );
        m.run(MetaOp::AddSets(vec![vec![b(5)]])).unwrap();
        assert!(
            matches!(m.run(MetaOp::DrainSet { set: 1 }), Err(FsError::Busy(_))),
            "not while the add-brick's layout change is under way"
        );
        let e = volume(&m).unwrap().unwrap().epoch;
        m.run(MetaOp::SettleLayout { epoch: e }).unwrap();
        assert!(
            matches!(
                m.run(MetaOp::RemoveSet { set: 1 }),
                Err(FsError::Invalid(_))
            ),
            "commit without start"
        );
        m.run(MetaOp::DrainSet { set: 1 }).unwrap();
        m.run(MetaOp::DrainSet { set: 1 })
            .expect("a retried drain changes nothing");
        let v = volume(&m).unwrap().unwrap();
        assert!(v.replica_sets[1].leaving && v.previous == Some(vec![0, 1]));
        assert!(
            matches!(m.run(MetaOp::RemoveSet { set: 1 }), Err(FsError::Busy(_))),
            "commit before the drain settled"
        );
        assert_eq!(
            m.run(MetaOp::DrainSet { set: 0 }),
            Err(FsError::Busy(
                "a layout change is under way: let its rebalance finish first".into()
            ))
        );
        m.run(MetaOp::SettleLayout { epoch: v.epoch }).unwrap();
        m.run(MetaOp::RemoveSet { set: 1 }).unwrap();
        m.run(MetaOp::RemoveSet { set: 1 })
            .expect("a retried removal changes nothing");
        let v = volume(&m).unwrap().unwrap();
        assert_eq!(v.replica_sets.len(), 1);
        assert_eq!(v.retired, vec![b(5)]);
        assert!(v.is_retired(5));
    }

    fn attr(ok: MetaOk) -> Attr {
        match ok {
            MetaOk::Attr(a) => a,
            other => panic!("expected attr, got {other:?}"),
        }
    }
    pub(in crate::namespace) fn mkdir(
        m: &mut MemMeta,
        parent: InodeId,
        name: &str,
    ) -> Result<Attr, FsError> {
        m.run(MetaOp::Mkdir {
            parent,
            name: name.into(),
            perm: 0o755,
            uid: 0,
            gid: 0,
        })
        .map(attr)
    }
    /// A minimal access ACL (owner, group, other) for mode bits `perm`, as cp -a sets it.
    fn acl(perm: u32) -> Vec<u8> {
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, shift) in [(ACL_USER_OBJ, 6), (ACL_GROUP_OBJ, 3), (ACL_OTHER, 0)] {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&(((perm >> shift) & 7) as u16).to_le_bytes());
            acl.extend_from_slice(&u32::MAX.to_le_bytes());
        }
        acl
    }
    pub(in crate::namespace) fn create_op(parent: InodeId, name: &str) -> MetaOp {
        MetaOp::Mknod {
            parent,
            name: name.into(),
            kind: FileKind::Regular,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: true,
        }
    }
    fn create(m: &mut MemMeta, parent: InodeId, name: &str) -> Result<Attr, FsError> {
        m.run(create_op(parent, name)).map(attr)
    }
    fn lookup(m: &MemMeta, parent: InodeId, name: &str) -> Result<Attr, FsError> {
        query(
            m,
            &Query::Lookup {
                parent,
                name: name.into(),
            },
        )
        .map(attr)
    }
    fn rename(
        m: &mut MemMeta,
        p: InodeId,
        n: &str,
        np: InodeId,
        nn: &str,
        flags: u32,
    ) -> Result<MetaOk, FsError> {
        m.run(MetaOp::Rename {
            parent: p,
            name: n.into(),
            new_parent: np,
            new_name: nn.into(),
            flags,
        })
    }

    #[test]
    fn create_lookup_unlink() {
        let mut m = vol();
        let f = create(&mut m, ROOT_INODE, "a").unwrap();
        assert_eq!(lookup(&m, ROOT_INODE, "a").unwrap().ino, f.ino);
        assert_eq!(create(&mut m, ROOT_INODE, "a"), Err(FsError::Exists));
        assert_eq!(
            m.run(MetaOp::Unlink {
                parent: ROOT_INODE,
                name: "a".into()
            }),
            Ok(MetaOk::Done)
        );
        assert_eq!(lookup(&m, ROOT_INODE, "a"), Err(FsError::NotFound));
        assert_eq!(
            query(&m, &Query::GetAttr { ino: f.ino }),
            Err(FsError::NotFound)
        );
        assert_eq!(inode_count(&m).unwrap(), 1);
    }

    #[test]
    fn name_checks() {
        let mut m = vol();
        assert_eq!(
            create(&mut m, ROOT_INODE, &"x".repeat(256)),
            Err(FsError::NameTooLong)
        );
        assert_eq!(create(&mut m, ROOT_INODE, "a/b"), Err(FsError::InvalidName));
        let f = create(&mut m, ROOT_INODE, "f").unwrap();
        assert_eq!(create(&mut m, f.ino, "x"), Err(FsError::NotDir));
    }

    #[test]
    fn rmdir_requires_empty_and_fixes_nlink() {
        let mut m = vol();
        let d = mkdir(&mut m, ROOT_INODE, "d").unwrap();
        assert_eq!(lookup(&m, ROOT_INODE, "d").unwrap().nlink, 2);
        assert_eq!(
            query(&m, &Query::GetAttr { ino: ROOT_INODE })
                .map(attr)
                .unwrap()
                .nlink,
            3
        );
        create(&mut m, d.ino, "f").unwrap();
        assert_eq!(
            m.run(MetaOp::Rmdir {
                parent: ROOT_INODE,
                name: "d".into()
            }),
            Err(FsError::NotEmpty)
        );
        assert_eq!(
            m.run(MetaOp::Unlink {
                parent: ROOT_INODE,
                name: "d".into()
            }),
            Err(FsError::IsDir)
        );
        m.run(MetaOp::Unlink {
            parent: d.ino,
            name: "f".into(),
        })
        .unwrap();
        m.run(MetaOp::Rmdir {
            parent: ROOT_INODE,
            name: "d".into(),
        })
        .unwrap();
        assert_eq!(
            query(&m, &Query::GetAttr { ino: ROOT_INODE })
                .map(attr)
                .unwrap()
                .nlink,
            2
        );
    }

    #[test]
    fn hard_links_share_one_inode() {
        let mut m = vol();
        let f = create(&mut m, ROOT_INODE, "a").unwrap();
        let l = attr(
            m.run(MetaOp::Link {
                ino: f.ino,
                new_parent: ROOT_INODE,
                new_name: "b".into(),
            })
            .unwrap(),
        );
        assert_eq!(l.nlink, 2);
        m.run(MetaOp::SetAttr {
            ino: f.ino,
            set: SetAttr {
                perm: Some(0o600),
                ..Default::default()
            },
        })
        .unwrap();
        assert_eq!(lookup(&m, ROOT_INODE, "b").unwrap().perm, 0o600);
        m.run(MetaOp::Unlink {
            parent: ROOT_INODE,
            name: "a".into(),
        })
        .unwrap();
        assert_eq!(lookup(&m, ROOT_INODE, "b").unwrap().nlink, 1);
    }

    #[test]
    fn rename_replace_noreplace_exchange_and_loops() {
        let mut m = vol();
        let a = create(&mut m, ROOT_INODE, "a").unwrap();
        let b = create(&mut m, ROOT_INODE, "b").unwrap();
        assert_eq!(
            rename(&mut m, ROOT_INODE, "a", ROOT_INODE, "b", RENAME_NOREPLACE),
            Err(FsError::Exists)
        );
        rename(&mut m, ROOT_INODE, "a", ROOT_INODE, "b", RENAME_EXCHANGE).unwrap();
        assert_eq!(lookup(&m, ROOT_INODE, "b").unwrap().ino, a.ino);
        assert_eq!(lookup(&m, ROOT_INODE, "a").unwrap().ino, b.ino);
        rename(&mut m, ROOT_INODE, "a", ROOT_INODE, "b", 0).unwrap();
        assert_eq!(lookup(&m, ROOT_INODE, "b").unwrap().ino, b.ino);
        assert_eq!(lookup(&m, ROOT_INODE, "a"), Err(FsError::NotFound));
        assert_eq!(
            query(&m, &Query::GetAttr { ino: a.ino }),
            Err(FsError::NotFound)
        );

        let d1 = mkdir(&mut m, ROOT_INODE, "d1").unwrap();
        let d2 = mkdir(&mut m, d1.ino, "d2").unwrap();
        assert!(matches!(
            rename(&mut m, ROOT_INODE, "d1", d2.ino, "x", 0),
            Err(FsError::Invalid(_))
        ));
        assert_eq!(
            rename(&mut m, ROOT_INODE, "b", ROOT_INODE, "d1", 0),
            Err(FsError::IsDir)
        );
        assert_eq!(
            rename(&mut m, d1.ino, "d2", ROOT_INODE, "b", 0),
            Err(FsError::NotDir)
        );
        assert_eq!(
            rename(&mut m, ROOT_INODE, "d1", ROOT_INODE, "d1", 0),
            Ok(MetaOk::Done)
        );
        // Moving d2 up: nlink moves from d1 to root.
        rename(&mut m, d1.ino, "d2", ROOT_INODE, "d2", 0).unwrap();
        assert_eq!(lookup(&m, ROOT_INODE, "d1").unwrap().nlink, 2);
        assert_eq!(
            query(&m, &Query::GetAttr { ino: ROOT_INODE })
                .map(attr)
                .unwrap()
                .nlink,
            4
        );
        // Replacing an empty directory with a directory.
        rename(&mut m, ROOT_INODE, "d2", ROOT_INODE, "d1", 0).unwrap();
        assert_eq!(
            query(&m, &Query::GetAttr { ino: ROOT_INODE })
                .map(attr)
                .unwrap()
                .nlink,
            3
        );
        assert_eq!(
            query(&m, &Query::GetAttr { ino: d1.ino }),
            Err(FsError::NotFound)
        );
    }

    fn inline_content(ino: InodeId, expect_version: u64, data: &[u8]) -> MetaOp {
        MetaOp::SetContent {
            ino,
            expect_version,
            size: data.len() as u64,
            content: Content::Inline(data.to_vec()),
        }
    }

    #[test]
    fn a_whole_lookup_carries_small_files_whole_and_others_by_attributes() {
        let mut m = vol();
        let f = create(&mut m, ROOT_INODE, "small").unwrap();
        m.run(inline_content(f.ino, 0, b"<?php echo 1;")).unwrap();
        m.run(MetaOp::Mkdir {
            parent: ROOT_INODE,
            name: b"dir".to_vec(),
            perm: 0o755,
            uid: 0,
            gid: 0,
        })
        .unwrap();
        let whole = |m: &MemMeta, name: &str| {
            query(
                m,
                &Query::LookupWhole {
                    parent: ROOT_INODE,
                    name: name.into(),
                },
            )
        };
        match whole(&m, "small").unwrap() {
            MetaOk::Inode(i) => assert_eq!(i.content, Content::Inline(b"<?php echo 1;".to_vec())),
            other => panic!("not whole: {other:?}"),
        }
        assert!(
            matches!(whole(&m, "dir").unwrap(), MetaOk::Attr(a) if a.kind == FileKind::Directory)
        );
        assert_eq!(whole(&m, "missing"), Err(FsError::NotFound));
        // A chunked file comes with its chunk map (opening it asks nothing more), unless the
        // map is past the limit.
        let mut chunked = |name: &str, chunks: u64| {
            let f = create(&mut m, ROOT_INODE, name).unwrap();
            let map = (0..chunks)
                .map(|i| (i, ChunkId::of(&i.to_le_bytes())))
                .collect();
            m.run(MetaOp::SetContent {
                ino: f.ino,
                expect_version: 0,
                size: chunks << 20,
                content: Content::Chunks(map),
            })
            .unwrap();
        };
        chunked("big", 3);
        let huge = (LOOKUP_WHOLE_MAX / 40 + 1) as u64;
        chunked("huge", huge);
        assert!(
            matches!(whole(&m, "big").unwrap(), MetaOk::Inode(i) if matches!(&i.content, Content::Chunks(c) if c.len() == 3))
        );
        assert!(matches!(whole(&m, "huge").unwrap(), MetaOk::Attr(a) if a.size == huge << 20));

        let list = |limit| {
            query(
                &m,
                &Query::ListWhole {
                    dir: ROOT_INODE,
                    limit,
                },
            )
        };
        match list(10).unwrap() {
            MetaOk::Listed { entries, complete } => {
                assert!(complete);
                let names: Vec<&[u8]> = entries.iter().map(|e| e.name.as_slice()).collect();
                assert_eq!(names, vec![&b"big"[..], b"dir", b"huge", b"small"]);
                assert!(entries[0].whole.is_some(), "a chunk map comes whole");
                assert!(
                    entries[1].whole.is_none(),
                    "a directory is listed by attributes"
                );
                assert!(entries[2].whole.is_none(), "a map past the limit does not");
                assert!(entries[3].whole.is_some(), "a small file comes whole");
            }
            other => panic!("not a listing: {other:?}"),
        }
        assert!(
            matches!(list(1).unwrap(), MetaOk::Listed { entries, complete: false } if entries.len() == 1)
        );
    }

    #[test]
    fn set_content_checks_version() {
        let mut m = vol();
        let f = create(&mut m, ROOT_INODE, "f").unwrap();
        let set = |v, data: &[u8]| inline_content(f.ino, v, data);
        let a = attr(m.run(set(0, b"hello")).unwrap());
        assert_eq!((a.size, a.version), (5, 1));
        assert_eq!(m.run(set(0, b"x")), Err(FsError::Conflict(1)));
        let bad = MetaOp::SetContent {
            ino: f.ino,
            expect_version: 1,
            size: 9,
            content: Content::Inline(b"x".to_vec()),
        };
        assert!(matches!(m.run(bad), Err(FsError::Invalid(_))));
        let too_big = vec![0u8; INLINE_MAX + 1];
        assert!(matches!(m.run(set(1, &too_big)), Err(FsError::Invalid(_))));
        // A size past the maximum file size is EFBIG whoever sends it; one at it is sparse.
        let sized = |size| MetaOp::SetContent {
            ino: f.ino,
            expect_version: 1,
            size,
            content: Content::Chunks(Default::default()),
        };
        let past = m.run(sized(mortar_proto::MAX_FILE_SIZE + 1)).unwrap_err();
        assert_eq!(past.errno(), libc::EFBIG);
        assert_eq!(m.run(sized(u64::MAX)).unwrap_err().errno(), libc::EFBIG);
        match query(&m, &Query::GetInode { ino: f.ino }).unwrap() {
            MetaOk::Inode(i) => assert_eq!(i.content, Content::Inline(b"hello".to_vec())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_chunk_patch_changes_only_what_it_names_and_releases_what_it_drops() {
        let mut m = vol();
        let f = create(&mut m, ROOT_INODE, "f").unwrap();
        let id = |n: u8| ChunkId::of(&[n]);
        let map = |ids: &[(u64, u8)]| -> mortar_proto::ChunkMap {
            ids.iter().map(|&(i, n)| (i, id(n))).collect()
        };
        let set = MetaOp::SetContent {
            ino: f.ino,
            expect_version: 0,
            size: 3 << 20,
            content: Content::Chunks(map(&[(0, 1), (1, 2), (2, 3)])),
        };
        assert_eq!(attr(m.run(set).unwrap()).version, 1);
        let to = map(&[(0, 1), (1, 9), (3, 4)]);
        let patch = map(&[(0, 1), (1, 2), (2, 3)]).diff(&to);
        let op = |v| MetaOp::PatchContent {
            ino: f.ino,
            expect_version: v,
            size: 4 << 20,
            patch: patch.clone(),
        };
        assert_eq!(m.run(op(0)), Err(FsError::Conflict(1)));
        assert_eq!(attr(m.run(op(1)).unwrap()).size, 4 << 20);
        match query(&m, &Query::GetInode { ino: f.ino }).unwrap() {
            MetaOk::Inode(i) => assert_eq!(i.content, Content::Chunks(to)),
            other => panic!("{other:?}"),
        }
        let released: Vec<ChunkId> = released(&m, None, 100)
            .unwrap()
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        let mut expected = vec![id(2), id(3)];
        expected.sort_by_key(|c| c.0);
        assert_eq!(released, expected);
        // A patch applies to a chunked file only.
        let g = create(&mut m, ROOT_INODE, "g").unwrap();
        m.run(inline_content(g.ino, 0, b"small")).unwrap();
        let on_inline = MetaOp::PatchContent {
            ino: g.ino,
            expect_version: 1,
            size: 1 << 20,
            patch,
        };
        assert!(matches!(m.run(on_inline), Err(FsError::Invalid(_))));
    }

    #[test]
    fn data_bytes_count_inline_content_and_xattrs_but_not_delegated_changes() {
        let put = inline_content(5, 0, b"hello");
        assert_eq!(new_data_bytes(&put), 5);
        let x = MetaOp::SetXattr {
            ino: 5,
            name: b"user.a".to_vec(),
            value: vec![0; 100],
            mode: mortar_proto::wire::XattrMode::Any,
        };
        assert_eq!(new_data_bytes(&MetaOp::Batch(vec![put.clone(), x])), 105);
        let local = MetaOp::Local {
            at: Timestamp::now(),
            ino: None,
            op: Box::new(put),
        };
        assert_eq!(new_data_bytes(&local), 0);
        assert_eq!(
            new_data_bytes(&MetaOp::Unlink {
                parent: 1,
                name: b"f".to_vec()
            }),
            0
        );
    }

    #[test]
    fn a_batch_applies_in_order_or_not_at_all() {
        let mut m = vol();
        let f = create(&mut m, ROOT_INODE, "f").unwrap();
        let content = |v, data: &[u8]| inline_content(f.ino, v, data);
        let old = Timestamp {
            secs: 1_300_000_000,
            nanos: 5,
        };
        let touch = MetaOp::SetAttr {
            ino: f.ino,
            set: SetAttr {
                mtime: Some(TimeSet::At(old)),
                perm: Some(0o640),
                ..Default::default()
            },
        };
        let xattr = |mode| MetaOp::SetXattr {
            ino: f.ino,
            name: b"user.k".to_vec(),
            value: b"v".to_vec(),
            mode,
        };
        let out = m
            .run(MetaOp::Batch(vec![
                content(0, b"hello"),
                touch.clone(),
                xattr(XattrMode::Create),
            ]))
            .unwrap();
        assert!(matches!(&out, MetaOk::Batch(r) if r.len() == 3), "{out:?}");
        let a = lookup(&m, ROOT_INODE, "f").unwrap();
        assert_eq!((a.size, a.perm, a.mtime, a.version), (5, 0o640, old, 1));
        // The second XATTR_CREATE fails, so the content change before it is not applied.
        let err = m.run(MetaOp::Batch(vec![
            content(1, b"bye"),
            xattr(XattrMode::Create),
        ]));
        assert_eq!(err, Err(FsError::Exists));
        assert_eq!(lookup(&m, ROOT_INODE, "f").unwrap().size, 5);
        let nested = MetaOp::Batch(vec![MetaOp::Batch(vec![touch])]);
        assert!(matches!(m.run(nested), Err(FsError::Invalid(_))));
        let unlink = MetaOp::Unlink {
            parent: ROOT_INODE,
            name: b"f".to_vec(),
        };
        assert!(matches!(
            m.run(MetaOp::Batch(vec![unlink])),
            Err(FsError::Invalid(_))
        ));
        assert!(lookup(&m, ROOT_INODE, "f").is_ok());
    }

    #[test]
    fn local_changes_use_reserved_numbers_and_the_clients_time() {
        let mut m = vol();
        let (first, count) = match m.run(MetaOp::ReserveInodes { count: 10 }).unwrap() {
            MetaOk::Inodes { first, count } => (first, count),
            other => panic!("{other:?}"),
        };
        assert_eq!(count, 10);
        // Ordinary creates take numbers after the reserved range.
        assert!(create(&mut m, ROOT_INODE, "plain").unwrap().ino >= first + 10);
        let at = Timestamp {
            secs: 1_700_000_000,
            nanos: 42,
        };
        let local = |ino: Option<InodeId>, op: MetaOp| MetaOp::Local {
            at,
            ino,
            op: Box::new(op),
        };
        let made = attr(
            m.run(MetaOp::Batch(vec![
                local(Some(first + 3), create_op(ROOT_INODE, "held")),
                local(None, inline_content(first + 3, 0, b"data")),
            ]))
            .map(|ok| match ok {
                MetaOk::Batch(mut r) => r.remove(0),
                other => panic!("{other:?}"),
            })
            .unwrap(),
        );
        assert_eq!((made.ino, made.ctime), (first + 3, at));
        let f = lookup(&m, ROOT_INODE, "held").unwrap();
        assert_eq!((f.ino, f.size, f.mtime, f.version), (first + 3, 4, at, 1));
        // A number in use, one never handed out, or a create without a number is refused.
        for (ino, name) in [
            (Some(first + 3), "again"),
            (Some(first + 1000), "unreserved"),
            (Some(ROOT_INODE), "root"),
            (None, "unnamed"),
        ] {
            assert!(
                matches!(
                    m.run(local(ino, create_op(ROOT_INODE, name))),
                    Err(FsError::Invalid(_))
                ),
                "{name}"
            );
            assert_eq!(lookup(&m, ROOT_INODE, name).err(), Some(FsError::NotFound));
        }
        // Only creates name a number; only creates, removals, renames and file changes may
        // be local.
        let chmod = MetaOp::SetAttr {
            ino: first + 3,
            set: SetAttr {
                perm: Some(0o600),
                ..Default::default()
            },
        };
        assert!(matches!(
            m.run(local(Some(first + 4), chmod)),
            Err(FsError::Invalid(_))
        ));
        let link = MetaOp::Link {
            ino: first + 3,
            new_parent: ROOT_INODE,
            new_name: b"second".to_vec(),
        };
        assert!(matches!(m.run(local(None, link)), Err(FsError::Invalid(_))));
        let rename = MetaOp::Rename {
            parent: ROOT_INODE,
            name: b"held".to_vec(),
            new_parent: ROOT_INODE,
            new_name: b"moved".to_vec(),
            flags: 0,
        };
        assert!(matches!(
            m.run(local(Some(first + 5), rename.clone())),
            Err(FsError::Invalid(_))
        ));
        m.run(local(None, rename)).unwrap();
        assert_eq!(lookup(&m, ROOT_INODE, "moved").unwrap().ctime, at);
        let unlink = MetaOp::Unlink {
            parent: ROOT_INODE,
            name: b"moved".to_vec(),
        };
        m.run(local(None, unlink)).unwrap();
        assert_eq!(
            lookup(&m, ROOT_INODE, "moved").err(),
            Some(FsError::NotFound)
        );
        assert_eq!(
            attr(query(&m, &Query::GetAttr { ino: ROOT_INODE }).unwrap()).mtime,
            at
        );
        for count in [0, MAX_RESERVE + 1] {
            assert!(matches!(
                m.run(MetaOp::ReserveInodes { count }),
                Err(FsError::Invalid(_))
            ));
        }
    }

    #[test]
    fn a_local_run_of_changes_sets_the_whole_inode() {
        let mut m = vol();
        let f = create(&mut m, ROOT_INODE, "f").unwrap();
        let inode = |m: &MemMeta, ino| match query(m, &Query::GetInode { ino }).unwrap() {
            MetaOk::Inode(i) => i,
            other => panic!("{other:?}"),
        };
        let at = Timestamp {
            secs: 1_700_000_000,
            nanos: 7,
        };
        let set_whole = |expect_version, inode: &Inode| MetaOp::Local {
            at,
            ino: None,
            op: Box::new(MetaOp::SetInode {
                expect_version,
                inode: inode.clone(),
            }),
        };
        // What cp -a does to a new file, as the client's copy shows it.
        let (a, b) = (ChunkId::of(b"a"), ChunkId::of(b"b"));
        let mut shown = inode(&m, f.ino);
        for op in [
            MetaOp::SetContent {
                ino: f.ino,
                expect_version: 0,
                size: 3 << 20,
                content: Content::Chunks([(0, a), (2, b)].into_iter().collect()),
            },
            MetaOp::SetAttr {
                ino: f.ino,
                set: SetAttr {
                    uid: Some(33),
                    gid: Some(33),
                    ..Default::default()
                },
            },
            MetaOp::SetXattr {
                ino: f.ino,
                name: ACL_ACCESS.to_vec(),
                value: acl(0o640),
                mode: XattrMode::Any,
            },
            MetaOp::SetAttr {
                ino: f.ino,
                set: SetAttr {
                    mtime: Some(TimeSet::At(Timestamp { secs: 5, nanos: 6 })),
                    ..Default::default()
                },
            },
        ] {
            shown.apply_change(&op, at).unwrap();
        }
        let stored = attr(m.run(set_whole(0, &shown)).unwrap());
        assert_eq!(inode(&m, f.ino), shown);
        assert_eq!((stored.perm, stored.uid, stored.version), (0o640, 33, 1));
        // Links and number stay the namespace's; a stale version, a changed kind, an access
        // ACL that disagrees with the mode, unsorted xattrs and oversized inline content are
        // refused, and none of them changes anything.
        let mut linked = shown.clone();
        linked.attr.nlink = 9;
        linked.attr.uid = 34;
        m.run(set_whole(1, &linked)).unwrap();
        assert_eq!(lookup(&m, ROOT_INODE, "f").unwrap().nlink, 1);
        let now = inode(&m, f.ino);
        assert_eq!(m.run(set_whole(0, &now)), Err(FsError::Conflict(1)));
        let refused = |change: fn(&mut Inode)| {
            let mut i = now.clone();
            change(&mut i);
            i
        };
        for bad in [
            refused(|i| i.attr.kind = FileKind::Fifo),
            refused(|i| i.attr.perm = 0o600),
            refused(|i| {
                i.xattrs.push((b"user.a".to_vec(), Vec::new()));
                i.xattrs.reverse();
            }),
            refused(|i| {
                i.content = Content::Inline(vec![0; INLINE_MAX + 1]);
                i.attr.size = INLINE_MAX as u64 + 1;
                i.attr.version += 1;
            }),
            refused(|i| {
                // New content at the same version: readers would keep stale pages.
                i.content = Content::Inline(b"x".to_vec());
                i.attr.size = 1;
            }),
        ] {
            assert!(
                matches!(m.run(set_whole(1, &bad)), Err(FsError::Invalid(_))),
                "{bad:?}"
            );
            assert_eq!(inode(&m, f.ino), now);
        }
        assert!(matches!(
            m.run(MetaOp::SetInode {
                expect_version: 1,
                inode: now.clone()
            }),
            Err(FsError::Invalid(_))
        ));
        // New content lets go of the chunks it no longer names.
        let mut shorter = now.clone();
        shorter.content = Content::Chunks([(0, b)].into_iter().collect());
        shorter.attr.size = 1 << 20;
        shorter.attr.version = 2;
        m.run(set_whole(1, &shorter)).unwrap();
        let let_go: Vec<ChunkId> = released(&m, None, 10)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(let_go, vec![a]);
        // A directory's or symlink's content is not the client's to set.
        let d = m
            .run(MetaOp::Symlink {
                parent: ROOT_INODE,
                name: b"l".to_vec(),
                target: b"f".to_vec(),
                uid: 0,
                gid: 0,
            })
            .map(attr)
            .unwrap();
        let mut retargeted = inode(&m, d.ino);
        retargeted.content = Content::Symlink(b"g".to_vec());
        assert!(matches!(
            m.run(set_whole(0, &retargeted)),
            Err(FsError::Invalid(_))
        ));
    }

    #[test]
    fn readdir_pages_by_name() {
        let mut m = vol();
        for i in 0..10 {
            create(&mut m, ROOT_INODE, &format!("f{i}")).unwrap();
        }
        let page = |after: Option<&str>| match query(
            &m,
            &Query::ReadDir {
                ino: ROOT_INODE,
                after: after.map(|a| a.into()),
                limit: 4,
            },
        )
        .unwrap()
        {
            MetaOk::Entries(e) => e
                .into_iter()
                .map(|e| String::from_utf8(e.name).unwrap())
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(page(None), ["f0", "f1", "f2", "f3"]);
        assert_eq!(page(Some("f3")), ["f4", "f5", "f6", "f7"]);
        assert_eq!(page(Some("f8")), ["f9"]);
    }

    #[test]
    fn access_acl_and_mode_stay_in_step() {
        let mut m = vol();
        let d = mkdir(&mut m, ROOT_INODE, "d").unwrap();
        assert_eq!(d.perm, 0o755);
        // user::rwx group::r-x other::r-x, as cp -a sets it on a 0755 directory.
        let acl = acl(0o755);
        m.run(MetaOp::SetAttr {
            ino: d.ino,
            set: SetAttr {
                perm: Some(0o700),
                ..Default::default()
            },
        })
        .unwrap();
        m.run(MetaOp::SetXattr {
            ino: d.ino,
            name: ACL_ACCESS.to_vec(),
            value: acl.clone(),
            mode: XattrMode::Any,
        })
        .unwrap();
        assert_eq!(lookup(&m, ROOT_INODE, "d").unwrap().perm, 0o755);
        m.run(MetaOp::SetAttr {
            ino: d.ino,
            set: SetAttr {
                perm: Some(0o640),
                ..Default::default()
            },
        })
        .unwrap();
        let stored = match query(&m, &Query::GetInode { ino: d.ino }).unwrap() {
            MetaOk::Inode(i) => {
                i.xattrs
                    .into_iter()
                    .find(|(n, _)| n == ACL_ACCESS)
                    .unwrap()
                    .1
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(acl_mode(&stored), Some(0o640));
        let bad = MetaOp::SetXattr {
            ino: d.ino,
            name: ACL_ACCESS.to_vec(),
            value: vec![1, 2, 3],
            mode: XattrMode::Any,
        };
        assert!(matches!(m.run(bad), Err(FsError::Invalid(_))));
    }

    #[test]
    fn xattrs_create_replace_remove() {
        let mut m = vol();
        let f = create(&mut m, ROOT_INODE, "f").unwrap();
        let set = |mode| MetaOp::SetXattr {
            ino: f.ino,
            name: b"user.a".to_vec(),
            value: b"1".to_vec(),
            mode,
        };
        assert_eq!(m.run(set(XattrMode::Replace)), Err(FsError::NoXattr));
        m.run(set(XattrMode::Create)).unwrap();
        assert_eq!(m.run(set(XattrMode::Create)), Err(FsError::Exists));
        m.run(MetaOp::RemoveXattr {
            ino: f.ino,
            name: b"user.a".to_vec(),
        })
        .unwrap();
        assert_eq!(
            m.run(MetaOp::RemoveXattr {
                ino: f.ino,
                name: b"user.a".to_vec()
            }),
            Err(FsError::NoXattr)
        );
    }

    #[test]
    fn releases_and_heal_lease() {
        let mut m = vol();
        let f = create(&mut m, ROOT_INODE, "f").unwrap();
        let (a, b, c) = (ChunkId::of(b"a"), ChunkId::of(b"b"), ChunkId::of(b"c"));
        let set = |m: &mut MemMeta, version, chunks: Vec<ChunkId>| {
            m.run(MetaOp::SetContent {
                ino: f.ino,
                expect_version: version,
                size: 10,
                content: Content::Chunks(
                    chunks
                        .into_iter()
                        .enumerate()
                        .map(|(i, c)| (i as u64, c))
                        .collect(),
                ),
            })
            .unwrap()
        };
        set(&mut m, f.version, vec![a, b]);
        let (refs, next) = chunk_references(&m, None, 100).unwrap();
        assert_eq!((refs, next), (vec![a, b], None));
        assert!(released(&m, None, 10).unwrap().is_empty());
        // Overwrite keeps b, lets a go; unlink lets b and c go.
        set(&mut m, f.version + 1, vec![b, c]);
        let ids = |m: &MemMeta| -> Vec<ChunkId> {
            released(m, None, 10)
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect()
        };
        assert_eq!(ids(&m), vec![a]);
        m.run(MetaOp::Unlink {
            parent: ROOT_INODE,
            name: b"f".to_vec(),
        })
        .unwrap();
        let mut all = vec![a, b, c];
        all.sort_by_key(|c| c.0);
        assert_eq!(ids(&m), all);
        assert!(chunk_references(&m, None, 100).unwrap().0.is_empty());
        m.run(MetaOp::ForgetReleased(vec![a, b])).unwrap();
        assert_eq!(ids(&m), vec![c]);

        let lease = |holder: &str, ttl_secs| MetaOp::HealLease {
            holder: holder.into(),
            ttl_secs,
        };
        m.run(lease("one", 60)).unwrap();
        m.run(lease("one", 60)).unwrap();
        assert!(matches!(m.run(lease("two", 60)), Err(FsError::Busy(_))));
        m.run(lease("one", 0)).unwrap();
        m.run(lease("two", 60)).unwrap();
    }

    #[test]
    fn a_retried_change_is_applied_once() {
        let mut m = vol();
        let once = |seq| Some(OpId { client: 42, seq });
        let run = |m: &mut MemMeta, op: MetaOp, id| {
            let writes = {
                let mut txn = Txn::new(&*m);
                let out = apply_once(&mut txn, &op, id, Timestamp { secs: 1, nanos: 0 });
                (txn.writes, out)
            };
            for ((t, k), v) in writes.0 {
                match v {
                    Some(v) => m.data.insert((t, k), v),
                    None => m.data.remove(&(t, k)),
                };
            }
            writes.1
        };
        let create = create_op(ROOT_INODE, "f");
        let first = run(&mut m, create.clone(), once(1));
        assert!(!first.replayed);
        let first = first.result.unwrap();
        // The same request again (lost answer): same outcome, not EEXIST, nothing new made.
        let again = run(&mut m, create.clone(), once(1));
        assert!(again.replayed);
        assert_eq!(again.result.unwrap(), first);
        assert_eq!(inode_count(&m).unwrap(), 2);
        // A new request for the same name is a new change.
        assert_eq!(
            run(&mut m, create.clone(), once(2)).result,
            Err(FsError::Exists)
        );
        // Failed outcomes are remembered too, and their changes are not kept.
        assert_eq!(
            run(&mut m, create.clone(), once(2)).result,
            Err(FsError::Exists)
        );
        // Outcomes older than the window are forgotten.
        let unlink = MetaOp::Unlink {
            parent: ROOT_INODE,
            name: b"nothing".to_vec(),
        };
        run(&mut m, unlink, once(1 + ONCE_WINDOW))
            .result
            .unwrap_err();
        let remembered = m
            .data
            .keys()
            .filter(|(t, k)| *t == Table::Sys && k.starts_with(PREFIX_ONCE))
            .count();
        assert_eq!(remembered, 2, "seq 1 should have left the window");
    }
}
