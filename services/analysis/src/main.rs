//! `analysis` serves the analysis API; `analysis migrate` applies its migrations; `analysis
//! rebuild` recomputes the read models from the topics (see `domain::rebuild`).

use std::process::ExitCode;

use service_kit::config::Env;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("rebuild") => rebuild(),
        _ => service_kit::run::<analysis::AnalysisService>(),
    }
}

/// Needs `DATABASE_WRITER_URL` and `KAFKA_BOOTSTRAP_SERVERS`; prints what it did.
fn rebuild() -> ExitCode {
    let env = Env::from_process();
    let settings = env
        .postgres_url("DATABASE_WRITER_URL")
        .map_err(|err| err.to_string())
        .and_then(|url| {
            env.raw("KAFKA_BOOTSTRAP_SERVERS")
                .map(|broker| (url, broker))
                .ok_or_else(|| "KAFKA_BOOTSTRAP_SERVERS is not set".to_owned())
        });
    let (url, broker) = match settings {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("analysis rebuild: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("analysis rebuild: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(analysis::domain::rebuild::rebuild(&url, &broker)) {
        Ok(report) => {
            println!(
                "analysis rebuild: {} events replayed into fresh tables, swapped in, {} applied again after the swap",
                report.replayed, report.caught_up
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("analysis rebuild failed: {err}");
            ExitCode::FAILURE
        }
    }
}
