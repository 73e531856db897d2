//! The block codec on real data: every block of a hub's SQLite database
//! (`HUB_DB`, opened read-only) decoded and encoded again with this
//! build's codec. Prints, per sensor and in all: points, the bytes as
//! stored, as encoded now, and as one block per series (what a long-lived
//! series' sealed blocks approach), with encode and decode speed.
//!
//!   HUB_DB=/path/hub.db cargo bench -p hub --bench codec

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hub::store::codec::{self, Point};
use sqlx::Row;
use sqlx::sqlite::SqliteConnectOptions;

#[derive(Default)]
struct Sizes {
    points: u64,
    stored: u64,
    now: u64,
    merged: u64,
}

impl Sizes {
    fn add(&mut self, o: &Sizes) {
        self.points += o.points;
        self.stored += o.stored;
        self.now += o.now;
        self.merged += o.merged;
    }

    fn print(&self, name: &str) {
        let per = |b: u64| b as f64 / self.points.max(1) as f64;
        println!(
            "{name:<14} {:>10} points  stored {:>6.3} B/pt  encoded now {:>6.3} B/pt  one block per series {:>6.3} B/pt",
            self.points,
            per(self.stored),
            per(self.now),
            per(self.merged)
        );
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Ok(path) = std::env::var("HUB_DB") else {
        println!("codec: set HUB_DB to a hub's SQLite database to measure its blocks");
        return;
    };
    let opts = SqliteConnectOptions::new().filename(&path).read_only(true);
    let mut conn = sqlx::ConnectOptions::connect(&opts)
        .await
        .expect("open HUB_DB");
    let names: BTreeMap<i64, String> = sqlx::query("SELECT id, name FROM sensors")
        .fetch_all(&mut conn)
        .await
        .expect("sensors")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let rows = sqlx::query(
        "SELECT device_id, sensor_id, data FROM blocks ORDER BY device_id, sensor_id, first_ts",
    )
    .fetch_all(&mut conn)
    .await
    .expect("blocks");
    let mut by_sensor: BTreeMap<i64, Sizes> = BTreeMap::new();
    let (mut decode_t, mut encode_t, mut redecode_t) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut series: Vec<Point> = Vec::new();
    let mut current: Option<(i64, i64)> = None;
    let flush = |series: &mut Vec<Point>, sizes: &mut Sizes| {
        series.sort_unstable_by_key(Point::key);
        for chunk in series.chunks(8192) {
            sizes.merged += codec::encode(chunk).len() as u64;
        }
        series.clear();
    };
    for row in &rows {
        let key: (i64, i64) = (row.get(0), row.get(1));
        let data: &[u8] = row.get(2);
        if current.is_some_and(|c| c != key) {
            let c = current.expect("current");
            flush(&mut series, by_sensor.entry(c.1).or_default());
        }
        current = Some(key);
        let t = Instant::now();
        let points = codec::decode(data).expect("a stored block decodes");
        decode_t += t.elapsed();
        let t = Instant::now();
        let again = codec::encode(&points);
        encode_t += t.elapsed();
        let t = Instant::now();
        let back = codec::decode(&again).expect("re-encoded");
        redecode_t += t.elapsed();
        assert_eq!(back, points, "round trip");
        let s = by_sensor.entry(key.1).or_default();
        s.points += points.len() as u64;
        s.stored += data.len() as u64;
        s.now += again.len() as u64;
        series.extend(points);
    }
    if let Some(c) = current {
        flush(&mut series, by_sensor.entry(c.1).or_default());
    }
    let mut all = Sizes::default();
    for (id, s) in &by_sensor {
        s.print(names.get(id).map_or("?", String::as_str));
        all.add(s);
    }
    all.print("all");
    let ns = |d: Duration| d.as_nanos() as f64 / all.points.max(1) as f64;
    println!(
        "{} blocks; stored blocks decode in {:.1} ns/point; this build encodes them in {:.1} and decodes that in {:.1} ns/point",
        rows.len(),
        ns(decode_t),
        ns(encode_t),
        ns(redecode_t)
    );
}
