//! `replace-brick`, `add-brick` and `remove-brick` as the metadata leader carries them out: the I/O around the
//! pure plan in [`crate::membership`] — hello to the new bricks, openraft's membership calls,
//! the wait for learners to catch up, and the configuration change through the log.

use crate::membership::{self, Seats, Step, VoteStep};
use crate::server::Brick;
use mortar_proto::replication::Replication;
use mortar_proto::wire::{BrickHello, MetaOp, Replaced, Reply, Request};
use mortar_proto::{BrickId, BrickRef, FsError, VolumeConfig};
use openraft::{BasicNode, ChangeMembers};
use std::time::{Duration, Instant};

/// A replacement's whole run, the learner's catch-up (a snapshot of the namespace) included.
pub const REPLACE_TIMEOUT: Duration = Duration::from_secs(600);
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a brick waits for a leader before saying there is none (run again later).
const LEADER_WAIT: Duration = Duration::from_secs(10);
/// The plan takes at most three steps; more means the state moves under us.
const MAX_STEPS: usize = 6;

impl Brick {
    /// Replace the volume's brick at address `old` by the brick at `new`, or finish a
    /// replacement an earlier run left half-done. Only the leader acts; others answer NotLeader.
    pub async fn replace_brick(&self, old: &str, new: &str) -> Result<Replaced, FsError> {
        let deadline = Instant::now() + REPLACE_TIMEOUT;
        let leader = self.await_leader(Instant::now() + LEADER_WAIT).await?;
        if leader.id != self.id {
            return Err(FsError::NotLeader(leader.addr));
        }
        // The configuration read below is then the committed one.
        self.confirm_leading().await?;
        let config = self.volume()?;
        let hello = self.hello(new).await?;
        let new_ref = BrickRef {
            id: hello.id,
            addr: new.to_string(),
        };
        let old_ref = match config.brick_at(old) {
            Some(b) if b.id != hello.id => b.clone(),
            // A replacement of the brick at `old` by this one is already recorded.
            _ if config.brick(hello.id).is_some()
                && config.retired.iter().any(|b| b.addr == old) =>
            {
                return Ok(Replaced {
                    old: None,
                    new: new_ref,
                    steps: Vec::new(),
                })
            }
            _ => {
                let bricks: Vec<&str> = config.bricks().map(|b| b.addr.as_str()).collect();
                return Err(FsError::Invalid(format!(
                    "no brick of volume '{}' is at {old} (its bricks: {})",
                    config.name,
                    bricks.join(", ")
                )));
            }
        };
        if let Some(other) = &hello.volume {
            // A learner added by an earlier run already holds this volume's log.
            if !self.seats().voters.contains(&hello.id)
                && !self.seats().learners.contains(&hello.id)
            {
                return Err(FsError::Invalid(format!(
                    "brick {new} already belongs to volume '{other}'"
                )));
            }
        }
        let mut steps = Vec::new();
        for _ in 0..MAX_STEPS {
            let config = self.volume()?;
            let step = membership::next_step(&config, &self.seats(), old_ref.id, new_ref.id)
                .map_err(|e| FsError::Invalid(format!("cannot replace {old} by {new}: {e}")))?;
            tracing::info!(
                old = old_ref.id,
                new = new_ref.id,
                step = step.name(),
                "replace-brick"
            );
            match &step {
                Step::Done => {
                    return Ok(Replaced {
                        old: Some(old_ref),
                        new: new_ref,
                        steps,
                    })
                }
                Step::AddLearner => self.add_caught_up_learner(&new_ref, deadline).await?,
                Step::ChangeVoters(voters) => {
                    self.raft
                        .change_membership(voters.clone(), false)
                        .await
                        .map_err(|e| {
                            FsError::Unavailable(format!(
                                "the voters did not change: {e}; run replace-brick again"
                            ))
                        })?;
                }
                Step::RemoveLearner => {
                    let gone = ChangeMembers::RemoveNodes([old_ref.id].into());
                    self.raft
                        .change_membership(gone, false)
                        .await
                        .map_err(|e| {
                            FsError::Unavailable(format!(
                                "the retired learner was not removed: {e}; run replace-brick again"
                            ))
                        })?;
                }
                Step::RecordConfig => {
                    let op = MetaOp::ReplaceBrick {
                        old: old_ref.id,
                        new: new_ref.clone(),
                    };
                    match self.meta_write(op, None).await {
                        Reply::Meta { result: Ok(_), .. } => {}
                        Reply::Meta { result: Err(e), .. } => return Err(e),
                        other => return Err(FsError::Io(format!("unexpected reply {other:?}"))),
                    }
                }
            }
            steps.push(step.name().to_string());
            crash_hook(step.name());
        }
        Err(FsError::Io(format!(
            "replace-brick did not settle after {MAX_STEPS} steps ({})",
            steps.join(", ")
        )))
    }

