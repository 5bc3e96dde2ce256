//! Chunk placement: rendezvous (highest random weight) hashing of a chunk id over the volume's
//! replica sets, by their numbers. Adding a set moves only the chunks whose highest weight now
//! falls on it; draining a set (`remove-brick`) moves only its own chunks, each to the set of
//! its next highest weight; replacing a brick moves none.

use crate::types::{BrickRef, ChunkId, ReplicaSet, VolumeConfig};

fn weight(chunk: &ChunkId, set: &ReplicaSet) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&chunk.0);
    h.update(&set.id.to_le_bytes());
    let out = h.finalize();
    u64::from_le_bytes(out.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Index of the replica set that holds `chunk` (never a set being drained).
pub fn replica_set_index(volume: &VolumeConfig, chunk: &ChunkId) -> usize {
    highest(volume, chunk, |s| !s.leaving).unwrap_or(0)
}

/// `chunks` grouped by the index of the replica set that holds each, in their order.
pub fn by_set(
    volume: &VolumeConfig,
    chunks: &[ChunkId],
) -> std::collections::BTreeMap<usize, Vec<ChunkId>> {
    let mut sets: std::collections::BTreeMap<usize, Vec<ChunkId>> = Default::default();
    for id in chunks {
        sets.entry(replica_set_index(volume, id))
            .or_default()
            .push(*id);
    }
    sets
}

fn highest(
    volume: &VolumeConfig,
    chunk: &ChunkId,
    among: impl Fn(&ReplicaSet) -> bool,
) -> Option<usize> {
    volume
        .replica_sets
        .iter()
        .enumerate()
        .filter(|(_, set)| among(set))
        .max_by_key(|(_, set)| weight(chunk, set))
        .map(|(i, _)| i)
}

/// While a layout change is under way: the index of the set the previous placement put
/// `chunk` on, when that differs from its set now (the chunk may not have moved yet).
pub fn previous_set_index(volume: &VolumeConfig, chunk: &ChunkId) -> Option<usize> {
    let ids = volume.previous.as_ref()?;
    let before = highest(volume, chunk, |s| ids.contains(&s.id))?;
    (before != replica_set_index(volume, chunk)).then_some(before)
}

/// The bricks to ask for `chunk`, in order: its set, then (during a layout change) the set the
/// previous placement named.
pub fn read_order<'a>(volume: &'a VolumeConfig, chunk: &ChunkId) -> Vec<&'a BrickRef> {
    let mut order: Vec<&BrickRef> = replica_set(volume, chunk).iter().collect();
    if let Some(i) = previous_set_index(volume, chunk) {
        order.extend(&volume.replica_sets[i].bricks);
    }
    order
}

/// The bricks that hold `chunk`.
pub fn replica_set<'a>(volume: &'a VolumeConfig, chunk: &ChunkId) -> &'a [BrickRef] {
    &volume.replica_sets[replica_set_index(volume, chunk)].bricks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Timestamp;
    use crate::BrickId;

    fn volume(sets: u64) -> VolumeConfig {
        VolumeConfig::new(
            "v",
            1 << 20,
            ReplicaSet::numbered(
                (0..sets)
                    .map(|s| (0..3).map(|i| brick(s * 10 + i)).collect())
                    .collect(),
            ),
            Timestamp::default(),
        )
    }

    fn brick(id: BrickId) -> BrickRef {
        BrickRef {
            id,
            addr: format!("h{id}:1"),
        }
    }

    #[test]
    fn during_a_change_readers_look_where_the_chunk_was_placed_before() {
        let mut v = volume(3);
        v.previous = Some(vec![0, 1]);
        let two = volume(2);
        for i in 0..3000u32 {
            let id = ChunkId::of(&i.to_le_bytes());
            let (now, before) = (replica_set_index(&v, &id), replica_set_index(&two, &id));
            assert_eq!(
                previous_set_index(&v, &id),
                (now != before).then_some(before)
            );
            let order: Vec<u64> = read_order(&v, &id).iter().map(|b| b.id).collect();
            let mut want: Vec<u64> = v.replica_sets[now].bricks.iter().map(|b| b.id).collect();
            if now != before {
                want.extend(v.replica_sets[before].bricks.iter().map(|b| b.id));
            }
            assert_eq!(order, want);
        }
    }

    #[test]
    fn replacing_a_brick_moves_no_chunk() {
        let before = volume(2);
        let mut after = before.clone();
        after.replica_sets[1].bricks[1] = brick(99);
        for i in 0..3000u32 {
            let id = ChunkId::of(&i.to_le_bytes());
            assert_eq!(
                replica_set_index(&before, &id),
                replica_set_index(&after, &id)
            );
        }
    }

    #[test]
    fn adding_a_set_moves_only_chunks_that_land_on_it() {
        let two = volume(2);
        let three = volume(3);
        let mut moved = 0;
        for i in 0..3000u32 {
            let id = ChunkId::of(&i.to_le_bytes());
            let before = replica_set_index(&two, &id);
            let after = replica_set_index(&three, &id);
            if before != after {
                assert_eq!(after, 2, "a chunk moved between two old sets");
                moved += 1;
            }
        }
        // About a third should move to the new set; allow wide slack.
        assert!((700..1300).contains(&moved), "moved {moved}");
    }

    #[test]
    fn draining_a_set_moves_only_its_chunks_and_readers_still_find_them_there() {
        let three = volume(3);
        let mut draining = three.clone();
        draining.replica_sets[1].leaving = true;
        draining.previous = Some(vec![0, 1, 2]);
        let (mut moved, mut kept) = (0, 0);
        for i in 0..3000u32 {
            let id = ChunkId::of(&i.to_le_bytes());
            let before = replica_set_index(&three, &id);
            let now = replica_set_index(&draining, &id);
            assert_ne!(now, 1, "nothing is placed on a leaving set");
            if before == 1 {
                moved += 1;
                assert_eq!(previous_set_index(&draining, &id), Some(1));
                let order: Vec<u64> = read_order(&draining, &id).iter().map(|b| b.id).collect();
                assert_eq!(
                    &order[3..],
                    &[10, 11, 12],
                    "the leaving set is asked second"
                );
            } else {
                kept += 1;
                assert_eq!(now, before, "a chunk moved between two staying sets");
                assert_eq!(previous_set_index(&draining, &id), None);
            }
        }
        assert!((700..1300).contains(&moved), "moved {moved}, kept {kept}");
    }
}
