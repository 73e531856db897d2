//! A fleet: many simulated devices sharing a few HTTP/2 connections.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use telemetry_proto::io::BatchedWrites;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::device::{DeviceConfig, DeviceEnd, SimDevice};
use crate::stats::{FleetStats, FleetSummary};

/// Devices per HTTP/2 connection when `connections` is not given.
pub const DEVICES_PER_CONNECTION: usize = 100;

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Hub URL, e.g. http://127.0.0.1:50051; several, comma-separated, to
    /// fail over between.
    pub hub: String,
    pub devices: usize,
    /// Readings per second per device, all its sensors together.
    pub rate_hz: f64,
    pub sensors: Vec<String>,
    pub batch_max: usize,
    pub batch_interval: Duration,
    /// HTTP/2 connections shared by the devices; None = one per 100 devices.
    pub connections: Option<usize>,
    pub id_prefix: String,
    pub start_index: usize,
    pub seed: u64,
    /// Unacked readings each device keeps.
    pub buffer: usize,
    pub drain_timeout: Duration,
    pub firmware: String,
    /// How the devices prove who they are.
    pub credentials: Credentials,
    /// TLS for https:// hubs.
    pub tls: Option<TlsFiles>,
    /// Values at full f64 precision instead of each sensor's resolution.
    pub full_precision: bool,
    /// Each device first uploads readings stamped over this much of the
    /// past (a device back from being offline), as fast as acks allow.
    pub backfill: Option<Duration>,
    /// Devices keep a twin (Hello.twin): they apply desired state and
    /// report it. False behaves like firmware from before twins.
    pub twin: bool,
    /// How long a device takes to apply a desired change (a slow device).
    pub twin_apply_delay: Duration,
}

/// What devices send as Hello.token.
#[derive(Clone, Default)]
pub enum Credentials {
    /// Nothing (open device auth, or mTLS).
    #[default]
    None,
    /// One token, for a fleet of one device.
    Token(String),
    /// Each device's token derived from a fleet key: lowercase hex of
    /// HMAC-SHA256(key, device_id), as the hub's auth.fleet_keys expects.
    FleetKey(String),
}

/// Written by hand so no secret prints.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credentials::None => "None",
            Credentials::Token(_) => "Token(********)",
            Credentials::FleetKey(_) => "FleetKey(********)",
        })
    }
}

impl Credentials {
    fn token_for(&self, device_id: &str) -> String {
        match self {
            Credentials::None => String::new(),
            Credentials::Token(token) => token.clone(),
            Credentials::FleetKey(key) => fleet_token(key, device_id),
        }
    }
}

/// The token a fleet key gives a device.
pub fn fleet_token(key: &str, device_id: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes())
        .expect("HMAC takes keys of any size");
    mac.update(device_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// PEM files for TLS: the CA that signed the hub's certificate and, for
/// mTLS, the device's certificate and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: std::path::PathBuf,
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            hub: "http://127.0.0.1:50051".into(),
            devices: 10,
            rate_hz: 10.0,
            sensors: ["temperature", "humidity", "pressure", "battery"]
                .map(String::from)
                .to_vec(),
            batch_max: 100,
            batch_interval: Duration::from_millis(100),
            connections: None,
            id_prefix: "sim-".into(),
            start_index: 1,
            seed: 1,
            buffer: 10_000,
            drain_timeout: Duration::from_secs(10),
            firmware: concat!("device-sim/", env!("CARGO_PKG_VERSION")).into(),
            credentials: Credentials::None,
            tls: None,
            full_precision: false,
            backfill: None,
            twin: true,
            twin_apply_delay: Duration::ZERO,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("invalid hub URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid fleet setting: {0}")]
    Invalid(&'static str),
    #[error("TLS: {0}")]
    Tls(String),
}

/// The id of the device with this index: `{prefix}{index:05}`.
pub fn device_id(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:05}")
}

impl FleetConfig {
    fn validate(&self) -> Result<(), FleetError> {
        if !(self.rate_hz.is_finite() && self.rate_hz >= 0.0) {
            return Err(FleetError::Invalid("rate must be a number >= 0"));
        }
        if self.sensors.is_empty() {
            return Err(FleetError::Invalid("at least one sensor is needed"));
        }
        if self.batch_max == 0 || self.buffer == 0 {
            return Err(FleetError::Invalid(
                "batch-max and buffer must be at least 1",
            ));
        }
        if self.batch_interval.is_zero() {
            return Err(FleetError::Invalid("batch-interval must be longer than 0"));
        }
        if self.hub_urls().is_empty() {
            return Err(FleetError::Invalid("at least one hub URL is needed"));
        }
        if self.connections == Some(0) {
            return Err(FleetError::Invalid("connections must be at least 1"));
        }
        if matches!(self.credentials, Credentials::Token(_)) && self.devices != 1 {
            return Err(FleetError::Invalid(
                "one token is one device: use --devices 1, or a fleet key",
            ));
        }
        if self.tls.as_ref().is_some_and(|t| t.identity.is_some()) && self.devices != 1 {
            return Err(FleetError::Invalid(
                "a client certificate names one device: use --devices 1",
            ));
        }
        Ok(())
    }

