//! Account deletion end to end, on a broker and databases of the test's own: the request to
//! auth, `user.deleted` through auth's outbox, tasks refusing the old token and erasing 10,000
//! tasks in batches while another user goes on being served, a redelivery changing nothing, and
//! the username free again. "Erased" is checked by searching every row of every table of each
//! service's database for the user id.

use std::time::{Duration, Instant};

use events::catalog::{EventPayload, UserDeleted, AUTH_USER};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use reqwest::Method;
use serde_json::json;
use service_kit::sqlx::{self, PgPool};
use test_support::kafka::read_topic;
use test_support::{metric_sum, poll_until, rows_mentioning, Answer, TestStack};

mod common;
use common::{send, System};

/// Tasks the deleted account holds.
const TASKS: i64 = 10_000;

/// Sends `request` every 20 ms until told to stop; every answer must be bob's 20 tasks.
async fn read_until_stopped(
    request: reqwest::RequestBuilder,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    while !*stopped.borrow_and_update() {
        let started = Instant::now();
        let answer = Answer::send(request.try_clone().unwrap()).await;
        latencies.push(started.elapsed());
        assert_eq!(answer.status, 200, "bob is served during the erasure");
        assert_eq!(answer.body["items"].as_array().unwrap().len(), 20);
        let _ = tokio::time::timeout(Duration::from_millis(20), stopped.changed()).await;
    }
    latencies
}

/// `n reads, p50 …, p99 …, max …`.
fn summary(mut latencies: Vec<Duration>) -> String {
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    format!(
        "{} reads, p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        at(0.5),
        at(0.99),
        latencies[latencies.len() - 1]
    )
}

