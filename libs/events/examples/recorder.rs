//! A service that records the events it consumes, for the consumer library's integration tests:
//! which instance applied each event, and how many times (it must be once). An event whose
//! payload is `{"fail": "permanent"}` or `{"fail": "retryable"}` fails as it says.
//!
//! Settings: `RECORDER_TOPIC`, `RECORDER_GROUP` (required), `RECORDER_NAME` (default
//! `recorder`), `RECORDER_MAX_ATTEMPTS` (default 3), plus the spine's.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use events::consumer::{Consumer, ConsumerSettings, EventHandler, HandlerError, ReceivedEvent};
use futures_util::future::BoxFuture;
use service_kit::actix_web::web;
use service_kit::config::{ConfigError, Env};
use service_kit::http::AppContext;
use service_kit::sqlx::migrate::Migrator;
use service_kit::sqlx::{self, PgConnection};
use service_kit::Service;

static MIGRATIONS: Migrator = sqlx::migrate!("examples/recorder_migrations");

struct RecorderSettings {
    topic: String,
    group: String,
    name: String,
    max_attempts: u32,
}

struct Recorder {
    consumer: Consumer,
}

impl Service for Recorder {
    const NAME: &'static str = "recorder";
    const DEFAULT_PORT: u16 = 8098;
    type Settings = RecorderSettings;

    fn settings(env: &Env) -> Result<RecorderSettings, ConfigError> {
        Ok(RecorderSettings {
            topic: env.required("RECORDER_TOPIC")?,
            group: env.required("RECORDER_GROUP")?,
            name: env
                .raw("RECORDER_NAME")
                .unwrap_or_else(|| "recorder".into()),
            max_attempts: env.ranged("RECORDER_MAX_ATTEMPTS", 3, 1, 20)?,
        })
    }

    fn migrations() -> Option<&'static Migrator> {
        Some(&MIGRATIONS)
    }

    async fn start(settings: RecorderSettings, context: &AppContext) -> Result<Self, String> {
        let mut consumer = ConsumerSettings::new(
            &context.config.broker.bootstrap_servers,
            &settings.group,
            &[&settings.topic],
        );
        consumer.max_attempts = settings.max_attempts;
        consumer.first_backoff = Duration::from_millis(50);
        let handler = Arc::new(Record {
            name: settings.name,
        });
        let consumer = Consumer::spawn(consumer, context.db.clone(), handler)
            .map_err(|err| format!("cannot start the consumer: {err}"))?;
        Ok(Self { consumer })
    }

    async fn stop(&self) {
        self.consumer.stop(Duration::from_secs(10)).await;
    }

    fn routes(&self, _: &mut web::ServiceConfig) {}
}

struct Record {
    name: String,
}

impl EventHandler for Record {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a ReceivedEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let data: serde_json::Value = event.data()?;
            match data["fail"].as_str() {
                Some("permanent") => return Err(HandlerError::Permanent("told to fail".into())),
                Some("retryable") => {
                    return Err(HandlerError::Retryable("told to fail, every time".into()))
                }
                _ => {}
            }
            sqlx::query(
                "INSERT INTO recorded_events (event_id, topic, partition, consumer, applications) \
                 VALUES ($1, $2, $3, $4, 1) ON CONFLICT (event_id) \
                 DO UPDATE SET applications = recorded_events.applications + 1",
            )
            .bind(event.envelope.id)
            .bind(&event.topic)
            .bind(event.partition)
            .bind(&self.name)
            .execute(&mut *tx)
            .await?;
            Ok(())
        })
    }
}

fn main() -> ExitCode {
    service_kit::run::<Recorder>()
}
