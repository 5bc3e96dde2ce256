//! How far each follower of the metadata group is behind the leader, and for how long. A
//! follower that stays behind (frozen while the log moved on, cut off, unable to take what it
//! is sent) runs the volume without its redundancy, so the operator must see it: the leader
//! samples its last log index and each follower's matched index, and a follower is behind
//! since the oldest sample of the leader's log it has not reached.
//!
//! Pure: driven by [`LagTracker::observe`] with a clock reading; [`run`] feeds it from
//! openraft's metrics.

use crate::raft::{NodeId, Raft};
use mortar_proto::wire::ReplicaLag;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the leader samples its replication state.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Samples kept at most; past it the oldest are merged, which keeps when lagging began.
const MAX_SAMPLES: usize = 4096;

#[derive(Default)]
pub struct LagTracker {
    /// (when, the leader's last log index then), both strictly increasing.
    samples: VecDeque<(Duration, u64)>,
    /// Each follower's matched index at the last observation (None: nothing matched yet).
    matched: BTreeMap<NodeId, Option<u64>>,
    /// When this brick became leader (lag is measured from there at most).
    since: Option<Duration>,
}

impl LagTracker {
    /// Record what the leader sees at `now`. `replication` is None when this brick is not the
    /// leader, which forgets everything.
    pub fn observe(
        &mut self,
        now: Duration,
        last_log: u64,
        replication: Option<&BTreeMap<NodeId, Option<u64>>>,
    ) {
        let Some(replication) = replication else {
            *self = LagTracker::default();
            return;
        };
        let since = *self.since.get_or_insert(now);
        if self.samples.back().is_none_or(|&(_, i)| last_log > i) {
            self.samples.push_back((now.max(since), last_log));
        }
        self.matched = replication.clone();
        // Samples every follower has reached are not needed to date anyone's lag, but the
        // newest stays as the reference for the next.
        let reached = self
            .matched
            .values()
            .map(|m| m.unwrap_or(0))
            .min()
            .unwrap_or(last_log);
        while self.samples.len() > 1 && self.samples[0].1 <= reached {
            self.samples.pop_front();
        }
        while self.samples.len() > MAX_SAMPLES {
            // Keep the oldest time with the newer index: lagging started no later than that.
            let (t, _) = self.samples.pop_front().expect("non-empty");
            self.samples[0].0 = t;
        }
    }

    /// Each follower as of the last observation, judged at `now`.
    pub fn report(&self, now: Duration) -> Vec<ReplicaLag> {
        let last = self.samples.back().map(|&(_, i)| i).unwrap_or(0);
        self.matched
            .iter()
            .map(|(&id, &matched)| {
                let m = matched.unwrap_or(0);
                let behind_since = self
                    .samples
                    .iter()
                    .find(|&&(_, i)| i > m)
                    .map(|&(t, _)| t)
                    .or_else(|| matched.is_none().then_some(self.since).flatten());
                ReplicaLag {
                    id,
                    matched_index: matched,
                    behind_entries: last.saturating_sub(m),
                    behind_ms: behind_since
                        .map(|t| now.saturating_sub(t).as_millis() as u64)
                        .unwrap_or(0),
                }
            })
            .collect()
    }
}

/// The tracker a brick keeps, with the clock it reads.
pub struct Lag {
    start: Instant,
    tracker: Mutex<LagTracker>,
}

impl Lag {
    pub fn new() -> Lag {
        Lag {
            start: Instant::now(),
            tracker: Mutex::default(),
        }
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn report(&self) -> Vec<ReplicaLag> {
        self.tracker.lock().expect("lag lock").report(self.now())
    }
}

impl Default for Lag {
    fn default() -> Lag {
        Lag::new()
    }
}

/// Sample openraft's replication metrics for as long as the brick runs.
pub async fn run(raft: Raft, lag: Arc<Lag>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sample(&raft, &lag);
    }
}

