//! The JSON bodies and query strings of the tasks API, with their validation rules and OpenAPI
//! schemas.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use service_kit::input::{Text, Timestamp};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use validator::Validate;

use crate::domain::rules::{self, DESCRIPTION, LABEL, LABELS_MAX, PAGE_MAX, TITLE};
use crate::domain::{Page, Priority, Revision, RevisionKind, Status, Task};

#[derive(Deserialize, Serialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTask {
    #[validate(custom(function = rules::title))]
    #[schema(schema_with = title_schema)]
    pub title: Text,
    #[validate(custom(function = rules::description))]
    #[schema(schema_with = nullable_description_schema)]
    pub description: Option<Text>,
    /// Default `todo`.
    pub status: Option<Status>,
    /// Default `medium`.
    pub priority: Option<Priority>,
    /// RFC 3339, from year 1 to 9999 in UTC.
    pub due_at: Option<Timestamp>,
    #[validate(length(max = LABELS_MAX), custom(function = rules::labels))]
    #[schema(schema_with = nullable_labels_schema)]
    pub labels: Option<Vec<Text>>,
}

/// Fields to change; a field left out stays as it is, `null` clears `description` or `due_at`.
#[derive(Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchTask {
    #[serde(default, deserialize_with = "service_kit::input::non_null")]
    #[validate(custom(function = rules::title))]
    #[schema(schema_with = title_schema)]
    pub title: Option<Text>,
    #[serde(default, deserialize_with = "service_kit::input::nullable")]
    #[validate(custom(function = rules::description))]
    #[schema(schema_with = nullable_description_schema)]
    pub description: Option<Option<Text>>,
    #[serde(default, deserialize_with = "service_kit::input::non_null")]
    #[schema(nullable = false)]
    pub status: Option<Status>,
    #[serde(default, deserialize_with = "service_kit::input::non_null")]
    #[schema(nullable = false)]
    pub priority: Option<Priority>,
    #[serde(default, deserialize_with = "service_kit::input::nullable")]
    #[schema(value_type = Option<Timestamp>, nullable)]
    pub due_at: Option<Option<Timestamp>>,
    #[serde(default, deserialize_with = "service_kit::input::non_null")]
    #[validate(length(max = LABELS_MAX), custom(function = rules::labels))]
    #[schema(schema_with = labels_schema)]
    pub labels: Option<Vec<Text>>,
}

fn title_schema() -> utoipa::openapi::Object {
    TITLE.schema("1–200 characters, not blank, no control characters.")
}

fn nullable_description_schema() -> utoipa::openapi::Object {
    DESCRIPTION.nullable_schema("At most 10,240 characters; `null` clears it.")
}

fn labels_schema() -> utoipa::openapi::Array {
    labels_schema_builder().build()
}

fn nullable_labels_schema() -> utoipa::openapi::Array {
    labels_schema_builder()
        .schema_type(utoipa::openapi::schema::SchemaType::from_iter([
            utoipa::openapi::Type::Array,
            utoipa::openapi::Type::Null,
        ]))
        .build()
}

fn labels_schema_builder() -> utoipa::openapi::schema::ArrayBuilder {
    utoipa::openapi::ArrayBuilder::new()
        .items(LABEL.schema("1–40 characters without spaces, commas or control characters."))
        .max_items(Some(LABELS_MAX as usize))
        .description(Some(
            "Up to 20 labels; case-insensitive, duplicates dropped.",
        ))
        .examples([serde_json::json!(["work", "q3"])])
}

fn label_filter_schema() -> utoipa::openapi::Object {
    LABEL.schema("Only tasks with this label (case-insensitive).")
}

#[derive(Serialize, ToSchema)]
pub struct TaskView {
    pub id: Uuid,
    pub title: String,
    pub description: Option<String>,
    pub status: Status,
    pub priority: Priority,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub due_at: Option<OffsetDateTime>,
    pub labels: Vec<String>,
    /// Starts at 1, grows by one with every change; also the `ETag`.
    pub version: i64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
}

