//! The coherence protocol, the leader's side, as a state machine: watch sessions and their
//! leases, invalidations and their acknowledgements, delegations and their recalls. Pure code
//! driven by events and a clock (every method takes `now`); [`crate::watch`] does the I/O
//! around it (QUIC streams, Raft's quorum checks) and sends what it returns.
//!
//! The rules, and why:
//! - **Every applied change invalidates every other watcher** ([`Coherence::applied`]), at
//!   apply, whatever happens to the request that proposed it: a change committed after its
//!   request gave up is still announced. The proposer's own watch is skipped only while its
//!   request is waiting to carry the change's outcome back ([`Coherence::await_outcome`]).
//! - **A change is answered once no cache serves the old state** ([`Coherence::settled`]):
//!   every watcher sent its invalidation acknowledged it or holds no lease any more.
//! - **A lease is extended only to a watcher that acknowledged everything sent to it before
//!   it asked** ([`Coherence::renew`]); so a watcher that stops acknowledging (frozen, slow,
//!   cut off) loses its lease within one lease, and from then on no writer waits for it.
//! - **A new leader answers no change until leases its predecessors granted have run out**
//!   ([`NEW_TERM_WAIT`]: a lease less the leader lease its electors waited out), and a watch
//!   that ended keeps blocking changes until its lease has.
//! - **A delegated directory is changed by its holder alone**: a request naming it from another
//!   client waits for a recall (the holder commits and acknowledges), or, when the holder does
//!   not answer in time, for the holder's lease to run out.
//! - **A delegation outlives its watch** (the leader changed, the holder's connection broke):
//!   delegations are recorded in the Raft log, so a new leader [adopts](Coherence::adopt)
//!   them; one without a watch is kept for [`RECLAIM_GRACE`], during which requests naming it
//!   wait for the holder to watch again (then it is recalled as usual, the holder committing
//!   what it still holds first). Only then may another client look: no window in which it
//!   sees less than the holder showed.

use mortar_proto::wire::{Inval, OpId, WatchDown, WATCH_LEASE};
use mortar_proto::{FsError, InodeId};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long a watcher may leave a message unacknowledged before its watch is closed. Its lease
/// ends long before (no renewal is granted meanwhile), so this bounds only the memory a silent
/// watcher costs, not how long anyone waits for it.
pub const GIVE_UP: Duration = Duration::from_secs(10);
/// How long the leader waits for a delegation's holder to commit what it made under it and
/// give it back; a holder that takes longer has its watch closed, and the request waits for
/// its lease to run out instead.
pub const RECALL_WAIT: Duration = Duration::from_secs(5);

/// How long a delegation whose holder has no watch (a new leader, a broken connection) is kept
/// for the holder to watch again and give it back: long enough to notice a dead leader (two
/// leases without renewal), find the new one and open a watch on it.
pub const RECLAIM_GRACE: Duration = Duration::from_secs(10);

pub use mortar_proto::timing::{LEASE_MARGIN, NEW_TERM_WAIT};

// A silent watcher's lease must have ended before it is given up on (closing its watch is
// then only bookkeeping), and a recall must outlast a lease's worth of commits.
const _: () = assert!(GIVE_UP.as_millis() > 2 * LEASE_MARGIN.as_millis());
const _: () = assert!(RECALL_WAIT.as_millis() > LEASE_MARGIN.as_millis());
const _: () = assert!(GIVE_UP.as_millis() > RECALL_WAIT.as_millis());
const _: () = assert!(RECLAIM_GRACE.as_millis() > 4 * WATCH_LEASE.as_millis());

pub type SessionId = u64;

/// What a message waiting for its acknowledgement asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Asked {
    /// Drop what the change at `index` touched.
    Invalidate { index: u64 },
    /// Give back the delegation of `dir`.
    Recall { dir: InodeId },
}

#[derive(Clone, Copy, Debug)]
struct Ask {
    what: Asked,
    sent: Instant,
    /// When the watch is closed if this is still unacknowledged.
    deadline: Instant,
}

struct Session {
    client: u128,
    /// Until when the client may use its cache, as far as this leader granted.
    lease_until: Instant,
    /// Messages sent and not acknowledged yet, by sequence number.
    asks: BTreeMap<u64, Ask>,
}

impl Session {
    fn leased(&self, now: Instant) -> bool {
        self.lease_until > now
    }
}

