//! analysis's SQL. Every function runs on a connection it is given, so the domain decides what runs
//! on the primary, on a replica, or in one transaction. Table names are unqualified: a rebuild runs
//! the same statements with `search_path` set to its fresh schema. The read statements are public so
//! the EXPLAIN test checks the very plans the service runs.

use service_kit::sqlx::types::Json;
use service_kit::sqlx::{self, PgConnection};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::domain::model::{AsOf, TaskModel, Total};

/// One task's analysis.
pub const TASK_SQL: &str = "SELECT model FROM task_analysis \
     WHERE task_id = $1 AND owner_id = $2 AND NOT deleted";
/// Several of one user's tasks' analyses.
pub const TASKS_SQL: &str = "SELECT model FROM task_analysis \
     WHERE task_id = ANY($1) AND owner_id = $2 AND NOT deleted";
/// A page of a user's analyses after task `$2`, in id order (the export).
pub const EXPORT_PAGE_SQL: &str = "SELECT task_id, model FROM task_analysis \
     WHERE owner_id = $1 AND task_id > $2 AND NOT deleted ORDER BY task_id LIMIT $3";
/// A user's dashboard in one round trip: counts by status and priority, days since `$2`, the
/// cycle-time histogram, open tasks past due now, and the newest event applied.
pub const DASHBOARD_SQL: &str = "SELECT \
     (SELECT coalesce(json_agg(json_build_array(status, priority, tasks)), '[]') \
        FROM user_task_counts WHERE owner_id = $1 AND tasks <> 0) AS counts, \
     (SELECT coalesce(json_agg(json_build_array(day - DATE '1970-01-01', created, completed) \
        ORDER BY day), '[]') FROM user_days WHERE owner_id = $1 AND day >= $2) AS days, \
     (SELECT coalesce(json_agg(json_build_array(bucket, tasks) ORDER BY bucket), '[]') \
        FROM user_cycle_times WHERE owner_id = $1 AND tasks > 0) AS cycle_times, \
     (SELECT count(*) FROM task_analysis WHERE owner_id = $1 AND open_due_at < now()) AS overdue, \
     (SELECT json_build_object('event_at', to_char(event_at AT TIME ZONE 'UTC', \
            'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), 'topic', topic, 'partition', partition, \
            'offset', \"offset\") FROM user_as_of WHERE owner_id = $1) AS as_of";

/// The newest event applied for a user (the export's `ETag`).
pub const AS_OF_SQL: &str =
    "SELECT event_at, topic, partition, \"offset\" FROM user_as_of WHERE owner_id = $1";

/// Rows of one usage page.
pub const USAGE_PAGE_ROWS: usize = 1000;
/// [`USAGE_PAGE_ROWS`] + 1, written out for the statements (one more row than a page tells
/// whether there is a next one); a unit test keeps the two together.
macro_rules! usage_rows_read {
    () => {
        "1001"
    };
}

/// The first page of a user's telemetry counts for days `$2` to `$3`.
pub const USAGE_SQL: &str = concat!(
    "SELECT day, name, events FROM user_usage \
     WHERE owner_id = $1 AND day BETWEEN $2 AND $3 ORDER BY day, name LIMIT ",
    usage_rows_read!()
);
/// A later page: the rows after day `$4` and name `$5` (the row comparison is a range of the
/// primary key's index, so a late page reads no more rows than the first).
pub const USAGE_AFTER_SQL: &str = concat!(
    "SELECT day, name, events FROM user_usage \
     WHERE owner_id = $1 AND day BETWEEN $2 AND $3 AND (day, name) > ($4, $5) \
     ORDER BY day, name LIMIT ",
    usage_rows_read!()
);

/// A stored task row: a tombstone has no model.
pub struct StoredTask {
    pub version: i64,
    pub deleted: bool,
    pub model: Option<TaskModel>,
}

/// A user's dashboard rows, as [`DASHBOARD_SQL`] returns them.
#[derive(sqlx::FromRow)]
pub struct DashboardRows {
    pub counts: Json<Vec<(String, String, i64)>>,
    /// `(days since 1970-01-01, created, completed)`.
    pub days: Json<Vec<(i32, i64, i64)>>,
    pub cycle_times: Json<Vec<(i16, i64)>>,
    pub overdue: i64,
    pub as_of: Option<Json<AsOf>>,
}

#[tracing::instrument(skip_all)]
pub async fn task(
    conn: &mut PgConnection,
    owner: Uuid,
    task: Uuid,
) -> sqlx::Result<Option<TaskModel>> {
    sqlx::query_scalar::<_, Json<TaskModel>>(TASK_SQL)
        .bind(task)
        .bind(owner)
        .fetch_optional(conn)
        .await
        .map(|found| found.map(|Json(model)| model))
}

