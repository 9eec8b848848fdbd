//! What tasks publishes, read from the real broker as a product team's consumer would: every
//! committed change, keyed by task id, in order, as a CloudEvent with the request's trace
//! context; and with the broker down, writes still succeed and every event arrives exactly once
//! when it is back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use events::catalog::{TaskCreated, TaskDeleted, TaskUpdated};
use events::outbox::RELAY_LOCK;
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
    // The pod stays in rotation: the outbox is there so that writes go on without the broker
    // (a Kafka rolling restart must not take every pod out at once).
    for _ in 0..4 {
        let ready = test_support::http1_client()
            .get(system.tasks.url("/readyz"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(750)).await;
    }
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

/// A `NOTIFY` in the writing transaction serialises every writer's commit in PostgreSQL (it
/// halved the commit rate): the instance that writes wakes its own relay instead, after the
/// commit, and a waiting instance passes the wake-up on with a `NOTIFY` outside the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wake_the_relay_without_notifying_inside_their_transaction() {
    let stack = TestStack::from_env();
    let broker = stack.scratch_broker("tasks-wake");
    let bootstrap = broker.bootstrap_servers();
    stack.create_topics(&bootstrap, &events::catalog::topics_to_create(3));
    let database = stack.scratch_database("tasks");
    let settings = isolated(&bootstrap, &database);
    let writer_url = &database
        .iter()
        .find(|(name, _)| name == "DATABASE_WRITER_URL")
        .expect("the scratch database's URL")
        .1;
    let system = System::start_with("tasks-wake", None, &settings).await;
    let ada = system.user("wake").await;
    let mut listener = sqlx::postgres::PgListener::connect(writer_url)
        .await
        .expect("listen");
    listener.listen("outbox").await.expect("LISTEN outbox");

    // One instance, publishing: its writes notify nobody.
    let created = system.create(&ada, json!({ "title": "woken" })).await;
    assert_eq!(created.status, 201);
    let id = task_id(&created);
    let changed = send(
        system
            .request(&ada, Method::PATCH, &format!("/v1/tasks/{id}"))
            .header("if-match", "*")
            .json(&json!({ "status": "done" })),
    )
    .await;
    assert_eq!(changed.status, 200);
    let published = published_after_settling(&bootstrap, 2).await;
    assert_eq!(published.len(), 2, "both changes published");
    let heard = tokio::time::timeout(Duration::from_millis(500), listener.try_recv()).await;
    assert!(
        heard.is_err(),
        "a write sent NOTIFY on the outbox channel: {heard:?}"
    );

    // A second instance, waiting for the lock: its write reaches the publisher by NOTIFY.
    let second = system.another_tasks("tasks-wake-2", &settings).await;
    let created = test_support::http1_client()
        .post(second.url("/v1/tasks"))
        .header("authorization", &ada.access_token)
        .json(&json!({ "title": "from the other instance" }))
        .send()
        .await
        .expect("POST to the second instance");
    assert_eq!(created.status(), 201);
    let heard = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert!(
        matches!(heard, Ok(Ok(_))),
        "the waiting instance passed the wake-up on: {heard:?}"
    );
    assert_eq!(published_after_settling(&bootstrap, 3).await.len(), 3);
}

/// Settings pointing tasks at `broker` and `database` (from [`TestStack::scratch_database`]).
fn isolated<'a>(bootstrap: &'a str, database: &'a [(String, String)]) -> Vec<(&'a str, &'a str)> {
    let mut settings: Vec<(&str, &str)> = vec![("KAFKA_BOOTSTRAP_SERVERS", bootstrap)];
    settings.extend(database.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    settings
}

