//! Prometheus metrics kept the same way by bricks and mounts: requests and their latency per
//! operation, errors by errno, bytes on the wire per peer, and the HTTP endpoint that serves a
//! registry in the Prometheus text format (`--metrics ADDR`, path `/metrics`).

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use prometheus_client;

/// The `Content-Type` of what [`serve`] answers.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrnoLabel {
    errno: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

type Latencies = Family<OpLabel, Histogram, fn() -> Histogram>;

/// Latency buckets from 50 µs to about 6.5 s, doubling: a cached answer, a Raft commit and a
/// failover stall each land in their own buckets.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// Requests served per operation, how long each took, and the errors answered by errno.
#[derive(Clone, Debug)]
pub struct Ops {
    count: Family<OpLabel, Counter>,
    seconds: Latencies,
    errors: Family<ErrnoLabel, Counter>,
}

impl Default for Ops {
    fn default() -> Ops {
        Ops {
            count: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
            errors: Family::default(),
        }
    }
}

impl Ops {
    /// Register as `PREFIX_requests_total`, `PREFIX_request_duration_seconds` and
    /// `PREFIX_errors_total` (the registry's own prefix applies too).
    pub fn register(&self, registry: &mut Registry, what: &str) {
        registry.register(
            "requests",
            format!("{what} answered, by operation"),
            self.count.clone(),
        );
        registry.register(
            "request_duration_seconds",
            format!("How long {what} took to answer, by operation"),
            self.seconds.clone(),
        );
        registry.register(
            "errors",
            format!("{what} answered with an error, by errno"),
            self.errors.clone(),
        );
    }

    /// One request of `op` answered after `took`.
    pub fn observe(&self, op: &'static str, took: Duration) {
        let label = OpLabel { op };
        self.count.get_or_create(&label).inc();
        self.seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
    }

    /// One request answered with `errno`.
    pub fn failed(&self, errno: i32) {
        self.errors
            .get_or_create(&ErrnoLabel {
                errno: errno_name(errno),
            })
            .inc();
    }

    /// Requests of `op` counted so far (for tests).
    pub fn count(&self, op: &'static str) -> u64 {
        self.count.get_or_create(&OpLabel { op }).get()
    }
}

/// The symbolic name of the errnos mortar answers with; others are "other".
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENOTSUP => "ENOTSUP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ESTALE => "ESTALE",
        libc::ENOTTY => "ENOTTY",
        libc::EINTR => "EINTR",
        _ => "other",
    }
}

/// Bytes on the wire (UDP payload, QUIC's framing included) to and from each peer, named by
/// its certificate: live connections are read at each scrape, ended ones are kept as totals,
/// so the counters only grow.
#[derive(Debug, Default)]
pub struct Traffic {
    state: Mutex<TrafficState>,
}

#[derive(Debug, Default)]
struct TrafficState {
    next: u64,
    live: HashMap<u64, (String, quinn::Connection)>,
    /// Peer → (sent, received) of its connections that ended.
    ended: BTreeMap<String, (u64, u64)>,
}

/// A connection being counted; dropping it adds what it carried to its peer's totals.
#[derive(Debug)]
pub struct Tracked {
    traffic: Arc<Traffic>,
    key: u64,
}

impl Traffic {
    /// Count `conn` under `peer` until the returned guard is dropped.
    pub fn track(self: &Arc<Self>, peer: &str, conn: &quinn::Connection) -> Tracked {
        let mut st = self.state.lock().expect("traffic lock");
        let key = st.next;
        st.next += 1;
        st.live.insert(key, (peer.to_string(), conn.clone()));
        Tracked {
            traffic: Arc::clone(self),
            key,
        }
    }

    /// Peer → (sent, received) bytes so far.
    pub fn totals(&self) -> BTreeMap<String, (u64, u64)> {
        let st = self.state.lock().expect("traffic lock");
        let mut totals = st.ended.clone();
        for (peer, conn) in st.live.values() {
            let s = conn.stats();
            let t = totals.entry(peer.clone()).or_default();
            t.0 += s.udp_tx.bytes;
            t.1 += s.udp_rx.bytes;
        }
        totals
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut st = self.traffic.state.lock().expect("traffic lock");
        if let Some((peer, conn)) = st.live.remove(&self.key) {
            let s = conn.stats();
            let t = st.ended.entry(peer).or_default();
            t.0 += s.udp_tx.bytes;
            t.1 += s.udp_rx.bytes;
        }
    }
}

impl Collector for Traffic {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.totals();
        for (name, help, pick) in [
            (
                "peer_sent_bytes",
                "Bytes sent to each peer (by its certificate name), QUIC framing included",
                (|t: &(u64, u64)| t.0) as fn(&(u64, u64)) -> u64,
            ),
            (
                "peer_received_bytes",
                "Bytes received from each peer (by its certificate name), QUIC framing included",
                |t: &(u64, u64)| t.1,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (peer, t) in &totals {
                let label = PeerLabel { peer: peer.clone() };
                ConstCounter::new(pick(t)).encode(family.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

/// Render `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}

/// Answer `GET /metrics` on `listener` with what `scrape` renders (it may refresh gauges
/// first), until the listener fails. Anything else gets 404 or 405.
pub async fn serve<F, Fut>(listener: tokio::net::TcpListener, scrape: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint cannot accept; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let scrape = scrape.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(req, scrape).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

async fn answer<F, Fut>(
    req: hyper::Request<hyper::body::Incoming>,
    scrape: F,
) -> hyper::Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, scrape().await),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "metrics are at /metrics\n".into(),
        ),
    };
    hyper::Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a response of static parts")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_render_as_counters_histograms_and_errnos() {
        let ops = Ops::default();
        let mut registry = Registry::with_prefix("mortar_test");
        ops.register(&mut registry, "requests");
        ops.observe("lookup", Duration::from_micros(70));
        ops.observe("lookup", Duration::from_millis(3));
        ops.failed(libc::ENOENT);
        ops.failed(12345);
        let text = render(&registry);
        assert!(
            text.contains("# TYPE mortar_test_requests_total counter"),
            "{text}"
        );
        assert!(
            text.contains("mortar_test_requests_total{op=\"lookup\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("mortar_test_request_duration_seconds_count{op=\"lookup\"} 2"),
            "{text}"
        );
        // 70 µs falls in the second bucket (100 µs), 3 ms in the seventh (3.2 ms).
        assert!(
            text.contains(
                "mortar_test_request_duration_seconds_bucket{op=\"lookup\",le=\"0.0001\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("mortar_test_errors_total{errno=\"ENOENT\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mortar_test_errors_total{errno=\"other\"} 1"),
            "{text}"
        );
        assert_eq!(ops.count("lookup"), 2);
    }
}
