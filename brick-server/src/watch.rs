//! Coherent client caches, the leader's side: watch sessions, leases and acknowledged
//! invalidations (the rules are on [`WatchDown`]).
//!
//! A client with a live lease answers lookups, getattr, open and getxattr from memory. The
//! leader therefore answers no change until every other watcher has dropped what the change
//! touched (it acknowledged the invalidation) or can no longer use it (its lease ran out).

use crate::raft::Raft;
use mortar_proto::wire::{read_frame, write_frame, Inval, Stamp, WatchDown, WatchUp, WATCH_LEASE};
use mortar_proto::{BrickId, FsError, InodeId};
use openraft::{BasicNode, RaftMetrics, ServerState};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long the leader waits for a watcher to acknowledge an invalidation before it gives up on
/// that watcher (closes its watch) and waits for its lease to run out instead.
pub const ACK_WAIT: Duration = Duration::from_millis(500);
/// How long the leader waits for a delegation's holder to commit what it made under it and
/// give it back; a holder that takes longer is given up on like a silent watcher.
pub const RECALL_WAIT: Duration = Duration::from_secs(5);

/// A lease as the leader counts it: a little longer than the client does, for clock-rate
/// differences between hosts.
fn lease_margin() -> Duration {
    WATCH_LEASE + WATCH_LEASE / 20 + Duration::from_millis(20)
}

struct Session {
    client: u128,
    tx: mpsc::UnboundedSender<WatchDown>,
    acks: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>,
    /// Until when the client may use its cache, as far as this leader granted.
    lease_until: Arc<Mutex<Instant>>,
    /// Ends the session's stream (the watcher was given up on).
    stop: Arc<tokio::sync::Notify>,
}

/// A directory delegated to one watch session (see [`mortar_proto::wire::Request::Delegate`]).
struct Delegation {
    session: u64,
    client: u128,
    parent: InodeId,
}

/// What a request names, for recalling delegations before it is answered.
#[derive(Debug, Default)]
pub struct Named {
    /// Inodes it reads or changes, including directories it looks up or creates in.
    pub inos: Vec<InodeId>,
    /// Directories whose listing it reads (a listing shows each entry's attributes).
    pub listed: Vec<InodeId>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<u64, Session>,
    delegations: HashMap<InodeId, Delegation>,
    /// The delegated directories in each parent (a request naming an entry of the parent, or
    /// listing it, may concern them).
    delegated_in: HashMap<InodeId, HashSet<InodeId>>,
    /// Requests being answered, by the inodes they name: no delegation of those is granted
    /// until they are done, so a holder never misses a change it did not make.
    in_flight: HashMap<InodeId, usize>,
    /// Leases of watches that ended while their client may still be using them.
    departed: Vec<Instant>,
    /// The term this brick leads in and when it first saw itself leading it.
    leading: Option<(u64, Instant)>,
}

impl State {
    fn undelegate(&mut self, dir: InodeId) {
        if let Some(d) = self.delegations.remove(&dir) {
            if let Some(dirs) = self.delegated_in.get_mut(&d.parent) {
                dirs.remove(&dir);
                if dirs.is_empty() {
                    self.delegated_in.remove(&d.parent);
                }
            }
        }
    }
}

pub struct Watchers {
    id: BrickId,
    raft: Raft,
    state: Mutex<State>,
    next_session: AtomicU64,
    next_seq: AtomicU64,
}

/// A request counted in flight for the inodes it names (see [`Watchers::admit`]).
pub struct InFlight {
    watchers: Arc<Watchers>,
    inos: Vec<InodeId>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut st = self.watchers.state();
        for ino in &self.inos {
            if let Some(n) = st.in_flight.get_mut(ino) {
                *n -= 1;
                if *n == 0 {
                    st.in_flight.remove(ino);
                }
            }
        }
    }
}

/// This brick leads in `term` and has applied an entry of that term, so its reads are current
/// and every later change passes through it.
fn leading_term(raft: &Raft, id: BrickId) -> Option<u64> {
    leading_term_of(&raft.metrics().borrow(), id)
}

fn leading_term_of(m: &RaftMetrics<u64, BasicNode>, id: BrickId) -> Option<u64> {
    let ready = m.state == ServerState::Leader
        && m.current_leader == Some(id)
        && m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term);
    ready.then_some(m.current_term)
}

impl Watchers {
    pub fn new(id: BrickId, raft: Raft) -> Watchers {
        Watchers {
            id,
            raft,
            state: Mutex::default(),
            next_session: AtomicU64::new(1),
            next_seq: AtomicU64::new(1),
        }
    }

