//! The per-user rate limiter as actors: verdicts per category and policy, supervision restarts,
//! idle stop, the bounded registry, and the memory 100k active users cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use herald_actors::rate_limit::{
    CategoryLimit, OverLimit, RateLimiterSettings, SendHistory, Verdict,
    actor::{Acquire, MonotonicClock},
    supervisor::{RateLimiterSupervisor, RateLimiterSupervisorArgs, RateLimiterSupervisorMsg, ask},
};
use herald_nats::Category;
use ractor::{Actor, ActorRef};
use uuid::Uuid;

/// A clock the test moves by hand.
#[derive(Clone)]
struct ManualClock(Arc<Mutex<Instant>>);

impl ManualClock {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
    fn clock(&self) -> MonotonicClock {
        let inner = self.0.clone();
        Arc::new(move || *inner.lock().unwrap())
    }
}

fn limits() -> HashMap<Category, CategoryLimit> {
    HashMap::from([
        (
            Category::Marketing,
            CategoryLimit {
                capacity: 3,
                per_secs: 86_400,
                policy: OverLimit::Drop,
            },
        ),
        (
            Category::Transactional,
            CategoryLimit {
                capacity: 2,
                per_secs: 60,
                policy: OverLimit::Defer,
            },
        ),
        (
            Category::Account,
            CategoryLimit {
                capacity: 1,
                per_secs: 1,
                policy: OverLimit::Defer,
            },
        ),
    ])
}

/// The longest hold by default (`dispatch.schedule_deferrals_after_secs`).
const HOLD: Duration = Duration::from_secs(300);

async fn start(
    settings: RateLimiterSettings,
    clock: MonotonicClock,
) -> ActorRef<RateLimiterSupervisorMsg> {
    start_reserving(settings, clock, HOLD).await
}

async fn start_reserving(
    settings: RateLimiterSettings,
    clock: MonotonicClock,
    reserve_within: Duration,
) -> ActorRef<RateLimiterSupervisorMsg> {
    spawn_supervisor(settings, clock, None, reserve_within).await
}

async fn start_with_history(
    settings: RateLimiterSettings,
    clock: MonotonicClock,
    history: Option<Arc<dyn SendHistory>>,
) -> ActorRef<RateLimiterSupervisorMsg> {
    spawn_supervisor(settings, clock, history, HOLD).await
}

async fn spawn_supervisor(
    settings: RateLimiterSettings,
    clock: MonotonicClock,
    history: Option<Arc<dyn SendHistory>>,
    reserve_within: Duration,
) -> ActorRef<RateLimiterSupervisorMsg> {
    let (supervisor, _) = Actor::spawn(
        None,
        RateLimiterSupervisor,
        RateLimiterSupervisorArgs {
            limits: Arc::new(limits()),
            settings,
            clock,
            history,
            reserve_within,
        },
    )
    .await
    .expect("supervisor starts");
    supervisor
}

/// Asks about a new notification.
async fn verdict(
    supervisor: &ActorRef<RateLimiterSupervisorMsg>,
    user: &str,
    category: Category,
) -> Verdict {
    verdict_of(supervisor, user, category, Uuid::now_v7()).await
}

/// Asks about notification `id` (a notification asking again keeps its id).
async fn verdict_of(
    supervisor: &ActorRef<RateLimiterSupervisorMsg>,
    user: &str,
    category: Category,
    notification_id: Uuid,
) -> Verdict {
    let request = Acquire {
        category,
        notification_id,
        allowed_before: false,
    };
    ask(supervisor, user, request, Duration::from_secs(2))
        .await
        .expect("an answer")
}

/// Sends `n` new notifications of `user` in `category`; each must be allowed.
async fn spend(
    supervisor: &ActorRef<RateLimiterSupervisorMsg>,
    user: &str,
    category: Category,
    n: usize,
) {
    for _ in 0..n {
        assert_eq!(
            verdict(supervisor, user, category).await,
            Verdict::Allow,
            "{user} has a {category:?} token left"
        );
    }
}

