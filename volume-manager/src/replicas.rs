//! Judging the metadata group from the bricks' statuses: is there a leader, and which followers
//! have stayed behind it. `volume status` and `volume heal` both report what this finds.

use mortar_proto::wire::{BrickStatus, ReplicaLag};
use mortar_proto::BrickRef;

/// Default for `--max-lag`: a follower behind the leader for longer than this has not caught up.
pub const MAX_LAG_SECS: u64 = 10;

/// The leader's status among those that answered: the highest term wins (a deposed leader
/// that has not heard of the election yet also says "leader").
pub fn leader<E>(statuses: &[Result<BrickStatus, E>]) -> Option<&BrickStatus> {
    statuses
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .filter(|s| s.raft_role == "leader")
        .max_by_key(|s| s.term)
}

/// What the leader knows about brick `id` (None for the leader itself or an unknown brick).
pub fn lag_of(leader: &BrickStatus, id: u64) -> Option<&ReplicaLag> {
    leader.replicas.iter().find(|r| r.id == id)
}

/// Problems with the metadata group: no leader, or followers behind it for `max_lag_secs` or
/// more, each naming the brick.
pub fn problems<E>(
    bricks: &[BrickRef],
    statuses: &[Result<BrickStatus, E>],
    max_lag_secs: u64,
) -> Vec<String> {
    let Some(leader) = leader(statuses) else {
        return vec!["no brick is the metadata leader (no quorum?)".into()];
    };
    bricks
        .iter()
        .filter(|b| b.id != leader.id)
        .filter_map(|b| match lag_of(leader, b.id) {
            None => Some(format!(
                "brick {} (id {}) is not replicated by the metadata leader {}",
                b.addr, b.id, leader.id
            )),
            Some(l) if l.behind_ms >= max_lag_secs * 1000 => Some(format!(
                "brick {} (id {}) is {} metadata entries behind the leader for {:.0} s \
                 (it holds up to index {}); it has not caught up",
                b.addr,
                b.id,
                l.behind_entries,
                l.behind_ms as f64 / 1000.0,
                l.matched_index.map_or("none".into(), |i| i.to_string()),
            )),
            Some(_) => None,
        })
        .collect()
}

/// The status table's "Behind" cell for brick `id`.
pub fn behind_cell(leader: Option<&BrickStatus>, id: u64) -> String {
    match leader {
        None => "?".into(),
        Some(l) if l.id == id => "-".into(),
        Some(l) => match lag_of(l, id) {
            None => "?".into(),
            Some(r) if r.behind_ms == 0 => "0".into(),
            Some(r) => format!("{} {:.0}s", r.behind_entries, r.behind_ms as f64 / 1000.0),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: u64, role: &str, term: u64, replicas: Vec<ReplicaLag>) -> BrickStatus {
        BrickStatus {
            id,
            volume: Some("v".into()),
            raft_role: role.into(),
            leader: Some(1),
            applied_index: 0,
            last_log_index: 0,
            chunk_count: 0,
            chunk_bytes: 0,
            heal_backlog: 0,
            peers: Vec::new(),
            term,
            replicas,
            log_bytes: 0,
            disk_bytes: 0,
            layout_epoch: 0,
            longest_leader_gap_ms: 0,
        }
    }

    fn lag(id: u64, behind_ms: u64) -> ReplicaLag {
        ReplicaLag {
            id,
            matched_index: Some(7),
            behind_entries: if behind_ms > 0 { 40 } else { 0 },
            behind_ms,
        }
    }

    fn bricks() -> Vec<BrickRef> {
        (1..=3)
            .map(|id| BrickRef {
                id,
                addr: format!("10.0.0.{id}:7001"),
            })
            .collect()
    }

    #[test]
    fn a_follower_behind_past_the_bound_is_named_and_one_briefly_behind_is_not() {
        let statuses: Vec<Result<BrickStatus, ()>> = vec![
            Ok(status(1, "leader", 3, vec![lag(2, 500), lag(3, 12_000)])),
            Ok(status(2, "follower", 3, vec![])),
            Err(()),
        ];
        let p = problems(&bricks(), &statuses, 10);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("10.0.0.3:7001") && p[0].contains("40 metadata entries"),
            "{p:?}"
        );
        assert!(problems(&bricks(), &statuses, 20).is_empty());
        assert_eq!(behind_cell(leader(&statuses), 1), "-");
        assert_eq!(behind_cell(leader(&statuses), 3), "40 12s");
    }

    #[test]
    fn no_leader_or_a_brick_the_leader_does_not_replicate_is_a_problem() {
        let none: Vec<Result<BrickStatus, ()>> = vec![Ok(status(1, "candidate", 4, vec![]))];
        assert_eq!(problems(&bricks(), &none, 10).len(), 1);
        // A deposed leader at a lower term is not the leader.
        let two: Vec<Result<BrickStatus, ()>> = vec![
            Ok(status(1, "leader", 3, vec![])),
            Ok(status(2, "leader", 5, vec![lag(1, 0), lag(3, 0)])),
        ];
        assert!(problems(&bricks(), &two, 10).is_empty());
        let missing: Vec<Result<BrickStatus, ()>> =
            vec![Ok(status(1, "leader", 3, vec![lag(2, 0)]))];
        let p = problems(&bricks(), &missing, 10);
        assert!(p.len() == 1 && p[0].contains("not replicated"), "{p:?}");
    }
}
