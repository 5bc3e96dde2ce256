//! The volume's own rows in the namespace: its configuration (written at creation, changed by a
//! brick replacement and by layout changes), the rebalance's progress, and the records of its
//! clones (made and dropped by [`super::clones`]).

use super::{
    dec, enc, records, MetaRead, Stored, Table, Txn, KEY_INODE_COUNT, KEY_NEXT_INO, KEY_REBALANCE,
    KEY_VOLUME,
};
use mortar_proto::wire::{CloneInfo, MetaOk, RebalanceState};
use mortar_proto::{
    Attr, BrickId, BrickRef, Content, FileKind, FsError, Inode, ReplicaSet, Timestamp,
    VolumeConfig, VolumeNo, ROOT_INODE,
};

/// `clone/<name>` → [`CloneInfo`].
const PREFIX_CLONE: &[u8] = b"clone/";

pub(super) fn clone_key(name: &str) -> Vec<u8> {
    [PREFIX_CLONE, name.as_bytes()].concat()
}

pub(super) fn clone_record<R: MetaRead>(r: &R, name: &str) -> Result<CloneInfo, FsError> {
    match r.get(Table::Sys, &clone_key(name))? {
        Some(b) => dec(&b),
        None => Err(FsError::Invalid(format!(
            "there is no clone named '{name}'"
        ))),
    }
}

/// Every clone, oldest first.
pub(super) fn clone_records<R: MetaRead>(r: &R) -> Result<Vec<CloneInfo>, FsError> {
    let mut out: Vec<CloneInfo> = records(r, PREFIX_CLONE)?;
    out.sort_by_key(|c| c.volume);
    Ok(out)
}

pub(super) fn clone_by_number<R: MetaRead>(r: &R, volume: VolumeNo) -> Result<CloneInfo, FsError> {
    clone_records(r)?
        .into_iter()
        .find(|c| c.volume == volume)
        .ok_or_else(|| FsError::Invalid(format!("there is no volume number {volume}")))
}

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
    let mut config = current(txn)?;
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

/// Append replica sets, numbered after every set the volume ever had, and keep the current
/// sets as the previous placement until a rebalance settles. Applying the same sets again
/// changes nothing (a retried proposal).
pub(super) fn add_sets<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    sets: &[Vec<BrickRef>],
) -> Result<MetaOk, FsError> {
    let mut config = current(txn)?;
    let ids = |s: &[BrickRef]| s.iter().map(|b| b.id).collect::<Vec<_>>();
    let tail = &config.replica_sets[config.replica_sets.len().saturating_sub(sets.len())..];
    if tail.len() == sets.len() && tail.iter().zip(sets).all(|(t, s)| ids(&t.bricks) == ids(s)) {
        return Ok(MetaOk::Done);
    }
    if config.previous.is_some() {
        return Err(FsError::Busy(
            "a layout change is under way: let its rebalance finish first".into(),
        ));
    }
    if let Some(b) = sets.iter().flatten().find(|b| config.has_or_had(b.id)) {
        return Err(FsError::Invalid(format!(
            "brick {} is or was in the volume",
            b.addr
        )));
    }
    config.previous = Some(config.replica_sets.iter().map(|s| s.id).collect());
    let next = config
        .replica_sets
        .iter()
        .map(|s| s.id + 1)
        .max()
        .unwrap_or(0);
    for (i, bricks) in sets.iter().enumerate() {
        config.replica_sets.push(ReplicaSet {
            id: next + i as u32,
            bricks: bricks.clone(),
            leaving: false,
        });
    }
    config.epoch += 1;
    txn.put(Table::Sys, KEY_VOLUME, enc(&config));
    Ok(MetaOk::Done)
}

/// Start draining replica set `set` (by its number): placement leaves it, and the current
/// sets are kept as the previous placement until a rebalance settles. Applying it again
/// changes nothing (a retried proposal).
pub(super) fn drain_set<R: MetaRead>(txn: &mut Txn<'_, R>, set: u32) -> Result<MetaOk, FsError> {
    let mut config = current(txn)?;
    let Some(i) = config.replica_sets.iter().position(|s| s.id == set) else {
        return Err(FsError::Invalid(format!(
            "the volume has no replica set {set}"
        )));
    };
    if config.replica_sets[i].leaving {
        return Ok(MetaOk::Done);
    }
    if config.previous.is_some() {
        return Err(FsError::Busy(
            "a layout change is under way: let its rebalance finish first".into(),
        ));
    }
    if config.replica_sets.iter().filter(|s| !s.leaving).count() < 2 {
        return Err(FsError::Invalid(
            "the volume's last replica set cannot be removed".into(),
        ));
    }
    config.previous = Some(config.replica_sets.iter().map(|s| s.id).collect());
    config.replica_sets[i].leaving = true;
    config.epoch += 1;
    txn.put(Table::Sys, KEY_VOLUME, enc(&config));
    Ok(MetaOk::Done)
}

