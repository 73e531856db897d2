//! Alarms over HTTP: rules (`/alarm-rules`), alarms (`/alarms`: list,
//! show, acknowledge, clear; `/alarms/summary`: open alarms per device for
//! the console's badges) and webhook delivery logs
//! (`/webhooks/{name}/deliveries`). Reads need the read role, the rest
//! admin.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::api::{ErrorBody, caller};
use super::{ApiError, ApiState};
use crate::alarms::{AlarmState, Severity};
use crate::auth::Operator;
use crate::operator::OpError;
use crate::store::alarms::AlarmFilter;

pub(super) fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new()
        .route("/alarm-rules", get(list_rules))
        .route(
            "/alarm-rules/{name}",
            axum::routing::put(put_rule).delete(delete_rule),
        )
        .route("/alarms", get(list_alarms))
        .route("/alarms/summary", get(summary))
        .route("/alarms/{id}", get(get_alarm))
        .route("/alarms/{id}/{action}", post(alarm_action))
        .route("/webhooks/{name}/deliveries", get(deliveries))
}

/// Any JSON value (rules, alarms and deliveries are documented in the
/// README).
#[derive(Serialize, ToSchema)]
#[schema(value_type = Object)]
pub(super) struct AnyJson(pub(super) serde_json::Value);

pub(super) fn json<T: Serialize>(v: &T) -> Json<AnyJson> {
    Json(AnyJson(serde_json::to_value(v).unwrap_or_default()))
}

/// Every alarm rule.
#[utoipa::path(get, path = "/alarm-rules", responses((status = 200, body = AnyJson)))]
pub(super) async fn list_rules(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<AnyJson>, ApiError> {
    let rules = state.ops.alarm_rules().await?;
    Ok(json(&serde_json::json!({ "rules": rules })))
}

/// Creates the rule, or replaces the rule of that name (version + 1). The
/// body is the rule (`name` may be left out: the path gives it).
#[utoipa::path(put, path = "/alarm-rules/{name}", request_body = AnyJson, responses(
    (status = 200, body = AnyJson),
    (status = 400, body = ErrorBody),
))]
pub(super) async fn put_rule(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    Path(name): Path<String>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<Json<AnyJson>, ApiError> {
    let Json(mut body) = body?;
    let Some(fields) = body.as_object_mut() else {
        return Err(OpError::Invalid("a rule is a JSON object".into()).into());
    };
    match fields.get("name") {
        None => {
            fields.insert("name".into(), serde_json::Value::String(name.clone()));
        }
        Some(serde_json::Value::String(n)) if *n == name => {}
        Some(_) => {
            return Err(
                OpError::Invalid("the rule's name is not the one in the path".into()).into(),
            );
        }
    }
    let rule = state.ops.put_alarm_rule_json(&body.to_string()).await?;
    tracing::info!(by = caller(operator), rule = %rule.spec.name, version = rule.version,
        "alarm rule written (http)");
    Ok(json(&rule))
}

/// Deletes a rule; its open alarms are cleared ("rule deleted").
#[utoipa::path(delete, path = "/alarm-rules/{name}", responses(
    (status = 200, body = AnyJson),
    (status = 404, body = ErrorBody),
))]
pub(super) async fn delete_rule(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    Path(name): Path<String>,
) -> Result<Json<AnyJson>, ApiError> {
    let rule = state.ops.delete_alarm_rule(&name).await?;
    tracing::info!(by = caller(operator), rule = %rule.spec.name, "alarm rule deleted (http)");
    Ok(json(&rule))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct AlarmsParams {
    /// Comma-separated states (active, acknowledged, cleared), or `open`
    /// (active and acknowledged). All when left out.
    state: Option<String>,
    device: Option<String>,
    rule: Option<String>,
    severity: Option<String>,
    /// Alarms with a smaller id (the next page: the last id seen).
    before: Option<i64>,
    /// 1 to 1000 (100 when left out).
    limit: Option<u32>,
}

/// Alarms, newest first.
#[utoipa::path(get, path = "/alarms", params(AlarmsParams), responses(
    (status = 200, body = AnyJson),
    (status = 400, body = ErrorBody),
))]
pub(super) async fn list_alarms(
    State(state): State<Arc<ApiState>>,
    Query(p): Query<AlarmsParams>,
) -> Result<Json<AnyJson>, ApiError> {
    let mut states = Vec::new();
    for s in p
        .state
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        match s {
            "open" => states.extend([AlarmState::Active, AlarmState::Acknowledged]),
            s => states.push(AlarmState::parse(s).ok_or_else(|| {
                OpError::Invalid(format!(
                    "unknown state {s:?} (active, acknowledged, cleared, open)"
                ))
            })?),
        }
    }
    let severity = match p.severity.as_deref() {
        None | Some("") => None,
        Some(s) => Some(Severity::parse(s).ok_or_else(|| {
            OpError::Invalid(format!(
                "unknown severity {s:?} (critical, major, minor, warning)"
            ))
        })?),
    };
    let alarms = state
        .ops
        .alarms(AlarmFilter {
            states,
            device: p.device.filter(|d| !d.is_empty()),
            rule: p.rule.filter(|r| !r.is_empty()),
            severity,
            before: p.before,
            limit: p.limit.unwrap_or(0),
        })
        .await?;
    Ok(json(&serde_json::json!({ "alarms": alarms })))
}

