//! `cargo xtask bench tasks [--smoke]`: the figures of tasks' write and read paths, measured
//! the same way in one run on a fresh `cargo xtask up --release` (`--smoke`: the test build,
//! a few seconds each) with load settings:
//!
//! 1. the CRUD journey through the edge (k6, `loadtest/tasks.js`): requests per second, p99,
//!    failures;
//! 2. the relay's delivery during it: p99 of `outbox_publish_delay_seconds` (an event's write
//!    until the broker acknowledged it), from tasks' `/metrics`;
//! 3. reads straight to tasks with wrk (64 connections): GET by id, then a list of 20, each
//!    with requests per second, p99 and tasks' CPU time per request (from `/proc`).
//!
//! Goals (issue 18), reported as met or not, never failed on: the load generator shares the
//! machine with what it measures. The run fails on failed requests.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::load::{cpu_seconds, pid_of, WrkReport, LOAD_SETTINGS};
use crate::up_process::RunningUp;
use crate::{prereqs, stack, workspace_root, Build, EDGE_PORT};

/// tasks' own port (reads go straight to it, as the peers were measured).
const TASKS: &str = "http://127.0.0.1:8082";
const READ_CONNECTIONS: &str = "64";
/// Tasks the reading account holds: a list page is 20 of them.
const TASKS_TO_READ: usize = 25;

struct Goal {
    what: &'static str,
    met: bool,
}

pub async fn run(smoke: bool) -> Result<()> {
    let root = workspace_root();
    let k6 = prereqs::ensure_k6()?;
    let wrk = prereqs::ensure_wrk()?;
    let reports = stack::reports_dir(&root)?;
    let up = RunningUp::start(Build::for_measurement(smoke), &LOAD_SETTINGS).await?;
    let outcome = measure(&root, &k6, &wrk, &reports, smoke).await;
    let stopped = up.stop().await;
    let report = outcome?;
    stopped?;
    let path = reports.join("tasks-bench.md");
    std::fs::write(&path, &report)?;
    println!("{report}\nxtask: report written to {}", path.display());
    Ok(())
}

