//! A minimal service on the spine whose routes show what the spine does, for the spine's own
//! integration tests: which server answered a plain read, and a deliberately slow request to
//! watch graceful shutdown drain.

use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use service_kit::actix_web::{web, HttpResponse};
use service_kit::http::{ApiError, AppContext};

fn main() -> ExitCode {
    service_kit::run_service("probe", 8099, |routes| {
        routes
            .route("/probe/read", web::get().to(read_from_reader))
            .route("/probe/slow", web::get().to(slow))
            .route("/probe/echo", web::post().to(echo));
    })
}

/// Reports whether the server that answered a reader-pool query is a replica.
async fn read_from_reader(context: web::Data<AppContext>) -> Result<HttpResponse, ApiError> {
    let in_recovery = context
        .db
        .read(|mut conn| async move {
            service_kit::sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()")
                .fetch_one(&mut *conn)
                .await
        })
        .await
        .map_err(|err| ApiError::unavailable(err.to_string()))?;
    Ok(HttpResponse::Ok().json(json!({ "in_recovery": in_recovery })))
}

#[derive(Deserialize)]
struct SlowQuery {
    ms: u64,
    seq: u64,
}

/// Logs that request `seq` started, then answers after `ms` milliseconds.
async fn slow(query: web::Query<SlowQuery>) -> HttpResponse {
    tracing::info!(seq = query.seq, "probe request started");
    tokio::time::sleep(Duration::from_millis(query.ms.min(10_000))).await;
    HttpResponse::Ok().json(json!({ "seq": query.seq }))
}

/// Returns the JSON body it was sent, to exercise the body limit and JSON error handling.
async fn echo(body: web::Json<serde_json::Value>) -> HttpResponse {
    HttpResponse::Ok().json(body.into_inner())
}
