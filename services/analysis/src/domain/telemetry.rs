//! Telemetry ingest: a batch of client events is checked ([`parse_batch`]), handed to a bounded
//! queue, and a pool of workers publishes it to `analysis.telemetry.v1`. The request is answered
//! 202 only once the broker has acknowledged the batch (durable, with `acks=all`), 503 with
//! `Retry-After` at once when the ingest holds all it may, and 503 when the broker does not
//! acknowledge within the bound.
//!
//! Memory is bounded by bytes, not by requests: a request reserves its body's size from a byte
//! budget ([`ByteBudget`], `TELEMETRY_MAX_BUFFERED_BYTES`) before the body is read, and the
//! reservation stays with the batch until the broker has answered for it. Past the budget the
//! answer is 503 `queue_full` with the body unread. The queue bounds the number of batches too.
//!
//! A 503 after a timeout cannot always mean "not kept": a request already on the broker's socket
//! when librdkafka gives up on it may still be written. So a client may send an
//! `Idempotency-Key`: the batch id is then derived from the user, the key and the events
//! ([`keyed_batch_id`]), a retry publishes the same id, and the consumer counts an id once
//! (`processed_events`). A batch that no worker took before its deadline is never published.
//!
//! Workers take up to [`WORKER_GRAB`] queued batches at a time and publish them together, so a few
//! workers keep many messages in flight (librdkafka batches them on the wire).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use events::catalog::{EventPayload, TelemetryBatch, TelemetryEvent, TelemetryValue};
use events::envelope::Envelope;
use futures_util::future::join_all;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use serde_json::Value;
use service_kit::config::{ConfigError, Env};
use sha2::{Digest, Sha256};
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
/// Most broken fields a 400 lists: 500 events can break tens of thousands of rules, and listing
/// each made the answer ten times the size of the request. The rest are counted.
pub const MAX_LISTED_BROKEN_FIELDS: usize = 50;
/// Most characters of a client's own key (a property's, an unknown field's) repeated in a
/// field's name; longer ones are cut, marked with `…`.
const MAX_ECHOED_KEY_CHARS: usize = MAX_PROP_KEY_CHARS;
/// Batches a worker takes from the queue at once.
const WORKER_GRAB: usize = 64;
/// How much longer than the producer's own bound a request waits for the delivery report of a
/// batch handed to it (librdkafka reports every message within `message.timeout.ms`).
const REPORT_GRACE: Duration = Duration::from_secs(1);

/// Metric names.
pub const QUEUE_DEPTH_METRIC: &str = "telemetry_queue_depth";
pub const BUFFERED_BYTES_METRIC: &str = "telemetry_buffered_bytes";
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

/// Why a batch was refused: the first [`MAX_LISTED_BROKEN_FIELDS`] broken fields, in the order
/// of the body, and how many there are in all.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BrokenBatch {
    pub listed: Vec<BrokenField>,
    pub total: usize,
}

impl BrokenBatch {
    /// Counts a broken field; its words are only made while the list has room.
    fn note(&mut self, field: impl FnOnce() -> String, message: impl FnOnce() -> String) {
        self.total += 1;
        if self.listed.len() < MAX_LISTED_BROKEN_FIELDS {
            self.listed.push(BrokenField {
                field: field(),
                message: message(),
            });
        }
    }

    /// Broken fields counted but not listed.
    pub fn unlisted(&self) -> usize {
        self.total - self.listed.len()
    }
}

/// Whether `name` is an event name: 1–64 characters of `a-z 0-9 _ . -`, starting with a letter.
pub fn valid_name(name: &str) -> bool {
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

/// A client's key as a field name repeats it: cut after [`MAX_ECHOED_KEY_CHARS`] characters.
fn echoed(key: &str) -> Cow<'_, str> {
    match key.char_indices().nth(MAX_ECHOED_KEY_CHARS) {
        None => Cow::Borrowed(key),
        Some((cut, _)) => Cow::Owned(format!("{}…", &key[..cut])),
    }
}

