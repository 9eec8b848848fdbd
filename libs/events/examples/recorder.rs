//! A service that records the events it consumes, for the consumer library's integration tests:
//! which instance applied each event, and how many times (it must be once). An event whose
//! payload is `{"fail": "permanent"}` or `{"fail": "retryable"}` fails as it says, and one with
//! `{"fail_while": NAME}` fails (retryably) in the instance called NAME only.
//!
//! Settings: `RECORDER_TOPIC`, `RECORDER_GROUP` (required), `RECORDER_NAME` (default
//! `recorder`), `RECORDER_MAX_ATTEMPTS` (default 3), `RECORDER_FIRST_BACKOFF_MS` (default 50),
//! plus the spine's.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use events::consumer::{
    Consumer, ConsumerSettings, EventHandler, HandlerError, ReceivedEvent, CONSUMER_STOP_LIMIT,
};
use futures_util::future::BoxFuture;
use service_kit::actix_web::web;
use service_kit::config::{ConfigError, Env};
use service_kit::http::AppContext;
use service_kit::sqlx::migrate::Migrator;
use service_kit::sqlx::{self, PgConnection};
use service_kit::Service;
use uuid::Uuid;

static MIGRATIONS: Migrator = sqlx::migrate!("examples/recorder_migrations");

struct RecorderSettings {
    topic: String,
    group: String,
    name: String,
    max_attempts: u32,
    first_backoff: Duration,
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
            first_backoff: env.millis("RECORDER_FIRST_BACKOFF_MS", 50, 1, 60_000)?,
        })
    }

    fn migrations() -> Option<&'static Migrator> {
        Some(&MIGRATIONS)
    }

    async fn start(settings: RecorderSettings, context: &AppContext) -> Result<Self, String> {
        let mut consumer =
            ConsumerSettings::for_service(context, &settings.group, &[&settings.topic]);
        consumer.max_attempts = settings.max_attempts;
        consumer.first_backoff = settings.first_backoff;
        let handler = Arc::new(Record {
            name: settings.name,
        });
        let consumer = Consumer::spawn(consumer, context.db.clone(), handler)
            .map_err(|err| format!("cannot start the consumer: {err}"))?;
        Ok(Self { consumer })
    }

    async fn stop(&self) {
        self.consumer.stop(CONSUMER_STOP_LIMIT).await;
    }

    fn routes(&self, _: &mut web::ServiceConfig) {}
}

struct Record {
    name: String,
}

impl Record {
    /// What the event's payload tells the recorder to do: fail, or record it.
    fn instruction(&self, event: &ReceivedEvent) -> Result<(), HandlerError> {
        let data: serde_json::Value = event.data()?;
        match data["fail"].as_str() {
            Some("permanent") => return Err(HandlerError::Permanent("told to fail".into())),
            Some("retryable") => {
                return Err(HandlerError::Retryable("told to fail, every time".into()))
            }
            _ => {}
        }
        if data["fail_while"].as_str() == Some(self.name.as_str()) {
            return Err(HandlerError::Retryable(format!(
                "told to fail in {}",
                self.name
            )));
        }
        Ok(())
    }
}

impl EventHandler for Record {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a ReceivedEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.handle_batch(tx, std::slice::from_ref(event))
    }

    /// One row per event, all in one statement.
    fn handle_batch<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [ReceivedEvent],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            for event in events {
                self.instruction(event)?;
            }
            let ids: Vec<Uuid> = events.iter().map(|event| event.envelope.id).collect();
            let partitions: Vec<i32> = events.iter().map(|event| event.partition).collect();
            sqlx::query(
                "INSERT INTO recorded_events (event_id, topic, partition, consumer, applications) \
                 SELECT id, $3, partition, $4, 1 FROM unnest($1::uuid[], $2::int4[]) AS e (id, partition) \
                 ON CONFLICT (event_id) \
                 DO UPDATE SET applications = recorded_events.applications + 1",
            )
            .bind(&ids)
            .bind(&partitions)
            .bind(&events[0].topic)
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
