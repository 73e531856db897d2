//! The single writer: group commit, dedup by high-water mark, acks after
//! commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{IngestError, Registered, WriterMsg};
use crate::domain::{
    CheckedReading, CommittedBatch, DeviceKey, DeviceReadings, LiveReading, SensorKey, now_ms,
};
use crate::metrics::HubMetrics;
use crate::store::{DeviceProgress, RowToInsert, StoreError, StoreWriter};

#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// Commit as soon as this many rows are waiting...
    pub max_batch_rows: usize,
    /// ...or this long after the first of them arrived.
    pub max_batch_delay: Duration,
    /// Distinct sensor names the dictionary may hold.
    pub max_sensors: usize,
    /// Move staged readings into the clustered table once this many wait.
    pub compact_rows: u64,
}

pub struct Writer {
    store: StoreWriter,
    rx: mpsc::Receiver<WriterMsg>,
    settings: WriterSettings,
    metrics: Arc<HubMetrics>,
    /// Committed (or, during a write, pending) high-water mark per device.
    high_water: HashMap<DeviceKey, u64>,
    sensors: HashMap<String, SensorKey>,
    sensor_names: HashMap<SensorKey, Arc<str>>,
    sensors_loaded: bool,
    device_names: HashMap<DeviceKey, Arc<str>>,
    rows: Vec<RowToInsert>,
    /// Committed readings go here after each commit (MQTT, live watchers).
    fanout: broadcast::Sender<Arc<CommittedBatch>>,
    /// Readings published to the fan-out so far (its running index).
    published: u64,
    /// Readings waiting in the staging table (None: not counted yet).
    staged: Option<u64>,
}

/// What one queued message came to, delivered after the commit.
enum Outcome {
    Batch {
        device: DeviceKey,
        stored: u32,
        rejected: u32,
        duplicates: u32,
    },
    Registered(DeviceKey),
}

impl Writer {
    pub(crate) fn new(
        store: StoreWriter,
        rx: mpsc::Receiver<WriterMsg>,
        settings: WriterSettings,
        metrics: Arc<HubMetrics>,
        fanout: broadcast::Sender<Arc<CommittedBatch>>,
    ) -> Self {
        Self {
            store,
            rx,
            settings,
            metrics,
            high_water: HashMap::new(),
            sensors: HashMap::new(),
            sensor_names: HashMap::new(),
            sensors_loaded: false,
            device_names: HashMap::new(),
            rows: Vec::new(),
            fanout,
            published: 0,
            staged: None,
        }
    }

    /// Runs until every queue sender is gone, or until `stop`; then commits
    /// whatever is still queued and returns.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut group: Vec<WriterMsg> = Vec::new();
        loop {
            let first = tokio::select! {
                msg = self.rx.recv() => msg,
                _ = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            let mut rows = first.rows();
            group.push(first);
            let deadline = Instant::now() + self.settings.max_batch_delay;
            while rows < self.settings.max_batch_rows {
                let next = match self.rx.try_recv() {
                    Ok(msg) => Some(msg),
                    Err(TryRecvError::Disconnected) => None,
                    Err(TryRecvError::Empty) => tokio::select! {
                        msg = self.rx.recv() => msg,
                        _ = tokio::time::sleep_until(deadline) => None,
                        _ = stop.cancelled() => None,
                    },
                };
                let Some(msg) = next else { break };
                rows += msg.rows();
                group.push(msg);
            }
            self.commit_group(&mut group).await;
        }
        // Drain: nothing new is accepted; what was queued is committed.
        self.rx.close();
        while let Some(msg) = self.rx.recv().await {
            group.push(msg);
            if group.len() >= 1024 {
                self.commit_group(&mut group).await;
            }
        }
        self.commit_group(&mut group).await;
        if let Err(e) = self.store.close().await {
            tracing::warn!(error = %e, "closing the writer connection failed");
        }
    }

