//! Clones (`mortar snapshot clone www NAME www-staging`): a writable volume made from a
//! snapshot, served by the same bricks and sharing every chunk.
//!
//! The rules:
//! - A clone is volume number n ≥ 1 of the metadata group; its inodes carry n in their top
//!   bits ([`mortar_proto::volume_of`]), its root is [`mortar_proto::root_of`]`(n)`. Numbers
//!   never collide, so caches, invalidations, delegations and the reference scan of garbage
//!   collection treat a clone's inodes as any others.
//! - Making one copies the snapshot's inode and entry rows of its volume under the new number,
//!   in the one change that records it: every replica applies it or none does. Chunks are
//!   named, not copied (they are immutable and content-addressed).
//! - A clone has its own inode numbers (`next_ino/<n>`), its own snapshots (named
//!   `CLONE@NAME`), and restores that change only its rows. Renames and links never cross
//!   volumes.

use super::snapshots::{self, SnapView};
use super::volume::{self, clone_key, clone_record};
use super::{
    dec, each_row, enc, inode_count_key, inodes_of, next_ino_key, u64_of, MetaRead, Stored, Table,
    Txn,
};
use mortar_proto::wire::split_snapshot_name;
use mortar_proto::wire::{CloneInfo, MetaOk};
use mortar_proto::{ino_in, valid_volume_name, FsError, InodeId, Timestamp, VolumeNo};

/// The number the next clone gets.
const KEY_NEXT_VOLUME: &[u8] = b"clone_next";

/// Make volume `name` from snapshot `snapshot`.
pub(super) fn create<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    snapshot: &str,
    name: &str,
    now: Timestamp,
) -> Result<MetaOk, FsError> {
    if !valid_volume_name(name) {
        return Err(FsError::Invalid(format!(
            "invalid volume name '{name}': use 1-64 letters, digits, '-' or '_'"
        )));
    }
    if volume::current(txn)?.name == name || txn.get(Table::Sys, &clone_key(name))?.is_some() {
        return Err(FsError::Exists);
    }
    let from = snapshots::volume_of_name(txn.base, snapshot)?;
    let snap = snapshots::find(txn.base, snapshot)?;
    let number = u64_of(txn.get(Table::Sys, KEY_NEXT_VOLUME)?).max(1);
    let volume = VolumeNo::try_from(number)
        .map_err(|_| FsError::NoSpace("every clone number has been used".into()))?;
    let ours = |ino: InodeId| ino_in(volume, ino);
    let base = txn.base;
    let view = SnapView::at(base, snap.gen);
    let prefix = from.to_be_bytes();
    let mut files = 0u64;
    each_row(&view, Table::Inodes, &prefix, |_, v| {
        let mut s: Stored = dec(&v)?;
        s.inode.attr.ino = ours(s.inode.attr.ino);
        s.parent = ours(s.parent);
        txn.save(&s);
        files += 1;
        Ok(())
    })?;
    each_row(&view, Table::Dentries, &prefix, |k, v| {
        let (parent, name) = k.split_at(8);
        let parent = ours(u64_of(Some(parent.to_vec())));
        let child = ours(u64_of(Some(v)));
        txn.set_child(parent, name, child);
        Ok(())
    })?;
    // Numbers the clone hands out start where its origin's did when the clone was made.
    let next = ours(txn.next_ino(from)?);
    txn.put(
        Table::Sys,
        &next_ino_key(volume),
        next.to_be_bytes().to_vec(),
    );
    txn.add_inodes(volume, files as i64)?;
    txn.put(
        Table::Sys,
        KEY_NEXT_VOLUME,
        (number + 1).to_be_bytes().to_vec(),
    );
    let info = CloneInfo {
        name: name.to_string(),
        volume,
        snapshot: snapshot.to_string(),
        index: txn.index,
        created: now,
        files,
    };
    txn.put(Table::Sys, &clone_key(name), enc(&info));
    Ok(MetaOk::Clone(info))
}

