//! The analysis domain, free of HTTP: the read models ([`model`]), how events change them
//! ([`apply`]), the dashboard drawn from a user's totals ([`dashboard`]), replaying the topics into
//! fresh tables ([`rebuild`]), and [`Analysis`], the reads handlers call.

pub mod apply;
pub mod dashboard;
pub mod model;
pub mod rebuild;
pub mod telemetry;

use futures_util::stream::{self, Stream};
use service_kit::db::{Database, DbError};
use time::{Date, Duration, OffsetDateTime};
use uuid::Uuid;

use crate::storage;
use dashboard::{Dashboard, Totals};
use model::{Priority, Status, TaskModel};

/// Most tasks one `GET /v1/analysis/tasks?ids=` asks for.
pub const MAX_IDS: usize = 200;
/// The longest range of `GET /v1/analysis/usage`, in days.
pub const MAX_USAGE_DAYS: i64 = 92;
/// Most rows of one `GET /v1/analysis/usage` answer (names are the clients' own, so a user's
/// (day, name) pairs have no bound of their own); `next_cursor` leads to the rest.
pub const USAGE_PAGE_ROWS: usize = storage::USAGE_PAGE_ROWS;
/// Analyses read per round trip while exporting.
pub const EXPORT_PAGE: i64 = 500;

#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    #[error("no analysis of task {0} for this user")]
    NotFound(Uuid),
    #[error("stored totals are unreadable: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Database(#[from] DbError),
}

/// Where a usage page starts: after this day and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCursor {
    pub day: Date,
    pub name: String,
}

/// A page of a user's telemetry counts: `(day, name, events)` by day and name, and where the
/// next page starts if there is one.
pub struct UsagePage {
    pub rows: Vec<(Date, String, i64)>,
    pub next: Option<UsageCursor>,
}

/// The reads of the analysis API, all served by a replica when it is usable.
pub struct Analysis {
    db: Database,
}

impl Analysis {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn task(&self, owner: Uuid, task: Uuid) -> Result<TaskModel, AnalysisError> {
        self.db
            .find_on_replica_or_primary(None, |mut conn| async move {
                storage::task(&mut conn, owner, task).await
            })
            .await?
            .ok_or(AnalysisError::NotFound(task))
    }

    /// The analyses of those of `ids` that are `owner`'s tasks, in the order asked.
    pub async fn tasks(&self, owner: Uuid, ids: &[Uuid]) -> Result<Vec<TaskModel>, AnalysisError> {
        let mut found = self
            .db
            .replica_or_primary(
                |mut conn| async move { storage::tasks(&mut conn, owner, ids).await },
            )
            .await?;
        found.sort_by_key(|model| ids.iter().position(|id| *id == model.task_id));
        Ok(found)
    }

    pub async fn dashboard(
        &self,
        owner: Uuid,
        now: OffsetDateTime,
    ) -> Result<Dashboard, AnalysisError> {
        let from = dashboard::first_day(now);
        let rows = self
            .db
            .replica_or_primary(|mut conn| async move {
                storage::dashboard(&mut conn, owner, from).await
            })
            .await?;
        let epoch =
            Date::from_ordinal_date(1970, 1).map_err(|e| AnalysisError::Corrupt(e.to_string()))?;
        let counts = rows
            .counts
            .0
            .into_iter()
            .map(|(status, priority, tasks)| {
                match (Status::parse(&status), Priority::parse(&priority)) {
                    (Some(status), Some(priority)) => Ok((status, priority, tasks)),
                    _ => Err(AnalysisError::Corrupt(format!("{status}/{priority}"))),
                }
            })
            .collect::<Result<_, _>>()?;
        let totals = Totals {
            counts,
            days: rows
                .days
                .0
                .into_iter()
                .map(|(days, created, completed)| {
                    (epoch + Duration::days(i64::from(days)), created, completed)
                })
                .collect(),
            cycle_times: rows.cycle_times.0,
            overdue: rows.overdue,
            as_of: rows.as_of.map(|json| json.0),
        };
        Ok(dashboard::dashboard(totals, now))
    }

    /// `owner`'s telemetry counts from `from` to `to`, after `after` if given: at most
    /// [`USAGE_PAGE_ROWS`] of them.
    pub async fn usage(
        &self,
        owner: Uuid,
        from: Date,
        to: Date,
        after: Option<&UsageCursor>,
    ) -> Result<UsagePage, AnalysisError> {
        let mut rows = self
            .db
            .replica_or_primary(|mut conn| async move {
                match after {
                    None => storage::usage(&mut conn, owner, from, to).await,
                    Some(after) => {
                        storage::usage_after(&mut conn, owner, from, to, after.day, &after.name)
                            .await
                    }
                }
            })
            .await?;
        // The statements read one row more than a page: whether there is a next page.
        let next = if rows.len() > USAGE_PAGE_ROWS {
            rows.truncate(USAGE_PAGE_ROWS);
            rows.last().map(|(day, name, _)| UsageCursor {
                day: *day,
                name: name.clone(),
            })
        } else {
            None
        };
        Ok(UsagePage { rows, next })
    }

    /// The newest event applied for `owner`, if any.
    pub async fn as_of(&self, owner: Uuid) -> Result<Option<model::AsOf>, AnalysisError> {
        Ok(self
            .db
            .replica_or_primary(
                |mut conn| async move { storage::user_as_of(&mut conn, owner).await },
            )
            .await?)
    }

    /// Every analysis of `owner`, a page at a time (constant memory whatever their number).
    pub fn export(
        &self,
        owner: Uuid,
    ) -> impl Stream<Item = Result<Vec<TaskModel>, AnalysisError>> + 'static {
        let db = self.db.clone();
        stream::try_unfold(Some(Uuid::nil()), move |after| {
            let db = db.clone();
            async move {
                let Some(after) = after else {
                    return Ok(None);
                };
                let page = db
                    .replica_or_primary(|mut conn| async move {
                        storage::export_page(&mut conn, owner, after, EXPORT_PAGE).await
                    })
                    .await?;
                let next = (page.len() as i64 == EXPORT_PAGE)
                    .then(|| page.last().map(|(id, _)| *id))
                    .flatten();
                if page.is_empty() {
                    return Ok(None);
                }
                let models = page.into_iter().map(|(_, model)| model).collect();
                Ok(Some((models, next)))
            }
        })
    }
}
