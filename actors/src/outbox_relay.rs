//! `OutboxRelay`: publishes domain events that were stored in the outbox but not confirmed by
//! NATS (the API's immediate publish failed, or the process died in between). Every tick it reads
//! the oldest unpublished rows, publishes each with its event id as `Nats-Msg-Id` (so a row the
//! API did publish is a duplicate JetStream drops) and marks it published. Published rows are
//! removed after the retention time.
//!
//! A failed publish (NATS unreachable, no answer from JetStream in time) or a row the database
//! cannot mark ends the run: the next tick tries again from the oldest row, so no row overtakes
//! an older one. A row that can never be published as it is (larger than the server's
//! `max_payload`) is held back and tried again later with a doubling delay (up to [`MAX_HOLD`]),
//! so it never blocks the rows of other keys behind it; the later rows of its own ordering key
//! (the same order) wait with it, as they must not overtake it; nothing is dropped,
//! each failure is logged with the row's id and counted in `herald_outbox_relay_failures_total`,
//! and `herald_outbox_held` says how many rows are held back.

use std::collections::{HashMap, HashSet};
use std::time::Duration;
use std::time::Instant;

use chrono::Utc;
use herald_entities::{outbox_event, repo::outbox};
use herald_nats::{NatsError, Publisher};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use sea_orm::DatabaseConnection;
use uuid::Uuid;

use crate::scheduler::{PURGE_REST_MAX, PURGE_REST_MIN};

/// Longest a row that fails on its own is held back before it is tried again.
pub const MAX_HOLD: Duration = Duration::from_secs(300);

/// Messages of the [`OutboxRelay`].
pub enum OutboxRelayMsg {
    /// Publish what is pending (sent to itself every interval).
    Tick,
}

/// Settings of the relay.
#[derive(Debug, Clone, Copy)]
pub struct OutboxRelaySettings {
    /// Time between two runs.
    pub interval: Duration,
    /// Rows younger than this are left to the API's own publish.
    pub grace: Duration,
    /// Most rows published per run.
    pub batch: u64,
    /// Published rows are removed after this long.
    pub retention: Duration,
}

impl Default for OutboxRelaySettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            grace: Duration::from_secs(2),
            batch: 200,
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// Arguments of the [`OutboxRelay`].
#[derive(Clone)]
pub struct OutboxRelayArgs {
    /// Database pool.
    pub db: DatabaseConnection,
    /// Publisher.
    pub publisher: Publisher,
    /// Timing.
    pub settings: OutboxRelaySettings,
}

/// The relay.
pub struct OutboxRelay;

/// State of the [`OutboxRelay`].
pub struct OutboxRelayState {
    args: OutboxRelayArgs,
    held: Held,
}

impl Actor for OutboxRelay {
    type Msg = OutboxRelayMsg;
    type State = OutboxRelayState;
    type Arguments = OutboxRelayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<OutboxRelayMsg>,
        args: OutboxRelayArgs,
    ) -> Result<OutboxRelayState, ActorProcessingErr> {
        myself.send_after(args.settings.interval, || OutboxRelayMsg::Tick);
        Ok(OutboxRelayState {
            args,
            held: Held::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<OutboxRelayMsg>,
        message: OutboxRelayMsg,
        state: &mut OutboxRelayState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            OutboxRelayMsg::Tick => {
                relay_pending(&state.args, &mut state.held).await;
                remove_old(&state.args).await;
                // The next tick is scheduled after this run, so slow runs never pile up.
                let interval = state.args.settings.interval;
                myself.send_after(interval, || OutboxRelayMsg::Tick);
            }
        }
        Ok(())
    }
}

/// Rows that failed on their own, held back until a later run: how often each failed in a row
/// and when it may be tried again.
#[derive(Debug, Default)]
pub struct Held(HashMap<Uuid, (u32, Instant)>);

impl Held {
    /// Whether the row `id` is held back at `now`.
    fn holds(&self, id: Uuid, now: Instant) -> bool {
        self.0.get(&id).is_some_and(|&(_, until)| now < until)
    }

    /// Records a failure of `id` at `now`; returns how often it failed and how long it is held.
    fn failed(&mut self, id: Uuid, now: Instant, interval: Duration) -> (u32, Duration) {
        let failures = self.0.get(&id).map_or(0, |&(failures, _)| failures) + 1;
        let hold = crate::retry::doubling(interval.saturating_mul(2), failures, MAX_HOLD);
        self.0.insert(id, (failures, now + hold));
        (failures, hold)
    }

    /// Forgets `id` (it was published).
    fn release(&mut self, id: Uuid) {
        self.0.remove(&id);
    }
}

/// Why one row was not relayed.
enum RelayError {
    /// NATS or the database failed: the run ends, and the rows are relayed in order later.
    Outage(String),
    /// The row itself cannot be published (larger than the server's `max_payload`, or not
    /// JSON): it is held back, the run goes on.
    Row(String),
}

