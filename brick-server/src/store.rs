//! The brick's one RocksDB: chunks, the replicated namespace, the Raft log and state, the heal
//! index and local configuration, each in its own column family.

use mortar_proto::digest::{bucket_of, bucket_start, Bucket, BUCKETS};
use mortar_proto::wire::{HealEntry, HealReason};
use mortar_proto::{BrickId, ChunkId, FsError};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch,
    WriteBufferManager, WriteOptions, DB,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Column families. The `meta_*` ones are the replicated state machine and travel in snapshots.
pub const CF_CHUNKS: &str = "chunks";
/// One small row per chunk (when it was last stored, its length): listings, existence checks
/// and garbage collection read these instead of the chunk bytes.
pub const CF_CHUNK_STAMPS: &str = "chunk_stamps";
/// The chunk-set digest, one row per bucket.
pub const CF_CHUNK_DIGEST: &str = "chunk_digest";
pub const CF_META_INODES: &str = "meta_inodes";
pub const CF_META_DENTRIES: &str = "meta_dentries";
pub const CF_META_SYS: &str = "meta_sys";
/// Namespace rows kept for snapshots (copy-on-write, `namespace::snapshots`).
pub const CF_META_SNAP: &str = "meta_snap";
pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_STATE: &str = "raft_state";
pub const CF_HEAL_INDEX: &str = "heal_index";
/// Copies that failed verification, kept out of service (nothing reads or lists them) until a
/// good copy is stored here again or no file names the chunk any more: the evidence is not
/// destroyed before a good copy is known to exist.
pub const CF_QUARANTINE: &str = "quarantine";
pub const CF_CONFIG: &str = "config";

/// RocksDB's memory: block cache and memtables together.
const MEMORY: usize = 128 << 20;
/// The memtables' share of MEMORY.
const WRITE_BUFFERS: usize = 64 << 20;
/// The write-ahead log's bound.
const WAL_BYTES: u64 = 64 << 20;
/// Chunks go to blob files of about this size (the unit blob garbage collection rewrites).
const BLOB_FILE_BYTES: u64 = 64 << 20;
/// Disk RocksDB may need beyond what it holds now: memtables flushed to new files before the
/// WAL that holds them goes, the WAL rolling up to its bound, a blob file being filled. A
/// brick's reserve for metadata comes on top of it (`space::Space`), so RocksDB itself never
/// meets ENOSPC, which it does not recover from without a restart.
pub const TRANSIENT_BYTES: u64 = WRITE_BUFFERS as u64 + WAL_BYTES + BLOB_FILE_BYTES;

const KEY_BRICK_ID: &[u8] = b"brick_id";
const KEY_CHUNK_COUNT: &[u8] = b"chunk_count";
const KEY_CHUNK_BYTES: &[u8] = b"chunk_bytes";
/// Present once stamps and digest cover every chunk (stores from before they existed are
/// indexed once at open).
const KEY_CHUNK_INDEX_READY: &[u8] = b"chunk_index_v1";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("RocksDB at {path}: {err}")]
    Open { path: String, err: rocksdb::Error },
    #[error("RocksDB: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("stored value does not decode: {0}")]
    Corrupt(String),
    #[error("storage thread failed: {0}")]
    Task(String),
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
    dir: PathBuf,
    /// Serialises the exists-check and counter update of chunk puts.
    chunk_lock: Mutex<()>,
    /// Chunk bytes collected since the last reclaim.
    collected: AtomicU64,
}

/// A reclaim compacts the chunks once collected garbage reaches this share of the live
/// chunk bytes (or RECLAIM_MIN): a compaction rewrites the chunk index and moves live chunks
/// out of old blob files, too costly to run for every few deletions.
const RECLAIM_SHARE: u64 = 20;
const RECLAIM_MIN: u64 = 64 << 20;

