//! The `/api/v1` routes: each parses its request, calls the operator core
//! and shapes the answer as JSON (or CSV for readings). The OpenAPI
//! document is generated from the annotations here.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiState};
use crate::auth::Operator;
use crate::domain::{
    Aggregate, Bucket, CommandRecord, CommandState, CommandTransition, DeviceRecord, StoredReading,
    csv_field, rfc3339_ms,
};
use crate::operator::{
    DeviceFilter, HubStats, OpError, ReadingsRequest, STALLED_CLIENT, parse_aggregates,
    parse_bucket, parse_filter, parse_labels, parse_time,
};
use crate::query::QueryChunk;
use crate::store::commands::CommandFilter;

type Shared = State<Arc<ApiState>>;

pub(super) fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new()
        .route("/devices", get(list_devices))
        .route("/devices/{id}", get(get_device))
        .route("/devices/{id}/sensors", get(device_sensors))
        .route("/devices/{id}/readings", get(readings))
        .route("/devices/{id}/readings.csv", get(readings_csv))
        .route("/commands", get(list_commands).post(send_command))
        .route("/commands/{id}", get(get_command))
        .route("/commands/{id}/cancel", post(cancel_command))
        .route("/stats", get(stats))
}

/// An empty query parameter (`since=`, as an HTML form sends it) is an
/// absent one.
pub(super) fn empty_as_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    let raw = Option::<String>::deserialize(d)?;
    Ok(raw.filter(|s| !s.is_empty()))
}

/// A time query parameter (`since`, `until`), parsed as every door parses
/// times.
fn time_param(raw: &Option<String>, what: &str) -> Result<Option<i64>, ApiError> {
    raw.as_deref()
        .map(parse_time)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("{what}: {e}")))
}

/// Who made a change, for the log: the token's name (never its value), or
/// "open" when the API takes no tokens.
pub(super) fn caller(operator: Option<axum::Extension<Operator>>) -> String {
    operator.map_or_else(|| "open".to_owned(), |op| op.0.name)
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
pub(super) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub(super) struct ErrorDetail {
    /// invalid_argument, not_found, failed_precondition, resource_exhausted,
    /// unavailable, internal, unauthenticated, permission_denied,
    /// payload_too_large.
    code: String,
    message: String,
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::invalid(format!("bad query string: {}", r.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::invalid(format!("bad path: {}", r.body_text()))
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let code = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "invalid_argument",
        };
        let status = if r.status().is_client_error() {
            r.status()
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, code, r.body_text())
    }
}

// ---- devices ----

/// A device as the API shows it.
#[derive(Serialize, ToSchema)]
pub(super) struct DeviceJson {
    device_id: String,
    /// A stream is open now.
    online: bool,
    /// When the open stream began (ms since the epoch).
    online_since_ms: Option<i64>,
    firmware: String,
    /// Operator-owned: selectors and filters match on them.
    tags: BTreeMap<String, String>,
    /// Its twin's delta is empty.
    in_sync: bool,
    desired_version: u64,
    reported_version: u64,
    first_seen_ms: i64,
    last_seen_ms: i64,
    /// Readings stored for it.
    readings: u64,
    /// The highest seq acknowledged to it.
    acked_seq: u64,
}

impl DeviceJson {
    fn new(d: DeviceRecord, since: Option<i64>) -> Self {
        Self {
            device_id: d.device_id,
            online: since.is_some(),
            online_since_ms: since,
            firmware: d.firmware,
            tags: d.tags,
            in_sync: d.in_sync,
            desired_version: d.desired_version,
            reported_version: d.reported_version,
            first_seen_ms: d.first_seen_ms,
            last_seen_ms: d.last_seen_ms,
            readings: d.readings,
            acked_seq: d.acked_seq,
        }
    }
}

#[derive(Serialize, ToSchema)]
struct DevicePageJson {
    devices: Vec<DeviceJson>,
    /// Pass as `after` for the next page; absent on the last page.
    next_after: Option<String>,
    /// Devices with a stream open now, in the whole fleet.
    online_total: u64,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeviceListParams {
    /// Devices after this id (paging).
    #[serde(default, deserialize_with = "empty_as_none")]
    after: Option<String>,
    /// Devices per page (default 1000, at most 10000).
    limit: Option<u32>,
    /// `key=value` tag selectors, comma-separated; all must match.
    /// (`label` is the older name.)
    #[serde(default, alias = "label", deserialize_with = "empty_as_none")]
    #[param(pattern = r"^[^=,]+=[^,]*(,[^=,]+=[^,]*)*$")]
    tag: Option<String>,
    /// A fleet filter (`tags.site = plant-7 and reported.battery < 20`).
    #[serde(default, rename = "where", deserialize_with = "empty_as_none")]
    filter: Option<String>,
    /// Only devices online (true) or offline (false).
    online: Option<bool>,
}

/// Devices in id order, one page at a time, optionally filtered.
#[utoipa::path(get, path = "/devices", params(DeviceListParams), responses(
    (status = 200, body = DevicePageJson),
    (status = 400, body = ErrorBody)
))]
async fn list_devices(
    State(state): Shared,
    params: Result<Query<DeviceListParams>, QueryRejection>,
) -> Result<Json<DevicePageJson>, ApiError> {
    let Query(p) = params?;
    let tags = match &p.tag {
        Some(raw) => {
            parse_labels(raw.split(',').filter(|s| !s.is_empty())).map_err(ApiError::invalid)?
        }
        None => BTreeMap::new(),
    };
    let mut filter = DeviceFilter::tags(&tags);
    if let Some(text) = &p.filter {
        filter =
            filter.and(parse_filter(text).map_err(|e| ApiError::invalid(format!("where: {e}")))?);
    }
    if let Some(online) = p.online {
        filter =
            filter.and(parse_filter(&format!("online = {online}")).map_err(ApiError::invalid)?);
    }
    let page = state
        .ops
        .find_devices(
            p.after.as_deref().unwrap_or(""),
            p.limit.unwrap_or(0),
            &filter,
        )
        .await?;
    Ok(Json(DevicePageJson {
        devices: page
            .devices
            .into_iter()
            .map(|(d, since)| DeviceJson::new(d, since))
            .collect(),
        next_after: (!page.next_after.is_empty()).then_some(page.next_after),
        online_total: state.ops.online_count() as u64,
    }))
}

