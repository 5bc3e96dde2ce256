//! The mortar volume client: learns the layout from any brick, sends namespace operations to
//! the metadata leader (following it across elections), and reads and writes file data as
//! content-addressed chunks on the replica sets, verifying every chunk it reads.
//!
//! Errors are [`FsError`]s, so every failure carries an errno for the FUSE layer.

mod cache;
mod data;
mod delegation;
use delegation::Name;
mod lease;
mod listings;
mod meta_cache;
mod once;
mod upload;
use meta_cache::Own;
mod watch;
pub use data::{apply_to_inode, Access};
pub mod volume_admin;

use futures::stream::{FuturesUnordered, StreamExt};
use mortar_proto::tls::Identity;
use mortar_proto::transport::{client_endpoint, Pool};
use mortar_proto::transport::{Health, TransportError};
use mortar_proto::wire::Response;
use mortar_proto::wire::{
    CloneInfo, Inval, MetaOk, MetaOp, OpId, Query, Reply, Request, SetAttr, Stamp, XattrMode,
};
use mortar_proto::{
    root_of, Attr, Content, DirEntry, FileKind, FsError, Inode, InodeId, StatFs, VolumeConfig,
    VolumeNo, INLINE_MAX,
};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

pub use mortar_proto;

pub use mortar_proto::timing::{ATTEMPT_TIMEOUT, DEFAULT_OP_TIMEOUT, META_HEDGE};

pub struct Volume {
    pool: Pool,
    seeds: Vec<String>,
    config: RwLock<Arc<VolumeConfig>>,
    /// Address of the metadata leader as last reported by a brick.
    leader: Mutex<Option<String>>,
    next: AtomicUsize,
    chunks: cache::ChunkCache,
    /// Names this client's namespace changes so retries apply once.
    client_id: u128,
    seqs: Arc<once::Seqs>,
    op_timeout: Duration,
    /// Namespace answers served from memory while the watch holds a lease.
    meta_cache: meta_cache::MetaCache,
    /// Told what other clients changed, after the cache dropped it (the FUSE layer passes it
    /// on to the kernel's caches).
    inval_hook: OnceLock<InvalHook>,
    config_hook: OnceLock<ConfigHook>,
    /// Namespace requests sent to bricks (reads and changes), for tests and metrics.
    meta_requests: AtomicU64,
    /// What directories' listings said of their order and subdirectories, for reading ahead.
    listings: listings::Listings,
    /// Directories to list ahead of a reader (see [`Volume::start_lister`]); full: not now.
    list_ahead: tokio::sync::mpsc::Sender<InodeId>,
    list_ahead_rx: Mutex<Option<tokio::sync::mpsc::Receiver<InodeId>>>,
    /// Files whose first chunks, and directories whose listings, were fetched ahead of a
    /// reader going through a tree (for tests and metrics).
    files_read_ahead: AtomicU64,
    dirs_listed_ahead: AtomicU64,
    /// Directories delegated to this client, and the changes made beneath them not yet
    /// committed.
    deleg: delegation::Delegations,
    /// Chunks written beneath delegations, uploaded behind the writer.
    uploads: upload::Uploads,
    /// Asks the watch to say goodbye to the leader (see [`Volume::shutdown`]), and is told
    /// when it has.
    bye: Arc<tokio::sync::Notify>,
    /// A brick named a leader other than the one last known: the watch moves to it at once
    /// rather than wait for its renewals to go unanswered (what it held is reclaimed there).
    leader_moved: tokio::sync::Notify,
    said_bye: Arc<tokio::sync::Notify>,
    /// Files and directories are read from this snapshot, and nothing can be changed.
    snapshot: Option<String>,
    /// The clone this client works in (its root and inode numbers), when it is not the volume
    /// the bricks were made with.
    clone: Option<CloneInfo>,
}

/// Passes what other clients changed on (to the kernel's caches); the task it returns, if
/// any, is waited for (up to [`watch::KERNEL_INVAL_WAIT`]) before the change is acknowledged.
pub type InvalHook = Box<dyn Fn(&[Inval]) -> Option<tokio::task::JoinHandle<()>> + Send + Sync>;

/// Told each volume configuration this client reads (options, layout), after it is in place.
pub type ConfigHook = Box<dyn Fn(&VolumeConfig) + Send + Sync>;

/// What a successful create-like change tells the cache: the new name, and for an exclusive
/// create of a regular file the whole inode (the namespace makes it empty, inline, without
/// xattrs), so the getxattr the kernel sends before the first write needs no round trip.
fn own_creation(op: MetaOp, attr: Attr) -> Own {
    let (parent, name, whole, new_dir) = match op {
        MetaOp::Mknod {
            parent,
            name,
            kind,
            exclusive,
            ..
        } => (parent, name, exclusive && kind == FileKind::Regular, false),
        MetaOp::Mkdir { parent, name, .. } => (parent, name, true, true),
        MetaOp::Symlink { parent, name, .. } => (parent, name, false, false),
        MetaOp::Link {
            new_parent,
            new_name,
            ..
        } => (new_parent, new_name, false, false),
        _ => return Own::Other,
    };
    // As the namespace makes them: an empty file, or a directory without xattrs.
    let inode = whole.then(|| {
        Box::new(Inode {
            content: match attr.kind {
                FileKind::Directory => Content::None,
                _ => Content::Inline(Vec::new()),
            },
            attr: attr.clone(),
            xattrs: Vec::new(),
        })
    });
    Own::Made {
        parent,
        name,
        attr,
        inode,
        new_dir,
    }
}

