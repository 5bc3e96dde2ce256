//! Coherent client caches, the leader's I/O: watch streams on QUIC, Raft's quorum checks, and
//! the waits the [`Coherence`] state machine asks for. The rules are in [`crate::coherence`].

use crate::coherence::{Admit, Coherence, SessionId};
use crate::namespace;
use crate::raft::{Command, DbMeta, Raft};
use crate::store::Store;
use mortar_proto::wire::{read_frame, write_frame, Inval, MetaOp, OpId, Stamp, WatchDown, WatchUp};
use mortar_proto::{BrickId, FsError, InodeId, Timestamp};
use openraft::{BasicNode, RaftMetrics, ServerState};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

pub use crate::coherence::Named;

/// How often an open watch checks for watchers that stopped acknowledging.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// How long a request waits for a new leader to catch up before it is refused (Unavailable:
/// the client asks again).
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);
/// How long a grant waits for its record to commit.
const RECORD_WAIT: Duration = Duration::from_secs(2);

/// The sending side of one open watch.
struct Link {
    tx: mpsc::UnboundedSender<WatchDown>,
    /// Ends the watch's stream (it was given up on).
    stop: Arc<Notify>,
}

/// The coherence state and the watch streams it talks to, shared by the Raft state machine
/// (which announces every change it applies) and the request handlers (which wait for them).
#[derive(Default)]
pub struct Hub {
    /// When both are locked, `links` is locked first.
    links: Mutex<HashMap<SessionId, Link>>,
    state: Mutex<Coherence>,
    /// Wakes everyone waiting on the state (an acknowledgement, a closed watch).
    changed: Notify,
    /// Counts the volume configurations applied; what must follow them (access checks of live
    /// connections) waits on it.
    pub config_applied: ConfigApplied,
}

/// A watch channel of how many volume configurations were applied.
pub struct ConfigApplied(pub tokio::sync::watch::Sender<u64>);

impl Default for ConfigApplied {
    fn default() -> Self {
        ConfigApplied(tokio::sync::watch::Sender::new(0))
    }
}

impl Hub {
    fn state(&self) -> std::sync::MutexGuard<'_, Coherence> {
        self.state.lock().expect("coherence lock")
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Link>> {
        self.links.lock().expect("watch links lock")
    }

    /// The change `once` at log `index` was applied here and touched `items`. Called by the
    /// state machine on every brick; only the leader has watches to tell.
    pub fn applied(&self, index: u64, once: Option<OpId>, items: &[Inval]) {
        if items.is_empty() {
            return;
        }
        let links = self.links();
        if links.is_empty() {
            return;
        }
        let sends = self.state().applied(index, once, items, Instant::now());
        send(&links, sends);
    }

    /// Close the watches that stopped acknowledging.
    fn expire(&self) {
        let mut links = self.links();
        let late = self.state().expire(Instant::now());
        for sid in late {
            tracing::warn!(
                session = sid,
                "a watcher left a message unacknowledged too long; closing its watch"
            );
            if let Some(l) = links.remove(&sid) {
                l.stop.notify_one();
            }
        }
    }

    fn close(&self, sid: SessionId) {
        let mut links = self.links();
        self.state().close(sid, Instant::now());
        links.remove(&sid);
        drop(links);
        self.changed.notify_waiters();
    }

    /// Wait until `check` (run on the state at the current instant) gives a result. Otherwise
    /// it names the instant to look again at (unless an acknowledgement comes first) and what
    /// to send meanwhile.
    async fn wait_for<T>(
        &self,
        mut check: impl FnMut(&mut Coherence, Instant) -> Result<T, (Instant, Sends)>,
    ) -> T {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.expire();
            let (again, deadline) = {
                let links = self.links();
                let mut st = self.state();
                match check(&mut st, Instant::now()) {
                    Ok(t) => return t,
                    Err((again, sends)) => {
                        let deadline = st.next_deadline();
                        drop(st);
                        send(&links, sends);
                        (again, deadline)
                    }
                }
            };
            let wake = deadline.map_or(again, |d| d.min(again));
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
}

type Sends = Vec<(SessionId, WatchDown)>;

fn send(links: &HashMap<SessionId, Link>, sends: Sends) {
    for (sid, msg) in sends {
        if let Some(l) = links.get(&sid) {
            let _ = l.tx.send(msg);
        }
    }
}

pub struct Watchers {
    id: BrickId,
    raft: Raft,
    hub: Arc<Hub>,
    store: Arc<Store>,
}

/// A request counted in flight for the inodes it names (see [`Watchers::admit`]).
pub struct InFlight {
    hub: Arc<Hub>,
    inos: Vec<InodeId>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.hub.state().done(&self.inos);
    }
}

