//! The HTTP server every service runs, and the one place errors become HTTP responses.
//!
//! One port serves HTTP/1.1 and HTTP/2 cleartext (h2c with prior knowledge). Every request is
//! traced (W3C `traceparent` honoured), counted and timed per route, bounded in body size and
//! in handler time. `/healthz`, `/readyz` and `/metrics` come with it. SIGTERM (or SIGINT) first
//! lets the service close its long-lived connections ([`Service::draining`]), then stops
//! accepting, lets in-flight requests finish (up to `HTTP_SHUTDOWN_TIMEOUT_SECS`) and returns.

use std::fmt;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, FromRequest, HttpRequest, HttpResponse, HttpServer, ResponseError};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tracing_actix_web::TracingLogger;

use crate::access_token::TokenError;
use crate::broker::BrokerProbe;
use crate::config::ServiceConfig;
use crate::db::{Database, DbError, Lsn, ReadTarget};
use crate::metrics as names;
use crate::workers::PoolError;
use crate::Service;

/// How long `/readyz` waits for each dependency before calling it failed.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// What handlers can reach through `web::Data<AppContext>`.
pub struct AppContext {
    pub config: Arc<ServiceConfig>,
    pub db: Database,
    pub broker: BrokerProbe,
    pub metrics: PrometheusHandle,
}

/// An error as clients see it: a status and `{"error": {"code": "...", "message": "..."}}`, with
/// `details` naming each invalid field when the input broke several rules.
///
/// Each service maps its domain errors into this type, so the wire format lives here only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<FieldIssue>,
    headers: Vec<(header::HeaderName, String)>,
}

/// One invalid input field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct FieldIssue {
    pub field: String,
    pub message: String,
}

/// The body of every error answer, as the OpenAPI documents describe it.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_input`, `unauthorized`, `rate_limited`, ...
    pub code: String,
    /// For people: what is wrong and, where it helps, what to do.
    pub message: String,
    /// Present on `invalid_input`: every field that broke a rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<FieldIssue>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// Adds `Retry-After`, for 429 and 503 answers.
    pub fn retry_after(self, secs: u64) -> Self {
        self.with_header(header::RETRY_AFTER, secs.max(1).to_string())
    }

    /// Sets a header on the answer (replacing an earlier value of the same header).
    pub fn with_header(mut self, name: header::HeaderName, value: impl Into<String>) -> Self {
        self.headers.retain(|(existing, _)| *existing != name);
        self.headers.push((name, value.into()));
        self
    }

    pub fn header(&self, name: &header::HeaderName) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 400 `invalid_input` naming every field in `details`.
    pub fn invalid_input(details: Vec<FieldIssue>) -> Self {
        let message = details
            .iter()
            .map(|issue| format!("{}: {}", issue.field, issue.message))
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            details,
            ..Self::bad_request("invalid_input", message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 401 with `WWW-Authenticate: Bearer`, as RFC 6750 asks.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
            .with_header(header::WWW_AUTHENTICATE, "Bearer")
    }

    pub fn too_many_requests(message: impl Into<String>, retry_after_secs: u64) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
            .retry_after(retry_after_secs)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
    }

    /// A fault on our side; the message is logged, never sent: it may name internals.
    pub fn internal(message: impl fmt::Display) -> Self {
        tracing::error!(error = %message, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "something went wrong on our side; it has been logged",
        )
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        for (name, value) in &self.headers {
            response.insert_header((name.clone(), value.as_str()));
        }
        let mut error = json!({ "code": self.code, "message": self.message });
        if !self.details.is_empty() {
            error["details"] = json!(self.details);
        }
        response.json(json!({ "error": error }))
    }
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::Unavailable(_) => Self::unavailable("the database is unavailable; try again"),
            other => Self::internal(other),
        }
    }
}

