//! The local stack's observability, started by `cargo xtask up` beside the services (unless
//! `TASKSTREAM_OBSERVABILITY=off`): Prometheus scraping every service with the alert and
//! recording rules of `charts/observability` (rendered from the chart with its dev values, so the
//! rules have one source), Alertmanager receiving its alerts, and the local trace store
//! (`local-traces`) that the services export their spans to over OTLP.
//!
//! Prometheus and Alertmanager are Debian's (2.42 and 0.25), unpacked under `.local/debian/`
//! rather than installed, since installing them starts system-wide servers on every interface.
//! Everything listens on loopback only and keeps its data under the stack's state folder.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::deploy_check::python;
use crate::prereqs;
use crate::stack::SERVICES;
use crate::EDGE_PORT;

pub const PROMETHEUS_PORT: u16 = 9090;
pub const ALERTMANAGER_PORT: u16 = 9093;
/// OTLP/HTTP's standard port.
pub const TRACES_PORT: u16 = 4318;
/// The local trace store's binary, built with the services.
pub const LOCAL_TRACES: &str = "local-traces";
/// How often the local Prometheus scrapes and evaluates rules: short, so a person (or the smoke
/// test) sees a change within seconds. The cluster's Prometheus scrapes every 15 s.
const SCRAPE_INTERVAL: &str = "2s";

/// Whether `up` starts the observability processes: on unless `TASKSTREAM_OBSERVABILITY=off`
/// (load tests and benchmarks turn it off, so span export doesn't take part in their figures).
pub fn enabled() -> bool {
    std::env::var("TASKSTREAM_OBSERVABILITY").map_or(true, |value| value != "off")
}

/// The environment that makes a service export its spans to the local trace store.
pub fn service_env() -> Vec<(&'static str, String)> {
    vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{TRACES_PORT}"),
        ),
        // Batches leave every half second (the SDK's default is 5 s), so a trace is queryable
        // right after its request.
        ("OTEL_BSP_SCHEDULE_DELAY", "500".to_owned()),
    ]
}

/// One process to start, and the URL that answers 200 once it is ready.
pub struct Process {
    pub name: &'static str,
    pub command: Command,
    pub ready_url: String,
}

/// Renders the rules, writes the configuration under `state/` and returns the commands for
/// the trace store, Prometheus and Alertmanager. `binaries` is the folder `local-traces` is in.
pub fn prepare(root: &Path, state: &Path, binaries: &Path) -> Result<Vec<Process>> {
    let debian = root.join(".local/debian");
    let prometheus =
        prereqs::ensure_unpacked(&debian.join("prometheus"), "prometheus", "prometheus")?;
    let alertmanager = prereqs::ensure_unpacked(
        &debian.join("prometheus-alertmanager"),
        "prometheus-alertmanager",
        "prometheus-alertmanager",
    )?;
    install_alertmanager_templates(&debian.join("prometheus-alertmanager"))?;
    let dir = state.join("observability");
    let rules = render_rules(root, &dir)?;
    let config = dir.join("prometheus.yml");
    std::fs::write(&config, prometheus_config(&rules))?;
    let alertmanager_config = dir.join("alertmanager.yml");
    // Alerts are kept and shown in Alertmanager's UI, and sent nowhere.
    std::fs::write(
        &alertmanager_config,
        "route:\n  receiver: local\n  group_wait: 5s\nreceivers:\n  - name: local\n",
    )?;
    // Metrics start empty each run: series from an earlier run would pass for current ones.
    let tsdb = dir.join("prometheus-data");
    if tsdb.exists() {
        std::fs::remove_dir_all(&tsdb).context("clearing the previous run's metrics")?;
    }

    let mut traces = Command::new(binaries.join(LOCAL_TRACES));
    traces.arg("--port").arg(TRACES_PORT.to_string());
    let mut prometheus = Command::new(prometheus);
    prometheus
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", tsdb.display()))
        .arg("--storage.tsdb.retention.time=1d")
        .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"));
    let mut alertmanager = Command::new(alertmanager);
    alertmanager
        .arg(format!("--config.file={}", alertmanager_config.display()))
        .arg(format!(
            "--storage.path={}",
            dir.join("alertmanager-data").display()
        ))
        .arg(format!(
            "--web.listen-address=127.0.0.1:{ALERTMANAGER_PORT}"
        ))
        // One instance: no gossip port on every interface.
        .arg("--cluster.listen-address=");
    Ok(vec![
        Process {
            name: LOCAL_TRACES,
            command: traces,
            ready_url: format!("http://127.0.0.1:{TRACES_PORT}/api/traces?limit=1"),
        },
        Process {
            name: "prometheus",
            command: prometheus,
            ready_url: format!("http://127.0.0.1:{PROMETHEUS_PORT}/-/ready"),
        },
        Process {
            name: "alertmanager",
            command: alertmanager,
            ready_url: format!("http://127.0.0.1:{ALERTMANAGER_PORT}/-/ready"),
        },
    ])
}