/// A brick's namespace answer with where it stands in the log and what it changed.
struct Answer {
    result: Result<MetaOk, FsError>,
    stamp: Option<Stamp>,
    touched: Vec<Inval>,
    fresh: Vec<Inode>,
}

/// Verified chunks a client keeps in memory.
pub const CHUNK_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Entries one whole listing brings at most: a directory with more is looked up by name.
const LIST_WHOLE_ENTRIES: u32 = 1024;
/// Directories waiting to be listed ahead of a reader, and listed at once, at most.
const LIST_AHEAD_QUEUE: usize = 256;
const LIST_AHEAD_PARALLEL: usize = 4;

fn expect_attr(ok: MetaOk) -> Result<Attr, FsError> {
    match ok {
        MetaOk::Attr(a) => Ok(a),
        other => Err(FsError::Io(format!("unexpected answer {other:?}"))),
    }
}

impl Volume {
    /// Connect to a volume through any of `seeds` (HOST:PORT of its bricks).
    pub async fn connect(
        seeds: &[String],
        volume: &str,
        identity: &Identity,
    ) -> Result<Volume, FsError> {
        if seeds.is_empty() {
            return Err(FsError::Invalid("no brick addresses given".into()));
        }
        let endpoint = client_endpoint(identity).map_err(FsError::from)?;
        Self::with_pool(Pool::new(endpoint), seeds, volume).await
    }

    pub async fn with_pool(pool: Pool, seeds: &[String], volume: &str) -> Result<Volume, FsError> {
        let client_id = rand::random();
        let (list_ahead, list_ahead_rx) = tokio::sync::mpsc::channel(LIST_AHEAD_QUEUE);
        let mut partial = Volume {
            pool,
            seeds: seeds.to_vec(),
            config: RwLock::new(Arc::new(VolumeConfig::new(
                "",
                mortar_proto::DEFAULT_CHUNK_SIZE,
                Vec::new(),
                Default::default(),
            ))),
            leader: Mutex::new(None),
            next: AtomicUsize::new(0),
            chunks: cache::ChunkCache::new(CHUNK_CACHE_BYTES),
            client_id,
            seqs: once::Seqs::new(client_id),
            op_timeout: DEFAULT_OP_TIMEOUT,
            meta_cache: meta_cache::MetaCache::default(),
            inval_hook: OnceLock::new(),
            config_hook: OnceLock::new(),
            meta_requests: AtomicU64::new(0),
            listings: listings::Listings::default(),
            list_ahead,
            list_ahead_rx: Mutex::new(Some(list_ahead_rx)),
            files_read_ahead: AtomicU64::new(0),
            dirs_listed_ahead: AtomicU64::new(0),
            deleg: delegation::Delegations::default(),
            uploads: upload::Uploads::default(),
            bye: Arc::default(),
            leader_moved: tokio::sync::Notify::new(),
            said_bye: Arc::default(),
            snapshot: None,
            clone: None,
        };
        let config = match partial.meta(Request::Query(Query::Volume)).await.result? {
            MetaOk::Volume(v) => v,
            other => return Err(FsError::Io(format!("unexpected answer {other:?}"))),
        };
        if config.name != volume {
            let clones = partial.clones().await?;
            let names: Vec<&str> = std::iter::once(config.name.as_str())
                .chain(clones.iter().map(|c| c.name.as_str()))
                .collect();
            partial.clone = Some(
                clones
                    .iter()
                    .find(|c| c.name == volume)
                    .cloned()
                    .ok_or_else(|| {
                        FsError::Invalid(format!(
                            "volume '{volume}' not found; these bricks serve {}",
                            names.join(", ")
                        ))
                    })?,
            );
        }
        // Later requests may go to any brick of the volume, not only the seeds.
        for b in config.bricks() {
            if !partial.seeds.contains(&b.addr) {
                partial.seeds.push(b.addr.clone());
            }
        }
        *partial.config.get_mut().expect("config lock") = Arc::new(config);
        // The id that names this client's changes and delegations in the bricks' logs.
        tracing::info!(client = %format!("{:032x}", partial.client_id), "volume client");
        Ok(partial)
    }

    /// How long operations keep retrying before failing (ENOTCONN) when no brick can serve them.
    pub fn set_op_timeout(&mut self, t: Duration) {
        self.op_timeout = t;
    }

