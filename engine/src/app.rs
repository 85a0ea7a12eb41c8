//! Wiring: connects the database and NATS, provisions streams, starts the actor tree and the HTTP
//! server, and shuts them down in the order that loses nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use herald_actors::{
    channel::{
        ChannelArgs, ChannelDirectory, Provider,
        announce::CircuitAnnouncer,
        email::EmailProvider,
        push::PushProvider,
        sms::SmsProvider,
        telegram::TelegramProvider,
        webhook::{WebhookConfig, WebhookProvider},
    },
    delivery::DeliveryContext,
    dispatcher::{DispatcherArgs, DispatcherMsg, PartitionDeliveries},
    engine_supervisor::{EngineArgs, EngineSupervisor},
    partitions::{LeaseDeadlines, LeaseKeeperArgs, LeaseKeeperMsg, OwnershipView},
    rules::Rule,
    slot::ActorSlot,
    status_writer::{PUBLISH_WAIT, StatusWriterArgs, StatusWriterMsg},
    templates::runtime::RuntimeTemplates,
};
use herald_api::AppState;
use herald_entities::repo::{self, insert_queue::InsertQueue};
use herald_entities::{Checkpointer, Checkpoints, WriteGate};
use herald_nats::{Channel, Publisher, StreamSettings};
use metrics_exporter_prometheus::PrometheusHandle;
use poem::listener::{Acceptor, Listener, TcpListener};
use ractor::{Actor, ActorRef};
use sea_orm::DatabaseConnection;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::migration_lock::MigrationLock;

/// How long a shutdown waits, at its end, for NATS to take what the client still buffers.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// A running Herald: HTTP server and engine.
pub struct Herald {
    http_addr: SocketAddr,
    http_stop: CancellationToken,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
    engine: Engine,
    nats: async_nats::Client,
    /// The turn the engine's batch writers take on SQLite.
    gate: WriteGate,
    /// Checkpoints the SQLite log while Herald runs (`None` on PostgreSQL).
    _checkpointer: Option<Checkpointer>,
}

struct Engine {
    supervisor: ActorRef<()>,
    /// Cancelled once the supervisor has stopped, whether asked to or not.
    stopped: CancellationToken,
    intake: CancellationToken,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    status_writer: ActorSlot<StatusWriterMsg>,
    dispatcher: ActorSlot<DispatcherMsg>,
    channels: ChannelDirectory,
    /// The configured providers by name, with their channel.
    providers: Arc<HashMap<String, Channel>>,
    grace: Duration,
    rate_limiter: ActorSlot<herald_actors::rate_limit::supervisor::RateLimiterSupervisorMsg>,
    scheduler: ActorSlot<herald_actors::scheduler::SchedulerMsg>,
    lease_keeper: ActorSlot<LeaseKeeperMsg>,
    ownership: OwnershipView,
}

/// Installs the process-wide rustls crypto provider (ring; see STACK.md), unless one is:
/// reqwest and lettre are compiled without one.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may install it meanwhile; either one does.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Installs process-wide things once: the rustls crypto provider ([`install_crypto_provider`])
/// and the Prometheus recorder (with the histogram buckets of [`crate::prometheus::builder`]).
pub fn process_init() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            install_crypto_provider();
            let recorder = crate::prometheus::builder()
                .expect("the histogram bucket constants are not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed by an embedding program; ours then stays unused.
            let _ = metrics::set_global_recorder(recorder);
            crate::prometheus::spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// Opens the database and applies pending migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<DatabaseConnection> {
    let lock = MigrationLock::acquire(&config.database.url).await?;
    let db = open(config, Checkpoints::OnCommit).await?;
    apply_migrations(lock, &db).await?;
    Ok(db)
}

/// Applies pending migrations holding the database's [`MigrationLock`], taken before the database
/// was opened (two processes creating one SQLite file at once could find it locked), so that
/// instances starting together apply each migration once; then gives the lock back.
async fn apply_migrations(lock: MigrationLock, db: &DatabaseConnection) -> anyhow::Result<()> {
    let applied = crate::migration_lock::apply_giving_way(lock.session().unwrap_or(db))
        .await
        .context("cannot apply migrations");
    lock.release().await;
    applied
}

