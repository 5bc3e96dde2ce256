//! Chunks of files written beneath a live delegation, uploaded behind the writer. A flush
//! there does not wait for its chunks to reach a quorum: their ids are known at once (a chunk
//! is named by its hash), the change that names them is held like every other change made
//! under the delegation, and a background task uploads them meanwhile. Nothing that names a
//! chunk is committed before the chunk is stored ([`Volume::wait_uploads`] runs first), so the
//! bricks never hold a file whose data is missing; until then, reads here are answered from
//! the copy kept for the upload. The writer gets on with its next file while the bricks
//! replicate the last one (measured: `cp -a` of WordPress left the two cores 40% idle when each
//! close waited for its chunks).

use crate::Volume;
use mortar_proto::{ChunkId, FsError};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Bytes of chunks waiting for upload, at most: beyond it a flush waits (memory stays bounded).
const PENDING_BYTES: usize = 64 * 1024 * 1024;
/// Uploads under way at once.
const PARALLEL: usize = 4;
/// Pause before trying an upload again after it failed.
const RETRY_AFTER: Duration = Duration::from_millis(100);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Default)]
struct State {
    /// Chunks not yet on a quorum, with their bytes.
    pending: HashMap<ChunkId, Arc<Vec<u8>>>,
    /// Of those, the ones no upload is working on.
    queued: VecDeque<ChunkId>,
    bytes: usize,
    /// Uploads that failed so far, and the last failure: a waiter gives up when one fails.
    failures: u64,
    last_failure: Option<FsError>,
}

#[derive(Default)]
pub(crate) struct Uploads {
    /// Chunks queued for upload so far, for tests and metrics.
    pub(crate) queued_total: std::sync::atomic::AtomicU64,
    state: Mutex<State>,
    /// Wakes the uploader (work queued; a wake-up before it waits is kept) and waiters (work
    /// done or failed).
    queued: Arc<tokio::sync::Notify>,
    progress: tokio::sync::Notify,
}

impl Uploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("uploads lock")
    }

    /// The bytes of a chunk still waiting for its upload.
    pub(crate) fn pending(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.lock().pending.get(id).cloned()
    }
}

impl Volume {
    /// Queue `data` for upload and name it; the caller must not commit anything that names it
    /// before [`Volume::wait_uploads`] returned.
    pub(crate) async fn put_chunk_behind(&self, data: Vec<u8>) -> ChunkId {
        let id = ChunkId::of(&data);
        loop {
            let waiting = self.uploads.progress.notified();
            {
                let mut st = self.uploads.lock();
                if st.pending.contains_key(&id) {
                    return id;
                }
                if st.bytes < PENDING_BYTES || st.pending.is_empty() {
                    st.bytes += data.len();
                    st.pending.insert(id, Arc::new(data));
                    st.queued.push_back(id);
                    self.uploads
                        .queued_total
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
            }
            waiting.await;
        }
        self.uploads.queued.notify_one();
        id
    }

    /// Wait until every chunk queued so far is on a quorum (chunks queued meanwhile are not
    /// waited for, so a steady writer cannot hold a commit back). Fails when an upload fails
    /// meanwhile; the chunk stays queued and is tried again.
    pub(crate) async fn wait_uploads(&self) -> Result<(), FsError> {
        let (mut waiting_for, failures): (Vec<ChunkId>, u64) = {
            let st = self.uploads.lock();
            (st.pending.keys().copied().collect(), st.failures)
        };
        loop {
            let progress = self.uploads.progress.notified();
            {
                let st = self.uploads.lock();
                waiting_for.retain(|id| st.pending.contains_key(id));
                if waiting_for.is_empty() {
                    return Ok(());
                }
                if st.failures != failures {
                    return Err(st
                        .last_failure
                        .clone()
                        .unwrap_or_else(|| FsError::Unavailable("a chunk upload failed".into())));
                }
            }
            progress.await;
        }
    }

    pub(crate) fn start_uploader(self: &Arc<Self>) {
        tokio::spawn(run(Arc::downgrade(self), self.uploads.queued.clone()));
    }
}

/// Upload queued chunks, a few at a time, until the volume is dropped.
async fn run(volume: Weak<Volume>, queued: Arc<tokio::sync::Notify>) {
    let mut pause = RETRY_AFTER;
    loop {
        let batch = {
            let Some(v) = volume.upgrade() else { return };
            let mut st = v.uploads.lock();
            let n = st.queued.len().min(PARALLEL);
            let ids: Vec<ChunkId> = st.queued.drain(..n).collect();
            ids.into_iter()
                .filter_map(|id| st.pending.get(&id).map(|d| (id, d.clone())))
                .collect::<Vec<_>>()
        };
        if batch.is_empty() {
            queued.notified().await;
            continue;
        }
        let Some(v) = volume.upgrade() else { return };
        let results = futures::future::join_all(
            batch
                .iter()
                .map(|(_, data)| v.put_chunk(data.as_ref().clone(), false)),
        )
        .await;
        let mut failed = false;
        {
            let mut st = v.uploads.lock();
            for ((id, data), result) in batch.into_iter().zip(results) {
                match result {
                    Ok(_) => {
                        st.pending.remove(&id);
                        st.bytes -= data.len();
                    }
                    Err(e) => {
                        tracing::warn!(chunk = %id, error = %e, "chunk upload failed; retrying");
                        st.failures += 1;
                        st.last_failure = Some(e);
                        st.queued.push_back(id);
                        failed = true;
                    }
                }
            }
        }
        v.uploads.progress.notify_waiters();
        drop(v);
        if failed {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_RETRY_AFTER);
        } else {
            pause = RETRY_AFTER;
        }
    }
}
