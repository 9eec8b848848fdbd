//! Broker reachability: a Kafka metadata request with a deadline, for the dependency checks
//! (`/healthz/dependencies`, `dependency_up`).
//!
//! It speaks the real Kafka protocol through librdkafka, so "reachable" means a broker answered,
//! not merely that a port accepted a TCP connection.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::config::BrokerConfig;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("KAFKA_BOOTSTRAP_SERVERS: cannot create a Kafka client: {0}")]
    Client(String),
    #[error("broker unreachable: {0}")]
    Unreachable(String),
}

/// A long-lived client whose only job is to ask the cluster for its metadata.
#[derive(Clone)]
pub struct BrokerProbe {
    client: Arc<BaseConsumer>,
    timeout: Duration,
}

impl BrokerProbe {
    pub fn new(config: &BrokerConfig) -> Result<Self, BrokerError> {
        let client = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap_servers)
            .set("socket.timeout.ms", config.timeout.as_millis().to_string())
            // librdkafka's own reconnect chatter would flood the logs while the broker is down;
            // the dependency checks report the outage instead.
            .set("log_level", "3")
            .create::<BaseConsumer>()
            .map_err(|err| BrokerError::Client(err.to_string()))?;
        Ok(Self {
            client: Arc::new(client),
            timeout: config.timeout,
        })
    }

    /// Returns the number of brokers in the cluster, or why none answered in time.
    pub async fn check(&self) -> Result<usize, BrokerError> {
        let client = self.client.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || client.fetch_metadata(None, timeout))
            .await
            .map_err(|err| BrokerError::Unreachable(err.to_string()))?
            .map(|metadata| metadata.brokers().len())
            .map_err(|err| BrokerError::Unreachable(err.to_string()))
    }
}
