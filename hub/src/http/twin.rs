//! `GET/PATCH /api/v1/devices/{id}/twin`: a device's twin (read role) and
//! changes of its desired document and tags (admin role, like every call
//! that is not a read). The ETag is the desired version; `If-Match` on a
//! PATCH makes the desired change conditional (412 when stale).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::{ErrorBody, Selector, SendErrorJson, caller};
use super::{ApiError, ApiState};
use crate::auth::Operator;
use crate::operator::{ErrorCode, check_tags};
use crate::twin::TwinView;

pub(super) fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new()
        .route("/devices/{id}/twin", get(get_twin).patch(patch_twin))
        .route("/twins/desired", post(desired_to_selector))
}

/// One desired change for every device a selector matches.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SelectorDesiredJson {
    selector: Selector,
    /// A JSON merge patch (RFC 7386) of the desired document.
    #[schema(value_type = Object)]
    desired: serde_json::Value,
}

/// A device a selector's change reached, and its new desired version.
#[derive(Serialize, ToSchema)]
pub(super) struct ChangedJson {
    device_id: String,
    desired_version: u64,
}

#[derive(Serialize, ToSchema)]
pub(super) struct SelectorChangedJson {
    changed: Vec<ChangedJson>,
    /// Devices of the selector the change could not be made for.
    errors: Vec<SendErrorJson>,
}

/// Applies one desired change to every device a selector matches (it
/// must require a tag; at most 10,000 devices).
#[utoipa::path(post, path = "/twins/desired", request_body = SelectorDesiredJson, responses(
    (status = 200, body = SelectorChangedJson),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody, description = "no device matches"),
    (status = 415, body = ErrorBody, description = "the body is not JSON"),
    (status = 422, body = ErrorBody, description = "the JSON is not a selector's change")
))]
pub(super) async fn desired_to_selector(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    body: Result<Json<SelectorDesiredJson>, JsonRejection>,
) -> Result<Json<SelectorChangedJson>, ApiError> {
    let Json(req) = body?;
    let filter = req.selector.filter()?;
    let results = state
        .ops
        .update_desired_to_selector(&filter, req.desired.to_string())
        .await?;
    let mut changed = Vec::new();
    let mut errors = Vec::new();
    for (device_id, result) in results {
        match result {
            Ok(view) => changed.push(ChangedJson {
                device_id,
                desired_version: view.twin.desired_version,
            }),
            Err(e) => errors.push(SendErrorJson::new(device_id, &e)),
        }
    }
    tracing::info!(
        by = caller(operator),
        devices = changed.len(),
        failed = errors.len(),
        "desired state changed by selector (http)"
    );
    Ok(Json(SelectorChangedJson { changed, errors }))
}

/// A device's twin.
#[derive(Serialize, ToSchema)]
pub(super) struct TwinJson {
    device_id: String,
    /// Operator-owned; selectors and filters match on them.
    tags: BTreeMap<String, String>,
    #[schema(value_type = Object)]
    desired: serde_json::Value,
    desired_version: u64,
    #[schema(value_type = Object)]
    reported: serde_json::Value,
    reported_version: u64,
    /// The desired keys whose value differs from reported, nested.
    #[schema(value_type = Object)]
    delta: serde_json::Value,
    /// `{"desired": …, "reported": …}`: each key's last update (ms).
    #[schema(value_type = Object)]
    metadata: serde_json::Value,
}

impl TwinJson {
    pub(super) fn new(view: &TwinView) -> Self {
        let t = &view.twin;
        Self {
            device_id: view.device_id.clone(),
            tags: view.tags.clone(),
            desired: serde_json::Value::Object(t.desired.clone()),
            desired_version: t.desired_version,
            reported: serde_json::Value::Object(t.reported.clone()),
            reported_version: t.reported_version,
            delta: serde_json::Value::Object(t.delta()),
            metadata: t.metadata(),
        }
    }
}

