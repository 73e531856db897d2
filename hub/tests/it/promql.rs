//! The Prometheus query API against Prometheus itself: the same readings
//! go into a hub (as line protocol) and into Prometheus (backfilled with
//! `promtool tsdb create-blocks-from openmetrics`), and a table of queries,
//! instant and range, must give the same series, timestamps and values.
//! Also the requests Grafana's Prometheus data source sends, replayed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::*;

const DEVICES: [(&str, &str); 4] = [
    ("d1", "north"),
    ("d2", "north"),
    ("d3", "south"),
    ("d4", "south"),
];
/// Three hours of samples, about every 15 s.
const SPAN_MS: i64 = 3 * 3600 * 1000;

/// Every reading: (device, sensor, ts_ms, value), each series in time order.
fn readings(t0: i64) -> Vec<(&'static str, &'static str, i64, f64)> {
    let mut out = Vec::new();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for (i, (device, _)) in DEVICES.iter().enumerate() {
        let shift = i as f64;
        let mut energy = 100.0 * shift;
        // d1 samples every 15 s on the dot: readings on range boundaries.
        let on_the_dot = *device == "d1";
        let mut t = if on_the_dot {
            t0
        } else {
            t0 + (next() % 15_000) as i64
        };
        let mut k = 0;
        while t < t0 + SPAN_MS {
            let x = (t - t0) as f64 / 600_000.0 + shift;
            // Devices in disjoint bands: no ties for topk / bottomk.
            let temp = (10.0 * shift + 20.0 + 4.0 * x.sin()) * 1000.0;
            let hum = (45.0 + 10.0 * shift + 3.0 * (x / 2.0).cos()) * 100.0;
            out.push((*device, "temp", t, temp.round() / 1000.0));
            out.push((*device, "hum", t, hum.round() / 100.0));
            // A counter, reset once on d2.
            energy += (next() % 500) as f64 / 100.0;
            if *device == "d2" && k == 300 {
                energy = 1.5;
            }
            out.push((*device, "energy", t, (energy * 100.0).round() / 100.0));
            k += 1;
            t += if on_the_dot {
                15_000
            } else {
                10_000 + (next() % 10_000) as i64
            };
        }
    }
    out
}

/// The queries compared (`hub/tests/promql-queries.txt`, shared with the
/// VictoriaMetrics bench); `{T}` is replaced by an @ time inside the data.
fn queries() -> Vec<&'static str> {
    include_str!("../promql-queries.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
    _port: ReservedPort,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Prometheus on a TSDB backfilled with `openmetrics`.
async fn prometheus(openmetrics: &str) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data.om");
    std::fs::write(&input, openmetrics).unwrap();
    let tsdb = dir.path().join("tsdb");
    let out = Command::new("promtool")
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&input)
        .arg(&tsdb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = dir.path().join("prometheus.yml");
    std::fs::write(&config, "global:\n  scrape_interval: 1h\n").unwrap();
    let port = reserve_port();
    let url = format!("http://127.0.0.1:{}", port.port);
    let listen = format!("127.0.0.1:{}", port.port);
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", tsdb.display()))
        .arg(format!("--web.listen-address={listen}"))
        .arg("--storage.tsdb.retention.time=30d")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Prometheus {
        child,
        url,
        _dir: dir,
        _port: port,
    };
    let client = reqwest::Client::new();
    wait_until("Prometheus is ready", async || {
        client
            .get(format!("{}/-/ready", p.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    p
}

async fn get(base: &str, path: &str, params: &[(&str, String)]) -> (StatusCode, Value) {
    let res = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .query(params)
        .send()
        .await
        .unwrap();
    (res.status(), res.json().await.unwrap_or(Value::Null))
}

/// A result as (labels, [(t, value)]) per series, sorted by labels.
fn series_of(body: &Value) -> BTreeMap<String, Vec<(f64, f64)>> {
    let data = &body["data"];
    let parse = |p: &Value| {
        let t = p[0].as_f64().unwrap();
        let v = match p[1].as_str().unwrap() {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            s => s.parse().unwrap(),
        };
        (t, v)
    };
    match data["resultType"].as_str().unwrap() {
        "scalar" => [("scalar".to_owned(), vec![parse(&data["result"])])].into(),
        "vector" => data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["metric"].to_string(), vec![parse(&s["value"])]))
            .collect(),
        _ => data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let points = s["values"].as_array().unwrap().iter().map(parse).collect();
                (s["metric"].to_string(), points)
            })
            .collect(),
    }
}