/// Open alarms per device: `{"devices": [{"device", "open", "severity"}]}`
/// (the most severe open alarm's severity).
#[utoipa::path(get, path = "/alarms/summary", responses((status = 200, body = AnyJson)))]
pub(super) async fn summary(State(state): State<Arc<ApiState>>) -> Result<Json<AnyJson>, ApiError> {
    let counts = state.ops.open_alarm_counts().await?;
    let devices: Vec<_> = counts
        .into_iter()
        .map(|(device, open, severity)| {
            serde_json::json!({ "device": device, "open": open, "severity": severity })
        })
        .collect();
    Ok(json(&serde_json::json!({ "devices": devices })))
}

fn alarm_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| OpError::Invalid(format!("{raw:?} is not an alarm id")).into())
}

/// An alarm with its history.
#[utoipa::path(get, path = "/alarms/{id}", responses(
    (status = 200, body = AnyJson),
    (status = 404, body = ErrorBody),
))]
pub(super) async fn get_alarm(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<AnyJson>, ApiError> {
    Ok(json(&state.ops.alarm(alarm_id(&id)?).await?))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct NoteJson {
    #[serde(default)]
    note: String,
}

/// `ack` (acknowledge an active alarm; 409 when it is cleared) or `clear`
/// (clear an open one), with a note.
#[utoipa::path(post, path = "/alarms/{id}/{action}", request_body = NoteJson, responses(
    (status = 200, body = AnyJson),
    (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody),
))]
pub(super) async fn alarm_action(
    State(state): State<Arc<ApiState>>,
    operator: Option<axum::Extension<Operator>>,
    Path((id, action)): Path<(String, String)>,
    body: Option<Json<NoteJson>>,
) -> Result<Json<AnyJson>, ApiError> {
    let id = alarm_id(&id)?;
    let note = body.map(|b| b.0).unwrap_or_default().note;
    let by = caller(operator);
    let alarm = match action.as_str() {
        "ack" => state.ops.ack_alarm(id, &by, &note).await?,
        "clear" => state.ops.clear_alarm(id, &by, &note).await?,
        other => {
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                format!("no alarm action {other:?} (ack, clear)"),
            ));
        }
    };
    Ok(json(&alarm))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct DeliveriesParams {
    /// 1 to 1000 (100 when left out).
    limit: Option<u32>,
}

/// A webhook's delivery log, newest first: per notification its attempts,
/// last status or error, and when it was delivered (or given up).
#[utoipa::path(get, path = "/webhooks/{name}/deliveries", params(DeliveriesParams), responses(
    (status = 200, body = AnyJson),
))]
pub(super) async fn deliveries(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(p): Query<DeliveriesParams>,
) -> Result<Json<AnyJson>, ApiError> {
    let log = state
        .ops
        .webhook_deliveries(&name, p.limit.unwrap_or(100))
        .await?;
    Ok(json(&serde_json::json!({ "deliveries": log })))
}
