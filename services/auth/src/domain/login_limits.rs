//! Limits that keep password guessing and signup floods from hurting the account owners.
//!
//! - **Failed logins** are counted, not attempts, under two keys: the account *and* the client
//!   address together (`AUTH_LOGIN_LIMIT_PER_USERNAME`, per minute), and the client address
//!   alone (`AUTH_LOGIN_LIMIT_PER_CLIENT`, per minute, across accounts). A stranger's wrong
//!   guesses therefore block the stranger, never the owner's correct login from another
//!   address; a correct login costs nothing. Guessing one account from many addresses is slowed
//!   by the per-pair limit and the cost of each argon2 verification.
//! - **Signups** are limited per client address (`AUTH_SIGNUP_LIMIT_PER_CLIENT`, per minute,
//!   every attempt: GCRA via `governor`).
//!
//! A failure window is a short list of failure times per key, not a `governor` limiter: GCRA
//! cannot be asked "would the next one pass?" without spending a cell, and a successful login
//! must spend nothing. Limits live in each process: with N replicas a client gets up to N times
//! the limit, which still stops online guessing. Idle keys are forgotten every minute.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The window failures are counted over.
const WINDOW: Duration = Duration::from_secs(60);

/// At most `limit` failures per key within [`WINDOW`].
struct FailureWindow<K> {
    limit: usize,
    failures: Mutex<HashMap<K, VecDeque<Instant>>>,
}

impl<K: Hash + Eq + Clone> FailureWindow<K> {
    fn new(limit: NonZeroU32) -> Self {
        Self {
            limit: limit.get() as usize,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// How long `key` must wait before it may try again, if it used up its failures.
    fn blocked(&self, key: &K, now: Instant) -> Option<Duration> {
        let failures = self.failures.lock().ok()?;
        let recent = failures.get(key)?;
        let in_window = recent
            .iter()
            .filter(|at| now.duration_since(**at) < WINDOW)
            .count();
        (in_window >= self.limit).then(|| {
            let oldest = recent[recent.len() - self.limit];
            WINDOW.saturating_sub(now.duration_since(oldest))
        })
    }

    fn fail(&self, key: &K, now: Instant) {
        let Ok(mut failures) = self.failures.lock() else {
            return;
        };
        let recent = failures.entry(key.clone()).or_default();
        recent.push_back(now);
        // Only the newest `limit` matter.
        while recent.len() > self.limit {
            recent.pop_front();
        }
    }

    fn forget_idle(&self, now: Instant) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.retain(|_, recent| {
                recent
                    .back()
                    .is_some_and(|newest| now.duration_since(*newest) < WINDOW)
            });
            failures.shrink_to_fit();
        }
    }
}

pub struct LoginLimits {
    by_account_and_client: FailureWindow<(String, Option<IpAddr>)>,
    by_client: FailureWindow<IpAddr>,
    signups_by_client: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

impl LoginLimits {
    pub fn new(
        failures_per_account_and_client: NonZeroU32,
        failures_per_client: NonZeroU32,
        signups_per_client: NonZeroU32,
    ) -> Self {
        Self {
            by_account_and_client: FailureWindow::new(failures_per_account_and_client),
            by_client: FailureWindow::new(failures_per_client),
            signups_by_client: RateLimiter::keyed(Quota::per_minute(signups_per_client)),
            clock: DefaultClock::default(),
        }
    }

    /// Whether `client` may try `username` now; `Err` holds how long to wait. Costs nothing:
    /// only failures count ([`Self::failed`]).
    pub fn may_try(&self, username: &str, client: Option<IpAddr>) -> Result<(), Duration> {
        let now = Instant::now();
        let by_pair = self
            .by_account_and_client
            .blocked(&(username.to_owned(), client), now);
        let by_client = client.and_then(|client| self.by_client.blocked(&client, now));
        match by_pair.into_iter().chain(by_client).max() {
            Some(wait) => Err(wait.max(Duration::from_secs(1))),
            None => Ok(()),
        }
    }

    /// Counts a wrong password (or unknown user) from `client` for `username`.
    pub fn failed(&self, username: &str, client: Option<IpAddr>) {
        let now = Instant::now();
        self.by_account_and_client
            .fail(&(username.to_owned(), client), now);
        if let Some(client) = client {
            self.by_client.fail(&client, now);
        }
    }

    /// Counts a signup from `client`; `Err` holds how long to wait once its limit is used up.
    pub fn signup(&self, client: Option<IpAddr>) -> Result<(), Duration> {
        let Some(client) = client else {
            return Ok(());
        };
        self.signups_by_client
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops keys whose limits have fully recovered.
    pub fn forget_idle(&self) {
        let now = Instant::now();
        self.by_account_and_client.forget_idle(now);
        self.by_client.forget_idle(now);
        self.signups_by_client.retain_recent();
        self.signups_by_client.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_pair: u32, per_client: u32, signups: u32) -> LoginLimits {
        LoginLimits::new(
            NonZeroU32::new(per_pair).unwrap(),
            NonZeroU32::new(per_client).unwrap(),
            NonZeroU32::new(signups).unwrap(),
        )
    }

    const STRANGER: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9)));
    const OWNER: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 1)));

    #[test]
    fn a_strangers_failures_block_the_stranger_not_the_owner() {
        let limits = limits(3, 100, 10);
        for _ in 0..3 {
            assert!(limits.may_try("alice", STRANGER).is_ok());
            limits.failed("alice", STRANGER);
        }
        let wait = limits.may_try("alice", STRANGER).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= WINDOW, "{wait:?}");
        assert!(
            limits.may_try("alice", OWNER).is_ok(),
            "the owner elsewhere"
        );
        assert!(limits.may_try("bob", STRANGER).is_ok(), "other accounts");
    }

    #[test]
    fn successes_cost_nothing() {
        let limits = limits(2, 2, 10);
        for _ in 0..50 {
            assert!(limits.may_try("alice", OWNER).is_ok());
        }
    }

    #[test]
    fn a_client_is_limited_across_accounts() {
        let limits = limits(100, 2, 10);
        limits.failed("a", STRANGER);
        limits.failed("b", STRANGER);
        assert!(limits.may_try("c", STRANGER).is_err());
        assert!(limits.may_try("c", OWNER).is_ok());
    }

    #[test]
    fn signups_are_limited_per_client() {
        let limits = limits(10, 10, 2);
        assert!(limits.signup(STRANGER).is_ok());
        assert!(limits.signup(STRANGER).is_ok());
        assert!(limits.signup(STRANGER).is_err());
        assert!(limits.signup(OWNER).is_ok());
    }
}
