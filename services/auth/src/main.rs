//! The auth service. Its domain routes arrive with their issues; until then it runs the shared
//! spine: configuration, telemetry, health, readiness, metrics and graceful shutdown.

use std::process::ExitCode;

use service_kit::actix_web::web;
use service_kit::config::{ConfigError, Env};
use service_kit::http::AppContext;
use service_kit::Service;

struct Auth;

impl Service for Auth {
    const NAME: &'static str = "auth";
    const DEFAULT_PORT: u16 = 8081;
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
    service_kit::run::<Auth>()
}
