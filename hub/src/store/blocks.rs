//! Compressed series storage: readings live in blocks, one (device, sensor)
//! series' points of a stretch of time each, encoded by [`super::codec`].
//!
//! - **Compaction** (the writer, [`WriteTx::compact_staged`]) turns the
//!   readings of one staging part into level-0 blocks, one per series, and
//!   empties that part's table in the same transaction.
//! - **Merging** ([`StoreWriter::merge`]): once a series has [`FANIN`]
//!   blocks of one level, they become one block of the next level. A block
//!   of [`SEALED`] level or of [`SEAL_POINTS`] points is never merged again,
//!   so a reading is rewritten at most three times and blocks stay small
//!   enough to decode for a short query.
//! - **Retention** deletes whole blocks, and rewrites the one block that
//!   straddles the cutoff.
//!
//! Each of these is one transaction: a reading is in exactly one block, or
//! staged, at every commit.

use std::collections::HashMap;

use super::codec::{self, Point};
use super::db::{Val, with_conn, with_pool};
use super::rollups;
use super::write::{
    Batched, RowToInsert, STAGING_PARTS, StagedRow, StoreWriter, WriteTx, staging_table,
};
use super::{Store, StoreError};
use crate::config::Backend;
use crate::domain::{DeviceKey, SensorKey};

/// Blocks of one level merged into one of the next.
pub const FANIN: usize = 8;
/// The last level: never merged again.
pub const SEALED: u8 = 3;
/// A block with this many points is sealed whatever its level.
pub const SEAL_POINTS: usize = 4096;
/// Most points written to one block (a long staged run is split).
pub const MAX_BLOCK_POINTS: usize = 8192;
/// Readings of the old layout converted per transaction.
const LEGACY_RUN: i64 = 16 * MAX_BLOCK_POINTS as i64;
/// Blocks one retention step looks at per series.
const RETAIN_BLOCKS: i64 = 64;
/// Most blocks one merge reads.
const MAX_MERGE_BLOCKS: i64 = 64;
/// Blocks deleted per statement.
const DELETE_CHUNK: usize = 512;

// The statements that seek one series' blocks. The blocks index leads with
// the device's staging part (`device_id % 8`, migration 13), so each says
// it too, as the index does: without it the index is no use and the table
// is scanned (`tests::queries_by_device_seek_the_part_index`).
const _: () = assert!(STAGING_PARTS == 8, "the blocks index says device_id % 8");

/// A device's part in the blocks index: SQL's `device_id % 8`, which takes
/// the dividend's sign (SQLite and PostgreSQL alike), where the staging
/// part is `rem_euclid`. The two agree on every id the database hands out
/// (from 1); a statement given this part as a literal agrees with the
/// index on any id.
pub(super) fn index_part(device: i64) -> i64 {
    device % 8
}

/// A series' blocks of one level, oldest first: what a merge reads.
pub(super) const MERGE_SELECT: &str = "SELECT id, first_ts, data FROM blocks \
     WHERE device_id % 8 = $1 % 8 AND device_id = $1 AND sensor_id = $2 AND level = $3 \
     ORDER BY first_ts, id LIMIT $4";
/// A series' blocks that start before a cutoff: what retention reads.
pub(super) const RETAIN_SELECT: &str = "SELECT id, first_ts, level, last_ts, count, data \
     FROM blocks WHERE device_id % 8 = $1 % 8 AND device_id = $1 AND sensor_id = $2 \
     AND first_ts < $3 ORDER BY first_ts, id LIMIT $4";
/// A query's blocks created since its last page that sort at or before the
/// cursor.
pub(super) const PAGE_BEHIND: &str = "SELECT id, first_ts, last_ts, data FROM blocks \
     WHERE device_id % 8 = $1 % 8 AND device_id = $1 AND sensor_id = $2 AND first_ts < $4 \
     AND last_ts >= $3 AND first_ts <= $5 AND (first_ts, id) <= ($5, $6) AND id > $7 \
     ORDER BY first_ts, id";
/// A query's next page of blocks after the cursor.
pub(super) const PAGE_NEXT: &str = "SELECT id, first_ts, last_ts, data FROM blocks \
     WHERE device_id % 8 = $1 % 8 AND device_id = $1 AND sensor_id = $2 AND first_ts < $4 \
     AND last_ts >= $3 AND first_ts >= $5 AND (first_ts, id) > ($5, $6) \
     ORDER BY first_ts, id LIMIT $7";

pub type Series = (DeviceKey, SensorKey);

/// A block to insert.
#[derive(Debug)]
pub struct NewBlock {
    pub device: DeviceKey,
    pub sensor: SensorKey,
    pub level: u8,
    pub first_ts: i64,
    pub last_ts: i64,
    pub count: u32,
    pub data: Vec<u8>,
}

impl NewBlock {
    /// Encodes points sorted by (ts, seq), at least one.
    pub fn encode(series: Series, level: u8, points: &[Point]) -> Self {
        let level = if points.len() >= SEAL_POINTS {
            SEALED
        } else {
            level.min(SEALED)
        };
        Self {
            device: series.0,
            sensor: series.1,
            level,
            first_ts: points[0].ts_ms,
            last_ts: points[points.len() - 1].ts_ms,
            count: points.len() as u32,
            data: codec::encode(points),
        }
    }
}

/// Blocks of `level` holding `points` (sorted by (ts, seq)), one every
/// [`MAX_BLOCK_POINTS`].
fn blocks_from(series: Series, level: u8, points: &[Point]) -> impl Iterator<Item = NewBlock> {
    points
        .chunks(MAX_BLOCK_POINTS)
        .map(move |part| NewBlock::encode(series, level, part))
}

