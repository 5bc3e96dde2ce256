//! Chunk-set digests for anti-entropy. A brick's chunk ids are split into [`BUCKETS`] buckets by
//! id prefix; each bucket keeps the XOR of blake3 of its members and their count, so adding or
//! removing one chunk is O(1) and two bricks holding the same set have identical buckets. Heal
//! lists only the buckets that differ.

use crate::types::ChunkId;
use serde::{Deserialize, Serialize};

/// 2^12 buckets: the first 12 bits of the chunk id.
pub const BUCKETS: usize = 4096;

pub fn bucket_of(id: &ChunkId) -> u16 {
    ((id.0[0] as u16) << 4) | (id.0[1] as u16 >> 4)
}

/// The smallest id that falls in `bucket`, for starting a key scan there.
pub fn bucket_start(bucket: u16) -> [u8; 2] {
    [(bucket >> 4) as u8, ((bucket & 0xf) << 4) as u8]
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub xor: [u8; 32],
    pub count: u64,
}

impl Bucket {
    pub const ENCODED_LEN: usize = 40;

    fn fold(&mut self, id: &ChunkId) {
        // Hashing the id again keeps a crafted set of ids from cancelling out.
        let h = blake3::hash(&id.0);
        for (x, b) in self.xor.iter_mut().zip(h.as_bytes()) {
            *x ^= b;
        }
    }

    pub fn add(&mut self, id: &ChunkId) {
        self.fold(id);
        self.count += 1;
    }

    pub fn remove(&mut self, id: &ChunkId) {
        self.fold(id);
        self.count = self.count.saturating_sub(1);
    }

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..32].copy_from_slice(&self.xor);
        out[32..].copy_from_slice(&self.count.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Bucket> {
        if b.len() != Self::ENCODED_LEN {
            return None;
        }
        Some(Bucket {
            xor: b[..32].try_into().ok()?,
            count: u64::from_be_bytes(b[32..].try_into().ok()?),
        })
    }
}

/// Buckets in which the given digests (one per brick, each [`BUCKETS`] long) do not all agree.
pub fn differing_buckets(digests: &[&[Bucket]]) -> Vec<u16> {
    (0..BUCKETS)
        .filter(|&i| {
            let first = digests.first().and_then(|d| d.get(i));
            digests.iter().any(|d| d.get(i) != first)
        })
        .map(|i| i as u16)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    #[test]
    fn buckets_cover_ids_in_key_order() {
        let mut ids: Vec<ChunkId> = (0..2000).map(id).collect();
        ids.sort_by_key(|c| c.0);
        let buckets: Vec<u16> = ids.iter().map(bucket_of).collect();
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
        for c in &ids {
            let start = bucket_start(bucket_of(c));
            assert!(c.0[..2] >= start[..]);
            assert_eq!(
                bucket_of(&ChunkId({
                    let mut b = [0u8; 32];
                    b[..2].copy_from_slice(&start);
                    b
                })),
                bucket_of(c)
            );
        }
    }

    #[test]
    fn same_set_same_digest_in_any_order() {
        let mut a = vec![Bucket::default(); BUCKETS];
        let mut b = vec![Bucket::default(); BUCKETS];
        for n in 0..500 {
            a[bucket_of(&id(n)) as usize].add(&id(n));
        }
        for n in (0..500).rev() {
            b[bucket_of(&id(n)) as usize].add(&id(n));
        }
        assert!(differing_buckets(&[&a, &b]).is_empty());
        // Remove one from b: exactly its bucket differs; adding it back restores equality.
        b[bucket_of(&id(7)) as usize].remove(&id(7));
        assert_eq!(differing_buckets(&[&a, &b]), vec![bucket_of(&id(7))]);
        b[bucket_of(&id(7)) as usize].add(&id(7));
        assert!(differing_buckets(&[&a, &b, &a]).is_empty());
        let enc = a[bucket_of(&id(3)) as usize].encode();
        assert_eq!(Bucket::decode(&enc), Some(a[bucket_of(&id(3)) as usize]));
        assert_eq!(Bucket::decode(&enc[1..]), None);
    }
}
