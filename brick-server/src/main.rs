use anyhow::{Context, Result};
use clap::Parser;
use mortar_brick::config::{Keys, Settings};
use mortar_brick::lag;
use mortar_brick::log_bound::{self, LogBound};
use mortar_brick::metrics::BrickMetrics;
use mortar_brick::raft::{self, LogStore, Network, StateMachine};
use mortar_brick::server::Brick;
use mortar_brick::space::Space;
use mortar_brick::store::Store;
use mortar_brick::watch::{Hub, Watchers};
use mortar_proto::logfile::{self, LogFile};
use mortar_proto::tls::Identity;
use mortar_proto::transport::{server_endpoint, Pool};
use std::path::PathBuf;
use std::sync::Arc;

/// mortar brick server: stores a volume's chunks and metadata and replicates them.
#[derive(Parser, Debug)]
#[command(name = "mortar-brick", version)]
struct Args {
    /// A TOML file of these settings, keys named as the flags (data, listen, cert, key, ca,
    /// snapshot-every, snapshot-bytes, reserve, log, log-file, metrics), e.g.
    /// /etc/mortar/brick-NAME.toml; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    keys: Keys,
}

fn main() -> Result<()> {
    // Two malloc arenas, not eight per core: freed memory of the many runtime and storage
    // threads is reused instead of kept per thread, so the brick's resident size follows its
    // configured caches rather than its history of bursts.
    // SAFETY: mallopt before any thread starts, with a documented parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    let args = Args::parse();
    let keys = match &args.config {
        Some(path) => args.keys.over(Keys::from_file(path)?),
        None => args.keys,
    };
    let watched = std::env::var_os("JOURNAL_STREAM").is_some()
        || std::io::IsTerminal::is_terminal(&std::io::stderr());
    let args = keys.settle(watched)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    let log_file = match &args.log_file {
        Some(p) => {
            let f = LogFile::open(p)
                .with_context(|| format!("cannot open the log file {}", p.display()))?;
            eprintln!("mortar-brick: logging to {}", p.display());
            let writer = Arc::clone(&f);
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(move || writer.writer())
                .init();
            Some(f)
        }
        None => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                // Colour codes only for a terminal: journald gets plain text to grep.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .init();
            None
        }
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(async move {
            logfile::reopen_on_hangup(log_file).context("cannot handle SIGHUP")?;
            run(args).await
        })
}

async fn run(args: Settings) -> Result<()> {
    let identity = Identity::load(&args.cert, &args.key, &args.ca)
        .context("cannot load the brick's TLS identity")?;
    let (role, name) = mortar_proto::tls::role_of(&identity.chain[0]).context("reading --cert")?;
    anyhow::ensure!(
        role == mortar_proto::tls::Role::Brick,
        "--cert is a {role} certificate ('{name}'); a brick needs one issued with --role brick"
    );
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("cannot create data directory {}", args.data.display()))?;
    if let Some(volume) = mortar_brick::release::erase_if_released(&args.data)
        .with_context(|| format!("cannot erase the released brick's {}", args.data.display()))?
    {
        tracing::warn!(%volume, data = %args.data.display(), "erased the data of deleted volume; this brick is free for a new one");
    }
    let store = Arc::new(Store::open(&args.data).context("cannot open the brick store")?);
    let id = store.brick_id().context("cannot read the brick id")?;

    let endpoint = server_endpoint(args.listen, &identity)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let pool = Pool::new(endpoint.clone());
    // Bound before anything starts: a taken address is an error now, not a brick without metrics.
    let metrics_listener = match args.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?,
        ),
        None => None,
    };
    let volume = Arc::default();
    let hub = Arc::new(Hub::default());
    let sm = StateMachine::new(
        store.clone(),
        Arc::clone(&volume),
        hub.clone(),
        args.data.join("snapshots"),
    )
    .context("cannot read the namespace")?;
    let bound = Arc::new(LogBound::new(args.snapshot_bytes));
    let config = Arc::new(
        raft::config(args.snapshot_every)
            .validate()
            .context("raft configuration")?,
    );
    let log = LogStore::new(store.clone(), bound.clone());
    let campaign = Arc::new(raft::Campaign::new(raft::ELECTION, log.clone()));
    let raft = raft::Raft::new(id, config, Network { pool: pool.clone() }, log, sm)
        .await
        // openraft's Fatal prints nothing useful with Display; the Debug form names the cause.
        .map_err(|e| anyhow::anyhow!("cannot start the metadata group: {e:?}"))?;

    let watchers = Arc::new(Watchers::new(id, raft.clone(), hub, store.clone()));
    let brick = Arc::new(Brick {
        id,
        store,
        raft: raft.clone(),
        pool: pool.clone(),
        volume,
        data_dir: args.data.clone(),
        watchers,
        lag: Arc::default(),
        campaign: campaign.clone(),
        log_bound: bound.clone(),
        space: Arc::new(Space::new(args.data.clone(), args.reserve)),
        peers_full: Default::default(),
        proposals: Default::default(),
        metrics: BrickMetrics::new(pool.traffic().clone()),
        live: Arc::default(),
        released: Default::default(),
    });
    tracing::info!(brick = id, listen = %args.listen, data = %args.data.display(), "brick serving");
    let server = tokio::spawn(brick.clone().serve(endpoint.clone()));
    // systemd's Type=notify: the unit is started once the brick answers.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell systemd the brick is ready");
    }
    tokio::spawn(log_bound::run(raft.clone(), bound));
    tokio::spawn(lag::run(raft.clone(), brick.lag.clone()));
    tokio::spawn(raft::log_changes(raft.clone()));
    tokio::spawn(raft::run_elections(
        raft.clone(),
        brick.pool.clone(),
        id,
        campaign,
    ));
    tokio::spawn(brick.clone().watch_peer_space());
    tokio::spawn(mortar_brick::access::run(
        brick.live.clone(),
        brick.volume.clone(),
        brick.watchers.config_applied(),
    ));
    if let Some(listener) = metrics_listener {
        tracing::info!(addr = %listener.local_addr()?, "serving metrics at /metrics");
        let brick = brick.clone();
        tokio::spawn(mortar_proto::metrics::serve(listener, move || {
            let brick = brick.clone();
            async move { brick.metrics.scrape(&brick).await }
        }));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = brick.released.notified() => tracing::info!("released from the deleted volume: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    endpoint.close(0u32.into(), b"brick shutting down");
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "metadata group did not stop cleanly");
    }
    server.abort();
    brick
        .store
        .db
        .flush_wal(true)
        .context("cannot sync the write-ahead log")?;
    tracing::info!("brick stopped");
    Ok(())
}