fn same(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Differences between Prometheus' answer and the hub's, in words.
fn compare(query: &str, theirs: &Value, ours: &Value) -> Vec<String> {
    let (t, o) = (series_of(theirs), series_of(ours));
    let mut problems = Vec::new();
    if t.keys().ne(o.keys()) {
        problems.push(format!(
            "{query}: series differ\n  prometheus {:?}\n  hub        {:?}",
            t.keys().collect::<Vec<_>>(),
            o.keys().collect::<Vec<_>>()
        ));
        return problems;
    }
    for (labels, tp) in &t {
        let op = &o[labels];
        if tp.len() != op.len() {
            problems.push(format!(
                "{query} {labels}: {} points against {}",
                tp.len(),
                op.len()
            ));
            continue;
        }
        for (a, b) in tp.iter().zip(op) {
            if a.0 != b.0 || !same(a.1, b.1) {
                problems.push(format!("{query} {labels}: prometheus {a:?}, hub {b:?}"));
                break;
            }
        }
    }
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_table_answers_as_prometheus_does() {
    if !installed("prometheus") || !installed("promtool") {
        assert!(
            !require_all(),
            "prometheus and promtool are required (HUB_TEST_REQUIRE_ALL); apt-get install prometheus"
        );
        skip("prometheus", "PATH (Debian package prometheus)");
        return;
    }
    let t0 = (now_ms() - SPAN_MS - 3_600_000) / 60_000 * 60_000;
    let data = readings(t0);

    let mut om = String::new();
    for metric in ["temp", "hum", "energy"] {
        writeln!(om, "# TYPE {metric} gauge").unwrap();
        for (device, site) in DEVICES {
            for (_, _, t, v) in data.iter().filter(|r| r.0 == device && r.1 == metric) {
                writeln!(
                    om,
                    "{metric}{{device=\"{device}\",site=\"{site}\"}} {v} {}.{:03}",
                    t / 1000,
                    t % 1000
                )
                .unwrap();
            }
        }
    }
    om.push_str("# EOF\n");
    let prom = prometheus(&om).await;

    for rollups in [false, true] {
        // Compacted often: each series is read from several blocks and the
        // staged readings after them; d3's writes go newest first, so its
        // blocks overlap in time.
        // With a 1-minute rollup, buckets of [1m] at a 60 s step are read
        // from it and the staged readings; without, from blocks (whole
        // blocks from their headers where they fit in one).
        let hub = spawn_hub_with(|s| {
            s.storage.compact_rows = 1000;
            if rollups {
                s.storage.rollups = vec![hub::config::RollupSetting {
                    every: std::time::Duration::from_secs(60),
                    keep: std::time::Duration::ZERO,
                }];
            }
        })
        .await;
        if rollups {
            let mut db = DbConn::open(&hub.settings).await;
            wait_until("the rollup is built", async || {
                db.scalar::<i64>("SELECT count(*) FROM rollup_defs WHERE ready = 1")
                    .await
                    == 1
            })
            .await;
        }
        let base = hub.http_url();
        let client = reqwest::Client::new();
        for (device, site) in DEVICES {
            let lines: Vec<String> = data
                .iter()
                .filter(|r| r.0 == device)
                .map(|(d, s, t, v)| format!("readings,device={d} {s}={v} {t}\n"))
                .collect();
            let mut writes: Vec<String> = lines.chunks(700).map(|c| c.concat()).collect();
            if device == "d3" {
                writes.reverse();
            }
            for body in writes {
                let res = client
                    .post(format!("{base}/api/v1/write?precision=ms"))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), StatusCode::NO_CONTENT);
            }
            let res = client
                .patch(format!("{base}/api/v1/devices/{device}/twin"))
                .json(&json!({"tags": {"site": site}}))
                .send()
                .await
                .unwrap();
            assert!(res.status().is_success(), "{:?}", res.text().await);
        }

        assert!(hub.stats().await.compactions >= 4, "read from blocks too");

        let at = t0 + SPAN_MS / 2 + 12_345;
        let start = t0 + 40 * 60_000;
        let end = t0 + SPAN_MS + 10 * 60_000;
        let secs = |ms: i64| format!("{}.{:03}", ms / 1000, ms % 1000);
        let mut problems = Vec::new();
        let mut compared = 0;
        let mut errors = 0;
        let queries = queries();
        assert!(queries.len() >= 60, "the table: {} queries", queries.len());
        for q in queries {
            let q = q.replace("{T}", &secs(at));
            let requests: Vec<(&str, Vec<(&str, String)>)> = vec![
                (
                    "/api/v1/query",
                    vec![("query", q.clone()), ("time", secs(at))],
                ),
                (
                    "/api/v1/query",
                    vec![
                        ("query", q.clone()),
                        ("time", secs(t0 + SPAN_MS - 5 * 60_000)),
                    ],
                ),
                (
                    "/api/v1/query_range",
                    vec![
                        ("query", q.clone()),
                        ("start", secs(start)),
                        ("end", secs(end)),
                        ("step", "60".into()),
                    ],
                ),
                (
                    "/api/v1/query_range",
                    vec![
                        ("query", q.clone()),
                        ("start", secs(start + 7_000)),
                        ("end", secs(end)),
                        ("step", "37s".into()),
                    ],
                ),
            ];
            // A range selector is the value of instant queries only.
            let requests = if q.ends_with(']') {
                requests[..2].to_vec()
            } else {
                requests
            };
            for (path, params) in requests {
                let (ts, theirs) = get(&prom.url, path, &params).await;
                let (os, ours) = get(&base, path, &params).await;
                // An error of Prometheus' (many-to-many matches) is the hub's too.
                if ts != StatusCode::OK {
                    assert_eq!(
                        (os, &ours["errorType"]),
                        (ts, &theirs["errorType"]),
                        "{path} {q} (rollups {rollups}): prometheus {theirs}, hub {ours}"
                    );
                    errors += 1;
                    continue;
                }
                assert_eq!(os, StatusCode::OK, "the hub refused {q}: {ours}");
                // Every query of the table has an answer: no vacuous agreement.
                assert!(
                    !series_of(&theirs).is_empty(),
                    "{path} {q}: Prometheus answers nothing"
                );
                compared += series_of(&theirs).values().map(Vec::len).sum::<usize>();
                problems.extend(compare(
                    &format!("{path} {q} (rollups {rollups})"),
                    &theirs,
                    &ours,
                ));
            }
        }
        assert!(
            problems.is_empty(),
            "{} differences:\n{}",
            problems.len(),
            problems.join("\n")
        );
        assert!(compared > 20_000, "only {compared} points compared");
        assert!(errors <= 8, "{errors} of the table's requests were errors");

        // What Prometheus refuses, the hub refuses the same way.
        for q in ["sum(", "rate(temp)", "sum(temp[5m])"] {
            let (ts, theirs) = get(&prom.url, "/api/v1/query", &[("query", q.into())]).await;
            let (os, ours) = get(&base, "/api/v1/query", &[("query", q.into())]).await;
            assert_eq!(
                (ts, theirs["errorType"].clone()),
                (StatusCode::BAD_REQUEST, json!("bad_data"))
            );
            assert_eq!(
                (os, ours["errorType"].clone()),
                (StatusCode::BAD_REQUEST, json!("bad_data")),
                "{q}: {ours}"
            );
        }
    }
}

