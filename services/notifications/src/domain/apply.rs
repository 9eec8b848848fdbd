//! The consumer's side: task events become entries of their owner's feed and set the task's
//! reminders; account events end sockets and erase a deleted account. Runs in the consumer's
//! transaction (which also records the events as processed); the NOTIFY that tells every
//! instance is part of it, so instances hear of exactly the entries that were committed, when
//! they were.

use std::collections::HashMap;
use std::sync::Arc;

use events::catalog::{
    EventPayload, SessionRevoked, TaskCreated, TaskDeleted, TaskUpdated, UserDeleted,
};
use events::consumer::{EventHandler, HandlerError, ReceivedEvent};
use futures_util::future::BoxFuture;
use service_kit::erased_users;
use service_kit::revoked_users::{self, RevokedUsers};
use service_kit::sqlx::PgConnection;
use uuid::Uuid;

use super::feed::{self, Broadcast, CloseOrder, NewChange};
use super::reminders;
use crate::api::to_text;
use crate::storage;
use crate::storage::reminders::ScheduledTask;

/// The `reason` of a task deleted because its owner's account was: the account's feed is erased,
/// not appended to.
const ACCOUNT_DELETED: &str = "account_deleted";

pub struct LiveFeedEvents {
    /// Entries kept per user (the newest).
    max_entries: i64,
    /// Refused at once on this instance when a deletion arrives (the others reload it).
    revoked: Arc<RevokedUsers>,
}

impl LiveFeedEvents {
    pub fn new(max_entries: i64, revoked: Arc<RevokedUsers>) -> Self {
        Self {
            max_entries,
            revoked,
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        events: &[ReceivedEvent],
    ) -> Result<(), HandlerError> {
        let mut changes = Vec::new();
        // Whether each owner met in the batch was erased: looked up (under the owner's erasure
        // lock, held to the end of the transaction) once per owner, not per event.
        let mut erased: HashMap<Uuid, bool> = HashMap::new();
        for event in events {
            if let Some((change, schedule)) = task_effects(event)? {
                let owner = change.user;
                let owner_erased = match erased.get(&owner) {
                    Some(&known) => known,
                    None => {
                        let known = erased_users::guard(conn, owner).await?.is_erased();
                        erased.insert(owner, known);
                        known
                    }
                };
                // An account erased here: its tasks' late events (writes accepted just before
                // its tokens were refused, a partition behind the deletion) leave nothing.
                if !owner_erased {
                    storage::reminders::schedule(conn, &schedule).await?;
                    changes.push(change);
                }
                continue;
            }
            match event.envelope.event_type.as_str() {
                UserDeleted::TYPE => {
                    let deleted: UserDeleted = event.data()?;
                    // Changes of this user earlier in the batch are erased with the rest.
                    changes.retain(|change| change.user != deleted.user_id);
                    self.erase(conn, &deleted).await?;
                    erased.insert(deleted.user_id, true);
                }
                SessionRevoked::TYPE => {
                    let revoked: SessionRevoked = event.data()?;
                    storage::revoke_session(conn, revoked.session_id, revoked.tokens_valid_until)
                        .await?;
                    let order = CloseOrder {
                        user: revoked.user_id,
                        session: Some(revoked.session_id),
                    };
                    storage::notify(conn, &to_text(&Broadcast::Close(order))).await?;
                }
                // Registrations, profile changes: nothing a socket shows.
                _ => {}
            }
        }
        if !changes.is_empty() {
            let appended = storage::append(conn, &changes, self.max_entries).await?;
            for payload in feed::payloads(&appended) {
                storage::notify(conn, &payload).await?;
            }
        }
        Ok(())
    }

    async fn erase(
        &self,
        conn: &mut PgConnection,
        deleted: &UserDeleted,
    ) -> Result<(), HandlerError> {
        // First: waits for the writes about this user under way, and turns away later ones.
        erased_users::erase(conn, deleted.user_id, deleted.deleted_at).await?;
        revoked_users::record(
            conn,
            deleted.user_id,
            deleted.deleted_at,
            deleted.tokens_valid_until,
        )
        .await?;
        let rows = storage::erase_user(conn, deleted.user_id).await?
            + storage::inbox::erase_user(conn, deleted.user_id).await?;
        let order = CloseOrder {
            user: deleted.user_id,
            session: None,
        };
        storage::notify(conn, &to_text(&Broadcast::Close(order))).await?;
        self.revoked.note(deleted.user_id);
        tracing::info!(
            rows,
            "erased a deleted account's feed, inbox, reminders and devices"
        );
        Ok(())
    }
}

/// The feed entry a task event makes and the reminders it asks for, if it is one. A task
/// deleted with its account makes neither: the account's data is erased.
fn task_effects(event: &ReceivedEvent) -> Result<Option<(NewChange, ScheduledTask)>, HandlerError> {
    let at = event.envelope.time;
    let change = |kind, task: &events::catalog::TaskSnapshot| NewChange {
        user: task.owner_id,
        kind,
        id: task.id,
        version: task.version,
        at,
    };
    Ok(Some(match event.envelope.event_type.as_str() {
        TaskCreated::TYPE => {
            let created: TaskCreated = event.data()?;
            (
                change("task.created", &created.task),
                reminders::plan(&created.task),
            )
        }
        TaskUpdated::TYPE => {
            let updated: TaskUpdated = event.data()?;
            (
                change("task.updated", &updated.task),
                reminders::plan(&updated.task),
            )
        }
        TaskDeleted::TYPE => {
            let deleted: TaskDeleted = event.data()?;
            if deleted.reason.as_deref() == Some(ACCOUNT_DELETED) {
                return Ok(None);
            }
            (
                NewChange {
                    user: deleted.owner_id,
                    kind: "task.deleted",
                    id: deleted.task_id,
                    version: deleted.last_version,
                    at,
                },
                reminders::cancelled(deleted.task_id, deleted.owner_id),
            )
        }
        _ => return Ok(None),
    }))
}

impl EventHandler for LiveFeedEvents {
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        event: &'a ReceivedEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.apply(tx, std::slice::from_ref(event)))
    }

    fn handle_batch<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [ReceivedEvent],
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.apply(tx, events))
    }
}
