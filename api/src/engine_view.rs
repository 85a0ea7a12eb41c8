//! What the API may know about the engine running beside it, without depending on the actors
//! crate (the design's dependency direction): the engine implements [`EngineView`].

use futures::future::BoxFuture;
use poem_openapi::Object;

/// One provider's live state.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct ChannelView {
    /// Channel name (`email`, `telegram`, ...).
    pub channel: String,
    /// Provider name.
    pub provider: String,
    /// Circuit state: `closed`, `open`, `half_open`.
    pub circuit: String,
    /// Failures counted in the current circuit window.
    pub recent_failures: u64,
    /// Times the circuit opened since start.
    pub times_opened: u64,
    /// Sends in flight.
    pub in_flight: u64,
    /// Sends accepted by the provider since start.
    pub sent: u64,
    /// Sends failed since start.
    pub failed: u64,
    /// Sends refused by the open circuit since start.
    pub refused: u64,
    /// The last failure.
    pub last_error: Option<String>,
}

/// Which command partitions this instance consumes (it holds their leases).
#[derive(Debug, Clone, Default, Object)]
pub struct PartitionsView {
    /// This instance's name in the lease bucket.
    pub instance: String,
    /// Command partitions in all.
    pub total: u32,
    /// Partitions whose lease this instance holds, ascending.
    pub owned: Vec<u32>,
}

/// Read access to the engine's live state.
pub trait EngineView: Send + Sync + 'static {
    /// Every configured provider's state (of this instance).
    fn channels(&self) -> BoxFuture<'_, Vec<ChannelView>>;
    /// The partitions this instance owns.
    fn partitions(&self) -> PartitionsView;
    /// Whether the engine (the actor tree that delivers) still runs.
    fn running(&self) -> bool;
}
