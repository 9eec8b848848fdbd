//! The read models end to end, on a broker and database of the test's own: a scripted history of
//! task events with known times gives exact time in status, lead and cycle times and weekly
//! throughput; redelivered and duplicated events change nothing; `analysis rebuild` gives the same
//! models; deleting a task and then the account takes them away and refuses the account's token.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use service_kit::sqlx::{self, PgPool};
use test_support::{run_to_exit_with_args, workspace_binary};
use time::OffsetDateTime;

mod common;
use common::{user_deleted, ScriptedTask, System};

/// Every row of the read-model tables, as text, in a stable order.
async fn dump(pool: &PgPool) -> Vec<String> {
    let mut rows = Vec::new();
    for (table, order) in [
        ("task_analysis", "task_id"),
        ("user_task_counts", "owner_id, status, priority"),
        ("user_days", "owner_id, day"),
        ("user_cycle_times", "owner_id, bucket"),
        ("user_as_of", "owner_id"),
    ] {
        let found: Vec<String> =
            sqlx::query_scalar(&format!("SELECT t::text FROM {table} t ORDER BY {order}"))
                .fetch_all(pool)
                .await
                .unwrap();
        rows.extend(found.into_iter().map(|row| format!("{table} {row}")));
    }
    rows
}

async fn index_names(pool: &PgPool) -> BTreeSet<String> {
    sqlx::query_scalar::<_, String>("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

fn hours(n: i64) -> time::Duration {
    time::Duration::hours(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scripted_history_gives_exact_analyses_that_replays_and_rebuilds_keep() {
    let system = System::start("analysis-models").await;
    let alice = system.user("alice").await;
    let bob = system.user("bob").await;

    // Nine days ago at 09:00 UTC, so every completion falls in the dashboard's 12 weeks.
    let now = OffsetDateTime::now_utc();
    let base = (now - time::Duration::days(9)).replace_time(time::Time::from_hms(9, 0, 0).unwrap());

    // Task A: todo 2 h → in progress 3 h → blocked 1 h → in progress 18 h → done 24 h →
    // reopened (todo) 48 h → done. Due 2.625 days in: completed late.
    let mut a = ScriptedTask::new(&alice.user_id, base, "todo");
    a.snapshot.due_at = Some(base + hours(63));
    let (a_id, a_due) = (a.id(), a.snapshot.due_at);
    system.publish(&a.created(), base).await;
    let mut steps = ScriptedTask::new(&alice.user_id, base, "todo");
    steps.snapshot.id = a_id;
    steps.snapshot.due_at = a_due;
    let mut updates = Vec::new();
    for (status, offset) in [
        ("in_progress", 2),
        ("blocked", 5),
        ("in_progress", 6),
        ("done", 24),
        ("todo", 48),
        ("done", 96),
    ] {
        let update = steps.moved(status, base + hours(offset));
        let id = system.publish(&update, base + hours(offset)).await;
        updates.push((update, base + hours(offset), id));
    }

    // Task B: created in progress, done 10 h later, no due date. Task C: bob's.
    let mut b = ScriptedTask::new(&alice.user_id, base + hours(1), "in_progress");
    b.snapshot.priority = "high".into();
    system.publish(&b.created(), base + hours(1)).await;
    let b_done = b.moved("done", base + hours(11));
    system.publish(&b_done, base + hours(11)).await;
    let c = ScriptedTask::new(&bob.user_id, base, "todo");
    system.publish(&c.created(), base).await;

    let path_a = format!("/v1/analysis/tasks/{}", a.id());
    let first = system
        .get_until(&alice, &path_a, |answer| {
            answer.status == 200 && answer.body["changes"] == 6
        })
        .await;
    let body = &first.body;
    assert_eq!(
        body["time_in_status_secs"],
        json!({"todo": 50.0 * 3600.0, "in_progress": 21.0 * 3600.0, "blocked": 3600.0, "done": 24.0 * 3600.0}),
        "{body}"
    );
    assert_eq!(body["status"], "done");
    assert_eq!(body["reopens"], 1);
    assert_eq!(body["lead_time_secs"], json!(96.0 * 3600.0));
    assert_eq!(body["cycle_time_secs"], json!(94.0 * 3600.0));
    assert_eq!(body["due"], "late");
    assert_eq!(body["as_of"]["topic"], "tasks.task.v1");
    let as_of = common::at(body["as_of"]["event_at"].as_str().unwrap());
    assert_eq!(as_of, base + hours(96));
    let etag = first.header("etag").expect("etag").to_owned();

    // If-None-Match with that tag: 304.
    let not_modified = system
        .client
        .get(system.edge.url(&path_a))
        .header("authorization", &alice.access_token)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);

    // Another user's task is not there for alice, and bob cannot read alice's.
    let theirs = system.get(&bob, &path_a).await;
    assert_eq!((theirs.status, theirs.code()), (404, "not_found"));

    // Several at once, in the order asked, with the unknown one named.
    let stranger = uuid::Uuid::now_v7();
    let b_path = format!("/v1/analysis/tasks/{}", b.id());
    system
        .get_until(&alice, &b_path, |answer| {
            answer.status == 200 && answer.body["status"] == "done"
        })
        .await;
    // The replica may trail the primary for a moment (single analyses confirm a miss there).
    let several = system
        .get_until(
            &alice,
            &format!("/v1/analysis/tasks?ids={},{},{stranger}", b.id(), a.id()),
            |answer| {
                answer.body["items"]
                    .as_array()
                    .is_some_and(|items| items.len() == 2)
            },
        )
        .await;
    assert_eq!(several.status, 200, "{}", several.body);
    let items = several.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{}", several.body);
    assert_eq!(items[0]["task_id"], b.id().to_string());
    assert_eq!(items[1]["task_id"], a.id().to_string());
    assert_eq!(items[0]["cycle_time_secs"], json!(10.0 * 3600.0));
    assert_eq!(several.body["missing"], json!([stranger.to_string()]));
    for bad in [
        "",
        "nope",
        &vec![stranger.to_string(); 1].join(",").replace('-', ""),
    ] {
        let refused = system
            .get(&alice, &format!("/v1/analysis/tasks?ids={bad}"))
            .await;
        // A UUID without dashes too: the document says hyphenated UUIDs.
        assert_eq!(refused.status, 400, "{bad:?}: {}", refused.body);
        assert_eq!(refused.invalid_fields(), BTreeSet::from(["ids".to_owned()]));
    }
    let too_many = (0..201)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let refused = system
        .get(&alice, &format!("/v1/analysis/tasks?ids={too_many}"))
        .await;
    assert_eq!(refused.status, 400, "{}", refused.body);

    // The dashboard: counts, throughput in the weeks of the completions, cycle-time percentiles.
    let board = system.get(&alice, "/v1/analysis/me").await;
    assert_eq!(board.status, 200, "{}", board.body);
    let board = board.body;
    assert_eq!(board["by_status"]["done"], 2, "{board}");
    assert_eq!(board["by_status"]["todo"], 0);
    assert_eq!(
        board["by_priority"],
        json!({"low": 0, "medium": 1, "high": 1, "urgent": 0})
    );
    assert_eq!(board["work_in_progress"], 0);
    let weeks = board["throughput"].as_array().unwrap();
    assert_eq!(weeks.len(), 12);
    let week_of = |day: OffsetDateTime| {
        let (year, week, _) = day.date().to_iso_week_date();
        format!("{year}-W{week:02}")
    };
    let completed_in = |week: &str| {
        weeks
            .iter()
            .filter(|w| w["week"] == week)
            .map(|w| w["completed"].as_i64().unwrap())
            .sum::<i64>()
    };
    let (week_a, week_b) = (week_of(base + hours(96)), week_of(base + hours(11)));
    if week_a == week_b {
        assert_eq!(completed_in(&week_a), 2, "{weeks:?}");
    } else {
        assert_eq!(
            (completed_in(&week_a), completed_in(&week_b)),
            (1, 1),
            "{weeks:?}"
        );
    }
    assert_eq!(
        weeks
            .iter()
            .map(|w| w["completed"].as_i64().unwrap())
            .sum::<i64>(),
        2
    );
    // Cycle times 10 h and 94 h: the median is the 10 h one, the 85th percentile the 94 h one,
    // each read from a bucket at most ~9% above it.
    let median = board["cycle_time"]["median_secs"].as_f64().unwrap();
    let p85 = board["cycle_time"]["p85_secs"].as_f64().unwrap();
    assert!((36_000.0..=36_000.0 * 1.1).contains(&median), "{median}");
    assert!((338_400.0..=338_400.0 * 1.1).contains(&p85), "{p85}");
    assert_eq!(board["cycle_time"]["tasks"], 2);
    let created_days: i64 = board["daily"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["created"].as_i64().unwrap())
        .sum();
    assert_eq!(created_days, 2);
    assert!(board["as_of"]["event_at"].is_string(), "{board}");

    // Redelivery (the same event ids) and duplicates (the same changes with new ids, as a
    // republishing relay would send) change nothing.
    for (update, time, id) in &updates {
        system.publish_with_id(update, *time, *id).await;
        system.publish(update, *time).await;
    }
    system.publish(&a.created(), base).await;
    system.publish(&b_done, base + hours(11)).await;
    // A marker after them in the same partition as A: once it is applied, so are they.
    let marker_at = base + hours(97);
    let marker = steps.moved("done", marker_at);
    system.publish(&marker, marker_at).await;
    let after = system
        .get_until(&alice, &path_a, |answer| answer.body["changes"] == 7)
        .await;
    assert_eq!(
        after.body["time_in_status_secs"],
        body["time_in_status_secs"]
    );
    assert_eq!(after.body["reopens"], 1);
    assert_eq!(after.body["lead_time_secs"], body["lead_time_secs"]);
    let board_again = system.get(&alice, "/v1/analysis/me").await.body;
    assert_eq!(board_again["by_status"], board["by_status"]);
    assert_eq!(board_again["throughput"], board["throughput"]);
    assert_eq!(board_again["cycle_time"], board["cycle_time"]);

    // A rebuild from the topics gives exactly the incremental models, under the same index names.
    let pool = system.pool().await;
    let (incremental, indexes) = (dump(&pool).await, index_names(&pool).await);
    let writer = system.writer_url();
    let bootstrap = system.broker.bootstrap_servers();
    let (status, stdout, stderr) = run_to_exit_with_args(
        workspace_binary("analysis"),
        &["rebuild"],
        &[
            ("DATABASE_WRITER_URL", writer.as_str()),
            ("KAFKA_BOOTSTRAP_SERVERS", bootstrap.as_str()),
        ],
    );
    assert!(status.success(), "rebuild: {stdout} {stderr}");
    println!("{stdout}");
    assert_eq!(dump(&pool).await, incremental, "rebuilt models differ");
    assert_eq!(index_names(&pool).await, indexes);
    // The service reads the swapped-in tables.
    let served = system.get(&alice, &path_a).await;
    assert_eq!(served.status, 200);
    assert_eq!(
        served.body["time_in_status_secs"],
        body["time_in_status_secs"]
    );

    // Deleting B takes it out of the counts.
    system.publish(&b.deleted(), base + hours(12)).await;
    system
        .get_until(&alice, &b_path, |answer| answer.status == 404)
        .await;
    let board = system.get(&alice, "/v1/analysis/me").await.body;
    assert_eq!(board["by_status"]["done"], 1, "{board}");
    assert_eq!(board["by_priority"]["high"], 0);

    // Deleting the account erases everything of alice and refuses her token; bob keeps his.
    system.publish(&user_deleted(&alice, now), now).await;
    let refused = system
        .get_until(&alice, &path_a, |answer| answer.status == 401)
        .await;
    assert_eq!(refused.code(), "invalid_token", "{}", refused.body);
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM task_analysis WHERE owner_id = $1) \
              + (SELECT count(*) FROM user_task_counts WHERE owner_id = $1) \
              + (SELECT count(*) FROM user_days WHERE owner_id = $1) \
              + (SELECT count(*) FROM user_cycle_times WHERE owner_id = $1) \
              + (SELECT count(*) FROM user_as_of WHERE owner_id = $1)",
    )
    .bind(uuid::Uuid::parse_str(&alice.user_id).unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
    // A late event about her (tasks' own task.deleted for an erased task, say) brings nothing back.
    let late = ScriptedTask::new(&alice.user_id, now, "todo");
    let late_event = system.publish(&late.created(), now).await;
    test_support::poll_until(
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM processed_events WHERE event_id = $1",
            )
            .bind(late_event)
            .fetch_one(&pool)
            .await
            .unwrap()
        },
        |seen| *seen == 1,
    )
    .await;
    let late_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM task_analysis WHERE task_id = $1")
            .bind(late.id())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(late_rows, 0, "an erased account's late event was applied");
    let bobs = system
        .get(&bob, &format!("/v1/analysis/tasks/{}", c.id()))
        .await;
    assert_eq!(
        (bobs.status, bobs.body["status"].as_str()),
        (200, Some("todo"))
    );
}

