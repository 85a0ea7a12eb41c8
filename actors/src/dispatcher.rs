//! `Dispatcher`: pulls send commands from the durable consumers of the command partitions this
//! instance owns (`herald-dispatch-<n>`, one [`crate::pull`] loop each) and runs each delivery as
//! a task.
//!
//! Which partitions it pulls is decided by the [`crate::partitions::LeaseKeeper`], which holds their
//! leases and tells the dispatcher with [`DispatcherMsg::Assign`] (repeated on every lease round,
//! so a restarted dispatcher picks its partitions up again). A partition being handed to another
//! instance is drained first ([`DispatcherMsg::Drain`]): its loop stops pulling, its buffered
//! messages go back to JetStream, and the reply comes once its in-flight deliveries are written.
//! The deliveries are tracked in [`PartitionDeliveries`], which outlives the actor: a drain
//! after a restart still waits for the deliveries the failed dispatcher started.
//!
//! An in-flight semaphore bounds the work of all loops together: a permit is taken before a
//! message is pulled and released only after its outcome is written and acked, so a slow provider
//! or database slows the pulling instead of filling memory.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream;
use herald_nats::StreamSettings;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::delivery::{self, DeliveryContext};
use crate::lease::DeliveryPermit;
use crate::partitions::{LeaseDeadlines, PartitionLease};
use crate::pull::{Pull, pull_loop};

/// Messages of the [`Dispatcher`].
pub enum DispatcherMsg {
    /// Deliver this command (from a pull loop).
    Deliver(Box<jetstream::Message>, DeliveryPermit),
    /// Pull exactly these partitions: start loops for new ones, stop loops for the others.
    Assign(BTreeSet<u32>),
    /// Stop pulling this partition; reply once its in-flight deliveries have finished (or the
    /// drain timeout passed), including those of a loop an earlier `Assign` already stopped and
    /// those an earlier drain of the partition still waits for.
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
    /// Until when each partition's lease lets this instance deliver (moved by the lease keeper).
    pub leases: LeaseDeadlines,
    /// Messages one pull request of a partition's loop asks for. Fetched messages wait in the
    /// client for a permit while their ack wait runs, so this stays near the in-flight bound
    /// divided by the partitions: a large buffer would let JetStream redeliver messages that
    /// merely waited here.
    pub pull_batch: usize,
    /// The deliveries under way by partition, shared by every start of the dispatcher.
    pub deliveries: PartitionDeliveries,
}

/// The deliveries under way of each partition, as one [`TaskTracker`] per pull loop.
///
/// Kept outside the dispatcher's state and shared by the clones of its [`DispatcherArgs`], so
/// it outlives a dispatcher that fails: the deliveries such a dispatcher started run on, and a
/// [`DispatcherMsg::Drain`] answered by its successor still waits for them.
#[derive(Clone, Default)]
pub struct PartitionDeliveries {
    trackers: Arc<Mutex<BTreeMap<u32, Vec<TaskTracker>>>>,
}

impl PartitionDeliveries {
    /// A tracker for a new pull loop of `partition`, kept until it is closed with no delivery
    /// left. Forgets such finished trackers of every partition.
    fn track(&self, partition: u32) -> TaskTracker {
        let tracker = TaskTracker::new();
        let mut trackers = self.lock();
        trackers.retain(|_, loops| {
            loops.retain(|l| !(l.is_closed() && l.is_empty()));
            !loops.is_empty()
        });
        trackers.entry(partition).or_default().push(tracker.clone());
        tracker
    }

    /// Closes every tracker: those of a failed dispatcher's loops, which start no more
    /// deliveries. Their deliveries still count until they end.
    fn close_all(&self) {
        let mut trackers = self.lock();
        trackers.retain(|_, loops| {
            loops.retain(|l| {
                l.close();
                !l.is_empty()
            });
            !loops.is_empty()
        });
    }

