//! Telemetry ingest: a batch of client events is checked ([`parse_batch`]), handed to a bounded
//! queue, and a pool of workers publishes it to `analysis.telemetry.v1`. The request is answered
//! 202 only once the broker has acknowledged the batch (durable, with `acks=all`), 503 with
//! `Retry-After` at once when the queue is full, and 503 when the broker does not acknowledge within
//! the bound. Memory is bounded by the queue: at most `max_queue` batches of at most
//! [`MAX_BATCH_BYTES`] wait, whatever the load.
//!
//! Workers take up to [`WORKER_GRAB`] queued batches at a time and publish them together, so a few
//! workers keep many messages in flight (librdkafka batches them on the wire).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use events::catalog::{EventPayload, TelemetryBatch, TelemetryEvent, TelemetryValue};
use events::envelope::Envelope;
use futures_util::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use serde_json::Value;
use service_kit::config::{ConfigError, Env};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, Mutex};
use uuid::Uuid;

/// Most events in one batch.
pub const MAX_EVENTS: usize = 500;
/// Largest request body.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
pub const MAX_NAME_CHARS: usize = 64;
pub const MAX_PROPS: usize = 20;
pub const MAX_PROP_KEY_CHARS: usize = 40;
pub const MAX_PROP_TEXT_CHARS: usize = 200;
/// How far from the server's clock an event's `at` may be (clients' clocks drift, offline
/// clients send late).
pub const MAX_CLOCK_SKEW: time::Duration = time::Duration::days(30);
/// Batches a worker takes from the queue at once.
const WORKER_GRAB: usize = 64;

/// Metric names.
pub const QUEUE_DEPTH_METRIC: &str = "telemetry_queue_depth";
pub const WORKERS_METRIC: &str = "telemetry_workers";
pub const REJECTED_METRIC: &str = "telemetry_rejected_total";
pub const PRODUCE_METRIC: &str = "telemetry_produce_seconds";
pub const ACCEPTED_EVENTS_METRIC: &str = "telemetry_events_accepted_total";
pub const ACCEPTED_BATCHES_METRIC: &str = "telemetry_batches_accepted_total";

