//! Operator actions that address bricks one by one: volume creation and per-brick status.

use mortar_proto::digest::Bucket;
use mortar_proto::replication::{LayoutError, Replication};
use mortar_proto::transport::Pool;
use mortar_proto::wire::{
    AdminRequest, BrickHello, BrickStatus, HealEntry, Replaced, Reply, Request,
};
use mortar_proto::{
    BrickId, BrickRef, ChunkId, FsError, ReplicaSet, Timestamp, VolumeConfig, MAX_CHUNK_SIZE,
};
use std::collections::HashSet;
use std::time::Duration;

/// Chunk sizes below this would make every small file's first chunk smaller than the inline
/// limit, which the write path relies on.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("invalid volume name '{0}': use 1-64 letters, digits, '-' or '_'")]
    BadName(String),
    #[error("{0}")]
    Layout(#[from] LayoutError),
    #[error("brick {0} is listed twice")]
    Duplicate(String),
    #[error("bricks {0} and {1} are the same brick (id {2})")]
    SameBrick(String, String, BrickId),
    #[error("brick {addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("brick {addr} already belongs to volume '{volume}'")]
    InUse { addr: String, volume: String },
    #[error("chunk size {0} is out of range ({MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes)")]
    ChunkSize(u32),
    #[error("brick {addr}: {err}")]
    Brick { addr: String, err: FsError },
}

async fn call(
    pool: &Pool,
    addr: &str,
    req: &Request,
    timeout: Duration,
) -> Result<Reply, AdminError> {
    match pool.call(addr, req, timeout).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(err)) => Err(AdminError::Brick {
            addr: addr.to_string(),
            err,
        }),
        Err(e) => Err(AdminError::Unreachable {
            addr: addr.to_string(),
            reason: e.to_string(),
        }),
    }
}

pub async fn hello(pool: &Pool, addr: &str) -> Result<BrickHello, AdminError> {
    match call(pool, addr, &Request::Hello, HELLO_TIMEOUT).await? {
        Reply::Hello(h) => Ok(h),
        other => Err(AdminError::Brick {
            addr: addr.into(),
            err: FsError::Io(format!("unexpected reply {other:?}")),
        }),
    }
}

pub fn validate_volume_name(name: &str) -> Result<(), AdminError> {
    if !mortar_proto::valid_volume_name(name) {
        return Err(AdminError::BadName(name.to_string()));
    }
    Ok(())
}

/// Create a volume over `bricks`, cut into replica sets in the order given. Every check
/// happens before any brick is changed, so a refused create leaves nothing behind.
pub async fn create_volume(
    pool: &Pool,
    name: &str,
    replication: Replication,
    bricks: &[String],
    chunk_size: u32,
) -> Result<VolumeConfig, AdminError> {
    validate_volume_name(name)?;
    replication.sets(bricks)?;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(AdminError::ChunkSize(chunk_size));
    }
    let mut seen = HashSet::new();
    for b in bricks {
        if !seen.insert(b) {
            return Err(AdminError::Duplicate(b.clone()));
        }
    }
    let hellos = futures::future::join_all(bricks.iter().map(|b| hello(pool, b))).await;
    let mut all: Vec<BrickRef> = Vec::new();
    for (addr, h) in bricks.iter().zip(hellos) {
        let h = h?;
        if let Some(volume) = h.volume {
            return Err(AdminError::InUse {
                addr: addr.clone(),
                volume,
            });
        }
        if let Some(other) = all.iter().find(|b| b.id == h.id) {
            return Err(AdminError::SameBrick(
                other.addr.clone(),
                addr.clone(),
                h.id,
            ));
        }
        all.push(BrickRef {
            id: h.id,
            addr: addr.clone(),
        });
    }
    let config = VolumeConfig::new(
        name,
        chunk_size,
        ReplicaSet::numbered(replication.sets(&all)?),
        Timestamp::now(),
    );
    // The first brick starts the metadata group; whichever brick it elects records the volume.
    ask(
        pool,
        &bricks[0],
        AdminRequest::InitVolume(config.clone()),
        INIT_TIMEOUT,
        |r| matches!(r, Reply::Done).then_some(()),
    )
    .await?;
    Ok(config)
}

