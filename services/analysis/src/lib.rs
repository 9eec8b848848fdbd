//! The analysis service: per-task and per-user analysis from read models built incrementally from
//! `tasks.task.v1` (and `auth.user.v1` for deleted accounts), served from replicas.
//!
//! Layers: [`routes`] → [`handlers`] (with [`api`] bodies) → [`domain`] → [`storage`]. A library so
//! the integration tests can check the very SQL the service runs (EXPLAIN); the binary is
//! `src/main.rs` (`analysis`, `analysis migrate`, `analysis rebuild`).

pub mod api;
pub mod domain;
pub mod handlers;
pub mod routes;
pub mod storage;

use std::sync::Arc;

use events::catalog::{ANALYSIS_TELEMETRY, AUTH_USER, TASKS_TASK};
use events::consumer::{Consumer, ConsumerSettings, CONSUMER_STOP_LIMIT};
use service_kit::access_token::{RemoteKeysSettings, TokenRules, TokenVerifier};
use service_kit::actix_web::web;
use service_kit::config::{ConfigError, Env};
use service_kit::erased_users;
use service_kit::housekeeping;
use service_kit::http::AppContext;
use service_kit::revoked_users::{self, RevokedUsers};
use service_kit::sqlx::migrate::Migrator;
use service_kit::Service;

use crate::domain::apply::ReadModelEvents;
use crate::domain::telemetry::{Ingest, IngestSettings};
use crate::domain::Analysis;

/// The consumer group of analysis's instances.
pub const CONSUMER_GROUP: &str = "analysis";

static MIGRATIONS: Migrator = sqlx::migrate!();

/// analysis's own settings: where auth publishes its keys, and the telemetry ingest's bounds.
pub struct AnalysisSettings {
    keys: RemoteKeysSettings,
    rules: TokenRules,
    ingest: IngestSettings,
}

pub struct AnalysisService {
    analysis: web::Data<Analysis>,
    /// Folds task, account and telemetry events into the read models.
    events: Consumer,
    ingest: web::Data<Ingest>,
    verifier: web::Data<TokenVerifier>,
}

impl Service for AnalysisService {
    const NAME: &'static str = "analysis";
    const DEFAULT_PORT: u16 = 8084;
    type Settings = AnalysisSettings;

    fn settings(env: &Env) -> Result<AnalysisSettings, ConfigError> {
        Ok(AnalysisSettings {
            keys: RemoteKeysSettings::from_env(env)?,
            rules: TokenRules::from_env(env),
            ingest: IngestSettings::from_env(env)?,
        })
    }

    fn migrations() -> Option<&'static Migrator> {
        Some(&MIGRATIONS)
    }

    async fn start(settings: AnalysisSettings, context: &AppContext) -> Result<Self, String> {
        let revoked = RevokedUsers::new();
        revoked.spawn_reload(context.db.clone());
        let verifier = web::Data::new(
            TokenVerifier::remote(settings.keys, &settings.rules)?.refusing(revoked.clone()),
        );
        housekeeping::spawn(
            context.db.clone(),
            "analysis",
            context.config.housekeeping.interval,
            vec![revoked_users::sweep(), erased_users::sweep()],
        );
        let events = Consumer::spawn(
            ConsumerSettings::for_service(
                context,
                CONSUMER_GROUP,
                &[TASKS_TASK.name, AUTH_USER.name, ANALYSIS_TELEMETRY.name],
            ),
            context.db.clone(),
            Arc::new(ReadModelEvents::new(revoked)),
        )
        .map_err(|err| format!("cannot start the consumer of task events: {err}"))?;
        let ingest = Ingest::start(&settings.ingest, &context.config.broker.bootstrap_servers)
            .map_err(|err| format!("cannot start the telemetry producer: {err}"))?;
        let ingest = web::Data::new(ingest);
        Ok(Self {
            ingest,
            analysis: web::Data::new(Analysis::new(context.db.clone())),
            events,
            verifier,
        })
    }

    async fn stop(&self) {
        self.events.stop(CONSUMER_STOP_LIMIT).await;
    }

    fn ready(&self) -> Result<(), String> {
        self.verifier.readiness()
    }

    fn routes(&self, routes: &mut web::ServiceConfig) {
        routes
            .app_data(self.analysis.clone())
            .app_data(self.ingest.clone())
            .app_data(self.verifier.clone());
        routes::configure(routes);
    }
}
