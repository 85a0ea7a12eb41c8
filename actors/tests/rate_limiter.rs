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
    ])
}

async fn start(
    settings: RateLimiterSettings,
    clock: MonotonicClock,
) -> ActorRef<RateLimiterSupervisorMsg> {
    start_with_history(settings, clock, None).await
}

async fn start_with_history(
    settings: RateLimiterSettings,
    clock: MonotonicClock,
    history: Option<Arc<dyn SendHistory>>,
) -> ActorRef<RateLimiterSupervisorMsg> {
    let (supervisor, _) = Actor::spawn(
        None,
        RateLimiterSupervisor,
        RateLimiterSupervisorArgs {
            limits: Arc::new(limits()),
            settings,
            clock,
            history,
        },
    )
    .await
    .expect("supervisor starts");
    supervisor
}

async fn verdict(
    supervisor: &ActorRef<RateLimiterSupervisorMsg>,
    user: &str,
    category: Category,
) -> Verdict {
    let request = Acquire {
        category,
        notification_id: Uuid::now_v7(),
    };
    ask(supervisor, user, request, Duration::from_secs(2))
        .await
        .expect("an answer")
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
    for _ in 0..3 {
        assert_eq!(
            verdict(&supervisor, "ada", Category::Marketing).await,
            Verdict::Allow
        );
    }
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
    assert_eq!(
        verdict(&supervisor, "ada", Category::Transactional).await,
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
        verdict(&supervisor, "ada", Category::Transactional).await,
        Verdict::Allow
    );

    // A notification allowed once is allowed again (a retry is the same send).
    let request = Acquire {
        category: Category::Marketing,
        notification_id: Uuid::now_v7(),
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

#[tokio::test]
async fn a_panicked_limiter_is_restarted() {
    let time = ManualClock::new();
    let supervisor = start(RateLimiterSettings::default(), time.clock()).await;
    assert_eq!(
        verdict(&supervisor, "ada", Category::Marketing).await,
        Verdict::Allow
    );
    supervisor
        .cast(RateLimiterSupervisorMsg::CrashUser("ada".into()))
        .unwrap();
    // The supervisor survives and the user gets a fresh actor that answers.
    wait_until("the restarted limiter to answer", || async {
        let request = Acquire {
            category: Category::Marketing,
            notification_id: Uuid::now_v7(),
        };
        ask(&supervisor, "ada", request, Duration::from_millis(500))
            .await
            .is_some()
    })
    .await;
    assert_eq!(users(&supervisor).await, 1);
    supervisor.stop(None);
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