/// One device.
#[utoipa::path(get, path = "/devices/{id}", params(("id" = String, Path)), responses(
    (status = 200, body = DeviceJson),
    (status = 404, body = ErrorBody)
))]
async fn get_device(
    State(state): Shared,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceJson>, ApiError> {
    let Path(id) = id?;
    let (d, since) = state.ops.get_device(&id).await?;
    Ok(Json(DeviceJson::new(d, since)))
}

#[derive(Serialize, ToSchema)]
struct SensorsJson {
    device_id: String,
    sensors: Vec<String>,
}

/// The sensors a device has readings for.
#[utoipa::path(get, path = "/devices/{id}/sensors", params(("id" = String, Path)), responses(
    (status = 200, body = SensorsJson),
    (status = 404, body = ErrorBody)
))]
async fn device_sensors(
    State(state): Shared,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<SensorsJson>, ApiError> {
    let Path(id) = id?;
    let sensors = state.ops.device_sensors(&id).await?;
    Ok(Json(SensorsJson {
        device_id: id,
        sensors,
    }))
}

// ---- readings ----

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ReadingsParams {
    /// One sensor; all of the device's when absent.
    #[serde(default, deserialize_with = "empty_as_none")]
    sensor: Option<String>,
    /// From (inclusive): a duration before now (`1h`), an RFC3339 time or
    /// ms since the epoch.
    #[serde(default, deserialize_with = "empty_as_none")]
    since: Option<String>,
    /// Until (exclusive), in the same forms.
    #[serde(default, deserialize_with = "empty_as_none")]
    until: Option<String>,
    /// Most rows (or buckets); 0 or absent: no limit.
    limit: Option<u64>,
    /// Bucket width (`1m`, `250ms`): aggregates per bucket instead of raw
    /// readings.
    #[serde(default, deserialize_with = "empty_as_none")]
    bucket: Option<String>,
    /// Aggregates per bucket, comma-separated: avg, min, max, count, sum,
    /// first, last (default count,avg).
    #[serde(default, deserialize_with = "empty_as_none")]
    agg: Option<String>,
    /// `csv` for CSV (also chosen by `Accept: text/csv`).
    #[serde(default, deserialize_with = "empty_as_none")]
    format: Option<String>,
}

/// One stored reading (JSON rows of `readings`).
#[derive(Serialize, ToSchema)]
struct ReadingJson<'a> {
    sensor: &'a str,
    seq: u64,
    ts_ms: i64,
    value: f64,
}

