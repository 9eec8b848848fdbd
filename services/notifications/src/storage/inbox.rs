//! The inbox's and the preferences' SQL.

use service_kit::sqlx::{self, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

/// A notification as it is stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct NotificationRow {
    pub id: Uuid,
    pub kind: String,
    pub task_id: Option<Uuid>,
    pub title: String,
    pub body: String,
    pub created_at: OffsetDateTime,
    pub read: bool,
}

/// A notification to insert.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub id: Uuid,
    pub user_id: Uuid,
    pub kind: &'static str,
    pub task_id: Option<Uuid>,
    pub title: String,
    pub body: String,
    pub created_at: OffsetDateTime,
}

#[tracing::instrument(name = "inbox.insert", skip_all)]
pub async fn insert(conn: &mut PgConnection, rows: &[NewNotification]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO notifications (id, user_id, kind, task_id, title, body, created_at) \
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::text[], \
                              $6::text[], $7::timestamptz[])",
    )
    .bind(rows.iter().map(|n| n.id).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.user_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.kind).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.task_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.title.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.body.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|n| n.created_at).collect::<Vec<_>>())
    .execute(conn)
    .await
    .map(drop)
}

/// Whether a row counts as read: marked itself, or at or below the user's watermark.
const READ: &str = "(n.read_at IS NOT NULL OR n.id <= COALESCE(w.read_through, '00000000-0000-0000-0000-000000000000'::uuid))";

/// Up to `limit` of `user`'s notifications older than `before` (the cursor), newest first.
#[tracing::instrument(name = "inbox.page", skip_all)]
pub async fn page(
    conn: &mut PgConnection,
    user: Uuid,
    before: Option<Uuid>,
    unread_only: bool,
    limit: i64,
) -> sqlx::Result<Vec<NotificationRow>> {
    sqlx::query_as(&format!(
        "SELECT n.id, n.kind, n.task_id, n.title, n.body, n.created_at, {READ} AS read \
         FROM notifications n LEFT JOIN inbox_watermarks w ON w.user_id = n.user_id \
         WHERE n.user_id = $1 AND n.id < $2 AND (NOT $3 OR NOT {READ}) \
         ORDER BY n.id DESC LIMIT $4"
    ))
    .bind(user)
    .bind(before.unwrap_or(Uuid::max()))
    .bind(unread_only)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// How many of `user`'s notifications are unread (exact: the unread partial index).
#[tracing::instrument(name = "inbox.unread_count", skip_all)]
pub async fn unread_count(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM notifications n \
         LEFT JOIN inbox_watermarks w ON w.user_id = n.user_id \
         WHERE n.user_id = $1 AND n.read_at IS NULL \
           AND n.id > COALESCE(w.read_through, '00000000-0000-0000-0000-000000000000'::uuid)",
    )
    .bind(user)
    .fetch_one(conn)
    .await
}

/// Marks one notification read; `false` if `user` has no such notification.
#[tracing::instrument(name = "inbox.mark_read", skip_all)]
pub async fn mark_read(conn: &mut PgConnection, user: Uuid, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "WITH found AS (SELECT id FROM notifications WHERE id = $2 AND user_id = $1), \
              marked AS (UPDATE notifications SET read_at = now() \
                         WHERE id = $2 AND user_id = $1 AND read_at IS NULL) \
         SELECT EXISTS (SELECT 1 FROM found)",
    )
    .bind(user)
    .bind(id)
    .fetch_one(conn)
    .await
}

/// Everything `user` has now counts as read: one row written, whatever the inbox's size.
#[tracing::instrument(name = "inbox.mark_all_read", skip_all)]
pub async fn mark_all_read(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO inbox_watermarks AS w (user_id, read_through) \
         SELECT user_id, id FROM notifications WHERE user_id = $1 ORDER BY id DESC LIMIT 1 \
         ON CONFLICT (user_id) DO UPDATE \
         SET read_through = GREATEST(w.read_through, EXCLUDED.read_through)",
    )
    .bind(user)
    .execute(conn)
    .await
    .map(drop)
}

