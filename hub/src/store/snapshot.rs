//! One sensor's readings of many devices, read in one snapshot: the
//! staged readings, the blocks and a rollup's chunks, each handed over as
//! it streams in (the Prometheus API's reads, [`crate::query`]'s
//! `sensor_readings` and `sensor_buckets`).

use super::codec::Point;
use super::db::with_pool;
use super::rollups;
use super::write::{STAGING_PARTS, staging_table};
use super::{Store, StoreError};
use crate::config::Backend;
use crate::domain::{DeviceKey, SensorKey};

/// Parameters `$first+1..=$first+n` (the devices of a statement).
pub(super) fn params(first: usize, n: usize) -> String {
    (0..n)
        .map(|i| format!("${}", first + 1 + i))
        .collect::<Vec<_>>()
        .join(",")
}

/// A statement's devices, the last repeated up to a power of two: a few
/// statement texts in all (each is prepared and cached per connection),
/// not one per count of devices.
fn padded(group: &[i64]) -> Vec<i64> {
    let mut out = group.to_vec();
    if let Some(&last) = group.last() {
        out.resize(group.len().next_power_of_two(), last);
    }
    out
}

/// The staged readings of one part, of the devices `$5..`, folded into
/// buckets of width `$4` in SQL: one row per device and bucket (sqlx hands
/// SQLite rows over one at a time, a few µs each). First and last go by
/// (ts, seq), as in [`rollups::Agg`]. Staged readings are never before
/// 2000, so integer division is the bucket's floor.
fn staged_buckets_sql(part: usize, devices: usize) -> String {
    let list = params(4, devices);
    format!(
        "SELECT device_id, b, count(*) AS n, sum(value) AS total, min(value) AS lo, \
         max(value) AS hi, min(ts_ms) AS first_ts, max(first_seq) AS first_seq, \
         max(first_value) AS first_value, max(ts_ms) AS last_ts, max(last_seq) AS last_seq, \
         max(last_value) AS last_value FROM (SELECT device_id, ts_ms / $4 AS b, ts_ms, value, \
           first_value(seq) OVER w AS first_seq, first_value(value) OVER w AS first_value, \
           last_value(seq) OVER w AS last_seq, last_value(value) OVER w AS last_value \
           FROM {} WHERE sensor_id = $1 AND ts_ms >= $2 AND ts_ms < $3 AND device_id IN ({list}) \
           WINDOW w AS (PARTITION BY device_id, ts_ms / $4 ORDER BY ts_ms, seq \
             ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) AS s \
         GROUP BY device_id, b ORDER BY device_id, b",
        staging_table(part)
    )
}

/// The blocks of the devices `$6..` (all of index part `part`,
/// [`super::blocks::index_part`]) and sensor
/// `$1` that overlap [$2, $3), but those wholly inside [$4, $5): each
/// device's by first_ts. The blocks index leads with the part (see
/// [`super::blocks::MERGE_SELECT`]), so the statement names it.
pub(super) fn blocks_sql(part: i64, devices: usize) -> String {
    format!(
        "SELECT device_id, first_ts, last_ts, data FROM blocks WHERE device_id % 8 = {part} \
         AND device_id IN ({}) AND sensor_id = $1 AND first_ts < $3 AND last_ts >= $2 \
         AND NOT (first_ts >= $4 AND last_ts < $5) ORDER BY device_id, first_ts",
        params(5, devices)
    )
}

row_struct! {
    /// A row of [`staged_buckets_sql`].
    struct StagedBucketRow {
        device_id: i64,
        b: i64,
        n: i64,
        total: f64,
        lo: f64,
        hi: f64,
        first_ts: i64,
        first_seq: i64,
        first_value: f64,
        last_ts: i64,
        last_seq: i64,
        last_value: f64,
    }
}

impl StagedBucketRow {
    fn item(&self, width: i64) -> SnapshotItem<'static> {
        SnapshotItem::StagedBucket {
            device: DeviceKey(self.device_id),
            start_ms: self.b.saturating_mul(width),
            agg: rollups::Agg {
                count: self.n as u64,
                sum: self.total,
                min: self.lo,
                max: self.hi,
                first: self.first_value,
                last: self.last_value,
                first_key: (self.first_ts, self.first_seq as u64),
                last_key: (self.last_ts, self.last_seq as u64),
            },
        }
    }
}