/// Aggregates of one sensor over one bucket; only the asked-for
/// aggregates are present.
#[derive(Serialize, ToSchema)]
struct BucketJson<'a> {
    sensor: &'a str,
    start_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    avg: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sum: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last: Option<f64>,
}

impl<'a> BucketJson<'a> {
    fn new(b: &'a Bucket, wanted: &[Aggregate]) -> Self {
        let pick = |a: Aggregate| wanted.contains(&a).then(|| b.value(a));
        Self {
            sensor: &b.sensor,
            start_ms: b.start_ms,
            count: wanted.contains(&Aggregate::Count).then_some(b.count),
            avg: pick(Aggregate::Avg),
            min: pick(Aggregate::Min),
            max: pick(Aggregate::Max),
            sum: pick(Aggregate::Sum),
            first: pick(Aggregate::First),
            last: pick(Aggregate::Last),
        }
    }
}

/// The answer of `readings` as JSON: `readings` for raw rows, `buckets`
/// when a bucket width was given. Streamed as it is read, by `Encoder`, so
/// this only describes it; `tests/it/openapi.rs` checks real bodies against
/// it.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
struct ReadingsJson<'a> {
    device_id: String,
    bucket_ms: Option<i64>,
    #[schema(inline)]
    readings: Option<Vec<ReadingJson<'a>>>,
    #[schema(inline)]
    buckets: Option<Vec<BucketJson<'a>>>,
}

/// A device's stored readings, raw or in time buckets; JSON, or CSV with
/// `Accept: text/csv` or `format=csv`.
#[utoipa::path(get, path = "/devices/{id}/readings", params(("id" = String, Path), ReadingsParams),
    responses(
        (status = 200, description = "JSON; or CSV: sensor,seq,ts_ms,time,value (raw) or sensor,start_ms,time,<aggregates> (buckets)",
            content((ReadingsJson = "application/json"), (String = "text/csv"))),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)
    ))]
async fn readings(
    state: Shared,
    version: Version,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<ReadingsParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(p) = params?;
    let csv = match p.format.as_deref() {
        Some("csv") => true,
        Some("json") => false,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "format is csv or json, not {other:?}"
            )));
        }
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/csv")),
    };
    answer_readings(state, version, id, p, csv).await
}

/// The same as `readings`, always as CSV.
#[utoipa::path(get, path = "/devices/{id}/readings.csv", params(("id" = String, Path), ReadingsParams),
    responses(
        (status = 200, description = "CSV, as for readings", content_type = "text/csv"),
        (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)
    ))]
async fn readings_csv(
    state: Shared,
    version: Version,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<ReadingsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params?;
    answer_readings(state, version, id, p, true).await
}

