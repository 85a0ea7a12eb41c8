//! Per-user rate limiting: a [`supervisor::RateLimiterSupervisor`] owns one
//! [`actor::RateLimiterActor`] per active user, each holding a token bucket per limited category.
//!
//! Actors are spawned on first use and stopped once idle with full buckets and no reserved slot
//! waiting to be claimed. A new actor starts from the user's [`SendHistory`]: every send of the
//! last period of a category counts as a spent token (`capacity - sent`). That keeps a limit
//! across restarts, evictions (bounded registry: at `max_users` the least recently used actor is
//! evicted, counted in `herald_rate_limiter_evictions_total`) and partition hand-overs between
//! instances, save for sends the previous owner allowed that are not recorded yet (still with
//! their providers), which the history does not count: a user can get that many more in the
//! period. An actor that replaces one that panicked takes over its ledger instead (see
//! [`actor::Ledger`]), so nothing is lost there.
//!
//! Slots reserved for deferred notifications (held in JetStream, or parked as `scheduled` when the
//! hold is long) live only in their actor's ledger: an actor started from the history does not
//! know them. The held notifications still come back spaced as their holds were set, and each
//! then asks the new actor as a new one would (a token if free, else a slot of its own). A
//! notification allowed before (a round of it was recorded) is never refused by the new actor:
//! it is charged a token there, in debt if none is free, as the history counts sends only.

pub mod actor;
pub mod supervisor;

use std::collections::HashMap;
use std::time::Duration;

use futures::future::BoxFuture;
use sea_orm::DatabaseConnection;

use herald_nats::Category;
use serde::{Deserialize, Serialize};

use crate::lookup::BatchLookup;
use crate::policy::token_bucket::BucketSpec;

/// What to do with a notification over its category's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OverLimit {
    /// Hold it until a token of its own is free: the next one to refill after those reserved
    /// for the notifications held before it (NAK with that delay).
    Defer,
    /// Do not send it: status `skipped`, reason `rate_limited`.
    Drop,
}

/// The limit of one category: `capacity` notifications per `per_secs` seconds per user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub struct CategoryLimit {
    /// Notifications allowed per period (and the burst); 0 turns the limit off.
    pub capacity: u32,
    /// The period in seconds.
    pub per_secs: u64,
    /// Over the limit: `defer` or `drop`.
    pub policy: OverLimit,
}

impl CategoryLimit {
    /// The bucket shape.
    pub fn spec(&self) -> BucketSpec {
        BucketSpec {
            capacity: self.capacity,
            period: Duration::from_secs(self.per_secs.max(1)),
        }
    }
}

/// The default limits by category name: marketing 3 a day (dropped over the limit), transactional
/// 30 a minute (deferred over the limit). Security and account are not limited.
pub fn default_limits() -> HashMap<String, CategoryLimit> {
    HashMap::from([
        (
            "marketing".to_string(),
            CategoryLimit {
                capacity: 3,
                per_secs: 86_400,
                policy: OverLimit::Drop,
            },
        ),
        (
            "transactional".to_string(),
            CategoryLimit {
                capacity: 30,
                per_secs: 60,
                policy: OverLimit::Defer,
            },
        ),
    ])
}

/// Reads limits keyed by category name; a capacity of 0 means unlimited. A limit on a critical
/// category (security), which is never limited, is refused rather than silently ignored.
pub fn parse_limits(
    by_name: &HashMap<String, CategoryLimit>,
) -> Result<HashMap<Category, CategoryLimit>, String> {
    let mut limits = HashMap::new();
    for (name, limit) in by_name {
        let category = Category::parse(name)
            .ok_or_else(|| format!("rate_limits: unknown category {name:?}"))?;
        if limit.per_secs == 0 {
            return Err(format!("rate_limits.{name}.per_secs must be at least 1"));
        }
        if limit.capacity > 0 && crate::policy::preferences::is_critical(category) {
            return Err(format!(
                "rate_limits.{name}: {name} notifications are never rate-limited (nor held by \
                 quiet hours); remove this limit or set its capacity to 0"
            ));
        }
        if limit.capacity > 0 {
            limits.insert(category, *limit);
        }
    }
    Ok(limits)
}

