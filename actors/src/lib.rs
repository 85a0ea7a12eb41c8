//! Herald's actors: the supervision tree that turns send commands into delivered notifications.
//!
//! ```text
//! EngineSupervisor
//! ├── StatusWriter        batched status + attempt writes; acks after commit
//! ├── ChannelSupervisor
//! │   └── ChannelActor    one per provider: circuit breaker, concurrency, timeout
//! ├── Dispatcher          pulls notify.cmd.>, runs each delivery as a task
//! ├── RateLimiterSupervisor
//! │   └── RateLimiterActor  one per active user: token buckets per category
//! └── Scheduler           due scheduled notifications, bulk fan-out, retention
//! ```
//!
//! Pure decision logic lives beside the actors in plain types with unit tests:
//! [`channel::circuit`] (circuit breaker) and [`retry`] (backoff schedule).

pub mod channel;
pub mod delivery;
pub mod dispatcher;
pub mod engine_supervisor;
pub mod lease;
pub mod lookup;
pub mod outbox_relay;
pub mod partitions;
pub mod policy;
pub mod pull;
pub mod rate_limit;
pub mod retry;
pub mod router;
pub mod rules;
pub mod scheduler;
pub mod slot;
pub mod status_writer;
pub mod templates;
pub mod waiting;
