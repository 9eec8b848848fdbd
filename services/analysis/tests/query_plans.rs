//! Every query the analysis endpoints run is served by an index: the plans of the service's own
//! statements are checked with EXPLAIN on the real primary, after loading enough rows that a
//! sequential scan would be the planner's choice if an index were missing. Plans are printed
//! (`--nocapture`).

use analysis::domain::EXPORT_PAGE;
use analysis::storage;
use service_kit::sqlx::{self, Connection, PgConnection};
use test_support::TestStack;
use time::OffsetDateTime;
use uuid::Uuid;

/// Tasks loaded for the owner under test, and for everybody else (over 1,000 other users).
const OWNER_TASKS: i64 = 20_000;
const OTHER_TASKS: i64 = 60_000;
const OTHER_USERS: i64 = 1_000;

async fn load(conn: &mut PgConnection, owner: Uuid) {
    for statement in [
        "INSERT INTO task_analysis (task_id, owner_id, version, deleted, open_due_at, model) \
         SELECT gen_random_uuid(), \
                CASE WHEN n <= $2 THEN $1 ELSE ('00000000-0000-0000-0000-' || lpad((n % $4)::text, 12, '0'))::uuid END, \
                1, n % 50 = 0, CASE WHEN n % 5 = 0 THEN now() + (n % 100 - 50) * interval '1 day' END, '{}' \
         FROM generate_series(1, $2 + $3) AS n",
        "INSERT INTO user_task_counts (owner_id, status, priority, tasks) \
         SELECT CASE WHEN u = 0 THEN $1 ELSE ('00000000-0000-0000-0000-' || lpad(u::text, 12, '0'))::uuid END, s, p, 5 \
         FROM generate_series(0, $4) AS u, unnest(ARRAY['todo','in_progress','blocked','done']) AS s, \
              unnest(ARRAY['low','medium','high','urgent']) AS p",
        "INSERT INTO user_days (owner_id, day, created, completed) \
         SELECT CASE WHEN u = 0 THEN $1 ELSE ('00000000-0000-0000-0000-' || lpad(u::text, 12, '0'))::uuid END, \
                current_date - d, 3, 2 \
         FROM generate_series(0, $4) AS u, generate_series(0, 199) AS d",
        "INSERT INTO user_cycle_times (owner_id, bucket, tasks) \
         SELECT CASE WHEN u = 0 THEN $1 ELSE ('00000000-0000-0000-0000-' || lpad(u::text, 12, '0'))::uuid END, b, 4 \
         FROM generate_series(0, $4) AS u, generate_series(1, 120) AS b",
        "INSERT INTO user_usage (owner_id, day, name, events) \
         SELECT CASE WHEN u = 0 THEN $1 ELSE ('00000000-0000-0000-0000-' || lpad(u::text, 12, '0'))::uuid END, \
                current_date - d, 'event' || e, 7 \
         FROM generate_series(0, $4) AS u, generate_series(0, 59) AS d, generate_series(1, 5) AS e",
        "INSERT INTO user_as_of (owner_id, event_at, topic, partition, \"offset\") \
         SELECT CASE WHEN u = 0 THEN $1 ELSE ('00000000-0000-0000-0000-' || lpad(u::text, 12, '0'))::uuid END, \
                now(), 'tasks.task.v1', 0, u \
         FROM generate_series(0, $4) AS u",
    ] {
        sqlx::query(statement)
            .bind(owner)
            .bind(OWNER_TASKS)
            .bind(OTHER_TASKS)
            .bind(OTHER_USERS)
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|err| panic!("{statement}: {err}"));
    }
    sqlx::query("ANALYZE")
        .execute(&mut *conn)
        .await
        .expect("analyze");
}

