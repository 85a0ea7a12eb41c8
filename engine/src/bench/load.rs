//! The bench's load: notifications accepted through NATS (as the API does it) or HTTP, and the
//! latency read back from the database.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::{StreamExt, stream::FuturesUnordered};
use hdrhistogram::Histogram;
use herald_entities::{NotificationStatus, WriteGate, customer, notification, repo};
use herald_nats::{
    Category, Channel, Connection, Contacts, Content, Publisher, SCHEMA_VERSION, SendCommand,
};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use super::open_loop::{self, HttpReport};
use super::{BenchArgs, Percentiles, RecipientKind, Via};
use crate::config::NatsConfig;

/// Size of a typical encoded command, for the JetStream reference.
pub const TYPICAL_COMMAND_BYTES: usize = 420;
/// Rows stored (customers; notifications and their commands with `--via nats`) per step.
const CHUNK: u64 = 1_000;

/// `range` in consecutive pieces of at most [`CHUNK`].
fn chunks(range: Range<u64>) -> impl Iterator<Item = Range<u64>> {
    range
        .clone()
        .step_by(CHUNK as usize)
        .map(move |start| start..(start + CHUNK).min(range.end))
}
/// How often an open-loop NATS load accepts what is due.
const PACE_TICK: Duration = Duration::from_millis(10);

/// What a load accepted.
pub struct LoadOutcome {
    /// Notifications accepted: the run ends when this many are `sent`.
    pub accepted: u64,
    /// What the HTTP calls saw, for an open-loop HTTP load.
    pub http: Option<HttpReport>,
}

/// Accepts `args.total()` notifications spread over `args.customers` recipients: as fast as
/// possible, or open-loop at `--rate`.
/// Commands go to the engine's NATS, as it connects, spread over its partitions.
pub async fn generate(
    args: &BenchArgs,
    db: &DatabaseConnection,
    gate: &WriteGate,
    nats: &NatsConfig,
    base_url: &str,
) -> anyhow::Result<LoadOutcome> {
    let (total, recipients) = (args.total(), Recipients::of(args));
    let http = match (args.via, args.rate) {
        (Via::Nats, None) => {
            let publisher =
                bench_publisher(nats.connection("herald-bench"), nats.partitions).await?;
            accept_in_turns(db, gate, &publisher, total, recipients).await?;
            None
        }
        (Via::Nats, Some(rate)) => {
            let publisher =
                bench_publisher(nats.connection("herald-bench"), nats.partitions).await?;
            accept_via_nats_at_rate(db, gate, &publisher, total, recipients, rate).await?;
            None
        }
        (Via::Http, None) => {
            via_http(args, base_url).await?;
            None
        }
        (Via::Http, Some(rate)) => {
            let connections = args.concurrency;
            Some(open_loop::send_at_rate(base_url, total, recipients, rate, connections).await?)
        }
    };
    Ok(LoadOutcome {
        accepted: http.as_ref().map_or(total, |h| h.accepted),
        http,
    })
}

/// Whom the `i`th notification of a load is for: one of `count` recipients, named by their
/// address in the request or by the id of a stored customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipients {
    /// Distinct recipients.
    count: u64,
    /// How the notifications name them.
    kind: RecipientKind,
}

impl Recipients {
    pub(super) fn of(args: &BenchArgs) -> Self {
        Self {
            count: args.customers,
            kind: args.recipients,
        }
    }

    /// Addresses in the requests, the reliability tests' load.
    fn contacts(count: u64) -> Self {
        Self {
            count,
            kind: RecipientKind::Contacts,
        }
    }

    fn email(n: u64) -> String {
        format!("customer-{n}@bench.invalid")
    }

    fn customer_id(n: u64) -> String {
        format!("customer-{n}")
    }

    /// The recipient key of the `i`th notification (customer id, else address), as the API
    /// derives it.
    fn key(&self, i: u64) -> String {
        let n = i % self.count;
        match self.kind {
            RecipientKind::Contacts => Self::email(n),
            RecipientKind::Customers => Self::customer_id(n),
        }
    }

