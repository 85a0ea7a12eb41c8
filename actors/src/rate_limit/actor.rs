//! `RateLimiterActor`: one user's token buckets, one per limited category.
//!
//! On start it reads the user's recent sends from the [`SendHistory`] (without blocking its
//! supervisor; requests that arrive meanwhile wait for it), then answers each request at once from
//! memory. A notification that was allowed once is allowed again without a token (a retry after a
//! transient failure is the same send): each category remembers the notifications it granted,
//! twice its capacity ([`remembered_grants`]), so a retry is recognised however many sends of
//! other categories came in between. A retry the actor
//! does not remember granting ([`Acquire::allowed_before`]: a round of it was walked, so a
//! limiter allowed it) was allowed by an earlier limiter of the user (before a restart, a
//! partition hand-over, an eviction or an idle stop), whose token the history this one started
//! from does not count (it counts sends), or by this one longer ago than it remembers: it is
//! allowed, never dropped nor held again, and charged a token, in debt if none is free.
//!
//! A notification deferred (policy `defer`) gets a slot of its own: the next token to refill,
//! after those reserved already, is taken for it at once (the bucket goes into debt) and the
//! verdict is the wait until that token exists. Held notifications thus come back one token
//! apart, in the order they asked, and each is allowed on its reserved token when it does, rather
//! than all coming back together to fight over one. The slot is reserved however far off it is:
//! a notification held longer than the dispatcher holds commands in JetStream waits as
//! `scheduled` until its slot and then claims it as one held in JetStream does, so a later
//! deferral with a shorter wait never takes its token. A reservation never claimed (its
//! notification went to another instance, was cancelled while `scheduled`, or was given up) is
//! forgotten [`RESERVATION_GRACE`] after its slot, at the next deferral or idle check; the slot
//! itself is wasted, which errs on the safe side. An actor keeps at most [`reservation_cap`]
//! reservations; with that many, a deferral reserves nothing and is told when the first token
//! not promised refills, and then asks again as a new one. Reservations live in this actor's
//! ledger only: a limiter that replaces it for another reason than a panic (a restart, an
//! eviction, an idle stop or a partition hand-over) starts without them, and the held
//! notifications, back at their slots, ask it as new ones.
//!
//! Its buckets and reservations are kept in a [`Ledger`] the supervisor holds too: an actor that
//! replaces one that panicked takes it over instead of reading the history again, so sends
//! allowed but not recorded yet still count and held notifications keep their slots. Unless the
//! panic came while the ledger was being changed (it may be half-changed, and what made the actor
//! panic may be in it): the replacement then starts a new one from the history.
//!
//! When idle with every bucket full and no reservation waiting, it tells its supervisor, which
//! stops it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use herald_nats::Category;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use uuid::Uuid;

use super::supervisor::RateLimiterSupervisorMsg;
use super::{CategoryLimit, SendHistory, Verdict};
use crate::policy::token_bucket::{BucketSpec, TokenBucket};

/// The most notifications one category of a user remembers as allowed, whatever its capacity.
pub const MAX_REMEMBERED_GRANTS: usize = 1_024;

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
    /// Whether the notification passed the rate limit before: a round of its channel chain was
    /// walked since it was queued (or replayed from the dead-letter stream), so this is a retry
    /// of a send a limiter allowed. It is allowed again, on the token it holds if this actor
    /// granted it, else on a token charged now (in debt if none is free); never refused.
    pub allowed_before: bool,
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
    /// Sizes the most reservations the actor keeps ([`reservation_cap`]): per `defer`
    /// category, the tokens refilling within this span plus one burst. The engine passes the
    /// longest hold a deferred command waits in JetStream (the dispatcher's
    /// `schedule_deferrals_after`). A slot is reserved however far off it is while the actor
    /// keeps fewer.
    pub reserve_within: Duration,
    /// The user's ledger: a new one, or the one of the actor this one replaces after a panic.
    pub ledger: SharedLedger,
}

/// State of the [`RateLimiterActor`]: a few dozen bytes per limited category, 16 per notification
/// it remembers as allowed (at most [`remembered_grants`] a category), and 110 to 135 per
/// notification held with a reserved slot (at most [`reservation_cap`] of them).
pub struct RateLimiterState {
    args: RateLimiterArgs,
    /// The buckets and reservations, shared with the supervisor (see [`Ledger`]).
    ledger: SharedLedger,
    /// The most reservations kept at once ([`reservation_cap`]).
    max_reserved: usize,
    handled: u64,
    last_used: Instant,
    /// Requests that arrived before the history was read.
    waiting: Option<Vec<(Acquire, RpcReplyPort<Verdict>)>>,
}

