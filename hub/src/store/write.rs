//! The write side: only the ingest writer task holds a [`StoreWriter`].
//!
//! New readings go to the staging tables `readings_recent_{part}` (cheap
//! commits); compaction encodes them into compressed blocks
//! (`store::blocks`), one part at a time.

use std::collections::HashMap;

use rustc_hash::FxHashMap;

use super::StoreError;
use super::db::{Conn, Val, bind_vals, with_conn};
use super::write_conn::WriteConn;
use crate::config::Backend;
use crate::domain::{Arrival, DeviceHello, DeviceKey, Proof, SensorKey};

/// One row of the readings table.
#[derive(Debug, Clone, Copy)]
pub struct RowToInsert {
    pub device: DeviceKey,
    pub sensor: SensorKey,
    pub ts_ms: i64,
    pub seq: i64,
    pub value: f64,
}

/// A staged row as SQL returns it: (device_id, sensor_id, ts_ms, seq, value).
pub(super) type StagedRow = (i64, i64, i64, i64, f64);

impl From<StagedRow> for RowToInsert {
    fn from((device, sensor, ts_ms, seq, value): StagedRow) -> Self {
        Self {
            device: DeviceKey(device),
            sensor: SensorKey(sensor),
            ts_ms,
            seq,
            value,
        }
    }
}

impl RowToInsert {
    pub fn point(&self) -> super::codec::Point {
        super::codec::Point {
            ts_ms: self.ts_ms,
            seq: self.seq as u64,
            value: self.value,
        }
    }
}

/// Staging is split by device into this many tables, so that a compaction
/// encodes and truncates one of them at a time: each is a short pause
/// between group commits instead of one long one (migration 6).
pub const STAGING_PARTS: usize = 8;

/// A part's rows of a group go to PostgreSQL by `COPY` from this many on:
/// a `COPY` takes two round trips where an `INSERT` takes one, and costs
/// the server much less per row.
const COPY_MIN_ROWS: usize = 64;

/// The staging table of a device.
pub fn staging_part(device: DeviceKey) -> usize {
    device.0.rem_euclid(STAGING_PARTS as i64) as usize
}

/// The name of a staging table.
pub(super) fn staging_table(part: usize) -> String {
    format!("readings_recent_{part}")
}

/// A device as a Hello registered it.
#[derive(Debug, Clone, Copy)]
pub struct Registration {
    pub device: DeviceKey,
    /// Its high-water mark as `devices` holds it. On SQLite that lags
    /// the progress log: exact only for a device the ingest writer holds
    /// no mark of (see `ingest::writer`'s `Known::fold_first`).
    pub acked_seq: u64,
    /// Its session epoch, bumped by this Hello.
    pub epoch: u64,
}

/// The advisory lock of block writers (PostgreSQL): an arbitrary constant.
pub(super) const BLOCKS_LOCK: i64 = 0x7e1e_b10c;

/// Appended to the hub of a claim notice that an operator's credential
/// change sent (not a Hello).
pub const CREDENTIALS_CHANGED: &str = "/credentials";

/// The first word of a revocation notice on [`CLAIMS_CHANNEL`]:
/// `revoked {hub} {sha256 hex}`.
pub const REVOKED: &str = "revoked";

/// The channel on which PostgreSQL hubs announce the devices they claim.
pub const CLAIMS_CHANNEL: &str = "hub_claims";

/// A hub's claim of a device, as announced on [`CLAIMS_CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub epoch: u64,
    pub hub: String,
    pub device_id: String,
}

impl Claim {
    /// `epoch hub device_id` (hub ids hold no spaces).
    pub fn payload(&self) -> String {
        format!("{} {} {}", self.epoch, self.hub, self.device_id)
    }

    pub fn parse(payload: &str) -> Option<Claim> {
        let mut parts = payload.splitn(3, ' ');
        Some(Claim {
            epoch: parts.next()?.parse().ok()?,
            hub: parts.next()?.to_owned(),
            device_id: parts.next()?.to_owned(),
        })
    }
}

/// Where a device stands after a commit.
#[derive(Debug, Clone, Copy)]
pub struct DeviceProgress {
    pub device: DeviceKey,
    pub acked_seq: u64,
    /// Readings this commit added.
    pub added: u64,
}

/// Every statement is a round trip to sqlx's SQLite worker thread, which
/// costs far more than the rows in it: so rows go many to a statement.
/// Remainders are split into powers of two, so only a handful of distinct
/// statements are ever prepared (and they stay in sqlx's statement cache).
const INSERT_CHUNK: usize = 1024;
const PROGRESS_CHUNK: usize = 256;
const PAIR_CHUNK: usize = 256;
const BLOCK_CHUNK: usize = 256;
const REGISTER_CHUNK: usize = 256;

/// The writer's multi-row statements.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Batched {
    /// Into one staging table.
    Insert(usize),
    Progress,
    DeviceSensors,
    /// When a device's sensors last stored a reading.
    SensorSeen,
    /// SQLite: a fold's marks into `devices`...
    FoldProgress,
    /// ...and into `device_sensors`.
    FoldSensorSeen,
    Blocks,
    /// A new job's devices.
    JobDevices,
    /// Rollup chunks written...
    Rollups,
    /// ...and read first (by key).
    RollupChunks,
    /// Stream Hellos of known devices, claimed in bulk...
    Reclaim,
    /// ...and of new ones, inserted.
    Enter,
    /// Twins read (by device)...
    TwinsOf,
    /// ...and written.
    Twins,
    /// Alarm series states written...
    SeriesUpsert,
    /// ...and deleted (idle).
    SeriesDelete,
}

impl Batched {
    /// Most items one statement takes.
    pub(super) fn max(self) -> usize {
        match self {
            Batched::Insert(_) => INSERT_CHUNK,
            Batched::Progress | Batched::FoldProgress => PROGRESS_CHUNK,
            Batched::Reclaim | Batched::Enter | Batched::TwinsOf | Batched::Twins => REGISTER_CHUNK,
            Batched::DeviceSensors
            | Batched::SensorSeen
            | Batched::FoldSensorSeen
            | Batched::JobDevices
            | Batched::SeriesUpsert
            | Batched::SeriesDelete
            | Batched::Rollups
            | Batched::RollupChunks => PAIR_CHUNK,
            Batched::Blocks => BLOCK_CHUNK,
        }
    }

    /// The statement for `n` items (the same text for both backends, but
    /// for the parameters: `?` on SQLite, `$1`… on PostgreSQL).
    fn sql(self, n: usize, backend: Backend) -> String {
        let (head, arity, tail) = match self {
            Batched::Insert(part) => (
                format!(
                    "INSERT INTO {} (device_id, sensor_id, ts_ms, seq, value) VALUES ",
                    staging_table(part)
                ),
                5,
                "",
            ),
            // SQLite appends marks to a log, folded in later (see
            // `WriteTx::fold_progress`); PostgreSQL's other hubs read them
            // in place.
            Batched::Progress if backend == Backend::Sqlite => (
                "INSERT INTO progress_log (slice, n, seen_ms, marks) VALUES ".to_owned(),
                4,
                "",
            ),
            Batched::Progress => (
                "UPDATE devices SET acked_seq = v.column2, \
                 reading_count = reading_count + v.column3, last_seen_ms = v.column4, \
                 last_reading_ms = CASE WHEN v.column3 > 0 THEN v.column4 \
                 ELSE devices.last_reading_ms END \
                 FROM (VALUES "
                    .to_owned(),
                4,
                ") AS v WHERE devices.id = v.column1",
            ),
            // `upsert_device_as` for a stream, many devices at once: the
            // same credential check, per row (kind, hash).
            Batched::Reclaim => (
                "UPDATE devices SET firmware = v.column2, last_seen_ms = v.column5, \
                 epoch = devices.epoch + 1, hub = v.column6, online_since_ms = v.column5 \
                 FROM (VALUES "
                    .to_owned(),
                6,
                ") AS v WHERE devices.external_id = v.column1 AND devices.removed_ms IS NULL \
                 AND (v.column3 = 0 \
                   OR (v.column3 = 1 AND devices.token_sha256 = v.column4) \
                   OR (v.column3 = 2 AND devices.token_sha256 IS NULL) \
                   OR (v.column3 = 3 AND (devices.cert_sha256 IS NULL OR devices.cert_sha256 = v.column4) \
                       AND NOT EXISTS (SELECT 1 FROM revoked_certs WHERE sha256 = v.column4))) \
                 RETURNING external_id, id, acked_seq, epoch",
            ),
            Batched::Enter => (
                "INSERT INTO devices (external_id, firmware, first_seen_ms, last_seen_ms, \
                 epoch, hub, online_since_ms) VALUES "
                    .to_owned(),
                7,
                " ON CONFLICT (external_id) DO NOTHING RETURNING external_id, id, acked_seq, epoch",
            ),
            Batched::TwinsOf => (
                format!(
                    "SELECT d.id, d.external_id, d.tags, {} FROM devices d \
                     LEFT JOIN twins t ON t.device_id = d.id WHERE d.id IN (VALUES ",
                    super::twins::twin_columns(backend)
                ),
                1,
                ")",
            ),
            // The twins' documents are jsonb on PostgreSQL.
            Batched::Twins => (
                {
                    let doc = |c: &str| match backend {
                        Backend::Sqlite => c.to_owned(),
                        Backend::Postgres => format!("{c}::jsonb"),
                    };
                    format!(
                        "INSERT INTO twins (device_id, desired, desired_meta, desired_version, \
                         reported, reported_meta, reported_version, reported_seq, in_sync) \
                         SELECT v.column1, {}, {}, v.column4, {}, {}, v.column7, v.column8, \
                         v.column9 FROM (VALUES ",
                        doc("v.column2"),
                        doc("v.column3"),
                        doc("v.column5"),
                        doc("v.column6")
                    )
                },
                9,
                // SQLite needs a WHERE to tell the upsert from a join.
                ") AS v WHERE true ON CONFLICT (device_id) DO UPDATE SET \
                 desired = excluded.desired, desired_meta = excluded.desired_meta, \
                 desired_version = excluded.desired_version, reported = excluded.reported, \
                 reported_meta = excluded.reported_meta, \
                 reported_version = excluded.reported_version, \
                 reported_seq = excluded.reported_seq, in_sync = excluded.in_sync",
            ),
            Batched::DeviceSensors => (
                "INSERT INTO device_sensors (device_id, sensor_id) VALUES ".to_owned(),
                2,
                " ON CONFLICT DO NOTHING",
            ),
            Batched::SeriesUpsert => (
                "INSERT INTO alarm_series (rule_id, device_id, sensor_id, state) VALUES "
                    .to_owned(),
                4,
                " ON CONFLICT (device_id, rule_id, sensor_id) DO UPDATE SET state = excluded.state",
            ),
            Batched::SeriesDelete => (
                "DELETE FROM alarm_series WHERE (rule_id, device_id, sensor_id) IN (VALUES "
                    .to_owned(),
                3,
                ")",
            ),
            Batched::RollupChunks => (
                "SELECT every_ms, device_id, sensor_id, chunk_ms, data FROM rollups \
                 WHERE (every_ms, device_id, sensor_id, chunk_ms) IN (VALUES "
                    .to_owned(),
                4,
                ")",
            ),
            Batched::Rollups => (
                "INSERT INTO rollups (every_ms, device_id, sensor_id, chunk_ms, data) VALUES "
                    .to_owned(),
                5,
                " ON CONFLICT (every_ms, device_id, sensor_id, chunk_ms) DO UPDATE SET data = excluded.data",
            ),
            Batched::JobDevices => (
                "INSERT INTO job_devices (job_id, device, position, state) VALUES ".to_owned(),
                4,
                "",
            ),
            Batched::SensorSeen if backend == Backend::Sqlite => (
                "INSERT INTO sensor_seen_log (slice, n, seen_ms, marks) VALUES ".to_owned(),
                4,
                "",
            ),
            // In place: PostgreSQL's commits, and SQLite's fold.
            Batched::SensorSeen | Batched::FoldSensorSeen => (
                "UPDATE device_sensors SET last_reading_ms = v.column3 FROM (VALUES ".to_owned(),
                3,
                ") AS v WHERE device_sensors.device_id = v.column1 \
                 AND device_sensors.sensor_id = v.column2",
            ),
            // Hellos move `last_seen_ms` in place, hence max(); a device
            // with no reading in the fold's marks has 0 for its time.
            Batched::FoldProgress => (
                "UPDATE devices SET acked_seq = max(devices.acked_seq, v.column2), \
                 reading_count = max(0, devices.reading_count + v.column3), \
                 last_seen_ms = max(devices.last_seen_ms, v.column4), \
                 last_reading_ms = CASE WHEN v.column5 > 0 THEN v.column5 \
                 ELSE devices.last_reading_ms END \
                 FROM (VALUES "
                    .to_owned(),
                5,
                ") AS v WHERE devices.id = v.column1",
            ),
            Batched::Blocks => (
                "INSERT INTO blocks (device_id, sensor_id, level, first_ts, last_ts, count, data) \
                 VALUES "
                    .to_owned(),
                7,
                "",
            ),
        };
        multi_row_sql(&head, arity, n, tail, backend == Backend::Postgres)
    }
}

