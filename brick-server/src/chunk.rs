//! The chunk write path: verify, store, forward to the rest of the replica set in parallel, and
//! answer once a quorum holds the chunk, recording any miss in the heal index.

use crate::store::Store;
use mortar_proto::layout;
use mortar_proto::transport::Pool;
use mortar_proto::wire::{AdminRequest, HealEntry, HealReason, PutChunk, Reply, Request};
use mortar_proto::{BrickId, ChunkId, FsError, VolumeConfig, MAX_CHUNK_SIZE};
use std::time::Duration;

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

/// Store a chunk a client sent and replicate it. Returns the number of copies now held.
pub async fn put_replicated(
    store: &Store,
    pool: &Pool,
    self_id: BrickId,
    volume: &VolumeConfig,
    p: PutChunk,
) -> Result<u8, FsError> {
    verify(&p)?;
    let set = layout::replica_set(volume, &p.id);
    let own = if set.iter().any(|b| b.id == self_id) {
        store
            .put_chunk(&p.id, &p.data, p.sync)
            .map(|_| 1usize)
            .map_err(FsError::from)
    } else {
        Ok(0)
    };
    let forward = Request::PutChunk(PutChunk {
        replicate: false,
        ..p
    });
    let peers: Vec<_> = set.iter().filter(|b| b.id != self_id).collect();
    let results = futures::future::join_all(peers.iter().map(|b| {
        let req = &forward;
        async move {
            match pool.call(&b.addr, req, REPLICA_TIMEOUT).await {
                Ok(Ok(Reply::ChunkStored { .. })) => Ok(()),
                Ok(Ok(other)) => Err(format!("unexpected reply {other:?}")),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    }))
    .await;

    let len = match &forward {
        Request::PutChunk(p) => p.data.len() as u64,
        _ => 0,
    };
    let miss = |brick| HealEntry {
        brick,
        chunk: p_id(&forward),
        reason: HealReason::MissedWrite,
        bytes: len,
    };
    let mut copies = *own.as_ref().unwrap_or(&0);
    let mut holders = Vec::new();
    let mut misses = Vec::new();
    if copies == 1 {
        holders.push(self_id);
    } else if let Err(e) = &own {
        tracing::warn!(chunk = %p_id(&forward), error = %e, "storing own copy failed");
        misses.push(miss(self_id));
    }
    for (b, r) in peers.iter().zip(results) {
        match r {
            Ok(()) => {
                copies += 1;
                holders.push(b.id);
            }
            Err(e) => {
                tracing::warn!(brick = b.id, addr = %b.addr, error = %e, "replica write failed");
                misses.push(miss(b.id));
            }
        }
    }
    if !misses.is_empty() && copies >= WRITE_QUORUM {
        record_misses(store, pool, self_id, set, &holders, misses).await;
    }
    if copies < WRITE_QUORUM {
        return Err(FsError::Unavailable(format!(
            "only {copies} of {} replicas stored chunk {}",
            set.len(),
            p_id(&forward)
        )));
    }
    Ok(copies as u8)
}

fn p_id(req: &Request) -> ChunkId {
    match req {
        Request::PutChunk(p) => p.id,
        _ => unreachable!("only built from a PutChunk"),
    }
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