/// The waits of `n` new notifications of `user` in `category`, in seconds; each must be deferred.
async fn deferral_waits(
    supervisor: &ActorRef<RateLimiterSupervisorMsg>,
    user: &str,
    category: Category,
    n: usize,
) -> Vec<u64> {
    let mut waits = Vec::new();
    for _ in 0..n {
        match verdict(supervisor, user, category).await {
            Verdict::Defer(wait) => waits.push(wait.as_secs()),
            other => panic!("over the limit with policy defer: {other:?}"),
        }
    }
    waits
}

async fn users(supervisor: &ActorRef<RateLimiterSupervisorMsg>) -> usize {
    ractor::call!(supervisor, RateLimiterSupervisorMsg::Users).expect("users")
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Recent sends as another instance (or an earlier run) recorded them; `None` = unreachable.
struct RecordedSends(Option<HashMap<Category, u32>>);

impl SendHistory for RecordedSends {
    fn sent_within<'a>(
        &'a self,
        _user: &'a str,
        windows: &'a [(Category, Duration)],
    ) -> BoxFuture<'a, Result<HashMap<Category, u32>, String>> {
        Box::pin(async move {
            assert!(
                windows
                    .iter()
                    .any(|(c, w)| *c == Category::Marketing && *w == Duration::from_secs(86_400)),
                "asks for each limited category over its period: {windows:?}"
            );
            self.0
                .clone()
                .ok_or_else(|| "database unreachable".to_string())
        })
    }
}

#[tokio::test]
async fn a_starting_limiter_counts_recent_sends_as_spent() {
    let time = ManualClock::new();
    let history = RecordedSends(Some(HashMap::from([(Category::Marketing, 2)])));
    let supervisor = start_with_history(
        RateLimiterSettings::default(),
        time.clock(),
        Some(Arc::new(history)),
    )
    .await;
    assert_eq!(
        verdict(&supervisor, "ada", Category::Marketing).await,
        Verdict::Allow,
        "3 a day, 2 already sent: one left"
    );
    assert_eq!(
        verdict(&supervisor, "ada", Category::Marketing).await,
        Verdict::Drop
    );
    assert_eq!(
        verdict(&supervisor, "ada", Category::Transactional).await,
        Verdict::Allow,
        "no transactional sends recorded"
    );
}

#[tokio::test]
async fn an_unreadable_history_gives_no_verdict_so_the_caller_holds_and_asks_again() {
    let time = ManualClock::new();
    let supervisor = start_with_history(
        RateLimiterSettings::default(),
        time.clock(),
        Some(Arc::new(RecordedSends(None))),
    )
    .await;
    let request = Acquire {
        category: Category::Marketing,
        notification_id: Uuid::now_v7(),
        allowed_before: false,
    };
    assert_eq!(
        ask(&supervisor, "ada", request, Duration::from_millis(500)).await,
        None,
        "neither allowed (could exceed the limit) nor dropped (could lose a send)"
    );
    wait_until("the unseeded actor to stop", || async {
        users(&supervisor).await == 0
    })
    .await;
}