pub struct StoreWriter {
    conn: WriteConn,
    sql: FxHashMap<(Batched, usize), String>,
    /// PostgreSQL: the months of `blocks` known to have a partition.
    partitions: std::collections::HashSet<i64>,
    /// SQLite: the last number given to a progress log row.
    log_n: i64,
    /// SQLite: the database's lock file, held while this writer lives.
    _lock: Option<std::fs::File>,
}

/// A write transaction of the writer. Dropped without [`WriteTx::commit`],
/// it is rolled back before the next one begins.
pub struct WriteTx<'c> {
    pub(super) conn: &'c mut WriteConn,
    /// SQLite: the last number given to a progress log row...
    log_n: &'c mut i64,
    /// ...and the marks this transaction appended, by slice.
    logged: [u64; LOG_SLICES as usize],
    sql: &'c mut FxHashMap<(Batched, usize), String>,
    pub(super) partitions: &'c mut std::collections::HashSet<i64>,
}

/// How a registration checks a proof against the stored credentials: a
/// kind (0 admitted, 1 the device's own token, 2 the fleet token, 3 a
/// certificate) and the hash it must match.
fn proof_check(proof: &Proof) -> (i64, Option<&[u8]>) {
    match proof {
        Proof::Admitted => (0, None),
        Proof::OwnToken(hash) => (1, Some(hash.as_slice())),
        Proof::FleetToken => (2, None),
        Proof::Certificate(sha256) => (3, Some(sha256.as_slice())),
    }
}

/// How many items the next multi-row statement takes.
pub(super) fn chunk_len(remaining: usize, max: usize) -> usize {
    if remaining >= max {
        max
    } else {
        1 << (usize::BITS - 1 - remaining.leading_zeros())
    }
}

/// `items` in statements of at most `max`, the rest in powers of two
/// (see [`chunk_len`]).
pub(super) fn chunks<T>(mut items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let (chunk, rest) = items.split_at(chunk_len(items.len(), max));
        items = rest;
        Some(chunk)
    })
}

/// SQLite: the slices of the progress logs (see [`log_slice`]): one per
/// run of 4096 device ids up to 131,072 devices. (With 8, a slice of a
/// 100k fleet held three runs, ~12k devices, and its fold held the writer
/// up for 80-250 ms.)
pub const LOG_SLICES: u8 = 32;

/// SQLite: the slice of the progress logs a device's rows go to. Devices
/// are rows of `devices` by id (and of `device_sensors` by device first),
/// so runs of 4096 ids sit on runs of pages: folding one slice touches the
/// pages of one run of each table (of several runs past 131,072 devices).
pub fn log_slice(device: DeviceKey) -> u8 {
    (device.0 >> 12).rem_euclid(i64::from(LOG_SLICES)) as u8
}

/// SQLite: which marks of the progress logs a statement reads.
#[derive(Clone, Copy)]
pub(crate) enum LogPick<'a> {
    /// All of them (the views).
    All,
    /// A fold's slice.
    Slice(u8),
    /// The marks of the one device whose key the SQL expression gives: a
    /// seek on its slice, then its rows alone, by their text (a device's
    /// marks begin `[<device_id>,`; seqs and counts follow a comma). The
    /// expression is read beside `json_each`'s columns (`id`, `key`,
    /// `value`, ...): a parameter or a subquery, not a bare column name.
    Device(&'a str),
}

impl LogPick<'_> {
    /// The condition on the log's rows (`slice`, `marks`).
    fn rows(self) -> String {
        match self {
            LogPick::All => "true".to_owned(),
            LogPick::Slice(slice) => format!("slice = {slice}"),
            LogPick::Device(id) => format!(
                "slice = {} AND instr(marks, '[' || ({id}) || ',') > 0",
                super::slice_sql(id)
            ),
        }
    }

    /// The condition on a row's marks (`m`, one of `json_each`).
    fn marks(self) -> String {
        match self {
            LogPick::Device(id) => format!("m.value ->> 0 = ({id})"),
            LogPick::All | LogPick::Slice(_) => "true".to_owned(),
        }
    }
}

/// SQLite: what the marks of `progress_log` that `pick` picks add, per
/// device (the view `progress_pending`, restricted). A mark only grows and
/// a device's id is never reused, so max() and sum() fold them.
pub(crate) fn progress_pending(pick: LogPick) -> String {
    format!(
        "SELECT CAST(m.value ->> 0 AS INTEGER) AS device_id, \
         max(CAST(m.value ->> 1 AS INTEGER)) AS acked_seq, \
         sum(CAST(m.value ->> 2 AS INTEGER)) AS added, max(l.seen_ms) AS seen_ms, \
         max(CASE WHEN m.value ->> 2 > 0 THEN l.seen_ms END) AS reading_ms \
         FROM progress_log l, json_each(l.marks) m WHERE {} AND {} GROUP BY 1",
        pick.rows(),
        pick.marks()
    )
}

/// SQLite: the same of `sensor_seen_log`, per series (the view
/// `sensor_seen_pending`, restricted).
pub(crate) fn sensor_seen_pending(pick: LogPick) -> String {
    format!(
        "SELECT CAST(m.value ->> 0 AS INTEGER) AS device_id, \
         CAST(m.value ->> 1 AS INTEGER) AS sensor_id, max(l.seen_ms) AS seen_ms \
         FROM sensor_seen_log l, json_each(l.marks) m \
         WHERE {} AND {} GROUP BY 1, 2",
        pick.rows(),
        pick.marks()
    )
}

/// SQLite: the numbers of a log row's marks (`[[1,2,3],[4,5,6]]`), `N`
/// to a mark, as `log_marks` (or SQLite's `json_array`) wrote them: JSON
/// arrays of `N` integers in an array, nothing else. None for anything
/// else, which `WriteTx::fold_where` then folds in SQL.
fn parse_marks<const N: usize>(text: &str) -> Option<Vec<[i64; N]>> {
    /// Takes `token` (after any spaces) off the front of `rest`.
    fn take(rest: &mut &str, token: &str) -> bool {
        match rest.trim_ascii_start().strip_prefix(token) {
            Some(after) => {
                *rest = after;
                true
            }
            None => false,
        }
    }
    /// Takes an integer off the front of `rest`, as JSON writes one (no
    /// leading zero, which SQLite's JSON refuses).
    fn number(rest: &mut &str) -> Option<i64> {
        let text = rest.trim_ascii_start();
        let end = text
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
            .map_or(text.len(), |(i, _)| i);
        let (number, after) = text.split_at(end);
        *rest = after;
        let digits = number.strip_prefix('-').unwrap_or(number);
        if digits.len() > 1 && digits.starts_with('0') {
            return None;
        }
        number.parse().ok()
    }
    let rest = &mut text.trim_ascii();
    let mut marks = Vec::new();
    if !take(rest, "[") {
        return None;
    }
    if take(rest, "]") {
        return rest.is_empty().then_some(marks);
    }
    loop {
        if !take(rest, "[") {
            return None;
        }
        let mut mark = [0; N];
        for (i, slot) in mark.iter_mut().enumerate() {
            if i > 0 && !take(rest, ",") {
                return None;
            }
            *slot = number(rest)?;
        }
        if !take(rest, "]") {
            return None;
        }
        marks.push(mark);
        if take(rest, "]") {
            return rest.is_empty().then_some(marks);
        }
        if !take(rest, ",") {
            return None;
        }
    }
}

