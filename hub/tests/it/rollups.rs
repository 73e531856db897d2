//! Rollups (`storage.rollups`): bucket queries that read them answer
//! exactly what the readings give, late and staged readings included; they
//! outlive raw retention; their own `keep` prunes them; one configured
//! later is built from what is stored, and one no longer configured goes.

use std::collections::BTreeMap;
use std::time::Duration;

use hub::config::RollupSetting;
use telemetry_proto::v1 as pb;

use crate::harness::*;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;

fn rollup(every: u64, keep: u64) -> RollupSetting {
    RollupSetting {
        every: Duration::from_secs(every),
        keep: Duration::from_secs(keep),
    }
}

/// (sensor, seq, ts_ms, value) of every reading sent.
type Sent = Vec<(String, u64, i64, f64)>;

/// count, sum, min, max, first, last.
type Agg = (u64, f64, f64, f64, f64, f64);

/// The buckets the readings give, by (sensor, start).
fn expected(
    sent: &Sent,
    width: i64,
    since: Option<i64>,
    until: Option<i64>,
) -> BTreeMap<(String, i64), Agg> {
    let mut sorted: Vec<&(String, u64, i64, f64)> = sent
        .iter()
        .filter(|r| since.is_none_or(|s| r.2 >= s) && until.is_none_or(|u| r.2 < u))
        .collect();
    sorted.sort_by_key(|r| (r.2, r.1));
    let mut out: BTreeMap<(String, i64), Agg> = BTreeMap::new();
    for (sensor, _, ts, v) in sorted {
        let start = ts.div_euclid(width) * width;
        out.entry((sensor.clone(), start))
            .and_modify(|a| {
                a.0 += 1;
                a.1 += v;
                a.2 = a.2.min(*v);
                a.3 = a.3.max(*v);
                a.5 = *v;
            })
            .or_insert((1, *v, *v, *v, *v, *v));
    }
    out
}

async fn buckets(
    hub: &TestHub,
    device: &str,
    width: i64,
    since: Option<i64>,
    until: Option<i64>,
) -> BTreeMap<(String, i64), Agg> {
    use pb::Aggregate::*;
    hub.query(pb::QueryReadingsRequest {
        device_id: device.into(),
        since_ms: since,
        until_ms: until,
        bucket_ms: width,
        aggregates: [Count, Sum, Min, Max, First, Last]
            .map(|a| a as i32)
            .to_vec(),
        ..Default::default()
    })
    .await
    .into_iter()
    .flat_map(|c| c.buckets)
    .map(|b| {
        let agg = (
            b.count,
            b.sum.unwrap(),
            b.min.unwrap(),
            b.max.unwrap(),
            b.first.unwrap(),
            b.last.unwrap(),
        );
        ((b.sensor, b.bucket_start_ms), agg)
    })
    .collect()
}

/// Equal but for the order sums were added in.
fn assert_same(
    got: &BTreeMap<(String, i64), Agg>,
    want: &BTreeMap<(String, i64), Agg>,
    what: &str,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: buckets"
    );
    for (key, w) in want {
        let g = &got[key];
        assert!(
            g.0 == w.0 && g.2 == w.2 && g.3 == w.3 && g.4 == w.4 && g.5 == w.5,
            "{what} {key:?}: got {g:?}, want {w:?}"
        );
        assert!(
            (g.1 - w.1).abs() <= 1e-9 * w.1.abs().max(1.0),
            "{what} {key:?}: sum {} vs {}",
            g.1,
            w.1
        );
    }
}

/// A value with two decimals, as sensors report.
fn value(i: u64) -> f64 {
    ((i * 7919) % 2000) as f64 / 100.0 - 10.0
}

/// Sends `readings` as one batch and waits for its ack.
async fn send(dev: &mut RawDevice, sent: &mut Sent, readings: Vec<(&str, u64, i64, f64)>) {
    let last = readings.iter().map(|r| r.1).max().unwrap();
    dev.send(batch(
        readings
            .iter()
            .map(|&(s, seq, ts, v)| reading(seq, s, ts, v))
            .collect(),
    ))
    .await;
    let (_, rejected, dups) = dev.ack_through(last).await;
    assert_eq!((rejected, dups), (0, 0));
    sent.extend(
        readings
            .into_iter()
            .map(|(s, seq, ts, v)| (s.to_owned(), seq, ts, v)),
    );
}