    /// Closes every tracker of `partition` and answers them, to wait for its deliveries. Those
    /// with deliveries left stay: a drain asked again (the lease keeper's call timed out while
    /// the first still waits) waits for them too, instead of answering at once.
    fn take(&self, partition: u32) -> Vec<TaskTracker> {
        let mut trackers = self.lock();
        let Some(loops) = trackers.get_mut(&partition) else {
            return Vec::new();
        };
        for tracker in loops.iter() {
            tracker.close();
        }
        let taken = loops.clone();
        loops.retain(|l| !l.is_empty());
        if loops.is_empty() {
            trackers.remove(&partition);
        }
        taken
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Vec<TaskTracker>>> {
        self.trackers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One partition's pull loop.
struct PartitionLoop {
    stop: CancellationToken,
    deliveries: TaskTracker,
    pull: JoinHandle<()>,
}

impl PartitionLoop {
    /// Stops pulling; the deliveries already started run on.
    fn stop(&self) {
        self.stop.cancel();
        self.deliveries.close();
    }

    /// Whether the loop has returned and its deliveries have finished.
    fn is_done(&self) -> bool {
        self.pull.is_finished() && self.deliveries.is_empty()
    }

    /// Waits until the loop has returned (its buffered messages handed back) and its deliveries
    /// have finished.
    async fn finished(self) {
        let _ = self.pull.await;
        self.deliveries.wait().await;
    }
}

/// The dispatcher's pull loops: those running, and those stopped whose deliveries may still run.
///
/// A partition's loop can be stopped by an [`DispatcherMsg::Assign`] that no longer lists it (the
/// lease keeper publishes its pulling set every round) before the [`DispatcherMsg::Drain`] that
/// hands the partition over arrives. The drain must still wait for those deliveries: otherwise
/// the lease goes to another instance while this one is still sending, and the new owner's rate
/// limiter, seeded from the recorded sends, misses them.
#[derive(Default)]
struct PartitionLoops {
    running: BTreeMap<u32, PartitionLoop>,
    /// Stopped loops by partition (a partition may have been stopped more than once), kept until
    /// they are done.
    stopped: BTreeMap<u32, Vec<PartitionLoop>>,
}

impl PartitionLoops {
    /// Stops the running loops of partitions not in `keep` (and those already cancelled), keeping
    /// them until their deliveries finish; forgets stopped loops that are done.
    fn retain(&mut self, keep: &BTreeSet<u32>) {
        self.stopped.retain(|_, loops| {
            loops.retain(|l| !l.is_done());
            !loops.is_empty()
        });
        let stopping: Vec<u32> = self
            .running
            .iter()
            .filter(|(partition, running)| !keep.contains(partition) || running.stop.is_cancelled())
            .map(|(partition, _)| *partition)
            .collect();
        for partition in stopping {
            if let Some(running) = self.running.remove(&partition) {
                tracing::info!(partition, "no longer pulling partition");
                running.stop();
                self.stopped.entry(partition).or_default().push(running);
            }
        }
    }

    /// Stops the partition's running loop, if any, and takes every loop of the partition whose
    /// deliveries may still run.
    fn drain(&mut self, partition: u32) -> Vec<PartitionLoop> {
        let mut loops = self.stopped.remove(&partition).unwrap_or_default();
        if let Some(running) = self.running.remove(&partition) {
            running.stop();
            loops.push(running);
        }
        loops
    }
}

/// State of the [`Dispatcher`].
pub struct DispatcherState {
    args: DispatcherArgs,
    loops: PartitionLoops,
    /// Cancels every pull loop when the state is dropped, as it is when the actor panics or is
    /// killed with the engine supervisor (ractor runs no `post_stop` then, and nothing stops the
    /// dispatcher otherwise): a loop must not outlive its dispatcher and keep pulling messages
    /// nobody will handle.
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
        // Trackers left are those of a failed predecessor, whose loops are gone.
        args.deliveries.close_all();
        let stop_all = args.intake.child_token();
        Ok(DispatcherState {
            args,
            loops: PartitionLoops::default(),
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
                let _ = reply.send(state.loops.running.keys().copied().collect());
            }
            DispatcherMsg::Crash => panic!("fault injected into dispatcher"),
        }
        Ok(())
    }
}

impl DispatcherState {
    fn assign(&mut self, myself: &ActorRef<DispatcherMsg>, partitions: &BTreeSet<u32>) {
        self.loops.retain(partitions);
        if self.stop_all.is_cancelled() {
            return;
        }
        for &partition in partitions {
            if self.loops.running.contains_key(&partition) {
                continue;
            }
            tracing::info!(partition, "pulling partition");
            let stop = self.stop_all.child_token();
            let deliveries = self.args.deliveries.track(partition);
            let pull = tokio::spawn(
                pull_partition(
                    &self.args,
                    partition,
                    myself.clone(),
                    deliveries.clone(),
                    stop.clone(),
                )
                .instrument(tracing::info_span!("partition", partition)),
            );
            self.loops.running.insert(
                partition,
                PartitionLoop {
                    stop,
                    deliveries,
                    pull,
                },
            );
        }
        metrics::gauge!("herald_partitions_pulled").set(self.loops.running.len() as f64);
    }

    fn drain(&mut self, partition: u32, reply: RpcReplyPort<()>) {
        let finished = drained(&mut self.loops, &self.args.deliveries, partition);
        metrics::gauge!("herald_partitions_pulled").set(self.loops.running.len() as f64);
        let Some(finished) = finished else {
            let _ = reply.send(());
            return;
        };
        tracing::info!(partition, "draining partition");
        let timeout = self.args.drain_timeout;
        tokio::spawn(async move {
            if tokio::time::timeout(timeout, finished).await.is_err() {
                tracing::warn!(
                    partition,
                    "deliveries still running after the drain timeout; JetStream redelivers them"
                );
            }
            let _ = reply.send(());
        });
    }
}

/// Stops pulling `partition` and returns what its drain waits for: its loops to return and every
/// delivery of it to end, those started by a failed dispatcher included. `None` when nothing of
/// the partition runs.
fn drained(
    loops: &mut PartitionLoops,
    deliveries: &PartitionDeliveries,
    partition: u32,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let loops = loops.drain(partition);
    let trackers = deliveries.take(partition);
    if loops.is_empty() && trackers.iter().all(TaskTracker::is_empty) {
        return None;
    }
    Some(async move {
        futures::future::join_all(loops.into_iter().map(PartitionLoop::finished)).await;
        futures::future::join_all(trackers.iter().map(TaskTracker::wait)).await;
    })
}

/// Pulls one partition's commands (see [`crate::pull`]) and casts each to the dispatcher with a
/// [`DeliveryPermit`], while the partition's lease is held.
fn pull_partition(
    args: &DispatcherArgs,
    partition: u32,
    dispatcher: ActorRef<DispatcherMsg>,
    deliveries: TaskTracker,
    stop: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let (js, streams) = (args.js.clone(), args.streams.clone());
    let lease = PartitionLease {
        partition,
        deadlines: args.leases.clone(),
    };
    let pull = Pull {
        what: "commands",
        consumer: None,
        bind: move || {
            let (js, streams) = (js.clone(), streams.clone());
            async move { herald_nats::dispatch_consumer(&js, partition, &streams).await }
        },
        batch: Some(args.pull_batch.max(1)),
        gate: lease.clone(),
        permits: args.in_flight.clone(),
        stop,
    };
    pull_loop(pull, move |message, slot| {
        let permit = DeliveryPermit {
            slot,
            partition: deliveries.token(),
            lease: lease.clone(),
        };
        match dispatcher.cast(DispatcherMsg::Deliver(message, permit)) {
            Ok(()) => Ok(()),
            Err(ractor::MessagingErr::SendErr(DispatcherMsg::Deliver(message, _))) => Err(message),
            // Any other failure lost the message inside ractor; JetStream redelivers it.
            Err(_) => Ok(()),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop that "pulls" until it is stopped.
    fn running_loop() -> PartitionLoop {
        let stop = CancellationToken::new();
        let pull = tokio::spawn({
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        PartitionLoop {
            stop,
            deliveries: TaskTracker::new(),
            pull,
        }
    }

    /// Starts a loop for `partition` with one delivery under way; dropping the token ends it.
    fn start_with_delivery(
        loops: &mut PartitionLoops,
        partition: u32,
    ) -> tokio_util::task::task_tracker::TaskTrackerToken {
        let running = running_loop();
        let delivery = running.deliveries.token();
        loops.running.insert(partition, running);
        delivery
    }

    async fn assert_waits_for(loops: Vec<PartitionLoop>, delivery: impl FnOnce()) {
        let finished = futures::future::join_all(loops.into_iter().map(PartitionLoop::finished));
        assert_drain_waits_for(
            async move {
                finished.await;
            },
            delivery,
        )
        .await;
    }

    async fn assert_drain_waits_for(finished: impl Future<Output = ()>, delivery: impl FnOnce()) {
        let mut finished = Box::pin(finished);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut finished)
                .await
                .is_err(),
            "the drain ended while a delivery was still running"
        );
        delivery();
        tokio::time::timeout(Duration::from_secs(5), finished)
            .await
            .expect("the drain ends once the delivery has finished");
    }

    #[tokio::test]
    async fn a_drain_after_an_assign_without_the_partition_still_waits_for_its_deliveries() {
        let mut loops = PartitionLoops::default();
        loops.running.insert(1, running_loop());
        let delivery = start_with_delivery(&mut loops, 7);

        // The lease keeper's round stops pulling 7 before its drain request arrives.
        loops.retain(&BTreeSet::from([1]));
        assert_eq!(loops.running.keys().copied().collect::<Vec<_>>(), vec![1]);

        let draining = loops.drain(7);
        assert_eq!(draining.len(), 1, "the stopped loop is drained");
        assert_waits_for(draining, move || drop(delivery)).await;
        assert!(loops.drain(7).is_empty(), "nothing left of partition 7");
    }

    #[tokio::test]
    async fn a_drain_waits_for_every_generation_of_the_partition() {
        let mut loops = PartitionLoops::default();
        let first = start_with_delivery(&mut loops, 3);
        loops.retain(&BTreeSet::new());
        // Assigned again while the first loop's delivery still runs.
        let second = start_with_delivery(&mut loops, 3);

        let draining = loops.drain(3);
        assert_eq!(draining.len(), 2);
        drop(second);
        assert_waits_for(draining, move || drop(first)).await;
    }

    #[tokio::test]
    async fn a_drain_after_a_restart_waits_for_the_deliveries_of_the_failed_dispatcher() {
        let deliveries = PartitionDeliveries::default();
        let delivery = deliveries.track(5).token();
        let _other = deliveries.track(6).token();
        // The dispatcher fails: its loops go with its state, and its successor starts.
        deliveries.close_all();
        let mut loops = PartitionLoops::default();

        let finished = drained(&mut loops, &deliveries, 5).expect("a delivery of 5 runs");
        assert_drain_waits_for(finished, move || drop(delivery)).await;
        assert!(
            drained(&mut loops, &deliveries, 5).is_none(),
            "nothing left of partition 5"
        );
        assert!(
            drained(&mut loops, &deliveries, 6).is_some(),
            "6 still runs"
        );
    }

    #[tokio::test]
    async fn a_drain_asked_again_waits_for_the_deliveries_the_first_one_waits_for() {
        let deliveries = PartitionDeliveries::default();
        let mut loops = PartitionLoops::default();
        let mut running = running_loop();
        running.deliveries = deliveries.track(4);
        let delivery = running.deliveries.token();
        loops.running.insert(4, running);

        let first = drained(&mut loops, &deliveries, 4).expect("a delivery of 4 runs");
        // The lease keeper's call timed out (the dispatcher was stuck) and it asks again.
        let again = drained(&mut loops, &deliveries, 4)
            .expect("the drain asked again waits for the delivery the first one waits for");
        let both = async move {
            futures::future::join(first, again).await;
        };
        assert_drain_waits_for(both, move || drop(delivery)).await;
        assert!(
            drained(&mut loops, &deliveries, 4).is_none(),
            "nothing left of partition 4"
        );
    }

    #[tokio::test]
    async fn finished_trackers_are_forgotten() {
        let deliveries = PartitionDeliveries::default();
        let delivery = deliveries.track(1).token();
        deliveries.track(2);
        deliveries.close_all();
        assert_eq!(deliveries.lock().len(), 1, "kept while its delivery runs");
        drop(delivery);
        deliveries.track(3);
        assert_eq!(
            deliveries.lock().keys().copied().collect::<Vec<_>>(),
            vec![3]
        );
    }

    #[tokio::test]
    async fn stopped_loops_are_forgotten_once_done() {
        let mut loops = PartitionLoops::default();
        let delivery = start_with_delivery(&mut loops, 2);
        loops.retain(&BTreeSet::new());
        loops.retain(&BTreeSet::new());
        assert_eq!(loops.stopped.len(), 1, "kept while its delivery runs");

        drop(delivery);
        // The stopped pull task ends as soon as it runs again.
        for _ in 0..100 {
            tokio::task::yield_now().await;
            loops.retain(&BTreeSet::new());
            if loops.stopped.is_empty() {
                return;
            }
        }
        panic!("a stopped loop with no delivery left is still kept");
    }
}
