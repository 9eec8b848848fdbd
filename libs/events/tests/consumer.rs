//! The consumer library against the real broker and primary, through the recorder example
//! (examples/recorder.rs): poison and failing messages go to the dead-letter topic with the reason
//! while the rest is processed, an event id is applied once, and two instances in one group
//! share the partitions and one takes over, losing nothing and applying nothing twice, when the
//! other is killed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use events::envelope::Envelope;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::{json, Value};
use service_kit::sqlx::{self, Connection, PgConnection};
use test_support::kafka::{read_topic, topic_is_empty};
use test_support::{
    http1_client, metric_sum, poll_until, run_to_exit_with_args, unique_name, workspace_binary,
    ServiceProcess, TestStack,
};
use uuid::Uuid;

fn recorder() -> PathBuf {
    workspace_binary("examples/recorder")
}

/// The recorder keeps its tables in the stack's `postgres` database.
fn database_url(stack: &TestStack) -> String {
    local_postgres::database_url(stack.primary_port, "postgres")
}

fn migrate(stack: &TestStack) {
    let url = database_url(stack);
    let (status, _, stderr) =
        run_to_exit_with_args(recorder(), &["migrate"], &[("DATABASE_WRITER_URL", &url)]);
    assert!(status.success(), "recorder migrate: {stderr}");
}

async fn start_recorder(stack: &TestStack, topic: &str, group: &str, name: &str) -> ServiceProcess {
    start_recorder_with(stack, topic, group, name, &[]).await
}

/// [`start_recorder`] with settings added or replaced (`RECORDER_MAX_ATTEMPTS`, a database of
/// its own, ...).
async fn start_recorder_with(
    stack: &TestStack,
    topic: &str,
    group: &str,
    name: &str,
    extra: &[(&str, &str)],
) -> ServiceProcess {
    let mut env = stack.service_env("postgres");
    env.extend(
        [
            ("RECORDER_TOPIC", topic),
            ("RECORDER_GROUP", group),
            ("RECORDER_NAME", name),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    for (key, value) in extra {
        env.retain(|(existing, _)| existing != key);
        env.push((key.to_string(), value.to_string()));
    }
    let mut process = ServiceProcess::spawn(recorder(), &env, &stack.scratch_dir(name));
    process.wait_ready().await;
    process
}

/// A message to produce: with an envelope (an event) or without (poison).
struct Outgoing {
    envelope: Option<Envelope>,
    key: String,
    payload: String,
}

fn event(id: Uuid, payload: Value) -> Outgoing {
    let key = Uuid::new_v4().to_string();
    Outgoing {
        envelope: Some(Envelope {
            id,
            source: "/tests".into(),
            event_type: "io.taskstream.tests.recorded.v1".into(),
            subject: key.clone(),
            time: time::OffsetDateTime::now_utc(),
            traceparent: None,
        }),
        key,
        payload: payload.to_string(),
    }
}

async fn produce(stack: &TestStack, topic: &str, messages: &[Outgoing]) {
    let producer = events::kafka::producer(&stack.broker).expect("producer");
    for message in messages {
        let mut record = FutureRecord::to(topic)
            .key(&message.key)
            .payload(&message.payload);
        if let Some(envelope) = &message.envelope {
            record = record.headers(envelope.to_headers());
        }
        producer
            .send(record, Timeout::After(Duration::from_secs(10)))
            .await
            .unwrap_or_else(|(err, _)| panic!("produce to {topic}: {err}"));
    }
}

/// What the recorder applied for `topic` in the database at `url`: event id → (instance,
/// applications).
async fn recorded_in(url: &str, topic: &str) -> BTreeMap<Uuid, (String, i32)> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let rows: Vec<(Uuid, String, i32)> = sqlx::query_as(
        "SELECT event_id, consumer, applications FROM recorded_events WHERE topic = $1",
    )
    .bind(topic)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, consumer, applications)| (id, (consumer, applications)))
        .collect()
}

/// Waits until `count` events of `topic` are recorded (bounded by `limit`).
async fn wait_recorded(
    stack: &TestStack,
    topic: &str,
    count: usize,
    limit: Duration,
) -> BTreeMap<Uuid, (String, i32)> {
    wait_recorded_in(&database_url(stack), topic, count, limit).await
}

