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

/// Posts a batch until it is accepted (for up to 30 s: a broker just resumed), the last answer.
async fn post_until_accepted(system: &System, base: &str, token: &str) -> Answer {
    let body = batch(&["back"]);
    poll_until(
        Duration::from_secs(30),
        || post(system, base, token, &body),
        |answer| answer.status == 202,
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
    let back = post_until_accepted(&system, &base, &user.access_token).await;
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

/// `body` posted with `Idempotency-Key: key`.
async fn post_keyed(system: &System, base: &str, token: &str, key: &str, body: &Value) -> Answer {
    Answer::send(
        system
            .client
            .post(format!("{base}/v1/telemetry"))
            .header("authorization", token)
            .header("idempotency-key", key)
            .json(body),
    )
    .await
}

/// Issue 27, item 10: a batch answered 503 may still reach the topic (a request the broker had
/// already read when the acknowledgement timed out is written once it answers again), so a
/// client that retries would have it counted twice. Retried with its `Idempotency-Key`, it is
/// counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_answered_503_and_retried_with_its_idempotency_key_is_counted_once() {
    let mut system =
        System::start_with("telemetry-retry", &[("TELEMETRY_ACK_TIMEOUT_MS", "1000")]).await;
    let user = system.user("retry").await;
    let token = user.access_token.clone();
    let base = system.analysis.url("");
    let warm = post(&system, &base, &token, &batch(&["warm"])).await;
    assert_eq!(warm.status, 202, "{}", warm.body);

    // The broker stops answering: the batches go out on the producer's connection (the kernel
    // takes the bytes) and time out unacknowledged.
    system.broker.pause().unwrap();
    let body = batch(&["retried"; 5]);
    let keys: Vec<String> = (0..4)
        .map(|i| format!("retry-{i}-{}", uuid::Uuid::now_v7()))
        .collect();
    let refused = join_all(
        keys.iter()
            .map(|key| post_keyed(&system, &base, &token, key, &body)),
    )
    .await;
    for answer in &refused {
        assert_eq!(answer.status, 503, "{}", answer.body);
        assert!(answer.header("retry-after").is_some());
    }

    // Back: each client retries its batch with the same key until it is accepted.
    system.broker.resume().unwrap();
    let mut batch_ids = Vec::new();
    for key in &keys {
        let accepted = poll_until(
            Duration::from_secs(30),
            || post_keyed(&system, &base, &token, key, &body),
            |answer| answer.status == 202,
        )
        .await;
        assert_eq!(accepted.status, 202, "{}", accepted.body);
        batch_ids.push(accepted.body["batch_id"].as_str().unwrap().to_owned());
    }

    // A marker after them (same user: same partition, so applied after them).
    let retried = |usage: &[(String, i64)]| {
        usage
            .iter()
            .find(|(name, _)| name == "retried")
            .map_or(0, |(_, n)| *n)
    };
    let counted = counted_through_marker(&system, &base, &token, "marker-1").await;
    let on_topic = read_topic_lingering(
        &system.broker.bootstrap_servers(),
        ANALYSIS_TELEMETRY.name,
        Duration::from_secs(20),
        |records| {
            records
                .iter()
                .any(|r| r.payload["events"][0]["name"] == "marker-1")
        },
        Duration::from_secs(1),
    )
    .await;
    let copies = on_topic
        .iter()
        .filter(|r| r.payload["events"][0]["name"] == "retried")
        .count();
    println!(
        "4 batches answered 503 during a broker pause, then retried with their keys until 202: {copies} messages on the topic, counted {counted:?}"
    );
    assert_eq!(
        retried(&counted),
        5 * keys.len() as i64,
        "each batch counted once ({copies} messages on the topic)"
    );

    // The same key and events once more (an answer lost on the way): the same batch, not
    // counted again.
    for (key, batch_id) in keys.iter().zip(&batch_ids) {
        let again = post_keyed(&system, &base, &token, key, &body).await;
        assert_eq!(again.status, 202, "{}", again.body);
        assert_eq!(again.body["batch_id"], batch_id.as_str());
    }
    let counted = counted_through_marker(&system, &base, &token, "marker-2").await;
    assert_eq!(retried(&counted), 5 * keys.len() as i64);
    // The same key with other events is another batch (a reused key loses nothing).
    let other = post_keyed(&system, &base, &token, &keys[0], &batch(&["other"])).await;
    assert_eq!(other.status, 202, "{}", other.body);
    assert_ne!(other.body["batch_id"], batch_ids[0].as_str());

    // A key that is no header value a client may send is refused, like tasks' keys.
    let bad_key = post_keyed(&system, &base, &token, &"k".repeat(201), &body).await;
    assert_eq!(
        (bad_key.status, bad_key.code()),
        (400, "invalid_idempotency_key")
    );
}

/// Posts a batch of one event `marker` and returns the user's counts once it is counted (the
/// user's batches are applied in order, so everything before it is counted too).
async fn counted_through_marker(
    system: &System,
    base: &str,
    token: &str,
    marker: &str,
) -> Vec<(String, i64)> {
    let accepted = post(system, base, token, &batch(&[marker])).await;
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    poll_until(
        Duration::from_secs(60),
        || usage_today(system, base, token),
        |usage| usage.iter().any(|(name, _)| name == marker),
    )
    .await
}

/// A batch of `events` events of about `bytes` bytes in all (padding in a text property).
fn padded_batch(events: usize, bytes: usize) -> Value {
    let at = OffsetDateTime::now_utc().format(&Rfc3339).unwrap();
    let skeleton = json!({"name": "bulk", "at": at, "props": {"pad": ""}});
    let overhead = serde_json::to_vec(&skeleton).unwrap().len() + 1;
    let pad = (bytes / events)
        .saturating_sub(overhead)
        .min(MAX_PROP_TEXT_CHARS);
    Value::Array(
        (0..events)
            .map(|_| json!({"name": "bulk", "at": at, "props": {"pad": "x".repeat(pad)}}))
            .collect(),
    )
}

const MAX_PROP_TEXT_CHARS: usize = 200;

/// Issue 27, item 11: memory is bounded by the bytes of batches held, bodies being read
/// included, not by the number of requests: 256 clients sending 140 KB batches at once to a
/// silent broker get 503 `queue_full` at once beyond the bound, and the process stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_is_bounded_by_the_bytes_held_not_by_the_requests() {
    // The default budget, TELEMETRY_MAX_BUFFERED_BYTES = 16 MiB.
    let mut system = System::start("telemetry-bytes").await;
    let user = system.user("bytes").await;
    let base = system.analysis.url("");
    let warm = post(&system, &base, &user.access_token, &batch(&["warm"])).await;
    assert_eq!(warm.status, 202, "{}", warm.body);
    let body = padded_batch(500, 140_000);
    let body_bytes = serde_json::to_vec(&body).unwrap();
    assert!(
        (130_000..150_000).contains(&body_bytes.len()),
        "{}",
        body_bytes.len()
    );
    let rss_before = system.analysis.rss_kib();

    system.broker.pause().unwrap();
    // 256 clients, each on a connection of its own.
    let client = reqwest::Client::builder()
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        let pid = system.analysis.pid();
        tokio::spawn(async move {
            let mut max = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                max = max.max(test_support::rss_kib_of(pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            max
        })
    };
    let started = Instant::now();
    let answers = join_all((0..256).map(|_| {
        let request = client
            .post(format!("{base}/v1/telemetry"))
            .header("authorization", &user.access_token)
            .header("content-type", "application/json")
            .body(body_bytes.clone());
        async move {
            let sent = Instant::now();
            let answer = Answer::send(request).await;
            (answer, sent.elapsed())
        }
    }))
    .await;
    let all_answered = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let rss_max = sampler.await.unwrap().max(system.analysis.rss_kib());
    let mut queue_full = 0;
    let mut slowest_refusal = Duration::ZERO;
    for (answer, took) in &answers {
        assert_eq!(answer.status, 503, "{}", answer.body);
        assert!(answer.header("retry-after").is_some());
        if answer.body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("queue is full")
        {
            queue_full += 1;
            slowest_refusal = slowest_refusal.max(*took);
        }
    }
    println!(
        "256 clients × {} B batches, broker paused: RSS {rss_before} KiB before, at most {rss_max} KiB (+{} MiB); {queue_full} answered 503 queue_full (slowest {slowest_refusal:?}), all answered in {all_answered:?}",
        body_bytes.len(),
        rss_max.saturating_sub(rss_before) / 1024
    );
    assert!(queue_full > 0, "no batch was refused with queue_full");
    // Refused before the broker's bound: at once, not after waiting on it.
    assert!(
        slowest_refusal < Duration::from_secs(5),
        "{slowest_refusal:?}"
    );
    // The bound: the budget at most four times over (bodies being read and parsed, the batches'
    // encoding, librdkafka's copies, freed memory the allocators keep a while; 2.5 times was
    // seen), and what the HTTP server buffers per connection before any handler runs (up to
    // 160 KiB each with actix-http: a 128 KiB read buffer and a 32 KiB body buffer), whatever the
    // route.
    let bound_kib = 4 * 16 * 1024 + 256 * 160;
    assert!(
        rss_max.saturating_sub(rss_before) < bound_kib,
        "RSS grew from {rss_before} to {rss_max} KiB, over {bound_kib} KiB"
    );

    system.broker.resume().unwrap();
    let back = post_until_accepted(&system, &base, &user.access_token).await;
    assert_eq!(back.status, 202, "{}", back.body);
}

/// Issue 27, item 12: a bad batch of 221 KB is answered with a bounded error: the first broken
/// fields and how many more there are, not every one of tens of thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_batch_gets_a_bounded_answer() {
    let system = System::start("telemetry-broken").await;
    let user = system.user("broken").await;
    // 500 events, each with a bad name, a bad time, an unknown field and 20 properties whose
    // keys and values are both wrong: 43 broken fields an event.
    let events: Vec<Value> = (0..500)
        .map(|_| {
            let props: serde_json::Map<String, Value> = (0..20)
                .map(|p| (format!("BAD_KEY_NUM_{p:02}"), json!([])))
                .collect();
            json!({"name": "Bad", "at": "x", "props": props, "extra": 1})
        })
        .collect();
    let body = serde_json::to_vec(&events).unwrap();
    assert!((215_000..230_000).contains(&body.len()), "{}", body.len());
    let response = system
        .client
        .post(system.analysis.url("/v1/telemetry"))
        .header("authorization", &user.access_token)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer = response.bytes().await.unwrap();
    let error: Value = serde_json::from_slice(&answer).unwrap();
    let details = error["error"]["details"].as_array().unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    println!(
        "a {} B batch with {} broken fields: a {} B answer listing {}",
        body.len(),
        500 * 43,
        answer.len(),
        details.len()
    );
    assert!(
        answer.len() <= 32 * 1024,
        "a {} B answer to a {} B batch",
        answer.len(),
        body.len()
    );
    // In the body's order: the unknown field first, then name, at and the properties.
    assert_eq!(details[0]["field"], "events[0].extra");
    assert_eq!(details[1]["field"], "events[0].name");
    assert!(details.len() <= 50, "{}", details.len());
    let unlisted = 500 * 43 - details.len();
    assert!(
        message.contains(&format!("{unlisted} more")),
        "the message says how many more: {message}"
    );
}