#[tracing::instrument(skip_all)]
pub async fn tasks(
    conn: &mut PgConnection,
    owner: Uuid,
    ids: &[Uuid],
) -> sqlx::Result<Vec<TaskModel>> {
    sqlx::query_scalar::<_, Json<TaskModel>>(TASKS_SQL)
        .bind(ids)
        .bind(owner)
        .fetch_all(conn)
        .await
        .map(|rows| rows.into_iter().map(|Json(model)| model).collect())
}

#[tracing::instrument(skip_all)]
pub async fn user_as_of(conn: &mut PgConnection, owner: Uuid) -> sqlx::Result<Option<AsOf>> {
    let row: Option<(OffsetDateTime, String, i32, i64)> = sqlx::query_as(AS_OF_SQL)
        .bind(owner)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(|(event_at, topic, partition, offset)| AsOf {
        event_at,
        topic,
        partition,
        offset,
    }))
}

#[tracing::instrument(skip_all)]
pub async fn export_page(
    conn: &mut PgConnection,
    owner: Uuid,
    after: Uuid,
    limit: i64,
) -> sqlx::Result<Vec<(Uuid, TaskModel)>> {
    sqlx::query_as::<_, (Uuid, Json<TaskModel>)>(EXPORT_PAGE_SQL)
        .bind(owner)
        .bind(after)
        .bind(limit)
        .fetch_all(conn)
        .await
        .map(|rows| rows.into_iter().map(|(id, Json(m))| (id, m)).collect())
}

#[tracing::instrument(skip_all)]
pub async fn dashboard(
    conn: &mut PgConnection,
    owner: Uuid,
    days_from: Date,
) -> sqlx::Result<DashboardRows> {
    sqlx::query_as::<_, DashboardRows>(DASHBOARD_SQL)
        .bind(owner)
        .bind(days_from)
        .fetch_one(conn)
        .await
}

/// The task's row, locked for the rest of the transaction (events of one task are applied one
/// at a time, whoever applies them: the consumer or a rebuild catching up).
#[tracing::instrument(skip_all)]
pub async fn lock_task(conn: &mut PgConnection, task: Uuid) -> sqlx::Result<Option<StoredTask>> {
    let row: Option<(i64, bool, Option<Json<TaskModel>>)> = sqlx::query_as(
        "SELECT version, deleted, model FROM task_analysis WHERE task_id = $1 FOR UPDATE",
    )
    .bind(task)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(version, deleted, model)| StoredTask {
        version,
        deleted,
        model: model.map(|Json(model)| model),
    }))
}

/// Claims a task id not seen before; `false` if someone else inserted it meanwhile.
#[tracing::instrument(skip_all)]
pub async fn claim_new_task(
    conn: &mut PgConnection,
    task: Uuid,
    owner: Uuid,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO task_analysis (task_id, owner_id, version, deleted) VALUES ($1, $2, 0, false) \
         ON CONFLICT (task_id) DO NOTHING",
    )
    .bind(task)
    .bind(owner)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

#[tracing::instrument(skip_all)]
pub async fn save_task(conn: &mut PgConnection, model: &TaskModel) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE task_analysis SET version = $2, deleted = false, open_due_at = $3, model = $4 \
         WHERE task_id = $1",
    )
    .bind(model.task_id)
    .bind(model.version)
    .bind(model.open_due_at())
    .bind(Json(model))
    .execute(conn)
    .await
    .map(drop)
}

/// Leaves a tombstone: the task is gone, and no event older than `version` applies again.
#[tracing::instrument(skip_all)]
pub async fn bury_task(conn: &mut PgConnection, task: Uuid, version: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE task_analysis SET version = $2, deleted = true, open_due_at = NULL, model = NULL \
         WHERE task_id = $1",
    )
    .bind(task)
    .bind(version)
    .execute(conn)
    .await
    .map(drop)
}

