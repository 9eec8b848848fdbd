//! Due-date reminders: the schedule kept from task events, and the scheduler every instance
//! runs.
//!
//! Each instance claims the reminders due within its look-ahead that nobody holds (`FOR UPDATE
//! SKIP LOCKED`, so instances never wait on each other or claim the same row), sleeps until the
//! earliest, and fires what is due in one transaction that marks the rows fired and writes the
//! notifications ([`super::inbox::fire`]). Fired-and-committed happens once; a claim whose holder
//! died (SIGKILL, lost node) expires `claim_lease` after its fire time and another instance takes
//! it, so a reminder is late by at most that, and never lost or doubled. A moved due date resets
//! the claim, so the old time never fires.

use std::sync::Arc;
use std::time::Duration;

use events::catalog::TaskSnapshot;
use service_kit::db::{Database, DbError};
use service_kit::sqlx::Connection;
use service_kit::workers::StoppableTask;
use time::OffsetDateTime;
use tokio::sync::Notify;
use uuid::Uuid;

use super::inbox;
use super::settings::ReminderSettings;
use crate::storage;
use crate::storage::reminders::ScheduledTask;

/// Reminders claimed, and fired, per round.
const BATCH: i64 = 500;
/// Shortest sleep between rounds (a claimed row another transaction holds for a moment).
const MIN_PAUSE: Duration = Duration::from_millis(10);
/// Wait after a database error before the next round.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The schedule a task's state asks for: reminders while it is open and has a due date.
pub fn plan(task: &TaskSnapshot) -> ScheduledTask {
    ScheduledTask {
        task_id: task.id,
        user_id: task.owner_id,
        title: task.title.clone(),
        version: task.version,
        due_at: task.due_at.filter(|_| task.status != "done"),
    }
}

/// A deleted task's schedule: none.
pub fn cancelled(task_id: Uuid, user_id: Uuid) -> ScheduledTask {
    ScheduledTask {
        task_id,
        user_id,
        title: String::new(),
        // Deletion is final, whatever version the rows have.
        version: i64::MAX,
        due_at: None,
    }
}

/// What the scheduler needs.
pub struct Scheduler {
    pub db: Database,
    pub settings: ReminderSettings,
    /// This instance's id in `claimed_by`.
    pub instance: Uuid,
    pub push_enabled: bool,
    pub feed_max_entries: i64,
    /// Woken when pushes were queued (the push dispatcher).
    pub pushes_queued: Arc<Notify>,
}

impl Scheduler {
    pub fn spawn(self) -> StoppableTask {
        StoppableTask::spawn(move |mut stop| async move {
            tracing::info!(instance = %self.instance, "reminder scheduler started");
            loop {
                let pause = match self.round().await {
                    Ok(pause) => pause,
                    Err(err) => {
                        tracing::warn!(error = %err, "reminder round failed; trying again");
                        ERROR_PAUSE
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
            let instance = self.instance;
            match self
                .db
                .primary(|mut conn| async move {
                    storage::reminders::release(&mut conn, instance).await
                })
                .await
            {
                Ok(released) => tracing::info!(released, "gave up this instance's reminder claims"),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot give up reminder claims; they expire")
                }
            }
        })
    }

    /// Claims, fires what is due, and says how long to sleep: until the earliest claimed
    /// reminder, or the poll interval.
    async fn round(&self) -> Result<Duration, DbError> {
        let mut conn = self.db.writer_connection().await?;
        storage::reminders::claim(
            &mut conn,
            self.instance,
            self.settings.lookahead,
            self.settings.claim_lease,
            BATCH,
        )
        .await?;
        loop {
            let mut tx = conn.begin().await?;
            let due = storage::reminders::take_due(&mut tx, self.instance, BATCH).await?;
            if due.is_empty() {
                break;
            }
            let fired =
                inbox::fire(&mut tx, &due, self.push_enabled, self.feed_max_entries).await?;
            tx.commit().await?;
            metrics::counter!(REMINDERS_FIRED).increment(due.len() as u64);
            tracing::info!(
                reminders = due.len(),
                notifications = fired.notifications,
                pushes = fired.pushes,
                "fired reminders"
            );
            if fired.pushes > 0 {
                self.pushes_queued.notify_one();
            }
            if (due.len() as i64) < BATCH {
                break;
            }
        }
        let next = storage::reminders::next_claimed(&mut conn, self.instance).await?;
        let until_next = next.map(|at| {
            let wait = at - OffsetDateTime::now_utc();
            Duration::try_from(wait).unwrap_or(Duration::ZERO)
        });
        Ok(until_next
            .unwrap_or(self.settings.poll_interval)
            .clamp(MIN_PAUSE, self.settings.poll_interval))
    }
}

/// Reminders fired (counter).
pub const REMINDERS_FIRED: &str = "notifications_reminders_fired_total";