async fn answer_readings(
    State(state): Shared,
    version: Version,
    id: Result<Path<String>, PathRejection>,
    p: ReadingsParams,
    csv: bool,
) -> Result<Response, ApiError> {
    if version < Version::HTTP_11 {
        return Err(ApiError::new(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "invalid_argument",
            "readings stream in chunks: use HTTP/1.1 or later, so a cut-short answer shows as one",
        ));
    }
    let Path(device_id) = id?;
    let since_ms = time_param(&p.since, "since")?;
    let until_ms = time_param(&p.until, "until")?;
    let bucket_ms = match &p.bucket {
        Some(raw) => parse_bucket(raw)
            .map_err(|e| ApiError::invalid(format!("bucket: {e}")))?
            .as_millis() as i64,
        None => 0,
    };
    // As over gRPC, aggregates without a bucket are not an error: raw
    // readings have none to show.
    let wanted = parse_aggregates(p.agg.as_deref().unwrap_or("")).map_err(ApiError::invalid)?;
    let q = state
        .ops
        .readings_query(ReadingsRequest {
            device_id: device_id.clone(),
            sensor: p.sensor,
            since_ms,
            until_ms,
            limit: p.limit.unwrap_or(0),
            bucket_ms,
        })
        .await?;
    let bucketed = q.bucket_ms.is_some();
    let mut run = state.ops.run_query(q)?;
    // The first chunk decides the status: an error before any data is an
    // error answer, not a 200 with a broken body.
    let first = match run.chunks.recv().await {
        Some(Err(e)) => return Err(OpError::from(e).into()),
        None => {
            if !run.ended_whole().await {
                return Err(cut_short());
            }
            None
        }
        chunk => chunk,
    };
    let mut encoder = Encoder {
        csv,
        wanted,
        rows: 0,
    };
    let head = encoder.head(&device_id, bucketed.then_some(bucket_ms));
    let (body_tx, body_rx) = mpsc::channel::<Piece>(4);
    let shutdown = state.shutdown.clone();
    state.tracker.spawn(async move {
        // The body ends without `Piece::Last` (broken, for the client) when
        // this returns early: a failed query, shutdown, a stalled client.
        let mut next = first;
        let mut out = head;
        loop {
            let last = match next {
                Some(Ok(chunk)) => {
                    encoder.chunk(&chunk, &mut out);
                    false
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "a readings query failed while streaming");
                    return;
                }
                None => {
                    if !run.ended_whole().await {
                        return;
                    }
                    encoder.tail(&mut out);
                    true
                }
            };
            // The last piece carries the end, so it is sent (or not) under
            // the same timeout and shutdown as every other.
            let bytes = Bytes::from(std::mem::take(&mut out));
            let piece = if last {
                Piece::Last(bytes)
            } else {
                Piece::Data(bytes)
            };
            tokio::select! {
                sent = tokio::time::timeout(STALLED_CLIENT, body_tx.send(piece)) => match sent {
                    Ok(Ok(())) if !last => {}
                    // Done; or gone, or not reading: drop it.
                    _ => return,
                },
                _ = shutdown.cancelled() => return,
            }
            next = tokio::select! {
                chunk = run.chunks.recv() => chunk,
                _ = shutdown.cancelled() => return,
            };
        }
    });
    let content_type = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/json"
    };
    let body = futures_util::stream::unfold(Some(body_rx), |rx| async move {
        let mut rx = rx?;
        match rx.recv().await {
            Some(Piece::Data(bytes)) => Some((Ok(bytes), Some(rx))),
            Some(Piece::Last(bytes)) => Some((Ok(bytes), None)),
            None => Some((
                Err(std::io::Error::other(
                    "the answer was cut short; see the hub's log",
                )),
                None,
            )),
        }
    });
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(body),
    )
        .into_response())
}

/// What the body of a readings answer is made of; a body whose sender goes
/// away before `Last` ends broken, so a cut-short answer never looks whole
/// (to HTTP/1.1 and later: HTTP/1.0 is refused, as its only end of a body
/// is a closed connection).
enum Piece {
    Data(Bytes),
    Last(Bytes),
}

/// The answer to a query that failed before its first chunk.
fn cut_short() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the hub failed while answering; see its log",
    )
}

/// Writes query chunks as one JSON document or as CSV lines.
struct Encoder {
    csv: bool,
    wanted: Vec<Aggregate>,
    rows: u64,
}

