//! The event catalog: the public, versioned contract product teams consume.
//!
//! Topics are named `<owner>.<aggregate>.v<major>`; the message key is the aggregate's id, so all
//! events of one user (or task) are in one partition, in order. Each event type is a payload
//! struct here; its JSON Schema is generated from the struct, and [`asyncapi`] assembles the
//! AsyncAPI 3 document kept at `libs/events/asyncapi.json` (a test fails when they differ; `cargo
//! xtask catalog` rewrites it). A breaking change to a payload means a new type and topic version.

use std::collections::BTreeMap;

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;

/// A topic of the catalog.
#[derive(Debug, Clone, Copy)]
pub struct Topic {
    pub name: &'static str,
    /// The service that publishes on it.
    pub owner: &'static str,
    /// What the message key is.
    pub key: &'static str,
    pub description: &'static str,
    /// Who reads it: each consumer group and what it does with the events.
    pub consumers: &'static [&'static str],
}

pub const AUTH_USER: Topic = Topic {
    name: "auth.user.v1",
    owner: "auth",
    key: "the user id (UUID)",
    description: "Accounts: registered, changed and deleted; and their sessions as they end (logout, or a reused refresh token). All events of one user are in order.",
    consumers: &[
        "tasks (refuses a deleted account's tokens, erases its tasks)",
        "analysis (refuses a deleted account's tokens, erases its read models)",
        "notifications (closes the live sockets of ended sessions and deleted accounts)",
    ],
};

pub const TASKS_TASK: Topic = Topic {
    name: "tasks.task.v1",
    owner: "tasks",
    key: "the task id (UUID)",
    description: "Tasks: created, changed, deleted. All events of one task are in order.",
    consumers: &[
        "analysis (builds the per-task and per-user read models)",
        "notifications (live updates to the owner's devices)",
    ],
};

pub const NOTIFICATIONS_NOTIFICATION: Topic = Topic {
    name: "notifications.notification.v1",
    owner: "notifications",
    key: "the user id (UUID)",
    description: "Notifications as they are created (a task's reminder came due), one event each, whether or not the user gets it pushed. All events of one user are in order.",
    consumers: &[],
};

pub const ANALYSIS_TELEMETRY: Topic = Topic {
    name: "analysis.telemetry.v1",
    owner: "analysis",
    key: "the user id (UUID)",
    description: "Client telemetry, one message per batch accepted by `POST /v1/telemetry` (the answer was 202 only once the broker had it). The message id (`ce_id`) is the batch id.",
    consumers: &["analysis (folds them into per-user, per-day, per-name counts)"],
};

/// Every topic, each with its dead-letter topic beside it.
pub const TOPICS: [Topic; 4] = [
    AUTH_USER,
    TASKS_TASK,
    NOTIFICATIONS_NOTIFICATION,
    ANALYSIS_TELEMETRY,
];

/// Where messages of `topic` that cannot be processed go, with the reason in their headers.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// The catalog's topics with `partitions` each, and their dead-letter topics (one partition), as
/// the local stack and the tests create them; in a cluster Strimzi's KafkaTopic resources do it.
pub fn topics_to_create(partitions: i32) -> Vec<(String, i32)> {
    TOPICS
        .iter()
        .flat_map(|topic| {
            [
                (topic.name.to_owned(), partitions),
                (dead_letter_topic(topic.name), 1),
            ]
        })
        .collect()
}

/// A payload of the catalog: its CloudEvents type, its topic, and the aggregate it is about.
pub trait EventPayload: Serialize + JsonSchema {
    /// The CloudEvents `type`, e.g. `io.taskstream.tasks.task.created.v1`.
    const TYPE: &'static str;
    const TOPIC: Topic;
    /// The AsyncAPI message name.
    const MESSAGE: &'static str;
    const SUMMARY: &'static str;
    /// The aggregate's id: the message key and the CloudEvents `subject`.
    fn aggregate_id(&self) -> Uuid;
}

/// A new account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserRegistered {
    pub user_id: Uuid,
    /// Lower-cased, unique.
    pub username: String,
    pub nickname: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub registered_at: OffsetDateTime,
}

/// An account's profile as it is after a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserUpdated {
    pub user_id: Uuid,
    pub nickname: Option<String>,
    pub avatar_url: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub updated_at: OffsetDateTime,
}