/// Debian's Alertmanager reads its notification templates from a fixed system path (a Debian
/// patch) and stops without them. Unpacked rather than installed, the package has them only in
/// `unpacked`: put the two files where the binary looks, as `apt install` would.
fn install_alertmanager_templates(unpacked: &Path) -> Result<()> {
    let system = Path::new("/usr/share/prometheus/alertmanager");
    let shipped = unpacked.join("usr/share/prometheus/alertmanager");
    for template in ["default.tmpl", "email.tmpl"] {
        if system.join(template).is_file() {
            continue;
        }
        std::fs::create_dir_all(system)
            .and_then(|()| std::fs::copy(shipped.join(template), system.join(template)))
            .with_context(|| {
                format!(
                    "Debian's Alertmanager needs {}: run `sudo mkdir -p {} && sudo cp {}/*.tmpl {}`, \
                     or start without observability (TASKSTREAM_OBSERVABILITY=off)",
                    system.join(template).display(),
                    system.display(),
                    shipped.display(),
                    system.display()
                )
            })?;
    }
    Ok(())
}

/// The chart's rule files as the dev environment renders them (Helm's engine, as in
/// deploy-check), written to `dir/rules/`. Returns that folder.
fn render_rules(root: &Path, dir: &Path) -> Result<PathBuf> {
    prereqs::ensure_deploy_check_packages()?;
    let scripts = root.join("xtask/deploy-check");
    let rendered = dir.join("rendered");
    let rules = dir.join("rules");
    for old in [&rendered, &rules] {
        if old.exists() {
            std::fs::remove_dir_all(old)?;
        }
    }
    std::fs::create_dir_all(&rendered)?;
    let plan = dir.join("plan.json");
    std::fs::write(
        &plan,
        serde_json::to_vec(&json!([{
            "name": "observability",
            "chart": "charts/observability",
            "values": ["charts/observability/values-dev.yaml"],
            "release": "observability",
            "namespace": "observability",
        }]))?,
    )?;
    python(root, &scripts.join("render.py"), &[&plan, &rendered])?;
    python(
        root,
        &scripts.join("inspect.py"),
        &[Path::new("promql"), &rendered.join("observability"), &rules],
    )?;
    // inspect.py also writes the dashboards' queries as recording rules, for promtool: they
    // are not rules to run.
    std::fs::remove_file(rules.join("dashboards.yaml"))?;
    Ok(rules)
}

