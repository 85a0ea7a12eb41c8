//! `RateLimiterActor`: one user's token buckets, one per limited category.
//!
//! On start it reads the user's recent sends from the [`SendHistory`] (without blocking its
//! supervisor; requests that arrive meanwhile wait for it), then answers each request at once from
//! memory. A notification that was allowed once is allowed again without a token (a retry after a
//! transient failure is the same send).
//!
//! A notification deferred (policy `defer`) gets a slot of its own: the next token to refill,
//! after those reserved already, is taken for it at once (the bucket goes into debt) and the
//! verdict is the wait until that token exists. Held notifications thus come back one token
//! apart, in the order they asked, and each is allowed on its reserved token when it does, rather
//! than all coming back together to fight over one. A slot is reserved only if it is less than
//! [`RateLimiterArgs::reserve_within`] away; a deferral further off reserves nothing (its
//! notification waits as `scheduled` and asks again). A reservation never claimed (its
//! notification went to another instance, or was given up) is forgotten [`RESERVATION_GRACE`]
//! after its slot, at the next deferral or idle check; the slot itself is wasted, which errs on
//! the safe side. An actor keeps at most [`reservation_cap`] reservations; with that many, a
//! deferral reserves nothing, as one too far off does.
//!
//! When idle with every bucket full and no reservation waiting, it tells its supervisor, which
//! stops it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_nats::Category;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use uuid::Uuid;

use super::supervisor::RateLimiterSupervisorMsg;
use super::{CategoryLimit, SendHistory, Verdict};
use crate::policy::token_bucket::{BucketSpec, TokenBucket};

/// Notifications remembered as allowed, per user.
const REMEMBERED_GRANTS: usize = 16;

/// How long after its slot a reservation waits to be claimed before it is forgotten: the held
/// command comes back when its NAK delay (the slot) ends, later if its partition is busy.
pub const RESERVATION_GRACE: Duration = Duration::from_secs(60);

/// A request for a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acquire {
    /// The notification's category.
    pub category: Category,
    /// The notification.
    pub notification_id: Uuid,
}

/// Messages of the [`RateLimiterActor`].
pub enum RateLimiterMsg {
    /// May this notification go now?
    Acquire(Acquire, RpcReplyPort<Verdict>),
    /// Time to check for idleness (internal).
    IdleCheck,
    /// The user's recent sends by category, read at start (internal). When they cannot be read
    /// the actor answers nothing and stops: callers hold their notifications briefly and ask
    /// again, and the next request starts a new actor that reads again.
    Seeded(Result<HashMap<Category, u32>, String>),
    /// Panic on purpose (fault injection in tests).
    Crash,
}

/// A monotonic clock; injectable for tests.
pub type MonotonicClock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// Arguments of the [`RateLimiterActor`].
#[derive(Clone)]
pub struct RateLimiterArgs {
    /// The user.
    pub user: String,
    /// Limits by category.
    pub limits: Arc<HashMap<Category, CategoryLimit>>,
    /// Idle time after which the actor offers to stop.
    pub idle_after: Duration,
    /// The supervisor, told when the actor is idle.
    pub supervisor: ActorRef<RateLimiterSupervisorMsg>,
    /// Clock.
    pub clock: MonotonicClock,
    /// Where the user's recent sends are read at start; `None` starts with full buckets.
    pub history: Option<Arc<dyn SendHistory>>,
    /// A deferral is given a reserved slot only if the slot is less than this far away: the
    /// longest hold a deferred command waits in JetStream (the dispatcher's
    /// `schedule_deferrals_after`). Zero reserves nothing.
    pub reserve_within: Duration,
}

/// State of the [`RateLimiterActor`]: a few dozen bytes per limited category, and 110 to 135
/// per notification held with a reserved slot (at most [`reservation_cap`] of them).
pub struct RateLimiterState {
    args: RateLimiterArgs,
    buckets: Vec<(Category, TokenBucket)>,
    granted: VecDeque<Uuid>,
    /// Deferred notifications by id, with when their reserved token exists.
    reserved: HashMap<Uuid, Instant>,
    /// The same reservations by slot, earliest first, so expired ones are found at the front.
    slots: BTreeSet<(Instant, Uuid)>,
    /// The most reservations kept at once ([`reservation_cap`]).
    max_reserved: usize,
    handled: u64,
    last_used: Instant,
    /// Requests that arrived before the history was read.
    waiting: Option<Vec<(Acquire, RpcReplyPort<Verdict>)>>,
}

