//! Access tokens of deleted accounts, refused well before they expire.
//!
//! A deleted user's access tokens stay valid by signature until `exp`. Every service that
//! verifies tokens keeps the users it must refuse in its own database, written when it learns
//! of the deletion (auth in the deleting transaction, the others from `user.deleted`), and every
//! instance reloads that table into memory each second, where the verifier looks callers up. So a
//! deleted account's token is refused everywhere within about a second of the service learning
//! of it, with no call to auth on the hot path. Only a SHA-256 of the user id is stored, and an
//! entry is forgotten (housekeeping) once the last token it covers has expired.
//!
//! The service's schema needs:
//! ```sql
//! CREATE TABLE revoked_users (user_hash bytea PRIMARY KEY, revoked_at timestamptz NOT NULL,
//!     forget_after timestamptz NOT NULL);
//! ```

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use sqlx::types::time::OffsetDateTime;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::db::{Database, DbError};
use crate::housekeeping::Sweep;

/// How often every instance reloads the list.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The users whose tokens are refused, as this instance last loaded them.
#[derive(Default)]
pub struct RevokedUsers {
    hashes: ArcSwap<HashSet<[u8; 32]>>,
}

impl RevokedUsers {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether `user`'s tokens are refused.
    pub fn is_revoked(&self, user: Uuid) -> bool {
        let hashes = self.hashes.load();
        !hashes.is_empty() && hashes.contains(&user_hash(user))
    }

    /// Refuses `user` on this instance at once (the others follow at their next reload).
    pub fn note(&self, user: Uuid) {
        self.hashes.rcu(|hashes| {
            let mut hashes = HashSet::clone(hashes);
            hashes.insert(user_hash(user));
            hashes
        });
    }

    /// Reloads the list from the service's database; returns how many users it holds.
    pub async fn reload(&self, db: &Database) -> Result<usize, DbError> {
        let rows: Vec<Vec<u8>> = db
            .primary(|mut conn| async move {
                sqlx::query_scalar("SELECT user_hash FROM revoked_users WHERE forget_after > now()")
                    .fetch_all(&mut *conn)
                    .await
            })
            .await?;
        let hashes: HashSet<[u8; 32]> = rows
            .into_iter()
            .filter_map(|row| <[u8; 32]>::try_from(row).ok())
            .collect();
        let count = hashes.len();
        self.hashes.store(Arc::new(hashes));
        Ok(count)
    }

    /// Reloads every [`RELOAD_INTERVAL`] for the life of the process. The primary is read: a
    /// lagging replica would let tokens through for as long as it lags.
    pub fn spawn_reload(self: &Arc<Self>, db: Database) {
        let revoked = self.clone();
        crate::workers::spawn_periodic("reload revoked users", RELOAD_INTERVAL, move || {
            let (revoked, db) = (revoked.clone(), db.clone());
            async move {
                revoked
                    .reload(&db)
                    .await
                    .map(drop)
                    .map_err(|err| err.to_string())
            }
        });
    }
}

/// Records, in the caller's transaction, that `user`'s tokens are refused until `forget_after`
/// (when the last of them expires). Recording a user twice keeps the later bound.
pub async fn record(
    conn: &mut PgConnection,
    user: Uuid,
    revoked_at: OffsetDateTime,
    forget_after: OffsetDateTime,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO revoked_users (user_hash, revoked_at, forget_after) VALUES ($1, $2, $3) \
         ON CONFLICT (user_hash) DO UPDATE \
         SET forget_after = GREATEST(revoked_users.forget_after, EXCLUDED.forget_after)",
    )
    .bind(&user_hash(user)[..])
    .bind(revoked_at)
    .bind(forget_after)
    .execute(conn)
    .await
    .map(drop)
}

/// Housekeeping's statement: entries whose tokens have all expired.
pub fn sweep() -> Sweep {
    Sweep::new(
        "revoked_users",
        "DELETE FROM revoked_users WHERE user_hash IN ( \
           SELECT user_hash FROM revoked_users WHERE forget_after < now() LIMIT $1)",
    )
}

/// How a user is stored here (and in other tables that must not hold the id itself).
pub fn user_hash(user: Uuid) -> [u8; 32] {
    Sha256::digest(user.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_noted_user_is_refused_and_no_one_else() {
        let revoked = RevokedUsers::new();
        let (gone, staying) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(!revoked.is_revoked(gone));
        revoked.note(gone);
        assert!(revoked.is_revoked(gone));
        assert!(!revoked.is_revoked(staying));
    }
}
