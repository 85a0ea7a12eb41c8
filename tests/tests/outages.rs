//! Outages of what Herald depends on, ridden out without a restart: the database unavailable for a
//! while (nothing acknowledged before its status is written, nothing lost, duplicates bounded) and a
//! provider down for a minute (the circuit opens, failover carries the traffic, the circuit closes
//! after recovery, nothing ends dead that had a working channel).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use herald_actors::channel::telegram::TelegramConfig;
use herald_entities::repo::notifications;
use herald_entities::{NotificationStatus, PING_WHEN_IDLE_FOR, notification};
use herald_nats::SendCommand;
use herald_tests::{
    DatabaseKind, DatabaseOutage, E2E_TIMEOUT, NatsServer, SmtpSink, TestDatabase, TestHerald,
    eventually, eventually_showing, test_config,
};
use reqwest::StatusCode;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PaginatorTrait,
    QueryFilter, QuerySelect, Statement,
};
use serde_json::{Value, json};
use tokio::time::Instant;
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Notifications loaded before the database goes away.
const DB_TOTAL: u64 = 3_000;
/// Deliveries in flight: the bound on sends during the outage and on duplicates after it.
const DB_MAX_IN_FLIGHT: usize = 64;
/// How long the database stays away: longer than `ack_wait`, so JetStream redelivers held commands.
const DB_OUTAGE: Duration = Duration::from_secs(12);
/// `nats.ack_wait_secs` of the database outage test.
const DB_ACK_WAIT_SECS: u64 = 4;

