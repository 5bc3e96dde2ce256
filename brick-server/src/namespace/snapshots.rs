//! Named snapshots of the namespace, kept by copy-on-write: taking one copies nothing, and
//! each later change of an inode or directory entry first keeps what it overwrites.
//!
//! The rules, and why they give every snapshot exactly the rows it was taken with:
//! - Snapshots are numbered by a generation that only grows; `newest` is the highest live one.
//! - **Keep on first write.** Before a change writes key K (an inode or an entry), if no row
//!   of K is kept at a generation ≥ `newest`, the current value of K (or "absent") is kept as
//!   `(K, newest)`. So `(K, G)` holds K's value from its last write before G's era up to the
//!   first write after snapshot G (or after a later, since deleted, one).
//! - **Read at g**: the row of K kept at the smallest generation ≥ g, or the live row when none
//!   is kept. If K was written after snapshot g, the first such write kept the value it had
//!   at g under some generation ≥ g, and nothing kept between g and that is older than g.
//! - **Delete** drops the record, then every kept row no live snapshot reads: `(K, G)` is read
//!   by the snapshots in (P, G], P being the generation of the row of K kept before it.
//! - **Restore to g** writes, for every key kept at a generation ≥ g (exactly the keys changed
//!   since g), its value at g: work in proportion to what changed, not to the namespace.
//!
//! Kept rows live in their own table: `tag ++ key ++ [0 for entries] ++ generation (BE)`.
//! Entry names hold no NUL, so the 0 ends the name and a key's rows sort together, by
//! generation, in the order of the keys themselves.

use super::{
    dec, each_row, enc, inodes_of, records, released_key, u64_of, volume, MetaRead, Rows, Stored,
    Table, Txn, PAGE,
};
use mortar_proto::wire::{
    split_snapshot_name, validate_snapshot_name, MetaOk, SnapshotInfo, SnapshotUsage,
};
use mortar_proto::{ChunkId, Content, FileKind, FsError, Timestamp, VolumeNo};
use std::collections::{BTreeMap, BTreeSet, HashSet};

mod subtree;
pub(super) use subtree::restore_path;

/// `snap/<name>` → [`SnapshotInfo`].
const PREFIX_SNAP: &[u8] = b"snap/";
/// The generation the next snapshot gets.
const KEY_NEXT_GEN: &[u8] = b"snap_next_gen";
/// The highest generation of a live snapshot (0: none).
const KEY_NEWEST: &[u8] = b"snap_newest";

const TAG_INODE: u8 = 0;
const TAG_ENTRY: u8 = 1;

/// The volume a snapshot's name says it is of: `CLONE@NAME` a clone's, a plain name the
/// volume the bricks were made with. Both parts are checked.
pub(super) fn volume_of_name<R: MetaRead>(r: &R, full: &str) -> Result<VolumeNo, FsError> {
    let (clone, name) = split_snapshot_name(full);
    validate_snapshot_name(name)?;
    match clone {
        None => Ok(0),
        Some(c) => Ok(volume::clone_record(r, c)?.volume),
    }
}

/// The volume a restore of `name` changes; its undo snapshot must be of the same one.
fn restored_volume<R: MetaRead>(r: &R, name: &str, undo: &str) -> Result<VolumeNo, FsError> {
    let volume = volume_of_name(r, name)?;
    if volume_of_name(r, undo)? != volume {
        return Err(FsError::Invalid(format!(
            "the undo snapshot '{undo}' must be of the volume '{name}' is of"
        )));
    }
    Ok(volume)
}

/// The volume an inode or entry key belongs to (both start with an inode number).
fn key_volume(key: &[u8]) -> VolumeNo {
    key.first_chunk::<2>()
        .map_or(0, |b| VolumeNo::from_be_bytes(*b))
}

fn snap_key(name: &str) -> Vec<u8> {
    [PREFIX_SNAP, name.as_bytes()].concat()
}

/// The prefix every kept row of `key` (a key of `table`) starts with.
fn kept_prefix(table: Table, key: &[u8]) -> Vec<u8> {
    match table {
        Table::Inodes => [&[TAG_INODE], key].concat(),
        _ => [&[TAG_ENTRY], key, &[0]].concat(),
    }
}

fn kept_key(table: Table, key: &[u8], gen: u64) -> Vec<u8> {
    [kept_prefix(table, key), gen.to_be_bytes().to_vec()].concat()
}

/// The table, key and generation of a kept row.
fn parse_kept(k: &[u8]) -> Result<(Table, Vec<u8>, u64), FsError> {
    let bad = || FsError::Io("malformed kept snapshot row".into());
    let (tag, rest) = k.split_first().ok_or_else(bad)?;
    let (body, gen) = rest
        .split_at_checked(rest.len().checked_sub(8).ok_or_else(bad)?)
        .ok_or_else(bad)?;
    let gen = u64::from_be_bytes(gen.try_into().map_err(|_| bad())?);
    match *tag {
        TAG_INODE if body.len() == 8 => Ok((Table::Inodes, body.to_vec(), gen)),
        TAG_ENTRY if body.last() == Some(&0) => {
            Ok((Table::Dentries, body[..body.len() - 1].to_vec(), gen))
        }
        _ => Err(bad()),
    }
}

fn is_snapshotted(table: Table) -> bool {
    matches!(table, Table::Inodes | Table::Dentries)
}

/// The value of `key` at generation `gen`: kept, or live when nothing was kept since.
fn read_at<R: MetaRead>(
    r: &R,
    table: Table,
    key: &[u8],
    gen: u64,
) -> Result<Option<Vec<u8>>, FsError> {
    let prefix = kept_prefix(table, key);
    let after = kept_key(table, key, gen.saturating_sub(1));
    let first = if gen == 0 {
        r.scan(Table::Snap, &prefix, None, 1)?
    } else {
        r.scan(Table::Snap, &prefix, Some(&after), 1)?
    };
    match first.into_iter().next() {
        Some((_, v)) => dec::<Option<Vec<u8>>>(&v),
        None => r.get(table, key),
    }
}

