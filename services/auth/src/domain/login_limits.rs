//! Login attempt limits per username and per client address (GCRA, via `governor`).
//!
//! Both limits count every attempt, successful or not. They live in each process: with N
//! replicas a client gets up to N times the limit, which still stops online guessing. Idle keys
//! are forgotten periodically so the maps stay small.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

pub struct LoginLimits {
    by_username: DefaultKeyedRateLimiter<String>,
    by_client: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl LoginLimits {
    pub fn new(per_username_per_minute: NonZeroU32, per_client_per_minute: NonZeroU32) -> Self {
        Self {
            by_username: RateLimiter::keyed(Quota::per_minute(per_username_per_minute)),
            by_client: RateLimiter::keyed(Quota::per_minute(per_client_per_minute)),
            clock: DefaultClock::default(),
        }
    }

    /// Counts one attempt; `Err` holds how long to wait when a limit is exhausted.
    pub fn attempt(&self, username: &str, client: Option<IpAddr>) -> Result<(), Duration> {
        let wait = |not_until: governor::NotUntil<_>| not_until.wait_time_from(self.clock.now());
        if let Some(client) = client {
            self.by_client.check_key(&client).map_err(wait)?;
        }
        self.by_username
            .check_key(&username.to_owned())
            .map_err(wait)
    }

    /// Drops keys whose limits have fully recovered.
    pub fn forget_idle(&self) {
        self.by_username.retain_recent();
        self.by_username.shrink_to_fit();
        self.by_client.retain_recent();
        self.by_client.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_username: u32, per_client: u32) -> LoginLimits {
        LoginLimits::new(
            NonZeroU32::new(per_username).unwrap(),
            NonZeroU32::new(per_client).unwrap(),
        )
    }

    #[test]
    fn a_username_gets_its_burst_then_waits() {
        let limits = limits(3, 100);
        for _ in 0..3 {
            assert!(limits.attempt("alice", None).is_ok());
        }
        let wait = limits.attempt("alice", None).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(
            limits.attempt("bob", None).is_ok(),
            "other users are not affected"
        );
    }

    #[test]
    fn a_client_is_limited_across_usernames() {
        let limits = limits(100, 2);
        let client = Some(IpAddr::from([10, 0, 0, 1]));
        assert!(limits.attempt("a", client).is_ok());
        assert!(limits.attempt("b", client).is_ok());
        assert!(limits.attempt("c", client).is_err());
        assert!(limits
            .attempt("c", Some(IpAddr::from([10, 0, 0, 2])))
            .is_ok());
    }
}