/// A directory delegated to one client.
struct Delegation {
    /// The holder's watch here; None while it has none (see [`RECLAIM_GRACE`]).
    session: Option<SessionId>,
    client: u128,
    parent: InodeId,
    /// Without a watch: when the delegation is given up on.
    reclaim_by: Instant,
}

/// A delegation as recorded in the namespace, for [`Coherence::adopt`].
pub use crate::namespace::Recorded;

/// What a request names, for recalling delegations before it is answered.
#[derive(Debug, Default)]
pub struct Named {
    /// Inodes it reads or changes, including directories it looks up or creates in.
    pub inos: Vec<InodeId>,
    /// Directories whose listing it reads (a listing shows each entry's attributes).
    pub listed: Vec<InodeId>,
    /// It reads or changes the whole namespace (snapshots): every delegation is recalled,
    /// and none is granted while it is in flight.
    pub everything: bool,
}

/// How a request naming everything is counted in flight (no inode has number 0).
const EVERYTHING: InodeId = 0;

/// What [`Coherence::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Go ahead: the request is counted in flight for these inodes until
    /// [`Coherence::done`] is called with them.
    Go(Vec<InodeId>),
    /// Send these recalls, then wait for an acknowledgement or until the instant.
    Wait(Vec<(SessionId, WatchDown)>, Instant),
}

/// The leader's coherence state. Methods are events; what to send comes back as
/// `(session, message)` pairs, and sessions to close as ids.
#[derive(Default)]
pub struct Coherence {
    sessions: BTreeMap<SessionId, Session>,
    next_session: SessionId,
    next_seq: u64,
    delegations: HashMap<InodeId, Delegation>,
    /// The delegated directories in each parent (a request naming an entry of the parent, or
    /// listing it, may concern them).
    delegated_in: HashMap<InodeId, HashSet<InodeId>>,
    /// Delegations whose holder was given up on, until the holder's lease ends: nothing may
    /// touch them before (the holder may still be changing them from memory).
    lapsed: HashMap<InodeId, Instant>,
    /// Requests being answered, by the inodes they name: no delegation of those is granted
    /// until they are done, so a holder never misses a change it did not make.
    in_flight: HashMap<InodeId, usize>,
    /// Changes whose request waits to carry their outcome to their client (which then needs
    /// no invalidation): counted by id.
    awaiting: HashMap<(u128, u64), usize>,
    /// Leases of watches that ended while their client may still be using them.
    departed: Vec<Instant>,
    /// The term this brick leads in and when it first saw itself leading it.
    leading: Option<(u64, Instant)>,
    /// The term whose recorded delegations were adopted.
    adopted: Option<u64>,
    /// Delegations ended since [`Coherence::take_ended`]: to be recorded as ended.
    ended: Vec<InodeId>,
}

impl Coherence {
    /// A watch opened by `client`; it holds no lease until its first renewal.
    pub fn open(&mut self, client: u128, now: Instant) -> SessionId {
        self.next_session += 1;
        let sid = self.next_session;
        self.sessions.insert(
            sid,
            Session {
                client,
                lease_until: now,
                asks: BTreeMap::new(),
            },
        );
        // Its delegations without a watch are its again (to be recalled through it).
        for d in self.delegations.values_mut() {
            if d.client == client && d.session.is_none() {
                d.session = Some(sid);
            }
        }
        sid
    }

    /// Leading in `term`: start from the delegations recorded in the namespace (once per
    /// term), each waiting for its holder to watch here.
    pub fn adopt(&mut self, term: u64, recorded: &[Recorded], now: Instant) {
        if self.adopted == Some(term) {
            return;
        }
        self.adopted = Some(term);
        self.delegations.clear();
        self.delegated_in.clear();
        for r in recorded {
            let session = self
                .sessions
                .iter()
                .find(|(_, s)| s.client == r.client)
                .map(|(sid, _)| *sid);
            self.delegations.insert(
                r.dir,
                Delegation {
                    session,
                    client: r.client,
                    parent: r.parent,
                    reclaim_by: now + RECLAIM_GRACE,
                },
            );
            self.delegated_in.entry(r.parent).or_default().insert(r.dir);
        }
    }

    /// Whether the recorded delegations of `term` were adopted.
    pub fn adopted(&self, term: u64) -> bool {
        self.adopted == Some(term)
    }

    /// Delegations that ended since the last call, to be recorded as ended.
    pub fn take_ended(&mut self) -> Vec<InodeId> {
        std::mem::take(&mut self.ended)
    }

