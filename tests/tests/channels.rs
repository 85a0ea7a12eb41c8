//! Channels and resilience end to end: providers over real HTTP to local servers speaking their
//! wire formats (wiremock), failover chains, the circuit breaker, retries with Retry-After, and
//! dead letters.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use herald_actors::channel::{
    push::PushConfig, sms::SmsConfig, telegram::TelegramConfig, webhook, webhook::WebhookConfig,
};
use herald_engine::Config;
use herald_tests::{
    E2E_TIMEOUT, HeraldProcess, NatsServer, SmtpSink, TestDatabase, TestHerald, eventually,
    eventually_showing, status_events, stored_status, test_config,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use wiremock::matchers::{bearer_token, body_partial_json, method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

struct World {
    _nats: NatsServer,
    smtp: SmtpSink,
    _db: TestDatabase,
    provider: MockServer,
    herald: TestHerald,
}

/// Herald with every provider pointed at one local mock server, tuned by `tune`.
async fn world(tune: impl FnOnce(&mut Config)) -> World {
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
    config.channels.sms = Some(SmsConfig {
        base_url: provider.uri(),
        account_sid: "AC1".into(),
        auth_token: "secret".into(),
        from: "+15005550006".into(),
        timeout_ms: 2_000,
        ..SmsConfig::default()
    });
    config.channels.push = Some(PushConfig {
        base_url: provider.uri(),
        project_id: "shop".into(),
        access_token: "token".into(),
        timeout_ms: 2_000,
        ..PushConfig::default()
    });
    config.channels.webhook = Some(WebhookConfig {
        secret: WEBHOOK_SECRET.into(),
        timeout_ms: 2_000,
        // The receivers are local mock servers.
        allow_private_targets: true,
        ..WebhookConfig::default()
    });
    tune(&mut config);
    let herald = TestHerald::start(config).await.expect("herald");
    World {
        _nats: nats,
        smtp,
        _db: db,
        provider,
        herald,
    }
}

fn notification(channels: &[&str], recipient: Value) -> Value {
    json!({
        "recipient": recipient,
        "category": "transactional",
        "channels": channels,
        "content": { "subject": "Order shipped", "text": "Your order #1001 is on its way.", "short": "Order #1001 shipped" }
    })
}

fn everyone() -> Value {
    json!({
        "email": "ada@example.com",
        "phone": "+4915112345678",
        "telegram_chat_id": "4242",
        "push_tokens": ["device-1"]
    })
}

/// Sends `body` and waits until it is sent; returns the notification.
async fn send_until_sent(w: &World, body: &Value) -> Value {
    let id = w.herald.send_accepted(body).await;
    w.herald.wait_status(&id, "sent").await
}

/// The (channel, status) of each attempt of `notification`, in order.
fn statuses(notification: &Value) -> Vec<(&str, &str)> {
    notification["attempts"]
        .as_array()
        .map(|attempts| {
            attempts
                .iter()
                .map(|a| {
                    (
                        a["channel"].as_str().unwrap_or_default(),
                        a["status"].as_str().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How many mails the SMTP sink took, once it took at least `n`.
async fn mails_received(w: &World, n: usize) -> usize {
    w.smtp
        .wait_for_count(n, E2E_TIMEOUT)
        .await
        .expect("mail")
        .len()
}

/// Every request the provider fake received.
async fn provider_requests(w: &World) -> Vec<wiremock::Request> {
    w.provider.received_requests().await.unwrap_or_default()
}

/// What `GET /api/v1/channels` says of `channel`.
async fn channel_state(w: &World, channel: &str) -> Value {
    let (_, channels) = w.herald.get("/api/v1/channels").await;
    channels
        .as_array()
        .and_then(|list| list.iter().find(|c| c["channel"] == channel))
        .cloned()
        .unwrap_or_else(|| panic!("{channel} listed: {channels}"))
}

/// Circuits that open after two failures within a minute.
fn open_circuits_after_two_failures(config: &mut Config) {
    config.channels.limits.circuit.failure_threshold = 2;
    config.channels.limits.circuit.window_ms = 60_000;
}

fn sms_path() -> wiremock::matchers::PathExactMatcher {
    path("/2010-04-01/Accounts/AC1/Messages.json")
}

/// Twilio's answer to every SMS.
fn sms(reply: ResponseTemplate) -> Mock {
    Mock::given(method("POST"))
        .and(sms_path())
        .respond_with(reply)
}

/// Twilio accepting every SMS as message `sid`.
fn sms_accepts(sid: &str) -> Mock {
    sms(ResponseTemplate::new(201).set_body_json(json!({"sid": sid})))
}

fn telegram_path() -> wiremock::matchers::PathExactMatcher {
    path("/bot42:TESTTOKEN/sendMessage")
}

/// Telegram's answer to every `sendMessage`.
fn telegram(reply: ResponseTemplate) -> Mock {
    Mock::given(method("POST"))
        .and(telegram_path())
        .respond_with(reply)
}

/// Telegram's answer to a `sendMessage` to `chat`.
fn telegram_to(chat: &str, reply: ResponseTemplate) -> Mock {
    Mock::given(method("POST"))
        .and(telegram_path())
        .and(body_partial_json(json!({"chat_id": chat})))
        .respond_with(reply)
}

fn telegram_ok() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"ok": true, "result": {"message_id": 9}}))
}

/// A Bot API error reply, with the `parameters` (`retry_after`, `migrate_to_chat_id`) some carry.
fn telegram_error(code: u16, description: &str, parameters: Option<Value>) -> ResponseTemplate {
    let mut body = json!({"ok": false, "error_code": code, "description": description});
    if let Some(parameters) = parameters {
        body["parameters"] = parameters;
    }
    ResponseTemplate::new(code).set_body_json(body)
}

/// Telegram refusing for good: the user blocked the bot.
fn telegram_blocked() -> ResponseTemplate {
    telegram_error(403, "Forbidden: bot was blocked by the user", None)
}

/// The Standard Webhooks signature computed from the specification alone (RustCrypto HMAC and
/// base64), not with Herald's code: `v1,` + base64(HMAC-SHA256(base64-decoded key after `whsec_`,
/// "{id}.{timestamp}.{body}")).
fn independent_signature(id: &str, timestamp: i64, body: &str) -> String {
    use base64::Engine;
    use hmac::Mac;
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(WEBHOOK_SECRET.trim_start_matches("whsec_"))
        .expect("key");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("hmac key");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", engine.encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn a_recipient_without_a_chat_id_fails_over_to_email_without_calling_telegram() {
    let w = world(|_| {}).await;
    let sent = send_until_sent(
        &w,
        &notification(&["telegram", "email"], json!({"email": "ada@example.com"})),
    )
    .await;
    assert_eq!(
        statuses(&sent),
        [("telegram", "no_contact"), ("email", "sent")]
    );
    assert!(
        provider_requests(&w).await.is_empty(),
        "Telegram was not called"
    );
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_channel_actor_crashing_under_traffic_loses_no_notification() {
    let w = world(|_| {}).await;
    telegram(telegram_ok().set_delay(Duration::from_millis(50)))
        .mount(&w.provider)
        .await;
    let channels = w.herald.app().channels().clone();
    let mut ids = Vec::new();
    for i in 0..40 {
        if i == 20 {
            channels
                .get(herald_nats::Channel::Telegram)
                .expect("telegram actor")
                .cast(herald_actors::channel::ChannelMsg::Crash)
                .expect("crash");
        }
        ids.push(
            w.herald
                .send_accepted(&notification(&["telegram"], everyone()))
                .await,
        );
    }
    for id in &ids {
        w.herald.wait_status(id, "sent").await;
    }
    let requests = provider_requests(&w).await.len();
    assert!(
        requests >= 40,
        "every notification reached Telegram ({requests} requests)"
    );
    let metrics = w.herald.metrics_text().await;
    assert!(metrics.contains("herald_actor_restarts_total{actor=\"channel\"}"));
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_failing_telegram_fails_over_to_email() {
    let w = world(|_| {}).await;
    telegram(ResponseTemplate::new(500).set_body_string("internal error"))
        .mount(&w.provider)
        .await;
    let sent = send_until_sent(&w, &notification(&["telegram", "email"], everyone())).await;
    assert_eq!(sent["final_channel"], "email");
    assert_eq!(statuses(&sent), [("telegram", "failed"), ("email", "sent")]);
    assert!(
        sent["attempts"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("500")
    );
    assert!(
        !sent.to_string().contains("TESTTOKEN"),
        "the bot token never leaks"
    );
    assert_eq!(mails_received(&w, 1).await, 1);
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn the_circuit_opens_stops_calling_the_provider_and_closes_after_a_good_probe() {
    let w = world(|c| {
        open_circuits_after_two_failures(c);
        c.channels.limits.circuit.cool_down_ms = 1_500;
    })
    .await;
    let outage = telegram(ResponseTemplate::new(503))
        .mount_as_scoped(&w.provider)
        .await;
    let mut last = Value::Null;
    for _ in 0..5 {
        last = send_until_sent(&w, &notification(&["telegram", "email"], everyone())).await;
    }
    assert_eq!(
        outage.received_requests().await.len(),
        2,
        "after two failures the open circuit keeps Telegram from being called"
    );
    assert_eq!(statuses(&last)[0], ("telegram", "circuit_open"));
    let state = channel_state(&w, "telegram").await;
    assert_eq!(state["circuit"], "open", "{state}");
    assert!(state["refused"].as_u64() >= Some(3));

    // Telegram recovers; after the cool-down one probe goes through and closes the circuit.
    drop(outage);
    telegram(telegram_ok()).mount(&w.provider).await;
    eventually(
        "the circuit to close after a good probe",
        Duration::from_secs(20),
        || async {
            let sent = send_until_sent(&w, &notification(&["telegram", "email"], everyone())).await;
            (sent["final_channel"] == "telegram").then_some(())
        },
    )
    .await;
    let state = channel_state(&w, "telegram").await;
    assert_eq!(state["circuit"], "closed", "{state}");
    w.herald.shutdown().await.expect("shutdown");
}

/// One notification that Telegram keeps failing (a 502 for its one chat) is retried to its last
/// round without opening the circuit for everyone: its failures count once. They used to count
/// once per round, so its own retries opened the circuit (and would have announced it to every
/// instance), and every other chat's notification was refused for the cool-down.
#[tokio::test]
async fn one_notifications_retries_do_not_open_the_circuit() {
    const THRESHOLD: u32 = 3;
    let w = world(|c| {
        c.channels.limits.circuit.failure_threshold = THRESHOLD;
        c.channels.limits.circuit.window_ms = 60_000;
        c.channels.limits.circuit.cool_down_ms = 600_000;
        c.dispatch.retry.max_deliveries = u64::from(THRESHOLD) + 2;
    })
    .await;
    let broken = telegram_to("broken", telegram_error(502, "Bad Gateway", None))
        .mount_as_scoped(&w.provider)
        .await;
    telegram(telegram_ok()).mount(&w.provider).await;
    let mut recipient = everyone();
    recipient["telegram_chat_id"] = json!("broken");
    let id = w
        .herald
        .send_accepted(&notification(&["telegram"], recipient))
        .await;
    let dead = w.herald.wait_status(&id, "dead").await;
    assert_eq!(
        statuses(&dead),
        vec![("telegram", "failed"); THRESHOLD as usize + 2],
        "every round reached Telegram: {dead}"
    );
    assert_eq!(
        broken.received_requests().await.len(),
        THRESHOLD as usize + 2
    );
    let state = channel_state(&w, "telegram").await;
    assert_eq!(state["circuit"], "closed", "{state}");
    assert_eq!(state["times_opened"], 0, "{state}");
    let other = send_until_sent(&w, &notification(&["telegram", "email"], everyone())).await;
    assert_eq!(statuses(&other), [("telegram", "sent")], "{other}");
    w.herald.shutdown().await.expect("shutdown");
}

/// A provider that hangs: the sends queued for its only concurrency slot when its circuit opens
/// never reach it and fail over to email at once, instead of each going out to the hanging
/// provider and waiting out the send timeout. They used to: the circuit was asked only when a send
/// arrived, not when it got its slot.
#[tokio::test]
async fn sends_queued_for_a_hanging_provider_fail_over_at_once_when_its_circuit_opens() {
    const TIMEOUT: Duration = Duration::from_millis(1_500);
    const NOTIFICATIONS: usize = 6;
    let w = world(|c| {
        c.channels.limits.concurrency = 1;
        c.channels.limits.timeout_ms = TIMEOUT.as_millis() as u64;
        c.channels.limits.circuit.failure_threshold = 1;
        c.channels.limits.circuit.window_ms = 60_000;
        c.channels.limits.circuit.cool_down_ms = 600_000;
    })
    .await;
    // Telegram takes the request and does not answer within any send's timeout.
    telegram(telegram_ok().set_delay(Duration::from_secs(30)))
        .mount(&w.provider)
        .await;
    let started = std::time::Instant::now();
    let ids = futures::future::join_all((0..NOTIFICATIONS).map(|_| {
        w.herald
            .send_accepted_owned(notification(&["telegram", "email"], everyone()))
    }))
    .await;
    let mut sent = Vec::new();
    for id in &ids {
        sent.push(w.herald.wait_status(id, "sent").await);
    }
    let took = started.elapsed();

    let requests = provider_requests(&w).await;
    assert_eq!(
        requests.len(),
        1,
        "only the send that opened the circuit reached Telegram, not the ones queued behind it"
    );
    let mut refused = 0;
    for notification in &sent {
        assert_eq!(notification["final_channel"], "email", "{notification}");
        match statuses(notification).as_slice() {
            [("telegram", "failed"), ("email", "sent")] => {}
            [("telegram", "circuit_open"), ("email", "sent")] => refused += 1,
            other => panic!("unexpected attempts {other:?}: {notification}"),
        }
    }
    assert_eq!(refused, NOTIFICATIONS - 1, "{sent:?}");
    // Each send that went out to the hanging provider took a whole timeout.
    assert!(
        took < TIMEOUT * 3,
        "the notifications took {took:?} to fail over, with a {TIMEOUT:?} send timeout"
    );
    let state = channel_state(&w, "telegram").await;
    assert_eq!(state["circuit"], "open", "{state}");
    assert_eq!(state["times_opened"], 1, "{state}");
    w.herald.shutdown().await.expect("shutdown");
}

/// A notification that finds its only channel's circuit half-open (the probe is out) is held for
/// the probe's result, and goes out as soon as the probe succeeds: not refused and retried once
/// the probe's result is due (the send timeout), nor a whole cool-down later as it once was,
/// with a healthy provider.
#[tokio::test]
async fn a_notification_arriving_while_the_probe_is_out_is_sent_once_the_probe_succeeds() {
    const COOL_DOWN: Duration = Duration::from_secs(15);
    const TIMEOUT: Duration = Duration::from_secs(4);
    const PROBE_TAKES: Duration = Duration::from_secs(3);
    let w = world(|c| {
        c.channels.limits.timeout_ms = TIMEOUT.as_millis() as u64;
        c.channels.limits.circuit.failure_threshold = 1;
        c.channels.limits.circuit.window_ms = 60_000;
        c.channels.limits.circuit.cool_down_ms = COOL_DOWN.as_millis() as u64;
        if let Some(telegram) = &mut c.channels.telegram {
            telegram.timeout_ms = TIMEOUT.as_millis() as u64;
        }
        // The default ceiling, not the tests' 1 s: a retry may wait for the circuit.
        c.dispatch.retry.max_delay_ms = 300_000;
    })
    .await;
    let telegram_only = || notification(&["telegram"], everyone());

    // The first notification's failure opens the circuit; it comes back after the cool-down
    // as the probe, which Telegram, recovered, takes a while to answer (only that one).
    let outage = telegram(ResponseTemplate::new(503))
        .mount_as_scoped(&w.provider)
        .await;
    let first = w.herald.send_accepted(&telegram_only()).await;
    eventually("the Telegram circuit to open", E2E_TIMEOUT, || async {
        (channel_state(&w, "telegram").await["circuit"] == "open").then_some(())
    })
    .await;
    drop(outage);
    telegram(telegram_ok().set_delay(PROBE_TAKES))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&w.provider)
        .await;
    telegram(telegram_ok()).mount(&w.provider).await;
    let half_open = eventually(
        "the probe to go out after the cool-down",
        COOL_DOWN + E2E_TIMEOUT,
        || async {
            let state = channel_state(&w, "telegram").await;
            (state["circuit"] == "half_open").then_some(state)
        },
    )
    .await;

    // A second notification arrives while the probe is out, and is held for its result.
    let accepted = std::time::Instant::now();
    let second = w.herald.send_accepted(&telegram_only()).await;
    eventually(
        "the second notification to be held beside the probe",
        PROBE_TAKES,
        || async {
            let state = channel_state(&w, "telegram").await;
            (state["circuit"] == "half_open" && state["in_flight"] == 2).then_some(())
        },
    )
    .await;
    let sent = w.herald.wait_status(&second, "sent").await;
    let took = accepted.elapsed();
    let state = channel_state(&w, "telegram").await;
    assert_eq!(
        state["refused"], half_open["refused"],
        "the second notification was refused while the probe was out, not held for its \
         result: {state} after {half_open}"
    );
    assert_eq!(statuses(&sent), [("telegram", "sent")], "{sent}");
    assert!(
        took < COOL_DOWN - Duration::from_secs(5),
        "refused while the probe was out, it was sent {took:?} after it was accepted: about the \
         {TIMEOUT:?} send timeout was expected, not the {COOL_DOWN:?} cool-down"
    );
    w.herald.wait_status(&first, "sent").await;
    assert_eq!(state["circuit"], "closed", "{state}");
    assert_eq!(state["times_opened"], 1, "{state}");
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_open_circuit_is_not_probed_before_the_providers_retry_after() {
    const COOL_DOWN: Duration = Duration::from_millis(200);
    let w = world(|c| {
        open_circuits_after_two_failures(c);
        c.channels.limits.circuit.cool_down_ms = COOL_DOWN.as_millis() as u64;
        // The default ceiling, not the tests' 1 s: a retry may wait for the circuit.
        c.dispatch.retry.max_delay_ms = 300_000;
    })
    .await;
    // Twilio down, asking to come back in an hour (more than max_cool_down_ms: 5 minutes).
    let outage = sms(ResponseTemplate::new(503).insert_header("Retry-After", "3600"))
        .mount_as_scoped(&w.provider)
        .await;
    for _ in 0..2 {
        let sent = send_until_sent(&w, &notification(&["sms", "email"], everyone())).await;
        assert_eq!(statuses(&sent)[0], ("sms", "failed"));
    }
    assert_eq!(
        outage.received_requests().await.len(),
        2,
        "the circuit opened"
    );

    // Many cool-downs pass (at least; a slow machine only makes it more), and every send finds
    // the circuit still open: without the Retry-After the first after 200 ms would have probed.
    let opened = std::time::Instant::now();
    let mut sends = 0;
    while sends < 3 || opened.elapsed() < COOL_DOWN * 10 {
        let sent = send_until_sent(&w, &notification(&["sms", "email"], everyone())).await;
        assert_eq!(
            statuses(&sent),
            [("sms", "circuit_open"), ("email", "sent")],
            "send {sends}, {:?} after the circuit opened",
            opened.elapsed()
        );
        sends += 1;
    }

    // With no other channel, the notification's retry waits for the circuit's real remaining time
    // (about 5 minutes, the cap), not the cool-down.
    let id = w
        .herald
        .send_accepted(&notification(&["sms"], everyone()))
        .await;
    let path = format!("/api/v1/notifications/{id}");
    let waiting_secs = eventually(
        "the SMS-only notification to wait for the circuit",
        E2E_TIMEOUT,
        || async {
            let (_, json) = w.herald.get(&path).await;
            let reason = json["status_reason"].as_str()?.to_string();
            let secs = reason.split("again in ").nth(1)?.split(' ').next()?;
            secs.parse::<u64>().ok()
        },
    )
    .await;
    assert!(
        waiting_secs >= 150,
        "the retry waits for the provider's Retry-After (capped at 300 s), not the 200 ms \
         cool-down: {waiting_secs} s"
    );
    assert_eq!(
        outage.received_requests().await.len(),
        2,
        "no probe reached the provider before its Retry-After"
    );
    let state = channel_state(&w, "sms").await;
    assert_eq!(state["circuit"], "open", "{state}");
    assert_eq!(state["times_opened"], 1, "{state}");
    let probe_at = state["probe_at"]
        .as_str()
        .and_then(|at| at.parse::<DateTime<Utc>>().ok())
        .unwrap_or_else(|| panic!("an open circuit says when it probes: {state}"));
    assert!(
        probe_at > Utc::now() + chrono::TimeDelta::seconds(150),
        "the probe waits for the Retry-After (capped at 300 s): {state}"
    );
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn retries_honour_retry_after_then_deliver() {
    let w = world(|_| {}).await;
    // Telegram asks to wait a second, once.
    telegram(telegram_error(
        429,
        "Too Many Requests: retry after 1",
        Some(json!({"retry_after": 1})),
    ))
    .up_to_n_times(1)
    .mount(&w.provider)
    .await;
    telegram(telegram_ok()).mount(&w.provider).await;
    let sent = send_until_sent(&w, &notification(&["telegram"], everyone())).await;
    assert_eq!(
        statuses(&sent),
        [("telegram", "failed"), ("telegram", "sent")]
    );
    let at = |i: usize| {
        sent["attempts"][i]["at"]
            .as_str()
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
            .expect("attempt time")
    };
    let waited = at(1) - at(0);
    assert!(
        waited >= chrono::Duration::milliseconds(950),
        "the retry waited for Retry-After (1 s), waited {waited}"
    );
    assert_eq!(sent["attempts"][1]["provider_message_id"], "9");
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn exhausted_retries_end_dead_in_the_dlq() {
    let w = world(|c| c.dispatch.retry.max_deliveries = 3).await;
    telegram(ResponseTemplate::new(503))
        .mount(&w.provider)
        .await;
    let id = w
        .herald
        .send_accepted(&notification(&["telegram"], everyone()))
        .await;
    let dead = w.herald.wait_status(&id, "dead").await;
    assert_eq!(statuses(&dead).len(), 3, "{dead}");
    assert!(
        dead["status_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("gave up after 3 rounds"),
        "{dead}"
    );
    let js = async_nats::jetstream::new(w._nats.client().await.expect("client"));
    let dlq = js.get_stream("NOTIFY_DLQ").await.expect("dlq");
    let message = dlq
        .get_last_raw_message_by_subject("notify.dlq.cmd")
        .await
        .expect("dead letter");
    let reason = message
        .headers
        .get("Herald-Dlq-Reason")
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(reason.contains("503"), "{reason}");
    let payload: Value = serde_json::from_slice(&message.payload).expect("original command");
    assert_eq!(payload["notification_id"], id.as_str());
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_2xx_reply_with_a_garbled_body_is_sent_once_without_failing_over() {
    let w = world(|_| {}).await;
    // A proxy's page, or a body cut off: the provider took the message all the same.
    let garbled = || ResponseTemplate::new(200).set_body_string("<html>upstream</html>");
    let telegram_requests = telegram(garbled()).mount_as_scoped(&w.provider).await;
    let fcm_requests = fcm("device-1", garbled())
        .mount_as_scoped(&w.provider)
        .await;
    for channel in ["telegram", "push"] {
        let sent = send_until_sent(&w, &notification(&[channel, "email"], everyone())).await;
        assert_eq!(statuses(&sent), [(channel, "sent")], "{sent}");
    }
    assert_eq!(telegram_requests.received_requests().await.len(), 1);
    assert_eq!(fcm_requests.received_requests().await.len(), 1);
    assert_eq!(w.smtp.count(), 0, "no failover to email");
    w.herald.shutdown().await.expect("shutdown");
}

/// A provider each of whose replies is cut off midway: `head` (a status line, and any headers),
/// then 7 bytes of the 100-byte body it announces, and the connection closed, as by a reset or a
/// timeout while the body is read. Answers any path, and counts the requests.
struct CutOffReplies {
    url: String,
    requests: Arc<AtomicUsize>,
}

impl CutOffReplies {
    async fn start(head: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    if read_request(&mut stream).await {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let reply = format!("{head}\r\nContent-Length: 100\r\n\r\n{{\"ok\":");
                        let _ = stream.write_all(reply.as_bytes()).await;
                    }
                });
            }
        });
        Self { url, requests }
    }

    /// The requests answered so far.
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads a request's head and its `Content-Length` body, so that the connection closes cleanly
/// after the reply (closed with the request unread, it could be reset before the client reads the
/// reply's head); false if the connection ended first.
async fn read_request(stream: &mut TcpStream) -> bool {
    let mut seen = Vec::new();
    let mut chunk = [0; 4096];
    while let Ok(read @ 1..) = stream.read(&mut chunk).await {
        seen.extend_from_slice(&chunk[..read]);
        let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if seen.len() >= end + 4 + length {
            return true;
        }
    }
    false
}

/// Points Telegram, SMS and push at `url`.
fn providers_at(config: &mut Config, url: &str) {
    if let Some(telegram) = config.channels.telegram.as_mut() {
        telegram.base_url = url.into();
    }
    if let Some(sms) = config.channels.sms.as_mut() {
        sms.base_url = url.into();
    }
    if let Some(push) = config.channels.push.as_mut() {
        push.base_url = url.into();
    }
}

/// A 2xx cut off before its body ends was taken by the provider (or the receiver): the message is
/// sent, once, without an id, and does not fail over.
#[tokio::test]
async fn a_2xx_reply_cut_off_midway_is_sent_once_without_failing_over() {
    let accepting = CutOffReplies::start("HTTP/1.1 200 OK").await;
    let w = world(|config| providers_at(config, &accepting.url)).await;
    let mut recipient = everyone();
    recipient["webhook_url"] = json!(format!("{}/hooks/shop-1", accepting.url));
    for (sent_before, channel) in ["telegram", "sms", "push", "webhook"].iter().enumerate() {
        let sent = send_until_sent(&w, &notification(&[channel, "email"], recipient.clone())).await;
        assert_eq!(statuses(&sent), [(*channel, "sent")], "{sent}");
        assert_eq!(
            accepting.requests(),
            sent_before + 1,
            "{channel} called once"
        );
    }
    assert_eq!(w.smtp.count(), 0, "no failover to email");
    w.herald.shutdown().await.expect("shutdown");
}

/// An error reply cut off before its body ends is judged by its status, as if its body said
/// nothing: a 400 refuses the message for good on every channel, rather than count as passing
/// trouble that is retried. The attempts of the providers that read the body say it was lost.
#[tokio::test]
async fn an_error_reply_cut_off_midway_is_judged_by_its_status() {
    let refusing = CutOffReplies::start("HTTP/1.1 400 Bad Request").await;
    let w = world(|config| providers_at(config, &refusing.url)).await;
    let mut recipient = everyone();
    recipient["webhook_url"] = json!(format!("{}/hooks/shop-1", refusing.url));
    let chain = ["telegram", "sms", "push", "webhook", "email"];
    let sent = send_until_sent(&w, &notification(&chain, recipient)).await;
    assert_eq!(
        statuses(&sent),
        [
            ("telegram", "rejected"),
            ("sms", "rejected"),
            ("push", "rejected"),
            ("webhook", "rejected"),
            ("email", "sent")
        ],
        "{sent}"
    );
    assert_eq!(refusing.requests(), 4, "each refused once");
    for attempt in &sent["attempts"].as_array().expect("attempts")[..3] {
        let error = attempt["error"].as_str().unwrap_or_default();
        assert!(
            error.ends_with("(the reply's body was lost midway)"),
            "{}: {error:?}",
            attempt["channel"]
        );
    }
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_default_chain_naming_a_channel_twice_walks_it_once() {
    let w = world(|config| {
        let chain = ["sms", "email", "sms"].map(String::from).to_vec();
        config
            .routing
            .default_chains
            .insert("transactional".into(), chain);
    })
    .await;
    let invalid_number = json!({"code": 21211, "message": "Invalid 'To' Phone Number"});
    let refusing = sms(ResponseTemplate::new(400).set_body_json(invalid_number))
        .mount_as_scoped(&w.provider)
        .await;
    let body = json!({
        "recipient": {"phone": "+4915112345678"},
        "category": "transactional",
        "content": {"subject": "Order shipped", "text": "Your order #1001 is on its way."}
    });
    let id = w.herald.send_accepted(&body).await;
    let failed = w.herald.wait_status(&id, "failed").await;
    assert_eq!(
        statuses(&failed),
        [("sms", "rejected"), ("email", "no_contact")],
        "{failed}"
    );
    assert_eq!(refusing.received_requests().await.len(), 1, "one SMS");
    w.herald.shutdown().await.expect("shutdown");
}

/// Readiness needs no key, and it showed each provider's last error: Twilio's text naming the
/// number it refused (an SMTP reply names the address the same way), to anyone who asked. It now
/// shows circuits and counters only; `GET /api/v1/channels` (a key with `read`) keeps the error.
#[tokio::test]
async fn readiness_does_not_show_a_provider_error_naming_a_recipient() {
    let w = world(|_| {}).await;
    let number = "+15551230042";
    let invalid_number = json!({
        "code": 21211,
        "message": format!("The 'To' number {number} is not a valid phone number.")
    });
    let _refusing = sms(ResponseTemplate::new(400).set_body_json(invalid_number))
        .mount_as_scoped(&w.provider)
        .await;
    let id = w
        .herald
        .send_accepted(&notification(&["sms"], json!({"phone": number})))
        .await;
    w.herald.wait_status(&id, "failed").await;
    let last_error = channel_state(&w, "sms").await["last_error"].clone();
    assert!(
        last_error.as_str().is_some_and(|e| e.contains(number)),
        "the channels API keeps the error: {last_error}"
    );

    let (_, ready) = w.herald.get("/health/ready").await;
    let sms = ready["channels"]
        .as_array()
        .and_then(|list| list.iter().find(|c| c["channel"] == "sms"))
        .cloned()
        .unwrap_or_else(|| panic!("sms listed: {ready}"));
    assert_eq!(sms["failed"], 1, "{ready}");
    assert!(
        !ready.to_string().contains(number),
        "readiness shows the recipient's number: {ready}"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// Twilio refusing the account (here a suspended one, 403 with its error 20403) fails every SMS
/// alike: each notification fails over to email, and the refusals count against the SMS circuit,
/// which opens and stops calling Twilio. They were taken for the recipients' failures for good:
/// `rejected`, never counted, and Twilio called for every notification.
#[tokio::test]
async fn a_twilio_refusal_of_the_account_opens_the_sms_circuit() {
    let w = world(open_circuits_after_two_failures).await;
    let suspended = json!({
        "code": 20403,
        "message": "403 Forbidden",
        "more_info": "https://www.twilio.com/docs/errors/20403",
        "status": 403
    });
    let refusing = sms(ResponseTemplate::new(403).set_body_json(suspended))
        .mount_as_scoped(&w.provider)
        .await;
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.push(send_until_sent(&w, &notification(&["sms", "email"], everyone())).await);
    }
    for notification in &sent[..2] {
        assert_eq!(
            statuses(notification),
            [("sms", "failed"), ("email", "sent")],
            "the account's refusal is transient: {notification}"
        );
        let error = notification["attempts"][0]["error"]
            .as_str()
            .unwrap_or_default();
        assert!(error.contains("20403"), "{error:?}");
    }
    assert_eq!(
        statuses(&sent[2]),
        [("sms", "circuit_open"), ("email", "sent")],
        "{}",
        sent[2]
    );
    assert_eq!(
        refusing.received_requests().await.len(),
        2,
        "after two refusals the open circuit keeps Twilio from being called"
    );
    let state = channel_state(&w, "sms").await;
    assert_eq!(state["circuit"], "open", "{state}");
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_permanent_error_moves_on_without_retrying_that_channel() {
    let w = world(|_| {}).await;
    let blocked = telegram(telegram_blocked())
        .mount_as_scoped(&w.provider)
        .await;
    sms_accepts("SM1").mount(&w.provider).await;
    let sent = send_until_sent(&w, &notification(&["telegram", "sms"], everyone())).await;
    assert_eq!(statuses(&sent), [("telegram", "rejected"), ("sms", "sent")]);
    assert_eq!(sent["attempts"][1]["provider_message_id"], "SM1");
    assert_eq!(blocked.received_requests().await.len(), 1);
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_provider_message_id_too_long_to_index_is_stored_cut_and_the_notification_sent() {
    let w = world(|_| {}).await;
    // 4,000 characters that do not compress: PostgreSQL refuses a btree entry over 2,704 bytes,
    // and delivery_attempts.provider_message_id is indexed for receipts.
    let sid: String = (0..125)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    assert_eq!(sid.len(), 4_000);
    sms_accepts(&sid).mount(&w.provider).await;
    let sent = send_until_sent(&w, &notification(&["sms"], everyone())).await;
    assert_eq!(statuses(&sent), [("sms", "sent")], "{sent}");
    // Kept as long as a receipt may name it (500 characters), so receipts still find it.
    assert_eq!(
        sent["attempts"][0]["provider_message_id"].as_str(),
        Some(&sid[..500]),
        "{sent}"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// Where Herald asks Twilio to post status callbacks: its public address behind a proxy, not the
/// address the test reaches it at, as Twilio signs the URL it was given.
const STATUS_CALLBACK: &str = "https://herald.example.com/api/v1/providers/twilio/status";

/// The form of Twilio's status callback for message `sid`, as Twilio sends it.
fn twilio_status_form(sid: &str, status: &str, error_code: Option<&str>) -> Vec<(String, String)> {
    let mut form: Vec<(String, String)> = [
        ("SmsSid", sid),
        ("SmsStatus", status),
        ("MessageStatus", status),
        ("To", "+4915112345678"),
        ("MessageSid", sid),
        ("AccountSid", "AC1"),
        ("From", "+15005550006"),
        ("ApiVersion", "2010-04-01"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    if let Some(code) = error_code {
        form.insert(0, ("ErrorCode".into(), code.into()));
    }
    form
}

/// Posts a Twilio status callback with `signature` in `X-Twilio-Signature`, as Twilio does (no
/// API key); returns the status and the JSON body.
async fn post_twilio_status(
    w: &World,
    form: &[(String, String)],
    signature: &str,
) -> (reqwest::StatusCode, Value) {
    let response = w
        .herald
        .anonymous()
        .post(format!(
            "{}/api/v1/providers/twilio/status",
            w.herald.base()
        ))
        .header("X-Twilio-Signature", signature)
        .form(form)
        .send()
        .await
        .expect("status callback posted");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The stored status of notification `id`, as the API shows it.
async fn status_of(w: &World, id: &str) -> String {
    let (_, notification) = w.herald.get(&format!("/api/v1/notifications/{id}")).await;
    notification["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Twilio's status callbacks end to end: each SMS names `channels.sms.status_callback_url` as its
/// `StatusCallback`; a callback signed with the auth token over that URL moves the notification on
/// (`delivered`, or `failed` with Twilio's error code for `undelivered`), one that is not is
/// refused with 403 and changes nothing, and a status that is no outcome (`sent`) is acknowledged.
/// The signatures were computed apart from Herald (Python's `hmac`, SHA-1, over the URL and the
/// parameters sorted by name, with the auth token `secret`).
#[tokio::test]
async fn twilio_status_callbacks_signed_over_the_configured_url_move_the_notification() {
    let w = world(|config| {
        if let Some(sms) = config.channels.sms.as_mut() {
            sms.status_callback_url = Some(STATUS_CALLBACK.into());
        }
    })
    .await;
    let accepted = sms_accepts("SMe2e").mount_as_scoped(&w.provider).await;
    let sent = send_until_sent(&w, &notification(&["sms"], everyone())).await;
    let id = sent["id"].as_str().expect("id").to_string();
    let requests = accepted.received_requests().await;
    let body = String::from_utf8_lossy(&requests[0].body);
    let form = reqwest::Url::parse(&format!("http://form/?{body}")).expect("form");
    let callback = form
        .query_pairs()
        .find(|(name, _)| name == "StatusCallback");
    assert_eq!(
        callback.map(|(_, url)| url.into_owned()),
        Some(format!("{STATUS_CALLBACK}?notification_id={id}")),
        "the configured URL, naming the notification: {body}"
    );
    drop(accepted);
    // The callbacks below are posted to the configured URL without the notification's id, as
    // for a message sent before Herald named it there: they name the message by `MessageSid`.

    let delivered = twilio_status_form("SMe2e", "delivered", None);
    let forged = "UiddZBNRMN2XXiVQYQmM1z8DupI="; // signed with another token
    for signature in [forged, "", "FnfGO7ltu8FwRicv7g0wgjPrflU=x"] {
        let (status, body) = post_twilio_status(&w, &delivered, signature).await;
        assert_eq!(
            status,
            reqwest::StatusCode::FORBIDDEN,
            "{signature:?}: {body}"
        );
        assert_eq!(body["code"], "forbidden", "{body}");
    }
    let mut tampered = delivered.clone();
    tampered[3].1 = "+4915100000000".into();
    let (status, body) = post_twilio_status(&w, &tampered, "FnfGO7ltu8FwRicv7g0wgjPrflU=").await;
    assert_eq!(
        status,
        reqwest::StatusCode::FORBIDDEN,
        "a changed parameter: {body}"
    );
    assert_eq!(status_of(&w, &id).await, "sent");

    let sent_callback = twilio_status_form("SMe2e", "sent", None);
    let (status, body) =
        post_twilio_status(&w, &sent_callback, "EHfsjgiLPyT3D1tAtMz2xa1kJAc=").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["receipt"], Value::Null, "{body}");
    assert_eq!(status_of(&w, &id).await, "sent");

    for applied in [true, false] {
        let (status, body) =
            post_twilio_status(&w, &delivered, "FnfGO7ltu8FwRicv7g0wgjPrflU=").await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        assert_eq!(body["receipt"]["notification_id"], id.as_str(), "{body}");
        assert_eq!(body["receipt"]["status"], "delivered", "{body}");
        assert_eq!(body["receipt"]["applied"], applied, "{body}");
    }
    assert_eq!(status_of(&w, &id).await, "delivered");

    sms_accepts("SMe2f").mount(&w.provider).await;
    let second = send_until_sent(&w, &notification(&["sms"], everyone())).await;
    let second = second["id"].as_str().expect("id");
    let undelivered = twilio_status_form("SMe2f", "undelivered", Some("30003"));
    let (status, body) = post_twilio_status(&w, &undelivered, "fStJKzndm6JBg1fmK5ZNvFpcYko=").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["receipt"]["status"], "failed", "{body}");
    let (_, failed) = w
        .herald
        .get(&format!("/api/v1/notifications/{second}"))
        .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|error| error.contains("Twilio error 30003")),
        "{failed}"
    );

    // The OpenAPI document describes the form and the signature header.
    let (_, spec) = w.herald.get("/api/openapi.json").await;
    let operation = &spec["paths"]["/api/v1/providers/twilio/status"]["post"];
    let form = &operation["requestBody"]["content"]["application/x-www-form-urlencoded"];
    assert_eq!(
        form["schema"]["$ref"], "#/components/schemas/TwilioStatusCallback",
        "{operation}"
    );
    let schema = &spec["components"]["schemas"]["TwilioStatusCallback"];
    assert_eq!(
        schema["required"],
        json!(["MessageSid", "MessageStatus"]),
        "{schema}"
    );
    assert_eq!(
        operation["parameters"][0]["name"], "X-Twilio-Signature",
        "{operation}"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// A Twilio stand-in that takes each message and holds its answer until the test releases it
/// with the SID to answer (201): meanwhile Herald's send is under way, and cannot be recorded.
struct HeldSms {
    url: String,
    messages: tokio::sync::mpsc::Receiver<HeldMessage>,
}

/// A message [`HeldSms`] took: its form, and the release of its answer (the SID to give).
struct HeldMessage {
    form: Vec<(String, String)>,
    release: tokio::sync::oneshot::Sender<String>,
}

impl HeldSms {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (taken, messages) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_held(stream, taken.clone()));
            }
        });
        Self { url, messages }
    }

    /// The next message Herald sent, once it has arrived.
    async fn next(&mut self) -> HeldMessage {
        tokio::time::timeout(E2E_TIMEOUT, self.messages.recv())
            .await
            .expect("Herald sends the SMS within the timeout")
            .expect("the stand-in runs")
    }
}

/// Reads one request, hands its form to the test and answers it with the SID the test releases
/// it with; closes the connection.
async fn serve_held(stream: TcpStream, taken: tokio::sync::mpsc::Sender<HeldMessage>) {
    use tokio::io::AsyncBufReadExt as _;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().expect("a Content-Length");
        }
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .await
        .expect("the request body");
    let form = url_form(&String::from_utf8_lossy(&body));
    let (release, released) = tokio::sync::oneshot::channel();
    if taken.send(HeldMessage { form, release }).await.is_err() {
        return;
    }
    let Ok(sid) = released.await else {
        return;
    };
    let reply = json!({ "sid": sid }).to_string();
    let response = format!(
        "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{reply}",
        reply.len()
    );
    let _ = reader.get_mut().write_all(response.as_bytes()).await;
}

/// The pairs of a form-encoded body.
fn url_form(body: &str) -> Vec<(String, String)> {
    reqwest::Url::parse(&format!("http://form/?{body}"))
        .expect("form")
        .query_pairs()
        .map(|(name, value)| (name.into_owned(), value.into_owned()))
        .collect()
}

/// Twilio's signature (base64 HMAC-SHA1 keyed by the auth token) of `form` posted to `url`: the
/// URL, then each parameter sorted by name, name then value. (The algorithm is checked against
/// signatures computed apart from Herald in
/// `twilio_status_callbacks_signed_over_the_configured_url_move_the_notification`.)
fn twilio_signature(auth_token: &str, url: &str, form: &[(String, String)]) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let mut mac =
        hmac::Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes()).expect("any key length");
    mac.update(url.as_bytes());
    let mut sorted: Vec<&(String, String)> = form.iter().collect();
    sorted.sort();
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A provider's receipt can beat Herald's record of the send: the provider answered, but the
/// StatusWriter writes `sent` a few milliseconds later (longer under load). Such a receipt was
/// refused 409 (by `notification_id`; by Twilio's `MessageSid`, not stored yet, 404), which
/// providers do not repeat, so the notification stayed `sent` for ever. Here the provider's
/// answer is held while the receipts come, which makes the race certain: they are now held
/// (202) and applied once the send is recorded, with their status events. Twilio's callback
/// names the notification in the URL Herald gave it, which Twilio signs.
#[tokio::test]
async fn receipts_that_come_before_the_send_is_recorded_are_applied_once_it_is() {
    let mut twilio = HeldSms::start().await;
    let url = twilio.url.clone();
    let w = world(|config| {
        if let Some(sms) = config.channels.sms.as_mut() {
            sms.base_url = url;
            // The answer waits for the test, however slow the machine.
            sms.timeout_ms = 60_000;
            sms.status_callback_url = Some(STATUS_CALLBACK.into());
        }
    })
    .await;
    let not_sent_yet = |status: &str| ["queued", "processing"].contains(&status);

    // A JSON receipt naming the notification, while Twilio holds its answer.
    let first = w
        .herald
        .send_accepted(&notification(&["sms"], everyone()))
        .await;
    let message = twilio.next().await;
    let callbacks = "/api/v1/providers/twilio/callbacks";
    let herald = &w.herald;
    let post = |body: Value| async move {
        herald
            .request_with_key(
                reqwest::Method::POST,
                callbacks,
                Some(herald.admin_key()),
                Some(&body),
            )
            .await
    };
    let delivered = json!({ "notification_id": first, "event": "delivered" });
    for _ in 0..2 {
        let (status, body) = post(delivered.clone()).await;
        assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["held"], true, "{body}");
        assert_eq!(body["applied"], false, "{body}");
        assert!(
            not_sent_yet(body["status"].as_str().unwrap_or("")),
            "{body}"
        );
    }
    // The other outcome conflicts with the held one, as with an applied one.
    let bounce = json!({ "notification_id": first, "event": "bounced", "error": "550 gone" });
    let (status, body) = post(bounce).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{body}");
    assert!(not_sent_yet(&status_of(&w, &first).await));
    message.release.send("SMheld1".into()).expect("released");
    let done = w.herald.wait_status(&first, "delivered").await;
    assert_eq!(done["final_channel"], "sms", "{done}");
    assert!(done["sent_at"].is_string(), "{done}");
    let uuid: uuid::Uuid = first.parse().expect("an id");
    let events = eventually("the delivered event", E2E_TIMEOUT, || async {
        let events = status_events(&w._nats, "delivered", uuid).await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["channel"], "sms", "{events:?}");
    // The held receipt's move is dated as the send's (or just after): its event follows the
    // send's in the stream, so that an observer reading it in order ends at `delivered`.
    let order: Vec<String> = herald_tests::all_status_events(&w._nats, uuid)
        .await
        .into_iter()
        .map(|(subject, _)| subject)
        .collect();
    assert_eq!(
        order,
        ["notify.status.sent", "notify.status.delivered"],
        "the events of the send and its held receipt, in the stream's order"
    );
    // Once applied, the receipt again is a repeat.
    let (status, body) = post(delivered).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["applied"], false, "{body}");
    assert_eq!(body["held"], false, "{body}");
    assert_eq!(body["status"], "delivered", "{body}");

    // Twilio's own callback, while it holds its answer: the callback URL Herald gave it names
    // the notification.
    let second = w
        .herald
        .send_accepted(&notification(&["sms"], everyone()))
        .await;
    let message = twilio.next().await;
    let callback_url = message
        .form
        .iter()
        .find(|(name, _)| name == "StatusCallback")
        .map(|(_, url)| url.clone())
        .expect("a StatusCallback");
    assert_eq!(
        callback_url,
        format!("{STATUS_CALLBACK}?notification_id={second}")
    );
    let undelivered = twilio_status_form("SMheld2", "undelivered", Some("30007"));
    let signature = twilio_signature("secret", &callback_url, &undelivered);
    let response = w
        .herald
        .anonymous()
        .post(format!(
            "{}/api/v1/providers/twilio/status?notification_id={second}",
            w.herald.base()
        ))
        .header("X-Twilio-Signature", signature)
        .form(&undelivered)
        .send()
        .await
        .expect("status callback posted");
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["receipt"]["held"], true, "{body}");
    assert!(not_sent_yet(&status_of(&w, &second).await));
    message.release.send("SMheld2".into()).expect("released");
    let failed = w.herald.wait_status(&second, "failed").await;
    assert_eq!(failed["final_channel"], "sms", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|error| error.contains("Twilio error 30007")),
        "{failed}"
    );
    let uuid: uuid::Uuid = second.parse().expect("an id");
    eventually("the failed event", E2E_TIMEOUT, || async {
        let events = status_events(&w._nats, "failed", uuid).await;
        (!events.is_empty()).then_some(())
    })
    .await;

    // A callback naming a notification Herald does not have is still refused 404.
    let stranger = uuid::Uuid::now_v7();
    let url = format!("{STATUS_CALLBACK}?notification_id={stranger}");
    let delivered = twilio_status_form("SMnone", "delivered", None);
    let response = w
        .herald
        .anonymous()
        .post(format!(
            "{}/api/v1/providers/twilio/status?notification_id={stranger}",
            w.herald.base()
        ))
        .header(
            "X-Twilio-Signature",
            twilio_signature("secret", &url, &delivered),
        )
        .form(&delivered)
        .send()
        .await
        .expect("status callback posted");
    assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND);
    w.herald.shutdown().await.expect("shutdown");
}

/// Failover can leave two providers' receipts for one notification: the relay timed out but
/// took the message (its `delivered` receipt comes), and the chain moved on to Twilio, which sent
/// it too. Both receipts can beat the record of the send. Only one receipt was held per
/// notification, so Twilio's got 409 (which Twilio does not retry), and when the send was
/// recorded (by Twilio) the relay's was dropped: the notification stayed `sent` for ever. Each
/// provider's receipt is now held, and the one from the provider that sent it applies.
#[tokio::test]
async fn held_receipts_of_two_providers_apply_the_one_that_sent_it() {
    let mut twilio = HeldSms::start().await;
    let url = twilio.url.clone();
    let w = world(|config| {
        if let Some(sms) = config.channels.sms.as_mut() {
            sms.base_url = url;
            sms.timeout_ms = 60_000;
        }
    })
    .await;
    let id = w
        .herald
        .send_accepted(&notification(&["sms"], everyone()))
        .await;
    let message = twilio.next().await;
    let herald = &w.herald;
    let post = |provider: &'static str, body: Value| async move {
        herald
            .request_with_key(
                reqwest::Method::POST,
                &format!("/api/v1/providers/{provider}/callbacks"),
                Some(herald.admin_key()),
                Some(&body),
            )
            .await
    };
    let delivered = json!({ "notification_id": id, "event": "delivered" });
    for provider in ["smtp", "twilio"] {
        let (status, body) = post(provider, delivered.clone()).await;
        assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{provider}: {body}");
        assert_eq!(body["held"], true, "{provider}: {body}");
    }
    // A second receipt from the same provider with another outcome still conflicts.
    let bounce = json!({ "notification_id": id, "event": "bounced", "error": "550 gone" });
    let (status, body) = post("twilio", bounce).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{body}");
    message.release.send("SMtwo".into()).expect("released");
    let done = w.herald.wait_status(&id, "delivered").await;
    assert_eq!(done["final_channel"], "sms", "{done}");
    let uuid: uuid::Uuid = id.parse().expect("an id");
    let events = eventually("the delivered event", E2E_TIMEOUT, || async {
        let events = status_events(&w._nats, "delivered", uuid).await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    // The relay's receipt was not applied: it did not send the message.
    let (status, body) = post("smtp", delivered).await;
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{body}");
    w.herald.shutdown().await.expect("shutdown");
}

/// Stores customer `id` with `contacts` through the API.
async fn store_customer(w: &World, id: &str, contacts: Value) {
    let mut body = contacts;
    body["id"] = json!(id);
    let (status, answer) = w.herald.post("/api/v1/customers", &body).await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{answer}");
}

/// The stored customer `id`, as the API shows it.
async fn stored_customer(w: &World, id: &str) -> Value {
    let (status, customer) = w.herald.get(&format!("/api/v1/customers/{id}")).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{customer}");
    customer
}

/// A chat that blocked the bot is forgotten on the stored customer, so the next notification
/// does not call Telegram for it. A dead chat given inline in the request is not stored: the
/// customer's own chat id stays.
#[tokio::test]
async fn a_chat_that_blocked_the_bot_is_forgotten_on_the_customer() {
    let w = world(|_| {}).await;
    let blocked = telegram_to("4242", telegram_blocked())
        .mount_as_scoped(&w.provider)
        .await;
    let contacts = |chat: &str| json!({"email": "ada@example.com", "telegram_chat_id": chat});
    store_customer(&w, "ada", contacts("4242")).await;
    store_customer(&w, "bob", contacts("7777")).await;
    let to = |recipient: Value| notification(&["telegram", "email"], recipient);
    let rejected_then_mailed = [("telegram", "rejected"), ("email", "sent")];

    let sent = send_until_sent(&w, &to(json!({"customer_id": "ada"}))).await;
    assert_eq!(statuses(&sent), rejected_then_mailed, "{sent}");
    let ada = stored_customer(&w, "ada").await;
    assert!(
        ada["telegram_chat_id"].is_null(),
        "chat id forgotten: {ada}"
    );
    assert_eq!(ada["email"], "ada@example.com", "{ada}");

    let sent = send_until_sent(&w, &to(json!({"customer_id": "ada"}))).await;
    assert_eq!(
        statuses(&sent),
        [("telegram", "no_contact"), ("email", "sent")],
        "{sent}"
    );
    assert_eq!(
        blocked.received_requests().await.len(),
        1,
        "the forgotten chat is not tried again"
    );

    let inline = json!({"customer_id": "bob", "telegram_chat_id": "4242"});
    let sent = send_until_sent(&w, &to(inline)).await;
    assert_eq!(statuses(&sent), rejected_then_mailed, "{sent}");
    let bob = stored_customer(&w, "bob").await;
    assert_eq!(bob["telegram_chat_id"], "7777", "{bob}");
    w.herald.shutdown().await.expect("shutdown");
}

/// A group upgraded to a supergroup gets the message at its new chat id, which the stored
/// customer then holds, so the next notification goes there at once. A moved chat given inline
/// in the request is not stored: the customer's own chat id stays.
#[tokio::test]
async fn a_group_upgraded_to_a_supergroup_is_followed_to_its_new_chat_id() {
    let w = world(|_| {}).await;
    let moved = telegram_error(
        400,
        "Bad Request: group chat was upgraded to a supergroup chat",
        Some(json!({"migrate_to_chat_id": -1_004_242_i64})),
    );
    let upgraded = telegram_to("-4242", moved)
        .mount_as_scoped(&w.provider)
        .await;
    let supergroup = telegram_to("-1004242", telegram_ok())
        .mount_as_scoped(&w.provider)
        .await;
    store_customer(&w, "ada", json!({"telegram_chat_id": "-4242"})).await;
    store_customer(&w, "bob", json!({"telegram_chat_id": "7777"})).await;
    let to = |recipient: Value| notification(&["telegram"], recipient);

    for round in 1..=2 {
        let sent = send_until_sent(&w, &to(json!({"customer_id": "ada"}))).await;
        assert_eq!(
            statuses(&sent),
            [("telegram", "sent")],
            "send {round}: {sent}"
        );
        assert_eq!(
            sent["attempts"][0]["provider_message_id"], "9",
            "send {round}: {sent}"
        );
        let ada = stored_customer(&w, "ada").await;
        assert_eq!(ada["telegram_chat_id"], "-1004242", "send {round}: {ada}");
    }
    assert_eq!(
        upgraded.received_requests().await.len(),
        1,
        "the old group id is tried once, then the new one straight away"
    );
    assert_eq!(supergroup.received_requests().await.len(), 2);

    let inline = json!({"customer_id": "bob", "telegram_chat_id": "-4242"});
    send_until_sent(&w, &to(inline)).await;
    let bob = stored_customer(&w, "bob").await;
    assert_eq!(bob["telegram_chat_id"], "7777", "{bob}");
    let counted = w
        .herald
        .metric("herald_contacts_moved_total", &[("channel", "telegram")])
        .await;
    assert!(counted > 0.0, "the move is counted: {counted}");
    w.herald.shutdown().await.expect("shutdown");
}

fn fcm_path() -> wiremock::matchers::PathExactMatcher {
    path("/v1/projects/shop/messages:send")
}

/// FCM's answer to a send to `token`.
fn fcm(token: &str, reply: ResponseTemplate) -> Mock {
    Mock::given(method("POST"))
        .and(fcm_path())
        .and(body_partial_json(json!({"message": {"token": token}})))
        .respond_with(reply)
}

/// FCM accepting a message as `name`.
fn fcm_accepted(name: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"name": name}))
}

/// An FCM error reply, as FCM HTTP v1 words them.
fn fcm_error(code: u16, status: &str, error_code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(code).set_body_json(json!({"error": {
        "code": code, "message": message, "status": status,
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                     "errorCode": error_code}]
    }}))
}

/// FCM's answer for a token no app holds any more (uninstalled): dead for good.
fn fcm_unregistered() -> ResponseTemplate {
    fcm_error(
        404,
        "NOT_FOUND",
        "UNREGISTERED",
        "Requested entity was not found.",
    )
}

/// Every push token FCM declares dead is removed from the stored customer, also when another of
/// its devices took the message; the good token stays and is the only one called next time.
#[tokio::test]
async fn every_dead_push_token_is_removed_and_the_good_one_kept() {
    let w = world(|_| {}).await;
    let invalid = fcm_error(
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
    );
    let uninstalled = fcm("dead-1", fcm_unregistered())
        .mount_as_scoped(&w.provider)
        .await;
    let garbage = fcm("dead-2", invalid).mount_as_scoped(&w.provider).await;
    let good = fcm("device-ok", fcm_accepted("projects/shop/messages/1"))
        .mount_as_scoped(&w.provider)
        .await;
    store_customer(
        &w,
        "cy",
        json!({"push_tokens": ["dead-1", "device-ok", "dead-2"]}),
    )
    .await;

    for round in 1..=2 {
        let sent =
            send_until_sent(&w, &notification(&["push"], json!({"customer_id": "cy"}))).await;
        assert_eq!(
            sent["attempts"][0]["provider_message_id"], "projects/shop/messages/1",
            "send {round}: {sent}"
        );
        let cy = stored_customer(&w, "cy").await;
        assert_eq!(
            cy["push_tokens"],
            json!(["device-ok"]),
            "send {round}: {cy}"
        );
    }
    assert_eq!(
        uninstalled.received_requests().await.len(),
        1,
        "dead-1 once"
    );
    assert_eq!(garbage.received_requests().await.len(), 1, "dead-2 once");
    assert_eq!(
        good.received_requests().await.len(),
        2,
        "the good device twice"
    );
    let counted = w
        .herald
        .metric("herald_contacts_forgotten_total", &[("channel", "push")])
        .await;
    assert!(counted > 0.0, "the forgetting is counted: {counted}");
    w.herald.shutdown().await.expect("shutdown");
}

/// A push that fails for now (one device's FCM answers 503) while another device's token is dead
/// fails over to email, and the dead token is forgotten all the same: no later push would be sure
/// to succeed or fail for good and forget it then. The device that only failed for now is kept.
#[tokio::test]
async fn a_dead_push_token_is_forgotten_when_the_push_fails_over_to_email() {
    let w = world(|_| {}).await;
    let unavailable = fcm_error(
        503,
        "UNAVAILABLE",
        "UNAVAILABLE",
        "The service is currently unavailable.",
    );
    let dead = fcm("dead", fcm_unregistered())
        .mount_as_scoped(&w.provider)
        .await;
    let flaky = fcm("flaky", unavailable).mount_as_scoped(&w.provider).await;
    store_customer(
        &w,
        "cz",
        json!({"email": "ada@example.com", "push_tokens": ["dead", "flaky"]}),
    )
    .await;

    let sent = send_until_sent(
        &w,
        &notification(&["push", "email"], json!({"customer_id": "cz"})),
    )
    .await;
    assert_eq!(
        statuses(&sent),
        [("push", "failed"), ("email", "sent")],
        "{sent}"
    );
    let cz = stored_customer(&w, "cz").await;
    assert_eq!(
        cz["push_tokens"],
        json!(["flaky"]),
        "the dead token is forgotten, the flaky one kept: {cz}"
    );
    assert_eq!(dead.received_requests().await.len(), 1, "dead once");
    assert_eq!(flaky.received_requests().await.len(), 1, "flaky once");
    assert_eq!(mails_received(&w, 1).await, 1);
    w.herald.shutdown().await.expect("shutdown");
}

/// FCM answers 401 `THIRD_PARTY_AUTH_ERROR` when the APNs credentials stored in Firebase are
/// invalid (an expired certificate): every iPhone push fails over to the next channel at once,
/// the iPhone's token is kept, Herald's own Google token is kept (fetched once), and the push
/// circuit stays closed, so Android devices still get their pushes.
#[tokio::test]
async fn an_apns_credential_fcm_cannot_use_fails_over_at_once_and_keeps_push_open() {
    let keys = tempfile::tempdir().expect("dir");
    let w = world(|config| {
        authenticate_push_with_a_service_account(config, keys.path());
        open_circuits_after_two_failures(config);
    })
    .await;
    let token_endpoint = google_token_endpoint().mount_as_scoped(&w.provider).await;
    let apns_expired = fcm_error(
        401,
        "UNAUTHENTICATED",
        "THIRD_PARTY_AUTH_ERROR",
        "Request is missing required authentication credential.",
    );
    let iphone = fcm("iphone", apns_expired)
        .mount_as_scoped(&w.provider)
        .await;
    let android = fcm("android", fcm_accepted("projects/shop/messages/a"))
        .mount_as_scoped(&w.provider)
        .await;
    store_customer(
        &w,
        "ios-user",
        json!({"email": "ada@example.com", "push_tokens": ["iphone"]}),
    )
    .await;

    for _ in 0..3 {
        let sent = send_until_sent(
            &w,
            &notification(&["push", "email"], json!({"customer_id": "ios-user"})),
        )
        .await;
        assert_eq!(
            statuses(&sent),
            [("push", "rejected"), ("email", "sent")],
            "{sent}"
        );
        assert_eq!(sent["attempts"].as_array().map(Vec::len), Some(2), "{sent}");
    }
    assert_eq!(
        iphone.received_requests().await.len(),
        3,
        "once each, no retry"
    );
    let pushed = send_until_sent(
        &w,
        &notification(&["push"], json!({"push_tokens": ["android"]})),
    )
    .await;
    assert_eq!(statuses(&pushed), [("push", "sent")]);
    assert_eq!(android.received_requests().await.len(), 1);
    let push = channel_state(&w, "push").await;
    assert_eq!(push["circuit"], "closed", "{push}");
    assert_eq!(
        token_endpoint.received_requests().await.len(),
        1,
        "Herald's Google token was not refused, so not fetched again"
    );
    let customer = stored_customer(&w, "ios-user").await;
    assert_eq!(customer["push_tokens"], json!(["iphone"]), "{customer}");
    assert_eq!(mails_received(&w, 3).await, 3);
    w.herald.shutdown().await.expect("shutdown");
}

/// A throwaway key, also used by the provider's own tests.
const SERVICE_ACCOUNT_KEY: &str =
    include_str!("../../actors/src/channel/testdata/service_account_key.pem");

/// Points push at a service account key in `dir` whose token endpoint is the provider fake's
/// `/token`, in place of the fixed token.
fn authenticate_push_with_a_service_account(config: &mut Config, dir: &std::path::Path) {
    let push = config.channels.push.as_mut().expect("push configured");
    let key = dir.join("service-account.json");
    let file = json!({
        "type": "service_account",
        "client_email": "herald@shop.iam.gserviceaccount.com",
        "private_key": SERVICE_ACCOUNT_KEY,
        "token_uri": format!("{}/token", push.base_url),
    });
    std::fs::write(&key, file.to_string()).expect("key file");
    push.service_account_file = Some(key);
    push.access_token.clear();
}

/// Google's token endpoint (at the provider fake's `/token`) granting an access token.
fn google_token_endpoint() -> Mock {
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "ya29.e2e", "expires_in": 3599})),
        )
}

