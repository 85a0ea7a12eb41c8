//! `Dispatcher`: pulls send commands from the durable consumers of the command partitions this
//! instance owns (`herald-dispatch-<n>`, one pull loop each) and runs each delivery as a task.
//!
//! Which partitions it pulls is decided by the [`crate::partitions::LeaseKeeper`], which holds their
//! leases and tells the dispatcher with [`DispatcherMsg::Assign`] (repeated on every lease round,
//! so a restarted dispatcher picks its partitions up again). A partition being handed to another
//! instance is drained first ([`DispatcherMsg::Drain`]): its loop stops pulling, its buffered
//! messages go back to JetStream, and the reply comes once its in-flight deliveries are written.
//!
//! An in-flight semaphore bounds the work of all loops together: a permit is taken before a
//! message is pulled and released only after its outcome is written and acked, so a slow provider
//! or database slows the pulling instead of filling memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use herald_nats::StreamSettings;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::delivery::{self, DeliveryContext};
use crate::lease::DeliveryPermit;

/// Messages of the [`Dispatcher`].
pub enum DispatcherMsg {
    /// Deliver this command (from a pull loop).
    Deliver(Box<jetstream::Message>, DeliveryPermit),
    /// Pull exactly these partitions: start loops for new ones, stop loops for the others.
    Assign(BTreeSet<u32>),
    /// Stop pulling this partition; reply once its in-flight deliveries have finished (or the
    /// drain timeout passed).
    Drain(u32, RpcReplyPort<()>),
    /// The partitions being pulled.
    Pulling(RpcReplyPort<BTreeSet<u32>>),
    /// Panic on purpose, to exercise supervision (fault injection in tests).
    Crash,
}

/// Arguments of the [`Dispatcher`].
#[derive(Clone)]
pub struct DispatcherArgs {
    /// JetStream, to bind the partitions' consumers.
    pub js: jetstream::Context,
    /// Consumer shape (ack wait, max ack pending).
    pub streams: StreamSettings,
    /// What deliveries need.
    pub context: Arc<DeliveryContext>,
    /// In-flight bound shared with the engine (which waits on it at shutdown).
    pub in_flight: Arc<Semaphore>,
    /// Cancelled when the engine stops taking messages.
    pub intake: CancellationToken,
    /// Longest a drain waits for a partition's deliveries before handing the partition over.
    pub drain_timeout: Duration,
    /// Messages one pull request of a partition's loop asks for. Fetched messages wait in the
    /// client for a permit while their ack wait runs, so this stays near the in-flight bound
    /// divided by the partitions: a large buffer would let JetStream redeliver messages that
    /// merely waited here.
    pub pull_batch: usize,
}

/// One partition's pull loop.
struct PartitionLoop {
    stop: CancellationToken,
    deliveries: TaskTracker,
    pull: JoinHandle<()>,
}

/// State of the [`Dispatcher`].
pub struct DispatcherState {
    args: DispatcherArgs,
    loops: BTreeMap<u32, PartitionLoop>,
    /// Cancels every pull loop when the state is dropped, which also happens when the actor panics
    /// (ractor runs no `post_stop` then): a loop must not outlive its dispatcher and keep pulling
    /// messages nobody will handle.
    stop_all: CancellationToken,
    _stop_all: DropGuard,
}

/// The dispatcher.
pub struct Dispatcher;