/// Checks a request body (already JSON) against the rules and returns its events, or the broken
/// fields (the first [`MAX_LISTED_BROKEN_FIELDS`], and their number). Takes the body by value:
/// the events' text moves out of it rather than being copied.
pub fn parse_batch(body: Value, now: OffsetDateTime) -> Result<Vec<TelemetryEvent>, BrokenBatch> {
    let mut broken = BrokenBatch::default();
    let Value::Array(items) = body else {
        broken.note(|| "body".into(), || "must be a JSON array of events".into());
        return Err(broken);
    };
    if items.is_empty() || items.len() > MAX_EVENTS {
        broken.note(
            || "body".into(),
            || format!("must hold 1 to {MAX_EVENTS} events, not {}", items.len()),
        );
        return Err(broken);
    }
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(mut object) = item else {
            broken.note(
                || format!("events[{i}]"),
                || "must be an object {name, at, props}".into(),
            );
            continue;
        };
        for key in object.keys() {
            if !["name", "at", "props"].contains(&key.as_str()) {
                broken.note(
                    || format!("events[{i}].{}", echoed(key)),
                    || "is not a field of an event".into(),
                );
            }
        }
        let name = match object.remove("name") {
            Some(Value::String(name)) if valid_name(&name) => Some(name),
            _ => {
                broken.note(
                    || format!("events[{i}].name"),
                    || format!("must be 1–{MAX_NAME_CHARS} characters of a-z, 0-9, _ . -, starting with a letter"),
                );
                None
            }
        };
        let at = match object.get("at").and_then(Value::as_str) {
            Some(text) => match OffsetDateTime::parse(text, &Rfc3339) {
                Ok(at) if (at - now).abs() <= MAX_CLOCK_SKEW => Some(at),
                Ok(_) => {
                    broken.note(
                        || format!("events[{i}].at"),
                        || "must be within 30 days of now".into(),
                    );
                    None
                }
                Err(_) => {
                    broken.note(
                        || format!("events[{i}].at"),
                        || "must be an RFC 3339 date-time".into(),
                    );
                    None
                }
            },
            None => {
                broken.note(
                    || format!("events[{i}].at"),
                    || "is required: an RFC 3339 date-time".into(),
                );
                None
            }
        };
        let mut props = BTreeMap::new();
        match object.remove("props") {
            None | Some(Value::Null) => {}
            Some(Value::Object(given)) => {
                if given.len() > MAX_PROPS {
                    broken.note(
                        || format!("events[{i}].props"),
                        || format!("at most {MAX_PROPS} properties"),
                    );
                }
                for (key, value) in given {
                    let field = || format!("events[{i}].props.{}", echoed(&key));
                    if !valid_key(&key) {
                        broken.note(field, || {
                            format!("keys are 1–{MAX_PROP_KEY_CHARS} characters of a-z, 0-9, _")
                        });
                    }
                    let value = match value {
                        Value::Null => None,
                        Value::Bool(flag) => Some(TelemetryValue::Bool(flag)),
                        Value::Number(number) => number.as_f64().map(TelemetryValue::Number),
                        Value::String(text)
                            if text.chars().count() <= MAX_PROP_TEXT_CHARS
                                && !text.contains('\0') =>
                        {
                            Some(TelemetryValue::Text(text))
                        }
                        Value::String(_) => {
                            broken.note(field, || {
                                format!(
                                    "text is at most {MAX_PROP_TEXT_CHARS} characters, without NUL"
                                )
                            });
                            continue;
                        }
                        Value::Array(_) | Value::Object(_) => {
                            broken.note(field, || {
                                "must be a string, number, boolean or null (props are flat)".into()
                            });
                            continue;
                        }
                    };
                    props.insert(key, value);
                }
            }
            Some(_) => broken.note(
                || format!("events[{i}].props"),
                || "must be an object".into(),
            ),
        }
        // Once anything is broken the batch is refused: its events are not kept.
        if let (Some(name), Some(at), 0) = (name, at, broken.total) {
            events.push(TelemetryEvent { name, at, props });
        }
    }
    if broken.total == 0 {
        Ok(events)
    } else {
        Err(broken)
    }
}

