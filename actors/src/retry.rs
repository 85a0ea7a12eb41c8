//! The retry schedule: exponential backoff with jitter, honouring a provider's Retry-After (or an
//! open circuit's cool-down) with jitter past it; and the wait, on that schedule, for something
//! only time may bring (a customer not registered yet), measured from the message's publication.

use std::fmt;
use std::time::{Duration, SystemTime};

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
    /// Deliveries of a command (of any kind, first included) before which a pass over the chain
    /// that called no provider (every channel's circuit open, or its send queue too long) does
    /// not count toward `max_deliveries`: it waits for the circuit's cool-down instead, so a
    /// provider outage does not use up the retries. From this delivery on such a pass counts
    /// like any other, so a provider that never recovers still ends in the dead-letter stream.
    pub max_deliveries_while_open: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_deliveries: 6,
            base_delay_ms: 2_000,
            max_delay_ms: 300_000,
            max_deliveries_while_open: 40,
        }
    }
}

impl RetryPolicy {
    /// Whether delivery number `delivered` (1-based) was the last one allowed.
    pub fn is_last(&self, delivered: u64) -> bool {
        delivered >= self.max_deliveries.max(1)
    }

    /// Whether round number `round` (1-based) comes after the last one allowed: the last was
    /// walked and recorded already, and only its dead letter is missing.
    pub fn is_past_last(&self, round: u64) -> bool {
        round > self.max_deliveries.max(1)
    }

    /// Whether a pass that called no provider, made at delivery number `delivered` (1-based),
    /// counts toward `max_deliveries`.
    pub fn counts_pass_without_calls(&self, delivered: u64) -> bool {
        delivered >= self.max_deliveries_while_open
    }

    /// Delay before the next delivery after delivery number `delivered` failed.
    ///
    /// The exponential ceiling is `base · 2^(delivered-1)` capped at `max_delay`; the delay is drawn
    /// from the upper half of it (`jitter` in `[0, 1)` picks where), so retries of many
    /// notifications spread out without ever coming back sooner than half the schedule.
    ///
    /// `retry_after` (a provider's Retry-After, an open circuit's cool-down left) is a floor up to
    /// `max_delay`: a receiver asking for a day would otherwise hold the command in JetStream for
    /// a day, a place of its consumer's `max_ack_pending` taken all along. The delay is drawn past
    /// the floor too, from `[floor, floor + spread]` with `spread` the smallest of the floor, the
    /// ceiling and the room left under `max_delay` (`jitter` picks where, as for the backoff), if
    /// that ends later than the backoff drawn: the notifications that waited for the same circuit
    /// or the same provider's time then come back spread out rather than all at its end (a
    /// floor at `max_delay` leaves no room).
    pub fn delay(&self, delivered: u64, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let ceiling = self.ceiling_ms(delivered);
        // `as` casts saturate, and a NaN jitter counts as 0.
        let share = |ms: u64| (ms as f64 * jitter.clamp(0.0, 1.0)) as u64;
        let backoff = Duration::from_millis(ceiling / 2 + share(ceiling / 2));
        let Some(floor) = retry_after else {
            return backoff;
        };
        let most = Duration::from_millis(self.max_delay_ms);
        let floor = floor.min(most);
        let spread = floor
            .min(Duration::from_millis(ceiling))
            .min(most.saturating_sub(floor));
        let past_floor = Duration::from_millis(share(spread.as_millis() as u64));
        backoff.max(floor + past_floor)
    }

    /// The exponential ceiling of the delay after delivery number `delivered`, in milliseconds.
    fn ceiling_ms(&self, delivered: u64) -> u64 {
        let exponent = delivered.saturating_sub(1).min(32) as u32;
        self.base_delay_ms
            .saturating_mul(1u64 << exponent)
            .min(self.max_delay_ms)
    }

    /// The whole length of the schedule: the sum of the ceilings of its delays between the first
    /// delivery and the last allowed (62 s by default). The delays drawn add up to between half
    /// of it and all of it.
    pub fn total_wait(&self) -> Duration {
        let delays = self.max_deliveries.max(1) - 1;
        let mut total: u64 = 0;
        for delivered in 1..=delays {
            let ceiling = self.ceiling_ms(delivered);
            if ceiling >= self.max_delay_ms || delivered > 32 {
                // Every later delay has this ceiling too.
                let rest = delays - delivered + 1;
                total = total.saturating_add(ceiling.saturating_mul(rest));
                break;
            }
            total = total.saturating_add(ceiling);
        }
        Duration::from_millis(total)
    }

