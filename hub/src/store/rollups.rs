//! Rollups (`storage.rollups`): count, sum, min, max, first and last of
//! each series per fixed interval, so a bucket query over a long range
//! reads one row per interval instead of decoding blocks, and the shape of
//! old data stays after raw retention deleted it.
//!
//! - **Kept exact by the writer.** Every reading leaves staging exactly
//!   once: compaction encodes it into a block, or retention deletes it.
//!   Both add it to every rollup in the same transaction
//!   ([`WriteTx::add_to_rollups`]), so a rollup holds each reading once,
//!   whenever it arrived (late and backfilled readings land in the
//!   interval they belong to). Merges and block retention move or drop
//!   readings already counted and leave rollups alone.
//! - **Built for what was stored before** the rollup was configured
//!   ([`StoreWriter::build_rollup_step`]): series by series, each from its
//!   blocks in one transaction (its rows replaced), while the writer is
//!   idle. Queries use a rollup only once it is `ready`.
//! - **Read** by [`crate::query`]: it takes the coarsest ready rollup whose
//!   interval divides the bucket width and reads raw data for what the
//!   rollup cannot answer exactly (the unaligned ends of the range, what
//!   its retention deleted, intervals with staged readings).
//! - **Their own retention**: rows older than `keep` are deleted in steps.
//! - On PostgreSQL every one of these takes the blocks lock
//!   ([`WriteTx::lock_blocks`]), so several hubs' compactions and builds
//!   follow one order, and the definitions are the database's: hubs
//!   sharing it should list the same `storage.rollups` (the last started
//!   makes them match its own).

use std::collections::BTreeMap;

use super::blocks::Series;
use super::codec::{self, BlockStats, CodecError, Point};
use super::db::{Val, with_conn, with_pool};
use super::write::{Batched, RowToInsert, StoreWriter, WriteTx};
use super::{Store, StoreError};
use crate::config::RollupSetting;
use crate::domain::{Bucket, DeviceKey, SensorKey};

/// Series one build step takes at most...
const BUILD_SERIES: i64 = 32;
/// ...and it stops adding series after decoding this many points.
const BUILD_POINTS: usize = 1 << 20;
/// Blocks read per statement while building.
const BUILD_PAGE: i64 = 256;
/// A series' blocks from (first_ts, id) on, a page of a build (the blocks
/// index leads with the part: see [`super::blocks::MERGE_SELECT`]).
pub(super) const BUILD_SELECT: &str = "SELECT id, first_ts, data FROM blocks \
     WHERE device_id % 8 = $1 % 8 AND device_id = $1 AND sensor_id = $2 AND first_ts >= $3 \
     AND (first_ts, id) > ($3, $4) ORDER BY first_ts, id LIMIT $5";
/// Intervals per stored row (a chunk): a query of 30 days of hours reads
/// 23 rows, not 720, and a row's key is paid once per 32 intervals.
pub const CHUNK: i64 = 32;
/// Chunks read or written per statement.
const CHUNK_BATCH: usize = 256;
/// The chunk format.
const CHUNK_V1: u8 = 1;

/// The aggregates of some readings of one series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agg {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: f64,
    pub last: f64,
    /// The (ts, seq) of the readings `first` and `last` are the values of.
    pub first_key: (i64, u64),
    pub last_key: (i64, u64),
}

impl Agg {
    pub fn of(p: &Point) -> Self {
        Self {
            count: 1,
            sum: p.value,
            min: p.value,
            max: p.value,
            first: p.value,
            last: p.value,
            first_key: p.key(),
            last_key: p.key(),
        }
    }

    /// Adds `other`, in any order: first and last go by (ts, seq).
    pub fn merge(&mut self, other: &Agg) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.first_key < self.first_key {
            self.first_key = other.first_key;
            self.first = other.first;
        }
        if other.last_key > self.last_key {
            self.last_key = other.last_key;
            self.last = other.last;
        }
    }

    /// A block's aggregates from its header; it starts at `first_ts`.
    pub fn of_block(first_ts: i64, stats: &BlockStats) -> Self {
        Self {
            count: u64::from(stats.count),
            sum: stats.sum,
            min: stats.min,
            max: stats.max,
            first: stats.first,
            last: stats.last,
            // The first seq is not in the header; a bucket fold takes
            // blocks in order and needs neither.
            first_key: (first_ts, 0),
            last_key: (stats.last_ts, stats.last_seq),
        }
    }
}

/// One row of a rollup.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupRow {
    pub every_ms: i64,
    pub series: Series,
    pub start_ms: i64,
    pub agg: Agg,
}

