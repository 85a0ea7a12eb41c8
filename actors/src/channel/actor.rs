//! `ChannelActor`: one per configured provider. Holds the circuit breaker, a concurrency limit and
//! the send timeout. Sends run as tasks under a semaphore and report back, so the mailbox never
//! waits on the network and an open circuit is answered at once. A send whose caller stopped
//! waiting before a permit was free is dropped unsent: the caller has already moved on. A send
//! that gets its permit too late to finish (its timeout included) before its caller stops
//! waiting is not started either, and its caller is told so at once
//! ([`SendOutcome::NotStarted`], with a wait for its retry): started, it could go out after the caller had taken it for
//! failed and moved on, and the recipient would get the message twice.
//!
//! A send is admitted by the circuit when it arrives, but may then wait for its permit. If the
//! circuit opens or closes meanwhile (a new [period](CircuitBreaker::period)), the send is admitted
//! again as the circuit now stands, at once, permit or not: refused ([`SendOutcome::CircuitOpen`],
//! nothing sent) while it is open, the probe once its cool-down is over. So a provider that hangs
//! does not get the sends queued for it before its circuit opened, and their callers fail over
//! without waiting for them. A send's permit goes back only once the actor has judged its result,
//! so the next send finds the circuit as that result left it; and the results of sends admitted
//! before the circuit last opened or closed do not count in its new period.
//!
//! A send still waiting for its permit when its actor fails (or stops) is not started either, and
//! its caller is told so at once ([`SendOutcome::NotStarted`]): the circuit that admitted it went
//! with the actor, and the restarted actor's circuit knows nothing of it.
//!
//! A send that arrives while the circuit's half-open probe is out is held for the probe's result
//! (the channel's `hold` module), up to as many as the provider has concurrency permits: a probe that
//! succeeds closes the circuit and the held sends go out at once, in the order they arrived; one
//! that fails (or is throttled) opens it again and they are refused with its new wait; one that
//! tested nothing lets the first of them out as the next probe. Sends beyond the hold are refused
//! as when the circuit is open, told to come back once the probe's result is due.
//!
//! A provider that throttles the whole account
//! ([`ProviderError::AccountThrottled`]) holds the circuit open for the wait it asked for
//! ([`CircuitBreaker::on_throttle`]): the sends queued for a permit are refused as when it opens,
//! and so is every send until the wait has passed, without calling the provider.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use herald_nats::Channel;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::announce::CircuitAnnouncer;
use super::circuit::{Admission, CircuitBreaker, CircuitSettings, CircuitState, FailureSource};
use super::hold::{HeldSend, Hold};
use super::{OutboundMessage, Provider, ProviderError, Receipt};

/// Limits of one channel actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct ChannelSettings {
    /// Sends in flight at once.
    pub concurrency: usize,
    /// The most one send may take, in milliseconds: the provider gets it as the send's deadline,
    /// and every step of the send (a token fetched, a name resolved, a second request) comes out
    /// of it; the provider's own `timeout_ms` bounds each of its requests within it.
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
    CircuitOpen {
        /// How long until the circuit lets a probe through (past the provider's Retry-After when
        /// that opened it); while the probe is out, until its result is due (the rest of the
        /// channel's send timeout, at most the cool-down).
        cool_down_left: Duration,
    },
    /// The send never got a concurrency permit to start with (or was held for the circuit's
    /// probe until too late, or got no connection to the provider in time); nothing was sent.
    NotStarted {
        /// How long a retry should wait at least: after a queue too long, the channel's send
        /// timeout, about how long the sends ahead of it may still take (a quicker retry would
        /// queue behind them again), and so after no connection was free in time; after the
        /// actor failed, nothing (its restart is at once);
        /// after it was held for the circuit's probe, until the probe's result is due.
        retry_in: Duration,
        /// Why.
        cause: NotStartedCause,
    },
}

/// Why a send was not started ([`SendOutcome::NotStarted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStartedCause {
    /// It waited for a concurrency permit until too little of its caller's time was left for the
    /// provider's timeout.
    QueueTooLong,
    /// Its channel actor failed while it waited for a permit (or for the result of its circuit's
    /// probe): the circuit that admitted it went with the actor.
    ActorFailed,
    /// It had its permit, but a connection to the provider (the SMTP pool's) came free only when
    /// too little of its timeout was left ([`ProviderError::NoConnection`]).
    NoConnection,
    /// It arrived while its circuit's half-open probe was out and was held for the probe's
    /// result, which did not come before too little of its caller's time was left for the
    /// provider's timeout.
    HeldForProbe,
}

impl SendOutcome {
    /// Contacts the provider declared dead on the way, whatever became of the message.
    pub fn dead_contacts(&self) -> &[String] {
        match self {
            Self::Accepted(receipt) => &receipt.dead_contacts,
            Self::Failed(error) => error.dead_contacts(),
            Self::CircuitOpen { .. } | Self::NotStarted { .. } => &[],
        }
    }
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
    /// Whether the circuit is open because the provider throttles the whole account (until
    /// `probe_at`), rather than because it failed.
    pub throttled: bool,
    /// Failures counted in the current circuit window.
    pub recent_failures: usize,
    /// Times the circuit opened since start.
    pub times_opened: u64,
    /// While the circuit is open: when it lets its next probe through (the cool-down's end, or
    /// later when the provider asked for a longer wait or another instance announced one); once
    /// that is due, the snapshot's own time (the next send is the probe). `None` while closed or
    /// half-open.
    pub probe_at: Option<DateTime<Utc>>,
    /// Sends taken and not answered yet: at the provider, waiting for a concurrency permit, or
    /// held while the circuit's probe is out.
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
    /// Send one message; the reply comes when the provider answers (or at once if refused; while
    /// the circuit's probe is out, once the probe's result decides it). Not sent if the reply
    /// port is closed by the time a concurrency permit is free, nor if the send's timeout would
    /// run past `answer_by` (answered [`SendOutcome::NotStarted`]).
    Send {
        /// What to send.
        message: Box<OutboundMessage>,
        /// When the caller stops waiting for the answer.
        answer_by: Instant,
        /// Where the answer goes.
        reply: RpcReplyPort<SendReport>,
    },
    /// A send task finished (internal).
    Finished {
        /// How the send was admitted.
        admission: Admission,
        /// The circuit's period it was admitted in.
        period: u64,
        /// What it says of the provider, for the circuit.
        verdict: Verdict,
        /// How it ended, for the counts.
        end: SendEnd,
        /// The send's concurrency permit, given back once the circuit has judged the result
        /// (`None` if the permits were closed, which they never are).
        permit: Option<OwnedSemaphorePermit>,
    },
    /// A send task gave up before sending, as its caller no longer waited for the answer
    /// (internal).
    Abandoned {
        /// How the send was admitted.
        admission: Admission,
        /// The circuit's period it was admitted in.
        period: u64,
    },
    /// A send task not yet sent finds the circuit's period over: admit it again as the circuit
    /// now stands (internal).
    Readmit {
        /// How the send was admitted.
        admission: Admission,
        /// The circuit's period it was admitted in.
        period: u64,
        /// Where the new admission goes.
        reply: RpcReplyPort<Readmission>,
    },
    /// The send held as `held` while the probe is out has come to its last moment to start
    /// (internal).
    HoldOver {
        /// The held send's id in the hold.
        held: u64,
    },
    /// Report the current state.
    Snapshot(RpcReplyPort<ChannelSnapshot>),
    /// Another instance's circuit for this channel opened (or is held open by a throttle of the
    /// whole account): open (or hold) ours too if it names our provider and ours is closed.
    PeerOpened {
        /// The provider it opened for.
        provider: String,
        /// How long the other instance's circuit stays open, if it said (longer than its
        /// cool-down when the provider asked for a longer wait; a throttle's wait).
        open_for: Option<Duration>,
        /// Whether it is held open because the provider throttles the whole account.
        throttled: bool,
    },
    /// Panic on purpose, to exercise supervision (fault-injection in tests).
    Crash,
}

/// How a started send ended, for the actor's counts ([`ChannelSnapshot`]).
#[derive(Debug)]
pub enum SendEnd {
    /// The provider accepted it.
    Sent,
    /// It failed, with the error's text.
    Failed(String),
    /// Nothing reached the provider ([`ProviderError::NoConnection`]): counted abandoned, as a
    /// send that never got its permit.
    NotSent,
}

/// The circuit's answer to a send admitted in a period that has ended before it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readmission {
    /// Send it, admitted anew.
    Go {
        /// How it is admitted now (the probe, if the circuit's cool-down is over).
        admission: Admission,
        /// The circuit's current period.
        period: u64,
    },
    /// The circuit is open (or its probe is out): answer [`SendOutcome::CircuitOpen`], unsent.
    /// The send no longer counts in flight.
    Refused {
        /// As in [`SendOutcome::CircuitOpen`].
        cool_down_left: Duration,
    },
}

/// What a finished send says of its provider, for the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The provider answered (accepted, or refused what no retry changes): it is up.
    Answered,
    /// The provider failed, asking for a wait or not (Retry-After): counted against the circuit,
    /// once per source (the notification, or the connection event that failed it).
    Failed {
        /// The wait the provider asked for.
        retry_after: Option<Duration>,
        /// What the failure is counted as.
        source: FailureSource,
    },
    /// The provider throttles the whole account, asking for a wait or not: every send is held
    /// until then, though the provider is up (not counted as a failure).
    Throttled {
        /// The wait the provider asked for.
        retry_after: Option<Duration>,
    },
    /// The failure says nothing of the provider: found before anything reached it (no contact,
    /// a message that cannot be sent as it is), or at one of many endpoints (webhooks).
    Untested,
}

impl Verdict {
    /// The verdict on the result of a send of `notification` from `provider`.
    fn of(
        result: &Result<Receipt, ProviderError>,
        provider: &dyn Provider,
        notification: uuid::Uuid,
    ) -> Self {
        match result {
            Ok(_) => Self::Answered,
            Err(err) if !err.reached_provider() => Self::Untested,
            // One of many endpoints failing says nothing of the provider (webhooks).
            Err(err) if err.counts_against_circuit() && !provider.one_endpoint() => Self::Untested,
            Err(err) if err.counts_against_circuit() => Self::Failed {
                retry_after: err.retry_after(),
                source: err.incident().map_or(
                    FailureSource::Notification(notification),
                    FailureSource::Incident,
                ),
            },
            Err(err) if err.throttles_account() && provider.one_endpoint() => Self::Throttled {
                retry_after: err.retry_after(),
            },
            Err(_) => Self::Answered,
        }
    }
}

