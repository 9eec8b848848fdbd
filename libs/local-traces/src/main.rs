//! `local-traces [--port N] [--max-spans N]`: the local trace store for the local stack, until
//! SIGINT/SIGTERM. Services export to it with `OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:N`.

use std::io::Write as _;
use std::process::ExitCode;

use local_traces::{LocalTraces, DEFAULT_MAX_SPANS};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str =
    "usage: local-traces [--port N] [--max-spans N]   (port 0, the default: a free port)";

fn parse(mut args: impl Iterator<Item = String>) -> Result<(u16, usize), String> {
    let (mut port, mut max_spans) = (0u16, DEFAULT_MAX_SPANS);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--port" => port = value.parse().map_err(|_| format!("--port {value:?}"))?,
            "--max-spans" => {
                max_spans = value
                    .parse()
                    .map_err(|_| format!("--max-spans {value:?}"))?
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok((port, max_spans))
}

#[tokio::main]
async fn main() -> ExitCode {
    let (port, max_spans) = match parse(std::env::args().skip(1)) {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("local-traces: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(err) => {
            eprintln!("local-traces: cannot watch for SIGTERM: {err}");
            return ExitCode::FAILURE;
        }
    };
    let traces = match LocalTraces::start_on(port, max_spans).await {
        Ok(traces) => traces,
        Err(err) => {
            eprintln!("local-traces: cannot listen on 127.0.0.1:{port}: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "local trace store on {} (OTLP/HTTP protobuf at /v1/traces; GET /api/traces/{{trace_id}}), keeping {max_spans} spans",
        traces.url()
    );
    let _ = std::io::stdout().flush();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    traces.stop().await;
    ExitCode::SUCCESS
}