/// Opens the database (creating an SQLite file's directory), without migrating it.
async fn open(config: &Config, checkpoints: Checkpoints) -> anyhow::Result<DatabaseConnection> {
    ensure_sqlite_dir(&config.database.url)?;
    herald_entities::connect_with(
        &config.database.url,
        config.database.max_connections,
        checkpoints,
    )
    .await
    .with_context(|| format!("cannot open database {}", redact(&config.database.url)))
}

impl Herald {
    /// Starts everything; returns once Herald serves HTTP and consumes commands.
    pub async fn start(config: Config) -> anyhow::Result<Herald> {
        let metrics = process_init();
        // First, so that an address in use stops the start before anything is provisioned or
        // leased: the engine takes partitions from the running instances as it starts. Served
        // once the engine runs; connections meanwhile wait in the listen queue.
        let acceptor = TcpListener::bind(config.http.bind.clone())
            .into_acceptor()
            .await
            .with_context(|| format!("cannot listen on {}", config.http.bind))?;
        if config.database.migrate_on_start {
            // On a pool of their own, which checkpoints SQLite's log as it commits.
            migrate(&config).await?.close().await?;
        }
        // SQLite's log is checkpointed by a task of its own, not inside the engine's commits
        // (on PostgreSQL there is neither the log nor the task).
        let db = open(&config, Checkpoints::Background).await?;
        let gate = WriteGate::for_url(&config.database.url);
        let checkpointer = Checkpointer::start(&config.database.url, gate.clone())
            .await
            .context("cannot start the SQLite checkpointer")?;
        let nats = herald_nats::connect(config.nats.connection("herald"))
            .await
            .context("cannot connect to NATS")?;
        if let Some(warning) =
            herald_nats::connect::max_payload_warning(nats.server_info().max_payload)
        {
            tracing::warn!("{warning}");
        }
        let js = async_nats::jetstream::new(nats.clone());
        let provisioned = herald_nats::provision(&js, &stream_settings(&config))
            .await
            .context("cannot provision JetStream")?;
        herald_nats::check_command_partitions(&js, config.nats.partitions).await?;
        let publisher = Publisher::new(js.clone(), config.nats.partitions);
        let instance = config.cluster.instance_name();
        let leases = herald_nats::LeaseTable::open(
            &js,
            &instance,
            Duration::from_millis(config.cluster.lease_ttl_ms),
            config.nats.replicas,
            config.nats.partitions,
        )
        .await
        .context("cannot open the partition lease bucket")?;
        tracing::info!(%instance, "joining as cluster member");

        let writers = herald_entities::connect_gated_writers(
            &db,
            &config.database.url,
            Checkpoints::Background,
        )
        .await
        .context("cannot open the database for the insert queue and the claims")?;
        // One writer for new notifications, shared by the API and the Router (group commit), and
        // the dispatcher's claims, on the same connection.
        let inserts = InsertQueue::start(writers.clone(), gate.clone());
        let storage = Storage {
            db: db.clone(),
            claims: herald_actors::lookup::claims(writers, gate.clone()),
            inserts: inserts.clone(),
            gate: gate.clone(),
        };
        let engine = start_engine(
            &config,
            storage,
            publisher.clone(),
            provisioned,
            leases,
            nats.clone(),
        )
        .await?;
        let auth = Arc::new(herald_api::auth::KeyVerifier::new(
            db.clone(),
            config.auth.settings(),
        ));
        if !config.auth.enabled {
            tracing::warn!("API authentication is disabled: every request acts as admin");
        }
        let state = AppState {
            auth,
            db,
            inserts,
            publisher,
            engine: Arc::new(crate::engine_view::LiveEngine {
                channels: engine.channels.clone(),
                ownership: engine.ownership.clone(),
                stopped: engine.stopped.clone(),
            }),
            providers: engine.providers.clone(),
            allow_private_webhook_targets: config
                .channels
                .webhook
                .as_ref()
                .is_some_and(|w| w.allow_private_targets),
            default_chains: Arc::new(config.default_chains()?),
            configured_channels: Arc::new(
                Channel::ALL
                    .into_iter()
                    .filter(|c| config.channels.configured(*c))
                    .collect(),
            ),
            metrics: Some(metrics),
            templates: Arc::new(crate::template_catalog::EngineTemplates {
                settings: config.templates.settings(),
            }),
            dashboard: Arc::new(
                config
                    .dashboard
                    .settings(config.http.public_url.as_deref())?,
            ),
            twilio_status: config.channels.sms.as_ref().and_then(|sms| {
                let url = sms.status_callback_url.clone()?;
                Some(Arc::new(herald_api::twilio::StatusCallbacks::new(
                    url,
                    sms.auth_token.clone(),
                )))
            }),
            retention: (config.scheduler.retention_days > 0)
                .then(|| chrono::Duration::days(i64::from(config.scheduler.retention_days))),
            events_max_age: (config.nats.retention.events.max_age_secs > 0).then(|| {
                let max_age = config.nats.retention.events.limits().max_age;
                chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX)
            }),
        };
        let http_addr = acceptor
            .local_addr()
            .first()
            .and_then(|a| a.as_socket_addr().copied())
            .context("listener has no TCP address")?;
        let public_url = config
            .http
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{http_addr}"));
        let app = herald_api::app(state, &public_url);
        let http_stop = CancellationToken::new();
        let stop = http_stop.clone();
        let http_task = tokio::spawn(async move {
            poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    app,
                    stop.cancelled_owned(),
                    Some(Duration::from_secs(10)),
                )
                .await
        });
        Ok(Herald {
            http_addr,
            http_stop,
            http_task,
            engine,
            nats,
            gate,
            _checkpointer: checkpointer,
        })
    }

    /// Resolves once the engine (the actor tree) has stopped. Before [`Herald::shutdown`] that is a
    /// failure: nothing delivers any more, and `herald serve` exits with an error for the process
    /// supervisor to restart it; `/health/ready` answers 503 meanwhile.
    pub async fn engine_stopped(&self) {
        self.engine.stopped.cancelled().await;
    }

    /// The HTTP address Herald listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The turn the engine's batch writers take on SQLite, for another writer in this process
    /// (the bench's inserts) to take too.
    pub fn write_gate(&self) -> WriteGate {
        self.gate.clone()
    }

    /// The live channel actors (for introspection and fault injection).
    pub fn channels(&self) -> &ChannelDirectory {
        &self.engine.channels
    }

    /// The live dispatcher (for fault injection).
    pub fn dispatcher(&self) -> Option<ActorRef<DispatcherMsg>> {
        self.engine.dispatcher.get()
    }

    /// The live partition lease keeper (for fault injection).
    pub fn lease_keeper(&self) -> Option<ActorRef<LeaseKeeperMsg>> {
        self.engine.lease_keeper.get()
    }

    /// The live rate limiter registry (for introspection and fault injection).
    pub fn rate_limiter(
        &self,
    ) -> Option<ActorRef<herald_actors::rate_limit::supervisor::RateLimiterSupervisorMsg>> {
        self.engine.rate_limiter.get()
    }

    /// The live scheduler (to run a round now).
    pub fn scheduler(&self) -> Option<ActorRef<herald_actors::scheduler::SchedulerMsg>> {
        self.engine.scheduler.get()
    }

    /// Stops in the order that loses nothing: HTTP stops taking requests and finishes the ones in
    /// progress while the dispatcher stops pulling (what is published meanwhile waits in
    /// JetStream); in-flight deliveries get the grace period, counted from the signal, to finish
    /// (those that do not are redelivered by JetStream, never acked unwritten); the status writer
    /// flushes and publishes the status events of what it wrote (for
    /// [`herald_actors::status_writer::PUBLISH_WAIT`] at most); the actors stop; NATS flushes.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + self.engine.grace;
        self.http_stop.cancel();
        self.engine.intake.cancel();
        match self.http_task.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "HTTP server stopped with an error"),
            Err(err) => tracing::warn!(error = %err, "HTTP server task failed"),
        }
        let permits = u32::try_from(self.engine.max_in_flight).unwrap_or(u32::MAX);
        match tokio::time::timeout_at(deadline, self.engine.in_flight.acquire_many(permits)).await {
            Ok(_) => tracing::info!("in-flight deliveries finished"),
            Err(_) => tracing::warn!(
                unfinished = self.engine.max_in_flight - self.engine.in_flight.available_permits(),
                "grace period over; unfinished deliveries will be redelivered"
            ),
        }
        if let Some(writer) = self.engine.status_writer.get() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let flushed = writer
                .call(
                    StatusWriterMsg::Flush,
                    // The flush waits for the status events to be published, within its own bound.
                    Some(left.max(Duration::from_secs(1)) + PUBLISH_WAIT),
                )
                .await;
            if !matches!(flushed, Ok(ractor::rpc::CallResult::Success(()))) {
                tracing::warn!("status writer did not flush in time");
            }
        }
        // Everything pulled is written and acked (or handed back): give the partitions to the
        // other instances now rather than after the lease TTL.
        if let Some(keeper) = self.engine.lease_keeper.get() {
            let left = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .max(Duration::from_secs(2));
            if !matches!(
                keeper.call(LeaseKeeperMsg::Leave, Some(left)).await,
                Ok(ractor::rpc::CallResult::Success(()))
            ) {
                tracing::warn!("partition leases not handed back; they expire");
            }
        }
        self.engine
            .supervisor
            .stop_and_wait(Some("shutdown".into()), Some(Duration::from_secs(5)))
            .await
            .ok();
        // Bounded: while NATS is unreachable the client is reconnecting and answers no flush.
        match tokio::time::timeout(FINAL_FLUSH, self.nats.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "NATS connection not flushed"),
            Err(_) => tracing::warn!(
                "NATS connection not flushed within {FINAL_FLUSH:?} (server unreachable?); stopping anyway"
            ),
        }
        tracing::info!("herald stopped");
        Ok(())
    }
}