/// Devices named in one statement of [`Store::sensor_snapshot`] (bound
/// parameters: SQLite takes 32,766, PostgreSQL 65,535).
const DEVICES_PER_STATEMENT: usize = 1000;

/// What [`Store::sensor_snapshot`] reads: one sensor's readings stamped in
/// [since, until), and maybe a rollup's intervals over part of it.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotRead {
    pub sensor: SensorKey,
    pub since_ms: i64,
    pub until_ms: i64,
    /// Staged readings come folded into buckets of this width
    /// ([`SnapshotItem::StagedBucket`]), a row per bucket, not per reading,
    /// and a ready rollup may answer part of the range.
    pub bucket_ms: Option<i64>,
}

/// A rollup's intervals starting in [from, until) (both multiples of
/// `every_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollupSpan {
    pub every_ms: i64,
    pub from_ms: i64,
    pub until_ms: i64,
}

/// One thing [`Store::sensor_snapshot`] read.
pub enum SnapshotItem<'a> {
    /// First, for a bucket read: the rollup chosen (in the snapshot).
    Rollup(Option<RollupSpan>),
    Staged(DeviceKey, Point),
    /// The staged readings of one bucket (starting at `start_ms`).
    StagedBucket {
        device: DeviceKey,
        start_ms: i64,
        agg: rollups::Agg,
    },
    Block {
        device: DeviceKey,
        first_ts: i64,
        last_ts: i64,
        data: Vec<u8>,
    },
    /// A rollup chunk starting at `chunk_ms` ([`rollups::decode_chunk`]).
    Chunk {
        device: DeviceKey,
        chunk_ms: i64,
        data: &'a [u8],
    },
}

