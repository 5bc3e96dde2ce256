//! Directory delegations, the client's side. A directory this client made is, at its first
//! create, delegated to it by the metadata leader ([`Request::Delegate`]): from then on this
//! client alone changes what lies beneath it. Creates, chmod/chown/utimens, xattr changes and
//! file contents beneath it are answered from memory at once and committed in the background,
//! many per Raft entry, as [`MetaOp::Local`] changes in the order they were made. The leader
//! recalls the delegation before it answers any other client's request that names the
//! directory; this client then commits everything it holds and gives it back, so other
//! clients never see less than what this one showed (close-to-open holds across mounts).
//!
//! What is held here is on no brick yet: like a file's page cache, it is durable once fsync
//! (or fsyncdir, or unmount) returns. A delegation ends when the lease that carried it ends;
//! what it held is then committed as soon as a leader answers.

use crate::once::Ticket;
use crate::Volume;
use mortar_proto::wire::{MetaOk, MetaOp, OpId, Request, Stamp};
use mortar_proto::{
    validate_name, validate_symlink_target, Attr, BrickId, Content, FileKind, FsError, Inode,
    InodeId, Timestamp,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Inode numbers reserved at a time for creates under delegations.
const RESERVE: u32 = 4096;
/// Changes per commit at most, and bytes of changes per commit at most.
const BATCH_OPS: usize = 1024;
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Held changes beyond which a change waits for a commit (memory stays bounded).
const HELD_OPS: usize = 8192;
const HELD_BYTES: usize = 64 * 1024 * 1024;
/// Content shown from memory for committed files beneath live delegations, at most; beyond
/// it they are forgotten (the cache and the bricks answer for them).
const NODE_BYTES: usize = 128 * 1024 * 1024;
/// Directories remembered as made by this client and not yet asked about.
const MADE_MAX: usize = 4096;
/// Inodes remembered as having lost a change, until an fsync, close or fsyncdir reports it.
const LOST_MAX: usize = 65536;
/// How long the background commit lets changes gather before it sends a batch that is not
/// yet half full: fewer, larger commits cost the bricks less CPU. Measured on `cp -a` of
/// WordPress, six copies each, in turn: gathering before every batch instead of only before
/// the first of a drain took the copy from about 300 Raft entries (median 11 changes) to
/// 21-39 (median 146), the bricks and mount from 2.46 to 1.88 CPU-s, and the copy from 1.95
/// to 1.78 s on average.
const GATHER: Duration = Duration::from_millis(25);
/// Pause before committing again after a commit failed for want of a leader or quorum.
const RETRY_AFTER: Duration = Duration::from_millis(100);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2);

/// An inode made or changed under a delegation, as this client shows it.
struct Node {
    inode: Inode,
    /// The delegated directory it lies beneath.
    root: InodeId,
    /// A directory's entries: every one of them was made here.
    entries: Option<HashMap<Vec<u8>, InodeId>>,
}

/// A change held for commit, with the inode it concerns.
struct Held {
    op: MetaOp,
    ino: InodeId,
    bytes: usize,
    /// For a change of an existing inode: the version it found (a change made next to it
    /// of the same inode is folded into it, as the [`MetaOp::SetInode`] of the result).
    found: Option<u64>,
}

#[derive(Default)]
struct State {
    /// Leader and term of the watch under which the live delegations were granted.
    epoch: Option<(BrickId, u64)>,
    /// Delegated directories this client may still change from memory.
    roots: HashSet<InodeId>,
    /// Inodes beneath delegated directories, whole, while this client answers for them.
    nodes: HashMap<InodeId, Node>,
    held: VecDeque<Held>,
    held_bytes: usize,
    /// A batch that was sent and not answered: sent again, under the same id, before anything.
    unanswered: Option<(Ticket, Vec<Held>)>,
    /// The inodes of the batch being sent now: held until it is answered, so nothing the
    /// batch makes is forgotten early, and a change sent the usual way waits for it.
    flying: Vec<InodeId>,
    /// A delegation was given back since the last [`State::forget_committed`].
    forget_due: bool,
    /// Reserved inode numbers not used yet.
    spare: std::ops::Range<InodeId>,
    made: HashSet<InodeId>,
    /// Content bytes of `nodes`.
    node_bytes: usize,
    /// Inodes with a change this client showed and could not commit, and what it was: the
    /// next fsync, close or fsyncdir of each fails with EIO (once).
    lost: HashMap<InodeId, String>,
}

