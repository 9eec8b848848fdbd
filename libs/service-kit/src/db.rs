//! Database routing: a writer pool on the primary and a reader pool on a streaming replica.
//!
//! Plain reads go to the replica while it is up and close enough behind; otherwise they go to
//! the primary, and `db_replica_fallback_total` counts each one. A background monitor probes the
//! replica every `DATABASE_REPLICA_CHECK_INTERVAL_MS`, so a dead or lagging replica is skipped
//! within a second and taken back as soon as it is healthy. A read that fails on the replica with
//! a connection error is retried once on the primary, so the caller never sees the outage.
//!
//! Writes, transactions and reads that must see the caller's own latest write use the writer.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres};

use crate::config::DatabaseConfig;
use crate::metrics as names;

/// Replay lag in seconds; 0 when everything received has been replayed (an idle replica is not
/// "behind" just because nothing was written lately) or when the server is not a replica at all.
const REPLICA_LAG_SQL: &str = "SELECT CASE \
     WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
     ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END::float8";

/// Upper bound on one health probe, so a hung replica is noticed as fast as a dead one.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{variable} is not a usable PostgreSQL URL: {source}")]
    InvalidUrl {
        variable: &'static str,
        source: sqlx::Error,
    },
    /// The database could not be reached, or no connection was free in time: worth a retry later.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// The database answered with an error.
    #[error("database error: {0}")]
    Query(sqlx::Error),
}

impl From<sqlx::Error> for DbError {
    fn from(err: sqlx::Error) -> Self {
        if is_connection_error(&err) {
            DbError::Unavailable(err)
        } else {
            DbError::Query(err)
        }
    }
}

