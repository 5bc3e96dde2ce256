//! The metadata group: openraft over the volume's first replica set, with its log and state
//! machine in the brick's RocksDB and its RPCs on the brick's QUIC transport: the log in
//! `log`, the state machine and its snapshots in `state_machine`, the RPCs in `network`.

// openraft's storage traits fix the error type (`StorageError`, over 200 bytes); our helpers
// return it as the traits do.
#![allow(clippy::result_large_err)]

use crate::log_bound::LogBound;
use crate::namespace::{self, MetaRead, Table, Txn};
use crate::snapshot::{self, table_cf};
use crate::store::{Store, CF_RAFT_LOG, CF_RAFT_STATE};
use mortar_proto::timing;
use mortar_proto::transport::{Pool, TransportError};
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
    /// The change was applied before (a retry): `result` is its remembered outcome and
    /// `touched` is empty.
    pub replayed: bool,
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

/// When a brick stands for election ([`Campaign`] decides; openraft's own timer is off).
pub const ELECTION: election::Timing = election::Timing {
    lease: timing::LEADER_LEASE,
    slack: timing::ELECTION_SLACK,
    spread: timing::ELECTION_SPREAD,
};

/// The metadata group's openraft settings. openraft takes its leader lease (a voter refuses a
/// real vote this soon after hearing a leader) from `election_timeout_max`; its own election
/// timer is off (`enable_elect`), because it would stand without asking first.
pub fn config(snapshot_every: u64) -> openraft::Config {
    openraft::Config {
        cluster_name: "mortar".into(),
        heartbeat_interval: timing::HEARTBEAT.as_millis() as u64,
        election_timeout_min: timing::HEARTBEAT.as_millis() as u64 * 2,
        election_timeout_max: timing::LEADER_LEASE.as_millis() as u64,
        enable_elect: false,
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

mod campaign;
pub mod election;
mod log;
mod network;
mod state_machine;

pub use campaign::{log_changes, run as run_elections, Campaign, PreVote, PreVoteAnswer};
pub use log::LogStore;
pub use network::{entries_hint, serve_rpc, Network, Peer, APPEND_BYTES, MAX_ENTRY};
pub use state_machine::{meta_digest, DbMeta, SharedVolume, StateMachine};
