//! The metadata group: openraft over the volume's first replica set, with its log and state
//! machine in the brick's RocksDB and its RPCs on the brick's QUIC transport.

// openraft's storage traits fix the error type (`StorageError`, over 200 bytes); our helpers
// return it as the traits do.
#![allow(clippy::result_large_err)]

use crate::log_bound::LogBound;
use crate::namespace::{self, MetaRead, Table, Txn};
use crate::store::{
    Store, CF_META_DENTRIES, CF_META_INODES, CF_META_SYS, CF_RAFT_LOG, CF_RAFT_STATE,
};
use mortar_proto::transport::Pool;
use mortar_proto::wire::{self, Inval, MetaOk, MetaOp, OpId, RaftKind, RaftRpc, Reply, Request};
use mortar_proto::{FsError, Inode, Timestamp, VolumeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
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
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
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
        install_snapshot_timeout: 2000,
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
        // The WAL write survives a crash of this process; an fsync from the application syncs
        // the chunk path explicitly (see ARCHITECTURE.md, durability).
        let res = self.store.write(b, false);
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

fn table_cf(t: Table) -> &'static str {
    match t {
        Table::Inodes => CF_META_INODES,
        Table::Dentries => CF_META_DENTRIES,
        Table::Sys => CF_META_SYS,
    }
}

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

#[derive(Serialize, Deserialize)]
struct SnapshotData {
    rows: Vec<(Table, Vec<u8>, Vec<u8>)>,
}

type HeldSnapshot = (SnapshotMeta<NodeId, BasicNode>, Vec<u8>);

pub struct StateMachine {
    store: Arc<Store>,
    volume: SharedVolume,
    /// The latest snapshot, shared with the builders openraft runs on its own, so the one it
    /// sends to a lagging follower is always the newest.
    current: Arc<std::sync::Mutex<Option<HeldSnapshot>>>,
}

impl StateMachine {
    pub fn new(store: Arc<Store>, volume: SharedVolume) -> Result<StateMachine, FsError> {
        *volume.write().expect("volume lock") = namespace::volume(&DbMeta(&store))?;
        Ok(StateMachine {
            store,
            volume,
            current: Arc::default(),
        })
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
}

/// blake3 over every namespace row and the applied index, read from one RocksDB snapshot.
pub fn meta_digest(store: &Store) -> Result<(u64, [u8; 32]), FsError> {
    let snap = store.db.snapshot();
    let mut h = blake3::Hasher::new();
    for table in namespace::TABLES {
        for item in snap.iterator_cf(store.cf(table_cf(table)), IteratorMode::Start) {
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
        // Read everything from one RocksDB snapshot so the rows and the applied index agree.
        let snap = self.store.db.snapshot();
        let mut rows = Vec::new();
        for table in namespace::TABLES {
            for item in snap.iterator_cf(self.store.cf(table_cf(table)), IteratorMode::Start) {
                let (k, v) = item.map_err(read_err)?;
                rows.push((table, k.to_vec(), v.to_vec()));
            }
        }
        let applied: Option<LogId<NodeId>> = match snap
            .get_cf(self.store.cf(CF_RAFT_STATE), KEY_APPLIED)
            .map_err(read_err)?
        {
            Some(b) => dec(&b)?,
            None => None,
        };
        let membership: StoredMembership<NodeId, BasicNode> = match snap
            .get_cf(self.store.cf(CF_RAFT_STATE), KEY_MEMBERSHIP)
            .map_err(read_err)?
        {
            Some(b) => dec(&b)?,
            None => StoredMembership::default(),
        };
        drop(snap);
        let data = enc(&SnapshotData { rows });
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}",
                applied.map(|l| l.index).unwrap_or(0),
                rand::random::<u32>()
            ),
        };
        *self.current.lock().expect("snapshot lock") = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
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
        StateMachine {
            store: self.store.clone(),
            volume: self.volume.clone(),
            current: self.current.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let data: SnapshotData = dec(&bytes)?;
        let mut batch = WriteBatch::default();
        for table in namespace::TABLES {
            let cf = self.store.cf(table_cf(table));
            // Delete every existing row; the snapshot replaces the namespace whole.
            for item in self.store.db.iterator_cf(cf, IteratorMode::Start) {
                let (k, _) = item.map_err(read_err)?;
                batch.delete_cf(cf, k);
            }
        }
        for (table, k, v) in data.rows {
            batch.put_cf(self.store.cf(table_cf(table)), k, v);
        }
        let state = self.store.cf(CF_RAFT_STATE);
        batch.put_cf(state, KEY_APPLIED, enc(&meta.last_log_id));
        batch.put_cf(state, KEY_MEMBERSHIP, enc(&meta.last_membership));
        self.store.write(batch, true).map_err(io_err)?;
        tracing::info!(last_log_id = ?meta.last_log_id, "installed snapshot");
        *self.current.lock().expect("snapshot lock") = Some((meta.clone(), bytes));
        self.refresh_volume()
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let held = self.current.lock().expect("snapshot lock").clone();
        match held {
            Some((meta, data)) => Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data)),
            })),
            // Snapshots are kept in memory only; after a restart, make one from the applied
            // state, which covers every purged entry (purging never passes a snapshot).
            None if self.applied()?.0.is_some() => self.build_snapshot().await.map(Some),
            None => Ok(None),
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

impl Peer {
    async fn send<Req: Serialize, Resp: serde::de::DeserializeOwned, E>(
        &self,
        kind: RaftKind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let request = Request::Raft(RaftRpc {
            kind,
            payload: enc(req),
        });
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
        self.send(RaftKind::AppendEntries, &rpc, option.hard_ttl())
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
        self.send(RaftKind::InstallSnapshot, &rpc, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(RaftKind::Vote, &rpc, option.hard_ttl()).await
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