/// The calls Grafana's Prometheus data source makes while one sets it up
/// and opens a dashboard, replayed against a hub with operator tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafanas_requests_are_answered() {
    let hub = spawn_hub_with(|s| {
        s.auth.operator_tokens = vec![hub::config::OperatorToken {
            name: "grafana".into(),
            token: "grafana-read-token-0123".into(),
            role: hub::config::OperatorRole::Read,
        }];
    })
    .await;
    let base = hub.http_url();
    // A minute of readings up to a few seconds ago.
    let t = now_ms() - 62_000;
    let lines: String = (0..60)
        .map(|i| format!("env,device=g-1 temp={} {}\n", 20 + i % 5, t + i * 1000))
        .collect();
    let client = reqwest::Client::new();
    let res = client
        .post(format!("{base}/api/v1/write?precision=ms"))
        .body(lines)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let auth = "Bearer grafana-read-token-0123";
    let now_s = now_ms() / 1000;
    let form = |pairs: &[(&str, String)]| {
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&")
    };
    // Data source "Save & test": buildinfo, then a query of 1+1.
    let r = client
        .get(format!("{base}/api/v1/status/buildinfo"))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert!(body["data"]["version"].as_str().unwrap().starts_with("2."));
    let post = |path: &'static str, body: String| {
        client
            .post(format!("{base}{path}"))
            .header("authorization", auth)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
    };
    let r = post(
        "/api/v1/query",
        form(&[("query", "1+1".into()), ("time", now_s.to_string())]),
    )
    .await
    .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"]["result"][1], json!("2"), "{body}");
    // The query editor's metric browser.
    let r = client
        .get(format!(
            "{base}/api/v1/labels?start={}&end={now_s}",
            now_s - 3600
        ))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"], json!(["__name__", "device"]));
    let r = client
        .get(format!(
            "{base}/api/v1/label/__name__/values?start={}&end={now_s}",
            now_s - 3600
        ))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"], json!(["env_temp"]));
    let r = post(
        "/api/v1/series",
        form(&[
            ("match[]", "{__name__=\"env_temp\"}".into()),
            ("start", (now_s - 3600).to_string()),
            ("end", now_s.to_string()),
        ]),
    )
    .await
    .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["data"],
        json!([{"__name__": "env_temp", "device": "g-1"}])
    );
    let r = client
        .get(format!("{base}/api/v1/metadata"))
        .header("authorization", auth)
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"]["env_temp"][0]["type"], json!("gauge"));
    // A dashboard panel: query_range with a step, as a form POST.
    let r = post(
        "/api/v1/query_range",
        form(&[
            (
                "query",
                "avg_over_time(env_temp{device=\"g-1\"}[1m])".into(),
            ),
            ("start", (now_s - 300).to_string()),
            ("end", now_s.to_string()),
            ("step", "15".into()),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"]["resultType"], json!("matrix"));
    let values = body["data"]["result"][0]["values"].as_array().unwrap();
    assert!(!values.is_empty());
    // The fleet dashboard the console links to: every panel's query is
    // answered, with data.
    let r = client
        .get(format!("{base}/assets/grafana/telemetry-hub-fleet.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let dashboard: Value = r.json().await.unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert_eq!(panels.len(), 4);
    for panel in panels {
        let expr = panel["targets"][0]["expr"]
            .as_str()
            .unwrap()
            .replace("$device", "g-1");
        let r = post(
            "/api/v1/query",
            form(&[("query", expr.clone()), ("time", now_s.to_string())]),
        )
        .await
        .unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], json!("success"), "{expr}: {body}");
        assert!(
            !body["data"]["result"].as_array().unwrap().is_empty(),
            "{expr}: {body}"
        );
    }
    // Hostile parameters are bad_data, never a crash or a hang.
    let deep = format!("{}1", "1*".repeat(5000));
    for (path, params) in [
        (
            "/api/v1/query",
            vec![("query", "1".to_owned()), ("time", "1e300".to_owned())],
        ),
        (
            "/api/v1/query_range",
            vec![
                ("query", "1".into()),
                ("start", "-1e300".into()),
                ("end", "1e300".into()),
                ("step", "1".into()),
            ],
        ),
        (
            "/api/v1/query_range",
            vec![
                ("query", "1".into()),
                ("start", "0".into()),
                ("end", "100".into()),
                ("step", "NaN".into()),
            ],
        ),
        ("/api/v1/query", vec![("query", "env_temp[1e30]".into())]),
        (
            "/api/v1/query",
            vec![("query", "rate(env_temp[1e999])".into())],
        ),
        ("/api/v1/query", vec![("query", deep)]),
        (
            "/api/v1/query",
            vec![
                (
                    "query",
                    "rate(env_temp[300000000y] offset 300000000y)".into(),
                ),
                ("time", "-1".into()),
            ],
        ),
    ] {
        let r = post(
            path,
            form(
                &params
                    .iter()
                    .map(|(k, v)| (*k, v.clone()))
                    .collect::<Vec<_>>(),
            ),
        )
        .await
        .unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::OK,
            "{params:?}: {status} {body}"
        );
        if status == StatusCode::BAD_REQUEST {
            assert_eq!(body["errorType"], json!("bad_data"), "{body}");
        }
    }
    // Without the token, or outside the subset: Prometheus' errors.
    let r = client
        .get(format!("{base}/api/v1/query?query=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = post(
        "/api/v1/query",
        form(&[(
            "query",
            "label_replace(env_temp, \"a\", \"b\", \"c\", \"d\")".into(),
        )]),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errorType"], json!("bad_data"));
    assert!(
        body["error"].as_str().unwrap().contains("label_replace"),
        "{body}"
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