/// What a user's limiter knows: its buckets (with the notifications each granted a token) and the
/// slots reserved for held notifications. The supervisor keeps it beside the actor and hands it
/// to the actor that replaces one that panicked, so the replacement neither forgets sends allowed
/// but not recorded yet (still with their providers: the send history counts only sends
/// recorded) nor the places of the notifications held; unless the panic came while the ledger
/// was locked (poisoned: maybe half-changed). A replacement for another reason (an eviction, an
/// idle stop, a partition hand-over, a restart), or after such a panic, starts a new ledger from
/// the send history.
#[derive(Default)]
pub struct Ledger {
    /// Whether the buckets hold the user's history (read, or none to read): an actor taking the
    /// ledger over does not read it again.
    seeded: bool,
    buckets: Vec<Limited>,
    /// Deferred notifications by id, with when their reserved token exists.
    reserved: HashMap<Uuid, Instant>,
    /// The same reservations by slot, earliest first, so expired ones are found at the front.
    slots: BTreeSet<(Instant, Uuid)>,
}

/// A [`Ledger`] shared by a user's actor and the supervisor.
pub type SharedLedger = Arc<Mutex<Ledger>>;

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
        let ledger = args.ledger.clone();
        if ledger.is_poisoned() {
            *lock(&ledger) = Ledger::default();
            ledger.clear_poison();
        }
        let waiting = {
            let mut taken_over = lock(&ledger);
            let history = args.history.clone().filter(|_| !taken_over.seeded);
            taken_over.seeded |= history.is_none();
            history.map(|history| {
                read_history(history, args.user.clone(), &args.limits, myself.clone());
                Vec::new()
            })
        };
        Ok(RateLimiterState {
            max_reserved: reservation_cap(&args.limits, args.reserve_within),
            ledger,
            args,
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
                lock(&state.ledger).forget_expired_reservations(now);
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

/// The most reservations one actor keeps: for each `defer` category, one per token to refill
/// less than `reserve_within` ahead plus one burst (`capacity`), for slots that have come and
/// whose notifications are on their way back. Transactional at 30 per 60 s with a 300 s hold:
/// 180, so a backlog of up to 180 held notifications of one user keeps its order, their slots up
/// to about 360 s ahead (held in JetStream, or `scheduled` beyond 300 s).
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

/// The most notifications a category remembers as allowed: twice its capacity, what its bucket
/// grants in a period of full use (a burst, then a period's refill), so a retry is recognised
/// unless that many sends of its category were allowed after it; at most
/// [`MAX_REMEMBERED_GRANTS`]. Marketing at 3 a day: 6; transactional at 30 a minute: 60.
pub fn remembered_grants(spec: &BucketSpec) -> usize {
    usize::try_from(spec.capacity)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .clamp(2, MAX_REMEMBERED_GRANTS)
}

/// One limited category of a user: its bucket, and the notifications it granted a token to.
struct Limited {
    category: Category,
    bucket: TokenBucket,
    /// Latest last; at most [`remembered_grants`].
    granted: VecDeque<Uuid>,
}

impl Limited {
    fn new(category: Category, bucket: TokenBucket) -> Self {
        Self {
            category,
            bucket,
            granted: VecDeque::new(),
        }
    }

    /// Remembers that `id` holds a token, so that a retry of it takes none; the oldest grant is
    /// forgotten when [`remembered_grants`] are kept.
    fn grant(&mut self, spec: &BucketSpec, id: Uuid) {
        if self.granted.len() >= remembered_grants(spec) {
            self.granted.pop_front();
        }
        self.granted.push_back(id);
    }
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
        let mut ledger = lock(&self.ledger);
        ledger.buckets = self
            .args
            .limits
            .iter()
            .map(|(category, limit)| {
                let spent = sent.get(category).copied().unwrap_or(0);
                Limited::new(*category, TokenBucket::spent(&limit.spec(), now, spent))
            })
            .collect();
        ledger.seeded = true;
        for (request, reply) in self.waiting.take().unwrap_or_default() {
            let _ = reply.send(ledger.decide(&self.args.limits, self.max_reserved, request, now));
        }
    }

    fn decide(&mut self, request: Acquire, now: Instant) -> Verdict {
        lock(&self.ledger).decide(&self.args.limits, self.max_reserved, request, now)
    }

    fn is_idle(&mut self, now: Instant) -> bool {
        if self.waiting.is_some() {
            return false;
        }
        if now.saturating_duration_since(self.last_used) < self.args.idle_after {
            return false;
        }
        lock(&self.ledger).is_settled(&self.args.limits, now)
    }
}

/// The ledger (a panic while it was held ends the actor, whose replacement starts a new one).
fn lock(ledger: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Ledger {
    /// The verdict on `request` at `now`, with the user's `limits` and at most `max_reserved`
    /// reservations.
    fn decide(
        &mut self,
        limits: &HashMap<Category, CategoryLimit>,
        max_reserved: usize,
        request: Acquire,
        now: Instant,
    ) -> Verdict {
        let Some(limit) = limits.get(&request.category).copied() else {
            return Verdict::Allow;
        };
        let id = request.notification_id;
        let spec = limit.spec();
        if self
            .limited(request.category, &spec, now)
            .granted
            .contains(&id)
        {
            return Verdict::Allow;
        }
        self.forget_expired_reservations(now);
        if let Some(slot) = self.reserved.get(&id).copied() {
            return self.claim(request, &spec, slot, now);
        }
        if request.allowed_before {
            // Allowed by an earlier limiter, whose token this one's history does not count, or
            // by this one longer ago than it remembers: charged once here, never refused.
            let limited = self.limited(request.category, &spec, now);
            limited.bucket.charge(&spec, now);
            limited.grant(&spec, id);
            return Verdict::Allow;
        }
        // A slot is reserved however far off, while the cap allows: a notification parked as
        // `scheduled` keeps its place as one held in JetStream does.
        let within = match limit.policy {
            super::OverLimit::Defer if self.reserved.len() < max_reserved => Duration::MAX,
            super::OverLimit::Defer | super::OverLimit::Drop => Duration::ZERO,
        };
        let limited = self.limited(request.category, &spec, now);
        match limited.bucket.reserve(&spec, now, within) {
            Ok(Duration::ZERO) => {
                limited.grant(&spec, id);
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
    /// has come, else held for the rest of its wait (redelivered early for another reason) unless
    /// it was allowed meanwhile (by another limiter, while this one's partition was elsewhere): its
    /// reserved token is then its own at once.
    fn claim(
        &mut self,
        request: Acquire,
        spec: &BucketSpec,
        slot: Instant,
        now: Instant,
    ) -> Verdict {
        let id = request.notification_id;
        let left = slot.saturating_duration_since(now);
        if !left.is_zero() && !request.allowed_before {
            return Verdict::Defer(left);
        }
        self.reserved.remove(&id);
        self.slots.remove(&(slot, id));
        self.limited(request.category, spec, now).grant(spec, id);
        Verdict::Allow
    }

    /// The category's bucket and grants, a full bucket if it has none yet.
    fn limited(&mut self, category: Category, spec: &BucketSpec, now: Instant) -> &mut Limited {
        let index = match self.buckets.iter().position(|l| l.category == category) {
            Some(index) => index,
            None => {
                self.buckets
                    .push(Limited::new(category, TokenBucket::full(spec, now)));
                self.buckets.len() - 1
            }
        };
        &mut self.buckets[index]
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

    /// Whether the ledger holds nothing a new one would not: every bucket full, no reservation.
    fn is_settled(&mut self, limits: &HashMap<Category, CategoryLimit>, now: Instant) -> bool {
        self.reserved.is_empty()
            && self.buckets.iter_mut().all(|limited| {
                limits
                    .get(&limited.category)
                    .is_none_or(|limit| limited.bucket.is_full(&limit.spec(), now))
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

    #[test]
    fn a_category_remembers_twice_its_capacity_in_grants_within_bounds() {
        let limits = parse_limits(&default_limits()).expect("default limits");
        let remembered = |category| remembered_grants(&limits[&category].spec());
        assert_eq!(remembered(Category::Marketing), 6);
        assert_eq!(remembered(Category::Transactional), 60);
        let spec = |capacity| BucketSpec {
            capacity,
            period: Duration::from_secs(1),
        };
        assert_eq!(remembered_grants(&spec(1)), 2);
        assert_eq!(remembered_grants(&spec(100_000)), MAX_REMEMBERED_GRANTS);
    }
}