/// Whether a row of `key` is kept at a generation ≥ `gen`.
fn kept_since<R: MetaRead>(
    txn: &Txn<'_, R>,
    table: Table,
    key: &[u8],
    gen: u64,
) -> Result<bool, FsError> {
    let prefix = kept_prefix(table, key);
    let pending = txn
        .writes
        .range((Table::Snap, prefix.clone())..)
        .take_while(|((t, k), _)| *t == Table::Snap && k.starts_with(&prefix))
        .any(|((_, k), v)| v.is_some() && parse_kept(k).is_ok_and(|(_, _, g)| g >= gen));
    if pending {
        return Ok(true);
    }
    let after = kept_key(table, key, gen - 1);
    Ok(!txn
        .base
        .scan(Table::Snap, &prefix, Some(&after), 1)?
        .is_empty())
}

/// Keep what the writes in `txn` overwrite, for the newest snapshot (the first rule above).
/// Called once an operation's writes are final.
pub(super) fn keep_overwritten<R: MetaRead>(txn: &mut Txn<'_, R>) -> Result<(), FsError> {
    let newest = u64_of(txn.get(Table::Sys, KEY_NEWEST)?);
    if newest == 0 {
        return Ok(());
    }
    let written: Vec<(Table, Vec<u8>)> = txn
        .writes
        .keys()
        .filter(|(t, _)| is_snapshotted(*t))
        .cloned()
        .collect();
    for (table, key) in written {
        if !kept_since(txn, table, &key, newest)? {
            let before = txn.base.get(table, &key)?;
            txn.put(Table::Snap, &kept_key(table, &key, newest), enc(&before));
        }
    }
    Ok(())
}

/// A snapshot's namespace, read through the same trait as the live one; the volume's own rows
/// (configuration, counters) are the live ones.
pub struct SnapView<'a, R: MetaRead> {
    base: &'a R,
    gen: u64,
}

impl<'a, R: MetaRead> SnapView<'a, R> {
    /// The namespace as snapshot generation `gen` holds it.
    pub(super) fn at(base: &'a R, gen: u64) -> Self {
        SnapView { base, gen }
    }

    pub fn open(base: &'a R, name: &str) -> Result<Self, FsError> {
        let info = find(base, name)?;
        Ok(SnapView {
            base,
            gen: info.gen,
        })
    }
}

