//! The holder's side of directory delegations as a state machine: what this client changed
//! from memory, the batches that commit it in order, and when a recall may be answered.
//! Pure code: [`super`] asks the leader, sends the batches and acknowledges recalls, and
//! tells this what became of each.
//!
//! The rules, and why:
//! - **Changes commit in the order they were made**, one batch at a time; a batch without an
//!   answer goes again under the same id before anything else (it may have been applied).
//! - **A recall is acknowledged only once every change held when it came is committed** (or
//!   known lost): the leader lets the other client look as soon as it has the
//!   acknowledgement, so an early one would show it less than this client showed. A commit
//!   that fails leaves the recall waiting; the leader's recall wait or this lease ends it.
//! - **A given-back subtree is shown from memory until all it holds is committed**, so none
//!   of its names is missing meanwhile; then it is forgotten at once (a change made the usual
//!   way after the give-back must not meet what it removed).
//! - **A change that cannot commit is remembered**: the next fsync, close or fsyncdir of the
//!   inode (and, for a create, of its directory) fails with EIO, once.

use mortar_proto::wire::{MetaOp, OpId, RENAME_NOREPLACE};
use mortar_proto::{
    validate_name, validate_symlink_target, Attr, BrickId, Content, DirEntry, FileKind, FsError,
    Inode, InodeId, Timestamp,
};
use std::collections::{HashMap, HashSet, VecDeque};

/// Changes per commit at most, and bytes of changes per commit at most. Bytes are mostly
/// small files' content: a smaller entry is replicated and applied sooner, so a writer held
/// up behind a commit waits less (docs/benchmarks.md, "Reading ahead").
pub(super) const BATCH_OPS: usize = 1024;
const BATCH_BYTES: usize = 2 * 1024 * 1024;
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
/// A second change of names in a directory within this long asks for its delegation (one
/// change alone is cheaper made the usual way than after a grant's round trip).
const ASK_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
/// A directory recalled is not asked for again this soon: another client is using it.
const RECALL_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

/// What names a batch to the leader's once table: [`crate::once::Ticket`], a number in tests.
pub(crate) trait BatchId {
    fn id(&self) -> OpId;
}

impl BatchId for crate::once::Ticket {
    fn id(&self) -> OpId {
        crate::once::Ticket::id(self)
    }
}

/// An inode made or changed under a delegation, as this client shows it; or one named in a
/// directory delegated with its listing, which others may still change by inode.
struct Node {
    inode: Inode,
    /// The delegated directory it lies beneath.
    root: InodeId,
    /// A directory's entries, all known here (None for anything else, and for a directory
    /// known only by name).
    entries: Option<HashMap<Vec<u8>, InodeId>>,
    known: Known,
}

/// How much of a node this client answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// All of it: made (or changed) here beneath a live delegation.
    Whole,
    /// Its name and kind: its attributes and content come from the cache or the leader.
    Named,
    /// Named, and renamed or unlinked here by a change not committed yet: its attributes as
    /// that change left them (link count, ctime) are shown from here until it is.
    Shown,
}

/// A change held for commit, with the inode it concerns.
pub(super) struct Held {
    /// Changes are numbered in the order they were made.
    n: u64,
    pub(super) op: MetaOp,
    ino: InodeId,
    bytes: usize,
    /// For a change of an existing inode: the version it found (a change made next to it
    /// of the same inode is folded into it, as the [`MetaOp::SetInode`] of the result).
    found: Option<u64>,
}

/// What a held change is, for the commit: a create names its inode number, and a change of
/// one inode may be folded into the next change of the same inode.
#[derive(Clone, Copy)]
enum Kind {
    Create,
    /// A change of an existing inode, made on the version it found.
    Change(u64),
    /// A change of names (unlink, rmdir, rename): never folded.
    Entry,
}

/// The batch sent last and not yet settled.
struct Sent<T> {
    ticket: T,
    batch: Vec<Held>,
    /// Sent and not answered yet (false: it failed and goes again first).
    flying: bool,
}

