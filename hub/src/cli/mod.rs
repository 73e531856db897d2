//! The `hub` command line: `serve` and `print-config` run locally; `query`
//! and `devices` are gRPC clients of a running hub; `demo` runs a hub and a
//! simulated fleet in one process.

mod alarm;
pub mod certs;
mod command;
mod demo;
mod job;
mod output;
mod twin;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use telemetry_proto::v1::{self as pb, operator_client::OperatorClient};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use crate::operator::{parse_bucket, parse_time};
pub use alarm::{AlarmAction, run as alarm};
pub use command::{CommandAction, run as command};
pub use demo::{DemoArgs, demo};
pub use job::{JobAction, run as job};
use output::{BucketColumns, Format};
pub use twin::{TagArgs, TwinAction, run as twin, tag};

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
    /// List registered devices, or add, rotate-token, remove one.
    Devices(DevicesCmd),
    /// Send, list, show and cancel device commands.
    #[command(subcommand)]
    Command(CommandAction),
    /// A device's twin: get it, change its desired state, watch it.
    #[command(subcommand)]
    Twin(TwinAction),
    /// Alarm rules and alarms: list, set and delete rules; list,
    /// acknowledge, clear and watch alarms.
    #[command(subcommand)]
    Alarm(AlarmAction),
    /// Fleet rollouts: create a job (a desired change or a command, at a
    /// rate, with a concurrency and abort thresholds), list, show, pause,
    /// resume, cancel.
    #[command(subcommand)]
    Job(JobAction),
    /// Live tail of committed readings.
    Watch(WatchArgs),
    /// Show the live counters of a running hub.
    Stats(DevicesArgs),
    /// Run a hub and a simulated fleet in one process (Ctrl-C stops).
    Demo(DemoArgs),
    /// Copy both databases, online and consistent, into a new directory
    /// below the hub's storage.backup_dir (admin), and verify the copy.
    Backup(BackupArgs),
    /// Write a CA, the hub's TLS certificate and device certificates (for
    /// auth.devices = "tls") that work together, and print the settings.
    Certs(certs::CertsArgs),
}