/// One admin request to one brick, expecting the reply `pick` accepts.
async fn ask<T>(
    pool: &Pool,
    addr: &str,
    req: AdminRequest,
    timeout: Duration,
    pick: impl FnOnce(Reply) -> Option<T>,
) -> Result<T, AdminError> {
    let what = format!("{req:?}");
    let what = what
        .split([' ', '(', '{'])
        .next()
        .unwrap_or_default()
        .to_string();
    // Changes to the volume are the metadata leader's to make: a follower names it.
    let mut addr = addr.to_string();
    let mut hops = 0;
    let reply = loop {
        match call(pool, &addr, &Request::Admin(req.clone()), timeout).await {
            Err(AdminError::Brick {
                err: FsError::NotLeader(leader),
                ..
            }) if hops < MAX_LEADER_HOPS => {
                hops += 1;
                addr = leader;
            }
            other => break other?,
        }
    };
    pick(reply).ok_or_else(|| AdminError::Brick {
        addr,
        err: FsError::Io(format!("unexpected reply to {what}")),
    })
}

/// How many times one admin request follows a "not the leader" answer (an election may move
/// the leadership while it travels).
const MAX_LEADER_HOPS: usize = 3;

/// Listings and heal steps may scan or copy a lot; they get a long deadline.
const LONG: Duration = Duration::from_secs(120);

pub async fn status(pool: &Pool, addr: &str) -> Result<BrickStatus, AdminError> {
    ask(
        pool,
        addr,
        AdminRequest::Status,
        HELLO_TIMEOUT,
        |r| match r {
            Reply::Status(s) => Some(s),
            _ => None,
        },
    )
    .await
}

/// Page through a brick listing until a page comes back short or empty; `cursor` gives the
/// position to continue after from a page's last item.
async fn all_pages<T, C>(
    pool: &Pool,
    addr: &str,
    request: impl Fn(Option<C>) -> AdminRequest,
    page: impl Fn(Reply) -> Option<Vec<T>>,
    cursor: impl Fn(&T) -> C,
) -> Result<Vec<T>, AdminError> {
    let mut all: Vec<T> = Vec::new();
    loop {
        let p = ask(pool, addr, request(all.last().map(&cursor)), LONG, &page).await?;
        if p.is_empty() {
            return Ok(all);
        }
        all.extend(p);
    }
}

const PAGE: u32 = 10_000;

fn chunks(r: Reply) -> Option<Vec<ChunkId>> {
    match r {
        Reply::Chunks(p) => Some(p),
        _ => None,
    }
}

/// Every chunk id a brick holds.
pub async fn list_chunks(pool: &Pool, addr: &str) -> Result<Vec<ChunkId>, AdminError> {
    let request = |after| AdminRequest::ListChunks { after, limit: PAGE };
    all_pages(pool, addr, request, chunks, |c| *c).await
}

/// Every chunk id a brick holds in one digest bucket.
pub async fn list_bucket(pool: &Pool, addr: &str, bucket: u16) -> Result<Vec<ChunkId>, AdminError> {
    let request = |after| AdminRequest::ListBucket {
        bucket,
        after,
        limit: PAGE,
    };
    all_pages(pool, addr, request, chunks, |c| *c).await
}

/// Every entry in a brick's heal index.
pub async fn list_heal_index(pool: &Pool, addr: &str) -> Result<Vec<HealEntry>, AdminError> {
    let request = |after| AdminRequest::ListHealIndex { after, limit: PAGE };
    let page = |r| match r {
        Reply::HealIndex(p) => Some(p),
        _ => None,
    };
    all_pages(pool, addr, request, page, |e: &HealEntry| {
        (e.brick, e.chunk)
    })
    .await
}

/// A brick's namespace digest and the applied log index it reflects.
pub async fn meta_digest(pool: &Pool, addr: &str) -> Result<(u64, [u8; 32]), AdminError> {
    ask(pool, addr, AdminRequest::MetaDigest, LONG, |r| match r {
        Reply::MetaDigest {
            applied_index,
            digest,
        } => Some((applied_index, digest)),
        _ => None,
    })
    .await
}

pub async fn chunk_digest(pool: &Pool, addr: &str) -> Result<Vec<Bucket>, AdminError> {
    ask(pool, addr, AdminRequest::ChunkDigest, LONG, |r| match r {
        Reply::ChunkDigest(d) => Some(d),
        _ => None,
    })
    .await
}

/// Which of `ids` a brick holds, in order.
pub async fn has_chunks(pool: &Pool, addr: &str, ids: &[ChunkId]) -> Result<Vec<bool>, AdminError> {
    let mut out = Vec::with_capacity(ids.len());
    for batch in ids.chunks(PAGE as usize) {
        let req = AdminRequest::HasChunks(batch.to_vec());
        out.extend(
            ask(pool, addr, req, LONG, |r| match r {
                Reply::Present(p) if p.len() == batch.len() => Some(p),
                _ => None,
            })
            .await?,
        );
    }
    Ok(out)
}

