//! `cargo xtask <command>`: the plain entry points for running and checking taskstream.
//!
//! - `up [--release | --as-tests]`: the whole system on this machine (databases, broker,
//!   services, edge, and a local Web Push service that notifications pushes to); `--as-tests`
//!   runs the binaries `cargo test` builds, as the smoke runs do;
//! - `test`: format check, clippy, and every test against a real stack of its own;
//! - `stack`: that test stack alone, for running chosen tests against it;
//! - `deploy-check`: render, validate and audit charts/, k8s/, argocd/ and docker/ offline (also
//!   part of `test`);
//! - `load <scenario> [--smoke]`: a k6 scenario from `loadtest/` against a fresh `up --release`;
//! - `bench <name> [--smoke]`: a benchmark of one part (`consumer` on a stack of its own, `live`,
//!   `push` and `tasks` against a fresh `up`);
//! - `catalog`: write the event catalog (`libs/events/asyncapi.json`) from the payload types;
//! - `kcat <args>`: kcat against the local broker (with a librdkafka that can talk to it);
//! - `edge`: the edge proxy alone (started by `up`);
//! - `observability-check`: on a running `up`, a traced request reaches the trace store from
//!   the edge to the consumers, Prometheus has every service up, every dashboard query answers;
//! - `fuzz [schemathesis options]`: on a running `up`, schemathesis over every OpenAPI document
//!   (also part of `test`);
//! - `profile <service> [--seconds N]`: perf CPU samples of a running service (loadtest/README.md).

mod bench;
mod bench_live;
mod bench_push;
mod bench_tasks;
mod bootstrap;
mod check;
mod deploy_check;
mod edge;
mod events_tools;
mod fuzz;
mod load;
mod observability;
mod prereqs;
mod profile;
mod stack;
mod up_process;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

use crate::stack::{log_file, Infra, StackLayout, SERVICES};

/// The edge's public port.
pub(crate) const EDGE_PORT: u16 = 8080;
/// The local Web Push service's port (`local-push`, started by `up` beside the services).
pub(crate) const LOCAL_PUSH_PORT: u16 = 8085;
/// The local push service's binary, built with the services.
const LOCAL_PUSH: &str = "local-push";

