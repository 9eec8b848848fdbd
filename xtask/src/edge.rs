//! The local edge proxy: one port speaking HTTP/1.1 and h2c that routes public paths to the
//! services the way the cluster's Gateway/Ingress does, so clients and load tests use the same
//! URLs locally as in production.
//!
//! Request bodies are buffered (bounded); response bodies stream through. Upstream calls use
//! HTTP/1.1 keep-alive, like ingress controllers do.

use std::collections::HashMap;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use anyhow::{Context, Result};
use serde_json::json;

/// Path prefixes and the service that owns them (see charts/ for the cluster's version).
pub const ROUTES: [(&str, &str); 6] = [
    ("/v1/auth/", "auth"),
    ("/v1/users/", "users"),
    ("/v1/tasks", "tasks"),
    ("/v1/notifications", "notifications"),
    ("/v1/analysis", "analysis"),
    ("/v1/telemetry", "analysis"),
];

/// Largest request body the edge accepts (telemetry batches are the biggest).
const MAX_REQUEST_BODY: usize = 8 << 20;

/// Headers that describe one hop, not the request: never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Which service serves `path`, if any. `/v1/tasks` matches `/v1/tasks`, `/v1/tasks/…` and
/// `/v1/tasks?…` but not `/v1/tasksfoo`.
pub fn service_for(path: &str) -> Option<&'static str> {
    ROUTES.iter().find_map(|(prefix, service)| {
        let rest = path.strip_prefix(prefix)?;
        let boundary = prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/');
        // `/v1/users/*` is served by auth.
        boundary.then_some(if *service == "users" { "auth" } else { service })
    })
}

struct Edge {
    upstreams: HashMap<String, String>,
    client: reqwest::Client,
}

/// Serves on 127.0.0.1:`port` until SIGTERM/SIGINT. `upstreams` maps service → base URL.
pub async fn run(port: u16, upstreams: HashMap<String, String>) -> Result<()> {
    let client = reqwest::Client::builder()
        .http1_only()
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(256)
        .build()?;
    let edge = web::Data::new(Edge { upstreams, client });
    HttpServer::new(move || {
        App::new()
            .app_data(edge.clone())
            .app_data(web::PayloadConfig::new(MAX_REQUEST_BODY))
            .route(
                "/healthz",
                web::get().to(|| async { HttpResponse::Ok().json(json!({"status": "ok"})) }),
            )
            .default_service(web::to(forward))
    })
    // Head and streamed body go out as separate writes: no Nagle delay between them.
    .tcp_nodelay(true)
    .shutdown_timeout(25)
    .bind_auto_h2c(("127.0.0.1", port))
    .with_context(|| format!("binding the edge to 127.0.0.1:{port}"))?
    .run()
    .await?;
    Ok(())
}

async fn forward(request: HttpRequest, body: web::Bytes, edge: web::Data<Edge>) -> HttpResponse {
    let Some(base) = service_for(request.path()).and_then(|service| edge.upstreams.get(service))
    else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {}", request.path()),
        );
    };
    let target = format!(
        "{base}{}",
        request
            .uri()
            .path_and_query()
            .map_or(request.path(), |pq| pq.as_str())
    );
    let Ok(method) = reqwest::Method::from_bytes(request.method().as_str().as_bytes()) else {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "unsupported method".into(),
        );
    };
    let mut upstream = edge.client.request(method, &target);
    for (name, value) in request.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            upstream = upstream.header(name.as_str(), value.as_bytes());
        }
    }
    if let Some(peer) = request.peer_addr() {
        upstream = upstream.header("x-forwarded-for", peer.ip().to_string());
    }
    upstream = upstream
        .header(
            "x-forwarded-proto",
            request.connection_info().scheme().to_owned(),
        )
        .header(
            "x-forwarded-host",
            request.connection_info().host().to_owned(),
        );
    match upstream.body(body).send().await {
        Err(err) => error(
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            format!("upstream unavailable: {err}"),
        ),
        Ok(response) => {
            let status =
                StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut reply = HttpResponse::build(status);
            for (name, value) in response.headers() {
                if !HOP_BY_HOP.contains(&name.as_str()) && name != "content-length" {
                    reply.append_header((name.as_str(), value.as_bytes()));
                }
            }
            // These answers have no body by definition: streaming an empty one would still write
            // a chunked terminator, which a keep-alive client reads as the next response.
            let bodiless = status.is_informational()
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED
                || request.method() == actix_web::http::Method::HEAD;
            if bodiless {
                reply.finish()
            } else {
                reply.streaming(response.bytes_stream())
            }
        }
    }
}

fn error(status: StatusCode, code: &str, message: String) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": { "code": code, "message": message } }))
}

#[cfg(test)]
mod tests {
    use super::service_for;

    #[test]
    fn routes_match_the_ingress_table() {
        assert_eq!(service_for("/v1/auth/login"), Some("auth"));
        assert_eq!(service_for("/v1/users/me"), Some("auth"));
        assert_eq!(service_for("/v1/tasks"), Some("tasks"));
        assert_eq!(service_for("/v1/tasks/42/revisions"), Some("tasks"));
        assert_eq!(service_for("/v1/notifications/ws"), Some("notifications"));
        assert_eq!(service_for("/v1/analysis/tasks/1"), Some("analysis"));
        assert_eq!(service_for("/v1/telemetry"), Some("analysis"));
    }

    #[test]
    fn unknown_and_lookalike_paths_are_not_routed() {
        assert_eq!(service_for("/v1/tasksfoo"), None);
        assert_eq!(service_for("/v1/auth"), None);
        assert_eq!(service_for("/metrics"), None);
        assert_eq!(service_for("/"), None);
    }
}
