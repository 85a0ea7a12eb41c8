//! The bench's load: notifications accepted through NATS (as the API does it) or HTTP, and the
//! latency read back from the database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::{StreamExt, stream::FuturesUnordered};
use hdrhistogram::Histogram;
use herald_entities::{NotificationStatus, notification, repo};
use herald_nats::{Category, Channel, Contacts, Content, Publisher, SCHEMA_VERSION, SendCommand};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use super::{BenchArgs, Percentiles, Via};

/// Size of a typical encoded command, for the JetStream reference.
pub const TYPICAL_COMMAND_BYTES: usize = 420;
/// Rows stored and commands published per step with `--via nats`.
const CHUNK: u64 = 1_000;

/// Accepts `args.notifications` notifications spread over `args.customers` recipients.
pub async fn generate(
    args: &BenchArgs,
    db: &DatabaseConnection,
    nats_url: &str,
    base_url: &str,
) -> anyhow::Result<()> {
    match args.via {
        Via::Nats => accept_via_nats(db, nats_url, args.notifications, args.customers).await,
        Via::Http => via_http(args, base_url).await,
    }
}

fn recipient(i: u64, customers: u64) -> String {
    format!("customer-{}@bench.invalid", i % customers)
}

fn command(i: u64, customers: u64) -> SendCommand {
    SendCommand {
        v: SCHEMA_VERSION,
        notification_id: Uuid::now_v7(),
        customer_id: None,
        contacts: Contacts {
            email: Some(recipient(i, customers)),
            ..Contacts::default()
        },
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
/// `queued`, then published with the id as `Nats-Msg-Id`), in chunks with pipelined acks. Also
/// used by the reliability tests to load an engine quickly.
pub async fn accept_via_nats(
    db: &DatabaseConnection,
    nats_url: &str,
    count: u64,
    customers: u64,
) -> anyhow::Result<()> {
    let client = herald_nats::connect(nats_url, "herald-bench").await?;
    let publisher = Publisher::new(
        async_nats::jetstream::new(client),
        crate::Config::default().nats.partitions,
    );
    let mut next = 0;
    while next < count {
        let end = (next + CHUNK).min(count);
        let commands: Vec<(String, SendCommand)> = (next..end)
            .map(|i| (recipient(i, customers), command(i, customers)))
            .collect();
        let rows = commands
            .iter()
            .map(|(key, c)| herald_api::notifications::new_notification(c, key.clone(), None))
            .collect();
        repo::notifications::insert_many(db, rows).await?;
        let mut publishes: FuturesUnordered<_> = commands
            .iter()
            .map(|(key, c)| publisher.publish_command(key, c))
            .collect();
        while let Some(published) = publishes.next().await {
            published?;
        }
        next = end;
    }
    Ok(())
}

async fn via_http(args: &BenchArgs, base_url: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().build()?;
    let counter = Arc::new(AtomicU64::new(0));
    let url = format!("{base_url}/api/v1/notifications");
    let workers = (0..args.concurrency.max(1)).map(|_| {
        let http = http.clone();
        let counter = counter.clone();
        let url = url.clone();
        let (total, customers) = (args.notifications, args.customers);
        tokio::spawn(async move {
            loop {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(());
                }
                let body = serde_json::json!({
                    "recipient": { "email": recipient(i, customers) },
                    "category": "transactional",
                    "channels": ["email"],
                    "content": { "subject": format!("Your order #{i} is confirmed"), "text": "Thanks for your order." }
                });
                let response = http.post(&url).json(&body).send().await?;
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

/// Accept → sent latency over every sent notification, read in pages.
pub async fn latency_percentiles(db: &DatabaseConnection) -> anyhow::Result<Percentiles> {
    let mut histogram = Histogram::<u64>::new(3)?;
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
        let Some(last) = page.last() else { break };
        after = Some(last.0);
        for (_, created, sent) in &page {
            if let Some(sent) = sent {
                let micros = (*sent - *created).num_microseconds().unwrap_or(0).max(0) as u64;
                histogram.record(micros.max(1))?;
            }
        }
    }
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(Percentiles {
        p50: ms(0.50),
        p95: ms(0.95),
        p99: ms(0.99),
        max: histogram.max() as f64 / 1000.0,
    })
}