/// Adds the rows of `points` (one series, in (ts, seq) order) for each
/// interval in `everies` to `out`: one per interval they touch.
fn fold_sorted(series: Series, points: &[Point], everies: &[i64], out: &mut Vec<RollupRow>) {
    for &every in everies {
        for run in points
            .chunk_by(|a, b| Bucket::start_of(a.ts_ms, every) == Bucket::start_of(b.ts_ms, every))
        {
            let mut agg = Agg::of(&run[0]);
            for p in &run[1..] {
                agg.merge(&Agg::of(p));
            }
            out.push(RollupRow {
                every_ms: every,
                series,
                start_ms: Bucket::start_of(run[0].ts_ms, every),
                agg,
            });
        }
    }
}

/// The rollup rows of staged rows sorted by (device, sensor, ts, seq), as
/// compaction sorts them.
pub fn rows_of_sorted(rows: &[RowToInsert], everies: &[i64]) -> Vec<RollupRow> {
    let mut out = Vec::new();
    if everies.is_empty() {
        return out;
    }
    let mut points = Vec::new();
    for run in rows.chunk_by(|a, b| (a.device, a.sensor) == (b.device, b.sensor)) {
        points.clear();
        points.extend(run.iter().map(RowToInsert::point));
        fold_sorted((run[0].device, run[0].sensor), &points, everies, &mut out);
    }
    out
}

/// The rollup rows of staged rows in any order.
pub fn rows_of(rows: &mut [RowToInsert], everies: &[i64]) -> Vec<RollupRow> {
    rows.sort_unstable_by_key(|r| (r.device, r.sensor, r.ts_ms, r.seq));
    rows_of_sorted(rows, everies)
}

/// The start of the chunk holding the interval that starts at `start_ms`.
pub fn chunk_of(start_ms: i64, every_ms: i64) -> i64 {
    Bucket::start_of(start_ms, every_ms.saturating_mul(CHUNK))
}

/// A chunk's intervals (start, aggregates), in time order: version, their
/// number, then each one's index in the chunk and count, its sum (f64,
/// little-endian), its min, max, first and last (see [`put_values`]), and
/// the (ts - start, seq) of first and last, as varints.
fn encode_chunk(chunk_ms: i64, every_ms: i64, intervals: &BTreeMap<i64, Agg>) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + intervals.len() * 40);
    out.push(CHUNK_V1);
    codec::put_varint(&mut out, intervals.len() as u64);
    for (&start, a) in intervals {
        codec::put_varint(&mut out, ((start - chunk_ms) / every_ms) as u64);
        codec::put_varint(&mut out, a.count);
        out.extend_from_slice(&a.sum.to_le_bytes());
        put_values(&mut out, [a.min, a.max, a.first, a.last]);
        for (ts, seq) in [a.first_key, a.last_key] {
            codec::put_varint(&mut out, (ts - start) as u64);
            codec::put_varint(&mut out, seq);
        }
    }
    out
}

/// Most decimal digits a value may have to be stored as a mantissa.
const MAX_DIGITS: u8 = 6;
/// The mark of values stored as they are.
const RAW_VALUES: u8 = 0xff;

/// Four values: when each is exactly `m / 10^d` for a small `d` (what
/// sensors report), `d` and the mantissas as zigzag varints, a few bytes
/// each; otherwise [`RAW_VALUES`] and the four f64s. Every bit pattern
/// comes back as it was (each is checked by decoding it).
fn put_values(out: &mut Vec<u8>, values: [f64; 4]) {
    for d in 0..=MAX_DIGITS {
        let scale = 10f64.powi(i32::from(d));
        let mantissas = values.map(|v| (v * scale).round());
        let exact = values
            .iter()
            .zip(&mantissas)
            .all(|(v, m)| m.abs() < 9.0e15 && (*m as i64 as f64 / scale).to_bits() == v.to_bits());
        if exact {
            out.push(d);
            for m in mantissas {
                codec::put_varint(out, codec::zigzag(m as i64));
            }
            return;
        }
    }
    out.push(RAW_VALUES);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn get_values(bytes: &[u8]) -> Result<([f64; 4], &[u8]), CodecError> {
    let (mode, mut rest) = bytes.split_first().ok_or(CodecError::Truncated)?;
    let mut values = [0f64; 4];
    if *mode == RAW_VALUES {
        for v in &mut values {
            let (raw, r) = rest.split_first_chunk::<8>().ok_or(CodecError::Truncated)?;
            *v = f64::from_le_bytes(*raw);
            rest = r;
        }
    } else if *mode <= MAX_DIGITS {
        let scale = 10f64.powi(i32::from(*mode));
        for v in &mut values {
            let (z, r) = codec::get_varint(rest)?;
            *v = codec::unzigzag(z) as f64 / scale;
            rest = r;
        }
    } else {
        return Err(CodecError::Mode(*mode));
    }
    Ok((values, rest))
}

/// A chunk's intervals (start, aggregates), in time order.
pub fn decode_chunk(
    chunk_ms: i64,
    every_ms: i64,
    data: &[u8],
) -> Result<Vec<(i64, Agg)>, CodecError> {
    let [version, rest @ ..] = data else {
        return Err(CodecError::Truncated);
    };
    if *version != CHUNK_V1 {
        return Err(CodecError::Version(*version));
    }
    let (n, mut rest) = codec::get_varint(rest)?;
    if n == 0 || n > CHUNK as u64 {
        return Err(CodecError::Truncated);
    }
    let mut out = Vec::with_capacity(n as usize);
    let mut next_index = 0u64;
    for _ in 0..n {
        let (index, r) = codec::get_varint(rest)?;
        let (count, r) = codec::get_varint(r)?;
        // Intervals in order, each once, each of some readings.
        if index < next_index || index >= CHUNK as u64 || count == 0 {
            return Err(CodecError::Truncated);
        }
        next_index = index + 1;
        let (sum, r) = r.split_first_chunk::<8>().ok_or(CodecError::Truncated)?;
        let ([min, max, first, last], mut r) = get_values(r)?;
        let start = (index as i64)
            .checked_mul(every_ms)
            .and_then(|o| chunk_ms.checked_add(o))
            .ok_or(CodecError::Truncated)?;
        let mut keys = [(0i64, 0u64); 2];
        for key in &mut keys {
            let (offset, r1) = codec::get_varint(r)?;
            let (seq, r2) = codec::get_varint(r1)?;
            if offset >= every_ms as u64 {
                return Err(CodecError::Truncated);
            }
            let ts = start
                .checked_add(offset as i64)
                .ok_or(CodecError::Truncated)?;
            *key = (ts, seq);
            r = r2;
        }
        if keys[0] > keys[1] {
            return Err(CodecError::Truncated);
        }
        rest = r;
        out.push((
            start,
            Agg {
                count,
                sum: f64::from_le_bytes(*sum),
                min,
                max,
                first,
                last,
                first_key: keys[0],
                last_key: keys[1],
            },
        ));
    }
    if !rest.is_empty() {
        return Err(CodecError::Truncated);
    }
    Ok(out)
}

/// A rollup the database holds, as queries see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadyRollup {
    pub every_ms: i64,
    /// 0: kept for ever.
    pub keep_ms: i64,
    /// Rows starting before this may have been deleted.
    pub pruned_before: i64,
}

