//! The election driver: the I/O around [`election::Elector`]. It records when a leader was
//! last heard (the RPC server tells it), asks the other voters for pre-votes over the brick's
//! QUIC pool, answers theirs, and calls openraft's election only with a majority's yes.

use super::election::{would_vote, Elector, Standing, Step, Timing};
use super::*;
use openraft::ServerState;
use std::sync::Mutex;
use std::time::Instant;

/// A pre-vote request: would the receiver vote for `candidate`, whose log ends at `last_log_id`?
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreVote {
    pub candidate: NodeId,
    pub last_log_id: Option<LogId<NodeId>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreVoteAnswer {
    pub granted: bool,
}

/// What the RPC server and the driver share.
pub struct Campaign {
    pub timing: Timing,
    log: LogStore,
    /// The last time a leader's entries or heartbeat were accepted, or a real vote granted.
    heard: Mutex<Option<Instant>>,
    /// The longest silence between two leader contacts, for `status` and the stability test.
    longest_gap: Mutex<Duration>,
}

impl Campaign {
    pub fn new(timing: Timing, log: LogStore) -> Campaign {
        Campaign {
            timing,
            log,
            heard: Mutex::new(None),
            longest_gap: Mutex::new(Duration::ZERO),
        }
    }

    /// A leader spoke and this brick accepted it as leader (or this brick granted a vote).
    pub fn leader_heard(&self) {
        let now = Instant::now();
        let mut heard = self.heard.lock().expect("campaign lock");
        if let Some(before) = *heard {
            let mut gap = self.longest_gap.lock().expect("campaign lock");
            *gap = (*gap).max(now.saturating_duration_since(before));
        }
        *heard = Some(now);
    }

    fn heard(&self) -> Option<Instant> {
        *self.heard.lock().expect("campaign lock")
    }

    /// The longest time this brick went without hearing from a leader while following one.
    pub fn longest_gap(&self) -> Duration {
        *self.longest_gap.lock().expect("campaign lock")
    }

    async fn last_log_id(&self) -> Result<Option<LogId<NodeId>>, FsError> {
        let mut log = self.log.clone();
        log.get_log_state()
            .await
            .map(|s| s.last_log_id)
            .map_err(|e| FsError::Io(format!("reading the raft log: {e}")))
    }

    /// Answer a peer's pre-vote.
    pub async fn answer(&self, raft: &Raft, req: &PreVote) -> Result<PreVoteAnswer, FsError> {
        let leading = raft.metrics().borrow().state == ServerState::Leader;
        let mine = self.last_log_id().await?;
        let granted = would_vote(
            Instant::now(),
            self.heard(),
            self.timing.lease,
            leading,
            mine,
            req.last_log_id,
        );
        tracing::info!(
            candidate = req.candidate,
            granted,
            leading,
            "pre-vote asked"
        );
        Ok(PreVoteAnswer { granted })
    }
}

fn jitter() -> f64 {
    rand::random()
}

/// Run the election driver for brick `me` until the process ends.
pub async fn run(raft: Raft, pool: Pool, me: NodeId, campaign: Arc<Campaign>) {
    let mut elector = Elector::new(campaign.timing, Instant::now(), jitter());
    loop {
        let (standing, peers) = {
            let m = raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            let peers: Vec<(NodeId, String)> = voters
                .iter()
                .filter(|&&v| v != me)
                .filter_map(|&v| membership.get_node(&v).map(|n| (v, n.addr.clone())))
                .collect();
            let standing = Standing {
                voter: voters.contains(&me),
                leading: m.state == ServerState::Leader,
                voters: voters.len(),
            };
            (standing, peers)
        };
        if let Some(t) = campaign.heard() {
            elector.leader_heard(t, jitter());
        }
        let step = elector.poll(Instant::now(), standing, jitter());
        match step {
            Step::Until(t) => {
                // Woken at the deadline at the latest; a leader heard meanwhile moves it.
                let wake = t.min(Instant::now() + campaign.timing.slack);
                tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
                continue;
            }
            Step::Ask { round } => {
                let elect = ask(&pool, me, &campaign, &mut elector, round, peers).await;
                if elect {
                    stand(&raft).await;
                }
            }
            Step::Elect => stand(&raft).await,
        }
    }
}

async fn stand(raft: &Raft) {
    tracing::info!("pre-vote won: standing for election");
    if let Err(e) = raft.trigger().elect().await {
        tracing::warn!(error = %e, "could not start an election");
    }
}

/// Ask every peer at once; true once a majority (this brick included) said yes.
async fn ask(
    pool: &Pool,
    me: NodeId,
    campaign: &Campaign,
    elector: &mut Elector,
    round: u64,
    peers: Vec<(NodeId, String)>,
) -> bool {
    let last_log_id = match campaign.last_log_id().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "cannot ask for pre-votes");
            return false;
        }
    };
    let req = PreVote {
        candidate: me,
        last_log_id,
    };
    // An answer later than a lease is of no use: the round after will ask again.
    let timeout = campaign.timing.lease;
    let mut asks = tokio::task::JoinSet::new();
    for (peer, addr) in peers {
        let pool = pool.clone();
        let request = Request::Raft(RaftRpc {
            target: peer,
            kind: RaftKind::PreVote,
            payload: enc(&req),
        });
        asks.spawn(async move {
            let granted = match pool.call(&addr, &request, timeout).await {
                Ok(Ok(Reply::Raft(bytes))) => wire::decode::<PreVoteAnswer>(&bytes)
                    .map(|a| a.granted)
                    .unwrap_or(false),
                _ => false,
            };
            (peer, granted)
        });
    }
    let mut said = Vec::new();
    while let Some(Ok((peer, granted))) = asks.join_next().await {
        said.push((peer, granted));
        if elector.answered(round, peer, granted) == Some(Step::Elect) {
            tracing::info!(round, ?said, "pre-vote: a majority would vote");
            return true;
        }
    }
    tracing::info!(round, ?said, "pre-vote: no majority; keeping the term");
    false
}

/// Log every change of role, term or leader as it happens (the failover timeline is read from
/// these lines).
pub async fn log_changes(raft: Raft) {
    let mut metrics = raft.metrics();
    let mut seen = None;
    loop {
        let now = {
            let m = metrics.borrow_and_update();
            (m.state, m.current_term, m.current_leader)
        };
        if seen != Some(now) {
            let (state, term, leader) = now;
            tracing::info!(
                ?state,
                term,
                ?leader,
                "metadata group: role, term or leader changed"
            );
            seen = Some(now);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
