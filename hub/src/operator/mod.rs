//! What an operator can ask of the hub, whichever door the request comes
//! through. Validation, limits and errors live here once; a door (the gRPC
//! Operator service, the HTTP API in `crate::http`, the CLI's argument
//! parsing) only translates its own request and response types.
//!
//! `live` holds what stays open (watches, streamed answers) and the one
//! budget of them every door shares; `admin` changes devices and takes
//! backups.

mod admin;
pub mod alarms;
pub mod jobs;
mod live;
pub mod prom;
mod twin;

pub use admin::{Backups, parse_sha256};
pub use live::{CommandWatch, LiveEvent, QueryRun, ReadingsWatch, WatchSlot};
pub use twin::{TwinWatch, TwinWatchEvent, check_tags};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::commands::{CommandError, Commands, NewCommand};
use crate::devices::DeviceAdminError;
use crate::domain::{
    Aggregate, CommandRecord, CommandTransition, CommittedBatch, DeviceRecord, LiveReading,
    Presence, ReadingQuery,
};
use crate::ingest::IngestQueue;
use crate::metrics::HubMetrics;
use crate::registry::SessionRegistry;
use crate::store::backup::BackupError;
use crate::store::commands::CommandFilter;
use crate::store::{Store, StoreError};

/// Devices per page when the caller names no limit.
pub const DEVICE_PAGE: u32 = 1000;
/// The most devices one page may hold.
pub const MAX_DEVICE_PAGE: u32 = 10_000;
/// Commands listed when the caller names no limit.
pub const COMMAND_PAGE: u32 = 1000;
/// The most commands one listing may hold.
pub const MAX_COMMAND_PAGE: u32 = 100_000;

/// The most devices one filtered listing reads from the store before it
/// answers (with a cursor to go on from when its page is not full yet).
pub const MAX_DEVICE_SCAN: usize = 100_000;
/// The most devices one command sent by label selector may reach.
pub const MAX_SELECTOR_DEVICES: usize = 10_000;
/// A client that takes no part of a streamed answer (a readings body, an
/// event or watch stream) for this long is dropped, whatever its door: it
/// must not hold a slot of the budgets of long calls.
pub const STALLED_CLIENT: Duration = Duration::from_secs(30);

/// What aggregates a bucketed query shows when it names none.
pub const DEFAULT_AGGREGATES: [Aggregate; 2] = [Aggregate::Count, Aggregate::Avg];

