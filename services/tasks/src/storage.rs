//! tasks' SQL. Every function runs on a connection it is given, so the domain decides what runs
//! on the primary, on a replica, or in one transaction. The statements are public so the EXPLAIN
//! test checks the very plans the service runs.

use std::sync::LazyLock;

use serde_json::Value;
use service_kit::housekeeping::Sweep;
use service_kit::revoked_users;
use service_kit::sqlx::{self, PgConnection, Postgres, QueryBuilder};
use time::OffsetDateTime;
use uuid::Uuid;

use events::outbox::NewEvent;

use crate::domain::{ListQuery, Revision, RevisionKind, Task, TaskError};

/// The task columns, read through the alias `t`.
macro_rules! task_columns {
    () => {
        "t.id, t.owner_id, t.title, t.description, t.status, t.priority, t.due_at, t.labels, \
         t.version, t.created_at, t.updated_at"
    };
}

pub const FIND_SQL: &str = concat!(
    "SELECT ",
    task_columns!(),
    " FROM tasks t WHERE t.id = $1 AND t.owner_id = $2"
);
/// The revisions after `$3`, and the first (version 1, the creation) whatever `$3`: it proves
/// the task is the owner's, so a page past the end is empty only for the owner.
pub const REVISIONS_SQL: &str = "SELECT version, kind, actor_id, changed_at, changes \
     FROM task_revisions WHERE task_id = $1 AND owner_id = $2 AND (version > $3 OR version = 1) \
     ORDER BY version LIMIT $4";

/// Erasure: the account to erase next, claimed so instances share the work (`FOR UPDATE SKIP
/// LOCKED`: another instance takes the next one).
pub const CLAIM_ERASURE_SQL: &str = "SELECT user_id, requested_at FROM erasures \
     ORDER BY requested_at LIMIT 1 FOR UPDATE SKIP LOCKED";
/// Erasure, in two steps per kind so that no plan can turn into a table scan: first up to `$2`
/// of owner `$1`'s rows through the owner's index, then those by key. The tasks are locked.
pub const ERASE_PICK_TASKS_SQL: &str = "SELECT id FROM tasks WHERE owner_id = $1 \
     ORDER BY id DESC LIMIT $2 FOR UPDATE";
/// Erasure: the picked tasks (their labels cascade); returns id and version.
pub const ERASE_TASKS_SQL: &str = "DELETE FROM tasks WHERE id = ANY($1) RETURNING id, version";
/// Erasure: up to `$2` tasks of owner `$1` that have history (deleted tasks' included).
pub const ERASE_PICK_HISTORIES_SQL: &str = "SELECT DISTINCT task_id FROM task_revisions \
     WHERE owner_id = $1 ORDER BY task_id LIMIT $2";
/// Erasure: the whole history of the picked tasks.
pub const ERASE_REVISIONS_SQL: &str = "DELETE FROM task_revisions WHERE task_id = ANY($1)";
/// Erasure: up to `$2` of owner `$1`'s idempotency keys.
pub const ERASE_PICK_IDEMPOTENCY_KEYS_SQL: &str =
    "SELECT key FROM idempotency_keys WHERE owner_id = $1 LIMIT $2";
pub const ERASE_IDEMPOTENCY_KEYS_SQL: &str =
    "DELETE FROM idempotency_keys WHERE owner_id = $1 AND key = ANY($2)";

/// A `tasks` row as stored; [`Task`] once its text columns are checked.
#[derive(sqlx::FromRow)]
pub struct TaskRow {
    id: Uuid,
    owner_id: Uuid,
    title: String,
    description: Option<String>,
    status: String,
    priority: String,
    due_at: Option<OffsetDateTime>,
    labels: Vec<String>,
    version: i64,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

impl TryFrom<TaskRow> for Task {
    type Error = TaskError;