    /// Whether delivery number `delivered` of a message published (stored by JetStream) at
    /// `published` and held back for something only time may bring (a customer not registered
    /// yet) is offered again, or given up at `now`. The wait is measured in time, not in
    /// deliveries, so deliveries handed back for other reasons (a database outage, a rate-limit
    /// deferral) do not shorten it: the message is given up once [`Self::total_wait`] has passed
    /// since its publication, and offered again until then after the schedule's delay for
    /// `delivered` (`jitter` as in [`Self::delay`]), cut to the time left.
    pub fn wait(
        &self,
        published: SystemTime,
        now: SystemTime,
        delivered: u64,
        jitter: f64,
    ) -> Wait {
        // A publication time ahead of this clock (clocks apart) counts as no wait yet.
        let waited = now.duration_since(published).unwrap_or_default();
        let allowed = self.total_wait();
        match allowed.checked_sub(waited) {
            Some(left) if !left.is_zero() => {
                Wait::Again(self.delay(delivered, None, jitter).min(left))
            }
            _ => Wait::GiveUp(GaveUp { waited, allowed }),
        }
    }
}

/// What [`RetryPolicy::wait`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Offer the message again after this delay.
    Again(Duration),
    /// The schedule's whole wait has passed: give the message up.
    GiveUp(GaveUp),
}

/// A wait given up, for the reason recorded: how long it lasted and how long the schedule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaveUp {
    /// From the message's publication to the decision.
    pub waited: Duration,
    /// [`RetryPolicy::total_wait`].
    pub allowed: Duration,
}

impl fmt::Display for GaveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "given up after waiting {:.1} s since it was published; dispatch.retry waits {:.1} s",
            self.waited.as_secs_f64(),
            self.allowed.as_secs_f64()
        )
    }
}

