//! Namespace answers kept in memory while the client holds a lease from the metadata leader
//! (see [`mortar_proto::wire::WatchDown`] for the rules), so lookups, getattr, open and
//! getxattr need no round trip. Everything here is dropped when the lease or the watch ends.
//!
//! An answer is cached only if it cannot be older than an invalidation already received: each
//! answer carries the log index it reflects, each invalidation the index of its change, and an
//! answer older than a recent invalidation of the same item is not kept.

use mortar_proto::wire::{Inval, Stamp};
use mortar_proto::{Attr, BrickId, Content, Inode, InodeId};
use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Inodes (attributes, and whole inodes with small files' content) and names kept.
const INODES: usize = 32 * 1024;
const NAMES: usize = 64 * 1024;
/// File content and xattr bytes held in whole inodes: a cache full of inlined files stays small.
const WHOLE_BYTES: usize = 64 * 1024 * 1024;
/// Invalidations remembered per item before they are summarised by a floor index.
const RECENT: usize = 64 * 1024;
/// How long an answer is served from memory at most, invalidated or not: a safety net, so an
/// entry that some fault kept from being invalidated is stale for seconds, not for ever. Long
/// enough that refreshing the hot files of a docroot costs nothing noticeable.
pub const MAX_AGE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Inode(InodeId),
    Name(InodeId, Vec<u8>),
    /// Any name in the directory (for knowing the directory completely).
    Listing(InodeId),
}

impl Key {
    /// What this cache holds of what `i` names (nothing of the volume configuration).
    fn of(i: &Inval) -> Option<Key> {
        match i {
            Inval::Inode(ino) => Some(Key::Inode(*ino)),
            Inval::Entry(parent, name) => Some(Key::Name(*parent, name.clone())),
            Inval::Names(dir) => Some(Key::Listing(*dir)),
            Inval::Volume => None,
        }
    }
}

struct Cached {
    attr: Attr,
    inode: Option<Inode>,
    /// When it was cached (see [`MAX_AGE`]).
    at: Instant,
}

fn young(at: Instant) -> bool {
    at.elapsed() < MAX_AGE
}

impl Cached {
    fn bytes(&self) -> usize {
        self.inode.as_ref().map_or(0, |i| {
            let content = match &i.content {
                Content::Inline(b) => b.len(),
                Content::Chunks(m) => m.wire_bytes(),
                _ => 0,
            };
            content + i.xattr_bytes()
        })
    }
}

struct Lease {
    leader: BrickId,
    term: u64,
    until: Option<Instant>,
}

struct Inner {
    /// Bumped whenever cached state is thrown away, so answers to requests sent before do not
    /// come back in.
    generation: u64,
    lease: Option<Lease>,
    inodes: lru::LruCache<InodeId, Cached>,
    /// What the whole inodes in `inodes` hold, kept under [`WHOLE_BYTES`].
    whole_bytes: usize,
    /// Where each name leads (None: nowhere), and since when this was known.
    names: lru::LruCache<(InodeId, Vec<u8>), (Option<InodeId>, Instant)>,
    /// Directories whose every name is in `names` (this client made them and has seen every
    /// change to them since), and since when: a name not there does not exist.
    complete: HashMap<InodeId, Instant>,
    recent: HashMap<Key, u64>,
    /// Answers older than this are not cached (recent invalidations were forgotten).
    floor: u64,
    /// Directories listed whole lately (see [`MetaCache::should_list`]).
    listed: HashMap<InodeId, Instant>,
}

/// Taken before a request is sent; an answer is cached only under the same generation.
#[derive(Clone, Copy, Debug)]
pub struct Ticket(u64);

pub struct MetaCache {
    inner: Mutex<Inner>,
    /// Attribute, inode and name lookups answered here, and those that had to ask a brick.
    pub tally: crate::cache::Tally,
}

impl Default for MetaCache {
    fn default() -> Self {
        MetaCache {
            inner: Mutex::new(Inner {
                generation: 0,
                lease: None,
                inodes: lru::LruCache::new(NonZeroUsize::new(INODES).expect("nonzero")),
                whole_bytes: 0,
                names: lru::LruCache::new(NonZeroUsize::new(NAMES).expect("nonzero")),
                complete: HashMap::new(),
                recent: HashMap::new(),
                floor: 0,
                listed: HashMap::new(),
            }),
            tally: Default::default(),
        }
    }
}