/// A request waiting to carry its change's outcome to its client (see
/// [`Watchers::awaiting`]).
pub struct Awaiting {
    hub: Arc<Hub>,
    once: Option<OpId>,
}

impl Drop for Awaiting {
    fn drop(&mut self) {
        if let Some(o) = self.once {
            self.hub.state().outcome_sent(o);
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
    /// Changes each time a volume configuration is applied.
    pub fn config_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.hub.config_applied.0.subscribe()
    }

    pub fn new(id: BrickId, raft: Raft, hub: Arc<Hub>, store: Arc<Store>) -> Watchers {
        Watchers {
            id,
            raft,
            hub,
            store,
        }
    }

    /// Wait (up to `wait`) until this brick leads and has applied an entry of its term — so
    /// it holds every committed change and knows every recorded delegation — then adopt them.
    async fn caught_up(&self, wait: Duration) -> Result<(), FsError> {
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let m = metrics.borrow().clone();
            if leading_term_of(&m, self.id).is_some() {
                self.adopt();
                return Ok(());
            }
            if m.current_leader != Some(self.id) {
                return Err(FsError::Unavailable("not the metadata leader".into()));
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(FsError::Unavailable(
                        "the new metadata leader has not caught up yet".into(),
                    ))
                }
            }
        }
    }

    /// Leading: start from the delegations the namespace records (once per term).
    fn adopt(&self) {
        let Some(term) = leading_term(&self.raft, self.id) else {
            return;
        };
        if self.hub.state().adopted(term) {
            return;
        }
        match namespace::delegations(&DbMeta(&self.store)) {
            Ok(recorded) => {
                if !recorded.is_empty() {
                    tracing::info!(
                        delegations = recorded.len(),
                        term,
                        "adopted the recorded delegations; their holders may reclaim them"
                    );
                }
                self.hub.state().adopt(term, &recorded, Instant::now());
            }
            Err(e) => tracing::error!(error = %e, "cannot read the recorded delegations"),
        }
    }

    /// Record in the log the delegations that ended (best effort: one left recorded costs a
    /// later leader a grace period's wait, no more).
    fn record_ended(&self) {
        let ended = self.hub.state().take_ended();
        for dir in ended {
            let raft = self.raft.clone();
            tokio::spawn(async move {
                let cmd = Command {
                    op: MetaOp::Undelegated { dir },
                    once: None,
                    now: Timestamp::now(),
                };
                if let Err(e) = raft.client_write(cmd).await {
                    tracing::debug!(dir, error = %e, "the end of a delegation is not recorded");
                }
            });
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

    /// The change `once` is about to be proposed by a request that will carry its outcome back
    /// (so its own client needs no invalidation), until the guard drops.
    pub fn awaiting(&self, once: Option<OpId>) -> Awaiting {
        if let Some(o) = once {
            self.hub.state().await_outcome(o);
        }
        Awaiting {
            hub: self.hub.clone(),
            once,
        }
    }

    /// Before a change at log `index` is answered: no cache may still serve what it replaced.
    pub async fn settled(&self, index: u64) {
        let term = self.raft.metrics().borrow().current_term;
        self.hub
            .wait_for(|st, now| st.settled(term, index, now).map_err(|t| (t, Vec::new())))
            .await
    }

    /// Announce, as of log `index`, that everything but `origin`'s cache must drop `items`,
    /// and wait until that is so.
    pub async fn announce(&self, origin: Option<u128>, index: u64, items: &[Inval]) {
        {
            let links = self.hub.links();
            let sends = self
                .hub
                .state()
                .announce(origin, index, items, Instant::now());
            send(&links, sends);
        }
        self.settled(index).await;
    }

    /// Delegate the empty directory `dir` to `client`'s watch (see [`Coherence::delegate`]),
    /// and record it in the log before the holder hears of it.
    pub async fn delegate(
        &self,
        client: u128,
        dir: InodeId,
        empty_in: impl FnOnce() -> Result<Option<InodeId>, FsError>,
    ) -> Result<(), FsError> {
        self.adopt();
        let parent = self
            .hub
            .state()
            .delegate(client, dir, Instant::now(), empty_in)?;
        let cmd = Command {
            op: MetaOp::Delegated {
                dir,
                parent,
                client,
            },
            once: None,
            now: Timestamp::now(),
        };
        let recorded = tokio::time::timeout(RECORD_WAIT, self.raft.client_write(cmd)).await;
        match recorded {
            Ok(Ok(_)) => Ok(()),
            failed => {
                self.hub.state().withdraw(dir);
                self.record_ended();
                Err(FsError::Busy(format!(
                    "no delegation: it could not be recorded ({})",
                    match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    }
                )))
            }
        }
    }

    /// Whether a directory delegated to someone has `parent` as its parent.
    pub fn delegates_in(&self, parent: InodeId) -> bool {
        self.hub.state().delegates_in(parent)
    }

    /// Before a request is answered on the leader: wait until it has caught up (a new leader
    /// answers nothing from before its term's first entry is applied), recall every
    /// delegation the request names that another client holds, and count the request in
    /// flight until the returned guard drops.
    pub async fn admit(&self, origin: Option<u128>, named: Named) -> Result<InFlight, FsError> {
        self.caught_up(CATCH_UP_WAIT).await?;
        let inos = self
            .hub
            .wait_for(|st, now| match st.admit(origin, &named, now) {
                Admit::Go(inos) => Ok(inos),
                Admit::Wait(recalls, until) => Err((until, recalls)),
            })
            .await;
        self.record_ended();
        Ok(InFlight {
            hub: self.hub.clone(),
            inos,
        })
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
        self.adopt();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stop = Arc::new(Notify::new());
        let sid = {
            let mut links = self.hub.links();
            let sid = self.hub.state().open(client, Instant::now());
            links.insert(
                sid,
                Link {
                    tx: tx.clone(),
                    stop: stop.clone(),
                },
            );
            sid
        };
        // Requests waiting for this client to come back for its delegations look again.
        self.hub.changed.notify_waiters();
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
        let mut expire = tokio::time::interval(EXPIRE_EVERY);
        loop {
            tokio::select! {
                up = up_rx.recv() => match up {
                    None => break,
                    Some(WatchUp::Ack { seq }) => {
                        self.hub.state().ack(sid, seq);
                        self.hub.changed.notify_waiters();
                        self.record_ended();
                    }
                    Some(WatchUp::Bye) => {
                        self.hub.state().bye(sid);
                        self.hub.changed.notify_waiters();
                        self.record_ended();
                        break;
                    }
                    Some(WatchUp::Renew { n }) => {
                        let asked = Instant::now();
                        let me = self.clone();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            // A leader cut off from the others must not extend leases: confirm
                            // with a quorum first.
                            if me.raft.ensure_linearizable().await.is_err()
                                || leading_term(&me.raft, me.id) != Some(term)
                            {
                                return;
                            }
                            if me.hub.state().renew(sid, asked) {
                                let _ = tx.send(WatchDown::Renewed { n });
                            }
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
                _ = expire.tick() => {
                    self.hub.expire();
                    self.record_ended();
                }
                _ = stop.notified() => break,
            }
        }
        self.hub.close(sid);
        reader.abort();
        let _ = send.finish();
        tracing::debug!(session = sid, "watch closed");
    }
}
