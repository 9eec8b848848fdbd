//! A minimal service on the spine whose routes show what the spine does, for the spine's own
//! integration tests: which server answered a plain read, a deliberately slow request to watch
//! graceful shutdown drain, and (when `AUTH_JWKS_URL` is set) a route behind access tokens.

use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use service_kit::access_token::{Authenticated, RemoteKeysSettings, TokenRules, TokenVerifier};
use service_kit::actix_web::{web, HttpResponse};
use service_kit::config::{ConfigError, Env};
use service_kit::http::{ApiError, AppContext};
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
            .route("/probe/read", web::get().to(read_from_reader))
            .route("/probe/slow", web::get().to(slow))
            .route("/probe/echo", web::post().to(echo))
            .route("/probe/whoami", web::get().to(whoami));
    }
}

fn main() -> ExitCode {
    service_kit::run::<Probe>()
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
        .await?;
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

/// The user id of a valid access token.
async fn whoami(caller: Authenticated) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "user_id": caller.user_id }))
}