/// Errors that say "this server or connection is gone", as opposed to "this query is wrong".
pub fn is_connection_error(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Class 08: connection exceptions; 57P01-03: server shutting down or starting up.
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Which server answered a read, as reported by `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadTarget {
    Replica,
    Primary,
}

/// Handle to both pools; cheap to clone.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    writer: PgPool,
    replica: Option<Replica>,
}

struct Replica {
    pool: ArcSwap<PgPool>,
    connect_options: PgConnectOptions,
    pool_options: PgPoolOptions,
    in_use: AtomicBool,
    max_lag: Duration,
    check_interval: Duration,
}

impl Database {
    /// Builds both pools without connecting: the service starts even while a database is down,
    /// and `/readyz` says so until it is back.
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<Self, DbError> {
        let pool_options = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(0)
            .acquire_timeout(config.acquire_timeout)
            // A ping per acquire costs ~30% throughput; a dead connection instead fails its query,
            // which reads retry on the primary and writes report as 503.
            .test_before_acquire(false);
        let writer = pool_options.clone().connect_lazy_with(parse_url(
            "DATABASE_WRITER_URL",
            &config.writer_url,
            config.statement_timeout,
        )?);
        let replica = match &config.reader_url {
            None => None,
            Some(url) => {
                let connect_options =
                    parse_url("DATABASE_READER_URL", url, config.statement_timeout)?;
                Some(Replica {
                    pool: ArcSwap::from_pointee(
                        pool_options
                            .clone()
                            .connect_lazy_with(connect_options.clone()),
                    ),
                    connect_options,
                    pool_options,
                    // Optimistic until the first probe says otherwise; a failed read falls back anyway.
                    in_use: AtomicBool::new(true),
                    max_lag: config.replica_max_lag,
                    check_interval: config.replica_check_interval,
                })
            }
        };
        metrics::gauge!(names::DB_REPLICA_IN_USE).set(if replica.is_some() { 1.0 } else { 0.0 });
        Ok(Self {
            inner: Arc::new(Inner { writer, replica }),
        })
    }

    /// The primary's pool, for transactions (`writer_pool().begin()`) and streaming queries.
    pub fn writer_pool(&self) -> &PgPool {
        &self.inner.writer
    }

    /// Runs `op` on a connection to the primary.
    pub async fn write<T, F, Fut>(&self, op: F) -> Result<T, DbError>
    where
        F: FnOnce(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        run_timed(&self.inner.writer, "writer", op)
            .await
            .map_err(DbError::from)
    }

    /// Runs `op` on the replica when it is usable, else on the primary. `op` may run twice (once
    /// per server) if the replica fails mid-way, so it must be a read.
    pub async fn read<T, F, Fut>(&self, op: F) -> Result<T, DbError>
    where
        F: Fn(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        if let Some(replica) = &self.inner.replica {
            if replica.in_use.load(Ordering::Relaxed) {
                let pool = replica.pool.load_full();
                match run_timed(&pool, "reader", &op).await {
                    Err(err) if is_connection_error(&err) => {
                        replica.mark_unusable(&format!("read failed: {err}"));
                        metrics::counter!(names::DB_REPLICA_FALLBACK, "reason" => "read_failed")
                            .increment(1);
                    }
                    result => return result.map_err(DbError::from),
                }
            } else {
                metrics::counter!(names::DB_REPLICA_FALLBACK, "reason" => "replica_unusable")
                    .increment(1);
            }
        }
        run_timed(&self.inner.writer, "writer", op)
            .await
            .map_err(DbError::from)
    }

    /// Where plain reads go right now.
    pub fn read_target(&self) -> ReadTarget {
        match &self.inner.replica {
            Some(replica) if replica.in_use.load(Ordering::Relaxed) => ReadTarget::Replica,
            _ => ReadTarget::Primary,
        }
    }

    /// Whether a replica is configured at all.
    pub fn has_replica(&self) -> bool {
        self.inner.replica.is_some()
    }

    /// A round trip to the primary, for readiness.
    pub async fn ping_writer(&self, timeout: Duration) -> Result<(), DbError> {
        let select_one =
            self.write(|mut conn| async move { sqlx::query("SELECT 1").execute(&mut *conn).await });
        match tokio::time::timeout(timeout, select_one).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(DbError::Unavailable(sqlx::Error::PoolTimedOut)),
        }
    }

    /// Starts the replica monitor (no-op without a replica). It runs until the process exits.
    pub fn spawn_replica_monitor(&self) {
        if self.inner.replica.is_none() {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let Some(replica) = &inner.replica else {
                return;
            };
            let mut ticker = tokio::time::interval(replica.check_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                replica.check().await;
            }
        });
    }

    /// Publishes pool sizes; called when `/metrics` is scraped so the numbers are current.
    pub fn record_pool_gauges(&self) {
        let mut pools = vec![("writer", self.inner.writer.clone())];
        if let Some(replica) = &self.inner.replica {
            pools.push(("reader", (*replica.pool.load_full()).clone()));
        }
        for (label, pool) in pools {
            let size = pool.size() as f64;
            metrics::gauge!(names::DB_POOL_SIZE, "pool" => label).set(size);
            metrics::gauge!(names::DB_POOL_IN_USE, "pool" => label)
                .set(size - pool.num_idle() as f64);
            metrics::gauge!(names::DB_POOL_MAX, "pool" => label)
                .set(f64::from(pool.options().get_max_connections()));
        }
    }

    /// Closes both pools, waiting for lent connections to come back.
    pub async fn close(&self) {
        if let Some(replica) = &self.inner.replica {
            replica.pool.load().close().await;
        }
        self.inner.writer.close().await;
    }
}

impl Replica {
    async fn check(&self) {
        let was_in_use = self.in_use.load(Ordering::Relaxed);
        let lag = if was_in_use {
            let pool = self.pool.load_full();
            tokio::time::timeout(
                PROBE_TIMEOUT,
                sqlx::query_scalar::<_, f64>(REPLICA_LAG_SQL).fetch_one(&*pool),
            )
            .await
        } else {
            // While out of use, probe on a fresh connection: pooled ones may be dead sockets.
            tokio::time::timeout(PROBE_TIMEOUT, async {
                let mut conn = PgConnection::connect_with(&self.connect_options).await?;
                let lag = sqlx::query_scalar::<_, f64>(REPLICA_LAG_SQL)
                    .fetch_one(&mut conn)
                    .await;
                let _ = conn.close().await;
                lag
            })
            .await
        };
        let verdict = match lag {
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
            Ok(Err(err)) => Err(err.to_string()),
            Ok(Ok(lag)) => {
                metrics::gauge!(names::DB_REPLICA_LAG).set(lag);
                if lag > self.max_lag.as_secs_f64() {
                    Err(format!("lag {lag:.3}s exceeds {:?}", self.max_lag))
                } else {
                    Ok(())
                }
            }
        };
        match (verdict, was_in_use) {
            (Err(reason), true) => self.mark_unusable(&reason),
            (Ok(()), false) => {
                // Fresh pool: connections of the old one may point at the dead server process.
                let fresh = self
                    .pool_options
                    .clone()
                    .connect_lazy_with(self.connect_options.clone());
                let old = self.pool.swap(Arc::new(fresh));
                tokio::spawn(async move { old.close().await });
                self.in_use.store(true, Ordering::Relaxed);
                metrics::gauge!(names::DB_REPLICA_IN_USE).set(1.0);
                tracing::info!("replica healthy again: reads go back to it");
            }
            _ => {}
        }
    }

    fn mark_unusable(&self, reason: &str) {
        if self.in_use.swap(false, Ordering::Relaxed) {
            metrics::gauge!(names::DB_REPLICA_IN_USE).set(0.0);
            tracing::warn!(reason, "replica unusable: reads fall back to the primary");
        }
    }
}

fn parse_url(
    variable: &'static str,
    url: &str,
    statement_timeout: Duration,
) -> Result<PgConnectOptions, DbError> {
    url.parse::<PgConnectOptions>()
        .map(|options| {
            options.options([(
                "statement_timeout",
                statement_timeout.as_millis().to_string(),
            )])
        })
        .map_err(|source| DbError::InvalidUrl { variable, source })
}

/// Acquires a connection from `pool` and runs `op` on it, recording pool wait and query time.
async fn run_timed<T, F, Fut>(pool: &PgPool, label: &'static str, op: F) -> Result<T, sqlx::Error>
where
    F: FnOnce(PoolConnection<Postgres>) -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let waiting = Instant::now();
    let conn = pool.acquire().await?;
    metrics::histogram!(names::DB_POOL_WAIT, "pool" => label).record(waiting.elapsed());
    let running = Instant::now();
    let result = op(conn).await;
    metrics::histogram!(names::DB_QUERY_DURATION, "pool" => label).record(running.elapsed());
    result
}
