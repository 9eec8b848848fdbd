//! Database routing: a writer pool on the primary and a reader pool on a streaming replica.
//!
//! Plain reads go to the replica while it is up and close enough behind; otherwise they go to
//! the primary, and `db_replica_fallback_total` counts each one. A background monitor probes the
//! replica every `DATABASE_REPLICA_CHECK_INTERVAL_MS`, so a dead or lagging replica is skipped
//! within 1.5 s (at the default interval) and taken back once healthy. The monitor gives up on the replica
//! only after two bad probes in a row: one slow answer on a busy host, or a lag reading taken in
//! the instant between a commit arriving and its replay, is not an outage. A read that fails on
//! the replica with a connection error is retried once on the primary, so the caller never sees
//! the outage, and moves reads away at once.
//!
//! Writes and transactions use the writer. Read-your-writes: a committed transaction returns its
//! position in the write-ahead log ([`Lsn`]), which services hand to the client as a consistency
//! token; a read given such a token goes to the replica only once the replica has replayed at
//! least that far, and to the primary until then.
//!
//! Tracing: below the caller's span, the wait for a connection is a `db.acquire` span and the
//! work on it a `db.query` span (both with `pool` = `writer` or `reader`), or, for
//! [`Database::transaction`], a `db.transaction` span ending in `db.commit` (commit and the
//! read of the WAL position); the storage layers' statement spans hang below those. Outside any
//! span (gauges, housekeeping, pollers) there are none: background work starts no trace of its
//! own. A failure marks the span's OpenTelemetry status with its kind or SQLSTATE only, never
//! the server's message (which can quote values).

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use opentelemetry::trace::Status;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres};
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::DatabaseConfig;
use crate::metrics as names;

/// Replay lag in seconds, and how far the server has replayed (its own WAL position when it is
/// not a replica at all). Lag is 0 when everything received has been replayed: an idle replica
/// is not "behind" just because nothing was written lately.
const REPLICA_STATE_SQL: &str = "SELECT CASE \
     WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0 \
     ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0) END::float8, \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
      ELSE pg_current_wal_insert_lsn() END - '0/0'::pg_lsn)::int8";

/// The primary's WAL insert position: after a commit returns, it lies at or past the commit
/// record, so a replica that has replayed this far sees the commit (flushed or not).
const INSERT_LSN_SQL: &str = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8";

/// Upper bound on one health probe, so a hung replica is noticed as fast as a dead one.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// The `reason`s of `db_replica_fallback_total`.
const FALLBACK_REASONS: [&str; 4] = [
    "replica_unusable",
    "read_your_writes",
    "read_failed",
    "missing_on_replica",
];

/// Bad probes in a row after which the replica in use is given up.
const BAD_PROBES_TO_GIVE_UP: u32 = 2;

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

/// Errors worth retrying unchanged later: the server or connection is away, the pool had no
/// connection in time, the server is overloaded, or the transaction lost a race (serialization
/// failure, deadlock, lock timeout). They say nothing about the statement itself.
pub fn is_transient(err: &sqlx::Error) -> bool {
    if is_connection_error(err) {
        return true;
    }
    match err {
        // 40001 serialization_failure, 40P01 deadlock_detected, 55P03 lock_not_available,
        // 53xxx insufficient resources (too many connections, out of memory or disk),
        // 57014 query_canceled (the statement timeout on an overloaded server),
        // 25006 read_only_sql_transaction (connected to a primary that was just demoted).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            matches!(&*code, "40001" | "40P01" | "55P03" | "57014" | "25006")
                || code.starts_with("53")
        }),
        _ => false,
    }
}

/// A position in the primary's write-ahead log, written like PostgreSQL does (`16/B374D848`).
/// Clients treat it as an opaque consistency token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a consistency token (expected two hexadecimal parts like 16/B374D848)")]
pub struct InvalidLsn;

