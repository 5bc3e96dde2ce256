//! Replacing a brick, removing a replica set and moving the metadata group's votes off it, as
//! pure plans: from the volume configuration and the metadata group's membership as they are
//! now, the one next step. The leader takes it, reads both again and asks for the next, so a
//! run interrupted anywhere (CLI, leader or any brick killed) is finished by the next run,
//! which finds the state where the last one left it.
//!
//! The order is: the new brick joins as a learner and catches up; the voters change (openraft
//! goes through a joint configuration, so old and new voter sets both keep a majority); only
//! then does the volume configuration name the new brick. A configuration that names a brick
//! therefore never points clients at one that lacks the log. Removing a set records its drain
//! first, then moves the votes off it if it holds them ([`next_vote_step`]).

use mortar_proto::wire::MetaOp;
use mortar_proto::{BrickId, FsError, VolumeConfig};
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
    #[error("no replica set stays in the volume to hold the metadata group's votes")]
    NoSetForVotes,
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

/// Moving the metadata group's votes off a draining replica set, one step at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VoteStep {
    /// Make every brick of the first set that stays a voter, and take the old voters out of
    /// the group (openraft keeps a leader that is still a member leading, voter or not, so
    /// they leave it whole and come back as learners).
    ChangeVoters(BTreeSet<BrickId>),
    /// Bricks the volume still names that do not follow the log: add them as learners (the
    /// draining set's, after their votes moved; they serve chunks until the commit).
    AddLearners(Vec<BrickId>),
    Done,
}

/// The next step of giving the votes to the first set that stays while a set drains: the
/// votes move whole, so the group keeps one set's failure domain.
pub fn next_vote_step(config: &VolumeConfig, seats: &Seats) -> Result<VoteStep, PlanError> {
    let leaving = |id: &BrickId| config.set_of(*id).is_some_and(|s| s.leaving);
    if seats.voters.iter().any(leaving) {
        let stays = config
            .replica_sets
            .iter()
            .find(|s| !s.leaving)
            .ok_or(PlanError::NoSetForVotes)?;
        return Ok(VoteStep::ChangeVoters(
            stays.bricks.iter().map(|b| b.id).collect(),
        ));
    }
    let member = |id: &BrickId| seats.voters.contains(id) || seats.learners.contains(id);
    let outside: Vec<BrickId> = config
        .bricks()
        .map(|b| b.id)
        .filter(|id| !member(id))
        .collect();
    Ok(if outside.is_empty() {
        VoteStep::Done
    } else {
        VoteStep::AddLearners(outside)
    })
}