/// The rest before the next try of work that failed `failures` times in a row (counted from 1):
/// `first`, doubled for each failure after the first, at most `most`.
pub(crate) fn doubling(first: Duration, failures: u32, most: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    first.saturating_mul(1 << doublings).min(most)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_deliveries: 4,
            base_delay_ms: 1_000,
            max_delay_ms: 10_000,
            max_deliveries_while_open: 10,
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
    fn waits_on_the_same_floor_are_spread_past_it_not_ended_together() {
        let p = policy();
        let floor = Duration::from_secs(4);
        // After delivery 1 the schedule's ceiling is 1 s: the floor, then up to 1 s more.
        let draws: Vec<Duration> = (0..=1_000)
            .map(|i| p.delay(1, Some(floor), f64::from(i) / 1_000.0))
            .collect();
        let spread = Duration::from_secs(1);
        for (i, delay) in draws.iter().enumerate() {
            assert!(
                *delay >= floor && *delay <= floor + spread,
                "draw {i}: {delay:?} outside [{floor:?}, {:?}]",
                floor + spread
            );
        }
        assert_eq!(
            draws[0], floor,
            "the floor is honoured exactly at its least"
        );
        assert_eq!(draws[1_000], floor + spread);
        let mut distinct = draws.clone();
        distinct.dedup();
        assert!(
            distinct.len() > 900,
            "{} distinct delays of 1001 draws",
            distinct.len()
        );

        // The spread grows with the schedule, up to the floor itself.
        assert_eq!(p.delay(3, Some(floor), 1.0), Duration::from_secs(8));
        assert_eq!(
            p.delay(3, Some(Duration::from_secs(3)), 0.25),
            Duration::from_millis(3_750),
            "a 3 s floor spread over 3 s, above the 2.5 s backoff drawn"
        );
        assert_eq!(
            p.delay(5, Some(floor), 0.5),
            Duration::from_millis(7_500),
            "a backoff drawn above the spread floor is the delay"
        );
        // Never past max_delay: the spread shrinks to the room left under it.
        assert_eq!(
            p.delay(4, Some(Duration::from_secs(9)), 1.0),
            Duration::from_secs(10)
        );
        assert_eq!(
            p.delay(4, Some(Duration::from_secs(9)), 0.5),
            Duration::from_millis(9_500)
        );
        for jitter in [0.0, 0.5, 1.0] {
            assert_eq!(
                p.delay(1, Some(Duration::from_secs(86_400)), jitter),
                Duration::from_secs(10),
                "a floor at max_delay leaves no room"
            );
        }
        assert_eq!(
            p.delay(1, Some(floor), f64::NAN),
            floor,
            "a jitter that is no number counts as none"
        );
    }

    #[test]
    fn the_whole_wait_is_the_sum_of_the_ceilings() {
        // 1 + 2 + 4 s, then the last delivery.
        assert_eq!(policy().total_wait(), Duration::from_secs(7));
        assert_eq!(
            RetryPolicy::default().total_wait(),
            Duration::from_secs(62),
            "2 + 4 + 8 + 16 + 32 s"
        );
        let capped = RetryPolicy {
            max_deliveries: 8,
            ..policy()
        };
        assert_eq!(
            capped.total_wait(),
            Duration::from_secs(1 + 2 + 4 + 8 + 10 + 10 + 10)
        );
        let once = RetryPolicy {
            max_deliveries: 1,
            ..policy()
        };
        assert_eq!(
            once.total_wait(),
            Duration::ZERO,
            "no delay before the last delivery"
        );
        let endless = RetryPolicy {
            max_deliveries: u64::MAX,
            ..policy()
        };
        assert_eq!(
            endless.total_wait(),
            Duration::from_millis(u64::MAX),
            "saturates rather than overflows"
        );
    }

    #[test]
    fn a_wait_is_measured_from_the_publication_not_in_deliveries() {
        let p = policy();
        let published = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let after = |secs: f64| published + Duration::from_secs_f64(secs);

        assert_eq!(
            p.wait(published, after(0.0), 1, 1.0),
            Wait::Again(Duration::from_secs(1)),
            "the schedule's first delay"
        );
        assert_eq!(
            p.wait(published, after(3.0), 3, 1.0),
            Wait::Again(Duration::from_secs(4)),
            "the schedule's delay for the delivery, while it fits"
        );
        assert_eq!(
            p.wait(published, after(1.0), 9, 1.0),
            Wait::Again(Duration::from_secs(6)),
            "deliveries handed back for other reasons do not end the wait, only cut its delay \
             to the time left"
        );
        assert_eq!(
            p.wait(published, after(6.5), 2, 0.0),
            Wait::Again(Duration::from_millis(500)),
            "the last delay ends with the wait"
        );
        assert_eq!(
            p.wait(published, after(7.0), 2, 0.0),
            Wait::GiveUp(GaveUp {
                waited: Duration::from_secs(7),
                allowed: Duration::from_secs(7),
            }),
            "given up once the whole wait has passed, whatever the delivery"
        );
        assert_eq!(
            p.wait(published, after(30.0), 4, 0.5),
            Wait::GiveUp(GaveUp {
                waited: Duration::from_secs(30),
                allowed: Duration::from_secs(7),
            })
        );
        assert_eq!(
            p.wait(published, published - Duration::from_secs(5), 1, 1.0),
            Wait::Again(Duration::from_secs(1)),
            "a publication ahead of this clock has not been waited for"
        );
        let once = RetryPolicy {
            max_deliveries: 1,
            ..policy()
        };
        assert!(
            matches!(once.wait(published, published, 1, 0.0), Wait::GiveUp(_)),
            "a schedule of one delivery does not wait"
        );
    }

    #[test]
    fn a_wait_given_up_says_how_long_it_lasted() {
        let gave_up = GaveUp {
            waited: Duration::from_millis(3_640),
            allowed: Duration::from_millis(3_400),
        };
        assert_eq!(
            gave_up.to_string(),
            "given up after waiting 3.6 s since it was published; dispatch.retry waits 3.4 s"
        );
    }

    #[test]
    fn last_delivery() {
        let p = policy();
        assert!(!p.is_last(3));
        assert!(p.is_last(4) && p.is_last(5));
        assert!(!p.is_past_last(4) && p.is_past_last(5));
    }

    #[test]
    fn passes_without_calls_count_only_from_their_own_limit() {
        let p = policy();
        assert!(!p.counts_pass_without_calls(9));
        assert!(p.counts_pass_without_calls(10) && p.counts_pass_without_calls(11));
    }
}
