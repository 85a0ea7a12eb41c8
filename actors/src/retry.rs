//! The retry schedule: exponential backoff with full jitter, honouring a provider's Retry-After.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often and how far apart a notification is retried before it is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Deliveries of a command (first try included) before it is dead.
    pub max_deliveries: u64,
    /// Backoff before the second delivery, in milliseconds; doubles each time.
    pub base_delay_ms: u64,
    /// Ceiling of the backoff, in milliseconds.
    pub max_delay_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_deliveries: 6,
            base_delay_ms: 2_000,
            max_delay_ms: 300_000,
        }
    }
}

impl RetryPolicy {
    /// Whether delivery number `delivered` (1-based) was the last one allowed.
    pub fn is_last(&self, delivered: u64) -> bool {
        delivered >= self.max_deliveries.max(1)
    }

    /// Delay before the next delivery after delivery number `delivered` failed.
    ///
    /// The exponential ceiling is `base · 2^(delivered-1)` capped at `max_delay`; the delay is drawn
    /// from the upper half of it (`jitter` in `[0, 1)` picks where), so retries of many
    /// notifications spread out without ever coming back sooner than half the schedule. A
    /// provider's `retry_after` is a floor up to `max_delay`: a receiver asking for a day would
    /// otherwise hold the command in JetStream for a day, a place of its consumer's
    /// `max_ack_pending` taken all along.
    pub fn delay(&self, delivered: u64, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let exponent = delivered.saturating_sub(1).min(32) as u32;
        let ceiling = self
            .base_delay_ms
            .saturating_mul(1u64 << exponent)
            .min(self.max_delay_ms);
        let jitter = jitter.clamp(0.0, 1.0);
        let backoff = Duration::from_millis(ceiling / 2 + ((ceiling / 2) as f64 * jitter) as u64);
        let most = Duration::from_millis(self.max_delay_ms);
        retry_after.map_or(backoff, |floor| backoff.max(floor.min(most)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_deliveries: 4,
            base_delay_ms: 1_000,
            max_delay_ms: 10_000,
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = policy();
        assert_eq!(p.delay(1, None, 1.0), Duration::from_millis(1_000));
        assert_eq!(p.delay(2, None, 1.0), Duration::from_millis(2_000));
        assert_eq!(p.delay(3, None, 1.0), Duration::from_millis(4_000));
        assert_eq!(p.delay(10, None, 1.0), Duration::from_millis(10_000));
        assert_eq!(p.delay(u64::MAX, None, 1.0), Duration::from_millis(10_000));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let p = policy();
        assert_eq!(p.delay(3, None, 0.0), Duration::from_millis(2_000));
        let mid = p.delay(3, None, 0.5);
        assert!(mid > Duration::from_millis(2_000) && mid < Duration::from_millis(4_000));
    }

    #[test]
    fn retry_after_is_a_floor_up_to_the_ceiling() {
        let p = policy();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(8)), 0.0),
            Duration::from_secs(8)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(86_400)), 0.0),
            Duration::from_millis(10_000),
            "a provider's day is capped at max_delay"
        );
        assert_eq!(
            p.delay(3, Some(Duration::from_millis(10)), 1.0),
            Duration::from_millis(4_000)
        );
    }

    #[test]
    fn last_delivery() {
        let p = policy();
        assert!(!p.is_last(3));
        assert!(p.is_last(4) && p.is_last(5));
    }
}
