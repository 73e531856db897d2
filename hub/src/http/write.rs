//! Line-protocol writes on the HTTP door, in InfluxDB's forms:
//! `POST /api/v1/write` (and `/write`, `/api/v2/write`, where Telegraf's
//! InfluxDB outputs post), `precision` honoured, `db`/`bucket`/`org`
//! ignored, gzip bodies taken. Device credentials, not operator tokens:
//! `Authorization: Bearer|Token <device token>`, Basic with the token as
//! the password, or `p=<token>`. 204 only after the commit
//! ([`crate::lines`]).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde::Deserialize;

use super::{ApiError, ApiState};
use crate::lines::{ParseError, Precision, WriteError};

pub(super) fn routes(state: Arc<ApiState>) -> Router {
    let limit = state.write_max_bytes;
    Router::new()
        .route("/api/v1/write", post(write))
        .route("/api/v2/write", post(write))
        .route("/write", post(write))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

#[derive(Deserialize)]
pub(super) struct WriteParams {
    precision: Option<String>,
    /// InfluxDB 1.x's password parameter: the device token.
    p: Option<String>,
}

/// Stores InfluxDB line protocol (one device's readings per `device` tag),
/// answered only after the commit. Also at `/write` and `/api/v2/write`.
#[utoipa::path(post, path = "/write",
    params(
        ("precision" = Option<String>, Query,
            description = "ns (default), us, ms, s, m or h (also n, u, µ)"),
        ("p" = Option<String>, Query, description = "the device token (InfluxDB 1.x's password)"),
        ("db" = Option<String>, Query, description = "ignored"),
        ("bucket" = Option<String>, Query, description = "ignored"),
    ),
    request_body(content = String, content_type = "text/plain",
        description = "Lines `measurement,device=<id>[,tag=v] field=v[,seq=<n>] [timestamp]`; \
            the sensor is `{measurement}_{field}`, or the field of measurement `readings`. \
            May be gzip (Content-Encoding)."),
    responses(
        (status = 204, description = "Every reading committed", headers(
            ("x-hub-stored" = u64, description = "readings stored"),
            ("x-hub-duplicates" = u64, description = "readings whose seq was stored already"),
        )),
        (status = 400, body = super::api::ErrorBody, description = "A bad line (named) or body: nothing stored"),
        (status = 401, body = super::api::ErrorBody, description = "Not the device's or its fleet's token"),
        (status = 403, body = super::api::ErrorBody, description = "Device auth is tls, or a browser page of another site"),
        (status = 409, body = super::api::ErrorBody, description = "The device holds a gRPC stream"),
        (status = 413, body = super::api::ErrorBody, description = "Over http.write_max_bytes, _lines or _readings"),
        (status = 415, body = super::api::ErrorBody, description = "A Content-Encoding other than gzip"),
        (status = 429, body = super::api::ErrorBody, description = "Over the device's rate; see Retry-After"),
        (status = 503, body = super::api::ErrorBody, description = "Not acknowledged: retry"),
    ))]
pub(super) async fn write(
    State(state): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    params: Result<Query<WriteParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match stored(&state, Some(peer.ip()), params, &headers, body).await {
        // What became of the readings, for clients that look: lines with
        // seq already stored are duplicates, not stored again.
        Ok(done) => (
            StatusCode::NO_CONTENT,
            [
                ("x-hub-stored", done.stored.to_string()),
                ("x-hub-duplicates", done.duplicates.to_string()),
            ],
        )
            .into_response(),
        Err(refused) => refused,
    }
}

