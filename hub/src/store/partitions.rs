//! PostgreSQL: `blocks` is partitioned by month of `first_ts` (native
//! declarative partitioning). This month's and the next are made ahead by
//! each hub's heartbeat task; an older month is made when its first block
//! is written, inside that transaction (block writers hold one advisory
//! lock, so hubs do not race to make it). Retention drops a whole month
//! once every block in it is older than the cutoff.
//! Readings are stamped from 2000 on (`domain::MIN_TS_MS`), so there are at
//! most a dozen partitions a year.

use std::collections::HashSet;

use super::db::{Conn, Pool};
use super::write::{BLOCKS_LOCK, WriteTx};
use super::{Store, StoreError};

const DAY_MS: i64 = 86_400_000;

/// Months since 0000-03 style civil arithmetic (Howard Hinnant's
/// algorithms): the month a time falls in, as `year * 12 + month - 1`.
pub fn month_of(ts_ms: i64) -> i64 {
    let z = ts_ms.div_euclid(DAY_MS) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    year * 12 + month - 1
}

/// The first ms of month `index` (see [`month_of`]).
pub fn month_start_ms(index: i64) -> i64 {
    let (mut year, month) = (index.div_euclid(12), index.rem_euclid(12) + 1);
    if month <= 2 {
        year -= 1;
    }
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * DAY_MS
}

/// `blocks_p202611` for November 2026.
fn partition_name(index: i64) -> String {
    format!(
        "blocks_p{:04}{:02}",
        index.div_euclid(12),
        index.rem_euclid(12) + 1
    )
}

fn parse_partition(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("blocks_p")?;
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i64 = digits[..4].parse().ok()?;
    let month: i64 = digits[4..].parse().ok()?;
    (1..=12).contains(&month).then_some(year * 12 + month - 1)
}

/// The statement that makes month `month`'s partition (if it is not there).
fn create_sql(month: i64) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF blocks FOR VALUES FROM ({}) TO ({})",
        partition_name(month),
        month_start_ms(month),
        month_start_ms(month + 1)
    )
}

/// PostgreSQL's answer to a row whose month has no partition: SQLSTATE
/// 23514 (check_violation) naming no constraint, "no partition of relation
/// ... found for row" in English (the text depends on lc_messages).
pub(super) fn is_missing_partition(e: &StoreError) -> bool {
    let StoreError::Sqlx(sqlx::Error::Database(db)) = e else {
        return false;
    };
    db.code().as_deref() == Some("23514") && db.constraint().is_none()
}

impl WriteTx<'_> {
    /// Forgets that the months of `first_ts` have partitions (one was
    /// dropped by another hub): they are made again before the next insert.
    pub(super) fn forget_partitions(&mut self, first_ts: impl Iterator<Item = i64>) {
        for month in first_ts.map(month_of) {
            self.partitions.remove(&month);
        }
    }

    /// A SAVEPOINT statement (PostgreSQL), not prepared.
    pub(super) async fn savepoint(&mut self, sql: &str) -> Result<(), StoreError> {
        if let Conn::Postgres(c) = self.conn.conn() {
            sqlx::query(sql).persistent(false).execute(&mut *c).await?;
        }
        Ok(())
    }

    /// PostgreSQL: makes sure the months of `first_ts` have partitions
    /// (`self.partitions` caches those this writer made or saw; it is
    /// cleared when a transaction fails, since the DDL is rolled back too).
    /// This month's and the next are normally made ahead
    /// ([`Store::prepare_partitions`]); this is for older readings.
    pub(super) async fn ensure_partitions(
        &mut self,
        first_ts: impl Iterator<Item = i64>,
    ) -> Result<(), StoreError> {
        let Conn::Postgres(c) = self.conn.conn() else {
            return Ok(());
        };
        let months: HashSet<i64> = first_ts.map(month_of).collect();
        for month in months {
            if self.partitions.contains(&month) {
                continue;
            }
            sqlx::query(&create_sql(month))
                .persistent(false)
                .execute(&mut *c)
                .await?;
            self.partitions.insert(month);
        }
        Ok(())
    }
}

