//! The OpenAPI document of `/api/v1`, generated from the handlers of every
//! route module (`api`, `events`, `admin`), served at `/api/v1/openapi.json`.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use super::{ApiError, api};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "telemetry-hub",
        description = "The hub's HTTP/JSON API: devices, their readings, commands and live events. \
            With operator tokens configured, send `Authorization: Bearer <token>`: reads need the \
            read role, the rest admin. Errors are `{\"error\": {\"code\", \"message\"}}`, except \
            on the Prometheus query API (tag prometheus: Prometheus' own JSON, for Grafana). \
            `/write` takes line protocol with a device's token (Bearer, Token, Basic or `p=`)."
    ),
    paths(
        api::list_devices,
        api::get_device,
        api::device_sensors,
        api::readings,
        api::readings_csv,
        api::list_commands,
        api::send_command,
        api::get_command,
        api::cancel_command,
        api::stats,
        super::events::events,
        super::admin::add_device,
        super::admin::rotate_device_token,
        super::admin::remove_device,
        super::admin::pin_device_certificate,
        super::admin::unpin_device_certificate,
        super::admin::revoke_certificate,
        super::twin::get_twin,
        super::twin::patch_twin,
        super::twin::desired_to_selector,
        super::alarms::list_rules,
        super::alarms::put_rule,
        super::alarms::delete_rule,
        super::alarms::list_alarms,
        super::alarms::summary,
        super::alarms::get_alarm,
        super::alarms::alarm_action,
        super::alarms::deliveries,
        super::jobs::create_job,
        super::jobs::list_jobs,
        super::jobs::get_job,
        super::jobs::job_devices,
        super::jobs::job_action,
        super::write::write,
        super::prom::query,
        super::prom::query_range,
        super::prom::series,
        super::prom::labels,
        super::prom::label_values,
        super::prom::metadata,
        super::prom::buildinfo
    ),
    components(schemas(
        api::ErrorBody,
        api::ErrorDetail,
        super::events::LiveReadingJson,
        super::events::PresenceJson
    ))
)]
struct ApiDoc;

/// The OpenAPI document of this API, generated from the code.
pub(crate) fn openapi_document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.servers = Some(vec![utoipa::openapi::Server::new("/api/v1")]);
    doc
}

pub(super) async fn openapi() -> Response {
    match openapi_document().to_json() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("cannot encode the OpenAPI document: {e}"),
        )
        .into_response(),
    }
}
