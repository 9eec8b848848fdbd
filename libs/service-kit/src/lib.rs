//! The spine every taskstream service shares, so a service's own crate holds only its domain.
//!
//! - [`config`]: settings from the environment, validated before anything starts;
//! - [`telemetry`]: JSON logs with trace ids, OTLP traces;
//! - [`metrics`]: the Prometheus recorder and the shared metric names;
//! - [`http`]: the HTTP/1.1 + h2c server, standard endpoints, error responses, graceful shutdown;
//! - [`db`]: writer and reader pools with replica fallback;
//! - [`broker`]: the Kafka reachability probe.
//!
//! A service's `main` is one call to [`run_service`] with its routes.

pub mod broker;
pub mod config;
pub mod db;
pub mod http;
pub mod metrics;
pub mod telemetry;

use std::process::ExitCode;
use std::sync::Arc;

pub use actix_web;
pub use sqlx;

use crate::broker::BrokerProbe;
use crate::config::ServiceConfig;
use crate::db::Database;
use crate::http::AppContext;

/// Exit code for configuration errors, distinct from runtime failures (1).
const EXIT_BAD_CONFIG: u8 = 2;

/// Reads the configuration, starts telemetry, connects pools and serves until SIGTERM.
///
/// Configuration problems print one line to stderr naming the variable and exit with code 2;
/// other start-up failures exit with 1; a graceful shutdown exits with 0.
pub fn run_service<F>(service_name: &'static str, default_port: u16, routes: F) -> ExitCode
where
    F: Fn(&mut actix_web::web::ServiceConfig) + Send + Clone + 'static,
{
    let fail = |code: u8, message: &dyn std::fmt::Display| {
        eprintln!("{service_name}: {message}");
        ExitCode::from(code)
    };
    let config = match ServiceConfig::from_env(service_name, default_port) {
        Ok(config) => Arc::new(config),
        Err(err) => return fail(EXIT_BAD_CONFIG, &format_args!("configuration error: {err}")),
    };
    let _telemetry = match telemetry::init(service_name, &config.telemetry) {
        Ok(guard) => guard,
        Err(err) => return fail(EXIT_BAD_CONFIG, &format_args!("configuration error: {err}")),
    };
    let metrics = match metrics::install(service_name) {
        Ok(handle) => handle,
        Err(err) => return fail(1, &format_args!("cannot install metrics recorder: {err}")),
    };

    let outcome = actix_web::rt::System::new().block_on(async move {
        // Pools spawn maintenance tasks, so they are built inside the runtime.
        let db = Database::connect_lazy(&config.database).map_err(|err| err.to_string())?;
        let broker = BrokerProbe::new(&config.broker).map_err(|err| err.to_string())?;
        db.spawn_replica_monitor();
        tracing::info!(
            host = %config.http.host,
            port = config.http.port,
            "{service_name} listening (HTTP/1.1 and h2c)"
        );
        let context = AppContext {
            config: config.clone(),
            db: db.clone(),
            broker,
            metrics,
        };
        http::serve(context, routes)
            .await
            .map_err(|err| format!("HTTP server on port {}: {err}", config.http.port))?;
        tracing::info!("in-flight requests drained; closing database pools");
        db.close().await;
        Ok::<(), String>(())
    });
    match outcome {
        Ok(()) => {
            tracing::info!("{service_name} stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "{service_name} failed");
            fail(1, &err)
        }
    }
}
