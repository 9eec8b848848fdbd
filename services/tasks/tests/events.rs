//! What tasks publishes, read from the real broker as a product team's consumer would: every
//! committed change, keyed by task id, in order, as a CloudEvent with the request's trace
//! context; and with the broker down, writes still succeed and every event arrives exactly once
//! when it is back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use events::catalog::{TaskCreated, TaskDeleted, TaskUpdated};
use reqwest::Method;
use serde_json::json;
use service_kit::sqlx::{self, Connection, PgConnection};
use test_support::kafka::{read_topic, read_topic_lingering, Record};
use test_support::TestStack;

mod common;
use common::{send, task_id, System};

const TOPIC: &str = "tasks.task.v1";

fn traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-b7ad6b7169203331-01")
}

/// Everything on the topic once it holds `count` records and a few seconds more have passed, so
/// that a duplicate, had there been one, would be counted.
async fn published_after_settling(bootstrap: &str, count: usize) -> Vec<Record> {
    read_topic_lingering(
        bootstrap,
        TOPIC,
        Duration::from_secs(60),
        |records| records.len() >= count,
        Duration::from_secs(3),
    )
    .await
}

fn trace_id_of(record: &Record) -> &str {
    record.headers["traceparent"]
        .split('-')
        .nth(1)
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_is_published_in_order_as_a_cloud_event_with_its_trace() {
    let stack = TestStack::from_env();
    let system = System::start("tasks-events").await;
    let ada = system.user("events").await;
    let traces = [
        "0af7651916cd43dd8448eb211c80319c",
        "1bf7651916cd43dd8448eb211c80319d",
        "2cf7651916cd43dd8448eb211c80319e",
    ];

    let created = send(
        system
            .request(&ada, Method::POST, "/v1/tasks")
            .header("traceparent", traceparent(traces[0]))
            .json(&json!({ "title": "publish me", "labels": ["Events"] })),
    )
    .await;
    assert_eq!(created.status, 201);
    let id = task_id(&created);
    let path = format!("/v1/tasks/{id}");
    let updated = send(
        system
            .request(&ada, Method::PATCH, &path)
            .header("traceparent", traceparent(traces[1]))
            .header("if-match", "\"1\"")
            .json(&json!({ "status": "done" })),
    )
    .await;
    assert_eq!(updated.status, 200);
    let deleted = send(
        system
            .request(&ada, Method::DELETE, &path)
            .header("traceparent", traceparent(traces[2])),
    )
    .await;
    assert_eq!(deleted.status, 204);

    let is_mine = |record: &Record| record.key.as_deref() == Some(id.as_str());
    let records = read_topic(&stack.broker, TOPIC, Duration::from_secs(30), |records| {
        records.iter().filter(|record| is_mine(record)).count() >= 3
    })
    .await;
    let mine: Vec<&Record> = records.iter().filter(|record| is_mine(record)).collect();
    let types: Vec<&str> = mine.iter().map(|r| r.headers["ce_type"].as_str()).collect();
    assert_eq!(
        types,
        [
            "io.taskstream.tasks.task.created.v1",
            "io.taskstream.tasks.task.updated.v1",
            "io.taskstream.tasks.task.deleted.v1",
        ],
        "in the order they happened"
    );
    assert!(
        mine.windows(2)
            .all(|pair| pair[0].partition == pair[1].partition && pair[0].offset < pair[1].offset),
        "one partition, increasing offsets"
    );
    let ids: BTreeSet<&str> = mine.iter().map(|r| r.headers["ce_id"].as_str()).collect();
    assert_eq!(ids.len(), 3);
    for (record, trace) in mine.iter().zip(traces) {
        assert_eq!(record.headers["ce_specversion"], "1.0");
        assert_eq!(record.headers["ce_source"], "/taskstream/tasks");
        assert_eq!(record.headers["ce_subject"], id);
        assert_eq!(record.headers["content-type"], "application/json");
        assert!(time::OffsetDateTime::parse(
            &record.headers["ce_time"],
            &time::format_description::well_known::Rfc3339
        )
        .is_ok());
        assert!(uuid::Uuid::parse_str(&record.headers["ce_id"]).is_ok());
        assert_eq!(
            trace_id_of(record),
            trace,
            "the request's trace continues in the event"
        );
    }

    // The payloads are the catalog's types.
    let created: TaskCreated = serde_json::from_value(mine[0].payload.clone()).unwrap();
    assert_eq!(created.task.id.to_string(), id);
    assert_eq!(created.task.version, 1);
    assert_eq!(created.task.labels, ["events"]);
    assert_eq!(created.actor_id.to_string(), ada.user_id);
    let updated: TaskUpdated = serde_json::from_value(mine[1].payload.clone()).unwrap();
    assert_eq!(updated.task.version, 2);
    assert_eq!(updated.task.status, "done");
    assert_eq!(updated.changes.keys().collect::<Vec<_>>(), ["status"]);
    let deleted: TaskDeleted = serde_json::from_value(mine[2].payload.clone()).unwrap();
    assert_eq!(deleted.last_version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_broker_down_writes_succeed_and_every_event_arrives_once_later() {
    let stack = TestStack::from_env();
    let mut broker = stack.scratch_broker("tasks-outage");
    stack.create_topics(
        &broker.bootstrap_servers(),
        &events::catalog::topics_to_create(3),
    );
    let bootstrap = broker.bootstrap_servers();
    // A database of its own too: the relay of whichever tasks instance holds a database's lock
    // publishes that database's outbox, and the other tests' instances use the broker they know.
    let database = stack.scratch_database("tasks");
    let mut settings: Vec<(&str, &str)> = vec![("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str())];
    settings.extend(database.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let system = System::start_with("tasks-outage", None, &settings).await;
    let ada = system.user("outage").await;
    let before = system
        .create(&ada, json!({ "title": "before the outage" }))
        .await;
    assert_eq!(before.status, 201);

    broker.pause().expect("pause the broker");
    let mut written = vec![task_id(&before)];
    for n in 0..10 {
        let created = system
            .create(&ada, json!({ "title": format!("during {n}") }))
            .await;
        assert_eq!(created.status, 201, "writes go on without the broker");
        let id = task_id(&created);
        let changed = send(
            system
                .request(&ada, Method::PATCH, &format!("/v1/tasks/{id}"))
                .header("if-match", "\"1\"")
                .json(&json!({ "status": "in_progress" })),
        )
        .await;
        assert_eq!(changed.status, 200);
        written.push(id);
    }
    // Twenty events wait in the outbox, committed with the changes.
    let mut conn = PgConnection::connect(&database[0].1).await.unwrap();
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE published_at IS NULL AND message_key = ANY($1)",
    )
    .bind(&written[1..])
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        waiting, 20,
        "the outbox holds what the broker could not take"
    );

    broker.resume().expect("resume the broker");
    let expected = 1 + 20;
    // Read until all arrived, then a little longer: a duplicate would arrive right behind.
    let settled = published_after_settling(&bootstrap, expected).await;
    assert_eq!(settled.len(), expected, "every event arrived, none twice");
    let ids: BTreeSet<&str> = settled
        .iter()
        .map(|r| r.headers["ce_id"].as_str())
        .collect();
    assert_eq!(ids.len(), expected, "no event published twice");
    let mut by_task: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for record in &settled {
        by_task
            .entry(record.key.as_deref().unwrap())
            .or_default()
            .push(record.headers["ce_type"].as_str());
    }
    assert_eq!(by_task.len(), written.len());
    for id in &written[1..] {
        assert_eq!(
            by_task[id.as_str()],
            [
                "io.taskstream.tasks.task.created.v1",
                "io.taskstream.tasks.task.updated.v1"
            ],
            "each task's events in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_publishes_at_a_time_and_another_takes_over_when_it_dies() {
    let stack = TestStack::from_env();
    let broker = stack.scratch_broker("tasks-relays");
    let bootstrap = broker.bootstrap_servers();
    stack.create_topics(&bootstrap, &events::catalog::topics_to_create(3));
    let database = stack.scratch_database("tasks");
    let mut settings: Vec<(&str, &str)> = vec![("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str())];
    settings.extend(database.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    // Two systems, two tasks instances with their relays, one database, one broker.
    let first = System::start_with("tasks-relay-1", None, &settings).await;
    let second = System::start_with("tasks-relay-2", None, &settings).await;
    let ada = first.user("relays").await;
    let bob = second.user("relays").await;
    for n in 0..10 {
        for (system, user) in [(&first, &ada), (&second, &bob)] {
            let created = system
                .create(user, json!({ "title": format!("task {n}") }))
                .await;
            assert_eq!(created.status, 201);
        }
    }
    let published = published_after_settling(&bootstrap, 20).await;
    assert_eq!(published.len(), 20, "two relays, yet each event once");

    // Whichever instance publishes, the other takes over when it is gone.
    drop(first);
    for n in 0..5 {
        let created = second
            .create(&bob, json!({ "title": format!("after {n}") }))
            .await;
        assert_eq!(created.status, 201);
    }
    let published = published_after_settling(&bootstrap, 25).await;
    assert_eq!(
        published.len(),
        25,
        "the survivor publishes what followed, once"
    );
    let ids: BTreeSet<&str> = published
        .iter()
        .map(|r| r.headers["ce_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 25);
}
