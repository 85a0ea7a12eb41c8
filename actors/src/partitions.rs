//! `LeaseKeeper`: holds this instance's leases on command partitions and tells the
//! [`crate::dispatcher::Dispatcher`] which partitions to pull.
//!
//! Every round (a quarter of the lease TTL) it refreshes its membership record, renews the leases it
//! holds, reads the bucket, and moves towards its fair share, `ceil(partitions / live instances)`:
//! it takes free partitions while under its share, and hands partitions back while over it
//! (draining each first, so no delivery of a partition runs on two instances at once). A drain
//! the dispatcher did not answer (it failed, with the drain in its mailbox, and is being
//! restarted, or it is stuck and let its drain timeout and one round more pass) is asked again
//! each round, of its successor once there is one, which answers once the deliveries its
//! predecessor started have finished; the lease is kept and renewed until then. An answer is
//! taken only for the hand-back it was asked for: one coming after the partition was lost and
//! taken again does not hand the new lease back. Each held
//! lease has a deadline, the TTL minus one round after its last write was sent
//! ([`LeaseDeadlines`]): past it the dispatcher starts no delivery of the partition's commands
//! until the lease is renewed, so an instance whose rounds run late stops taking the partition's
//! work before the server can let the lease expire (a delivery checks again right before it tries
//! the channels; one already past that still finishes). A lease it could not renew by then is
//! also dropped locally. A round whose heartbeat finds another partition count recorded than this
//! instance's drops every lease and pulls nothing until the counts agree
//! ([`herald_nats::Heartbeat::other_partitions`]), and has the instance's send commands spread by
//! the recorded count meanwhile ([`CommandPartitions`]). See [`herald_nats::leases`] for the bucket.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use herald_nats::{CommandPartitions, Heartbeat, Held, LeaseTable, LeaseView, ttl_step};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;

use crate::dispatcher::DispatcherMsg;
use crate::rate_limit::supervisor::RateLimiterSupervisorMsg;
use crate::slot::ActorSlot;

/// What this instance should do with its leases this round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free partitions to try to take.
    pub acquire: Vec<u32>,
    /// Held partitions to hand back.
    pub release: Vec<u32>,
}

/// This instance's fair share of `partitions` among `members` instances.
pub fn fair_share(partitions: u32, members: usize) -> usize {
    let members = members.max(1);
    (partitions as usize).div_ceil(members)
}

/// Decides the round's moves. `held` includes partitions being drained (`leaving`), which count as
/// already on their way out.
pub fn plan(
    me: &str,
    partitions: u32,
    view: &LeaseView,
    held: &BTreeSet<u32>,
    leaving: &BTreeSet<u32>,
) -> Plan {
    let mut members: BTreeSet<&str> = view.members.iter().map(String::as_str).collect();
    members.insert(me);
    let share = fair_share(partitions, members.len());
    let staying: Vec<u32> = held.difference(leaving).copied().collect();
    if staying.len() > share {
        return Plan {
            acquire: Vec::new(),
            release: staying[share..].to_vec(),
        };
    }
    if held.len() >= share {
        return Plan::default();
    }
    // Start looking at an offset of our own, so instances starting together try different keys.
    let offset = herald_nats::subjects::partition_for(me, partitions);
    let acquire = (0..partitions)
        .map(|i| (i + offset) % partitions)
        .filter(|p| !held.contains(p) && !view.owners.contains_key(p))
        .take(share - held.len())
        .collect();
    Plan {
        acquire,
        release: Vec::new(),
    }
}

/// Partition ownership as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    /// This instance's name.
    pub instance: String,
    /// Partitions in all.
    pub total: u32,
    /// Partitions held (including any being handed back).
    pub owned: Vec<u32>,
    /// The partition count the deployment records, when it is not `total`: this instance
    /// consumes no partition until they agree (see [`Heartbeat::other_partitions`]).
    pub recorded_total: Option<u32>,
}

/// Shared, always-current copy of this instance's [`Ownership`].
pub type OwnershipView = Arc<RwLock<Ownership>>;

