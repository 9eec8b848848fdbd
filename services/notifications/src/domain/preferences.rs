//! What each user wants notified, and how: per kind push, inbox only or off; the reminder lead
//! time; quiet hours during which pushes wait (the inbox does not).
//!
//! Quiet hours are a local time window in an IANA time zone (the tz database is built in, so
//! the answer does not depend on the image's files), so they follow daylight saving time.

use std::time::Duration;

use futures_util::FutureExt;
use jiff::civil::Time;
use jiff::tz::TimeZone;
use service_kit::db::{Database, DbError};
use service_kit::erased_users;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::storage;
use crate::storage::inbox::PreferencesRow;

/// How a kind of notification reaches the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The inbox and every registered device.
    Push,
    /// The inbox only.
    Inbox,
    /// Not at all.
    Off,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Push => "push",
            Delivery::Inbox => "inbox",
            Delivery::Off => "off",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "push" => Some(Delivery::Push),
            "inbox" => Some(Delivery::Inbox),
            "off" => Some(Delivery::Off),
            _ => None,
        }
    }
}

/// The kinds of notification there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The task is due within the user's lead time.
    DueSoon,
    /// The task's due date passed and it is not done.
    Overdue,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::DueSoon => "task.due_soon",
            Kind::Overdue => "task.overdue",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "task.due_soon" => Some(Kind::DueSoon),
            "task.overdue" => Some(Kind::Overdue),
            _ => None,
        }
    }

    /// The push `Urgency` (RFC 8030 §5.3): an overdue task matters now.
    pub fn urgency(self) -> &'static str {
        match self {
            Kind::DueSoon => "normal",
            Kind::Overdue => "high",
        }
    }
}

/// A daily window of local time, `start` inclusive, `end` exclusive; over midnight when `start`
/// is later than `end` (22:00–07:00).
#[derive(Debug, Clone, PartialEq)]
pub struct QuietHours {
    pub start: Time,
    pub end: Time,
    /// The IANA name, as the user gave it.
    pub time_zone: String,
    pub zone: TimeZone,
}

impl QuietHours {
    /// `None` with the reason when the window or the zone is not valid.
    pub fn new(start: &str, end: &str, time_zone: &str) -> Result<Self, &'static str> {
        let start = parse_time(start).ok_or("start must be a local time HH:MM")?;
        let end = parse_time(end).ok_or("end must be a local time HH:MM")?;
        if start == end {
            return Err("start and end must differ");
        }
        let zone = jiff::tz::db()
            .get(time_zone)
            .map_err(|_| "time_zone must be an IANA time zone, such as Europe/Berlin")?;
        Ok(Self {
            start,
            end,
            time_zone: time_zone.to_owned(),
            zone,
        })
    }

    /// When a push made at `now` may be sent: `now`, or the end of the quiet hours it falls in.
    pub fn release_time(&self, now: OffsetDateTime) -> OffsetDateTime {
        let Ok(instant) = jiff::Timestamp::from_nanosecond(now.unix_timestamp_nanos()) else {
            return now;
        };
        let local = instant.to_zoned(self.zone.clone());
        let time = local.time();
        let quiet = if self.start < self.end {
            self.start <= time && time < self.end
        } else {
            time >= self.start || time < self.end
        };
        if !quiet {
            return now;
        }
        // The next `end` after now: today's, or tomorrow's when today's has passed.
        let mut date = local.date();
        if time >= self.end {
            match date.tomorrow() {
                Ok(tomorrow) => date = tomorrow,
                Err(_) => return now,
            }
        }
        date.to_datetime(self.end)
            .to_zoned(self.zone.clone())
            .ok()
            .and_then(|end| {
                OffsetDateTime::from_unix_timestamp_nanos(end.timestamp().as_nanosecond()).ok()
            })
            .unwrap_or(now)
    }
}

/// `HH:MM` (or `HH:MM:SS`), 24-hour.
/// `HH:MM`, exactly as the document's pattern says.
fn parse_time(text: &str) -> Option<Time> {
    let (hour, minute) = text.split_once(':')?;
    let two_digits = |part: &str| {
        (part.len() == 2 && part.bytes().all(|b| b.is_ascii_digit()))
            .then(|| part.parse::<i8>().ok())
            .flatten()
    };
    Time::new(two_digits(hour)?, two_digits(minute)?, 0, 0).ok()
}

/// Formats a quiet-hours bound as `HH:MM`.
pub fn format_time(time: Time) -> String {
    format!("{:02}:{:02}", time.hour(), time.minute())
}

/// One user's preferences (the defaults until they change them).
#[derive(Debug, Clone, PartialEq)]
pub struct Preferences {
    pub due_soon: Delivery,
    pub overdue: Delivery,
    /// How long before a due date "due soon" fires.
    pub reminder_lead: Duration,
    pub quiet_hours: Option<QuietHours>,
}

/// The lead time's bounds, in minutes (a week at most).
pub const LEAD_MINUTES_MIN: u32 = 1;
pub const LEAD_MINUTES_MAX: u32 = 10_080;

impl Default for Preferences {
    fn default() -> Self {
        Self {
            due_soon: Delivery::Push,
            overdue: Delivery::Push,
            reminder_lead: Duration::from_secs(3600),
            quiet_hours: None,
        }
    }
}

impl Preferences {
    pub fn delivery(&self, kind: Kind) -> Delivery {
        match kind {
            Kind::DueSoon => self.due_soon,
            Kind::Overdue => self.overdue,
        }
    }

