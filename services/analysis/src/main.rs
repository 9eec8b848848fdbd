//! The analysis service. Its domain routes arrive with their issues; until then it runs the shared
//! spine: configuration, telemetry, health, readiness, metrics and graceful shutdown.

use std::process::ExitCode;

/// Port used when `HTTP_PORT` is not set.
const DEFAULT_PORT: u16 = 8084;

fn main() -> ExitCode {
    service_kit::run_service("analysis", DEFAULT_PORT, |_routes| {})
}
