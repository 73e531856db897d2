//! Typed settings, layered: `config/default.toml` (embedded) < `--config FILE`
//! < `HUB__SECTION__KEY` environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Serialize};

/// The defaults, compiled in so the binary runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The config crate's message (not kept as a source: printed once).
    #[error("cannot load settings: {0}")]
    Load(String),
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Settings whose values are secrets (or hold one): an error about them
/// never quotes the value.
fn is_secret_key(key: &str) -> bool {
    [
        "auth.operator_tokens",
        "auth.fleet_keys",
        "mqtt.password",
        "storage.url",
        "alarms.webhooks",
    ]
    .iter()
    .any(|secret| key.starts_with(secret))
}

/// An error about a secret setting without its value: serde quotes the
/// value it could not take (`invalid type: string "s3cret", expected ...`),
/// escaped quotes and all; only what was expected, and where, is kept.
/// (The last ", expected" and "for key `" are serde's and config's own: the
/// value comes before them.)
fn mask_quoted(message: &str) -> String {
    const HIDDEN: &str = "invalid value (not shown: it may be a secret)";
    if let Some(at) = message.rfind(", expected") {
        format!("{HIDDEN}{}", &message[at..])
    } else if let Some(at) = message.rfind("for key `") {
        format!("{HIDDEN} {}", &message[at..])
    } else {
        HIDDEN.to_owned()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub auth: AuthSettings,
    pub ingest: IngestSettings,
    pub storage: StorageSettings,
    pub commands: CommandsSettings,
    pub twin: TwinSettings,
    pub alarms: AlarmSettings,
    pub mqtt: MqttSettings,
    pub metrics: MetricsSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

/// What a twin document may be, and how far a twin watcher may fall
/// behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwinSettings {
    pub max_document_bytes: usize,
    pub max_depth: usize,
    pub max_key_bytes: usize,
    pub events_capacity: usize,
}

impl TwinSettings {
    pub fn limits(&self) -> crate::twin::DocLimits {
        crate::twin::DocLimits {
            max_bytes: self.max_document_bytes,
            max_depth: self.max_depth,
            max_key_bytes: self.max_key_bytes,
        }
    }
}

/// Alarms: history kept, how often inactivity is checked, where
/// notifications go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmSettings {
    /// Cleared alarms (and finished deliveries) older than this are
    /// deleted (0s keeps them).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often inactivity rules are checked and the outbox is looked at.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Alarm events a watcher (SSE, MQTT, WatchAlarms) may fall behind by.
    pub events_capacity: usize,
    pub webhooks: Vec<Webhook>,
}

/// Where alarm notifications are POSTed.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub name: String,
    pub url: String,
    /// Signs each body: `X-Hub-Signature-256: sha256=hex(HMAC-SHA256(secret, body))`.
    pub secret: String,
    /// One attempt's time limit.
    #[serde(default = "webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A notification not delivered within this is given up (logged as
    /// failed in the delivery log).
    #[serde(default = "webhook_max_age", with = "humantime_serde")]
    pub max_age: Duration,
}

fn webhook_timeout() -> Duration {
    Duration::from_secs(5)
}

fn webhook_max_age() -> Duration {
    Duration::from_secs(86_400)
}

/// Written by hand so no secret reaches a log.
impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &masked_url(&self.url))
            .field("timeout", &self.timeout)
            .field("max_age", &self.max_age)
            .finish()
    }
}

/// The one place of a client certificate that names its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsIdentity {
    /// The subject's common name.
    Cn,
    /// A DNS name among the subject alternative names.
    SanDns,
    /// A URI among the subject alternative names.
    SanUri,
}

/// How devices prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceAuthMode {
    Open,
    Token,
    Tls,
}

/// What an operator token may do; ordered, `Read < Admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorRole {
    Read,
    Admin,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorToken {
    pub name: String,
    pub token: String,
    pub role: OperatorRole,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub devices: DeviceAuthMode,
    /// Where a client certificate names its device (auth.devices = "tls").
    pub tls_identity: TlsIdentity,
    pub allow_open: bool,
    /// Group enrollment: name -> secret.
    pub fleet_keys: std::collections::BTreeMap<String, String>,
    pub operator_tokens: Vec<OperatorToken>,
    pub max_failures_per_minute: u32,
    /// Tokens on a non-loopback address without TLS.
    pub allow_plaintext: bool,
}

/// Written by hand so no secret reaches a log.
impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("devices", &self.devices)
            .field("tls_identity", &self.tls_identity)
            .field("allow_open", &self.allow_open)
            .field("fleet_keys", &self.fleet_keys.keys().collect::<Vec<_>>())
            .field(
                "operator_tokens",
                &self
                    .operator_tokens
                    .iter()
                    .map(|t| (&t.name, t.role))
                    .collect::<Vec<_>>(),
            )
            .field("max_failures_per_minute", &self.max_failures_per_minute)
            .field("allow_plaintext", &self.allow_plaintext)
            .finish()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain of the hub; empty = plain HTTP/2.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// PEM CA that client certificates must chain to (mTLS); empty = none.
    pub client_ca: PathBuf,
}

