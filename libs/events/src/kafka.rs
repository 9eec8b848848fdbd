//! Kafka client settings shared by the relay and the consumers.

use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

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
