//! The single writer: group commit, dedup by high-water mark, acks after
//! commit.
//!
//! What the writer keeps in memory (marks, on SQLite the session epochs,
//! the sensor dictionary, each device's sensors) is a cache of committed
//! rows: a group's
//! changes are collected on the side and applied only after its COMMIT
//! succeeded. After a failed commit the caches are dropped and reloaded, and
//! every session with a batch in the failed group is done: its later batches
//! are skipped, so nothing of it is ever committed past the gap (its device
//! is told UNAVAILABLE and resends from the true mark).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::alarms::{AlarmChanges, AlarmOutcome, AlarmWork};
use super::sidecar::{self, Done, Job, Sidecar};
use super::{
    CredentialChange, IngestError, Registered, RetainDone, TwinOp, TwinOutcome, TwinStart,
    WriterMsg,
};
use crate::domain::{
    Arrival, CheckedReading, CommittedBatch, DeviceHello, DeviceKey, DeviceReadings, LiveReading,
    Proof, RejectReason, SensorKey, Verdict, judge_seq, now_ms,
};
use crate::metrics::HubMetrics;
use crate::store::blocks::{self, MergePlan};
use crate::store::{
    DeviceProgress, LOG_SLICES, Registration, RowToInsert, STAGING_PARTS, StoreError, StoreWriter,
    WriteTx, staging_part,
};
use crate::throttle::LogThrottle;
use crate::twin::{self, DocLimits, TwinHub, TwinPart, TwinView, doc};

#[derive(Debug, Clone)]
pub struct WriterSettings {
    /// A group commits at most this many rows (at once if that many are
    /// queued when it starts)...
    pub max_batch_rows: usize,
    /// ...or this long after the first of them arrived from its device.
    pub max_batch_delay: Duration,
    /// Distinct sensor names the dictionary may hold.
    pub max_sensors: usize,
    /// Distinct sensors one device may use.
    pub max_sensors_per_device: usize,
    /// A staging part is encoded into blocks once it holds an eighth of
    /// this (4x while batches wait) and 8 rows a series (see `due_part`).
    pub compact_rows: u64,
    /// This hub's id, written into the devices it claims.
    pub hub_id: Arc<str>,
    /// Devices whose marks, epochs and sensors the writer keeps in memory;
    /// past it the caches start over (`ingest.cached_devices`).
    pub cached_devices: usize,
    /// What a twin document may be (`twin.*`).
    pub twin_limits: DocLimits,
}

/// Staged readings beyond this many compaction runs mean compaction keeps
/// failing: new readings are refused until it succeeds (bounded growth;
/// 800,000 rows at the default `compact_rows`).
const MAX_STAGED_RUNS: u64 = 4;
/// A part is compacted once its rows average this many per series (or
/// staging holds half its cap): blocks of one or two readings cost a row each,
/// and merges, for almost nothing stored.
const MIN_BLOCK_POINTS: u64 = 8;
/// SQLite: a part whose blocks would hold fewer readings than that (at
/// 100k devices, ~1 each: staging at half its cap) is compacted half a
/// run of its oldest rows at a time (12,500 by default), a commit or more
/// between them. The whole part at once (~50k blocks, ~110 ms) held every
/// ack up for as long; a piece takes ~50 ms. Its cost is mostly the pages
/// of the part's region of the blocks index, which every piece touches
/// again, so the pieces cost about twice as much in all. Splitting by age
/// loses nothing there: each series has a reading or two in the part
/// either way.
fn piece_rows(compact_rows: u64) -> usize {
    (compact_rows / STAGING_PARTS as u64 / 2).max(1) as usize
}
/// Series merged per merge step: one short transaction between commits.
const MERGES_PER_STEP: usize = 32;
/// While batches keep coming, a rollup build step runs after a commit at
/// most this often.
const BUILD_EVERY_BUSY: Duration = Duration::from_millis(250);
/// How often a PostgreSQL hub looks for a rollup another hub left unbuilt.
const BUILD_RECHECK: Duration = Duration::from_secs(60);
/// How long the writer tries to open its connection on its own thread.
const OPEN_HERE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle writer looks for block work for its sidecar.
const SIDECAR_IDLE_LOOK: Duration = Duration::from_secs(1);

/// Waits between retries of something that failed: doubling, capped.
#[derive(Debug)]
struct Backoff {
    failures: u32,
    first: Duration,
    max: Duration,
    retry_at: Option<Instant>,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Self {
            failures: 0,
            first,
            max,
            retry_at: None,
        }
    }

    /// Records a failure; returns how long to wait before the next try.
    fn failed(&mut self) -> Duration {
        let wait = self
            .first
            .saturating_mul(1 << self.failures.min(16))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + wait);
        wait
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }

    fn waiting(&self) -> bool {
        self.retry_at.is_some_and(|t| Instant::now() < t)
    }
}

pub struct Writer {
    store: StoreWriter,
    rx: mpsc::Receiver<WriterMsg>,
    /// Notified by a sender that found the queue full.
    queue_full: Arc<Notify>,
    settings: WriterSettings,
    metrics: Arc<HubMetrics>,
    known: Known,
    /// The last commit's rows, in commit order (published)...
    rows: Vec<RowToInsert>,
    /// ...and by staging part (inserted, then moved into `staged`).
    row_parts: Vec<Vec<RowToInsert>>,
    /// The external ids of the devices in `rows` (the last commit's).
    row_names: FxHashMap<DeviceKey, Arc<str>>,
    /// Committed readings go here after each commit (MQTT, live watchers).
    fanout: broadcast::Sender<Arc<CommittedBatch>>,
    /// Readings published to the fan-out so far (its running index).
    published: u64,
    /// The committed rows of the staging tables, in memory too, so that a
    /// compaction encodes blocks without reading them back (None: not
    /// loaded yet, or unknown after a failure).
    staged: Option<Staged>,
    /// Which series have blocks to merge (None: not loaded yet).
    merges: Option<MergePlan>,
    /// PostgreSQL: compactions and merges run on a second connection,
    /// beside the group commits (None: on SQLite, or that connection's
    /// task died; the writer then does them between commits).
    sidecar: Option<Sidecar>,
    /// The writer is stopping: no new block work is started.
    winding_down: bool,
    merge_retry: Backoff,
    commit_retry: Backoff,
    compact_retry: Backoff,
    fold_retry: Backoff,
    /// Rollups: whether one may still be building, and its retries.
    building: bool,
    build_retry: Backoff,
    last_build: Instant,
    /// Registrations delivered so far: the next stream id.
    streams: u64,
    /// Committed twin changes go here (device streams, watchers).
    twins: Arc<TwinHub>,
    /// Alarm rules evaluated in each group, and alarm changes.
    alarms: AlarmWork,
    /// When each series' `device_sensors.last_reading_ms` was last written
    /// (committed).
    sensor_seen: FxHashMap<(DeviceKey, SensorKey), i64>,
    /// SQLite: marks in each slice of the progress logs, and when one was
    /// last folded in (see [`Writer::fold_if_due`]).
    logged: [u64; LOG_SLICES as usize],
    last_fold: Instant,
}

/// A series' `device_sensors.last_reading_ms` is written at most this
/// often (ms): inactivity rules of one sensor are this coarse.
const SENSOR_SEEN_EVERY: i64 = 2_000;
/// SQLite: each slice of the progress logs is folded into its tables
/// this often (one slice at a time, in turn), and sooner while the logs
/// hold more than `FOLD_MARKS` marks. A fold writes each page of its
/// devices' rows once, however many commits the slice holds: at 100k
/// devices ~20 ms and 2.5 MB a slice, where each commit updating its
/// ~250 devices in place wrote 6 MB. Readers scan the logs (the views),
/// so they stay small.
const FOLD_EVERY: Duration = Duration::from_secs(5);
const FOLD_MARKS: u64 = 100_000;

/// SQLite: how long after a fold the next one waits (unless the logs
/// hold `FOLD_MARKS`): a fleet of up to 8 runs of 4096 ids has each slice
/// folded about every `FOLD_EVERY`. A bigger fleet's slices wait longer,
/// until the logs reach `FOLD_MARKS` and the fullest is folded after each
/// commit: each fold covers one run of ids. (Folding each slice every
/// `FOLD_EVERY` at 100k devices, 5 folds a second, cost the writer 40 %
/// more fold time than 8 slices did: every fold pays a transaction and an
/// fsync.)
const FOLD_PACE: Duration = Duration::from_millis(FOLD_EVERY.as_millis() as u64 / 8);

/// How often a group PostgreSQL rolled back for a conflict with another
/// hub (a deadlock, a serialization failure) is run again before it fails.
const GROUP_CONFLICT_RETRIES: u32 = 3;

/// The writer's copy of the staging tables, by part.
struct Staged {
    parts: Vec<Vec<RowToInsert>>,
    /// The distinct series of each part's rows: how many readings each
    /// block of a compaction now would hold on average.
    series: Vec<FxHashSet<(DeviceKey, SensorKey)>>,
}

impl Staged {
    fn new(parts: Vec<Vec<RowToInsert>>) -> Self {
        let series = parts
            .iter()
            .map(|rows| rows.iter().map(|r| (r.device, r.sensor)).collect())
            .collect();
        Self { parts, series }
    }

    fn rows(&self) -> u64 {
        self.parts.iter().map(|p| p.len() as u64).sum()
    }

    /// Moves a commit's rows, already split by part, in.
    fn append(&mut self, committed: &mut [Vec<RowToInsert>]) {
        for ((part, series), rows) in self.parts.iter_mut().zip(&mut self.series).zip(committed) {
            series.extend(rows.iter().map(|r| (r.device, r.sensor)));
            part.append(rows);
        }
    }

    /// Takes a part's rows out (to compact them).
    fn take(&mut self, part: usize) -> Vec<RowToInsert> {
        self.series[part].clear();
        std::mem::take(&mut self.parts[part])
    }

    /// Takes a part's first `n` rows out, the oldest staged.
    fn take_front(&mut self, part: usize, n: usize) -> Vec<RowToInsert> {
        let n = n.min(self.parts[part].len());
        let rest = self.parts[part].split_off(n);
        self.series[part] = rest.iter().map(|r| (r.device, r.sensor)).collect();
        std::mem::replace(&mut self.parts[part], rest)
    }