impl FromStr for Lsn {
    type Err = InvalidLsn;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (high, low) = text.trim().split_once('/').ok_or(InvalidLsn)?;
        let part = |hex: &str| u32::from_str_radix(hex, 16).map_err(|_| InvalidLsn);
        Ok(Lsn((u64::from(part(high)?) << 32) | u64::from(part(low)?)))
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
    /// Bad probes in a row while in use (only the monitor task touches it).
    bad_probes: AtomicU32,
    /// WAL position the replica had replayed at the last probe.
    replayed: AtomicU64,
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
                    bad_probes: AtomicU32::new(0),
                    // Unknown until the first probe: reads with a consistency token use the primary.
                    replayed: AtomicU64::new(0),
                    max_lag: config.replica_max_lag,
                    check_interval: config.replica_check_interval,
                })
            }
        };
        metrics::gauge!(names::DB_REPLICA_IN_USE).set(if replica.is_some() { 1.0 } else { 0.0 });
        if replica.is_some() {
            // Every reason at 0 from the start: a counter that first appears at 1 has no rate()
            // in Prometheus, so the first fallbacks would neither alert nor show.
            for reason in FALLBACK_REASONS {
                metrics::counter!(names::DB_REPLICA_FALLBACK, "reason" => reason).increment(0);
            }
        }
        Ok(Self {
            inner: Arc::new(Inner { writer, replica }),
        })
    }

    /// The primary's pool, for transactions (`writer_pool().begin()`) and streaming queries.
    pub fn writer_pool(&self) -> &PgPool {
        &self.inner.writer
    }

    /// A connection to the primary, for work that manages its own transaction; the wait for it
    /// is recorded like every other.
    pub async fn writer_connection(&self) -> Result<PoolConnection<Postgres>, DbError> {
        Ok(acquire(&self.inner.writer, "writer").await?)
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
        self.read_after(None, op).await
    }

    /// Like [`Self::read`], but the answer reflects every write up to `token` (read-your-writes):
    /// the replica serves it only if it had replayed that far at its last probe.
    pub async fn read_after<T, F, Fut>(&self, token: Option<Lsn>, op: F) -> Result<T, DbError>
    where
        F: Fn(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.route_read(token, &op).await.map(|(value, _)| value)
    }

    /// Like [`Self::read_after`] for a lookup that may find nothing: a miss on the replica is
    /// confirmed on the primary, since the row may just not be replayed yet (created a moment ago,
    /// perhaps from another device, without a consistency token). Misses are rare, so this costs
    /// little, and "not found" is never an artefact of replication lag.
    pub async fn read_one<T, F, Fut>(&self, token: Option<Lsn>, op: F) -> Result<Option<T>, DbError>
    where
        F: Fn(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<Option<T>, sqlx::Error>>,
    {
        match self.route_read(token, &op).await? {
            (None, ReadTarget::Replica) => {
                metrics::counter!(names::DB_REPLICA_FALLBACK, "reason" => "missing_on_replica")
                    .increment(1);
                run_timed(&self.inner.writer, "writer", op)
                    .await
                    .map_err(DbError::from)
            }
            (found, _) => Ok(found),
        }
    }

    /// Runs a read where it belongs and says which server answered.
    async fn route_read<T, F, Fut>(
        &self,
        token: Option<Lsn>,
        op: &F,
    ) -> Result<(T, ReadTarget), DbError>
    where
        F: Fn(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        if let Some(replica) = &self.inner.replica {
            let skip_reason = if !replica.in_use.load(Ordering::Relaxed) {
                Some("replica_unusable")
            } else if token.is_some_and(|token| replica.replayed() < token) {
                Some("read_your_writes")
            } else {
                None
            };
            match skip_reason {
                None => {
                    let pool = replica.pool.load_full();
                    match run_timed(&pool, "reader", op).await {
                        Err(err) if is_connection_error(&err) => {
                            replica.mark_unusable(&format!("read failed: {err}"));
                            metrics::counter!(names::DB_REPLICA_FALLBACK, "reason" => "read_failed")
                                .increment(1);
                        }
                        result => {
                            return result
                                .map(|value| (value, ReadTarget::Replica))
                                .map_err(DbError::from)
                        }
                    }
                }
                Some(reason) => {
                    metrics::counter!(names::DB_REPLICA_FALLBACK, "reason" => reason).increment(1)
                }
            }
        }
        run_timed(&self.inner.writer, "writer", op)
            .await
            .map(|value| (value, ReadTarget::Primary))
            .map_err(DbError::from)
    }

    /// Runs `op` in a transaction on the primary and commits it; returns `op`'s value and the WAL
    /// position that reflects the commit (the client's consistency token). An error from `op`
    /// rolls the transaction back.
    pub async fn transaction<T, E, F>(&self, op: F) -> Result<(T, Lsn), E>
    where
        E: From<DbError>,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, E>>,
    {
        let mut conn = acquire(&self.inner.writer, "writer")
            .await
            .map_err(DbError::from)?;
        let span = stage_span(|| tracing::info_span!("db.transaction", pool = "writer"));
        let running = Instant::now();
        let committed = async {
            let mut tx = conn.begin().await.map_err(|err| failed(&span, err))?;
            let value = op(&mut tx).await?;
            let commit = stage_span(|| tracing::info_span!("db.commit"));
            tx.commit()
                .instrument(commit.clone())
                .await
                .map_err(|err| failed(&commit, err))?;
            let lsn = sqlx::query_scalar::<_, i64>(INSERT_LSN_SQL)
                .fetch_one(&mut *conn)
                .instrument(commit.clone())
                .await
                .map_err(|err| failed(&commit, err))?;
            Ok::<_, E>((value, lsn))
        }
        .instrument(span.clone())
        .await;
        let (value, lsn) = committed?;
        metrics::histogram!(names::DB_QUERY_DURATION, "pool" => "writer").record(running.elapsed());
        Ok((value, Lsn(lsn as u64)))
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
    fn replayed(&self) -> Lsn {
        Lsn(self.replayed.load(Ordering::Acquire))
    }

    async fn check(&self) {
        let was_in_use = self.in_use.load(Ordering::Relaxed);
        let state_query = || sqlx::query_as::<_, (f64, i64)>(REPLICA_STATE_SQL);
        let state = if was_in_use {
            let pool = self.pool.load_full();
            tokio::time::timeout(PROBE_TIMEOUT, state_query().fetch_one(&*pool)).await
        } else {
            // While out of use, probe on a fresh connection: pooled ones may be dead sockets.
            tokio::time::timeout(PROBE_TIMEOUT, async {
                let mut conn = PgConnection::connect_with(&self.connect_options).await?;
                let state = state_query().fetch_one(&mut conn).await;
                let _ = conn.close().await;
                state
            })
            .await
        };
        let verdict = match state {
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
            Ok(Err(err)) => Err(err.to_string()),
            Ok(Ok((lag, replayed))) => {
                self.replayed.store(replayed as u64, Ordering::Release);
                metrics::gauge!(names::DB_REPLICA_LAG).set(lag);
                if lag > self.max_lag.as_secs_f64() {
                    Err(format!("lag {lag:.3}s exceeds {:?}", self.max_lag))
                } else {
                    Ok(())
                }
            }
        };
        match (verdict, was_in_use) {
            (Err(reason), true) => {
                let bad = self.bad_probes.fetch_add(1, Ordering::Relaxed) + 1;
                if bad >= BAD_PROBES_TO_GIVE_UP {
                    self.mark_unusable(&reason);
                } else {
                    tracing::debug!(reason, "replica probe failed; giving up after another");
                }
            }
            (Ok(()), true) => self.bad_probes.store(0, Ordering::Relaxed),
            (Ok(()), false) => {
                self.bad_probes.store(0, Ordering::Relaxed);
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
    let conn = acquire(pool, label).await?;
    let span = stage_span(|| tracing::info_span!("db.query", pool = label));
    let running = Instant::now();
    let result = op(conn).instrument(span.clone()).await;
    metrics::histogram!(names::DB_QUERY_DURATION, "pool" => label).record(running.elapsed());
    result.inspect_err(|err| mark_failed(&span, err))
}

/// A connection from `pool` (`label`: `writer` or `reader`), the wait recorded and in a
/// `db.acquire` span.
async fn acquire(
    pool: &PgPool,
    label: &'static str,
) -> Result<PoolConnection<Postgres>, sqlx::Error> {
    let span = stage_span(|| tracing::info_span!("db.acquire", pool = label));
    let waiting = Instant::now();
    match pool.acquire().instrument(span.clone()).await {
        Ok(conn) => {
            metrics::histogram!(names::DB_POOL_WAIT, "pool" => label).record(waiting.elapsed());
            Ok(conn)
        }
        Err(err) => {
            mark_failed(&span, &err);
            Err(err)
        }
    }
}

/// The span of a stage of database work, made by `make` below the caller's span; none outside
/// one, so that background work (gauges, housekeeping, pollers) starts no trace per round.
fn stage_span(make: impl FnOnce() -> Span) -> Span {
    if Span::current().is_none() {
        Span::none()
    } else {
        make()
    }
}

/// Marks `span` failed with what kind of failure `err` is, and converts it.
fn failed(span: &Span, err: sqlx::Error) -> DbError {
    mark_failed(span, &err);
    DbError::from(err)
}

/// Marks `span` failed with the kind of `err` (its SQLSTATE for a database error): never the
/// message, which can quote the statement's values.
fn mark_failed(span: &Span, err: &sqlx::Error) {
    if span.is_none() {
        return;
    }
    let kind = match err {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("SQLSTATE {code}"),
            None => "database error".to_owned(),
        },
        sqlx::Error::PoolTimedOut => "no connection free in time".to_owned(),
        sqlx::Error::PoolClosed => "pool closed".to_owned(),
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) => "connection failed".to_owned(),
        sqlx::Error::Protocol(_) => "protocol error".to_owned(),
        sqlx::Error::RowNotFound => "no row".to_owned(),
        _ => "database error".to_owned(),
    };
    span.set_status(Status::error(kind));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    use opentelemetry_sdk::trace::SpanData;

    /// Runs `work` on a runtime of this thread under the OpenTelemetry layer; returns the spans
    /// exported, in the order they ended.
    fn capture(work: impl Future<Output = ()>) -> Vec<SpanData> {
        test_support::trace_capture::capture(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(work)
        })
        .1
    }

    fn fake_postgres() -> String {
        test_support::fake_postgres::url()
    }

    /// A URL where nothing listens.
    fn nothing_there() -> String {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("postgres://test@127.0.0.1:{port}/test?sslmode=disable")
    }

    fn database(writer_url: String, reader_url: Option<String>) -> Database {
        Database::connect_lazy(&DatabaseConfig {
            writer_url,
            reader_url,
            max_connections: 2,
            acquire_timeout: Duration::from_millis(300),
            statement_timeout: Duration::from_secs(1),
            replica_max_lag: Duration::from_secs(1),
            replica_check_interval: Duration::from_secs(1),
        })
        .unwrap()
    }

    async fn select_one(mut conn: PoolConnection<Postgres>) -> sqlx::Result<Option<i32>> {
        sqlx::query_scalar("SELECT 1")
            .fetch_optional(&mut *conn)
            .await
    }

    fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
        spans.iter().filter(|span| span.name == name).collect()
    }

    fn pool_of(span: &SpanData) -> String {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == "pool")
            .map(|kv| kv.value.to_string())
            .unwrap_or_default()
    }

    fn failed_with(span: &SpanData) -> String {
        match &span.status {
            Status::Error { description } => description.to_string(),
            _ => String::new(),
        }
    }

    #[test]
    fn every_way_in_waits_for_its_connection_and_runs_in_spans_below_the_caller() {
        let spans = capture(async {
            let db = database(fake_postgres(), Some(fake_postgres()));
            async {
                let _ = db.write(select_one).await;
                let _ = db.read(select_one).await;
                let _ = db.read_after(Some(Lsn(1)), select_one).await;
                let _ = db.read_one(None, select_one).await;
                let _ = db
                    .transaction(|_| Box::pin(async { Ok::<_, DbError>(()) }))
                    .await;
                let _ = db.writer_connection().await.map(drop);
            }
            .instrument(tracing::info_span!("request"))
            .await;
        });
        let request = named(&spans, "request")[0].span_context.span_id();
        let acquires = named(&spans, "db.acquire");
        assert_eq!(
            acquires
                .iter()
                .map(|span| pool_of(span))
                .collect::<Vec<_>>(),
            // write, read, read_after (the replica has not replayed that far: unknown yet),
            // read_one, transaction, writer_connection
            ["writer", "reader", "writer", "reader", "writer", "writer"]
        );
        let queries = named(&spans, "db.query");
        assert_eq!(
            queries.iter().map(|span| pool_of(span)).collect::<Vec<_>>(),
            ["writer", "reader", "writer", "reader"]
        );
        let transaction = named(&spans, "db.transaction");
        assert_eq!(transaction.len(), 1);
        for span in acquires.iter().chain(&queries).chain(&transaction) {
            assert_eq!(
                span.parent_span_id, request,
                "{} below the caller",
                span.name
            );
        }
        assert!(queries
            .iter()
            .all(|span| failed_with(span) == "SQLSTATE XX000"));
        let commit = named(&spans, "db.commit");
        assert_eq!(commit.len(), 1);
        assert_eq!(
            commit[0].parent_span_id,
            transaction[0].span_context.span_id()
        );
        // The commit went through; reading the WAL position was refused.
        assert_eq!(failed_with(commit[0]), "SQLSTATE XX000");
    }

    #[test]
    fn a_read_falling_back_from_a_dead_replica_shows_both_waits() {
        let spans = capture(async {
            let db = database(fake_postgres(), Some(nothing_there()));
            let _ = db
                .read(select_one)
                .instrument(tracing::info_span!("request"))
                .await;
        });
        let acquires = named(&spans, "db.acquire");
        assert_eq!(
            acquires
                .iter()
                .map(|span| pool_of(span))
                .collect::<Vec<_>>(),
            ["reader", "writer"]
        );
        assert_eq!(failed_with(acquires[0]), "no connection free in time");
        assert_eq!(failed_with(acquires[1]), "");
        let queries = named(&spans, "db.query");
        assert_eq!(
            queries.iter().map(|span| pool_of(span)).collect::<Vec<_>>(),
            ["writer"]
        );
    }

    #[test]
    fn work_outside_any_span_starts_no_trace() {
        let spans = capture(async {
            let db = database(fake_postgres(), None);
            let _ = db.write(select_one).await;
            let _ = db
                .transaction(|_| Box::pin(async { Ok::<_, DbError>(()) }))
                .await;
        });
        assert!(spans.is_empty(), "{spans:?}");
    }

    #[test]
    fn lsn_reads_and_writes_postgres_notation() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn, Lsn((0x16 << 32) | 0xB374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!(Lsn(5) < "0/6".parse().unwrap());
        for bad in ["", "16", "16/", "/1", "xyz/1", "1/2/3", "123456789/0"] {
            assert_eq!(bad.parse::<Lsn>(), Err(InvalidLsn), "{bad:?}");
        }
    }
}
