//! QUIC endpoints and a connection pool that sends one request per stream.

use crate::error::FsError;
use crate::tls::{Identity, TlsError, BRICK_SERVER_NAME};
use crate::wire::{read_frame, send_frame, Frame, FrameError, Request, Response};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::timing::{
    CONNECT_TIMEOUT, IDLE_TIMEOUT, KEEP_ALIVE, MAX_PROBE_BACKOFF, PROBE_BACKOFF, SUSPECT_FOR,
};

pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT.try_into().expect("idle timeout fits a VarInt"),
    ));
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Room for several 1 MiB chunks in flight on one connection.
    t.stream_receive_window((16u32 * 1024 * 1024).into());
    t.receive_window((64u32 * 1024 * 1024).into());
    t.send_window(64 * 1024 * 1024);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_DATAGRAM);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// The largest UDP payload path-MTU discovery may grow to. quinn's default stops at 1,452
/// (Ethernet); loopback and jumbo-frame links carry more, and every datagram saved is per-packet
/// work saved at both ends (`bench-bricks 200`: 8.6-9.4 CPU-s against 12.1-12.6 at 1,452).
/// quinn hands the kernel up to [`GSO_BATCH`] datagrams in one send, and a send larger than a
/// UDP datagram can be (65,507 bytes over IPv4) fails with EMSGSIZE, which quinn drops
/// silently as a lost probe: so the batch, not the link, sets the ceiling. At 8,952 every full
/// batch was lost, and chunk writes fell from about 800/s to 150/s (session 10).
pub const MAX_DATAGRAM: u16 = 6_500;
/// quinn's `MAX_TRANSMIT_SEGMENTS` (quinn 0.11): datagrams per segmentation-offload send.
const GSO_BATCH: usize = 10;
/// The largest UDP payload over IPv4 (65,535 less the IP and UDP headers).
const MAX_UDP_PAYLOAD_V4: usize = 65_507;
const _: () = assert!(MAX_DATAGRAM as usize * GSO_BATCH <= MAX_UDP_PAYLOAD_V4);

/// An endpoint on `bind` with room to take in bursts.
fn endpoint(
    bind: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, TransportError> {
    let socket = std::net::UdpSocket::bind(bind).map_err(TransportError::Socket)?;
    enlarge_receive_buffer(&socket);
    // Peers may send us datagrams up to the size discovery grows ours to.
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_DATAGRAM)
        .expect("datagram size within QUIC's bounds");
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
        .map_err(TransportError::Socket)
}

/// Room for bursts of datagrams between two polls of the endpoint. With the kernel's default
/// (about 200 KiB) the bricks dropped one datagram in sixteen while a client copied a web tree
/// in (`RcvbufErrors` in /proc/net/snmp), and every drop costs a retransmission and a smaller
/// congestion window.
const RECEIVE_BUFFER: libc::c_int = 8 * 1024 * 1024;

/// Ask for [`RECEIVE_BUFFER`]: past `net.core.rmem_max` when privileged (SO_RCVBUFFORCE), else
/// as much as that limit allows. Failing to is not an error, only slower.
fn enlarge_receive_buffer(socket: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let set = |option| {
        // SAFETY: a valid socket, and a pointer to an int that outlives the call.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&RECEIVE_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    if !set(libc::SO_RCVBUFFORCE) && !set(libc::SO_RCVBUF) {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not enlarge the UDP receive buffer"
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot resolve '{0}'")]
    Resolve(String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The TLS handshake failed: the brick refused our certificate, or we refused its.
    #[error("TLS with {addr} failed: {reason}")]
    Refused { addr: String, reason: String },
    #[error("connection to {addr} lost: {reason}")]
    Lost { addr: String, reason: String },
    #[error("request to {addr} timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("bad frame from {addr}: {err}")]
    Frame { addr: String, err: FrameError },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot open UDP socket: {0}")]
    Socket(std::io::Error),
}

impl From<TransportError> for FsError {
    fn from(e: TransportError) -> FsError {
        FsError::Unavailable(e.to_string())
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Up => "up",
            Health::Suspect => "suspect",
            Health::Down => "down",
        })
    }
}

impl TransportError {
    /// Our certificate was refused: retrying elsewhere will not help.
    pub fn is_refused(&self) -> bool {
        matches!(self, TransportError::Refused { .. })
    }
}

/// A brick's endpoint: accepts peers and also dials other bricks with the same certificate.
pub fn server_endpoint(
    listen: SocketAddr,
    id: &Identity,
) -> Result<quinn::Endpoint, TransportError> {
    let mut ep = endpoint(listen, Some(id.server_config()?))?;
    ep.set_default_client_config(id.client_config()?);
    Ok(ep)
}

pub fn client_endpoint(id: &Identity) -> Result<quinn::Endpoint, TransportError> {
    client_endpoint_at(id, "0.0.0.0:0".parse().expect("valid literal"))
}