/// The engine's database: its pool, the two writers that take turns on a pool of their own (see
/// [`herald_entities::connect_gated_writers`]), the dispatcher's claims and the writer of new
/// notifications, and the turns.
struct Storage {
    db: DatabaseConnection,
    claims: herald_actors::lookup::ClaimLookup,
    inserts: InsertQueue,
    gate: WriteGate,
}

async fn start_engine(
    config: &Config,
    storage: Storage,
    publisher: Publisher,
    consumers: herald_nats::Provisioned,
    leases: herald_nats::LeaseTable,
    nats: async_nats::Client,
) -> anyhow::Result<Engine> {
    let Storage {
        db,
        claims,
        inserts,
        gate,
    } = storage;
    let announcer = CircuitAnnouncer::new(nats.clone(), leases.instance().to_string());
    let channels = ChannelDirectory::default();
    let status_writer = ActorSlot::default();
    let dispatcher = ActorSlot::default();
    let intake = CancellationToken::new();
    let max_in_flight = config.dispatch.max_in_flight;
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let rate_limiter = ActorSlot::default();
    let scheduler = ActorSlot::default();
    let lease_keeper = ActorSlot::default();
    let ownership = OwnershipView::default();
    let deadlines = LeaseDeadlines::default();
    let rate_limits = Arc::new(config.rate_limits()?);
    let providers = providers(config)?;
    let provider_names: Arc<HashMap<String, Channel>> = Arc::new(
        providers
            .iter()
            .map(|p| (p.name().to_string(), p.channel()))
            .collect(),
    );
    // One cache of runtime templates for the router and the dispatcher.
    let templates = Arc::new(RuntimeTemplates::new(
        db.clone(),
        config.templates.settings(),
    ));
    let context = Arc::new(DeliveryContext {
        claims,
        recipients: herald_actors::lookup::recipients(db.clone()),
        contact_holders: herald_actors::lookup::contact_holders(db.clone()),
        in_flight: herald_actors::lease::InFlight::default(),
        db: db.clone(),
        publisher: publisher.clone(),
        channels: channels.clone(),
        status_writer: status_writer.clone(),
        retry: config.dispatch.retry,
        waiting: herald_actors::waiting::WaitingRoom::new(publisher.jetstream().clone()),
        schedule_deferrals_after: Duration::from_secs(
            config.dispatch.schedule_deferrals_after_secs,
        ),
        policy: herald_actors::policy::PolicyContext {
            rate_limiter: rate_limiter.clone(),
            limits: rate_limits.clone(),
            ask_timeout: Duration::from_millis(config.rate_limiter.ask_timeout_ms),
            clock: herald_actors::policy::system_clock(),
        },
        templates: templates.clone(),
        progress_every: Some(Duration::from_secs(config.nats.ack_wait_secs) / 3),
        newer_version: herald_actors::delivery::NewerVersionHold {
            delay: Duration::from_millis(config.dispatch.newer_version_delay_ms),
            max_deliveries: config.dispatch.newer_version_max_deliveries,
        },
    });
    let router = router_args(
        config,
        &db,
        inserts,
        templates,
        &publisher,
        consumers.router,
        &intake,
    )
    .await?;
    let publisher_js = publisher.jetstream().clone();
    let command_partitions = publisher.command_partitions().clone();
    let outbox_relay = herald_actors::outbox_relay::OutboxRelayArgs {
        db: db.clone(),
        publisher: publisher.clone(),
        settings: Default::default(),
    };
    let drain_timeout = Duration::from_secs(config.dispatch.shutdown_grace_secs);
    let args = EngineArgs {
        router,
        router_slot: ActorSlot::default(),
        outbox_relay,
        rate_limiter: herald_actors::rate_limit::supervisor::RateLimiterSupervisorArgs {
            limits: rate_limits,
            settings: config.rate_limiter,
            clock: Arc::new(std::time::Instant::now),
            history: Some(Arc::new(herald_actors::rate_limit::DbSendHistory::new(
                db.clone(),
            ))),
            // Reservations kept per user: the slots within the longest hold in JetStream,
            // plus a burst per `defer` category (a slot beyond the hold is reserved too).
            reserve_within: Duration::from_secs(config.dispatch.schedule_deferrals_after_secs),
        },
        rate_limiter_slot: rate_limiter.clone(),
        scheduler: herald_actors::scheduler::SchedulerArgs {
            db: db.clone(),
            publisher: publisher.clone(),
            settings: config.scheduler,
            clock: herald_actors::policy::system_clock(),
            write_gate: gate.clone(),
            // Without a webhook channel no secret signs; stored ones are forgotten as by default.
            webhook_rotation_grace_secs: config
                .channels
                .webhook
                .as_ref()
                .map_or(WebhookConfig::default().rotation_grace_secs, |webhook| {
                    webhook.rotation_grace_secs
                }),
        },
        scheduler_slot: scheduler.clone(),
        status_writer: StatusWriterArgs {
            database_url: config.database.url.clone(),
            checkpoints: Checkpoints::Background,
            gate,
            publisher,
            settings: config.status_writer,
        },
        status_writer_slot: status_writer.clone(),
        channels: providers
            .into_iter()
            .map(|provider| {
                ChannelArgs::new(provider, config.channels.limits, Some(announcer.clone()))
            })
            .collect(),
        directory: channels.clone(),
        dispatcher: DispatcherArgs {
            js: publisher_js,
            streams: stream_settings(config),
            context,
            in_flight: in_flight.clone(),
            intake: intake.clone(),
            drain_timeout,
            pull_batch: (config.dispatch.max_in_flight / config.nats.partitions.max(1) as usize)
                .clamp(8, 200),
            leases: deadlines.clone(),
            deliveries: PartitionDeliveries::default(),
        },
        dispatcher_slot: dispatcher.clone(),
        lease_keeper: LeaseKeeperArgs {
            table: leases,
            partitions: command_partitions,
            ttl: Duration::from_millis(config.cluster.lease_ttl_ms),
            dispatcher: dispatcher.clone(),
            drain_timeout,
            rate_limiter: rate_limiter.clone(),
            ownership: ownership.clone(),
            intake: intake.clone(),
            deadlines,
        },
        lease_keeper_slot: lease_keeper.clone(),
    };
    let instance = args.lease_keeper.table.instance().to_string();
    let (supervisor, handle) = Actor::spawn(None, EngineSupervisor, args)
        .await
        .context("cannot start the actor tree")?;
    // The supervisor's children stop with it: nothing would deliver any more.
    let stopped = CancellationToken::new();
    let watch = stopped.clone();
    tokio::spawn(async move {
        let _ = handle.await;
        watch.cancel();
    });
    tokio::spawn(herald_actors::channel::announce::listen(
        nats,
        instance,
        channels.clone(),
        intake.clone(),
    ));
    Ok(Engine {
        lease_keeper,
        ownership,
        rate_limiter,
        scheduler,
        supervisor,
        stopped,
        intake,
        in_flight,
        max_in_flight,
        status_writer,
        dispatcher,
        channels,
        providers: provider_names,
        grace: Duration::from_secs(config.dispatch.shutdown_grace_secs),
    })
}

