//! A brick's settings: command-line flags over a TOML file (`--config
//! /etc/mortar/brick-NAME.toml`, the keys named as the flags are) over defaults. Every value is
//! checked here, whichever source it came from, and an error names the key.

use crate::log_bound;
use crate::raft;
use crate::space::{self, Reserve};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The settings a flag or the file may give; None where neither did.
#[derive(clap::Args, Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Keys {
    /// Directory for this brick's RocksDB (created if missing).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// UDP address to listen on for QUIC, e.g. 127.0.0.1:7001.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// This brick's certificate (role brick), PEM.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This brick's private key, PEM.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The volume CA certificate, PEM.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Metadata log entries between snapshots (at least 10; default 20000); older entries are
    /// then purged.
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Log bytes between snapshots, at most (at least 4096; default 256 MiB); a quarter of it
    /// is kept after a purge.
    #[arg(long)]
    pub snapshot_bytes: Option<u64>,
    /// Disk space kept free for metadata (size like 512M, or a share like 2%; default 2%): new
    /// data is refused with ENOSPC below it, so deletes, renames and mkdir still work.
    #[arg(long)]
    pub reserve: Option<String>,
    /// Log filter (tracing env-filter syntax, default info); RUST_LOG overrides it.
    #[arg(long)]
    pub log: Option<String>,
    /// Where to log: a file (appended to, opened again on SIGHUP for logrotate), or `-` for
    /// standard error. Default: standard error when run by systemd (the journal) or on a
    /// terminal, else /var/log/mortar/brick-PORT.log.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// TCP address to serve Prometheus metrics on (path /metrics), e.g. 127.0.0.1:9101.
    /// Default: none.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
}

