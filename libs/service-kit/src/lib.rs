//! The spine every taskstream service shares, so a service's own crate holds only its domain.
//!
//! - [`config`]: settings from the environment, validated before anything starts;
//! - [`telemetry`]: JSON logs with trace ids, OTLP traces;
//! - [`metrics`]: the Prometheus recorder and the shared metric names;
//! - [`error`]: the error answer every service gives (`{"error": {"code", "message"}}`);
//! - [`input`]: request input as types (storable text, instants in range, JSON objects) and
//!   the extractors whose 400 names the field;
//! - [`http`]: the HTTP/1.1 + h2c server, standard endpoints, graceful shutdown;
//! - [`db`]: writer and reader pools with replica fallback and read-your-writes;
//! - [`broker`]: the Kafka reachability probe;
//! - [`access_token`]: verifying auth's access tokens (JWKS fetched and cached);
//! - [`revoked_users`]: refusing the tokens of deleted accounts before they expire;
//! - [`workers`]: bounded worker pools for CPU-heavy work, periodic chores;
//! - [`housekeeping`]: deleting what has outlived its use, in batches, one instance at a time;
//! - [`openapi`]: serving a service's OpenAPI document.
//!
//! A service implements [`Service`] and its `main` is `service_kit::run::<TheService>()`, which
//! also gives the binary its `migrate` subcommand; a service's own one-shot commands run through
//! [`run_command`] the same way (logs, runtime, exit codes).

pub mod access_token;
pub mod allowance;
pub mod broker;
pub mod config;
pub mod db;
pub mod erased_users;
pub mod error;
pub mod housekeeping;
pub mod http;
pub mod input;
pub mod metrics;
pub mod openapi;
pub mod revoked_users;
pub mod telemetry;
pub mod workers;

/// Every binary built on the spine allocates with mimalloc: under glibc's allocator,
/// malloc and free took 13% of the CPU of a GET by id (perf, loadtest/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

pub use actix_web;
pub use sqlx;
use sqlx::migrate::Migrator;
use sqlx::Connection;

use crate::broker::BrokerProbe;
use crate::config::{ConfigError, Env, ServiceConfig, TelemetryConfig};
use crate::db::Database;
use crate::http::AppContext;

/// Exit code for configuration errors, distinct from runtime failures (1).
const EXIT_BAD_CONFIG: u8 = 2;

/// How long shutdown waits for the background tasks (chores, monitors) to end.
const BACKGROUND_STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long shutdown waits for the database pools to close.
const POOL_CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What a service adds to the spine: its settings, migrations, state and routes.
pub trait Service: Sized + Send + Sync + 'static {
    /// Name in logs, metrics and messages.
    const NAME: &'static str;
    /// Port used when `HTTP_PORT` is not set.
    const DEFAULT_PORT: u16;
    /// The service's own settings.
    type Settings: Send + 'static;

    /// Reads the service's own variables; a bad one stops the process before it serves.
    fn settings(env: &Env) -> Result<Self::Settings, ConfigError>;

    /// The schema migrations `<binary> migrate` applies (run once per deploy, never at start-up).
    fn migrations() -> Option<&'static Migrator> {
        None
    }

    /// Builds the service's state once the pools exist.
    fn start(
        settings: Self::Settings,
        context: &AppContext,
    ) -> impl Future<Output = Result<Self, String>>;

    /// Whether this process can serve, for `/readyz`: `Err` says what it still lacks (the keys
    /// to verify access tokens with, say). Never a dependency's health: see [`http`].
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// Called when SIGTERM/SIGINT arrives, before the server stops accepting and drains: the
    /// place to close long-lived connections (WebSockets) so their clients reconnect elsewhere,
    /// which a drain would otherwise wait on until its timeout.
    fn draining(&self) -> impl Future<Output = ()> {
        async {}
    }

    /// Called on shutdown once in-flight requests are drained and before the pools close: the
    /// place to stop background work (relays, consumers) so it flushes and commits.
    fn stop(&self) -> impl Future<Output = ()> {
        async {}
    }

    /// Registers the routes (on every HTTP worker). Handlers reach the state as `web::Data<Self>`;
    /// anything else they extract (a token verifier, say) is registered here as app data.
    fn routes(&self, routes: &mut actix_web::web::ServiceConfig);
}

