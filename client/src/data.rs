//! File data: chunks placed by the layout, written read-modify-write and committed with a
//! version check, read with verification and fallback to other replicas.
//!
//! Invariant: chunk `i` of a file holds at most `min(chunk_size, size - i * chunk_size)` bytes;
//! bytes past a chunk's end (and holes) read as zeros. Truncating down therefore rewrites the
//! last partial chunk, and extending a file never needs to touch data.

use crate::{expect_attr, Volume};
use futures::stream::FuturesUnordered;
use futures::stream::{self, StreamExt, TryStreamExt};
use mortar_proto::chunk_map::{check_size, end_of};
use mortar_proto::wire::{MetaOk, MetaOp, PutChunk, Reply, Request};
use mortar_proto::{layout, range};
use mortar_proto::{
    Attr, ChunkId, ChunkMap, Content, FsError, Inode, InodeId, Timestamp, VolumeConfig, INLINE_MAX,
};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long one chunk write may take at the brick that takes it (it waits for a quorum of
/// copies) before we hand the chunk to another brick of the set.
const PUT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between rounds over the set when no brick took a chunk, doubling up to the maximum.
const PUT_RETRY_AFTER: Duration = Duration::from_millis(100);
const PUT_MAX_RETRY_AFTER: Duration = Duration::from_secs(1);
/// A chunk read gets this long at one replica before the next replica is asked as well; the
/// first good answer wins, so a frozen or slow brick costs a read this much, not a timeout.
pub use mortar_proto::timing::CHUNK_HEDGE as HEDGE_DELAY;
const GET_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How a write stores the chunks it makes.
#[derive(Clone, Copy)]
enum Put {
    /// Queued to be uploaded behind the writer (beneath a live delegation).
    Behind,
    /// On a quorum before the write goes on; `sync` also syncs the bricks' WALs.
    Stored { sync: bool },
}

/// How a read is made: part of a stream (whole chunks, cached, read ahead) or a random access
/// (small reads fetch only what they cover).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Stream,
    Random,
}

/// A random read up to this long of a chunk not at hand fetches its covering groups only;
/// longer ones fetch the chunk.
const RANGE_MAX: u64 = 256 * 1024;

/// Chunk transfers in flight per file operation.
const CHUNK_PARALLELISM: usize = 4;
/// How many chunks past a sequential reader's position are fetched ahead of it (8 MiB at the
/// default chunk size: a few chunk fetches' latency at the rate one brick serves).
const READ_AHEAD_CHUNKS: u64 = 8;
/// Files after the one being read whose first bytes (the chunks covering
/// `READ_AHEAD_FILE_BYTES`) are fetched ahead of a reader going through a directory.
const READ_AHEAD_FILES: usize = 4;
const READ_AHEAD_FILE_BYTES: u64 = 1024 * 1024;
/// Commits retried on version conflicts before giving up.
const MAX_CONFLICT_RETRIES: usize = 64;

impl Volume {
    pub fn chunk_size(&self) -> u64 {
        self.config().chunk_size as u64
    }

