//! The volume CA, certificates whose role the servers read from them, and rustls/quinn
//! configurations for mutual TLS.
//!
//! A certificate's role is its subject's organizational unit (`mortar-brick`, `mortar-client`,
//! `mortar-admin`); its name is the common name. Brick certificates also carry the DNS name
//! [`BRICK_SERVER_NAME`], which clients verify, so only a brick can answer as a brick.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The name every brick certificate holds and every client verifies.
pub const BRICK_SERVER_NAME: &str = "mortar-brick";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Brick,
    Client,
    Admin,
}

impl Role {
    fn unit(self) -> &'static str {
        match self {
            Role::Brick => "mortar-brick",
            Role::Client => "mortar-client",
            Role::Admin => "mortar-admin",
        }
    }
    fn from_unit(unit: &str) -> Option<Role> {
        [Role::Brick, Role::Client, Role::Admin]
            .into_iter()
            .find(|r| r.unit() == unit)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Brick => "brick",
            Role::Client => "client",
            Role::Admin => "admin",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Role, TlsError> {
        match s {
            "brick" => Ok(Role::Brick),
            "client" => Ok(Role::Client),
            "admin" => Ok(Role::Admin),
            other => Err(TlsError::BadRole(other.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("cannot write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("{path} holds no usable {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("unknown role '{0}' (expected brick, client or admin)")]
    BadRole(String),
    #[error("invalid certificate name '{0}' (use letters, digits, '.', '-', '_')")]
    BadName(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Config(String),
    #[error("peer certificate has no mortar role")]
    NoRole,
}

/// What a process presents and trusts: its certificate chain and key, and the volume CA.
#[derive(Clone)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    pub ca: CertificateDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|err| TlsError::Read {
        path: path.to_path_buf(),
        err,
    })
}

fn certs_from(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

impl Identity {
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Identity, TlsError> {
        let chain = certs_from(cert)?;
        let key_pem = read(key)?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .ok()
            .flatten()
            .ok_or(TlsError::Pem {
                path: key.to_path_buf(),
                what: "private key",
            })?;
        let ca = certs_from(ca)?.remove(0);
        Ok(Identity {
            chain,
            key: Arc::new(key),
            ca,
        })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| TlsError::Config(format!("bad CA certificate: {e}")))?;
        Ok(Arc::new(roots))
    }

    /// Server side: every peer must present a certificate issued by the volume CA.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![crate::wire::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(crate::transport::transport_config()));
        Ok(config)
    }

    /// Client side: present our certificate, trust only bricks of the volume CA.
    pub fn client_config(&self) -> Result<quinn::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![crate::wire::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(crate::transport::transport_config()));
        Ok(config)
    }
}

/// The role and name in a verified peer certificate.
pub fn peer_identity(conn: &quinn::Connection) -> Result<(Role, String), TlsError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(TlsError::NoRole)?;
    let leaf = certs.first().ok_or(TlsError::NoRole)?;
    role_of(leaf)
}

/// The serial number of a verified peer's certificate (see [`serial_of`]).
pub fn peer_serial(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    serial_of(certs.first()?)
}

/// A certificate's serial number in lowercase hex, without separators: what
/// `mortar cert revoke` records and bricks compare.
pub fn serial_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(
        parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// The serial number and name of the certificate in the PEM file `path`.
pub fn file_serial(path: &Path) -> Result<(String, String), TlsError> {
    let cert = certs_from(path)?.remove(0);
    let bad = || TlsError::Pem {
        path: path.to_path_buf(),
        what: "certificate",
    };
    let (_, name) = role_of(&cert).map_err(|_| bad())?;
    Ok((serial_of(&cert).ok_or_else(bad)?, name))
}

pub fn role_of(cert: &CertificateDer<'_>) -> Result<(Role, String), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|_| TlsError::NoRole)?;
    let subject = parsed.subject();
    let role = subject
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .find_map(Role::from_unit)
        .ok_or(TlsError::NoRole)?;
    let name = subject
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .next()
        .unwrap_or("")
        .to_string();
    Ok((role, name))
}

fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|err| {
            if err.kind() == std::io::ErrorKind::AlreadyExists {
                TlsError::Exists(path.to_path_buf())
            } else {
                TlsError::Write {
                    path: path.to_path_buf(),
                    err,
                }
            }
        })?;
    file.write_all(contents.as_bytes())
        .map_err(|err| TlsError::Write {
            path: path.to_path_buf(),
            err,
        })
}

pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

/// Create a volume CA in `dir` (ca.pem, ca.key). Refuses to overwrite an existing one.
pub fn ca_init(dir: &Path, name: &str) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|err| TlsError::Write {
        path: dir.to_path_buf(),
        err,
    })?;
    for p in [ca_cert_path(dir), ca_key_path(dir)] {
        if p.exists() {
            return Err(TlsError::Exists(p));
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = time::OffsetDateTime::now_utc() - Duration::from_secs(3600);
    params.not_after = time::OffsetDateTime::now_utc() + Duration::from_secs(20 * 365 * 86400);
    let cert = params.self_signed(&key)?;
    write_new(&ca_key_path(dir), &key.serialize_pem(), true)?;
    write_new(&ca_cert_path(dir), &cert.pem(), false)
}

/// Validity of an issued certificate, relative to now. Negative days make an expired one
/// (useful only to test that it is refused).
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub days: i64,
}

/// Issue a certificate for `name` with `role`, signed by the CA in `ca_dir`; writes
/// `out_dir/NAME.pem` and `out_dir/NAME.key` and returns their paths.
pub fn issue(
    ca_dir: &Path,
    role: Role,
    name: &str,
    validity: Validity,
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf), TlsError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return Err(TlsError::BadName(name.to_string()));
    }
    let ca_key_pem = String::from_utf8_lossy(&read(&ca_key_path(ca_dir))?).into_owned();
    let ca_cert_pem = String::from_utf8_lossy(&read(&ca_cert_path(ca_dir))?).into_owned();
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|_| TlsError::Pem {
        path: ca_key_path(ca_dir),
        what: "CA key",
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)?;

    let mut sans = vec![name.to_string()];
    if role == Role::Brick {
        sans.push(BRICK_SERVER_NAME.to_string());
    }
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, role.unit());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    if validity.days > 0 {
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + Duration::from_secs(validity.days as u64 * 86400);
    } else {
        let back = Duration::from_secs((1 - validity.days) as u64 * 86400);
        params.not_before = now - back - Duration::from_secs(86400);
        params.not_after = now - back;
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out_dir).map_err(|err| TlsError::Write {
        path: out_dir.to_path_buf(),
        err,
    })?;
    let cert_path = out_dir.join(format!("{name}.pem"));
    let key_path = out_dir.join(format!("{name}.key"));
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_role() {
        let dir = tempfile::tempdir().unwrap();
        ca_init(dir.path(), "test-ca").unwrap();
        assert!(matches!(
            ca_init(dir.path(), "again"),
            Err(TlsError::Exists(_))
        ));
        let (cert, key) = issue(
            dir.path(),
            Role::Admin,
            "ops",
            Validity { days: 30 },
            dir.path(),
        )
        .unwrap();
        let id = Identity::load(&cert, &key, &ca_cert_path(dir.path())).unwrap();
        assert_eq!(role_of(&id.chain[0]).unwrap(), (Role::Admin, "ops".into()));
        assert!(id.server_config().is_ok());
        assert!(id.client_config().is_ok());
        assert!(matches!(
            issue(
                dir.path(),
                Role::Client,
                "a/b",
                Validity { days: 1 },
                dir.path()
            ),
            Err(TlsError::BadName(_))
        ));
    }
}
