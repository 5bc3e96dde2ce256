//! A regular file's chunks by index. Chunk `i` holds the file's bytes from `i * chunk_size`;
//! only chunks that hold data are listed, so a hole, and the apparent size of a sparse file,
//! cost nothing: a file truncated to [`MAX_FILE_SIZE`] holds an empty map, and no code path
//! allocates in proportion to a size.

use crate::{ChunkId, FsError};
use serde::{Deserialize, Serialize};

/// Largest file size mortar stores: 16 TiB, the limit ext4 has with 4 KiB blocks. Sizes and
/// write ends beyond it get EFBIG. It leaves every `offset + length` of a request (at most
/// 4 GiB) far from overflowing a u64.
pub const MAX_FILE_SIZE: u64 = 1 << 44;

/// Chunks one file may store (holes do not count). The inode, chunk map included, is one row
/// and one reply, which must fit a frame: 2^19 entries of about 41 bytes are 21 MiB of the 32.
/// That is 512 GiB of written data at the default 1 MiB chunk; more gets EFBIG.
pub const MAX_STORED_CHUNKS: usize = 1 << 19;
const _: () = assert!(MAX_STORED_CHUNKS * 48 < crate::wire::MAX_FRAME);

/// Why a size is refused, or nothing when it is within [`MAX_FILE_SIZE`].
pub fn check_size(size: u64) -> Result<(), FsError> {
    if size > MAX_FILE_SIZE {
        Err(FsError::FileTooBig(size))
    } else {
        Ok(())
    }
}

/// The end of `len` bytes at `offset`, when it lies within [`MAX_FILE_SIZE`] (EFBIG beyond).
pub fn end_of(offset: u64, len: u64) -> Result<u64, FsError> {
    let end = offset
        .checked_add(len)
        .ok_or(FsError::FileTooBig(u64::MAX))?;
    check_size(end)?;
    Ok(end)
}

/// Stored chunks as `(index, id)` pairs, strictly increasing by index. Decoding refuses any
/// other order, so every map in memory can be searched.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<(u64, ChunkId)>")]
pub struct ChunkMap(Vec<(u64, ChunkId)>);

impl TryFrom<Vec<(u64, ChunkId)>> for ChunkMap {
    type Error = String;

    fn try_from(v: Vec<(u64, ChunkId)>) -> Result<Self, String> {
        if v.windows(2).all(|w| w[0].0 < w[1].0) {
            Ok(ChunkMap(v))
        } else {
            Err("chunk indexes must be strictly increasing".into())
        }
    }
}

impl ChunkMap {
    pub fn new() -> ChunkMap {
        ChunkMap::default()
    }

    /// The chunk at index `i`, or None for a hole.
    pub fn get(&self, i: u64) -> Option<&ChunkId> {
        self.0
            .binary_search_by_key(&i, |(k, _)| *k)
            .ok()
            .map(|at| &self.0[at].1)
    }

    /// Put `id` at index `i`, replacing what was there.
    pub fn set(&mut self, i: u64, id: ChunkId) {
        match self.0.binary_search_by_key(&i, |(k, _)| *k) {
            Ok(at) => self.0[at].1 = id,
            Err(at) => self.0.insert(at, (i, id)),
        }
    }

    /// Drop every chunk at index `n` and beyond.
    pub fn truncate(&mut self, n: u64) {
        let keep = self.0.partition_point(|(k, _)| *k < n);
        self.0.truncate(keep);
    }

    /// Stored chunks, by index.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &ChunkId)> {
        self.0.iter().map(|(i, id)| (*i, id))
    }

    /// About the bytes the map takes in a message: an index and an id per chunk.
    pub fn wire_bytes(&self) -> usize {
        self.0.len() * (8 + 32)
    }

    pub fn ids(&self) -> impl Iterator<Item = &ChunkId> {
        self.0.iter().map(|(_, id)| id)
    }

    /// How many chunks are stored (holes not counted).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One past the highest stored index (0 when empty).
    pub fn end(&self) -> u64 {
        self.0.last().map_or(0, |(i, _)| i + 1)
    }
}

/// The difference between two chunk maps, so a commit carries what changed rather than the
/// whole map (which grows with the file: resending it on every flush made the log grow with
/// the square of a file's size).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkPatch {
    /// Everything at this index and beyond goes first.
    pub end: u64,
    /// Indexes below `end` that become holes, increasing.
    pub clear: Vec<u64>,
    /// Chunks put, new or changed.
    pub set: ChunkMap,
}

impl ChunkPatch {
    /// How many chunk entries it names (what it costs, against the map's `len`).
    pub fn len(&self) -> usize {
        self.clear.len() + self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ChunkMap {
    /// What turns `self` into `to`.
    pub fn diff(&self, to: &ChunkMap) -> ChunkPatch {
        let end = to.end();
        let mut clear = Vec::new();
        let mut set = Vec::new();
        // What lies at `end` and beyond goes by truncation.
        let kept = &self.0[..self.0.partition_point(|(i, _)| *i < end)];
        let (mut a, mut b) = (kept.iter().peekable(), to.0.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(&&(i, x)), Some(&&(j, y))) if i == j => {
                    if x != y {
                        set.push((j, y));
                    }
                    a.next();
                    b.next();
                }
                (Some(&&(i, _)), Some(&&(j, _))) if i < j => {
                    clear.push(i);
                    a.next();
                }
                (Some(&&(i, _)), None) => {
                    clear.push(i);
                    a.next();
                }
                (_, Some(&&(j, y))) => {
                    set.push((j, y));
                    b.next();
                }
                (None, None) => break,
            }
        }
        ChunkPatch {
            end,
            clear,
            set: ChunkMap(set),
        }
    }