/// The id of a batch sent with an `Idempotency-Key`: the same user, key and events give the same
/// id, so a retry is the same message to the consumer, which counts an id once. The events take
/// part so that a key reused for other events (a client's bug) makes another batch rather than
/// losing them. The first 16 bytes of a SHA-256, as a version 8 (custom) UUID.
pub fn keyed_batch_id(
    user: Uuid,
    key: &str,
    events: &[TelemetryEvent],
) -> Result<Uuid, serde_json::Error> {
    let mut digest = Sha256::new();
    digest.update(b"taskstream.telemetry.batch.v1\n");
    digest.update(user.as_bytes());
    digest.update((key.len() as u64).to_be_bytes());
    digest.update(key.as_bytes());
    // The events as published (parsed, keys sorted): the same however the client spaced them.
    serde_json::to_writer(DigestWriter(&mut digest), events)?;
    let digest = digest.finalize();
    let mut bytes = [0; 16];
    bytes.copy_from_slice(&digest[..16]);
    Ok(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// `value` as JSON in a buffer of exactly its size: `serde_json::to_vec` grows its buffer by
/// doubling, and a batch waits with its buffer, so up to half of what the queue held was slack.
fn encode(value: &impl serde::Serialize) -> Result<Vec<u8>, serde_json::Error> {
    let mut length = ByteCount(0);
    serde_json::to_writer(&mut length, value)?;
    let mut encoded = Vec::with_capacity(length.0);
    serde_json::to_writer(&mut encoded, value)?;
    Ok(encoded)
}

/// Counts what is written to it.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Feeds what is written to a digest.
struct DigestWriter<'a>(&'a mut Sha256);

impl std::io::Write for DigestWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The ingest's settings, from the environment.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// `TELEMETRY_MAX_WORKERS`, default 8.
    pub max_workers: usize,
    /// `TELEMETRY_MAX_QUEUE`, default 512 batches. At most this many plus 64 per worker are held,
    /// and no more bytes of them than `max_buffered_bytes`.
    pub max_queue: usize,
    /// `TELEMETRY_MAX_BUFFERED_BYTES`, default 16 MiB: the most bytes of request bodies held at
    /// once, from before a body is read until the broker has answered for its batch. The
    /// process holds about twice this at worst (the body while it is parsed, librdkafka's
    /// copy), so 16 MiB is well inside a 256 MiB pod.
    pub max_buffered_bytes: usize,
    /// `TELEMETRY_ACK_TIMEOUT_MS`, default 5,000: how long a batch may wait for a worker, and
    /// then for the broker's acknowledgement, before the answer is 503.
    pub ack_timeout: Duration,
}

impl IngestSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            max_workers: env.ranged("TELEMETRY_MAX_WORKERS", 8, 1, 1024)?,
            max_queue: env.ranged("TELEMETRY_MAX_QUEUE", 512, 1, 100_000)?,
            // At least one batch of the largest size fits.
            max_buffered_bytes: env.ranged(
                "TELEMETRY_MAX_BUFFERED_BYTES",
                16 * 1024 * 1024,
                MAX_BATCH_BYTES,
                4 * 1024 * 1024 * 1024,
            )?,
            ack_timeout: env.millis("TELEMETRY_ACK_TIMEOUT_MS", 5_000, 100, 60_000)?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the telemetry queue is full; nothing was kept: retry shortly")]
    QueueFull,
    #[error("the broker did not take the batch in time; nothing was kept: retry it")]
    Expired,
    #[error(
        "the broker did not acknowledge the batch in time; it may have been kept: retry it with \
         the same Idempotency-Key to have it counted once"
    )]
    NotAcknowledged,
    #[error("the telemetry ingest is stopping; retry it")]
    Stopping,
    #[error("cannot encode the batch: {0}")]
    Encoding(#[from] serde_json::Error),
}

impl IngestError {
    fn reason(&self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Expired => "expired",
            Self::NotAcknowledged => "not_acknowledged",
            Self::Stopping => "stopping",
            Self::Encoding(_) => "encoding",
        }
    }

    fn counted(self) -> Self {
        metrics::counter!(REJECTED_METRIC, "reason" => self.reason()).increment(1);
        self
    }
}

/// Bytes of request bodies held by the ingest, and the most it may hold.
pub struct ByteBudget {
    limit: usize,
    held: AtomicUsize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            held: AtomicUsize::new(0),
        })
    }

    /// `bytes` more, if they fit.
    pub fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let held = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .ok()?;
        metrics::gauge!(BUFFERED_BYTES_METRIC).set((held + bytes) as f64);
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    fn release(&self, bytes: usize) {
        let before = self.held.fetch_sub(bytes, Ordering::AcqRel);
        metrics::gauge!(BUFFERED_BYTES_METRIC).set(before.saturating_sub(bytes) as f64);
    }
}