/// Until when this instance may deliver each partition's commands: the send time of the lease's
/// last successful write (take or renewal) plus the TTL minus one round. The server lets the lease
/// age out no earlier than that write plus the TTL, so no other instance can own the partition
/// before the deadline.
///
/// The [`LeaseKeeper`] moves the deadlines; the dispatcher's pull loops check them before handing
/// a command to a delivery, and each delivery again right before it tries the channels, so an
/// instance whose renewals are late (starved of CPU, cut off from NATS) sends no more of the
/// partition's commands, whenever its next round runs. The clock is monotonic: it does not
/// advance while the machine is suspended, so a whole virtual machine paused past the TTL is not
/// covered.
#[derive(Clone)]
pub struct LeaseDeadlines(Arc<watch::Sender<BTreeMap<u32, Instant>>>);

impl Default for LeaseDeadlines {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(BTreeMap::new())))
    }
}

impl LeaseDeadlines {
    /// Whether this instance may deliver `partition`'s commands now.
    pub fn holds(&self, partition: u32) -> bool {
        Self::valid(&self.0.borrow(), partition)
    }

    /// Waits until this instance may deliver `partition`'s commands (the lease was renewed or
    /// taken again).
    pub async fn held_again(&self, partition: u32) {
        let mut deadlines = self.0.subscribe();
        let _ = deadlines
            .wait_for(|deadlines| Self::valid(deadlines, partition))
            .await;
    }

    /// Whether `partition` has a deadline, passed or not: this instance has held its lease
    /// since the rate limiter was told it took it.
    fn announced(&self, partition: u32) -> bool {
        self.0.borrow().contains_key(&partition)
    }

    fn valid(deadlines: &BTreeMap<u32, Instant>, partition: u32) -> bool {
        deadlines
            .get(&partition)
            .is_some_and(|&until| Instant::now() < until)
    }

    fn set(&self, partition: u32, until: Instant) {
        self.0.send_modify(|deadlines| {
            deadlines.insert(partition, until);
        });
    }

    fn remove(&self, partition: u32) {
        self.0
            .send_if_modified(|deadlines| deadlines.remove(&partition).is_some());
    }
}

/// One partition's lease deadline, as its pull loop and the deliveries of its commands see it.
#[derive(Clone)]
pub struct PartitionLease {
    /// The partition.
    pub partition: u32,
    /// The deadlines the lease keeper moves.
    pub deadlines: LeaseDeadlines,
}

impl PartitionLease {
    /// Whether this instance may deliver the partition's commands now.
    pub fn holds(&self) -> bool {
        self.deadlines.holds(self.partition)
    }

    /// Waits until this instance may deliver the partition's commands again.
    pub async fn held_again(&self) {
        self.deadlines.held_again(self.partition).await;
    }
}

/// A partition's pull loop hands commands on only while the lease is held.
impl crate::pull::Gate for PartitionLease {
    fn is_open(&self) -> bool {
        self.holds()
    }

    async fn opened(&self) {
        self.held_again().await;
    }

    fn held_back(&self) {
        // The lease was not renewed in time (this instance is starved or cut off from NATS):
        // another instance may own the partition any moment, so nothing more of it is delivered
        // here until the lease is renewed or taken again.
        tracing::warn!(
            partition = self.partition,
            "partition lease not renewed in time; its deliveries wait"
        );
        metrics::counter!("herald_partition_lease_pauses_total").increment(1);
    }
}

/// Messages of the [`LeaseKeeper`].
pub enum LeaseKeeperMsg {
    /// Run a round now (also sent by the keeper's own timer).
    Round,
    /// A partition finished draining for the hand-back numbered as given: hand its lease back,
    /// if that hand-back is still under way (the lease was not lost and taken again since).
    Drained(u32, HandBack),
    /// A partition's drain got no answer (the dispatcher stopped first, or did not answer within
    /// its drain timeout and one round more): keep its lease and drain it again next round.
    DrainFailed(u32, HandBack),
    /// Stop taking partitions, hand every lease back and leave the membership (graceful shutdown,
    /// after the dispatcher has stopped and in-flight work is written).
    Leave(RpcReplyPort<()>),
    /// Panic on purpose, to exercise supervision (fault injection in tests).
    Crash,
}

/// The number the keeper gives each hand-back of a partition it starts (counting up), so that
/// the answer to a drain is taken only for the hold of the lease it was asked for.
pub type HandBack = u64;

