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
//!
//! A wait goes on only for a message this room handed back to wait, coming back (a later
//! delivery of the same stream message) within its delay and a minute. JetStream cannot tell
//! more: a NAK carries no header, and a delivery's count and publication time are the same for
//! a message handed back to wait and for one handed back for another reason (a database outage,
//! NAKed on the same schedule; an ack lost; its process stopped), which may meet the unknown
//! customer for the first time and so starts its wait, counted as started. A wait going on that
//! comes back to another instance (the router's consumer is shared; a partition's lease moved),
//! after a restart, or later than that is taken for a new one there: held to the stricter half,
//! never a new wait let in under three quarters.

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

/// How late after its delay a message handed back to wait may come back and go on waiting (it
/// may come back late when its consumer is busy).
const LATE: Duration = Duration::from_secs(60);

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
    /// Each consumer asked about.
    consumers: std::sync::Mutex<HashMap<Waiters, Arc<Consumer>>>,
}

/// What the room knows of one consumer's slots.
#[derive(Default)]
struct Consumer {
    /// Held by the one task reading the slots again. The others decide on the last reading
    /// meanwhile, so a consumer-info request NATS is slow to answer (or never answers, until it
    /// times out) holds up no message but the one that asked; only the first reading, with
    /// nothing to go on before it, is waited for.
    refresher: Mutex<()>,
    counts: std::sync::Mutex<Counts>,
}

/// The last reading of a consumer's slots and the waits started since.
#[derive(Default)]
struct Counts {
    /// `None` until the slots are first read.
    reading: Option<Reading>,
    /// Waits this instance started on the consumer, in all.
    started: u64,
    /// The stream sequences of the messages handed back to wait, each with when it is expected
    /// back at the latest.
    waiting: HashMap<u64, Instant>,
}

/// A reading of a consumer's slots.
struct Reading {
    at: Instant,
    /// `None` when the consumer could not be read: waits are not limited until it can.
    slots: Option<PendingSlots>,
    /// [`Counts::started`] when the reading was asked for: the waits started since (during the
    /// request too, which its answer may not count) are counted on top of it.
    started_before: u64,
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
            consumers: std::sync::Mutex::default(),
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
        if let Err(full) = self.admit(waiters, copy, delay).await {
            waiters.count_refused();
            return Err(Refused::Full(full));
        }
        Ok(delay)
    }

    /// Whether the message `copy` of `waiters` may wait `delay` for its customer. `Err` says why
    /// not.
    async fn admit(&self, waiters: Waiters, copy: Delivery, delay: Duration) -> Result<(), Full> {
        let consumer = self.consumer(waiters);
        consumer.refresh(|| (self.read)(waiters)).await;
        consumer.counts().admit(waiters, copy, delay)
    }

    /// What the room knows of `waiters`' consumer, made empty the first time it is asked about.
    fn consumer(&self, waiters: Waiters) -> Arc<Consumer> {
        let mut consumers = self
            .consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        consumers.entry(waiters).or_default().clone()
    }
}

