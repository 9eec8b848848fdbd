//! The tasks service: a user's tasks with their full revision history, served from replicas,
//! correct under concurrency.
//!
//! Layers: [`routes`] → [`handlers`] (with [`api`] bodies) → [`domain`] → [`storage`]. A library
//! so the integration tests can check the very SQL the service runs (EXPLAIN); the binary is
//! `src/main.rs`.

pub mod api;
pub mod domain;
pub mod handlers;
pub mod routes;
pub mod storage;

use events::outbox::{Relay, RELAY_STOP_LIMIT};
use service_kit::access_token::{RemoteKeysSettings, TokenRules, TokenVerifier};
use service_kit::actix_web::web;
use service_kit::config::{ConfigError, Env};
use service_kit::http::AppContext;
use service_kit::sqlx::migrate::Migrator;
use service_kit::Service;

use crate::domain::Tasks;

static MIGRATIONS: Migrator = sqlx::migrate!();

/// tasks' own settings: where auth publishes its keys.
pub struct TasksSettings {
    keys: RemoteKeysSettings,
    rules: TokenRules,
}

pub struct TasksService {
    tasks: web::Data<Tasks>,
    /// Publishes the events task changes write to the outbox.
    relay: Relay,
    verifier: web::Data<TokenVerifier>,
}

impl Service for TasksService {
    const NAME: &'static str = "tasks";
    const DEFAULT_PORT: u16 = 8082;
    type Settings = TasksSettings;

    fn settings(env: &Env) -> Result<TasksSettings, ConfigError> {
        Ok(TasksSettings {
            keys: RemoteKeysSettings::from_env(env)?,
            rules: TokenRules::from_env(env),
        })
    }

    fn migrations() -> Option<&'static Migrator> {
        Some(&MIGRATIONS)
    }

    async fn start(settings: TasksSettings, context: &AppContext) -> Result<Self, String> {
        let verifier = web::Data::new(TokenVerifier::remote(settings.keys, &settings.rules)?);
        let tasks = web::Data::new(Tasks::new(context.db.clone()));
        tasks.spawn_housekeeping(context.config.housekeeping.interval);
        let relay = Relay::for_service(context)?;
        Ok(Self {
            tasks,
            relay,
            verifier,
        })
    }

    async fn stop(&self) {
        self.relay.stop(RELAY_STOP_LIMIT).await;
    }

    fn routes(&self, routes: &mut web::ServiceConfig) {
        routes
            .app_data(self.tasks.clone())
            .app_data(self.verifier.clone());
        routes::configure(routes);
    }
}