fn prometheus_config(rules: &Path) -> String {
    let mut targets = String::new();
    for (service, port) in SERVICES {
        // As in the cluster: `service` comes from the service's own series, `pod` from the
        // target (discovery there).
        targets.push_str(&format!(
            "          - targets: [\"127.0.0.1:{port}\"]\n            labels: {{namespace: local, pod: {service}-local}}\n"
        ));
    }
    format!(
        "global:
  scrape_interval: {SCRAPE_INTERVAL}
  evaluation_interval: {SCRAPE_INTERVAL}
  external_labels:
    environment: local
rule_files:
  - {rules}/*.yaml
alerting:
  alertmanagers:
    - static_configs:
        - targets: [\"127.0.0.1:{ALERTMANAGER_PORT}\"]
scrape_configs:
  - job_name: taskstream
    static_configs:
{targets}  - job_name: observability
    static_configs:
      - targets: [\"127.0.0.1:{PROMETHEUS_PORT}\"]
        labels: {{component: prometheus}}
      - targets: [\"127.0.0.1:{ALERTMANAGER_PORT}\"]
        labels: {{component: alertmanager}}
",
        rules = rules.display()
    )
}

/// On a running `up`: a task created through the edge with a known `traceparent` comes back
/// from the trace store as one trace holding the request and its statements in tasks, the
/// relay's publish and a consumer's handling; Prometheus has every service up; and every
/// dashboard query returns data.
pub async fn check_running(client: &reqwest::Client) -> Result<()> {
    one_trace_from_request_to_consumer(client).await?;
    every_service_up(client).await?;
    every_dashboard_query_answers(client).await?;
    Ok(())
}

async fn one_trace_from_request_to_consumer(client: &reqwest::Client) -> Result<()> {
    let mut random = [0u8; 24];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut random)?;
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let (trace_id, parent_id) = (hex(&random[..16]), hex(&random[16..]));
    let edge = format!("http://127.0.0.1:{EDGE_PORT}");
    let token =
        crate::check::account_token(client, &format!("traced{}", std::process::id())).await?;
    let created = client
        .post(format!("{edge}/v1/tasks"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-{parent_id}-01"))
        .json(&json!({"title": "Traced from the edge to the consumers"}))
        .send()
        .await?;
    ensure!(
        created.status() == 201,
        "POST /v1/tasks answered {}",
        created.status()
    );

    let url = format!("http://127.0.0.1:{TRACES_PORT}/api/traces/{trace_id}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans: Vec<Value> = match client.get(&url).send().await {
            Ok(answer) if answer.status() == 200 => answer.json::<Value>().await?["spans"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let has = |service: &[&str], test: &dyn Fn(&Value) -> bool| {
            spans.iter().any(|span| {
                service.contains(&span["service"].as_str().unwrap_or_default()) && test(span)
            })
        };
        let missing: Vec<&str> = [
            (
                "the request in tasks (a server span, child of our traceparent)",
                has(&["tasks"], &|span| {
                    span["kind"] == "server" && span["parent_span_id"] == parent_id.as_str()
                }),
            ),
            (
                "the wait for a connection in tasks (db.acquire)",
                has(&["tasks"], &|span| span["name"] == "db.acquire"),
            ),
            (
                "a statement in tasks (a span below db.write or db.transaction)",
                has(&["tasks"], &|span| {
                    spans.iter().any(|parent| {
                        (parent["name"] == "db.write" || parent["name"] == "db.transaction")
                            && parent["span_id"] == span["parent_span_id"]
                            && span["name"] != "db.commit"
                    })
                }),
            ),
            (
                "the outbox enqueue in tasks",
                has(&["tasks"], &|span| span["name"] == "outbox.enqueue"),
            ),
            (
                "the relay's publish in tasks",
                has(&["tasks"], &|span| span["name"] == "outbox publish"),
            ),
            (
                "a consumer's handling (notifications or analysis)",
                has(&["notifications", "analysis"], &|span| {
                    span["name"] == "event"
                }),
            ),
        ]
        .into_iter()
        .filter_map(|(what, found)| (!found).then_some(what))
        .collect();
        if missing.is_empty() {
            println!(
                "xtask: trace {trace_id}: {} spans from the edge's request to the consumers",
                spans.len()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            let seen: Vec<String> = spans
                .iter()
                .map(|span| format!("{}:{}", span["service"], span["name"]))
                .collect();
            bail!("trace {trace_id} lacks {missing:?} after 30 s; it holds {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Runs `query` against the local Prometheus; returns its result vector.
async fn prometheus_query(client: &reqwest::Client, query: &str) -> Result<Vec<Value>> {
    let answer: Value = client
        .get(format!("http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query"))
        .query(&[("query", query)])
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        answer["status"] == "success",
        "{query}: {}",
        answer["error"]
    );
    Ok(answer["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

async fn every_service_up(client: &reqwest::Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = prometheus_query(client, "up{job=\"taskstream\"}").await?;
        let down: Vec<&str> = SERVICES
            .iter()
            .filter(|(_, port)| {
                !up.iter().any(|series| {
                    series["metric"]["instance"] == format!("127.0.0.1:{port}").as_str()
                        && series["value"][1] == "1"
                })
            })
            .map(|(service, _)| *service)
            .collect();
        if down.is_empty() {
            let rules: Value = client
                .get(format!("http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/rules"))
                .send()
                .await?
                .json()
                .await?;
            let groups = rules["data"]["groups"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let alerts = groups
                .iter()
                .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
                .filter(|rule| rule["type"] == "alerting")
                .count();
            ensure!(
                alerts > 0,
                "the local Prometheus loaded no alert rules from charts/observability: {rules}"
            );
            println!(
                "xtask: the local Prometheus has up == 1 for every service and evaluates the \
                 chart's {alerts} alert rules in {} groups",
                groups.len()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the local Prometheus does not see {down:?} up after 30 s: {up:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every panel query of every dashboard in `charts/observability/dashboards/`, with Grafana's
/// variables as a person first opening it would have them (all services, a 1-minute rate
/// window), returns data.
async fn every_dashboard_query_answers(client: &reqwest::Client) -> Result<()> {
    let dir = crate::workspace_root().join("charts/observability/dashboards");
    let mut queries = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let dashboard: Value = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| path.display().to_string())?;
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push((
                        format!("{}: {}", panel["title"].as_str().unwrap_or("?"), expr),
                        expr.replace("$__rate_interval", "1m")
                            .replace("$service", ".*"),
                    ));
                }
            }
        }
    }
    ensure!(
        !queries.is_empty(),
        "no dashboard queries in {}",
        dir.display()
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut empty = Vec::new();
        for (name, query) in &queries {
            if prometheus_query(client, query).await?.is_empty() {
                empty.push(name.as_str());
            }
        }
        if empty.is_empty() {
            println!(
                "xtask: all {} dashboard queries return data on the local Prometheus",
                queries.len()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {} dashboard queries return nothing after 40 s:\n  {}",
                empty.len(),
                queries.len(),
                empty.join("\n  ")
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
