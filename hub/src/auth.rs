//! Who may do what: device credentials and operator roles. The policy
//! lives here once; the gRPC doors only carry what a client presented.
//!
//! Devices (`auth.devices`):
//! - `open`: any Hello is accepted (loopback only, unless `auth.allow_open`).
//! - `token`: Hello.token must be the device's own token (`hub devices
//!   add`), whose SHA-256 is stored, or a fleet token: lowercase hex of
//!   HMAC-SHA256(fleet key, device_id) for one of `auth.fleet_keys`.
//! - `tls`: the client certificate must name the device id in exactly one
//!   place, `auth.tls_identity` (its CN, a DNS SAN or a URI SAN), and name
//!   no other id there. An operator may pin a device to one certificate
//!   (its SHA-256) and revoke certificates: a revoked one is refused
//!   whatever device it names, also after the device is removed and added
//!   again.
//!
//! Tokens are 256 random bits, so a plain SHA-256 is enough to keep them
//! from being read back from the database: nothing can be brute-forced, and
//! a slow password hash (argon2) would cost tens of milliseconds of CPU per
//! Hello, minutes for a reconnect storm of 10,000 devices on two cores.
//! Every comparison is constant-time.
//!
//! Operators present `authorization: Bearer <token>`; each of
//! `auth.operator_tokens` has a name and a role: `read` queries, lists,
//! watches and reads stats; `admin` may also send and cancel commands,
//! manage devices and take backups. With no operator tokens configured the
//! Operator API is open (loopback only, unless `auth.allow_open`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::config::{AuthSettings, DeviceAuthMode, TlsIdentity};
/// Plain types (in `domain`, so the store can hold them without knowing
/// the policy).
pub use crate::domain::{Proof, StoredCredentials};

type HmacSha256 = Hmac<Sha256>;

/// What an operator may do (`Read < Admin`).
pub use crate::config::OperatorRole as Role;

/// An authenticated operator: the token's name (logged), never its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing or invalid credentials")]
    Unauthenticated,
    #[error("the {role:?} role may not call {method}")]
    Forbidden { role: Role, method: String },
}

/// The role an Operator method needs. Unknown methods need admin.
pub fn required_role(method: &str) -> Role {
    match method {
        "QueryReadings" | "ListDevices" | "GetHubStats" | "WatchReadings" | "GetCommand"
        | "ListCommands" | "WatchCommand" | "GetTwin" | "WatchTwin" | "ListAlarmRules"
        | "ListAlarms" | "WatchAlarms" | "ListJobs" | "GetJob" | "ListJobDevices" => Role::Read,
        _ => Role::Admin,
    }
}

/// A new device token: 32 random bytes, lowercase hex.
pub fn new_device_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// What is stored of a device token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The token a fleet key gives a device: lowercase hex of
/// HMAC-SHA256(key, device_id).
pub fn fleet_token(key: &str, device_id: &str) -> String {
    hex::encode(fleet_mac(key, device_id).finalize().into_bytes())
}

/// HMAC-SHA256(key, device_id), ready to finalize or verify.
fn fleet_mac(key: &str, device_id: &str) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes keys of any size");
    mac.update(device_id.as_bytes());
    mac
}

/// The hub's auth settings, ready to check.
pub struct AuthPolicy {
    pub devices: DeviceAuthMode,
    tls_identity: TlsIdentity,
    fleet_keys: Vec<(String, String)>,
    operators: Vec<(String, [u8; 32], Role)>,
}

/// Why a Hello was refused: for the hub's log. The device is told only
/// "invalid device credentials", whatever the reason, so nobody learns
/// which devices exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("wrong or missing token")]
    BadToken,
    #[error("the device was removed by an operator")]
    Removed,
    #[error("no client certificate")]
    NoCertificate,
    #[error("the client certificate cannot be read")]
    UnreadableCertificate,
    #[error("the client certificate names no device in its {0:?}")]
    NoIdentity(TlsIdentity),
    #[error("the client certificate names {0} devices in its {1:?}; it must name one")]
    SeveralIdentities(usize, TlsIdentity),
    #[error("the client certificate names {named:?}, not this device")]
    OtherDevice { named: String },
    #[error("the client certificate is revoked")]
    Revoked,
    #[error("the device is pinned to another certificate")]
    NotPinned,
}