/// Level-0 blocks for staged rows: sorted, one block per series (split
/// every [`MAX_BLOCK_POINTS`]).
pub fn blocks_of(rows: &mut [RowToInsert]) -> Vec<NewBlock> {
    rows.sort_unstable_by_key(|r| (r.device, r.sensor, r.ts_ms, r.seq));
    let mut blocks = Vec::new();
    let mut points = Vec::new();
    for run in rows.chunk_by(|a, b| (a.device, a.sensor) == (b.device, b.sensor)) {
        points.clear();
        points.extend(run.iter().map(RowToInsert::point));
        blocks.extend(blocks_from((run[0].device, run[0].sensor), 0, &points));
    }
    blocks
}

/// What one merge did, for the writer's bookkeeping.
#[derive(Debug, Clone, Copy)]
pub struct Merged {
    pub series: Series,
    pub from_level: u8,
    /// Blocks of `from_level` found (all merged when ≥ 2).
    pub found: usize,
    /// The level of the new block (when ≥ 2 were merged).
    pub into: Option<u8>,
}

/// A stored block, as a query reads it.
#[derive(Debug)]
pub struct BlockRow {
    pub id: i64,
    pub first_ts: i64,
    pub last_ts: i64,
    pub data: Vec<u8>,
}

/// Where a query's block paging stands: blocks after (first_ts, id), and
/// every block newer than `high` (a merge or compaction since the last page
/// may have put readings not yet seen into a block that sorts earlier).
#[derive(Debug, Clone, Copy)]
pub struct BlockCursor {
    pub first_ts: i64,
    pub id: i64,
    pub high: i64,
}

impl BlockCursor {
    pub const START: Self = Self {
        first_ts: i64::MIN,
        id: i64::MIN,
        high: i64::MAX,
    };
}