/// Applies changes to `owner`'s totals, in the order given (sorted: concurrent writers lock the
/// rows in the same order, so they cannot deadlock).
#[tracing::instrument(skip_all)]
pub async fn change_totals(
    conn: &mut PgConnection,
    owner: Uuid,
    changes: &[(Total, i64)],
) -> sqlx::Result<()> {
    for &(total, by) in changes {
        let query = match total {
            Total::Tasks(status, priority) => sqlx::query(
                "INSERT INTO user_task_counts (owner_id, status, priority, tasks) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (owner_id, status, priority) \
                 DO UPDATE SET tasks = user_task_counts.tasks + EXCLUDED.tasks",
            )
            .bind(owner)
            .bind(status.as_str())
            .bind(priority.as_str())
            .bind(by),
            Total::Created(day) | Total::Completed(day) => {
                let (created, completed) = match total {
                    Total::Created(_) => (by, 0),
                    _ => (0, by),
                };
                sqlx::query(
                    "INSERT INTO user_days (owner_id, day, created, completed) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (owner_id, day) DO UPDATE \
                     SET created = user_days.created + EXCLUDED.created, \
                         completed = user_days.completed + EXCLUDED.completed",
                )
                .bind(owner)
                .bind(day)
                .bind(created)
                .bind(completed)
            }
            Total::CycleTime(bucket) => sqlx::query(
                "INSERT INTO user_cycle_times (owner_id, bucket, tasks) VALUES ($1, $2, $3) \
                 ON CONFLICT (owner_id, bucket) \
                 DO UPDATE SET tasks = user_cycle_times.tasks + EXCLUDED.tasks",
            )
            .bind(owner)
            .bind(bucket)
            .bind(by),
        };
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Adds `events` to `owner`'s count of `name` on `day`.
#[tracing::instrument(skip_all)]
pub async fn add_usage(
    conn: &mut PgConnection,
    owner: Uuid,
    day: Date,
    name: &str,
    events: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO user_usage (owner_id, day, name, events) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (owner_id, day, name) DO UPDATE SET events = user_usage.events + EXCLUDED.events",
    )
    .bind(owner)
    .bind(day)
    .bind(name)
    .bind(events)
    .execute(conn)
    .await
    .map(drop)
}

/// `(day, name, events)` of `owner` from `from` to `to`, by day and name: a page and one row.
#[tracing::instrument(skip_all)]
pub async fn usage(
    conn: &mut PgConnection,
    owner: Uuid,
    from: Date,
    to: Date,
) -> sqlx::Result<Vec<(Date, String, i64)>> {
    sqlx::query_as(USAGE_SQL)
        .bind(owner)
        .bind(from)
        .bind(to)
        .fetch_all(conn)
        .await
}

/// [`usage`] after day `after_day` and name `after_name`.
#[tracing::instrument(skip_all)]
pub async fn usage_after(
    conn: &mut PgConnection,
    owner: Uuid,
    from: Date,
    to: Date,
    after_day: Date,
    after_name: &str,
) -> sqlx::Result<Vec<(Date, String, i64)>> {
    sqlx::query_as(USAGE_AFTER_SQL)
        .bind(owner)
        .bind(from)
        .bind(to)
        .bind(after_day)
        .bind(after_name)
        .fetch_all(conn)
        .await
}

/// Records that `owner`'s models reflect the event `as_of` if it is the newest seen (by time, then
/// position: the same answer whatever order partitions were applied in).
#[tracing::instrument(skip_all)]
pub async fn note_as_of(conn: &mut PgConnection, owner: Uuid, as_of: &AsOf) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO user_as_of (owner_id, event_at, topic, partition, \"offset\") \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner_id) DO UPDATE \
         SET event_at = EXCLUDED.event_at, topic = EXCLUDED.topic, \
             partition = EXCLUDED.partition, \"offset\" = EXCLUDED.\"offset\" \
         WHERE (user_as_of.event_at, user_as_of.topic, user_as_of.partition, user_as_of.\"offset\") \
             < (EXCLUDED.event_at, EXCLUDED.topic, EXCLUDED.partition, EXCLUDED.\"offset\")",
    )
    .bind(owner)
    .bind(as_of.event_at)
    .bind(&as_of.topic)
    .bind(as_of.partition)
    .bind(as_of.offset)
    .execute(conn)
    .await
    .map(drop)
}

/// Erases everything of `owner` (the tombstone is `service_kit::erased_users::erase`'s, taken
/// first in the same transaction).
#[tracing::instrument(skip_all)]
pub async fn erase_user(conn: &mut PgConnection, owner: Uuid) -> sqlx::Result<u64> {
    let mut erased = 0;
    for statement in [
        "DELETE FROM task_analysis WHERE owner_id = $1",
        "DELETE FROM user_task_counts WHERE owner_id = $1",
        "DELETE FROM user_days WHERE owner_id = $1",
        "DELETE FROM user_cycle_times WHERE owner_id = $1",
        "DELETE FROM user_as_of WHERE owner_id = $1",
        "DELETE FROM user_usage WHERE owner_id = $1",
    ] {
        erased += sqlx::query(statement)
            .bind(owner)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    }
    Ok(erased)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_statements_read_one_row_more_than_a_page() {
        let limit = format!("LIMIT {}", USAGE_PAGE_ROWS + 1);
        assert!(USAGE_SQL.ends_with(&limit), "{USAGE_SQL}");
        assert!(USAGE_AFTER_SQL.ends_with(&limit), "{USAGE_AFTER_SQL}");
    }
}
