//! Wire messages and their framing. One request per bidirectional QUIC stream: the caller writes
//! one frame and finishes its side, the brick answers with one frame. A frame is a big-endian u32
//! length followed by that many bytes of bincode; both the length and the decode are bounded.

use crate::error::FsError;
use crate::types::*;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Largest frame either side accepts: a full chunk plus headroom, or a batch of Raft entries.
pub const MAX_FRAME: usize = 32 * 1024 * 1024;

pub const ALPN: &[u8] = b"mortar/1";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    Hello,
    PutChunk(PutChunk),
    GetChunk {
        id: ChunkId,
    },
    /// A namespace change; committed through the metadata group's leader. With `once`, a retry
    /// of the same change (after a lost answer or a leader change) is applied at most once and
    /// answered with the first outcome.
    Meta {
        op: MetaOp,
        once: Option<OpId>,
    },
    /// A namespace read; answered by the leader so it reflects every acknowledged change.
    Query(Query),
    /// Brick to brick only: openraft RPCs, encoded by the brick.
    Raft(RaftRpc),
    /// Open a watch on the metadata leader: the stream stays open, carrying [`WatchUp`] frames
    /// up and [`WatchDown`] frames down. See [`crate::wire::WatchDown`] for the lease rules.
    Watch {
        client: u128,
    },
    Admin(AdminRequest),
    /// Ask the metadata leader for a delegation of the empty directory `dir`: until the leader
    /// recalls it (over the client's watch, before anyone else's request that names the
    /// directory is answered) or the client's lease runs out, the client alone changes what
    /// is beneath it, answers those changes from memory and commits them in batches as
    /// [`MetaOp::Local`]. Refused with EBUSY when the client has no watch here, or the
    /// directory is not an empty directory of no other delegation.
    Delegate {
        client: u128,
        dir: InodeId,
    },
    /// `len` bytes at `offset` of a chunk, with what proves them (see [`crate::range`]):
    /// answered with [`Reply::Range`].
    GetRange {
        id: ChunkId,
        offset: u64,
        len: u64,
    },
    /// As [`Request::Delegate`], for a directory that need not be empty (at most
    /// [`LISTED_MAX`] entries): answered with [`MetaOk::Delegated`], the directory and its
    /// entries. The delegation covers the directory's names: until it is recalled, the client
    /// alone makes, removes and renames names in it; the inodes they name may still be changed
    /// by others through requests that name them alone.
    DelegateListed {
        client: u128,
        dir: InodeId,
    },
}

/// Entries a directory may have to be delegated with its listing.
pub const LISTED_MAX: usize = 4096;

impl Request {
    /// The operation's name in metrics and logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello => "hello",
            Request::PutChunk(_) => "put_chunk",
            Request::GetChunk { .. } => "get_chunk",
            Request::Meta { .. } => "meta",
            Request::Query(_) => "query",
            Request::Raft(r) => match r.kind {
                RaftKind::AppendEntries => "raft_append_entries",
                RaftKind::Vote => "raft_vote",
                RaftKind::InstallSnapshot => "raft_install_snapshot",
                RaftKind::PreVote => "raft_pre_vote",
            },
            Request::Watch { .. } => "watch",
            Request::Admin(_) => "admin",
            Request::Delegate { .. } => "delegate",
            Request::GetRange { .. } => "get_range",
            Request::DelegateListed { .. } => "delegate",
        }
    }
}

/// Outcomes of changes the bricks remember per client, by sequence number: a change's outcome
/// is forgotten once the same client's change `ONCE_WINDOW` numbers later is applied. Clients
/// never have a change open (sent and unanswered, or kept to resend) that far back, so every
/// retry finds its first outcome; a client that goes away leaves at most this many rows.
pub const ONCE_WINDOW: u64 = 4096;

