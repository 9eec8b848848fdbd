//! Applying a change to a task, and recording what it changed: each field that really changed,
//! with its old and new value, as its revision stores them.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{Priority, Status, Task};

/// Fields to change: `None` leaves a field as it is; `Some(None)` clears a field that may be empty.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskChange {
    pub title: Option<String>,
    pub description: Option<Option<String>>,
    pub status: Option<Status>,
    pub priority: Option<Priority>,
    pub due_at: Option<Option<OffsetDateTime>>,
    pub labels: Option<Vec<String>>,
}

/// One field's old and new value: the event catalog's type, so revisions and events agree.
pub use events::catalog::FieldChange;

/// Changed fields by name.
pub type Changes = BTreeMap<&'static str, FieldChange>;

impl TaskChange {
    /// `task` with the change applied, and the fields that actually changed (setting a field to
    /// the value it has is not a change).
    pub fn apply(&self, task: &Task) -> (Task, Changes) {
        let mut next = task.clone();
        let mut changes = Changes::new();
        record(&mut changes, "title", &mut next.title, &self.title, |v| {
            json!(v)
        });
        record(
            &mut changes,
            "description",
            &mut next.description,
            &self.description,
            |v| json!(v),
        );
        record(
            &mut changes,
            "status",
            &mut next.status,
            &self.status,
            |v| json!(v),
        );
        record(
            &mut changes,
            "priority",
            &mut next.priority,
            &self.priority,
            |v| json!(v),
        );
        record(
            &mut changes,
            "due_at",
            &mut next.due_at,
            &self.due_at,
            |v| timestamp(*v),
        );
        record(
            &mut changes,
            "labels",
            &mut next.labels,
            &self.labels,
            |v| json!(v),
        );
        (next, changes)
    }
}

/// What a new task's first revision records: every field, from nothing.
pub fn creation(task: &Task) -> Changes {
    let from_nothing = |to: Value| FieldChange {
        from: Value::Null,
        to,
    };
    Changes::from([
        ("title", from_nothing(json!(task.title))),
        ("description", from_nothing(json!(task.description))),
        ("status", from_nothing(json!(task.status))),
        ("priority", from_nothing(json!(task.priority))),
        ("due_at", from_nothing(timestamp(task.due_at))),
        ("labels", from_nothing(json!(task.labels))),
    ])
}

fn record<T: PartialEq + Clone>(
    changes: &mut Changes,
    field: &'static str,
    current: &mut T,
    wanted: &Option<T>,
    to_json: impl Fn(&T) -> Value,
) {
    if let Some(wanted) = wanted {
        if current != wanted {
            changes.insert(
                field,
                FieldChange {
                    from: to_json(current),
                    to: to_json(wanted),
                },
            );
            *current = wanted.clone();
        }
    }
}

fn timestamp(at: Option<OffsetDateTime>) -> Value {
    at.and_then(|at| at.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn task() -> Task {
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        Task {
            id: Uuid::nil(),
            owner_id: Uuid::nil(),
            title: "Write report".into(),
            description: Some("draft".into()),
            status: Status::Todo,
            priority: Priority::Medium,
            due_at: Some(at),
            labels: vec!["work".into()],
            version: 3,
            created_at: at,
            updated_at: at,
        }
    }

    #[test]
    fn records_only_fields_that_really_change() {
        let change = TaskChange {
            title: Some("Write report".into()), // same as before: not a change
            status: Some(Status::Done),
            description: Some(None),
            due_at: Some(None),
            ..TaskChange::default()
        };
        let (next, changes) = change.apply(&task());
        assert_eq!(next.status, Status::Done);
        assert_eq!(next.description, None);
        assert_eq!(
            changes.keys().copied().collect::<Vec<_>>(),
            ["description", "due_at", "status"]
        );
        assert_eq!(
            changes["status"],
            FieldChange {
                from: json!("todo"),
                to: json!("done")
            }
        );
        assert_eq!(changes["due_at"].from, json!("2027-01-15T08:00:00Z"));
        assert_eq!(changes["due_at"].to, Value::Null);
    }

    #[test]
    fn an_empty_change_changes_nothing() {
        let (next, changes) = TaskChange::default().apply(&task());
        assert_eq!(next, task());
        assert!(changes.is_empty());
    }

    #[test]
    fn creation_records_every_field() {
        let changes = creation(&task());
        assert_eq!(changes.len(), 6);
        assert!(changes.values().all(|c| c.from.is_null()));
        assert_eq!(changes["labels"].to, json!(["work"]));
    }
}
