//! When a brick stands for election: pure, driven by events and a clock.
//!
//! openraft 0.9 starts an election on its own timer and raises its term even when it cannot win,
//! so a brick that was paused or cut off and comes back deposes a healthy leader with that
//! higher term. Its own elections are therefore off, and this decides instead: after a wait
//! without hearing from a leader, ask the other voters whether they would vote (pre-vote, Raft
//! thesis §9.6). Only when a majority would does the brick call the real election; a brick whose
//! peers still hear a leader asks, is told no, and keeps its term.

use super::NodeId;
use mortar_proto::replication::majority;
use openraft::LogId;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The election timing of the metadata group.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// A voter that heard from a leader this recently votes for nobody else (openraft's leader
    /// lease, its `election_timeout_max`, which refuses real votes by the same rule).
    pub lease: Duration,
    /// A brick stands after `lease + slack + jitter·spread` without a leader: the slack covers
    /// the spread of one heartbeat between the followers, so the first to ask finds its peers'
    /// leases ended too; the jitter keeps two followers from standing at once.
    pub slack: Duration,
    pub spread: Duration,
}

impl Timing {
    fn wait(&self, jitter: f64) -> Duration {
        self.lease + self.slack + self.spread.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// What the driver does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing until this instant (or the next event).
    Until(Instant),
    /// Ask every other voter for a pre-vote in this round.
    Ask { round: u64 },
    /// A majority would vote for this brick: start the real election.
    Elect,
}

/// What the brick knows of itself when polled.
#[derive(Clone, Copy, Debug)]
pub struct Standing {
    /// A voter of the current membership (learners and retired bricks never stand).
    pub voter: bool,
    /// This brick is the leader.
    pub leading: bool,
    /// Voters in the membership, this brick included.
    pub voters: usize,
}

#[derive(Debug)]
struct Round {
    id: u64,
    voters: usize,
    yes: BTreeSet<NodeId>,
}

/// One brick's candidacy: when it last heard from a leader and the pre-vote round it is in.
#[derive(Debug)]
pub struct Elector {
    timing: Timing,
    /// The last word from a leader, or the start of the current wait.
    since: Instant,
    wait: Duration,
    rounds: u64,
    round: Option<Round>,
}

impl Elector {
    pub fn new(timing: Timing, now: Instant, jitter: f64) -> Elector {
        Elector {
            timing,
            since: now,
            wait: timing.wait(jitter),
            rounds: 0,
            round: None,
        }
    }

    /// A leader was heard (entries or a heartbeat it accepted): no election for another wait.
    pub fn leader_heard(&mut self, at: Instant, jitter: f64) {
        if at > self.since {
            self.since = at;
            self.wait = self.timing.wait(jitter);
            self.round = None;
        }
    }

    /// The instant the current wait ends.
    pub fn deadline(&self) -> Instant {
        self.since + self.wait
    }

    pub fn poll(&mut self, now: Instant, me: Standing, jitter: f64) -> Step {
        if !me.voter || me.leading {
            self.leader_heard(now, jitter);
            return Step::Until(self.deadline());
        }
        if now < self.deadline() {
            return Step::Until(self.deadline());
        }
        // The wait ended with no leader heard: a new round; the next one after another wait,
        // whatever the answers to this one.
        self.rounds += 1;
        self.since = now;
        self.wait = self.timing.wait(jitter);
        self.round = Some(Round {
            id: self.rounds,
            voters: me.voters,
            yes: BTreeSet::new(),
        });
        if majority(me.voters) <= 1 {
            self.round = None;
            return Step::Elect;
        }
        Step::Ask { round: self.rounds }
    }