/// What a device presented with its Hello.
#[derive(Debug, Clone, Copy)]
pub struct Presented<'a> {
    pub device_id: &'a str,
    pub token: &'a str,
    /// The client certificate (leaf, DER), under TLS with client auth.
    pub certificate: Option<&'a [u8]>,
}

/// The SHA-256 of a certificate (DER): what pins and revocations name.
pub fn certificate_sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

impl AuthPolicy {
    pub fn new(settings: &AuthSettings) -> Self {
        Self {
            devices: settings.devices,
            tls_identity: settings.tls_identity,
            fleet_keys: settings
                .fleet_keys
                .iter()
                .map(|(name, key)| (name.clone(), key.clone()))
                .collect(),
            operators: settings
                .operator_tokens
                .iter()
                .map(|t| (t.name.clone(), token_hash(&t.token), t.role))
                .collect(),
        }
    }

    /// True when the Operator API asks for no token.
    pub fn operators_open(&self) -> bool {
        self.operators.is_empty()
    }

    /// Who is calling `method` with this bearer token, if allowed.
    /// `Ok(None)`: no operator tokens are configured (open API).
    pub fn operator(
        &self,
        bearer: Option<&str>,
        method: &str,
    ) -> Result<Option<Operator>, AuthError> {
        self.authorize(bearer, required_role(method), method)
    }

    /// Who is doing `what`, which needs the role `needed`, with this bearer
    /// token, if allowed. `Ok(None)`: no operator tokens are configured.
    pub fn authorize(
        &self,
        bearer: Option<&str>,
        needed: Role,
        what: &str,
    ) -> Result<Option<Operator>, AuthError> {
        if self.operators.is_empty() {
            return Ok(None);
        }
        let presented = token_hash(bearer.unwrap_or_default());
        // Every configured token is compared, matched or not.
        let mut found: Option<(&str, Role)> = None;
        for (name, hash, role) in &self.operators {
            if bool::from(hash.ct_eq(&presented)) && bearer.is_some() {
                found = Some((name, *role));
            }
        }
        let (name, role) = found.ok_or(AuthError::Unauthenticated)?;
        if role < needed {
            return Err(AuthError::Forbidden {
                role,
                method: what.to_owned(),
            });
        }
        Ok(Some(Operator {
            name: name.to_owned(),
            role,
        }))
    }

    /// May this Hello become a session, by `auth.devices`? What it proved
    /// (checked again when the writer registers it), or why not.
    pub fn admit(
        &self,
        presented: Presented<'_>,
        stored: StoredCredentials,
    ) -> Result<Proof, Refusal> {
        match self.devices {
            DeviceAuthMode::Open if stored.removed => Err(Refusal::Removed),
            DeviceAuthMode::Open => Ok(Proof::Admitted),
            DeviceAuthMode::Token => self
                .device_token_proof(presented.device_id, presented.token, stored)
                .ok_or(if stored.removed {
                    Refusal::Removed
                } else {
                    Refusal::BadToken
                }),
            DeviceAuthMode::Tls => {
                let der = presented.certificate.ok_or(Refusal::NoCertificate)?;
                let named = certificate_identity(der, self.tls_identity)?;
                if named != presented.device_id {
                    return Err(Refusal::OtherDevice { named });
                }
                let sha256 = certificate_sha256(der);
                if stored.removed {
                    Err(Refusal::Removed)
                } else if stored.cert_revoked {
                    Err(Refusal::Revoked)
                } else if stored.cert_sha256.is_some_and(|pin| pin != sha256) {
                    Err(Refusal::NotPinned)
                } else {
                    Ok(Proof::Certificate(sha256))
                }
            }
        }
    }

    /// What `token` proves of `device_id` under `auth.devices = token`
    /// (None: nothing). The same work and the same answer whether or not the
    /// device exists.
    pub fn device_token_proof(
        &self,
        device_id: &str,
        token: &str,
        stored: StoredCredentials,
    ) -> Option<Proof> {
        let own = stored
            .token_sha256
            .is_some_and(|hash| bool::from(hash.ct_eq(&token_hash(token))));
        let mut fleet = false;
        let presented = hex::decode(token).unwrap_or_default();
        for (_, key) in &self.fleet_keys {
            fleet |= fleet_mac(key, device_id).verify_slice(&presented).is_ok();
        }
        match stored.token_sha256 {
            _ if stored.removed => None,
            Some(hash) if own => Some(Proof::OwnToken(hash)),
            None if fleet => Some(Proof::FleetToken),
            _ => None,
        }
    }
}