/// Arguments of the [`LeaseKeeper`].
#[derive(Clone)]
pub struct LeaseKeeperArgs {
    /// The lease bucket, bound as this instance.
    pub table: LeaseTable,
    /// Command partitions in all: this instance's count ([`CommandPartitions::configured`]), and
    /// the count its send commands are spread by, which the keeper has follow the deployment's
    /// recorded count while it stands aside ([`CommandPartitions::follow`]) and restores when the
    /// counts agree. Shared with the instance's [`herald_nats::Publisher`].
    pub partitions: CommandPartitions,
    /// Lease TTL from the configuration. The keeper follows the bucket's (another instance may
    /// have set a different one), and lowers a longer one to this a step at a time.
    pub ttl: Duration,
    /// The dispatcher to steer.
    pub dispatcher: ActorSlot<DispatcherMsg>,
    /// The dispatcher's drain timeout ([`crate::dispatcher::DispatcherArgs::drain_timeout`]): a
    /// drain not answered within it and one round more counts as failed, and is asked again.
    pub drain_timeout: Duration,
    /// The rate limiter registry, told about partitions taken so it drops stale buckets.
    pub rate_limiter: ActorSlot<RateLimiterSupervisorMsg>,
    /// Where ownership is published for the API.
    pub ownership: OwnershipView,
    /// Cancelled when the instance stops taking work (shutdown): from then on it takes no
    /// partition, not even one freed by another instance's leave, which it would hold unpulled.
    /// (It still counts as a member until it leaves, so the others' fair share does not grow
    /// to take such a partition before then.)
    pub intake: tokio_util::sync::CancellationToken,
    /// Until when each held partition may be delivered (shared with the dispatcher).
    pub deadlines: LeaseDeadlines,
}

/// State of the [`LeaseKeeper`].
pub struct LeaseKeeperState {
    args: LeaseKeeperArgs,
    /// The TTL the bucket applies, as last read (the one it had at opening until the first read).
    ttl: Duration,
    /// Since when the bucket's TTL has been `ttl`, as far as this keeper knows.
    ttl_since: Instant,
    held: BTreeMap<u32, (Held, Instant)>,
    /// Partitions being handed back, each with the number of its hand-back.
    leaving: BTreeMap<u32, HandBack>,
    /// The number of the next hand-back.
    next_hand_back: HandBack,
    /// Partitions being handed back whose drain failed, to be asked again next round.
    redrain: BTreeSet<u32>,
    /// Partitions taken this round, not yet announced to the rate limiter.
    taken: BTreeSet<u32>,
    /// The partition count the deployment records, when the last heartbeat found another than
    /// this instance's: it holds and pulls no partition meanwhile.
    other_partitions: Option<u32>,
    left: bool,
}

/// Keeper of this instance's partition leases.
pub struct LeaseKeeper;

impl LeaseKeeper {
    /// Time between rounds for a TTL.
    pub fn round_interval(ttl: Duration) -> Duration {
        (ttl / 4).max(Duration::from_millis(100))
    }
}

impl Actor for LeaseKeeper {
    type Msg = LeaseKeeperMsg;
    type State = LeaseKeeperState;
    type Arguments = LeaseKeeperArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: LeaseKeeperArgs,
    ) -> Result<LeaseKeeperState, ActorProcessingErr> {
        let _ = myself.cast(LeaseKeeperMsg::Round);
        Ok(LeaseKeeperState {
            ttl: args.table.opened_ttl(),
            ttl_since: Instant::now(),
            args,
            held: BTreeMap::new(),
            leaving: BTreeMap::new(),
            next_hand_back: 0,
            redrain: BTreeSet::new(),
            taken: BTreeSet::new(),
            other_partitions: None,
            left: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: LeaseKeeperMsg,
        state: &mut LeaseKeeperState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            LeaseKeeperMsg::Round if !state.left => {
                // Timed from the round's start, so a slow round (a loaded machine, a slow NATS)
                // delays the next renewal by its overrun only, not by its whole length.
                myself.send_after(LeaseKeeper::round_interval(state.ttl), || {
                    LeaseKeeperMsg::Round
                });
                let started = Instant::now();
                state.round(&myself).await;
                metrics::histogram!("herald_lease_round_seconds")
                    .record(started.elapsed().as_secs_f64());
            }
            LeaseKeeperMsg::Round => {}
            LeaseKeeperMsg::Drained(partition, hand_back) => {
                state.hand_back(partition, hand_back).await;
            }
            LeaseKeeperMsg::DrainFailed(partition, hand_back) => {
                state.drain_failed(partition, hand_back);
            }
            LeaseKeeperMsg::Leave(reply) => {
                state.leave().await;
                let _ = reply.send(());
            }
            LeaseKeeperMsg::Crash => panic!("fault injected into lease keeper"),
        }
        state.publish();
        Ok(())
    }
}

