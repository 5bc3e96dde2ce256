//! The replication rules, in one place: how many copies a volume keeps, how its bricks form
//! replica sets, and the quorums that follow — a replica set holds a write once a majority of
//! it does, the metadata group commits once a majority of its voters does. [`WriteTally`]
//! decides, answer by answer, when a chunk write may be acknowledged or must fail. Pure: the
//! brick feeds it the answers.

use crate::{BrickId, FsError};

/// The copies of a replica set that must hold a chunk before its write is acknowledged: a
/// majority, so any two acknowledged states share a brick and one brick's loss loses nothing.
pub const fn write_quorum(set_size: usize) -> usize {
    majority(set_size)
}

/// The smallest number of `n` members that any two such groups share one of.
pub const fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// How a volume keeps its data: `copies` bricks per replica set; one set's bricks (the first,
/// until `remove-brick` of it moves them) are also the metadata group's voters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replication {
    copies: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("only 'replica 3' is supported (got 'replica {0}')")]
    Copies(String),
    #[error("replica 3 needs a multiple of 3 bricks (3, 6, 9, …), got {0}")]
    BrickCount(usize),
}

impl Replication {
    /// What mortar builds: three copies of everything.
    pub const REPLICA_3: Replication = Replication { copies: 3 };

    /// From the `replica N` of a volume create.
    pub fn parse(copies: &str) -> Result<Replication, LayoutError> {
        match copies {
            "3" => Ok(Self::REPLICA_3),
            other => Err(LayoutError::Copies(other.to_string())),
        }
    }

    pub const fn copies(self) -> usize {
        self.copies
    }

    /// Chunk copies that acknowledge a write.
    pub const fn write_quorum(self) -> usize {
        write_quorum(self.copies)
    }

    /// Voters of the metadata group (the first replica set).
    pub const fn metadata_voters(self) -> usize {
        self.copies
    }

    /// Bricks in the order given, cut into replica sets of `copies` (as GlusterFS does:
    /// consecutive bricks form a set).
    pub fn sets<T: Clone>(self, bricks: &[T]) -> Result<Vec<Vec<T>>, LayoutError> {
        if bricks.is_empty() || !bricks.len().is_multiple_of(self.copies) {
            return Err(LayoutError::BrickCount(bricks.len()));
        }
        Ok(bricks.chunks(self.copies).map(<[T]>::to_vec).collect())
    }
}

/// One chunk write to a replica set: who stored it, who did not, and what that decides.
#[derive(Debug)]
pub struct WriteTally {
    set_size: usize,
    holders: Vec<BrickId>,
    missed: Vec<BrickId>,
    /// A replica refused for want of space: the error a failed write gives (it cannot succeed
    /// on retry), rather than "unavailable".
    full: Option<FsError>,
}

impl WriteTally {
    pub fn new(set_size: usize) -> WriteTally {
        WriteTally {
            set_size,
            holders: Vec::new(),
            missed: Vec::new(),
            full: None,
        }
    }

    pub fn stored(&mut self, brick: BrickId) {
        self.holders.push(brick);
    }

    pub fn failed(&mut self, brick: BrickId, e: &FsError) {
        if matches!(e, FsError::NoSpace(_)) {
            self.full = Some(e.clone());
        }
        self.missed.push(brick);
    }

    /// `Some(Ok(copies))` once a quorum holds the chunk, `Some(Err(_))` once one no longer
    /// can, `None` while it depends on answers still to come.
    pub fn outcome(&self) -> Option<Result<u8, FsError>> {
        let quorum = write_quorum(self.set_size);
        if self.holders.len() >= quorum {
            return Some(Ok(self.holders.len() as u8));
        }
        let pending = self
            .set_size
            .saturating_sub(self.holders.len() + self.missed.len());
        if self.holders.len() + pending >= quorum {
            return None;
        }
        Some(Err(self.full.clone().unwrap_or_else(|| {
            FsError::Unavailable(format!(
                "only {} of {} replicas stored the chunk",
                self.holders.len(),
                self.set_size
            ))
        })))
    }

    pub fn holders(&self) -> &[BrickId] {
        &self.holders
    }

    /// Bricks that did not store the chunk (for the heal index).
    pub fn missed(&self) -> &[BrickId] {
        &self.missed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bricks_form_sets_of_three_in_the_order_given() {
        let r = Replication::parse("3").unwrap();
        assert_eq!(
            r.sets(&[1, 2, 3, 4, 5, 6]).unwrap(),
            vec![vec![1, 2, 3], vec![4, 5, 6]]
        );
        assert_eq!(r.sets(&[1, 2, 3, 4]), Err(LayoutError::BrickCount(4)));
        assert_eq!(r.sets::<u8>(&[]), Err(LayoutError::BrickCount(0)));
        assert_eq!(
            Replication::parse("2"),
            Err(LayoutError::Copies("2".into()))
        );
        assert_eq!((r.write_quorum(), r.metadata_voters()), (2, 3));
    }

    #[test]
    fn a_majority_of_the_set_is_the_quorum() {
        assert_eq!(
            [1, 2, 3, 4, 5].map(write_quorum),
            [1, 2, 2, 3, 3],
            "one brick's loss never loses an acknowledged write"
        );
    }

    #[test]
    fn two_of_three_acknowledge_and_the_third_is_a_miss_to_heal() {
        let mut t = WriteTally::new(3);
        assert_eq!(t.outcome(), None);
        t.stored(1);
        assert_eq!(t.outcome(), None);
        t.failed(2, &FsError::Unavailable("frozen".into()));
        assert_eq!(t.outcome(), None, "brick 3 may still answer");
        t.stored(3);
        assert_eq!(t.outcome(), Some(Ok(2)));
        assert_eq!(t.missed(), &[2]);
        assert_eq!(t.holders(), &[1, 3]);
    }

    #[test]
    fn a_write_is_answered_without_waiting_for_the_slowest_replica() {
        let mut t = WriteTally::new(3);
        t.stored(1);
        t.stored(2);
        assert_eq!(t.outcome(), Some(Ok(2)));
    }

    #[test]
    fn two_misses_fail_the_write_as_unavailable_or_as_no_space() {
        let mut t = WriteTally::new(3);
        t.stored(1);
        t.failed(2, &FsError::Unavailable("down".into()));
        t.failed(3, &FsError::Unavailable("down".into()));
        assert!(matches!(t.outcome(), Some(Err(FsError::Unavailable(_)))));

        let mut t = WriteTally::new(3);
        t.failed(1, &FsError::NoSpace("full".into()));
        assert_eq!(t.outcome(), None);
        t.failed(2, &FsError::Unavailable("down".into()));
        assert_eq!(
            t.outcome(),
            Some(Err(FsError::NoSpace("full".into()))),
            "a full disk cannot succeed on retry"
        );
    }
}