/// A recall waiting for the changes held when it came.
struct Recall {
    /// The watch it came through, and its number there: acknowledged on that watch only.
    watch: u64,
    seq: u64,
    /// Every change numbered below this must be settled first.
    upto: u64,
}

/// What the I/O must do after an event: acknowledge recalls, and drop the cache's listings of
/// directories no longer shown from memory (nothing told it of the names made beneath).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Settled {
    /// (watch, seq) of each recall now answered.
    pub(crate) acks: Vec<(u64, u64)>,
    pub(crate) forget: HashSet<InodeId>,
}

/// What the leader did with a batch.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Answer {
    Committed,
    /// No answer, or no leader or quorum: it may have been applied; it goes again as it is.
    Retry,
    /// Refused as a whole (a delegation was lost and another client got there first): its
    /// changes go one by one, and those refused too are lost.
    Refused,
}

/// How a name beneath a delegated directory is answered.
#[derive(Debug)]
pub(crate) enum Name {
    /// Not beneath a delegation: ask as usual.
    Elsewhere,
    Absent,
    Found(Attr),
    /// Made here and committed since: its attributes come from the cache or the bricks.
    Committed(InodeId),
}

pub(crate) struct Holder<T> {
    /// Leader and term of the watch under which the live delegations were granted.
    epoch: Option<(BrickId, u64)>,
    /// Delegated directories this client may still change from memory.
    roots: HashSet<InodeId>,
    /// Inodes beneath delegated directories, whole, while this client answers for them.
    nodes: HashMap<InodeId, Node>,
    held: VecDeque<Held>,
    held_bytes: usize,
    next_n: u64,
    sent: Option<Sent<T>>,
    recalls: Vec<Recall>,
    /// A delegation was given back since the last forget.
    forget_due: bool,
    /// Reserved inode numbers not used yet.
    spare: std::ops::Range<InodeId>,
    made: HashSet<InodeId>,
    /// Content bytes of `nodes`.
    node_bytes: usize,
    /// Inodes with a change this client showed and could not commit, and what it was.
    lost: HashMap<InodeId, String>,
    /// Directories not shown from memory in which this client changed a name, and when.
    busy: HashMap<InodeId, std::time::Instant>,
    /// Directories recalled or refused, and when.
    recalled: HashMap<InodeId, std::time::Instant>,
}

impl<T> Default for Holder<T> {
    fn default() -> Self {
        Holder {
            epoch: None,
            roots: HashSet::new(),
            nodes: HashMap::new(),
            held: VecDeque::new(),
            held_bytes: 0,
            next_n: 0,
            sent: None,
            recalls: Vec::new(),
            forget_due: false,
            spare: 0..0,
            made: HashSet::new(),
            node_bytes: 0,
            lost: HashMap::new(),
            busy: HashMap::new(),
            recalled: HashMap::new(),
        }
    }
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

impl<T: BatchId> Holder<T> {
    // ---- delegations: granted, usable, given back, ended ----

    /// This client made directory `ino`: its first create may ask for a delegation.
    pub(crate) fn made(&mut self, ino: InodeId) {
        if self.made.len() >= MADE_MAX {
            self.made.clear();
        }
        self.made.insert(ino);
    }

    /// Whether to ask for a delegation of `dir` now (once per directory made here).
    pub(crate) fn ask_for(&mut self, dir: InodeId) -> bool {
        self.made.remove(&dir)
    }

    /// The leader of `epoch` delegated `dir` (found as `inode`); `leased` says whether this
    /// client's lease of that epoch is current. Returns whether the delegation is taken.
    pub(crate) fn granted(
        &mut self,
        dir: InodeId,
        inode: Inode,
        epoch: (BrickId, u64),
        leased: bool,
    ) -> bool {
        // Granted by a leader other than the one our live delegations came from: those
        // ended with their lease, which lease_lost has seen or is about to.
        if self.epoch.is_some_and(|e| e != epoch) {
            return false;
        }
        if !leased || inode.attr.kind != FileKind::Directory {
            return false;
        }
        self.epoch = Some(epoch);
        self.roots.insert(dir);
        self.nodes.insert(
            dir,
            Node {
                inode,
                root: dir,
                entries: Some(HashMap::new()),
                known: Known::Whole,
            },
        );
        true
    }