/// Names one namespace change of one client: a random client id and a per-client sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OpId {
    pub client: u128,
    pub seq: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PutChunk {
    pub id: ChunkId,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// True when a client sends it: the receiving brick stores it and forwards it to the rest
    /// of the replica set. False on the forwarded copies (brick certificates only).
    pub replicate: bool,
    /// Sync the brick's write-ahead log before answering (fsync from the application).
    pub sync: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum XattrMode {
    Any,
    /// XATTR_CREATE: fail with EEXIST if present.
    Create,
    /// XATTR_REPLACE: fail with ENODATA if absent.
    Replace,
}

pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;

/// A namespace change. The leader stamps the time when it proposes the entry, so every replica
/// applies the same bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOp {
    /// Create a regular file, FIFO, socket or device node.
    Mknod {
        parent: InodeId,
        name: Vec<u8>,
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        /// O_EXCL: fail with EEXIST if the name exists; otherwise an existing file is returned.
        exclusive: bool,
    },
    Mkdir {
        parent: InodeId,
        name: Vec<u8>,
        perm: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        parent: InodeId,
        name: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    Link {
        ino: InodeId,
        new_parent: InodeId,
        new_name: Vec<u8>,
    },
    Unlink {
        parent: InodeId,
        name: Vec<u8>,
    },
    Rmdir {
        parent: InodeId,
        name: Vec<u8>,
    },
    Rename {
        parent: InodeId,
        name: Vec<u8>,
        new_parent: InodeId,
        new_name: Vec<u8>,
        flags: u32,
    },
    SetAttr {
        ino: InodeId,
        set: SetAttr,
    },
    SetXattr {
        ino: InodeId,
        name: Vec<u8>,
        value: Vec<u8>,
        mode: XattrMode,
    },
    RemoveXattr {
        ino: InodeId,
        name: Vec<u8>,
    },
    /// Replace a regular file's content and size, if nobody changed it since `expect_version`.
    /// Chunks named here must already be durable on a quorum.
    SetContent {
        ino: InodeId,
        expect_version: u64,
        size: u64,
        content: Content,
    },
    /// Internal: written once by volume creation; refused from the network.
    CreateVolume(VolumeConfig),
    /// Take, renew (same holder) or, with `ttl_secs` 0, give back the volume's heal lease, so
    /// two heal runs of one volume never overlap wherever they are started. Fails with EBUSY
    /// while another holder's lease is current.
    HealLease {
        holder: String,
        ttl_secs: u32,
    },
    /// Garbage collection removed these chunks from every brick: drop their release records.
    ForgetReleased(Vec<ChunkId>),
    /// File operations applied in order as one: all succeed or none does. A file's new content
    /// and the chmod/chown/utimens/setxattr made while it was buffered commit together, in
    /// one Raft entry. Only SetContent, SetAttr, SetXattr and [`MetaOp::Local`] may appear in
    /// a batch.
    Batch(Vec<MetaOp>),
    /// Set aside `count` inode numbers for the caller, who names its creates under a
    /// delegation with them ([`MetaOp::Local`]). Answered with [`MetaOk::Inodes`].
    ReserveInodes {
        count: u32,
    },
    /// A change a client made under a directory delegation and already showed to its
    /// applications, applied as it was made: at the client's time `at` and, for a create
    /// (Mknod, Mkdir, Symlink), with the inode number `ino` the client took from a range it
    /// reserved. Only those creates and SetAttr, SetXattr, RemoveXattr and SetContent.
    Local {
        at: Timestamp,
        ino: Option<InodeId>,
        op: Box<MetaOp>,
    },
    /// Several changes of one inode made in a row under a delegation, as their result: the
    /// inode as the client shows it after them (mode, owner, times, xattrs and, for a regular
    /// file, size and content). Applied only inside [`MetaOp::Local`], only if the inode is
    /// still at `expect_version`; its number, kind and links stay the namespace's. `cp -a`
    /// changes a new file three or four times after making it (times, ACL, content, owner):
    /// one change instead.
    SetInode {
        expect_version: u64,
        inode: Inode,
    },
    /// SetContent of a chunked file, as the change to its chunk map: a flush of a large file
    /// names the chunks it wrote, not all the file has.
    PatchContent {
        ino: InodeId,
        expect_version: u64,
        size: u64,
        patch: crate::ChunkPatch,
    },
    /// Internal, proposed by the leader only (refused from the network): directory `dir`, in
    /// `parent`, is delegated to `client`. Recorded so that a new leader knows every
    /// delegation and keeps other clients out of it until the holder has given it back.
    Delegated {
        dir: InodeId,
        parent: InodeId,
        client: u128,
    },
    /// Internal, like [`MetaOp::Delegated`]: the delegation of `dir` ended.
    Undelegated {
        dir: InodeId,
    },
    /// Internal, proposed by the leader once the metadata group's voters changed (refused from
    /// the network): `new` takes `old`'s place in its replica set and `old` is retired.
    ReplaceBrick {
        old: BrickId,
        new: BrickRef,
    },
    /// Internal, proposed by the leader once the new bricks follow the log (refused from the
    /// network): append these replica sets; placement hashes over all sets from now on, the
    /// previous sets are kept as `previous` for reads until a rebalance settles the layout.
    AddSets(Vec<Vec<BrickRef>>),
    /// A rebalance moved every chunk to its placement under layout `epoch`: forget the previous
    /// placement (the epoch goes up). Refused unless the layout is at `epoch` and changing.
    SettleLayout {
        epoch: u64,
    },
    /// A rebalance's progress, kept so `rebalance status` can show it from anywhere and
    /// `rebalance start` after a crash goes on from the cursor.
    Rebalance(RebalanceState),
    /// Internal, proposed by the leader for `remove-brick start` (refused from the network):
    /// replica set `set` leaves the placement; the sets before are kept as `previous` for
    /// reads until the drain (a rebalance) settles the layout.
    DrainSet {
        set: u32,
    },
    /// Internal, proposed by the leader for `remove-brick commit` (refused from the network):
    /// the drained set `set` leaves the volume and its bricks are retired.
    RemoveSet {
        set: u32,
    },
    /// Admin: record the namespace as it is now as snapshot `name` (no rows are copied: later
    /// changes keep what they overwrite, see the brick's `namespace::snapshots`). With `keep`,
    /// then delete the oldest snapshots of the same series (the name up to its last '-')
    /// beyond the newest `keep`. Answered with [`MetaOk::Snapshot`].
    CreateSnapshot {
        name: String,
        keep: Option<u32>,
    },
    /// Admin: forget snapshot `name`; what only it kept is released.
    DeleteSnapshot {
        name: String,
    },
    /// Admin: make the live namespace equal to snapshot `name`'s, in one change, after first
    /// recording the current namespace as snapshot `undo` (so the restore can be undone).
    RestoreSnapshot {
        name: String,
        undo: String,
    },
    /// Admin: make the tree at `path` (absolute, not `/`) equal to snapshot `name`'s tree at
    /// that path, leaving everything outside it as it is, after recording the current namespace
    /// as snapshot `undo`.
    RestorePath {
        name: String,
        undo: String,
        path: String,
    },
    /// `volume set KEY VALUE` (Some) or `volume reset KEY` (None); checked by
    /// [`crate::options::check`] when applied.
    SetOption {
        key: String,
        value: Option<String>,
    },
    /// `volume stop` (true) or `volume start` (false). Stopping recalls every delegation
    /// first, so what mounts hold is committed before they are refused.
    SetStopped {
        stopped: bool,
    },
    /// `mortar cert revoke`: every brick refuses this certificate from now on, and closes its
    /// live connections.
    Revoke(crate::Revoked),
    /// Admin: make volume `name`, a writable copy of snapshot `snapshot`'s tree sharing its
    /// chunks (`mortar snapshot clone`), answered with [`MetaOk::Clone`].
    CloneSnapshot {
        snapshot: String,
        name: String,
    },
    /// [`MetaOp::ReserveInodes`] for a mount of a clone: numbers of `volume`.
    ReserveInodesIn {
        volume: crate::VolumeNo,
        count: u32,
    },
    /// Admin: erase clone `name` — its tree and its snapshots (`volume delete` of a clone).
    DropClone {
        name: String,
    },
}

/// A clone's record: volume number `volume` (its inodes carry it), copied from snapshot
/// `snapshot` by the change at log index `index`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneInfo {
    pub name: String,
    pub volume: crate::VolumeNo,
    pub snapshot: String,
    pub index: u64,
    pub created: Timestamp,
    pub files: u64,
}

