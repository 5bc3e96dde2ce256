//! Verified range reads of a chunk. A chunk is cut into groups of [`GROUP`] bytes, a power of
//! two of BLAKE3's 1 KiB chunks, so every group is a subtree of the chunk's BLAKE3 tree. A brick
//! answers a range with the whole groups it covers and the chaining value of every group; the
//! reader rebuilds the chunk's id from the values and hashes the groups it got to theirs. A
//! 4 KiB read of a 1 MiB chunk then moves 16 KiB and 2 KiB of values instead of the chunk, and
//! is verified against the id all the same.

use crate::{ChunkId, FsError};
use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// Bytes per group: 16 BLAKE3 chunks.
pub const GROUP: usize = 16 * 1024;
const _: () = assert!(GROUP.is_power_of_two() && GROUP >= blake3::CHUNK_LEN);

/// The chaining value of each group of `data`, and the chunk id they make. A chunk of one
/// group has no group values (its id is its plain hash).
pub fn group_values(data: &[u8]) -> (Vec<ChainingValue>, ChunkId) {
    if data.len() <= GROUP {
        return (Vec::new(), ChunkId::of(data));
    }
    let values: Vec<ChainingValue> = data
        .chunks(GROUP)
        .enumerate()
        .map(|(i, g)| {
            blake3::Hasher::new()
                .set_input_offset((i * GROUP) as u64)
                .update(g)
                .finalize_non_root()
        })
        .collect();
    let id = ChunkId(*root(&values).as_bytes());
    (values, id)
}

/// The root of a tree of two or more group values, shaped as BLAKE3 shapes it: the left
/// subtree holds the largest power of two of groups below the count.
fn root(values: &[ChainingValue]) -> blake3::Hash {
    let split = left_size(values.len());
    merge_subtrees_root(
        &subtree(&values[..split]),
        &subtree(&values[split..]),
        Mode::Hash,
    )
}

fn subtree(values: &[ChainingValue]) -> ChainingValue {
    if values.len() == 1 {
        return values[0];
    }
    let split = left_size(values.len());
    merge_subtrees_non_root(
        &subtree(&values[..split]),
        &subtree(&values[split..]),
        Mode::Hash,
    )
}

