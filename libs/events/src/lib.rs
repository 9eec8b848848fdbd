//! Events between services, over Kafka, the same way everywhere.
//!
//! - [`catalog`]: the public contract: topics, event types and their payloads, JSON Schemas and
//!   the AsyncAPI document (`libs/events/asyncapi.json`) generated from them;
//! - [`envelope`]: CloudEvents in binary mode: `ce_*` headers, JSON data, W3C trace context;
//! - [`outbox`]: producing: an event is written to the service's `outbox` table in the same
//!   transaction as the change, and a relay publishes it (idempotent producer, acks=all), one
//!   relay per service at a time;
//! - [`consumer`]: consuming: consumer groups, offsets stored once an event is applied and
//!   committed in the background, an event id applied once, partitions applied concurrently in
//!   batches, outages waited out, other failures retried, then `<topic>.dlq` with the reason;
//! - [`kafka`]: client settings shared by all of the above.
//!
//! Everything but the catalog needs the `kafka` feature (on by default).

pub mod catalog;
#[cfg(feature = "kafka")]
pub mod consumer;
#[cfg(feature = "kafka")]
pub mod envelope;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "kafka")]
pub mod outbox;

/// Metric names of the event machinery (every series also carries `service`).
pub mod metric_names {
    /// Events waiting in the outbox to be published (counted up to a million).
    pub const OUTBOX_PENDING: &str = "outbox_pending";
    /// Age of the oldest event waiting in the outbox, in seconds (0 when none waits).
    pub const OUTBOX_OLDEST_PENDING: &str = "outbox_oldest_pending_seconds";
    /// Seconds from an event's write (its statement's or transaction's start) until the broker
    /// acknowledged it and the relay marked it published.
    pub const OUTBOX_PUBLISH_DELAY: &str = "outbox_publish_delay_seconds";
    /// Events published from the outbox, by `topic`.
    pub const EVENTS_PUBLISHED: &str = "events_published_total";
    /// Events applied by a consumer, by `topic`.
    pub const EVENTS_CONSUMED: &str = "events_consumed_total";
    /// Events skipped because their id was applied before, by `topic`.
    pub const EVENTS_DUPLICATE: &str = "events_duplicate_total";
    /// Handler attempts that failed and were retried, by `topic`.
    pub const EVENT_RETRIES: &str = "event_retries_total";
    /// Attempts that failed because a dependency was unavailable (retried until it is back), by
    /// `topic`.
    pub const EVENT_UNAVAILABLE_RETRIES: &str = "event_unavailable_retries_total";
    /// Partitions held back right now by an unavailable dependency, by `topic`.
    pub const CONSUMER_PARTITIONS_STALLED: &str = "consumer_partitions_stalled";
    /// Events sent to the dead-letter topic, by `topic` (the original one).
    pub const EVENTS_DEAD_LETTERED: &str = "events_dead_lettered_total";
    /// Messages behind the end of the partition, by `topic`, `partition` and `group`.
    pub const KAFKA_CONSUMER_LAG: &str = "kafka_consumer_lag";
}