impl Encoder {
    fn head(&self, device_id: &str, bucket_ms: Option<i64>) -> Vec<u8> {
        let bucketed = bucket_ms.is_some();
        let mut out = Vec::with_capacity(4096);
        if self.csv {
            if bucketed {
                out.extend_from_slice(b"sensor,start_ms,time");
                for a in &self.wanted {
                    out.push(b',');
                    out.extend_from_slice(a.name().as_bytes());
                }
                out.push(b'\n');
            } else {
                out.extend_from_slice(b"sensor,seq,ts_ms,time,value\n");
            }
        } else {
            let id = serde_json::to_string(device_id).unwrap_or_default();
            let list = if bucketed { "buckets" } else { "readings" };
            let bucket = bucket_ms.map_or("null".to_owned(), |b| b.to_string());
            out.extend_from_slice(
                format!("{{\"device_id\":{id},\"bucket_ms\":{bucket},\"{list}\":[").as_bytes(),
            );
        }
        out
    }

    fn chunk(&mut self, chunk: &QueryChunk, out: &mut Vec<u8>) {
        match chunk {
            QueryChunk::Rows(rows) => rows.iter().for_each(|r| self.row(r, out)),
            QueryChunk::Buckets(buckets) => buckets.iter().for_each(|b| self.bucket(b, out)),
        }
    }

    fn separator(&mut self, out: &mut Vec<u8>) {
        if !self.csv && self.rows > 0 {
            out.push(b',');
        }
        self.rows += 1;
    }

    fn row(&mut self, r: &StoredReading, out: &mut Vec<u8>) {
        self.separator(out);
        if self.csv {
            out.extend_from_slice(
                format!(
                    "{},{},{},{},{}\n",
                    csv_field(&r.sensor),
                    r.seq,
                    r.ts_ms,
                    rfc3339_ms(r.ts_ms),
                    r.value
                )
                .as_bytes(),
            );
        } else {
            let row = ReadingJson {
                sensor: &r.sensor,
                seq: r.seq,
                ts_ms: r.ts_ms,
                value: r.value,
            };
            let _ = serde_json::to_writer(&mut *out, &row);
        }
    }

    fn bucket(&mut self, b: &Bucket, out: &mut Vec<u8>) {
        self.separator(out);
        if self.csv {
            let mut line = format!(
                "{},{},{}",
                csv_field(&b.sensor),
                b.start_ms,
                rfc3339_ms(b.start_ms)
            );
            for a in &self.wanted {
                line.push(',');
                match a {
                    Aggregate::Count => line.push_str(&b.count.to_string()),
                    other => line.push_str(&b.value(*other).to_string()),
                }
            }
            line.push('\n');
            out.extend_from_slice(line.as_bytes());
        } else {
            let _ = serde_json::to_writer(&mut *out, &BucketJson::new(b, &self.wanted));
        }
    }

    fn tail(&self, out: &mut Vec<u8>) {
        if !self.csv {
            out.extend_from_slice(b"]}");
        }
    }
}

// ---- commands ----

/// A command and where it is in its life.
#[derive(Serialize, ToSchema)]
pub(super) struct CommandJson {
    command_id: String,
    device_id: String,
    name: String,
    /// The parameters, a JSON object.
    #[schema(value_type = Object)]
    params: serde_json::Value,
    /// QUEUED, SENT, RECEIVED, SUCCEEDED, FAILED, REJECTED, EXPIRED or
    /// CANCELLED.
    state: String,
    detail: String,
    /// What the device answered, a JSON value, when it did.
    #[schema(value_type = Option<Object>)]
    result: Option<serde_json::Value>,
    /// Times it was written to the device's stream.
    attempts: u32,
    created_at_ms: i64,
    updated_at_ms: i64,
    expires_at_ms: i64,
    /// Every state change, oldest first (only for a single command).
    #[serde(skip_serializing_if = "Option::is_none")]
    history: Option<Vec<TransitionJson>>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct TransitionJson {
    state: String,
    at_ms: i64,
    detail: String,
}

impl CommandJson {
    pub(super) fn new(rec: CommandRecord, history: Option<Vec<CommandTransition>>) -> Self {
        let json = |raw: &str| {
            serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.to_owned()))
        };
        Self {
            params: if rec.params.is_empty() {
                serde_json::json!({})
            } else {
                json(&rec.params)
            },
            result: (!rec.result.is_empty()).then(|| json(&rec.result)),
            command_id: rec.command_id,
            device_id: rec.device_id,
            name: rec.name,
            state: rec.state.as_str().to_owned(),
            detail: rec.detail,
            attempts: rec.attempts,
            created_at_ms: rec.created_at_ms,
            updated_at_ms: rec.updated_at_ms,
            expires_at_ms: rec.expires_at_ms,
            history: history.map(|h| {
                h.into_iter()
                    .map(|t| TransitionJson {
                        state: t.state.as_str().to_owned(),
                        at_ms: t.at_ms,
                        detail: t.detail,
                    })
                    .collect()
            }),
        }
    }
}