    /// Whether to ask for a delegation of `dir` with its listing now: this client changes
    /// names in it for the second time within [`ASK_WINDOW`], it is not shown from memory
    /// (what is held there would be missing from the listing), and it was not recalled or
    /// refused within [`RECALL_BACKOFF`] (another client is using it). The volume's root is
    /// never delegated.
    pub(crate) fn ask_listed(&mut self, dir: InodeId, now: std::time::Instant) -> bool {
        if mortar_proto::is_root(dir) || self.whole(dir).is_some() {
            return false;
        }
        if self
            .recalled
            .get(&dir)
            .is_some_and(|t| now < *t + RECALL_BACKOFF)
        {
            return false;
        }
        if self.busy.len() >= MADE_MAX {
            self.busy.clear();
        }
        match self.busy.insert(dir, now) {
            Some(before) if now < before + ASK_WINDOW => {
                self.busy.remove(&dir);
                true
            }
            _ => false,
        }
    }

    /// The leader refused `dir` (with its listing): not asked for again this soon.
    pub(crate) fn refused(&mut self, dir: InodeId, now: std::time::Instant) {
        self.not_now(dir, now);
    }

    fn not_now(&mut self, dir: InodeId, now: std::time::Instant) {
        if self.recalled.len() >= MADE_MAX {
            self.recalled.clear();
        }
        self.recalled.insert(dir, now);
    }

    /// The leader of `epoch` delegated `dir` (found as `inode`) with its `entries`. The names
    /// are this client's to change from now on; the inodes they name are shown by name and
    /// kind only (kept whole when already shown whole here). Returns whether it is taken.
    pub(crate) fn granted_listed(
        &mut self,
        dir: InodeId,
        inode: Inode,
        entries: Vec<DirEntry>,
        epoch: (BrickId, u64),
        leased: bool,
    ) -> bool {
        if !self.granted(dir, inode, epoch, leased) {
            return false;
        }
        let mut names = HashMap::with_capacity(entries.len());
        for e in entries {
            names.insert(e.name, e.attr.ino);
            self.nodes.entry(e.attr.ino).or_insert_with(|| Node {
                inode: Inode {
                    attr: e.attr,
                    content: Content::None,
                    xattrs: Vec::new(),
                },
                root: dir,
                entries: None,
                known: Known::Named,
            });
        }
        self.entries_mut(dir).clone_from(&names);
        true
    }

    /// The epoch of the live delegations' lease.
    pub(crate) fn epoch(&self) -> Option<(BrickId, u64)> {
        self.epoch
    }

    /// The delegated directory `ino` lies beneath, when it may be changed from memory now.
    /// A delegation whose lease (`leased` of its epoch) has lapsed is given back here: a
    /// change made the usual way meanwhile would be missing from this copy.
    pub(crate) fn usable(&mut self, ino: InodeId, leased: bool) -> Option<InodeId> {
        let root = self
            .nodes
            .get(&ino)
            .filter(|n| n.known == Known::Whole)
            .map(|n| n.root)
            .filter(|r| self.roots.contains(r))?;
        if leased {
            Some(root)
        } else {
            self.give_back(root);
            None
        }
    }

    /// The inodes `root` covers are no longer changed from memory; they are still shown
    /// from memory until what they hold is committed.
    pub(crate) fn give_back(&mut self, root: InodeId) {
        self.roots.remove(&root);
        self.forget_due = true;
    }

    /// The delegated directories beneath which any of `inos` lies.
    pub(crate) fn roots_of(&self, inos: &[InodeId]) -> Vec<InodeId> {
        let mut roots: Vec<InodeId> = inos
            .iter()
            .filter_map(|i| self.nodes.get(i).map(|n| n.root))
            .collect();
        roots.sort_unstable();
        roots.dedup();
        roots
    }

