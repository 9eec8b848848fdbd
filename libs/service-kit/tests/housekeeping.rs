//! Housekeeping against the real primary: a round works through everything due in batches and
//! keeps what is not due, and an instance that finds another one sweeping skips the round.

use std::time::Duration;

use service_kit::config::{Env, ServiceConfig};
use service_kit::db::Database;
use service_kit::housekeeping::{self, Sweep, BATCH};
use service_kit::sqlx::{self, Connection, PgConnection};
use test_support::{unique_name, TestStack};

#[tokio::test]
async fn a_round_deletes_everything_due_in_batches_one_instance_at_a_time() {
    let stack = TestStack::from_env();
    let url = local_url(&stack);
    let env = Env::from_pairs(&[
        ("DATABASE_WRITER_URL", url.as_str()),
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1"),
    ]);
    let config = ServiceConfig::from_env(&env, "housekeeping-test", 1).unwrap();
    let db = Database::connect_lazy(&config.database).unwrap();
    let table = unique_name("swept_");
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let due = BATCH * 3 + 17;
    sqlx::query(&format!(
        "CREATE TABLE {table} AS SELECT n, n <= {due} AS due FROM generate_series(1, {due} + 5) AS n"
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    let name = unique_name("sweep-");
    let sweeps = [Sweep::new(
        "test",
        format!("DELETE FROM {table} WHERE n IN (SELECT n FROM {table} WHERE due LIMIT $1)"),
    )];

    // Another instance is sweeping: this one leaves the round to it.
    let mut other = PgConnection::connect(&url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(housekeeping::lock_key(&name))
        .execute(&mut other)
        .await
        .unwrap();
    assert_eq!(
        housekeeping::run_once(&db, &name, &sweeps).await.unwrap(),
        None
    );
    other.close().await.unwrap();

    let deleted = tokio::time::timeout(
        Duration::from_secs(30),
        housekeeping::run_once(&db, &name, &sweeps),
    )
    .await
    .expect("a round ends")
    .unwrap();
    assert_eq!(
        deleted,
        Some(due as u64),
        "every due row, over several batches"
    );
    let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 5, "rows not due stay");
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await
        .unwrap();
}

fn local_url(stack: &TestStack) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        stack.primary_port
    )
}