impl Inner {
    fn serving(&self) -> bool {
        self.lease
            .as_ref()
            .and_then(|l| l.until)
            .is_some_and(|until| Instant::now() < until)
    }

    fn clear(&mut self) {
        self.generation += 1;
        self.inodes.clear();
        self.whole_bytes = 0;
        self.names.clear();
        self.complete.clear();
        self.recent.clear();
        self.floor = 0;
        self.listed.clear();
    }

    /// May an answer stamped `stamp` to a request sent under `ticket` be cached for `keys`?
    fn admits(&self, ticket: Ticket, stamp: Option<Stamp>, keys: &[Key]) -> bool {
        let (Some(stamp), Some(lease)) = (stamp, self.lease.as_ref()) else {
            return false;
        };
        ticket.0 == self.generation
            && stamp.leader == lease.leader
            && stamp.term == lease.term
            && stamp.index >= self.floor
            && keys
                .iter()
                .all(|k| self.recent.get(k).is_none_or(|i| *i <= stamp.index))
    }

    fn forget(&mut self, key: Key, index: u64) {
        match &key {
            Key::Inode(ino) => {
                self.drop_inode(*ino);
            }
            Key::Name(parent, name) => {
                self.names.pop(&(*parent, name.clone()));
                self.complete.remove(parent);
                self.note(Key::Listing(*parent), index);
            }
            Key::Listing(dir) => {
                self.forget_names_in(&HashSet::from([*dir]));
            }
        }
        self.note(key, index);
    }

    /// Drop every name cached in `dirs`, and that they are known completely (one pass).
    fn forget_names_in(&mut self, dirs: &HashSet<InodeId>) {
        for d in dirs {
            self.complete.remove(d);
        }
        let names: Vec<(InodeId, Vec<u8>)> = self
            .names
            .iter()
            .filter(|((parent, _), _)| dirs.contains(parent))
            .map(|(k, _)| k.clone())
            .collect();
        for k in names {
            self.names.pop(&k);
        }
    }

    fn note(&mut self, key: Key, index: u64) {
        let seen = self.recent.entry(key).or_insert(index);
        *seen = (*seen).max(index);
    }

    fn put_name(&mut self, parent: InodeId, name: &[u8], ino: Option<InodeId>) {
        let key = (parent, name.to_vec());
        if let Some((evicted, _)) = self.names.push(key.clone(), (ino, Instant::now())) {
            if evicted != key {
                // A complete directory must not lose a name silently.
                self.complete.remove(&evicted.0);
            }
        }
    }

    fn put_attr(&mut self, attr: &Attr, inode: Option<Inode>) {
        let inode = inode.or_else(|| {
            self.drop_inode(attr.ino)
                .and_then(|e| e.inode)
                .filter(|i| i.attr == *attr)
        });
        let entry = Cached {
            attr: attr.clone(),
            inode,
            at: Instant::now(),
        };
        let add = entry.bytes();
        while self.whole_bytes + add > WHOLE_BYTES {
            let Some((_, old)) = self.inodes.pop_lru() else {
                break;
            };
            self.whole_bytes -= old.bytes();
        }
        // Either the entry this one replaces or the least recently used one, evicted.
        if let Some((_, old)) = self.inodes.push(attr.ino, entry) {
            self.whole_bytes -= old.bytes();
        }
        self.whole_bytes += add;
    }

    fn drop_inode(&mut self, ino: InodeId) -> Option<Cached> {
        let old = self.inodes.pop(&ino)?;
        self.whole_bytes -= old.bytes();
        Some(old)
    }
}