/// What a change adds to a batch, roughly: its content and xattrs plus a small fixed part.
fn change_bytes(op: &MetaOp) -> usize {
    128 + match op {
        MetaOp::SetContent { content, .. } => content_bytes(content),
        MetaOp::SetXattr { value, .. } => value.len(),
        MetaOp::SetInode { inode, .. } => content_bytes(&inode.content) + inode.xattr_bytes(),
        _ => 0,
    }
}

fn content_bytes(c: &Content) -> usize {
    match c {
        Content::Inline(b) | Content::Symlink(b) => b.len(),
        Content::Chunks(c) => c.len() * 40,
        Content::None => 0,
    }
}

impl State {
    /// Whether `ino` may be changed from memory now.
    fn live(&self, ino: InodeId) -> Option<InodeId> {
        self.nodes
            .get(&ino)
            .map(|n| n.root)
            .filter(|r| self.roots.contains(r))
    }

    /// Hold a create of `ino`.
    fn hold_create(&mut self, op: MetaOp, ino: InodeId, at: Timestamp) {
        self.push(op, ino, at, None);
    }

    /// Hold `op`, a change of `ino` that found it at version `found` and made it `changed`.
    /// When the last change held is of the same inode too, the two become one: the inode as
    /// it now is. Nothing can come between them at the leader, so the result is the same.
    fn hold_change(
        &mut self,
        op: &MetaOp,
        ino: InodeId,
        at: Timestamp,
        found: u64,
        changed: &Inode,
    ) {
        match self.held.back_mut() {
            Some(Held {
                op: last,
                ino: last_ino,
                bytes,
                found: Some(expect_version),
            }) if *last_ino == ino => {
                let whole = MetaOp::SetInode {
                    expect_version: *expect_version,
                    inode: changed.clone(),
                };
                let whole_bytes = change_bytes(&whole);
                *last = MetaOp::Local {
                    at,
                    ino: None,
                    op: Box::new(whole),
                };
                self.held_bytes = self.held_bytes - *bytes + whole_bytes;
                *bytes = whole_bytes;
            }
            _ => self.push(op.clone(), ino, at, Some(found)),
        }
    }

    fn push(&mut self, op: MetaOp, ino: InodeId, at: Timestamp, found: Option<u64>) {
        let bytes = change_bytes(&op);
        let op = MetaOp::Local {
            at,
            ino: found.is_none().then_some(ino),
            op: Box::new(op),
        };
        self.held_bytes += bytes;
        self.held.push_back(Held {
            op,
            ino,
            bytes,
            found,
        });
    }

    fn full(&self) -> bool {
        self.held.len() >= HELD_OPS || self.held_bytes >= HELD_BYTES
    }

    /// The inodes `root` covers are no longer changed from memory; they are still shown
    /// from memory until what they hold is committed.
    fn give_back(&mut self, root: InodeId) {
        self.roots.remove(&root);
        self.forget_due = true;
    }

    /// After a commit: forget inodes of given-back delegations whose changes are all
    /// committed, and files nothing is held for (the cache and the bricks answer for them
    /// now). A given-back subtree with changes still held stays whole, so none of its names
    /// is missing meanwhile; once forgotten, nothing of it answers any more (an unlink or
    /// rename made after the give-back must not meet the names it removed).
    /// Returns the directories forgotten: the cache must not answer for their names from
    /// what it knew before the delegation (nothing told it of the names made beneath).
    fn forget_committed(&mut self) -> HashSet<InodeId> {
        let held: HashSet<InodeId> = self
            .held
            .iter()
            .chain(self.unanswered.iter().flat_map(|(_, b)| b.iter()))
            .map(|h| h.ino)
            .chain(self.flying.iter().copied())
            .collect();
        self.forget_due = false;
        let held_roots: HashSet<InodeId> = held
            .iter()
            .filter_map(|i| self.nodes.get(i).map(|n| n.root))
            .collect();
        let roots = &self.roots;
        let crowded = self.node_bytes > NODE_BYTES;
        let mut freed = 0;
        let mut dirs = HashSet::new();
        self.nodes.retain(|ino, n| {
            let keep = held.contains(ino)
                || match roots.contains(&n.root) {
                    true => n.entries.is_some() || !crowded,
                    false => held_roots.contains(&n.root),
                };
            if !keep {
                freed += content_bytes(&n.inode.content);
                if n.entries.is_some() {
                    dirs.insert(*ino);
                }
            }
            keep
        });
        self.node_bytes -= freed;
        dirs
    }
}