/// One user's rate limiter.
pub struct RateLimiterActor;

impl Actor for RateLimiterActor {
    type Msg = RateLimiterMsg;
    type State = RateLimiterState;
    type Arguments = RateLimiterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: RateLimiterArgs,
    ) -> Result<RateLimiterState, ActorProcessingErr> {
        myself.send_after(args.idle_after, || RateLimiterMsg::IdleCheck);
        let now = (args.clock)();
        let waiting = args.history.clone().map(|history| {
            read_history(history, args.user.clone(), &args.limits, myself.clone());
            Vec::new()
        });
        Ok(RateLimiterState {
            max_reserved: reservation_cap(&args.limits, args.reserve_within),
            args,
            buckets: Vec::new(),
            granted: VecDeque::new(),
            reserved: HashMap::new(),
            slots: BTreeSet::new(),
            handled: 0,
            last_used: now,
            waiting,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: RateLimiterMsg,
        state: &mut RateLimiterState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RateLimiterMsg::Acquire(request, reply) => {
                state.handled += 1;
                let now = (state.args.clock)();
                state.last_used = now;
                match &mut state.waiting {
                    Some(waiting) => waiting.push((request, reply)),
                    None => {
                        let _ = reply.send(state.decide(request, now));
                    }
                }
            }
            RateLimiterMsg::Seeded(Ok(sent)) => state.seed(&sent),
            RateLimiterMsg::Seeded(Err(err)) => {
                tracing::warn!(user = %state.args.user, error = %err, "cannot read recent sends; holding this user's notifications");
                myself.stop(Some("send history unreadable".into()));
            }
            RateLimiterMsg::IdleCheck => {
                let now = (state.args.clock)();
                state.forget_expired_reservations(now);
                if state.is_idle(now) {
                    let _ = state.args.supervisor.cast(RateLimiterSupervisorMsg::Idle {
                        user: state.args.user.clone(),
                        actor: myself.get_id(),
                        handled: state.handled,
                    });
                }
                myself.send_after(state.args.idle_after, || RateLimiterMsg::IdleCheck);
            }
            RateLimiterMsg::Crash => panic!("fault injected into a rate limiter"),
        }
        Ok(())
    }
}

/// The most reservations one actor keeps: for each `defer` category, the slots its bucket can
/// promise at once (one per token to refill less than `reserve_within` ahead, the debt
/// [`TokenBucket::reserve`] allows) plus one burst (`capacity`) of slots that have come and whose
/// notifications are on their way back. Transactional at 30 per 60 s with a 300 s hold: 180.
pub fn reservation_cap(
    limits: &HashMap<Category, CategoryLimit>,
    reserve_within: Duration,
) -> usize {
    limits
        .values()
        .filter(|limit| limit.policy == super::OverLimit::Defer)
        .map(|limit| {
            let spec = limit.spec();
            let per_token = spec.per_token().as_nanos().max(1);
            let ahead = reserve_within.as_nanos().div_ceil(per_token);
            usize::try_from(ahead)
                .unwrap_or(usize::MAX)
                .saturating_add(spec.capacity as usize)
        })
        .fold(0, usize::saturating_add)
}

/// Reads the user's sends within each limited category's period, off the actor's loop.
fn read_history(
    history: Arc<dyn SendHistory>,
    user: String,
    limits: &HashMap<Category, CategoryLimit>,
    myself: ActorRef<RateLimiterMsg>,
) {
    let windows: Vec<(Category, Duration)> = limits
        .iter()
        .map(|(category, limit)| (*category, limit.spec().period))
        .collect();
    tokio::spawn(async move {
        let sent = history.sent_within(&user, &windows).await;
        let _ = myself.cast(RateLimiterMsg::Seeded(sent));
    });
}

impl RateLimiterState {
    /// Starts each limited bucket with the user's recent sends spent, then answers the requests
    /// that waited.
    fn seed(&mut self, sent: &HashMap<Category, u32>) {
        let now = (self.args.clock)();
        self.buckets = self
            .args
            .limits
            .iter()
            .map(|(category, limit)| {
                let spent = sent.get(category).copied().unwrap_or(0);
                (*category, TokenBucket::spent(&limit.spec(), now, spent))
            })
            .collect();
        for (request, reply) in self.waiting.take().unwrap_or_default() {
            let _ = reply.send(self.decide(request, now));
        }
    }

