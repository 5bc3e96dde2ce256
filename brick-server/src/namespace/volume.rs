//! The volume's own rows in the namespace: its configuration, written once at creation and
//! changed only by a brick replacement.

use super::{dec, enc, MetaRead, Stored, Table, Txn, KEY_INODE_COUNT, KEY_NEXT_INO, KEY_VOLUME};
use mortar_proto::wire::MetaOk;
use mortar_proto::{
    Attr, BrickId, BrickRef, Content, FileKind, FsError, Inode, Timestamp, VolumeConfig, ROOT_INODE,
};

/// Store the configuration and the root directory of a new volume.
pub(super) fn create<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    config: &VolumeConfig,
    now: Timestamp,
) -> Result<MetaOk, FsError> {
    if txn.get(Table::Sys, KEY_VOLUME)?.is_some() {
        return Err(FsError::Exists);
    }
    txn.put(Table::Sys, KEY_VOLUME, enc(config));
    let root = Stored {
        inode: Inode {
            attr: Attr::new(ROOT_INODE, FileKind::Directory, 0o755, 0, 0, now),
            content: Content::None,
            xattrs: Vec::new(),
        },
        parent: ROOT_INODE,
    };
    txn.save(&root);
    txn.put(
        Table::Sys,
        KEY_NEXT_INO,
        (ROOT_INODE + 1).to_be_bytes().to_vec(),
    );
    txn.put(Table::Sys, KEY_INODE_COUNT, 1u64.to_be_bytes().to_vec());
    Ok(MetaOk::Done)
}

/// Put `new` in `old`'s place in its replica set and retire `old`. Applying it again changes
/// nothing (a retried proposal).
pub(super) fn replace<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    old: BrickId,
    new: &BrickRef,
) -> Result<MetaOk, FsError> {
    let mut config: VolumeConfig = match txn.get(Table::Sys, KEY_VOLUME)? {
        Some(b) => dec(&b)?,
        None => return Err(FsError::NoVolume),
    };
    if config.is_retired(old) && config.brick(new.id) == Some(new) {
        return Ok(MetaOk::Done);
    }
    if config.brick(new.id).is_some() || config.is_retired(new.id) {
        return Err(FsError::Exists);
    }
    let seat = config
        .replica_sets
        .iter_mut()
        .flat_map(|s| &mut s.bricks)
        .find(|b| b.id == old)
        .ok_or_else(|| FsError::Invalid(format!("brick {old} is not in the volume")))?;
    let retired = std::mem::replace(seat, new.clone());
    config.retired.push(retired);
    txn.put(Table::Sys, KEY_VOLUME, enc(&config));
    Ok(MetaOk::Done)
}
