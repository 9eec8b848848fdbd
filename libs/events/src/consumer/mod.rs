//! Consuming events: at least once in, exactly once applied, nothing lost on the way.
//!
//! A [`Consumer`] joins a consumer group and hands events to an [`EventHandler`] inside a
//! transaction on the service's database that also records each event id in
//! `processed_events`: an id seen before is skipped, so a redelivery changes nothing.
//!
//! - **Offsets follow the work.** librdkafka does not store an offset when it hands a message
//!   over (`enable.auto.offset.store=false`); the offset is stored only once the event is applied
//!   or dead-lettered, and stored offsets are committed in the background every second and when
//!   partitions are revoked. A stop commits exactly what was finished: an event still in retry
//!   backoff is delivered again after the restart.
//! - **Two kinds of failure.** A dependency that is away ([`HandlerError::Unavailable`]: the
//!   database down or failing over, the pool exhausted, a serialization failure or deadlock) is
//!   retried with capped backoff for as long as it lasts, holding only that partition, counted in
//!   metrics and logged once per streak; nothing is dead-lettered for it. A failure that may be
//!   the event's own ([`HandlerError::Retryable`]) is retried `max_attempts` times, a
//!   [`HandlerError::Permanent`] one or a message that is not an event at once; then the message
//!   goes to `<topic>.dlq` with the reason in its headers, and consumption goes on.
//! - **Throughput.** Each assigned partition has a worker of its own, so partitions are applied
//!   concurrently while each keeps its order (and so each key's). A worker takes what has arrived,
//!   up to `batch_size` events, and applies it in one transaction ([`EventHandler::handle_batch`])
//!   with the `processed_events` check done for all of them in one statement. If a batch fails
//!   for a reason other than an outage, its events are applied one by one to find the culprit.
//!   A partition whose worker falls behind is paused at the broker, so memory stays bounded.
//! - **Housekeeping.** Ids in `processed_events` are forgotten after `forget_after` (longer than
//!   any redelivery: the topics keep events 7 days), in batches, on one instance at a time.
//!
//! The consuming service's schema needs:
//! ```sql
//! CREATE TABLE processed_events (event_id uuid PRIMARY KEY, topic text NOT NULL,
//!     processed_at timestamptz NOT NULL DEFAULT now());
//! CREATE INDEX processed_events_processed_at_idx ON processed_events USING brin (processed_at);
//! ```

mod apply;
mod dispatch;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rdkafka::consumer::Consumer as _;
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use serde::de::DeserializeOwned;
use service_kit::db::{self, Database};
use service_kit::housekeeping::{self, Sweep};
use service_kit::http::AppContext;
use service_kit::sqlx::{self, PgConnection};
use service_kit::workers::StoppableTask;

use crate::envelope::{Envelope, EnvelopeError};

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
    /// A message read from a topic, as an event (its headers must carry an envelope).
    pub fn from_message(message: &impl Message) -> Result<Self, EnvelopeError> {
        Ok(Self {
            envelope: Envelope::from_headers(message.headers())?,
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .and_then(|key| std::str::from_utf8(key).ok())
                .map(str::to_owned),
            payload: message.payload().unwrap_or_default().to_vec(),
        })
    }

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
    /// Something the handler depends on is away (database unreachable, pool exhausted, a
    /// serialization failure or deadlock): says nothing about the event. Retried for as long as
    /// it lasts; never dead-lettered.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Might work next time, might be the event's fault: retried `max_attempts` times, then
    /// dead-lettered.
    #[error("{0}")]
    Retryable(String),
    /// Will never work (the event is malformed for this handler): dead-letter it at once.
    #[error("{0}")]
    Permanent(String),
}