/// An account was deleted at its owner's request: every service erases what it holds of the
/// user, and refuses the user's access tokens (issued before `deleted_at`) at once, although
/// they would stay valid until `tokens_valid_until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserDeleted {
    pub user_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub deleted_at: OffsetDateTime,
    /// When the last access token issued to the user expires: a refusal list can forget the
    /// user after that.
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub tokens_valid_until: OffsetDateTime,
}

/// A session (one login, with every refresh since: the `sid` of its access tokens) ended: its
/// refresh tokens are dead, and whatever it holds open (live sockets) should close. Its access
/// tokens stay valid by signature until `tokens_valid_until`; a service that must refuse them
/// earlier can refuse the `sid` until then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionRevoked {
    pub user_id: Uuid,
    /// The session's id, the `sid` claim of its access tokens.
    pub session_id: Uuid,
    /// `logout` (its owner ended it) or `reuse` (a rotated refresh token of it was presented
    /// again, so someone else may hold one).
    #[schemars(extend("enum" = ["logout", "reuse"]))]
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub revoked_at: OffsetDateTime,
    /// When the last access token issued in the session expires (its lifetime plus the
    /// verifiers' clock leeway after `revoked_at`): a refusal list can forget the session after
    /// that.
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub tokens_valid_until: OffsetDateTime,
}

/// A task as it is after the change the event reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TaskSnapshot {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub title: String,
    pub description: Option<String>,
    #[schemars(extend("enum" = ["todo", "in_progress", "blocked", "done"]))]
    pub status: String,
    #[schemars(extend("enum" = ["low", "medium", "high", "urgent"]))]
    pub priority: String,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub due_at: Option<OffsetDateTime>,
    pub labels: Vec<String>,
    /// The task's version after this change (1 on creation).
    pub version: i64,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub updated_at: OffsetDateTime,
}

/// A field's value before and after a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FieldChange {
    pub from: Value,
    pub to: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TaskCreated {
    pub task: TaskSnapshot,
    /// Who created it.
    pub actor_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TaskUpdated {
    pub task: TaskSnapshot,
    /// Only the fields that changed.
    pub changes: BTreeMap<String, FieldChange>,
    pub actor_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TaskDeleted {
    pub task_id: Uuid,
    pub owner_id: Uuid,
    /// The version the task had when it was deleted.
    pub last_version: i64,
    pub actor_id: Uuid,
    /// Why, when it was not the owner deleting the task: `account_deleted` when the owner's
    /// account was erased (every task of the account gets its own event, so each follows the
    /// task's earlier events in its partition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["account_deleted"]))]
    pub reason: Option<String>,
}

/// A notification was put in a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NotificationCreated {
    pub notification_id: Uuid,
    pub user_id: Uuid,
    /// What it is about: `task.due_soon` (the task is due within the user's lead time) or
    /// `task.overdue` (its due date passed).
    #[schemars(extend("enum" = ["task.due_soon", "task.overdue"]))]
    pub kind: String,
    pub task_id: Option<Uuid>,
    pub title: String,
    pub body: String,
    /// Whether the user's preferences send it to their devices too (`push`) or not (`inbox`).
    #[schemars(extend("enum" = ["push", "inbox"]))]
    pub delivery: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub created_at: OffsetDateTime,
}

/// A property value of a telemetry event: flat, never an object or an array.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum TelemetryValue {
    Bool(bool),
    Number(f64),
    /// At most 200 characters.
    Text(String),
}

/// One client event of a telemetry batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TelemetryEvent {
    /// 1–64 characters of `a-z`, `0-9`, `_`, `.`, `-`, starting with a letter.
    pub name: String,
    /// When it happened on the client.
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub at: OffsetDateTime,
    /// At most 20 properties; keys 1–40 characters of `a-z`, `0-9`, `_`.
    pub props: BTreeMap<String, Option<TelemetryValue>>,
}

/// A batch of client events as `POST /v1/telemetry` accepted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TelemetryBatch {
    /// Also the message's `ce_id`: consumers count a batch once.
    pub batch_id: Uuid,
    pub user_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub received_at: OffsetDateTime,
    /// 1–500 events.
    pub events: Vec<TelemetryEvent>,
}

macro_rules! payload {
    ($type:ty, $ce_type:literal, $topic:expr, $message:literal, $summary:literal, |$it:ident| $id:expr) => {
        impl EventPayload for $type {
            const TYPE: &'static str = $ce_type;
            const TOPIC: Topic = $topic;
            const MESSAGE: &'static str = $message;
            const SUMMARY: &'static str = $summary;
            fn aggregate_id(&self) -> Uuid {
                let $it = self;
                $id
            }
        }
    };
}