/// SQLite: the fold in SQL of the log rows `pick` picks (see
/// `WriteTx::fold_where`), then deleted. Hellos move `last_seen_ms` in
/// place, hence max().
fn fold_sql(pick: LogPick) -> [String; 4] {
    [
        format!(
            "UPDATE devices SET acked_seq = max(devices.acked_seq, p.acked_seq), \
             reading_count = max(0, devices.reading_count + p.added), \
             last_seen_ms = max(devices.last_seen_ms, p.seen_ms), \
             last_reading_ms = COALESCE(p.reading_ms, devices.last_reading_ms) \
             FROM ({}) AS p WHERE devices.id = p.device_id",
            progress_pending(pick)
        ),
        format!("DELETE FROM progress_log WHERE {}", pick.rows()),
        format!(
            "UPDATE device_sensors SET last_reading_ms = s.seen_ms FROM ({}) AS s \
             WHERE device_sensors.device_id = s.device_id \
             AND device_sensors.sensor_id = s.sensor_id",
            sensor_seen_pending(pick)
        ),
        format!("DELETE FROM sensor_seen_log WHERE {}", pick.rows()),
    ]
}

impl StoreWriter {
    pub(super) fn new(conn: WriteConn, lock: Option<std::fs::File>) -> Self {
        Self {
            conn,
            sql: FxHashMap::default(),
            partitions: std::collections::HashSet::new(),
            log_n: 0,
            _lock: lock,
        }
    }

    pub(super) fn conn(&mut self) -> &mut WriteConn {
        &mut self.conn
    }

    pub async fn begin(&mut self) -> Result<WriteTx<'_>, StoreError> {
        self.conn.begin().await?;
        Ok(WriteTx {
            conn: &mut self.conn,
            log_n: &mut self.log_n,
            logged: [0; LOG_SLICES as usize],
            sql: &mut self.sql,
            partitions: &mut self.partitions,
        })
    }

    /// After a failed write: rolls back at once (see [`WriteConn::abort`]).
    /// Partitions it made are rolled back too: they are looked for again.
    pub async fn abort(&mut self) {
        self.conn.abort().await;
        self.partitions.clear();
    }

    pub fn backend(&self) -> Backend {
        self.conn.backend()
    }

    /// PostgreSQL: opens the write connection again on the runtime this
    /// runs on (see [`WriteConn::open_here`]).
    pub async fn open_here(&mut self) -> Result<(), StoreError> {
        self.conn.open_here().await
    }

    /// Times the write connection was replaced because SQLite still held a
    /// transaction open on it after a failure.
    pub fn reopened(&self) -> u64 {
        self.conn.reopened()
    }

    /// SQLite: folds the progress logs in (`slice`, or all of them), in a
    /// transaction of its own (see [`WriteTx::fold_progress`]); the log
    /// rows folded (a row: one commit's marks of one slice).
    pub async fn fold_progress(&mut self, slice: Option<u8>) -> Result<u64, StoreError> {
        if self.backend() != Backend::Sqlite {
            return Ok(0);
        }
        let mut tx = self.begin().await?;
        let folded = match slice {
            Some(slice) => tx.fold_slice(slice).await?,
            None => tx.fold_progress().await?,
        };
        tx.commit().await?;
        Ok(folded)
    }

    /// SQLite: numbers new progress log rows after those the logs hold
    /// (none, unless the fold at open failed).
    pub(super) async fn number_log_rows(&mut self) -> Result<(), StoreError> {
        let Some(c) = self.conn.conn().sqlite() else {
            return Ok(());
        };
        self.log_n = sqlx::query_scalar(
            "SELECT max((SELECT COALESCE(max(n), 0) FROM progress_log), \
             (SELECT COALESCE(max(n), 0) FROM sensor_seen_log))",
        )
        .fetch_one(&mut *c)
        .await?;
        Ok(())
    }

    /// SQLite, asked when the ingest writer starts: whether the progress
    /// logs still hold rows (the fold at open failed), which it then folds
    /// in first. (Later, the numbering has moved on and this says nothing.)
    pub fn unfolded(&self) -> bool {
        self.log_n > 0
    }

    /// Closes the connection. On SQLite the pages compaction and merges
    /// freed go back to the file system first, so a cleanly stopped hub
    /// leaves a file of its data's size (databases made before incremental
    /// auto-vacuum was set keep theirs: a no-op there).
    pub async fn close(mut self) -> Result<(), StoreError> {
        if self.backend() == Backend::Sqlite {
            let vacuum = with_conn!(self.conn.conn(), c => {
                sqlx::query("PRAGMA incremental_vacuum").execute(c).await.map(drop)
            });
            if let Err(e) = vacuum {
                tracing::warn!(error = %e, "could not give free pages back at stop");
            }
        }
        self.conn.close().await?;
        Ok(())
    }
}

