//! The Prometheus HTTP query API (what Grafana's Prometheus data source
//! calls): `/api/v1/query`, `query_range`, `series`, `labels`,
//! `label/{name}/values`, `metadata` and `status/buildinfo`, GET or POST
//! (form), under the operator read role whatever the method. Answers and
//! errors are in Prometheus' JSON (`{"status": "error", "errorType":
//! "bad_data", ...}`), evaluated by the core ([`crate::operator::prom`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use promql_parser::label::Matcher;
use serde::Serialize;
use serde_json::{Value as Json, json};
use utoipa::ToSchema;

use super::ApiState;
use crate::operator::OpError;
use crate::operator::prom::PromFailure;
use crate::promql::{self, QueryError, Steps, Value};

pub(super) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/api/v1/query", get(query).post(query))
        .route("/api/v1/query_range", get(query_range).post(query_range))
        .route("/api/v1/series", get(series).post(series))
        .route("/api/v1/labels", get(labels).post(labels))
        .route("/api/v1/label/{name}/values", get(label_values))
        .route("/api/v1/metadata", get(metadata))
        .route("/api/v1/status/buildinfo", get(buildinfo))
}

/// A request's parameters: the query string, then a form body.
struct Params(Vec<(String, String)>);

impl Params {
    fn new(raw: Option<String>, headers: &HeaderMap, body: &Bytes) -> Self {
        let mut pairs: Vec<(String, String)> =
            form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .into_owned()
                .collect();
        let form = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if form {
            pairs.extend(form_urlencoded::parse(body).into_owned());
        }
        Self(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn required(&self, name: &str) -> Result<&str, Failure> {
        self.get(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| Failure::bad(format!("invalid parameter \"{name}\": missing")))
    }

    /// The `match[]` selectors.
    fn selectors(&self) -> Result<Vec<Vec<Matcher>>, Failure> {
        self.0
            .iter()
            .filter(|(k, _)| k == "match[]")
            .map(|(_, v)| selector(v))
            .collect()
    }
}

/// A `match[]` selector's matchers.
fn selector(text: &str) -> Result<Vec<Matcher>, Failure> {
    let bad = || {
        Failure::bad(format!(
            "invalid parameter \"match[]\": {text:?} is not a series selector"
        ))
    };
    match promql::parse_expr(text).map_err(|_| bad())? {
        promql_parser::parser::Expr::VectorSelector(vs) => {
            let mut m = vs.matchers.matchers;
            if let Some(name) = vs.name {
                m.push(Matcher::new(
                    promql_parser::label::MatchOp::Equal,
                    promql::NAME,
                    &name,
                ));
            }
            Ok(m)
        }
        _ => Err(bad()),
    }
}

/// A time parameter: Unix seconds (with a fraction) or RFC 3339.
fn time(raw: &str, what: &str) -> Result<i64, Failure> {
    if let Ok(secs) = raw.parse::<f64>() {
        let ms = secs * 1000.0;
        if !ms.is_finite() || ms.abs() > promql::MAX_TIME_MS as f64 {
            return Err(Failure::bad(format!(
                "invalid parameter \"{what}\": {raw:?} is out of range"
            )));
        }
        return Ok(ms.round() as i64);
    }
    humantime::parse_rfc3339_weak(raw)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .ok_or_else(|| {
            Failure::bad(format!(
                "invalid parameter \"{what}\": cannot parse {raw:?} to a valid timestamp"
            ))
        })
}

/// A step: seconds (with a fraction) or a duration (`15s`, `1m30s`).
fn duration(raw: &str, what: &str) -> Result<i64, Failure> {
    let out_of_range = || {
        Failure::bad(format!(
            "invalid parameter \"{what}\": {raw:?} is out of range"
        ))
    };
    if let Ok(secs) = raw.parse::<f64>() {
        let ms = secs * 1000.0;
        if !ms.is_finite() || ms.abs() > promql::MAX_TIME_MS as f64 {
            return Err(out_of_range());
        }
        return Ok(ms.round() as i64);
    }
    std::panic::catch_unwind(|| promql_parser::util::parse_duration(raw))
        .map_err(|_| out_of_range())?
        .map(|d| {
            i64::try_from(d.as_millis())
                .unwrap_or(i64::MAX)
                .min(promql::MAX_TIME_MS)
        })
        .map_err(|_| {
            Failure::bad(format!(
                "invalid parameter \"{what}\": cannot parse {raw:?} to a valid duration"
            ))
        })
}

/// An error answer in Prometheus' form.
struct Failure {
    status: StatusCode,
    kind: PromErrorType,
    message: String,
}

impl Failure {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: PromErrorType::BadData,
            message: message.into(),
        }
    }
}