impl MetaCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("meta cache lock")
    }

    /// A new watch with `leader` in `term`: start from nothing.
    pub fn watch_started(&self, leader: BrickId, term: u64) {
        let mut c = self.lock();
        c.clear();
        c.lease = Some(Lease {
            leader,
            term,
            until: None,
        });
    }

    /// The watch ended (or its lease could not be kept): serve nothing from memory.
    pub fn watch_ended(&self) {
        let mut c = self.lock();
        c.clear();
        c.lease = None;
    }

    pub fn renewed(&self, until: Instant) {
        if let Some(l) = self.lock().lease.as_mut() {
            l.until = Some(l.until.map_or(until, |u| u.max(until)));
        }
    }

    /// Whether answers are served from memory now.
    pub fn serving(&self) -> bool {
        self.lock().serving()
    }

    /// Whether a lease from `leader` in `term` is current.
    pub fn serving_under(&self, leader: BrickId, term: u64) -> bool {
        let c = self.lock();
        c.serving()
            && c.lease
                .as_ref()
                .is_some_and(|l| l.leader == leader && l.term == term)
    }

    pub fn ticket(&self) -> Option<Ticket> {
        let c = self.lock();
        c.lease.as_ref().map(|_| Ticket(c.generation))
    }

    /// A change at `index` touched `items`: drop them.
    pub fn invalidate(&self, index: u64, items: &[Inval]) {
        let mut c = self.lock();
        for key in items.iter().filter_map(Key::of) {
            c.forget(key, index);
        }
        if c.recent.len() > RECENT {
            // Summarise: nothing older than the newest invalidation may be cached any more.
            let newest = c.recent.values().copied().max().unwrap_or(0);
            c.recent.clear();
            c.floor = c.floor.max(newest);
        }
    }

    /// Forget every name cached in `dirs`, and that they are known completely: this client
    /// made names beneath them under a delegation, which its cache was not told of.
    pub fn forget_listings(&self, dirs: &HashSet<InodeId>) {
        if dirs.is_empty() {
            return;
        }
        self.lock().forget_names_in(dirs);
    }

    /// Our own change came back without saying where it stands: trust nothing cached.
    pub fn drop_all(&self) {
        self.lock().clear();
    }

    pub fn attr(&self, ino: InodeId) -> Option<Attr> {
        self.tally.record(self.cached_attr(ino))
    }

    fn cached_attr(&self, ino: InodeId) -> Option<Attr> {
        let mut c = self.lock();
        if !c.serving() {
            return None;
        }
        c.inodes
            .get(&ino)
            .filter(|e| young(e.at))
            .map(|e| e.attr.clone())
    }

    pub fn inode(&self, ino: InodeId) -> Option<Inode> {
        self.tally.record(self.cached_inode(ino))
    }

    /// The whole inode if cached, not counted as a lookup (for fetching ahead).
    pub fn cached_inode(&self, ino: InodeId) -> Option<Inode> {
        let mut c = self.lock();
        if !c.serving() {
            return None;
        }
        c.inodes
            .get(&ino)
            .filter(|e| young(e.at))
            .and_then(|e| e.inode.clone())
    }

    /// `Some(None)`: the name is known not to exist; `None`: not known here.
    pub fn name(&self, parent: InodeId, name: &[u8]) -> Option<Option<Attr>> {
        self.tally.record(self.cached_name(parent, name))
    }

    fn cached_name(&self, parent: InodeId, name: &[u8]) -> Option<Option<Attr>> {
        let mut c = self.lock();
        if !c.serving() {
            return None;
        }
        let known = match c.names.get(&(parent, name.to_vec())).copied() {
            Some((known, at)) if young(at) => known,
            Some(_) => return None,
            None if c.complete.get(&parent).is_some_and(|at| young(*at)) => None,
            None => return None,
        };
        match known {
            None => Some(None),
            Some(ino) => c
                .inodes
                .get(&ino)
                .filter(|e| young(e.at))
                .map(|e| Some(e.attr.clone())),
        }
    }

    pub fn put_attr(&self, ticket: Ticket, stamp: Option<Stamp>, attr: &Attr) {
        let mut c = self.lock();
        if c.admits(ticket, stamp, &[Key::Inode(attr.ino)]) {
            c.put_attr(attr, None);
        }
    }

    pub fn put_inode(&self, ticket: Ticket, stamp: Option<Stamp>, inode: &Inode) {
        let mut c = self.lock();
        if c.admits(ticket, stamp, &[Key::Inode(inode.attr.ino)]) {
            c.put_attr(&inode.attr, Some(inode.clone()));
        }
    }

    /// Whether a lookup that missed in `dir` should list the directory whole instead: yes
    /// under a lease, unless it was listed within [`MAX_AGE`] (a directory another client
    /// keeps changing is then looked up name by name, not relisted at every change).
    pub fn should_list(&self, dir: InodeId) -> bool {
        let mut c = self.lock();
        if !c.serving() {
            return false;
        }
        if c.listed.get(&dir).is_some_and(|at| young(*at)) {
            return false;
        }
        if c.listed.len() >= NAMES {
            c.listed.retain(|_, at| young(*at));
        }
        c.listed.insert(dir, Instant::now());
        true
    }

    /// The entries of `dir` as a [`mortar_proto::wire::Query::ListWhole`] answer gave them;
    /// `complete`: all of them, so a name not among them does not exist.
    pub fn put_listing(
        &self,
        ticket: Ticket,
        stamp: Option<Stamp>,
        dir: InodeId,
        entries: &[mortar_proto::wire::Listed],
        complete: bool,
    ) {
        let mut c = self.lock();
        if !c.admits(ticket, stamp, &[Key::Listing(dir)]) {
            return;
        }
        for e in entries {
            let keys = [Key::Name(dir, e.name.clone()), Key::Inode(e.attr.ino)];
            if !c.admits(ticket, stamp, &keys) {
                continue;
            }
            c.put_name(dir, &e.name, Some(e.attr.ino));
            c.put_attr(&e.attr, e.whole.clone());
        }
        // Known completely only if every entry went in (none was newer than the answer).
        if complete
            && entries.iter().all(|e| {
                c.names
                    .peek(&(dir, e.name.clone()))
                    .is_some_and(|(i, _)| *i == Some(e.attr.ino))
            })
        {
            c.complete.insert(dir, Instant::now());
        }
    }

    /// `parent`/`name` leads to `attr`, or (None) does not exist.
    pub fn put_name(
        &self,
        ticket: Ticket,
        stamp: Option<Stamp>,
        parent: InodeId,
        name: &[u8],
        attr: Option<&Attr>,
    ) {
        let mut c = self.lock();
        // A listing invalidation (a delegation granted elsewhere) also covers this name.
        let mut keys = vec![Key::Name(parent, name.to_vec()), Key::Listing(parent)];
        keys.extend(attr.map(|a| Key::Inode(a.ino)));
        if !c.admits(ticket, stamp, &keys) {
            return;
        }
        c.put_name(parent, name, attr.map(|a| a.ino));
        if let Some(a) = attr {
            c.put_attr(a, None);
        }
    }

    /// This client's own change at `stamp` touched `touched`: drop those, then record what the
    /// change itself tells. `made`: it created `name` in `parent` as `inode` (or, with only
    /// attributes known, as that attr); `removed`: it removed `name` from `parent`. A directory
    /// known completely stays so across our own changes to it (another client's change, even
    /// one announced later, still ends that).
    pub fn own_change(&self, ticket: Option<Ticket>, stamp: Stamp, touched: &[Inval], own: Own) {
        let mut c = self.lock();
        let complete_before: Option<(InodeId, Instant)> = match &own {
            Own::Made { parent, .. } | Own::Removed { parent, .. } => {
                c.complete.get(parent).map(|at| (*parent, *at))
            }
            Own::Other => None,
        };
        for key in touched.iter().filter_map(Key::of) {
            c.forget(key, stamp.index);
        }
        let Some(ticket) = ticket else { return };
        let (parent, name, made) = match own {
            Own::Made {
                parent,
                name,
                attr,
                inode,
                new_dir,
            } => {
                if !c.admits(ticket, Some(stamp), &[Key::Inode(attr.ino)]) {
                    return;
                }
                c.put_attr(&attr, inode.map(|i| *i));
                // Empty as of this change, unless a name in it was announced since.
                if new_dir && c.admits(ticket, Some(stamp), &[Key::Listing(attr.ino)]) {
                    c.complete.insert(attr.ino, Instant::now());
                }
                (parent, name, Some(attr.ino))
            }
            Own::Removed { parent, name } => (parent, name, None),
            Own::Other => return,
        };
        let keys = [Key::Name(parent, name.clone()), Key::Listing(parent)];
        if c.admits(ticket, Some(stamp), &keys) {
            c.put_name(parent, &name, made);
            if let Some((dir, since)) = complete_before.filter(|(d, _)| *d == parent) {
                c.complete.insert(dir, since);
            }
        }
    }
}

