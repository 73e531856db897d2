//! Device administration over HTTP (admin role, like every call that is
//! not a read): enroll, rotate a token, remove. The core (`crate::operator`)
//! decides; this only translates.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::{ErrorBody, caller};
use super::{ApiError, ApiState};
use crate::auth::Operator;

pub(super) fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new()
        .route("/devices", post(add_device))
        .route("/devices/{id}", delete(remove_device))
        .route("/devices/{id}/token", post(rotate_device_token))
}

/// A device to enroll (or re-add after removal).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewDeviceJson {
    device_id: String,
    /// Labels selectors and the console filter on.
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// A device's new token: shown this once (the hub keeps only its SHA-256).
#[derive(Serialize, ToSchema)]
pub(super) struct DeviceTokenJson {
    device_id: String,
    token: String,
}

#[derive(Serialize, ToSchema)]
pub(super) struct RemovedJson {
    /// Whether it had a live stream (now ended).
    was_online: bool,
}

/// Enrolls a device with a token of its own; a stream on its old
/// credentials is ended.
#[utoipa::path(post, path = "/devices", request_body = NewDeviceJson, responses(
    (status = 201, body = DeviceTokenJson),
    (status = 400, body = ErrorBody),
    (status = 415, body = ErrorBody, description = "the body is not application/json"),
    (status = 422, body = ErrorBody, description = "the JSON is not a device (wrong shape, unknown field)"),
    (status = 503, body = ErrorBody)
))]
pub(super) async fn add_device(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    body: Result<Json<NewDeviceJson>, JsonRejection>,
) -> Result<(StatusCode, Json<DeviceTokenJson>), ApiError> {
    let Json(req) = body?;
    let token = state.ops.add_device(&req.device_id, req.labels).await?;
    tracing::info!(by = caller(operator), device_id = ?req.device_id, "device added (http)");
    Ok((
        StatusCode::CREATED,
        Json(DeviceTokenJson {
            device_id: req.device_id,
            token,
        }),
    ))
}

/// A new token for a device; the old one stops working at once.
#[utoipa::path(post, path = "/devices/{id}/token", params(("id" = String, Path)), responses(
    (status = 200, body = DeviceTokenJson),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 503, body = ErrorBody)
))]
pub(super) async fn rotate_device_token(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<DeviceTokenJson>, ApiError> {
    let Path(device_id) = id?;
    let token = state.ops.rotate_device_token(&device_id).await?;
    tracing::info!(by = caller(operator), device_id = ?device_id, "device token rotated (http)");
    Ok(Json(DeviceTokenJson { device_id, token }))
}

/// Removes a device: its stream ends and it is refused until added again.
/// Its readings stay.
#[utoipa::path(delete, path = "/devices/{id}", params(("id" = String, Path)), responses(
    (status = 200, body = RemovedJson),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 503, body = ErrorBody)
))]
pub(super) async fn remove_device(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<RemovedJson>, ApiError> {
    let Path(device_id) = id?;
    let was_online = state.ops.remove_device(&device_id).await?;
    tracing::info!(by = caller(operator), device_id = ?device_id, was_online, "device removed (http)");
    Ok(Json(RemovedJson { was_online }))
}
