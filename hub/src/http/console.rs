//! The web console: plain HTML, CSS and JavaScript embedded in the binary
//! (no build step, nothing loaded from elsewhere), plus the vendored uPlot
//! chart library with its licence. The pages call `/api/v1`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// (path, content type, bytes) of every asset.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/assets/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/app.js"),
    ),
    (
        "/assets/style.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/style.css"),
    ),
    (
        "/assets/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/vendor/uPlot.iife.min.js"),
    ),
    (
        "/assets/uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/vendor/uPlot.min.css"),
    ),
    (
        // A Grafana dashboard of the fleet over the Prometheus query API;
        // the Hub page links to it.
        "/assets/grafana/telemetry-hub-fleet.json",
        "application/json",
        include_bytes!("../../console/grafana/telemetry-hub-fleet.json"),
    ),
    (
        "/assets/uPlot.LICENSE",
        "text/plain; charset=utf-8",
        include_bytes!("../../console/vendor/uPlot.LICENSE"),
    ),
];

const INDEX: &[u8] = include_bytes!("../../console/index.html");

pub(super) fn routes<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    let mut router = axum::Router::new().route("/", get(index));
    for (path, content_type, bytes) in ASSETS {
        router = router.route(path, get(move || asset(content_type, bytes)));
    }
    router
}

async fn index() -> Response {
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX,
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn asset(content_type: &'static str, bytes: &'static [u8]) -> Response {
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        bytes,
    )
        .into_response();
    // Assets change only with the binary; revalidating each load is cheap.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
