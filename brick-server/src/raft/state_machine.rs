//! The state machine: the namespace in RocksDB, applied entry by entry, and its snapshots.

#![allow(clippy::result_large_err)]

use super::*;

/// Read access to the committed namespace in RocksDB, for queries and for applying.
pub struct DbMeta<'a>(pub &'a Store);

impl MetaRead for DbMeta<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, FsError> {
        Ok(self.0.get(table_cf(table), key)?)
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<crate::store::Rows, FsError> {
        Ok(self.0.scan(table_cf(table), prefix, after, limit)?)
    }
}

/// The volume configuration as last applied, shared with the chunk service.
pub type SharedVolume = Arc<RwLock<Option<VolumeConfig>>>;

type Meta = SnapshotMeta<NodeId, BasicNode>;

/// The state machine's record of a snapshot file: its meta and its name in the snapshot
/// directory. Stored under `KEY_SNAPSHOT` for the current one and `KEY_INSTALLING` while an
/// install runs.
#[derive(Clone, Serialize, Deserialize)]
struct SnapshotRecord {
    meta: Meta,
    file: String,
}

pub struct StateMachine {
    store: Arc<Store>,
    volume: SharedVolume,
    /// Told of every change applied, for the watchers' caches.
    hub: Arc<crate::watch::Hub>,
    /// Test hook (`MORTAR_TEST_SLOW_APPLY=NAME:MS`): the first create of NAME (a file or a
    /// snapshot) is applied MS late, so a commit outlives the request that proposed it without stopping the Raft core
    /// (a follower stalled that long would start an election instead).
    slow_apply: Option<(Vec<u8>, std::time::Duration)>,
    /// Where snapshot files live (the brick's data directory's `snapshots/`).
    dir: Arc<PathBuf>,
    /// Serialises changes of the current snapshot between builders (which openraft runs on
    /// their own) and installs.
    current: Arc<tokio::sync::Mutex<()>>,
    /// The file the snapshot being received is written to.
    receiving: Option<PathBuf>,
}

async fn background_build<T: Send + 'static>(
    f: impl FnOnce() -> StorageResult<T> + Send + 'static,
) -> StorageResult<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    crate::background::run(move || {
        let _ = tx.send(f());
        Ok(())
    })
    .await
    .map_err(io_err)?;
    rx.await
        .map_err(|e| io_err(std::io::Error::other(e.to_string())))?
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StorageResult<T> + Send + 'static,
) -> StorageResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(std::io::Error::other(e.to_string())))?
}