/// The change `remove-brick start` (`commit` false) or `commit` proposes for the replica set
/// at index `set`, if any, as the configuration and the group stand; a refusal says what to
/// run. `start` on a set already leaving proposes nothing (it goes on with the vote move and
/// the drain); `commit` needs the drain started, the votes moved and the layout settled.
pub fn removal(
    config: &VolumeConfig,
    seats: &Seats,
    set: usize,
    commit: bool,
) -> Result<Option<MetaOp>, FsError> {
    let s = &config.replica_sets[set];
    let votes_here = s.bricks.iter().any(|b| seats.voters.contains(&b.id));
    match (commit, s.leaving) {
        (false, true) => Ok(None),
        (false, false) => Ok(Some(MetaOp::DrainSet { set: s.id })),
        (true, false) => Err(FsError::Invalid(format!(
            "remove-brick of replica set {} was not started: run remove-brick start first",
            s.id
        ))),
        (true, true) if votes_here => Err(FsError::Busy(format!(
            "replica set {} still holds the metadata group's votes: run remove-brick start \
             again to move them",
            s.id
        ))),
        (true, true) if config.previous.is_some() => Err(FsError::Busy(format!(
            "the drain of replica set {} has not finished: run remove-brick start again to \
             finish it",
            s.id
        ))),
        (true, true) => Ok(Some(MetaOp::RemoveSet { set: s.id })),
    }
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

    fn two_sets(leaving: Option<usize>) -> VolumeConfig {
        let mut c = config(&[1, 2, 3], &[]);
        c.replica_sets.push(ReplicaSet {
            id: 1,
            bricks: [5, 6, 7].map(brick).to_vec(),
            leaving: false,
        });
        if let Some(i) = leaving {
            c.replica_sets[i].leaving = true;
        }
        c
    }

    /// Drive the vote move as the leader does, applying each step to the model state.
    fn move_votes(config: &VolumeConfig, seats: &mut Seats) -> Vec<VoteStep> {
        let mut taken = Vec::new();
        loop {
            let step = next_vote_step(config, seats).expect("plan");
            match &step {
                VoteStep::ChangeVoters(v) => {
                    seats.learners.retain(|id| !v.contains(id));
                    seats.voters = v.clone();
                }
                VoteStep::AddLearners(ids) => seats.learners.extend(ids),
                VoteStep::Done => return taken,
            }
            taken.push(step);
        }
    }

    #[test]
    fn the_votes_move_whole_to_the_first_set_that_stays() {
        let mut s = seats(&[1, 2, 3], &[5, 6, 7]);
        assert_eq!(move_votes(&two_sets(None), &mut s), vec![]);
        assert_eq!(
            move_votes(&two_sets(Some(1)), &mut s),
            vec![],
            "draining a set without votes moves nothing"
        );
        assert_eq!(
            move_votes(&two_sets(Some(0)), &mut s),
            vec![
                VoteStep::ChangeVoters([5, 6, 7].into()),
                VoteStep::AddLearners(vec![1, 2, 3])
            ]
        );
        assert_eq!(s, seats(&[5, 6, 7], &[1, 2, 3]));
    }

    #[test]
    fn a_vote_move_stopped_anywhere_is_finished_by_the_next_run() {
        let c = two_sets(Some(0));
        let done = seats(&[5, 6, 7], &[1, 2, 3]);
        for (mut s, first) in [
            // A joint configuration left by a crash: the same change finishes it.
            (
                seats(&[1, 2, 3, 5, 6, 7], &[]),
                VoteStep::ChangeVoters([5, 6, 7].into()),
            ),
            // The voters moved; the old ones are not back as learners yet.
            (seats(&[5, 6, 7], &[]), VoteStep::AddLearners(vec![1, 2, 3])),
            (seats(&[5, 6, 7], &[1]), VoteStep::AddLearners(vec![2, 3])),
            (done.clone(), VoteStep::Done),
        ] {
            assert_eq!(next_vote_step(&c, &s), Ok(first));
            move_votes(&c, &mut s);
            assert_eq!(s, done);
        }
    }

    #[test]
    fn the_votes_stay_when_no_set_would_be_left_to_hold_them() {
        let mut c = two_sets(Some(0));
        c.replica_sets[1].leaving = true;
        let s = seats(&[1, 2, 3], &[5, 6, 7]);
        assert_eq!(next_vote_step(&c, &s), Err(PlanError::NoSetForVotes));
    }

    #[test]
    fn commit_waits_for_the_start_the_votes_and_the_drain() {
        let voting = seats(&[1, 2, 3], &[5, 6, 7]);
        let moved = seats(&[5, 6, 7], &[1, 2, 3]);
        let says = |r: Result<Option<MetaOp>, FsError>, what: &str| match r {
            Err(e) => assert!(e.to_string().contains(what), "{e}"),
            Ok(op) => panic!("{op:?} where '{what}' was due"),
        };
        let c = two_sets(None);
        assert_eq!(
            removal(&c, &voting, 0, false),
            Ok(Some(MetaOp::DrainSet { set: 0 }))
        );
        says(removal(&c, &voting, 0, true), "was not started");
        let mut draining = two_sets(Some(0));
        draining.previous = Some(vec![0, 1]);
        assert_eq!(removal(&draining, &voting, 0, false), Ok(None));
        says(
            removal(&draining, &voting, 0, true),
            "still holds the metadata group's votes",
        );
        says(removal(&draining, &moved, 0, true), "has not finished");
        draining.previous = None;
        assert_eq!(
            removal(&draining, &moved, 0, true),
            Ok(Some(MetaOp::RemoveSet { set: 0 }))
        );
        // A set without votes is not held back by them.
        let mut second = two_sets(Some(1));
        assert_eq!(
            removal(&second, &voting, 1, true),
            Ok(Some(MetaOp::RemoveSet { set: 1 }))
        );
        second.replica_sets[1].leaving = false;
        assert_eq!(
            removal(&second, &voting, 1, false),
            Ok(Some(MetaOp::DrainSet { set: 1 }))
        );
    }
}
