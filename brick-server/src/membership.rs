//! Replacing a brick, as a pure plan: from the volume configuration and the metadata group's
//! membership as they are now, the one next step. The leader takes it, reads both again and
//! asks for the next, so a run interrupted anywhere (CLI, leader or any brick killed) is
//! finished by the next run, which finds the state where the last one left it.
//!
//! The order is: the new brick joins as a learner and catches up; the voters change (openraft
//! goes through a joint configuration, so old and new voter sets both keep a majority); only
//! then does the volume configuration name the new brick. A configuration that names a brick
//! therefore never points clients at one that lacks the log.

use mortar_proto::{BrickId, VolumeConfig};
use std::collections::BTreeSet;

/// The metadata group's members as Raft has them (in a joint configuration, the union).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seats {
    pub voters: BTreeSet<BrickId>,
    pub learners: BTreeSet<BrickId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Add the new brick as a learner and wait until it holds the log.
    AddLearner,
    /// Make these the voters: the new brick in, the old one out.
    ChangeVoters(BTreeSet<BrickId>),
    /// Name the new brick in the volume configuration in the old one's place, retiring it.
    RecordConfig,
    /// Drop the retired brick from the group's learners (it served chunks only).
    RemoveLearner,
    Done,
}

impl Step {
    pub fn name(&self) -> &'static str {
        match self {
            Step::AddLearner => "learner added",
            Step::ChangeVoters(_) => "membership changed",
            Step::RecordConfig => "configuration recorded",
            Step::RemoveLearner => "old learner removed",
            Step::Done => "done",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("brick {0} is not in the volume")]
    NotInVolume(BrickId),
    #[error("brick {0} is already in the volume")]
    AlreadyInVolume(BrickId),
    #[error("brick {0} was retired from the volume and cannot come back")]
    Retired(BrickId),
    #[error("a brick cannot replace itself")]
    Same,
}