    /// Add the empty bricks at `addrs` as new replica sets: each joins the metadata log as a
    /// learner and catches up, then one change appends the sets (and starts a layout change
    /// that a rebalance finishes). Running it again after a crash finishes it; running it after
    /// success changes nothing.
    pub async fn add_brick(&self, addrs: &[String]) -> Result<VolumeConfig, FsError> {
        let deadline = Instant::now() + REPLACE_TIMEOUT;
        let leader = self.await_leader(Instant::now() + LEADER_WAIT).await?;
        if leader.id != self.id {
            return Err(FsError::NotLeader(leader.addr));
        }
        self.confirm_leading().await?;
        let config = self.volume()?;
        let sets = Replication::REPLICA_3
            .sets(addrs)
            .map_err(|e| FsError::Invalid(e.to_string()))?;
        let mut refs = Vec::new();
        for set in &sets {
            let mut bricks = Vec::new();
            for addr in set {
                if refs
                    .iter()
                    .flatten()
                    .chain(&bricks)
                    .any(|b: &BrickRef| &b.addr == addr)
                {
                    return Err(FsError::Invalid(format!("brick {addr} is listed twice")));
                }
                let h = self.hello(addr).await?;
                let seat = self.seats();
                let member = seat.voters.contains(&h.id) || seat.learners.contains(&h.id);
                if let Some(other) = h.volume.as_ref().filter(|_| !member) {
                    return Err(FsError::Invalid(format!(
                        "brick {addr} already belongs to volume '{other}'"
                    )));
                }
                bricks.push(BrickRef {
                    id: h.id,
                    addr: addr.clone(),
                });
            }
            refs.push(bricks);
        }
        let already = config
            .bricks()
            .filter(|b| refs.iter().flatten().any(|r| r.id == b.id));
        if already.count() == refs.iter().flatten().count() {
            return Ok(config);
        }
        // Refused before any learner is added, so a refusal leaves the membership as it was.
        if let Some(b) = refs.iter().flatten().find(|b| config.has_or_had(b.id)) {
            return Err(FsError::Invalid(format!(
                "brick {} is or was in volume '{}' already",
                b.addr, config.name
            )));
        }
        for b in refs.iter().flatten() {
            let seat = self.seats();
            if !seat.learners.contains(&b.id) && !seat.voters.contains(&b.id) {
                self.add_caught_up_learner(b, deadline).await?;
                tracing::info!(brick = b.id, addr = %b.addr, "add-brick: learner added");
                crash_hook("learner added");
            }
        }
        match self.meta_write(MetaOp::AddSets(refs), None).await {
            Reply::Meta { result: Ok(_), .. } => self.volume(),
            Reply::Meta { result: Err(e), .. } => Err(e),
            other => Err(FsError::Io(format!("unexpected reply {other:?}"))),
        }
    }

    /// `remove-brick`: start draining the replica set made of exactly the bricks at `addrs`
    /// (`commit` false), or take the drained set out of the volume (`commit` true): the
    /// configuration change, then its bricks leave the metadata log. When the set holds the
    /// metadata group's votes, `start` gives them to the first set that stays, after the
    /// drain is recorded; `commit` is refused until they moved. Running either again after a
    /// crash finishes it; after success it changes nothing.
    pub async fn remove_brick(
        &self,
        addrs: &[String],
        commit: bool,
    ) -> Result<VolumeConfig, FsError> {
        let leader = self.await_leader(Instant::now() + LEADER_WAIT).await?;
        if leader.id != self.id {
            return Err(FsError::NotLeader(leader.addr));
        }
        self.confirm_leading().await?;
        let config = self.volume()?;
        let name = &config.name;
        let retired = |a: &String| config.retired.iter().any(|b| &b.addr == a);
        let Some(i) = config.set_at(addrs) else {
            if commit && !addrs.is_empty() && addrs.iter().all(retired) {
                // Committed by an earlier run: only its learners may be left to remove.
                self.remove_learners(&config, addrs).await?;
                return Ok(config);
            }
            if let Some(a) = addrs.iter().find(|a| config.brick_at(a).is_none()) {
                return Err(FsError::Invalid(format!(
                    "brick {a} is not in volume '{name}'"
                )));
            }
            let sets: Vec<String> = config
                .replica_sets
                .iter()
                .map(|s| {
                    let b: Vec<&str> = s.bricks.iter().map(|b| b.addr.as_str()).collect();
                    b.join(" ")
                })
                .collect();
            return Err(FsError::Invalid(format!(
                "remove-brick takes the bricks of one whole replica set; volume '{name}' has \
                 the sets: {}",
                sets.join("; ")
            )));
        };
        let op = membership::removal(&config, &self.seats(), i, commit)?;
        if let Some(op) = op {
            match self.meta_write(op, None).await {
                Reply::Meta { result: Ok(_), .. } => {}
                Reply::Meta { result: Err(e), .. } => return Err(e),
                other => return Err(FsError::Io(format!("unexpected reply {other:?}"))),
            }
            if !commit {
                crash_hook("drain started");
            }
        }
        if !commit {
            // The set left the placement first, so a crash between the two leaves a draining
            // set whose next `start` moves the votes.
            self.move_votes_off_leaving_sets().await?;
            return self.volume();
        }
        let config = self.volume()?;
        crash_hook("set removed");
        self.remove_learners(&config, addrs).await?;
        Ok(config)
    }