    /// Whether a compaction of the part now would write blocks of fewer
    /// than `MIN_BLOCK_POINTS` readings on average (many slow series,
    /// compacted because staging holds half its cap).
    fn thin(&self, part: usize) -> bool {
        (self.parts[part].len() as u64) < (self.series[part].len() as u64) * MIN_BLOCK_POINTS
    }

    /// Each part: (part, rows, distinct series).
    fn parts(&self) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
        self.parts
            .iter()
            .zip(&self.series)
            .enumerate()
            .map(|(i, (p, s))| (i, p.len() as u64, s.len() as u64))
    }

    /// The part holding the most rows, and how many.
    fn fullest(&self) -> (usize, u64) {
        self.parts()
            .map(|(i, rows, _)| (i, rows))
            .max_by_key(|&(_, n)| n)
            .unwrap_or((0, 0))
    }
}

/// Whether a staging part of `rows` in `series` is compacted now.
fn compaction_due(compact_rows: u64, busy: bool, rows: u64, series: u64) -> bool {
    // Under load (batches already waiting) runs grow up to 4x: a longer
    // run costs little more than a short one, so throughput holds up.
    let run = if busy {
        compact_rows.saturating_mul(4)
    } else {
        compact_rows
    };
    let part_run = (run / STAGING_PARTS as u64).max(1);
    // Young data: a part of many slow series (100,000 devices) waits until
    // its blocks would hold a few readings each, not one or two (see
    // `Writer::due_part` for its limit).
    rows > 0 && rows >= part_run && rows >= series.saturating_mul(MIN_BLOCK_POINTS)
}

/// What the writer knows of committed rows: caches, reloaded after a failure.
struct Known {
    /// Committed high-water mark per device (a cache of devices.acked_seq).
    marks: FxHashMap<DeviceKey, u64>,
    /// SQLite: each device's session epoch (a cache of devices.epoch; on
    /// SQLite only this writer changes it). PostgreSQL reads and locks the
    /// epochs in every group instead: other hubs change them.
    epochs: FxHashMap<DeviceKey, u64>,
    sensors: HashMap<String, SensorKey>,
    sensor_names: FxHashMap<SensorKey, Arc<str>>,
    sensors_loaded: bool,
    /// Committed sensors of each device seen since the last failure.
    device_sensors: FxHashMap<DeviceKey, Vec<SensorKey>>,
    /// SQLite: the marks were cleared, so some device with rows in the
    /// progress log may have no mark here: the next group folds the log
    /// in first (unless it is retention alone, which reads no mark). While
    /// false, every device with log rows carrying a mark has it in `marks`
    /// (retention's rows carry none), and `devices.acked_seq` is exact for
    /// any other.
    fold_first: bool,
    max_sensors: usize,
    max_sensors_per_device: usize,
    cached_devices: usize,
    limit_log: LogThrottle,
}

/// What one queued message came to, delivered after the commit.
enum Outcome {
    Batch {
        /// The device's mark after this batch.
        acked_seq: u64,
        stored: u32,
        rejected: u32,
        duplicates: u32,
    },
    /// Its session had a batch in a failed commit: nothing of it is written.
    Skipped,
    Registered {
        device: DeviceKey,
        epoch: u64,
        /// The device's committed mark, as this group's registration read
        /// it (with the group's earlier batches of the device): the Welcome.
        acked_seq: u64,
        twin: Option<TwinStart>,
    },
    /// A reported patch: the device's mark and version after it, and why
    /// it was rejected if it was.
    Reported {
        seq: u64,
        version: u64,
        rejected: Option<String>,
    },
    Twin(TwinOutcome),
    Alarm(AlarmOutcome),
    Job(super::jobs::JobOutcome),
    /// Its session's epoch is no longer the device's: another hub (or a
    /// newer stream) claimed the device. Nothing of it is written.
    Fenced,
    /// Its credentials changed after its Hello was checked.
    Refused,
    /// A write's registration of a device streaming to another live hub.
    StreamingElsewhere(String),
    /// A credential change; whether the device was there.
    Credentials(bool),
    /// What a retention step deleted.
    Retained(RetainDone),
}

/// What the writer does with one message of a group, decided before any
/// of the group is written ([`plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A Hello, a credential change or a retention step: done as it is.
    Run,
    /// Its session had a batch in a failed commit: nothing of it is written.
    Skip,
    /// Its stream's epoch is no longer the device's: not written.
    Fence,
    /// Sorted against the device's mark and written.
    Write,
}

/// Plans a group: a batch is written only while its stream's epoch is the
/// device's, as `epochs` held it when the group began and with no Hello or
/// credential change of the same device (enroll, rotate, remove, pin: each
/// bumps the epoch) earlier in the group; what an older stream queued after such
/// a change is fenced. The new stream of a Hello sends nothing before its
/// Welcome, so every batch after it in the group is an older stream's.
fn plan(group: &[WriterMsg], epochs: &FxHashMap<DeviceKey, u64>) -> Vec<Step> {
    let mut bumped: std::collections::HashSet<&str> = std::collections::HashSet::new();
    group
        .iter()
        .map(|msg| match msg {
            WriterMsg::Register { hello, .. } => {
                bumped.insert(hello.device_id.as_str());
                Step::Run
            }
            WriterMsg::Credentials { change, .. } => {
                match change {
                    CredentialChange::Rotate { device_id, .. }
                    | CredentialChange::Remove { device_id }
                    | CredentialChange::PinCertificate { device_id, .. } => {
                        bumped.insert(device_id.as_str());
                    }
                    CredentialChange::Enroll { hello, .. } => {
                        bumped.insert(hello.device_id.as_str());
                    }
                    CredentialChange::RevokeCertificate { .. } => {}
                }
                Step::Run
            }
            WriterMsg::Retain { .. }
            | WriterMsg::Twin { .. }
            | WriterMsg::Alarm(_)
            | WriterMsg::Job(_) => Step::Run,
            WriterMsg::Reported(patch) if patch.ack.failed() => Step::Skip,
            WriterMsg::Reported(patch)
                if epochs.get(&patch.device) != Some(&patch.epoch)
                    || bumped.contains(&*patch.device_id) =>
            {
                Step::Fence
            }
            WriterMsg::Reported(_) => Step::Write,
            WriterMsg::Batch(batch) if batch.ack.failed() => Step::Skip,
            WriterMsg::Batch(batch)
                if epochs.get(&batch.device) != Some(&batch.epoch)
                    || bumped.contains(&*batch.device_id) =>
            {
                Step::Fence
            }
            WriterMsg::Batch(_) => Step::Write,
        })
        .collect()
}

/// Whether the group changes a device's credentials: an enrollment
/// rewrites the device and its tags, so what the group reads in bulk ahead
/// of its messages would be read too early.
fn changes_credentials(group: &[WriterMsg]) -> bool {
    group
        .iter()
        .any(|m| matches!(m, WriterMsg::Credentials { .. }))
}

/// Registers a group's stream Hellos in bulk, with their twins read,
/// before the group's messages are gone through in order: by message
/// index, the registrations settled. Only where order cannot matter:
/// no credential change in the group, and one Hello of the device in it.
/// The rest (and any Hello the bulk statements leave) are registered in
/// their turn, one by one.
async fn register_in_bulk(
    tx: &mut WriteTx<'_>,
    group: &[WriterMsg],
    now: i64,
    hub: &str,
    twins: &mut GroupTwins,
) -> Result<FxHashMap<usize, Registration>, StoreError> {
    let streams = || {
        group.iter().enumerate().filter_map(|(i, msg)| match msg {
            WriterMsg::Register {
                hello,
                proof,
                arrival: Arrival::Stream,
                ..
            } => Some((i, hello, proof)),
            _ => None,
        })
    };
    if streams().nth(1).is_none() || changes_credentials(group) {
        return Ok(FxHashMap::default());
    }
    let mut named: HashMap<&str, usize> = HashMap::new();
    for id in group.iter().filter_map(WriterMsg::names_device) {
        *named.entry(id).or_default() += 1;
    }
    let (at, hellos): (Vec<usize>, Vec<(&DeviceHello, &Proof)>) = streams()
        .filter(|(_, hello, _)| named[hello.device_id.as_str()] == 1)
        .map(|(i, hello, proof)| (i, (hello, proof)))
        .unzip();
    let done = tx.register_streams(&hellos, now, hub).await?;
    let settled: FxHashMap<usize, Registration> = at
        .into_iter()
        .zip(done)
        .filter_map(|(i, r)| Some((i, r?)))
        .collect();
    let devices: Vec<DeviceKey> = settled.values().map(|r| r.device).collect();
    twins.load(tx, &devices).await?;
    Ok(settled)
}

/// What a group changes in the writer's memory, applied after its commit.
#[derive(Default)]
struct GroupChanges {
    marks: FxHashMap<DeviceKey, u64>,
    /// Epochs read or bumped in the group (SQLite's cache).
    epochs: FxHashMap<DeviceKey, u64>,
    sensors: HashMap<String, SensorKey>,
    device_sensors: FxHashMap<DeviceKey, Vec<SensorKey>>,
    /// The external id of each device with readings in the group.
    names: FxHashMap<DeviceKey, Arc<str>>,
    /// Readings added per device.
    added: FxHashMap<DeviceKey, u64>,
    /// Twin changes to hand over after the commit, in order: the part, the
    /// twin after the group, and the patch when it was the group's only
    /// change of that part.
    twins: Vec<(TwinPart, Arc<TwinView>, Option<Arc<str>>)>,
    alarms: AlarmChanges,
    /// Series whose last reading time was written, and the time.
    seen: Vec<(DeviceKey, SensorKey)>,
    now: i64,
    /// SQLite: the group folded the progress logs in first...
    folded: bool,
    /// ...and appended this many rows to each slice of them.
    logged: [u64; LOG_SLICES as usize],
}