impl WriteTx<'_> {
    /// Every rollup interval the database keeps (ready or being built):
    /// each is maintained.
    pub async fn rollup_everies(&mut self) -> Result<Vec<i64>, StoreError> {
        Ok(with_conn!(self.conn.conn(), c => {
            sqlx::query_scalar("SELECT every_ms FROM rollup_defs ORDER BY every_ms")
                .fetch_all(c)
                .await?
        }))
    }

    /// Adds readings leaving staging to every rollup (see the module):
    /// the chunks they fall in are read, merged and written back. The
    /// caller holds the blocks lock ([`WriteTx::lock_blocks`]): on
    /// PostgreSQL that is what keeps two hubs from writing one chunk at
    /// once (each would write back what it read).
    pub async fn add_to_rollups(&mut self, rows: &[RollupRow]) -> Result<(), StoreError> {
        type Key = (i64, i64, i64, i64);
        let mut chunks: BTreeMap<Key, BTreeMap<i64, Agg>> = BTreeMap::new();
        for r in rows {
            let key = (
                r.every_ms,
                r.series.0.0,
                r.series.1.0,
                chunk_of(r.start_ms, r.every_ms),
            );
            chunks
                .entry(key)
                .or_default()
                .entry(r.start_ms)
                .and_modify(|a| a.merge(&r.agg))
                .or_insert(r.agg);
        }
        let keys: Vec<Key> = chunks.keys().copied().collect();
        let mut broken: Vec<i64> = Vec::new();
        let mut rest = keys.as_slice();
        while !rest.is_empty() {
            // Powers of two (as the writer's other batches): a handful of
            // statement texts, not one per length, in sqlx's cache.
            let (batch, tail) = rest.split_at(super::write::chunk_len(rest.len(), CHUNK_BATCH));
            rest = tail;
            let sql = self.statement(Batched::RollupChunks, batch.len());
            let vals: Vec<Val<'_>> = batch
                .iter()
                .flat_map(|k| [Val::I(k.0), Val::I(k.1), Val::I(k.2), Val::I(k.3)])
                .collect();
            let stored: Vec<(i64, i64, i64, i64, Vec<u8>)> = with_conn!(self.conn.conn(), c => {
                use sqlx::Row;
                let rows = super::db::bind_vals(sqlx::query(&sql), &vals).fetch_all(c).await?;
                rows.iter()
                    .map(|r| {
                        Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?))
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()?
            });
            for (every, device, sensor, chunk_ms, data) in stored {
                let Some(fresh) = chunks.get_mut(&(every, device, sensor, chunk_ms)) else {
                    continue;
                };
                match decode_chunk(chunk_ms, every, &data) {
                    Ok(old) => {
                        for (start, agg) in old {
                            fresh
                                .entry(start)
                                .and_modify(|a| a.merge(&agg))
                                .or_insert(agg);
                        }
                    }
                    // Its intervals would undercount: the rollup is built
                    // again from the blocks, unused until then.
                    Err(e) => {
                        tracing::error!(every, device, sensor, chunk_ms, error = %e,
                            "a stored rollup chunk cannot be decoded; the rollup is built again");
                        broken.push(every);
                    }
                }
            }
        }
        broken.sort_unstable();
        broken.dedup();
        for every in broken {
            with_conn!(self.conn.conn(), c => {
                sqlx::query(
                    "UPDATE rollup_defs SET ready = 0, next_device = -1, next_sensor = -1 \
                     WHERE every_ms = $1",
                )
                .bind(every)
                .execute(c)
                .await?
                .rows_affected()
            });
        }
        let encoded: Vec<(Key, Vec<u8>)> = chunks
            .iter()
            .map(|(k, intervals)| (*k, encode_chunk(k.3, k.0, intervals)))
            .collect();
        self.execute_batched(Batched::Rollups, &encoded, |(k, data), out| {
            out.extend([
                Val::I(k.0),
                Val::I(k.1),
                Val::I(k.2),
                Val::I(k.3),
                Val::B(data),
            ]);
        })
        .await
    }

    /// Deletes up to `limit` chunks of rollup `every_ms` whose intervals
    /// all start before `cutoff_ms`; how many went. Queries read raw data
    /// before what was deleted from now on (`pruned_before`), whatever
    /// `keep` says later.
    pub async fn prune_rollup(
        &mut self,
        every_ms: i64,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        // Chunks starting before this one (holding the cutoff) end at or
        // before the cutoff: they go.
        let before = chunk_of(cutoff_ms, every_ms);
        with_conn!(self.conn.conn(), c => {
            sqlx::query(
                "UPDATE rollup_defs SET pruned_before = $2 WHERE every_ms = $1 AND pruned_before < $2",
            )
            .bind(every_ms)
            .bind(before)
            .execute(c)
            .await?
            .rows_affected()
        });
        Ok(with_conn!(self.conn.conn(), c => {
            sqlx::query(
                "DELETE FROM rollups WHERE (every_ms, device_id, sensor_id, chunk_ms) IN \
                 (SELECT every_ms, device_id, sensor_id, chunk_ms FROM rollups \
                  WHERE every_ms = $1 AND chunk_ms < $2 LIMIT $3)",
            )
            .bind(every_ms)
            .bind(before)
            .bind(i64::from(limit))
            .execute(c)
            .await?
            .rows_affected()
        }))
    }

    /// Rebuilds one series' rows of the rollups `everies` from its
    /// blocks: blocks in (first_ts, id) order, and an interval's row
    /// written once no later block can reach it. Returns the points
    /// decoded.
    async fn rebuild_series(
        &mut self,
        series: Series,
        everies: &[i64],
    ) -> Result<usize, StoreError> {
        for &every_ms in everies {
            with_conn!(self.conn.conn(), c => {
                sqlx::query(
                    "DELETE FROM rollups WHERE every_ms = $1 AND device_id = $2 AND sensor_id = $3",
                )
                .bind(every_ms)
                .bind(series.0.0)
                .bind(series.1.0)
                .execute(c)
                .await?
                .rows_affected()
            });
        }
        let mut open: Vec<BTreeMap<i64, Agg>> = vec![BTreeMap::new(); everies.len()];
        let mut done = Vec::new();
        let (mut after_ts, mut after_id) = (i64::MIN, i64::MIN);
        let mut decoded = 0usize;
        let mut points = Vec::new();
        loop {
            let page: Vec<(i64, i64, Vec<u8>)> = with_conn!(self.conn.conn(), c => {
                sqlx::query_as(BUILD_SELECT)
                .bind(series.0.0)
                .bind(series.1.0)
                .bind(after_ts)
                .bind(after_id)
                .bind(BUILD_PAGE)
                .fetch_all(c)
                .await?
            });
            let full = page.len() as i64 == BUILD_PAGE;
            for (id, first_ts, data) in &page {
                (after_ts, after_id) = (*first_ts, *id);
                // Intervals ending at or before this block's first reading
                // are complete: later blocks start later still.
                for (&every_ms, open) in everies.iter().zip(&mut open) {
                    while let Some(entry) = open.first_entry() {
                        if entry.key().saturating_add(every_ms) > *first_ts {
                            break;
                        }
                        let (start_ms, agg) = entry.remove_entry();
                        done.push(RollupRow {
                            every_ms,
                            series,
                            start_ms,
                            agg,
                        });
                    }
                }
                points.clear();
                if let Err(e) = codec::decode_into(data, &mut points) {
                    // Queries report it too; the rest of the series counts.
                    tracing::error!(block = id, error = %e, "a stored block cannot be decoded; its readings are not in the rollup");
                    continue;
                }
                decoded += points.len();
                for p in &points {
                    let agg = Agg::of(p);
                    for (&every_ms, open) in everies.iter().zip(&mut open) {
                        open.entry(Bucket::start_of(p.ts_ms, every_ms))
                            .and_modify(|a| a.merge(&agg))
                            .or_insert(agg);
                    }
                }
            }
            if done.len() >= 4096 || !full {
                self.add_to_rollups(&done).await?;
                done.clear();
            }
            if !full {
                break;
            }
        }
        for (&every_ms, open) in everies.iter().zip(open) {
            done.extend(open.into_iter().map(|(start_ms, agg)| RollupRow {
                every_ms,
                series,
                start_ms,
                agg,
            }));
        }
        self.add_to_rollups(&done).await?;
        Ok(decoded)
    }
}

