//! `herald bench`: drives notifications through the real engine and measures it.
//!
//! The engine runs in this process with its production code paths; only the outside world is
//! replaced by instant sinks: an SMTP server that accepts every message, and (unless `--nats-url`
//! is given) a private `nats-server`. Notifications are accepted either like the API does it
//! (stored `queued`, then published; `--via nats`) or through the HTTP API itself (`--via http`).
//! The run ends when every notification is `sent` in the database; latency is accept → provider
//! accepted, as recorded in `created_at`/`sent_at`.
//!
//! With `--rate R --duration D` the load is open-loop instead: `R × D` notifications accepted at a
//! steady `R` per second whatever the engine does ([`open_loop`] for HTTP, where the latency of
//! every HTTP call is measured from when it was due), and the resident memory and the rate limiter
//! registry are sampled every `--sample-every` ([`memory`]): a long run of that is the soak test.

pub mod cpu;
pub mod load;
pub mod memory;
mod nats_server;
pub mod open_loop;
mod reference;
mod smtp_sink;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use herald_entities::{Checkpoints, NotificationStatus, customer, notification};
use herald_nats::{NatsAuth, NatsTls};
use indicatif::{ProgressBar, ProgressStyle};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter};
use serde::Serialize;

use crate::{Config, Herald, config::SmtpSecurity};
use cpu::{CpuReport, CpuSnapshot};
use load::LoadOutcome;
use memory::{MemoryReport, MemorySample};
use nats_server::BenchNats;
use open_loop::HttpReport;
use smtp_sink::CountingSmtpSink;

/// The reference run publishes and consumes at most this many messages (a long soak would
/// otherwise spend minutes on it).
const MAX_REFERENCE_MESSAGES: u64 = 200_000;
/// How often the run checks how many notifications are `sent`.
const POLL: Duration = Duration::from_millis(500);
/// How long a memory sample waits for the rate limiter registry's answer.
const REGISTRY_ASK_MS: u64 = 1_000;

/// How notifications enter Herald during a bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Store `queued` rows in batches and publish commands with pipelined acks.
    Nats,
    /// `POST /api/v1/notifications` with `--concurrency` clients.
    Http,
}

/// How the bench's notifications name their recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientKind {
    /// By email address in the request: nothing about the recipient is read.
    Contacts,
    /// By the id of a customer stored before the run: every delivery reads the customer, their
    /// preferences and quiet hours, as for the Router's events.
    Customers,
}

/// Options of `herald bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Notifications to send (without `--rate`).
    #[arg(short = 'n', long, default_value_t = 100_000, conflicts_with = "rate")]
    pub notifications: u64,
    /// Distinct recipients they are spread over.
    #[arg(short = 'm', long, default_value_t = 10_000)]
    pub customers: u64,
    /// How notifications name their recipients.
    #[arg(long, value_enum, default_value_t = RecipientKind::Contacts)]
    pub recipients: RecipientKind,
    /// How notifications enter Herald.
    #[arg(long, value_enum, default_value_t = Via::Nats)]
    pub via: Via,
    /// Concurrent HTTP clients with `--via http`: closed-loop workers, or with `--rate` the most
    /// requests in flight (pooled connections).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Open-loop: accept this many notifications per second, scheduled by the clock.
    #[arg(long, requires = "duration")]
    pub rate: Option<f64>,
    /// Open-loop: for this long (`30s`, `10m`); `--rate` × this many notifications.
    #[arg(long, requires = "rate", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// How often memory and the rate limiter registry are sampled with `--rate`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,
    /// Database URL (an empty database); a fresh SQLite file in a temporary folder when absent.
    #[arg(long)]
    pub database: Option<String>,
    /// NATS URL, reached with the configuration's `nats.auth` and `nats.tls`; a private
    /// nats-server (without either) is started when absent.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Skip the raw JetStream reference run.
    #[arg(long)]
    pub no_reference: bool,
    /// Write the result as JSON to this file too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the engine's Prometheus metrics at the end of the run to this file (batch sizes,
    /// attempt latencies, …: where the time went).
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// The SMTP sink waits this long before each batch of replies, as a relay across a network
    /// would (`5ms`); it answers at once by default.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub smtp_delay: Duration,
    /// SMTP connections the engine keeps open to the sink; the configuration's
    /// `channels.email.pool_size` (32 by default) unless given. With fewer connections than the
    /// 256 sends in flight, messages that find them all busy go out together, which costs less
    /// CPU per message than a connection turn each.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub smtp_connections: Option<u32>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