/// Bytes taken from a [`ByteBudget`], given back when dropped.
pub struct Reservation {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl Reservation {
    /// Gives back what is over `bytes` (a body smaller than the room reserved for it).
    pub fn shrink_to(&mut self, bytes: usize) {
        if bytes < self.bytes {
            self.budget.release(self.bytes - bytes);
            self.bytes = bytes;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// Where a queued batch is: waiting, taken by a worker (then the producer answers for it), or
/// given up by its request (then it is never published).
const WAITING: u8 = 0;
const TAKEN: u8 = 1;
const GIVEN_UP: u8 = 2;

struct Job {
    batch_id: Uuid,
    user_id: Uuid,
    received_at: OffsetDateTime,
    /// The batch as published (the events themselves are not kept once encoded).
    payload: Vec<u8>,
    state: Arc<AtomicU8>,
    /// The batch's share of the byte budget, held until the broker has answered for it.
    held: Reservation,
    done: oneshot::Sender<Result<(), KafkaError>>,
}

impl Job {
    /// Takes the job for publishing, unless its request gave up on it.
    fn take(&self) -> bool {
        self.state
            .compare_exchange(WAITING, TAKEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// The bounded queue and its workers.
pub struct Ingest {
    queue: mpsc::Sender<Job>,
    budget: Arc<ByteBudget>,
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
            budget: ByteBudget::new(settings.max_buffered_bytes),
            ack_timeout: settings.ack_timeout,
        })
    }

    /// Room for a request body of `declared` bytes (its `Content-Length`; the largest body
    /// allowed when it has none), taken before the body is read: `QueueFull` when the ingest
    /// holds all it may.
    pub fn reserve(&self, declared: Option<usize>) -> Result<Reservation, IngestError> {
        let bytes = declared.unwrap_or(MAX_BATCH_BYTES).min(MAX_BATCH_BYTES);
        self.budget
            .reserve(bytes)
            .ok_or_else(|| IngestError::QueueFull.counted())
    }

    /// Queues `events` of `user` and waits until the broker has them; returns the batch id
    /// (derived from `idempotency_key` when there is one). `held` is the room reserved for the
    /// request's body; it goes with the batch.
    pub async fn submit(
        &self,
        user: Uuid,
        idempotency_key: Option<&str>,
        events: Vec<TelemetryEvent>,
        held: Reservation,
    ) -> Result<Uuid, IngestError> {
        self.try_submit(user, idempotency_key, events, held)
            .await
            .map_err(IngestError::counted)
    }

    async fn try_submit(
        &self,
        user: Uuid,
        idempotency_key: Option<&str>,
        events: Vec<TelemetryEvent>,
        mut held: Reservation,
    ) -> Result<Uuid, IngestError> {
        let count = events.len() as u64;
        let batch_id = match idempotency_key {
            Some(key) => keyed_batch_id(user, key, &events)?,
            None => Uuid::now_v7(),
        };
        let batch = TelemetryBatch {
            batch_id,
            user_id: user,
            received_at: OffsetDateTime::now_utc(),
            events,
        };
        let received_at = batch.received_at;
        let payload = encode(&batch)?;
        drop(batch);
        held.shrink_to(payload.len());
        let state = Arc::new(AtomicU8::new(WAITING));
        let (done, mut acknowledged) = oneshot::channel();
        self.queue
            .try_send(Job {
                batch_id,
                user_id: user,
                received_at,
                payload,
                state: state.clone(),
                held,
                done,
            })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => IngestError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => IngestError::Stopping,
            })?;
        metrics::gauge!(QUEUE_DEPTH_METRIC)
            .set((self.queue.max_capacity() - self.queue.capacity()) as f64);
        let given_up = || {
            state
                .compare_exchange(WAITING, GIVEN_UP, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        };
        let outcome = match tokio::time::timeout(self.ack_timeout, &mut acknowledged).await {
            Ok(outcome) => outcome,
            // Still queued: it is dropped unpublished, so this 503 means "not kept".
            Err(_) if given_up() => return Err(IngestError::Expired),
            // A worker has it: the producer reports on it within its own bound.
            Err(_) => tokio::time::timeout(self.ack_timeout + REPORT_GRACE, acknowledged)
                .await
                .map_err(|_| IngestError::NotAcknowledged)?,
        };
        match outcome {
            Ok(Ok(())) => {
                metrics::counter!(ACCEPTED_BATCHES_METRIC).increment(1);
                metrics::counter!(ACCEPTED_EVENTS_METRIC).increment(count);
                Ok(batch_id)
            }
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "a telemetry batch was not acknowledged");
                Err(IngestError::NotAcknowledged)
            }
            // The job was dropped unanswered: the queue closed before a worker took it.
            Err(_) if given_up() => Err(IngestError::Stopping),
            Err(_) => Err(IngestError::NotAcknowledged),
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
        // A job whose request has given up (and answered 503) is dropped, never published.
        taken.retain(Job::take);
        if taken.is_empty() {
            continue;
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
    let Job {
        batch_id,
        user_id,
        received_at,
        payload,
        held,
        done,
        ..
    } = job;
    let envelope = Envelope {
        id: batch_id,
        source: "/taskstream/analysis".into(),
        event_type: TelemetryBatch::TYPE.into(),
        subject: user_id.to_string(),
        time: received_at,
        traceparent: None,
    };
    let key = user_id.to_string();
    let enqueued = producer
        .send_result(
            FutureRecord::to(TelemetryBatch::TOPIC.name)
                .key(&key)
                .payload(&payload)
                .headers(envelope.to_headers()),
        )
        .map_err(|(err, _)| err);
    // librdkafka holds its own copy from here on.
    drop(payload);
    let outcome = match enqueued {
        Ok(delivery) => match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((err, _))) => Err(err),
            Err(_) => Err(KafkaError::Canceled),
        },
        Err(err) => Err(err),
    };
    drop(held);
    let failed = outcome.as_ref().err().cloned();
    let _ = done.send(outcome);
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
            json!([{"name": "app.open", "at": "2026-12-01T11:59:00Z", "props": {"plan": "pro", "n": 3, "ok": true, "x": null}}]),
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
            json!([
                {"name": "Bad Name", "at": "yesterday", "props": {"nested": {"a": 1}}},
                {"name": "ok", "at": "2020-01-01T00:00:00Z", "extra": 1},
                "not an object",
                {"name": "ok", "at": "2026-12-01T11:59:00Z", "props": {"t": "a\u{0}b", "UPPER": 1}},
            ]),
            now(),
        )
        .unwrap_err();
        let fields: Vec<&str> = broken.listed.iter().map(|b| b.field.as_str()).collect();
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
        assert_eq!(broken.total, 8);
    }

