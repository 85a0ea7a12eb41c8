//! Several Herald instances on one NATS and one database share the durable consumers: the work is
//! split between them, and when one dies the others finish its part.

use std::collections::HashSet;
use std::time::Duration;

use herald_entities::{NotificationStatus, notification};
use herald_tests::{HeraldProcess, NatsServer, SmtpSink, TestDatabase, eventually};
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};

fn env(nats: &NatsServer, db: &TestDatabase, smtp: &SmtpSink) -> Vec<(String, String)> {
    [
        ("HERALD_NATS__URL", nats.url()),
        ("HERALD_DATABASE__URL", db.url().to_string()),
        ("HERALD_CHANNELS__EMAIL__SMTP_HOST", smtp.host().to_string()),
        ("HERALD_CHANNELS__EMAIL__SMTP_PORT", smtp.port().to_string()),
        ("HERALD_CHANNELS__EMAIL__SECURITY", "none".to_string()),
        ("HERALD_DISPATCH__MAX_IN_FLIGHT", "128".to_string()),
        ("HERALD_NATS__ACK_WAIT_SECS", "3".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

async fn sent_by(base: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .find(|l| l.starts_with("herald_notifications_sent_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_work_and_survive_the_loss_of_one() {
    herald_tests::init_tracing();
    const TOTAL: u64 = 10_000;
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let logs = tempfile::tempdir().expect("logs");
    let mut first = HeraldProcess::start(env(&nats, &db, &smtp), logs.path().join("a.log"))
        .await
        .expect("first instance");
    let mut second = HeraldProcess::start(env(&nats, &db, &smtp), logs.path().join("b.log"))
        .await
        .expect("second instance");
    let conn = herald_entities::connect(db.url(), 4).await.expect("db");

    herald_engine::bench::load::accept_via_nats(&conn, &nats.url(), TOTAL, 1_000)
        .await
        .expect("accepted");
    smtp.wait_for_count(2_000, Duration::from_secs(120))
        .await
        .expect("under way");
    let second_before_kill = sent_by(&second.base()).await;
    first.kill9().await.expect("kill the first instance");

    eventually(
        "every notification to be sent",
        Duration::from_secs(240),
        || async {
            let sent = notification::Entity::find()
                .filter(notification::Column::Status.eq(NotificationStatus::Sent))
                .count(&conn)
                .await
                .unwrap_or(0);
            (sent == TOTAL).then_some(())
        },
    )
    .await;
    let distinct: HashSet<String> = smtp
        .messages()
        .into_iter()
        .filter_map(|m| m.message_id)
        .collect();
    assert_eq!(distinct.len() as u64, TOTAL, "none lost");
    let second_total = sent_by(&second.base()).await;
    println!(
        "second instance sent {second_before_kill} before the kill and {second_total} in all; \
         {} duplicates",
        smtp.count() as u64 - TOTAL
    );
    assert!(second_before_kill > 0, "both instances took work");
    assert!(
        second_total < TOTAL,
        "the first instance did part of the work"
    );
    assert!(second_total > second_before_kill, "the survivor took over");
    second
        .terminate(Duration::from_secs(20))
        .await
        .expect("clean exit");
}