/// What a change by this client tells its cache beyond what it touched.
pub enum Own {
    Made {
        parent: InodeId,
        name: Vec<u8>,
        attr: Attr,
        /// The whole inode, when the change tells it (a fresh empty file).
        inode: Option<Box<Inode>>,
        /// A new, empty directory: known completely.
        new_dir: bool,
    },
    Removed {
        parent: InodeId,
        name: Vec<u8>,
    },
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortar_proto::{Content, FileKind, Timestamp};
    use std::time::Duration;

    fn attr(ino: InodeId, size: u64) -> Attr {
        Attr {
            ino,
            kind: FileKind::Regular,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size,
            nlink: 1,
            rdev: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            version: size,
        }
    }

    fn stamp(index: u64) -> Option<Stamp> {
        Some(Stamp {
            leader: 7,
            term: 3,
            index,
        })
    }

    fn leased() -> MetaCache {
        let c = MetaCache::default();
        c.watch_started(7, 3);
        c.renewed(Instant::now() + Duration::from_secs(60));
        c
    }

    #[test]
    fn whole_inodes_are_kept_within_a_byte_budget() {
        let c = leased();
        let t = c.ticket().unwrap();
        let body = vec![7u8; 64 * 1024];
        let files = 2 * WHOLE_BYTES / body.len();
        for ino in 2..2 + files as InodeId {
            let inode = Inode {
                attr: attr(ino, body.len() as u64),
                content: Content::Inline(body.clone()),
                xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
            };
            c.put_inode(t, stamp(5), &inode);
            // Replacing an entry accounts for the one it replaces.
            c.put_inode(t, stamp(5), &inode);
        }
        let held = c.lock().whole_bytes;
        assert!(held <= WHOLE_BYTES, "{held} bytes held");
        assert!(held > WHOLE_BYTES / 2, "{held} bytes held");
        let last = 1 + files as InodeId;
        assert_eq!(
            c.inode(last).map(|i| i.content),
            Some(Content::Inline(body))
        );
        assert_eq!(c.inode(2), None, "the oldest went first");
        c.invalidate(6, &[Inval::Inode(last)]);
        let recount: usize = c.lock().inodes.iter().map(|(_, e)| e.bytes()).sum();
        assert_eq!(c.lock().whole_bytes, recount);
    }