/// The largest power of two below `n` (n >= 2).
fn left_size(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The groups a read of `len` bytes at `offset` of a chunk of `chunk_len` bytes needs, as a
/// byte range of the chunk (whole groups; the end clipped to the chunk).
pub fn covering(offset: u64, len: u64, chunk_len: u64) -> std::ops::Range<u64> {
    let g = GROUP as u64;
    let start = (offset / g) * g;
    let end = offset.saturating_add(len).div_ceil(g).saturating_mul(g);
    start.min(chunk_len)..end.min(chunk_len)
}

/// Check a brick's answer to a read of `want` (a byte range) of chunk `id`: `data` must be
/// the groups [`covering`] it, from byte `start`; `values` must make the id, and every group
/// must hash to its value.
pub fn verify(
    id: &ChunkId,
    want: std::ops::Range<u64>,
    chunk_len: u64,
    values: &[ChainingValue],
    start: u64,
    data: &[u8],
) -> Result<(), FsError> {
    let bad = |why: &str| Err(FsError::HashMismatch(format!("{}: {why}", id.to_hex())));
    if chunk_len <= GROUP as u64 {
        return match start == 0 && data.len() as u64 == chunk_len && id.matches(data) {
            true => Ok(()),
            false => bad("a one-group chunk must come whole and match its id"),
        };
    }
    if values.len() as u64 != chunk_len.div_ceil(GROUP as u64) {
        return bad("wrong number of group values");
    }
    if ChunkId(*root(values).as_bytes()) != *id {
        return bad("the group values do not make the chunk's id");
    }
    let covers = covering(want.start, want.end - want.start, chunk_len);
    if start != covers.start || start + data.len() as u64 != covers.end {
        return bad("the answer is not the groups that cover the read");
    }
    let first = (start / GROUP as u64) as usize;
    for (i, g) in data.chunks(GROUP).enumerate() {
        let at = first + i;
        let whole = (at as u64 + 1) * GROUP as u64 <= chunk_len;
        if g.len() < GROUP && whole {
            return bad("a group came short");
        }
        let value = blake3::Hasher::new()
            .set_input_offset((at * GROUP) as u64)
            .update(g)
            .finalize_non_root();
        if value != values[at] {
            return bad("a group does not match its value");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Bytes with no repeating pattern (no two groups alike), from `seed`.
    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn group_values_make_blake3s_hash_at_every_shape() {
        let sizes = [
            0,
            1,
            GROUP - 1,
            GROUP,
            GROUP + 1,
            2 * GROUP,
            3 * GROUP - 5,
            5 * GROUP,
            17 * GROUP + 3,
            1 << 20,
            (1 << 20) - 1,
            (1 << 20) + 1,
            4 << 20,
        ];
        for len in sizes {
            let data = bytes(len, 7);
            let (values, id) = group_values(&data);
            assert_eq!(id, ChunkId::of(&data), "{len} bytes");
            assert_eq!(
                values.len(),
                if len <= GROUP { 0 } else { len.div_ceil(GROUP) }
            );
        }
    }

    #[test]
    fn a_range_verifies_and_any_wrong_byte_or_value_is_caught() {
        let data = bytes(1 << 20, 3);
        let (values, id) = group_values(&data);
        let r = covering(100_000, 4096, data.len() as u64);
        assert_eq!(r, 98_304..114_688);
        let slice = &data[r.start as usize..r.end as usize];
        let want = 100_000..104_096;
        let n = data.len() as u64;
        verify(&id, want.clone(), n, &values, r.start, slice).unwrap();

        let mut flipped = slice.to_vec();
        flipped[5] ^= 1;
        assert!(verify(&id, want.clone(), n, &values, r.start, &flipped).is_err());
        let mut forged = values.clone();
        forged[0][0] ^= 1;
        assert!(verify(&id, want.clone(), n, &forged, r.start, slice).is_err());
        // The right bytes presented as another group's, or too few of them.
        let next = r.start + GROUP as u64;
        assert!(verify(&id, next..next + 10, n, &values, next, slice).is_err());
        assert!(verify(&id, want.clone(), n, &values, r.start, &slice[..GROUP / 2]).is_err());
        assert!(verify(&id, want.clone(), n, &values, r.start, &[]).is_err());
        assert!(verify(&id, want.clone(), n + 1, &values, r.start, slice).is_err());
        // A short chunk comes whole.
        let small = bytes(9000, 1);
        let (none, small_id) = group_values(&small);
        verify(&small_id, 0..10, 9000, &none, 0, &small).unwrap();
        assert!(verify(&small_id, 0..10, 9000, &none, 0, &small[..4096]).is_err());
        // Past the end of a chunk (a file's tail after it grew) there are no bytes to read.
        let past = (2 << 20)..(2 << 20) + 4096;
        assert_eq!(covering(past.start, 4096, n), n..n);
        verify(&id, past.clone(), n, &values, n, &[]).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any range of any chunk length verifies from the groups `covering` names, and the
        /// groups cover the range.
        #[test]
        fn every_covering_range_verifies(len in 1usize..(300 * 1024), offset in 0u64..(300 * 1024), want in 1u64..(70 * 1024), seed in any::<u8>()) {
            let data = bytes(len, seed);
            let (values, id) = group_values(&data);
            let offset = offset % len as u64;
            let r = if len <= GROUP { 0..len as u64 } else { covering(offset, want, len as u64) };
            prop_assert!(r.start <= offset && (r.end >= (offset + want).min(len as u64)));
            let slice = &data[r.start as usize..r.end as usize];
            prop_assert!(verify(&id, offset..offset + want, len as u64, &values, r.start, slice).is_ok());
        }
    }
}