const USAGE: &str =
    "usage: cargo xtask <up [--release | --as-tests] | test | stack | deploy-check | load SCENARIO [--smoke] | bench NAME [--smoke] | catalog | kcat ARGS... | edge PORT SERVICE=URL... | profile SERVICE [--seconds N] | observability-check | fuzz [SCHEMATHESIS OPTIONS]>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("xtask: cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match args.first().map(String::as_str) {
        Some("up") => runtime.block_on(up(if args.iter().any(|arg| arg == "--release") {
            Build::Release
        } else if args.iter().any(|arg| arg == "--as-tests") {
            Build::AsTests
        } else {
            Build::Debug
        })),
        Some("test") => check::test().and_then(|mut counts| {
            runtime.block_on(check::smoke_up())?;
            // Every load scenario, briefly, so a script cannot rot unnoticed.
            for scenario in load::SCENARIOS {
                runtime.block_on(load::run(scenario, true))?;
            }
            for bench in bench::BENCHES {
                bench::run(bench, true)?;
            }
            // The two smoke runs of `cargo xtask up` and the load and bench smoke runs count as
            // tests too.
            counts.passed += 2 + (load::SCENARIOS.len() + bench::BENCHES.len()) as u32;
            println!("summary: {counts}");
            Ok(())
        }),
        Some("stack") => runtime.block_on(check::stack_until_signal()),
        Some("deploy-check") => deploy_check::run(Build::Debug).map(|_| ()),
        Some("load") => match args.get(1) {
            Some(scenario) => {
                runtime.block_on(load::run(scenario, args.iter().any(|arg| arg == "--smoke")))
            }
            None => Err(anyhow::anyhow!("{USAGE}")),
        },
        Some("bench") => match args.get(1) {
            Some(bench) => bench::run(bench, args.iter().any(|arg| arg == "--smoke")),
            None => Err(anyhow::anyhow!("{USAGE}")),
        },
        Some("catalog") => events_tools::write_catalog(),
        Some("kcat") => events_tools::kcat(&args[1..]),
        Some("edge") => runtime.block_on(run_edge(&args[1..])),
        Some("profile") => profile::run(&args[1..]),
        Some("fuzz") => runtime.block_on(async {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?;
            fuzz::run(&client, &args[1..]).await
        }),
        Some("observability-check") => runtime.block_on(async {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?;
            observability::check_running(&client).await
        }),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A `cargo` command: the same cargo that runs xtask, in the workspace root.
pub(crate) fn cargo_command() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// Where cargo puts build output (honours `CARGO_TARGET_DIR` and `build.target-dir`).
pub(crate) fn target_dir() -> Result<PathBuf> {
    let output = cargo_command()
        .args(["metadata", "--format-version=1", "--no-deps", "--offline"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("parsing cargo metadata")?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// This program's path. Cargo may rebuild it while it runs (`cargo test` builds xtask for its
/// own tests), which leaves the running file unlinked; the rebuilt one at the same path is wanted.
pub(crate) fn own_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.to_string_lossy();
    Ok(PathBuf::from(
        path.strip_suffix(" (deleted)").unwrap_or(&path),
    ))
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Runs a command in the workspace with inherited output; fails if it fails.
pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    println!("xtask: cargo {}", args.join(" "));
    let status = cargo_command()
        .args(args)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// How the binaries a command runs are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Build {
    /// Debug build of just what is needed (a developer's `cargo xtask up`).
    Debug,
    /// Optimised (`--release`), for load tests and benchmarks.
    Release,
    /// The debug binaries of `cargo test --workspace --no-run`, which `cargo xtask test` has
    /// built already. Building a smaller set of packages would resolve other dependency
    /// features and compile dozens of crates again (measured: 67 crates, 3 min, for `up`).
    AsTests,
}

impl Build {
    /// What load scenarios and benchmarks run on: release binaries, or in a `--smoke` run the
    /// debug binaries the tests already built.
    pub(crate) fn for_measurement(smoke: bool) -> Self {
        if smoke {
            Build::AsTests
        } else {
            Build::Release
        }
    }

    /// Builds `packages` (or the whole workspace's tests for [`Build::AsTests`]); returns the
    /// profile folder the binaries are in.
    pub(crate) fn run(self, packages: &[&str], extra: &[&str]) -> Result<&'static str> {
        prereqs::ensure_build_tools()?;
        let mut args = vec![];
        match self {
            Build::AsTests => args.extend(["test", "--workspace", "--no-run", "--quiet"]),
            Build::Debug | Build::Release => {
                args.extend(["build", "--quiet"]);
                for package in packages {
                    args.extend(["--package", package]);
                }
                args.extend(extra);
                if self == Build::Release {
                    args.push("--release");
                }
            }
        }
        cargo(&args)?;
        Ok(if self == Build::Release {
            "release"
        } else {
            "debug"
        })
    }
}

/// `cargo xtask up`: builds the services, starts everything, prints `ready`, runs until
/// Ctrl-C/SIGTERM, then stops every process it started.
async fn up(build: Build) -> Result<()> {
    let root = workspace_root();
    // The local push service in the same cargo invocation as the services: one feature
    // resolution, so neither build invalidates the other.
    let mut packages: Vec<&str> = SERVICES
        .iter()
        .map(|(service, _)| *service)
        .chain([LOCAL_PUSH, observability::LOCAL_TRACES])
        .collect();
    if build == Build::Release {
        // The edge (this program's `edge` command) is measured with the services, so it is
        // built as they are: a debug edge took ~8% of the machine in the CRUD journey.
        packages.push("xtask");
    }
    let profile = build.run(&packages, &[])?;

    let infra = Infra::start(StackLayout::up(&stack::state_dir(&root)))?;
    let logs = infra.logs_dir();
    let mut children: Vec<(String, Child)> = Vec::new();
    let started = async {
        infra.create_topics()?;
        start_processes(&infra, profile, &mut children).await
    }
    .await;
    let outcome = match started {
        Ok(()) => {
            println!("logs: {}", logs.display());
            println!(
                "push: http://127.0.0.1:{LOCAL_PUSH_PORT} (local Web Push service: \
                 `curl -X POST http://127.0.0.1:{LOCAL_PUSH_PORT}/subscriptions` makes a \
                 subscription to register as-is with POST /v1/notifications/devices; \
                 GET /messages lists what was pushed)"
            );
            if observability::enabled() {
                println!(
                    "observability: Prometheus http://127.0.0.1:{} (the chart's alert rules; \
                     Alerts tab), Alertmanager http://127.0.0.1:{}, traces \
                     http://127.0.0.1:{}/api/traces/{{trace_id}} (GET /api/traces lists the newest)",
                    observability::PROMETHEUS_PORT,
                    observability::ALERTMANAGER_PORT,
                    observability::TRACES_PORT,
                );
            }
            println!("ready: http://127.0.0.1:{EDGE_PORT}");
            supervise_until_signal(&mut children).await
        }
        Err(err) => Err(err),
    };
    println!("xtask: stopping");
    // Services and edge drain on SIGTERM, all at once; then the infrastructure goes.
    for (_, child) in &children {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for (_, child) in &mut children {
        let _ = local_postgres::wait_or_kill(child, deadline);
    }
    infra.stop();
    outcome
}

async fn start_processes(
    infra: &Infra,
    profile: &str,
    children: &mut Vec<(String, Child)>,
) -> Result<()> {
    let logs = infra.logs_dir();
    let layout = &infra.layout;
    let binaries = target_dir()?.join(profile);
    bootstrap::migrate_all(&binaries, layout.primary_port, &logs)?;
    let auth_keys = bootstrap::auth_keys(&binaries, &layout.root)?;
    // The trace store first, so the services' first spans find it.
    let observed = observability::enabled();
    let mut ready_checks = Vec::new();
    if observed {
        for process in observability::prepare(&workspace_root(), &layout.root, &binaries)? {
            ready_checks.push((process.name.to_owned(), process.ready_url));
            children.push((
                process.name.to_owned(),
                spawn_logged(process.command, &logs, process.name)?,
            ));
        }
    }
    let mut push = Command::new(binaries.join(LOCAL_PUSH));
    push.arg("--port").arg(LOCAL_PUSH_PORT.to_string());
    children.push((
        LOCAL_PUSH.to_owned(),
        spawn_logged(push, &logs, LOCAL_PUSH)?,
    ));
    for (service, port) in SERVICES {
        let mut command = Command::new(binaries.join(service));
        command.envs(bootstrap::service_env(service, port, layout, &auth_keys));
        if observed {
            command.envs(observability::service_env());
        }
        children.push((service.to_owned(), spawn_logged(command, &logs, service)?));
    }
    let edge_binary = if profile == "release" {
        binaries.join("xtask")
    } else {
        own_binary()?
    };
    let mut edge = Command::new(edge_binary);
    edge.arg("edge").arg(EDGE_PORT.to_string());
    for (service, port) in SERVICES {
        edge.arg(format!("{service}=http://127.0.0.1:{port}"));
    }
    children.push(("edge".to_owned(), spawn_logged(edge, &logs, "edge")?));

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let checks = SERVICES
        .iter()
        .map(|(service, port)| {
            (
                service.to_string(),
                format!("http://127.0.0.1:{port}/readyz"),
            )
        })
        .chain([
            (
                "edge".to_owned(),
                format!("http://127.0.0.1:{EDGE_PORT}/healthz"),
            ),
            (
                LOCAL_PUSH.to_owned(),
                format!("http://127.0.0.1:{LOCAL_PUSH_PORT}/messages"),
            ),
        ])
        .chain(ready_checks);
    for (name, url) in checks {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if let Some(exited) = first_exited(children) {
                bail!(
                    "{exited} exited during start-up; see {}",
                    logs.join(format!("{exited}.log")).display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} not ready within 60 s ({url}); see {}",
                    logs.join(format!("{name}.log")).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

fn spawn_logged(mut command: Command, logs: &Path, name: &str) -> Result<Child> {
    let log = log_file(logs, name)?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    local_postgres::supervise(&mut command);
    command.spawn().with_context(|| format!("starting {name}"))
}

fn first_exited(children: &mut [(String, Child)]) -> Option<String> {
    children
        .iter_mut()
        .find_map(|(name, child)| matches!(child.try_wait(), Ok(Some(_))).then(|| name.clone()))
}

async fn supervise_until_signal(children: &mut [(String, Child)]) -> Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = tick.tick() => {
                if let Some(exited) = first_exited(children) {
                    bail!("{exited} exited unexpectedly; stopping everything");
                }
            }
        }
    }
}

async fn run_edge(args: &[String]) -> Result<()> {
    let (port, upstreams) = args.split_first().context(USAGE)?;
    let port: u16 = port.parse().context("edge PORT")?;
    let upstreams: HashMap<String, String> = upstreams
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(service, url)| (service.to_owned(), url.trim_end_matches('/').to_owned()))
                .with_context(|| format!("expected SERVICE=URL, got {pair:?}"))
        })
        .collect::<Result<_>>()?;
    edge::run(port, upstreams).await
}
