//! The notifications service: live updates to every device of a user over WebSocket
//! (`GET /v1/live`), due-date reminders into an inbox (`/v1/notifications`) and Web Push to the
//! user's devices, fed by `tasks.task.v1`, with sessions ended from `auth.user.v1`; each new
//! notification is published on `notifications.notification.v1` through the outbox.
//!
//! Layers: [`routes`] → [`handlers`] (with the wire formats in [`api`]) → [`domain`] →
//! [`storage`]. The consumer (group `notifications`) appends each change to its owner's durable
//! feed, tells every instance through PostgreSQL (NOTIFY), and keeps each task's reminders; every
//! instance runs a reminder scheduler and a push dispatcher, which share the work through
//! `FOR UPDATE SKIP LOCKED` claims. The binary is `src/main.rs`.

pub mod api;
pub mod domain;
pub mod handlers;
pub mod routes;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use events::catalog::{AUTH_USER, TASKS_TASK};
use events::consumer::{Consumer, ConsumerSettings, CONSUMER_STOP_LIMIT};
use events::outbox::Relay;
use service_kit::access_token::{RemoteKeysSettings, TokenRules, TokenVerifier};
use service_kit::actix_web::web;
use service_kit::config::{ConfigError, Env};
use service_kit::erased_users;
use service_kit::housekeeping;
use service_kit::http::AppContext;
use service_kit::revoked_users::{self, RevokedUsers};
use service_kit::sqlx::migrate::Migrator;
use service_kit::workers::StoppableTask;
use service_kit::Service;

use crate::domain::apply::LiveFeedEvents;
use crate::domain::connection::{HandshakeLimit, Live};
use crate::domain::devices::Devices;
use crate::domain::hub::Hub;
use crate::domain::inbox::Inbox;
use crate::domain::listener;
use crate::domain::preferences::PreferencesStore;
use crate::domain::push::{Dispatcher, ServerKey};
use crate::domain::reminders::Scheduler;
use crate::domain::settings::{LiveSettings, PushSettings, ReminderSettings};
use crate::handlers::devices::DeviceRules;

/// The consumer group of notifications' instances.
pub const CONSUMER_GROUP: &str = "notifications";

/// How long SIGTERM waits for every socket to take its 1012 before the server drains.
const SOCKETS_CLOSE_LIMIT: Duration = Duration::from_secs(6);
const LISTENER_STOP_LIMIT: Duration = Duration::from_secs(1);
const SCHEDULER_STOP_LIMIT: Duration = Duration::from_secs(2);
/// In-flight pushes get this long to finish; queued ones are sent again after their lease.
const PUSH_STOP_LIMIT: Duration = Duration::from_secs(3);
const RELAY_STOP_LIMIT: Duration = Duration::from_secs(3);
/// How often users whose handshake allowance is full again are forgotten.
const IDLE_KEYS: Duration = Duration::from_secs(60);

static MIGRATIONS: Migrator = sqlx::migrate!();

pub struct NotificationsSettings {
    keys: RemoteKeysSettings,
    rules: TokenRules,
    live: LiveSettings,
    reminders: ReminderSettings,
    push: PushSettings,
    /// `INBOX_RETENTION_DAYS`, default 90: older notifications are deleted.
    inbox_retention: Duration,
}

pub struct NotificationsService {
    live: web::Data<Live>,
    verifier: web::Data<TokenVerifier>,
    inbox: web::Data<Inbox>,
    preferences: web::Data<PreferencesStore>,
    devices: web::Data<Devices>,
    device_rules: web::Data<DeviceRules>,
    server_key: Option<web::Data<ServerKey>>,
    /// Appends task events to the feeds, keeps the reminders; ends sessions' sockets.
    events: Consumer,
    listener: StoppableTask,
    scheduler: StoppableTask,
    dispatcher: Option<StoppableTask>,
    relay: Relay,
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
            reminders: ReminderSettings::from_env(env)?,
            push: PushSettings::from_env(env)?,
            inbox_retention: Duration::from_secs(
                env.ranged("INBOX_RETENTION_DAYS", 90u64, 1, 3650)? * 86_400,
            ),
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
        let mut sweeps = vec![revoked_users::sweep(), erased_users::sweep()];
        sweeps.extend(storage::sweeps(
            settings.live.feed_retention,
            settings.inbox_retention,
        ));
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
        let server_key = settings
            .push
            .vapid_private_key
            .as_deref()
            .map(|key| ServerKey::new(key, &settings.push.vapid_subject).map(Arc::new))
            .transpose()?;
        if server_key.is_none() {
            tracing::warn!("PUSH_VAPID_PRIVATE_KEY is not set: push is off, the inbox works");
        }
        let pushes_queued = Arc::new(tokio::sync::Notify::new());
        let scheduler = Scheduler {
            db: context.db.clone(),
            settings: settings.reminders,
            instance: uuid::Uuid::new_v4(),
            push_enabled: server_key.is_some(),
            feed_max_entries: settings.live.feed_max_entries,
            pushes_queued: pushes_queued.clone(),
        }
        .spawn();
        let dispatcher = match &server_key {
            None => None,
            Some(key) => Some(
                Dispatcher {
                    db: context.db.clone(),
                    settings: settings.push.clone(),
                    key: key.clone(),
                    wake: pushes_queued,
                }
                .spawn()?,
            ),
        };
        let relay = Relay::for_service(context)?;
        let live = web::Data::new(Live {
            hub,
            verifier: verifier.clone(),
            db: context.db.clone(),
            handshakes: HandshakeLimit::new(&settings.live),
            settings: settings.live,
        });
        let handshakes = live.clone();
        service_kit::workers::spawn_periodic(
            "forget idle handshake limits",
            IDLE_KEYS,
            move || {
                handshakes.handshakes.forget_idle();
                async { Ok(()) }
            },
        );
        Ok(Self {
            verifier: web::Data::from(verifier),
            live,
            inbox: web::Data::new(Inbox::new(context.db.clone())),
            preferences: web::Data::new(PreferencesStore::new(context.db.clone())),
            devices: web::Data::new(Devices::new(
                context.db.clone(),
                settings.push.max_devices_per_user,
                server_key.is_some(),
            )),
            device_rules: web::Data::new(DeviceRules::new(&settings.push)),
            server_key: server_key.map(web::Data::from),
            events,
            listener,
            scheduler,
            dispatcher,
            relay,
        })
    }

    async fn draining(&self) {
        self.live.hub.drain(SOCKETS_CLOSE_LIMIT).await;
    }

    async fn stop(&self) {
        futures_util::join!(
            self.events.stop(CONSUMER_STOP_LIMIT),
            self.listener.stop(LISTENER_STOP_LIMIT),
            self.scheduler.stop(SCHEDULER_STOP_LIMIT),
            async {
                if let Some(dispatcher) = &self.dispatcher {
                    dispatcher.stop(PUSH_STOP_LIMIT).await;
                }
            },
        );
        self.relay.stop(RELAY_STOP_LIMIT).await;
    }

    fn ready(&self) -> Result<(), String> {
        self.verifier.readiness()
    }

    fn routes(&self, routes: &mut web::ServiceConfig) {
        routes
            .app_data(self.live.clone())
            .app_data(self.verifier.clone())
            .app_data(self.inbox.clone())
            .app_data(self.preferences.clone())
            .app_data(self.devices.clone())
            .app_data(self.device_rules.clone());
        if let Some(key) = &self.server_key {
            routes.app_data(key.clone());
        }
        routes::configure(routes);
    }
}