impl From<Task> for TaskView {
    fn from(task: Task) -> Self {
        Self {
            id: task.id,
            title: task.title,
            description: task.description,
            status: task.status,
            priority: task.priority,
            due_at: task.due_at,
            labels: task.labels,
            version: task.version,
            created_at: task.created_at,
            updated_at: task.updated_at,
        }
    }
}

/// Filters and paging of `GET /v1/tasks`.
#[derive(Deserialize, Validate, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only tasks in this status.
    pub status: Option<Status>,
    #[validate(custom(function = rules::label))]
    #[param(schema_with = label_filter_schema)]
    pub label: Option<Text>,
    /// Only tasks due before this instant (RFC 3339).
    #[param(value_type = Option<Timestamp>)]
    pub due_before: Option<Timestamp>,
    /// Page size, 1–200 (default 50).
    #[validate(range(min = 1, max = PAGE_MAX))]
    #[serde(default, deserialize_with = "service_kit::input::query_whole")]
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-z0-9_-]{21}[AQgw]$")]
    pub cursor: Option<String>,
}

/// Paging of `GET /v1/tasks/{id}/revisions`.
#[derive(Deserialize, Validate, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RevisionParams {
    /// Page size, 1–500 (default 100).
    #[validate(range(min = 1, max = 500))]
    #[serde(default, deserialize_with = "service_kit::input::query_whole")]
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[A-Za-f][A-Za-z0-9_-]{9}[AEIMQUYcgkosw048]$")]
    pub cursor: Option<String>,
}

/// A page of tasks, newest first.
#[derive(Serialize, ToSchema)]
pub struct TaskPage {
    pub items: Vec<TaskView>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

impl From<Page> for TaskPage {
    fn from(page: Page) -> Self {
        Self {
            items: page.items.into_iter().map(TaskView::from).collect(),
            next_cursor: page.next_after.map(encode_task_cursor),
        }
    }
}

/// One change in a task's history.
#[derive(Serialize, ToSchema)]
pub struct RevisionView {
    /// The task's version this change produced (a deletion's is one past the last version).
    pub version: i64,
    pub kind: RevisionKind,
    /// Who made the change.
    pub actor_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub changed_at: OffsetDateTime,
    /// Each changed field with its old and new value: `{"status": {"from": "todo", "to": "done"}}`.
    #[schema(value_type = Object)]
    pub changes: serde_json::Value,
}

impl From<Revision> for RevisionView {
    fn from(revision: Revision) -> Self {
        Self {
            version: revision.version,
            kind: revision.kind,
            actor_id: revision.actor_id,
            changed_at: revision.changed_at,
            changes: revision.changes,
        }
    }
}

/// A page of revisions, oldest first.
#[derive(Serialize, ToSchema)]
pub struct RevisionPage {
    pub items: Vec<RevisionView>,
    pub next_cursor: Option<String>,
}

/// Cursors are opaque to clients: the last task id of a page, base64url (22 characters; the
/// documents' patterns say which strings decode).
pub fn encode_task_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

pub fn decode_task_cursor(cursor: &str) -> Option<Uuid> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    Uuid::from_slice(&bytes).ok()
}

/// Revision cursors: the last version of a page, base64url (11 characters); 0 is the start.
pub fn encode_revision_cursor(version: i64) -> String {
    URL_SAFE_NO_PAD.encode(version.to_be_bytes())
}

pub fn decode_revision_cursor(cursor: &str) -> Option<i64> {
    let bytes: [u8; 8] = URL_SAFE_NO_PAD.decode(cursor).ok()?.try_into().ok()?;
    Some(i64::from_be_bytes(bytes)).filter(|version| *version >= 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let id = Uuid::now_v7();
        assert_eq!(decode_task_cursor(&encode_task_cursor(id)), Some(id));
        assert_eq!(
            decode_revision_cursor(&encode_revision_cursor(42)),
            Some(42)
        );
        for bad in ["", "!!", "AAAA", "not a cursor"] {
            assert_eq!(decode_task_cursor(bad), None, "{bad:?}");
            assert_eq!(decode_revision_cursor(bad), None, "{bad:?}");
        }
    }
}