async fn stored(
    state: &ApiState,
    peer: Option<std::net::IpAddr>,
    params: Result<Query<WriteParams>, axum::extract::rejection::QueryRejection>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<crate::lines::WriteDone, Response> {
    let Query(params) = params.map_err(|e| ApiError::from(e).into_response())?;
    if let Some(origin) = headers.get(header::ORIGIN) {
        // Writers are programs; a browser page of any site is refused.
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .is_some_and(|(_, rest)| Some(rest) == host);
        if !same {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "permission_denied",
                "a write from a web page of another site is refused",
            ));
        }
    }
    let precision = Precision::parse(params.precision.as_deref())
        .map_err(|e| ApiError::invalid(e).into_response())?;
    let body = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(state.write_max_bytes)
        } else {
            ApiError::invalid(e.body_text()).into_response()
        }
    })?;
    let gzip = match headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e == "gzip" => true,
        Some(e) if e.is_empty() || e == "identity" => false,
        Some(e) => {
            return Err(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("Content-Encoding {e:?}: only gzip is taken"),
            ));
        }
    };
    let token = presented_token(headers).or(params.p);
    let rules = state
        .writes
        .rules(precision, state.write_max_lines, state.write_max_readings);
    let max_bytes = state.write_max_bytes;
    // Inflating and parsing a large body is CPU work: off the runtime.
    let parsed = tokio::task::spawn_blocking(move || {
        let text = if gzip {
            inflate(&body, max_bytes)?
        } else {
            body.to_vec()
        };
        let text = String::from_utf8(text).map_err(|e| Refused::NotUtf8(e.utf8_error()))?;
        crate::lines::parse(&text, &rules).map_err(Refused::Lines)
    })
    .await
    .map_err(|_| {
        refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the hub failed while reading the lines; see its log",
        )
    })?;
    let devices = parsed.map_err(|refused| match refused {
        Refused::TooLarge => too_large(max_bytes),
        Refused::BadGzip(e) => {
            ApiError::invalid(format!("the gzip body cannot be read: {e}")).into_response()
        }
        Refused::NotUtf8(e) => {
            ApiError::invalid(format!("the body is not UTF-8: {e}")).into_response()
        }
        Refused::Lines(ParseError::TooManyLines(n)) => refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("more than {n} lines in one write (http.write_max_lines)"),
        ),
        Refused::Lines(e @ (ParseError::TooManyReadings(_) | ParseError::TooManyDevices)) => {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                e.to_string(),
            )
        }
        Refused::Lines(e @ ParseError::Line { .. }) => {
            ApiError::invalid(e.to_string()).into_response()
        }
    })?;
    if devices.is_empty() {
        return Ok(crate::lines::WriteDone::default());
    }
    state
        .writes
        .write(devices, token.as_deref(), peer)
        .await
        .map_err(write_error)
}

/// Why a body was refused before its lines were looked at.
enum Refused {
    TooLarge,
    BadGzip(std::io::Error),
    NotUtf8(std::str::Utf8Error),
    Lines(ParseError),
}

/// A gzip body, inflated up to `max` bytes.
fn inflate(body: &[u8], max: usize) -> Result<Vec<u8>, Refused> {
    use std::io::Read;
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(max));
    flate2::read::MultiGzDecoder::new(body)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(Refused::BadGzip)?;
    if out.len() > max {
        return Err(Refused::TooLarge);
    }
    Ok(out)
}

/// The device token a request presents: `Bearer` or `Token` (InfluxDB 2),
/// or Basic auth's password (InfluxDB 1 clients).
fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
        return Some(rest.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        return decoded
            .split_once(':')
            .map(|(_, password)| password.to_owned());
    }
    None
}

fn refuse(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    ApiError::new(status, code, message).into_response()
}

fn too_large(max: usize) -> Response {
    refuse(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body is over {max} bytes, before or after gzip (http.write_max_bytes)"),
    )
}

fn write_error(e: WriteError) -> Response {
    let message = e.to_string();
    match e {
        WriteError::Unauthenticated { .. } => {
            let mut r = refuse(StatusCode::UNAUTHORIZED, "unauthenticated", message);
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
        WriteError::TooManyFailures => {
            refuse(StatusCode::TOO_MANY_REQUESTS, "resource_exhausted", message)
        }
        WriteError::CertificatesOnly => refuse(StatusCode::FORBIDDEN, "permission_denied", message),
        WriteError::Conflict { .. } => refuse(StatusCode::CONFLICT, "failed_precondition", message),
        WriteError::RateLimited { retry_after, .. } => {
            let mut r = refuse(StatusCode::TOO_MANY_REQUESTS, "resource_exhausted", message);
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            r
        }
        WriteError::Unavailable(_) => {
            let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        WriteError::Partial { .. } => refuse(StatusCode::BAD_REQUEST, "partial_write", message),
    }
}