/// 600 readings over ~3 hours on two sensors, then late ones into
/// intervals already compacted (one ties the first reading's ts with a
/// higher seq, one comes before it), then a few left staged.
async fn load(dev: &mut RawDevice, t0: i64) -> Sent {
    let mut sent = Sent::new();
    let mut seq = 0;
    for _ in 0..12 {
        let mut b = Vec::new();
        for _ in 0..50 {
            seq += 1;
            let sensor = if seq % 3 == 0 { "h" } else { "t" };
            b.push((sensor, seq, t0 + 5_000 + seq as i64 * 17_000, value(seq)));
        }
        send(dev, &mut sent, b).await;
    }
    let mut late = vec![
        ("t", 601, t0 + 5_000 + 17_000, 99.0), // the ts of seq 1, after it
        ("t", 602, t0 + 1_000, -42.5),         // before everything
        ("h", 603, t0 + HOUR + 59_999, 55.25),
    ];
    for i in 0..37u64 {
        late.push((
            "t",
            604 + i,
            t0 + (i as i64 * 4_321_987) % (3 * HOUR),
            value(i + 1000),
        ));
    }
    send(dev, &mut sent, late).await;
    // Fewer than a compaction takes: still staged when queried, one in an
    // early interval.
    send(
        dev,
        &mut sent,
        vec![
            ("t", 700, t0 + 30 * MIN + 7, 1.5),
            ("t", 701, t0 + 3 * HOUR + 10, 2.5),
            ("h", 702, t0 + 3 * HOUR + 20, 3.5),
        ],
    )
    .await;
    sent
}

/// A rollup's intervals as stored, by (sensor, start).
async fn stored(db: &mut DbConn, every_ms: i64) -> BTreeMap<(String, i64), Agg> {
    const SQL: &str = "SELECT s.name, r.chunk_ms, r.data FROM rollups r \
         JOIN sensors s ON s.id = r.sensor_id WHERE r.every_ms = $1";
    let rows: Vec<(String, i64, Vec<u8>)> = match db {
        DbConn::Sqlite(c) => sqlx::query_as(SQL).bind(every_ms).fetch_all(c).await,
        DbConn::Postgres(c) => sqlx::query_as(SQL).bind(every_ms).fetch_all(c).await,
    }
    .unwrap();
    let mut out = BTreeMap::new();
    for (sensor, chunk_ms, data) in rows {
        for (start, a) in hub::store::rollups::decode_chunk(chunk_ms, every_ms, &data).unwrap() {
            out.insert(
                (sensor.clone(), start),
                (a.count, a.sum, a.min, a.max, a.first, a.last),
            );
        }
    }
    out
}

fn counted(rollup: &BTreeMap<(String, i64), Agg>) -> i64 {
    rollup.values().map(|a| a.0 as i64).sum()
}

async fn rollups_ready(hub: &TestHub, every_ms: i64) {
    let mut db = DbConn::open(&hub.settings).await;
    let sql = format!("SELECT count(*) FROM rollup_defs WHERE every_ms = {every_ms} AND ready = 1");
    wait_until("the rollup is built", async || {
        db.scalar::<i64>(&sql).await == 1
    })
    .await;
}

/// Every query shape against what the readings give.
async fn check_queries(hub: &TestHub, device: &str, sent: &Sent, t0: i64) {
    let shapes: [(i64, Option<i64>, Option<i64>); 7] = [
        (MIN, None, None),
        (5 * MIN, Some(t0 + 12_345), Some(t0 + 2 * HOUR + 777)),
        (HOUR, None, None),
        (2 * HOUR, Some(t0 - HOUR), None),
        (MIN, Some(t0 + 61_000), Some(t0 + 3 * MIN + 5)),
        // Not a multiple of any rollup: raw.
        (90_000, None, None),
        (7_000, Some(t0), Some(t0 + 10 * MIN)),
    ];
    for (width, since, until) in shapes {
        let got = buckets(hub, device, width, since, until).await;
        let want = expected(sent, width, since, until);
        assert!(!want.is_empty());
        assert_same(
            &got,
            &want,
            &format!("width {width} since {since:?} until {until:?}"),
        );
    }
}

