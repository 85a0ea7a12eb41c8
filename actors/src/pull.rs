//! The bounded pull loop over a durable JetStream consumer that the Router (events) and the
//! Dispatcher (one loop per command partition) both run; each hands every message on as a task.
//!
//! A permit is taken before a message is pulled and travels with it, released only when its
//! handling is done, so slow handling slows the pulling instead of filling memory. Errors (a NATS
//! restart, a deleted consumer, a missed idle heartbeat after a consumer-leader change) bind the
//! consumer again and re-subscribe with a bounded backoff. A [`Gate`] can hold the loop back (the
//! Dispatcher's is the partition's lease): it does not pull while the gate is closed.
//!
//! A stopped or held-back loop hands back what it had fetched, NAKed with a short delay so that
//! JetStream offers the messages to the next puller soon instead of after the consumer's
//! `ack_wait`. It drains its pull stream first ([`Stream::drain`], Herald's addition to
//! async-nats, vendor/async-nats): the subscription is unsubscribed, after which the server skips
//! the stream's open pull requests (nobody listens to them), and the messages the server sent
//! before that, fenced by a PING, are still read and handed back. Merely dropping the stream would lose those on the wire to the
//! client, and they would wait out `ack_wait`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, consumer::pull::Stream};
use futures::StreamExt;
use herald_nats::NatsError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How long the server may stay silent on a pull request before the loop takes the subscription
/// for dead and subscribes again (after two missed heartbeats: a consumer-leader change in a
/// cluster leaves the old request unanswered).
const IDLE_HEARTBEAT: Duration = Duration::from_secs(15);

/// Longest a hand-back takes (normally a round trip, for the drain's answer); past it the stream
/// is dropped, and what was still on its way is offered again after `ack_wait`.
const RELEASE_LIMIT: Duration = Duration::from_secs(1);
/// How long JetStream waits before offering a handed-back message again. A message NAKed without
/// delay can be offered straight back to the pull request it was handed back from, although that
/// request's subscription is gone (seen with nats-server 2.9), and is then lost to the client
/// until `ack_wait`.
pub(crate) const HAND_BACK_DELAY: Duration = Duration::from_secs(1);

/// First pause after a failure; it doubles up to [`MAX_BACKOFF`] and resets on a message.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// When a loop may hand messages on. The Dispatcher's gate is the partition's lease: past its
/// deadline another instance may own the partition any moment.
pub trait Gate: Send + Sync {
    /// Whether messages may be handed on now.
    fn is_open(&self) -> bool;

    /// Waits until messages may be handed on again.
    fn opened(&self) -> impl Future<Output = ()> + Send;

    /// Called when a message arrived while the gate was closed (it is handed back): for logs and
    /// metrics.
    fn held_back(&self) {}
}

/// The gate of a loop that is never held back (the Router's).
pub struct Open;

impl Gate for Open {
    fn is_open(&self) -> bool {
        true
    }

    async fn opened(&self) {}
}

/// What a [`pull_loop`] pulls and how.
pub struct Pull<B, G> {
    /// Names the messages in logs ("events", "commands").
    pub what: &'static str,
    /// The consumer when already bound; otherwise the loop binds it first.
    pub consumer: Option<PullConsumer>,
    /// Binds the consumer (creating it if it was deleted), first and again after an error.
    pub bind: B,
    /// Messages one pull request asks for; `None` for async-nats's default (200, capped by the
    /// consumer's `max_batch`).
    pub batch: Option<usize>,
    /// When messages may be handed on.
    pub gate: G,
    /// The in-flight bound: a permit is taken before each message is pulled.
    pub permits: Arc<Semaphore>,
    /// Ends the loop.
    pub stop: CancellationToken,
}

/// How one subscription ended.
enum Ended {
    /// The loop was stopped (or whoever takes its messages is gone): return.
    Stopped,
    /// A message arrived while the gate was closed (it was handed back).
    HeldBack,
    /// Pulling failed: bind the consumer again.
    Failed,
    /// The subscription ended on its own: subscribe again.
    Finished,
}

