//! Poison messages and injected actor panics: the consumer keeps going, nothing is lost.

use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;
use herald_actors::partitions::LeaseKeeperMsg;
use herald_actors::rate_limit::supervisor::RateLimiterSupervisorMsg;
use herald_actors::rate_limit::{CategoryLimit, OverLimit};
use herald_tests::{
    E2E_TIMEOUT, NatsServer, SmtpSink, TestDatabase, TestHerald, eventually, eventually_showing,
    test_config,
};
use serde_json::json;

fn email(to: &str) -> serde_json::Value {
    json!({
        "recipient": { "email": to },
        "category": "transactional",
        "channels": ["email"],
        "content": { "subject": "Order shipped", "text": "Your parcel is on its way." }
    })
}

/// Reads every message of NOTIFY_DLQ with its reason header.
async fn dead_letters(nats: &NatsServer) -> Vec<(String, String)> {
    let js = async_nats::jetstream::new(nats.client().await.expect("client"));
    let stream = js.get_stream("NOTIFY_DLQ").await.expect("dlq stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("ordered consumer");
    let mut out = Vec::new();
    let mut messages = consumer.messages().await.expect("messages");
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        let reason = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Herald-Dlq-Reason"))
            .map(|v| v.to_string())
            .unwrap_or_default();
        out.push((message.subject.to_string(), reason));
    }
    out
}

#[tokio::test]
async fn poison_commands_go_to_the_dlq_with_reasons_and_the_consumer_keeps_going() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald");
    let js = async_nats::jetstream::new(nats.client().await.expect("client"));

    let oversized = format!(r#"{{"v":1,"pad":"{}"}}"#, "x".repeat(700 * 1024));
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"{not json".to_vec()),
        // An older version (a newer one is held for an upgraded instance, see below).
        ("unknown version", br#"{"v": 0, "past": true}"#.to_vec()),
        (
            "invalid body",
            br#"{"v": 1, "notification_id": 7}"#.to_vec(),
        ),
        ("invalid utf-8", vec![0xff, 0xfe, 0xfd, b'{']),
        ("oversized", oversized.into_bytes()),
    ];
    for (i, (_, payload)) in poison.iter().enumerate() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("poison-{i}").as_str());
        js.publish_with_headers("notify.cmd.3", headers, payload.clone().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    // A good notification after the poison still goes out.
    let id = herald
        .send_accepted(&email("after-poison@example.com"))
        .await;
    herald.wait_status(&id, "sent").await;

    let letters = eventually("five dead letters", E2E_TIMEOUT, || async {
        let letters = dead_letters(&nats).await;
        (letters.len() >= 5).then_some(letters)
    })
    .await;
    // Read from the stream's state: the consumer that read the letters stops at 500 ms of
    // silence, so a slow stream would hide a sixth.
    assert_eq!(
        nats.subject_messages("NOTIFY_DLQ", "notify.dlq.>").await,
        5,
        "only the poison commands were dead-lettered: {letters:?}"
    );
    assert_eq!(letters.len(), 5, "{letters:?}");
    let reasons: Vec<&str> = letters.iter().map(|(_, r)| r.as_str()).collect();
    for needle in [
        "malformed",
        "unknown schema version 0",
        "invalid body",
        "oversized",
    ] {
        assert!(
            reasons.iter().any(|r| r.contains(needle)),
            "a reason mentions {needle:?}: {reasons:?}"
        );
    }
    assert!(
        letters
            .iter()
            .all(|(subject, _)| subject == "notify.dlq.cmd")
    );
    assert_eq!(smtp.count(), 1, "only the good notification was sent");
    herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_crashed_dispatcher_is_restarted_and_deliveries_continue() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald");
    let before = herald.app().dispatcher().expect("dispatcher").get_id();
    herald
        .app()
        .dispatcher()
        .expect("dispatcher")
        .cast(herald_actors::dispatcher::DispatcherMsg::Crash)
        .expect("cast");
    eventually("a new dispatcher", Duration::from_secs(10), || async {
        herald
            .app()
            .dispatcher()
            .filter(|d| d.get_id() != before)
            .map(|_| ())
    })
    .await;
    let ids = futures::future::join_all(
        (0..20).map(|i| herald.send_accepted_owned(email(&format!("c{i}@example.com")))),
    )
    .await;
    for id in &ids {
        herald.wait_status(id, "sent").await;
    }
    assert_eq!(
        smtp.wait_for_count(20, E2E_TIMEOUT)
            .await
            .expect("mails")
            .len(),
        20
    );
    let metrics = herald.metrics_text().await;
    assert!(metrics.contains("herald_actor_restarts_total{actor=\"dispatcher\"}"));
    herald.shutdown().await.expect("shutdown");
}

