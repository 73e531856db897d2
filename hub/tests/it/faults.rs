//! Storage failing under a running fleet, then recovering: a database at
//! its size limit (SQLite's page limit, a deterministic disk-full), a
//! database locked by another process (SQLITE_BUSY) for the readings and for
//! the command log, and a real full disk (a tmpfs, where the test may mount
//! one). Each ends with the same checks: nothing acked lost or stored twice,
//! SQLite's integrity check ok, ingest back on its own, no task left over.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};
use telemetry_proto::v1::{self as pb, CommandState as S, hub_message::Msg as HubMsg};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::*;

const GATEWAY: &str = "telemetry.v1.DeviceGateway";

async fn connect(path: &Path) -> SqliteConnection {
    SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

fn fleet(hub: &TestHub, prefix: &str, devices: usize, rate_hz: f64) -> device_sim::FleetConfig {
    device_sim::FleetConfig {
        hub: hub.url(),
        devices,
        rate_hz,
        id_prefix: prefix.into(),
        batch_interval: Duration::from_millis(50),
        connections: Some(2),
        ..Default::default()
    }
}

/// Waits until commits fail and health says so, then until they succeed
/// again after `recover` and health says that too.
async fn ride_out_failure(hub: &TestHub, fleet: &SimFleet, recover: impl AsyncFnOnce()) {
    wait_until("commits failing", || async {
        hub.stats().await.commit_failures > 0
    })
    .await;
    wait_until("the device gateway NOT_SERVING", || async {
        hub.health(GATEWAY).await == ServingStatus::NotServing
    })
    .await;
    assert_eq!(
        hub.health("").await,
        ServingStatus::Serving,
        "the hub itself is alive"
    );
    recover().await;
    wait_until("storage healthy again", || async {
        hub.stats().await.storage_ok
    })
    .await;
    // Ingest resumes on its own: devices reconnect and resend.
    fleet.wait_for_acks(2_000).await;
    wait_until("the device gateway SERVING again", async || {
        hub.health(GATEWAY).await == ServingStatus::Serving
    })
    .await;
}

/// A stopped hub whose database holds the ballast device's readings, all
/// staged (nothing compacted: ~30 bytes a reading), and the database's path.
async fn stopped_hub_with_staged_ballast() -> (TestHub, PathBuf) {
    let mut hub = spawn_hub_with(|s| s.storage.compact_rows = 1_000_000).await;
    store_ballast(&hub, |s| s as f64).await;
    hub.stop().await;
    let db = hub.db_path();
    restage_ballast(&db).await;
    (hub, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_database_at_its_size_limit_loses_no_acked_reading_and_recovers() {
    if sqlite_only("storage.max_size_mib, a page limit") {
        return;
    }
    // Ballast first: a device's readings that an operator can delete later
    // to make room. Nothing is compacted: staged readings take ~30 bytes
    // each (blocks a few), so the ballast frees room and the limit is met
    // soon.
    let (mut hub, db) = stopped_hub_with_staged_ballast().await;

    // The limit: what the file holds now plus one MiB.
    let mut conn = connect(&db).await;
    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let limit_mib = (pages as u64 * page_size as u64).div_ceil(1 << 20) + 1;
    hub.settings.storage.max_size_mib = limit_mib;
    hub.restart().await;

    let fleet = SimFleet::start_with(fleet(&hub, "full-", 10, 500.0)).await;
    ride_out_failure(&hub, &fleet, async || {
        // An operator makes room.
        let mut conn = connect(&db).await;
        for table in staging_and_blocks() {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE device_id = \
                 (SELECT id FROM devices WHERE external_id = 'ballast')"
            ))
            .execute(&mut conn)
            .await
            .unwrap();
        }
    })
    .await;
    let summary = fleet.finish().await;
    assert!(summary.all_clean(), "{summary:?}");
    assert!(summary.reconnects > 0, "devices were told to come back");
    assert_fleet_stored_exactly(&hub, "full-", &summary).await;
    hub.assert_no_leaks().await;
}

/// An older hub, killed at the database's size limit with the marks of
/// 2000 devices in its per-device progress logs: the upgrade's migration
/// (16) moves them into `devices`, growing its rows, and must find pages
/// for that in the old logs it drops first. The hub starts and every mark
/// is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_upgrade_at_the_size_limit_keeps_the_old_logs_marks() {
    if sqlite_only("storage.max_size_mib, a page limit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hub.db");
    // Incremental auto-vacuum, as the hub makes its databases (pointer map
    // pages, root pages moved by DROP TABLE); 4 KiB pages, which
    // `pad_to_a_mib` counts in.
    let mut conn = SqliteConnectOptions::new()
        .filename(&db)
        .create_if_missing(true)
        .page_size(4096)
        .auto_vacuum(sqlx::sqlite::SqliteAutoVacuum::Incremental)
        .connect()
        .await
        .unwrap();
    crate::ingest::migrate_before(&mut conn, 20261207000016).await;
    let seen_ms = now_ms();
    for sql in [
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 2000) \
         INSERT INTO devices (id, external_id, first_seen_ms, last_seen_ms) \
         SELECT i, 'u' || i, 1, 1 FROM c"
            .to_owned(),
        format!(
            "INSERT INTO progress_log (slice, n, device_id, acked_seq, added, seen_ms) \
             SELECT 0, id, id, 1000000000000 + id, 1000000 + id, {seen_ms} FROM devices"
        ),
        "INSERT INTO sensors (id, name) VALUES (1, 't')".to_owned(),
        "INSERT INTO device_sensors (device_id, sensor_id) SELECT id, 1 FROM devices".to_owned(),
        format!(
            "INSERT INTO sensor_seen_log (slice, n, device_id, sensor_id, seen_ms) \
             SELECT 0, 2000 + id, id, 1, {seen_ms} - id FROM devices"
        ),
        // Full to a whole MiB, none free.
        "CREATE TABLE pad (b BLOB)".to_owned(),
    ] {
        sqlx::query(&sql).execute(&mut conn).await.unwrap();
    }
    let pages = full_to_a_mib(&mut conn).await;
    conn.close().await.unwrap();

    let mut hub = spawn_hub_in(TestDb::sqlite_in(dir), |s| {
        s.storage.max_size_mib = pages / 256;
    })
    .await;
    for id in [1, 1000, 2000] {
        let d = hub.device(&format!("u{id}")).await.unwrap();
        assert_eq!(
            (d.acked_seq, d.readings),
            (1_000_000_000_000 + id, 1_000_000 + id)
        );
    }
    let mut conn = connect(&db).await;
    let (n, wrong): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE acked_seq != 1000000000000 + id \
         OR reading_count != 1000000 + id OR last_seen_ms < $1 \
         OR last_reading_ms IS NOT $1 \
         OR (SELECT last_reading_ms FROM device_sensors WHERE device_id = id) IS NOT $1 - id) \
         FROM devices",
    )
    .bind(seen_ms)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!((n, wrong), (2000, 0), "in the table");
    hub.stop().await;
}