impl From<PoolError> for ApiError {
    fn from(err: PoolError) -> Self {
        match err {
            PoolError::Busy { .. } => Self::unavailable("the server is busy; try again shortly"),
            PoolError::Failed { .. } => Self::internal(err),
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::KeysUnavailable(_) => {
                tracing::warn!(error = %err, "cannot verify access tokens");
                Self::unavailable("access tokens cannot be verified right now; try again")
            }
            TokenError::Missing => Self::unauthorized("unauthorized", err.to_string()),
            _ => Self::unauthorized("invalid_token", err.to_string()).with_header(
                header::WWW_AUTHENTICATE,
                format!("Bearer error=\"invalid_token\", error_description=\"{err}\""),
            ),
        }
    }
}

impl From<validator::ValidationErrors> for ApiError {
    fn from(errors: validator::ValidationErrors) -> Self {
        let mut details: Vec<FieldIssue> = errors
            .field_errors()
            .into_iter()
            .flat_map(|(field, issues)| {
                issues.iter().map(move |issue| FieldIssue {
                    field: field.to_string(),
                    message: issue
                        .message
                        .as_ref()
                        .map_or_else(|| describe(issue), |m| m.to_string()),
                })
            })
            .collect();
        // HashMap order is arbitrary; answers should not be.
        details.sort_by(|a, b| a.field.cmp(&b.field));
        Self::invalid_input(details)
    }
}

/// Words for a rule without its own message; `length` names its bounds.
fn describe(issue: &validator::ValidationError) -> String {
    let bound = |name: &str| issue.params.get(name).map(|value| value.to_string());
    match (&*issue.code, bound("min"), bound("max")) {
        ("length", Some(min), Some(max)) => format!("must be {min} to {max} characters long"),
        ("length", Some(min), None) => format!("must be at least {min} characters long"),
        ("length", None, Some(max)) => format!("must be at most {max} characters long"),
        (code, _, _) => format!("breaks the rule `{code}`"),
    }
}

/// A route path whose unsupported methods get a JSON 405 naming the method, like every other
/// error, instead of actix's empty one.
pub fn resource(path: &str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(method_not_allowed))
}

async fn method_not_allowed(request: HttpRequest) -> HttpResponse {
    let message = format!(
        "{} is not supported on {}",
        request.method(),
        request.path()
    );
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        message,
    )
    .error_response()
}

/// Whether the request's `If-None-Match` lists `etag` (the client holds that version already, so
/// the answer is a 304).
pub fn client_has(request: &HttpRequest, etag: &str) -> bool {
    request
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == etag))
}

/// The client's address: the peer, or behind a trusted ingress (`HTTP_TRUST_FORWARDED_FOR`)
/// the last `X-Forwarded-For` entry, which the ingress itself appended.
pub fn client_ip(request: &HttpRequest) -> Option<IpAddr> {
    let trust_forwarded = request
        .app_data::<web::Data<AppContext>>()
        .is_some_and(|context| context.config.http.trust_forwarded_for);
    if trust_forwarded {
        let forwarded = request
            .headers()
            .get_all("x-forwarded-for")
            .last()
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.rsplit(',').next())
            .and_then(|last| last.trim().parse().ok());
        if forwarded.is_some() {
            return forwarded;
        }
    }
    request.peer_addr().map(|address| address.ip())
}

/// For PATCH bodies, with `#[serde(default, deserialize_with = "service_kit::http::nullable")]`
/// on an `Option<Option<T>>` field: absent is `None` (leave it), `null` is `Some(None)` (clear
/// it), a value is `Some(Some(value))`.
pub fn nullable<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(deserializer).map(Some)
}

/// Header carrying the consistency token: set on answers to writes, echoed by clients on reads.
pub const CONSISTENCY_TOKEN_HEADER: &str = "x-consistency-token";

/// The consistency token a client sent back (read-your-writes), if any; a malformed one is a 400.
pub struct ReadAfter(pub Option<Lsn>);

