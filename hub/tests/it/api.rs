//! The HTTP/JSON API (`/api/v1`) against a real hub and real devices:
//! every route, its bad input, CSV, Server-Sent Events, auth and limits.

use reqwest::StatusCode;
use serde_json::{Value, json};
use telemetry_proto::v1 as pb;

use hub::cli::Command;

use crate::cli::parse;
use crate::harness::*;

/// A JSON client of one hub's API.
struct Api {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Api {
    fn new(hub: &TestHub) -> Api {
        Api {
            base: format!("{}/api/v1", hub.http_url()),
            client: reqwest::Client::new(),
            token: None,
        }
    }

    fn with_token(hub: &TestHub, token: &str) -> Api {
        Api {
            token: Some(token.to_owned()),
            ..Api::new(hub)
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        req
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        answer(
            self.request(reqwest::Method::GET, path)
                .send()
                .await
                .unwrap(),
        )
        .await
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let req = self.request(reqwest::Method::POST, path).json(body);
        answer(req.send().await.unwrap()).await
    }

    /// A PATCH, conditional on `if_match` when given.
    async fn patch(&self, path: &str, body: &Value, if_match: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.request(reqwest::Method::PATCH, path).json(body);
        if let Some(etag) = if_match {
            req = req.header("if-match", etag);
        }
        answer(req.send().await.unwrap()).await
    }

    async fn text(&self, path: &str, accept: &str) -> (StatusCode, String, String) {
        let res = self
            .request(reqwest::Method::GET, path)
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        let status = res.status();
        let content_type = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, content_type, res.text().await.unwrap())
    }