/// Issue 27, item 12: `GET /v1/analysis/usage` answers at most 1,000 rows at once; `next_cursor`
/// leads to the rest, each row once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_answers_at_most_a_page_of_rows_and_the_cursor_leads_to_the_rest() {
    let system = System::start("telemetry-usage-pages").await;
    let user = system.user("pages").await;
    let today = OffsetDateTime::now_utc().date();
    let first = today - time::Duration::days(91);
    // 92 days × 25 names: 2,300 rows of one user.
    let pool = system.pool().await;
    service_kit::sqlx::query(
        "INSERT INTO user_usage (owner_id, day, name, events) \
         SELECT $1, $2 + d, 'name.' || lpad(n::text, 2, '0'), d * 100 + n \
         FROM generate_series(0, 91) AS d, generate_series(1, 25) AS n",
    )
    .bind(user.user_id.parse::<uuid::Uuid>().unwrap())
    .bind(first)
    .execute(&pool)
    .await
    .unwrap();
    let path = format!("/v1/analysis/usage?from={first}&to={today}");
    // Reads go to the replica: wait until it has the rows.
    let mut page = system
        .get_until(&user, &path, |answer| {
            answer.status == 200
                && !answer.body["items"]
                    .as_array()
                    .is_none_or(|items| items.is_empty())
        })
        .await;
    let mut seen: Vec<(String, String, i64)> = Vec::new();
    let mut pages = 0;
    loop {
        assert_eq!(page.status, 200, "{}", page.body);
        let items = page.body["items"].as_array().unwrap();
        pages += 1;
        assert!(
            items.len() <= 1000,
            "page {pages}: {} rows in one answer",
            items.len()
        );
        assert_eq!(page.body["from"], first.to_string());
        seen.extend(items.iter().map(|item| {
            (
                item["day"].as_str().unwrap().to_owned(),
                item["name"].as_str().unwrap().to_owned(),
                item["events"].as_i64().unwrap(),
            )
        }));
        let Some(cursor) = page.body["next_cursor"].as_str() else {
            break;
        };
        assert!(pages < 10, "more pages than rows");
        page = system.get(&user, &format!("{path}&cursor={cursor}")).await;
    }
    assert_eq!(pages, 3, "2,300 rows: pages of 1,000, 1,000 and 300");
    let expected: Vec<(String, String, i64)> = (0..92)
        .flat_map(|d| {
            (1..=25).map(move |n| {
                (
                    (first + time::Duration::days(d)).to_string(),
                    format!("name.{n:02}"),
                    d * 100 + n,
                )
            })
        })
        .collect();
    assert_eq!(seen, expected, "every row once, by day then name");

    let bad = system.get(&user, &format!("{path}&cursor=zz")).await;
    assert_eq!(
        (bad.status, bad.code()),
        (400, "invalid_cursor"),
        "{}",
        bad.body
    );
}

