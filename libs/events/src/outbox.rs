//! The transactional outbox: a service never loses an event its database committed.
//!
//! [`enqueue`] writes the event into the service's `outbox` table inside the transaction that
//! makes the change (and `NOTIFY`s at commit). The [`Relay`] publishes committed rows in order
//! with the idempotent producer, marks them published, and deletes them an hour later. Exactly
//! one relay per database publishes at a time: it holds a PostgreSQL advisory lock on a
//! connection of its own; the others wait for it, and take over within seconds if it dies.
//! Delivery is at least once (a relay that stops between publishing and marking publishes those
//! rows again), so consumers apply each event id once.
//!
//! Per-key order holds because every change to one aggregate locks its row: the next change's
//! outbox row is inserted, and committed, after the previous one's.

use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use service_kit::db::Database;
use service_kit::http::AppContext;
use service_kit::sqlx::postgres::PgListener;
use service_kit::sqlx::types::Json;
use service_kit::sqlx::{self, Connection, PgConnection};
use service_kit::workers::StoppableTask;
use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

use crate::catalog::EventPayload;
use crate::envelope::{current_traceparent, Envelope};
use crate::metric_names as names;

/// Woken at commit by `NOTIFY outbox`.
const CHANNEL: &str = "outbox";
/// The relay's advisory lock. Any constant does: each service has a database of its own.
const RELAY_LOCK: i64 = 0x6f75_7462_6f78; // "outbox"
/// How often a relay that is not the publisher asks for the lock again.
const LEADERSHIP_RETRY: Duration = Duration::from_secs(2);
/// Published rows are kept this long (for inspection), then deleted.
const KEEP_PUBLISHED: &str = "1 hour";

/// Writes `payload` as an event into the outbox, in the caller's transaction; returns its id.
pub async fn enqueue<P: EventPayload>(
    conn: &mut PgConnection,
    source: &'static str,
    payload: &P,
) -> sqlx::Result<Uuid> {
    let id = Uuid::now_v7();
    let key = payload.aggregate_id().to_string();
    sqlx::query(
        "INSERT INTO outbox (event_id, topic, message_key, event_type, source, subject, occurred_at, traceparent, payload) \
         VALUES ($1, $2, $3, $4, $5, $3, now(), $6, $7)",
    )
    .bind(id)
    .bind(P::TOPIC.name)
    .bind(&key)
    .bind(P::TYPE)
    .bind(source)
    .bind(current_traceparent())
    .bind(Json(payload))
    .execute(&mut *conn)
    .await?;
    // Delivered at commit, once per transaction however many events it wrote.
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(conn)
        .await?;
    Ok(id)
}

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Rows published per round.
    pub batch: i64,
    /// Longest wait between rounds when no NOTIFY arrives (the fallback if one is missed).
    pub poll_interval: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch: 200,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// How long shutdown waits for the relay's round in progress (the broker may be away).
pub const RELAY_STOP_LIMIT: Duration = Duration::from_secs(5);

/// A running relay; stop it on shutdown.
pub struct Relay {
    task: StoppableTask,
}

impl Relay {
    /// The relay of a service's own database and broker, with the default settings.
    pub fn for_service(context: &AppContext) -> Result<Self, String> {
        Self::spawn(
            context.db.clone(),
            &context.config.broker.bootstrap_servers,
            RelaySettings::default(),
        )
        .map_err(|err| format!("cannot start the outbox relay: {err}"))
    }

    /// Starts the relay for the service's database, and the clean-up of published rows.
    pub fn spawn(
        db: Database,
        bootstrap_servers: &str,
        settings: RelaySettings,
    ) -> Result<Self, KafkaError> {
        let producer = crate::kafka::producer(bootstrap_servers)?;
        let cleanup_db = db.clone();
        service_kit::workers::spawn_periodic(
            "outbox clean-up",
            Duration::from_secs(600),
            move || {
                let db = cleanup_db.clone();
                async move {
                    db.write(|mut conn| async move {
                        sqlx::query(&format!(
                            "DELETE FROM outbox WHERE published_at < now() - interval '{KEEP_PUBLISHED}'"
                        ))
                        .execute(&mut *conn)
                        .await
                    })
                    .await
                    .map(drop)
                    .map_err(|err| err.to_string())
                }
            },
        );
        let worker = Worker {
            db,
            producer,
            settings,
        };
        Ok(Self {
            task: StoppableTask::spawn(|stopped| worker.run(stopped)),
        })
    }