/// A snapshot of clone `volume` is named `volume@name` in the namespace (a snapshot of the
/// volume the bricks were made with, by its name alone): the clone named, if any, and the
/// name as operators gave it.
pub fn split_snapshot_name(full: &str) -> (Option<&str>, &str) {
    match full.split_once('@') {
        Some((volume, name)) => (Some(volume), name),
        None => (None, full),
    }
}

/// Where a reference scan goes on: live inodes first, then the inodes snapshots keep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefCursor {
    Inode(InodeId),
    Kept(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A snapshot's record: made at log index `index` (the change that created it), the
/// `gen`-th snapshot of the volume, holding `files` inodes then.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub gen: u64,
    pub index: u64,
    pub created: Timestamp,
    pub files: u64,
}

/// What a snapshot holds: its inodes, the bytes of its regular files, and the bytes of the
/// chunks it names that the live namespace does not (what deleting it could free, unless
/// another snapshot names them too).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotUsage {
    pub info: SnapshotInfo,
    pub files: u64,
    pub bytes: u64,
    pub only_bytes: u64,
}

/// Characters a snapshot name may hold; at most [`SNAPSHOT_NAME_MAX`] of them, not starting
/// with '-' or '.'. '@' is left out because `VOLUME@SNAPSHOT` names a snapshot to mount.
pub fn validate_snapshot_name(name: &str) -> Result<(), FsError> {
    let ok = !name.is_empty()
        && name.len() <= SNAPSHOT_NAME_MAX
        && !name.starts_with(['-', '.'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FsError::Invalid(format!(
            "snapshot name {name:?}: use 1 to {SNAPSHOT_NAME_MAX} letters, digits, '.', '_', \
             '-' or ':', not starting with '-' or '.'"
        )))
    }
}

pub const SNAPSHOT_NAME_MAX: usize = 64;

/// Who may send a [`MetaOp`] in a request, and through whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// Namespace changes: any certificate; a follower forwards a client's to the leader.
    Anyone,
    /// Changes to the volume itself (its configuration, snapshots, heal and rebalance
    /// records): admin certificates only, sent to the leader directly. A follower answers
    /// [`crate::FsError::NotLeader`] instead of forwarding, so no brick certificate ever
    /// carries one and a stolen brick certificate cannot change the volume by request.
    Admin,
    /// Entries the metadata leader writes itself while it carries out an admin request
    /// (membership, delegations): refused in any request.
    Leader,
}

