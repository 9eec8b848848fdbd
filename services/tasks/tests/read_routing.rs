//! What a client can make tasks ask of the primary with reads alone: lookups of ids that do not
//! exist, and consistency tokens from the future. Neither may turn the primary into the reader.
//! tasks runs on a database of the test's own, so the primary's transaction count for it
//! (`pg_stat_database.xact_commit`) counts only this test's instance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use test_support::{metric_sum_where, Answer, TestStack};

mod common;
use common::{send, System};

/// How long each flood lasts, and how many clients send it.
const FLOOD: Duration = Duration::from_secs(3);
const CLIENTS: usize = 16;

/// Transactions committed in `database` on the stack's primary so far.
fn primary_transactions(stack: &TestStack, database: &str) -> i64 {
    let install = local_postgres::PgInstall::detect().expect("PostgreSQL binaries");
    // The statistics of finished transactions reach the view within a second or so.
    std::thread::sleep(Duration::from_millis(1500));
    local_postgres::query(
        &install,
        stack.primary_port,
        "postgres",
        &format!("SELECT xact_commit FROM pg_stat_database WHERE datname = '{database}'"),
    )
    .expect("pg_stat_database")
    .trim()
    .parse()
    .expect("a count")
}

/// `CLIENTS` clients sending `request` (made afresh each time) for `FLOOD`: every answer's
/// status must be `expected`; returns how many were sent and their p50 and p99.
async fn flood(
    request: impl Fn() -> reqwest::RequestBuilder + Send + Sync + 'static,
    expected: u16,
) -> (usize, Duration, Duration) {
    let request = Arc::new(request);
    let clients = (0..CLIENTS).map(|_| {
        let request = request.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let until = Instant::now() + FLOOD;
            while Instant::now() < until {
                let started = Instant::now();
                let answer = Answer::send(request()).await;
                latencies.push(started.elapsed());
                assert_eq!(answer.status, expected, "{}", answer.body);
            }
            latencies
        })
    });
    let mut latencies: Vec<Duration> = test_support::join_spawned(clients.collect::<Vec<_>>())
        .await
        .into_iter()
        .flatten()
        .collect();
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    (latencies.len(), at(0.5), at(0.99))
}

async fn start(label: &str) -> (System, TestStack, String) {
    let stack = TestStack::from_env();
    let database = stack.scratch_database("tasks");
    let name = database[0].1.rsplit('/').next().unwrap().to_owned();
    let settings: Vec<(&str, &str)> = database
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let system = System::start_with_auth(label, None, &[], &settings).await;
    (system, stack, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lookups_of_ids_that_do_not_exist_are_answered_by_the_replica() {
    let (system, stack, database) = start("tasks-misses").await;
    let ada = system.user("misses").await;
    let created = system.create(&ada, json!({ "title": "real" })).await;
    assert_eq!(created.status, 201);
    // Let the replica catch up, as it does within milliseconds while healthy.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let tasks = system.tasks.url("");
    let client = test_support::http1_client();
    let metrics = format!("{tasks}/metrics");
    let fallbacks = || {
        metric_sum_where(
            &client,
            &metrics,
            "db_replica_fallback_total",
            "reason=\"missing_on_replica\"",
        )
    };
    let (before, confirmed_before) = (primary_transactions(&stack, &database), fallbacks().await);
    let flooder = test_support::http1_client();
    let tasks_url = tasks.clone();
    let access = ada.access_token.clone();
    let (requests, p50, p99) = flood(
        move || {
            flooder
                .get(format!("{tasks_url}/v1/tasks/{}", uuid::Uuid::now_v7()))
                .header("authorization", &access)
        },
        404,
    )
    .await;
    let on_primary = primary_transactions(&stack, &database) - before;
    let confirmed = fallbacks().await - confirmed_before;
    println!(
        "{requests} lookups of made-up ids in {FLOOD:?} (p50 {p50:?}, p99 {p99:?}): \
         {confirmed} confirmed on the primary, {on_primary} primary transactions"
    );
    // At most 50 misses a second are confirmed while the replica keeps up (and 50 at once);
    // background work (the replica monitor's samples, the revoked-users reload, housekeeping)
    // commits a few transactions a second.
    let confirmable = 50.0 + 50.0 * FLOOD.as_secs_f64() * 1.2;
    assert!(
        confirmed <= confirmable,
        "{confirmed} misses confirmed in {FLOOD:?}"
    );
    assert!(
        on_primary as f64 <= confirmable + 100.0,
        "{on_primary} primary transactions for {requests} lookups of ids that do not exist"
    );

    // A task of ada's is found, on the replica, with or without its token.
    let id = created.body["id"].as_str().unwrap();
    let found = system.get(&ada, &format!("/v1/tasks/{id}")).await;
    assert_eq!(found.status, 200, "{}", found.body);
    // Her own write right after it, read with its token, is never missed.
    for n in 0..20 {
        let written = system
            .create(&ada, json!({ "title": format!("mine {n}") }))
            .await;
        let read = send(
            system
                .request(
                    &ada,
                    Method::GET,
                    &format!("/v1/tasks/{}", written.body["id"].as_str().unwrap()),
                )
                .header("x-consistency-token", common::token(&written)),
        )
        .await;
        assert_eq!(read.status, 200, "own write {n} read back: {}", read.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_consistency_tokens_cost_the_primary_a_bounded_trickle() {
    let (system, stack, database) = start("tasks-forged").await;
    let ada = system.user("forged").await;
    let created = system.create(&ada, json!({ "title": "real" })).await;
    assert_eq!(created.status, 201);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let tasks = system.tasks.url("");
    let before = primary_transactions(&stack, &database);
    let flooder = test_support::http1_client();
    let access = ada.access_token.clone();
    let (requests, p50, p99) = flood(
        move || {
            flooder
                .get(format!("{tasks}/v1/tasks?limit=1"))
                .header("authorization", &access)
                .header("x-consistency-token", "FFFFFFFF/FFFFFFF0")
        },
        200,
    )
    .await;
    let on_primary = primary_transactions(&stack, &database) - before;
    let per_second = on_primary as f64 / FLOOD.as_secs_f64();
    println!(
        "{requests} reads with a forged token in {FLOOD:?} (p50 {p50:?}, p99 {p99:?}): \
         {on_primary} primary transactions ({per_second:.0}/s)"
    );
    // At most one reading of the primary's position per 10 ms (100 a second), plus background
    // work (the replica monitor's samples, the revoked-users reload, housekeeping: about 5 a
    // second, more in bursts).
    assert!(
        per_second < 125.0,
        "{per_second:.0} primary transactions a second for {requests} forged tokens"
    );
    // A real token still gets its write, at once.
    let written = system.create(&ada, json!({ "title": "after" })).await;
    let read = send(
        system
            .request(&ada, Method::GET, "/v1/tasks?limit=5")
            .header("x-consistency-token", common::token(&written)),
    )
    .await;
    assert_eq!(read.status, 200);
    assert!(read.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|task| task["title"] == "after"));
}