/// Pulls messages while permits are free, the gate is open and `stop` is not cancelled, handing
/// each to `hand_off` with its permit; returns once `stop` is cancelled. `hand_off` returns the
/// message when its receiver is gone; the message is then handed back to JetStream and the loop
/// ends.
pub async fn pull_loop<B, Bound, G, F>(pull: Pull<B, G>, hand_off: F)
where
    B: Fn() -> Bound,
    Bound: Future<Output = Result<PullConsumer, NatsError>>,
    G: Gate,
    F: Fn(Box<jetstream::Message>, OwnedSemaphorePermit) -> Result<(), Box<jetstream::Message>>,
{
    let mut consumer = pull.consumer.clone();
    let mut backoff = Backoff::default();
    while !pull.stop.is_cancelled() {
        if !pull.gate.is_open() {
            tokio::select! {
                _ = pull.stop.cancelled() => return,
                _ = pull.gate.opened() => continue,
            }
        }
        let bound = match &consumer {
            Some(bound) => bound.clone(),
            None => {
                let Some(bound) = bind(&pull, &mut backoff).await else {
                    return;
                };
                consumer.insert(bound).clone()
            }
        };
        let messages = tokio::select! {
            _ = pull.stop.cancelled() => return,
            subscribed = subscribe(&bound, pull.batch) => match subscribed {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(error = %err, what = pull.what, "cannot pull; binding again");
                    consumer = None;
                    backoff.pause(&pull.stop).await;
                    continue;
                }
            },
        };
        match take(messages, &pull, &hand_off, &mut backoff).await {
            Ended::Stopped => return,
            // The loop waits for the gate to open again at the top.
            Ended::HeldBack => {}
            Ended::Failed => {
                // The consumer may be gone (deleted: `ConsumerDeleted`, `NoResponders`), and
                // pulling from a stale handle would fail for good.
                consumer = None;
                backoff.pause(&pull.stop).await;
            }
            Ended::Finished => {}
        }
    }
}

/// Binds the consumer, retrying with the backoff until it works; `None` once the loop is stopped.
async fn bind<B, Bound, G>(pull: &Pull<B, G>, backoff: &mut Backoff) -> Option<PullConsumer>
where
    B: Fn() -> Bound,
    Bound: Future<Output = Result<PullConsumer, NatsError>>,
{
    loop {
        let bound = tokio::select! {
            _ = pull.stop.cancelled() => return None,
            bound = (pull.bind)() => bound,
        };
        match bound {
            Ok(bound) => return Some(bound),
            Err(err) => {
                let what = pull.what;
                tracing::warn!(error = %err, what, "cannot bind the consumer; retrying");
                backoff.pause(&pull.stop).await;
            }
        }
    }
}

/// Opens a pull subscription: pull requests of `batch` messages (async-nats's default when
/// `None`) with an idle heartbeat, so a request the server stopped answering is noticed.
async fn subscribe(
    consumer: &PullConsumer,
    batch: Option<usize>,
) -> Result<Stream, jetstream::consumer::StreamError> {
    let builder = consumer.stream().heartbeat(IDLE_HEARTBEAT);
    match batch {
        Some(batch) => {
            builder
                .max_messages_per_batch(batch.max(1))
                .messages()
                .await
        }
        None => builder.messages().await,
    }
}

