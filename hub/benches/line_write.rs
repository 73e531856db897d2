//! Line-protocol ingest against a running hub: WORKERS clients post every
//! device's backlog as InfluxDB lines (4 fields a line, values at sensor
//! resolution, like device-sim's), one device per request as Telegraf
//! posts per host, and wait for each 204 (given after the commit).
//! Prints readings/s over the wall time and request latency percentiles.
//!
//! Run by `scripts/bench-lines.sh`. Env: HUB_HTTP (http://127.0.0.1:8080),
//! DEVICES (1000), RATE (100 readings/s per device), SECONDS (30: the
//! backlog's length), LINES (250 lines, 1000 readings, a request), WORKERS
//! (8), GZIP (0; 1 gzips every body).

use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Mutex;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every request's body, device by device, in time order.
fn bodies(devices: u64, rate: u64, seconds: u64, lines: u64, gzip: bool) -> Vec<(Vec<u8>, u64)> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // 4 sensors a line: a line every 4 readings.
    let per_device = rate * seconds / 4;
    let step_ms = (4000 / rate.max(1)).max(1);
    let start = now_ms - per_device * step_ms - 1000;
    let mut out = Vec::new();
    for d in 0..devices {
        let mut i = 0;
        while i < per_device {
            let n = lines.min(per_device - i);
            let mut text = String::with_capacity(n as usize * 100);
            for k in i..i + n {
                let x = (k as f64 / 50.0 + d as f64).sin();
                let ts = start + k * step_ms;
                text.push_str(&format!(
                    "env,device=lp-{d:05} temp={:.2},hum={:.1},pressure={:.1},vibration={:.3} {ts}\n",
                    21.0 + 3.0 * x,
                    45.0 + 10.0 * x,
                    1013.0 + x,
                    0.2 * x * x
                ));
            }
            let body = if gzip {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(text.as_bytes()).unwrap();
                gz.finish().unwrap()
            } else {
                text.into_bytes()
            };
            out.push((body, n * 4));
            i += n;
        }
    }
    out
}

fn main() {
    let base = std::env::var("HUB_HTTP").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let devices = env_or("DEVICES", 1000).max(1);
    let rate = env_or("RATE", 100).max(4);
    let seconds = env_or("SECONDS", 30).max(1);
    let lines = env_or("LINES", 250).max(1);
    let workers = env_or("WORKERS", 8).max(1);
    let gzip = env_or("GZIP", 0) == 1;
    let all = bodies(devices, rate, seconds, lines, gzip);
    let wire: usize = all.iter().map(|(b, _)| b.len()).sum();
    let readings: u64 = all.iter().map(|(_, n)| n).sum();
    // Workers take devices in turn: one device's requests stay in order.
    let mut queues: Vec<Vec<(Vec<u8>, u64)>> = (0..workers).map(|_| Vec::new()).collect();
    let per_device = all.len() / devices as usize;
    for (i, body) in all.into_iter().enumerate() {
        let device = i / per_device.max(1);
        queues[device % workers as usize].push(body);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let client = reqwest::Client::new();
        let url = format!("{base}/api/v1/write?precision=ms");
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for queue in queues {
            let (client, url, latencies) = (client.clone(), url.clone(), Arc::clone(&latencies));
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::with_capacity(queue.len());
                for (body, _) in queue {
                    let sent = Instant::now();
                    let mut req = client.post(&url).body(body);
                    if gzip {
                        req = req.header("content-encoding", "gzip");
                    }
                    let res = req.send().await.expect("hub reachable");
                    let status = res.status();
                    assert_eq!(status.as_u16(), 204, "{}", res.text().await.unwrap_or_default());
                    mine.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                latencies.lock().await.extend(mine);
            }));
        }
        for t in tasks {
            t.await.expect("worker");
        }
        let elapsed = started.elapsed().as_secs_f64();
        let mut l = latencies.lock().await.clone();
        l.sort_by(f64::total_cmp);
        let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
        println!(
            "line_write readings {readings} in {elapsed:.1} s: {:.0} readings/s; {} requests of {} readings, p50 {:.1} ms p99 {:.1} ms; {:.1} bytes a reading on the wire{}",
            readings as f64 / elapsed,
            l.len(),
            lines * 4,
            pct(0.5),
            pct(0.99),
            wire as f64 / readings as f64,
            if gzip { " (gzip)" } else { "" }
        );
    });
}