/// How a name beneath a delegated directory is answered.
pub(crate) enum Name {
    /// Not beneath a delegation: ask as usual.
    Elsewhere,
    Absent,
    Found(Attr),
    /// Made here and committed since: its attributes come from the cache or the bricks.
    Committed(InodeId),
}

#[derive(Default)]
pub(crate) struct Delegations {
    /// Batches of held changes sent so far, and changes committed in them, for tests and
    /// metrics.
    pub(crate) batches: std::sync::atomic::AtomicU64,
    pub(crate) committed: std::sync::atomic::AtomicU64,
    /// Tests stop the background commits, to see what only a recall or fsync commits.
    pub(crate) paused: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
    /// One commit at a time, so changes land in the order they were made.
    committing: tokio::sync::Mutex<()>,
    pub(crate) wake: Arc<tokio::sync::Notify>,
}

impl Delegations {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("delegations lock")
    }

    /// The held change `h` could not be committed (`e`): the application was shown it, so the
    /// next fsync, close or fsyncdir of the inode (and, for a create, of its directory) fails.
    fn lose(&self, h: &Held, e: &FsError) {
        let what = describe(&h.op);
        tracing::error!(
            ino = h.ino,
            error = %e,
            "a change made under a lost delegation could not be committed: {what}"
        );
        let mut st = self.lock();
        if st.lost.len() >= LOST_MAX {
            return;
        }
        let note = format!("{what} could not be committed: {e}");
        if let Some(parent) = created_in(&h.op) {
            st.lost.insert(parent, note.clone());
        }
        st.lost.insert(h.ino, note);
    }

    /// A change of `ino` this client showed and could not commit, once.
    pub(crate) fn take_lost(&self, ino: InodeId) -> Option<String> {
        let mut st = self.lock();
        if st.lost.is_empty() {
            return None;
        }
        st.lost.remove(&ino)
    }

    pub(crate) fn attr(&self, ino: InodeId) -> Option<Attr> {
        self.lock().nodes.get(&ino).map(|n| n.inode.attr.clone())
    }

    pub(crate) fn inode(&self, ino: InodeId) -> Option<Inode> {
        self.lock().nodes.get(&ino).map(|n| n.inode.clone())
    }

    pub(crate) fn name(&self, parent: InodeId, name: &[u8]) -> Name {
        let st = self.lock();
        let Some(entries) = st.nodes.get(&parent).and_then(|n| n.entries.as_ref()) else {
            return Name::Elsewhere;
        };
        match entries.get(name) {
            None => Name::Absent,
            Some(ino) => match st.nodes.get(ino) {
                Some(n) => Name::Found(n.inode.attr.clone()),
                None => Name::Committed(*ino),
            },
        }
    }

    /// The delegated directories beneath which any of `inos` lies.
    pub(crate) fn roots_of(&self, inos: &[InodeId]) -> Vec<InodeId> {
        let st = self.lock();
        let mut roots: Vec<InodeId> = inos
            .iter()
            .filter_map(|i| st.nodes.get(i).map(|n| n.root))
            .collect();
        roots.sort_unstable();
        roots.dedup();
        roots
    }

    pub(crate) fn holds_any(&self) -> bool {
        let st = self.lock();
        !st.held.is_empty() || st.unanswered.is_some() || !st.flying.is_empty()
    }

    /// This client made directory `ino`: its first create may ask for a delegation.
    pub(crate) fn made(&self, ino: InodeId) {
        let mut st = self.lock();
        if st.made.len() >= MADE_MAX {
            st.made.clear();
        }
        st.made.insert(ino);
    }

    /// The lease ended: nothing more is changed from memory.
    pub(crate) fn lease_lost(&self) {
        let mut st = self.lock();
        st.roots.clear();
        st.epoch = None;
        st.made.clear();
        if st.held.is_empty() && st.unanswered.is_none() && st.flying.is_empty() {
            // Without a lease the cache answers nothing, and starts afresh with the next.
            let _ = st.forget_committed();
        }
        drop(st);
        self.wake.notify_one();
    }
}