/// Events routed at once by this instance.
const ROUTER_IN_FLIGHT: usize = 256;

/// The Router's arguments: the `herald-router` consumer, the rules in force (warning of those
/// whose template does not exist yet) and the default chains.
async fn router_args(
    config: &Config,
    db: &DatabaseConnection,
    inserts: InsertQueue,
    templates: Arc<RuntimeTemplates>,
    publisher: &Publisher,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    intake: &CancellationToken,
) -> anyhow::Result<herald_actors::router::RouterArgs> {
    let rules = config.routing_rules()?;
    warn_of_missing_templates(db, &rules).await;
    let context = herald_actors::router::RouterContext {
        db: db.clone(),
        inserts,
        publisher: publisher.clone(),
        rules,
        templates,
        default_chains: config.default_chains()?,
        retry: config.dispatch.retry,
        waiting: herald_actors::waiting::WaitingRoom::new(publisher.jetstream().clone()),
    };
    Ok(herald_actors::router::RouterArgs {
        consumer,
        js: publisher.jetstream().clone(),
        streams: stream_settings(config),
        context: Arc::new(context),
        in_flight: Arc::new(Semaphore::new(ROUTER_IN_FLIGHT)),
        intake: intake.clone(),
    })
}

/// Warns of each enabled rule whose template is neither compiled nor stored: its events are
/// dead-lettered until the runtime template is created.
async fn warn_of_missing_templates(db: &DatabaseConnection, rules: &[Rule]) {
    let runtime = rules
        .iter()
        .filter(|rule| rule.enabled && herald_actors::templates::find(&rule.template).is_none());
    for rule in runtime {
        match repo::templates::variants(db, &rule.template).await {
            Ok(variants) if variants.is_empty() => tracing::warn!(
                rule = %rule.name,
                template = %rule.template,
                "the rule names a template that is neither compiled nor stored; its events are \
                 dead-lettered until the template is created"
            ),
            Ok(_) => {}
            Err(err) => tracing::warn!(
                rule = %rule.name,
                template = %rule.template,
                error = %err,
                "cannot check that the rule's template exists"
            ),
        }
    }
}