/// Arguments of a [`ChannelActor`]: its provider, its limits and the concurrency permits.
///
/// Made once per provider and cloned for every start of its actor: the clones share the permits,
/// so an actor restarted after a failure waits for the sends the failed one left running, and
/// the provider never sees more than [`ChannelSettings::concurrency`] sends at once.
#[derive(Clone)]
pub struct ChannelArgs {
    provider: Arc<dyn Provider>,
    settings: ChannelSettings,
    announcer: Option<CircuitAnnouncer>,
    permits: Arc<Semaphore>,
}

impl ChannelArgs {
    /// The arguments of the actor sending through `provider` within `settings`; `announcer` tells
    /// the other instances when its circuit opens (`None` on a lone instance).
    pub fn new(
        provider: Arc<dyn Provider>,
        settings: ChannelSettings,
        announcer: Option<CircuitAnnouncer>,
    ) -> Self {
        Self {
            provider,
            settings,
            announcer,
            permits: Arc::new(Semaphore::new(settings.concurrency.max(1))),
        }
    }

    /// The provider it sends through.
    pub fn provider(&self) -> &dyn Provider {
        self.provider.as_ref()
    }
}

/// State of a [`ChannelActor`].
pub struct ChannelState {
    provider: Arc<dyn Provider>,
    announcer: Option<CircuitAnnouncer>,
    timeout: Duration,
    breaker: CircuitBreaker,
    /// The sends held while the probe is out.
    hold: Hold,
    /// The circuit's period, for the send tasks waiting for a permit.
    periods: watch::Sender<u64>,
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
        let timeout = Duration::from_millis(args.settings.timeout_ms);
        let breaker = CircuitBreaker::new(args.settings.circuit).with_probe_timeout(timeout);
        let hold = Hold::new(args.provider.name().to_string(), args.settings.concurrency);
        let state = ChannelState {
            hold,
            provider: args.provider,
            announcer: args.announcer,
            timeout,
            periods: watch::Sender::new(breaker.period()),
            breaker,
            permits: args.permits,
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
            ChannelMsg::Send {
                message,
                answer_by,
                reply,
            } => start_send(myself.clone(), state, *message, (answer_by, reply)),
            ChannelMsg::Finished {
                admission,
                period,
                verdict,
                end,
                permit,
            } => {
                state.in_flight = state.in_flight.saturating_sub(1);
                match end {
                    SendEnd::Sent => state.sent += 1,
                    SendEnd::Failed(text) => {
                        state.failed += 1;
                        state.last_error = Some(text);
                    }
                    SendEnd::NotSent => count_abandoned(state.provider.name()),
                }
                judge(state, admission, period, verdict);
                record_circuit(state);
                // Only now may the next send waiting for a permit have it: it finds the circuit
                // as this result left it (open, say, and is refused instead of sent).
                drop(permit);
            }
            ChannelMsg::Abandoned { admission, period } => {
                state.in_flight = state.in_flight.saturating_sub(1);
                count_abandoned(state.provider.name());
                state.breaker.on_abandoned(admission, period);
                record_circuit(state);
            }
            ChannelMsg::Readmit {
                admission,
                period,
                reply,
            } => {
                let answer = readmit(state, admission, period);
                if reply.send(answer).is_err()
                    && let Readmission::Go { admission, period } = answer
                {
                    // The send's task is gone: nothing of it goes out.
                    state.in_flight = state.in_flight.saturating_sub(1);
                    state.breaker.on_abandoned(admission, period);
                    record_circuit(state);
                }
            }
            ChannelMsg::Snapshot(reply) => {
                let _ = reply.send(snapshot(state));
            }
            ChannelMsg::PeerOpened {
                provider,
                open_for,
                throttled,
            } => {
                if provider == state.provider.name()
                    && state.breaker.state() == CircuitState::Closed
                {
                    let open_for_ms = open_for.map(|d| d.as_millis() as u64);
                    if throttled {
                        tracing::warn!(%provider, open_for_ms, "another instance is throttled for the whole account; holding every send here too");
                        state.breaker.hold(Instant::now(), open_for);
                    } else {
                        tracing::warn!(%provider, open_for_ms, "another instance opened this circuit; opening ours");
                        state.breaker.open(Instant::now(), open_for);
                    }
                    metrics::counter!("herald_circuit_peer_opens_total", "provider" => provider)
                        .increment(1);
                    record_circuit(state);
                }
            }
            ChannelMsg::HoldOver { held } => {
                if let Some(send) = state.hold.take(held) {
                    held_too_long(state, send);
                }
            }
            ChannelMsg::Crash => panic!("fault injected into channel actor"),
        }
        // Whatever changed the circuit (a probe's result, an abandoned probe), the sends held for
        // the probe are decided as soon as it is no longer out.
        release_held(&myself, state);
        Ok(())
    }
}

fn start_send(
    myself: ActorRef<ChannelMsg>,
    state: &mut ChannelState,
    outbound: OutboundMessage,
    (answer_by, reply): (Instant, RpcReplyPort<SendReport>),
) {
    let admission = state.breaker.admit(Instant::now());
    if admission == Admission::Probe {
        record_circuit(state);
    }
    if admission == Admission::Refused {
        match last_start_if_held(state, answer_by) {
            Some(last_start) => {
                let send = HeldSend {
                    message: outbound,
                    answer_by,
                    reply,
                };
                hold(&myself, state, send, last_start);
            }
            None => {
                let _ = reply.send(SendReport {
                    provider: state.provider.name().to_string(),
                    outcome: SendOutcome::CircuitOpen {
                        cool_down_left: refuse(state),
                    },
                    latency: Duration::ZERO,
                });
            }
        }
        return;
    }
    state.in_flight += 1;
    let provider = state.provider.clone();
    let permits = state.permits.clone();
    let timeout = state.timeout;
    let periods = state.periods.subscribe();
    let period = state.breaker.period();
    tokio::spawn(async move {
        let admitted = admitted_with_permit(&myself, permits, periods, (admission, period));
        let (admission, period, permit) = match admitted.await {
            Admitted::Go {
                admission,
                period,
                permit,
            } => (admission, period, permit),
            Admitted::Refused { cool_down_left } => {
                // The circuit opened while this send waited for a permit: nothing was sent, and
                // the caller fails over at once, as if it had found the circuit open.
                let _ = reply.send(SendReport {
                    provider: provider.name().to_string(),
                    outcome: SendOutcome::CircuitOpen { cool_down_left },
                    latency: Duration::ZERO,
                });
                return;
            }
            Admitted::Orphaned => {
                // The actor failed while this send waited for a permit: no circuit judges it any
                // more (a restarted actor has one of its own), so it does not go out, and its
                // caller retries or fails over at once rather than after the queue.
                answer_not_started(
                    reply,
                    provider.name(),
                    Duration::ZERO,
                    NotStartedCause::ActorFailed,
                );
                return;
            }
        };
        if reply.is_closed() {
            // The caller stopped waiting while this send queued for a permit, and took it for a
            // transient failure: it has failed over or will retry, so sending now would deliver
            // the message twice.
            let _ = myself.cast(ChannelMsg::Abandoned { admission, period });
            return;
        }
        if Instant::now() + timeout > answer_by {
            // Started now, the send could still be running when its caller gives up on it, and
            // go out after the caller has failed over or scheduled a retry.
            let _ = myself.cast(ChannelMsg::Abandoned { admission, period });
            let _ = reply.send(SendReport {
                provider: provider.name().to_string(),
                outcome: SendOutcome::NotStarted {
                    retry_in: timeout,
                    cause: NotStartedCause::QueueTooLong,
                },
                latency: Duration::ZERO,
            });
            return;
        }
        let started = Instant::now();
        // The provider gets the same deadline as this timer, so a send of several steps fails
        // with the step that ran out of time (the inner timer, polled first, wins a tie); this
        // timer is the bound of a provider that does not keep to it.
        let deadline = tokio::time::Instant::from_std(started) + timeout;
        let sending = AssertUnwindSafe(provider.send(&outbound, deadline)).catch_unwind();
        let result = match tokio::time::timeout_at(deadline, sending).await {
            Ok(Ok(result)) => result,
            // A provider bug: answered and reported like any provider failure, so the circuit
            // counts it and in_flight (or a half-open probe) is not left waiting for ever.
            Ok(Err(_panic)) => Err(ProviderError::transient(
                "the provider failed unexpectedly (it panicked)",
            )),
            Err(_) => Err(ProviderError::transient(format!(
                "no answer within {} ms",
                timeout.as_millis()
            ))),
        };
        let latency = started.elapsed();
        let verdict = Verdict::of(&result, provider.as_ref(), outbound.notification_id);
        let (outcome, end) = match result {
            Ok(receipt) => (SendOutcome::Accepted(receipt), SendEnd::Sent),
            // Nothing reached the provider: answered like a send that never got its permit, with
            // the same wait (the sends ahead of it may take as long again).
            Err(ProviderError::NoConnection { reason }) => {
                tracing::debug!(provider = provider.name(), %reason, "send not started");
                let outcome = SendOutcome::NotStarted {
                    retry_in: timeout,
                    cause: NotStartedCause::NoConnection,
                };
                (outcome, SendEnd::NotSent)
            }
            Err(err) => {
                let text = err.to_string();
                (SendOutcome::Failed(err), SendEnd::Failed(text))
            }
        };
        // Report to the actor first: the circuit must see the result before the caller acts on
        // it. The permit goes with it, back once the circuit has seen the result (or with the
        // message, if the actor is gone).
        let _ = myself.cast(ChannelMsg::Finished {
            admission,
            period,
            verdict,
            end,
            permit,
        });
        let _ = reply.send(SendReport {
            provider: provider.name().to_string(),
            outcome,
            latency,
        });
    });
}

/// The last moment a send refused now, whose caller waits until `answer_by`, may start if it is
/// held for the probe's result instead: `None` (refused) unless the probe is out, the hold has
/// room, and the send still has time to start later and finish within its timeout.
fn last_start_if_held(state: &ChannelState, answer_by: Instant) -> Option<Instant> {
    if state.breaker.state() != CircuitState::HalfOpen || state.hold.is_full() {
        return None;
    }
    answer_by
        .checked_sub(state.timeout)
        .filter(|&last_start| last_start > Instant::now())
}