/// The directory a held create made its name in.
fn created_in(op: &MetaOp) -> Option<InodeId> {
    let MetaOp::Local {
        op, ino: Some(_), ..
    } = op
    else {
        return None;
    };
    match &**op {
        MetaOp::Mknod { parent, .. }
        | MetaOp::Mkdir { parent, .. }
        | MetaOp::Symlink { parent, .. } => Some(*parent),
        _ => None,
    }
}

/// A held change in words, for the mount log and the error: what it did and where.
fn describe(op: &MetaOp) -> String {
    let inner = match op {
        MetaOp::Local { op, .. } => &**op,
        op => op,
    };
    let name = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
    match inner {
        MetaOp::Mknod {
            parent, name: n, ..
        } => {
            format!("the create of {:?} in directory inode {parent}", name(n))
        }
        MetaOp::Mkdir {
            parent, name: n, ..
        } => {
            format!("the mkdir of {:?} in directory inode {parent}", name(n))
        }
        MetaOp::Symlink {
            parent, name: n, ..
        } => {
            format!("the symlink {:?} in directory inode {parent}", name(n))
        }
        MetaOp::SetInode { inode, .. } => format!("a change of inode {}", inode.attr.ino),
        other => format!("the change {other:?}"),
    }
}

/// Make the inode `op` creates, numbered `ino`, in this client's copy with the namespace's
/// own rules, and hold the create for commit.
fn make_node(st: &mut State, root: InodeId, op: &MetaOp, ino: InodeId) -> Result<Attr, FsError> {
    let now = Timestamp::now();
    if let MetaOp::Symlink { target, .. } = op {
        validate_symlink_target(target)?;
    }
    let (parent, name, inode) = Inode::created_by(op, ino, now)
        .ok_or_else(|| FsError::Invalid(format!("not a create: {op:?}")))?;
    validate_name(name)?;
    let attr = inode.attr.clone();
    let kind = attr.kind;
    let dir = st.nodes.get_mut(&parent).expect("live parent");
    let entries = dir.entries.as_mut().ok_or(FsError::NotDir)?;
    if entries.contains_key(name) {
        return Err(FsError::Exists);
    }
    entries.insert(name.to_vec(), ino);
    dir.inode
        .attr
        .touch_dir(i32::from(kind == FileKind::Directory), now);
    st.node_bytes += content_bytes(&inode.content);
    st.nodes.insert(
        ino,
        Node {
            inode,
            root,
            entries: (kind == FileKind::Directory).then(HashMap::new),
        },
    );
    // The name is free here, so the create is exclusive (as the namespace requires of it).
    let mut held = op.clone();
    if let MetaOp::Mknod { exclusive, .. } = &mut held {
        *exclusive = true;
    }
    st.hold_create(held, ino, now);
    Ok(attr)
}

impl Volume {
    /// Whether the lease of `epoch` is current, so changes may still be made from memory.
    fn leased_under(&self, epoch: Option<(BrickId, u64)>) -> bool {
        epoch.is_some_and(|(leader, term)| self.meta_cache.serving_under(leader, term))
    }

    /// The delegated directory `ino` lies beneath, when it may be changed from memory now. A
    /// delegation whose lease has lapsed is given back here: a change made the usual way
    /// meanwhile would be missing from this client's copy.
    fn usable(&self, st: &mut State, ino: InodeId) -> Option<InodeId> {
        let root = st.live(ino)?;
        if self.leased_under(st.epoch) {
            Some(root)
        } else {
            st.give_back(root);
            None
        }
    }

