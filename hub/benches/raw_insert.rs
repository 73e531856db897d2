//! The baseline the hub is measured against: a raw sqlx insert of the same
//! rows (device, sensor, ts, seq, value) into a plain SQLite table with the
//! hub's file settings (WAL, synchronous FULL), 1024-row INSERTs, one
//! transaction per ROWS_PER_COMMIT. No network, no sessions, no dedupe, no
//! index, no compression: the cheapest honest way to put the rows on disk.
//!
//! `cargo bench -p hub --bench raw_insert`; env knobs: ROWS_PER_COMMIT
//! (4000), TOTAL_ROWS (3000000), DEVICES (1000). Prints one line of
//! figures; `scripts/bench.sh` runs it beside the end-to-end runs.

use std::str::FromStr;
use std::time::Instant;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const CHUNK: usize = 1024;

/// One INSERT of `n` rows.
fn insert_sql(n: usize) -> String {
    let mut sql = String::from("INSERT INTO raw VALUES ");
    for i in 0..n {
        sql.push_str(if i == 0 {
            "(?,?,?,?,?)"
        } else {
            ",(?,?,?,?,?)"
        });
    }
    sql
}

fn main() {
    let rows_per_commit = env_or("ROWS_PER_COMMIT", 4000) as usize;
    let total = env_or("TOTAL_ROWS", 3_000_000) as usize;
    let devices = env_or("DEVICES", 1000) as i64;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("raw.db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut conn = SqliteConnectOptions::from_str("sqlite:")
            .expect("options")
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .connect()
            .await
            .expect("open");
        sqlx::query(
            "CREATE TABLE raw (device_id INTEGER NOT NULL, sensor_id INTEGER NOT NULL, \
             ts_ms INTEGER NOT NULL, seq INTEGER NOT NULL, value REAL NOT NULL)",
        )
        .execute(&mut conn)
        .await
        .expect("create");
        let full = insert_sql(CHUNK);
        // The rows the simulator would send: devices interleaved, four
        // sensors each, quantized values.
        let base_ts = 1_767_225_600_000i64;
        let row = |n: usize| {
            let n = n as i64;
            let (device, k) = (n % devices, n / devices);
            (device, k % 4, base_ts + k * 10, k + 1, ((k % 500) as f64) / 100.0)
        };
        let started = Instant::now();
        let mut written = 0usize;
        while written < total {
            let mut tx = conn.begin().await.expect("begin");
            let end = (written + rows_per_commit).min(total);
            let mut at = written;
            while at < end {
                let n = CHUNK.min(end - at);
                let stmt = if n == CHUNK {
                    full.clone()
                } else {
                    insert_sql(n)
                };
                let mut q = sqlx::query(&stmt);
                for i in at..at + n {
                    let (d, s, ts, seq, v) = row(i);
                    q = q.bind(d).bind(s).bind(ts).bind(seq).bind(v);
                }
                q.execute(&mut *tx).await.expect("insert");
                at += n;
            }
            tx.commit().await.expect("commit");
            written = end;
        }
        let secs = started.elapsed().as_secs_f64();
        drop(conn);
        let bytes: u64 = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        println!(
            "raw_insert rows {total} rows_per_commit {rows_per_commit} rows_per_s {:.0} bytes_per_reading {:.1}",
            total as f64 / secs,
            bytes as f64 / total as f64
        );
    });
}
