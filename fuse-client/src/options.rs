//! Mount source and `-o` options, parsed the way `mount(8)` and `/etc/fstab` pass them.

use std::path::PathBuf;
use std::time::Duration;

/// Port assumed for a brick given without one.
pub const DEFAULT_BRICK_PORT: u16 = 7001;

#[derive(Debug, PartialEq, Eq)]
pub struct Source {
    pub bricks: Vec<String>,
    pub volume: String,
    /// `VOLUME@SNAPSHOT`: mount that snapshot, read-only.
    pub snapshot: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("bad source '{0}': expected HOST[:PORT][,HOST[:PORT]...]:/VOLUME[@SNAPSHOT]")]
    Source(String),
    #[error("unknown mount option '{0}'")]
    Unknown(String),
    #[error("bad value for mount option '{0}'")]
    Value(String),
}

/// `h1,h2:7002,h3:/www` -> bricks with ports, volume `www`.
pub fn parse_source(s: &str) -> Result<Source, OptionError> {
    let bad = || OptionError::Source(s.to_string());
    let (hosts, volume) = s.rsplit_once(":/").ok_or_else(bad)?;
    if volume.is_empty() || volume.contains('/') || hosts.is_empty() {
        return Err(bad());
    }
    let mut bricks = Vec::new();
    for h in hosts.split(',') {
        if h.is_empty() {
            return Err(bad());
        }
        let with_port = match h.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => h.to_string(),
            Some(_) => return Err(bad()),
            None => format!("{h}:{DEFAULT_BRICK_PORT}"),
        };
        bricks.push(with_port);
    }
    let (volume, snapshot) = match volume.split_once('@') {
        Some((v, snap)) if !v.is_empty() && !snap.is_empty() => (v, Some(snap.to_string())),
        Some(_) => return Err(bad()),
        None => (volume, None),
    };
    Ok(Source {
        bricks,
        volume: volume.to_string(),
        snapshot,
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct MountOptions {
    pub read_only: bool,
    pub allow_other: bool,
    pub default_permissions: bool,
    /// None: the volume's `cache.attr-timeout`, followed as it changes.
    pub attr_timeout: Option<Duration>,
    /// None: the volume's `cache.entry-timeout`.
    pub entry_timeout: Option<Duration>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub log: Option<PathBuf>,
    /// How long mounting may take to reach the volume before it fails.
    pub connect_timeout: Duration,
    /// How long an operation keeps retrying while no brick can serve it (all bricks away)
    /// before it fails with ENOTCONN; never forever.
    pub op_timeout: Duration,
    /// Mount this snapshot of the volume, read-only (`-o snapshot=NAME`, or `VOLUME@NAME`).
    pub snapshot: Option<String>,
    /// Serve Prometheus metrics on this TCP address (`-o metrics=127.0.0.1:9102`).
    pub metrics: Option<std::net::SocketAddr>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            read_only: false,
            // A document root is read by the web server's own user (www-data), not by the
            // user who mounted it: every user may enter, and the kernel checks permissions
            // (default_permissions), as GlusterFS's mounts do.
            allow_other: true,
            default_permissions: true,
            attr_timeout: None,
            entry_timeout: None,
            cert: PathBuf::from("/etc/mortar/client.pem"),
            key: PathBuf::from("/etc/mortar/client.key"),
            ca: PathBuf::from("/etc/mortar/ca.pem"),
            log: None,
            connect_timeout: Duration::from_secs(20),
            op_timeout: mortar_client::DEFAULT_OP_TIMEOUT,
            snapshot: None,
            metrics: None,
        }
    }
}

fn seconds(key: &str, v: &str) -> Result<Duration, OptionError> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 86_400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| OptionError::Value(format!("{key}={v}")))
}