/// The next step of replacing `old` by `new`.
pub fn next_step(
    config: &VolumeConfig,
    seats: &Seats,
    old: BrickId,
    new: BrickId,
) -> Result<Step, PlanError> {
    if old == new {
        return Err(PlanError::Same);
    }
    if config.is_retired(new) {
        return Err(PlanError::Retired(new));
    }
    let recorded = config.is_retired(old) && config.brick(new).is_some();
    if !recorded {
        if config.brick(old).is_none() {
            return Err(PlanError::NotInVolume(old));
        }
        if config.brick(new).is_some() {
            return Err(PlanError::AlreadyInVolume(new));
        }
    }
    let member = |id: BrickId| seats.voters.contains(&id) || seats.learners.contains(&id);
    // Every brick follows the metadata log (the first set votes, the others learn), so the
    // new one joins it before anything names it.
    if seats.voters.contains(&old) {
        if !member(new) {
            return Ok(Step::AddLearner);
        }
        let mut voters = seats.voters.clone();
        voters.remove(&old);
        voters.insert(new);
        return Ok(Step::ChangeVoters(voters));
    }
    if !recorded {
        return Ok(if member(new) {
            Step::RecordConfig
        } else {
            Step::AddLearner
        });
    }
    if seats.learners.contains(&old) {
        return Ok(Step::RemoveLearner);
    }
    Ok(Step::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortar_proto::{BrickRef, ReplicaSet, Timestamp};

    fn brick(id: BrickId) -> BrickRef {
        BrickRef {
            id,
            addr: format!("h:{id}"),
        }
    }

    fn config(ids: &[BrickId], retired: &[BrickId]) -> VolumeConfig {
        VolumeConfig {
            retired: retired.iter().map(|id| brick(*id)).collect(),
            ..VolumeConfig::new(
                "www",
                1 << 20,
                ReplicaSet::numbered(vec![ids.iter().map(|id| brick(*id)).collect()]),
                Timestamp::default(),
            )
        }
    }

    fn seats(voters: &[BrickId], learners: &[BrickId]) -> Seats {
        Seats {
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
        }
    }

    /// Drive the plan as the leader does, applying each step to the model state.
    fn run(config: &mut VolumeConfig, seats: &mut Seats, old: BrickId, new: BrickId) -> Vec<Step> {
        let mut taken = Vec::new();
        loop {
            let step = next_step(config, seats, old, new).expect("plan");
            match &step {
                Step::AddLearner => {
                    seats.learners.insert(new);
                }
                Step::ChangeVoters(v) => {
                    seats.voters = v.clone();
                    seats.learners.remove(&new);
                }
                Step::RemoveLearner => {
                    seats.learners.remove(&old);
                }
                Step::RecordConfig => {
                    for b in config.replica_sets.iter_mut().flat_map(|s| &mut s.bricks) {
                        if b.id == old {
                            *b = brick(new);
                        }
                    }
                    config.retired.push(brick(old));
                }
                Step::Done => return taken,
            }
            taken.push(step);
        }
    }

    #[test]
    fn a_metadata_brick_joins_as_a_learner_then_votes_then_is_named() {
        let mut c = config(&[1, 2, 3], &[]);
        let mut s = seats(&[1, 2, 3], &[]);
        let steps = run(&mut c, &mut s, 3, 4);
        assert_eq!(
            steps,
            vec![
                Step::AddLearner,
                Step::ChangeVoters([1, 2, 4].into()),
                Step::RecordConfig
            ]
        );
        assert_eq!(s, seats(&[1, 2, 4], &[]));
        assert_eq!(c, config(&[1, 2, 4], &[3]));
    }

    #[test]
    fn a_run_stopped_at_any_step_is_finished_by_the_next() {
        // Every state a crash can leave, and what the next run still has to do.
        let learner_added = (config(&[1, 2, 3], &[]), seats(&[1, 2, 3], &[4]));
        let joint = (config(&[1, 2, 3], &[]), seats(&[1, 2, 3, 4], &[]));
        let voters_changed = (config(&[1, 2, 3], &[]), seats(&[1, 2, 4], &[]));
        let complete = (config(&[1, 2, 4], &[3]), seats(&[1, 2, 4], &[]));
        for (state, first) in [
            (learner_added, Step::ChangeVoters([1, 2, 4].into())),
            (joint, Step::ChangeVoters([1, 2, 4].into())),
            (voters_changed, Step::RecordConfig),
            (complete, Step::Done),
        ] {
            let (mut c, mut s) = state;
            assert_eq!(next_step(&c, &s, 3, 4), Ok(first));
            run(&mut c, &mut s, 3, 4);
            assert_eq!((c, s), (config(&[1, 2, 4], &[3]), seats(&[1, 2, 4], &[])));
        }
    }

    #[test]
    fn a_learner_is_replaced_by_a_learner_and_the_voters_stay() {
        let mut c = config(&[1, 2, 3], &[]);
        c.replica_sets.push(ReplicaSet {
            id: 1,
            bricks: [5, 6, 7].map(brick).to_vec(),
            leaving: false,
        });
        let mut s = seats(&[1, 2, 3], &[5, 6, 7]);
        assert_eq!(
            run(&mut c, &mut s, 6, 8),
            vec![Step::AddLearner, Step::RecordConfig, Step::RemoveLearner]
        );
        assert_eq!(s, seats(&[1, 2, 3], &[5, 7, 8]), "the voters are untouched");
        assert_eq!(c.replica_sets[1].bricks[1].id, 8);
    }

    #[test]
    fn bad_requests_are_refused_before_any_step() {
        let c = config(&[1, 2, 3], &[9]);
        let s = seats(&[1, 2, 3], &[]);
        assert_eq!(next_step(&c, &s, 5, 4), Err(PlanError::NotInVolume(5)));
        assert_eq!(next_step(&c, &s, 3, 2), Err(PlanError::AlreadyInVolume(2)));
        assert_eq!(next_step(&c, &s, 3, 3), Err(PlanError::Same));
        assert_eq!(next_step(&c, &s, 3, 9), Err(PlanError::Retired(9)));
    }
}
