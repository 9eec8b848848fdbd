//! `analysis` serves the analysis API; `analysis migrate` applies its migrations; `analysis
//! rebuild` recomputes the read models from the topics (see `domain::rebuild`).

use std::process::ExitCode;

use service_kit::CommandError;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("rebuild") => rebuild(),
        _ => service_kit::run::<analysis::AnalysisService>(),
    }
}

/// Needs `DATABASE_WRITER_URL` and `KAFKA_BOOTSTRAP_SERVERS`; logs what it did.
fn rebuild() -> ExitCode {
    service_kit::run_command("analysis", "rebuild", |env| async move {
        let url = env.postgres_url("DATABASE_WRITER_URL")?;
        let broker = env.required("KAFKA_BOOTSTRAP_SERVERS")?;
        let report = analysis::domain::rebuild::rebuild(url.expose(), &broker)
            .await
            .map_err(|err| CommandError::Failed(err.to_string()))?;
        tracing::info!(
            replayed = report.replayed,
            caught_up = report.caught_up,
            "read models rebuilt from the topics and swapped in; events that arrived meanwhile applied again"
        );
        Ok(())
    })
}
