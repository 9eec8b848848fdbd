//! `cargo xtask test`: formatting, lints, the deployment checks, every test against a throwaway
//! stack, then a smoke run of `cargo xtask up` itself, twice, exactly as a developer would use it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use events::catalog::{EventPayload, TaskCreated, TASKS_TASK};
use reqwest::Version;

use crate::stack::{self, Infra, StackLayout, SERVICES};
use crate::up_process::RunningUp;
use crate::{
    cargo, cargo_command, observability, prereqs, workspace_root, Build, EDGE_PORT, LOCAL_PUSH_PORT,
};

/// `cargo xtask test`: formatting, lints, then every test against a throwaway stack of its own
/// (ports 26432/26433/19092, so it can run beside `cargo xtask up`).
pub fn test() -> Result<TestCounts> {
    let root = workspace_root();
    cargo(&["fmt", "--all", "--", "--check"])?;
    prereqs::ensure_build_tools()?;
    prereqs::ensure_h2load()?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ])?;
    // Build everything before the stack starts, so build time is not stack time; the smoke
    // runs, load scenarios and benchmarks after the tests run these same binaries.
    Build::AsTests.run(&[], &[])?;
    // Charts, cluster manifests, ArgoCD and the Dockerfile: rendered, validated and audited.
    let deploy_checks = crate::deploy_check::run(Build::AsTests)?;

    let infra = start_test_stack(&root)?;
    let mut cargo_test = cargo_command()
        // Every test binary runs even after one fails, so a red run shows all that is wrong.
        .args(["test", "--workspace", "--no-fail-fast"])
        .envs(test_stack_env(&infra))
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    // Echo the output and add up the per-binary summaries for one closing line.
    let mut counts = TestCounts {
        passed: deploy_checks,
        ..TestCounts::default()
    };
    if let Some(stdout) = cargo_test.stdout.take() {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            println!("{line}");
            counts.add_summary(&line);
        }
    }
    let status = cargo_test.wait();
    infra.stop();
    if !status.context("running cargo test")?.success() || counts.failed > 0 {
        println!("summary: {counts}");
        bail!("tests failed");
    }
    Ok(counts)
}

/// The stack the integration tests run against, schema and topics in place, as a deploy leaves
/// them before any service starts.
fn start_test_stack(root: &Path) -> Result<Infra> {
    let infra = Infra::start(StackLayout::test(&stack::state_dir(root)))?;
    let layout = &infra.layout;
    println!(
        "xtask: test stack up (primary :{}, replica :{}, broker :{})",
        layout.primary_port, layout.replica_port, layout.broker_port
    );
    let prepared = crate::target_dir()
        .and_then(|target| {
            crate::bootstrap::migrate_all(
                &target.join("debug"),
                layout.primary_port,
                &infra.logs_dir(),
            )
        })
        .and_then(|()| infra.create_topics());
    if let Err(err) = prepared {
        infra.stop();
        return Err(err);
    }
    Ok(infra)
}

/// What tells the integration tests (`test_support::TestStack`) where the stack is.
fn test_stack_env(infra: &Infra) -> Vec<(&'static str, String)> {
    let layout = &infra.layout;
    vec![
        (
            "TASKSTREAM_TEST_PRIMARY_PORT",
            layout.primary_port.to_string(),
        ),
        (
            "TASKSTREAM_TEST_REPLICA_PORT",
            layout.replica_port.to_string(),
        ),
        (
            "TASKSTREAM_TEST_BROKER",
            format!("127.0.0.1:{}", layout.broker_port),
        ),
        (
            "TASKSTREAM_TEST_SCRATCH",
            layout.root.join("scratch").display().to_string(),
        ),
        (
            "TASKSTREAM_TEST_BROKER_BIN",
            infra.broker_bin.display().to_string(),
        ),
    ]
}

/// `cargo xtask stack`: the test stack alone, until Ctrl-C, for running chosen integration
/// tests against it (`eval` the printed exports, then `cargo test -p … --test … NAME`).
pub async fn stack_until_signal() -> Result<()> {
    Build::AsTests.run(&[], &[])?;
    let infra = start_test_stack(&workspace_root())?;
    for (name, value) in test_stack_env(&infra) {
        println!("export {name}={value}");
    }
    println!("xtask: test stack ready; Ctrl-C stops it");
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    infra.stop();
    Ok(())
}

/// Passed and failed tests, added up over cargo's `test result:` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u32,
    pub failed: u32,
}

impl TestCounts {
    /// Adds `test result: ok. 3 passed; 0 failed; ...` to the totals; other lines change nothing.
    fn add_summary(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            match (
                words.next().and_then(|n| n.parse::<u32>().ok()),
                words.next(),
            ) {
                (Some(n), Some("passed")) => self.passed += n,
                (Some(n), Some("failed")) => self.failed += n,
                _ => {}
            }
        }
    }
}

impl std::fmt::Display for TestCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)
    }
}