/// Sends under way at the email channel.
async fn emails_in_flight(herald: &TestHerald) -> Option<usize> {
    let email = herald.app().channels().get(herald_nats::Channel::Email)?;
    match email
        .call(
            herald_actors::channel::ChannelMsg::Snapshot,
            Some(E2E_TIMEOUT),
        )
        .await
    {
        Ok(ractor::rpc::CallResult::Success(snapshot)) => Some(snapshot.in_flight),
        _ => None,
    }
}

#[tokio::test]
async fn a_drain_after_a_dispatcher_restart_waits_for_the_deliveries_started_before_it() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let mut config = test_config(&nats, &db, &smtp);
    // The held send ends at the email timeout, well within the drain timeout.
    config.channels.email.timeout_ms = 3_000;
    config.dispatch.shutdown_grace_secs = 30;
    let partitions = config.nats.partitions;
    let herald = TestHerald::start(config).await.expect("herald");
    // The relay hangs, so the delivery waits at the provider until the email timeout.
    smtp.set_stall_after(0);
    let id = herald.send_accepted(&email("held@example.com")).await;
    eventually("the email send to be under way", E2E_TIMEOUT, || async {
        (emails_in_flight(&herald).await == Some(1)).then_some(())
    })
    .await;

    let crashed = herald.app().dispatcher().expect("dispatcher");
    crashed
        .cast(herald_actors::dispatcher::DispatcherMsg::Crash)
        .expect("cast");
    let dispatcher = eventually("a new dispatcher", Duration::from_secs(10), || async {
        herald
            .app()
            .dispatcher()
            .filter(|d| d.get_id() != crashed.get_id())
    })
    .await;

    // How the lease keeper hands partitions to another instance: the answer must wait for the
    // delivery the failed dispatcher started, or the other instance could deliver it again.
    let drains = (0..partitions).map(|partition| {
        dispatcher.call(
            move |reply| herald_actors::dispatcher::DispatcherMsg::Drain(partition, reply),
            Some(E2E_TIMEOUT),
        )
    });
    for (partition, drained) in futures::future::join_all(drains)
        .await
        .into_iter()
        .enumerate()
    {
        assert!(
            matches!(drained, Ok(ractor::rpc::CallResult::Success(()))),
            "the drain of partition {partition} was not answered"
        );
    }
    let (_, json) = herald.get(&format!("/api/v1/notifications/{id}")).await;
    assert!(
        json["attempts"].as_array().is_some_and(|a| !a.is_empty()),
        "the drains answered while the delivery started before the restart was under way: {json}"
    );
    herald.shutdown().await.expect("shutdown");
}

/// User rate limiters alive.
async fn rate_limited_users(herald: &TestHerald) -> usize {
    let limiter = herald.app().rate_limiter().expect("rate limiter");
    match limiter
        .call(RateLimiterSupervisorMsg::Users, Some(E2E_TIMEOUT))
        .await
    {
        Ok(ractor::rpc::CallResult::Success(users)) => users,
        other => panic!("the rate limiter did not answer: {other:?}"),
    }
}

#[tokio::test]
async fn a_restarted_lease_keeper_keeps_the_rate_limits_of_the_partitions_it_held() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let mut config = test_config(&nats, &db, &smtp);
    // A bucket that stays short of full (and its actor alive) for the whole test.
    config.rate_limits.0.insert(
        "transactional".into(),
        CategoryLimit {
            capacity: 5,
            per_secs: 3_600,
            policy: OverLimit::Defer,
        },
    );
    let herald = TestHerald::start(config).await.expect("herald");
    let id = herald.send_accepted(&email("limited@example.com")).await;
    herald.wait_status(&id, "sent").await;
    assert_eq!(rate_limited_users(&herald).await, 1, "the user's limiter");

    let crashed = herald.app().lease_keeper().expect("lease keeper");
    crashed.cast(LeaseKeeperMsg::Crash).expect("cast");
    let keeper = eventually("a new lease keeper", Duration::from_secs(10), || async {
        herald
            .app()
            .lease_keeper()
            .filter(|k| k.get_id() != crashed.get_id())
    })
    .await;
    // Its first round, asked for as it started, adopts the leases it held all along (and tells
    // the rate limiter of those it takes) before the leave is answered.
    let left = keeper.call(LeaseKeeperMsg::Leave, Some(E2E_TIMEOUT)).await;
    assert!(
        matches!(left, Ok(ractor::rpc::CallResult::Success(()))),
        "the new lease keeper did not answer"
    );
    assert_eq!(
        rate_limited_users(&herald).await,
        1,
        "the rate limiter forgot the user of a partition this process held all along"
    );
    herald.shutdown().await.expect("shutdown");
}

