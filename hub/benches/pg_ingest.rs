//! Groundwork for PostgreSQL storage (issue 12): how fast the machine's
//! PostgreSQL takes the hub's rows, written three ways, and what the
//! hub's compressed block layout saves there. Each method writes the same
//! rows (device, sensor, seq, ts, value) into a table partitioned by day
//! (native declarative partitioning) with the index queries need
//! (device, sensor, ts), in transactions of ROWS_PER_COMMIT rows, each
//! committed (synchronous_commit on, as an ack needs):
//!
//! - multi-row INSERT, 1000 rows per statement (5 binds a row);
//! - INSERT … SELECT FROM UNNEST of 5 arrays, one statement per commit;
//! - COPY FROM STDIN (text), one per commit; then the same from 2 and 4
//!   connections at once, each with its share of the devices;
//! - blocks: every series' rows encoded by `store::codec` (as compaction
//!   does), one row per block, written with COPY (binary data as hex).
//!
//! `cargo bench -p hub --bench pg_ingest`; env: PG_URL
//! (postgres://postgres@127.0.0.1:5432/test), TOTAL_ROWS (1000000),
//! DEVICES (1000), ROWS_PER_COMMIT (10000). Works in a schema of its own,
//! dropped at the end. Without a reachable PostgreSQL it says SKIPPED
//! (and fails under HUB_TEST_REQUIRE_ALL=1).

use std::fmt::Write as _;
use std::time::Instant;

use hub::store::codec::{self, Point};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, QueryBuilder};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const SENSORS: i64 = 4;
const DAY_MS: i64 = 86_400_000;
const BASE_MS: i64 = 1_790_000_000_000 - 1_790_000_000_000 % DAY_MS;

#[derive(Clone, Copy)]
struct Row {
    device: i32,
    sensor: i32,
    seq: i64,
    ts_ms: i64,
    value: f64,
}

/// Rows as a fleet sends them: each device's readings in seq order,
/// devices interleaved, values at a sensor's resolution (0.01).
fn rows(total: usize, devices: i64) -> Vec<Row> {
    (0..total as i64)
        .map(|i| {
            let device = i % devices;
            let n = i / devices;
            let sensor = n % SENSORS;
            let value = 20.0 + ((n * 7 + device) % 500) as f64 / 100.0;
            Row {
                device: device as i32,
                sensor: sensor as i32,
                seq: n + 1,
                ts_ms: BASE_MS + n * 250,
                value,
            }
        })
        .collect()
}

async fn reset(conn: &mut PgConnection, table: &str, columns: &str, key: &str) {
    for sql in [
        format!("DROP TABLE IF EXISTS {table}"),
        format!("CREATE TABLE {table} ({columns}) PARTITION BY RANGE ({key})"),
        format!(
            "CREATE TABLE {table}_d0 PARTITION OF {table} FOR VALUES FROM ({}) TO ({})",
            BASE_MS - DAY_MS,
            BASE_MS
        ),
        format!(
            "CREATE TABLE {table}_d1 PARTITION OF {table} FOR VALUES FROM ({}) TO ({})",
            BASE_MS,
            BASE_MS + DAY_MS
        ),
        format!(
            "CREATE TABLE {table}_d2 PARTITION OF {table} FOR VALUES FROM ({}) TO ({})",
            BASE_MS + DAY_MS,
            BASE_MS + 2 * DAY_MS
        ),
        format!("CREATE TABLE {table}_rest PARTITION OF {table} DEFAULT"),
    ] {
        sqlx::query(&sql).execute(&mut *conn).await.expect(&sql);
    }
}

const ROW_COLUMNS: &str = "device_id integer NOT NULL, sensor_id integer NOT NULL, \
    seq bigint NOT NULL, ts_ms bigint NOT NULL, value double precision NOT NULL";

async fn reset_rows(conn: &mut PgConnection) {
    reset(conn, "readings", ROW_COLUMNS, "ts_ms").await;
    sqlx::query("CREATE INDEX ON readings (device_id, sensor_id, ts_ms)")
        .execute(&mut *conn)
        .await
        .expect("index");
}