#[tokio::test]
async fn over_the_limit_marketing_drops_and_transactional_defers_per_user() {
    let time = ManualClock::new();
    let supervisor = start(RateLimiterSettings::default(), time.clock()).await;
    spend(&supervisor, "ada", Category::Marketing, 3).await;
    assert_eq!(
        verdict(&supervisor, "ada", Category::Marketing).await,
        Verdict::Drop
    );
    assert_eq!(
        verdict(&supervisor, "grace", Category::Marketing).await,
        Verdict::Allow,
        "limits are per user"
    );
    assert_eq!(
        verdict(&supervisor, "ada", Category::Transactional).await,
        Verdict::Allow
    );
    assert_eq!(
        verdict(&supervisor, "ada", Category::Transactional).await,
        Verdict::Allow
    );
    let deferred = Uuid::now_v7();
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, deferred).await,
        Verdict::Defer(Duration::from_secs(30)),
        "a token every 30 s"
    );
    assert_eq!(
        verdict(&supervisor, "ada", Category::Security).await,
        Verdict::Allow,
        "unlimited categories pass"
    );
    time.advance(Duration::from_secs(30));
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, deferred).await,
        Verdict::Allow,
        "back after the wait, the deferred notification goes"
    );

    // A notification allowed once is allowed again (a retry is the same send).
    let request = Acquire {
        category: Category::Marketing,
        notification_id: Uuid::now_v7(),
        allowed_before: false,
    };
    assert_eq!(
        ask(&supervisor, "grace", request, Duration::from_secs(2)).await,
        Some(Verdict::Allow)
    );
    verdict(&supervisor, "grace", Category::Marketing).await;
    assert_eq!(
        ask(&supervisor, "grace", request, Duration::from_secs(2)).await,
        Some(Verdict::Allow),
        "the bucket is empty, but this notification already holds a token"
    );
    supervisor.stop(None);
}

/// A notification allowed once, whose round then failed for now, is allowed again on its retry
/// without another token, however many sends of other categories the user was allowed meanwhile
/// (before, only the user's last 16 grants of any category were remembered: a marketing retry
/// behind 17 other sends was dropped as over the limit, a transactional one was held).
#[tokio::test]
async fn a_retry_after_many_other_sends_is_allowed_without_another_token() {
    let time = ManualClock::new();
    let supervisor = start(RateLimiterSettings::default(), time.clock()).await;
    let marketing = Uuid::now_v7();
    let transactional = Uuid::now_v7();
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Marketing, marketing).await,
        Verdict::Allow
    );
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, transactional).await,
        Verdict::Allow
    );
    spend(&supervisor, "ada", Category::Marketing, 2).await;
    spend(&supervisor, "ada", Category::Transactional, 1).await;
    // 17 other sends while the two wait for their retries (account: 1 a second).
    for _ in 0..17 {
        spend(&supervisor, "ada", Category::Account, 1).await;
        time.advance(Duration::from_secs(1));
    }
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Marketing, marketing).await,
        Verdict::Allow,
        "the marketing retry holds its token (policy drop, bucket empty)"
    );
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, transactional).await,
        Verdict::Allow,
        "the transactional retry holds its token (policy defer, bucket empty)"
    );
    assert_eq!(
        verdict(&supervisor, "ada", Category::Marketing).await,
        Verdict::Drop,
        "the retry took no token: still 3 a day"
    );
    assert!(
        matches!(
            verdict(&supervisor, "ada", Category::Transactional).await,
            Verdict::Defer(_)
        ),
        "still 2 a minute"
    );
    supervisor.stop(None);
}