/// Issue 27, item 16: days out of range are a 400 naming the parameter (not `from:
/// "-0001-12-26"`), and unknown query parameters are refused as the other services refuse them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_refuses_days_out_of_range_and_unknown_parameters() {
    let system = System::start("telemetry-usage-query").await;
    let user = system.user("query").await;
    // Every check is made; the test fails at the end naming each one that did not hold.
    let mut wrong = Vec::new();
    for (query, field) in [
        ("to=0000-01-01", "to"),
        ("from=0000-12-31&to=0001-01-02", "from"),
    ] {
        let answer = system
            .get(&user, &format!("/v1/analysis/usage?{query}"))
            .await;
        let seen = (answer.status, answer.code(), answer.invalid_fields());
        if seen != (400, "invalid_input", BTreeSet::from([field.to_owned()])) {
            wrong.push(format!("usage?{query}: {} {}", answer.status, answer.body));
        }
    }
    // The default range (7 days up to `to`) does not reach before year 1: it starts there.
    let early = system.get(&user, "/v1/analysis/usage?to=0001-01-03").await;
    if (early.status, &early.body["from"], &early.body["to"])
        != (200, &json!("0001-01-01"), &json!("0001-01-03"))
    {
        wrong.push(format!(
            "usage?to=0001-01-03: {} {}",
            early.status, early.body
        ));
    }
    let last = system
        .get(&user, "/v1/analysis/usage?from=9999-12-25&to=9999-12-31")
        .await;
    if last.status != 200 {
        wrong.push(format!("the last days: {} {}", last.status, last.body));
    }

    let id = uuid::Uuid::now_v7();
    for (path, parameter) in [
        ("/v1/analysis/usage?form=2026-12-01".to_owned(), "form"),
        (
            "/v1/analysis/usage?from=2026-12-01&to=2026-12-02&limit=5".to_owned(),
            "limit",
        ),
        (format!("/v1/analysis/tasks?ids={id}&idz={id}"), "idz"),
    ] {
        let answer = system.get(&user, &path).await;
        let seen = (answer.status, answer.code(), answer.invalid_fields());
        if seen != (400, "invalid_query", BTreeSet::from([parameter.to_owned()])) {
            wrong.push(format!("{path}: {} {}", answer.status, answer.body));
        }
    }
    let fine = system
        .get(&user, &format!("/v1/analysis/tasks?ids={id}"))
        .await;
    if fine.status != 200 {
        wrong.push(format!("tasks?ids=: {} {}", fine.status, fine.body));
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