/// A field of the batch that breaks a rule: where (`events[3].props.plan`) and which rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenField {
    pub field: String,
    pub message: String,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && name.chars().count() <= MAX_NAME_CHARS
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c))
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.chars().count() <= MAX_PROP_KEY_CHARS
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Checks a request body (already JSON) against the rules and returns its events, or every broken
/// field at once.
pub fn parse_batch(
    body: &Value,
    now: OffsetDateTime,
) -> Result<Vec<TelemetryEvent>, Vec<BrokenField>> {
    let mut broken = Vec::new();
    let mut fail = |field: String, message: String| broken.push(BrokenField { field, message });
    let Some(items) = body.as_array() else {
        fail("body".into(), "must be a JSON array of events".into());
        return Err(broken);
    };
    if items.is_empty() || items.len() > MAX_EVENTS {
        fail(
            "body".into(),
            format!("must hold 1 to {MAX_EVENTS} events, not {}", items.len()),
        );
        return Err(broken);
    }
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at_field = |name: &str| format!("events[{i}].{name}");
        let Some(object) = item.as_object() else {
            fail(
                format!("events[{i}]"),
                "must be an object {name, at, props}".into(),
            );
            continue;
        };
        for key in object.keys() {
            if !["name", "at", "props"].contains(&key.as_str()) {
                fail(at_field(key), "is not a field of an event".into());
            }
        }
        let name = match object.get("name").and_then(Value::as_str) {
            Some(name) if valid_name(name) => Some(name.to_owned()),
            _ => {
                fail(
                    at_field("name"),
                    format!("must be 1–{MAX_NAME_CHARS} characters of a-z, 0-9, _ . -, starting with a letter"),
                );
                None
            }
        };
        let at = match object.get("at").and_then(Value::as_str) {
            Some(text) => match OffsetDateTime::parse(text, &Rfc3339) {
                Ok(at) if (at - now).abs() <= MAX_CLOCK_SKEW => Some(at),
                Ok(_) => {
                    fail(at_field("at"), "must be within 30 days of now".into());
                    None
                }
                Err(_) => {
                    fail(at_field("at"), "must be an RFC 3339 date-time".into());
                    None
                }
            },
            None => {
                fail(at_field("at"), "is required: an RFC 3339 date-time".into());
                None
            }
        };
        let mut props = BTreeMap::new();
        match object.get("props") {
            None | Some(Value::Null) => {}
            Some(Value::Object(given)) => {
                if given.len() > MAX_PROPS {
                    fail(at_field("props"), format!("at most {MAX_PROPS} properties"));
                }
                for (key, value) in given {
                    let field = format!("events[{i}].props.{key}");
                    if !valid_key(key) {
                        fail(
                            field.clone(),
                            format!("keys are 1–{MAX_PROP_KEY_CHARS} characters of a-z, 0-9, _"),
                        );
                    }
                    let value = match value {
                        Value::Null => None,
                        Value::Bool(flag) => Some(TelemetryValue::Bool(*flag)),
                        Value::Number(number) => number.as_f64().map(TelemetryValue::Number),
                        Value::String(text)
                            if text.chars().count() <= MAX_PROP_TEXT_CHARS
                                && !text.contains('\0') =>
                        {
                            Some(TelemetryValue::Text(text.clone()))
                        }
                        Value::String(_) => {
                            fail(
                                field,
                                format!(
                                    "text is at most {MAX_PROP_TEXT_CHARS} characters, without NUL"
                                ),
                            );
                            continue;
                        }
                        Value::Array(_) | Value::Object(_) => {
                            fail(
                                field,
                                "must be a string, number, boolean or null (props are flat)".into(),
                            );
                            continue;
                        }
                    };
                    props.insert(key.clone(), value);
                }
            }
            Some(_) => fail(at_field("props"), "must be an object".into()),
        }
        if let (Some(name), Some(at)) = (name, at) {
            events.push(TelemetryEvent { name, at, props });
        }
    }
    if broken.is_empty() {
        Ok(events)
    } else {
        Err(broken)
    }
}

/// The ingest's settings, from the environment.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// `TELEMETRY_MAX_WORKERS`, default 8.
    pub max_workers: usize,
    /// `TELEMETRY_MAX_QUEUE`, default 512 batches. At most this many plus 64 per worker are held
    /// (1,024 by default: 4 MiB at a typical 4 KiB a batch, 256 MiB if every one is 256 KiB).
    pub max_queue: usize,
    /// `TELEMETRY_ACK_TIMEOUT_MS`, default 5,000: how long a batch may wait for the broker's
    /// acknowledgement (queueing included) before the answer is 503.
    pub ack_timeout: Duration,
}

impl IngestSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            max_workers: env.ranged("TELEMETRY_MAX_WORKERS", 8, 1, 1024)?,
            max_queue: env.ranged("TELEMETRY_MAX_QUEUE", 512, 1, 100_000)?,
            ack_timeout: env.millis("TELEMETRY_ACK_TIMEOUT_MS", 5_000, 100, 60_000)?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the telemetry queue is full; retry shortly")]
    QueueFull,
    #[error("the broker did not acknowledge the batch in time; retry it")]
    NotAcknowledged,
    #[error("the telemetry ingest is stopping")]
    Stopping,
}

impl IngestError {
    fn reason(&self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::NotAcknowledged => "not_acknowledged",
            Self::Stopping => "stopping",
        }
    }
}

struct Job {
    batch: TelemetryBatch,
    done: oneshot::Sender<Result<(), KafkaError>>,
}

/// The bounded queue and its workers.
pub struct Ingest {
    queue: mpsc::Sender<Job>,
    ack_timeout: Duration,
}

impl Ingest {
    /// Starts `max_workers` workers publishing to the broker at `bootstrap_servers`.
    pub fn start(settings: &IngestSettings, bootstrap_servers: &str) -> Result<Self, KafkaError> {
        let publisher = Arc::new(Publisher::new(bootstrap_servers, settings.ack_timeout)?);
        let (queue, jobs) = mpsc::channel::<Job>(settings.max_queue);
        let jobs = Arc::new(Mutex::new(jobs));
        metrics::gauge!(WORKERS_METRIC).set(settings.max_workers as f64);
        for _ in 0..settings.max_workers {
            tokio::spawn(work(jobs.clone(), publisher.clone()));
        }
        Ok(Self {
            queue,
            ack_timeout: settings.ack_timeout,
        })
    }