impl<R: MetaRead> MetaRead for SnapView<'_, R> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, FsError> {
        if is_snapshotted(table) {
            read_at(self.base, table, key, self.gen)
        } else {
            self.base.get(table, key)
        }
    }

    /// The keys live now and the keys kept since, merged page by page, each read at the
    /// snapshot's generation.
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Rows, FsError> {
        if !is_snapshotted(table) {
            return self.base.scan(table, prefix, after, limit);
        }
        let tag = kept_prefix(table, &[])[..1].to_vec();
        let kept_scan_prefix = [&tag[..], prefix].concat();
        let mut out = Vec::new();
        let mut cursor: Option<Vec<u8>> = after.map(<[u8]>::to_vec);
        loop {
            let live = self.base.scan(table, prefix, cursor.as_deref(), PAGE)?;
            // Past every kept row of the cursor's key, whatever its generation.
            let kept_after = cursor.as_ref().map(|c| kept_key(table, c, u64::MAX));
            let kept =
                self.base
                    .scan(Table::Snap, &kept_scan_prefix, kept_after.as_deref(), PAGE)?;
            let live_end = (live.len() == PAGE)
                .then(|| live.last().map(|(k, _)| k.clone()))
                .flatten();
            let kept_keys: Vec<Vec<u8>> = kept
                .iter()
                .map(|(k, _)| parse_kept(k).map(|(_, key, _)| key))
                .collect::<Result<_, _>>()?;
            let kept_end = (kept.len() == PAGE)
                .then(|| kept_keys.last().cloned())
                .flatten();
            // Keys up to the nearer end of a full page are complete from both sides.
            let bound = match (live_end, kept_end) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let keys: BTreeSet<Vec<u8>> = live
                .into_iter()
                .map(|(k, _)| k)
                .chain(kept_keys)
                .filter(|k| bound.as_ref().is_none_or(|b| k <= b))
                .collect();
            for k in keys {
                if let Some(v) = self.get(table, &k)? {
                    out.push((k, v));
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            match bound {
                Some(b) => cursor = Some(b),
                None => return Ok(out),
            }
        }
    }
}

pub fn find<R: MetaRead>(r: &R, name: &str) -> Result<SnapshotInfo, FsError> {
    match r.get(Table::Sys, &snap_key(name))? {
        Some(b) => dec(&b),
        None => Err(FsError::NoSnapshot(name.to_string())),
    }
}

/// Drop every row kept of `volume`'s keys (a clone being erased, whose snapshots are gone),
/// releasing the chunks they name.
pub(super) fn drop_kept<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    volume: VolumeNo,
    now: Timestamp,
) -> Result<(), FsError> {
    let base = txn.base;
    for tag in [TAG_INODE, TAG_ENTRY] {
        let prefix = [&[tag][..], &volume.to_be_bytes()].concat();
        each_row(base, Table::Snap, &prefix, |k, v| {
            txn.delete(Table::Snap, &k);
            if tag == TAG_INODE {
                if let Some(row) = dec::<Option<Vec<u8>>>(&v)? {
                    txn.release(&dec::<Stored>(&row)?.inode.content, None, now);
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Every snapshot, oldest first.
pub fn list<R: MetaRead>(r: &R) -> Result<Vec<SnapshotInfo>, FsError> {
    let mut out: Vec<SnapshotInfo> = records(r, PREFIX_SNAP)?;
    out.sort_by_key(|s| s.gen);
    Ok(out)
}

fn record<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    name: &str,
    now: Timestamp,
) -> Result<SnapshotInfo, FsError> {
    volume_of_name(txn.base, name)?;
    if txn.get(Table::Sys, &snap_key(name))?.is_some() {
        return Err(FsError::Exists);
    }
    let gen = u64_of(txn.get(Table::Sys, KEY_NEXT_GEN)?).max(1);
    let info = SnapshotInfo {
        name: name.to_string(),
        gen,
        index: txn.index,
        created: now,
        files: inodes_of(txn, volume_of_name(txn.base, name)?)?,
    };
    txn.put(Table::Sys, &snap_key(name), enc(&info));
    txn.put(Table::Sys, KEY_NEXT_GEN, (gen + 1).to_be_bytes().to_vec());
    txn.put(Table::Sys, KEY_NEWEST, gen.to_be_bytes().to_vec());
    Ok(info)
}

/// The series a snapshot name belongs to for retention: the name up to its last '-'.
fn series(name: &str) -> &str {
    name.rfind('-').map_or(name, |i| &name[..=i])
}

pub(super) fn create<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    name: &str,
    keep: Option<u32>,
    now: Timestamp,
) -> Result<MetaOk, FsError> {
    if keep == Some(0) {
        return Err(FsError::Invalid("--keep must be at least 1".into()));
    }
    let info = record(txn, name, now)?;
    if let Some(keep) = keep {
        let mut same: Vec<SnapshotInfo> = list(txn.base)?
            .into_iter()
            .filter(|s| series(&s.name) == series(name))
            .collect();
        // The new one is not in the base yet; it counts as the newest.
        let excess = (same.len() + 1).saturating_sub(keep as usize);
        same.truncate(excess);
        for old in same {
            remove(txn, &old.name, now)?;
        }
    }
    Ok(MetaOk::Snapshot(info))
}

pub(super) fn delete<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    name: &str,
    now: Timestamp,
) -> Result<MetaOk, FsError> {
    remove(txn, name, now)?;
    Ok(MetaOk::Done)
}

/// Forget a snapshot and every kept row no other snapshot reads; chunks those rows named are
/// released (garbage collection frees them after its grace, unless something else names them).
pub(super) fn remove<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    name: &str,
    now: Timestamp,
) -> Result<(), FsError> {
    if txn.get(Table::Sys, &snap_key(name))?.is_none() {
        return Err(FsError::NoSnapshot(name.to_string()));
    }
    txn.delete(Table::Sys, &snap_key(name));
    let live = live_gens(txn)?;
    txn.put(
        Table::Sys,
        KEY_NEWEST,
        live.iter()
            .max()
            .copied()
            .unwrap_or(0)
            .to_be_bytes()
            .to_vec(),
    );
    let read_by = |prev: u64, gen: u64| live.iter().any(|s| *s > prev && *s <= gen);
    let base = txn.base;
    let mut prev: Option<(Vec<u8>, u64)> = None;
    each_row(base, Table::Snap, &[], |k, v| {
        let (table, _, gen) = parse_kept(&k)?;
        let before = match &prev {
            Some((pk, pg)) if *pk == k[..k.len() - 8] => *pg,
            _ => 0,
        };
        prev = Some((k[..k.len() - 8].to_vec(), gen));
        if read_by(before, gen) {
            return Ok(());
        }
        txn.delete(Table::Snap, &k);
        if table == Table::Inodes {
            if let Some(row) = dec::<Option<Vec<u8>>>(&v)? {
                for id in chunks_of(&dec::<Stored>(&row)?.inode.content) {
                    txn.put(Table::Sys, &released_key(&id), enc(&now));
                }
            }
        }
        Ok(())
    })
}

/// Generations of the snapshots that live once `txn` is applied (a change may create one and
/// delete others: retention, restore).
fn live_gens<R: MetaRead>(txn: &Txn<'_, R>) -> Result<Vec<u64>, FsError> {
    let mut by_name: BTreeMap<Vec<u8>, u64> = list(txn.base)?
        .into_iter()
        .map(|s| (snap_key(&s.name), s.gen))
        .collect();
    for ((t, k), v) in &txn.writes {
        if *t == Table::Sys && k.starts_with(PREFIX_SNAP) {
            match v {
                Some(v) => {
                    by_name.insert(k.clone(), dec::<SnapshotInfo>(v)?.gen);
                }
                None => {
                    by_name.remove(k);
                }
            }
        }
    }
    Ok(by_name.into_values().collect())
}

fn chunks_of(c: &Content) -> Vec<ChunkId> {
    match c {
        Content::Chunks(m) => m.ids().copied().collect(),
        _ => Vec::new(),
    }
}

/// Make the live namespace snapshot `name`'s, after recording it as snapshot `undo`.
pub(super) fn restore<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    name: &str,
    undo: &str,
    now: Timestamp,
) -> Result<MetaOk, FsError> {
    let target = find(txn.base, name)?;
    let volume = restored_volume(txn.base, name, undo)?;
    let undo = record(txn, undo, now)?;
    // Every key changed since the target was taken has a row kept at a generation ≥ its own;
    // only the restored volume's change (its clones or origin are other trees).
    let mut changed: BTreeSet<(Table, Vec<u8>)> = BTreeSet::new();
    each_row(txn.base, Table::Snap, &[], |k, _| {
        let (table, key, gen) = parse_kept(&k)?;
        if gen >= target.gen && key_volume(&key) == volume {
            changed.insert((table, key));
        }
        Ok(())
    })?;
    let mut count = 0i64;
    for (table, key) in changed {
        let then = read_at(txn.base, table, &key, target.gen)?;
        let now_row = txn.base.get(table, &key)?;
        if then == now_row {
            continue;
        }
        match table {
            Table::Inodes => {
                let now_inode = now_row.as_deref().map(dec::<Stored>).transpose()?;
                let then_inode = then.as_deref().map(dec::<Stored>).transpose()?;
                if let Some(cur) = &now_inode {
                    let kept: HashSet<ChunkId> = then_inode
                        .as_ref()
                        .map(|s| chunks_of(&s.inode.content).into_iter().collect())
                        .unwrap_or_default();
                    for id in chunks_of(&cur.inode.content) {
                        if !kept.contains(&id) {
                            txn.put(Table::Sys, &released_key(&id), enc(&now));
                        }
                    }
                }
                match (now_inode, then_inode) {
                    (cur, Some(mut old)) => {
                        // Versions only grow: a writer or cache holding the current version
                        // must see the file as changed.
                        if let Some(cur) = cur {
                            old.inode.attr.version =
                                old.inode.attr.version.max(cur.inode.attr.version) + 1;
                        } else {
                            count += 1;
                        }
                        txn.put(table, &key, enc(&old));
                    }
                    (Some(_), None) => {
                        count -= 1;
                        txn.delete(table, &key);
                    }
                    (None, None) => {}
                }
            }
            _ => match then {
                Some(v) => txn.put(table, &key, v),
                None => txn.delete(table, &key),
            },
        }
    }
    txn.add_inodes(volume, count)?;
    Ok(MetaOk::Snapshot(undo))
}

/// Chunks kept rows name (every kept inode, whether a snapshot still reads it or a delete in
/// progress is about to drop it): garbage collection counts them as referenced. Up to `limit`
/// rows after `after`, and the key to continue after (`None` at the end).
pub fn kept_references<R: MetaRead>(
    r: &R,
    after: Option<&[u8]>,
    limit: usize,
) -> Result<(Vec<ChunkId>, Option<Vec<u8>>), FsError> {
    let rows = r.scan(Table::Snap, &[TAG_INODE], after, limit)?;
    let mut chunks = Vec::new();
    for (_, v) in &rows {
        if let Some(row) = dec::<Option<Vec<u8>>>(v)? {
            chunks.extend(chunks_of(&dec::<Stored>(&row)?.inode.content));
        }
    }
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|(k, _)| k.clone()))
        .flatten();
    Ok((chunks, next))
}

