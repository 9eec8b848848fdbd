//! The HTTP server every service runs: routes, standard endpoints, and the request helpers
//! (client address, consistency tokens).
//!
//! One port serves HTTP/1.1 and HTTP/2 cleartext (h2c with prior knowledge). Every request is
//! traced (W3C `traceparent` honoured), counted and timed per route, bounded in body size and
//! in handler time. `/healthz`, `/readyz`, `/healthz/dependencies` and `/metrics` come with it.
//! SIGTERM (or SIGINT) first lets the service close its long-lived connections
//! ([`Service::draining`]), then stops accepting, lets in-flight requests finish (up to
//! `HTTP_SHUTDOWN_TIMEOUT_SECS`) and returns.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::error::DispatchError;
use actix_http::{HttpService, Protocol};
use actix_service::{fn_service, map_config, IntoServiceFactory, ServiceFactoryExt};
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{AppConfig, ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::rt::net::TcpStream;
use actix_web::{web, App, FromRequest, HttpRequest, HttpResponse, ResponseError};
use futures_util::FutureExt;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tracing_actix_web::TracingLogger;

pub use http_listener::set_send_buffer;

use crate::broker::BrokerProbe;
use crate::config::ServiceConfig;
use crate::db::{Database, Lsn, ReadTarget};
use crate::error::ApiError;
use crate::metrics as names;
use crate::Service;

/// How long a dependency check waits for each dependency before calling it failed.
const DEPENDENCY_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What handlers can reach through `web::Data<AppContext>`.
#[derive(Clone)]
pub struct AppContext {
    pub config: Arc<ServiceConfig>,
    pub db: Database,
    pub broker: BrokerProbe,
    pub metrics: PrometheusHandle,
}

/// A route path and its handlers by method: `resource("/v1/tasks").get(list).post(create)`.
/// A GET route answers HEAD too. Other methods get a JSON 405 naming the method with `Allow` listing these (RFC 9110), like
/// every other error, instead of actix's empty one; a handler that panics gets a logged 500
/// (see `catch_panics`) instead of a dropped connection.
pub fn resource(path: &str) -> Routes {
    Routes {
        resource: web::resource(path),
        allowed: Vec::new(),
    }
}

/// See [`resource`].
pub struct Routes {
    resource: actix_web::Resource,
    allowed: Vec<Method>,
}

macro_rules! method_routes {
    ($($name:ident => $method:ident),* $(,)?) => {
        $(
            #[doc = concat!("Serves `", stringify!($method), "` with `handler`.")]
            pub fn $name<F, Args>(self, handler: F) -> Self
            where
                F: actix_web::Handler<Args>,
                Args: FromRequest + 'static,
                F::Output: actix_web::Responder + 'static,
            {
                self.on(Method::$method, handler)
            }
        )*
    };
}

impl Routes {
    method_routes!(get => GET, post => POST, put => PUT, patch => PATCH, delete => DELETE);

    fn on<F, Args>(mut self, method: Method, handler: F) -> Self
    where
        F: actix_web::Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        let head = (method == Method::GET).then(|| handler.clone());
        self.resource = self
            .resource
            .route(web::route().method(method.clone()).to(handler));
        self.allowed.push(method);
        if let Some(handler) = head {
            // HEAD is GET without the body (RFC 9110 9.3.2): the same handler, and the HTTP
            // layer sends the head only, Content-Length included.
            self.resource = self
                .resource
                .route(web::route().method(Method::HEAD).to(handler));
            self.allowed.push(Method::HEAD);
        }
        self
    }

    /// Data for this path's handlers only (a tighter `web::PayloadConfig`, say).
    pub fn app_data<U: 'static>(mut self, data: U) -> Self {
        self.resource = self.resource.app_data(data);
        self
    }
}

impl actix_web::dev::HttpServiceFactory for Routes {
    fn register(self, config: &mut actix_web::dev::AppService) {
        let allow = self
            .allowed
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        self.resource
            .default_service(web::to(move |request: HttpRequest| {
                let allow = allow.clone();
                async move { method_not_allowed(&request, allow) }
            }))
            // Here, below routing: routing needs the request unshared, and the guards keep a
            // copy of it to answer with (so the metrics see the matched route on every answer).
            .wrap(from_fn(catch_panics))
            .wrap(from_fn(enforce_timeout))
            .register(config);
    }
}