/// How long Telegram is down.
const PROVIDER_OUTAGE: Duration = Duration::from_secs(60);
/// One notification per this interval, throughout.
const SEND_EVERY: Duration = Duration::from_millis(250);
/// Circuit settings of the provider outage test.
const FAILURE_THRESHOLD: u32 = 5;
const COOL_DOWN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_holds_unwritten_work_and_recovers_without_loss() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let mut outage = DatabaseOutage::new(&db).await.expect("outage control");
    let mut config = test_config(&nats, &db, &smtp);
    config.database.url = outage.url().to_string();
    config.dispatch.max_in_flight = DB_MAX_IN_FLIGHT;
    config.nats.ack_wait_secs = DB_ACK_WAIT_SECS;
    let herald = TestHerald::start(config).await.expect("herald");
    // The test's own view of the database goes around the outage.
    let direct = herald_entities::connect(db.url(), 2)
        .await
        .expect("direct db connection");
    let js = jetstream::new(nats.client().await.expect("nats client"));

    herald_engine::bench::load::accept_via_nats(&direct, &nats.url(), DB_TOTAL, 500)
        .await
        .expect("notifications accepted");
    smtp.wait_for_count(300, E2E_TIMEOUT)
        .await
        .expect("deliveries under way");
    outage.begin().await.expect("database outage begins");
    let began = Instant::now();
    let mailed_at_cut = smtp.count();
    assert!(
        count_sent(&direct).await < DB_TOTAL,
        "the outage begins mid-run"
    );

    eventually(
        "the status writer to meet the outage",
        E2E_TIMEOUT,
        || async {
            (herald
                .metric("herald_status_write_retries_total", &[])
                .await
                > 0.0)
                .then_some(())
        },
    )
    .await;
    if db.kind() == DatabaseKind::Postgres {
        let not_ready = eventually(
            "readiness to report the database unreachable",
            E2E_TIMEOUT,
            || async {
                let (status, body) = herald.get("/health/ready").await;
                (status == StatusCode::SERVICE_UNAVAILABLE).then_some(body)
            },
        )
        .await;
        assert_eq!(not_ready["database"]["ok"], false, "{not_ready}");
        assert_eq!(not_ready["nats"]["ok"], true, "{not_ready}");
    }
    let mut checks = 0;
    while began.elapsed() < DB_OUTAGE {
        assert_nothing_acked_unwritten(&js, &direct).await;
        checks += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mailed_during = smtp.count() - mailed_at_cut;
    assert!(
        mailed_during <= DB_MAX_IN_FLIGHT,
        "the dispatcher pauses: {mailed_during} sent during the outage, more than the {DB_MAX_IN_FLIGHT} in flight"
    );
    outage.end().await.expect("database outage ends");

    eventually_showing(
        &format!("all {DB_TOTAL} to be sent after the outage"),
        Duration::from_secs(180),
        || async {
            let sent = count_sent(&direct).await;
            (sent == DB_TOTAL)
                .then_some(())
                .ok_or_else(|| format!("{sent} sent"))
        },
    )
    .await;
    // Redeliveries (after `ack_wait`) of commands whose acks were lost come before the count.
    eventually("every command to be acknowledged", E2E_TIMEOUT, || async {
        (stream_messages(&js, herald_nats::subjects::NOTIFY_STREAM).await == 0).then_some(())
    })
    .await;
    let duplicates = audit_mail(&direct, &smtp, DB_TOTAL as usize).await;
    println!(
        "database outage ({}, {:?}): {mailed_at_cut} mailed before, {mailed_during} during, \
         {DB_TOTAL} sent after recovery, 0 lost, {duplicates} duplicates (bound {DB_MAX_IN_FLIGHT}), \
         {checks} checks that nothing was acked unwritten",
        db.kind(),
        DB_OUTAGE
    );
    assert!(
        duplicates <= DB_MAX_IN_FLIGHT,
        "{duplicates} duplicates exceed the in-flight bound {DB_MAX_IN_FLIGHT}"
    );
    eventually("readiness to recover", E2E_TIMEOUT, || async {
        (herald.get("/health/ready").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    // The same engine takes new work: no restart was needed.
    let id = herald
        .send_accepted(&json!({
            "recipient": {"email": "after@example.com"},
            "category": "transactional",
            "channels": ["email"],
            "content": {"subject": "Back", "text": "The database is back."}
        }))
        .await;
    herald.wait_status(&id, "sent").await;
    herald.shutdown().await.expect("shutdown");
}

/// How long a send may take to be refused while the database is down. README's *Operations*: "a
/// query waits at most 10 s for a pooled connection, so the API answers `503` rather than
/// hanging". Twice that, as a check that the request does not hang, not a measure of speed.
const SEND_REFUSED_WITHIN: Duration = Duration::from_secs(20);
/// The request id of the send refused during the outage and repeated after it.
const OUTAGE_REQUEST_ID: &str = "outage-retry-1";

/// A send while the database is down is refused with `503 unavailable` within a bound instead of
/// hanging, as README's *Operations* says, and nothing of it is stored or sent; the client's retry
/// with the same request id once the database is back is accepted and mailed once. (PostgreSQL:
/// unreachable behind a cut proxy, so the send waits out the pool's acquire timeout; SQLite:
/// write-locked by another connection, so its insert waits out the busy timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_while_the_database_is_down_answers_503_and_its_retry_is_sent_once() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let mut outage = DatabaseOutage::new(&db).await.expect("outage control");
    let mut config = test_config(&nats, &db, &smtp);
    config.database.url = outage.url().to_string();
    let herald = TestHerald::start(config).await.expect("herald");
    // The test's own view of the database goes around the outage.
    let direct = herald_entities::connect(db.url(), 2)
        .await
        .expect("direct db connection");
    let send = json!({
        "request_id": OUTAGE_REQUEST_ID,
        "recipient": {"email": "retry@example.com"},
        "category": "transactional",
        "channels": ["email"],
        "content": {"subject": "Retry", "text": "Sent once the database is back."}
    });

    outage.begin().await.expect("database outage begins");
    // The outage's length is the condition under test, not a wait for an event: once it has lasted
    // longer than that idle time, the pool checks its connections before use, finds them dead and
    // has to open one, which is what a query waits for at most 10 s. (A send at once meets a dead
    // pooled connection and fails in milliseconds.)
    tokio::time::sleep(PING_WHEN_IDLE_FOR + Duration::from_millis(200)).await;
    let sending = Instant::now();
    let (status, refused) = tokio::time::timeout(
        SEND_REFUSED_WITHIN,
        send_unhurried(&herald, &send),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "POST /api/v1/notifications did not answer within {SEND_REFUSED_WITHIN:?} while \
                 the database was down: the request hangs instead of answering 503"
        )
    });
    let took = sending.elapsed();
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a send during the outage is refused: {refused}"
    );
    assert_eq!(refused["code"], "unavailable", "{refused}");
    outage.end().await.expect("database outage ends");
    eprintln!(
        "a send during a database outage ({}) refused in {took:?}",
        db.kind()
    );

    let stored = notifications::find_by_request_id(&direct, OUTAGE_REQUEST_ID)
        .await
        .expect("lookup by request id");
    assert!(
        stored.is_none(),
        "the refused send stored nothing: {stored:?}"
    );
    assert_eq!(smtp.count(), 0, "the refused send mailed nothing");
    eventually("readiness to recover", E2E_TIMEOUT, || async {
        (herald.get("/health/ready").await.0 == StatusCode::OK).then_some(())
    })
    .await;
    let id = herald.send_accepted(&send).await;
    herald.wait_status(&id, "sent").await;
    nats.commands_drained(E2E_TIMEOUT).await;
    assert_eq!(smtp.count(), 1, "the retry was mailed once");
    herald.shutdown().await.expect("shutdown");
}

