//! Storage through the whole path: fleets, exactly-once, queries, buckets.

use std::collections::BTreeMap;
use std::time::Duration;

use device_sim::{FleetConfig, FleetSummary};
use telemetry_proto::v1 as pb;

use crate::harness::*;

/// Runs a fleet against `url` until `acks` readings are acknowledged, then
/// lets it drain and close.
pub async fn run_fleet(url: String, cfg: FleetConfig, acks: u64) -> FleetSummary {
    let fleet = SimFleet::start_with(FleetConfig { hub: url, ..cfg }).await;
    fleet.wait_for_acks(acks).await;
    fleet.finish().await
}

pub fn small_fleet(devices: usize) -> FleetConfig {
    FleetConfig {
        devices,
        rate_hz: 200.0,
        batch_interval: Duration::from_millis(50),
        connections: Some(2),
        ..FleetConfig::default()
    }
}

/// Many slow series: a part's blocks would hold a reading or two each, so
/// once staging holds half its cap the writer compacts the fullest part a
/// piece at a time (its oldest rows), commits going between the pieces.
/// Every acked reading is stored once, staged or in blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thin_parts_are_compacted_a_piece_at_a_time_and_lose_nothing() {
    // Runs of 20 rows a part, pieces of 10, staging capped at 640 rows
    // (half of it: 320); 800 series, 100 a part, so a part is thin below
    // 800 rows.
    let hub = spawn_hub_with(|s| s.storage.compact_rows = 160).await;
    let fleet = SimFleet::start_with(FleetConfig {
        hub: hub.url(),
        devices: 200,
        rate_hz: 2.0,
        id_prefix: "thin-".into(),
        batch_interval: Duration::from_millis(50),
        connections: Some(2),
        ..FleetConfig::default()
    })
    .await;
    wait_until("many compactions while the fleet streams", async || {
        hub.stats().await.compactions > 40
    })
    .await;
    let summary = fleet.finish().await;
    assert!(summary.all_clean(), "{summary:?}");
    assert_eq!(summary.sent, summary.acked, "{summary:?}");
    let stats = hub.stats().await;
    assert_eq!(stats.compaction_failures, 0);
    assert_eq!(stats.commit_failures, 0);
    assert_stored_exactly(&hub, "thin-", &summary).await;
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_readings_are_stored_exactly_once_and_queried_in_order() {
    // Small compaction runs: readings are split between the staging and the
    // clustered table, and move while the fleet streams.
    let hub = spawn_hub_with(|s| s.storage.compact_rows = 300).await;
    let fleet = SimFleet::start_with(FleetConfig {
        hub: hub.url(),
        ..small_fleet(12)
    })
    .await;
    wait_until("several compactions while the fleet streams", async || {
        hub.stats().await.compactions > 3
    })
    .await;
    let summary = fleet.finish().await;
    assert!(summary.all_clean(), "{summary:?}");
    assert_eq!(summary.sent, summary.acked, "{summary:?}");
    assert_eq!(
        (
            summary.duplicates,
            summary.rejected,
            summary.dropped_at_source
        ),
        (0, 0, 0)
    );

    let mut total = 0;
    for i in 1..=12 {
        let id = device_sim::device_id("sim-", i);
        let rows = hub.readings(&id).await;
        wait_until("the stream closed", async || {
            !hub.device(&id).await.unwrap().online
        })
        .await;
        let info = hub.device(&id).await.unwrap();
        assert_eq!(
            rows.len() as u64,
            info.readings,
            "{id}: stored count kept up to date"
        );
        assert_eq!(
            info.acked_seq,
            rows.len() as u64,
            "{id}: seqs 1..=n, no gaps"
        );
        let mut seqs: Vec<u64> = rows.iter().map(|r| r.seq).collect();
        assert!(
            rows.windows(2)
                .all(|w| (w[0].ts_ms, w[0].seq) < (w[1].ts_ms, w[1].seq)),
            "{id}: ordered by ts"
        );
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=info.acked_seq).collect::<Vec<_>>(),
            "{id}: each seq once"
        );
        total += rows.len() as u64;
    }
    assert_eq!(total, summary.acked);
    let stats = hub.stats().await;
    assert_eq!(stats.readings_stored, total);
    assert_eq!(stats.readings_committed, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucketed_aggregates_and_ranges_match_what_the_test_computes() {
    // 150 of the 200 readings compacted, 50 still staged: one device's
    // staging part is compacted once it holds compact_rows / STAGING_PARTS.
    let hub = spawn_hub_with(|s| {
        s.storage.compact_rows = 120 * hub::store::STAGING_PARTS as u64;
    })
    .await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-agg").await;
    // Two sensors, one reading every 700 ms over ~70 s, in the past.
    let base = 1_767_225_600_000i64; // 2026-01-01T00:00:00Z
    let mut all = Vec::new();
    for seq in 1..=200u64 {
        let sensor = if seq % 2 == 0 {
            "temperature"
        } else {
            "humidity"
        };
        let ts = base + 350 * seq as i64;
        let value = ((seq * 37) % 101) as f64 / 4.0 - 5.0;
        all.push(reading(seq, sensor, ts, value));
    }
    for chunk in all.chunks(50) {
        dev.send(batch(chunk.to_vec())).await;
        let last = chunk.last().unwrap().seq;
        dev.ack_through(last).await;
    }
    // Compaction runs right after the commit that fills a run (acks first).
    wait_until("a compaction: data in both tables", || async {
        hub.stats().await.compactions == 1
    })
    .await;

    // Raw, all sensors: ordered by ts, then seq.
    let rows = hub.readings("dev-agg").await;
    assert_eq!(rows.len(), 200);
    assert!(rows.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));

    // Range and limit.
    let since = base + 350 * 50;
    let until = base + 350 * 60;
    let ranged: Vec<u64> = hub
        .query(pb::QueryReadingsRequest {
            device_id: "dev-agg".into(),
            since_ms: Some(since),
            until_ms: Some(until),
            ..Default::default()
        })
        .await
        .into_iter()
        .flat_map(|c| c.rows)
        .map(|r| r.seq)
        .collect();
    assert_eq!(
        ranged,
        (50..60).collect::<Vec<_>>(),
        "since inclusive, until exclusive"
    );
    let limited: usize = hub
        .query(pb::QueryReadingsRequest {
            device_id: "dev-agg".into(),
            sensor: "temperature".into(),
            limit: 7,
            ..Default::default()
        })
        .await
        .iter()
        .map(|c| c.rows.len())
        .sum();
    assert_eq!(limited, 7);

    // Buckets of 10 s for one sensor, every aggregate.
    let width = 10_000i64;
    let mut expected: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for r in all.iter().filter(|r| r.sensor == "temperature") {
        expected
            .entry(r.ts_ms.div_euclid(width) * width)
            .or_default()
            .push(r.value);
    }
    let aggs = [
        pb::Aggregate::Avg,
        pb::Aggregate::Min,
        pb::Aggregate::Max,
        pb::Aggregate::Count,
        pb::Aggregate::Sum,
        pb::Aggregate::First,
        pb::Aggregate::Last,
    ];
    let buckets: Vec<pb::BucketRow> = hub
        .query(pb::QueryReadingsRequest {
            device_id: "dev-agg".into(),
            sensor: "temperature".into(),
            bucket_ms: width,
            aggregates: aggs.iter().map(|a| *a as i32).collect(),
            ..Default::default()
        })
        .await
        .into_iter()
        .flat_map(|c| c.buckets)
        .collect();
    assert_eq!(buckets.len(), expected.len());
    for (b, (start, values)) in buckets.iter().zip(&expected) {
        let sum: f64 = values.iter().sum();
        assert_eq!(b.sensor, "temperature");
        assert_eq!(b.bucket_start_ms, *start);
        assert_eq!(b.count, values.len() as u64);
        assert!((b.sum.unwrap() - sum).abs() < 1e-9);
        assert!((b.avg.unwrap() - sum / values.len() as f64).abs() < 1e-9);
        assert_eq!(
            b.min.unwrap(),
            values.iter().copied().fold(f64::INFINITY, f64::min)
        );
        assert_eq!(
            b.max.unwrap(),
            values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        );
        assert_eq!(b.first.unwrap(), values[0]);
        assert_eq!(b.last.unwrap(), *values.last().unwrap());
    }

    // Only the asked-for aggregates are set; all sensors, sensor by sensor.
    let both: Vec<pb::BucketRow> = hub
        .query(pb::QueryReadingsRequest {
            device_id: "dev-agg".into(),
            bucket_ms: width,
            aggregates: vec![pb::Aggregate::Max as i32],
            ..Default::default()
        })
        .await
        .into_iter()
        .flat_map(|c| c.buckets)
        .collect();
    assert!(
        both.iter()
            .all(|b| b.max.is_some() && b.avg.is_none() && b.first.is_none())
    );
    assert_eq!(both.iter().map(|b| b.count).sum::<u64>(), 200);
    let sensors: Vec<&str> = both.iter().map(|b| b.sensor.as_str()).collect();
    let switch = sensors.iter().position(|s| *s == "temperature").unwrap();
    assert!(
        sensors[..switch].iter().all(|s| *s == "humidity")
            && sensors[switch..].iter().all(|s| *s == "temperature"),
        "grouped by sensor: {sensors:?}"
    );

    // Unknown device: NOT_FOUND, not an empty answer.
    let err = hub
        .operator()
        .await
        .query_readings(pb::QueryReadingsRequest {
            device_id: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_stream_in_chunks() {
    let hub = spawn_hub_with(|s| s.storage.compact_rows = 4000).await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-many").await;
    let base = now_ms() - 3_600_000;
    let sensors = ["a", "b", "c"];
    for start in (1..=9000u64).step_by(900) {
        dev.send(batch(
            (start..start + 900)
                .map(|s| reading(s, sensors[(s % 3) as usize], base + s as i64, s as f64))
                .collect(),
        ))
        .await;
    }
    assert_eq!(dev.ack_through(9000).await.0, 9000);
    let chunks = hub
        .query(pb::QueryReadingsRequest {
            device_id: "dev-many".into(),
            ..Default::default()
        })
        .await;
    assert!(chunks.len() > 1, "results arrive in several chunks");
    let seqs: Vec<u64> = chunks.iter().flat_map(|c| &c.rows).map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        (1..=9000).collect::<Vec<_>>(),
        "merged across sensors by time"
    );
}

/// Readings in blocks of every level (merged while ingest runs) and readings
/// of the old clustered layout (converted at start-up) answer raw and
/// bucket queries exactly as the test computes them; wide buckets fold
/// whole blocks from their headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_blocks_and_converted_old_readings_answer_queries_exactly() {
    let mut hub = spawn_hub_with(|s| s.storage.compact_rows = 100).await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-blk").await;
    let base = 1_767_225_600_000i64;
    let value = |s: u64| ((s * 7919) % 1000) as f64 / 100.0;
    let ts = |s: u64| base + 1000 * s as i64;
    // 60 commits of 100: a compaction each, merged 8 at a time.
    for start in (1..=6000u64).step_by(100) {
        let rs = (start..start + 100)
            .map(|s| reading(s, "t", ts(s), value(s)))
            .collect();
        dev.send(batch(rs)).await;
        dev.ack_through(start + 99).await;
    }
    drop(dev);
    wait_until("blocks merged to level 1", async || {
        let level: Option<i64> = DbConn::open(&hub.settings)
            .await
            .scalar("SELECT max(level) FROM blocks")
            .await;
        level >= Some(1)
    })
    .await;
    // The legacy table is SQLite's past: on PostgreSQL the 6,000 readings
    // of blocks are the whole series.
    let stored = if on_postgres() {
        6000
    } else {
        add_legacy_readings(&mut hub, 6001..=9000, ts, value).await;
        9000
    };
    let rows = hub.readings("dev-blk").await;
    let got: Vec<(u64, i64, f64)> = rows.iter().map(|r| (r.seq, r.ts_ms, r.value)).collect();
    let want: Vec<(u64, i64, f64)> = (1..=stored).map(|s| (s, ts(s), value(s))).collect();
    assert!(
        got == want,
        "raw readings: {} rows, first {:?}",
        got.len(),
        got.first()
    );

    for width in [600_000i64, 86_400_000] {
        let buckets: Vec<pb::BucketRow> = hub
            .query(pb::QueryReadingsRequest {
                device_id: "dev-blk".into(),
                sensor: "t".into(),
                bucket_ms: width,
                aggregates: (1..=7).collect(),
                ..Default::default()
            })
            .await
            .into_iter()
            .flat_map(|c| c.buckets)
            .collect();
        let mut want: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for s in 1..=stored {
            want.entry(ts(s) - ts(s).rem_euclid(width))
                .or_default()
                .push(value(s));
        }
        assert_eq!(buckets.len(), want.len(), "buckets of {width} ms");
        for (b, (start, values)) in buckets.iter().zip(&want) {
            assert_eq!(b.bucket_start_ms, *start);
            assert_eq!(b.count, values.len() as u64);
            assert_eq!(b.min, Some(values.iter().copied().fold(f64::MAX, f64::min)));
            assert_eq!(b.max, Some(values.iter().copied().fold(f64::MIN, f64::max)));
            assert_eq!(b.first, values.first().copied());
            assert_eq!(b.last, values.last().copied());
            let sum: f64 = values.iter().sum();
            assert!(
                (b.sum.unwrap() - sum).abs() < 1e-6 * sum.abs().max(1.0),
                "{b:?}"
            );
        }
    }
    let stats = hub.stats().await;
    assert_eq!(stats.readings_stored, stored);
}

/// Stops the hub, adds `seqs` of dev-blk's sensor t to an old clustered
/// `readings` table (as a hub before blocks stored them), starts it again
/// and checks the table was converted and dropped.
async fn add_legacy_readings(
    hub: &mut TestHub,
    seqs: std::ops::RangeInclusive<u64>,
    ts: impl Fn(u64) -> i64,
    value: impl Fn(u64) -> f64,
) {
    use sqlx::ConnectOptions;
    hub.stop().await;
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(hub.db_path());
    let mut conn = options.connect().await.unwrap();
    let last = *seqs.end() as i64;
    for sql in [
        "CREATE TABLE readings (device_id INTEGER NOT NULL, sensor_id INTEGER NOT NULL, \
         ts_ms INTEGER NOT NULL, seq INTEGER NOT NULL, value REAL NOT NULL, \
         PRIMARY KEY (device_id, sensor_id, ts_ms, seq)) WITHOUT ROWID",
        &format!(
            "UPDATE devices SET acked_seq = {last}, reading_count = {last} \
             WHERE external_id = 'dev-blk'"
        ),
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    for s in seqs {
        sqlx::query(
            "INSERT INTO readings SELECT d.id, x.id, ?, ?, ? FROM devices d, sensors x \
             WHERE d.external_id = 'dev-blk' AND x.name = 't'",
        )
        .bind(ts(s))
        .bind(s as i64)
        .bind(value(s))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    drop(conn);
    hub.restart().await;
    let gone: Option<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE name = 'readings'")
            .fetch_optional(&mut options.connect().await.unwrap())
            .await
            .unwrap();
    assert_eq!(gone, None, "the old table is converted and dropped");
}

/// Some of the hub's migrations, as a source sqlx's migrator takes.
#[derive(Debug)]
pub(crate) struct OlderSchema(pub(crate) Vec<sqlx::migrate::Migration>);

/// The hub's SQLite schema before migration `version`, at `conn`.
/// What an older hub left: a SQLite database in a temp dir with the
/// migrations before `version`, a connection to it, and how to open more.
async fn older_database(
    version: i64,
) -> (
    tempfile::TempDir,
    sqlx::sqlite::SqliteConnectOptions,
    sqlx::SqliteConnection,
) {
    use sqlx::ConnectOptions;
    let dir = tempfile::tempdir().unwrap();
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.path().join("hub.db"));
    let mut conn = options
        .clone()
        .create_if_missing(true)
        .connect()
        .await
        .unwrap();
    migrate_before(&mut conn, version).await;
    (dir, options, conn)
}

pub(crate) async fn migrate_before(conn: &mut sqlx::SqliteConnection, version: i64) {
    let older: Vec<_> = hub::store::migrations::Schema::Sqlite
        .migrations()
        .into_iter()
        .filter(|m| m.version < version)
        .collect();
    sqlx::migrate::Migrator::new(OlderSchema(older))
        .await
        .unwrap()
        .run(conn)
        .await
        .unwrap();
}

impl sqlx::migrate::MigrationSource<'static> for OlderSchema {
    fn resolve(
        self,
    ) -> std::pin::Pin<
        Box<
            dyn Future<Output = Result<Vec<sqlx::migrate::Migration>, sqlx::error::BoxDynError>>
                + Send,
        >,
    > {
        Box::pin(std::future::ready(Ok(self.0)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_readings_staged_by_an_older_hub_move_into_the_staging_parts() {
    use sqlx::ConnectOptions;
    if sqlite_only("an older hub's SQLite schema") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.db");
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .create_if_missing(true)
        .connect()
        .await
        .unwrap();
    // The schema as it was before staging was split.
    let older: Vec<_> = hub::store::migrations::Schema::Sqlite
        .migrations()
        .into_iter()
        .filter(|m| m.version < 20261126000006)
        .collect();
    sqlx::migrate::Migrator::new(OlderSchema(older))
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    let base = 1_767_225_600_000i64;
    let value = |d: i64, s: i64| (d * 1000 + s) as f64 / 10.0;
    sqlx::query("INSERT INTO sensors (id, name) VALUES (1, 't')")
        .execute(&mut conn)
        .await
        .unwrap();
    // Ten devices (ids 1..=10: every part and two that share one), 25
    // staged readings each.
    for d in 1..=10i64 {
        sqlx::query(
            "INSERT INTO devices (id, external_id, first_seen_ms, last_seen_ms, acked_seq, \
             reading_count) VALUES (?, ?, 0, 0, 25, 25)",
        )
        .bind(d)
        .bind(format!("old-{d:02}"))
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query("INSERT INTO device_sensors (device_id, sensor_id) VALUES (?, 1)")
            .bind(d)
            .execute(&mut conn)
            .await
            .unwrap();
        for s in 1..=25i64 {
            sqlx::query("INSERT INTO readings_recent VALUES (?, 1, ?, ?, ?)")
                .bind(d)
                .bind(base + 1000 * s)
                .bind(s)
                .bind(value(d, s))
                .execute(&mut conn)
                .await
                .unwrap();
        }
    }
    drop(conn);

    let hub = spawn_hub_in(TestDb::sqlite_in(dir), |_| {}).await;
    for d in 1..=10i64 {
        let rows = hub.readings(&format!("old-{d:02}")).await;
        let got: Vec<(u64, i64, f64)> = rows.iter().map(|r| (r.seq, r.ts_ms, r.value)).collect();
        let want: Vec<(u64, i64, f64)> = (1..=25i64)
            .map(|s| (s as u64, base + 1000 * s, value(d, s)))
            .collect();
        assert_eq!(got, want, "old-{d:02}");
    }
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .connect()
        .await
        .unwrap();
    let mut total = 0;
    for part in 0..hub::store::STAGING_PARTS {
        let (n, misplaced): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), count(*) FILTER (WHERE device_id % {} != {part}) \
             FROM readings_recent_{part}",
            hub::store::STAGING_PARTS
        ))
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(misplaced, 0, "part {part} holds only its devices");
        total += n;
    }
    assert_eq!(total, 250);
    // A device carries on from its mark.
    let (mut dev, welcome) = RawDevice::connect(&hub, "old-03").await;
    assert_eq!(welcome.acked_seq, 25);
    dev.send(batch(vec![reading(26, "t", base + 26_000, 1.5)]))
        .await;
    dev.ack_through(26).await;
    assert_eq!(hub.readings("old-03").await.len(), 26);
}

/// Marks an older hub left in its per-device progress logs (killed before
/// it folded them) are kept when the logs become one row per slice and
/// commit (migration 16 folds them into the tables first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_progress_logged_by_an_older_hub_is_kept() {
    use sqlx::ConnectOptions;
    if sqlite_only("an older hub's SQLite schema") {
        return;
    }
    let (dir, options, mut conn) = older_database(20261207000016).await;
    let now = now_ms();
    for sql in [
        "INSERT INTO sensors (id, name) VALUES (1, 't')".to_owned(),
        "INSERT INTO devices (id, external_id, first_seen_ms, last_seen_ms, acked_seq, \
         reading_count) VALUES (1, 'old-1', 1, 1, 2, 2), (4097, 'old-2', 1, 1, 0, 0)"
            .to_owned(),
        "INSERT INTO device_sensors (device_id, sensor_id) VALUES (1, 1), (4097, 1)".to_owned(),
        // old-1: two commits (3 and 4 readings), old-2 one of rejects only.
        format!(
            "INSERT INTO progress_log (slice, n, device_id, acked_seq, added, seen_ms) VALUES \
             (0, 1, 1, 5, 3, {a}), (0, 2, 1, 9, 4, {b}), (1, 3, 4097, 7, 0, {b})",
            a = now - 2000,
            b = now - 1000
        ),
        format!(
            "INSERT INTO sensor_seen_log (slice, n, device_id, sensor_id, seen_ms) \
             VALUES (0, 4, 1, 1, {})",
            now - 2000
        ),
    ] {
        sqlx::query(&sql).execute(&mut conn).await.unwrap();
    }
    drop(conn);

    let hub = spawn_hub_in(TestDb::sqlite_in(dir), |_| {}).await;
    let old1 = hub.device("old-1").await.unwrap();
    assert_eq!((old1.acked_seq, old1.readings), (9, 9));
    let old2 = hub.device("old-2").await.unwrap();
    assert_eq!((old2.acked_seq, old2.readings), (7, 0));
    let mut conn = options.connect().await.unwrap();
    // acked_seq, reading_count, last_seen_ms, last_reading_ms, the series'.
    type Marks = (i64, i64, i64, Option<i64>, Option<i64>);
    let table: Vec<Marks> = sqlx::query_as(
        "SELECT d.acked_seq, d.reading_count, d.last_seen_ms, d.last_reading_ms, \
         ds.last_reading_ms FROM devices d JOIN device_sensors ds ON ds.device_id = d.id \
         ORDER BY d.id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        table,
        [
            (9, 9, now - 1000, Some(now - 1000), Some(now - 2000)),
            (7, 0, now - 1000, None, None)
        ],
        "folded into the tables"
    );
    let logs: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM progress_log) + (SELECT count(*) FROM sensor_seen_log)",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(logs, 0);
    // The devices carry on from their marks.
    let (mut dev, welcome) = RawDevice::connect(&hub, "old-1").await;
    assert_eq!(welcome.acked_seq, 9);
    dev.send(batch(vec![reading(10, "t", now, 1.5)])).await;
    dev.ack_through(10).await;
    assert_eq!(hub.device("old-1").await.unwrap().readings, 10);
    let (_, welcome) = RawDevice::connect(&hub, "old-2").await;
    assert_eq!(welcome.acked_seq, 7);
}

