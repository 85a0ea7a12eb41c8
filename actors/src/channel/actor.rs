//! `ChannelActor`: one per configured provider. Holds the circuit breaker, a concurrency limit and
//! the send timeout. Sends run as tasks under a semaphore and report back, so the mailbox never
//! waits on the network and an open circuit is answered at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_nats::Channel;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::announce::CircuitAnnouncer;
use super::circuit::{Admission, CircuitBreaker, CircuitSettings, CircuitState};
use super::{OutboundMessage, Provider, ProviderError, Receipt};

/// Limits of one channel actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct ChannelSettings {
    /// Sends in flight at once.
    pub concurrency: usize,
    /// Per-send timeout in milliseconds (on top of the provider's own).
    pub timeout_ms: u64,
    /// Circuit breaker settings.
    pub circuit: CircuitSettings,
}

impl Default for ChannelSettings {
    fn default() -> Self {
        Self {
            concurrency: 64,
            timeout_ms: 15_000,
            circuit: CircuitSettings::default(),
        }
    }
}

/// The answer to a send request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The provider accepted the message.
    Accepted(Receipt),
    /// The provider refused or failed.
    Failed(ProviderError),
    /// The circuit is open; nothing was sent.
    CircuitOpen,
}

/// A send's outcome with the provider's name and latency, for the attempt record.
#[derive(Debug, Clone)]
pub struct SendReport {
    /// Provider name.
    pub provider: String,
    /// What happened.
    pub outcome: SendOutcome,
    /// Time spent in the provider (zero when refused by the circuit).
    pub latency: Duration,
}

/// A point-in-time view of a channel actor, for the API, dashboard and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelSnapshot {
    /// Channel name.
    pub channel: Channel,
    /// Provider name.
    pub provider: String,
    /// Circuit state.
    pub circuit: CircuitState,
    /// Failures counted in the current circuit window.
    pub recent_failures: usize,
    /// Times the circuit opened since start.
    pub times_opened: u64,
    /// Sends in flight.
    pub in_flight: usize,
    /// Sends accepted since start.
    pub sent: u64,
    /// Sends failed (transient or permanent) since start.
    pub failed: u64,
    /// Sends refused by the open circuit since start.
    pub refused: u64,
    /// The last failure's text.
    pub last_error: Option<String>,
}

/// Messages of a [`ChannelActor`].
pub enum ChannelMsg {
    /// Send one message; the reply comes when the provider answers (or at once if refused).
    Send(Box<OutboundMessage>, RpcReplyPort<SendReport>),
    /// A send task finished (internal).
    Finished {
        /// How the send was admitted.
        admission: Admission,
        /// Whether the circuit should count it as a provider failure.
        provider_failure: bool,
        /// The error text, if it failed.
        error: Option<String>,
    },
    /// Report the current state.
    Snapshot(RpcReplyPort<ChannelSnapshot>),
    /// Another instance's circuit for this channel opened: open ours too if it names our provider
    /// and ours is closed.
    PeerOpened {
        /// The provider it opened for.
        provider: String,
    },
    /// Panic on purpose, to exercise supervision (fault-injection in tests).
    Crash,
}

/// Arguments of a [`ChannelActor`]: its provider and limits.
#[derive(Clone)]
pub struct ChannelArgs {
    /// The provider it sends through.
    pub provider: Arc<dyn Provider>,
    /// Its limits.
    pub settings: ChannelSettings,
    /// Tells the other instances when this circuit opens; `None` on a lone instance.
    pub announcer: Option<CircuitAnnouncer>,
}

/// State of a [`ChannelActor`].
pub struct ChannelState {
    provider: Arc<dyn Provider>,
    announcer: Option<CircuitAnnouncer>,
    timeout: Duration,
    breaker: CircuitBreaker,
    permits: Arc<Semaphore>,
    in_flight: usize,
    sent: u64,
    failed: u64,
    refused: u64,
    last_error: Option<String>,
}

/// The actor owning one provider.
pub struct ChannelActor;