    async fn commit_group(&mut self, group: &mut Vec<WriterMsg>) {
        if group.is_empty() {
            return;
        }
        match self.write_group(group, now_ms()).await {
            Ok(outcomes) => {
                self.deliver(group.drain(..).zip(outcomes));
                self.publish();
                self.compact_if_due().await;
            }
            Err(e) => {
                tracing::error!(error = %e, messages = group.len(), "commit failed; nothing in it is acked");
                // The in-memory marks may be ahead of the database now.
                self.high_water.clear();
                self.sensors.clear();
                self.sensor_names.clear();
                self.sensors_loaded = false;
                for msg in group.drain(..) {
                    match msg {
                        WriterMsg::Batch(batch) => batch.ack.fail(),
                        WriterMsg::Register { reply, .. } => {
                            let _ = reply.send(Err(IngestError::Storage));
                        }
                    }
                }
            }
        }
    }

    /// After the commit: acks into session slots, replies to registrations.
    fn deliver(&self, done: impl Iterator<Item = (WriterMsg, Outcome)>) {
        let (mut stored_total, mut dups_total, mut rejected_total) = (0u64, 0u64, 0u64);
        for (msg, outcome) in done {
            match (msg, outcome) {
                (
                    WriterMsg::Batch(batch),
                    Outcome::Batch {
                        device,
                        stored,
                        rejected,
                        duplicates,
                    },
                ) => {
                    let acked = self.high_water.get(&device).copied().unwrap_or(0);
                    stored_total += u64::from(stored);
                    dups_total += u64::from(duplicates);
                    rejected_total += u64::from(rejected);
                    batch.ack.complete(acked, rejected, duplicates);
                }
                (WriterMsg::Register { reply, .. }, Outcome::Registered(device)) => {
                    let acked_seq = self.high_water.get(&device).copied().unwrap_or(0);
                    // The session may have gone meanwhile; nothing to tell.
                    let _ = reply.send(Ok(Registered { device, acked_seq }));
                }
                _ => unreachable!("outcomes are produced in message order"),
            }
        }
        HubMetrics::add(&self.metrics.readings_committed, stored_total);
        HubMetrics::add(&self.metrics.duplicates, dups_total);
        HubMetrics::add(&self.metrics.rejected, rejected_total);
        HubMetrics::add(&self.metrics.commits, 1);
    }

