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
    #[error("cannot load settings: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub ingest: IngestSettings,
    pub storage: StorageSettings,
    pub commands: CommandsSettings,
    pub mqtt: MqttSettings,
    pub log: LogSettings,
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
}

/// Written by hand so the password never reaches a log.
impl std::fmt::Debug for MqttSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSettings")
            .field("enabled", &self.enabled)
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("topic_prefix", &self.topic_prefix)
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
            .finish()
    }
}

impl MqttSettings {
    /// (host, port) from `mqtt://host:port`.
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let rest = self
            .url
            .strip_prefix("mqtt://")
            .or_else(|| self.url.strip_prefix("tcp://"))
            .ok_or_else(|| format!("{:?} must start with mqtt://", self.url))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("bad port in {:?}", self.url))?,
            ),
            None => (rest, 1883),
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
    pub path: PathBuf,
    pub synchronous: Synchronous,
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    pub cache_size_mib: u32,
    pub read_connections: u32,
    pub compact_rows: u64,
    pub max_size_mib: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub filter: String,
}

impl Settings {
    /// Defaults, then `file` if given, then `HUB__*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        Self::load_with_env(file, Environment::with_prefix("HUB"))
    }

    /// The embedded defaults alone (tests and the demo start from these).
    pub fn defaults() -> Result<Self, SettingsError> {
        let settings: Settings = Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn load_with_env(file: Option<&Path>, env: Environment) -> Result<Self, SettingsError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).required(true));
        }
        let settings: Settings = builder
            .add_source(env.prefix_separator("__").separator("__").try_parsing(true))
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
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
        let i = &self.ingest;
        check(
            i.queue_capacity >= 1,
            "ingest.queue_capacity",
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
            !st.path.as_os_str().is_empty(),
            "storage.path",
            "must not be empty",
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
        if !shown.mqtt.password.is_empty() {
            shown.mqtt.password = "********".into();
        }
        toml_lines(&shown)
    }
}

/// Renders settings as `[section]` / `key = value` lines via serde_json, so no
/// extra TOML serializer is needed.
fn toml_lines(settings: &Settings) -> String {
    let value = serde_json::to_value(settings).unwrap_or_default();
    let mut out = String::new();
    if let serde_json::Value::Object(sections) = value {
        for (section, body) in sections {
            out.push_str(&format!("[{section}]\n"));
            if let serde_json::Value::Object(keys) = body {
                for (key, v) in keys {
                    out.push_str(&format!("{key} = {v}\n"));
                }
            }
            out.push('\n');
        }
    }
    out
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
        let text = s.to_toml();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("password = \"********\""), "{text}");
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
}
