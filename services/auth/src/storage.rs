//! auth's SQL. Every function runs on a connection it is given, so the domain decides what runs
//! on the primary, on a replica, or inside one transaction.

use service_kit::housekeeping::Sweep;
use service_kit::revoked_users;
use service_kit::sqlx::{self, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::domain::sessions::EndReason;
use crate::domain::{ProfileChange, User};

const USER_COLUMNS: &str = "id, username, nickname, avatar_url, created_at, updated_at";

#[tracing::instrument(skip_all)]
pub async fn username_exists(conn: &mut PgConnection, username: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE username = $1)")
        .bind(username)
        .fetch_one(conn)
        .await
}

/// Inserts the account, or returns `None` when the username was taken in the meantime.
#[tracing::instrument(skip_all)]
pub async fn insert_user(
    conn: &mut PgConnection,
    id: Uuid,
    username: &str,
    password_hash: &str,
    nickname: Option<&str>,
) -> sqlx::Result<Option<User>> {
    sqlx::query_as(&format!(
        "INSERT INTO users (id, username, password_hash, nickname) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (username) DO NOTHING RETURNING {USER_COLUMNS}"
    ))
    .bind(id)
    .bind(username)
    .bind(password_hash)
    .bind(nickname)
    .fetch_optional(conn)
    .await
}

/// The id and password hash of `username`, if the account exists.
#[tracing::instrument(skip_all)]
pub async fn find_credentials(
    conn: &mut PgConnection,
    username: &str,
) -> sqlx::Result<Option<(Uuid, String)>> {
    sqlx::query_as("SELECT id, password_hash FROM users WHERE username = $1")
        .bind(username)
        .fetch_optional(conn)
        .await
}

