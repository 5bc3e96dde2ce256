//! `volume delete`: the bricks of a stopped volume are released for reuse. A released brick
//! writes a marker into its data directory and stops; when it next starts it erases the
//! directory's contents before opening its store, so it comes up empty, as a brick that was
//! never in a volume. Erasing at start, with nothing open, leaves no half-erased store
//! behind a crash: the marker goes last.

use mortar_proto::FsError;
use std::path::Path;

const MARKER: &str = "RELEASED";

/// Record that this brick left volume `volume` (synced before the brick answers).
pub fn mark(data: &Path, volume: &str) -> Result<(), FsError> {
    use std::io::Write;
    let io = |e: std::io::Error| FsError::Io(format!("cannot write the release marker: {e}"));
    let mut f = std::fs::File::create(data.join(MARKER)).map_err(io)?;
    f.write_all(volume.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// At start: if this brick was released, erase what its data directory holds (the directory
/// itself stays: it may be a mount point) and say which volume it had left.
pub fn erase_if_released(data: &Path) -> std::io::Result<Option<String>> {
    let marker = data.join(MARKER);
    let volume = match std::fs::read_to_string(&marker) {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in std::fs::read_dir(data)? {
        let path = entry?.path();
        if path == marker {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    std::fs::remove_file(&marker)?;
    Ok(Some(volume))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_directory_is_emptied_once_and_others_are_left_alone() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("db")).unwrap();
        std::fs::write(d.path().join("db/000001.sst"), b"x").unwrap();
        assert_eq!(erase_if_released(d.path()).unwrap(), None);
        assert!(d.path().join("db/000001.sst").exists());
        mark(d.path(), "www").unwrap();
        assert_eq!(erase_if_released(d.path()).unwrap().as_deref(), Some("www"));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        assert_eq!(erase_if_released(d.path()).unwrap(), None);
    }
}