    /// The customer id and contacts of the `i`th notification.
    fn of_notification(&self, i: u64) -> (Option<String>, Contacts) {
        match self.kind {
            RecipientKind::Contacts => (
                None,
                Contacts {
                    email: Some(self.key(i)),
                    ..Contacts::default()
                },
            ),
            RecipientKind::Customers => (Some(self.key(i)), Contacts::default()),
        }
    }
}

/// With [`RecipientKind::Customers`], stores the customers the load names, each with an email
/// address, in chunks; nothing otherwise.
pub async fn store_customers(
    db: &DatabaseConnection,
    recipients: Recipients,
) -> anyhow::Result<()> {
    if recipients.kind != RecipientKind::Customers {
        return Ok(());
    }
    let now = Utc::now();
    for chunk in chunks(0..recipients.count) {
        let rows = chunk.map(|n| {
            let fields = repo::customers::CustomerFields {
                email: Some(Recipients::email(n)),
                locale: "en".into(),
                timezone: "UTC".into(),
                ..Default::default()
            };
            repo::customers::new_row(&Recipients::customer_id(n), fields, now)
        });
        customer::Entity::insert_many(rows)
            .exec_without_returning(db)
            .await
            .context("cannot store the bench's customers")?;
    }
    Ok(())
}

fn command(i: u64, recipients: Recipients) -> SendCommand {
    let (customer_id, contacts) = recipients.of_notification(i);
    SendCommand {
        v: SCHEMA_VERSION,
        notification_id: Uuid::now_v7(),
        customer_id,
        contacts,
        category: Category::Transactional,
        channels: vec![Channel::Email],
        content: Content {
            subject: Some(format!("Your order #{i} is confirmed")),
            text: format!("Thanks for your order #{i}. We'll tell you when it ships."),
            html: None,
            short: None,
            template: None,
        },
        created_at: Utc::now(),
    }
}

/// Accepts `count` email notifications for `customers` recipients the way the API does (stored
/// `queued`, then published with the id as `Nats-Msg-Id`), in chunks with pipelined acks, for
/// engines with the default number of partitions. Used by the reliability tests to load an
/// engine quickly; its inserts meet the engine's writers at SQLite's lock, not in their turns.
pub async fn accept_via_nats(
    db: &DatabaseConnection,
    nats_url: &str,
    count: u64,
    customers: u64,
) -> anyhow::Result<()> {
    let recipients = Recipients::contacts(customers);
    let partitions = crate::Config::default().nats.partitions;
    let publisher =
        bench_publisher(Connection::plain(nats_url, "herald-bench"), partitions).await?;
    accept_in_turns(db, &WriteGate::default(), &publisher, count, recipients).await
}

/// Like [`accept_via_nats`], storing each chunk in a turn of `gate`, as the API's inserts take
/// turns with the engine's StatusWriter on SQLite: the bench passes its engine's gate.
async fn accept_in_turns(
    db: &DatabaseConnection,
    gate: &WriteGate,
    publisher: &Publisher,
    count: u64,
    recipients: Recipients,
) -> anyhow::Result<()> {
    for chunk in chunks(0..count) {
        accept_chunk(db, gate, publisher, chunk, recipients).await?;
    }
    Ok(())
}

/// Like [`accept_in_turns`], but open-loop at `rate` notifications per second: every tick
/// accepts what the clock says is due, so a slow engine cannot slow the load down.
async fn accept_via_nats_at_rate(
    db: &DatabaseConnection,
    gate: &WriteGate,
    publisher: &Publisher,
    count: u64,
    recipients: Recipients,
    rate: f64,
) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval(PACE_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next = 0;
    while next < count {
        ticks.tick().await;
        let due = ((started.elapsed().as_secs_f64() * rate) as u64).min(count);
        for chunk in chunks(next..due) {
            accept_chunk(db, gate, publisher, chunk, recipients).await?;
        }
        next = next.max(due);
    }
    Ok(())
}

/// A NATS connection of the load's own, publishing over `partitions` command partitions.
async fn bench_publisher(nats: Connection<'_>, partitions: u32) -> anyhow::Result<Publisher> {
    let client = herald_nats::connect::connect_within(nats, super::NATS_PATIENCE).await?;
    Ok(Publisher::new(
        async_nats::jetstream::new(client),
        partitions,
    ))
}

