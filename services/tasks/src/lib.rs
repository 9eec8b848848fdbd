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

use std::sync::Arc;

use events::catalog::AUTH_USER;
use events::consumer::{Consumer, ConsumerSettings, CONSUMER_STOP_LIMIT};
use events::outbox::{Relay, RELAY_STOP_LIMIT};
use service_kit::access_token::{RemoteKeysSettings, TokenRules, TokenVerifier};
use service_kit::actix_web::web;
use service_kit::config::{ConfigError, Env};
use service_kit::http::AppContext;
use service_kit::revoked_users::RevokedUsers;
use service_kit::sqlx::migrate::Migrator;
use service_kit::Service;

use tokio::sync::Notify;

use crate::domain::erasure::{AccountEvents, Eraser};
use crate::domain::Tasks;

/// The consumer group of tasks' instances on `auth.user.v1`.
const ACCOUNT_EVENTS_GROUP: &str = "tasks";

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
    /// Learns of deleted accounts (`auth.user.v1`).
    account_events: Consumer,
    /// Erases deleted accounts' data.
    eraser: Eraser,
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
        let revoked = RevokedUsers::new();
        revoked.spawn_reload(context.db.clone());
        let verifier = web::Data::new(
            TokenVerifier::remote(settings.keys, &settings.rules)?.refusing(revoked.clone()),
        );
        let tasks = web::Data::new(Tasks::new(context.db.clone()));
        tasks.spawn_housekeeping(context.config.housekeeping.interval);
        let relay = Relay::for_service(context)?;
        let wake = Arc::new(Notify::new());
        let account_events = Consumer::spawn(
            ConsumerSettings::for_service(context, ACCOUNT_EVENTS_GROUP, &[AUTH_USER.name]),
            context.db.clone(),
            Arc::new(AccountEvents::new(revoked, wake.clone())),
        )
        .map_err(|err| format!("cannot start the consumer of {}: {err}", AUTH_USER.name))?;
        let eraser = Eraser::spawn(context.db.clone(), wake);
        Ok(Self {
            tasks,
            relay,
            account_events,
            eraser,
            verifier,
        })
    }

    async fn stop(&self) {
        futures_util::join!(
            self.relay.stop(RELAY_STOP_LIMIT),
            self.account_events.stop(CONSUMER_STOP_LIMIT),
            self.eraser.stop(CONSUMER_STOP_LIMIT),
        );
    }

    fn ready(&self) -> Result<(), String> {
        self.verifier.readiness()
    }

    fn routes(&self, routes: &mut web::ServiceConfig) {
        routes
            .app_data(self.tasks.clone())
            .app_data(self.verifier.clone());
        routes::configure(routes);
    }
}