/// A webhook receiver at `/hooks/…` on the provider fake, answering 204.
fn webhook_receiver() -> Mock {
    Mock::given(method("POST"))
        .and(path_regex("^/hooks/.*"))
        .respond_with(ResponseTemplate::new(204))
}

#[tokio::test]
async fn push_and_signed_webhooks_are_delivered() {
    let keys = tempfile::tempdir().expect("dir");
    let w = world(|config| authenticate_push_with_a_service_account(config, keys.path())).await;
    google_token_endpoint().expect(1).mount(&w.provider).await;
    Mock::given(method("POST"))
        .and(fcm_path())
        .and(bearer_token("ya29.e2e"))
        .respond_with(fcm_accepted("projects/shop/messages/1"))
        .mount(&w.provider)
        .await;
    webhook_receiver().mount(&w.provider).await;
    let push = w
        .herald
        .send_accepted(&notification(&["push"], everyone()))
        .await;
    let hook = w
        .herald
        .send_accepted(&notification(
            &["webhook"],
            json!({"webhook_url": format!("{}/hooks/shop-1", w.provider.uri())}),
        ))
        .await;
    let pushed = w.herald.wait_status(&push, "sent").await;
    assert_eq!(
        pushed["attempts"][0]["provider_message_id"],
        "projects/shop/messages/1"
    );
    w.herald.wait_status(&hook, "sent").await;

    let requests = provider_requests(&w).await;
    let request = requests
        .iter()
        .find(|r| r.url.path().starts_with("/hooks/"))
        .expect("webhook request");
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(
        header("webhook-id"),
        hook,
        "the notification id is the receiver's idempotency key"
    );
    let key = webhook::decode_secret(WEBHOOK_SECRET).expect("secret");
    let body = String::from_utf8(request.body.clone()).expect("utf-8 body");
    let timestamp: i64 = header("webhook-timestamp").parse().expect("timestamp");
    assert!(
        webhook::verify(
            &key,
            &hook,
            timestamp,
            body.as_bytes(),
            &header("webhook-signature")
        ),
        "the receiver can verify the signature"
    );
    assert_eq!(
        header("webhook-signature"),
        independent_signature(&hook, timestamp, &body),
        "an independent implementation of the scheme computes the same signature"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// A customer's own webhook secret, as `whsec_` + base64 of a 32-byte key.
const OWN_WEBHOOK_SECRET: &str = "whsec_c2hvcC1hIGtlZXBzIGl0cyBvd24gMzItYnl0ZSBrZXk=";

/// The webhook the provider fake received at `path`, with its id, timestamp, body and signature.
async fn received_webhook(w: &World, path: &str) -> (String, i64, String, String) {
    let requests = provider_requests(w).await;
    let request = requests
        .iter()
        .find(|r| r.url.path() == path)
        .unwrap_or_else(|| panic!("no webhook at {path}"));
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let timestamp = header("webhook-timestamp").parse().expect("timestamp");
    let body = String::from_utf8(request.body.clone()).expect("utf-8 body");
    (
        header("webhook-id"),
        timestamp,
        body,
        header("webhook-signature"),
    )
}

/// Whether `secret` verifies the webhook received at `path`.
async fn verifies_with(w: &World, path: &str, secret: &str) -> bool {
    let (id, timestamp, body, signature) = received_webhook(w, path).await;
    let key = webhook::decode_secret(secret).expect("secret");
    webhook::verify(&key, &id, timestamp, body.as_bytes(), &signature)
}

/// A customer with a webhook secret of its own gets webhooks signed with it, which the global
/// secret does not verify: a receiver holding the global secret cannot forge them. A customer
/// without one gets the global secret's, and so does a send that names another URL than the one
/// the secret was stored for. The API never shows the secret.
#[tokio::test]
async fn a_customers_own_webhook_secret_signs_its_webhooks() {
    let w = world(|_| {}).await;
    webhook_receiver().mount(&w.provider).await;
    let hooks = format!("{}/hooks", w.provider.uri());
    store_customer(
        &w,
        "shop-a",
        json!({"webhook_url": format!("{hooks}/shop-a"), "webhook_secret": OWN_WEBHOOK_SECRET}),
    )
    .await;
    store_customer(
        &w,
        "shop-b",
        json!({"webhook_url": format!("{hooks}/shop-b")}),
    )
    .await;
    let a = stored_customer(&w, "shop-a").await;
    assert_eq!(a["webhook_secret_set"], true, "{a}");
    assert!(a.get("webhook_secret").is_none(), "{a}");
    assert!(
        !a.to_string()
            .contains(OWN_WEBHOOK_SECRET.trim_start_matches("whsec_"))
    );
    assert_eq!(
        stored_customer(&w, "shop-b").await["webhook_secret_set"],
        false
    );

    for (customer, recipient) in [
        ("shop-a", json!({"customer_id": "shop-a"})),
        ("shop-b", json!({"customer_id": "shop-b"})),
        (
            "shop-a elsewhere",
            json!({"customer_id": "shop-a", "webhook_url": format!("{hooks}/elsewhere")}),
        ),
    ] {
        let id = w
            .herald
            .send_accepted(&notification(&["webhook"], recipient))
            .await;
        let sent = w.herald.wait_status(&id, "sent").await;
        assert_eq!(statuses(&sent), [("webhook", "sent")], "{customer}: {sent}");
    }

    assert!(
        verifies_with(&w, "/hooks/shop-a", OWN_WEBHOOK_SECRET).await,
        "shop-a's own secret verifies its webhook"
    );
    assert!(
        !verifies_with(&w, "/hooks/shop-a", WEBHOOK_SECRET).await,
        "the global secret does not verify shop-a's webhook"
    );
    assert!(
        verifies_with(&w, "/hooks/shop-b", WEBHOOK_SECRET).await,
        "a customer without a secret of its own gets the global secret's signature"
    );
    assert!(
        verifies_with(&w, "/hooks/elsewhere", WEBHOOK_SECRET).await,
        "a URL given in the send is signed with the global secret"
    );
    assert!(
        !verifies_with(&w, "/hooks/elsewhere", OWN_WEBHOOK_SECRET).await,
        "the customer's secret signs only for its stored URL"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// Another customer secret and another global one, to rotate to and from.
const NEW_WEBHOOK_SECRET: &str = "whsec_c2hvcC1hIHJvdGF0ZXMgdG8gdGhpcyBuZXcga2V5";
const OLD_WEBHOOK_SECRET: &str = "whsec_YSBnbG9iYWwgc2VjcmV0IHNpbmNlIHJlcGxhY2Vk";

/// The signatures of the webhook sent for notification `id`, each checked on its own: for each,
/// which of `secrets` verify it.
async fn signed_by<'a>(w: &World, id: &str, secrets: &[&'a str]) -> Vec<Vec<&'a str>> {
    let requests = provider_requests(w).await;
    let request = requests
        .iter()
        .find(|r| r.headers.get("webhook-id").and_then(|v| v.to_str().ok()) == Some(id))
        .unwrap_or_else(|| panic!("no webhook for {id}"));
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let timestamp: i64 = header("webhook-timestamp").parse().expect("timestamp");
    header("webhook-signature")
        .split(' ')
        .map(|signature| {
            secrets
                .iter()
                .copied()
                .filter(|secret| {
                    let key = webhook::decode_secret(secret).expect("secret");
                    webhook::verify(&key, id, timestamp, &request.body, signature)
                })
                .collect()
        })
        .collect()
}

/// Sends a webhook to `recipient` and waits until it is sent; returns the notification id.
async fn send_webhook(w: &World, recipient: Value) -> String {
    let id = w
        .herald
        .send_accepted(&notification(&["webhook"], recipient))
        .await;
    let sent = w.herald.wait_status(&id, "sent").await;
    assert_eq!(statuses(&sent), [("webhook", "sent")], "{sent}");
    id
}

/// `PUT /api/v1/customers/{id}` with `body`, answered 200.
async fn put_customer(w: &World, id: &str, body: Value) {
    let (status, answer) = w
        .herald
        .put(&format!("/api/v1/customers/{id}"), &body)
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{answer}");
}

/// Dates the replacement of customer `id`'s webhook secret `age` back, as if made that long ago.
async fn age_secret_replacement(w: &World, id: &str, age: chrono::TimeDelta) {
    use herald_entities::customer;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, sea_query::Expr};
    let aged = customer::Entity::update_many()
        .col_expr(
            customer::Column::WebhookSecretReplacedAt,
            Expr::value(Utc::now() - age),
        )
        .filter(customer::Column::ExternalId.eq(id))
        .exec(w.herald.db())
        .await
        .expect("replacement dated back");
    assert_eq!(aged.rows_affected, 1, "customer {id} stored");
}