    #[test]
    fn the_batch_itself_must_be_an_array_of_1_to_500() {
        for body in [json!({"name": "x"}), json!([]), json!(vec![json!({}); 501])] {
            let broken = parse_batch(body.clone(), now()).unwrap_err();
            assert_eq!(broken.listed[0].field, "body", "{body}");
        }
    }

    #[test]
    fn a_batch_broken_everywhere_lists_the_first_fields_and_counts_the_rest() {
        let mut event = json!({"name": "Bad", "at": "x", "props": {"BAD": [], "ok": 1}});
        event
            .as_object_mut()
            .unwrap()
            .insert("K".repeat(10_000), json!(1));
        let broken = parse_batch(json!(vec![event; 500]), now()).unwrap_err();
        // An unknown field, name, at, and a property with a bad key and a bad value: 5 an event.
        assert_eq!(broken.total, 500 * 5);
        assert_eq!(broken.listed.len(), MAX_LISTED_BROKEN_FIELDS);
        assert_eq!(broken.unlisted(), 500 * 5 - MAX_LISTED_BROKEN_FIELDS);
        // A client's key is repeated cut short.
        assert_eq!(
            broken.listed[0].field,
            format!("events[0].{}…", "K".repeat(MAX_ECHOED_KEY_CHARS))
        );
        assert_eq!(broken.listed[3].field, "events[0].props.BAD");
        assert_eq!(broken.listed[4].field, "events[0].props.BAD");
    }

    #[test]
    fn a_keyed_batch_id_depends_on_the_user_the_key_and_the_events() {
        let user = Uuid::now_v7();
        let events = parse_batch(
            json!([{"name": "a", "at": "2026-12-01T11:59:00Z", "props": {"x": 1, "b": "y"}}]),
            now(),
        )
        .unwrap();
        let id = keyed_batch_id(user, "k1", &events).unwrap();
        assert_eq!(id.get_version_num(), 8);
        // The same events written in another order or spacing are the same batch.
        let respaced = parse_batch(
            serde_json::from_str(
                r#"[ {"props": {"b": "y", "x": 1}, "at": "2026-12-01T11:59:00Z", "name": "a"} ]"#,
            )
            .unwrap(),
            now(),
        )
        .unwrap();
        assert_eq!(keyed_batch_id(user, "k1", &respaced).unwrap(), id);
        assert_ne!(keyed_batch_id(user, "k2", &events).unwrap(), id);
        assert_ne!(keyed_batch_id(Uuid::now_v7(), "k1", &events).unwrap(), id);
        let other =
            parse_batch(json!([{"name": "b", "at": "2026-12-01T11:59:00Z"}]), now()).unwrap();
        assert_ne!(keyed_batch_id(user, "k1", &other).unwrap(), id);
    }

    #[test]
    fn the_byte_budget_gives_room_back_when_a_reservation_ends() {
        let budget = ByteBudget::new(300);
        let mut first = budget.reserve(200).unwrap();
        assert!(budget.reserve(200).is_none(), "over the budget");
        first.shrink_to(50);
        let second = budget.reserve(250).unwrap();
        assert_eq!(budget.held(), 300);
        drop(first);
        drop(second);
        assert_eq!(budget.held(), 0);
    }
}
