//! The task operations: create (optionally idempotent), get, change under optimistic
//! concurrency, delete, list, history.

use std::time::Duration;

use futures_util::FutureExt;
use service_kit::db::{Database, Lsn};
use service_kit::housekeeping;
use time::OffsetDateTime;
use uuid::Uuid;

use events::catalog::{TaskCreated, TaskDeleted, TaskUpdated};
use events::outbox::NewEvent;

use super::changes::creation;
use super::{NewTask, Revision, Status, Task, TaskChange, TaskError};
use crate::storage;

/// The CloudEvents `source` of tasks' events.
pub(crate) const EVENT_SOURCE: &str = "/taskstream/tasks";

/// What a change must find to go ahead: any version (`If-Match: *`) or exactly this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    Any,
    Version(i64),
}

impl Precondition {
    fn check(self, current: i64) -> Result<(), TaskError> {
        match self {
            Precondition::Version(expected) if expected != current => {
                Err(TaskError::VersionMismatch { current })
            }
            _ => Ok(()),
        }
    }
}

/// An `Idempotency-Key` and a digest of the request it came with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key: String,
    pub request_hash: [u8; 32],
}

/// A created task; `replayed` when it was created earlier under the same idempotency key.
#[derive(Debug)]
pub struct Created {
    pub task: Task,
    pub replayed: bool,
    /// Where the write is in the WAL (none if it could not be read after the commit).
    pub written_at: Option<Lsn>,
}

/// Which tasks a list shows: filters, page size and where the previous page ended.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub label: Option<String>,
    pub due_before: Option<OffsetDateTime>,
    pub limit: u32,
    /// The last id of the previous page.
    pub after: Option<Uuid>,
}

/// Page queries ask for one row more than a page: it tells whether another page follows.
fn split_page<T>(mut rows: Vec<T>, limit: usize) -> (Vec<T>, bool) {
    let more = rows.len() > limit;
    rows.truncate(limit);
    (rows, more)
}

/// A page of revisions, oldest first.
#[derive(Debug)]
pub struct RevisionPage {
    pub items: Vec<Revision>,
    /// Where the next page starts; `None` on the last page.
    pub next_after: Option<i64>,
}

#[derive(Debug)]
pub struct Page {
    pub items: Vec<Task>,
    /// Where the next page starts; `None` on the last page.
    pub next_after: Option<Uuid>,
}

/// The task operations.
pub struct Tasks {
    db: Database,
}

