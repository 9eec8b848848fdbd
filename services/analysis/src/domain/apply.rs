//! Applying events to the read models: `tasks.task.v1` folds into the task's model and its owner's
//! totals, `auth.user.v1`'s `user.deleted` erases the user. A batch of events runs in the
//! consumer's transaction (the same transaction records them as processed): each task's row is
//! written as its events come, while the owners' totals are summed in memory ([`Pending`]) and
//! written once at the end, in a fixed order. So a batch of 500 events of one user writes a handful
//! of total rows, and partitions applied side by side lock shared rows in the same order (they
//! cannot deadlock).
//!
//! Applying is idempotent on its own, not only through the consumer's `processed_events`: an event
//! whose version the task's model already reflects changes nothing. That is what lets a rebuild
//! replay the topic into fresh tables and then catch up beside the live consumer.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use events::catalog::{
    EventPayload, TaskCreated, TaskDeleted, TaskUpdated, TelemetryBatch, UserDeleted,
};
use events::consumer::{EventHandler, HandlerError, ReceivedEvent};
use futures_util::future::BoxFuture;
use service_kit::erased_users;
use service_kit::revoked_users::{self, RevokedUsers};
use service_kit::sqlx::PgConnection;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use super::model::{total_changes, AsOf, ModelError, TaskModel, Total};
use crate::storage;

/// Event time → applied, per event type.
pub const EVENT_DELAY_METRIC: &str = "analysis_event_delay_seconds";

impl From<ModelError> for HandlerError {
    fn from(err: ModelError) -> Self {
        HandlerError::Permanent(err.to_string())
    }
}

/// What an event does to one task.
enum TaskEvent {
    Created(TaskCreated),
    Updated(TaskUpdated),
    Deleted(TaskDeleted),
}

/// What a batch will write to its owners' totals once its events are applied.
#[derive(Default)]
pub struct Pending {
    totals: BTreeMap<(Uuid, Total), i64>,
    as_of: BTreeMap<Uuid, AsOf>,
    /// Telemetry events per user, UTC day and name.
    usage: BTreeMap<(Uuid, Date, String), i64>,
    /// Whether each owner seen in the batch was erased: looked up once per owner, not per event.
    erased: HashMap<Uuid, bool>,
}

impl Pending {
    fn add(&mut self, owner: Uuid, changes: Vec<(Total, i64)>, as_of: AsOf) {
        for (total, by) in changes {
            *self.totals.entry((owner, total)).or_default() += by;
        }
        let newest = self.as_of.entry(owner).or_insert_with(|| as_of.clone());
        let key = |a: &AsOf| (a.event_at, a.topic.clone(), a.partition, a.offset);
        if key(&as_of) > key(newest) {
            *newest = as_of;
        }
    }

    /// `owner` was erased in this batch: nothing of theirs is written, now or later in it.
    fn erased_now(&mut self, owner: Uuid) {
        self.totals.retain(|(seen, _), _| *seen != owner);
        self.as_of.remove(&owner);
        self.usage.retain(|(seen, _, _), _| *seen != owner);
        self.erased.insert(owner, true);
    }

    /// Whether `owner` was erased; the first time per batch it also takes the owner's erasure
    /// lock (shared, to the end of the transaction), so an erasure cannot slip in between this
    /// check and what the batch writes for the owner.
    async fn is_erased(&mut self, conn: &mut PgConnection, owner: Uuid) -> sqlx::Result<bool> {
        if let Some(&erased) = self.erased.get(&owner) {
            return Ok(erased);
        }
        let erased = erased_users::guard(conn, owner).await?.is_erased();
        self.erased.insert(owner, erased);
        Ok(erased)
    }

    fn add_telemetry(&mut self, batch: &TelemetryBatch) {
        for event in &batch.events {
            *self
                .usage
                .entry((batch.user_id, event.at.date(), event.name.clone()))
                .or_default() += 1;
        }
    }

    /// Writes the summed totals, owner by owner in id order.
    pub async fn flush(self, conn: &mut PgConnection) -> Result<(), HandlerError> {
        let mut by_owner: BTreeMap<Uuid, Vec<(Total, i64)>> = BTreeMap::new();
        for ((owner, total), by) in self.totals {
            if by != 0 {
                by_owner.entry(owner).or_default().push((total, by));
            }
        }
        for (owner, changes) in by_owner {
            storage::change_totals(conn, owner, &changes).await?;
        }
        for (owner, as_of) in self.as_of {
            storage::note_as_of(conn, owner, &as_of).await?;
        }
        for ((owner, day, name), events) in self.usage {
            storage::add_usage(conn, owner, day, &name, events).await?;
        }
        Ok(())
    }
}

/// Applies `events` in order on `conn`, inside the caller's transaction.
pub async fn apply_all(
    conn: &mut PgConnection,
    events: &[ReceivedEvent],
) -> Result<(), HandlerError> {
    let mut pending = Pending::default();
    for event in events {
        apply(conn, event, &mut pending).await?;
    }
    pending.flush(conn).await
}

