//! The single writer: group commit, dedup by high-water mark, acks after
//! commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{IngestError, Registered, WriterMsg};
use crate::domain::{CheckedReading, DeviceKey, SensorKey, now_ms};
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
}

pub struct Writer {
    store: StoreWriter,
    rx: mpsc::Receiver<WriterMsg>,
    settings: WriterSettings,
    metrics: Arc<HubMetrics>,
    /// Committed (or, during a write, pending) high-water mark per device.
    high_water: HashMap<DeviceKey, u64>,
    sensors: HashMap<String, SensorKey>,
    sensors_loaded: bool,
    rows: Vec<RowToInsert>,
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
    ) -> Self {
        Self {
            store,
            rx,
            settings,
            metrics,
            high_water: HashMap::new(),
            sensors: HashMap::new(),
            sensors_loaded: false,
            rows: Vec::new(),
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
            Ok(outcomes) => self.deliver(group.drain(..).zip(outcomes)),
            Err(e) => {
                tracing::error!(error = %e, messages = group.len(), "commit failed; nothing in it is acked");
                // The in-memory marks may be ahead of the database now.
                self.high_water.clear();
                self.sensors.clear();
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

    /// Writes a group in one transaction; one outcome per message, in order.
    async fn write_group(
        &mut self,
        group: &[WriterMsg],
        now: i64,
    ) -> Result<Vec<Outcome>, StoreError> {
        if !self.sensors_loaded {
            self.sensors = self.store.load_sensors().await?.into_iter().collect();
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