fn plan_text(rows: Vec<(String,)>) -> String {
    rows.into_iter()
        .map(|(line,)| line)
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_indexed(name: &str, plan: &str) {
    println!("── {name}\n{plan}\n");
    assert!(
        !plan.contains("Seq Scan"),
        "{name} scans a whole table:\n{plan}"
    );
    assert!(plan.contains("Index"), "{name} uses no index:\n{plan}");
}

#[tokio::test]
async fn every_endpoint_query_is_served_by_an_index() {
    let stack = TestStack::from_env();
    let database = stack.scratch_database("analysis");
    let mut conn = PgConnection::connect(&database[0].1).await.unwrap();
    let owner = Uuid::new_v4();
    load(&mut conn, owner).await;
    let ids: Vec<Uuid> =
        sqlx::query_scalar("SELECT task_id FROM task_analysis WHERE owner_id = $1 LIMIT 200")
            .bind(owner)
            .fetch_all(&mut conn)
            .await
            .unwrap();

    let explain = |sql: &str| format!("EXPLAIN {sql}");
    let rows = sqlx::query_as(&explain(storage::TASK_SQL))
        .bind(ids[0])
        .bind(owner)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_indexed("GET /v1/analysis/tasks/{id}", &plan_text(rows));

    let rows = sqlx::query_as(&explain(storage::TASKS_SQL))
        .bind(&ids)
        .bind(owner)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_indexed("GET /v1/analysis/tasks?ids= (200)", &plan_text(rows));

    for (name, after) in [("first page", Uuid::nil()), ("a later page", ids[100])] {
        let rows = sqlx::query_as(&explain(storage::EXPORT_PAGE_SQL))
            .bind(owner)
            .bind(after)
            .bind(EXPORT_PAGE)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        // Near the end of a user's tasks the planner may fetch the few rows left and sort them
        // (a top-500 sort: bounded memory either way).
        assert_indexed(
            &format!("GET /v1/analysis/export, {name}"),
            &plan_text(rows),
        );
    }

    let rows = sqlx::query_as(&explain(storage::AS_OF_SQL))
        .bind(owner)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_indexed("GET /v1/analysis/export (its ETag)", &plan_text(rows));

    let today = OffsetDateTime::now_utc().date();
    let rows = sqlx::query_as(&explain(storage::USAGE_SQL))
        .bind(owner)
        .bind(today - time::Duration::days(6))
        .bind(today)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_indexed("GET /v1/analysis/usage", &plan_text(rows));

    let from = (OffsetDateTime::now_utc() - time::Duration::days(84)).date();
    let rows = sqlx::query_as(&explain(storage::DASHBOARD_SQL))
        .bind(owner)
        .bind(from)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_indexed("GET /v1/analysis/me", &plan_text(rows));
}

/// The pages of `GET /v1/analysis/usage`, a later one as well as the first, after loading a user
/// with 10,120 rows and 1,000 others with 300 each: read through the primary key's index, in its
/// order (no sort), and a later page starts inside the index (no rows filtered away).
#[tokio::test]
async fn every_usage_page_is_read_through_the_index() {
    let stack = TestStack::from_env();
    let database = stack.scratch_database("analysis");
    let mut conn = PgConnection::connect(&database[0].1).await.unwrap();
    let owner = Uuid::new_v4();
    // The owner: 92 days × 110 names; 1,000 others: 60 days × 5 names each.
    sqlx::query(
        "INSERT INTO user_usage (owner_id, day, name, events) \
         SELECT $1, current_date - d, 'name.' || n, 3 \
         FROM generate_series(0, 91) AS d, generate_series(1, 110) AS n",
    )
    .bind(owner)
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO user_usage (owner_id, day, name, events) \
         SELECT ('00000000-0000-0000-0000-' || lpad(u::text, 12, '0'))::uuid, current_date - d, \
                'event' || e, 7 \
         FROM generate_series(1, 1000) AS u, generate_series(0, 59) AS d, generate_series(1, 5) AS e",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&mut conn).await.unwrap();

    let today = OffsetDateTime::now_utc().date();
    let from = today - time::Duration::days(91);
    let first: Vec<(String,)> = sqlx::query_as(&format!("EXPLAIN {}", storage::USAGE_SQL))
        .bind(owner)
        .bind(from)
        .bind(today)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let later: Vec<(String,)> = sqlx::query_as(&format!("EXPLAIN {}", storage::USAGE_AFTER_SQL))
        .bind(owner)
        .bind(from)
        .bind(today)
        .bind(today - time::Duration::days(40))
        .bind("name.5")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    for (name, plan) in [
        ("GET /v1/analysis/usage, first page", plan_text(first)),
        ("GET /v1/analysis/usage, a later page", plan_text(later)),
    ] {
        assert_indexed(name, &plan);
        assert!(!plan.contains("Sort"), "{name} sorts what it read:\n{plan}");
        assert!(
            plan.contains("Limit"),
            "{name} reads without a limit:\n{plan}"
        );
    }
    // The later page starts inside the index: its row comparison is an index condition, not a
    // filter over the rows before it.
    let later: Vec<(String,)> = sqlx::query_as(&format!(
        "EXPLAIN (ANALYZE, BUFFERS) {}",
        storage::USAGE_AFTER_SQL
    ))
    .bind(owner)
    .bind(from)
    .bind(today)
    .bind(today - time::Duration::days(10))
    .bind("name.5")
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let later = plan_text(later);
    println!("── a late page, run\n{later}\n");
    assert!(
        !later.contains("Rows Removed by Filter"),
        "the late page filters rows it skips:\n{later}"
    );
}