fn pairs(settings: &[(String, String)]) -> Vec<(&str, &str)> {
    settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_an_account_erases_the_user_everywhere_and_nobody_else() {
    let stack = TestStack::from_env();
    let broker = stack.scratch_broker("erasure");
    let bootstrap = broker.bootstrap_servers();
    stack.create_topics(&bootstrap, &events::catalog::topics_to_create(3));
    let auth_db = stack.scratch_database("auth");
    let tasks_db = stack.scratch_database("tasks");
    let common_settings = [
        ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
        ("HOUSEKEEPING_INTERVAL_SECS", "1"),
        // So the outboxes' copies of the user's events go within seconds too.
        ("OUTBOX_KEEP_PUBLISHED_SECS", "0"),
    ];
    let with_db = |db: &'_ [(String, String)]| -> Vec<(String, String)> {
        db.iter()
            .cloned()
            .chain(
                common_settings
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
            .collect()
    };
    let (auth_settings, tasks_settings) = (with_db(&auth_db), with_db(&tasks_db));
    let system = System::start_with_auth(
        "erasure",
        None,
        &pairs(&auth_settings),
        &pairs(&tasks_settings),
    )
    .await;
    let ada = system.user("erased").await;
    let bob = system.user("kept").await;

    // Ada's account: tasks through the API (labels, a change, a deletion, idempotency keys),
    // and the rest of the 10,000 loaded straight into tasks' database, history included.
    for n in 0..20 {
        let created = send(
            system
                .request(&ada, Method::POST, "/v1/tasks")
                .header("idempotency-key", format!("key-{n}"))
                .json(&json!({ "title": format!("ada {n}"), "labels": ["mine"] })),
        )
        .await;
        assert_eq!(created.status, 201);
        if n == 0 {
            let id = created.body["id"].as_str().unwrap().to_owned();
            let path = format!("/v1/tasks/{id}");
            let deleted = send(system.request(&ada, Method::DELETE, &path)).await;
            assert_eq!(deleted.status, 204);
        }
    }
    let tasks_pool = PgPool::connect(&tasks_db[0].1).await.unwrap();
    sqlx::query(
        "WITH loaded AS ( \
           INSERT INTO tasks (id, owner_id, title, status, priority, labels, version, created_at, updated_at) \
           SELECT gen_random_uuid(), $1::uuid, 'loaded ' || n, 'todo', 'medium', ARRAY['bulk'], 1, now(), now() \
           FROM generate_series(1, $2) AS n RETURNING id, owner_id), \
         labelled AS ( \
           INSERT INTO task_labels (owner_id, label, task_id) SELECT owner_id, 'bulk', id FROM loaded) \
         INSERT INTO task_revisions (task_id, version, owner_id, actor_id, kind, changes, changed_at) \
         SELECT id, 1, owner_id, owner_id, 'created', '{}', now() FROM loaded",
    )
    .bind(&ada.user_id)
    .bind(TASKS - 19)
    .execute(&tasks_pool)
    .await
    .unwrap();
    for n in 0..20 {
        let created = system
            .create(&bob, json!({ "title": format!("bob {n}") }))
            .await;
        assert_eq!(created.status, 201);
    }
    let count_tasks = |owner: String| {
        let pool = tasks_pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tasks WHERE owner_id = $1::uuid")
                .bind(owner)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count_tasks(ada.user_id.clone()).await, TASKS);

    // A wrong password deletes nothing.
    let delete_me = |password: &str| {
        system
            .request(&ada, Method::DELETE, "/v1/users/me")
            .json(&json!({ "password": password }))
    };
    let refused = send(delete_me("not the password")).await;
    assert_eq!(refused.status, 401, "{:?}", refused.body);
    assert_eq!(refused.body["error"]["code"], "invalid_credentials");
    assert_eq!(system.get(&ada, "/v1/users/me").await.status, 200);
    assert_eq!(count_tasks(ada.user_id.clone()).await, TASKS);

    // Bob keeps reading his tasks the whole time (once the replica has them all).
    let listed = poll_until(
        Duration::from_secs(10),
        || async {
            system.get(&bob, "/v1/tasks?limit=20").await.body["items"]
                .as_array()
                .map_or(0, Vec::len)
        },
        |count| *count == 20,
    )
    .await;
    assert_eq!(listed, 20);
    let bobs_list = system.request(&bob, Method::GET, "/v1/tasks?limit=20");
    let (stop_baseline, stopped) = tokio::sync::watch::channel(false);
    let baseline = tokio::spawn(read_until_stopped(bobs_list.try_clone().unwrap(), stopped));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_baseline.send(true).unwrap();
    let baseline = baseline.await.unwrap();
    let (stop_reading, stopped) = tokio::sync::watch::channel(false);
    let reader = tokio::spawn(read_until_stopped(bobs_list, stopped));

    let deleting = Instant::now();
    let deleted = send(delete_me(&ada.password)).await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);

    // The old token is refused by auth at once and by tasks as soon as it has heard.
    assert_eq!(system.get(&ada, "/v1/users/me").await.status, 401);
    let refused_by_tasks = poll_until(
        Duration::from_secs(30),
        || async { system.get(&ada, "/v1/tasks").await.status },
        |status| *status == 401,
    )
    .await;
    assert_eq!(
        refused_by_tasks, 401,
        "tasks refuses the deleted account's token"
    );
    let token_refused_after = deleting.elapsed();

    let tasks_gone = poll_until(
        Duration::from_secs(60),
        || count_tasks(ada.user_id.clone()),
        |count| *count == 0,
    )
    .await;
    assert_eq!(tasks_gone, 0);
    let tasks_erased_after = deleting.elapsed();

    // Nothing of ada is left in any service's database, within the bound: the grace for
    // requests already under way, the batches, and the outboxes' copies.
    let databases = [
        ("auth", auth_db[0].1.clone()),
        ("tasks", tasks_db[0].1.clone()),
        (
            "notifications",
            local_postgres::database_url(stack.primary_port, "notifications"),
        ),
        (
            "analysis",
            local_postgres::database_url(stack.primary_port, "analysis"),
        ),
    ];
    let left = poll_until(
        Duration::from_secs(90),
        || async {
            let mut left = Vec::new();
            for (service, url) in &databases {
                for (table, count) in rows_mentioning(url, &ada.user_id) {
                    left.push(format!("{service}.{table}: {count}"));
                }
            }
            left
        },
        |left| left.is_empty(),
    )
    .await;
    let erased_after = deleting.elapsed();
    assert!(
        left.is_empty(),
        "rows still naming the deleted user: {left:?}"
    );
    stop_reading.send(true).unwrap();
    let during = reader.await.unwrap();
    println!(
        "account with {TASKS} tasks: token refused by tasks after {token_refused_after:?}, \
         tasks erased after {tasks_erased_after:?}, nothing left after {erased_after:?}; \
         bob's reads before: {}; during the erasure: {}",
        summary(baseline),
        summary(during)
    );
    assert_eq!(
        count_tasks(bob.user_id.clone()).await,
        20,
        "bob's tasks untouched"
    );

    // Each erased task was announced on its own, in its partition after its earlier events.
    let erased_events = read_topic(
        &bootstrap,
        "tasks.task.v1",
        Duration::from_secs(60),
        |records| {
            records
                .iter()
                .filter(|record| record.payload["reason"] == "account_deleted")
                .count() as i64
                >= TASKS
        },
    )
    .await;
    let announced = erased_events
        .iter()
        .filter(|record| record.payload["reason"] == "account_deleted")
        .count() as i64;
    assert_eq!(announced, TASKS, "one task.deleted per erased task");

    // The username is free again, and the new account sees nothing of the old one.
    let client = test_support::http1_client();
    let signup = client
        .post(system.auth.url("/v1/auth/signup"))
        .json(&json!({ "username": ada.username, "password": "a brand new password" }))
        .send()
        .await
        .unwrap();
    assert_eq!(signup.status(), 201);
    let account: serde_json::Value = signup.json().await.unwrap();
    let new_id = account["id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, ada.user_id, "a new account");
    let tokens = system
        .auth
        .login(&client, &ada.username, "a brand new password")
        .await;
    let mut again = ada.clone();
    again.access_token = format!("Bearer {}", tokens["access_token"].as_str().unwrap());
    let mine = system.get(&again, "/v1/tasks").await;
    assert_eq!(mine.status, 200);
    assert_eq!(mine.body["items"], json!([]), "nothing of the old account");
    let kept = system
        .create(&again, json!({ "title": "a new life" }))
        .await;
    assert_eq!(kept.status, 201);

    // user.deleted delivered again (same event id): nothing changes.
    let records = read_topic(
        &bootstrap,
        AUTH_USER.name,
        Duration::from_secs(30),
        |records| {
            records.iter().any(|record| {
                record.headers.get("ce_type").map(String::as_str) == Some(UserDeleted::TYPE)
            })
        },
    )
    .await;
    let original = records
        .iter()
        .find(|record| record.headers.get("ce_type").map(String::as_str) == Some(UserDeleted::TYPE))
        .expect("user.deleted on auth.user.v1");
    let mut headers = rdkafka::message::OwnedHeaders::new();
    for (key, value) in &original.headers {
        headers = headers.insert(rdkafka::message::Header {
            key: key.as_str(),
            value: Some(value.as_str()),
        });
    }
    let producer = events::kafka::producer(&bootstrap).unwrap();
    producer
        .send(
            FutureRecord::to(AUTH_USER.name)
                .key(original.key.as_deref().unwrap())
                .payload(&original.raw_payload)
                .headers(headers),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let metrics = system.tasks.url("/metrics");
    let duplicates = poll_until(
        Duration::from_secs(30),
        || async {
            metric_sum(
                &test_support::http1_client(),
                &metrics,
                "events_duplicate_total",
            )
            .await
        },
        |seen| *seen >= 1.0,
    )
    .await;
    assert!(duplicates >= 1.0, "the redelivery was recognised");
    assert_eq!(count_tasks(bob.user_id.clone()).await, 20);
    assert_eq!(count_tasks(ada.user_id.clone()).await, 0);
    assert_eq!(count_tasks(new_id).await, 1, "the new account's task stays");
}
