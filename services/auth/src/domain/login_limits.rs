//! Limits that keep password guessing and signup floods from hurting the account owners.
//!
//! - **Failed logins** are counted under two keys: the account *and* the client address
//!   together (`AUTH_LOGIN_LIMIT_PER_USERNAME`, per minute), and the client address alone
//!   (`AUTH_LOGIN_LIMIT_PER_CLIENT`, per minute, across accounts). A stranger's wrong guesses
//!   therefore block the stranger, never the owner's correct login from another address; a
//!   correct login costs nothing. Guessing one account from many addresses is slowed by the
//!   per-pair limit and the cost of each argon2 verification.
//! - **Attempts in flight count as failures until they are decided.** A verification takes tens
//!   of milliseconds, and a failure is only known after it: counting recorded failures alone let
//!   80 guesses sent at once all pass the check before the first one failed. So each attempt
//!   holds a place under both keys ([`Attempt`]) from the check until its outcome: a failure
//!   keeps it as a failure, a success (or an error before any verdict) gives it back.
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
/// What a client blocked only by attempts still being verified is asked to wait.
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(1);

/// One key's recent failures and undecided attempts.
#[derive(Default)]
struct KeyState {
    /// The newest failures (at most `limit`), oldest first.
    failures: VecDeque<Instant>,
    /// Attempts that passed the check and are still being verified.
    in_flight: usize,
}

impl KeyState {
    fn failures_within(&self, now: Instant) -> usize {
        self.failures
            .iter()
            .filter(|at| now.duration_since(**at) < WINDOW)
            .count()
    }
}

/// At most `limit` failures per key within [`WINDOW`], attempts in flight included.
struct FailureWindow<K> {
    limit: usize,
    keys: Mutex<HashMap<K, KeyState>>,
}

impl<K: Hash + Eq + Clone> FailureWindow<K> {
    fn new(limit: NonZeroU32) -> Self {
        Self {
            limit: limit.get() as usize,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a place for an attempt of `key`, or says how long to wait: the failures in the
    /// window and the attempts in flight together may not reach the limit.
    fn reserve(&self, key: &K, now: Instant) -> Result<(), Duration> {
        // A poisoned lock means a panic elsewhere; refusing is the safe side of a limit.
        let mut keys = self.keys.lock().map_err(|_| IN_FLIGHT_WAIT)?;
        let state = keys.entry(key.clone()).or_default();
        let failed = state.failures_within(now);
        if failed + state.in_flight < self.limit {
            state.in_flight += 1;
            return Ok(());
        }
        if failed >= self.limit {
            let oldest = state.failures[state.failures.len() - self.limit];
            return Err(WINDOW.saturating_sub(now.duration_since(oldest)));
        }
        // Blocked by attempts still being decided: one of them may succeed and free a place.
        Err(IN_FLIGHT_WAIT)
    }

    /// Ends an attempt reserved with [`Self::reserve`]; a failure stays in the window.
    fn settle(&self, key: &K, failed_at: Option<Instant>) {
        let Ok(mut keys) = self.keys.lock() else {
            return;
        };
        let Some(state) = keys.get_mut(key) else {
            return;
        };
        state.in_flight = state.in_flight.saturating_sub(1);
        if let Some(at) = failed_at {
            state.failures.push_back(at);
            // Only the newest `limit` matter.
            while state.failures.len() > self.limit {
                state.failures.pop_front();
            }
        }
    }

    fn forget_idle(&self, now: Instant) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.retain(|_, state| {
                state.in_flight > 0
                    || state
                        .failures
                        .back()
                        .is_some_and(|newest| now.duration_since(*newest) < WINDOW)
            });
            keys.shrink_to_fit();
        }
    }
}

