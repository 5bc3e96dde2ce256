//! Snapshots of the namespace as files. A snapshot is built by streaming the rows of one
//! RocksDB snapshot into a file, sent by openraft in chunks read from that file, and installed
//! by streaming the rows back into RocksDB in bounded batches: no step holds the namespace in
//! memory, so a brick's memory does not grow with the volume.
//!
//! File: `MAGIC`, then records `[table u8][key len u32][value len u32][key][value]`, then
//! `END` and the blake3 of every byte before it. A file is verified whole before an install
//! touches the namespace, and an interrupted install is redone from the file at the next start.
//!
//! These functions block (file and RocksDB I/O over the whole namespace): callers run them on
//! blocking threads, never on the async runtime.

use crate::namespace::{Table, TABLES};
use crate::store::{
    Store, StoreError, CF_META_DENTRIES, CF_META_INODES, CF_META_SNAP, CF_META_SYS,
};
use rocksdb::{IteratorMode, ReadOptions, WriteBatch};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"mortsn01";
const END: u8 = 0xFF;
/// Rows are written to RocksDB in batches of about this many bytes during an install.
const INSTALL_BATCH: usize = 4 << 20;
/// File buffers for building and reading.
const IO_BUFFER: usize = 1 << 20;
/// A snapshot being built is synced every this many bytes.
const SYNC_EVERY: u64 = 8 << 20;
/// A namespace row's key and value each fit in this; anything longer is a corrupt file.
const MAX_FIELD: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot file {path}: {err}")]
    File { path: String, err: std::io::Error },
    #[error("snapshot file {path} is not a namespace snapshot: {why}")]
    Corrupt { path: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("RocksDB: {0}")]
    Db(#[from] rocksdb::Error),
}

pub fn table_cf(t: Table) -> &'static str {
    match t {
        Table::Inodes => CF_META_INODES,
        Table::Dentries => CF_META_DENTRIES,
        Table::Sys => CF_META_SYS,
        Table::Snap => CF_META_SNAP,
    }
}

fn table_of(b: u8) -> Option<Table> {
    TABLES.into_iter().find(|t| *t as u8 == b)
}

/// What a build wrote.
#[derive(Debug)]
pub struct Built {
    pub rows: u64,
    pub bytes: u64,
}

/// Write every namespace row of `snap` (one consistent RocksDB snapshot) to `path`, synced.
pub fn write_rows(
    store: &Store,
    snap: &rocksdb::Snapshot<'_>,
    path: &Path,
) -> Result<Built, SnapshotError> {
    let file_err = |err| SnapshotError::File {
        path: path.display().to_string(),
        err,
    };
    let file = File::create(path).map_err(file_err)?;
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(IO_BUFFER, file),
        hash: blake3::Hasher::new(),
        bytes: 0,
    };
    out.write_all(MAGIC).map_err(file_err)?;
    let mut rows = 0;
    let mut synced = 0;
    for table in TABLES {
        let mut ro = ReadOptions::default();
        // A full scan must not push the working set out of the block cache.
        ro.fill_cache(false);
        ro.set_snapshot(snap);
        for item in store
            .db
            .iterator_cf_opt(store.cf(table_cf(table)), ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            out.write_all(&[table as u8]).map_err(file_err)?;
            out.write_all(&(k.len() as u32).to_le_bytes())
                .map_err(file_err)?;
            out.write_all(&(v.len() as u32).to_le_bytes())
                .map_err(file_err)?;
            out.write_all(&k).map_err(file_err)?;
            out.write_all(&v).map_err(file_err)?;
            rows += 1;
            // Written back as it goes: one sync of the whole file at the end queued it all
            // at once in front of the log's syncs, which then waited behind it.
            if out.bytes >= synced + SYNC_EVERY {
                out.inner.flush().map_err(file_err)?;
                out.inner.get_ref().sync_data().map_err(file_err)?;
                synced = out.bytes;
            }
        }
    }
    out.write_all(&[END]).map_err(file_err)?;
    let digest = out.hash.finalize();
    let bytes = out.bytes + 32;
    let mut inner = out.inner;
    inner.write_all(digest.as_bytes()).map_err(file_err)?;
    let file = inner.into_inner().map_err(|e| file_err(e.into_error()))?;
    file.sync_all().map_err(file_err)?;
    Ok(Built { rows, bytes })
}