/// A twin the group changes, read once and written once.
struct GroupTwin {
    view: TwinView,
    dirty: bool,
    /// The group's changes of it: the part, and the patch.
    changes: Vec<(TwinPart, Option<Arc<str>>)>,
}

impl GroupTwin {
    fn changed(&mut self, part: TwinPart, patch: Option<Arc<str>>) {
        self.dirty |= part != TwinPart::Tags;
        self.changes.push((part, patch));
    }

    /// Sets `reported.hello` from a Hello, when it says something new.
    fn hello(&mut self, hello: &crate::domain::DeviceHello, now: i64) {
        let said = twin::hello_doc(&hello.firmware, &hello.labels);
        let t = &mut self.view.twin;
        if t.reported.get("hello") == Some(&said) {
            return;
        }
        t.reported.insert("hello".into(), said.clone());
        t.reported_meta.remove("hello");
        let mut patch = doc::Doc::new();
        patch.insert("hello".into(), said);
        doc::stamp(&mut t.reported_meta, &patch, now);
        t.reported_version += 1;
        self.changed(TwinPart::Reported, Some(Arc::from(doc::encode(&patch))));
    }

    /// A device's reported patch; None when applied or a duplicate, else
    /// why it was rejected.
    fn report(
        &mut self,
        seq: u64,
        patch: &Result<doc::Doc, String>,
        limits: &DocLimits,
        now: i64,
    ) -> Option<String> {
        let t = &mut self.view.twin;
        if seq <= t.reported_seq {
            return None;
        }
        t.reported_seq = seq;
        self.dirty = true;
        let patch = match patch {
            Ok(patch) => patch,
            Err(why) => return Some(why.clone()),
        };
        let mut next = t.reported.clone();
        doc::merge(&mut next, patch);
        if let Err(e) = doc::check(&next, limits) {
            return Some(e.to_string());
        }
        t.reported = next;
        doc::stamp(&mut t.reported_meta, patch, now);
        t.reported_version += 1;
        self.changed(TwinPart::Reported, Some(Arc::from(doc::encode(patch))));
        None
    }

    /// An operator's change.
    fn apply(&mut self, op: &TwinOp, limits: &DocLimits, now: i64) -> TwinOutcome {
        match op {
            TwinOp::Desired {
                patch, if_version, ..
            } => {
                let t = &mut self.view.twin;
                if let Some(want) = if_version
                    && *want != t.desired_version
                {
                    return TwinOutcome::Stale {
                        current: t.desired_version,
                    };
                }
                let mut next = t.desired.clone();
                doc::merge(&mut next, patch);
                if let Err(e) = doc::check(&next, limits) {
                    return TwinOutcome::Invalid(e.to_string());
                }
                t.desired = next;
                doc::stamp(&mut t.desired_meta, patch, now);
                t.desired_version += 1;
                self.changed(TwinPart::Desired, Some(Arc::from(doc::encode(patch))));
            }
            TwinOp::Tags { set, remove, .. } => {
                let mut tags = self.view.tags.clone();
                tags.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
                for key in remove {
                    tags.remove(key);
                }
                if tags.len() > crate::domain::MAX_LABELS {
                    return TwinOutcome::Invalid(format!(
                        "a device has at most {} tags",
                        crate::domain::MAX_LABELS
                    ));
                }
                self.view.tags = tags;
                self.changed(TwinPart::Tags, None);
            }
        }
        TwinOutcome::Done(Arc::new(self.view.clone()))
    }
}

/// The twins a group changes, by device.
#[derive(Default)]
struct GroupTwins {
    twins: FxHashMap<DeviceKey, GroupTwin>,
}

impl GroupTwins {
    /// The device's twin as this group has it (read on first use); None
    /// for an unknown device.
    async fn of(
        &mut self,
        tx: &mut WriteTx<'_>,
        device: DeviceKey,
    ) -> Result<Option<&mut GroupTwin>, StoreError> {
        match self.twins.entry(device) {
            std::collections::hash_map::Entry::Occupied(entry) => Ok(Some(entry.into_mut())),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let Some(view) = tx.load_twin(device).await? else {
                    return Ok(None);
                };
                Ok(Some(entry.insert(GroupTwin {
                    view,
                    dirty: false,
                    changes: Vec::new(),
                })))
            }
        }
    }

    /// Reads the twins of `devices` this group has not read yet, in bulk
    /// (the Hellos of a reconnect storm).
    async fn load(
        &mut self,
        tx: &mut WriteTx<'_>,
        devices: &[DeviceKey],
    ) -> Result<(), StoreError> {
        let unread: Vec<DeviceKey> = devices
            .iter()
            .copied()
            .filter(|d| !self.twins.contains_key(d))
            .collect();
        for (device, view) in tx.load_twins(&unread).await? {
            self.twins.insert(
                device,
                GroupTwin {
                    view,
                    dirty: false,
                    changes: Vec::new(),
                },
            );
        }
        Ok(())
    }

    /// Reads the twins the group's reported state and twin changes use,
    /// in bulk: a device's first report follows its Welcome in a later
    /// group, and a read per report held a storm of 100k up. Not in a
    /// group that changes credentials (see [`changes_credentials`]): a
    /// later twin change must start from the tags an enrollment wrote.
    async fn load_for_group(
        &mut self,
        tx: &mut WriteTx<'_>,
        group: &[WriterMsg],
    ) -> Result<(), StoreError> {
        if changes_credentials(group) {
            return Ok(());
        }
        let mut devices: Vec<DeviceKey> = group
            .iter()
            .filter_map(|msg| match msg {
                WriterMsg::Reported(patch) => Some(patch.device),
                WriterMsg::Twin {
                    op: TwinOp::Desired { device, .. } | TwinOp::Tags { device, .. },
                    ..
                } => Some(*device),
                _ => None,
            })
            .collect();
        devices.sort_unstable();
        devices.dedup();
        self.load(tx, &devices).await
    }

    /// Writes what changed and announces it; what to hand over after the
    /// commit.
    async fn save(
        self,
        tx: &mut WriteTx<'_>,
        hub: &str,
    ) -> Result<Vec<(TwinPart, Arc<TwinView>, Option<Arc<str>>)>, StoreError> {
        let dirty: Vec<(DeviceKey, &crate::twin::Twin)> = self
            .twins
            .iter()
            .filter(|(_, g)| g.dirty)
            .map(|(device, g)| (*device, &g.view.twin))
            .collect();
        tx.save_twins(&dirty).await?;
        let mut out = Vec::new();
        for (device, g) in self.twins {
            if g.changes.is_empty() {
                continue;
            }
            if g.changes.iter().any(|(p, _)| *p == TwinPart::Tags) {
                tx.set_tags(device, &g.view.tags).await?;
            }
            let view = Arc::new(g.view);
            for part in [TwinPart::Tags, TwinPart::Reported, TwinPart::Desired] {
                let mut of_part = g.changes.iter().filter(|(p, _)| *p == part);
                let Some((_, patch)) = of_part.next() else {
                    continue;
                };
                let patch = if of_part.next().is_none() {
                    patch.clone()
                } else {
                    None
                };
                tx.announce_twin(hub, part, &view.device_id).await?;
                out.push((part, Arc::clone(&view), patch));
            }
        }
        Ok(out)
    }
}

