//! The brick's side of self-heal: serving only verified chunk bytes, pulling missing chunks
//! from peers, and scrubbing its own copies. The operator's `mortar volume heal` decides what
//! to move; bricks move it directly, so chunk data never passes through the operator's host.

use crate::background;
use crate::space::Space;
use crate::store::Store;
use mortar_proto::transport::Pool;
use mortar_proto::wire::{Reply, Request};
use mortar_proto::{range, BrickId, ChunkId, FsError};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunk copies one brick pulls at once.
const FETCH_IN_FLIGHT: usize = 8;

/// A chunk's bytes, checked against its id. A copy that fails is removed and put in the heal
/// index, so a rotten copy is served to nobody, heal included, and gets replaced.
pub fn read_verified(store: &Store, self_id: BrickId, id: &ChunkId) -> Result<Vec<u8>, FsError> {
    let data = store.get_chunk(id)?.ok_or(FsError::NotFound)?;
    if id.matches(&data) {
        return Ok(data);
    }
    tracing::error!(chunk = %id.to_hex(), "stored chunk fails verification; removing this copy");
    store.quarantine(self_id, id)?;
    Err(FsError::HashMismatch(id.to_hex()))
}

/// `len` bytes at `offset` of a chunk this brick holds, as [`Reply::Range`]: the covering
/// groups and every group's value. The whole chunk is checked against its id on the way (one
/// hashing pass makes both), and a copy that fails is set aside as in [`read_verified`].
pub fn read_range(
    store: &Store,
    self_id: BrickId,
    id: &ChunkId,
    offset: u64,
    len: u64,
) -> Result<Reply, FsError> {
    let data = store.get_chunk(id)?.ok_or(FsError::NotFound)?;
    let (values, made) = range::group_values(&data);
    if made != *id {
        tracing::error!(chunk = %id.to_hex(), "stored chunk fails verification; removing this copy");
        store.quarantine(self_id, id)?;
        return Err(FsError::HashMismatch(id.to_hex()));
    }
    let chunk_len = data.len() as u64;
    let r = match values.is_empty() {
        true => 0..chunk_len,
        false => range::covering(offset, len, chunk_len),
    };
    Ok(Reply::Range {
        chunk_len,
        start: r.start,
        values,
        data: data[r.start as usize..r.end as usize].to_vec(),
    })
}

/// Copy each chunk this brick lacks from the first source whose copy verifies, a few at a
/// time. Per chunk: the bytes copied (0 when it was already here), else what every source said.
pub async fn fetch_chunks(
    store: &Store,
    space: &Space,
    pool: &Pool,
    ids: &[ChunkId],
    sources: &[String],
) -> Result<Vec<Result<u64, String>>, FsError> {
    let mut out = Vec::with_capacity(ids.len());
    for window in ids.chunks(FETCH_IN_FLIGHT) {
        let results = futures::future::join_all(
            window
                .iter()
                .map(|id| fetch_one(store, space, pool, id, sources)),
        )
        .await;
        for r in results {
            out.push(r?);
        }
    }
    store
        .db
        .flush_wal(true)
        .map_err(|e| FsError::Io(e.to_string()))?;
    Ok(out)
}

async fn fetch_one(
    store: &Store,
    space: &Space,
    pool: &Pool,
    id: &ChunkId,
    sources: &[String],
) -> Result<Result<u64, String>, FsError> {
    if store.has_chunk(id)? {
        return Ok(Ok(0));
    }
    let mut why = Vec::new();
    for src in sources {
        match pool
            .call(src, &Request::GetChunk { id: *id }, FETCH_TIMEOUT)
            .await
        {
            Ok(Ok(Reply::Chunk(data))) if id.matches(&data) => {
                // A full disk fails this copy, not the whole request.
                return match crate::chunk::store_copy(store, space, id, &data, false) {
                    Ok(()) => Ok(Ok(data.len() as u64)),
                    Err(FsError::NoSpace(why)) => Ok(Err(why)),
                    Err(e) => Err(e),
                };
            }
            Ok(Ok(Reply::Chunk(_))) => why.push(format!("{src}: copy fails verification")),
            Ok(Ok(other)) => why.push(format!("{src}: unexpected reply {other:?}")),
            Ok(Err(e)) => why.push(format!("{src}: {e}")),
            Err(e) => why.push(format!("{src}: {e}")),
        }
    }
    Ok(Err(if why.is_empty() {
        "no source brick given".into()
    } else {
        why.join("; ")
    }))
}

/// Verify up to `limit` chunks after `after`, reading no faster than `max_bytes_per_sec`
/// (0: unthrottled) so a scrub does not starve the application.
pub async fn scrub(
    store: Arc<Store>,
    self_id: BrickId,
    after: Option<ChunkId>,
    limit: usize,
    max_bytes_per_sec: u64,
) -> Result<Reply, FsError> {
    let ids = {
        let store = store.clone();
        background::run(move || Ok(store.list_chunks(after.as_ref(), limit)?)).await?
    };
    let started = Instant::now();
    let (mut bytes, mut corrupt) = (0u64, Vec::new());
    for id in ids.iter().copied() {
        // Reading and hashing a chunk runs on a background thread, off the async runtime.
        let store = store.clone();
        let verified = background::run(move || {
            let Some(data) = store.get_chunk(&id)? else {
                return Ok(None);
            };
            let good = id.matches(&data);
            if !good {
                tracing::error!(chunk = %id.to_hex(), "scrub: copy fails verification; removing it");
                store.quarantine(self_id, &id)?;
            }
            Ok(Some((data.len() as u64, good)))
        })
        .await?;
        match verified {
            Some((len, good)) => {
                bytes += len;
                if !good {
                    corrupt.push(id);
                }
            }
            None => continue,
        }
        if max_bytes_per_sec > 0 {
            let due = Duration::from_secs_f64(bytes as f64 / max_bytes_per_sec as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(Reply::Scrubbed {
        scanned: ids.len() as u64,
        bytes,
        corrupt,
        next: if ids.len() < limit {
            None
        } else {
            ids.last().copied()
        },
    })
}