impl WriteTx<'_> {
    /// Compaction of one staging part: inserts the blocks made of its rows
    /// (`rows`, sorted as [`blocks_of`] sorts them), adds them to the
    /// rollups and deletes them from its table: all of them, or with
    /// `front`, the table's first `rows.len()` rows (in the order they were
    /// staged), `front` being the last of those. If the table holds other
    /// rows than the writer encoded, nothing is changed (an error).
    async fn compact_staged(
        &mut self,
        part: usize,
        blocks: &[NewBlock],
        rows: &[RowToInsert],
        front: Option<&RowToInsert>,
    ) -> Result<(), StoreError> {
        let staged = rows.len() as u64;
        self.insert_blocks(blocks).await?;
        let everies = self.rollup_everies().await?;
        self.add_to_rollups(&rollups::rows_of_sorted(rows, &everies))
            .await?;
        let table = staging_table(part);
        let deleted = match front {
            // No WHERE: SQLite's truncate optimisation frees the pages at
            // once. (On PostgreSQL a DELETE, not a TRUNCATE: readers keep
            // reading.)
            None => {
                let sql = format!("DELETE FROM {table}");
                with_conn!(self.conn.conn(), c => {
                    sqlx::query(&sql).execute(c).await?.rows_affected()
                })
            }
            Some(last) => self.delete_front(&table, staged, last).await?,
        };
        if deleted != staged {
            return Err(StoreError::StagingChanged {
                expected: staged,
                found: deleted,
            });
        }
        Ok(())
    }

    /// SQLite: deletes the first `n` rows of a staging table, in rowid
    /// order, which is the order they were staged in (each multi-row
    /// insert appends at the largest rowid), if the n-th is `last`.
    /// Returns how many went (0 if the n-th row is another). A run of the
    /// table's first pages, freed whole: no page that stays is rewritten.
    async fn delete_front(
        &mut self,
        table: &str,
        n: u64,
        last: &RowToInsert,
    ) -> Result<u64, StoreError> {
        let Some(c) = self.conn.conn().sqlite() else {
            return Err(StoreError::NotOnPostgres(
                "a compaction of part of a staging table",
                "each compaction takes the whole table",
            ));
        };
        let sql = format!(
            "SELECT rowid, device_id, sensor_id, seq FROM {table} ORDER BY rowid LIMIT 1 OFFSET $1"
        );
        let nth: Option<(i64, i64, i64, i64)> = sqlx::query_as(&sql)
            .bind(n.saturating_sub(1) as i64)
            .fetch_optional(&mut *c)
            .await?;
        match nth {
            Some((rowid, device, sensor, seq))
                if (device, sensor, seq) == (last.device.0, last.sensor.0, last.seq) =>
            {
                let sql = format!("DELETE FROM {table} WHERE rowid <= $1");
                Ok(sqlx::query(&sql)
                    .bind(rowid)
                    .execute(&mut *c)
                    .await?
                    .rows_affected())
            }
            _ => Ok(0),
        }
    }

    /// Inserts blocks. On PostgreSQL their months' partitions are made
    /// first where this writer's cache does not know them; a month another
    /// hub's retention dropped since is a cache miss: the insert is rolled
    /// back to before it, the months made again, and it is tried once more.
    pub async fn insert_blocks(&mut self, blocks: &[NewBlock]) -> Result<(), StoreError> {
        if blocks.is_empty() {
            return Ok(());
        }
        if !self.shared() {
            return self.insert_blocks_once(blocks).await;
        }
        self.savepoint("SAVEPOINT insert_blocks").await?;
        match self.insert_blocks_once(blocks).await {
            Err(e) if super::partitions::is_missing_partition(&e) => {
                tracing::info!(
                    "a month of blocks was dropped since this hub made it; making it again"
                );
                self.savepoint("ROLLBACK TO SAVEPOINT insert_blocks")
                    .await?;
                self.forget_partitions(blocks.iter().map(|b| b.first_ts));
                self.insert_blocks_once(blocks).await?;
            }
            result => result?,
        }
        self.savepoint("RELEASE SAVEPOINT insert_blocks").await
    }

    async fn insert_blocks_once(&mut self, blocks: &[NewBlock]) -> Result<(), StoreError> {
        self.ensure_partitions(blocks.iter().map(|b| b.first_ts))
            .await?;
        self.execute_batched(Batched::Blocks, blocks, |b, out| {
            out.extend([
                Val::I(b.device.0),
                Val::I(b.sensor.0),
                Val::I(i64::from(b.level)),
                Val::I(b.first_ts),
                Val::I(b.last_ts),
                Val::I(i64::from(b.count)),
                Val::B(&b.data),
            ]);
        })
        .await
    }

    /// Merges one series' blocks of `level` (up to [`MAX_MERGE_BLOCKS`],
    /// oldest first) into one block: adds it to `merged_blocks`, and the blocks it
    /// replaces (id, first_ts) to `gone`.
    async fn merge_series(
        &mut self,
        series: Series,
        level: u8,
        merged_blocks: &mut Vec<NewBlock>,
        gone: &mut Vec<(i64, i64)>,
    ) -> Result<Merged, StoreError> {
        let sql = format!("{MERGE_SELECT}{}", self.lock_rows());
        let rows: Vec<(i64, i64, Vec<u8>)> = with_conn!(self.conn.conn(), c => sqlx::query_as(&sql)
        .bind(series.0.0)
        .bind(series.1.0)
        .bind(i64::from(level))
        .bind(MAX_MERGE_BLOCKS)
        .fetch_all(c)
        .await?);
        let mut merged = Merged {
            series,
            from_level: level,
            found: rows.len(),
            into: None,
        };
        if rows.len() < 2 {
            return Ok(merged);
        }
        let mut points = Vec::new();
        for (id, _, data) in &rows {
            if let Err(e) = codec::decode_into(data, &mut points) {
                // Left as it is (queries report it); the other series merge.
                tracing::error!(block = id, error = %e, "a stored block cannot be decoded; its series is not merged");
                merged.found = 0;
                return Ok(merged);
            }
        }
        points.sort_unstable_by_key(Point::key);
        let first = merged_blocks.len();
        merged_blocks.extend(blocks_from(series, level + 1, &points));
        merged.into = merged_blocks.get(first).map(|b| b.level);
        gone.extend(rows.iter().map(|(id, first_ts, _)| (*id, *first_ts)));
        Ok(merged)
    }

    /// Deletes one series' readings stamped before `cutoff_ms`, whole blocks
    /// first; a block that straddles the cutoff is rewritten with what stays.
    /// Stops before a block would take it past `limit` (the first block is
    /// always taken). Keeps the device's count true. Returns how many went
    /// and whether the series has nothing older than the cutoff left.
    pub async fn delete_old_readings(
        &mut self,
        device: DeviceKey,
        sensor: SensorKey,
        cutoff_ms: i64,
        limit: u32,
    ) -> Result<(u64, bool), StoreError> {
        let sql = format!("{RETAIN_SELECT}{}", self.lock_rows());
        let rows: Vec<(i64, i64, i64, i64, i64, Vec<u8>)> = with_conn!(self.conn.conn(), c => {
            sqlx::query_as(&sql)
            .bind(device.0)
            .bind(sensor.0)
            .bind(cutoff_ms)
            .bind(RETAIN_BLOCKS)
            .fetch_all(c)
            .await?
        });
        let mut done = rows.len() < RETAIN_BLOCKS as usize;
        let mut deleted = 0u64;
        let mut gone = Vec::new();
        let mut kept = Vec::new();
        for (id, first_ts, level, last_ts, count, data) in rows {
            if deleted > 0 && deleted + count as u64 > u64::from(limit) {
                done = false;
                break;
            }
            let points = if last_ts < cutoff_ms {
                None
            } else {
                match codec::decode(&data) {
                    Ok(points) => Some(points),
                    Err(e) => {
                        tracing::error!(block = id, error = %e, "a stored block cannot be decoded; retention leaves it");
                        continue;
                    }
                }
            };
            gone.push((id, first_ts));
            let Some(mut points) = points else {
                deleted += count as u64;
                continue;
            };
            let before = points.len();
            points.retain(|p| p.ts_ms >= cutoff_ms);
            deleted += (before - points.len()) as u64;
            if !points.is_empty() {
                kept.push(NewBlock::encode((device, sensor), level as u8, &points));
            }
        }
        self.delete_blocks(&gone).await?;
        self.insert_blocks(&kept).await?;
        if deleted > 0 {
            self.subtract_readings(device.0, deleted as i64).await?;
        }
        // Nothing deletable (only undecodable blocks left): done, or the
        // pass would come back to it forever.
        Ok((deleted, done || deleted == 0))
    }

    /// PostgreSQL: the blocks a merge or retention step reads are locked
    /// until it commits; another hub's step on the same series waits, then
    /// finds them gone, so no reading is merged or kept twice.
    fn lock_rows(&mut self) -> &'static str {
        match self.conn.backend() {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// Deletes blocks (id, first_ts) read under this transaction's lock,
    /// a bounded statement at a time; each must still be there, or the
    /// blocks that replace them would double their readings.
    async fn delete_blocks(&mut self, blocks: &[(i64, i64)]) -> Result<(), StoreError> {
        let mut blocks = blocks.to_vec();
        // By month first: a chunk's first_ts range then spans few partitions.
        blocks.sort_unstable_by_key(|&(id, first_ts)| (first_ts, id));
        // Powers of two: a few statement texts for the caches, not one per
        // length.
        for chunk in super::write::chunks(&blocks, DELETE_CHUNK) {
            // The first_ts range (the sorted chunk's ends) lets PostgreSQL
            // skip other months.
            let sql = format!(
                "DELETE FROM blocks WHERE first_ts BETWEEN $1 AND $2 AND id IN ({})",
                super::snapshot::params(2, chunk.len())
            );
            let (low, high) = (chunk[0].1, chunk[chunk.len() - 1].1);
            let deleted = with_conn!(self.conn.conn(), c => {
                let mut q = sqlx::query(&sql).bind(low).bind(high);
                for (id, _) in chunk {
                    q = q.bind(*id);
                }
                q.execute(c).await?.rows_affected()
            });
            if deleted != chunk.len() as u64 {
                return Err(StoreError::BlocksChanged {
                    expected: chunk.len() as u64,
                    found: deleted,
                });
            }
        }
        Ok(())
    }
}