impl BenchArgs {
    /// Notifications the run accepts: `-n`, or `--rate` × `--duration`.
    pub fn total(&self) -> u64 {
        match (self.rate, self.duration) {
            (Some(rate), Some(duration)) => (rate * duration.as_secs_f64()).round() as u64,
            _ => self.notifications,
        }
    }
}

/// The result of a bench run.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Notifications sent.
    pub notifications: u64,
    /// Distinct recipients.
    pub customers: u64,
    /// How the notifications named them.
    pub recipient_kind: RecipientKind,
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
    /// CPU time per notification, from the first accept to the last `sent`.
    pub cpu: CpuReport,
    /// Raw JetStream publish + consume rate on the same server, messages/s.
    pub jetstream_reference_per_sec: Option<f64>,
    /// End-to-end throughput as a share of the reference.
    pub share_of_reference: Option<f64>,
    /// CPU time per message of the reference run.
    pub jetstream_reference_cpu: Option<CpuReport>,
    /// Messages the SMTP sink accepted (equals `notifications` when nothing was duplicated).
    pub smtp_accepted: u64,
    /// The HTTP calls of an open-loop `--via http --rate` run.
    pub http: Option<HttpReport>,
    /// Memory over time, for a `--rate` run.
    pub memory: Option<MemoryReport>,
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

impl Percentiles {
    /// Reads a histogram of microseconds as milliseconds.
    pub fn from_micros(histogram: &Histogram<u64>) -> Percentiles {
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            p50: ms(0.50),
            p95: ms(0.95),
            p99: ms(0.99),
            max: histogram.max() as f64 / 1000.0,
        }
    }
}

/// How long the bench's own NATS clients wait for a server that cannot be reached before the run
/// fails (a mistyped `--nats-url` should not wait forever, as `herald serve` does).
const NATS_PATIENCE: Duration = Duration::from_secs(30);

/// Runs the bench on an engine configured like `base` (the configuration file and `HERALD_*`
/// variables, e.g. `HERALD_STATUS_WRITER__MAX_BATCH`), with the endpoints and sizing of
/// `bench_config`, and prints its report.
pub async fn run(args: BenchArgs, base: Config) -> anyhow::Result<BenchReport> {
    let total = args.total();
    anyhow::ensure!(total > 0, "the run must accept at least 1 notification");
    anyhow::ensure!(args.customers > 0, "--customers must be at least 1");
    warn_about_rate_limits(&args);
    let scratch = tempfile::tempdir()?;
    let database = args
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", scratch.path().join("bench.db").display()));
    // Before anything starts: a mistaken `--database` (production's) must not be migrated nor
    // worked on by the bench's engine (its scheduler, its retention).
    ensure_empty(&database).await?;
    let own_nats = match &args.nats_url {
        Some(_) => None,
        None => Some(BenchNats::start().await?),
    };
    let nats_url = args
        .nats_url
        .clone()
        .or_else(|| own_nats.as_ref().map(|n| n.url().to_string()))
        .context("no NATS")?;
    let sink = CountingSmtpSink::start(args.smtp_delay).await?;

    let mut config = bench_config(base, &args, &nats_url, &database, sink.port());
    if own_nats.is_some() {
        // The bench's own server asks for neither a login nor TLS.
        config.nats.auth = NatsAuth::default();
        config.nats.tls = NatsTls::default();
    }
    // `--database` is checked like a configured URL (an in-memory SQLite database is refused).
    config.validate()?;
    let nats = config.nats.clone();
    let nats_pid = own_nats.as_ref().and_then(BenchNats::pid);
    if own_nats.is_none() {
        // The engine waits for its server as long as it takes; the bench does not.
        herald_nats::connect::connect_within(nats.connection("herald-bench-check"), NATS_PATIENCE)
            .await?;
    }

    let reference = if args.no_reference {
        None
    } else {
        let messages = total.min(MAX_REFERENCE_MESSAGES);
        eprintln!("reference: raw JetStream publish + consume of {messages} messages …");
        let connection = nats.connection("herald-bench-reference");
        let cpu_at_start = CpuSnapshot::now(nats_pid);
        let rate =
            reference::jetstream_rate(connection, messages, load::TYPICAL_COMMAND_BYTES).await?;
        Some((
            rate,
            cpu_at_start.report_until(&CpuSnapshot::now(nats_pid), messages),
        ))
    };

    let herald = Herald::start(config).await?;
    // The bench's inserts stand in for the API's: they leave SQLite's log to the engine's
    // checkpointer, as the engine's own pool does, and take the engine's write turns.
    let db = herald_entities::connect_with(&database, 4, Checkpoints::Background).await?;
    let gate = herald.write_gate();
    load::store_customers(&db, load::Recipients::of(&args)).await?;
    let cpu_at_start = CpuSnapshot::now(nats_pid);
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let load = {
        let args = args.clone();
        let base = format!("http://{}", herald.http_addr());
        let db = db.clone();
        tokio::spawn(async move {
            let outcome = load::generate(&args, &db, &gate, &nats, &base).await;
            outcome.map(|outcome| (outcome, started.elapsed()))
        })
    };
    let progress = await_sent(&args, &herald, &db, &sink, load, started).await?;
    let cpu = cpu_at_start.report_until(&CpuSnapshot::now(nats_pid), progress.outcome.accepted);
    let sent = load::sent_times(&db).await?;
    // The poll that noticed the end is up to `POLL` late; the last send's own time is exact.
    let seconds = sent
        .last
        .and_then(|last| (last - started_at).to_std().ok())
        .filter(|exact| !exact.is_zero())
        .map_or(progress.seconds, |exact| exact.as_secs_f64());
    if let Some(path) = &args.metrics {
        save_metrics(&format!("http://{}/metrics", herald.http_addr()), path).await?;
    }
    herald.shutdown().await?;
    let throughput = progress.outcome.accepted as f64 / seconds;
    let report = BenchReport {
        notifications: progress.outcome.accepted,
        customers: args.customers,
        recipient_kind: args.recipients,
        via: args.via,
        database: database.split(':').next().unwrap_or_default().to_string(),
        seconds,
        notifications_per_sec: throughput,
        accepted_per_sec: progress.outcome.accepted as f64 / progress.accepted_secs,
        latency_ms: sent.latency_ms,
        peak_rss_mib: memory::peak_rss_mib(),
        cpu,
        jetstream_reference_per_sec: reference.as_ref().map(|(rate, _)| *rate),
        share_of_reference: reference.as_ref().map(|(rate, _)| throughput / rate),
        jetstream_reference_cpu: reference.map(|(_, cpu)| cpu),
        smtp_accepted: sink.accepted(),
        http: progress.outcome.http,
        memory: args
            .rate
            .map(|_| MemoryReport::from_samples(progress.samples)),
    };
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(report)
}

