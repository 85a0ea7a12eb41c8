//! How many messages for customers Herald does not know may wait for them: events on the
//! `herald-router` consumer, send commands on each command partition's `herald-dispatch-<n>`. A
//! waiting message is handed back to JetStream with a delay and holds one of its consumer's
//! `max_ack_pending` slots until it is worked on or given up; with every slot held, JetStream
//! delivers nothing new and messages for known customers stall behind the waits. So a message
//! starts waiting only while fewer than half the slots are taken, and goes on waiting (a later
//! delivery) only while fewer than three quarters are; otherwise it is dead-lettered at once
//! (replayable once the customer exists). The rest is always left to the other messages.
//!
//! The slots taken are the consumer's own figure, shared by every instance, read at most once a
//! second per consumer; the waits this instance started since are counted on top of it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use futures::future::{BoxFuture, FutureExt};
use herald_nats::{PendingSlots, subjects};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::pull::Delivery;
use crate::retry::{GaveUp, RetryPolicy, Wait};

/// How long a reading of a consumer's slots is used before it is read again.
const REFRESH: Duration = Duration::from_secs(1);

/// The consumer whose messages wait for their customer, and what those messages are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Waiters {
    /// Events, on the `herald-router` consumer of the `EVENTS` stream.
    Events,
    /// Send commands of one partition, on its `herald-dispatch-<n>` consumer of `NOTIFY`.
    Commands {
        /// The command partition.
        partition: u32,
    },
}

impl Waiters {
    /// The consumer's stream and durable name.
    fn consumer(self) -> (&'static str, String) {
        match self {
            Self::Events => (
                subjects::EVENTS_STREAM,
                subjects::ROUTER_CONSUMER.to_string(),
            ),
            Self::Commands { partition } => (
                subjects::NOTIFY_STREAM,
                subjects::dispatch_consumer(partition),
            ),
        }
    }

    /// Counts a message of these waiters refused a wait because their slots were taken.
    fn count_refused(self) {
        let name = match self {
            Self::Events => "herald_events_wait_refused_total",
            Self::Commands { .. } => "herald_commands_wait_refused_total",
        };
        metrics::counter!(name).increment(1);
    }
}

/// Reads a consumer's slots: `None` when it cannot be read.
type ReadSlots = Box<dyn Fn(Waiters) -> BoxFuture<'static, Option<PendingSlots>> + Send + Sync>;

/// Decides whether a message for an unknown customer may wait, each consumer by its own slots
/// (shared by all the tasks working on messages).
pub struct WaitingRoom {
    read: ReadSlots,
    /// The last reading of each consumer asked about.
    readings: std::sync::Mutex<HashMap<Waiters, Arc<Mutex<Option<Reading>>>>>,
}

/// The last reading of a consumer's slots.
struct Reading {
    at: Instant,
    /// `None` when the consumer could not be read: waits are not limited until it can.
    slots: Option<PendingSlots>,
    /// Waits this instance started since.
    started: u64,
}

impl WaitingRoom {
    /// Reads the consumers through `js`.
    pub fn new(js: jetstream::Context) -> Self {
        Self::reading_with(Box::new(move |waiters| {
            let js = js.clone();
            async move { read(&js, waiters).await }.boxed()
        }))
    }

    /// Reads the consumers' slots with `read`.
    fn reading_with(read: ReadSlots) -> Self {
        Self {
            read,
            readings: std::sync::Mutex::default(),
        }
    }

    /// Whether the message `copy` of `waiters`, for a customer Herald does not know, waits for it
    /// on `retry`'s schedule ([`RetryPolicy::wait`]): `Ok` with the delay before it is offered
    /// again, or `Err` with why it is dead-lettered instead (the schedule's whole wait has passed,
    /// or waiting messages hold their share of the consumer's slots, counted in the waiters'
    /// `herald_*_wait_refused_total`). `waiters` is `None` for a message of a consumer whose slots
    /// are not known (a command whose subject names no partition): its waits are not limited.
    pub(crate) async fn may_wait(
        &self,
        retry: &RetryPolicy,
        waiters: Option<Waiters>,
        copy: Delivery,
    ) -> Result<Duration, Refused> {
        let delay = match retry.wait(
            copy.published,
            SystemTime::now(),
            copy.count,
            rand::random(),
        ) {
            Wait::Again(delay) => delay,
            Wait::GiveUp(gave_up) => return Err(Refused::GaveUp(gave_up)),
        };
        let Some(waiters) = waiters else {
            return Ok(delay);
        };
        if let Err(full) = self.admit(waiters, copy.count > 1).await {
            waiters.count_refused();
            return Err(Refused::Full(full));
        }
        Ok(delay)
    }