/// Erase clone `name`: its snapshots, its tree and every row kept of it, in one change. Chunks
/// only it named are released (the next heal after the grace frees them). Its number is never
/// given again, so a mount still holding its inode numbers can never reach another clone's.
pub(super) fn drop<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    name: &str,
    now: Timestamp,
) -> Result<MetaOk, FsError> {
    let info = clone_record(txn.base, name)?;
    let base = txn.base;
    for s in snapshots::list(base)? {
        if split_snapshot_name(&s.name).0 == Some(name) {
            snapshots::remove(txn, &s.name, now)?;
        }
    }
    snapshots::drop_kept(txn, info.volume, now)?;
    let prefix = info.volume.to_be_bytes();
    each_row(base, Table::Inodes, &prefix, |k, v| {
        txn.release(&dec::<Stored>(&v)?.inode.content, None, now);
        txn.delete(Table::Inodes, &k);
        Ok(())
    })?;
    each_row(base, Table::Dentries, &prefix, |k, _| {
        txn.delete(Table::Dentries, &k);
        Ok(())
    })?;
    let count = inodes_of(txn, info.volume)?;
    txn.add_inodes(info.volume, -(count as i64))?;
    for key in [
        inode_count_key(info.volume),
        next_ino_key(info.volume),
        clone_key(name),
    ] {
        txn.delete(Table::Sys, &key);
    }
    Ok(MetaOk::Done)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{create_op, mkdir, vol};
    use super::super::{chunk_references, query, MemMeta};
    use super::*;
    use mortar_proto::wire::{MetaOp, Query};
    use mortar_proto::{root_of, volume_of, Attr, ChunkId, Content, ROOT_INODE};
    use std::collections::BTreeMap;

    fn lookup(m: &MemMeta, parent: InodeId, name: &str) -> Result<Attr, FsError> {
        match query(
            m,
            &Query::Lookup {
                parent,
                name: name.into(),
            },
        )? {
            MetaOk::Attr(a) => Ok(a),
            other => panic!("not attributes: {other:?}"),
        }
    }

    fn content(m: &MemMeta, ino: InodeId) -> Content {
        match query(m, &Query::GetInode { ino }).unwrap() {
            MetaOk::Inode(i) => i.content,
            other => panic!("not an inode: {other:?}"),
        }
    }

    fn set(m: &mut MemMeta, ino: InodeId, c: Content) {
        let a = match query(m, &Query::GetAttr { ino }).unwrap() {
            MetaOk::Attr(a) => a,
            other => panic!("{other:?}"),
        };
        let size = match &c {
            Content::Inline(b) => b.len() as u64,
            _ => 10,
        };
        m.run(MetaOp::SetContent {
            ino,
            expect_version: a.version,
            size,
            content: c,
        })
        .unwrap();
    }

    fn run(m: &mut MemMeta, op: MetaOp) -> MetaOk {
        m.run(op).unwrap()
    }

    fn clone(m: &mut MemMeta, snapshot: &str, name: &str) -> Result<CloneInfo, FsError> {
        match m.run(MetaOp::CloneSnapshot {
            snapshot: snapshot.into(),
            name: name.into(),
        })? {
            MetaOk::Clone(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    /// Take snapshot `name`; the files it counts.
    fn snapshot(m: &mut MemMeta, name: &str) -> u64 {
        match run(
            m,
            MetaOp::CreateSnapshot {
                name: name.into(),
                keep: None,
            },
        ) {
            MetaOk::Snapshot(s) => s.files,
            other => panic!("{other:?}"),
        }
    }

    fn references(m: &MemMeta) -> Vec<ChunkId> {
        let (mut all, mut after) = (Vec::new(), None);
        loop {
            let (ids, next) = chunk_references(m, after, 1000).unwrap();
            all.extend(ids);
            match next {
                Some(n) => after = Some(n),
                None => return all,
            }
        }
    }

    /// www: /index.php (inline "v1") and /wp/big (one chunk A); snapshot "before"; then
    /// index.php says "v2" and big is unlinked.
    fn deployed() -> (MemMeta, ChunkId) {
        let mut m = vol();
        let index = match run(&mut m, create_op(ROOT_INODE, "index.php")) {
            MetaOk::Attr(a) => a.ino,
            other => panic!("{other:?}"),
        };
        set(&mut m, index, Content::Inline(b"v1".to_vec()));
        let wp = mkdir(&mut m, ROOT_INODE, "wp").unwrap().ino;
        let big = match run(&mut m, create_op(wp, "big")) {
            MetaOk::Attr(a) => a.ino,
            other => panic!("{other:?}"),
        };
        let a = ChunkId([7; 32]);
        set(&mut m, big, Content::Chunks([(0, a)].into_iter().collect()));
        snapshot(&mut m, "before");
        set(&mut m, index, Content::Inline(b"v2".to_vec()));
        run(
            &mut m,
            MetaOp::Unlink {
                parent: wp,
                name: "big".into(),
            },
        );
        (m, a)
    }

    #[test]
    fn a_clone_is_the_snapshot_s_tree_under_its_own_root_sharing_the_chunks() {
        let (mut m, a) = deployed();
        let c = clone(&mut m, "before", "www-staging").unwrap();
        assert_eq!((c.volume, c.files), (1, 4));
        let root = root_of(c.volume);
        let index = lookup(&m, root, "index.php").unwrap();
        assert_eq!(volume_of(index.ino), 1);
        assert_eq!(content(&m, index.ino), Content::Inline(b"v1".to_vec()));
        let wp = lookup(&m, root, "wp").unwrap();
        let big = lookup(&m, wp.ino, "big").unwrap();
        assert_eq!(
            content(&m, big.ino),
            Content::Chunks([(0, a)].into_iter().collect())
        );
        assert!(references(&m).contains(&a), "the clone names the chunk");
        // The origin is as it was.
        let live = lookup(&m, ROOT_INODE, "index.php").unwrap();
        assert_eq!(content(&m, live.ino), Content::Inline(b"v2".to_vec()));
        assert_eq!(lookup(&m, live.ino, "big").err(), Some(FsError::NotDir));

        // The clone is writable and numbers its new inodes in its own range.
        let new = match run(&mut m, create_op(wp.ino, "new.php")) {
            MetaOk::Attr(a) => a,
            other => panic!("{other:?}"),
        };
        assert_eq!(volume_of(new.ino), 1);
        assert!(new.ino > big.ino);
        match run(
            &mut m,
            MetaOp::ReserveInodesIn {
                volume: 1,
                count: 4,
            },
        ) {
            MetaOk::Inodes { first, .. } => assert_eq!(first, new.ino + 1),
            other => panic!("{other:?}"),
        }
        let origin_new = match run(&mut m, create_op(ROOT_INODE, "o")) {
            MetaOk::Attr(a) => a.ino,
            other => panic!("{other:?}"),
        };
        assert_eq!(volume_of(origin_new), 0);
        assert_eq!(
            m.run(MetaOp::ReserveInodesIn {
                volume: 9,
                count: 1
            })
            .err()
            .map(|e| e.errno()),
            Some(libc::EINVAL),
            "a volume that does not exist has no numbers"
        );
    }

    #[test]
    fn renames_and_links_do_not_cross_volumes() {
        let (mut m, _) = deployed();
        let c = clone(&mut m, "before", "stg").unwrap();
        let before = m.data.clone();
        let err = m
            .run(MetaOp::Rename {
                parent: ROOT_INODE,
                name: "index.php".into(),
                new_parent: root_of(c.volume),
                new_name: "x".into(),
                flags: 0,
            })
            .unwrap_err();
        assert_eq!(err.errno(), libc::EXDEV);
        let index = lookup(&m, ROOT_INODE, "index.php").unwrap();
        let err = m
            .run(MetaOp::Link {
                ino: index.ino,
                new_parent: root_of(c.volume),
                new_name: "x".into(),
            })
            .unwrap_err();
        assert_eq!(err.errno(), libc::EXDEV);
        assert_eq!(m.data, before, "a refused change writes nothing");
    }

    #[test]
    fn restores_and_snapshots_of_one_volume_leave_the_other_alone() {
        let (mut m, _) = deployed();
        let c = clone(&mut m, "before", "stg").unwrap();
        let root = root_of(c.volume);
        let index = lookup(&m, root, "index.php").unwrap().ino;
        set(&mut m, index, Content::Inline(b"staging".to_vec()));
        // Restoring the origin to "before" changes the origin only.
        run(
            &mut m,
            MetaOp::RestoreSnapshot {
                name: "before".into(),
                undo: "undo1".into(),
            },
        );
        let live = lookup(&m, ROOT_INODE, "index.php").unwrap().ino;
        assert_eq!(content(&m, live), Content::Inline(b"v1".to_vec()));
        assert_eq!(content(&m, index), Content::Inline(b"staging".to_vec()));
        // The clone's own snapshot, and a restore of it, change the clone only; each
        // volume's snapshots count its own files.
        run(&mut m, create_op(root, "staging-only"));
        assert_eq!(snapshot(&mut m, "stg@s1"), 5);
        assert_eq!(
            snapshot(&mut m, "origin-now"),
            4,
            "root, index.php, wp and the restored wp/big"
        );
        set(&mut m, index, Content::Inline(b"later".to_vec()));
        set(&mut m, live, Content::Inline(b"origin later".to_vec()));
        run(
            &mut m,
            MetaOp::RestoreSnapshot {
                name: "stg@s1".into(),
                undo: "stg@undo".into(),
            },
        );
        assert_eq!(content(&m, index), Content::Inline(b"staging".to_vec()));
        assert_eq!(content(&m, live), Content::Inline(b"origin later".to_vec()));
        // A snapshot mount of the clone's snapshot reads the clone's tree.
        let in_snap = query(
            &m,
            &Query::InSnapshot {
                name: "stg@s1".into(),
                query: Box::new(Query::Lookup {
                    parent: root,
                    name: "index.php".into(),
                }),
            },
        )
        .unwrap();
        assert!(matches!(in_snap, MetaOk::Attr(a) if a.ino == index));
        // An undo of another volume is refused.
        let err = m
            .run(MetaOp::RestoreSnapshot {
                name: "stg@s1".into(),
                undo: "plain".into(),
            })
            .unwrap_err();
        assert!(matches!(err, FsError::Invalid(_)), "{err:?}");
    }

    #[test]
    fn bad_clones_are_refused_and_change_nothing() {
        let (mut m, _) = deployed();
        clone(&mut m, "before", "stg").unwrap();
        let before = m.data.clone();
        for (snapshot, name, want) in [
            ("before", "t", libc::EEXIST),   // the volume's own name
            ("before", "stg", libc::EEXIST), // an existing clone
            ("before", "bad name", libc::EINVAL),
            ("before", "", libc::EINVAL),
            ("missing", "other", libc::ESTALE),
            ("nobody@s", "other", libc::EINVAL), // a snapshot of no clone
        ] {
            let err = clone(&mut m, snapshot, name).unwrap_err();
            assert_eq!(err.errno(), want, "{snapshot} -> {name}: {err:?}");
        }
        assert!(matches!(
            m.run(MetaOp::CreateSnapshot {
                name: "nobody@s".into(),
                keep: None
            }),
            Err(FsError::Invalid(_))
        ));
        assert_eq!(m.data, before);
    }

    #[test]
    fn a_dropped_clone_leaves_no_row_and_releases_what_only_it_named() {
        let (mut m, a) = deployed();
        let untouched = m.data.clone();
        let c = clone(&mut m, "before", "stg").unwrap();
        let root = root_of(c.volume);
        // The clone gets a file of its own, a snapshot, and a change kept for it.
        let own = match run(&mut m, create_op(root, "own")) {
            MetaOk::Attr(a) => a.ino,
            other => panic!("{other:?}"),
        };
        let b = ChunkId([9; 32]);
        set(&mut m, own, Content::Chunks([(0, b)].into_iter().collect()));
        snapshot(&mut m, "stg@s1");
        let index = lookup(&m, root, "index.php").unwrap().ino;
        set(&mut m, index, Content::Inline(b"later".to_vec()));
        run(&mut m, MetaOp::DropClone { name: "stg".into() });
        let prefix = c.volume.to_be_bytes();
        let left: Vec<_> = m
            .data
            .keys()
            .filter(|(t, k)| match t {
                Table::Inodes | Table::Dentries => k.starts_with(&prefix),
                Table::Snap => k.get(1..3) == Some(&prefix[..]),
                Table::Sys => k.starts_with(b"clone/") || k.starts_with(b"snap/stg@"),
            })
            .collect();
        assert!(
            left.is_empty(),
            "rows of the dropped clone remain: {left:?}"
        );
        // The origin, its snapshot and its counts are as before the clone.
        let sys_of = |d: &BTreeMap<(Table, Vec<u8>), Vec<u8>>| -> BTreeMap<Vec<u8>, Vec<u8>> {
            d.iter()
                .filter(|((t, k), _)| {
                    // Numbers of clones and snapshots are never given twice.
                    *t == Table::Sys
                        && !k.starts_with(b"released/")
                        && !matches!(&k[..], b"clone_next" | b"snap_next_gen")
                })
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect()
        };
        let rows_of = |d: &BTreeMap<(Table, Vec<u8>), Vec<u8>>| -> Vec<(Table, Vec<u8>)> {
            d.keys()
                .filter(|(t, _)| *t != Table::Sys)
                .cloned()
                .collect()
        };
        assert_eq!(rows_of(&m.data), rows_of(&untouched));
        assert_eq!(sys_of(&m.data), sys_of(&untouched));
        let released: Vec<ChunkId> = super::super::released(&m, None, 100)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert!(released.contains(&b), "the clone's own chunk is released");
        assert!(released.contains(&a));
        assert!(
            references(&m).contains(&a) && !references(&m).contains(&b),
            "the origin's snapshot still names its chunk; nothing names the clone's"
        );
        // Its name is free again; its number is not given again.
        assert_eq!(clone(&mut m, "before", "stg").unwrap().volume, 2);
        assert!(matches!(
            m.run(MetaOp::DropClone {
                name: "nope".into()
            }),
            Err(FsError::Invalid(_))
        ));
    }
}