/// The kind of failure, which each door turns into its own status (gRPC
/// code, HTTP status); the names are gRPC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    /// Too many at once of what the hub serves a few of at a time (live
    /// streams, streamed answers): come back later. gRPC's
    /// RESOURCE_EXHAUSTED, HTTP's 503.
    Busy,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The snake-case name an HTTP error body carries.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::Busy | ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The request itself is wrong; the message says how.
    #[error("{0}")]
    Invalid(String),
    /// It names something the hub does not have.
    #[error("{0}")]
    NotFound(String),
    /// The hub failed while answering (the log has the details).
    #[error("{0}")]
    Internal(String),
    /// Over one of the hub's budgets of long-lived calls.
    #[error("{0}")]
    Busy(String),
    /// Not done now (storage failing, the hub stopping): try again.
    #[error("{0}")]
    Unavailable(String),
    /// The operation cannot be done here (a backup on PostgreSQL, one
    /// already running).
    #[error("{0}")]
    Precondition(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Refused or failed by the commands task (its own codes: unknown
    /// device or command, bad name or params, a full queue, ...).
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    DeviceAdmin(#[from] DeviceAdminError),
    #[error(transparent)]
    Backup(#[from] BackupError),
}

impl OpError {
    pub fn code(&self) -> ErrorCode {
        match self {
            OpError::Invalid(_) => ErrorCode::InvalidArgument,
            OpError::NotFound(_) => ErrorCode::NotFound,
            OpError::Internal(_) | OpError::Store(_) => ErrorCode::Internal,
            OpError::Busy(_) => ErrorCode::Busy,
            OpError::Unavailable(_) => ErrorCode::Unavailable,
            OpError::Precondition(_) => ErrorCode::FailedPrecondition,
            OpError::Command(e) => match e {
                CommandError::UnknownDevice(_) | CommandError::UnknownCommand(_) => {
                    ErrorCode::NotFound
                }
                CommandError::TooManyPending { .. } => ErrorCode::ResourceExhausted,
                CommandError::Invalid(_) => ErrorCode::InvalidArgument,
                CommandError::AlreadyFinal { .. } => ErrorCode::FailedPrecondition,
                CommandError::Closed | CommandError::LogUnavailable => ErrorCode::Unavailable,
                CommandError::Store(_) => ErrorCode::Internal,
            },
            OpError::DeviceAdmin(e) => match e {
                DeviceAdminError::BadId(_) | DeviceAdminError::BadLabels(_) => {
                    ErrorCode::InvalidArgument
                }
                DeviceAdminError::NotFound(_) => ErrorCode::NotFound,
                DeviceAdminError::Ingest(_) => ErrorCode::Unavailable,
            },
            OpError::Backup(e) => match e {
                BackupError::BadName(_) => ErrorCode::InvalidArgument,
                BackupError::Exists(_) => ErrorCode::AlreadyExists,
                BackupError::CreateDir(..) | BackupError::Store(StoreError::NotOnPostgres(..)) => {
                    ErrorCode::FailedPrecondition
                }
                BackupError::Unsound(..) | BackupError::Store(_) => ErrorCode::Internal,
            },
        }
    }

    /// What the caller is told. A storage error is logged here and told as
    /// a generic message: its details (paths, SQL) stay in the hub's log.
    pub fn public_message(&self) -> String {
        match self {
            OpError::Store(e)
            | OpError::Command(CommandError::Store(e))
            | OpError::Backup(BackupError::Store(e))
                if !matches!(e, StoreError::NotOnPostgres(..)) =>
            {
                tracing::error!(error = %e, "storage error");
                "storage error; see the hub's log".to_owned()
            }
            other => other.to_string(),
        }
    }
}

/// A time as an operator writes it: a duration before now (`15m`), an
/// RFC3339 time (`2026-01-02T03:04:05Z`) or milliseconds since the epoch;
/// as ms since the epoch.
pub fn parse_time(raw: &str) -> Result<i64, String> {
    let raw = raw.trim();
    if !raw.is_empty()
        && raw
            .trim_start_matches('-')
            .bytes()
            .all(|b| b.is_ascii_digit())
        && let Ok(ms) = raw.parse::<i64>()
    {
        return Ok(ms);
    }
    if let Ok(ago) = humantime::parse_duration(raw) {
        let now = SystemTime::now();
        let at = now.checked_sub(ago).unwrap_or(UNIX_EPOCH);
        return Ok(system_time_ms(at));
    }
    humantime::parse_rfc3339_weak(raw)
        .map(system_time_ms)
        .map_err(|_| {
            format!(
                "{raw:?} is neither a duration (15m), an RFC3339 time (2026-01-02T03:04:05Z) \
                 nor milliseconds since the epoch"
            )
        })
}

fn system_time_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// The widest bucket a query may ask for: 100 years.
pub const MAX_BUCKET_MS: i64 = 100 * 365 * 86_400 * 1000;

/// A bucket width written as text (`1m`, `250ms`): 1 ms to 100 years.
pub fn parse_bucket(raw: &str) -> Result<Duration, String> {
    let width = humantime::parse_duration(raw).map_err(|e| format!("{raw:?}: {e}"))?;
    if width < Duration::from_millis(1) || width.as_millis() > MAX_BUCKET_MS as u128 {
        return Err(format!("a bucket is 1ms to 100years, not {raw:?}"));
    }
    Ok(width)
}

/// Aggregates named in a comma-separated list (`avg,min,max`); empty: the
/// defaults.
pub fn parse_aggregates(raw: &str) -> Result<Vec<Aggregate>, String> {
    let mut out = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let agg = Aggregate::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                format!("unknown aggregate {name:?} (avg, min, max, count, sum, first, last)")
            })?;
        if !out.contains(&agg) {
            out.push(agg);
        }
    }
    if out.is_empty() {
        out.extend(DEFAULT_AGGREGATES);
    }
    Ok(out)
}

