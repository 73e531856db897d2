//! Raw insert rate of the readings schema through the writer's own store
//! calls (one transaction per group, multi-row INSERTs into the staging
//! table, per-device progress updates, compaction into the clustered table
//! every COMPACT_ROWS), with no network and no sessions in front.
//!
//! `cargo bench -p hub --bench raw_insert`; env knobs: ROWS_PER_COMMIT (2000),
//! TOTAL_ROWS (2000000), DEVICES (1000), PER_BATCH (10 readings per device
//! batch), SYNC (full|normal|off), COMPACT_ROWS (the default setting).

use std::time::Instant;

use hub::config::{Settings, Synchronous};
use hub::domain::{DeviceHello, DeviceId, DeviceKey};
use hub::store::{self, DeviceProgress, RowToInsert};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rows_per_commit = env_or("ROWS_PER_COMMIT", 2000) as usize;
    let total = env_or("TOTAL_ROWS", 2_000_000) as usize;
    let devices = env_or("DEVICES", 1000) as usize;
    let per_batch = env_or("PER_BATCH", 10) as usize;
    let sync = match std::env::var("SYNC").as_deref() {
        Ok("normal") => Synchronous::Normal,
        Ok("off") => Synchronous::Off,
        _ => Synchronous::Full,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings::defaults().expect("defaults");
    let compact_rows = env_or("COMPACT_ROWS", settings.storage.compact_rows);
    settings.storage.path = dir.path().join("bench.db");
    settings.storage.synchronous = sync;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (reader, mut writer) = store::open(&settings.storage).await.expect("open store");
        let sensors = ["temperature", "humidity", "pressure", "battery"];
        let mut keys = Vec::new();
        let mut sensor_keys = Vec::new();
        {
            let mut tx = writer.begin().await.expect("begin");
            for d in 0..devices {
                let hello = DeviceHello {
                    device_id: DeviceId::parse(&format!("bench-{d:05}")).expect("id"),
                    firmware: "bench".into(),
                    labels: Default::default(),
                };
                let (key, _) = tx
                    .upsert_device(&hello, 0, &hub::auth::Proof::Admitted)
                    .await
                    .expect("device")
                    .expect("an open registration always succeeds");
                keys.push(key);
            }
            for s in sensors {
                sensor_keys.push(tx.sensor_key(s).await.expect("sensor"));
            }
            tx.commit().await.expect("commit");
        }

        // Rows arrive as the live system sees them: batches of `per_batch`
        // consecutive readings per device, devices interleaved.
        let mut next_seq = vec![1i64; devices];
        let base_ts = 1_767_225_600_000i64;
        let mut device_cursor = 0usize;
        let mut rows: Vec<RowToInsert> = Vec::with_capacity(rows_per_commit);
        let mut written = 0usize;
        let mut commits = 0usize;
        let mut staged = 0u64;
        let mut compactions = 0usize;
        let mut commit_ms: Vec<f64> = Vec::new();
        let mut compact_ms: Vec<f64> = Vec::new();
        let started = Instant::now();
        while written < total {
            rows.clear();
            let mut touched: Vec<(DeviceKey, i64)> = Vec::new();
            while rows.len() < rows_per_commit {
                let d = device_cursor % devices;
                device_cursor += 1;
                for _ in 0..per_batch {
                    let seq = next_seq[d];
                    next_seq[d] += 1;
                    rows.push(RowToInsert {
                        device: keys[d],
                        sensor: sensor_keys[(seq as usize) % sensor_keys.len()],
                        ts_ms: base_ts + seq * 10,
                        seq,
                        value: 20.0 + (seq % 100) as f64 / 10.0,
                    });
                }
                touched.push((keys[d], next_seq[d] - 1));
            }
            let commit_started = Instant::now();
            let mut tx = writer.begin().await.expect("begin");
            tx.insert_readings(&rows).await.expect("insert");
            let progress: Vec<DeviceProgress> = touched
                .iter()
                .map(|(device, mark)| DeviceProgress {
                    device: *device,
                    acked_seq: *mark as u64,
                    added: per_batch as u64,
                })
                .collect();
            tx.record_progress(&progress, 0).await.expect("progress");
            tx.commit().await.expect("commit");
            commit_ms.push(commit_started.elapsed().as_secs_f64() * 1000.0);
            written += rows.len();
            commits += 1;
            staged += rows.len() as u64;
            if staged >= compact_rows {
                let compact_started = Instant::now();
                writer.compact().await.expect("compact");
                compact_ms.push(compact_started.elapsed().as_secs_f64() * 1000.0);
                compactions += 1;
                staged = 0;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let stored = reader.total_readings().await.expect("count");
        reader.close().await;
        writer.close().await.expect("close");
        let bytes: u64 = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum();
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        println!(
            "raw_insert sync={sync:?} rows_per_commit={rows_per_commit} devices={devices} per_batch={per_batch} compact_rows={compact_rows}"
        );
        println!(
            "  commit p50 {:.1} ms; {compactions} compactions, p50 {:.0} ms",
            median(&mut commit_ms),
            median(&mut compact_ms)
        );
        println!(
            "  rows {written} (stored {stored}) in {elapsed:.2} s: {:.0} rows/s, {:.0} commits/s, {:.1} bytes/reading on disk (db+wal)",
            written as f64 / elapsed,
            commits as f64 / elapsed,
            bytes as f64 / written as f64
        );
    });
}
