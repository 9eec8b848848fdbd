//! The transactional outbox: a service never loses an event its database committed.
//!
//! [`enqueue`] writes the event into the service's `outbox` table inside the transaction that
//! makes the change; a single-statement write puts a [`NewEvent`] in its own `WITH` instead.
//! The [`Relay`] publishes committed rows in order
//! with the idempotent producer and marks them published; housekeeping deletes them an hour
//! later, in batches. Exactly one relay per database publishes at a time: it holds a PostgreSQL
//! advisory lock on a connection of its own, checks before every round that the connection
//! (and so the lock) is still there, and the others take over within seconds if it dies.
//! Delivery is at least once: a relay that loses its lock or stops mid-round may have sent that
//! round's rows (at most one batch) without marking them, and they are published again, so
//! consumers apply each event id once.
//!
//! Waking the relay must not slow the writes down. A `NOTIFY` inside the writing transaction
//! serialises the commits of every notifying transaction (PostgreSQL holds a database-wide lock
//! from the notify queue until commit): measured here, it halved the commit rate. So a write
//! made through `Database::transaction` or `Database::write` wakes this process's relay in
//! memory once it has committed. A relay that is not the publisher passes the wake-up on with
//! one `NOTIFY` of its own, outside any write (wake-ups that pile up meanwhile make one), which
//! the publisher `LISTEN`s for. Writes in other transactions `NOTIFY` at commit as before. A
//! relay also looks every `poll_interval`, so a lost wake-up delays, never loses.
//!
//! Every instance, publisher or not, measures the backlog once a second (`outbox_pending`,
//! `outbox_oldest_pending_seconds`), independently of the publishing: when the broker is away
//! the drain hangs, and the backlog is exactly what must show.
//!
//! Per-key order holds because every change to one aggregate locks its row: the next change's
//! outbox row is inserted, and committed, after the previous one's.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use service_kit::db::Database;
use service_kit::housekeeping::{self, Sweep};
use service_kit::http::AppContext;
use service_kit::sqlx::postgres::{PgListener, PgPoolOptions};
use service_kit::sqlx::types::Json;
use service_kit::sqlx::{self, Connection, PgConnection};
use service_kit::workers::StoppableTask;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use crate::catalog::EventPayload;
use crate::envelope::{continue_trace, current_traceparent, Envelope};
use crate::metric_names as names;

/// Woken at commit by `NOTIFY outbox`.
const CHANNEL: &str = "outbox";
/// The relay's advisory lock (public for tests that take it away). Any constant does: each
/// service has a database of its own.
pub const RELAY_LOCK: i64 = 0x6f75_7462_6f78; // "outbox"
/// How often a relay that is not the publisher asks for the lock again.
const LEADERSHIP_RETRY: Duration = Duration::from_secs(2);
/// Longest wait for the lock connection to answer before leadership counts as lost.
const LEADERSHIP_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often every instance measures the backlog.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(1);
/// The backlog is counted up to this many rows (a count is a scan of the pending rows).
const BACKLOG_COUNT_CAP: i64 = 1_000_000;
/// How long a stopping relay lets librdkafka try to deliver what it holds.
const STOP_FLUSH: Duration = Duration::from_millis(500);

/// The wake-ups of this process's relays (one per database; tests run several in a process).
static LOCAL_RELAYS: Mutex<Vec<Weak<Notify>>> = Mutex::new(Vec::new());

fn register_local_relay(wake: &Arc<Notify>) {
    let mut relays = LOCAL_RELAYS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    relays.retain(|relay| relay.strong_count() > 0);
    relays.push(Arc::downgrade(wake));
}

/// Wakes every relay of this process: whichever publishes takes the new rows at once, the
/// others pass the wake-up on to the publisher.
fn wake_local_relays() {
    let relays = LOCAL_RELAYS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for relay in relays.iter().filter_map(Weak::upgrade) {
        relay.notify_one();
    }
}

