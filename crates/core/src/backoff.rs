//! Jittered exponential backoff, the one implementation every retry loop
//! uses (the event listener, the client's reconnects and refetches, the
//! audit shipper): each delay is drawn from [d/2, d] ("equal jitter"), so a
//! fleet that lost the same thing at the same moment does not come back in
//! the same millisecond, and d doubles up to a ceiling.

use std::time::Duration;

use rand::Rng as _;

/// A backoff schedule.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Delays from `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay (jittered), then doubles the base.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        if base.is_zero() {
            return base;
        }
        rand::rng().random_range(base / 2..=base)
    }

    /// The delay before retry `n` (0-based) of a schedule that keeps no
    /// state between attempts (a durable queue's retries): `min · 2^n`,
    /// capped at `max`, jittered like [`Self::next_delay`].
    pub fn nth(min: Duration, max: Duration, n: u32) -> Duration {
        let mut b = Self::new(min, max);
        b.current = min.saturating_mul(1u32 << n.min(30)).min(b.max);
        b.next_delay()
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_with_jitter_up_to_the_ceiling_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let bases = [100u64, 200, 400, 500, 500];
        for base in bases {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(base / 2) && d <= Duration::from_millis(base),
                "{d:?} for base {base}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
