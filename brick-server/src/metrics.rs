//! What a brick shows Prometheus (`--metrics ADDR`): requests per operation (counted by
//! [`crate::server`]), its Raft state, followers' lag, chunks, heal backlog and disk (read from
//! [`BrickStatus`] at each scrape, so they are never stale), and bytes per peer.

use crate::server::Brick;
use mortar_proto::metrics::{render, Ops, Traffic};
use mortar_proto::transport::Health;
use mortar_proto::wire::BrickStatus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};

pub struct BrickMetrics {
    pub ops: Ops,
    registry: Registry,
    status: Arc<StatusGauges>,
}

/// The brick's status as of the scrape in progress (None: it could not be read).
#[derive(Debug, Default)]
struct StatusGauges(Mutex<Option<BrickStatus>>);

const ROLES: [&str; 6] = [
    "none",
    "leader",
    "follower",
    "candidate",
    "learner",
    "shutdown",
];

impl BrickMetrics {
    /// Metrics named `mortar_brick_…`, with `traffic` (the brick's pool, which also counts
    /// the connections it accepts) as its per-peer bytes.
    pub fn new(traffic: Arc<Traffic>) -> BrickMetrics {
        let mut registry = Registry::with_prefix("mortar_brick");
        let ops = Ops::default();
        ops.register(&mut registry, "Requests");
        let status = Arc::new(StatusGauges::default());
        registry.register_collector(Box::new(Arc::clone(&status)));
        registry.register_collector(Box::new(traffic));
        BrickMetrics {
            ops,
            registry,
            status,
        }
    }

    /// The text Prometheus scrapes: the status is read afresh for each scrape.
    pub async fn scrape(&self, brick: &Brick) -> String {
        let status = match brick.status().await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the brick's status");
                None
            }
        };
        *self.status.0.lock().expect("status lock") = status;
        render(&self.registry)
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn seconds(enc: &mut DescriptorEncoder, name: &str, help: &str, ms: u64) -> std::fmt::Result {
    ConstGauge::new(ms as f64 / 1000.0).encode(enc.encode_descriptor(
        name,
        help,
        None,
        MetricType::Gauge,
    )?)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for StatusGauges {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(s) = self.0.lock().expect("status lock").clone() else {
            return Ok(());
        };
        let e = &mut enc;
        {
            let mut role = e.encode_descriptor(
                "raft_role",
                "1 for the brick's role in the metadata group, 0 for the others",
                None,
                MetricType::Gauge,
            )?;
            for r in ROLES {
                let label = [("role", r)];
                ConstGauge::new(i64::from(s.raft_role == r)).encode(role.encode_family(&label)?)?;
            }
        }
        gauge(
            e,
            "raft_term",
            "The Raft term the brick is in",
            to_i64(s.term),
        )?;
        gauge(
            e,
            "raft_has_leader",
            "1 when the brick knows a leader of the metadata group",
            i64::from(s.leader.is_some()),
        )?;
        gauge(
            e,
            "raft_applied_index",
            "The last metadata log index applied",
            to_i64(s.applied_index),
        )?;
        gauge(
            e,
            "raft_last_log_index",
            "The last metadata log index stored",
            to_i64(s.last_log_index),
        )?;
        seconds(
            e,
            "raft_longest_leader_gap_seconds",
            "The longest the brick went without hearing its leader since it started",
            s.longest_leader_gap_ms,
        )?;
        ConstCounter::new(s.log_bytes).encode(e.encode_descriptor(
            "raft_log_written_bytes",
            "Bytes of metadata log entries stored since the brick started",
            None,
            MetricType::Counter,
        )?)?;
        // On the leader only: each follower's lag (a frozen or cut-off follower grows here).
        for (name, help, value) in [
            (
                "raft_follower_behind_entries",
                "On the leader: log entries each follower lacks",
                (|r: &mortar_proto::wire::ReplicaLag| r.behind_entries as f64)
                    as fn(&mortar_proto::wire::ReplicaLag) -> f64,
            ),
            (
                "raft_follower_behind_seconds",
                "On the leader: how long each follower has lacked its oldest missing entry",
                |r| r.behind_ms as f64 / 1000.0,
            ),
        ] {
            let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for r in &s.replicas {
                let label = [("follower", r.id.to_string())];
                ConstGauge::new(value(r)).encode(family.encode_family(&label)?)?;
            }
        }
        gauge(e, "chunks", "Chunks stored", to_i64(s.chunk_count))?;
        gauge(
            e,
            "chunk_bytes",
            "Bytes of the chunks stored",
            to_i64(s.chunk_bytes),
        )?;
        gauge(
            e,
            "disk_bytes",
            "Bytes the data directory takes on disk",
            to_i64(s.disk_bytes),
        )?;
        gauge(
            e,
            "heal_backlog",
            "Chunks this brick knows to be missing a copy (heal's index)",
            to_i64(s.heal_backlog),
        )?;
        gauge(
            e,
            "layout_epoch",
            "The layout epoch of the volume configuration applied",
            to_i64(s.layout_epoch),
        )?;
        let mut peers = e.encode_descriptor(
            "peer_state",
            "1 for how the brick sees each other brick of its volume (up, suspect, down)",
            None,
            MetricType::Gauge,
        )?;
        for p in &s.peers {
            for (state, h) in [
                ("up", Health::Up),
                ("suspect", Health::Suspect),
                ("down", Health::Down),
            ] {
                let label = [("peer", p.addr.clone()), ("state", state.to_string())];
                ConstGauge::new(i64::from(p.health == h)).encode(peers.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}