    /// When a push made at `now` may leave.
    pub fn push_release(&self, now: OffsetDateTime) -> OffsetDateTime {
        self.quiet_hours
            .as_ref()
            .map_or(now, |quiet| quiet.release_time(now))
    }
}

impl Preferences {
    /// From what is stored; a stored value this version does not know falls back to the default
    /// (the database's checks keep them known).
    pub fn from_row(row: &PreferencesRow) -> Self {
        let defaults = Self::default();
        let quiet_hours = match (&row.quiet_start, &row.quiet_end, &row.time_zone) {
            (Some(start), Some(end), Some(zone)) => {
                jiff::tz::db().get(zone).ok().map(|tz| QuietHours {
                    start: to_civil(*start),
                    end: to_civil(*end),
                    time_zone: zone.clone(),
                    zone: tz,
                })
            }
            _ => None,
        };
        Self {
            due_soon: Delivery::parse(&row.due_soon).unwrap_or(defaults.due_soon),
            overdue: Delivery::parse(&row.overdue).unwrap_or(defaults.overdue),
            reminder_lead: Duration::from_secs(
                u64::from(row.reminder_lead_minutes.unsigned_abs()) * 60,
            ),
            quiet_hours,
        }
    }

    pub fn lead_minutes(&self) -> i32 {
        i32::try_from(self.reminder_lead.as_secs() / 60).unwrap_or(i32::MAX)
    }

    fn to_row(&self) -> PreferencesRow {
        PreferencesRow {
            due_soon: self.due_soon.as_str().to_owned(),
            overdue: self.overdue.as_str().to_owned(),
            reminder_lead_minutes: self.lead_minutes(),
            quiet_start: self.quiet_hours.as_ref().and_then(|q| from_civil(q.start)),
            quiet_end: self.quiet_hours.as_ref().and_then(|q| from_civil(q.end)),
            time_zone: self.quiet_hours.as_ref().map(|q| q.time_zone.clone()),
        }
    }
}

fn to_civil(time: time::Time) -> Time {
    Time::constant(
        time.hour() as i8,
        time.minute() as i8,
        time.second() as i8,
        0,
    )
}

fn from_civil(time: Time) -> Option<time::Time> {
    time::Time::from_hms(time.hour() as u8, time.minute() as u8, time.second() as u8).ok()
}

/// Why preferences were not saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    AccountErased(#[from] erased_users::AccountErased),
    #[error(transparent)]
    Database(#[from] DbError),
}

impl From<service_kit::sqlx::Error> for SaveError {
    fn from(err: service_kit::sqlx::Error) -> Self {
        SaveError::Database(err.into())
    }
}

/// Reading and saving preferences.
pub struct PreferencesStore {
    db: Database,
}

impl PreferencesStore {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    pub async fn get(&self, user: Uuid) -> Result<Preferences, DbError> {
        let row = self
            .db
            .primary(|mut conn| async move { storage::inbox::preferences(&mut conn, user).await })
            .await?;
        Ok(row.as_ref().map(Preferences::from_row).unwrap_or_default())
    }

    /// Saves them and moves the user's pending "due soon" reminders to the new lead time, in one
    /// transaction.
    pub async fn save(&self, user: Uuid, preferences: &Preferences) -> Result<(), SaveError> {
        let row = preferences.to_row();
        self.db
            .transaction(|tx| {
                async move {
                    // Preferences are a row of the user's: none may outlive an erasure.
                    if erased_users::guard(tx, user).await?.is_erased() {
                        return Err(erased_users::AccountErased.into());
                    }
                    storage::inbox::save_preferences(tx, user, &row).await?;
                    storage::reminders::apply_lead_time(tx, user, row.reminder_lead_minutes)
                        .await?;
                    Ok::<_, SaveError>(())
                }
                .boxed()
            })
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> OffsetDateTime {
        OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
    }

    #[test]
    fn an_overnight_window_holds_pushes_until_its_end_in_the_users_zone() {
        let quiet = QuietHours::new("22:00", "07:00", "Europe/Berlin").unwrap();
        // 23:30 in Berlin (winter, UTC+1) → 07:00 Berlin next day = 06:00 UTC.
        assert_eq!(
            quiet.release_time(at("2026-12-01T22:30:00Z")),
            at("2026-12-02T06:00:00Z")
        );
        // 05:00 Berlin, still quiet → 07:00 the same day.
        assert_eq!(
            quiet.release_time(at("2026-12-02T04:00:00Z")),
            at("2026-12-02T06:00:00Z")
        );
        // Noon: not quiet.
        assert_eq!(
            quiet.release_time(at("2026-12-02T11:00:00Z")),
            at("2026-12-02T11:00:00Z")
        );
        // Summer time (UTC+2): 07:00 Berlin is 05:00 UTC.
        assert_eq!(
            quiet.release_time(at("2026-07-01T23:00:00Z")),
            at("2026-07-02T05:00:00Z")
        );
    }

    #[test]
    fn a_same_day_window_and_bad_input() {
        let quiet = QuietHours::new("12:00", "13:30", "UTC").unwrap();
        assert_eq!(
            quiet.release_time(at("2026-12-01T12:10:00Z")),
            at("2026-12-01T13:30:00Z")
        );
        assert_eq!(
            quiet.release_time(at("2026-12-01T13:30:00Z")),
            at("2026-12-01T13:30:00Z")
        );
        assert!(QuietHours::new("12:00", "12:00", "UTC").is_err());
        assert!(QuietHours::new("25:00", "12:00", "UTC").is_err());
        assert!(QuietHours::new("10:00", "12:00", "Mars/Olympus").is_err());
    }
}