/// Sees to it that the relay hears of a write to the outbox made on `conn`: in memory once it
/// has committed when this process runs a relay and the write runs in `Database::transaction`
/// or `Database::write`; else with a `NOTIFY`, delivered at commit.
async fn wake_relay(conn: &mut PgConnection) -> sqlx::Result<()> {
    let local = LOCAL_RELAYS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
        .any(|relay| relay.strong_count() > 0);
    if local && service_kit::db::after_commit(wake_local_relays) {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(CHANNEL)
        .execute(conn)
        .await
        .map(drop)
}

/// An event to write in the same statement as the change it announces, for writes that are
/// one statement (`Database::write`): [`NewEvent::insert_sql`] is the `INSERT` for a `WITH`,
/// [`NewEvent::bind`] binds its values. The payload is serialised at once, so the statement
/// only binds text.
pub struct NewEvent {
    id: Uuid,
    topic: &'static str,
    key: String,
    event_type: &'static str,
    source: &'static str,
    traceparent: Option<String>,
    payload: String,
}

impl NewEvent {
    /// `payload` as an event from `source`, made in an `outbox.enqueue` span (the topic and type
    /// as fields) in the current trace, whose context the row carries as [`enqueue`]'s does: the
    /// relay's publishing hangs below it.
    pub fn new<P: EventPayload>(source: &'static str, payload: &P) -> serde_json::Result<Self> {
        let span = tracing::info_span!(
            "outbox.enqueue",
            outbox.topic = P::TOPIC.name,
            outbox.event_type = P::TYPE
        );
        let _entered = span.enter();
        Ok(Self {
            id: Uuid::now_v7(),
            topic: P::TOPIC.name,
            key: payload.aggregate_id().to_string(),
            event_type: P::TYPE,
            source,
            traceparent: current_traceparent(),
            payload: serde_json::to_string(payload)?,
        })
    }

    /// The event's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The `INSERT` of the event, for a `WITH`, its seven values bound from `$first` on (see
    /// [`NewEvent::bind`]). It inserts only if `condition` (a SQL boolean, e.g. `EXISTS
    /// (SELECT 1 FROM changed)`) holds.
    pub fn insert_sql(first: usize, condition: &str) -> String {
        let p = |offset: usize| format!("${}", first + offset);
        format!(
            "INSERT INTO outbox (event_id, topic, message_key, event_type, source, subject, \
             occurred_at, traceparent, payload) \
             SELECT {id}, {topic}, {key}, {event_type}, {source}, {key}, now(), {traceparent}, \
             {payload}::json WHERE {condition}",
            id = p(0),
            topic = p(1),
            key = p(2),
            event_type = p(3),
            source = p(4),
            traceparent = p(5),
            payload = p(6),
        )
    }

    /// Binds the values [`NewEvent::insert_sql`] names, in its order, and asks for the relay to
    /// be woken once the statement has committed.
    pub fn bind<'q, O>(
        self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        if !service_kit::db::after_commit(wake_local_relays) {
            tracing::debug!("an outbox row written outside Database::write: the relay finds it on its next look");
        }
        query
            .bind(self.id)
            .bind(self.topic)
            .bind(self.key)
            .bind(self.event_type)
            .bind(self.source)
            .bind(self.traceparent)
            .bind(self.payload)
    }
}

/// Writes `payload` as an event into the outbox, in the caller's transaction; returns its id.
/// In an `outbox.enqueue` span (the topic and type as fields, never the payload), whose context
/// the row carries as its `traceparent`: the relay's publishing hangs below it.
#[tracing::instrument(
    name = "outbox.enqueue",
    skip_all,
    fields(outbox.topic = P::TOPIC.name, outbox.event_type = P::TYPE)
)]
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
    wake_relay(conn).await?;
    Ok(id)
}

