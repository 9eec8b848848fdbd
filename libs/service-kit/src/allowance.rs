//! A token bucket small enough to keep per socket or per process: at most `burst` at once, then
//! one more per `every`. Kept as the time at which it is full again (GCRA), so it is one
//! `Instant` and costs no timer. Not shared: wrap it in a lock where several tasks take from it.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Allowance {
    burst: u32,
    every: Duration,
    full_at: Instant,
}

impl Allowance {
    /// Full at `now`.
    pub fn new(burst: u32, every: Duration, now: Instant) -> Self {
        Self {
            burst,
            every,
            full_at: now,
        }
    }

    /// Takes one at `now`, if one is left.
    pub fn take(&mut self, now: Instant) -> bool {
        let full_at = self.full_at.max(now) + self.every;
        if full_at > now + self.every * self.burst {
            return false;
        }
        self.full_at = full_at;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allowance_gives_its_burst_then_one_per_interval() {
        let start = Instant::now();
        let every = Duration::from_secs(60);
        let mut allowance = Allowance::new(3, every, start);
        assert!((0..3).all(|_| allowance.take(start)));
        assert!(!allowance.take(start));
        assert!(!allowance.take(start + every / 2));
        assert!(allowance.take(start + every));
        assert!(!allowance.take(start + every));
        // Unused time refills it, up to the burst only.
        let later = start + every * 100;
        assert!((0..3).all(|_| allowance.take(later)));
        assert!(!allowance.take(later));
    }
}