impl StoreWriter {
    /// Every staged row, by part (the writer's copy of the staging tables).
    pub async fn staged_rows(&mut self) -> Result<Vec<Vec<RowToInsert>>, StoreError> {
        let mut parts = Vec::with_capacity(STAGING_PARTS);
        // SQLite: in the order they were staged (see `WriteTx::delete_front`).
        let order = match self.backend() {
            Backend::Sqlite => " ORDER BY rowid",
            Backend::Postgres => "",
        };
        for part in 0..STAGING_PARTS {
            let sql = format!(
                "SELECT device_id, sensor_id, ts_ms, seq, value FROM {}{order}",
                staging_table(part)
            );
            let rows: Vec<StagedRow> = with_conn!(self.conn().conn(), c => {
                sqlx::query_as(&sql).fetch_all(c).await?
            });
            parts.push(rows.into_iter().map(RowToInsert::from).collect());
        }
        Ok(parts)
    }

    /// Blocks below the sealed level, counted per series and level: what
    /// the writer merges.
    pub async fn open_blocks(&mut self) -> Result<Vec<(Series, u8, u32)>, StoreError> {
        let rows: Vec<(i64, i64, i64, i64)> = with_conn!(self.conn().conn(), c => {
            sqlx::query_as(
                "SELECT device_id, sensor_id, level, count(*) FROM blocks WHERE level < $1 \
                 GROUP BY device_id, sensor_id, level",
            )
            .bind(i64::from(SEALED))
            .fetch_all(c)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(|(d, s, level, n)| ((DeviceKey(d), SensorKey(s)), level as u8, n as u32))
            .collect())
    }

    /// Compacts one staging part in one transaction (see
    /// [`WriteTx::compact_staged`]): `blocks` are the part's `rows`,
    /// encoded.
    pub async fn compact(
        &mut self,
        part: usize,
        blocks: &[NewBlock],
        rows: &[RowToInsert],
    ) -> Result<(), StoreError> {
        self.compact_front(part, blocks, rows, None).await
    }

    /// SQLite: compacts the first `rows.len()` rows a staging part holds,
    /// `last` the last of them in staging order (see
    /// [`WriteTx::compact_staged`]); the part's other rows stay staged.
    /// With None, the whole part.
    pub async fn compact_front(
        &mut self,
        part: usize,
        blocks: &[NewBlock],
        rows: &[RowToInsert],
        last: Option<&RowToInsert>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        tx.lock_blocks().await?;
        tx.compact_staged(part, blocks, rows, last).await?;
        tx.commit().await
    }

    /// PostgreSQL's compaction of one staging part, in one transaction:
    /// takes every committed row of it (`DELETE … RETURNING`), whichever
    /// hub staged it, and inserts their blocks. Another hub compacting the
    /// same part at once waits for the rows this one took and finds them
    /// gone. The rows come back as one binary `COPY` stream
    /// (`store::pg_copy`). Returns the (series, level) of the blocks written.
    pub async fn compact_taking(&mut self, part: usize) -> Result<Vec<(Series, u8)>, StoreError> {
        let sql = format!(
            "COPY (DELETE FROM {} RETURNING {}) TO STDOUT (FORMAT binary)",
            staging_table(part),
            super::pg_copy::COLUMNS
        );
        let mut tx = self.begin().await?;
        tx.lock_blocks().await?;
        let mut rows = match super::pg_copy::copy_out(tx.conn.conn(), &sql).await {
            Ok(rows) => rows,
            Err(e) => {
                tx.conn.poison();
                return Err(e);
            }
        };
        let blocks = blocks_of(&mut rows);
        tx.insert_blocks(&blocks).await?;
        let everies = tx.rollup_everies().await?;
        tx.add_to_rollups(&rollups::rows_of_sorted(&rows, &everies))
            .await?;
        tx.commit().await?;
        Ok(blocks
            .iter()
            .map(|b| ((b.device, b.sensor), b.level))
            .collect())
    }

    /// Merges each (series, level) in one transaction.
    pub async fn merge(&mut self, jobs: &[(Series, u8)]) -> Result<Vec<Merged>, StoreError> {
        let mut tx = self.begin().await?;
        tx.lock_blocks().await?;
        let mut done = Vec::with_capacity(jobs.len());
        let mut merged = Vec::new();
        let mut gone = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(jobs.len());
        // A job twice in one step (a stale plan) would read its blocks
        // again before they are deleted.
        for &(series, level) in jobs.iter().filter(|job| seen.insert(**job)) {
            done.push(
                tx.merge_series(series, level, &mut merged, &mut gone)
                    .await?,
            );
        }
        // The step's new blocks in one batched insert and its old ones in
        // one delete: a statement per block made a step of 32 series ~320
        // round trips, which a group commit waited behind.
        tx.delete_blocks(&gone).await?;
        tx.insert_blocks(&merged).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Converts readings of the old clustered `readings` table into sealed
    /// blocks, a few series per transaction, then drops the table. Runs at
    /// start-up, before the hub serves; safe to interrupt (each step moves
    /// its readings in one transaction).
    pub async fn convert_legacy(&mut self) -> Result<u64, StoreError> {
        if self.conn().backend() != Backend::Sqlite {
            // PostgreSQL databases began with blocks.
            return Ok(0);
        }
        let exists: Option<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'readings'",
        )
        .fetch_optional(self.sqlite()?)
        .await?;
        if exists.is_none() {
            return Ok(0);
        }
        let mut converted = 0u64;
        loop {
            let next: Option<(i64, i64)> =
                sqlx::query_as("SELECT device_id, sensor_id FROM readings LIMIT 1")
                    .fetch_optional(self.sqlite()?)
                    .await?;
            let Some((device, sensor)) = next else { break };
            let series = (DeviceKey(device), SensorKey(sensor));
            // The series' oldest readings, a bounded run per transaction.
            let mut tx = self.begin().await?;
            let rows: Vec<(i64, i64, f64)> = sqlx::query_as(
                "SELECT ts_ms, seq, value FROM readings WHERE device_id = ? AND sensor_id = ? \
                 ORDER BY ts_ms, seq LIMIT ?",
            )
            .bind(device)
            .bind(sensor)
            .bind(LEGACY_RUN)
            .fetch_all(tx.sqlite()?)
            .await?;
            let points: Vec<Point> = rows
                .into_iter()
                .map(|(ts_ms, seq, value)| Point {
                    ts_ms,
                    seq: seq as u64,
                    value,
                })
                .collect();
            let Some(last) = points.last().copied() else {
                break;
            };
            let blocks: Vec<NewBlock> = blocks_from(series, SEALED, &points).collect();
            tx.insert_blocks(&blocks).await?;
            sqlx::query(
                "DELETE FROM readings WHERE device_id = ? AND sensor_id = ? AND (ts_ms, seq) <= (?, ?)",
            )
            .bind(device)
            .bind(sensor)
            .bind(last.ts_ms)
            .bind(last.seq as i64)
            .execute(tx.sqlite()?)
            .await?;
            tx.commit().await?;
            let before = converted;
            converted += points.len() as u64;
            if converted / 1_000_000 > before / 1_000_000 {
                tracing::info!(
                    converted,
                    "converting stored readings into compressed blocks"
                );
            }
        }
        sqlx::query("DROP TABLE readings")
            .execute(self.sqlite()?)
            .await?;
        Ok(converted)
    }
}

/// What the SQLite-only paths (the legacy conversion) answer on PostgreSQL.
fn not_sqlite() -> StoreError {
    StoreError::NotOnPostgres(
        "converting the old readings table",
        "PostgreSQL databases began with blocks",
    )
}

impl StoreWriter {
    /// The SQLite connection, for the legacy conversion (SQLite only).
    pub(super) fn sqlite(&mut self) -> Result<&mut sqlx::SqliteConnection, StoreError> {
        self.conn().conn().sqlite().ok_or_else(not_sqlite)
    }
}

impl WriteTx<'_> {
    fn sqlite(&mut self) -> Result<&mut sqlx::SqliteConnection, StoreError> {
        self.conn.conn().sqlite().ok_or_else(not_sqlite)
    }
}