    /// Queues `events` of `user` and waits until the broker has them; returns the batch id.
    pub async fn submit(
        &self,
        user: Uuid,
        events: Vec<TelemetryEvent>,
    ) -> Result<Uuid, IngestError> {
        let outcome = self.try_submit(user, events).await;
        if let Err(err) = &outcome {
            metrics::counter!(REJECTED_METRIC, "reason" => err.reason()).increment(1);
        }
        outcome
    }

    async fn try_submit(
        &self,
        user: Uuid,
        events: Vec<TelemetryEvent>,
    ) -> Result<Uuid, IngestError> {
        let count = events.len() as u64;
        let batch = TelemetryBatch {
            batch_id: Uuid::now_v7(),
            user_id: user,
            received_at: OffsetDateTime::now_utc(),
            events,
        };
        let batch_id = batch.batch_id;
        let (done, acknowledged) = oneshot::channel();
        self.queue
            .try_send(Job { batch, done })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => IngestError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => IngestError::Stopping,
            })?;
        metrics::gauge!(QUEUE_DEPTH_METRIC)
            .set((self.queue.max_capacity() - self.queue.capacity()) as f64);
        // The producer gives up on a message after the same bound; the margin covers the queue.
        match tokio::time::timeout(self.ack_timeout + Duration::from_secs(1), acknowledged).await {
            Ok(Ok(Ok(()))) => {
                metrics::counter!(ACCEPTED_BATCHES_METRIC).increment(1);
                metrics::counter!(ACCEPTED_EVENTS_METRIC).increment(count);
                Ok(batch_id)
            }
            Ok(Ok(Err(err))) => {
                tracing::warn!(error = %err, "a telemetry batch was not acknowledged");
                Err(IngestError::NotAcknowledged)
            }
            Ok(Err(_)) | Err(_) => Err(IngestError::NotAcknowledged),
        }
    }
}