/// Bytes of a partitioned table: its partitions with their indexes and
/// TOAST.
async fn table_bytes(conn: &mut PgConnection, table: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(pg_total_relation_size(inhrelid)), 0)::bigint \
         FROM pg_inherits WHERE inhparent = $1::regclass",
    )
    .bind(table)
    .fetch_one(&mut *conn)
    .await
    .expect("size")
}

async fn multirow(conn: &mut PgConnection, commit: &[Row]) {
    let mut tx = conn.begin().await.expect("begin");
    for chunk in commit.chunks(1000) {
        let mut q =
            QueryBuilder::new("INSERT INTO readings (device_id, sensor_id, seq, ts_ms, value) ");
        q.push_values(chunk, |mut b, r| {
            b.push_bind(r.device)
                .push_bind(r.sensor)
                .push_bind(r.seq)
                .push_bind(r.ts_ms)
                .push_bind(r.value);
        });
        q.build().execute(&mut *tx).await.expect("insert");
    }
    tx.commit().await.expect("commit");
}

async fn unnest(conn: &mut PgConnection, commit: &[Row]) {
    sqlx::query(
        "INSERT INTO readings (device_id, sensor_id, seq, ts_ms, value) \
         SELECT * FROM UNNEST($1::integer[], $2::integer[], $3::bigint[], $4::bigint[], $5::float8[])",
    )
    .bind(commit.iter().map(|r| r.device).collect::<Vec<_>>())
    .bind(commit.iter().map(|r| r.sensor).collect::<Vec<_>>())
    .bind(commit.iter().map(|r| r.seq).collect::<Vec<_>>())
    .bind(commit.iter().map(|r| r.ts_ms).collect::<Vec<_>>())
    .bind(commit.iter().map(|r| r.value).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await
    .expect("unnest");
}

async fn copy_text(conn: &mut PgConnection, table: &str, columns: &str, text: String) {
    let mut tx = conn.begin().await.expect("begin");
    let mut copy = tx
        .copy_in_raw(&format!("COPY {table} ({columns}) FROM STDIN"))
        .await
        .expect("copy");
    copy.send(text.into_bytes()).await.expect("copy data");
    copy.finish().await.expect("copy end");
    tx.commit().await.expect("commit");
}

async fn copy_rows(conn: &mut PgConnection, commit: &[Row]) {
    let mut text = String::with_capacity(commit.len() * 48);
    for r in commit {
        let _ = writeln!(
            text,
            "{}\t{}\t{}\t{}\t{}",
            r.device, r.sensor, r.seq, r.ts_ms, r.value
        );
    }
    copy_text(
        conn,
        "readings",
        "device_id, sensor_id, seq, ts_ms, value",
        text,
    )
    .await;
}

fn report(what: &str, readings: usize, started: Instant, bytes: i64) {
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{what:<36} {:>9.0} readings/s   {:>6.1} bytes/reading (table + index)",
        readings as f64 / secs,
        bytes as f64 / readings as f64
    );
}