impl Writer {
    /// `sidecar`: PostgreSQL's second connection, for block work.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: StoreWriter,
        sidecar: Option<Sidecar>,
        queue: super::QueueRx,
        settings: WriterSettings,
        metrics: Arc<HubMetrics>,
        fanout: broadcast::Sender<Arc<CommittedBatch>>,
        twins: Arc<TwinHub>,
        alarms: AlarmWork,
    ) -> Self {
        let known = Known {
            marks: FxHashMap::default(),
            epochs: FxHashMap::default(),
            sensors: HashMap::new(),
            sensor_names: FxHashMap::default(),
            sensors_loaded: false,
            device_sensors: FxHashMap::default(),
            // The store folded the logs when it opened, unless that failed.
            fold_first: store.unfolded(),
            max_sensors: settings.max_sensors,
            max_sensors_per_device: settings.max_sensors_per_device,
            cached_devices: settings.cached_devices,
            limit_log: LogThrottle::new(Duration::from_secs(10)),
        };
        Self {
            store,
            rx: queue.rx,
            queue_full: queue.full,
            settings,
            metrics,
            known,
            rows: Vec::new(),
            row_parts: Vec::new(),
            row_names: FxHashMap::default(),
            fanout,
            published: 0,
            staged: None,
            merges: None,
            sidecar,
            winding_down: false,
            merge_retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            commit_retry: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            compact_retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            fold_retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            build_retry: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            building: true,
            last_build: Instant::now(),
            streams: 0,
            twins,
            alarms,
            sensor_seen: FxHashMap::default(),
            logged: [0; LOG_SLICES as usize],
            last_fold: Instant::now(),
        }
    }

    /// Runs until every queue sender is gone, or until `stop`; then commits
    /// whatever is still queued and returns. Once `flush` is cancelled (the
    /// hub began to shut down) a group is committed at once, without
    /// waiting for more rows: closing streams wait for those acks.
    pub async fn run(mut self, stop: CancellationToken, flush: CancellationToken) {
        // PostgreSQL: the connection opened at start-up answers through the
        // shared runtime's reactor; one opened here, through this thread's.
        // Bounded: a database gone right after start-up must not keep the
        // writer from its queue (the old connection stays until swapped).
        match tokio::time::timeout(OPEN_HERE_TIMEOUT, self.store.open_here()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot open the write connection on the writer's thread; the one from start-up is used");
            }
            Err(_) => {
                tracing::warn!(
                    "opening the write connection on the writer's thread timed out; the one from start-up is used"
                );
            }
        }
        let mut group: Vec<WriterMsg> = Vec::new();
        loop {
            // Idle: merge blocks, then build rollups, a step at a time,
            // while nothing waits.
            if self.rx.is_empty()
                && !stop.is_cancelled()
                && self.sidecar.is_none()
                && self.merges_due().await
            {
                self.merge_step().await;
                continue;
            }
            if self.rx.is_empty() && !stop.is_cancelled() && self.builds_due() {
                self.build_step().await;
                continue;
            }
            let first = tokio::select! {
                msg = self.rx.recv() => msg,
                done = sidecar::job_ended(&mut self.sidecar) => {
                    self.block_work_done(done);
                    self.start_block_work().await;
                    continue;
                }
                // Idle with the sidecar free: merges left from before, or
                // work whose retry wait is over.
                _ = tokio::time::sleep(SIDECAR_IDLE_LOOK),
                    if self.sidecar.as_ref().is_some_and(Sidecar::is_idle) =>
                {
                    self.start_block_work().await;
                    continue;
                }
                _ = stop.cancelled() => None,
            };
            let Some(first) = first else { break };
            let mut rows = first.rows();
            // `max_batch_delay` after the first of the group arrived, not
            // after the writer took it: under load, what queued during the
            // last commit goes out with the next one at once.
            let arrived = first.arrived().map_or_else(Instant::now, Instant::from_std);
            group.push(first);
            self.metrics.set_uncommitted_rows(rows);
            let deadline = arrived + self.settings.max_batch_delay;
            // What is queued now; then, unless that filled the group, one
            // wait for the deadline and what came meanwhile. The writer
            // sleeps through the arrivals instead of waking for each one
            // (its own thread: a wake-up is a futex call on both sides, and
            // 10k devices at 5 Hz sent 50,000 a second).
            rows = self.take_queued(&mut group, rows);
            if rows < self.settings.max_batch_rows
                && Instant::now() < deadline
                && !flush.is_cancelled()
            {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {}
                    // Sessions wait on a full queue: commit what it holds.
                    _ = self.queue_full.notified() => {}
                    _ = stop.cancelled() => {}
                    _ = flush.cancelled() => {}
                }
                rows = self.take_queued(&mut group, rows);
            }
            let committed = self.commit_group(&mut group).await;
            self.metrics.set_uncommitted_rows(0);
            if !committed {
                // Storage is failing: give it a moment. Batches wait in the
                // bounded queue meanwhile (backpressure to devices).
                let wait = self.commit_retry.failed();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }
        // Drain: nothing new is accepted; what was queued is committed.
        self.winding_down = true;
        self.rx.close();
        while let Some(msg) = self.rx.recv().await {
            group.push(msg);
            if group.len() >= 1024 {
                self.commit_group(&mut group).await;
            }
        }
        self.commit_group(&mut group).await;
        if let Some(sidecar) = self.sidecar.take() {
            let done = sidecar.close().await;
            self.block_work_done(done);
        }
        self.compact_everything().await;
        // A cleanly stopped hub leaves its marks in the tables.
        if let Err(e) = self.store.fold_progress(None).await {
            self.store.abort().await;
            tracing::warn!(error = %e, "could not fold the progress logs in at stop (the next start does)");
        }
        if let Err(e) = self.store.close().await {
            tracing::warn!(error = %e, "closing the writer connection failed");
        }
    }

    /// Moves queued messages into the group until it holds
    /// `max_batch_rows` rows or the queue is empty; returns its rows.
    fn take_queued(&mut self, group: &mut Vec<WriterMsg>, mut rows: usize) -> usize {
        while rows < self.settings.max_batch_rows {
            let Ok(msg) = self.rx.try_recv() else { break };
            rows += msg.rows();
            group.push(msg);
        }
        self.metrics.set_uncommitted_rows(rows);
        rows
    }

    /// Writes and commits a group, then acks it; false when the commit
    /// failed (nothing of the group is acked, its sessions are told).
    /// SQLite, while the next group must fold the progress logs in first
    /// (after a failed commit): retention goes in a group of its own, which
    /// folds nothing (it reads no mark, see `write_group`). At the size
    /// limit the fold may find no page, and retention is what frees pages.
    async fn commit_group(&mut self, group: &mut Vec<WriterMsg>) -> bool {
        let is_retain = |m: &WriterMsg| matches!(m, WriterMsg::Retain { .. });
        if self.known.fold_first
            && self.store.backend() == crate::config::Backend::Sqlite
            && group.iter().any(is_retain)
            && !group.iter().all(is_retain)
        {
            let (mut retains, rest): (Vec<_>, Vec<_>) = group.drain(..).partition(is_retain);
            *group = rest;
            self.commit_one_group(&mut retains).await;
        }
        self.commit_one_group(group).await
    }

    async fn commit_one_group(&mut self, group: &mut Vec<WriterMsg>) -> bool {
        if group.is_empty() {
            return true;
        }
        // Retention takes the block writers' lock first: it waits for this
        // hub's own compaction or merge here, outside any transaction,
        // rather than on the lock (within `lock_timeout`) inside one.
        if group.iter().any(|m| matches!(m, WriterMsg::Retain { .. }))
            && let Some(sidecar) = &mut self.sidecar
            && sidecar.is_running()
        {
            let done = sidecar.finished().await;
            self.block_work_done(done);
        }
        let started = std::time::Instant::now();
        let mut conflicts = 0;
        let result = loop {
            let result = match self.make_room().await {
                Ok(()) => self.write_group(group, now_ms()).await,
                Err(e) => Err(e),
            };
            match result {
                // PostgreSQL rolled the group back for a conflict with
                // another hub's transaction (a deadlock the lock order did
                // not prevent): run it again, from what is stored.
                Err(e) if e.is_conflict() && conflicts < GROUP_CONFLICT_RETRIES => {
                    conflicts += 1;
                    tracing::warn!(error = %e, attempt = conflicts, "group conflicted with another hub's; run again");
                    self.store.abort().await;
                    self.forget_caches();
                }
                result => break result,
            }
        };
        match result {
            Ok((outcomes, changes)) => {
                HubMetrics::observe(&self.metrics.commit_seconds, started.elapsed());
                self.metrics.rows_per_commit.observe(self.rows.len() as f64);
                self.metrics.set_storage_ok(true);
                self.apply(changes);
                self.deliver(group.drain(..).zip(outcomes));
                self.publish();
                self.commit_retry.succeeded();
                self.fold_if_due().await;
                self.compact_if_due().await;
                if self.sidecar.is_none() && self.merges_due().await {
                    self.merge_step().await;
                } else if self.builds_due() && self.last_build.elapsed() >= BUILD_EVERY_BUSY {
                    // Under steady load the writer is never idle: a build
                    // step now and then still gets through.
                    self.build_step().await;
                }
                true
            }
            Err(e) => {
                self.store.abort().await;
                tracing::error!(error = %e, messages = group.len(), reopened = self.store.reopened(),
                    "commit failed; nothing in it is acked and its streams are ended");
                HubMetrics::add(&self.metrics.commit_failures, 1);
                self.metrics.set_storage_ok(false);
                // A COMMIT that reported failure may still have reached the
                // disk: the caches are reloaded from what is stored.
                self.forget_caches();
                group.drain(..).for_each(WriterMsg::fail);
                false
            }
        }
    }

    /// SQLite: folds the fullest slice of the progress logs in, one each
    /// `FOLD_PACE`, or at once while they hold `FOLD_MARKS` marks. A
    /// failed fold loses nothing (the logs stay, and the views still read
    /// them); it is tried again later.
    async fn fold_if_due(&mut self) {
        let total: u64 = self.logged.iter().sum();
        if total == 0
            || self.fold_retry.waiting()
            || (total < FOLD_MARKS && self.last_fold.elapsed() < FOLD_PACE)
        {
            return;
        }
        let started = std::time::Instant::now();
        self.last_fold = Instant::now();
        let slice = (0..LOG_SLICES)
            .max_by_key(|&s| self.logged[usize::from(s)])
            .unwrap_or(0);
        match self.store.fold_progress(Some(slice)).await {
            Ok(rows) => {
                self.logged[usize::from(slice)] = 0;
                self.fold_retry.succeeded();
                tracing::debug!(
                    slice,
                    rows,
                    ms = started.elapsed().as_millis() as u64,
                    "folded the progress logs in"
                );
            }
            Err(e) => {
                self.store.abort().await;
                let wait = self.fold_retry.failed();
                tracing::warn!(error = %e, retry_in = ?wait, "folding the progress logs in failed (nothing is lost: readers see the logs)");
            }
        }
    }

    /// The caches are a view of committed rows only; what a rolled-back
    /// group put in them is dropped.
    fn forget_caches(&mut self) {
        self.known.forget();
        self.alarms.forget();
        self.sensor_seen.clear();
        self.staged = None;
        self.merges = None;
    }

    fn apply(&mut self, mut changes: GroupChanges) {
        self.row_names = std::mem::take(&mut changes.names);
        for (part, view, patch) in std::mem::take(&mut changes.twins) {
            if part == TwinPart::Tags {
                // Which rules apply to the device may have changed.
                self.alarms.tags_changed();
            }
            self.twins.committed(part, view, patch, true);
        }
        self.alarms.apply(std::mem::take(&mut changes.alarms));
        for pair in std::mem::take(&mut changes.seen) {
            self.sensor_seen.insert(pair, changes.now);
        }
        if changes.folded {
            self.logged = [0; LOG_SLICES as usize];
            self.last_fold = Instant::now();
        }
        for (logged, added) in self.logged.iter_mut().zip(changes.logged) {
            *logged += added;
        }
        if self.sensor_seen.len() > self.settings.cached_devices.saturating_mul(8) {
            self.sensor_seen.clear();
        }
        self.known.apply(changes);
    }

    /// After the commit: acks into session slots, replies to registrations.
    fn deliver(&mut self, done: impl Iterator<Item = (WriterMsg, Outcome)>) {
        let (mut stored_total, mut dups_total, mut rejected_total) = (0u64, 0u64, 0u64);
        for (msg, outcome) in done {
            match (msg, outcome) {
                (
                    WriterMsg::Batch(batch),
                    Outcome::Batch {
                        acked_seq,
                        stored,
                        rejected,
                        duplicates,
                    },
                ) => {
                    stored_total += u64::from(stored);
                    dups_total += u64::from(duplicates);
                    rejected_total += u64::from(rejected);
                    batch.ack.complete(acked_seq, rejected, duplicates);
                    HubMetrics::observe(&self.metrics.ack_seconds, batch.received.elapsed());
                }
                (WriterMsg::Batch(_) | WriterMsg::Reported(_), Outcome::Skipped) => {}
                (
                    WriterMsg::Reported(patch),
                    Outcome::Reported {
                        seq,
                        version,
                        rejected,
                    },
                ) => {
                    patch.ack.complete_reported(seq, version, rejected);
                }
                (WriterMsg::Reported(patch), Outcome::Fenced) => {
                    HubMetrics::add(&self.metrics.fenced, 1);
                    patch.ack.fence();
                }
                (WriterMsg::Twin { reply, .. }, Outcome::Twin(outcome)) => {
                    let _ = reply.send(Ok(outcome));
                }
                (WriterMsg::Alarm(msg), Outcome::Alarm(outcome)) => {
                    let _ = msg.reply.send(Ok(outcome));
                }
                (WriterMsg::Job(msg), Outcome::Job(outcome)) => {
                    let _ = msg.reply.send(Ok(outcome));
                }
                (WriterMsg::Batch(batch), Outcome::Fenced) => {
                    HubMetrics::add(&self.metrics.fenced, 1);
                    batch.ack.fence_returning(batch.readings);
                }
                (
                    WriterMsg::Register { reply, .. },
                    Outcome::Registered {
                        device,
                        epoch,
                        acked_seq,
                        twin,
                    },
                ) => {
                    self.streams += 1;
                    // The session may have gone meanwhile; nothing to tell.
                    let _ = reply.send(Ok(Registered {
                        device,
                        acked_seq,
                        stream: self.streams,
                        epoch,
                        twin,
                    }));
                }
                (WriterMsg::Register { reply, .. }, Outcome::Refused) => {
                    let _ = reply.send(Err(IngestError::Refused));
                }
                (WriterMsg::Register { reply, .. }, Outcome::StreamingElsewhere(hub)) => {
                    let _ = reply.send(Err(IngestError::StreamingElsewhere(hub)));
                }
                (WriterMsg::Credentials { reply, .. }, Outcome::Credentials(found)) => {
                    let _ = reply.send(Ok(found));
                }
                (WriterMsg::Retain { reply, .. }, Outcome::Retained(n)) => {
                    let _ = reply.send(Ok(n));
                }
                _ => unreachable!("outcomes are produced in message order"),
            }
        }
        HubMetrics::add(&self.metrics.readings_committed, stored_total);
        HubMetrics::add(&self.metrics.duplicates, dups_total);
        HubMetrics::add(&self.metrics.rejected, rejected_total);
        HubMetrics::add(&self.metrics.commits, 1);
    }

    /// The staging tables' cap: past it (compaction keeps failing) the
    /// group is refused rather than the tables growing without bound.
    /// A group over the cap first compacts parts, fullest first, until
    /// staging is under it: only a failing compaction refuses groups.
    async fn make_room(&mut self) -> Result<(), StoreError> {
        let cap = self.settings.compact_rows.saturating_mul(MAX_STAGED_RUNS);
        loop {
            let staged = self.staged().await?;
            let total = staged.rows();
            if total < cap {
                return Ok(());
            }
            let (part, rows) = staged.fullest();
            // A compaction running beside may make the room.
            if let Some(sidecar) = &mut self.sidecar
                && sidecar.is_running()
            {
                let done = sidecar.finished().await;
                self.block_work_done(done);
                continue;
            }
            if rows == 0 || self.compact_retry.waiting() {
                return Err(StoreError::StagingFull { staged: total });
            }
            // Empties the part, or fails and starts the retry wait.
            self.compact(part).await;
        }
    }

    async fn staged(&mut self) -> Result<&mut Staged, StoreError> {
        let staged = match self.staged.take() {
            Some(staged) => staged,
            None => Staged::new(self.store.staged_rows().await?),
        };
        Ok(self.staged.insert(staged))
    }

    /// Encodes a staging part into blocks once enough rows wait in it: the
    /// fullest part, at most one per group commit, so a compaction delays
    /// the next group by an eighth of what encoding every staged row at
    /// once did. Acks are out already.
    async fn compact_if_due(&mut self) {
        match &mut self.staged {
            Some(staged) => staged.append(&mut self.row_parts),
            None => {
                if let Err(e) = self.staged().await {
                    tracing::warn!(error = %e, "cannot read the staged readings");
                    return;
                }
            }
        }
        if let Some(sidecar) = &mut self.sidecar {
            let done = sidecar.try_finished().await;
            self.block_work_done(done);
            self.start_block_work().await;
        } else if let Some(part) = self.due_part() {
            self.compact(part).await;
        }
    }

    /// The part to compact now: the fullest of those holding a run's worth
    /// of rows and 8 a series; or, once staging holds half its cap, the
    /// fullest part (young series then wait no longer, and the other half
    /// is headroom for compactions that fail for a while).
    fn due_part(&self) -> Option<usize> {
        let staged = self.staged.as_ref()?;
        if self.compact_retry.waiting() {
            return None;
        }
        let busy = !self.rx.is_empty();
        let compact_rows = self.settings.compact_rows;
        let due = staged
            .parts()
            .filter(|&(_, rows, series)| compaction_due(compact_rows, busy, rows, series))
            .max_by_key(|&(_, rows, _)| rows)
            .map(|(part, _, _)| part);
        let cap = compact_rows.saturating_mul(MAX_STAGED_RUNS);
        let (fullest, rows) = staged.fullest();
        due.or_else(|| (rows > 0 && staged.rows() >= cap / 2).then_some(fullest))
    }

    /// PostgreSQL: starts the next block job on the sidecar's connection
    /// if it is free: a due compaction first, else a merge step.
    async fn start_block_work(&mut self) {
        let Some(sidecar) = &self.sidecar else { return };
        if self.winding_down || !sidecar.is_idle() {
            return;
        }
        // After a compaction a due merge step goes first, so that merges
        // keep up while compactions are due one after the other.
        let merge_first = sidecar.last_compacted();
        let part = self.due_part();
        let job = if let Some(part) = part.filter(|_| !merge_first) {
            self.compact_job(part)
        } else if self.merges_due().await
            && let Some(plan) = &self.merges
        {
            Job::Merge(plan.next(MERGES_PER_STEP))
        } else if let Some(part) = part {
            self.compact_job(part)
        } else {
            return;
        };
        if let Some(sidecar) = &mut self.sidecar {
            sidecar.start(job);
        }
    }

    fn compact_job(&mut self, part: usize) -> Job {
        // The part's rows are the database's to take now; the copy here
        // only counts what waits.
        if let Some(staged) = &mut self.staged {
            staged.take(part);
        }
        tracing::debug!(part, "compacting staged readings beside the writer");
        Job::Compact(part)
    }

    /// Applies what a sidecar job did, as the writer does for its own
    /// compactions and merges. None: no job ended, or its task died (the
    /// writer then does the block work itself).
    fn block_work_done(&mut self, done: Option<Done>) {
        if self.sidecar.as_ref().is_some_and(|s| !s.is_alive()) {
            self.sidecar = None;
            // The job's part count was cleared when it started; its rows
            // may still be staged.
            self.staged = None;
        }
        match done {
            None => {}
            Some(Done::Compacted(Ok(blocks))) => {
                self.compact_retry.succeeded();
                HubMetrics::add(&self.metrics.compactions, 1);
                if let Some(plan) = &mut self.merges {
                    for (series, level) in &blocks {
                        plan.add(*series, *level, 1);
                    }
                }
                tracing::debug!(blocks = blocks.len(), "compacted staged readings");
            }
            Some(Done::Compacted(Err(e))) => {
                // Its rows stay staged; the counts are read again.
                self.staged = None;
                let wait = self.compact_retry.failed();
                HubMetrics::add(&self.metrics.compaction_failures, 1);
                tracing::error!(error = %e, retry_in = ?wait, "compaction failed");
            }
            Some(Done::Merged(Ok(done))) => {
                self.merge_retry.succeeded();
                HubMetrics::add(&self.metrics.merges, done.len() as u64);
                if let Some(plan) = &mut self.merges {
                    plan.done(&done);
                }
            }
            Some(Done::Merged(Err(e))) => {
                self.merges = None;
                let wait = self.merge_retry.failed();
                tracing::error!(error = %e, retry_in = ?wait, "merging blocks failed");
            }
        }
    }

    /// A clean stop leaves nothing staged (on SQLite, where staging is
    /// this writer's alone): the file holds blocks only, smaller to copy
    /// or back up, and the next start has no staged rows to read back.
    /// A compaction that fails leaves its rows staged, as at any time.
    async fn compact_everything(&mut self) {
        if self.store.backend() != crate::config::Backend::Sqlite {
            return;
        }
        for part in 0..STAGING_PARTS {
            match self.staged().await {
                Ok(staged) if staged.parts[part].is_empty() => continue,
                Ok(_) => self.compact(part).await,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the staged readings to compact them");
                    return;
                }
            }
            if self.staged.is_none() {
                return;
            }
        }
    }

    async fn compact(&mut self, part: usize) {
        let started = std::time::Instant::now();
        let sqlite = self.store.backend() == crate::config::Backend::Sqlite;
        let Some(staged) = &mut self.staged else {
            return;
        };
        // Winding down, no ack waits: the whole part, in the fewest blocks.
        let piece_rows = piece_rows(self.settings.compact_rows);
        let piece = sqlite
            && !self.winding_down
            && staged.parts[part].len() > piece_rows
            && staged.thin(part);
        let (mut rows, last) = if piece {
            let rows = staged.take_front(part, piece_rows);
            let last = rows.last().copied();
            (rows, last)
        } else {
            (staged.take(part), None)
        };
        tracing::debug!(
            part,
            staged = rows.len(),
            piece,
            "compacting staged readings"
        );
        // SQLite: encoded here (PostgreSQL's compaction encodes inside).
        let mut encoded = None;
        let result = if self.store.backend() == crate::config::Backend::Postgres {
            // Other hubs stage into the same tables: the part is compacted
            // as the database holds it, not as this writer remembers it.
            self.store.compact_taking(part).await
        } else {
            let blocks = blocks::blocks_of(&mut rows);
            encoded = Some(started.elapsed().as_millis() as u64);
            let written = blocks
                .iter()
                .map(|b| ((b.device, b.sensor), b.level))
                .collect();
            self.store
                .compact_front(part, &blocks, &rows, last.as_ref())
                .await
                .map(|()| written)
        };
        match result {
            Ok(blocks) => {
                if let Some(staged) = &mut self.staged
                    && !piece
                {
                    // The part is empty: its allocation is kept.
                    rows.clear();
                    staged.parts[part] = rows;
                }
                self.compact_retry.succeeded();
                HubMetrics::add(&self.metrics.compactions, 1);
                if let Some(plan) = &mut self.merges {
                    for (series, level) in &blocks {
                        plan.add(*series, *level, 1);
                    }
                }
                tracing::debug!(
                    blocks = blocks.len(),
                    ms = started.elapsed().as_millis() as u64,
                    encode_ms = encoded,
                    "compacted staged readings"
                );
            }
            // They stay staged (queries read them there); tried again after
            // a growing wait, and past the cap new readings are refused.
            Err(e) => {
                self.store.abort().await;
                self.staged = None;
                let wait = self.compact_retry.failed();
                HubMetrics::add(&self.metrics.compaction_failures, 1);
                tracing::error!(error = %e, retry_in = ?wait, "compaction failed");
            }
        }
    }

    /// Whether merges wait (loading the plan first if needed).
    async fn merges_due(&mut self) -> bool {
        if self.merge_retry.waiting() {
            return false;
        }
        if self.merges.is_none() {
            match self.store.open_blocks().await {
                Ok(rows) => self.merges = Some(MergePlan::load(rows)),
                Err(e) => {
                    self.store.abort().await;
                    let wait = self.merge_retry.failed();
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot plan block merges");
                    return false;
                }
            }
        }
        self.merges.as_ref().is_some_and(MergePlan::is_due)
    }

    /// One step of merges: a few series, one short transaction, so a group
    /// commit never waits long behind it.
    async fn merge_step(&mut self) {
        let Some(plan) = &self.merges else { return };
        let jobs = plan.next(MERGES_PER_STEP);
        let started = std::time::Instant::now();
        match self.store.merge(&jobs).await {
            Ok(done) => {
                tracing::debug!(
                    series = done.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "merged blocks"
                );
                self.merge_retry.succeeded();
                HubMetrics::add(&self.metrics.merges, done.len() as u64);
                if let Some(plan) = &mut self.merges {
                    plan.done(&done);
                }
            }
            Err(e) => {
                self.store.abort().await;
                self.merges = None;
                let wait = self.merge_retry.failed();
                tracing::error!(error = %e, retry_in = ?wait, "merging blocks failed");
            }
        }
    }

    /// Whether a rollup is being built (true until a step finds none; on
    /// PostgreSQL looked at again now and then: another hub may have
    /// added one and stopped before it was built).
    fn builds_due(&mut self) -> bool {
        if !self.building
            && self.store.backend() == crate::config::Backend::Postgres
            && self.last_build.elapsed() >= BUILD_RECHECK
        {
            self.building = true;
        }
        self.building && !self.build_retry.waiting()
    }

    /// One step of building a new rollup from stored blocks.
    async fn build_step(&mut self) {
        self.last_build = Instant::now();
        match self.store.build_rollup_step().await {
            Ok(more) => {
                self.building = more;
                self.build_retry.succeeded();
            }
            Err(e) => {
                self.store.abort().await;
                let wait = self.build_retry.failed();
                tracing::error!(error = %e, retry_in = ?wait, "building a rollup failed");
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
        let mut slots: FxHashMap<DeviceKey, usize> = FxHashMap::default();
        for r in &self.rows {
            let slot = *slots.entry(r.device).or_insert_with(|| {
                devices.push(DeviceReadings {
                    device_id: self
                        .row_names
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
                    .known
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

    /// Writes a group in one transaction; one outcome per message, in order,
    /// and the changes to apply once it is committed.
    async fn write_group(
        &mut self,
        group: &[WriterMsg],
        now: i64,
    ) -> Result<(Vec<Outcome>, GroupChanges), StoreError> {
        let mut outcomes = Vec::with_capacity(group.len());
        let mut changes = GroupChanges::default();
        let mut rows = std::mem::take(&mut self.rows);
        rows.clear();
        let mut tx = self.store.begin().await?;
        let retains = group.iter().any(|m| matches!(m, WriterMsg::Retain { .. }));
        // Retention rewrites blocks: the block writers' lock comes first,
        // before any row lock (see `WriteTx::lock_blocks`).
        if retains {
            tx.lock_blocks().await?;
        }
        // SQLite: marks the writer no longer holds are made exact in the
        // tables before anything reads them. (Retention reads no mark and
        // appends what it subtracts to the log: a group of retention alone
        // folds nothing, see `commit_group`.)
        if !tx.shared()
            && self.known.fold_first
            && group.iter().any(|m| !matches!(m, WriterMsg::Retain { .. }))
        {
            tx.fold_progress().await?;
            changes.folded = true;
        }
        // The epochs of the devices with batches here: a batch is written
        // only while its stream's epoch is still the device's.
        // Twin changes lock their devices' rows here too (PostgreSQL: all
        // in key order, before any other row lock of the group).
        let batch_devices: Vec<DeviceKey> = group
            .iter()
            .filter_map(|msg| match msg {
                WriterMsg::Batch(batch) if !batch.ack.failed() => Some(batch.device),
                WriterMsg::Reported(patch) if !patch.ack.failed() => Some(patch.device),
                WriterMsg::Twin {
                    op: TwinOp::Desired { device, .. } | TwinOp::Tags { device, .. },
                    ..
                } => Some(*device),
                _ => None,
            })
            .collect();
        let mut twins = GroupTwins::default();
        let limits = self.settings.twin_limits;
        // Read inside the transaction: committed rows only.
        let known = &mut self.known;
        let shared = tx.shared();
        let mut batch_devices = batch_devices;
        if shared {
            // The rows Hellos and credential changes will lock, locked now
            // with the others in key order: two hubs' groups then never
            // take the same rows in opposite orders.
            let named: Vec<&str> = group.iter().filter_map(WriterMsg::names_device).collect();
            batch_devices.extend(tx.device_keys(&named).await?);
        }
        let epochs = known
            .epochs_of(&mut tx, &batch_devices, &mut changes)
            .await?;
        let steps = plan(group, &epochs);
        known.load_sensors(&mut tx).await?;
        known.load_device_sensors(&mut tx, group).await?;
        twins.load_for_group(&mut tx, group).await?;
        let mut settled =
            register_in_bulk(&mut tx, group, now, &self.settings.hub_id, &mut twins).await?;
        for (i, (msg, step)) in group.iter().zip(steps).enumerate() {
            match msg {
                WriterMsg::Register {
                    hello,
                    proof,
                    arrival,
                    ..
                } => {
                    // A write never claims a device streaming elsewhere.
                    if *arrival == Arrival::Write && shared {
                        let holder = tx
                            .streaming_elsewhere(hello.device_id.as_str(), &self.settings.hub_id)
                            .await?;
                        if let Some(hub) = holder {
                            outcomes.push(Outcome::StreamingElsewhere(hub));
                            continue;
                        }
                    }
                    let registered = match settled.remove(&i) {
                        Some(r) => Some(r),
                        None => {
                            tx.upsert_device_as(hello, now, proof, &self.settings.hub_id, *arrival)
                                .await?
                        }
                    };
                    match registered {
                        Some(r) => {
                            if !shared {
                                changes.epochs.insert(r.device, r.epoch);
                            }
                            if shared {
                                // Another hub may have moved the mark and
                                // the device's sensors since this one's
                                // caches were filled: the stored ones count.
                                known.marks.remove(&r.device);
                                known.device_sensors.remove(&r.device);
                                self.alarms.forget_device(r.device);
                            }
                            // The stored mark, or the one this group's
                            // earlier batches of the device moved it to.
                            // SQLite: the cached mark first; the table's
                            // lags the progress log for exactly the devices
                            // the cache holds (see `Known::fold_first`).
                            let stored = match known.marks.get(&r.device) {
                                Some(&mark) if !shared => mark,
                                _ => r.acked_seq,
                            };
                            let acked_seq = *changes.marks.entry(r.device).or_insert(stored);
                            // The Hello's firmware and labels are reported
                            // state (never tags).
                            let twin = match twins.of(&mut tx, r.device).await? {
                                // A write says no Hello.
                                Some(_) if *arrival == Arrival::Write => None,
                                Some(g) => {
                                    g.hello(hello, now);
                                    let t = &g.view.twin;
                                    hello.twin.map(|_| TwinStart {
                                        desired_version: t.desired_version,
                                        desired: Arc::from(doc::encode(&t.desired)),
                                        reported_seq: t.reported_seq,
                                        reported_version: t.reported_version,
                                    })
                                }
                                None => None,
                            };
                            outcomes.push(Outcome::Registered {
                                device: r.device,
                                epoch: r.epoch,
                                acked_seq,
                                twin,
                            });
                        }
                        None => outcomes.push(Outcome::Refused),
                    }
                }
                WriterMsg::Credentials { change, .. } => {
                    let changed = match change {
                        CredentialChange::Enroll {
                            hello,
                            token_sha256,
                        } => {
                            tx.enroll_device(hello, token_sha256, now, &self.settings.hub_id)
                                .await?
                        }
                        CredentialChange::Rotate {
                            device_id,
                            token_sha256,
                        } => {
                            tx.set_device_token(
                                device_id.as_str(),
                                token_sha256,
                                &self.settings.hub_id,
                            )
                            .await?
                        }
                        CredentialChange::Remove { device_id } => {
                            tx.remove_device(device_id.as_str(), now, &self.settings.hub_id)
                                .await?
                        }
                        CredentialChange::PinCertificate { device_id, sha256 } => {
                            tx.pin_certificate(
                                device_id.as_str(),
                                sha256.as_ref(),
                                &self.settings.hub_id,
                            )
                            .await?
                        }
                        CredentialChange::RevokeCertificate { sha256 } => {
                            let added = tx
                                .revoke_certificate(sha256, now, &self.settings.hub_id)
                                .await?;
                            outcomes.push(Outcome::Credentials(added));
                            continue;
                        }
                    };
                    // Enroll, rotate, remove and pin bump the device's
                    // epoch (the plan fenced what follows in this group).
                    let found = match changed {
                        Some((device, epoch)) => {
                            // SQLite's cache (PostgreSQL reads them).
                            if !shared {
                                changes.epochs.insert(device, epoch);
                            }
                            true
                        }
                        None => false,
                    };
                    outcomes.push(Outcome::Credentials(found));
                }
                WriterMsg::Retain { step, .. } => {
                    let mut done = RetainDone {
                        rollups_done: true,
                        ..RetainDone::default()
                    };
                    let mut rollup_left = step.limit;
                    for &(every_ms, cutoff_ms) in &step.rollups {
                        let n = tx.prune_rollup(every_ms, cutoff_ms, rollup_left).await?;
                        done.rollup_chunks += n;
                        rollup_left = rollup_left.saturating_sub(n as u32);
                        if rollup_left == 0 {
                            done.rollups_done = false;
                            break;
                        }
                    }
                    let mut left = u64::from(step.limit);
                    if step.staged {
                        // The count of staged rows is read again.
                        self.staged = None;
                        let n = tx.delete_old_staged(step.cutoff_ms, step.limit).await?;
                        done.deleted += n;
                        done.staged_done = n < left;
                        left -= n;
                    }
                    for (device, sensor) in &step.series {
                        if left == 0 {
                            break;
                        }
                        let (n, finished) = tx
                            .delete_old_readings(*device, *sensor, step.cutoff_ms, left as u32)
                            .await?;
                        done.deleted += n;
                        left = left.saturating_sub(n);
                        if !finished {
                            break;
                        }
                        done.series_done += 1;
                    }
                    outcomes.push(Outcome::Retained(done));
                }
                WriterMsg::Alarm(msg) => {
                    let outcome = self
                        .alarms
                        .run(&mut tx, &msg.op, now, &mut changes.alarms)
                        .await?;
                    outcomes.push(Outcome::Alarm(outcome));
                }
                WriterMsg::Job(msg) => {
                    let outcome = super::jobs::run(&mut tx, &msg.op, now).await?;
                    outcomes.push(Outcome::Job(outcome));
                }
                WriterMsg::Twin { op, .. } => {
                    let (TwinOp::Desired { device, .. } | TwinOp::Tags { device, .. }) = op;
                    let outcome = match twins.of(&mut tx, *device).await? {
                        Some(g) => g.apply(op, &limits, now),
                        None => TwinOutcome::Gone,
                    };
                    outcomes.push(Outcome::Twin(outcome));
                }
                WriterMsg::Reported(_) if step == Step::Skip => outcomes.push(Outcome::Skipped),
                WriterMsg::Reported(_) if step == Step::Fence => outcomes.push(Outcome::Fenced),
                WriterMsg::Reported(patch) => {
                    let outcome = match twins.of(&mut tx, patch.device).await? {
                        Some(g) => {
                            let rejected = g.report(patch.seq, &patch.patch, &limits, now);
                            Outcome::Reported {
                                seq: g.view.twin.reported_seq,
                                version: g.view.twin.reported_version,
                                rejected,
                            }
                        }
                        // Registered a moment ago: not gone unless removed,
                        // which bumped the epoch (fenced above).
                        None => Outcome::Fenced,
                    };
                    outcomes.push(outcome);
                }
                WriterMsg::Batch(_) if step == Step::Skip => outcomes.push(Outcome::Skipped),
                WriterMsg::Batch(_) if step == Step::Fence => outcomes.push(Outcome::Fenced),
                WriterMsg::Batch(batch) => {
                    changes
                        .names
                        .entry(batch.device)
                        .or_insert_with(|| Arc::clone(&batch.device_id));
                    let outcome = known
                        .write_batch(
                            &mut tx,
                            batch.device,
                            &batch.readings,
                            batch.assign_seqs,
                            &mut changes,
                            &mut rows,
                        )
                        .await?;
                    outcomes.push(outcome);
                }
            }
        }
        // Alarm rules see the group's stored rows before they are inserted
        // (a series this writer does not know yet is read as it was).
        {
            let names = &known.sensor_names;
            let added = &changes.sensors;
            let name_of = |key: SensorKey| -> Option<Arc<str>> {
                names.get(&key).cloned().or_else(|| {
                    added
                        .iter()
                        .find(|(_, k)| **k == key)
                        .map(|(n, _)| Arc::from(n.as_str()))
                })
            };
            let mut alarm_changes = std::mem::take(&mut changes.alarms);
            self.alarms
                .evaluate(&mut tx, &rows, &name_of, now, &mut alarm_changes)
                .await?;
            changes.alarms = alarm_changes;
        }
        let mut parts = std::mem::take(&mut self.row_parts);
        parts.resize_with(STAGING_PARTS, Vec::new);
        parts.iter_mut().for_each(Vec::clear);
        for r in &rows {
            parts[staging_part(r.device)].push(*r);
        }
        tx.insert_readings(&parts).await?;
        let new_pairs: Vec<(DeviceKey, SensorKey)> = changes
            .device_sensors
            .iter()
            .flat_map(|(device, sensors)| sensors.iter().map(|s| (*device, *s)))
            .collect();
        tx.add_device_sensors(&new_pairs).await?;
        let mut seen: Vec<(DeviceKey, SensorKey)> = rows
            .iter()
            .map(|r| (r.device, r.sensor))
            .filter(|pair| {
                self.sensor_seen
                    .get(pair)
                    .is_none_or(|&at| now - at >= SENSOR_SEEN_EVERY)
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        tx.sensors_seen(&seen, now).await?;
        changes.seen = seen;
        changes.now = now;
        let progress: Vec<DeviceProgress> = changes
            .added
            .iter()
            .map(|(device, added)| DeviceProgress {
                device: *device,
                acked_seq: changes.marks.get(device).copied().unwrap_or(0),
                added: *added,
            })
            .collect();
        tx.record_progress(&progress, now).await?;
        changes.twins = twins.save(&mut tx, &self.settings.hub_id).await?;
        changes.logged = tx.logged();
        tx.commit().await?;
        self.rows = rows;
        self.row_parts = parts;
        Ok((outcomes, changes))
    }
}

impl Known {
    fn forget(&mut self) {
        self.marks.clear();
        self.fold_first = true;
        self.epochs.clear();
        self.sensors.clear();
        self.sensor_names.clear();
        self.sensors_loaded = false;
        self.device_sensors.clear();
    }

    /// Applies a committed group's changes.
    fn apply(&mut self, changes: GroupChanges) {
        if changes.folded {
            self.fold_first = false;
        }
        self.marks.extend(changes.marks);
        self.epochs.extend(changes.epochs);
        for (name, key) in changes.sensors {
            self.sensor_names.insert(key, Arc::from(name.as_str()));
            self.sensors.insert(name, key);
        }
        // Only onto a device's committed sensors: an entry a Hello in the
        // group dropped (PostgreSQL: another hub may have added some) is
        // read again when next needed, and this group's are stored by then.
        // Extending nothing would leave the device with only the group's
        // new sensors, and its per-device limit would count too few.
        for (device, added) in changes.device_sensors {
            if let Some(sensors) = self.device_sensors.get_mut(&device) {
                sensors.extend(added);
            }
        }
        // A cache, not the truth: past this many devices it starts over
        // (marks and sensors are read again from the store as needed).
        if self.marks.len().max(self.epochs.len()) > self.cached_devices {
            self.marks.clear();
            self.fold_first = true;
            self.epochs.clear();
            self.device_sensors.clear();
        }
    }

    /// The session epochs of `devices`. PostgreSQL: read and locked (rows
    /// in key order) until the commit, so another hub's Hello waits for it
    /// and then reads the mark it made. SQLite: from the cache, the missing
    /// ones read (and remembered once the group commits).
    async fn epochs_of(
        &self,
        tx: &mut WriteTx<'_>,
        devices: &[DeviceKey],
        changes: &mut GroupChanges,
    ) -> Result<FxHashMap<DeviceKey, u64>, StoreError> {
        if tx.shared() {
            return tx.lock_epochs(devices).await;
        }
        let mut epochs = FxHashMap::with_capacity_and_hasher(devices.len(), Default::default());
        let mut missing = Vec::new();
        for device in devices {
            match self.epochs.get(device) {
                Some(epoch) => {
                    epochs.insert(*device, *epoch);
                }
                None => missing.push(*device),
            }
        }
        if !missing.is_empty() {
            let read = tx.lock_epochs(&missing).await?;
            changes.epochs.extend(read.iter().map(|(d, e)| (*d, *e)));
            epochs.extend(read);
        }
        Ok(epochs)
    }

    async fn load_sensors(&mut self, tx: &mut WriteTx<'_>) -> Result<(), StoreError> {
        if self.sensors_loaded {
            return Ok(());
        }
        let sensors = tx.load_sensors().await?;
        self.sensor_names = sensors
            .iter()
            .map(|(name, key)| (*key, Arc::from(name.as_str())))
            .collect();
        self.sensors = sensors.into_iter().collect();
        self.sensors_loaded = true;
        Ok(())
    }

    /// The sensors of the group's batches' devices that the cache does not
    /// hold, read in one statement before the group adds any. One read per
    /// device held a storm of new devices up: at 100k devices the writer
    /// waited on 100k round trips to SQLite's thread while their first
    /// batches queued.
    async fn load_device_sensors(
        &mut self,
        tx: &mut WriteTx<'_>,
        group: &[WriterMsg],
    ) -> Result<(), StoreError> {
        let mut missing: Vec<DeviceKey> = group
            .iter()
            .filter_map(|msg| match msg {
                WriterMsg::Batch(batch) => Some(batch.device),
                _ => None,
            })
            .filter(|device| !self.device_sensors.contains_key(device))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort_unstable();
        missing.dedup();
        let pairs = tx.device_sensors(&missing).await?;
        for device in missing {
            self.device_sensors.insert(device, Vec::new());
        }
        for (device, sensor) in pairs {
            self.device_sensors.entry(device).or_default().push(sensor);
        }
        Ok(())
    }

    /// Sorts one batch out against its device's mark: rows to insert,
    /// duplicates and rejections. Changes go to `changes` only.
    async fn write_batch(
        &mut self,
        tx: &mut WriteTx<'_>,
        device: DeviceKey,
        readings: &[CheckedReading],
        assign_seqs: bool,
        changes: &mut GroupChanges,
        rows: &mut Vec<RowToInsert>,
    ) -> Result<Outcome, StoreError> {
        let mark = match changes.marks.get(&device).or(self.marks.get(&device)) {
            Some(mark) => *mark,
            None => tx.device_acked_seq(device).await?,
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = self.device_sensors.entry(device) {
            // Read before this group adds any: committed rows only. (The
            // group's devices were read in bulk: this is a device whose
            // entry a Hello in the group dropped.)
            let pairs = tx.device_sensors(&[device]).await?;
            slot.insert(pairs.into_iter().map(|(_, sensor)| sensor).collect());
        }
        let (mut hwm, mut stored, mut rejected, mut duplicates) = (mark, 0u32, 0u32, 0u32);
        for reading in readings {
            // A reading without a seq takes the next after the mark.
            let seq = match reading {
                CheckedReading::Valid(_) if assign_seqs => hwm.saturating_add(1),
                _ => reading.seq(),
            };
            match judge_seq(&mut hwm, seq, matches!(reading, CheckedReading::Valid(_))) {
                Verdict::Duplicate => duplicates += 1,
                Verdict::Rejected => rejected += 1,
                Verdict::Store => {
                    let CheckedReading::Valid(r) = reading else {
                        unreachable!("judge stores only valid readings")
                    };
                    match self.sensor_for(tx, device, &r.sensor, changes).await? {
                        Ok(sensor) => {
                            rows.push(RowToInsert {
                                device,
                                sensor,
                                ts_ms: r.ts_ms,
                                seq: seq as i64,
                                value: r.value,
                            });
                            stored += 1;
                        }
                        Err(reason) => {
                            rejected += 1;
                            if let Some(suppressed) = self.limit_log.allow() {
                                tracing::warn!(device = %device.0, sensor = ?r.sensor, %reason,
                                    per_device = self.max_sensors_per_device,
                                    dictionary = self.max_sensors, suppressed,
                                    "reading rejected");
                            }
                        }
                    }
                }
            }
        }
        changes.marks.insert(device, hwm);
        *changes.added.entry(device).or_default() += u64::from(stored);
        Ok(Outcome::Batch {
            acked_seq: hwm,
            stored,
            rejected,
            duplicates,
        })
    }

    /// The key of a sensor for this device, learning it (within the
    /// per-device limit and the dictionary's) if new.
    async fn sensor_for(
        &mut self,
        tx: &mut WriteTx<'_>,
        device: DeviceKey,
        name: &str,
        changes: &mut GroupChanges,
    ) -> Result<Result<SensorKey, RejectReason>, StoreError> {
        let key = self
            .sensors
            .get(name)
            .or(changes.sensors.get(name))
            .copied();
        let committed = self
            .device_sensors
            .get(&device)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let pending = changes.device_sensors.get(&device);
        let uses = |k: SensorKey| committed.contains(&k) || pending.is_some_and(|p| p.contains(&k));
        if let Some(key) = key
            && uses(key)
        {
            return Ok(Ok(key));
        }
        if committed.len() + pending.map_or(0, Vec::len) >= self.max_sensors_per_device {
            return Ok(Err(RejectReason::DeviceSensorLimit));
        }
        let key = match key {
            Some(key) => key,
            None if self.sensors.len() + changes.sensors.len() >= self.max_sensors => {
                return Ok(Err(RejectReason::SensorDictionaryFull));
            }
            None => {
                let key = tx.sensor_key(name).await?;
                changes.sensors.insert(name.to_owned(), key);
                key
            }
        };
        changes.device_sensors.entry(device).or_default().push(key);
        Ok(Ok(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_is_a_run_of_4096_device_ids() {
        assert_eq!(FOLD_PACE * 8, FOLD_EVERY);
        assert!(
            DeviceKey(40_961).0 >> 12 == 10 && crate::store::log_slice(DeviceKey(40_961)) == 10
        );
        assert_eq!(crate::store::log_slice(DeviceKey(32 * 4096 + 5)), 0);
    }

    fn batch(device: i64, name: &str, epoch: u64) -> WriterMsg {
        WriterMsg::Batch(crate::ingest::IngestBatch {
            received: std::time::Instant::now(),
            device: DeviceKey(device),
            device_id: Arc::from(name),
            readings: Vec::new(),
            ack: crate::ingest::AckSlot::new(),
            epoch,
            assign_seqs: false,
        })
    }

    fn hello(name: &str) -> WriterMsg {
        let hello = crate::domain::DeviceHello::new(
            crate::domain::DeviceId::parse(name).unwrap(),
            String::new(),
            Default::default(),
            "",
        )
        .unwrap();
        WriterMsg::Register {
            hello,
            proof: crate::auth::Proof::Admitted,
            arrival: Arrival::Stream,
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    fn change(change: CredentialChange) -> WriterMsg {
        WriterMsg::Credentials {
            change,
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    fn id(name: &str) -> crate::domain::DeviceId {
        crate::domain::DeviceId::parse(name).unwrap()
    }

    #[test]
    fn a_devices_sensors_dropped_in_a_group_are_not_replaced_by_the_groups_new_ones() {
        let mut known = Known {
            marks: FxHashMap::default(),
            epochs: FxHashMap::default(),
            sensors: HashMap::new(),
            sensor_names: FxHashMap::default(),
            sensors_loaded: true,
            device_sensors: [(DeviceKey(1), vec![SensorKey(10)])].into_iter().collect(),
            fold_first: false,
            max_sensors: 100,
            max_sensors_per_device: 4,
            cached_devices: 1000,
            limit_log: LogThrottle::new(Duration::from_secs(10)),
        };
        // Device 2's batch added sensor 12, then a Hello of device 2 in the
        // same group dropped its entry (its committed sensors, say 11, are
        // not known here); device 1's batch added 13.
        let mut changes = GroupChanges::default();
        changes
            .device_sensors
            .insert(DeviceKey(1), vec![SensorKey(13)]);
        changes
            .device_sensors
            .insert(DeviceKey(2), vec![SensorKey(12)]);
        known.apply(changes);
        assert_eq!(
            known.device_sensors[&DeviceKey(1)],
            [SensorKey(10), SensorKey(13)]
        );
        assert!(!known.device_sensors.contains_key(&DeviceKey(2)));
    }

    #[test]
    fn a_group_writes_only_batches_of_the_devices_current_streams() {
        let epochs: FxHashMap<DeviceKey, u64> =
            [(DeviceKey(1), 5), (DeviceKey(2), 7)].into_iter().collect();
        let failed = batch(2, "b", 7);
        if let WriterMsg::Batch(b) = &failed {
            b.ack.fail();
        }
        let group = [
            batch(1, "a", 5),
            batch(1, "a", 4), // an older stream's
            failed,
            batch(3, "c", 1), // a device whose row is gone
            hello("a"),
            batch(1, "a", 5), // queued by the old stream after the new Hello
            batch(2, "b", 7),
        ];
        use Step::*;
        assert_eq!(
            plan(&group, &epochs),
            [Write, Fence, Skip, Fence, Run, Fence, Write]
        );
    }

    #[test]
    fn credential_changes_that_bump_the_epoch_fence_what_follows() {
        let epochs: FxHashMap<DeviceKey, u64> =
            [(DeviceKey(1), 5), (DeviceKey(2), 5)].into_iter().collect();
        let cases = [
            (
                change(CredentialChange::Rotate {
                    device_id: id("a"),
                    token_sha256: [0; 32],
                }),
                Step::Fence,
            ),
            (
                change(CredentialChange::Remove { device_id: id("a") }),
                Step::Fence,
            ),
            (
                change(CredentialChange::PinCertificate {
                    device_id: id("a"),
                    sha256: None,
                }),
                Step::Fence,
            ),
            (
                change(CredentialChange::Enroll {
                    hello: match hello("a") {
                        WriterMsg::Register { hello, .. } => hello,
                        _ => unreachable!("a Hello"),
                    },
                    token_sha256: [0; 32],
                }),
                Step::Fence,
            ),
            (
                change(CredentialChange::RevokeCertificate { sha256: [0; 32] }),
                Step::Write,
            ),
            (hello("b"), Step::Write),
        ];
        for (case, (first, then)) in cases.into_iter().enumerate() {
            let group = [batch(1, "a", 5), first, batch(1, "a", 5), batch(2, "b", 5)];
            let steps = plan(&group, &epochs);
            assert_eq!(steps[..3], [Step::Write, Step::Run, then], "case {case}");
        }
    }

    #[test]
    fn a_part_of_young_series_waits_for_a_few_readings_each() {
        // 1000 devices: a run's worth (25,000 of 200,000) is due, as ever.
        assert!(!compaction_due(200_000, false, 24_999, 500));
        assert!(compaction_due(200_000, false, 25_000, 500));
        assert!(!compaction_due(200_000, true, 25_000, 500));
        assert!(compaction_due(200_000, true, 100_000, 500));
        // 100,000 devices: 50,000 series in the part; 25,000 rows would be
        // blocks of half a reading. It waits for 8 a series (the writer
        // stops waiting at half the staging cap).
        assert!(!compaction_due(200_000, false, 25_000, 50_000));
        assert!(!compaction_due(200_000, false, 399_999, 50_000));
        assert!(compaction_due(200_000, false, 400_000, 50_000));
        assert!(!compaction_due(200_000, false, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        assert_eq!(b.failed(), Duration::from_millis(50));
        assert_eq!(b.failed(), Duration::from_millis(100));
        assert!(b.waiting());
        for _ in 0..10 {
            b.failed();
        }
        assert_eq!(b.failed(), Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!b.waiting());
        b.succeeded();
        assert_eq!(b.failed(), Duration::from_millis(50));
    }
}
