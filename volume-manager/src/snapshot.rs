//! `mortar snapshot create|list|info|delete|restore|clone`: named snapshots of a volume's
//! namespace. Each change is one replicated namespace change (the bricks'
//! `namespace::snapshots` and `namespace::clones`); these commands only ask for it and print
//! what came back. A clone's snapshots are `CLONE@NAME` in the namespace; operators name them
//! by NAME with the clone as the volume.

use anyhow::{anyhow, bail, Result};
use mortar_client::volume_admin::{self, AdminError};
use mortar_client::Volume;
use mortar_proto::wire::{
    split_snapshot_name, validate_snapshot_name, CloneInfo, MetaOk, MetaOp, SnapshotInfo,
    SnapshotUsage,
};
use mortar_proto::{FsError, Timestamp};

/// A UTC time's fields, for the two ways snapshots show one.
fn fields(d: time::OffsetDateTime) -> (i32, u8, u8, u8, u8, u8) {
    (
        d.year(),
        d.month() as u8,
        d.day(),
        d.hour(),
        d.minute(),
        d.second(),
    )
}

/// A time as operators read it, in UTC.
pub fn when(t: Timestamp) -> String {
    match time::OffsetDateTime::from_unix_timestamp(t.secs).map(fields) {
        Ok((y, mo, d, h, mi, s)) => format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC"),
        Err(_) => format!("{}s", t.secs),
    }
}

/// A name from the time, for snapshots named by their series only (the timer's, the one a
/// restore takes first): `SERIES-YYYYMMDDTHHMMSSZ`.
pub fn timed_name(series: &str) -> String {
    let (y, mo, d, h, mi, s) = fields(time::OffsetDateTime::now_utc());
    format!("{series}-{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

fn refused(what: &str, name: &str, e: FsError) -> anyhow::Error {
    match e {
        FsError::Exists => anyhow!("{what}: a snapshot named '{name}' already exists"),
        FsError::NoSnapshot(n) => anyhow!(
            "{what}: there is no snapshot named '{}'",
            split_snapshot_name(&n).1
        ),
        e => anyhow!("{what}: {e}"),
    }
}

/// `info` as this volume's operators name it (without a clone's `CLONE@`), if it is one of
/// this volume's snapshots.
fn ours(vol: &Volume, mut info: SnapshotInfo) -> Option<SnapshotInfo> {
    let (clone, name) = split_snapshot_name(&info.name);
    if clone != vol.clone_info().map(|c| c.name.as_str()) {
        return None;
    }
    info.name = name.to_string();
    Some(info)
}

fn shown(vol: &Volume, info: SnapshotInfo) -> Result<SnapshotInfo> {
    ours(vol, info).ok_or_else(|| anyhow!("the bricks answered with another volume's snapshot"))
}

pub async fn create(vol: &Volume, name: &str, keep: Option<u32>) -> Result<SnapshotInfo> {
    validate_snapshot_name(name)?;
    if keep == Some(0) {
        bail!("--keep must be at least 1");
    }
    let op = MetaOp::CreateSnapshot {
        name: vol.snapshot_name(name),
        keep,
    };
    match vol.admin_op(op).await {
        Ok(MetaOk::Snapshot(info)) => shown(vol, info),
        Ok(other) => bail!("unexpected answer {other:?}"),
        Err(e) => Err(refused("cannot create the snapshot", name, e)),
    }
}

/// What snapshot `name` (every snapshot, without a name) holds, read on the metadata leader.
pub async fn usage(vol: &Volume, name: Option<&str>) -> Result<Vec<SnapshotUsage>> {
    let addrs: Vec<String> = vol.config().bricks().map(|b| b.addr.clone()).collect();
    let statuses =
        futures::future::join_all(addrs.iter().map(|a| volume_admin::status(vol.pool(), a))).await;
    let leader = crate::replicas::leader(&statuses)
        .and_then(|l| {
            statuses
                .iter()
                .position(|s| s.as_ref().is_ok_and(|s| s.id == l.id))
        })
        .map(|i| addrs[i].clone())
        .ok_or_else(|| anyhow!("cannot read the snapshots: the volume has no metadata leader"))?;
    let name = name.map(|n| vol.snapshot_name(n));
    let all = volume_admin::snapshot_usage(vol.pool(), &leader, name.as_deref())
        .await
        .map_err(|e| match e {
            AdminError::Brick {
                err: FsError::NoSnapshot(n),
                ..
            } => anyhow!(
                "cannot read the snapshot: there is no snapshot named '{}'",
                split_snapshot_name(&n).1
            ),
            e => anyhow!("cannot read the snapshots: {e}"),
        })?;
    Ok(all
        .into_iter()
        .filter_map(|mut u| {
            u.info = ours(vol, u.info)?;
            Some(u)
        })
        .collect())
}

pub async fn delete(vol: &Volume, name: &str) -> Result<()> {
    let op = MetaOp::DeleteSnapshot {
        name: vol.snapshot_name(name),
    };
    match vol.admin_op(op).await {
        Ok(_) => Ok(()),
        Err(e) => Err(refused("cannot delete the snapshot", name, e)),
    }
}

/// Restore `name` (only the tree at `path`, if given), recording the namespace as it was as
/// snapshot `undo` first; answers the undo snapshot.
pub async fn restore(
    vol: &Volume,
    name: &str,
    undo: &str,
    path: Option<&str>,
) -> Result<SnapshotInfo> {
    validate_snapshot_name(name)?;
    validate_snapshot_name(undo)?;
    let (n, u) = (vol.snapshot_name(name), vol.snapshot_name(undo));
    let op = match path {
        None => MetaOp::RestoreSnapshot { name: n, undo: u },
        Some(p) => MetaOp::RestorePath {
            name: n,
            undo: u,
            path: p.to_string(),
        },
    };
    match vol.admin_op(op).await {
        Ok(MetaOk::Snapshot(info)) => shown(vol, info),
        Ok(other) => bail!("unexpected answer {other:?}"),
        Err(FsError::Exists) => bail!(
            "cannot restore: the snapshot to undo it with, '{undo}', already exists (choose \
             another with --undo)"
        ),
        Err(e) => Err(refused("cannot restore", name, e)),
    }
}

/// Make volume `new` from snapshot `name`: a writable copy of its tree on the same bricks,
/// sharing its chunks.
pub async fn clone(vol: &Volume, name: &str, new: &str) -> Result<CloneInfo> {
    validate_snapshot_name(name)?;
    volume_admin::validate_volume_name(new)?;
    let op = MetaOp::CloneSnapshot {
        snapshot: vol.snapshot_name(name),
        name: new.to_string(),
    };
    match vol.admin_op(op).await {
        Ok(MetaOk::Clone(info)) => Ok(info),
        Ok(other) => bail!("unexpected answer {other:?}"),
        Err(FsError::Exists) => bail!("cannot clone: a volume named '{new}' already exists"),
        Err(e) => Err(refused("cannot clone", name, e)),
    }
}

pub fn usage_json(u: &SnapshotUsage) -> serde_json::Value {
    serde_json::json!({
        "name": u.info.name,
        "created": u.info.created.secs,
        "index": u.info.index,
        "generation": u.info.gen,
        "files": u.files,
        "bytes": u.bytes,
        "only_bytes": u.only_bytes,
    })
}