fn method_not_allowed(request: &HttpRequest, allow: String) -> HttpResponse {
    let message = format!(
        "{} is not supported on {}; use {allow}",
        request.method(),
        request.path()
    );
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        message,
    )
    .with_header(header::ALLOW, allow)
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

/// The client's address: the TCP peer, or, when the peer is a trusted proxy
/// (`HTTP_TRUSTED_PROXIES`), the nearest `X-Forwarded-For` entry that is not one. Entries
/// further left were written by whoever sent the request and prove nothing.
pub fn client_ip(request: &HttpRequest) -> Option<IpAddr> {
    let peer = request.peer_addr().map(|address| address.ip())?;
    let trusted = request
        .app_data::<web::Data<AppContext>>()
        .map(|context| context.config.http.trusted_proxies.as_slice())
        .unwrap_or_default();
    Some(client_behind(
        peer,
        trusted,
        request.headers().get_all("x-forwarded-for"),
    ))
}

/// [`client_ip`] from its parts.
fn client_behind<'a>(
    peer: IpAddr,
    trusted: &[crate::config::IpNet],
    forwarded_for: impl DoubleEndedIterator<Item = &'a header::HeaderValue>,
) -> IpAddr {
    let is_trusted = |address: &IpAddr| trusted.iter().any(|net| net.contains(address));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    // Right to left: each trusted hop vouches for the entry before it.
    for value in forwarded_for.rev() {
        let Ok(value) = value.to_str() else {
            return client;
        };
        for entry in value.rsplit(',') {
            match entry.trim().parse::<IpAddr>() {
                Ok(address) => {
                    client = address;
                    if !is_trusted(&address) {
                        return client;
                    }
                }
                // Garbage where an address should be: trust stops at the last good hop.
                Err(_) => return client,
            }
        }
    }
    client
}

/// Header carrying the consistency token: set on answers to writes, echoed by clients on reads.
pub const CONSISTENCY_TOKEN_HEADER: &str = "x-consistency-token";

/// The answer to a write: `answer` with the write's consistency token in
/// `X-Consistency-Token` (absent when the position could not be read after the commit). Every
/// write handler answers through it, so the header is set in one place.
pub struct Written<R> {
    pub answer: R,
    pub token: Option<Lsn>,
}

impl<R> Written<R> {
    pub fn new(answer: R, token: Option<Lsn>) -> Self {
        Self { answer, token }
    }
}

impl<R: actix_web::Responder> actix_web::Responder for Written<R> {
    type Body = R::Body;

    fn respond_to(self, request: &HttpRequest) -> HttpResponse<Self::Body> {
        let mut response = self.answer.respond_to(request);
        if let Some(token) = self.token {
            if let Ok(value) = header::HeaderValue::try_from(token.to_string()) {
                response.headers_mut().insert(
                    header::HeaderName::from_static(CONSISTENCY_TOKEN_HEADER),
                    value,
                );
            }
        }
        response
    }
}

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