impl FromRequest for ReadAfter {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let token = match request.headers().get(CONSISTENCY_TOKEN_HEADER) {
            None => Ok(ReadAfter(None)),
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|text| text.parse().ok())
                .map(|lsn| ReadAfter(Some(lsn)))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_consistency_token",
                        format!("{CONSISTENCY_TOKEN_HEADER} must be a value this API returned"),
                    )
                }),
        };
        std::future::ready(token)
    }
}

/// How JSON bodies are read: at most `limit` bytes (413 beyond), and a body that is not JSON, or not
/// of the handler's type, is a 400 `invalid_body` saying why. The server's default uses
/// `HTTP_MAX_BODY_BYTES`; a route with a tighter bound registers its own with this.
pub fn json_config(limit: usize) -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(limit)
        .error_handler(|err, _| {
            let status = err.status_code();
            ApiError::new(status, "invalid_body", err.to_string()).into()
        })
}

/// Serves the service's routes plus the standard endpoints until SIGTERM/SIGINT, then drains
/// and returns.
pub async fn serve<S: Service>(context: AppContext, service: Arc<S>) -> std::io::Result<()> {
    let http = context.config.http.clone();
    let context = web::Data::new(context);
    let routes = service.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(context.clone())
            .app_data(web::PayloadConfig::new(http.max_body_bytes))
            .app_data(json_config(http.max_body_bytes))
            .app_data(web::PathConfig::default().error_handler(|err, _| {
                ApiError::bad_request("invalid_path", err.to_string()).into()
            }))
            .app_data(web::QueryConfig::default().error_handler(|err, _| {
                ApiError::bad_request("invalid_query", err.to_string()).into()
            }))
            // Last wrapped runs first: tracing span → metrics → timeout → handler.
            .wrap(from_fn(enforce_timeout))
            .wrap(from_fn(record_metrics))
            .wrap(TracingLogger::default())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(render_metrics))
            .app_data(web::Data::from(routes.clone()))
            .configure(|config| routes.routes(config))
            .default_service(web::to(not_found))
    })
    .workers(http.workers)
    // Answers are written as head and body: without this, Nagle's algorithm holds the body back
    // until the client's delayed ACK (~40 ms) on keep-alive connections.
    .tcp_nodelay(true)
    .on_connect(remember_socket)
    .shutdown_timeout(http.shutdown_timeout.as_secs())
    // Signals are ours (below): the service closes its long-lived connections before the drain.
    .disable_signals()
    .bind_auto_h2c((http.host, http.port))?
    .run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        if let Err(err) = shutdown_signal().await {
            tracing::error!(error = %err, "cannot listen for shutdown signals; stopping");
        }
        tracing::info!("shutdown signal: draining");
        service.draining().await;
        handle.stop(true).await;
    });
    server.await
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

/// The accepted socket of a request's connection, for what only the socket can be told (see
/// [`set_send_buffer`]).
#[derive(Debug, Clone, Copy)]
struct ConnectionSocket(RawFd);

fn remember_socket(connection: &dyn std::any::Any, extensions: &mut actix_web::dev::Extensions) {
    if let Some(socket) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
        extensions.insert(ConnectionSocket(socket.as_raw_fd()));
    }
}