fn main() {
    let total = env_or("TOTAL_ROWS", 1_000_000) as usize;
    let devices = env_or("DEVICES", 1000) as i64;
    let per_commit = env_or("ROWS_PER_COMMIT", 10_000) as usize;
    let url = std::env::var("PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut conn = match PgConnection::connect(&url).await {
            Ok(conn) => conn,
            Err(e) => {
                let require = std::env::var("HUB_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1");
                println!("SKIPPED: PostgreSQL not reachable at {url} ({e})");
                if require {
                    std::process::exit(1);
                }
                return;
            }
        };
        let version: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut conn)
            .await
            .expect("version");
        let schema = format!("bench_pg_ingest_{}", std::process::id());
        for sql in [
            format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
            format!("CREATE SCHEMA {schema}"),
            format!("SET search_path TO {schema}"),
        ] {
            sqlx::query(&sql).execute(&mut conn).await.expect(&sql);
        }
        let data = rows(total, devices);
        println!(
            "PostgreSQL {version}: {total} readings, {devices} devices x {SENSORS} sensors, \
             {per_commit} per commit, partitioned by day, index (device, sensor, ts)"
        );

        reset_rows(&mut conn).await;
        let t = Instant::now();
        for commit in data.chunks(per_commit) {
            multirow(&mut conn, commit).await;
        }
        report(
            "multi-row INSERT (1000 rows each)",
            total,
            t,
            table_bytes(&mut conn, "readings").await,
        );

        reset_rows(&mut conn).await;
        let t = Instant::now();
        for commit in data.chunks(per_commit) {
            unnest(&mut conn, commit).await;
        }
        report(
            "INSERT ... SELECT FROM UNNEST",
            total,
            t,
            table_bytes(&mut conn, "readings").await,
        );

        reset_rows(&mut conn).await;
        let t = Instant::now();
        for commit in data.chunks(per_commit) {
            copy_rows(&mut conn, commit).await;
        }
        report(
            "COPY FROM STDIN (text)",
            total,
            t,
            table_bytes(&mut conn, "readings").await,
        );

        // The same COPY from several connections at once, each with its
        // share of the devices (as one staging writer per part, or one per
        // hub, would).
        for writers in [2usize, 4] {
            reset_rows(&mut conn).await;
            let mut conns = Vec::with_capacity(writers);
            for _ in 0..writers {
                let mut c = PgConnection::connect(&url).await.expect("connect");
                sqlx::query(&format!("SET search_path TO {schema}"))
                    .execute(&mut c)
                    .await
                    .expect("search_path");
                conns.push(c);
            }
            let shares: Vec<Vec<Row>> = (0..writers)
                .map(|w| {
                    data.iter()
                        .filter(|r| r.device as usize % writers == w)
                        .copied()
                        .collect()
                })
                .collect();
            let t = Instant::now();
            let runs = conns.iter_mut().zip(&shares).map(|(c, share)| async move {
                for commit in share.chunks(per_commit / writers) {
                    copy_rows(c, commit).await;
                }
            });
            futures_util::future::join_all(runs).await;
            report(
                &format!("COPY, {writers} connections at once"),
                total,
                t,
                table_bytes(&mut conn, "readings").await,
            );
        }

        // Blocks: each series' points encoded as compaction would (rows
        // grouped by series, sorted by (ts, seq)), at most 4096 a block.
        reset(
            &mut conn,
            "blocks",
            "device_id integer NOT NULL, sensor_id integer NOT NULL, first_ts bigint NOT NULL, \
             last_ts bigint NOT NULL, points integer NOT NULL, data bytea NOT NULL",
            "first_ts",
        )
        .await;
        sqlx::query("CREATE INDEX ON blocks (device_id, sensor_id, first_ts)")
            .execute(&mut conn)
            .await
            .expect("index");
        let t = Instant::now();
        let mut series: std::collections::BTreeMap<(i32, i32), Vec<Point>> = Default::default();
        for r in &data {
            series.entry((r.device, r.sensor)).or_default().push(Point {
                ts_ms: r.ts_ms,
                seq: r.seq as u64,
                value: r.value,
            });
        }
        let mut text = String::new();
        let mut blocks = 0;
        for ((device, sensor), points) in &mut series {
            points.sort_by_key(Point::key);
            for block in points.chunks(4096) {
                let bytes = codec::encode(block);
                let _ = write!(
                    text,
                    "{device}\t{sensor}\t{}\t{}\t{}\t\\\\x",
                    block[0].ts_ms,
                    block[block.len() - 1].ts_ms,
                    block.len()
                );
                for b in &bytes {
                    let _ = write!(text, "{b:02x}");
                }
                text.push('\n');
                blocks += 1;
            }
        }
        copy_text(
            &mut conn,
            "blocks",
            "device_id, sensor_id, first_ts, last_ts, points, data",
            text,
        )
        .await;
        report(
            &format!("blocks via COPY ({blocks} blocks, encode incl.)"),
            total,
            t,
            table_bytes(&mut conn, "blocks").await,
        );

        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut conn)
            .await
            .expect("drop schema");
    });
}