/// Stores notifications `range` as `queued` (multi-row INSERTs, in a turn of `gate`), then
/// publishes their commands with pipelined acks.
async fn accept_chunk(
    db: &DatabaseConnection,
    gate: &WriteGate,
    publisher: &Publisher,
    range: Range<u64>,
    recipients: Recipients,
) -> anyhow::Result<()> {
    let commands: Vec<(String, SendCommand)> = range
        .map(|i| (recipients.key(i), command(i, recipients)))
        .collect();
    let rows = commands
        .iter()
        .map(|(key, c)| herald_api::notifications::new_notification(c, key.clone()))
        .collect();
    let turn = gate.enter().await;
    repo::notifications::insert_many(db, rows).await?;
    drop(turn);
    let mut publishes: FuturesUnordered<_> = commands
        .iter()
        .map(|(key, c)| publisher.publish_command(key, c))
        .collect();
    while let Some(published) = publishes.next().await {
        published?;
    }
    Ok(())
}

/// The body of the `i`th `POST /api/v1/notifications`.
pub(super) fn http_body(i: u64, recipients: Recipients) -> serde_json::Value {
    let recipient = match recipients.of_notification(i) {
        (Some(customer_id), _) => serde_json::json!({ "customer_id": customer_id }),
        (None, contacts) => serde_json::json!({ "email": contacts.email }),
    };
    serde_json::json!({
        "recipient": recipient,
        "category": "transactional",
        "channels": ["email"],
        "content": { "subject": format!("Your order #{i} is confirmed"), "text": "Thanks for your order." }
    })
}

async fn via_http(args: &BenchArgs, base_url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().build()?;
    let counter = Arc::new(AtomicU64::new(0));
    let url = format!("{base_url}/api/v1/notifications");
    let workers = (0..args.concurrency.max(1)).map(|_| {
        let http = http.clone();
        let counter = counter.clone();
        let url = url.clone();
        let (total, recipients) = (args.total(), Recipients::of(args));
        tokio::spawn(async move {
            loop {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let response = http
                    .post(&url)
                    .json(&http_body(i, recipients))
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status() == reqwest::StatusCode::ACCEPTED,
                    "send answered {}",
                    response.status()
                );
            }
        })
    });
    for worker in workers.collect::<Vec<_>>() {
        worker.await.context("http worker")??;
    }
    Ok(())
}

/// What the sent notifications' recorded times say.
pub struct SentTimes {
    /// Accept → sent latency over every sent notification.
    pub latency_ms: Percentiles,
    /// When the last one was sent.
    pub last: Option<DateTime<Utc>>,
}

/// Reads every sent notification's `created_at`/`sent_at` once, in pages.
pub async fn sent_times(db: &DatabaseConnection) -> anyhow::Result<SentTimes> {
    let mut histogram = Histogram::<u64>::new(3)?;
    let mut last: Option<DateTime<Utc>> = None;
    let mut after: Option<Uuid> = None;
    loop {
        let mut query = notification::Entity::find()
            .select_only()
            .columns([
                notification::Column::Id,
                notification::Column::CreatedAt,
                notification::Column::SentAt,
            ])
            .filter(notification::Column::Status.eq(NotificationStatus::Sent))
            .order_by_asc(notification::Column::Id)
            .limit(10_000);
        if let Some(id) = after {
            query = query.filter(notification::Column::Id.gt(id));
        }
        let page: Vec<(Uuid, DateTime<Utc>, Option<DateTime<Utc>>)> =
            query.into_tuple().all(db).await?;
        let Some(end) = page.last() else { break };
        after = Some(end.0);
        for (_, created, sent) in &page {
            if let Some(sent) = sent {
                let micros = (*sent - *created).num_microseconds().unwrap_or(0).max(0) as u64;
                histogram.record(micros.max(1))?;
                last = last.max(Some(*sent));
            }
        }
    }
    Ok(SentTimes {
        latency_ms: Percentiles::from_micros(&histogram),
        last,
    })
}