impl Tasks {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// Creates a task for `owner`. With an idempotency key already used for the same request,
    /// creates nothing and returns the task the first request created.
    ///
    /// The row, its labels, its first revision and its event are one statement; with a key, that
    /// statement runs in a transaction with the key's claim and stored answer.
    pub async fn create(
        &self,
        owner: Uuid,
        new: NewTask,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<Created, TaskError> {
        let now = now_as_stored();
        let task = Task {
            id: Uuid::now_v7(),
            owner_id: owner,
            title: new.title,
            description: new.description,
            status: new.status,
            priority: new.priority,
            due_at: new.due_at,
            labels: new.labels,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        let changes = json(&creation(&task))?;
        let event = NewEvent::new(
            EVENT_SOURCE,
            &TaskCreated {
                task: task.snapshot(),
                actor_id: owner,
            },
        )
        .map_err(|err| TaskError::Corrupt(err.to_string()))?;
        let Some(key) = idempotency else {
            let (task, written_at) = self
                .db
                .write(|conn| {
                    async move {
                        storage::create(conn, &task, &changes, event).await?;
                        Ok::<_, TaskError>(task)
                    }
                    .boxed()
                })
                .await?;
            return Ok(Created {
                task,
                replayed: false,
                written_at,
            });
        };
        let ((task, replayed), written_at) = self
            .db
            .transaction(move |tx| {
                async move {
                    let claimed = storage::claim_idempotency_key(
                        tx,
                        owner,
                        &key.key,
                        &key.request_hash,
                        task.id,
                    )
                    .await?;
                    if !claimed {
                        return replay(tx, owner, &key).await.map(|task| (task, true));
                    }
                    storage::create(tx, &task, &changes, event).await?;
                    storage::store_idempotent_response(tx, owner, &key.key, &json(&task)?).await?;
                    Ok((task, false))
                }
                .boxed()
            })
            .await?;
        Ok(Created {
            task,
            replayed,
            written_at,
        })
    }

    /// `owner`'s task `id`, reflecting every write up to `read_after`.
    pub async fn get(
        &self,
        owner: Uuid,
        id: Uuid,
        read_after: Option<Lsn>,
    ) -> Result<Task, TaskError> {
        let row = self
            .db
            .find_on_replica_or_primary(read_after, |mut conn| async move {
                storage::find(&mut conn, owner, id).await
            })
            .await?
            .ok_or(TaskError::NotFound(id))?;
        Task::try_from(row)
    }

    /// Applies `change` if the task is at the version `expected` names. A change that changes
    /// nothing writes nothing and keeps the version.
    ///
    /// Optimistic: the task is read, the change decided against it, and written (row, labels,
    /// revision, event in one statement) only if the task is still at the version read. If
    /// another change came first, it is decided again against what that one left, so
    /// concurrent changes apply one after the other, as under a lock, without holding one.
    pub async fn update(
        &self,
        owner: Uuid,
        id: Uuid,
        expected: Precondition,
        change: TaskChange,
    ) -> Result<(Task, Option<Lsn>), TaskError> {
        self.db
            .write(move |conn| {
                async move {
                    for _ in 0..MAX_ATTEMPTS {
                        let current = find_checked(conn, owner, id, expected).await?;
                        let (mut next, changes) = change.apply(&current);
                        if changes.is_empty() {
                            return Ok(current);
                        }
                        next.version = current.version + 1;
                        next.updated_at = now_as_stored();
                        let labels_changed = changes.contains_key("labels");
                        let revision = json(&changes)?;
                        let event = NewEvent::new(
                            EVENT_SOURCE,
                            &TaskUpdated {
                                task: next.snapshot(),
                                changes: changes
                                    .into_iter()
                                    .map(|(field, change)| (field.to_owned(), change))
                                    .collect(),
                                actor_id: owner,
                            },
                        )
                        .map_err(|err| TaskError::Corrupt(err.to_string()))?;
                        if storage::update_if_current(conn, &next, labels_changed, &revision, event)
                            .await?
                        {
                            return Ok(next);
                        }
                    }
                    Err(TaskError::Contended)
                }
                .boxed()
            })
            .await
    }

    /// Deletes the task if it is at the version `expected` names; its history stays.
    pub async fn delete(
        &self,
        owner: Uuid,
        id: Uuid,
        expected: Precondition,
    ) -> Result<Option<Lsn>, TaskError> {
        let ((), written_at) = self
            .db
            .write(move |conn| {
                async move {
                    for attempt in 0..MAX_ATTEMPTS {
                        // With a version to match, that version is the one to delete: no read.
                        let version = match expected {
                            Precondition::Version(version) if attempt == 0 => version,
                            _ => find_checked(conn, owner, id, expected).await?.version,
                        };
                        let event = NewEvent::new(
                            EVENT_SOURCE,
                            &TaskDeleted {
                                task_id: id,
                                owner_id: owner,
                                last_version: version,
                                actor_id: owner,
                                reason: None,
                            },
                        )
                        .map_err(|err| TaskError::Corrupt(err.to_string()))?;
                        if storage::delete_if_current(conn, owner, id, version, event).await? {
                            return Ok(());
                        }
                    }
                    Err(TaskError::Contended)
                }
                .boxed()
            })
            .await?;
        Ok(written_at)
    }

    /// A page of `owner`'s tasks, newest first.
    pub async fn list(
        &self,
        owner: Uuid,
        query: ListQuery,
        read_after: Option<Lsn>,
    ) -> Result<Page, TaskError> {
        let limit = query.limit as usize;
        let rows = self
            .db
            .replica_or_primary_after(read_after, |mut conn| {
                let query = query.clone();
                async move { storage::list(&mut conn, owner, &query).await }
            })
            .await?;
        let tasks = rows
            .into_iter()
            .map(Task::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let (items, more) = split_page(tasks, limit);
        let next_after = more.then(|| items.last().map(|task| task.id)).flatten();
        Ok(Page { items, next_after })
    }

    /// A page of `owner`'s task's revisions after `after_version`, oldest first. A task that
    /// never existed (for this owner) is not found; a deleted one still has its history.
    pub async fn revisions(
        &self,
        owner: Uuid,
        id: Uuid,
        after_version: i64,
        limit: u32,
        read_after: Option<Lsn>,
    ) -> Result<RevisionPage, TaskError> {
        // One more for "is there a next page", and one for the creation, which comes along
        // past the first page as the proof of ownership.
        let proof = i64::from(after_version > 0);
        let rows = self
            .db
            .find_on_replica_or_primary(read_after, |mut conn| async move {
                let rows = storage::revisions(
                    &mut conn,
                    owner,
                    id,
                    after_version,
                    i64::from(limit) + 1 + proof,
                )
                .await?;
                // Nothing at all: not this user's task (or not replicated yet).
                Ok((!rows.is_empty()).then_some(rows))
            })
            .await?
            .ok_or(TaskError::NotFound(id))?;
        let revisions = rows
            .into_iter()
            .filter(|row| row.version > after_version)
            .map(Revision::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let (items, more) = split_page(revisions, limit as usize);
        let next_after = more
            .then(|| items.last().map(|revision| revision.version))
            .flatten();
        Ok(RevisionPage { items, next_after })
    }

    /// Forgets day-old idempotency keys every `interval`, for the life of the process
    /// (housekeeping: in batches, one instance at a time).
    pub fn spawn_housekeeping(&self, interval: Duration) {
        housekeeping::spawn(
            self.db.clone(),
            "idempotency keys",
            interval,
            storage::housekeeping_sweeps(),
        );
    }
}

/// Attempts at a change before giving up: each failed one means another change to the task
/// got in first.
const MAX_ATTEMPTS: usize = 16;

/// `owner`'s task `id` as the primary has it now, checked against `expected`.
async fn find_checked(
    conn: &mut service_kit::sqlx::PgConnection,
    owner: Uuid,
    id: Uuid,
    expected: Precondition,
) -> Result<Task, TaskError> {
    let current = storage::find(conn, owner, id)
        .await?
        .ok_or(TaskError::NotFound(id))?;
    let current = Task::try_from(current)?;
    expected.check(current.version)?;
    Ok(current)
}

/// Now, at the precision PostgreSQL stores (microseconds): the instant written is the instant
/// answered and carried by the event.
fn now_as_stored() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

/// The task stored under an idempotency key, if the request is the same as the first.
async fn replay(
    tx: &mut service_kit::sqlx::PgConnection,
    owner: Uuid,
    key: &IdempotencyKey,
) -> Result<Task, TaskError> {
    let (hash, response) = storage::idempotency_record(tx, owner, &key.key)
        .await?
        .ok_or_else(|| TaskError::Corrupt("claimed idempotency key vanished".into()))?;
    if hash != key.request_hash {
        return Err(TaskError::IdempotencyKeyReused);
    }
    let response =
        response.ok_or_else(|| TaskError::Corrupt("idempotency key without answer".into()))?;
    serde_json::from_value(response).map_err(|err| TaskError::Corrupt(err.to_string()))
}

fn json(value: &impl serde::Serialize) -> Result<serde_json::Value, TaskError> {
    serde_json::to_value(value).map_err(|err| TaskError::Corrupt(err.to_string()))
}
