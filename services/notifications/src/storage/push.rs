//! Web Push's SQL: the devices' subscriptions and the durable deliveries to them.

use std::sync::LazyLock;
use std::time::Duration;

use service_kit::sqlx::{self, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

/// A device's subscription as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SubscriptionRow {
    pub id: Uuid,
    pub endpoint: String,
    pub p256dh: Vec<u8>,
    pub auth: Vec<u8>,
    pub created_at: OffsetDateTime,
}

/// What registering did.
#[derive(Debug, Clone)]
pub enum Registered {
    /// A new device (also one moved here from another account).
    Created(SubscriptionRow),
    /// The endpoint was this user's already; its keys are updated.
    Existing(SubscriptionRow),
    /// The user has `max` devices already.
    LimitReached,
    /// Another account has the endpoint, with other keys.
    InUse,
    /// Registrations of the same endpoint kept racing this one; nothing changed.
    Contended,
}

/// Registers a subscription for `user`, at most `max` per user. The user's registrations are
/// serialised (an advisory lock on the user), so two at once cannot pass the limit together.
///
/// An endpoint another account registered moves to this one only with the same keys: the
/// browser that subscribed, logged in to another account, hands out the same subscription; the
/// endpoint URL alone (which logs and proxies see) is not proof of holding it. Moving deletes the
/// old account's row, with its pushes pending and past (they were that account's notifications),
/// and makes a new device.
#[tracing::instrument(name = "push.register", skip_all)]
pub async fn register(
    conn: &mut PgConnection,
    user: Uuid,
    endpoint: &str,
    p256dh: &[u8],
    auth: &[u8],
    max: i64,
) -> sqlx::Result<Registered> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7))")
        .bind(user)
        .execute(&mut *conn)
        .await?;
    // Another account's first registration of this endpoint may commit between the look-up and
    // the insert: then it is looked up again (a handful of times at most).
    for _ in 0..3 {
        let existing: Option<(Uuid, Uuid, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT id, user_id, p256dh, auth FROM push_subscriptions WHERE endpoint = $1 \
             FOR UPDATE",
        )
        .bind(endpoint)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((id, owner, ref known_p256dh, ref known_auth)) = existing {
            if owner == user {
                let row = sqlx::query_as(
                    "UPDATE push_subscriptions SET p256dh = $2, auth = $3 WHERE id = $1 \
                     RETURNING id, endpoint, p256dh, auth, created_at",
                )
                .bind(id)
                .bind(p256dh)
                .bind(auth)
                .fetch_one(&mut *conn)
                .await?;
                return Ok(Registered::Existing(row));
            }
            // Both compared whole, whichever differs first.
            let same_keys = same_secret(known_p256dh, p256dh) & same_secret(known_auth, auth);
            if !same_keys {
                return Ok(Registered::InUse);
            }
        }
        if devices_of(&mut *conn, user).await? >= max {
            return Ok(Registered::LimitReached);
        }
        if let Some((id, ..)) = existing {
            sqlx::query("DELETE FROM push_subscriptions WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
        }
        let created: Option<SubscriptionRow> = sqlx::query_as(
            "INSERT INTO push_subscriptions (id, user_id, endpoint, p256dh, auth) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (endpoint) DO NOTHING \
             RETURNING id, endpoint, p256dh, auth, created_at",
        )
        .bind(Uuid::now_v7())
        .bind(user)
        .bind(endpoint)
        .bind(p256dh)
        .bind(auth)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(row) = created {
            return Ok(Registered::Created(row));
        }
    }
    Ok(Registered::Contended)
}

async fn devices_of(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM push_subscriptions WHERE user_id = $1")
        .bind(user)
        .fetch_one(conn)
        .await
}

/// Equal bytes, compared in time that does not depend on where they differ (the auth secret is
/// one).
fn same_secret(known: &[u8], given: &[u8]) -> bool {
    known.len() == given.len()
        && known
            .iter()
            .zip(given)
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
}