    /// Ask for a delegation of `dir` if this client made it and has not asked yet.
    async fn maybe_delegate(&self, dir: InodeId) {
        // Without a lease the leader would refuse: keep the directory for a later create.
        if !self.meta_cache.serving() || !self.deleg.lock().made.remove(&dir) {
            return;
        }
        let a = self
            .meta(Request::Delegate {
                client: self.client_id,
                dir,
            })
            .await;
        let (Ok(MetaOk::Inode(inode)), Some(Stamp { leader, term, .. })) = (a.result, a.stamp)
        else {
            return;
        };
        let mut st = self.deleg.lock();
        let epoch = Some((leader, term));
        if st.epoch.is_some() && st.epoch != epoch {
            // Granted by a leader other than the one our live delegations came from: those
            // ended with their lease, which lease_lost has seen or is about to.
            return;
        }
        if !self.leased_under(epoch) || inode.attr.kind != FileKind::Directory {
            return;
        }
        st.epoch = epoch;
        st.roots.insert(dir);
        st.nodes.insert(
            dir,
            Node {
                inode,
                root: dir,
                entries: Some(HashMap::new()),
            },
        );
        drop(st);
        // Names made beneath it from now on reach the cache only once committed. (The cache
        // is scanned outside the delegations' lock, which answers requests from memory.)
        self.meta_cache.forget_listings(&HashSet::from([dir]));
        tracing::debug!(dir, "directory delegated to this client");
    }

    /// An inode number for a create under a delegation.
    async fn spare_ino(&self) -> Result<InodeId, FsError> {
        loop {
            {
                let mut st = self.deleg.lock();
                if let Some(ino) = st.spare.next() {
                    return Ok(ino);
                }
            }
            let ticket = self.seqs.ticket().await;
            match self
                .write_op_as(MetaOp::ReserveInodes { count: RESERVE }, ticket.id())
                .await?
            {
                MetaOk::Inodes { first, count } => {
                    let mut st = self.deleg.lock();
                    if st.spare.is_empty() {
                        st.spare = first..first + count as u64;
                    }
                }
                other => return Err(FsError::Io(format!("unexpected answer {other:?}"))),
            }
        }
    }

    /// A create (Mknod, Mkdir or Symlink) answered from memory, when its parent lies beneath a
    /// live delegation (None: make it as usual).
    pub(crate) async fn create_local(&self, op: &MetaOp) -> Option<Result<Attr, FsError>> {
        let parent = match op {
            MetaOp::Mknod { parent, kind, .. } if kind.mknod_under_delegation() => *parent,
            MetaOp::Mkdir { parent, .. } | MetaOp::Symlink { parent, .. } => *parent,
            _ => return None,
        };
        self.maybe_delegate(parent).await;
        let live = {
            let mut st = self.deleg.lock();
            self.usable(&mut st, parent).is_some()
        };
        if !live {
            return None;
        }
        let ino = match self.spare_ino().await {
            Ok(ino) => ino,
            Err(e) => return Some(Err(e)),
        };
        let result = {
            let mut st = self.deleg.lock();
            let Some(root) = self.usable(&mut st, parent) else {
                st.spare = ino..st.spare.end.max(ino + 1);
                return None;
            };
            make_node(&mut st, root, op, ino)
        };
        self.after_hold().await;
        Some(result)
    }

    /// A change of one inode answered from memory, when it lies beneath a live delegation
    /// (None: commit it as usual). Returns the inode as changed.
    pub(crate) async fn change_local(
        &self,
        ino: InodeId,
        op: &MetaOp,
    ) -> Option<Result<Inode, FsError>> {
        let result = {
            let mut st = self.deleg.lock();
            self.usable(&mut st, ino)?;
            let now = Timestamp::now();
            let node = st.nodes.get_mut(&ino).expect("live node");
            let mut changed = node.inode.clone();
            match changed.apply_change(op, now) {
                Ok(()) => {
                    let before = content_bytes(&node.inode.content);
                    let found = node.inode.attr.version;
                    node.inode = changed.clone();
                    st.node_bytes = st.node_bytes - before + content_bytes(&changed.content);
                    st.hold_change(op, ino, now, found, &changed);
                    Ok(changed)
                }
                Err(e) => Err(e),
            }
        };
        self.after_hold().await;
        Some(result)
    }