    /// The watch `sid` ended (its stream closed). Its delegations wait [`RECLAIM_GRACE`] for
    /// it to watch again; its lease, while it lasts, still holds changes back.
    pub fn close(&mut self, sid: SessionId, now: Instant) {
        let Some(s) = self.sessions.remove(&sid) else {
            return;
        };
        for d in self.delegations.values_mut() {
            if d.session == Some(sid) {
                d.session = None;
                d.reclaim_by = now + RECLAIM_GRACE;
            }
        }
        if s.leased(now) {
            self.departed.push(s.lease_until);
        }
    }

    /// The client of `sid` said goodbye, having committed everything: its delegations end
    /// now, with nothing to wait out.
    pub fn bye(&mut self, sid: SessionId) {
        for dir in self.held_by(sid) {
            self.undelegate(dir);
        }
    }

    /// The directories delegated through watch `sid`.
    fn held_by(&self, sid: SessionId) -> Vec<InodeId> {
        self.delegations
            .iter()
            .filter(|(_, d)| d.session == Some(sid))
            .map(|(dir, _)| *dir)
            .collect()
    }

    /// The watch `sid` was given up on (a message unacknowledged too long): its delegations
    /// end, waited out until its lease has, and the watch closes.
    fn give_up(&mut self, sid: SessionId, now: Instant) {
        let lease_until = self.sessions.get(&sid).map(|s| s.lease_until);
        for dir in self.held_by(sid) {
            self.undelegate(dir);
            if let Some(until) = lease_until.filter(|u| *u > now) {
                self.lapsed.insert(dir, until);
            }
        }
        self.close(sid, now);
    }

    pub fn is_open(&self, sid: SessionId) -> bool {
        self.sessions.contains_key(&sid)
    }

