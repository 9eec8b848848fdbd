//! The HTTP bodies of the analysis API: views of the domain's models, with durations in seconds
//! and the figures that depend on "now" worked out at answer time.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::domain::dashboard::Dashboard;
use crate::domain::model::{AsOf, DueAdherence, Priority, Status, TaskModel};

fn secs(micros: i64) -> f64 {
    micros as f64 / 1e6
}

/// Seconds spent in each status before the current one began (the current status counts from
/// `status_since`).
#[derive(Debug, Serialize, ToSchema)]
pub struct TimeInStatusView {
    pub todo: f64,
    pub in_progress: f64,
    pub blocked: f64,
    pub done: f64,
}

/// One task's analysis.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskAnalysisView {
    pub task_id: Uuid,
    pub status: Status,
    pub priority: Priority,
    #[serde(with = "time::serde::rfc3339")]
    pub status_since: OffsetDateTime,
    pub time_in_status_secs: TimeInStatusView,
    /// Updates since the task was created.
    pub changes: u32,
    /// Times it went from done back to another status.
    pub reopens: u32,
    /// Created → completed, while the task is done.
    pub lead_time_secs: Option<f64>,
    /// First `in_progress` → completed, while the task is done.
    pub cycle_time_secs: Option<f64>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub due_at: Option<OffsetDateTime>,
    pub due: DueAdherence,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub first_in_progress_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub last_change_at: OffsetDateTime,
    /// The event this analysis reflects.
    pub as_of: AsOf,
}

impl TaskAnalysisView {
    pub fn new(model: TaskModel, now: OffsetDateTime) -> Self {
        let times = &model.time_in_status_us;
        Self {
            task_id: model.task_id,
            status: model.status,
            priority: model.priority,
            status_since: model.status_since,
            time_in_status_secs: TimeInStatusView {
                todo: secs(times.todo),
                in_progress: secs(times.in_progress),
                blocked: secs(times.blocked),
                done: secs(times.done),
            },
            changes: model.changes,
            reopens: model.reopens,
            lead_time_secs: model.lead_time_us().map(secs),
            cycle_time_secs: model.cycle_time_us().map(secs),
            due_at: model.due_at,
            due: model.due_adherence(now),
            created_at: model.created_at,
            first_in_progress_at: model.first_in_progress_at,
            completed_at: model.completed_at,
            last_change_at: model.last_change_at,
            as_of: model.as_of,
        }
    }
}

/// `GET /v1/analysis/tasks?ids=…`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct IdsParams {
    /// Task ids (hyphenated UUIDs), comma-separated: 1 to 200.
    // Written out: utoipa's `schema_with` would drop `required` (service_kit::input's
    // hyphenated_uuids reads exactly this).
    #[param(
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}(,[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}){0,199}$"
    )]
    pub ids: String,
}

/// Several tasks' analyses: those found, in the order asked, and the ids with none for this user.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskAnalysisList {
    pub items: Vec<TaskAnalysisView>,
    pub missing: Vec<Uuid>,
}

/// `GET /v1/analysis/me`.
pub type DashboardView = Dashboard;

/// One client event of `POST /v1/telemetry` (the body is an array of 1–500 of them, at most
/// 256 KiB).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body; the handler checks it field by field
pub struct TelemetryEventBody {
    /// 1–64 characters of `a-z`, `0-9`, `_`, `.`, `-`, starting with a letter.
    #[schema(min_length = 1, max_length = 64, pattern = "^[a-z][a-z0-9_.-]*$")]
    pub name: String,
    /// When it happened on the client: RFC 3339, within 30 days of the server's clock.
    pub at: OffsetDateTime,
    /// At most 20 flat properties: keys 1–40 characters of `a-z`, `0-9`, `_`; values strings (at
    /// most 200 characters), numbers, booleans or null.
    #[schema(value_type = Option<Object>)]
    pub props: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The body of `POST /v1/telemetry`: 1 to 500 events.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(value_type = Vec<TelemetryEventBody>, min_items = 1, max_items = 500)]
#[allow(dead_code)] // documents the body; the handler checks it field by field
pub struct TelemetryBatchBody(pub Vec<TelemetryEventBody>);

/// `202` to `POST /v1/telemetry`: the batch is on the broker.
#[derive(Debug, Serialize, ToSchema)]
pub struct TelemetryAccepted {
    /// The batch's id (the message's `ce_id` on `analysis.telemetry.v1`). With an
    /// `Idempotency-Key`, the same for every retry of the batch.
    pub batch_id: Uuid,
    pub events: usize,
}

/// `GET /v1/analysis/usage`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// First UTC day (`2026-12-01`), from 0001-01-01; default 6 days before `to` (not before
    /// 0001-01-01).
    #[param(format = Date, pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
    pub from: Option<String>,
    /// Last UTC day, to 9999-12-31; default today. At most 91 days after `from`.
    #[param(format = Date, pattern = "^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]
    pub to: Option<String>,
    /// `next_cursor` of the previous answer (with the same `from` and `to`).
    #[param(pattern = "^([0-9a-f]{2}){12,75}$")]
    pub cursor: Option<String>,
}

/// One user's count of one event name on one UTC day.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageDay {
    #[schema(value_type = String, format = Date)]
    pub day: String,
    pub name: String,
    pub events: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UsageView {
    #[schema(value_type = String, format = Date)]
    pub from: String,
    #[schema(value_type = String, format = Date)]
    pub to: String,
    /// By day, then name; days without events are absent. At most 1,000.
    pub items: Vec<UsageDay>,
    /// Pass as `cursor` for the rows after these; `null` on the last page.
    pub next_cursor: Option<String>,
}