/// Hands on the messages of one subscription until it ends, the loop stops or the gate closes.
async fn take<B, G, F>(
    mut messages: Stream,
    pull: &Pull<B, G>,
    hand_off: &F,
    backoff: &mut Backoff,
) -> Ended
where
    G: Gate,
    F: Fn(Box<jetstream::Message>, OwnedSemaphorePermit) -> Result<(), Box<jetstream::Message>>,
{
    loop {
        let permit = tokio::select! {
            _ = pull.stop.cancelled() => None,
            permit = pull.permits.clone().acquire_owned() => permit.ok(),
        };
        let Some(permit) = permit else {
            release(messages, None, pull.what).await;
            return Ended::Stopped;
        };
        let next = tokio::select! {
            _ = pull.stop.cancelled() => {
                release(messages, None, pull.what).await;
                return Ended::Stopped;
            }
            next = messages.next() => next,
        };
        match next {
            Some(Ok(message)) if !pull.gate.is_open() => {
                pull.gate.held_back();
                drop(permit);
                release(messages, Some(message), pull.what).await;
                return Ended::HeldBack;
            }
            Some(Ok(message)) => {
                backoff.reset();
                if let Err(message) = hand_off(Box::new(message), permit) {
                    release(messages, Some(*message), pull.what).await;
                    return Ended::Stopped;
                }
            }
            Some(Err(err)) => {
                tracing::warn!(error = %err, what = pull.what, "pulling failed; binding again");
                // What the subscription still holds goes back too (after a missed heartbeat the
                // connection itself may be fine).
                release(messages, None, pull.what).await;
                return Ended::Failed;
            }
            None => return Ended::Finished,
        }
    }
}

/// Ends the subscription's pull requests and hands back `taken` (a message already taken from it)
/// and every message the server had sent it, so JetStream offers them to the next puller soon
/// instead of after `ack_wait`. Takes at most [`RELEASE_LIMIT`], also while the client cannot
/// reach the server (its command queue full); what is left then waits out `ack_wait`.
async fn release(mut messages: Stream, taken: Option<jetstream::Message>, what: &'static str) {
    let mut released = 0u32;
    let handing_back = async {
        // The drain's UNSUB goes out before the NAKs.
        if let Err(err) = messages.drain().await {
            tracing::debug!(error = %err, what, "cannot drain the pull subscription");
        }
        if let Some(message) = taken {
            hand_back(&message).await;
            released += 1;
        }
        // Errors (a status the stream reports) do not end the drain; its end does.
        while let Some(next) = messages.next().await {
            if let Ok(message) = next {
                hand_back(&message).await;
                released += 1;
            }
        }
    };
    if tokio::time::timeout(RELEASE_LIMIT, handing_back)
        .await
        .is_err()
    {
        tracing::debug!(
            what,
            "hand-back cut short; the rest is redelivered after ack_wait"
        );
    }
    drop(messages);
    if released > 0 {
        tracing::info!(released, what, "returned fetched messages to JetStream");
    }
}

/// NAKs `message` with [`HAND_BACK_DELAY`].
async fn hand_back(message: &jetstream::Message) {
    if let Err(err) = message.ack_with(AckKind::Nak(Some(HAND_BACK_DELAY))).await {
        tracing::debug!(error = %err, "cannot hand a message back; redelivered after ack_wait");
    }
}

/// The pause after a failure: doubles each time, up to [`MAX_BACKOFF`].
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(FIRST_BACKOFF)
    }
}

impl Backoff {
    /// Waits the current pause (or until `stop`) and doubles it.
    async fn pause(&mut self, stop: &CancellationToken) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(self.0) => {}
        }
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }

    /// Back to the first pause, after a message came through.
    fn reset(&mut self) {
        self.0 = FIRST_BACKOFF;
    }
}

/// Which copy of a stream message a consumer works on, as JetStream tells it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delivery {
    /// JetStream's delivery count of the stream message (1 for the first).
    pub(crate) count: u64,
    /// The stream message's sequence: it names the message in the ids of its dead letters, so a
    /// redelivery's is a duplicate while a new message with the same content (a command replayed
    /// from the DLQ) gets its own.
    pub(crate) sequence: u64,
    /// When JetStream stored the stream message: a wait for a customer is measured from it.
    pub(crate) published: std::time::SystemTime,
}

impl Delivery {
    /// What JetStream tells of `message` (a first delivery, now, when it tells nothing).
    pub(crate) fn of(message: &jetstream::Message) -> Self {
        message.info().map_or(
            Delivery {
                count: 1,
                sequence: 0,
                published: std::time::SystemTime::now(),
            },
            |info| Delivery {
                count: info.delivered.max(1) as u64,
                sequence: info.stream_sequence,
                published: info.published.into(),
            },
        )
    }
}