impl StoreWriter {
    /// Makes the database's rollups match `settings`: new ones are
    /// defined (and then built), changed ones get their new `keep`, and
    /// those no longer listed are dropped with their rows.
    pub async fn sync_rollups(&mut self, settings: &[RollupSetting]) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        tx.lock_blocks().await?;
        let stored: Vec<(i64, i64)> = with_conn!(tx.conn.conn(), c => {
            sqlx::query_as("SELECT every_ms, keep_ms FROM rollup_defs")
                .fetch_all(c)
                .await?
        });
        for (every_ms, _) in &stored {
            if settings.iter().any(|s| s.every_ms() == *every_ms) {
                continue;
            }
            tracing::info!(every_ms, "a rollup no longer configured is dropped");
            for sql in [
                "DELETE FROM rollups WHERE every_ms = $1",
                "DELETE FROM rollup_defs WHERE every_ms = $1",
            ] {
                with_conn!(tx.conn.conn(), c => {
                    sqlx::query(sql).bind(every_ms).execute(c).await?.rows_affected()
                });
            }
        }
        for s in settings {
            let (every_ms, keep_ms) = (s.every_ms(), s.keep_ms());
            match stored.iter().find(|(e, _)| *e == every_ms) {
                Some((_, k)) if *k == keep_ms => continue,
                Some(_) => {}
                None => tracing::info!(every_ms, "a new rollup is built from the stored readings"),
            }
            with_conn!(tx.conn.conn(), c => {
                sqlx::query(
                    "INSERT INTO rollup_defs (every_ms, keep_ms) VALUES ($1, $2) \
                     ON CONFLICT (every_ms) DO UPDATE SET keep_ms = excluded.keep_ms",
                )
                .bind(every_ms)
                .bind(keep_ms)
                .execute(c)
                .await?
                .rows_affected()
            });
        }
        tx.commit().await
    }

    /// One step of building a rollup not yet ready (the finest first): a
    /// few series, each rebuilt from its blocks, in one transaction.
    /// Returns whether a rollup is still being built.
    pub async fn build_rollup_step(&mut self) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        tx.lock_blocks().await?;
        // Every rollup being built at the same place goes in one pass (one
        // added later catches up with the others first).
        let building: Vec<(i64, i64, i64)> = with_conn!(tx.conn.conn(), c => {
            sqlx::query_as(
                "SELECT every_ms, next_device, next_sensor FROM rollup_defs WHERE ready = 0 \
                 ORDER BY next_device, next_sensor, every_ms",
            )
            .fetch_all(c)
            .await?
        });
        let Some(&(_, device, sensor)) = building.first() else {
            // Ended now: on PostgreSQL it holds the blocks lock, which an
            // idle writer must not keep from other hubs.
            tx.commit().await?;
            return Ok(false);
        };
        let everies: Vec<i64> = building
            .iter()
            .filter(|b| (b.1, b.2) == (device, sensor))
            .map(|b| b.0)
            .collect();
        let series: Vec<(i64, i64)> = with_conn!(tx.conn.conn(), c => {
            sqlx::query_as(
                "SELECT device_id, sensor_id FROM device_sensors \
                 WHERE (device_id, sensor_id) > ($1, $2) ORDER BY device_id, sensor_id LIMIT $3",
            )
            .bind(device)
            .bind(sensor)
            .bind(BUILD_SERIES)
            .fetch_all(c)
            .await?
        });
        let (mut decoded, mut taken) = (0usize, 0usize);
        let mut next = (device, sensor);
        for &(d, s) in &series {
            if decoded >= BUILD_POINTS {
                break;
            }
            decoded += tx
                .rebuild_series((DeviceKey(d), SensorKey(s)), &everies)
                .await?;
            next = (d, s);
            taken += 1;
        }
        let finished = taken == series.len() && (series.len() as i64) < BUILD_SERIES;
        for &every_ms in &everies {
            with_conn!(tx.conn.conn(), c => {
                sqlx::query(
                    "UPDATE rollup_defs SET next_device = $2, next_sensor = $3, ready = $4 \
                     WHERE every_ms = $1",
                )
                .bind(every_ms)
                .bind(next.0)
                .bind(next.1)
                .bind(i64::from(finished))
                .execute(c)
                .await?
                .rows_affected()
            });
        }
        tx.commit().await?;
        if finished {
            tracing::info!(?everies, "rollups built");
        }
        Ok(true)
    }
}

