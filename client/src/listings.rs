//! What the last listings of directories said about their order and their subdirectories,
//! for reading ahead of a reader going through a tree: the next files' first chunks in name
//! order (a deploy being checked, a backup, a web server's cold cache), and the listings of
//! the subdirectories of a directory it is in, so its next directory is known before it gets
//! there. Only the shape is kept here; what to fetch is read from the namespace cache when it
//! is needed.

use lru::LruCache;
use mortar_proto::InodeId;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;

/// Directories whose order is remembered (the most recently listed).
const DIRS: usize = 1024;
/// How many entries past the file being read the next chunked files are looked for.
const LOOK_AHEAD: usize = 64;
/// Subdirectories of one directory listed ahead at most.
pub const SUBDIRS_AHEAD: usize = 32;

/// A regular file as listed: its inode, and whether its content is in chunks (an inline
/// file's content came with the listing and needs no fetch).
pub type Listed = (InodeId, bool);

pub struct Listings {
    inner: Mutex<Inner>,
}

struct Listing {
    /// Its regular files in name order.
    files: Vec<Listed>,
    /// Its first subdirectories in name order (up to [`SUBDIRS_AHEAD`]).
    subdirs: Vec<InodeId>,
    /// Listed ahead of any reader, and no reader has looked in it since.
    ahead: bool,
}

struct Inner {
    dirs: LruCache<InodeId, Listing>,
    /// Where each listed file stands: its directory and position.
    place: HashMap<InodeId, (InodeId, usize)>,
}

impl Inner {
    fn forget(&mut self, dir: InodeId, files: &[Listed]) {
        for (ino, _) in files {
            if self.place.get(ino).is_some_and(|(d, _)| *d == dir) {
                self.place.remove(ino);
            }
        }
    }
}

impl Default for Listings {
    fn default() -> Self {
        Listings {
            inner: Mutex::new(Inner {
                dirs: LruCache::new(NonZeroUsize::new(DIRS).expect("DIRS > 0")),
                place: HashMap::new(),
            }),
        }
    }
}

impl Listings {
    /// `dir` was listed: its regular files and subdirectories in name order; `ahead`: listed
    /// ahead of a reader rather than for one.
    pub fn listed(&self, dir: InodeId, files: Vec<Listed>, mut subdirs: Vec<InodeId>, ahead: bool) {
        subdirs.truncate(SUBDIRS_AHEAD);
        let mut g = self.inner.lock().expect("listings lock");
        if let Some(old) = g.dirs.pop(&dir) {
            g.forget(dir, &old.files);
        }
        for (i, (ino, _)) in files.iter().enumerate() {
            g.place.insert(*ino, (dir, i));
        }
        let listing = Listing {
            files,
            subdirs,
            ahead,
        };
        if let Some((gone, old)) = g.dirs.push(dir, listing) {
            if gone != dir {
                g.forget(gone, &old.files);
            }
        }
    }

    /// A reader looked in `dir`: the subdirectories to list ahead of it, the first time it
    /// looks in a directory listed ahead (a directory listed for a reader says so when listed).
    pub fn looked_in(&self, dir: InodeId) -> Vec<InodeId> {
        let mut g = self.inner.lock().expect("listings lock");
        match g.dirs.peek_mut(&dir) {
            Some(l) if l.ahead => {
                l.ahead = false;
                l.subdirs.clone()
            }
            _ => Vec::new(),
        }
    }

    /// Up to `n` chunked files listed after `ino` in its directory (within [`LOOK_AHEAD`]
    /// entries), nearest first; none if `ino` was not in a listing remembered here.
    pub fn next_chunked(&self, ino: InodeId, n: usize) -> Vec<InodeId> {
        let mut g = self.inner.lock().expect("listings lock");
        let Some(&(dir, at)) = g.place.get(&ino) else {
            return Vec::new();
        };
        let Some(l) = g.dirs.get(&dir) else {
            return Vec::new();
        };
        l.files
            .iter()
            .skip(at + 1)
            .take(LOOK_AHEAD)
            .filter(|(_, chunked)| *chunked)
            .map(|(i, _)| *i)
            .take(n)
            .collect()
    }