    /// Make everything cached `by` older.
    fn age(c: &MetaCache, by: Duration) {
        let mut c = c.lock();
        for (_, e) in c.inodes.iter_mut() {
            e.at -= by;
        }
        for (_, (_, at)) in c.names.iter_mut() {
            *at -= by;
        }
        for at in c.complete.values_mut() {
            *at -= by;
        }
    }

    #[test]
    fn nothing_is_served_past_the_age_bound_even_under_a_lease() {
        let c = leased();
        let t = c.ticket().unwrap();
        c.put_attr(t, stamp(5), &attr(2, 1));
        c.put_name(t, stamp(5), 10, b"missing", None);
        c.own_change(
            Some(t),
            stamp(6).unwrap(),
            &[],
            Own::Made {
                parent: 1,
                name: b"new".to_vec(),
                attr: Attr {
                    kind: FileKind::Directory,
                    ..attr(30, 0)
                },
                inode: None,
                new_dir: true,
            },
        );
        assert_eq!(
            c.name(30, b"anything"),
            Some(None),
            "a new directory is complete"
        );
        age(&c, MAX_AGE - Duration::from_secs(1));
        assert!(c.attr(2).is_some());
        assert_eq!(c.name(10, b"missing"), Some(None));
        age(&c, Duration::from_secs(1));
        assert_eq!(c.attr(2), None);
        assert_eq!(c.name(10, b"missing"), None, "a negative entry expires too");
        assert_eq!(
            c.name(30, b"anything"),
            None,
            "and so does a complete listing"
        );
    }