/// [`wait_recorded`] in the database at `url`.
async fn wait_recorded_in(
    url: &str,
    topic: &str,
    count: usize,
    limit: Duration,
) -> BTreeMap<Uuid, (String, i32)> {
    let deadline = Instant::now() + limit;
    loop {
        let recorded = recorded_in(url, topic).await;
        if recorded.len() >= count || Instant::now() > deadline {
            return recorded;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn create_topic(stack: &TestStack, topic: &str, partitions: i32) {
    stack.create_topics(
        &stack.broker,
        &[
            (topic.to_owned(), partitions),
            (events::catalog::dead_letter_topic(topic), 1),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_messages_go_to_the_dead_letter_topic_and_the_rest_are_processed() {
    let stack = TestStack::from_env();
    let topic = unique_name("test.dlq.");
    create_topic(&stack, &topic, 1);
    migrate(&stack);
    let recorder = start_recorder(&stack, &topic, &unique_name("group"), "dlq").await;

    let good: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let poison = Outgoing {
        envelope: None,
        key: "poison".into(),
        payload: "this is not an event".into(),
    };
    produce(
        &stack,
        &topic,
        &[
            event(good[0], json!({ "n": 0 })),
            poison,
            event(good[1], json!({ "n": 1 })),
            event(Uuid::now_v7(), json!({ "fail": "permanent" })),
            event(good[2], json!({ "n": 2 })),
            event(Uuid::now_v7(), json!({ "fail": "retryable" })),
            event(good[3], json!({ "n": 3 })),
            // The first event again, as a redelivery would bring it: applied once all the same.
            event(good[0], json!({ "n": 0 })),
        ],
    )
    .await;

    let applied = wait_recorded(&stack, &topic, 4, Duration::from_secs(60)).await;
    assert_eq!(
        applied.keys().copied().collect::<BTreeSet<_>>(),
        good.iter().copied().collect::<BTreeSet<_>>(),
        "every good event, and only those"
    );
    assert!(
        applied.values().all(|(_, applications)| *applications == 1),
        "{applied:?}"
    );

    let dead = read_topic(
        &stack.broker,
        &events::catalog::dead_letter_topic(&topic),
        Duration::from_secs(30),
        |records| records.len() >= 3,
    )
    .await;
    assert_eq!(dead.len(), 3, "{dead:?}");
    let summary: Vec<(&str, &str, &str)> = dead
        .iter()
        .map(|record| {
            (
                record.headers["dlq_original_offset"].as_str(),
                record.headers["dlq_attempts"].as_str(),
                record.headers["dlq_reason"].as_str(),
            )
        })
        .collect();
    assert_eq!(summary[0].0, "1");
    assert_eq!(summary[0].1, "0", "not an event: no handler run");
    assert!(summary[0].2.starts_with("not an event"), "{summary:?}");
    assert_eq!(
        (summary[1].0, summary[1].1, summary[1].2),
        ("3", "1", "told to fail")
    );
    assert_eq!(
        (summary[2].0, summary[2].1, summary[2].2),
        ("5", "3", "told to fail, every time"),
        "retried up to RECORDER_MAX_ATTEMPTS"
    );
    assert_eq!(
        dead[0].raw_payload, b"this is not an event",
        "set aside as it arrived"
    );
    assert!(dead
        .iter()
        .all(|record| record.headers["dlq_original_topic"] == topic));

    let client = http1_client();
    let metrics = recorder.url("/metrics");
    assert_eq!(
        metric_sum(&client, &metrics, "events_dead_lettered_total").await,
        3.0
    );
    assert_eq!(
        metric_sum(&client, &metrics, "event_retries_total").await,
        2.0
    );
    assert_eq!(
        metric_sum(&client, &metrics, "events_consumed_total").await,
        4.0
    );
    assert_eq!(
        metric_sum(&client, &metrics, "events_duplicate_total").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_shares_partitions_and_survives_losing_an_instance() {
    let stack = TestStack::from_env();
    let topic = unique_name("test.group.");
    let group = unique_name("group");
    create_topic(&stack, &topic, 4);
    migrate(&stack);
    let first = start_recorder(&stack, &topic, &group, "first").await;
    let second = start_recorder(&stack, &topic, &group, "second").await;

    // Let both join the group, then give them work.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let batch = |count: usize| -> Vec<Outgoing> {
        (0..count)
            .map(|n| event(Uuid::now_v7(), json!({ "n": n })))
            .collect()
    };
    produce(&stack, &topic, &batch(200)).await;
    let applied = wait_recorded(&stack, &topic, 200, Duration::from_secs(60)).await;
    assert_eq!(applied.len(), 200);
    let instances: BTreeSet<&str> = applied.values().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        instances,
        BTreeSet::from(["first", "second"]),
        "both instances got partitions"
    );

    // One instance dies without a goodbye while more work arrives.
    drop(first);
    produce(&stack, &topic, &batch(300)).await;
    let applied = wait_recorded(&stack, &topic, 500, Duration::from_secs(90)).await;
    assert_eq!(applied.len(), 500, "every event applied by someone");
    let twice: Vec<_> = applied
        .iter()
        .filter(|(_, (_, applications))| *applications != 1)
        .collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    drop(second);
}

/// Whether nothing went to the dead-letter topic of `topic`.
fn nothing_dead_lettered(stack: &TestStack, topic: &str) -> bool {
    topic_is_empty(&stack.broker, &events::catalog::dead_letter_topic(topic))
}

/// Waits until the metric `name` at `metrics_url` reaches `at_least` (bounded by `limit`).
async fn wait_metric(metrics_url: &str, name: &str, at_least: f64, limit: Duration) -> f64 {
    let client = http1_client();
    let deadline = Instant::now() + limit;
    loop {
        let value = metric_sum(&client, metrics_url, name).await;
        if value >= at_least || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_in_retry_backoff_at_shutdown_comes_again_after_the_restart() {
    let stack = TestStack::from_env();
    let topic = unique_name("test.stop.");
    let group = unique_name("group");
    create_topic(&stack, &topic, 1);
    migrate(&stack);
    // "first" fails the event and waits 3 s before each new attempt; it is stopped meanwhile.
    let mut first = start_recorder_with(
        &stack,
        &topic,
        &group,
        "first",
        &[
            ("RECORDER_MAX_ATTEMPTS", "20"),
            ("RECORDER_FIRST_BACKOFF_MS", "3000"),
        ],
    )
    .await;
    let id = Uuid::now_v7();
    produce(
        &stack,
        &topic,
        &[event(id, json!({ "fail_while": "first" }))],
    )
    .await;
    let retries = wait_metric(
        &first.url("/metrics"),
        "event_retries_total",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(retries, 1.0, "the handler failed once and is in backoff");
    first.terminate();
    let status = first.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}:\n{}", first.logs());

    // The same group again, with an instance in which the event succeeds.
    let _second = start_recorder(&stack, &topic, &group, "second").await;
    let applied = wait_recorded(&stack, &topic, 1, Duration::from_secs(60)).await;
    assert_eq!(
        applied.get(&id),
        Some(&("second".to_owned(), 1)),
        "neither applied nor dead-lettered before the stop, so delivered again: {applied:?}"
    );
    assert!(
        nothing_dead_lettered(&stack, &topic),
        "nothing dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_holds_events_back_and_dead_letters_none() {
    let stack = TestStack::from_env();
    let topic = unique_name("test.dbdown.");
    create_topic(&stack, &topic, 3);
    let mut database = stack.scratch_primary("recorder-db");
    let url = database.url();
    let (status, _, stderr) =
        run_to_exit_with_args(recorder(), &["migrate"], &[("DATABASE_WRITER_URL", &url)]);
    assert!(status.success(), "recorder migrate: {stderr}");
    let recorder = start_recorder_with(
        &stack,
        &topic,
        &unique_name("group"),
        "outage",
        &[("DATABASE_WRITER_URL", &url), ("DATABASE_READER_URL", &url)],
    )
    .await;
    // Joined and applying before the outage starts.
    let warm_up = Uuid::now_v7();
    produce(&stack, &topic, &[event(warm_up, json!({ "n": -1 }))]).await;
    assert_eq!(
        wait_recorded_in(&url, &topic, 1, Duration::from_secs(60))
            .await
            .len(),
        1
    );

    database.stop();
    let outage = Instant::now();
    let during: Vec<Outgoing> = (0..1000)
        .map(|n| event(Uuid::now_v7(), json!({ "n": n })))
        .collect();
    produce(&stack, &topic, &during).await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    database.start();

    let applied = wait_recorded_in(&url, &topic, 1001, Duration::from_secs(90)).await;
    assert_eq!(
        applied.len(),
        1001,
        "every event applied once the database is back"
    );
    let twice: Vec<_> = applied.iter().filter(|(_, (_, n))| *n != 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    assert!(
        nothing_dead_lettered(&stack, &topic),
        "an outage is no reason to dead-letter"
    );
    let metrics = recorder.url("/metrics");
    let client = http1_client();
    // The series is there at 0 (not absent): the dead-letter alert's increase() needs a 0
    // before the first dead letter to see it.
    let text = test_support::metrics_text(&client, &metrics).await;
    assert!(
        text.lines()
            .any(|line| line.starts_with("events_dead_lettered_total{")
                && line.contains(&format!("topic=\"{topic}\""))
                && line.ends_with(" 0")),
        "no events_dead_lettered_total at 0 for {topic}:\n{text}"
    );
    assert_eq!(
        metric_sum(&client, &metrics, "events_dead_lettered_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_event_ids_are_forgotten_after_the_redelivery_window() {
    let stack = TestStack::from_env();
    let topic = unique_name("test.forget.");
    create_topic(&stack, &topic, 1);
    let database = stack.scratch_primary("recorder-forget");
    let url = database.url();
    let (status, _, stderr) =
        run_to_exit_with_args(recorder(), &["migrate"], &[("DATABASE_WRITER_URL", &url)]);
    assert!(status.success(), "recorder migrate: {stderr}");
    // Ids applied long ago (far more than one batch), and a few recent ones that must stay.
    database.query(
        "postgres",
        "INSERT INTO processed_events (event_id, topic, processed_at) \
         SELECT gen_random_uuid(), 'old', \
                CASE WHEN n <= 12000 THEN now() - interval '9 days' ELSE now() - interval '7 days' END \
         FROM generate_series(1, 12005) AS n",
    );
    let _recorder = start_recorder_with(
        &stack,
        &topic,
        &unique_name("group"),
        "forget",
        &[
            ("DATABASE_WRITER_URL", &url),
            ("DATABASE_READER_URL", &url),
            ("HOUSEKEEPING_INTERVAL_SECS", "1"),
        ],
    )
    .await;
    let remaining = poll_until(
        Duration::from_secs(30),
        || async { database.query("postgres", "SELECT count(*) FROM processed_events") },
        |remaining| remaining == "5",
    )
    .await;
    assert_eq!(
        remaining, "5",
        "ids older than 8 days forgotten, younger ones kept"
    );
}