    /// Wake the committer, and wait for it when too much is held.
    async fn after_hold(&self) {
        let full = self.deleg.lock().full();
        self.deleg.wake.notify_one();
        if full {
            if let Err(e) = self.commit_held().await {
                tracing::warn!(error = %e, "changes made under a delegation are not committed yet");
            }
        }
    }

    /// The inode whole when it lies beneath a live delegation (its changes are made here).
    pub(crate) fn live_inode(&self, ino: InodeId) -> Option<Inode> {
        let mut st = self.deleg.lock();
        self.usable(&mut st, ino)?;
        st.nodes.get(&ino).map(|n| n.inode.clone())
    }

    /// Before a request that must find them at the bricks: give back the delegations any of
    /// `inos` lie beneath, and commit what is held.
    pub(crate) async fn give_back(&self, inos: &[InodeId]) -> Result<(), FsError> {
        let roots = self.deleg.roots_of(inos);
        if roots.is_empty() && !self.deleg.holds_any() {
            return Ok(());
        }
        {
            let mut st = self.deleg.lock();
            for r in roots {
                tracing::debug!(dir = r, "giving back a delegation");
                st.give_back(r);
            }
        }
        self.commit_held().await
    }

    /// The leader recalls the delegation of `dir`.
    pub(crate) async fn recalled(&self, dir: InodeId) {
        self.deleg.lock().give_back(dir);
        if let Err(e) = self.commit_held().await {
            tracing::error!(dir, error = %e, "could not commit what a recalled delegation held");
        }
    }

    /// fsync, close or fsyncdir of `ino`: EIO when a change of it this client showed could not
    /// be committed (reported once).
    pub fn lost_change(&self, ino: InodeId) -> Result<(), FsError> {
        match self.deleg.take_lost(ino) {
            None => Ok(()),
            Some(note) => Err(FsError::Io(note)),
        }
    }

    /// Commit everything held so far (fsync, fsyncdir, unmount, a recall, a give-back), then
    /// forget what given-back delegations showed: from here on the cache and the bricks
    /// answer for it.
    pub async fn commit_held(&self) -> Result<(), FsError> {
        let mut committed = false;
        while self.commit_batch().await? {
            committed = true;
        }
        let mut st = self.deleg.lock();
        if committed || st.forget_due {
            let dirs = st.forget_committed();
            drop(st);
            self.meta_cache.forget_listings(&dirs);
        }
        Ok(())
    }

    /// Commit the oldest held changes, one batch of them (first the batch left unanswered, if
    /// any). Returns whether there was anything to commit.
    async fn commit_batch(&self) -> Result<bool, FsError> {
        let _one = self.deleg.committing.lock().await;
        // A new batch's id, taken before the lock (it may wait); unused when the batch left
        // unanswered goes again under its own.
        let mut fresh = if self.deleg.lock().unanswered.is_none() {
            Some(self.seqs.ticket().await)
        } else {
            None
        };
        let (ticket, batch) = {
            let mut st = self.deleg.lock();
            match st.unanswered.take() {
                Some(b) => b,
                None => {
                    let mut batch = Vec::new();
                    let mut bytes = 0;
                    while let Some(h) = st.held.front() {
                        if !batch.is_empty()
                            && (batch.len() >= BATCH_OPS || bytes + h.bytes > BATCH_BYTES)
                        {
                            break;
                        }
                        bytes += h.bytes;
                        st.held_bytes -= h.bytes;
                        batch.push(st.held.pop_front().expect("front"));
                    }
                    if batch.is_empty() {
                        return Ok(false);
                    }
                    let ticket = match fresh.take() {
                        Some(t) => t,
                        None => unreachable!(
                            "only commit_batch, under `committing`, leaves a batch unanswered"
                        ),
                    };
                    (ticket, batch)
                }
            }
        };
        self.deleg.lock().flying = batch.iter().map(|h| h.ino).collect();
        let result = self.send_batch(ticket.id(), &batch).await;
        let mut st = self.deleg.lock();
        st.flying.clear();
        if let Err(e) = result {
            // Nothing is lost: the same batch goes again, under the same id (it may have
            // been applied), before anything else.
            st.unanswered = Some((ticket, batch));
            return Err(e);
        }
        if st.held.is_empty() {
            let dirs = st.forget_committed();
            drop(st);
            self.meta_cache.forget_listings(&dirs);
        }
        Ok(true)
    }

