//! The inbox: how a reminder that came due becomes a notification (in the inbox, on the live
//! feed, on `notifications.notification.v1`, and queued for the user's devices), and what a
//! user does with their notifications.

use std::collections::{HashMap, HashSet};

use events::catalog::NotificationCreated;
use events::outbox;
use futures_util::FutureExt;
use service_kit::db::{Database, DbError};
use service_kit::erased_users;
use service_kit::sqlx::{self, PgConnection};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use super::feed::{self, NewChange};
use super::preferences::{Delivery, Kind, Preferences};
use crate::storage;
use crate::storage::inbox::{NewNotification, NotificationRow};
use crate::storage::push::NewDelivery;
use crate::storage::reminders::DueReminder;

/// The live frame's `type` for a new notification.
pub const LIVE_KIND: &str = "notification.created";
/// The events' `source`.
const SOURCE: &str = "/taskstream/notifications";

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("no notification {0} in your inbox")]
    NotFound(Uuid),
    #[error(transparent)]
    AccountErased(#[from] erased_users::AccountErased),
    #[error(transparent)]
    Database(#[from] DbError),
}

impl From<sqlx::Error> for InboxError {
    fn from(err: sqlx::Error) -> Self {
        InboxError::Database(err.into())
    }
}

/// What firing a batch of reminders produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fired {
    pub notifications: usize,
    pub pushes: u64,
}

/// Turns reminders that came due into notifications, in the caller's transaction (the one that
/// marked them fired): inbox rows, one event each through the outbox, live frames on the owner's
/// feed, and a push row per device where the user wants push (held until quiet hours end).
/// A "due soon" whose due date already passed gives nothing: "overdue" says it.
pub async fn fire(
    conn: &mut PgConnection,
    due: &[DueReminder],
    push_enabled: bool,
    feed_max_entries: i64,
) -> Result<Fired, sqlx::Error> {
    let now = OffsetDateTime::now_utc();
    let mut users: Vec<Uuid> = due.iter().map(|reminder| reminder.user_id).collect();
    users.sort_unstable();
    users.dedup();
    // Accounts erased (or being erased) fire nothing: their reminders are deleted with them.
    let mut erased = HashSet::new();
    for &user in &users {
        if erased_users::try_guard(conn, user).await?.is_erased() {
            erased.insert(user);
        }
    }
    users.retain(|user| !erased.contains(user));
    let preferences: HashMap<Uuid, Preferences> = storage::inbox::preferences_of(conn, &users)
        .await?
        .into_iter()
        .map(|(user, row)| (user, Preferences::from_row(&row)))
        .collect();
    let defaults = Preferences::default();
    let mut notifications = Vec::new();
    let mut events = Vec::new();
    let mut changes = Vec::new();
    let mut pushes = Vec::new();
    for reminder in due {
        let Some(kind) = Kind::parse(&reminder.kind) else {
            continue;
        };
        if erased.contains(&reminder.user_id) {
            continue;
        }
        if kind == Kind::DueSoon && reminder.due_at <= now {
            continue;
        }
        let wants = preferences.get(&reminder.user_id).unwrap_or(&defaults);
        let delivery = wants.delivery(kind);
        if delivery == Delivery::Off {
            continue;
        }
        let notification = describe(reminder, kind, now);
        if delivery == Delivery::Push && push_enabled {
            pushes.push(NewDelivery {
                notification_id: notification.id,
                user_id: notification.user_id,
                urgency: kind.urgency(),
                release_at: wants.push_release(now),
            });
        }
        events.push(NotificationCreated {
            notification_id: notification.id,
            user_id: notification.user_id,
            kind: kind.as_str().to_owned(),
            task_id: notification.task_id,
            title: notification.title.clone(),
            body: notification.body.clone(),
            delivery: delivery.as_str().to_owned(),
            created_at: now,
        });
        changes.push(NewChange {
            user: notification.user_id,
            kind: LIVE_KIND,
            id: notification.id,
            version: 1,
            at: now,
        });
        notifications.push(notification);
    }
    if notifications.is_empty() {
        return Ok(Fired::default());
    }
    storage::inbox::insert(conn, &notifications).await?;
    outbox::enqueue_all(conn, SOURCE, &events).await?;
    let appended = storage::append(conn, &changes, feed_max_entries).await?;
    for payload in feed::payloads(&appended) {
        storage::notify(conn, &payload).await?;
    }
    let pushes = storage::push::enqueue(conn, &pushes).await?;
    Ok(Fired {
        notifications: notifications.len(),
        pushes,
    })
}

