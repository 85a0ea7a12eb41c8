//! A batch cancel with its `cancelled` status events: the cancel ([`batches::cancel`]) commits its
//! notifications chunk by chunk, and their events are published on a task of their own as each
//! chunk is committed, so that no transaction stays open while they go out and the next chunk is
//! cancelled meanwhile. Shared by `POST /api/v1/batches/{id}/cancel` and the Scheduler, which
//! finishes a cancel that stopped half-way.

use chrono::{DateTime, Utc};
use herald_nats::{Publisher, SCHEMA_VERSION, StatusEvent};
use sea_orm::DatabaseConnection;
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use super::batches::{self, BatchCancel};
use super::schedule::CancelledChunk;
use crate::{NotificationStatus, RepoError, WriteGate};

/// How many status events of a batch cancel are published at once (each awaits its
/// acknowledgement; the next ones do not wait for it).
const IN_FLIGHT: usize = 256;

/// The status event of notification `id` cancelled at `at`.
pub fn cancelled_event(id: Uuid, at: DateTime<Utc>) -> StatusEvent {
    StatusEvent {
        v: SCHEMA_VERSION,
        notification_id: id,
        status: NotificationStatus::Cancelled.as_str().into(),
        channel: None,
        error: None,
        at,
    }
}

/// Cancels batch `id` ([`batches::cancel`], recording
/// [`CANCELLED_BY_REQUEST`](batches::CANCELLED_BY_REQUEST)), counting the notifications it
/// cancels (`herald_notifications_cancelled_total`) and publishing each one's `cancelled` event.
/// Answers once the events of every chunk committed are published (or counted as not
/// published, [`Publisher::publish_statuses`], logged in a span naming the batch), also when a
/// later chunk failed: the chunks committed before it stand.
pub async fn cancel_batch_announced(
    db: &DatabaseConnection,
    gate: &WriteGate,
    publisher: &Publisher,
    id: Uuid,
) -> Result<BatchCancel, RepoError> {
    let events = CancelledEvents::start(publisher, id);
    let committed = |chunk: CancelledChunk| {
        metrics::counter!("herald_notifications_cancelled_total").increment(chunk.ids.len() as u64);
        events.publish(chunk);
    };
    let reason = batches::CANCELLED_BY_REQUEST;
    let cancelled = batches::cancel(db, gate, id, reason, committed).await;
    events.published().await;
    cancelled
}

/// The publishing of a batch cancel's events, chunk by chunk, on a task of its own.
struct CancelledEvents {
    chunks: mpsc::UnboundedSender<CancelledChunk>,
    task: tokio::task::JoinHandle<()>,
}

impl CancelledEvents {
    /// Starts the task for batch `batch`.
    fn start(publisher: &Publisher, batch: Uuid) -> Self {
        let (chunks, mut committed) = mpsc::unbounded_channel::<CancelledChunk>();
        let publisher = publisher.clone();
        let task = tokio::spawn(
            async move {
                while let Some(chunk) = committed.recv().await {
                    for ids in chunk.ids.chunks(IN_FLIGHT) {
                        let events: Vec<StatusEvent> = ids
                            .iter()
                            .map(|id| cancelled_event(*id, chunk.at))
                            .collect();
                        publisher.publish_statuses(&events).await;
                    }
                }
            }
            .instrument(tracing::warn_span!("batch_cancel_events", %batch)),
        );
        Self { chunks, task }
    }

    /// Hands over a chunk the cancel committed.
    fn publish(&self, chunk: CancelledChunk) {
        // The task keeps its receiver until `published` drops this sender: the send cannot fail.
        let _ = self.chunks.send(chunk);
    }

    /// Resolves once every chunk handed over has had its events published (or counted as not
    /// published). Should its caller be dropped first (its process stopping), the task goes on
    /// on its own until the runtime ends.
    async fn published(self) {
        drop(self.chunks);
        if let Err(err) = self.task.await {
            tracing::warn!(error = %err, "publishing a batch cancel's status events failed");
        }
    }
}