    /// Send one batch of held changes. Errors are those after which it must go again.
    async fn send_batch(&self, once: OpId, batch: &[Held]) -> Result<(), FsError> {
        // The chunks these changes name were queued before the changes were held.
        self.wait_uploads().await?;
        let ops: Vec<MetaOp> = batch.iter().map(|h| h.op.clone()).collect();
        let n = ops.len();
        self.deleg.batches.fetch_add(1, Ordering::Relaxed);
        match self.write_op_as(MetaOp::Batch(ops), once).await {
            Ok(_) => {
                self.deleg.committed.fetch_add(n as u64, Ordering::Relaxed);
                tracing::debug!(changes = n, "committed changes made under delegations");
            }
            Err(e @ (FsError::Unavailable(_) | FsError::ReadOnly(_) | FsError::Io(_))) => {
                return Err(e)
            }
            Err(e) => {
                // Refused as a whole (a delegation was lost and someone else got there
                // first): keep every change that still applies, and report the others.
                tracing::error!(error = %e, changes = n, "a batch of delegated changes was refused; committing them one by one");
                for h in batch {
                    let ticket = self.seqs.ticket().await;
                    if let Err(e) = self.write_op_as(h.op.clone(), ticket.id()).await {
                        self.deleg.lose(h, &e);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Commit held changes in the background, one batch per [`GATHER`] (at once when half a batch
/// is waiting). Draining back to back instead chased a steady writer with batches of a few
/// changes each: a Raft entry every few ms, each costing the bricks a log write, two
/// replication round trips and an apply.
pub(crate) async fn run(volume: Weak<Volume>, wake: Arc<tokio::sync::Notify>) {
    let mut pause = RETRY_AFTER;
    loop {
        wake.notified().await;
        let mut gathered = false;
        loop {
            let Some(v) = volume.upgrade() else { return };
            if !v.deleg.holds_any() || v.deleg.paused.load(Ordering::Relaxed) {
                break;
            }
            if !gathered && v.deleg.lock().held.len() < BATCH_OPS / 2 {
                drop(v);
                tokio::time::sleep(GATHER).await;
                gathered = true;
                continue;
            }
            gathered = false;
            match v.commit_batch().await {
                Ok(_) => pause = RETRY_AFTER,
                Err(e) => {
                    tracing::warn!(error = %e, "delegated changes not committed yet; retrying");
                    drop(v);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_RETRY_AFTER);
                }
            }
        }
    }
}

impl Volume {
    pub(crate) fn start_committer(self: &Arc<Self>) {
        tokio::spawn(run(Arc::downgrade(self), self.deleg.wake.clone()));
    }
}

#[cfg(test)]
mod tests {
    //! The holder's bookkeeping without sockets: what is held, how changes fold, what is
    //! forgotten when, and how a change that could not commit is reported.
    use super::*;
    use mortar_proto::wire::SetAttr;
    use mortar_proto::Attr;

    const ROOT: InodeId = 50;

    /// A state holding a delegation of directory `ROOT` (in the volume root).
    fn holding() -> State {
        let mut st = State::default();
        st.roots.insert(ROOT);
        st.nodes.insert(
            ROOT,
            Node {
                inode: Inode {
                    attr: Attr::new(ROOT, FileKind::Directory, 0o755, 0, 0, Timestamp::now()),
                    content: Content::None,
                    xattrs: Vec::new(),
                },
                root: ROOT,
                entries: Some(HashMap::new()),
            },
        );
        st
    }

    fn mknod(parent: InodeId, name: &str) -> MetaOp {
        MetaOp::Mknod {
            parent,
            name: name.as_bytes().to_vec(),
            kind: FileKind::Regular,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: false,
        }
    }

    fn chmod(st: &mut State, ino: InodeId, perm: u32) {
        let op = MetaOp::SetAttr {
            ino,
            set: SetAttr {
                perm: Some(perm),
                ..SetAttr::default()
            },
        };
        let now = Timestamp::now();
        let node = st.nodes.get_mut(&ino).unwrap();
        let found = node.inode.attr.version;
        let mut changed = node.inode.clone();
        changed.apply_change(&op, now).unwrap();
        node.inode = changed.clone();
        st.hold_change(&op, ino, now, found, &changed);
    }

    #[test]
    fn creates_are_held_exclusive_and_a_taken_name_is_refused_from_memory() {
        let mut st = holding();
        let attr = make_node(&mut st, ROOT, &mknod(ROOT, "a"), 100).unwrap();
        assert_eq!(attr.ino, 100);
        assert_eq!(st.held.len(), 1);
        match &st.held[0].op {
            MetaOp::Local {
                ino: Some(100), op, ..
            } => {
                assert!(matches!(
                    **op,
                    MetaOp::Mknod {
                        exclusive: true,
                        ..
                    }
                ))
            }
            other => panic!("held as {other:?}"),
        }
        assert_eq!(
            make_node(&mut st, ROOT, &mknod(ROOT, "a"), 101),
            Err(FsError::Exists)
        );
        assert_eq!(st.held.len(), 1, "a refused create holds nothing");
    }

    #[test]
    fn changes_of_one_inode_made_back_to_back_fold_into_one() {
        let mut st = holding();
        make_node(&mut st, ROOT, &mknod(ROOT, "a"), 100).unwrap();
        // The create stays on its own; the two chmods after it become one whole-inode change
        // from the version the first found.
        chmod(&mut st, 100, 0o600);
        let found = match &st.held[1].found {
            Some(v) => *v,
            None => panic!("not a change"),
        };
        chmod(&mut st, 100, 0o640);
        assert_eq!(st.held.len(), 2);
        match &st.held[1].op {
            MetaOp::Local { op, .. } => match &**op {
                MetaOp::SetInode {
                    expect_version,
                    inode,
                } => {
                    assert_eq!(*expect_version, found);
                    assert_eq!(inode.attr.perm & 0o777, 0o640);
                }
                other => panic!("folded into {other:?}"),
            },
            other => panic!("held as {other:?}"),
        }
        let bytes: usize = st.held.iter().map(|h| h.bytes).sum();
        assert_eq!(st.held_bytes, bytes, "the byte count follows the fold");
    }

    #[test]
    fn a_given_back_subtree_is_shown_whole_until_all_it_holds_is_committed() {
        let mut st = holding();
        make_node(&mut st, ROOT, &mknod(ROOT, "a"), 100).unwrap();
        st.give_back(ROOT);
        assert!(st.forget_due);
        assert_eq!(st.live(100), None, "no more changes from memory");
        // Still held: nothing of the subtree is forgotten (its names must keep answering).
        assert!(st.forget_committed().is_empty());
        assert!(st.nodes.contains_key(&100) && st.nodes.contains_key(&ROOT));
        // Committed: all of it goes, and the directory is named for the cache to forget.
        st.held.clear();
        st.held_bytes = 0;
        assert_eq!(st.forget_committed(), HashSet::from([ROOT]));
        assert!(st.nodes.is_empty());
    }

    #[test]
    fn held_changes_are_bounded() {
        let mut st = holding();
        for i in 0..HELD_OPS as u64 {
            assert!(!st.full());
            make_node(&mut st, ROOT, &mknod(ROOT, &format!("f{i}")), 1000 + i).unwrap();
        }
        assert!(st.full());
    }

    #[test]
    fn a_change_that_could_not_commit_fails_the_file_and_its_directory_once() {
        let d = Delegations::default();
        let mut st = holding();
        make_node(&mut st, ROOT, &mknod(ROOT, "a"), 100).unwrap();
        let held = st.held.pop_front().unwrap();
        d.lose(&held, &FsError::Exists);
        let note = d.take_lost(100).expect("the file is reported");
        assert!(
            note.contains("\"a\"") && note.contains("could not be committed"),
            "{note}"
        );
        assert!(d.take_lost(ROOT).is_some(), "and its directory");
        assert_eq!(d.take_lost(100), None, "once");
        assert_eq!(d.take_lost(7), None);
    }
}