    /// Give the metadata group's votes to the first set that stays when a voter is on a
    /// leaving set ([`membership::next_vote_step`]). openraft goes through a joint
    /// configuration, so the old and the new voters both keep a majority throughout. A leader
    /// that gave up its vote steps down once the change is committed and sends the request
    /// on to the new voters, whose leader adds the old bricks back as learners (they serve
    /// chunks until the commit).
    async fn move_votes_off_leaving_sets(&self) -> Result<(), FsError> {
        for _ in 0..MAX_STEPS {
            let config = self.volume()?;
            let step = membership::next_vote_step(&config, &self.seats())
                .map_err(|e| FsError::Invalid(e.to_string()))?;
            tracing::info!(?step, "remove-brick: moving the metadata group's votes");
            match step {
                VoteStep::Done => return Ok(()),
                VoteStep::ChangeVoters(voters) => {
                    let next = voters.iter().find_map(|id| config.brick(*id)).cloned();
                    self.raft
                        .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
                        .await
                        .map_err(|e| {
                            FsError::Unavailable(format!(
                                "the metadata group's votes did not move: {e}; run \
                                 remove-brick start again"
                            ))
                        })?;
                    crash_hook("votes moved");
                    if let Some(next) = next {
                        return Err(FsError::NotLeader(next.addr));
                    }
                }
                VoteStep::AddLearners(ids) => {
                    for id in ids {
                        let Some(b) = config.brick(id) else { continue };
                        self.raft
                            .add_learner(id, BasicNode::new(&b.addr), false)
                            .await
                            .map_err(|e| {
                                FsError::Unavailable(format!(
                                    "brick {} does not follow the metadata log again: {e}; \
                                     run remove-brick start again",
                                    b.addr
                                ))
                            })?;
                    }
                }
            }
        }
        Err(FsError::Io(format!(
            "the metadata group's votes did not settle after {MAX_STEPS} steps"
        )))
    }

    /// The retired bricks at `addrs` that still follow the metadata log leave it.
    async fn remove_learners(
        &self,
        config: &VolumeConfig,
        addrs: &[String],
    ) -> Result<(), FsError> {
        let learners = self.seats().learners;
        let gone: std::collections::BTreeSet<BrickId> = config
            .retired
            .iter()
            .filter(|b| addrs.contains(&b.addr) && learners.contains(&b.id))
            .map(|b| b.id)
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(gone), false)
            .await
            .map_err(|e| {
                FsError::Unavailable(format!(
                    "the removed bricks still follow the metadata log: {e}; run remove-brick \
                     commit again"
                ))
            })?;
        Ok(())
    }

    async fn hello(&self, addr: &str) -> Result<BrickHello, FsError> {
        match self.pool.call(addr, &Request::Hello, HELLO_TIMEOUT).await {
            Ok(Ok(Reply::Hello(h))) => Ok(h),
            Ok(Ok(other)) => Err(FsError::Io(format!("unexpected reply {other:?}"))),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(FsError::Unavailable(format!(
                "new brick {addr} is unreachable: {e}"
            ))),
        }
    }

    fn seats(&self) -> Seats {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        Seats {
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
        }
    }

    /// Add `new` as a learner and wait until it holds the log as far as the leader had it
    /// then (from a snapshot when the log was purged).
    async fn add_caught_up_learner(
        &self,
        new: &BrickRef,
        deadline: Instant,
    ) -> Result<(), FsError> {
        self.raft
            .add_learner(new.id, BasicNode::new(&new.addr), false)
            .await
            .map_err(|e| FsError::Unavailable(format!("cannot add the learner: {e}")))?;
        let mut metrics = self.raft.metrics();
        let target = metrics.borrow().last_log_index.unwrap_or(0);
        loop {
            let matched = matched_index(&metrics.borrow(), new.id);
            if matched.is_some_and(|m| m >= target) {
                tracing::info!(brick = new.id, index = target, "learner caught up");
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FsError::Unavailable(format!(
                    "brick {} did not catch up with the metadata log (at {matched:?} of \
                     {target}); run replace-brick again",
                    new.addr
                )));
            }
            let _ = tokio::time::timeout(left, metrics.changed()).await;
        }
    }
}

fn matched_index(m: &openraft::RaftMetrics<BrickId, BasicNode>, id: BrickId) -> Option<u64> {
    m.replication
        .as_ref()?
        .get(&id)
        .copied()
        .flatten()
        .map(|l| l.index)
}

/// Test hook: `MORTAR_TEST_CRASH_AFTER=<step name>` SIGKILLs this brick right after that step,
/// as a power cut between two steps would.
fn crash_hook(step: &str) {
    if std::env::var("MORTAR_TEST_CRASH_AFTER").is_ok_and(|s| s == step) {
        tracing::warn!(
            step,
            "test hook: killing this brick after a replace-brick step"
        );
        // SAFETY: kill(2) of our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