impl TlsSettings {
    /// The hub speaks TLS (a certificate is configured).
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }

    /// Client certificates are asked for (mTLS).
    pub fn verifies_clients(&self) -> bool {
        !self.client_ca.as_os_str().is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    pub enabled: bool,
    pub listen: SocketAddr,
}

/// The web console and its HTTP/JSON API (`crate::http`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// The largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// A request's head must arrive within this, and an idle keep-alive
    /// connection is closed after it.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A line-protocol write's body, before and after gzip (413 beyond).
    pub write_max_bytes: usize,
    /// Lines in one line-protocol write (413 beyond).
    pub write_max_lines: usize,
    /// Readings (numeric fields) in one line-protocol write (413 beyond).
    pub write_max_readings: usize,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSettings {
    pub enabled: bool,
    pub url: String,
    pub client_id: String,
    pub topic_prefix: String,
    pub username: String,
    pub password: String,
    pub qos: u8,
    pub buffer: usize,
    pub max_payload_bytes: usize,
    /// PEM CA that signed the broker's certificate (mqtts://).
    pub ca: PathBuf,
    /// Take commands from `{prefix}/devices/+/commands`: a door for anyone
    /// who may publish there, so off unless asked for.
    pub commands: bool,
}

/// Written by hand so the password never reaches a log.
impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("enabled", &self.enabled)
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("topic_prefix", &self.topic_prefix)
            .field("commands", &self.commands)
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "********"
                },
            )
            .field("qos", &self.qos)
            .field("buffer", &self.buffer)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("ca", &self.ca)
            .finish()
    }
}

impl MqttSettings {
    /// True for `mqtts://` (TLS to the broker).
    pub fn tls(&self) -> bool {
        self.url.starts_with("mqtts://")
    }

    /// (host, port) from `mqtt://host:port` (1883) or `mqtts://host:port`
    /// (8883).
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let (rest, default_port) = if let Some(rest) = self.url.strip_prefix("mqtts://") {
            (rest, 8883)
        } else {
            let rest = self
                .url
                .strip_prefix("mqtt://")
                .or_else(|| self.url.strip_prefix("tcp://"))
                .ok_or_else(|| format!("{:?} must start with mqtt:// or mqtts://", self.url))?;
            (rest, 1883)
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("bad port in {:?}", self.url))?,
            ),
            None => (rest, default_port),
        };
        if host.is_empty() {
            return Err(format!("no host in {:?}", self.url));
        }
        Ok((host.to_owned(), port))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsSettings {
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    pub max_pending_per_device: usize,
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    pub max_attempts: u32,
    pub outbox: usize,
    pub max_params_bytes: usize,
    /// Final commands older than this are deleted (zero: kept for ever).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    pub max_message_bytes: usize,
    pub max_batch: u32,
    pub max_concurrent_streams: u32,
    /// The HTTP/2 stream window: what one device may have sent that the
    /// hub has not read yet. See [`ServerSettings::connection_window`].
    pub stream_window: u32,
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    pub outbound_buffer: usize,
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
    pub max_replies_per_sec: u32,
    pub max_devices: usize,
    pub max_readings_per_sec: u32,
    /// Live streams operators hold open at once, over every door (HTTP
    /// event streams, gRPC WatchReadings and WatchCommand).
    pub max_watches: usize,
    /// Readings answers streamed at once, over every door.
    pub max_queries: usize,
    pub tls: TlsSettings,
}