/// The whole process: `<binary>` serves until SIGTERM; `<binary> migrate` applies the
/// migrations to `DATABASE_WRITER_URL` and exits.
///
/// Configuration problems print one line to stderr naming the variable and exit with code 2;
/// other start-up failures exit with 1; a graceful shutdown exits with 0.
pub fn run<S: Service>() -> ExitCode {
    let command = std::env::args().nth(1);
    match command.as_deref() {
        None => serve::<S>(),
        Some("migrate") => migrate::<S>(),
        Some(other) => {
            eprintln!(
                "{}: unknown command {other:?}; usage: {0} [migrate]",
                S::NAME
            );
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}

fn fail(service: &str, code: u8, message: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("{service}: {message}");
    ExitCode::from(code)
}

fn bad_config(service: &str, err: impl std::fmt::Display) -> ExitCode {
    fail(
        service,
        EXIT_BAD_CONFIG,
        &format_args!("configuration error: {err}"),
    )
}

fn serve<S: Service>() -> ExitCode {
    let env = Env::from_process();
    let settings = ServiceConfig::from_env(&env, S::NAME, S::DEFAULT_PORT)
        .and_then(|config| Ok((config, S::settings(&env)?)));
    let (config, settings) = match settings {
        Ok((config, settings)) => (Arc::new(config), settings),
        Err(err) => return bad_config(S::NAME, err),
    };
    let _telemetry = match telemetry::init(S::NAME, &config.telemetry) {
        Ok(guard) => guard,
        Err(err) => return bad_config(S::NAME, err),
    };
    let metrics = match metrics::install(S::NAME) {
        Ok(handle) => handle,
        Err(err) => {
            return fail(
                S::NAME,
                1,
                &format_args!("cannot install metrics recorder: {err}"),
            )
        }
    };

    raise_open_files_limit();
    let outcome = actix_web::rt::System::new().block_on(async move {
        // Pools spawn maintenance tasks, so they are built inside the runtime.
        let db = Database::connect_lazy(&config.database).map_err(|err| err.to_string())?;
        let broker = BrokerProbe::new(&config.broker).map_err(|err| err.to_string())?;
        db.spawn_replica_monitor();
        let context = AppContext {
            config: config.clone(),
            db: db.clone(),
            broker,
            metrics,
        };
        http::spawn_dependency_checks(context.clone());
        let service = Arc::new(S::start(settings, &context).await?);
        tracing::info!(
            host = %config.http.host,
            port = config.http.port,
            "{} listening (HTTP/1.1 and h2c)",
            S::NAME
        );
        http::serve(context, service.clone())
            .await
            .map_err(|err| format!("HTTP server on port {}: {err}", config.http.port))?;
        tracing::info!("in-flight requests drained; stopping background work");
        service.stop().await;
        if !workers::background().stop(BACKGROUND_STOP_LIMIT).await {
            tracing::warn!("background tasks did not end within {BACKGROUND_STOP_LIMIT:?}");
        }
        tracing::info!("closing database pools");
        // Bounded: a connection still lent out (to background work that did not stop in time)
        // must not keep the process past its grace period.
        if tokio::time::timeout(POOL_CLOSE_LIMIT, db.close())
            .await
            .is_err()
        {
            tracing::warn!("database pools not closed within {POOL_CLOSE_LIMIT:?}; exiting anyway");
        }
        Ok::<(), String>(())
    });
    match outcome {
        Ok(()) => {
            tracing::info!("{} stopped", S::NAME);
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "{} failed", S::NAME);
            fail(S::NAME, 1, &err)
        }
    }
}

/// Raises the soft limit of open files to the hard limit: every socket is a file, and the soft
/// default (often 1,024) is far below what a server holding WebSockets needs.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the struct passed, which lives across them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let soft = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                tracing::debug!(
                    from = soft,
                    to = limit.rlim_max,
                    "raised the open files limit"
                );
            }
        }
    }
}

/// Why a one-shot command ([`run_command`]) did not finish.
#[derive(Debug)]
pub enum CommandError {
    /// A variable is missing or invalid: exit code 2.
    Config(ConfigError),
    /// The work failed: exit code 1.
    Failed(String),
}

impl From<ConfigError> for CommandError {
    fn from(err: ConfigError) -> Self {
        Self::Config(err)
    }
}

/// Runs a one-shot command of a service binary (`<binary> migrate`, or a service's own, such as
/// `analysis rebuild`) with the service's JSON logs (`RUST_LOG`, default `info`; no trace
/// exporter) on a current-thread runtime. Exits 0 when `work` succeeds, 2 on a configuration
/// error (one line on stderr naming the variable), 1 on a failure (logged, and on stderr).
pub fn run_command<F, Fut>(service: &'static str, command: &str, work: F) -> ExitCode
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = Result<(), CommandError>>,
{
    let env = Env::from_process();
    let logs = TelemetryConfig {
        log_filter: env.raw("RUST_LOG").unwrap_or_else(|| "info".to_owned()),
        otlp_endpoint: None,
    };
    let _telemetry = match telemetry::init(service, &logs) {
        Ok(guard) => guard,
        Err(err) => return bad_config(service, err),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(service, 1, &format_args!("cannot start a runtime: {err}")),
    };
    match runtime.block_on(work(env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CommandError::Config(err)) => bad_config(service, err),
        Err(CommandError::Failed(err)) => {
            tracing::error!(error = %err, "{command} failed");
            fail(service, 1, &err)
        }
    }
}

/// `<binary> migrate`: applies the service's pending migrations on the primary and exits. Only
/// `DATABASE_WRITER_URL` (and `RUST_LOG`) matter. Concurrent runs are safe: the migrator holds
/// an advisory lock while it works.
fn migrate<S: Service>() -> ExitCode {
    run_command(S::NAME, "migrate", |env| async move {
        let url = env.postgres_url("DATABASE_WRITER_URL")?;
        let Some(migrator) = S::migrations() else {
            tracing::info!("{} has no migrations", S::NAME);
            return Ok(());
        };
        let mut conn = sqlx::PgConnection::connect(url.expose())
            .await
            .map_err(|err| {
                CommandError::Failed(format!("cannot connect to DATABASE_WRITER_URL: {err}"))
            })?;
        migrator
            .run(&mut conn)
            .await
            .map_err(|err| CommandError::Failed(format!("migration failed: {err}")))?;
        let _ = conn.close().await;
        let latest = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        tracing::info!(
            migrations = migrator.iter().count(),
            version = latest,
            "database schema is up to date"
        );
        Ok(())
    })
}
