//! Bounding the Raft log by bytes as well as by entries. openraft snapshots after a number of
//! entries, but an entry may carry one change or a thousand, with their inline file content: a
//! mount committing a `cp -a` of WordPress makes 21-39 entries of about 1 MB each, so 20,000
//! entries could be 20 GB of log. Here a brick snapshots once the entries appended since its
//! last snapshot pass [`LogBound::snapshot_bytes`], and purges what a snapshot covers beyond a
//! tail of a quarter of that.

use crate::raft::Raft;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Default for `mortar-brick --snapshot-bytes`.
pub const SNAPSHOT_BYTES: u64 = 256 * 1024 * 1024;
/// How often the bound is checked.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// The sizes of the log entries this process appended, oldest first. Entries written before a
/// restart are not counted: until the next snapshot, only the entry count bounds them.
pub struct LogBound {
    snapshot_bytes: u64,
    sizes: Mutex<VecDeque<(u64, u64)>>,
    /// Bytes of every entry appended since start, rewritten ones included.
    total: AtomicU64,
}

impl LogBound {
    pub fn new(snapshot_bytes: u64) -> LogBound {
        LogBound {
            snapshot_bytes,
            sizes: Mutex::default(),
            total: AtomicU64::new(0),
        }
    }

    /// Bytes of every entry this process appended.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn sizes(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, u64)>> {
        self.sizes.lock().expect("log size lock")
    }

    pub fn appended(&self, index: u64, bytes: u64) {
        self.total.fetch_add(bytes, Ordering::Relaxed);
        let mut s = self.sizes();
        // An entry at an index already counted replaces it (the log was truncated first).
        while s.back().is_some_and(|&(i, _)| i >= index) {
            s.pop_back();
        }
        s.push_back((index, bytes));
    }

    /// Entries from `index` on were removed.
    pub fn truncated(&self, index: u64) {
        let mut s = self.sizes();
        while s.back().is_some_and(|&(i, _)| i >= index) {
            s.pop_back();
        }
    }

    /// Entries up to and including `index` were removed.
    pub fn purged(&self, index: u64) {
        let mut s = self.sizes();
        while s.front().is_some_and(|&(i, _)| i <= index) {
            s.pop_front();
        }
    }

    /// Bytes of the counted entries after `after` (from the first for None) up to and
    /// including `upto`.
    fn bytes_between(&self, after: Option<u64>, upto: u64) -> u64 {
        self.sizes()
            .iter()
            .filter(|&&(i, _)| after.is_none_or(|x| i > x) && i <= upto)
            .map(|&(_, b)| b)
            .sum()
    }

    /// The highest index whose purge leaves at most `keep` bytes of counted entries after it;
    /// None while everything counted fits in `keep`.
    fn purge_point(&self, keep: u64) -> Option<u64> {
        let mut kept = 0;
        for &(i, b) in self.sizes().iter().rev() {
            kept += b;
            if kept > keep {
                return Some(i);
            }
        }
        None
    }

    /// Bytes a snapshot now would cover that the last one did not: applied entries only, so
    /// a leader without a quorum (appending, applying nothing) does not snapshot in vain.
    fn unsnapshotted(&self, snapshot: Option<u64>, applied: Option<u64>) -> u64 {
        applied.map_or(0, |a| self.bytes_between(snapshot, a))
    }

    /// What to do now, given the last snapshot's, the last applied and the last purge's index.
    fn due(&self, snapshot: Option<u64>, applied: Option<u64>, purged: Option<u64>) -> Due {
        let snapshot_now = self.unsnapshotted(snapshot, applied) >= self.snapshot_bytes;
        // Only what a snapshot covers may go, and only beyond the tail kept for followers.
        let purge = match (snapshot, self.purge_point(self.snapshot_bytes / 4)) {
            (Some(s), Some(p)) => Some(s.min(p)).filter(|&u| purged.is_none_or(|x| u > x)),
            _ => None,
        };
        Due {
            snapshot: snapshot_now,
            purge,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Due {
    snapshot: bool,
    purge: Option<u64>,
}

/// Keep this brick's log within its bound for as long as the brick runs.
pub async fn run(raft: Raft, bound: Arc<LogBound>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (snapshot, applied, purged) = {
            let m = raft.metrics();
            let m = m.borrow();
            let index = |l: Option<openraft::LogId<u64>>| l.map(|l| l.index);
            (index(m.snapshot), index(m.last_applied), index(m.purged))
        };
        let due = bound.due(snapshot, applied, purged);
        if due.snapshot {
            tracing::info!(
                bytes = bound.unsnapshotted(snapshot, applied),
                "the log passed its byte bound: building a snapshot"
            );
            // openraft ignores this while a snapshot is being built.
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
        if let Some(upto) = due.purge {
            tracing::info!(upto, "purging the log beyond its byte bound");
            if raft.trigger().purge_log(upto).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(sizes: &[(u64, u64)]) -> LogBound {
        let b = LogBound::new(100);
        for &(i, s) in sizes {
            b.appended(i, s);
        }
        b
    }

    #[test]
    fn snapshots_once_the_applied_entries_after_the_last_snapshot_pass_the_bound() {
        let b = bound(&[(1, 40), (2, 40), (3, 30)]);
        assert!(b.due(None, Some(3), None).snapshot);
        assert!(
            !b.due(Some(1), Some(3), None).snapshot,
            "70 bytes after index 1"
        );
        assert!(!b.due(Some(3), Some(3), None).snapshot);
        assert!(
            !b.due(None, Some(2), None).snapshot,
            "entry 3 is not applied"
        );
        assert!(!b.due(None, None, None).snapshot, "nothing applied");
    }

    #[test]
    fn purges_only_what_a_snapshot_covers_and_keeps_a_quarter_of_the_bound() {
        let b = bound(&[(1, 10), (2, 10), (3, 10), (4, 10)]);
        // Keep 25 bytes: entries 3 and 4 (20 bytes) stay, entry 2 would make 30.
        assert_eq!(b.due(Some(4), Some(4), None).purge, Some(2));
        assert_eq!(
            b.due(Some(1), Some(4), None).purge,
            Some(1),
            "not past the snapshot"
        );
        assert_eq!(b.due(None, Some(4), None).purge, None, "no snapshot yet");
        assert_eq!(
            b.due(Some(4), Some(4), Some(2)).purge,
            None,
            "already purged"
        );
        b.purged(2);
        assert_eq!(b.due(Some(4), Some(4), Some(2)).purge, None);
    }

    #[test]
    fn a_truncated_or_rewritten_tail_is_not_counted_twice() {
        let b = bound(&[(1, 40), (2, 40), (3, 40)]);
        b.appended(2, 5);
        assert_eq!(b.bytes_between(None, 3), 45);
        b.truncated(2);
        assert_eq!(b.bytes_between(None, 3), 40);
    }
}
