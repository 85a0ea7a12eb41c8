//! A bounded pull loop over a durable JetStream consumer, for actors that handle each message as
//! a task (the Router; the Dispatcher has its own copy of the same shape).
//!
//! A permit is taken before a message is pulled and travels with it, released only when its
//! handling is done, so slow handling slows the pulling instead of filling memory. Errors (a NATS
//! restart, a deleted consumer) bind the consumer again and re-subscribe with a bounded backoff; a
//! stopped loop hands back what it had prefetched.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use herald_nats::NatsError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How long to look for messages already delivered to this client when a loop stops.
const RELEASE_WINDOW: Duration = Duration::from_millis(50);

/// Pulls messages from `consumer` while permits are free and `stop` is not cancelled, handing
/// each to `hand_off` with its permit. `hand_off` returns the message when its receiver is gone;
/// the message is then NAKed and the loop ends. After an error the consumer is bound again with
/// `bind` (which creates it if it was deleted). `what` names the messages in logs.
pub async fn pull_loop<F, B, Bound>(
    consumer: PullConsumer,
    bind: B,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
    what: &'static str,
    hand_off: F,
) where
    F: Fn(Box<jetstream::Message>, OwnedSemaphorePermit) -> Result<(), Box<jetstream::Message>>,
    B: Fn() -> Bound,
    Bound: Future<Output = Result<PullConsumer, NatsError>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut consumer = Some(consumer);
    while !stop.is_cancelled() {
        let bound = match &consumer {
            Some(bound) => bound.clone(),
            None => tokio::select! {
                _ = stop.cancelled() => return,
                bound = bind() => match bound {
                    Ok(bound) => consumer.insert(bound).clone(),
                    Err(err) => {
                        tracing::warn!(error = %err, what, "cannot bind the consumer; retrying");
                        pause(&stop, &mut backoff).await;
                        continue;
                    }
                },
            },
        };
        let mut messages = tokio::select! {
            _ = stop.cancelled() => return,
            subscribed = bound.messages() => match subscribed {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(error = %err, what, "cannot pull; binding again");
                    consumer = None;
                    pause(&stop, &mut backoff).await;
                    continue;
                }
            },
        };
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return release_buffered(messages, what).await,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return release_buffered(messages, what).await,
                },
            };
            let next = tokio::select! {
                _ = stop.cancelled() => return release_buffered(messages, what).await,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    backoff = Duration::from_millis(100);
                    if let Err(message) = hand_off(Box::new(message), permit) {
                        let _ = message.ack_with(AckKind::Nak(None)).await;
                        return release_buffered(messages, what).await;
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, what, "pulling failed; binding again");
                    // The consumer may be gone (deleted: `ConsumerDeleted`, `NoResponders`), and
                    // pulling from a stale handle would fail for good.
                    consumer = None;
                    pause(&stop, &mut backoff).await;
                    break;
                }
                None => break,
            }
        }
    }
}

/// NAKs the messages the client had already fetched for this loop, so JetStream redelivers them
/// at once instead of after `ack_wait`.
async fn release_buffered(mut messages: jetstream::consumer::pull::Stream, what: &'static str) {
    let mut released = 0u32;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(RELEASE_WINDOW, messages.next()).await {
        let _ = message.ack_with(AckKind::Nak(None)).await;
        released += 1;
    }
    if released > 0 {
        tracing::info!(released, what, "returned prefetched messages to JetStream");
    }
}

async fn pause(stop: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}
