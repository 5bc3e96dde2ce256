//! Directory delegations, the client's side. A directory this client made is, at its first
//! create, delegated to it by the metadata leader ([`Request::Delegate`]): from then on this
//! client alone changes what lies beneath it. Creates, unlinks, renames within it,
//! chmod/chown/utimens, xattr changes and file contents beneath it are answered from memory
//! at once and committed in the background,
//! many per Raft entry, as [`MetaOp::Local`] changes in the order they were made. The leader
//! recalls the delegation before it answers any other client's request that names the
//! directory; this client then commits everything it holds and gives it back, so other
//! clients never see less than what this one showed (close-to-open holds across mounts).
//!
//! What is held here is on no brick yet: like a file's page cache, it is durable once fsync
//! (or fsyncdir, or unmount) returns. A delegation ends when the lease that carried it ends;
//! what it held is then committed as soon as a leader answers.

mod holder;

pub(crate) use holder::Name;
use holder::{Answer, Holder, Settled};

use crate::once::Ticket;
use crate::Volume;
use mortar_proto::wire::{MetaOk, MetaOp, OpId, Request, Stamp};
use mortar_proto::{Attr, BrickId, DirEntry, FsError, Inode, InodeId, Timestamp};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// Inode numbers reserved at a time for creates under delegations.
const RESERVE: u32 = 4096;
/// How long the background commit lets changes gather before it sends a batch that is not
/// yet half full: fewer, larger commits cost the bricks less CPU (measurements in
/// docs/benchmarks.md). A recall does not wait for it.
const GATHER: Duration = Duration::from_millis(25);
/// Pause before committing again after a commit failed for want of a leader or quorum.
const RETRY_AFTER: Duration = Duration::from_millis(100);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(2);

#[derive(Default)]
pub(crate) struct Delegations {
    /// Batches of held changes sent so far, and changes committed in them, for tests and
    /// metrics.
    pub(crate) batches: AtomicU64,
    pub(crate) committed: AtomicU64,
    /// Tests stop the background commits, to see what only a recall or fsync commits.
    pub(crate) paused: std::sync::atomic::AtomicBool,
    state: Mutex<Holder<Ticket>>,
    /// One commit at a time, so changes land in the order they were made.
    committing: tokio::sync::Mutex<()>,
    pub(crate) wake: Arc<tokio::sync::Notify>,
    /// The current watch, by number, and where its recall acknowledgements go.
    watch: Mutex<Option<(u64, UnboundedSender<u64>)>>,
    watches: AtomicU64,
}

impl Delegations {
    fn lock(&self) -> std::sync::MutexGuard<'_, Holder<Ticket>> {
        self.state.lock().expect("delegations lock")
    }

    /// A change of `ino` this client showed and could not commit, once.
    pub(crate) fn take_lost(&self, ino: InodeId) -> Option<String> {
        self.lock().take_lost(ino)
    }

    pub(crate) fn attr(&self, ino: InodeId) -> Option<Attr> {
        self.lock().attr(ino)
    }

    pub(crate) fn inode(&self, ino: InodeId) -> Option<Inode> {
        self.lock().inode(ino)
    }

    pub(crate) fn name(&self, parent: InodeId, name: &[u8]) -> Name {
        self.lock().name(parent, name)
    }

    pub(crate) fn holds_any(&self) -> bool {
        self.lock().holds_any()
    }

    /// This client made directory `ino`: its first create may ask for a delegation.
    pub(crate) fn made(&self, ino: InodeId) {
        self.lock().made(ino);
    }

    /// A watch opened: recalls that come through it are acknowledged through `acks`.
    /// Returns its number.
    pub(crate) fn watch_opened(&self, acks: UnboundedSender<u64>) -> u64 {
        let n = self.watches.fetch_add(1, Ordering::Relaxed) + 1;
        *self.watch.lock().expect("watch lock") = Some((n, acks));
        n
    }

    /// Acknowledge the recalls `settled` answered, on the watch they came through when it is
    /// still open.
    fn acknowledge(&self, acks: &[(u64, u64)]) {
        if acks.is_empty() {
            return;
        }
        let watch = self.watch.lock().expect("watch lock");
        for (w, seq) in acks {
            match &*watch {
                Some((current, tx)) if current == w => {
                    let _ = tx.send(*seq);
                }
                _ => tracing::debug!(seq, "a recall was answered after its watch ended"),
            }
        }
    }
}

