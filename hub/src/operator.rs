//! What an operator can ask of the hub, whichever door the request comes
//! through. Validation, limits and errors live here once; a door (the gRPC
//! Operator service today, an HTTP API next) only translates its own
//! request and response types.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::commands::{CommandError, Commands, NewCommand};
use crate::domain::{CommandRecord, DeviceRecord, ReadingQuery};
use crate::ingest::IngestQueue;
use crate::metrics::HubMetrics;
use crate::registry::SessionRegistry;
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

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The request itself is wrong; the message says how.
    #[error("{0}")]
    Invalid(String),
    /// It names something the hub does not have.
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Refused or failed by the commands task (its own codes: unknown
    /// device or command, bad name or params, a full queue, ...).
    #[error(transparent)]
    Command(#[from] CommandError),
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
#[derive(Debug, Clone, Default)]
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

pub struct Operations {
    store: Store,
    commands: Commands,
    registry: Arc<SessionRegistry>,
    metrics: Arc<HubMetrics>,
    ingest: IngestQueue,
    tracker: TaskTracker,
}

impl Operations {
    pub fn new(
        store: Store,
        commands: Commands,
        registry: Arc<SessionRegistry>,
        metrics: Arc<HubMetrics>,
        ingest: IngestQueue,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            store,
            commands,
            registry,
            metrics,
            ingest,
            tracker,
        }
    }

    /// Checks a readings query and resolves its device; `query::run`
    /// answers it.
    pub async fn readings_query(&self, req: ReadingsRequest) -> Result<ReadingQuery, OpError> {
        if req.device_id.is_empty() {
            return Err(OpError::Invalid("device_id is required".into()));
        }
        if req.bucket_ms < 0 {
            return Err(OpError::Invalid("bucket_ms must not be negative".into()));
        }
        if let (Some(since), Some(until)) = (req.since_ms, req.until_ms)
            && since >= until
        {
            return Err(OpError::Invalid("since must be before until".into()));
        }
        let device = self
            .store
            .find_device(&req.device_id)
            .await?
            .ok_or_else(|| OpError::NotFound(format!("unknown device {:?}", req.device_id)))?;
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
        let limit = match limit {
            0 => DEVICE_PAGE,
            n => n.min(MAX_DEVICE_PAGE),
        };
        let page = self.store.list_devices(after, limit).await?;
        let next_after = if page.len() == limit as usize {
            page.last().map(|d| d.device_id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        let online = self.registry.online();
        let devices = page
            .into_iter()
            .map(|d| {
                let since = online.get(&d.device_id).copied();
                (d, since)
            })
            .collect();
        Ok(DevicePage {
            devices,
            next_after,
        })
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

    /// Queues a command; `ttl_ms` 0 takes the hub's default, and the
    /// commands task checks the rest (name, params, TTL range, device).
    pub async fn send_command(
        &self,
        device_id: String,
        name: String,
        params_json: String,
        ttl_ms: i64,
    ) -> Result<CommandRecord, OpError> {
        if ttl_ms < 0 {
            return Err(OpError::Invalid("ttl_ms must not be negative".into()));
        }
        let cmd = NewCommand {
            device_id,
            name,
            params: params_json,
            ttl: (ttl_ms > 0).then(|| std::time::Duration::from_millis(ttl_ms as u64)),
        };
        Ok(self.commands.send(cmd).await?)
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
