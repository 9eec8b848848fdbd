//! One task's analysis, folded from its events, and what it adds to its owner's totals. Pure (no
//! I/O, no clock): every figure comes from the events' own times, so replaying the topic gives the
//! same answer as applying it live.

use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};
use utoipa::ToSchema;
use uuid::Uuid;

use events::catalog::TaskSnapshot;

/// A task's status, as tasks spells it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Todo,
    InProgress,
    Blocked,
    Done,
}

/// A task's priority, as tasks spells it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    Medium,
    High,
    Urgent,
}

impl Status {
    pub const ALL: [Status; 4] = [Self::Todo, Self::InProgress, Self::Blocked, Self::Done];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Todo => "todo",
            Self::InProgress => "in_progress",
            Self::Blocked => "blocked",
            Self::Done => "done",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
    }
}

impl Priority {
    pub const ALL: [Priority; 4] = [Self::Low, Self::Medium, Self::High, Self::Urgent];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Urgent => "urgent",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|priority| priority.as_str() == text)
    }
}

/// An event that cannot be folded (tasks never sends one; a hand-made event might).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("unknown status {0:?}")]
    UnknownStatus(String),
    #[error("unknown priority {0:?}")]
    UnknownPriority(String),
}

/// Which event a model reflects: the `as_of` of every answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AsOf {
    /// The event's own time (CloudEvents `time`).
    #[serde(with = "time::serde::rfc3339")]
    pub event_at: OffsetDateTime,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Whole microseconds spent in each status, closed intervals only (the current one is
/// `status_since` → now).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeInStatus {
    pub todo: i64,
    pub in_progress: i64,
    pub blocked: i64,
    pub done: i64,
}

impl TimeInStatus {
    fn add(&mut self, status: Status, micros: i64) {
        let slot = match status {
            Status::Todo => &mut self.todo,
            Status::InProgress => &mut self.in_progress,
            Status::Blocked => &mut self.blocked,
            Status::Done => &mut self.done,
        };
        *slot += micros;
    }
}

/// One task's analysis as stored (`task_analysis.model`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskModel {
    pub task_id: Uuid,
    pub owner_id: Uuid,
    /// The task's version the model reflects: older events are not applied again.
    pub version: i64,
    pub status: Status,
    pub priority: Priority,
    #[serde(with = "time::serde::rfc3339::option")]
    pub due_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub status_since: OffsetDateTime,
    pub time_in_status_us: TimeInStatus,
    /// Updates since creation.
    pub changes: u32,
    /// Times the task went from done back to another status.
    pub reopens: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub first_in_progress_at: Option<OffsetDateTime>,
    /// When the task was last completed; `None` while it is not done.
    #[serde(with = "time::serde::rfc3339::option")]
    pub completed_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    pub last_change_at: OffsetDateTime,
    pub as_of: AsOf,
}

/// How a task meets its due date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DueAdherence {
    /// No due date.
    None,
    /// Open, due later.
    Pending,
    /// Open, past due.
    Overdue,
    /// Completed on or before the due date.
    OnTime,
    /// Completed after the due date.
    Late,
}

/// What one live task adds to its owner's totals; the totals change by the difference between
/// a task's contribution before and after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contribution {
    pub status: Status,
    pub priority: Priority,
    pub created_day: Date,
    pub completed_day: Option<Date>,
    pub cycle_bucket: Option<i16>,
}

/// A change to one of a user's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Total {
    Tasks(Status, Priority),
    Created(Date),
    Completed(Date),
    CycleTime(i16),
}

fn parse_fields(snapshot: &TaskSnapshot) -> Result<(Status, Priority), ModelError> {
    let status = Status::parse(&snapshot.status)
        .ok_or_else(|| ModelError::UnknownStatus(snapshot.status.clone()))?;
    let priority = Priority::parse(&snapshot.priority)
        .ok_or_else(|| ModelError::UnknownPriority(snapshot.priority.clone()))?;
    Ok((status, priority))
}