impl ServerSettings {
    /// The HTTP/2 connection window, from the stream window: 12 × every
    /// stream's window, at most 2^31 - 1. h2 closes a connection (GOAWAY
    /// ENHANCE_YOUR_CALM, "too_many_data_frames") when the small DATA
    /// frames it holds unread cost more than half the connection window
    /// (a frame under 256 bytes counts 256 - its length). A device's
    /// messages are small (a batch of one reading is ~40 bytes: 216 each),
    /// so with the 1 MiB default a connection of 100 devices was closed
    /// whenever the hub fell ~3,000 messages behind on it, and every
    /// device on it reconnected at once. With this window, every stream
    /// of the connection full of 40-byte messages stays under the limit;
    /// what is held unread is bounded by the stream windows, not by this.
    pub fn connection_window(&self) -> u32 {
        let all = u64::from(self.stream_window) * u64::from(self.max_concurrent_streams) * 12;
        all.clamp(1 << 20, (1 << 31) - 1) as u32
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    pub queue_capacity: usize,
    pub max_batch_rows: usize,
    #[serde(with = "humantime_serde")]
    pub max_batch_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    pub max_sensors: usize,
    pub max_sensors_per_device: usize,
    pub fanout_capacity: usize,
    /// Devices whose marks, epochs and sensors the writer keeps in memory.
    pub cached_devices: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Full,
    Normal,
    Off,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// Where readings and commands are kept: the embedded SQLite file at
    /// `path` (the default) or a PostgreSQL database at `url`.
    pub backend: Backend,
    /// `postgres://user:password@host:port/database` (backend = "postgres").
    pub url: DatabaseUrl,
    /// The SQLite database file (backend = "sqlite").
    pub path: PathBuf,
    pub synchronous: Synchronous,
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    pub cache_size_mib: u32,
    pub read_connections: u32,
    pub compact_rows: u64,
    pub max_size_mib: u64,
    /// Readings older than this are deleted (zero: kept for ever).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Where backups go (empty: `backups` beside `path`).
    pub backup_dir: PathBuf,
    /// Aggregates kept per series and interval (`[{ every = "1m", keep =
    /// "90d" }]`): bucket queries whose width is a multiple of `every` read
    /// them instead of the readings.
    pub rollups: Vec<RollupSetting>,
}

/// One rollup interval and how long its rows are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupSetting {
    #[serde(with = "humantime_serde")]
    pub every: Duration,
    /// Rows older than this are deleted (0s: kept for ever).
    #[serde(default, with = "humantime_serde")]
    pub keep: Duration,
}

impl RollupSetting {
    pub fn every_ms(&self) -> i64 {
        self.every.as_millis() as i64
    }

    pub fn keep_ms(&self) -> i64 {
        self.keep.as_millis() as i64
    }
}