#[tracing::instrument(name = "push.subscriptions", skip_all)]
pub async fn subscriptions(
    conn: &mut PgConnection,
    user: Uuid,
) -> sqlx::Result<Vec<SubscriptionRow>> {
    sqlx::query_as(
        "SELECT id, endpoint, p256dh, auth, created_at FROM push_subscriptions \
         WHERE user_id = $1 ORDER BY id",
    )
    .bind(user)
    .fetch_all(conn)
    .await
}

/// Deletes one of `user`'s devices; `false` if there is no such one.
#[tracing::instrument(name = "push.unregister", skip_all)]
pub async fn unregister(conn: &mut PgConnection, user: Uuid, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query("DELETE FROM push_subscriptions WHERE id = $2 AND user_id = $1")
        .bind(user)
        .bind(id)
        .execute(conn)
        .await
        .map(|done| done.rows_affected() == 1)
}

/// A push to make: one notification to one of its user's devices.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub notification_id: Uuid,
    pub user_id: Uuid,
    pub urgency: &'static str,
    /// Not before (quiet hours).
    pub release_at: OffsetDateTime,
}

/// Queues `deliveries`, one row per device the user has now. Returns how many rows.
#[tracing::instrument(name = "push.enqueue", skip_all)]
pub async fn enqueue(conn: &mut PgConnection, deliveries: &[NewDelivery]) -> sqlx::Result<u64> {
    if deliveries.is_empty() {
        return Ok(0);
    }
    sqlx::query(
        "INSERT INTO push_deliveries (id, notification_id, subscription_id, urgency, next_attempt_at) \
         SELECT gen_random_uuid(), d.notification_id, s.id, d.urgency, d.release_at \
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[]) \
              AS d (notification_id, user_id, urgency, release_at) \
         JOIN push_subscriptions s ON s.user_id = d.user_id",
    )
    .bind(deliveries.iter().map(|d| d.notification_id).collect::<Vec<_>>())
    .bind(deliveries.iter().map(|d| d.user_id).collect::<Vec<_>>())
    .bind(deliveries.iter().map(|d| d.urgency).collect::<Vec<_>>())
    .bind(deliveries.iter().map(|d| d.release_at).collect::<Vec<_>>())
    .execute(conn)
    .await
    .map(|done| done.rows_affected())
}

/// A claimed push with what sending it needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    pub id: Uuid,
    /// Counting this one.
    pub attempts: i32,
    pub urgency: String,
    pub subscription_id: Uuid,
    pub endpoint: String,
    /// `scheme://host[:port]` of the endpoint, as [`ORIGIN_OF_ENDPOINT`] cuts it: what the
    /// dispatcher keeps pushes apart by, and names in `skip_origins`.
    pub origin: String,
    pub p256dh: Vec<u8>,
    pub auth: Vec<u8>,
    pub notification_id: Uuid,
    pub kind: String,
    pub task_id: Option<Uuid>,
    pub title: String,
    pub body: String,
    pub created_at: OffsetDateTime,
}

/// The push service's origin of `s.endpoint`, in SQL: everything before the path (endpoints
/// are stored as the URL parser writes them, so one origin has one spelling).
const ORIGIN_OF_ENDPOINT: &str =
    "coalesce(substring(s.endpoint from '^[^/?#]*//[^/?#]*'), s.endpoint)";