impl WriteTx<'_> {
    pub async fn commit(self) -> Result<(), StoreError> {
        self.conn.commit().await
    }

    /// Registers the device or refreshes what it says about itself, claims
    /// it for hub `hub` (its epoch goes up by one); returns its key,
    /// committed high-water mark and new epoch, or None when its
    /// credentials no longer match `proof` (removed, or rotated since its
    /// Hello). On PostgreSQL the claim is announced to the other hubs
    /// (NOTIFY [`CLAIMS_CHANNEL`]) when the transaction commits.
    pub async fn upsert_device(
        &mut self,
        hello: &DeviceHello,
        now_ms: i64,
        proof: &Proof,
        hub: &str,
    ) -> Result<Option<Registration>, StoreError> {
        self.upsert_device_as(hello, now_ms, proof, hub, Arrival::Stream)
            .await
    }

    /// [`WriteTx::upsert_device`] for a stream's Hello or a line-protocol
    /// write; a write leaves the firmware and the online mark as they are,
    /// but for a mark of another hub (whose lease ran out: the writer
    /// checked [`WriteTx::streaming_elsewhere`]), which it clears.
    pub async fn upsert_device_as(
        &mut self,
        hello: &DeviceHello,
        now_ms: i64,
        proof: &Proof,
        hub: &str,
        arrival: Arrival,
    ) -> Result<Option<Registration>, StoreError> {
        let (kind, hash) = proof_check(proof);
        let row: Option<(i64, i64, i64)> = with_conn!(self.conn.conn(), c => sqlx::query_as(
            "INSERT INTO devices (external_id, firmware, first_seen_ms, last_seen_ms, \
             epoch, hub, online_since_ms) \
             VALUES ($1, $2, $3, $3, 1, $6, CASE WHEN $7 THEN NULL ELSE $3 END) \
             ON CONFLICT (external_id) DO UPDATE SET \
             firmware = CASE WHEN $7 THEN devices.firmware ELSE excluded.firmware END, \
             last_seen_ms = excluded.last_seen_ms, \
             epoch = devices.epoch + 1, \
             hub = CASE WHEN $7 THEN devices.hub ELSE excluded.hub END, \
             online_since_ms = CASE WHEN $7 AND devices.hub IS DISTINCT FROM $6 THEN NULL \
               WHEN $7 THEN devices.online_since_ms ELSE excluded.online_since_ms END \
             WHERE devices.removed_ms IS NULL AND ($4 = 0 \
               OR ($4 = 1 AND devices.token_sha256 = $5) \
               OR ($4 = 2 AND devices.token_sha256 IS NULL) \
               OR ($4 = 3 AND (devices.cert_sha256 IS NULL OR devices.cert_sha256 = $5) \
                   AND NOT EXISTS (SELECT 1 FROM revoked_certs WHERE sha256 = $5))) \
             RETURNING id, acked_seq, epoch",
        )
        .bind(hello.device_id.as_str())
        .bind(&hello.firmware)
        .bind(now_ms)
        .bind(kind)
        .bind(hash)
        .bind(hub)
        .bind(arrival == Arrival::Write)
        .fetch_optional(c)
        .await?);
        let Some((id, acked, epoch)) = row else {
            return Ok(None);
        };
        if let Conn::Postgres(c) = self.conn.conn() {
            let claim = Claim {
                epoch: epoch as u64,
                hub: hub.to_owned(),
                device_id: hello.device_id.as_str().to_owned(),
            };
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CLAIMS_CHANNEL)
                .bind(claim.payload())
                .execute(c)
                .await?;
        }
        Ok(Some(Registration {
            device: DeviceKey(id),
            acked_seq: acked as u64,
            epoch: epoch as u64,
        }))
    }

    /// [`WriteTx::upsert_device_as`] for many streams' Hellos of distinct
    /// devices, in a statement or two per 256 of them instead of one each
    /// (a reconnect storm of 100,000 devices is 100,000 Hellos). Known
    /// devices are claimed with the same credential check, new ones
    /// inserted. Each Hello's registration in order, or None where the
    /// bulk statements could not settle it (its credentials no longer
    /// match, or another hub inserted the device meanwhile): the caller
    /// runs `upsert_device_as` for those, which says which.
    pub async fn register_streams(
        &mut self,
        hellos: &[(&DeviceHello, &Proof)],
        now_ms: i64,
        hub: &str,
    ) -> Result<Vec<Option<Registration>>, StoreError> {
        debug_assert!(
            hellos
                .iter()
                .map(|(h, _)| h.device_id.as_str())
                .collect::<std::collections::HashSet<_>>()
                .len()
                == hellos.len(),
            "one Hello per device"
        );
        let mut out: Vec<Option<Registration>> = vec![None; hellos.len()];
        let mut vals: Vec<Val<'_>> = Vec::new();
        let mut start = 0;
        while start < hellos.len() {
            let n = chunk_len(hellos.len() - start, REGISTER_CHUNK);
            let chunk = &hellos[start..start + n];
            let at: HashMap<&str, usize> = chunk
                .iter()
                .enumerate()
                .map(|(i, (h, _))| (h.device_id.as_str(), start + i))
                .collect();
            vals.clear();
            for (hello, proof) in chunk {
                let (kind, hash) = proof_check(proof);
                vals.extend([
                    Val::T(hello.device_id.as_str()),
                    Val::T(&hello.firmware),
                    Val::I(kind),
                    Val::B(hash.unwrap_or_default()),
                    Val::I(now_ms),
                    Val::T(hub),
                ]);
            }
            let sql = self.statement(Batched::Reclaim, n);
            self.settle(&sql, &vals, &at, &mut out).await?;
            // The rest are new devices (or refused, or another hub's
            // insert won: left to `upsert_device_as`).
            let mut new: Vec<&DeviceHello> = chunk
                .iter()
                .map(|(h, _)| *h)
                .filter(|h| out[at[h.device_id.as_str()]].is_none())
                .collect();
            // In key order: two hubs inserting the same new devices take
            // their index entries in the same order (PostgreSQL).
            new.sort_by(|a, b| a.device_id.as_str().cmp(b.device_id.as_str()));
            let mut rest = new.as_slice();
            while !rest.is_empty() {
                let (part, tail) = rest.split_at(chunk_len(rest.len(), REGISTER_CHUNK));
                rest = tail;
                vals.clear();
                for hello in part {
                    vals.extend([
                        Val::T(hello.device_id.as_str()),
                        Val::T(&hello.firmware),
                        Val::I(now_ms),
                        Val::I(now_ms),
                        Val::I(1),
                        Val::T(hub),
                        Val::I(now_ms),
                    ]);
                }
                let sql = self.statement(Batched::Enter, part.len());
                self.settle(&sql, &vals, &at, &mut out).await?;
            }
            start += n;
        }
        if let Conn::Postgres(c) = self.conn.conn() {
            let claims: Vec<String> = hellos
                .iter()
                .zip(&out)
                .filter_map(|((hello, _), r)| {
                    r.map(|r| {
                        Claim {
                            epoch: r.epoch,
                            hub: hub.to_owned(),
                            device_id: hello.device_id.as_str().to_owned(),
                        }
                        .payload()
                    })
                })
                .collect();
            if !claims.is_empty() {
                sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                    .bind(CLAIMS_CHANNEL)
                    .bind(claims)
                    .execute(c)
                    .await?;
            }
        }
        Ok(out)
    }

    /// Runs a registration statement (rows of external_id, id, acked_seq,
    /// epoch) and puts each row where its device's Hello is.
    async fn settle(
        &mut self,
        sql: &str,
        vals: &[Val<'_>],
        at: &HashMap<&str, usize>,
        out: &mut [Option<Registration>],
    ) -> Result<(), StoreError> {
        type Row = (String, i64, i64, i64);
        let rows: Vec<Row> = with_conn!(self.conn.conn(), c => {
            let rows = bind_vals(sqlx::query(sql), vals).fetch_all(c).await?;
            rows.iter()
                .map(<Row as sqlx::FromRow<_>>::from_row)
                .collect::<Result<Vec<_>, _>>()?
        });
        for (external_id, id, acked, epoch) in rows {
            if let Some(&i) = at.get(external_id.as_str()) {
                out[i] = Some(Registration {
                    device: DeviceKey(id),
                    acked_seq: acked as u64,
                    epoch: epoch as u64,
                });
            }
        }
        Ok(())
    }

    /// The hub holding a gRPC stream of the device, when that is a hub
    /// other than `hub` whose heartbeat is within the lease (several
    /// hubs on PostgreSQL; SQLite keeps no heartbeats, and this hub's own
    /// streams are in its registry). A line-protocol write then waits:
    /// claiming the device would cut the stream off.
    pub async fn streaming_elsewhere(
        &mut self,
        device_id: &str,
        hub: &str,
    ) -> Result<Option<String>, StoreError> {
        let holder: Option<String> = with_conn!(self.conn.conn(), c => sqlx::query_scalar(
            "SELECT d.hub FROM devices d JOIN hubs h ON h.id = d.hub \
             WHERE d.external_id = $1 AND d.online_since_ms IS NOT NULL \
             AND d.hub <> $2 AND h.heartbeat_ms >= $3",
        )
        .bind(device_id)
        .bind(hub)
        .bind(super::lease_cutoff())
        .fetch_optional(c)
        .await?);
        Ok(holder)
    }

    /// Enrolls a device with its own token (adding it, or re-adding a
    /// removed one; its mark and readings stay).
    /// Its epoch is bumped: a stream still on the old credentials, on any
    /// hub, is fenced and told. The device and its epoch.
    pub async fn enroll_device(
        &mut self,
        hello: &DeviceHello,
        token_sha256: &[u8; 32],
        now_ms: i64,
        hub: &str,
    ) -> Result<Option<(DeviceKey, u64)>, StoreError> {
        let tags = super::twins::encode_tags(&hello.labels);
        let row: Option<(i64, i64)> = with_conn!(self.conn.conn(), c => sqlx::query_as(
            "INSERT INTO devices (external_id, firmware, tags, first_seen_ms, last_seen_ms, token_sha256) \
             VALUES ($1, '', $2, $3, $3, $4) \
             ON CONFLICT (external_id) DO UPDATE SET tags = excluded.tags, \
             token_sha256 = excluded.token_sha256, removed_ms = NULL, epoch = devices.epoch + 1 \
             RETURNING id, epoch",
        )
        .bind(hello.device_id.as_str())
        .bind(tags)
        .bind(now_ms)
        .bind(token_sha256.as_slice())
        .fetch_optional(c)
        .await?);
        self.announce_end(hello.device_id.as_str(), row, hub).await
    }

    /// Pins a device to one client certificate (its SHA-256), or unpins it
    /// (None); its epoch is bumped, so a stream on another certificate is
    /// fenced. The device and its new epoch, or None when there is no such
    /// device.
    pub async fn pin_certificate(
        &mut self,
        device_id: &str,
        sha256: Option<&[u8; 32]>,
        hub: &str,
    ) -> Result<Option<(DeviceKey, u64)>, StoreError> {
        let row: Option<(i64, i64)> = with_conn!(self.conn.conn(), c => sqlx::query_as(
            "UPDATE devices SET cert_sha256 = $1, epoch = epoch + 1 \
             WHERE external_id = $2 AND removed_ms IS NULL RETURNING id, epoch",
        )
        .bind(sha256.map(|s| s.as_slice()))
        .bind(device_id)
        .fetch_optional(c)
        .await?);
        self.announce_end(device_id, row, hub).await
    }

    /// Refuses a client certificate (its SHA-256) from now on, whichever
    /// device it names; false when it was revoked already. On PostgreSQL a
    /// new revocation is announced (`revoked {hub} {sha256}` on
    /// [`CLAIMS_CHANNEL`]): every hub ends its streams that presented it.
    pub async fn revoke_certificate(
        &mut self,
        sha256: &[u8; 32],
        now_ms: i64,
        hub: &str,
    ) -> Result<bool, StoreError> {
        let added = with_conn!(self.conn.conn(), c => sqlx::query(
            "INSERT INTO revoked_certs (sha256, revoked_ms) VALUES ($1, $2) \
             ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(sha256.as_slice())
        .bind(now_ms)
        .execute(c)
        .await?
        .rows_affected());
        if let (Conn::Postgres(c), 1) = (self.conn.conn(), added) {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CLAIMS_CHANNEL)
                .bind(format!("{REVOKED} {hub} {}", hex::encode(sha256)))
                .execute(c)
                .await?;
        }
        Ok(added == 1)
    }

    /// Replaces a device's token (its epoch bumped); the device and its
    /// new epoch, or None when there is no such device.
    pub async fn set_device_token(
        &mut self,
        device_id: &str,
        token_sha256: &[u8; 32],
        hub: &str,
    ) -> Result<Option<(DeviceKey, u64)>, StoreError> {
        let row: Option<(i64, i64)> = with_conn!(self.conn.conn(), c => sqlx::query_as(
            "UPDATE devices SET token_sha256 = $1, epoch = epoch + 1 \
             WHERE external_id = $2 AND removed_ms IS NULL RETURNING id, epoch",
        )
        .bind(token_sha256.as_slice())
        .bind(device_id)
        .fetch_optional(c)
        .await?);
        self.announce_end(device_id, row, hub).await
    }

    /// Marks a device removed (refused until added again; its epoch
    /// bumped); the device and its new epoch, or None when there is no
    /// such device.
    pub async fn remove_device(
        &mut self,
        device_id: &str,
        now_ms: i64,
        hub: &str,
    ) -> Result<Option<(DeviceKey, u64)>, StoreError> {
        let row: Option<(i64, i64)> = with_conn!(self.conn.conn(), c => sqlx::query_as(
            "UPDATE devices SET removed_ms = $1, token_sha256 = NULL, epoch = epoch + 1 \
             WHERE external_id = $2 AND removed_ms IS NULL RETURNING id, epoch",
        )
        .bind(now_ms)
        .bind(device_id)
        .fetch_optional(c)
        .await?);
        self.announce_end(device_id, row, hub).await
    }

    /// After an operator's change to a device's credentials through hub
    /// `hub` (the device's epoch bumped): on PostgreSQL every hub's stream
    /// of it is fenced, and the other hubs are told by a claim notice from
    /// `{hub}/credentials`, so it ends at once wherever it is (hub `hub`
    /// ends its own).
    async fn announce_end(
        &mut self,
        device_id: &str,
        changed: Option<(i64, i64)>,
        hub: &str,
    ) -> Result<Option<(DeviceKey, u64)>, StoreError> {
        let Some((key, epoch)) = changed else {
            return Ok(None);
        };
        if let Conn::Postgres(c) = self.conn.conn() {
            let claim = Claim {
                epoch: epoch as u64,
                hub: format!("{hub}{CREDENTIALS_CHANGED}"),
                device_id: device_id.to_owned(),
            };
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CLAIMS_CHANNEL)
                .bind(claim.payload())
                .execute(c)
                .await?;
        }
        Ok(Some((DeviceKey(key), epoch as u64)))
    }

    /// Keeps a device's stored count true after `n` of its readings went
    /// (floored at 0). SQLite appends it to the progress log, as a row
    /// adding `-n` and moving no mark: retention runs without folding the
    /// logs first, which would update pages in place before its deletes
    /// free any (at the database's size limit, the fold could fail for
    /// want of a page, and with it the retention that makes room).
    pub(super) async fn subtract_readings(
        &mut self,
        device: i64,
        n: i64,
    ) -> Result<(), StoreError> {
        if !self.shared() {
            // No mark (0) and no time (0): max() keeps the others'.
            return self
                .log_progress(&[DeviceKey(device)], 0, |&d| (d, 0, -n))
                .await;
        }
        with_conn!(self.conn.conn(), c => sqlx::query(
            "UPDATE devices SET reading_count = \
             CASE WHEN reading_count > $1 THEN reading_count - $1 ELSE 0 END WHERE id = $2",
        )
        .bind(n)
        .bind(device)
        .execute(c)
        .await?
        .rows_affected());
        Ok(())
    }

    /// Deletes up to `limit` staged readings stamped before `cutoff_ms`
    /// (rare: the staging table holds what just arrived), keeping device
    /// counts true. Returns how many went.
    pub async fn delete_old_staged(
        &mut self,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let mut rows: Vec<RowToInsert> = Vec::new();
        for part in 0..STAGING_PARTS {
            let left = limit.saturating_sub(rows.len() as u32);
            if left == 0 {
                break;
            }
            let table = staging_table(part);
            // The staging tables have no key: a row is its SQLite rowid or
            // its PostgreSQL ctid.
            let row = match self.conn.backend() {
                Backend::Sqlite => "rowid",
                Backend::Postgres => "ctid",
            };
            let sql = format!(
                "DELETE FROM {table} WHERE {row} IN \
                 (SELECT {row} FROM {table} WHERE ts_ms < $1 LIMIT $2) \
                 RETURNING device_id, sensor_id, ts_ms, seq, value"
            );
            let deleted: Vec<StagedRow> = with_conn!(self.conn.conn(), c => {
                sqlx::query_as(&sql)
                    .bind(cutoff_ms)
                    .bind(i64::from(left))
                    .fetch_all(c)
                    .await?
            });
            rows.extend(deleted.into_iter().map(RowToInsert::from));
        }
        // They leave staging without a block: rollups count them here.
        let everies = self.rollup_everies().await?;
        let rollups = super::rollups::rows_of(&mut rows, &everies);
        self.add_to_rollups(&rollups).await?;
        let mut per_device: FxHashMap<i64, i64> = FxHashMap::default();
        for r in &rows {
            *per_device.entry(r.device.0).or_default() += 1;
        }
        // In key order, as the group locked its devices (PostgreSQL): a
        // deadlock with another hub stays possible for devices outside the
        // group's batches, and is retried as a conflict, but the updates
        // no longer come in an order of their own.
        let mut per_device: Vec<(i64, i64)> = per_device.into_iter().collect();
        per_device.sort_unstable();
        for (device, n) in per_device {
            self.subtract_readings(device, n).await?;
        }
        Ok(rows.len() as u64)
    }

    /// The device's mark as `devices` holds it: on SQLite exact only with
    /// no rows of the device in the progress log (see [`Registration`]).
    pub async fn device_acked_seq(&mut self, device: DeviceKey) -> Result<u64, StoreError> {
        let acked: i64 = with_conn!(self.conn.conn(), c => {
            sqlx::query_scalar("SELECT acked_seq FROM devices WHERE id = $1")
                .bind(device.0)
                .fetch_one(c)
                .await?
        });
        Ok(acked as u64)
    }

    /// The sensor dictionary.
    pub async fn load_sensors(&mut self) -> Result<Vec<(String, SensorKey)>, StoreError> {
        let rows: Vec<(i64, String)> = with_conn!(self.conn.conn(), c => {
            sqlx::query_as("SELECT id, name FROM sensors").fetch_all(c).await?
        });
        Ok(rows
            .into_iter()
            .map(|(id, name)| (name, SensorKey(id)))
            .collect())
    }

    /// The sensors each of `devices` has used, as (device, sensor) pairs,
    /// in one statement (committed rows: call it before this transaction
    /// adds any for the devices).
    pub async fn device_sensors(
        &mut self,
        devices: &[DeviceKey],
    ) -> Result<Vec<(DeviceKey, SensorKey)>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<i64> = devices.iter().map(|d| d.0).collect();
        let pairs: Vec<(i64, i64)> = match self.conn.conn() {
            Conn::Postgres(c) => {
                sqlx::query_as(
                    "SELECT device_id, sensor_id FROM device_sensors WHERE device_id = ANY($1)",
                )
                .bind(keys)
                .fetch_all(c)
                .await?
            }
            Conn::Sqlite(c) => {
                let keys = serde_json::to_string(&keys).unwrap_or_else(|_| "[]".into());
                sqlx::query_as(
                    "SELECT device_id, sensor_id FROM device_sensors \
                     WHERE device_id IN (SELECT value FROM json_each($1))",
                )
                .bind(keys)
                .fetch_all(c)
                .await?
            }
        };
        Ok(pairs
            .into_iter()
            .map(|(d, s)| (DeviceKey(d), SensorKey(s)))
            .collect())
    }

    /// Records that devices use sensors, many pairs to a statement.
    pub async fn add_device_sensors(
        &mut self,
        pairs: &[(DeviceKey, SensorKey)],
    ) -> Result<(), StoreError> {
        self.execute_batched(Batched::DeviceSensors, pairs, |(device, sensor), out| {
            out.extend([Val::I(device.0), Val::I(sensor.0)]);
        })
        .await
    }

    /// Records that these series stored a reading at `now_ms` (the hub's
    /// clock: inactivity rules of one sensor read it).
    pub async fn sensors_seen(
        &mut self,
        pairs: &[(DeviceKey, SensorKey)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if !self.shared() {
            return self
                .log_marks(Batched::SensorSeen, pairs, now_ms, |(device, sensor)| {
                    (*device, [device.0, sensor.0].into_iter())
                })
                .await;
        }
        self.execute_batched(Batched::SensorSeen, pairs, |(device, sensor), out| {
            out.extend([Val::I(device.0), Val::I(sensor.0), Val::I(now_ms)]);
        })
        .await
    }

    /// The sensor's key, adding it to the dictionary if new.
    pub async fn sensor_key(&mut self, name: &str) -> Result<SensorKey, StoreError> {
        const FIND: &str = "SELECT id FROM sensors WHERE name = $1";
        let existing: Option<i64> = with_conn!(self.conn.conn(), c => {
            sqlx::query_scalar(FIND).bind(name).fetch_optional(c).await?
        });
        if let Some(id) = existing {
            return Ok(SensorKey(id));
        }
        // Another hub on the same PostgreSQL database may add the same name
        // at the same time: the loser's insert waits for the winner's commit,
        // does nothing, and the name is read again.
        let id: i64 = with_conn!(self.conn.conn(), c => {
            let added: Option<i64> = sqlx::query_scalar(
                "INSERT INTO sensors (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id",
            )
            .bind(name)
            .fetch_optional(&mut *c)
            .await?;
            match added {
                Some(id) => id,
                None => sqlx::query_scalar(FIND).bind(name).fetch_one(c).await?,
            }
        });
        Ok(SensorKey(id))
    }

    /// PostgreSQL: takes the lock every transaction that writes blocks
    /// holds (compaction, merges, retention), first, until it ends. Block
    /// ids are then handed out and committed in the same order on every
    /// hub, which query paging by id relies on (`BlockCursor`), and two
    /// hubs' retention steps cannot deadlock on each other's rows. Nothing
    /// on SQLite, where one writer holds the whole database.
    pub async fn lock_blocks(&mut self) -> Result<(), StoreError> {
        if let Conn::Postgres(c) = self.conn.conn() {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(BLOCKS_LOCK)
                .execute(c)
                .await?;
        }
        Ok(())
    }

    /// Whether other hubs write the same database (PostgreSQL): then this
    /// writer's caches of devices' rows are not the truth.
    pub fn shared(&self) -> bool {
        self.conn.backend() == crate::config::Backend::Postgres
    }

    /// The session epochs of `devices`. On PostgreSQL their rows are
    /// locked (in key order, so two hubs' writers cannot deadlock on them)
    /// until this transaction ends: a Hello on another hub waits for the
    /// commit, then reads the mark it made.
    pub async fn lock_epochs(
        &mut self,
        devices: &[DeviceKey],
    ) -> Result<FxHashMap<DeviceKey, u64>, StoreError> {
        let mut keys: Vec<i64> = devices.iter().map(|d| d.0).collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(Default::default());
        }
        let rows: Vec<(i64, i64)> = match self.conn.conn() {
            Conn::Postgres(c) => {
                sqlx::query_as(
                    "SELECT id, epoch FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                )
                .bind(&keys)
                .fetch_all(c)
                .await?
            }
            Conn::Sqlite(c) => {
                let ids = serde_json::to_string(&keys).unwrap_or_else(|_| "[]".into());
                sqlx::query_as(
                    "SELECT id, epoch FROM devices WHERE id IN (SELECT value FROM json_each($1))",
                )
                .bind(ids)
                .fetch_all(c)
                .await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(id, epoch)| (DeviceKey(id), epoch as u64))
            .collect())
    }

    /// The keys of the devices named (those that exist).
    pub async fn device_keys(
        &mut self,
        external_ids: &[&str],
    ) -> Result<Vec<DeviceKey>, StoreError> {
        if external_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = match self.conn.conn() {
            Conn::Postgres(c) => {
                sqlx::query_scalar("SELECT id FROM devices WHERE external_id = ANY($1)")
                    .bind(external_ids)
                    .fetch_all(c)
                    .await?
            }
            Conn::Sqlite(c) => {
                let names = serde_json::to_string(external_ids).unwrap_or_else(|_| "[]".into());
                sqlx::query_scalar(
                    "SELECT id FROM devices WHERE external_id IN (SELECT value FROM json_each($1))",
                )
                .bind(names)
                .fetch_all(c)
                .await?
            }
        };
        Ok(ids.into_iter().map(DeviceKey).collect())
    }

    /// Stages rows already split by [`staging_part`] (`parts[p]` goes to
    /// part p).
    /// On PostgreSQL a part's rows go in one binary `COPY` once there are
    /// [`COPY_MIN_ROWS`] of them (`store::pg_copy`).
    pub async fn insert_readings(&mut self, parts: &[Vec<RowToInsert>]) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        for (part, rows) in parts.iter().enumerate() {
            if self.conn.backend() == Backend::Postgres && rows.len() >= COPY_MIN_ROWS {
                super::pg_copy::encode(rows, &mut buf);
                let sql = format!(
                    "COPY {} ({}) FROM STDIN (FORMAT binary)",
                    staging_table(part),
                    super::pg_copy::COLUMNS
                );
                match super::pg_copy::copy_in(self.conn.conn(), &sql, &buf).await {
                    Ok(n) if n == rows.len() as u64 => continue,
                    Ok(n) => {
                        self.conn.poison();
                        return Err(StoreError::Sqlx(sqlx::Error::Protocol(format!(
                            "a COPY of {} staged rows stored {n}",
                            rows.len()
                        ))));
                    }
                    Err(e) => {
                        self.conn.poison();
                        return Err(e);
                    }
                }
            }
            self.execute_batched(Batched::Insert(part), rows, |r, out| {
                out.extend([
                    Val::I(r.device.0),
                    Val::I(r.sensor.0),
                    Val::I(r.ts_ms),
                    Val::I(r.seq),
                    Val::F(r.value),
                ]);
            })
            .await?;
        }
        Ok(())
    }

    /// Moves devices' high-water marks and stored counts, many devices to a
    /// statement.
    pub async fn record_progress(
        &mut self,
        progress: &[DeviceProgress],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if !self.shared() {
            return self
                .log_progress(progress, now_ms, |p| {
                    (p.device, p.acked_seq as i64, p.added as i64)
                })
                .await;
        }
        self.execute_batched(Batched::Progress, progress, |p, out| {
            out.extend([
                Val::I(p.device.0),
                Val::I(p.acked_seq as i64),
                Val::I(p.added as i64),
                Val::I(now_ms),
            ]);
        })
        .await
    }

    /// SQLite: appends the progress log's marks of `items`, `row` giving
    /// each one's (device, mark, readings added), stamped `seen_ms`.
    async fn log_progress<T>(
        &mut self,
        items: &[T],
        seen_ms: i64,
        row: impl Fn(&T) -> (DeviceKey, i64, i64),
    ) -> Result<(), StoreError> {
        self.log_marks(Batched::Progress, items, seen_ms, |item| {
            let (device, acked_seq, added) = row(item);
            (device, [device.0, acked_seq, added].into_iter())
        })
        .await
    }

    /// SQLite: appends to `kind`'s log a row for each slice `items` touch
    /// (see [`log_slice`]), its marks the JSON array of the items' arrays
    /// of numbers, `mark` giving an item's device and numbers, stamped
    /// `seen_ms`.
    async fn log_marks<T, N: Iterator<Item = i64>>(
        &mut self,
        kind: Batched,
        items: &[T],
        seen_ms: i64,
        mark: impl Fn(&T) -> (DeviceKey, N),
    ) -> Result<(), StoreError> {
        use std::fmt::Write as _;
        let mut marks: [String; LOG_SLICES as usize] = Default::default();
        for item in items {
            let (device, numbers) = mark(item);
            let slice = usize::from(log_slice(device));
            let text = &mut marks[slice];
            text.push_str(if text.is_empty() { "[[" } else { ",[" });
            for (i, number) in numbers.enumerate() {
                if i > 0 {
                    text.push(',');
                }
                // Writing to a String cannot fail.
                let _ = write!(text, "{number}");
            }
            text.push(']');
            self.logged[slice] += 1;
        }
        let mut rows = Vec::new();
        for (slice, mut text) in (0..).zip(marks) {
            if !text.is_empty() {
                text.push(']');
                *self.log_n += 1;
                rows.push((slice, *self.log_n, text));
            }
        }
        self.execute_batched(kind, &rows, |(slice, n, text), out| {
            out.extend([Val::I(*slice), Val::I(*n), Val::I(seen_ms), Val::T(text)]);
        })
        .await
    }

    /// SQLite: folds the progress logs into `devices` and `device_sensors`
    /// and empties them; the log rows folded. A no-op on PostgreSQL, which
    /// updates the tables in place.
    pub async fn fold_progress(&mut self) -> Result<u64, StoreError> {
        self.fold_where(LogPick::All).await
    }

    /// SQLite: folds one slice of the progress logs in (see [`log_slice`]):
    /// a pass over the pages of that slice's devices, however many commits
    /// the slice holds.
    pub async fn fold_slice(&mut self, slice: u8) -> Result<u64, StoreError> {
        self.fold_where(LogPick::Slice(slice)).await
    }

    /// The fold of the log rows `pick` picks: read and summed here, one
    /// update per device (series), then deleted; the log rows folded. (In
    /// SQL, `json_each` and a sort over every mark took SQLite's thread as
    /// long as the rows' inserts had.) Rows that are not the marks the
    /// writer writes are folded in SQL, as the views read them.
    async fn fold_where(&mut self, pick: LogPick<'_>) -> Result<u64, StoreError> {
        if self.shared() {
            return Ok(0);
        }
        let rows = pick.rows();
        let Some(c) = self.conn.conn().sqlite() else {
            return Ok(0);
        };
        let read = |log| format!("SELECT marks, seen_ms FROM {log} WHERE {rows}");
        let logged: Vec<(String, i64)> = sqlx::query_as(&read("progress_log"))
            .fetch_all(&mut *c)
            .await?;
        let seen: Vec<(String, i64)> = sqlx::query_as(&read("sensor_seen_log"))
            .fetch_all(&mut *c)
            .await?;
        let folded = (logged.len() + seen.len()) as u64;
        let parsed = logged
            .iter()
            .map(|(text, seen_ms)| Some((parse_marks::<3>(text)?, *seen_ms)))
            .collect::<Option<Vec<_>>>()
            .zip(
                seen.iter()
                    .map(|(text, seen_ms)| Some((parse_marks::<2>(text)?, *seen_ms)))
                    .collect::<Option<Vec<_>>>(),
            );
        let Some((logged, seen)) = parsed else {
            tracing::warn!("a progress log row is not as the writer writes it: folded in SQL");
            // Text that is not JSON at all no reader can take either (the
            // views fail on it): dropped, rather than failing every fold
            // and with it every group that must fold first.
            for log in ["progress_log", "sensor_seen_log"] {
                let dropped = sqlx::query(&format!(
                    "DELETE FROM {log} WHERE {rows} AND NOT json_valid(marks)"
                ))
                .execute(&mut *c)
                .await?
                .rows_affected();
                if dropped > 0 {
                    tracing::error!(log, dropped, "progress log rows that are not JSON dropped");
                }
            }
            for sql in fold_sql(pick) {
                sqlx::query(&sql).execute(&mut *c).await?;
            }
            return Ok(folded);
        };
        // Per device: the mark, readings added, last seen, last reading.
        let mut devices: FxHashMap<i64, [i64; 4]> = FxHashMap::default();
        for (marks, seen_ms) in logged {
            for [device, acked_seq, added] in marks {
                let d = devices.entry(device).or_insert([0; 4]);
                d[0] = d[0].max(acked_seq);
                d[1] = d[1].saturating_add(added);
                d[2] = d[2].max(seen_ms);
                if added > 0 {
                    d[3] = d[3].max(seen_ms);
                }
            }
        }
        let mut series: FxHashMap<(i64, i64), i64> = FxHashMap::default();
        for (marks, seen_ms) in seen {
            for [device, sensor] in marks {
                let s = series.entry((device, sensor)).or_insert(seen_ms);
                *s = (*s).max(seen_ms);
            }
        }
        // In key order: the pages of `devices` one after another.
        let mut devices: Vec<_> = devices.into_iter().collect();
        devices.sort_unstable_by_key(|&(device, _)| device);
        self.execute_batched(Batched::FoldProgress, &devices, |(device, d), out| {
            out.extend([device, &d[0], &d[1], &d[2], &d[3]].map(|&v| Val::I(v)));
        })
        .await?;
        let mut series: Vec<_> = series.into_iter().collect();
        series.sort_unstable_by_key(|&(key, _)| key);
        self.execute_batched(Batched::FoldSensorSeen, &series, |((d, s), seen), out| {
            out.extend([Val::I(*d), Val::I(*s), Val::I(*seen)]);
        })
        .await?;
        let Some(c) = self.conn.conn().sqlite() else {
            return Ok(0);
        };
        for log in ["progress_log", "sensor_seen_log"] {
            sqlx::query(&format!("DELETE FROM {log} WHERE {rows}"))
                .execute(&mut *c)
                .await?;
        }
        Ok(folded)
    }

    /// SQLite: the progress log marks this transaction appended, by slice.
    pub fn logged(&self) -> [u64; LOG_SLICES as usize] {
        self.logged
    }

    /// The text of `kind`'s statement for `n` items (made once).
    pub(super) fn statement(&mut self, kind: Batched, n: usize) -> String {
        let backend = self.conn.backend();
        self.sql
            .entry((kind, n))
            .or_insert_with(|| kind.sql(n, backend))
            .clone()
    }

    /// Runs `kind`'s statement over `items`: `kind.max()` of them at a time,
    /// the rest in powers of two; `values` gives one item's values.
    pub(super) async fn execute_batched<T>(
        &mut self,
        kind: Batched,
        items: &[T],
        values: impl for<'t> Fn(&'t T, &mut Vec<Val<'t>>),
    ) -> Result<(), StoreError> {
        let backend = self.conn.backend();
        let mut rest = items;
        let mut vals = Vec::new();
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(chunk_len(rest.len(), kind.max()));
            let sql = self
                .sql
                .entry((kind, chunk.len()))
                .or_insert_with(|| kind.sql(chunk.len(), backend));
            vals.clear();
            for item in chunk {
                values(item, &mut vals);
            }
            with_conn!(self.conn.conn(), c => {
                bind_vals(sqlx::query(sql.as_str()), &vals).execute(c).await?.rows_affected()
            });
            rest = tail;
        }
        Ok(())
    }
}

