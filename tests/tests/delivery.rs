//! The walking skeleton end to end: API → NATS → dispatcher → email over real SMTP → status and
//! attempts in the database → JetStream ack; and the first failure paths.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use herald_tests::{
    E2E_TIMEOUT, NatsServer, RejectStage, SmtpSink, TestDatabase, TestHerald, WriteHold,
    eventually, test_config,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct World {
    nats: NatsServer,
    smtp: SmtpSink,
    db: TestDatabase,
    herald: TestHerald,
}

async fn world() -> World {
    world_with(|_| {}).await
}

async fn world_with(tune: impl FnOnce(&mut herald_engine::Config)) -> World {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let mut config = test_config(&nats, &db, &smtp);
    // A send whose request stopped before publishing goes out 2 s later, not 30 s.
    config.scheduler.stale_claim_secs = 2;
    tune(&mut config);
    let herald = TestHerald::start(config).await.expect("herald starts");
    World {
        nats,
        smtp,
        db,
        herald,
    }
}

fn order_email(to: &str, request_id: Option<&str>) -> Value {
    json!({
        "request_id": request_id,
        "recipient": { "email": to },
        "category": "transactional",
        "channels": ["email"],
        "content": {
            "subject": "Your order #1001 is confirmed",
            "text": "Thanks for your order of 42.00 EUR.",
            "html": "<p>Thanks for your order of <b>42.00 EUR</b>.</p>"
        }
    })
}

async fn stream_messages(nats: &NatsServer, stream: &str) -> u64 {
    let client = nats.client().await.expect("nats client");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await.expect("stream exists");
    stream.info().await.expect("stream info").state.messages
}