/// A database URL, which may hold a password: printed masked.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl DatabaseUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&masked_url(&self.0))
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&masked_url(&self.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl StorageSettings {
    /// The directory `hub backup --to NAME` writes into.
    pub fn backup_root(&self) -> PathBuf {
        if self.backup_dir.as_os_str().is_empty() {
            self.path.parent().unwrap_or(Path::new(".")).join("backups")
        } else {
            self.backup_dir.clone()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub filter: String,
    pub format: LogFormat,
    /// How often an INFO line sums up the fleet (0: never). Connects and
    /// disconnects of single devices are DEBUG.
    #[serde(with = "humantime_serde")]
    pub summary_interval: Duration,
}

impl Settings {
    /// Defaults, then `file` if given, then `HUB__*` environment variables.
    /// Errors name where the bad value came from: an environment variable,
    /// the `--config` file, or the built-in defaults.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_with_env(file, Environment::with_prefix("HUB")).map_err(|e| match e {
            SettingsError::Invalid { key, reason } => SettingsError::Invalid {
                key,
                reason: format!("{reason} (set {})", origin(key, file)),
            },
            SettingsError::Load(message) => {
                let key = message
                    .split_once("for key `")
                    .and_then(|(_, rest)| rest.split_once('`'))
                    .map(|(key, _)| key.to_owned());
                // serde quotes the value it could not take: never a secret.
                let message = match &key {
                    Some(key) if is_secret_key(key) => mask_quoted(&message),
                    _ => message,
                };
                match key {
                    Some(key) if std::env::var_os(env_name(&key)).is_some() => {
                        SettingsError::Load(format!(
                            "{message} (set by the environment variable {})",
                            env_name(&key)
                        ))
                    }
                    _ => SettingsError::Load(message),
                }
            }
        })
    }

    /// The embedded defaults alone (tests and the demo start from these).
    pub fn defaults() -> Result<Self, SettingsError> {
        let load = |e: config::ConfigError| SettingsError::Load(e.to_string());
        let settings: Settings = Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .build()
            .map_err(load)?
            .try_deserialize()
            .map_err(load)?;
        settings.validate()?;
        Ok(settings)
    }

    fn load_with_env(file: Option<&Path>, env: Environment) -> Result<Self, SettingsError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).required(true));
        }
        let load = |e: config::ConfigError| SettingsError::Load(e.to_string());
        let settings: Settings = builder
            // No try_parsing: it would turn an all-digit secret ("0123")
            // into a number ("123"); numbers and booleans still parse from
            // their strings when the setting is deserialized.
            .add_source(env.prefix_separator("__").separator("__"))
            .build()
            .map_err(load)?
            .try_deserialize()
            .map_err(load)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Safe defaults: open doors only on loopback, unless asked for.
    /// MQTT commands are a door: whoever may publish on the broker's
    /// commands topic sends commands. Off loopback the broker must know who
    /// publishes (credentials; else auth.allow_open) and the link must be
    /// private (mqtts://; else auth.allow_plaintext).
    fn validate_mqtt_commands(&self) -> Result<(), SettingsError> {
        let (m, a) = (&self.mqtt, &self.auth);
        if !m.commands {
            return Ok(());
        }
        let loopback = m.host_port().is_ok_and(|(host, _)| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if loopback {
            return Ok(());
        }
        let invalid = |key: &'static str, reason: String| SettingsError::Invalid { key, reason };
        if (m.username.is_empty() || m.password.is_empty()) && !a.allow_open {
            return Err(invalid(
                "mqtt.commands",
                format!(
                    "is true with the broker {} off loopback and no mqtt.username/mqtt.password: \
                     anyone who can reach the broker could send commands. Give the hub broker \
                     credentials (and restrict the commands topic with the broker's ACL), \
                     or set auth.allow_open = true to accept that",
                    m.url
                ),
            ));
        }
        if !m.tls() && !a.allow_plaintext {
            return Err(invalid(
                "mqtt.url",
                format!(
                    "is {}, plain MQTT off loopback, while mqtt.commands is true: commands and \
                     credentials would cross the network in clear. Use mqtts://, or set \
                     auth.allow_plaintext = true to accept that",
                    m.url
                ),
            ));
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), SettingsError> {
        let a = &self.auth;
        let invalid = |key: &'static str, reason: String| SettingsError::Invalid { key, reason };
        let loopback = self.server.listen.ip().is_loopback();
        if !loopback && !a.allow_open && a.devices == DeviceAuthMode::Open {
            return Err(invalid(
                "auth.devices",
                format!(
                    "is \"open\" while server.listen {} is not a loopback address: anyone could claim any device. \
                     Set auth.devices = \"token\" (hub devices add, or auth.fleet_keys) or \"tls\", \
                     or auth.allow_open = true to accept that",
                    self.server.listen
                ),
            ));
        }
        if !loopback && !a.allow_open && a.operator_tokens.is_empty() {
            return Err(invalid(
                "auth.operator_tokens",
                format!(
                    "is empty while server.listen {} is not a loopback address: anyone could send commands \
                     and read every reading. Add [[auth.operator_tokens]] (name, token, role), \
                     or set auth.allow_open = true to accept that",
                    self.server.listen
                ),
            ));
        }
        let tokens_in_use = a.devices == DeviceAuthMode::Token || !a.operator_tokens.is_empty();
        if !loopback && tokens_in_use && !self.server.tls.enabled() && !a.allow_plaintext {
            return Err(invalid(
                "server.tls.cert",
                format!(
                    "is not set while tokens are in use on {}, a non-loopback address: they would \
                     cross the network in clear. Set server.tls.cert and server.tls.key, \
                     or auth.allow_plaintext = true (behind a TLS-terminating proxy)",
                    self.server.listen
                ),
            ));
        }
        let h = &self.http;
        if h.enabled && !h.listen.ip().is_loopback() {
            if !a.allow_open && a.operator_tokens.is_empty() {
                return Err(invalid(
                    "auth.operator_tokens",
                    format!(
                        "is empty while http.listen {} is not a loopback address: anyone could send \
                         commands and read every reading through the console. Add \
                         [[auth.operator_tokens]], or set auth.allow_open = true to accept that",
                        h.listen
                    ),
                ));
            }
            if !a.operator_tokens.is_empty() && !a.allow_plaintext {
                return Err(invalid(
                    "http.listen",
                    format!(
                        "is {}, a non-loopback address, and the console speaks plain HTTP: operator \
                         tokens would cross the network in clear. Keep it on loopback, or put it \
                         behind a TLS-terminating proxy and set auth.allow_plaintext = true",
                        h.listen
                    ),
                ));
            }
        }
        if a.devices == DeviceAuthMode::Tls && !self.server.tls.verifies_clients() {
            return Err(invalid(
                "auth.devices",
                "is \"tls\": set server.tls.cert, server.tls.key and server.tls.client_ca".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for t in &a.operator_tokens {
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                return Err(invalid(
                    "auth.operator_tokens",
                    format!("names must be unique and not empty ({:?})", t.name),
                ));
            }
            if t.token.len() < 16 {
                return Err(invalid(
                    "auth.operator_tokens",
                    format!("the token of {:?} is shorter than 16 characters", t.name),
                ));
            }
        }
        for (name, key) in &a.fleet_keys {
            if key.len() < 16 {
                return Err(invalid(
                    "auth.fleet_keys",
                    format!("the key {name:?} is shorter than 16 characters"),
                ));
            }
        }
        if a.max_failures_per_minute < 1 {
            return Err(invalid(
                "auth.max_failures_per_minute",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// One clear sentence naming the first bad key.
    pub fn validate(&self) -> Result<(), SettingsError> {
        fn check(ok: bool, key: &'static str, reason: &str) -> Result<(), SettingsError> {
            if ok {
                Ok(())
            } else {
                Err(SettingsError::Invalid {
                    key,
                    reason: reason.to_owned(),
                })
            }
        }
        let t = &self.twin;
        check(
            (16..=1 << 20).contains(&t.max_document_bytes),
            "twin.max_document_bytes",
            "must be between 16 and 1048576",
        )?;
        check(
            (1..=64).contains(&t.max_depth),
            "twin.max_depth",
            "must be between 1 and 64",
        )?;
        check(
            (1..=1024).contains(&t.max_key_bytes),
            "twin.max_key_bytes",
            "must be between 1 and 1024",
        )?;
        check(
            t.events_capacity >= 1,
            "twin.events_capacity",
            "must be at least 1",
        )?;
        // A watcher that falls behind pins up to this many twins, each up
        // to four documents (desired, reported and their metadata).
        check(
            t.events_capacity.saturating_mul(t.max_document_bytes) <= 256 << 20,
            "twin.events_capacity",
            "times twin.max_document_bytes must be at most 256 MiB (what a slow watcher may hold)",
        )?;
        let a = &self.alarms;
        check(
            a.retention <= Duration::from_secs(100 * 365 * 86_400),
            "alarms.retention",
            "must be at most 100 years (0s keeps everything)",
        )?;
        check(
            a.check_interval >= Duration::from_millis(100)
                && a.check_interval <= Duration::from_secs(3600),
            "alarms.check_interval",
            "must be between 100ms and 1h",
        )?;
        check(
            (1..=1 << 20).contains(&a.events_capacity),
            "alarms.events_capacity",
            "must be between 1 and 1048576",
        )?;
        let mut names = std::collections::HashSet::new();
        for w in &a.webhooks {
            check(
                !w.name.is_empty()
                    && w.name.len() <= 64
                    && w.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
                "alarms.webhooks",
                "a webhook name is 1 to 64 of A-Z a-z 0-9 - _ .",
            )?;
            check(
                names.insert(w.name.as_str()),
                "alarms.webhooks",
                "webhook names must be unique",
            )?;
            check(
                w.url.starts_with("http://") || w.url.starts_with("https://"),
                "alarms.webhooks",
                "a webhook url starts with http:// or https://",
            )?;
            check(
                !w.secret.is_empty(),
                "alarms.webhooks",
                "a webhook needs a secret (it signs each body)",
            )?;
            check(
                w.timeout >= Duration::from_millis(100) && w.timeout <= Duration::from_secs(300),
                "alarms.webhooks",
                "a webhook timeout is between 100ms and 5m",
            )?;
        }
        let s = &self.server;
        check(
            s.max_message_bytes >= 1024,
            "server.max_message_bytes",
            "must be at least 1024",
        )?;
        check(
            (1..=100_000).contains(&s.max_batch),
            "server.max_batch",
            "must be between 1 and 100000",
        )?;
        check(
            s.max_concurrent_streams >= 1,
            "server.max_concurrent_streams",
            "must be at least 1",
        )?;
        check(
            (4096..=16 << 20).contains(&s.stream_window),
            "server.stream_window",
            "must be between 4096 and 16777216 bytes",
        )?;
        check(
            s.outbound_buffer >= 1,
            "server.outbound_buffer",
            "must be at least 1",
        )?;
        check(
            !s.keepalive.is_zero(),
            "server.keepalive",
            "must be longer than 0s",
        )?;
        check(
            !s.hello_timeout.is_zero(),
            "server.hello_timeout",
            "must be longer than 0s",
        )?;
        check(
            !s.send_timeout.is_zero(),
            "server.send_timeout",
            "must be longer than 0s",
        )?;
        check(
            s.max_replies_per_sec >= 1,
            "server.max_replies_per_sec",
            "must be at least 1",
        )?;
        check(
            s.max_devices >= 1,
            "server.max_devices",
            "must be at least 1",
        )?;
        check(
            s.max_readings_per_sec >= 1,
            "server.max_readings_per_sec",
            "must be at least 1",
        )?;
        let tls = &s.tls;
        check(
            tls.enabled() != tls.key.as_os_str().is_empty(),
            "server.tls.key",
            "server.tls.cert and server.tls.key go together",
        )?;
        check(
            !tls.verifies_clients() || tls.enabled(),
            "server.tls.client_ca",
            "mTLS needs server.tls.cert and server.tls.key too",
        )?;
        self.validate_auth()?;
        check(
            self.server.max_watches >= 1,
            "server.max_watches",
            "must be at least 1",
        )?;
        check(
            self.server.max_queries >= 1,
            "server.max_queries",
            "must be at least 1",
        )?;
        check(
            !self.http.enabled || self.http.max_connections > self.server.max_watches,
            "http.max_connections",
            "must be more than server.max_watches (every event stream holds a connection)",
        )?;
        check(
            !self.http.header_timeout.is_zero(),
            "http.header_timeout",
            "must be more than 0s",
        )?;
        check(
            self.http.max_body_bytes >= 1024,
            "http.max_body_bytes",
            "must be at least 1024",
        )?;
        check(
            self.http.write_max_bytes >= 1024,
            "http.write_max_bytes",
            "must be at least 1024",
        )?;
        check(
            self.http.write_max_lines >= 1,
            "http.write_max_lines",
            "must be at least 1",
        )?;
        check(
            self.http.write_max_readings >= 1,
            "http.write_max_readings",
            "must be at least 1",
        )?;
        let i = &self.ingest;
        check(
            i.queue_capacity >= 1,
            "ingest.queue_capacity",
            "must be at least 1",
        )?;
        check(
            i.cached_devices >= 1,
            "ingest.cached_devices",
            "must be at least 1",
        )?;
        check(
            i.max_batch_rows >= 1,
            "ingest.max_batch_rows",
            "must be at least 1",
        )?;
        check(
            i.max_batch_delay <= Duration::from_secs(10),
            "ingest.max_batch_delay",
            "must be at most 10s (acks wait for it)",
        )?;
        check(
            i.max_sensors >= 1,
            "ingest.max_sensors",
            "must be at least 1",
        )?;
        check(
            (1..=i.max_sensors).contains(&i.max_sensors_per_device),
            "ingest.max_sensors_per_device",
            "must be between 1 and ingest.max_sensors",
        )?;
        let st = &self.storage;
        check(
            st.backend == Backend::Postgres || !st.path.as_os_str().is_empty(),
            "storage.path",
            "must not be empty",
        )?;
        check(
            st.backend == Backend::Sqlite
                || st.url.0.starts_with("postgres://")
                || st.url.0.starts_with("postgresql://"),
            "storage.url",
            "must be postgres://user@host:port/database when storage.backend = \"postgres\"",
        )?;
        check(
            st.read_connections >= 1,
            "storage.read_connections",
            "must be at least 1",
        )?;
        check(
            st.compact_rows >= 1,
            "storage.compact_rows",
            "must be at least 1",
        )?;
        check(
            st.rollups.len() <= 8,
            "storage.rollups",
            "may list at most 8 intervals",
        )?;
        for (i, r) in st.rollups.iter().enumerate() {
            check(
                r.every >= Duration::from_secs(1)
                    && r.every <= Duration::from_secs(366 * 86_400)
                    && r.every.subsec_nanos() == 0,
                "storage.rollups",
                "every must be whole seconds, between 1s and 366days",
            )?;
            check(
                r.keep.is_zero() || r.keep >= r.every,
                "storage.rollups",
                "keep must be 0s (for ever) or at least its every",
            )?;
            check(
                r.keep <= Duration::from_secs(100 * 365 * 86_400),
                "storage.rollups",
                "keep must be at most 100 years",
            )?;
            check(
                st.rollups[..i].iter().all(|o| o.every != r.every),
                "storage.rollups",
                "lists the same every twice",
            )?;
        }
        let c = &self.commands;
        check(
            (Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600)).contains(&c.default_ttl),
            "commands.default_ttl",
            "must be between 1s and 7days",
        )?;
        check(
            c.max_pending_per_device >= 1,
            "commands.max_pending_per_device",
            "must be at least 1",
        )?;
        check(
            !c.ack_timeout.is_zero(),
            "commands.ack_timeout",
            "must be longer than 0s",
        )?;
        check(
            c.max_attempts >= 1,
            "commands.max_attempts",
            "must be at least 1",
        )?;
        check(c.outbox >= 1, "commands.outbox", "must be at least 1")?;
        check(
            (2..=1 << 20).contains(&c.max_params_bytes),
            "commands.max_params_bytes",
            "must be between 2 and 1048576",
        )?;
        check(
            self.ingest.fanout_capacity >= 1,
            "ingest.fanout_capacity",
            "must be at least 1",
        )?;
        let m = &self.mqtt;
        if m.enabled {
            if let Err(reason) = m.host_port() {
                return Err(SettingsError::Invalid {
                    key: "mqtt.url",
                    reason,
                });
            }
            check(
                !m.client_id.is_empty(),
                "mqtt.client_id",
                "must not be empty",
            )?;
            check(
                !m.tls() || !m.ca.as_os_str().is_empty(),
                "mqtt.ca",
                "an mqtts:// broker needs the CA that signed its certificate",
            )?;
            self.validate_mqtt_commands()?;
        }
        check(
            !m.topic_prefix.is_empty()
                && !m.topic_prefix.contains(['+', '#'])
                && !m.topic_prefix.ends_with('/'),
            "mqtt.topic_prefix",
            "must be non-empty, without + or #, and not end with /",
        )?;
        check(m.qos <= 2, "mqtt.qos", "must be 0, 1 or 2")?;
        check(m.buffer >= 1, "mqtt.buffer", "must be at least 1")?;
        check(
            m.max_payload_bytes >= c.max_params_bytes + 1024,
            "mqtt.max_payload_bytes",
            "must be at least commands.max_params_bytes + 1024 (room for the name and the rest)",
        )?;
        Ok(())
    }

    /// The effective settings as TOML, secrets masked.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        let mask = |secret: &mut String| {
            if !secret.is_empty() {
                *secret = "********".into();
            }
        };
        mask(&mut shown.mqtt.password);
        shown
            .alarms
            .webhooks
            .iter_mut()
            .for_each(|w| mask(&mut w.secret));
        shown.storage.url = DatabaseUrl(masked_url(shown.storage.url.as_str()));
        shown.auth.fleet_keys.values_mut().for_each(mask);
        shown
            .auth
            .operator_tokens
            .iter_mut()
            .for_each(|t| mask(&mut t.token));
        toml_lines(&shown)
    }
}

/// A database URL with its password (if any) masked, for printing.
pub fn masked_url(url: &str) -> String {
    // A password may also come as `?password=…` (libpq style).
    let (url, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let query = query.map(|q| {
        q.split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=********"),
                _ => kv.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    let base = match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:********@{host}"),
                None => url.to_owned(),
            },
            None => url.to_owned(),
        },
        None => url.to_owned(),
    };
    match query {
        Some(q) => format!("{base}?{q}"),
        None => base,
    }
}

/// `server.max_batch` -> `HUB__SERVER__MAX_BATCH`.
fn env_name(key: &str) -> String {
    format!("HUB__{}", key.to_uppercase().replace('.', "__"))
}

/// Where a setting's value came from, for an error message.
fn origin(key: &str, file: Option<&Path>) -> String {
    let env = env_name(key);
    if std::env::var_os(&env).is_some() {
        return format!("by the environment variable {env}");
    }
    if let Some(path) = file {
        let in_file = Config::builder()
            .add_source(File::from(path))
            .build()
            .is_ok_and(|c| c.get::<config::Value>(key).is_ok());
        if in_file {
            return format!("in {}", path.display());
        }
    }
    "by the built-in defaults or a setting it depends on".to_owned()
}

/// Renders settings as TOML (`[section]`, `[section.sub]`, `[[section.list]]`,
/// `key = value`) via serde_json, so no extra TOML serializer is needed.
fn toml_lines(settings: &Settings) -> String {
    let mut out = String::new();
    if let Ok(serde_json::Value::Object(sections)) = serde_json::to_value(settings) {
        for (section, body) in &sections {
            toml_table(&mut out, section, body);
        }
    }
    out
}

fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_owned()
    } else {
        serde_json::Value::String(key.to_owned()).to_string()
    }
}

fn toml_table(out: &mut String, path: &str, body: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(keys) = body else { return };
    out.push_str(&format!("[{path}]\n"));
    let mut nested = Vec::new();
    for (key, value) in keys {
        match value {
            Value::Object(_) => nested.push((key, value)),
            Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_object) => {
                nested.push((key, value))
            }
            _ => out.push_str(&format!("{} = {value}\n", toml_key(key))),
        }
    }
    out.push('\n');
    for (key, value) in nested {
        let sub = format!("{path}.{}", toml_key(key));
        match value {
            Value::Array(items) => {
                for item in items {
                    out.push_str(&format!("[[{sub}]]\n"));
                    if let Value::Object(fields) = item {
                        for (k, v) in fields {
                            out.push_str(&format!("{} = {v}\n", toml_key(k)));
                        }
                    }
                    out.push('\n');
                }
            }
            _ => toml_table(out, &sub, value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let s = Settings::defaults().unwrap();
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(s.storage.synchronous, Synchronous::Full);
        assert_eq!(s.ingest.max_batch_delay, Duration::from_millis(10));
    }

    #[test]
    fn env_overrides_file_and_defaults() {
        let env = Environment::with_prefix("HUB").source(Some(
            [
                ("HUB__SERVER__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
                ("HUB__STORAGE__PATH".to_owned(), "run/x.db".to_owned()),
                ("HUB__INGEST__MAX_BATCH_ROWS".to_owned(), "77".to_owned()),
            ]
            .into_iter()
            .collect(),
        ));
        let s = Settings::load_with_env(None, env).unwrap();
        assert_eq!(s.server.listen.port(), 0);
        assert_eq!(s.storage.path, PathBuf::from("run/x.db"));
        assert_eq!(s.ingest.max_batch_rows, 77);
    }

    #[test]
    fn secrets_made_of_digits_stay_strings() {
        let env = Environment::with_prefix("HUB").source(Some(
            [
                ("HUB__MQTT__PASSWORD".to_owned(), "0123".to_owned()),
                ("HUB__SERVER__MAX_BATCH".to_owned(), "500".to_owned()),
                ("HUB__MQTT__ENABLED".to_owned(), "true".to_owned()),
            ]
            .into_iter()
            .collect(),
        ));
        let s = Settings::load_with_env(None, env).unwrap();
        assert_eq!(s.mqtt.password, "0123");
        assert_eq!(s.server.max_batch, 500);
        assert!(s.mqtt.enabled);
    }

    #[test]
    fn tokens_on_a_network_address_need_tls() {
        let mut s = Settings::defaults().unwrap();
        s.server.listen = "0.0.0.0:50051".parse().unwrap();
        s.auth.devices = DeviceAuthMode::Token;
        s.auth.operator_tokens = vec![OperatorToken {
            name: "ops".into(),
            token: "x".repeat(20),
            role: OperatorRole::Admin,
        }];
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("server.tls.cert") && err.contains("in clear"),
            "{err}"
        );
        s.auth.allow_plaintext = true;
        s.validate().unwrap();
        s.auth.allow_plaintext = false;
        s.server.tls.cert = "hub.pem".into();
        s.server.tls.key = "hub.key".into();
        s.validate().unwrap();
    }

    #[test]
    fn bad_value_names_the_key() {
        let env = Environment::with_prefix("HUB").source(Some(
            [("HUB__SERVER__MAX_BATCH".to_owned(), "0".to_owned())]
                .into_iter()
                .collect(),
        ));
        let err = Settings::load_with_env(None, env).unwrap_err().to_string();
        assert!(err.contains("server.max_batch"), "{err}");
    }

    #[test]
    fn print_config_lists_every_section() {
        let text = Settings::defaults().unwrap().to_toml();
        for section in [
            "[server]",
            "[server.tls]",
            "[auth]",
            "[metrics]",
            "[http]",
            "[ingest]",
            "[storage]",
            "[commands]",
            "[mqtt]",
            "[log]",
        ] {
            assert!(text.contains(section), "{text}");
        }
        assert!(text.contains("listen = \"127.0.0.1:50051\""), "{text}");
    }
}

#[cfg(test)]
mod mqtt_tests {
    use super::*;

    #[test]
    fn the_password_never_prints() {
        let mut s = Settings::defaults().unwrap();
        s.mqtt.password = "hunter2".into();
        s.storage.url = DatabaseUrl("postgres://hub:hunter2@db:5432/hub".into());
        let text = s.to_toml();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("postgres://hub:********@db:5432/hub"),
            "{text}"
        );
        assert!(text.contains("password = \"********\""), "{text}");
        assert_eq!(
            masked_url("postgres://u@h/db?sslmode=require&password=hunter2"),
            "postgres://u@h/db?sslmode=require&password=********"
        );
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn broker_urls() {
        let mut m = Settings::defaults().unwrap().mqtt;
        assert_eq!(m.host_port().unwrap(), ("127.0.0.1".to_owned(), 1883));
        m.url = "mqtt://broker.local".into();
        assert_eq!(m.host_port().unwrap(), ("broker.local".to_owned(), 1883));
        m.url = "http://x:1".into();
        assert!(m.host_port().is_err());
    }

    #[test]
    fn errors_about_secret_settings_do_not_quote_them() {
        assert_eq!(
            mask_quoted(
                "invalid type: string \"s3\\\"cret, expected x\", expected struct OperatorToken for key `auth.operator_tokens[0]`"
            ),
            "invalid value (not shown: it may be a secret), expected struct OperatorToken for key `auth.operator_tokens[0]`"
        );
        assert!(is_secret_key("auth.operator_tokens[0]"));
        assert!(is_secret_key("mqtt.password"));
        assert!(!is_secret_key("mqtt.url"));
    }

    #[test]
    fn commands_over_mqtt_off_loopback_need_credentials_and_tls() {
        let key = |s: &Settings| match s.validate() {
            Ok(()) => None,
            Err(SettingsError::Invalid { key, .. }) => Some(key),
            Err(e) => panic!("{e}"),
        };
        let mut s = Settings::defaults().unwrap();
        s.mqtt.enabled = true;
        s.mqtt.url = "mqtt://broker.example:1883".into();
        assert_eq!(key(&s), None, "readings only: no door");
        s.mqtt.commands = true;
        assert_eq!(key(&s), Some("mqtt.commands"), "anyone could publish");
        s.mqtt.username = "hub".into();
        s.mqtt.password = "secret".into();
        assert_eq!(key(&s), Some("mqtt.url"), "in clear");
        s.mqtt.url = "mqtts://broker.example".into();
        s.mqtt.ca = "ca.pem".into();
        assert_eq!(key(&s), None);
        s.mqtt.username.clear();
        s.auth.allow_open = true;
        assert_eq!(key(&s), None, "allowed knowingly");
        for url in [
            "mqtt://127.0.0.1:1883",
            "mqtt://localhost",
            "mqtt://[::1]:1883",
        ] {
            let mut s = Settings::defaults().unwrap();
            s.mqtt.enabled = true;
            s.mqtt.commands = true;
            s.mqtt.url = url.into();
            assert_eq!(key(&s), None, "{url}");
        }
    }
}