impl StateMachine {
    /// Open the state machine over `store`, keeping snapshot files in `dir`. An install that
    /// was interrupted is finished first, from its file.
    pub fn new(
        store: Arc<Store>,
        volume: SharedVolume,
        hub: Arc<crate::watch::Hub>,
        dir: PathBuf,
    ) -> Result<StateMachine, FsError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| FsError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let slow_apply = std::env::var("MORTAR_TEST_SLOW_APPLY").ok().and_then(|v| {
            let (name, ms) = v.rsplit_once(':')?;
            let ms = ms.parse().ok()?;
            Some((
                name.as_bytes().to_vec(),
                std::time::Duration::from_millis(ms),
            ))
        });
        let sm = StateMachine {
            store,
            volume,
            hub,
            slow_apply,
            dir: Arc::new(dir),
            current: Arc::default(),
            receiving: None,
        };
        if let Some(rec) = sm
            .record(KEY_INSTALLING)
            .map_err(|e| FsError::Io(e.to_string()))?
        {
            tracing::warn!(file = %rec.file, "finishing a snapshot install that was interrupted");
            sm.install_file(&rec)
                .map_err(|e| FsError::Io(e.to_string()))?;
        }
        let current = sm
            .record(KEY_SNAPSHOT)
            .map_err(|e| FsError::Io(e.to_string()))?;
        snapshot::remove_others(&sm.dir, current.map(|r| sm.dir.join(r.file)).as_deref());
        *sm.volume.write().expect("volume lock") = namespace::volume(&DbMeta(&sm.store))?;
        Ok(sm)
    }

    fn clone_handle(&self) -> StateMachine {
        StateMachine {
            store: self.store.clone(),
            volume: self.volume.clone(),
            hub: self.hub.clone(),
            slow_apply: None,
            dir: self.dir.clone(),
            current: self.current.clone(),
            receiving: None,
        }
    }

    fn record(&self, key: &[u8]) -> StorageResult<Option<SnapshotRecord>> {
        match self.store.get(CF_RAFT_STATE, key).map_err(read_err)? {
            Some(b) => Ok(Some(dec(&b)?)),
            None => Ok(None),
        }
    }

    fn applied(&self) -> StorageResult<AppliedState> {
        let applied = match self
            .store
            .get(CF_RAFT_STATE, KEY_APPLIED)
            .map_err(read_err)?
        {
            Some(b) => dec(&b)?,
            None => None,
        };
        let membership = match self
            .store
            .get(CF_RAFT_STATE, KEY_MEMBERSHIP)
            .map_err(read_err)?
        {
            Some(b) => dec(&b)?,
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    fn refresh_volume(&self) -> StorageResult<()> {
        let v = namespace::volume(&DbMeta(&self.store)).map_err(read_err)?;
        *self.volume.write().expect("volume lock") = v;
        self.hub.config_applied.0.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Replace the namespace with a verified snapshot file named by `rec`, which becomes the
    /// current snapshot. Blocking.
    fn install_file(&self, rec: &SnapshotRecord) -> StorageResult<()> {
        let path = self.dir.join(&rec.file);
        let state = self.store.cf(CF_RAFT_STATE);
        let mut last = WriteBatch::default();
        last.put_cf(state, KEY_APPLIED, enc(&rec.meta.last_log_id));
        last.put_cf(state, KEY_MEMBERSHIP, enc(&rec.meta.last_membership));
        last.put_cf(state, KEY_SNAPSHOT, enc(rec));
        last.delete_cf(state, KEY_INSTALLING);
        let rows = snapshot::replace_namespace(&self.store, &path, last).map_err(io_err)?;
        tracing::info!(last_log_id = ?rec.meta.last_log_id, rows, "installed snapshot");
        snapshot::remove_others(&self.dir, Some(&path));
        Ok(())
    }

    /// Make `rec` the current snapshot unless a newer one already is; removes the others.
    fn make_current(&self, rec: &SnapshotRecord) -> StorageResult<bool> {
        if let Some(cur) = self.record(KEY_SNAPSHOT)? {
            if cur.meta.last_log_id > rec.meta.last_log_id {
                return Ok(false);
            }
        }
        let mut b = WriteBatch::default();
        b.put_cf(self.store.cf(CF_RAFT_STATE), KEY_SNAPSHOT, enc(rec));
        self.store.write(b, true).map_err(io_err)?;
        snapshot::remove_others(&self.dir, Some(&self.dir.join(&rec.file)));
        Ok(true)
    }

    async fn open_snapshot(&self, rec: SnapshotRecord) -> StorageResult<Snapshot<TypeConfig>> {
        let path = self.dir.join(&rec.file);
        let file = tokio::fs::File::open(&path).await.map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(
                Some(rec.meta.signature()),
                AnyError::new(&e),
            ))
        })?;
        Ok(Snapshot {
            meta: rec.meta,
            snapshot: Box::new(file),
        })
    }
}

