//! The web console and its HTTP/JSON API (`http.enabled`), on
//! `http.listen`: a door to the same operator core (`crate::operator`) as
//! the gRPC Operator service, so validation, limits and errors are the
//! same. Routes live under `/api/v1` (described by the OpenAPI document at
//! `/api/v1/openapi.json`); the console's embedded pages are at `/`.
//!
//! Auth: with operator tokens configured, every API call needs
//! `Authorization: Bearer <token>`; reads need the read role, anything
//! that changes state needs admin. Without tokens the API is open, which
//! the settings allow only on loopback.

mod admin;
mod alarms;
mod api;
mod console;
mod events;
mod jobs;
mod openapi;
mod prom;
mod serve;
mod twin;
mod write;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, AuthPolicy, Role};
use crate::config::HttpSettings;
use crate::operator::{ErrorCode, OpError, Operations};

/// What every handler shares.
pub(crate) struct ApiState {
    ops: Arc<Operations>,
    auth: Arc<AuthPolicy>,
    /// Event streams and query bodies run here; shutdown waits for them.
    tracker: TaskTracker,
    /// Cancelled when the hub begins to shut down: event streams end.
    shutdown: CancellationToken,
    /// The latest batch's readings events for streams without a filter.
    all_readings: Arc<events::AllReadings>,
    /// Host names the API answers to when it is open (no operator tokens)
    /// on loopback; None: any.
    allowed_hosts: Option<Vec<String>>,
    /// Line-protocol writes (a device door: device credentials, not
    /// operator tokens).
    writes: Arc<crate::lines::LineWrites>,
    write_max_bytes: usize,
    write_max_lines: usize,
    write_max_readings: usize,
}

/// A running HTTP server.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub task: JoinHandle<std::io::Result<()>>,
}

/// Binds `http.listen` and serves until `stop`; event streams end at
/// `shutdown` (the hub's session shutdown, which comes first).
pub async fn start(
    settings: &HttpSettings,
    ops: Arc<Operations>,
    writes: Arc<crate::lines::LineWrites>,
    auth: Arc<AuthPolicy>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> std::io::Result<HttpServer> {
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    let addr = listener.local_addr()?;
    // An open API on loopback is open to this machine, not to every web
    // page its browser shows: a page that rebinds its own name to
    // 127.0.0.1 still sends its own Host, which is refused.
    let allowed_hosts = (auth.operators_open() && addr.ip().is_loopback()).then(|| {
        let mut hosts = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "[::1]".to_owned(),
        ];
        hosts.push(match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        });
        hosts
    });
    let state = Arc::new(ApiState {
        ops,
        auth,
        tracker,
        shutdown,
        all_readings: Arc::default(),
        allowed_hosts,
        writes,
        write_max_bytes: settings.write_max_bytes,
        write_max_lines: settings.write_max_lines,
        write_max_readings: settings.write_max_readings,
    });
    let app = router(state, settings.max_body_bytes);
    let task = tokio::spawn(serve::serve(
        listener,
        app,
        settings.max_connections,
        settings.header_timeout,
        stop,
    ));
    Ok(HttpServer { addr, task })
}

fn router(state: Arc<ApiState>, max_body_bytes: usize) -> Router {
    let writes = write::routes(Arc::clone(&state));
    // Prometheus' query API: reads, whatever the method (Grafana POSTs).
    let prometheus = prom::routes()
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize_read,
        ))
        .with_state(Arc::clone(&state));
    let api = api::routes()
        .merge(events::routes())
        .merge(admin::routes())
        .merge(twin::routes())
        .merge(alarms::routes())
        .merge(jobs::routes())
        .route("/openapi.json", axum::routing::get(openapi::openapi))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            authorize,
        ))
        .with_state(state);
    Router::new()
        .merge(prometheus)
        .nest("/api/v1", api)
        .merge(console::routes())
        .layer(DefaultBodyLimit::max(max_body_bytes))
        // Line-protocol writes take device credentials and larger bodies.
        .merge(writes)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("an HTTP handler panicked");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the hub failed while answering; see its log",
                )
                .into_response()
            },
        ))
        .layer(axum::middleware::from_fn(security_headers))
}

/// Checks where a call comes from and the operator token for the role it
/// needs: reads (GET, HEAD) the read role, everything else admin. The
/// operator goes on to the handler.
async fn authorize(state: State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let method = request.method();
    let needed = if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        Role::Read
    } else {
        Role::Admin
    };
    authorize_as(state, request, next, needed).await
}

/// [`authorize`] for routes that only read whatever their method.
async fn authorize_read(state: State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    authorize_as(state, request, next, Role::Read).await
}

async fn authorize_as(
    State(state): State<Arc<ApiState>>,
    mut request: Request,
    next: Next,
    needed: Role,
) -> Response {
    if let Err(refused) = check_origin(&state, &request) {
        return refused.into_response();
    }
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let what = format!("{} {}", request.method(), request.uri().path());
    match state.auth.authorize(bearer, needed, &what) {
        Ok(operator) => {
            if let Some(operator) = operator {
                request.extensions_mut().insert(operator);
            }
            next.run(request).await
        }
        Err(AuthError::Unauthenticated) => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "a valid operator token is required (Authorization: Bearer ...)",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
        Err(e @ AuthError::Forbidden { .. }) => {
            ApiError::new(StatusCode::FORBIDDEN, "permission_denied", e.to_string()).into_response()
        }
    }
}

/// Refuses a call to the open API (no operator tokens) from a page of
/// another site: a Host it does not answer to on loopback (DNS
/// rebinding), or a change (any method but GET and HEAD) whose Origin is
/// not this host (a cross-site form). An open API on a network address
/// (`auth.allow_open`) answers to any Host, as its operator chose.
fn check_origin(state: &ApiState, request: &Request) -> Result<(), ApiError> {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // Browsers always send a Host; a tool without one is no web page.
    if let Some(allowed) = state.allowed_hosts.as_ref().filter(|_| !host.is_empty()) {
        let name = match host.rsplit_once(':') {
            Some((name, port)) if !port.contains(']') => name,
            _ => host,
        };
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(name)) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_denied",
                format!(
                    "the open API answers only to localhost, not to the host {host:?} \
                     (configure auth.operator_tokens to serve other names)"
                ),
            ));
        }
    }
    // With operator tokens, a cross-site page has no token to send (a
    // bearer header needs CORS, which this API does not grant), and a
    // proxy in front may rewrite Host: only the open API checks Origin.
    let method = request.method();
    if state.auth.operators_open()
        && method != axum::http::Method::GET
        && method != axum::http::Method::HEAD
        && let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
    {
        let same = origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host));
        if !same {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_denied",
                format!("a change from another site ({origin}) is refused"),
            ));
        }
    }
    Ok(())
}

/// Every answer: no sniffing, no framing by other sites, and nothing from
/// elsewhere (the console loads only its own assets).
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    response
}

/// An error answer: `{"error": {"code", "message"}}` with its status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }
}

impl From<OpError> for ApiError {
    fn from(err: OpError) -> Self {
        let code = err.code();
        let status = match code {
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::AlreadyExists => StatusCode::CONFLICT,
            ErrorCode::FailedPrecondition => StatusCode::CONFLICT,
            ErrorCode::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Busy | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, code.as_str(), err.public_message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        (self.status, axum::Json(body)).into_response()
    }
}