/// Caps the kernel's send buffer of `request`'s connection at `bytes`. For long-lived streams
/// (WebSockets) whose sender counts what a slow reader has not taken: a large, auto-tuned kernel
/// buffer would hide megabytes of backlog from that count.
pub fn set_send_buffer(request: &HttpRequest, bytes: usize) -> std::io::Result<()> {
    let Some(ConnectionSocket(fd)) = request.conn_data::<ConnectionSocket>().copied() else {
        return Ok(());
    };
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is the socket of the connection `request` arrived on, open while the request
    // is handled; `value` lives across the call and its size is passed with it.
    let answer = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if answer == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Ready when the primary answers, reads can be served and the broker answers. A replica outage
/// alone keeps the service ready (reads fall back to the primary) and is shown as such.
async fn readyz(context: web::Data<AppContext>) -> HttpResponse {
    let db = &context.db;
    let (writer, reader, broker) = tokio::join!(
        db.ping_writer(READINESS_TIMEOUT),
        tokio::time::timeout(
            READINESS_TIMEOUT,
            db.read(|mut conn| async move { sqlx::query("SELECT 1").execute(&mut *conn).await })
        ),
        context.broker.check(),
    );
    let writer = match writer {
        Ok(()) => json!({ "ok": true }),
        Err(err) => json!({ "ok": false, "error": err.to_string() }),
    };
    let target = match db.read_target() {
        ReadTarget::Replica => "replica",
        ReadTarget::Primary if db.has_replica() => "primary (replica unusable)",
        ReadTarget::Primary => "primary (no replica configured)",
    };
    let reader = match reader {
        Ok(Ok(_)) => json!({ "ok": true, "target": target }),
        Ok(Err(err)) => json!({ "ok": false, "error": err.to_string() }),
        Err(_) => {
            json!({ "ok": false, "error": format!("no answer within {READINESS_TIMEOUT:?}") })
        }
    };
    let broker = match broker {
        Ok(brokers) => json!({ "ok": true, "brokers": brokers }),
        Err(err) => json!({ "ok": false, "error": err.to_string() }),
    };
    let checks = json!({ "writer": writer, "reader": reader, "broker": broker });
    let failing: Vec<&str> = ["writer", "reader", "broker"]
        .into_iter()
        .filter(|part| checks[part]["ok"] != json!(true))
        .collect();
    if failing.is_empty() {
        HttpResponse::Ok().json(json!({ "status": "ready", "checks": checks }))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({
            "status": "not_ready",
            "failing": failing,
            "checks": checks,
        }))
    }
}

async fn render_metrics(context: web::Data<AppContext>) -> HttpResponse {
    context.db.record_pool_gauges();
    names::record_process_metrics();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(context.metrics.render())
}

async fn not_found(request: HttpRequest) -> HttpResponse {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.path()
    ))
    .error_response()
}

/// Counts and times every request by route pattern, and writes its access-log line.
async fn record_metrics(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let method = request.method().to_string();
    // The pattern (`/v1/tasks/{id}`), never the raw path: label values must stay few.
    let route = request
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let result = next.call(request).await;
    let elapsed = started.elapsed();
    let status = match &result {
        Ok(response) => response.status(),
        Err(err) => err.as_response_error().status_code(),
    };
    metrics::counter!(names::HTTP_REQUESTS, "method" => method.clone(), "route" => route.clone(), "status" => status.as_str().to_owned())
        .increment(1);
    metrics::histogram!(names::HTTP_DURATION, "method" => method.clone(), "route" => route.clone())
        .record(elapsed);
    let millis = elapsed.as_secs_f64() * 1000.0;
    if status.is_server_error() {
        metrics::counter!(names::HTTP_ERRORS, "method" => method.clone(), "route" => route.clone())
            .increment(1);
        tracing::error!(%method, %route, status = status.as_u16(), millis, "request failed");
    } else if status.is_client_error() {
        tracing::info!(%method, %route, status = status.as_u16(), millis, "request rejected");
    } else {
        // Successful requests are counted and traced already; their log line is opt-in.
        tracing::debug!(%method, %route, status = status.as_u16(), millis, "request served");
    }
    result
}

/// Answers 503 with `Retry-After` when a handler runs past `HTTP_REQUEST_TIMEOUT_MS`.
async fn enforce_timeout(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let limit = request
        .app_data::<web::Data<AppContext>>()
        .map_or(Duration::from_secs(15), |context| {
            context.config.http.request_timeout
        });
    match tokio::time::timeout(limit, next.call(request)).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("the request took longer than {} ms", limit.as_millis()),
        )
        .retry_after(1)
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::to_bytes;

    #[actix_web::test]
    async fn api_error_has_the_documented_body_and_retry_after() {
        let response = ApiError::unavailable("try later").error_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get(header::RETRY_AFTER).unwrap(), "1");
        let body = to_bytes(response.into_body()).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({ "error": { "code": "unavailable", "message": "try later" } })
        );
    }
}