/// Which devices a listing or a selector means: a fleet filter
/// (`crate::twin::filter`; tag selectors `key=value` are its tag clauses).
pub use crate::twin::filter::Filter as DeviceFilter;

/// Parses a fleet filter (`tags.site = plant-7 and in_sync = false`).
pub fn parse_filter(text: &str) -> Result<DeviceFilter, String> {
    crate::twin::filter::parse(text)
}

/// Parses `key=value` tag selectors.
pub fn parse_labels<'a>(
    raw: impl IntoIterator<Item = &'a str>,
) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for item in raw {
        let (k, v) = item
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| format!("a tag selector is key=value, not {item:?}"))?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

/// One committed reading with its device, as a live watcher sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReading<'a> {
    pub device_id: &'a str,
    pub reading: &'a LiveReading,
}

/// The readings of a committed batch that a watcher of `device` and
/// `sensor` (None: all) wants.
pub fn live_readings<'a>(
    batch: &'a CommittedBatch,
    device: Option<&'a str>,
    sensor: Option<&'a str>,
) -> impl Iterator<Item = DeviceReading<'a>> + 'a {
    batch
        .devices
        .iter()
        .filter(move |d| device.is_none_or(|want| *d.device_id == *want))
        .flat_map(move |d| {
            d.readings
                .iter()
                .filter(move |r| sensor.is_none_or(|want| *r.sensor == *want))
                .map(move |reading| DeviceReading {
                    device_id: &d.device_id,
                    reading,
                })
        })
}

/// A readings query as an operator asks it.
#[derive(Debug, Clone, Default)]
pub struct ReadingsRequest {
    pub device_id: String,
    /// None or empty: every sensor of the device.
    pub sensor: Option<String>,
    /// Inclusive.
    pub since_ms: Option<i64>,
    /// Exclusive.
    pub until_ms: Option<i64>,
    /// Most rows (or buckets); 0 = no limit.
    pub limit: u64,
    /// Bucket width; 0 = raw readings.
    pub bucket_ms: i64,
}

/// One page of the device list, in device id order.
#[derive(Debug)]
pub struct DevicePage {
    /// Each device, with when its live stream began if it has one.
    pub devices: Vec<(DeviceRecord, Option<i64>)>,
    /// Where the next page starts; empty on the last page.
    pub next_after: String,
}

/// The hub's counters and gauges, as an operator sees them.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct HubStats {
    pub live_sessions: u64,
    pub readings_committed: u64,
    pub readings_stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub compactions: u64,
    pub compaction_failures: u64,
    pub storage_ok: bool,
    pub ingest_queue_depth: u64,
    pub ingest_uncommitted: u64,
    pub live_tasks: u64,
    pub auth_failures: u64,
    pub mqtt_connected: bool,
    pub mqtt_dropped: u64,
    pub mqtt_bad_messages: u64,
    pub mqtt_connection_errors: u64,
}

/// What the core works with: the hub's parts, as `app` made them.
pub struct OperationsParts {
    pub store: Store,
    pub commands: Commands,
    pub registry: Arc<SessionRegistry>,
    pub metrics: Arc<HubMetrics>,
    pub ingest: IngestQueue,
    /// Long-lived work (watches, answers, fan-outs) runs here.
    pub tracker: TaskTracker,
    /// Cancelled when the hub begins to shut down: watches end.
    pub shutdown: CancellationToken,
    pub fanout: broadcast::Sender<Arc<CommittedBatch>>,
    pub twins: Arc<crate::twin::TwinHub>,
    pub alarms: Arc<crate::alarms::AlarmHub>,
    pub twin_limits: crate::twin::DocLimits,
    pub backups: Backups,
    /// `server.max_watches`, `server.max_queries`.
    pub max_watches: usize,
    pub max_queries: usize,
}

pub struct Operations {
    store: Store,
    commands: Commands,
    registry: Arc<SessionRegistry>,
    metrics: Arc<HubMetrics>,
    ingest: IngestQueue,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    fanout: broadcast::Sender<Arc<CommittedBatch>>,
    twins: Arc<crate::twin::TwinHub>,
    alarms: Arc<crate::alarms::AlarmHub>,
    twin_limits: crate::twin::DocLimits,
    backups: Backups,
    budgets: live::Budgets,
}

