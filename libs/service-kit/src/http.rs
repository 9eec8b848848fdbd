//! The HTTP server every service runs, and the one place errors become HTTP responses.
//!
//! One port serves HTTP/1.1 and HTTP/2 cleartext (h2c with prior knowledge). Every request is
//! traced (W3C `traceparent` honoured), counted and timed per route, bounded in body size and
//! in handler time. `/healthz`, `/readyz` and `/metrics` come with it. SIGTERM stops accepting,
//! lets in-flight requests finish (up to `HTTP_SHUTDOWN_TIMEOUT_SECS`), then returns.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, StatusCode};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tracing_actix_web::TracingLogger;

use crate::broker::BrokerProbe;
use crate::config::ServiceConfig;
use crate::db::{Database, ReadTarget};
use crate::metrics as names;

/// How long `/readyz` waits for each dependency before calling it failed.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// What handlers can reach through `web::Data<AppContext>`.
pub struct AppContext {
    pub config: Arc<ServiceConfig>,
    pub db: Database,
    pub broker: BrokerProbe,
    pub metrics: PrometheusHandle,
}

/// An error as clients see it: a status and `{"error": {"code": "...", "message": "..."}}`.
///
/// Each service maps its domain errors into this type, so the wire format lives here only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// Adds `Retry-After`, for 429 and 503 answers.
    pub fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
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
        if let Some(secs) = self.retry_after_secs {
            response.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        response.json(json!({ "error": { "code": self.code, "message": self.message } }))
    }
}

/// Serves `routes` plus the standard endpoints until SIGTERM/SIGINT, then drains and returns.
pub async fn serve<F>(context: AppContext, routes: F) -> std::io::Result<()>
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let http = context.config.http.clone();
    let context = web::Data::new(context);
    HttpServer::new(move || {
        App::new()
            .app_data(context.clone())
            .app_data(web::PayloadConfig::new(http.max_body_bytes))
            .app_data(
                web::JsonConfig::default()
                    .limit(http.max_body_bytes)
                    .error_handler(|err, _| {
                        let status = err.status_code();
                        ApiError::new(status, "invalid_body", err.to_string()).into()
                    }),
            )
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
            .configure(routes.clone())
            .default_service(web::to(not_found))
    })
    .workers(http.workers)
    .shutdown_timeout(http.shutdown_timeout.as_secs())
    .bind_auto_h2c((http.host, http.port))?
    .run()
    .await
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