async fn measure(
    root: &Path,
    k6: &Path,
    wrk: &Path,
    reports: &Path,
    smoke: bool,
) -> Result<String> {
    let tasks_pid = pid_of("tasks").context("the tasks process")?;
    let mut goals = Vec::new();

    println!("xtask: the CRUD journey through the edge (k6)");
    let status = Command::new(k6)
        .args(["run", "--quiet"])
        .arg(root.join("loadtest/tasks.js"))
        .env("BASE_URL", format!("http://127.0.0.1:{EDGE_PORT}"))
        .env("SMOKE", if smoke { "1" } else { "0" })
        .env("REPORT_DIR", reports)
        .env("K6_NO_USAGE_REPORT", "true")
        .status()
        .context("running k6")?;
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(reports.join("tasks.json")).context("k6's tasks.json")?,
    )?;
    let metric = |name: &str, stat: &str| summary["metrics"][name]["values"][stat].as_f64();
    let journey_rate = metric("http_reqs", "rate").unwrap_or(0.0);
    let journey_p99 = metric("http_req_duration", "p(99)").unwrap_or(f64::NAN);
    let failed = metric("http_req_failed", "rate").unwrap_or(1.0);
    ensure!(
        status.success(),
        "k6 failed ({status}): see {}",
        reports.join("tasks.md").display()
    );
    ensure!(
        failed == 0.0,
        "{:.3}% of the journey's requests failed",
        failed * 100.0
    );
    goals.push(Goal {
        what: "journey ≥ 2,500 req/s with p99 < 25 ms",
        met: journey_rate >= 2_500.0 && journey_p99 < 25.0,
    });
    let steps: Vec<String> = [
        ("POST", "step_create"),
        ("PATCH", "step_update"),
        ("GET", "step_get"),
        ("DELETE", "step_delete"),
    ]
    .iter()
    .map(|(method, metric_name)| {
        format!(
            "{method} {:.1} ms",
            metric(metric_name, "p(99)").unwrap_or(f64::NAN)
        )
    })
    .collect();

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let delay_p99 = publish_delay_p99(&client).await?;

    let token =
        crate::check::account_token(&client, &format!("bench{}", std::process::id())).await?;
    let mut ids = Vec::new();
    for n in 0..TASKS_TO_READ {
        let task: Value = client
            .post(format!("http://127.0.0.1:{EDGE_PORT}/v1/tasks"))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "title": format!("read me {n}"), "labels": ["bench"] }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        ids.push(task["id"].as_str().context("a task id")?.to_owned());
    }
    // Reads without a consistency token go to the replica: let it replay the tasks first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seconds = if smoke { "3s" } else { "20s" };
    let mut reads = Vec::new();
    for (what, path, goal_rate) in [
        ("GET by id", format!("/v1/tasks/{}", ids[0]), 5_000.0),
        ("list of 20", "/v1/tasks?limit=20".to_owned(), 3_100.0),
    ] {
        println!("xtask: wrk {what}, {READ_CONNECTIONS} connections for {seconds}");
        let cpu_before = cpu_seconds(tasks_pid)?;
        let output = Command::new(wrk)
            .args([
                "-t",
                "2",
                "-c",
                READ_CONNECTIONS,
                "-d",
                seconds,
                "--latency",
                "-s",
            ])
            .arg(root.join("loadtest/lib/get.lua"))
            .arg(format!("{TASKS}{path}"))
            .env("TOKEN", &token)
            .output()
            .context("running wrk")?;
        let cpu = cpu_seconds(tasks_pid)? - cpu_before;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        ensure!(output.status.success(), "wrk failed: {text}");
        let report = WrkReport::parse(&text)
            .with_context(|| format!("no REPORT line in wrk's output:\n{text}"))?;
        ensure!(report.requests > 0, "wrk sent no request");
        ensure!(
            report.errors() == 0,
            "{} of wrk's {what} requests failed",
            report.errors()
        );
        let rate = report.requests as f64 / (report.duration_us as f64 / 1e6);
        let cpu_per_request = cpu * 1e6 / report.requests as f64;
        goals.push(Goal {
            what: if what == "GET by id" {
                "GET by id ≥ 5,000 req/s"
            } else {
                "list of 20 ≥ 3,100 req/s"
            },
            met: rate >= goal_rate,
        });
        if what == "GET by id" {
            goals.push(Goal {
                what: "GET by id ≤ 150 µs of tasks' CPU per request",
                met: cpu_per_request <= 150.0,
            });
        }
        reads.push(format!(
            "| {what} | {rate:.0} req/s | p50 {:.2} ms, p99 {:.2} ms | {cpu_per_request:.0} µs |",
            report.p50_us as f64 / 1e3,
            report.p99_us as f64 / 1e3,
        ));
    }

    let goals: Vec<String> = goals
        .iter()
        .map(|goal| {
            format!(
                "- {}: {}",
                goal.what,
                if smoke {
                    "smoke run, not judged"
                } else if goal.met {
                    "met"
                } else {
                    "NOT met"
                }
            )
        })
        .collect();
    Ok(format!(
        "# tasks benchmark ({build})\n\n\
         | what | throughput | latency | tasks CPU per request |\n|---|---|---|---|\n\
         | CRUD journey through the edge (k6, {clients} clients) | {journey_rate:.0} req/s | p99 {journey_p99:.1} ms (per step: {steps}) | - |\n\
         {reads}\n\n\
         Relay delivery during the journey (write → acknowledged by the broker): p99 {delay}.\n\n\
         ## Goals\n\n{goals}\n",
        build = if smoke { "smoke, debug build" } else { "release" },
        // As loadtest/tasks.js runs them.
        clients = if smoke { 2 } else { 32 },
        steps = steps.join(", "),
        reads = reads.join("\n"),
        delay = delay_p99
            .map(|seconds| format!("{:.1} ms", seconds * 1e3))
            .unwrap_or_else(|| "no events published".to_owned()),
        goals = goals.join("\n"),
    ))
}

/// The p99 of `outbox_publish_delay_seconds` on tasks' `/metrics` (the upper bound of the
/// bucket it falls in), if any event was published.
async fn publish_delay_p99(client: &reqwest::Client) -> Result<Option<f64>> {
    let text = client
        .get(format!("{TASKS}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|line| line.starts_with("outbox_publish_delay_seconds_bucket"))
        .filter_map(|line| {
            let le = line.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = line.rsplit(' ').next()?.parse().ok()?;
            Some((bound, count))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let Some(&(_, total)) = buckets.last() else {
        return Ok(None);
    };
    if total == 0.0 {
        return Ok(None);
    }
    Ok(buckets
        .iter()
        .find(|(_, count)| *count >= total * 0.99)
        .map(|(bound, _)| *bound))
}