    /// Whether a message of `waiters` may wait for its customer: a first wait (`going_on` false)
    /// or a wait going on (a message delivered again). `Err` says why not.
    async fn admit(&self, waiters: Waiters, going_on: bool) -> Result<(), Full> {
        let reading = self.reading_of(waiters);
        let mut reading = reading.lock().await;
        let stale = reading.as_ref().is_none_or(|r| r.at.elapsed() >= REFRESH);
        if stale {
            *reading = Some(Reading {
                slots: (self.read)(waiters).await,
                at: Instant::now(),
                started: 0,
            });
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
        admit(counted, waiters, going_on)?;
        if !going_on {
            reading.started += 1;
        }
        Ok(())
    }

    /// The reading of `waiters`' consumer, made empty the first time it is asked about.
    fn reading_of(&self, waiters: Waiters) -> Arc<Mutex<Option<Reading>>> {
        let mut readings = self
            .readings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        readings.entry(waiters).or_default().clone()
    }
}

/// Reads the slots of `waiters`' consumer through `js`; `None`, with a warning, when it cannot.
async fn read(js: &jetstream::Context, waiters: Waiters) -> Option<PendingSlots> {
    let (stream, consumer) = waiters.consumer();
    match herald_nats::pending_slots(js, stream, &consumer).await {
        Ok(slots) => Some(slots),
        Err(err) => {
            tracing::warn!(%consumer, error = %err, "cannot read the consumer's pending slots; waits for unknown customers are not limited until it can");
            None
        }
    }
}

/// Why a message for an unknown customer does not wait (any longer) for it: its dead letter's
/// reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The retry schedule's whole wait has passed since it was published.
    GaveUp(GaveUp),
    /// Waiting messages hold their share of its consumer's slots.
    Full(Full),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::GaveUp(gave_up) => gave_up.fmt(f),
            Self::Full(full) => full.fmt(f),
        }
    }
}

/// Whether a wait fits in `slots` (see the module's documentation).
fn admit(slots: PendingSlots, waiters: Waiters, going_on: bool) -> Result<(), Full> {
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
        waiters,
        taken: slots.taken,
        limit,
        allowed,
        going_on,
    })
}

/// A wait refused: whose slots, how many are taken, and how many a wait allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Full {
    waiters: Waiters,
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
        let (whose, messages, worked_on, a_message) = match self.waiters {
            Waiters::Events => ("the router's".to_string(), "events", "routed", "an event"),
            Waiters::Commands { partition } => (
                format!("partition {partition}'s"),
                "commands",
                "delivered",
                "a command",
            ),
        };
        write!(
            f,
            "{no} waited for: {} of {whose} {} pending slots are taken by {messages} waiting or \
             being {worked_on}, and {a_message} {starts} for its customer only while fewer than \
             {} are, so that waiting {messages} cannot hold up the others; replay it once the \
             customer exists",
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
        assert_eq!(
            admit(slots(9_999, Some(20_000)), Waiters::Events, false),
            Ok(())
        );
        let full =
            admit(slots(10_000, Some(20_000)), Waiters::Events, false).expect_err("half taken");
        assert_eq!(
            full.to_string(),
            "not waited for: 10000 of the router's 20000 pending slots are taken by events \
             waiting or being routed, and an event starts waiting for its customer only while \
             fewer than 10000 are, so that waiting events cannot hold up the others; replay it \
             once the customer exists"
        );
        assert_eq!(
            admit(slots(14_999, Some(20_000)), Waiters::Events, true),
            Ok(())
        );
        let full = admit(slots(15_000, Some(20_000)), Waiters::Events, true)
            .expect_err("three quarters taken");
        assert!(
            full.to_string()
                .starts_with("no longer waited for: 15000 of the router's 20000"),
            "{full}"
        );
        assert!(full.to_string().contains("goes on waiting"), "{full}");
    }

    #[test]
    fn a_refused_command_says_whose_slots_it_found_taken() {
        let partition_3 = Waiters::Commands { partition: 3 };
        assert_eq!(admit(slots(3, Some(8)), partition_3, false), Ok(()));
        let full = admit(slots(4, Some(8)), partition_3, false).expect_err("half taken");
        assert_eq!(
            full.to_string(),
            "not waited for: 4 of partition 3's 8 pending slots are taken by commands waiting or \
             being delivered, and a command starts waiting for its customer only while fewer \
             than 4 are, so that waiting commands cannot hold up the others; replay it once the \
             customer exists"
        );
        assert_eq!(
            partition_3.consumer(),
            ("NOTIFY", "herald-dispatch-3".to_string())
        );
    }

    #[test]
    fn a_consumer_without_a_limit_lets_every_event_wait() {
        assert_eq!(admit(slots(u64::MAX, None), Waiters::Events, false), Ok(()));
    }

    #[test]
    fn a_single_slot_lets_no_event_start_waiting() {
        assert!(admit(slots(0, Some(1)), Waiters::Events, false).is_err());
        assert_eq!(
            admit(slots(u64::MAX / 2, Some(u64::MAX)), Waiters::Events, true),
            Ok(()),
            "no overflow"
        );
    }
}