/// A retry that a limiter allowed before, coming to a limiter that did not grant it (this one
/// started after a restart or a partition hand-over, from a history that counts sends only, so
/// not this notification), is allowed on a token charged now, in debt when none is free: never
/// dropped nor held again, and the limit still counts it.
#[tokio::test]
async fn a_retry_allowed_by_an_earlier_limiter_is_charged_once_and_never_refused() {
    let time = ManualClock::new();
    let history = RecordedSends(Some(HashMap::from([
        (Category::Marketing, 3),
        (Category::Transactional, 2),
    ])));
    let supervisor = start_with_history(
        RateLimiterSettings::default(),
        time.clock(),
        Some(Arc::new(history)),
    )
    .await;
    let retry = |category, notification_id| Acquire {
        category,
        notification_id,
        allowed_before: true,
    };
    let marketing = retry(Category::Marketing, Uuid::now_v7());
    let transactional = retry(Category::Transactional, Uuid::now_v7());
    for request in [marketing, transactional] {
        assert_eq!(
            ask(&supervisor, "ada", request, Duration::from_secs(2)).await,
            Some(Verdict::Allow),
            "{:?}: allowed before, the bucket empty",
            request.category
        );
    }
    for request in [marketing, transactional] {
        assert_eq!(
            ask(&supervisor, "ada", request, Duration::from_secs(2)).await,
            Some(Verdict::Allow),
            "{:?}: asked again, on the token charged",
            request.category
        );
    }
    let held = Uuid::now_v7();
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, held).await,
        Verdict::Defer(Duration::from_secs(60)),
        "a token every 30 s; the retry's debt is paid first"
    );
    assert_eq!(
        ask(
            &supervisor,
            "ada",
            retry(Category::Transactional, held),
            Duration::from_secs(2)
        )
        .await,
        Some(Verdict::Allow),
        "held here, allowed meanwhile elsewhere: back early, on its reserved token"
    );
    assert_eq!(
        verdict(&supervisor, "ada", Category::Transactional).await,
        Verdict::Defer(Duration::from_secs(90)),
        "the early one took no token beyond the one reserved for it"
    );
    time.advance(Duration::from_secs(8 * 3600));
    assert_eq!(
        verdict(&supervisor, "ada", Category::Marketing).await,
        Verdict::Drop,
        "a token every 8 h: the first one pays the retry's debt"
    );
    time.advance(Duration::from_secs(8 * 3600));
    assert_eq!(
        verdict(&supervisor, "ada", Category::Marketing).await,
        Verdict::Allow
    );
    supervisor.stop(None);
}

/// The grants a category remembers are bounded (twice its capacity): the oldest is forgotten, and
/// a retry of it is then known as one only by its recorded round, and charged a token.
#[tokio::test]
async fn a_category_forgets_its_oldest_grant_beyond_twice_its_capacity() {
    let time = ManualClock::new();
    let supervisor = start(RateLimiterSettings::default(), time.clock()).await;
    let first = Uuid::now_v7();
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Account, first).await,
        Verdict::Allow
    );
    for _ in 0..2 {
        time.advance(Duration::from_secs(1));
        spend(&supervisor, "ada", Category::Account, 1).await;
    }
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Account, first).await,
        Verdict::Defer(Duration::from_secs(1)),
        "1 a second, 2 remembered: the first grant is forgotten, so it asks as a new one"
    );
    let retry = Acquire {
        category: Category::Account,
        notification_id: Uuid::now_v7(),
        allowed_before: true,
    };
    assert_eq!(
        ask(&supervisor, "ada", retry, Duration::from_secs(2)).await,
        Some(Verdict::Allow),
        "a retry whose round was recorded goes all the same"
    );
    supervisor.stop(None);
}

/// Deferred notifications each get a slot of their own, one token apart, in the order they asked:
/// they come back one by one, not all together to fight over one token.
#[tokio::test]
async fn deferrals_get_slots_of_their_own_in_the_order_they_asked() {
    let time = ManualClock::new();
    let supervisor = start(RateLimiterSettings::default(), time.clock()).await;
    spend(&supervisor, "ada", Category::Transactional, 2).await;
    assert_eq!(
        deferral_waits(&supervisor, "ada", Category::Transactional, 5).await,
        vec![30, 60, 90, 120, 150],
        "a token every 30 s: the n-th deferral waits for the n-th token"
    );
    supervisor.stop(None);
}