payload!(
    UserRegistered,
    "io.taskstream.auth.user.registered.v1",
    AUTH_USER,
    "userRegistered",
    "An account was created.",
    |it| it.user_id
);
payload!(
    UserUpdated,
    "io.taskstream.auth.user.updated.v1",
    AUTH_USER,
    "userUpdated",
    "An account's nickname or avatar changed.",
    |it| it.user_id
);
payload!(
    UserDeleted,
    "io.taskstream.auth.user.deleted.v1",
    AUTH_USER,
    "userDeleted",
    "An account was deleted: erase the user's data and refuse their tokens.",
    |it| it.user_id
);
payload!(
    SessionRevoked,
    "io.taskstream.auth.session.revoked.v1",
    AUTH_USER,
    "sessionRevoked",
    "A session ended (logout, or a reused refresh token): close what it holds open, e.g. its live sockets.",
    |it| it.user_id
);
payload!(
    TaskCreated,
    "io.taskstream.tasks.task.created.v1",
    TASKS_TASK,
    "taskCreated",
    "A task was created.",
    |it| it.task.id
);
payload!(
    TaskUpdated,
    "io.taskstream.tasks.task.updated.v1",
    TASKS_TASK,
    "taskUpdated",
    "A task changed; `changes` names each changed field.",
    |it| it.task.id
);
payload!(
    NotificationCreated,
    "io.taskstream.notifications.notification.created.v1",
    NOTIFICATIONS_NOTIFICATION,
    "notificationCreated",
    "A notification was put in a user's inbox (and, per their preferences, queued for their devices).",
    |it| it.user_id
);
payload!(
    TelemetryBatch,
    "io.taskstream.analysis.telemetry.batch.v1",
    ANALYSIS_TELEMETRY,
    "telemetryBatch",
    "A batch of client telemetry events of one user.",
    |it| it.user_id
);
payload!(
    TaskDeleted,
    "io.taskstream.tasks.task.deleted.v1",
    TASKS_TASK,
    "taskDeleted",
    "A task was deleted (its history stays with the tasks service, unless the account was deleted).",
    |it| it.task_id
);

/// One event type as the catalog describes it.
struct MessageSpec {
    ce_type: &'static str,
    topic: Topic,
    message: &'static str,
    summary: &'static str,
    payload: Value,
}

fn message<P: EventPayload>(generator: &mut SchemaGenerator) -> MessageSpec {
    MessageSpec {
        ce_type: P::TYPE,
        topic: P::TOPIC,
        message: P::MESSAGE,
        summary: P::SUMMARY,
        payload: generator.subschema_for::<P>().to_value(),
    }
}

/// The CloudEvents headers (binary content mode) every message carries.
fn headers_schema() -> Value {
    let text = |description: &str| json!({ "type": "string", "description": description });
    json!({
        "type": "object",
        "required": ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_subject", "ce_time", "content-type"],
        "properties": {
            "ce_specversion": { "type": "string", "const": "1.0" },
            "ce_id": { "type": "string", "format": "uuid", "description": "Unique per event: consumers apply an id once." },
            "ce_source": text("The producing service, e.g. `/taskstream/tasks`."),
            "ce_type": text("The event type, e.g. `io.taskstream.tasks.task.created.v1`."),
            "ce_subject": { "type": "string", "format": "uuid", "description": "The aggregate's id (also the message key)." },
            "ce_time": { "type": "string", "format": "date-time", "description": "When the change was committed." },
            "content-type": { "type": "string", "const": "application/json" },
            "traceparent": text("W3C trace context of the request that caused the event, when there was one."),
        }
    })
}

