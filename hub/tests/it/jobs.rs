//! Jobs (issue 21): a rollout to simulated devices keeps its rate and its
//! concurrency, stops at its abort threshold, and resumes after a SIGKILL
//! without sending anything twice. Run on SQLite and, with
//! HUB_TEST_BACKEND=postgres, on PostgreSQL.

use std::time::Duration;

use serde_json::{Value, json};

use crate::crash::ChildHub;
use crate::harness::*;

async fn tag_all(http: &str, devices: impl Iterator<Item = String>, tag: &str) {
    let client = reqwest::Client::new();
    for d in devices {
        let resp = client
            .patch(format!("{http}/api/v1/devices/{d}/twin"))
            .json(&json!({"tags": {"wave": tag}}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{d}: {}", resp.status());
    }
}

async fn create_job(http: &str, job: Value) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{http}/api/v1/jobs"))
        .json(&job)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

async fn get(url: String) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// Waits for the job to reach a final state; the job.
async fn finished(http: &str, id: i64, within: Duration) -> Value {
    let mut job = Value::Null;
    wait_until_within("the job finishes", within, async || {
        job = get(format!("{http}/api/v1/jobs/{id}")).await;
        !matches!(job["state"].as_str(), Some("in_progress" | "paused"))
    })
    .await;
    job
}

async fn all_devices(http: &str, id: i64) -> Vec<Value> {
    let body = get(format!("{http}/api/v1/jobs/{id}/devices?limit=1000")).await;
    body["devices"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_keeps_its_rate_and_concurrency_over_100_devices() {
    let hub = spawn_hub().await;
    let http = hub.http_url();
    let stop = tokio_util::sync::CancellationToken::new();
    let stats = std::sync::Arc::new(device_sim::FleetStats::default());
    let cfg = device_sim::FleetConfig {
        hub: hub.url(),
        devices: 100,
        rate_hz: 0.2,
        id_prefix: "job-".into(),
        twin: true,
        // Each device takes a while to apply its desired state: the
        // concurrency limit binds as well as the rate.
        twin_apply_delay: Duration::from_millis(250),
        ..Default::default()
    };
    let fleet = tokio::spawn(device_sim::run(cfg, stop.clone(), stats.clone()));
    wait_until("100 devices online", async || {
        device_sim::FleetStats::get(&stats.online) == 100
    })
    .await;
    tag_all(&http, (1..=100).map(|i| format!("job-{i:05}")), "w1").await;
    let job = create_job(
        &http,
        json!({"name": "rate-2hz", "target": {"tags": {"wave": "w1"}},
               "desired": {"sample_rate_hz": 2},
               "rollout": {"per_minute": 600}, "concurrency": 3, "timeout": "30s"}),
    )
    .await;
    assert_eq!(job["total"], 100);
    let id = job["id"].as_i64().unwrap();
    let job = finished(&http, id, Duration::from_secs(90)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["counts"]["succeeded"], 100);
    let devices = all_devices(&http, id).await;
    assert_eq!(devices.len(), 100);
    let mut spans: Vec<(i64, i64)> = devices
        .iter()
        .map(|d| {
            (
                d["started_ms"].as_i64().unwrap(),
                d["finished_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    spans.sort_unstable();
    // Rate: 10 a second, with at most half a second's burst: in any 2 s
    // window at most 25 starts; and 100 take at least 9 s.
    let starts: Vec<i64> = spans.iter().map(|s| s.0).collect();
    for (i, &t) in starts.iter().enumerate() {
        let in_window = starts[i..].iter().take_while(|&&s| s < t + 2_000).count();
        assert!(in_window <= 25, "{in_window} starts in 2 s from {t}");
    }
    let took = starts[99] - starts[0];
    assert!(
        took >= 9_000,
        "100 devices at 10/s started within {took} ms"
    );
    // Concurrency: never more than 3 in progress at once (a device is in
    // progress from its start until its result was recorded).
    let mut events: Vec<(i64, i32)> = spans.iter().flat_map(|&(s, f)| [(s, 1), (f, -1)]).collect();
    events.sort_unstable_by_key(|&(t, d)| (t, d));
    let mut now = 0;
    let mut most = 0;
    for (_, d) in events {
        now += d;
        most = most.max(now);
    }
    assert!(most <= 3, "{most} devices in progress at once");
    // And every device got the change once.
    for d in &devices {
        assert_eq!(d["desired_version"], 1, "{d}");
    }
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, fleet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_aborts_at_its_threshold_when_devices_fail() {
    let hub = spawn_hub().await;
    let http = hub.http_url();
    let fleet = SimFleet::start(&hub, "jab-", 40).await;
    tag_all(&http, (1..=40).map(|i| format!("jab-{i:05}")), "bad").await;
    // The simulated devices fail this command on purpose.
    let job = create_job(
        &http,
        json!({"name": "doomed", "target": {"tags": {"wave": "bad"}},
               "command": {"name": "fail", "params": {"message": "no space left"}},
               "rollout": {"per_minute": 1200}, "concurrency": 2,
               "abort": {"failed_count": 4}}),
    )
    .await;
    let id = job["id"].as_i64().unwrap();
    let job = finished(&http, id, Duration::from_secs(30)).await;
    assert_eq!(job["state"], "aborted", "{job}");
    assert!(
        job["reason"].as_str().unwrap().contains("more than 4"),
        "{job}"
    );
    let c = &job["counts"];
    let failed = c["failed"].as_u64().unwrap();
    // Stopped at the fifth failure, give or take those in flight.
    assert!((5..=7).contains(&failed), "{job}");
    assert_eq!(c["succeeded"], 0);
    assert_eq!(
        failed + c["cancelled"].as_u64().unwrap(),
        40,
        "the rest cancelled: {job}"
    );
    let devices = all_devices(&http, id).await;
    let detail = devices.iter().find(|d| d["state"] == "failed").unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.contains("no space left"), "{detail}");
    // Finished jobs cannot be paused.
    let resp = reqwest::Client::new()
        .post(format!("{http}/api/v1/jobs/{id}/pause"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resumes_after_a_sigkill_and_sends_nothing_twice() {
    let db = TestDb::new().await;
    let grpc = reserve_port();
    let http_port = reserve_port();
    let http = format!("http://127.0.0.1:{}", http_port.port);
    let listen = format!("127.0.0.1:{}", http_port.port);
    let env = [("HUB__HTTP__LISTEN", listen.as_str())];
    let mut child = ChildHub::start_with_env(&db, grpc.port, &env);
    child.wait_line("listening on").await;
    let url = format!("http://127.0.0.1:{}", grpc.port);
    let start_fleet = |n: usize| {
        let stop = tokio_util::sync::CancellationToken::new();
        let stats = std::sync::Arc::new(device_sim::FleetStats::default());
        let cfg = device_sim::FleetConfig {
            hub: url.clone(),
            devices: n,
            rate_hz: 0.2,
            id_prefix: "jkl-".into(),
            ..Default::default()
        };
        let task = tokio::spawn(device_sim::run(cfg, stop.clone(), stats.clone()));
        (stop, stats, task)
    };
    let (stop, stats, task) = start_fleet(60);
    wait_until("60 devices online", async || {
        device_sim::FleetStats::get(&stats.online) == 60
    })
    .await;
    tag_all(&http, (1..=60).map(|i| format!("jkl-{i:05}")), "k").await;
    let job = create_job(
        &http,
        json!({"name": "pings", "target": {"tags": {"wave": "k"}},
               "command": {"name": "ping"}, "rollout": {"per_minute": 600},
               "concurrency": 4}),
    )
    .await;
    let id = job["id"].as_i64().unwrap();
    wait_until("a third of the job done", async || {
        get(format!("{http}/api/v1/jobs/{id}")).await["counts"]["succeeded"]
            .as_u64()
            .unwrap_or(0)
            >= 20
    })
    .await;
    let (_, killed) = child.kill().await;
    assert!(killed);
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, task).await;

    let mut child = ChildHub::start_with_env(&db, grpc.port, &env);
    child.wait_line("listening on").await;
    let (stop, stats, task) = start_fleet(60);
    wait_until("60 devices back", async || {
        device_sim::FleetStats::get(&stats.online) == 60
    })
    .await;
    let job = finished(&http, id, Duration::from_secs(60)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["counts"]["succeeded"], 60);
    // One ping per device in the command log: nothing sent twice.
    for i in 1..=60 {
        let device = format!("jkl-{i:05}");
        let commands = get(format!("{http}/api/v1/commands?device={device}")).await;
        let pings: Vec<&Value> = commands["commands"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["name"] == "ping")
            .collect();
        assert_eq!(pings.len(), 1, "{device}: {pings:?}");
    }
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, task).await;
    drop(child);
}

/// A device's timeout counts while a hub drives the job: after a restart
/// that outlasted the timeout, a device still in progress gets its whole
/// timeout again, not a "timed out" at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_while_no_hub_drove_a_job_does_not_time_its_devices_out() {
    let mut hub = spawn_hub().await;
    // Known, then offline: its command waits and never completes.
    let (dev, _) = RawDevice::connect(&hub, "jto-1").await;
    drop(dev);
    tag_all(&hub.http_url(), std::iter::once("jto-1".to_owned()), "t").await;
    let job = create_job(
        &hub.http_url(),
        json!({"name": "slow", "target": {"tags": {"wave": "t"}},
               "command": {"name": "ping"}, "concurrency": 1, "timeout": "3s"}),
    )
    .await;
    let id = job["id"].as_i64().unwrap();
    wait_until("the device in progress", async || {
        all_devices(&hub.http_url(), id).await[0]["state"] == "in_progress"
    })
    .await;
    hub.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    hub.restart().await;
    let restarted = now_ms();
    // Rounds run every 100 ms: a second is plenty for a wrong time-out.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let devices = all_devices(&hub.http_url(), id).await;
    assert_eq!(devices[0]["state"], "in_progress", "{devices:?}");
    let job = finished(&hub.http_url(), id, Duration::from_secs(20)).await;
    assert_eq!(job["state"], "failed", "{job}");
    let devices = all_devices(&hub.http_url(), id).await;
    assert_eq!(devices[0]["state"], "timed_out", "{devices:?}");
    let at = devices[0]["finished_ms"].as_i64().unwrap();
    assert!(
        at - restarted >= 2_900,
        "timed out {} ms after the restart",
        at - restarted
    );
    hub.stop().await;
}
