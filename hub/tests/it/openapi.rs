//! The OpenAPI document tells the truth: real answers of a live hub, every
//! JSON route and error, are checked against the schema the document gives
//! for them (the readings body is written by hand, streamed, so this is
//! what keeps its schema honest).

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::*;

/// Checks `value` against `schema` (the subset of JSON Schema that utoipa
/// writes: $ref into components, type (also as a list, with "null"),
/// properties, required, items, oneOf / anyOf / allOf, enum, minimum);
/// the first mismatch, with where it is.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference
            .strip_prefix("#/components/schemas/")
            .ok_or_else(|| format!("{at}: unknown $ref {reference}"))?;
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("{at}: $ref to a missing schema {name}"));
        }
        return check(doc, target, value, at);
    }
    for (key, all) in [("allOf", true), ("anyOf", false), ("oneOf", false)] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            let results: Vec<Result<(), String>> =
                options.iter().map(|s| check(doc, s, value, at)).collect();
            let ok = results.iter().filter(|r| r.is_ok()).count();
            let fine = if all { ok == options.len() } else { ok >= 1 };
            if !fine {
                return Err(format!("{at}: {key} not met: {results:?}"));
            }
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let is = |t: &str| match t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        };
        if !types.is_empty() && !types.iter().any(|t| is(t)) {
            return Err(format!("{at}: {value} is not {types:?}"));
        }
    }
    if let (Some(min), Some(n)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) && n < min
    {
        return Err(format!("{at}: {n} is below {min}"));
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(name) {
                return Err(format!("{at}: required {name:?} is missing"));
            }
        }
        if let Some(properties) = properties {
            for (name, field) in object {
                match properties.get(name) {
                    Some(s) => check(doc, s, field, &format!("{at}.{name}"))?,
                    // The document must name every field an answer has.
                    None => return Err(format!("{at}: {name:?} is not in the schema")),
                }
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            check(doc, items, item, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

/// Calls a route and checks its JSON answer against what the document says
/// that route answers with that status.
async fn answer_matches(
    client: &reqwest::Client,
    base: &str,
    doc: &Value,
    (method, route, path): (Method, &str, &str),
    body: Option<Value>,
) -> Value {
    let mut request = client.request(method.clone(), format!("{base}{path}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let value: Value = response.json().await.unwrap();
    let operation = &doc["paths"][route][method.as_str().to_lowercase()];
    let schema = &operation["responses"][status.as_str()]["content"]["application/json"]["schema"];
    assert!(
        !schema.is_null(),
        "{method} {route} answered {status}, which the document does not describe"
    );
    if let Err(why) = check(doc, schema, &value, "body") {
        panic!("{method} {path} ({status}) does not match its schema: {why}\n{value}");
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_answer_matches_the_openapi_document() {
    let hub = spawn_hub().await;
    let (mut dev, _) = RawDevice::connect(&hub, "doc-1").await;
    let t0 = now_ms() - 60_000;
    dev.send(batch(
        (1..=20)
            .map(|i| {
                reading(
                    i,
                    if i % 2 == 0 { "a" } else { "b" },
                    t0 + i as i64 * 1000,
                    i as f64,
                )
            })
            .collect(),
    ))
    .await;
    dev.ack_through(20).await;
    let base = format!("{}/api/v1", hub.http_url());
    let client = reqwest::Client::new();
    let doc: Value = client
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let get = |route, path| (Method::GET, route, path);
    for (route, path) in [
        ("/devices", "/devices"),
        ("/devices/{id}", "/devices/doc-1"),
        ("/devices/{id}", "/devices/nobody"),
        ("/devices/{id}/sensors", "/devices/doc-1/sensors"),
        ("/devices/{id}/readings", "/devices/doc-1/readings"),
        (
            "/devices/{id}/readings",
            "/devices/doc-1/readings?bucket=10s&agg=count,avg,min,max,sum,first,last",
        ),
        (
            "/devices/{id}/readings",
            "/devices/doc-1/readings?since=yesterday-ish",
        ),
        ("/commands", "/commands"),
        ("/stats", "/stats"),
    ] {
        answer_matches(&client, &base, &doc, get(route, path), None).await;
    }
    let raw = answer_matches(
        &client,
        &base,
        &doc,
        get("/devices/{id}/readings", "/devices/doc-1/readings?sensor=a"),
        None,
    )
    .await;
    assert_eq!(raw["readings"].as_array().unwrap().len(), 10, "{raw}");

    let sent = answer_matches(
        &client,
        &base,
        &doc,
        (Method::POST, "/commands", "/commands"),
        Some(json!({"device_id": "doc-1", "name": "ping", "params": {"n": 1}})),
    )
    .await;
    let id = sent["commands"][0]["command_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let command = format!("/commands/{id}");
    let cancel = format!("/commands/{id}/cancel");
    let calls: Vec<(Method, &str, &str, Option<Value>)> = vec![
        (Method::GET, "/commands/{id}", &command, None),
        (Method::POST, "/commands/{id}/cancel", &cancel, None),
        (
            Method::POST,
            "/commands",
            "/commands",
            Some(json!({"device_id": "doc-1", "name": ""})),
        ),
        (
            Method::POST,
            "/devices",
            "/devices",
            Some(json!({"device_id": "doc-2", "labels": {"site": "lab"}})),
        ),
        (
            Method::POST,
            "/devices/{id}/token",
            "/devices/doc-2/token",
            None,
        ),
        (
            Method::POST,
            "/certificates/revoked",
            "/certificates/revoked",
            Some(json!({"sha256": "ab".repeat(32)})),
        ),
        (Method::DELETE, "/devices/{id}", "/devices/doc-2", None),
        (Method::DELETE, "/devices/{id}", "/devices/doc-2", None),
    ];
    for (method, route, path, body) in calls {
        answer_matches(&client, &base, &doc, (method, route, path), body).await;
    }

    // The Prometheus query API (its own JSON) and the write door's errors.
    let (start, end) = ((t0 / 1000).to_string(), (t0 / 1000 + 30).to_string());
    let range = format!("/query_range?query=a&start={start}&end={end}&step=5");
    let prom = [
        ("/query", "/query?query=a".to_owned()),
        ("/query", "/query?query=rate(a[1m])".to_owned()),
        ("/query", "/query?query=a[1m]".to_owned()),
        ("/query", "/query?query=1%2B1".to_owned()),
        (
            "/query",
            "/query?query=holt_winters(a[1m],0.5,0.5)".to_owned(),
        ),
        ("/query", "/query".to_owned()),
        ("/query_range", range.clone()),
        (
            "/query_range",
            format!("/query_range?query=a&start={start}&end={end}&step=0.001"),
        ),
        ("/series", "/series?match[]=a".to_owned()),
        ("/series", "/series".to_owned()),
        ("/labels", "/labels".to_owned()),
        ("/label/{name}/values", "/label/device/values".to_owned()),
        (
            "/label/{name}/values",
            "/label/__name__/values?match[]={".to_owned(),
        ),
        ("/metadata", "/metadata".to_owned()),
        ("/status/buildinfo", "/status/buildinfo".to_owned()),
    ];
    let mut kinds = std::collections::BTreeSet::new();
    for (route, path) in &prom {
        let v = answer_matches(&client, &base, &doc, get(route, path), None).await;
        kinds.insert(v["data"]["resultType"].as_str().unwrap_or("-").to_owned());
        kinds.insert(v["errorType"].as_str().unwrap_or("-").to_owned());
    }
    for kind in ["vector", "matrix", "scalar", "bad_data"] {
        assert!(
            kinds.contains(kind),
            "no {kind} answer was checked: {kinds:?}"
        );
    }
    // A JSON string is no line: 400, naming the line.
    let refused = answer_matches(
        &client,
        &base,
        &doc,
        (Method::POST, "/write", "/write"),
        Some(json!("not a line")),
    )
    .await;
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1"),
        "{refused}"
    );
    assert_eq!(
        client
            .get(format!("{base}/nothing/here"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
}

/// The checker itself: what it must refuse.
#[test]
fn the_checker_refuses_what_does_not_match() {
    let doc = json!({"components": {"schemas": {
        "Thing": {"type": "object", "required": ["id"], "properties": {
            "id": {"type": "string"},
            "n": {"type": ["integer", "null"], "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}}
        }}
    }}});
    let thing = json!({"$ref": "#/components/schemas/Thing"});
    assert!(
        check(
            &doc,
            &thing,
            &json!({"id": "a", "n": 1, "tags": ["x"]}),
            "t"
        )
        .is_ok()
    );
    assert!(check(&doc, &thing, &json!({"id": "a", "n": null}), "t").is_ok());
    for bad in [
        json!({"n": 1}),
        json!({"id": 1}),
        json!({"id": "a", "n": -1}),
        json!({"id": "a", "n": 1.5}),
        json!({"id": "a", "tags": [1]}),
        json!({"id": "a", "extra": true}),
        json!([]),
    ] {
        assert!(check(&doc, &thing, &bad, "t").is_err(), "{bad}");
    }
}