/// `POST /api/v1/notifications` with the admin key and no client timeout (the harness's client
/// gives up after 10 s, no longer than a query may wait for the database): the caller bounds it.
async fn send_unhurried(herald: &TestHerald, body: &Value) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/notifications", herald.base()))
        .bearer_auth(herald.admin_key())
        .json(body)
        .send()
        .await
        .unwrap_or_else(|err| panic!("POST /api/v1/notifications failed: {err}"));
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every notification whose outcome is not written yet still has its command in `NOTIFY`: nothing
/// was acknowledged before its status was written. The stream is read first: a command missing
/// from it was acknowledged earlier, so its final status must already be visible afterwards.
async fn assert_nothing_acked_unwritten(js: &jetstream::Context, db: &DatabaseConnection) {
    let unacked = unacked_commands(js).await;
    let unfinished = unfinished_notifications(db).await;
    let acked_unwritten: Vec<&Uuid> = unfinished.difference(&unacked).take(5).collect();
    assert!(
        acked_unwritten.is_empty(),
        "{} of {} unfinished notifications have no command left in NOTIFY (first: {acked_unwritten:?})",
        unfinished.difference(&unacked).count(),
        unfinished.len()
    );
}

/// Notification ids of the commands still in the `NOTIFY` work queue.
async fn unacked_commands(js: &jetstream::Context) -> HashSet<Uuid> {
    let mut stream = js
        .get_stream(herald_nats::subjects::NOTIFY_STREAM)
        .await
        .expect("NOTIFY stream");
    let state = stream.info().await.expect("NOTIFY info").state.clone();
    if state.messages == 0 {
        return HashSet::new();
    }
    let stream = &stream;
    futures::stream::iter(state.first_sequence..=state.last_sequence)
        .map(|sequence| async move {
            // A sequence that is gone was acknowledged (work queue).
            let message = stream.get_raw_message(sequence).await.ok()?;
            let command = SendCommand::decode(&message.payload).expect("a send command");
            Some(command.notification_id)
        })
        .buffer_unordered(64)
        .filter_map(|id| async move { id })
        .collect()
        .await
}

/// Ids of the notifications without a final status.
async fn unfinished_notifications(db: &DatabaseConnection) -> HashSet<Uuid> {
    let rows: Vec<(Uuid, NotificationStatus)> = notification::Entity::find()
        .select_only()
        .column(notification::Column::Id)
        .column(notification::Column::Status)
        .into_tuple()
        .all(db)
        .await
        .expect("notification statuses");
    rows.into_iter()
        .filter(|(_, status)| !status.is_final())
        .map(|(id, _)| id)
        .collect()
}