    /// Moves the staged readings into the clustered table once enough wait.
    /// Acks are out already; the next group waits for this (one writer).
    async fn compact_if_due(&mut self) {
        let staged = match self.staged {
            Some(n) => n + self.rows.len() as u64,
            None => match self.store.recent_rows().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot count staged readings");
                    return;
                }
            },
        };
        self.staged = Some(staged);
        // Under load (batches already waiting) runs grow up to 4x: a longer
        // run costs little more than a short one, so throughput holds up.
        let busy = !self.rx.is_empty();
        let run = if busy {
            self.settings.compact_rows.saturating_mul(4)
        } else {
            self.settings.compact_rows
        };
        if staged < run {
            return;
        }
        let started = std::time::Instant::now();
        match self.store.compact().await {
            Ok(moved) => {
                self.staged = Some(0);
                HubMetrics::add(&self.metrics.compactions, 1);
                tracing::debug!(
                    moved,
                    ms = started.elapsed().as_millis() as u64,
                    "compacted staged readings"
                );
            }
            // They stay staged (queries read them there); the next commit
            // tries again.
            Err(e) => {
                self.staged = None;
                tracing::error!(error = %e, "compaction failed");
            }
        }
    }

    /// Publishes what the last commit stored, grouped by device, to the
    /// fan-out. Never waits: a consumer that falls behind skips batches. Costs
    /// nothing when nobody listens.
    fn publish(&mut self) {
        let count = self.rows.len() as u64;
        let first_index = self.published;
        self.published += count;
        if count == 0 || self.fanout.receiver_count() == 0 {
            return;
        }
        let unknown: Arc<str> = Arc::from("");
        let mut devices: Vec<DeviceReadings> = Vec::new();
        let mut slots: HashMap<DeviceKey, usize> = HashMap::new();
        for r in &self.rows {
            let slot = *slots.entry(r.device).or_insert_with(|| {
                devices.push(DeviceReadings {
                    device_id: self
                        .device_names
                        .get(&r.device)
                        .cloned()
                        .unwrap_or_else(|| unknown.clone()),
                    readings: Vec::new(),
                });
                devices.len() - 1
            });
            devices[slot].readings.push(LiveReading {
                seq: r.seq as u64,
                sensor: self
                    .sensor_names
                    .get(&r.sensor)
                    .cloned()
                    .unwrap_or_else(|| unknown.clone()),
                ts_ms: r.ts_ms,
                value: r.value,
            });
        }
        let _ = self.fanout.send(Arc::new(CommittedBatch {
            first_index,
            count,
            devices,
        }));
    }

    /// Writes a group in one transaction; one outcome per message, in order.
    async fn write_group(
        &mut self,
        group: &[WriterMsg],
        now: i64,
    ) -> Result<Vec<Outcome>, StoreError> {
        if !self.sensors_loaded {
            let sensors = self.store.load_sensors().await?;
            self.sensor_names = sensors
                .iter()
                .map(|(name, key)| (*key, Arc::from(name.as_str())))
                .collect();
            self.sensors = sensors.into_iter().collect();
            self.sensors_loaded = true;
        }
        let mut outcomes = Vec::with_capacity(group.len());
        let mut added: HashMap<DeviceKey, u64> = HashMap::new();
        let mut rows = std::mem::take(&mut self.rows);
        rows.clear();
        let mut tx = self.store.begin().await?;
        for msg in group {
            match msg {
                WriterMsg::Register { hello, .. } => {
                    let (device, stored_mark) = tx.upsert_device(hello, now).await?;
                    self.high_water.entry(device).or_insert(stored_mark);
                    self.device_names
                        .entry(device)
                        .or_insert_with(|| Arc::from(hello.device_id.as_str()));
                    outcomes.push(Outcome::Registered(device));
                }
                WriterMsg::Batch(batch) => {
                    let device = batch.device;
                    let mark = match self.high_water.get(&device) {
                        Some(mark) => *mark,
                        None => tx.device_acked_seq(device).await?,
                    };
                    let (mut hwm, mut stored, mut rejected, mut duplicates) =
                        (mark, 0u32, 0u32, 0u32);
                    for reading in &batch.readings {
                        let seq = reading.seq();
                        if seq <= hwm {
                            duplicates += 1;
                            continue;
                        }
                        hwm = seq;
                        let CheckedReading::Valid(r) = reading else {
                            rejected += 1;
                            continue;
                        };
                        let sensor = match self.sensors.get(r.sensor.as_str()) {
                            Some(key) => *key,
                            None if self.sensors.len() >= self.settings.max_sensors => {
                                tracing::warn!(sensor = %r.sensor, limit = self.settings.max_sensors,
                                    "sensor dictionary is full; reading rejected");
                                rejected += 1;
                                continue;
                            }
                            None => {
                                let key = tx.sensor_key(&r.sensor).await?;
                                self.sensors.insert(r.sensor.clone(), key);
                                self.sensor_names.insert(key, Arc::from(r.sensor.as_str()));
                                key
                            }
                        };
                        rows.push(RowToInsert {
                            device,
                            sensor,
                            ts_ms: r.ts_ms,
                            seq: seq as i64,
                            value: r.value,
                        });
                        stored += 1;
                    }
                    self.high_water.insert(device, hwm);
                    *added.entry(device).or_default() += u64::from(stored);
                    outcomes.push(Outcome::Batch {
                        device,
                        stored,
                        rejected,
                        duplicates,
                    });
                }
            }
        }
        tx.insert_readings(&rows).await?;
        let progress: Vec<DeviceProgress> = added
            .into_iter()
            .map(|(device, added)| DeviceProgress {
                device,
                acked_seq: self.high_water.get(&device).copied().unwrap_or(0),
                added,
            })
            .collect();
        tx.record_progress(&progress, now).await?;
        tx.commit().await?;
        self.rows = rows;
        Ok(outcomes)
    }
}