/// Which devices a command goes to: tags that must all match, and a fleet
/// filter; at least one tag must be named (devices cannot change tags).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Selector {
    /// Every tag must match (`labels` is the older name).
    #[serde(default, alias = "labels")]
    tags: BTreeMap<String, String>,
    /// A fleet filter, ANDed with the tags.
    #[serde(default, rename = "where")]
    filter: Option<String>,
}

impl Selector {
    /// The core's filter: the tags and the `where` clauses.
    pub(super) fn filter(&self) -> Result<DeviceFilter, ApiError> {
        let mut filter = DeviceFilter::tags(&self.tags);
        if let Some(text) = self.filter.as_deref().filter(|t| !t.is_empty()) {
            filter = filter
                .and(parse_filter(text).map_err(|e| ApiError::invalid(format!("where: {e}")))?);
        }
        Ok(filter)
    }
}

/// A command to send: to `device_id`, or to every device `selector`
/// matches.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SendCommandJson {
    device_id: Option<String>,
    selector: Option<Selector>,
    /// 1 to 64 bytes.
    #[schema(min_length = 1, max_length = 64)]
    name: String,
    /// A JSON object (default `{}`).
    #[schema(value_type = Object)]
    params: Option<serde_json::Value>,
    /// How long it may wait for delivery (`30s`, `5m`); the hub's default
    /// when absent.
    ttl: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct SentCommandsJson {
    /// The commands queued.
    commands: Vec<CommandJson>,
    /// Devices of a selector the command could not be queued for.
    errors: Vec<SendErrorJson>,
}

/// Why one device of a selector was not changed.
#[derive(Serialize, ToSchema)]
pub(super) struct SendErrorJson {
    device_id: String,
    error: ErrorDetail,
}

impl SendErrorJson {
    pub(super) fn new(device_id: String, e: &OpError) -> Self {
        Self {
            device_id,
            error: ErrorDetail {
                code: e.code().as_str().to_owned(),
                message: e.public_message(),
            },
        }
    }
}

