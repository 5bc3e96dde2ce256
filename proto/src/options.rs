//! Volume options (`mortar volume set|get|reset VOLUME KEY [VALUE]`): the keys, their defaults
//! and checks, in one table. Values are kept as the text the operator gave, in the volume
//! configuration (replicated with the namespace); only keys set differ from their default.

use crate::FsError;
use std::collections::BTreeMap;
use std::time::Duration;

/// One option: its key, default, what it does, and GlusterFS's nearest counterpart.
pub struct Spec {
    pub key: &'static str,
    pub default: &'static str,
    pub help: &'static str,
    pub gluster: &'static str,
    check: fn(&str) -> Result<(), String>,
}

pub const ATTR_TIMEOUT: &str = "cache.attr-timeout";
pub const ENTRY_TIMEOUT: &str = "cache.entry-timeout";
pub const GC_GRACE: &str = "heal.gc-grace";
pub const AUTH_ALLOW: &str = "auth.allow";
pub const SCRUB_RATE: &str = "heal.scrub-rate";

/// Every option there is.
pub const SPECS: &[Spec] = &[
    Spec {
        key: ATTR_TIMEOUT,
        default: "1",
        help: "seconds the kernel may keep a file's attributes before asking the mount again \
               (0 to 86400); applied by running mounts that were not given attr_timeout=",
        gluster: "attribute-timeout (a mount option there)",
        check: seconds,
    },
    Spec {
        key: ENTRY_TIMEOUT,
        default: "1",
        help: "seconds the kernel may keep a name's lookup before asking the mount again \
               (0 to 86400); applied by running mounts that were not given entry_timeout=",
        gluster: "entry-timeout (a mount option there)",
        check: seconds,
    },
    Spec {
        key: GC_GRACE,
        default: "3600",
        help: "seconds a chunk no file names is kept before `volume heal` collects it, \
               unless heal is given --gc-grace",
        gluster: "none (GlusterFS deletes a file's data at once)",
        check: whole_seconds,
    },
    Spec {
        key: SCRUB_RATE,
        default: "64M",
        help: "bytes per second each brick reads while `volume heal --full` scrubs it (a \
               K/M/G suffix; 0 for no limit), unless heal is given --scrub-rate",
        gluster: "none (bitrot's scrub-throttle lazy/normal/aggressive is the nearest)",
        check: byte_rate,
    },
    Spec {
        key: AUTH_ALLOW,
        default: "*",
        help: "client certificate names that may mount, comma-separated, or * for any; \
               clients taken off it are disconnected",
        gluster: "auth.allow (by address there; by certificate name here)",
        check: names,
    },
];

fn names(v: &str) -> Result<(), String> {
    let ok = |n: &str| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if v == "*" || v.split(',').all(ok) {
        Ok(())
    } else {
        Err(
            "want * or certificate names (letters, digits, '.', '-', '_') separated by commas"
                .into(),
        )
    }
}

/// A whole number with an optional unit from `units` (a letter, either case), scaled by it.
pub fn parse_scaled(s: &str, units: &[(char, u64)]) -> Result<u64, String> {
    let s = s.trim();
    let (digits, scale) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let scale = units
                .iter()
                .find(|(u, _)| u.eq_ignore_ascii_case(&c))
                .map(|(_, n)| *n)
                .ok_or_else(|| format!("unknown unit '{c}' in '{s}'"))?;
            (&s[..s.len() - 1], scale)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number with an optional unit"))?;
    n.checked_mul(scale)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// Bytes, with an optional K, M or G (binary) suffix.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_scaled(s, &[('K', 1 << 10), ('M', 1 << 20), ('G', 1 << 30)])
}

fn byte_rate(v: &str) -> Result<(), String> {
    parse_bytes(v).map(|_| ()).map_err(|e| {
        format!("{e}; want bytes per second with an optional K, M or G, such as 64M (0: no limit)")
    })
}

fn seconds(v: &str) -> Result<(), String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => Ok(()),
        _ => Err("want seconds from 0 to 86400, such as 1 or 0.5".into()),
    }
}

