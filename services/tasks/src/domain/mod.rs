//! The tasks domain, free of HTTP: what a task is, the rules its fields follow, how a change is
//! applied and recorded, and [`Tasks`], the operations handlers call.

pub mod changes;
pub mod erasure;
pub mod rules;
pub mod tasks;

use serde::{Deserialize, Serialize};
use service_kit::db::DbError;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

pub use changes::{FieldChange, TaskChange};
pub use tasks::{Created, ListQuery, Page, Precondition, Tasks};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Todo,
    InProgress,
    Blocked,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    Medium,
    High,
    Urgent,
}

macro_rules! text_enum {
    ($type:ty { $($variant:ident = $text:literal),+ }) => {
        impl $type {
            /// The stored (and wire) spelling.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some(Self::$variant),)+ _ => None }
            }
        }
    };
}

text_enum!(Status { Todo = "todo", InProgress = "in_progress", Blocked = "blocked", Done = "done" });
text_enum!(Priority { Low = "low", Medium = "medium", High = "high", Urgent = "urgent" });

/// A task as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub title: String,
    pub description: Option<String>,
    pub status: Status,
    pub priority: Priority,
    #[serde(with = "time::serde::rfc3339::option")]
    pub due_at: Option<OffsetDateTime>,
    pub labels: Vec<String>,
    pub version: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl Task {
    /// The task as its events carry it.
    pub fn snapshot(&self) -> events::catalog::TaskSnapshot {
        events::catalog::TaskSnapshot {
            id: self.id,
            owner_id: self.owner_id,
            title: self.title.clone(),
            description: self.description.clone(),
            status: self.status.as_str().to_owned(),
            priority: self.priority.as_str().to_owned(),
            due_at: self.due_at,
            labels: self.labels.clone(),
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

/// Input for a new task, already checked against the rules.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub title: String,
    pub description: Option<String>,
    pub status: Status,
    pub priority: Priority,
    pub due_at: Option<OffsetDateTime>,
    pub labels: Vec<String>,
}

/// One entry of a task's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RevisionKind {
    Created,
    Updated,
    Deleted,
}

text_enum!(RevisionKind { Created = "created", Updated = "updated", Deleted = "deleted" });

#[derive(Debug, Clone)]
pub struct Revision {
    pub version: i64,
    pub kind: RevisionKind,
    pub actor_id: Uuid,
    pub changed_at: OffsetDateTime,
    pub changes: serde_json::Value,
}

/// Why a task operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// Absent, deleted, or another user's: the answer is the same.
    #[error("no task {0}")]
    NotFound(Uuid),
    #[error("the task is at version {current}, not the version given in If-Match")]
    VersionMismatch { current: i64 },
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyKeyReused,
    /// Other changes to the task kept getting in first (`If-Match: *` under heavy contention).
    #[error("the task is changing too fast to apply this change; try again")]
    Contended,
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
}

impl From<service_kit::sqlx::Error> for TaskError {
    fn from(err: service_kit::sqlx::Error) -> Self {
        TaskError::Database(err.into())
    }
}
