//! The pages of `GET /v1/analysis/usage` are served by the primary key's index, a later page as
//! well as the first: EXPLAIN of the service's own statements on the real primary, after loading
//! enough rows (a user with 10,000 and 1,000 others) that a scan would be the planner's choice
//! without the index. Plans are printed (`--nocapture`).

use analysis::storage;
use service_kit::sqlx::{self, Connection, PgConnection};
use test_support::TestStack;
use time::OffsetDateTime;
use uuid::Uuid;

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
    let plan = |rows: Vec<(String,)>| {
        rows.into_iter()
            .map(|(line,)| line)
            .collect::<Vec<_>>()
            .join("\n")
    };
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
    for (name, plan) in [("first page", plan(first)), ("a later page", plan(later))] {
        println!("── GET /v1/analysis/usage, {name}\n{plan}\n");
        assert!(
            !plan.contains("Seq Scan"),
            "{name} scans the table:\n{plan}"
        );
        assert!(!plan.contains("Sort"), "{name} sorts what it read:\n{plan}");
        assert!(plan.contains("Index"), "{name} uses no index:\n{plan}");
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
    let later = plan(later);
    println!("── a late page, run\n{later}\n");
    assert!(
        !later.contains("Rows Removed by Filter"),
        "the late page filters rows it skips:\n{later}"
    );
}