impl Operations {
    pub fn new(parts: OperationsParts) -> Self {
        Self {
            store: parts.store,
            commands: parts.commands,
            registry: parts.registry,
            metrics: parts.metrics,
            ingest: parts.ingest,
            tracker: parts.tracker,
            shutdown: parts.shutdown,
            fanout: parts.fanout,
            twins: parts.twins,
            alarms: parts.alarms,
            twin_limits: parts.twin_limits,
            backups: parts.backups,
            budgets: live::Budgets::new(parts.max_watches, parts.max_queries),
        }
    }

    /// Every command state change from now on, for the holder of `_slot`.
    pub fn watch_commands(&self, _slot: &WatchSlot) -> broadcast::Receiver<CommandRecord> {
        self.commands.subscribe()
    }

    /// Devices' streams coming and going from now on, for the holder of
    /// `_slot`.
    pub fn watch_presence(&self, _slot: &WatchSlot) -> broadcast::Receiver<Presence> {
        self.registry.subscribe()
    }

    /// Devices with a stream open now.
    pub fn online_count(&self) -> usize {
        self.registry.live_count()
    }

    /// Checks a readings query and resolves its device;
    /// [`Operations::run_query`] answers it.
    pub async fn readings_query(&self, req: ReadingsRequest) -> Result<ReadingQuery, OpError> {
        if req.device_id.is_empty() {
            return Err(OpError::Invalid("device_id is required".into()));
        }
        // Any positive width is answered (buckets never overflow); text
        // doors bound what they parse with `parse_bucket`.
        if req.bucket_ms < 0 {
            return Err(OpError::Invalid("bucket_ms must not be negative".into()));
        }
        if let (Some(since), Some(until)) = (req.since_ms, req.until_ms)
            && since >= until
        {
            return Err(OpError::Invalid("since must be before until".into()));
        }
        let device = self.device(&req.device_id).await?;
        Ok(ReadingQuery {
            device: device.key,
            sensor: req.sensor.filter(|s| !s.is_empty()),
            since_ms: req.since_ms,
            until_ms: req.until_ms,
            limit: req.limit,
            bucket_ms: (req.bucket_ms > 0).then_some(req.bucket_ms),
        })
    }

    /// Devices after `after` in id order; `limit` 0 means [`DEVICE_PAGE`],
    /// and at most [`MAX_DEVICE_PAGE`].
    pub async fn list_devices(&self, after: &str, limit: u32) -> Result<DevicePage, OpError> {
        self.find_devices(after, limit, &DeviceFilter::default())
            .await
    }

    /// Like [`Self::list_devices`], of the devices `filter` matches: the
    /// store is read page by page until the page is full, the list ends, or
    /// [`MAX_DEVICE_SCAN`] devices were read. `next_after` is where to go
    /// on from (empty when the list is done), so a page may hold fewer
    /// than `limit` devices and still have a next one.
    pub async fn find_devices(
        &self,
        after: &str,
        limit: u32,
        filter: &DeviceFilter,
    ) -> Result<DevicePage, OpError> {
        let limit = match limit {
            0 => DEVICE_PAGE,
            n => n.min(MAX_DEVICE_PAGE),
        } as usize;
        let online = self.registry.online();
        let mut devices = Vec::new();
        let mut cursor = after.to_owned();
        let mut scanned = 0;
        let mut exhausted = false;
        // The store filters by everything but `online`, which this hub's
        // registry (or, of other hubs' devices, the database) answers.
        let by_online = filter.online().next().is_some();
        while devices.len() < limit && scanned < MAX_DEVICE_SCAN {
            let want = if !by_online {
                limit - devices.len()
            } else {
                (MAX_DEVICE_PAGE as usize).min(MAX_DEVICE_SCAN - scanned)
            };
            let page = self
                .store
                .list_devices(&cursor, want as u32, filter)
                .await?;
            exhausted = page.len() < want;
            for d in page {
                if devices.len() == limit {
                    // The rest of this page is unread: the list goes on.
                    exhausted = false;
                    break;
                }
                scanned += 1;
                cursor.clone_from(&d.device_id);
                let since = online.get(&d.device_id).copied().or(d.online_since_ms);
                if filter.online().all(|c| c.flag(since.is_some())) {
                    devices.push((d, since));
                }
            }
            if exhausted {
                break;
            }
        }
        let next_after = if exhausted { String::new() } else { cursor };
        Ok(DevicePage {
            devices,
            next_after,
        })
    }

