//! notifications' SQL: appending to the users' feeds, reading what a client missed, the ended
//! sessions (here); the reminder schedule, the inbox and preferences, and push (submodules). Each function runs on the connection it is given (the consumer's transaction, or a
//! connection of the writer pool: recovery reads the primary, since a replica may not have the
//! entries the live frames already announced).

pub mod inbox;
pub mod push;
pub mod reminders;

use std::collections::{BTreeMap, HashMap};

use service_kit::housekeeping::Sweep;
use service_kit::sqlx::{self, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::feed::{Change, NewChange, CHANNEL};

/// Appends `changes` to their users' feeds, numbering each user's changes on from its head in
/// the order given, and trims each of those feeds to its newest `max_entries`. Returns the
/// changes with their sequence numbers. Users' heads are locked in id order, so batches applied
/// side by side cannot deadlock.
#[tracing::instrument(skip_all)]
pub async fn append(
    conn: &mut PgConnection,
    changes: &[NewChange],
    max_entries: i64,
) -> sqlx::Result<Vec<Change>> {
    let mut counts: BTreeMap<Uuid, i64> = BTreeMap::new();
    for change in changes {
        *counts.entry(change.user).or_default() += 1;
    }
    let users: Vec<Uuid> = counts.keys().copied().collect();
    let added: Vec<i64> = counts.values().copied().collect();
    let heads: Vec<(Uuid, i64)> = sqlx::query_as(
        "INSERT INTO live_heads AS h (user_id, last_seq) \
         SELECT user_id, added FROM unnest($1::uuid[], $2::bigint[]) AS n(user_id, added) \
         ORDER BY user_id \
         ON CONFLICT (user_id) DO UPDATE SET last_seq = h.last_seq + EXCLUDED.last_seq \
         RETURNING user_id, last_seq",
    )
    .bind(&users)
    .bind(&added)
    .fetch_all(&mut *conn)
    .await?;
    // The next number of each user: one past its old head.
    let mut next: HashMap<Uuid, i64> = heads
        .iter()
        .map(|(user, last)| (*user, last - counts[user] + 1))
        .collect();
    let numbered: Vec<Change> = changes
        .iter()
        .map(|change| {
            let next = next.entry(change.user).or_default();
            let seq = *next;
            *next += 1;
            Change {
                user: change.user,
                seq,
                kind: change.kind.to_owned(),
                id: change.id,
                version: change.version,
                at: change.at,
            }
        })
        .collect();
    sqlx::query(
        "INSERT INTO live_feed (user_id, seq, kind, entity_id, version, changed_at) \
         SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::uuid[], $5::bigint[], \
                              $6::timestamptz[])",
    )
    .bind(numbered.iter().map(|c| c.user).collect::<Vec<_>>())
    .bind(numbered.iter().map(|c| c.seq).collect::<Vec<_>>())
    .bind(numbered.iter().map(|c| c.kind.clone()).collect::<Vec<_>>())
    .bind(numbered.iter().map(|c| c.id).collect::<Vec<_>>())
    .bind(numbered.iter().map(|c| c.version).collect::<Vec<_>>())
    .bind(numbered.iter().map(|c| c.at).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    let (users, lasts): (Vec<Uuid>, Vec<i64>) = heads.into_iter().unzip();
    sqlx::query(
        "DELETE FROM live_feed f USING unnest($1::uuid[], $2::bigint[]) AS h(user_id, last_seq) \
         WHERE f.user_id = h.user_id AND f.seq <= h.last_seq - $3",
    )
    .bind(&users)
    .bind(&lasts)
    .bind(max_entries)
    .execute(&mut *conn)
    .await?;
    Ok(numbered)
}

/// Tells every instance (delivered when the caller's transaction commits).
#[tracing::instrument(skip_all)]
pub async fn notify(conn: &mut PgConnection, payload: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload)
        .execute(conn)
        .await
        .map(drop)
}

/// The user's latest sequence number (0 before their first change).
#[tracing::instrument(skip_all)]
pub async fn head(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT last_seq FROM live_heads WHERE user_id = $1")
        .bind(user)
        .fetch_optional(conn)
        .await
        .map(Option::unwrap_or_default)
}

/// Up to `limit` kept entries of `user` after `after` (and before `before`, if given), in order.
#[tracing::instrument(skip_all)]
pub async fn entries_after(
    conn: &mut PgConnection,
    user: Uuid,
    after: i64,
    before: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<Change>> {
    let rows: Vec<(i64, String, Uuid, i64, OffsetDateTime)> = sqlx::query_as(
        "SELECT seq, kind, entity_id, version, changed_at FROM live_feed \
         WHERE user_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq LIMIT $4",
    )
    .bind(user)
    .bind(after)
    .bind(before.unwrap_or(i64::MAX))
    .bind(limit)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(seq, kind, id, version, at)| Change {
            user,
            seq,
            kind,
            id,
            version,
            at,
        })
        .collect())
}

/// Erases a deleted account's feed.
#[tracing::instrument(skip_all)]
pub async fn erase_user(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<u64> {
    let feed = sqlx::query("DELETE FROM live_feed WHERE user_id = $1")
        .bind(user)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM live_heads WHERE user_id = $1")
        .bind(user)
        .execute(&mut *conn)
        .await?;
    Ok(feed)
}

/// Records that `session`'s tokens may open no socket until `forget_after`.
#[tracing::instrument(skip_all)]
pub async fn revoke_session(
    conn: &mut PgConnection,
    session: Uuid,
    forget_after: OffsetDateTime,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO revoked_sessions (session_id, forget_after) VALUES ($1, $2) \
         ON CONFLICT (session_id) DO UPDATE \
         SET forget_after = GREATEST(revoked_sessions.forget_after, EXCLUDED.forget_after)",
    )
    .bind(session)
    .bind(forget_after)
    .execute(conn)
    .await
    .map(drop)
}

#[tracing::instrument(skip_all)]
pub async fn session_revoked(conn: &mut PgConnection, session: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM revoked_sessions WHERE session_id = $1 AND forget_after > now())",
    )
    .bind(session)
    .fetch_one(conn)
    .await
}

/// Housekeeping: feed entries past the retention, ended sessions whose tokens have all expired,
/// notifications past the inbox's retention, and settled pushes after a week.
pub fn sweeps(retention: std::time::Duration, inbox_retention: std::time::Duration) -> Vec<Sweep> {
    vec![
        Sweep::new(
            "live_feed",
            format!(
                "DELETE FROM live_feed WHERE (user_id, seq) IN ( \
                   SELECT user_id, seq FROM live_feed \
                   WHERE written_at < now() - make_interval(secs => {}) LIMIT $1)",
                retention.as_secs()
            ),
        ),
        Sweep::new(
            "notifications",
            format!(
                "DELETE FROM notifications WHERE id IN ( \
                   SELECT id FROM notifications \
                   WHERE created_at < now() - make_interval(secs => {}) LIMIT $1)",
                inbox_retention.as_secs()
            ),
        ),
        Sweep::new(
            "push_deliveries",
            "DELETE FROM push_deliveries WHERE id IN ( \
               SELECT id FROM push_deliveries \
               WHERE state <> 'pending' AND finished_at < now() - interval '7 days' LIMIT $1)",
        ),
        Sweep::new(
            "revoked_sessions",
            "DELETE FROM revoked_sessions WHERE session_id IN ( \
               SELECT session_id FROM revoked_sessions WHERE forget_after < now() LIMIT $1)",
        ),
    ]
}
