//! Erasing an account's data when auth announces `user.deleted` on `auth.user.v1`.
//!
//! The consumer ([`AccountEvents`]) does two things in the transaction that records the event:
//! it refuses the user's access tokens from now on (`revoked_users`, reloaded by every instance
//! each second) and asks for an erasure (`erasures`). The [`Eraser`] then works through the
//! account in batches of [`TASKS_PER_BATCH`] tasks, one short transaction each, so an account
//! with 100,000 tasks never holds a long transaction and locks only its own rows; any number of
//! instances share the work (`FOR UPDATE SKIP LOCKED` on the erasure). Each erased task gets its
//! own `task.deleted` (reason `account_deleted`), so it follows the task's earlier events in its
//! partition and consumers need nothing new to stay right. The erasure is done once nothing of
//! the account is left and [`GRACE`] has passed: long enough for a request that was verified
//! before the refusal took effect to have finished (or timed out) and been swept too.

use std::sync::Arc;
use std::time::Duration;

use events::catalog::{EventPayload, TaskDeleted, UserDeleted};
use events::consumer::{EventHandler, HandlerError, ReceivedEvent};
use events::outbox;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use service_kit::db::Database;
use service_kit::revoked_users::{self, RevokedUsers};
use service_kit::sqlx::PgConnection;
use service_kit::workers::StoppableTask;
use time::OffsetDateTime;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

use super::tasks::EVENT_SOURCE;
use super::TaskError;
use crate::storage;

/// Tasks erased per transaction, with the history of as many and as many idempotency keys.
/// Small enough that deleting a batch by key stays cheaper than a table scan even on small
/// tables (the EXPLAIN test checks it): 10,000 tasks take 50 short transactions.
pub const TASKS_PER_BATCH: i64 = 200;
/// How long after the request an erasure goes on sweeping: the longest a request may run
/// (`HTTP_REQUEST_TIMEOUT_MS`, 15 s by default, and a write already sent to the database may
/// finish for `DATABASE_STATEMENT_TIMEOUT_MS` more, 10 s) plus the refusal list's reload.
pub const GRACE: Duration = Duration::from_secs(30);
/// How often an idle eraser looks for work it was not woken for (another instance's event).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Applies `auth.user.v1`: `user.deleted` refuses the user's tokens and asks for an erasure;
/// the other events are not tasks' business.
pub struct AccountEvents {
    revoked: Arc<RevokedUsers>,
    wake: Arc<Notify>,
}

impl AccountEvents {
    pub fn new(revoked: Arc<RevokedUsers>, wake: Arc<Notify>) -> Self {
        Self { revoked, wake }
    }
}

impl EventHandler for AccountEvents {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a ReceivedEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if event.envelope.event_type != UserDeleted::TYPE {
                return Ok(());
            }
            let deleted: UserDeleted = event.data()?;
            revoked_users::record(
                tx,
                deleted.user_id,
                deleted.deleted_at,
                deleted.tokens_valid_until,
            )
            .await?;
            storage::request_erasure(tx, deleted.user_id).await?;
            // Harmless if the transaction fails after all: the account is gone either way.
            self.revoked.note(deleted.user_id);
            self.wake.notify_one();
            Ok(())
        })
    }
}

/// The background eraser; stop it on shutdown.
pub struct Eraser {
    task: StoppableTask,
}

impl Eraser {
    /// Starts erasing whatever `erasures` asks for; `wake` says a new request was recorded here.
    pub fn spawn(db: Database, wake: Arc<Notify>) -> Self {
        Self {
            task: StoppableTask::spawn(|stop| run(db, wake, stop)),
        }
    }

    /// Stops after the batch in hand (what is left is picked up by the next instance to run).
    pub async fn stop(&self, limit: Duration) {
        if !self.task.stop(limit).await {
            tracing::warn!("eraser did not stop within {limit:?}");
        }
    }
}

/// What a round found.
enum Round {
    /// A batch was erased (or an erasure finished): go on at once.
    Busy,
    /// Nothing to do now.
    Idle,
}

async fn run(db: Database, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    let mut failing = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let round = match erase_round(&db).await {
            Ok(round) => {
                if failing {
                    tracing::info!("erasing accounts works again");
                    failing = false;
                }
                round
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "erasing an account failed; retrying");
                    failing = true;
                }
                Round::Idle
            }
        };
        if let Round::Idle = round {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }
}

/// One transaction: claims the oldest erasure, erases a batch of it, and finishes it once
/// nothing is left and the grace period is over.
async fn erase_round(db: &Database) -> Result<Round, TaskError> {
    let (round, _) = db
        .transaction(|tx| {
            async move {
                let Some((user, requested_at)) = storage::claim_erasure(tx).await? else {
                    return Ok::<_, TaskError>(Round::Idle);
                };
                let erased = storage::erase_batch(tx, user, TASKS_PER_BATCH).await?;
                if !erased.tasks.is_empty() {
                    let events: Vec<TaskDeleted> = erased
                        .tasks
                        .iter()
                        .map(|&(task_id, last_version)| TaskDeleted {
                            task_id,
                            owner_id: user,
                            last_version,
                            actor_id: user,
                            reason: Some("account_deleted".into()),
                        })
                        .collect();
                    outbox::enqueue_all(tx, EVENT_SOURCE, &events).await?;
                }
                if !erased.is_empty() {
                    metrics::counter!(ERASED_TASKS).increment(erased.tasks.len() as u64);
                    return Ok(Round::Busy);
                }
                if OffsetDateTime::now_utc() - requested_at < GRACE {
                    return Ok(Round::Idle);
                }
                storage::finish_erasure(tx, user).await?;
                log_finished(user, requested_at);
                Ok(Round::Busy)
            }
            .boxed()
        })
        .await?;
    Ok(round)
}

fn log_finished(user: Uuid, requested_at: OffsetDateTime) {
    tracing::info!(
        %user,
        took_secs = (OffsetDateTime::now_utc() - requested_at).as_seconds_f64(),
        "account erased"
    );
}

/// Tasks erased because their account was deleted.
pub const ERASED_TASKS: &str = "tasks_erased_total";
