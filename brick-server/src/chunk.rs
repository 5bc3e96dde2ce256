//! The chunk write path: verify, store, forward to the rest of the replica set in parallel, and
//! answer once a quorum holds the chunk, recording any miss in the heal index.

use crate::space::Space;
use crate::store::Store;
use mortar_proto::layout;
use mortar_proto::transport::Pool;
use mortar_proto::wire::{AdminRequest, Frame, HealEntry, HealReason, PutChunk, Reply, Request};
use mortar_proto::{BrickId, BrickRef, ChunkId, FsError, VolumeConfig, MAX_CHUNK_SIZE};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a forwarded copy may take before the peer counts as failed for this write.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(3);

/// Copies (including this brick's) needed before a write is acknowledged.
pub const WRITE_QUORUM: usize = 2;

pub fn verify(p: &PutChunk) -> Result<(), FsError> {
    if p.data.len() > MAX_CHUNK_SIZE as usize {
        return Err(FsError::TooLarge(format!(
            "chunk of {} bytes",
            p.data.len()
        )));
    }
    if !p.id.matches(&p.data) {
        return Err(FsError::HashMismatch(p.id.to_hex()));
    }
    Ok(())
}

/// Store this brick's copy of a verified chunk, unless it is new and the disk is down to its
/// reserve (ENOSPC).
pub fn store_copy(
    store: &Store,
    space: &Space,
    id: &ChunkId,
    data: &[u8],
    sync: bool,
) -> Result<(), FsError> {
    if !store.has_chunk(id)? {
        space.admit_data(data.len() as u64)?;
    }
    Ok(store.put_chunk(id, data, sync)?)
}

/// Store a chunk a client sent and replicate it. Answers as soon as a quorum holds it (a slow,
/// frozen or cut-off peer does not hold up the write); the remaining copies finish in the
/// background and any miss goes to the heal index. Returns the copies held when answering.
pub async fn put_replicated(
    store: &Arc<Store>,
    space: &Space,
    pool: &Pool,
    self_id: BrickId,
    volume: &VolumeConfig,
    p: PutChunk,
) -> Result<u8, FsError> {
    verify(&p)?;
    let (id, len) = (p.id, p.data.len() as u64);
    let set: Vec<BrickRef> = layout::replica_set(volume, &id).to_vec();
    // Encoded once for both peers, from the chunk itself (no copy of it is made first).
    let forward = Request::PutChunk(PutChunk {
        replicate: false,
        ..p
    });
    let frame = Frame::of(&forward).map_err(|e| FsError::Invalid(e.to_string()))?;
    let Request::PutChunk(p) = forward else {
        unreachable!("built as a PutChunk just above")
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    for b in set.iter().filter(|b| b.id != self_id) {
        let (tx, pool, frame, b) = (tx.clone(), pool.clone(), frame.clone(), b.clone());
        tokio::spawn(async move {
            let r = match pool.call_frame(&b.addr, &frame, REPLICA_TIMEOUT).await {
                Ok(Ok(Reply::ChunkStored { .. })) => Ok(()),
                Ok(Ok(other)) => Err(FsError::Io(format!("unexpected reply {other:?}"))),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(FsError::Unavailable(e.to_string())),
            };
            let _ = tx.send((b, r));
        });
    }
    drop(tx);

    let miss = move |brick| HealEntry {
        brick,
        chunk: id,
        reason: HealReason::MissedWrite,
        bytes: len,
    };
    let mut holders = Vec::new();
    let mut misses = Vec::new();
    // A replica out of space: when no quorum can store the chunk, the writer gets ENOSPC (it
    // cannot succeed on retry) rather than "unavailable".
    let mut full = None;
    if set.iter().any(|b| b.id == self_id) {
        match store_copy(store, space, &id, &p.data, p.sync) {
            Ok(()) => holders.push(self_id),
            Err(e) => {
                tracing::warn!(chunk = %id, error = %e, "storing own copy failed");
                if matches!(e, FsError::NoSpace(_)) {
                    full = Some(e);
                }
                misses.push(miss(self_id));
            }
        }
    }
    let note = move |(b, r): (BrickRef, Result<(), FsError>),
                     holders: &mut Vec<BrickId>,
                     misses: &mut Vec<HealEntry>,
                     full: &mut Option<FsError>| match r {
        Ok(()) => holders.push(b.id),
        Err(e) => {
            tracing::warn!(brick = b.id, addr = %b.addr, error = %e, "replica write failed");
            if matches!(e, FsError::NoSpace(_)) {
                *full = Some(e);
            }
            misses.push(miss(b.id));
        }
    };
    while holders.len() < WRITE_QUORUM {
        match rx.recv().await {
            Some(answer) => note(answer, &mut holders, &mut misses, &mut full),
            None => break,
        }
    }
    let copies = holders.len();
    if copies < WRITE_QUORUM {
        return Err(full.unwrap_or_else(|| {
            FsError::Unavailable(format!(
                "only {copies} of {} replicas stored chunk {id}",
                set.len()
            ))
        }));
    }
    let (store, pool) = (store.clone(), pool.clone());
    tokio::spawn(async move {
        let mut full = None;
        while let Some(answer) = rx.recv().await {
            note(answer, &mut holders, &mut misses, &mut full);
        }
        if !misses.is_empty() {
            record_misses(&store, &pool, self_id, &set, &holders, misses).await;
        }
    });
    Ok(copies as u8)
}

/// Note the misses in this brick's heal index, and tell the other holders in the background,
/// so the miss is known even if this brick dies before the next heal.
async fn record_misses(
    store: &Store,
    pool: &Pool,
    self_id: BrickId,
    set: &[mortar_proto::BrickRef],
    holders: &[BrickId],
    misses: Vec<HealEntry>,
) {
    if holders.contains(&self_id) {
        if let Err(e) = store.record_misses(&misses) {
            tracing::error!(error = %e, "cannot record heal index entries");
        }
    }
    for b in set
        .iter()
        .filter(|b| b.id != self_id && holders.contains(&b.id))
    {
        let pool = pool.clone();
        let addr = b.addr.clone();
        let req = Request::Admin(AdminRequest::RecordMisses(misses.clone()));
        tokio::spawn(async move {
            if let Err(e) = pool.call(&addr, &req, REPLICA_TIMEOUT).await {
                tracing::warn!(%addr, error = %e, "cannot forward heal index entries");
            }
        });
    }
}