/// Holds `send` for the probe's result; it is answered unsent at `last_start` if still held then.
fn hold(
    myself: &ActorRef<ChannelMsg>,
    state: &mut ChannelState,
    send: HeldSend,
    last_start: Instant,
) {
    state.in_flight += 1;
    metrics::counter!(
        "herald_channel_sends_held_total",
        "provider" => state.provider.name().to_string()
    )
    .increment(1);
    let wait = last_start.saturating_duration_since(Instant::now());
    state.hold.push(send, |held| {
        myself
            .send_after(wait, move || ChannelMsg::HoldOver { held })
            .abort_handle()
    });
}

/// Answers a send held until its last moment to start, the probe still out: not started, to come
/// back once the probe's result is due.
fn held_too_long(state: &mut ChannelState, send: HeldSend) {
    state.in_flight = state.in_flight.saturating_sub(1);
    answer_not_started(
        send.reply,
        state.provider.name(),
        state.breaker.cool_down_left(Instant::now()),
        NotStartedCause::HeldForProbe,
    );
}

/// Counts a send of `provider` that its actor gave up without a result
/// (`herald_channel_sends_abandoned_total`).
fn count_abandoned(provider: &str) {
    metrics::counter!("herald_channel_sends_abandoned_total", "provider" => provider.to_string())
        .increment(1);
}

/// Answers a send of `provider` that was never started, counting it abandoned: its caller may try
/// again after `retry_in`, or fail over.
pub(super) fn answer_not_started(
    reply: RpcReplyPort<SendReport>,
    provider: &str,
    retry_in: Duration,
    cause: NotStartedCause,
) {
    count_abandoned(provider);
    let _ = reply.send(SendReport {
        provider: provider.to_string(),
        outcome: SendOutcome::NotStarted { retry_in, cause },
        latency: Duration::ZERO,
    });
}

/// Decides the held sends once the probe is no longer out, in the order they arrived, each
/// admitted as the circuit now stands: sent if the probe closed it, refused with its new wait if
/// the probe opened it again; if the probe tested nothing (the circuit open, its cool-down over),
/// the first is the next probe and the others stay held for its result. A held send whose caller
/// has stopped waiting is dropped unsent: it could go out after its caller moved on.
fn release_held(myself: &ActorRef<ChannelMsg>, state: &mut ChannelState) {
    while state.breaker.state() != CircuitState::HalfOpen {
        let Some(send) = state.hold.pop_front() else {
            return;
        };
        state.in_flight = state.in_flight.saturating_sub(1);
        if send.reply.is_closed() {
            count_abandoned(state.provider.name());
            continue;
        }
        start_send(
            myself.clone(),
            state,
            send.message,
            (send.answer_by, send.reply),
        );
    }
}

/// What became of a send while it waited for its permit.
enum Admitted {
    /// It has its permit and may go out, admitted so in that period of the circuit.
    Go {
        admission: Admission,
        period: u64,
        permit: Option<OwnedSemaphorePermit>,
    },
    /// The circuit refused it when asked again; it no longer counts in flight.
    Refused { cool_down_left: Duration },
    /// Its actor is gone (failed, to be restarted with a circuit of its own, or stopped) before
    /// the send had its permit: it was admitted by a circuit that no longer exists.
    Orphaned,
}

/// Waits for a send's concurrency permit; whenever the circuit's period ends before the send has
/// gone out (with the permit or still waiting for it), asks the actor to admit the send again, as
/// the circuit now stands. A send whose actor is gone before it has its permit is
/// [`Admitted::Orphaned`]; one that has it already goes out.
async fn admitted_with_permit(
    myself: &ActorRef<ChannelMsg>,
    permits: Arc<Semaphore>,
    mut periods: watch::Receiver<u64>,
    (mut admission, mut period): (Admission, u64),
) -> Admitted {
    let mut acquire = std::pin::pin!(permits.acquire_owned());
    let mut permit = None;
    loop {
        if *periods.borrow() != period {
            let asked = myself
                .call(
                    |reply| ChannelMsg::Readmit {
                        admission,
                        period,
                        reply,
                    },
                    None,
                )
                .await;
            match asked {
                Ok(CallResult::Success(Readmission::Go {
                    admission: now,
                    period: current,
                })) => {
                    admission = now;
                    period = current;
                }
                Ok(CallResult::Success(Readmission::Refused { cool_down_left })) => {
                    return Admitted::Refused { cool_down_left };
                }
                // The actor is gone (a restarted one has a circuit of its own): nobody to ask.
                Ok(_) | Err(_) => return Admitted::Orphaned,
            }
            continue;
        }
        if let Some(permit) = permit.take() {
            return Admitted::Go {
                admission,
                period,
                permit,
            };
        }
        tokio::select! {
            acquired = &mut acquire => permit = Some(acquired.ok()),
            over = period_over(&mut periods, period) => {
                if over.is_err() {
                    return Admitted::Orphaned;
                }
            }
        }
    }
}

/// Returns once the circuit's period is no longer `period`, or with an error once its actor is
/// gone (the actor's state, which publishes the periods, went with it).
async fn period_over(
    periods: &mut watch::Receiver<u64>,
    period: u64,
) -> Result<(), watch::error::RecvError> {
    periods.wait_for(|now| *now != period).await.map(|_| ())
}

/// Admits again a send admitted as `admission` in `period`, if that period is over.
fn readmit(state: &mut ChannelState, admission: Admission, period: u64) -> Readmission {
    if period == state.breaker.period() {
        return Readmission::Go { admission, period };
    }
    match state.breaker.admit(Instant::now()) {
        Admission::Refused => {
            state.in_flight = state.in_flight.saturating_sub(1);
            Readmission::Refused {
                cool_down_left: refuse(state),
            }
        }
        admission => {
            if admission == Admission::Probe {
                record_circuit(state);
            }
            Readmission::Go {
                admission,
                period: state.breaker.period(),
            }
        }
    }
}

/// Counts a send refused by the open circuit; returns how long until it lets a probe through.
fn refuse(state: &mut ChannelState) -> Duration {
    state.refused += 1;
    state.breaker.cool_down_left(Instant::now())
}

/// Reports a finished send to the circuit, and announces the circuit if that opened it.
fn judge(state: &mut ChannelState, admission: Admission, period: u64, verdict: Verdict) {
    let now = Instant::now();
    match verdict {
        Verdict::Answered => state.breaker.on_success(admission, period, now),
        Verdict::Failed {
            retry_after,
            source,
        } => {
            let was = state.breaker.state();
            state
                .breaker
                .on_failure(admission, period, source, now, retry_after);
            if was == CircuitState::Closed && state.breaker.state() == CircuitState::Open {
                announce(state, now);
            }
        }
        Verdict::Throttled { retry_after } => {
            let before = state.breaker.period();
            state
                .breaker
                .on_throttle(admission, period, now, retry_after);
            if state.breaker.period() != before {
                announce(state, now);
                let provider = state.provider.name().to_string();
                tracing::warn!(
                    %provider,
                    retry_after_ms = retry_after.map(|d| d.as_millis() as u64),
                    "the provider throttles the whole account; holding every send until its \
                     wait has passed"
                );
                metrics::counter!("herald_channel_throttles_total", "provider" => provider)
                    .increment(1);
            }
        }
        // A probe that tested nothing leaves the next send to probe.
        Verdict::Untested => state.breaker.on_abandoned(admission, period),
    }
}

/// Tells the other instances this circuit just opened (or is held open by a throttle of the
/// whole account), for as long as it stays open from `now` (a hint; see [`super::announce`]).
fn announce(state: &ChannelState, now: Instant) {
    let Some(announcer) = &state.announcer else {
        return;
    };
    let (channel, provider) = (state.provider.channel(), state.provider.name());
    let open_for = state.breaker.cool_down_left(now);
    if state.breaker.throttled() {
        announcer.held(channel, provider, open_for);
    } else {
        announcer.opened(channel, provider, open_for);
    }
}

/// Publishes the circuit state as `herald_circuit_state` (0 closed, 1 half-open, 2 open), and its
/// period to the sends waiting for a permit.
fn record_circuit(state: &ChannelState) {
    let period = state.breaker.period();
    state.periods.send_if_modified(|published| {
        let changed = *published != period;
        *published = period;
        changed
    });
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
        throttled: state.breaker.throttled(),
        recent_failures: state.breaker.recent_failures(),
        times_opened: state.breaker.times_opened(),
        probe_at: state.breaker.probe_in(Instant::now()).map(from_now),
        in_flight: state.in_flight,
        sent: state.sent,
        failed: state.failed,
        refused: state.refused,
        last_error: state.last_error.clone(),
    }
}

/// The wall-clock time `wait` from now, at most the last second of year 9999 (a cool-down
/// configured beyond it), so an open circuit always says when it probes, in RFC 3339.
fn from_now(wait: Duration) -> DateTime<Utc> {
    let last = DateTime::<Utc>::from_timestamp(LAST_RFC3339_SECOND, 0).unwrap_or_default();
    chrono::Duration::from_std(wait)
        .ok()
        .and_then(|wait| Utc::now().checked_add_signed(wait))
        .map_or(last, |at| at.min(last))
}