    /// Apply a patch made by [`ChunkMap::diff`] from this map.
    pub fn apply(&mut self, patch: &ChunkPatch) {
        self.truncate(patch.end);
        if !patch.clear.is_empty() {
            self.0
                .retain(|(i, _)| patch.clear.binary_search(i).is_err());
        }
        for (i, id) in patch.set.iter() {
            self.set(i, *id);
        }
    }
}

impl FromIterator<(u64, ChunkId)> for ChunkMap {
    /// Collect pairs in any order; a later pair for the same index wins.
    fn from_iter<T: IntoIterator<Item = (u64, ChunkId)>>(iter: T) -> Self {
        let mut m = ChunkMap::new();
        for (i, id) in iter {
            m.set(i, id);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    #[test]
    fn holes_cost_nothing_and_read_as_none() {
        let mut m = ChunkMap::new();
        m.set(MAX_FILE_SIZE / (64 * 1024) - 1, id(1));
        m.set(3, id(2));
        m.set(3, id(3));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(3), Some(&id(3)));
        assert_eq!(m.get(4), None);
        assert_eq!(m.end(), MAX_FILE_SIZE / (64 * 1024));
        m.truncate(4);
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(3, &id(3))]);
        m.truncate(0);
        assert!(m.is_empty());
    }

    #[test]
    fn decoding_refuses_unordered_or_repeated_indexes() {
        for bad in [vec![(2, id(1)), (1, id(2))], vec![(1, id(1)), (1, id(2))]] {
            let bytes = crate::wire::encode(&bad);
            assert!(crate::wire::decode::<ChunkMap>(&bytes).is_err());
        }
        let good: ChunkMap = [(5, id(1)), (1, id(2))].into_iter().collect();
        let back: ChunkMap = crate::wire::decode(&crate::wire::encode(&good)).unwrap();
        assert_eq!(back, good);
    }

    #[test]
    fn sizes_past_the_maximum_are_efbig() {
        assert!(check_size(MAX_FILE_SIZE).is_ok());
        assert_eq!(
            check_size(MAX_FILE_SIZE + 1).unwrap_err().errno(),
            libc::EFBIG
        );
        assert_eq!(end_of(u64::MAX, 1).unwrap_err().errno(), libc::EFBIG);
        assert_eq!(end_of((1 << 63) - 1, 0).unwrap_err().errno(), libc::EFBIG);
        assert_eq!(end_of(10, 5), Ok(15));
    }

    #[test]
    fn a_patch_turns_one_map_into_another() {
        let m =
            |pairs: &[(u64, u8)]| -> ChunkMap { pairs.iter().map(|&(i, n)| (i, id(n))).collect() };
        let cases = [
            (m(&[]), m(&[(0, 1), (1, 2)])),
            (m(&[(0, 1), (1, 2)]), m(&[(0, 1), (1, 2), (2, 3)])),
            (m(&[(0, 1), (1, 2), (5, 3)]), m(&[(0, 9), (5, 3)])),
            (m(&[(0, 1), (1, 2), (5, 3)]), m(&[(0, 1)])),
            (m(&[(0, 1), (3, 2)]), m(&[(1, 1), (2, 2), (3, 2), (9, 4)])),
            (m(&[(0, 1), (3, 2)]), m(&[])),
            (m(&[(5, 1)]), m(&[(0, 1), (1, 2)])),
        ];
        for (from, to) in cases {
            let patch = from.diff(&to);
            let mut got = from.clone();
            got.apply(&patch);
            assert_eq!(got, to, "{from:?} -> {to:?} by {patch:?}");
        }
        // Appending one chunk to a long file names one chunk, not the file.
        let long: ChunkMap = (0..1000u64).map(|i| (i, id((i % 250) as u8))).collect();
        let mut longer = long.clone();
        longer.set(1000, id(7));
        assert_eq!(long.diff(&longer).len(), 1);
    }

    #[test]
    fn a_file_stores_at_most_max_stored_chunks() {
        let full: ChunkMap = (0..MAX_STORED_CHUNKS as u64)
            .map(|i| (i * 2, id(1)))
            .collect();
        let size = 2 * MAX_STORED_CHUNKS as u64 * (1 << 20);
        assert!(crate::attrs::check_content(size, &crate::Content::Chunks(full.clone())).is_ok());
        let mut over = full;
        over.set(1, id(2));
        let e = crate::attrs::check_content(size, &crate::Content::Chunks(over)).unwrap_err();
        assert_eq!(e.errno(), libc::EFBIG);
    }
}