/// Polls the metric `name` at `metrics_url` until it is above zero; returns how long that took,
/// or `None` if it stayed at zero for `limit`.
async fn time_until_positive(metrics_url: &str, name: &str, limit: Duration) -> Option<Duration> {
    let client = test_support::http1_client();
    let started = Instant::now();
    while started.elapsed() < limit {
        if test_support::metric_sum(&client, metrics_url, name).await > 0.0 {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The event ids in the outbox, and how many of them are not published yet.
async fn outbox_state(conn: &mut PgConnection) -> (Vec<String>, i64) {
    let rows: Vec<(String, bool)> =
        sqlx::query_as("SELECT event_id::text, published_at IS NULL FROM outbox")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    let pending = rows.iter().filter(|(_, pending)| *pending).count() as i64;
    (rows.into_iter().map(|(id, _)| id).collect(), pending)
}

/// Waits until the outbox has nothing left to publish (bounded by `limit`).
async fn wait_outbox_drained(conn: &mut PgConnection, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        let (ids, pending) = outbox_state(conn).await;
        if pending == 0 {
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} events still unpublished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How often each event id appears on the topic.
fn count_per_id(records: &[Record]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for record in records {
        *counts.entry(record.headers["ce_id"].clone()).or_insert(0) += 1;
    }
    counts
}

/// What a relay publishes per round: the most a relay that lost its lock mid-round can publish
/// after another took over (`RelaySettings::default().batch`).
const RELAY_BATCH: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_broker_shows_as_backlog_at_once_and_a_stop_during_it_loses_nothing() {
    let stack = TestStack::from_env();
    let mut broker = stack.scratch_broker("tasks-paused");
    let bootstrap = broker.bootstrap_servers();
    stack.create_topics(&bootstrap, &events::catalog::topics_to_create(3));
    let database = stack.scratch_database("tasks");
    let settings = isolated(&bootstrap, &database);
    // The system's instance starts first and takes the relay's lock; a second one waits.
    let mut system = System::start_with("tasks-paused", None, &settings).await;
    let second = system.another_tasks("tasks-paused-2", &settings).await;
    let ada = system.user("paused").await;

    broker.pause().expect("pause the broker");
    let paused = Instant::now();
    let created = system.create(&ada, json!({ "title": "stuck" })).await;
    assert_eq!(created.status, 201, "writes go on without the broker");
    for (instance, metrics) in [
        ("the publishing instance", system.tasks.url("/metrics")),
        ("the waiting instance", second.url("/metrics")),
    ] {
        let seen = time_until_positive(&metrics, "outbox_pending", Duration::from_secs(5)).await;
        assert!(
            seen.is_some_and(|after| after < Duration::from_secs(2)),
            "{instance} reports the backlog within 2 s of the stuck write: {seen:?}"
        );
    }
    for n in 0..10 {
        let created = system
            .create(&ada, json!({ "title": format!("during {n}") }))
            .await;
        assert_eq!(created.status, 201);
    }

    // SIGTERM to the publisher while its deliveries hang: it leaves within the budget.
    let stopping = Instant::now();
    system.tasks.terminate();
    let status = system.tasks.wait_exit(Duration::from_secs(20)).await;
    let stop_took = stopping.elapsed();
    println!("SIGTERM with the broker paused: exited in {stop_took:?}");
    assert!(status.success(), "{status}:\n{}", system.tasks.logs());
    assert!(
        stop_took < Duration::from_secs(10),
        "stopped in {stop_took:?}, past the 5 s background budget (after a 20 s drain at most, under a 30 s grace period)"
    );
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(paused.elapsed())).await;
    broker.resume().expect("resume the broker");

    // The survivor takes over and publishes every row; none is lost, duplicates are bounded.
    let mut conn = PgConnection::connect(&database[0].1).await.unwrap();
    let ids = wait_outbox_drained(&mut conn, Duration::from_secs(60)).await;
    assert_eq!(ids.len(), 11, "one event per task created");
    let records = published_after_settling(&bootstrap, ids.len()).await;
    let counts = count_per_id(&records);
    for id in &ids {
        assert!(counts.contains_key(id), "event {id} never published");
    }
    let duplicates = records.len() - counts.len();
    assert!(duplicates <= RELAY_BATCH, "{duplicates} duplicates");
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_loses_its_lock_mid_drain_stops_within_a_round() {
    let stack = TestStack::from_env();
    let broker = stack.scratch_broker("tasks-lock");
    let bootstrap = broker.bootstrap_servers();
    stack.create_topics(&bootstrap, &events::catalog::topics_to_create(3));
    let database = stack.scratch_database("tasks");
    let settings = isolated(&bootstrap, &database);
    let system = System::start_with("tasks-lock", None, &settings).await;
    let _second = system.another_tasks("tasks-lock-2", &settings).await;

    // A backlog as a long outage leaves it: many committed events at once.
    const BACKLOG: usize = 30_000;
    let mut conn = PgConnection::connect(&database[0].1).await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (event_id, topic, message_key, event_type, source, subject, occurred_at, payload) \
         SELECT gen_random_uuid(), 'tasks.task.v1', key, 'io.taskstream.tests.backlog.v1', '/tests', key, now(), \
                json_build_object('n', n) \
         FROM generate_series(1, $1) AS n, LATERAL (SELECT gen_random_uuid()::text AS key) AS k",
    )
    .bind(BACKLOG as i32)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('outbox', '')")
        .execute(&mut conn)
        .await
        .unwrap();

    // Once the drain is under way, the publisher's lock connection dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let published: i64 =
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert!(
            published < BACKLOG as i64,
            "drained before the lock could be taken away"
        );
        if published > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the drain never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND classid::int8 = $1 AND objid::int8 = $2 \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    // A bigint advisory key shows as its high half in classid and low half in objid.
    .bind(RELAY_LOCK >> 32)
    .bind(RELAY_LOCK & 0xFFFF_FFFF)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(killed, [true], "one relay held the lock");

    let ids = wait_outbox_drained(&mut conn, Duration::from_secs(120)).await;
    assert_eq!(ids.len(), BACKLOG);
    let records = published_after_settling(&bootstrap, BACKLOG).await;
    let counts = count_per_id(&records);
    assert_eq!(counts.len(), BACKLOG, "every event published");
    let duplicates = records.len() - BACKLOG;
    println!("lock lost mid-drain: {duplicates} duplicates of {BACKLOG} events");
    assert!(
        duplicates <= RELAY_BATCH,
        "{duplicates} duplicates: the old publisher went on after losing its lock"
    );

    // A consumer applies each event once all the same.
    let recorder = test_support::workspace_binary("examples/recorder");
    let recorder_db = local_postgres::database_url(stack.primary_port, "postgres");
    let (status, _, stderr) = test_support::run_to_exit_with_args(
        &recorder,
        &["migrate"],
        &[("DATABASE_WRITER_URL", recorder_db.as_str())],
    );
    assert!(status.success(), "recorder migrate: {stderr}");
    let group = test_support::unique_name("lock-group");
    let mut env = stack.service_env("postgres");
    env.retain(|(key, _)| key != "KAFKA_BOOTSTRAP_SERVERS");
    env.extend(
        [
            ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
            ("RECORDER_TOPIC", TOPIC),
            ("RECORDER_GROUP", group.as_str()),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let mut consumer =
        test_support::ServiceProcess::spawn(&recorder, &env, &stack.scratch_dir("tasks-lock-rec"));
    consumer.wait_ready().await;
    let mut recorder_conn = PgConnection::connect(&recorder_db).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let applied = loop {
        let applied: Vec<(String, i32)> = sqlx::query_as(
            "SELECT event_id::text, applications FROM recorded_events WHERE event_id = ANY($1::uuid[])",
        )
        .bind(&ids)
        .fetch_all(&mut recorder_conn)
        .await
        .unwrap();
        if applied.len() == BACKLOG || Instant::now() > deadline {
            break applied;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(applied.len(), BACKLOG, "every event applied");
    assert!(
        applied.iter().all(|(_, applications)| *applications == 1),
        "no event applied twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_works_through_a_large_backlog_in_batches() {
    let stack = TestStack::from_env();
    let database = stack.scratch_database("tasks");
    let mut conn = PgConnection::connect(&database[0].1).await.unwrap();
    // Long-published events and day-old idempotency keys, far more than one batch of each,
    // and a few of each that must stay.
    const OLD_EVENTS: i32 = 200_000;
    const OLD_KEYS: i32 = 25_000;
    sqlx::query(
        "INSERT INTO outbox (event_id, topic, message_key, event_type, source, subject, occurred_at, payload, published_at) \
         SELECT gen_random_uuid(), 'tasks.task.v1', 'k', 'io.taskstream.tests.old.v1', '/tests', 'k', \
                now() - interval '3 hours', '{}', \
                CASE WHEN n <= $1 THEN now() - interval '2 hours' ELSE now() END \
         FROM generate_series(1, $1 + 5) AS n",
    )
    .bind(OLD_EVENTS)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (owner_id, key, request_hash, task_id, created_at) \
         SELECT gen_random_uuid(), 'key', '\\x00', gen_random_uuid(), \
                CASE WHEN n <= $1 THEN now() - interval '2 days' ELSE now() END \
         FROM generate_series(1, $1 + 5) AS n",
    )
    .bind(OLD_KEYS)
    .execute(&mut conn)
    .await
    .unwrap();

    let mut settings: Vec<(&str, &str)> = database
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    settings.extend([
        ("HOUSEKEEPING_INTERVAL_SECS", "1"),
        // One DELETE of everything would be cancelled; batches are not.
        ("DATABASE_STATEMENT_TIMEOUT_MS", "100"),
    ]);
    let _system = System::start_with("tasks-housekeeping", None, &settings).await;
    let pool = sqlx::PgPool::connect(&database[0].1).await.unwrap();
    let remaining = test_support::poll_until(
        Duration::from_secs(60),
        || async {
            sqlx::query_as::<_, (i64, i64)>(
                "SELECT (SELECT count(*) FROM outbox), (SELECT count(*) FROM idempotency_keys)",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        },
        |remaining| *remaining == (5, 5),
    )
    .await;
    assert_eq!(
        remaining,
        (5, 5),
        "(outbox rows, idempotency keys) left: only the recent ones"
    );
}
