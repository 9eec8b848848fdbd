//! Kafka client settings shared by the relay and the consumers, and creating the catalog's
//! topics (the local stack and tests; in a cluster Strimzi's KafkaTopic resources do it).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::catalog::{dead_letter_topic, TOPICS};

/// Settings every client starts from.
pub fn client_config(bootstrap_servers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap_servers)
        // Outages are reported through readiness and metrics; librdkafka's reconnect chatter
        // would flood the logs.
        .set("log_level", "3");
    config
}

/// A producer that neither loses nor duplicates what it accepted: idempotent, acknowledged by
/// all in-sync replicas, and never giving up on a message while the broker is away (the outbox
/// relies on that to keep each key's events in order).
pub fn producer(bootstrap_servers: &str) -> Result<FutureProducer, KafkaError> {
    client_config(bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "5")
        .create()
}

/// The catalog's topics with `partitions` each, and their dead-letter topics (one partition).
pub fn catalog_topics(partitions: i32) -> Vec<(String, i32)> {
    TOPICS
        .iter()
        .flat_map(|topic| {
            [
                (topic.name.to_owned(), partitions),
                (dead_letter_topic(topic.name), 1),
            ]
        })
        .collect()
}

/// Creates `topics` (name, partitions) with replication 1 unless they exist.
pub async fn ensure_topics(
    bootstrap_servers: &str,
    topics: &[(String, i32)],
    timeout: Duration,
) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = client_config(bootstrap_servers)
        .create()
        .map_err(|err| format!("admin client: {err}"))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|err| format!("create topics: {err}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("create topic {topic}: {code}")),
        }
    }
    Ok(())
}