/// Deletes one notification (and its pending pushes); `false` if `user` has no such one.
#[tracing::instrument(name = "inbox.delete", skip_all)]
pub async fn delete(conn: &mut PgConnection, user: Uuid, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query("DELETE FROM notifications WHERE id = $2 AND user_id = $1")
        .bind(user)
        .bind(id)
        .execute(conn)
        .await
        .map(|done| done.rows_affected() == 1)
}

/// A user's preferences as stored (`None`: the defaults).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PreferencesRow {
    pub due_soon: String,
    pub overdue: String,
    pub reminder_lead_minutes: i32,
    pub quiet_start: Option<time::Time>,
    pub quiet_end: Option<time::Time>,
    pub time_zone: Option<String>,
}

#[tracing::instrument(name = "inbox.preferences", skip_all)]
pub async fn preferences(
    conn: &mut PgConnection,
    user: Uuid,
) -> sqlx::Result<Option<PreferencesRow>> {
    sqlx::query_as(
        "SELECT due_soon, overdue, reminder_lead_minutes, quiet_start, quiet_end, time_zone \
         FROM notification_preferences WHERE user_id = $1",
    )
    .bind(user)
    .fetch_optional(conn)
    .await
}

#[derive(sqlx::FromRow)]
struct UserPreferencesRow {
    user_id: Uuid,
    #[sqlx(flatten)]
    preferences: PreferencesRow,
}

/// The preferences of several users at once (those without a row are absent).
#[tracing::instrument(name = "inbox.preferences_of", skip_all)]
pub async fn preferences_of(
    conn: &mut PgConnection,
    users: &[Uuid],
) -> sqlx::Result<Vec<(Uuid, PreferencesRow)>> {
    let rows: Vec<UserPreferencesRow> = sqlx::query_as(
        "SELECT user_id, due_soon, overdue, reminder_lead_minutes, quiet_start, quiet_end, \
                time_zone \
         FROM notification_preferences WHERE user_id = ANY($1)",
    )
    .bind(users)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.user_id, row.preferences))
        .collect())
}

#[tracing::instrument(name = "inbox.save_preferences", skip_all)]
pub async fn save_preferences(
    conn: &mut PgConnection,
    user: Uuid,
    row: &PreferencesRow,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO notification_preferences AS p \
           (user_id, due_soon, overdue, reminder_lead_minutes, quiet_start, quiet_end, time_zone) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (user_id) DO UPDATE SET due_soon = EXCLUDED.due_soon, \
           overdue = EXCLUDED.overdue, reminder_lead_minutes = EXCLUDED.reminder_lead_minutes, \
           quiet_start = EXCLUDED.quiet_start, quiet_end = EXCLUDED.quiet_end, \
           time_zone = EXCLUDED.time_zone, updated_at = now()",
    )
    .bind(user)
    .bind(&row.due_soon)
    .bind(&row.overdue)
    .bind(row.reminder_lead_minutes)
    .bind(row.quiet_start)
    .bind(row.quiet_end)
    .bind(&row.time_zone)
    .execute(conn)
    .await
    .map(drop)
}

/// Erases a deleted account's inbox, schedule, preferences and devices.
#[tracing::instrument(name = "inbox.erase_user", skip_all)]
pub async fn erase_user(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<u64> {
    let mut rows = 0;
    for statement in [
        "DELETE FROM notifications WHERE user_id = $1",
        "DELETE FROM inbox_watermarks WHERE user_id = $1",
        "DELETE FROM reminders WHERE user_id = $1",
        "DELETE FROM notification_preferences WHERE user_id = $1",
        "DELETE FROM push_subscriptions WHERE user_id = $1",
    ] {
        rows += sqlx::query(statement)
            .bind(user)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    }
    Ok(rows)
}
