//! The `cancelled` status events of a batch cancel, published chunk by chunk as the cancel commits
//! them, on a task of their own.

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tracing::Instrument;
use uuid::Uuid;

use crate::{Publisher, SCHEMA_VERSION, StatusEvent};

/// How many status events of a batch cancel are published at once (each awaits its
/// acknowledgement; the next ones do not wait for it).
const IN_FLIGHT: usize = 256;

/// The status event of notification `id` cancelled at `at`.
pub fn cancelled_event(id: Uuid, at: DateTime<Utc>) -> StatusEvent {
    StatusEvent {
        v: SCHEMA_VERSION,
        notification_id: id,
        status: "cancelled".into(),
        channel: None,
        error: None,
        at,
    }
}

/// The publishing of a batch cancel's status events, chunk by chunk as the cancel commits them,
/// on a task of its own: the cancel does not hold a transaction open while they go out, and the
/// next chunk is cancelled while the last one's events are published.
pub struct CancelledEvents {
    chunks: mpsc::UnboundedSender<(Vec<Uuid>, DateTime<Utc>)>,
    task: tokio::task::JoinHandle<()>,
}

impl CancelledEvents {
    /// Starts the task for batch `batch`. A failure is counted and logged
    /// ([`Publisher::publish_statuses`]), in a span naming the batch.
    pub fn start(publisher: &Publisher, batch: Uuid) -> Self {
        let (chunks, mut committed) = mpsc::unbounded_channel::<(Vec<Uuid>, DateTime<Utc>)>();
        let publisher = publisher.clone();
        let task = tokio::spawn(
            async move {
                while let Some((ids, at)) = committed.recv().await {
                    for ids in ids.chunks(IN_FLIGHT) {
                        let events: Vec<StatusEvent> =
                            ids.iter().map(|id| cancelled_event(*id, at)).collect();
                        publisher.publish_statuses(&events).await;
                    }
                }
            }
            .instrument(tracing::warn_span!("batch_cancel_events", %batch)),
        );
        Self { chunks, task }
    }

    /// Hands over the notifications `ids` the cancel committed as cancelled at `at`.
    pub fn publish(&self, ids: Vec<Uuid>, at: DateTime<Utc>) {
        // The task keeps its receiver until `published` drops this sender: the send cannot fail.
        let _ = self.chunks.send((ids, at));
    }

    /// Resolves once every chunk handed over has had its events published (or counted as not
    /// published). A request that awaits this before answering is one a graceful shutdown waits
    /// for, so the events are out before the process exits; if the request itself is dropped
    /// (its client went away), the task still finishes on its own.
    pub async fn published(self) {
        drop(self.chunks);
        if let Err(err) = self.task.await {
            tracing::warn!(error = %err, "publishing a batch cancel's status events failed");
        }
    }
}