impl Store {
    /// One sensor's readings of several devices stamped in [since, until),
    /// all read in one snapshot (PostgreSQL: REPEATABLE READ), so each
    /// reading is there once whatever compaction and merges do meanwhile:
    /// a few statements for any number of devices, where a query per
    /// series makes a dozen each. Each item goes to `each` as it is read
    /// (blocks are not held):
    /// - for a bucket read, first the rollup `choose` picks among the
    ///   ready ones ([`SnapshotItem::Rollup`]);
    /// - the staged readings, each device's in (ts, seq) order (folded
    ///   into buckets for a bucket read);
    /// - every block that overlaps the range, each device's by first_ts,
    ///   but for blocks wholly inside the rollup's span (it holds their
    ///   readings);
    /// - the rollup's chunks over its span.
    pub async fn sensor_snapshot<E: From<StoreError>>(
        &self,
        read: &SnapshotRead,
        devices: &[DeviceKey],
        choose: impl FnOnce(&[rollups::ReadyRollup]) -> Option<RollupSpan>,
        mut each: impl FnMut(SnapshotItem<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        use futures_util::TryStreamExt;
        let snapshot = self.read.backend() == Backend::Postgres;
        let mut keys: Vec<i64> = devices.iter().map(|d| d.0).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut parts: Vec<Vec<i64>> = vec![Vec::new(); STAGING_PARTS];
        for d in &keys {
            parts[super::staging_part(DeviceKey(*d))].push(*d);
        }
        // The blocks' statements: devices of one part of the blocks index
        // each, in device order within it.
        let mut by_index_part: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
        for d in &keys {
            by_index_part
                .entry(super::blocks::index_part(*d))
                .or_default()
                .push(*d);
        }
        let block_groups: Vec<(i64, Vec<i64>)> = by_index_part
            .iter()
            .flat_map(|(part, keys)| {
                keys.chunks(DEVICES_PER_STATEMENT)
                    .map(move |g| (*part, padded(g)))
            })
            .collect();
        with_pool!(&self.read, pool, _Db => {
            let mut tx = pool.begin().await.map_err(StoreError::from)?;
            if snapshot {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
            }
            // The rollup, chosen in the snapshot: the chunks read below
            // are the ones its definition and pruning say are whole.
            let span = match read.bucket_ms {
                Some(_) => {
                    let ready: Vec<(i64, i64, i64)> = sqlx::query_as(
                        "SELECT every_ms, keep_ms, pruned_before FROM rollup_defs \
                         WHERE ready = 1 ORDER BY every_ms",
                    )
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                    let ready: Vec<rollups::ReadyRollup> = ready
                        .into_iter()
                        .map(|(every_ms, keep_ms, pruned_before)| rollups::ReadyRollup {
                            every_ms,
                            keep_ms,
                            pruned_before,
                        })
                        .collect();
                    let span = choose(&ready);
                    each(SnapshotItem::Rollup(span))?;
                    span
                }
                None => None,
            };
            // Without a rollup, an empty span: no block is left out.
            let (skip_from, skip_until) =
                span.map_or((i64::MAX, i64::MIN), |r| (r.from_ms, r.until_ms));
            for (part, keys) in parts.iter().enumerate() {
                if let Some(width) = read.bucket_ms {
                    for group in keys.chunks(DEVICES_PER_STATEMENT) {
                        let group = padded(group);
                        let sql = staged_buckets_sql(part, group.len());
                        let mut query = sqlx::query_as::<_, StagedBucketRow>(&sql)
                            .bind(read.sensor.0)
                            .bind(read.since_ms)
                            .bind(read.until_ms)
                            .bind(width);
                        for d in &group {
                            query = query.bind(*d);
                        }
                        let mut rows = query.fetch(&mut *tx);
                        while let Some(r) = rows.try_next().await.map_err(StoreError::from)? {
                            each(r.item(width))?;
                        }
                    }
                    continue;
                }
                for group in keys.chunks(DEVICES_PER_STATEMENT) {
                    let group = padded(group);
                    let sql = format!(
                        "SELECT device_id, seq, ts_ms, value FROM {} WHERE sensor_id = $1 \
                         AND ts_ms >= $2 AND ts_ms < $3 AND device_id IN ({}) \
                         ORDER BY device_id, ts_ms, seq",
                        staging_table(part),
                        params(3, group.len())
                    );
                    let mut query = sqlx::query_as::<_, (i64, i64, i64, f64)>(&sql)
                        .bind(read.sensor.0)
                        .bind(read.since_ms)
                        .bind(read.until_ms);
                    for d in &group {
                        query = query.bind(*d);
                    }
                    let mut rows = query.fetch(&mut *tx);
                    while let Some((device, seq, ts_ms, value)) =
                        rows.try_next().await.map_err(StoreError::from)?
                    {
                        let point = Point {
                            ts_ms,
                            seq: seq as u64,
                            value,
                        };
                        each(SnapshotItem::Staged(DeviceKey(device), point))?;
                    }
                }
            }
            for (part, group) in &block_groups {
                let sql = blocks_sql(*part, group.len());
                let mut query = sqlx::query_as::<_, (i64, i64, i64, Vec<u8>)>(&sql)
                    .bind(read.sensor.0)
                    .bind(read.since_ms)
                    .bind(read.until_ms)
                    .bind(skip_from)
                    .bind(skip_until);
                for d in group {
                    query = query.bind(*d);
                }
                let mut rows = query.fetch(&mut *tx);
                while let Some((device, first_ts, last_ts, data)) =
                    rows.try_next().await.map_err(StoreError::from)?
                {
                    each(SnapshotItem::Block {
                        device: DeviceKey(device),
                        first_ts,
                        last_ts,
                        data,
                    })?;
                }
            }
            if let Some(r) = span {
                for group in keys.chunks(DEVICES_PER_STATEMENT) {
                    let group = padded(group);
                    let sql = format!(
                        "SELECT device_id, chunk_ms, data FROM rollups WHERE every_ms = $1 \
                         AND sensor_id = $2 AND chunk_ms >= $3 AND chunk_ms < $4 \
                         AND device_id IN ({}) ORDER BY device_id, chunk_ms",
                        params(4, group.len())
                    );
                    let mut query = sqlx::query_as::<_, (i64, i64, Vec<u8>)>(&sql)
                        .bind(r.every_ms)
                        .bind(read.sensor.0)
                        .bind(rollups::chunk_of(r.from_ms, r.every_ms))
                        .bind(r.until_ms);
                    for d in &group {
                        query = query.bind(*d);
                    }
                    let mut rows = query.fetch(&mut *tx);
                    while let Some((device, chunk_ms, data)) =
                        rows.try_next().await.map_err(StoreError::from)?
                    {
                        each(SnapshotItem::Chunk {
                            device: DeviceKey(device),
                            chunk_ms,
                            data: &data,
                        })?;
                    }
                }
            }
            tx.commit().await.map_err(StoreError::from)?;
        });
        Ok(())
    }
}
