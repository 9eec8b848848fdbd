//! Consuming events: at least once in, exactly once applied.
//!
//! A [`Consumer`] joins a consumer group and hands each message to an [`EventHandler`] inside a
//! transaction on the service's database that also records the event id in `processed_events`:
//! an id seen before is skipped, so redelivery changes nothing. Only after the transaction
//! commits is the offset committed. A handler failure is retried with exponential backoff; after
//! the last attempt (at once for a [`HandlerError::Permanent`] one, or a message that is not a
//! valid event) the message goes to `<topic>.dlq` with the reason in its headers, and
//! consumption goes on. Lag, retries and dead letters are metrics.
//!
//! The consuming service's schema needs:
//! `CREATE TABLE processed_events (event_id uuid PRIMARY KEY, topic text NOT NULL,
//! processed_at timestamptz NOT NULL DEFAULT now())`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rdkafka::consumer::{CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;
use rdkafka::ClientContext;
use serde::de::DeserializeOwned;
use service_kit::db::Database;
use service_kit::sqlx::{self, Connection, PgConnection};
use service_kit::workers::StoppableTask;
use tokio::sync::watch;
use tracing::Instrument;

use crate::catalog::dead_letter_topic;
use crate::envelope::{continue_trace, Envelope};
use crate::metric_names as names;

/// An event as a handler sees it.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    pub envelope: Envelope,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
}

impl ReceivedEvent {
    /// The payload as `T`; a payload that does not fit is a permanent failure.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.payload).map_err(|err| {
            HandlerError::Permanent(format!(
                "payload is not a {}: {err}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// Why a handler did not apply an event.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HandlerError {
    /// Worth trying again (a database hiccup, a dependency away).
    #[error("{0}")]
    Retryable(String),
    /// Will never work (the event is malformed for this handler): dead-letter it at once.
    #[error("{0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(err: sqlx::Error) -> Self {
        HandlerError::Retryable(format!("database: {err}"))
    }
}

/// What a service does with an event, inside the transaction that records it as processed.
pub trait EventHandler: Send + Sync + 'static {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a ReceivedEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub bootstrap_servers: String,
    /// The consumer group: instances in one group share the partitions.
    pub group: String,
    pub topics: Vec<String>,
    /// Handler runs per event before it is dead-lettered.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    pub first_backoff: Duration,
}

impl ConsumerSettings {
    pub fn new(bootstrap_servers: &str, group: &str, topics: &[&str]) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.to_owned(),
            group: group.to_owned(),
            topics: topics.iter().map(|topic| topic.to_string()).collect(),
            max_attempts: 5,
            first_backoff: Duration::from_millis(200),
        }
    }
}

/// Publishes consumer lag from librdkafka's statistics.
struct LagReporter {
    group: String,
}

