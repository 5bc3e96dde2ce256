//! Who may talk to this brick: a certificate revoked for the volume (`mortar cert revoke`) is
//! refused whatever its role, and a client must be on the volume's `auth.allow`. Checked when
//! a connection is accepted, and again on every live connection each time a volume
//! configuration is applied, so a revocation or a shorter allow list closes what is open.

use crate::raft::SharedVolume;
use mortar_proto::tls::Role;
use mortar_proto::transport::ACCESS_REFUSED;
use mortar_proto::VolumeConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why `config` refuses a peer with this certificate, if it does. Without a volume there is
/// nothing to refuse (a new brick must accept `volume create`).
pub fn refusal(
    config: Option<&VolumeConfig>,
    role: Role,
    name: &str,
    serial: Option<&str>,
) -> Option<String> {
    let config = config?;
    if let Some(serial) = serial {
        if config.revoked.iter().any(|r| r.serial == serial) {
            return Some(format!(
                "the {role} certificate '{name}' (serial {serial}) is revoked for volume {}",
                config.name
            ));
        }
    }
    if role == Role::Client && !config.options.allows(name) {
        return Some(format!(
            "client '{name}' is not on the allow list (auth.allow) of volume {}",
            config.name
        ));
    }
    None
}

struct Peer {
    role: Role,
    name: String,
    serial: Option<String>,
    conn: quinn::Connection,
}

/// The connections this brick accepted and still serves.
#[derive(Default)]
pub struct Live {
    state: Mutex<(u64, HashMap<u64, Peer>)>,
}

/// An accepted connection, known to [`Live`] until dropped.
pub struct Admitted {
    live: Arc<Live>,
    key: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.live
            .state
            .lock()
            .expect("live lock")
            .1
            .remove(&self.key);
    }
}

impl Live {
    pub fn admit(
        self: &Arc<Self>,
        role: Role,
        name: &str,
        serial: Option<String>,
        conn: &quinn::Connection,
    ) -> Admitted {
        let mut st = self.state.lock().expect("live lock");
        let key = st.0;
        st.0 += 1;
        st.1.insert(
            key,
            Peer {
                role,
                name: name.to_string(),
                serial,
                conn: conn.clone(),
            },
        );
        Admitted {
            live: Arc::clone(self),
            key,
        }
    }

    /// Close every live connection `config` refuses; how many were closed.
    pub fn enforce(&self, config: Option<&VolumeConfig>) -> usize {
        let st = self.state.lock().expect("live lock");
        let mut closed = 0;
        for p in st.1.values() {
            if let Some(why) = refusal(config, p.role, &p.name, p.serial.as_deref()) {
                tracing::warn!(role = %p.role, name = %p.name, "closing a live connection: {why}");
                p.conn.close(ACCESS_REFUSED.into(), why.as_bytes());
                closed += 1;
            }
        }
        closed
    }
}

/// Check live connections again after each volume configuration applied.
pub async fn run(
    live: Arc<Live>,
    volume: SharedVolume,
    mut applied: tokio::sync::watch::Receiver<u64>,
) {
    while applied.changed().await.is_ok() {
        let config = volume.read().expect("volume lock").clone();
        live.enforce(config.as_ref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mortar_proto::options::AUTH_ALLOW;
    use mortar_proto::Revoked;

    #[test]
    fn revoked_certificates_and_clients_off_the_allow_list_are_refused() {
        let mut v = VolumeConfig::new("www", 1 << 20, Vec::new(), Default::default());
        assert_eq!(refusal(None, Role::Client, "web1", Some("01")), None);
        assert_eq!(refusal(Some(&v), Role::Client, "web1", Some("01")), None);
        v.options.0.insert(AUTH_ALLOW.into(), "web1".into());
        assert_eq!(refusal(Some(&v), Role::Client, "web1", Some("01")), None);
        let off = refusal(Some(&v), Role::Client, "web2", Some("02")).unwrap();
        assert_eq!(
            off,
            "client 'web2' is not on the allow list (auth.allow) of volume www"
        );
        assert_eq!(
            refusal(Some(&v), Role::Admin, "web2", Some("02")),
            None,
            "the allow list is for clients"
        );
        v.revoked.push(Revoked {
            serial: "03".into(),
            name: "brick3".into(),
        });
        let revoked = refusal(Some(&v), Role::Brick, "brick3", Some("03")).unwrap();
        assert!(revoked.contains("revoked for volume www"), "{revoked}");
    }
}