    /// The leader recalls `dir` through watch `watch`, as its message `seq`. Answered at once
    /// when nothing is held; else once what is held now is settled.
    pub(crate) fn recall(
        &mut self,
        dir: InodeId,
        watch: u64,
        seq: u64,
        now: std::time::Instant,
    ) -> Settled {
        self.not_now(dir, now);
        self.give_back(dir);
        self.recalls.push(Recall {
            watch,
            seq,
            upto: self.next_n,
        });
        let mut s = self.answered_recalls();
        if !self.holds_any() {
            s.forget = self.forget_committed();
        }
        s
    }

    /// A recall is waiting: commit now, without gathering (the leader waits for it).
    pub(crate) fn urgent(&self) -> bool {
        !self.recalls.is_empty()
    }

    /// The lease ended: nothing more is changed from memory, and recalls that came through
    /// its watch are not answered (a new leader recalls again through the next watch).
    pub(crate) fn lease_lost(&mut self) -> Settled {
        self.roots.clear();
        self.epoch = None;
        self.made.clear();
        self.recalls.clear();
        let mut s = Settled::default();
        if !self.holds_any() {
            // Without a lease the cache answers nothing, and starts afresh with the next.
            s.forget = self.forget_committed();
        }
        s
    }

    // ---- changes made from memory ----

    /// Make the inode `op` creates, numbered `ino`, beneath the delegation of `root`, with the
    /// namespace's own rules, and hold the create for commit.
    pub(crate) fn create(
        &mut self,
        root: InodeId,
        op: &MetaOp,
        ino: InodeId,
        now: Timestamp,
    ) -> Result<Attr, FsError> {
        if let MetaOp::Symlink { target, .. } = op {
            validate_symlink_target(target)?;
        }
        let (parent, name, inode) = Inode::created_by(op, ino, now)
            .ok_or_else(|| FsError::Invalid(format!("not a create: {op:?}")))?;
        validate_name(name)?;
        let attr = inode.attr.clone();
        let kind = attr.kind;
        let dir = self
            .nodes
            .get_mut(&parent)
            .ok_or_else(|| FsError::Invalid(format!("directory {parent} is not delegated")))?;
        let entries = dir.entries.as_mut().ok_or(FsError::NotDir)?;
        if entries.contains_key(name) {
            return Err(FsError::Exists);
        }
        entries.insert(name.to_vec(), ino);
        dir.inode
            .attr
            .touch_dir(i32::from(kind == FileKind::Directory), now);
        self.node_bytes += content_bytes(&inode.content);
        self.nodes.insert(
            ino,
            Node {
                inode,
                root,
                entries: (kind == FileKind::Directory).then(HashMap::new),
                known: Known::Whole,
            },
        );
        // The name is free here, so the create is exclusive (as the namespace requires of it).
        let mut held = op.clone();
        if let MetaOp::Mknod { exclusive, .. } = &mut held {
            *exclusive = true;
        }
        self.push(held, ino, now, Kind::Create);
        Ok(attr)
    }

    /// Apply `op`, a change of the delegated inode `ino`, and hold it. When the last change
    /// held is of the same inode too, the two become one: the inode as it now is. Nothing can
    /// come between them at the leader, so the result is the same.
    pub(crate) fn change(
        &mut self,
        ino: InodeId,
        op: &MetaOp,
        now: Timestamp,
    ) -> Result<Inode, FsError> {
        let node = self
            .nodes
            .get_mut(&ino)
            .filter(|n| n.known == Known::Whole)
            .ok_or_else(|| FsError::Invalid(format!("inode {ino} is not delegated")))?;
        let mut changed = node.inode.clone();
        changed.apply_change(op, now)?;
        let before = content_bytes(&node.inode.content);
        let found = node.inode.attr.version;
        node.inode = changed.clone();
        self.node_bytes = self.node_bytes - before + content_bytes(&changed.content);
        match self.held.back_mut() {
            Some(Held {
                op: last,
                ino: last_ino,
                bytes,
                found: Some(expect_version),
                ..
            }) if *last_ino == ino => {
                let whole = MetaOp::SetInode {
                    expect_version: *expect_version,
                    inode: changed.clone(),
                };
                let whole_bytes = change_bytes(&whole);
                *last = MetaOp::Local {
                    at: now,
                    ino: None,
                    op: Box::new(whole),
                };
                self.held_bytes = self.held_bytes - *bytes + whole_bytes;
                *bytes = whole_bytes;
            }
            _ => self.push(op.clone(), ino, now, Kind::Change(found)),
        }
        Ok(changed)
    }