/// How to reach a running hub.
#[derive(Args, Clone)]
pub struct HubAddr {
    /// URL of the running hub (https:// for TLS).
    #[arg(long, env = "HUB_ADDR", default_value = "http://127.0.0.1:50051")]
    pub hub: String,
    /// Operator token, sent as `authorization: Bearer` (never printed).
    #[arg(long, env = "HUB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the hub's certificate, for https://.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), when the hub asks for one (mTLS).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

/// Written by hand so the token never prints.
impl std::fmt::Debug for HubAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubAddr")
            .field("hub", &self.hub)
            .field("token", &self.token.as_ref().map(|_| "********"))
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

/// `hub devices` lists; its subcommands manage enrollment (admin).
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevicesCmd {
    #[command(subcommand)]
    pub action: Option<DeviceAction>,
    #[command(flatten)]
    pub list: DevicesArgs,
    #[command(flatten)]
    pub filter: ListFilter,
}

/// Which devices `hub devices` lists.
#[derive(Args, Debug, Default)]
pub struct ListFilter {
    /// Only devices with this tag (key=value; repeatable, all must match).
    #[arg(long = "tag", value_parser = parse_label)]
    pub tags: Vec<(String, String)>,
    /// A fleet filter: `tags.site = plant-7 and in_sync = false`,
    /// `reported.battery < 20`, `reported.hello.firmware != 1.4`.
    #[arg(long = "where")]
    pub filter: Option<String>,
}

impl ListFilter {
    fn text(&self) -> String {
        let mut clauses = twin::tag_clauses(&self.tags);
        clauses.extend(self.filter.clone());
        clauses.join(" and ")
    }
}

#[derive(Subcommand, Debug)]
pub enum DeviceAction {
    /// Add a device (or re-add a removed one) and print its token, once.
    Add {
        #[command(flatten)]
        addr: HubAddr,
        /// Device id.
        id: String,
        /// A tag key=value (repeatable; `--label` is the older name).
        #[arg(long = "tag", alias = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Set (`key=value`) and remove (`key-`) a device's tags.
    Tag(TagArgs),
    /// Give a device a new token (the old one stops working) and print it.
    RotateToken {
        #[command(flatten)]
        addr: HubAddr,
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove a device: its stream ends and it is refused until added again.
    Remove {
        #[command(flatten)]
        addr: HubAddr,
        id: String,
    },
    /// auth.devices = "tls": pin a device to one client certificate (or
    /// unpin it with --none); its stream ends and reconnects under the pin.
    PinCert {
        #[command(flatten)]
        addr: HubAddr,
        id: String,
        #[command(flatten)]
        cert: CertArg,
        /// Unpin: any certificate naming the device is accepted again.
        #[arg(long, conflicts_with_all = ["pem", "fingerprint"])]
        none: bool,
    },
    /// Refuse a client certificate from now on, whatever device it names,
    /// also after the device is removed and added again.
    RevokeCert {
        #[command(flatten)]
        addr: HubAddr,
        #[command(flatten)]
        cert: CertArg,
    },
}

/// A client certificate: its PEM file, or its SHA-256 fingerprint.
#[derive(Args, Debug)]
pub struct CertArg {
    /// The certificate's PEM file (its fingerprint is computed here).
    #[arg(long, conflicts_with = "fingerprint")]
    pub pem: Option<std::path::PathBuf>,
    /// The SHA-256 of the certificate's DER: 64 hex digits, `:` allowed
    /// (`openssl x509 -noout -fingerprint -sha256 -in FILE`).
    #[arg(long)]
    pub fingerprint: Option<String>,
}

impl CertArg {
    /// The fingerprint as hex; None when neither was given.
    fn sha256(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.pem {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
                .map_err(|e| anyhow::anyhow!("{} is not a PEM certificate: {e}", path.display()))?;
            return Ok(Some(hex::encode(crate::auth::certificate_sha256(
                &pem.contents,
            ))));
        }
        Ok(self.fingerprint.clone())
    }
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    pub addr: HubAddr,
    /// The backup's name: a new directory below the hub's
    /// storage.backup_dir (default: `backups` beside its database).
    #[arg(long)]
    pub to: String,
}

/// `key=value`.
pub fn parse_label(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{raw:?} is not key=value"))
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

/// An Operator client that sends the operator token with every call.
pub type OperatorApi = OperatorClient<InterceptedService<Channel, Bearer>>;

/// Adds `authorization: Bearer <token>` when a token was given.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub async fn connect(addr: &HubAddr) -> anyhow::Result<OperatorApi> {
    let mut endpoint = Endpoint::from_shared(addr.hub.clone())
        .with_context(|| format!("invalid hub URL {:?}", addr.hub))?
        .connect_timeout(Duration::from_secs(5));
    if addr.hub.starts_with("https://") {
        endpoint = endpoint
            .tls_config(client_tls(addr)?)
            .context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the hub at {}", addr.hub))?;
    let bearer = match &addr.token {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse()
                .context("the operator token must be printable ASCII")?,
        ),
        None => None,
    };
    Ok(OperatorClient::with_interceptor(channel, Bearer(bearer)))
}

/// TLS for an https:// hub: the CA that signed its certificate (required:
/// no system roots are trusted) and, for mTLS, a client certificate.
fn client_tls(addr: &HubAddr) -> anyhow::Result<ClientTlsConfig> {
    let read = |path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let ca = addr
        .ca
        .as_ref()
        .context("an https:// hub needs --ca FILE (the CA that signed the hub's certificate)")?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
    if let (Some(cert), Some(key)) = (&addr.cert, &addr.key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
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

/// Every registered device a fleet filter matches (empty: all), page by
/// page.
pub(crate) async fn list_devices(
    client: &mut OperatorApi,
    filter: &str,
) -> anyhow::Result<Vec<pb::DeviceInfo>> {
    let mut devices = Vec::new();
    let mut after = String::new();
    loop {
        let page = client
            .list_devices(pb::ListDevicesRequest {
                after,
                limit: 0,
                r#where: filter.to_owned(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        devices.extend(page.devices);
        if page.next_after.is_empty() {
            return Ok(devices);
        }
        after = page.next_after;
    }
}

/// `hub devices add | rotate-token | remove`.
pub async fn device_action(action: &DeviceAction, out: &mut impl Write) -> anyhow::Result<()> {
    match action {
        DeviceAction::Add {
            addr,
            id,
            labels,
            format,
        } => {
            let creds = connect(addr)
                .await?
                .add_device(pb::AddDeviceRequest {
                    device_id: id.clone(),
                    labels: labels.iter().cloned().collect(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::print_credentials(*format, &creds, out)?;
        }
        DeviceAction::Tag(args) => tag(args, out).await?,
        DeviceAction::RotateToken { addr, id, format } => {
            let creds = connect(addr)
                .await?
                .rotate_device_token(pb::RotateDeviceTokenRequest {
                    device_id: id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            output::print_credentials(*format, &creds, out)?;
        }
        DeviceAction::Remove { addr, id } => {
            let done = connect(addr)
                .await?
                .remove_device(pb::RemoveDeviceRequest {
                    device_id: id.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let stream = if done.was_online {
                "; its stream was ended"
            } else {
                ""
            };
            writeln!(out, "removed {id}{stream}")?;
        }
        DeviceAction::PinCert {
            addr,
            id,
            cert,
            none,
        } => {
            let sha256 = match (cert.sha256()?, none) {
                (Some(sha256), false) => sha256,
                (None, true) => String::new(),
                _ => anyhow::bail!(
                    "name the certificate (--pem FILE or --fingerprint HEX), or --none"
                ),
            };
            connect(addr)
                .await?
                .pin_device_certificate(pb::PinDeviceCertificateRequest {
                    device_id: id.clone(),
                    sha256: sha256.clone(),
                })
                .await
                .map_err(status_error)?;
            if sha256.is_empty() {
                writeln!(out, "unpinned {id}")?;
            } else {
                writeln!(out, "pinned {id} to {sha256}")?;
            }
        }
        DeviceAction::RevokeCert { addr, cert } => {
            let Some(sha256) = cert.sha256()? else {
                anyhow::bail!("name the certificate: --pem FILE or --fingerprint HEX");
            };
            let done = connect(addr)
                .await?
                .revoke_certificate(pb::RevokeCertificateRequest {
                    sha256: sha256.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let already = if done.newly_revoked {
                ""
            } else {
                " (it was revoked already)"
            };
            writeln!(
                out,
                "revoked {sha256}{already}; {} stream(s) ended",
                done.streams_ended
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `hub backup --to DIR`.
pub async fn backup(args: &BackupArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let report = connect(&args.addr)
        .await?
        .backup(pb::BackupRequest {
            to: args.to.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    writeln!(
        out,
        "backup verified: {} ({} devices, {} readings) and {} ({} commands)",
        report.readings_path,
        report.devices,
        report.readings,
        report.commands_path,
        report.commands
    )?;
    out.flush()?;
    Ok(())
}

/// `hub devices`.
pub async fn devices(
    args: &DevicesArgs,
    filter: &ListFilter,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut client = connect(&args.addr).await?;
    let devices = list_devices(&mut client, &filter.text()).await?;
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
