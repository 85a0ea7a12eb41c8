//! `RateLimiterSupervisor`: the registry of per-user [`RateLimiterActor`]s. It forwards each
//! request to the user's actor (spawning it on first use) with the caller's reply port, so the
//! answer goes straight back and the supervisor never waits on a child. It stops idle actors,
//! evicts the least recently used one when the registry is full, and restarts an actor that
//! panicked: the replacement takes over its [`Ledger`](super::actor::Ledger) (buckets and reservations), which the
//! supervisor keeps beside it, so sends it allowed that are not recorded yet still count. An
//! actor started for another reason (first use, or after an eviction, an idle stop or a
//! partition hand-over) reads the user's send history instead, which counts recorded sends only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use herald_nats::Category;
use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort, SupervisionEvent,
};

use super::actor::{
    Acquire, MonotonicClock, RateLimiterActor, RateLimiterArgs, RateLimiterMsg, SharedLedger,
};
use super::{CategoryLimit, RateLimiterSettings, Verdict};

/// Messages of the [`RateLimiterSupervisor`].
pub enum RateLimiterSupervisorMsg {
    /// May `user` send this notification now? Answered by the user's actor.
    Acquire {
        /// The user (customer id, or the recipient key of an unknown recipient).
        user: String,
        /// The request.
        request: Acquire,
        /// Where the verdict goes.
        reply: RpcReplyPort<Verdict>,
    },
    /// A user actor is idle with full buckets (from the actor).
    Idle {
        /// Its user.
        user: String,
        /// The actor.
        actor: ActorId,
        /// Requests it has handled; the supervisor stops it only if it forwarded no more.
        handled: u64,
    },
    /// How many user actors are alive.
    Users(RpcReplyPort<usize>),
    /// This instance just took these command partitions (of `total`): stop the actors of their
    /// users, whose buckets may be stale (another instance sent for them meanwhile); the next
    /// request starts a fresh actor from the send history.
    ForgetPartitions {
        /// The partitions taken.
        partitions: BTreeSet<u32>,
        /// Command partitions in all.
        total: u32,
    },
    /// Makes the user's actor panic (fault injection in tests).
    CrashUser(String),
}

/// Arguments of the [`RateLimiterSupervisor`].
#[derive(Clone)]
pub struct RateLimiterSupervisorArgs {
    /// Limits by category (categories absent are not limited).
    pub limits: Arc<HashMap<Category, CategoryLimit>>,
    /// Registry settings.
    pub settings: RateLimiterSettings,
    /// Clock for the buckets.
    pub clock: MonotonicClock,
    /// Where starting user actors read recent sends; `None` starts them with full buckets.
    pub history: Option<Arc<dyn super::SendHistory>>,
    /// Sizes the reservations each user's actor keeps (see [`RateLimiterArgs::reserve_within`]).
    pub reserve_within: Duration,
}

struct Entry {
    actor: ActorRef<RateLimiterMsg>,
    /// The actor's ledger, handed to its replacement if it panics.
    ledger: SharedLedger,
    forwarded: u64,
    last_use: u64,
}

/// State of the [`RateLimiterSupervisor`].
pub struct RateLimiterSupervisorState {
    args: RateLimiterSupervisorArgs,
    users: HashMap<String, Entry>,
    /// Users by last use, oldest first.
    recency: BTreeMap<u64, String>,
    by_actor: HashMap<ActorId, String>,
    uses: u64,
}

/// The registry of user rate limiters.
pub struct RateLimiterSupervisor;

