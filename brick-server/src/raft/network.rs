//! Raft RPCs on the brick's QUIC connection pool.

#![allow(clippy::result_large_err)]

use super::*;
use openraft::network::Backoff;

/// Raft RPCs ride the brick's own connection pool, one request per QUIC stream.
#[derive(Clone)]
pub struct Network {
    pub pool: Pool,
}

pub struct Peer {
    pool: Pool,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;
    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            pool: self.pool.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

/// An AppendEntries RPC carries at most this many bytes unless its one entry is larger:
/// openraft gives each one a heartbeat interval to complete, and it must fit one frame.
pub const APPEND_BYTES: usize = 4 << 20;
/// A proposed change larger than this is refused, so an RPC of one entry always fits a frame.
pub const MAX_ENTRY: usize = wire::MAX_FRAME / 2;
const _: () = assert!(APPEND_BYTES < MAX_ENTRY && MAX_ENTRY + (1 << 20) <= wire::MAX_FRAME);

/// How many entries to ask openraft for after `entries` encoded to `bytes` (over
/// [`APPEND_BYTES`]): as many as fit at their average size, at least one.
pub fn entries_hint(entries: usize, bytes: usize) -> u64 {
    ((entries as u128 * APPEND_BYTES as u128 / bytes.max(1) as u128) as u64).max(1)
}

/// How a transport failure reaches openraft. After `Unreachable` openraft sends nothing to
/// the peer for [`Peer::backoff`], heartbeats included, so only a peer we cannot reach at all
/// is that. A late answer or a lost connection is `Network`, and the next heartbeat goes out on
/// its tick: a heartbeat late by a few ms on a busy host followed by half a second of silence
/// let both followers stand for election while the leader was healthy.
fn rpc_error<E: std::error::Error>(e: TransportError) -> RPCError<NodeId, BasicNode, E> {
    match e {
        TransportError::Timeout { .. }
        | TransportError::Lost { .. }
        | TransportError::Frame { .. } => RPCError::Network(NetworkError::new(&e)),
        TransportError::Resolve(_)
        | TransportError::Connect { .. }
        | TransportError::Refused { .. }
        | TransportError::Tls(_)
        | TransportError::Socket(_) => RPCError::Unreachable(Unreachable::new(&e)),
    }
}

fn unreachable_backoff() -> Backoff {
    Backoff::new(std::iter::repeat(timing::UNREACHABLE_RETRY))
}

impl Peer {
    async fn send<Resp: serde::de::DeserializeOwned, E>(
        &self,
        kind: RaftKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let request = Request::Raft(RaftRpc {
            target: self.target,
            kind,
            payload,
        });
        let reply = self
            .pool
            .call(&self.addr, &request, timeout)
            .await
            .map_err(rpc_error)?;
        match reply {
            Ok(Reply::Raft(bytes)) => {
                let r: Result<Resp, RaftError<NodeId, E>> =
                    wire::decode(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                r.map_err(|e| {
                    RPCError::RemoteError(RemoteError::new_with_node(
                        self.target,
                        BasicNode::new(&self.addr),
                        e,
                    ))
                })
            }
            Ok(other) => Err(RPCError::Network(NetworkError::new(&FsError::Io(format!(
                "unexpected reply to raft rpc: {other:?}"
            ))))),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    /// A peer we cannot connect to is retried every [`timing::UNREACHABLE_RETRY`]; the pool
    /// fails such requests at once while its own probe reconnects, so this bounds only the
    /// log noise and how soon a returning follower is caught up.
    fn backoff(&self) -> Backoff {
        unreachable_backoff()
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // Sized before encoding: a lagging follower is offered up to `max_payload_entries`
        // entries of up to a few MB each, far past a frame.
        let bytes = wire::encoded_len(&rpc);
        if bytes > APPEND_BYTES && rpc.entries.len() > 1 {
            let hint = entries_hint(rpc.entries.len(), bytes);
            tracing::info!(
                target = self.target,
                entries = rpc.entries.len(),
                bytes,
                hint,
                "append-entries split: over the byte bound, asking for fewer entries"
            );
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(hint),
            ));
        }
        self.send(RaftKind::AppendEntries, enc(&rpc), option.hard_ttl())
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        if rpc.offset == 0 || rpc.done {
            tracing::info!(
                target = self.target,
                snapshot = %rpc.meta.snapshot_id,
                offset = rpc.offset,
                bytes = rpc.data.len(),
                done = rpc.done,
                "streaming a snapshot chunk"
            );
        }
        self.send(RaftKind::InstallSnapshot, enc(&rpc), option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.send(RaftKind::Vote, enc(&rpc), option.hard_ttl())
            .await
    }
}

/// Serve a Raft RPC that arrived from a peer brick. Refused when it is meant for another brick
/// (this one took over a retired brick's address) or comes from a retired brick: a replaced
/// brick that comes back with its old log must not vote, lead or be counted.
pub async fn serve_rpc(
    raft: &Raft,
    campaign: &Campaign,
    me: NodeId,
    retired: &[NodeId],
    rpc: RaftRpc,
) -> Result<Reply, FsError> {
    if rpc.target != me {
        return Err(FsError::NotPermitted(format!(
            "raft rpc for brick {}, but this is brick {me}",
            rpc.target
        )));
    }
    let from = |sender: Option<NodeId>| {
        match sender.filter(|s| retired.contains(s)) {
            Some(s) => {
                // A retired brick left running retries at its election rate: say it now and
                // then, not every time.
                static SAID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let now = Timestamp::now().secs.max(0) as u64;
                let said = SAID.load(std::sync::atomic::Ordering::Relaxed);
                if now >= said + 10 {
                    SAID.store(now, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(brick = s, "refused raft rpcs from a retired brick; stop it");
                }
                Err(FsError::NotPermitted(format!(
                    "brick {s} was retired from the volume"
                )))
            }
            None => Ok(()),
        }
    };
    let bad = |e: wire::FrameError| FsError::Invalid(format!("raft rpc: {e}"));
    let payload = match rpc.kind {
        RaftKind::AppendEntries => {
            let req: AppendEntriesRequest<TypeConfig> = wire::decode(&rpc.payload).map_err(bad)?;
            from(req.vote.leader_id().voted_for())?;
            let resp = raft.append_entries(req).await;
            // Anything but "your term is behind mine" means this brick follows the sender.
            if matches!(&resp, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
                campaign.leader_heard();
            }
            enc(&resp)
        }
        RaftKind::Vote => {
            let req: VoteRequest<NodeId> = wire::decode(&rpc.payload).map_err(bad)?;
            from(req.vote.leader_id().voted_for())?;
            let resp = raft.vote(req).await;
            // A vote granted restarts the wait, as in Raft: the candidate gets its chance.
            if matches!(&resp, Ok(r) if r.vote_granted) {
                campaign.leader_heard();
            }
            enc(&resp)
        }
        RaftKind::InstallSnapshot => {
            let req: InstallSnapshotRequest<TypeConfig> =
                wire::decode(&rpc.payload).map_err(bad)?;
            from(req.vote.leader_id().voted_for())?;
            let vote = req.vote;
            let resp = raft.install_snapshot(req).await;
            if matches!(&resp, Ok(r) if r.vote == vote) {
                campaign.leader_heard();
            }
            enc(&resp)
        }
        RaftKind::PreVote => {
            let req: PreVote = wire::decode(&rpc.payload).map_err(bad)?;
            from(Some(req.candidate))?;
            enc(&campaign.answer(raft, &req).await?)
        }
    };
    Ok(Reply::Raft(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(e: TransportError) -> &'static str {
        match rpc_error::<RaftError<NodeId>>(e) {
            RPCError::Unreachable(_) => "unreachable",
            RPCError::Network(_) => "network",
            _ => "other",
        }
    }

    #[test]
    fn only_a_peer_out_of_reach_backs_off() {
        let addr = || "127.0.0.1:7001".to_string();
        let late = TransportError::Timeout {
            addr: addr(),
            after: timing::HEARTBEAT,
        };
        assert_eq!(
            kind(late),
            "network",
            "a late answer is retried on the next tick"
        );
        let lost = TransportError::Lost {
            addr: addr(),
            reason: "reset".into(),
        };
        assert_eq!(kind(lost), "network");
        let down = TransportError::Connect {
            addr: addr(),
            reason: "refused".into(),
        };
        assert_eq!(kind(down), "unreachable");
        let refused = TransportError::Refused {
            addr: addr(),
            reason: "bad certificate".into(),
        };
        assert_eq!(kind(refused), "unreachable");
        let backoff: Vec<Duration> = unreachable_backoff().take(3).collect();
        assert_eq!(backoff, vec![timing::UNREACHABLE_RETRY; 3]);
    }
}
