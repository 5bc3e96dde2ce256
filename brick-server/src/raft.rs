//! The metadata group: openraft over the volume's first replica set, with its log and state
//! machine in the brick's RocksDB and its RPCs on the brick's QUIC transport.

// openraft's storage traits fix the error type (`StorageError`, over 200 bytes); our helpers
// return it as the traits do.
#![allow(clippy::result_large_err)]

use crate::log_bound::LogBound;
use crate::namespace::{self, MetaRead, Table, Txn};
use crate::snapshot::{self, table_cf};
use crate::store::{Store, CF_RAFT_LOG, CF_RAFT_STATE};
use mortar_proto::transport::Pool;
use mortar_proto::wire::{self, Inval, MetaOk, MetaOp, OpId, RaftKind, RaftRpc, Reply, Request};
use mortar_proto::{FsError, Inode, Timestamp, VolumeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, LogState, OptionalSend, RaftLogReader,
    RaftNetwork, RaftNetworkFactory, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use rocksdb::{Direction, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub type NodeId = u64;

/// One Raft log entry's application payload: the operation and the leader's clock when it was
/// proposed, so every replica applies identical timestamps.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Command {
    pub op: MetaOp,
    /// Set by clients so a retried change is applied once.
    pub once: Option<OpId>,
    pub now: Timestamp,
}

pub type MetaResult = Result<MetaOk, FsError>;

/// The outcome of one applied entry, with what it modified (for the leader's invalidations).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Applied {
    pub result: MetaResult,
    pub touched: Vec<Inval>,
    /// Directories it modified, as they are now.
    pub fresh: Vec<Inode>,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = Applied,
        SnapshotData = tokio::fs::File,
        NodeId = NodeId,
        Node = BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig>;
type StorageResult<T> = Result<T, StorageError<NodeId>>;
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>);

/// Log entries between snapshots (after which older entries are purged).
pub const SNAPSHOT_EVERY: u64 = 20_000;

/// Timing of the metadata group. Heartbeats every 100 ms and elections after 400–800 ms of
/// silence keep a leader change well inside the failover budget.
pub fn config(snapshot_every: u64) -> openraft::Config {
    openraft::Config {
        cluster_name: "mortar".into(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        // Per chunk; the last chunk's reply waits for the install, which reads the whole file
        // twice and rewrites the namespace.
        install_snapshot_timeout: 120_000,
        max_payload_entries: 64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: (snapshot_every / 10).max(1),
        purge_batch_size: 512,
        snapshot_max_chunk_size: 4 * 1024 * 1024,
        ..Default::default()
    }
}

fn io_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(AnyError::new(&e)).into()
}
fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(AnyError::new(&e)).into()
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    wire::encode(v)
}
fn dec<T: serde::de::DeserializeOwned>(b: &[u8]) -> StorageResult<T> {
    wire::decode(b).map_err(read_err)
}

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";
const KEY_APPLIED: &[u8] = b"applied";
const KEY_MEMBERSHIP: &[u8] = b"membership";
const KEY_SNAPSHOT: &[u8] = b"snapshot";
const KEY_INSTALLING: &[u8] = b"installing";

// ---------------------------------------------------------------- log

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

// ---------------------------------------------------------------- state machine

/// Read access to the committed namespace in RocksDB, for queries and for applying.
pub struct DbMeta<'a>(pub &'a Store);

impl MetaRead for DbMeta<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, FsError> {
        Ok(self.0.get(table_cf(table), key)?)
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::store::Rows, FsError> {
        Ok(self.0.scan(table_cf(table), prefix, after, limit)?)
    }
}

/// The volume configuration as last applied, shared with the chunk service.
pub type SharedVolume = Arc<RwLock<Option<VolumeConfig>>>;

type Meta = SnapshotMeta<NodeId, BasicNode>;

/// The state machine's record of a snapshot file: its meta and its name in the snapshot
/// directory. Stored under `KEY_SNAPSHOT` for the current one and `KEY_INSTALLING` while an
/// install runs.
#[derive(Clone, Serialize, Deserialize)]
struct SnapshotRecord {
    meta: Meta,
    file: String,
}