/// The one device id a client certificate names in `place` (`der` is the
/// leaf): none there, or more than one (a certificate for several devices
/// would let one leak cost them all), is a refusal.
pub fn certificate_identity(der: &[u8], place: TlsIdentity) -> Result<String, Refusal> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| Refusal::UnreadableCertificate)?;
    let mut ids: Vec<&str> = match place {
        TlsIdentity::Cn => cert
            .subject()
            .iter_common_name()
            .map(|cn| cn.as_str().map_err(|_| Refusal::UnreadableCertificate))
            .collect::<Result<_, _>>()?,
        TlsIdentity::SanDns | TlsIdentity::SanUri => cert
            .subject_alternative_name()
            .map_err(|_| Refusal::UnreadableCertificate)?
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|name| match (name, place) {
                        (GeneralName::DNSName(n), TlsIdentity::SanDns)
                        | (GeneralName::URI(n), TlsIdentity::SanUri) => Some(*n),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    };
    ids.sort_unstable();
    ids.dedup();
    match ids.as_slice() {
        [] => Err(Refusal::NoIdentity(place)),
        [one] => Ok((*one).to_owned()),
        several => Err(Refusal::SeveralIdentities(several.len(), place)),
    }
}

/// Counts failed device authentications per peer address; past the limit
/// within a minute, further failures from that address are answered
/// RESOURCE_EXHAUSTED (valid credentials still get in). Bounded: at most
/// `MAX_PEERS` addresses are remembered (the oldest windows go first).
pub struct FailureLimiter {
    per_minute: u32,
    peers: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

const MAX_PEERS: usize = 10_000;
const WINDOW: Duration = Duration::from_secs(60);

impl FailureLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            peers: Mutex::default(),
        }
    }

    /// May this address try now?
    pub fn allowed(&self, peer: Option<IpAddr>) -> bool {
        let Some(peer) = peer else { return true };
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers.get(&peer).is_none_or(|(since, failures)| {
            since.elapsed() >= WINDOW || *failures < self.per_minute
        })
    }

    pub fn failed(&self, peer: Option<IpAddr>) {
        let Some(peer) = peer else { return };
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, (since, _)| since.elapsed() < WINDOW);
            // Still full: the address whose window is oldest makes room.
            if peers.len() >= MAX_PEERS
                && let Some(oldest) = peers
                    .iter()
                    .min_by_key(|(_, (since, _))| *since)
                    .map(|(ip, _)| *ip)
            {
                peers.remove(&oldest);
            }
        }
        let entry = peers.entry(peer).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OperatorRole, OperatorToken};

    fn policy(devices: DeviceAuthMode) -> AuthPolicy {
        AuthPolicy::new(&AuthSettings {
            devices,
            tls_identity: TlsIdentity::Cn,
            allow_open: false,
            fleet_keys: [("lab".to_owned(), "k-lab".to_owned())]
                .into_iter()
                .collect(),
            operator_tokens: vec![
                OperatorToken {
                    name: "ops".into(),
                    token: "admin-secret".into(),
                    role: OperatorRole::Admin,
                },
                OperatorToken {
                    name: "dash".into(),
                    token: "read-secret".into(),
                    role: OperatorRole::Read,
                },
            ],
            max_failures_per_minute: 10,
            allow_plaintext: false,
        })
    }

    #[test]
    fn device_tokens_own_fleet_and_removed() {
        let p = policy(DeviceAuthMode::Token);
        let own = new_device_token();
        assert_eq!(own.len(), 64);
        let enrolled = StoredCredentials {
            token_sha256: Some(token_hash(&own)),
            ..Default::default()
        };
        let ok = |id: &str, token: &str, stored| p.device_token_proof(id, token, stored);
        assert_eq!(
            ok("d1", &own, enrolled),
            Some(Proof::OwnToken(token_hash(&own)))
        );
        assert_eq!(ok("d1", "wrong", enrolled), None);
        let fleet = fleet_token("k-lab", "d2");
        assert_eq!(
            ok("d2", &fleet, StoredCredentials::default()),
            Some(Proof::FleetToken)
        );
        assert_eq!(
            ok("d3", &fleet, StoredCredentials::default()),
            None,
            "for d2 only"
        );
        assert_eq!(
            ok("d1", &fleet_token("k-lab", "d1"), enrolled),
            None,
            "own token wins"
        );
        let removed = StoredCredentials {
            removed: true,
            ..Default::default()
        };
        assert_eq!(ok("d2", &fleet, removed), None);
        assert_eq!(ok("d2", "", StoredCredentials::default()), None);
    }

    /// A certificate (DER) with this CN and SANs.
    fn certificate(cn: &str, sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_certificate_names_one_device_in_one_place() {
        use rcgen::SanType;
        let dns = |n: &str| SanType::DnsName(n.try_into().unwrap());
        let uri = |n: &str| SanType::URI(n.try_into().unwrap());
        let broad = certificate("dev-a", vec![dns("dev-b"), uri("dev-c")]);
        let id = |der: &[u8], place| certificate_identity(der, place);
        assert_eq!(id(&broad, TlsIdentity::Cn), Ok("dev-a".into()));
        assert_eq!(id(&broad, TlsIdentity::SanDns), Ok("dev-b".into()));
        assert_eq!(id(&broad, TlsIdentity::SanUri), Ok("dev-c".into()));
        let two = certificate("x", vec![dns("dev-e"), dns("dev-f")]);
        assert_eq!(
            id(&two, TlsIdentity::SanDns),
            Err(Refusal::SeveralIdentities(2, TlsIdentity::SanDns))
        );
        assert_eq!(
            id(&certificate("a", vec![]), TlsIdentity::SanUri),
            Err(Refusal::NoIdentity(TlsIdentity::SanUri))
        );
        assert_eq!(
            id(b"not a certificate", TlsIdentity::Cn),
            Err(Refusal::UnreadableCertificate)
        );
    }

    #[test]
    fn tls_admits_the_named_device_unless_revoked_or_pinned_elsewhere() {
        let p = policy(DeviceAuthMode::Tls);
        let der = certificate("dev-t", vec![]);
        let sha256 = certificate_sha256(&der);
        let presented = |id| Presented {
            device_id: id,
            token: "",
            certificate: Some(&der),
        };
        let stored = StoredCredentials::default();
        assert_eq!(
            p.admit(presented("dev-t"), stored),
            Ok(Proof::Certificate(sha256))
        );
        assert!(matches!(
            p.admit(presented("dev-u"), stored),
            Err(Refusal::OtherDevice { .. })
        ));
        let revoked = StoredCredentials {
            cert_revoked: true,
            ..stored
        };
        assert_eq!(p.admit(presented("dev-t"), revoked), Err(Refusal::Revoked));
        let pinned_elsewhere = StoredCredentials {
            cert_sha256: Some([7; 32]),
            ..stored
        };
        assert_eq!(
            p.admit(presented("dev-t"), pinned_elsewhere),
            Err(Refusal::NotPinned)
        );
        let pinned_here = StoredCredentials {
            cert_sha256: Some(sha256),
            ..stored
        };
        assert!(p.admit(presented("dev-t"), pinned_here).is_ok());
        let none = Presented {
            certificate: None,
            ..presented("dev-t")
        };
        assert_eq!(p.admit(none, stored), Err(Refusal::NoCertificate));
    }

    #[test]
    fn operator_roles() {
        let p = policy(DeviceAuthMode::Open);
        let ops = p
            .operator(Some("admin-secret"), "SendCommand")
            .unwrap()
            .unwrap();
        assert_eq!((ops.name.as_str(), ops.role), ("ops", Role::Admin));
        assert!(
            p.operator(Some("read-secret"), "ListDevices")
                .unwrap()
                .is_some()
        );
        assert!(matches!(
            p.operator(Some("read-secret"), "SendCommand"),
            Err(AuthError::Forbidden { .. })
        ));
        assert_eq!(
            p.operator(None, "ListDevices"),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(
            p.operator(Some("nope"), "ListDevices"),
            Err(AuthError::Unauthenticated)
        );
        assert_eq!(required_role("SomethingNew"), Role::Admin);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_limited_per_address() {
        let limiter = FailureLimiter::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(limiter.allowed(Some(a)));
            limiter.failed(Some(a));
        }
        assert!(!limiter.allowed(Some(a)));
        assert!(limiter.allowed(Some(b)), "another address is not affected");
        tokio::time::advance(WINDOW).await;
        assert!(limiter.allowed(Some(a)), "the window passed");
    }
}
