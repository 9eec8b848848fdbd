//! `local-push [--port N]`: the local Web Push service for the local stack, until SIGINT/SIGTERM.

use std::io::Write as _;
use std::process::ExitCode;

use local_push::LocalPush;

const USAGE: &str = "usage: local-push [--port N]   (N = 0, the default: a free port)";

fn parse_port(mut args: impl Iterator<Item = String>) -> Result<u16, String> {
    let mut port = 0;
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "--port" => args.next().ok_or("--port needs a value")?,
            "-h" | "--help" => return Err(String::new()),
            _ => match arg.strip_prefix("--port=") {
                Some(value) => value.to_owned(),
                None => return Err(format!("unknown argument {arg:?}")),
            },
        };
        port = value
            .parse()
            .map_err(|_| format!("--port {value:?} is not a port number"))?;
    }
    Ok(port)
}

async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let port = match parse_port(std::env::args().skip(1)) {
        Ok(port) => port,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("local-push: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let push = match LocalPush::try_start_on(port).await {
        Ok(push) => push,
        Err(e) => {
            eprintln!("local-push: cannot listen on 127.0.0.1:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("local push service listening on {}", push.url());
    let _ = std::io::stdout().flush();
    terminated().await;
    push.go_down().await;
    ExitCode::SUCCESS
}
