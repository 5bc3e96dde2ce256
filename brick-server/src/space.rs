//! The disk space a brick keeps for metadata. New data (chunks, inline file content, extended
//! attributes) is refused with ENOSPC once storing it would leave less than the reserve free,
//! so the metadata log, deletes, renames and mkdir keep working on a full disk and the brick
//! never meets a failed log append (fatal to the metadata group). Writes resume by themselves
//! once space is free again (after deletes and the next garbage collection).

use crate::store::TRANSIENT_BYTES;
use mortar_proto::FsError;
use std::path::PathBuf;
use std::str::FromStr;

/// How much to keep free: bytes, or a share of the filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserve {
    Bytes(u64),
    Percent(u8),
}

/// Default for `mortar-brick --reserve`.
pub const DEFAULT_RESERVE: &str = "2%";

impl FromStr for Reserve {
    type Err = String;

    fn from_str(s: &str) -> Result<Reserve, String> {
        let bad = || format!("'{s}' is not a size (512M, 2G, 1048576) or a share (2%)");
        if let Some(p) = s.strip_suffix('%') {
            let p: u8 = p.parse().map_err(|_| bad())?;
            if p >= 100 {
                return Err(format!("a reserve of {p}% leaves no room for data"));
            }
            return Ok(Reserve::Percent(p));
        }
        let (num, scale) = match s.char_indices().last().ok_or_else(bad)? {
            (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
            (i, 'M' | 'm') => (&s[..i], 1 << 20),
            (i, 'G' | 'g') => (&s[..i], 1 << 30),
            (i, 'T' | 't') => (&s[..i], 1 << 40),
            _ => (s, 1),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        n.checked_mul(scale).map(Reserve::Bytes).ok_or_else(bad)
    }
}

impl Reserve {
    pub fn bytes(&self, total: u64) -> u64 {
        match *self {
            Reserve::Bytes(b) => b,
            Reserve::Percent(p) => total / 100 * p as u64,
        }
    }
}

/// Whether `incoming` new bytes of data fit above the reserve.
pub fn admits(free: u64, total: u64, reserve: Reserve, incoming: u64) -> bool {
    free.saturating_sub(incoming) >= reserve.bytes(total)
}

/// The filesystem a brick stores into, and its reserve.
pub struct Space {
    dir: PathBuf,
    reserve: Reserve,
}

impl Space {
    pub fn new(dir: PathBuf, reserve: Reserve) -> Space {
        Space { dir, reserve }
    }

    /// (bytes free to unprivileged writers, filesystem size).
    pub fn usage(&self) -> Result<(u64, u64), FsError> {
        let path = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes())
            .map_err(|_| FsError::Io("data dir path has NUL".into()))?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: path is a valid C string and st a properly sized out-parameter.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(FsError::Io(std::io::Error::last_os_error().to_string()));
        }
        let frsize = st.f_frsize as u64;
        Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
    }

    /// Refuse `incoming` bytes of new data that would eat into the reserve, which lies on top
    /// of what RocksDB itself may still need ([`TRANSIENT_BYTES`]).
    pub fn admit_data(&self, incoming: u64) -> Result<(), FsError> {
        let (free, total) = self.usage()?;
        if admits(
            free.saturating_sub(TRANSIENT_BYTES),
            total,
            self.reserve,
            incoming,
        ) {
            return Ok(());
        }
        Err(FsError::NoSpace(format!(
            "brick disk {}: {} MiB free, {} MiB kept for metadata and {} MiB for the store's \
             own flushes",
            self.dir.display(),
            free >> 20,
            self.reserve.bytes(total) >> 20,
            TRANSIENT_BYTES >> 20
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_parse_as_sizes_or_shares_and_refuse_nonsense() {
        assert_eq!("2%".parse(), Ok(Reserve::Percent(2)));
        assert_eq!("64M".parse(), Ok(Reserve::Bytes(64 << 20)));
        assert_eq!("1g".parse(), Ok(Reserve::Bytes(1 << 30)));
        assert_eq!("4096".parse(), Ok(Reserve::Bytes(4096)));
        for bad in [
            "",
            "%",
            "100%",
            "-1",
            "12Q",
            "99999999999999999999T",
            "1.5G",
        ] {
            assert!(bad.parse::<Reserve>().is_err(), "{bad}");
        }
        assert_eq!(Reserve::Percent(2).bytes(1000 << 20), 20 << 20);
    }

    #[test]
    fn data_is_admitted_only_above_the_reserve() {
        let r = Reserve::Bytes(100);
        assert!(admits(1000, 10_000, r, 900));
        assert!(!admits(1000, 10_000, r, 901));
        assert!(!admits(50, 10_000, r, 0), "already inside the reserve");
        assert!(admits(1000, 10_000, Reserve::Percent(5), 500));
        assert!(!admits(1000, 10_000, Reserve::Percent(5), 501));
    }
}