fn u64_at(v: Option<Vec<u8>>) -> u64 {
    v.and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        // One cache holds every column family's blocks, index and filter blocks, and is
        // charged for the memtables too: RocksDB's memory stays within MEMORY whatever the
        // namespace size or the write burst.
        let cache = Cache::new_lru_cache(MEMORY);
        let buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            WRITE_BUFFERS,
            false,
            cache.clone(),
        );
        let table = |bloom: bool| {
            let mut t = BlockBasedOptions::default();
            t.set_block_cache(&cache);
            t.set_cache_index_and_filter_blocks(true);
            t.set_pin_l0_filter_and_index_blocks_in_cache(true);
            if bloom {
                t.set_bloom_filter(10.0, false);
            }
            t
        };
        let cf_opts = |bloom: bool| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&table(bloom));
            o
        };

        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_keep_log_file_num(3);
        // Chunk bytes sit in the WAL until their memtable is flushed; a small bound keeps that
        // second copy (and the replay at start) small.
        opts.set_max_total_wal_size(WAL_BYTES);
        opts.set_write_buffer_manager(&buffers);

        let mut chunk_opts = cf_opts(false);
        // Large values live in blob files, so compaction does not rewrite chunk bytes.
        chunk_opts.set_enable_blob_files(true);
        chunk_opts.set_min_blob_size(32 * 1024);
        chunk_opts.set_blob_compression_type(rocksdb::DBCompressionType::None);
        // Compactions move the live chunks out of the oldest quarter of blob files, so a file
        // whose chunks are mostly collected is rewritten and freed, not kept for its survivors.
        chunk_opts.set_blob_file_size(BLOB_FILE_BYTES);
        chunk_opts.set_enable_blob_gc(true);
        chunk_opts.set_blob_gc_age_cutoff(0.25);
        chunk_opts.set_blob_gc_force_threshold(0.5);
        chunk_opts.set_write_buffer_size(WRITE_BUFFERS / 2);

        let mut meta_opts = cf_opts(true);
        // Inodes hold small files inline. Compress only the deeper levels: flushes and the
        // first compactions rewrite fresh data on every copy into the volume, and compressing
        // it there cost the bricks more CPU than anything else during `cp -a` (perf: LZ4 13%).
        use rocksdb::DBCompressionType::{Lz4, None as Plain};
        meta_opts.set_compression_per_level(&[Plain, Plain, Lz4, Lz4, Lz4, Lz4, Lz4]);
        meta_opts.set_write_buffer_size(WRITE_BUFFERS / 2);

        // Log entries are deleted once applied and snapshotted: compressing them is wasted.
        let mut log_opts = cf_opts(false);
        log_opts.set_compression_type(Plain);
        log_opts.set_write_buffer_size(WRITE_BUFFERS / 2);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_opts),
            ColumnFamilyDescriptor::new(CF_CHUNK_STAMPS, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_CHUNK_DIGEST, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_META_INODES, meta_opts.clone()),
            ColumnFamilyDescriptor::new(CF_META_DENTRIES, meta_opts.clone()),
            ColumnFamilyDescriptor::new(CF_META_SYS, meta_opts.clone()),
            ColumnFamilyDescriptor::new(CF_META_SNAP, meta_opts),
            ColumnFamilyDescriptor::new(CF_RAFT_LOG, log_opts),
            ColumnFamilyDescriptor::new(CF_RAFT_STATE, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_HEAL_INDEX, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_QUARANTINE, cf_opts(false)),
            ColumnFamilyDescriptor::new(CF_CONFIG, cf_opts(false)),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|err| StoreError::Open {
            path: dir.display().to_string(),
            err,
        })?;
        let store = Store {
            db,
            dir: dir.to_path_buf(),
            chunk_lock: Mutex::new(()),
            collected: AtomicU64::new(0),
        };
        store.index_chunks_once()?;
        Ok(store)
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

    /// Stamp and digest every chunk of a store written before stamps and digests existed.
    fn index_chunks_once(&self) -> Result<(), StoreError> {
        if self.get(CF_CONFIG, KEY_CHUNK_INDEX_READY)?.is_some() {
            return Ok(());
        }
        let now = unix_now();
        let mut buckets = vec![Bucket::default(); BUCKETS];
        let mut b = WriteBatch::default();
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS), IteratorMode::Start) {
            let (k, v) = item?;
            let id = chunk_key(&k)?;
            buckets[bucket_of(&id) as usize].add(&id);
            b.put_cf(self.cf(CF_CHUNK_STAMPS), id.0, stamp(now, v.len() as u64));
        }
        for (i, bucket) in buckets.iter().enumerate() {
            if bucket.count > 0 {
                b.put_cf(
                    self.cf(CF_CHUNK_DIGEST),
                    (i as u16).to_be_bytes(),
                    bucket.encode(),
                );
            }
        }
        b.put_cf(self.cf(CF_CONFIG), KEY_CHUNK_INDEX_READY, []);
        self.write(b, true)
    }

    fn chunk_stamp(&self, id: &ChunkId) -> Result<Option<(u64, u64)>, StoreError> {
        Ok(self.get(CF_CHUNK_STAMPS, &id.0)?.and_then(|v| unstamp(&v)))
    }

    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool, StoreError> {
        Ok(self.chunk_stamp(id)?.is_some())
    }

    pub fn get_chunk(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(CF_CHUNKS, &id.0)
    }

    fn bucket(&self, id: &ChunkId) -> Result<Bucket, StoreError> {
        let key = bucket_of(id).to_be_bytes();
        match self.get(CF_CHUNK_DIGEST, &key)? {
            None => Ok(Bucket::default()),
            Some(v) => Bucket::decode(&v)
                .ok_or_else(|| StoreError::Corrupt("digest bucket is not 40 bytes".into())),
        }
    }

    /// Add the counter, digest and stamp changes for storing or removing one chunk to `b`.
    /// Callers hold `chunk_lock`, so the read-modify-writes do not interleave.
    fn account(
        &self,
        b: &mut WriteBatch,
        id: &ChunkId,
        len: u64,
        added: bool,
    ) -> Result<(), StoreError> {
        let count = u64_at(self.get(CF_CONFIG, KEY_CHUNK_COUNT)?);
        let bytes = u64_at(self.get(CF_CONFIG, KEY_CHUNK_BYTES)?);
        let mut bucket = self.bucket(id)?;
        let (count, bytes) = if added {
            bucket.add(id);
            b.put_cf(self.cf(CF_CHUNK_STAMPS), id.0, stamp(unix_now(), len));
            (count + 1, bytes + len)
        } else {
            bucket.remove(id);
            b.delete_cf(self.cf(CF_CHUNK_STAMPS), id.0);
            (count.saturating_sub(1), bytes.saturating_sub(len))
        };
        b.put_cf(
            self.cf(CF_CHUNK_DIGEST),
            bucket_of(id).to_be_bytes(),
            bucket.encode(),
        );
        b.put_cf(self.cf(CF_CONFIG), KEY_CHUNK_COUNT, count.to_be_bytes());
        b.put_cf(self.cf(CF_CONFIG), KEY_CHUNK_BYTES, bytes.to_be_bytes());
        Ok(())
    }

    /// Store a verified chunk. Content addressing makes a repeated put store nothing new, but
    /// it renews the stamp: a writer is about to reference the chunk, so garbage collection
    /// must wait out its grace period again.
    pub fn put_chunk(&self, id: &ChunkId, data: &[u8], sync: bool) -> Result<(), StoreError> {
        let _guard = self.chunk_lock.lock().expect("chunk lock");
        let mut b = WriteBatch::default();
        if self.has_chunk(id)? {
            b.put_cf(
                self.cf(CF_CHUNK_STAMPS),
                id.0,
                stamp(unix_now(), data.len() as u64),
            );
        } else {
            b.put_cf(self.cf(CF_CHUNKS), id.0, data);
            self.account(&mut b, id, data.len() as u64, true)?;
        }
        // Only verified bytes are stored: a quarantined bad copy is no longer needed.
        if self.get(CF_QUARANTINE, &id.0)?.is_some() {
            b.delete_cf(self.cf(CF_QUARANTINE), id.0);
        }
        self.write(b, sync)
    }

    /// Chunks whose bad copy is quarantined here.
    pub fn quarantined(&self) -> Result<Vec<ChunkId>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_QUARANTINE), IteratorMode::Start)
        {
            let (k, _) = item?;
            if let Ok(id) = <[u8; 32]>::try_from(&k[..]) {
                out.push(ChunkId(id));
            }
        }
        Ok(out)
    }

    /// Remove chunks whose stamp is at least `grace_secs` old; returns the ones removed.
    pub fn collect_garbage(
        &self,
        ids: &[ChunkId],
        grace_secs: u64,
    ) -> Result<Vec<ChunkId>, StoreError> {
        self.collect_garbage_at(ids, grace_secs, u64::MAX)
    }

    /// Delete `ids` unless stored within `grace_secs` of the earlier of this host's clock and
    /// `now` (another host's, Unix seconds): both clocks must agree the chunk is old.
    pub fn collect_garbage_at(
        &self,
        ids: &[ChunkId],
        grace_secs: u64,
        now: u64,
    ) -> Result<Vec<ChunkId>, StoreError> {
        let cutoff = unix_now().min(now).saturating_sub(grace_secs);
        let _guard = self.chunk_lock.lock().expect("chunk lock");
        let mut removed = Vec::new();
        for id in ids {
            if let Some((stored, len)) = self.chunk_stamp(id)? {
                if stored <= cutoff {
                    let mut b = WriteBatch::default();
                    b.delete_cf(self.cf(CF_CHUNKS), id.0);
                    self.account(&mut b, id, len, false)?;
                    self.write(b, false)?;
                    self.collected.fetch_add(len, Ordering::Relaxed);
                    removed.push(*id);
                }
            }
        }
        if !removed.is_empty() {
            self.db.flush_wal(true)?;
        }
        Ok(removed)
    }

    /// Bytes the data directory takes on disk (allocated blocks, so sparse files count as
    /// what they use).
    pub fn disk_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            use std::os::unix::fs::MetadataExt;
            let Ok(entries) = std::fs::read_dir(p) else {
                return 0;
            };
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.blocks() * 512,
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.dir)
    }

    /// Give the space of collected chunks back to the filesystem once there is enough of it:
    /// a compaction of the chunk column families drops the deleted rows, frees blob files
    /// whose chunks are all gone and rewrites the oldest ones that are mostly garbage.
    /// Returns whether it compacted. Blocking, for as long as the compaction runs.
    pub fn reclaim_space(&self) -> Result<bool, StoreError> {
        let collected = self.collected.load(Ordering::Relaxed);
        let (_, live) = self.chunk_totals()?;
        if collected < RECLAIM_MIN.min(live / RECLAIM_SHARE).max(1) {
            return Ok(false);
        }
        self.collected.fetch_sub(collected, Ordering::Relaxed);
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for cf in [CF_CHUNKS, CF_CHUNK_STAMPS] {
            self.db.flush_cf(self.cf(cf))?;
            self.db
                .compact_range_cf_opt(self.cf(cf), None::<&[u8]>, None::<&[u8]>, &opts);
        }
        self.db.flush_wal(true)?;
        Ok(true)
    }

    /// Take a copy that failed verification out of service into the quarantine, and note that
    /// this brick needs a good one.
    pub fn quarantine(&self, self_id: BrickId, id: &ChunkId) -> Result<(), StoreError> {
        let _guard = self.chunk_lock.lock().expect("chunk lock");
        let Some((_, len)) = self.chunk_stamp(id)? else {
            return Ok(());
        };
        let mut b = WriteBatch::default();
        if let Some(bad) = self.get(CF_CHUNKS, &id.0)? {
            b.put_cf(self.cf(CF_QUARANTINE), id.0, bad);
        }
        b.delete_cf(self.cf(CF_CHUNKS), id.0);
        self.account(&mut b, id, len, false)?;
        let entry = HealEntry {
            brick: self_id,
            chunk: *id,
            reason: HealReason::Corrupt,
            bytes: len,
        };
        b.put_cf(
            self.cf(CF_HEAL_INDEX),
            Self::heal_key(self_id, id),
            heal_value(&entry),
        );
        self.write(b, true)
    }

    pub fn chunk_totals(&self) -> Result<(u64, u64), StoreError> {
        Ok((
            u64_at(self.get(CF_CONFIG, KEY_CHUNK_COUNT)?),
            u64_at(self.get(CF_CONFIG, KEY_CHUNK_BYTES)?),
        ))
    }

    pub fn chunk_digest(&self) -> Result<Vec<Bucket>, StoreError> {
        let mut out = vec![Bucket::default(); BUCKETS];
        for item in self
            .db
            .iterator_cf(self.cf(CF_CHUNK_DIGEST), IteratorMode::Start)
        {
            let (k, v) = item?;
            let i: [u8; 2] = (*k)
                .try_into()
                .map_err(|_| StoreError::Corrupt("digest key is not 2 bytes".into()))?;
            let bucket = Bucket::decode(&v)
                .ok_or_else(|| StoreError::Corrupt("digest bucket is not 40 bytes".into()))?;
            if let Some(slot) = out.get_mut(u16::from_be_bytes(i) as usize) {
                *slot = bucket;
            }
        }
        Ok(out)
    }

    pub fn list_chunks(
        &self,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<ChunkId>, StoreError> {
        self.scan(CF_CHUNK_STAMPS, &[], after.map(|a| &a.0[..]), limit)?
            .into_iter()
            .map(|(k, _)| chunk_key(&k))
            .collect()
    }

    pub fn list_bucket(
        &self,
        bucket: u16,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<ChunkId>, StoreError> {
        let start = bucket_start(bucket);
        let from = match after {
            Some(a) if bucket_of(a) == bucket => a.0.to_vec(),
            _ => start.to_vec(),
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.cf(CF_CHUNK_STAMPS),
            IteratorMode::From(&from, Direction::Forward),
        ) {
            let (k, _) = item?;
            let id = chunk_key(&k)?;
            if bucket_of(&id) != bucket || out.len() >= limit {
                break;
            }
            if after != Some(&id) {
                out.push(id);
            }
        }
        Ok(out)
    }

    // ---- heal index: (brick that lacks a good copy, chunk) -> (reason, length) ----

    fn heal_key(brick: BrickId, chunk: &ChunkId) -> Vec<u8> {
        let mut k = brick.to_be_bytes().to_vec();
        k.extend_from_slice(&chunk.0);
        k
    }

    pub fn record_misses(&self, misses: &[HealEntry]) -> Result<(), StoreError> {
        let mut b = WriteBatch::default();
        for e in misses {
            b.put_cf(
                self.cf(CF_HEAL_INDEX),
                Self::heal_key(e.brick, &e.chunk),
                heal_value(e),
            );
        }
        self.write(b, false)
    }

    /// Drop heal index entries (heal found the brick holds the chunk again, or no file needs
    /// it); a bad copy of this brick's own quarantined for such an entry goes with it.
    pub fn clear_heal_index(&self, entries: &[(BrickId, ChunkId)]) -> Result<(), StoreError> {
        let me = self.brick_id()?;
        let mut b = WriteBatch::default();
        for (brick, chunk) in entries {
            b.delete_cf(self.cf(CF_HEAL_INDEX), Self::heal_key(*brick, chunk));
            if *brick == me {
                b.delete_cf(self.cf(CF_QUARANTINE), chunk.0);
            }
        }
        self.write(b, true)
    }

    pub fn list_heal_index(
        &self,
        after: Option<(BrickId, ChunkId)>,
        limit: usize,
    ) -> Result<Vec<HealEntry>, StoreError> {
        let after = after.map(|(b, c)| Self::heal_key(b, &c));
        self.scan(CF_HEAL_INDEX, &[], after.as_deref(), limit)?
            .into_iter()
            .map(|(k, v)| {
                if k.len() != 40 {
                    return Err(StoreError::Corrupt("heal key is not 40 bytes".into()));
                }
                let brick = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
                let chunk = ChunkId(k[8..].try_into().expect("32 bytes"));
                let (reason, bytes) = match v.first() {
                    Some(1) => (HealReason::Corrupt, u64_at(v.get(1..).map(|s| s.to_vec()))),
                    Some(_) => (
                        HealReason::MissedWrite,
                        u64_at(v.get(1..).map(|s| s.to_vec())),
                    ),
                    None => (HealReason::MissedWrite, 0),
                };
                Ok(HealEntry {
                    brick,
                    chunk,
                    reason,
                    bytes,
                })
            })
            .collect()
    }
}

/// Run storage work that reads or scans much on a blocking thread, so heartbeats and client
/// requests keep flowing on the async runtime meanwhile.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, FsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FsError::Io(format!("storage thread failed: {e}")))?
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn stamp(secs: u64, len: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&secs.to_be_bytes());
    out[8..].copy_from_slice(&len.to_be_bytes());
    out
}