impl MetaOp {
    /// Who may send this change (checked by every brick on every request).
    pub fn sender(&self) -> Sender {
        match self {
            MetaOp::CreateVolume(_)
            | MetaOp::HealLease { .. }
            | MetaOp::ForgetReleased(_)
            | MetaOp::CreateSnapshot { .. }
            | MetaOp::DeleteSnapshot { .. }
            | MetaOp::RestoreSnapshot { .. }
            | MetaOp::RestorePath { .. }
            | MetaOp::SetOption { .. }
            | MetaOp::SetStopped { .. }
            | MetaOp::Revoke(_)
            | MetaOp::SettleLayout { .. }
            | MetaOp::CloneSnapshot { .. }
            | MetaOp::DropClone { .. }
            | MetaOp::Rebalance(_) => Sender::Admin,
            MetaOp::Delegated { .. }
            | MetaOp::Undelegated { .. }
            | MetaOp::ReplaceBrick { .. }
            | MetaOp::AddSets(_)
            | MetaOp::DrainSet { .. }
            | MetaOp::RemoveSet { .. } => Sender::Leader,
            MetaOp::Mknod { .. }
            | MetaOp::Mkdir { .. }
            | MetaOp::Symlink { .. }
            | MetaOp::Link { .. }
            | MetaOp::Unlink { .. }
            | MetaOp::Rmdir { .. }
            | MetaOp::Rename { .. }
            | MetaOp::SetAttr { .. }
            | MetaOp::SetXattr { .. }
            | MetaOp::RemoveXattr { .. }
            | MetaOp::SetContent { .. }
            | MetaOp::Batch(_)
            | MetaOp::ReserveInodes { .. }
            | MetaOp::ReserveInodesIn { .. }
            | MetaOp::Local { .. }
            | MetaOp::SetInode { .. }
            | MetaOp::PatchContent { .. } => Sender::Anyone,
        }
    }

    /// Whether applying it changes the volume configuration (bricks, sets, layout): a brick
    /// then reloads the configuration it places chunks and checks peers by.
    pub fn changes_volume_config(&self) -> bool {
        matches!(
            self,
            MetaOp::CreateVolume(_)
                | MetaOp::ReplaceBrick { .. }
                | MetaOp::AddSets(_)
                | MetaOp::DrainSet { .. }
                | MetaOp::RemoveSet { .. }
                | MetaOp::SettleLayout { .. }
                | MetaOp::SetOption { .. }
                | MetaOp::SetStopped { .. }
                | MetaOp::Revoke(_)
        )
    }
}

/// Where a rebalance is and what it moved. One per volume, for the layout at `epoch`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceState {
    pub epoch: u64,
    /// Names one `rebalance start`: once a run's state is recorded "stopped", the namespace
    /// refuses that run's progress (so a stop is never overwritten by the run it stops).
    pub run: u64,
    /// Index (in `replica_sets`) of the set being scanned, and the last chunk id done in it.
    pub set: usize,
    pub cursor: Option<ChunkId>,
    /// Chunks scanned and those moved (copied to their new set and verified there), with bytes.
    pub scanned: u64,
    pub moved: u64,
    pub moved_bytes: u64,
    /// Chunks each old set held when the rebalance began (for the ETA).
    pub total: u64,
    pub started: Timestamp,
    pub updated: Timestamp,
    /// "running", "stopped", "moved" (copies made, sources not yet dropped) or "completed".
    pub status: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    Lookup {
        parent: InodeId,
        name: Vec<u8>,
    },
    GetAttr {
        ino: InodeId,
    },
    GetInode {
        ino: InodeId,
    },
    /// Entries sorted by name, starting after `after`; stable under concurrent changes.
    ReadDir {
        ino: InodeId,
        after: Option<Vec<u8>>,
        limit: u32,
    },
    StatFs,
    Volume,
    /// The volume's rebalance state, answered with [`MetaOk::Rebalance`].
    Rebalance,
    /// A lookup answered with the whole inode (`MetaOk::Inode`) when it is small (see
    /// [`LOOKUP_WHOLE_MAX`]), else with its attributes: a reader's open and read of a small
    /// file then need no second round trip.
    LookupWhole {
        parent: InodeId,
        name: Vec<u8>,
    },
    /// The first `limit` entries of a directory with their attributes, and small regular
    /// files whole (as [`Query::LookupWhole`], up to [`LIST_WHOLE_BYTES`] in all), answered
    /// as `MetaOk::Listed`: a reader's first look into a directory brings it all at once.
    ListWhole {
        dir: InodeId,
        limit: u32,
    },
    /// Every snapshot of the volume, oldest first, answered with [`MetaOk::Snapshots`].
    Snapshots,
    /// `query` answered from snapshot `name` instead of the live namespace (read-only mounts
    /// of a snapshot). Fails with ESTALE once the snapshot is deleted.
    InSnapshot {
        name: String,
        query: Box<Query>,
    },
    /// Every clone of the volume, answered with [`MetaOk::Clones`].
    Clones,
}