    fn push(&mut self, op: MetaOp, ino: InodeId, at: Timestamp, kind: Kind) {
        let bytes = change_bytes(&op);
        let found = match kind {
            Kind::Change(found) => Some(found),
            Kind::Create | Kind::Entry => None,
        };
        let op = MetaOp::Local {
            at,
            ino: matches!(kind, Kind::Create).then_some(ino),
            op: Box::new(op),
        };
        self.held_bytes += bytes;
        self.held.push_back(Held {
            n: self.next_n,
            op,
            ino,
            bytes,
            found,
        });
        self.next_n += 1;
    }

    /// Remove `name` from `parent` (`rmdir`: a directory, else anything but one) with the
    /// namespace's rules, and hold the removal. None: the name's inode is not shown from
    /// memory (committed and forgotten), so the removal goes the usual way.
    pub(crate) fn remove(
        &mut self,
        parent: InodeId,
        name: &[u8],
        rmdir: bool,
        now: Timestamp,
    ) -> Option<Result<(), FsError>> {
        if let Err(e) = validate_name(name) {
            return Some(Err(e));
        }
        let entries = self.nodes.get(&parent)?.entries.as_ref()?;
        let Some(&ino) = entries.get(name) else {
            return Some(Err(FsError::NotFound));
        };
        let target = self.nodes.get(&ino)?;
        let is_dir = target.inode.attr.kind == FileKind::Directory;
        match (rmdir, is_dir) {
            (true, false) => return Some(Err(FsError::NotDir)),
            (false, true) => return Some(Err(FsError::IsDir)),
            (true, true) if !target.entries.as_ref()?.is_empty() => {
                return Some(Err(FsError::NotEmpty))
            }
            _ => {}
        }
        self.entries_mut(parent).remove(name);
        self.drop_link(ino, now);
        self.touch_dir(parent, if is_dir { -1 } else { 0 }, now);
        let op = match rmdir {
            true => MetaOp::Rmdir {
                parent,
                name: name.to_vec(),
            },
            false => MetaOp::Unlink {
                parent,
                name: name.to_vec(),
            },
        };
        self.push(op, parent, now, Kind::Entry);
        Some(Ok(()))
    }