    /// Store one chunk on its replica set (quorum-durable on return). Any brick of the set can
    /// take it; we try them in turn, round after round until the operation timeout (a brick
    /// may be restarting, or a copy waiting for a quorum), and stop at once at an answer no
    /// retry can change.
    pub async fn put_chunk(&self, data: Vec<u8>, sync: bool) -> Result<ChunkId, FsError> {
        let id = ChunkId::of(&data);
        let config = self.config();
        let set = layout::replica_set(&config, &id);
        let req = Request::PutChunk(PutChunk {
            id,
            data,
            replicate: true,
            sync,
        });
        let deadline = tokio::time::Instant::now() + self.op_timeout;
        let mut pause = PUT_RETRY_AFTER;
        loop {
            let mut last = FsError::Unavailable("no brick of the replica set answered".into());
            for addr in self.by_health(set.iter().map(|b| b.addr.as_str())) {
                match self.pool.call(addr, &req, PUT_ATTEMPT_TIMEOUT).await {
                    Ok(Ok(Reply::ChunkStored { .. })) => return Ok(id),
                    Ok(Ok(other)) => {
                        return Err(FsError::Io(format!("unexpected reply {other:?}")))
                    }
                    // Every primary of the set asks the same replicas: no retry can succeed.
                    Ok(Err(
                        e @ (FsError::HashMismatch(_)
                        | FsError::TooLarge(_)
                        | FsError::NoSpace(_)
                        | FsError::NotPermitted(_)),
                    )) => return Err(e),
                    Ok(Err(e)) => last = e,
                    Err(e) if e.is_refused() => return Err(FsError::NotPermitted(e.to_string())),
                    Err(e) => last = e.into(),
                }
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(last);
            }
            tracing::debug!(chunk = %id, error = %last, "no brick of the set took the chunk; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PUT_MAX_RETRY_AFTER);
        }
    }

    /// Whether chunk `id` is cached, being fetched, or waiting to be uploaded from here.
    fn at_hand(&self, id: &ChunkId) -> bool {
        self.chunks.holds(id) || self.uploads.pending(id).is_some()
    }

    /// A chunk from the cache, or fetched (once, however many ask) and cached.
    pub async fn chunk(&self, id: &ChunkId) -> Result<std::sync::Arc<Vec<u8>>, FsError> {
        if let Some(data) = self.uploads.pending(id) {
            return Ok(data);
        }
        self.chunks.get_or_fetch(*id, || self.get_chunk(id)).await
    }

    /// Fetch a chunk from any replica that has a copy matching its id. Replicas of its set are
    /// asked in order of health, then (during a layout change) those of the set it was placed
    /// on before; each gets [`HEDGE_DELAY`] before the next is asked too, and the first good
    /// copy wins. When no brick has it, the layout may have changed since this client read it:
    /// it reads the configuration again and, if the layout moved, asks once more.
    pub async fn get_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, FsError> {
        self.fetch_verified(id, &Request::GetChunk { id: *id }, |reply| match reply {
            Reply::Chunk(data) if id.matches(&data) => Ok(data),
            Reply::Chunk(_) => Err(FsError::HashMismatch(id.to_hex())),
            other => Err(FsError::Io(format!("unexpected reply {other:?}"))),
        })
        .await
    }

    /// `len` bytes at `offset` of a chunk (fewer at its end), without fetching the whole
    /// chunk: the covering groups, verified against the chunk's id (see
    /// [`mortar_proto::range`]), from any replica as [`Volume::get_chunk`] asks them.
    pub async fn get_range(&self, id: &ChunkId, offset: u64, len: u64) -> Result<Vec<u8>, FsError> {
        let req = Request::GetRange {
            id: *id,
            offset,
            len,
        };
        self.fetch_verified(id, &req, |reply| match reply {
            Reply::Range {
                chunk_len,
                start,
                values,
                data,
            } => {
                let want = offset..offset.saturating_add(len);
                range::verify(id, want, chunk_len, &values, start, &data)?;
                let from = (offset.max(start) - start) as usize;
                let to = (offset.saturating_add(len).min(chunk_len).max(start) - start) as usize;
                Ok(data.get(from..to.max(from)).unwrap_or(&[]).to_vec())
            }
            other => Err(FsError::Io(format!("unexpected reply {other:?}"))),
        })
        .await
    }

    /// Ask the replicas of chunk `id` with `req` until `accept` takes an answer, refreshing
    /// the layout once when none has the chunk.
    async fn fetch_verified<T>(
        &self,
        id: &ChunkId,
        req: &Request,
        accept: impl Fn(Reply) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        let config = self.config();
        let first = self.ask_replicas(&config, id, req, &accept).await;
        let retry = matches!(first, Err(FsError::NotFound | FsError::HashMismatch(_)))
            && self
                .refresh_config()
                .await
                .is_ok_and(|c| c.epoch != config.epoch);
        let outcome = if retry {
            self.ask_replicas(&self.config(), id, req, &accept).await
        } else {
            first
        };
        outcome.map_err(|e| match e {
            FsError::NotFound | FsError::HashMismatch(_) => {
                FsError::Io(format!("no good copy of chunk {id}"))
            }
            other => other,
        })
    }

    async fn ask_replicas<T>(
        &self,
        config: &VolumeConfig,
        id: &ChunkId,
        req: &Request,
        accept: &impl Fn(Reply) -> Result<T, FsError>,
    ) -> Result<T, FsError> {
        let mut order = self.by_health(
            layout::replica_set(config, id)
                .iter()
                .map(|b| b.addr.as_str()),
        );
        if let Some(before) = layout::previous_set_index(config, id) {
            let bricks = config.replica_sets[before].bricks.iter();
            order.extend(self.by_health(bricks.map(|b| b.addr.as_str())));
        }
        let mut pending = FuturesUnordered::new();
        let mut next = order.iter();
        let mut last = FsError::Io(format!("chunk {id} unavailable on every replica"));
        loop {
            if pending.is_empty() {
                match next.next() {
                    Some(addr) => pending.push(self.ask_chunk(addr, req)),
                    None => break,
                }
            }
            let hedge = tokio::time::sleep(HEDGE_DELAY);
            tokio::select! {
                Some((addr, r)) = futures::StreamExt::next(&mut pending) => match r {
                    Ok(Ok(reply)) => match accept(reply) {
                        Ok(v) => return Ok(v),
                        Err(e @ FsError::HashMismatch(_)) => {
                            tracing::error!(chunk = %id, brick = addr, "corrupt chunk copy; reading another replica");
                            last = e;
                        }
                        Err(e) => last = e,
                    },
                    Ok(Err(e)) => last = e,
                    Err(e) => last = e.into(),
                },
                _ = hedge => {
                    if let Some(addr) = next.next() {
                        pending.push(self.ask_chunk(addr, req));
                    }
                }
            }
        }
        Err(last)
    }

    async fn ask_chunk<'a>(
        &self,
        addr: &'a str,
        req: &Request,
    ) -> (
        &'a str,
        Result<mortar_proto::wire::Response, mortar_proto::transport::TransportError>,
    ) {
        (addr, self.pool.call(addr, req, GET_ATTEMPT_TIMEOUT).await)
    }

