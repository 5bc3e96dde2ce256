//! The brick's one RocksDB: chunks, the replicated namespace, the Raft log and state, the heal
//! index and local configuration, each in its own column family.

use mortar_proto::{BrickId, ChunkId, FsError};
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};
use std::path::Path;
use std::sync::Mutex;

/// Column families. The `meta_*` ones are the replicated state machine and travel in snapshots.
pub const CF_CHUNKS: &str = "chunks";
pub const CF_META_INODES: &str = "meta_inodes";
pub const CF_META_DENTRIES: &str = "meta_dentries";
pub const CF_META_SYS: &str = "meta_sys";
pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_STATE: &str = "raft_state";
pub const CF_HEAL_INDEX: &str = "heal_index";
pub const CF_CONFIG: &str = "config";

pub const META_CFS: [&str; 3] = [CF_META_INODES, CF_META_DENTRIES, CF_META_SYS];

const KEY_BRICK_ID: &[u8] = b"brick_id";
const KEY_CHUNK_COUNT: &[u8] = b"chunk_count";
const KEY_CHUNK_BYTES: &[u8] = b"chunk_bytes";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB at {path}: {err}")]
    Open { path: String, err: rocksdb::Error },
    #[error("RocksDB: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("stored value does not decode: {0}")]
    Corrupt(String),
}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> FsError {
        let msg = e.to_string();
        if msg.contains("No space left") {
            FsError::NoSpace(msg)
        } else {
            FsError::Io(msg)
        }
    }
}

/// Key-value rows as read from a scan.
pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

pub struct Store {
    pub db: DB,
    /// Serialises the exists-check and counter update of chunk puts.
    chunk_lock: Mutex<()>,
}