/// Serves the service's routes plus the standard endpoints until SIGTERM/SIGINT, then drains
/// and returns.
///
/// The listener is `http_listener`'s, shared with the local edge: silent connections closed,
/// unreadable requests answered with JSON.
pub async fn serve<S: Service>(context: AppContext, service: Arc<S>) -> std::io::Result<()> {
    let http = context.config.http.clone();
    let context = web::Data::new(context);
    let routes = service.clone();
    // At 0 from the start: a counter that first appears at 1 has no increase() to alert on.
    metrics::counter!(names::HTTP_PANICS).increment(0);
    metrics::counter!(names::HTTP_SILENT_CONNECTIONS_CLOSED).increment(0);
    let listener = http_listener::listen((http.host, http.port).into())?;
    let local_addr = listener.local_addr()?;
    let builder = actix_server::Server::build()
        .workers(http.workers)
        .shutdown_timeout(http.shutdown_timeout.as_secs())
        // Signals are ours (below): the service closes its long-lived connections before the drain.
        .disable_signals();
    let shutting_down = builder.graceful_shutdown_signal();
    let server = builder
        .listen("http", listener, move || {
            let context = context.clone();
            let routes = routes.clone();
            let max_body_bytes = http.max_body_bytes;
            let app = App::new()
                .app_data(context)
                // Bodies ([`crate::input::Json`]): at most this, 413 beyond; a route with a
                // tighter bound registers its own `web::PayloadConfig`.
                .app_data(web::PayloadConfig::new(max_body_bytes))
                .app_data(web::PathConfig::default().error_handler(|err, _| {
                    ApiError::bad_request("invalid_path", err.to_string()).into()
                }))
                // Last wrapped runs first: tracing span → metrics → (each resource's timeout
                // and panic guard, see `Routes`) → handler.
                .wrap(from_fn(refuse_long_uris))
                .wrap(from_fn(record_metrics))
                .wrap(TracingLogger::default())
                .route("/healthz", web::get().to(healthz))
                .route("/readyz", web::get().to(readyz::<S>))
                .route("/healthz/dependencies", web::get().to(dependencies))
                .route("/metrics", web::get().to(render_metrics))
                .app_data(web::Data::from(routes.clone()))
                .configure(|config| routes.routes(config))
                .default_service(web::to(not_found));
            let http_service =
                http_listener::configure(HttpService::build(), local_addr, shutting_down.clone())
                    .finish(map_config(
                        app.into_factory()
                            .map_err(|err: actix_web::Error| err.error_response()),
                        // Only requests without a Host header (HTTP/1.0) see this host name.
                        |_| AppConfig::default(),
                    ));
            fn_service(detect_protocol).and_then(http_service)
        })?
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

/// [`http_listener::detect_protocol`], counting the connections closed for sending nothing.
async fn detect_protocol(
    io: TcpStream,
) -> Result<
    (
        http_listener::Connection,
        Protocol,
        Option<std::net::SocketAddr>,
    ),
    DispatchError,
> {
    let detected = http_listener::detect_protocol(io).await;
    if matches!(detected, Err(DispatchError::SlowRequestTimeout)) {
        metrics::counter!(names::HTTP_SILENT_CONNECTIONS_CLOSED).increment(1);
    }
    detected
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

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Ready when this process can serve: it started, its pools exist and the service says it is
/// ([`Service::ready`], e.g. access-token keys loaded). Dependencies are not asked: a broker or
/// database outage would take every pod out of rotation at once, while the outbox keeps writes
/// going without the broker and a request that needs a dead database fails alone with 503.
/// Their health is in `/healthz/dependencies`, in `dependency_up` and in the alerts.
async fn readyz<S: Service>(service: web::Data<S>) -> HttpResponse {
    match service.ready() {
        Ok(()) => HttpResponse::Ok().json(json!({ "status": "ready" })),
        Err(reason) => HttpResponse::ServiceUnavailable().json(json!({
            "status": "not_ready",
            "reason": reason,
        })),
    }
}

/// For people: each dependency checked now (primary, reads, broker), always 200, with
/// `status` `ok` or `degraded`.
async fn dependencies(context: web::Data<AppContext>) -> HttpResponse {
    let db = &context.db;
    let ((writer, broker), reader) = tokio::join!(
        check_primary_and_broker(&context),
        tokio::time::timeout(
            DEPENDENCY_CHECK_TIMEOUT,
            db.replica_or_primary(|mut conn| async move {
                sqlx::query("SELECT 1").execute(&mut *conn).await
            })
        ),
    );
    let target = match db.read_target() {
        ReadTarget::Replica => "replica",
        ReadTarget::Primary if db.has_replica() => "primary (replica unusable)",
        ReadTarget::Primary => "primary (no replica configured)",
    };
    let reader = match reader {
        Ok(Ok(_)) => Ok(target),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {DEPENDENCY_CHECK_TIMEOUT:?}")),
    };
    let degraded = writer.is_err() || reader.is_err() || broker.is_err();
    let checks = json!({
        "writer": match writer {
            Ok(()) => json!({ "ok": true }),
            Err(err) => json!({ "ok": false, "error": err }),
        },
        "reader": match reader {
            Ok(target) => json!({ "ok": true, "target": target }),
            Err(err) => json!({ "ok": false, "error": err }),
        },
        "broker": match broker {
            Ok(brokers) => json!({ "ok": true, "brokers": brokers }),
            Err(err) => json!({ "ok": false, "error": err }),
        },
    });
    HttpResponse::Ok().json(json!({
        "status": if degraded { "degraded" } else { "ok" },
        "checks": checks,
    }))
}

/// How often `dependency_up` is measured.
const DEPENDENCY_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps `dependency_up` current for the life of the process. (The replica has its own
/// monitor: `db_replica_in_use`.)
pub(crate) fn spawn_dependency_checks(context: AppContext) {
    crate::workers::spawn_periodic("dependency checks", DEPENDENCY_CHECK_INTERVAL, move || {
        let context = context.clone();
        async move {
            // A failure is logged once per outage by `spawn_periodic`.
            let (primary, broker) = check_primary_and_broker(&context).await;
            primary.and(broker.map(drop))
        }
    });
}

/// The primary and the broker, each within [`DEPENDENCY_CHECK_TIMEOUT`]; also sets
/// `dependency_up` for each. The errors as people read them.
async fn check_primary_and_broker(
    context: &AppContext,
) -> (Result<(), String>, Result<usize, String>) {
    let (primary, broker) = tokio::join!(
        context.db.ping_primary(DEPENDENCY_CHECK_TIMEOUT),
        context.broker.check(),
    );
    for (dependency, up) in [("primary", primary.is_ok()), ("broker", broker.is_ok())] {
        metrics::gauge!(names::DEPENDENCY_UP, "dependency" => dependency).set(if up {
            1.0
        } else {
            0.0
        });
    }
    (
        primary.map_err(|err| err.to_string()),
        broker.map_err(|err| err.to_string()),
    )
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
    let method = method_label(request.method());
    let started = Instant::now();
    let result = next.call(request).await;
    let elapsed = started.elapsed();
    let (status, route) = match &result {
        // The pattern (`/v1/tasks/{id}`), never the raw path: label values must stay few. Read
        // off the answered request, where routing has marked it: no second match.
        Ok(response) => (response.status(), response.request().match_pattern()),
        Err(err) => (err.as_response_error().status_code(), None),
    };
    let route = route.unwrap_or_else(|| "unmatched".to_owned());
    metrics::counter!(names::HTTP_REQUESTS, "method" => method, "route" => route.clone(), "status" => status.as_str().to_owned())
        .increment(1);
    metrics::histogram!(names::HTTP_DURATION, "method" => method, "route" => route.clone())
        .record(elapsed);
    let millis = elapsed.as_secs_f64() * 1000.0;
    if status.is_server_error() {
        metrics::counter!(names::HTTP_ERRORS, "method" => method, "route" => route.clone())
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

/// The `method` label: one of the methods the API uses, or `other`. Any token is a valid HTTP
/// method, and each new label value is a new series: made-up methods must not grow `/metrics`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// A request target longer than `HTTP_MAX_URI_BYTES` gets a JSON 414 before routing: no route
/// of the API needs one, and it would otherwise reach handlers (and logs) whole.
async fn refuse_long_uris(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let limit = request
        .app_data::<web::Data<AppContext>>()
        .map_or(8192, |context| context.config.http.max_uri_bytes);
    let length = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if length <= limit {
        return next
            .call(request)
            .await
            .map(ServiceResponse::map_into_left_body);
    }
    let answer = ApiError::new(
        StatusCode::URI_TOO_LONG,
        "uri_too_long",
        format!("the request target is {length} bytes; at most {limit} are accepted"),
    );
    Ok(request
        .into_response(answer.error_response())
        .map_into_right_body())
}

/// A panic in a handler (or an extractor) becomes a logged 500 with the usual JSON body, counted
/// in `http_panics_total`, instead of a connection closed without an answer.
async fn catch_panics(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let http_request = request.request().clone();
    match std::panic::AssertUnwindSafe(next.call(request))
        .catch_unwind()
        .await
    {
        Ok(result) => result.map(ServiceResponse::map_into_left_body),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            metrics::counter!(names::HTTP_PANICS).increment(1);
            let answer = ApiError::internal(format!("handler panicked: {message}"));
            Ok(ServiceResponse::new(http_request, answer.error_response()).map_into_right_body())
        }
    }
}

/// Bounds a handler's time by `HTTP_REQUEST_TIMEOUT_MS`, so that the answer never lies about a
/// write:
/// - a request still running at the limit, none of whose writes can have reached the database
///   (a read, or a write not yet sent or committed), is cut: 503 `timeout` with `Retry-After`,
///   and nothing was done;
/// - one whose write may already be applied (an autocommit statement sent, a COMMIT under way)
///   is let finish, for up to `DATABASE_STATEMENT_TIMEOUT_MS` more, and answered as it ends: a
///   client told "retry" would apply a change twice;
/// - if even that runs out, 503 `outcome_unknown`: the change may or may not have been applied;
///   read it back, or retry with the same `Idempotency-Key`, which applies it at most once.
async fn enforce_timeout(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let (limit, grace) = request.app_data::<web::Data<AppContext>>().map_or(
        (Duration::from_secs(15), Duration::from_secs(10)),
        |context| {
            let config = &context.config;
            let statement = config.database.statement_timeout;
            (
                config.http.request_timeout,
                if statement.is_zero() {
                    config.http.request_timeout
                } else {
                    statement
                },
            )
        },
    );
    let http_request = request.request().clone();
    // GET, HEAD and OPTIONS change nothing, whatever they read on the primary.
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let write_sent = Arc::new(AtomicBool::new(false));
    let mut handling = std::pin::pin!(crate::db::watch_writes(
        write_sent.clone(),
        next.call(request)
    ));
    let answer = match tokio::time::timeout(limit, handling.as_mut()).await {
        Ok(result) => return result.map(ServiceResponse::map_into_left_body),
        Err(_) if safe || !write_sent.load(Ordering::Acquire) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request took longer than {} ms and was stopped before it changed anything; \
                 try again",
                limit.as_millis()
            ),
        ),
        Err(_) => match tokio::time::timeout(grace, handling).await {
            Ok(result) => return result.map(ServiceResponse::map_into_left_body),
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "outcome_unknown",
                format!(
                    "the request took longer than {} ms while its change was being written: it \
                     may or may not have been applied; read it back, or retry with the same \
                     Idempotency-Key",
                    (limit + grace).as_millis()
                ),
            ),
        },
    };
    Ok(
        ServiceResponse::new(http_request, answer.retry_after(1).error_response())
            .map_into_right_body(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_forwarded_the_request() {
        let trusted: Vec<crate::config::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        let header = |text: &'static str| header::HeaderValue::from_static(text);
        let client = |peer: &str, forwarded: &[&'static str]| {
            let values: Vec<header::HeaderValue> = forwarded.iter().map(|v| header(v)).collect();
            client_behind(ip(peer), &trusted, values.iter())
        };
        // A direct client cannot choose its address.
        assert_eq!(client("203.0.113.5", &["198.51.100.1"]), ip("203.0.113.5"));
        // Through the gateway: the entry it appended.
        assert_eq!(
            client("10.1.2.3", &["198.51.100.1, 203.0.113.7"]),
            ip("203.0.113.7")
        );
        // Through two trusted hops, in one header or two.
        assert_eq!(
            client("10.1.2.3", &["203.0.113.7, 10.9.9.9"]),
            ip("203.0.113.7")
        );
        assert_eq!(
            client("10.1.2.3", &["203.0.113.7", "10.9.9.9"]),
            ip("203.0.113.7")
        );
        // No header, or garbage: the last address vouched for.
        assert_eq!(client("10.1.2.3", &[]), ip("10.1.2.3"));
        assert_eq!(client("10.1.2.3", &["nonsense"]), ip("10.1.2.3"));
    }
}