impl Volume {
    /// Whether the lease of `epoch` is current, so changes may still be made from memory.
    fn leased_under(&self, epoch: Option<(BrickId, u64)>) -> bool {
        epoch.is_some_and(|(leader, term)| self.meta_cache.serving_under(leader, term))
    }

    /// The delegated directory `ino` lies beneath, when it may be changed from memory now.
    fn usable(&self, st: &mut Holder<Ticket>, ino: InodeId) -> Option<InodeId> {
        let leased = self.leased_under(st.epoch());
        st.usable(ino, leased)
    }

    /// Carry out what an event settled: recall acknowledgements, listings to forget.
    fn settle(&self, s: Settled) {
        self.deleg.acknowledge(&s.acks);
        if !s.forget.is_empty() {
            self.meta_cache.forget_listings(&s.forget);
        }
    }

    /// Ask for a delegation of `dir` if this client made it and has not asked yet.
    async fn maybe_delegate(&self, dir: InodeId) {
        // Without a lease the leader would refuse: keep the directory for a later create.
        if !self.meta_cache.serving() || !self.deleg.lock().ask_for(dir) {
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
        let leased = self.leased_under(Some((leader, term)));
        if !self
            .deleg
            .lock()
            .granted(dir, inode, (leader, term), leased)
        {
            return;
        }
        // Names made beneath it from now on reach the cache only once committed. (The cache
        // is scanned outside the delegations' lock, which answers requests from memory.)
        self.meta_cache.forget_listings(&HashSet::from([dir]));
        tracing::debug!(dir, "directory delegated to this client");
    }

    /// A change of names in `dir`, which no live delegation here covers: when this client
    /// keeps changing names there ([`Holder::ask_listed`]), ask for a delegation of it with
    /// its listing. Returns whether `dir` is now delegated.
    async fn maybe_delegate_listed(&self, dir: InodeId) -> bool {
        if !self.meta_cache.serving()
            || !self.deleg.lock().ask_listed(dir, std::time::Instant::now())
        {
            return false;
        }
        let a = self
            .meta(Request::DelegateListed {
                client: self.client_id,
                dir,
            })
            .await;
        let (
            Ok(MetaOk::Delegated {
                dir: inode,
                entries,
            }),
            Some(Stamp { leader, term, .. }),
        ) = (a.result, a.stamp)
        else {
            self.deleg.lock().refused(dir, std::time::Instant::now());
            return false;
        };
        let leased = self.leased_under(Some((leader, term)));
        if !self
            .deleg
            .lock()
            .granted_listed(dir, inode, entries, (leader, term), leased)
        {
            return false;
        }
        // Names changed in it from now on reach the cache only once committed.
        self.meta_cache.forget_listings(&HashSet::from([dir]));
        tracing::debug!(dir, "directory delegated to this client with its listing");
        true
    }

    /// An inode number for a create under a delegation.
    async fn spare_ino(&self) -> Result<InodeId, FsError> {
        loop {
            if let Some(ino) = self.deleg.lock().take_spare() {
                return Ok(ino);
            }
            let ticket = self.seqs.ticket().await;
            let op = match self.number() {
                0 => MetaOp::ReserveInodes { count: RESERVE },
                volume => MetaOp::ReserveInodesIn {
                    volume,
                    count: RESERVE,
                },
            };
            match self.write_op_as(op, ticket.id()).await? {
                MetaOk::Inodes { first, count } => {
                    self.deleg.lock().add_spare(first, first + count as u64);
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
        let live = |v: &Self| {
            let mut st = v.deleg.lock();
            v.usable(&mut st, parent).is_some()
        };
        let delegated = live(self) || (self.maybe_delegate_listed(parent).await && live(self));
        if !delegated {
            return None;
        }
        let ino = match self.spare_ino().await {
            Ok(ino) => ino,
            Err(e) => return Some(Err(e)),
        };
        let result = {
            let mut st = self.deleg.lock();
            let Some(root) = self.usable(&mut st, parent) else {
                st.return_spare(ino);
                return None;
            };
            st.create(root, op, ino, Timestamp::now())
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
            st.change(ino, op, Timestamp::now())
        };
        self.after_hold().await;
        Some(result)
    }

    /// An unlink or rmdir answered from memory, when `parent` lies beneath a live delegation
    /// and the name's inode is shown from memory (None: make it as usual).
    pub(crate) async fn remove_local(
        &self,
        parent: InodeId,
        name: &[u8],
        rmdir: bool,
    ) -> Option<Result<(), FsError>> {
        let try_local = |v: &Self| {
            let mut st = v.deleg.lock();
            v.usable(&mut st, parent)?;
            st.remove(parent, name, rmdir, Timestamp::now())
        };
        let result = match try_local(self) {
            Some(r) => r,
            None if self.maybe_delegate_listed(parent).await => try_local(self)?,
            None => return None,
        };
        self.after_hold().await;
        Some(result)
    }

    /// A rename answered from memory, when both directories lie beneath one live delegation
    /// (None: make it as usual).
    pub(crate) async fn rename_local(&self, op: &MetaOp) -> Option<Result<(), FsError>> {
        let MetaOp::Rename {
            parent, new_parent, ..
        } = *op
        else {
            return None;
        };
        let try_local = |v: &Self| {
            let mut st = v.deleg.lock();
            v.usable(&mut st, parent)?;
            v.usable(&mut st, new_parent)?;
            st.rename(op, Timestamp::now())
        };
        let result = match try_local(self) {
            Some(r) => r,
            // A rename within one directory: ask for it when it keeps changing.
            None if parent == new_parent && self.maybe_delegate_listed(parent).await => {
                try_local(self)?
            }
            None => return None,
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

    /// A page of the directory `ino` (sorted by name, after `after`) from memory, when it lies
    /// beneath a live delegation and all its entries are shown from memory.
    pub(crate) fn readdir_local(
        &self,
        ino: InodeId,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Option<Vec<DirEntry>> {
        let mut st = self.deleg.lock();
        self.usable(&mut st, ino)?;
        let all = st.listing(ino)?;
        let from = after.map_or(0, |a| all.partition_point(|e| e.name.as_slice() <= a));
        Some(all.into_iter().skip(from).take(limit as usize).collect())
    }

    /// The inode whole when it lies beneath a live delegation (its changes are made here).
    pub(crate) fn live_inode(&self, ino: InodeId) -> Option<Inode> {
        let mut st = self.deleg.lock();
        self.usable(&mut st, ino)?;
        st.inode(ino)
    }

    /// Before a request that must find them at the bricks: give back the delegations any of
    /// `inos` lie beneath, and commit what is held.
    pub(crate) async fn give_back(&self, inos: &[InodeId]) -> Result<(), FsError> {
        {
            let mut st = self.deleg.lock();
            let roots = st.roots_of(inos);
            if roots.is_empty() && !st.holds_any() {
                return Ok(());
            }
            for r in roots {
                tracing::debug!(dir = r, "giving back a delegation");
                st.give_back(r);
            }
        }
        self.commit_held().await
    }

    /// The leader recalls the delegation of `dir` (its message `seq` on watch `watch`): it is
    /// acknowledged once what is held now is committed, by whichever commit gets there.
    pub(crate) fn recalled(&self, dir: InodeId, watch: u64, seq: u64) {
        let settled = self
            .deleg
            .lock()
            .recall(dir, watch, seq, std::time::Instant::now());
        tracing::debug!(
            dir,
            at_once = !settled.acks.is_empty(),
            "delegation recalled"
        );
        self.settle(settled);
        self.deleg.wake.notify_one();
    }

    /// The lease ended (its watch did): nothing more is changed from memory.
    pub(crate) fn lease_lost(&self) {
        *self.deleg.watch.lock().expect("watch lock") = None;
        let settled = self.deleg.lock().lease_lost();
        self.settle(settled);
        self.deleg.wake.notify_one();
    }

    /// fsync, close or fsyncdir of `ino`: EIO when a change of it this client showed could not
    /// be committed (reported once).
    pub fn lost_change(&self, ino: InodeId) -> Result<(), FsError> {
        match self.deleg.take_lost(ino) {
            None => Ok(()),
            Some(note) => Err(FsError::Io(note)),
        }
    }

    /// Commit everything held so far (fsync, fsyncdir, unmount, a give-back), then forget
    /// what given-back delegations showed: from here on the cache and the bricks answer for it.
    pub async fn commit_held(&self) -> Result<(), FsError> {
        let mut committed = false;
        while self.commit_batch().await? {
            committed = true;
        }
        let dirs = self.deleg.lock().forget_if_due(committed);
        if !dirs.is_empty() {
            self.meta_cache.forget_listings(&dirs);
        }
        Ok(())
    }

    /// Commit the oldest held changes, one batch of them (first the batch left unanswered, if
    /// any). Returns whether there was anything to commit.
    async fn commit_batch(&self) -> Result<bool, FsError> {
        let _one = self.deleg.committing.lock().await;
        let (once, ops) = loop {
            // A new batch's id is taken outside the lock (it may wait); unused when the batch
            // left unanswered goes again under its own.
            let needs_id = self.deleg.lock().needs_id();
            let fresh = match needs_id {
                true => Some(self.seqs.ticket().await),
                false => None,
            };
            let mut st = self.deleg.lock();
            match st.next_batch(fresh) {
                Some(batch) => break batch,
                // A change was held while the id was awaited: take one for it.
                None if st.needs_id() => continue,
                None => return Ok(false),
            }
        };
        // Settled below; if this future is dropped first, the batch goes again.
        let mut flight = InFlight(Some(&self.deleg));
        let answer = self.send_batch(once, ops).await;
        let (settled, singles) = self.deleg.lock().batch_answered(match &answer {
            Ok(a) => *a,
            Err(_) => Answer::Retry,
        });
        self.settle(settled);
        if !singles.is_empty() {
            let mut results = Vec::with_capacity(singles.len());
            for op in singles {
                let ticket = self.seqs.ticket().await;
                results.push(self.write_op_as(op, ticket.id()).await.map(|_| ()));
            }
            let (settled, lost) = self.deleg.lock().singles_answered(results);
            for note in lost {
                tracing::error!("a change made under a lost delegation: {note}");
            }
            self.settle(settled);
        }
        flight.0 = None;
        answer.map(|_| true)
    }

    /// Send one batch of held changes: what the leader did with it, or an error after which
    /// it must go again.
    async fn send_batch(&self, once: OpId, ops: Vec<MetaOp>) -> Result<Answer, FsError> {
        // The chunks these changes name were queued before the changes were held.
        self.wait_uploads().await?;
        let n = ops.len();
        self.deleg.batches.fetch_add(1, Ordering::Relaxed);
        match self.write_op_as(MetaOp::Batch(ops), once).await {
            Ok(_) => {
                self.deleg.committed.fetch_add(n as u64, Ordering::Relaxed);
                tracing::debug!(changes = n, "committed changes made under delegations");
                Ok(Answer::Committed)
            }
            Err(e @ (FsError::Unavailable(_) | FsError::ReadOnly(_) | FsError::Io(_))) => Err(e),
            Err(e) => {
                tracing::error!(error = %e, changes = n, "a batch of delegated changes was refused; committing them one by one");
                Ok(Answer::Refused)
            }
        }
    }
}

/// A batch in flight: should the commit that sent it be dropped before its answer is
/// settled, the batch is marked to go again (else it would count as flying for ever and
/// nothing more would commit).
struct InFlight<'a>(Option<&'a Delegations>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(d) = self.0 {
            d.lock().batch_answered(Answer::Retry);
        }
    }
}

/// Commit held changes in the background, one batch per [`GATHER`] (at once when half a batch
/// is waiting, or a recall is). Draining back to back instead chased a steady writer with
/// batches of a few changes each: a Raft entry every few ms, each costing the bricks a log
/// write, two replication round trips and an apply.
pub(crate) async fn run(volume: Weak<Volume>, wake: Arc<tokio::sync::Notify>) {
    let mut pause = RETRY_AFTER;
    loop {
        wake.notified().await;
        let mut gathered = false;
        loop {
            let Some(v) = volume.upgrade() else { return };
            let (holds, urgent, waiting) = {
                let st = v.deleg.lock();
                (st.holds_any(), st.urgent(), st.waiting())
            };
            if !holds || (v.deleg.paused.load(Ordering::Relaxed) && !urgent) {
                break;
            }
            if !gathered && !urgent && waiting < holder::BATCH_OPS / 2 {
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