    #[test]
    fn a_whole_listing_answers_every_name_until_the_directory_changes() {
        use mortar_proto::wire::Listed;
        let c = leased();
        let t = c.ticket().unwrap();
        let body = Inode {
            attr: attr(11, 5),
            content: Content::Inline(b"hello".to_vec()),
            xattrs: Vec::new(),
        };
        let entries = vec![
            Listed {
                name: b"a".to_vec(),
                attr: attr(11, 5),
                whole: Some(body.clone()),
            },
            Listed {
                name: b"b".to_vec(),
                attr: attr(12, 1),
                whole: None,
            },
        ];
        assert!(c.should_list(10));
        assert!(!c.should_list(10), "listed lately");
        c.put_listing(t, stamp(5), 10, &entries, true);
        assert_eq!(c.name(10, b"a").unwrap().unwrap().ino, 11);
        assert_eq!(c.inode(11), Some(body));
        assert_eq!(
            c.name(10, b"zzz"),
            Some(None),
            "complete: a missing name does not exist"
        );
        // Another client's change in the directory ends that.
        c.invalidate(6, &[Inval::Entry(10, b"zzz".to_vec())]);
        assert_eq!(c.name(10, b"zzz"), None);
        assert_eq!(c.name(10, b"b").unwrap().unwrap().ino, 12);
        // An answer older than an invalidation of the directory is not kept.
        c.put_listing(t, stamp(5), 10, &entries, true);
        assert_eq!(c.name(10, b"zzz"), None);
        // A partial listing tells only the names it has.
        c.put_listing(t, stamp(7), 20, &entries, false);
        assert_eq!(c.name(20, b"a").unwrap().unwrap().ino, 11);
        assert_eq!(c.name(20, b"zzz"), None);
    }

    #[test]
    fn nothing_is_served_without_a_live_lease() {
        let c = MetaCache::default();
        c.watch_started(7, 3);
        let t = c.ticket().unwrap();
        c.put_attr(t, stamp(5), &attr(2, 1));
        assert_eq!(c.attr(2), None, "no renewal yet");
        c.renewed(Instant::now() + Duration::from_secs(60));
        assert_eq!(c.attr(2).map(|a| a.size), Some(1));
        c.watch_ended();
        assert_eq!(c.attr(2), None);
    }

    #[test]
    fn an_answer_older_than_an_invalidation_is_not_kept() {
        let c = leased();
        let t = c.ticket().unwrap();
        // The change at 10 was announced before the answer read at 9 arrived.
        c.invalidate(10, &[Inval::Inode(2)]);
        c.put_attr(t, stamp(9), &attr(2, 1));
        assert_eq!(c.attr(2), None);
        c.put_attr(t, stamp(10), &attr(2, 2));
        assert_eq!(c.attr(2).map(|a| a.size), Some(2));
        c.invalidate(11, &[Inval::Inode(2)]);
        assert_eq!(c.attr(2), None);
    }

    #[test]
    fn a_delegation_elsewhere_drops_every_name_cached_in_the_directory() {
        let c = leased();
        let t = c.ticket().unwrap();
        c.put_name(t, stamp(5), 10, b"gone", None);
        c.put_name(t, stamp(5), 10, b"here", Some(&attr(11, 1)));
        c.put_name(t, stamp(5), 20, b"other", None);
        assert_eq!(c.name(10, b"gone"), Some(None));
        // Another client was delegated directory 10 at index 6.
        c.invalidate(6, &[Inval::Names(10)]);
        assert_eq!(c.name(10, b"gone"), None, "asked of the leader again");
        assert_eq!(c.name(10, b"here"), None);
        assert_eq!(
            c.name(20, b"other"),
            Some(None),
            "other directories keep theirs"
        );
        // A lookup answered before the grant does not bring the name back.
        c.put_name(t, stamp(5), 10, b"gone", None);
        assert_eq!(c.name(10, b"gone"), None);
        c.put_name(t, stamp(6), 10, b"gone", None);
        assert_eq!(c.name(10, b"gone"), Some(None));
    }