    /// A voter's answer to round `round`; `Elect` once a majority (this brick included) said yes.
    pub fn answered(&mut self, round: u64, from: NodeId, granted: bool) -> Option<Step> {
        let r = self.round.as_mut().filter(|r| r.id == round)?;
        if !granted {
            return None;
        }
        r.yes.insert(from);
        if r.yes.len() + 1 >= majority(r.voters) {
            self.round = None;
            return Some(Step::Elect);
        }
        None
    }
}

/// The pre-vote answer: yes only when this brick has not heard from a leader for a lease (it
/// leads, or a leader spoke recently: the candidate is the one cut off) and the candidate's log
/// is at least as long as this brick's (the real vote would refuse it otherwise).
pub fn would_vote(
    now: Instant,
    leader_heard: Option<Instant>,
    lease: Duration,
    leading: bool,
    mine: Option<LogId<NodeId>>,
    theirs: Option<LogId<NodeId>>,
) -> bool {
    let lease_over = leader_heard.is_none_or(|t| now >= t + lease);
    !leading && lease_over && theirs >= mine
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    const T: Timing = Timing {
        lease: Duration::from_millis(500),
        slack: Duration::from_millis(100),
        spread: Duration::from_millis(200),
    };
    const FOLLOWER: Standing = Standing {
        voter: true,
        leading: false,
        voters: 3,
    };
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn log(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    #[test]
    fn a_follower_hearing_its_leader_never_stands() {
        let t0 = Instant::now();
        let mut e = Elector::new(T, t0, 0.0);
        for i in 1..100 {
            let now = t0 + ms(100 * i);
            e.leader_heard(now, 0.5);
            assert!(matches!(
                e.poll(now + ms(50), FOLLOWER, 0.5),
                Step::Until(_)
            ));
        }
    }

    #[test]
    fn after_a_silent_wait_it_asks_and_stands_with_one_yes_of_three() {
        let t0 = Instant::now();
        let mut e = Elector::new(T, t0, 0.0);
        assert_eq!(
            e.poll(t0 + ms(599), FOLLOWER, 0.0),
            Step::Until(t0 + ms(600))
        );
        let Step::Ask { round } = e.poll(t0 + ms(600), FOLLOWER, 0.0) else {
            panic!("no round after the wait")
        };
        assert_eq!(e.answered(round, 2, false), None);
        assert_eq!(e.answered(round, 3, true), Some(Step::Elect));
        // The round is over: a late answer changes nothing.
        assert_eq!(e.answered(round, 2, true), None);
    }

    #[test]
    fn refused_it_asks_again_only_after_another_wait_and_ignores_old_answers() {
        let t0 = Instant::now();
        let mut e = Elector::new(T, t0, 0.0);
        let Step::Ask { round: first } = e.poll(t0 + ms(600), FOLLOWER, 0.0) else {
            panic!()
        };
        assert_eq!(e.answered(first, 2, false), None);
        assert_eq!(e.answered(first, 3, false), None);
        // The next wait was drawn when the round began (jitter 0: 600 ms).
        assert_eq!(
            e.poll(t0 + ms(900), FOLLOWER, 1.0),
            Step::Until(t0 + ms(1200))
        );
        let Step::Ask { round: second } = e.poll(t0 + ms(1200), FOLLOWER, 0.0) else {
            panic!()
        };
        assert!(second > first);
        assert_eq!(
            e.answered(first, 2, true),
            None,
            "an answer to an old round"
        );
        assert_eq!(e.answered(second, 2, true), Some(Step::Elect));
    }

    #[test]
    fn a_leader_heard_during_a_round_ends_it() {
        let t0 = Instant::now();
        let mut e = Elector::new(T, t0, 0.0);
        let Step::Ask { round } = e.poll(t0 + ms(600), FOLLOWER, 0.0) else {
            panic!()
        };
        e.leader_heard(t0 + ms(610), 0.0);
        assert_eq!(e.answered(round, 2, true), None);
        assert_eq!(
            e.poll(t0 + ms(620), FOLLOWER, 0.0),
            Step::Until(t0 + ms(1210))
        );
    }

    #[test]
    fn leaders_and_learners_never_stand() {
        let t0 = Instant::now();
        let mut e = Elector::new(T, t0, 0.0);
        let leader = Standing {
            leading: true,
            ..FOLLOWER
        };
        let learner = Standing {
            voter: false,
            ..FOLLOWER
        };
        for i in 1..50 {
            assert!(matches!(
                e.poll(t0 + ms(700 * i), leader, 0.0),
                Step::Until(_)
            ));
            assert!(matches!(
                e.poll(t0 + ms(700 * i + 350), learner, 0.0),
                Step::Until(_)
            ));
        }
        // Once it follows, it waits a whole wait from its last poll as leader or learner.
        let last = t0 + ms(700 * 49 + 350);
        assert_eq!(
            e.poll(last + ms(599), FOLLOWER, 0.0),
            Step::Until(last + ms(600))
        );
    }

    #[test]
    fn a_lone_voter_elects_itself_without_asking() {
        let t0 = Instant::now();
        let mut e = Elector::new(T, t0, 0.0);
        let alone = Standing {
            voters: 1,
            ..FOLLOWER
        };
        assert_eq!(e.poll(t0 + ms(600), alone, 0.0), Step::Elect);
    }

    #[test]
    fn the_jitter_spreads_the_wait_over_its_range() {
        let t0 = Instant::now();
        assert_eq!(Elector::new(T, t0, 0.0).deadline(), t0 + ms(600));
        assert_eq!(Elector::new(T, t0, 1.0).deadline(), t0 + ms(800));
        assert_eq!(Elector::new(T, t0, 7.0).deadline(), t0 + ms(800));
    }

    #[test]
    fn a_voter_says_yes_only_past_the_lease_and_to_a_log_as_long_as_its_own() {
        let t0 = Instant::now();
        let lease = ms(500);
        // A follower last heard its leader at t0 and is asked at `at`.
        let asked =
            |at: u64, mine, theirs| would_vote(t0 + ms(at), Some(t0), lease, false, mine, theirs);
        // A leader spoke 100 ms ago: the candidate is the one that lost it.
        assert!(!asked(100, log(2, 9), log(2, 9)));
        // Silent for the lease: yes to an equal or longer log, no to a shorter one.
        assert!(asked(500, log(2, 9), log(2, 9)));
        assert!(asked(500, log(2, 9), log(3, 4)));
        assert!(!asked(500, log(2, 9), log(2, 8)));
        assert!(!asked(500, log(3, 1), log(2, 9)));
        // Never heard a leader (a fresh start): yes.
        assert!(would_vote(t0, None, lease, false, None, None));
        // The leader itself says no: it is alive.
        assert!(!would_vote(
            t0 + ms(900),
            Some(t0),
            lease,
            true,
            log(2, 9),
            log(2, 9)
        ));
    }

    /// Three bricks under virtual time, 10 ms steps, answers arriving at once. `dead` never
    /// runs; `frozen_until` runs only from then on; a leader heartbeats every live brick each
    /// step. Returns the bricks elected, in order.
    fn run(
        seed: u64,
        mut leader: Option<usize>,
        dead: Option<usize>,
        frozen: (usize, u64),
    ) -> Vec<(usize, Duration)> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let t0 = Instant::now();
        let mut bricks: Vec<Elector> = (0..3).map(|_| Elector::new(T, t0, rng.random())).collect();
        let mut heard: [Option<Instant>; 3] = [Some(t0); 3];
        let mut elected = Vec::new();
        let mut now = t0;
        let up =
            |i: usize, now: Instant| Some(i) != dead && (i != frozen.0 || now >= t0 + ms(frozen.1));
        while now < t0 + Duration::from_secs(10) {
            now += ms(10);
            if let Some(l) = leader.filter(|&l| up(l, now)) {
                for i in (0..3).filter(|&i| i != l && up(i, now)) {
                    heard[i] = Some(now);
                    let j = rng.random();
                    bricks[i].leader_heard(now, j);
                }
            }
            for i in (0..3).filter(|&i| up(i, now)) {
                let me = Standing {
                    voter: true,
                    leading: leader == Some(i),
                    voters: 3,
                };
                let Step::Ask { round } = bricks[i].poll(now, me, rng.random()) else {
                    continue;
                };
                for peer in (0..3).filter(|&p| p != i) {
                    let yes = up(peer, now)
                        && would_vote(
                            now,
                            heard[peer],
                            T.lease,
                            leader == Some(peer),
                            log(1, 5),
                            log(1, 5),
                        );
                    if bricks[i].answered(round, peer as u64, yes) == Some(Step::Elect) {
                        leader = Some(i);
                        elected.push((i, now - t0));
                    }
                }
            }
        }
        elected
    }

    #[test]
    fn when_the_leader_dies_the_survivors_elect_one_of_them_once_past_its_lease() {
        for seed in 0..300 {
            let elected = run(seed, None, Some(0), (0, 0));
            assert_eq!(elected.len(), 1, "seed {seed}: {elected:?}");
            let (who, after) = elected[0];
            assert_ne!(who, 0);
            assert!(
                after >= T.lease + T.slack && after <= T.lease + T.slack + T.spread + ms(10),
                "seed {seed}: {after:?}"
            );
        }
    }

    #[test]
    fn a_follower_frozen_for_seconds_thaws_asks_and_never_stands_against_a_live_leader() {
        for seed in 0..300 {
            let elected = run(seed, Some(0), None, (2, 5_000));
            assert!(elected.is_empty(), "seed {seed}: {elected:?}");
        }
    }

    #[test]
    fn a_frozen_leader_is_replaced_once_and_keeps_quiet_when_it_thaws() {
        for seed in 0..300 {
            // Frozen for 5 s: the others elect; thawed, it leads no more in the model (it
            // steps down at the first answer carrying the higher term) and never stands.
            let elected = run(seed, Some(0), None, (0, 5_000));
            assert_eq!(elected.len(), 1, "seed {seed}: {elected:?}");
            assert_ne!(elected[0].0, 0);
        }
    }
}
