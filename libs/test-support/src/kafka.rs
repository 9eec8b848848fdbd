//! Reading and writing topics the way a product team's consumer would, to check what services
//! publish: every record with its key, headers and JSON payload.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use serde_json::Value;

/// A record as read from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: HashMap<String, String>,
    /// The value as JSON; `null` when it is not JSON.
    pub payload: Value,
    pub raw_payload: Vec<u8>,
}

/// Reads `topic` from the beginning (a consumer group of its own, committing nothing) until
/// `enough` says the records so far suffice, or `limit` passes; returns what was read.
pub async fn read_topic(
    bootstrap_servers: &str,
    topic: &str,
    limit: Duration,
    enough: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    read_topic_lingering(bootstrap_servers, topic, limit, enough, Duration::ZERO).await
}

/// [`read_topic`], then reading on for `linger` once `enough` holds, to catch what should not
/// be there (a duplicate arriving late, say).
pub async fn read_topic_lingering(
    bootstrap_servers: &str,
    topic: &str,
    limit: Duration,
    enough: impl Fn(&[Record]) -> bool,
    linger: Duration,
) -> Vec<Record> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("group.id", crate::unique_name("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("log_level", "3")
        .create()
        .expect("a test consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut deadline = Instant::now() + limit;
    let mut lingering = false;
    let mut records = Vec::new();
    while Instant::now() < deadline {
        if !lingering && enough(&records) {
            if linger.is_zero() {
                break;
            }
            lingering = true;
            deadline = Instant::now() + linger;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(received) = tokio::time::timeout(remaining, consumer.recv()).await else {
            break;
        };
        let message = received.expect("read from the broker");
        let raw_payload = message.payload().unwrap_or_default().to_vec();
        records.push(Record {
            partition: message.partition(),
            offset: message.offset(),
            key: message
                .key()
                .map(|key| String::from_utf8_lossy(key).into_owned()),
            headers: message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|header| {
                            (
                                header.key.to_owned(),
                                String::from_utf8_lossy(header.value.unwrap_or_default())
                                    .into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            payload: serde_json::from_slice(&raw_payload).unwrap_or(Value::Null),
            raw_payload,
        });
    }
    // Closing a consumer with unread data can hang (see TOOLING): bounded.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::task::spawn_blocking(move || drop(consumer)),
    )
    .await;
    records
}

/// Whether `topic` holds no message at all, asked of the broker directly (its watermarks): unlike
/// reading, this cannot miss what a slow group join would. Only emptiness: the local broker
/// reports a high watermark that ignores all but the first record of the last batch, so the
/// difference is no count.
pub fn topic_is_empty(bootstrap_servers: &str, topic: &str) -> bool {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("log_level", "3")
        .create()
        .expect("a test client");
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .unwrap_or_else(|err| panic!("metadata of {topic}: {err}"));
    let partitions = metadata
        .topics()
        .iter()
        .find(|found| found.name() == topic)
        .unwrap_or_else(|| panic!("{topic} does not exist"))
        .partitions()
        .len() as i32;
    (0..partitions).all(|partition| {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .unwrap_or_else(|err| panic!("watermarks of {topic}/{partition}: {err}"));
        high == low
    })
}
