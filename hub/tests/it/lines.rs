//! Line-protocol writes (`POST /api/v1/write`) against a real hub: the
//! mapping, seqs after the mark and `seq` dedupe, device auth, bad input
//! and limits, gzip from a Python client, and every 204'd line kept
//! across a SIGKILL.

use std::io::Write as _;

use reqwest::StatusCode;
use serde_json::Value;
use telemetry_proto::v1 as pb;

use hub::config::DeviceAuthMode;

use crate::crash::ChildHub;
use crate::harness::*;

/// Posts `body` to the write endpoint.
pub(crate) async fn post(
    base: &str,
    query: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value, Option<String>) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/api/v1/write{query}"))
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = res.text().await.unwrap();
    let json = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, json, retry)
}

pub(crate) fn message(v: &Value) -> String {
    v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn rows(readings: &[pb::ReadingRow]) -> Vec<(String, u64, i64, f64)> {
    let mut rows: Vec<_> = readings
        .iter()
        .map(|r| (r.sensor.clone(), r.seq, r.ts_ms, r.value))
        .collect();
    rows.sort_by_key(|r| r.1);
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_become_readings_numbered_after_the_mark_or_kept_by_their_seq() {
    let hub = spawn_hub().await;
    let base = hub.http_url();
    let t = now_ms() - 10_000;
    // A stream device first: its mark is 3.
    let (mut dev, _) = RawDevice::connect(&hub, "lp-mixed").await;
    dev.send(batch(
        (1..=3)
            .map(|s| reading(s, "temp", t + s as i64, 1.0))
            .collect(),
    ))
    .await;
    dev.ack_through(3).await;
    // One door at a time: while its stream is open, writes are refused.
    let (status, body, _) = post(
        &base,
        "",
        format!("env,device=lp-mixed temp=5 {}", t * 1_000_000),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    dev.half_close();
    assert_eq!(dev.end_code().await, tonic::Code::Ok);
    wait_until("the stream is gone", async || {
        !hub.device("lp-mixed").await.is_some_and(|d| d.online)
    })
    .await;

    let body = format!(
        "# two devices, precision ms\n\
         readings,device=lp-mixed,host=gw temp=21.5,hum=40i {t1}\n\
         env,device=lp-other level=true {t1}\n\
         \n\
         readings,device=lp-mixed temp=21.75 {t2}\n",
        t1 = t + 100,
        t2 = t + 200
    );
    let (status, body, _) = post(&base, "?db=ignored&precision=ms", body, &[]).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // Answered after the commit: readable at once, numbered after the mark.
    let got = rows(&hub.readings("lp-mixed").await);
    assert_eq!(
        got[3..].to_vec(),
        vec![
            ("temp".to_owned(), 4, t + 100, 21.5),
            ("hum".to_owned(), 5, t + 100, 40.0),
            ("temp".to_owned(), 6, t + 200, 21.75),
        ]
    );
    assert_eq!(
        rows(&hub.readings("lp-other").await),
        vec![("env_level".to_owned(), 1, t + 100, 1.0)]
    );
    // The device's firmware (reported by its Hello) is not touched.
    assert_eq!(hub.device("lp-mixed").await.unwrap().acked_seq, 6);

    // Lines with seq: deduplicated as a stream's readings are.
    let seqd = |from: u64| {
        (from..from + 3)
            .map(|s| format!("m,device=lp-seq v={s},seq={s}i {}", (t + s as i64) * 1_000))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for _ in 0..2 {
        let (status, body, _) = post(&base, "?precision=us", seqd(10), &[]).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let (status, _, _) = post(&base, "?precision=us", seqd(12), &[]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let got = rows(&hub.readings("lp-seq").await);
    let seqs: Vec<u64> = got.iter().map(|r| r.1).collect();
    assert_eq!(seqs, vec![10, 11, 12, 13, 14], "each seq once");

    // A device whose seqs are used up takes no line without seq, and says so.
    let last = format!("m,device=lp-end v=1,seq={}i {}", i64::MAX, t * 1_000_000);
    let (status, body, _) = post(&base, "", last, &[]).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body, _) = post(
        &base,
        "",
        format!("m,device=lp-end v=2 {}", t * 1_000_000),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(message(&body).contains("used up"), "{body}");
    assert_eq!(rows(&hub.readings("lp-end").await).len(), 1);

    // InfluxDB 2's path and a gzip body.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    write!(gz, "m,device=lp-gz v=7 {}", t * 1_000_000).unwrap();
    let res = reqwest::Client::new()
        .post(format!("{base}/api/v2/write?org=o&bucket=b"))
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        rows(&hub.readings("lp-gz").await),
        vec![("m_v".to_owned(), 1, t, 7.0)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_and_bodies_store_nothing_and_say_where() {
    let hub = spawn_hub().await;
    let base = hub.http_url();
    let ns = (now_ms() - 1_000) * 1_000_000;
    type Case = (
        String,
        &'static [(&'static str, &'static str)],
        &'static str,
        StatusCode,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            format!("m,device=lp-bad v=1 {ns}\nm v=2 {ns}"),
            &[],
            "",
            StatusCode::BAD_REQUEST,
            "line 2: no \"device\" tag",
        ),
        (
            format!("m,device=lp-bad v=1 {ns}\nm,device=lp-bad v=\"on\" {ns}"),
            &[],
            "",
            StatusCode::BAD_REQUEST,
            "line 2: field \"v\": a string",
        ),
        (
            format!("m,device=lp-bad v=1 {ns}\nm,device=lp-bad v= {ns}"),
            &[],
            "",
            StatusCode::BAD_REQUEST,
            "line 2:",
        ),
        (
            "m,device=lp-bad v=1 4102444800000000000".into(),
            &[],
            "",
            StatusCode::BAD_REQUEST,
            "line 1: sensor \"m_v\": timestamp is too far in the future",
        ),
        (
            format!("m,device=lp-bad v=1 {ns}"),
            &[],
            "?precision=d",
            StatusCode::BAD_REQUEST,
            "unknown precision",
        ),
        (
            format!("m,device=lp-bad v=1 {ns}"),
            &[("content-encoding", "gzip")],
            "",
            StatusCode::BAD_REQUEST,
            "gzip",
        ),
        (
            format!("m,device=lp-bad v=1 {ns}"),
            &[("content-encoding", "br")],
            "",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "only gzip",
        ),
        (
            format!("m,device=lp-bad v=1 {ns}"),
            &[("origin", "http://evil.example")],
            "",
            StatusCode::FORBIDDEN,
            "another site",
        ),
    ];
    for (body, headers, query, want, says) in cases {
        let (status, json, _) = post(&base, query, body.clone(), headers).await;
        assert_eq!(status, want, "{body:?}: {json}");
        assert!(message(&json).contains(says), "{body:?}: {json}");
    }
    let (status, json, _) = post(&base, "", vec![b'm', 0xff, 0xfe], &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");
    assert!(message(&json).contains("UTF-8"));
    assert!(
        hub.device("lp-bad").await.is_none(),
        "a bad line refuses the whole write"
    );
    // An empty body is a write of nothing.
    assert_eq!(post(&base, "", "", &[]).await.0, StatusCode::NO_CONTENT);
    let stats = hub.stats().await;
    assert_eq!(stats.readings_committed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_lines_and_rates_over_their_limits_are_refused() {
    let hub = spawn_hub_with(|s| {
        s.http.write_max_bytes = 4096;
        s.http.write_max_lines = 10;
        s.server.max_readings_per_sec = 20;
    })
    .await;
    let base = hub.http_url();
    let ts = (now_ms() - 1_000) * 1_000_000;
    let line = format!("m,device=lp-lim v=1 {ts}\n");
    let (status, json, _) = post(&base, "", line.repeat(11), &[]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    assert!(message(&json).contains("more than 10 lines"), "{json}");
    let (status, _, _) = post(&base, "", "#".repeat(5000), &[]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // Small on the wire, over the limit once inflated.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b'#'; 100_000]).unwrap();
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 4096);
    let (status, json, _) = post(&base, "", bomb, &[("content-encoding", "gzip")]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    assert!(message(&json).contains("after gzip"), "{json}");
    assert!(hub.device("lp-lim").await.is_none());

    // 20 readings a second, a burst of as many: 10, then 10, then refused.
    for _ in 0..2 {
        let (status, json, _) = post(&base, "", line.repeat(10), &[]).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{json}");
    }
    let (status, json, retry) = post(&base, "", line.repeat(10), &[]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{json}");
    assert!(retry.is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    // Another device has its own rate.
    let other = format!("m,device=lp-lim2 v=1 {ts}\n");
    assert_eq!(
        post(&base, "", other.repeat(10), &[]).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(hub.readings("lp-lim").await.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_tokens_write_only_their_own_lines() {
    const FLEET_KEY: &str = "fleet-key-0123456789abcdef";
    let hub = spawn_hub_with(|s| {
        s.auth.devices = DeviceAuthMode::Token;
        s.auth.fleet_keys = [("lab".to_owned(), FLEET_KEY.to_owned())]
            .into_iter()
            .collect();
    })
    .await;
    let base = hub.http_url();
    let token = hub
        .operator()
        .await
        .add_device(pb::AddDeviceRequest {
            device_id: "lp-a".into(),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let ts = (now_ms() - 1_000) * 1_000_000;
    let a = format!("m,device=lp-a v=1 {ts}");
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("telegraf:{token}")
        )
    );
    for (query, header) in [
        (String::new(), format!("Bearer {token}")),
        (String::new(), format!("Token {token}")),
        (String::new(), basic),
        (format!("?u=x&p={token}"), String::new()),
    ] {
        let headers: Vec<(&str, &str)> = if header.is_empty() {
            vec![]
        } else {
            vec![("authorization", header.as_str())]
        };
        let (status, json, _) = post(&base, &query, a.clone(), &headers).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{header} {query}: {json}");
    }
    assert_eq!(hub.readings("lp-a").await.len(), 4);

    // No token, a wrong one, and A's token on B's lines (with A's lines in
    // the same write): refused, nothing stored.
    let bearer = format!("Bearer {token}");
    let both = format!("{a}\nm,device=lp-b v=2 {ts}");
    for (body, headers) in [
        (a.clone(), vec![]),
        (a.clone(), vec![("authorization", "Bearer 00ff")]),
        (both, vec![("authorization", bearer.as_str())]),
    ] {
        let (status, json, _) = post(&base, "", body.clone(), &headers).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}: {json}");
    }
    assert_eq!(hub.readings("lp-a").await.len(), 4);
    assert!(hub.device("lp-b").await.is_none());

    // A fleet-derived token admits a device never enrolled.
    let fleet = device_sim::fleet_token(FLEET_KEY, "lp-fleet-1");
    let line = format!("m,device=lp-fleet-1 v=3 {ts}");
    let auth = format!("Token {fleet}");
    let (status, json, _) = post(&base, "", line, &[("authorization", auth.as_str())]).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{json}");
    assert_eq!(hub.readings("lp-fleet-1").await.len(), 1);

    // Rotating the token: the cached registration is fenced, the old token
    // refused.
    let new_token = hub
        .operator()
        .await
        .rotate_device_token(pb::RotateDeviceTokenRequest {
            device_id: "lp-a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let (status, _, _) = post(&base, "", a.clone(), &[("authorization", bearer.as_str())]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let fresh = format!("Bearer {new_token}");
    let (status, _, _) = post(&base, "", a, &[("authorization", fresh.as_str())]).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(hub.readings("lp-a").await.len(), 5);
}

/// Python's standard library as a line-protocol client with gzip, the way
/// scripts and gateways post.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_posts_gzip_lines() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(!require_all(), "python3 is required (HUB_TEST_REQUIRE_ALL)");
        skip("python3", "PATH");
        return;
    }
    let hub = spawn_hub().await;
    let url = format!("{}/api/v1/write?precision=s", hub.http_url());
    let now_s = now_ms() / 1000 - 5;
    let script = r#"
import gzip, sys, urllib.request
url, now = sys.argv[1], int(sys.argv[2])
lines = "\n".join(f"weather,device=py-{d},site=roof temp={20 + i / 4},rain={i}i {now - 100 + i}"
                  for d in range(3) for i in range(100))
req = urllib.request.Request(url, data=gzip.compress(lines.encode()), method="POST",
                             headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"})
with urllib.request.urlopen(req) as res:
    print(res.status)
"#;
    let args = [script.to_owned(), url, now_s.to_string()];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .arg("-c")
            .args(&args)
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "204");
    for d in 0..3 {
        let got = rows(&hub.readings(&format!("py-{d}")).await);
        assert_eq!(got.len(), 200);
        let temps: Vec<f64> = got
            .iter()
            .filter(|r| r.0 == "weather_temp")
            .map(|r| r.3)
            .collect();
        assert_eq!(temps.len(), 100);
        assert_eq!(temps[99], 20.0 + 99.0 / 4.0);
        assert_eq!(got[0].2, (now_s - 100) * 1000);
    }
}

/// A writer posts numbered lines while the hub is SIGKILLed: every line
/// that got its 204 is there after the restart, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_line_survives_a_sigkill() {
    let db = TestDb::new().await;
    let grpc = reserve_port();
    let http_port = reserve_port();
    let base = format!("http://127.0.0.1:{}", http_port.port);
    let listen = format!("127.0.0.1:{}", http_port.port);
    let env = [("HUB__HTTP__LISTEN", listen.as_str())];
    let mut child = ChildHub::start_with_env(&db, grpc.port, &env);
    child.wait_line("listening on").await;
    let t0 = now_ms() - 60_000;
    let writer = {
        let base = base.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut acked = Vec::new();
            for n in 0u64.. {
                // 50 lines a write, each value its own number.
                let body: String = (0..50)
                    .map(|i| {
                        let v = n * 50 + i;
                        format!("m,device=lp-kill v={v} {}\n", t0 + v as i64)
                    })
                    .collect();
                let sent = client
                    .post(format!("{base}/api/v1/write?precision=ms"))
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(res) if res.status() == StatusCode::NO_CONTENT => acked.push(n),
                    Ok(_) => {}
                    Err(_) => return acked,
                }
            }
            acked
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (_, killed) = child.kill().await;
    assert!(killed);
    let acked = writer.await.unwrap();
    assert!(
        acked.len() > 5,
        "only {} writes before the kill",
        acked.len()
    );
    let mut child = ChildHub::start_with_env(&db, grpc.port, &env);
    child.wait_line("listening on").await;
    let mut op = crate::crash::operator(&format!("http://127.0.0.1:{}", grpc.port)).await;
    let mut stream = op
        .query_readings(pb::QueryReadingsRequest {
            device_id: "lp-kill".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut values = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        values.extend(chunk.rows.iter().map(|r| r.value as u64));
    }
    values.sort_unstable();
    let before = values.len();
    values.dedup();
    assert_eq!(values.len(), before, "nothing stored twice");
    for n in &acked {
        for v in n * 50..n * 50 + 50 {
            assert!(
                values.binary_search(&v).is_ok(),
                "acknowledged reading {v} lost"
            );
        }
    }
    drop(child);
}