/// The configured providers: email always (SMTP or the outbox), the others when configured.
fn providers(config: &Config) -> anyhow::Result<Vec<Arc<dyn Provider>>> {
    use herald_nats::providers as names;
    let channels = &config.channels;
    let email_name = if channels.email.relay_host().is_some() {
        names::SMTP
    } else {
        names::OUTBOX
    };
    let mut providers: Vec<Arc<dyn Provider>> = vec![Arc::new(EmailProvider::new(
        email_name.into(),
        &channels.email,
    )?)];
    if let Some(telegram) = &channels.telegram {
        providers.push(Arc::new(TelegramProvider::new(
            names::TELEGRAM.into(),
            telegram.clone(),
        )?));
    }
    if let Some(sms) = &channels.sms {
        providers.push(Arc::new(SmsProvider::new(
            names::TWILIO.into(),
            sms.clone(),
        )?));
    }
    if let Some(push) = &channels.push {
        providers.push(Arc::new(PushProvider::new(
            names::FCM.into(),
            push.clone(),
        )?));
    }
    if let Some(webhook) = &channels.webhook {
        providers.push(Arc::new(WebhookProvider::new(
            names::WEBHOOK.into(),
            webhook.clone(),
        )?));
    }
    Ok(providers)
}

fn stream_settings(config: &Config) -> StreamSettings {
    StreamSettings {
        replicas: config.nats.replicas,
        dedup_window: Duration::from_secs(config.nats.dedup_window_secs),
        ack_wait: Duration::from_secs(config.nats.ack_wait_secs),
        max_ack_pending: config.nats.max_ack_pending,
        events: config.nats.retention.events.limits(),
        dead_letters: config.nats.retention.dead_letters.limits(),
        status: config.nats.retention.status.limits(),
    }
}