pub struct StateMachine {
    store: Arc<Store>,
    volume: SharedVolume,
    /// Where snapshot files live (the brick's data directory's `snapshots/`).
    dir: Arc<PathBuf>,
    /// Serialises changes of the current snapshot between builders (which openraft runs on
    /// their own) and installs.
    current: Arc<tokio::sync::Mutex<()>>,
    /// The file the snapshot being received is written to.
    receiving: Option<PathBuf>,
}

async fn background_build<T: Send + 'static>(
    f: impl FnOnce() -> StorageResult<T> + Send + 'static,
) -> StorageResult<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    crate::background::run(move || {
        let _ = tx.send(f());
        Ok(())
    })
    .await
    .map_err(io_err)?;
    rx.await
        .map_err(|e| io_err(std::io::Error::other(e.to_string())))?
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StorageResult<T> + Send + 'static,
) -> StorageResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(std::io::Error::other(e.to_string())))?
}

impl StateMachine {
    /// Open the state machine over `store`, keeping snapshot files in `dir`. An install that
    /// was interrupted is finished first, from its file.
    pub fn new(
        store: Arc<Store>,
        volume: SharedVolume,
        dir: PathBuf,
    ) -> Result<StateMachine, FsError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| FsError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let sm = StateMachine {
            store,
            volume,
            dir: Arc::new(dir),
            current: Arc::default(),
            receiving: None,
        };
        if let Some(rec) = sm
            .record(KEY_INSTALLING)
            .map_err(|e| FsError::Io(e.to_string()))?
        {
            tracing::warn!(file = %rec.file, "finishing a snapshot install that was interrupted");
            sm.install_file(&rec)
                .map_err(|e| FsError::Io(e.to_string()))?;
        }
        let current = sm
            .record(KEY_SNAPSHOT)
            .map_err(|e| FsError::Io(e.to_string()))?;
        snapshot::remove_others(&sm.dir, current.map(|r| sm.dir.join(r.file)).as_deref());
        *sm.volume.write().expect("volume lock") = namespace::volume(&DbMeta(&sm.store))?;
        Ok(sm)
    }

    fn clone_handle(&self) -> StateMachine {
        StateMachine {
            store: self.store.clone(),
            volume: self.volume.clone(),
            dir: self.dir.clone(),
            current: self.current.clone(),
            receiving: None,
        }
    }

    fn record(&self, key: &[u8]) -> StorageResult<Option<SnapshotRecord>> {
        match self.store.get(CF_RAFT_STATE, key).map_err(read_err)? {
            Some(b) => Ok(Some(dec(&b)?)),
            None => Ok(None),
        }
    }

    fn applied(&self) -> StorageResult<AppliedState> {
        let applied = match self
            .store
            .get(CF_RAFT_STATE, KEY_APPLIED)
            .map_err(read_err)?
        {
            Some(b) => dec(&b)?,
            None => None,
        };
        let membership = match self
            .store
            .get(CF_RAFT_STATE, KEY_MEMBERSHIP)
            .map_err(read_err)?
        {
            Some(b) => dec(&b)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    fn refresh_volume(&self) -> StorageResult<()> {
        let v = namespace::volume(&DbMeta(&self.store)).map_err(read_err)?;
        *self.volume.write().expect("volume lock") = v;
        Ok(())
    }

    /// Replace the namespace with a verified snapshot file named by `rec`, which becomes the
    /// current snapshot. Blocking.
    fn install_file(&self, rec: &SnapshotRecord) -> StorageResult<()> {
        let path = self.dir.join(&rec.file);
        let state = self.store.cf(CF_RAFT_STATE);
        let mut last = WriteBatch::default();
        last.put_cf(state, KEY_APPLIED, enc(&rec.meta.last_log_id));
        last.put_cf(state, KEY_MEMBERSHIP, enc(&rec.meta.last_membership));
        last.put_cf(state, KEY_SNAPSHOT, enc(rec));
        last.delete_cf(state, KEY_INSTALLING);
        let rows = snapshot::replace_namespace(&self.store, &path, last).map_err(io_err)?;
        tracing::info!(last_log_id = ?rec.meta.last_log_id, rows, "installed snapshot");
        snapshot::remove_others(&self.dir, Some(&path));
        Ok(())
    }

    /// Make `rec` the current snapshot unless a newer one already is; removes the others.
    fn make_current(&self, rec: &SnapshotRecord) -> StorageResult<bool> {
        if let Some(cur) = self.record(KEY_SNAPSHOT)? {
            if cur.meta.last_log_id > rec.meta.last_log_id {
                return Ok(false);
            }
        }
        let mut b = WriteBatch::default();
        b.put_cf(self.store.cf(CF_RAFT_STATE), KEY_SNAPSHOT, enc(rec));
        self.store.write(b, true).map_err(io_err)?;
        snapshot::remove_others(&self.dir, Some(&self.dir.join(&rec.file)));
        Ok(true)
    }

    async fn open_snapshot(&self, rec: SnapshotRecord) -> StorageResult<Snapshot<TypeConfig>> {
        let path = self.dir.join(&rec.file);
        let file = tokio::fs::File::open(&path).await.map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(
                Some(rec.meta.signature()),
                AnyError::new(&e),
            ))
        })?;
        Ok(Snapshot {
            meta: rec.meta,
            snapshot: Box::new(file),
        })
    }
}

