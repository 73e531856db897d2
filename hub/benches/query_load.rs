//! Query figures against a running hub, for `scripts/bench.sh`.
//!
//! MODE=shapes: one sensor's day as 1-minute buckets (avg/min/max), the
//! same day as raw readings, and the whole device list (`hub devices`,
//! pages of 10,000). The first run of each is cold (the script restarts
//! the hub and drops the page cache first); then RUNS warm runs, p50/p99.
//! MODE=dashboard: 20 bucket queries a second (QPS) over DEVICES devices
//! for SECONDS, the load a few open dashboards make.
//! MODE=fleet: every one of DEVICES devices' DAYS (30) days of SENSOR as
//! BUCKET_MS (1 h) buckets (avg/min/max), CONCURRENCY (4) queries at once:
//! the wall time of the whole fleet, twice (the first pass cold), and the
//! per-query p50/p99.
//!
//! Env: HUB_ADDR, DEVICE_PREFIX (bf-), DEVICES (100), SENSOR (temperature),
//! UNTIL_MS (end of the day to read; default now), RUNS (20), QPS (20),
//! SECONDS (20).

use std::time::{Duration, Instant};

use telemetry_proto::v1::{self as pb, operator_client::OperatorClient};
use tonic::transport::Channel;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const DAY_MS: i64 = 86_400_000;

/// Rows (or buckets) the query returned.
async fn query(client: &mut OperatorClient<Channel>, req: pb::QueryReadingsRequest) -> usize {
    let mut stream = client
        .query_readings(req)
        .await
        .expect("query")
        .into_inner();
    let mut n = 0;
    while let Some(chunk) = stream.message().await.expect("chunk") {
        n += chunk.rows.len() + chunk.buckets.len();
    }
    n
}

async fn list_devices(client: &mut OperatorClient<Channel>) -> usize {
    let (mut after, mut n) = (String::new(), 0);
    loop {
        let page = client
            .list_devices(pb::ListDevicesRequest {
                after,
                limit: 10_000,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner()
            .devices;
        n += page.len();
        match page.last() {
            Some(last) if page.len() == 10_000 => after = last.device_id.clone(),
            _ => return n,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let addr = std::env::var("HUB_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let prefix = std::env::var("DEVICE_PREFIX").unwrap_or_else(|_| "bf-".into());
    let sensor = std::env::var("SENSOR").unwrap_or_else(|_| "temperature".into());
    let devices = env_or("DEVICES", 100).max(1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let until = std::env::var("UNTIL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(now);
    let since = until - DAY_MS;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(addr)
            .expect("hub URL")
            .connect()
            .await
            .expect("hub reachable");
        let mut client = OperatorClient::new(channel);
        let device = |i: u64| format!("{prefix}{:05}", i % devices + 1);
        let buckets = |i: u64| pb::QueryReadingsRequest {
            device_id: device(i),
            sensor: sensor.clone(),
            since_ms: Some(since),
            until_ms: Some(until),
            limit: 0,
            bucket_ms: 60_000,
            aggregates: vec![
                pb::Aggregate::Avg as i32,
                pb::Aggregate::Min as i32,
                pb::Aggregate::Max as i32,
            ],
        };
        match std::env::var("MODE").as_deref() {
            Ok("fleet") => {
                let days = env_or("DAYS", 30) as i64;
                let width = env_or("BUCKET_MS", 3_600_000) as i64;
                let concurrency = env_or("CONCURRENCY", 4).max(1) as usize;
                let request = |i: u64| pb::QueryReadingsRequest {
                    since_ms: Some(until - days * DAY_MS),
                    bucket_ms: width,
                    ..buckets(i)
                };
                for pass in ["cold", "warm"] {
                    let t = Instant::now();
                    let mut lat = Vec::new();
                    let mut total = 0;
                    let mut next = 0;
                    while next < devices {
                        let wave: Vec<_> = (next..(next + concurrency as u64).min(devices))
                            .map(|i| {
                                let mut client = client.clone();
                                let req = request(i);
                                async move {
                                    let t = Instant::now();
                                    let n = query(&mut client, req).await;
                                    (n, ms(t.elapsed()))
                                }
                            })
                            .collect();
                        for (n, l) in futures_util::future::join_all(wave).await {
                            total += n;
                            lat.push(l);
                        }
                        next += concurrency as u64;
                    }
                    let wall = ms(t.elapsed());
                    assert!(total > 0, "the fleet query returned nothing: is the data loaded?");
                    lat.sort_by(f64::total_cmp);
                    println!(
                        "fleet {pass}: {devices} devices x {days} days of {} ms buckets: {total} buckets in {wall:.0} ms \
                         ({concurrency} at once; per query p50 {:.1} ms p99 {:.1} ms)",
                        width,
                        pct(&lat, 0.5),
                        pct(&lat, 0.99)
                    );
                }
            }
            Ok("dashboard") => {
                let qps = env_or("QPS", 20).max(1);
                let seconds = env_or("SECONDS", 20);
                let mut tick = tokio::time::interval(Duration::from_secs(1) / qps as u32);
                let mut lat = Vec::new();
                let end = Instant::now() + Duration::from_secs(seconds);
                let mut i = 0;
                while Instant::now() < end {
                    tick.tick().await;
                    let t = Instant::now();
                    query(&mut client, buckets(i)).await;
                    lat.push(ms(t.elapsed()));
                    i += 1;
                }
                lat.sort_by(f64::total_cmp);
                println!(
                    "dashboard queries {} in {seconds} s  p50 {:.1} ms  p99 {:.1} ms",
                    lat.len(),
                    pct(&lat, 0.5),
                    pct(&lat, 0.99)
                );
            }
            _ => {
                let runs = env_or("RUNS", 20).max(1);
                let raw = |i: u64| pb::QueryReadingsRequest {
                    bucket_ms: 0,
                    aggregates: vec![],
                    ..buckets(i)
                };
                for shape in ["buckets", "raw", "devices"] {
                    let mut lat = Vec::new();
                    let mut count = 0;
                    for i in 0..=runs {
                        let t = Instant::now();
                        count = match shape {
                            "buckets" => query(&mut client, buckets(i)).await,
                            "raw" => query(&mut client, raw(i)).await,
                            _ => list_devices(&mut client).await,
                        };
                        lat.push(ms(t.elapsed()));
                    }
                    assert!(count > 0, "the {shape} query returned nothing: is the data loaded?");
                    let cold = lat.remove(0);
                    lat.sort_by(f64::total_cmp);
                    println!(
                        "query {shape:<8} rows {count:>7}  cold {cold:.1} ms  warm p50 {:.1} ms  p99 {:.1} ms",
                        pct(&lat, 0.5),
                        pct(&lat, 0.99)
                    );
                }
            }
        }
    });
}