async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    let mut stream = js.get_stream(name).await.expect("stream");
    stream.info().await.expect("stream info").state.messages
}

async fn count_sent(db: &DatabaseConnection) -> u64 {
    notification::Entity::find()
        .filter(notification::Column::Status.eq(NotificationStatus::Sent))
        .count(db)
        .await
        .expect("count sent")
}

/// Checks the SMTP sink against the database: every notification mailed at least once. Returns
/// how many were mailed more than once.
async fn audit_mail(db: &DatabaseConnection, smtp: &SmtpSink, expected: usize) -> usize {
    let ids: Vec<Uuid> = notification::Entity::find()
        .select_only()
        .column(notification::Column::Id)
        .into_tuple()
        .all(db)
        .await
        .expect("ids");
    assert_eq!(ids.len(), expected, "every accepted notification is stored");
    let mut mailed: HashMap<String, usize> = HashMap::new();
    for mail in smtp.messages() {
        let id = mail
            .message_id
            .as_deref()
            .and_then(|m| m.split('@').next())
            .unwrap_or_default()
            .to_string();
        *mailed.entry(id).or_default() += 1;
    }
    let lost: Vec<String> = ids
        .iter()
        .map(|id| id.simple().to_string())
        .filter(|id| !mailed.contains_key(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} notifications lost (first 5: {:?})",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    mailed.values().map(|n| n - 1).sum()
}

fn telegram_path() -> wiremock::matchers::PathExactMatcher {
    path("/bot42:TESTTOKEN/sendMessage")
}

fn telegram_ok() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"ok": true, "result": {"message_id": 9}}))
}

fn telegram_then_email(n: usize) -> Value {
    json!({
        "recipient": {"email": format!("ada+{n}@example.com"), "telegram_chat_id": "4242"},
        "category": "transactional",
        "channels": ["telegram", "email"],
        "content": {"subject": "Order shipped", "text": format!("Your order #{n} is on its way.")}
    })
}

/// The Telegram entry of `GET /api/v1/channels`.
async fn telegram_channel(herald: &TestHerald) -> Value {
    let (status, channels) = herald.get("/api/v1/channels").await;
    assert_eq!(status, StatusCode::OK, "{channels}");
    channels
        .as_array()
        .and_then(|list| list.iter().find(|c| c["channel"] == "telegram"))
        .cloned()
        .expect("telegram listed")
}

/// What the provider outage scenario saw, with the instants that split the traffic.
struct ProviderTimeline {
    outage_began: Instant,
    outage_ended: Instant,
    /// The wall clock when the failing Telegram was taken away: a notification sent by Telegram
    /// was sent after it.
    telegram_back_at: chrono::DateTime<chrono::Utc>,
    circuit_closed: Instant,
    telegram_calls_during_outage: usize,
}

/// A PostgreSQL connection the server ended while it sat idle in Herald's pool (a server restart,
/// a firewall's cut of idle connections) is found dead before it is used and replaced: the next
/// query succeeds, on a new session. (Pooled connections are not tested before every use, only
/// after [`PING_WHEN_IDLE_FOR`] idle.) SQLite has no server to end a connection.
#[tokio::test]
async fn a_pooled_connection_ended_by_the_server_while_idle_is_replaced_before_use() {
    let db = TestDatabase::from_env().await.expect("db");
    if db.kind() != DatabaseKind::Postgres {
        return;
    }
    let pool = herald_entities::connect(db.url(), 1).await.expect("pool");
    let admin = herald_entities::connect(db.url(), 1)
        .await
        .expect("admin connection");
    let ended = backend_pid(&pool).await.expect("first session");
    admin
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_terminate_backend($1)",
            [ended.into()],
        ))
        .await
        .expect("session ended");
    eventually(
        "the ended session to leave pg_stat_activity",
        E2E_TIMEOUT,
        || async {
            let row = admin
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = $1",
                    [ended.into()],
                ))
                .await
                .ok()??;
            (row.try_get::<i64>("", "n").ok()? == 0).then_some(())
        },
    )
    .await;
    // The idle time is the condition under test, not a wait for an event.
    tokio::time::sleep(PING_WHEN_IDLE_FOR + Duration::from_millis(200)).await;
    let replacement = backend_pid(&pool)
        .await
        .expect("the pool replaced the ended session before running the query");
    assert_ne!(replacement, ended, "the query ran on a new session");
}

