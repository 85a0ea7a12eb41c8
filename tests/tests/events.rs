//! Domain events end to end: a real NATS client (or the orders API, through the outbox) publishes
//! events; the router turns them into notifications that arrive at the SMTP sink; duplicates
//! notify once; unknown customers (once the retry schedule's wait has passed) and malformed events
//! go to the dead-letter stream with a reason and the router keeps going. Also the customers,
//! orders and templates APIs.

use std::time::{Duration, Instant};

use async_nats::{HeaderMap, jetstream};
use futures::StreamExt;
use herald_actors::rules::Rule;
use herald_nats::{Category, Channel};
use herald_tests::{
    E2E_TIMEOUT, NatsServer, SmtpSink, TestDatabase, TestHerald, eventually, test_config,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

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
    world_on(nats, tune).await
}

async fn world_on(nats: NatsServer, tune: impl FnOnce(&mut herald_engine::Config)) -> World {
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let mut config = test_config(&nats, &db, &smtp);
    tune(&mut config);
    let herald = TestHerald::start(config).await.expect("herald starts");
    World {
        nats,
        smtp,
        db,
        herald,
    }
}

impl World {
    /// Creates a customer through the API and asserts 201.
    async fn customer(&self, id: &str, email: &str, locale: &str) {
        let (status, body) = self
            .herald
            .post(
                "/api/v1/customers",
                &json!({"id": id, "name": "Ada", "email": email, "locale": locale,
                        "timezone": "Europe/Berlin"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    async fn js(&self) -> jetstream::Context {
        jetstream::new(self.nats.client().await.expect("nats client"))
    }

    /// Publishes raw bytes on `subject` with `msg_id`, as a producer would, and waits for the
    /// stream's acknowledgement.
    async fn publish(&self, subject: &str, msg_id: &str, payload: Vec<u8>) {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        self.js()
            .await
            .publish_with_headers(subject.to_string(), headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("stored by JetStream");
    }

    async fn publish_event(&self, event: &Value, msg_id: &str) {
        let subject = format!("events.{}", event["type"].as_str().expect("type"));
        self.publish(&subject, msg_id, event.to_string().into_bytes())
            .await;
    }

    /// Waits until the router's consumer `is` what its info says, for `what`.
    async fn router_consumer(&self, what: &str, is: impl Fn(&jetstream::consumer::Info) -> bool) {
        let js = self.js().await;
        eventually(what, E2E_TIMEOUT, || async {
            let stream = js.get_stream("EVENTS").await.ok()?;
            let mut consumer: jetstream::consumer::PullConsumer =
                stream.get_consumer("herald-router").await.ok()?;
            is(consumer.info().await.ok()?).then_some(())
        })
        .await;
    }

    /// Waits until the router has acknowledged every event published so far.
    async fn router_idle(&self) {
        self.router_consumer("the router to ack every event", |info| {
            info.num_pending == 0 && info.num_ack_pending == 0
        })
        .await;
    }

    /// Waits until the router's consumer has delivered `n` messages (first deliveries and
    /// redeliveries alike).
    async fn router_delivered(&self, n: u64) {
        let what = format!("the router to have delivered {n} times");
        self.router_consumer(&what, |info| info.delivered.consumer_sequence >= n)
            .await;
    }

    /// Waits until every send command was acknowledged by the dispatcher.
    async fn commands_drained(&self) {
        let js = self.js().await;
        eventually("NOTIFY to be drained", E2E_TIMEOUT, || async {
            let mut stream = js.get_stream("NOTIFY").await.ok()?;
            (stream.info().await.ok()?.state.messages == 0).then_some(())
        })
        .await;
    }
}

fn order_created(event_id: Uuid, customer: &str, number: &str) -> Value {
    json!({
        "v": 1,
        "id": event_id,
        "type": "orders.created",
        "occurred_at": "2026-11-22T10:00:00Z",
        "data": {
            "customer_id": customer,
            "order_number": number,
            "total_minor": 4200,
            "currency": "EUR",
            "items": [{"name": "Green tea <organic>", "quantity": 2, "unit_price_minor": 2100}]
        }
    })
}

/// Every dead letter on `notify.dlq.events`, as (reason, payload).
async fn event_dead_letters(nats: &NatsServer) -> Vec<(String, String)> {
    let js = jetstream::new(nats.client().await.expect("client"));
    let stream = js.get_stream("NOTIFY_DLQ").await.expect("dlq stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: "notify.dlq.events".into(),
            ..Default::default()
        })
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
        out.push((
            reason,
            String::from_utf8_lossy(&message.payload).into_owned(),
        ));
    }
    out
}

/// Waits until `n` event dead letters exist; returns them.
async fn wait_dead_letters(nats: &NatsServer, n: usize) -> Vec<(String, String)> {
    eventually(&format!("{n} event dead letters"), E2E_TIMEOUT, || async {
        let letters = event_dead_letters(nats).await;
        (letters.len() >= n).then_some(letters)
    })
    .await
}

#[tokio::test]
async fn an_order_created_event_emails_the_order_placed_template() {
    let w = world().await;
    w.customer("c-ada", "ada@example.com", "en-GB").await;
    let event_id = Uuid::now_v7();
    w.publish_event(
        &order_created(event_id, "c-ada", "1001"),
        &event_id.to_string(),
    )
    .await;

    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    let mail = &mails[0];
    assert_eq!(mail.to, vec!["ada@example.com".to_string()]);
    assert_eq!(
        mail.subject.as_deref(),
        Some("Your order 1001 is confirmed")
    );
    let text = mail.text_body().unwrap_or_default();
    assert!(text.contains("Hello Ada,"), "{text}");
    assert!(text.contains("Total: 42.00 EUR"), "{text}");
    assert!(
        text.contains("2 x Green tea <organic>: 42.00 EUR"),
        "{text}"
    );
    let html = mail.html_body().unwrap_or_default();
    assert!(html.contains("<strong>1001</strong>"), "{html}");
    assert!(html.contains("42.00 EUR"), "{html}");
    assert!(
        !html.contains("<organic>"),
        "the item name is escaped: {html}"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Notifications made from events list among the API's in the order they came: the history and
/// the dashboard's feed are newest first by id, and an event's notification id (the same every
/// time the event is routed) sorts at the time the event occurred.
#[tokio::test]
async fn an_event_s_notification_lists_before_a_send_accepted_after_it() {
    let w = world().await;
    w.customer("c-ida", "ida@example.com", "en").await;
    let event_id = Uuid::now_v7();
    w.publish_event(
        &order_created(event_id, "c-ida", "1002"),
        &event_id.to_string(),
    )
    .await;
    w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    let later = w
        .herald
        .send_accepted(&json!({
            "recipient": { "customer_id": "c-ida" },
            "category": "transactional",
            "channels": ["email"],
            "content": { "subject": "Later", "text": "Accepted after the order's." }
        }))
        .await;
    let (status, page) = w
        .herald
        .get("/api/v1/notifications?customer_id=c-ida&limit=10")
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let ids: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(ids.len(), 2, "{page}");
    assert_eq!(ids[0], later, "newest first: {page}");
    let (status, all) = w.herald.get("/api/v1/notifications?limit=1").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(all["items"][0]["id"], later.as_str(), "{all}");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn orders_through_the_api_notify_placed_then_shipped_in_the_customer_locale() {
    let w = world().await;
    w.customer("c-jonas", "jonas@example.com", "de-DE").await;
    let (status, order) = w
        .herald
        .post(
            "/api/v1/orders",
            &json!({"order_number": "A-2002", "customer_id": "c-jonas", "total_minor": 1999,
                    "currency": "EUR", "items": [{"name": "Tee", "quantity": 1, "unit_price_minor": 1999}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    assert_eq!(order["status"], "placed");
    let placed = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("placed");
    assert_eq!(
        placed[0].subject.as_deref(),
        Some("Ihre Bestellung A-2002 ist bestätigt"),
        "German for de-DE"
    );
    assert!(
        placed[0]
            .text_body()
            .unwrap_or_default()
            .contains("Summe: 19.99 EUR")
    );

    let (status, shipped) = w
        .herald
        .put(
            "/api/v1/orders/A-2002/status",
            &json!({"status": "shipped", "tracking_number": "1Z999AA10123456784",
                    "delivery_estimate": "2026-12-01"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shipped}");
    assert_eq!(shipped["status"], "shipped");
    let mails = w
        .smtp
        .wait_for_count(2, E2E_TIMEOUT)
        .await
        .expect("shipped");
    let mail = &mails[1];
    assert_eq!(
        mail.subject.as_deref(),
        Some("Ihre Bestellung A-2002 wurde versandt")
    );
    let text = mail.text_body().unwrap_or_default();
    assert!(
        text.contains("Sendungsnummer: 1Z999AA10123456784"),
        "{text}"
    );
    assert!(text.contains("2026-12-01"), "{text}");

    let (_, stored) = w.herald.get("/api/v1/orders/A-2002").await;
    assert_eq!(stored["tracking_number"], "1Z999AA10123456784");
    // Delivered twice is a conflict the second time, and sends nothing.
    let (status, _) = w
        .herald
        .put(
            "/api/v1/orders/A-2002/status",
            &json!({"status": "delivered"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = w
        .herald
        .put(
            "/api/v1/orders/A-2002/status",
            &json!({"status": "delivered"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "conflict");
    let mails = w
        .smtp
        .wait_for_count(3, E2E_TIMEOUT)
        .await
        .expect("delivered");
    assert_eq!(
        mails[2].subject.as_deref(),
        Some("Your order A-2002 has arrived"),
        "no German variant: English"
    );
    w.router_idle().await;
    w.commands_drained().await;
    assert_eq!(w.smtp.count(), 3);
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn the_same_event_published_twice_sends_one_email() {
    let w = world().await;
    w.customer("c-grace", "grace@example.com", "en").await;
    let event_id = Uuid::now_v7();
    let event = order_created(event_id, "c-grace", "3003");
    // The same Nats-Msg-Id is dropped by JetStream; a different one (a re-publish after the
    // de-duplication window) reaches the router, which finds the notification already made.
    w.publish_event(&event, &event_id.to_string()).await;
    w.publish_event(&event, &event_id.to_string()).await;
    w.publish_event(&event, &format!("{event_id}-again")).await;

    w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    w.router_idle().await;
    w.commands_drained().await;
    assert_eq!(w.smtp.count(), 1, "one email for one event");
    let js = w.js().await;
    let mut events = js.get_stream("EVENTS").await.expect("events");
    assert_eq!(
        events.info().await.expect("info").state.messages,
        2,
        "the repeat with the same id was de-duplicated by JetStream"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Given up once the retry schedule's whole wait has passed since the event was published (not
/// after a number of deliveries, which deliveries handed back for other reasons would use up),
/// saying how long it waited.
#[tokio::test]
async fn an_event_for_an_unknown_customer_is_dead_lettered_with_a_reason() {
    let mut retry = None;
    let w = world_with(|config| retry = Some(config.dispatch.retry)).await;
    let allowed = retry.expect("the test's retry policy").total_wait();
    let event_id = Uuid::now_v7();
    let publishing = Instant::now();
    w.publish_event(
        &order_created(event_id, "c-ghost", "4004"),
        &event_id.to_string(),
    )
    .await;
    let letters = wait_dead_letters(&w.nats, 1).await;
    let waited = publishing.elapsed();
    let (reason, payload) = &letters[0];
    assert!(
        reason.contains("unknown customer") && reason.contains("c-ghost"),
        "{reason}"
    );
    assert!(reason.contains("order_placed"), "names the rule: {reason}");
    assert!(
        waited >= allowed,
        "given up only once the retry schedule's whole wait ({allowed:?}) has passed, \
         not after {waited:?}: {reason}"
    );
    assert!(
        reason.contains("given up after waiting")
            && reason.contains(&format!(
                "dispatch.retry waits {:.1} s",
                allowed.as_secs_f64()
            )),
        "says how long it waited, and how long the schedule waits: {reason}"
    );
    assert!(
        payload.contains(&event_id.to_string()),
        "the original event"
    );
    w.router_idle().await;
    assert_eq!(w.smtp.count(), 0);
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Each event waiting for a customer Herald does not know holds one of the router consumer's
/// `nats.max_ack_pending` slots. A flood of them (a producer publishing for customers it never
/// creates) does not take them all: an event starts waiting only while fewer than half are taken,
/// and is dead-lettered at once otherwise, saying why, so events for known customers are still
/// routed (on the old code they waited until the flood's waits ran out). Nothing is lost: each
/// event of the flood is dead-lettered (replayable) or notified once its customer exists.
#[tokio::test]
async fn a_flood_of_events_for_an_unknown_customer_does_not_stall_events_for_known_ones() {
    const SLOTS: i64 = 8;
    const FLOOD: usize = 3 * SLOTS as usize;
    let w = world_with(|config| {
        config.nats.max_ack_pending = SLOTS;
        // A wait far longer than the test (hours), delivered again every second at most.
        config.dispatch.retry.max_deliveries = 10_000;
    })
    .await;
    for n in 0..FLOOD {
        let event_id = Uuid::now_v7();
        w.publish_event(
            &order_created(event_id, "c-flood", &format!("7{n:03}")),
            &event_id.to_string(),
        )
        .await;
    }
    w.customer("c-known", "known@example.com", "en").await;
    let event_id = Uuid::now_v7();
    w.publish_event(
        &order_created(event_id, "c-known", "8000"),
        &event_id.to_string(),
    )
    .await;
    let mails = w
        .smtp
        .wait_for_count(1, E2E_TIMEOUT)
        .await
        .expect("the known customer's mail, while the flood's events wait");
    assert_eq!(mails[0].to, vec!["known@example.com".to_string()]);

    // Once the customer exists the events still waiting are routed; the others were dead-lettered.
    w.customer("c-flood", "flood@example.com", "en").await;
    w.router_idle().await;
    w.commands_drained().await;
    let letters = event_dead_letters(&w.nats).await;
    let notified = w.smtp.count() - 1;
    assert_eq!(
        letters.len() + notified,
        FLOOD,
        "each event of the flood is notified ({notified}) or dead-lettered ({})",
        letters.len()
    );
    assert!(
        notified <= SLOTS as usize / 2,
        "at most half the slots held waiting events: {notified} waited"
    );
    for (reason, _) in &letters {
        assert!(
            reason.contains("unknown customer \"c-flood\"")
                && reason.contains(&format!("of the router's {SLOTS} pending slots")),
            "says why it was not waited for: {reason}"
        );
    }
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A customer created a moment after the event that names it (the producer wrote the order before
/// registering its customer): the event is retried rather than dead-lettered at once, and the
/// customer gets the email once it exists.
#[tokio::test]
async fn an_event_for_a_customer_created_a_moment_later_is_notified_without_a_dead_letter() {
    // Room for many retries, so that the customer is created well inside the retry window.
    let w = world_with(|config| config.dispatch.retry.max_deliveries = 50).await;
    let event_id = Uuid::now_v7();
    w.publish_event(
        &order_created(event_id, "c-soon", "4006"),
        &event_id.to_string(),
    )
    .await;
    // Delivered a second time: the first delivery was handed back, not dead-lettered and acked.
    w.router_delivered(2).await;

    w.customer("c-soon", "soon@example.com", "en").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["soon@example.com".to_string()]);
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("Your order 4006 is confirmed")
    );
    w.router_idle().await;
    assert_eq!(
        w.nats
            .subject_messages("NOTIFY_DLQ", "notify.dlq.events")
            .await,
        0,
        "no dead letter for an event that was routed in the end"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// An event given up for an unknown customer is replayed from the dead-letter stream once the
/// customer exists; a replay that fails again (the customer still missing) leaves a dead letter
/// of its own rather than vanishing as a duplicate of the first.
#[tokio::test]
async fn an_event_dead_lettered_for_an_unknown_customer_is_replayed_once_it_exists() {
    let w = world().await;
    let event_id = Uuid::now_v7();
    w.publish_event(
        &order_created(event_id, "c-late", "4005"),
        &event_id.to_string(),
    )
    .await;
    let dead_entry = |page: &Value| {
        page["items"]
            .as_array()
            .and_then(|items| items.iter().find(|e| e["event_id"] == event_id.to_string()))
            .cloned()
    };
    let listed = |what: &'static str| {
        eventually(what, E2E_TIMEOUT, || async {
            dead_entry(&w.herald.get("/api/v1/dlq").await.1)
        })
    };
    let entry = listed("the event's dead letter").await;
    assert_eq!(entry["replayable"], true, "{entry}");
    let seq = entry["seq"].as_u64().expect("seq");

    // Replayed too early: routed again, and given up again with an entry of its own.
    let (status, replayed) = w
        .herald
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(replayed["event_id"], event_id.to_string());
    assert_eq!(replayed["status"], "republished");
    assert!(replayed.get("notification_id").is_none(), "{replayed}");
    let again = eventually("a second dead letter", E2E_TIMEOUT, || async {
        dead_entry(&w.herald.get("/api/v1/dlq").await.1).filter(|e| e["seq"] != seq)
    })
    .await;

    w.customer("c-late", "late@example.com", "en").await;
    let next = again["seq"].as_u64().expect("seq");
    let (status, replayed) = w
        .herald
        .post(&format!("/api/v1/dlq/{next}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["late@example.com".to_string()]);
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("Your order 4005 is confirmed")
    );
    let (_, page) = w.herald.get("/api/v1/dlq").await;
    assert_eq!(dead_entry(&page), None, "replayed entries are gone: {page}");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Customers registered late, after their events were given up on: one filtered replay of the
/// events dead-lettered for an unknown customer routes them all; an event dead-lettered for
/// another reason, and send commands, are left alone.
#[tokio::test]
async fn a_filtered_replay_of_events_routes_those_given_up_for_unknown_customers() {
    // Given up at the first delivery, to keep the test short.
    let w = world_with(|config| config.dispatch.retry.max_deliveries = 1).await;
    for (customer, number) in [("c-x", "5001"), ("c-y", "5002")] {
        let event_id = Uuid::now_v7();
        w.publish_event(
            &order_created(event_id, customer, number),
            &event_id.to_string(),
        )
        .await;
    }
    wait_dead_letters(&w.nats, 2).await;
    // A readable event another consumer gave up on, with no reason given.
    let js = w.js().await;
    js.publish(
        herald_nats::subjects::dlq_subject("events"),
        order_created(Uuid::now_v7(), "c-z", "5003")
            .to_string()
            .into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    let (status, refused) = w
        .herald
        .post(
            "/api/v1/dlq/replay",
            &json!({"kind": "events", "channel": "email"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "channel", "{refused}");

    for customer in ["c-x", "c-y", "c-z"] {
        w.customer(customer, &format!("{customer}@example.com"), "en")
            .await;
    }
    let (status, commands) = w.herald.post("/api/v1/dlq/replay", &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{commands}");
    assert_eq!(
        commands["replayed"],
        json!([]),
        "commands by default: {commands}"
    );
    let (status, report) = w
        .herald
        .post(
            "/api/v1/dlq/replay",
            &json!({"kind": "events", "reason": "unknown customer"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let replayed = report["replayed"].as_array().expect("replayed");
    assert_eq!(replayed.len(), 2, "{report}");
    assert!(
        replayed
            .iter()
            .all(|r| r["status"] == "republished" && r["event_id"].is_string()),
        "{report}"
    );

    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    let mut to: Vec<String> = mails.iter().flat_map(|m| m.to.clone()).collect();
    to.sort();
    assert_eq!(to, vec!["c-x@example.com", "c-y@example.com"]);
    w.router_idle().await;
    w.commands_drained().await;
    assert_eq!(
        w.smtp.count(),
        2,
        "the event without a reason was left alone"
    );
    let (_, left) = w.herald.get("/api/v1/dlq?kind=events").await;
    let left = left["items"].as_array().expect("items").clone();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].get("reason").is_none(), "{left:?}");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// An event whose `order_placed` notification died (SMTP down) and whose other rule dead-lettered
/// it (its runtime template missing). The operator replays the command, then the event. Routed
/// again while the replay has the notification `queued`, the Router published the notification's
/// command once more, without the replay's attempt base: that copy counted the rounds before the
/// replay as spent, and the notification was given up at once, no provider called. The Router now
/// leaves a notification it did not leave `queued` itself to whoever requeued it.
#[tokio::test]
async fn an_event_replayed_while_its_notification_is_replayed_leaves_the_replay_its_rounds() {
    use herald_entities::repo::dead_letters::{PendingReplay, requeue_dead};
    let w = world_with(|config| {
        // Dead after two rounds; a command's id is forgotten by JetStream after 2 s, so the
        // Router's copy is not dropped as a duplicate of the first command.
        config.dispatch.retry.max_deliveries = 2;
        config.channels.limits.circuit.cool_down_ms = 200;
        config.nats.dedup_window_secs = 2;
        // The Scheduler finishes an unconfirmed replay after 3 s: well after the event's replay.
        config.scheduler.stale_claim_secs = 3;
        config.routing.rules.push(Rule {
            name: "order_note".into(),
            event: "orders.created".into(),
            when: Default::default(),
            template: "order_note".into(),
            category: Category::Transactional,
            channels: Some(vec![Channel::Email]),
            recipient: "customer_id".into(),
            enabled: true,
        })
    })
    .await;
    let h = &w.herald;
    w.customer("c-ada", "ada@example.com", "en").await;
    w.smtp.set_pause(true);
    let event_id = Uuid::now_v7();
    let event = order_created(event_id, "c-ada", "6001");
    w.publish_event(&event, &event_id.to_string()).await;
    let decoded = herald_nats::DomainEvent::decode(event.to_string().as_bytes()).expect("event");
    let placed = herald_actors::rules::default_rules().remove(0);
    assert_eq!(placed.name, "order_placed");
    let uuid = placed.notification_id(&decoded);
    let id = uuid.to_string();
    let dead = h.wait_status(&id, "dead").await;
    assert_eq!(dead["attempts"].as_array().map(Vec::len), Some(2), "{dead}");
    wait_dead_letters(&w.nats, 1).await;
    let (_, commands) = h.get("/api/v1/dlq?kind=commands").await;
    let command_seq = commands["items"][0]["seq"].as_u64().expect("a command");
    assert_eq!(commands["items"][0]["notification_id"], id, "{commands}");
    let (_, events) = h.get("/api/v1/dlq?kind=events").await;
    let event_seq = events["items"][0]["seq"].as_u64().expect("an event");
    w.smtp.set_pause(false);

    // The command's replay has requeued the notification; its command is on its way (here it
    // never got out, and the Scheduler publishes it once the replay is stale).
    let requeued = requeue_dead(h.db(), uuid, &PendingReplay::new(command_seq))
        .await
        .expect("requeued");
    assert!(requeued, "the dead notification is requeued");
    // Past the duplicate window of the notification's first command (a wait for time itself).
    let created: chrono::DateTime<chrono::Utc> = dead["created_at"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("created_at");
    let window_ends = created + chrono::Duration::milliseconds(2_500);
    if let Ok(left) = (window_ends - chrono::Utc::now()).to_std() {
        tokio::time::sleep(left).await;
    }
    let (status, replayed) = h
        .post(&format!("/api/v1/dlq/{event_seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(replayed["status"], "republished", "{replayed}");
    w.router_idle().await;

    let sent = h.wait_status(&id, "sent").await;
    let attempts = sent["attempts"].as_array().expect("attempts");
    assert_eq!(
        attempts.len(),
        3,
        "a round after the two that failed: {sent}"
    );
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["ada@example.com".to_string()]);
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_rule_naming_a_runtime_template_dead_letters_until_it_exists_then_renders_it() {
    // The built-in `order_placed` rule replaced by one naming a runtime template. The template
    // cache is on (as by default): the miss is not cached, so the template is found once created.
    let w = world_with(|config| {
        config.templates.cache_ttl_secs = 600;
        config.routing.rules.push(Rule {
            name: "order_placed".into(),
            event: "orders.created".into(),
            when: Default::default(),
            template: "order_note".into(),
            category: Category::Transactional,
            channels: Some(vec![Channel::Email]),
            recipient: "customer_id".into(),
            enabled: true,
        })
    })
    .await;
    w.customer("c-jonas", "jonas@example.com", "de-DE").await;
    let early = Uuid::now_v7();
    w.publish_event(&order_created(early, "c-jonas", "1001"), &early.to_string())
        .await;
    let letters = wait_dead_letters(&w.nats, 1).await;
    assert!(
        letters[0].0.contains("order_note"),
        "the reason names the template: {letters:?}"
    );
    assert!(letters[0].1.contains(&early.to_string()), "{letters:?}");

    for (locale, greeting) in [("en", "Thanks"), ("de", "Danke")] {
        let (status, body) = w
            .herald
            .put(
                &format!("/api/v1/templates/order_note/locales/{locale}"),
                &json!({
                    "description": "A note on a new order",
                    "category": "transactional",
                    "subject": format!("{greeting}: {{{{ order_number }}}}"),
                    "text": format!("{greeting} {{{{ customer_name }}}}, {{{{ total }}}}."),
                }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let event_id = Uuid::now_v7();
    w.publish_event(
        &order_created(event_id, "c-jonas", "1002"),
        &event_id.to_string(),
    )
    .await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, ["jonas@example.com"]);
    assert_eq!(mails[0].subject.as_deref(), Some("Danke: 1002"));
    let text = mails[0].text_body().unwrap_or_default();
    assert!(text.contains("Danke Ada, 42.00 EUR."), "{text}");
    w.router_idle().await;
    assert_eq!(
        w.smtp.messages().len(),
        1,
        "the dead-lettered event sent nothing"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// An event two rules match: the first dead-letters it (its runtime template does not exist), the
/// second waits for its customer, created a while later. Each redelivery of the waiting event
/// dead-lettered the first rule again, and once JetStream had forgotten the first dead letter's id
/// (its de-duplication window, 2 s here, passed while the event waited) the copy was kept: the
/// dead-letter stream held several replayable entries for one failure. A rule's dead letter now
/// goes out once the event is done with, so there is one.
#[tokio::test]
async fn an_event_waiting_for_one_rule_s_customer_dead_letters_another_rule_once() {
    let w = world_with(|config| {
        config.nats.dedup_window_secs = 2;
        // Room for many retries, so that the event waits well past the window.
        config.dispatch.retry.max_deliveries = 1_000;
        // First: `order_placed` naming a runtime template that does not exist.
        config.routing.rules.push(Rule {
            name: "order_placed".into(),
            event: "orders.created".into(),
            when: Default::default(),
            template: "order_note".into(),
            category: Category::Transactional,
            channels: Some(vec![Channel::Email]),
            recipient: "customer_id".into(),
            enabled: true,
        });
        // Second: a copy of the order for another customer, named by another field.
        config.routing.rules.push(Rule {
            name: "order_copy".into(),
            event: "orders.created".into(),
            when: Default::default(),
            template: "order_placed".into(),
            category: Category::Transactional,
            channels: Some(vec![Channel::Email]),
            recipient: "order_number".into(),
            enabled: true,
        });
    })
    .await;
    w.customer("c-ada", "ada@example.com", "en").await;
    let event_id = Uuid::now_v7();
    w.publish_event(
        &order_created(event_id, "c-ada", "c-later"),
        &event_id.to_string(),
    )
    .await;
    // Eight deliveries: at least 2.7 s of the test's backoff (100 + 200 + 400 + 4 × 500 ms) have
    // passed since the first, past the dead letters' de-duplication window.
    w.router_delivered(8).await;

    w.customer("c-later", "later@example.com", "en").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, ["later@example.com"]);
    w.router_idle().await;
    let letters = event_dead_letters(&w.nats).await;
    let placed: Vec<_> = letters
        .iter()
        .filter(|(reason, _)| reason.starts_with("rule order_placed:"))
        .collect();
    assert_eq!(
        placed.len(),
        1,
        "one dead letter for the rule that failed: {letters:?}"
    );
    assert!(placed[0].0.contains("order_note"), "{letters:?}");
    assert!(placed[0].1.contains(&event_id.to_string()), "{letters:?}");
    assert_eq!(letters.len(), 1, "none for the rule routed: {letters:?}");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_event_whose_notification_renders_too_large_to_send_is_dead_lettered_unstored() {
    let w = world_with(|config| {
        config.routing.rules.push(Rule {
            name: "order_placed".into(),
            event: "orders.created".into(),
            when: Default::default(),
            template: "order_big".into(),
            category: Category::Transactional,
            channels: Some(vec![Channel::Email]),
            recipient: "customer_id".into(),
            enabled: true,
        })
    })
    .await;
    // Each part within the template limits (source and output); as JSON every quote and line
    // break of the output takes two bytes, so the command would be about 960 KB.
    let repeated = |text: &str| {
        format!(
            "{{% for i in range(4) %}}{}{{% endfor %}}",
            text.repeat(60_000)
        )
    };
    let (status, body) = w
        .herald
        .put(
            "/api/v1/templates/order_big/locales/en",
            &json!({
                "description": "Too large to send",
                "category": "transactional",
                "subject": "Your order {{ order_number }}",
                "text": repeated("\n"),
                "html": repeated("\""),
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    w.customer("c-big", "big@example.com", "en").await;
    let event_id = Uuid::now_v7();
    w.publish_event(
        &order_created(event_id, "c-big", "1003"),
        &event_id.to_string(),
    )
    .await;
    let letters = wait_dead_letters(&w.nats, 1).await;
    assert!(
        letters[0].0.contains("bytes as a send command"),
        "the reason says why: {letters:?}"
    );
    let (status, page) = w
        .herald
        .get("/api/v1/notifications?customer_id=c-big")
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"], json!([]), "nothing stored: {page}");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A NATS server whose `max_payload` is below Herald's limit for a send command refuses a command
/// between the two on every try: the event is dead-lettered with a reason naming `max_payload`
/// rather than retried for ever, the notification is not kept, and the event's other notification
/// goes out once. Replayed once the template makes smaller output, the event sends the missing
/// notification and not the other again.
#[tokio::test]
async fn an_event_whose_command_exceeds_the_server_s_max_payload_is_dead_lettered_then_replayed() {
    let nats = NatsServer::start_with_config("max_payload: 65536", &[])
        .await
        .expect("nats-server starts");
    // Beside the built-in `order_placed`, a rule naming a runtime template, read at every render.
    let w = world_on(nats, |config| {
        config.templates.cache_ttl_secs = 0;
        config.routing.rules.push(Rule {
            name: "order_note".into(),
            event: "orders.created".into(),
            when: Default::default(),
            template: "order_note".into(),
            category: Category::Transactional,
            channels: Some(vec![Channel::Email]),
            recipient: "customer_id".into(),
            enabled: true,
        })
    })
    .await;
    let note = |text: String| {
        json!({"description": "A note on a new order", "category": "transactional",
               "subject": "Note on {{ order_number }}", "text": text})
    };
    let path = "/api/v1/templates/order_note/locales/en";
    // About 80 KB of text: a command within Herald's limit, beyond this server's.
    let large = format!(
        "{{% for i in range(2) %}}{}{{% endfor %}}",
        "x".repeat(40_000)
    );
    let (status, body) = w.herald.put(path, &note(large)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    w.customer("c-note", "note@example.com", "en").await;
    let event_id = Uuid::now_v7();
    w.publish_event(
        &order_created(event_id, "c-note", "1004"),
        &event_id.to_string(),
    )
    .await;

    let letters = wait_dead_letters(&w.nats, 1).await;
    let (reason, payload) = &letters[0];
    assert!(payload.contains(&event_id.to_string()), "{letters:?}");
    assert!(
        reason.contains("order_note") && reason.contains("max_payload") && reason.contains("65536"),
        "names the rule, the server's limit and its size: {reason}"
    );
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("Your order 1004 is confirmed")
    );
    w.router_idle().await;
    let (status, page) = w
        .herald
        .get("/api/v1/notifications?customer_id=c-note")
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(
        page["items"].as_array().map(Vec::len),
        Some(1),
        "only the order_placed notification is kept: {page}"
    );

    let (status, body) = w.herald.put(path, &note("Thanks.".into())).await;
    assert!(status.is_success(), "{body}");
    let (_, page) = w.herald.get("/api/v1/dlq?kind=events").await;
    let entry = page["items"]
        .as_array()
        .and_then(|items| items.iter().find(|e| e["event_id"] == event_id.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("the dead letter is listed: {page}"));
    assert_eq!(entry["replayable"], true, "{entry}");
    let seq = entry["seq"].as_u64().expect("seq");
    let (status, replayed) = w
        .herald
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    assert_eq!(mails[1].subject.as_deref(), Some("Note on 1004"));
    w.router_idle().await;
    w.commands_drained().await;
    assert_eq!(w.smtp.count(), 2, "order_placed is not sent again");
    assert_eq!(
        event_dead_letters(&w.nats).await,
        Vec::new(),
        "the replayed entry is gone, and no new one came"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn malformed_events_are_dead_lettered_and_the_router_keeps_going() {
    let w = world().await;
    w.customer("c-lin", "lin@example.com", "en").await;
    let unknown_type = json!({"v": 1, "id": Uuid::now_v7(), "type": "orders.exploded",
                              "occurred_at": "2026-11-22T10:00:00Z", "data": {}});
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("events.orders.created", b"{not json".to_vec()),
        (
            "events.orders.created",
            br#"{"v": 9, "id": "x", "type": "orders.created"}"#.to_vec(),
        ),
        (
            "events.orders.exploded",
            unknown_type.to_string().into_bytes(),
        ),
    ];
    for (i, (subject, payload)) in poison.into_iter().enumerate() {
        w.publish(subject, &format!("poison-{i}"), payload).await;
    }
    let event_id = Uuid::now_v7();
    w.publish_event(
        &order_created(event_id, "c-lin", "5005"),
        &event_id.to_string(),
    )
    .await;

    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["lin@example.com".to_string()]);
    let letters = wait_dead_letters(&w.nats, 3).await;
    let reasons: Vec<&str> = letters.iter().map(|(r, _)| r.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("malformed event")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown event schema version 9")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unknown event type")),
        "{reasons:?}"
    );
    // Counted as unreadable, as the dispatcher's poison commands are (the recorder is shared by
    // the tests of this process: at least these three).
    let router = [("consumer", "router")];
    assert!(
        w.herald
            .metric("herald_poison_messages_total", &router)
            .await
            >= 3.0
    );
    w.router_idle().await;
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Control characters in an event's text: a NUL, which PostgreSQL can neither store nor compare
/// (SQLSTATE 22021) while SQLite can, and others the API refuses in plain text. The event is
/// dead-lettered at once with a reason naming the field, alike on both databases, rather than
/// retried for ever (PostgreSQL) or waited for as an unknown customer (SQLite); the router goes on.
#[tokio::test]
async fn an_event_holding_a_control_character_is_dead_lettered_at_once_naming_the_field() {
    let w = world().await;
    w.customer("c-ctl", "ctl@example.com", "en").await;
    let nul = Uuid::now_v7();
    w.publish_event(&order_created(nul, "c-ctl\u{0}", "5006"), &nul.to_string())
        .await;
    let escape = Uuid::now_v7();
    w.publish_event(
        &order_created(escape, "c-ctl", "50\u{1b}07"),
        &escape.to_string(),
    )
    .await;
    let good = Uuid::now_v7();
    w.publish_event(&order_created(good, "c-ctl", "5008"), &good.to_string())
        .await;

    let letters = wait_dead_letters(&w.nats, 2).await;
    let reason_of = |id: Uuid| {
        letters
            .iter()
            .find(|(_, payload)| payload.contains(&id.to_string()))
            .map(|(reason, _)| reason.clone())
            .unwrap_or_else(|| panic!("event {id} dead-lettered: {letters:?}"))
    };
    let reason = reason_of(nul);
    assert!(
        reason.contains("customer_id") && reason.contains("control character"),
        "names the field and why: {reason}"
    );
    let reason = reason_of(escape);
    assert!(
        reason.contains("order_number") && reason.contains("control character"),
        "names the field and why: {reason}"
    );
    w.router_idle().await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails.len(), 1, "only the good event notifies: {mails:?}");
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("Your order 5008 is confirmed")
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A `/` in a customer id, which the API refuses in ids: no customer can have it, so the event is
/// dead-lettered at once with a reason naming the field, rather than
/// waited for as an unknown customer until the retry schedule gives up; its dead letter is not
/// replayable (the event cannot be mended), and the router goes on.
#[tokio::test]
async fn an_event_with_a_slash_in_an_id_is_dead_lettered_at_once_naming_the_field() {
    let mut retry = None;
    let w = world_with(|config| retry = Some(config.dispatch.retry)).await;
    let allowed = retry.expect("the test's retry policy").total_wait();
    w.customer("c-sl", "sl@example.com", "en").await;
    let publishing = Instant::now();
    let customer = Uuid::now_v7();
    w.publish_event(
        &order_created(customer, "shop/c-sl", "5201"),
        &customer.to_string(),
    )
    .await;
    let other = Uuid::now_v7();
    w.publish_event(
        &order_created(other, "shop/c-sl", "5202"),
        &other.to_string(),
    )
    .await;
    // An order number is only shown: a producer's own `2026/5203` is routed.
    let good = Uuid::now_v7();
    w.publish_event(&order_created(good, "c-sl", "2026/5203"), &good.to_string())
        .await;

    let letters = wait_dead_letters(&w.nats, 2).await;
    let waited = publishing.elapsed();
    let reason_of = |id: Uuid| {
        letters
            .iter()
            .find(|(_, payload)| payload.contains(&id.to_string()))
            .map(|(reason, _)| reason.clone())
            .unwrap_or_else(|| panic!("event {id} dead-lettered: {letters:?}"))
    };
    for id in [customer, other] {
        let reason = reason_of(id);
        assert!(
            reason.contains("customer_id must not contain '/'"),
            "names the field and why: {reason}"
        );
    }
    assert!(
        waited < allowed,
        "dead-lettered at once, not after the retry schedule's wait ({allowed:?}): {waited:?}"
    );
    // Listed, but not among the events (`kind=events`), which are the readable ones.
    let (_, page) = w.herald.get("/api/v1/dlq").await;
    let items = page["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 2, "{page}");
    assert!(
        items.iter().all(|entry| entry["replayable"] == false),
        "not replayable: {page}"
    );
    w.router_idle().await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("Your order 2026/5203 is confirmed")
    );
    w.commands_drained().await;
    assert_eq!(w.smtp.count(), 1, "only the good event notifies");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Makes the database refuse to store a notification for `customer` with an error that is not an
/// outage: a check constraint (PostgreSQL) or a trigger (SQLite).
async fn refuse_notifications_for(db: &TestDatabase, customer: &str) {
    use sea_orm::ConnectionTrait;
    let conn = sea_orm::Database::connect(db.url()).await.expect("connect");
    let sql = match db.kind() {
        herald_tests::DatabaseKind::Postgres => format!(
            "ALTER TABLE notifications ADD CONSTRAINT test_refused \
             CHECK (recipient_key <> '{customer}') NOT VALID"
        ),
        herald_tests::DatabaseKind::Sqlite => format!(
            "CREATE TRIGGER test_refused BEFORE INSERT ON notifications \
             WHEN NEW.recipient_key = '{customer}' \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        ),
    };
    conn.execute_unprepared(&sql)
        .await
        .expect("refusal installed");
    conn.close().await.expect("close");
}

/// A database error that is not an outage (here a constraint the row breaks) will not go away by
/// retrying: the event is dead-lettered with the error as its reason, not NAKed for ever (the
/// router's consumer has no delivery limit), and the router goes on.
#[tokio::test]
async fn an_event_the_database_refuses_to_store_is_dead_lettered_not_retried_for_ever() {
    let w = world().await;
    w.customer("c-refused", "refused@example.com", "en").await;
    w.customer("c-fine", "fine@example.com", "en").await;
    refuse_notifications_for(&w.db, "c-refused").await;
    let refused = Uuid::now_v7();
    w.publish_event(
        &order_created(refused, "c-refused", "5101"),
        &refused.to_string(),
    )
    .await;
    let fine = Uuid::now_v7();
    w.publish_event(&order_created(fine, "c-fine", "5102"), &fine.to_string())
        .await;
    let letters = wait_dead_letters(&w.nats, 1).await;
    let (reason, payload) = &letters[0];
    assert!(payload.contains(&refused.to_string()), "{letters:?}");
    assert!(
        reason.contains("order_placed") && reason.contains("database error"),
        "names the rule and the error: {reason}"
    );
    w.router_idle().await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["fine@example.com".to_string()]);
    w.herald.shutdown().await.expect("clean shutdown");
}

/// The subject is the event's type: an event published on another type's subject (a producer
/// allowed only `events.orders.>` sending a security alert) is dead-lettered with a reason naming
/// both, not routed as the type its body claims.
#[tokio::test]
async fn an_event_published_on_another_type_s_subject_is_dead_lettered() {
    let w = world().await;
    w.customer("c-sub", "sub@example.com", "en").await;
    let alert_id = Uuid::now_v7();
    let alert = json!({"v": 1, "id": alert_id, "type": "security.login_alert",
                       "occurred_at": "2026-11-22T10:00:00Z",
                       "data": {"customer_id": "c-sub", "ip": "192.0.2.1"}});
    w.publish(
        "events.orders.created",
        &alert_id.to_string(),
        alert.to_string().into_bytes(),
    )
    .await;
    let letters = wait_dead_letters(&w.nats, 1).await;
    let (reason, payload) = &letters[0];
    assert!(payload.contains(&alert_id.to_string()), "{letters:?}");
    assert!(
        reason.contains("events.orders.created") && reason.contains("security.login_alert"),
        "names the subject and the type: {reason}"
    );
    // Nor may a replay route it on the subject its body names.
    let (_, page) = w.herald.get("/api/v1/dlq").await;
    let entry = page["items"]
        .as_array()
        .and_then(|items| items.iter().find(|e| e["event_id"] == alert_id.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("the dead letter is listed: {page}"));
    assert_eq!(entry["replayable"], false, "{entry}");
    let seq = entry["seq"].as_u64().expect("seq");
    let (status, answer) = w
        .herald
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    w.router_idle().await;
    assert_eq!(w.smtp.count(), 0, "nothing routed");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// The dead letter of event `id` on the first page of `GET /api/v1/dlq`.
async fn listed_event(herald: &TestHerald, id: Uuid) -> Value {
    eventually(
        &format!("event {id}'s dead letter listed"),
        E2E_TIMEOUT,
        || async {
            herald.get("/api/v1/dlq").await.1["items"]
                .as_array()
                .and_then(|items| items.iter().find(|e| e["event_id"] == id.to_string()))
                .cloned()
        },
    )
    .await
}

/// A readable event larger than the Router routes is dead-lettered as oversized; replaying it
/// would only dead-letter it again, so it is listed as not replayable and its replay is refused
/// (409) with the reason, the entry staying.
#[tokio::test]
async fn an_oversized_event_is_not_replayable() {
    let w = world().await;
    w.customer("c-big", "big@example.com", "en").await;
    let event_id = Uuid::now_v7();
    let mut event = order_created(event_id, "c-big", "5301");
    event["data"]["items"][0]["name"] = json!("x".repeat(herald_nats::events::MAX_EVENT_BYTES));
    w.publish_event(&event, &event_id.to_string()).await;
    let letters = wait_dead_letters(&w.nats, 1).await;
    assert!(letters[0].0.starts_with("oversized event"), "{letters:?}");
    let entry = listed_event(&w.herald, event_id).await;
    assert_eq!(entry["replayable"], false, "{entry}");
    let seq = entry["seq"].as_u64().expect("seq");
    let (status, answer) = w
        .herald
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("larger than the Router routes"),
        "{message}"
    );
    assert_eq!(
        listed_event(&w.herald, event_id).await["seq"],
        seq,
        "the entry stays"
    );
    w.router_idle().await;
    assert_eq!(w.smtp.count(), 0, "nothing routed");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Notifications kept a day, events 23 hours: a copy of an event that occurred two hours ago,
/// replayed now, would stay in `EVENTS` for an hour after the notifications it made may be
/// deleted, and a Router consumer recreated then would send them again. So it is listed as not
/// replayable and its replay is refused (409) naming the numbers; one that occurred half an hour
/// ago is replayed.
#[tokio::test]
async fn an_event_whose_replayed_copy_would_outlive_its_notifications_is_not_replayed() {
    let w = world_with(|config| {
        config.scheduler.retention_days = 1;
        config.nats.retention.events.max_age_secs = 23 * 3_600;
        // Given up at the first delivery, to keep the test short.
        config.dispatch.retry.max_deliveries = 1;
    })
    .await;
    let occurred = |ago: chrono::Duration, number: &str| {
        let id = Uuid::now_v7();
        let mut event = order_created(id, "c-old", number);
        event["occurred_at"] = json!((chrono::Utc::now() - ago).to_rfc3339());
        (id, event)
    };
    let (old_id, old) = occurred(chrono::Duration::hours(2), "5401");
    let (new_id, new) = occurred(chrono::Duration::minutes(30), "5402");
    w.publish_event(&old, &old_id.to_string()).await;
    w.publish_event(&new, &new_id.to_string()).await;
    wait_dead_letters(&w.nats, 2).await;
    w.customer("c-old", "old@example.com", "en").await;

    let entry = listed_event(&w.herald, old_id).await;
    assert_eq!(entry["replayable"], false, "{entry}");
    let seq = entry["seq"].as_u64().expect("seq");
    let (status, answer) = w
        .herald
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("are kept 1 d 0 h 0 min")
            && message.contains("max_age_secs = 82800")
            && message.contains("2 h"),
        "names the numbers: {message}"
    );

    let entry = listed_event(&w.herald, new_id).await;
    assert_eq!(entry["replayable"], true, "{entry}");
    let seq = entry["seq"].as_u64().expect("seq");
    let (status, replayed) = w
        .herald
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("Your order 5402 is confirmed")
    );
    w.router_idle().await;
    w.commands_drained().await;
    assert_eq!(w.smtp.count(), 1, "the old event was not routed");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_order_stored_while_nats_is_down_is_published_by_the_outbox_relay() {
    let mut w = world().await;
    w.customer("c-mo", "mo@example.com", "en").await;
    w.nats.kill().await.expect("kill nats");
    let (status, order) = w
        .herald
        .post(
            "/api/v1/orders",
            &json!({"order_number": "6006", "customer_id": "c-mo", "total_minor": 500,
                    "currency": "USD"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "stored, event in the outbox: {order}"
    );
    w.nats.restart().await.expect("restart nats");
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("Your order 6006 is confirmed")
    );
    assert!(
        mails[0]
            .text_body()
            .unwrap_or_default()
            .contains("5.00 USD")
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Restarts `nats` with a `max_payload` of 64 KiB: the API checks an order's event against the
/// server's limit when it takes the order, so an event stored in the outbox that the server
/// refuses is one taken before the server's limit was lowered.
async fn lower_max_payload(nats: &mut NatsServer) {
    std::fs::write(nats.file("nats.conf"), "max_payload: 65536").expect("configuration written");
    nats.restart().await.expect("restart nats");
}

/// An outbox row NATS refuses while connected (an event larger than the server's `max_payload`,
/// lowered since the order was taken) is held back and tried again later; the rows stored after
/// it are relayed meanwhile, instead of waiting behind it for ever.
#[tokio::test]
async fn an_outbox_row_nats_refuses_does_not_hold_back_the_rows_after_it() {
    let nats = NatsServer::start_with_config("max_payload: 1048576", &[])
        .await
        .expect("nats-server starts");
    let mut w = world_on(nats, |_| {}).await;
    w.customer("c-huge", "huge@example.com", "en").await;
    w.customer("c-small", "small@example.com", "en").await;
    w.nats.kill().await.expect("kill nats");
    // 100 items of 1,000 bytes: an event within Herald's limit, beyond this server's.
    let items: Vec<Value> = (0..100)
        .map(|i| {
            json!({"name": format!("{i:03}{}", "x".repeat(997)), "quantity": 1,
                        "unit_price_minor": 1})
        })
        .collect();
    for (number, customer, items) in [("7001", "c-huge", items), ("7002", "c-small", vec![])] {
        let (status, order) = w
            .herald
            .post(
                "/api/v1/orders",
                &json!({"order_number": number, "customer_id": customer, "total_minor": 100,
                        "currency": "EUR", "items": items}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::CREATED,
            "stored, event in the outbox: {order}"
        );
    }
    lower_max_payload(&mut w.nats).await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["small@example.com".to_string()]);
    eventually("the refused row to be counted", E2E_TIMEOUT, || async {
        let failures = w
            .herald
            .metric("herald_outbox_relay_failures_total", &[])
            .await;
        (failures >= 1.0).then_some(())
    })
    .await;
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Published outbox rows past their retention are removed a bounded round at a time: one DELETE
/// of all of them (after downtime, a day of events) held SQLite's only write lock for seconds,
/// refusing API writes and holding up the StatusWriter meanwhile. Rows not published, or published
/// recently, stay.
#[tokio::test]
async fn old_published_outbox_rows_are_removed_in_bounded_rounds() {
    use herald_entities::{outbox_event, repo::outbox};
    use sea_orm::{ActiveValue::Set, EntityTrait};
    const OLD: usize = 2_500;
    const ROUND: u64 = 1_000;
    let database = TestDatabase::from_env().await.expect("database");
    let db = herald_tests::migrated(database.url())
        .await
        .expect("migrated");
    let now = chrono::Utc::now();
    let long_ago = now - chrono::Duration::days(2);
    let row = |published_at| outbox_event::ActiveModel {
        id: Set(Uuid::now_v7()),
        subject: Set("events.orders.created".into()),
        payload: Set(json!({})),
        created_at: Set(long_ago),
        published_at: Set(published_at),
        ordering_key: Set(None),
    };
    let kept = [row(Some(now)), row(None)];
    let kept_ids: std::collections::HashSet<Uuid> =
        kept.iter().map(|row| *row.id.as_ref()).collect();
    let rows: Vec<_> = (0..OLD).map(|_| row(Some(long_ago))).chain(kept).collect();
    for chunk in rows.chunks(500) {
        outbox_event::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(&db)
            .await
            .expect("rows stored");
    }

    let before = now - chrono::Duration::days(1);
    let mut rounds = Vec::new();
    while rounds.len() < 4 {
        let removed = outbox::delete_published_before(&db, before, ROUND)
            .await
            .expect("a round removed");
        rounds.push(removed);
        if removed < ROUND {
            break;
        }
    }
    assert_eq!(rounds, [1_000, 1_000, 500], "rounds of at most {ROUND}");
    let left: std::collections::HashSet<Uuid> = outbox_event::Entity::find()
        .all(&db)
        .await
        .expect("rows read")
        .into_iter()
        .map(|row| row.id)
        .collect();
    assert_eq!(left, kept_ids, "the unpublished and the recent ones stay");
}

/// The statuses of order `number`'s `orders.status_changed` events in the `EVENTS` stream, in
/// stream order (the order the router is handed them).
async fn status_events(nats: &NatsServer, number: &str) -> Vec<String> {
    let js = jetstream::new(nats.client().await.expect("client"));
    let stream = js.get_stream("EVENTS").await.expect("events stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: "events.orders.status_changed".into(),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut out = Vec::new();
    let mut messages = consumer.messages().await.expect("messages");
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(500), messages.next()).await
    {
        let event: Value = serde_json::from_slice(&message.payload).expect("event JSON");
        if event["data"]["order_number"] == number {
            out.push(
                event["data"]["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    out
}

impl World {
    /// Moves order `number` to `status` (`shipped` with a tracking number) and asserts 200.
    async fn order_status(&self, number: &str, status: &str) {
        let (code, order) = self
            .herald
            .put(
                &format!("/api/v1/orders/{number}/status"),
                &json!({"status": status, "tracking_number": "TRK-1"}),
            )
            .await;
        assert_eq!(code, StatusCode::OK, "{status}: {order}");
    }

    /// Waits until Herald's NATS connection is back (readiness says so).
    async fn nats_connected(&self) {
        eventually("Herald to reconnect to NATS", E2E_TIMEOUT, || async {
            let (_, ready) = self.herald.get("/health/ready").await;
            (ready["nats"]["ok"] == true).then_some(())
        })
        .await;
    }
}

/// An order's event is never published ahead of an older one still in the outbox: `paid`, stored
/// while NATS is down, waits for the relay, and `shipped`, sent once NATS is back, is left to the
/// relay behind it instead of overtaking it (the customer would hear "shipped" before "paid").
#[tokio::test]
async fn an_order_event_does_not_overtake_an_older_one_waiting_in_the_outbox() {
    let mut w = world().await;
    w.customer("c-seq", "seq@example.com", "en").await;
    let (status, order) = w
        .herald
        .post(
            "/api/v1/orders",
            &json!({"order_number": "8008", "customer_id": "c-seq", "total_minor": 500,
                    "currency": "EUR"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    w.nats.kill().await.expect("kill nats");
    w.order_status("8008", "paid").await;
    w.nats.restart().await.expect("restart nats");
    w.nats_connected().await;
    // Within the relay's grace for `paid`: published at once, `shipped` would come first.
    w.order_status("8008", "shipped").await;
    let statuses = eventually("both status events in the stream", E2E_TIMEOUT, || async {
        let statuses = status_events(&w.nats, "8008").await;
        (statuses.len() >= 2).then_some(statuses)
    })
    .await;
    assert_eq!(statuses, ["paid", "shipped"], "in the order they happened");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// The relay publishes an order's waiting events in the order they were written, also when the
/// API host that wrote the later one has a clock behind the other's (several instances share one
/// database): the later row is dated after the earlier one, not by the slower clock.
#[tokio::test]
async fn an_order_event_written_on_a_host_whose_clock_is_behind_is_relayed_after_the_earlier_one() {
    use herald_entities::{
        order::OrderStatus,
        repo::{
            orders,
            outbox::{self, NewOutboxEvent},
        },
    };
    let database = TestDatabase::from_env().await.expect("database");
    let db = herald_tests::migrated(database.url())
        .await
        .expect("migrated");
    let now = chrono::Utc::now();
    let event = |id, subject: &str, created_at| NewOutboxEvent {
        id,
        subject: subject.into(),
        payload: json!({}),
        created_at,
        ordering_key: "order:9009".into(),
    };
    let created = Uuid::now_v7();
    let row = orders::placed(
        Uuid::now_v7(),
        "9009".into(),
        "c-clock".into(),
        500,
        "EUR".into(),
        json!([]),
    );
    orders::create(&db, row, event(created, "events.orders.created", now))
        .await
        .expect("order stored");
    let paid = Uuid::now_v7();
    let behind = now - chrono::Duration::seconds(5);
    let update = orders::StatusUpdate {
        from: OrderStatus::Placed,
        to: OrderStatus::Paid,
        tracking_number: None,
        delivery_estimate: None,
    };
    orders::update_status(
        &db,
        "9009",
        update,
        event(paid, "events.orders.paid", behind),
    )
    .await
    .expect("status stored")
    .expect("the order was placed");

    let relayed: Vec<Uuid> = outbox::unpublished(&db, now + chrono::Duration::minutes(1), 10)
        .await
        .expect("outbox read")
        .into_iter()
        .map(|row| row.id)
        .collect();
    assert_eq!(relayed, [created, paid], "the order they were written in");
}

/// A held-back outbox row (larger than the server's `max_payload`, lowered since the order was
/// taken) holds back the later events of its order too, while other orders' events are relayed:
/// the order's `paid` must not reach the router before its `orders.created`.
#[tokio::test]
async fn an_outbox_row_nats_refuses_holds_back_the_later_events_of_its_order() {
    let nats = NatsServer::start_with_config("max_payload: 1048576", &[])
        .await
        .expect("nats-server starts");
    let mut w = world_on(nats, |_| {}).await;
    w.customer("c-big", "big@example.com", "en").await;
    w.customer("c-other", "other@example.com", "en").await;
    w.nats.kill().await.expect("kill nats");
    // 100 items of 1,000 bytes: an event within Herald's limit, beyond this server's.
    let items: Vec<Value> = (0..100)
        .map(|i| {
            json!({"name": format!("{i:03}{}", "x".repeat(997)), "quantity": 1,
                        "unit_price_minor": 1})
        })
        .collect();
    let (status, order) = w
        .herald
        .post(
            "/api/v1/orders",
            &json!({"order_number": "7101", "customer_id": "c-big", "total_minor": 100,
                    "currency": "EUR", "items": items}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "stored, event in the outbox: {order}"
    );
    w.order_status("7101", "paid").await;
    let (status, order) = w
        .herald
        .post(
            "/api/v1/orders",
            &json!({"order_number": "7102", "customer_id": "c-other", "total_minor": 100,
                    "currency": "EUR"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{order}");
    lower_max_payload(&mut w.nats).await;
    // 7102's event is the newest row: once it is relayed, the relay has passed 7101's `paid`.
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["other@example.com".to_string()]);
    assert_eq!(
        status_events(&w.nats, "7101").await,
        Vec::<String>::new(),
        "7101's paid waits behind its refused orders.created"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A message too large to be copied into a dead letter (with the dead letter's headers it would
/// exceed the server's `max_payload`) is dead-lettered without its payload, the reason saying so,
/// instead of being handed back for ever.
#[tokio::test]
async fn a_message_too_large_to_copy_is_dead_lettered_without_its_payload() {
    let nats = NatsServer::start_with_config("max_payload: 65536", &[])
        .await
        .expect("nats-server starts");
    let w = world_on(nats, |_| {}).await;
    let mut payload = b"{not json ".to_vec();
    payload.resize(65_400, b'x');
    w.publish("events.orders.created", "too-large", payload)
        .await;
    let letters = wait_dead_letters(&w.nats, 1).await;
    let (reason, copy) = &letters[0];
    assert!(
        reason.contains("65400 bytes")
            && reason.contains("left out")
            && reason.contains("malformed event"),
        "says what is left out and why the message is dead: {reason}"
    );
    assert!(copy.is_empty(), "no payload: {} bytes", copy.len());
    w.router_idle().await;
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn customers_api_creates_reads_and_replaces() {
    let w = world().await;
    w.customer("c-1", "one@example.com", "en").await;
    let (status, body) = w
        .herald
        .post(
            "/api/v1/customers",
            &json!({"id": "c-1", "email": "x@example.com"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "conflict");

    let (status, got) = w.herald.get("/api/v1/customers/c-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["email"], "one@example.com");
    assert_eq!(got["timezone"], "Europe/Berlin");

    let (status, body) = w
        .herald
        .put(
            "/api/v1/customers/c-1",
            &json!({"timezone": "Mars/Olympus"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "timezone");
    let (status, body) = w
        .herald
        .put("/api/v1/customers/c-1", &json!({"phone": "0151 123"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "phone");

    let (status, updated) = w
        .herald
        .put(
            "/api/v1/customers/c-1",
            &json!({"name": "Uno", "phone": "+4915112345678", "telegram_chat_id": "42",
                    "push_tokens": ["tok-1"], "locale": "de-AT", "timezone": "Europe/Vienna"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    let (_, got) = w.herald.get("/api/v1/customers/c-1").await;
    assert_eq!(got["phone"], "+4915112345678");
    assert_eq!(got["push_tokens"], json!(["tok-1"]));
    assert_eq!(got["locale"], "de-AT");
    assert!(got.get("email").is_none(), "PUT replaces: {got}");

    let (status, body) = w.herald.get("/api/v1/customers/nobody").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "not_found");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn orders_api_refuses_unknown_customers_and_bad_transitions() {
    let w = world().await;
    let (status, body) = w
        .herald
        .post(
            "/api/v1/orders",
            &json!({"order_number": "7", "customer_id": "nobody", "total_minor": 1, "currency": "EUR"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "customer_id");

    w.customer("c-7", "seven@example.com", "en").await;
    let order =
        json!({"order_number": "7", "customer_id": "c-7", "total_minor": 1, "currency": "EUR"});
    let (status, _) = w.herald.post("/api/v1/orders", &order).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = w.herald.post("/api/v1/orders", &order).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Each line within the limits, but an event too large for the Router as a whole.
    let items: Vec<Value> = (0..300)
        .map(|i| json!({"name": format!("{i:03} {}", "x".repeat(990)), "quantity": 1, "unit_price_minor": 1}))
        .collect();
    let (status, body) = w
        .herald
        .post(
            "/api/v1/orders",
            &json!({"order_number": "8", "customer_id": "c-7", "total_minor": 300,
                    "currency": "EUR", "items": items}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "items");
    let (status, _) = w.herald.get("/api/v1/orders/8").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing stored");

    let (status, body) = w
        .herald
        .put("/api/v1/orders/7/status", &json!({"status": "delivered"}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("placed; it cannot become delivered"),
        "{body}"
    );
    let (status, body) = w
        .herald
        .put("/api/v1/orders/7/status", &json!({"status": "shipped"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "tracking_number");
    let (status, _) = w
        .herald
        .put("/api/v1/orders/nope/status", &json!({"status": "paid"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn templates_api_lists_and_previews() {
    let w = world().await;
    let (status, list) = w.herald.get("/api/v1/templates").await;
    assert_eq!(status, StatusCode::OK);
    let shipped = list
        .as_array()
        .expect("array")
        .iter()
        .find(|t| t["code"] == "order_shipped")
        .expect("order_shipped listed")
        .clone();
    assert_eq!(shipped["locales"], json!(["en", "de"]));
    assert!(
        shipped["variables"]
            .as_array()
            .expect("variables")
            .iter()
            .any(|v| v["name"] == "tracking_number" && v["required"] == true)
    );

    let (status, body) = w
        .herald
        .post(
            "/api/v1/templates/order_shipped/preview",
            &json!({"variables": {"order_number": "1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "variables.tracking_number");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("tracking_number")
    );

    let (status, preview) = w
        .herald
        .post(
            "/api/v1/templates/order_shipped/preview",
            &json!({"locale": "de-CH", "variables": {"order_number": "1", "tracking_number": "<b>T1</b>"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!(preview["locale"], "de");
    let html = preview["html"].as_str().unwrap_or_default();
    assert!(!html.contains("<b>T1</b>"), "escaped: {html}");
    assert!(
        preview["text"]
            .as_str()
            .unwrap_or_default()
            .contains("Sendungsnummer: <b>T1</b>")
    );

    let (status, _) = w
        .herald
        .post("/api/v1/templates/nope/preview", &json!({"variables": {}}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_deleted_router_consumer_is_bound_again() {
    let w = world().await;
    w.customer("c-ada", "ada@example.com", "en-GB").await;
    let first = Uuid::now_v7();
    w.publish_event(&order_created(first, "c-ada", "1001"), &first.to_string())
        .await;
    w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    w.router_idle().await;

    // An operator removes the router's durable consumer (`nats consumer rm`) while Herald runs.
    let js = w.js().await;
    let stream = js.get_stream("EVENTS").await.expect("events");
    stream
        .delete_consumer("herald-router")
        .await
        .expect("consumer deleted");

    let second = Uuid::now_v7();
    w.publish_event(&order_created(second, "c-ada", "1002"), &second.to_string())
        .await;
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    assert_eq!(
        mails[1].subject.as_deref(),
        Some("Your order 1002 is confirmed")
    );
    w.router_idle().await;
    w.commands_drained().await;
    assert_eq!(w.smtp.count(), 2, "the first event was not notified again");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Streams lost with the server's store (a NATS without a persistent volume restarted) are
/// created again by the running instance, which then routes events and delivers sends as before:
/// it waited for them for ever, every send failing with 503, until it was restarted.
#[tokio::test]
async fn lost_streams_are_created_again_without_a_restart() {
    let w = world().await;
    w.customer("c-ada", "ada@example.com", "en-GB").await;
    let js = w.js().await;
    for stream in ["EVENTS", "NOTIFY"] {
        js.delete_stream(stream).await.expect("stream deleted");
    }
    let id = eventually("a send to be accepted again", E2E_TIMEOUT, || async {
        let (status, body) = w
            .herald
            .send(&json!({
                "recipient": { "customer_id": "c-ada" },
                "category": "transactional",
                "channels": ["email"],
                "content": { "subject": "Still here", "text": "After the streams came back." }
            }))
            .await;
        (status == StatusCode::ACCEPTED).then(|| body["id"].as_str().map(str::to_string))
    })
    .await
    .expect("id in answer");
    // nats-server 2.9 ends the open pull requests with "consumer deleted", and the loops bind
    // again at once; a server that left them unanswered would be noticed after two missed idle
    // heartbeats (15 s each), hence the longer bound.
    let recovery = Duration::from_secs(60);
    eventually("the send to be sent", recovery, || async {
        let (_, body) = w.herald.get(&format!("/api/v1/notifications/{id}")).await;
        (body["status"] == "sent").then_some(())
    })
    .await;
    let event = Uuid::now_v7();
    w.publish_event(&order_created(event, "c-ada", "1003"), &event.to_string())
        .await;
    let mails = w.smtp.wait_for_count(2, recovery).await.expect("mails");
    assert!(
        mails
            .iter()
            .any(|m| m.subject.as_deref() == Some("Your order 1003 is confirmed")),
        "the event was routed"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// The partition lease bucket lost with the server's store (or removed with `nats kv rm`) is
/// created again by the running instance, which takes its partitions again and delivers sends as
/// before: its renewals failed, its leases ran out, and it delivered nothing more, for good, while
/// readiness stayed `200`.
#[tokio::test]
async fn a_lost_lease_bucket_is_created_again_without_a_restart() {
    const LEASE_TTL: Duration = Duration::from_secs(2);
    let w = world_with(|config| config.cluster.lease_ttl_ms = LEASE_TTL.as_millis() as u64).await;
    w.customer("c-ada", "ada@example.com", "en-GB").await;
    let partitions = herald_engine::Config::default().nats.partitions;
    let js = w.js().await;
    js.delete_stream(herald_nats::leases::LEASE_STREAM)
        .await
        .expect("lease bucket deleted");
    let deleted = Instant::now();

    // Once the leases held before the loss are past their deadlines, a send is delivered only
    // under leases taken in the bucket created again.
    eventually(
        "the lease bucket created again, every partition taken in it, and the leases from before \
         its loss expired",
        E2E_TIMEOUT,
        || async {
            let leases = js
                .get_key_value(herald_nats::leases::LEASE_BUCKET)
                .await
                .ok()?;
            for partition in 0..partitions {
                let key = herald_nats::leases::partition_key(partition);
                leases.get(&key).await.ok()??;
            }
            (deleted.elapsed() >= LEASE_TTL).then_some(())
        },
    )
    .await;
    let id = w
        .herald
        .send_accepted(&json!({
            "recipient": { "customer_id": "c-ada" },
            "category": "transactional",
            "channels": ["email"],
            "content": { "subject": "Still here", "text": "After the leases came back." }
        }))
        .await;
    w.herald.wait_status(&id, "sent").await;

    let (status, ready) = w.herald.get("/health/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert!(
        ready["streams"]["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains(herald_nats::leases::LEASE_STREAM)),
        "readiness checks the lease bucket: {ready}"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}