impl From<db::DbError> for HandlerError {
    fn from(err: db::DbError) -> Self {
        match err {
            db::DbError::Query(err) => err.into(),
            other => HandlerError::Unavailable(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(err: sqlx::Error) -> Self {
        if db::is_transient(&err) {
            HandlerError::Unavailable(format!("database: {err}"))
        } else {
            HandlerError::Retryable(format!("database: {err}"))
        }
    }
}

/// What a service does with events, inside the transaction that records them as processed.
pub trait EventHandler: Send + Sync + 'static {
    /// Applies one event.
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a ReceivedEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Applies events of one partition, in their order, in one transaction (none of them seen
    /// before). The default calls [`Self::handle`] for each; a handler that can write many rows
    /// in one statement does so here.
    fn handle_batch<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [ReceivedEvent],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            for event in events {
                self.handle(&mut *tx, event).await?;
            }
            Ok(())
        })
    }
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub bootstrap_servers: String,
    /// The consumer group: instances in one group share the partitions.
    pub group: String,
    pub topics: Vec<String>,
    /// Runs of the handler for a [`HandlerError::Retryable`] failure before the event is
    /// dead-lettered.
    pub max_attempts: u32,
    /// Wait before the first retry; doubled for each further one...
    pub first_backoff: Duration,
    /// ...up to this (the longest an outage's end goes unnoticed).
    pub max_backoff: Duration,
    /// Most events applied in one transaction.
    pub batch_size: usize,
    /// Partitions applied at the same time; each holds a writer connection while it works.
    pub concurrency: usize,
    /// How long an applied event's id is remembered: longer than the topics keep events.
    pub forget_after: Duration,
    /// How often the forgetting runs.
    pub housekeeping_interval: Duration,
}

impl ConsumerSettings {
    pub fn new(bootstrap_servers: &str, group: &str, topics: &[&str]) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.to_owned(),
            group: group.to_owned(),
            topics: topics.iter().map(|topic| topic.to_string()).collect(),
            max_attempts: 5,
            first_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            batch_size: 500,
            concurrency: 4,
            forget_after: Duration::from_secs(8 * 24 * 3600),
            housekeeping_interval: Duration::from_secs(60),
        }
    }

    /// The settings of a service's consumer: its broker and housekeeping interval.
    pub fn for_service(context: &AppContext, group: &str, topics: &[&str]) -> Self {
        let mut settings = Self::new(&context.config.broker.bootstrap_servers, group, topics);
        settings.housekeeping_interval = context.config.housekeeping.interval;
        settings.concurrency = settings.concurrency.min(
            context
                .config
                .database
                .max_connections
                .saturating_sub(2)
                .max(1) as usize,
        );
        settings
    }
}

/// How long [`Consumer::stop`] may take: the events in hand are finished, stored offsets
/// committed, the group left. Fits, beside the relay's, in the few seconds a pod has left
/// after draining requests.
pub const CONSUMER_STOP_LIMIT: Duration = Duration::from_secs(4);

/// A running consumer; stop it on shutdown.
pub struct Consumer {
    task: StoppableTask,
}

impl Consumer {
    /// Joins the group and starts handing events to `handler`; forgets old event ids now and then.
    pub fn spawn<H: EventHandler>(
        settings: ConsumerSettings,
        db: Database,
        handler: Arc<H>,
    ) -> Result<Self, KafkaError> {
        let partitions = Arc::new(dispatch::Partitions::default());
        let consumer = dispatch::join_group(&settings, partitions.clone())?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        // At 0 from the start: a counter that first appears at 1 has no increase() in
        // Prometheus, so the first dead letter would never alert.
        for topic in &topics {
            metrics::counter!(crate::metric_names::EVENTS_DEAD_LETTERED, "topic" => topic.to_string())
                .increment(0);
        }
        let applier = apply::Applier::new(&settings, db.clone(), handler)?;
        spawn_forgetting(&settings, db);
        Ok(Self {
            task: StoppableTask::spawn(|stopped| {
                dispatch::run(
                    Arc::new(consumer),
                    partitions,
                    Arc::new(applier),
                    settings,
                    stopped,
                )
            }),
        })
    }

    /// Finishes the events in hand, commits what was applied, leaves the group (bounded by
    /// `limit`; [`CONSUMER_STOP_LIMIT`] fits a pod's grace period).
    pub async fn stop(&self, limit: Duration) {
        if !self.task.stop(limit).await {
            tracing::warn!("consumer did not stop within {limit:?}");
        }
    }
}

/// Deletes `processed_events` rows older than `forget_after`, on one instance at a time.
fn spawn_forgetting(settings: &ConsumerSettings, db: Database) {
    let statement = format!(
        "DELETE FROM processed_events WHERE event_id IN ( \
           SELECT event_id FROM processed_events \
           WHERE processed_at < now() - make_interval(secs => {}) LIMIT $1)",
        settings.forget_after.as_secs()
    );
    housekeeping::spawn(
        db,
        "processed_events",
        settings.housekeeping_interval,
        vec![Sweep::new("processed_events", statement)],
    );
}