#[tokio::test]
async fn an_email_travels_the_whole_path() {
    let w = world().await;
    let id = w
        .herald
        .send_accepted(&order_email("ada@example.com", None))
        .await;

    let sent = w.herald.wait_status(&id, "sent").await;
    assert_eq!(sent["final_channel"], "email");
    let attempts = sent["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "{sent}");
    assert_eq!(attempts[0]["status"], "sent");
    assert_eq!(attempts[0]["provider"], "smtp");
    assert!(sent["sent_at"].is_string());

    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    let mail = &mails[0];
    assert_eq!(mail.to, vec!["ada@example.com".to_string()]);
    assert_eq!(
        mail.subject.as_deref(),
        Some("Your order #1001 is confirmed")
    );
    let simple_id = id.replace('-', "");
    assert!(
        mail.message_id
            .as_deref()
            .unwrap_or_default()
            .contains(&simple_id),
        "Message-ID carries the notification id: {:?}",
        mail.message_id
    );
    assert!(mail.text_body().unwrap_or_default().contains("42.00 EUR"));
    assert!(
        mail.html_body()
            .unwrap_or_default()
            .contains("<b>42.00 EUR</b>")
    );

    // Acked: the work-queue stream is empty; the transition was published for observers.
    eventually("NOTIFY to be drained", E2E_TIMEOUT, || async {
        (stream_messages(&w.nats, "NOTIFY").await == 0).then_some(())
    })
    .await;
    eventually("a status event", E2E_TIMEOUT, || async {
        (stream_messages(&w.nats, "NOTIFY_STATUS").await >= 1).then_some(())
    })
    .await;
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_repeated_request_id_answers_the_original_and_sends_once() {
    let w = world().await;
    let body = order_email("grace@example.com", Some("order-1001-confirmation"));
    let first = w.herald.send_accepted(&body).await;
    let (status, again) = w.herald.send(&body).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["id"], first.as_str());

    // The header works as well as the field.
    let mut by_header = body.clone();
    by_header["request_id"] = Value::Null;
    let response = w
        .herald
        .http()
        .post(format!("{}/api/v1/notifications", w.herald.base()))
        .header("Idempotency-Key", "order-1001-confirmation")
        .json(&by_header)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::OK);

    // A different notification after it: once it is delivered, the sink holds exactly two mails.
    let other = w
        .herald
        .send_accepted(&order_email("other@example.com", None))
        .await;
    w.herald.wait_status(&first, "sent").await;
    w.herald.wait_status(&other, "sent").await;
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    assert_eq!(mails.len(), 2);
    w.nats.commands_drained(E2E_TIMEOUT).await;
    assert_eq!(w.smtp.count(), 2, "the repeat sent nothing");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A `queued` email row as the API stores it, written straight to the database (the request that
/// stored it is taken to have stopped before publishing).
fn queued_email(to: &str, subject: &str) -> herald_entities::repo::notifications::NewNotification {
    herald_entities::repo::notifications::NewNotification {
        id: uuid::Uuid::now_v7(),
        request_id: None,
        request_fingerprint: None,
        customer_id: None,
        recipient_key: to.into(),
        contacts: json!({ "email": to }),
        category: "transactional".into(),
        channels: json!(["email"]),
        content: json!({ "subject": subject, "text": "Thanks." }),
        status: herald_entities::NotificationStatus::Queued,
        scheduled_at: None,
        status_reason: None,
        created_at: chrono::Utc::now(),
    }
}

#[tokio::test]
async fn a_retry_sends_a_notification_stored_but_never_published() {
    use herald_entities::repo::{notifications, schedule::PUBLISH_PENDING};
    let w = world().await;
    // A first request that stopped between storing its row and publishing its command (the
    // process died, or the connection dropped mid-request): its row keeps the mark of a command
    // not yet confirmed published, which is what has a repeat publish the command.
    let stored = notifications::NewNotification {
        request_id: Some("order-2002-confirmation".into()),
        status_reason: Some(PUBLISH_PENDING.into()),
        ..queued_email("hopper@example.com", "Your order #2002 is confirmed")
    };
    let id = stored.id.to_string();
    notifications::insert(w.herald.db(), stored)
        .await
        .expect("row stored");

    let (status, again) = w
        .herald
        .send(&order_email(
            "hopper@example.com",
            Some("order-2002-confirmation"),
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(
        again["id"],
        id.as_str(),
        "the retry names the stored notification"
    );
    w.herald.wait_status(&id, "sent").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["hopper@example.com".to_string()]);
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("Your order #2002 is confirmed"),
        "the stored content is sent, not the retry's"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_send_stored_but_never_published_goes_out_without_a_retry() {
    use herald_entities::repo::{notifications, schedule::PUBLISH_PENDING};
    let w = world().await;
    // An API send whose process died between storing the row and publishing its command, longer
    // ago than `scheduler.stale_claim_secs` (30 s by default); its client never retries.
    let stored = notifications::NewNotification {
        status_reason: Some(PUBLISH_PENDING.into()),
        created_at: chrono::Utc::now() - chrono::Duration::seconds(60),
        ..queued_email("lovelace@example.com", "Your order #2003 is confirmed")
    };
    let id = stored.id.to_string();
    notifications::insert(w.herald.db(), stored)
        .await
        .expect("row stored");

    let sent = w.herald.wait_status(&id, "sent").await;
    assert_eq!(
        sent["status_reason"],
        Value::Null,
        "the mark is gone once sent: {sent}"
    );
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["lovelace@example.com".to_string()]);
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("Your order #2003 is confirmed")
    );
    // Counted while Herald runs, once no command is left: a second command the sweep published
    // would be delivered by now (after a shutdown it would wait unseen in the stream).
    w.nats.commands_drained(E2E_TIMEOUT).await;
    assert_eq!(w.smtp.count(), 1, "sent once");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_send_whose_client_gave_up_mid_request_is_still_completed() {
    use herald_entities::notification;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    // No Scheduler sweep within the test: the request itself must publish the command.
    let w = world_with(|config| config.scheduler.stale_claim_secs = 3_600).await;
    // The database holds the write up; the client gives up first and closes its connection. The
    // server still finishes the request once the database lets the write through: it stores the
    // notification and publishes its command (measured: sent within about a second).
    let hold = WriteHold::take(&w.db).await.expect("writes held up");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .expect("client");
    let gave_up = impatient
        .post(format!("{}/api/v1/notifications", w.herald.base()))
        .bearer_auth(w.herald.admin_key())
        .json(&order_email("curie@example.com", None))
        .send()
        .await;
    assert!(
        gave_up.as_ref().is_err_and(|e| e.is_timeout()),
        "the client gave up: {gave_up:?}"
    );
    hold.release().await.expect("writes go on");

    let stored = eventually("the abandoned send to be stored", E2E_TIMEOUT, || async {
        notification::Entity::find()
            .filter(notification::Column::RecipientKey.eq("curie@example.com"))
            .one(w.herald.db())
            .await
            .ok()
            .flatten()
    })
    .await;
    w.herald.wait_status(&stored.id.to_string(), "sent").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["curie@example.com".to_string()]);
    w.herald.shutdown().await.expect("clean shutdown");
    assert_eq!(w.smtp.count(), 1, "sent once");
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_in_one_shape() {
    let w = world().await;
    let mut bad_email = order_email("not-an-address", None);
    let (status, body) = w.herald.send(&bad_email).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_request");
    assert_eq!(body["field"], "recipient.email");

    bad_email["recipient"] = json!({});
    let (status, body) = w.herald.send(&bad_email).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "recipient");

    let (status, body) = w
        .herald
        .post(
            "/api/v1/notifications",
            &json!({"recipient": {"email": "a@example.com"}, "category": "gossip", "content": {"text": "x"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_request");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("\"Category\", found \"gossip\""),
        "names the type and the bad value: {body}"
    );

    let (status, body) = w
        .herald
        .get("/api/v1/notifications/01a20513-0c86-7293-a642-1788284568f8")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "not_found");

    let (status, body) = w.herald.get("/api/v1/notifications/not-a-uuid").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "invalid_request");
    assert_eq!(w.smtp.count(), 0);
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn with_nats_down_nothing_is_accepted_and_a_retry_later_works() {
    let mut w = world().await;
    w.nats.kill().await.expect("kill nats");
    let body = order_email("lin@example.com", Some("while-nats-is-down"));
    let (status, answer) = w.herald.send(&body).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["code"], "unavailable");

    w.nats.restart().await.expect("restart nats");
    // The same request id is accepted afresh (nothing was kept from the failed attempt) once the
    // client has reconnected by itself.
    let id = eventually(
        "a send to be accepted after NATS is back",
        E2E_TIMEOUT,
        || async {
            let (status, answer) = w.herald.send(&body).await;
            (status == StatusCode::ACCEPTED)
                .then(|| answer["id"].as_str().unwrap_or_default().to_string())
        },
    )
    .await;
    w.herald.wait_status(&id, "sent").await;
    assert_eq!(
        w.smtp
            .wait_for_count(1, E2E_TIMEOUT)
            .await
            .expect("mail")
            .len(),
        1
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_transient_smtp_failure_is_retried_with_backoff_then_sent() {
    let w = world().await;
    w.smtp
        .set_reject_next_at(RejectStage::Data, 1, 451, "4.3.0 try again later");
    let id = w
        .herald
        .send_accepted(&order_email("ada@example.com", None))
        .await;
    let sent = w.herald.wait_status(&id, "sent").await;
    let attempts = sent["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{sent}");
    assert_eq!(attempts[0]["status"], "failed");
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("451"),
        "{sent}"
    );
    assert_eq!(attempts[1]["status"], "sent");
    assert!(attempts[1]["attempt_no"].as_i64() > attempts[0]["attempt_no"].as_i64());
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_permanent_smtp_rejection_fails_without_retry() {
    let w = world().await;
    w.smtp.set_reject_next(1, 550, "5.1.1 no such user");
    let id = w
        .herald
        .send_accepted(&order_email("nobody@example.com", None))
        .await;
    let failed = w.herald.wait_status(&id, "failed").await;
    let attempts = failed["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "{failed}");
    assert_eq!(attempts[0]["status"], "rejected");
    assert!(failed["error"].as_str().unwrap_or_default().contains("550"));

    // The harness's wait for another status gives up at once, showing how the notification ended.
    let started = Instant::now();
    let waited = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
        w.herald.wait_status(&id, "sent"),
    ))
    .await;
    let message = waited
        .err()
        .and_then(|panic| panic.downcast::<String>().ok())
        .expect("waiting for `sent` of a failed notification panics");
    assert!(
        message.contains("became final without becoming sent") && message.contains("550"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up after {:?}",
        started.elapsed()
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_crashed_channel_actor_is_restarted_and_keeps_delivering() {
    let w = world().await;
    let channels = w.herald.app().channels().clone();
    let before = channels
        .get(herald_nats::Channel::Email)
        .expect("email actor")
        .get_id();
    channels
        .get(herald_nats::Channel::Email)
        .expect("email actor")
        .cast(herald_actors::channel::ChannelMsg::Crash)
        .expect("cast");
    eventually(
        "the email actor to be restarted",
        Duration::from_secs(10),
        || async {
            channels
                .get(herald_nats::Channel::Email)
                .filter(|actor| actor.get_id() != before)
                .map(|_| ())
        },
    )
    .await;
    let id = w
        .herald
        .send_accepted(&order_email("ada@example.com", None))
        .await;
    w.herald.wait_status(&id, "sent").await;
    let metrics = w.herald.metrics_text().await;
    assert!(
        metrics.contains("herald_actor_restarts_total{actor=\"channel\"}"),
        "restart counted: {metrics}"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_deleted_dispatch_consumer_is_bound_again() {
    let w = world().await;
    let first = w
        .herald
        .send_accepted(&order_email("ada@example.com", None))
        .await;
    w.herald.wait_status(&first, "sent").await;

    // An operator removes the partitions' durable consumers (`nats consumer rm`) while Herald runs.
    let js = async_nats::jetstream::new(w.nats.client().await.expect("nats client"));
    let stream = js.get_stream("NOTIFY").await.expect("stream exists");
    let names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .expect("consumer names");
    let dispatch: Vec<&String> = names
        .iter()
        .filter(|name| name.starts_with("herald-dispatch-"))
        .collect();
    assert!(!dispatch.is_empty(), "no dispatch consumer among {names:?}");
    for name in dispatch {
        stream
            .delete_consumer(name)
            .await
            .expect("consumer deleted");
    }

    // The same recipient, so the same partition as the first send, whose consumer was bound.
    let second = w
        .herald
        .send_accepted(&order_email("ada@example.com", None))
        .await;
    w.herald.wait_status(&second, "sent").await;
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    assert_eq!(mails[1].to, vec!["ada@example.com".to_string()]);
    w.herald.shutdown().await.expect("clean shutdown");
}

fn to_customer(customer_id: &str) -> Value {
    json!({
        "recipient": { "customer_id": customer_id },
        "category": "account",
        "channels": ["email"],
        "content": { "subject": "Welcome", "text": "Welcome aboard." }
    })
}

/// A send naming a customer registered a moment later (the sign-up service and the welcome
/// sender race) went `dead` at its first delivery. It now waits on the retry schedule, recorded
/// `processing` with the reason, and goes out once the customer exists.
#[tokio::test]
async fn a_send_to_a_customer_registered_a_moment_later_waits_for_them() {
    // Room for many retries, so that the customer is created well inside the window.
    let w = world_with(|config| config.dispatch.retry.max_deliveries = 50).await;
    let id = w.herald.send_accepted(&to_customer("c-later")).await;
    let path = format!("/api/v1/notifications/{id}");
    let waiting = eventually("the send to wait for its customer", E2E_TIMEOUT, || async {
        let (_, json) = w.herald.get(&path).await;
        let reason = json["status_reason"].as_str().unwrap_or_default();
        (json["status"] == "processing" && reason.contains("waiting for customer \"c-later\""))
            .then_some(json)
    })
    .await;
    assert!(
        waiting["attempts"].as_array().is_none_or(Vec::is_empty),
        "{waiting}"
    );

    let (status, body) = w
        .herald
        .post(
            "/api/v1/customers",
            &json!({"id": "c-later", "name": "Ada", "email": "later@example.com", "locale": "en",
                    "timezone": "Europe/Berlin"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let sent = w.herald.wait_status(&id, "sent").await;
    assert!(sent["status_reason"].is_null(), "{sent}");
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["later@example.com".to_string()]);
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A customer that never comes: dead-lettered, with why, once the retry schedule's whole wait has
/// passed since the send was published (measured in time, not in deliveries).
#[tokio::test]
async fn a_send_to_a_customer_that_never_exists_dies_once_the_retry_schedule_has_passed() {
    let mut retry = None;
    let w = world_with(|config| {
        config.dispatch.retry.max_deliveries = 3;
        retry = Some(config.dispatch.retry);
    })
    .await;
    let allowed = retry.expect("the test's retry policy").total_wait();
    let sending = Instant::now();
    let id = w.herald.send_accepted(&to_customer("c-never")).await;
    let dead = w.herald.wait_status(&id, "dead").await;
    let waited = sending.elapsed();
    let reason = dead["status_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("unknown customer \"c-never\" and no contacts given")
            && reason.contains("given up after waiting")
            && reason.contains(&format!(
                "dispatch.retry waits {:.1} s",
                allowed.as_secs_f64()
            )),
        "{dead}"
    );
    assert!(
        waited >= allowed,
        "dead only once the schedule's whole wait ({allowed:?}) has passed, not after {waited:?}"
    );
    assert_eq!(w.smtp.count(), 0);
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A flood of sends naming a customer Herald does not know, with no contacts (a producer that
/// never registers them, or a customer deleted after the sends were accepted): each waiting
/// command held one of its partition consumer's `max_ack_pending` slots for the whole retry
/// schedule (hours here), so once the flood took them all, the partition delivered nothing and a
/// send to a known customer behind it waited for hours. Now a command starts waiting only while
/// fewer than half the slots are taken; the others go `dead` at once, saying why.
#[tokio::test]
async fn a_flood_of_sends_for_an_unknown_customer_does_not_stall_sends_for_known_ones() {
    const SLOTS: i64 = 8;
    const FLOOD: usize = 3 * SLOTS as usize;
    let w = world_with(|config| {
        // Every send on the one partition, so on one consumer's slots.
        config.nats.partitions = 1;
        config.nats.max_ack_pending = SLOTS;
        // A wait far longer than the test (hours).
        config.dispatch.retry.max_deliveries = 10_000;
    })
    .await;
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(w.herald.send_accepted(&to_customer("c-flood")).await);
    }
    let (status, body) = w
        .herald
        .post(
            "/api/v1/customers",
            &json!({"id": "c-known", "name": "Ada", "email": "known@example.com", "locale": "en"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let known = w.herald.send_accepted(&to_customer("c-known")).await;
    w.herald.wait_status(&known, "sent").await;
    let mails = w
        .smtp
        .wait_for_count(1, E2E_TIMEOUT)
        .await
        .expect("the known customer's mail, while the flood's sends wait");
    assert_eq!(mails[0].to, vec!["known@example.com".to_string()]);

    // Once the customer exists the sends still waiting go out; the others went dead, saying why.
    let (status, body) = w
        .herald
        .post(
            "/api/v1/customers",
            &json!({"id": "c-flood", "name": "Flo", "email": "flood@example.com", "locale": "en"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut sent = 0;
    for id in &flood {
        let path = format!("/api/v1/notifications/{id}");
        let settled = eventually("each send of the flood to settle", E2E_TIMEOUT, || async {
            let (_, json) = w.herald.get(&path).await;
            (json["status"] == "sent" || json["status"] == "dead").then_some(json)
        })
        .await;
        if settled["status"] == "sent" {
            sent += 1;
            continue;
        }
        let reason = settled["status_reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("unknown customer \"c-flood\" and no contacts given")
                && reason.contains(&format!("of partition 0's {SLOTS} pending slots")),
            "says why it was not waited for: {settled}"
        );
    }
    assert!(
        sent <= SLOTS as usize / 2,
        "at most half the slots held waiting sends: {sent} waited"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A pass that finds the only channel's circuit open calls no provider and does not use up a
/// retry: it waits for the cool-down, and the probe after it delivers. With two deliveries
/// allowed, the pass refused by the circuit used to be the last, and the send went dead.
#[tokio::test]
async fn a_pass_refused_by_an_open_circuit_does_not_use_up_the_retries() {
    let w = world_with(|c| {
        c.dispatch.retry.max_deliveries = 2;
        c.dispatch.retry.base_delay_ms = 50;
        c.dispatch.retry.max_delay_ms = 100;
        c.channels.limits.circuit.failure_threshold = 1;
        c.channels.limits.circuit.window_ms = 60_000;
        c.channels.limits.circuit.cool_down_ms = 1_500;
    })
    .await;
    w.smtp
        .set_reject_next_at(RejectStage::Data, 1, 451, "4.3.0 try again later");
    let id = w
        .herald
        .send_accepted(&order_email("ada@example.com", None))
        .await;
    let sent = w.herald.wait_status(&id, "sent").await;
    let statuses: Vec<&str> = sent["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .filter_map(|a| a["status"].as_str())
        .collect();
    assert_eq!(
        statuses,
        ["failed", "sent"],
        "a pass that called no provider records no attempt: {sent}"
    );
    assert_eq!(w.smtp.count(), 1);
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A notification whose dead letter cannot be published is dead-lettered on a later delivery
/// without walking its chain again: it called the providers once more every 5 s for as long as
/// the dead-letter stream refused it.
#[tokio::test]
async fn a_failed_dead_letter_is_published_later_without_calling_the_providers_again() {
    let w = world_with(|c| c.dispatch.retry.max_deliveries = 2).await;
    w.smtp
        .set_reject_next_at(RejectStage::Data, 100, 451, "4.3.0 try again later");
    let js = async_nats::jetstream::new(w.nats.client().await.expect("nats client"));
    js.delete_stream("NOTIFY_DLQ")
        .await
        .expect("dead-letter stream deleted");
    let id = w
        .herald
        .send_accepted(&order_email("ada@example.com", None))
        .await;
    let path = format!("/api/v1/notifications/{id}");
    eventually("the dead letter to be refused", E2E_TIMEOUT, || async {
        let (_, body) = w.herald.get(&path).await;
        body["status_reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("cannot dead-letter yet"))
            .then_some(())
    })
    .await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "NOTIFY_DLQ".into(),
        subjects: vec!["notify.dlq.>".into()],
        ..Default::default()
    })
    .await
    .expect("dead-letter stream created again");
    let dead = w.herald.wait_status(&id, "dead").await;
    let attempts = dead["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "the chain was walked again: {dead}");
    assert_eq!(stream_messages(&w.nats, "NOTIFY_DLQ").await, 1);
    // The late dead letter tells what the last round met, as one published at once would.
    let (_, page) = w.herald.get("/api/v1/dlq").await;
    let entry = &page["items"][0];
    assert_eq!(entry["providers"], json!(["smtp"]), "{entry}");
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("gave up after 2 rounds") && reason.contains("451"),
        "the reason names the rounds and the last error: {entry}"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}