impl Store {
    /// The rollups queries may use.
    pub async fn ready_rollups(&self) -> Result<Vec<ReadyRollup>, StoreError> {
        let rows: Vec<(i64, i64, i64)> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(
                "SELECT every_ms, keep_ms, pruned_before FROM rollup_defs WHERE ready = 1 \
                 ORDER BY every_ms",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(every_ms, keep_ms, pruned_before)| ReadyRollup {
                every_ms,
                keep_ms,
                pruned_before,
            })
            .collect())
    }

    /// One series' intervals of rollup `every_ms` with `since <= start <
    /// until`, in time order, from up to `limit` chunks; and where to go on
    /// from when there may be more.
    pub async fn rollup_page(
        &self,
        series: Series,
        every_ms: i64,
        since_ms: i64,
        until_ms: i64,
        limit: u32,
    ) -> Result<(Vec<(i64, Agg)>, Option<i64>), StoreError> {
        let rows: Vec<(i64, Vec<u8>)> = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(
                "SELECT chunk_ms, data FROM rollups WHERE every_ms = $1 AND device_id = $2 \
                 AND sensor_id = $3 AND chunk_ms >= $4 AND chunk_ms < $5 ORDER BY chunk_ms LIMIT $6",
            )
            .bind(every_ms)
            .bind(series.0.0)
            .bind(series.1.0)
            .bind(chunk_of(since_ms, every_ms))
            .bind(until_ms)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        let span = every_ms.saturating_mul(CHUNK);
        let next = match rows.last() {
            Some((last, _)) if rows.len() == limit as usize => Some(last.saturating_add(span)),
            _ => None,
        };
        let mut out = Vec::new();
        for (chunk_ms, data) in rows {
            let intervals = decode_chunk(chunk_ms, every_ms, &data)?;
            out.extend(
                intervals
                    .into_iter()
                    .filter(|(start, _)| (since_ms..until_ms).contains(start)),
            );
        }
        Ok((out, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(device: i64, ts_ms: i64, seq: i64, value: f64) -> RowToInsert {
        RowToInsert {
            device: DeviceKey(device),
            sensor: SensorKey(1),
            ts_ms,
            seq,
            value,
        }
    }

    /// A new database in a temp dir with one rollup of `every_s`, built.
    async fn open(every_s: u64) -> (tempfile::TempDir, Store, StoreWriter) {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::config::Settings::defaults().unwrap().storage;
        settings.path = dir.path().join("hub.db");
        settings.rollups = vec![RollupSetting {
            every: std::time::Duration::from_secs(every_s),
            keep: std::time::Duration::ZERO,
        }];
        let (store, mut writer) = crate::store::open(&settings).await.unwrap();
        while writer.build_rollup_step().await.unwrap() {}
        (dir, store, writer)
    }

    /// Device 1's staging part.
    fn part() -> usize {
        super::super::write::staging_part(DeviceKey(1))
    }

    /// Stages rows of device 1 in one commit.
    async fn stage(writer: &mut StoreWriter, rows: &[RowToInsert]) {
        let mut parts = vec![Vec::new(); super::super::write::STAGING_PARTS];
        parts[part()] = rows.to_vec();
        let mut tx = writer.begin().await.unwrap();
        tx.insert_readings(&parts).await.unwrap();
        tx.commit().await.unwrap();
    }

    /// Compacts device 1's part, as the writer does.
    async fn compact(writer: &mut StoreWriter) -> Result<(), StoreError> {
        let mut rows = writer.staged_rows().await?.swap_remove(part());
        let blocks = super::super::blocks::blocks_of(&mut rows);
        writer.compact(part(), &blocks, &rows).await
    }

    #[test]
    fn rows_fold_per_series_and_interval_whatever_their_order() {
        let mut rows = vec![
            row(1, 61_000, 3, 5.0),
            row(1, 1_000, 1, 2.0),
            row(2, 500, 9, -1.0),
            row(1, 59_999, 2, 7.0),
            row(1, 1_000, 0, 4.0),
        ];
        let out = rows_of(&mut rows, &[60_000]);
        assert_eq!(out.len(), 3);
        let a = &out[0];
        assert_eq!((a.series.0, a.start_ms), (DeviceKey(1), 0));
        assert_eq!(a.agg.count, 3);
        assert_eq!(a.agg.sum, 13.0);
        assert_eq!((a.agg.min, a.agg.max), (2.0, 7.0));
        // (1000, 0) comes before (1000, 1): the first is 4.0.
        assert_eq!((a.agg.first, a.agg.first_key), (4.0, (1_000, 0)));
        assert_eq!((a.agg.last, a.agg.last_key), (7.0, (59_999, 2)));
        assert_eq!((out[1].start_ms, out[1].agg.count), (60_000, 1));
        assert_eq!((out[2].series.0, out[2].agg.first), (DeviceKey(2), -1.0));
    }

    #[test]
    fn merging_in_any_order_gives_the_same_aggregates() {
        let points: Vec<Point> = (0..50)
            .map(|i| Point {
                ts_ms: (i * 7919) % 100,
                seq: i as u64,
                value: ((i * 31) % 17) as f64 - 8.0,
            })
            .collect();
        let mut forward = Agg::of(&points[0]);
        points[1..].iter().for_each(|p| forward.merge(&Agg::of(p)));
        let mut backward = Agg::of(&points[49]);
        points[..49]
            .iter()
            .rev()
            .for_each(|p| backward.merge(&Agg::of(p)));
        assert_eq!(forward, backward);
        let mut sorted = points.clone();
        sorted.sort_by_key(Point::key);
        assert_eq!(forward.first, sorted[0].value);
        assert_eq!(forward.last, sorted[49].value);
    }

    /// The rollup's intervals as stored: (device, start, count, sum, min,
    /// first, last).
    async fn stored(writer: &mut StoreWriter) -> Vec<(i64, i64, i64, f64, f64, f64, f64)> {
        let rows: Vec<(i64, i64, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT device_id, every_ms, chunk_ms, data FROM rollups ORDER BY device_id, chunk_ms",
        )
        .fetch_all(writer.sqlite().unwrap())
        .await
        .unwrap();
        let mut out = Vec::new();
        for (device, every, chunk_ms, data) in rows {
            for (start, a) in decode_chunk(chunk_ms, every, &data).unwrap() {
                out.push((device, start, a.count as i64, a.sum, a.min, a.first, a.last));
            }
        }
        out
    }

    /// Readings leave staging by compaction or by retention deleting them:
    /// either way each is counted once, and a rebuild from the blocks gives
    /// the same rows (retention's readings are gone from the blocks, so
    /// those are rebuilt without them).
    #[tokio::test]
    async fn compaction_and_staged_retention_count_each_reading_once() {
        let (_dir, _store, mut writer) = open(10).await;
        // Device 1: 30 s of readings, compacted.
        let first: Vec<RowToInsert> = (0..30)
            .map(|i| row(1, 100_000 + i * 1000, i, i as f64))
            .collect();
        stage(&mut writer, &first).await;
        compact(&mut writer).await.unwrap();
        // Then late ones, older than a retention cutoff: deleted staged.
        let late: Vec<RowToInsert> = (0..5)
            .map(|i| row(1, 100_500 + i * 1000, 100 + i, -1.0))
            .collect();
        stage(&mut writer, &late).await;
        let mut tx = writer.begin().await.unwrap();
        assert_eq!(tx.delete_old_staged(200_000, 100).await.unwrap(), 5);
        tx.commit().await.unwrap();
        let want = vec![
            (1, 100_000, 15, 45.0 - 5.0, -1.0, 0.0, 9.0),
            (1, 110_000, 10, 145.0, 10.0, 10.0, 19.0),
            (1, 120_000, 10, 245.0, 20.0, 20.0, 29.0),
        ];
        assert_eq!(stored(&mut writer).await, want);
        // A rebuild reads the blocks: the late readings never reached one.
        sqlx::query("UPDATE rollup_defs SET ready = 0, next_device = -1, next_sensor = -1")
            .execute(writer.sqlite().unwrap())
            .await
            .unwrap();
        sqlx::query("INSERT INTO device_sensors (device_id, sensor_id) VALUES (1, 1)")
            .execute(writer.sqlite().unwrap())
            .await
            .unwrap();
        while writer.build_rollup_step().await.unwrap() {}
        let mut rebuilt = want.clone();
        rebuilt[0] = (1, 100_000, 10, 45.0, 0.0, 0.0, 9.0);
        assert_eq!(stored(&mut writer).await, rebuilt);
    }

    /// Finite readings can sum to +inf and -inf, and those to NaN:
    /// compaction still succeeds and the sum reads back as NaN, as the
    /// readings themselves fold.
    #[tokio::test]
    async fn sums_past_the_largest_float_do_not_stop_compaction() {
        let (_dir, store, mut writer) = open(60).await;
        for (i, v) in [f64::MAX, -f64::MAX].into_iter().enumerate() {
            let i = i as i64;
            let rows = [
                row(1, 1000 + i * 10, 2 * i, v),
                row(1, 1005 + i * 10, 2 * i + 1, v),
            ];
            stage(&mut writer, &rows).await;
            compact(&mut writer).await.unwrap();
        }
        let (page, _) = store
            .rollup_page((DeviceKey(1), SensorKey(1)), 60_000, 0, i64::MAX, 10)
            .await
            .unwrap();
        assert_eq!(page.len(), 1);
        let agg = page[0].1;
        assert!(agg.sum.is_nan(), "{agg:?}");
        assert_eq!((agg.count, agg.min, agg.max), (4, -f64::MAX, f64::MAX));
    }

    #[test]
    fn chunks_round_trip_and_refuse_garbage() {
        let every = 60_000;
        let chunk_ms = chunk_of(1_700_000_123_456, every);
        let mut intervals = BTreeMap::new();
        for i in [0, 5, 31] {
            let start = chunk_ms + i * every;
            let mut a = Agg::of(&Point {
                ts_ms: start + 59_999,
                seq: u64::MAX >> 1,
                value: f64::MIN_POSITIVE,
            });
            a.merge(&Agg::of(&Point {
                ts_ms: start,
                seq: 0,
                value: -0.0,
            }));
            a.sum = f64::NAN;
            intervals.insert(start, a);
        }
        let data = encode_chunk(chunk_ms, every, &intervals);
        let back: BTreeMap<i64, Agg> = decode_chunk(chunk_ms, every, &data)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(back.len(), 3);
        for (start, a) in &intervals {
            let b = back[start];
            assert!(b.sum.is_nan());
            assert_eq!(
                (b.count, b.first_key, b.last_key),
                (a.count, a.first_key, a.last_key)
            );
            assert_eq!(
                (b.min.to_bits(), b.first.to_bits()),
                (a.min.to_bits(), a.first.to_bits())
            );
        }
        for cut in 0..data.len() {
            assert!(
                decode_chunk(chunk_ms, every, &data[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut bad = data.clone();
        bad[0] = 9;
        assert!(decode_chunk(chunk_ms, every, &bad).is_err());
    }

    /// A chunk that cannot be decoded is not merged into: the rollup is
    /// taken out of use and built again from the blocks.
    #[tokio::test]
    async fn an_undecodable_chunk_makes_the_rollup_build_again() {
        let (_dir, _store, mut writer) = open(10).await;
        sqlx::query("INSERT INTO device_sensors (device_id, sensor_id) VALUES (1, 1)")
            .execute(writer.sqlite().unwrap())
            .await
            .unwrap();
        for seqs in [0..5, 5..6] {
            let rows: Vec<RowToInsert> = seqs
                .map(|i| row(1, 100_000 + i * 1000, i, i as f64))
                .collect();
            stage(&mut writer, &rows).await;
            compact(&mut writer).await.unwrap();
            // After the first compaction the chunk is damaged.
            sqlx::query("UPDATE rollups SET data = x'0102'")
                .execute(writer.sqlite().unwrap())
                .await
                .unwrap();
        }
        let ready: i64 = sqlx::query_scalar("SELECT ready FROM rollup_defs")
            .fetch_one(writer.sqlite().unwrap())
            .await
            .unwrap();
        assert_eq!(ready, 0, "out of use until built again");
        while writer.build_rollup_step().await.unwrap() {}
        assert_eq!(
            stored(&mut writer).await,
            vec![(1, 100_000, 6, 15.0, 0.0, 0.0, 5.0)]
        );
    }

    /// A compaction that fails (here the file may not grow: SQLITE_FULL)
    /// changes no rollup: its readings stay staged, and are counted once
    /// when a later compaction succeeds.
    #[tokio::test]
    async fn a_compaction_that_fails_leaves_the_rollup_as_it_was() {
        let (_dir, _store, mut writer) = open(10).await;
        let first: Vec<RowToInsert> = (0..5)
            .map(|i| row(1, 100_000 + i * 1000, i, i as f64))
            .collect();
        stage(&mut writer, &first).await;
        compact(&mut writer).await.unwrap();
        let before = stored(&mut writer).await;
        // Noise in every bit: its block needs new pages.
        let more: Vec<RowToInsert> = (5..3005)
            .map(|i| {
                let noise = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 12;
                row(
                    1,
                    100_000 + i * 10,
                    i,
                    f64::from_bits(0x3ff0_0000_0000_0000 | noise),
                )
            })
            .collect();
        stage(&mut writer, &more).await;
        let db = writer.sqlite().unwrap();
        sqlx::query("VACUUM").execute(&mut *db).await.unwrap();
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut *db)
            .await
            .unwrap();
        sqlx::query(&format!("PRAGMA max_page_count = {pages}"))
            .execute(&mut *db)
            .await
            .unwrap();
        let full = compact(&mut writer).await.unwrap_err();
        assert!(full.to_string().contains("full"), "{full}");
        writer.abort().await;
        assert_eq!(stored(&mut writer).await, before, "the rollup is as it was");
        let staged = writer.staged_rows().await.unwrap().swap_remove(part());
        assert_eq!(staged.len(), more.len(), "the readings are still staged");

        sqlx::query("PRAGMA max_page_count = 1000000")
            .execute(writer.sqlite().unwrap())
            .await
            .unwrap();
        compact(&mut writer).await.unwrap();
        let counted: i64 = stored(&mut writer).await.iter().map(|r| r.2).sum();
        assert_eq!(
            counted as usize,
            first.len() + more.len(),
            "each counted once"
        );
    }
}
