//! The engine's side of [`herald_api::engine_view::EngineView`]: live channel state for the API.

use std::time::Duration;

use futures::future::BoxFuture;
use herald_actors::channel::{ChannelDirectory, ChannelSnapshot};
use herald_actors::partitions::OwnershipView;
use herald_api::engine_view::{ChannelCircuit, ChannelView, EngineView, PartitionsView};

/// How long the API waits for a channel actor's snapshot (all are asked together): below the
/// readiness probe's bound (`herald_api::health::READINESS_TIMEOUT`), so that one actor that does
/// not answer leaves out only its own channel there.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1);

/// Reads the live actors of this instance.
pub struct LiveEngine {
    /// The channel actors.
    pub channels: ChannelDirectory,
    /// The partitions this instance owns.
    pub ownership: OwnershipView,
    /// Cancelled once the engine's supervisor has stopped.
    pub stopped: tokio_util::sync::CancellationToken,
}

impl EngineView for LiveEngine {
    fn channels(&self) -> BoxFuture<'_, Vec<ChannelView>> {
        Box::pin(async move {
            self.channels
                .snapshots(SNAPSHOT_TIMEOUT)
                .await
                .into_iter()
                .map(view)
                .collect()
        })
    }

    fn running(&self) -> bool {
        !self.stopped.is_cancelled()
    }

    fn partitions(&self) -> PartitionsView {
        let ownership = self.ownership.read().unwrap_or_else(|p| p.into_inner());
        PartitionsView {
            instance: ownership.instance.clone(),
            total: ownership.total,
            owned: ownership.owned.clone(),
            conflict: ownership.recorded_total.map(|recorded| {
                format!(
                    "nats.partitions = {} but the deployment records {recorded}: this instance \
                     consumes no partition and publishes its sends by the recorded count; start \
                     every instance with one count",
                    ownership.total
                )
            }),
        }
    }
}

fn view(s: ChannelSnapshot) -> ChannelView {
    ChannelView {
        state: ChannelCircuit {
            channel: s.channel.as_str().into(),
            provider: s.provider,
            circuit: s.circuit.as_str().into(),
            throttled: s.throttled,
            recent_failures: s.recent_failures as u64,
            times_opened: s.times_opened,
            probe_at: s.probe_at,
            in_flight: s.in_flight as u64,
            sent: s.sent,
            failed: s.failed,
            refused: s.refused,
        },
        last_error: s.last_error,
    }
}