impl ClientContext for LagReporter {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in statistics.topics {
            for (partition, stats) in stats.partitions {
                // -1: unknown (not assigned here, or no position yet).
                if partition >= 0 && stats.consumer_lag >= 0 {
                    metrics::gauge!(names::KAFKA_CONSUMER_LAG,
                        "topic" => topic.clone(),
                        "partition" => partition.to_string(),
                        "group" => self.group.clone())
                    .set(stats.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for LagReporter {}

/// A running consumer; stop it on shutdown.
pub struct Consumer {
    task: StoppableTask,
}

impl Consumer {
    /// Joins the group and starts handing events to `handler`.
    pub fn spawn<H: EventHandler>(
        settings: ConsumerSettings,
        db: Database,
        handler: Arc<H>,
    ) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer<LagReporter> =
            crate::kafka::client_config(&settings.bootstrap_servers)
                .set("group.id", &settings.group)
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                // Joins and failover take about half the session timeout.
                .set("session.timeout.ms", "6000")
                .set("heartbeat.interval.ms", "1000")
                .set("statistics.interval.ms", "5000")
                .create_with_context(LagReporter {
                    group: settings.group.clone(),
                })?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let dead_letters = crate::kafka::producer(&settings.bootstrap_servers)?;
        let worker = Worker {
            consumer,
            dead_letters,
            db,
            handler,
            settings,
        };
        Ok(Self {
            task: StoppableTask::spawn(|stopped| worker.run(stopped)),
        })
    }

    /// Finishes the event in hand, commits, leaves the group (bounded by `limit`).
    pub async fn stop(&self, limit: Duration) {
        if !self.task.stop(limit).await {
            tracing::warn!("consumer did not stop within {limit:?}");
        }
    }
}

/// How handling one message ended.
enum Outcome {
    Applied,
    Duplicate,
    DeadLettered,
    /// Shutting down mid-retry: the offset is not committed, the message comes again.
    Interrupted,
}

struct Worker<H> {
    consumer: StreamConsumer<LagReporter>,
    dead_letters: FutureProducer,
    db: Database,
    handler: Arc<H>,
    settings: ConsumerSettings,
}

impl<H: EventHandler> Worker<H> {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            let message = tokio::select! {
                message = self.consumer.recv() => message,
                _ = stop.changed() => break,
            };
            let message = match message {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(error = %err, "receiving from the broker failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            match self.process(&message, &mut stop).await {
                Outcome::Interrupted => break,
                outcome => {
                    let topic = message.topic().to_owned();
                    match outcome {
                        Outcome::Applied => {
                            metrics::counter!(names::EVENTS_CONSUMED, "topic" => topic).increment(1)
                        }
                        Outcome::Duplicate => {
                            metrics::counter!(names::EVENTS_DUPLICATE, "topic" => topic)
                                .increment(1)
                        }
                        _ => {}
                    }
                    if let Err(err) = self.consumer.commit_message(&message, CommitMode::Async) {
                        tracing::warn!(error = %err, "committing an offset failed; the message may come again");
                    }
                }
            }
        }
        // Offsets are committed per message already; this makes the last ones durable before
        // leaving the group. Closing can hang on a vanished broker, so it is bounded.
        let consumer = self.consumer;
        let closed = tokio::task::spawn_blocking(move || {
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
            consumer.unsubscribe();
        });
        let _ = tokio::time::timeout(Duration::from_secs(5), closed).await;
    }

    async fn process(
        &self,
        message: &BorrowedMessage<'_>,
        stop: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let envelope = match Envelope::from_headers(message.headers()) {
            Ok(envelope) => envelope,
            Err(err) => {
                let reason = format!("not an event: {err}");
                return self.dead_letter(message, &reason, 0, stop).await;
            }
        };
        let event = ReceivedEvent {
            envelope,
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .and_then(|key| std::str::from_utf8(key).ok())
                .map(str::to_owned),
            payload: message.payload().unwrap_or_default().to_vec(),
        };
        let span = tracing::info_span!(
            "event",
            event.id = %event.envelope.id,
            event.r#type = %event.envelope.event_type,
            messaging.destination = %event.topic,
            messaging.kafka.partition = event.partition,
            messaging.kafka.offset = event.offset,
        );
        continue_trace(&span, event.envelope.traceparent.as_deref());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.apply(&event).instrument(span.clone()).await {
                Ok(true) => return Outcome::Applied,
                Ok(false) => return Outcome::Duplicate,
                Err(failure) => failure,
            };
            match failure {
                HandlerError::Retryable(reason) if attempt < self.settings.max_attempts => {
                    metrics::counter!(names::EVENT_RETRIES, "topic" => event.topic.clone())
                        .increment(1);
                    let wait = self.settings.first_backoff * 2u32.pow(attempt - 1);
                    tracing::warn!(parent: &span, attempt, reason, "event handler failed; retrying in {wait:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return Outcome::Interrupted,
                    }
                }
                HandlerError::Retryable(reason) | HandlerError::Permanent(reason) => {
                    return self.dead_letter(message, &reason, attempt, stop).await;
                }
            }
        }
    }

    /// Applies `event` once: true when applied now, false when its id was applied before.
    async fn apply(&self, event: &ReceivedEvent) -> Result<bool, HandlerError> {
        let mut conn = self.db.writer_pool().acquire().await?;
        let mut tx = conn.begin().await?;
        let first_time = sqlx::query(
            "INSERT INTO processed_events (event_id, topic) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(event.envelope.id)
        .bind(&event.topic)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !first_time {
            return Ok(false);
        }
        self.handler.handle(&mut tx, event).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Sends the message as it arrived to `<topic>.dlq`, with why, and waits until the broker has
    /// it (the offset is committed after, so a message is never both skipped and lost). Retried
    /// until it works or the consumer stops.
    async fn dead_letter(
        &self,
        message: &BorrowedMessage<'_>,
        reason: &str,
        attempts: u32,
        stop: &mut watch::Receiver<bool>,
    ) -> Outcome {
        let topic = dead_letter_topic(message.topic());
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        for (key, value) in [
            ("dlq_reason", reason.to_owned()),
            ("dlq_original_topic", message.topic().to_owned()),
            ("dlq_original_partition", message.partition().to_string()),
            ("dlq_original_offset", message.offset().to_string()),
            ("dlq_attempts", attempts.to_string()),
            ("dlq_consumer_group", self.settings.group.clone()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        loop {
            let mut record = FutureRecord::to(&topic).headers(headers.clone());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            match self.dead_letters.send(record, Timeout::Never).await {
                Ok(_) => break,
                Err((err, _)) => {
                    tracing::error!(error = %err, topic, "dead-lettering failed; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return Outcome::Interrupted,
                    }
                }
            }
        }
        metrics::counter!(names::EVENTS_DEAD_LETTERED, "topic" => message.topic().to_owned())
            .increment(1);
        tracing::error!(
            reason,
            attempts,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            "event dead-lettered"
        );
        Outcome::DeadLettered
    }
}
