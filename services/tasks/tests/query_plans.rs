//! Every query the tasks endpoints run is served by an index: the plans of the service's own
//! statements (not copies) are checked with EXPLAIN on the real primary, after loading enough
//! rows that a sequential scan would be the planner's choice if an index were missing.
//!
//! The plans are printed (`cargo xtask test` shows them on failure; `--nocapture` always);
//! `services/tasks/QUERIES.md` keeps a copy for readers.

use events::catalog::TaskDeleted;
use events::outbox::NewEvent;
use service_kit::sqlx::{self, Connection, PgConnection, QueryBuilder};
use tasks::domain::erasure::TASKS_PER_BATCH;
use tasks::domain::{ListQuery, Status};
use tasks::storage;
use test_support::TestStack;
use time::OffsetDateTime;
use uuid::Uuid;

/// Tasks loaded for the owner under test, and for everybody else.
const OWNER_TASKS: i64 = 20_000;
const OTHER_TASKS: i64 = 60_000;

async fn connect(stack: &TestStack) -> PgConnection {
    let url = local_postgres::database_url(stack.primary_port, "tasks");
    PgConnection::connect(&url).await.expect("connect to tasks")
}

/// Loads tasks with labels and revisions for `owner` and for many other owners, then ANALYZE.
async fn load(conn: &mut PgConnection, owner: Uuid) {
    sqlx::query(
        "INSERT INTO tasks (id, owner_id, title, status, priority, due_at, labels, version, created_at, updated_at) \
         SELECT gen_random_uuid(), CASE WHEN n <= $2 THEN $1 ELSE gen_random_uuid() END, \
                'task ' || n, (ARRAY['todo','in_progress','blocked','done'])[1 + n % 4], 'medium', \
                CASE WHEN n % 5 = 0 THEN now() + n * interval '1 hour' END, \
                ARRAY['label' || (n % 50)], 1, now(), now() \
         FROM generate_series(1, $2 + $3) AS n",
    )
    .bind(owner)
    .bind(OWNER_TASKS)
    .bind(OTHER_TASKS)
    .execute(&mut *conn)
    .await
    .expect("load tasks");
    sqlx::query(
        "INSERT INTO task_labels (owner_id, label, task_id) \
         SELECT owner_id, unnest(labels), id FROM tasks ON CONFLICT DO NOTHING",
    )
    .execute(&mut *conn)
    .await
    .expect("load labels");
    sqlx::query(
        "INSERT INTO task_revisions (task_id, version, owner_id, actor_id, kind, changes, changed_at) \
         SELECT id, 1, owner_id, owner_id, 'created', '{}', now() FROM tasks \
         ON CONFLICT DO NOTHING",
    )
    .execute(&mut *conn)
    .await
    .expect("load revisions");
    sqlx::query("ANALYZE tasks, task_labels, task_revisions")
        .execute(&mut *conn)
        .await
        .expect("analyze");
}

