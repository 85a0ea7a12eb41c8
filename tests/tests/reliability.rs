//! Herald's promise under crashes: every accepted notification reaches a terminal state, none is
//! lost, and duplicates happen only for sends a provider accepted just before the process died.
//!
//! These tests run `herald serve` as a separate process and kill it.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use herald_entities::{NotificationStatus, notification, repo::schedule::PUBLISH_PENDING};
use herald_tests::{E2E_TIMEOUT, HeraldProcess, NatsServer, SmtpSink, TestDatabase, eventually};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect};
use uuid::Uuid;

/// Commands in flight per process; the bound on duplicates after a SIGKILL.
const MAX_IN_FLIGHT: u64 = 256;
/// Status writer batch size; written-but-unacked commands add to the duplicate bound.
const MAX_BATCH: u64 = 500;

fn engine_env(nats: &NatsServer, db: &TestDatabase, smtp: &SmtpSink) -> Vec<(String, String)> {
    [
        ("HERALD_NATS__URL", nats.url()),
        ("HERALD_DATABASE__URL", db.url().to_string()),
        ("HERALD_CHANNELS__EMAIL__SMTP_HOST", smtp.host().to_string()),
        ("HERALD_CHANNELS__EMAIL__SMTP_PORT", smtp.port().to_string()),
        ("HERALD_CHANNELS__EMAIL__SECURITY", "none".to_string()),
        ("HERALD_DISPATCH__MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string()),
        ("HERALD_STATUS_WRITER__MAX_BATCH", MAX_BATCH.to_string()),
        ("HERALD_DISPATCH__SHUTDOWN_GRACE_SECS", "10".to_string()),
        // Redeliver the commands a killed process held soon, not after the default 30 s.
        ("HERALD_NATS__ACK_WAIT_SECS", "3".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

async fn count_sent(db: &sea_orm::DatabaseConnection) -> u64 {
    notification::Entity::find()
        .filter(notification::Column::Status.eq(NotificationStatus::Sent))
        .count(db)
        .await
        .unwrap_or(0)
}

/// Every stored notification's id, in the simple form used in Message-IDs.
async fn all_ids(db: &sea_orm::DatabaseConnection) -> HashSet<String> {
    let ids: Vec<Uuid> = notification::Entity::find()
        .select_only()
        .column(notification::Column::Id)
        .into_tuple()
        .all(db)
        .await
        .expect("ids");
    ids.into_iter().map(|id| id.simple().to_string()).collect()
}

struct Outcome {
    delivered_distinct: usize,
    duplicates: usize,
}

/// Checks the sink against the database: every notification delivered at least once.
async fn audit(db: &sea_orm::DatabaseConnection, smtp: &SmtpSink, expected: usize) -> Outcome {
    let ids = all_ids(db).await;
    assert_eq!(ids.len(), expected, "every accepted notification is stored");
    let mails = smtp.messages();
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    for mail in &mails {
        let id = mail
            .message_id
            .as_deref()
            .and_then(|m| m.split('@').next())
            .unwrap_or_default()
            .to_string();
        if !seen.insert(id) {
            duplicates += 1;
        }
    }
    let lost: Vec<&String> = ids
        .iter()
        .filter(|id| !seen.contains(*id))
        .take(5)
        .collect();
    assert!(lost.is_empty(), "lost notifications (first 5): {lost:?}");
    Outcome {
        delivered_distinct: seen.len(),
        duplicates,
    }
}

/// A kill -9 duplicates at most the sends in flight and those written but not yet acked.
fn assert_within_kill_window(outcome: &Outcome) {
    assert!(
        outcome.duplicates as u64 <= MAX_IN_FLIGHT + MAX_BATCH,
        "duplicates {} exceed the in-flight window {}",
        outcome.duplicates,
        MAX_IN_FLIGHT + MAX_BATCH
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_20000_loses_nothing() {
    herald_tests::init_tracing();
    const TOTAL: u64 = 20_000;
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let logs = tempfile::tempdir().expect("log dir");
    let mut herald = HeraldProcess::start(
        engine_env(&nats, &db, &smtp),
        logs.path().join("herald.log"),
    )
    .await
    .expect("herald starts");
    let conn = herald_entities::connect(db.url(), 4)
        .await
        .expect("db conn");

    herald_engine::bench::load::accept_via_nats(&conn, &nats.url(), TOTAL, 1_000)
        .await
        .expect("20000 accepted");
    smtp.wait_for_count(3_000, Duration::from_secs(120))
        .await
        .expect("deliveries under way");
    herald.kill9().await.expect("SIGKILL");
    let at_kill = count_sent(&conn).await;
    assert!(at_kill < TOTAL, "killed mid-run ({at_kill} sent)");

    herald.restart().await.expect("restart");
    eventually("all 20000 to be sent", Duration::from_secs(300), || async {
        (count_sent(&conn).await == TOTAL).then_some(())
    })
    .await;
    // Duplicates are counted once no command is left to redeliver.
    nats.commands_drained(E2E_TIMEOUT).await;
    let outcome = audit(&conn, &smtp, TOTAL as usize).await;
    println!(
        "kill -9 at {at_kill} sent: {} delivered, {} duplicates (bound {})",
        outcome.delivered_distinct,
        outcome.duplicates,
        MAX_IN_FLIGHT + MAX_BATCH
    );
    assert_eq!(outcome.delivered_distinct, TOTAL as usize);
    assert_within_kill_window(&outcome);
    herald
        .terminate(Duration::from_secs(20))
        .await
        .expect("clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_in_flight_work_and_loses_nothing() {
    herald_tests::init_tracing();
    const TOTAL: u64 = 5_000;
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let logs = tempfile::tempdir().expect("log dir");
    let mut herald = HeraldProcess::start(
        engine_env(&nats, &db, &smtp),
        logs.path().join("herald.log"),
    )
    .await
    .expect("herald starts");
    // `herald` turns transparent huge pages off for itself (see engine/src/main.rs).
    let status = herald.proc_status().expect("/proc status");
    assert!(
        status.lines().any(|line| line == "THP_enabled:\t0"),
        "THP not disabled:\n{status}"
    );
    let conn = herald_entities::connect(db.url(), 4)
        .await
        .expect("db conn");

    herald_engine::bench::load::accept_via_nats(&conn, &nats.url(), TOTAL, 500)
        .await
        .expect("accepted");
    smtp.wait_for_count(500, Duration::from_secs(120))
        .await
        .expect("deliveries under way");
    let took = herald
        .terminate(Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("graceful stop: {e}\n{}", herald.log_tail()));
    println!("graceful stop under load took {took:?}");
    // The work in flight was finished: every mail the sink took has its status written.
    let (sent, mailed) = (count_sent(&conn).await, smtp.count() as u64);
    assert!(mailed < TOTAL, "stopped mid-run ({mailed} mailed)");
    assert_eq!(
        sent, mailed,
        "a graceful stop writes the status of every send it made before exiting"
    );

    herald.restart().await.expect("restart");
    eventually("all to be sent", Duration::from_secs(180), || async {
        (count_sent(&conn).await == TOTAL).then_some(())
    })
    .await;
    // A command the stop left unacked is redelivered after the restart, perhaps after every
    // notification is sent: duplicates are counted once no command is left.
    nats.commands_drained(E2E_TIMEOUT).await;
    let outcome = audit(&conn, &smtp, TOTAL as usize).await;
    assert_eq!(
        outcome.duplicates, 0,
        "a graceful stop finishes or returns its work: no duplicate sends"
    );
    herald
        .terminate(Duration::from_secs(20))
        .await
        .expect("clean exit");
}

/// Posts sends without request ids (a client that never retries) until `stop`; counts the `202`s.
async fn api_client(base: String, key: String, stop: Arc<AtomicBool>, accepted: Arc<AtomicU64>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let to = format!("api-{}-{n}@example.com", Uuid::now_v7().simple());
        let body = serde_json::json!({
            "recipient": { "email": to },
            "category": "transactional",
            "channels": ["email"],
            "content": { "subject": "Your order shipped", "text": "It is on its way." }
        });
        let answer = http
            .post(format!("{base}/api/v1/notifications"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await;
        match answer {
            Ok(answer) if answer.status() == reqwest::StatusCode::ACCEPTED => {
                accepted.fetch_add(1, Ordering::Relaxed);
            }
            // The process is gone: this request's fate is unknown to the client.
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_api_load_leaves_nothing_stored_unsent() {
    herald_tests::init_tracing();
    const CLIENTS: usize = 32;
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let logs = tempfile::tempdir().expect("log dir");
    let mut env = engine_env(&nats, &db, &smtp);
    // Requests the kill cut off between storing and publishing are published 2 s later.
    env.push(("HERALD_SCHEDULER__STALE_CLAIM_SECS".into(), "2".into()));
    let mut herald = HeraldProcess::start(env, logs.path().join("herald.log"))
        .await
        .expect("herald starts");
    let conn = herald_entities::connect(db.url(), 4)
        .await
        .expect("db conn");
    let key = herald_engine::apikey::create(&conn, "load", "send")
        .await
        .expect("key")
        .token;

    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(api_client(
                herald.base(),
                key.clone(),
                stop.clone(),
                accepted.clone(),
            ))
        })
        .collect();
    eventually("500 sends accepted", Duration::from_secs(120), || async {
        (accepted.load(Ordering::Relaxed) >= 500).then_some(())
    })
    .await;
    herald.kill9().await.expect("SIGKILL");
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client task");
    }
    let accepted = accepted.load(Ordering::Relaxed);
    // Cut off between storing and publishing, or published but not yet confirmed.
    let marked = notification::Entity::find()
        .filter(notification::Column::StatusReason.eq(PUBLISH_PENDING))
        .count(&conn)
        .await
        .expect("marked rows counted");

    herald.restart().await.expect("restart");
    let stored = all_ids(&conn).await.len() as u64;
    assert!(
        stored >= accepted,
        "every 202 is stored ({stored} < {accepted})"
    );
    eventually(
        "every stored notification to be sent",
        Duration::from_secs(180),
        || async { (count_sent(&conn).await == stored).then_some(()) },
    )
    .await;
    nats.commands_drained(E2E_TIMEOUT).await;
    let outcome = audit(&conn, &smtp, stored as usize).await;
    println!(
        "kill -9 under API load: {accepted} answered 202, {stored} stored, {marked} marked \
         unpublished at the kill, {} delivered, {} duplicates",
        outcome.delivered_distinct, outcome.duplicates
    );
    assert_within_kill_window(&outcome);
    herald
        .terminate(Duration::from_secs(20))
        .await
        .expect("clean exit");
}