/// blake3 over every namespace row and the applied index, read from one RocksDB snapshot.
/// Blocking: a full scan.
pub fn meta_digest(store: &Store) -> Result<(u64, [u8; 32]), FsError> {
    let snap = store.db.snapshot();
    let mut h = blake3::Hasher::new();
    for table in namespace::TABLES {
        let mut ro = rocksdb::ReadOptions::default();
        ro.fill_cache(false);
        ro.set_snapshot(&snap);
        for item in store
            .db
            .iterator_cf_opt(store.cf(table_cf(table)), ro, IteratorMode::Start)
        {
            let (k, v) = item.map_err(|e| FsError::Io(e.to_string()))?;
            h.update(&[table as u8]);
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(&k);
            h.update(&(v.len() as u64).to_le_bytes());
            h.update(&v);
        }
    }
    let applied: Option<LogId<NodeId>> = match snap
        .get_cf(store.cf(CF_RAFT_STATE), KEY_APPLIED)
        .map_err(|e| FsError::Io(e.to_string()))?
    {
        Some(b) => wire::decode(&b).map_err(|e| FsError::Io(e.to_string()))?,
        None => None,
    };
    Ok((
        applied.map(|l| l.index).unwrap_or(0),
        *h.finalize().as_bytes(),
    ))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let _current = self.current.clone().lock_owned().await;
        let sm = self.clone_handle();
        // A scan of the whole namespace: on a background thread, behind the log and clients.
        let rec = background_build(move || {
            // Rows, applied index and membership all come from one RocksDB snapshot.
            let snap = sm.store.db.snapshot();
            let get = |key: &[u8]| {
                snap.get_cf(sm.store.cf(CF_RAFT_STATE), key)
                    .map_err(read_err)
            };
            let applied: Option<LogId<NodeId>> = match get(KEY_APPLIED)? {
                Some(b) => dec(&b)?,
                None => None,
            };
            let membership: StoredMembership<NodeId, BasicNode> = match get(KEY_MEMBERSHIP)? {
                Some(b) => dec(&b)?,
                None => StoredMembership::default(),
            };
            let id = format!(
                "{}-{:08x}",
                applied.map(|l| l.index).unwrap_or(0),
                rand::random::<u32>()
            );
            let rec = SnapshotRecord {
                meta: SnapshotMeta {
                    last_log_id: applied,
                    last_membership: membership,
                    snapshot_id: id.clone(),
                },
                file: format!("{id}.snap"),
            };
            let started = std::time::Instant::now();
            let built =
                snapshot::write_rows(&sm.store, &snap, &sm.dir.join(&rec.file)).map_err(io_err)?;
            drop(snap);
            tracing::info!(
                last_log_id = ?applied, rows = built.rows, bytes = built.bytes,
                ms = started.elapsed().as_millis() as u64, "built snapshot"
            );
            sm.make_current(&rec)?;
            Ok(rec)
        })
        .await?;
        self.open_snapshot(rec).await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> StorageResult<AppliedState> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut volume_changed = false;
        for entry in entries {
            let mut batch = WriteBatch::default();
            let mut touched = Vec::new();
            let mut fresh = Vec::new();
            let mut replayed = false;
            let mut once = None;
            let result = match &entry.payload {
                EntryPayload::Blank => Ok(MetaOk::Done),
                EntryPayload::Membership(m) => {
                    let sm = StoredMembership::new(Some(entry.log_id), m.clone());
                    batch.put_cf(self.store.cf(CF_RAFT_STATE), KEY_MEMBERSHIP, enc(&sm));
                    Ok(MetaOk::Done)
                }
                EntryPayload::Normal(cmd) => {
                    let hooked = self.slow_apply.as_ref().is_some_and(|(name, _)| {
                        namespace::creates_name(&cmd.op) == Some(name.as_slice())
                    });
                    if let Some((_, late)) = self.slow_apply.take_if(|_| hooked) {
                        tracing::warn!(?late, "test hook: applying a create late");
                        tokio::time::sleep(late).await;
                    }
                    let base = DbMeta(&self.store);
                    let mut txn = Txn::new(&base);
                    txn.index = entry.log_id.index;
                    let out = namespace::apply_once(&mut txn, &cmd.op, cmd.once, cmd.now);
                    replayed = out.replayed;
                    once = cmd.once;
                    let out = out.result;
                    volume_changed |= out.is_ok() && cmd.op.changes_volume_config();
                    // apply_once leaves only the writes to keep: the change's on success, and
                    // the remembered outcome either way.
                    {
                        touched = namespace::touched(&txn.writes);
                        fresh = namespace::fresh_dirs(&txn.writes);
                        for ((table, key), value) in txn.writes {
                            let cf = self.store.cf(table_cf(table));
                            match value {
                                Some(v) => batch.put_cf(cf, key, v),
                                None => batch.delete_cf(cf, key),
                            }
                        }
                    }
                    out
                }
            };
            batch.put_cf(
                self.store.cf(CF_RAFT_STATE),
                KEY_APPLIED,
                enc(&Some(entry.log_id)),
            );
            // Unsynced: the log entry is durable, and applying again after a crash gives the
            // same rows (the applied index is in the same batch).
            self.store.write(batch, false).map_err(io_err)?;
            // Every applied change is announced, whatever became of its request.
            self.hub.applied(entry.log_id.index, once, &touched);
            results.push(Applied {
                result,
                touched,
                fresh,
                replayed,
            });
        }
        if volume_changed {
            self.refresh_volume()?;
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone_handle()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        let path = self
            .dir
            .join(format!("receiving-{:08x}.part", rand::random::<u32>()));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(io_err)?;
        self.receiving = Some(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> StorageResult<()> {
        let received = self.receiving.take().ok_or_else(|| {
            io_err(std::io::Error::other(
                "a snapshot to install was never received",
            ))
        })?;
        snapshot.sync_all().await.map_err(io_err)?;
        drop(snapshot);
        let _current = self.current.clone().lock_owned().await;
        let rec = SnapshotRecord {
            meta: meta.clone(),
            file: format!("{}.snap", meta.snapshot_id),
        };
        let sm = self.clone_handle();
        blocking(move || {
            let started = std::time::Instant::now();
            // Verified whole before anything changes: a damaged transfer leaves the namespace
            // as it was.
            let rows = snapshot::verify(&received).map_err(read_err)?;
            std::fs::rename(&received, sm.dir.join(&rec.file)).map_err(io_err)?;
            tracing::info!(
                rows,
                ms = started.elapsed().as_millis() as u64,
                "received snapshot verified; installing"
            );
            let mut b = WriteBatch::default();
            b.put_cf(sm.store.cf(CF_RAFT_STATE), KEY_INSTALLING, enc(&rec));
            sm.store.write(b, true).map_err(io_err)?;
            sm.install_file(&rec)
        })
        .await?;
        self.refresh_volume()
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        match self.record(KEY_SNAPSHOT)? {
            Some(rec) if self.dir.join(&rec.file).exists() => {
                self.open_snapshot(rec).await.map(Some)
            }
            // A store from before snapshot files, or a file removed by hand: make one from the
            // applied state, which covers every purged entry (purging never passes a snapshot).
            _ if self.applied()?.0.is_some() => self.build_snapshot().await.map(Some),
            _ => Ok(None),
        }
    }
}