    /// A sequential reader of `inode` reached `from`: fetch the chunks from there on into the
    /// cache in the background, so its next reads find them.
    pub fn read_ahead(self: &std::sync::Arc<Self>, inode: &Inode, from: u64) {
        let (Content::Chunks(chunks), size) = (&inode.content, inode.attr.size) else {
            return;
        };
        if from >= size {
            return;
        }
        let cs = self.chunk_size();
        let first = from / cs;
        let last = ((size - 1) / cs).min(first + READ_AHEAD_CHUNKS);
        for i in first..=last {
            let Some(id) = chunks.get(i).copied() else {
                continue;
            };
            self.fetch_behind(id);
        }
    }

    /// Fetch chunk `id` into the cache in the background unless it is at hand (cached, on its
    /// way, or waiting to be uploaded from here); true if a fetch started.
    fn fetch_behind(self: &std::sync::Arc<Self>, id: ChunkId) -> bool {
        if self.uploads.pending(&id).is_some() {
            return false;
        }
        let Some(fetch) = self.chunks.claim(id) else {
            return false;
        };
        let vol = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            let got = vol.chunks.fill(id, fetch, || vol.get_chunk(&id));
            if let Err(e) = got.await {
                tracing::debug!(chunk = %id, error = %e, "read-ahead fetch failed");
            }
        });
        true
    }

    /// A reader began `ino`: fetch the first MiB of the next few chunked files listed after it
    /// in its directory into the cache in the background, so a reader going through the
    /// directory file by file finds them (only those whose inode is cached whole: it never
    /// costs a namespace round trip).
    pub fn read_ahead_next_files(self: &std::sync::Arc<Self>, ino: InodeId) {
        for next in self.listings.next_chunked(ino, READ_AHEAD_FILES) {
            let Some(inode) = self.meta_cache.cached_inode(next) else {
                continue;
            };
            let Content::Chunks(chunks) = &inode.content else {
                continue;
            };
            let head = READ_AHEAD_FILE_BYTES.min(inode.attr.size).max(1);
            let fetching = (0..head.div_ceil(self.chunk_size()))
                .filter_map(|i| chunks.get(i).copied())
                .filter(|id| self.fetch_behind(*id))
                .count();
            if fetching > 0 {
                self.files_read_ahead
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Read `len` bytes at `offset` of a file whose inode the caller holds, as part of a
    /// stream: whole chunks are fetched and cached.
    pub async fn read_inode(
        &self,
        inode: &Inode,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, FsError> {
        self.read_inode_as(inode, offset, len, Access::Stream).await
    }

    /// Read `len` bytes at `offset` of a file whose inode the caller holds. For a random
    /// access, a small read of a chunk not at hand fetches only the groups it covers.
    pub async fn read_inode_as(
        &self,
        inode: &Inode,
        offset: u64,
        len: u64,
        access: Access,
    ) -> Result<Vec<u8>, FsError> {
        let size = inode.attr.size;
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(len));
        match &inode.content {
            Content::Inline(b) => {
                let mut out = b
                    .get(offset as usize..(end as usize).min(b.len()))
                    .unwrap_or(&[])
                    .to_vec();
                out.resize((end - offset) as usize, 0);
                Ok(out)
            }
            Content::Chunks(chunks) => {
                let cs = self.chunk_size();
                let first = offset / cs;
                let last = (end - 1) / cs;
                let pieces: Vec<Vec<u8>> = stream::iter(first..=last)
                    .map(|i| async move {
                        let lo = (i * cs).max(offset);
                        let hi = ((i + 1) * cs).min(end);
                        let mut piece = vec![0u8; (hi - lo) as usize];
                        let from = lo - i * cs;
                        match chunks.get(i) {
                            Some(id)
                                if access == Access::Random
                                    && hi - lo <= RANGE_MAX
                                    && !self.at_hand(id) =>
                            {
                                let got = self.get_range(id, from, hi - lo).await?;
                                let n = got.len().min(piece.len());
                                piece[..n].copy_from_slice(&got[..n]);
                            }
                            Some(id) => {
                                let data = self.chunk(id).await?;
                                let from = from as usize;
                                if from < data.len() {
                                    let n = (data.len() - from).min(piece.len());
                                    piece[..n].copy_from_slice(&data[from..from + n]);
                                }
                            }
                            None => {}
                        }
                        Ok::<_, FsError>(piece)
                    })
                    .buffered(CHUNK_PARALLELISM)
                    .try_collect()
                    .await?;
                Ok(pieces.concat())
            }
            Content::None | Content::Symlink(_) => {
                Err(FsError::Invalid("not a regular file".into()))
            }
        }
    }

    pub async fn read(&self, ino: InodeId, offset: u64, len: u64) -> Result<Vec<u8>, FsError> {
        let inode = self.inode(ino).await?;
        if inode.attr.kind == mortar_proto::FileKind::Directory {
            return Err(FsError::IsDir);
        }
        self.read_inode(&inode, offset, len).await
    }

    /// Current bytes of chunk `i` as a mutable buffer (empty for a hole).
    async fn chunk_bytes(&self, chunks: &ChunkMap, i: u64) -> Result<Vec<u8>, FsError> {
        match chunks.get(i) {
            Some(id) => Ok(self.chunk(id).await?.to_vec()),
            None => Ok(Vec::new()),
        }
    }

    /// Commit `update` against the file's content, retrying on concurrent changes. `base` is
    /// the caller's copy of the inode, if it has one: it saves a round trip, and a stale copy
    /// costs only a version conflict and a retry. Returns the inode as committed.
    async fn commit_with<F, Fut>(
        &self,
        ino: InodeId,
        mut base: Option<Inode>,
        then: &[MetaOp],
        update: F,
    ) -> Result<Inode, FsError>
    where
        F: Fn(Inode) -> Fut,
        Fut: std::future::Future<Output = Result<(u64, Content), FsError>>,
    {
        for _ in 0..MAX_CONFLICT_RETRIES {
            // Beneath a live delegation this client's copy is the file.
            let local = self.live_inode(ino);
            let is_local = local.is_some();
            let inode = match (local, base.take()) {
                (Some(i), _) | (None, Some(i)) => i,
                (None, None) => self.inode(ino).await?,
            };
            match inode.attr.kind {
                mortar_proto::FileKind::Regular => {}
                mortar_proto::FileKind::Directory => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid("not a regular file".into())),
            }
            let version = inode.attr.version;
            let xattrs = inode.xattrs.clone();
            let before = match &inode.content {
                Content::Chunks(m) => Some(m.clone()),
                _ => None,
            };
            let (size, content) = update(inode).await?;
            let mut op = MetaOp::SetContent {
                ino,
                expect_version: version,
                size,
                content: content.clone(),
            };
            if is_local {
                match self.change_local(ino, &op).await {
                    Some(Ok(mut changed)) => {
                        for (i, then_op) in then.iter().enumerate() {
                            match self.change_local(ino, then_op).await {
                                Some(Ok(c)) => changed = c,
                                Some(Err(e)) => {
                                    tracing::debug!(ino, error = %e, "a held-back change does not apply")
                                }
                                None => {
                                    // The delegation ended meanwhile: the rest goes as usual.
                                    self.write_op(MetaOp::Batch(then[i..].to_vec())).await?;
                                    return self.inode(ino).await;
                                }
                            }
                        }
                        return Ok(changed);
                    }
                    Some(Err(FsError::Conflict(_))) => continue,
                    Some(Err(e)) => return Err(e),
                    // The delegation ended meanwhile: commit as usual.
                    None => {}
                }
            }
            // What `update` left to upload behind us must be stored before anything names it.
            self.wait_uploads().await?;
            // A chunked file's commit names only what changed: the log grows with the bytes
            // written, not with the file's size at every flush.
            if let (Some(before), Content::Chunks(after)) = (&before, &content) {
                let patch = before.diff(after);
                if patch.len() < after.len() {
                    op = MetaOp::PatchContent {
                        ino,
                        expect_version: version,
                        size,
                        patch,
                    };
                }
            }
            if !then.is_empty() {
                op = MetaOp::Batch(std::iter::once(op).chain(then.iter().cloned()).collect());
            }
            let first = match self.write_op(op).await {
                Err(FsError::Conflict(_)) => continue,
                Ok(MetaOk::Batch(results)) => results
                    .into_iter()
                    .next()
                    .ok_or_else(|| FsError::Invalid("empty answer to a batch".into()))?,
                other => other?,
            };
            let mut committed = Inode {
                attr: expect_attr(first)?,
                content,
                xattrs,
            };
            // The batch's attribute changes, as the namespace applied them (times may differ
            // from the bricks' clock by the round trip; the next fetch corrects them).
            let now = Timestamp::now();
            for op in then {
                apply_to_inode(&mut committed, op, now);
            }
            return Ok(committed);
        }
        Err(FsError::Unavailable(
            "file kept changing under concurrent writers".into(),
        ))
    }

    /// Write `data` at `offset`. Durable on a quorum on return; `sync` also syncs the bricks'
    /// write-ahead logs (fsync).
    pub async fn write(
        &self,
        ino: InodeId,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<Attr, FsError> {
        self.write_ranges(ino, &[(offset, data)], sync).await
    }

    /// Apply several writes to one file in one commit (the FUSE layer flushes its buffer so).
    pub async fn write_ranges(
        &self,
        ino: InodeId,
        ranges: &[(u64, &[u8])],
        sync: bool,
    ) -> Result<Attr, FsError> {
        Ok(self
            .write_ranges_on(ino, None, ranges, sync, &[])
            .await?
            .attr)
    }

    /// Apply writes to `base` (our copy of the inode, if we have one) and commit them, followed
    /// in the same commit by `then`: attribute and xattr changes of this file made after the
    /// writes (chmod, chown, utimens, setxattr), so a flush cannot overwrite them. Returns the
    /// inode as committed.
    pub async fn write_ranges_on(
        &self,
        ino: InodeId,
        base: Option<Inode>,
        ranges: &[(u64, &[u8])],
        sync: bool,
        then: &[MetaOp],
    ) -> Result<Inode, FsError> {
        // Beneath a live delegation the flush is held with the other changes, and its chunks
        // are uploaded behind it; an fsync waits for its own.
        let put = if !sync && self.live_inode(ino).is_some() {
            Put::Behind
        } else {
            Put::Stored { sync }
        };
        self.commit_with(ino, base, then, |inode| {
            self.with_ranges(inode, ranges, put)
        })
        .await
    }

    /// Set a file's size, cutting or extending with zeros.
    pub async fn truncate(&self, ino: InodeId, new_size: u64) -> Result<Attr, FsError> {
        let put = Put::Stored { sync: false };
        let committed = self
            .commit_with(ino, None, &[], |inode| self.truncated(inode, new_size, put))
            .await?;
        Ok(committed.attr)
    }

    /// A file unlinked while open is reachable only through its open handles, which keep their
    /// own copy of its inode: writes and truncates change that copy and commit nothing. Its
    /// chunks are stored as usual, and kept for garbage collection's grace period.
    pub async fn write_detached(
        &self,
        inode: &Inode,
        ranges: &[(u64, &[u8])],
    ) -> Result<Inode, FsError> {
        let put = Put::Stored { sync: false };
        let (size, content) = self.with_ranges(inode.clone(), ranges, put).await?;
        let mut out = inode.clone();
        out.set_content(size, content, Timestamp::now());
        Ok(out)
    }

    /// [`Volume::write_detached`] for a truncate.
    pub async fn truncate_detached(&self, inode: &Inode, new_size: u64) -> Result<Inode, FsError> {
        let put = Put::Stored { sync: false };
        let (size, content) = self.truncated(inode.clone(), new_size, put).await?;
        let mut out = inode.clone();
        out.set_content(size, content, Timestamp::now());
        Ok(out)
    }

    async fn put(&self, data: Vec<u8>, put: Put) -> Result<ChunkId, FsError> {
        match put {
            Put::Behind => Ok(self.put_chunk_behind(data).await),
            Put::Stored { sync } => self.put_chunk(data, sync).await,
        }
    }

    /// A regular file's size and content with `ranges` written into it; the chunks they
    /// touch are stored as `put` says.
    async fn with_ranges(
        &self,
        inode: Inode,
        ranges: &[(u64, &[u8])],
        put: Put,
    ) -> Result<(u64, Content), FsError> {
        let mut end = 0;
        for (o, d) in ranges {
            end = end.max(end_of(*o, d.len() as u64)?);
        }
        let size = inode.attr.size.max(end);
        let cs = self.chunk_size();
        let mut chunks = match inode.content {
            Content::Inline(b) if size as usize <= INLINE_MAX => {
                let mut b = b;
                b.resize(size as usize, 0);
                for (o, d) in ranges {
                    b[*o as usize..*o as usize + d.len()].copy_from_slice(d);
                }
                return Ok((size, Content::Inline(b)));
            }
            Content::Inline(b) if b.is_empty() => ChunkMap::new(),
            Content::Inline(b) => [(0, self.put(b, put).await?)].into_iter().collect(),
            Content::Chunks(c) => c,
            _ => return Err(FsError::Invalid("not a regular file".into())),
        };
        let mut touched: Vec<u64> = ranges
            .iter()
            .filter(|(_, d)| !d.is_empty())
            .flat_map(|(o, d)| o / cs..=(o + d.len() as u64 - 1) / cs)
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let old = &chunks;
        let new_ids: Vec<(u64, ChunkId)> = stream::iter(touched)
            .map(|i| async move {
                let mut buf = self.chunk_bytes(old, i).await?;
                let base = i * cs;
                for (o, d) in ranges {
                    let lo = (*o).max(base);
                    let hi = (o + d.len() as u64).min(base + cs);
                    if lo >= hi {
                        continue;
                    }
                    let (from, to) = ((lo - base) as usize, (hi - base) as usize);
                    if buf.len() < to {
                        buf.resize(to, 0);
                    }
                    buf[from..to].copy_from_slice(&d[(lo - o) as usize..(hi - o) as usize]);
                }
                Ok::<_, FsError>((i, self.put(buf, put).await?))
            })
            .buffer_unordered(CHUNK_PARALLELISM)
            .try_collect()
            .await?;
        for (i, id) in new_ids {
            chunks.set(i, id);
        }
        Ok((size, Content::Chunks(chunks)))
    }

    /// A regular file's size and content cut or extended (with zeros) to `new_size`.
    async fn truncated(
        &self,
        inode: Inode,
        new_size: u64,
        put: Put,
    ) -> Result<(u64, Content), FsError> {
        check_size(new_size)?;
        let cs = self.chunk_size();
        match inode.content {
            Content::Inline(mut b) if new_size as usize <= INLINE_MAX => {
                b.resize(new_size as usize, 0);
                Ok((new_size, Content::Inline(b)))
            }
            Content::Inline(b) => {
                // Growing past the inline limit: the old bytes become chunk 0.
                let mut chunks = ChunkMap::new();
                if !b.is_empty() {
                    chunks.set(0, self.put(b, put).await?);
                }
                Ok((new_size, Content::Chunks(chunks)))
            }
            Content::Chunks(mut chunks) => {
                let keep = new_size.div_ceil(cs);
                chunks.truncate(keep);
                let tail = (new_size % cs) as usize;
                if new_size < inode.attr.size && tail != 0 {
                    if let Some(id) = chunks.get(keep - 1) {
                        let mut last = self.chunk(id).await?.to_vec();
                        if last.len() > tail {
                            last.truncate(tail);
                            chunks.set(keep - 1, self.put(last, put).await?);
                        }
                    }
                }
                Ok((new_size, Content::Chunks(chunks)))
            }
            _ => Err(FsError::Invalid("not a regular file".into())),
        }
    }

    /// Replace a file's content with everything `reader` yields, holding at most a few chunks in
    /// memory. Committed once at the end, so readers see the old or the new file, never a mix.
    pub async fn write_from<R: AsyncRead + Unpin>(
        &self,
        ino: InodeId,
        mut reader: R,
        sync: bool,
    ) -> Result<Attr, FsError> {
        let version = self.inode(ino).await?.attr.version;
        let cs = self.chunk_size() as usize;
        let mut size = 0u64;
        let mut first = read_full(&mut reader, cs).await?;
        size += first.len() as u64;
        if first.len() <= INLINE_MAX && first.len() < cs {
            let content = Content::Inline(std::mem::take(&mut first));
            return self.replace_content(ino, version, size, content).await;
        }
        let mut pending = futures::stream::FuturesOrdered::new();
        let mut ids = ChunkMap::new();
        let mut block = first;
        loop {
            let done = block.len() < cs;
            if !block.is_empty() {
                pending.push_back(self.put_chunk(block, sync));
            }
            while pending.len() >= CHUNK_PARALLELISM || (done && !pending.is_empty()) {
                let id = pending.next().await.expect("non-empty")?;
                ids.set(ids.end(), id);
            }
            if done {
                break;
            }
            block = read_full(&mut reader, cs).await?;
            size += block.len() as u64;
            check_size(size)?;
        }
        self.replace_content(ino, version, size, Content::Chunks(ids))
            .await
    }

    /// Commit a file's whole new content. Nothing is merged, so a change made since
    /// `version` (a link, a chmod, another writer) only means committing again over the
    /// version it left.
    async fn replace_content(
        &self,
        ino: InodeId,
        version: u64,
        size: u64,
        content: Content,
    ) -> Result<Attr, FsError> {
        let mut expect_version = version;
        for _ in 0..MAX_CONFLICT_RETRIES {
            let op = MetaOp::SetContent {
                ino,
                expect_version,
                size,
                content: content.clone(),
            };
            match self.write_op(op).await {
                Err(FsError::Conflict(now)) => expect_version = now,
                other => return expect_attr(other?),
            }
        }
        Err(FsError::Unavailable(
            "file kept changing under concurrent writers".into(),
        ))
    }

    /// Stream a whole file to `writer`, a chunk at a time.
    pub async fn read_to<W: AsyncWrite + Unpin>(
        &self,
        ino: InodeId,
        writer: &mut W,
    ) -> Result<u64, FsError> {
        let inode = self.inode(ino).await?;
        let cs = self.chunk_size();
        let mut offset = 0;
        while offset < inode.attr.size {
            let piece = self.read_inode(&inode, offset, cs).await?;
            writer
                .write_all(&piece)
                .await
                .map_err(|e| FsError::Io(e.to_string()))?;
            offset += piece.len() as u64;
        }
        writer
            .flush()
            .await
            .map_err(|e| FsError::Io(e.to_string()))?;
        Ok(offset)
    }
}

async fn read_full<R: AsyncRead + Unpin>(reader: &mut R, n: usize) -> Result<Vec<u8>, FsError> {
    let mut buf = Vec::with_capacity(n);
    (&mut *reader)
        .take(n as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| FsError::Io(e.to_string()))?;
    Ok(buf)
}

/// Apply an attribute or xattr change to a local copy of an inode, as the namespace does.
/// Anything else (or a change the namespace would refuse) leaves it as it is.
pub fn apply_to_inode(inode: &mut Inode, op: &MetaOp, now: Timestamp) {
    match op {
        MetaOp::SetAttr { set, .. } => inode.set_attr(set, now),
        MetaOp::SetXattr {
            name, value, mode, ..
        } => {
            let _ = inode.set_xattr(name, value, *mode, now);
        }
        _ => {}
    }
}
