//! The spine against the real stack, through the probe service (examples/probe_service.rs):
//! reads served by the replica, fallback to the primary when the replica dies and back when it
//! returns, and SIGTERM draining in-flight requests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::{http1_client, ServiceProcess, TestStack};

mod common;
use common::start_probe;

/// `Ok(in_recovery)` for a 200, `Err(description)` for anything else.
async fn read_role(client: &reqwest::Client, probe: &ServiceProcess) -> Result<bool, String> {
    let response = client
        .get(probe.url("/probe/read"))
        .send()
        .await
        .map_err(|err| format!("request failed: {err}"))?;
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .map_err(|err| format!("{status}: {err}"))?;
    match (status.as_u16(), body["in_recovery"].as_bool()) {
        (200, Some(in_recovery)) => Ok(in_recovery),
        _ => Err(format!("{status}: {body}")),
    }
}

/// Sum of every series of `name` in the service's `/metrics`.
async fn metric_sum(client: &reqwest::Client, probe: &ServiceProcess, name: &str) -> f64 {
    test_support::metric_sum(client, &probe.url("/metrics"), name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_reads_are_served_by_the_replica() {
    let stack = TestStack::from_env();
    let probe = start_probe(&stack, stack.replica_port, "reads", &[]).await;
    let client = http1_client();
    for _ in 0..20 {
        assert_eq!(
            read_role(&client, &probe).await,
            Ok(true),
            "read not served by the replica"
        );
    }
    assert_eq!(
        metric_sum(&client, &probe, "db_replica_fallback_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_outage_moves_reads_to_the_primary_and_back_without_failures() {
    let stack = TestStack::from_env();
    let mut replica = stack.scratch_replica("fallback");
    let probe = start_probe(&stack, replica.port, "fallback", &[]).await;
    let client = http1_client();
    assert_eq!(
        read_role(&client, &probe).await,
        Ok(true),
        "reads start on the replica"
    );

    // Four clients read without pause for the whole test; every read is recorded.
    let clock = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (client, stop, url) = (http1_client(), stop.clone(), probe.url("/probe/read"));
            tokio::spawn(async move {
                let mut reads = Vec::new();
                // Bounded in time and count whatever happens.
                while !stop.load(Ordering::Relaxed)
                    && clock.elapsed() < Duration::from_secs(60)
                    && reads.len() < 50_000
                {
                    let sent = clock.elapsed();
                    let outcome = async {
                        let response = client.get(&url).send().await.map_err(|e| e.to_string())?;
                        let status = response.status();
                        let body: Value = response.json().await.map_err(|e| e.to_string())?;
                        body["in_recovery"]
                            .as_bool()
                            .filter(|_| status == 200)
                            .ok_or(format!("{status}: {body}"))
                    }
                    .await;
                    reads.push((sent, outcome));
                }
                reads
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let stopped_at = clock.elapsed();
    replica.stop();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let fallbacks = metric_sum(&client, &probe, "db_replica_fallback_total").await;
    assert!(fallbacks > 0.0, "db_replica_fallback_total did not rise");
    assert_eq!(metric_sum(&client, &probe, "db_replica_in_use").await, 0.0);

    let restarted_at = clock.elapsed();
    replica.start();
    let deadline = Instant::now() + Duration::from_secs(15);
    while read_role(&client, &probe).await != Ok(true) {
        assert!(
            Instant::now() < deadline,
            "reads did not return to the replica within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let mut reads = Vec::new();
    for reader in readers {
        reads.extend(reader.await.expect("reader task"));
    }
    let failures: Vec<_> = reads
        .iter()
        .filter(|(_, outcome)| outcome.is_err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} reads failed, e.g. {:?}",
        failures.len(),
        reads.len(),
        failures.first()
    );

    let during_outage: Vec<bool> = reads
        .iter()
        .filter(|(sent, _)| *sent > stopped_at + Duration::from_secs(1) && *sent < restarted_at)
        .map(|(_, outcome)| *outcome.as_ref().unwrap())
        .collect();
    assert!(
        !during_outage.is_empty(),
        "no reads were sent during the outage"
    );
    assert!(
        during_outage.iter().all(|in_recovery| !in_recovery),
        "reads sent more than 1 s after the replica stopped must be served by the primary"
    );
    assert!(reads
        .iter()
        .any(|(sent, outcome)| *sent < stopped_at && outcome == &Ok(true)));
    assert_eq!(metric_sum(&client, &probe, "db_replica_in_use").await, 1.0);
    eprintln!(
        "replica outage: {} reads, 0 failed; {} sent 1 s+ into the outage, all served by the primary; {fallbacks} fallbacks counted",
        reads.len(),
        during_outage.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_every_accepted_request_then_exits_zero() {
    let stack = TestStack::from_env();
    let mut probe = start_probe(&stack, stack.replica_port, "sigterm", &[]).await;

    // Eight clients send a stream of 300 ms requests, each numbered, until the server is gone.
    let clock = Instant::now();
    let next_seq = Arc::new(AtomicU64::new(0));
    let senders: Vec<_> = (0..8)
        .map(|_| {
            let (client, next_seq, port) = (http1_client(), next_seq.clone(), probe.port);
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for _ in 0..100 {
                    let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                    let url = format!("http://127.0.0.1:{port}/probe/slow?ms=300&seq={seq}");
                    let outcome = client.get(url).send().await.map(|r| r.status().as_u16());
                    let failed = outcome.is_err();
                    outcomes.push((seq, outcome.map_err(|e| e.to_string()), clock.elapsed()));
                    if failed {
                        break;
                    }
                }
                outcomes
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let signalled_at = clock.elapsed();
    probe.terminate();
    let mut outcomes = BTreeMap::new();
    for sender in senders {
        for (seq, outcome, done_at) in sender.await.expect("sender task") {
            outcomes.insert(seq, (outcome, done_at));
        }
    }
    let status = probe.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit code after SIGTERM:\n{}",
        probe.logs()
    );

    // Every request the server started must have been answered 200.
    let started: BTreeSet<u64> = probe
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == "probe request started")
        .filter_map(|line| line["seq"].as_u64())
        .collect();
    assert!(
        started.len() >= 8,
        "the stream barely ran: {} requests started",
        started.len()
    );
    for seq in &started {
        let (outcome, _) = &outcomes[seq];
        assert_eq!(
            outcome,
            &Ok(200),
            "request {seq} was accepted but not answered"
        );
    }
    // The drain was real: requests in flight at SIGTERM were finished after it.
    let drained = outcomes
        .values()
        .filter(|(outcome, done_at)| outcome == &Ok(200) && *done_at > signalled_at)
        .count();
    assert!(drained >= 1, "no request was in flight at SIGTERM");
    // Nothing was answered with an error status.
    assert!(outcomes
        .values()
        .all(|(outcome, _)| !matches!(outcome, Ok(code) if *code != 200)));

    eprintln!(
        "SIGTERM: {} requests started by the server, all answered 200; {drained} finished after the signal",
        started.len()
    );

    let after = http1_client().get(probe.url("/healthz")).send().await;
    assert!(
        after.is_err_and(|err| err.is_connect()),
        "the port still accepts after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_malformed_and_slow_requests_get_json_errors() {
    let stack = TestStack::from_env();
    let limits = [
        ("HTTP_MAX_BODY_BYTES", "2048"),
        ("HTTP_REQUEST_TIMEOUT_MS", "300"),
    ];
    let probe = start_probe(&stack, stack.replica_port, "limits", &limits).await;
    let client = http1_client();
    let error_of = |body: &Value| {
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    let small = client
        .post(probe.url("/probe/echo"))
        .json(&serde_json::json!({"a": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200);

    let big = serde_json::json!({ "blob": "x".repeat(4096) });
    let too_large = client
        .post(probe.url("/probe/echo"))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status(), 413);
    assert_eq!(
        error_of(&too_large.json().await.unwrap()),
        "payload_too_large"
    );

    let malformed = client
        .post(probe.url("/probe/echo"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(error_of(&malformed.json().await.unwrap()), "invalid_body");

    let slow = client
        .get(probe.url("/probe/slow?ms=3000&seq=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 503);
    assert_eq!(slow.headers()["retry-after"], "1");
    assert_eq!(error_of(&slow.json().await.unwrap()), "timeout");
    assert!(metric_sum(&client, &probe, "http_request_errors_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_are_exported_over_otlp_with_the_incoming_trace_id() {
    use actix_web::{web, App, HttpResponse, HttpServer};
    use std::sync::Mutex;

    // A stand-in collector that keeps every OTLP/HTTP trace export it receives.
    let received: Arc<Mutex<Vec<web::Bytes>>> = Arc::default();
    let collector_port = test_support::free_port();
    let sink = received.clone();
    let collector = HttpServer::new(move || {
        let sink = sink.clone();
        App::new().route(
            "/v1/traces",
            web::post().to(move |body: web::Bytes| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push(body);
                    HttpResponse::Ok().finish()
                }
            }),
        )
    })
    .workers(1)
    .bind(("127.0.0.1", collector_port))
    .expect("bind collector")
    .run();
    let collector_handle = collector.handle();
    tokio::spawn(collector);

    let stack = TestStack::from_env();
    let endpoint = format!("http://127.0.0.1:{collector_port}");
    let otlp = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let mut probe = start_probe(&stack, stack.replica_port, "otlp", &otlp).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let response = http1_client()
        .get(probe.url("/probe/read"))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // SIGTERM flushes the batch of spans before the process exits.
    probe.terminate();
    assert_eq!(
        probe.wait_exit(Duration::from_secs(30)).await.code(),
        Some(0)
    );
    let trace_id_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let exports = received.lock().unwrap().clone();
    assert!(
        !exports.is_empty(),
        "no OTLP export reached the collector:\n{}",
        probe.logs()
    );
    assert!(
        exports
            .iter()
            .any(|body| body.windows(16).any(|window| window == trace_id_bytes)),
        "no exported span carries the incoming trace id"
    );
    assert!(
        exports
            .iter()
            .any(|body| body.windows(5).any(|window| window == b"probe")),
        "service.name missing"
    );
    collector_handle.stop(false).await;
}
