//! Prometheus metrics: the recorder behind the `metrics` facade, and the names every service shares.
//!
//! Names follow Prometheus conventions (`_total` counters, `_seconds` histograms) and every series
//! carries a `service` label, so one dashboard serves all four services.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests served, by `method`, `route` (the route pattern, never the raw path) and `status`.
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// Requests answered with a 5xx (including timeouts), by `method` and `route`.
pub const HTTP_ERRORS: &str = "http_request_errors_total";
/// Time from request head to response head, by `method` and `route`.
pub const HTTP_DURATION: &str = "http_request_duration_seconds";
/// Connections open in a pool, by `pool` (`writer` or `reader`).
pub const DB_POOL_SIZE: &str = "db_pool_connections";
/// Connections lent out of a pool right now, by `pool`.
pub const DB_POOL_IN_USE: &str = "db_pool_connections_in_use";
/// The pool's upper bound, by `pool`.
pub const DB_POOL_MAX: &str = "db_pool_connections_max";
/// Time spent waiting for a pooled connection, by `pool`.
pub const DB_POOL_WAIT: &str = "db_pool_acquire_seconds";
/// Time a query (or a unit of work on one connection) took, by `pool`.
pub const DB_QUERY_DURATION: &str = "db_query_duration_seconds";
/// Reads served by the primary because the replica was down, lagging or failed, by `reason`.
pub const DB_REPLICA_FALLBACK: &str = "db_replica_fallback_total";
/// 1 while reads go to the replica, 0 while they fall back to the primary.
pub const DB_REPLICA_IN_USE: &str = "db_replica_in_use";
/// Replay lag of the replica as last measured, in seconds.
pub const DB_REPLICA_LAG: &str = "db_replica_lag_seconds";
/// Access tokens refused, by `reason` (`expired`, `invalid`, `unknown_key`, ...).
pub const ACCESS_TOKENS_REJECTED: &str = "access_tokens_rejected_total";
/// Jobs waiting in a worker pool's queue, by `pool`.
pub const WORKER_POOL_QUEUE_DEPTH: &str = "worker_pool_queue_depth";
/// Threads of a worker pool, by `pool`.
pub const WORKER_POOL_WORKERS: &str = "worker_pool_workers";
/// Time a job waited in the queue before a worker took it, by `pool`.
pub const WORKER_POOL_WAIT: &str = "worker_pool_wait_seconds";
/// Jobs refused because the queue was full (answered 503), by `pool`.
pub const WORKER_POOL_REJECTED: &str = "worker_pool_rejected_total";

/// Rows deleted by housekeeping, by `sweep` (`outbox`, `processed_events`, ...).
pub const HOUSEKEEPING_DELETED: &str = "housekeeping_deleted_total";

/// Latency buckets from 1 ms to 10 s: fine below 100 ms where the targets are.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the process-wide recorder; returns the handle that renders `/metrics`.
pub fn install(service_name: &'static str) -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .add_global_label("service", service_name)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|err| err.to_string())?
        .install_recorder()
        .map_err(|err| err.to_string())
}