/// Saves the engine's Prometheus exposition.
async fn save_metrics(url: &str, path: &std::path::Path) -> anyhow::Result<()> {
    let body = reqwest::get(url)
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("cannot read {url}"))?
        .text()
        .await?;
    std::fs::write(path, body).with_context(|| format!("cannot write {}", path.display()))
}

/// The transactional limit (30 a minute per recipient by default) defers whatever goes beyond it,
/// which would measure the limiter's patience rather than the engine.
fn warn_about_rate_limits(args: &BenchArgs) {
    let per_recipient = args.total() as f64 / args.customers as f64;
    let per_minute = match args.duration {
        Some(d) => per_recipient * 60.0 / d.as_secs_f64().max(1.0),
        None => per_recipient,
    };
    if per_minute > 30.0 {
        eprintln!(
            "warning: {per_minute:.0} notifications per recipient per minute exceed the default \
             transactional limit of 30; raise --customers or expect deferrals"
        );
    }
}

/// How the run went until every accepted notification was `sent`.
struct Progress {
    outcome: LoadOutcome,
    /// Load start → the poll that saw every notification sent (up to `POLL` late).
    seconds: f64,
    /// Load start → load finished.
    accepted_secs: f64,
    samples: Vec<MemorySample>,
}

/// Watches the sink's count (with a progress bar) until the load has finished and everything it
/// accepted went out, then the database until every one is recorded `sent`; with `--rate`,
/// samples memory on the way. The database is counted only at the end: no index holds `sent`
/// rows, and counting them every poll would read the whole table while the engine works.
async fn await_sent(
    args: &BenchArgs,
    herald: &Herald,
    db: &DatabaseConnection,
    sink: &CountingSmtpSink,
    mut load: tokio::task::JoinHandle<anyhow::Result<(LoadOutcome, Duration)>>,
    started: Instant,
) -> anyhow::Result<Progress> {
    let bar = progress_bar(args.total());
    let deadline =
        started + args.duration.unwrap_or_default() + Duration::from_secs(args.timeout_secs);
    let mut finished: Option<(LoadOutcome, Duration)> = None;
    let mut samples = Vec::new();
    let mut next_sample = started;
    loop {
        let mut sent = sink.accepted();
        bar.set_position(sent);
        if args.rate.is_some() && Instant::now() >= next_sample {
            samples.push(sample(herald, started, sent).await);
            next_sample += args.sample_every;
        }
        if finished.is_none() && load.is_finished() {
            finished = Some((&mut load).await.context("load task")??);
        }
        if let Some((outcome, _)) = &finished
            && sent >= outcome.accepted
        {
            sent = notification::Entity::find()
                .filter(notification::Column::Status.eq(NotificationStatus::Sent))
                .count(db)
                .await?;
        }
        if let Some((outcome, accepted_after)) =
            finished.take_if(|(outcome, _)| sent >= outcome.accepted)
        {
            bar.finish();
            return Ok(Progress {
                outcome,
                seconds: started.elapsed().as_secs_f64(),
                accepted_secs: accepted_after.as_secs_f64(),
                samples,
            });
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out with {sent} of {} sent after {:.0} s (peak RSS {:.0} MiB)",
            args.total(),
            started.elapsed().as_secs_f64(),
            memory::peak_rss_mib()
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn sample(herald: &Herald, started: Instant, sent: u64) -> MemorySample {
    let users = match herald.rate_limiter() {
        Some(registry) => ractor::call_t!(
            registry,
            herald_actors::rate_limit::supervisor::RateLimiterSupervisorMsg::Users,
            REGISTRY_ASK_MS
        )
        .ok(),
        None => None,
    };
    MemorySample {
        at_secs: started.elapsed().as_secs_f64(),
        rss_mib: memory::current_rss_mib(),
        rate_limiter_users: users,
        sent,
    }
}

/// Refuses a database that holds anything: one with tables is either another program's or a
/// Herald database, which must hold no notification and no customer (an empty one left by an
/// earlier bench run is fine). Reads only; a new SQLite file is created.
async fn ensure_empty(database: &str) -> anyhow::Result<()> {
    crate::app::ensure_sqlite_dir(database)?;
    let shown = crate::app::redact(database);
    let db = herald_entities::connect_with(database, 1, Checkpoints::OnCommit)
        .await
        .with_context(|| format!("cannot open database {shown}"))?;
    let holds = what_it_holds(&db).await;
    db.close().await.ok();
    match holds.with_context(|| format!("cannot read what database {shown} holds"))? {
        Holds::Nothing => Ok(()),
        Holds::Herald {
            notifications: 0,
            customers: 0,
        } => Ok(()),
        Holds::Herald {
            notifications,
            customers,
        } => anyhow::bail!(
            "the bench needs an empty database; {shown} holds {notifications} notifications and \
             {customers} customers"
        ),
        Holds::Other(tables) => anyhow::bail!(
            "the bench needs an empty database; {shown} holds {tables} tables, and is not a \
             Herald database"
        ),
    }
}

/// What a database holds.
enum Holds {
    /// No table at all.
    Nothing,
    /// Herald's tables, with this many notifications and customers.
    Herald { notifications: u64, customers: u64 },
    /// This many tables, not Herald's.
    Other(i64),
}

async fn what_it_holds(db: &DatabaseConnection) -> anyhow::Result<Holds> {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};

    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Sqlite => "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table'",
        _ => {
            "SELECT count(*) AS n FROM information_schema.tables \
             WHERE table_schema = current_schema()"
        }
    };
    let tables: i64 = db
        .query_one_raw(Statement::from_string(backend, sql))
        .await?
        .context("no table count")?
        .try_get("", "n")?;
    if tables == 0 {
        return Ok(Holds::Nothing);
    }
    let notifications = notification::Entity::find().count(db).await;
    let customers = customer::Entity::find().count(db).await;
    Ok(match (notifications, customers) {
        (Ok(notifications), Ok(customers)) => Holds::Herald {
            notifications,
            customers,
        },
        _ => Holds::Other(tables),
    })
}

/// `base` pointed at the bench's NATS, database and SMTP sink, sized for throughput, without API
/// authentication.
fn bench_config(
    base: Config,
    args: &BenchArgs,
    nats_url: &str,
    database: &str,
    smtp_port: u16,
) -> Config {
    let mut config = base;
    config.http.bind = "127.0.0.1:0".into();
    // A name of its own in the lease bucket (the configured one belongs to a running instance),
    // and no provider the bench does not measure: their sends would go to real services.
    config.cluster.instance = None;
    config.channels.telegram = None;
    config.channels.sms = None;
    config.channels.push = None;
    config.channels.webhook = None;
    config.nats.url = nats_url.into();
    config.database.url = database.into();
    config.database.max_connections = 8;
    config.channels.email.smtp_host = Some("127.0.0.1".into());
    config.channels.email.smtp_port = Some(smtp_port);
    config.channels.email.security = SmtpSecurity::None;
    // The sink is not the configured mail server: its credentials would only make lettre try AUTH.
    config.channels.email.username = None;
    config.channels.email.password = None;
    // More work in flight than the defaults (64 sends per provider, 1,024 commands), which keep
    // the engine below the machine's limit (README, *Performance*).
    config.channels.limits.concurrency = 256;
    config.dispatch.max_in_flight = 4_096;
    if let Some(connections) = args.smtp_connections {
        config.channels.email.pool_size = connections;
    }
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

fn print_report(r: &BenchReport) {
    println!(
        "notifications      {} for {} recipients ({}) via {:?} on {}",
        r.notifications,
        r.customers,
        r.recipient_kind
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string()),
        r.via,
        r.database
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
    println!("CPU (µs/notif.)    {}", describe_cpu(&r.cpu));
    if let (Some(reference), Some(share)) = (r.jetstream_reference_per_sec, r.share_of_reference) {
        println!(
            "JetStream raw      {reference:.0} msg/s publish+consume; Herald reaches {:.0}%",
            share * 100.0
        );
    }
    if let Some(cpu) = &r.jetstream_reference_cpu {
        println!("  CPU (µs/msg)     {}", describe_cpu(cpu));
    }
    println!("SMTP sink accepted {}", r.smtp_accepted);
    if let Some(http) = &r.http {
        println!("HTTP calls         {}", open_loop::describe(http));
        println!(
            "HTTP latency (ms)  p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}",
            http.latency_ms.p50, http.latency_ms.p95, http.latency_ms.p99, http.latency_ms.max
        );
    }
    if let Some(memory) = &r.memory {
        print_memory(memory);
    }
}

fn describe_cpu(cpu: &CpuReport) -> String {
    let micros = |us: Option<f64>| us.map_or_else(|| "-".to_string(), |us| format!("{us:.0}"));
    let percent = |share: Option<f64>| {
        share.map_or_else(|| "-".to_string(), |share| format!("{:.0}%", share * 100.0))
    };
    format!(
        "this process {}, nats-server {}, machine {} (busy {}, steal {})",
        micros(cpu.process_us),
        micros(cpu.nats_server_us),
        micros(cpu.machine_us),
        percent(cpu.machine_busy),
        percent(cpu.machine_steal)
    )
}

fn print_memory(m: &MemoryReport) {
    println!("memory over time   seconds   RSS MiB   limiter users      sent");
    for s in &m.samples {
        let users = s
            .rate_limiter_users
            .map_or_else(|| "-".to_string(), |u| u.to_string());
        println!(
            "                   {:>7.1}   {:>7}   {users:>13}   {:>7}",
            s.at_secs,
            s.rss_mib
                .map_or_else(|| "-".to_string(), |rss| format!("{rss:.1}")),
            s.sent
        );
    }
    let verdict = match m.plateaued {
        Some(true) => "plateaued",
        Some(false) => "still growing",
        None => "too few samples to tell",
    };
    println!(
        "memory verdict     {verdict} (late growth {:+.1} MiB)",
        m.late_growth_mib
    );
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn the_bench_config_drops_the_instance_name_and_the_other_providers() {
        let base: Config = toml::from_str(
            r#"
            [cluster]
            instance = "production-1"
            [channels.telegram]
            bot_token = "t"
            [channels.sms]
            account_sid = "AC1"
            auth_token = "t"
            from = "+15005550006"
            [channels.push]
            project_id = "p"
            access_token = "t"
            [channels.webhook]
            secret = "whsec_x"
            "#,
        )
        .expect("a base configuration");
        assert!(base.channels.sms.is_some() && base.cluster.instance.is_some());
        let args = Cli::parse_from(["bench"]).bench;
        let config = bench_config(base, &args, "nats://127.0.0.1:1", "sqlite://b.db", 2525);
        assert_eq!(config.cluster.instance, None);
        assert!(config.channels.telegram.is_none());
        assert!(config.channels.sms.is_none());
        assert!(config.channels.push.is_none());
        assert!(config.channels.webhook.is_none());
        assert_eq!(config.channels.email.smtp_port, Some(2525));
    }
}
