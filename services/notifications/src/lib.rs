//! The notifications service: live updates to every device of a user over WebSocket
//! (`GET /v1/live`), fed by `tasks.task.v1`, with sessions ended from `auth.user.v1`.
//!
//! Layers: [`routes`] → [`handlers`] (with the wire protocol in [`api`]) → [`domain`] →
//! [`storage`]. The consumer (group `notifications`) appends each change to its owner's durable
//! feed and tells every instance through PostgreSQL (NOTIFY); each instance hands it to the
//! owner's sockets it holds. The binary is `src/main.rs`.

pub mod api;
pub mod domain;
pub mod handlers;
pub mod routes;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use events::catalog::{AUTH_USER, TASKS_TASK};
use events::consumer::{Consumer, ConsumerSettings, CONSUMER_STOP_LIMIT};
use service_kit::access_token::{RemoteKeysSettings, TokenRules, TokenVerifier};
use service_kit::actix_web::web;
use service_kit::config::{ConfigError, Env};
use service_kit::housekeeping;
use service_kit::http::AppContext;
use service_kit::revoked_users::{self, RevokedUsers};
use service_kit::sqlx::migrate::Migrator;
use service_kit::workers::StoppableTask;
use service_kit::Service;

use crate::domain::apply::LiveFeedEvents;
use crate::domain::connection::Live;
use crate::domain::hub::Hub;
use crate::domain::listener;
use crate::domain::settings::LiveSettings;

/// The consumer group of notifications' instances.
pub const CONSUMER_GROUP: &str = "notifications";

/// How long SIGTERM waits for every socket to take its 1012 before the server drains.
const SOCKETS_CLOSE_LIMIT: Duration = Duration::from_secs(6);
const LISTENER_STOP_LIMIT: Duration = Duration::from_secs(1);

static MIGRATIONS: Migrator = sqlx::migrate!();

pub struct NotificationsSettings {
    keys: RemoteKeysSettings,
    rules: TokenRules,
    live: LiveSettings,
}

pub struct NotificationsService {
    live: web::Data<Live>,
    /// Appends task events to the feeds; ends sessions' sockets.
    events: Consumer,
    listener: StoppableTask,
}

impl Service for NotificationsService {
    const NAME: &'static str = "notifications";
    const DEFAULT_PORT: u16 = 8083;
    type Settings = NotificationsSettings;

    fn settings(env: &Env) -> Result<NotificationsSettings, ConfigError> {
        Ok(NotificationsSettings {
            keys: RemoteKeysSettings::from_env(env)?,
            rules: TokenRules::from_env(env),
            live: LiveSettings::from_env(env)?,
        })
    }

    fn migrations() -> Option<&'static Migrator> {
        Some(&MIGRATIONS)
    }

    async fn start(settings: NotificationsSettings, context: &AppContext) -> Result<Self, String> {
        let revoked = RevokedUsers::new();
        revoked.spawn_reload(context.db.clone());
        let verifier = Arc::new(
            TokenVerifier::remote(settings.keys, &settings.rules)?.refusing(revoked.clone()),
        );
        let mut sweeps = vec![revoked_users::sweep()];
        sweeps.extend(storage::sweeps(settings.live.feed_retention));
        housekeeping::spawn(
            context.db.clone(),
            "notifications",
            context.config.housekeeping.interval,
            sweeps,
        );
        let hub = Hub::new(
            settings.live.send_budget_bytes,
            settings.live.max_connections_per_user,
        );
        let listener = listener::spawn(&context.db, hub.clone());
        let events = Consumer::spawn(
            ConsumerSettings::for_service(
                context,
                CONSUMER_GROUP,
                &[TASKS_TASK.name, AUTH_USER.name],
            ),
            context.db.clone(),
            Arc::new(LiveFeedEvents::new(settings.live.feed_max_entries, revoked)),
        )
        .map_err(|err| format!("cannot start the consumer of task events: {err}"))?;
        Ok(Self {
            live: web::Data::new(Live {
                hub,
                verifier,
                db: context.db.clone(),
                settings: settings.live,
            }),
            events,
            listener,
        })
    }

    async fn draining(&self) {
        self.live.hub.drain(SOCKETS_CLOSE_LIMIT).await;
    }

    async fn stop(&self) {
        self.events.stop(CONSUMER_STOP_LIMIT).await;
        self.listener.stop(LISTENER_STOP_LIMIT).await;
    }

    fn routes(&self, routes: &mut web::ServiceConfig) {
        routes.app_data(self.live.clone());
        routes::configure(routes);
    }
}
