//! `mortar-mount` / `mount.mortar`: check everything that can be checked, then mount.
//!
//! Daemonising re-executes this program in the foreground with its stdout on a pipe: the
//! child reports `ok` once the mount is live, or the one-line reason it failed, and the parent
//! exits 0 or prints that line and exits 1. No fork after threads, no stale mount on failure.

use crate::core::Core;
use crate::fs::MortarFs;
use crate::options::{parse_options, parse_source, MountOptions, Source};
use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use mortar_client::mortar_proto::logfile::{self, LogFile};
use mortar_client::mortar_proto::tls::Identity;
use mortar_client::Volume;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Mount a mortar volume: mortar-mount HOST[:PORT][,HOST[:PORT]...]:/VOLUME MOUNTPOINT [-o OPTIONS]
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// Bricks and volume, e.g. h1,h2,h3:/www (port 7001 unless given).
    pub source: String,
    /// An existing, empty directory.
    pub mountpoint: PathBuf,
    /// Comma-separated options: ro, rw, allow_other (the default), no_allow_other,
    /// default_permissions (the default), no_default_permissions, attr_timeout=S, entry_timeout=S, connect_timeout=S,
    /// op_timeout=S (default 30), cert=P, key=P, ca=P, log=P, snapshot=NAME, metrics=ADDR
    /// (Prometheus metrics at http://ADDR/metrics);
    /// fstab options such as _netdev and defaults are accepted and ignored.
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    pub options: Vec<String>,
    /// Stay in the foreground.
    #[arg(short = 'f')]
    pub foreground: bool,
    /// Accepted from mount(8): do not write /etc/mtab.
    #[arg(short = 'n', hide = true)]
    pub no_mtab: bool,
    /// Accepted from mount(8): sloppy options.
    #[arg(short = 's', hide = true)]
    pub sloppy: bool,
    /// Accepted from mount(8): verbose.
    #[arg(short = 'v', hide = true)]
    pub verbose: bool,
}

const NOTIFY_ENV: &str = "MORTAR_MOUNT_NOTIFY";

fn is_mount_point(path: &Path) -> Result<bool> {
    let canonical = std::fs::canonicalize(path)?;
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&m.replace("\\040", " ")) == canonical))
}

fn check_mount_point(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| {
        anyhow!(
            "mount point {} does not exist or cannot be read: {e}",
            path.display()
        )
    })?;
    if !meta.is_dir() {
        bail!("mount point {} is not a directory", path.display());
    }
    if is_mount_point(path)? {
        bail!(
            "mount point {} is busy: something is already mounted there",
            path.display()
        );
    }
    if std::fs::read_dir(path)?.next().is_some() {
        bail!("mount point {} is not empty", path.display());
    }
    Ok(())
}

fn parse(args: &Args) -> Result<(Source, MountOptions)> {
    let source = parse_source(&args.source)?;
    let mut opts = MountOptions::default();
    for o in &args.options {
        parse_options(o, &mut opts)?;
    }
    match (&source.snapshot, &opts.snapshot) {
        (Some(a), Some(b)) if a != b => {
            bail!("the source names snapshot '{a}' and -o snapshot= names '{b}'")
        }
        (Some(a), None) => opts.snapshot = Some(a.clone()),
        _ => {}
    }
    if let Some(name) = &opts.snapshot {
        mortar_client::mortar_proto::wire::validate_snapshot_name(name)?;
        // A snapshot never changes.
        opts.read_only = true;
    }
    Ok((source, opts))
}

/// Entry point shared by both binaries; returns the process exit code.
pub fn main() -> i32 {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return 2;
        }
    };
    match run(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mortar-mount: {e:#}");
            1
        }
    }
}

fn run(args: Args) -> Result<()> {
    let (source, opts) = parse(&args)?;
    let notify = std::env::var_os(NOTIFY_ENV).is_some();
    if !notify {
        check_mount_point(&args.mountpoint)?;
    }
    if args.foreground || notify {
        return serve(&args, source, opts, notify);
    }
    daemonize()
}

/// Start ourselves in the foreground, detached, and wait for its verdict.
fn daemonize() -> Result<()> {
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let mut cmd = std::process::Command::new(std::env::current_exe().context("locating myself")?);
    cmd.args(std::env::args_os().skip(1))
        .env(NOTIFY_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    drop(cmd);
    let mut line = String::new();
    std::io::BufReader::new(reader)
        .read_line(&mut line)
        .context("waiting for the mount daemon")?;
    match line.trim_end() {
        "ok" => Ok(()),
        "" => {
            let status = child.wait()?;
            bail!("mount daemon exited ({status}) before mounting")
        }
        reason => {
            let _ = child.wait();
            bail!("{reason}")
        }
    }
}

/// Set up logging; the log file, if there is one (reopened on SIGHUP once the runtime runs).
fn init_logging(
    opts: &MountOptions,
    volume: &str,
    foreground: bool,
) -> Result<Option<Arc<LogFile>>> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MORTAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let path = match (&opts.log, foreground) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some(PathBuf::from(format!("/var/log/mortar/mount-{volume}.log"))),
        (None, true) => None,
    };
    match path {
        Some(p) => {
            let log = LogFile::open(&p).with_context(|| format!("opening log {}", p.display()))?;
            let writer = Arc::clone(&log);
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(move || writer.writer())
                .init();
            Ok(Some(log))
        }
        None => {
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
            Ok(None)
        }
    }
}

