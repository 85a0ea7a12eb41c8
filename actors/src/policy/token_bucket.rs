//! A token bucket: `capacity` tokens, refilled continuously at `capacity` per `period`. A send
//! takes one token; with none left, the bucket says how long until one is free. Time is passed
//! in, so tests drive the clock.

use std::time::{Duration, Instant};

/// The shape of a bucket: `capacity` sends per `period`, with bursts up to `capacity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    /// Tokens when full (the burst).
    pub capacity: u32,
    /// Time to refill from empty to full.
    pub period: Duration,
}

impl BucketSpec {
    /// Time to refill one token.
    pub fn per_token(&self) -> Duration {
        self.period / self.capacity.max(1)
    }
}

/// A bucket's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(spec: &BucketSpec, now: Instant) -> Self {
        Self {
            tokens: f64::from(spec.capacity),
            at: now,
        }
    }

    /// A bucket at `now` with `spent` tokens already used (none left if `spent >= capacity`).
    pub fn spent(spec: &BucketSpec, now: Instant, spent: u32) -> Self {
        Self {
            tokens: f64::from(spec.capacity.saturating_sub(spent)),
            at: now,
        }
    }

    fn refill(&mut self, spec: &BucketSpec, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at);
        let rate = f64::from(spec.capacity) / spec.period.as_secs_f64().max(f64::MIN_POSITIVE);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * rate).min(f64::from(spec.capacity));
        self.at = self.at.max(now);
    }

    /// Takes a token at `now`, or says how long until one is free (nothing is taken then).
    pub fn take(&mut self, spec: &BucketSpec, now: Instant) -> Result<(), Duration> {
        self.refill(spec, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - self.tokens;
        let wait = spec.per_token().as_secs_f64() * missing;
        // Rounded up to the millisecond, so waiting that long always finds the token.
        Err(Duration::from_millis((wait * 1000.0).ceil() as u64))
    }

    /// Tokens left at `now` (fractional while refilling).
    pub fn tokens(&mut self, spec: &BucketSpec, now: Instant) -> f64 {
        self.refill(spec, now);
        self.tokens
    }

    /// Whether the bucket is full at `now`: it then holds nothing a fresh bucket would not.
    pub fn is_full(&mut self, spec: &BucketSpec, now: Instant) -> bool {
        self.tokens(spec, now) >= f64::from(spec.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn three_a_day_then_wait_for_the_refill() {
        let spec = BucketSpec {
            capacity: 3,
            period: DAY,
        };
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(&spec, t0);
        for _ in 0..3 {
            assert_eq!(bucket.take(&spec, t0), Ok(()));
        }
        // One token refills in 8 hours.
        assert_eq!(bucket.take(&spec, t0), Err(Duration::from_secs(8 * 3600)));
        let later = t0 + Duration::from_secs(2 * 3600);
        assert_eq!(
            bucket.take(&spec, later),
            Err(Duration::from_secs(6 * 3600)),
            "a refused take takes nothing"
        );
        let refilled = t0 + Duration::from_secs(8 * 3600);
        assert_eq!(bucket.take(&spec, refilled), Ok(()));
        assert!(bucket.take(&spec, refilled).is_err());
    }

    #[test]
    fn refill_is_capped_at_capacity() {
        let spec = BucketSpec {
            capacity: 30,
            period: Duration::from_secs(60),
        };
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(&spec, t0);
        assert_eq!(bucket.take(&spec, t0), Ok(()));
        assert!(!bucket.is_full(&spec, t0));
        assert!(bucket.is_full(&spec, t0 + Duration::from_secs(2)));
        let much_later = t0 + Duration::from_secs(3600);
        for _ in 0..30 {
            assert_eq!(bucket.take(&spec, much_later), Ok(()));
        }
        assert_eq!(
            bucket.take(&spec, much_later),
            Err(Duration::from_secs(2)),
            "no more than capacity after a long idle time"
        );
    }

    #[test]
    fn a_clock_going_backwards_changes_nothing() {
        let spec = BucketSpec {
            capacity: 1,
            period: Duration::from_secs(10),
        };
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut bucket = TokenBucket::full(&spec, t0);
        assert_eq!(bucket.take(&spec, t0), Ok(()));
        assert!(bucket.take(&spec, t0 - Duration::from_secs(50)).is_err());
        assert_eq!(bucket.take(&spec, t0 + Duration::from_secs(10)), Ok(()));
    }
}