/// A client endpoint on a chosen local address (a multi-homed host, or a test that needs to
/// know where a client's packets come from).
pub fn client_endpoint_at(
    id: &Identity,
    bind: SocketAddr,
) -> Result<quinn::Endpoint, TransportError> {
    let mut ep = endpoint(bind, None)?;
    ep.set_default_client_config(id.client_config()?);
    Ok(ep)
}

/// TLS alerts arrive as CONNECTION_CLOSE with a crypto error code (0x100 + alert).
fn is_tls_refusal(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::TransportError(t) => u64::from(t.code) & !0xff == 0x100,
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code) & !0xff == 0x100,
        _ => false,
    }
}

/// The application close code of a brick that refuses a certificate it verified: revoked, or a
/// client not on the volume's allow list. The close's reason says which.
pub const ACCESS_REFUSED: u32 = 0x4d41;

fn conn_error(addr: &str, e: quinn::ConnectionError) -> TransportError {
    if let quinn::ConnectionError::ApplicationClosed(c) = &e {
        if c.error_code == quinn::VarInt::from_u32(ACCESS_REFUSED) {
            return TransportError::Refused {
                addr: addr.to_string(),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            };
        }
    }
    if is_tls_refusal(&e) {
        // A local transport error means our side aborted the handshake; a close from the peer
        // means the brick refused us (under TLS 1.3 that arrives after connect, on first use).
        let side = match e {
            quinn::ConnectionError::TransportError(_) => {
                "the brick's certificate is not trusted (is it from this volume's CA?)"
            }
            _ => "the brick refused our certificate (wrong CA, expired, or not a mortar role)",
        };
        TransportError::Refused {
            addr: addr.to_string(),
            reason: format!("{side}: {e}"),
        }
    } else {
        TransportError::Lost {
            addr: addr.to_string(),
            reason: e.to_string(),
        }
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr, TransportError> {
    if let Ok(sa) = addr.parse() {
        return Ok(sa);
    }
    tokio::net::lookup_host(addr)
        .await
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| TransportError::Resolve(addr.to_string()))
}

/// What the pool believes about a brick, best first.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Health {
    Up,
    /// Its last request timed out and nothing has succeeded since (frozen, overloaded, cut).
    Suspect,
    /// Its last connect failed; requests fail at once while a probe reconnects.
    Down,
}

#[derive(Default)]
struct PoolState {
    /// Each with the guard that counts its bytes for metrics.
    conns: HashMap<String, (quinn::Connection, crate::metrics::Tracked)>,
    /// Bricks whose last request timed out (or lagged enough to be hedged), and since when.
    suspect: HashMap<String, std::time::Instant>,
    /// Bricks whose last connect failed, with how many times in a row; each has a probe running.
    down: HashMap<String, Down>,
}

struct Down {
    failures: u32,
    since: std::time::Instant,
}

/// Connections to bricks by address, opened on first use and replaced when they die. A brick
/// that cannot be reached is marked down: requests to it fail at once instead of each waiting
/// for a connect timeout, and a background probe reconnects when it returns.
#[derive(Clone)]
pub struct Pool {
    endpoint: quinn::Endpoint,
    state: Arc<Mutex<PoolState>>,
    traffic: Arc<crate::metrics::Traffic>,
}

impl Pool {
    pub fn new(endpoint: quinn::Endpoint) -> Pool {
        Pool {
            endpoint,
            state: Arc::default(),
            traffic: Arc::default(),
        }
    }

    /// Bytes carried per peer by this pool's connections (and any others counted with it).
    pub fn traffic(&self) -> &Arc<crate::metrics::Traffic> {
        &self.traffic
    }

    /// True while `addr` is marked down.
    pub fn is_down(&self, addr: &str) -> bool {
        self.state
            .lock()
            .expect("pool lock")
            .down
            .contains_key(addr)
    }

    pub fn health(&self, addr: &str) -> Health {
        let st = self.state.lock().expect("pool lock");
        if st.down.contains_key(addr) {
            Health::Down
        } else if st
            .suspect
            .get(addr)
            .is_some_and(|since| since.elapsed() < SUSPECT_FOR)
        {
            Health::Suspect
        } else {
            Health::Up
        }
    }

    /// Note that `addr` did not answer in time: it is tried after healthy bricks for a while.
    pub fn mark_suspect(&self, addr: &str) {
        self.state
            .lock()
            .expect("pool lock")
            .suspect
            .insert(addr.to_string(), std::time::Instant::now());
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    pub async fn connection(&self, addr: &str) -> Result<quinn::Connection, TransportError> {
        {
            let st = self.state.lock().expect("pool lock");
            if let Some((c, _)) = st.conns.get(addr) {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
            }
            if let Some(d) = st.down.get(addr) {
                return Err(TransportError::Connect {
                    addr: addr.to_string(),
                    reason: format!(
                        "down for {:?}; reconnecting in the background",
                        d.since.elapsed()
                    ),
                });
            }
        }
        // The connect runs as its own task: a caller that gives up early (a short request
        // timeout) must not cancel it, or a brick that never answers would never be marked down.
        let pool = self.clone();
        let addr = addr.to_string();
        let task = tokio::spawn(async move {
            let result = pool.connect(&addr).await;
            if let Err(e) = &result {
                if !e.is_refused() {
                    pool.mark_down(&addr);
                }
            }
            result
        });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(TransportError::Connect {
                addr: String::new(),
                reason: format!("connect task failed: {e}"),
            }),
        }
    }

