//! Verified chunks, kept by id. Chunks are immutable and content-addressed, so a cached chunk
//! can never be stale. Concurrent readers of one missing chunk share a single fetch (the
//! kernel's readahead sends several requests into one chunk at once).

use mortar_proto::{ChunkId, FsError};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

/// Lookups of a cache that found what they asked for, and those that did not (for metrics).
#[derive(Debug, Default)]
pub struct Tally {
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Tally {
    /// Count `found` as a hit or a miss and pass it on.
    pub fn record<T>(&self, found: Option<T>) -> Option<T> {
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// (hits, misses) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

pub type Fetch = Arc<OnceCell<Result<Arc<Vec<u8>>, FsError>>>;

pub struct ChunkCache {
    budget: usize,
    inner: Mutex<Inner>,
    /// A miss is a lookup that had to fetch or join a fetch in flight.
    pub tally: Tally,
}

struct Inner {
    lru: lru::LruCache<ChunkId, Arc<Vec<u8>>>,
    bytes: usize,
    inflight: HashMap<ChunkId, Fetch>,
}

impl ChunkCache {
    pub fn new(budget: usize) -> ChunkCache {
        ChunkCache {
            budget,
            inner: Mutex::new(Inner {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
                inflight: HashMap::new(),
            }),
            tally: Tally::default(),
        }
    }

    #[cfg(test)]
    pub fn insert(&self, id: ChunkId, data: Arc<Vec<u8>>) {
        let mut g = self.inner.lock().expect("cache lock");
        self.put(&mut g, id, data);
    }

    fn put(&self, g: &mut Inner, id: ChunkId, data: Arc<Vec<u8>>) {
        if data.len() > self.budget {
            return;
        }
        g.bytes += data.len();
        if let Some(old) = g.lru.put(id, data) {
            g.bytes -= old.len();
        }
        while g.bytes > self.budget {
            match g.lru.pop_lru() {
                Some((_, old)) => g.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// Whether `id` is cached or being fetched (not counted as a lookup).
    pub fn holds(&self, id: &ChunkId) -> bool {
        let g = self.inner.lock().expect("cache lock");
        g.lru.contains(id) || g.inflight.contains_key(id)
    }

    /// The fetch of `id`, now in flight, if it is neither cached nor in flight already: the
    /// caller completes it with [`ChunkCache::fill`] (concurrent readers join it meanwhile).
    pub fn claim(&self, id: ChunkId) -> Option<Fetch> {
        let mut g = self.inner.lock().expect("cache lock");
        if g.lru.contains(&id) || g.inflight.contains_key(&id) {
            return None;
        }
        Some(g.inflight.entry(id).or_default().clone())
    }

    /// The cached chunk, or the result of `fetch` (shared with concurrent callers for `id`).
    pub async fn get_or_fetch<F, Fut>(&self, id: ChunkId, fetch: F) -> Result<Arc<Vec<u8>>, FsError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, FsError>>,
    {
        let cell = {
            let mut g = self.inner.lock().expect("cache lock");
            if let Some(hit) = self.tally.record(g.lru.get(&id)) {
                return Ok(hit.clone());
            }
            g.inflight.entry(id).or_default().clone()
        };
        self.fill(id, cell, fetch).await
    }

    /// Complete the fetch `cell` of `id` (or join it), and cache what it got.
    pub async fn fill<F, Fut>(
        &self,
        id: ChunkId,
        cell: Fetch,
        fetch: F,
    ) -> Result<Arc<Vec<u8>>, FsError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, FsError>>,
    {
        let result = cell
            .get_or_init(|| async { fetch().await.map(Arc::new) })
            .await
            .clone();
        // Cached before it stops being in flight, so it is never held by neither.
        let mut g = self.inner.lock().expect("cache lock");
        if let Ok(data) = &result {
            self.put(&mut g, id, data.clone());
        }
        if g.inflight.get(&id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            g.inflight.remove(&id);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch_and_the_budget_holds() {
        let cache = ChunkCache::new(250);
        let fetches = AtomicUsize::new(0);
        let id = ChunkId::of(b"a");
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(vec![1u8; 100])
        };
        let (a, b) = tokio::join!(cache.get_or_fetch(id, fetch), cache.get_or_fetch(id, fetch));
        assert_eq!((a.unwrap().len(), b.unwrap().len()), (100, 100));
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        for i in 0..5u8 {
            cache.insert(ChunkId::of(&[i]), Arc::new(vec![i; 100]));
        }
        let g = cache.inner.lock().unwrap();
        assert!(
            g.bytes <= 250 && g.lru.len() == 2,
            "{} bytes in {} chunks",
            g.bytes,
            g.lru.len()
        );
    }

    #[tokio::test]
    async fn a_claimed_fetch_is_claimed_once_and_readers_join_it() {
        let cache = ChunkCache::new(1000);
        let fetches = AtomicUsize::new(0);
        let id = ChunkId::of(b"b");
        let fetch = || async {
            fetches.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(vec![2u8; 10])
        };
        let cell = cache.claim(id).expect("neither cached nor in flight");
        assert!(cache.claim(id).is_none(), "in flight from the claim on");
        assert!(cache.holds(&id));
        let (filled, joined) =
            tokio::join!(cache.fill(id, cell, fetch), cache.get_or_fetch(id, fetch));
        assert_eq!((filled.unwrap().len(), joined.unwrap().len()), (10, 10));
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(cache.claim(id).is_none(), "cached");
        assert!(cache.inner.lock().unwrap().inflight.is_empty());
    }
}
