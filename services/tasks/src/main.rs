//! The tasks service. Its domain routes arrive with their issues; until then it runs the shared
//! spine: configuration, telemetry, health, readiness, metrics and graceful shutdown.

use std::process::ExitCode;

/// Port used when `HTTP_PORT` is not set.
const DEFAULT_PORT: u16 = 8082;

fn main() -> ExitCode {
    service_kit::run_service("tasks", DEFAULT_PORT, |_routes| {})
}
