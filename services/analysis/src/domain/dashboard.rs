//! A user's dashboard from their totals: counts by status and priority, work in progress,
//! overdue, throughput per ISO week, cycle-time percentiles, created vs completed per day. Pure:
//! the rows come from `storage::dashboard`, "now" from the caller.

use std::collections::BTreeMap;

use serde::Serialize;
use time::{Date, Duration, OffsetDateTime};
use utoipa::ToSchema;

use super::model::{histogram_quantile, AsOf, Priority, Status};

/// ISO weeks of throughput, the current one included.
pub const THROUGHPUT_WEEKS: i64 = 12;
/// Days of created vs completed, today included.
pub const DAILY_DAYS: i64 = 28;

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Dashboard {
    /// Live tasks per status (every status present).
    #[schema(value_type = HashMap<String, i64>)]
    pub by_status: BTreeMap<Status, i64>,
    /// Live tasks per priority (every priority present).
    #[schema(value_type = HashMap<String, i64>)]
    pub by_priority: BTreeMap<Priority, i64>,
    /// Tasks in progress now.
    pub work_in_progress: i64,
    /// Open tasks past their due date now.
    pub overdue: i64,
    pub throughput: Vec<WeekThroughput>,
    pub cycle_time: CycleTimes,
    pub daily: Vec<DayCounts>,
    pub as_of: Option<AsOf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct WeekThroughput {
    /// ISO week, `2026-W49`.
    pub week: String,
    /// Its Monday.
    #[serde(serialize_with = "iso_date")]
    #[schema(value_type = String, format = Date)]
    pub starts: Date,
    /// Tasks whose current completion falls in that week.
    pub completed: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CycleTimes {
    /// Completed tasks that were in progress at some point (the ones with a cycle time).
    pub tasks: i64,
    /// From a histogram with buckets about 9% wide: at most that much above the exact value.
    pub median_secs: Option<f64>,
    pub p85_secs: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DayCounts {
    #[serde(serialize_with = "iso_date")]
    #[schema(value_type = String, format = Date)]
    pub day: Date,
    pub created: i64,
    pub completed: i64,
}

/// `2026-12-01`.
fn iso_date<S: serde::Serializer>(day: &Date, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(day)
}

/// The Monday of `day`'s ISO week.
fn monday_of(day: Date) -> Date {
    day - Duration::days(i64::from(day.weekday().number_days_from_monday()))
}

/// The first day the dashboard's rows must cover at `now`.
pub fn first_day(now: OffsetDateTime) -> Date {
    let today = now.date();
    let weeks_from = monday_of(today) - Duration::weeks(THROUGHPUT_WEEKS - 1);
    weeks_from.min(today - Duration::days(DAILY_DAYS - 1))
}

/// The rows of one user, as `storage` reads them.
pub struct Totals {
    pub counts: Vec<(Status, Priority, i64)>,
    pub days: Vec<(Date, i64, i64)>,
    pub cycle_times: Vec<(i16, i64)>,
    pub overdue: i64,
    pub as_of: Option<AsOf>,
}

pub fn dashboard(totals: Totals, now: OffsetDateTime) -> Dashboard {
    let mut by_status: BTreeMap<Status, i64> = Status::ALL.iter().map(|s| (*s, 0)).collect();
    let mut by_priority: BTreeMap<Priority, i64> = Priority::ALL.iter().map(|p| (*p, 0)).collect();
    for &(status, priority, tasks) in &totals.counts {
        *by_status.entry(status).or_default() += tasks;
        *by_priority.entry(priority).or_default() += tasks;
    }
    let today = now.date();
    let this_monday = monday_of(today);
    let throughput = (0..THROUGHPUT_WEEKS)
        .rev()
        .map(|back| {
            let starts = this_monday - Duration::weeks(back);
            let ends = starts + Duration::weeks(1);
            let completed = totals
                .days
                .iter()
                .filter(|(day, _, _)| (starts..ends).contains(day))
                .map(|(_, _, completed)| completed)
                .sum();
            let (year, week, _) = starts.to_iso_week_date();
            WeekThroughput {
                week: format!("{year}-W{week:02}"),
                starts,
                completed,
            }
        })
        .collect();
    let daily = (0..DAILY_DAYS)
        .rev()
        .map(|back| {
            let day = today - Duration::days(back);
            let (created, completed) = totals
                .days
                .iter()
                .find(|(seen, _, _)| *seen == day)
                .map_or((0, 0), |&(_, created, completed)| (created, completed));
            DayCounts {
                day,
                created,
                completed,
            }
        })
        .collect();
    Dashboard {
        work_in_progress: by_status[&Status::InProgress],
        by_status,
        by_priority,
        overdue: totals.overdue,
        throughput,
        cycle_time: CycleTimes {
            tasks: totals.cycle_times.iter().map(|(_, tasks)| tasks).sum(),
            median_secs: histogram_quantile(&totals.cycle_times, 0.5),
            p85_secs: histogram_quantile(&totals.cycle_times, 0.85),
        },
        daily,
        as_of: totals.as_of,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::format_description::well_known::Rfc3339;

    fn datetime(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &Rfc3339).unwrap()
    }

    fn date(text: &str) -> Date {
        datetime(&format!("{text}T00:00:00Z")).date()
    }
    use time::Weekday;

    #[test]
    fn weeks_are_iso_weeks_ending_with_the_current_one() {
        // Tuesday 2026-12-01 is in 2026-W49, which starts on Monday 2026-11-30.
        let now = datetime("2026-12-01T10:00:00Z");
        assert_eq!(now.date().weekday(), Weekday::Tuesday);
        let board = dashboard(
            Totals {
                counts: vec![
                    (Status::Done, Priority::High, 3),
                    (Status::InProgress, Priority::Low, 2),
                ],
                days: vec![
                    (date("2026-11-29"), 1, 2), // Sunday: W48
                    (date("2026-11-30"), 4, 5), // Monday: W49
                    (date("2026-12-01"), 0, 1),
                ],
                cycle_times: vec![],
                overdue: 1,
                as_of: None,
            },
            now,
        );
        let last = board.throughput.last().unwrap();
        assert_eq!(
            (last.week.as_str(), last.starts, last.completed),
            ("2026-W49", date("2026-11-30"), 6)
        );
        let before = &board.throughput[board.throughput.len() - 2];
        assert_eq!((before.week.as_str(), before.completed), ("2026-W48", 2));
        assert_eq!(board.throughput.len(), 12);
        assert_eq!(board.daily.len(), 28);
        assert_eq!(board.daily.last().unwrap().completed, 1);
        assert_eq!(
            (board.work_in_progress, board.by_status[&Status::Done]),
            (2, 3)
        );
        assert_eq!(board.by_priority[&Priority::Medium], 0);
        assert_eq!(board.cycle_time.median_secs, None);
        assert!(first_day(now) <= date("2026-09-14"));
    }
}