    /// Mark `addr` down and start the probe that reconnects it. The probe starts now, not on
    /// the next request: a brick nobody asks (a follower's view of its peers) must not stay
    /// down in `status` after it has returned.
    fn mark_down(&self, addr: &str) {
        let mut st = self.state.lock().expect("pool lock");
        if st.down.contains_key(addr) {
            return;
        }
        st.down.insert(
            addr.to_string(),
            Down {
                failures: 1,
                since: std::time::Instant::now(),
            },
        );
        let pool = self.clone();
        let addr = addr.to_string();
        tokio::spawn(async move { pool.probe(addr).await });
    }

    async fn probe(&self, addr: String) {
        // Logged when it changes, so a brick that stays unreachable says why without flooding.
        let mut last_error = String::new();
        loop {
            let failures = match self.state.lock().expect("pool lock").down.get(&addr) {
                Some(d) => d.failures,
                None => return,
            };
            let backoff =
                (PROBE_BACKOFF * 2u32.saturating_pow(failures.min(8))).min(MAX_PROBE_BACKOFF);
            tokio::time::sleep(backoff).await;
            match self.connect(&addr).await {
                Ok(_) => {
                    tracing::info!(%addr, failures, "reconnected");
                    return;
                }
                Err(e) => {
                    let error = e.to_string();
                    if error != last_error {
                        tracing::warn!(%addr, %error, failures, "brick still unreachable");
                        last_error = error;
                    }
                    let mut st = self.state.lock().expect("pool lock");
                    match st.down.get_mut(&addr) {
                        Some(d) => d.failures += 1,
                        None => return,
                    }
                }
            }
        }
    }

    /// Open a new connection and make it the pooled one.
    async fn connect(&self, addr: &str) -> Result<quinn::Connection, TransportError> {
        let sa = resolve(addr).await?;
        let connecting =
            self.endpoint
                .connect(sa, BRICK_SERVER_NAME)
                .map_err(|e| TransportError::Connect {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(TransportError::Connect {
                    addr: addr.to_string(),
                    reason: format!("no answer within {CONNECT_TIMEOUT:?}"),
                })
            }
            Ok(Err(e)) if is_tls_refusal(&e) => return Err(conn_error(addr, e)),
            Ok(Err(e)) => {
                return Err(TransportError::Connect {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })
            }
            Ok(Ok(c)) => c,
        };
        let peer = match crate::tls::peer_identity(&conn) {
            Ok((_, name)) => name,
            Err(_) => addr.to_string(),
        };
        let tracked = self.traffic.track(&peer, &conn);
        let mut st = self.state.lock().expect("pool lock");
        st.down.remove(addr);
        st.conns.insert(addr.to_string(), (conn.clone(), tracked));
        Ok(conn)
    }

    fn forget(&self, addr: &str) {
        self.state.lock().expect("pool lock").conns.remove(addr);
    }

    /// Send one request and wait up to `timeout` for its answer.
    pub async fn call(
        &self,
        addr: &str,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, TransportError> {
        let frame = Frame::of(req).map_err(|err| TransportError::Frame {
            addr: addr.to_string(),
            err,
        })?;
        self.call_frame(addr, &frame, timeout).await
    }

    /// [`Pool::call`] with a request encoded beforehand, so one encoding can go to several bricks.
    pub async fn call_frame(
        &self,
        addr: &str,
        req: &Frame,
        timeout: Duration,
    ) -> Result<Response, TransportError> {
        let result = tokio::time::timeout(timeout, self.call_inner(addr, req)).await;
        match result {
            Err(_) => {
                self.mark_suspect(addr);
                Err(TransportError::Timeout {
                    addr: addr.to_string(),
                    after: timeout,
                })
            }
            Ok(Err(e)) => {
                if matches!(
                    e,
                    TransportError::Lost { .. } | TransportError::Refused { .. }
                ) {
                    self.forget(addr);
                }
                Err(e)
            }
            Ok(Ok(r)) => {
                let mut st = self.state.lock().expect("pool lock");
                if !st.suspect.is_empty() {
                    st.suspect.remove(addr);
                }
                Ok(r)
            }
        }
    }

    async fn call_inner(&self, addr: &str, req: &Frame) -> Result<Response, TransportError> {
        let conn = self.connection(addr).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| conn_error(addr, e))?;
        let lost = |conn: &quinn::Connection, err: FrameError| match conn.close_reason() {
            Some(reason) => conn_error(addr, reason),
            None => TransportError::Frame {
                addr: addr.to_string(),
                err,
            },
        };
        send_frame(&mut send, req)
            .await
            .map_err(|e| lost(&conn, e))?;
        let _ = send.finish();
        read_frame::<Response>(&mut recv)
            .await
            .map_err(|e| lost(&conn, e))
    }
}