/// blake3 over every namespace row and the applied index, read from one RocksDB snapshot.
/// Blocking: a full scan.
pub fn meta_digest(store: &Store) -> Result<(u64, [u8; 32]), FsError> {
    let snap = store.db.snapshot();
    let mut h = blake3::Hasher::new();
    for table in namespace::TABLES {
        let mut ro = rocksdb::ReadOptions::default();
        ro.fill_cache(false);
        ro.set_snapshot(&snap);
        for item in store
            .db
            .iterator_cf_opt(store.cf(table_cf(table)), ro, IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| FsError::Io(e.to_string()))?;
            h.update(&[table as u8]);
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(&k);
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(&v);
        }
    }
    let applied: Option<LogId<NodeId>> = match snap
        .get_cf(store.cf(CF_RAFT_STATE), KEY_APPLIED)
        .map_err(|e| FsError::Io(e.to_string()))?
    {
        Some(b) => wire::decode(&b).map_err(|e| FsError::Io(e.to_string()))?,
        None => None,
    };
    Ok((
        applied.map(|l| l.index).unwrap_or(0),
        *h.finalize().as_bytes(),
    ))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let _current = self.current.clone().lock_owned().await;
        let sm = self.clone_handle();
        // A scan of the whole namespace: on a background thread, behind the log and clients.
        let rec = background_build(move || {
            // Rows, applied index and membership all come from one RocksDB snapshot.
            let snap = sm.store.db.snapshot();
            let get = |key: &[u8]| {
                snap.get_cf(sm.store.cf(CF_RAFT_STATE), key)
                    .map_err(read_err)
            };
            let applied: Option<LogId<NodeId>> = match get(KEY_APPLIED)? {
                Some(b) => dec(&b)?,
                None => None,
            };
            let membership: StoredMembership<NodeId, BasicNode> = match get(KEY_MEMBERSHIP)? {
                Some(b) => dec(&b)?,
                None => StoredMembership::default(),
            };
            let id = format!(
                "{}-{:08x}",
                applied.map(|l| l.index).unwrap_or(0),
                rand::random::<u32>()
            );
            let rec = SnapshotRecord {
                meta: SnapshotMeta {
                    last_log_id: applied,
                    last_membership: membership,
                    snapshot_id: id.clone(),
                },
                file: format!("{id}.snap"),
            };
            let started = std::time::Instant::now();
            let built =
                snapshot::write_rows(&sm.store, &snap, &sm.dir.join(&rec.file)).map_err(io_err)?;
            drop(snap);
            tracing::info!(
                last_log_id = ?applied, rows = built.rows, bytes = built.bytes,
                ms = started.elapsed().as_millis() as u64, "built snapshot"
            );
            sm.make_current(&rec)?;
            Ok(rec)
        })
        .await?;
        self.open_snapshot(rec).await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> StorageResult<AppliedState> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut volume_changed = false;
        for entry in entries {
            let mut batch = WriteBatch::default();
            let mut touched = Vec::new();
            let mut fresh = Vec::new();
            let result = match &entry.payload {
                EntryPayload::Blank => Ok(MetaOk::Done),
                EntryPayload::Membership(m) => {
                    let sm = StoredMembership::new(Some(entry.log_id), m.clone());
                    batch.put_cf(self.store.cf(CF_RAFT_STATE), KEY_MEMBERSHIP, enc(&sm));
                    Ok(MetaOk::Done)
                }
                EntryPayload::Normal(cmd) => {
                    let base = DbMeta(&self.store);
                    let mut txn = Txn::new(&base);
                    let out = namespace::apply_once(&mut txn, &cmd.op, cmd.once, cmd.now);
                    volume_changed |= out.is_ok() && matches!(cmd.op, MetaOp::CreateVolume(_));
                    // apply_once leaves only the writes to keep: the change's on success, and
                    // the remembered outcome either way.
                    {
                        touched = namespace::touched(&txn.writes);
                        fresh = namespace::fresh_dirs(&txn.writes);
                        for ((table, key), value) in txn.writes {
                            let cf = self.store.cf(table_cf(table));
                            match value {
                                Some(v) => batch.put_cf(cf, key, v),
                                None => batch.delete_cf(cf, key),
                            }
                        }
                    }
                    out
                }
            };
            batch.put_cf(
                self.store.cf(CF_RAFT_STATE),
                KEY_APPLIED,
                enc(&Some(entry.log_id)),
            );
            // Unsynced: the log entry is durable, and applying again after a crash gives the
            // same rows (the applied index is in the same batch).
            self.store.write(batch, false).map_err(io_err)?;
            results.push(Applied {
                result,
                touched,
                fresh,
            });
        }
        if volume_changed {
            self.refresh_volume()?;
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone_handle()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        let path = self
            .dir
            .join(format!("receiving-{:08x}.part", rand::random::<u32>()));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(io_err)?;
        self.receiving = Some(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> StorageResult<()> {
        let received = self.receiving.take().ok_or_else(|| {
            io_err(std::io::Error::other(
                "a snapshot to install was never received",
            ))
        })?;
        snapshot.sync_all().await.map_err(io_err)?;
        drop(snapshot);
        let _current = self.current.clone().lock_owned().await;
        let rec = SnapshotRecord {
            meta: meta.clone(),
            file: format!("{}.snap", meta.snapshot_id),
        };
        let sm = self.clone_handle();
        blocking(move || {
            let started = std::time::Instant::now();
            // Verified whole before anything changes: a damaged transfer leaves the namespace
            // as it was.
            let rows = snapshot::verify(&received).map_err(read_err)?;
            std::fs::rename(&received, sm.dir.join(&rec.file)).map_err(io_err)?;
            tracing::info!(
                rows,
                ms = started.elapsed().as_millis() as u64,
                "received snapshot verified; installing"
            );
            let mut b = WriteBatch::default();
            b.put_cf(sm.store.cf(CF_RAFT_STATE), KEY_INSTALLING, enc(&rec));
            sm.store.write(b, true).map_err(io_err)?;
            sm.install_file(&rec)
        })
        .await?;
        self.refresh_volume()
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        match self.record(KEY_SNAPSHOT)? {
            Some(rec) if self.dir.join(&rec.file).exists() => {
                self.open_snapshot(rec).await.map(Some)
            }
            // A store from before snapshot files, or a file removed by hand: make one from the
            // applied state, which covers every purged entry (purging never passes a snapshot).
            _ if self.applied()?.0.is_some() => self.build_snapshot().await.map(Some),
            _ => Ok(None),
        }
    }
}

// ---------------------------------------------------------------- network

/// Raft RPCs ride the brick's own connection pool, one request per QUIC stream.
#[derive(Clone)]
pub struct Network {
    pub pool: Pool,
}

pub struct Peer {
    pool: Pool,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            pool: self.pool.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

/// An AppendEntries RPC carries at most this many bytes unless its one entry is larger:
/// openraft gives each one a heartbeat interval to complete, and it must fit one frame.
pub const APPEND_BYTES: usize = 4 << 20;
/// A proposed change larger than this is refused, so an RPC of one entry always fits a frame.
pub const MAX_ENTRY: usize = wire::MAX_FRAME / 2;
const _: () = assert!(APPEND_BYTES < MAX_ENTRY && MAX_ENTRY + (1 << 20) <= wire::MAX_FRAME);

/// How many entries to ask openraft for after `entries` encoded to `bytes` (over
/// [`APPEND_BYTES`]): as many as fit at their average size, at least one.
pub fn entries_hint(entries: usize, bytes: usize) -> u64 {
    ((entries as u128 * APPEND_BYTES as u128 / bytes.max(1) as u128) as u64).max(1)
}

impl Peer {
    async fn send<Resp: serde::de::DeserializeOwned, E>(
        &self,
        kind: RaftKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let request = Request::Raft(RaftRpc { kind, payload });
        let reply = self
            .pool
            .call(&self.addr, &request, timeout)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        match reply {
            Ok(Reply::Raft(bytes)) => {
                let r: Result<Resp, RaftError<NodeId, E>> =
                    wire::decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                r.map_err(|e| {
                    RPCError::RemoteError(RemoteError::new_with_node(
                        self.target,
                        BasicNode::new(&self.addr),
                        e,
                    ))
                })
            }
            Ok(other) => Err(RPCError::Network(NetworkError::new(&FsError::Io(format!(
                "unexpected reply to raft rpc: {other:?}"
            ))))),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // Sized before encoding: a lagging follower is offered up to `max_payload_entries`
        // entries of up to a few MB each, far past a frame.
        let bytes = wire::encoded_len(&rpc);
        if bytes > APPEND_BYTES && rpc.entries.len() > 1 {
            let hint = entries_hint(rpc.entries.len(), bytes);
            tracing::info!(
                target = self.target,
                entries = rpc.entries.len(),
                bytes,
                hint,
                "append-entries split: over the byte bound, asking for fewer entries"
            );
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        self.send(RaftKind::AppendEntries, enc(&rpc), option.hard_ttl())
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        if rpc.offset == 0 || rpc.done {
            tracing::info!(
                target = self.target,
                snapshot = %rpc.meta.snapshot_id,
                offset = rpc.offset,
                bytes = rpc.data.len(),
                done = rpc.done,
                "streaming a snapshot chunk"
            );
        }
        self.send(RaftKind::InstallSnapshot, enc(&rpc), option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(RaftKind::Vote, enc(&rpc), option.hard_ttl())
            .await
    }
}

/// Serve a Raft RPC that arrived from a peer brick.
pub async fn serve_rpc(raft: &Raft, rpc: RaftRpc) -> Result<Reply, FsError> {
    let bad = |e: wire::FrameError| FsError::Invalid(format!("raft rpc: {e}"));
    let payload = match rpc.kind {
        RaftKind::AppendEntries => {
            let req: AppendEntriesRequest<TypeConfig> = wire::decode(&rpc.payload).map_err(bad)?;
            enc(&raft.append_entries(req).await)
        }
        RaftKind::Vote => {
            let req: VoteRequest<NodeId> = wire::decode(&rpc.payload).map_err(bad)?;
            enc(&raft.vote(req).await)
        }
        RaftKind::InstallSnapshot => {
            let req: InstallSnapshotRequest<TypeConfig> =
                wire::decode(&rpc.payload).map_err(bad)?;
            enc(&raft.install_snapshot(req).await)
        }
    };
    Ok(Reply::Raft(payload))
}