/// Take one sample now. A status report takes one first, so a leader elected since the last
/// tick already reports every follower (it reported none, and heal took that for followers
/// the leader does not replicate).
pub fn sample(raft: &Raft, lag: &Lag) {
    let (last_log, replication) = {
        let m = raft.metrics();
        let m = m.borrow();
        let replication = m.replication.as_ref().map(|r| {
            r.iter()
                .filter(|(id, _)| **id != m.id)
                .map(|(id, l)| (*id, l.map(|l| l.index)))
                .collect::<BTreeMap<_, _>>()
        });
        (m.last_log_index.unwrap_or(0), replication)
    };
    let now = lag.now();
    lag.tracker
        .lock()
        .expect("lag lock")
        .observe(now, last_log, replication.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn at(report: &[ReplicaLag], id: NodeId) -> &ReplicaLag {
        report.iter().find(|r| r.id == id).unwrap()
    }

    #[test]
    fn a_follower_that_keeps_up_is_never_behind_for_long() {
        let mut t = LagTracker::default();
        for sec in 0..100u64 {
            // Each second the log moves on and both followers match it by the next sample.
            let last = sec * 10;
            let prev = sec.saturating_sub(1) * 10;
            t.observe(
                s(sec),
                last,
                Some(&BTreeMap::from([(2, Some(prev)), (3, Some(last))])),
            );
            let r = t.report(s(sec));
            assert!(at(&r, 2).behind_ms <= 1000, "{r:?}");
            assert_eq!(at(&r, 3).behind_ms, 0);
        }
        assert!(t.samples.len() <= 2, "samples no one needs are dropped");
    }

    #[test]
    fn a_frozen_follower_is_behind_since_the_first_entry_it_missed_until_it_catches_up() {
        let mut t = LagTracker::default();
        t.observe(s(0), 5, Some(&BTreeMap::from([(2, Some(5)), (3, Some(5))])));
        // Follower 3 stops at 5 while the log grows.
        for sec in 1..=30 {
            t.observe(
                s(sec),
                5 + sec * 100,
                Some(&BTreeMap::from([(2, Some(5 + sec * 100)), (3, Some(5))])),
            );
        }
        let r = t.report(s(30));
        assert_eq!(
            at(&r, 3).behind_ms,
            29_000,
            "behind since the sample at 1 s"
        );
        assert_eq!(at(&r, 3).behind_entries, 3000);
        assert_eq!(at(&r, 2).behind_ms, 0);
        // Catching up part of the way keeps it behind, since the first entry it still lacks.
        t.observe(
            s(31),
            3005,
            Some(&BTreeMap::from([(2, Some(3005)), (3, Some(1500))])),
        );
        assert_eq!(at(&t.report(s(31)), 3).behind_ms, 16_000);
        t.observe(
            s(32),
            3005,
            Some(&BTreeMap::from([(2, Some(3005)), (3, Some(3005))])),
        );
        let r = t.report(s(32));
        assert_eq!((at(&r, 3).behind_ms, at(&r, 3).behind_entries), (0, 0));
    }

    #[test]
    fn a_follower_never_matched_is_behind_since_this_brick_led() {
        let mut t = LagTracker::default();
        t.observe(s(10), 1, Some(&BTreeMap::from([(2, Some(1)), (3, None)])));
        t.observe(s(25), 1, Some(&BTreeMap::from([(2, Some(1)), (3, None)])));
        let r = t.report(s(25));
        assert_eq!(at(&r, 3).behind_ms, 15_000);
        assert_eq!(at(&r, 3).matched_index, None);
        // Losing the leadership forgets it all.
        t.observe(s(26), 1, None);
        assert!(t.report(s(26)).is_empty());
    }

    #[test]
    fn merging_old_samples_keeps_when_the_lag_began() {
        let mut t = LagTracker::default();
        for i in 0..(MAX_SAMPLES as u64 * 2) {
            t.observe(
                Duration::from_millis(i),
                i + 1,
                Some(&BTreeMap::from([(2, Some(0))])),
            );
        }
        assert!(t.samples.len() <= MAX_SAMPLES);
        let now = Duration::from_millis(MAX_SAMPLES as u64 * 2);
        assert_eq!(at(&t.report(now), 2).behind_ms, now.as_millis() as u64);
    }
}