/// SQLite creates the file but not its folder.
pub(crate) fn ensure_sqlite_dir(url: &str) -> anyhow::Result<()> {
    let Some(path) = herald_entities::sqlite_file(url) else {
        return Ok(());
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create database folder {}", dir.display()))?;
    }
    Ok(())
}

/// A database URL without its password, for messages: the one of `user:password@` and a
/// `password=` query parameter's.
pub fn redact(url: &str) -> String {
    let url = match userinfo(url) {
        Some((start, end)) => match url[start..end].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..start], &url[end..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    };
    redact_query_password(&url)
}

/// `url` with the value of its `password=` query parameters (any case) replaced by `***`.
fn redact_query_password(url: &str) -> String {
    let Some(query_start) = url.find('?') else {
        return url.to_string();
    };
    let query_end = url[query_start..]
        .find('#')
        .map_or(url.len(), |at| query_start + at);
    let query = url[query_start + 1..query_end]
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{}?{query}{}", &url[..query_start], &url[query_end..])
}

/// NATS server URLs without their passwords or tokens (`nats://token@host` carries one as its
/// user), for `herald config`.
pub fn redact_nats_urls(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            match userinfo(url) {
                Some((start, end)) if !url[start..end].contains(':') => {
                    format!("{}***{}", &url[..start], &url[end..])
                }
                _ => redact(url),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Where a URL's `user:password` (or `token`) lies: from after `://` to its last `@` before the
/// query string (whose values may hold an `@` too).
fn userinfo(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let before_query = url[start..].find('?').map_or(url.len(), |at| start + at);
    let end = url[..before_query].rfind('@')?;
    (end >= start).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::{providers, redact, redact_nats_urls};
    use herald_actors::channel::email::SmtpSecurity;

    /// An SMTP host set to nothing with `security = "none"` (which has no host name to check)
    /// is the outbox, named so in attempts, not an "smtp" provider failing every send.
    #[test]
    fn a_blank_smtp_host_is_the_outbox_provider() {
        super::install_crypto_provider();
        let dir = tempfile::tempdir().expect("temporary folder");
        let mut config = crate::Config::default();
        config.channels.email.smtp_host = Some(String::new());
        config.channels.email.security = SmtpSecurity::None;
        config.channels.email.outbox_dir = dir.path().to_path_buf();
        let providers = providers(&config).expect("the providers");
        assert_eq!(providers[0].name(), "outbox");
    }

    #[test]
    fn nats_passwords_and_tokens_are_redacted() {
        assert_eq!(
            redact_nats_urls("nats://herald:s3cret@n1:4222, nats://t0ken@n2:4222,nats://n3"),
            "nats://herald:***@n1:4222,nats://***@n2:4222,nats://n3"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://herald:s3cret@db:5432/herald"),
            "postgres://herald:***@db:5432/herald"
        );
        assert_eq!(redact("sqlite://data/herald.db"), "sqlite://data/herald.db");
        assert_eq!(
            redact("postgres://root@/herald?host=/var/run/postgresql"),
            "postgres://root@/herald?host=/var/run/postgresql"
        );
    }

    #[test]
    fn passwords_in_the_query_string_are_redacted() {
        assert_eq!(
            redact("postgres://h/db?user=u&password=s3cret"),
            "postgres://h/db?user=u&password=***"
        );
        assert_eq!(
            redact("postgres://h/db?PASSWORD=s3cret&sslmode=require"),
            "postgres://h/db?PASSWORD=***&sslmode=require"
        );
        assert_eq!(
            redact("postgres://u:pw@h/db?password=p@ss&host=/run"),
            "postgres://u:***@h/db?password=***&host=/run"
        );
        assert_eq!(
            redact("postgres://h/db?user=u#password=x"),
            "postgres://h/db?user=u#password=x"
        );
    }
}