/// `nats.ack_wait_secs` of the NATS restart test.
const ACK_WAIT: Duration = Duration::from_secs(3);

#[tokio::test]
async fn nats_restarted_mid_run_loses_nothing() {
    let mut nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let mut config = test_config(&nats, &db, &smtp);
    // Commands whose acks the restart lost come back within seconds, before the count.
    config.nats.ack_wait_secs = ACK_WAIT.as_secs();
    let herald = TestHerald::start(config).await.expect("herald");
    let conn = herald_entities::connect(db.url(), 2).await.expect("db");
    herald_engine::bench::load::accept_via_nats(&conn, &nats.url(), 2_000, 200)
        .await
        .expect("accepted");
    smtp.wait_for_count(200, E2E_TIMEOUT)
        .await
        .expect("under way");
    nats.kill().await.expect("kill nats");
    nats.restart().await.expect("restart nats");
    // The engine reconnects by itself and drains the rest.
    let distinct = || {
        smtp.messages()
            .into_iter()
            .filter_map(|m| m.message_id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    eventually_showing(
        "all 2,000 notifications delivered after NATS came back",
        Duration::from_secs(120),
        || async {
            let distinct = distinct();
            (distinct == 2_000)
                .then_some(())
                .ok_or_else(|| format!("{distinct} distinct mails at the sink"))
        },
    )
    .await;
    // An ack lost while NATS was down has its command redelivered after `ack_wait`: count once
    // every command was delivered and a few `ack_wait`s more have passed. Not a synchronisation:
    // the window in which such a copy comes back and would be sent. ("Nothing awaiting an ack"
    // is not waited for: see `commands_delivered`.)
    nats.commands_delivered(E2E_TIMEOUT).await;
    tokio::time::sleep(ACK_WAIT * 3).await;
    let duplicates = smtp.count() - 2_000;
    // A copy redelivered while this process still works on the original is refused (in-flight
    // claim), so a server restart does not make the engine send twice.
    assert_eq!(duplicates, 0, "no notification sent twice");
    herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_command_of_a_newer_version_waits_for_an_upgraded_instance_then_dies() {
    const HOLDS: u64 = 4;
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let mut config = test_config(&nats, &db, &smtp);
    config.dispatch.newer_version_delay_ms = 300;
    config.dispatch.newer_version_max_deliveries = HOLDS;
    let herald = TestHerald::start(config).await.expect("herald");
    let client = nats.client().await.expect("client");
    let mut answers = client.subscribe("$JS.ACK.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    let js = async_nats::jetstream::new(client);

    // A stored notification whose command a newer build wrote, in a form this build would read
    // but for its version.
    let stored = herald_tests::queued_notification(None);
    let id = stored.id;
    herald_entities::repo::notifications::insert(herald.db(), stored)
        .await
        .expect("stored");
    let newer = u64::from(herald_nats::SCHEMA_VERSION) + 1;
    let command = json!({
        "v": newer,
        "notification_id": id,
        "contacts": { "email": "ada@example.com" },
        "category": "transactional",
        "channels": ["email"],
        "content": { "text": "Your order shipped." },
        "created_at": chrono::Utc::now(),
    });
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.to_string().as_str());
    js.publish_with_headers("notify.cmd.3", headers, command.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    // Every answer to the command until it is acked, with the delivery it answers.
    let mut seen: Vec<(u64, String)> = Vec::new();
    let deadline = tokio::time::Instant::now() + E2E_TIMEOUT;
    while !seen
        .iter()
        .any(|(_, body)| body.is_empty() || body == "+ACK")
    {
        let next = tokio::time::timeout_at(deadline, answers.next()).await;
        let Ok(Some(message)) = next else {
            panic!("the command was not acked within {E2E_TIMEOUT:?}; answers: {seen:?}");
        };
        if let Some((stream, delivered)) = herald_tests::delivered_of_ack(message.subject.as_str())
            && stream == "NOTIFY"
        {
            seen.push((delivered, String::from_utf8_lossy(&message.payload).into()));
        }
    }
    let held: Vec<u64> = seen
        .iter()
        .filter(|(_, body)| body.starts_with("-NAK"))
        .map(|(delivered, _)| *delivered)
        .collect();
    assert_eq!(
        held,
        (1..HOLDS).collect::<Vec<_>>(),
        "every delivery before the last was handed back: {seen:?}"
    );
    assert_eq!(
        seen.last().map(|(delivered, _)| *delivered),
        Some(HOLDS),
        "the last delivery dead-lettered and acked it: {seen:?}"
    );

    let js = async_nats::jetstream::new(nats.client().await.expect("client"));
    let stream = js.get_stream("NOTIFY_DLQ").await.expect("dlq stream");
    let letter = eventually("the dead letter", E2E_TIMEOUT, || async {
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await
            .ok()?;
        let mut messages = consumer.messages().await.ok()?;
        let message = tokio::time::timeout(Duration::from_millis(500), messages.next())
            .await
            .ok()??
            .ok()?;
        Some(message)
    })
    .await;
    let header = |name: &str| {
        letter
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    assert!(
        header("Herald-Dlq-Reason").contains(&format!("unknown schema version {newer}")),
        "{}",
        header("Herald-Dlq-Reason")
    );
    assert_eq!(header("Herald-Deliveries"), HOLDS.to_string());
    let dead = herald.wait_status(&id.to_string(), "dead").await;
    let reason = dead["status_reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(&format!("poison command: unknown schema version {newer}")),
        "the notification is dead with the poison's reason, not left queued: {dead}"
    );
    assert_eq!(smtp.count(), 0, "nothing was sent");
    herald.shutdown().await.expect("shutdown");
}

/// A readable send command larger than a dispatcher takes (`MAX_COMMAND_BYTES`, a constant of the
/// build, not a setting) is dead-lettered as poison at once and its notification recorded `dead`
/// with the reason; replayed, the same bytes would only be dead-lettered again. So its entry is
/// listed as not replayable, its replay is refused (409) with the reason, a filtered replay skips
/// it with the reason, and the entry stays.
#[tokio::test]
async fn an_oversized_command_is_not_replayable() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald");
    let stored = herald_tests::queued_notification(None);
    let id = stored.id;
    herald_entities::repo::notifications::insert(herald.db(), stored)
        .await
        .expect("stored");
    // Readable, but for its size.
    let command = json!({
        "v": herald_nats::SCHEMA_VERSION,
        "notification_id": id,
        "contacts": { "email": "ada@example.com" },
        "category": "transactional",
        "channels": ["email"],
        "content": { "text": "x".repeat(herald_nats::MAX_COMMAND_BYTES) },
        "created_at": chrono::Utc::now(),
    });
    let js = async_nats::jetstream::new(nats.client().await.expect("client"));
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.to_string().as_str());
    js.publish_with_headers("notify.cmd.3", headers, command.to_string().into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    let listed = || async {
        herald.get("/api/v1/dlq").await.1["items"]
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .find(|e| e["notification_id"] == id.to_string())
            })
            .cloned()
    };
    let entry = eventually("the command's dead letter listed", E2E_TIMEOUT, listed).await;
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("oversized command"), "{entry}");
    assert_eq!(entry["replayable"], false, "{entry}");
    let seq = entry["seq"].as_u64().expect("seq");

    let (status, answer) = herald
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("larger than a dispatcher takes"),
        "{message}"
    );
    let (status, report) = herald.post("/api/v1/dlq/replay", &json!({})).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{report}");
    assert_eq!(report["replayed"], json!([]), "{report}");
    assert_eq!(report["skipped"][0]["seq"], seq, "{report}");
    let skipped = report["skipped"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        skipped.contains("larger than a dispatcher takes"),
        "{report}"
    );

    let dead = herald.wait_status(&id.to_string(), "dead").await;
    let reason = dead["status_reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("poison command: oversized command"),
        "the notification is dead with the poison's reason, not left queued: {dead}"
    );
    assert_eq!(
        listed().await.map(|e| e["seq"].clone()),
        Some(json!(seq)),
        "the entry stays"
    );
    assert_eq!(smtp.count(), 0, "nothing sent");
    herald.shutdown().await.expect("shutdown");
}