/// Marks an older hub logged under 8 slices (killed before it folded them)
/// are renumbered by migration 17 into the slices of 32 their devices now
/// log to, before anything reads a device's marks from its slice (rows
/// that are not marks are left as they were); and a device past 32,768 ids
/// has its marks read from the slice the writer logs it to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_progress_logged_under_eight_slices_is_kept() {
    if sqlite_only("an older hub's SQLite schema") {
        return;
    }
    let (dir, _, mut conn) = older_database(20261207000017).await;
    let (a, b) = (now_ms() - 2000, now_ms() - 1000);
    // Id 40961 is in run 10 (slice 2 of 8, 10 of 32); 1 in run 0 (0 and
    // 0); 32769 in run 8 (0 of 8, 8 of 32).
    for sql in [
        "INSERT INTO sensors (id, name) VALUES (1, 't')".to_owned(),
        "INSERT INTO devices (id, external_id, first_seen_ms, last_seen_ms) \
         VALUES (1, 'near', 1, 1), (32769, 'mid', 1, 1), (40961, 'far', 1, 1)"
            .to_owned(),
        "INSERT INTO device_sensors (device_id, sensor_id) VALUES (40961, 1)".to_owned(),
        format!(
            "INSERT INTO progress_log (slice, n, seen_ms, marks) VALUES \
             (2, 1, {a}, '[[40961,4,4]]'), (2, 2, {b}, '[[40961,6,2]]'), \
             (0, 3, {b}, '[[1,3,3],[32769,5,5]]'), (1, 4, {b}, '[{{\"x\":1}}]')"
        ),
        format!(
            "INSERT INTO sensor_seen_log (slice, n, seen_ms, marks) VALUES (2, 5, {a}, '[[40961,1]]')"
        ),
    ] {
        sqlx::query(&sql).execute(&mut conn).await.unwrap();
    }
    migrate_before(&mut conn, i64::MAX).await;
    let rows = |log: &str| format!("SELECT slice, n, marks FROM {log} ORDER BY n, slice");
    let logged: Vec<(i64, i64, String)> = sqlx::query_as(&rows("progress_log"))
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let row = |slice: i64, n: i64, marks: &str| (slice, n, marks.to_owned());
    assert_eq!(
        logged,
        [
            row(10, 1, "[[40961,4,4]]"),
            row(10, 2, "[[40961,6,2]]"),
            row(0, 3, "[[1,3,3]]"),
            row(8, 3, "[[32769,5,5]]"),
            row(1, 4, r#"[{"x":1}]"#),
        ],
        "renumbered, split by slice"
    );
    let seen: Vec<(i64, i64, String)> = sqlx::query_as(&rows("sensor_seen_log"))
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(seen, [row(10, 5, "[[40961,1]]")]);
    // The odd row is the writer's fold's to deal with (elsewhere tested):
    // out of the way here.
    sqlx::query("DELETE FROM progress_log WHERE n = 4")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);

    let hub = spawn_hub_in(TestDb::sqlite_in(dir), |_| {}).await;
    let (mut dev, welcome) = RawDevice::connect(&hub, "far").await;
    assert_eq!(welcome.acked_seq, 6);
    let mid = hub.device("mid").await.unwrap();
    assert_eq!((mid.acked_seq, mid.readings), (5, 5));
    dev.send(batch(vec![reading(7, "t", now_ms(), 1.5)])).await;
    dev.ack_through(7).await;
    // Logged to slice 10: read from there, or from the table once that
    // slice is folded (and again on the next Welcome).
    assert_eq!(hub.device("far").await.unwrap().readings, 7);
    drop(dev);
    let (_, welcome) = RawDevice::connect(&hub, "far").await;
    assert_eq!(welcome.acked_seq, 7);
}
