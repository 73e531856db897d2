//! The `hub` command line: `serve` and `print-config` run locally; `query`
//! and `devices` are gRPC clients of a running hub; `demo` runs a hub and a
//! simulated fleet in one process.

mod command;
mod demo;
mod output;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use telemetry_proto::v1::{self as pb, operator_client::OperatorClient};
use tonic::transport::{Channel, Endpoint};

pub use command::{CommandAction, run as command};
pub use demo::{DemoArgs, demo};
use output::{BucketColumns, Format};

#[derive(Parser, Debug)]
#[command(
    name = "hub",
    version,
    about = "telemetry-hub: the sensor telemetry hub and its operator CLI"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the hub until SIGINT/SIGTERM.
    Serve {
        /// Settings file (TOML) over the built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the effective settings (defaults < --config < HUB__* env).
    PrintConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Query stored readings of a device.
    Query(QueryArgs),
    /// List registered devices.
    Devices(DevicesArgs),
    /// Send, list, show and cancel device commands.
    #[command(subcommand)]
    Command(CommandAction),
    /// Live tail of committed readings.
    Watch(WatchArgs),
    /// Show the live counters of a running hub.
    Stats(DevicesArgs),
    /// Run a hub and a simulated fleet in one process (Ctrl-C stops).
    Demo(DemoArgs),
}

/// How to reach a running hub.
#[derive(Args, Debug, Clone)]
pub struct HubAddr {
    /// URL of the running hub.
    #[arg(long, env = "HUB_ADDR", default_value = "http://127.0.0.1:50051")]
    pub hub: String,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum AggArg {
    Avg,
    Min,
    Max,
    Count,
    Sum,
    First,
    Last,
}

#[derive(Args, Debug)]
pub struct QueryArgs {
    #[command(flatten)]
    pub addr: HubAddr,
    /// Device id.
    #[arg(long)]
    pub device: String,
    /// One sensor (default: all of the device's sensors).
    #[arg(long)]
    pub sensor: Option<String>,
    /// Start (inclusive): a duration ago ("15m") or an RFC3339 time.
    #[arg(long, value_parser = parse_time)]
    pub since: Option<i64>,
    /// End (exclusive): a duration ago or an RFC3339 time.
    #[arg(long, value_parser = parse_time)]
    pub until: Option<i64>,
    /// Most rows (or buckets).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Aggregate into buckets of this width ("1m", "1h").
    #[arg(long, value_parser = parse_bucket)]
    pub bucket: Option<Duration>,
    /// Aggregates per bucket.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        requires = "bucket",
        default_value = "count,avg"
    )]
    pub agg: Vec<AggArg>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub addr: HubAddr,
    /// Only this device.
    #[arg(long)]
    pub device: Option<String>,
    /// Only this sensor.
    #[arg(long)]
    pub sensor: Option<String>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Arguments of the listing subcommands (`devices`, `stats`).
