//! How many events for customers Herald does not know may wait for them. A waiting event is handed
//! back to JetStream with a delay and holds one of the `herald-router` consumer's
//! `max_ack_pending` slots until it is routed or given up; with every slot held, JetStream delivers
//! nothing new and events for known customers stall behind the waits. So an event starts waiting
//! only while fewer than half the slots are taken, and goes on waiting (a later delivery) only
//! while fewer than three quarters are; otherwise it is dead-lettered at once (replayable once the
//! customer exists). The rest is always left to the other events.
//!
//! The slots taken are the consumer's own figure, shared by every instance, read at most once a
//! second; the waits this instance started since are counted on top of it.

use std::fmt;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use herald_nats::PendingSlots;
use tokio::sync::Mutex;

/// How long a reading of the consumer's slots is used before it is read again.
const REFRESH: Duration = Duration::from_secs(1);

/// Decides whether an event for an unknown customer may wait (shared by all routing tasks).
pub struct WaitingRoom {
    js: jetstream::Context,
    reading: Mutex<Option<Reading>>,
}

/// The last reading of the consumer's slots.
struct Reading {
    at: Instant,
    /// `None` when the consumer could not be read: waits are not limited until it can.
    slots: Option<PendingSlots>,
    /// Waits this instance started since.
    started: u64,
}

impl WaitingRoom {
    /// Reads the `herald-router` consumer through `js`.
    pub fn new(js: jetstream::Context) -> Self {
        Self {
            js,
            reading: Mutex::new(None),
        }
    }

    /// Whether an event may wait for its customer: a first wait (`going_on` false) or a wait going
    /// on (an event delivered again). `Err` says why not.
    pub(crate) async fn admit(&self, going_on: bool) -> Result<(), Full> {
        let mut reading = self.reading.lock().await;
        let stale = reading.as_ref().is_none_or(|r| r.at.elapsed() >= REFRESH);
        if stale {
            *reading = Some(self.read().await);
        }
        let Some(reading) = reading.as_mut() else {
            return Ok(());
        };
        let Some(slots) = reading.slots else {
            return Ok(());
        };
        let counted = PendingSlots {
            taken: slots.taken + reading.started,
            ..slots
        };
        admit(counted, going_on)?;
        if !going_on {
            reading.started += 1;
        }
        Ok(())
    }

    async fn read(&self) -> Reading {
        let slots = match herald_nats::router_pending_slots(&self.js).await {
            Ok(slots) => Some(slots),
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the router's pending slots; waits for unknown customers are not limited until it can");
                None
            }
        };
        Reading {
            at: Instant::now(),
            slots,
            started: 0,
        }
    }
}

/// Whether a wait fits in `slots` (see the module's documentation).
fn admit(slots: PendingSlots, going_on: bool) -> Result<(), Full> {
    let Some(limit) = slots.limit else {
        return Ok(());
    };
    let allowed = if going_on {
        limit - limit / 4
    } else {
        limit / 2
    };
    if slots.taken < allowed {
        return Ok(());
    }
    Err(Full {
        taken: slots.taken,
        limit,
        allowed,
        going_on,
    })
}

/// A wait refused: the slots taken, and how many a wait allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full {
    taken: u64,
    limit: u64,
    allowed: u64,
    going_on: bool,
}

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (no, starts) = if self.going_on {
            ("no longer", "goes on waiting")
        } else {
            ("not", "starts waiting")
        };
        write!(
            f,
            "{no} waited for: {} of the router's {} pending slots are taken by events waiting or \
             being routed, and an event {starts} for its customer only while fewer than {} are, \
             so that waiting events cannot hold up the others; replay it once the customer exists",
            self.taken, self.limit, self.allowed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(taken: u64, limit: Option<u64>) -> PendingSlots {
        PendingSlots { taken, limit }
    }

    #[test]
    fn a_wait_starts_below_half_the_slots_and_goes_on_below_three_quarters() {
        assert_eq!(admit(slots(9_999, Some(20_000)), false), Ok(()));
        let full = admit(slots(10_000, Some(20_000)), false).expect_err("half taken");
        assert_eq!(
            full.to_string(),
            "not waited for: 10000 of the router's 20000 pending slots are taken by events \
             waiting or being routed, and an event starts waiting for its customer only while \
             fewer than 10000 are, so that waiting events cannot hold up the others; replay it \
             once the customer exists"
        );
        assert_eq!(admit(slots(14_999, Some(20_000)), true), Ok(()));
        let full = admit(slots(15_000, Some(20_000)), true).expect_err("three quarters taken");
        assert!(
            full.to_string()
                .starts_with("no longer waited for: 15000 of the router's 20000"),
            "{full}"
        );
        assert!(full.to_string().contains("goes on waiting"), "{full}");
    }

    #[test]
    fn a_consumer_without_a_limit_lets_every_event_wait() {
        assert_eq!(admit(slots(u64::MAX, None), false), Ok(()));
    }

    #[test]
    fn a_single_slot_lets_no_event_start_waiting() {
        assert!(admit(slots(0, Some(1)), false).is_err());
        assert_eq!(
            admit(slots(u64::MAX / 2, Some(u64::MAX)), true),
            Ok(()),
            "no overflow"
        );
    }
}