/// `head` + `n` tuples of `arity` parameters, comma-separated, + `tail`;
/// `?` each, or `$1`, `$2`… when `numbered`.
pub(super) fn multi_row_sql(
    head: &str,
    arity: usize,
    n: usize,
    tail: &str,
    numbered: bool,
) -> String {
    use std::fmt::Write;
    let mut sql = String::with_capacity(head.len() + n * arity * 7 + tail.len());
    sql.push_str(head);
    for i in 0..n {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for j in 0..arity {
            if j > 0 {
                sql.push(',');
            }
            if numbered {
                let _ = write!(sql, "${}", i * arity + j + 1);
            } else {
                sql.push('?');
            }
        }
        sql.push(')');
    }
    sql.push_str(tail);
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DeviceId;

    /// A new SQLite store in a temp dir (kept while the dir lives).
    async fn open_temp() -> (tempfile::TempDir, crate::store::Store, StoreWriter) {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::config::Settings::defaults().unwrap().storage;
        settings.path = dir.path().join("hub.db");
        let (store, writer) = crate::store::open(&settings).await.unwrap();
        (dir, store, writer)
    }

    /// A Hello checked before an operator's change must not register after
    /// it: the writer checks the proof again in the same statement.
    #[tokio::test]
    async fn a_registration_rechecks_the_credentials_it_was_admitted_with() {
        let (_dir, _, mut writer) = open_temp().await;
        let hello = DeviceHello::new(
            DeviceId::parse("d").unwrap(),
            String::new(),
            Default::default(),
            "",
        )
        .unwrap();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut tx = writer.begin().await.unwrap();
        tx.enroll_device(&hello, &a, 0, "h").await.unwrap();
        let own = |h| Proof::OwnToken(h);
        assert!(
            tx.upsert_device(&hello, 1, &own(a), "h")
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            tx.upsert_device(&hello, 1, &Proof::FleetToken, "h")
                .await
                .unwrap()
                .is_none()
        );
        assert!(tx.set_device_token("d", &b, "h").await.unwrap().is_some());
        assert!(
            tx.upsert_device(&hello, 1, &own(a), "h")
                .await
                .unwrap()
                .is_none(),
            "rotated"
        );
        assert!(
            tx.upsert_device(&hello, 1, &own(b), "h")
                .await
                .unwrap()
                .is_some()
        );
        assert!(tx.remove_device("d", 2, "h").await.unwrap().is_some());
        assert!(
            tx.upsert_device(&hello, 3, &Proof::Admitted, "h")
                .await
                .unwrap()
                .is_none(),
            "removed"
        );
        tx.commit().await.unwrap();
    }

    /// SQLite logs progress marks: the views (and what reads through them,
    /// the one-device reads of a slice too) see them at once; a fold moves
    /// them into the tables exactly, one slice or all, keeping a later
    /// Hello's `last_seen_ms` and a rejected-only batch's mark.
    #[tokio::test]
    async fn logged_progress_reads_exact_and_folds_into_the_tables() {
        let (_dir, store, mut writer) = open_temp().await;
        let hello = DeviceHello::new(
            DeviceId::parse("d1").unwrap(),
            "fw".into(),
            Default::default(),
            "",
        )
        .unwrap();
        let mut tx = writer.begin().await.unwrap();
        let d1 = tx
            .upsert_device(&hello, 1, &Proof::Admitted, "h")
            .await
            .unwrap()
            .unwrap()
            .device;
        // A device of another slice.
        let d2 = DeviceKey(4097);
        sqlx::query(
            "INSERT INTO devices (id, external_id, first_seen_ms, last_seen_ms) \
             VALUES (4097, 'd2', 1, 1)",
        )
        .execute(tx.conn.conn().sqlite().unwrap())
        .await
        .unwrap();
        assert_ne!(log_slice(d1), log_slice(d2));
        let sensor = tx.sensor_key("t").await.unwrap();
        tx.add_device_sensors(&[(d1, sensor), (d2, sensor)])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let progress = |device, acked_seq, added| DeviceProgress {
            device,
            acked_seq,
            added,
        };
        // d1: 5 readings, 3 more, then a batch of rejects only; d2: 7.
        for (p, now) in [
            (progress(d1, 5, 5), 10),
            (progress(d1, 9, 3), 20),
            (progress(d2, 7, 7), 25),
            (progress(d1, 12, 0), 30),
        ] {
            let mut tx = writer.begin().await.unwrap();
            tx.record_progress(&[p], now).await.unwrap();
            if p.added > 0 {
                tx.sensors_seen(&[(p.device, sensor)], now).await.unwrap();
            }
            tx.commit().await.unwrap();
        }
        let table = |store: &crate::store::Store, id: &'static str| {
            let store = store.clone();
            async move {
                let crate::store::db::Pool::Sqlite(pool) = &store.read else {
                    unreachable!("a SQLite store")
                };
                let marks: (i64, i64, i64, Option<i64>, Option<i64>) = sqlx::query_as(
                    "SELECT acked_seq, reading_count, last_seen_ms, last_reading_ms, \
                     (SELECT last_reading_ms FROM device_sensors WHERE device_id = d.id) \
                     FROM devices d WHERE external_id = $1",
                )
                .bind(id)
                .fetch_one(pool)
                .await
                .unwrap();
                marks
            }
        };
        let exact = |d: Option<crate::domain::DeviceRecord>| {
            let d = d.unwrap();
            (d.acked_seq, d.readings, d.last_seen_ms)
        };
        let read_last = async |writer: &mut StoreWriter, device, sensor| {
            let mut tx = writer.begin().await.unwrap();
            tx.last_reading_ms(device, sensor).await.unwrap()
        };
        assert_eq!(table(&store, "d1").await, (0, 0, 1, None, None), "logged");
        assert_eq!(exact(store.find_device("d1").await.unwrap()), (12, 8, 30));
        assert_eq!(exact(store.find_device("d2").await.unwrap()), (7, 7, 25));
        let listed: Vec<_> = store
            .list_devices("", 10, &Default::default())
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.acked_seq, d.readings, d.last_seen_ms))
            .collect();
        assert_eq!(listed, [(12, 8, 30), (7, 7, 25)]);
        assert_eq!(store.total_readings().await.unwrap(), 15);
        // The last reading, not the rejects' commit at 30.
        assert_eq!(read_last(&mut writer, d1, "").await, Some(20));
        assert_eq!(read_last(&mut writer, d1, "t").await, Some(20));
        assert_eq!(read_last(&mut writer, d2, "t").await, Some(25));
        // A Hello after the commits moves last_seen_ms in place.
        let mut tx = writer.begin().await.unwrap();
        tx.upsert_device(&hello, 40, &Proof::Admitted, "h")
            .await
            .unwrap()
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(exact(store.find_device("d1").await.unwrap()), (12, 8, 40));

        // d2's slice alone.
        assert_eq!(writer.fold_progress(Some(log_slice(d2))).await.unwrap(), 2);
        assert_eq!(table(&store, "d2").await, (7, 7, 25, Some(25), Some(25)));
        assert_eq!(table(&store, "d1").await, (0, 0, 40, None, None));
        assert_eq!(writer.fold_progress(None).await.unwrap(), 5);
        assert_eq!(
            table(&store, "d1").await,
            (12, 8, 40, Some(20), Some(20)),
            "folded: the last reading at 20, not the rejects' 30; the Hello's 40 kept"
        );
        assert_eq!(exact(store.find_device("d1").await.unwrap()), (12, 8, 40));
        assert_eq!(read_last(&mut writer, d1, "t").await, Some(20));
        assert_eq!(store.total_readings().await.unwrap(), 15);
        assert_eq!(writer.fold_progress(None).await.unwrap(), 0, "nothing left");

        // SQL's slice of a key is `log_slice`'s.
        let tx = writer.begin().await.unwrap();
        for id in [1, 4095, 4096, 4097, 8 * 4096 + 5, 9 * 4096, i64::MAX] {
            let sql = format!("SELECT {}", crate::store::slice_sql(&id.to_string()));
            let slice: i64 = sqlx::query_scalar(&sql)
                .fetch_one(tx.conn.conn().sqlite().unwrap())
                .await
                .unwrap();
            assert_eq!(slice, i64::from(log_slice(DeviceKey(id))), "{id}");
        }
    }

    /// The fold reads marks as `log_marks` and SQLite's `json_array` write
    /// them, and refuses a row that is not whole marks.
    #[test]
    fn log_rows_parse_into_whole_marks() {
        assert_eq!(
            parse_marks::<3>("[[1,2,3],[12,-5,0],[9223372036854775807,0,-1]]"),
            Some(vec![[1, 2, 3], [12, -5, 0], [i64::MAX, 0, -1]])
        );
        assert_eq!(
            parse_marks::<2>(" [ [4097, 3] ,[5,6]] "),
            Some(vec![[4097, 3], [5, 6]])
        );
        assert_eq!(parse_marks::<2>("[]"), Some(vec![]));
        for bad in [
            "[[1,2]]",
            "[[1,2,3,4]]",
            "[[1,2,3],[4,5]]",
            "[[1,2,3]",
            "[[1,2,3],]",
            "[[1,2,3]] x",
            "[[1,2,3]][]",
            "[[1,2-3,4]]",
            "[[1.5,2,3]]",
            "[[1e3,2,3]]",
            "[[--1,2,3]]",
            "[[null,2,3]]",
            "[[1,99999999999999999999,3]]",
            "[[01,2,3]]",
            "[[1,-02,3]]",
            "[[1,2,3é]]",
            "[[1,2,é]]",
            "[1,2,3]",
            "",
        ] {
            assert_eq!(parse_marks::<3>(bad), None, "{bad:?}");
        }
    }

    /// A commit's marks of one slice share a log row: the devices and
    /// series in it read apart (ids whose digits begin one another's, a
    /// count retention lowered), the same before the fold and after it.
    #[tokio::test]
    async fn marks_sharing_a_log_row_read_apart() {
        let (_dir, store, mut writer) = open_temp().await;
        let ids = [1, 12, 121, 4097];
        let mut tx = writer.begin().await.unwrap();
        for id in ids {
            sqlx::query(
                "INSERT INTO devices (id, external_id, first_seen_ms, last_seen_ms) \
                 VALUES ($1, 'd' || $1, 1, 1)",
            )
            .bind(id)
            .execute(tx.conn.conn().sqlite().unwrap())
            .await
            .unwrap();
        }
        let (t, h) = (
            tx.sensor_key("t").await.unwrap(),
            tx.sensor_key("h").await.unwrap(),
        );
        let pairs: Vec<_> = ids
            .iter()
            .flat_map(|&id| [(DeviceKey(id), t), (DeviceKey(id), h)])
            .collect();
        tx.add_device_sensors(&pairs).await.unwrap();
        tx.commit().await.unwrap();

        // 121 before 12 and 1: a prefix of its text is not theirs.
        let progress: Vec<_> = [(121, 30, 3), (12, 20, 2), (1, 10, 1), (4097, 40, 4)]
            .map(|(id, acked_seq, added)| DeviceProgress {
                device: DeviceKey(id),
                acked_seq,
                added,
            })
            .into();
        let mut tx = writer.begin().await.unwrap();
        tx.record_progress(&progress, 100).await.unwrap();
        // 12's t and 121's h only, earlier than the commit's marks.
        tx.sensors_seen(&[(DeviceKey(12), t), (DeviceKey(121), h)], 90)
            .await
            .unwrap();
        tx.subtract_readings(12, 1).await.unwrap();
        let mut logged = [0; LOG_SLICES as usize];
        (logged[0], logged[1]) = (3 + 2 + 1, 1);
        assert_eq!(tx.logged(), logged, "marks: progress, series, retention's");
        tx.commit().await.unwrap();
        let log_rows = |table: &'static str| {
            let store = store.clone();
            async move {
                let crate::store::db::Pool::Sqlite(pool) = &store.read else {
                    unreachable!("a SQLite store")
                };
                let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
                    .fetch_one(pool)
                    .await
                    .unwrap();
                n
            }
        };
        assert_eq!(
            log_rows("progress_log").await,
            3,
            "slice 0, slice 1, retention's"
        );
        assert_eq!(log_rows("sensor_seen_log").await, 1);

        let expect = [(1, 10, 1), (12, 20, 1), (121, 30, 3), (4097, 40, 4)];
        let read = async |store: &crate::store::Store, writer: &mut StoreWriter| {
            let mut got = Vec::new();
            for (id, _, _) in expect {
                let d = store.find_device(&format!("d{id}")).await.unwrap().unwrap();
                let mut tx = writer.begin().await.unwrap();
                let last = [
                    tx.last_reading_ms(DeviceKey(id), "t").await.unwrap(),
                    tx.last_reading_ms(DeviceKey(id), "h").await.unwrap(),
                ];
                got.push(((id, d.acked_seq as i64, d.readings as i64), last));
            }
            got
        };
        // A series without a time of its own has the device's.
        let seen = |id| match id {
            12 => [Some(90), Some(100)],
            121 => [Some(100), Some(90)],
            _ => [Some(100), Some(100)],
        };
        let want: Vec<_> = expect.iter().map(|&e| (e, seen(e.0))).collect();
        assert_eq!(read(&store, &mut writer).await, want, "logged");
        let listed: Vec<_> = store
            .list_devices("", 10, &Default::default())
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.acked_seq, d.readings))
            .collect();
        assert_eq!(listed, expect.map(|(_, a, n)| (a as u64, n as u64)));
        assert_eq!(store.total_readings().await.unwrap(), 9);

        assert_eq!(writer.fold_progress(None).await.unwrap(), 4, "3 + 1 rows");
        assert_eq!(read(&store, &mut writer).await, want, "folded");
        assert_eq!(store.total_readings().await.unwrap(), 9);

        // Marks without a reading (rejects only, retention) keep the times
        // of the last reading, logged and folded.
        let mut tx = writer.begin().await.unwrap();
        let rejects = |device, acked_seq| DeviceProgress {
            device: DeviceKey(device),
            acked_seq,
            added: 0,
        };
        tx.record_progress(&[rejects(1, 11), rejects(4097, 41)], 200)
            .await
            .unwrap();
        tx.subtract_readings(121, 1).await.unwrap();
        tx.commit().await.unwrap();
        let expect = [(1, 11, 1), (12, 20, 1), (121, 30, 2), (4097, 41, 4)];
        let want: Vec<_> = expect.iter().map(|&e| (e, seen(e.0))).collect();
        assert_eq!(read(&store, &mut writer).await, want, "logged");
        assert_eq!(writer.fold_progress(None).await.unwrap(), 3);
        assert_eq!(read(&store, &mut writer).await, want, "folded");

        // Rows the writer would not write. Spaces are read as JSON reads
        // them, in the writer's fold.
        let insert = async |writer: &mut StoreWriter, rows: &str| {
            let tx = writer.begin().await.unwrap();
            sqlx::query(&format!(
                "INSERT INTO progress_log (slice, n, seen_ms, marks) VALUES {rows}"
            ))
            .execute(tx.conn.conn().sqlite().unwrap())
            .await
            .unwrap();
            tx.commit().await.unwrap();
        };
        insert(&mut writer, "(0, 1000, 310, '[ [12,60,1] ]')").await;
        let mut want = want;
        want[1] = ((12, 60, 2), [Some(90), Some(310)]);
        assert_eq!(read(&store, &mut writer).await, want, "logged");
        assert_eq!(writer.fold_progress(None).await.unwrap(), 1);
        assert_eq!(read(&store, &mut writer).await, want, "folded");
        // A fourth number: folded in SQL, as the views read it (the fourth
        // ignored). Text that is not JSON (no reader can take it) is
        // dropped by that fold, not left to fail every later one.
        insert(&mut writer, "(0, 1001, 300, '[[1, 50, 2, 0]]')").await;
        want[0] = ((1, 50, 3), [Some(300), Some(300)]);
        assert_eq!(read(&store, &mut writer).await, want, "logged");
        insert(&mut writer, "(0, 1002, 320, '[[121,99,1')").await;
        assert_eq!(writer.fold_progress(None).await.unwrap(), 2);
        assert_eq!(read(&store, &mut writer).await, want, "folded in SQL");
        assert_eq!(log_rows("progress_log").await, 0);
    }

    /// Hellos registered in bulk come to what each would one by one:
    /// the same credential checks, keys, marks and epochs, and new devices
    /// inserted. And the admission reads (many to a statement) say what
    /// one read says.
    #[tokio::test]
    async fn hellos_in_bulk_register_as_one_by_one() {
        let (_dir, store, mut writer) = open_temp().await;
        let hello = |id: &str| {
            DeviceHello::new(
                DeviceId::parse(id).unwrap(),
                "fw".into(),
                Default::default(),
                "",
            )
            .unwrap()
        };
        let (a, b, c, x, r) = ([1u8; 32], [2u8; 32], [3u8; 32], [4u8; 32], [5u8; 32]);
        let mut tx = writer.begin().await.unwrap();
        for id in ["d1", "d2", "d3", "d5"] {
            tx.enroll_device(&hello(id), &a, 0, "h").await.unwrap();
        }
        for id in ["d4", "d6", "d7", "d8"] {
            tx.upsert_device(&hello(id), 0, &Proof::FleetToken, "h")
                .await
                .unwrap();
        }
        tx.record_progress(
            &[DeviceProgress {
                device: DeviceKey(1),
                acked_seq: 41,
                added: 1,
            }],
            0,
        )
        .await
        .unwrap();
        tx.remove_device("d5", 0, "h").await.unwrap();
        tx.pin_certificate("d6", Some(&c), "h").await.unwrap();
        tx.pin_certificate("d7", Some(&c), "h").await.unwrap();
        tx.revoke_certificate(&r, 0, "h").await.unwrap();
        tx.commit().await.unwrap();
        // Registrations read the table's mark: the ingest writer folds the
        // progress log in before it no longer holds a device's mark.
        writer.fold_progress(None).await.unwrap();
        let cases = [
            ("d1", Proof::OwnToken(a)),
            ("d2", Proof::OwnToken(b)),
            ("d3", Proof::FleetToken),
            ("d4", Proof::FleetToken),
            ("d5", Proof::Admitted),
            ("d6", Proof::Certificate(c)),
            ("d7", Proof::Certificate(x)),
            ("d8", Proof::Certificate(r)),
            ("n1", Proof::FleetToken),
            ("n2", Proof::Admitted),
        ];
        let hellos: Vec<DeviceHello> = cases.iter().map(|(id, _)| hello(id)).collect();
        let pairs: Vec<(&DeviceHello, &Proof)> =
            hellos.iter().zip(cases.iter().map(|(_, p)| p)).collect();
        let key = |r: Option<Registration>| r.map(|r| (r.device.0, r.acked_seq, r.epoch));
        let bulk: Vec<_> = {
            let mut tx = writer.begin().await.unwrap();
            let done = tx.register_streams(&pairs, 5, "h").await.unwrap();
            // Rolled back: the same Hellos go again one by one.
            done.into_iter().map(key).collect()
        };
        let mut tx = writer.begin().await.unwrap();
        let mut one_by_one = Vec::new();
        for (hello, proof) in &pairs {
            let r = tx
                .upsert_device_as(hello, 5, proof, "h", Arrival::Stream)
                .await
                .unwrap();
            one_by_one.push(key(r));
        }
        tx.commit().await.unwrap();
        assert_eq!(bulk, one_by_one);
        let settled: Vec<bool> = bulk.iter().map(Option::is_some).collect();
        assert_eq!(
            settled,
            [
                true, false, false, true, false, true, false, false, true, true
            ]
        );
        assert_eq!(
            bulk[0].map(|(_, mark, _)| mark),
            Some(41),
            "the stored mark"
        );

        let lookups: Vec<super::super::credentials::Lookup> = [
            ("d1", None),
            ("d5", None),
            ("d6", Some(c)),
            ("d8", Some(r)),
            ("d1", Some(r)),
            ("nobody", None),
        ]
        .into_iter()
        .map(|(id, cert)| (id.to_owned(), cert))
        .collect();
        let many = store.credentials_of(&lookups).await.unwrap();
        assert_eq!(many.len(), lookups.len());
        assert_eq!(many[0].token_sha256, Some(a));
        assert!(many[1].removed);
        assert_eq!(many[2].cert_sha256, Some(c));
        assert!(many[3].cert_revoked && many[4].cert_revoked && !many[2].cert_revoked);
        assert_eq!(many[4].token_sha256, Some(a));
        assert!(many[5].token_sha256.is_none() && !many[5].removed);
    }

    #[test]
    fn chunks_are_the_max_or_powers_of_two() {
        let sizes = |mut n: usize| {
            let mut out = Vec::new();
            while n > 0 {
                let c = chunk_len(n, 1024);
                out.push(c);
                n -= c;
            }
            out
        };
        assert_eq!(sizes(1), vec![1]);
        assert_eq!(sizes(7), vec![4, 2, 1]);
        assert_eq!(sizes(2500), vec![1024, 1024, 256, 128, 64, 4]);
    }

    #[test]
    fn multi_row_statement_text() {
        assert_eq!(
            multi_row_sql("V ", 2, 3, ";", false),
            "V (?,?),(?,?),(?,?);"
        );
        assert_eq!(multi_row_sql("V ", 2, 2, "", true), "V ($1,$2),($3,$4)");
    }
}