    /// Lets the round in progress finish and be marked (waiting up to `limit`, as the broker may
    /// be away), then stops. Rows not marked yet are published again by the next relay.
    pub async fn stop(&self, limit: Duration) {
        if !self.task.stop(limit).await {
            tracing::warn!("outbox relay still waiting for the broker after {limit:?}; leaving");
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("publishing: {0}")]
    Publish(KafkaError),
}

/// An outbox row as the relay reads it.
#[derive(sqlx::FromRow)]
struct OutboxRow {
    position: i64,
    event_id: Uuid,
    topic: String,
    message_key: String,
    event_type: String,
    source: String,
    subject: String,
    occurred_at: OffsetDateTime,
    traceparent: Option<String>,
    payload: String,
}

struct Worker {
    db: Database,
    producer: FutureProducer,
    settings: RelaySettings,
}

impl Worker {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.lead(&mut stop).await {
                Ok(()) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "outbox relay interrupted; starting again");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        // Whatever librdkafka still holds was not marked published: the next relay resends it.
        let producer = self.producer.clone();
        let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(2))).await;
    }

    /// Waits to hold the lock, then publishes until told to stop or something fails.
    async fn lead(&self, stop: &mut watch::Receiver<bool>) -> Result<(), RelayError> {
        let options = self.db.writer_pool().connect_options();
        let mut lock = PgConnection::connect_with(&options).await?;
        loop {
            let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(RELAY_LOCK)
                .fetch_one(&mut lock)
                .await?;
            if held {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(LEADERSHIP_RETRY) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
        tracing::info!("outbox relay: this instance publishes the events");
        let mut listener = PgListener::connect_with(self.db.writer_pool()).await?;
        listener.listen(CHANNEL).await?;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            // The lock lives as long as its connection: make sure that is still there.
            sqlx::query("SELECT 1").execute(&mut lock).await?;
            while self.publish_round().await? == self.settings.batch {}
            let pending: i64 =
                sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                    .fetch_one(self.db.writer_pool())
                    .await?;
            metrics::gauge!(names::OUTBOX_PENDING).set(pending as f64);
            tokio::select! {
                notification = listener.recv() => { notification?; }
                _ = tokio::time::sleep(self.settings.poll_interval) => {}
                _ = stop.changed() => return Ok(()),
            }
        }
    }

    /// Publishes up to a batch of unpublished rows in order and marks those delivered; returns
    /// how many. Stops at the first failed delivery, so nothing after it is marked.
    async fn publish_round(&self) -> Result<i64, RelayError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT position, event_id, topic, message_key, event_type, source, subject,                     occurred_at, traceparent, payload::text AS payload              FROM outbox WHERE published_at IS NULL ORDER BY position LIMIT $1",
        )
        .bind(self.settings.batch)
        .fetch_all(self.db.writer_pool())
        .await?;
        // Handed to librdkafka in order (it keeps the order per partition), then awaited.
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut failure = None;
        for row in &rows {
            let headers = Envelope {
                id: row.event_id,
                source: row.source.clone(),
                event_type: row.event_type.clone(),
                subject: row.subject.clone(),
                time: row.occurred_at,
                traceparent: row.traceparent.clone(),
            }
            .to_headers();
            let record = FutureRecord::to(&row.topic)
                .key(&row.message_key)
                .payload(&row.payload)
                .headers(headers);
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((err, _)) => {
                    failure = Some(err);
                    break;
                }
            }
        }
        let mut published = Vec::new();
        for (row, delivery) in rows.iter().zip(deliveries) {
            match delivery
                .map(|outcome| outcome.map_err(|_| KafkaError::Canceled))
                .await
            {
                Ok(Ok(_)) => published.push(row),
                Ok(Err((err, _))) | Err(err) => {
                    failure.get_or_insert(err);
                    break;
                }
            }
        }
        if !published.is_empty() {
            let positions: Vec<i64> = published.iter().map(|row| row.position).collect();
            sqlx::query("UPDATE outbox SET published_at = now() WHERE position = ANY($1)")
                .bind(&positions)
                .execute(self.db.writer_pool())
                .await?;
            for row in &published {
                metrics::counter!(names::EVENTS_PUBLISHED, "topic" => row.topic.clone())
                    .increment(1);
            }
        }
        match failure {
            Some(err) => Err(RelayError::Publish(err)),
            None => Ok(published.len() as i64),
        }
    }
}