/// Starts `cargo xtask up` (this binary), waits for `ready`, checks the acceptance points over
/// real sockets, sends SIGTERM and expects a clean exit; twice, to prove a rerun reuses its data.
pub async fn smoke_up() -> Result<()> {
    for round in 1..=2 {
        let h1 = reqwest::Client::builder()
            .http1_only()
            .timeout(Duration::from_secs(10))
            .build()?;
        let h2c = reqwest::Client::builder()
            .http2_prior_knowledge()
            .timeout(Duration::from_secs(10))
            .build()?;
        println!("xtask: smoke run {round}/2 of `cargo xtask up`");
        let up = RunningUp::start(Build::AsTests, &[]).await?;

        // Through the edge over h2c: the tasks service itself answers (it wants a token).
        let routed = h2c
            .get(format!("http://127.0.0.1:{EDGE_PORT}/v1/tasks"))
            .send()
            .await?;
        ensure!(
            routed.version() == Version::HTTP_2,
            "edge did not answer over HTTP/2"
        );
        let status = routed.status();
        let body = routed.text().await?;
        ensure!(
            status == 401 && body.contains("\"code\":\"unauthorized\""),
            "edge did not reach tasks: {status} {body}"
        );
        for (service, port) in SERVICES {
            for (client, version) in [(&h1, Version::HTTP_11), (&h2c, Version::HTTP_2)] {
                for path in ["/healthz", "/readyz", "/metrics"] {
                    let response = client
                        .get(format!("http://127.0.0.1:{port}{path}"))
                        .send()
                        .await?;
                    ensure!(
                        response.status() == 200 && response.version() == version,
                        "{service} {path} over {version:?}: {}",
                        response.status()
                    );
                }
            }
        }
        // The local push service answers, and notifications has push on (its server key).
        let push = h1
            .get(format!("http://127.0.0.1:{LOCAL_PUSH_PORT}/messages"))
            .send()
            .await?;
        ensure!(
            push.status() == 200,
            "local push service: {}",
            push.status()
        );
        let key = h1
            .get(format!(
                "http://127.0.0.1:{EDGE_PORT}/v1/notifications/push-key"
            ))
            .send()
            .await?;
        ensure!(
            key.status() == 200,
            "push is not on in notifications: GET /v1/notifications/push-key answered {}",
            key.status()
        );
        let up_layout = StackLayout::up(Path::new("."));
        let replica = Command::new("psql")
            .args([
                "--host=127.0.0.1",
                "--username=postgres",
                "-Atc",
                "select pg_is_in_recovery()",
            ])
            .arg(format!("--port={}", up_layout.replica_port))
            .output()
            .context("running psql")?;
        ensure!(
            String::from_utf8_lossy(&replica.stdout).trim() == "t",
            "port {} is not a replica",
            up_layout.replica_port
        );

        if round == 1 {
            published_task_shows_in_kcat(&h1, up_layout.broker_port).await?;
            observability::check_running(&h1).await?;
            crate::fuzz::run(&h1, &[]).await?;
        }

        // Idle h2c connections would hold the services' drain (see `RunningUp::stop`).
        drop((h1, h2c));
        up.stop().await?;
        let service_ports = SERVICES.iter().map(|(_, port)| *port);
        let infra_ports = [
            up_layout.primary_port,
            up_layout.replica_port,
            up_layout.broker_port,
        ];
        for port in service_ports
            .chain(infra_ports)
            .chain([EDGE_PORT, LOCAL_PUSH_PORT])
            .chain([
                observability::PROMETHEUS_PORT,
                observability::ALERTMANAGER_PORT,
                observability::TRACES_PORT,
            ])
        {
            ensure!(
                std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
                "port {port} still open after `cargo xtask up` stopped"
            );
        }
    }
    println!("xtask: smoke test of `cargo xtask up` passed (2 runs)");
    Ok(())
}

/// Signs up `username` through the edge (a rerun finds the account already there, and the login
/// works all the same) and returns an access token.
pub(crate) async fn account_token(client: &reqwest::Client, username: &str) -> Result<String> {
    let edge = format!("http://127.0.0.1:{EDGE_PORT}");
    let account = serde_json::json!({
        "username": username,
        "password": format!("{username}-local-password"),
    });
    client
        .post(format!("{edge}/v1/auth/signup"))
        .json(&account)
        .send()
        .await?;
    let tokens: serde_json::Value = client
        .post(format!("{edge}/v1/auth/login"))
        .json(&account)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(tokens["access_token"]
        .as_str()
        .context("access token")?
        .to_owned())
}

/// A task created through the edge shows on `tasks.task.v1` in kcat, with its CloudEvents
/// headers: what a product team would see on the running stack.
async fn published_task_shows_in_kcat(client: &reqwest::Client, broker_port: u16) -> Result<()> {
    let edge = format!("http://127.0.0.1:{EDGE_PORT}");
    let token = &account_token(client, &format!("smoke{}", std::process::id())).await?;
    let task: serde_json::Value = client
        .post(format!("{edge}/v1/tasks"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "title": "seen in kcat" }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = task["id"].as_str().context("task id")?.to_owned();
    let topic = TASKS_TASK.name;
    let expected = format!("ce_type={}", TaskCreated::TYPE);
    let broker = format!("127.0.0.1:{broker_port}");
    for _ in 0..20 {
        let broker = broker.clone();
        // kcat may have to be installed first: blocking work, off the async threads.
        let output = tokio::task::spawn_blocking(move || {
            let args = [
                "-C",
                "-b",
                &broker,
                "-t",
                topic,
                "-o",
                "beginning",
                "-e",
                "-q",
                "-f",
                "%k %h\n",
            ];
            crate::events_tools::kcat_command(&args)?
                .output()
                .context("running kcat")
        })
        .await??;
        let listing = String::from_utf8_lossy(&output.stdout);
        if listing
            .lines()
            .any(|line| line.starts_with(&id) && line.contains(&expected))
        {
            println!("xtask: kcat shows task {id} on {topic} with its CloudEvents headers");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("kcat does not show task {id} on {topic}")
}

#[cfg(test)]
mod tests {
    use super::TestCounts;

    #[test]
    fn adds_up_cargo_summaries_and_ignores_other_lines() {
        let mut counts = TestCounts::default();
        counts.add_summary("test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.4s");
        counts.add_summary(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        counts.add_summary("test a_test_named_5_passed ... ok");
        assert_eq!(
            counts,
            TestCounts {
                passed: 4,
                failed: 2
            }
        );
        assert_eq!(counts.to_string(), "4 passed, 2 failed");
    }
}