    /// Read files and directories from snapshot `name` from now on; every change is refused
    /// with EROFS.
    pub fn set_snapshot(&mut self, name: &str) {
        self.snapshot = Some(self.snapshot_name(name));
    }

    /// How the namespace names this volume's snapshot `name`: a clone's are `CLONE@NAME`.
    pub fn snapshot_name(&self, name: &str) -> String {
        match &self.clone {
            Some(c) => format!("{}@{name}", c.name),
            None => name.to_string(),
        }
    }

    /// The clone this client works in, if it is one.
    pub fn clone_info(&self) -> Option<&CloneInfo> {
        self.clone.as_ref()
    }

    /// The volume's number among the volumes its bricks serve (0: the one they were made
    /// with).
    pub fn number(&self) -> VolumeNo {
        self.clone.as_ref().map_or(0, |c| c.volume)
    }

    /// The volume's root directory.
    pub fn root(&self) -> InodeId {
        root_of(self.number())
    }

    /// The name this client was connected with.
    pub fn name(&self) -> String {
        match &self.clone {
            Some(c) => c.name.clone(),
            None => self.config().name.clone(),
        }
    }

    /// The snapshot this client reads, if any.
    pub fn snapshot(&self) -> Option<&str> {
        self.snapshot.as_deref()
    }