/// A database filled to its size limit, with the progress marks of 2000
/// devices logged and not yet folded (a hub killed mid-run leaves them):
/// folding them in updates `devices` in place, growing its rows into pages
/// the database cannot have, so the fold at open fails and so does every
/// group that must fold first. Retention alone makes room: its steps fold
/// nothing (they read no mark) and delete before they log, so old readings
/// go, and then the folds, registrations and ingest get through, with no
/// operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_retention_alone_makes_room_at_the_size_limit() {
    if sqlite_only("storage.max_size_mib, a page limit") {
        return;
    }
    // Ballast an hour old, staged (~30 B a reading): what retention frees.
    let (mut hub, db) = stopped_hub_with_staged_ballast().await;

    let mut conn = connect(&db).await;
    for sql in [
        // 2000 devices whose marks (a rejected batch's: seq 1000, no
        // reading) are still in the log: ids 10001..=12000, log slice 2.
        "WITH RECURSIVE c(i) AS (SELECT 10001 UNION ALL SELECT i + 1 FROM c WHERE i < 12000) \
         INSERT INTO devices (id, external_id, first_seen_ms, last_seen_ms) \
         SELECT i, 'f' || i, 1, 1 FROM c",
        "INSERT INTO progress_log (slice, n, seen_ms, marks) \
         SELECT 2, 1, 1700000000000, json_group_array(json_array(id, 1000, 0)) \
         FROM devices WHERE id > 10000",
        // Full to a whole MiB, in 4 KiB pages (set out of WAL mode), none
        // free.
        "PRAGMA journal_mode = DELETE",
        "PRAGMA page_size = 4096",
        "VACUUM",
        "PRAGMA journal_mode = WAL",
        "CREATE TABLE pad (b BLOB)",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    let pages = full_to_a_mib(&mut conn).await;
    conn.close().await.unwrap();
    hub.settings.storage.max_size_mib = pages / 256;
    // The ballast is older than this; the probe's readings are stamped a
    // minute ahead (within the allowed clock skew), so they stay.
    hub.settings.storage.retention = Duration::from_secs(10);
    hub.restart().await;

    wait_until("retention deleted the ballast", async || {
        ballast_rows(&db).await == (0, 0)
    })
    .await;
    let (mut probe, _) = RawDevice::connect(&hub, "probe").await;
    let ahead = now_ms() + 60_000;
    probe.send(batch(vec![reading(1, "p", ahead, 1.0)])).await;
    probe.ack_through(1).await;
    let seqs: Vec<u64> = hub.readings("probe").await.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1]);
    assert_eq!(hub.device("ballast").await.unwrap().readings, 0);
    let marked = hub.device("f10001").await.unwrap();
    assert_eq!((marked.acked_seq, marked.readings), (1000, 0));
    assert!(hub.stats().await.storage_ok);
    probe.half_close();
    assert_eq!(probe.end_code().await, tonic::Code::Ok);
    hub.stop().await;
    let mut conn = connect(&db).await;
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM progress_log")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending, 0, "folded in at the clean stop");
    let acked: i64 = sqlx::query_scalar("SELECT acked_seq FROM devices WHERE id = 10001")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, 1000);
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_compaction_at_the_size_limit_fails_whole_and_succeeds_once_there_is_room() {
    if sqlite_only("storage.max_size_mib, a page limit") {
        return;
    }
    // 40,000 full-precision readings stay staged (nothing is compacted),
    // noise in every mantissa bit: no codec makes their blocks small.
    let mut hub = spawn_hub_with(|s| s.storage.compact_rows = 1_000_000).await;
    let base = store_ballast(&hub, |s| {
        f64::from_bits(0x3ff0_0000_0000_0000 | (s.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 12))
    })
    .await;
    let (mut probe, _) = RawDevice::connect(&hub, "probe").await;
    probe.send(batch(vec![reading(1, "p", base, 1.0)])).await;
    probe.ack_through(1).await;
    drop(probe);
    hub.stop().await;
    restage_ballast(&hub.db_path()).await;

    // Pad the file to 20-40 pages short of a whole MiB, the limit: room
    // for small commits, none for the ~80 pages of blocks the ballast's
    // compaction writes. In 4 KiB pages (the page size is changed out of
    // WAL mode), so those figures hold.
    let db = hub.db_path();
    let mut conn = connect(&db).await;
    for sql in [
        "PRAGMA journal_mode = DELETE",
        "PRAGMA page_size = 4096",
        "VACUUM",
        "PRAGMA journal_mode = WAL",
        "CREATE TABLE pad (b BLOB)",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    let limit_pages = pad_to_a_mib(&mut conn, 20..=40).await;
    conn.close().await.unwrap();
    hub.settings.storage.max_size_mib = limit_pages / 256;
    // A part is compacted once it holds 2000 rows; the cap (4 x 16,000)
    // is above what is staged, so commits go on while compactions fail.
    hub.settings.storage.compact_rows = 16_000;
    hub.restart().await;

    // The probe's registration and reading commit; the compaction after
    // them (of the ballast's part) fails.
    let (mut probe, _) = RawDevice::connect(&hub, "probe").await;
    probe
        .send(batch(vec![reading(2, "p", base + 1, 2.0)]))
        .await;
    probe.ack_through(2).await;
    wait_until("a compaction failing", || async {
        hub.stats().await.compaction_failures > 0
    })
    .await;
    assert_eq!(hub.stats().await.compactions, 0);
    assert!(hub.stats().await.storage_ok, "commits still succeed");
    assert_eq!(
        ballast_rows(&db).await,
        (40_000, 0),
        "all staged, none in blocks"
    );

    // An operator makes room; after its retry wait the compaction
    // succeeds (it runs after a commit, so the probe keeps sending).
    sqlx::query("DROP TABLE pad")
        .execute(&mut connect(&db).await)
        .await
        .unwrap();
    let mut seq = 2;
    wait_until("a compaction succeeding", async || {
        seq += 1;
        probe
            .send(batch(vec![reading(seq, "p", base + seq as i64, 3.0)]))
            .await;
        probe.ack_through(seq).await;
        hub.stats().await.compactions > 0
    })
    .await;
    let got: Vec<u64> = hub
        .readings("ballast")
        .await
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(got, (1..=40_000).collect::<Vec<_>>(), "each once");
    let probe_seqs: Vec<u64> = hub.readings("probe").await.iter().map(|r| r.seq).collect();
    assert_eq!(probe_seqs, (1..=seq).collect::<Vec<_>>());
    let staged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM readings_recent WHERE device_id = \
         (SELECT id FROM devices WHERE external_id = 'ballast')",
    )
    .fetch_one(&mut connect(&db).await)
    .await
    .unwrap();
    assert_eq!(staged, 0, "the ballast's part is in blocks now");
    // Counted in the tables, not through a query (which would hide a
    // reading stored twice).
    assert_eq!(ballast_rows(&db).await, (0, 40_000), "each once, in blocks");
    probe.half_close();
    assert_eq!(probe.end_code().await, tonic::Code::Ok);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_over_its_cap_is_compacted_not_refused() {
    // A part is compacted at 10 rows and staging is capped at 4 x 80 =
    // 320 rows, far below one round of eight 1,000-reading batches: a
    // healthy hub must compact its way under the cap, part after part,
    // rather than refuse the group (its devices would hear UNAVAILABLE).
    let hub = spawn_hub_with(|s| s.storage.compact_rows = 80).await;
    let base = now_ms() - 3_600_000;
    let mut devices = Vec::new();
    for d in 0..hub::store::STAGING_PARTS {
        // Registered one after the other: ids 1..=8, every part.
        devices.push(RawDevice::connect(&hub, &format!("cap-{d}")).await.0);
    }
    for round in 0..3u64 {
        for dev in &mut devices {
            let first = round * 1000 + 1;
            dev.send(batch(
                (first..first + 1000)
                    .map(|s| reading(s, "c", base + s as i64, s as f64 / 8.0))
                    .collect(),
            ))
            .await;
        }
        for dev in &mut devices {
            dev.ack_through((round + 1) * 1000).await;
        }
    }
    let stats = hub.stats().await;
    assert_eq!(stats.commit_failures, 0, "no group was refused");
    assert_eq!(stats.compaction_failures, 0);
    assert!(stats.compactions >= 8, "{} compactions", stats.compactions);
    for d in 0..hub::store::STAGING_PARTS {
        let seqs: Vec<u64> = hub
            .readings(&format!("cap-{d}"))
            .await
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, (1..=3000).collect::<Vec<_>>(), "cap-{d}");
    }
    for mut dev in devices {
        dev.half_close();
        assert_eq!(dev.end_code().await, tonic::Code::Ok);
    }
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_locked_database_fails_commits_then_readings_and_commands_recover() {
    if sqlite_only("a file lock held by another connection") {
        return;
    }
    let hub = spawn_hub_with(|s| {
        s.storage.busy_timeout = Duration::from_millis(200);
        s.commands.ack_timeout = Duration::from_millis(500);
        s.commands.max_attempts = 50;
    })
    .await;
    let fleet = SimFleet::start_with(fleet(&hub, "lock-", 5, 200.0)).await;

    // Another process holds the write lock of the readings database.
    let mut holder = connect(&hub.db_path()).await;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    ride_out_failure(&hub, &fleet, async || {
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    })
    .await;

    // Commands in flight while the command log is locked.
    let mut sent = Vec::new();
    for i in 1..=5 {
        let id = device_sim::device_id("lock-", i);
        sent.push(hub.send_command(&id, "ping", "", None).await.unwrap());
    }
    let log = hub.db_path().with_file_name("hub-commands.db");
    let mut holder = connect(&log).await;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let refused = hub
        .send_command("lock-00001", "ping", "", None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("command log"), "{refused:?}");
    // Readings are not held up by the command log.
    fleet.wait_for_acks(500).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    for _ in 0..3 {
        let id = device_sim::device_id("lock-", 2);
        sent.push(hub.send_command(&id, "ping", "", None).await.unwrap());
    }
    for cmd in &sent {
        let last = hub.watch_until_final(&cmd.command_id).await.pop().unwrap();
        assert_eq!(state(&last), S::Succeeded, "{last:?}");
        let history: Vec<S> = hub
            .command(&cmd.command_id)
            .await
            .history
            .iter()
            .map(|t| S::try_from(t.state).unwrap())
            .collect();
        assert_eq!(history.first(), Some(&S::Queued));
        assert_eq!(history.last(), Some(&S::Succeeded));
        assert!(
            history.windows(2).all(|w| (w[0] as i32) < (w[1] as i32)),
            "states only move forward: {history:?}"
        );
    }
    let summary = fleet.finish().await;
    assert!(summary.all_clean(), "{summary:?}");
    assert_eq!(
        summary.commands_executed,
        sent.len() as u64,
        "each command executed once, redeliveries deduplicated: {summary:?}"
    );
    assert_fleet_stored_exactly(&hub, "lock-", &summary).await;
    hub.assert_no_leaks().await;
}

/// A tmpfs of `size` mounted on `dir` for the test's life (needs root).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_owned()))
    }

    fn grow(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The reported case: a hub on a 12 MiB tmpfs, 40 devices x 500 Hz; the
/// disk fills, then grows. Before the fix, every "commit" after the
/// failures stayed in a transaction that was never committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_full_disk_that_grows_again_loses_no_acked_reading() {
    if sqlite_only("the database file on a tmpfs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(tmpfs) = Tmpfs::mount(dir.path(), "12m") else {
        skip("a tmpfs mount (root)", &dir.path().display().to_string());
        return;
    };
    // Uncompacted readings (~30 bytes each, blocks take a few) fill the
    // 12 MiB in seconds.
    let hub = spawn_hub_in(TestDb::sqlite_in(dir), |s| {
        s.storage.compact_rows = 1_000_000;
    })
    .await;
    let fleet = SimFleet::start_with(fleet(&hub, "disk-", 40, 500.0)).await;
    ride_out_failure(&hub, &fleet, async || tmpfs.grow("512m")).await;
    let summary = fleet.finish().await;
    assert!(summary.all_clean(), "{summary:?}");
    assert_fleet_stored_exactly(&hub, "disk-", &summary).await;
    let stats = hub.stats().await;
    assert_eq!(stats.readings_stored, summary.acked);
    hub.assert_no_leaks().await;
    let mut hub = hub;
    hub.stop().await;
    drop(tmpfs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_writer_turns_the_hub_not_serving_and_stops_it_with_an_error() {
    for task in [
        hub::app::CriticalTask::Writer,
        hub::app::CriticalTask::Commands,
    ] {
        let mut hub = spawn_hub().await;
        assert_eq!(hub.health("").await, ServingStatus::Serving);
        hub.hub().kill_for_test(task);
        wait_until("NOT_SERVING", || async {
            hub.health("").await == ServingStatus::NotServing
        })
        .await;
        assert_eq!(hub.health(GATEWAY).await, ServingStatus::NotServing);
        let running = hub.take();
        let result = tokio::time::timeout(WAIT, running.run_until_signal())
            .await
            .expect("stops by itself");
        let err = result.unwrap_err().to_string();
        assert!(err.contains("cannot go on"), "{task:?}: {err}");
    }
}

/// A device with readings 1..=10 acked, then the readings database locked
/// by a connection of the test's own (BEGIN IMMEDIATE): the writer's next
/// commit waits for it. The device, the holder, and the readings' time.
async fn ten_acked_then_locked(hub: &TestHub, id: &str) -> (RawDevice, SqliteConnection, i64) {
    let (mut dev, _) = RawDevice::connect(hub, id).await;
    let now = now_ms();
    dev.send(batch((1..=10).map(|s| reading(s, "t", now, 1.0)).collect()))
        .await;
    dev.ack_through(10).await;
    let mut holder = connect(&hub.db_path()).await;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    (dev, holder, now)
}

/// A line-protocol write whose commit fails is not acknowledged (503 with
/// Retry-After) and stores nothing; the retry, once storage is back, is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_write_whose_commit_fails_is_refused_and_its_retry_stored() {
    if sqlite_only("a file lock held by another connection") {
        return;
    }
    let hub = spawn_hub_with(|s| s.storage.busy_timeout = Duration::from_millis(100)).await;
    let base = hub.http_url();
    let now = now_ms();
    let line = |v: i32| format!("m,device=lp-f v={v} {}", now * 1_000_000);
    let (status, json, _) = crate::lines::post(&base, "", line(1), &[]).await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT, "{json}");

    let mut holder = connect(&hub.db_path()).await;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let (status, json, retry) = crate::lines::post(&base, "", line(2), &[]).await;
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "{json}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(
        crate::lines::message(&json).contains("not acknowledged"),
        "{json}"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    async fn values(hub: &TestHub) -> Vec<(u64, f64)> {
        let rows = hub.readings("lp-f").await;
        rows.iter().map(|r| (r.seq, r.value)).collect()
    }
    assert_eq!(
        values(&hub).await,
        vec![(1, 1.0)],
        "nothing of the refused write"
    );

    let (status, json, _) = crate::lines::post(&base, "", line(2), &[]).await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT, "{json}");
    assert_eq!(values(&hub).await, vec![(1, 1.0), (2, 2.0)]);
    assert!(hub.stats().await.commit_failures >= 1);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_stats_count_failures_and_queries_still_answer_while_storage_fails() {
    if sqlite_only("a file lock held by another connection") {
        return;
    }
    let hub = spawn_hub_with(|s| s.storage.busy_timeout = Duration::from_millis(100)).await;
    let (mut dev, mut holder, now) = ten_acked_then_locked(&hub, "dev-q").await;
    dev.send(batch(vec![reading(11, "t", now, 1.0)])).await;
    // The commit holding 11 fails: no ack for it, the stream ends so the
    // device resends from the true mark.
    assert_eq!(dev.end_code().await, tonic::Code::Unavailable);
    let rows = hub
        .query(pb::QueryReadingsRequest {
            device_id: "dev-q".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(rows.iter().map(|c| c.rows.len()).sum::<usize>(), 10);
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let (mut dev, welcome) = RawDevice::connect(&hub, "dev-q").await;
    assert_eq!(welcome.acked_seq, 10, "the true mark");
    dev.send(batch(vec![reading(11, "t", now, 1.0)])).await;
    assert_eq!(dev.ack_through(11).await.0, 11);
    let stats = hub.stats().await;
    assert!(stats.commit_failures >= 1 && stats.storage_ok, "{stats:?}");
    drop(dev);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_registration_in_a_failed_commit_leaves_no_trace_in_live_readings() {
    if sqlite_only("a file lock held by another connection") {
        return;
    }
    let hub = spawn_hub_with(|s| {
        s.storage.max_size_mib = 1;
        s.storage.compact_rows = 1_000_000;
        s.server.max_batch = 5000;
        s.ingest.max_batch_delay = Duration::from_millis(300);
    })
    .await;
    let now = now_ms();
    let big = |from: u64| {
        batch(
            (from..from + 5000)
                .map(|s| reading(s, "t", now, 1.0))
                .collect(),
        )
    };
    // Fill the database to its limit.
    let (mut filler, _) = RawDevice::connect(&hub, "dev-fill").await;
    let mut next = 1;
    let code = loop {
        filler.send(big(next)).await;
        match filler.next().await {
            Ok(Some(HubMsg::Ack(_))) => next += 5000,
            Ok(other) => panic!("{other:?}"),
            Err(status) => break status.code(),
        }
    };
    assert_eq!(code, tonic::Code::Unavailable);
    // One group: A's registration (a small row that still fits) and a big
    // batch that does not. The group fails; A's key is rolled back.
    let (filler, welcome) = RawDevice::connect(&hub, "dev-fill").await;
    filler.send(big(welcome.acked_seq + 1)).await;
    let mut a = RawDevice::open(hub.channel().await, hello("dev-a")).await;
    assert_eq!(a.end_code().await, tonic::Code::Unavailable);
    drop(filler);
    // An operator makes room.
    let mut conn = connect(&hub.db_path()).await;
    for table in staging_and_blocks() {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE device_id = \
             (SELECT id FROM devices WHERE external_id = 'dev-fill')"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let mut watch = hub
        .operator()
        .await
        .watch_readings(pb::WatchReadingsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // B is registered next and gets the key A had for a moment (SQLite
    // reuses a rolled-back rowid).
    let (mut b, _) = RawDevice::connect(&hub, "dev-b").await;
    b.send(batch(vec![reading(1, "t", now, 1.0)])).await;
    b.ack_through(1).await;
    let event = tokio::time::timeout(WAIT, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let devices: Vec<&str> = event
        .readings
        .iter()
        .map(|r| r.device_id.as_str())
        .collect();
    assert_eq!(devices, vec!["dev-b"], "B's readings under B's name");
    let key: i64 = sqlx::query_scalar("SELECT id FROM devices WHERE external_id = 'dev-b'")
        .fetch_one(&mut connect(&hub.db_path()).await)
        .await
        .unwrap();
    assert_eq!(
        key, 2,
        "B has the key A had in the failed commit (dev-fill is 1)"
    );
    assert!(
        hub.device("dev-a").await.is_none(),
        "A was never registered"
    );
}

/// Pads a database of 4 KiB pages (table `pad`) to a whole MiB with no
/// page free; its pages.
async fn full_to_a_mib(conn: &mut SqliteConnection) -> u64 {
    let pages = pad_to_a_mib(conn, 0..=0).await;
    let free: i64 = sqlx::query_scalar("PRAGMA freelist_count")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(free, 0);
    pages
}

/// Pads a database of 4 KiB pages (into its table `pad`) until the pages
/// left before the next whole MiB are within `left`; returns that MiB's
/// page count, the limit to set.
async fn pad_to_a_mib(conn: &mut SqliteConnection, left: std::ops::RangeInclusive<u64>) -> u64 {
    let mid = (left.start() + left.end()) / 2;
    loop {
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let limit = (pages as u64).div_ceil(256) * 256;
        let now_left = limit - pages as u64;
        if left.contains(&now_left) {
            return limit;
        }
        // A blob fills overflow pages of ~4,000 bytes (big steps, landing
        // a few pages short of the middle); a row of 3,000 bytes fills a
        // leaf page of its own (the last steps, a page at a time).
        let to_fill = if now_left > left.end() + 3 {
            (now_left - mid).saturating_sub(2).max(1) * 4000
        } else if now_left > *left.end() {
            3000
        } else {
            (now_left + 256 - mid).saturating_sub(2) * 4000
        };
        sqlx::query("INSERT INTO pad VALUES (zeroblob(?))")
            .bind(to_fill as i64)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
}

/// The tables that hold readings: blocks and every staging part.
fn staging_and_blocks() -> Vec<String> {
    let parts = (0..hub::store::STAGING_PARTS).map(|p| format!("readings_recent_{p}"));
    std::iter::once("blocks".to_owned()).chain(parts).collect()
}

/// The ballast device's readings as stored: (staged rows, points in blocks).
async fn ballast_rows(db: &Path) -> (i64, i64) {
    let mut conn = connect(db).await;
    let rows = sqlx::query_as(
        "SELECT (SELECT count(*) FROM readings_recent WHERE device_id = d.id), \
                (SELECT coalesce(sum(count), 0) FROM blocks WHERE device_id = d.id) \
         FROM devices d WHERE external_id = 'ballast'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    // Closed, not dropped: a dropped connection closes later, on sqlx's
    // worker thread, and a journal-mode change next would find it open.
    conn.close().await.unwrap();
    rows
}

/// What a hub stopped before it compacted would leave (a clean stop
/// compacts every staged part): the ballast's readings moved from its
/// blocks back to its staging part, as they were.
async fn restage_ballast(db: &Path) {
    let mut conn = connect(db).await;
    let blocks: Vec<(i64, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT device_id, sensor_id, data FROM blocks WHERE device_id = \
         (SELECT id FROM devices WHERE external_id = 'ballast')",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut tx = sqlx::Connection::begin(&mut conn).await.unwrap();
    for (device, sensor, data) in &blocks {
        let part = device.rem_euclid(hub::store::STAGING_PARTS as i64);
        let points = hub::store::codec::decode(data).unwrap();
        for chunk in points.chunks(500) {
            let sql = format!(
                "INSERT INTO readings_recent_{part} (device_id, sensor_id, ts_ms, seq, value) VALUES {}",
                vec!["(?, ?, ?, ?, ?)"; chunk.len()].join(", ")
            );
            let mut q = sqlx::query(&sql);
            for p in chunk {
                q = q
                    .bind(device)
                    .bind(sensor)
                    .bind(p.ts_ms)
                    .bind(p.seq as i64)
                    .bind(p.value);
            }
            q.execute(&mut *tx).await.unwrap();
        }
        sqlx::query("DELETE FROM blocks WHERE device_id = ?")
            .bind(device)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    conn.close().await.unwrap();
    assert_eq!(ballast_rows(db).await, (40_000, 0), "all staged again");
}

/// 40,000 readings of device "ballast" (seqs 1..=40,000, sensor "b", an
/// hour ago, `value` of the seq), acked, and its stream closed. Returns the
/// base timestamp.
async fn store_ballast(hub: &TestHub, value: fn(u64) -> f64) -> i64 {
    let (mut ballast, _) = RawDevice::connect(hub, "ballast").await;
    let base = now_ms() - 3_600_000;
    for start in (1..=40_000u64).step_by(1000) {
        ballast
            .send(batch(
                (start..start + 1000)
                    .map(|s| reading(s, "b", base + s as i64, value(s)))
                    .collect(),
            ))
            .await;
    }
    ballast.ack_through(40_000).await;
    ballast.half_close();
    assert_eq!(ballast.end_code().await, tonic::Code::Ok);
    base
}

/// OK promises every due Ack was sent: a stream closing while its last
/// batch waits on storage past the drain timeout ends UNAVAILABLE instead,
/// so the device resends what was not acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_close_whose_acks_miss_the_drain_timeout_is_unavailable_not_ok() {
    if sqlite_only("a file lock held by another connection") {
        return;
    }
    let hub = spawn_hub_with(|s| {
        s.storage.busy_timeout = Duration::from_secs(3);
        s.server.drain_timeout = Duration::from_millis(300);
    })
    .await;
    let (mut dev, mut holder, now) = ten_acked_then_locked(&hub, "dev-drain").await;
    dev.send(batch(vec![reading(11, "t", now, 1.0)])).await;
    dev.half_close();
    let status = match dev.next().await {
        Ok(Some(other)) => panic!("no ack can come while storage waits: {other:?}"),
        Ok(None) => panic!("the stream ended OK with batch 11 not acked"),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("before closing"),
        "ended by the drain timeout, not by the failed commit: {status:?}"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_reported_patch_in_a_failed_commit_is_not_acked_and_applies_once_after() {
    if sqlite_only("a file lock held by another connection") {
        return;
    }
    let hub = spawn_hub_with(|s| s.storage.busy_timeout = Duration::from_millis(100)).await;
    let (mut dev, welcome) = crate::twin::connect_twin(&hub, "dev-tw-fail", 0).await;
    assert_eq!(welcome.reported_seq, 0);
    dev.send(reported(1, serde_json::json!({"battery": 50})))
        .await;
    let ack = crate::twin::reported_through(&mut dev, 1).await;
    let version = ack.version;
    // The commit holding patch 2 fails: no ReportedAck for it; the stream
    // ends UNAVAILABLE so the device resends from the true mark.
    let mut holder = connect(&hub.db_path()).await;
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    dev.send(reported(2, serde_json::json!({"battery": 40})))
        .await;
    loop {
        match dev.next().await {
            Ok(Some(HubMsg::ReportedAck(a))) => {
                assert!(a.seq < 2, "patch 2 acked though its commit failed: {a:?}")
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended OK after a failed commit"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable);
                break;
            }
        }
    }
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let (mut dev, welcome) = crate::twin::connect_twin(&hub, "dev-tw-fail", 0).await;
    assert_eq!(
        (welcome.reported_seq, welcome.reported_version),
        (1, version),
        "the true mark: patch 2 is not there"
    );
    dev.send(reported(2, serde_json::json!({"battery": 40})))
        .await;
    let ack = crate::twin::reported_through(&mut dev, 2).await;
    assert_eq!(ack.version, version + 1, "applied once");
    let twin = crate::twin::get_twin(&hub, "dev-tw-fail").await;
    assert_eq!(crate::twin::parsed(&twin.reported_json)["battery"], 40);
    drop(dev);
    hub.assert_no_leaks().await;
}

/// A batch whose staging write fails inside the commit (a trigger of the
/// test's own refuses the value 666 in every staging part) is not acked
/// and its stream ends UNAVAILABLE: first a one-reading batch (PostgreSQL
/// stages it with a multi-row INSERT), then one of 70 readings in one part
/// (PostgreSQL's binary COPY, from 64 rows; a failed COPY leaves the
/// connection to be replaced). Another device's readings go on being
/// stored; once the fault is gone the device finds its true mark and its
/// resend is stored once, each seq exactly once in the database. On both
/// backends (SQLite: INSERTs; the suite's PostgreSQL pass: both paths).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_staging_write_is_not_acked_and_its_resend_is_stored_once() {
    let hub = spawn_hub().await;
    let now = now_ms();
    let (mut a, _) = RawDevice::connect(&hub, "stage-fail-a").await;
    let (mut b, _) = RawDevice::connect(&hub, "stage-fail-b").await;
    let value = |s: u64, last: u64| if s == last { 666.0 } else { 1.0 };
    let readings = |seqs: std::ops::RangeInclusive<u64>| -> Vec<pb::Reading> {
        let last = *seqs.end();
        seqs.map(|s| reading(s, "temp", now + s as i64, value(s, last)))
            .collect()
    };
    a.send(batch(
        (1..=5)
            .map(|s| reading(s, "temp", now + s as i64, 1.0))
            .collect(),
    ))
    .await;
    a.ack_through(5).await;
    b.send(batch(
        (1..=3)
            .map(|s| reading(s, "temp", now + s as i64, 2.0))
            .collect(),
    ))
    .await;
    b.ack_through(3).await;

    let mut db = DbConn::open(&hub.settings).await;
    for sql in staging_fault(db.is_postgres(), true) {
        db.execute(&sql).await;
    }
    for last in [6, 75] {
        let failures = hub.stats().await.commit_failures;
        refused_batch(&mut a, readings(6..=last)).await;
        assert!(hub.stats().await.commit_failures > failures);
        let (again, welcome) = RawDevice::connect(&hub, "stage-fail-a").await;
        assert_eq!(welcome.acked_seq, 5, "the true mark: nothing of 6..={last}");
        a = again;
    }
    // The writer goes on: another device's next batch is stored and acked.
    b.send(batch(vec![reading(4, "temp", now + 4, 2.0)])).await;
    b.ack_through(4).await;

    for sql in staging_fault(db.is_postgres(), false) {
        db.execute(&sql).await;
    }
    a.send(batch(readings(6..=75))).await;
    a.ack_through(75).await;

    let rows = hub.readings("stage-fail-a").await;
    let got: Vec<(u64, f64)> = rows.iter().map(|r| (r.seq, r.value)).collect();
    let want: Vec<(u64, f64)> = (1..=75).map(|s| (s, value(s, 75))).collect();
    assert_eq!(got, want);
    // In the database itself (a read deduplicates): each seq once.
    for (prefix, n) in [("stage-fail-a", 75), ("stage-fail-b", 4)] {
        let devices = db.devices(prefix).await;
        let (key, _, mark, count) = devices[0];
        assert_eq!((mark, count), (n, n), "{prefix}");
        let mut seqs = db.stored_seqs(key).await;
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=n).collect::<Vec<i64>>(), "{prefix}");
    }
    drop((a, b));
    hub.assert_no_leaks().await;
}

/// The statements that install (or remove) a trigger on every staging part
/// refusing the value 666.
fn staging_fault(postgres: bool, install: bool) -> Vec<String> {
    let parts = 0..8;
    match (postgres, install) {
        (true, true) => std::iter::once(
            "CREATE FUNCTION inject() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.value = 666 THEN RAISE EXCEPTION 'injected'; END IF; RETURN NEW; END $$"
                .to_owned(),
        )
        .chain(parts.map(|p| {
            format!(
                "CREATE TRIGGER inject BEFORE INSERT ON readings_recent_{p} \
                 FOR EACH ROW EXECUTE FUNCTION inject()"
            )
        }))
        .collect(),
        (true, false) => parts
            .map(|p| format!("DROP TRIGGER inject ON readings_recent_{p}"))
            .collect(),
        (false, true) => parts
            .map(|p| {
                format!(
                    "CREATE TRIGGER inject_{p} BEFORE INSERT ON readings_recent_{p} \
                     WHEN NEW.value = 666 BEGIN SELECT RAISE(ABORT, 'injected'); END"
                )
            })
            .collect(),
        (false, false) => parts.map(|p| format!("DROP TRIGGER inject_{p}")).collect(),
    }
}

/// Sends one reading and expects its commit to fail: no ack for it, the
/// stream ends UNAVAILABLE.
async fn refused(dev: &mut RawDevice, seq: u64, ts: i64, value: f64) {
    refused_batch(dev, vec![reading(seq, "temp", ts, value)]).await;
}

/// Sends a batch and expects its commit to fail: no ack for any of it
/// (nothing at or past its first seq), the stream ends UNAVAILABLE.
async fn refused_batch(dev: &mut RawDevice, readings: Vec<pb::Reading>) {
    let seq = readings.first().map_or(0, |r| r.seq);
    dev.send(batch(readings)).await;
    loop {
        match dev.next().await {
            Ok(Some(HubMsg::Ack(a))) => {
                assert!(
                    a.acked_seq < seq,
                    "{seq} acked though its commit failed: {a:?}"
                )
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended OK after a failed commit"),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable);
                break;
            }
        }
    }
}

/// A reading that raises (then one that clears) an alarm, in a commit
/// that fails after the rules ran (a trigger of the test's own refuses the
/// alarm's row): no alarm, no event, no notification from it; the
/// writer's cached series state is not left ahead of the store, so when
/// the device sends it again the alarm is raised (cleared) exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_alarm_change_in_a_failed_commit_happens_once_when_sent_again() {
    if sqlite_only("a file lock held by another connection") {
        return;
    }
    let hub = spawn_hub_with(|s| s.storage.busy_timeout = Duration::from_millis(100)).await;
    let http = hub.http_url();
    crate::alarms::put_rule(
        &http,
        "hot",
        serde_json::json!({"severity": "major", "target": {"device": "al-fail"},
               "threshold": {"sensor": "temp", "raise": "> 30", "clear": "< 20"}}),
    )
    .await;
    let base = now_ms() - 3_600_000;
    let (mut dev, _) = RawDevice::connect(&hub, "al-fail").await;
    dev.send(batch(vec![reading(1, "temp", base, 10.0)])).await;
    dev.ack_through(1).await;
    let mut other = connect(&hub.db_path()).await;
    for (seq, value, state, on) in [
        (2, 35.0, "active", "INSERT"),
        (3, 10.0, "cleared", "UPDATE"),
    ] {
        let ts = base + seq as i64 * 1_000;
        let inject = format!(
            "CREATE TRIGGER inject BEFORE {on} ON alarms BEGIN SELECT RAISE(ABORT, 'injected'); END"
        );
        sqlx::query(&inject).execute(&mut other).await.unwrap();
        refused(&mut dev, seq, ts, value).await;
        sqlx::query("DROP TRIGGER inject")
            .execute(&mut other)
            .await
            .unwrap();
        let before = crate::alarms::alarms_of(&http, "al-fail").await;
        let (again, welcome) = RawDevice::connect(&hub, "al-fail").await;
        dev = again;
        assert_eq!(welcome.acked_seq, seq - 1, "the true mark");
        match seq {
            2 => assert!(
                before.is_empty(),
                "an alarm from a failed commit: {before:?}"
            ),
            _ => assert_eq!(before[0]["state"], "active", "{before:?}"),
        }
        dev.send(batch(vec![reading(seq, "temp", ts, value)])).await;
        dev.ack_through(seq).await;
        let after = crate::alarms::alarms_of(&http, "al-fail").await;
        assert_eq!(after.len(), 1, "{after:?}");
        assert_eq!(after[0]["state"], state, "{after:?}");
        assert_eq!(after[0]["count"], 1);
    }
    let id = crate::alarms::alarms_of(&http, "al-fail").await[0]["id"].clone();
    assert_eq!(
        crate::alarms::history(&http, &id).await,
        ["raised", "cleared"],
        "one event each"
    );
    drop(dev);
    hub.assert_no_leaks().await;
}