/// Claims up to `limit` due pending pushes nobody holds (or whose holder's claim expired), for
/// `lease`, counting the attempt; none to the origins in `skip_origins` (push services this
/// instance holds enough pushes for, or that stopped answering), so their backlog stays in the
/// table instead of crowding out everyone else's pushes.
#[tracing::instrument(name = "push.claim", skip_all)]
pub async fn claim(
    conn: &mut PgConnection,
    limit: i64,
    lease: Duration,
    skip_origins: &[String],
) -> sqlx::Result<Vec<ClaimedDelivery>> {
    static STATEMENT: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH claimed AS ( \
               UPDATE push_deliveries d \
               SET claimed_until = now() + make_interval(secs => $2), attempts = d.attempts + 1 \
               FROM (SELECT p.id FROM push_deliveries p \
                     JOIN push_subscriptions s ON s.id = p.subscription_id \
                     WHERE p.state = 'pending' AND p.next_attempt_at <= now() \
                       AND (p.claimed_until IS NULL OR p.claimed_until < now()) \
                       AND {ORIGIN_OF_ENDPOINT} <> ALL($3) \
                     ORDER BY p.next_attempt_at LIMIT $1 FOR UPDATE OF p SKIP LOCKED) AS due \
               WHERE d.id = due.id \
               RETURNING d.id, d.attempts, d.urgency, d.subscription_id, d.notification_id) \
             SELECT c.id, c.attempts, c.urgency, c.subscription_id, s.endpoint, \
                    {ORIGIN_OF_ENDPOINT} AS origin, s.p256dh, s.auth, \
                    c.notification_id, n.kind, n.task_id, n.title, n.body, n.created_at \
             FROM claimed c \
             JOIN push_subscriptions s ON s.id = c.subscription_id \
             JOIN notifications n ON n.id = c.notification_id"
        )
    });
    sqlx::query_as(STATEMENT.as_str())
        .bind(limit)
        .bind(lease.as_secs_f64())
        .bind(skip_origins)
        .fetch_all(conn)
        .await
}

/// Gives up claims that were queued but not sent (the instance is stopping, or their push
/// service stopped answering): not an attempt, and due again at once for whoever may send.
#[tracing::instrument(name = "push.release", skip_all)]
pub async fn release(conn: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE push_deliveries SET claimed_until = NULL, attempts = attempts - 1 \
         WHERE id = ANY($1) AND state = 'pending'",
    )
    .bind(ids)
    .execute(conn)
    .await
    .map(drop)
}

/// The push service took it.
#[tracing::instrument(name = "push.mark_sent", skip_all)]
pub async fn mark_sent(conn: &mut PgConnection, id: Uuid, status: u16) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE push_deliveries SET state = 'sent', last_status = $2, finished_at = now(), \
           claimed_until = NULL WHERE id = $1",
    )
    .bind(id)
    .bind(i32::from(status))
    .execute(conn)
    .await
    .map(drop)
}

/// Try again `delay` from now (the database's clock, the one claims are made by); `delay` is
/// bounded by the caller (an interval beyond PostgreSQL's range would fail the statement, and the
/// push would be sent again when its claim expired).
#[tracing::instrument(name = "push.retry_later", skip_all)]
pub async fn retry_later(
    conn: &mut PgConnection,
    id: Uuid,
    status: Option<u16>,
    error: &str,
    delay: Duration,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE push_deliveries SET next_attempt_at = now() + make_interval(secs => $2), \
           last_status = $3, last_error = $4, claimed_until = NULL WHERE id = $1",
    )
    .bind(id)
    .bind(delay.as_secs_f64())
    .bind(status.map(i32::from))
    .bind(error)
    .execute(conn)
    .await
    .map(drop)
}

/// Given up on.
#[tracing::instrument(name = "push.mark_failed", skip_all)]
pub async fn mark_failed(
    conn: &mut PgConnection,
    id: Uuid,
    status: Option<u16>,
    error: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE push_deliveries SET state = 'failed', last_status = $2, last_error = $3, \
           finished_at = now(), claimed_until = NULL WHERE id = $1",
    )
    .bind(id)
    .bind(status.map(i32::from))
    .bind(error)
    .execute(conn)
    .await
    .map(drop)
}

/// The push service says the subscription is gone (404/410): the device is forgotten, with its
/// pending pushes.
#[tracing::instrument(name = "push.forget_subscription", skip_all)]
pub async fn forget_subscription(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM push_subscriptions WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await
        .map(drop)
}

/// How many pushes are pending (for the backlog gauge), counted up to `cap`.
#[tracing::instrument(name = "push.pending", skip_all)]
pub async fn pending(conn: &mut PgConnection, cap: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM push_deliveries WHERE state = 'pending' LIMIT $1) AS p",
    )
    .bind(cap)
    .fetch_one(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_equal_only_when_every_byte_is() {
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!same_secret(b"0123456789abcdef", b"0123456789abcde"));
        assert!(same_secret(b"", b""));
    }
}