/// The server process (session) id of the connection `db` runs a query on.
async fn backend_pid(db: &DatabaseConnection) -> Result<i32, sea_orm::DbErr> {
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT pg_backend_pid() AS pid",
        ))
        .await?
        .ok_or_else(|| sea_orm::DbErr::RecordNotFound("pg_backend_pid".into()))?;
    row.try_get("", "pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_down_for_a_minute_fails_over_and_comes_back() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let provider = MockServer::start().await;
    let mut config = test_config(&nats, &db, &smtp);
    config.channels.telegram = Some(TelegramConfig {
        base_url: provider.uri(),
        bot_token: "42:TESTTOKEN".into(),
        timeout_ms: 2_000,
        ..TelegramConfig::default()
    });
    config.channels.limits.circuit.failure_threshold = FAILURE_THRESHOLD;
    config.channels.limits.circuit.window_ms = 30_000;
    config.channels.limits.circuit.cool_down_ms = COOL_DOWN.as_millis() as u64;
    let herald = TestHerald::start(config).await.expect("herald");
    let healthy = Mock::given(method("POST"))
        .and(telegram_path())
        .respond_with(telegram_ok())
        .mount_as_scoped(&provider)
        .await;

    let stop = AtomicBool::new(false);
    let traffic = async {
        let mut sent: Vec<(Instant, Uuid)> = Vec::new();
        let mut every = tokio::time::interval(SEND_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            every.tick().await;
            let id = herald.send_accepted(&telegram_then_email(sent.len())).await;
            sent.push((Instant::now(), id.parse().expect("a notification id")));
        }
        sent
    };
    let scenario = async {
        eventually("Telegram to carry traffic", E2E_TIMEOUT, || async {
            (healthy.received_requests().await.len() >= 3).then_some(())
        })
        .await;
        drop(healthy);
        let outage = Mock::given(method("POST"))
            .and(telegram_path())
            .respond_with(ResponseTemplate::new(503).set_body_string("bad gateway"))
            .mount_as_scoped(&provider)
            .await;
        let outage_began = Instant::now();
        let open = eventually("the Telegram circuit to open", E2E_TIMEOUT, || async {
            let telegram = telegram_channel(&herald).await;
            (telegram["circuit"] == "open").then_some(telegram)
        })
        .await;
        assert!(open["times_opened"].as_u64() >= Some(1), "{open}");
        let (status, ready) = herald.get("/health/ready").await;
        assert_eq!(
            status,
            StatusCode::OK,
            "an open circuit does not make the instance unready: {ready}"
        );
        tokio::time::sleep_until(outage_began + PROVIDER_OUTAGE).await;
        let telegram_calls_during_outage = outage.received_requests().await.len();
        let telegram_back_at = chrono::Utc::now();
        drop(outage);
        Mock::given(method("POST"))
            .and(telegram_path())
            .respond_with(telegram_ok())
            .mount(&provider)
            .await;
        let outage_ended = Instant::now();
        eventually(
            "the Telegram circuit to close after a good probe",
            COOL_DOWN + E2E_TIMEOUT,
            || async { (telegram_channel(&herald).await["circuit"] == "closed").then_some(()) },
        )
        .await;
        let circuit_closed = Instant::now();
        // Let a few notifications go out on the closed circuit.
        tokio::time::sleep(SEND_EVERY * 12).await;
        stop.store(true, Ordering::Relaxed);
        ProviderTimeline {
            outage_began,
            outage_ended,
            telegram_back_at,
            circuit_closed,
            telegram_calls_during_outage,
        }
    };
    let (sent, timeline) = tokio::join!(traffic, scenario);

    let finals = eventually_showing(
        "every notification to reach a final status",
        E2E_TIMEOUT,
        || async {
            let finals = final_states(herald.db(), &sent).await;
            if finals.len() == sent.len() {
                Ok(finals)
            } else {
                Err(format!("{} of {} final", finals.len(), sent.len()))
            }
        },
    )
    .await;
    let not_sent: Vec<_> = finals
        .iter()
        .filter(|(_, state)| state.status != NotificationStatus::Sent)
        .take(5)
        .collect();
    assert!(
        not_sent.is_empty(),
        "every notification had a working channel and was sent: {not_sent:?}"
    );
    let channel_of = |id: &Uuid| finals[id].channel.clone().unwrap_or_default();
    let during: Vec<&Uuid> = sent
        .iter()
        .filter(|(at, _)| *at > timeline.outage_began && *at < timeline.outage_ended)
        .map(|(_, id)| id)
        .collect();
    let by_email = during.iter().filter(|id| channel_of(id) == "email").count();
    // Failover carried the outage: each notification accepted during it went by email, except
    // those still on their way when Telegram came back (accepted in the outage's last moments, on
    // a machine busy with other tests), which Telegram carried after that. Without failover they
    // would have waited for Telegram, up to a minute.
    let late_window = chrono::Duration::from_std(COOL_DOWN).expect("cool-down as a duration");
    let not_failed_over: Vec<&FinalState> = during
        .iter()
        .map(|id| &finals[*id])
        .filter(|state| state.channel.as_deref() != Some("email"))
        .filter(|state| {
            let carried_after_recovery = state.channel.as_deref() == Some("telegram")
                && state
                    .sent_at
                    .is_some_and(|at| at >= timeline.telegram_back_at);
            let on_its_way = state.created_at + late_window >= timeline.telegram_back_at;
            !(carried_after_recovery && on_its_way)
        })
        .collect();
    assert!(
        not_failed_over.is_empty(),
        "failover carried the outage ({by_email} of {} by email); not by email, nor by Telegram \
         after it came back for one accepted in the outage's last {COOL_DOWN:?} (Telegram back \
         at {}): {not_failed_over:?}",
        during.len(),
        timeline.telegram_back_at
    );
    let after: Vec<&Uuid> = sent
        .iter()
        .filter(|(at, _)| *at > timeline.circuit_closed)
        .map(|(_, id)| id)
        .collect();
    assert!(
        !after.is_empty(),
        "traffic continued after the circuit closed"
    );
    assert!(
        after.iter().all(|id| channel_of(id) == "telegram"),
        "after recovery Telegram carries the traffic again"
    );
    let probes_bound =
        FAILURE_THRESHOLD as usize + (PROVIDER_OUTAGE.as_secs() / COOL_DOWN.as_secs()) as usize + 3;
    assert!(
        timeline.telegram_calls_during_outage <= probes_bound,
        "the open circuit kept Telegram from being called: {} calls for {} notifications (bound {probes_bound})",
        timeline.telegram_calls_during_outage,
        during.len()
    );
    let emails = finals
        .values()
        .filter(|state| state.channel.as_deref() == Some("email"))
        .count();
    assert_eq!(
        smtp.count(),
        emails,
        "one mail per notification carried by email"
    );
    let js = jetstream::new(nats.client().await.expect("nats client"));
    assert_eq!(
        stream_messages(&js, herald_nats::subjects::DLQ_STREAM).await,
        0,
        "nothing was dead-lettered"
    );
    println!(
        "provider outage {PROVIDER_OUTAGE:?}: {} notifications, {} during the outage ({by_email} by email), \
         {} Telegram calls during it, circuit closed {:?} after recovery, {} by Telegram after",
        sent.len(),
        during.len(),
        timeline.telegram_calls_during_outage,
        timeline.circuit_closed - timeline.outage_ended,
        after.len()
    );
    herald.shutdown().await.expect("shutdown");
}