    /// `sid` asked at `asked` for its lease to be extended and this leader's leadership was
    /// confirmed since. Granted only when it acknowledged every invalidation sent to it
    /// before it asked: else its cache may still hold what they named. (A recall being
    /// answered does not stop renewals: the holder commits under its lease.)
    pub fn renew(&mut self, sid: SessionId, asked: Instant) -> bool {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return false;
        };
        let stale = |a: &Ask| matches!(a.what, Asked::Invalidate { .. }) && a.sent <= asked;
        if s.asks.values().any(stale) {
            return false;
        }
        s.lease_until = s.lease_until.max(asked + LEASE_MARGIN);
        true
    }

    /// A request is about to propose the change `once`, and will carry its outcome back to its
    /// client (until [`Coherence::outcome_sent`]).
    pub fn await_outcome(&mut self, once: OpId) {
        *self.awaiting.entry((once.client, once.seq)).or_default() += 1;
    }

    pub fn outcome_sent(&mut self, once: OpId) {
        let key = (once.client, once.seq);
        if let Some(n) = self.awaiting.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.awaiting.remove(&key);
            }
        }
    }

    /// The change `once` at log `index` was applied and touched `items`: every watcher drops
    /// them, but its own client's while its request waits to tell it.
    pub fn applied(
        &mut self,
        index: u64,
        once: Option<OpId>,
        items: &[Inval],
        now: Instant,
    ) -> Vec<(SessionId, WatchDown)> {
        let origin = once
            .filter(|o| self.awaiting.contains_key(&(o.client, o.seq)))
            .map(|o| o.client);
        self.announce(origin, index, items, now)
    }

    /// Tell every watcher but `origin`'s to drop `items`, as of log `index`.
    pub fn announce(
        &mut self,
        origin: Option<u128>,
        index: u64,
        items: &[Inval],
        now: Instant,
    ) -> Vec<(SessionId, WatchDown)> {
        if items.is_empty() {
            return Vec::new();
        }
        let targets: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| Some(s.client) != origin)
            .map(|(sid, _)| *sid)
            .collect();
        targets
            .into_iter()
            .map(|sid| {
                let seq = self.ask(sid, Asked::Invalidate { index }, GIVE_UP, now);
                let msg = WatchDown::Invalidate {
                    seq,
                    index,
                    items: items.to_vec(),
                };
                (sid, msg)
            })
            .collect()
    }

    fn ask(&mut self, sid: SessionId, what: Asked, wait: Duration, now: Instant) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.asks.insert(
                seq,
                Ask {
                    what,
                    sent: now,
                    deadline: now + wait,
                },
            );
        }
        seq
    }

    /// `sid` acknowledged message `seq`.
    pub fn ack(&mut self, sid: SessionId, seq: u64) {
        let Some(ask) = self
            .sessions
            .get_mut(&sid)
            .and_then(|s| s.asks.remove(&seq))
        else {
            return;
        };
        if let Asked::Recall { dir } = ask.what {
            if self
                .delegations
                .get(&dir)
                .is_some_and(|d| d.session == Some(sid))
            {
                self.undelegate(dir);
            }
        }
    }

    /// The earliest instant at which [`Coherence::expire`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.sessions
            .values()
            .flat_map(|s| s.asks.values().map(|a| a.deadline))
            .min()
    }

    /// Close the watches that left a message unacknowledged past its deadline; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<SessionId> {
        let late: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.asks.values().any(|a| a.deadline <= now))
            .map(|(sid, _)| *sid)
            .collect();
        for sid in &late {
            self.give_up(*sid, now);
        }
        late
    }

    /// May a change at log `index` be answered now, by a leader in `term`? Err: not before
    /// the instant (or an acknowledgement, whichever comes first).
    pub fn settled(&mut self, term: u64, index: u64, now: Instant) -> Result<(), Instant> {
        let since = match self.leading {
            Some((t, since)) if t == term => since,
            _ => {
                self.leading = Some((term, now));
                now
            }
        };
        self.departed.retain(|until| *until > now);
        let blockers = self
            .departed
            .iter()
            .copied()
            .chain(std::iter::once(since + NEW_TERM_WAIT).filter(|t| *t > now))
            .chain(
                self.sessions
                    .values()
                    .filter(|s| s.leased(now))
                    .filter_map(|s| {
                        // An unacknowledged invalidation of this change or an earlier one holds the
                        // change back while the watcher may still serve from its cache.
                        s.asks
                            .values()
                            .any(|a| matches!(a.what, Asked::Invalidate { index: i } if i <= index))
                            .then_some(s.lease_until)
                    }),
            );
        match blockers.min() {
            None => Ok(()),
            Some(t) => Err(t),
        }
    }

    /// Delegate the directory `dir` to `client`'s watch. `empty_in` reads the applied
    /// namespace (the directory's parent when it can be delegated: empty, or listed whole to
    /// the holder); it is asked while no request naming `dir` is being answered, so nothing
    /// lands in it unseen by the holder.
    pub fn delegate(
        &mut self,
        client: u128,
        dir: InodeId,
        now: Instant,
        empty_in: impl FnOnce() -> Result<Option<InodeId>, FsError>,
    ) -> Result<InodeId, FsError> {
        let busy = |why: &str| Err(FsError::Busy(format!("no delegation: {why}")));
        let Some((&sid, _)) = self
            .sessions
            .iter()
            .find(|(_, s)| s.client == client && s.leased(now))
        else {
            return busy("the client holds no lease from this leader");
        };
        if let Some(d) = self.delegations.get_mut(&dir) {
            return if d.client == client {
                d.session = Some(sid);
                Ok(d.parent)
            } else {
                busy("delegated to another client")
            };
        }
        if [dir, EVERYTHING]
            .iter()
            .any(|d| self.in_flight.get(d).is_some_and(|n| *n > 0))
        {
            return busy("the directory is being changed");
        }
        if self.lapsed.get(&dir).is_some_and(|until| *until > now) {
            return busy("its last holder may still be changing it");
        }
        let Some(parent) = empty_in()? else {
            return busy("not a directory it can be given with (empty, or small enough)");
        };
        self.delegations.insert(
            dir,
            Delegation {
                session: Some(sid),
                client,
                parent,
                reclaim_by: now,
            },
        );
        self.delegated_in.entry(parent).or_default().insert(dir);
        Ok(parent)
    }

    /// A grant that could not be recorded is withdrawn.
    pub fn withdraw(&mut self, dir: InodeId) {
        self.undelegate(dir);
    }

    /// Whether a directory delegated to someone has `parent` as its parent (so a request
    /// naming an entry of `parent` must find out whether that entry is the directory).
    pub fn delegates_in(&self, parent: InodeId) -> bool {
        self.delegated_in.contains_key(&parent)
    }

    /// Before a request from `origin` naming `named` is answered: every delegation it names
    /// that another client holds is recalled, and waited for.
    pub fn admit(&mut self, origin: Option<u128>, named: &Named, now: Instant) -> Admit {
        self.lapsed.retain(|_, until| *until > now);
        let listed = named
            .listed
            .iter()
            .filter_map(|p| self.delegated_in.get(p))
            .flatten();
        let everything = named
            .everything
            .then(|| self.delegations.keys())
            .into_iter()
            .flatten();
        let mut dirs: Vec<InodeId> = named
            .inos
            .iter()
            .chain(listed)
            .chain(everything)
            .copied()
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        let mut wake: Option<Instant> = None;
        let mut sends = Vec::new();
        let mut later = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        let mut to_recall = Vec::new();
        let mut expired = Vec::new();
        for dir in &dirs {
            if let Some(until) = self.lapsed.get(dir) {
                later(*until);
            }
            let Some(d) = self.delegations.get(dir) else {
                continue;
            };
            if Some(d.client) == origin {
                continue;
            }
            let Some(sid) = d.session else {
                // Its holder has no watch here yet: wait for it, within the grace period.
                if d.reclaim_by > now {
                    later(d.reclaim_by);
                } else {
                    expired.push(*dir);
                }
                continue;
            };
            let pending = self.sessions.get(&sid).and_then(|s| {
                s.asks
                    .values()
                    .find(|a| a.what == Asked::Recall { dir: *dir })
                    .map(|a| a.deadline)
            });
            match pending {
                Some(deadline) => later(deadline),
                None => to_recall.push((*dir, sid)),
            }
        }
        for dir in expired {
            tracing::warn!(
                dir,
                "a delegation's holder did not come back within the grace period; it ends"
            );
            self.undelegate(dir);
        }
        // A whole delegated tree is recalled at once: a reader's first look at a freshly
        // deployed tree then costs one round trip to the holder, not one per directory.
        let mut family: Vec<(InodeId, SessionId)> = to_recall
            .into_iter()
            .flat_map(|(dir, sid)| self.family(dir).into_iter().map(move |d| (d, sid)))
            .collect();
        family.sort_unstable();
        family.dedup();
        for (dir, sid) in family {
            let asked = self
                .sessions
                .get(&sid)
                .is_some_and(|s| s.asks.values().any(|a| a.what == Asked::Recall { dir }));
            if asked {
                continue;
            }
            let seq = self.ask(sid, Asked::Recall { dir }, RECALL_WAIT, now);
            later(now + RECALL_WAIT);
            sends.push((sid, WatchDown::Recall { seq, dir }));
        }
        match wake {
            Some(t) => Admit::Wait(sends, t),
            None => {
                let mut inos = named.inos.clone();
                if named.everything {
                    inos.push(EVERYTHING);
                }
                for ino in &inos {
                    *self.in_flight.entry(*ino).or_default() += 1;
                }
                Admit::Go(inos)
            }
        }
    }

    /// The delegated tree `dir` belongs to: from the topmost directory above it delegated to
    /// the same watch, every directory beneath delegated to that watch.
    fn family(&self, dir: InodeId) -> Vec<InodeId> {
        let Some(sid) = self.delegations.get(&dir).map(|d| d.session) else {
            return Vec::new();
        };
        let held = |d: &InodeId| self.delegations.get(d).is_some_and(|d| d.session == sid);
        if sid.is_none() {
            return Vec::new();
        }
        let mut top = dir;
        // Directories form a tree; the bound only guards against a corrupt parent chain.
        for _ in 0..self.delegations.len() {
            match self.delegations.get(&top).map(|d| d.parent) {
                Some(parent) if held(&parent) => top = parent,
                _ => break,
            }
        }
        let mut tree = vec![top];
        let mut next = 0;
        while next < tree.len() && tree.len() <= self.delegations.len() {
            if let Some(kids) = self.delegated_in.get(&tree[next]) {
                tree.extend(kids.iter().filter(|k| held(k)).copied());
            }
            next += 1;
        }
        tree
    }

    /// A request admitted with these inodes is done.
    pub fn done(&mut self, inos: &[InodeId]) {
        for ino in inos {
            if let Some(n) = self.in_flight.get_mut(ino) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(ino);
                }
            }
        }
    }

    fn undelegate(&mut self, dir: InodeId) {
        if let Some(d) = self.delegations.remove(&dir) {
            self.ended.push(dir);
            if let Some(dirs) = self.delegated_in.get_mut(&d.parent) {
                dirs.remove(&dir);
                if dirs.is_empty() {
                    self.delegated_in.remove(&d.parent);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
