//! The brick's request service: accepts QUIC connections, reads the peer's role from its
//! certificate, and answers one request per stream.

use crate::chunk;
use crate::heal;
use crate::namespace;
use crate::raft::{self, Command, DbMeta, Raft, SharedVolume};
use crate::store::{Store, CF_HEAL_INDEX};
use crate::watch::{Named, Watchers};
use mortar_proto::replication::Replication;
use mortar_proto::tls::{peer_identity, Role};
use mortar_proto::transport::{Health, Pool};
use mortar_proto::wire::{
    read_frame, write_frame, AdminRequest, BrickHello, BrickStatus, FrameError, MetaOk, MetaOp,
    OpId, PeerHealth, Query, Reply, Request, Response, Sender, Stamp, LISTED_MAX,
};
use mortar_proto::{
    layout, BrickId, BrickRef, ChunkId, FsError, InodeId, StatFs, Timestamp, VolumeConfig, NAME_MAX,
};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mortar_proto::timing::FORWARD_TIMEOUT;
pub use mortar_proto::timing::META_TIMEOUT;
/// Volume creation waits for the first election for up to this long.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the leader asks its peers about their disks, and how long an answer counts.
const PEER_SPACE_EVERY: Duration = Duration::from_secs(1);
const PEER_SPACE_FRESH: Duration = Duration::from_secs(5);
const _: () = assert!(PEER_SPACE_FRESH.as_millis() > 2 * PEER_SPACE_EVERY.as_millis());

pub struct Brick {
    pub id: BrickId,
    pub store: Arc<Store>,
    pub raft: Raft,
    pub pool: Pool,
    pub volume: SharedVolume,
    pub data_dir: PathBuf,
    pub watchers: Arc<Watchers>,
    /// Followers' lag, while this brick leads.
    pub lag: Arc<crate::lag::Lag>,
    /// When this brick last heard a leader, and its pre-votes.
    pub campaign: Arc<raft::Campaign>,
    pub log_bound: Arc<crate::log_bound::LogBound>,
    /// The data disk and the reserve kept on it for metadata.
    pub space: Arc<crate::space::Space>,
    /// On the leader: what each peer last said about its disk (why it is full, if it is).
    pub peers_full: std::sync::Mutex<HashMap<BrickId, (Option<String>, Instant)>>,
    /// On the leader: changes proposed and not answered yet, which a retry joins.
    pub proposals: crate::proposals::Proposals<Written>,
    /// What `--metrics` serves.
    pub metrics: crate::metrics::BrickMetrics,
    /// Accepted connections, checked again when the volume's access rules change.
    pub live: Arc<crate::access::Live>,
    /// Told once this brick was released from its deleted volume and has answered: it stops.
    pub released: tokio::sync::Notify,
}

/// What a proposal to the namespace log came to.
pub type Written = Result<
    openraft::raft::ClientWriteResponse<raft::TypeConfig>,
    RaftError<BrickId, ClientWriteError<BrickId, BasicNode>>,
>;

/// Refuse (and log) a request the peer's certificate role does not allow.
fn require(role: Role, wanted: &[Role]) -> Result<(), FsError> {
    if wanted.contains(&role) {
        return Ok(());
    }
    tracing::warn!(%role, "refused request: not allowed for this certificate role");
    Err(FsError::NotPermitted(format!(
        "a {role} certificate may not do this"
    )))
}

fn unavailable(e: impl std::fmt::Display) -> FsError {
    FsError::Unavailable(e.to_string())
}

