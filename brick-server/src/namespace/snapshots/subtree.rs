//! Restoring one path from a snapshot (`snapshot restore --path`): the tree at the path becomes
//! the snapshot's tree there, and nothing outside it changes.
//!
//! The rules:
//! - Both trees are read whole (the snapshot's and the live one at the path): the work is in
//!   proportion to the subtree, not to what changed since.
//! - An inode keeps its number when it is live only inside the path or not live at all
//!   (numbers are never reused). One with a live name outside the path (a directory moved out,
//!   a hard link) is restored as a copy under a new number: one inode in two places would be a
//!   directory hard link, or change a file outside the path.
//! - A live inode of the path that the restored tree does not hold under its number loses the
//!   links the path gave it, and goes when none is left.
//! - So a restored file's links are all inside the path: its link count is the restored tree's;
//!   a directory's is the snapshot's, whose children all come back with it.

use super::super::{
    dec, dentry_key, each_row, enc, ino_key, released_key, u64_of, MetaRead, Stored, Table, Txn,
};
use super::{chunks_of, find, record, restored_volume, SnapView};
use mortar_proto::wire::MetaOk;
use mortar_proto::{
    root_of, validate_name, volume_of, ChunkId, FileKind, FsError, InodeId, Timestamp,
};
use std::collections::{BTreeMap, HashSet, VecDeque};

/// The components of an absolute path below the root.
fn components(path: &str) -> Result<Vec<&[u8]>, FsError> {
    if !path.starts_with('/') {
        return Err(FsError::Invalid(format!(
            "the path to restore must be absolute (start with '/'): '{path}'"
        )));
    }
    let parts: Vec<&[u8]> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .map(str::as_bytes)
        .collect();
    if parts.is_empty() {
        return Err(FsError::Invalid(
            "the path to restore is the whole volume: restore without --path".into(),
        ));
    }
    for p in &parts {
        validate_name(p)
            .map_err(|_| FsError::Invalid(format!("'{path}' is not a path a volume can hold")))?;
    }
    Ok(parts)
}

fn child<R: MetaRead>(r: &R, dir: InodeId, name: &[u8]) -> Result<Option<InodeId>, FsError> {
    Ok(r.get(Table::Dentries, &dentry_key(dir, name))?
        .map(|b| u64_of(Some(b))))
}

fn stored<R: MetaRead>(r: &R, ino: InodeId) -> Result<Option<Stored>, FsError> {
    r.get(Table::Inodes, &ino_key(ino))?
        .map(|b| dec(&b))
        .transpose()
}

/// The directory at `parts` below `root`, if there is one.
fn walk<R: MetaRead>(r: &R, root: InodeId, parts: &[&[u8]]) -> Result<Option<InodeId>, FsError> {
    let mut at = root;
    for p in parts {
        match child(r, at, p)? {
            Some(c) if stored(r, c)?.is_some_and(|s| s.inode.attr.kind == FileKind::Directory) => {
                at = c
            }
            _ => return Ok(None),
        }
    }
    Ok(Some(at))
}

/// A subtree as one view holds it: its inodes, its entries, and how many of each inode's links
/// it holds (the top's link from its parent included).
#[derive(Default)]
struct Tree {
    inodes: BTreeMap<InodeId, Stored>,
    entries: Vec<(InodeId, Vec<u8>, InodeId)>,
    links: BTreeMap<InodeId, u32>,
}

impl Tree {
    fn gather<R: MetaRead>(r: &R, top: InodeId) -> Result<Tree, FsError> {
        let mut t = Tree::default();
        let missing = |ino| FsError::Io(format!("entry names inode {ino}, which is missing"));
        t.inodes
            .insert(top, stored(r, top)?.ok_or_else(|| missing(top))?);
        t.links.insert(top, 1);
        let mut dirs = VecDeque::from([top]);
        while let Some(d) = dirs.pop_front() {
            if t.inodes[&d].inode.attr.kind != FileKind::Directory {
                continue;
            }
            let mut found = Vec::new();
            each_row(r, Table::Dentries, &d.to_be_bytes(), |k, v| {
                found.push((k[8..].to_vec(), u64_of(Some(v))));
                Ok(())
            })?;
            for (name, c) in found {
                *t.links.entry(c).or_default() += 1;
                if let std::collections::btree_map::Entry::Vacant(e) = t.inodes.entry(c) {
                    e.insert(stored(r, c)?.ok_or_else(|| missing(c))?);
                    dirs.push_back(c);
                }
                t.entries.push((d, name, c));
            }
        }
        Ok(t)
    }
}