impl Store {
    /// Up to `limit` blocks of one series that may hold readings in
    /// [since, until), after `cursor` (see [`BlockCursor`]), plus every block
    /// created since the last page that sorts before it, ordered by
    /// (first_ts, id); the cursor for the next page; whether the page was
    /// full (more may follow).
    pub async fn block_page(
        &self,
        series: Series,
        since_ms: i64,
        until_ms: i64,
        cursor: BlockCursor,
        limit: u32,
    ) -> Result<(Vec<BlockRow>, BlockCursor, bool), StoreError> {
        // One short read transaction: the two statements and the newest id
        // see the same table (PostgreSQL needs REPEATABLE READ for that;
        // a SQLite read transaction is a snapshot).
        let snapshot = self.read.backend() == Backend::Postgres;
        let (mut rows, page, high) = with_pool!(&self.read, pool, _Db => {
            let mut tx = pool.begin().await?;
            if snapshot {
                sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .execute(&mut *tx)
                    .await?;
            }
            // Blocks created since the last page that sort at or before the
            // cursor (a merge or compaction put readings there): all of them.
            let rows: Vec<(i64, i64, i64, Vec<u8>)> = sqlx::query_as(PAGE_BEHIND)
            .bind(series.0.0)
            .bind(series.1.0)
            .bind(since_ms)
            .bind(until_ms)
            .bind(cursor.first_ts)
            .bind(cursor.id)
            .bind(cursor.high)
            .fetch_all(&mut *tx)
            .await?;
            let page: Vec<(i64, i64, i64, Vec<u8>)> = sqlx::query_as(PAGE_NEXT)
            .bind(series.0.0)
            .bind(series.1.0)
            .bind(since_ms)
            .bind(until_ms)
            .bind(cursor.first_ts)
            .bind(cursor.id)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
            let high: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM blocks")
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            (rows, page, high)
        });
        let full = page.len() >= limit as usize;
        rows.extend(page);
        let mut next = cursor;
        next.high = high.unwrap_or(0);
        let mut blocks = Vec::with_capacity(rows.len());
        for (id, first_ts, last_ts, data) in rows {
            if (first_ts, id) > (next.first_ts, next.id) {
                (next.first_ts, next.id) = (first_ts, id);
            }
            blocks.push(BlockRow {
                id,
                first_ts,
                last_ts,
                data,
            });
        }
        Ok((blocks, next, full))
    }