/// Publishes pending rows, oldest first, passing over those `held` back and the later rows of
/// their ordering keys; returns how many were published.
pub async fn relay_pending(args: &OutboxRelayArgs, held: &mut Held) -> usize {
    let before = Utc::now()
        - chrono::Duration::from_std(args.settings.grace).unwrap_or(chrono::Duration::zero());
    // Held rows do not count against the batch, so they cannot crowd out the rows behind them
    // (the later rows of their keys do, but an order has at most four events).
    let limit = args.settings.batch + held.0.len() as u64;
    let rows = match outbox::unpublished(&args.db, before, limit).await {
        Ok(rows) => rows,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the outbox");
            return 0;
        }
    };
    if (rows.len() as u64) < limit {
        // Every unpublished row was read: a held row not among them was published elsewhere.
        held.0.retain(|id, _| rows.iter().any(|row| row.id == *id));
    }
    let now = Instant::now();
    let mut published = 0;
    // Keys of the rows held back in this run: their later rows wait behind them.
    let mut waiting: HashSet<&str> = HashSet::new();
    for row in &rows {
        let key = row.ordering_key.as_deref();
        if key.is_some_and(|key| waiting.contains(key)) {
            continue;
        }
        if held.holds(row.id, now) {
            waiting.extend(key);
            continue;
        }
        match publish(args, row).await {
            Ok(()) => {
                held.release(row.id);
                published += 1;
            }
            Err(RelayError::Outage(err)) => {
                tracing::warn!(id = %row.id, error = %err, "cannot relay an event; trying again later");
                break;
            }
            Err(RelayError::Row(err)) => {
                waiting.extend(key);
                let (failures, hold) = held.failed(row.id, now, args.settings.interval);
                metrics::counter!("herald_outbox_relay_failures_total").increment(1);
                tracing::warn!(id = %row.id, subject = %row.subject, error = %err, failures,
                    retry_in_secs = hold.as_secs(), "cannot relay an event; holding it back with the later events of its key, relaying the others");
            }
        }
    }
    metrics::gauge!("herald_outbox_held").set(held.0.len() as f64);
    if published > 0 {
        tracing::info!(published, "relayed events from the outbox");
        metrics::counter!("herald_outbox_relayed_total").increment(published as u64);
    }
    published
}

async fn publish(args: &OutboxRelayArgs, row: &outbox_event::Model) -> Result<(), RelayError> {
    let payload = serde_json::to_vec(&row.payload).map_err(|e| RelayError::Row(e.to_string()))?;
    // Only a message over the server's limit is the row's own failure; any other (NATS
    // unreachable, no JetStream answer in time, a stream refusing) stops the run, so that the
    // rows after it are not relayed before it.
    args.publisher
        .publish_event(&row.subject, &row.id.to_string(), payload.into())
        .await
        .map_err(|err| match err {
            NatsError::TooLarge { .. } => RelayError::Row(err.to_string()),
            _ => RelayError::Outage(err.to_string()),
        })?;
    outbox::mark_published(&args.db, row.id)
        .await
        .map_err(|e| RelayError::Outage(e.to_string()))
}

/// Published rows removed per DELETE of the clean-up.
const CLEAN_BATCH: u64 = 1_000;

/// Most DELETEs of the clean-up in one tick: after downtime a day of published rows is due at
/// once, and they go over several ticks rather than keep the relay from relaying meanwhile.
const CLEAN_ROUNDS: u32 = 10;

/// Removes rows published longer than the retention time ago, [`CLEAN_BATCH`] per DELETE, up to
/// [`CLEAN_ROUNDS`] of them. Between two it rests as long as the last one took (as retention
/// does, see [`crate::scheduler::purge`]): on SQLite each DELETE holds the only write lock.
async fn remove_old(args: &OutboxRelayArgs) {
    let before = Utc::now()
        - chrono::Duration::from_std(args.settings.retention).unwrap_or(chrono::Duration::zero());
    for round in 1..=CLEAN_ROUNDS {
        let started = Instant::now();
        match outbox::delete_published_before(&args.db, before, CLEAN_BATCH).await {
            Ok(removed) if removed == CLEAN_BATCH && round < CLEAN_ROUNDS => {
                let rest = started.elapsed().clamp(PURGE_REST_MIN, PURGE_REST_MAX);
                tokio::time::sleep(rest).await;
            }
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(error = %err, "cannot clean the outbox");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_row_is_held_back_longer_each_time_up_to_the_maximum() {
        let (mut held, id, now) = (Held::default(), Uuid::now_v7(), Instant::now());
        let second = Duration::from_secs(1);
        assert_eq!(held.failed(id, now, second), (1, 2 * second));
        assert!(held.holds(id, now + second));
        assert!(!held.holds(id, now + 2 * second));
        assert_eq!(held.failed(id, now, second), (2, 4 * second));
        for _ in 0..20 {
            held.failed(id, now, second);
        }
        assert_eq!(held.failed(id, now, second).1, MAX_HOLD);
        held.release(id);
        assert!(!held.holds(id, now));
    }
}