/// Writes `payloads` as events into the outbox in one statement, in the caller's transaction and
/// in the order given (for a batch of changes, such as erasing an account's tasks). In an
/// `outbox.enqueue` span like [`enqueue`]'s, with the number of events.
#[tracing::instrument(
    name = "outbox.enqueue",
    skip_all,
    fields(outbox.topic = P::TOPIC.name, outbox.event_type = P::TYPE, outbox.events = payloads.len() as i64)
)]
pub async fn enqueue_all<P: EventPayload>(
    conn: &mut PgConnection,
    source: &'static str,
    payloads: &[P],
) -> sqlx::Result<()> {
    if payloads.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = payloads.iter().map(|_| Uuid::now_v7()).collect();
    let keys: Vec<String> = payloads
        .iter()
        .map(|payload| payload.aggregate_id().to_string())
        .collect();
    let bodies = payloads
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<Vec<String>, _>>()
        .map_err(|err| sqlx::Error::Encode(Box::new(err)))?;
    sqlx::query(
        "INSERT INTO outbox (event_id, topic, message_key, event_type, source, subject, occurred_at, traceparent, payload) \
         SELECT id, $4, key, $5, $6, key, now(), $7, body::json \
         FROM unnest($1::uuid[], $2::text[], $3::text[]) WITH ORDINALITY AS e (id, key, body, n) \
         ORDER BY n",
    )
    .bind(&ids)
    .bind(&keys)
    .bind(&bodies)
    .bind(P::TOPIC.name)
    .bind(P::TYPE)
    .bind(source)
    .bind(current_traceparent())
    .execute(&mut *conn)
    .await?;
    wake_relay(conn).await
}

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Rows published per round: also the most a relay can publish twice when it loses its lock.
    pub batch: i64,
    /// Longest wait between rounds when no NOTIFY arrives (the fallback if one is missed).
    pub poll_interval: Duration,
    /// How long a woken relay lets more rows come before it reads them: one round (one
    /// produce request, one mark) for the writes of those milliseconds instead of one each.
    /// Woken in memory right after each commit, the relay otherwise published rows one by one:
    /// measured here, that took the broker from 0.29 to 0.50 of a core at ~500 writes/s.
    pub linger: Duration,
    /// How long published rows are kept (for inspection) before housekeeping deletes them.
    pub keep_published: Duration,
    /// How often housekeeping runs.
    pub housekeeping_interval: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch: 200,
            poll_interval: Duration::from_secs(1),
            linger: Duration::from_millis(5),
            keep_published: Duration::from_secs(3600),
            housekeeping_interval: Duration::from_secs(60),
        }
    }
}

/// How long shutdown waits for the relay: the round in progress is abandoned (its rows stay
/// pending) if the broker does not answer. Fits, beside a consumer's, in the few seconds a pod
/// has left after draining requests.
pub const RELAY_STOP_LIMIT: Duration = Duration::from_secs(3);

/// A running relay; stop it on shutdown.
pub struct Relay {
    task: StoppableTask,
}

impl Relay {
    /// The relay of a service's own database and broker.
    pub fn for_service(context: &AppContext) -> Result<Self, String> {
        let settings = RelaySettings {
            housekeeping_interval: context.config.housekeeping.interval,
            keep_published: context.config.housekeeping.outbox_keep_published,
            ..RelaySettings::default()
        };
        Self::spawn(
            context.db.clone(),
            &context.config.broker.bootstrap_servers,
            settings,
        )
        .map_err(|err| format!("cannot start the outbox relay: {err}"))
    }

    /// Starts the relay for the service's database, the backlog measurement and the clean-up
    /// of published rows.
    pub fn spawn(
        db: Database,
        bootstrap_servers: &str,
        settings: RelaySettings,
    ) -> Result<Self, KafkaError> {
        let producer = crate::kafka::producer(bootstrap_servers)?;
        spawn_backlog_gauge(db.clone());
        housekeeping::spawn(
            db.clone(),
            "outbox",
            settings.housekeeping_interval,
            vec![Sweep::new(
                "outbox",
                format!(
                    "DELETE FROM outbox WHERE position IN ( \
                       SELECT position FROM outbox \
                       WHERE published_at <= now() - make_interval(secs => {}) LIMIT $1)",
                    settings.keep_published.as_secs()
                ),
            )],
        );
        let wake = Arc::new(Notify::new());
        register_local_relay(&wake);
        let worker = Worker {
            db,
            producer,
            settings,
            wake,
        };
        Ok(Self {
            task: StoppableTask::spawn(|stopped| worker.run(stopped)),
        })
    }

    /// Stops publishing: a round waiting on the broker is abandoned (its rows stay pending and
    /// are published again by the next relay). Bounded by `limit`.
    pub async fn stop(&self, limit: Duration) {
        if !self.task.stop(limit).await {
            tracing::warn!("outbox relay did not stop within {limit:?}; leaving");
        }
    }
}