/// Registry and timing settings of the rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct RateLimiterSettings {
    /// Seconds without use after which a user's actor with full buckets stops.
    pub idle_secs: u64,
    /// Most user actors alive at once; beyond, the least recently used is evicted.
    pub max_users: usize,
    /// How long a delivery waits for the limiter's answer, in milliseconds.
    pub ask_timeout_ms: u64,
}

impl Default for RateLimiterSettings {
    fn default() -> Self {
        Self {
            idle_secs: 300,
            max_users: 200_000,
            ask_timeout_ms: 2_000,
        }
    }
}

/// A user actor's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send now (a token was taken, or the category is not limited).
    Allow,
    /// Over the limit, policy `defer`: the token reserved for the notification exists after this
    /// long (however long: a notification parked as `scheduled` claims it when it comes back);
    /// or, when the actor keeps as many reservations as it may ([`actor::reservation_cap`]), a
    /// token not promised is free after this long.
    Defer(Duration),
    /// Over the limit, policy `drop`.
    Drop,
}

/// Where a starting limiter reads a user's recent sends.
pub trait SendHistory: Send + Sync + 'static {
    /// Sends to `user` within each category's window, by category (absent: none).
    fn sent_within<'a>(
        &'a self,
        user: &'a str,
        windows: &'a [(Category, Duration)],
    ) -> BoxFuture<'a, Result<HashMap<Category, u32>, String>>;
}

/// Windows to count sends within, by category.
type Windows = Vec<(Category, Duration)>;

/// [`SendHistory`] read from the `notifications` table (`sent_at` by recipient). The histories of
/// limiters that start together (a burst of new users, a partition taken over) are read by one
/// query, as the dispatcher's lookups are ([`BatchLookup`]).
pub struct DbSendHistory {
    lookup: BatchLookup<(String, Windows), HashMap<Category, u32>>,
}

impl DbSendHistory {
    /// Reads histories from `db`; starts the lookup task on the current tokio runtime.
    pub fn new(db: DatabaseConnection) -> Self {
        let lookup = BatchLookup::spawn(move |keys: Vec<(String, Windows)>| {
            let db = db.clone();
            async move { read_histories(&db, keys).await }
        });
        Self { lookup }
    }
}

impl SendHistory for DbSendHistory {
    fn sent_within<'a>(
        &'a self,
        user: &'a str,
        windows: &'a [(Category, Duration)],
    ) -> BoxFuture<'a, Result<HashMap<Category, u32>, String>> {
        Box::pin(async move {
            let sent = self
                .lookup
                .get((user.to_string(), windows.to_vec()))
                .await?;
            Ok(sent.unwrap_or_default())
        })
    }
}

/// The send counts of each (user, windows) key: one query per distinct set of windows (all
/// limiters share one, the configured limits).
async fn read_histories(
    db: &DatabaseConnection,
    keys: Vec<(String, Windows)>,
) -> Result<HashMap<(String, Windows), HashMap<Category, u32>>, String> {
    let mut users_by_windows: HashMap<Windows, Vec<String>> = HashMap::new();
    for (user, windows) in keys {
        users_by_windows.entry(windows).or_default().push(user);
    }
    let now = chrono::Utc::now();
    let mut found = HashMap::new();
    for (windows, users) in users_by_windows {
        let cutoffs: Vec<(String, chrono::DateTime<chrono::Utc>)> = windows
            .iter()
            .map(|(category, window)| {
                let window = chrono::Duration::from_std(*window).unwrap_or(chrono::Duration::MAX);
                (category.as_str().to_string(), now - window)
            })
            .collect();
        let mut sent = herald_entities::repo::send_history::sent_since(db, &users, &cutoffs)
            .await
            .map_err(|e| e.to_string())?;
        for user in users {
            let counts = sent
                .remove(&user)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(name, sends)| Category::parse(&name).map(|c| (c, sends)))
                .collect();
            found.insert((user, windows.clone()), counts);
        }
    }
    Ok(found)
}