#[tokio::test]
async fn bucket_queries_on_rollups_give_what_the_readings_give_late_and_staged_ones_included() {
    let mut hub = spawn_hub_with(|s| {
        s.storage.rollups = vec![rollup(60, 0), rollup(3600, 0)];
        // A compaction every 8 staged rows: most readings are in blocks
        // (and rollups) when queried.
        s.storage.compact_rows = 64;
    })
    .await;
    rollups_ready(&hub, HOUR).await;
    let t0 = (now_ms() - 4 * HOUR).div_euclid(HOUR) * HOUR;
    let (mut dev, _) = RawDevice::connect(&hub, "roll-1").await;
    let sent = load(&mut dev, t0).await;
    check_queries(&hub, "roll-1", &sent, t0).await;

    // Each reading is in each rollup once: those still staged are not yet.
    let mut db = DbConn::open(&hub.settings).await;
    let staged: i64 = db.scalar("SELECT count(*) FROM readings_recent").await;
    assert!(staged > 0, "some readings are still staged");
    for every in [MIN, HOUR] {
        let counted = counted(&stored(&mut db, every).await);
        assert_eq!(counted + staged, sent.len() as i64, "rollup {every}");
    }
    drop(dev);
    if !on_postgres() {
        // A clean stop compacts the rest: the rollup is every reading.
        hub.stop().await;
        assert_same(
            &stored(&mut db, MIN).await,
            &expected(&sent, MIN, None, None),
            "stored 1m rollup",
        );
    }
}

#[tokio::test]
async fn rollups_keep_the_shape_after_raw_retention_and_their_own_keep_prunes_them() {
    let mut hub = spawn_hub_with(|s| {
        s.storage.rollups = vec![rollup(1, 3600), rollup(60, 0)];
        s.storage.compact_rows = 64;
    })
    .await;
    rollups_ready(&hub, MIN).await;
    let t0 = (now_ms() - 5 * HOUR).div_euclid(HOUR) * HOUR;
    let (mut dev, _) = RawDevice::connect(&hub, "roll-2").await;
    let sent = load(&mut dev, t0).await;
    drop(dev);
    // The readings age out: retention (which refuses readings older than
    // it) is switched on.
    hub.stop().await;
    hub.settings.storage.retention = Duration::from_secs(10);
    hub.restart().await;
    let mut db = DbConn::open(&hub.settings).await;
    wait_until_within(
        "raw readings and the 1 s rollup's rows are deleted",
        Duration::from_secs(60),
        async || {
            let raw: i64 = db
                .scalar(
                    "SELECT (SELECT count(*) FROM blocks) + (SELECT count(*) FROM readings_recent)",
                )
                .await;
            let fine: i64 = db
                .scalar("SELECT count(*) FROM rollups WHERE every_ms = 1000")
                .await;
            raw == 0 && fine == 0
        },
    )
    .await;
    assert!(
        hub.readings("roll-2").await.is_empty(),
        "raw readings are gone"
    );
    // The 1 m rollup answers whole minutes and their multiples exactly.
    for (width, since, until) in [(MIN, None, None), (HOUR, Some(t0), Some(t0 + 3 * HOUR))] {
        let got = buckets(&hub, "roll-2", width, since, until).await;
        assert_same(
            &got,
            &expected(&sent, width, since, until),
            &format!("width {width}"),
        );
    }
    // A 10 s bucket could only come from the 1 s rollup, pruned: nothing,
    // never a guess.
    assert!(buckets(&hub, "roll-2", 10_000, None, None).await.is_empty());
}

#[tokio::test]
async fn a_rollup_configured_later_is_built_from_what_is_stored_and_one_dropped_goes() {
    let mut hub = spawn_hub_with(|s| s.storage.compact_rows = 64).await;
    let t0 = (now_ms() - 4 * HOUR).div_euclid(HOUR) * HOUR;
    let (mut dev, _) = RawDevice::connect(&hub, "roll-3").await;
    let sent = load(&mut dev, t0).await;
    drop(dev);
    hub.stop().await;
    hub.settings.storage.rollups = vec![rollup(60, 0)];
    hub.restart().await;
    rollups_ready(&hub, MIN).await;
    let mut db = DbConn::open(&hub.settings).await;
    let staged: i64 = db.scalar("SELECT count(*) FROM readings_recent").await;
    let counted = counted(&stored(&mut db, MIN).await);
    assert_eq!(
        counted + staged,
        sent.len() as i64,
        "built from every block"
    );
    check_queries(&hub, "roll-3", &sent, t0).await;

    hub.stop().await;
    hub.settings.storage.rollups = Vec::new();
    hub.restart().await;
    let defs: i64 = db.scalar("SELECT count(*) FROM rollup_defs").await;
    let rows: i64 = db.scalar("SELECT count(*) FROM rollups").await;
    assert_eq!(
        (defs, rows),
        (0, 0),
        "a rollup no longer configured is dropped"
    );
    check_queries(&hub, "roll-3", &sent, t0).await;
}