/// Take the drained replica set `set` out of the volume and retire its bricks (their ids are
/// refused from then on). Refused unless it is leaving and the layout has settled. Applying
/// it again changes nothing (a retried proposal).
pub(super) fn remove_set<R: MetaRead>(txn: &mut Txn<'_, R>, set: u32) -> Result<MetaOk, FsError> {
    let mut config = current(txn)?;
    // Gone already: a retried proposal (the leader checked the set before proposing).
    let Some(i) = config.replica_sets.iter().position(|s| s.id == set) else {
        return Ok(MetaOk::Done);
    };
    if !config.replica_sets[i].leaving {
        return Err(FsError::Invalid(format!(
            "replica set {set} is not being drained: run remove-brick start first"
        )));
    }
    if config.previous.is_some() {
        return Err(FsError::Busy(
            "the drain has not finished: run remove-brick start again".into(),
        ));
    }
    let gone = config.replica_sets.remove(i);
    config.retired.extend(gone.bricks);
    config.epoch += 1;
    txn.put(Table::Sys, KEY_VOLUME, enc(&config));
    Ok(MetaOk::Done)
}

/// Forget the previous placement of layout `epoch`: every chunk is where the layout puts it.
pub(super) fn settle<R: MetaRead>(txn: &mut Txn<'_, R>, epoch: u64) -> Result<MetaOk, FsError> {
    let mut config = current(txn)?;
    match (config.epoch, &config.previous) {
        (e, Some(_)) if e == epoch => {
            config.previous = None;
            config.epoch += 1;
            txn.put(Table::Sys, KEY_VOLUME, enc(&config));
            Ok(MetaOk::Done)
        }
        // Settled already (a retry).
        (e, None) if e == epoch + 1 => Ok(MetaOk::Done),
        (e, _) => Err(FsError::Invalid(format!(
            "the layout is at epoch {e}, not {epoch} with a change under way"
        ))),
    }
}

pub(super) fn record_rebalance<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    state: &RebalanceState,
) -> Result<MetaOk, FsError> {
    if let Some(b) = txn.get(Table::Sys, KEY_REBALANCE)? {
        let recorded: RebalanceState = dec(&b)?;
        if recorded.run == state.run && recorded.status == "stopped" && state.status != "stopped" {
            return Err(FsError::Busy("this rebalance run was stopped".into()));
        }
    }
    txn.put(Table::Sys, KEY_REBALANCE, enc(state));
    Ok(MetaOk::Done)
}

pub fn rebalance<R: MetaRead>(r: &R) -> Result<Option<RebalanceState>, FsError> {
    r.get(Table::Sys, KEY_REBALANCE)?
        .map(|b| dec(&b))
        .transpose()
}

/// Set option `key` to `value`, or back to its default (None). Checked here, as it is applied,
/// so no path into the log can store a value the options table refuses.
pub(super) fn set_option<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    key: &str,
    value: Option<&str>,
) -> Result<MetaOk, FsError> {
    mortar_proto::options::check(key, value)?;
    let mut config = current(txn)?;
    let options = &mut config.options.0;
    let before = options.get(key).cloned();
    match value {
        Some(v) => options.insert(key.to_string(), v.to_string()),
        None => options.remove(key),
    };
    if options.get(key) != before.as_ref() {
        txn.put(Table::Sys, KEY_VOLUME, enc(&config));
    }
    Ok(MetaOk::Done)
}

/// `volume stop` / `volume start`; doing it again changes nothing.
pub(super) fn set_stopped<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    stopped: bool,
) -> Result<MetaOk, FsError> {
    let mut config = current(txn)?;
    if config.stopped != stopped {
        config.stopped = stopped;
        txn.put(Table::Sys, KEY_VOLUME, enc(&config));
    }
    Ok(MetaOk::Done)
}

/// `mortar cert revoke`; revoking again changes nothing.
pub(super) fn revoke<R: MetaRead>(
    txn: &mut Txn<'_, R>,
    r: &mortar_proto::Revoked,
) -> Result<MetaOk, FsError> {
    if r.serial.is_empty() || !r.serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FsError::Invalid(format!(
            "{:?} is not a certificate serial number",
            r.serial
        )));
    }
    let mut config = current(txn)?;
    if !config.revoked.iter().any(|k| k.serial == r.serial) {
        config.revoked.push(r.clone());
        txn.put(Table::Sys, KEY_VOLUME, enc(&config));
    }
    Ok(MetaOk::Done)
}

pub(super) fn current<R: MetaRead>(txn: &Txn<'_, R>) -> Result<VolumeConfig, FsError> {
    match txn.get(Table::Sys, KEY_VOLUME)? {
        Some(b) => dec(&b),
        None => Err(FsError::NoVolume),
    }
}