    fn try_from(row: TaskRow) -> Result<Self, TaskError> {
        let unknown = |what: &str, value: &str| TaskError::Corrupt(format!("{what} {value:?}"));
        Ok(Task {
            status: crate::domain::Status::parse(&row.status)
                .ok_or_else(|| unknown("status", &row.status))?,
            priority: crate::domain::Priority::parse(&row.priority)
                .ok_or_else(|| unknown("priority", &row.priority))?,
            id: row.id,
            owner_id: row.owner_id,
            title: row.title,
            description: row.description,
            due_at: row.due_at,
            labels: row.labels,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

#[tracing::instrument(skip_all)]
pub async fn find(conn: &mut PgConnection, owner: Uuid, id: Uuid) -> sqlx::Result<Option<TaskRow>> {
    sqlx::query_as(FIND_SQL)
        .bind(id)
        .bind(owner)
        .fetch_optional(conn)
        .await
}

/// A new task: its row, labels, first revision and `task.created` event in one statement
/// (`$1`–`$10`, then the event's values).
pub const CREATE_SQL: &str = "WITH t AS ( \
       INSERT INTO tasks (id, owner_id, title, description, status, priority, due_at, labels, \
         version, created_at, updated_at) \
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9) RETURNING version), \
     labelled AS (INSERT INTO task_labels (owner_id, label, task_id) \
       SELECT $2, label, $1 FROM unnest($8::text[]) AS label), \
     revision AS (INSERT INTO task_revisions (task_id, version, owner_id, actor_id, kind, \
       changes, changed_at) VALUES ($1, 1, $2, $2, 'created', $10, $9)), \
     event AS (";
/// A change to a task at version `$10`: its row, labels (when `$11`), revision and
/// `task.updated` event in one statement; no row back if the task is not at that version.
pub const UPDATE_SQL: &str = "WITH changed AS ( \
       UPDATE tasks t SET title = $3, description = $4, status = $5, priority = $6, \
         due_at = $7, labels = $8, version = t.version + 1, updated_at = $9 \
       WHERE t.id = $1 AND t.owner_id = $2 AND t.version = $10 RETURNING t.version), \
     unlabelled AS (DELETE FROM task_labels WHERE task_id = $1 AND $11 \
       AND label <> ALL($8::text[]) AND EXISTS (SELECT 1 FROM changed)), \
     labelled AS (INSERT INTO task_labels (owner_id, label, task_id) \
       SELECT $2, label, $1 FROM unnest($8::text[]) AS label \
       WHERE $11 AND EXISTS (SELECT 1 FROM changed) ON CONFLICT DO NOTHING), \
     revision AS (INSERT INTO task_revisions (task_id, version, owner_id, actor_id, kind, \
       changes, changed_at) SELECT $1, version, $2, $2, 'updated', $12, $9 FROM changed), \
     event AS (";
/// Deleting a task at version `$3`: the row (its labels cascade), a `deleted` revision and the
/// `task.deleted` event in one statement; no row back if the task is not at that version.
pub const DELETE_SQL: &str = "WITH gone AS ( \
       DELETE FROM tasks t WHERE t.id = $1 AND t.owner_id = $2 AND t.version = $3 \
       RETURNING t.version), \
     revision AS (INSERT INTO task_revisions (task_id, version, owner_id, actor_id, kind, \
       changes, changed_at) SELECT $1, version + 1, $2, $2, 'deleted', '{}'::jsonb, now() \
       FROM gone), \
     event AS (";

/// A statement of [`CREATE_SQL`]'s kind, completed with the event's `INSERT` (values from
/// `$first`, written if `condition` holds) and the version written.
pub fn with_event(head: &str, first: usize, condition: &str, written: &str) -> String {
    format!(
        "{head}{}) SELECT version FROM {written}",
        NewEvent::insert_sql(first, condition)
    )
}

/// The three statements, whole (built once: sqlx prepares each once per connection).
pub static CREATE: LazyLock<String> = LazyLock::new(|| with_event(CREATE_SQL, 11, "true", "t"));
pub static UPDATE: LazyLock<String> =
    LazyLock::new(|| with_event(UPDATE_SQL, 13, "EXISTS (SELECT 1 FROM changed)", "changed"));
pub static DELETE: LazyLock<String> =
    LazyLock::new(|| with_event(DELETE_SQL, 4, "EXISTS (SELECT 1 FROM gone)", "gone"));

/// Writes the new `task` (at version 1, created at `task.created_at`), its labels, its first
/// revision (`changes`) and `event`, at once.
#[tracing::instrument(skip_all)]
pub async fn create(
    conn: &mut PgConnection,
    task: &Task,
    changes: &Value,
    event: NewEvent,
) -> sqlx::Result<()> {
    let query = sqlx::query_as::<_, (i64,)>(&CREATE)
        .bind(task.id)
        .bind(task.owner_id)
        .bind(&task.title)
        .bind(&task.description)
        .bind(task.status.as_str())
        .bind(task.priority.as_str())
        .bind(task.due_at)
        .bind(&task.labels)
        .bind(task.created_at)
        .bind(changes);
    event.bind(query).fetch_one(conn).await.map(drop)
}

/// Writes `next` (the task's fields at `next.version`, changed at `next.updated_at`) if the task
/// is still at `next.version - 1`, with its revision (`changes`) and `event`; the labels too
/// when `labels_changed`. False when the task is at another version, or gone.
#[tracing::instrument(skip_all)]
pub async fn update_if_current(
    conn: &mut PgConnection,
    next: &Task,
    labels_changed: bool,
    changes: &Value,
    event: NewEvent,
) -> sqlx::Result<bool> {
    let query = sqlx::query_as::<_, (i64,)>(&UPDATE)
        .bind(next.id)
        .bind(next.owner_id)
        .bind(&next.title)
        .bind(&next.description)
        .bind(next.status.as_str())
        .bind(next.priority.as_str())
        .bind(next.due_at)
        .bind(&next.labels)
        .bind(next.updated_at)
        .bind(next.version - 1)
        .bind(labels_changed)
        .bind(changes);
    Ok(event.bind(query).fetch_optional(conn).await?.is_some())
}

/// Deletes `owner`'s task `id` if it is at `version`, writing its `deleted` revision and
/// `event`. False when it is at another version, or gone.
#[tracing::instrument(skip_all)]
pub async fn delete_if_current(
    conn: &mut PgConnection,
    owner: Uuid,
    id: Uuid,
    version: i64,
    event: NewEvent,
) -> sqlx::Result<bool> {
    let query = sqlx::query_as::<_, (i64,)>(&DELETE)
        .bind(id)
        .bind(owner)
        .bind(version);
    Ok(event.bind(query).fetch_optional(conn).await?.is_some())
}

#[derive(sqlx::FromRow)]
pub struct RevisionRow {
    pub version: i64,
    kind: String,
    actor_id: Uuid,
    changed_at: OffsetDateTime,
    changes: Value,
}

impl TryFrom<RevisionRow> for Revision {
    type Error = TaskError;

    fn try_from(row: RevisionRow) -> Result<Self, TaskError> {
        Ok(Revision {
            kind: RevisionKind::parse(&row.kind)
                .ok_or_else(|| TaskError::Corrupt(format!("revision kind {:?}", row.kind)))?,
            version: row.version,
            actor_id: row.actor_id,
            changed_at: row.changed_at,
            changes: row.changes,
        })
    }
}

/// Up to `limit` revisions after `after_version`, oldest first, preceded by version 1 when
/// `after_version` is past it (see [`REVISIONS_SQL`]): none at all means no such task of
/// `owner`'s.
#[tracing::instrument(skip_all)]
pub async fn revisions(
    conn: &mut PgConnection,
    owner: Uuid,
    task_id: Uuid,
    after_version: i64,
    limit: i64,
) -> sqlx::Result<Vec<RevisionRow>> {
    sqlx::query_as(REVISIONS_SQL)
        .bind(task_id)
        .bind(owner)
        .bind(after_version)
        .bind(limit)
        .fetch_all(conn)
        .await
}

/// Appends the list query for `owner` to `sql`: newest first, after the cursor, one row more
/// than a page so the caller knows whether another page follows. With a label it walks the
/// label index; otherwise the owner's (status) index.
pub fn push_list_query(sql: &mut QueryBuilder<'_, Postgres>, owner: Uuid, query: &ListQuery) {
    sql.push(concat!("SELECT ", task_columns!()));
    let order_column = match &query.label {
        Some(label) => {
            // The owner is named for both tables, so whichever index the planner starts from
            // is entered at this owner's rows (never at every user's due dates, say).
            sql.push(" FROM task_labels l JOIN tasks t ON t.id = l.task_id WHERE l.owner_id = ")
                .push_bind(owner)
                .push(" AND t.owner_id = ")
                .push_bind(owner)
                .push(" AND l.label = ")
                .push_bind(label.clone());
            "l.task_id"
        }
        None => {
            sql.push(" FROM tasks t WHERE t.owner_id = ")
                .push_bind(owner);
            "t.id"
        }
    };
    if let Some(after) = query.after {
        sql.push(format_args!(" AND {order_column} < "))
            .push_bind(after);
    }
    if let Some(status) = query.status {
        sql.push(" AND t.status = ").push_bind(status.as_str());
    }
    if let Some(due_before) = query.due_before {
        sql.push(" AND t.due_at < ").push_bind(due_before);
    }
    sql.push(format_args!(" ORDER BY {order_column} DESC LIMIT "))
        .push_bind(i64::from(query.limit) + 1);
}

#[tracing::instrument(skip_all)]
pub async fn list(
    conn: &mut PgConnection,
    owner: Uuid,
    query: &ListQuery,
) -> sqlx::Result<Vec<TaskRow>> {
    let mut sql = QueryBuilder::new("");
    push_list_query(&mut sql, owner, query);
    sql.build_query_as().fetch_all(conn).await
}

/// Claims `key` for a new task; false when it was claimed before (the claim of a concurrent
/// request is waited for, so the answer is final).
#[tracing::instrument(skip_all)]
pub async fn claim_idempotency_key(
    conn: &mut PgConnection,
    owner: Uuid,
    key: &str,
    request_hash: &[u8; 32],
    task_id: Uuid,
) -> sqlx::Result<bool> {
    sqlx::query(
        "INSERT INTO idempotency_keys (owner_id, key, request_hash, task_id) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (owner_id, key) DO NOTHING",
    )
    .bind(owner)
    .bind(key)
    .bind(&request_hash[..])
    .bind(task_id)
    .execute(conn)
    .await
    .map(|done| done.rows_affected() == 1)
}

/// The request hash and stored answer of a claimed key.
#[tracing::instrument(skip_all)]
pub async fn idempotency_record(
    conn: &mut PgConnection,
    owner: Uuid,
    key: &str,
) -> sqlx::Result<Option<(Vec<u8>, Option<Value>)>> {
    sqlx::query_as(
        "SELECT request_hash, response FROM idempotency_keys WHERE owner_id = $1 AND key = $2",
    )
    .bind(owner)
    .bind(key)
    .fetch_optional(conn)
    .await
}

#[tracing::instrument(skip_all)]
pub async fn store_idempotent_response(
    conn: &mut PgConnection,
    owner: Uuid,
    key: &str,
    response: &Value,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE idempotency_keys SET response = $3 WHERE owner_id = $1 AND key = $2")
        .bind(owner)
        .bind(key)
        .bind(response)
        .execute(conn)
        .await
        .map(drop)
}

/// Housekeeping's statements (each deletes at most `$1` rows; run until none is left):
/// idempotency keys older than a day, refusals of deleted accounts whose tokens have expired.
pub fn housekeeping_sweeps() -> Vec<Sweep> {
    vec![
        Sweep::new(
            "idempotency_keys",
            "DELETE FROM idempotency_keys WHERE (owner_id, key) IN ( \
               SELECT owner_id, key FROM idempotency_keys \
               WHERE created_at < now() - interval '1 day' LIMIT $1)",
        ),
        revoked_users::sweep(),
    ]
}

/// Asks for `user`'s data to be erased (again, if asked before: nothing changes).
#[tracing::instrument(skip_all)]
pub async fn request_erasure(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO erasures (user_id, requested_at) VALUES ($1, now()) ON CONFLICT DO NOTHING",
    )
    .bind(user)
    .execute(conn)
    .await
    .map(drop)
}

/// The next account to erase and when that was asked for, locked until the transaction ends.
#[tracing::instrument(skip_all)]
pub async fn claim_erasure(
    conn: &mut PgConnection,
) -> sqlx::Result<Option<(Uuid, OffsetDateTime)>> {
    sqlx::query_as(CLAIM_ERASURE_SQL).fetch_optional(conn).await
}

/// What one erasure batch removed.
pub struct Erased {
    /// The tasks (id, last version).
    pub tasks: Vec<(Uuid, i64)>,
    pub revisions: u64,
    pub idempotency_keys: u64,
}

impl Erased {
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty() && self.revisions == 0 && self.idempotency_keys == 0
    }
}

/// Erases up to `batch` tasks of `owner`, the history of as many, and up to `batch` of its
/// idempotency keys.
#[tracing::instrument(skip_all)]
pub async fn erase_batch(conn: &mut PgConnection, owner: Uuid, batch: i64) -> sqlx::Result<Erased> {
    let picked: Vec<Uuid> = sqlx::query_scalar(ERASE_PICK_TASKS_SQL)
        .bind(owner)
        .bind(batch)
        .fetch_all(&mut *conn)
        .await?;
    let tasks = sqlx::query_as(ERASE_TASKS_SQL)
        .bind(&picked)
        .fetch_all(&mut *conn)
        .await?;
    let histories: Vec<Uuid> = sqlx::query_scalar(ERASE_PICK_HISTORIES_SQL)
        .bind(owner)
        .bind(batch)
        .fetch_all(&mut *conn)
        .await?;
    let revisions = sqlx::query(ERASE_REVISIONS_SQL)
        .bind(&histories)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let keys: Vec<String> = sqlx::query_scalar(ERASE_PICK_IDEMPOTENCY_KEYS_SQL)
        .bind(owner)
        .bind(batch)
        .fetch_all(&mut *conn)
        .await?;
    let idempotency_keys = sqlx::query(ERASE_IDEMPOTENCY_KEYS_SQL)
        .bind(owner)
        .bind(&keys)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(Erased {
        tasks,
        revisions,
        idempotency_keys,
    })
}

/// The erasure of `user` is complete.
#[tracing::instrument(skip_all)]
pub async fn finish_erasure(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM erasures WHERE user_id = $1")
        .bind(user)
        .execute(conn)
        .await
        .map(drop)
}