    /// The hubs of `hub`: one URL, or several separated by commas that the
    /// devices fail over between.
    pub fn hub_urls(&self) -> Vec<&str> {
        self.hub
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    pub fn connection_count(&self) -> usize {
        self.connections
            .unwrap_or_else(|| self.devices.div_ceil(DEVICES_PER_CONNECTION))
            .clamp(1, self.devices.max(1))
    }
}

/// Runs the fleet until `stop` is cancelled, then lets every device drain
/// and close; `stats` can be read while it runs.
pub async fn run(
    cfg: FleetConfig,
    stop: CancellationToken,
    stats: Arc<FleetStats>,
) -> Result<FleetSummary, FleetError> {
    cfg.validate()?;
    let started = Instant::now();
    // Per connection slot, one channel to each hub.
    let hubs = cfg.hub_urls();
    let channels = (0..cfg.connection_count())
        .map(|_| {
            hubs.iter()
                .map(|url| channel(url, cfg.tls.as_ref()))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut devices = JoinSet::new();
    for n in 0..cfg.devices {
        let index = cfg.start_index + n;
        let id = device_id(&cfg.id_prefix, index);
        let device = SimDevice::new(
            DeviceConfig {
                token: cfg.credentials.token_for(&id),
                device_id: id,
                index: index as u64,
                seed: cfg.seed,
                rate_hz: cfg.rate_hz,
                sensors: cfg.sensors.clone(),
                batch_max: cfg.batch_max,
                batch_interval: cfg.batch_interval,
                buffer: cfg.buffer,
                drain_timeout: cfg.drain_timeout,
                firmware: cfg.firmware.clone(),
                full_precision: cfg.full_precision,
                backfill: cfg.backfill,
                twin: cfg.twin,
                twin_apply_delay: cfg.twin_apply_delay,
            },
            Arc::clone(&stats),
        );
        devices.spawn(device.run(channels[n % channels.len()].clone(), stop.clone()));
    }
    // Steady once every device has been online for `steady_after`.
    let steady_after = steady_after(cfg.rate_hz);
    let watch = {
        let (stats, stop, all) = (Arc::clone(&stats), stop.clone(), cfg.devices as u64);
        tokio::spawn(async move {
            let mut online_since: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stop.cancelled() => return,
                }
                if FleetStats::get(&stats.online) < all {
                    online_since = None;
                    continue;
                }
                let since = *online_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= steady_after {
                    stats.mark_steady();
                    return;
                }
            }
        })
    };
    let stopping = {
        let (stats, stop) = (Arc::clone(&stats), stop.clone());
        tokio::spawn(async move {
            stop.cancelled().await;
            stats.mark_stopping();
        })
    };
    let mut clean = 0;
    while let Some(end) = devices.join_next().await {
        match end {
            Ok(DeviceEnd::Clean) => clean += 1,
            Ok(DeviceEnd::Unclean) => {}
            Err(e) => tracing::error!(error = %e, "device task failed"),
        }
    }
    watch.abort();
    stopping.abort();
    Ok(stats.summary(cfg.devices, clean, started.elapsed()))
}

/// How long after the last device came online the fleet counts as steady
/// (`FleetSummary::steady_p99_ms`), at least.
pub const STEADY_AFTER: Duration = Duration::from_secs(10);

/// [`STEADY_AFTER`], or two sampling periods where that is longer: a
/// device sends its first reading one period after it connects, so at
/// 0.1 Hz the last devices' first batches (the ramp) would otherwise land
/// in the steady figures' first second.
pub fn steady_after(rate_hz: f64) -> Duration {
    if rate_hz > 0.0 {
        STEADY_AFTER.max(Duration::from_secs_f64((2.0 / rate_hz).min(3600.0)))
    } else {
        STEADY_AFTER
    }
}

/// One HTTP/2 connection, established on first use and re-established by
/// tonic after a failure.
fn channel(url: &str, tls: Option<&TlsFiles>) -> Result<Channel, FleetError> {
    let mut endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| FleetError::BadUrl {
        url: url.to_owned(),
        reason: e.to_string(),
    })?;
    if url.starts_with("https://") {
        let files = tls.ok_or_else(|| {
            FleetError::Tls(
                "an https:// hub needs --ca FILE (the CA that signed its certificate)".into(),
            )
        })?;
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| FleetError::Tls(format!("{}: {e}", path.display())))
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(&files.ca)?));
        if let Some((cert, key)) = &files.identity {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| FleetError::Tls(e.to_string()))?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        // Acks are small DATA frames: h2 closes a connection whose unread
        // small frames cost more than half its window (the hub's side of
        // this is `server.stream_window`). A busy sim reading late must
        // not lose every device on a connection for it.
        .initial_stream_window_size(64 << 10)
        .initial_connection_window_size(256 << 20)
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(tower::service_fn(connect)))
}

/// A connection to the hub (TLS, when asked, goes over it): the flushes of
/// the devices sharing it wait a scheduler round, so what many of them send
/// at once leaves in one write ([`BatchedWrites`]).
async fn connect(uri: Uri) -> std::io::Result<TokioIo<BatchedWrites>> {
    let host = uri
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .ok_or_else(|| std::io::Error::other(format!("no host in {uri}")))?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    Ok(TokioIo::new(BatchedWrites::new(stream)))
}
