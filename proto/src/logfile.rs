//! A log file the brick and the mount write through `tracing`, opened again on SIGHUP so that
//! logrotate can move it away (`scripts/logrotate/mortar`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct LogFile {
    path: PathBuf,
    file: Mutex<File>,
}

fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

impl LogFile {
    /// Open `path` for appending, creating it and its directory.
    pub fn open(path: &Path) -> io::Result<Arc<LogFile>> {
        Ok(Arc::new(LogFile {
            path: path.to_path_buf(),
            file: Mutex::new(open_append(path)?),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the path again: lines from now on go to whatever file it names now.
    pub fn reopen(&self) -> io::Result<()> {
        let fresh = open_append(&self.path)?;
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// A writer for `tracing_subscriber::fmt().with_writer(move || log.writer())`.
    pub fn writer(self: &Arc<Self>) -> LogWriter {
        LogWriter(Arc::clone(self))
    }
}

/// On every SIGHUP, for as long as the runtime runs, reopen `log` (standard error needs
/// nothing). Replaces SIGHUP's default, which would end the process when logrotate signals it.
pub fn reopen_on_hangup(log: Option<Arc<LogFile>>) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let Some(log) = &log else {
                tracing::info!("SIGHUP: logging to standard error, no file to reopen");
                continue;
            };
            match log.reopen() {
                Ok(()) => tracing::info!(path = %log.path.display(), "log file reopened (SIGHUP)"),
                // Lines keep going to the old file, which is better than none.
                Err(e) => {
                    tracing::error!(path = %log.path.display(), error = %e, "cannot reopen the log file")
                }
            }
        }
    });
    Ok(())
}

pub struct LogWriter(Arc<LogFile>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0
            .file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_go_to_the_file_the_path_names_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/brick.log");
        let log = LogFile::open(&path).unwrap();
        log.writer().write_all(b"one\n").unwrap();
        let moved = dir.path().join("brick.log.1");
        std::fs::rename(&path, &moved).unwrap();
        log.writer().write_all(b"two\n").unwrap();
        log.reopen().unwrap();
        log.writer().write_all(b"three\n").unwrap();
        assert_eq!(std::fs::read_to_string(&moved).unwrap(), "one\ntwo\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
    }
}
