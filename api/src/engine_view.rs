//! What the API may know about the engine running beside it, without depending on the actors
//! crate (the design's dependency direction): the engine implements [`EngineView`].

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use poem_openapi::Object;

/// One provider's circuit and counters: what anyone may see of it (readiness shows this much
/// without a key).
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct ChannelCircuit {
    /// Channel name (`email`, `telegram`, ...).
    pub channel: String,
    /// Provider name.
    pub provider: String,
    /// Circuit state: `closed`, `open`, `half_open`.
    pub circuit: String,
    /// Whether the circuit is open because the provider throttles the whole account (a bot's
    /// global message rate, a project's quota, an account's API concurrency): every send is held
    /// until `probe_at`, the wait the provider asked for, without calling it. Not a failure:
    /// `times_opened` does not count it.
    pub throttled: bool,
    /// Failures counted in the current circuit window.
    pub recent_failures: u64,
    /// Times the circuit opened since start.
    pub times_opened: u64,
    /// While the circuit is open: when it lets its next probe through (RFC 3339, UTC). That is
    /// the cool-down's end, or later when the provider asked for a longer wait (Retry-After) or
    /// another instance announced that its circuit for this provider stays open longer (up to
    /// `channels.limits.circuit.max_cool_down_ms`). Once that is due, the time of the answer: the
    /// next send is the probe. Absent while the circuit is closed or half-open.
    pub probe_at: Option<DateTime<Utc>>,
    /// Sends taken and not answered yet: at the provider, waiting for a concurrency slot, or held
    /// while the circuit's probe is out.
    pub in_flight: u64,
    /// Sends accepted by the provider since start.
    pub sent: u64,
    /// Sends failed since start.
    pub failed: u64,
    /// Sends refused by the open circuit since start.
    pub refused: u64,
}

/// One provider's live state: its circuit and counters, and its last failure (which can name a
/// recipient's address or number, so only keyed readers see it).
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct ChannelView {
    /// The circuit and counters.
    #[oai(flatten)]
    pub state: ChannelCircuit,
    /// The last failure.
    pub last_error: Option<String>,
}

/// Which command partitions this instance consumes (it holds their leases).
#[derive(Debug, Clone, Default, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct PartitionsView {
    /// This instance's name in the lease bucket.
    pub instance: String,
    /// Command partitions in all (this instance's `nats.partitions`).
    pub total: u32,
    /// Partitions whose lease this instance holds, ascending.
    pub owned: Vec<u32>,
    /// Present when the deployment records another partition count than `total` (an instance
    /// with that count started while the record was missing): says which; this instance consumes
    /// no partition and is not ready until the counts agree.
    pub conflict: Option<String>,
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