    #[cfg(test)]
    fn places(&self) -> usize {
        self.inner.lock().expect("listings lock").place.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(range: std::ops::Range<u64>, chunked: impl Fn(u64) -> bool) -> Vec<Listed> {
        range.map(|i| (i, chunked(i))).collect()
    }

    #[test]
    fn the_next_chunked_files_in_listing_order_nearest_first() {
        let s = Listings::default();
        s.listed(1, files(10..20, |i| i % 3 == 0), vec![], false);
        assert_eq!(s.next_chunked(10, 2), vec![12, 15]);
        assert_eq!(s.next_chunked(12, 8), vec![15, 18]);
        assert_eq!(s.next_chunked(18, 8), Vec::<u64>::new());
        // Not listed anywhere: nothing to go by.
        assert_eq!(s.next_chunked(99, 8), Vec::<u64>::new());
    }

    #[test]
    fn only_entries_close_ahead_are_looked_at() {
        let s = Listings::default();
        let far = LOOK_AHEAD as u64 + 1;
        s.listed(1, files(0..far + 1, |i| i == far), vec![], false);
        assert_eq!(s.next_chunked(0, 4), Vec::<u64>::new());
        assert_eq!(s.next_chunked(1, 4), vec![far]);
    }

    #[test]
    fn a_new_listing_replaces_the_old_order_and_forgets_files_gone() {
        let s = Listings::default();
        s.listed(1, files(10..14, |_| true), vec![], false);
        s.listed(1, files(12..16, |_| true), vec![], false);
        assert_eq!(s.next_chunked(10, 4), Vec::<u64>::new());
        assert_eq!(s.next_chunked(12, 4), vec![13, 14, 15]);
        assert_eq!(s.places(), 4);
        // A file (a hard link) listed in a second directory goes by the latest listing; the
        // first directory listed again without it does not forget it there.
        s.listed(2, vec![(13, true), (40, true)], vec![], false);
        assert_eq!(s.next_chunked(13, 4), vec![40]);
        s.listed(1, vec![(12, true), (14, true)], vec![], false);
        assert_eq!(s.next_chunked(13, 4), vec![40]);
        assert_eq!(s.next_chunked(12, 4), vec![14]);
    }

    #[test]
    fn memory_is_bounded_by_the_directories_remembered() {
        let s = Listings::default();
        for d in 0..(DIRS as u64 + 10) {
            s.listed(d, files(d * 100..d * 100 + 3, |_| true), vec![], false);
        }
        assert_eq!(s.places(), DIRS * 3);
        // The oldest directories are forgotten with their files.
        assert_eq!(s.next_chunked(0, 4), Vec::<u64>::new());
        let last = DIRS as u64 + 9;
        assert_eq!(
            s.next_chunked(last * 100, 4),
            vec![last * 100 + 1, last * 100 + 2]
        );
    }

    #[test]
    fn a_directory_listed_ahead_hands_on_its_subdirectories_once_when_looked_in() {
        let s = Listings::default();
        s.listed(1, vec![], vec![2, 3], false);
        assert_eq!(
            s.looked_in(1),
            Vec::<u64>::new(),
            "listed for a reader: said then"
        );
        s.listed(2, vec![(20, false)], vec![4, 5], true);
        assert_eq!(s.looked_in(2), vec![4, 5]);
        assert_eq!(s.looked_in(2), Vec::<u64>::new(), "only the first look");
        assert_eq!(s.looked_in(9), Vec::<u64>::new(), "never listed");
        let many: Vec<u64> = (100..100 + SUBDIRS_AHEAD as u64 + 5).collect();
        s.listed(3, vec![], many, true);
        assert_eq!(s.looked_in(3).len(), SUBDIRS_AHEAD);
    }
}