/// The plan's lines, with array literals (a batch's ids) shortened to `'{…}'`.
fn plan_text(rows: Vec<(String,)>) -> String {
    rows.into_iter()
        .map(|(line,)| match (line.find("'{"), line.find("}'")) {
            (Some(start), Some(end)) if end > start => {
                format!("{}'{{…}}'{}", &line[..start], &line[end + 2..])
            }
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// No sequential scan, and the owner's id is part of an index condition: the query starts at
/// this owner's rows instead of sifting through everybody's.
fn assert_indexed(name: &str, plan: &str, owner: Uuid) {
    println!("── {name}\n{plan}\n");
    assert!(
        !plan.contains("Seq Scan"),
        "{name} scans a whole table:\n{plan}"
    );
    assert!(
        plan.lines()
            .any(|line| line.contains("Index Cond") && line.contains(&owner.to_string())),
        "{name} does not enter an index at the owner's rows:\n{plan}"
    );
}

#[tokio::test]
async fn every_endpoint_query_is_served_by_an_index() {
    let stack = TestStack::from_env();
    let mut conn = connect(&stack).await;
    let owner = Uuid::new_v4();
    load(&mut conn, owner).await;
    let some_task: Uuid = sqlx::query_scalar("SELECT id FROM tasks WHERE owner_id = $1 LIMIT 1")
        .bind(owner)
        .fetch_one(&mut conn)
        .await
        .unwrap();

    for (name, sql) in [("GET /v1/tasks/{id}, and before PATCH", storage::FIND_SQL)] {
        let rows = sqlx::query_as(&format!("EXPLAIN {sql}"))
            .bind(some_task)
            .bind(owner)
            .fetch_all(&mut conn)
            .await
            .expect("explain");
        assert_indexed(name, &plan_text(rows), owner);
    }
    let rows = sqlx::query_as(&format!("EXPLAIN {}", storage::REVISIONS_SQL))
        .bind(some_task)
        .bind(owner)
        .bind(0_i64)
        .bind(101_i64)
        .fetch_all(&mut conn)
        .await
        .expect("explain");
    // Revisions are found by task id (the primary key); the owner filters those few rows.
    let plan = plan_text(rows);
    println!("── GET /v1/tasks/{{id}}/revisions\n{plan}\n");
    assert!(
        plan.contains("Index Scan using task_revisions_pkey") && !plan.contains("Seq Scan"),
        "revisions are not read through their primary key:\n{plan}"
    );

    // Erasing a deleted account, batch by batch: each batch picks rows through the owner's
    // index, then deletes those by key.
    for (name, sql) in [
        (
            "erasure: pick a batch of tasks",
            storage::ERASE_PICK_TASKS_SQL,
        ),
        (
            "erasure: pick a batch of histories",
            storage::ERASE_PICK_HISTORIES_SQL,
        ),
    ] {
        let rows = sqlx::query_as(&format!("EXPLAIN {sql}"))
            .bind(owner)
            .bind(TASKS_PER_BATCH)
            .fetch_all(&mut conn)
            .await
            .expect("explain");
        assert_indexed(name, &plan_text(rows), owner);
    }
    // The writes: one statement each, every part of it by key.
    let event = || {
        let deleted = TaskDeleted {
            task_id: some_task,
            owner_id: owner,
            last_version: 1,
            actor_id: owner,
            reason: None,
        };
        NewEvent::new("/taskstream/tasks", &deleted).unwrap()
    };
    let labels = vec!["label1".to_owned()];
    let now = OffsetDateTime::now_utc();
    let update = format!("EXPLAIN {}", *storage::UPDATE);
    let delete = format!("EXPLAIN {}", *storage::DELETE);
    for (name, query) in [
        (
            "PATCH /v1/tasks/{id} (row, labels, revision, event)",
            sqlx::query_as(&update)
                .bind(some_task)
                .bind(owner)
                .bind("title")
                .bind(None::<String>)
                .bind("todo")
                .bind("low")
                .bind(None::<OffsetDateTime>)
                .bind(&labels)
                .bind(now)
                .bind(1_i64)
                .bind(true)
                .bind(serde_json::json!({})),
        ),
        (
            "DELETE /v1/tasks/{id} (row, revision, event)",
            sqlx::query_as(&delete)
                .bind(some_task)
                .bind(owner)
                .bind(1_i64),
        ),
    ] {
        let rows = event()
            .bind(query)
            .fetch_all(&mut conn)
            .await
            .expect("explain");
        let plan = plan_text(rows);
        println!("── {name}\n{plan}\n");
        assert!(
            !plan.contains("Seq Scan") && plan.contains("Index Cond"),
            "{name} does not go by key:\n{plan}"
        );
    }

    let picked: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM tasks WHERE owner_id = $1 LIMIT $2")
        .bind(owner)
        .bind(TASKS_PER_BATCH)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    for (name, sql) in [
        ("erasure: delete the picked tasks", storage::ERASE_TASKS_SQL),
        (
            "erasure: delete the picked histories",
            storage::ERASE_REVISIONS_SQL,
        ),
    ] {
        let rows = sqlx::query_as(&format!("EXPLAIN {sql}"))
            .bind(&picked)
            .fetch_all(&mut conn)
            .await
            .expect("explain");
        let plan = plan_text(rows);
        println!("── {name}\n{plan}\n");
        assert!(
            !plan.contains("Seq Scan") && plan.contains("Index Cond"),
            "{name} does not go by key:\n{plan}"
        );
    }

    let soon = OffsetDateTime::now_utc() + time::Duration::days(30);
    let cursor = Some(Uuid::max());
    let lists = [
        ("GET /v1/tasks", ListQuery::default()),
        (
            "GET /v1/tasks?cursor=…",
            ListQuery {
                after: cursor,
                ..ListQuery::default()
            },
        ),
        (
            "GET /v1/tasks?status=done",
            ListQuery {
                status: Some(Status::Done),
                ..ListQuery::default()
            },
        ),
        (
            "GET /v1/tasks?label=label7",
            ListQuery {
                label: Some("label7".into()),
                ..ListQuery::default()
            },
        ),
        (
            "GET /v1/tasks?label=label7&cursor=…",
            ListQuery {
                label: Some("label7".into()),
                after: cursor,
                ..ListQuery::default()
            },
        ),
        (
            "GET /v1/tasks?due_before=…",
            ListQuery {
                due_before: Some(soon),
                ..ListQuery::default()
            },
        ),
        (
            "GET /v1/tasks?status=…&label=…&due_before=…&cursor=…",
            ListQuery {
                status: Some(Status::Todo),
                label: Some("label8".into()),
                due_before: Some(soon),
                after: cursor,
                ..ListQuery::default()
            },
        ),
    ];
    for (name, mut query) in lists {
        query.limit = 50;
        let mut sql = QueryBuilder::new("EXPLAIN ");
        storage::push_list_query(&mut sql, owner, &query);
        let rows = sql
            .build_query_as()
            .fetch_all(&mut conn)
            .await
            .expect("explain");
        assert_indexed(name, &plan_text(rows), owner);
    }
}