/// A brick's settings, complete and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub snapshot_every: u64,
    pub snapshot_bytes: u64,
    pub reserve: Reserve,
    pub log: String,
    /// None: standard error.
    pub log_file: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("config file {path}: {err}")]
    Parse { path: PathBuf, err: toml::de::Error },
    #[error("--{0} (or `{0}` in the config file) is required")]
    Missing(&'static str),
    #[error("{key}: {reason}")]
    Bad { key: &'static str, reason: String },
}

impl Keys {
    pub fn from_file(path: &Path) -> Result<Keys, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.to_path_buf(),
            err,
        })?;
        Keys::parse(&text).map_err(|err| ConfigError::Parse {
            path: path.to_path_buf(),
            err,
        })
    }

    pub fn parse(text: &str) -> Result<Keys, toml::de::Error> {
        toml::from_str(text)
    }

    /// These keys where given, else `under`'s.
    pub fn over(self, under: Keys) -> Keys {
        Keys {
            data: self.data.or(under.data),
            listen: self.listen.or(under.listen),
            cert: self.cert.or(under.cert),
            key: self.key.or(under.key),
            ca: self.ca.or(under.ca),
            snapshot_every: self.snapshot_every.or(under.snapshot_every),
            snapshot_bytes: self.snapshot_bytes.or(under.snapshot_bytes),
            reserve: self.reserve.or(under.reserve),
            log: self.log.or(under.log),
            log_file: self.log_file.or(under.log_file),
            metrics: self.metrics.or(under.metrics),
        }
    }

    /// Complete with defaults and check. `standard_error_is_watched`: systemd's journal or a
    /// terminal takes standard error, which is then the default log.
    pub fn settle(self, standard_error_is_watched: bool) -> Result<Settings, ConfigError> {
        let at_least = |key: &'static str, v: u64, min: u64| {
            if v < min {
                Err(ConfigError::Bad {
                    key,
                    reason: format!("{v} is below the least allowed, {min}"),
                })
            } else {
                Ok(v)
            }
        };
        let listen = self.listen.ok_or(ConfigError::Missing("listen"))?;
        let reserve = self.reserve.as_deref().unwrap_or(space::DEFAULT_RESERVE);
        let log_file = match self.log_file {
            Some(p) if p.as_os_str() == "-" => None,
            Some(p) => Some(p),
            None if standard_error_is_watched => None,
            None => Some(PathBuf::from(format!(
                "/var/log/mortar/brick-{}.log",
                listen.port()
            ))),
        };
        Ok(Settings {
            data: self.data.ok_or(ConfigError::Missing("data"))?,
            listen,
            cert: self.cert.ok_or(ConfigError::Missing("cert"))?,
            key: self.key.ok_or(ConfigError::Missing("key"))?,
            ca: self.ca.ok_or(ConfigError::Missing("ca"))?,
            snapshot_every: at_least(
                "snapshot-every",
                self.snapshot_every.unwrap_or(raft::SNAPSHOT_EVERY),
                10,
            )?,
            snapshot_bytes: at_least(
                "snapshot-bytes",
                self.snapshot_bytes.unwrap_or(log_bound::SNAPSHOT_BYTES),
                4096,
            )?,
            reserve: reserve.parse().map_err(|reason| ConfigError::Bad {
                key: "reserve",
                reason,
            })?,
            log: self.log.unwrap_or_else(|| "info".into()),
            log_file,
            metrics: self.metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
data = "/srv/bricks/b1"
listen = "10.0.0.1:7001"
cert = "/etc/mortar/brick1.pem"
key = "/etc/mortar/brick1.key"
ca = "/etc/mortar/ca.pem"
reserve = "1G"
log-file = "/var/log/mortar/b1.log"
metrics = "127.0.0.1:9101"
"#;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let file = Keys::parse(FILE).unwrap();
        let flags = Keys {
            listen: Some("127.0.0.1:7101".parse().unwrap()),
            log: Some("debug".into()),
            ..Keys::default()
        };
        let s = flags.over(file).settle(false).unwrap();
        assert_eq!(s.listen, "127.0.0.1:7101".parse().unwrap());
        assert_eq!(s.data, PathBuf::from("/srv/bricks/b1"));
        assert_eq!(s.reserve, Reserve::Bytes(1 << 30));
        assert_eq!(s.log, "debug");
        assert_eq!(s.log_file, Some(PathBuf::from("/var/log/mortar/b1.log")));
        assert_eq!(s.snapshot_every, raft::SNAPSHOT_EVERY);
        assert_eq!(s.metrics, Some("127.0.0.1:9101".parse().unwrap()));
    }

    #[test]
    fn the_log_goes_to_standard_error_when_something_watches_it() {
        let mut keys = Keys::parse(FILE).unwrap();
        keys.log_file = None;
        assert_eq!(keys.clone().settle(true).unwrap().log_file, None);
        assert_eq!(
            keys.clone().settle(false).unwrap().log_file,
            Some(PathBuf::from("/var/log/mortar/brick-7001.log"))
        );
        keys.log_file = Some("-".into());
        assert_eq!(keys.settle(false).unwrap().log_file, None);
    }

    #[test]
    fn errors_name_the_key() {
        let err = Keys::parse("bogus = 1\n").unwrap_err().to_string();
        assert!(err.contains("bogus") && err.contains("listen"), "{err}");
        let err = Keys::parse("snapshot-every = \"often\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("snapshot-every"), "{err}");
        let err = Keys::parse("listen = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen"), "{err}");
        let mut keys = Keys::parse(FILE).unwrap();
        keys.snapshot_every = Some(3);
        let err = keys.clone().settle(true).unwrap_err().to_string();
        assert_eq!(err, "snapshot-every: 3 is below the least allowed, 10");
        keys.snapshot_every = None;
        keys.reserve = Some("lots".into());
        let err = keys.clone().settle(true).unwrap_err().to_string();
        assert!(err.starts_with("reserve: 'lots' is not a size"), "{err}");
        keys.data = None;
        keys.reserve = None;
        let err = keys.settle(true).unwrap_err().to_string();
        assert_eq!(err, "--data (or `data` in the config file) is required");
    }
}