impl Query {
    /// Whether it reads files and directories (and so may be answered from a snapshot).
    pub fn reads_files(&self) -> bool {
        matches!(
            self,
            Query::Lookup { .. }
                | Query::GetAttr { .. }
                | Query::GetInode { .. }
                | Query::ReadDir { .. }
                | Query::LookupWhole { .. }
                | Query::ListWhole { .. }
        )
    }
}

/// Whole-inode bytes one [`Query::ListWhole`] answer carries at most: enough for a docroot's
/// largest directories of small files (WordPress's `wp-includes` holds 2.8 MB of them), so a
/// reader of one pays one round trip for it; a few milliseconds on the wire.
pub const LIST_WHOLE_BYTES: usize = 4 * 1024 * 1024;
const _: () = assert!(LIST_WHOLE_BYTES < MAX_FRAME / 2);

/// One entry of a [`Query::ListWhole`] answer: its attributes, and the inode whole when small.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub attr: Attr,
    pub whole: Option<Inode>,
}

/// Inline content (or a chunk map) plus xattr bytes up to which [`Query::LookupWhole`] and
/// [`Query::ListWhole`] answer the whole inode.
pub const LOOKUP_WHOLE_MAX: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaOk {
    Attr(Attr),
    Inode(Inode),
    Entries(Vec<DirEntry>),
    StatFs(StatFs),
    Volume(VolumeConfig),
    Done,
    /// One result per operation of a [`MetaOp::Batch`].
    Batch(Vec<MetaOk>),
    /// Inode numbers `first..first + count`, reserved for the caller.
    Inodes {
        first: InodeId,
        count: u32,
    },
    /// A [`Query::ListWhole`] answer; `complete`: these are all the directory's entries.
    Listed {
        entries: Vec<Listed>,
        complete: bool,
    },
    Rebalance(Option<RebalanceState>),
    Snapshot(SnapshotInfo),
    Snapshots(Vec<SnapshotInfo>),
    /// A [`Request::DelegateListed`] grant: the directory and every entry in it.
    Delegated {
        dir: Inode,
        entries: Vec<DirEntry>,
    },
    Clone(CloneInfo),
    Clones(Vec<CloneInfo>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftKind {
    AppendEntries,
    Vote,
    InstallSnapshot,
    /// Would the receiver vote for the sender? Asked before an election, which raises the term.
    PreVote,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RaftRpc {
    /// The brick the sender means: a brick that took over a retired brick's address must not
    /// answer (or vote) in its place.
    pub target: BrickId,
    pub kind: RaftKind,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Sent to one fresh brick: start the metadata group over the named bricks and store the
    /// volume configuration in it.
    InitVolume(VolumeConfig),
    Status,
    ListChunks {
        after: Option<ChunkId>,
        limit: u32,
    },
    ListHealIndex {
        after: Option<(BrickId, ChunkId)>,
        limit: u32,
    },
    /// Brick to brick: chunks a peer missed during a replicated write.
    RecordMisses(Vec<HealEntry>),
    /// A digest of this brick's namespace replica and the log index it reflects; replicas at
    /// the same index must agree.
    MetaDigest,
    /// This brick's chunk-set digest: [`crate::digest::BUCKETS`] buckets.
    ChunkDigest,
    /// Chunk ids in one digest bucket, after `after`, up to `limit`.
    ListBucket {
        bucket: u16,
        after: Option<ChunkId>,
        limit: u32,
    },
    /// Which of these chunks this brick holds.
    HasChunks(Vec<ChunkId>),
    /// Copy these chunks here from the first of `sources` that has a copy matching its id.
    FetchChunks {
        ids: Vec<ChunkId>,
        sources: Vec<String>,
    },
    /// Drop heal index entries the caller has seen healed.
    ClearHealIndex(Vec<(BrickId, ChunkId)>),
    /// Read and verify up to `limit` chunks after `after`, at most `max_bytes_per_sec`; corrupt
    /// copies are removed and noted in the heal index so heal replaces them.
    Scrub {
        after: Option<ChunkId>,
        limit: u32,
        max_bytes_per_sec: u64,
    },
    /// Chunks referenced by the inodes after `after` in the namespace, read on the metadata
    /// leader after it confirmed its leadership with a quorum (a brick that is not the
    /// leader, or cannot confirm it, refuses): garbage collection must not judge from a
    /// stale replica.
    ScanReferences {
        after: Option<RefCursor>,
        limit: u32,
    },
    /// What snapshot `name` (every snapshot, without a name) holds, read on the metadata
    /// leader: it reads every inode of the live namespace and of each snapshot, so it is an
    /// admin scan with its long timeout rather than a namespace query.
    SnapshotUsage {
        name: Option<String>,
    },
    /// Chunks whose references went away (overwrite, truncate, unlink), with how many seconds
    /// ago: a reader may still use them, e.g. through a file open after unlink, so garbage
    /// collection leaves them for a grace period. The age is counted by the earlier of this
    /// brick's clock and `now` (the asker's, Unix seconds), so no single clock fast by more
    /// than the grace period makes a chunk look old.
    ListReleased {
        after: Option<ChunkId>,
        limit: u32,
        now: u64,
    },
    /// Delete these chunks unless stored or written again within the last `grace_secs`, by
    /// the earlier of this brick's clock and `now` (the asker's, Unix seconds).
    CollectGarbage {
        ids: Vec<ChunkId>,
        grace_secs: u64,
        now: u64,
    },
    /// Give the disk space of collected chunks back to the filesystem (compaction), when
    /// enough was collected to be worth it.
    ReclaimSpace,
    /// Whether this brick's disk is down to its reserve (the leader asks its peers, so no
    /// replica is fed data through the log that it has no room for).
    SpaceState,
    /// Put the empty brick at `new` (HOST:PORT) in the place of the volume's brick at `old`:
    /// for a metadata brick, add it as a learner, let it catch up, then change the voters;
    /// then record it in the volume configuration. Carried out by the metadata leader (any
    /// brick forwards it there); every step is checked before it is taken, so running it
    /// again after a crash at any point finishes the change. Answered with
    /// [`Reply::Replaced`].
    ReplaceBrick {
        old: String,
        new: String,
    },
    /// Add the empty bricks at these addresses as new replica sets (a multiple of three): each
    /// follows the metadata log as a learner first, then the sets are appended as one change.
    /// Carried out by the leader, like ReplaceBrick; answered with the new configuration.
    AddBrick {
        bricks: Vec<String>,
    },
    /// After a rebalance settled layout `epoch` or later: remove these chunks if this brick's
    /// replica set is not where the placement puts them (copies left behind by the move).
    /// Answered with the ids removed.
    DropStrays {
        ids: Vec<ChunkId>,
        epoch: u64,
    },
    /// `remove-brick`: with `commit` false, start draining the replica set made of exactly
    /// these bricks (a rebalance then moves its chunks); with `commit` true, take the drained
    /// set out of the volume and retire its bricks. Carried out by the leader; answered with
    /// the new configuration. The caller checks the chunks are elsewhere before a commit.
    RemoveBrick {
        bricks: Vec<String>,
        commit: bool,
    },
    /// `volume delete`: this brick of the stopped volume `name` leaves it. It answers, stops,
    /// and erases its data directory when it next starts, empty and free for a new volume.
    ReleaseVolume {
        name: String,
    },
}

/// What one [`AdminRequest::ReplaceBrick`] run did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replaced {
    /// None when the replacement was already complete (the old brick's id is then retired).
    pub old: Option<BrickRef>,
    pub new: BrickRef,
    /// The steps this run took, in order (empty: the replacement was already complete).
    pub steps: Vec<String>,
}

/// Why a brick is in the heal index for a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealReason {
    /// The brick did not acknowledge a replicated write.
    MissedWrite,
    /// The brick's copy failed verification and was removed.
    Corrupt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealEntry {
    /// The brick that lacks a good copy.
    pub brick: BrickId,
    pub chunk: ChunkId,
    pub reason: HealReason,
    /// Chunk length when known (0 otherwise).
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrickHello {
    pub id: BrickId,
    pub volume: Option<String>,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrickStatus {
    pub id: BrickId,
    pub volume: Option<String>,
    /// "leader", "follower", "candidate", "learner" or "none".
    pub raft_role: String,
    pub leader: Option<BrickId>,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub chunk_count: u64,
    pub chunk_bytes: u64,
    pub heal_backlog: u64,
    /// How this brick's connection pool sees each other brick of the volume: a brick that cannot
    /// reach a peer silently runs without that replica, so the operator must see it.
    pub peers: Vec<PeerHealth>,
    /// The Raft term this brick is in (an election raises it).
    pub term: u64,
    /// On the metadata leader: how far each follower is behind it. Empty elsewhere.
    pub replicas: Vec<ReplicaLag>,
    /// Bytes of Raft log entries this brick stored since it started.
    pub log_bytes: u64,
    /// What the brick's data directory takes on disk (chunk_bytes is what is live in it).
    pub disk_bytes: u64,
    /// The layout epoch of the volume configuration this brick has applied.
    pub layout_epoch: u64,
    /// The longest this brick went without hearing from its leader since it started, in ms
    /// (heartbeats come every 100 ms; a leader is replaced after about 600–800 ms).
    pub longest_leader_gap_ms: u64,
}

/// A follower of the metadata group as its leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaLag {
    pub id: BrickId,
    /// The last log index the leader knows the follower holds (None: not known yet).
    pub matched_index: Option<u64>,
    /// Entries of the leader's log the follower lacks.
    pub behind_entries: u64,
    /// How long it has lacked the oldest of them (0: caught up).
    pub behind_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHealth {
    pub id: BrickId,
    pub addr: String,
    pub health: crate::transport::Health,
}

impl Reply {
    /// A namespace answer that must not be cached and touched nothing.
    pub fn meta(result: Result<MetaOk, FsError>, leader: Option<BrickRef>) -> Reply {
        Reply::Meta {
            result,
            leader,
            stamp: None,
            touched: Vec::new(),
            fresh: Vec::new(),
        }
    }
}

/// Where in the metadata log an answer stands: the leader and its term that answered, and the
/// log index the answer reflects (the change's own index, or the applied index of a read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub leader: BrickId,
    pub term: u64,
    pub index: u64,
}

/// Something a namespace change modified, to be dropped from clients' caches.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Inval {
    /// The inode's attributes, content or xattrs.
    Inode(InodeId),
    /// The directory entry `name` in `parent` (added, removed or repointed).
    Entry(InodeId, #[serde(with = "serde_bytes")] Vec<u8>),
    /// Every entry of the directory: it was delegated to another client, which makes names in
    /// it from memory, so "no such name" cached before the grant must go (a lookup then asks
    /// the leader, which recalls the delegation first).
    Names(InodeId),
    /// The volume configuration (an option, the layout): read it again.
    Volume,
}

/// Client to leader, on a watch stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum WatchUp {
    /// Ask for the lease to be extended; the client counts the lease from when it sent this.
    Renew { n: u64 },
    /// The invalidation `seq` has been applied: the client no longer serves what it named.
    Ack { seq: u64 },
    /// The client is going away and has committed everything: its delegations end now
    /// (without this, a watch that ends keeps them for the holder to come back).
    Bye,
}

/// Leader to client, on a watch stream.
///
/// The lease rules: after `Renewed { n }`, the client may answer from its cache until
/// [`WATCH_LEASE`] after it sent `Renew { n }`. The leader confirms its leadership with a
/// quorum before each `Renewed`, sends `Invalidate` for every change it commits to every
/// other watcher and waits for the `Ack` (or for that watcher's lease to run out) before it
/// answers the change, and a new leader answers no change until leases granted by its
/// predecessors have run out. So a change is acknowledged only once no cache serves the old
/// state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchDown {
    /// The watch is registered; answers stamped with this leader and term may be cached.
    Welcome {
        leader: BrickId,
        term: u64,
    },
    Renewed {
        n: u64,
    },
    Invalidate {
        seq: u64,
        index: u64,
        items: Vec<Inval>,
    },
    /// No watch here (not the leader, or no quorum).
    Refused(FsError),
    /// Give back the delegation of `dir`: commit every change made under it, stop answering
    /// for it from memory, then `Ack { seq }`.
    Recall {
        seq: u64,
        dir: InodeId,
    },
}

pub use crate::timing::WATCH_LEASE;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Reply {
    Hello(BrickHello),
    ChunkStored {
        copies: u8,
    },
    Chunk(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A namespace answer, with the leader that produced it so the client can go there directly.
    /// `stamp` says which state the answer reflects (None: not from the leader, do not cache);
    /// `touched` lists what a change modified, so the client drops its own cached copies;
    /// `fresh` gives the directories among them as they are after the change.
    Meta {
        result: Result<MetaOk, FsError>,
        leader: Option<BrickRef>,
        stamp: Option<Stamp>,
        touched: Vec<Inval>,
        fresh: Vec<Inode>,
    },
    Raft(#[serde(with = "serde_bytes")] Vec<u8>),
    Status(BrickStatus),
    Chunks(Vec<ChunkId>),
    HealIndex(Vec<HealEntry>),
    ChunkDigest(Vec<crate::digest::Bucket>),
    Present(Vec<bool>),
    /// Per requested chunk: the bytes copied (0 if it was already here), or why not.
    Fetched(Vec<Result<u64, String>>),
    Scrubbed {
        scanned: u64,
        bytes: u64,
        corrupt: Vec<ChunkId>,
        /// Where the next page starts; `None` when the scrub reached the end.
        next: Option<ChunkId>,
    },
    References {
        chunks: Vec<ChunkId>,
        next: Option<RefCursor>,
    },
    SnapshotUsage(Vec<SnapshotUsage>),
    /// (chunk, seconds since its release).
    Released(Vec<(ChunkId, u64)>),
    Collected(Vec<ChunkId>),
    MetaDigest {
        applied_index: u64,
        digest: [u8; 32],
    },
    Done,
    /// The brick's data directory on disk before and after a ReclaimSpace (equal when it
    /// found too little garbage to compact).
    Reclaimed {
        before: u64,
        after: u64,
    },
    /// Answer to SpaceState: why the disk takes no new data, if it does not.
    SpaceState {
        full: Option<String>,
    },
    Replaced(Replaced),
    Volume(VolumeConfig),
    /// A range of a chunk of `chunk_len` bytes: the whole groups from byte `start` that cover
    /// it, and the chaining value of every group of the chunk (none for a one-group chunk,
    /// which comes whole).
    Range {
        chunk_len: u64,
        start: u64,
        values: Vec<[u8; 32]>,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

/// What a brick answers on a stream: a reply, or an error that carries an errno.
pub type Response = Result<Reply, FsError>;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("frame does not decode: {0}")]
    Decode(String),
    #[error("stream read failed: {0}")]
    Read(String),
    #[error("stream write failed: {0}")]
    Write(String),
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    encode_after(0, msg)
}

/// The size `encode` would produce, found without copying any bytes.
pub fn encoded_len<T: Serialize>(msg: &T) -> usize {
    // Encoding our own plain types cannot fail.
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(msg, &mut size, bincode_config())
        .expect("wire types always encode");
    size.bytes_written
}

/// Appends to a Vec that was allocated at its final size, so encoding never reallocates.
struct Appender<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for Appender<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// `prefix` zero bytes followed by `msg` encoded, in a Vec of exactly that size. A sizing pass
/// (which copies no bytes) comes first: growing the Vec as it filled copied every chunk about
/// once more, and a brick encodes every chunk it forwards and every log entry it stores.
fn encode_after<T: Serialize>(prefix: usize, msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix + encoded_len(msg));
    out.resize(prefix, 0);
    bincode::serde::encode_into_writer(msg, Appender(&mut out), bincode_config())
        .expect("wire types always encode");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    if bytes.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(bytes.len()));
    }
    let (msg, used) = bincode::serde::decode_from_slice(bytes, bincode_config())
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(FrameError::Decode(format!(
            "{} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(msg)
}

/// A message encoded as one frame (length prefix included), ready to be sent any number of times:
/// a brick forwards each chunk to two peers from one encoding.
#[derive(Clone)]
pub struct Frame(bytes::Bytes);

impl Frame {
    pub fn of<T: Serialize>(msg: &T) -> Result<Frame, FrameError> {
        let mut frame = encode_after(4, msg);
        let len = frame.len() - 4;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        frame[..4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(Frame(bytes::Bytes::from(frame)))
    }
}

pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), FrameError> {
    send_frame(send, &Frame::of(msg)?).await
}

pub async fn send_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), FrameError> {
    // Handed over whole: QUIC keeps a reference to the buffer instead of copying it in.
    send.write_chunk(frame.0.clone())
        .await
        .map_err(|e| FrameError::Write(e.to_string()))
}

pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| FrameError::Read(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // Filled from the stream's own buffers as they arrive, without zeroing it first.
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(FrameError::Read(format!(
                    "stream ended {} bytes into a {len}-byte frame",
                    body.len()
                )))
            }
            Err(e) => return Err(FrameError::Read(e.to_string())),
        }
    }
    decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let req = Request::Meta {
            op: MetaOp::Rename {
                parent: 1,
                name: b"a".to_vec(),
                new_parent: 7,
                new_name: b"b".to_vec(),
                flags: RENAME_EXCHANGE,
            },
            once: Some(OpId { client: 9, seq: 3 }),
        };
        let back: Request = decode(&encode(&req)).unwrap();
        assert!(matches!(
            back,
            Request::Meta {
                op: MetaOp::Rename { new_parent: 7, .. },
                once: Some(OpId { client: 9, seq: 3 })
            }
        ));
        let put = Request::PutChunk(PutChunk {
            id: ChunkId::of(b"x"),
            data: b"x".to_vec(),
            replicate: true,
            sync: false,
        });
        let back: Request = decode(&encode(&put)).unwrap();
        assert!(matches!(back, Request::PutChunk(p) if p.data == b"x"));
    }

    #[test]
    fn encoding_is_sized_exactly_and_matches_bincode() {
        let put = Request::PutChunk(PutChunk {
            id: ChunkId::of(b"y"),
            data: vec![7u8; 300_000],
            replicate: false,
            sync: true,
        });
        let ours = encode(&put);
        assert_eq!(ours.capacity(), ours.len(), "the buffer never grew");
        let theirs = bincode::serde::encode_to_vec(&put, bincode_config()).unwrap();
        assert_eq!(ours, theirs);
        let framed = Frame::of(&put).unwrap().0;
        assert_eq!(framed.len(), 4 + ours.len());
        assert_eq!(framed[..4], (ours.len() as u32).to_be_bytes());
        assert_eq!(&framed[4..], &ours[..]);
    }

    #[test]
    fn garbage_and_hostile_lengths_are_errors_not_panics() {
        assert!(decode::<Request>(&[0xff; 16]).is_err());
        // A length prefix claiming 2^60 elements must not allocate.
        let mut hostile = vec![2u8]; // variant PutChunk
        hostile.extend_from_slice(&[0u8; 32]);
        hostile.push(0xff);
        hostile.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Request>(&hostile).is_err());
        let mut valid = encode(&Request::Hello);
        valid.push(0);
        assert!(matches!(
            decode::<Request>(&valid),
            Err(FrameError::Decode(_))
        ));
    }
}
