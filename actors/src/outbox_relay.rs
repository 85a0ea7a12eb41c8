//! `OutboxRelay`: publishes domain events that were stored in the outbox but not confirmed by
//! NATS (the API's immediate publish failed, or the process died in between). Every tick it reads
//! the oldest unpublished rows, publishes each with its event id as `Nats-Msg-Id` (so a row the
//! API did publish is a duplicate JetStream drops) and marks it published; it stops at the first
//! failure and tries again next tick. Published rows are removed after the retention time.

use std::time::Duration;

use chrono::Utc;
use herald_entities::{outbox_event, repo::outbox};
use herald_nats::Publisher;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use sea_orm::DatabaseConnection;

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

impl Actor for OutboxRelay {
    type Msg = OutboxRelayMsg;
    type State = OutboxRelayArgs;
    type Arguments = OutboxRelayArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<OutboxRelayMsg>,
        args: OutboxRelayArgs,
    ) -> Result<OutboxRelayArgs, ActorProcessingErr> {
        myself.send_after(args.settings.interval, || OutboxRelayMsg::Tick);
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<OutboxRelayMsg>,
        message: OutboxRelayMsg,
        state: &mut OutboxRelayArgs,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            OutboxRelayMsg::Tick => {
                relay_pending(state).await;
                remove_old(state).await;
                // The next tick is scheduled after this run, so slow runs never pile up.
                myself.send_after(state.settings.interval, || OutboxRelayMsg::Tick);
            }
        }
        Ok(())
    }
}

/// Publishes pending rows, oldest first; returns how many were published.
pub async fn relay_pending(args: &OutboxRelayArgs) -> usize {
    let before = Utc::now()
        - chrono::Duration::from_std(args.settings.grace).unwrap_or(chrono::Duration::zero());
    let rows = match outbox::unpublished(&args.db, before, args.settings.batch).await {
        Ok(rows) => rows,
        Err(err) => {
            tracing::warn!(error = %err, "cannot read the outbox");
            return 0;
        }
    };
    let mut published = 0;
    for row in rows {
        if let Err(err) = publish(args, &row).await {
            tracing::warn!(id = %row.id, error = %err, "cannot relay an event; trying again later");
            break;
        }
        published += 1;
    }
    if published > 0 {
        tracing::info!(published, "relayed events from the outbox");
        metrics::counter!("herald_outbox_relayed_total").increment(published as u64);
    }
    published
}

async fn publish(args: &OutboxRelayArgs, row: &outbox_event::Model) -> Result<(), String> {
    let payload = serde_json::to_vec(&row.payload).map_err(|e| e.to_string())?;
    args.publisher
        .publish_event(&row.subject, &row.id.to_string(), payload.into())
        .await
        .map_err(|e| e.to_string())?;
    outbox::mark_published(&args.db, row.id)
        .await
        .map_err(|e| e.to_string())
}

async fn remove_old(args: &OutboxRelayArgs) {
    let before = Utc::now()
        - chrono::Duration::from_std(args.settings.retention).unwrap_or(chrono::Duration::zero());
    if let Err(err) = outbox::delete_published_before(&args.db, before).await {
        tracing::warn!(error = %err, "cannot clean the outbox");
    }
}