impl Store {
    /// PostgreSQL: makes this month's and next month's partitions, in a
    /// short transaction of its own (making a partition locks `blocks` for
    /// a moment), so the writer's compactions never have to. It holds the
    /// block writers' lock: `IF NOT EXISTS` alone does not stop two hubs
    /// starting together from both creating the table. Nothing on SQLite.
    pub async fn prepare_partitions(&self, now_ms: i64) -> Result<(), StoreError> {
        let Pool::Postgres(pool) = &self.read else {
            return Ok(());
        };
        let month = month_of(now_ms);
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(BLOCKS_LOCK)
            .execute(&mut *tx)
            .await?;
        for m in [month, month + 1] {
            sqlx::query(&create_sql(m))
                .persistent(false)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// PostgreSQL retention: drops every monthly partition that ends by
    /// `cutoff_ms` and holds no block reaching past it, one transaction
    /// each, keeping the devices' counts true. Returns how many readings
    /// went. It runs beside ingest, not in a writer group: it takes the
    /// block writers' lock, then the devices' rows in key order, then drops
    /// the month (which locks `blocks` for a moment); it waits at most a
    /// second for a lock and otherwise leaves the month to the next pass.
    /// Blocks that straddle the cutoff go the per-series way.
    pub async fn drop_old_partitions(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        let Pool::Postgres(pool) = &self.read else {
            return Ok(0);
        };
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::TEXT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'blocks'::regclass",
        )
        .fetch_all(pool)
        .await?;
        let mut deleted = 0u64;
        for name in names {
            let Some(month) = parse_partition(&name) else {
                continue;
            };
            if month_start_ms(month + 1) > cutoff_ms {
                continue;
            }
            let mut tx = pool.begin().await?;
            sqlx::query("SET LOCAL lock_timeout = '1s'")
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(BLOCKS_LOCK)
                .execute(&mut *tx)
                .await?;
            let newest: Option<i64> =
                sqlx::query_scalar(&format!("SELECT max(last_ts) FROM {name}"))
                    .persistent(false)
                    .fetch_one(&mut *tx)
                    .await?;
            if newest.is_some_and(|t| t >= cutoff_ms) {
                continue;
            }
            let counts: Vec<(i64, i64)> = sqlx::query_as(&format!(
                "SELECT device_id, CAST(sum(count) AS BIGINT) FROM {name} \
                 GROUP BY device_id ORDER BY device_id"
            ))
            .persistent(false)
            .fetch_all(&mut *tx)
            .await?;
            let (devices, readings): (Vec<i64>, Vec<i64>) = counts.into_iter().unzip();
            sqlx::query("SELECT id FROM devices WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                .bind(&devices)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE devices SET reading_count = CASE WHEN reading_count > v.n \
                 THEN reading_count - v.n ELSE 0 END \
                 FROM (SELECT unnest($1::BIGINT[]) AS id, unnest($2::BIGINT[]) AS n) v \
                 WHERE devices.id = v.id",
            )
            .bind(&devices)
            .bind(&readings)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!("DROP TABLE {name}"))
                .persistent(false)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            let n: u64 = readings.iter().map(|&n| n.max(0) as u64).sum();
            deleted += n;
            tracing::info!(
                partition = name,
                readings = n,
                "retention dropped a month of blocks"
            );
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_their_starts() {
        // 2026-11-26T12:00:00Z
        let t = 1_795_694_400_000;
        let m = month_of(t);
        assert_eq!(partition_name(m), "blocks_p202611");
        assert_eq!(month_start_ms(m), 1_793_491_200_000, "2026-11-01T00:00Z");
        assert_eq!(
            month_start_ms(m + 1),
            1_796_083_200_000,
            "2026-12-01T00:00Z"
        );
        assert_eq!(partition_name(m + 2), "blocks_p202701");
        assert_eq!(month_of(0), 1970 * 12);
        assert_eq!(month_of(-1), 1969 * 12 + 11);
        assert_eq!(month_of(month_start_ms(m) - 1), m - 1);
        assert_eq!(parse_partition("blocks_p202611"), Some(m));
        assert_eq!(parse_partition("blocks_other"), None);
        // Every month start from 2000 to 2100 maps back to its month.
        for month in 2000 * 12..2100 * 12 {
            assert_eq!(month_of(month_start_ms(month)), month);
            assert_eq!(month_of(month_start_ms(month + 1) - 1), month);
        }
    }
}
