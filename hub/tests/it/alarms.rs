//! Alarms (issue 21): rules evaluated on committed readings in their
//! timestamps' order (controlled here through backfilled timestamps),
//! inactivity on the hub's clock, the lifecycle through the HTTP API, and
//! webhooks from the persistent outbox across a SIGKILL. Run on SQLite and,
//! with HUB_TEST_BACKEND=postgres, on PostgreSQL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::crash::ChildHub;
use crate::harness::*;

pub(crate) async fn put_rule(http: &str, name: &str, rule: Value) -> Value {
    let resp = reqwest::Client::new()
        .put(format!("{http}/api/v1/alarm-rules/{name}"))
        .json(&rule)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    body
}

pub(crate) async fn alarms_of(http: &str, device: &str) -> Vec<Value> {
    let body: Value = reqwest::get(format!("{http}/api/v1/alarms?device={device}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["alarms"].as_array().unwrap().clone()
}

pub(crate) async fn post(http: &str, path: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{http}/api/v1{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// The kinds of an alarm's events, oldest first.
pub(crate) async fn history(http: &str, id: &Value) -> Vec<String> {
    let detail: Value = reqwest::get(format!("{http}/api/v1/alarms/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    detail["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// Sends (ts, value) readings of `sensor` as one batch per 5, seqs from
/// `first`, and waits for their acks.
async fn send_series(dev: &mut RawDevice, first: u64, sensor: &str, points: &[(i64, f64)]) -> u64 {
    let mut seq = first;
    for chunk in points.chunks(5) {
        let readings = chunk
            .iter()
            .map(|&(ts, v)| {
                let r = reading(seq, sensor, ts, v);
                seq += 1;
                r
            })
            .collect();
        dev.send(batch(readings)).await;
    }
    dev.ack_through(seq - 1).await;
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_with_hysteresis_raises_and_clears_exactly_once() {
    let hub = spawn_hub().await;
    let http = hub.http_url();
    let rule = put_rule(
        &http,
        "hot",
        json!({"severity": "major", "description": "too warm",
               "target": {"device": "al-hyst"},
               "threshold": {"sensor": "temp", "raise": "> 30", "raise_for": "1m",
                             "clear": "< 28", "clear_for": "1m"}}),
    )
    .await;
    assert_eq!(rule["version"], 1);
    let (mut dev, _) = RawDevice::connect(&hub, "al-hyst").await;
    // An hour ago, 10 s apart: above 30 from +40 s (after a dip at +30 s),
    // so raised at +100 s; in the band, above again briefly, then below 28
    // from +150 s: cleared at +210 s.
    let base = now_ms() - 3_600_000;
    let values = [
        25.0, 31.0, 32.0, 29.0, 31.0, 31.0, 31.0, 31.0, 31.0, 31.0, 31.0, 29.0, 29.5, 31.0, 29.0,
        27.0, 27.0, 27.0, 27.0, 27.0, 27.0, 27.0, 29.0, 27.0,
    ];
    let points: Vec<(i64, f64)> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (base + i as i64 * 10_000, *v))
        .collect();
    // Another sensor of the device, and another device, are not watched.
    let next = send_series(&mut dev, 1, "temp", &points).await;
    let next = send_series(
        &mut dev,
        next,
        "hum",
        &[(base, 99.0), (base + 90_000, 99.0)],
    )
    .await;
    let alarms = alarms_of(&http, "al-hyst").await;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    let a = &alarms[0];
    assert_eq!(a["state"], "cleared");
    assert_eq!(a["count"], 1);
    assert_eq!(a["severity"], "major");
    assert_eq!(a["sensor"], "temp");
    assert_eq!(a["value"], 31.0);
    assert_eq!(a["started_ms"], base + 40_000);
    assert_eq!(a["raised_ms"], base + 100_000);
    assert_eq!(a["cleared_ms"], base + 210_000);
    assert_eq!(a["cleared_by"], "rule");
    assert_eq!(history(&http, &a["id"]).await, ["raised", "cleared"]);

    // Late readings (stamped before the newest evaluated one) are stored
    // but raise nothing, however hot.
    let late: Vec<(i64, f64)> = (0..8).map(|i| (base + 5_000 + i * 10_000, 90.0)).collect();
    let next = send_series(&mut dev, next, "temp", &late).await;
    assert_eq!(alarms_of(&http, "al-hyst").await.len(), 1);

    // New readings past the newest do: 90 held for a minute raises again.
    let fresh: Vec<(i64, f64)> = (0..7)
        .map(|i| (base + 300_000 + i * 10_000, 90.0))
        .collect();
    send_series(&mut dev, next, "temp", &fresh).await;
    let alarms = alarms_of(&http, "al-hyst").await;
    assert_eq!(alarms.len(), 2, "{alarms:?}");
    assert_eq!(alarms[0]["state"], "active");
    assert_eq!(alarms[0]["started_ms"], base + 300_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_acknowledge_and_clear_and_a_cleared_condition_must_hold_again() {
    let hub = spawn_hub().await;
    let http = hub.http_url();
    put_rule(
        &http,
        "over",
        json!({"severity": "critical", "target": {"device": "al-ack"},
               "threshold": {"sensor": "p", "raise": ">= 10"}}),
    )
    .await;
    let (mut dev, _) = RawDevice::connect(&hub, "al-ack").await;
    let base = now_ms() - 600_000;
    let next = send_series(&mut dev, 1, "p", &[(base, 12.0)]).await;
    let alarms = alarms_of(&http, "al-ack").await;
    assert_eq!(alarms.len(), 1);
    let id = alarms[0]["id"].as_i64().unwrap();
    assert_eq!(alarms[0]["state"], "active");

    let (status, acked) = post(
        &http,
        &format!("/alarms/{id}/ack"),
        json!({"note": "on it"}),
    )
    .await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["state"], "acknowledged");
    assert_eq!(acked["ack_note"], "on it");
    assert_eq!(acked["acked_by"], "open");
    // Still above: a re-trigger is counted on the same alarm only after
    // the condition broke and held again.
    let next = send_series(
        &mut dev,
        next,
        "p",
        &[(base + 1_000, 13.0), (base + 2_000, 5.0)],
    )
    .await;
    let alarms = alarms_of(&http, "al-ack").await;
    assert_eq!(alarms.len(), 1);
    assert_eq!(
        alarms[0]["state"], "cleared",
        "cleared by the rule: {alarms:?}"
    );

    let next = send_series(&mut dev, next, "p", &[(base + 3_000, 11.0)]).await;
    let alarms = alarms_of(&http, "al-ack").await;
    assert_eq!(alarms.len(), 2);
    let id = alarms[0]["id"].as_i64().unwrap();
    let (status, cleared) = post(
        &http,
        &format!("/alarms/{id}/clear"),
        json!({"note": "known"}),
    )
    .await;
    assert_eq!(status, 200, "{cleared}");
    assert_eq!(cleared["state"], "cleared");
    assert_eq!(cleared["cleared_by"], "open");
    let (status, _) = post(&http, &format!("/alarms/{id}/ack"), json!({})).await;
    assert_eq!(status, 409, "a cleared alarm cannot be acknowledged");
    let (status, _) = post(&http, "/alarms/999999/ack", json!({})).await;
    assert_eq!(status, 404);
    // After an operator's clear the condition must hold anew: the next
    // reading above raises a new alarm (raise_for 0).
    let next = send_series(&mut dev, next, "p", &[(base + 4_000, 11.0)]).await;
    let alarms = alarms_of(&http, "al-ack").await;
    assert_eq!(alarms.len(), 3);
    assert_eq!(alarms[0]["state"], "active");

    // Deleting the rule clears its open alarms.
    let resp = reqwest::Client::new()
        .delete(format!("{http}/api/v1/alarm-rules/over"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let alarms = alarms_of(&http, "al-ack").await;
    assert_eq!(alarms[0]["state"], "cleared");
    assert_eq!(alarms[0]["cleared_by"], "rule deleted");

    // Changing what a rule watches clears its open alarms ("rule
    // changed"); changing only its severity or hold time does not.
    put_rule(
        &http,
        "over2",
        json!({"severity": "minor", "target": {"device": "al-ack"},
               "threshold": {"sensor": "p", "raise": ">= 10"}}),
    )
    .await;
    send_series(&mut dev, next + 1, "p", &[(base + 5_000, 12.0)]).await;
    let open = |alarms: Vec<Value>| {
        alarms
            .into_iter()
            .filter(|a| a["rule"] == "over2" && a["state"] == "active")
            .count()
    };
    assert_eq!(open(alarms_of(&http, "al-ack").await), 1);
    put_rule(
        &http,
        "over2",
        json!({"severity": "major", "target": {"device": "al-ack"},
               "threshold": {"sensor": "p", "raise": ">= 10", "raise_for": "1s"}}),
    )
    .await;
    assert_eq!(open(alarms_of(&http, "al-ack").await), 1);
    let changed = put_rule(
        &http,
        "over2",
        json!({"severity": "major", "target": {"device": "al-ack"},
               "threshold": {"sensor": "q", "raise": ">= 10"}}),
    )
    .await;
    assert_eq!(changed["version"], 3);
    let alarms = alarms_of(&http, "al-ack").await;
    assert_eq!(alarms[0]["rule"], "over2");
    assert_eq!(alarms[0]["state"], "cleared");
    assert_eq!(alarms[0]["cleared_by"], "rule changed");

    // Bad rules are refused with a reason.
    let resp = reqwest::Client::new()
        .put(format!("{http}/api/v1/alarm-rules/bad"))
        .json(&json!({"severity": "major", "threshold": {"sensor": "p", "raise": "~ 3"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expected"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactivity_fires_and_clears_on_the_hubs_clock() {
    let hub = spawn_hub_with(|s| s.alarms.check_interval = Duration::from_millis(200)).await;
    let http = hub.http_url();
    put_rule(
        &http,
        "quiet",
        json!({"severity": "warning", "target": {"device": "al-quiet"},
               "inactivity": {"after": "1500ms"}}),
    )
    .await;
    put_rule(
        &http,
        "quiet-hum",
        json!({"severity": "minor", "target": {"device": "al-quiet"},
               "inactivity": {"sensor": "hum", "after": "3s"}}),
    )
    .await;
    let (mut dev, _) = RawDevice::connect(&hub, "al-quiet").await;
    // Timestamps are old: inactivity goes by when the hub stored them.
    let old = now_ms() - 86_400_000;
    let mut next = send_series(&mut dev, 1, "hum", &[(old, 1.0)]).await;
    next = send_series(&mut dev, next, "temp", &[(old + 1, 1.0)]).await;
    assert!(alarms_of(&http, "al-quiet").await.is_empty());
    wait_until("the device-wide inactivity alarm", async || {
        alarms_of(&http, "al-quiet")
            .await
            .iter()
            .any(|a| a["rule"] == "quiet" && a["state"] == "active")
    })
    .await;
    // Readings of temp only: the device is back, hum stays silent.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut t = old + 2;
    while std::time::Instant::now() < deadline {
        next = send_series(&mut dev, next, "temp", &[(t, 1.0)]).await;
        t += 1;
        let alarms = alarms_of(&http, "al-quiet").await;
        let quiet_cleared = alarms
            .iter()
            .any(|a| a["rule"] == "quiet" && a["state"] == "cleared");
        let hum_active = alarms
            .iter()
            .any(|a| a["rule"] == "quiet-hum" && a["state"] == "active" && a["sensor"] == "hum");
        if quiet_cleared && hum_active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alarms = alarms_of(&http, "al-quiet").await;
    let quiet: Vec<&Value> = alarms.iter().filter(|a| a["rule"] == "quiet").collect();
    assert_eq!(quiet.len(), 1, "one alarm, raised once: {alarms:?}");
    assert_eq!(quiet[0]["state"], "cleared");
    let hum: Vec<&Value> = alarms.iter().filter(|a| a["rule"] == "quiet-hum").collect();
    assert_eq!(hum.len(), 1, "{alarms:?}");
    assert_eq!(hum[0]["state"], "active");
    // A hum reading clears that one too.
    send_series(&mut dev, next, "hum", &[(t, 2.0)]).await;
    wait_until("the sensor inactivity alarm clears", async || {
        alarms_of(&http, "al-quiet")
            .await
            .iter()
            .all(|a| a["state"] == "cleared")
    })
    .await;
}

/// One POST received: (signature, event id header, body, answered 2xx).
type Received = (String, String, String, bool);

/// A webhook receiver: records what it is sent, answers 503 while told to.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Received>>>,
    fail: Arc<AtomicBool>,
}

impl Receiver {
    async fn start(&self) -> String {
        let me = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let me = me.clone();
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let fail = me.fail.load(Ordering::SeqCst);
                    me.got.lock().unwrap().push((
                        h("x-hub-signature-256"),
                        h("x-hub-event-id"),
                        body,
                        !fail,
                    ));
                    if fail {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        axum::http::StatusCode::NO_CONTENT
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hook")
    }

    /// Notifications accepted (answered 2xx), each with a good signature,
    /// by event id, and how many copies came in all (failed ones too).
    fn verified(&self, secret: &str) -> (std::collections::BTreeMap<i64, Value>, usize) {
        let got = self.got.lock().unwrap();
        let mut out = std::collections::BTreeMap::new();
        for (sig, id, body, accepted) in got.iter() {
            assert_eq!(
                *sig,
                hub::alarms::webhook::sign(secret.as_bytes(), body.as_bytes())
            );
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["id"].as_i64().unwrap().to_string(), *id);
            if !accepted {
                continue;
            }
            out.insert(v["id"].as_i64().unwrap(), v);
        }
        (out, got.len())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_and_their_webhooks_survive_a_sigkill() {
    let db = TestDb::new().await;
    let receiver = Receiver::default();
    receiver.fail.store(true, Ordering::SeqCst);
    let hook = receiver.start().await;
    let config = db.dir_path().join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[alarms]\ncheck_interval = \"200ms\"\n\n[[alarms.webhooks]]\nname = \"ops\"\n\
             url = \"{hook}\"\nsecret = \"s3cret\"\ntimeout = \"2s\"\n"
        ),
    )
    .unwrap();
    let grpc = reserve_port();
    let http_port = reserve_port();
    let http = format!("http://127.0.0.1:{}", http_port.port);
    let listen = format!("127.0.0.1:{}", http_port.port);
    let env = [("HUB__HTTP__LISTEN", listen.as_str())];
    let url = format!("http://127.0.0.1:{}", grpc.port);
    let connect = async |seq_first: u64, points: &[(i64, f64)]| {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut dev = RawDevice::open(channel, hello("al-kill")).await;
        assert!(matches!(
            dev.next().await,
            Ok(Some(telemetry_proto::v1::hub_message::Msg::Welcome(_)))
        ));
        send_series(&mut dev, seq_first, "temp", points).await;
    };

    let mut child = ChildHub::start_with_config(&db, grpc.port, &config, &env);
    child.wait_line("listening on").await;
    put_rule(
        &http,
        "kill-hot",
        json!({"severity": "major", "target": {"device": "al-kill"},
               "threshold": {"sensor": "temp", "raise": "> 30", "clear": "< 28"}}),
    )
    .await;
    let base = now_ms() - 60_000;
    connect(1, &[(base, 35.0)]).await;
    // Acked, so raised and its notification queued in the same commit; the
    // receiver is failing it.
    wait_until("a failed delivery attempt", async || {
        !receiver.got.lock().unwrap().is_empty()
    })
    .await;
    let (_, killed) = child.kill().await;
    assert!(killed);

    receiver.fail.store(false, Ordering::SeqCst);
    let mut child = ChildHub::start_with_config(&db, grpc.port, &config, &env);
    child.wait_line("listening on").await;
    // Still above: the restarted hub knows the alarm is open (no second
    // one); then below 28: cleared.
    connect(2, &[(base + 1_000, 36.0), (base + 2_000, 20.0)]).await;
    wait_until("both notifications delivered", async || {
        let (events, _) = receiver.verified("s3cret");
        events.values().filter(|e| e["kind"] == "cleared").count() == 1
            && events.values().filter(|e| e["kind"] == "raised").count() == 1
    })
    .await;
    let (events, copies) = receiver.verified("s3cret");
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        copies >= 3,
        "the raise was attempted before the kill and after"
    );
    let alarm_ids: std::collections::BTreeSet<i64> = events
        .values()
        .map(|e| e["alarm"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        alarm_ids.len(),
        1,
        "one alarm raised and cleared: {events:?}"
    );
    let alarms = alarms_of(&http, "al-kill").await;
    assert_eq!(alarms.len(), 1);
    assert_eq!(alarms[0]["state"], "cleared");
    assert_eq!(alarms[0]["count"], 1);
    // The delivery log shows both delivered.
    wait_until("the log records both deliveries", async || {
        let log: Value = reqwest::get(format!("{http}/api/v1/webhooks/ops/deliveries"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let rows = log["deliveries"].as_array().unwrap().clone();
        rows.len() == 2 && rows.iter().all(|r| r["delivered_ms"].is_i64())
    })
    .await;
    drop(child);
}

/// A rate rule raises and clears at the readings' times; a cleared alarm
/// older than `alarms.retention` is pruned once its notifications are
/// given up (never before), and an open alarm is never pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_rules_raise_and_clear_and_history_is_pruned_after_its_retention() {
    // A webhook nobody answers: tried at 0, 1 and 3 s, then given up.
    let closed = reserve_port();
    let dead = format!("http://127.0.0.1:{}/hook", closed.port);
    let hub = spawn_hub_with(|s| {
        s.alarms.check_interval = Duration::from_millis(200);
        s.alarms.retention = Duration::from_secs(1800);
        s.alarms.webhooks = vec![hub::config::Webhook {
            name: "dead".into(),
            url: dead,
            secret: "s".into(),
            timeout: Duration::from_millis(200),
            max_age: Duration::from_secs(4),
        }];
    })
    .await;
    let http = hub.http_url();
    put_rule(
        &http,
        "rising",
        json!({"severity": "warning", "target": {"device": "al-rate"},
               "rate": {"sensor": "level", "window": "10m", "raise": "> 1", "clear": "<= 1"}}),
    )
    .await;
    put_rule(
        &http,
        "open",
        json!({"severity": "minor", "target": {"device": "al-open"},
               "threshold": {"sensor": "level", "raise": "> 5"}}),
    )
    .await;
    // Two hours ago: rising 2 a minute for 20 minutes, then flat.
    let base = now_ms() - 2 * 3_600_000;
    let points: Vec<(i64, f64)> = (0..=40)
        .map(|i| (base + i * 60_000, 2.0 * i.min(20) as f64))
        .collect();
    let (mut dev, _) = RawDevice::connect(&hub, "al-rate").await;
    send_series(&mut dev, 1, "level", &points).await;
    let (mut open_dev, _) = RawDevice::connect(&hub, "al-open").await;
    send_series(&mut open_dev, 1, "level", &[(base, 9.0)]).await;
    let alarms = alarms_of(&http, "al-rate").await;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    let a = &alarms[0];
    assert_eq!(a["state"], "cleared");
    // Judged from half a window on (5 min); flat from minute 20, the
    // window's change is at most 1 a minute from minute 25.
    assert_eq!(a["raised_ms"], base + 5 * 60_000);
    assert_eq!(a["cleared_ms"], base + 25 * 60_000);
    // Its notifications are not given up yet: it stays through prunes
    // (every 1.2 s here).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        alarms_of(&http, "al-rate").await.len(),
        1,
        "pruned while undelivered"
    );
    wait_until("the cleared alarm pruned", async || {
        alarms_of(&http, "al-rate").await.is_empty()
    })
    .await;
    let log: Value = reqwest::get(format!("{http}/api/v1/webhooks/dead/deliveries"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let log = log["deliveries"].as_array().unwrap();
    assert!(
        log.iter().filter(|d| d["failed_ms"].is_i64()).count() >= 2,
        "given up, then pruned: {log:?}"
    );
    let open = alarms_of(&http, "al-open").await;
    assert_eq!(open.len(), 1, "an open alarm is never pruned");
    assert_eq!(open[0]["state"], "active");
}