impl Consumer {
    /// Reads the slots again with `read` when the last reading is [`REFRESH`] old, unless another
    /// task is reading them already: the last reading is used meanwhile.
    async fn refresh(&self, read: impl FnOnce() -> BoxFuture<'static, Option<PendingSlots>>) {
        if !self.counts().is_stale() {
            return;
        }
        let _refreshing = match self.refresher.try_lock() {
            Ok(refreshing) => refreshing,
            Err(_) if self.counts().reading.is_some() => return,
            Err(_) => self.refresher.lock().await,
        };
        let started_before = {
            let counts = self.counts();
            if !counts.is_stale() {
                // Read by the task this one waited for.
                return;
            }
            counts.started
        };
        let slots = read().await;
        let mut counts = self.counts();
        let now = Instant::now();
        counts.reading = Some(Reading {
            at: now,
            slots,
            started_before,
        });
        counts.waiting.retain(|_, back_by| *back_by > now);
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Counts {
    /// Whether the slots are to be read (again).
    fn is_stale(&self) -> bool {
        self.reading
            .as_ref()
            .is_none_or(|reading| reading.at.elapsed() >= REFRESH)
    }

    /// Whether the wait of `copy` for `delay`, a first one or one going on, fits in the slots
    /// last read, with the waits started since counted on top; a first wait admitted is counted,
    /// and every wait admitted is remembered until it is expected back.
    fn admit(&mut self, waiters: Waiters, copy: Delivery, delay: Duration) -> Result<(), Full> {
        let now = Instant::now();
        let going_on = self.goes_on(copy, now);
        if let Some(slots) = self.counted() {
            admit(slots, waiters, going_on)?;
        }
        if !going_on {
            self.started += 1;
        }
        // A delay past the clock's range (no schedule anyone sets) is not remembered: its wait
        // counts as a new one when it comes back.
        let back_by = now.checked_add(delay.saturating_add(LATE)).unwrap_or(now);
        self.waiting.insert(copy.sequence, back_by);
        Ok(())
    }

    /// Whether `copy` is a wait going on: a later delivery of a message handed back to wait, back
    /// when expected (see the module's documentation).
    fn goes_on(&self, copy: Delivery, now: Instant) -> bool {
        copy.count > 1
            && self
                .waiting
                .get(&copy.sequence)
                .is_some_and(|&back_by| back_by > now)
    }

    /// The slots last read, with the waits started since taken too; `None` when they are not
    /// known (not read yet, or unreadable).
    fn counted(&self) -> Option<PendingSlots> {
        let reading = self.reading.as_ref()?;
        let slots = reading.slots?;
        Some(PendingSlots {
            taken: slots
                .taken
                .saturating_add(self.started - reading.started_before),
            ..slots
        })
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

    /// A room that finds `taken` of `limit` slots taken on every consumer.
    fn room_reading(taken: u64, limit: u64) -> WaitingRoom {
        WaitingRoom::reading_with(Box::new(move |_| {
            async move { Some(slots(taken, Some(limit))) }.boxed()
        }))
    }

    /// A schedule that waits far longer than any test.
    fn long_wait() -> RetryPolicy {
        RetryPolicy {
            max_deliveries: 1_000,
            ..RetryPolicy::default()
        }
    }

    /// Delivery `count` of stream message `sequence`, just published.
    fn delivery(sequence: u64, count: u64) -> Delivery {
        Delivery {
            count,
            sequence,
            published: SystemTime::now(),
        }
    }

    /// While a consumer's slots are read again (NATS slow to answer, or not answering until the
    /// request times out), the other messages of that consumer are decided on the last reading
    /// instead of waiting behind the read; the waits they start count on top of the new reading.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reading_holds_up_no_other_message() {
        let asked = Arc::new(tokio::sync::Notify::new());
        let answer = Arc::new(tokio::sync::Notify::new());
        let readings = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let room = Arc::new(WaitingRoom::reading_with(Box::new({
            let (asked, answer) = (asked.clone(), answer.clone());
            move |_| {
                let (asked, answer) = (asked.clone(), answer.clone());
                let first = readings.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                async move {
                    if first {
                        return Some(slots(0, Some(8)));
                    }
                    asked.notify_one();
                    answer.notified().await;
                    Some(slots(5, Some(8)))
                }
                .boxed()
            }
        })));
        let events = Some(Waiters::Events);
        room.may_wait(&long_wait(), events, delivery(1, 1))
            .await
            .expect("a first wait, on the first reading: 0 of 8 slots taken");

        tokio::time::advance(REFRESH).await;
        let refresher = tokio::spawn({
            let room = room.clone();
            async move { room.may_wait(&long_wait(), events, delivery(2, 1)).await }
        });
        tokio::time::timeout(Duration::from_secs(5), asked.notified())
            .await
            .expect("the stale reading is read again");
        let decided = tokio::time::timeout(
            Duration::from_secs(5),
            room.may_wait(&long_wait(), events, delivery(3, 1)),
        )
        .await
        .expect("decided on the last reading while the slots are read again, not behind the read");
        decided.expect("1 wait started on a reading of 0 taken: below half");

        answer.notify_one();
        let refused = tokio::time::timeout(Duration::from_secs(5), refresher)
            .await
            .expect("the reading answered")
            .expect("no panic")
            .expect_err("5 taken, and the wait started during the read");
        assert!(
            refused
                .to_string()
                .starts_with("not waited for: 6 of the router's 8 pending slots"),
            "{refused}"
        );
    }

    /// A message delivered again for another reason than a wait (NAKed during a database outage,
    /// its ack lost, its process restarted) that meets an unknown customer starts a wait: held to
    /// half the slots and counted as started. Only a message this room handed back to wait goes
    /// on waiting under three quarters.
    #[tokio::test]
    async fn a_message_delivered_again_for_another_reason_starts_its_wait() {
        let room = room_reading(2, 8);
        let events = Some(Waiters::Events);
        room.may_wait(&long_wait(), events, delivery(5, 2))
            .await
            .expect("a first wait at delivery 2: 2 of 8 taken");
        room.may_wait(&long_wait(), events, delivery(6, 1))
            .await
            .expect("a first wait: 2 taken + 1 started");
        let refused = room
            .may_wait(&long_wait(), events, delivery(7, 3))
            .await
            .expect_err("a first wait at delivery 3, with half the slots taken");
        assert!(
            refused
                .to_string()
                .starts_with("not waited for: 4 of the router's 8 pending slots"),
            "both waits counted, the one delivered again too: {refused}"
        );
        room.may_wait(&long_wait(), events, delivery(5, 3))
            .await
            .expect("a wait going on, below three quarters");
        room.may_wait(&long_wait(), events, delivery(6, 2))
            .await
            .expect("a wait going on, below three quarters");
    }

    /// A message handed back to wait that comes back a minute later than its delay (its consumer
    /// busy) or not at all (routed elsewhere) is forgotten: a later delivery starts a wait again,
    /// counted as started.
    #[tokio::test(start_paused = true)]
    async fn a_wait_back_later_than_expected_starts_again() {
        let room = room_reading(3, 8);
        let events = Some(Waiters::Events);
        room.may_wait(&long_wait(), events, delivery(1, 1))
            .await
            .expect("a first wait: 3 of 8 taken");
        let delay = room
            .may_wait(&long_wait(), events, delivery(1, 2))
            .await
            .expect("the wait going on: 3 taken + 1 started");
        tokio::time::advance(delay + LATE).await;
        room.may_wait(&long_wait(), events, delivery(1, 3))
            .await
            .expect("a first wait again, on a new reading: 3 taken");
        let refused = room
            .may_wait(&long_wait(), events, delivery(2, 1))
            .await
            .expect_err("the wait started again is counted");
        assert!(
            refused
                .to_string()
                .starts_with("not waited for: 4 of the router's 8 pending slots"),
            "{refused}"
        );
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