    fn decide(&mut self, request: Acquire, now: Instant) -> Verdict {
        let Some(limit) = self.args.limits.get(&request.category).copied() else {
            return Verdict::Allow;
        };
        let id = request.notification_id;
        if self.granted.contains(&id) {
            return Verdict::Allow;
        }
        self.forget_expired_reservations(now);
        if let Some(slot) = self.reserved.get(&id).copied() {
            return self.claim(id, slot, now);
        }
        let spec = limit.spec();
        let within = match limit.policy {
            super::OverLimit::Defer if self.reserved.len() < self.max_reserved => {
                self.args.reserve_within
            }
            super::OverLimit::Defer | super::OverLimit::Drop => Duration::ZERO,
        };
        match self
            .bucket(request.category, &spec, now)
            .reserve(&spec, now, within)
        {
            Ok(Duration::ZERO) => {
                self.grant(id);
                Verdict::Allow
            }
            Ok(wait) => {
                let slot = now + wait;
                self.reserved.insert(id, slot);
                self.slots.insert((slot, id));
                Verdict::Defer(wait)
            }
            Err(wait) => match limit.policy {
                super::OverLimit::Defer => Verdict::Defer(wait),
                super::OverLimit::Drop => Verdict::Drop,
            },
        }
    }

    /// A deferred notification back for its reserved `slot`: allowed on its token once the slot
    /// has come, else held for the rest of its wait (redelivered early for another reason).
    fn claim(&mut self, id: Uuid, slot: Instant, now: Instant) -> Verdict {
        let left = slot.saturating_duration_since(now);
        if !left.is_zero() {
            return Verdict::Defer(left);
        }
        self.reserved.remove(&id);
        self.slots.remove(&(slot, id));
        self.grant(id);
        Verdict::Allow
    }

    /// Remembers that `id` holds a token, so that a retry of it takes none.
    fn grant(&mut self, id: Uuid) {
        if self.granted.len() == REMEMBERED_GRANTS {
            self.granted.pop_front();
        }
        self.granted.push_back(id);
    }

    /// The category's bucket, full if it has none yet.
    fn bucket(&mut self, category: Category, spec: &BucketSpec, now: Instant) -> &mut TokenBucket {
        let index = match self.buckets.iter().position(|(c, _)| *c == category) {
            Some(index) => index,
            None => {
                self.buckets.push((category, TokenBucket::full(spec, now)));
                self.buckets.len() - 1
            }
        };
        &mut self.buckets[index].1
    }

    /// Forgets the reservations whose notifications did not come back within
    /// [`RESERVATION_GRACE`] of their slot: the earliest slots, so each is looked at once.
    fn forget_expired_reservations(&mut self, now: Instant) {
        while let Some(&(slot, id)) = self.slots.first() {
            if now.saturating_duration_since(slot) < RESERVATION_GRACE {
                break;
            }
            self.slots.pop_first();
            self.reserved.remove(&id);
        }
    }

    fn is_idle(&mut self, now: Instant) -> bool {
        if self.waiting.is_some() || !self.reserved.is_empty() {
            return false;
        }
        if now.saturating_duration_since(self.last_used) < self.args.idle_after {
            return false;
        }
        let limits = self.args.limits.clone();
        self.buckets.iter_mut().all(|(category, bucket)| {
            limits
                .get(category)
                .is_none_or(|limit| bucket.is_full(&limit.spec(), now))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::{default_limits, parse_limits};

    #[test]
    fn the_cap_is_the_slots_within_the_hold_plus_a_burst_per_deferring_category() {
        let limits = parse_limits(&default_limits()).expect("default limits");
        assert_eq!(
            reservation_cap(&limits, Duration::from_secs(300)),
            150 + 30,
            "transactional: a token every 2 s for 300 s, plus 30; marketing drops"
        );
        assert_eq!(reservation_cap(&limits, Duration::from_secs(301)), 151 + 30);
        assert_eq!(reservation_cap(&limits, Duration::ZERO), 30);
    }
}
