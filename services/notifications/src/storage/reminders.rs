//! The reminder schedule's SQL: kept from task events, claimed and fired by the schedulers.

use std::time::Duration;

use service_kit::sqlx::{self, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

/// A task as the schedule needs it.
#[derive(Debug, Clone)]
pub struct ScheduledTask {
    pub task_id: Uuid,
    pub user_id: Uuid,
    pub title: String,
    pub version: i64,
    /// `None`: no reminders (no due date, done, or deleted).
    pub due_at: Option<OffsetDateTime>,
}

/// Sets `task`'s two reminders: "due soon" at the owner's lead time before the due date (the
/// default one hour without preferences) and "overdue" at it. A due date that did not change
/// keeps what already fired and who claimed it; a new one starts afresh. Older versions of the
/// task change nothing.
#[tracing::instrument(name = "reminders.schedule", skip_all)]
pub async fn schedule(conn: &mut PgConnection, task: &ScheduledTask) -> sqlx::Result<()> {
    let Some(due_at) = task.due_at else {
        sqlx::query("DELETE FROM reminders WHERE task_id = $1 AND task_version <= $2")
            .bind(task.task_id)
            .bind(task.version)
            .execute(conn)
            .await?;
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO reminders AS r (task_id, kind, user_id, title, due_at, fire_at, task_version) \
         SELECT $1, k.kind, $2, $3, $4, \
                CASE k.kind WHEN 'task.due_soon' \
                     THEN $4 - make_interval(mins => COALESCE(p.reminder_lead_minutes, 60)) \
                     ELSE $4 END, \
                $5 \
         FROM (VALUES ('task.due_soon'), ('task.overdue')) AS k (kind) \
         LEFT JOIN notification_preferences p ON p.user_id = $2 \
         ON CONFLICT (task_id, kind) DO UPDATE SET \
           title = EXCLUDED.title, \
           task_version = EXCLUDED.task_version, \
           user_id = EXCLUDED.user_id, \
           due_at = EXCLUDED.due_at, \
           fire_at = EXCLUDED.fire_at, \
           fired_at = CASE WHEN r.due_at = EXCLUDED.due_at THEN r.fired_at END, \
           claimed_by = CASE WHEN r.due_at = EXCLUDED.due_at THEN r.claimed_by END, \
           claim_expires_at = CASE WHEN r.due_at = EXCLUDED.due_at THEN r.claim_expires_at END \
         WHERE r.task_version <= EXCLUDED.task_version",
    )
    .bind(task.task_id)
    .bind(task.user_id)
    .bind(&task.title)
    .bind(due_at)
    .bind(task.version)
    .execute(conn)
    .await
    .map(drop)
}

/// Moves the user's unfired "due soon" reminders to a new lead time.
#[tracing::instrument(name = "reminders.apply_lead_time", skip_all)]
pub async fn apply_lead_time(
    conn: &mut PgConnection,
    user: Uuid,
    lead_minutes: i32,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE reminders SET fire_at = due_at - make_interval(mins => $2), \
                              claimed_by = NULL, claim_expires_at = NULL \
         WHERE user_id = $1 AND kind = 'task.due_soon' AND fired_at IS NULL \
           AND fire_at <> due_at - make_interval(mins => $2)",
    )
    .bind(user)
    .bind(lead_minutes)
    .execute(conn)
    .await
    .map(drop)
}

/// Claims for `instance` the unfired reminders due within `lookahead` that nobody holds (or
/// whose holder's claim expired), up to `limit`. A claim lasts until `lease` past the later of
/// its fire time and now. Returns how many were claimed.
#[tracing::instrument(name = "reminders.claim", skip_all)]
pub async fn claim(
    conn: &mut PgConnection,
    instance: Uuid,
    lookahead: Duration,
    lease: Duration,
    limit: i64,
) -> sqlx::Result<u64> {
    sqlx::query(
        "UPDATE reminders r SET claimed_by = $1, \
             claim_expires_at = GREATEST(r.fire_at, now()) + make_interval(secs => $3) \
         FROM (SELECT task_id, kind FROM reminders \
               WHERE fired_at IS NULL AND fire_at <= now() + make_interval(secs => $2) \
                 AND (claimed_by IS NULL OR claim_expires_at < now()) \
               ORDER BY fire_at LIMIT $4 FOR UPDATE SKIP LOCKED) AS due \
         WHERE r.task_id = due.task_id AND r.kind = due.kind",
    )
    .bind(instance)
    .bind(lookahead.as_secs_f64())
    .bind(lease.as_secs_f64())
    .bind(limit)
    .execute(conn)
    .await
    .map(|done| done.rows_affected())
}

/// Gives up `instance`'s unfired claims (it is stopping): another instance takes them at once
/// instead of after their lease.
#[tracing::instrument(name = "reminders.release", skip_all)]
pub async fn release(conn: &mut PgConnection, instance: Uuid) -> sqlx::Result<u64> {
    sqlx::query(
        "UPDATE reminders SET claimed_by = NULL, claim_expires_at = NULL \
         WHERE claimed_by = $1 AND fired_at IS NULL",
    )
    .bind(instance)
    .execute(conn)
    .await
    .map(|done| done.rows_affected())
}

/// The earliest fire time among `instance`'s claims not yet fired.
#[tracing::instrument(name = "reminders.next_claimed", skip_all)]
pub async fn next_claimed(
    conn: &mut PgConnection,
    instance: Uuid,
) -> sqlx::Result<Option<OffsetDateTime>> {
    sqlx::query_scalar(
        "SELECT min(fire_at) FROM reminders WHERE claimed_by = $1 AND fired_at IS NULL",
    )
    .bind(instance)
    .fetch_one(conn)
    .await
}

/// A reminder whose time has come.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueReminder {
    pub task_id: Uuid,
    pub kind: String,
    pub user_id: Uuid,
    pub title: String,
    pub due_at: OffsetDateTime,
}

/// Locks and marks fired `instance`'s claimed reminders whose time has come (up to `limit`),
/// in the caller's transaction: what this returns is fired exactly once if it commits.
#[tracing::instrument(name = "reminders.take_due", skip_all)]
pub async fn take_due(
    conn: &mut PgConnection,
    instance: Uuid,
    limit: i64,
) -> sqlx::Result<Vec<DueReminder>> {
    sqlx::query_as(
        "UPDATE reminders r SET fired_at = now() \
         FROM (SELECT task_id, kind FROM reminders \
               WHERE claimed_by = $1 AND fired_at IS NULL AND fire_at <= now() \
               ORDER BY fire_at LIMIT $2 FOR UPDATE SKIP LOCKED) AS due \
         WHERE r.task_id = due.task_id AND r.kind = due.kind \
         RETURNING r.task_id, r.kind, r.user_id, r.title, r.due_at",
    )
    .bind(instance)
    .bind(limit)
    .fetch_all(conn)
    .await
}
