//! `mortar`: the operator CLI — CA and certificates, volume create/info/status/list/heal.

mod heal;
mod lifecycle;
mod options;
mod rebalance;
mod remove_brick;
mod replicas;
mod snapshot;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mortar_client::volume_admin::{self, AdminError};
use mortar_client::Volume;
use mortar_proto::replication::Replication;
use mortar_proto::tls::{self, Identity, Role, Validity};
use mortar_proto::transport::{client_endpoint, Health, Pool};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "mortar",
    version,
    about = "Operate mortar volumes: certificates, volumes, status"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The volume certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Certificates for bricks, clients and operators.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Create and inspect volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Snapshots of a volume: taken at once, sharing every chunk, restorable while mounted.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Subcommand)]
enum SnapshotCommand {
    /// Take snapshot NAME of the whole namespace, at one point of its log. Without NAME, the
    /// snapshot is named SERIES-YYYYMMDDTHHMMSSZ (UTC). With --keep N, the oldest snapshots of
    /// the same series (names alike up to their last '-') beyond the newest N are deleted.
    Create {
        volume: String,
        name: Option<String>,
        #[arg(long)]
        keep: Option<u32>,
        #[arg(long, default_value = "auto")]
        series: String,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// Every snapshot: when it was taken, at which log index, its files and bytes, and the
    /// bytes of chunks only snapshots keep (what the live volume no longer names).
    List {
        volume: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// One snapshot, as `list` shows it.
    Info {
        volume: String,
        name: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a snapshot; the next heal frees the chunks only it kept (after --gc-grace).
    Delete {
        volume: String,
        name: String,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar snapshot clone VOLUME NAME NEW: make volume NEW, a writable copy of snapshot
    /// NAME's tree served by the same bricks and sharing its chunks (nothing is copied but the
    /// namespace). Mount it as HOST:/NEW; it has its own snapshots.
    Clone {
        volume: String,
        name: String,
        new: String,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make the live volume equal to snapshot NAME, in one change, while it stays mounted.
    /// The state before is kept as snapshot --undo (default undo-YYYYMMDDTHHMMSSZ), so the
    /// restore can itself be undone. With --path, only the tree at that path (absolute, in
    /// the volume) is restored, and nothing outside it changes.
    Restore {
        volume: String,
        name: String,
        #[arg(long)]
        undo: Option<String>,
        #[arg(long)]
        path: Option<String>,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "mortar volume CA")]
        name: String,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Issue NAME.pem and NAME.key signed by the CA in --ca.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// brick, client or admin.
        #[arg(long)]
        role: Role,
        #[arg(long)]
        name: String,
        /// Where to write the files (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 825, allow_negative_numbers = true)]
        days: i64,
    },
    /// Revoke a certificate for the volume: every brick refuses it from now on and closes its
    /// open connections.
    Revoke {
        /// Directory holding the CA (ca.pem, which the bricks are checked against too) and the
        /// certificates issued into it (NAME.pem).
        #[arg(long)]
        ca: PathBuf,
        /// A certificate's name (its serial number is read from CA/NAME.pem), or a serial
        /// number in hex.
        certificate: String,
        #[command(flatten)]
        seeds: Seeds,
        /// Admin certificate (PEM).
        #[arg(long, env = "MORTAR_CERT", default_value = "/etc/mortar/admin.pem")]
        cert: PathBuf,
        /// Admin private key (PEM).
        #[arg(long, env = "MORTAR_KEY", default_value = "/etc/mortar/admin.key")]
        key: PathBuf,
    },
}

/// How the CLI reaches bricks: an admin certificate and the volume CA.
#[derive(Args, Clone)]
struct Conn {
    /// Admin certificate (PEM).
    #[arg(long, env = "MORTAR_CERT", default_value = "/etc/mortar/admin.pem")]
    cert: PathBuf,
    /// Admin private key (PEM).
    #[arg(long, env = "MORTAR_KEY", default_value = "/etc/mortar/admin.key")]
    key: PathBuf,
    /// Volume CA certificate (PEM).
    #[arg(long, env = "MORTAR_CA", default_value = "/etc/mortar/ca.pem")]
    ca: PathBuf,
}

#[derive(Args, Clone)]
struct Seeds {
    /// Bricks to ask, comma-separated HOST:PORT (any one of the volume's bricks is enough).
    #[arg(long, env = "MORTAR_BRICKS", value_delimiter = ',', required = true)]
    bricks: Vec<String>,
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// mortar volume create NAME replica 3 HOST:PORT... (3, 6, 9, … bricks; each three in a
    /// row form a replica set, the first set also holds the metadata group's votes)
    Create {
        name: String,
        /// `replica 3` followed by the bricks.
        #[arg(required = true, num_args = 1..)]
        spec: Vec<String>,
        /// Chunk size in bytes.
        #[arg(long, default_value_t = mortar_proto::DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar volume stop NAME: mounts' operations fail with ENOTCONN (what they hold under
    /// delegations is committed first); bricks keep the data.
    Stop {
        name: String,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar volume start NAME: serve a stopped volume again (mounts resume, no remount).
    Start {
        name: String,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar volume delete NAME: erase a stopped volume; its bricks stop and start empty,
    /// free for a new volume. A clone is erased while the bricks go on serving the rest. Asks
    /// first unless --yes.
    Delete {
        name: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar volume set NAME KEY VALUE: set a volume option (`volume get NAME all` lists
    /// them); running bricks and mounts apply it.
    Set {
        name: String,
        #[arg(value_name = "KEY")]
        option: String,
        /// Checked against the option's rule (a negative number is a value, refused there).
        #[arg(allow_hyphen_values = true)]
        value: String,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar volume get NAME [KEY|all]: options in force, with their defaults.
    Get {
        name: String,
        #[arg(value_name = "KEY", default_value = "all")]
        option: String,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar volume reset NAME KEY|all: put options back to their defaults.
    Reset {
        name: String,
        #[arg(value_name = "KEY")]
        option: String,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a volume's configuration.
    Info {
        name: Option<String>,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Per brick: up/down, Raft role and applied index, how far behind the metadata leader,
    /// chunks, bytes, heal backlog. Exit status 1 when a brick does not answer, there is no
    /// leader, or a follower has been behind the leader for `--max-lag` or longer.
    Status {
        name: String,
        /// A follower behind the leader this long (seconds, or with an s/m/h suffix) has not
        /// caught up.
        #[arg(long, default_value_t = replicas::MAX_LAG_SECS, value_parser = parse_duration_secs)]
        max_lag: u64,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        json: bool,
    },
    /// Heal the volume's replicas (the cron job), or with `info` show what is pending.
    /// Exit status: 0 fully healed, 1 something is left (listed), 2 the heal could not run.
    Heal {
        name: String,
        /// `info`: what is pending, from heal indexes and digests, without healing.
        #[arg(value_parser = ["info"])]
        action: Option<String>,
        /// Also read and verify every chunk on every brick (scrub), replacing corrupt copies.
        #[arg(long)]
        full: bool,
        /// Scrub read rate per brick, bytes per second with an optional K/M/G suffix; 0 for no
        /// limit. Default: the volume option heal.scrub-rate (64M unless set).
        #[arg(long, value_parser = parse_bytes)]
        scrub_rate: Option<u64>,
        /// Unreferenced chunks are removed only after this long (seconds, or with an s/m/h/d
        /// suffix): it protects writes in flight and files still open after unlink.
        /// Default: the volume option heal.gc-grace (one hour unless set).
        #[arg(long, value_parser = parse_duration_secs)]
        gc_grace: Option<u64>,
        /// A follower behind the metadata leader this long is reported as a problem.
        #[arg(long, default_value_t = replicas::MAX_LAG_SECS, value_parser = parse_duration_secs)]
        max_lag: u64,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar volume replace-brick NAME OLD NEW commit: put the empty brick NEW (HOST:PORT) in
    /// the place of the volume's brick OLD (dead or retiring), then heal so NEW holds every
    /// chunk of its replica set. Run it again after any failure: it finishes what is left.
    /// Exit status: 0 replaced and healed, 1 replaced but something is left to heal (listed)
    /// or the certificate to revoke is not revoked yet, 2 not replaced.
    ReplaceBrick {
        name: String,
        /// The brick to replace, as the volume names it (see `volume info`).
        old: String,
        /// The new, empty brick (it may listen at the old brick's address).
        new: String,
        /// `commit`: carry the replacement out (as GlusterFS spells it).
        #[arg(value_name = "commit", value_parser = ["commit"])]
        action: String,
        /// The old brick's certificate (a PEM file, or its serial number): revoked once the
        /// replacement is committed, so the old brick is refused wherever it connects.
        #[arg(long, value_name = "CERT")]
        revoke: Option<String>,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar volume add-brick NAME HOST:PORT...: add empty bricks as new replica sets (a
    /// multiple of three). New chunks are placed over all sets at once; `rebalance start`
    /// moves the existing ones. Run it again after any failure: it finishes what is left.
    AddBrick {
        name: String,
        /// The new bricks, HOST:PORT, three per replica set.
        #[arg(required = true, num_args = 1.., value_name = "BRICK")]
        new_bricks: Vec<String>,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar volume rebalance NAME start|status|stop: move the chunks whose placement an
    /// add-brick changed. `start` runs in the foreground (a progress bar on a terminal) and
    /// goes on from where a stopped or crashed run left off; `status` and `stop` work from
    /// any host. Exit status of `start`: 0 completed, 1 stopped, 2 failed (run it again).
    Rebalance {
        name: String,
        #[arg(value_parser = ["start", "status", "stop"])]
        action: String,
        /// Bytes moved per second at most, with an optional K/M/G suffix; 0 for no limit.
        #[arg(long, default_value = "0", value_parser = parse_bytes)]
        rate: u64,
        /// Chunk ids scanned per page; the progress is recorded after each.
        #[arg(long, default_value_t = rebalance::PAGE, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        page_chunks: u32,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// mortar volume remove-brick NAME B1 B2 B3 start|status|commit: take one replica set out
    /// of the volume. `start` drains it (its chunks move to the other sets, like a rebalance:
    /// foreground, resumable, `--rate`); `status` shows what is left; `commit` takes the
    /// drained set out and retires its bricks, refused until every chunk files reference is
    /// on every brick of its set elsewhere. When the set holds the metadata group's votes,
    /// `start` first gives them to the first set that stays. Exit status of `start`: 0
    /// drained, 1 stopped, 2 failed (run it again).
    RemoveBrick {
        name: String,
        /// The bricks of one replica set (HOST:PORT), then start, status or commit.
        #[arg(required = true, num_args = 1.., value_name = "BRICK... ACTION")]
        spec: Vec<String>,
        /// Bytes moved per second at most by `start`, with an optional K/M/G suffix; 0 for no
        /// limit.
        #[arg(long, default_value = "0", value_parser = parse_bytes)]
        rate: u64,
        /// Chunk ids scanned per page by `start`; the progress is recorded after each.
        #[arg(long, default_value_t = rebalance::PAGE, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        page_chunks: u32,
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
    /// The volumes the given bricks serve; fails if any of them does not answer.
    List {
        #[command(flatten)]
        seeds: Seeds,
        #[command(flatten)]
        conn: Conn,
    },
}

fn parse_create_spec(spec: &[String]) -> Result<(Replication, Vec<String>)> {
    match spec {
        [r, n, bricks @ ..] if r == "replica" => Ok((Replication::parse(n)?, bricks.to_vec())),
        bricks => Ok((Replication::REPLICA_3, bricks.to_vec())),
    }
}

fn pool(conn: &Conn) -> Result<Pool> {
    let identity = Identity::load(&conn.cert, &conn.key, &conn.ca)
        .context("cannot load the admin TLS identity")?;
    let endpoint = client_endpoint(&identity).context("cannot open a QUIC endpoint")?;
    Ok(Pool::new(endpoint))
}

/// What `cert revoke` records for `certificate`: the serial of CA/NAME.pem, or as
/// [`certificate_revocation`] reads it.
fn revocation(ca: &std::path::Path, certificate: &str) -> Result<mortar_proto::Revoked> {
    let file = ca.join(format!("{certificate}.pem"));
    if file.exists() {
        let (serial, name) = tls::file_serial(&file)?;
        return Ok(mortar_proto::Revoked { serial, name });
    }
    certificate_revocation(certificate)
        .with_context(|| format!("no certificate {} either", file.display()))
}

/// A revocation of `certificate`: a PEM file's serial, or a serial number given.
fn certificate_revocation(certificate: &str) -> Result<mortar_proto::Revoked> {
    let file = std::path::Path::new(certificate);
    if file.is_file() {
        let (serial, name) = tls::file_serial(file)?;
        return Ok(mortar_proto::Revoked { serial, name });
    }
    let serial: String = certificate
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{certificate}: not a certificate file and not a serial number (hex digits)");
    }
    Ok(mortar_proto::Revoked {
        serial,
        name: String::new(),
    })
}

/// The volume `name` for a command that changes its bricks or configuration, which a clone
/// shares with the volume it was made from: a clone is refused.
async fn connect(seeds: &Seeds, conn: &Conn, name: Option<&str>) -> Result<Volume> {
    let vol = connect_any(seeds, conn, name).await?;
    if let Some(clone) = vol.clone_info() {
        let origin = vol.config().name.clone();
        bail!(
            "'{}' is a clone of volume '{origin}' and shares its bricks and configuration: run \
             this command on '{origin}'",
            clone.name
        );
    }
    Ok(vol)
}

/// The volume `name`, a clone included (its snapshots, its information).
async fn connect_any(seeds: &Seeds, conn: &Conn, name: Option<&str>) -> Result<Volume> {
    let p = pool(conn)?;
    let name = match name {
        Some(n) => n.to_string(),
        None => first_volume_name(&p, &seeds.bricks).await?,
    };
    Volume::with_pool(p, &seeds.bricks, &name)
        .await
        .map_err(|e| {
            anyhow!(
                "cannot reach volume '{name}' through {}: {e}",
                seeds.bricks.join(",")
            )
        })
}

async fn first_volume_name(pool: &Pool, bricks: &[String]) -> Result<String> {
    let mut errors = Vec::new();
    for b in bricks {
        match volume_admin::hello(pool, b).await {
            Ok(h) => match h.volume {
                Some(v) => return Ok(v),
                None => errors.push(format!("{b}: serves no volume")),
            },
            Err(e) => errors.push(e.to_string()),
        }
    }
    bail!("no volume found: {}", errors.join("; "))
}

use mortar_proto::options::{parse_bytes, parse_scaled};

fn parse_duration_secs(s: &str) -> Result<u64, String> {
    parse_scaled(s, &[('s', 1), ('m', 60), ('h', 3600), ('d', 86400)])
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Ca(CaCommand::Init { dir, name }) => {
            tls::ca_init(&dir, &name).context("cannot create the CA")?;
            println!(
                "CA created: {} and {}",
                tls::ca_cert_path(&dir).display(),
                tls::ca_key_path(&dir).display()
            );
        }
        Command::Cert(CertCommand::Issue {
            ca,
            role,
            name,
            out,
            days,
        }) => {
            if days == 0 {
                bail!("--days must not be 0");
            }
            let out = out.unwrap_or_else(|| ca.clone());
            let (cert, key) = tls::issue(&ca, role, &name, Validity { days }, &out)
                .context("cannot issue the certificate")?;
            println!(
                "issued {role} certificate '{name}': {} and {}",
                cert.display(),
                key.display()
            );
        }
        Command::Cert(CertCommand::Revoke {
            ca,
            certificate,
            seeds,
            cert,
            key,
        }) => {
            let revoked = revocation(&ca, &certificate)?;
            let conn = Conn {
                cert,
                key,
                ca: tls::ca_cert_path(&ca),
            };
            let vol = connect(&seeds, &conn, None).await?;
            let name = vol.config().name.clone();
            vol.admin_op(mortar_proto::wire::MetaOp::Revoke(revoked.clone()))
                .await
                .map_err(|e| anyhow!("cannot revoke {certificate}: {e}"))?;
            println!(
                "revoked certificate '{}' (serial {}) for volume {name}",
                revoked.name, revoked.serial
            );
        }
        Command::Volume(VolumeCommand::Create {
            name,
            spec,
            chunk_size,
            conn,
        }) => {
            let (replication, bricks) = parse_create_spec(&spec)?;
            let p = pool(&conn)?;
            let config = volume_admin::create_volume(&p, &name, replication, &bricks, chunk_size)
                .await
                .map_err(|e| match e {
                    AdminError::Brick { .. } | AdminError::Unreachable { .. } => {
                        anyhow!("volume create failed: {e}")
                    }
                    e => anyhow!("{e}"),
                })?;
            println!(
                "volume create: {}: success ({} bricks, chunk size {})",
                config.name,
                bricks.len(),
                human(config.chunk_size as u64)
            );
        }
        Command::Volume(VolumeCommand::Stop { name, seeds, conn }) => {
            lifecycle::stop(&connect(&seeds, &conn, Some(&name)).await?, true).await?
        }
        Command::Volume(VolumeCommand::Start { name, seeds, conn }) => {
            lifecycle::stop(&connect(&seeds, &conn, Some(&name)).await?, false).await?
        }
        Command::Volume(VolumeCommand::Delete {
            name,
            yes,
            seeds,
            conn,
        }) => lifecycle::delete(&connect_any(&seeds, &conn, Some(&name)).await?, yes).await?,
        Command::Volume(VolumeCommand::Set {
            name,
            option,
            value,
            seeds,
            conn,
        }) => options::set(&connect(&seeds, &conn, Some(&name)).await?, &option, &value).await?,
        Command::Volume(VolumeCommand::Get {
            name,
            option,
            seeds,
            conn,
        }) => options::get(&connect(&seeds, &conn, Some(&name)).await?, &option).await?,
        Command::Volume(VolumeCommand::Reset {
            name,
            option,
            seeds,
            conn,
        }) => options::reset(&connect(&seeds, &conn, Some(&name)).await?, &option).await?,
        Command::Volume(VolumeCommand::Info {
            name,
            seeds,
            conn,
            json,
        }) => {
            let vol = connect_any(&seeds, &conn, name.as_deref()).await?;
            let c = vol.config();
            let clones = vol
                .clones()
                .await
                .map_err(|e| anyhow!("cannot read the volume's clones: {e}"))?;
            if json {
                let mut v = serde_json::to_value(&*c)?;
                v["clones"] = serde_json::to_value(&clones)?;
                if let Some(clone) = vol.clone_info() {
                    v["clone"] = serde_json::to_value(clone)?;
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("Volume Name: {}", vol.name());
                if let Some(clone) = vol.clone_info() {
                    println!(
                        "Clone Of: {} (snapshot '{}', made {} at log index {}; shares its \
                         bricks and chunks)",
                        c.name,
                        mortar_proto::wire::split_snapshot_name(&clone.snapshot).1,
                        snapshot::when(clone.created),
                        clone.index
                    );
                }
                let kind = if c.replica_sets.len() > 1 {
                    "Distributed-Replicate"
                } else {
                    "Replicate"
                };
                println!("Type: {kind}");
                println!(
                    "Number of Bricks: {} x {} = {}",
                    c.replica_sets.len(),
                    Replication::REPLICA_3.copies(),
                    c.bricks().count()
                );
                println!("Status: {}", if c.stopped { "Stopped" } else { "Started" });
                println!("Chunk Size: {}", human(c.chunk_size as u64));
                match &c.previous {
                    Some(_) => println!(
                        "Layout: epoch {}, changing (run 'mortar volume rebalance {} start')",
                        c.epoch, c.name
                    ),
                    None => println!("Layout: epoch {}, settled", c.epoch),
                }
                if c.replica_sets.iter().any(|s| s.leaving) {
                    println!(
                        "Leaving: the bricks marked leaving are drained by 'remove-brick … start' \
                         and taken out by 'remove-brick … commit'"
                    );
                }
                if !c.options.0.is_empty() {
                    println!("Options Reconfigured:");
                    for (k, v) in &c.options.0 {
                        println!("{k}: {v}");
                    }
                }
                println!("Bricks:");
                let mut n = 0;
                for set in &c.replica_sets {
                    let leaving = if set.leaving { ", leaving" } else { "" };
                    for b in &set.bricks {
                        n += 1;
                        println!("Brick{n}: {} (id {}{leaving})", b.addr, b.id);
                    }
                }
                if vol.clone_info().is_none() && !clones.is_empty() {
                    println!("Clones:");
                    for clone in &clones {
                        println!(
                            "{} (from snapshot '{}', {} files)",
                            clone.name, clone.snapshot, clone.files
                        );
                    }
                }
            }
        }
        Command::Volume(VolumeCommand::Status {
            name,
            seeds,
            conn,
            max_lag,
            json,
        }) => {
            let vol = connect(&seeds, &conn, Some(&name)).await?;
            let statuses = futures::future::join_all(
                vol.config()
                    .bricks()
                    .map(|b| volume_admin::status(vol.pool(), &b.addr)),
            )
            .await;
            let bricks: Vec<_> = vol.config().bricks().cloned().collect();
            let problems = replicas::problems(&bricks, &statuses, max_lag);
            let leader = replicas::leader(&statuses);
            if json {
                let rows: Vec<serde_json::Value> = vol
                    .config()
                    .bricks()
                    .zip(&statuses)
                    .map(|(b, s)| match s {
                        Ok(s) => serde_json::json!({"addr": b.addr, "up": true, "status": s}),
                        Err(e) => {
                            serde_json::json!({"addr": b.addr, "up": false, "error": e.to_string()})
                        }
                    })
                    .collect();
                let out = serde_json::json!({"bricks": rows, "problems": problems});
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("Status of volume: {name}");
                println!(
                    "{:<22} {:<20} {:<5} {:<10} {:>9} {:>10} {:>9} {:>10} {:>10} {:>6} {:>6}",
                    "Brick",
                    "ID",
                    "Up",
                    "Raft",
                    "Applied",
                    "Behind",
                    "Chunks",
                    "Bytes",
                    "Disk",
                    "Heal",
                    "Peers"
                );
                for (b, s) in vol.config().bricks().zip(&statuses) {
                    match s {
                        Ok(s) => {
                            let reached = s.peers.iter().filter(|p| p.health == Health::Up);
                            println!(
                                "{:<22} {:<20} {:<5} {:<10} {:>9} {:>10} {:>9} {:>10} {:>10} {:>6} {:>6}",
                                b.addr,
                                s.id,
                                "Y",
                                s.raft_role,
                                s.applied_index,
                                replicas::behind_cell(leader, s.id),
                                s.chunk_count,
                                human(s.chunk_bytes),
                                human(s.disk_bytes),
                                s.heal_backlog,
                                format!("{}/{}", reached.count(), s.peers.len())
                            );
                            // A brick that cannot reach a peer runs without that replica.
                            for p in s.peers.iter().filter(|p| p.health != Health::Up) {
                                println!(
                                    "    peer {} ({}) is {} from here",
                                    p.addr, p.id, p.health
                                );
                            }
                        }
                        Err(e) => println!("{:<22} {:<20} {:<5} {}", b.addr, b.id, "N", e),
                    }
                }
            }
            if !json {
                for p in &problems {
                    println!("problem: {p}");
                }
            }
            if statuses.iter().any(|s| s.is_err()) || !problems.is_empty() {
                std::process::exit(1);
            }
        }
        Command::Volume(VolumeCommand::Heal {
            name,
            action,
            full,
            scrub_rate,
            gc_grace,
            max_lag,
            seeds,
            conn,
        }) => {
            // Cron reads the exit status: 0 healed, 1 something left, 2 could not run.
            let outcome: Result<i32> = async {
                let vol = Arc::new(connect(&seeds, &conn, Some(&name)).await?);
                if action.is_some() {
                    return Ok(if heal::info(&vol).await? { 1 } else { 0 });
                }
                let opts = heal::Options {
                    full,
                    scrub_rate,
                    gc_grace_secs: gc_grace,
                    max_lag_secs: max_lag,
                };
                match heal::heal(vol, &opts, &heal::Progress::new()).await? {
                    heal::Outcome::Healed => {
                        println!("heal {name}: fully healed");
                        Ok(0)
                    }
                    heal::Outcome::Left(left) => {
                        println!("heal {name}: {} problems left:", left.len());
                        for l in left {
                            println!("  {l}");
                        }
                        Ok(1)
                    }
                }
            }
            .await;
            match outcome {
                Ok(code) => std::process::exit(code),
                Err(e) => {
                    eprintln!("mortar: heal {name}: {e:#}");
                    std::process::exit(2);
                }
            }
        }
        Command::Volume(VolumeCommand::ReplaceBrick {
            name,
            old,
            new,
            action: _,
            revoke,
            seeds,
            conn,
        }) => {
            // Checked before anything changes.
            let revoke = match revoke.as_deref().map(certificate_revocation).transpose() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("mortar: replace-brick {name}: {e:#}");
                    std::process::exit(2);
                }
            };
            let code = match replace_brick(&name, &old, &new, revoke, &seeds, &conn).await {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("mortar: replace-brick {name}: {e:#}");
                    2
                }
            };
            std::process::exit(code);
        }
        Command::Volume(VolumeCommand::AddBrick {
            name,
            new_bricks: bricks,
            seeds,
            conn,
        }) => {
            let vol = connect(&seeds, &conn, Some(&name)).await?;
            let via: Vec<String> = vol.config().bricks().map(|b| b.addr.clone()).collect();
            let config = volume_admin::add_brick(vol.pool(), &via, &bricks)
                .await
                .map_err(|e| anyhow!("add-brick {name}: {e}"))?;
            println!(
                "add-brick {name}: success; the volume is {} x {} = {} (layout epoch {}); \
                 run 'mortar volume rebalance {name} start' to move existing chunks",
                config.replica_sets.len(),
                Replication::REPLICA_3.copies(),
                config.bricks().count(),
                config.epoch
            );
        }
        Command::Volume(VolumeCommand::Rebalance {
            name,
            action,
            rate,
            page_chunks,
            seeds,
            conn,
        }) => {
            let vol = Arc::new(connect(&seeds, &conn, Some(&name)).await?);
            match action.as_str() {
                "status" => match vol.rebalance_state().await? {
                    Some(s) => {
                        println!("Rebalance of volume {name}:");
                        for line in rebalance::describe(&s) {
                            println!("  {line}");
                        }
                    }
                    None => println!("rebalance {name}: never run"),
                },
                "stop" => {
                    rebalance::stop(&vol).await?;
                    println!("rebalance {name}: stop recorded; the running rebalance stops after its current page");
                }
                _ => {
                    let opts = rebalance::Options {
                        rate,
                        page: page_chunks,
                    };
                    let code = match rebalance::start(vol, &opts, &heal::Progress::new()).await {
                        Ok(rebalance::Outcome::NothingToDo) => {
                            println!("rebalance {name}: the layout is settled; nothing to move");
                            0
                        }
                        Ok(rebalance::Outcome::Completed(s)) => {
                            println!(
                                "rebalance {name}: completed: {} chunks scanned, {} moved ({})",
                                s.scanned,
                                s.moved,
                                human(s.moved_bytes)
                            );
                            0
                        }
                        Ok(rebalance::Outcome::Stopped(s)) => {
                            println!(
                                "rebalance {name}: stopped after {} chunks scanned; 'start' goes on from there",
                                s.scanned
                            );
                            1
                        }
                        Err(e) => {
                            eprintln!("mortar: rebalance {name}: {e:#}");
                            2
                        }
                    };
                    std::process::exit(code);
                }
            }
        }
        Command::Volume(VolumeCommand::RemoveBrick {
            name,
            spec,
            rate,
            page_chunks,
            seeds,
            conn,
        }) => {
            let (bricks, action) = remove_brick::parse(&spec)?;
            let vol = Arc::new(connect(&seeds, &conn, Some(&name)).await?);
            match action {
                remove_brick::Action::Status => remove_brick::status(&vol, &name, &bricks)
                    .await
                    .map_err(|e| anyhow!("remove-brick {name}: {e:#}"))?,
                remove_brick::Action::Commit => remove_brick::commit(&vol, &name, &bricks)
                    .await
                    .map_err(|e| anyhow!("remove-brick {name}: {e:#}"))?,
                remove_brick::Action::Start => {
                    let opts = rebalance::Options {
                        rate,
                        page: page_chunks,
                    };
                    let code = match remove_brick::start(vol, &name, &bricks, &opts).await {
                        Ok(code) => code,
                        Err(e) => {
                            eprintln!("mortar: remove-brick {name}: {e:#}");
                            2
                        }
                    };
                    std::process::exit(code);
                }
            }
        }
        Command::Snapshot(cmd) => run_snapshot(cmd).await?,
        Command::Volume(VolumeCommand::List { seeds, conn }) => {
            let p = pool(&conn)?;
            let mut names = std::collections::BTreeSet::new();
            let mut unreachable = Vec::new();
            for b in &seeds.bricks {
                match volume_admin::hello(&p, b).await {
                    Ok(h) => names.extend(h.volume),
                    Err(e) => unreachable.push(e.to_string()),
                }
            }
            if names.is_empty() && unreachable.is_empty() {
                println!("No volumes present");
            }
            for n in names {
                println!("{n}");
            }
            if !unreachable.is_empty() {
                bail!("{}", unreachable.join("; "));
            }
        }
    }
    Ok(())
}

async fn run_snapshot(cmd: SnapshotCommand) -> Result<()> {
    let row = |u: &mortar_proto::wire::SnapshotUsage| {
        println!(
            "{:<28} {:<23} {:>10} {:>9} {:>10} {:>12}",
            u.info.name,
            snapshot::when(u.info.created),
            u.info.index,
            u.files,
            human(u.bytes),
            human(u.only_bytes)
        )
    };
    let header = || {
        println!(
            "{:<28} {:<23} {:>10} {:>9} {:>10} {:>12}",
            "NAME", "CREATED", "INDEX", "FILES", "BYTES", "ONLY-KEPT"
        )
    };
    match cmd {
        SnapshotCommand::Create {
            volume,
            name,
            keep,
            series,
            seeds,
            conn,
        } => {
            let name = name.unwrap_or_else(|| snapshot::timed_name(&series));
            mortar_proto::wire::validate_snapshot_name(&name)?;
            let vol = connect_any(&seeds, &conn, Some(&volume)).await?;
            let info = snapshot::create(&vol, &name, keep).await?;
            println!(
                "snapshot create {volume} {}: taken at log index {}, {} files",
                info.name, info.index, info.files
            );
        }
        SnapshotCommand::List {
            volume,
            json,
            seeds,
            conn,
        } => {
            let vol = connect_any(&seeds, &conn, Some(&volume)).await?;
            let all = snapshot::usage(&vol, None).await?;
            if json {
                let v: Vec<_> = all.iter().map(snapshot::usage_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if all.is_empty() {
                println!("No snapshots of volume '{volume}'");
            } else {
                header();
                all.iter().for_each(row);
            }
        }
        SnapshotCommand::Info {
            volume,
            name,
            json,
            seeds,
            conn,
        } => {
            let vol = connect_any(&seeds, &conn, Some(&volume)).await?;
            let u = snapshot::usage(&vol, Some(&name)).await?.remove(0);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&snapshot::usage_json(&u))?
                );
            } else {
                header();
                row(&u);
            }
        }
        SnapshotCommand::Delete {
            volume,
            name,
            seeds,
            conn,
        } => {
            let vol = connect_any(&seeds, &conn, Some(&volume)).await?;
            snapshot::delete(&vol, &name).await?;
            println!("snapshot delete {volume} {name}: deleted");
        }
        SnapshotCommand::Clone {
            volume,
            name,
            new,
            seeds,
            conn,
        } => {
            let vol = connect_any(&seeds, &conn, Some(&volume)).await?;
            let made = snapshot::clone(&vol, &name, &new).await?;
            println!(
                "snapshot clone {volume} {name} {new}: volume '{new}' made from {} files, \
                 sharing the chunks (mount it as HOST:/{new})",
                made.files
            );
        }
        SnapshotCommand::Restore {
            volume,
            name,
            undo,
            path,
            seeds,
            conn,
        } => {
            let undo = undo.unwrap_or_else(|| snapshot::timed_name("undo"));
            let vol = connect_any(&seeds, &conn, Some(&volume)).await?;
            let kept = snapshot::restore(&vol, &name, &undo, path.as_deref()).await?;
            let what = path.map_or_else(String::new, |p| format!(" {p}"));
            println!(
                "snapshot restore {volume} {name}:{what} restored; the volume as it was is \
                 snapshot '{}' (mortar snapshot restore {volume} {} undoes this)",
                kept.name, kept.name
            );
        }
    }
    Ok(())
}

/// Replace, then heal the new brick's replica set; the exit status as `ReplaceBrick` documents.
async fn replace_brick(
    name: &str,
    old: &str,
    new: &str,
    revoke: Option<mortar_proto::Revoked>,
    seeds: &Seeds,
    conn: &Conn,
) -> Result<i32> {
    let vol = connect(seeds, conn, Some(name)).await?;
    // The leader first, or any brick that answers (it forwards there).
    let via: Vec<String> = vol
        .config()
        .bricks()
        .map(|b| b.addr.clone())
        .filter(|a| a != old)
        .chain(seeds.bricks.iter().cloned())
        .collect();
    let done = volume_admin::replace_brick(vol.pool(), &via, old, new).await?;
    match &done.old {
        Some(o) if !done.steps.is_empty() => println!(
            "replace-brick {name}: {} (id {}) replaced by {} (id {}): {}",
            o.addr,
            o.id,
            done.new.addr,
            done.new.id,
            done.steps.join(", ")
        ),
        _ => println!(
            "replace-brick {name}: {} (id {}) is already in the volume; nothing to change",
            done.new.addr, done.new.id
        ),
    }
    // The old brick is out of the volume now: its certificate goes too (again on a rerun).
    if let Some(r) = revoke {
        if let Err(e) = vol
            .admin_op(mortar_proto::wire::MetaOp::Revoke(r.clone()))
            .await
        {
            eprintln!(
                "mortar: replace-brick {name}: replaced, but the old brick's certificate (serial {}) is not revoked: {e}; run it again",
                r.serial
            );
            return Ok(1);
        }
        println!(
            "replace-brick {name}: revoked the old brick's certificate '{}' (serial {})",
            r.name, r.serial
        );
    }
    // Heal with the configuration that names the new brick, once the leader reports on the
    // new brick's replication (it samples every quarter second; heal checks every follower).
    let vol = Arc::new(connect(seeds, conn, Some(name)).await?);
    let reported = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let statuses = futures::future::join_all(
            vol.config()
                .bricks()
                .map(|b| volume_admin::status(vol.pool(), &b.addr)),
        )
        .await;
        let seen = replicas::leader(&statuses)
            .is_some_and(|l| l.id == done.new.id || replicas::lag_of(l, done.new.id).is_some());
        if seen || std::time::Instant::now() >= reported {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let opts = heal::Options {
        full: false,
        scrub_rate: None,
        gc_grace_secs: None,
        max_lag_secs: replicas::MAX_LAG_SECS,
    };
    Ok(
        match heal::heal(vol, &opts, &heal::Progress::new()).await? {
            heal::Outcome::Healed => {
                println!("heal {name}: fully healed");
                0
            }
            heal::Outcome::Left(left) => {
                println!("heal {name}: {} problems left:", left.len());
                for l in left {
                    println!("  {l}");
                }
                1
            }
        },
    )
}

fn main() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MORTAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mortar: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("mortar: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