fn micros_between(from: OffsetDateTime, to: OffsetDateTime) -> i64 {
    // A clock that went backwards between two events counts as no time, never negative.
    ((to - from).whole_microseconds()).clamp(0, i64::MAX as i128) as i64
}

impl TaskModel {
    /// The model of a task as `task.created` describes it. Also used for a task whose creation
    /// is no longer on the topic (its first event seen is an update): its history before
    /// `snapshot.updated_at` is then unknown and not counted.
    pub fn from_snapshot(
        snapshot: &TaskSnapshot,
        as_of: AsOf,
        created: bool,
    ) -> Result<Self, ModelError> {
        let (status, priority) = parse_fields(snapshot)?;
        let since = if created {
            snapshot.created_at
        } else {
            snapshot.updated_at
        };
        Ok(Self {
            task_id: snapshot.id,
            owner_id: snapshot.owner_id,
            version: snapshot.version,
            status,
            priority,
            due_at: snapshot.due_at,
            created_at: snapshot.created_at,
            status_since: since,
            time_in_status_us: TimeInStatus::default(),
            changes: 0,
            reopens: 0,
            first_in_progress_at: (status == Status::InProgress).then_some(since),
            completed_at: (status == Status::Done).then_some(since),
            last_change_at: since,
            as_of,
        })
    }

    /// Folds in `task.updated` (the caller checked it is newer than [`Self::version`]).
    pub fn apply_update(&mut self, snapshot: &TaskSnapshot, as_of: AsOf) -> Result<(), ModelError> {
        let (status, priority) = parse_fields(snapshot)?;
        let at = snapshot.updated_at;
        if status != self.status {
            self.time_in_status_us
                .add(self.status, micros_between(self.status_since, at));
            if self.status == Status::Done {
                self.reopens += 1;
                self.completed_at = None;
            }
            if status == Status::InProgress && self.first_in_progress_at.is_none() {
                self.first_in_progress_at = Some(at);
            }
            if status == Status::Done {
                self.completed_at = Some(at);
            }
            self.status = status;
            self.status_since = at;
        }
        self.priority = priority;
        self.due_at = snapshot.due_at;
        self.version = snapshot.version;
        self.changes += 1;
        self.last_change_at = at;
        self.as_of = as_of;
        Ok(())
    }

    /// Created → completed, while the task is done.
    pub fn lead_time_us(&self) -> Option<i64> {
        self.completed_at
            .map(|done| micros_between(self.created_at, done))
    }

    /// First `in_progress` → completed, while the task is done (and was ever in progress).
    pub fn cycle_time_us(&self) -> Option<i64> {
        match (self.first_in_progress_at, self.completed_at) {
            (Some(started), Some(done)) => Some(micros_between(started, done)),
            _ => None,
        }
    }

    pub fn due_adherence(&self, now: OffsetDateTime) -> DueAdherence {
        match (self.due_at, self.completed_at) {
            (None, _) => DueAdherence::None,
            (Some(due), Some(done)) if done <= due => DueAdherence::OnTime,
            (Some(_), Some(_)) => DueAdherence::Late,
            (Some(due), None) if due < now => DueAdherence::Overdue,
            (Some(_), None) => DueAdherence::Pending,
        }
    }

    /// The due date while it can still be missed: what "overdue now" counts.
    pub fn open_due_at(&self) -> Option<OffsetDateTime> {
        self.due_at.filter(|_| self.status != Status::Done)
    }

    pub fn contribution(&self) -> Contribution {
        Contribution {
            status: self.status,
            priority: self.priority,
            created_day: self.created_at.date(),
            completed_day: self.completed_at.map(|at| at.date()),
            cycle_bucket: self.cycle_time_us().map(cycle_bucket),
        }
    }
}

impl Contribution {
    fn totals(self) -> impl Iterator<Item = Total> {
        [
            Some(Total::Tasks(self.status, self.priority)),
            Some(Total::Created(self.created_day)),
            self.completed_day.map(Total::Completed),
            self.cycle_bucket.map(Total::CycleTime),
        ]
        .into_iter()
        .flatten()
    }
}

