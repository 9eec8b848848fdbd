//! Database routing: a writer pool on the primary and a reader pool on replicas (one replica,
//! or a service such as CloudNativePG's `-ro` in front of several).
//!
//! The methods say where work runs: [`Database::primary`] for writes and for reads that must see
//! the latest state, [`Database::replica_or_primary`] for plain reads (the replica while it is
//! usable, else the primary; `db_replica_fallback_total` counts each fallback by reason).
//!
//! Whether the replica is usable is measured against the primary, not taken from the replica's
//! own view: a background monitor samples the primary's flushed WAL position and the replica's
//! replayed position every `DATABASE_REPLICA_CHECK_INTERVAL_MS`. The replica is usable while it
//! has replayed everything the primary had flushed `DATABASE_REPLICA_MAX_LAG_MS` ago, so one
//! whose WAL receiver stopped (a partition, a wrong `primary_conninfo`), which has replayed all
//! it received and would call itself current forever, is skipped once the primary moves on.
//! The monitor gives up on the replica only after two bad probes in a row (one slow answer on
//! a busy host is not an outage). A read that fails on the replica with a connection error is
//! retried once on the primary and moves reads away at once. A reader pool with no connection
//! free in time is busy, not down: that read answers 503 and the replica stays in use.
//!
//! Read-your-writes: a committed transaction returns its position in the write-ahead log
//! ([`Lsn`]), which services hand to the client as a consistency token. A read given a token
//! is checked on the very connection that serves it (its server's replayed position), so it is
//! right however many replicas stand behind the reader address; a connection not there yet
//! sends the read to the primary. A token beyond the primary's current position (from the
//! future, forged, or another service's) stands for no write and is treated as absent, so it
//! cannot pin a client's reads to the primary.
//!
//! Tracing: below the caller's span, the wait for a connection is a `db.acquire` span and the
//! work on it a `db.query` span (both with `pool` = `writer` or `reader`), or, for
//! [`Database::transaction`], a `db.transaction` span ending in `db.commit` (commit and the
//! read of the WAL position); the storage layers' statement spans hang below those. Outside any
//! span (gauges, housekeeping, pollers) there are none: background work starts no trace of its
//! own. A failure marks the span's OpenTelemetry status with its kind or SQLSTATE only, never
//! the server's message (which can quote values).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use opentelemetry::trace::Status;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres};
use tracing::{Instrument, Span};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::allowance::Allowance;
use crate::config::DatabaseConfig;
use crate::error::ApiError;
use crate::metrics as names;

/// How far the server has replayed (its own flushed position when it is not a replica).
const REPLAYED_SQL: &str = "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
     ELSE pg_current_wal_flush_lsn() END - '0/0'::pg_lsn)::int8";

/// Whether the server of this connection has replayed up to `$1` (a primary always has).
const REPLAYED_UP_TO_SQL: &str = "SELECT CASE WHEN pg_is_in_recovery() \
     THEN (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8 >= $1 ELSE true END";

/// The primary's flushed WAL position: what a replica can have received.
const FLUSH_LSN_SQL: &str = "SELECT (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::int8";

/// The primary's WAL insert position: after a commit returns, it lies at or past the commit
/// record, so a replica that has replayed this far sees the commit (flushed or not).
///
/// When the last record ended a WAL page, PostgreSQL reports the insert position past the next
/// page's header (24 bytes, 40 on a segment's first page, on 64-bit platforms), a position no
/// replica reports having replayed until more WAL is written: on a quiet primary, reads with
/// such a token would go to the primary for good. No record lies inside a header, so the page
/// boundary stands for the same writes.
const INSERT_LSN_SQL: &str = "SELECT at - CASE \
         WHEN at % pg_size_bytes(current_setting('wal_segment_size')) = 40 THEN 40 \
         WHEN at % current_setting('wal_block_size')::int8 = 24 THEN 24 \
         ELSE 0 END \
     FROM (SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8 AS at) AS insert";

/// Something to run once a write has committed (see [`after_commit`]).
type CommitHook = Box<dyn FnOnce() + Send>;