/// 9999-12-31T23:59:59Z: RFC 3339 has four-digit years.
const LAST_RFC3339_SECOND: i64 = 253_402_300_799;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::future::BoxFuture;
    use ractor::rpc::CallResult;
    use tokio::sync::mpsc;
    use uuid::Uuid;

    use super::*;
    use crate::channel::provider::tests::outbound;
    use crate::channel::{ChannelDirectory, ChannelSupervisor, ChannelSupervisorArgs};

    /// How long a test waits for an event; also how long a caller waits for a send's answer,
    /// longer than the default channel timeout so that sends start.
    const WAIT: Duration = Duration::from_secs(30);

    /// A send whose caller waits `wait` for the answer.
    fn send_msg(
        message: OutboundMessage,
        wait: Duration,
        reply: RpcReplyPort<SendReport>,
    ) -> ChannelMsg {
        ChannelMsg::Send {
            message: Box::new(message),
            answer_by: Instant::now() + wait,
            reply,
        }
    }

    /// A provider that reports each send as it starts and answers once the test opens its gate.
    struct GatedProvider {
        started: mpsc::UnboundedSender<Uuid>,
        gate: Arc<Semaphore>,
    }

    impl Provider for GatedProvider {
        fn channel(&self) -> Channel {
            Channel::Email
        }

        fn name(&self) -> &str {
            "gated"
        }

        fn send<'a>(
            &'a self,
            message: &'a OutboundMessage,
            _deadline: tokio::time::Instant,
        ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
            Box::pin(async move {
                let _ = self.started.send(message.notification_id);
                self.gate.acquire().await.expect("gate open").forget();
                Ok(Receipt::new(None))
            })
        }
    }

    /// A provider whose sends each wait for the test's answer; it tells the test of each send as
    /// it arrives.
    struct HeldProvider {
        held: mpsc::UnboundedSender<HeldSend>,
    }

    /// A send that reached a [`HeldProvider`] and waits for its answer.
    struct HeldSend {
        id: Uuid,
        answer: tokio::sync::oneshot::Sender<Result<Receipt, ProviderError>>,
    }

    impl HeldSend {
        /// Answers the send with `result`.
        fn answer(self, result: Result<Receipt, ProviderError>) {
            self.answer.send(result).expect("the held send still waits");
        }
    }

    impl Provider for HeldProvider {
        fn channel(&self) -> Channel {
            Channel::Sms
        }

        fn name(&self) -> &str {
            "held"
        }

        fn send<'a>(
            &'a self,
            message: &'a OutboundMessage,
            _deadline: tokio::time::Instant,
        ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
            Box::pin(async move {
                let (answer, answered) = tokio::sync::oneshot::channel();
                let _ = self.held.send(HeldSend {
                    id: message.notification_id,
                    answer,
                });
                match answered.await {
                    Ok(result) => result,
                    // The test dropped it unanswered: the provider hangs.
                    Err(_) => std::future::pending().await,
                }
            })
        }
    }

    /// A channel actor over a [`HeldProvider`], and the sends that reach it.
    async fn spawn_held(
        settings: ChannelSettings,
    ) -> (ActorRef<ChannelMsg>, mpsc::UnboundedReceiver<HeldSend>) {
        let (held, sends) = mpsc::unbounded_channel();
        (spawn(HeldProvider { held }, settings).await, sends)
    }

    /// The next send to reach a [`HeldProvider`], which must be `id`'s.
    async fn next_held(sends: &mut mpsc::UnboundedReceiver<HeldSend>, id: Uuid) -> HeldSend {
        let send = tokio::time::timeout(WAIT, sends.recv())
            .await
            .unwrap_or_else(|_| panic!("no send reached the provider within {WAIT:?}"))
            .expect("the provider is alive");
        assert_eq!(send.id, id, "another send reached the provider first");
        send
    }

    /// The answer to a send made with [`send_in_background`].
    async fn answer_of(
        send: tokio::task::JoinHandle<
            Result<CallResult<SendReport>, ractor::MessagingErr<ChannelMsg>>,
        >,
        what: &str,
    ) -> SendReport {
        let answer = tokio::time::timeout(WAIT, send)
            .await
            .unwrap_or_else(|_| panic!("{what} was not answered within {WAIT:?}"))
            .expect("caller task")
            .expect("actor alive");
        match answer {
            CallResult::Success(report) => report,
            other => panic!("{what} was not answered: {other:?}"),
        }
    }

    fn http_503() -> Result<Receipt, ProviderError> {
        Err(ProviderError::transient("HTTP 503"))
    }

    /// A provider with a bug: every send panics.
    struct PanickingProvider;

    impl Provider for PanickingProvider {
        fn channel(&self) -> Channel {
            Channel::Email
        }

        fn name(&self) -> &str {
            "panicking"
        }

        fn send<'a>(
            &'a self,
            _message: &'a OutboundMessage,
            _deadline: tokio::time::Instant,
        ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
            Box::pin(async { panic!("provider bug") })
        }
    }

    /// A provider every send fails at for a while, such as a customer's webhook receiver.
    struct FailingEndpoints;

    impl Provider for FailingEndpoints {
        fn channel(&self) -> Channel {
            Channel::Webhook
        }

        fn name(&self) -> &str {
            "endpoints"
        }

        fn send<'a>(
            &'a self,
            _message: &'a OutboundMessage,
            _deadline: tokio::time::Instant,
        ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
            Box::pin(async { Err(ProviderError::transient("HTTP 503")) })
        }

        fn one_endpoint(&self) -> bool {
            false
        }
    }

    /// A provider whose n-th send (from 0) answers `script(n)`; it counts the sends it got.
    struct Scripted {
        calls: Arc<AtomicUsize>,
        script: fn(usize) -> Result<Receipt, ProviderError>,
    }

    impl Scripted {
        fn new(script: fn(usize) -> Result<Receipt, ProviderError>) -> (Self, Arc<AtomicUsize>) {
            let calls = Arc::new(AtomicUsize::new(0));
            let provider = Self {
                calls: calls.clone(),
                script,
            };
            (provider, calls)
        }
    }

    impl Provider for Scripted {
        fn channel(&self) -> Channel {
            Channel::Sms
        }

        fn name(&self) -> &str {
            "scripted"
        }

        fn send<'a>(
            &'a self,
            _message: &'a OutboundMessage,
            _deadline: tokio::time::Instant,
        ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::ready((self.script)(n)))
        }
    }

    /// A 503 asking for an hour's wait.
    fn down_for_an_hour(_: usize) -> Result<Receipt, ProviderError> {
        Err(ProviderError::transient_after(
            "HTTP 503",
            Some(Duration::from_secs(3_600)),
        ))
    }

    /// The arguments of a channel actor over `provider`, on a lone instance.
    fn args(provider: impl Provider, settings: ChannelSettings) -> ChannelArgs {
        ChannelArgs::new(Arc::new(provider), settings, None)
    }

    async fn spawn(provider: impl Provider, settings: ChannelSettings) -> ActorRef<ChannelMsg> {
        Actor::spawn(None, ChannelActor, args(provider, settings))
            .await
            .expect("channel actor starts")
            .0
    }

    async fn snapshot_when(
        actor: &ActorRef<ChannelMsg>,
        what: &str,
        done: impl Fn(&ChannelSnapshot) -> bool,
    ) -> ChannelSnapshot {
        let deadline = Instant::now() + WAIT;
        loop {
            let snapshot = actor
                .call(ChannelMsg::Snapshot, Some(WAIT))
                .await
                .expect("actor alive")
                .expect("snapshot");
            if done(&snapshot) {
                return snapshot;
            }
            assert!(
                Instant::now() < deadline,
                "waited {WAIT:?} for {what}: {snapshot:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A channel actor over a [`GatedProvider`], with a first send that has reached the provider
    /// and waits at its gate.
    struct FirstSendHeld {
        actor: ActorRef<ChannelMsg>,
        /// Lets held sends through.
        gate: Arc<Semaphore>,
        /// The ids of the sends that reached the provider (the first one already taken).
        starts: mpsc::UnboundedReceiver<Uuid>,
        /// The first send's answer, once it has one.
        answer: tokio::task::JoinHandle<
            Result<CallResult<SendReport>, ractor::MessagingErr<ChannelMsg>>,
        >,
    }

    async fn first_send_held(settings: ChannelSettings) -> FirstSendHeld {
        let (started, mut starts) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let actor = spawn(
            GatedProvider {
                started,
                gate: gate.clone(),
            },
            settings,
        )
        .await;
        let first = outbound();
        let first_id = first.notification_id;
        let answer = tokio::spawn({
            let actor = actor.clone();
            async move {
                actor
                    .call(|port| send_msg(first, WAIT, port), Some(WAIT))
                    .await
            }
        });
        let sending = tokio::time::timeout(WAIT, starts.recv()).await;
        assert_eq!(sending.expect("the first send starts"), Some(first_id));
        FirstSendHeld {
            actor,
            gate,
            starts,
            answer,
        }
    }

    #[tokio::test]
    async fn a_send_whose_caller_gave_up_while_queued_is_not_sent() {
        let FirstSendHeld {
            actor,
            gate,
            mut starts,
            answer,
        } = first_send_held(ChannelSettings {
            concurrency: 1,
            ..ChannelSettings::default()
        })
        .await;

        // The second send queues behind the first for the only permit; its caller gives up.
        let second = outbound();
        let gave_up = actor
            .call(
                |port| send_msg(second, WAIT, port),
                Some(Duration::from_millis(100)),
            )
            .await
            .expect("actor alive");
        assert!(matches!(gave_up, CallResult::Timeout), "{gave_up:?}");

        // Room for both sends: without the check the abandoned one would go out too.
        gate.add_permits(2);
        let answered = tokio::time::timeout(WAIT, answer)
            .await
            .expect("the first send is answered")
            .expect("caller task")
            .expect("actor alive");
        assert!(
            matches!(&answered, CallResult::Success(r) if matches!(r.outcome, SendOutcome::Accepted(_))),
            "{answered:?}"
        );
        let settled = snapshot_when(&actor, "both sends to settle", |s| s.in_flight == 0).await;
        assert_eq!(settled.sent, 1, "{settled:?}");
        assert_eq!(settled.failed, 0, "{settled:?}");
        assert_eq!(settled.circuit, CircuitState::Closed);
        assert!(
            starts.try_recv().is_err(),
            "the send nobody waited for went out"
        );
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_send_that_could_outlast_its_caller_is_answered_unsent() {
        let FirstSendHeld {
            actor,
            gate,
            mut starts,
            answer,
        } = first_send_held(ChannelSettings {
            concurrency: 1,
            timeout_ms: 5_000,
            ..ChannelSettings::default()
        })
        .await;

        // The second send's caller waits 2 s, less than the channel's 5 s timeout: once it has
        // the permit its provider call could outlast its caller, so it must not start.
        let short = Duration::from_secs(2);
        let second = tokio::spawn({
            let actor = actor.clone();
            async move {
                actor
                    .call(|port| send_msg(outbound(), short, port), Some(short))
                    .await
            }
        });
        snapshot_when(&actor, "the second send to queue", |s| s.in_flight == 2).await;
        gate.add_permits(1);
        let second = tokio::time::timeout(WAIT, second)
            .await
            .expect("the second send is answered")
            .expect("caller task")
            .expect("actor alive");
        assert!(
            matches!(&second, CallResult::Success(r)
                if r.outcome == SendOutcome::NotStarted { retry_in: Duration::from_secs(5), cause: NotStartedCause::QueueTooLong }),
            "{second:?}"
        );
        let first = tokio::time::timeout(WAIT, answer)
            .await
            .expect("the first send is answered")
            .expect("caller task")
            .expect("actor alive");
        assert!(
            matches!(&first, CallResult::Success(r) if matches!(r.outcome, SendOutcome::Accepted(_))),
            "{first:?}"
        );
        let settled = snapshot_when(&actor, "both sends to settle", |s| s.in_flight == 0).await;
        assert_eq!((settled.sent, settled.failed), (1, 0), "{settled:?}");
        assert!(
            starts.try_recv().is_err(),
            "the send that could outlast its caller reached the provider"
        );
        actor.stop(None);
    }

    /// Waits until the supervisor has replaced `crashed` as the directory's email actor.
    async fn restarted(
        directory: &ChannelDirectory,
        crashed: &ActorRef<ChannelMsg>,
    ) -> ActorRef<ChannelMsg> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(actor) = directory.get(Channel::Email)
                && actor.get_id() != crashed.get_id()
            {
                return actor;
            }
            assert!(
                Instant::now() < deadline,
                "no restarted actor within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A send through `actor` whose caller waits [`WAIT`], answered in the returned task.
    fn send_in_background(
        actor: &ActorRef<ChannelMsg>,
        message: OutboundMessage,
    ) -> tokio::task::JoinHandle<Result<CallResult<SendReport>, ractor::MessagingErr<ChannelMsg>>>
    {
        let actor = actor.clone();
        tokio::spawn(async move {
            actor
                .call(|port| send_msg(message, WAIT, port), Some(WAIT))
                .await
        })
    }

    #[tokio::test]
    async fn a_restarted_actor_counts_the_sends_of_the_crashed_one_against_its_concurrency() {
        let (started, mut starts) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let provider = GatedProvider {
            started,
            gate: gate.clone(),
        };
        let settings = ChannelSettings {
            concurrency: 1,
            ..ChannelSettings::default()
        };
        let directory = ChannelDirectory::default();
        let (supervisor, _) = Actor::spawn(
            None,
            ChannelSupervisor,
            ChannelSupervisorArgs {
                channels: vec![args(provider, settings)],
                directory: directory.clone(),
            },
        )
        .await
        .expect("channel supervisor starts");
        let crashed = directory.get(Channel::Email).expect("email actor");
        let first = outbound();
        let first_id = first.notification_id;
        let first_answer = send_in_background(&crashed, first);
        let sending = tokio::time::timeout(WAIT, starts.recv()).await;
        assert_eq!(sending.expect("the first send starts"), Some(first_id));

        // The actor fails while its send still holds the only permit at the provider.
        crashed.cast(ChannelMsg::Crash).expect("actor alive");
        let actor = restarted(&directory, &crashed).await;
        let second = outbound();
        let second_id = second.notification_id;
        let second_answer = send_in_background(&actor, second);
        snapshot_when(&actor, "the second send to be taken", |s| s.in_flight == 1).await;
        // Nothing to await here: the second send must not start at all while the first runs.
        let early = tokio::time::timeout(Duration::from_millis(500), starts.recv()).await;
        assert!(
            early.is_err(),
            "a second send reached the provider while the crashed actor's send held the only \
             permit: {early:?}"
        );

        gate.add_permits(2);
        for (send, answer) in [(1, first_answer), (2, second_answer)] {
            let answered = tokio::time::timeout(WAIT, answer)
                .await
                .unwrap_or_else(|_| panic!("send {send} is answered"))
                .expect("caller task")
                .expect("actor alive");
            assert!(
                matches!(&answered, CallResult::Success(r) if matches!(r.outcome, SendOutcome::Accepted(_))),
                "send {send}: {answered:?}"
            );
        }
        assert_eq!(
            starts.recv().await,
            Some(second_id),
            "the second send went out after the first"
        );
        supervisor.stop(None);
    }

    #[tokio::test]
    async fn a_send_queued_in_an_actor_that_crashed_is_answered_unsent_at_once() {
        let (started, mut starts) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(0));
        let provider = GatedProvider {
            started,
            gate: gate.clone(),
        };
        // A timeout the held first send cannot reach before the test opens the gate.
        let settings = ChannelSettings {
            concurrency: 1,
            timeout_ms: 20_000,
            ..ChannelSettings::default()
        };
        let directory = ChannelDirectory::default();
        let (supervisor, _) = Actor::spawn(
            None,
            ChannelSupervisor,
            ChannelSupervisorArgs {
                channels: vec![args(provider, settings)],
                directory: directory.clone(),
            },
        )
        .await
        .expect("channel supervisor starts");
        let crashed = directory.get(Channel::Email).expect("email actor");
        let first = outbound();
        let first_id = first.notification_id;
        let first_answer = send_in_background(&crashed, first);
        let sending = tokio::time::timeout(WAIT, starts.recv()).await;
        assert_eq!(sending.expect("the first send starts"), Some(first_id));
        let queued_answer = send_in_background(&crashed, outbound());
        snapshot_when(&crashed, "the second send to queue", |s| s.in_flight == 2).await;

        // The actor fails while the first send holds the only permit at the provider, which
        // stays held: the queued send must not wait for it.
        crashed.cast(ChannelMsg::Crash).expect("actor alive");
        let queued = answer_of(queued_answer, "the send queued in the crashed actor").await;
        assert_eq!(
            queued.outcome,
            SendOutcome::NotStarted {
                retry_in: Duration::ZERO,
                cause: NotStartedCause::ActorFailed,
            },
            "{queued:?}"
        );
        assert_eq!(queued.provider, "gated");

        // It never goes out: once the first send is through, the permit goes to a send through
        // the restarted actor.
        let actor = restarted(&directory, &crashed).await;
        gate.add_permits(2);
        let first = answer_of(first_answer, "the first send").await;
        assert!(
            matches!(first.outcome, SendOutcome::Accepted(_)),
            "{first:?}"
        );
        let third = outbound();
        let third_id = third.notification_id;
        let third = answer_of(send_in_background(&actor, third), "the third send").await;
        assert!(
            matches!(third.outcome, SendOutcome::Accepted(_)),
            "{third:?}"
        );
        let reached: Vec<Uuid> = std::iter::from_fn(|| starts.try_recv().ok()).collect();
        assert_eq!(
            reached,
            [third_id],
            "only the send through the restarted actor reached the provider after the first"
        );
        supervisor.stop(None);
    }

    /// A circuit that opens at the first failure, cooling down for `cool_down_ms`.
    fn opening_at_once(cool_down_ms: u64) -> ChannelSettings {
        ChannelSettings {
            circuit: CircuitSettings {
                failure_threshold: 1,
                window_ms: 60_000,
                cool_down_ms,
                ..CircuitSettings::default()
            },
            ..ChannelSettings::default()
        }
    }

    /// Sends one message through `actor` and returns the report.
    async fn send_one(actor: &ActorRef<ChannelMsg>, send: u64) -> SendReport {
        let answer = actor
            .call(|port| send_msg(outbound(), WAIT, port), Some(WAIT))
            .await
            .expect("actor alive");
        match answer {
            CallResult::Success(report) => report,
            other => panic!("send {send} was not answered: {other:?}"),
        }
    }

    #[tokio::test]
    async fn failures_at_recipients_own_endpoints_do_not_open_the_circuit() {
        let actor = spawn(FailingEndpoints, opening_at_once(60_000)).await;
        for send in 1..=3 {
            let report = send_one(&actor, send).await;
            assert!(
                matches!(
                    report.outcome,
                    SendOutcome::Failed(ProviderError::Transient { .. })
                ),
                "send {send}: {report:?}"
            );
        }
        let settled = snapshot_when(&actor, "the sends to settle", |s| s.in_flight == 0).await;
        assert_eq!(settled.failed, 3, "{settled:?}");
        assert_eq!(settled.circuit, CircuitState::Closed, "{settled:?}");
        actor.stop(None);
    }

    /// A circuit that opens after three failures within a minute, and stays open.
    fn opening_after_three() -> ChannelSettings {
        ChannelSettings {
            circuit: CircuitSettings {
                failure_threshold: 3,
                window_ms: 60_000,
                cool_down_ms: 600_000,
                ..CircuitSettings::default()
            },
            ..ChannelSettings::default()
        }
    }

    /// Sends `message` through `actor` and returns the report.
    async fn send_this(actor: &ActorRef<ChannelMsg>, message: OutboundMessage) -> SendReport {
        let answer = actor
            .call(|port| send_msg(message, WAIT, port), Some(WAIT))
            .await
            .expect("actor alive");
        match answer {
            CallResult::Success(report) => report,
            other => panic!("a send was not answered: {other:?}"),
        }
    }

    #[tokio::test]
    async fn one_notifications_retries_count_once_against_the_circuit() {
        let (provider, calls) = Scripted::new(|_| http_503());
        let actor = spawn(provider, opening_after_three()).await;
        let retried = outbound();
        for round in 1..=6 {
            let report = send_this(&actor, retried.clone()).await;
            assert!(
                matches!(report.outcome, SendOutcome::Failed(_)),
                "round {round} of one notification: {report:?}"
            );
        }
        let settled = snapshot_when(&actor, "the sends to settle", |s| s.in_flight == 0).await;
        assert_eq!(settled.circuit, CircuitState::Closed, "{settled:?}");
        assert_eq!(settled.recent_failures, 1, "{settled:?}");
        for other in 1..=2 {
            send_one(&actor, other).await;
        }
        let opened = snapshot_when(&actor, "the circuit to open", |s| s.in_flight == 0).await;
        assert_eq!(
            opened.circuit,
            CircuitState::Open,
            "three notifications failing: {opened:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 8);
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_few_failing_messages_among_many_sent_do_not_open_the_circuit() {
        // One message in four fails: the others show the provider up.
        let (provider, _) = Scripted::new(|n| {
            if n % 4 == 3 {
                http_503()
            } else {
                Ok(Receipt::new(None))
            }
        });
        let actor = spawn(provider, opening_after_three()).await;
        for send in 1..=40 {
            let report = send_one(&actor, send).await;
            assert!(
                !matches!(report.outcome, SendOutcome::CircuitOpen { .. }),
                "send {send}: {report:?}"
            );
        }
        let settled = snapshot_when(&actor, "the sends to settle", |s| s.in_flight == 0).await;
        assert_eq!(settled.circuit, CircuitState::Closed, "{settled:?}");
        assert_eq!(settled.recent_failures, 10, "{settled:?}");
        actor.stop(None);
    }

    /// A provider whose every send fails in one connection event, as the messages of one SMTP
    /// connection that hung do.
    struct OneConnectionEvent(crate::channel::Incident);

    impl Provider for OneConnectionEvent {
        fn channel(&self) -> Channel {
            Channel::Email
        }

        fn name(&self) -> &str {
            "one-connection"
        }

        fn send<'a>(
            &'a self,
            _message: &'a OutboundMessage,
            _deadline: tokio::time::Instant,
        ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
            let failed = ProviderError::transient("connection reset").in_incident(self.0);
            Box::pin(std::future::ready(Err(failed)))
        }
    }

    #[tokio::test]
    async fn the_failures_of_one_connection_event_count_once_against_the_circuit() {
        let incident = crate::channel::Incident::new();
        let actor = spawn(OneConnectionEvent(incident), opening_after_three()).await;
        for send in 1..=10 {
            let report = send_one(&actor, send).await;
            assert!(
                matches!(&report.outcome, SendOutcome::Failed(error) if error.incident() == Some(incident)),
                "send {send}: {report:?}"
            );
        }
        let settled = snapshot_when(&actor, "the sends to settle", |s| s.in_flight == 0).await;
        assert_eq!(settled.circuit, CircuitState::Closed, "{settled:?}");
        assert_eq!(settled.recent_failures, 1, "{settled:?}");
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_panicking_provider_counts_as_a_failure_and_probes_go_on() {
        let actor = spawn(PanickingProvider, opening_at_once(0)).await;
        // The first send opens the circuit; with no cool-down each later send is the half-open
        // probe, which must be answered and reopen the circuit rather than leave it half-open.
        for send in 1..=3 {
            let report = send_one(&actor, send).await;
            assert!(
                matches!(&report.outcome, SendOutcome::Failed(ProviderError::Transient { reason, .. })
                    if reason.contains("panicked")),
                "send {send}: {report:?}"
            );
            let snapshot = actor
                .call(ChannelMsg::Snapshot, Some(WAIT))
                .await
                .expect("actor alive")
                .expect("snapshot");
            assert_eq!(snapshot.in_flight, 0, "send {send}: {snapshot:?}");
            assert_eq!(snapshot.failed, send, "{snapshot:?}");
            assert_eq!(snapshot.circuit, CircuitState::Open, "{snapshot:?}");
        }
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_provider_asking_for_a_longer_wait_is_not_probed_after_the_cool_down() {
        // No cool-down at all: without the provider's Retry-After every later send would probe.
        let (provider, calls) = Scripted::new(down_for_an_hour);
        let actor = spawn(provider, opening_at_once(0)).await;
        let first = send_one(&actor, 1).await;
        assert!(
            matches!(
                first.outcome,
                SendOutcome::Failed(ProviderError::Transient { .. })
            ),
            "{first:?}"
        );
        let cap = Duration::from_millis(CircuitSettings::default().max_cool_down_ms);
        for send in 2..=4 {
            let report = send_one(&actor, send).await;
            match report.outcome {
                SendOutcome::CircuitOpen { cool_down_left } => assert!(
                    cool_down_left > cap - Duration::from_secs(60) && cool_down_left <= cap,
                    "send {send}: the real wait, up to the cap: {cool_down_left:?}"
                ),
                other => panic!("send {send} was not refused: {other:?}"),
            }
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no probe reached the provider"
        );
        let snapshot = snapshot_when(&actor, "the sends to settle", |s| s.in_flight == 0).await;
        assert_eq!(snapshot.circuit, CircuitState::Open, "{snapshot:?}");
        assert_eq!(snapshot.refused, 3, "{snapshot:?}");
        actor.stop(None);
    }

    /// A circuit opening at the first failure with a one-second cool-down, which takes a
    /// provider's (or another instance's) wait of up to two hours.
    fn waiting_up_to_two_hours() -> ChannelSettings {
        let mut settings = opening_at_once(1_000);
        settings.circuit.max_cool_down_ms = 7_200_000;
        settings
    }

    /// Asserts that `snapshot` shows an open circuit probing `wait` after some moment between
    /// `before` and `after`.
    fn assert_probes_after(
        snapshot: &ChannelSnapshot,
        wait: Duration,
        (before, after): (DateTime<Utc>, DateTime<Utc>),
    ) {
        assert_eq!(snapshot.circuit, CircuitState::Open, "{snapshot:?}");
        let wait = chrono::Duration::from_std(wait).expect("a short wait");
        // The wall clock and the monotonic clock may drift apart a little.
        let slack = chrono::Duration::milliseconds(500);
        let probe_at = snapshot
            .probe_at
            .expect("an open circuit says when it probes");
        assert!(
            probe_at >= before + wait - slack && probe_at <= after + wait + slack,
            "probe at {probe_at}, expected {wait} after a moment in {before}..{after}"
        );
    }

    #[tokio::test]
    async fn an_open_circuit_says_when_it_probes_past_the_providers_retry_after() {
        let (provider, _calls) = Scripted::new(down_for_an_hour);
        let actor = spawn(provider, waiting_up_to_two_hours()).await;
        let closed = snapshot_when(&actor, "the actor to start", |_| true).await;
        assert_eq!(closed.probe_at, None, "closed: {closed:?}");

        let before = Utc::now();
        send_one(&actor, 1).await;
        let open = snapshot_when(&actor, "the send to settle", |s| s.in_flight == 0).await;
        assert_probes_after(&open, Duration::from_secs(3_600), (before, Utc::now()));
        actor.stop(None);
    }

    #[test]
    fn a_probe_too_far_ahead_is_at_the_last_second_rfc_3339_can_write() {
        let last = super::from_now(Duration::MAX);
        assert_eq!(last.to_rfc3339(), "9999-12-31T23:59:59+00:00");
        assert_eq!(
            super::from_now(Duration::from_secs(400 * 365 * 86_400 * 100)),
            last
        );
        let soon = super::from_now(Duration::from_secs(60));
        assert!(soon > Utc::now() && soon < last, "{soon}");
    }

    #[tokio::test]
    async fn a_circuit_opened_by_another_instance_probes_when_that_one_said() {
        let open = opened_by_a_peer_for_an_hour(false).await;
        assert!(!open.throttled, "{open:?}");
        assert_eq!(open.times_opened, 1, "{open:?}");
    }

    /// Another instance's throttle of the whole account holds this circuit for the wait too (the
    /// account is the same), as a throttle: not counted as an opening.
    #[tokio::test]
    async fn a_throttle_announced_by_another_instance_holds_the_circuit_as_long() {
        let held = opened_by_a_peer_for_an_hour(true).await;
        assert!(held.throttled, "{held:?}");
        assert_eq!(held.times_opened, 0, "{held:?}");
    }

    /// Casts another instance's announcement (of a throttle if `throttled`) that its circuit is
    /// open for an hour; asserts that this one opens for the hour without calling its provider,
    /// and answers its snapshot then.
    async fn opened_by_a_peer_for_an_hour(throttled: bool) -> ChannelSnapshot {
        let (provider, calls) = Scripted::new(down_for_an_hour);
        let actor = spawn(provider, waiting_up_to_two_hours()).await;
        let before = Utc::now();
        actor
            .cast(ChannelMsg::PeerOpened {
                provider: "scripted".into(),
                open_for: Some(Duration::from_secs(3_600)),
                throttled,
            })
            .expect("actor alive");
        let open = snapshot_when(&actor, "the circuit to open", |s| {
            s.circuit == CircuitState::Open
        })
        .await;
        assert_probes_after(&open, Duration::from_secs(3_600), (before, Utc::now()));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "the provider was not called"
        );
        actor.stop(None);
        open
    }

    #[tokio::test]
    async fn a_retry_after_beyond_the_cap_waits_only_the_cap() {
        let (provider, calls) = Scripted::new(down_for_an_hour);
        let cap = Duration::from_millis(300);
        let mut settings = opening_at_once(0);
        settings.circuit.max_cool_down_ms = cap.as_millis() as u64;
        let actor = spawn(provider, settings).await;
        send_one(&actor, 1).await;
        let deadline = Instant::now() + WAIT;
        let mut send = 2;
        while calls.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "no probe within {WAIT:?}, with a cap of {cap:?}"
            );
            match send_one(&actor, send).await.outcome {
                SendOutcome::CircuitOpen { cool_down_left } => {
                    assert!(cool_down_left <= cap, "send {send}: {cool_down_left:?}");
                    // Waits as long as the circuit says, as the dispatcher does.
                    tokio::time::sleep(cool_down_left).await;
                }
                SendOutcome::Failed(_) => {}
                other => panic!("send {send}: {other:?}"),
            }
            send += 1;
        }
        let snapshot = snapshot_when(&actor, "the probe to settle", |s| s.in_flight == 0).await;
        assert_eq!(
            snapshot.times_opened, 2,
            "the failed probe reopened it: {snapshot:?}"
        );
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_probe_that_never_reached_the_provider_does_not_close_the_circuit() {
        fn script(n: usize) -> Result<Receipt, ProviderError> {
            match n {
                0 => Err(ProviderError::transient("HTTP 503")),
                1 => Err(ProviderError::unsendable("invalid address")),
                2 => Err(ProviderError::MissingContact(Channel::Sms)),
                _ => Ok(Receipt::new(None)),
            }
        }
        let (provider, calls) = Scripted::new(script);
        let actor = spawn(provider, opening_at_once(0)).await;
        for send in 1..=3 {
            let report = send_one(&actor, send).await;
            assert!(
                matches!(report.outcome, SendOutcome::Failed(_)),
                "{report:?}"
            );
            let snapshot = actor
                .call(ChannelMsg::Snapshot, Some(WAIT))
                .await
                .expect("actor alive")
                .expect("snapshot");
            assert_eq!(
                snapshot.circuit,
                CircuitState::Open,
                "send {send}: a local failure is no sign of a healthy provider: {snapshot:?}"
            );
        }
        // The next send is the probe again, and a real answer closes the circuit.
        let report = send_one(&actor, 4).await;
        assert!(
            matches!(report.outcome, SendOutcome::Accepted(_)),
            "{report:?}"
        );
        let closed = snapshot_when(&actor, "the good probe to settle", |s| s.in_flight == 0).await;
        assert_eq!(closed.circuit, CircuitState::Closed, "{closed:?}");
        assert_eq!(closed.times_opened, 1, "{closed:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        actor.stop(None);
    }

    #[tokio::test]
    async fn sends_queued_when_the_circuit_opens_are_refused_without_reaching_the_provider() {
        // Two sends at the provider, three queued behind them; the circuit opens at the first
        // failure. A timeout long enough that the queued sends cannot have been refused by it.
        let settings = ChannelSettings {
            concurrency: 2,
            timeout_ms: 5_000,
            ..opening_at_once(600_000)
        };
        let (actor, mut sends) = spawn_held(settings).await;
        let first = outbound();
        let first_id = first.notification_id;
        let first_answer = send_in_background(&actor, first);
        let first_held = next_held(&mut sends, first_id).await;
        let second = outbound();
        let second_id = second.notification_id;
        let _second_answer = send_in_background(&actor, second);
        let second_held = next_held(&mut sends, second_id).await;
        let queued: Vec<_> = (0..3)
            .map(|_| send_in_background(&actor, outbound()))
            .collect();
        snapshot_when(&actor, "three sends to queue for a permit", |s| {
            s.in_flight == 5
        })
        .await;

        // The first send fails and opens the circuit; the second still hangs at the provider.
        first_held.answer(http_503());
        let first = answer_of(first_answer, "the first send").await;
        assert!(matches!(first.outcome, SendOutcome::Failed(_)), "{first:?}");
        let started = Instant::now();
        for (n, send) in queued.into_iter().enumerate() {
            let report = answer_of(send, &format!("queued send {n}")).await;
            match report.outcome {
                SendOutcome::CircuitOpen { cool_down_left } => assert!(
                    cool_down_left > Duration::from_secs(60),
                    "queued send {n}: {cool_down_left:?}"
                ),
                other => panic!(
                    "queued send {n} was not refused by the open circuit after {:?}: {other:?}",
                    started.elapsed()
                ),
            }
        }
        assert!(
            started.elapsed() < Duration::from_millis(settings.timeout_ms),
            "the queued sends waited {:?} for their refusal",
            started.elapsed()
        );
        if let Ok(reached) = sends.try_recv() {
            panic!(
                "a send queued when the circuit opened reached the provider: {}",
                reached.id
            );
        }
        let open = snapshot_when(&actor, "the refusals to settle", |s| s.in_flight == 1).await;
        assert_eq!(open.circuit, CircuitState::Open, "{open:?}");
        assert_eq!((open.refused, open.times_opened), (3, 1), "{open:?}");

        // The second send's late failure changes nothing.
        second_held.answer(http_503());
        let settled =
            snapshot_when(&actor, "the second send to settle", |s| s.in_flight == 0).await;
        assert_eq!(settled.circuit, CircuitState::Open, "{settled:?}");
        assert_eq!(settled.times_opened, 1, "{settled:?}");
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_send_queued_when_the_circuit_opens_is_the_probe_once_the_cool_down_is_over() {
        // No cool-down: the queued send, let out once the first fails, is the half-open probe,
        // and its success closes the circuit.
        let (actor, mut sends) = spawn_held(ChannelSettings {
            concurrency: 1,
            ..opening_at_once(0)
        })
        .await;
        let first = outbound();
        let first_id = first.notification_id;
        let first_answer = send_in_background(&actor, first);
        let first_held = next_held(&mut sends, first_id).await;
        let queued = outbound();
        let queued_id = queued.notification_id;
        let queued_answer = send_in_background(&actor, queued);
        snapshot_when(&actor, "the second send to queue", |s| s.in_flight == 2).await;

        first_held.answer(http_503());
        answer_of(first_answer, "the first send").await;
        let probe = next_held(&mut sends, queued_id).await;
        let half_open =
            snapshot_when(&actor, "the first send to settle", |s| s.in_flight == 1).await;
        assert_eq!(
            half_open.circuit,
            CircuitState::HalfOpen,
            "the queued send went out as the probe: {half_open:?}"
        );
        probe.answer(Ok(Receipt::new(None)));
        let report = answer_of(queued_answer, "the probe").await;
        assert!(
            matches!(report.outcome, SendOutcome::Accepted(_)),
            "{report:?}"
        );
        let closed = snapshot_when(&actor, "the probe to settle", |s| s.in_flight == 0).await;
        assert_eq!(closed.circuit, CircuitState::Closed, "{closed:?}");
        assert_eq!(closed.times_opened, 1, "{closed:?}");
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_failure_of_a_send_from_before_the_circuit_opened_does_not_reopen_it_after_a_good_probe()
     {
        let (actor, mut sends) = spawn_held(ChannelSettings {
            concurrency: 2,
            ..opening_at_once(0)
        })
        .await;
        let first = outbound();
        let first_id = first.notification_id;
        let first_answer = send_in_background(&actor, first);
        let first_held = next_held(&mut sends, first_id).await;
        let stale = outbound();
        let stale_id = stale.notification_id;
        let stale_answer = send_in_background(&actor, stale);
        let stale_held = next_held(&mut sends, stale_id).await;

        // The first send opens the circuit; the next send, after the (empty) cool-down, is the
        // probe, and closes it.
        first_held.answer(http_503());
        answer_of(first_answer, "the first send").await;
        let probe = outbound();
        let probe_id = probe.notification_id;
        let probe_answer = send_in_background(&actor, probe);
        next_held(&mut sends, probe_id)
            .await
            .answer(Ok(Receipt::new(None)));
        answer_of(probe_answer, "the probe").await;
        let closed = snapshot_when(&actor, "the probe to settle", |s| s.in_flight == 1).await;
        assert_eq!(closed.circuit, CircuitState::Closed, "{closed:?}");

        // The send that went out before the circuit opened fails only now: it says nothing of the
        // provider since the probe, so it does not count toward the new window.
        stale_held.answer(http_503());
        answer_of(stale_answer, "the stale send").await;
        let settled = snapshot_when(&actor, "the stale send to settle", |s| s.in_flight == 0).await;
        assert_eq!(
            (
                settled.circuit,
                settled.times_opened,
                settled.recent_failures
            ),
            (CircuitState::Closed, 1, 0),
            "{settled:?}"
        );
        actor.stop(None);
    }

    /// A channel actor over a [`HeldProvider`] whose circuit a first send's 503 opened, with the
    /// half-open probe out at the provider: the probe's send, and the answer it will get.
    struct ProbeOut {
        actor: ActorRef<ChannelMsg>,
        sends: mpsc::UnboundedReceiver<HeldSend>,
        probe: HeldSend,
        probe_answer: tokio::task::JoinHandle<
            Result<CallResult<SendReport>, ractor::MessagingErr<ChannelMsg>>,
        >,
    }

    async fn probe_out(settings: ChannelSettings) -> ProbeOut {
        let cool_down = Duration::from_millis(settings.circuit.cool_down_ms);
        let (actor, mut sends) = spawn_held(settings).await;
        let first = outbound();
        let first_id = first.notification_id;
        let first_answer = send_in_background(&actor, first);
        next_held(&mut sends, first_id).await.answer(http_503());
        answer_of(first_answer, "the first send").await;

        // Waits as long as the open circuit says, as the dispatcher does; then the next send is
        // the probe, and the provider holds it.
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no probe within {WAIT:?}");
            let send = outbound();
            let id = send.notification_id;
            let mut answer = send_in_background(&actor, send);
            tokio::select! {
                probe = next_held(&mut sends, id) => {
                    return ProbeOut { actor, sends, probe, probe_answer: answer };
                }
                report = &mut answer => match report.expect("caller task").expect("actor alive") {
                    CallResult::Success(SendReport {
                        outcome: SendOutcome::CircuitOpen { cool_down_left },
                        ..
                    }) => {
                        assert!(cool_down_left <= cool_down, "{cool_down_left:?}");
                        tokio::time::sleep(cool_down_left).await;
                    }
                    other => panic!("a send to the open circuit: {other:?}"),
                },
            }
        }
    }

    /// A send's answer, in the background: it must not come while the probe is out. Returns once
    /// the actor counts `in_flight` sends (the probe and those it holds).
    async fn held_while_the_probe_is_out(
        actor: &ActorRef<ChannelMsg>,
        answers: &mut [tokio::task::JoinHandle<
            Result<CallResult<SendReport>, ractor::MessagingErr<ChannelMsg>>,
        >],
        in_flight: usize,
    ) {
        let answered = futures::future::select_all(answers.iter_mut());
        tokio::select! {
            (report, n, _) = answered => panic!(
                "send {n} was answered while the probe was out, not held for its result: \
                 {report:?}"
            ),
            _ = snapshot_when(actor, "the sends to be held", |s| s.in_flight == in_flight) => {}
        }
    }

    /// Settings whose probe may take 20 s (the send timeout, less than the callers' [`WAIT`]) to
    /// answer; the circuit opens at the first failure and cools down for half a second.
    fn slow_probe() -> ChannelSettings {
        ChannelSettings {
            timeout_ms: 20_000,
            ..opening_at_once(500)
        }
    }

    #[tokio::test]
    async fn a_send_arriving_while_the_probe_is_out_goes_out_as_soon_as_the_probe_succeeds() {
        // Refused, the send would be told to come back once the probe's result is due (the rest
        // of its timeout, at most the cool-down), or fail over to the next channel, though the probe
        // succeeds a moment later.
        let ProbeOut {
            actor,
            mut sends,
            probe,
            probe_answer,
        } = probe_out(slow_probe()).await;
        let before = snapshot_when(&actor, "the probe to be out", |_| true).await;
        let held = outbound();
        let held_id = held.notification_id;
        let mut held_answer = [send_in_background(&actor, held)];
        held_while_the_probe_is_out(&actor, &mut held_answer, 2).await;

        probe.answer(Ok(Receipt::new(None)));
        let probe = answer_of(probe_answer, "the probe").await;
        assert!(
            matches!(probe.outcome, SendOutcome::Accepted(_)),
            "{probe:?}"
        );
        // The held send goes out now, not after the probe's timeout or a retry.
        next_held(&mut sends, held_id)
            .await
            .answer(Ok(Receipt::new(None)));
        let [held_answer] = held_answer;
        let held = answer_of(held_answer, "the held send").await;
        assert!(matches!(held.outcome, SendOutcome::Accepted(_)), "{held:?}");
        let closed = snapshot_when(&actor, "the sends to settle", |s| s.in_flight == 0).await;
        assert_eq!(
            (
                closed.circuit,
                closed.sent,
                closed.refused,
                closed.times_opened
            ),
            (CircuitState::Closed, 2, before.refused, 1),
            "{closed:?}"
        );
        actor.stop(None);
    }

    #[tokio::test]
    async fn sends_held_while_the_probe_is_out_are_refused_when_it_fails() {
        let ProbeOut {
            actor,
            mut sends,
            probe,
            probe_answer,
        } = probe_out(slow_probe()).await;
        let before = snapshot_when(&actor, "the probe to be out", |_| true).await;
        let mut held: Vec<_> = (0..2)
            .map(|_| send_in_background(&actor, outbound()))
            .collect();
        held_while_the_probe_is_out(&actor, &mut held, 3).await;

        // The probe fails, asking for a minute: the circuit opens again for that long, and the
        // held sends are refused with that wait, without reaching the provider.
        let wait = Duration::from_secs(60);
        probe.answer(Err(ProviderError::transient_after("HTTP 503", Some(wait))));
        let probe = answer_of(probe_answer, "the probe").await;
        assert!(matches!(probe.outcome, SendOutcome::Failed(_)), "{probe:?}");
        for (n, answer) in held.into_iter().enumerate() {
            let report = answer_of(answer, &format!("held send {n}")).await;
            match report.outcome {
                SendOutcome::CircuitOpen { cool_down_left } => assert!(
                    cool_down_left <= wait && cool_down_left > wait - Duration::from_secs(10),
                    "held send {n}: the new open period's wait: {cool_down_left:?}"
                ),
                other => panic!("held send {n} was not refused: {other:?}"),
            }
        }
        if let Ok(reached) = sends.try_recv() {
            panic!("a held send reached the provider: {}", reached.id);
        }
        let open = snapshot_when(&actor, "the sends to settle", |s| s.in_flight == 0).await;
        assert_eq!(
            (open.circuit, open.refused, open.times_opened),
            (CircuitState::Open, before.refused + 2, 2),
            "{open:?}"
        );
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_send_held_until_too_late_to_start_is_answered_unsent() {
        let settings = slow_probe();
        let timeout = Duration::from_millis(settings.timeout_ms);
        let ProbeOut {
            actor,
            mut sends,
            probe,
            probe_answer,
        } = probe_out(settings).await;
        // Its caller waits the send's timeout and a second more: held any longer than that
        // second, it could no longer finish in time.
        let late = outbound();
        let answer = tokio::spawn({
            let actor = actor.clone();
            async move {
                actor
                    .call(
                        |port| send_msg(late, timeout + Duration::from_secs(1), port),
                        Some(WAIT),
                    )
                    .await
            }
        });
        let mut answer = [answer];
        held_while_the_probe_is_out(&actor, &mut answer, 2).await;
        let [answer] = answer;
        let report = answer_of(answer, "the held send").await;
        match report.outcome {
            SendOutcome::NotStarted { retry_in, cause } => {
                assert_eq!(cause, NotStartedCause::HeldForProbe, "{report:?}");
                assert!(retry_in <= timeout, "{report:?}");
            }
            other => panic!("not answered as not started: {other:?}"),
        }
        let waiting = snapshot_when(&actor, "the held send to settle", |s| s.in_flight == 1).await;
        assert_eq!(waiting.circuit, CircuitState::HalfOpen, "{waiting:?}");

        // It never goes out, not even once the probe has closed the circuit.
        probe.answer(Ok(Receipt::new(None)));
        answer_of(probe_answer, "the probe").await;
        snapshot_when(&actor, "the probe to settle", |s| s.in_flight == 0).await;
        if let Ok(reached) = sends.try_recv() {
            panic!(
                "the send held too long reached the provider: {}",
                reached.id
            );
        }
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_send_beyond_what_the_probe_holds_is_refused_until_the_probes_result_is_due() {
        // One permit: the probe holds one send. The cool-down is longer than the send timeout: a
        // send refused beyond it is told to come back once the probe's result is due, not after
        // another cool-down.
        let cool_down = Duration::from_secs(4);
        let timeout = Duration::from_secs(2);
        let ProbeOut {
            actor,
            mut sends,
            probe,
            probe_answer,
        } = probe_out(ChannelSettings {
            concurrency: 1,
            timeout_ms: timeout.as_millis() as u64,
            ..opening_at_once(cool_down.as_millis() as u64)
        })
        .await;
        let held = outbound();
        let held_id = held.notification_id;
        let mut held_answer = [send_in_background(&actor, held)];
        held_while_the_probe_is_out(&actor, &mut held_answer, 2).await;
        let refused = send_one(&actor, 2).await;
        match refused.outcome {
            SendOutcome::CircuitOpen { cool_down_left } => assert!(
                cool_down_left <= timeout,
                "refused while the probe is out: told to wait {cool_down_left:?}, longer than \
                 the probe's {timeout:?} timeout (the cool-down is {cool_down:?})"
            ),
            other => panic!("not refused while the probe is out: {other:?}"),
        }

        // The probe succeeds and closes the circuit; the held send goes out.
        probe.answer(Ok(Receipt::new(None)));
        let probe = answer_of(probe_answer, "the probe").await;
        assert!(
            matches!(probe.outcome, SendOutcome::Accepted(_)),
            "{probe:?}"
        );
        next_held(&mut sends, held_id)
            .await
            .answer(Ok(Receipt::new(None)));
        let [held_answer] = held_answer;
        let held = answer_of(held_answer, "the held send").await;
        assert!(matches!(held.outcome, SendOutcome::Accepted(_)), "{held:?}");
        let closed = snapshot_when(&actor, "the sends to settle", |s| s.in_flight == 0).await;
        assert_eq!(closed.circuit, CircuitState::Closed, "{closed:?}");
        actor.stop(None);
    }

    /// The provider's refusal of a send for the whole account's rate, asking for `wait`.
    fn account_throttled(wait: Duration) -> Result<Receipt, ProviderError> {
        Err(ProviderError::account_throttled(
            "429 Too Many Requests",
            Some(wait),
        ))
    }

    #[tokio::test]
    async fn an_account_throttle_holds_every_send_for_the_providers_wait_without_a_failure() {
        // A circuit that would open only after many failures and then cool down for ten
        // minutes: the hold is the provider's minute, and no failure is counted.
        let settings = ChannelSettings {
            concurrency: 2,
            timeout_ms: 5_000,
            circuit: CircuitSettings {
                failure_threshold: 100,
                window_ms: 60_000,
                cool_down_ms: 600_000,
                max_cool_down_ms: 900_000,
                ..CircuitSettings::default()
            },
        };
        let wait = Duration::from_secs(60);
        let (actor, mut sends) = spawn_held(settings).await;
        let first = outbound();
        let first_id = first.notification_id;
        let first_answer = send_in_background(&actor, first);
        let first_held = next_held(&mut sends, first_id).await;
        let second = outbound();
        let second_id = second.notification_id;
        let _second_answer = send_in_background(&actor, second);
        let second_held = next_held(&mut sends, second_id).await;
        let queued: Vec<_> = (0..3)
            .map(|_| send_in_background(&actor, outbound()))
            .collect();
        snapshot_when(&actor, "three sends to queue for a permit", |s| {
            s.in_flight == 5
        })
        .await;

        first_held.answer(account_throttled(wait));
        let first = answer_of(first_answer, "the first send").await;
        assert!(
            matches!(
                first.outcome,
                SendOutcome::Failed(ProviderError::AccountThrottled { .. })
            ),
            "{first:?}"
        );
        let refused_within = |report: SendReport, what: &str| match report.outcome {
            SendOutcome::CircuitOpen { cool_down_left } => assert!(
                cool_down_left <= wait && cool_down_left > wait - Duration::from_secs(10),
                "{what}: the provider's wait, not the cool-down: {cool_down_left:?}"
            ),
            other => panic!("{what} was not held: {other:?}"),
        };
        for (n, send) in queued.into_iter().enumerate() {
            let what = format!("queued send {n}");
            refused_within(answer_of(send, &what).await, &what);
        }
        for send in 1..=3 {
            refused_within(send_one(&actor, send).await, &format!("later send {send}"));
        }
        if let Ok(reached) = sends.try_recv() {
            panic!("a held send reached the provider: {}", reached.id);
        }
        let held = snapshot_when(&actor, "the refusals to settle", |s| s.in_flight == 1).await;
        assert_eq!(
            (
                held.circuit,
                held.throttled,
                held.times_opened,
                held.refused
            ),
            (CircuitState::Open, true, 0, 6),
            "{held:?}"
        );
        assert_probes_after(
            &held,
            wait,
            (Utc::now() - chrono::Duration::seconds(10), Utc::now()),
        );

        // The second send's late throttle changes nothing.
        second_held.answer(account_throttled(Duration::from_secs(1)));
        let settled =
            snapshot_when(&actor, "the second send to settle", |s| s.in_flight == 0).await;
        assert_eq!(
            (settled.circuit, settled.throttled, settled.recent_failures),
            (CircuitState::Open, true, 0),
            "{settled:?}"
        );
        assert!(
            settled.probe_at > Some(Utc::now() + chrono::Duration::seconds(40)),
            "{settled:?}"
        );
        actor.stop(None);
    }

    #[tokio::test]
    async fn once_an_account_throttle_has_passed_the_next_send_probes_and_closes_the_circuit() {
        fn script(n: usize) -> Result<Receipt, ProviderError> {
            match n {
                0 => account_throttled(Duration::from_millis(200)),
                _ => Ok(Receipt::new(None)),
            }
        }
        let (provider, calls) = Scripted::new(script);
        let actor = spawn(provider, opening_at_once(600_000)).await;
        send_one(&actor, 1).await;
        let report = send_one(&actor, 2).await;
        let SendOutcome::CircuitOpen { cool_down_left } = report.outcome else {
            panic!("send 2 was not held: {report:?}");
        };
        assert!(
            cool_down_left <= Duration::from_millis(200),
            "{cool_down_left:?}"
        );
        // Waits as long as the channel says, as the dispatcher does.
        tokio::time::sleep(cool_down_left).await;
        let probe = send_one(&actor, 3).await;
        assert!(
            matches!(probe.outcome, SendOutcome::Accepted(_)),
            "{probe:?}"
        );
        let closed = snapshot_when(&actor, "the probe to settle", |s| s.in_flight == 0).await;
        assert_eq!(
            (closed.circuit, closed.throttled, closed.times_opened),
            (CircuitState::Closed, false, 0),
            "{closed:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        actor.stop(None);
    }
}