fn serve(args: &Args, source: Source, opts: MountOptions, notify: bool) -> Result<()> {
    // Tell the waiting parent (if any) how it went, then let go of its pipe.
    let report = |msg: &str| {
        if notify {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{msg}");
            let _ = out.flush();
            if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                // SAFETY: replacing our stdout descriptor with /dev/null closes the pipe.
                unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 1) };
            }
        }
    };
    let setup = || -> Result<(tokio::runtime::Runtime, fuser::Session<MortarFs>, Arc<Volume>)> {
        let log = init_logging(&opts, &source.volume, !notify)?;
        if notify {
            check_mount_point(&args.mountpoint)?;
        }
        let identity = Identity::load(&opts.cert, &opts.key, &opts.ca).context("cannot load the client certificate (options cert=, key=, ca=)")?;
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
        {
            let _in_runtime = rt.enter();
            logfile::reopen_on_hangup(log).context("cannot handle SIGHUP")?;
        }
        let vol = rt.block_on(async {
            let deadline = opts.connect_timeout;
            tokio::time::timeout(deadline, Volume::connect(&source.bricks, &source.volume, &identity))
                .await
                .map_err(|_| anyhow!("cannot reach volume '{}' through {} within {deadline:?}", source.volume, source.bricks.join(",")))?
                .map_err(|e| anyhow!("cannot mount volume '{}' from {}: {e}", source.volume, source.bricks.join(",")))
        })?;
        let mut vol = vol;
        vol.set_op_timeout(opts.op_timeout);
        if let Some(name) = &opts.snapshot {
            vol.set_snapshot(name);
            rt.block_on(vol.getattr(vol.root()))
                .map_err(|e| anyhow!("cannot mount snapshot '{name}' of volume '{}': {e}", source.volume))?;
        }
        let vol = Arc::new(vol);
        if let Some(addr) = opts.metrics {
            let _in_runtime = rt.enter();
            let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).with_context(|| format!("cannot serve metrics on {addr} (option metrics=)"))?;
            crate::metrics::serve(listener, crate::metrics::registry(vol.clone()));
            tracing::info!(%addr, "serving metrics at /metrics");
        }
        let core = Arc::new(Core::new(vol.clone(), opts.read_only));
        let ttls = Arc::new(crate::fs::Ttls::default());
        {
            // The mount's own attr_timeout=/entry_timeout= win; else the volume's options, as
            // they change.
            let (fixed_attr, fixed_entry) = (opts.attr_timeout, opts.entry_timeout);
            let ttls = Arc::clone(&ttls);
            vol.on_config(Box::new(move |config| {
                let o = &config.options;
                let (attr, entry) = (fixed_attr.unwrap_or(o.attr_timeout()), fixed_entry.unwrap_or(o.entry_timeout()));
                if (attr, entry) != (ttls.attr(), ttls.entry()) {
                    tracing::info!(?attr, ?entry, "kernel attribute and entry timeouts");
                }
                ttls.set(Some(attr), Some(entry));
            }));
        }
        let inos = crate::fs::Inos::new(vol.root());
        let fs = MortarFs::new(core, inos, rt.handle().clone(), ttls);
        let notifier = fs.notifier.clone();
        vol.on_invalidate(crate::fs::kernel_invalidation(notifier.clone(), rt.handle().clone(), inos));
        {
            let _in_runtime = rt.enter();
            vol.start_watch();
        }
        // Test hook: changes made under delegations are committed only by a recall, fsync,
        // fsyncdir or unmount, so a test can kill the leader while this mount holds some.
        if std::env::var_os("MORTAR_TEST_HOLD_COMMITS").is_some() {
            tracing::warn!("test hook: background commits of delegated changes are off");
            vol.pause_background_commits(true);
        }
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("mortar:{}", args.source)),
            fuser::MountOption::Subtype("mortar".into()),
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
        ];
        if opts.default_permissions {
            config.mount_options.push(fuser::MountOption::DefaultPermissions);
        }
        config.mount_options.push(if opts.read_only { fuser::MountOption::RO } else { fuser::MountOption::RW });
        if opts.allow_other {
            config.acl = fuser::SessionACL::All;
        }
        let session = fuser::Session::new(fs, &args.mountpoint, &config).with_context(|| format!("cannot mount at {}", args.mountpoint.display()))?;
        let _ = notifier.set(session.notifier());
        Ok((rt, session, vol))
    };
    let (rt, mut session, vol_for_exit) = match setup() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e:#}");
            report(&format!("{e:#}"));
            return Err(e);
        }
    };
    let mut unmounter = session.unmount_callable();
    rt.spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("signal received: unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::error!(error = %e, "unmount failed");
        }
    });
    tracing::info!(volume = %source.volume, mountpoint = %args.mountpoint.display(), "mounted");
    report("ok");
    let ran = session.run().context("FUSE session ended with an error");
    // Files closed before the unmount may be held under delegations: commit them.
    if let Err(e) = rt.block_on(vol_for_exit.shutdown()) {
        tracing::error!(error = %e, "changes made under delegations could not be committed before exit");
    }
    ran?;
    tracing::info!("unmounted");
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}
