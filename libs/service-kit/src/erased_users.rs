//! Accounts this service erased, and the lock that keeps an erasure and a write about the same
//! user from interleaving.
//!
//! A deleted account's data reaches a service by more than one road: events on several topics
//! and partitions (applied side by side, in no order across topics), requests made with a token
//! verified in the second before the refusal took effect, reminders and other background work.
//! Checking "was this user erased?" and then writing is a race unless the erasure waits for the
//! writes that checked before it, and the writes that check after it see it. So:
//!
//! - every write about a user first calls [`guard`] in its transaction: it takes the user's
//!   advisory lock *shared* (writes about one user never wait for each other) and then looks the
//!   user up among the erased;
//! - the erasure calls [`erase`] first in its transaction: it takes the same lock *exclusively*
//!   (waiting for the writes under way to commit, so it deletes what they wrote) and records the
//!   tombstone, which every write that takes the lock after it sees.
//!
//! Both hold the lock until their transaction ends, so they must run inside one (and under READ
//! COMMITTED, the default: each statement after the wait sees what the other committed). Only a SHA-256 of
//! the id is kept (as [`crate::revoked_users`] does), forgotten after [`FORGET_AFTER_DAYS`]: by
//! then the topics (7 days' retention) hold none of the account's events.
//!
//! The locks use PostgreSQL's two-key form, whose key space does not overlap the one-key locks of
//! housekeeping and the outbox relay. Two users whose hashes share the first four bytes only
//! make each other's writes wait for an erasure now and then.
//!
//! The service's schema needs:
//! ```sql
//! CREATE TABLE erased_users (user_hash bytea PRIMARY KEY, erased_at timestamptz NOT NULL);
//! ```

use sqlx::types::time::OffsetDateTime;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::access_token::TokenError;
use crate::error::ApiError;
use crate::housekeeping::Sweep;
use crate::revoked_users::user_hash;

/// The first key of every erasure lock: "erasure" in the two-key space.
const LOCK_CLASS: i32 = 0x4552_4153; // "ERAS"
/// How long an erased account's tombstone is kept.
pub const FORGET_AFTER_DAYS: i32 = 8;

/// Whether a write about a user may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// The user is not erased here; until the transaction ends, no erasure of them can begin.
    Live,
    /// The user was erased: write nothing about them.
    Erased,
}

impl Guard {
    pub fn is_erased(self) -> bool {
        self == Guard::Erased
    }
}

/// A write about an account this service erased (its token was verified just before the
/// refusal took effect): nothing is written, and the answer is the one its token now gets.
#[derive(Debug, thiserror::Error)]
#[error("the account was deleted")]
pub struct AccountErased;

impl From<AccountErased> for ApiError {
    fn from(_: AccountErased) -> Self {
        TokenError::Revoked.into()
    }
}

fn lock_key(user: Uuid) -> i32 {
    let hash = user_hash(user);
    i32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]])
}

/// In the caller's transaction: holds off any erasure of `user` until it ends, and says whether
/// `user` was erased already.
pub async fn guard(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<Guard> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(user))
        .execute(&mut *conn)
        .await?;
    // A statement of its own: one that also took the lock would read with a snapshot from
    // before its wait, blind to the erasure it waited for (READ COMMITTED).
    tombstone(conn, user).await
}

/// Like [`guard`] for a transaction that already holds row locks an erasure of `user` would wait
/// for (a reminder claimed for firing): instead of waiting behind an erasure under way, which
/// would deadlock with it, `user` counts as erased at once.
pub async fn try_guard(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<Guard> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock_shared($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(user))
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(Guard::Erased);
    }
    tombstone(conn, user).await
}

async fn tombstone(conn: &mut PgConnection, user: Uuid) -> sqlx::Result<Guard> {
    let erased: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM erased_users WHERE user_hash = $1)")
            .bind(&user_hash(user)[..])
            .fetch_one(conn)
            .await?;
    Ok(if erased { Guard::Erased } else { Guard::Live })
}

/// In the caller's transaction, before it deletes anything of `user`: waits for the writes about
/// `user` under way to commit, keeps new ones waiting until this transaction ends, and records
/// that `user` was erased at `erased_at` (so writes that come later write nothing).
pub async fn erase(
    conn: &mut PgConnection,
    user: Uuid,
    erased_at: OffsetDateTime,
) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(lock_key(user))
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO erased_users (user_hash, erased_at) VALUES ($1, $2) \
         ON CONFLICT (user_hash) DO NOTHING",
    )
    .bind(&user_hash(user)[..])
    .bind(erased_at)
    .execute(conn)
    .await
    .map(drop)
}

/// Housekeeping's statement: tombstones old enough that no event of the account is left.
pub fn sweep() -> Sweep {
    Sweep::new(
        "erased_users",
        format!(
            "DELETE FROM erased_users WHERE user_hash IN ( \
               SELECT user_hash FROM erased_users \
               WHERE erased_at < now() - interval '{FORGET_AFTER_DAYS} days' LIMIT $1)"
        ),
    )
}