/// Sets the backlog gauges once a second, for the life of the process.
fn spawn_backlog_gauge(db: Database) {
    service_kit::workers::spawn_periodic("outbox backlog", BACKLOG_INTERVAL, move || {
        let db = db.clone();
        async move {
            let (pending, oldest): (i64, f64) = db
                .primary(|mut conn| async move {
                    sqlx::query_as(
                        "SELECT (SELECT count(*) FROM (SELECT 1 FROM outbox \
                                 WHERE published_at IS NULL LIMIT $1) AS capped), \
                                COALESCE(EXTRACT(EPOCH FROM now() - (SELECT occurred_at FROM outbox \
                                 WHERE published_at IS NULL ORDER BY position LIMIT 1)), 0)::float8",
                    )
                    .bind(BACKLOG_COUNT_CAP)
                    .fetch_one(&mut *conn)
                    .await
                })
                .await
                .map_err(|err| err.to_string())?;
            metrics::gauge!(names::OUTBOX_PENDING).set(pending as f64);
            metrics::gauge!(names::OUTBOX_OLDEST_PENDING).set(oldest.max(0.0));
            Ok(())
        }
    });
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("publishing: {0}")]
    Publish(KafkaError),
    #[error("the advisory lock's connection did not answer within {LEADERSHIP_CHECK_TIMEOUT:?}")]
    LeadershipUnknown,
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

/// How a round ended.
enum Round {
    /// This many rows published and marked.
    Published(i64),
    /// Stop was asked for while waiting on the broker.
    Stopped,
}

struct Worker {
    db: Database,
    producer: FutureProducer,
    settings: RelaySettings,
    /// Woken after this process committed outbox rows.
    wake: Arc<Notify>,
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
                        _ = stop.wait_for(|stop| *stop) => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        // What librdkafka still holds was not marked published: the next relay resends it.
        // Bounded, on a thread of its own: with the broker away a flush only times out.
        let producer = self.producer;
        let (done, flushed) = tokio::sync::oneshot::channel();
        let _ = std::thread::Builder::new()
            .name("relay-flush".into())
            .spawn(move || {
                let _ = producer.flush(STOP_FLUSH);
                drop(producer);
                let _ = done.send(());
            });
        let _ = tokio::time::timeout(STOP_FLUSH * 2, flushed).await;
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
            let retry = tokio::time::sleep(LEADERSHIP_RETRY);
            tokio::pin!(retry);
            loop {
                let woken = tokio::select! {
                    _ = &mut retry => false,
                    _ = self.wake.notified() => true,
                    _ = stop.wait_for(|stop| *stop) => return Ok(()),
                };
                if !woken {
                    break;
                }
                // This process wrote events: the publisher is elsewhere, tell it.
                sqlx::query("SELECT pg_notify($1, '')")
                    .bind(CHANNEL)
                    .execute(&mut lock)
                    .await?;
            }
        }
        tracing::info!("outbox relay: this instance publishes the events");
        // Its own connection, outside the writer pool: a pool slot held for the life of the
        // relay would shrink the pool and hold up its closing.
        let listener_pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with((*options).clone());
        let mut listener = PgListener::connect_with(&listener_pool).await?;
        listener.listen(CHANNEL).await?;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            // The lock lives as long as its connection: no round starts without it.
            match tokio::time::timeout(
                LEADERSHIP_CHECK_TIMEOUT,
                sqlx::query("SELECT 1").execute(&mut lock),
            )
            .await
            {
                Ok(answered) => answered.map(drop)?,
                Err(_) => return Err(RelayError::LeadershipUnknown),
            }
            match self.publish_round(stop).await? {
                Round::Stopped => return Ok(()),
                // A full batch: more is waiting, so the next round (after the check) at once.
                Round::Published(count) if count == self.settings.batch => continue,
                Round::Published(_) => {}
            }
            let woken = tokio::select! {
                notification = listener.recv() => { notification?; true }
                _ = self.wake.notified() => true,
                _ = tokio::time::sleep(self.settings.poll_interval) => false,
                _ = stop.wait_for(|stop| *stop) => return Ok(()),
            };
            if woken {
                tokio::time::sleep(self.settings.linger).await;
            }
        }
    }

    /// Publishes up to a batch of unpublished rows in order and marks those delivered. Stops at
    /// the first failed delivery, so nothing after it is marked; gives up waiting (marking
    /// nothing more) when told to stop.
    async fn publish_round(&self, stop: &mut watch::Receiver<bool>) -> Result<Round, RelayError> {
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT position, event_id, topic, message_key, event_type, source, subject, \
                    occurred_at, traceparent, payload::text AS payload \
             FROM outbox WHERE published_at IS NULL ORDER BY position LIMIT $1",
        )
        .bind(self.settings.batch)
        .fetch_all(self.db.writer_pool())
        .await?;
        // Handed to librdkafka in order (it keeps the order per partition), then awaited.
        let mut deliveries = Vec::with_capacity(rows.len());
        let mut failure = None;
        for row in &rows {
            let (span, traceparent) = publish_span(row);
            let _entered = span.enter();
            let headers = Envelope {
                id: row.event_id,
                source: row.source.clone(),
                event_type: row.event_type.clone(),
                subject: row.subject.clone(),
                time: row.occurred_at,
                traceparent,
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
        let awaited = async {
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
        };
        tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => return Ok(Round::Stopped),
            () = awaited => {}
        }
        if !published.is_empty() {
            let positions: Vec<i64> = published.iter().map(|row| row.position).collect();
            sqlx::query("UPDATE outbox SET published_at = now() WHERE position = ANY($1)")
                .bind(&positions)
                .execute(self.db.writer_pool())
                .await?;
            let now = OffsetDateTime::now_utc();
            for row in &published {
                metrics::counter!(names::EVENTS_PUBLISHED, "topic" => row.topic.clone())
                    .increment(1);
                metrics::histogram!(names::OUTBOX_PUBLISH_DELAY)
                    .record((now - row.occurred_at).as_seconds_f64().max(0.0));
            }
        }
        match failure {
            Some(err) => Err(RelayError::Publish(err)),
            None => Ok(Round::Published(published.len() as i64)),
        }
    }
}