fn unstamp(v: &[u8]) -> Option<(u64, u64)> {
    Some((
        u64::from_be_bytes(v.get(..8)?.try_into().ok()?),
        u64::from_be_bytes(v.get(8..16)?.try_into().ok()?),
    ))
}

fn chunk_key(k: &[u8]) -> Result<ChunkId, StoreError> {
    k.try_into()
        .map(ChunkId)
        .map_err(|_| StoreError::Corrupt("chunk key is not 32 bytes".into()))
}

fn heal_value(e: &HealEntry) -> Vec<u8> {
    let mut v = vec![match e.reason {
        HealReason::MissedWrite => 0u8,
        HealReason::Corrupt => 1,
    }];
    v.extend_from_slice(&e.bytes.to_be_bytes());
    v
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
        let entry = |brick, chunk| HealEntry {
            brick,
            chunk,
            reason: HealReason::MissedWrite,
            bytes: 1,
        };
        store
            .record_misses(&[entry(9, a), entry(3, b), entry(9, a)])
            .unwrap();
        let all = store.list_heal_index(None, 10).unwrap();
        assert_eq!(all, vec![entry(3, b), entry(9, a)]);
        assert_eq!(
            store.list_heal_index(Some((3, b)), 10).unwrap(),
            vec![entry(9, a)]
        );
        store.clear_heal_index(&[(3, b)]).unwrap();
        assert_eq!(store.list_heal_index(None, 10).unwrap(), vec![entry(9, a)]);
    }

    #[test]
    fn digest_stamps_gc_and_quarantine_stay_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let chunks: Vec<Vec<u8>> = (0..50u32).map(|n| n.to_le_bytes().repeat(100)).collect();
        let ids: Vec<ChunkId> = chunks.iter().map(|c| ChunkId::of(c)).collect();
        for (id, c) in ids.iter().zip(&chunks) {
            store.put_chunk(id, c, false).unwrap();
        }
        let full = store.chunk_digest().unwrap();
        assert_eq!(full.iter().map(|b| b.count).sum::<u64>(), 50);
        let mut listed = Vec::new();
        for bucket in 0..BUCKETS as u16 {
            listed.extend(store.list_bucket(bucket, None, 1000).unwrap());
        }
        let mut sorted = ids.clone();
        sorted.sort_by_key(|c| c.0);
        assert_eq!(listed, sorted);

        // Fresh chunks are inside any grace period; with none they go, counters follow.
        assert!(store.collect_garbage(&ids[..10], 3600).unwrap().is_empty());
        assert_eq!(
            store.collect_garbage(&ids[..10], 0).unwrap(),
            ids[..10].to_vec()
        );
        assert_eq!(store.chunk_totals().unwrap(), (40, 40 * 400));
        assert!(!store.has_chunk(&ids[0]).unwrap());
        assert!(store.get_chunk(&ids[0]).unwrap().is_none());

        store.quarantine(5, &ids[20]).unwrap();
        assert!(!store.has_chunk(&ids[20]).unwrap());
        assert_eq!(
            store.quarantined().unwrap(),
            vec![ids[20]],
            "kept aside, not deleted"
        );
        let heal = store.list_heal_index(None, 10).unwrap();
        assert_eq!(heal.len(), 1);
        assert_eq!(
            (heal[0].brick, heal[0].reason, heal[0].bytes),
            (5, HealReason::Corrupt, 400)
        );
        // A good copy stored again ends the quarantine.
        store.put_chunk(&ids[20], &chunks[20], false).unwrap();
        assert!(store.quarantined().unwrap().is_empty());
        store.quarantine(5, &ids[21]).unwrap();

        // Putting everything back restores the original digest exactly.
        for (id, c) in ids.iter().zip(&chunks) {
            store.put_chunk(id, c, false).unwrap();
        }
        assert_eq!(store.chunk_digest().unwrap(), full);

        // A store without the index is indexed once at open, to the same digest.
        store
            .db
            .delete_cf(store.cf(CF_CONFIG), KEY_CHUNK_INDEX_READY)
            .unwrap();
        for bucket in 0..BUCKETS as u16 {
            store
                .db
                .delete_cf(store.cf(CF_CHUNK_DIGEST), bucket.to_be_bytes())
                .unwrap();
        }
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.chunk_digest().unwrap(), full);
    }
}