/// The telemetry producer: idempotent and acknowledged by all in-sync replicas like the outbox's,
/// but giving up on a message after `ack_timeout` (the client retries; the batch id lets the
/// consumer count a batch once), with a short linger and lz4 so that many small batches travel
/// as few compressed requests.
fn new_producer(
    bootstrap_servers: &str,
    ack_timeout: Duration,
) -> Result<FutureProducer, KafkaError> {
    events::kafka::client_config(bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", ack_timeout.as_millis().to_string())
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("compression.type", "lz4")
        .create()
}

/// The workers' producer, replaced when it fails for good. An idempotent producer whose messages
/// timed out (the broker away for longer than the bound) must restart its sequence; when the
/// broker refuses that (a fencing or another fatal error), librdkafka's instance is unusable
/// from then on, and the documented remedy is a new one.
struct Publisher {
    bootstrap_servers: String,
    ack_timeout: Duration,
    /// The producer and its generation (so that many workers seeing one failure renew it once).
    current: std::sync::RwLock<(u64, FutureProducer)>,
}

impl Publisher {
    fn new(bootstrap_servers: &str, ack_timeout: Duration) -> Result<Self, KafkaError> {
        Ok(Self {
            bootstrap_servers: bootstrap_servers.to_owned(),
            ack_timeout,
            current: std::sync::RwLock::new((0, new_producer(bootstrap_servers, ack_timeout)?)),
        })
    }

    fn get(&self) -> (u64, FutureProducer) {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// After a failed send with generation `used`: a new producer if that one is broken for good.
    fn renew_if_broken(&self, used: u64, err: &KafkaError, producer: &FutureProducer) {
        let fenced = matches!(
            err.rdkafka_error_code(),
            Some(RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::Fatal)
        );
        if !fenced && producer.client().fatal_error().is_none() {
            return;
        }
        let mut current = match self.current.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.0 != used {
            return; // another worker renewed it already
        }
        match new_producer(&self.bootstrap_servers, self.ack_timeout) {
            Ok(fresh) => {
                tracing::warn!(error = %err, "the telemetry producer failed for good; starting a new one");
                *current = (used + 1, fresh);
            }
            Err(create) => {
                tracing::error!(error = %create, "cannot start a new telemetry producer")
            }
        }
    }
}

async fn work(jobs: Arc<Mutex<mpsc::Receiver<Job>>>, publisher: Arc<Publisher>) {
    loop {
        let mut taken = Vec::with_capacity(WORKER_GRAB);
        {
            let mut jobs = jobs.lock().await;
            if jobs.recv_many(&mut taken, WORKER_GRAB).await == 0 {
                return; // the queue is closed: the service is stopping
            }
            metrics::gauge!(QUEUE_DEPTH_METRIC).set(jobs.len() as f64);
        }
        let (generation, producer) = publisher.get();
        let started = Instant::now();
        let failures = join_all(taken.into_iter().map(|job| publish(&producer, job))).await;
        metrics::histogram!(PRODUCE_METRIC).record(started.elapsed());
        if let Some(err) = failures.into_iter().flatten().next() {
            publisher.renew_if_broken(generation, &err, &producer);
        }
    }
}

/// Publishes one job's batch and answers its request; returns the error if it failed.
async fn publish(producer: &FutureProducer, job: Job) -> Option<KafkaError> {
    let batch = &job.batch;
    let envelope = Envelope {
        id: batch.batch_id,
        source: "/taskstream/analysis".into(),
        event_type: TelemetryBatch::TYPE.into(),
        subject: batch.user_id.to_string(),
        time: batch.received_at,
        traceparent: None,
    };
    let key = batch.user_id.to_string();
    let outcome = match serde_json::to_vec(batch) {
        Ok(payload) => producer
            .send(
                FutureRecord::to(TelemetryBatch::TOPIC.name)
                    .key(&key)
                    .payload(&payload)
                    .headers(envelope.to_headers()),
                Timeout::Never,
            )
            .await
            .map(drop)
            .map_err(|(err, _)| err),
        Err(err) => {
            tracing::error!(error = %err, "cannot serialize a telemetry batch");
            Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::InvalidMessage,
            ))
        }
    };
    let failed = outcome.as_ref().err().cloned();
    let _ = job.done.send(outcome);
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> OffsetDateTime {
        OffsetDateTime::parse("2026-12-01T12:00:00Z", &Rfc3339).unwrap()
    }

    #[test]
    fn a_good_batch_is_parsed() {
        let events = parse_batch(
            &json!([{"name": "app.open", "at": "2026-12-01T11:59:00Z", "props": {"plan": "pro", "n": 3, "ok": true, "x": null}}]),
            now(),
        )
        .unwrap();
        assert_eq!(events[0].name, "app.open");
        assert_eq!(events[0].props["n"], Some(TelemetryValue::Number(3.0)));
        assert_eq!(events[0].props["x"], None);
    }

    #[test]
    fn every_broken_field_is_named() {
        let broken = parse_batch(
            &json!([
                {"name": "Bad Name", "at": "yesterday", "props": {"nested": {"a": 1}}},
                {"name": "ok", "at": "2020-01-01T00:00:00Z", "extra": 1},
                "not an object",
                {"name": "ok", "at": "2026-12-01T11:59:00Z", "props": {"t": "a\u{0}b", "UPPER": 1}},
            ]),
            now(),
        )
        .unwrap_err();
        let fields: Vec<&str> = broken.iter().map(|b| b.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "events[0].name",
                "events[0].at",
                "events[0].props.nested",
                "events[1].extra",
                "events[1].at",
                "events[2]",
                "events[3].props.UPPER",
                "events[3].props.t",
            ]
        );
    }

    #[test]
    fn the_batch_itself_must_be_an_array_of_1_to_500() {
        for body in [json!({"name": "x"}), json!([]), json!(vec![json!({}); 501])] {
            let broken = parse_batch(&body, now()).unwrap_err();
            assert_eq!(broken[0].field, "body", "{body}");
        }
    }
}
