//! Housekeeping: deleting what has outlived its use (published outbox rows, old event ids,
//! expired tokens and keys) in batches until none is left, on one instance at a time.
//!
//! Each round takes a session-level advisory lock on a connection of its own (never a pooled
//! one, so a lock cannot outlive the round on a connection lent to someone else); an instance
//! that finds it taken skips the round. Every batch is its own statement, well under the
//! statement timeout, and a short pause between batches leaves the database to the requests.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::db::{Database, DbError};
use crate::metrics as names;

/// Rows one statement deletes at most. Measured here: 2,000 outbox rows take ~11 ms.
pub const BATCH: i64 = 2_000;
/// Pause between batches.
const BREATHER: Duration = Duration::from_millis(10);

/// One kind of clean-up: a `DELETE` that removes at most `$1` rows per run.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub name: &'static str,
    pub statement: String,
}

impl Sweep {
    pub fn new(name: &'static str, statement: impl Into<String>) -> Self {
        Self {
            name,
            statement: statement.into(),
        }
    }
}

/// Runs `sweeps` in order every `interval` (the first time at once) for the life of the
/// process, as `name` (which also names the advisory lock: one instance at a time per name).
pub fn spawn(db: Database, name: &'static str, interval: Duration, sweeps: Vec<Sweep>) {
    crate::workers::spawn_periodic(name, interval, move || {
        let db = db.clone();
        let sweeps = sweeps.clone();
        async move {
            match run_once(&db, name, &sweeps).await {
                Ok(Some(deleted)) if deleted > 0 => {
                    tracing::info!(housekeeping = name, deleted, "housekeeping done");
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(err) => Err(err.to_string()),
            }
        }
    });
}

/// One round: `None` when another instance holds the lock, else the rows deleted.
pub async fn run_once(db: &Database, name: &str, sweeps: &[Sweep]) -> Result<Option<u64>, DbError> {
    let mut conn = PgConnection::connect_with(&db.writer_pool().connect_options()).await?;
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(lock_key(name))
        .fetch_one(&mut conn)
        .await?;
    if !held {
        let _ = conn.close().await;
        return Ok(None);
    }
    let mut total = 0;
    for sweep in sweeps {
        loop {
            let deleted = sqlx::query(&sweep.statement)
                .bind(BATCH)
                .execute(&mut conn)
                .await?
                .rows_affected();
            metrics::counter!(names::HOUSEKEEPING_DELETED, "sweep" => sweep.name)
                .increment(deleted);
            total += deleted;
            if deleted < BATCH as u64 {
                break;
            }
            tokio::time::sleep(BREATHER).await;
        }
    }
    // Closing the session releases the lock.
    let _ = conn.close().await;
    Ok(Some(total))
}

/// The advisory lock of the housekeeping named `name`: a stable hash (FNV-1a) of the name, in
/// a range of its own, so different housekeepers never share a lock and never meet a relay's.
pub fn lock_key(name: &str) -> i64 {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    // Top bits fixed ("hk"), so no housekeeping key equals a hand-picked constant.
    ((0x686b_u64 << 48) | (hash & 0xFFFF_FFFF_FFFF)) as i64
}

#[cfg(test)]
mod tests {
    use super::lock_key;

    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(lock_key("outbox"), lock_key("outbox"));
        assert_ne!(lock_key("outbox"), lock_key("processed_events"));
        assert_eq!(lock_key("outbox") >> 48, 0x686b);
    }
}
