//! Liveness and readiness.
//!
//! `GET /health` answers while the process serves HTTP (restart it if not). `GET /health/ready`
//! answers 200 only when this instance can do its job: engine running, NATS connected, Herald's
//! streams and partition lease bucket present, database reachable, partition count the
//! deployment's (`partitions.conflict` absent); it reports the command backlog
//! and circuit states too, and answers 503 with the same body when a check fails (take the
//! instance out of the load balancer, do not restart; a stopped engine makes `herald serve` exit
//! by itself).

use std::time::Duration;

use futures::future::join_all;
use herald_nats::leases::LEASE_STREAM;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags, payload::Json};
use sea_orm::ConnectionTrait;
use tokio::time::{Instant, timeout_at};

use crate::{
    AppState,
    engine_view::{ChannelCircuit, PartitionsView},
};

/// How long readiness waits for all its checks together; they run at the same time, and one that
/// has not answered by then (a database holding the request for the pool's whole acquire timeout,
/// a JetStream without quorum letting each request run into the client's 5 s timeout) is reported
/// as failed by name, so a probe gets the `503` body rather than timing out itself.
pub const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Tags)]
enum HealthTags {
    /// Process health.
    Health,
}

/// Liveness answer.
#[derive(Object)]
pub struct Liveness {
    /// Always `ok` while the process serves HTTP.
    pub status: String,
    /// Herald's version.
    pub version: String,
}

/// One readiness check.
#[derive(Debug, Clone, Object)]
pub struct Check {
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// Readiness answer.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    /// The delivery engine (the actor tree); once it has stopped, the process exits.
    pub engine: Check,
    /// NATS connection.
    pub nats: Check,
    /// Herald's JetStream streams, and the stream of its partition lease bucket.
    pub streams: Check,
    /// Database.
    pub database: Check,
    /// Send commands in `NOTIFY` not yet completed (waiting or in flight, all instances), when
    /// known.
    pub pending_commands: Option<u64>,
    /// The command partitions this instance consumes; not ready when it has a `conflict` (its
    /// partition count is not the deployment's).
    pub partitions: PartitionsView,
    /// Providers and their circuits (an open circuit does not make an instance unready: failover
    /// carries the traffic): those whose channel actor answered in time. Without the last
    /// failure's text, which can name a recipient: `GET /api/v1/channels` (a key with `read`)
    /// has it.
    pub channels: Vec<ChannelCircuit>,
}

/// Responses of the readiness check.
#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// Ready.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// Not ready; the body says which check failed.
    #[oai(status = 503)]
    NotReady(Json<Readiness>),
}

/// Health endpoints.
pub struct HealthApi {
    state: AppState,
}

impl HealthApi {
    /// Health endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(tag = "HealthTags::Health")]
impl HealthApi {
    /// Liveness: the process is up and serving HTTP.
    #[oai(path = "/health", method = "get")]
    async fn live(&self) -> Json<Liveness> {
        Json(Liveness {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    /// Readiness: engine running, NATS connected, streams and lease bucket present, database
    /// reachable, partition count the deployment's; with backlog and circuits.
    #[oai(path = "/health/ready", method = "get")]
    async fn ready(&self) -> ReadyResponse {
        let deadline = Instant::now() + READINESS_TIMEOUT;
        let nats = if self.state.publisher.is_connected() {
            pass("connected")
        } else {
            fail("not connected")
        };
        let ((streams, pending_commands), database, channels) = tokio::join!(
            self.streams(deadline),
            self.database(deadline),
            self.channels(deadline),
        );
        let engine = if self.state.engine.running() {
            pass("running")
        } else {
            fail("stopped")
        };
        let partitions = self.state.engine.partitions();
        // Consuming no partition, it would take requests for commands it spreads by another
        // count than the deployment's.
        let ready =
            engine.ok && nats.ok && streams.ok && database.ok && partitions.conflict.is_none();
        let body = Readiness {
            status: if ready { "ready" } else { "not_ready" }.into(),
            engine,
            nats,
            streams,
            database,
            pending_commands,
            partitions,
            channels,
        };
        if ready {
            ReadyResponse::Ready(Json(body))
        } else {
            ReadyResponse::NotReady(Json(body))
        }
    }
}

impl HealthApi {
    async fn database(&self, deadline: Instant) -> Check {
        match timeout_at(deadline, self.state.db.execute_unprepared("SELECT 1")).await {
            Ok(Ok(_)) => pass("reachable"),
            Ok(Err(err)) => fail(&err.to_string()),
            Err(_) => fail(&no_answer()),
        }
    }

    /// The providers' circuits: those whose actor answered (each is given less than the
    /// readiness bound; none if even that runs out by `deadline`).
    async fn channels(&self, deadline: Instant) -> Vec<ChannelCircuit> {
        timeout_at(deadline, self.state.engine.channels())
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|view| view.state)
            .collect()
    }

    /// Herald's streams and the lease bucket's, asked for at the same time; the first that is
    /// missing or has not answered by `deadline` is named.
    async fn streams(&self, deadline: Instant) -> (Check, Option<u64>) {
        if !self.state.publisher.is_connected() {
            return (fail("NATS not connected"), None);
        }
        let js = self.state.publisher.jetstream();
        let names = herald_nats::subjects::ALL_STREAMS
            .iter()
            .copied()
            .chain([LEASE_STREAM]);
        let answers = join_all(names.map(|name| async move {
            let answer = match timeout_at(deadline, js.get_stream(name)).await {
                Ok(Ok(stream)) => Ok(stream.cached_info().state.messages),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err(no_answer()),
            };
            (name, answer)
        }))
        .await;
        let mut pending = None;
        for (name, answer) in answers {
            match answer {
                // `get_stream` already read the stream's info: the backlog comes with it.
                Ok(messages) if name == herald_nats::subjects::NOTIFY_STREAM => {
                    pending = Some(messages);
                }
                Ok(_) => {}
                // Without the lease bucket no partition is consumed; the lease keepers create it
                // again.
                Err(err) if name == LEASE_STREAM => {
                    return (
                        fail(&format!("{name} (partition lease bucket): {err}")),
                        None,
                    );
                }
                Err(err) => return (fail(&format!("{name}: {err}")), None),
            }
        }
        (
            pass(&format!(
                "EVENTS, NOTIFY, NOTIFY_DLQ, NOTIFY_STATUS, {LEASE_STREAM}"
            )),
            pending,
        )
    }
}

/// The detail of a check that did not answer within [`READINESS_TIMEOUT`].
fn no_answer() -> String {
    format!("no answer within {} s", READINESS_TIMEOUT.as_secs())
}

/// Sets `herald_queue_pending_commands` (commands in the `NOTIFY` work queue not yet completed)
/// before a scrape of `/metrics`; left unchanged when NATS does not answer within a second.
pub async fn record_queue_depth(publisher: &herald_nats::Publisher) {
    if !publisher.is_connected() {
        return;
    }
    let js = publisher.jetstream();
    let pending = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let stream = js
            .get_stream(herald_nats::subjects::NOTIFY_STREAM)
            .await
            .ok()?;
        Some(stream.cached_info().state.messages)
    })
    .await;
    if let Ok(Some(pending)) = pending {
        metrics::gauge!("herald_queue_pending_commands").set(pending as f64);
    }
}

fn pass(detail: &str) -> Check {
    Check {
        ok: true,
        detail: detail.into(),
    }
}

fn fail(detail: &str) -> Check {
    Check {
        ok: false,
        detail: detail.into(),
    }
}