fn whole_seconds(v: &str) -> Result<(), String> {
    match v.parse::<u64>() {
        Ok(s) if s <= 365 * 86_400 => Ok(()),
        _ => Err("want whole seconds from 0 to 31536000".into()),
    }
}

pub fn spec(key: &str) -> Option<&'static Spec> {
    SPECS.iter().find(|s| s.key == key)
}

/// Refuse an unknown key (listing the valid ones) or a bad value (saying what is wanted).
pub fn check(key: &str, value: Option<&str>) -> Result<(), FsError> {
    let Some(spec) = spec(key) else {
        let keys: Vec<&str> = SPECS.iter().map(|s| s.key).collect();
        return Err(FsError::Invalid(format!(
            "no volume option {key:?}; the options are: {}",
            keys.join(", ")
        )));
    };
    match value {
        None => Ok(()),
        Some(v) => (spec.check)(v).map_err(|why| FsError::Invalid(format!("{key} {v:?}: {why}"))),
    }
}

/// The options a volume has set (key → value), with typed reads of each.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Options(pub BTreeMap<String, String>);

impl Options {
    /// The value in force: the one set, else the default.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .or_else(|| spec(key).map(|s| s.default))
    }

    fn seconds(&self, key: &str) -> Duration {
        let v = self.get(key).expect("a key of SPECS");
        Duration::from_secs_f64(v.parse().expect("checked when set"))
    }

    pub fn attr_timeout(&self) -> Duration {
        self.seconds(ATTR_TIMEOUT)
    }

    pub fn entry_timeout(&self) -> Duration {
        self.seconds(ENTRY_TIMEOUT)
    }

    /// Whether the client certificate `name` may use the volume.
    pub fn allows(&self, name: &str) -> bool {
        match self.get(AUTH_ALLOW).expect("a key of SPECS") {
            "*" => true,
            list => list.split(',').any(|n| n == name),
        }
    }

    /// Scrub read rate per brick, bytes per second (0: no limit).
    pub fn scrub_rate(&self) -> u64 {
        parse_bytes(self.get(SCRUB_RATE).expect("a key of SPECS")).expect("checked when set")
    }

    pub fn gc_grace_secs(&self) -> u64 {
        self.get(GC_GRACE)
            .expect("a key of SPECS")
            .parse()
            .expect("checked when set")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_hold_until_set_and_every_default_passes_its_own_check() {
        for s in SPECS {
            check(s.key, Some(s.default)).unwrap();
        }
        let mut o = Options::default();
        assert_eq!(o.attr_timeout(), Duration::from_secs(1));
        assert_eq!(o.gc_grace_secs(), 3600);
        assert_eq!(o.scrub_rate(), 64 << 20);
        o.0.insert(SCRUB_RATE.into(), "0".into());
        assert_eq!(o.scrub_rate(), 0);
        assert!(check(SCRUB_RATE, Some("5X")).is_err());
        o.0.insert(ATTR_TIMEOUT.into(), "5".into());
        assert_eq!(o.attr_timeout(), Duration::from_secs(5));
        assert_eq!(o.entry_timeout(), Duration::from_secs(1));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_with_what_is_wanted() {
        let e = check("bogus", Some("1")).unwrap_err().to_string();
        assert!(e.contains("no volume option \"bogus\""), "{e}");
        for s in SPECS {
            assert!(e.contains(s.key), "{e}");
        }
        for bad in ["-1", "nan", "inf", "1e9", "five", ""] {
            let e = check(ATTR_TIMEOUT, Some(bad)).unwrap_err().to_string();
            assert!(e.contains("want seconds"), "{bad}: {e}");
        }
        assert!(check(GC_GRACE, Some("0.5")).is_err());
        for bad in ["", "web1,", "a b", "*,web1"] {
            assert!(check(AUTH_ALLOW, Some(bad)).is_err(), "{bad:?}");
        }
        let mut o = Options::default();
        assert!(o.allows("anyone"));
        o.0.insert(AUTH_ALLOW.into(), "web1,web2".into());
        assert!(o.allows("web2") && !o.allows("web3") && !o.allows("web"));
        check(ATTR_TIMEOUT, None).unwrap();
    }
}