/// Sends a command to one device, or to every device a label selector
/// matches.
#[utoipa::path(post, path = "/commands", request_body = SendCommandJson, responses(
    (status = 415, body = ErrorBody, description = "the body is not application/json"),
    (status = 422, body = ErrorBody, description = "the JSON is not a command (wrong shape, unknown field)"),
    (status = 202, body = SentCommandsJson),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 413, body = ErrorBody),
    (status = 429, body = ErrorBody)
))]
async fn send_command(
    State(state): Shared,
    operator: Option<axum::Extension<Operator>>,
    body: Result<Json<SendCommandJson>, JsonRejection>,
) -> Result<(StatusCode, Json<SentCommandsJson>), ApiError> {
    let Json(req) = body?;
    // The core checks it is an object, as for every door.
    let params = req.params.map(|v| v.to_string()).unwrap_or_default();
    // The core checks the TTL's range, as for every door.
    let ttl = match &req.ttl {
        Some(raw) => Some(
            humantime::parse_duration(raw)
                .map_err(|e| ApiError::invalid(format!("ttl {raw:?}: {e}")))?,
        ),
        None => None,
    };
    let by = caller(operator);
    let (commands, errors) = match (req.device_id, req.selector) {
        (Some(device_id), None) => {
            let rec = state
                .ops
                .send_command(device_id, req.name, params, ttl)
                .await?;
            (vec![CommandJson::new(rec, None)], Vec::new())
        }
        (None, Some(selector)) => {
            let filter = selector.filter()?;
            let sent = state
                .ops
                .send_command_to_selector(&filter, req.name, params, ttl)
                .await?;
            let mut commands = Vec::new();
            let mut errors = Vec::new();
            for (device_id, result) in sent {
                match result {
                    Ok(rec) => commands.push(CommandJson::new(rec, None)),
                    Err(e) => errors.push(SendErrorJson::new(device_id, &e)),
                }
            }
            (commands, errors)
        }
        _ => {
            return Err(ApiError::invalid(
                "name exactly one of device_id and selector",
            ));
        }
    };
    for c in &commands {
        tracing::info!(by, command_id = c.command_id, device_id = ?c.device_id, name = ?c.name, "command sent (http)");
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(SentCommandsJson { commands, errors }),
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct CommandListParams {
    /// One device's commands.
    #[serde(default, deserialize_with = "empty_as_none")]
    device: Option<String>,
    /// One state (QUEUED, SENT, ..., CANCELLED).
    #[serde(default, deserialize_with = "empty_as_none")]
    state: Option<String>,
    /// Created from (a duration before now, RFC3339 or ms).
    #[serde(default, deserialize_with = "empty_as_none")]
    since: Option<String>,
    /// Created before.
    #[serde(default, deserialize_with = "empty_as_none")]
    until: Option<String>,
    /// Most commands, newest first (default 1000, at most 100000).
    limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
struct CommandListJson {
    commands: Vec<CommandJson>,
}

/// Commands, newest first.
#[utoipa::path(get, path = "/commands", params(CommandListParams), responses(
    (status = 200, body = CommandListJson),
    (status = 400, body = ErrorBody)
))]
async fn list_commands(
    State(state): Shared,
    params: Result<Query<CommandListParams>, QueryRejection>,
) -> Result<Json<CommandListJson>, ApiError> {
    let Query(p) = params?;
    let state_filter = match p.state.as_deref() {
        Some(raw) => Some(CommandState::parse(raw).ok_or_else(|| {
            ApiError::invalid(format!(
                "unknown state {raw:?} (QUEUED, SENT, RECEIVED, SUCCEEDED, FAILED, REJECTED, EXPIRED, CANCELLED)"
            ))
        })?),
        None => None,
    };
    let filter = CommandFilter {
        device_id: p.device,
        state: state_filter,
        since_ms: time_param(&p.since, "since")?,
        until_ms: time_param(&p.until, "until")?,
        limit: p.limit.unwrap_or(0),
    };
    let commands = state.ops.list_commands(filter).await?;
    Ok(Json(CommandListJson {
        commands: commands
            .into_iter()
            .map(|c| CommandJson::new(c, None))
            .collect(),
    }))
}

/// One command, with its history.
#[utoipa::path(get, path = "/commands/{id}", params(("id" = String, Path)), responses(
    (status = 200, body = CommandJson),
    (status = 404, body = ErrorBody)
))]
async fn get_command(
    State(state): Shared,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CommandJson>, ApiError> {
    let Path(id) = id?;
    let (rec, history) = state.ops.get_command(&id).await?;
    Ok(Json(CommandJson::new(rec, Some(history))))
}

/// Cancels a command that is not final yet.
#[utoipa::path(post, path = "/commands/{id}/cancel", params(("id" = String, Path)), responses(
    (status = 200, body = CommandJson),
    (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "the command is final already")
))]
async fn cancel_command(
    State(state): Shared,
    operator: Option<axum::Extension<Operator>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CommandJson>, ApiError> {
    let Path(id) = id?;
    let rec = state.ops.cancel_command(&id).await?;
    let by = caller(operator);
    tracing::info!(by, command_id = rec.command_id, "command cancelled (http)");
    Ok(Json(CommandJson::new(rec, None)))
}

// ---- hub ----

/// The hub's counters and gauges.
#[utoipa::path(get, path = "/stats", responses((status = 200, body = HubStats)))]
async fn stats(State(state): Shared) -> Result<Json<HubStats>, ApiError> {
    Ok(Json(state.ops.stats().await?))
}
