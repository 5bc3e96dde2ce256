//! Operator actions that address bricks one by one: volume creation and per-brick status.

use mortar_proto::transport::Pool;
use mortar_proto::wire::{AdminRequest, BrickHello, BrickStatus, Reply, Request};
use mortar_proto::{BrickId, BrickRef, ChunkId, FsError, Timestamp, VolumeConfig, MAX_CHUNK_SIZE};
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
    #[error("replica 3 needs exactly 3 bricks, got {0}")]
    BrickCount(usize),
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
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(AdminError::BadName(name.to_string()));
    }
    Ok(())
}

/// Create a replica-3 volume over `bricks`. Every check happens before any brick is changed,
/// so a refused create leaves nothing behind.
pub async fn create_volume(
    pool: &Pool,
    name: &str,
    bricks: &[String],
    chunk_size: u32,
) -> Result<VolumeConfig, AdminError> {
    validate_volume_name(name)?;
    if bricks.len() != 3 {
        return Err(AdminError::BrickCount(bricks.len()));
    }
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
    let mut set: Vec<BrickRef> = Vec::new();
    for (addr, h) in bricks.iter().zip(hellos) {
        let h = h?;
        if let Some(volume) = h.volume {
            return Err(AdminError::InUse {
                addr: addr.clone(),
                volume,
            });
        }
        if let Some(other) = set.iter().find(|b| b.id == h.id) {
            return Err(AdminError::SameBrick(
                other.addr.clone(),
                addr.clone(),
                h.id,
            ));
        }
        set.push(BrickRef {
            id: h.id,
            addr: addr.clone(),
        });
    }
    let config = VolumeConfig {
        name: name.to_string(),
        chunk_size,
        replica_sets: vec![set],
        created: Timestamp::now(),
    };
    call(
        pool,
        &bricks[0],
        &Request::Admin(AdminRequest::InitVolume(config.clone())),
        INIT_TIMEOUT,
    )
    .await?;
    Ok(config)
}

pub async fn status(pool: &Pool, addr: &str) -> Result<BrickStatus, AdminError> {
    match call(
        pool,
        addr,
        &Request::Admin(AdminRequest::Status),
        HELLO_TIMEOUT,
    )
    .await?
    {
        Reply::Status(s) => Ok(s),
        other => Err(AdminError::Brick {
            addr: addr.into(),
            err: FsError::Io(format!("unexpected reply {other:?}")),
        }),
    }
}

/// Page through a brick listing until a page comes back empty.
async fn all_pages<T: Copy>(
    pool: &Pool,
    addr: &str,
    request: impl Fn(Option<T>) -> AdminRequest,
    page: impl Fn(Reply) -> Option<Vec<T>>,
) -> Result<Vec<T>, AdminError> {
    let mut all: Vec<T> = Vec::new();
    loop {
        let reply = call(
            pool,
            addr,
            &Request::Admin(request(all.last().copied())),
            Duration::from_secs(30),
        )
        .await?;
        match page(reply) {
            Some(p) if p.is_empty() => return Ok(all),
            Some(p) => all.extend(p),
            None => {
                return Err(AdminError::Brick {
                    addr: addr.into(),
                    err: FsError::Io("unexpected reply to a listing".into()),
                })
            }
        }
    }
}

/// Every chunk id a brick holds.
pub async fn list_chunks(pool: &Pool, addr: &str) -> Result<Vec<ChunkId>, AdminError> {
    let request = |after| AdminRequest::ListChunks {
        after,
        limit: 10_000,
    };
    all_pages(pool, addr, request, |r| match r {
        Reply::Chunks(p) => Some(p),
        _ => None,
    })
    .await
}

/// Every (missing brick, chunk) entry in a brick's heal index.
pub async fn list_heal_index(
    pool: &Pool,
    addr: &str,
) -> Result<Vec<(BrickId, ChunkId)>, AdminError> {
    let request = |after| AdminRequest::ListHealIndex {
        after,
        limit: 10_000,
    };
    all_pages(pool, addr, request, |r| match r {
        Reply::HealIndex(p) => Some(p),
        _ => None,
    })
    .await
}

/// A brick's namespace digest and the applied log index it reflects.
pub async fn meta_digest(pool: &Pool, addr: &str) -> Result<(u64, [u8; 32]), AdminError> {
    match call(
        pool,
        addr,
        &Request::Admin(AdminRequest::MetaDigest),
        Duration::from_secs(30),
    )
    .await?
    {
        Reply::MetaDigest {
            applied_index,
            digest,
        } => Ok((applied_index, digest)),
        other => Err(AdminError::Brick {
            addr: addr.into(),
            err: FsError::Io(format!("unexpected reply {other:?}")),
        }),
    }
}
