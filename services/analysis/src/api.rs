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
#[into_params(parameter_in = Query)]
pub struct IdsParams {
    /// Task ids, comma-separated: 1 to 200.
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