    /// Polls a command until it is final; its last state.
    async fn until_final(&self, id: &str) -> Value {
        let mut last = Value::Null;
        wait_until("the command is final", async || {
            let (status, c) = self.get(&format!("/commands/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{c}");
            let done = !["QUEUED", "SENT", "RECEIVED"].contains(&c["state"].as_str().unwrap());
            last = c;
            done
        })
        .await;
        last
    }
}

async fn answer(res: reqwest::Response) -> (StatusCode, Value) {
    let status = res.status();
    let text = res.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {e}: {text}"));
    (status, body)
}

/// Asserts an error answer's status, code and that its message mentions
/// `mentions`.
#[track_caller]
fn assert_error(got: &(StatusCode, Value), status: StatusCode, code: &str, mentions: &str) {
    let (s, body) = got;
    assert_eq!(*s, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(mentions), "{message:?} lacks {mentions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_readings_and_stats_answer_with_the_core_s_data() {
    let hub = spawn_hub().await;
    let fleet = SimFleet::start(&hub, "api-", 3).await;
    let (mut raw, _) = RawDevice::connect(&hub, "lab-1").await;
    let t0 = now_ms() - 10_000;
    raw.send(batch(
        (1..=20)
            .map(|i| reading(i, "flow", t0 + i as i64 * 100, i as f64))
            .collect(),
    ))
    .await;
    raw.ack_through(20).await;
    fleet.wait_for_acks(30).await;
    let api = Api::new(&hub);

    // Devices: all, filtered by label and by online, paged.
    let (status, page) = api.get("/devices").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let ids: Vec<&str> = page["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["api-00001", "api-00002", "api-00003", "lab-1"]);
    assert_eq!(page["online_total"], 4);
    assert!(page["next_after"].is_null());
    // A Hello's labels are reported state, never tags: only an operator
    // puts a device in a tag group.
    let (_, lab) = api.get("/devices?tag=site=lab").await;
    assert_eq!(lab["devices"], json!([]), "{lab}");
    let (status, twin) = api
        .patch(
            "/devices/lab-1/twin",
            &json!({"tags": {"site": "lab"}}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{twin}");
    assert_eq!(twin["reported"]["hello"]["labels"], json!({"site": "lab"}));
    let (_, lab) = api.get("/devices?label=site=lab").await;
    assert_eq!(lab["devices"].as_array().unwrap().len(), 1, "{lab}");
    assert_eq!(lab["devices"][0]["tags"], json!({"site": "lab"}));
    let (_, offline) = api.get("/devices?online=false").await;
    assert_eq!(offline["devices"], json!([]));
    // Fleet filters reach into the reported document.
    let by_hello = "where=reported.hello.labels.sim%3Dtrue";
    let (_, first) = api.get(&format!("/devices?limit=2&{by_hello}")).await;
    assert_eq!(first["devices"].as_array().unwrap().len(), 2, "{first}");
    assert_eq!(first["next_after"], "api-00002");
    let (_, rest) = api
        .get(&format!("/devices?limit=2&{by_hello}&after=api-00002"))
        .await;
    assert_eq!(rest["devices"][0]["device_id"], "api-00003");
    assert!(rest["next_after"].is_null(), "{rest}");
    assert_error(
        &api.get("/devices?tag=site").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "key=value",
    );
    assert_error(
        &api.get("/devices?where=battery%3C20").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "unknown field",
    );
    assert_error(
        &api.get("/devices?online=maybe").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "online",
    );

    // One device, and its sensors.
    let (status, d) = api.get("/devices/lab-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(d["online"], true);
    assert_eq!(d["firmware"], "test-fw/1");
    assert_eq!(d["acked_seq"], 20);
    assert_eq!(d["readings"], 20);
    assert_error(
        &api.get("/devices/nobody").await,
        StatusCode::NOT_FOUND,
        "not_found",
        "unknown device \"nobody\"",
    );
    let (_, sensors) = api.get("/devices/api-00001/sensors").await;
    let mut names: Vec<&str> = sensors["sensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["battery", "humidity", "pressure", "temperature"]);
    assert_error(
        &api.get("/devices/nobody/sensors").await,
        StatusCode::NOT_FOUND,
        "not_found",
        "nobody",
    );

    // Readings: raw, limited, in a time range, bucketed; JSON and CSV.
    let (status, all) = api.get("/devices/lab-1/readings").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let rows = all["readings"].as_array().unwrap();
    assert_eq!(rows.len(), 20);
    assert_eq!(
        rows[0],
        json!({"sensor": "flow", "seq": 1, "ts_ms": t0 + 100, "value": 1.0})
    );
    let (_, some) = api
        .get(&format!(
            "/devices/lab-1/readings?sensor=flow&since={}&until={}&limit=3",
            t0 + 500,
            t0 + 1500
        ))
        .await;
    let seqs: Vec<u64> = some["readings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [5, 6, 7]);
    let (_, buckets) = api
        .get(&format!(
            "/devices/lab-1/readings?since={t0}&bucket=1s&agg=min,max,count"
        ))
        .await;
    assert!(buckets["bucket_ms"] == 1000, "{buckets}");
    let b = buckets["buckets"].as_array().unwrap();
    let counted: u64 = b.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 20);
    assert!(b[0].get("avg").is_none(), "only what was asked: {}", b[0]);
    assert_eq!(b.last().unwrap()["max"], 20.0);
    // Empty parameters, as an HTML form sends them, are absent ones.
    let (status, same) = api
        .get("/devices/lab-1/readings?sensor=&since=&until=&bucket=&agg=&format=")
        .await;
    assert_eq!(status, StatusCode::OK, "{same}");
    assert_eq!(same["readings"].as_array().unwrap().len(), 20);
    let (_, none) = api.get("/devices/lab-1/readings?sensor=nothing").await;
    assert_eq!(none["readings"], json!([]));

    // A streamed answer needs a way to show it was cut short: chunked
    // encoding, HTTP/1.1.
    let old = api
        .request(reqwest::Method::GET, "/devices/lab-1/readings")
        .version(reqwest::Version::HTTP_10)
        .send()
        .await
        .unwrap();
    assert_error(
        &answer(old).await,
        StatusCode::HTTP_VERSION_NOT_SUPPORTED,
        "invalid_argument",
        "HTTP/1.1",
    );
    let (status, content_type, csv) = api
        .text("/devices/lab-1/readings?limit=2", "text/csv")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/csv"), "{content_type}");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "sensor,seq,ts_ms,time,value");
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines[1].starts_with(&format!("flow,1,{},", t0 + 100)),
        "{csv}"
    );
    assert!(lines[1].ends_with("Z,1"), "{csv}");
    let (_, _, csv) = api
        .text("/devices/lab-1/readings.csv?bucket=1h&agg=count,avg", "*/*")
        .await;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "sensor,start_ms,time,count,avg");
    let counted: u64 = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(3).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, 20, "{csv}");

    // Bad queries: the core's checks, with their messages.
    for (query, mentions) in [
        ("since=yesterday-ish", "since"),
        ("until=3 fortnights", "until"),
        (
            "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
            "since must be before until",
        ),
        ("bucket=0s", "bucket"),
        ("bucket=soon", "bucket"),
        ("bucket=1m&agg=median", "median"),
        ("limit=-1", "limit"),
        ("format=xml", "format"),
    ] {
        assert_error(
            &api.get(&format!("/devices/lab-1/readings?{query}")).await,
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            mentions,
        );
    }
    assert_error(
        &api.get("/devices/nobody/readings").await,
        StatusCode::NOT_FOUND,
        "not_found",
        "nobody",
    );

    // Stats, the OpenAPI document, and an unknown route.
    let (_, stats) = api.get("/stats").await;
    assert!(
        stats["readings_committed"].as_u64().unwrap() >= 50,
        "{stats}"
    );
    assert_eq!(stats["live_sessions"], 4);
    assert_eq!(stats["storage_ok"], true);
    let (status, doc) = api.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/devices",
        "/devices/{id}",
        "/devices/{id}/sensors",
        "/devices/{id}/readings",
        "/devices/{id}/readings.csv",
        "/commands",
        "/commands/{id}",
        "/commands/{id}/cancel",
        "/stats",
        "/events",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    assert!(doc["paths"]["/commands"].get("post").is_some());
    assert_error(
        &api.get("/nothing/here").await,
        StatusCode::NOT_FOUND,
        "not_found",
        "route",
    );

    raw.half_close();
    fleet.finish().await;
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_sent_by_device_and_selector_tracked_listed_and_cancelled() {
    let hub = spawn_hub().await;
    let fleet = SimFleet::start(&hub, "cmd-", 2).await;
    hub.register_offline("away").await;
    let api = Api::new(&hub);

    // To one device: it runs to SUCCEEDED, with its history.
    let (status, sent) = api
        .post(
            "/commands",
            &json!({"device_id": "cmd-00001", "name": "ping"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    assert_eq!(sent["errors"], json!([]));
    let id = sent["commands"][0]["command_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(sent["commands"][0]["state"], "QUEUED");
    assert_eq!(sent["commands"][0]["params"], json!({}));
    let done = api.until_final(&id).await;
    assert_eq!(done["state"], "SUCCEEDED", "{done}");
    let trail: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(trail, ["QUEUED", "SENT", "RECEIVED", "SUCCEEDED"]);
    assert!(done["result"].is_object(), "{done}");

    // To every device a selector matches (the two simulated ones, tagged
    // by an operator: a selector names tags, which devices cannot set).
    for id in ["cmd-00001", "cmd-00002"] {
        let (status, twin) = api
            .patch(
                &format!("/devices/{id}/twin"),
                &json!({"tags": {"sim": "true"}}),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{twin}");
    }
    assert_error(
        &api.post(
            "/commands",
            &json!({"selector": {"where": "reported.hello.labels.sim = true"}, "name": "ping"}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "at least one tag",
    );
    let (status, sent) = api
        .post(
            "/commands",
            &json!({"selector": {"tags": {"sim": "true"}, "where": "online = true"},
                    "name": "set_rate", "params": {"hz": 2.0}, "ttl": "30s"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    let mut to: Vec<&str> = sent["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["device_id"].as_str().unwrap())
        .collect();
    to.sort_unstable();
    assert_eq!(to, ["cmd-00001", "cmd-00002"]);
    let c = &sent["commands"][0];
    let ttl = c["expires_at_ms"].as_i64().unwrap() - c["created_at_ms"].as_i64().unwrap();
    assert!((29_000..=31_000).contains(&ttl), "{ttl}");
    for c in sent["commands"].as_array().unwrap() {
        let done = api.until_final(c["command_id"].as_str().unwrap()).await;
        assert_eq!(done["state"], "SUCCEEDED", "{done}");
    }
    assert_error(
        &api.post(
            "/commands",
            &json!({"selector": {"labels": {"sim": "nope"}}, "name": "ping"}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
        "no device matches",
    );

    // Listing, filtered by device and state.
    let (_, listed) = api.get("/commands?device=cmd-00001").await;
    assert_eq!(listed["commands"].as_array().unwrap().len(), 2, "{listed}");
    let (_, succeeded) = api.get("/commands?state=succeeded&limit=1").await;
    assert_eq!(succeeded["commands"].as_array().unwrap().len(), 1);
    assert_error(
        &api.get("/commands?state=DONE").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "unknown state",
    );
    assert_error(
        &api.get("/commands?since=whenever").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "since",
    );

    // Cancelling a command that waits for an offline device; then again.
    let (_, queued) = api
        .post("/commands", &json!({"device_id": "away", "name": "ping"}))
        .await;
    let id = queued["commands"][0]["command_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, cancelled) = api
        .post(&format!("/commands/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "CANCELLED");
    assert_error(
        &api.post(&format!("/commands/{id}/cancel"), &json!({}))
            .await,
        StatusCode::CONFLICT,
        "failed_precondition",
        "already CANCELLED",
    );
    assert_error(
        &api.get("/commands/no-such-id").await,
        StatusCode::NOT_FOUND,
        "not_found",
        "no-such-id",
    );
    assert_error(
        &api.post("/commands/no-such-id/cancel", &json!({})).await,
        StatusCode::NOT_FOUND,
        "not_found",
        "no-such-id",
    );

    // Bad commands: every one refused with its reason, nothing queued.
    let before = api.get("/commands").await.1["commands"]
        .as_array()
        .unwrap()
        .len();
    for (body, status, code, mentions) in [
        (
            json!({"device_id": "nobody", "name": "ping"}),
            StatusCode::NOT_FOUND,
            "not_found",
            "nobody",
        ),
        (
            json!({"name": "ping"}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "exactly one",
        ),
        (
            json!({"device_id": "cmd-00001", "selector": {"labels": {"a": "b"}}, "name": "ping"}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "exactly one",
        ),
        (
            json!({"selector": {"labels": {}}, "name": "ping"}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "tag",
        ),
        (
            json!({"device_id": "cmd-00001", "name": "ping", "params": [1]}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "JSON object",
        ),
        (
            json!({"device_id": "cmd-00001", "name": "ping", "ttl": "later"}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "ttl",
        ),
        (
            json!({"device_id": "cmd-00001", "name": "ping", "ttl": "0s"}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "ttl",
        ),
        (
            json!({"device_id": "cmd-00001", "name": ""}),
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "name",
        ),
        (
            json!({"device_id": "cmd-00001", "name": "ping", "colour": "red"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
            "colour",
        ),
    ] {
        assert_error(&api.post("/commands", &body).await, status, code, mentions);
    }
    let not_json = api
        .request(reqwest::Method::POST, "/commands")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_error(
        &answer(not_json).await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "",
    );
    let huge =
        json!({"device_id": "cmd-00001", "name": "ping", "params": {"pad": "x".repeat(100_000)}});
    assert_error(
        &api.post("/commands", &huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "",
    );
    let after = api.get("/commands").await.1["commands"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after, "a refused command was queued");

    fleet.finish().await;
    hub.assert_no_leaks().await;
}

/// Reads Server-Sent Events off a response: (event, data) pairs.
struct EventReader {
    res: reqwest::Response,
    buffer: String,
}

impl EventReader {
    async fn open(api: &Api, query: &str) -> EventReader {
        let res = api
            .request(reqwest::Method::GET, &format!("/events?{query}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        EventReader {
            res,
            buffer: String::new(),
        }
    }

    /// The next event; None when the stream ended.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(cut) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..cut + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
            let chunk = tokio::time::timeout(WAIT, self.res.chunk())
                .await
                .expect("an event within the wait")
                .ok()??;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Skips events until one named `name` that `check` accepts.
    async fn until(&mut self, name: &str, check: impl Fn(&Value) -> bool) -> Value {
        loop {
            let (event, data) = self.next().await.expect("the stream goes on");
            if event == name && check(&data) {
                return data;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_committed_readings_commands_and_presence() {
    let mut hub = spawn_hub().await;
    let api = Api::new(&hub);
    let mut all = EventReader::open(&api, "").await;
    let mut one = EventReader::open(&api, "device=ev-1&sensor=flow").await;
    let mut stats = EventReader::open(&api, "kinds=stats").await;

    let (mut other, _) = RawDevice::connect(&hub, "ev-2").await;
    let (mut dev, _) = RawDevice::connect(&hub, "ev-1").await;
    let online = all.until("presence", |p| p["device_id"] == "ev-1").await;
    assert_eq!(online["online"], true);
    assert_eq!(online["firmware"], "test-fw/1");

    let t = now_ms();
    other.send(batch(vec![reading(1, "flow", t, 9.0)])).await;
    other.ack_through(1).await;
    dev.send(batch(vec![
        reading(1, "flow", t, 1.5),
        reading(2, "temp", t, 20.0),
    ]))
    .await;
    dev.ack_through(2).await;
    let got = all
        .until("readings", |r| r["readings"][0]["device_id"] == "ev-1")
        .await;
    assert_eq!(got["readings"].as_array().unwrap().len(), 2, "{got}");
    // The filtered stream sees only ev-1's flow, first among its events.
    let (event, data) = one.next().await.unwrap();
    assert_eq!(event, "presence", "{data}");
    assert_eq!(data["device_id"], "ev-1");
    let got = one.until("readings", |_| true).await;
    assert_eq!(
        got["readings"],
        json!([{"device_id": "ev-1", "sensor": "flow", "seq": 1, "ts_ms": t, "value": 1.5}])
    );

    // A command's states arrive as they change.
    let (_, sent) = api
        .post("/commands", &json!({"device_id": "ev-1", "name": "ping"}))
        .await;
    let id = sent["commands"][0]["command_id"]
        .as_str()
        .unwrap()
        .to_owned();
    one.until("command", |c| {
        c["command_id"] == id && c["state"] == "QUEUED"
    })
    .await;
    let cmd = dev.next_command().await;
    assert_eq!(cmd.command_id, id);
    one.until("command", |c| c["command_id"] == id && c["state"] == "SENT")
        .await;

    // The counters, every second.
    let s = stats
        .until("stats", |s| s["readings_committed"].as_u64().unwrap() >= 3)
        .await;
    assert_eq!(s["live_sessions"], 2, "{s}");

    // Going offline is presence too.
    other.half_close();
    let gone = all.until("presence", |p| p["device_id"] == "ev-2").await;
    assert_eq!(gone["online"], false);

    // Bad kinds are refused; shutdown ends every stream.
    assert_error(
        &api.get("/events?kinds=readings,gossip").await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "gossip",
    );
    dev.half_close();
    let hub_task = hub.take();
    let stopping = tokio::spawn(hub_task.shutdown());
    for reader in [&mut all, &mut one, &mut stats] {
        tokio::time::timeout(WAIT, async { while reader.next().await.is_some() {} })
            .await
            .expect("the event stream ends at shutdown");
    }
    tokio::time::timeout(WAIT, stopping)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_and_a_slow_reader_is_told_what_it_missed() {
    let hub = spawn_hub_with(|s| {
        s.server.max_watches = 2;
        s.ingest.fanout_capacity = 4;
        s.server.max_readings_per_sec = 1_000_000;
        // One commit (one broadcast) per message.
        s.ingest.max_batch_rows = 1000;
    })
    .await;
    let api = Api::new(&hub);
    let slow = EventReader::open(&api, "kinds=readings").await;
    // One budget for every door: a gRPC watch takes the second slot.
    let second = hub
        .operator()
        .await
        .watch_readings(pb::WatchReadingsRequest::default())
        .await
        .unwrap();
    assert_error(
        &api.get("/events").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "server.max_watches",
    );
    let refused = hub
        .operator()
        .await
        .watch_command(pb::WatchCommandRequest {
            command_id: "nothing".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("server.max_watches"),
        "{refused:?}"
    );
    drop(second);
    // The slot comes back once the stream's task notices the close.
    let mut third = None;
    wait_until("a stream slot is free again", async || {
        let res = api
            .request(reqwest::Method::GET, "/events?kinds=presence")
            .send()
            .await
            .unwrap();
        let ok = res.status() == StatusCode::OK;
        if ok {
            third = Some(res);
        }
        ok
    })
    .await;
    drop(third);

    // A reader that does not read: many commits later it is told how many
    // readings it missed, and the hub's memory did not wait for it.
    let (mut dev, _) = RawDevice::connect(&hub, "flood").await;
    let t = now_ms();
    let mut seq = 0;
    // 200,000 readings, about 15 MB of events: more than the socket
    // buffers between us hold.
    for _ in 0..200 {
        let readings: Vec<_> = (0..1000)
            .map(|_| {
                seq += 1;
                reading(seq, "v", t + seq as i64, seq as f64)
            })
            .collect();
        dev.send(batch(readings)).await;
    }
    dev.ack_through(seq).await;
    let mut slow = slow;
    let mut delivered = 0u64;
    let mut skipped = 0u64;
    while delivered + skipped < seq {
        let (event, data) = slow.next().await.expect("the stream goes on");
        match event.as_str() {
            "readings" => delivered += data["readings"].as_array().unwrap().len() as u64,
            "skipped" => skipped += data["readings"].as_u64().unwrap(),
            other => panic!("unexpected {other}: {data}"),
        }
    }
    assert_eq!(delivered + skipped, seq);
    assert!(skipped > 0, "a reader this slow must have missed some");
    dev.half_close();
    drop(slow);
    hub.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_takes_operator_tokens_and_roles() {
    const ADMIN: &str = "admin-token-0123456789";
    const READER: &str = "read-token-0123456789";
    let hub = spawn_hub_with(|s| {
        s.auth.operator_tokens = vec![
            hub::config::OperatorToken {
                name: "ops".into(),
                token: ADMIN.into(),
                role: hub::config::OperatorRole::Admin,
            },
            hub::config::OperatorToken {
                name: "dash".into(),
                token: READER.into(),
                role: hub::config::OperatorRole::Read,
            },
        ];
    })
    .await;
    let (dev, _) = RawDevice::connect(&hub, "tok-1").await;
    let open = Api::new(&hub);
    let res = open
        .request(reqwest::Method::GET, "/devices")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_error(
        &answer(res).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "token",
    );
    assert_error(
        &Api::with_token(&hub, "wrong-token-0123456789")
            .get("/stats")
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "token",
    );
    let reader = Api::with_token(&hub, READER);
    let (status, devices) = reader.get("/devices").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(devices["devices"][0]["device_id"], "tok-1");
    EventReader::open(&reader, "kinds=commands").await;
    let ping = json!({"device_id": "tok-1", "name": "ping"});
    assert_error(
        &reader.post("/commands", &ping).await,
        StatusCode::FORBIDDEN,
        "permission_denied",
        "Read",
    );
    let admin = Api::with_token(&hub, ADMIN);
    let (status, sent) = admin.post("/commands", &ping).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{sent}");
    // Behind a proxy that rewrites Host and Origin, the token is what
    // counts: a cross-site page has none to send.
    let proxied = admin
        .request(reqwest::Method::POST, "/commands")
        .header("host", "hub.example")
        .header("origin", "https://console.example")
        .json(&ping)
        .send()
        .await
        .unwrap();
    assert_eq!(proxied.status(), StatusCode::ACCEPTED);
    // The console's pages hold no data and need no token.
    let page = reqwest::get(format!("{}/", hub.http_url())).await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert!(page.text().await.unwrap().contains("telemetry-hub"));
    drop(dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_is_optional_and_refuses_open_doors_off_loopback() {
    let hub = spawn_hub_with(|s| s.http.enabled = false).await;
    assert!(hub.hub().http_addr().is_none());
    let mut s = hub.settings.clone();
    s.http.enabled = true;
    s.http.listen = "0.0.0.0:0".parse().unwrap();
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("http.listen 0.0.0.0:0"), "{err}");
    s.auth.operator_tokens = vec![hub::config::OperatorToken {
        name: "ops".into(),
        token: "admin-token-0123456789".into(),
        role: hub::config::OperatorRole::Admin,
    }];
    let err = s.validate().unwrap_err().to_string();
    assert!(err.contains("in clear"), "{err}");
    s.auth.allow_plaintext = true;
    s.validate().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_api_answers_only_to_pages_of_this_machine() {
    let hub = spawn_hub().await;
    let (dev, _) = RawDevice::connect(&hub, "host-1").await;
    let api = Api::new(&hub);
    let port = hub.hub().http_addr().unwrap().port();
    // A page that rebinds its own name to 127.0.0.1 still sends its Host.
    let rebound = api
        .request(reqwest::Method::GET, "/devices")
        .header("host", format!("attacker.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_error(
        &answer(rebound).await,
        StatusCode::FORBIDDEN,
        "permission_denied",
        "attacker.example",
    );
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let res = api
            .request(reqwest::Method::GET, "/devices")
            .header("host", host.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{host}");
    }
    // A change sent by another site's page is refused; the console's own
    // page (same origin) may.
    let ping = json!({"device_id": "host-1", "name": "ping"});
    let cross = api
        .request(reqwest::Method::POST, "/commands")
        .header("origin", "http://attacker.example")
        .json(&ping)
        .send()
        .await
        .unwrap();
    assert_error(
        &answer(cross).await,
        StatusCode::FORBIDDEN,
        "permission_denied",
        "another site",
    );
    let same = api
        .request(reqwest::Method::POST, "/commands")
        .header("origin", hub.http_url())
        .json(&ping)
        .send()
        .await
        .unwrap();
    assert_eq!(same.status(), StatusCode::ACCEPTED);
    drop(dev);
}

/// One rule for text that reaches a spreadsheet or a terminal, at every
/// door: CSV fields a spreadsheet would take for a formula (first, or
/// after a `;` where a locale splits there) are quoted and guarded, and
/// command names with control characters are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formulas_and_escape_sequences_reach_no_spreadsheet_or_terminal() {
    let hub = spawn_hub().await;
    let (mut dev, _) = RawDevice::connect(&hub, "dev-evil").await;
    let now = now_ms() - 1_000;
    let hyperlink = "=HYPERLINK(\"http://x\")";
    let after_semicolon = "x;=cmd|' /C calc'!A0";
    dev.send(batch(vec![
        reading(1, hyperlink, now, 1.0),
        reading(2, after_semicolon, now + 1, 2.0),
    ]))
    .await;
    dev.ack_through(2).await;

    let api = Api::new(&hub);
    let (status, _, csv) = api.text("/devices/dev-evil/readings", "text/csv").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        csv.contains("\"'=HYPERLINK(\"\"http://x\"\")\",1,"),
        "{csv}"
    );
    assert!(csv.contains("\"x;=cmd|' /C calc'!A0\",2,"), "{csv}");

    let Command::Query(args) = parse(&[
        "hub",
        "query",
        "--hub",
        &hub.url(),
        "--device",
        "dev-evil",
        "--format",
        "csv",
    ]) else {
        panic!("query args")
    };
    let mut out = Vec::new();
    hub::cli::query(&args, &mut out).await.unwrap();
    let csv = String::from_utf8(out).unwrap();
    assert!(
        csv.contains("dev-evil,\"'=HYPERLINK(\"\"http://x\"\")\",1,"),
        "{csv}"
    );
    assert!(
        csv.contains("dev-evil,\"x;=cmd|' /C calc'!A0\",2,"),
        "{csv}"
    );

    let clear_screen = "reboot\u{1b}[2J\u{1b}]0;pwned\u{7}";
    let (status, body) = api
        .post(
            "/commands",
            &json!({"device_id": "dev-evil", "name": clear_screen}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("control characters"),
        "{body}"
    );
    let refused = hub
        .send_command("dev-evil", clear_screen, "", None)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("control characters"),
        "{refused:?}"
    );
}

/// Readings answers share one budget over every door: a gRPC query whose
/// client reads nothing holds its slot, and an HTTP one is refused until it
/// is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_answers_share_one_budget_over_every_door() {
    let hub = spawn_hub_with(|s| s.server.max_queries = 1).await;
    let (mut dev, _) = RawDevice::connect(&hub, "big").await;
    let t = now_ms() - 100_000;
    for b in 0..20u64 {
        dev.send(batch(
            (1..=1000)
                .map(|i| reading(b * 1000 + i, "v", t + (b * 1000 + i) as i64, 1.0))
                .collect(),
        ))
        .await;
    }
    dev.ack_through(20_000).await;
    // 20,000 rows: more than the HTTP/2 window and the buffers hold, so
    // the query waits for a reader that never comes.
    let held = hub
        .operator()
        .await
        .query_readings(pb::QueryReadingsRequest {
            device_id: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let api = Api::new(&hub);
    assert_error(
        &api.get("/devices/big/readings?limit=1").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "server.max_queries",
    );
    drop(held);
    wait_until("the slot is let go", async || {
        api.get("/devices/big/readings?limit=1").await.0 == StatusCode::OK
    })
    .await;
}

/// The HTTP door bounds what a client may hold: a half-sent request is
/// closed after `http.header_timeout`, an idle keep-alive connection too,
/// and past `http.max_connections` a connection is answered 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_and_too_many_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = spawn_hub_with(|s| {
        s.http.header_timeout = std::time::Duration::from_secs(1);
        s.http.max_connections = 2;
        s.server.max_watches = 1;
    })
    .await;
    let addr = hub.hub().http_addr().unwrap();
    let connect = || tokio::net::TcpStream::connect(addr);
    // Reads until the server closes; what it sent. Bounded: a server that
    // never closes fails the test.
    async fn until_closed(stream: &mut tokio::net::TcpStream) -> String {
        let mut got = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "still open after {WAIT:?}");
        String::from_utf8_lossy(&got).into_owned()
    }

    let mut half = connect().await.unwrap();
    half.write_all(b"GET /api/v1/stats HTTP/1.1\r\nHost: 127.0")
        .await
        .unwrap();
    let mut idle = connect().await.unwrap();
    // Both slots are taken: one more is refused at once.
    let mut third = connect().await.unwrap();
    let refused = until_closed(&mut third).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("http.max_connections"), "{refused}");
    let started = std::time::Instant::now();
    let answer = until_closed(&mut half).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    until_closed(&mut idle).await;
    eprintln!(
        "half-sent and idle connections closed after {:?}",
        started.elapsed()
    );
    // Slots are free again.
    let api = Api::new(&hub);
    wait_until("a connection is taken again", async || {
        api.get("/stats").await.0 == StatusCode::OK
    })
    .await;
}

/// Device administration over HTTP, for admins only, through the same core
/// as gRPC: the token it returns admits the device, a rotation ends the
/// stream on the old one, a removal says whether the device was online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_enroll_rotate_and_remove_devices_over_http() {
    const ADMIN: &str = "admin-token-0123456789";
    const READER: &str = "read-token-0123456789";
    let hub = spawn_hub_with(|s| {
        s.auth.devices = hub::config::DeviceAuthMode::Token;
        s.auth.operator_tokens = [("ops", ADMIN, true), ("dash", READER, false)]
            .into_iter()
            .map(|(name, token, admin)| hub::config::OperatorToken {
                name: name.into(),
                token: token.into(),
                role: if admin {
                    hub::config::OperatorRole::Admin
                } else {
                    hub::config::OperatorRole::Read
                },
            })
            .collect();
    })
    .await;
    let reader = Api::with_token(&hub, READER);
    assert_error(
        &reader
            .post("/devices", &json!({"device_id": "http-dev"}))
            .await,
        StatusCode::FORBIDDEN,
        "permission_denied",
        "Read",
    );
    let admin = Api::with_token(&hub, ADMIN);
    let (status, added) = admin
        .post(
            "/devices",
            &json!({"device_id": "http-dev", "labels": {"site": "lab"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{added}");
    let token = added["token"].as_str().unwrap().to_owned();
    let hello = |token: &str| hello_token("http-dev", token);
    let mut dev = RawDevice::open(hub.channel().await, hello(&token)).await;
    assert!(matches!(
        dev.next().await,
        Ok(Some(pb::hub_message::Msg::Welcome(_)))
    ));

    let (status, rotated) = admin.post("/devices/http-dev/token", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_ne!(rotated["token"], token.as_str());
    assert_eq!(dev.end_code().await, tonic::Code::Unauthenticated);
    let mut dev = RawDevice::open(
        hub.channel().await,
        hello(rotated["token"].as_str().unwrap()),
    )
    .await;
    assert!(matches!(
        dev.next().await,
        Ok(Some(pb::hub_message::Msg::Welcome(_)))
    ));

    let removed = answer(
        admin
            .request(reqwest::Method::DELETE, "/devices/http-dev")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(removed, (StatusCode::OK, json!({"was_online": true})));
    assert_eq!(dev.end_code().await, tonic::Code::Unauthenticated);
    let gone = answer(
        admin
            .request(reqwest::Method::DELETE, "/devices/http-dev")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_error(&gone, StatusCode::NOT_FOUND, "not_found", "http-dev");
    assert_error(
        &admin
            .post("/devices", &json!({"device_id": "bad id"}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "device_id",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_are_read_and_changed_over_http_with_etags_and_events() {
    let hub = spawn_hub().await;
    hub.register_offline("tw-http").await;
    let api = Api::new(&hub);
    let mut events = EventReader::open(&api, "kinds=twin&device=tw-http").await;
    let res = api
        .request(reqwest::Method::GET, "/devices/tw-http/twin")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, "\"0\"");
    let twin: Value = res.json().await.unwrap();
    assert_eq!(twin["desired"], json!({}));
    assert_eq!(twin["reported"]["hello"]["firmware"], "test-fw/1");

    let (status, twin) = api
        .patch(
            "/devices/tw-http/twin",
            &json!({"desired": {"rate": 2, "led": {"on": true}}, "tags": {"site": "a"}}),
            Some(&etag),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{twin}");
    assert_eq!(twin["desired_version"], 1);
    assert_eq!(twin["delta"], json!({"rate": 2, "led": {"on": true}}));
    assert_eq!(twin["tags"], json!({"site": "a"}));
    assert!(twin["metadata"]["desired"]["led"]["on"].is_i64(), "{twin}");
    // The old ETag is stale now: 412, nothing changed.
    assert_error(
        &api.patch(
            "/devices/tw-http/twin",
            &json!({"desired": {"rate": 3}}),
            Some(&etag),
        )
        .await,
        StatusCode::PRECONDITION_FAILED,
        "failed_precondition",
        "version 1",
    );
    let (status, twin) = api
        .patch(
            "/devices/tw-http/twin",
            &json!({"tags": {"site": null, "rack": "r2"}}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{twin}");
    assert_eq!(twin["tags"], json!({"rack": "r2"}));
    assert_eq!(twin["desired"], json!({"rate": 2, "led": {"on": true}}));
    let mut deep = json!(1);
    for _ in 0..11 {
        deep = json!({ "k": deep });
    }
    for (body, if_match, status, mentions) in [
        (
            json!({"tags": {"a": "b"}}),
            Some("\"1\""),
            StatusCode::BAD_REQUEST,
            "If-Match",
        ),
        (
            json!({"desired": {"a": 1}}),
            Some("soon"),
            StatusCode::BAD_REQUEST,
            "If-Match",
        ),
        (
            json!({"desired": deep}),
            None,
            StatusCode::BAD_REQUEST,
            "levels",
        ),
        (
            json!({"desired": [1]}),
            None,
            StatusCode::BAD_REQUEST,
            "object",
        ),
        (json!({}), None, StatusCode::BAD_REQUEST, "desired, tags"),
        (
            json!({"tags": {"": "x"}}),
            None,
            StatusCode::BAD_REQUEST,
            "tag key",
        ),
        (
            json!({"colour": 1}),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "colour",
        ),
    ] {
        let got = api.patch("/devices/tw-http/twin", &body, if_match).await;
        assert_eq!(got.0, status, "{body}: {}", got.1);
        let message = got.1["error"]["message"].as_str().unwrap();
        assert!(message.contains(mentions), "{body}: {message:?}");
    }
    assert_error(
        &api.patch("/devices/nobody/twin", &json!({"desired": {"a": 1}}), None)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
        "nobody",
    );
    // One change for every device a selector matches (tags required).
    hub.register_offline("tw-http-2").await;
    api.patch(
        "/devices/tw-http-2/twin",
        &json!({"tags": {"rack": "r2"}}),
        None,
    )
    .await;
    let (status, done) = api
        .post(
            "/twins/desired",
            &json!({"selector": {"tags": {"rack": "r2"}, "where": "desired.rate exists"},
                    "desired": {"rate": 5}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(
        done["changed"],
        json!([{"device_id": "tw-http", "desired_version": 2}])
    );
    let (status, done) = api
        .post(
            "/twins/desired",
            &json!({"selector": {"tags": {"rack": "r2"}}, "desired": {"mode": "eco"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["changed"].as_array().unwrap().len(), 2, "{done}");
    assert_error(
        &api.post(
            "/twins/desired",
            &json!({"selector": {"where": "reported.hello.firmware = test-fw/1"}, "desired": {"a": 1}}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "at least one tag",
    );
    assert_error(
        &api.post(
            "/twins/desired",
            &json!({"selector": {"tags": {"rack": "r2"}}, "desired": [1]}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "object",
    );
    let event = events.until("twin", |d| d["part"] == "desired").await;
    assert_eq!(
        event["twin"]["desired"],
        json!({"rate": 2, "led": {"on": true}})
    );
    let event = events.until("twin", |d| d["part"] == "tags").await;
    assert_eq!(event["twin"]["device_id"], "tw-http");
}
