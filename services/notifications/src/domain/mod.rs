//! notifications' domain: live updates, reminders, the inbox and Web Push.
//!
//! - [`feed`]: each user's ordered change feed, and when a reconnect can be recovered;
//! - [`apply`]: the consumer that appends task events to the feeds, keeps the reminders' schedule
//!   and ends sessions' sockets;
//! - [`listener`]: how every instance hears of every appended change;
//! - [`hub`]: this instance's sockets by user, and fan-out to them;
//! - [`connection`]: one socket's life;
//! - [`reminders`]: the due-date schedule and the scheduler that fires it, once;
//! - [`inbox`]: notifications made from fired reminders, and the user's inbox;
//! - [`preferences`]: per kind push/inbox/off, lead time, quiet hours;
//! - [`devices`]: Web Push subscriptions, checked;
//! - [`push`]: the bounded pool that sends pushes, with retries;
//! - [`settings`]: the bounds, from the environment.

pub mod apply;
pub mod connection;
pub mod devices;
pub mod feed;
pub mod hub;
pub mod inbox;
pub mod listener;
pub mod preferences;
pub mod push;
pub mod reminders;
pub mod settings;