/// The relay's span for publishing `row`, a child of the `outbox.enqueue` span that wrote it (in
/// the request's trace), and the `traceparent` the message carries on: the span's own, so
/// consumers' spans hang below the publishing and the trace reads request → enqueue → publish
/// → consume.
fn publish_span(row: &OutboxRow) -> (tracing::Span, Option<String>) {
    let span = tracing::info_span!(
        "outbox publish",
        event.id = %row.event_id,
        event.r#type = %row.event_type,
        messaging.destination = %row.topic,
    );
    if row.traceparent.is_none() || span.is_disabled() {
        return (span, row.traceparent.clone());
    }
    continue_trace(&span, row.traceparent.as_deref());
    let traceparent = span
        .in_scope(current_traceparent)
        .or(row.traceparent.clone());
    (span, traceparent)
}

/// For unit tests: a stand-in PostgreSQL server, so the spans of database work can be checked
/// without a database.
#[cfg(test)]
pub(crate) mod fake_postgres {
    use std::time::Duration;

    use service_kit::config::DatabaseConfig;
    use service_kit::db::Database;

    /// A [`Database`] whose writer is `test_support::fake_postgres`. Call inside a runtime.
    pub fn database() -> Database {
        let url = test_support::fake_postgres::url();
        Database::connect_lazy(&DatabaseConfig {
            writer_url: url.into(),
            reader_url: None,
            max_connections: 2,
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(1),
            replica_max_lag: Duration::from_secs(1),
            replica_check_interval: Duration::from_secs(1),
        })
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::UserRegistered;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::SpanData;
    use service_kit::db::DbError;
    use test_support::trace_capture::capture;
    use tracing::Instrument;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn registered() -> UserRegistered {
        UserRegistered {
            user_id: Uuid::now_v7(),
            username: "ada".into(),
            nickname: None,
            registered_at: OffsetDateTime::now_utc(),
        }
    }

    fn attribute(span: &SpanData, key: &str) -> Option<String> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    #[test]
    fn enqueueing_is_a_span_in_the_callers_transaction_with_topic_and_type() {
        let (_, spans) = capture(|| {
            runtime().block_on(async {
                let db = fake_postgres::database();
                async {
                    let _ = db
                        .transaction(|conn| {
                            Box::pin(async move {
                                enqueue(conn, "/tests", &registered())
                                    .await
                                    .map_err(DbError::from)
                            })
                        })
                        .await;
                    let _ = db
                        .primary(|mut conn| async move {
                            enqueue_all(&mut conn, "/tests", &[registered(), registered()]).await
                        })
                        .await;
                }
                .instrument(tracing::info_span!("request"))
                .await
            })
        });
        let id_of = |name: &str| {
            spans
                .iter()
                .filter(|span| span.name == name)
                .map(|span| span.span_context.span_id())
                .collect::<Vec<_>>()
        };
        let parent_of = |name: &str| {
            spans
                .iter()
                .filter(|span| span.name == name)
                .map(|span| span.parent_span_id)
                .collect::<Vec<_>>()
        };
        let request = id_of("request")[0];
        assert_eq!(parent_of("db.acquire"), [request, request]);
        assert_eq!(parent_of("db.transaction"), [request]);
        assert_eq!(parent_of("db.query"), [request]);
        assert_eq!(
            parent_of("outbox.enqueue"),
            [id_of("db.transaction")[0], id_of("db.query")[0]],
            "in the transaction, after the wait for its connection"
        );
        let enqueued: Vec<&SpanData> = spans
            .iter()
            .filter(|span| span.name == "outbox.enqueue")
            .collect();
        for span in &enqueued {
            assert_eq!(
                attribute(span, "outbox.topic").as_deref(),
                Some(UserRegistered::TOPIC.name)
            );
            assert_eq!(
                attribute(span, "outbox.event_type").as_deref(),
                Some(UserRegistered::TYPE)
            );
        }
        // Nothing of the arguments (source, payload, connection) besides those: what
        // tracing-opentelemetry adds itself aside, the fields are exactly these.
        let fields = |span: &SpanData| {
            span.attributes
                .iter()
                .map(|kv| kv.key.as_str().to_owned())
                .filter(|key| {
                    !(key.starts_with("code.")
                        || key.starts_with("thread.")
                        || ["target", "busy_ns", "idle_ns"].contains(&key.as_str()))
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(fields(enqueued[0]), ["outbox.topic", "outbox.event_type"]);
        assert_eq!(
            fields(enqueued[1]),
            ["outbox.topic", "outbox.event_type", "outbox.events"]
        );
        assert_eq!(
            attribute(enqueued[1], "outbox.events").as_deref(),
            Some("2")
        );
    }

    fn row(traceparent: Option<&str>) -> OutboxRow {
        OutboxRow {
            position: 1,
            event_id: Uuid::now_v7(),
            topic: "tasks.task.v1".into(),
            message_key: "k".into(),
            event_type: "io.taskstream.tasks.task.created.v1".into(),
            source: "/taskstream/tasks".into(),
            subject: "k".into(),
            occurred_at: OffsetDateTime::now_utc(),
            traceparent: traceparent.map(str::to_owned),
            payload: "{}".into(),
        }
    }

    #[test]
    fn publishing_joins_the_request_trace_and_hands_it_on() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let request_span = "00f067aa0ba902b7";
        let (handed_on, spans) = capture(|| {
            let (span, traceparent) =
                publish_span(&row(Some(&format!("00-{trace}-{request_span}-01"))));
            drop(span);
            traceparent.expect("a traceparent for the message")
        });
        assert_eq!(spans.len(), 1);
        let publish = &spans[0];
        assert_eq!(publish.name, "outbox publish");
        assert_eq!(
            publish.span_context.trace_id(),
            TraceId::from_hex(trace).unwrap()
        );
        assert_eq!(
            publish.parent_span_id,
            SpanId::from_hex(request_span).unwrap()
        );
        assert_eq!(
            handed_on,
            format!("00-{trace}-{}-01", publish.span_context.span_id()),
            "consumers continue below the publishing"
        );
    }

    #[test]
    fn an_event_without_a_trace_starts_none() {
        let (handed_on, _) = capture(|| publish_span(&row(None)).1);
        assert_eq!(handed_on, None);
    }
}
