//! Identifiers and attribute types shared by bricks and clients.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Inode number. 1 is the volume root, as FUSE expects.
pub type InodeId = u64;
pub const ROOT_INODE: InodeId = 1;

/// Which volume of a brick group an inode belongs to: 0 for the volume the bricks were
/// created with, n for its n-th clone (`mortar snapshot clone`). It is the inode number's top
/// 16 bits, so numbers never collide across volumes and caches, invalidations, delegations
/// and garbage collection need not know about clones.
pub type VolumeNo = u16;
const VOLUME_SHIFT: u32 = 48;
/// Largest inode number within one volume.
pub const INO_IN_VOLUME_MAX: u64 = (1 << VOLUME_SHIFT) - 1;

pub fn volume_of(ino: InodeId) -> VolumeNo {
    (ino >> VOLUME_SHIFT) as VolumeNo
}

/// Inode number `n` of volume `volume` (`n` at most [`INO_IN_VOLUME_MAX`]).
pub fn ino_in(volume: VolumeNo, n: u64) -> InodeId {
    (u64::from(volume) << VOLUME_SHIFT) | (n & INO_IN_VOLUME_MAX)
}

/// The root directory of `volume`.
pub fn root_of(volume: VolumeNo) -> InodeId {
    ino_in(volume, ROOT_INODE)
}

pub fn is_root(ino: InodeId) -> bool {
    ino == root_of(volume_of(ino))
}

/// Volume names (and so clone names): 1-64 letters, digits, '-' or '_'.
pub fn valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Raft node id of a brick; random, chosen once when the brick's data directory is created.
pub type BrickId = u64;

/// Longest name component, as in Linux (NAME_MAX).
pub const NAME_MAX: usize = 255;
/// Longest symlink target (PATH_MAX).
pub const SYMLINK_MAX: usize = 4096;
/// Largest extended attribute value (XATTR_SIZE_MAX).
pub const XATTR_VALUE_MAX: usize = 64 * 1024;
/// Default volume chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Largest chunk size a volume may be created with.
pub const MAX_CHUNK_SIZE: u32 = 8 * 1024 * 1024;
/// Files up to this size are kept inline in their inode (no chunk round trips).
pub const INLINE_MAX: usize = 64 * 1024;

/// Content address of an immutable chunk: the blake3 hash of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(bytes: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(bytes).as_bytes())
    }
    pub fn matches(&self, bytes: &[u8]) -> bool {
        ChunkId::of(bytes) == *self
    }
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    /// Whether a mknod of this kind may be made under a directory delegation (and committed
    /// later as a [`crate::wire::MetaOp::Local`]): regular files and FIFOs, which hold nothing
    /// the leader must check. Devices and sockets are rare in a document root and go to the
    /// leader at once.
    pub fn mknod_under_delegation(self) -> bool {
        matches!(self, FileKind::Regular | FileKind::Fifo)
    }

    /// The S_IFMT bits for this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::Regular => libc::S_IFREG,
            FileKind::Directory => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }
}

/// Attributes of an inode as clients see them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: InodeId,
    pub kind: FileKind,
    /// Permission bits only (07777); the kind carries the type.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// Bumped on every change of content; lets writers detect concurrent updates.
    pub version: u64,
}

/// How a file's bytes are held.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    /// Directories, FIFOs, devices, sockets.
    None,
    Symlink(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Small files live in the inode itself.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The chunk-size slices of the file that hold data; the rest are holes that read as
    /// zeros.
    Chunks(crate::ChunkMap),
}

/// A whole inode: what the client needs to read a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub attr: Attr,
    pub content: Content,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Inode {
    /// Bytes of xattr names and values, for memory and batch budgets.
    pub fn xattr_bytes(&self) -> usize {
        self.xattrs.iter().map(|(n, v)| n.len() + v.len()).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub attr: Attr,
}

/// One brick as the volume layout names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrickRef {
    pub id: BrickId,
    pub addr: String,
}

/// One replica set: its bricks, and the number that places chunks on it for ever. Placement
/// hashes the number, never the bricks, so replacing a brick moves no chunk between sets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSet {
    pub id: u32,
    pub bricks: Vec<BrickRef>,
    /// Being drained by `remove-brick`: placement no longer names it, readers still look
    /// there while its chunks move, and `remove-brick commit` takes it out of the volume.
    pub leaving: bool,
}

impl ReplicaSet {
    /// Sets numbered in order from 0, as a new volume's are.
    pub fn numbered(sets: Vec<Vec<BrickRef>>) -> Vec<ReplicaSet> {
        sets.into_iter()
            .enumerate()
            .map(|(i, bricks)| ReplicaSet {
                id: i as u32,
                bricks,
                leaving: false,
            })
            .collect()
    }
}