/// The username and password hash of account `id`.
#[tracing::instrument(skip_all)]
pub async fn find_credentials_by_id(
    conn: &mut PgConnection,
    id: Uuid,
) -> sqlx::Result<Option<(String, String)>> {
    sqlx::query_as("SELECT username, password_hash FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// Deletes account `id` with its sessions and refresh tokens (cascading), and the outbox's
/// published copies of its earlier events (they hold the username); false if it was gone.
/// Events not yet published stay: they go out before the deletion's own, in order.
#[tracing::instrument(skip_all)]
pub async fn delete_user(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<bool> {
    let deleted = sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?
        .rows_affected()
        == 1;
    sqlx::query("DELETE FROM outbox WHERE message_key = $1 AND published_at IS NOT NULL")
        .bind(id.to_string())
        .execute(conn)
        .await?;
    Ok(deleted)
}

#[tracing::instrument(skip_all)]
pub async fn find_user(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<User>> {
    sqlx::query_as(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// Applies the fields present in `change` (a present `None` clears the field).
#[tracing::instrument(skip_all)]
pub async fn update_profile(
    conn: &mut PgConnection,
    id: Uuid,
    change: &ProfileChange,
) -> sqlx::Result<Option<User>> {
    sqlx::query_as(&format!(
        "UPDATE users SET \
           nickname = CASE WHEN $2 THEN $3 ELSE nickname END, \
           avatar_url = CASE WHEN $4 THEN $5 ELSE avatar_url END, \
           updated_at = now() \
         WHERE id = $1 RETURNING {USER_COLUMNS}"
    ))
    .bind(id)
    .bind(change.nickname.is_some())
    .bind(change.nickname.clone().flatten())
    .bind(change.avatar_url.is_some())
    .bind(change.avatar_url.clone().flatten())
    .fetch_optional(conn)
    .await
}

/// Starts a session (refresh-token family) for `user_id`.
#[tracing::instrument(skip_all)]
pub async fn create_family(conn: &mut PgConnection, user_id: Uuid) -> sqlx::Result<Uuid> {
    sqlx::query_scalar(
        "INSERT INTO refresh_token_families (id, user_id) VALUES ($1, $2) RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(user_id)
    .fetch_one(conn)
    .await
}

#[tracing::instrument(skip_all)]
/// Adds a refresh token to session `family_id`, good for `ttl_secs` but never beyond the
/// session's end (`session_secs` after it began).
pub async fn insert_refresh_token(
    conn: &mut PgConnection,
    token_hash: &[u8; 32],
    family_id: Uuid,
    ttl_secs: u64,
    session_secs: u64,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, family_id, expires_at) \
         SELECT $1, $2, LEAST(now() + $3 * interval '1 second', \
                              f.created_at + $4 * interval '1 second') \
         FROM refresh_token_families f WHERE f.id = $2",
    )
    .bind(&token_hash[..])
    .bind(family_id)
    .bind(ttl_secs as f64)
    .bind(session_secs as f64)
    .execute(conn)
    .await
    .map(drop)
}

/// A presented refresh token as stored, with its family.
#[derive(sqlx::FromRow)]
pub struct StoredRefreshToken {
    pub family_id: Uuid,
    pub user_id: Uuid,
    pub used: bool,
    /// Exchanged less than the grace period ago: presenting it again is a retry, not reuse.
    pub used_within_grace: bool,
    /// The token or its session is past its end.
    pub expired: bool,
    pub family_revoked: bool,
}

/// Finds the token and locks it and its family until the transaction ends, so two refreshes
/// with the same token (or a refresh and a logout) are decided one after the other.
#[tracing::instrument(skip_all)]
pub async fn lock_refresh_token(
    conn: &mut PgConnection,
    token_hash: &[u8; 32],
    grace_secs: u64,
    session_secs: u64,
) -> sqlx::Result<Option<StoredRefreshToken>> {
    sqlx::query_as(
        "SELECT t.family_id, f.user_id, t.used_at IS NOT NULL AS used, \
                COALESCE(t.used_at > now() - $2 * interval '1 second', false) \
                  AS used_within_grace, \
                (t.expires_at <= now() \
                 OR f.created_at + $3 * interval '1 second' <= now()) AS expired, \
                f.revoked_at IS NOT NULL AS family_revoked \
         FROM refresh_tokens t JOIN refresh_token_families f ON f.id = t.family_id \
         WHERE t.token_hash = $1 FOR UPDATE",
    )
    .bind(&token_hash[..])
    .bind(grace_secs as f64)
    .bind(session_secs as f64)
    .fetch_optional(conn)
    .await
}

#[tracing::instrument(skip_all)]
pub async fn mark_used(conn: &mut PgConnection, token_hash: &[u8; 32]) -> sqlx::Result<()> {
    sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1")
        .bind(&token_hash[..])
        .execute(conn)
        .await
        .map(drop)
}

/// A session that a revocation just ended.
#[derive(Debug, sqlx::FromRow)]
pub struct EndedSession {
    /// The family id, the `sid` of the session's access tokens.
    pub id: Uuid,
    pub user_id: Uuid,
}

/// Ends session `family_id`; `None` when it had ended already.
#[tracing::instrument(skip_all)]
pub async fn revoke_family(
    conn: &mut PgConnection,
    family_id: Uuid,
    reason: EndReason,
    at: OffsetDateTime,
) -> sqlx::Result<Option<EndedSession>> {
    sqlx::query_as(
        "UPDATE refresh_token_families SET revoked_at = $3, revoked_reason = $2 \
         WHERE id = $1 AND revoked_at IS NULL RETURNING id, user_id",
    )
    .bind(family_id)
    .bind(reason.as_str())
    .bind(at)
    .fetch_optional(conn)
    .await
}

/// Ends the session the token belongs to; `None` when the token is unknown or its session had
/// ended already (nothing changed).
#[tracing::instrument(skip_all)]
pub async fn revoke_family_of_token(
    conn: &mut PgConnection,
    token_hash: &[u8; 32],
    reason: EndReason,
    at: OffsetDateTime,
) -> sqlx::Result<Option<EndedSession>> {
    sqlx::query_as(
        "UPDATE refresh_token_families SET revoked_at = $3, revoked_reason = $2 \
         WHERE id = (SELECT family_id FROM refresh_tokens WHERE token_hash = $1) \
           AND revoked_at IS NULL \
         RETURNING id, user_id",
    )
    .bind(&token_hash[..])
    .bind(reason.as_str())
    .bind(at)
    .fetch_optional(conn)
    .await
}

/// Housekeeping's statements (each deletes at most `$1` rows; run until none is left): refresh
/// tokens expired more than a day ago, then sessions with no token left, then refusals of
/// deleted accounts whose tokens have all expired.
pub fn housekeeping_sweeps() -> Vec<Sweep> {
    vec![
        revoked_users::sweep(),
        Sweep::new(
            "refresh_tokens",
            "DELETE FROM refresh_tokens WHERE token_hash IN ( \
               SELECT token_hash FROM refresh_tokens \
               WHERE expires_at < now() - interval '1 day' LIMIT $1)",
        ),
        Sweep::new(
            "refresh_token_families",
            "DELETE FROM refresh_token_families WHERE id IN ( \
               SELECT f.id FROM refresh_token_families f \
               WHERE f.created_at < now() - interval '1 day' \
                 AND NOT EXISTS (SELECT 1 FROM refresh_tokens t WHERE t.family_id = f.id) \
               LIMIT $1)",
        ),
    ]
}