/// How a user's totals change when one task's contribution goes from `before` to `after` (either
/// may be absent: created, deleted). Only what differs, each total once.
pub fn total_changes(
    before: Option<Contribution>,
    after: Option<Contribution>,
) -> Vec<(Total, i64)> {
    let mut changes: Vec<(Total, i64)> = Vec::new();
    let removed = before
        .into_iter()
        .flat_map(Contribution::totals)
        .map(|t| (t, -1));
    let added = after
        .into_iter()
        .flat_map(Contribution::totals)
        .map(|t| (t, 1));
    for (total, by) in removed.chain(added) {
        match changes.iter_mut().find(|(seen, _)| *seen == total) {
            Some((_, sum)) => *sum += by,
            None => changes.push((total, by)),
        }
    }
    changes.retain(|(_, by)| *by != 0);
    changes.sort();
    changes
}

/// Buckets per doubling of the cycle time: each bucket is about 9% wide (2^(1/8)), so a
/// percentile read from the histogram is at most that much above the exact one.
const BUCKETS_PER_DOUBLING: f64 = 8.0;

/// The histogram bucket of a cycle time: bucket `b` holds times up to [`bucket_upper_secs`]`(b)`.
pub fn cycle_bucket(micros: i64) -> i16 {
    let secs = micros as f64 / 1e6;
    (BUCKETS_PER_DOUBLING * (1.0 + secs).log2()).ceil() as i16
}

/// The longest cycle time, in seconds, bucket `b` holds.
pub fn bucket_upper_secs(bucket: i16) -> f64 {
    (f64::from(bucket) / BUCKETS_PER_DOUBLING).exp2() - 1.0
}

