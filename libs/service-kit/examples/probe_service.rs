//! A minimal service on the spine whose routes show what the spine does, for the spine's own
//! integration tests: which server answered a plain read (also a slow one, to fill the reader
//! pool), writes and reads with consistency tokens (on a `probe_rows` table the tests create),
//! a deliberately slow request to watch graceful shutdown drain, a handler that panics, and
//! (when `AUTH_JWKS_URL` is set) a route behind access tokens.

use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use service_kit::access_token::{Authenticated, RemoteKeysSettings, TokenRules, TokenVerifier};
use service_kit::actix_web::{web, HttpResponse};
use service_kit::config::{ConfigError, Env};
use service_kit::db::DbError;
use service_kit::error::ApiError;
use service_kit::http::{resource, AppContext, ReadAfter, Written};
use service_kit::input::{AnyJson, Query};
use service_kit::Service;

struct Probe {
    verifier: Option<web::Data<TokenVerifier>>,
}

impl Service for Probe {
    const NAME: &'static str = "probe";
    const DEFAULT_PORT: u16 = 8099;
    type Settings = Option<(RemoteKeysSettings, TokenRules)>;

    fn settings(env: &Env) -> Result<Self::Settings, ConfigError> {
        match env.raw("AUTH_JWKS_URL") {
            None => Ok(None),
            Some(_) => Ok(Some((
                RemoteKeysSettings::from_env(env)?,
                TokenRules::from_env(env),
            ))),
        }
    }

    async fn start(settings: Self::Settings, _: &AppContext) -> Result<Self, String> {
        let verifier = match settings {
            None => None,
            Some((keys, rules)) => Some(web::Data::new(TokenVerifier::remote(keys, &rules)?)),
        };
        Ok(Self { verifier })
    }

    fn routes(&self, routes: &mut web::ServiceConfig) {
        if let Some(verifier) = &self.verifier {
            routes.app_data(verifier.clone());
        }
        routes
            .service(resource("/probe/read").get(read_from_reader))
            .service(resource("/probe/slow-read").get(slow_read))
            .service(resource("/probe/rows").post(write_row))
            .service(resource("/probe/rows/{id}").get(read_row))
            .service(resource("/probe/slow").get(slow))
            .service(resource("/probe/panic").get(panic))
            .service(resource("/probe/echo").post(echo))
            .service(resource("/probe/whoami").get(whoami));
    }
}

fn main() -> ExitCode {
    service_kit::run::<Probe>()
}

/// Reports whether the server that answered a reader-pool query is a replica.
async fn read_from_reader(context: web::Data<AppContext>) -> Result<HttpResponse, ApiError> {
    let in_recovery = context
        .db
        .replica_or_primary(|mut conn| async move {
            service_kit::sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()")
                .fetch_one(&mut *conn)
                .await
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "in_recovery": in_recovery })))
}

#[derive(Deserialize)]
struct Millis {
    ms: u64,
}

/// A read that holds its reader connection for `ms` milliseconds (at most 5 s).
async fn slow_read(
    query: Query<Millis>,
    context: web::Data<AppContext>,
) -> Result<HttpResponse, ApiError> {
    let seconds = query.ms.min(5_000) as f64 / 1000.0;
    let in_recovery = context
        .db
        .replica_or_primary(|mut conn| async move {
            service_kit::sqlx::query_scalar::<_, bool>(
                "SELECT pg_is_in_recovery() FROM pg_sleep($1)",
            )
            .bind(seconds)
            .fetch_one(&mut *conn)
            .await
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "in_recovery": in_recovery })))
}

/// Inserts a row into `probe_rows`; the answer carries the write's consistency token.
async fn write_row(context: web::Data<AppContext>) -> Result<Written<HttpResponse>, ApiError> {
    let id = uuid::Uuid::new_v4();
    let ((), token) = context
        .db
        .transaction(move |tx| {
            Box::pin(async move {
                service_kit::sqlx::query("INSERT INTO probe_rows (id) VALUES ($1)")
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(DbError::from)?;
                Ok::<_, ApiError>(())
            })
        })
        .await?;
    Ok(Written::new(
        HttpResponse::Created().json(json!({ "id": id })),
        token,
    ))
}

/// Whether row `id` is there, read after the consistency token the client sent, and whether a
/// replica answered.
async fn read_row(
    id: web::Path<uuid::Uuid>,
    read_after: ReadAfter,
    context: web::Data<AppContext>,
) -> Result<HttpResponse, ApiError> {
    let id = *id;
    let (found, in_recovery) = context
        .db
        .replica_or_primary_after(read_after.0, |mut conn| async move {
            service_kit::sqlx::query_as::<_, (bool, bool)>(
                "SELECT EXISTS (SELECT 1 FROM probe_rows WHERE id = $1), pg_is_in_recovery()",
            )
            .bind(id)
            .fetch_one(&mut *conn)
            .await
        })
        .await?;
    Ok(HttpResponse::Ok().json(json!({ "found": found, "in_recovery": in_recovery })))
}

/// Panics: what a bug in a handler looks like to the spine.
async fn panic() -> HttpResponse {
    panic!("the probe was asked to panic")
}

#[derive(Deserialize)]
struct SlowQuery {
    ms: u64,
    seq: u64,
}

/// Logs that request `seq` started, then answers after `ms` milliseconds.
async fn slow(query: Query<SlowQuery>) -> HttpResponse {
    tracing::info!(seq = query.seq, "probe request started");
    tokio::time::sleep(Duration::from_millis(query.ms.min(10_000))).await;
    HttpResponse::Ok().json(json!({ "seq": query.seq }))
}

/// Returns the JSON body it was sent, to exercise the body limit and JSON error handling.
async fn echo(body: AnyJson<serde_json::Value>) -> HttpResponse {
    HttpResponse::Ok().json(body.0)
}

/// The user id of a valid access token.
async fn whoami(caller: Authenticated) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "user_id": caller.user_id }))
}