tokio::task_local! {
    /// What to run once the [`Database::transaction`] or [`Database::write`] being run
    /// succeeded (see [`after_commit`]).
    static AFTER_COMMIT: std::cell::RefCell<Vec<CommitHook>>;
}

tokio::task_local! {
    /// Set by the HTTP layer around each request (see [`watch_writes`]): raised once a write of
    /// the request may have reached the database for good (an autocommit statement sent, or a
    /// COMMIT), after which cancelling the request could not undo it.
    static WRITE_SENT: Arc<AtomicBool>;
}

/// Runs `request`, raising `write_sent` once a write of it may have been applied: then a
/// timeout must let it finish rather than answer "nothing was done".
pub async fn watch_writes<T>(write_sent: Arc<AtomicBool>, request: impl Future<Output = T>) -> T {
    WRITE_SENT.scope(write_sent, request).await
}

/// Notes, for the request being served (if any), that a write may now reach the database.
fn note_write_sent() {
    let _ = WRITE_SENT.try_with(|sent| sent.store(true, Ordering::Release));
}

/// Runs `write`, collecting the hooks it registers with [`after_commit`].
async fn with_commit_hooks<T>(write: impl Future<Output = T>) -> (T, Vec<CommitHook>) {
    AFTER_COMMIT
        .scope(Default::default(), async {
            let outcome = write.await;
            (outcome, AFTER_COMMIT.with(std::cell::RefCell::take))
        })
        .await
}

/// Asks for `hook` to run once the enclosing [`Database::transaction`] (or
/// [`Database::write`]) has committed: to tell others about a write without holding up the
/// commit. False, and nothing is kept, outside one.
pub fn after_commit(hook: impl FnOnce() + Send + 'static) -> bool {
    AFTER_COMMIT
        .try_with(|hooks| hooks.borrow_mut().push(Box::new(hook)))
        .is_ok()
}

/// Upper bound on one health probe, so a hung replica is noticed as fast as a dead one.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// The `reason`s of `db_replica_fallback_total`.
const FALLBACK_REASONS: [&str; 4] = [
    "replica_unusable",
    "read_your_writes",
    "read_failed",
    "missing_on_replica",
];

/// The shortest time between two readings of the primary's position for consistency tokens
/// beyond what this process has seen: what a flood of forged tokens can cost the primary.
const POSITION_READ_INTERVAL: Duration = Duration::from_millis(10);

/// Misses on a replica that keeps up confirmed on the primary per second (and at once), at most.
const MISS_CONFIRMATIONS_PER_SECOND: u32 = 50;

/// Bad probes in a row after which the replica in use is given up.
const BAD_PROBES_TO_GIVE_UP: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{variable} is not a usable PostgreSQL URL: {source}")]
    InvalidUrl {
        variable: &'static str,
        source: sqlx::Error,
    },
    /// The database could not be reached: worth a retry later.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// No connection of the `pool` was free in time: the service is busy, worth a retry soon.
    #[error("no {0} connection free in time")]
    Busy(&'static str),
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

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::Unavailable(_) => Self::unavailable("the database is unavailable; try again"),
            DbError::Busy(_) => Self::unavailable("the server is busy; try again shortly"),
            other => Self::internal(other),
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

/// Which server answered a read, as reported by `/healthz/dependencies`.
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
    /// The furthest WAL position this process has seen on the primary (its commits, the
    /// monitor's samples): what consistency tokens are clamped to.
    seen: AtomicU64,
    /// Readings of the primary's position for tokens beyond `seen`, shared by every request
    /// that waits for one and at most one per [`POSITION_READ_INTERVAL`].
    position_reads: std::sync::Mutex<PositionReads>,
    /// Misses on the replica confirmed on the primary at once, at most: a flood of lookups for
    /// ids that do not exist cannot move the reads onto the primary.
    miss_confirmations: tokio::sync::Semaphore,
    /// Misses confirmed on the primary while the replica keeps up: a few a second.
    miss_budget: std::sync::Mutex<Allowance>,
}