/// The bytes each chunk of a file holds (chunk `i` ends at the file's size or the next chunk).
fn chunk_bytes(s: &Stored, chunk_size: u64) -> Vec<(ChunkId, u64)> {
    let size = s.inode.attr.size;
    match &s.inode.content {
        Content::Chunks(m) => m
            .iter()
            .map(|(i, id)| {
                let start = i.saturating_mul(chunk_size);
                (*id, size.saturating_sub(start).min(chunk_size))
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Every inode of a namespace view (of one volume's, when given), page by page.
fn each_inode<R: MetaRead>(
    r: &R,
    volume: Option<VolumeNo>,
    mut f: impl FnMut(Stored),
) -> Result<(), FsError> {
    let prefix = volume.map(VolumeNo::to_be_bytes);
    each_row(
        r,
        Table::Inodes,
        prefix.as_ref().map_or(&[][..], |p| &p[..]),
        |_, v| {
            f(dec(&v)?);
            Ok(())
        },
    )
}

/// What snapshot `name` (every snapshot, without a name) holds; the live namespace is read
/// once for all of them.
pub fn usage<R: MetaRead>(
    r: &R,
    name: Option<&str>,
    chunk_size: u64,
) -> Result<Vec<SnapshotUsage>, FsError> {
    let infos = match name {
        Some(n) => vec![find(r, n)?],
        None => list(r)?,
    };
    let mut live: HashSet<ChunkId> = HashSet::new();
    if !infos.is_empty() {
        each_inode(r, None, |s| live.extend(chunks_of(&s.inode.content)))?;
    }
    infos
        .into_iter()
        .map(|info| {
            let view = SnapView {
                base: r,
                gen: info.gen,
            };
            let (mut files, mut bytes) = (0u64, 0u64);
            let mut only: BTreeMap<ChunkId, u64> = BTreeMap::new();
            let volume = volume_of_name(r, &info.name)?;
            each_inode(&view, Some(volume), |s| {
                files += 1;
                if s.inode.attr.kind == FileKind::Regular {
                    bytes += s.inode.attr.size;
                }
                for (id, n) in chunk_bytes(&s, chunk_size) {
                    if !live.contains(&id) {
                        only.insert(id, n);
                    }
                }
            })?;
            Ok(SnapshotUsage {
                info,
                files,
                bytes,
                only_bytes: only.values().sum(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{create_op, mkdir, vol};
    use super::super::{chunk_references, released, MemMeta};
    use super::*;
    use mortar_proto::wire::{MetaOp, Query, RefCursor};
    use mortar_proto::{Attr, InodeId, ROOT_INODE};
    use proptest::prelude::*;

    type Rows = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

    /// The namespace a view shows: every inode (version left out: a restore raises it) and
    /// every entry.
    fn state<R: MetaRead>(r: &R) -> Rows {
        let mut out = BTreeMap::new();
        for table in [Table::Inodes, Table::Dentries] {
            for (k, v) in r.scan(table, &[], None, usize::MAX).unwrap() {
                let v = if table == Table::Inodes {
                    let mut s: Stored = dec(&v).unwrap();
                    s.inode.attr.version = 0;
                    enc(&s)
                } else {
                    v
                };
                out.insert((table, k), v);
            }
        }
        out
    }

    fn attr(ok: MetaOk) -> Attr {
        match ok {
            MetaOk::Attr(a) => a,
            other => panic!("not attributes: {other:?}"),
        }
    }

    fn lookup<R: MetaRead>(r: &R, parent: InodeId, name: &str) -> Option<Attr> {
        super::super::query(
            r,
            &Query::Lookup {
                parent,
                name: name.into(),
            },
        )
        .ok()
        .map(attr)
    }

    fn mknod(m: &mut MemMeta, parent: InodeId, name: &str) -> Result<MetaOk, FsError> {
        m.run(create_op(parent, name))
    }

    fn write(m: &mut MemMeta, parent: InodeId, name: &str, content: Content) {
        if let Some(a) = lookup(m, parent, name) {
            let size = match &content {
                Content::Inline(b) => b.len() as u64,
                _ => 10,
            };
            let _ = m.run(MetaOp::SetContent {
                ino: a.ino,
                expect_version: a.version,
                size,
                content,
            });
        }
    }

    fn snap(m: &mut MemMeta, name: &str) -> Result<MetaOk, FsError> {
        m.run(MetaOp::CreateSnapshot {
            name: name.into(),
            keep: None,
        })
    }

    fn kept_rows(m: &MemMeta) -> usize {
        m.data.keys().filter(|(t, _)| *t == Table::Snap).count()
    }

    #[test]
    fn a_snapshot_shows_the_namespace_as_it_was_and_a_restore_brings_it_back() {
        let mut m = vol();
        mknod(&mut m, ROOT_INODE, "index.php").unwrap();
        write(
            &mut m,
            ROOT_INODE,
            "index.php",
            Content::Inline(b"v1".to_vec()),
        );
        let v1 = state(&m);
        let made = snap(&mut m, "before").unwrap();
        assert!(matches!(made, MetaOk::Snapshot(ref s) if s.name == "before" && s.gen == 1));
        // Taking it copied nothing.
        assert_eq!(kept_rows(&m), 0);
        write(
            &mut m,
            ROOT_INODE,
            "index.php",
            Content::Inline(b"v2!".to_vec()),
        );
        mknod(&mut m, ROOT_INODE, "new.php").unwrap();
        let v2 = state(&m);
        assert_ne!(v1, v2);
        let view = SnapView::open(&m, "before").unwrap();
        assert_eq!(state(&view), v1);
        assert!(lookup(&view, ROOT_INODE, "new.php").is_none());
        assert_eq!(lookup(&view, ROOT_INODE, "index.php").unwrap().size, 2);
        // Only the rows changed were kept: the file, the root and the new entry.
        assert_eq!(kept_rows(&m), 4, "index.php, root, new.php inode and entry");

        let undo = m
            .run(MetaOp::RestoreSnapshot {
                name: "before".into(),
                undo: "undo-1".into(),
            })
            .unwrap();
        assert!(matches!(undo, MetaOk::Snapshot(ref s) if s.name == "undo-1"));
        assert_eq!(state(&m), v1);
        assert_eq!(super::super::inode_count(&m).unwrap(), 2);
        // The version went up, past both: caches and writers see a change.
        let f = lookup(&m, ROOT_INODE, "index.php").unwrap();
        assert_eq!(f.version, 3);
        // And the undo snapshot holds v2.
        assert_eq!(state(&SnapView::open(&m, "undo-1").unwrap()), v2);
        m.run(MetaOp::RestoreSnapshot {
            name: "undo-1".into(),
            undo: "undo-2".into(),
        })
        .unwrap();
        assert_eq!(state(&m), v2);
    }

    #[test]
    fn bad_names_and_missing_snapshots_are_refused_and_change_nothing() {
        let mut m = vol();
        snap(&mut m, "a").unwrap();
        let before = m.data.clone();
        assert_eq!(snap(&mut m, "a"), Err(FsError::Exists));
        for bad in ["", "-x", ".x", "a/b", "a@b", "a b", &"x".repeat(65)] {
            assert!(
                matches!(snap(&mut m, bad), Err(FsError::Invalid(_))),
                "{bad:?}"
            );
        }
        let missing = || Err(FsError::NoSnapshot("nope".into()));
        assert_eq!(
            m.run(MetaOp::DeleteSnapshot {
                name: "nope".into()
            }),
            missing()
        );
        assert_eq!(
            m.run(MetaOp::RestoreSnapshot {
                name: "nope".into(),
                undo: "u".into()
            }),
            missing()
        );
        assert_eq!(
            m.run(MetaOp::RestoreSnapshot {
                name: "a".into(),
                undo: "a".into()
            }),
            Err(FsError::Exists)
        );
        assert!(matches!(
            super::super::query(
                &m,
                &Query::InSnapshot {
                    name: "nope".into(),
                    query: Box::new(Query::GetAttr { ino: ROOT_INODE })
                }
            ),
            Err(FsError::NoSnapshot(_))
        ));
        assert_eq!(m.data, before);
    }

    #[test]
    fn chunks_a_snapshot_names_stay_referenced_until_it_is_deleted() {
        let mut m = vol();
        mknod(&mut m, ROOT_INODE, "big").unwrap();
        let a = ChunkId::of(b"a");
        write(
            &mut m,
            ROOT_INODE,
            "big",
            Content::Chunks([(0, a)].into_iter().collect()),
        );
        snap(&mut m, "s").unwrap();
        m.run(MetaOp::Unlink {
            parent: ROOT_INODE,
            name: b"big".to_vec(),
        })
        .unwrap();
        let all_refs = |m: &MemMeta| {
            let mut out = Vec::new();
            let mut after: Option<RefCursor> = None;
            loop {
                let (page, next) = chunk_references(m, after, 2).unwrap();
                out.extend(page);
                match next {
                    Some(n) => after = Some(n),
                    None => return out,
                }
            }
        };
        assert_eq!(all_refs(&m), vec![a]);
        let usage = usage(&m, Some("s"), 1 << 20).unwrap().remove(0);
        assert_eq!((usage.files, usage.bytes, usage.only_bytes), (2, 10, 10));
        assert_eq!(usage, super::usage(&m, None, 1 << 20).unwrap().remove(0));
        m.run(MetaOp::DeleteSnapshot { name: "s".into() }).unwrap();
        assert_eq!(all_refs(&m), Vec::<ChunkId>::new());
        assert_eq!(kept_rows(&m), 0);
        assert!(released(&m, None, 10)
            .unwrap()
            .iter()
            .any(|(id, _)| *id == a));
    }

    #[test]
    fn retention_keeps_the_newest_of_a_series_only() {
        let mut m = vol();
        snap(&mut m, "before").unwrap();
        for i in 0..5 {
            m.run(MetaOp::CreateSnapshot {
                name: format!("hourly-{i}"),
                keep: Some(3),
            })
            .unwrap();
            mknod(&mut m, ROOT_INODE, &format!("f{i}")).unwrap();
        }
        let names: Vec<String> = list(&m).unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["before", "hourly-2", "hourly-3", "hourly-4"]);
        // The newest surviving snapshot still reads what it was taken with.
        let view = SnapView::open(&m, "hourly-2").unwrap();
        assert!(lookup(&view, ROOT_INODE, "f1").is_some());
        assert!(lookup(&view, ROOT_INODE, "f2").is_none());
        assert!(lookup(&SnapView::open(&m, "before").unwrap(), ROOT_INODE, "f0").is_none());
    }

    #[derive(Clone, Debug)]
    enum Step {
        Create(u8, u8),
        Mkdir(u8),
        Write(u8, u8, u8),
        Unlink(u8, u8),
        Rename(u8, u8, u8, u8),
        Snapshot,
        Delete(u8),
        Restore(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..3u8, 0..6u8).prop_map(|(d, f)| Step::Create(d, f)),
            1 => (1..3u8).prop_map(Step::Mkdir),
            4 => (0..3u8, 0..6u8, 0..4u8).prop_map(|(d, f, c)| Step::Write(d, f, c)),
            2 => (0..3u8, 0..6u8).prop_map(|(d, f)| Step::Unlink(d, f)),
            2 => (0..3u8, 0..6u8, 0..3u8, 0..6u8).prop_map(|(a, b, c, d)| Step::Rename(a, b, c, d)),
            2 => Just(Step::Snapshot),
            1 => any::<u8>().prop_map(Step::Delete),
            1 => any::<u8>().prop_map(Step::Restore),
        ]
    }

    /// Directory `d`: the root, or the root's subdirectory `dN` when it exists.
    fn dir(m: &MemMeta, d: u8) -> Option<InodeId> {
        if d == 0 {
            Some(ROOT_INODE)
        } else {
            lookup(m, ROOT_INODE, &format!("d{d}")).map(|a| a.ino)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Against a model that copies the whole namespace at every snapshot: each snapshot
        /// shows its copy after every step, a restore makes the namespace its copy, and once
        /// every snapshot is deleted no kept row is left.
        #[test]
        fn snapshots_match_full_copies(steps in proptest::collection::vec(step(), 1..60)) {
            let mut m = vol();
            let mut copies: Vec<(String, Rows)> = Vec::new();
            let mut made = 0;
            for s in steps {
                match s {
                    Step::Create(d, f) => if let Some(p) = dir(&m, d) {
                        let _ = mknod(&mut m, p, &format!("f{f}"));
                    },
                    Step::Mkdir(d) => {
                        let _ = m.run(MetaOp::Mkdir {
                            parent: ROOT_INODE, name: format!("d{d}").into(), perm: 0o755, uid: 0, gid: 0,
                        });
                    }
                    Step::Write(d, f, c) => if let Some(p) = dir(&m, d) {
                        write(&mut m, p, &format!("f{f}"), Content::Inline(vec![c; c as usize]));
                    },
                    Step::Unlink(d, f) => if let Some(p) = dir(&m, d) {
                        let _ = m.run(MetaOp::Unlink { parent: p, name: format!("f{f}").into() });
                    },
                    Step::Rename(a, b, c, d) => if let (Some(p), Some(np)) = (dir(&m, a), dir(&m, c)) {
                        let _ = m.run(MetaOp::Rename {
                            parent: p, name: format!("f{b}").into(),
                            new_parent: np, new_name: format!("f{d}").into(), flags: 0,
                        });
                    },
                    Step::Snapshot => {
                        made += 1;
                        let name = format!("s{made}");
                        snap(&mut m, &name).unwrap();
                        copies.push((name, state(&m)));
                    }
                    Step::Delete(i) => if !copies.is_empty() {
                        let (name, _) = copies.remove(i as usize % copies.len());
                        m.run(MetaOp::DeleteSnapshot { name }).unwrap();
                    },
                    Step::Restore(i) => if !copies.is_empty() {
                        let (name, copy) = copies[i as usize % copies.len()].clone();
                        made += 1;
                        let undo = format!("u{made}");
                        let now = state(&m);
                        m.run(MetaOp::RestoreSnapshot { name, undo: undo.clone() }).unwrap();
                        prop_assert_eq!(&state(&m), &copy);
                        copies.push((undo, now));
                    },
                }
                for (name, copy) in &copies {
                    prop_assert_eq!(&state(&SnapView::open(&m, name).unwrap()), copy, "snapshot {}", name);
                }
                let inodes = m.data.keys().filter(|(t, _)| *t == Table::Inodes).count() as u64;
                prop_assert_eq!(super::super::inode_count(&m).unwrap(), inodes);
            }
            for (name, _) in copies {
                m.run(MetaOp::DeleteSnapshot { name }).unwrap();
            }
            prop_assert_eq!(kept_rows(&m), 0);
        }
    }

    /// What a path shows, whatever inode number holds it: kind, mode, owner, size and content
    /// (and a file's mtime; a directory's times move with its entries).
    type Shown = (
        FileKind,
        u32,
        u32,
        u64,
        Content,
        Vec<(Vec<u8>, Vec<u8>)>,
        Option<Timestamp>,
    );

    fn entries<R: MetaRead>(r: &R, d: InodeId) -> Vec<(String, InodeId)> {
        r.scan(Table::Dentries, &d.to_be_bytes(), None, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k[8..].to_vec()).unwrap(), u64_of(Some(v))))
            .collect()
    }

    fn stored_of<R: MetaRead>(r: &R, ino: InodeId) -> Stored {
        dec(&r.get(Table::Inodes, &ino.to_be_bytes()).unwrap().unwrap()).unwrap()
    }

    /// Every path of a view (below the root, "/a/b" form) and what it shows.
    fn paths<R: MetaRead>(r: &R) -> BTreeMap<String, Shown> {
        let mut out = BTreeMap::new();
        let mut dirs = vec![(String::new(), ROOT_INODE)];
        while let Some((at, d)) = dirs.pop() {
            for (name, c) in entries(r, d) {
                let s = stored_of(r, c);
                let a = &s.inode.attr;
                let path = format!("{at}/{name}");
                let dir = a.kind == FileKind::Directory;
                out.insert(
                    path.clone(),
                    (
                        a.kind,
                        a.perm,
                        a.uid,
                        a.size,
                        s.inode.content.clone(),
                        s.inode.xattrs.clone(),
                        (!dir).then_some(a.mtime),
                    ),
                );
                if dir {
                    dirs.push((path, c));
                }
            }
        }
        out
    }

    /// The namespace is whole: every entry names an inode, every inode is reachable, a
    /// directory has one entry, its parent and 2 + subdirectories links, a file as many links
    /// as entries, and the inode count is right.
    fn whole(m: &MemMeta) -> Result<(), String> {
        let mut names: BTreeMap<InodeId, u32> = BTreeMap::new();
        let mut subdirs: BTreeMap<InodeId, u32> = BTreeMap::new();
        let mut seen = BTreeSet::from([ROOT_INODE]);
        let mut dirs = vec![ROOT_INODE];
        while let Some(d) = dirs.pop() {
            for (name, c) in entries(m, d) {
                let Some(row) = m.get(Table::Inodes, &c.to_be_bytes()).unwrap() else {
                    return Err(format!("entry {name} in {d} names missing inode {c}"));
                };
                let s: Stored = dec(&row).unwrap();
                *names.entry(c).or_default() += 1;
                if s.inode.attr.kind == FileKind::Directory {
                    *subdirs.entry(d).or_default() += 1;
                    if s.parent != d {
                        return Err(format!(
                            "directory {c} in {d} says its parent is {}",
                            s.parent
                        ));
                    }
                }
                if seen.insert(c) && s.inode.attr.kind == FileKind::Directory {
                    dirs.push(c);
                }
            }
        }
        let rows: Vec<InodeId> = m
            .data
            .keys()
            .filter(|(t, _)| *t == Table::Inodes)
            .map(|(_, k)| u64::from_be_bytes(k[..].try_into().unwrap()))
            .collect();
        for &ino in &rows {
            if !seen.contains(&ino) {
                return Err(format!("inode {ino} is not reachable"));
            }
            let a = stored_of(m, ino).inode.attr;
            let want = if a.kind == FileKind::Directory {
                if ino != ROOT_INODE && names.get(&ino) != Some(&1) {
                    return Err(format!("directory {ino} has {:?} entries", names.get(&ino)));
                }
                2 + subdirs.get(&ino).copied().unwrap_or(0)
            } else {
                names[&ino]
            };
            if a.nlink != want {
                return Err(format!(
                    "inode {ino} has nlink {} for {want} links",
                    a.nlink
                ));
            }
        }
        let count = super::super::inode_count(m).unwrap();
        if count != rows.len() as u64 {
            return Err(format!("inode count {count} for {} inodes", rows.len()));
        }
        Ok(())
    }

    fn at_path(m: &MemMeta, path: &str) -> Option<InodeId> {
        path.split('/')
            .filter(|p| !p.is_empty())
            .try_fold(ROOT_INODE, |d, p| lookup(m, d, p).map(|a| a.ino))
    }

    fn under(path: &str, top: &str) -> bool {
        path == top || path.starts_with(&format!("{top}/"))
    }

    fn restore_path_op(name: &str, undo: &str, path: &str) -> MetaOp {
        MetaOp::RestorePath {
            name: name.into(),
            undo: undo.into(),
            path: path.into(),
        }
    }

    #[test]
    fn a_path_is_restored_and_nothing_outside_it_changes() {
        let mut m = vol();
        let themes = mkdir(&mut m, ROOT_INODE, "themes").unwrap();
        mknod(&mut m, themes.ino, "style.css").unwrap();
        write(
            &mut m,
            themes.ino,
            "style.css",
            Content::Inline(b"v1".to_vec()),
        );
        mknod(&mut m, ROOT_INODE, "index.php").unwrap();
        snap(&mut m, "before").unwrap();
        let then = paths(&m);
        write(
            &mut m,
            themes.ino,
            "style.css",
            Content::Inline(b"v2!".to_vec()),
        );
        mknod(&mut m, themes.ino, "new.css").unwrap();
        write(
            &mut m,
            ROOT_INODE,
            "index.php",
            Content::Inline(b"live".to_vec()),
        );
        let live = paths(&m);
        m.run(restore_path_op("before", "undo", "/themes")).unwrap();
        let now = paths(&m);
        for (p, shown) in &now {
            let want = if under(p, "/themes") {
                &then[p]
            } else {
                &live[p]
            };
            assert_eq!(shown, want, "{p}");
        }
        assert!(!now.contains_key("/themes/new.css"));
        assert_eq!(now["/index.php"].4, Content::Inline(b"live".to_vec()));
        whole(&m).unwrap();
        // The undo snapshot holds the namespace as it was before.
        assert_eq!(paths(&SnapView::open(&m, "undo").unwrap()), live);
        // The file kept its number, with a higher version.
        let css = lookup(&m, themes.ino, "style.css").unwrap();
        assert_eq!(at_path(&m, "/themes/style.css"), Some(css.ino));
        assert!(css.version > 2);
    }

    #[test]
    fn a_directory_moved_out_comes_back_as_a_copy() {
        let mut m = vol();
        let mk = |m: &mut MemMeta, parent, name: &str| mkdir(m, parent, name).unwrap();
        let a = mk(&mut m, ROOT_INODE, "a");
        let b = mk(&mut m, a.ino, "b");
        mknod(&mut m, b.ino, "f").unwrap();
        let f = lookup(&m, b.ino, "f").unwrap();
        // A hard link outside the path.
        m.run(MetaOp::Link {
            ino: f.ino,
            new_parent: ROOT_INODE,
            new_name: b"f-link".to_vec(),
        })
        .unwrap();
        snap(&mut m, "s").unwrap();
        let then = paths(&m);
        // b moves out of /a, and /a gets a new b.
        m.run(MetaOp::Rename {
            parent: a.ino,
            name: b"b".to_vec(),
            new_parent: ROOT_INODE,
            new_name: b"b-moved".to_vec(),
            flags: 0,
        })
        .unwrap();
        mk(&mut m, a.ino, "b");
        m.run(restore_path_op("s", "u", "/a")).unwrap();
        whole(&m).unwrap();
        let now = paths(&m);
        assert_eq!(now["/a/b/f"], then["/a/b/f"]);
        assert!(now.contains_key("/b-moved/f"), "outside the path stays");
        let restored = at_path(&m, "/a/b").unwrap();
        assert_ne!(
            restored, b.ino,
            "the moved directory stays where it went; a copy returns"
        );
        assert_eq!(at_path(&m, "/b-moved"), Some(b.ino));
        // The file is linked from /b-moved and /f-link live: the restored one is a copy.
        assert_ne!(at_path(&m, "/a/b/f"), Some(f.ino));
        assert_eq!(lookup(&m, b.ino, "f").unwrap().nlink, 2);
    }

    #[test]
    fn bad_paths_are_refused_and_change_nothing() {
        let mut m = vol();
        mknod(&mut m, ROOT_INODE, "index.php").unwrap();
        snap(&mut m, "s").unwrap();
        let before = m.data.clone();
        for bad in [
            "",
            "/",
            "//",
            "relative",
            "/nope",
            "/index.php/x",
            "/a/../b",
            "/x\0y",
        ] {
            assert!(
                matches!(
                    m.run(restore_path_op("s", "u", bad)),
                    Err(FsError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            m.run(restore_path_op("nope", "u", "/index.php")),
            Err(FsError::NoSnapshot("nope".into()))
        );
        assert_eq!(
            m.run(restore_path_op("s", "s", "/index.php")),
            Err(FsError::Exists)
        );
        assert_eq!(m.data, before);
    }

    #[derive(Clone, Debug)]
    enum TreeStep {
        Create(u8, u8),
        Write(u8, u8, u8),
        Unlink(u8, u8),
        Link(u8, u8, u8, u8),
        Rename(u8, u8, u8, u8),
        MoveDir(u8, u8),
        Snapshot,
        RestorePath(u8, u8),
    }

    /// Directories by number: the root, /d1, /d2, /d1/e.
    const DIRS: [&str; 4] = ["", "/d1", "/d2", "/d1/e"];
    const RESTORED: [&str; 6] = ["/d1", "/d2", "/d1/e", "/f0", "/d1/f1", "/d2/e"];

    fn tree_step() -> impl Strategy<Value = TreeStep> {
        prop_oneof![
            4 => (0..4u8, 0..4u8).prop_map(|(d, f)| TreeStep::Create(d, f)),
            3 => (0..4u8, 0..4u8, 0..4u8).prop_map(|(d, f, c)| TreeStep::Write(d, f, c)),
            2 => (0..4u8, 0..4u8).prop_map(|(d, f)| TreeStep::Unlink(d, f)),
            2 => (0..4u8, 0..4u8, 0..4u8, 0..4u8).prop_map(|(a, b, c, d)| TreeStep::Link(a, b, c, d)),
            2 => (0..4u8, 0..4u8, 0..4u8, 0..4u8).prop_map(|(a, b, c, d)| TreeStep::Rename(a, b, c, d)),
            2 => (1..4u8, 0..4u8).prop_map(|(a, b)| TreeStep::MoveDir(a, b)),
            2 => Just(TreeStep::Snapshot),
            2 => (any::<u8>(), 0..6u8).prop_map(|(s, p)| TreeStep::RestorePath(s, p)),
        ]
    }

    fn mkdir_path(m: &mut MemMeta, path: &str) {
        let (up, name) = path.rsplit_once('/').unwrap();
        if let Some(p) = at_path(m, up) {
            let _ = mkdir(m, p, name);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// A path restore makes the paths under it show the snapshot's and leaves every other
        /// path as it was; the namespace stays whole and every snapshot keeps what it holds.
        #[test]
        fn a_path_restore_changes_exactly_the_path(steps in proptest::collection::vec(tree_step(), 1..50)) {
            let mut m = vol();
            for d in &DIRS[1..] {
                mkdir_path(&mut m, d);
            }
            let mut copies: Vec<(String, Rows)> = Vec::new();
            let mut made = 0;
            let d = |m: &MemMeta, i: u8| at_path(m, DIRS[i as usize]);
            for s in steps {
                match s {
                    TreeStep::Create(a, f) => if let Some(p) = d(&m, a) {
                        let _ = mknod(&mut m, p, &format!("f{f}"));
                    },
                    TreeStep::Write(a, f, c) => if let Some(p) = d(&m, a) {
                        write(&mut m, p, &format!("f{f}"), Content::Inline(vec![c; c as usize]));
                    },
                    TreeStep::Unlink(a, f) => if let Some(p) = d(&m, a) {
                        let _ = m.run(MetaOp::Unlink { parent: p, name: format!("f{f}").into() });
                    },
                    TreeStep::Link(a, f, b, g) => if let (Some(p), Some(q)) = (d(&m, a), d(&m, b)) {
                        if let Some(file) = lookup(&m, p, &format!("f{f}")) {
                            if file.kind != FileKind::Directory {
                                let _ = m.run(MetaOp::Link {
                                    ino: file.ino, new_parent: q, new_name: format!("f{g}").into(),
                                });
                            }
                        }
                    },
                    TreeStep::Rename(a, f, b, g) => if let (Some(p), Some(q)) = (d(&m, a), d(&m, b)) {
                        let _ = m.run(MetaOp::Rename {
                            parent: p, name: format!("f{f}").into(),
                            new_parent: q, new_name: format!("f{g}").into(), flags: 0,
                        });
                    },
                    // A directory moves to where another is expected (its place refilled
                    // later by a fresh one), or back.
                    TreeStep::MoveDir(a, b) => if let (Some(_), Some(q)) = (d(&m, a), d(&m, b)) {
                        let (up, name) = DIRS[a as usize].rsplit_once('/').unwrap();
                        if let Some(p) = at_path(&m, up) {
                            let moved = format!("moved{made}");
                            made += 1;
                            let _ = m.run(MetaOp::Rename {
                                parent: p, name: name.into(),
                                new_parent: q, new_name: moved.into(), flags: 0,
                            });
                            mkdir_path(&mut m, DIRS[a as usize]);
                        }
                    },
                    TreeStep::Snapshot => {
                        made += 1;
                        let name = format!("s{made}");
                        snap(&mut m, &name).unwrap();
                        copies.push((name, state(&m)));
                    }
                    TreeStep::RestorePath(i, p) => if !copies.is_empty() {
                        let (name, _) = copies[i as usize % copies.len()].clone();
                        let path = RESTORED[p as usize];
                        made += 1;
                        let undo = format!("u{made}");
                        let live = paths(&m);
                        let then = paths(&SnapView::open(&m, &name).unwrap());
                        let live_state = state(&m);
                        match m.run(restore_path_op(&name, &undo, path)) {
                            Ok(_) => {
                                let now = paths(&m);
                                let want: BTreeMap<String, Shown> = live
                                    .iter()
                                    .filter(|(k, _)| !under(k, path))
                                    .chain(then.iter().filter(|(k, _)| under(k, path)))
                                    .map(|(k, v)| (k.clone(), v.clone()))
                                    .collect();
                                // The parent directory of the path is touched; compare the rest.
                                prop_assert_eq!(&now, &want, "restore of {} from {}", path, name);
                                copies.push((undo, live_state));
                            }
                            Err(FsError::Invalid(_)) => {
                                // Only when the path is not in the snapshot, or its directory
                                // is not live.
                                let up = path.rsplit_once('/').unwrap().0;
                                prop_assert!(!then.contains_key(path) || (!up.is_empty() && !live.contains_key(up)));
                                prop_assert_eq!(&state(&m), &live_state);
                            }
                            Err(e) => prop_assert!(false, "restore failed: {e:?}"),
                        }
                    },
                }
                if let Err(e) = whole(&m) {
                    prop_assert!(false, "{}", e);
                }
                for (name, copy) in &copies {
                    prop_assert_eq!(&state(&SnapView::open(&m, name).unwrap()), copy, "snapshot {}", name);
                }
            }
        }
    }
}