pub struct LoginLimits {
    by_account_and_client: FailureWindow<(String, Option<IpAddr>)>,
    by_client: FailureWindow<IpAddr>,
    signups_by_client: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

/// A password check that passed the limits and holds its place under them until it is
/// decided: [`Attempt::failed`] counts it as a failure; dropping it (a correct password, or an
/// error before any verdict) gives the place back.
#[must_use = "an attempt holds a place under the limits until it is settled or dropped"]
pub struct Attempt<'a> {
    limits: &'a LoginLimits,
    pair: (String, Option<IpAddr>),
    settled: bool,
}

impl Attempt<'_> {
    /// The password was wrong (or the user unknown): counted against both limits.
    pub fn failed(mut self) {
        let now = Instant::now();
        self.limits
            .by_account_and_client
            .settle(&self.pair, Some(now));
        if let Some(client) = self.pair.1 {
            self.limits.by_client.settle(&client, Some(now));
        }
        self.settled = true;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.limits.by_account_and_client.settle(&self.pair, None);
        if let Some(client) = self.pair.1 {
            self.limits.by_client.settle(&client, None);
        }
    }
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

    /// Starts a password check of `username` by `client`, or says how long to wait (at least a
    /// second). Settle the attempt with [`Attempt::failed`] when the password is wrong; a correct
    /// one costs nothing.
    pub fn attempt(&self, username: &str, client: Option<IpAddr>) -> Result<Attempt<'_>, Duration> {
        let now = Instant::now();
        let pair = (username.to_owned(), client);
        self.by_account_and_client
            .reserve(&pair, now)
            .map_err(at_least_a_second)?;
        if let Some(client) = client {
            if let Err(wait) = self.by_client.reserve(&client, now) {
                self.by_account_and_client.settle(&pair, None);
                return Err(at_least_a_second(wait));
            }
        }
        Ok(Attempt {
            limits: self,
            pair,
            settled: false,
        })
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

fn at_least_a_second(wait: Duration) -> Duration {
    wait.max(Duration::from_secs(1))
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
            limits.attempt("alice", STRANGER).unwrap().failed();
        }
        let wait = limits.attempt("alice", STRANGER).err().unwrap();
        assert!(wait > Duration::ZERO && wait <= WINDOW, "{wait:?}");
        assert!(
            limits.attempt("alice", OWNER).is_ok(),
            "the owner elsewhere"
        );
        assert!(limits.attempt("bob", STRANGER).is_ok(), "other accounts");
    }

    #[test]
    fn successes_cost_nothing() {
        let limits = limits(2, 2, 10);
        for _ in 0..50 {
            drop(limits.attempt("alice", OWNER).unwrap());
        }
    }

    #[test]
    fn attempts_in_flight_count_until_decided() {
        let limits = limits(3, 100, 10);
        let held: Vec<_> = (0..3)
            .map(|_| limits.attempt("alice", STRANGER).unwrap())
            .collect();
        assert_eq!(
            limits.attempt("alice", STRANGER).err(),
            Some(IN_FLIGHT_WAIT),
            "a fourth guess while three are being verified"
        );
        // One turned out right: its place is free again; the two wrong ones stay.
        let mut held = held.into_iter();
        drop(held.next());
        held.for_each(Attempt::failed);
        limits.attempt("alice", STRANGER).unwrap().failed();
        assert!(limits.attempt("alice", STRANGER).is_err(), "three failures");
    }

    #[test]
    fn a_client_is_limited_across_accounts() {
        let limits = limits(100, 2, 10);
        limits.attempt("a", STRANGER).unwrap().failed();
        limits.attempt("b", STRANGER).unwrap().failed();
        assert!(limits.attempt("c", STRANGER).is_err());
        assert!(limits.attempt("c", OWNER).is_ok());
    }

    #[test]
    fn a_refusal_by_the_client_limit_gives_the_pairs_place_back() {
        let limits = limits(1, 1, 10);
        let other = limits.attempt("a", STRANGER).unwrap();
        assert!(
            limits.attempt("b", STRANGER).is_err(),
            "the client's one place is taken"
        );
        drop(other);
        // "b" from the stranger was refused without keeping its pair's only place.
        assert!(limits.attempt("b", STRANGER).is_ok());
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
