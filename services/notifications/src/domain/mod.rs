//! notifications' domain: live updates.
//!
//! - [`feed`]: each user's ordered change feed, and when a reconnect can be recovered;
//! - [`apply`]: the consumer that appends task events to the feeds and ends sessions' sockets;
//! - [`listener`]: how every instance hears of every appended change;
//! - [`hub`]: this instance's sockets by user, and fan-out to them;
//! - [`connection`]: one socket's life;
//! - [`settings`]: the bounds, from the environment.

pub mod apply;
pub mod connection;
pub mod feed;
pub mod hub;
pub mod listener;
pub mod settings;