/// Make the tree at `path` snapshot `name`'s tree there, after recording the namespace as
/// snapshot `undo`.
pub(in crate::namespace) fn restore_path<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    name: &str,
    undo: &str,
    path: &str,
    now: Timestamp,
) -> Result<MetaOk, FsError> {
    let target = find(txn.base, name)?;
    let root = root_of(restored_volume(txn.base, name, undo)?);
    let parts = components(path)?;
    let (leaf, above) = parts.split_last().expect("at least one component");
    let snap = SnapView {
        base: txn.base,
        gen: target.gen,
    };
    let then_top = walk(&snap, root, above)?
        .map(|d| child(&snap, d, leaf))
        .transpose()?
        .flatten()
        .ok_or_else(|| FsError::Invalid(format!("'{path}' is not in snapshot '{name}'")))?;
    let parent = walk(txn.base, root, above)?.ok_or_else(|| {
        FsError::Invalid(format!(
            "the directory holding '{path}' does not exist now: restore it (or its parent) first"
        ))
    })?;
    let now_top = child(txn.base, parent, leaf)?;
    let then = Tree::gather(&snap, then_top)?;
    let live = match now_top {
        Some(top) => Tree::gather(txn.base, top)?,
        None => Tree::default(),
    };
    let info = record(txn, undo, now)?;

    // The number each of the snapshot's inodes comes back under.
    let mut number: BTreeMap<InodeId, InodeId> = BTreeMap::new();
    for &ino in then.inodes.keys() {
        let linked_outside = match live.inodes.get(&ino) {
            Some(s) => {
                s.inode.attr.nlink > live.links[&ino] && s.inode.attr.kind != FileKind::Directory
            }
            None => stored(txn.base, ino)?.is_some(),
        };
        // `new_ino` counts the inode it hands out.
        let n = if linked_outside {
            txn.new_ino(mortar_proto::volume_of(ino))?
        } else {
            ino
        };
        number.insert(ino, n);
    }
    let restored: HashSet<InodeId> = number.values().copied().collect();

    for (d, name, _) in &live.entries {
        txn.delete(Table::Dentries, &dentry_key(*d, name));
    }
    for (&ino, s) in &live.inodes {
        if restored.contains(&ino) {
            continue;
        }
        let mut s = s.clone();
        let inside = live.links[&ino];
        if s.inode.attr.kind != FileKind::Directory && s.inode.attr.nlink > inside {
            s.inode.attr.nlink -= inside;
            s.inode.attr.ctime = now;
            s.inode.attr.version += 1;
            txn.put(Table::Inodes, &ino_key(ino), enc(&s));
        } else {
            for id in chunks_of(&s.inode.content) {
                txn.put(Table::Sys, &released_key(&id), enc(&now));
            }
            txn.delete(Table::Inodes, &ino_key(ino));
            txn.add_inodes(volume_of(root), -1)?;
        }
    }
    for (&old, s) in &then.inodes {
        let n = number[&old];
        let mut s = s.clone();
        let cur = live.inodes.get(&n).filter(|_| n == old);
        s.inode.attr.ino = n;
        if old == then_top {
            s.parent = parent;
        } else if let Some(p) = number.get(&s.parent) {
            s.parent = *p;
        }
        if s.inode.attr.kind != FileKind::Directory {
            s.inode.attr.nlink = then.links[&old];
        }
        match cur {
            Some(c) => {
                // Versions only grow: a cache holding the current one must see a change.
                s.inode.attr.version = s.inode.attr.version.max(c.inode.attr.version) + 1;
                let kept: HashSet<ChunkId> = chunks_of(&s.inode.content).into_iter().collect();
                for id in chunks_of(&c.inode.content) {
                    if !kept.contains(&id) {
                        txn.put(Table::Sys, &released_key(&id), enc(&now));
                    }
                }
            }
            None if n == old => txn.add_inodes(volume_of(root), 1)?,
            None => {}
        }
        txn.put(Table::Inodes, &ino_key(n), enc(&s));
    }
    for (d, name, c) in &then.entries {
        txn.put(
            Table::Dentries,
            &dentry_key(number[d], name),
            number[c].to_be_bytes().to_vec(),
        );
    }
    let top = number[&then_top];
    txn.put(
        Table::Dentries,
        &dentry_key(parent, leaf),
        top.to_be_bytes().to_vec(),
    );
    let is_dir = |t: &Tree, ino: Option<InodeId>| {
        ino.and_then(|i| t.inodes.get(&i))
            .is_some_and(|s| s.inode.attr.kind == FileKind::Directory)
    };
    let delta = i32::from(is_dir(&then, Some(then_top))) - i32::from(is_dir(&live, now_top));
    txn.touch_dir(parent, delta, now)?;
    Ok(MetaOk::Snapshot(info))
}
