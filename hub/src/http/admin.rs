//! Device administration over HTTP (admin role, like every call that is
//! not a read): enroll, rotate a token, remove, pin a device to a client
//! certificate and revoke certificates. The core (`crate::operator`)
//! decides; this only translates.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, post, put};
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
        .route(
            "/devices/{id}/certificate",
            put(pin_device_certificate).delete(unpin_device_certificate),
        )
        .route("/certificates/revoked", post(revoke_certificate))
}

/// A client certificate, by the SHA-256 of its DER.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CertificateJson {
    /// 64 hex digits (`:` between bytes allowed, as openssl prints them).
    sha256: String,
}

#[derive(Serialize, ToSchema)]
pub(super) struct RevokedJson {
    /// False when it was revoked already.
    newly_revoked: bool,
    /// Live streams on this hub that presented it, now ended.
    streams_ended: u32,
}

/// Pins a device to one client certificate (auth.devices = "tls"); its
/// live stream ends and reconnects under the pin.
#[utoipa::path(put, path = "/devices/{id}/certificate", params(("id" = String, Path)),
    request_body = CertificateJson, responses(
    (status = 204),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 415, body = ErrorBody, description = "the body is not application/json"),
    (status = 422, body = ErrorBody, description = "the JSON is not a certificate"),
    (status = 503, body = ErrorBody)
))]
pub(super) async fn pin_device_certificate(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<CertificateJson>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(device_id) = id?;
    let Json(req) = body?;
    state
        .ops
        .pin_device_certificate(&device_id, Some(&req.sha256))
        .await?;
    tracing::info!(by = caller(operator), device_id = ?device_id, sha256 = req.sha256,
        "device certificate pinned (http)");
    Ok(StatusCode::NO_CONTENT)
}

/// Unpins a device: any certificate naming it is accepted again (unless
/// revoked).
#[utoipa::path(delete, path = "/devices/{id}/certificate", params(("id" = String, Path)), responses(
    (status = 204),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 503, body = ErrorBody)
))]
pub(super) async fn unpin_device_certificate(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(device_id) = id?;
    state.ops.pin_device_certificate(&device_id, None).await?;
    tracing::info!(by = caller(operator), device_id = ?device_id, "device certificate unpinned (http)");
    Ok(StatusCode::NO_CONTENT)
}

/// Refuses a client certificate from now on, whatever device it names;
/// live streams on it end.
#[utoipa::path(post, path = "/certificates/revoked", request_body = CertificateJson, responses(
    (status = 200, body = RevokedJson),
    (status = 400, body = ErrorBody),
    (status = 415, body = ErrorBody, description = "the body is not application/json"),
    (status = 422, body = ErrorBody, description = "the JSON is not a certificate"),
    (status = 503, body = ErrorBody)
))]
pub(super) async fn revoke_certificate(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    body: Result<Json<CertificateJson>, JsonRejection>,
) -> Result<Json<RevokedJson>, ApiError> {
    let Json(req) = body?;
    let (newly_revoked, streams_ended) = state.ops.revoke_certificate(&req.sha256).await?;
    tracing::info!(
        by = caller(operator),
        sha256 = req.sha256,
        newly_revoked,
        streams_ended,
        "certificate revoked (http)"
    );
    Ok(Json(RevokedJson {
        newly_revoked,
        streams_ended,
    }))
}

/// A device to enroll (or re-add after removal).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewDeviceJson {
    device_id: String,
    /// Its tags (operator-owned): selectors and filters match on them.
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