/// A change of a twin: a merge patch of `desired`, tags to set (a string)
/// or remove (null). Either or both: desired first (so a stale If-Match
/// changes nothing), then tags, in two commits.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TwinPatchJson {
    /// A JSON merge patch (RFC 7386) of the desired document.
    #[schema(value_type = Object)]
    desired: Option<serde_json::Value>,
    /// Tag -> new value, or null to remove it.
    #[schema(value_type = Object)]
    tags: Option<BTreeMap<String, Option<String>>>,
}

fn with_etag(view: &TwinView) -> Response {
    let etag = format!("\"{}\"", view.twin.desired_version);
    let mut response = Json(TwinJson::new(view)).into_response();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// A device's twin: tags, desired and reported with versions, the delta
/// and each key's last update. ETag: the desired version.
#[utoipa::path(get, path = "/devices/{id}/twin", params(("id" = String, Path)), responses(
    (status = 200, body = TwinJson),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody)
))]
pub(super) async fn get_twin(
    State(state): State<Arc<ApiState>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(device_id) = id?;
    let view = state.ops.get_twin(&device_id).await?;
    Ok(with_etag(&view))
}

/// The desired version an `If-Match` names (`"3"`, `W/"3"`), None for
/// `*`; a malformed one is refused.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(raw) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = raw.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    text.trim_start_matches("W/")
        .trim_matches('"')
        .parse::<u64>()
        .map(Some)
        .map_err(|_| {
            ApiError::invalid(format!(
                "If-Match is an ETag of this API (\"3\": the desired version), not {text:?}"
            ))
        })
}

/// Changes a twin: a merge patch of its desired document (conditional with
/// `If-Match`: the ETag of a GET) and its tags. The twin after the change,
/// with its new ETag.
#[utoipa::path(patch, path = "/devices/{id}/twin", params(("id" = String, Path),
    ("If-Match" = Option<String>, Header, description = "the desired version (ETag) the change applies to")),
    request_body(content = TwinPatchJson, content_type = "application/merge-patch+json"), responses(
    (status = 200, body = TwinJson),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 412, body = ErrorBody, description = "If-Match is not the desired version"),
    (status = 415, body = ErrorBody, description = "the body is not JSON"),
    (status = 422, body = ErrorBody, description = "the JSON is not a twin change"),
    (status = 503, body = ErrorBody)
))]
pub(super) async fn patch_twin(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Json<TwinPatchJson>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Path(device_id) = id?;
    let Json(change) = body?;
    let if_version = if_match(&headers)?;
    if change.desired.is_none() && change.tags.is_none() {
        return Err(ApiError::invalid("a twin change has desired, tags or both"));
    }
    if if_version.is_some() && change.desired.is_none() {
        return Err(ApiError::invalid(
            "If-Match applies to a desired change; this has none",
        ));
    }
    // Tags are checked before anything is written.
    let tags = match change.tags {
        Some(tags) => {
            let mut set = BTreeMap::new();
            let mut remove = Vec::new();
            for (key, value) in tags {
                match value {
                    Some(value) => {
                        set.insert(key, value);
                    }
                    None => remove.push(key),
                }
            }
            check_tags(&set)?;
            Some((set, remove))
        }
        None => None,
    };
    let by = caller(operator);
    let mut view = None;
    // The conditional part first: a stale If-Match changes nothing.
    if let Some(desired) = change.desired {
        let patch = desired.to_string();
        let changed = state
            .ops
            .update_desired(&device_id, &patch, if_version)
            .await
            .map_err(|e| match e.code() {
                ErrorCode::FailedPrecondition => ApiError::new(
                    StatusCode::PRECONDITION_FAILED,
                    "failed_precondition",
                    e.public_message(),
                ),
                _ => ApiError::from(e),
            })?;
        tracing::info!(by, device_id = ?device_id, version = changed.twin.desired_version, "desired state changed (http)");
        view = Some(changed);
    }
    if let Some((set, remove)) = tags {
        view = Some(state.ops.update_tags(&device_id, set, remove).await?);
        tracing::info!(by, device_id = ?device_id, "tags changed (http)");
    }
    match view {
        Some(view) => Ok(with_etag(&view)),
        None => Err(ApiError::invalid("nothing to change")),
    }
}