/// Replacing a customer's secret for the same URL keeps the replaced one signing alongside the
/// new one (`webhook-signature: v1,<new> v1,<old>`), so that a receiver verifies with either
/// while it switches; once `channels.webhook.rotation_grace_secs` have passed since the
/// replacement, the new one signs alone. Removing the secret drops both: the global secret signs.
#[tokio::test]
async fn a_replaced_customer_secret_signs_alongside_the_new_one_during_its_grace() {
    let w = world(|_| {}).await;
    webhook_receiver().mount(&w.provider).await;
    let url = format!("{}/hooks/shop-a", w.provider.uri());
    let secrets = [NEW_WEBHOOK_SECRET, OWN_WEBHOOK_SECRET, WEBHOOK_SECRET];
    store_customer(
        &w,
        "shop-a",
        json!({"webhook_url": url, "webhook_secret": OWN_WEBHOOK_SECRET}),
    )
    .await;
    put_customer(
        &w,
        "shop-a",
        json!({"webhook_url": url, "webhook_secret": NEW_WEBHOOK_SECRET}),
    )
    .await;

    let rotating = send_webhook(&w, json!({"customer_id": "shop-a"})).await;
    assert_eq!(
        signed_by(&w, &rotating, &secrets).await,
        [vec![NEW_WEBHOOK_SECRET], vec![OWN_WEBHOOK_SECRET]],
        "the new secret's signature, then the replaced one's"
    );

    // The default grace is a day: a replacement older than that no longer signs.
    age_secret_replacement(&w, "shop-a", chrono::TimeDelta::hours(25)).await;
    let rotated = send_webhook(&w, json!({"customer_id": "shop-a"})).await;
    assert_eq!(
        signed_by(&w, &rotated, &secrets).await,
        [vec![NEW_WEBHOOK_SECRET]],
        "after the grace, the new secret signs alone"
    );

    put_customer(
        &w,
        "shop-a",
        json!({"webhook_url": url, "webhook_secret": OWN_WEBHOOK_SECRET}),
    )
    .await;
    put_customer(
        &w,
        "shop-a",
        json!({"webhook_url": url, "webhook_secret": ""}),
    )
    .await;
    let removed = send_webhook(&w, json!({"customer_id": "shop-a"})).await;
    assert_eq!(
        signed_by(&w, &removed, &secrets).await,
        [vec![WEBHOOK_SECRET]],
        "\"\" removes the secret and the one it replaced"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// `channels.webhook.previous_secrets` sign alongside `channels.webhook.secret`, in that order,
/// whatever the webhook's age; a customer's own secret signs without them.
#[tokio::test]
async fn previous_global_secrets_sign_alongside_the_current_one() {
    let w = world(|c| {
        if let Some(webhook) = c.channels.webhook.as_mut() {
            webhook.previous_secrets = vec![OLD_WEBHOOK_SECRET.into()];
        }
    })
    .await;
    webhook_receiver().mount(&w.provider).await;
    let hooks = format!("{}/hooks", w.provider.uri());
    store_customer(
        &w,
        "shop-a",
        json!({"webhook_url": format!("{hooks}/shop-a"), "webhook_secret": OWN_WEBHOOK_SECRET}),
    )
    .await;
    let secrets = [WEBHOOK_SECRET, OLD_WEBHOOK_SECRET, OWN_WEBHOOK_SECRET];

    let global = send_webhook(&w, json!({"webhook_url": format!("{hooks}/anyone")})).await;
    assert_eq!(
        signed_by(&w, &global, &secrets).await,
        [vec![WEBHOOK_SECRET], vec![OLD_WEBHOOK_SECRET]],
        "the current global secret's signature, then the previous one's"
    );
    let own = send_webhook(&w, json!({"customer_id": "shop-a"})).await;
    assert_eq!(
        signed_by(&w, &own, &secrets).await,
        [vec![OWN_WEBHOOK_SECRET]],
        "a customer's own secret signs alone"
    );
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_webhook_to_an_internal_address_is_refused_unless_allowed() {
    let w = world(|c| {
        if let Some(webhook) = c.channels.webhook.as_mut() {
            webhook.allow_private_targets = false;
        }
    })
    .await;
    webhook_receiver().mount(&w.provider).await;
    // An internal IP address is refused by the API at once.
    let literal = json!({
        "webhook_url": format!("{}/hooks/shop-1", w.provider.uri()),
        "email": "ada@example.com"
    });
    let (status, refused) = w
        .herald
        .send(&notification(&["webhook", "email"], literal))
        .await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "recipient.webhook_url", "{refused}");
    // A host name is resolved only when sending: the provider refuses one that is internal.
    let port = w.provider.address().port();
    let recipient = json!({
        "webhook_url": format!("http://localhost:{port}/hooks/shop-1"),
        "email": "ada@example.com"
    });
    let sent = send_until_sent(&w, &notification(&["webhook", "email"], recipient)).await;
    assert_eq!(
        statuses(&sent),
        [("webhook", "rejected"), ("email", "sent")]
    );
    assert!(
        sent["attempts"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("internal address"),
        "{sent}"
    );
    assert!(
        provider_requests(&w).await.is_empty(),
        "the internal address was not called"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// Webhooks never go through a proxy, whatever Herald's environment says: reqwest follows
/// `HTTP_PROXY`, `HTTPS_PROXY` and `ALL_PROXY` by default, and a proxy resolves the receiver's name
/// itself, past the resolver that keeps webhooks off internal addresses (or fails every webhook
/// when the proxy's own name resolves to one). Herald runs as a process here, as those variables
/// are the process's: they name a proxy that counts the connections it gets and answers none.
#[tokio::test]
async fn webhooks_do_not_go_through_the_environment_s_proxy() {
    herald_tests::init_tracing();
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let receiver = MockServer::start().await;
    webhook_receiver().mount(&receiver).await;
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("proxy port");
    let proxy_url = format!("http://{}", proxy.local_addr().expect("proxy address"));
    let proxied = Arc::new(AtomicUsize::new(0));
    let counted = proxied.clone();
    tokio::spawn(async move {
        while let Ok((_connection, _)) = proxy.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut env: Vec<(String, String)> = [
        ("HERALD_NATS__URL", nats.url()),
        ("HERALD_DATABASE__URL", db.url().to_string()),
        ("HERALD_CHANNELS__EMAIL__SMTP_HOST", smtp.host().to_string()),
        ("HERALD_CHANNELS__EMAIL__SMTP_PORT", smtp.port().to_string()),
        ("HERALD_CHANNELS__EMAIL__SECURITY", "none".to_string()),
        (
            "HERALD_CHANNELS__WEBHOOK__SECRET",
            WEBHOOK_SECRET.to_string(),
        ),
        // The receiver is on the loopback interface.
        (
            "HERALD_CHANNELS__WEBHOOK__ALLOW_PRIVATE_TARGETS",
            "true".to_string(),
        ),
        // Whatever the test's own environment excludes from proxying.
        ("NO_PROXY", String::new()),
        ("no_proxy", String::new()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value))
    .collect();
    for name in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        env.push((name.to_string(), proxy_url.clone()));
    }
    let logs = tempfile::tempdir().expect("log dir");
    let mut herald = HeraldProcess::start(env, logs.path().join("herald.log"))
        .await
        .expect("herald starts");
    let conn = herald_entities::connect(db.url(), 2).await.expect("db");
    let key = herald_engine::apikey::create(&conn, "proxy test", "send,read")
        .await
        .expect("API key")
        .token;
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .post(format!("{}/api/v1/notifications", herald.base()))
        .bearer_auth(&key)
        .json(&notification(
            &["webhook"],
            json!({"webhook_url": format!("{}/hooks/shop-1", receiver.uri())}),
        ))
        .send()
        .await
        .expect("send request");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let body: Value = response.json().await.expect("JSON answer");
    let id: uuid::Uuid = body["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no id in {body}"));

    let (via_proxy, received) = eventually(
        "the webhook to reach its receiver or the proxy",
        E2E_TIMEOUT,
        || async {
            let via_proxy = proxied.load(Ordering::SeqCst);
            let received = receiver.received_requests().await.unwrap_or_default().len();
            (via_proxy > 0 || received > 0).then_some((via_proxy, received))
        },
    )
    .await;
    assert_eq!(
        via_proxy,
        0,
        "the webhook went to the proxy HTTP_PROXY names; log:\n{}",
        herald.log_tail()
    );
    assert_eq!(received, 1, "the receiver got the webhook");
    eventually("the notification to be sent", E2E_TIMEOUT, || async {
        (stored_status(&conn, id).await == herald_entities::NotificationStatus::Sent).then_some(())
    })
    .await;
    assert_eq!(
        proxied.load(Ordering::SeqCst),
        0,
        "nothing went to the proxy"
    );
    herald
        .terminate(Duration::from_secs(30))
        .await
        .expect("herald exits");
}

#[tokio::test]
async fn a_slow_chain_keeps_its_command_from_being_redelivered() {
    // Three channels of 1.2 s each outlast a 2 s ack_wait: only the delivery's progress
    // signals keep JetStream from offering the command again while its chain is walked.
    let w = world(|config| config.nats.ack_wait_secs = 2).await;
    let slow = Duration::from_millis(1_200);
    telegram(ResponseTemplate::new(500).set_delay(slow))
        .mount(&w.provider)
        .await;
    sms(ResponseTemplate::new(500).set_delay(slow))
        .mount(&w.provider)
        .await;
    let push = Mock::given(method("POST"))
        .and(fcm_path())
        .respond_with(fcm_accepted("projects/shop/messages/1").set_delay(slow))
        .mount_as_scoped(&w.provider)
        .await;
    let client = w._nats.client().await.expect("nats client");
    let mut acks = client
        .subscribe("$JS.ACK.>")
        .await
        .expect("subscribe to acks");
    client.flush().await.expect("flush");

    let sent = send_until_sent(&w, &notification(&["telegram", "sms", "push"], everyone())).await;
    assert_eq!(
        statuses(&sent),
        [("telegram", "failed"), ("sms", "failed"), ("push", "sent")]
    );

    // Every answer to the command until its ack, with the delivery it answers.
    let mut answers: Vec<(u64, String)> = Vec::new();
    let deadline = tokio::time::Instant::now() + E2E_TIMEOUT;
    while !answers
        .iter()
        .any(|(_, body)| body.is_empty() || body == "+ACK")
    {
        let next = tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut acks)).await;
        let Ok(Some(message)) = next else {
            panic!("no ack of the command within {E2E_TIMEOUT:?}; answers seen: {answers:?}");
        };
        let Some((stream, delivered)) = herald_tests::delivered_of_ack(message.subject.as_str())
        else {
            continue;
        };
        if stream == "NOTIFY" {
            let body = String::from_utf8_lossy(&message.payload).to_string();
            answers.push((delivered, body));
        }
    }
    assert!(
        answers.iter().all(|(delivered, _)| *delivered == 1),
        "the command was delivered again while its chain was walked: {answers:?}"
    );
    assert!(
        answers.iter().any(|(_, body)| body == "+WPI"),
        "the delivery told JetStream it was still working: {answers:?}"
    );
    assert_eq!(push.received_requests().await.len(), 1, "sent once");
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_retry_round_does_not_call_a_channel_that_refused_for_good() {
    let w = world(|_| {}).await;
    let unknown_chat = telegram(telegram_error(400, "Bad Request: chat not found", None))
        .mount_as_scoped(&w.provider)
        .await;
    // SMS is down for the first round only.
    sms(ResponseTemplate::new(503).set_body_string("upstream unavailable"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&w.provider)
        .await;
    sms_accepts("SM1").mount(&w.provider).await;
    let sent = send_until_sent(&w, &notification(&["telegram", "sms"], everyone())).await;
    assert_eq!(
        statuses(&sent),
        [
            ("telegram", "rejected"),
            ("sms", "failed"),
            ("telegram", "refused_earlier"),
            ("sms", "sent")
        ],
        "{sent}"
    );
    let numbers: Vec<i64> = sent["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|a| a["attempt_no"].as_i64())
        .collect();
    assert_eq!(numbers, vec![1, 2, 3, 4], "{sent}");
    assert_eq!(
        unknown_chat.received_requests().await.len(),
        1,
        "Telegram was called in the first round only"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// The default retry ceiling, not the tests' 1 s: a retry may wait for a held channel.
fn retries_wait_up_to_five_minutes(config: &mut Config) {
    config.dispatch.retry.max_delay_ms = 300_000;
}

/// Asserts that `channel`'s circuit is held open by the provider's throttle of the account, with
/// no failure counted, until about `wait` from now (at least 20 s less).
async fn assert_held(w: &World, channel: &str, wait: i64) {
    let state = channel_state(w, channel).await;
    assert_eq!(
        (
            &state["circuit"],
            &state["throttled"],
            &state["times_opened"]
        ),
        (&json!("open"), &json!(true), &json!(0)),
        "{state}"
    );
    let probe_at = state["probe_at"]
        .as_str()
        .and_then(|at| at.parse::<DateTime<Utc>>().ok())
        .unwrap_or_else(|| panic!("a held circuit says when it probes: {state}"));
    assert!(
        probe_at > Utc::now() + chrono::TimeDelta::seconds(wait - 20)
            && probe_at <= Utc::now() + chrono::TimeDelta::seconds(wait),
        "held for the provider's {wait} s: {state}"
    );
}

/// How long, by its status reason, a notification with no other channel waits for a held one.
async fn waiting_secs(w: &World, channel: &str) -> u64 {
    let id = w
        .herald
        .send_accepted(&notification(&[channel], everyone()))
        .await;
    let path = format!("/api/v1/notifications/{id}");
    eventually(
        "the notification to wait for the held channel",
        E2E_TIMEOUT,
        || async {
            let (_, json) = w.herald.get(&path).await;
            let reason = json["status_reason"].as_str()?.to_string();
            let secs = reason.split("again in ").nth(1)?.split(' ').next()?;
            secs.parse::<u64>().ok()
        },
    )
    .await
}

/// A recipient reached on Telegram at `chat`, and by email.
fn at_chat(chat: &str) -> Value {
    json!({"email": "ada@example.com", "telegram_chat_id": chat})
}

/// Telegram's flood control of one chat throttles that chat only: the others are still sent to.
#[tokio::test]
async fn one_chat_s_flood_control_holds_no_other_chat() {
    let w = world(open_circuits_after_two_failures).await;
    let flood = telegram_error(
        429,
        "Too Many Requests: retry after 60",
        Some(json!({"retry_after": 60})),
    );
    telegram_to("busy", flood).mount(&w.provider).await;
    telegram_to("quiet", telegram_ok()).mount(&w.provider).await;
    for _ in 0..4 {
        let sent =
            send_until_sent(&w, &notification(&["telegram", "email"], at_chat("busy"))).await;
        assert_eq!(
            statuses(&sent),
            [("telegram", "failed"), ("email", "sent")],
            "{sent}"
        );
    }
    let sent = send_until_sent(&w, &notification(&["telegram", "email"], at_chat("quiet"))).await;
    assert_eq!(statuses(&sent), [("telegram", "sent")], "{sent}");
    let state = channel_state(&w, "telegram").await;
    assert_eq!(
        (&state["circuit"], &state["throttled"]),
        (&json!("closed"), &json!(false)),
        "{state}"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// Telegram answers the bot's own limit (about 30 messages a second) with the same 429 as one
/// chat's flood control: 429s for three chats within two seconds are taken for it, and the bot
/// is not called again before its `retry_after`; notifications fail over to email meanwhile.
#[tokio::test]
async fn telegram_s_429s_for_several_chats_hold_the_bot_until_its_retry_after() {
    let w = world(retries_wait_up_to_five_minutes).await;
    let limit = telegram(telegram_error(
        429,
        "Too Many Requests: retry after 60",
        Some(json!({"retry_after": 60})),
    ))
    .mount_as_scoped(&w.provider)
    .await;
    for chat in ["1001", "1002", "1003"] {
        let sent = send_until_sent(&w, &notification(&["telegram", "email"], at_chat(chat))).await;
        assert_eq!(
            statuses(&sent),
            [("telegram", "failed"), ("email", "sent")],
            "chat {chat}: {sent}"
        );
    }
    for chat in ["1004", "1005", "1001"] {
        let sent = send_until_sent(&w, &notification(&["telegram", "email"], at_chat(chat))).await;
        assert_eq!(
            statuses(&sent),
            [("telegram", "circuit_open"), ("email", "sent")],
            "chat {chat}, after the bot's limit: {sent}"
        );
    }
    let waiting = waiting_secs(&w, "telegram").await;
    assert!(
        waiting >= 40,
        "a Telegram-only notification waits for the retry_after: {waiting} s"
    );
    assert_eq!(
        limit.received_requests().await.len(),
        3,
        "Telegram was not called while the bot was held"
    );
    assert_held(&w, "telegram", 60).await;
    w.herald.shutdown().await.expect("shutdown");
}

/// Twilio's 429 (20429) is the account's: every SMS waits out its Retry-After without calling
/// Twilio, at the first one, and it is not counted as a failure of the provider.
#[tokio::test]
async fn a_twilio_429_holds_every_sms_until_its_retry_after() {
    let w = world(retries_wait_up_to_five_minutes).await;
    let too_many = json!({
        "code": 20429,
        "message": "Too Many Requests",
        "more_info": "https://www.twilio.com/docs/errors/20429",
        "status": 429
    });
    let limit = sms(ResponseTemplate::new(429)
        .insert_header("Retry-After", "60")
        .set_body_json(too_many))
    .mount_as_scoped(&w.provider)
    .await;
    let sent = send_until_sent(&w, &notification(&["sms", "email"], everyone())).await;
    assert_eq!(
        statuses(&sent),
        [("sms", "failed"), ("email", "sent")],
        "{sent}"
    );
    for n in 0..3 {
        let sent = send_until_sent(&w, &notification(&["sms", "email"], everyone())).await;
        assert_eq!(
            statuses(&sent),
            [("sms", "circuit_open"), ("email", "sent")],
            "send {n} after the 429: {sent}"
        );
    }
    let waiting = waiting_secs(&w, "sms").await;
    assert!(
        waiting >= 40,
        "an SMS-only notification waits for the Retry-After: {waiting} s"
    );
    assert_eq!(
        limit.received_requests().await.len(),
        1,
        "Twilio was not called while the account was held"
    );
    assert_held(&w, "sms", 60).await;
    w.herald.shutdown().await.expect("shutdown");
}

/// FCM's `QUOTA_EXCEEDED` for one device throttles that device only; a 429 for the project's
/// quota (Google's `RATE_LIMIT_EXCEEDED`, without FCM's own code) holds every push for a minute.
#[tokio::test]
async fn fcm_s_project_quota_holds_every_push_but_a_device_s_quota_only_that_device() {
    let w = world(open_circuits_after_two_failures).await;
    let device_quota = fcm_error(
        429,
        "RESOURCE_EXHAUSTED",
        "QUOTA_EXCEEDED",
        "Quota exceeded.",
    )
    .insert_header("Retry-After", "60");
    fcm("busy-device", device_quota).mount(&w.provider).await;
    let phone = fcm("phone", fcm_accepted("projects/shop/messages/1"))
        .mount_as_scoped(&w.provider)
        .await;
    let push_to = |token: &str| {
        notification(
            &["push", "email"],
            json!({"email": "ada@example.com", "push_tokens": [token]}),
        )
    };
    for _ in 0..3 {
        let sent = send_until_sent(&w, &push_to("busy-device")).await;
        assert_eq!(
            statuses(&sent),
            [("push", "failed"), ("email", "sent")],
            "{sent}"
        );
    }
    let sent = send_until_sent(&w, &push_to("phone")).await;
    assert_eq!(
        statuses(&sent),
        [("push", "sent")],
        "a device's quota is its own: {sent}"
    );

    let project_quota = ResponseTemplate::new(429).set_body_json(json!({"error": {
        "code": 429,
        "message": "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per \
                    minute' of service 'fcm.googleapis.com' for consumer 'project_number:123'.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "RATE_LIMIT_EXCEEDED",
            "domain": "googleapis.com",
            "metadata": {"quota_limit": "SendsPerMinutePerProject", "quota_unit": "1/min/{project}"}
        }]
    }}));
    fcm("tablet", project_quota).mount(&w.provider).await;
    let sent = send_until_sent(&w, &push_to("tablet")).await;
    assert_eq!(
        statuses(&sent),
        [("push", "failed"), ("email", "sent")],
        "{sent}"
    );
    for n in 0..3 {
        let sent = send_until_sent(&w, &push_to("phone")).await;
        assert_eq!(
            statuses(&sent),
            [("push", "circuit_open"), ("email", "sent")],
            "send {n} after the project's quota ran out: {sent}"
        );
    }
    assert_eq!(
        phone.received_requests().await.len(),
        1,
        "FCM was not called while the project was held"
    );
    assert_held(&w, "push", 60).await;
    w.herald.shutdown().await.expect("shutdown");
}

/// A replaced customer secret signs nothing once its rotation grace is over, and the clean-up
/// (every `scheduler.retention_interval_secs`) then forgets it; one still within its grace is
/// kept. Replaced secrets used to be kept for good.
#[tokio::test]
async fn the_clean_up_forgets_a_replaced_secret_once_its_grace_is_over() {
    use herald_entities::repo::customers::find_by_external_id;
    let w = world(|config| {
        config.scheduler.retention_interval_secs = 1;
        if let Some(webhook) = config.channels.webhook.as_mut() {
            webhook.rotation_grace_secs = 3_600;
        }
    })
    .await;
    for id in ["shop-old", "shop-new"] {
        let url = format!("{}/hooks/{id}", w.provider.uri());
        store_customer(
            &w,
            id,
            json!({"webhook_url": url, "webhook_secret": OWN_WEBHOOK_SECRET}),
        )
        .await;
        put_customer(
            &w,
            id,
            json!({"webhook_url": url, "webhook_secret": NEW_WEBHOOK_SECRET}),
        )
        .await;
    }
    // Past the configured grace of an hour, well within the default day.
    age_secret_replacement(&w, "shop-old", chrono::TimeDelta::hours(2)).await;

    let db = w.herald.db();
    let stored = |id: &'static str| async move {
        find_by_external_id(db, id)
            .await
            .expect("customer read")
            .expect("customer stored")
    };
    let old = eventually_showing(
        "the clean-up to forget shop-old's replaced secret",
        E2E_TIMEOUT,
        || async {
            let old = stored("shop-old").await;
            match old.previous_webhook_secret {
                None => Ok(old),
                Some(_) => Err(format!(
                    "still kept, replaced at {:?}",
                    old.webhook_secret_replaced_at
                )),
            }
        },
    )
    .await;
    assert_eq!(
        old.webhook_secret_replaced_at, None,
        "forgotten with its date"
    );
    assert_eq!(
        old.webhook_secret.as_deref(),
        Some(NEW_WEBHOOK_SECRET),
        "the secret that signs stays"
    );
    let new = stored("shop-new").await;
    assert_eq!(
        new.previous_webhook_secret.as_deref(),
        Some(OWN_WEBHOOK_SECRET),
        "a secret replaced within its grace still signs, and is kept"
    );
    assert!(new.webhook_secret_replaced_at.is_some());
    w.herald.shutdown().await.expect("shutdown");
}
