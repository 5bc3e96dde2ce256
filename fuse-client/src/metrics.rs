//! What a mount shows Prometheus (`-o metrics=ADDR`): kernel requests per operation and
//! errors by errno (counted by [`crate::fs`]), cache hits and misses, namespace requests sent
//! to bricks, and bytes per brick.

use mortar_client::mortar_proto::metrics::{render, Ops};
use mortar_client::Volume;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::{Arc, LazyLock};

/// The mount's kernel requests. One mount per process, so one set, reachable from every
/// request's task without threading it through them.
pub static FUSE_OPS: LazyLock<Ops> = LazyLock::new(Ops::default);

/// Metrics named `mortar_mount_…` for the mount of `vol`.
pub fn registry(vol: Arc<Volume>) -> Registry {
    let mut registry = Registry::with_prefix("mortar_mount");
    FUSE_OPS.register(&mut registry, "Kernel requests");
    registry.register_collector(Box::new(vol.traffic()));
    registry.register_collector(Box::new(VolumeCounters(vol)));
    registry
}

/// Serve `registry` at `listener` (on the current runtime).
pub fn serve(listener: tokio::net::TcpListener, registry: Registry) {
    let registry = Arc::new(registry);
    tokio::spawn(mortar_client::mortar_proto::metrics::serve(
        listener,
        move || {
            let registry = Arc::clone(&registry);
            async move { render(&registry) }
        },
    ));
}

struct VolumeCounters(Arc<Volume>);

impl std::fmt::Debug for VolumeCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VolumeCounters")
    }
}

impl Collector for VolumeCounters {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let tallies = self.0.cache_tallies();
        for (name, help, pick) in [
            (
                "cache_hits",
                "Lookups answered from the mount's caches (chunk: file data; meta: attributes and names)",
                (|t: (u64, u64)| t.0) as fn((u64, u64)) -> u64,
            ),
            (
                "cache_misses",
                "Lookups the mount's caches could not answer, which went to a brick",
                |t| t.1,
            ),
        ] {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (cache, t) in tallies {
                let label = [("cache", cache)];
                ConstCounter::new(pick(t)).encode(family.encode_family(&label)?)?;
            }
        }
        ConstCounter::new(self.0.meta_requests()).encode(enc.encode_descriptor(
            "namespace_requests",
            "Namespace reads and changes sent to bricks",
            None,
            MetricType::Counter,
        )?)?;
        let (files, dirs) = self.0.read_ahead_counts();
        ConstCounter::new(files).encode(enc.encode_descriptor(
            "files_read_ahead",
            "Files whose first chunks were fetched ahead of a reader going through their directory",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(dirs).encode(enc.encode_descriptor(
            "dirs_listed_ahead",
            "Directories listed ahead of a reader going through a tree",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(self.0.delegated_changes()).encode(enc.encode_descriptor(
            "delegated_changes",
            "Namespace changes made from memory under directory delegations, committed in batches",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}