/// The volume's configuration, held in the metadata group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    pub name: String,
    pub chunk_size: u32,
    /// Replica sets of three bricks; the first one also runs the metadata group.
    pub replica_sets: Vec<ReplicaSet>,
    pub created: Timestamp,
    /// Bricks replaced out of the volume, as they were named. Their ids are refused for ever (a
    /// retired brick that comes back must not vote or lead); brick ids are random, so never
    /// reused. Their addresses may be, by the bricks that replaced them.
    pub retired: Vec<BrickRef>,
    /// Raised by every change of the replica sets (add-brick, a rebalance's end).
    pub epoch: u64,
    /// While a rebalance moves chunks to the placement over all of `replica_sets`: the numbers
    /// of the sets the previous placement hashed over. Readers look there second; heal leaves
    /// the moving chunks to the rebalance. None when no layout change is under way.
    pub previous: Option<Vec<u32>>,
    /// Options set with `volume set` (the others are at their defaults).
    pub options: crate::options::Options,
    /// `volume stop`: bricks keep the data and serve no client until `volume start`.
    pub stopped: bool,
    /// Certificates refused by every brick (`mortar cert revoke`), by serial number.
    pub revoked: Vec<Revoked>,
}

/// A revoked certificate: its serial number (lowercase hex, as [`crate::tls::serial_of`]
/// gives it) and, for people reading the list, its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub serial: String,
    pub name: String,
}

impl VolumeConfig {
    /// A new volume of `replica_sets`, created at `created`: layout epoch 0 and settled,
    /// options at their defaults, started, nothing retired or revoked.
    pub fn new(
        name: &str,
        chunk_size: u32,
        replica_sets: Vec<ReplicaSet>,
        created: Timestamp,
    ) -> VolumeConfig {
        VolumeConfig {
            name: name.to_string(),
            chunk_size,
            replica_sets,
            created,
            retired: Vec::new(),
            epoch: 0,
            previous: None,
            options: Default::default(),
            stopped: false,
            revoked: Vec::new(),
        }
    }

    pub fn bricks(&self) -> impl Iterator<Item = &BrickRef> {
        self.replica_sets.iter().flat_map(|s| &s.bricks)
    }

    pub fn brick(&self, id: BrickId) -> Option<&BrickRef> {
        self.bricks().find(|b| b.id == id)
    }

    pub fn brick_at(&self, addr: &str) -> Option<&BrickRef> {
        self.bricks().find(|b| b.addr == addr)
    }

    /// The replica set brick `id` belongs to.
    pub fn set_of(&self, id: BrickId) -> Option<&ReplicaSet> {
        self.replica_sets
            .iter()
            .find(|s| s.bricks.iter().any(|b| b.id == id))
    }

    pub fn is_retired(&self, id: BrickId) -> bool {
        self.retired.iter().any(|b| b.id == id)
    }

    /// The index of the replica set whose bricks are exactly `addrs` (in any order).
    pub fn set_at(&self, addrs: &[String]) -> Option<usize> {
        self.replica_sets.iter().position(|s| {
            s.bricks.len() == addrs.len() && s.bricks.iter().all(|b| addrs.contains(&b.addr))
        })
    }

    /// Whether brick `id` is in the volume or was replaced out of it (never to join again).
    pub fn has_or_had(&self, id: BrickId) -> bool {
        self.brick(id).is_some() || self.is_retired(id)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFs {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub files: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// Check a single path component the way the kernel would before it reaches us.
pub fn validate_name(name: &[u8]) -> Result<(), crate::FsError> {
    if name.len() > NAME_MAX {
        return Err(crate::FsError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(crate::FsError::InvalidName);
    }
    Ok(())
}

/// Check a symlink target as the namespace stores it.
pub fn validate_symlink_target(target: &[u8]) -> Result<(), crate::FsError> {
    if target.is_empty() {
        return Err(crate::FsError::NotFound);
    }
    if target.len() > SYMLINK_MAX || target.contains(&0) {
        return Err(crate::FsError::NameTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FsError;

    #[test]
    fn names_are_checked_like_the_kernel() {
        assert!(validate_name(b"index.php").is_ok());
        assert!(validate_name(&[b'a'; 255]).is_ok());
        assert_eq!(validate_name(&[b'a'; 256]), Err(FsError::NameTooLong));
        assert_eq!(validate_name(b"a/b"), Err(FsError::InvalidName));
        assert_eq!(validate_name(b"a\0b"), Err(FsError::InvalidName));
        assert_eq!(validate_name(b""), Err(FsError::InvalidName));
        assert_eq!(validate_name(b".."), Err(FsError::InvalidName));
    }

    #[test]
    fn chunk_id_is_blake3() {
        let id = ChunkId::of(b"hello");
        assert!(id.matches(b"hello"));
        assert!(!id.matches(b"hellO"));
        assert_eq!(id.to_hex().len(), 64);
    }
}