fn u64_at(v: Option<Vec<u8>>) -> u64 {
    v.and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(3);
        opts.set_max_total_wal_size(256 << 20);

        let mut chunk_opts = Options::default();
        // Large values live in blob files, so compaction does not rewrite chunk bytes.
        chunk_opts.set_enable_blob_files(true);
        chunk_opts.set_min_blob_size(32 * 1024);
        chunk_opts.set_blob_compression_type(rocksdb::DBCompressionType::None);
        chunk_opts.set_write_buffer_size(64 << 20);

        let mut meta_opts = Options::default();
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        meta_opts.set_block_based_table_factory(&table);
        meta_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_opts),
            ColumnFamilyDescriptor::new(CF_META_INODES, meta_opts.clone()),
            ColumnFamilyDescriptor::new(CF_META_DENTRIES, meta_opts.clone()),
            ColumnFamilyDescriptor::new(CF_META_SYS, meta_opts),
            ColumnFamilyDescriptor::new(CF_RAFT_LOG, Options::default()),
            ColumnFamilyDescriptor::new(CF_RAFT_STATE, Options::default()),
            ColumnFamilyDescriptor::new(CF_HEAL_INDEX, Options::default()),
            ColumnFamilyDescriptor::new(CF_CONFIG, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|err| StoreError::Open {
            path: dir.display().to_string(),
            err,
        })?;
        Ok(Store {
            db,
            chunk_lock: Mutex::new(()),
        })
    }

    pub fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is created at open")
    }

    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    pub fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        Ok(self.db.write_opt(batch, &wo)?)
    }

    /// Entries of `cf` whose key starts with `prefix`, after `after` (exclusive), up to `limit`.
    pub fn scan(
        &self,
        cf: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Rows, StoreError> {
        let start = after.unwrap_or(prefix);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(cf), IteratorMode::From(start, Direction::Forward))
        {
            let (k, v) = item?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            if after.is_some_and(|a| &*k == a) {
                continue;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    pub fn count(&self, cf: &str) -> Result<u64, StoreError> {
        let mut n = 0;
        for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// This brick's Raft node id, created on first start.
    pub fn brick_id(&self) -> Result<BrickId, StoreError> {
        if let Some(v) = self.get(CF_CONFIG, KEY_BRICK_ID)? {
            return Ok(u64_at(Some(v)));
        }
        // Non-zero and below 2^63 so it prints the same everywhere.
        let id = (rand::random::<u64>() >> 1).max(1);
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_CONFIG), KEY_BRICK_ID, id.to_be_bytes());
        self.write(b, true)?;
        Ok(id)
    }

    // ---- chunks ----

    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self.db.get_pinned_cf(self.cf(CF_CHUNKS), id.0)?.is_some())
    }

    pub fn get_chunk(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(CF_CHUNKS, &id.0)
    }

    /// Store a verified chunk. Content addressing makes a repeated put a no-op.
    pub fn put_chunk(&self, id: &ChunkId, data: &[u8], sync: bool) -> Result<(), StoreError> {
        let _guard = self.chunk_lock.lock().expect("chunk lock");
        if self.has_chunk(id)? {
            if sync {
                self.db.flush_wal(true)?;
            }
            return Ok(());
        }
        let count = u64_at(self.get(CF_CONFIG, KEY_CHUNK_COUNT)?) + 1;
        let bytes = u64_at(self.get(CF_CONFIG, KEY_CHUNK_BYTES)?) + data.len() as u64;
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_CHUNKS), id.0, data);
        b.put_cf(self.cf(CF_CONFIG), KEY_CHUNK_COUNT, count.to_be_bytes());
        b.put_cf(self.cf(CF_CONFIG), KEY_CHUNK_BYTES, bytes.to_be_bytes());
        self.write(b, sync)
    }

    pub fn chunk_totals(&self) -> Result<(u64, u64), StoreError> {
        Ok((
            u64_at(self.get(CF_CONFIG, KEY_CHUNK_COUNT)?),
            u64_at(self.get(CF_CONFIG, KEY_CHUNK_BYTES)?),
        ))
    }

    pub fn list_chunks(
        &self,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<ChunkId>, StoreError> {
        self.scan(CF_CHUNKS, &[], after.map(|a| &a.0[..]), limit)?
            .into_iter()
            .map(|(k, _)| {
                k.try_into()
                    .map(ChunkId)
                    .map_err(|_| StoreError::Corrupt("chunk key is not 32 bytes".into()))
            })
            .collect()
    }

    // ---- heal index: (brick that misses it, chunk) ----

    fn heal_key(brick: BrickId, chunk: &ChunkId) -> Vec<u8> {
        let mut k = brick.to_be_bytes().to_vec();
        k.extend_from_slice(&chunk.0);
        k
    }

    pub fn record_misses(&self, misses: &[(BrickId, ChunkId)]) -> Result<(), StoreError> {
        let mut b = WriteBatch::default();
        for (brick, chunk) in misses {
            b.put_cf(self.cf(CF_HEAL_INDEX), Self::heal_key(*brick, chunk), []);
        }
        self.write(b, false)
    }

    pub fn list_heal_index(
        &self,
        after: Option<(BrickId, ChunkId)>,
        limit: usize,
    ) -> Result<Vec<(BrickId, ChunkId)>, StoreError> {
        let after = after.map(|(b, c)| Self::heal_key(b, &c));
        self.scan(CF_HEAL_INDEX, &[], after.as_deref(), limit)?
            .into_iter()
            .map(|(k, _)| {
                if k.len() != 40 {
                    return Err(StoreError::Corrupt("heal key is not 40 bytes".into()));
                }
                let brick = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
                let chunk = ChunkId(k[8..].try_into().expect("32 bytes"));
                Ok((brick, chunk))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_counters_ignore_repeated_puts() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = vec![7u8; 100_000];
        let id = ChunkId::of(&data);
        store.put_chunk(&id, &data, false).unwrap();
        store.put_chunk(&id, &data, true).unwrap();
        assert_eq!(store.chunk_totals().unwrap(), (1, 100_000));
        assert_eq!(store.get_chunk(&id).unwrap().unwrap(), data);
        assert_eq!(store.list_chunks(None, 10).unwrap(), vec![id]);
        assert!(store.list_chunks(Some(&id), 10).unwrap().is_empty());
        let first = store.brick_id().unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.brick_id().unwrap(), first);
        assert_eq!(store.chunk_totals().unwrap(), (1, 100_000));
    }

    #[test]
    fn heal_index_lists_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = ChunkId::of(b"a");
        let b = ChunkId::of(b"b");
        store.record_misses(&[(9, a), (3, b), (9, a)]).unwrap();
        let all = store.list_heal_index(None, 10).unwrap();
        assert_eq!(all, vec![(3, b), (9, a)]);
        assert_eq!(
            store.list_heal_index(Some((3, b)), 10).unwrap(),
            vec![(9, a)]
        );
    }
}
