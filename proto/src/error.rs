//! Filesystem errors as they travel on the wire. Every variant maps to one errno, so whatever
//! reaches FUSE or a CLI carries a precise code.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("is a directory")]
    IsDir,
    #[error("not a directory")]
    NotDir,
    #[error("file name too long (more than 255 bytes)")]
    NameTooLong,
    #[error("invalid name (empty, '.', '..', or contains '/' or NUL)")]
    InvalidName,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no such extended attribute")]
    NoXattr,
    #[error("value too large: {0}")]
    TooLarge(String),
    #[error("operation not permitted: {0}")]
    NotPermitted(String),
    #[error("operation not supported: {0}")]
    NotSupported(String),
    #[error("read-only: {0}")]
    ReadOnly(String),
    #[error("no space left on brick: {0}")]
    NoSpace(String),
    /// Another writer changed the file between our read and our commit; retry.
    #[error("file changed concurrently (version {0})")]
    Conflict(u64),
    #[error("chunk bytes do not match id {0}")]
    HashMismatch(String),
    #[error("volume not available: {0}")]
    Unavailable(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("volume not initialised")]
    NoVolume,
    #[error("I/O error: {0}")]
    Io(String),
    /// A size or write end past [`crate::MAX_FILE_SIZE`].
    #[error("file too large: {0} bytes is past the {max}-byte maximum", max = crate::MAX_FILE_SIZE)]
    FileTooBig(u64),
    /// The snapshot named does not exist (or was deleted under a mount of it).
    #[error("no such snapshot: {0}")]
    NoSnapshot(String),
    /// The volume was stopped by its operator (`mortar volume start NAME` resumes it); not
    /// retried, as no brick will serve it until then.
    #[error("volume '{0}' is stopped (mortar volume start {0})")]
    Stopped(String),
    /// A change only an operator may make, sent to a brick that is not the metadata leader:
    /// the operator's tool asks the leader at this address itself (bricks never carry an
    /// operator's change under their own certificate).
    #[error("not the metadata leader: ask the leader at {0}")]
    NotLeader(String),
    /// A rename or link between two volumes (a volume and its clone share bricks, not trees).
    #[error("cross-device link: {0}")]
    CrossDevice(String),
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::IsDir => libc::EISDIR,
            FsError::NotDir => libc::ENOTDIR,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::InvalidName | FsError::Invalid(_) => libc::EINVAL,
            FsError::NoXattr => libc::ENODATA,
            FsError::TooLarge(_) => libc::E2BIG,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::NotSupported(_) => libc::EOPNOTSUPP,
            FsError::ReadOnly(_) => libc::EROFS,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::Conflict(_) => libc::EAGAIN,
            FsError::Busy(_) => libc::EBUSY,
            FsError::HashMismatch(_) | FsError::Io(_) => libc::EIO,
            FsError::Unavailable(_) | FsError::NoVolume | FsError::Stopped(_) => libc::ENOTCONN,
            FsError::NotLeader(_) => libc::EAGAIN,
            FsError::FileTooBig(_) => libc::EFBIG,
            FsError::NoSnapshot(_) => libc::ESTALE,
            FsError::CrossDevice(_) => libc::EXDEV,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_are_the_posix_ones() {
        assert_eq!(FsError::NameTooLong.errno(), libc::ENAMETOOLONG);
        assert_eq!(FsError::InvalidName.errno(), libc::EINVAL);
        assert_eq!(FsError::NotEmpty.errno(), libc::ENOTEMPTY);
        assert_eq!(FsError::ReadOnly("x".into()).errno(), libc::EROFS);
    }
}