impl Actor for RateLimiterSupervisor {
    type Msg = RateLimiterSupervisorMsg;
    type State = RateLimiterSupervisorState;
    type Arguments = RateLimiterSupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: RateLimiterSupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(RateLimiterSupervisorState {
            args,
            users: HashMap::new(),
            recency: BTreeMap::new(),
            by_actor: HashMap::new(),
            uses: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: RateLimiterSupervisorMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RateLimiterSupervisorMsg::Acquire {
                user,
                request,
                reply,
            } => {
                if !state.args.limits.contains_key(&request.category) {
                    let _ = reply.send(Verdict::Allow);
                    return Ok(());
                }
                state.forward(&myself, user, request, reply).await;
            }
            RateLimiterSupervisorMsg::Idle {
                user,
                actor,
                handled,
            } => {
                let idle = state
                    .users
                    .get(&user)
                    .is_some_and(|e| e.actor.get_id() == actor && e.forwarded == handled);
                if idle {
                    state.remove(&user, "idle");
                }
            }
            RateLimiterSupervisorMsg::Users(reply) => {
                let _ = reply.send(state.users.len());
            }
            RateLimiterSupervisorMsg::ForgetPartitions { partitions, total } => {
                let stale: Vec<String> = state
                    .users
                    .keys()
                    .filter(|user| {
                        partitions.contains(&herald_nats::subjects::partition_for(user, total))
                    })
                    .cloned()
                    .collect();
                for user in stale {
                    state.remove(&user, "partition taken over");
                }
            }
            RateLimiterSupervisorMsg::CrashUser(user) => {
                if let Some(entry) = state.users.get(&user) {
                    let _ = entry.actor.cast(RateLimiterMsg::Crash);
                }
            }
        }
        metrics::gauge!("herald_rate_limiter_users").set(state.users.len() as f64);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(user) = state.by_actor.remove(&cell.get_id()) else {
                    return Ok(());
                };
                if state
                    .users
                    .get(&user)
                    .is_some_and(|e| e.actor.get_id() == cell.get_id())
                {
                    tracing::warn!(%user, error = %err, "rate limiter failed; restarting it");
                    metrics::counter!("herald_actor_restarts_total", "actor" => "rate_limiter")
                        .increment(1);
                    let ledger = state.users.get(&user).map(|e| e.ledger.clone());
                    match state
                        .spawn(&myself, &user, ledger.unwrap_or_default())
                        .await
                    {
                        Some(actor) => {
                            if let Some(entry) = state.users.get_mut(&user) {
                                entry.actor = actor;
                                entry.forwarded = 0;
                            }
                        }
                        None => state.forget(&user),
                    }
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                if let Some(user) = state.by_actor.remove(&cell.get_id())
                    && state
                        .users
                        .get(&user)
                        .is_some_and(|e| e.actor.get_id() == cell.get_id())
                {
                    state.forget(&user);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl RateLimiterSupervisorState {
    async fn forward(
        &mut self,
        myself: &ActorRef<RateLimiterSupervisorMsg>,
        user: String,
        request: Acquire,
        reply: RpcReplyPort<Verdict>,
    ) {
        self.uses += 1;
        let uses = self.uses;
        let actor = match self.users.get_mut(&user) {
            Some(entry) => {
                self.recency.remove(&entry.last_use);
                entry.last_use = uses;
                entry.actor.clone()
            }
            None => {
                while self.users.len() >= self.args.settings.max_users.max(1) {
                    let Some((_, oldest)) = self.recency.pop_first() else {
                        break;
                    };
                    metrics::counter!("herald_rate_limiter_evictions_total").increment(1);
                    self.remove(&oldest, "evicted: registry full");
                }
                let ledger = SharedLedger::default();
                let Some(actor) = self.spawn(myself, &user, ledger.clone()).await else {
                    // The reply port is dropped: the caller treats that as "unavailable".
                    return;
                };
                self.users.insert(
                    user.clone(),
                    Entry {
                        actor: actor.clone(),
                        ledger,
                        forwarded: 0,
                        last_use: uses,
                    },
                );
                actor
            }
        };
        self.recency.insert(uses, user.clone());
        if let Some(entry) = self.users.get_mut(&user) {
            entry.forwarded += 1;
        }
        if let Err(MessagingErr::SendErr(RateLimiterMsg::Acquire(_, reply))) =
            actor.cast(RateLimiterMsg::Acquire(request, reply))
        {
            // Stopped between two messages; the caller asks again.
            drop(reply);
            self.forget(&user);
        }
    }

    async fn spawn(
        &mut self,
        myself: &ActorRef<RateLimiterSupervisorMsg>,
        user: &str,
        ledger: SharedLedger,
    ) -> Option<ActorRef<RateLimiterMsg>> {
        let args = RateLimiterArgs {
            user: user.to_string(),
            limits: self.args.limits.clone(),
            idle_after: Duration::from_secs(self.args.settings.idle_secs.max(1)),
            supervisor: myself.clone(),
            clock: self.args.clock.clone(),
            history: self.args.history.clone(),
            reserve_within: self.args.reserve_within,
            ledger,
        };
        match Actor::spawn_linked(None, RateLimiterActor, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                self.by_actor.insert(actor.get_id(), user.to_string());
                Some(actor)
            }
            Err(err) => {
                tracing::error!(user, error = %err, "cannot start a rate limiter");
                None
            }
        }
    }

    /// Stops the user's actor and forgets it.
    fn remove(&mut self, user: &str, why: &str) {
        if let Some(entry) = self.users.remove(user) {
            self.recency.remove(&entry.last_use);
            self.by_actor.remove(&entry.actor.get_id());
            entry.actor.stop(Some(why.to_string()));
        }
    }

    /// Forgets the user's actor (already gone).
    fn forget(&mut self, user: &str) {
        if let Some(entry) = self.users.remove(user) {
            self.recency.remove(&entry.last_use);
        }
    }
}

/// Asks the user's rate limiter about a notification, through the supervisor, waiting at most
/// `timeout`. `None` when no answer came (supervisor restarting, actor stopped mid-request, or
/// too slow): the caller should hold the notification briefly and ask again.
pub async fn ask(
    supervisor: &ActorRef<RateLimiterSupervisorMsg>,
    user: &str,
    request: Acquire,
    timeout: Duration,
) -> Option<Verdict> {
    for _ in 0..2 {
        let answer = supervisor
            .call(
                |reply| RateLimiterSupervisorMsg::Acquire {
                    user: user.to_string(),
                    request,
                    reply,
                },
                Some(timeout),
            )
            .await;
        match answer {
            Ok(ractor::rpc::CallResult::Success(verdict)) => return Some(verdict),
            Ok(ractor::rpc::CallResult::SenderError) => continue,
            _ => return None,
        }
    }
    None
}
