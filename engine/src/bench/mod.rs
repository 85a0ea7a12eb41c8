//! `herald bench`: drives notifications through the real engine and measures it.
//!
//! The engine runs in this process with its production code paths; only the outside world is
//! replaced by instant sinks: an SMTP server that accepts every message, and (unless `--nats-url`
//! is given) a private `nats-server`. Notifications are accepted either like the API does it
//! (stored `queued`, then published; `--via nats`) or through the HTTP API itself (`--via http`).
//! The run ends when every notification is `sent` in the database; latency is accept → provider
//! accepted, as recorded in `created_at`/`sent_at`.

pub mod load;
mod nats_server;
mod reference;
mod smtp_sink;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use herald_entities::{NotificationStatus, notification};
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use serde::Serialize;

use crate::{Config, Herald, config::SmtpSecurity};
use nats_server::BenchNats;
use smtp_sink::CountingSmtpSink;

/// How notifications enter Herald during a bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Store `queued` rows in batches and publish commands with pipelined acks.
    Nats,
    /// `POST /api/v1/notifications` with `--concurrency` clients.
    Http,
}

/// Options of `herald bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Notifications to send.
    #[arg(short = 'n', long, default_value_t = 100_000)]
    pub notifications: u64,
    /// Distinct recipients they are spread over.
    #[arg(short = 'm', long, default_value_t = 10_000)]
    pub customers: u64,
    /// How notifications enter Herald.
    #[arg(long, value_enum, default_value_t = Via::Nats)]
    pub via: Via,
    /// Concurrent HTTP clients (with `--via http`).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Database URL; a fresh SQLite file in a temporary folder when absent.
    #[arg(long)]
    pub database: Option<String>,
    /// NATS URL; a private nats-server is started when absent.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Skip the raw JetStream reference run.
    #[arg(long)]
    pub no_reference: bool,
    /// Write the result as JSON to this file too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

/// The result of a bench run.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Notifications sent.
    pub notifications: u64,
    /// Distinct recipients.
    pub customers: u64,
    /// How they entered.
    pub via: Via,
    /// `sqlite` or `postgres`.
    pub database: String,
    /// Seconds from the first accept to the last `sent` persisted.
    pub seconds: f64,
    /// End-to-end throughput.
    pub notifications_per_sec: f64,
    /// Accept rate alone.
    pub accepted_per_sec: f64,
    /// Accept → sent latency percentiles in milliseconds.
    pub latency_ms: Percentiles,
    /// Peak resident memory of this process (engine, sinks and load generator), MiB.
    pub peak_rss_mib: f64,
    /// Raw JetStream publish + consume rate on the same server, messages/s.
    pub jetstream_reference_per_sec: Option<f64>,
    /// End-to-end throughput as a share of the reference.
    pub share_of_reference: Option<f64>,
    /// Messages the SMTP sink accepted (equals `notifications` when nothing was duplicated).
    pub smtp_accepted: u64,
}

/// Latency percentiles.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th.
    pub p95: f64,
    /// 99th.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

/// Runs the bench and prints its report.
pub async fn run(args: BenchArgs) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(args.notifications > 0, "--notifications must be at least 1");
    anyhow::ensure!(args.customers > 0, "--customers must be at least 1");
    let own_nats = match &args.nats_url {
        Some(_) => None,
        None => Some(BenchNats::start().await?),
    };
    let nats_url = args
        .nats_url
        .clone()
        .or_else(|| own_nats.as_ref().map(|n| n.url().to_string()))
        .context("no NATS")?;
    let scratch = tempfile::tempdir()?;
    let database = args
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", scratch.path().join("bench.db").display()));
    let sink = CountingSmtpSink::start().await?;

    let reference = if args.no_reference {
        None
    } else {
        eprintln!(
            "reference: raw JetStream publish + consume of {} messages …",
            args.notifications
        );
        Some(
            reference::jetstream_rate(&nats_url, args.notifications, load::TYPICAL_COMMAND_BYTES)
                .await?,
        )
    };

    let herald = Herald::start(bench_config(&nats_url, &database, sink.port())).await?;
    let db = herald_entities::connect(&database, 4).await?;
    let started = Instant::now();
    let bar = progress_bar(args.notifications);
    let load = {
        let args = args.clone();
        let base = format!("http://{}", herald.http_addr());
        let db = db.clone();
        let nats_url = nats_url.clone();
        tokio::spawn(async move { load::generate(&args, &db, &nats_url, &base).await })
    };
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut accepted_after = None;
    loop {
        let sent = notification::Entity::find()
            .filter(notification::Column::Status.eq(NotificationStatus::Sent))
            .count(&db)
            .await?;
        bar.set_position(sent);
        if accepted_after.is_none() && load.is_finished() {
            accepted_after = Some(started.elapsed());
        }
        if sent >= args.notifications {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out with {sent} of {} sent",
            args.notifications
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish();
    load.await??;
    let accepted_secs = accepted_after.unwrap_or(started.elapsed()).as_secs_f64();
    let latency_ms = load::latency_percentiles(&db).await?;
    herald.shutdown().await?;
    let throughput = args.notifications as f64 / seconds;
    let report = BenchReport {
        notifications: args.notifications,
        customers: args.customers,
        via: args.via,
        database: database.split(':').next().unwrap_or_default().to_string(),
        seconds,
        notifications_per_sec: throughput,
        accepted_per_sec: args.notifications as f64 / accepted_secs,
        latency_ms,
        peak_rss_mib: peak_rss_mib(),
        jetstream_reference_per_sec: reference,
        share_of_reference: reference.map(|r| throughput / r),
        smtp_accepted: sink.accepted(),
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

fn bench_config(nats_url: &str, database: &str, smtp_port: u16) -> Config {
    let mut config = Config::default();
    config.http.bind = "127.0.0.1:0".into();
    config.nats.url = nats_url.into();
    config.database.url = database.into();
    config.database.max_connections = 8;
    config.channels.email.smtp_host = Some("127.0.0.1".into());
    config.channels.email.smtp_port = Some(smtp_port);
    config.channels.email.security = SmtpSecurity::None;
    config.channels.email.pool_size = 32;
    config.channels.limits.concurrency = 256;
    config.dispatch.max_in_flight = 4_096;
    // `--via http` measures the pipeline; a verified key costs one cached SHA-256 per request.
    config.auth.enabled = false;
    config
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} sent ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// Peak resident set size of this process (Linux `VmHWM`), MiB; 0 where unknown.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn print_report(r: &BenchReport) {
    println!(
        "notifications      {} for {} recipients via {:?} on {}",
        r.notifications, r.customers, r.via, r.database
    );
    println!(
        "end to end         {:.0} notifications/s ({:.2} s)",
        r.notifications_per_sec, r.seconds
    );
    println!(
        "accepted           {:.0} notifications/s",
        r.accepted_per_sec
    );
    println!(
        "latency (ms)       p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
        r.latency_ms.p50, r.latency_ms.p95, r.latency_ms.p99, r.latency_ms.max
    );
    println!("peak RSS           {:.0} MiB", r.peak_rss_mib);
    if let (Some(reference), Some(share)) = (r.jetstream_reference_per_sec, r.share_of_reference) {
        println!(
            "JetStream raw      {reference:.0} msg/s publish+consume; Herald reaches {:.0}%",
            share * 100.0
        );
    }
    println!("SMTP sink accepted {}", r.smtp_accepted);
}