    /// Bricks to try, in order: the best health first, rotating among equals so load spreads.
    fn by_health<'a>(&self, bricks: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
        let mut v: Vec<&str> = bricks.collect();
        if !v.is_empty() {
            let start = self.next.fetch_add(1, Ordering::Relaxed) % v.len();
            v.rotate_left(start);
        }
        v.sort_by_key(|a| self.pool.health(a));
        v
    }

    /// Keep a watch on the metadata leader, so lookups, getattr, open and xattr reads are
    /// answered from memory while its lease lasts (see [`mortar_proto::wire::WatchDown`]).
    pub fn start_watch(self: &Arc<Self>) {
        tokio::spawn(watch::run(Arc::downgrade(self)));
        self.start_committer();
        self.start_uploader();
        self.start_lister();
    }

    /// List directories ahead of a reader in the background, a few at a time (listings are
    /// served from memory only under the watch's lease, so this starts with the watch).
    fn start_lister(self: &Arc<Self>) {
        let Some(rx) = self.list_ahead_rx.lock().expect("lister lock").take() else {
            return;
        };
        let vol = Arc::downgrade(self);
        let dirs =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|dir| (dir, rx)) },
            );
        tokio::spawn(dirs.for_each_concurrent(LIST_AHEAD_PARALLEL, move |dir| {
            let vol = vol.clone();
            async move {
                if let Some(vol) = vol.upgrade() {
                    if vol.meta_cache.should_list(dir) && vol.list_whole(dir, true).await.is_some()
                    {
                        vol.dirs_listed_ahead.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    /// A reader looks in `dir`: list ahead the subdirectories it may go into next.
    fn list_ahead_of(&self, subdirs: Vec<InodeId>) {
        for dir in subdirs {
            if self.list_ahead.try_send(dir).is_err() {
                return;
            }
        }
    }

    /// Before going away (unmount): commit everything held, then tell the leader, so the
    /// delegations end at once instead of waiting for this client to come back.
    pub async fn shutdown(&self) -> Result<(), FsError> {
        let committed = self.commit_held().await;
        if committed.is_ok() {
            let said = self.said_bye.notified();
            self.bye.notify_one();
            let _ = tokio::time::timeout(Duration::from_secs(2), said).await;
        }
        committed
    }

    /// Call `hook` with what other clients changed, once this client's cache has dropped it;
    /// the leader is told the change is dropped once the hook's task ended (or after
    /// [`watch::KERNEL_INVAL_WAIT`]).
    /// Call `hook` with every configuration read from now on, and with the current one now.
    pub fn on_config(&self, hook: ConfigHook) {
        hook(&self.config());
        let _ = self.config_hook.set(hook);
    }

    /// Set volume option `key` to `value`, or back to its default (None).
    pub async fn set_option(&self, key: &str, value: Option<&str>) -> Result<(), FsError> {
        mortar_proto::options::check(key, value)?;
        let op = MetaOp::SetOption {
            key: key.to_string(),
            value: value.map(str::to_string),
        };
        self.admin_op(op).await?;
        self.refresh_config().await?;
        Ok(())
    }

    pub fn on_invalidate(&self, hook: InvalHook) {
        let _ = self.inval_hook.set(hook);
    }

    /// Whether namespace reads are being answered from memory (a lease is held).
    pub fn caching(&self) -> bool {
        self.meta_cache.serving()
    }

    /// Namespace requests this client has sent to bricks so far.
    /// Bytes carried per brick by this client's connections.
    pub fn traffic(&self) -> Arc<mortar_proto::metrics::Traffic> {
        self.pool.traffic().clone()
    }

    /// (hits, misses) of the chunk cache and of the namespace cache.
    pub fn cache_tallies(&self) -> [(&'static str, (u64, u64)); 2] {
        [
            ("chunk", self.chunks.tally.get()),
            ("meta", self.meta_cache.tally.get()),
        ]
    }

    pub fn meta_requests(&self) -> u64 {
        self.meta_requests.load(Ordering::Relaxed)
    }

    /// Files whose first chunks were fetched ahead of a reader going through their directory,
    /// and directories listed ahead of one.
    pub fn read_ahead_counts(&self) -> (u64, u64) {
        (
            self.files_read_ahead.load(Ordering::Relaxed),
            self.dirs_listed_ahead.load(Ordering::Relaxed),
        )
    }

    /// Stop (or resume) committing changes held under delegations in the background: only
    /// recalls, fsync and [`Volume::commit_held`] commit them meanwhile. For tests.
    pub fn pause_background_commits(&self, paused: bool) {
        self.deleg.paused.store(paused, Ordering::Relaxed);
        self.deleg.wake.notify_one();
    }

    /// Batches of changes made under delegations sent so far (each is one namespace request).
    pub fn delegated_batches(&self) -> u64 {
        self.deleg.batches.load(Ordering::Relaxed)
    }

    /// Changes made under delegations and committed in their batches so far (changes of one
    /// inode made in a row count once).
    pub fn delegated_changes(&self) -> u64 {
        self.deleg.committed.load(Ordering::Relaxed)
    }

    /// Chunks uploaded behind the writer so far (written beneath a delegation).
    pub fn chunks_uploaded_behind(&self) -> u64 {
        self.uploads.queued_total.load(Ordering::Relaxed)
    }

    /// The random id that names this client to the bricks (its watch, its changes).
    pub fn client_id(&self) -> u128 {
        self.client_id
    }

    /// The volume configuration as this client last read it.
    pub fn config(&self) -> Arc<VolumeConfig> {
        self.config.read().expect("config lock").clone()
    }

    /// Read the volume configuration again (a layout may have changed since).
    pub async fn refresh_config(&self) -> Result<Arc<VolumeConfig>, FsError> {
        let config = match self.meta(Request::Query(Query::Volume)).await.result? {
            MetaOk::Volume(v) => Arc::new(v),
            other => return Err(FsError::Io(format!("unexpected answer {other:?}"))),
        };
        *self.config.write().expect("config lock") = config.clone();
        if config.stopped {
            // Nothing cached may answer for a stopped volume: every request goes to the
            // bricks, which refuse it.
            self.meta_cache.drop_all();
        }
        if let Some(hook) = self.config_hook.get() {
            hook(&config);
        }
        Ok(config)
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Send a namespace request to the leader (or any brick, which forwards it), retrying on
    /// other bricks until the operation timeout. Bricks that cannot reach a quorum answer
    /// changes with EROFS at once (reads still work); that ends the retries.
    async fn meta(&self, req: Request) -> Answer {
        self.meta_requests.fetch_add(1, Ordering::Relaxed);
        let req = match (&self.snapshot, req) {
            (Some(name), Request::Query(q)) if q.reads_files() => {
                Request::Query(Query::InSnapshot {
                    name: name.clone(),
                    query: Box::new(q),
                })
            }
            (
                Some(name),
                Request::Meta { .. } | Request::Delegate { .. } | Request::DelegateListed { .. },
            ) => {
                return Answer {
                    result: Err(FsError::ReadOnly(format!("snapshot '{name}' is read-only"))),
                    stamp: None,
                    touched: Vec::new(),
                    fresh: Vec::new(),
                }
            }
            (_, req) => req,
        };
        self.meta_inner(req).await.unwrap_or_else(|e| Answer {
            result: Err(e),
            stamp: None,
            touched: Vec::new(),
            fresh: Vec::new(),
        })
    }

    async fn meta_inner(&self, req: Request) -> Result<Answer, FsError> {
        let deadline = Instant::now() + self.op_timeout;
        let mut last_err;
        let mut attempt = 0usize;
        // Bricks that answered "read-only" (they cannot reach a quorum) during this operation.
        let mut read_only: Vec<String> = Vec::new();
        // The last of their answers, given as the error.
        let mut refused: Option<FsError> = None;
        loop {
            let leader = self.leader.lock().expect("leader lock").clone();
            let order: Vec<String> = self
                .by_health(self.seeds.iter().map(String::as_str))
                .into_iter()
                .filter(|a| !read_only.iter().any(|r| r == a))
                .map(str::to_string)
                .collect();
            // Every brick that answers says it is cut off from a quorum, and the others are
            // down (they may have gone down after that answer): the volume is read-only.
            let rest_down = order.iter().all(|a| self.pool.health(a) == Health::Down);
            if order.is_empty() || (!read_only.is_empty() && rest_down) {
                return Err(refused.unwrap_or_else(|| {
                    FsError::ReadOnly("no brick this client reaches is in a quorum".into())
                }));
            }
            let first = match leader {
                Some(l) if self.pool.health(&l) == Health::Up && !read_only.contains(&l) => l,
                _ => order[attempt % order.len()].clone(),
            };
            let hedge = order.iter().find(|a| **a != first).cloned();
            attempt += 1;
            let (target, answer) = self.attempt(&req, first, hedge).await;
            match answer {
                Ok(Ok(Reply::Meta {
                    result,
                    leader,
                    stamp,
                    touched,
                    fresh,
                })) => {
                    let named = leader.map(|l| l.addr);
                    let moved = {
                        let mut known = self.leader.lock().expect("leader lock");
                        let moved = named.is_some() && *known != named;
                        *known = named;
                        moved
                    };
                    if moved {
                        self.leader_moved.notify_one();
                    }
                    match result {
                        Err(FsError::Unavailable(e)) => last_err = FsError::Unavailable(e),
                        // An operator's change sent to a follower: the leader it named (now
                        // known) is asked next.
                        Err(e @ FsError::NotLeader(_)) => last_err = e,
                        Err(e @ FsError::ReadOnly(_)) => {
                            // Another brick may still be in the majority: ask the others (the
                            // top of the loop gives EROFS once none is left to ask).
                            read_only.push(target.clone());
                            refused = Some(e);
                            continue;
                        }
                        result => {
                            return Ok(Answer {
                                result,
                                stamp,
                                touched,
                                fresh,
                            })
                        }
                    }
                }
                Ok(Ok(other)) => return Err(FsError::Io(format!("unexpected reply {other:?}"))),
                Ok(Err(e @ (FsError::Unavailable(_) | FsError::NoVolume))) => {
                    *self.leader.lock().expect("leader lock") = None;
                    last_err = e;
                }
                Ok(Err(e)) => return Err(e),
                Err(e) if e.is_refused() => return Err(FsError::NotPermitted(e.to_string())),
                Err(e) => {
                    tracing::debug!(%target, error = %e, "brick did not answer; trying another");
                    *self.leader.lock().expect("leader lock") = None;
                    last_err = e.into();
                }
            }
            if Instant::now() >= deadline {
                return Err(last_err);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One attempt: ask `first`; if it has not answered usefully within [`META_HEDGE`], ask
    /// `hedge` as well (safe: reads are idempotent and changes carry an [`OpId`]). Returns the
    /// first useful answer, or the last answer when none is.
    async fn attempt(
        &self,
        req: &Request,
        first: String,
        hedge: Option<String>,
    ) -> (String, Result<Response, TransportError>) {
        let ask = |addr: String, after: Duration| async move {
            // Even a zero sleep waits for the timer wheel's next tick (about a millisecond),
            // which would double the cost of a lookup.
            if !after.is_zero() {
                tokio::time::sleep(after).await;
            }
            let r = self.pool.call(&addr, req, ATTEMPT_TIMEOUT).await;
            (addr, r)
        };
        let first_addr = first.clone();
        let mut pending = FuturesUnordered::new();
        pending.push(ask(first, Duration::ZERO));
        let mut hedge = hedge;
        let started = Instant::now();
        loop {
            tokio::select! {
                Some((addr, r)) = pending.next() => {
                    let (useful, alive) = match &r {
                        Ok(Ok(Reply::Meta { result: Err(FsError::Unavailable(_)), .. })) => (false, true),
                        Ok(Ok(_)) => (true, true),
                        Ok(Err(FsError::Unavailable(_))) => (false, true),
                        Err(_) => (false, false),
                        Ok(Err(_)) => (true, true),
                    };
                    if useful {
                        return (addr, r);
                    }
                    if let Some(h) = hedge.take() {
                        pending.push(ask(h, Duration::ZERO));
                    } else if pending.is_empty() {
                        return (addr, r);
                    } else if alive && started.elapsed() < ATTEMPT_TIMEOUT {
                        // A live brick without a leader yet (election under way) while the other
                        // ask hangs: ask it again shortly rather than wait out the hung one.
                        pending.push(ask(addr, Duration::from_millis(100)));
                    }
                }
                _ = tokio::time::sleep(META_HEDGE), if hedge.is_some() => {
                    // The first brick is slow to answer: ask another, and try the first after
                    // healthy bricks for the next operations too (it may be frozen).
                    self.pool.mark_suspect(&first_addr);
                    if let Some(h) = hedge.take() {
                        pending.push(ask(h, Duration::ZERO));
                    }
                }
            }
        }
    }

    /// A namespace change as the operator tools send it (heal lease, release records).
    pub async fn admin_op(&self, op: MetaOp) -> Result<MetaOk, FsError> {
        self.write_op(op).await
    }

    /// The clones its bricks serve besides the volume they were made with.
    pub async fn clones(&self) -> Result<Vec<CloneInfo>, FsError> {
        match self.meta(Request::Query(Query::Clones)).await.result? {
            MetaOk::Clones(c) => Ok(c),
            other => Err(FsError::Io(format!("unexpected answer {other:?}"))),
        }
    }

    /// The volume's rebalance progress, as last recorded.
    pub async fn rebalance_state(
        &self,
    ) -> Result<Option<mortar_proto::wire::RebalanceState>, FsError> {
        match self.meta(Request::Query(Query::Rebalance)).await.result? {
            MetaOk::Rebalance(s) => Ok(s),
            other => Err(FsError::Io(format!("unexpected answer {other:?}"))),
        }
    }

    /// Commit a change, after what this client holds under delegations (so changes land in
    /// the order they were made).
    async fn write_op(&self, op: MetaOp) -> Result<MetaOk, FsError> {
        if self.deleg.holds_any() {
            self.commit_held().await?;
        }
        let ticket = self.seqs.ticket().await;
        self.write_op_as(op, ticket.id()).await
    }

    async fn write_op_as(&self, op: MetaOp, once: OpId) -> Result<MetaOk, FsError> {
        let ticket = self.meta_cache.ticket();
        // Changes whose outcome tells the cache more than what they touched.
        let naming = matches!(
            op,
            MetaOp::Mknod { .. }
                | MetaOp::Mkdir { .. }
                | MetaOp::Symlink { .. }
                | MetaOp::Link { .. }
                | MetaOp::Unlink { .. }
                | MetaOp::Rmdir { .. }
        )
        .then(|| op.clone());
        let a = self
            .meta(Request::Meta {
                op,
                once: Some(once),
            })
            .await;
        let Some(stamp) = a.stamp else {
            // No word on what happened (it may have been applied): trust nothing cached.
            self.meta_cache.drop_all();
            return a.result;
        };
        let own = match (naming, &a.result) {
            (Some(op), Ok(MetaOk::Attr(attr))) => own_creation(op, attr.clone()),
            (Some(MetaOp::Unlink { parent, name } | MetaOp::Rmdir { parent, name }), Ok(_)) => {
                Own::Removed { parent, name }
            }
            _ => Own::Other,
        };
        let other = matches!(own, Own::Other);
        self.meta_cache.own_change(ticket, stamp, &a.touched, own);
        if let Some(t) = ticket {
            if let (true, Ok(MetaOk::Attr(attr))) = (other, &a.result) {
                self.meta_cache.put_attr(t, Some(stamp), attr);
            }
            for dir in &a.fresh {
                self.meta_cache.put_inode(t, Some(stamp), dir);
            }
        }
        a.result
    }

    async fn query(&self, q: Query) -> Result<MetaOk, FsError> {
        self.meta(Request::Query(q)).await.result
    }

    pub async fn lookup(&self, parent: InodeId, name: &[u8]) -> Result<Attr, FsError> {
        // The kernel passes names of up to 1024 bytes to FUSE: a longer one than any entry
        // may have is ENAMETOOLONG, not "no such name".
        mortar_proto::validate_name(name)?;
        match self.deleg.name(parent, name) {
            Name::Found(attr) => return Ok(attr),
            Name::Absent => return Err(FsError::NotFound),
            Name::Committed(ino) => return self.getattr(ino).await,
            Name::Elsewhere => {}
        }
        if let Some(known) = self.meta_cache.name(parent, name) {
            self.list_ahead_of(self.listings.looked_in(parent));
            return known.ok_or(FsError::NotFound);
        }
        // A first look into a directory brings the whole of it (a reader of a docroot then
        // pays one round trip a directory, not one a file).
        if self.meta_cache.should_list(parent) {
            self.list_whole(parent, false).await;
            if let Some(known) = self.meta_cache.name(parent, name) {
                return known.ok_or(FsError::NotFound);
            }
        }
        let ticket = self.meta_cache.ticket();
        let a = self
            .meta(Request::Query(Query::LookupWhole {
                parent,
                name: name.to_vec(),
            }))
            .await;
        if let Some(t) = ticket {
            match &a.result {
                Ok(MetaOk::Attr(attr)) => {
                    self.meta_cache
                        .put_name(t, a.stamp, parent, name, Some(attr))
                }
                Ok(MetaOk::Inode(inode)) => {
                    self.meta_cache
                        .put_name(t, a.stamp, parent, name, Some(&inode.attr));
                    self.meta_cache.put_inode(t, a.stamp, inode);
                }
                Err(FsError::NotFound) => self.meta_cache.put_name(t, a.stamp, parent, name, None),
                _ => {}
            }
        }
        match a.result? {
            MetaOk::Inode(inode) => Ok(inode.attr),
            other => expect_attr(other),
        }
    }

    /// Cache the entries of `dir` (a small one completely) and its small files whole, and
    /// return the entries when the answer held them all. Errors leave the cache as it was: the
    /// lookup or listing that asked goes on without it. `ahead`: no reader asked yet (listed
    /// for a reader, its subdirectories are listed ahead of it).
    async fn list_whole(&self, dir: InodeId, ahead: bool) -> Option<Vec<DirEntry>> {
        let ticket = self.meta_cache.ticket()?;
        let a = self
            .meta(Request::Query(Query::ListWhole {
                dir,
                limit: LIST_WHOLE_ENTRIES,
            }))
            .await;
        let Ok(MetaOk::Listed { entries, complete }) = a.result else {
            return None;
        };
        self.meta_cache
            .put_listing(ticket, a.stamp, dir, &entries, complete);
        let files = entries.iter().filter(|e| e.attr.kind == FileKind::Regular);
        let files = files
            .map(|e| {
                let chunked = match &e.whole {
                    Some(i) => matches!(i.content, Content::Chunks(_)),
                    None => e.attr.size > INLINE_MAX as u64,
                };
                (e.attr.ino, chunked)
            })
            .collect();
        let subdirs: Vec<InodeId> = entries
            .iter()
            .filter(|e| e.attr.kind == FileKind::Directory)
            .map(|e| e.attr.ino)
            .take(listings::SUBDIRS_AHEAD)
            .collect();
        if !ahead {
            self.list_ahead_of(subdirs.clone());
        }
        self.listings.listed(dir, files, subdirs, ahead);
        complete.then(|| {
            entries
                .into_iter()
                .map(|e| DirEntry {
                    name: e.name,
                    attr: e.attr,
                })
                .collect()
        })
    }

    pub async fn getattr(&self, ino: InodeId) -> Result<Attr, FsError> {
        if let Some(attr) = self.deleg.attr(ino) {
            return Ok(attr);
        }
        if let Some(attr) = self.meta_cache.attr(ino) {
            return Ok(attr);
        }
        let ticket = self.meta_cache.ticket();
        let a = self.meta(Request::Query(Query::GetAttr { ino })).await;
        let attr = expect_attr(a.result?)?;
        if let Some(t) = ticket {
            self.meta_cache.put_attr(t, a.stamp, &attr);
        }
        Ok(attr)
    }

    pub async fn inode(&self, ino: InodeId) -> Result<Inode, FsError> {
        if let Some(inode) = self.deleg.inode(ino) {
            return Ok(inode);
        }
        if let Some(inode) = self.meta_cache.inode(ino) {
            return Ok(inode);
        }
        let ticket = self.meta_cache.ticket();
        let a = self.meta(Request::Query(Query::GetInode { ino })).await;
        match a.result? {
            MetaOk::Inode(i) => {
                if let Some(t) = ticket {
                    self.meta_cache.put_inode(t, a.stamp, &i);
                }
                Ok(i)
            }
            other => Err(FsError::Io(format!("unexpected answer {other:?}"))),
        }
    }

    /// One page of a directory, sorted by name, after `after`.
    pub async fn readdir(
        &self,
        ino: InodeId,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<DirEntry>, FsError> {
        if let Some(page) = self.readdir_local(ino, after, limit) {
            return Ok(page);
        }
        if self.deleg.attr(ino).is_some() {
            self.give_back(&[ino]).await?;
        }
        match self
            .query(Query::ReadDir {
                ino,
                after: after.map(<[u8]>::to_vec),
                limit,
            })
            .await?
        {
            MetaOk::Entries(e) => Ok(e),
            other => Err(FsError::Io(format!("unexpected answer {other:?}"))),
        }
    }

    pub async fn readdir_all(&self, ino: InodeId) -> Result<Vec<DirEntry>, FsError> {
        // A first listing of a directory not held here brings its small files whole too, as a
        // first lookup does: a reader walking a docroot (find | xargs cat, a deploy check)
        // then opens and reads each file from memory instead of asking for it.
        if self.deleg.attr(ino).is_none() && self.meta_cache.should_list(ino) {
            if let Some(all) = self.list_whole(ino, false).await {
                return Ok(all);
            }
        }
        let mut all: Vec<DirEntry> = Vec::new();
        loop {
            let after = all.last().map(|e| e.name.clone());
            let page = self.readdir(ino, after.as_deref(), 1024).await?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn mknod(
        &self,
        parent: InodeId,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        exclusive: bool,
    ) -> Result<Attr, FsError> {
        let op = MetaOp::Mknod {
            parent,
            name: name.to_vec(),
            kind,
            perm,
            uid,
            gid,
            rdev,
            exclusive,
        };
        if !kind.mknod_under_delegation() {
            // Made by the leader: a delegation of the parent must not answer for it.
            self.give_back(&[parent]).await?;
        }
        if let Some(made) = self.create_local(&op).await {
            return match made {
                // Not exclusive: an existing regular file is opened, as the namespace does.
                Err(FsError::Exists) if !exclusive && kind == FileKind::Regular => {
                    match self.lookup(parent, name).await? {
                        a if a.kind == FileKind::Regular => Ok(a),
                        _ => Err(FsError::Exists),
                    }
                }
                other => other,
            };
        }
        expect_attr(self.write_op(op).await?)
    }

    pub async fn create(
        &self,
        parent: InodeId,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr, FsError> {
        self.mknod(parent, name, FileKind::Regular, perm, uid, gid, 0, true)
            .await
    }

    pub async fn mkdir(
        &self,
        parent: InodeId,
        name: &[u8],
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr, FsError> {
        let op = MetaOp::Mkdir {
            parent,
            name: name.to_vec(),
            perm,
            uid,
            gid,
        };
        if let Some(made) = self.create_local(&op).await {
            return made;
        }
        let attr = expect_attr(self.write_op(op).await?)?;
        self.deleg.made(attr.ino);
        Ok(attr)
    }

    pub async fn symlink(
        &self,
        parent: InodeId,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<Attr, FsError> {
        let op = MetaOp::Symlink {
            parent,
            name: name.to_vec(),
            target: target.to_vec(),
            uid,
            gid,
        };
        if let Some(made) = self.create_local(&op).await {
            return made;
        }
        expect_attr(self.write_op(op).await?)
    }

    pub async fn readlink(&self, ino: InodeId) -> Result<Vec<u8>, FsError> {
        match self.inode(ino).await?.content {
            Content::Symlink(t) => Ok(t),
            _ => Err(FsError::Invalid("not a symlink".into())),
        }
    }

    pub async fn link(
        &self,
        ino: InodeId,
        new_parent: InodeId,
        new_name: &[u8],
    ) -> Result<Attr, FsError> {
        self.give_back(&[ino, new_parent]).await?;
        expect_attr(
            self.write_op(MetaOp::Link {
                ino,
                new_parent,
                new_name: new_name.to_vec(),
            })
            .await?,
        )
    }

    pub async fn unlink(&self, parent: InodeId, name: &[u8]) -> Result<(), FsError> {
        if let Some(done) = self.remove_local(parent, name, false).await {
            return done;
        }
        self.give_back(&[parent]).await?;
        self.write_op(MetaOp::Unlink {
            parent,
            name: name.to_vec(),
        })
        .await
        .map(|_| ())
    }

    pub async fn rmdir(&self, parent: InodeId, name: &[u8]) -> Result<(), FsError> {
        if let Some(done) = self.remove_local(parent, name, true).await {
            return done;
        }
        self.give_back(&[parent]).await?;
        self.write_op(MetaOp::Rmdir {
            parent,
            name: name.to_vec(),
        })
        .await
        .map(|_| ())
    }

    /// Atomic rename; `flags` is 0, RENAME_NOREPLACE or RENAME_EXCHANGE.
    pub async fn rename(
        &self,
        parent: InodeId,
        name: &[u8],
        new_parent: InodeId,
        new_name: &[u8],
        flags: u32,
    ) -> Result<(), FsError> {
        let op = MetaOp::Rename {
            parent,
            name: name.to_vec(),
            new_parent,
            new_name: new_name.to_vec(),
            flags,
        };
        if let Some(done) = self.rename_local(&op).await {
            return done;
        }
        self.give_back(&[parent, new_parent]).await?;
        self.write_op(op).await.map(|_| ())
    }

    pub async fn setattr(&self, ino: InodeId, set: SetAttr) -> Result<Attr, FsError> {
        let op = MetaOp::SetAttr { ino, set };
        if let Some(changed) = self.change_local(ino, &op).await {
            return changed.map(|i| i.attr);
        }
        expect_attr(self.write_op(op).await?)
    }

    pub async fn setxattr(
        &self,
        ino: InodeId,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<(), FsError> {
        let op = MetaOp::SetXattr {
            ino,
            name: name.to_vec(),
            value: value.to_vec(),
            mode,
        };
        if let Some(changed) = self.change_local(ino, &op).await {
            return changed.map(|_| ());
        }
        self.write_op(op).await.map(|_| ())
    }

    pub async fn getxattr(&self, ino: InodeId, name: &[u8]) -> Result<Vec<u8>, FsError> {
        self.inode(ino)
            .await?
            .xattrs
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(FsError::NoXattr)
    }

    pub async fn listxattr(&self, ino: InodeId) -> Result<Vec<Vec<u8>>, FsError> {
        Ok(self
            .inode(ino)
            .await?
            .xattrs
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    pub async fn removexattr(&self, ino: InodeId, name: &[u8]) -> Result<(), FsError> {
        // Refused by the cached inode (current while the lease lasts), as the namespace would
        // refuse it: nothing to commit. `cp -a` removes a directory's default ACL that is
        // never there.
        if let Some(mut cached) = self.meta_cache.inode(ino) {
            cached.remove_xattr(name, mortar_proto::Timestamp::now())?;
        }
        let op = MetaOp::RemoveXattr {
            ino,
            name: name.to_vec(),
        };
        if let Some(changed) = self.change_local(ino, &op).await {
            return changed.map(|_| ());
        }
        self.write_op(op).await.map(|_| ())
    }

    pub async fn statfs(&self) -> Result<StatFs, FsError> {
        match self.query(Query::StatFs).await? {
            MetaOk::StatFs(s) => Ok(s),
            other => Err(FsError::Io(format!("unexpected answer {other:?}"))),
        }
    }
}
