//! A token bucket: `capacity` tokens, refilled continuously at `capacity` per `period`. A send
//! takes one token; with none left, the bucket says how long until one is free, or reserves the
//! next token to refill (going into debt), so that sends held back each get a slot of their own,
//! one token apart, in the order they asked. Time is passed in, so tests drive the clock.

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
        self.reserve(spec, now, Duration::ZERO).map(|_| ())
    }

    /// Takes a token at `now` if one is free (`Ok(Duration::ZERO)`). Otherwise reserves the next
    /// token to refill, after those reserved already, and answers how long until it exists, if
    /// that is less than `within`: the bucket goes into debt, so the next reservation waits one
    /// token longer. A token further away than `within` is not reserved: the bucket says how
    /// long until one is free and takes nothing.
    pub fn reserve(
        &mut self,
        spec: &BucketSpec,
        now: Instant,
        within: Duration,
    ) -> Result<Duration, Duration> {
        self.refill(spec, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(Duration::ZERO);
        }
        let missing = 1.0 - self.tokens;
        let wait = spec.per_token().as_secs_f64() * missing;
        // Rounded up to the millisecond, so waiting that long always finds the token.
        let wait = Duration::from_millis((wait * 1000.0).ceil() as u64);
        if wait < within {
            self.tokens -= 1.0;
            Ok(wait)
        } else {
            Err(wait)
        }
    }

    /// Takes a token at `now` whether one is free or not, going into debt if none is: for a send
    /// that must go (one a bucket that no longer exists allowed), so later sends wait for the
    /// debt to refill rather than this one being refused.
    pub fn charge(&mut self, spec: &BucketSpec, now: Instant) {
        self.refill(spec, now);
        self.tokens -= 1.0;
    }

    /// Tokens left at `now` (fractional while refilling; below zero while in debt for reserved
    /// tokens).
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

    #[test]
    fn deferrals_reserve_one_token_apart_in_order() {
        let spec = BucketSpec {
            capacity: 30,
            period: Duration::from_secs(60),
        };
        let t0 = Instant::now();
        let hold = Duration::from_secs(300);
        let mut bucket = TokenBucket::full(&spec, t0);
        for _ in 0..30 {
            assert_eq!(bucket.reserve(&spec, t0, hold), Ok(Duration::ZERO));
        }
        let waits: Vec<u64> = (0..5)
            .map(|_| bucket.reserve(&spec, t0, hold).expect("reserved").as_secs())
            .collect();
        assert_eq!(
            waits,
            vec![2, 4, 6, 8, 10],
            "a token every 2 s, each its own"
        );
        assert_eq!(
            bucket.tokens(&spec, t0),
            -5.0,
            "in debt for the five reserved"
        );
        let later = t0 + Duration::from_secs(3);
        assert_eq!(
            bucket.reserve(&spec, later, hold),
            Ok(Duration::from_secs(9)),
            "a newcomer comes after every reservation: the sixth token is due at 12 s"
        );
        assert!(
            bucket.take(&spec, t0 + Duration::from_secs(13)).is_err(),
            "reserved tokens are not free for a send that does not wait"
        );
        assert_eq!(bucket.take(&spec, t0 + Duration::from_secs(14)), Ok(()));
    }

    #[test]
    fn a_token_further_than_the_hold_is_not_reserved() {
        let spec = BucketSpec {
            capacity: 2,
            period: Duration::from_secs(60),
        };
        let t0 = Instant::now();
        let hold = Duration::from_secs(60);
        let mut bucket = TokenBucket::full(&spec, t0);
        bucket.take(&spec, t0).expect("first");
        bucket.take(&spec, t0).expect("second");
        assert_eq!(bucket.reserve(&spec, t0, hold), Ok(Duration::from_secs(30)));
        for _ in 0..3 {
            assert_eq!(
                bucket.reserve(&spec, t0, hold),
                Err(Duration::from_secs(60)),
                "60 s away is not within the hold: nothing is taken"
            );
        }
        assert_eq!(bucket.tokens(&spec, t0), -1.0);
        assert_eq!(
            bucket.take(&spec, t0 + Duration::from_secs(30)),
            Err(Duration::from_secs(30)),
            "the token refilled at 30 s is the reserved one"
        );
    }
}