    /// Where this brick's reads stand, when it is a caught-up leader: answers may be cached.
    pub fn stamp(&self) -> Option<Stamp> {
        let m = self.raft.metrics();
        let m = m.borrow();
        Some(Stamp {
            leader: self.id,
            term: leading_term_of(&m, self.id)?,
            index: m.last_applied?.index,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("watchers lock")
    }

    /// Before answering a change: leases granted by earlier leaders, and by watches that ended
    /// here, must have run out (their holders missed this change's invalidation).
    async fn settle(&self) {
        let term = self.raft.metrics().borrow().current_term;
        let wait_until = {
            let mut st = self.state();
            let since = match st.leading {
                Some((t, since)) if t == term => since,
                _ => {
                    let now = Instant::now();
                    st.leading = Some((term, now));
                    now
                }
            };
            let now = Instant::now();
            st.departed.retain(|until| *until > now);
            st.departed
                .iter()
                .copied()
                .chain(std::iter::once(since + lease_margin()))
                .max()
        };
        if let Some(until) = wait_until {
            tokio::time::sleep_until(until.into()).await;
        }
    }

    /// Called after a change at log `index` is applied and before it is answered: every watcher
    /// but the client that made it drops what the change touched.
    pub async fn after_change(&self, origin: Option<u128>, index: u64, items: &[Inval]) {
        self.settle().await;
        if items.is_empty() {
            return;
        }
        let targets: Vec<u64> = self
            .state()
            .sessions
            .iter()
            .filter(|(_, s)| Some(s.client) != origin)
            .map(|(id, _)| *id)
            .collect();
        let waits = targets.into_iter().map(|sid| {
            let items = items.to_vec();
            self.acknowledged(sid, ACK_WAIT, "an invalidation", move |seq| {
                WatchDown::Invalidate { seq, index, items }
            })
        });
        futures::future::join_all(waits).await;
    }

    /// Send session `sid` the message `msg(seq)` and wait up to `wait` for its `Ack { seq }`.
    /// A watcher that does not answer in time has its watch closed, and this returns only once
    /// its lease can no longer be in use.
    async fn acknowledged(
        &self,
        sid: u64,
        wait: Duration,
        what: &str,
        msg: impl FnOnce(u64) -> WatchDown,
    ) {
        let Some((tx, acks, lease_until)) = self
            .state()
            .sessions
            .get(&sid)
            .map(|s| (s.tx.clone(), s.acks.clone(), s.lease_until.clone()))
        else {
            return;
        };
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (done, acked) = oneshot::channel();
        acks.lock().expect("acks lock").insert(seq, done);
        let sent = tx.send(msg(seq)).is_ok();
        if sent && matches!(tokio::time::timeout(wait, acked).await, Ok(Ok(()))) {
            return;
        }
        tracing::warn!(
            session = sid,
            "a watcher did not acknowledge {what}; closing its watch"
        );
        self.end_session(sid);
        let until = *lease_until.lock().expect("lease lock");
        tokio::time::sleep_until(until.into()).await;
    }

    /// Delegate the empty directory `dir` to `client`'s watch session. `empty_in` reads the
    /// applied namespace (the directory's parent when it is an empty directory); it runs while
    /// no request naming `dir` is being answered, so nothing lands in it unseen by the holder.
    pub fn delegate(
        &self,
        client: u128,
        dir: InodeId,
        empty_in: impl FnOnce() -> Result<Option<InodeId>, FsError>,
    ) -> Result<(), FsError> {
        let busy = |why: &str| Err(FsError::Busy(format!("no delegation: {why}")));
        let mut st = self.state();
        let now = Instant::now();
        let Some((&sid, _)) = st
            .sessions
            .iter()
            .find(|(_, s)| s.client == client && *s.lease_until.lock().expect("lease lock") > now)
        else {
            return busy("the client holds no lease from this leader");
        };
        if let Some(d) = st.delegations.get(&dir) {
            return if d.session == sid {
                Ok(())
            } else {
                busy("delegated to another client")
            };
        }
        if st.in_flight.get(&dir).is_some_and(|n| *n > 0) {
            return busy("the directory is being changed");
        }
        let Some(parent) = empty_in()? else {
            return busy("not an empty directory");
        };
        st.delegations.insert(
            dir,
            Delegation {
                session: sid,
                client,
                parent,
            },
        );
        st.delegated_in.entry(parent).or_default().insert(dir);
        Ok(())
    }

    /// Before a request is answered: recall every delegation it names that another client
    /// holds (the holder commits what it made under it first), and count the request in
    /// flight until the returned guard drops.
    pub async fn admit(self: &Arc<Self>, origin: Option<u128>, named: Named) -> InFlight {
        loop {
            let recalls: Vec<(InodeId, u64)> = {
                let mut st = self.state();
                let listed = named
                    .listed
                    .iter()
                    .filter_map(|p| st.delegated_in.get(p))
                    .flatten();
                let mut dirs: Vec<InodeId> = named.inos.iter().chain(listed).copied().collect();
                dirs.sort_unstable();
                dirs.dedup();
                let recalls: Vec<(InodeId, u64)> = dirs
                    .into_iter()
                    .filter_map(|dir| st.delegations.get(&dir).map(|d| (dir, d)))
                    .filter(|(_, d)| Some(d.client) != origin)
                    .map(|(dir, d)| (dir, d.session))
                    .collect();
                if recalls.is_empty() {
                    for ino in &named.inos {
                        *st.in_flight.entry(*ino).or_default() += 1;
                    }
                    return InFlight {
                        watchers: self.clone(),
                        inos: named.inos,
                    };
                }
                recalls
            };
            futures::future::join_all(recalls.into_iter().map(|(dir, sid)| self.recall(dir, sid)))
                .await;
        }
    }

    /// Whether a directory delegated to someone has `parent` as its parent (so a request
    /// naming an entry of `parent` must find out whether that entry is the directory).
    pub fn delegates_in(&self, parent: InodeId) -> bool {
        self.state().delegated_in.contains_key(&parent)
    }

    async fn recall(&self, dir: InodeId, sid: u64) {
        self.acknowledged(sid, RECALL_WAIT, "a recall", |seq| WatchDown::Recall {
            seq,
            dir,
        })
        .await;
        let mut st = self.state();
        if st.delegations.get(&dir).is_some_and(|d| d.session == sid) {
            st.undelegate(dir);
        }
    }

    fn end_session(&self, sid: u64) {
        let mut st = self.state();
        let held: Vec<InodeId> = st
            .delegations
            .iter()
            .filter(|(_, d)| d.session == sid)
            .map(|(dir, _)| *dir)
            .collect();
        for dir in held {
            st.undelegate(dir);
        }
        if let Some(s) = st.sessions.remove(&sid) {
            s.stop.notify_one();
            let until = *s.lease_until.lock().expect("lease lock");
            if until > Instant::now() {
                st.departed.push(until);
            }
        }
    }

    /// Serve one watch stream until the client goes away or this brick stops leading.
    pub async fn serve(
        self: Arc<Self>,
        client: u128,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let Some(term) = leading_term(&self.raft, self.id) else {
            let refusal = WatchDown::Refused(FsError::Unavailable(
                "not the metadata leader (or not caught up yet)".into(),
            ));
            let _ = write_frame(&mut send, &refusal).await;
            let _ = send.finish();
            return;
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let acks: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>> = Arc::default();
        let lease_until = Arc::new(Mutex::new(Instant::now()));
        let stop = Arc::new(tokio::sync::Notify::new());
        let sid = self.next_session.fetch_add(1, Ordering::Relaxed);
        self.state().sessions.insert(
            sid,
            Session {
                client,
                tx: tx.clone(),
                acks: acks.clone(),
                lease_until: lease_until.clone(),
                stop: stop.clone(),
            },
        );
        tracing::debug!(session = sid, term, "watch opened");
        let _ = tx.send(WatchDown::Welcome {
            leader: self.id,
            term,
        });
        // Reading frames is not cancel-safe, so it runs on its own and feeds a channel.
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Ok(msg) = read_frame::<WatchUp>(&mut recv).await {
                if up_tx.send(msg).is_err() {
                    break;
                }
            }
        });
        let mut server = self.raft.server_metrics();
        loop {
            tokio::select! {
                up = up_rx.recv() => match up {
                    None => break,
                    Some(WatchUp::Ack { seq }) => {
                        if let Some(done) = acks.lock().expect("acks lock").remove(&seq) {
                            let _ = done.send(());
                        }
                    }
                    Some(WatchUp::Renew { n }) => {
                        let asked = Instant::now();
                        let me = self.clone();
                        let tx = tx.clone();
                        let lease_until = lease_until.clone();
                        tokio::spawn(async move {
                            // A leader cut off from the others must not extend leases: confirm
                            // with a quorum first.
                            if me.raft.ensure_linearizable().await.is_err()
                                || leading_term(&me.raft, me.id) != Some(term)
                            {
                                return;
                            }
                            let mut until = lease_until.lock().expect("lease lock");
                            *until = (*until).max(asked + lease_margin());
                            drop(until);
                            let _ = tx.send(WatchDown::Renewed { n });
                        });
                    }
                },
                down = rx.recv() => match down {
                    Some(msg) => {
                        if write_frame(&mut send, &msg).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                changed = server.changed() => {
                    let m = server.borrow();
                    if changed.is_err()
                        || m.state != ServerState::Leader
                        || m.vote.leader_id().get_term() != term
                    {
                        break;
                    }
                }
                _ = stop.notified() => break,
            }
        }
        self.end_session(sid);
        reader.abort();
        let _ = send.finish();
        tracing::debug!(session = sid, "watch closed");
    }
}