/// A notification's final state.
#[derive(Debug)]
struct FinalState {
    status: NotificationStatus,
    channel: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
    sent_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The final state of each of `sent` that has one.
async fn final_states(
    db: &DatabaseConnection,
    sent: &[(Instant, Uuid)],
) -> HashMap<Uuid, FinalState> {
    let ids: Vec<Uuid> = sent.iter().map(|(_, id)| *id).collect();
    let mut finals = HashMap::new();
    for chunk in ids.chunks(500) {
        let rows = notification::Entity::find()
            .filter(notification::Column::Id.is_in(chunk.iter().copied()))
            .all(db)
            .await
            .expect("notification states");
        for row in rows.into_iter().filter(|row| row.status.is_final()) {
            let state = FinalState {
                status: row.status,
                channel: row.final_channel,
                created_at: row.created_at,
                sent_at: row.sent_at,
            };
            finals.insert(row.id, state);
        }
    }
    finals
}

/// How long NATS stays away at the start: longer than the NATS client's request timeout (10 s),
/// after which a start that did not wait for the server failed its first JetStream requests.
const NATS_DOWN_AT_START: Duration = Duration::from_secs(13);

/// A NATS server that cannot be reached when Herald starts is waited for, as README's
/// *Operations* says, instead of failing the start once its first requests time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_down_at_the_start_is_waited_for() {
    let mut nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let config = test_config(&nats, &db, &smtp);
    nats.stop().await.expect("nats stopped");
    let start = tokio::spawn(TestHerald::start(config));
    // Not a synchronisation: the outage itself must outlast the client's request timeout.
    tokio::time::sleep(NATS_DOWN_AT_START).await;
    assert!(
        !start.is_finished(),
        "the start ended while NATS was away: {:?}",
        start.await.map(|started| started.err())
    );
    nats.restart().await.expect("nats back");
    let herald = tokio::time::timeout(E2E_TIMEOUT, start)
        .await
        .expect("herald started within the timeout once NATS answered")
        .expect("the start task ran")
        .expect("herald started");
    let id = herald
        .send_accepted(&json!({
            "recipient": { "email": "late@example.com" },
            "category": "transactional",
            "channels": ["email"],
            "content": { "subject": "Hello", "text": "NATS came back." }
        }))
        .await;
    herald.wait_status(&id, "sent").await;
    assert_eq!(smtp.count(), 1, "one email went out");
    herald.shutdown().await.expect("shutdown");
}