    /// One device, with when its live stream began if it has one.
    pub async fn get_device(
        &self,
        device_id: &str,
    ) -> Result<(DeviceRecord, Option<i64>), OpError> {
        let device = self.device(device_id).await?;
        let since = self
            .registry
            .online()
            .get(&device.device_id)
            .copied()
            .or(device.online_since_ms);
        Ok((device, since))
    }

    /// The names of the sensors a device has readings for.
    pub async fn device_sensors(&self, device_id: &str) -> Result<Vec<String>, OpError> {
        let device = self.device(device_id).await?;
        let sensors = self.store.device_sensors(device.key).await?;
        Ok(sensors.into_iter().map(|(_, name)| name).collect())
    }

    async fn device(&self, device_id: &str) -> Result<DeviceRecord, OpError> {
        if device_id.is_empty() {
            return Err(OpError::Invalid("device_id is required".into()));
        }
        self.store
            .find_device(device_id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("unknown device {device_id:?}")))
    }

    pub async fn stats(&self) -> Result<HubStats, OpError> {
        let m = &self.metrics;
        Ok(HubStats {
            live_sessions: m.live_sessions(),
            readings_committed: HubMetrics::get(&m.readings_committed),
            readings_stored: self.store.total_readings().await?,
            duplicates: HubMetrics::get(&m.duplicates),
            rejected: HubMetrics::get(&m.rejected),
            commits: HubMetrics::get(&m.commits),
            commit_failures: HubMetrics::get(&m.commit_failures),
            compactions: HubMetrics::get(&m.compactions),
            compaction_failures: HubMetrics::get(&m.compaction_failures),
            storage_ok: m.storage_ok(),
            ingest_queue_depth: self.ingest.depth() as u64,
            ingest_uncommitted: HubMetrics::get(&m.uncommitted_rows),
            live_tasks: self.tracker.len() as u64,
            auth_failures: HubMetrics::get(&m.auth_failures),
            mqtt_connected: m.mqtt_connected.load(std::sync::atomic::Ordering::Relaxed),
            mqtt_dropped: HubMetrics::get(&m.mqtt_dropped),
            mqtt_bad_messages: HubMetrics::get(&m.mqtt_bad_messages),
            mqtt_connection_errors: HubMetrics::get(&m.mqtt_connection_errors),
        })
    }

    /// Queues a command; `ttl` None takes the hub's default, and the
    /// commands task checks the rest (name, params, TTL range, device).
    pub async fn send_command(
        &self,
        device_id: String,
        name: String,
        params_json: String,
        ttl: Option<Duration>,
    ) -> Result<CommandRecord, OpError> {
        let cmd = NewCommand {
            device_id,
            name,
            params: params_json,
            ttl,
            id: None,
        };
        Ok(self.commands.send(cmd).await?)
    }

    /// [`Operations::send_command`] under the caller's id: the same id
    /// again returns the command already there instead of a second one.
    pub(crate) async fn send_command_once(
        &self,
        command_id: String,
        device_id: String,
        name: String,
        params_json: String,
        ttl: Option<Duration>,
    ) -> Result<CommandRecord, OpError> {
        let cmd = NewCommand {
            device_id,
            name,
            params: params_json,
            ttl,
            id: Some(command_id),
        };
        Ok(self.commands.send(cmd).await?)
    }

    /// Sends one command to every device `selector` matches (at most
    /// [`MAX_SELECTOR_DEVICES`]); each device's result, in id order. No
    /// device matching is an error, so a typo in a label is not a silent
    /// no-op; so is a command the first device refuses as invalid (name,
    /// params or TTL, the same for all), before any other is sent. The
    /// sending runs on the hub's tracker: a caller that goes away midway
    /// does not leave an arbitrary subset sent.
    pub async fn send_command_to_selector(
        self: &Arc<Self>,
        selector: &DeviceFilter,
        name: String,
        params_json: String,
        ttl: Option<Duration>,
    ) -> Result<Vec<(String, Result<CommandRecord, OpError>)>, OpError> {
        let targets = self.selector_targets(selector).await?;
        let ops = Arc::clone(self);
        let sending = self.tracker.spawn(async move {
            let mut sent = Vec::with_capacity(targets.len());
            for device_id in targets {
                let result = ops
                    .send_command(device_id.clone(), name.clone(), params_json.clone(), ttl)
                    .await;
                if let Err(OpError::Command(CommandError::Invalid(why))) = &result
                    && sent.is_empty()
                {
                    return Err(OpError::Invalid(why.clone()));
                }
                sent.push((device_id, result));
            }
            Ok(sent)
        });
        sending.await.map_err(|e| {
            tracing::error!(error = %e, "sending a command to a selector failed");
            OpError::Internal("the hub failed while sending; see its log".into())
        })?
    }

    /// The devices a selector means, in id order: it must require a tag
    /// (devices cannot change tags, so one cannot join by reporting
    /// something), match at least one device and at most
    /// [`MAX_SELECTOR_DEVICES`].
    pub(crate) async fn selector_targets(
        &self,
        selector: &DeviceFilter,
    ) -> Result<Vec<String>, OpError> {
        if !selector.names_a_tag() {
            return Err(OpError::Invalid(
                "a selector names at least one tag (tags.KEY = VALUE)".into(),
            ));
        }
        let mut targets = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.find_devices(&after, MAX_DEVICE_PAGE, selector).await?;
            targets.extend(page.devices.into_iter().map(|(d, _)| d.device_id));
            if targets.len() > MAX_SELECTOR_DEVICES {
                return Err(OpError::Invalid(format!(
                    "the selector matches more than {MAX_SELECTOR_DEVICES} devices"
                )));
            }
            if page.next_after.is_empty() {
                break;
            }
            after = page.next_after;
        }
        if targets.is_empty() {
            return Err(OpError::NotFound("no device matches the selector".into()));
        }
        Ok(targets)
    }

    /// A command and its history of state changes.
    pub async fn get_command(
        &self,
        command_id: &str,
    ) -> Result<(CommandRecord, Vec<CommandTransition>), OpError> {
        Ok(self.commands.get(command_id).await?)
    }

    pub async fn cancel_command(&self, command_id: &str) -> Result<CommandRecord, OpError> {
        Ok(self.commands.cancel(command_id).await?)
    }

    /// Commands matching `filter`; its limit 0 means [`COMMAND_PAGE`], and
    /// at most [`MAX_COMMAND_PAGE`].
    pub async fn list_commands(
        &self,
        mut filter: CommandFilter,
    ) -> Result<Vec<CommandRecord>, OpError> {
        filter.limit = match filter.limit {
            0 => COMMAND_PAGE,
            n => n.min(MAX_COMMAND_PAGE),
        };
        Ok(self.commands.list(&filter).await?)
    }
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
        assert_eq!(parse_time("1767323045250").unwrap(), 1_767_323_045_250);
        assert_eq!(parse_time("-5").unwrap(), -5);
        let now = system_time_ms(SystemTime::now());
        let ago = parse_time("15m").unwrap();
        assert!((now - ago - 900_000).abs() < 5_000, "{now} {ago}");
        for bad in ["yesterday-ish", "", "-", "99999999999999999999"] {
            assert!(parse_time(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn aggregates_and_label_selectors() {
        assert_eq!(parse_aggregates("").unwrap(), DEFAULT_AGGREGATES.to_vec());
        assert_eq!(
            parse_aggregates("MIN, max,min").unwrap(),
            vec![Aggregate::Min, Aggregate::Max]
        );
        assert!(parse_aggregates("median").unwrap_err().contains("median"));
        let labels = parse_labels(["site=a", "rack="]).unwrap();
        assert_eq!(labels.get("site").map(String::as_str), Some("a"));
        assert_eq!(labels.get("rack").map(String::as_str), Some(""));
        assert!(parse_labels(["=a"]).is_err());
        assert!(parse_labels(["site"]).is_err());
    }
}