/// A deferred notification that comes back at its slot is allowed without taking another token:
/// its token was reserved when it was deferred, and a newcomer waits behind every reservation.
#[tokio::test]
async fn a_notification_back_at_its_slot_goes_on_its_reserved_token() {
    let time = ManualClock::new();
    let supervisor = start(RateLimiterSettings::default(), time.clock()).await;
    spend(&supervisor, "ada", Category::Transactional, 2).await;
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, first).await,
        Verdict::Defer(Duration::from_secs(30))
    );
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, second).await,
        Verdict::Defer(Duration::from_secs(60))
    );
    time.advance(Duration::from_secs(10));
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, first).await,
        Verdict::Defer(Duration::from_secs(20)),
        "back early (redelivered for another reason): the rest of its own wait, no new slot"
    );
    time.advance(Duration::from_secs(20));
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, first).await,
        Verdict::Allow,
        "at its slot"
    );
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, first).await,
        Verdict::Allow,
        "a retry of the same send is free"
    );
    assert_eq!(
        verdict(&supervisor, "ada", Category::Transactional).await,
        Verdict::Defer(Duration::from_secs(60)),
        "the token refilled at 30 s was the first one's; a newcomer comes after the second"
    );
    time.advance(Duration::from_secs(30));
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, second).await,
        Verdict::Allow
    );
    supervisor.stop(None);
}

/// A deferral further off than the longest hold in JetStream (the dispatcher's
/// `schedule_deferrals_after`) still reserves its slot: its notification waits as `scheduled`
/// and, back at its slot, goes on the token kept for it, before a notification that asked after
/// it with a shorter wait. (Before, it reserved nothing: the later one took its token, and it was
/// held again behind it, possibly again and again under steady overload.)
#[tokio::test]
async fn a_deferral_parked_beyond_the_hold_keeps_its_place() {
    let time = ManualClock::new();
    let supervisor = start_reserving(
        RateLimiterSettings::default(),
        time.clock(),
        Duration::from_secs(100),
    )
    .await;
    spend(&supervisor, "ada", Category::Transactional, 2).await;
    assert_eq!(
        deferral_waits(&supervisor, "ada", Category::Transactional, 3).await,
        vec![30, 60, 90],
        "held in JetStream for slots of their own"
    );
    let (parked, later) = (Uuid::now_v7(), Uuid::now_v7());
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, parked).await,
        Verdict::Defer(Duration::from_secs(120)),
        "120 s is beyond the 100 s hold: parked as `scheduled`"
    );
    time.advance(Duration::from_secs(30));
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, later).await,
        Verdict::Defer(Duration::from_secs(120)),
        "asked after the parked one: the slot after its (150 s), not the parked one's (120 s)"
    );
    time.advance(Duration::from_secs(90));
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, parked).await,
        Verdict::Allow,
        "the parked notification, back at its slot, goes on the token kept for it"
    );
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, later).await,
        Verdict::Defer(Duration::from_secs(30)),
        "the later one waits for its own slot"
    );
    time.advance(Duration::from_secs(30));
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, later).await,
        Verdict::Allow
    );
    // Drop stays as it was: no debt, no reservation.
    spend(&supervisor, "ada", Category::Marketing, 3).await;
    assert_eq!(
        verdict(&supervisor, "ada", Category::Marketing).await,
        Verdict::Drop
    );
    supervisor.stop(None);
}

/// An actor holding a reservation does not stop when idle, even with full buckets, so the
/// notification coming back still finds its slot; one never claimed (the notification went
/// elsewhere) expires, and then the idle actor stops.
#[tokio::test]
async fn a_limiter_keeps_its_reservations_until_claimed_or_expired() {
    let time = ManualClock::new();
    let settings = RateLimiterSettings {
        idle_secs: 1,
        ..RateLimiterSettings::default()
    };
    let supervisor = start(settings, time.clock()).await;
    // Account: one a second.
    spend(&supervisor, "ada", Category::Account, 1).await;
    let (back, never) = (Uuid::now_v7(), Uuid::now_v7());
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Account, back).await,
        Verdict::Defer(Duration::from_secs(1))
    );
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Account, never).await,
        Verdict::Defer(Duration::from_secs(2))
    );
    // Every slot has passed and the bucket is full again, but neither reservation was claimed.
    time.advance(Duration::from_secs(5));
    // Two users in turn, each started after the clock moved, stop when idle: together they take
    // more than one idle interval, so ada's limiter has had an idle check meanwhile.
    for witness in ["bob", "cy"] {
        spend(&supervisor, witness, Category::Account, 1).await;
        time.advance(Duration::from_secs(5));
        wait_until(&format!("{witness}'s idle limiter to stop"), || async {
            users(&supervisor).await <= 1
        })
        .await;
        assert_eq!(
            users(&supervisor).await,
            1,
            "ada's limiter stays, idle with full buckets: it holds reservations"
        );
    }
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Account, back).await,
        Verdict::Allow
    );
    assert_eq!(
        verdict(&supervisor, "ada", Category::Account).await,
        Verdict::Allow,
        "the limiter that stayed is ada's, and the returning notification took no token: the \
         bucket's one is still there"
    );
    // The other one never comes back: its reservation expires and the idle actor stops.
    time.advance(Duration::from_secs(600));
    wait_until(
        "the limiter to stop once its reservations expired",
        || async { users(&supervisor).await == 0 },
    )
    .await;
    supervisor.stop(None);
}