impl Brick {
    /// Accept connections until the endpoint closes.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let brick = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "refused connection (TLS handshake failed)");
                        return;
                    }
                };
                let (role, name) = match peer_identity(&conn) {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "refused connection");
                        conn.close(1u32.into(), b"certificate has no mortar role");
                        return;
                    }
                };
                tracing::debug!(%remote, %role, %name, "connection");
                let serial = mortar_proto::tls::peer_serial(&conn);
                // Known to the live set before the check: a configuration applied after the
                // check is enforced on it, one applied before is seen by the check.
                let _admitted = brick.live.admit(role, &name, serial.clone(), &conn);
                let config = brick.volume().ok();
                if let Some(why) =
                    crate::access::refusal(config.as_ref(), role, &name, serial.as_deref())
                {
                    tracing::warn!(%remote, "refused connection: {why}");
                    conn.close(
                        mortar_proto::transport::ACCESS_REFUSED.into(),
                        why.as_bytes(),
                    );
                    return;
                }
                let _counted = brick.pool.traffic().track(&name, &conn);
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let brick = brick.clone();
                    tokio::spawn(async move { brick.serve_stream(role, send, recv).await });
                }
            });
        }
    }

    async fn serve_stream(
        &self,
        role: Role,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let mut releasing = false;
        let response = match read_frame::<Request>(&mut recv).await {
            Ok(Request::Watch { client }) if role == Role::Client => {
                // The stream stays open for the watch's lifetime.
                return self.watchers.clone().serve(client, send, recv).await;
            }
            Ok(req) => {
                releasing = matches!(req, Request::Admin(AdminRequest::ReleaseVolume { .. }));
                let (op, started) = (req.op(), Instant::now());
                let response = self.dispatch(role, req).await;
                self.metrics.ops.observe(op, started.elapsed());
                match &response {
                    Err(e) | Ok(Reply::Meta { result: Err(e), .. }) => {
                        self.metrics.ops.failed(e.errno())
                    }
                    Ok(_) => {}
                }
                response
            }
            Err(FrameError::Read(e)) => {
                tracing::debug!(error = %e, "stream ended before a request");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "rejected malformed request");
                let _ = recv.stop(1u32.into());
                Err(FsError::Invalid(e.to_string()))
            }
        };
        if let Err(e) = write_frame(&mut send, &response).await {
            tracing::debug!(error = %e, "could not send response");
        }
        let _ = send.finish();
        if releasing && response.is_ok() {
            // Stop only once the operator's tool has its answer (or gave up on it).
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            self.released.notify_one();
        }
    }

    pub async fn dispatch(&self, role: Role, req: Request) -> Response {
        let need = |wanted: &[Role]| require(role, wanted);
        if role == Role::Client {
            self.refuse_if_stopped(&req)?;
        }
        match req {
            Request::Hello => Ok(Reply::Hello(BrickHello {
                id: self.id,
                volume: self.volume().ok().map(|v| v.name),
                version: env!("CARGO_PKG_VERSION").to_string(),
            })),
            Request::PutChunk(p) => {
                if p.replicate {
                    let volume = self.volume()?;
                    let copies = chunk::put_replicated(
                        &self.store,
                        &self.space,
                        &self.pool,
                        self.id,
                        &volume,
                        p,
                    )
                    .await?;
                    Ok(Reply::ChunkStored { copies })
                } else {
                    need(&[Role::Brick])?;
                    chunk::verify(&p)?;
                    chunk::store_copy_apart(&self.store, &self.space, p.id, p.data, p.sync).await?;
                    Ok(Reply::ChunkStored { copies: 1 })
                }
            }
            Request::GetRange { id, offset, len } => {
                let (store, me) = (Arc::clone(&self.store), self.id);
                crate::store::blocking(move || heal::read_range(&store, me, &id, offset, len)).await
            }
            Request::GetChunk { id } => {
                let (store, me) = (Arc::clone(&self.store), self.id);
                let data =
                    crate::store::blocking(move || heal::read_verified(&store, me, &id)).await?;
                Ok(Reply::Chunk(data))
            }
            Request::Meta { op, once } => {
                match op.sender() {
                    Sender::Anyone => {}
                    Sender::Admin => need(&[Role::Admin])?,
                    Sender::Leader => {
                        return Err(FsError::NotPermitted(
                            "delegations and bricks are recorded by the metadata leader itself"
                                .into(),
                        ))
                    }
                }
                Ok(self.meta_write(op, once).await)
            }
            Request::Query(q) => Ok(self.query(q).await),
            Request::Raft(rpc) => {
                need(&[Role::Brick])?;
                let retired: Vec<BrickId> = self
                    .volume()
                    .map(|v| v.retired.iter().map(|b| b.id).collect())
                    .unwrap_or_default();
                raft::serve_rpc(&self.raft, &self.campaign, self.id, &retired, rpc).await
            }
            Request::Admin(a) => self.admin(role, a).await,
            Request::Delegate { client, dir } => {
                // A follower forwards a client's request under its brick certificate.
                need(&[Role::Client, Role::Brick])?;
                Ok(self.delegate(client, dir, false).await)
            }
            Request::DelegateListed { client, dir } => {
                need(&[Role::Client, Role::Brick])?;
                Ok(self.delegate(client, dir, true).await)
            }
            Request::Watch { .. } => Err(FsError::NotPermitted(
                "only a client certificate may watch the namespace".into(),
            )),
        }
    }

    /// A stopped volume serves clients nothing but what lets a mount see it start again: the
    /// hello, the volume configuration and the watch (which never reaches here).
    fn refuse_if_stopped(&self, req: &Request) -> Result<(), FsError> {
        match req {
            Request::Hello | Request::Query(Query::Volume) => Ok(()),
            _ => match self.volume() {
                Ok(v) if v.stopped => Err(FsError::Stopped(v.name)),
                _ => Ok(()),
            },
        }
    }

    pub fn volume(&self) -> Result<VolumeConfig, FsError> {
        self.volume
            .read()
            .expect("volume lock")
            .clone()
            .ok_or(FsError::NoVolume)
    }

    fn leader(&self) -> Option<BrickRef> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?;
        Some(BrickRef {
            id,
            addr: node.addr.clone(),
        })
    }

    /// Wait for a known leader (an election may be under way).
    pub(crate) async fn await_leader(&self, deadline: Instant) -> Result<BrickRef, FsError> {
        let mut metrics = self.raft.metrics();
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FsError::Unavailable("no metadata leader elected".into()));
            }
            let _ = tokio::time::timeout(left, metrics.changed()).await;
        }
    }

    /// Resolves once this brick sees a leader other than `id` (or none).
    async fn leader_moves_from(&self, id: BrickId) {
        let mut metrics = self.raft.metrics();
        loop {
            if metrics.borrow().current_leader != Some(id) {
                return;
            }
            if metrics.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    async fn forward(&self, leader: &BrickRef, req: &Request) -> Reply {
        match self.pool.call(&leader.addr, req, FORWARD_TIMEOUT).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => Reply::meta(Err(e), Some(leader.clone())),
            Err(e) => Reply::meta(Err(unavailable(e)), None),
        }
    }

    /// Commit a namespace change through the leader: locally if we lead, else one hop.
    /// True when this brick plus the peers it can reach are a majority of the metadata group.
    /// Without that, no change can commit here: changes are refused with EROFS at once and
    /// reads are answered from this replica (possibly stale), so a mount left with one brick
    /// keeps reading.
    fn quorum_reachable(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        if voters.is_empty() {
            return true;
        }
        let reachable = voters
            .iter()
            .filter(|id| {
                **id == self.id
                    || membership
                        .get_node(id)
                        .is_some_and(|n| self.pool.health(&n.addr) != Health::Down)
            })
            .count();
        reachable >= mortar_proto::replication::majority(voters.len())
    }

    pub async fn meta_write(&self, op: MetaOp, once: Option<OpId>) -> Reply {
        self.meta_write_within(op, once, META_TIMEOUT).await
    }

    async fn meta_write_within(&self, op: MetaOp, once: Option<OpId>, wait: Duration) -> Reply {
        if !self.quorum_reachable() {
            return Reply::meta(
                Err(FsError::ReadOnly(
                    "this brick cannot reach a majority of the volume's bricks".into(),
                )),
                None,
            );
        }
        let deadline = Instant::now() + wait;
        loop {
            let leader = match self.await_leader(deadline).await {
                Ok(l) => l,
                Err(e) => return Reply::meta(Err(e), None),
            };
            if leader.id != self.id && op.sender() != Sender::Anyone {
                // An operator's change goes to the leader under the operator's certificate.
                return Reply::meta(Err(FsError::NotLeader(leader.addr.clone())), Some(leader));
            }
            if leader.id != self.id {
                let req = Request::Meta {
                    op: op.clone(),
                    once,
                };
                // If an election moves the leadership meanwhile (the one we forwarded to froze or
                // died), forward again to the new leader instead of waiting out the hop; the
                // OpId makes a second proposal harmless.
                tokio::select! {
                    reply = self.forward(&leader, &req) => return reply,
                    _ = self.leader_moves_from(leader.id) => continue,
                }
            }
            let size = mortar_proto::wire::encoded_len(&op);
            if size > raft::MAX_ENTRY {
                return Reply::meta(
                    Err(FsError::Invalid(format!(
                        "a metadata change of {size} bytes exceeds the {}-byte limit",
                        raft::MAX_ENTRY
                    ))),
                    None,
                );
            }
            let grows = namespace::new_data_bytes(&op);
            if grows > 0 {
                if let Err(e) = self.space_refusal(grows) {
                    return Reply::meta(Err(e), Some(leader));
                }
            }
            let named = self.named_by_op(&op);
            let admitted = Instant::now();
            let _in_flight = match self.watchers.admit(once.map(|o| o.client), named).await {
                Ok(f) => f,
                Err(e) => return Reply::meta(Err(e), None),
            };
            // From here until the answer goes, the change's own client learns of it from the
            // answer; if the wait below gives up, the change is announced to it as to others.
            let _awaiting = self.watchers.awaiting(once);
            let cmd = Command {
                op: op.clone(),
                once,
                now: Timestamp::now(),
            };
            // A recall waited for is not time the commit had: it gets what was left before.
            let left = deadline.saturating_duration_since(admitted);
            let propose = {
                let raft = self.raft.clone();
                async move { raft.client_write(cmd).await }
            };
            // A retry of a change still in the log waits for it rather than proposing it again.
            let written = match once {
                Some(id) => self.proposals.join_or_start(id, propose),
                None => futures::FutureExt::shared(futures::FutureExt::boxed(
                    futures::FutureExt::map(propose, Arc::new),
                )),
            };
            let written = tokio::time::timeout(left, written).await;
            match written.as_ref().map(|w| &**w) {
                Ok(Ok(resp)) => {
                    let index = resp.log_id.index;
                    // Applying it announced it to every other watcher.
                    self.watchers.settled(index).await;
                    // A change applied before (this is a retry) comes back without what it
                    // touched: no stamp, so its client trusts nothing it cached.
                    let stamp = (!resp.data.replayed).then_some(Stamp {
                        leader: self.id,
                        term: resp.log_id.leader_id.term,
                        index,
                    });
                    return Reply::Meta {
                        result: resp.data.result.clone(),
                        leader: Some(leader),
                        stamp,
                        touched: resp.data.touched.clone(),
                        fresh: resp.data.fresh.clone(),
                    };
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                    // Leadership moved between our check and the write; look again.
                    continue;
                }
                Ok(Err(e)) => return Reply::meta(Err(unavailable(e)), None),
                Err(_) => {
                    return Reply::meta(
                        Err(FsError::Unavailable(format!(
                            "metadata write not committed within {wait:?} (no quorum?)"
                        ))),
                        None,
                    )
                }
            }
        }
    }

    /// Answer a namespace read on the leader, so it reflects every acknowledged change.
    pub async fn query(&self, q: Query) -> Reply {
        let deadline = Instant::now() + META_TIMEOUT;
        let leader = if self.quorum_reachable() {
            match self.await_leader(deadline).await {
                Ok(l) => Some(l),
                Err(e) => return Reply::meta(Err(e), None),
            }
        } else {
            None
        };
        if let Some(l) = leader.as_ref().filter(|l| l.id != self.id) {
            let req = Request::Query(q);
            return tokio::select! {
                reply = self.forward(l, &req) => reply,
                _ = self.leader_moves_from(l.id) => Reply::meta(
                    Err(FsError::Unavailable("the metadata leader changed".into())),
                    self.leader(),
                ),
            };
        }
        let _in_flight = match leader {
            Some(_) => match self.watchers.admit(None, self.named_by_query(&q)).await {
                Ok(f) => Some(f),
                Err(e) => return Reply::meta(Err(e), None),
            },
            None => None,
        };
        // The applied index before the read: the answer reflects at least this much, and the
        // watch invalidates anything later that touches it. Only a caught-up leader stamps.
        let stamp = leader.as_ref().and_then(|_| self.watchers.stamp());
        let result = match q {
            Query::StatFs => self.statfs(),
            q => namespace::query(&DbMeta(&self.store), &q),
        };
        Reply::Meta {
            result,
            leader,
            stamp,
            touched: Vec::new(),
            fresh: Vec::new(),
        }
    }

    /// Grant `client` a delegation of the empty directory `dir` on the leader or, `listed`,
    /// of a directory of at most [`LISTED_MAX`] entries, answered with them.
    async fn delegate(&self, client: u128, dir: InodeId, listed: bool) -> Reply {
        let leader = match self.await_leader(Instant::now() + META_TIMEOUT).await {
            Ok(l) => l,
            Err(e) => return Reply::meta(Err(e), None),
        };
        if leader.id != self.id {
            let req = match listed {
                true => Request::DelegateListed { client, dir },
                false => Request::Delegate { client, dir },
            };
            return self.forward(&leader, &req).await;
        }
        let Some(stamp) = self.watchers.stamp() else {
            return Reply::meta(
                Err(FsError::Unavailable(
                    "the leader is not caught up yet".into(),
                )),
                Some(leader),
            );
        };
        // Changes held under a delegation are shown to applications before they commit and
        // are committed from the reserve; on a full disk, writers go the way that can answer
        // ENOSPC instead.
        if let Err(e) = self.space_refusal(0) {
            return Reply::meta(Err(e), Some(leader));
        }
        // Read while no request naming the directory is being answered, so the holder's
        // starting point is exactly what the namespace has.
        let mut entries = None;
        let granted = self
            .watchers
            .delegate(client, dir, || match listed {
                false => namespace::empty_dir_parent(&DbMeta(&self.store), dir),
                true => Ok(
                    namespace::listed_dir(&DbMeta(&self.store), dir, LISTED_MAX)?.map(
                        |(parent, found)| {
                            entries = Some(found);
                            parent
                        },
                    ),
                ),
            })
            .await;
        if granted.is_ok() {
            // Other clients may have cached "no such name" in the directory; the holder will
            // make names there that no change announces until it commits them. Names it may
            // remove or rename (a listed directory's) leave other clients' kernels too, so
            // their next look at any of them reaches this leader, which recalls first.
            let mut inval = vec![mortar_proto::wire::Inval::Names(dir)];
            if let Some(entries) = &entries {
                inval.extend(
                    entries
                        .iter()
                        .map(|e| mortar_proto::wire::Inval::Entry(dir, e.name.clone())),
                );
            }
            self.watchers
                .announce(Some(client), stamp.index, &inval)
                .await;
        }
        // The directory as the holder starts from (nothing else changes it from now on).
        let result = granted
            .and_then(|()| namespace::query(&DbMeta(&self.store), &Query::GetInode { ino: dir }))
            .map(|ok| match (ok, entries) {
                (MetaOk::Inode(dir), Some(entries)) => MetaOk::Delegated { dir, entries },
                (ok, _) => ok,
            });
        Reply::Meta {
            result,
            leader: Some(leader),
            stamp: Some(stamp),
            touched: Vec::new(),
            fresh: Vec::new(),
        }
    }

    /// What a change names, for recalling delegations before it is made.
    fn named_by_op(&self, op: &MetaOp) -> Named {
        let mut named = Named::default();
        self.add_named(op, &mut named);
        named
    }

    fn add_named(&self, op: &MetaOp, named: &mut Named) {
        match op {
            MetaOp::Mknod { parent, .. }
            | MetaOp::Mkdir { parent, .. }
            | MetaOp::Symlink { parent, .. } => named.inos.push(*parent),
            MetaOp::Link {
                ino,
                new_parent,
                new_name,
            } => {
                named.inos.extend([*ino, *new_parent]);
                self.add_child(*new_parent, new_name, named);
            }
            MetaOp::Unlink { parent, name } | MetaOp::Rmdir { parent, name } => {
                named.inos.push(*parent);
                self.add_child(*parent, name, named);
            }
            MetaOp::Rename {
                parent,
                name,
                new_parent,
                new_name,
                ..
            } => {
                named.inos.extend([*parent, *new_parent]);
                self.add_child(*parent, name, named);
                self.add_child(*new_parent, new_name, named);
            }
            MetaOp::SetAttr { ino, .. }
            | MetaOp::SetXattr { ino, .. }
            | MetaOp::RemoveXattr { ino, .. }
            | MetaOp::SetContent { ino, .. }
            | MetaOp::PatchContent { ino, .. } => named.inos.push(*ino),
            MetaOp::SetInode { inode, .. } => named.inos.push(inode.attr.ino),
            MetaOp::Batch(ops) => ops.iter().for_each(|op| self.add_named(op, named)),
            MetaOp::Local { op, .. } => self.add_named(op, named),
            // A snapshot holds everything any mount has shown, so whatever is held under a
            // delegation is committed first; a restore changes anything.
            MetaOp::CreateSnapshot { .. }
            | MetaOp::RestoreSnapshot { .. }
            | MetaOp::RestorePath { .. }
            | MetaOp::DropClone { .. }
            | MetaOp::SetStopped { stopped: true } => named.everything = true,
            MetaOp::DeleteSnapshot { .. }
            | MetaOp::CreateVolume(_)
            | MetaOp::HealLease { .. }
            | MetaOp::ForgetReleased(_)
            | MetaOp::ReserveInodes { .. }
            | MetaOp::ReserveInodesIn { .. }
            // A clone reads a snapshot (never changed) and writes a new volume's rows.
            | MetaOp::CloneSnapshot { .. }
            | MetaOp::Delegated { .. }
            | MetaOp::Undelegated { .. }
            | MetaOp::ReplaceBrick { .. }
            | MetaOp::AddSets(_)
            | MetaOp::DrainSet { .. }
            | MetaOp::RemoveSet { .. }
            | MetaOp::SettleLayout { .. }
            | MetaOp::SetOption { .. }
            | MetaOp::SetStopped { stopped: false }
            | MetaOp::Revoke(_)
            | MetaOp::Rebalance(_) => {}
        }
    }

    /// The entry `name` of `parent`, when it may be a delegated directory.
    fn add_child(&self, parent: InodeId, name: &[u8], named: &mut Named) {
        if self.watchers.delegates_in(parent) {
            if let Ok(Some(child)) = namespace::child_ino(&DbMeta(&self.store), parent, name) {
                named.inos.push(child);
            }
        }
    }

    fn named_by_query(&self, q: &Query) -> Named {
        let mut named = Named::default();
        match q {
            Query::Lookup { parent, name } | Query::LookupWhole { parent, name } => {
                named.inos.push(*parent);
                self.add_child(*parent, name, &mut named);
            }
            Query::GetAttr { ino } | Query::GetInode { ino } => named.inos.push(*ino),
            Query::ReadDir { ino, .. } | Query::ListWhole { dir: ino, .. } => {
                named.inos.push(*ino);
                named.listed.push(*ino);
            }
            // Snapshots are never delegated.
            Query::StatFs
            | Query::Volume
            | Query::Rebalance
            | Query::Snapshots
            | Query::Clones
            | Query::InSnapshot { .. } => {}
        }
        named
    }

    fn statfs(&self) -> Result<MetaOk, FsError> {
        let (free_bytes, total_bytes) = self.space.usage()?;
        Ok(MetaOk::StatFs(StatFs {
            total_bytes,
            free_bytes,
            files: namespace::inode_count(&DbMeta(&self.store))?,
            block_size: 4096,
            name_max: NAME_MAX as u32,
        }))
    }

    async fn admin(&self, role: Role, req: AdminRequest) -> Response {
        let need = |wanted: &[Role]| require(role, wanted);
        match req {
            AdminRequest::Status => Ok(Reply::Status(self.status().await?)),
            AdminRequest::InitVolume(config) => {
                need(&[Role::Admin])?;
                self.init_volume(config).await
            }
            AdminRequest::ListChunks { after, limit } => {
                need(&[Role::Admin, Role::Brick])?;
                let limit = limit.clamp(1, 100_000) as usize;
                self.scan(move |s| Ok(Reply::Chunks(s.list_chunks(after.as_ref(), limit)?)))
                    .await
            }
            AdminRequest::ListHealIndex { after, limit } => {
                need(&[Role::Admin, Role::Brick])?;
                let limit = limit.clamp(1, 100_000) as usize;
                self.scan(move |s| Ok(Reply::HealIndex(s.list_heal_index(after, limit)?)))
                    .await
            }
            AdminRequest::MetaDigest => {
                need(&[Role::Admin, Role::Brick])?;
                self.scan(|s| {
                    let (applied_index, digest) = raft::meta_digest(s)?;
                    Ok(Reply::MetaDigest {
                        applied_index,
                        digest,
                    })
                })
                .await
            }
            AdminRequest::RecordMisses(misses) => {
                need(&[Role::Brick])?;
                self.store.record_misses(&misses)?;
                Ok(Reply::Done)
            }
            AdminRequest::ChunkDigest => {
                need(&[Role::Admin, Role::Brick])?;
                self.scan(|s| Ok(Reply::ChunkDigest(s.chunk_digest()?)))
                    .await
            }
            AdminRequest::ListBucket {
                bucket,
                after,
                limit,
            } => {
                need(&[Role::Admin, Role::Brick])?;
                let limit = limit.clamp(1, 100_000) as usize;
                self.scan(move |s| {
                    Ok(Reply::Chunks(s.list_bucket(
                        bucket,
                        after.as_ref(),
                        limit,
                    )?))
                })
                .await
            }
            AdminRequest::HasChunks(ids) => {
                need(&[Role::Admin, Role::Brick])?;
                self.scan(move |s| {
                    let present = ids
                        .iter()
                        .map(|id| s.has_chunk(id))
                        .collect::<Result<Vec<bool>, _>>()?;
                    Ok(Reply::Present(present))
                })
                .await
            }
            AdminRequest::FetchChunks { ids, sources } => {
                need(&[Role::Admin])?;
                let fetched =
                    heal::fetch_chunks(&self.store, &self.space, &self.pool, &ids, &sources)
                        .await?;
                Ok(Reply::Fetched(fetched))
            }
            AdminRequest::ClearHealIndex(entries) => {
                need(&[Role::Admin])?;
                self.store.clear_heal_index(&entries)?;
                Ok(Reply::Done)
            }
            AdminRequest::Scrub {
                after,
                limit,
                max_bytes_per_sec,
            } => {
                need(&[Role::Admin])?;
                let limit = limit.clamp(1, 10_000) as usize;
                heal::scrub(self.store.clone(), self.id, after, limit, max_bytes_per_sec).await
            }
            AdminRequest::ScanReferences { after, limit } => {
                need(&[Role::Admin])?;
                let limit = limit.clamp(1, 100_000) as usize;
                self.confirm_leading().await?;
                self.scan(move |s| {
                    let (chunks, next) = namespace::chunk_references(&DbMeta(s), after, limit)?;
                    Ok(Reply::References { chunks, next })
                })
                .await
            }
            AdminRequest::SnapshotUsage { name } => {
                need(&[Role::Admin])?;
                self.confirm_leading().await?;
                self.scan(move |s| {
                    namespace::snapshot_usage(&DbMeta(s), name.as_deref()).map(Reply::SnapshotUsage)
                })
                .await
            }
            AdminRequest::ListReleased { after, limit, now } => {
                need(&[Role::Admin])?;
                let limit = limit.clamp(1, 100_000) as usize;
                self.scan(move |s| {
                    let now = (Timestamp::now().secs.max(0) as u64).min(now) as i64;
                    let released = namespace::released(&DbMeta(s), after.as_ref(), limit)?
                        .into_iter()
                        .map(|(id, at)| (id, now.saturating_sub(at.secs).max(0) as u64))
                        .collect();
                    Ok(Reply::Released(released))
                })
                .await
            }
            // Membership changes: a follower answers NotLeader, and the tool asks the leader.
            AdminRequest::ReplaceBrick { old, new } => {
                need(&[Role::Admin])?;
                Ok(Reply::Replaced(self.replace_brick(&old, &new).await?))
            }
            AdminRequest::AddBrick { bricks } => {
                need(&[Role::Admin])?;
                Ok(Reply::Volume(self.add_brick(&bricks).await?))
            }
            AdminRequest::RemoveBrick { bricks, commit } => {
                need(&[Role::Admin])?;
                Ok(Reply::Volume(self.remove_brick(&bricks, commit).await?))
            }
            AdminRequest::DropStrays { ids, epoch } => {
                need(&[Role::Admin])?;
                let volume = self.volume()?;
                if volume.epoch < epoch || volume.previous.is_some() {
                    return Err(FsError::Unavailable(format!(
                        "this brick has the layout at epoch {}, not yet settled at {epoch}",
                        volume.epoch
                    )));
                }
                let me = self.id;
                let strays: Vec<ChunkId> = ids
                    .into_iter()
                    .filter(|id| !layout::replica_set(&volume, id).iter().any(|b| b.id == me))
                    .collect();
                self.scan(move |s| {
                    Ok(Reply::Collected(s.collect_garbage_at(
                        &strays,
                        0,
                        u64::MAX,
                    )?))
                })
                .await
            }
            AdminRequest::SpaceState => {
                need(&[Role::Admin, Role::Brick])?;
                Ok(Reply::SpaceState {
                    full: self.local_space_refusal(0).err().map(|e| e.to_string()),
                })
            }
            AdminRequest::ReleaseVolume { name } => {
                need(&[Role::Admin])?;
                let v = self.volume()?;
                if v.name != name {
                    return Err(FsError::Invalid(format!(
                        "this brick is in volume {}, not {name}",
                        v.name
                    )));
                }
                if !v.stopped {
                    return Err(FsError::Busy(format!(
                        "{name} is started: stop it first (mortar volume stop {name})"
                    )));
                }
                crate::release::mark(&self.data_dir, &name)?;
                tracing::warn!(volume = %name, "released from the deleted volume: stopping; the data directory is erased at the next start");
                Ok(Reply::Done)
            }
            AdminRequest::ReclaimSpace => {
                need(&[Role::Admin])?;
                self.scan(|s| {
                    let before = s.disk_bytes();
                    let compacted = s.reclaim_space()?;
                    let after = if compacted { s.disk_bytes() } else { before };
                    if compacted {
                        tracing::info!(before, after, "compacted the chunks to reclaim space");
                    }
                    Ok(Reply::Reclaimed { before, after })
                })
                .await
            }
            AdminRequest::CollectGarbage {
                ids,
                grace_secs,
                now,
            } => {
                need(&[Role::Admin])?;
                self.scan(move |s| {
                    Ok(Reply::Collected(
                        s.collect_garbage_at(&ids, grace_secs, now)?,
                    ))
                })
                .await
            }
        }
    }

    /// This brick is the metadata leader and a quorum just confirmed it, so its applied
    /// namespace holds every committed change.
    pub(crate) async fn confirm_leading(&self) -> Result<(), FsError> {
        let not = || FsError::Unavailable("not the metadata leader".into());
        if self.raft.metrics().borrow().current_leader != Some(self.id) {
            return Err(not());
        }
        match tokio::time::timeout(META_TIMEOUT, self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(FsError::Unavailable(format!(
                "the metadata leader cannot confirm its leadership: {e}"
            ))),
            Err(_) => Err(FsError::Unavailable(
                "the metadata leader cannot reach a quorum to confirm its leadership".into(),
            )),
        }
    }

    /// Why this brick's disk takes no `incoming` bytes of new data, if it does not.
    fn local_space_refusal(&self, incoming: u64) -> Result<(), FsError> {
        self.space.admit_data(incoming)
    }

    /// Why the metadata group takes no `incoming` bytes of new data: this brick's disk, or a
    /// peer's that said lately it is down to its reserve (every replica stores what the log
    /// carries).
    fn space_refusal(&self, incoming: u64) -> Result<(), FsError> {
        self.local_space_refusal(incoming)?;
        let now = Instant::now();
        let full = self.peers_full.lock().expect("peer space lock");
        match full
            .values()
            .find(|(why, at)| why.is_some() && now.duration_since(*at) < PEER_SPACE_FRESH)
        {
            Some((Some(why), _)) => Err(FsError::NoSpace(why.clone())),
            _ => Ok(()),
        }
    }

    /// While this brick leads, ask every peer each second whether its disk is down to its
    /// reserve.
    pub async fn watch_peer_space(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PEER_SPACE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let leading = self.raft.metrics().borrow().current_leader == Some(self.id);
            let Ok(volume) = self.volume() else { continue };
            if !leading {
                self.peers_full.lock().expect("peer space lock").clear();
                continue;
            }
            for b in volume.bricks().filter(|b| b.id != self.id) {
                let req = Request::Admin(AdminRequest::SpaceState);
                if let Ok(Ok(Reply::SpaceState { full })) =
                    self.pool.call(&b.addr, &req, PEER_SPACE_EVERY).await
                {
                    self.peers_full
                        .lock()
                        .expect("peer space lock")
                        .insert(b.id, (full, Instant::now()));
                }
            }
        }
    }

    /// Storage work over this brick's store, on a blocking thread.
    async fn on_storage<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, FsError> + Send + 'static,
    ) -> Result<T, FsError> {
        let store = self.store.clone();
        crate::store::blocking(move || f(&store)).await
    }

    /// A scan over this brick's store, on a background thread (lower CPU priority).
    async fn scan<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, FsError> + Send + 'static,
    ) -> Result<T, FsError> {
        let store = self.store.clone();
        crate::background::run(move || f(&store)).await
    }

    pub async fn status(&self) -> Result<BrickStatus, FsError> {
        let m = self.raft.metrics().borrow().clone();
        let (chunk_count, chunk_bytes) = self.store.chunk_totals()?;
        let initialized = m
            .membership_config
            .membership()
            .voter_ids()
            .next()
            .is_some();
        let raft_role = match (initialized, m.state) {
            (false, _) => "none",
            (true, ServerState::Leader) => "leader",
            (true, ServerState::Follower) => "follower",
            (true, ServerState::Candidate) => "candidate",
            (true, ServerState::Learner) => "learner",
            (true, ServerState::Shutdown) => "shutdown",
        };
        Ok(BrickStatus {
            id: self.id,
            volume: self.volume().ok().map(|v| v.name),
            raft_role: raft_role.to_string(),
            leader: m.current_leader,
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            chunk_count,
            chunk_bytes,
            heal_backlog: self.on_storage(|s| Ok(s.count(CF_HEAL_INDEX)?)).await?,
            peers: self.peer_health().await,
            term: m.current_term,
            replicas: {
                crate::lag::sample(&self.raft, &self.lag);
                self.lag.report()
            },
            log_bytes: self.log_bound.total(),
            disk_bytes: self.on_storage(|s| Ok(s.disk_bytes())).await?,
            layout_epoch: self.volume().map(|v| v.epoch).unwrap_or(0),
            longest_leader_gap_ms: self.campaign.longest_gap().as_millis() as u64,
        })
    }

    /// Whether this brick can reach each other brick now: a live connection, or a fresh connect
    /// (bounded by the connect timeout; a brick already marked down answers at once).
    async fn peer_health(&self) -> Vec<PeerHealth> {
        let Ok(volume) = self.volume() else {
            return Vec::new();
        };
        let checks = volume
            .bricks()
            .filter(|b| b.id != self.id)
            .map(|b| async move {
                let health = match self.pool.connection(&b.addr).await {
                    Ok(_) => self.pool.health(&b.addr),
                    Err(_) => Health::Down,
                };
                PeerHealth {
                    id: b.id,
                    addr: b.addr.clone(),
                    health,
                }
            });
        futures::future::join_all(checks).await
    }

    /// Start the metadata group over the volume's bricks and store the volume in it. Safe to
    /// repeat with the same configuration; refused if this brick already serves another group.
    async fn init_volume(&self, config: VolumeConfig) -> Response {
        let replication = Replication::REPLICA_3;
        let whole = config
            .replica_sets
            .iter()
            .all(|s| s.bricks.len() == replication.copies());
        let set = config
            .replica_sets
            .first()
            .map(|s| &s.bricks)
            .filter(|_| whole)
            .ok_or_else(|| {
                FsError::Invalid(format!(
                    "a volume is replica sets of {} bricks",
                    replication.copies()
                ))
            })?;
        if !set.iter().any(|b| b.id == self.id) {
            return Err(FsError::Invalid(
                "this brick is not in the volume's first replica set".into(),
            ));
        }
        let members: BTreeMap<u64, BasicNode> = set
            .iter()
            .map(|b| (b.id, BasicNode::new(&b.addr)))
            .collect();
        let current = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        let voters: BTreeSet<u64> = current.voter_ids().collect();
        if voters.is_empty() {
            self.raft.initialize(members).await.map_err(unavailable)?;
        } else if voters != members.keys().copied().collect() {
            return Err(FsError::Exists);
        }
        self.create_volume_entry(&config).await?;
        // The other sets' bricks follow the log as learners: each holds the namespace and the
        // configuration as the voters do, and never votes. Only the leader adds them.
        let leader = self.await_leader(Instant::now() + INIT_TIMEOUT).await?;
        if leader.id != self.id {
            return Err(FsError::NotLeader(leader.addr));
        }
        let current = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .clone();
        for b in config.replica_sets.iter().skip(1).flat_map(|s| &s.bricks) {
            if current.get_node(&b.id).is_none() {
                self.raft
                    .add_learner(b.id, BasicNode::new(&b.addr), true)
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(Reply::Done)
    }

    /// Commit the volume's `CreateVolume` entry, or find the same one committed already.
    async fn create_volume_entry(&self, config: &VolumeConfig) -> Result<(), FsError> {
        match self
            .meta_write_within(MetaOp::CreateVolume(config.clone()), None, INIT_TIMEOUT)
            .await
        {
            Reply::Meta { result: Ok(_), .. } => Ok(()),
            Reply::Meta {
                result: Err(FsError::Exists),
                ..
            } => match self.volume() {
                Ok(v) if v.name == config.name && v.replica_sets == config.replica_sets => Ok(()),
                _ => Err(FsError::Exists),
            },
            Reply::Meta { result: Err(e), .. } => Err(e),
            other => Err(FsError::Io(format!("unexpected reply {other:?}"))),
        }
    }
}
