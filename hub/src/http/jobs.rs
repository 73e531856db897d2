//! Jobs over HTTP: create (`POST /jobs`, the job's JSON), list, show with
//! progress, a job's devices, pause, resume, cancel. Reads need the read
//! role, the rest admin.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::Deserialize;
use utoipa::IntoParams;

use super::alarms::{AnyJson, json};
use super::api::{ErrorBody, caller};
use super::{ApiError, ApiState};
use crate::auth::Operator;
use crate::jobs::DeviceState;
use crate::operator::OpError;

pub(super) fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new()
        .route("/jobs", get(list_jobs).post(create_job))
        .route("/jobs/{id}", get(get_job))
        .route("/jobs/{id}/devices", get(job_devices))
        .route("/jobs/{id}/{action}", post(job_action))
}

fn job_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| OpError::Invalid(format!("{raw:?} is not a job id")).into())
}

/// Creates a job over the devices its target matches now (201).
#[utoipa::path(post, path = "/jobs", request_body = AnyJson, responses(
    (status = 201, body = AnyJson),
    (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody, description = "no device matches"),
))]
pub(super) async fn create_job(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<(StatusCode, Json<AnyJson>), ApiError> {
    let Json(body) = body?;
    let job = state.ops.create_job_json(&body.to_string()).await?;
    tracing::info!(
        by = caller(operator),
        job = job.id,
        devices = job.total,
        "job created (http)"
    );
    Ok((StatusCode::CREATED, json(&job)))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct JobsParams {
    /// Only jobs in progress or paused.
    #[serde(default)]
    active: bool,
    /// 1 to 1000 (100 when left out).
    limit: Option<u32>,
}

/// Jobs, newest first, with their progress.
#[utoipa::path(get, path = "/jobs", params(JobsParams), responses((status = 200, body = AnyJson)))]
pub(super) async fn list_jobs(
    State(state): State<Arc<ApiState>>,
    Query(p): Query<JobsParams>,
) -> Result<Json<AnyJson>, ApiError> {
    let jobs = state.ops.jobs(p.active, p.limit.unwrap_or(100)).await?;
    Ok(json(&serde_json::json!({ "jobs": jobs })))
}

/// A job with its progress.
#[utoipa::path(get, path = "/jobs/{id}", responses(
    (status = 200, body = AnyJson),
    (status = 404, body = ErrorBody),
))]
pub(super) async fn get_job(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<AnyJson>, ApiError> {
    Ok(json(&state.ops.job(job_id(&id)?).await?))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct DevicesParams {
    /// pending, in_progress, succeeded, failed, timed_out or cancelled.
    state: Option<String>,
    /// Devices after this position (the next page).
    after: Option<i64>,
    /// 1 to 1000 (100 when left out).
    limit: Option<u32>,
}

/// A job's devices in rollout order.
#[utoipa::path(get, path = "/jobs/{id}/devices", params(DevicesParams), responses(
    (status = 200, body = AnyJson),
    (status = 404, body = ErrorBody),
))]
pub(super) async fn job_devices(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(p): Query<DevicesParams>,
) -> Result<Json<AnyJson>, ApiError> {
    let device_state = match p.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(DeviceState::parse(s).ok_or_else(|| {
            OpError::Invalid(format!(
                "unknown state {s:?} (pending, in_progress, succeeded, failed, timed_out, cancelled)"
            ))
        })?),
    };
    let devices = state
        .ops
        .job_devices(
            job_id(&id)?,
            device_state,
            p.after.unwrap_or(-1),
            p.limit.unwrap_or(100),
        )
        .await?;
    Ok(json(&serde_json::json!({ "devices": devices })))
}

/// `pause`, `resume` or `cancel` a job.
#[utoipa::path(post, path = "/jobs/{id}/{action}", responses(
    (status = 200, body = AnyJson),
    (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "the job is finished"),
))]
pub(super) async fn job_action(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<AnyJson>, ApiError> {
    let id = job_id(&id)?;
    let by = caller(operator);
    let job = match action.as_str() {
        "pause" => state.ops.pause_job(id).await?,
        "resume" => state.ops.resume_job(id).await?,
        "cancel" => state.ops.cancel_job(id, &by).await?,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no job action {other:?} (pause, resume, cancel)"),
            ));
        }
    };
    tracing::info!(by, job = id, action, "job changed (http)");
    Ok(json(&job))
}