/// `shutdown_grace_secs` of the shutdown-while-NATS-is-down test.
const GRACE_WITH_NATS_DOWN: u64 = 2;
/// Bound on that shutdown: the grace, the status writer's flush, the lease hand-back, the actors'
/// stop and the final flush each wait a few seconds at most.
const SHUTDOWN_WITH_NATS_DOWN: Duration = Duration::from_secs(30);

/// A stop while NATS is unreachable ends within a bound, as README's *Operations* says, instead of
/// waiting for ever on the client's last flush (the client answers none while it reconnects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_while_nats_is_down_still_ends() {
    let mut nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let mut config = test_config(&nats, &db, &smtp);
    config.dispatch.shutdown_grace_secs = GRACE_WITH_NATS_DOWN;
    let herald = TestHerald::start(config).await.expect("herald");
    let id = herald
        .send_accepted(&json!({
            "recipient": { "email": "before@example.com" },
            "category": "transactional",
            "channels": ["email"],
            "content": { "subject": "Hello", "text": "Before NATS went away." }
        }))
        .await;
    herald.wait_status(&id, "sent").await;
    nats.stop().await.expect("nats stopped");
    eventually("readiness to see NATS gone", E2E_TIMEOUT, || async {
        let (status, _) = herald.get("/health/ready").await;
        (status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let started = Instant::now();
    tokio::time::timeout(SHUTDOWN_WITH_NATS_DOWN, herald.shutdown())
        .await
        .unwrap_or_else(|_| {
            panic!("the stop did not end within {SHUTDOWN_WITH_NATS_DOWN:?} while NATS was down")
        })
        .expect("shutdown");
    eprintln!("stopped in {:?} with NATS down", started.elapsed());
}