#[derive(Args, Debug)]
pub struct DevicesArgs {
    #[command(flatten)]
    pub addr: HubAddr,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// A bucket width: 1 ms to 100 years.
pub fn parse_bucket(raw: &str) -> Result<Duration, String> {
    let width = humantime::parse_duration(raw).map_err(|e| format!("{raw:?}: {e}"))?;
    if width < Duration::from_millis(1) || width > Duration::from_secs(100 * 365 * 86_400) {
        return Err(format!("a bucket is 1ms to 100years, not {raw:?}"));
    }
    Ok(width)
}

/// A time argument: a duration before now, or an RFC3339 timestamp; as ms
/// since the epoch.
pub fn parse_time(raw: &str) -> Result<i64, String> {
    if let Ok(ago) = humantime::parse_duration(raw) {
        let now = SystemTime::now();
        let at = now.checked_sub(ago).unwrap_or(UNIX_EPOCH);
        return Ok(system_time_ms(at));
    }
    humantime::parse_rfc3339_weak(raw)
        .map(system_time_ms)
        .map_err(|_| {
            format!(
                "{raw:?} is neither a duration (15m) nor an RFC3339 time (2026-01-02T03:04:05Z)"
            )
        })
}

fn system_time_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

pub async fn connect(addr: &HubAddr) -> anyhow::Result<OperatorClient<Channel>> {
    let channel = Endpoint::from_shared(addr.hub.clone())
        .with_context(|| format!("invalid hub URL {:?}", addr.hub))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the hub at {}", addr.hub))?;
    Ok(OperatorClient::new(channel))
}

fn agg_to_proto(a: AggArg) -> pb::Aggregate {
    match a {
        AggArg::Avg => pb::Aggregate::Avg,
        AggArg::Min => pb::Aggregate::Min,
        AggArg::Max => pb::Aggregate::Max,
        AggArg::Count => pb::Aggregate::Count,
        AggArg::Sum => pb::Aggregate::Sum,
        AggArg::First => pb::Aggregate::First,
        AggArg::Last => pb::Aggregate::Last,
    }
}

/// `hub query`: streams the result to `out` as it arrives.
pub async fn query(args: &QueryArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut client = connect(&args.addr).await?;
    let request = pb::QueryReadingsRequest {
        device_id: args.device.clone(),
        sensor: args.sensor.clone().unwrap_or_default(),
        since_ms: args.since,
        until_ms: args.until,
        limit: args.limit.unwrap_or(0),
        bucket_ms: args.bucket.map_or(0, |b| b.as_millis() as i64),
        aggregates: if args.bucket.is_some() {
            args.agg.iter().map(|a| agg_to_proto(*a) as i32).collect()
        } else {
            Vec::new()
        },
    };
    let mut stream = client
        .query_readings(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let columns = BucketColumns::new(&args.agg);
    let printer =
        output::QueryPrinter::new(args.format, &args.device, args.bucket.is_some(), columns);
    printer.header(out)?;
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        for row in &chunk.rows {
            printer.row(out, row)?;
        }
        for bucket in &chunk.buckets {
            printer.bucket(out, bucket)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Every registered device.
pub(crate) async fn list_devices(
    client: &mut OperatorClient<Channel>,
) -> anyhow::Result<Vec<pb::DeviceInfo>> {
    Ok(client
        .list_devices(pb::ListDevicesRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .devices)
}

/// `hub devices`.
pub async fn devices(args: &DevicesArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut client = connect(&args.addr).await?;
    let devices = list_devices(&mut client).await?;
    output::print_devices(args.format, &devices, out)?;
    out.flush()?;
    Ok(())
}

/// `hub watch`: prints committed readings until the hub ends the stream (or
/// the process is stopped). Skipped readings are reported on stderr.
pub async fn watch(args: &WatchArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut client = connect(&args.addr).await?;
    let mut stream = client
        .watch_readings(pb::WatchReadingsRequest {
            device_id: args.device.clone().unwrap_or_default(),
            sensor: args.sensor.clone().unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    output::print_live_header(args.format, out)?;
    while let Some(event) = stream.message().await.map_err(status_error)? {
        if event.skipped > 0 {
            eprintln!("(too slow: skipped {} readings)", event.skipped);
        }
        for r in &event.readings {
            output::print_live(args.format, r, out)?;
        }
        out.flush()?;
    }
    Ok(())
}

/// `hub stats`.
pub async fn stats(args: &DevicesArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut client = connect(&args.addr).await?;
    let stats = client
        .get_hub_stats(pb::GetHubStatsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    output::print_stats(args.format, &stats, out)?;
    out.flush()?;
    Ok(())
}

/// A hub's error status as one readable line.
pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("hub answered {:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_arguments() {
        assert_eq!(
            parse_time("2026-01-02T03:04:05Z").unwrap(),
            1_767_323_045_000
        );
        assert_eq!(
            parse_time("2026-01-02T03:04:05.250Z").unwrap(),
            1_767_323_045_250
        );
        let now = system_time_ms(SystemTime::now());
        let ago = parse_time("15m").unwrap();
        assert!((now - ago - 900_000).abs() < 5_000, "{now} {ago}");
        assert!(parse_time("yesterday-ish").is_err());
    }
}