    /// Rename with the namespace's rules, and hold it, when both directories lie beneath one
    /// delegation and every inode it touches is shown from memory. None: it goes the usual
    /// way (an exchange, a directory moved to another parent, which needs the namespace's
    /// loop check, or an inode not shown from memory).
    pub(crate) fn rename(&mut self, op: &MetaOp, now: Timestamp) -> Option<Result<(), FsError>> {
        let MetaOp::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
        } = op
        else {
            return Some(Err(FsError::Invalid(format!("not a rename: {op:?}"))));
        };
        let (parent, new_parent, flags) = (*parent, *new_parent, *flags);
        if flags & !RENAME_NOREPLACE != 0 {
            return None;
        }
        if let Err(e) = validate_name(name).and_then(|_| validate_name(new_name)) {
            return Some(Err(e));
        }
        let (from, to) = (self.nodes.get(&parent)?, self.nodes.get(&new_parent)?);
        if from.root != to.root {
            return None;
        }
        let (from, to) = (from.entries.as_ref()?, to.entries.as_ref()?);
        let Some(&src) = from.get(name) else {
            return Some(Err(FsError::NotFound));
        };
        let src_is_dir = self.nodes.get(&src)?.inode.attr.kind == FileKind::Directory;
        if src_is_dir && parent != new_parent {
            return None;
        }
        let dst = to.get(new_name).copied();
        let mut dst_is_dir = false;
        if let Some(dst) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Some(Err(FsError::Exists));
            }
            if dst == src {
                // Two names of one inode: POSIX says do nothing.
                return Some(Ok(()));
            }
            let d = self.nodes.get(&dst)?;
            dst_is_dir = d.inode.attr.kind == FileKind::Directory;
            match (src_is_dir, dst_is_dir) {
                (true, false) => return Some(Err(FsError::NotDir)),
                (false, true) => return Some(Err(FsError::IsDir)),
                (true, true) if !d.entries.as_ref()?.is_empty() => {
                    return Some(Err(FsError::NotEmpty))
                }
                _ => {}
            }
        }
        if let Some(dst) = dst {
            self.drop_link(dst, now);
            if dst_is_dir {
                self.touch_dir(new_parent, -1, now);
            }
        }
        self.entries_mut(parent).remove(name);
        self.entries_mut(new_parent).insert(new_name.to_vec(), src);
        if let Some(n) = self.nodes.get_mut(&src) {
            n.inode.attr.ctime = now;
            if n.known == Known::Named {
                n.known = Known::Shown;
            }
        }
        self.touch_dir(parent, 0, now);
        self.touch_dir(new_parent, 0, now);
        self.push(op.clone(), new_parent, now, Kind::Entry);
        Some(Ok(()))
    }

    /// The entries of `dir`, a directory shown from memory (checked by the caller).
    fn entries_mut(&mut self, dir: InodeId) -> &mut HashMap<Vec<u8>, InodeId> {
        self.nodes
            .get_mut(&dir)
            .and_then(|n| n.entries.as_mut())
            .expect("a directory shown from memory")
    }

    fn touch_dir(&mut self, dir: InodeId, nlink_delta: i32, now: Timestamp) {
        if let Some(n) = self.nodes.get_mut(&dir) {
            n.inode.attr.touch_dir(nlink_delta, now);
        }
    }

    /// One name of `ino` went: a directory, or a file's last link, is gone (as the
    /// namespace's `drop_link` does).
    fn drop_link(&mut self, ino: InodeId, now: Timestamp) {
        let Some(n) = self.nodes.get_mut(&ino) else {
            return;
        };
        // A node known by name keeps the link count and ctime this change leaves it with,
        // shown from here until the change is committed (an open handle or another name of it
        // may ask).
        if n.known != Known::Whole {
            n.inode.attr.nlink = n.inode.attr.nlink.saturating_sub(1);
            n.inode.attr.ctime = now;
            n.known = Known::Shown;
        } else if n.entries.is_some() || n.inode.attr.nlink <= 1 {
            let gone = self.nodes.remove(&ino).expect("present");
            self.node_bytes -= content_bytes(&gone.inode.content);
            self.roots.remove(&ino);
        } else {
            n.inode.attr.nlink -= 1;
            n.inode.attr.ctime = now;
        }
    }

    /// Too much is held: the change just made waits for a commit.
    pub(crate) fn full(&self) -> bool {
        self.held.len() >= HELD_OPS || self.held_bytes >= HELD_BYTES
    }

    /// Held changes not yet in a batch.
    pub(crate) fn waiting(&self) -> usize {
        self.held.len()
    }

    pub(crate) fn holds_any(&self) -> bool {
        !self.held.is_empty() || self.sent.is_some()
    }

    pub(crate) fn take_spare(&mut self) -> Option<InodeId> {
        self.spare.next()
    }

    /// Inode numbers `first..end` were reserved for creates here (kept unless some are left).
    pub(crate) fn add_spare(&mut self, first: InodeId, end: InodeId) {
        if self.spare.is_empty() {
            self.spare = first..end;
        }
    }

    /// A spare number taken and not used goes back.
    pub(crate) fn return_spare(&mut self, ino: InodeId) {
        self.spare = ino..self.spare.end.max(ino + 1);
    }

    // ---- what is shown from memory ----

    pub(crate) fn attr(&self, ino: InodeId) -> Option<Attr> {
        self.shown(ino).map(|n| n.inode.attr.clone())
    }

    pub(crate) fn inode(&self, ino: InodeId) -> Option<Inode> {
        self.whole(ino).map(|n| n.inode.clone())
    }

    fn whole(&self, ino: InodeId) -> Option<&Node> {
        self.nodes.get(&ino).filter(|n| n.known == Known::Whole)
    }

    /// A node whose attributes this client shows.
    fn shown(&self, ino: InodeId) -> Option<&Node> {
        self.nodes.get(&ino).filter(|n| n.known != Known::Named)
    }

    /// Every entry of the directory `dir` with its attributes, sorted by name, when all of
    /// them are shown from memory (None: list it the usual way).
    pub(crate) fn listing(&self, dir: InodeId) -> Option<Vec<DirEntry>> {
        let entries = self.nodes.get(&dir)?.entries.as_ref()?;
        let mut list = entries
            .iter()
            .map(|(name, ino)| {
                let attr = self.shown(*ino)?.inode.attr.clone();
                Some(DirEntry {
                    name: name.clone(),
                    attr,
                })
            })
            .collect::<Option<Vec<DirEntry>>>()?;
        list.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Some(list)
    }

    pub(crate) fn name(&self, parent: InodeId, name: &[u8]) -> Name {
        let Some(entries) = self.nodes.get(&parent).and_then(|n| n.entries.as_ref()) else {
            return Name::Elsewhere;
        };
        match entries.get(name) {
            None => Name::Absent,
            Some(ino) => match self.shown(*ino) {
                Some(n) => Name::Found(n.inode.attr.clone()),
                None => Name::Committed(*ino),
            },
        }
    }

    // ---- commits ----

    /// Whether the next batch needs a fresh id (none is waiting to go again).
    pub(crate) fn needs_id(&self) -> bool {
        self.sent.is_none() && !self.held.is_empty()
    }

    /// The batch to send now: the one that failed, again under its id, or the oldest held
    /// changes under `fresh`. None: nothing to send, a batch is in flight, or a new batch is
    /// due and `fresh` is None (a change was held since [`Holder::needs_id`] said no: ask
    /// again).
    pub(crate) fn next_batch(&mut self, fresh: Option<T>) -> Option<(OpId, Vec<MetaOp>)> {
        if self.sent.as_ref().is_some_and(|s| s.flying) {
            return None;
        }
        if self.sent.is_none() {
            let ticket = fresh?;
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(h) = self.held.front() {
                if !batch.is_empty() && (batch.len() >= BATCH_OPS || bytes + h.bytes > BATCH_BYTES)
                {
                    break;
                }
                bytes += h.bytes;
                self.held_bytes -= h.bytes;
                batch.push(self.held.pop_front().expect("front"));
            }
            if batch.is_empty() {
                return None;
            }
            self.sent = Some(Sent {
                ticket,
                batch,
                flying: false,
            });
        }
        let sent = self.sent.as_mut().expect("a batch to send");
        sent.flying = true;
        let ops = sent.batch.iter().map(|h| h.op.clone()).collect();
        Some((sent.ticket.id(), ops))
    }

    /// What the leader did with the batch in flight. For [`Answer::Refused`], returns its
    /// changes, to be sent one by one and settled with [`Holder::singles_answered`].
    pub(crate) fn batch_answered(&mut self, answer: Answer) -> (Settled, Vec<MetaOp>) {
        let Some(sent) = self.sent.as_mut().filter(|s| s.flying) else {
            return (Settled::default(), Vec::new());
        };
        match answer {
            Answer::Retry => {
                sent.flying = false;
                (Settled::default(), Vec::new())
            }
            // Still in flight (held) while its changes go one by one.
            Answer::Refused => (
                Settled::default(),
                sent.batch.iter().map(|h| h.op.clone()).collect(),
            ),
            Answer::Committed => {
                self.sent = None;
                (self.after_commit(), Vec::new())
            }
        }
    }

    /// The refused batch's changes went one by one: `results` in its order. Each refused
    /// change is lost (reported at the next fsync, close or fsyncdir). Returns the
    /// descriptions of the lost changes, for the mount log, with what it settled.
    pub(crate) fn singles_answered(
        &mut self,
        results: Vec<Result<(), FsError>>,
    ) -> (Settled, Vec<String>) {
        let Some(sent) = self.sent.take() else {
            return (Settled::default(), Vec::new());
        };
        let mut notes = Vec::new();
        for (h, r) in sent.batch.iter().zip(results) {
            if let Err(e) = r {
                let note = format!("{} could not be committed: {e}", describe(&h.op));
                self.lose(h, &note);
                notes.push(note);
            }
        }
        (self.after_commit(), notes)
    }

    fn after_commit(&mut self) -> Settled {
        let mut s = self.answered_recalls();
        if self.held.is_empty() {
            s.forget = self.forget_committed();
        }
        s
    }

    /// The number of the oldest change not settled yet.
    fn unsettled_from(&self) -> u64 {
        self.sent
            .as_ref()
            .and_then(|s| s.batch.first())
            .or(self.held.front())
            .map_or(self.next_n, |h| h.n)
    }

    fn answered_recalls(&mut self) -> Settled {
        let from = self.unsettled_from();
        let mut acks = Vec::new();
        self.recalls.retain(|r| {
            let done = r.upto <= from;
            if done {
                acks.push((r.watch, r.seq));
            }
            !done
        });
        Settled {
            acks,
            forget: HashSet::new(),
        }
    }

    /// After commits (fsync, unmount, a give-back): forget what given-back delegations
    /// showed once it is committed. Returns the directories forgotten.
    pub(crate) fn forget_if_due(&mut self, committed: bool) -> HashSet<InodeId> {
        if committed || self.forget_due {
            self.forget_committed()
        } else {
            HashSet::new()
        }
    }

    /// Forget inodes of given-back delegations whose changes are all committed, and files
    /// nothing is held for (the cache and the bricks answer for them now). A given-back
    /// subtree with changes still held stays whole, so none of its names is missing
    /// meanwhile; once forgotten, nothing of it answers any more (an unlink or rename made
    /// after the give-back must not meet the names it removed). Returns the directories
    /// forgotten: the cache must not answer for their names from what it knew before the
    /// delegation (nothing told it of the names made beneath).
    fn forget_committed(&mut self) -> HashSet<InodeId> {
        if self.held.is_empty() && self.sent.is_none() {
            // Every change is committed: what the leader answers for a named node is current
            // again, and one unlinked here is gone there.
            self.nodes
                .retain(|_, n| n.known != Known::Shown || n.inode.attr.nlink > 0);
            for n in self.nodes.values_mut() {
                if n.known == Known::Shown {
                    n.known = Known::Named;
                }
            }
        }
        let held: HashSet<InodeId> = self
            .held
            .iter()
            .chain(self.sent.iter().flat_map(|s| s.batch.iter()))
            .map(|h| h.ino)
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

    // ---- changes that could not commit ----

    fn lose(&mut self, h: &Held, note: &str) {
        if self.lost.len() >= LOST_MAX {
            return;
        }
        if let Some(parent) = created_in(&h.op) {
            self.lost.insert(parent, note.to_string());
        }
        self.lost.insert(h.ino, note.to_string());
    }

    /// A change of `ino` this client showed and could not commit, once.
    pub(crate) fn take_lost(&mut self, ino: InodeId) -> Option<String> {
        if self.lost.is_empty() {
            return None;
        }
        self.lost.remove(&ino)
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

#[cfg(test)]
mod tests;