    #[test]
    fn answers_from_another_leader_or_an_older_watch_are_not_kept() {
        let c = leased();
        let old = c.ticket().unwrap();
        let other = Some(Stamp {
            leader: 8,
            term: 3,
            index: 5,
        });
        c.put_attr(old, other, &attr(2, 1));
        assert_eq!(c.attr(2), None, "another leader");
        c.watch_started(7, 4);
        c.renewed(Instant::now() + Duration::from_secs(60));
        let new_term = Some(Stamp {
            leader: 7,
            term: 4,
            index: 6,
        });
        c.put_attr(old, new_term, &attr(2, 1));
        assert_eq!(c.attr(2), None, "ticket from before the new watch");
        c.put_attr(c.ticket().unwrap(), new_term, &attr(2, 1));
        assert!(c.attr(2).is_some());
    }

    #[test]
    fn names_negative_and_positive_follow_entry_invalidations() {
        let c = leased();
        let t = c.ticket().unwrap();
        c.put_name(t, stamp(5), 1, b"a", None);
        assert_eq!(c.name(1, b"a"), Some(None));
        c.invalidate(6, &[Inval::Entry(1, b"a".to_vec())]);
        assert_eq!(c.name(1, b"a"), None);
        c.put_name(t, stamp(6), 1, b"a", Some(&attr(9, 3)));
        assert_eq!(c.name(1, b"a").flatten().map(|a| a.ino), Some(9));
        // The inode's own invalidation makes the name unusable too (its attributes are gone).
        c.invalidate(7, &[Inval::Inode(9)]);
        assert_eq!(c.name(1, b"a"), None);
    }

    #[test]
    fn a_whole_inode_survives_only_while_its_attributes_match() {
        let c = leased();
        let t = c.ticket().unwrap();
        let i = Inode {
            attr: attr(4, 2),
            content: Content::Inline(b"hi".to_vec()),
            xattrs: Vec::new(),
        };
        c.put_inode(t, stamp(5), &i);
        assert!(c.inode(4).is_some());
        c.put_attr(t, stamp(5), &attr(4, 2));
        assert!(c.inode(4).is_some(), "same attributes keep the content");
        c.put_attr(t, stamp(6), &attr(4, 3));
        assert!(c.inode(4).is_none(), "new attributes drop it");
    }

    fn made(parent: InodeId, name: &[u8], a: Attr, new_dir: bool) -> Own {
        Own::Made {
            parent,
            name: name.to_vec(),
            attr: a,
            inode: None,
            new_dir,
        }
    }

    #[test]
    fn a_directory_made_here_is_known_completely_until_another_client_changes_it() {
        let c = leased();
        let t = c.ticket();
        let d = Attr {
            kind: FileKind::Directory,
            ..attr(10, 0)
        };
        let st = |index| stamp(index).unwrap();
        c.own_change(
            t,
            st(5),
            &[Inval::Entry(1, b"d".to_vec()), Inval::Inode(10)],
            made(1, b"d", d, true),
        );
        assert_eq!(c.name(10, b"x"), Some(None), "a new directory is empty");
        let x = attr(11, 0);
        c.own_change(
            t,
            st(6),
            &[
                Inval::Entry(10, b"x".to_vec()),
                Inval::Inode(11),
                Inval::Inode(10),
            ],
            made(10, b"x", x, false),
        );
        assert_eq!(c.name(10, b"x").flatten().map(|a| a.ino), Some(11));
        assert_eq!(
            c.name(10, b"y"),
            Some(None),
            "our own create keeps it complete"
        );
        c.own_change(
            t,
            st(7),
            &[Inval::Entry(10, b"x".to_vec()), Inval::Inode(10)],
            Own::Removed {
                parent: 10,
                name: b"x".to_vec(),
            },
        );
        assert_eq!(c.name(10, b"x"), Some(None));
        // Another client adds a name: the directory is no longer known completely.
        c.invalidate(8, &[Inval::Entry(10, b"z".to_vec()), Inval::Inode(10)]);
        assert_eq!(c.name(10, b"y"), None);
        // A directory whose first foreign entry was announced before our mkdir's answer
        // arrived is never taken as empty.
        c.invalidate(10, &[Inval::Entry(20, b"w".to_vec())]);
        let e = Attr {
            kind: FileKind::Directory,
            ..attr(20, 0)
        };
        c.own_change(
            t,
            st(9),
            &[Inval::Entry(1, b"e".to_vec()), Inval::Inode(20)],
            made(1, b"e", e, true),
        );
        assert_eq!(c.name(20, b"w"), None);
    }
}