    /// Bytes and readings in blocks, for `hub stats`.
    pub async fn block_totals(&self) -> Result<(u64, u64, u64), StoreError> {
        let (blocks, readings, bytes): (i64, Option<i64>, Option<i64>) = with_pool!(&self.read, pool, _Db => {
            sqlx::query_as(
                "SELECT count(*), CAST(sum(count) AS BIGINT), \
                 CAST(sum(length(data)) AS BIGINT) FROM blocks",
            )
            .fetch_one(pool)
            .await?
        });
        Ok((
            blocks as u64,
            readings.unwrap_or(0) as u64,
            bytes.unwrap_or(0) as u64,
        ))
    }
}

/// Which merges the writer should run: per series, the open blocks of each
/// level. A hint kept in memory (loaded from the store at start and after
/// a failure, then counted up by compactions and merges); a merge checks
/// the real count, so a hint that is too high costs one lookup.
#[derive(Default)]
pub struct MergePlan {
    open: HashMap<Series, [u32; SEALED as usize]>,
    due: std::collections::VecDeque<(Series, u8)>,
}

impl MergePlan {
    pub fn load(rows: Vec<(Series, u8, u32)>) -> Self {
        let mut plan = Self::default();
        for (series, level, n) in rows {
            plan.add(series, level, n);
        }
        plan
    }

    pub fn add(&mut self, series: Series, level: u8, n: u32) {
        if level >= SEALED {
            return;
        }
        let slot = &mut self.open.entry(series).or_default()[level as usize];
        let before = *slot;
        *slot += n;
        if before < FANIN as u32 && *slot >= FANIN as u32 {
            self.due.push_back((series, level));
        }
    }

    pub fn is_due(&self) -> bool {
        !self.due.is_empty()
    }

    /// Up to `n` merges to run next.
    pub fn next(&self, n: usize) -> Vec<(Series, u8)> {
        self.due.iter().take(n).copied().collect()
    }

    /// After their transaction committed.
    pub fn done(&mut self, merged: &[Merged]) {
        for m in merged {
            if self
                .due
                .front()
                .is_some_and(|d| *d == (m.series, m.from_level))
            {
                self.due.pop_front();
            }
            if let Some(open) = self.open.get_mut(&m.series) {
                open[m.from_level as usize] = 0;
            }
            if let Some(level) = m.into {
                self.add(m.series, level, 1);
            }
            if self
                .open
                .get(&m.series)
                .is_some_and(|o| o.iter().all(|n| *n == 0))
            {
                self.open.remove(&m.series);
            }
        }
    }

    pub fn series(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeviceProgress, STAGING_PARTS, staging_part};

    const SERIES: Series = (DeviceKey(3), SensorKey(1));

    /// A new SQLite store with default settings in a temp dir (kept as
    /// long as the dir is).
    async fn sqlite_store() -> (tempfile::TempDir, Store, StoreWriter) {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::config::Settings::defaults().unwrap().storage;
        settings.path = dir.path().join("hub.db");
        let (store, writer) = crate::store::open(&settings).await.unwrap();
        (dir, store, writer)
    }

