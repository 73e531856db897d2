//! `device-sim`: run a fleet of simulated devices against a hub.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use device_sim::{Credentials, FleetConfig, FleetStats, TlsFiles};
use tokio_util::sync::CancellationToken;

/// Simulated devices streaming readings to a telemetry hub.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Hub URL; several, comma-separated, and each device fails over to the
    /// next when its stream breaks (devices start spread over them).
    #[arg(long, env = "HUB_ADDR", default_value = "http://127.0.0.1:50051")]
    hub: String,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Readings per second per device, all its sensors together.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Sensors each device samples, in turn.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "temperature,humidity,pressure,battery"
    )]
    sensors: Vec<String>,
    /// Most readings per batch.
    #[arg(long, default_value_t = 100)]
    batch_max: usize,
    /// How often a device sends what it sampled.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    batch_interval: Duration,
    /// HTTP/2 connections shared by the devices (default: one per 100 devices).
    #[arg(long)]
    connections: Option<usize>,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Device ids are {prefix}{index:05}.
    #[arg(long, default_value = "sim-")]
    id_prefix: String,
    /// Index of the first device.
    #[arg(long, default_value_t = 1)]
    start_index: usize,
    /// Seed of the simulated signals.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Unacked readings a device keeps; when full it stops sampling.
    #[arg(long, default_value_t = 10_000)]
    buffer: usize,
    /// On exit, how long to wait for outstanding acks.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Print a summary as the last stdout line.
    #[arg(long, value_parser = ["json"])]
    summary: Option<String>,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Hello.token of a single device (--devices 1).
    #[arg(
        long,
        env = "DEVICE_TOKEN",
        hide_env_values = true,
        conflicts_with = "fleet_key"
    )]
    token: Option<String>,
    /// Fleet key: each device's token is hex(HMAC-SHA256(key, device_id)).
    #[arg(long, env = "FLEET_KEY", hide_env_values = true)]
    fleet_key: Option<String>,
    /// CA certificate (PEM) of an https:// hub.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mTLS (--devices 1).
    #[arg(long, requires_all = ["key", "ca"])]
    cert: Option<std::path::PathBuf>,
    /// Values at full f64 precision instead of each sensor's resolution
    /// (0.01 °C, 0.1 %, 0.01 hPa, 0.1 % battery).
    #[arg(long)]
    full_precision: bool,
    /// First upload readings stamped over this much of the past, `--rate`
    /// apart, as fast as acks allow (a device back from being offline);
    /// then sample live.
    #[arg(long, value_parser = humantime::parse_duration)]
    backfill: Option<Duration>,
    /// Behave like firmware from before twins: no Hello.twin, no reported
    /// state, desired state never sent.
    #[arg(long)]
    no_twin: bool,
    /// How long a device takes to apply a desired change (a slow device).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    twin_apply_delay: Duration,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    key: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = FleetConfig {
        hub: args.hub,
        devices: args.devices,
        rate_hz: args.rate,
        sensors: args.sensors,
        batch_max: args.batch_max,
        batch_interval: args.batch_interval,
        connections: args.connections,
        id_prefix: args.id_prefix,
        start_index: args.start_index,
        seed: args.seed,
        buffer: args.buffer,
        drain_timeout: args.drain_timeout,
        credentials: match (args.token, args.fleet_key) {
            (Some(token), _) => Credentials::Token(token),
            (None, Some(key)) => Credentials::FleetKey(key),
            (None, None) => Credentials::None,
        },
        tls: args.ca.map(|ca| TlsFiles {
            ca,
            identity: args.cert.zip(args.key),
        }),
        full_precision: args.full_precision,
        backfill: args.backfill,
        twin: !args.no_twin,
        twin_apply_delay: args.twin_apply_delay,
        ..FleetConfig::default()
    };
    let stop = CancellationToken::new();
    let stats = Arc::new(FleetStats::default());
    {
        let stop = stop.clone();
        let duration = args.duration;
        tokio::spawn(async move {
            match duration {
                Some(d) => tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = tokio::signal::ctrl_c() => {}
                },
                None => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
            stop.cancel();
        });
    }
    if !args.quiet {
        let stats = Arc::clone(&stats);
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut last_acked = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            while !stop.is_cancelled() {
                tick.tick().await;
                let acked = FleetStats::get(&stats.acked);
                eprintln!(
                    "online {:>5}  sent {:>10}  acked {:>10} ({:>8.0}/s)  reconnects {}  ack p99 {:.1} ms (last 5 s: {:.1} ms)",
                    FleetStats::get(&stats.online),
                    FleetStats::get(&stats.sent),
                    acked,
                    (acked - last_acked) as f64 / 5.0,
                    FleetStats::get(&stats.reconnects),
                    stats.ack_latency_ms(0.99),
                    stats.take_recent_ms(0.99),
                );
                last_acked = acked;
            }
        });
    }
    let summary = device_sim::run(cfg, stop, Arc::clone(&stats)).await?;
    if args.summary.is_some() {
        println!("{}", serde_json::to_string(&summary)?);
    } else if !args.quiet {
        eprintln!(
            "done: {} devices ({} clean), sent {}, acked {}, duplicates {}, rejected {}, dropped at source {}, reconnects {}, ack p50 {:.1} ms p99 {:.1} ms",
            summary.devices,
            summary.clean_devices,
            summary.sent,
            summary.acked,
            summary.duplicates,
            summary.rejected,
            summary.dropped_at_source,
            summary.reconnects,
            summary.ack_p50_ms,
            summary.ack_p99_ms
        );
    }
    std::process::exit(if summary.all_clean() { 0 } else { 1 });
}
