//! `replace-brick` as the metadata leader carries it out: the I/O around the pure plan in
//! [`crate::membership`] — hello to the new brick, openraft's membership calls, the wait for
//! the learner to catch up, and the configuration change through the log.

use crate::membership::{self, Seats, Step};
use crate::server::Brick;
use mortar_proto::wire::{AdminRequest, MetaOp, Replaced, Reply, Request};
use mortar_proto::{BrickId, BrickRef, FsError};
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
    /// replacement an earlier run left half-done. Only the leader acts; others forward.
    pub async fn replace_brick(&self, old: &str, new: &str) -> Result<Replaced, FsError> {
        let deadline = Instant::now() + REPLACE_TIMEOUT;
        let leader = self.await_leader(Instant::now() + LEADER_WAIT).await?;
        if leader.id != self.id {
            let req = Request::Admin(AdminRequest::ReplaceBrick {
                old: old.into(),
                new: new.into(),
            });
            return match self.pool.call(&leader.addr, &req, REPLACE_TIMEOUT).await {
                Ok(Ok(Reply::Replaced(r))) => Ok(r),
                Ok(Ok(other)) => Err(FsError::Io(format!("unexpected reply {other:?}"))),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(FsError::Unavailable(format!(
                    "the metadata leader {} did not answer: {e}",
                    leader.addr
                ))),
            };
        }
        // The configuration read below is then the committed one.
        self.confirm_leading().await?;
        let config = self.volume()?;
        let hello = match self.pool.call(new, &Request::Hello, HELLO_TIMEOUT).await {
            Ok(Ok(Reply::Hello(h))) => h,
            Ok(Ok(other)) => return Err(FsError::Io(format!("unexpected reply {other:?}"))),
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(FsError::Unavailable(format!(
                    "new brick {new} is unreachable: {e}"
                )))
            }
        };
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
