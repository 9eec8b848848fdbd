//! The tasks service. Its domain routes arrive with their issues; until then it runs the shared
//! spine: configuration, telemetry, health, readiness, metrics and graceful shutdown.

use std::process::ExitCode;

use service_kit::actix_web::web;
use service_kit::config::{ConfigError, Env};
use service_kit::http::AppContext;
use service_kit::Service;

struct Tasks;

impl Service for Tasks {
    const NAME: &'static str = "tasks";
    const DEFAULT_PORT: u16 = 8082;
    type Settings = ();

    fn settings(_: &Env) -> Result<(), ConfigError> {
        Ok(())
    }

    async fn start(_: (), _: &AppContext) -> Result<Self, String> {
        Ok(Self)
    }

    fn routes(&self, _: &mut web::ServiceConfig) {}
}

fn main() -> ExitCode {
    service_kit::run::<Tasks>()
}