/// The primary's position as read for tokens beyond what this process has seen.
#[derive(Default)]
struct PositionReads {
    /// The newest reading: when it began, and the position (`None`: it failed).
    last: Option<(Instant, Option<u64>)>,
    /// The reading under way, if any: every request that needs it awaits the same one.
    under_way: Option<PositionReading>,
}

/// A reading of the primary's position: when it began, and the position (`None`: it failed).
type PositionReading = futures_util::future::Shared<BoxFuture<'static, (Instant, Option<u64>)>>;

struct Replica {
    pool: ArcSwap<PgPool>,
    connect_options: PgConnectOptions,
    pool_options: PgPoolOptions,
    in_use: AtomicBool,
    /// Whether the last probe found the replica behind by a check interval or more: then a
    /// miss on it may be an artefact of lag.
    behind: AtomicBool,
    /// Bad probes in a row while in use (only the monitor task touches it).
    bad_probes: AtomicU32,
    /// The primary's flushed position over the last `max_lag` and a little more, oldest first
    /// (only the monitor task touches it).
    primary_positions: std::sync::Mutex<VecDeque<(Instant, u64)>>,
    max_lag: Duration,
    check_interval: Duration,
}

impl Database {
    /// Builds both pools without connecting: the service starts even while a database is down,
    /// and `/healthz/dependencies` says so until it is back.
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
            config.writer_url.expose(),
            config.statement_timeout,
        )?);
        let replica = match &config.reader_url {
            None => None,
            Some(url) => {
                // Read-only sessions: a write routed here by mistake fails (25006) instead of
                // landing on whatever the reader address points at (a primary, after a switch).
                let connect_options = parse_url(
                    "DATABASE_READER_URL",
                    url.expose(),
                    config.statement_timeout,
                )?
                .options([("default_transaction_read_only", "on")]);
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
                    behind: AtomicBool::new(false),
                    bad_probes: AtomicU32::new(0),
                    primary_positions: Default::default(),
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
            inner: Arc::new(Inner {
                writer,
                replica,
                seen: AtomicU64::new(0),
                position_reads: Default::default(),
                miss_confirmations: tokio::sync::Semaphore::new(
                    (config.max_connections as usize / 4).max(1),
                ),
                miss_budget: std::sync::Mutex::new(Allowance::new(
                    MISS_CONFIRMATIONS_PER_SECOND,
                    Duration::from_secs(1) / MISS_CONFIRMATIONS_PER_SECOND,
                    Instant::now(),
                )),
            }),
        })
    }

    /// The primary's pool, for transactions (`writer_pool().begin()`) and streaming queries.
    pub fn writer_pool(&self) -> &PgPool {
        &self.inner.writer
    }

    /// A connection to the primary, for work that manages its own transaction; the wait for it
    /// is recorded like every other.
    pub async fn writer_connection(&self) -> Result<PoolConnection<Postgres>, DbError> {
        acquire(&self.inner.writer, "writer")
            .await
            .map_err(|err| to_db_error(err, "writer"))
    }

    /// Runs `op` on a connection to the primary: a write, or a read that must see the latest
    /// state (a login right after signup, an inbox read on one device after a change on another).
    pub async fn primary<T, F, Fut>(&self, op: F) -> Result<T, DbError>
    where
        F: FnOnce(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        // Its statements commit one by one (autocommit): any may be a write.
        note_write_sent();
        run_timed(&self.inner.writer, "writer", op)
            .await
            .map_err(|err| to_db_error(err, "writer"))
    }

    /// Runs the read `op` on the replica while it is usable, else on the primary. `op` may run
    /// twice (once per server) if the replica fails mid-way, so it must be a read.
    pub async fn replica_or_primary<T, F, Fut>(&self, op: F) -> Result<T, DbError>
    where
        F: Fn(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.replica_or_primary_after(None, op).await
    }

    /// Like [`Self::replica_or_primary`], but the answer reflects every write up to `token`
    /// (read-your-writes): a replica connection serves it only if its server has replayed that
    /// far, checked on that connection.
    pub async fn replica_or_primary_after<T, F, Fut>(
        &self,
        token: Option<Lsn>,
        op: F,
    ) -> Result<T, DbError>
    where
        F: Fn(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        self.route_read(token, &op).await.map(|(value, _)| value)
    }

    /// Like [`Self::replica_or_primary_after`] for a lookup that may find nothing. A miss on the
    /// replica is confirmed on the primary, since the row may just not be replayed yet (an
    /// account read right after its signup, a task made a moment ago on another device, without
    /// a consistency token), but within bounds: at will while the replica is measurably behind
    /// (it had not replayed, at its last probe, what the primary had flushed a check interval
    /// before), otherwise [`MISS_CONFIRMATIONS_PER_SECOND`]; and a quarter of the pool at a
    /// time. Genuine misses are rare and fit; a flood of lookups for made-up ids gets its
    /// misses from the replica and cannot move the reads onto the primary.
    pub async fn find_on_replica_or_primary<T, F, Fut>(
        &self,
        token: Option<Lsn>,
        op: F,
    ) -> Result<Option<T>, DbError>
    where
        F: Fn(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<Option<T>, sqlx::Error>>,
    {
        match self.route_read(token, &op).await? {
            (None, ReadTarget::Replica) => {
                // Past the bounds the miss stands (the replica is at most the lag bound behind,
                // as every plain read may be).
                if !(self.replica_behind() || self.take_miss_budget()) {
                    return Ok(None);
                }
                let Ok(_permit) = self.inner.miss_confirmations.try_acquire() else {
                    return Ok(None);
                };
                metrics::counter!(names::DB_REPLICA_FALLBACK, "reason" => "missing_on_replica")
                    .increment(1);
                self.primary(op).await
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
        let Some(replica) = &self.inner.replica else {
            return self.read_on_primary(None, op).await;
        };
        if !replica.in_use.load(Ordering::Relaxed) {
            return self.read_on_primary(Some("replica_unusable"), op).await;
        }
        let token = match token {
            Some(token) => self.clamp(token).await,
            None => None,
        };
        let pool = replica.pool.load_full();
        let conn = match acquire(&pool, "reader").await {
            Ok(conn) => conn,
            // Every connection lent out: busy, not down. The replica stays in use (a reconnect
            // storm now would make it worse) and this read is refused with a 503.
            Err(sqlx::Error::PoolTimedOut) if saturated(&pool) => {
                return Err(DbError::Busy("reader"))
            }
            // Otherwise no connection could be opened in time: the replica is away.
            Err(err) => return self.after_replica_failure(replica, err, op).await,
        };
        let conn = match token {
            None => conn,
            Some(token) => match replayed_up_to(conn, token).await {
                Ok(Some(conn)) => conn,
                Ok(None) => return self.read_on_primary(Some("read_your_writes"), op).await,
                Err(err) => return self.after_replica_failure(replica, err, op).await,
            },
        };
        match run_on(conn, "reader", op).await {
            Err(err) if is_connection_error(&err) => {
                self.after_replica_failure(replica, err, op).await
            }
            result => result
                .map(|value| (value, ReadTarget::Replica))
                .map_err(|err| to_db_error(err, "reader")),
        }
    }

    /// The replica failed a read with `err`: a connection error moves reads to the primary
    /// (this one included); anything else is the read's own error.
    async fn after_replica_failure<T, F, Fut>(
        &self,
        replica: &Replica,
        err: sqlx::Error,
        op: &F,
    ) -> Result<(T, ReadTarget), DbError>
    where
        F: Fn(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        if !is_connection_error(&err) {
            return Err(to_db_error(err, "reader"));
        }
        replica.mark_unusable(&format!("read failed: {err}"));
        self.read_on_primary(Some("read_failed"), op).await
    }

    /// Runs the read `op` on the primary; `fallback` is why, when a replica was there to use
    /// (counted in `db_replica_fallback_total`).
    async fn read_on_primary<T, F, Fut>(
        &self,
        fallback: Option<&'static str>,
        op: &F,
    ) -> Result<(T, ReadTarget), DbError>
    where
        F: Fn(PoolConnection<Postgres>) -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        if let Some(reason) = fallback {
            metrics::counter!(names::DB_REPLICA_FALLBACK, "reason" => reason).increment(1);
        }
        self.primary(op)
            .await
            .map(|value| (value, ReadTarget::Primary))
    }

    /// `token` if a write can have produced it: one beyond the primary's current position (from
    /// the future, forged, or another service's) stands for no write, so it asks for nothing
    /// and the read is a plain one (`None`). Tokens up to the furthest position this process
    /// has seen cost nothing; beyond it, the request waits for a reading of the primary's
    /// position begun after it arrived. Readings are shared by every request waiting at the
    /// time and begin at most every [`POSITION_READ_INTERVAL`], so a flood of forged tokens costs
    /// the primary at most that many small queries a second and its requests wait side by side,
    /// never in a queue behind each other.
    async fn clamp(&self, token: Lsn) -> Option<Lsn> {
        if token.0 <= self.inner.seen.load(Ordering::Acquire) {
            return Some(token);
        }
        let arrived = Instant::now();
        loop {
            let reading = {
                let Ok(mut reads) = self.inner.position_reads.lock() else {
                    return Some(token);
                };
                match reads.last {
                    // A reading begun after this token was sent covers any write it stands for.
                    Some((started, position)) if started >= arrived => {
                        // Cannot tell: the token stands; the read goes where it says.
                        return position
                            .is_none_or(|current| token.0 <= current)
                            .then_some(token);
                    }
                    _ => {}
                }
                match &reads.under_way {
                    Some(reading) => reading.clone(),
                    None => {
                        let not_before = reads
                            .last
                            .map(|(started, _)| started + POSITION_READ_INTERVAL);
                        let reading = self.read_position(not_before).boxed().shared();
                        reads.under_way = Some(reading.clone());
                        reading
                    }
                }
            };
            let finished = reading.clone().await;
            if let Ok(mut reads) = self.inner.position_reads.lock() {
                if reads.last.is_none_or(|(started, _)| started < finished.0) {
                    reads.last = Some(finished);
                }
                // Only this reading: a newer one may be under way already.
                if reads
                    .under_way
                    .as_ref()
                    .is_some_and(|under_way| under_way.ptr_eq(&reading))
                {
                    reads.under_way = None;
                }
            }
        }
    }

    /// Reads the primary's insert position, not before `not_before`; returns when the reading
    /// began and the position (`None` if it failed).
    fn read_position(
        &self,
        not_before: Option<Instant>,
    ) -> impl Future<Output = (Instant, Option<u64>)> + Send + 'static {
        let writer = self.inner.writer.clone();
        async move {
            if let Some(not_before) = not_before {
                tokio::time::sleep_until(not_before.into()).await;
            }
            let started = Instant::now();
            let current = sqlx::query_scalar::<_, i64>(INSERT_LSN_SQL)
                .fetch_one(&writer)
                .await
                .ok()
                .map(|position| position as u64);
            (started, current)
        }
    }

    /// Whether a miss may be confirmed on the primary while the replica keeps up.
    fn take_miss_budget(&self) -> bool {
        self.inner
            .miss_budget
            .lock()
            .is_ok_and(|mut budget| budget.take(Instant::now()))
    }

    /// Whether the replica in use was measurably behind at its last probe.
    fn replica_behind(&self) -> bool {
        self.inner
            .replica
            .as_ref()
            .is_some_and(|replica| replica.behind.load(Ordering::Relaxed))
    }

    /// Notes a position the primary reached.
    fn saw(&self, position: u64) {
        self.inner.seen.fetch_max(position, Ordering::AcqRel);
    }

    /// Runs `op` in a transaction on the primary and commits it; returns `op`'s value and the WAL
    /// position that reflects the commit (the client's consistency token). An error from `op`
    /// rolls the transaction back. Once the commit succeeded the answer is success: if the
    /// position cannot be read afterwards, there is no token (the client then reads without
    /// one), never an error that would invite a retry of a committed write. What `op` asked
    /// for with [`after_commit`] runs once the commit succeeded.
    pub async fn transaction<T, E, F>(&self, op: F) -> Result<(T, Option<Lsn>), E>
    where
        E: From<DbError>,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, E>>,
    {
        let mut conn = self.writer_connection().await?;
        let span = stage_span(|| tracing::info_span!("db.transaction", pool = "writer"));
        let running = Instant::now();
        let commit = stage_span(|| tracing::info_span!(parent: &span, "db.commit"));
        let (committed, hooks) = with_commit_hooks(async {
            let mut tx = conn
                .begin()
                .await
                .map_err(|err| failed(&span, err, "writer"))?;
            let value = op(&mut tx).await?;
            // Until here, cancelling rolls back; from here on the write may be applied.
            note_write_sent();
            tx.commit()
                .instrument(commit.clone())
                .await
                .map_err(|err| failed(&commit, err, "writer"))?;
            Ok::<_, E>(value)
        })
        .instrument(span.clone())
        .await;
        let value = committed?;
        let lsn = self.written(&mut conn, commit, hooks, running).await;
        Ok((value, lsn))
    }

    /// Runs `op` on a connection to the primary outside a transaction block, for writes that
    /// are one statement each (a data-modifying `WITH` writes a row, its history and its outbox
    /// event at once, atomically): a round trip per step instead of `BEGIN`, one per table and
    /// `COMMIT`. Otherwise as [`Database::transaction`]: the WAL position of what `op` wrote
    /// comes back, and what `op` asked for with [`after_commit`] runs once it succeeded.
    pub async fn write<T, E, F>(&self, op: F) -> Result<(T, Option<Lsn>), E>
    where
        E: From<DbError>,
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, E>>,
    {
        let mut conn = self.writer_connection().await?;
        let span = stage_span(|| tracing::info_span!("db.write", pool = "writer"));
        let running = Instant::now();
        note_write_sent();
        let (written, hooks) = with_commit_hooks(op(&mut conn))
            .instrument(span.clone())
            .await;
        let value = written?;
        let commit = stage_span(|| tracing::info_span!(parent: &span, "db.commit"));
        let lsn = self.written(&mut conn, commit, hooks, running).await;
        Ok((value, lsn))
    }

    /// After a committed write on `conn` (begun at `running`): runs the write's hooks and
    /// returns the WAL position that reflects it, read in the write's `commit` span.
    async fn written(
        &self,
        conn: &mut PgConnection,
        commit: Span,
        hooks: Vec<CommitHook>,
        running: Instant,
    ) -> Option<Lsn> {
        for hook in hooks {
            hook();
        }
        let lsn = sqlx::query_scalar::<_, i64>(INSERT_LSN_SQL)
            .fetch_one(&mut *conn)
            .instrument(commit.clone())
            .await;
        metrics::histogram!(names::DB_QUERY_DURATION, "pool" => "writer").record(running.elapsed());
        match lsn {
            Ok(lsn) => {
                self.saw(lsn as u64);
                Some(Lsn(lsn as u64))
            }
            Err(err) => {
                mark_failed(&commit, &err);
                tracing::warn!(error = %err, "committed, but the WAL position could not be read: answering without a consistency token");
                None
            }
        }
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

    /// A round trip to the primary, for the dependency checks.
    pub async fn ping_primary(&self, timeout: Duration) -> Result<(), DbError> {
        let select_one = self
            .primary(|mut conn| async move { sqlx::query("SELECT 1").execute(&mut *conn).await });
        match tokio::time::timeout(timeout, select_one).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(DbError::Unavailable(sqlx::Error::PoolTimedOut)),
        }
    }

    /// Starts the replica monitor (no-op without a replica), a background task of the process.
    pub fn spawn_replica_monitor(&self) {
        if self.inner.replica.is_none() {
            return;
        }
        let db = self.clone();
        crate::workers::background().spawn(async move {
            let Some(replica) = &db.inner.replica else {
                return;
            };
            let mut ticker = tokio::time::interval(replica.check_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The monitor's own connection: a reader pool with every connection lent out
            // (busy) must not look like a replica that does not answer.
            let mut probe_conn = None;
            loop {
                ticker.tick().await;
                let primary_at = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    sqlx::query_scalar::<_, i64>(FLUSH_LSN_SQL).fetch_one(&db.inner.writer),
                )
                .await;
                if let Ok(Ok(position)) = primary_at {
                    db.saw(position as u64);
                    replica.note_primary_position(Instant::now(), position as u64);
                }
                replica.check(&mut probe_conn).await;
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

/// Whether every connection `pool` may open is open (and so, after a timed-out wait, lent out).
fn saturated(pool: &PgPool) -> bool {
    pool.size() >= pool.options().get_max_connections()
}

/// `conn` back if its server has replayed up to `token`, `None` if not yet.
async fn replayed_up_to(
    mut conn: PoolConnection<Postgres>,
    token: Lsn,
) -> Result<Option<PoolConnection<Postgres>>, sqlx::Error> {
    let caught_up: bool = sqlx::query_scalar(REPLAYED_UP_TO_SQL)
        .bind(token.0 as i64)
        .fetch_one(&mut *conn)
        .await?;
    Ok(caught_up.then_some(conn))
}

impl Replica {
    /// Records where the primary was at `at`, keeping one sample at least `max_lag` old.
    fn note_primary_position(&self, at: Instant, position: u64) {
        let Ok(mut positions) = self.primary_positions.lock() else {
            return;
        };
        positions.push_back((at, position));
        let cutoff = at.checked_sub(self.max_lag);
        while let (Some(cutoff), Some(&(second, _))) = (cutoff, positions.get(1)) {
            if second > cutoff {
                break;
            }
            positions.pop_front();
        }
    }

    /// What the replica must have replayed to be usable: the primary's position `max_lag` ago
    /// (the oldest known while the process is younger than that), and how far behind a replica
    /// at `replayed` is, at least.
    fn judge(&self, replayed: u64, now: Instant) -> (Option<u64>, Duration) {
        let Ok(positions) = self.primary_positions.lock() else {
            return (None, Duration::ZERO);
        };
        let cutoff = now.checked_sub(self.max_lag);
        let required = positions
            .iter()
            .rev()
            .find(|(at, _)| cutoff.is_some_and(|cutoff| *at <= cutoff))
            .or(positions.front())
            .map(|&(_, position)| position);
        // Behind since the first sample it has not replayed (or longer, beyond the samples).
        let lag = positions
            .iter()
            .find(|(_, position)| *position > replayed)
            .map_or(Duration::ZERO, |(at, _)| now.saturating_duration_since(*at));
        (required, lag)
    }

    /// One probe on the monitor's own connection `probe_conn` (opened when there is none;
    /// dropped after a failure, so the next probe connects afresh).
    async fn check(&self, probe_conn: &mut Option<PgConnection>) {
        let was_in_use = self.in_use.load(Ordering::Relaxed);
        let state = tokio::time::timeout(PROBE_TIMEOUT, async {
            if probe_conn.is_none() {
                *probe_conn = Some(PgConnection::connect_with(&self.connect_options).await?);
            }
            match probe_conn.as_mut() {
                Some(conn) => {
                    sqlx::query_scalar::<_, i64>(REPLAYED_SQL)
                        .fetch_one(conn)
                        .await
                }
                None => Err(sqlx::Error::PoolClosed),
            }
        })
        .await;
        if !matches!(state, Ok(Ok(_))) {
            *probe_conn = None;
        }
        let verdict = match state {
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
            Ok(Err(err)) => Err(err.to_string()),
            Ok(Ok(replayed)) => {
                let (required, lag) = self.judge(replayed as u64, Instant::now());
                metrics::gauge!(names::DB_REPLICA_LAG).set(lag.as_secs_f64());
                self.behind
                    .store(lag >= self.check_interval, Ordering::Relaxed);
                match required {
                    Some(required) if (replayed as u64) < required => Err(format!(
                        "replayed {} but the primary had flushed {} {:?} ago",
                        Lsn(replayed as u64),
                        Lsn(required),
                        self.max_lag
                    )),
                    _ => Ok(()),
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
            (Err(_), false) => {}
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
    run_on(conn, label, op).await
}

/// Runs `op` on `conn` (of pool `label`) in a `db.query` span, recording its time.
async fn run_on<T, F, Fut>(
    conn: PoolConnection<Postgres>,
    label: &'static str,
    op: F,
) -> Result<T, sqlx::Error>
where
    F: FnOnce(PoolConnection<Postgres>) -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let span = stage_span(|| tracing::info_span!("db.query", pool = label));
    let running = Instant::now();
    let result = op(conn).instrument(span.clone()).await;
    metrics::histogram!(names::DB_QUERY_DURATION, "pool" => label).record(running.elapsed());
    result.inspect_err(|err| mark_failed(&span, err))
}

/// `err` from pool `label` as the callers see it: a pool without a free connection in time is
/// busy; the rest as [`DbError::from`] sorts them.
fn to_db_error(err: sqlx::Error, label: &'static str) -> DbError {
    match err {
        sqlx::Error::PoolTimedOut => DbError::Busy(label),
        other => DbError::from(other),
    }
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
fn failed(span: &Span, err: sqlx::Error, label: &'static str) -> DbError {
    mark_failed(span, &err);
    to_db_error(err, label)
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
            writer_url: writer_url.into(),
            reader_url: reader_url.map(Into::into),
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
                let _ = db.primary(select_one).await;
                let _ = db.replica_or_primary(select_one).await;
                let _ = db.replica_or_primary_after(Some(Lsn(1)), select_one).await;
                let _ = db.find_on_replica_or_primary(None, select_one).await;
                let _ = db
                    .transaction(|_| Box::pin(async { Ok::<_, DbError>(()) }))
                    .await;
                let _ = db.write(|_| Box::pin(async { Ok::<_, DbError>(()) })).await;
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
            // write, read, read with a token (its replica connection is asked how far it has
            // replayed, which this stand-in refuses), find, transaction, write,
            // writer_connection
            ["writer", "reader", "reader", "reader", "writer", "writer", "writer"]
        );
        let queries = named(&spans, "db.query");
        assert_eq!(
            queries.iter().map(|span| pool_of(span)).collect::<Vec<_>>(),
            ["writer", "reader", "reader"]
        );
        let transaction = named(&spans, "db.transaction");
        assert_eq!(transaction.len(), 1);
        let write = named(&spans, "db.write");
        assert_eq!(write.len(), 1);
        for span in acquires
            .iter()
            .chain(&queries)
            .chain(&transaction)
            .chain(&write)
        {
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
        assert_eq!(
            commit.len(),
            2,
            "one for the transaction, one for the write"
        );
        assert_eq!(
            commit[0].parent_span_id,
            transaction[0].span_context.span_id()
        );
        assert_eq!(commit[1].parent_span_id, write[0].span_context.span_id());
        // The commits went through; reading the WAL position was refused.
        assert!(commit
            .iter()
            .all(|span| failed_with(span) == "SQLSTATE XX000"));
    }

    #[test]
    fn a_read_falling_back_from_a_dead_replica_shows_both_waits() {
        let spans = capture(async {
            let db = database(fake_postgres(), Some(nothing_there()));
            let _ = db
                .replica_or_primary(select_one)
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
    fn a_committed_transaction_succeeds_even_when_its_position_cannot_be_read() {
        // The stand-in commits, then refuses the WAL-position query: the write happened, so the
        // caller must see success (without a token), never an error inviting a retry.
        let outcome = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let db = database(fake_postgres(), None);
                db.transaction(|_| Box::pin(async { Ok::<_, DbError>("written") }))
                    .await
            });
        assert!(matches!(outcome, Ok(("written", None))), "{outcome:?}");
    }

    #[test]
    fn work_outside_any_span_starts_no_trace() {
        let spans = capture(async {
            let db = database(fake_postgres(), None);
            let _ = db.primary(select_one).await;
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
