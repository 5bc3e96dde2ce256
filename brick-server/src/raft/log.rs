//! The Raft log and vote in the brick's RocksDB.

#![allow(clippy::result_large_err)]

use super::*;

#[derive(Clone)]
pub struct LogStore {
    store: Arc<Store>,
    bound: Arc<LogBound>,
}

impl LogStore {
    pub fn new(store: Arc<Store>, bound: Arc<LogBound>) -> LogStore {
        LogStore { store, bound }
    }
    fn state<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        match self.store.get(CF_RAFT_STATE, key).map_err(read_err)? {
            Some(b) => Ok(Some(dec(&b)?)),
            None => Ok(None),
        }
    }
    fn put_state<T: Serialize>(&self, key: &[u8], v: &T, sync: bool) -> StorageResult<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.store.cf(CF_RAFT_STATE), key, enc(v));
        self.store.write(b, sync).map_err(io_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let cf = self.store.cf(CF_RAFT_LOG);
        for item in self.store.db.iterator_cf(
            cf,
            IteratorMode::From(&start.to_be_bytes(), Direction::Forward),
        ) {
            let (k, v) = item.map_err(read_err)?;
            let idx = u64::from_be_bytes(k[..8].try_into().map_err(read_err)?);
            if !range.contains(&idx) {
                break;
            }
            out.push(dec(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<NodeId>> = self.state(KEY_PURGED)?;
        let cf = self.store.cf(CF_RAFT_LOG);
        let last = match self.store.db.iterator_cf(cf, IteratorMode::End).next() {
            Some(item) => {
                let (_, v) = item.map_err(read_err)?;
                let e: Entry<TypeConfig> = dec(&v)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.put_state(KEY_VOTE, vote, true)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.state(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.put_state(KEY_COMMITTED, &committed, false)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self
            .state::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut b = WriteBatch::default();
        let mut sizes = Vec::new();
        for e in entries {
            let bytes = enc(&e);
            sizes.push((e.log_id.index, bytes.len() as u64));
            b.put_cf(cf, e.log_id.index.to_be_bytes(), bytes);
        }
        // Synced before openraft hears it is stored: an entry a majority acknowledged must
        // survive their power loss. One sync covers every entry openraft hands over at once
        // (group commit), and runs off the async runtime.
        let store = self.store.clone();
        let res = tokio::task::spawn_blocking(move || store.write(b, true))
            .await
            .unwrap_or_else(|e| Err(crate::store::StoreError::Task(e.to_string())));
        if res.is_ok() {
            for (index, bytes) in sizes {
                self.bound.appended(index, bytes);
            }
        }
        callback.log_io_completed(
            res.as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        res.map_err(io_err)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut b = WriteBatch::default();
        b.delete_range_cf(cf, log_id.index.to_be_bytes(), u64::MAX.to_be_bytes());
        b.delete_cf(cf, u64::MAX.to_be_bytes());
        self.store.write(b, false).map_err(io_err)?;
        self.bound.truncated(log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let cf = self.store.cf(CF_RAFT_LOG);
        let mut b = WriteBatch::default();
        // Stored as a bare LogId: `get_log_state` reads it back as one.
        b.put_cf(self.store.cf(CF_RAFT_STATE), KEY_PURGED, enc(&log_id));
        b.delete_range_cf(cf, 0u64.to_be_bytes(), (log_id.index + 1).to_be_bytes());
        self.store.write(b, false).map_err(io_err)?;
        self.bound.purged(log_id.index);
        tracing::info!("purged the log up to index {}", log_id.index);
        Ok(())
    }
}