impl Actor for ChannelActor {
    type Msg = ChannelMsg;
    type State = ChannelState;
    type Arguments = ChannelArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: ChannelArgs,
    ) -> Result<ChannelState, ActorProcessingErr> {
        let state = ChannelState {
            provider: args.provider,
            announcer: args.announcer,
            timeout: Duration::from_millis(args.settings.timeout_ms),
            breaker: CircuitBreaker::new(args.settings.circuit),
            permits: Arc::new(Semaphore::new(args.settings.concurrency.max(1))),
            in_flight: 0,
            sent: 0,
            failed: 0,
            refused: 0,
            last_error: None,
        };
        record_circuit(&state);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: ChannelMsg,
        state: &mut ChannelState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ChannelMsg::Send(outbound, reply) => start_send(myself, state, *outbound, reply),
            ChannelMsg::Finished {
                admission,
                provider_failure,
                error,
            } => {
                state.in_flight = state.in_flight.saturating_sub(1);
                match error {
                    None => state.sent += 1,
                    Some(text) => {
                        state.failed += 1;
                        state.last_error = Some(text);
                    }
                }
                if provider_failure {
                    let was = state.breaker.state();
                    state.breaker.on_failure(admission, Instant::now());
                    if was == CircuitState::Closed && state.breaker.state() == CircuitState::Open {
                        announce(state);
                    }
                } else {
                    state.breaker.on_success(admission);
                }
                record_circuit(state);
            }
            ChannelMsg::Snapshot(reply) => {
                let _ = reply.send(snapshot(state));
            }
            ChannelMsg::PeerOpened { provider } => {
                if provider == state.provider.name()
                    && state.breaker.state() == CircuitState::Closed
                {
                    tracing::warn!(%provider, "another instance opened this circuit; opening ours");
                    metrics::counter!("herald_circuit_peer_opens_total", "provider" => provider)
                        .increment(1);
                    state.breaker.open(Instant::now());
                    record_circuit(state);
                }
            }
            ChannelMsg::Crash => panic!("fault injected into channel actor"),
        }
        Ok(())
    }
}

fn start_send(
    myself: ActorRef<ChannelMsg>,
    state: &mut ChannelState,
    outbound: OutboundMessage,
    reply: RpcReplyPort<SendReport>,
) {
    let admission = state.breaker.admit(Instant::now());
    if admission == Admission::Probe {
        record_circuit(state);
    }
    if admission == Admission::Refused {
        state.refused += 1;
        let _ = reply.send(SendReport {
            provider: state.provider.name().to_string(),
            outcome: SendOutcome::CircuitOpen,
            latency: Duration::ZERO,
        });
        return;
    }
    state.in_flight += 1;
    let provider = state.provider.clone();
    let permits = state.permits.clone();
    let timeout = state.timeout;
    tokio::spawn(async move {
        let _permit = permits.acquire_owned().await;
        let started = Instant::now();
        let result = match tokio::time::timeout(timeout, provider.send(&outbound)).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::transient(format!(
                "no answer within {} ms",
                timeout.as_millis()
            ))),
        };
        let latency = started.elapsed();
        let (outcome, provider_failure, error) = match result {
            Ok(receipt) => (SendOutcome::Accepted(receipt), false, None),
            Err(err) => {
                let failure = err.counts_against_circuit();
                let text = err.to_string();
                (SendOutcome::Failed(err), failure, Some(text))
            }
        };
        // Report to the actor first: the circuit must see the result before the caller acts on it.
        let _ = myself.cast(ChannelMsg::Finished {
            admission,
            provider_failure,
            error,
        });
        let _ = reply.send(SendReport {
            provider: provider.name().to_string(),
            outcome,
            latency,
        });
    });
}

/// Tells the other instances this circuit just opened (a hint; see [`super::announce`]).
fn announce(state: &ChannelState) {
    if let Some(announcer) = &state.announcer {
        announcer.opened(state.provider.channel(), state.provider.name());
    }
}

/// Publishes the circuit state as `herald_circuit_state` (0 closed, 1 half-open, 2 open).
fn record_circuit(state: &ChannelState) {
    let value = match state.breaker.state() {
        CircuitState::Closed => 0.0,
        CircuitState::HalfOpen => 1.0,
        CircuitState::Open => 2.0,
    };
    metrics::gauge!(
        "herald_circuit_state",
        "channel" => state.provider.channel().as_str(),
        "provider" => state.provider.name().to_string()
    )
    .set(value);
}

fn snapshot(state: &ChannelState) -> ChannelSnapshot {
    ChannelSnapshot {
        channel: state.provider.channel(),
        provider: state.provider.name().to_string(),
        circuit: state.breaker.state(),
        recent_failures: state.breaker.recent_failures(),
        times_opened: state.breaker.times_opened(),
        in_flight: state.in_flight,
        sent: state.sent,
        failed: state.failed,
        refused: state.refused,
        last_error: state.last_error.clone(),
    }
}
