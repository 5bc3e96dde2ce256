//! The chunk write path: verify, store, forward to the rest of the replica set in parallel, and
//! answer once a quorum holds the chunk, recording any miss in the heal index.

use crate::space::Space;
use crate::store::Store;
use mortar_proto::layout;
use mortar_proto::replication::WriteTally;
use mortar_proto::transport::Pool;
use mortar_proto::wire::{AdminRequest, Frame, HealEntry, HealReason, PutChunk, Reply, Request};
use mortar_proto::{BrickId, BrickRef, ChunkId, FsError, VolumeConfig, MAX_CHUNK_SIZE};
use std::sync::Arc;
use tokio::sync::mpsc;

/// How long a forwarded copy may take before the peer counts as failed for this write.
pub use mortar_proto::timing::REPLICA_TIMEOUT;

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

/// [`store_copy`] on a blocking thread. A synced write waits for the disk, hundreds of ms on a
/// busy one; on the runtime's worker threads two of them starved the Raft heartbeats (both
/// followers stood for election while the leader logged nothing).
pub async fn store_copy_apart(
    store: &Arc<Store>,
    space: &Arc<Space>,
    id: ChunkId,
    data: Vec<u8>,
    sync: bool,
) -> Result<(), FsError> {
    let (store, space) = (Arc::clone(store), Arc::clone(space));
    crate::store::blocking(move || store_copy(&store, &space, &id, &data, sync)).await
}

/// Store a chunk a client sent and replicate it. Answers as soon as a quorum holds it (a slow,
/// frozen or cut-off peer does not hold up the write); the remaining copies finish in the
/// background and any miss goes to the heal index. Returns the copies held when answering.
pub async fn put_replicated(
    store: &Arc<Store>,
    space: &Arc<Space>,
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
    let mut tally = WriteTally::new(set.len());
    if set.iter().any(|b| b.id == self_id) {
        match store_copy_apart(store, space, id, p.data, p.sync).await {
            Ok(()) => tally.stored(self_id),
            Err(e) => {
                tracing::warn!(chunk = %id, error = %e, "storing own copy failed");
                tally.failed(self_id, &e);
            }
        }
    }
    let note = move |(b, r): (BrickRef, Result<(), FsError>), tally: &mut WriteTally| match r {
        Ok(()) => tally.stored(b.id),
        Err(e) => {
            tracing::warn!(brick = b.id, addr = %b.addr, error = %e, "replica write failed");
            tally.failed(b.id, &e);
        }
    };
    let copies = loop {
        if let Some(outcome) = tally.outcome() {
            break outcome?;
        }
        match rx.recv().await {
            Some(answer) => note(answer, &mut tally),
            None => {
                break tally.outcome().unwrap_or_else(|| {
                    Err(FsError::Io("a replica's answer went missing".into()))
                })?
            }
        }
    };
    let (store, pool) = (store.clone(), pool.clone());
    tokio::spawn(async move {
        while let Some(answer) = rx.recv().await {
            note(answer, &mut tally);
        }
        let misses: Vec<HealEntry> = tally.missed().iter().map(|b| miss(*b)).collect();
        if !misses.is_empty() {
            record_misses(&store, &pool, self_id, &set, tally.holders(), misses).await;
        }
    });
    Ok(copies)
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
