//! The checks every service binary must pass, whatever its domain: the standard endpoints over
//! both protocols, metrics, logs with trace ids, graceful exit, and strict configuration.

use std::time::Duration;

use reqwest::Version;
use serde_json::Value;

use crate::{h2c_client, http1_client, run_to_exit, ServiceProcess, TestStack};

/// A W3C trace context the checks send, to find its trace id in the service's logs.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// `/healthz/dependencies` (200 over `version`) once it reports reads on the replica, or its
/// last answer after 30 s. The replica may be legitimately skipped for a moment (lagging behind
/// other tests' writes on a busy host); what a user relies on is that reads go back to it once
/// it is healthy.
async fn dependencies_reading_from_replica(
    client: &reqwest::Client,
    url: &str,
    version: Version,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let health = client
            .get(url)
            .send()
            .await
            .expect("GET /healthz/dependencies");
        assert_eq!(health.version(), version);
        assert_eq!(health.status(), 200);
        let health: Value = health.json().await.unwrap();
        if health["checks"]["reader"]["target"] == "replica" || std::time::Instant::now() > deadline
        {
            return health;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `binary` against the test stack (database and role `database`, plus the service's own
/// variables `extra`) and checks `/healthz`, `/readyz`, `/metrics` and the JSON 404 over HTTP/1.1
/// and h2c, the trace id in its JSON logs, and a clean exit 0 on SIGTERM.
pub async fn standard_endpoints(
    binary: &str,
    service: &str,
    database: &str,
    extra: &[(&str, &str)],
) {
    let stack = TestStack::from_env();
    let mut env = stack.service_env(database);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut process = ServiceProcess::spawn(binary, &env, &stack.scratch_dir(service));
    process.wait_ready().await;

    for (client, version) in [
        (http1_client(), Version::HTTP_11),
        (h2c_client(), Version::HTTP_2),
    ] {
        let health = client
            .get(process.url("/healthz"))
            .send()
            .await
            .expect("GET /healthz");
        assert_eq!(health.version(), version);
        assert_eq!(health.status(), 200);
        assert_eq!(
            health.json::<Value>().await.unwrap(),
            serde_json::json!({"status": "ok"})
        );

        let ready = client
            .get(process.url("/readyz"))
            .send()
            .await
            .expect("GET /readyz");
        assert_eq!(ready.version(), version);
        assert_eq!(ready.status(), 200);
        let ready: Value = ready.json().await.unwrap();
        assert_eq!(ready["status"], "ready", "{ready}");

        let health = dependencies_reading_from_replica(
            &client,
            &process.url("/healthz/dependencies"),
            version,
        )
        .await;
        assert_eq!(health["status"], "ok", "{health}");
        assert_eq!(health["checks"]["writer"]["ok"], true, "{health}");
        assert_eq!(health["checks"]["reader"]["target"], "replica", "{health}");
        assert_eq!(health["checks"]["broker"]["ok"], true, "{health}");

        let missing = client
            .get(process.url("/no/such/route"))
            .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
            .send()
            .await
            .expect("GET unknown route");
        assert_eq!(missing.version(), version);
        assert_eq!(missing.status(), 404);
        let missing: Value = missing.json().await.unwrap();
        assert_eq!(missing["error"]["code"], "not_found", "{missing}");
        assert!(missing["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("/no/such/route")));

        let metrics = client
            .get(process.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(metrics.version(), version);
        assert_eq!(metrics.status(), 200);
        let metrics = metrics.text().await.unwrap();
        for series in [
            format!(
                r#"http_requests_total{{service="{service}",method="GET",route="/healthz",status="200"}}"#
            ),
            format!(
                r#"http_requests_total{{service="{service}",method="GET",route="unmatched",status="404"}}"#
            ),
            format!(
                r#"http_request_duration_seconds_bucket{{service="{service}",method="GET",route="/readyz",le="0.005"}}"#
            ),
            format!(r#"db_pool_connections{{service="{service}",pool="writer"}}"#),
            format!(r#"db_pool_connections_in_use{{service="{service}",pool="reader"}}"#),
            format!(r#"db_pool_acquire_seconds_count{{service="{service}",pool="reader"}}"#),
            format!(r#"db_query_duration_seconds_count{{service="{service}",pool="writer"}}"#),
            format!(r#"db_replica_in_use{{service="{service}"}} 1"#),
            format!(r#"process_cpu_seconds_total{{service="{service}"}}"#),
            format!(r#"dependency_up{{service="{service}",dependency="primary"}} 1"#),
            format!(r#"dependency_up{{service="{service}",dependency="broker"}} 1"#),
            format!(r#"process_open_fds{{service="{service}"}}"#),
            // Counters exist at 0 before anything happened: one that first appears at 1 has
            // no increase() in Prometheus, so its first event would never alert.
            format!(
                r#"db_replica_fallback_total{{service="{service}",reason="replica_unusable"}} 0"#
            ),
            format!(r#"http_panics_total{{service="{service}"}} 0"#),
        ] {
            assert!(
                metrics.contains(&series),
                "/metrics lacks {series}:\n{metrics}"
            );
        }
        for pool in metrics.lines().filter_map(|line| {
            line.strip_prefix(&format!(
                r#"worker_pool_workers{{service="{service}",pool=""#
            ))?
            .split('"')
            .next()
        }) {
            let series =
                format!(r#"worker_pool_rejected_total{{service="{service}",pool="{pool}"}} 0"#);
            assert!(
                metrics.contains(&series),
                "/metrics lacks {series}:\n{metrics}"
            );
        }
    }

    process.terminate();
    let status = process.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM:\n{}",
        process.logs()
    );

    let logs = process.logs();
    let lines: Vec<Value> = logs
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|_| panic!("log line is not JSON: {line}"))
        })
        .collect();
    // No OTLP endpoint is configured: telemetry must stay silent, with no export errors.
    assert!(
        !lines.iter().any(|line| line["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("opentelemetry"))),
        "OpenTelemetry logged without an endpoint:\n{logs}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line["trace_id"] == TRACE_ID && line["status"] == 404),
        "no log line carries the incoming trace id {TRACE_ID}:\n{logs}"
    );
}

/// Started where auth's keys cannot be fetched, `binary` is alive (`/healthz` 200) but not ready
/// (`/readyz` 503 saying why): it could authenticate no request.
pub async fn not_ready_without_keys(binary: &str, database: &str, extra: &[(&str, &str)]) {
    let stack = TestStack::from_env();
    let mut env = stack.service_env(database);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut process = ServiceProcess::spawn(binary, &env, &stack.scratch_dir("no-keys"));
    process.wait_for("/healthz").await;
    let client = http1_client();
    for _ in 0..3 {
        let ready = client
            .get(process.url("/readyz"))
            .send()
            .await
            .expect("GET /readyz");
        assert_eq!(ready.status(), 503);
        let ready: Value = ready.json().await.unwrap();
        assert_eq!(ready["status"], "not_ready", "{ready}");
        assert!(
            ready["reason"].as_str().is_some_and(|r| r.contains("keys")),
            "{ready}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A bad or missing variable stops `binary` before it serves: exit code 2 and exactly one line
/// on stderr naming the variable. `service_valid` completes a valid environment with the
/// service's own required variables.
pub fn rejects_bad_environment(binary: &str, service_valid: &[(&str, &str)]) {
    let mut valid = vec![
        ("DATABASE_WRITER_URL", "postgres://x@127.0.0.1:1/x"),
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
    ];
    valid.extend_from_slice(service_valid);
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("HTTP_PORT", "not-a-port")], "HTTP_PORT"),
        (
            &[("HTTP_REQUEST_TIMEOUT_MS", "0")],
            "HTTP_REQUEST_TIMEOUT_MS",
        ),
        (&[("DATABASE_WRITER_URL", "")], "DATABASE_WRITER_URL"),
        (&[("RUST_LOG", "info,[[[")], "RUST_LOG"),
    ];
    for (overrides, variable) in cases {
        let mut env: Vec<(&str, &str)> = valid
            .iter()
            .filter(|(name, _)| !overrides.iter().any(|(o, _)| o == name))
            .copied()
            .collect();
        env.extend_from_slice(overrides);
        let (status, stdout, stderr) = run_to_exit(binary, &env);
        assert_eq!(status.code(), Some(2), "{variable}: stderr={stderr:?}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{variable}: want one line, got {stderr:?}"
        );
        assert!(
            stderr.contains(variable),
            "{variable} not named in {stderr:?}"
        );
        assert!(
            stdout.is_empty(),
            "{variable}: nothing should be served or logged: {stdout:?}"
        );
    }
}