/// Applies one event (any topic analysis reads) to its task's row; what it does to the owner's
/// totals goes to `pending`. Returns whether it changed anything.
pub async fn apply(
    conn: &mut PgConnection,
    event: &ReceivedEvent,
    pending: &mut Pending,
) -> Result<bool, HandlerError> {
    let as_of = AsOf {
        event_at: event.envelope.time,
        topic: event.topic.clone(),
        partition: event.partition,
        offset: event.offset,
    };
    let task_event = match event.envelope.event_type.as_str() {
        TaskCreated::TYPE => TaskEvent::Created(event.data()?),
        TaskUpdated::TYPE => TaskEvent::Updated(event.data()?),
        TaskDeleted::TYPE => TaskEvent::Deleted(event.data()?),
        UserDeleted::TYPE => {
            let deleted: UserDeleted = event.data()?;
            erase_user(conn, &deleted).await?;
            pending.erased_now(deleted.user_id);
            return Ok(true);
        }
        TelemetryBatch::TYPE => {
            let batch: TelemetryBatch = event.data()?;
            if pending.is_erased(conn, batch.user_id).await? {
                return Ok(false);
            }
            pending.add_telemetry(&batch);
            return Ok(true);
        }
        // Registrations, profile changes: nothing analysis keeps.
        _ => return Ok(false),
    };
    apply_task_event(conn, task_event, as_of, pending).await
}

async fn erase_user(conn: &mut PgConnection, deleted: &UserDeleted) -> Result<(), HandlerError> {
    // First: waits for the batches writing about this user to commit (so their rows are erased
    // too) and turns away those that come later.
    erased_users::erase(conn, deleted.user_id, deleted.deleted_at).await?;
    revoked_users::record(
        conn,
        deleted.user_id,
        deleted.deleted_at,
        deleted.tokens_valid_until,
    )
    .await?;
    let rows = storage::erase_user(conn, deleted.user_id).await?;
    tracing::info!(rows, "erased a deleted account's read models");
    Ok(())
}

async fn apply_task_event(
    conn: &mut PgConnection,
    event: TaskEvent,
    as_of: AsOf,
    pending: &mut Pending,
) -> Result<bool, HandlerError> {
    let (task, owner) = match &event {
        TaskEvent::Created(created) => (created.task.id, created.task.owner_id),
        TaskEvent::Updated(updated) => (updated.task.id, updated.task.owner_id),
        TaskEvent::Deleted(deleted) => (deleted.task_id, deleted.owner_id),
    };
    if pending.is_erased(conn, owner).await? {
        return Ok(false);
    }
    // A task seen for the first time gets its row first, so that every later step (and anyone
    // applying the same task at once) works under the row's lock.
    let stored = match storage::lock_task(conn, task).await? {
        Some(stored) => stored,
        None => {
            storage::claim_new_task(conn, task, owner).await?;
            storage::lock_task(conn, task)
                .await?
                .ok_or_else(|| HandlerError::Retryable(format!("task {task} vanished")))?
        }
    };
    let before = stored.model.as_ref();
    let after: Option<TaskModel> = match &event {
        TaskEvent::Created(created) => {
            if stored.version >= created.task.version || stored.deleted {
                return Ok(false);
            }
            Some(TaskModel::from_snapshot(
                &created.task,
                as_of.clone(),
                true,
            )?)
        }
        TaskEvent::Updated(updated) => {
            if stored.version >= updated.task.version || stored.deleted {
                return Ok(false);
            }
            Some(match before {
                Some(model) => {
                    let mut model = model.clone();
                    model.apply_update(&updated.task, as_of.clone())?;
                    model
                }
                // Its creation is no longer on the topic (retention): start from this snapshot.
                None => TaskModel::from_snapshot(&updated.task, as_of.clone(), false)?,
            })
        }
        TaskEvent::Deleted(deleted) => {
            if stored.deleted || stored.version > deleted.last_version {
                return Ok(false);
            }
            None
        }
    };
    let changes = total_changes(
        before.map(TaskModel::contribution),
        after.as_ref().map(TaskModel::contribution),
    );
    match (&event, &after) {
        (_, Some(model)) => storage::save_task(conn, model).await?,
        (TaskEvent::Deleted(deleted), None) => {
            storage::bury_task(conn, task, deleted.last_version + 1).await?
        }
        _ => {}
    }
    pending.add(owner, changes, as_of);
    Ok(true)
}

/// The consumer's handler: applies each event and measures how far behind its time it was.
pub struct ReadModelEvents {
    revoked: Arc<RevokedUsers>,
}

impl ReadModelEvents {
    pub fn new(revoked: Arc<RevokedUsers>) -> Self {
        Self { revoked }
    }
}

impl EventHandler for ReadModelEvents {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a ReceivedEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        self.handle_batch(tx, std::slice::from_ref(event))
    }

    fn handle_batch<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [ReceivedEvent],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            apply_all(tx, events).await?;
            let now = OffsetDateTime::now_utc();
            for event in events {
                if event.envelope.event_type == UserDeleted::TYPE {
                    if let Ok(deleted) = event.data::<UserDeleted>() {
                        self.revoked.note(deleted.user_id);
                    }
                }
                let delay = now - event.envelope.time;
                metrics::histogram!(EVENT_DELAY_METRIC, "type" => short_type(&event.envelope.event_type))
                    .record(Duration::try_from(delay).unwrap_or_default().as_secs_f64());
            }
            Ok(())
        })
    }
}

/// `io.taskstream.tasks.task.updated.v1` → `task.updated`: a bounded label.
fn short_type(event_type: &str) -> &'static str {
    match event_type {
        TaskCreated::TYPE => "task.created",
        TaskUpdated::TYPE => "task.updated",
        TaskDeleted::TYPE => "task.deleted",
        UserDeleted::TYPE => "user.deleted",
        TelemetryBatch::TYPE => "telemetry.batch",
        _ => "other",
    }
}