impl Actor for Dispatcher {
    type Msg = DispatcherMsg;
    type State = DispatcherState;
    type Arguments = DispatcherArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: DispatcherArgs,
    ) -> Result<DispatcherState, ActorProcessingErr> {
        let stop_all = args.intake.child_token();
        Ok(DispatcherState {
            args,
            loops: BTreeMap::new(),
            _stop_all: stop_all.clone().drop_guard(),
            stop_all,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: DispatcherMsg,
        state: &mut DispatcherState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DispatcherMsg::Deliver(message, permit) => {
                tokio::spawn(delivery::deliver(
                    state.args.context.clone(),
                    *message,
                    permit,
                ));
            }
            DispatcherMsg::Assign(partitions) => state.assign(&myself, &partitions),
            DispatcherMsg::Drain(partition, reply) => state.drain(partition, reply),
            DispatcherMsg::Pulling(reply) => {
                let _ = reply.send(state.loops.keys().copied().collect());
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
        state.stop_all.cancel();
        for (_, partition) in std::mem::take(&mut state.loops) {
            // Give each loop a moment to return what it holds.
            let _ = tokio::time::timeout(Duration::from_secs(2), partition.pull).await;
        }
        Ok(())
    }
}

impl DispatcherState {
    fn assign(&mut self, myself: &ActorRef<DispatcherMsg>, partitions: &BTreeSet<u32>) {
        self.loops.retain(|partition, running| {
            let keep = partitions.contains(partition) && !running.stop.is_cancelled();
            if !keep {
                tracing::info!(partition, "no longer pulling partition");
                running.stop.cancel();
            }
            keep
        });
        if self.stop_all.is_cancelled() {
            return;
        }
        for &partition in partitions {
            if self.loops.contains_key(&partition) {
                continue;
            }
            tracing::info!(partition, "pulling partition");
            let stop = self.stop_all.child_token();
            let deliveries = TaskTracker::new();
            let pull = tokio::spawn(pull_loop(
                Partition {
                    number: partition,
                    js: self.args.js.clone(),
                    streams: self.args.streams.clone(),
                    deliveries: deliveries.clone(),
                    batch: self.args.pull_batch.max(1),
                },
                myself.clone(),
                self.args.in_flight.clone(),
                stop.clone(),
            ));
            self.loops.insert(
                partition,
                PartitionLoop {
                    stop,
                    deliveries,
                    pull,
                },
            );
        }
        metrics::gauge!("herald_partitions_pulled").set(self.loops.len() as f64);
    }

    fn drain(&mut self, partition: u32, reply: RpcReplyPort<()>) {
        let Some(running) = self.loops.remove(&partition) else {
            let _ = reply.send(());
            return;
        };
        tracing::info!(partition, "draining partition");
        running.stop.cancel();
        running.deliveries.close();
        let timeout = self.args.drain_timeout;
        tokio::spawn(async move {
            let _ = running.pull.await;
            if tokio::time::timeout(timeout, running.deliveries.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    partition,
                    "deliveries still running after the drain timeout; JetStream redelivers them"
                );
            }
            let _ = reply.send(());
        });
        metrics::gauge!("herald_partitions_pulled").set(self.loops.len() as f64);
    }
}

/// What a pull loop needs to know about its partition.
struct Partition {
    number: u32,
    js: jetstream::Context,
    streams: StreamSettings,
    deliveries: TaskTracker,
    batch: usize,
}

/// Binds the partition's consumer, then pulls messages while permits are free and the loop is not
/// stopped; binds and re-subscribes after errors (a NATS restart) with a bounded backoff.
async fn pull_loop(
    partition: Partition,
    dispatcher: ActorRef<DispatcherMsg>,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut consumer: Option<PullConsumer> = None;
    while !stop.is_cancelled() {
        let bound = match &consumer {
            Some(bound) => bound.clone(),
            None => match bind(&partition, &stop).await {
                Some(bound) => {
                    consumer = Some(bound.clone());
                    bound
                }
                None => return,
            },
        };
        let mut messages = tokio::select! {
            _ = stop.cancelled() => return,
            subscribed = bound.stream().max_messages_per_batch(partition.batch).messages() => match subscribed {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::warn!(partition = partition.number, error = %err, "cannot pull commands; retrying");
                    consumer = None;
                    pause(&stop, &mut backoff).await;
                    continue;
                }
            },
        };
        loop {
            let slot = tokio::select! {
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
                    let permit = DeliveryPermit {
                        slot,
                        partition: partition.deliveries.token(),
                    };
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
                    tracing::warn!(partition = partition.number, error = %err, "pulling commands failed; re-subscribing");
                    pause(&stop, &mut backoff).await;
                    break;
                }
                None => break,
            }
        }
    }
}

/// Binds (creating if absent) the partition's durable consumer, retrying until it works or the
/// loop is stopped.
async fn bind(partition: &Partition, stop: &CancellationToken) -> Option<PullConsumer> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match herald_nats::dispatch_consumer(&partition.js, partition.number, &partition.streams)
            .await
        {
            Ok(consumer) => return Some(consumer),
            Err(err) => {
                tracing::warn!(partition = partition.number, error = %err, "cannot bind the partition's consumer; retrying");
                pause(stop, &mut backoff).await;
                if stop.is_cancelled() {
                    return None;
                }
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