/// The AsyncAPI 3 document for every topic, key, header and payload.
pub fn asyncapi() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut generator = settings.into_generator();
    let messages = [
        message::<UserRegistered>(&mut generator),
        message::<UserUpdated>(&mut generator),
        message::<UserDeleted>(&mut generator),
        message::<SessionRevoked>(&mut generator),
        message::<TaskCreated>(&mut generator),
        message::<TaskUpdated>(&mut generator),
        message::<TaskDeleted>(&mut generator),
        message::<NotificationCreated>(&mut generator),
        message::<TelemetryBatch>(&mut generator),
    ];
    let mut schemas: serde_json::Map<String, Value> = generator.take_definitions(true);
    schemas.insert("CloudEventHeaders".into(), headers_schema());
    schemas.insert(
        "DeadLetterHeaders".into(),
        json!({
            "type": "object",
            "description": "The original message's headers, plus why it was set aside.",
            "properties": {
                "dlq_reason": { "type": "string" },
                "dlq_original_topic": { "type": "string" },
                "dlq_original_partition": { "type": "string" },
                "dlq_original_offset": { "type": "string" },
                "dlq_attempts": { "type": "string", "description": "How many times the handler ran." },
                "dlq_consumer_group": { "type": "string" },
            }
        }),
    );

    let mut channels = serde_json::Map::new();
    let mut operations = serde_json::Map::new();
    let mut components_messages = serde_json::Map::new();
    for topic in TOPICS {
        let id = channel_id(topic.name);
        let refs: serde_json::Map<String, Value> = messages
            .iter()
            .filter(|spec| spec.topic.name == topic.name)
            .map(|spec| {
                (
                    spec.message.to_owned(),
                    json!({ "$ref": format!("#/components/messages/{}", spec.message) }),
                )
            })
            .collect();
        let key = json!({ "type": "string", "format": "uuid", "description": topic.key });
        channels.insert(
            id.clone(),
            json!({
                "address": topic.name,
                "description": format!(
                    "{} Published by {}; key: {}.{}",
                    topic.description,
                    topic.owner,
                    topic.key,
                    if topic.consumers.is_empty() {
                        String::new()
                    } else {
                        format!(" Consumer groups: {}.", topic.consumers.join("; "))
                    }
                ),
                "messages": refs,
                "bindings": { "kafka": { "topic": topic.name } },
            }),
        );
        if !refs.is_empty() {
            operations.insert(
                format!("publish_{id}"),
                json!({
                    "action": "send",
                    "channel": { "$ref": format!("#/channels/{id}") },
                    "summary": format!("{} publishes through its transactional outbox (at least once; consumers deduplicate by ce_id).", topic.owner),
                    "messages": refs.keys().map(|name| json!({ "$ref": format!("#/channels/{id}/messages/{name}") })).collect::<Vec<_>>(),
                }),
            );
        }
        channels.insert(
            format!("{id}_dlq"),
            json!({
                "address": dead_letter_topic(topic.name),
                "description": format!("Messages of {} that a consumer could not process, with `dlq_*` headers saying why.", topic.name),
                "messages": { "deadLetter": { "$ref": "#/components/messages/deadLetter" } },
            }),
        );
        for spec in messages.iter().filter(|spec| spec.topic.name == topic.name) {
            components_messages.insert(
                spec.message.to_owned(),
                json!({
                    "name": spec.ce_type,
                    "title": spec.ce_type,
                    "summary": spec.summary,
                    "contentType": "application/json",
                    "headers": { "$ref": "#/components/schemas/CloudEventHeaders" },
                    "payload": spec.payload,
                    "bindings": { "kafka": { "key": key.clone() } },
                }),
            );
        }
    }
    components_messages.insert(
        "deadLetter".into(),
        json!({
            "name": "deadLetter",
            "summary": "A message as it arrived, set aside by a consumer.",
            "headers": { "$ref": "#/components/schemas/DeadLetterHeaders" },
            "payload": {},
        }),
    );

    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "taskstream events",
            "version": "1.0.0",
            "description": "Every event between taskstream services. Messages are CloudEvents 1.0 in Kafka binary mode: the attributes are `ce_*` headers, the data is the JSON payload, and `traceparent` carries the W3C trace context. The key is the aggregate id, so one aggregate's events stay in order. Delivery is at least once: consumers apply each `ce_id` once.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": components_messages,
            "schemas": schemas,
        },
    })
}

/// `auth.user.v1` → `auth_user_v1`.
fn channel_id(topic: &str) -> String {
    topic.replace('.', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_payload_names_its_aggregate_and_a_catalog_topic() {
        let topics: Vec<&str> = TOPICS.iter().map(|topic| topic.name).collect();
        for topic in [
            UserRegistered::TOPIC,
            UserDeleted::TOPIC,
            SessionRevoked::TOPIC,
            TaskCreated::TOPIC,
            TaskDeleted::TOPIC,
            TelemetryBatch::TOPIC,
        ] {
            assert!(topics.contains(&topic.name));
        }
        assert_eq!(dead_letter_topic("tasks.task.v1"), "tasks.task.v1.dlq");
    }
}