/// Reservations are bounded per limiter: a slot not claimed within its grace is forgotten at the
/// next deferral (no idle check needed), and with as many reservations as the limits can use
/// (per `defer` category, the tokens within the hold plus one burst), a deferral reserves
/// nothing and is told when the first unpromised token refills. Below that, a slot is reserved
/// however far off.
#[tokio::test]
async fn reservations_are_capped_and_expired_ones_forgotten_as_new_ones_come() {
    let time = ManualClock::new();
    let supervisor = start_reserving(
        RateLimiterSettings::default(),
        time.clock(),
        Duration::from_secs(10),
    )
    .await;
    // Cap: account (1 per s, defer) 10 + 1, transactional (2 per 60 s, defer) 1 + 2 = 14.
    spend(&supervisor, "ada", Category::Account, 1).await;
    assert_eq!(
        deferral_waits(&supervisor, "ada", Category::Account, 10).await,
        vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        "each reserved, the tenth too though 10 s away (parked beyond the hold)"
    );
    // Nine slots pass unclaimed (their notifications went elsewhere), within their grace.
    time.advance(Duration::from_secs(9));
    assert_eq!(
        deferral_waits(&supervisor, "ada", Category::Account, 7).await,
        vec![2, 3, 4, 5, 6, 6, 6],
        "10 unclaimed + 4 new = 14 reserved: the fifth to seventh reserve nothing, all told 6 s"
    );
    // All 14 slots are more than a minute old: forgotten when the next deferral comes.
    time.advance(Duration::from_secs(66));
    spend(&supervisor, "ada", Category::Account, 1).await;
    assert_eq!(
        deferral_waits(&supervisor, "ada", Category::Account, 3).await,
        vec![1, 2, 3],
        "slots of their own again"
    );
    supervisor.stop(None);
}

/// A limiter that panics is replaced by one that takes over its buckets and reservations: sends it
/// allowed that are not recorded yet (still with their providers), which the send history does
/// not count, still count, and a deferred notification keeps its slot. (Before, the replacement
/// started from the history alone: the 3 marketing tokens ada had spent were hers again.)
#[tokio::test]
async fn a_panicked_limiter_is_replaced_by_one_that_keeps_its_buckets() {
    let time = ManualClock::new();
    // The sends allowed are on their way: none is recorded yet.
    let history: Arc<dyn SendHistory> = Arc::new(RecordedSends(Some(HashMap::new())));
    let supervisor =
        start_with_history(RateLimiterSettings::default(), time.clock(), Some(history)).await;
    spend(&supervisor, "ada", Category::Marketing, 3).await;
    assert_eq!(
        verdict(&supervisor, "ada", Category::Marketing).await,
        Verdict::Drop,
        "the bucket is empty before the crash"
    );
    spend(&supervisor, "ada", Category::Transactional, 2).await;
    let held = Uuid::now_v7();
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, held).await,
        Verdict::Defer(Duration::from_secs(30))
    );
    supervisor
        .cast(RateLimiterSupervisorMsg::CrashUser("ada".into()))
        .expect("crash cast");
    // The supervisor survives and the user gets a new actor that answers.
    assert_eq!(
        wait_for_answer(&supervisor, "ada", Category::Marketing).await,
        Verdict::Drop,
        "the replacement does not allow more than the limit: the 3 unrecorded sends still count"
    );
    assert_eq!(
        verdict(&supervisor, "ada", Category::Transactional).await,
        Verdict::Defer(Duration::from_secs(60)),
        "a newcomer waits behind the slot reserved before the crash"
    );
    time.advance(Duration::from_secs(30));
    assert_eq!(
        verdict_of(&supervisor, "ada", Category::Transactional, held).await,
        Verdict::Allow,
        "the held notification claims the slot reserved before the crash"
    );
    assert_eq!(users(&supervisor).await, 1);
    supervisor.stop(None);
}

