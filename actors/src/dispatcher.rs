//! `Dispatcher`: pulls send commands from the `herald-dispatch` durable consumer and runs each
//! delivery as a task. An in-flight semaphore bounds the work: a permit is taken before a message
//! is pulled and released only after its outcome is written and acked, so a slow provider or
//! database slows the pulling instead of filling memory.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::delivery::{self, DeliveryContext};

/// Messages of the [`Dispatcher`].
pub enum DispatcherMsg {
    /// Deliver this command (from the pull loop).
    Deliver(Box<jetstream::Message>, OwnedSemaphorePermit),
    /// Panic on purpose, to exercise supervision (fault injection in tests).
    Crash,
}

/// Arguments of the [`Dispatcher`].
#[derive(Clone)]
pub struct DispatcherArgs {
    /// The `herald-dispatch` consumer.
    pub consumer: PullConsumer,
    /// What deliveries need.
    pub context: Arc<DeliveryContext>,
    /// In-flight bound shared with the engine (which waits on it at shutdown).
    pub in_flight: Arc<Semaphore>,
    /// Cancelled when the engine stops taking messages.
    pub intake: CancellationToken,
}

/// State of the [`Dispatcher`].
pub struct DispatcherState {
    context: Arc<DeliveryContext>,
    pull: JoinHandle<()>,
    /// Cancels the pull loop when the state is dropped, which also happens when the actor panics
    /// (ractor runs no `post_stop` then): a loop must not outlive its dispatcher and keep pulling
    /// messages nobody will handle.
    _stop: DropGuard,
}

/// The dispatcher.
pub struct Dispatcher;

impl Actor for Dispatcher {
    type Msg = DispatcherMsg;
    type State = DispatcherState;
    type Arguments = DispatcherArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: DispatcherArgs,
    ) -> Result<DispatcherState, ActorProcessingErr> {
        let stop = args.intake.child_token();
        let pull = tokio::spawn(pull_loop(
            args.consumer,
            myself,
            args.in_flight,
            stop.clone(),
        ));
        Ok(DispatcherState {
            context: args.context,
            pull,
            _stop: stop.drop_guard(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: DispatcherMsg,
        state: &mut DispatcherState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DispatcherMsg::Deliver(message, permit) => {
                tokio::spawn(delivery::deliver(state.context.clone(), *message, permit));
            }
            DispatcherMsg::Crash => panic!("fault injected into dispatcher"),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut DispatcherState,
    ) -> Result<(), ActorProcessingErr> {
        // Dropping the state cancels the loop; give it a moment to return what it holds.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut state.pull).await;
        Ok(())
    }
}

/// Pulls messages while permits are free and the intake is open; re-subscribes after errors (a
/// NATS restart) with a bounded backoff.
async fn pull_loop(
    consumer: PullConsumer,
    dispatcher: ActorRef<DispatcherMsg>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let mut messages = tokio::select! {
            _ = stop.cancelled() => return,
            subscribed = consumer.messages() => match subscribed {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot pull commands; retrying");
                    pause(&stop, &mut backoff).await;
                    continue;
                }
            },
        };
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return release_buffered(messages).await,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return release_buffered(messages).await,
                },
            };
            let next = tokio::select! {
                _ = stop.cancelled() => return release_buffered(messages).await,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    backoff = Duration::from_millis(100);
                    let delivery = DispatcherMsg::Deliver(Box::new(message), permit);
                    if let Err(ractor::MessagingErr::SendErr(DispatcherMsg::Deliver(message, _))) =
                        dispatcher.cast(delivery)
                    {
                        // The dispatcher is gone: hand the message back at once.
                        let _ = message.ack_with(AckKind::Nak(None)).await;
                        return release_buffered(messages).await;
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "pulling commands failed; re-subscribing");
                    pause(&stop, &mut backoff).await;
                    break;
                }
                None => break,
            }
        }
    }
}

/// How long to look for messages already delivered to this client when a loop stops.
const RELEASE_WINDOW: Duration = Duration::from_millis(50);

/// NAKs the messages the client had already fetched for this loop, so JetStream redelivers them
/// at once (to this instance's next loop or another instance) instead of after `ack_wait`.
async fn release_buffered(mut messages: jetstream::consumer::pull::Stream) {
    let mut released = 0u32;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(RELEASE_WINDOW, messages.next()).await {
        let _ = message.ack_with(AckKind::Nak(None)).await;
        released += 1;
    }
    if released > 0 {
        tracing::info!(released, "returned prefetched commands to JetStream");
    }
}

async fn pause(stop: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}