/// The `quantile` (0–1) of a histogram given as `(bucket, tasks)` in bucket order: the upper bound
/// of the bucket holding the task at that rank (nearest-rank), so never below the exact value.
pub fn histogram_quantile(buckets: &[(i16, i64)], quantile: f64) -> Option<f64> {
    let total: i64 = buckets.iter().map(|(_, tasks)| tasks).sum();
    if total <= 0 {
        return None;
    }
    let rank = ((quantile * total as f64).ceil() as i64).max(1);
    let mut seen = 0;
    for &(bucket, tasks) in buckets {
        seen += tasks;
        if seen >= rank {
            return Some(bucket_upper_secs(bucket));
        }
    }
    buckets.last().map(|&(bucket, _)| bucket_upper_secs(bucket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::format_description::well_known::Rfc3339;

    fn datetime(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &Rfc3339).unwrap()
    }

    fn as_of(offset: i64) -> AsOf {
        AsOf {
            event_at: datetime("2026-11-02T09:00:00Z"),
            topic: "tasks.task.v1".into(),
            partition: 0,
            offset,
        }
    }

    fn snapshot(status: &str, version: i64, updated_at: OffsetDateTime) -> TaskSnapshot {
        TaskSnapshot {
            id: Uuid::nil(),
            owner_id: Uuid::nil(),
            title: "t".into(),
            description: None,
            status: status.into(),
            priority: "high".into(),
            due_at: Some(datetime("2026-11-05T00:00:00Z")),
            labels: vec![],
            version,
            created_at: datetime("2026-11-02T09:00:00Z"),
            updated_at,
        }
    }

    const HOUR: i64 = 3_600_000_000;

    #[test]
    fn a_history_of_status_changes_gives_exact_times() {
        let mut model = TaskModel::from_snapshot(
            &snapshot("todo", 1, datetime("2026-11-02T09:00:00Z")),
            as_of(0),
            true,
        )
        .unwrap();
        let steps = [
            ("in_progress", datetime("2026-11-02T11:00:00Z")),
            ("blocked", datetime("2026-11-02T14:00:00Z")),
            ("in_progress", datetime("2026-11-02T15:00:00Z")),
            ("done", datetime("2026-11-03T09:00:00Z")),
            ("todo", datetime("2026-11-04T09:00:00Z")),
            ("done", datetime("2026-11-06T09:00:00Z")),
        ];
        for (i, (status, at)) in steps.into_iter().enumerate() {
            model
                .apply_update(&snapshot(status, i as i64 + 2, at), as_of(i as i64 + 1))
                .unwrap();
        }
        assert_eq!(
            model.time_in_status_us,
            TimeInStatus {
                todo: 2 * HOUR + 48 * HOUR,
                in_progress: 3 * HOUR + 18 * HOUR,
                blocked: HOUR,
                done: 24 * HOUR,
            }
        );
        assert_eq!((model.changes, model.reopens), (6, 1));
        assert_eq!(model.lead_time_us(), Some(96 * HOUR));
        assert_eq!(model.cycle_time_us(), Some(94 * HOUR));
        assert_eq!(
            model.due_adherence(datetime("2026-12-01T00:00:00Z")),
            DueAdherence::Late
        );
        assert_eq!(model.open_due_at(), None);
    }

    #[test]
    fn reopening_takes_the_completion_back() {
        let created = TaskModel::from_snapshot(
            &snapshot("done", 1, datetime("2026-11-02T09:00:00Z")),
            as_of(0),
            true,
        )
        .unwrap();
        let mut reopened = created.clone();
        reopened
            .apply_update(
                &snapshot("todo", 2, datetime("2026-11-03T09:00:00Z")),
                as_of(1),
            )
            .unwrap();
        let day = datetime("2026-11-02T09:00:00Z").date();
        assert_eq!(
            total_changes(Some(created.contribution()), Some(reopened.contribution())),
            vec![
                (Total::Tasks(Status::Todo, Priority::High), 1),
                (Total::Tasks(Status::Done, Priority::High), -1),
                (Total::Completed(day), -1),
            ]
        );
        assert_eq!(
            reopened.due_adherence(datetime("2026-11-04T00:00:00Z")),
            DueAdherence::Pending
        );
        assert_eq!(
            reopened.due_adherence(datetime("2026-11-06T00:00:00Z")),
            DueAdherence::Overdue
        );
        assert_eq!(reopened.lead_time_us(), None);
    }

    #[test]
    fn a_clock_going_backwards_counts_no_time() {
        let mut model = TaskModel::from_snapshot(
            &snapshot("todo", 1, datetime("2026-11-02T09:00:00Z")),
            as_of(0),
            true,
        )
        .unwrap();
        model
            .apply_update(
                &snapshot("done", 2, datetime("2026-11-02T08:00:00Z")),
                as_of(1),
            )
            .unwrap();
        assert_eq!(model.time_in_status_us.todo, 0);
        assert_eq!(model.lead_time_us(), Some(0));
    }

    #[test]
    fn an_unknown_status_is_refused() {
        let err = TaskModel::from_snapshot(
            &snapshot("archived", 1, datetime("2026-11-02T09:00:00Z")),
            as_of(0),
            true,
        )
        .unwrap_err();
        assert_eq!(err, ModelError::UnknownStatus("archived".into()));
    }

    #[test]
    fn percentiles_from_the_histogram_are_within_a_bucket_above_the_exact_ones() {
        let times_secs = [60.0, 600.0, 3_600.0, 7_200.0, 86_400.0];
        let mut buckets: Vec<(i16, i64)> = Vec::new();
        for secs in times_secs {
            let bucket = cycle_bucket((secs * 1e6) as i64);
            assert!(bucket_upper_secs(bucket) >= secs);
            assert!(bucket_upper_secs(bucket) <= secs * 1.1 + 1.0);
            buckets.push((bucket, 1));
        }
        let median = histogram_quantile(&buckets, 0.5).unwrap();
        assert!((3_600.0..=3_600.0 * 1.1).contains(&median), "{median}");
        let p85 = histogram_quantile(&buckets, 0.85).unwrap();
        assert!((86_400.0..=86_400.0 * 1.1).contains(&p85), "{p85}");
        assert_eq!(histogram_quantile(&[], 0.5), None);
    }
}