impl From<OpError> for Failure {
    fn from(e: OpError) -> Self {
        let api = super::ApiError::from(e);
        let kind = match api.status {
            StatusCode::BAD_REQUEST => PromErrorType::BadData,
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                PromErrorType::Unavailable
            }
            _ => PromErrorType::Internal,
        };
        Self {
            status: api.status,
            kind,
            message: api.message,
        }
    }
}

impl From<PromFailure> for Failure {
    fn from(e: PromFailure) -> Self {
        match e {
            PromFailure::Query(QueryError::BadData(m)) => Self::bad(m),
            PromFailure::Query(QueryError::Execution(m)) => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                kind: PromErrorType::Execution,
                message: m,
            },
            PromFailure::Op(e) => e.into(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = PromErrorAnswer {
            status: PromErrorStatus::Error,
            error_type: self.kind,
            error: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

fn success(data: Json) -> Response {
    axum::Json(json!({"status": PromSuccess::Success, "data": data})).into_response()
}

/// A sample as Prometheus writes it: [seconds, "value"].
fn point(t_ms: i64, v: f64) -> Json {
    let value = if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{v}")
    };
    json!([t_ms as f64 / 1000.0, value])
}

type Shared = State<Arc<ApiState>>;

// The answers' forms, as the OpenAPI document gives them (`it::openapi`
// checks real answers against it). Errors are written from
// [`PromErrorAnswer`]; successes, whose `data` varies, with `json!`.

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum PromSuccess {
    Success,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum PromResultType {
    Vector,
    Matrix,
    Scalar,
}

/// A query's answer: `result` holds `{metric, value: [t, "v"]}` (vector),
/// `{metric, values: [[t, "v"], ...]}` (matrix) or is `[t, "v"]` (scalar).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct PromQueryData {
    result_type: PromResultType,
    #[schema(value_type = Vec<Value>)]
    result: Vec<Json>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct PromQueryAnswer {
    status: PromSuccess,
    data: PromQueryData,
}

/// Label names or one label's values.
#[derive(Serialize, ToSchema)]
pub(super) struct PromNamesAnswer {
    status: PromSuccess,
    data: Vec<String>,
}

/// The label sets of the matching series.
#[derive(Serialize, ToSchema)]
pub(super) struct PromSeriesAnswer {
    status: PromSuccess,
    data: Vec<std::collections::BTreeMap<String, String>>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct PromMetricMetadata {
    r#type: String,
    help: String,
    unit: String,
}

/// Per metric name, what it is (every sensor is a gauge).
#[derive(Serialize, ToSchema)]
pub(super) struct PromMetadataAnswer {
    status: PromSuccess,
    data: std::collections::BTreeMap<String, Vec<PromMetricMetadata>>,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct PromBuildInfo {
    version: String,
    revision: String,
    branch: String,
    build_user: String,
    build_date: String,
    go_version: String,
}

#[derive(Serialize, ToSchema)]
pub(super) struct PromBuildInfoAnswer {
    status: PromSuccess,
    data: PromBuildInfo,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum PromErrorStatus {
    Error,
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(super) enum PromErrorType {
    BadData,
    Execution,
    Unavailable,
    Internal,
}

/// Prometheus' error form.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct PromErrorAnswer {
    status: PromErrorStatus,
    error_type: PromErrorType,
    error: String,
}

/// Evaluates a PromQL query at one time (GET, or POST as a form).
#[utoipa::path(method(get, post), path = "/query", tag = "prometheus",
    params(
        ("query" = String, Query, description = "PromQL, in the subset the README lists"),
        ("time" = Option<String>, Query, description = "Unix seconds or RFC 3339; now by default"),
    ),
    responses(
        (status = 200, body = PromQueryAnswer),
        (status = 400, body = PromErrorAnswer, description = "bad_data: the query, a parameter, or over a limit"),
        (status = 422, body = PromErrorAnswer, description = "execution: e.g. many-to-many matching"),
        (status = 503, body = PromErrorAnswer, description = "unavailable: the hub is busy or its store"),
    ))]
pub(super) async fn query(
    State(state): Shared,
    raw: RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(async {
        let p = Params::new(raw.0, &headers, &body);
        let text = p.required("query")?;
        let at = match p.get("time").filter(|t| !t.is_empty()) {
            Some(t) => time(t, "time")?,
            None => crate::domain::now_ms(),
        };
        let steps = Steps::instant(at).map_err(PromFailure::from)?;
        let value = state.ops.prom_query(text, steps).await?;
        Ok(match value {
            Value::Scalar(v) => {
                json!({"resultType": PromResultType::Scalar, "result": point(at, v[0])})
            }
            Value::Range(series) => json!({
                "resultType": PromResultType::Matrix,
                "result": series.iter().map(|(labels, samples)| json!({
                    "metric": labels,
                    "values": samples.iter().map(|&(t, v)| point(t, v)).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
            Value::Vector(series) => json!({
                "resultType": PromResultType::Vector,
                "result": series.iter().filter_map(|s| s.values[0].map(|v| json!({
                    "metric": s.labels, "value": point(at, v)
                }))).collect::<Vec<_>>(),
            }),
        })
    })
    .await
}

/// Evaluates a PromQL query at every step from start to end.
#[utoipa::path(method(get, post), path = "/query_range", tag = "prometheus",
    params(
        ("query" = String, Query, description = "PromQL"),
        ("start" = String, Query, description = "Unix seconds or RFC 3339"),
        ("end" = String, Query, description = "Unix seconds or RFC 3339"),
        ("step" = String, Query, description = "seconds or a duration (15s, 1m); at most 11,000 steps"),
    ),
    responses(
        (status = 200, body = PromQueryAnswer),
        (status = 400, body = PromErrorAnswer, description = "bad_data: the query, a parameter, or over a limit"),
        (status = 422, body = PromErrorAnswer, description = "execution: e.g. many-to-many matching"),
        (status = 503, body = PromErrorAnswer, description = "unavailable: the hub is busy or its store"),
    ))]
pub(super) async fn query_range(
    State(state): Shared,
    raw: RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(async {
        let p = Params::new(raw.0, &headers, &body);
        let text = p.required("query")?;
        let start = time(p.required("start")?, "start")?;
        let end = time(p.required("end")?, "end")?;
        let step = duration(p.required("step")?, "step")?;
        let steps = Steps::range(start, end, step).map_err(PromFailure::from)?;
        let times = steps.times();
        let value = state.ops.prom_query(text, steps).await?;
        let series: Vec<(promql::Labels, Vec<Option<f64>>)> = match value {
            // A scalar's range is one series without labels.
            Value::Scalar(v) => vec![(promql::Labels::new(), v.into_iter().map(Some).collect())],
            Value::Vector(series) => series.into_iter().map(|s| (s.labels, s.values)).collect(),
            Value::Range(_) => {
                return Err(Failure::bad(
                    "a range vector is not the value of a range query",
                ));
            }
        };
        // Written straight out: a fleet's range is ~1M points.
        let mut out = String::with_capacity((64 + times.len() * series.len() * 24).min(64 << 20));
        out.push_str(r#"{"status":"success","data":{"resultType":"matrix","result":["#);
        for (i, (labels, values)) in series.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(r#"{"metric":"#);
            out.push_str(&serde_json::to_string(labels).unwrap_or_default());
            out.push_str(r#","values":["#);
            let mut first = true;
            for (&t, v) in times.iter().zip(values) {
                let Some(v) = v else { continue };
                if !first {
                    out.push(',');
                }
                first = false;
                write_point(&mut out, t, *v);
            }
            out.push_str("]}");
        }
        out.push_str("]}}");
        Ok(Answer::Raw(out))
    })
    .await
}

/// [`point`] written into `out` (a fleet's range is ~1M of them: no
/// `fmt` machinery).
fn write_point(out: &mut String, t_ms: i64, v: f64) {
    let mut int = itoa::Buffer::new();
    out.push('[');
    if t_ms < 0 {
        out.push('-');
    }
    let (secs, ms) = (t_ms.unsigned_abs() / 1000, t_ms.unsigned_abs() % 1000);
    out.push_str(int.format(secs));
    if ms != 0 {
        out.push('.');
        for digit in [ms / 100, ms / 10 % 10, ms % 10] {
            out.push(char::from(b'0' + digit as u8));
        }
    }
    out.push_str(",\"");
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else if v.fract() == 0.0 && v.abs() < 1e15 && !(v == 0.0 && v.is_sign_negative()) {
        // Whole numbers as Prometheus writes them: "42", not "42.0".
        out.push_str(int.format(v as i64));
    } else {
        out.push_str(ryu::Buffer::new().format_finite(v));
    }
    out.push_str("\"]");
}

/// A successful answer: its `data`, or the whole body already written.
enum Answer {
    Data(Json),
    Raw(String),
}

impl From<Json> for Answer {
    fn from(data: Json) -> Self {
        Answer::Data(data)
    }
}

/// The series matching any `match[]` selector.
#[utoipa::path(method(get, post), path = "/series", tag = "prometheus",
    params(("match[]" = Vec<String>, Query, description = "series selectors, one at least")),
    responses((status = 200, body = PromSeriesAnswer), (status = 400, body = PromErrorAnswer)))]
pub(super) async fn series(
    State(state): Shared,
    raw: RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(async {
        let p = Params::new(raw.0, &headers, &body);
        let selectors = p.selectors()?;
        if selectors.is_empty() {
            return Err(Failure::bad("no match[] parameter provided"));
        }
        Ok(json!(state.ops.prom_series(&selectors).await?))
    })
    .await
}

/// The label names of the series matching `match[]` (of all without).
#[utoipa::path(method(get, post), path = "/labels", tag = "prometheus",
    params(("match[]" = Option<Vec<String>>, Query, description = "series selectors")),
    responses((status = 200, body = PromNamesAnswer), (status = 400, body = PromErrorAnswer)))]
pub(super) async fn labels(
    State(state): Shared,
    raw: RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    answer(async {
        let p = Params::new(raw.0, &headers, &body);
        let names: BTreeSet<String> = state
            .ops
            .prom_series(&p.selectors()?)
            .await?
            .into_iter()
            .flat_map(|l| l.into_keys())
            .collect();
        Ok(json!(names))
    })
    .await
}

/// One label's values among the series matching `match[]` (all without).
#[utoipa::path(get, path = "/label/{name}/values", tag = "prometheus",
    params(
        ("name" = String, Path, description = "a label name; __name__ gives the metric names"),
        ("match[]" = Option<Vec<String>>, Query, description = "series selectors"),
    ),
    responses((status = 200, body = PromNamesAnswer), (status = 400, body = PromErrorAnswer)))]
pub(super) async fn label_values(
    State(state): Shared,
    Path(name): Path<String>,
    raw: RawQuery,
) -> Response {
    answer(async {
        let p = Params::new(raw.0, &HeaderMap::new(), &Bytes::new());
        let values: BTreeSet<String> = state
            .ops
            .prom_series(&p.selectors()?)
            .await?
            .into_iter()
            .filter_map(|mut l| l.remove(&name))
            .collect();
        Ok(json!(values))
    })
    .await
}

/// Every metric (sensor) name, as a gauge.
#[utoipa::path(get, path = "/metadata", tag = "prometheus",
    params(("metric" = Option<String>, Query, description = "only this metric")),
    responses((status = 200, body = PromMetadataAnswer)))]
pub(super) async fn metadata(State(state): Shared, raw: RawQuery) -> Response {
    answer(async {
        let p = Params::new(raw.0, &HeaderMap::new(), &Bytes::new());
        let only = p.get("metric").filter(|m| !m.is_empty());
        let names: BTreeSet<String> = state
            .ops
            .prom_series(&[])
            .await?
            .into_iter()
            .filter_map(|mut l| l.remove(promql::NAME))
            .filter(|n| only.is_none_or(|o| o == n))
            .collect();
        let data: serde_json::Map<String, Json> = names
            .into_iter()
            .map(|n| {
                let help = format!("readings of the sensor {n}");
                (n, json!([{"type": "gauge", "help": help, "unit": ""}]))
            })
            .collect();
        Ok(Json::Object(data))
    })
    .await
}

/// What Grafana probes: the Prometheus version whose API this follows.
#[utoipa::path(get, path = "/status/buildinfo", tag = "prometheus",
    responses((status = 200, body = PromBuildInfoAnswer)))]