    /// Stages `n` full-precision readings of SERIES from seq `from`.
    async fn stage(writer: &mut StoreWriter, from: i64, n: i64) {
        let mut parts = vec![Vec::new(); STAGING_PARTS];
        parts[staging_part(SERIES.0)] = (from..from + n)
            .map(|seq| RowToInsert {
                device: SERIES.0,
                sensor: SERIES.1,
                ts_ms: 1_700_000_000_000 + seq * 1000,
                seq,
                // Noise in every mantissa bit: ~8 bytes a point encoded,
                // so new blocks need new pages (not a page's slack).
                value: f64::from_bits(
                    0x3ff0_0000_0000_0000
                        | ((seq as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 12),
                ),
            })
            .collect();
        let mut tx = writer.begin().await.unwrap();
        tx.insert_readings(&parts).await.unwrap();
        tx.commit().await.unwrap();
    }

    /// Encodes the series' part into blocks and empties it.
    async fn compact(writer: &mut StoreWriter) -> Result<(), StoreError> {
        let part = staging_part(SERIES.0);
        let mut rows = writer.staged_rows().await?.swap_remove(part);
        let blocks = blocks_of(&mut rows);
        writer.compact(part, &blocks, &rows).await
    }

    /// Every seq stored for SERIES, staged or in blocks, sorted.
    async fn stored(writer: &mut StoreWriter) -> Vec<u64> {
        let blocks: Vec<Vec<u8>> = sqlx::query_scalar("SELECT data FROM blocks")
            .fetch_all(writer.sqlite().unwrap())
            .await
            .unwrap();
        let mut seqs: Vec<u64> = blocks
            .iter()
            .flat_map(|b| codec::decode(b).unwrap())
            .map(|p| p.seq)
            .collect();
        let staged = writer.staged_rows().await.unwrap();
        seqs.extend(staged.iter().flatten().map(|r| r.seq as u64));
        seqs.sort_unstable();
        seqs
    }

    async fn pragma(writer: &mut StoreWriter, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(writer.sqlite().unwrap())
            .await
            .unwrap()
    }

    /// Every statement that seeks blocks by device names the part as the
    /// blocks index does (migration 13): SQLite seeks the index by part,
    /// device and sensor, never scans the table, and needs no sort for an
    /// ORDER BY. Without the part a statement still works, on a scan.
    #[tokio::test]
    async fn queries_by_device_seek_the_part_index() {
        let (_dir, _store, mut writer) = sqlite_store().await;
        // The part a statement is given as a literal is the one SQL computes.
        for id in [-17, -8, -3, 1, 3, 8, 9, 1_000_003] {
            let sql_part: i64 = sqlx::query_scalar("SELECT $1 % 8")
                .bind(id)
                .fetch_one(writer.sqlite().unwrap())
                .await
                .unwrap();
            assert_eq!(index_part(id), sql_part, "{id}");
        }
        let series = "(<expr>=? AND device_id=? AND sensor_id=?";
        let statements = [
            (MERGE_SELECT.to_string(), series),
            (RETAIN_SELECT.into(), series),
            (PAGE_BEHIND.into(), series),
            (PAGE_NEXT.into(), series),
            (rollups::BUILD_SELECT.into(), series),
            (crate::store::SERIES_OLDER_THAN.into(), series),
            (crate::store::snapshot::blocks_sql(3, 4), series),
            (
                crate::store::alarms::latest_ts_sql(Backend::Sqlite, &[1, 5], &[1, 5]),
                "(<expr>=? AND device_id=?)",
            ),
        ];
        for (sql, seek) in statements {
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .fetch_all(writer.sqlite().unwrap())
                    .await
                    .unwrap();
            let plan: Vec<String> = plan.into_iter().map(|row| row.3).collect();
            let seeks: Vec<&String> = plan
                .iter()
                .filter(|l| l.contains("blocks_series"))
                .collect();
            assert!(!seeks.is_empty(), "{sql}\n{plan:#?}");
            for line in seeks {
                assert!(line.contains(seek), "{sql}\n{plan:#?}");
            }
            let scans = plan.iter().filter(|l| {
                let words: Vec<&str> = l.split_whitespace().take(2).collect();
                words == ["SCAN", "blocks"] || words == ["SCAN", "b"]
            });
            assert_eq!(scans.count(), 0, "{sql}\n{plan:#?}");
            // (Ties of first_ts are sorted by id apart: "FOR LAST TERM".)
            let sorted = plan.iter().any(|l| l == "USE TEMP B-TREE FOR ORDER BY");
            assert!(!sorted, "{sql}\n{plan:#?}");
        }
    }

    /// At the size limit a compaction fails whole (SQLITE_FULL): the staged
    /// rows are all still there, and it succeeds once there is room. A
    /// merge needs no new pages (it frees its input's first).
    #[tokio::test]
    async fn a_compaction_at_the_size_limit_changes_nothing_and_a_merge_fits_in_its_own_pages() {
        let (_dir, _store, mut writer) = sqlite_store().await;
        // Eight level-0 blocks (a merge is due), then 3,000 more staged.
        for run in 0..FANIN as i64 {
            stage(&mut writer, 1 + run * 500, 500).await;
            compact(&mut writer).await.unwrap();
        }
        stage(&mut writer, 4001, 3000).await;
        let all: Vec<u64> = (1..=7000).collect();
        assert_eq!(stored(&mut writer).await, all);

        // No free page left, and the file may not grow.
        sqlx::query("VACUUM")
            .execute(writer.sqlite().unwrap())
            .await
            .unwrap();
        assert_eq!(pragma(&mut writer, "PRAGMA freelist_count").await, 0);
        let pages = pragma(&mut writer, "PRAGMA page_count").await;
        pragma(&mut writer, &format!("PRAGMA max_page_count = {pages}")).await;

        let full = compact(&mut writer).await.unwrap_err();
        assert!(full.to_string().contains("full"), "{full}");
        writer.abort().await;
        assert_eq!(stored(&mut writer).await, all, "nothing lost or doubled");
        let level0 = "SELECT count(*) FROM blocks WHERE level = 0";
        assert_eq!(pragma(&mut writer, level0).await, FANIN as i64);
        // A merge deletes its blocks before it writes theirs: the one block
        // fits in the pages the eight leave.
        let merged = writer.merge(&[(SERIES, 0)]).await.unwrap();
        assert_eq!(merged.len(), 1);
        assert_eq!(pragma(&mut writer, "PRAGMA page_count").await, pages);
        assert_eq!(stored(&mut writer).await, all, "nothing lost or doubled");
        assert_eq!(pragma(&mut writer, level0).await, 0);

        pragma(&mut writer, "PRAGMA max_page_count = 1000000").await;
        compact(&mut writer).await.unwrap();
        assert_eq!(stored(&mut writer).await, all, "nothing lost or doubled");
        assert_eq!(pragma(&mut writer, level0).await, 1, "the new run");
        let staged = writer.staged_rows().await.unwrap();
        assert!(staged.iter().all(Vec::is_empty));
    }

    /// Retention at the database's size limit, with progress marks of 2000
    /// devices logged and not yet folded: folding them first would update
    /// `devices` in place, growing its rows (counts, times) into pages the
    /// database cannot have. Retention instead deletes blocks first, then
    /// appends what it subtracted to the log, in the pages it freed. Counts
    /// are exact before the fold and after it, and floored at 0.
    #[tokio::test]
    async fn retention_at_the_size_limit_logs_what_it_subtracts_and_needs_no_fold() {
        let (_dir, store, mut writer) = sqlite_store().await;
        sqlx::query(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 2000) \
             INSERT INTO devices (id, external_id, first_seen_ms, last_seen_ms) \
             SELECT i, 'd' || i, 1, 1 FROM c",
        )
        .execute(writer.sqlite().unwrap())
        .await
        .unwrap();
        for run in 0..2 {
            stage(&mut writer, run * 4000, 4000).await;
            compact(&mut writer).await.unwrap();
        }
        let progress: Vec<DeviceProgress> = (1..=2000)
            .map(|d| DeviceProgress {
                device: DeviceKey(d),
                acked_seq: if d == SERIES.0.0 { 8000 } else { 100_000 },
                added: if d == SERIES.0.0 { 8000 } else { 100_000 },
            })
            .collect();
        let mut tx = writer.begin().await.unwrap();
        tx.record_progress(&progress, 1_700_000_009_000)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        // Full: no free page, none to add.
        sqlx::query("CREATE TABLE pad (b BLOB)")
            .execute(writer.sqlite().unwrap())
            .await
            .unwrap();
        while pragma(&mut writer, "PRAGMA freelist_count").await > 0 {
            sqlx::query("INSERT INTO pad VALUES (zeroblob(1000))")
                .execute(writer.sqlite().unwrap())
                .await
                .unwrap();
        }
        let pages = pragma(&mut writer, "PRAGMA page_count").await;
        pragma(&mut writer, &format!("PRAGMA max_page_count = {pages}")).await;
        let count = async |store: &Store| {
            store
                .find_device(&format!("d{}", SERIES.0.0))
                .await
                .unwrap()
                .unwrap()
                .readings
        };

        // What retention did first before (and what a group owing a fold
        // still does, see `Known::fold_first`) cannot be done here.
        let full = writer.fold_progress(None).await.unwrap_err();
        assert!(full.to_string().contains("full"), "{full}");
        writer.abort().await;
        assert_eq!(count(&store).await, 8000);

        // The first run's readings are older than the cutoff.
        let cutoff = 1_700_000_000_000 + 4000 * 1000;
        let mut tx = writer.begin().await.unwrap();
        let (deleted, _) = tx
            .delete_old_readings(SERIES.0, SERIES.1, cutoff, 100_000)
            .await
            .unwrap();
        assert_eq!(tx.logged().iter().sum::<u64>(), 1, "one log row");
        tx.commit().await.unwrap();
        assert_eq!(deleted, 4000);
        assert_eq!(count(&store).await, 4000, "exact before the fold");
        assert_eq!(store.total_readings().await.unwrap(), 1999 * 100_000 + 4000);
        assert_eq!(stored(&mut writer).await, (4000..8000).collect::<Vec<_>>());

        // With room, the fold moves the exact counts into the table.
        pragma(&mut writer, "PRAGMA max_page_count = 1000000").await;
        // Two log rows: the commit's 2000 marks (one slice), retention's.
        assert_eq!(writer.fold_progress(None).await.unwrap(), 2);
        let table = "SELECT reading_count FROM devices WHERE id = 3";
        assert_eq!(pragma(&mut writer, table).await, 4000);
        assert_eq!(count(&store).await, 4000);

        // A count is never negative, logged or folded.
        let mut tx = writer.begin().await.unwrap();
        tx.subtract_readings(SERIES.0.0, 5000).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count(&store).await, 0);
        writer.fold_progress(None).await.unwrap();
        assert_eq!(pragma(&mut writer, table).await, 0);
        assert_eq!(
            pragma(&mut writer, "SELECT acked_seq FROM devices WHERE id = 3").await,
            8000
        );
    }

    /// A compaction of a part's oldest rows takes exactly those, in the
    /// order they were staged over several commits, and leaves the rest
    /// staged; told a wrong last row, it changes nothing.
    #[tokio::test]
    async fn compacting_the_front_of_a_part_takes_exactly_its_oldest_rows() {
        let (_dir, _store, mut writer) = sqlite_store().await;
        let part = staging_part(SERIES.0);
        stage(&mut writer, 0, 100).await;
        stage(&mut writer, 100, 100).await;
        let all: Vec<u64> = (0..200).collect();
        let staged = writer.staged_rows().await.unwrap().swap_remove(part);
        let seqs = |rows: &[RowToInsert]| rows.iter().map(|r| r.seq as u64).collect::<Vec<_>>();
        assert_eq!(seqs(&staged), all, "in the order staged");

        let mut front = staged[..150].to_vec();
        let last = front[149];
        let blocks = blocks_of(&mut front);
        writer
            .compact_front(part, &blocks, &front, Some(&last))
            .await
            .unwrap();
        assert_eq!(stored(&mut writer).await, all, "nothing lost or doubled");
        let rest = writer.staged_rows().await.unwrap().swap_remove(part);
        assert_eq!(seqs(&rest), (150..200).collect::<Vec<_>>());

        // 20 rows whose last is not the 20th staged: refused, nothing changed.
        let mut front = rest[..20].to_vec();
        let blocks = blocks_of(&mut front);
        let err = writer
            .compact_front(part, &blocks, &front, Some(&rest[25]))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::StagingChanged { .. }), "{err}");
        writer.abort().await;
        assert_eq!(stored(&mut writer).await, all, "nothing lost or doubled");
        let again = writer.staged_rows().await.unwrap().swap_remove(part);
        assert_eq!(seqs(&again), seqs(&rest));

        // Rows staged after a front was taken come after the rest.
        stage(&mut writer, 200, 10).await;
        let staged = writer.staged_rows().await.unwrap().swap_remove(part);
        assert_eq!(seqs(&staged), (150..210).collect::<Vec<_>>());
        compact(&mut writer).await.unwrap();
        let all: Vec<u64> = (0..210).collect();
        assert_eq!(stored(&mut writer).await, all);
        assert!(
            writer
                .staged_rows()
                .await
                .unwrap()
                .iter()
                .all(Vec::is_empty)
        );
    }
}