/// The first verdict on a new notification of `user` in `category` that comes at all (none
/// while the user's actor is restarting), waiting at most 10 s.
async fn wait_for_answer(
    supervisor: &ActorRef<RateLimiterSupervisorMsg>,
    user: &str,
    category: Category,
) -> Verdict {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let request = Acquire {
            category,
            notification_id: Uuid::now_v7(),
            allowed_before: false,
        };
        if let Some(verdict) = ask(supervisor, user, request, Duration::from_millis(500)).await {
            return verdict;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {user}'s limiter to answer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn idle_limiters_stop_only_with_full_buckets_and_the_registry_is_bounded() {
    let time = ManualClock::new();
    let settings = RateLimiterSettings {
        idle_secs: 1,
        max_users: 3,
        ask_timeout_ms: 2_000,
    };
    let supervisor = start(settings, time.clock()).await;
    for user in ["a", "b", "c", "d", "e"] {
        assert_eq!(
            verdict(&supervisor, user, Category::Transactional).await,
            Verdict::Allow
        );
    }
    assert_eq!(users(&supervisor).await, 3, "least recently used evicted");

    // Buckets still refilling: the actors stay, idle or not.
    time.advance(Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(users(&supervisor).await, 3);
    // Full again (2 per minute refill in 30 s) and idle: they stop.
    time.advance(Duration::from_secs(60));
    wait_until("idle limiters to stop", || async {
        users(&supervisor).await == 0
    })
    .await;
    assert_eq!(
        verdict(&supervisor, "a", Category::Transactional).await,
        Verdict::Allow
    );
    supervisor.stop(None);
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Memory of 100k active users (one actor each, one drained bucket). Run in release:
/// `cargo test -p herald-actors --release --test rate_limiter -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; prints RSS per user"]
async fn memory_of_100k_active_users() {
    const USERS: usize = 100_000;
    let time = ManualClock::new();
    let settings = RateLimiterSettings {
        max_users: USERS + 1,
        ..RateLimiterSettings::default()
    };
    let supervisor = start(settings, time.clock()).await;
    verdict(&supervisor, "warm-up", Category::Marketing).await;
    let before = rss_bytes();
    let started = Instant::now();
    for chunk in (0..USERS).collect::<Vec<_>>().chunks(1_000) {
        let asks = chunk.iter().map(|i| {
            let supervisor = supervisor.clone();
            async move {
                verdict(
                    &supervisor,
                    &format!("customer-{i:06}"),
                    Category::Marketing,
                )
                .await
            }
        });
        for v in futures::future::join_all(asks).await {
            assert_eq!(v, Verdict::Allow);
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(users(&supervisor).await, USERS + 1);
    let after = rss_bytes();
    let per_user = (after.saturating_sub(before)) as f64 / USERS as f64;
    println!(
        "rate limiter: {USERS} active users in {elapsed:.2?}; RSS {:.1} MiB → {:.1} MiB; {:.0} bytes per user",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        per_user
    );
    supervisor.stop(None);
}