pub(super) async fn buildinfo() -> Response {
    success(json!({
        "version": "2.42.0",
        "revision": concat!("telemetry-hub ", env!("CARGO_PKG_VERSION")),
        "branch": "",
        "buildUser": "",
        "buildDate": "",
        "goVersion": "",
    }))
}

async fn answer<A: Into<Answer>>(work: impl Future<Output = Result<A, Failure>>) -> Response {
    match work.await.map(Into::into) {
        Ok(Answer::Data(data)) => success(data),
        Ok(Answer::Raw(body)) => {
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(f) => f.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_written_as_prometheus_reads_them() {
        let cases = [
            (1_700_000_000_000, 42.0, r#"[1700000000,"42"]"#),
            (1_700_000_000_250, -0.5, r#"[1700000000.250,"-0.5"]"#),
            (5, 0.1, r#"[0.005,"0.1"]"#),
            (-1_500, -0.0, r#"[-1.500,"-0.0"]"#),
            (0, f64::NAN, r#"[0,"NaN"]"#),
            (1_000, f64::NEG_INFINITY, r#"[1,"-Inf"]"#),
            (1_000, 1e300, r#"[1,"1e300"]"#),
        ];
        for (t, v, want) in cases {
            let mut out = String::new();
            write_point(&mut out, t, v);
            assert_eq!(out, want);
            // Whatever the form, the numbers read back exactly.
            let back: (f64, String) = serde_json::from_str(&out).unwrap();
            assert_eq!(back.0, t as f64 / 1000.0);
            let value: f64 = back.1.replace("Inf", "inf").parse().unwrap();
            assert!(
                value.to_bits() == v.to_bits() || (v.is_nan() && value.is_nan()),
                "{out}"
            );
        }
    }
}