#[tokio::test]
async fn openapi_describes_every_route_and_every_route_needs_a_token() {
    let system = System::start("analysis-openapi").await;
    let document = test_support::Answer::send(
        system
            .client
            .get(system.edge.url("/v1/analysis/openapi.json")),
    )
    .await;
    assert_eq!(document.status, 200);
    let operations = test_support::openapi_operations(&document.body);
    let expected: BTreeSet<String> = [
        "GET /v1/analysis/tasks/{id}",
        "GET /v1/analysis/tasks",
        "GET /v1/analysis/me",
        "GET /v1/analysis/export",
        "GET /v1/analysis/usage",
        "POST /v1/telemetry",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(operations, expected);
    for path in [
        format!("/v1/analysis/tasks/{}", uuid::Uuid::now_v7()),
        "/v1/analysis/tasks?ids=x".to_owned(),
        "/v1/analysis/me".to_owned(),
        "/v1/analysis/export".to_owned(),
        "/v1/analysis/usage".to_owned(),
    ] {
        let refused = test_support::Answer::send(system.client.get(system.edge.url(&path))).await;
        assert_eq!(
            (refused.status, refused.code()),
            (401, "unauthorized"),
            "{path}"
        );
    }
    let user = system.user("dora").await;
    // A bad path as the service's first authenticated request (its token check is dropped
    // mid-way while the signing keys are fetched) does not make the next request a 503.
    let bad_id = system.get(&user, "/v1/analysis/tasks/not-a-uuid").await;
    assert_eq!((bad_id.status, bad_id.code()), (400, "invalid_path"));
    // Nothing applied for a new user yet: an empty dashboard, not an error.
    let board = system.get(&user, "/v1/analysis/me").await;
    assert_eq!(board.status, 200, "{}", board.body);
    assert_eq!(board.body["as_of"], serde_json::Value::Null);
    assert_eq!(board.body["by_status"]["todo"], 0);
}
