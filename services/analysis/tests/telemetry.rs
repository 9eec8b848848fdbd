//! Telemetry ingest against a real broker: 202 only once the batch is on the topic, counted once
//! in the usage read model even when redelivered; a 400 naming every broken field; a full queue or
//! a silent broker answered 503 with `Retry-After` at once, memory flat, other routes served; and
//! every batch answered 202 still there after the process was SIGKILLed mid-load.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use events::catalog::{TelemetryBatch, ANALYSIS_TELEMETRY};
use futures_util::future::join_all;
use serde_json::{json, Value};
use test_support::kafka::{read_topic, read_topic_lingering};
use test_support::{poll_until, Answer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

mod common;
use common::System;

fn batch(names: &[&str]) -> Value {
    let at = OffsetDateTime::now_utc().format(&Rfc3339).unwrap();
    Value::Array(
        names
            .iter()
            .map(|name| json!({"name": name, "at": at, "props": {"screen": "home", "n": 1}}))
            .collect(),
    )
}

async fn post(system: &System, base: &str, token: &str, body: &Value) -> Answer {
    Answer::send(
        system
            .client
            .post(format!("{base}/v1/telemetry"))
            .header("authorization", token)
            .json(body),
    )
    .await
}

/// `name → events` today for the user, read from `base`.
async fn usage_today(system: &System, base: &str, token: &str) -> Vec<(String, i64)> {
    let answer = Answer::send(
        system
            .client
            .get(format!("{base}/v1/analysis/usage"))
            .header("authorization", token),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let today = OffsetDateTime::now_utc().date().to_string();
    answer.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["day"] == today)
        .map(|item| {
            (
                item["name"].as_str().unwrap().to_owned(),
                item["events"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_is_acknowledged_once_durable_and_counted_once() {
    let system = System::start("telemetry-ok").await;
    let user = system.user("tele").await;
    let edge = system.edge.url("");

    let accepted = post(
        &system,
        &edge,
        &user.access_token,
        &batch(&["app.open", "app.open", "task.view"]),
    )
    .await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    assert_eq!(accepted.body["events"], 3);
    let batch_id = accepted.body["batch_id"].as_str().unwrap().to_owned();
    // On the topic already (202 means the broker has it), with the batch id as its ce_id.
    let records = read_topic(
        &system.broker.bootstrap_servers(),
        ANALYSIS_TELEMETRY.name,
        Duration::from_secs(10),
        |records| !records.is_empty(),
    )
    .await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].headers["ce_id"], batch_id);
    assert_eq!(records[0].key.as_deref(), Some(user.user_id.as_str()));
    let published: TelemetryBatch = serde_json::from_value(records[0].payload.clone()).unwrap();
    assert_eq!(published.events.len(), 3);

    let counted = poll_until(
        Duration::from_secs(30),
        || usage_today(&system, &edge, &user.access_token),
        |usage| !usage.is_empty(),
    )
    .await;
    assert_eq!(
        counted,
        [("app.open".to_owned(), 2), ("task.view".to_owned(), 1)]
    );

    // The same message delivered again (a producer retry, a redelivery) is counted once; a marker
    // batch after it shows the consumer got that far.
    system
        .publish_with_id(&published, published.received_at, published.batch_id)
        .await;
    let marker = post(&system, &edge, &user.access_token, &batch(&["marker"])).await;
    assert_eq!(marker.status, 202);
    let counted = poll_until(
        Duration::from_secs(30),
        || usage_today(&system, &edge, &user.access_token),
        |usage| usage.iter().any(|(name, _)| name == "marker"),
    )
    .await;
    assert_eq!(
        counted,
        [
            ("app.open".to_owned(), 2),
            ("marker".to_owned(), 1),
            ("task.view".to_owned(), 1)
        ]
    );

    // Every broken field named at once; nothing published for a refused batch.
    let at = OffsetDateTime::now_utc().format(&Rfc3339).unwrap();
    let refused = post(
        &system,
        &edge,
        &user.access_token,
        &json!([
            {"name": "Bad Name", "at": at},
            {"name": "ok", "at": "not a time", "props": {"deep": {"x": 1}}},
            {"name": "ok", "at": at, "props": {"text": "a\u{0}b"}, "extra": true},
        ]),
    )
    .await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(
        refused.invalid_fields(),
        BTreeSet::from(
            [
                "events[0].name",
                "events[1].at",
                "events[1].props.deep",
                "events[2].extra",
                "events[2].props.text"
            ]
            .map(String::from)
        )
    );
    for (body, field) in [(json!({"name": "x"}), "body"), (json!([]), "body")] {
        let refused = post(&system, &edge, &user.access_token, &body).await;
        assert_eq!(refused.status, 400, "{body}");
        assert_eq!(refused.invalid_fields(), BTreeSet::from([field.to_owned()]));
    }
    let huge = batch(&["big"]).as_array().unwrap()[0].clone();
    let mut too_big = vec![];
    while serde_json::to_vec(&too_big).unwrap().len() <= 256 * 1024 {
        let mut event = huge.clone();
        event["props"] = json!({"pad": "x".repeat(200)});
        too_big.push(event);
    }
    let refused = post(&system, &edge, &user.access_token, &Value::Array(too_big)).await;
    assert_eq!(refused.status, 413, "{}", refused.body);
    let anonymous = Answer::send(
        system
            .client
            .post(system.edge.url("/v1/telemetry"))
            .json(&batch(&["x"])),
    )
    .await;
    assert_eq!(anonymous.status, 401);
    let records = read_topic_lingering(
        &system.broker.bootstrap_servers(),
        ANALYSIS_TELEMETRY.name,
        Duration::from_secs(20),
        |records| records.len() >= 3,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(
        records.len(),
        3,
        "only the accepted batches and the replayed copy"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_and_a_silent_broker_are_answered_503_at_once_with_memory_flat() {
    let mut system = System::start_with(
        "telemetry-full",
        &[
            ("TELEMETRY_MAX_WORKERS", "2"),
            ("TELEMETRY_MAX_QUEUE", "16"),
            ("TELEMETRY_ACK_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let user = system.user("full").await;
    let base = system.analysis.url("");
    let accepted = post(&system, &base, &user.access_token, &batch(&["warm"])).await;
    assert_eq!(accepted.status, 202);
    let rss_before = system.analysis.rss_kib();

    // The broker stops answering: the queue fills (2 workers × 64 in flight + 16 queued), and
    // everything beyond is refused at once; what was queued fails after the 1 s bound. Each round
    // is 450 batches at once, over 3 times what the ingest can hold.
    system.broker.pause().unwrap();
    let body = batch(&["e"; 50]);
    let mut rss_max = rss_before;
    let mut refused_at_once = 0;
    let mut slowest = Duration::ZERO;
    for round in 0..3 {
        let answers = join_all((0..450).map(|_| async {
            let started = Instant::now();
            let answer = post(&system, &base, &user.access_token, &body).await;
            (answer, started.elapsed())
        }))
        .await;
        for (answer, took) in &answers {
            assert_eq!(answer.status, 503, "round {round}: {}", answer.body);
            assert!(answer.header("retry-after").is_some());
            slowest = slowest.max(*took);
            if answer.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("queue is full")
            {
                refused_at_once += 1;
            }
        }
        // The rest of the service goes on meanwhile.
        let health = Answer::send(system.client.get(system.analysis.url("/healthz"))).await;
        assert_eq!(health.status, 200);
        let board = Answer::send(
            system
                .client
                .get(system.analysis.url("/v1/analysis/me"))
                .header("authorization", &user.access_token),
        )
        .await;
        assert_eq!(board.status, 200);
        rss_max = rss_max.max(system.analysis.rss_kib());
    }
    println!(
        "3 × 450 batches against a silent broker: {refused_at_once} refused at once (queue full), the rest after the bound; slowest answer {slowest:?}; RSS {rss_before} KiB before, at most {rss_max} KiB"
    );
    assert!(
        refused_at_once >= 3 * (450 - (2 * 64 + 16)),
        "{refused_at_once}"
    );
    assert!(slowest < Duration::from_secs(4), "{slowest:?}");
    assert!(
        rss_max.saturating_sub(rss_before) < 64 * 1024,
        "RSS grew from {rss_before} to {rss_max} KiB"
    );

    // Back: accepted again.
    system.broker.resume().unwrap();
    let back_body = batch(&["back"]);
    let back = poll_until(
        Duration::from_secs(30),
        || post(&system, &base, &user.access_token, &back_body),
        |answer| answer.status == 202,
    )
    .await;
    assert_eq!(back.body["events"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_batch_answered_202_survives_a_kill_and_is_counted_once() {
    let mut system = System::start("telemetry-kill").await;
    let user = system.user("kill").await;
    let base = system.analysis.url("");
    let acknowledged: Arc<Mutex<HashSet<String>>> = Arc::default();
    let body = batch(&["k"; 5]);
    let give_up = Instant::now() + Duration::from_secs(20);
    let senders = (0..16).map(|_| {
        let (client, acknowledged, body) =
            (system.client.clone(), acknowledged.clone(), body.clone());
        let (url, token) = (format!("{base}/v1/telemetry"), user.access_token.clone());
        async move {
            while Instant::now() < give_up {
                let Ok(response) = client
                    .post(&url)
                    .header("authorization", &token)
                    .json(&body)
                    .send()
                    .await
                else {
                    return; // the process is gone
                };
                if response.status() == 202 {
                    let answer: Value = response.json().await.unwrap_or_default();
                    if let Some(id) = answer["batch_id"].as_str() {
                        acknowledged.lock().unwrap().insert(id.to_owned());
                    }
                }
            }
        }
    });
    let pid = system.analysis.pid();
    let killer = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        assert!(killed.unwrap().success());
    };
    tokio::join!(join_all(senders), killer);
    system.analysis.kill(); // reaps it
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 10,
        "only {} batches before the kill",
        acknowledged.len()
    );

    // Every batch answered 202 is on the topic.
    let bootstrap = system.broker.bootstrap_servers();
    // Read on a little once they are all there: batches sent but not yet answered are there too.
    let records = read_topic_lingering(
        &bootstrap,
        ANALYSIS_TELEMETRY.name,
        Duration::from_secs(20),
        |records| {
            let seen: HashSet<&str> = records
                .iter()
                .map(|r| r.headers["ce_id"].as_str())
                .collect();
            acknowledged.iter().all(|id| seen.contains(id.as_str()))
        },
        Duration::from_secs(2),
    )
    .await;
    let on_topic: HashSet<String> = records.iter().map(|r| r.headers["ce_id"].clone()).collect();
    let lost: Vec<&String> = acknowledged.difference(&on_topic).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged batches are not on the topic",
        lost.len(),
        acknowledged.len()
    );

    // Started again, it counts every batch on the topic once: 5 events each.
    system.restart_analysis().await;
    let base = system.analysis.url("");
    let expected = 5 * on_topic.len() as i64;
    let counted = poll_until(
        Duration::from_secs(60),
        || usage_today(&system, &base, &user.access_token),
        |usage| usage.iter().map(|(_, n)| n).sum::<i64>() >= expected,
    )
    .await;
    println!(
        "{} batches answered 202 before the kill, {} on the topic (some sent but unanswered), {} events counted",
        acknowledged.len(),
        on_topic.len(),
        expected
    );
    assert_eq!(counted, [("k".to_owned(), expected)]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        usage_today(&system, &base, &user.access_token).await,
        [("k".to_owned(), expected)]
    );
}