/// Have brick `addr` copy `ids` from the first of `sources` whose copy verifies; per chunk the
/// bytes copied (0 when it was there already), else why not.
pub async fn fetch_chunks(
    pool: &Pool,
    addr: &str,
    ids: &[ChunkId],
    sources: &[String],
) -> Result<Vec<Result<u64, String>>, AdminError> {
    let req = AdminRequest::FetchChunks {
        ids: ids.to_vec(),
        sources: sources.to_vec(),
    };
    ask(pool, addr, req, LONG, |r| match r {
        Reply::Fetched(f) if f.len() == ids.len() => Some(f),
        _ => None,
    })
    .await
}

pub async fn clear_heal_index(
    pool: &Pool,
    addr: &str,
    entries: &[(BrickId, ChunkId)],
) -> Result<(), AdminError> {
    for batch in entries.chunks(PAGE as usize) {
        let req = AdminRequest::ClearHealIndex(batch.to_vec());
        ask(pool, addr, req, LONG, |r| match r {
            Reply::Done => Some(()),
            _ => None,
        })
        .await?;
    }
    Ok(())
}

pub struct ScrubPage {
    pub scanned: u64,
    pub bytes: u64,
    pub corrupt: Vec<ChunkId>,
    pub next: Option<ChunkId>,
}

pub async fn scrub_page(
    pool: &Pool,
    addr: &str,
    after: Option<ChunkId>,
    limit: u32,
    max_bytes_per_sec: u64,
) -> Result<ScrubPage, AdminError> {
    let req = AdminRequest::Scrub {
        after,
        limit,
        max_bytes_per_sec,
    };
    ask(pool, addr, req, Duration::from_secs(600), |r| match r {
        Reply::Scrubbed {
            scanned,
            bytes,
            corrupt,
            next,
        } => Some(ScrubPage {
            scanned,
            bytes,
            corrupt,
            next,
        }),
        _ => None,
    })
    .await
}

/// Every chunk the namespace references (with repeats), live files' and snapshots', read on
/// `addr`, which must be the metadata leader (it confirms that with a quorum for every page).
pub async fn scan_references(pool: &Pool, addr: &str) -> Result<Vec<ChunkId>, AdminError> {
    let mut all = Vec::new();
    let mut after: Option<mortar_proto::wire::RefCursor> = None;
    loop {
        let req = AdminRequest::ScanReferences { after, limit: PAGE };
        let (page, next) = ask(pool, addr, req, LONG, |r| match r {
            Reply::References { chunks, next } => Some((chunks, next)),
            _ => None,
        })
        .await?;
        all.extend(page);
        match next {
            Some(n) => after = Some(n),
            None => return Ok(all),
        }
    }
}

/// What snapshot `name` (every snapshot, without a name) holds, read on `addr`, which must be
/// the metadata leader.
pub async fn snapshot_usage(
    pool: &Pool,
    addr: &str,
    name: Option<&str>,
) -> Result<Vec<mortar_proto::wire::SnapshotUsage>, AdminError> {
    let req = AdminRequest::SnapshotUsage {
        name: name.map(str::to_string),
    };
    ask(pool, addr, req, LONG, |r| match r {
        Reply::SnapshotUsage(u) => Some(u),
        _ => None,
    })
    .await
}

/// This host's clock, Unix seconds: bricks count garbage-collection grace by the earlier of
/// theirs and this.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Every release record on `addr`: (chunk, seconds since it was let go).
pub async fn list_released(pool: &Pool, addr: &str) -> Result<Vec<(ChunkId, u64)>, AdminError> {
    let now = unix_now();
    let request = |after| AdminRequest::ListReleased {
        after,
        limit: PAGE,
        now,
    };
    let page = |r| match r {
        Reply::Released(p) => Some(p),
        _ => None,
    };
    all_pages(pool, addr, request, page, |(c, _): &(ChunkId, u64)| *c).await
}

/// `volume delete`: release the brick at `addr` from the stopped volume `name`.
pub async fn release_volume(pool: &Pool, addr: &str, name: &str) -> Result<(), AdminError> {
    let req = AdminRequest::ReleaseVolume {
        name: name.to_string(),
    };
    ask(pool, addr, req, HELLO_TIMEOUT, |r| match r {
        Reply::Done => Some(()),
        _ => None,
    })
    .await
}