impl LeaseKeeperState {
    async fn round(&mut self, myself: &ActorRef<LeaseKeeperMsg>) {
        let table = self.args.table.clone();
        let mut heartbeat = table.heartbeat().await;
        // The bucket may be gone, every lease with it: the rest of the round would fail too.
        if heartbeat.is_err() && self.restore_bucket().await {
            heartbeat = table.heartbeat().await;
        }
        match heartbeat {
            Ok(Heartbeat {
                other_partitions: Some(recorded),
                ..
            }) => {
                self.stand_aside(recorded);
                self.assign();
                return;
            }
            Ok(Heartbeat { shared_name, .. }) => {
                // Also after a restart of this keeper, whose predecessor may have left the
                // publisher following another count.
                self.args.partitions.restore();
                if let Some(recorded) = self.other_partitions.take() {
                    tracing::warn!(
                        partitions = self.args.partitions.configured(),
                        recorded,
                        "the deployment's partition count is this instance's again; taking \
                         partitions"
                    );
                }
                if shared_name {
                    tracing::error!(
                        instance = table.instance(),
                        "another live process runs under this instance name: cluster.instance \
                         must be unique per process; each delivers only the partitions it took \
                         itself"
                    );
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot refresh membership"),
        }
        self.renew_all().await;
        match table.view().await {
            Ok(view) => {
                self.follow_ttl(view.ttl);
                self.lower_ttl().await;
                self.adopt(&view).await;
                let held: BTreeSet<u32> = self.held.keys().copied().collect();
                let leaving: BTreeSet<u32> = self.leaving.keys().copied().collect();
                let plan = plan(
                    table.instance(),
                    self.args.partitions.configured(),
                    &view,
                    &held,
                    &leaving,
                );
                if !self.args.intake.is_cancelled() {
                    self.take(&plan.acquire).await;
                }
                for partition in plan.release {
                    self.start_drain(myself, partition);
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot read partition leases"),
        }
        for partition in std::mem::take(&mut self.redrain) {
            self.drain(myself, partition);
        }
        self.assign();
    }

    /// Stops consuming partitions because the deployment records another partition count than
    /// this instance's (`recorded`): another instance started with it while the record was
    /// missing, and the two counts put one user's commands on two partitions. Every lease is
    /// dropped here at once (its deadline with it, so no more of its commands are delivered) and
    /// left to age out, as the membership record does (the heartbeat no longer refreshes it), so
    /// the instances of the recorded count take every partition over after the TTL. The send
    /// commands this instance still publishes (its API, Router, Scheduler, dead-letter replays)
    /// are spread by the recorded count meanwhile, onto the partitions those instances consume,
    /// each user's on the one their own commands for the user go to. Logged each round, and shown
    /// by readiness and `herald_partitions_conflict`, until the counts agree.
    fn stand_aside(&mut self, recorded: u32) {
        let configured = self.args.partitions.configured();
        let spread = if self.args.partitions.follow(recorded) {
            format!("its send commands go by the recorded count, {recorded}")
        } else {
            format!(
                "{recorded} is no valid count, so its send commands still go by {configured} and \
                 wait until the record ages out"
            )
        };
        tracing::error!(
            partitions = configured,
            recorded,
            "nats.partitions = {configured} but the deployment records {recorded} (an instance \
             with that count started while the record was missing): this instance consumes no \
             partition, and {spread}; start every instance with one count"
        );
        self.other_partitions = Some(recorded);
        let held: Vec<u32> = self.held.keys().copied().collect();
        for partition in held {
            self.drop_lease(partition);
        }
        self.taken.clear();
    }

    /// Creates the lease bucket again if it is gone (see [`LeaseTable::restore`]), timed by the TTL
    /// the instances follow; answers whether it did. The leases this keeper held went with the
    /// bucket: they are dropped, and the round takes partitions afresh. An instance that finds
    /// the bucket created again by another one loses its leases the same way, when renewing them.
    async fn restore_bucket(&mut self) -> bool {
        match self.args.table.restore(self.ttl).await {
            Ok(true) => {
                tracing::error!(
                    bucket = herald_nats::leases::LEASE_BUCKET,
                    "partition lease bucket missing: created it again (every lease it held is \
                     lost; partitions are taken afresh)"
                );
                let held: Vec<u32> = self.held.keys().copied().collect();
                for partition in held {
                    self.drop_lease(partition);
                }
                true
            }
            Ok(false) => false,
            Err(err) => {
                tracing::warn!(error = %err, "cannot check or create the partition lease bucket");
                false
            }
        }
    }

    /// Renews every held lease, all at once; drops (locally) those lost or not renewed for too
    /// long. A renewal counts from when it was sent: the server's expiry is at least that late.
    async fn renew_all(&mut self) {
        let fence = self.fence();
        let sent = Instant::now();
        let table = &self.args.table;
        let renewals = futures::future::join_all(self.held.iter().map(
            |(&partition, &(held, renewed_at))| async move {
                (partition, renewed_at, table.renew(held).await)
            },
        ))
        .await;
        for (partition, renewed_at, renewal) in renewals {
            match renewal {
                Ok(Some(renewed)) => self.hold(partition, renewed, sent),
                Ok(None) => {
                    tracing::warn!(partition, "partition lease lost to another instance");
                    self.drop_lease(partition);
                }
                Err(err) if renewed_at.elapsed() >= fence => {
                    tracing::warn!(partition, error = %err, "cannot renew partition lease before it expires; stopping");
                    self.drop_lease(partition);
                }
                Err(err) => tracing::warn!(partition, error = %err, "cannot renew partition lease"),
            }
        }
    }

    /// Times leases by the TTL the bucket applies when it is not the one this keeper used (an
    /// instance configured differently started or lowered it since): the leases renewed this
    /// round get their deadlines again, and later rounds come at its pace.
    fn follow_ttl(&mut self, bucket_ttl: Duration) {
        if bucket_ttl == self.ttl || bucket_ttl.is_zero() {
            return;
        }
        if bucket_ttl != self.args.ttl {
            tracing::warn!(
                bucket_ttl_ms = bucket_ttl.as_millis() as u64,
                configured_ttl_ms = self.args.ttl.as_millis() as u64,
                "the lease bucket's TTL differs from the configured one (set by an instance configured differently); following the bucket's"
            );
        }
        self.adopt_ttl(bucket_ttl);
    }

    /// Times leases by `ttl` from now on, the leases renewed this round included.
    fn adopt_ttl(&mut self, ttl: Duration) {
        self.ttl = ttl;
        self.ttl_since = Instant::now();
        let renewed: Vec<u32> = self
            .held
            .keys()
            .filter(|partition| !self.taken.contains(partition))
            .copied()
            .collect();
        for partition in renewed {
            self.set_deadline(partition);
        }
    }

    /// Lowers the bucket's TTL towards the configured one, by one [`ttl_step`], once it has been
    /// what it is for a whole TTL: every other instance has then renewed at its pace (its rounds
    /// come every quarter of the one before), so none still renews at a pace the step could
    /// outrun. An instance that started since with a longer TTL raised it; that one stands until
    /// this keeper has seen it for a whole TTL too.
    async fn lower_ttl(&mut self) {
        if self.args.ttl >= self.ttl || self.ttl_since.elapsed() < self.ttl {
            return;
        }
        let next = ttl_step(self.ttl, self.args.ttl);
        match self.args.table.set_ttl(next).await {
            Ok(()) => {
                tracing::info!(
                    from_ms = self.ttl.as_millis() as u64,
                    to_ms = next.as_millis() as u64,
                    configured_ttl_ms = self.args.ttl.as_millis() as u64,
                    "lowered the lease bucket's TTL a step towards the configured one"
                );
                self.adopt_ttl(next);
            }
            Err(err) => tracing::warn!(error = %err, "cannot lower the lease bucket's TTL"),
        }
    }

    /// Takes back leases this process wrote but this keeper does not know of (it was restarted
    /// after a panic); never one another process wrote under the same instance name. A lease is
    /// adopted only by renewing it, so one that is about to age out is not pulled from. The
    /// renewal names the lease's revision, so this process held it all along; the rate limiter
    /// keeps its buckets of the partition unless the failed keeper took it without telling it
    /// (the partition has no deadline yet).
    async fn adopt(&mut self, view: &LeaseView) {
        for &partition in &view.mine {
            if self.held.contains_key(&partition) {
                continue;
            }
            let Some(&revision) = view.revisions.get(&partition) else {
                continue;
            };
            let sent = Instant::now();
            if let Ok(Some(renewed)) = self
                .args
                .table
                .renew(Held {
                    partition,
                    revision,
                })
                .await
            {
                tracing::info!(partition, "adopted this instance's partition lease");
                if !self.args.deadlines.announced(partition) {
                    self.taken.insert(partition);
                }
                self.hold(partition, renewed, sent);
            }
        }
    }

    async fn take(&mut self, partitions: &[u32]) {
        for &partition in partitions {
            let sent = Instant::now();
            match self.args.table.try_acquire(partition).await {
                Ok(Some(held)) => {
                    tracing::info!(partition, "took partition lease");
                    metrics::counter!("herald_partition_takeovers_total").increment(1);
                    // A deadline left by a failed keeper is of a lease since lost: the
                    // partition gets one once the rate limiter has been told.
                    self.args.deadlines.remove(partition);
                    self.taken.insert(partition);
                    self.hold(partition, held, sent);
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(partition, error = %err, "cannot take partition lease");
                    return;
                }
            }
        }
    }

    /// Starts handing `partition` back: it is no longer pulled, and its lease goes back once the
    /// dispatcher has drained it. Not while no dispatcher has started (nothing would drain it).
    fn start_drain(&mut self, myself: &ActorRef<LeaseKeeperMsg>, partition: u32) {
        if self.args.dispatcher.get().is_none() {
            return;
        }
        tracing::info!(partition, "handing partition back (rebalancing)");
        self.leaving.insert(partition, self.next_hand_back);
        self.next_hand_back += 1;
        self.drain(myself, partition);
    }

    /// Asks the current dispatcher to drain `partition`, and reports the outcome to the keeper,
    /// numbered with the partition's hand-back. A failed call (the dispatcher stopped before
    /// answering, or did not answer within [`Self::drain_bound`]) is not a drain: the partition's
    /// deliveries may still run, so the lease must stay here until a drain is answered.
    fn drain(&mut self, myself: &ActorRef<LeaseKeeperMsg>, partition: u32) {
        let Some(&hand_back) = self.leaving.get(&partition) else {
            return;
        };
        let Some(dispatcher) = self.args.dispatcher.get() else {
            self.redrain.insert(partition);
            return;
        };
        let keeper = myself.clone();
        let bound = self.drain_bound();
        tokio::spawn(async move {
            let answer = dispatcher
                .call(|reply| DispatcherMsg::Drain(partition, reply), Some(bound))
                .await;
            let _ = keeper.cast(if matches!(answer, Ok(CallResult::Success(()))) {
                LeaseKeeperMsg::Drained(partition, hand_back)
            } else {
                LeaseKeeperMsg::DrainFailed(partition, hand_back)
            });
        });
    }

    /// How long a drain is waited for: the dispatcher's drain timeout, within which a running
    /// dispatcher answers, and one round more for its mailbox. A dispatcher that is alive but
    /// stuck does not hold the hand-back up for ever: the drain is asked again next round.
    fn drain_bound(&self) -> Duration {
        self.args.drain_timeout + LeaseKeeper::round_interval(self.ttl)
    }

    /// Keeps the lease of a partition whose drain got no answer, and has the next round ask the
    /// dispatcher (restarted by then, see [`crate::engine_supervisor`], or the same one when it
    /// is stuck) again. Its successor waits for the deliveries the failed one started
    /// ([`crate::dispatcher::PartitionDeliveries`]), and a dispatcher asked again waits for
    /// those its earlier drain waits for, each for at most its drain timeout. A dispatcher that
    /// is never restarted fails the engine supervisor, which kills this keeper with it (ractor
    /// runs no `post_stop` for killed children): its leases expire after their TTL, so no other
    /// instance takes a partition while this process's deliveries may still run.
    fn drain_failed(&mut self, partition: u32, hand_back: HandBack) {
        // Not when the lease was lost or handed back meanwhile (a leave), even if it was taken
        // and is being handed back again since.
        if !self.is_handing_back(partition, hand_back) {
            return;
        }
        tracing::warn!(
            partition,
            "partition drain not answered (dispatcher stopped or stuck); keeping the lease and \
             draining again"
        );
        metrics::counter!("herald_partition_drain_failures_total").increment(1);
        self.redrain.insert(partition);
    }

    /// Whether `partition` is being handed back in the hand-back numbered `hand_back`.
    fn is_handing_back(&self, partition: u32, hand_back: HandBack) -> bool {
        self.leaving.get(&partition) == Some(&hand_back)
    }

    /// Hands the lease of a drained partition back, unless the drain was of an earlier hold of
    /// it: the lease was lost (and the drain's partition dropped) and taken again since, and the
    /// deliveries of the new hold have not been drained.
    async fn hand_back(&mut self, partition: u32, hand_back: HandBack) {
        if !self.is_handing_back(partition, hand_back) {
            tracing::debug!(
                partition,
                "drain answered for an earlier hand-back of the partition; ignored"
            );
            return;
        }
        self.leaving.remove(&partition);
        self.redrain.remove(&partition);
        self.args.deadlines.remove(partition);
        if let Some((held, _)) = self.held.remove(&partition)
            && let Err(err) = self.args.table.release(held).await
        {
            tracing::warn!(partition, error = %err, "cannot hand partition lease back; it expires");
        }
        self.assign();
    }

    fn drop_lease(&mut self, partition: u32) {
        self.args.deadlines.remove(partition);
        self.held.remove(&partition);
        self.leaving.remove(&partition);
        self.redrain.remove(&partition);
    }

    /// How long after a lease write was sent this instance may still act on it: the TTL minus one
    /// round, so that it stops before the server can let the lease age out.
    fn fence(&self) -> Duration {
        self.ttl
            .saturating_sub(LeaseKeeper::round_interval(self.ttl))
    }

    /// Records a lease written (taken or renewed) by a request sent at `sent`. A partition just
    /// taken gets its deadline in [`Self::assign`], once the rate limiter has been told.
    fn hold(&mut self, partition: u32, held: Held, sent: Instant) {
        self.held.insert(partition, (held, sent));
        if !self.taken.contains(&partition) {
            self.set_deadline(partition);
        }
    }

    /// Publishes the deadline of a held lease: its last write's send time plus [`Self::fence`].
    fn set_deadline(&self, partition: u32) {
        if let Some(&(_, sent)) = self.held.get(&partition) {
            self.args.deadlines.set(partition, sent + self.fence());
        }
    }

    /// Tells the dispatcher the partitions to pull: held and not being handed back. Partitions
    /// just taken are first announced to the rate limiter, and only then get their deadlines, so
    /// none of their commands is delivered before (a loop paused on a partition this instance
    /// lost and took back in the same round waits for this too). A rate limiter that is not
    /// running holds no stale buckets to forget.
    fn assign(&mut self) {
        if self.left {
            return;
        }
        if !self.taken.is_empty() {
            let taken = std::mem::take(&mut self.taken);
            if let Some(limiter) = self.args.rate_limiter.get() {
                let _ = limiter.cast(RateLimiterSupervisorMsg::ForgetPartitions {
                    partitions: taken.clone(),
                    total: self.args.partitions.configured(),
                });
            }
            for partition in taken {
                self.set_deadline(partition);
            }
        }
        if let Some(dispatcher) = self.args.dispatcher.get() {
            let pull = self
                .held
                .keys()
                .filter(|p| !self.leaving.contains_key(p))
                .copied()
                .collect();
            let _ = dispatcher.cast(DispatcherMsg::Assign(pull));
        }
    }

    async fn leave(&mut self) {
        self.left = true;
        for (partition, (held, _)) in std::mem::take(&mut self.held) {
            self.args.deadlines.remove(partition);
            if let Err(err) = self.args.table.release(held).await {
                tracing::warn!(partition, error = %err, "cannot hand partition lease back; it expires");
            }
        }
        self.leaving.clear();
        self.redrain.clear();
        if let Err(err) = self.args.table.leave().await {
            tracing::warn!(error = %err, "cannot remove membership record; it expires");
        }
        tracing::info!("handed every partition lease back");
    }

    fn publish(&self) {
        let mut ownership = self
            .args
            .ownership
            .write()
            .unwrap_or_else(|p| p.into_inner());
        ownership.instance = self.args.table.instance().to_string();
        ownership.total = self.args.partitions.configured();
        ownership.owned = self.held.keys().copied().collect();
        ownership.recorded_total = self.other_partitions;
        metrics::gauge!("herald_partitions_owned").set(ownership.owned.len() as f64);
        metrics::gauge!("herald_partitions_conflict")
            .set(f64::from(u8::from(self.other_partitions.is_some())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(owners: &[(u32, &str)], members: &[&str]) -> LeaseView {
        LeaseView {
            owners: owners.iter().map(|(p, o)| (*p, o.to_string())).collect(),
            revisions: owners.iter().map(|(p, _)| (*p, 1)).collect(),
            members: members.iter().map(|m| m.to_string()).collect(),
            ttl: Duration::from_secs(10),
            ..LeaseView::default()
        }
    }

    fn set(items: &[u32]) -> BTreeSet<u32> {
        items.iter().copied().collect()
    }

    #[tokio::test]
    async fn a_lease_is_held_until_its_deadline_and_waiters_wake_when_it_is_renewed() {
        let deadlines = LeaseDeadlines::default();
        assert!(!deadlines.holds(3), "a partition never taken is not held");
        deadlines.set(3, Instant::now() + Duration::from_secs(60));
        assert!(deadlines.holds(3));
        assert!(!deadlines.holds(4), "only the partition written");
        deadlines.set(3, Instant::now());
        assert!(
            !deadlines.holds(3),
            "past its deadline, a lease is not acted on"
        );

        let waiter = tokio::spawn({
            let deadlines = deadlines.clone();
            async move { deadlines.held_again(3).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "nothing renewed yet");
        deadlines.set(3, Instant::now() + Duration::from_secs(60));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the renewal wakes the waiting loop")
            .expect("waiter");

        deadlines.remove(3);
        assert!(!deadlines.holds(3), "a dropped lease is not held");
    }

    #[test]
    fn fair_share_rounds_up() {
        assert_eq!(fair_share(8, 1), 8);
        assert_eq!(fair_share(8, 3), 3);
        assert_eq!(fair_share(8, 0), 8, "no members counts as one");
    }

    #[test]
    fn a_lone_instance_takes_every_free_partition() {
        let plan = plan("a", 4, &view(&[], &[]), &set(&[]), &set(&[]));
        let mut acquire = plan.acquire.clone();
        acquire.sort();
        assert_eq!(acquire, vec![0, 1, 2, 3]);
        assert!(plan.release.is_empty());
    }

    #[test]
    fn an_instance_over_its_share_hands_the_surplus_back() {
        let owners: Vec<(u32, &str)> = (0..8).map(|p| (p, "a")).collect();
        let held = set(&[0, 1, 2, 3, 4, 5, 6, 7]);
        let plan = plan("a", 8, &view(&owners, &["a", "b"]), &held, &set(&[]));
        assert_eq!(plan.release, vec![4, 5, 6, 7]);
        assert!(plan.acquire.is_empty());
    }

    #[test]
    fn partitions_already_leaving_are_not_released_twice() {
        let owners: Vec<(u32, &str)> = (0..8).map(|p| (p, "a")).collect();
        let held = set(&[0, 1, 2, 3, 4, 5, 6, 7]);
        let plan = plan(
            "a",
            8,
            &view(&owners, &["a", "b"]),
            &held,
            &set(&[4, 5, 6, 7]),
        );
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn a_newcomer_takes_only_free_partitions_up_to_its_share() {
        let owners = [(0, "a"), (1, "a"), (2, "a"), (3, "a")];
        let plan = plan("b", 8, &view(&owners, &["a"]), &set(&[]), &set(&[]));
        let mut acquire = plan.acquire.clone();
        acquire.sort();
        assert_eq!(acquire, vec![4, 5, 6, 7]);
    }

    #[test]
    fn survivors_take_over_a_dead_instances_partitions() {
        // "c" died: its leases and membership aged out; 6 and 7 are free.
        let owners = [(0, "a"), (1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "b")];
        let plan_a = plan(
            "a",
            8,
            &view(&owners, &["a", "b"]),
            &set(&[0, 1, 2]),
            &set(&[]),
        );
        assert_eq!(plan_a.acquire.len(), 1, "{plan_a:?}");
        assert!(plan_a.acquire.iter().all(|p| *p == 6 || *p == 7));
    }

    #[test]
    fn an_instance_at_its_share_does_nothing() {
        let owners = [(0, "a"), (1, "a"), (2, "b"), (3, "b")];
        let plan = plan(
            "a",
            4,
            &view(&owners, &["a", "b"]),
            &set(&[0, 1]),
            &set(&[]),
        );
        assert_eq!(plan, Plan::default());
    }
}