/// The notification a reminder makes: its title is what a device shows.
fn describe(reminder: &DueReminder, kind: Kind, now: OffsetDateTime) -> NewNotification {
    let due = reminder
        .due_at
        .format(&Rfc3339)
        .unwrap_or_else(|_| reminder.due_at.to_string());
    let (title, body) = match kind {
        Kind::DueSoon => (
            format!("Due soon: {}", reminder.title),
            format!("Due at {due}"),
        ),
        Kind::Overdue => (
            format!("Overdue: {}", reminder.title),
            format!("Was due at {due}"),
        ),
    };
    NewNotification {
        id: Uuid::now_v7(),
        user_id: reminder.user_id,
        kind: kind.as_str(),
        task_id: Some(reminder.task_id),
        title,
        body,
        created_at: now,
    }
}

/// One page of an inbox.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<NotificationRow>,
    /// The cursor of the next (older) page, if there may be one.
    pub next: Option<Uuid>,
    pub unread: i64,
}

/// What users do with their notifications. Reads of the inbox go to the primary: it is small
/// per user, and a client that just marked everything read must see it at once on any device.
pub struct Inbox {
    db: Database,
}

impl Inbox {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn page(
        &self,
        user: Uuid,
        before: Option<Uuid>,
        unread_only: bool,
        limit: i64,
    ) -> Result<Page, InboxError> {
        let (items, unread) = self
            .db
            .primary(|mut conn| async move {
                let items =
                    storage::inbox::page(&mut conn, user, before, unread_only, limit + 1).await?;
                let unread = storage::inbox::unread_count(&mut conn, user).await?;
                Ok((items, unread))
            })
            .await?;
        let mut items = items;
        let next = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|last| last.id)
        } else {
            None
        };
        Ok(Page {
            items,
            next,
            unread,
        })
    }

    pub async fn unread(&self, user: Uuid) -> Result<i64, InboxError> {
        Ok(self
            .db
            .primary(|mut conn| async move { storage::inbox::unread_count(&mut conn, user).await })
            .await?)
    }

    /// Marks one read; answers the unread count after it.
    pub async fn mark_read(&self, user: Uuid, id: Uuid) -> Result<i64, InboxError> {
        let found = self
            .db
            .primary(|mut conn| async move {
                if !storage::inbox::mark_read(&mut conn, user, id).await? {
                    return Ok(None);
                }
                storage::inbox::unread_count(&mut conn, user)
                    .await
                    .map(Some)
            })
            .await?;
        found.ok_or(InboxError::NotFound(id))
    }

    /// Everything read: one write; answers the unread count after it (0 unless a notification
    /// arrived meanwhile).
    pub async fn mark_all_read(&self, user: Uuid) -> Result<i64, InboxError> {
        let (unread, _) = self
            .db
            .transaction(|tx| {
                async move {
                    // The watermark is a row of the user's: none may outlive an erasure.
                    if erased_users::guard(tx, user).await?.is_erased() {
                        return Err(erased_users::AccountErased.into());
                    }
                    storage::inbox::mark_all_read(tx, user).await?;
                    Ok::<_, InboxError>(storage::inbox::unread_count(tx, user).await?)
                }
                .boxed()
            })
            .await?;
        Ok(unread)
    }

    pub async fn delete(&self, user: Uuid, id: Uuid) -> Result<(), InboxError> {
        let deleted = self
            .db
            .primary(|mut conn| async move { storage::inbox::delete(&mut conn, user, id).await })
            .await?;
        if deleted {
            Ok(())
        } else {
            Err(InboxError::NotFound(id))
        }
    }
}