struct HashingWriter<W> {
    inner: W,
    hash: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// One namespace row as a snapshot file holds it.
type Row = (Table, Vec<u8>, Vec<u8>);

/// Reads the records of a snapshot file in order.
struct Rows {
    path: PathBuf,
    input: BufReader<File>,
    hash: blake3::Hasher,
    done: bool,
}

impl Rows {
    fn open(path: &Path) -> Result<Rows, SnapshotError> {
        let file = File::open(path).map_err(|err| SnapshotError::File {
            path: path.display().to_string(),
            err,
        })?;
        let mut rows = Rows {
            path: path.to_path_buf(),
            input: BufReader::with_capacity(IO_BUFFER, file),
            hash: blake3::Hasher::new(),
            done: false,
        };
        let mut magic = [0u8; 8];
        rows.read(&mut magic)?;
        if &magic != MAGIC {
            return Err(rows.corrupt("wrong magic".into()));
        }
        Ok(rows)
    }

    fn corrupt(&self, why: String) -> SnapshotError {
        SnapshotError::Corrupt {
            path: self.path.display().to_string(),
            why,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.input.read_exact(buf).map_err(|err| {
            if err.kind() == std::io::ErrorKind::UnexpectedEof {
                self.corrupt("truncated".into())
            } else {
                SnapshotError::File {
                    path: self.path.display().to_string(),
                    err,
                }
            }
        })?;
        self.hash.update(buf);
        Ok(())
    }

    fn field(&mut self, len: u32) -> Result<Vec<u8>, SnapshotError> {
        if len > MAX_FIELD {
            return Err(self.corrupt(format!("a field of {len} bytes")));
        }
        let mut v = vec![0u8; len as usize];
        self.read(&mut v)?;
        Ok(v)
    }

    /// The next row, or None after the last one (whose checksum then matched).
    fn next_row(&mut self) -> Result<Option<Row>, SnapshotError> {
        if self.done {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        self.read(&mut tag)?;
        if tag[0] == END {
            let expected = self.hash.finalize();
            let mut digest = [0u8; 32];
            self.input
                .read_exact(&mut digest)
                .map_err(|_| self.corrupt("truncated before its checksum".into()))?;
            if digest != *expected.as_bytes() {
                return Err(self.corrupt("checksum does not match".into()));
            }
            let mut rest = [0u8; 1];
            if self
                .input
                .read(&mut rest)
                .map_err(|err| SnapshotError::File {
                    path: self.path.display().to_string(),
                    err,
                })?
                != 0
            {
                return Err(self.corrupt("bytes after the checksum".into()));
            }
            self.done = true;
            return Ok(None);
        }
        let table = table_of(tag[0]).ok_or_else(|| self.corrupt(format!("table {}", tag[0])))?;
        let mut lens = [0u8; 8];
        self.read(&mut lens)?;
        let klen = u32::from_le_bytes(lens[..4].try_into().expect("4 bytes"));
        let vlen = u32::from_le_bytes(lens[4..].try_into().expect("4 bytes"));
        let k = self.field(klen)?;
        let v = self.field(vlen)?;
        Ok(Some((table, k, v)))
    }
}

/// Read a snapshot file through to its checksum; returns the number of rows.
pub fn verify(path: &Path) -> Result<u64, SnapshotError> {
    let mut rows = Rows::open(path)?;
    let mut n = 0;
    while rows.next_row()?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// Replace the namespace with the rows of a verified snapshot file. The rows go in bounded
/// unsynced batches; `last` (the applied index and membership, and whatever marks the install
/// finished) goes in the final batch, synced, which makes every earlier batch durable too
/// (RocksDB's WAL is written in order). A crash before it leaves a half-replaced namespace,
/// so the caller records the install first and redoes it at start (see `raft::StateMachine`).
pub fn replace_namespace(
    store: &Store,
    path: &Path,
    last: WriteBatch,
) -> Result<u64, SnapshotError> {
    for table in TABLES {
        let cf = store.cf(table_cf(table));
        let mut batch = WriteBatch::default();
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        for item in store.db.iterator_cf_opt(cf, ro, IteratorMode::Start) {
            let (k, _) = item?;
            batch.delete_cf(cf, k);
            if batch.size_in_bytes() >= INSTALL_BATCH {
                store.write(std::mem::take(&mut batch), false)?;
            }
        }
        store.write(batch, false)?;
    }
    let mut rows = Rows::open(path)?;
    let mut batch = WriteBatch::default();
    let mut n = 0;
    while let Some((table, k, v)) = rows.next_row()? {
        batch.put_cf(store.cf(table_cf(table)), k, v);
        n += 1;
        if batch.size_in_bytes() >= INSTALL_BATCH {
            store.write(std::mem::take(&mut batch), false)?;
        }
    }
    store.write(batch, false)?;
    store.write(last, true)?;
    Ok(n)
}

/// Remove every file in `dir` but `keep`.
pub fn remove_others(dir: &Path, keep: Option<&Path>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if Some(p.as_path()) != keep {
            if let Err(err) = std::fs::remove_file(&p) {
                tracing::warn!(file = %p.display(), %err, "cannot remove an old snapshot file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(store: &Store, n: u32) {
        let mut b = WriteBatch::default();
        for i in 0..n {
            b.put_cf(
                store.cf(CF_META_INODES),
                i.to_be_bytes(),
                vec![i as u8; 100],
            );
            b.put_cf(store.cf(CF_META_DENTRIES), format!("d{i}"), i.to_le_bytes());
        }
        b.put_cf(store.cf(CF_META_SYS), b"volume", b"v");
        store.write(b, false).unwrap();
    }

    fn rows_of(store: &Store) -> Vec<Row> {
        let mut out = Vec::new();
        for t in TABLES {
            for item in store
                .db
                .iterator_cf(store.cf(table_cf(t)), IteratorMode::Start)
            {
                let (k, v) = item.unwrap();
                out.push((t, k.to_vec(), v.to_vec()));
            }
        }
        out
    }

    #[test]
    fn a_namespace_round_trips_through_a_file_and_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        let b = Store::open(&dir.path().join("b")).unwrap();
        fill(&a, 5000);
        let mut stale = WriteBatch::default();
        stale.put_cf(b.cf(CF_META_INODES), b"stale", b"x");
        b.write(stale, false).unwrap();

        let path = dir.path().join("s.snap");
        let built = write_rows(&a, &a.db.snapshot(), &path).unwrap();
        assert_eq!(built.rows, 10_001);
        assert_eq!(built.bytes, std::fs::metadata(&path).unwrap().len());
        assert_eq!(verify(&path).unwrap(), 10_001);
        let mut last = WriteBatch::default();
        last.put_cf(b.cf(crate::store::CF_RAFT_STATE), b"marker", b"done");
        assert_eq!(replace_namespace(&b, &path, last).unwrap(), 10_001);
        assert_eq!(rows_of(&a), rows_of(&b));
        assert!(b
            .get(crate::store::CF_RAFT_STATE, b"marker")
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_damaged_file_is_refused_before_anything_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        fill(&a, 100);
        let path = dir.path().join("s.snap");
        write_rows(&a, &a.db.snapshot(), &path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() - 40].to_vec()),
            ("checksum", {
                let mut g = good.clone();
                g[100] ^= 1;
                g
            }),
            ("magic", {
                let mut g = good.clone();
                g[0] = b'x';
                g
            }),
            ("after", [good.clone(), vec![0]].concat()),
        ];
        for (what, bytes) in cases {
            std::fs::write(&path, bytes).unwrap();
            let err = verify(&path).unwrap_err();
            assert!(
                matches!(err, SnapshotError::Corrupt { .. }),
                "{what}: {err}"
            );
        }
    }
}