/// Ask `addr` to give collected chunks' space back; (disk bytes before, after).
pub async fn reclaim_space(pool: &Pool, addr: &str) -> Result<(u64, u64), AdminError> {
    ask(pool, addr, AdminRequest::ReclaimSpace, LONG, |r| match r {
        Reply::Reclaimed { before, after } => Some((before, after)),
        _ => None,
    })
    .await
}

/// Delete `ids` on `addr` unless stored within the last `grace_secs`; returns the deleted ones.
pub async fn collect_garbage(
    pool: &Pool,
    addr: &str,
    ids: &[ChunkId],
    grace_secs: u64,
) -> Result<Vec<ChunkId>, AdminError> {
    let mut removed = Vec::new();
    for batch in ids.chunks(1000) {
        let req = AdminRequest::CollectGarbage {
            ids: batch.to_vec(),
            grace_secs,
            now: unix_now(),
        };
        removed.extend(
            ask(pool, addr, req, LONG, |r| match r {
                Reply::Collected(c) => Some(c),
                _ => None,
            })
            .await?,
        );
    }
    Ok(removed)
}

/// A replacement waits for the new brick to catch up with the metadata log; the brick gives
/// it up to ten minutes, the call a little more.
const REPLACE_TIMEOUT: Duration = Duration::from_secs(610);

/// Ask the volume's bricks in `via` (the first that answers; a follower forwards to the
/// metadata leader) to replace the brick at `old` by the empty brick at `new`, or to finish a
/// replacement an earlier run left half-done.
pub async fn replace_brick(
    pool: &Pool,
    via: &[String],
    old: &str,
    new: &str,
) -> Result<Replaced, AdminError> {
    let req = AdminRequest::ReplaceBrick {
        old: old.into(),
        new: new.into(),
    };
    ask_any(pool, via, req, REPLACE_TIMEOUT, |r| match r {
        Reply::Replaced(r) => Some(r),
        _ => None,
    })
    .await
}

/// Ask the first of `via` that answers (a brick forwards what only the leader does).
async fn ask_any<T>(
    pool: &Pool,
    via: &[String],
    req: AdminRequest,
    timeout: Duration,
    pick: impl Fn(Reply) -> Option<T>,
) -> Result<T, AdminError> {
    let mut last = None;
    for addr in via {
        match ask(pool, addr, req.clone(), timeout, &pick).await {
            Err(e @ AdminError::Unreachable { .. }) => last = Some(e),
            other => return other,
        }
    }
    Err(last.unwrap_or_else(|| AdminError::Unreachable {
        addr: "(none)".into(),
        reason: "no brick of the volume to ask".into(),
    }))
}

/// One page of a brick's chunk ids, after `after`.
pub async fn list_chunks_page(
    pool: &Pool,
    addr: &str,
    after: Option<ChunkId>,
    limit: u32,
) -> Result<Vec<ChunkId>, AdminError> {
    ask(
        pool,
        addr,
        AdminRequest::ListChunks { after, limit },
        LONG,
        chunks,
    )
    .await
}

/// Ask the brick at `via` (or the leader it forwards to) to add `bricks` as new replica sets.
pub async fn add_brick(
    pool: &Pool,
    via: &[String],
    bricks: &[String],
) -> Result<VolumeConfig, AdminError> {
    let req = AdminRequest::AddBrick {
        bricks: bricks.to_vec(),
    };
    ask_any(pool, via, req, REPLACE_TIMEOUT, |r| match r {
        Reply::Volume(v) => Some(v),
        _ => None,
    })
    .await
}

/// Ask the brick at `via` (or the leader it forwards to) to start draining the replica set of
/// `bricks` (`commit` false) or to take the drained set out of the volume.
pub async fn remove_brick(
    pool: &Pool,
    via: &[String],
    bricks: &[String],
    commit: bool,
) -> Result<VolumeConfig, AdminError> {
    let req = AdminRequest::RemoveBrick {
        bricks: bricks.to_vec(),
        commit,
    };
    ask_any(pool, via, req, REPLACE_TIMEOUT, |r| match r {
        Reply::Volume(v) => Some(v),
        _ => None,
    })
    .await
}

/// Remove from the brick at `addr` those of `ids` its replica set no longer holds under the
/// settled layout `epoch`; the ids removed.
pub async fn drop_strays(
    pool: &Pool,
    addr: &str,
    ids: &[ChunkId],
    epoch: u64,
) -> Result<Vec<ChunkId>, AdminError> {
    let req = AdminRequest::DropStrays {
        ids: ids.to_vec(),
        epoch,
    };
    ask(pool, addr, req, LONG, |r| match r {
        Reply::Collected(c) => Some(c),
        _ => None,
    })
    .await
}