/// Apply a comma-separated `-o` list on top of `opts`.
pub fn parse_options(list: &str, opts: &mut MountOptions) -> Result<(), OptionError> {
    for item in list.split(',').filter(|s| !s.is_empty()) {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let need = || {
            value
                .filter(|v| !v.is_empty())
                .ok_or_else(|| OptionError::Value(item.to_string()))
        };
        match key {
            "ro" => opts.read_only = true,
            "rw" => opts.read_only = false,
            "allow_other" => opts.allow_other = true,
            "no_allow_other" => opts.allow_other = false,
            "default_permissions" => opts.default_permissions = true,
            "no_default_permissions" => opts.default_permissions = false,
            "attr_timeout" => opts.attr_timeout = Some(seconds(key, need()?)?),
            "entry_timeout" => opts.entry_timeout = Some(seconds(key, need()?)?),
            "cert" => opts.cert = PathBuf::from(need()?),
            "key" => opts.key = PathBuf::from(need()?),
            "ca" => opts.ca = PathBuf::from(need()?),
            "log" => opts.log = Some(PathBuf::from(need()?)),
            "connect_timeout" => opts.connect_timeout = seconds(key, need()?)?,
            "op_timeout" => opts.op_timeout = seconds(key, need()?)?,
            "snapshot" => opts.snapshot = Some(need()?.to_string()),
            "metrics" => {
                let v = need()?;
                let addr = v
                    .parse()
                    .map_err(|_| OptionError::Value(format!("{key}={v} (want IP:PORT)")))?;
                opts.metrics = Some(addr);
            }
            // Options mount(8), fstab and systemd pass that concern them, not us.
            "defaults" | "_netdev" | "auto" | "noauto" | "nofail" | "user" | "nouser" | "users"
            | "owner" | "exec" | "noexec" | "suid" | "nosuid" | "dev" | "nodev" | "atime"
            | "noatime" | "relatime" | "async" => {}
            k if k.starts_with("x-") || k.starts_with("comment=") => {}
            _ => return Err(OptionError::Unknown(item.to_string())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        let s = parse_source("h1,h2:7005,10.0.0.3:/www").unwrap();
        assert_eq!(s.bricks, ["h1:7001", "h2:7005", "10.0.0.3:7001"]);
        assert_eq!(s.volume, "www");
        assert_eq!(s.snapshot, None);
        let s = parse_source("h1:/www@before").unwrap();
        assert_eq!(
            (s.volume.as_str(), s.snapshot.as_deref()),
            ("www", Some("before"))
        );
        for bad in [
            "h1:/",
            ":/www",
            "h1",
            "h1,,h2:/www",
            "h1:x:/www",
            "h1:/a/b",
            "h1:/www@",
            "h1:/@x",
        ] {
            assert!(parse_source(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options() {
        let mut o = MountOptions::default();
        parse_options(
            "ro,_netdev,attr_timeout=0.5,cert=/c.pem,x-systemd.automount",
            &mut o,
        )
        .unwrap();
        assert!(o.read_only);
        assert!(o.allow_other && o.default_permissions);
        parse_options("no_allow_other", &mut o).unwrap();
        assert!(!o.allow_other);
        assert_eq!(o.attr_timeout, Some(Duration::from_millis(500)));
        assert_eq!(o.entry_timeout, None);
        assert_eq!(o.cert, PathBuf::from("/c.pem"));
        assert_eq!(
            parse_options("bogus", &mut o),
            Err(OptionError::Unknown("bogus".into()))
        );
        assert!(parse_options("attr_timeout=-1", &mut o).is_err());
        assert!(parse_options("cert=", &mut o).is_err());
        parse_options("metrics=127.0.0.1:9104", &mut o).unwrap();
        assert_eq!(o.metrics, Some("127.0.0.1:9104".parse().unwrap()));
        assert_eq!(
            parse_options("metrics=localhost", &mut o),
            Err(OptionError::Value(
                "metrics=localhost (want IP:PORT)".into()
            ))
        );
    }
}
