//! Recipients' wishes and limits end to end: preferences (opt-outs, failover, all-out ⇒ skipped),
//! quiet hours (deferred, then delivered; critical at once), per-user rate limits (drop, and
//! defer with a slot of its own for each held notification, in order), scheduled sends across an engine restart, cancel, bulk fan-out to 10k customers
//! exactly once, and retention.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{Duration as ChronoDuration, Utc};
use herald_actors::channel::webhook::WebhookConfig;
use herald_actors::rate_limit::{CategoryLimit, OverLimit};
use herald_engine::Config;
use herald_entities::{NotificationStatus, customer, notification};
use herald_tests::{
    DatabaseKind, E2E_TIMEOUT, NatsServer, SmtpSink, TestDatabase, TestHerald, eventually,
    eventually_showing, test_config,
};
use reqwest::StatusCode;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QuerySelect, sea_query::Expr,
};
use serde_json::{Value, json};
use uuid::Uuid;
use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

struct World {
    nats: NatsServer,
    smtp: SmtpSink,
    db: TestDatabase,
    hooks: MockServer,
    herald: TestHerald,
}

impl World {
    fn config(&self, tune: impl FnOnce(&mut Config)) -> Config {
        config(&self.nats, &self.db, &self.smtp, tune)
    }
}

fn config(
    nats: &NatsServer,
    db: &TestDatabase,
    smtp: &SmtpSink,
    tune: impl FnOnce(&mut Config),
) -> Config {
    let mut config = test_config(nats, db, smtp);
    config.channels.webhook = Some(WebhookConfig {
        secret: WEBHOOK_SECRET.into(),
        timeout_ms: 2_000,
        // The receivers are local mock servers.
        allow_private_targets: true,
        ..WebhookConfig::default()
    });
    config.scheduler.poll_interval_ms = 100;
    tune(&mut config);
    config
}

async fn world(tune: impl FnOnce(&mut Config)) -> World {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let hooks = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&hooks)
        .await;
    let herald = TestHerald::start(config(&nats, &db, &smtp, tune))
        .await
        .expect("herald starts");
    World {
        nats,
        smtp,
        db,
        hooks,
        herald,
    }
}

fn customer_row(external_id: &str, locale: &str, webhook: Option<String>) -> customer::ActiveModel {
    let now = Utc::now();
    customer::ActiveModel {
        id: Set(Uuid::now_v7()),
        external_id: Set(external_id.to_string()),
        name: Set(Some(format!("Customer {external_id}"))),
        email: Set(Some(format!("{external_id}@example.com"))),
        phone: Set(None),
        telegram_chat_id: Set(None),
        push_tokens: Set(json!([])),
        webhook_url: Set(webhook),
        webhook_secret: Set(None),
        previous_webhook_secret: Set(None),
        webhook_secret_replaced_at: Set(None),
        locale: Set(locale.to_string()),
        timezone: Set("UTC".into()),
        created_at: Set(now),
        updated_at: Set(now),
    }
}

/// Stores customers directly, 500 per INSERT.
async fn add_customers(herald: &TestHerald, rows: Vec<customer::ActiveModel>) {
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<_> = rows.by_ref().take(500).collect();
        customer::Entity::insert_many(chunk)
            .exec_without_returning(herald.db())
            .await
            .expect("customers stored");
    }
}

fn to_customer(id: &str, category: &str, channels: &[&str]) -> Value {
    json!({
        "recipient": { "customer_id": id },
        "category": category,
        "channels": channels,
        "content": { "subject": format!("A {category} message"), "text": "Hello from the shop." }
    })
}

async fn put_preferences(herald: &TestHerald, id: &str, body: &Value) -> (StatusCode, Value) {
    herald
        .put(&format!("/api/v1/customers/{id}/preferences"), body)
        .await
}

/// PUTs `body` as `id`'s preferences, asserts they were stored and answers them as stored.
async fn set_preferences(herald: &TestHerald, id: &str, body: &Value) -> Value {
    let (status, stored) = put_preferences(herald, id, body).await;
    assert_eq!(status, StatusCode::OK, "preferences of {id}: {stored}");
    stored
}

/// Gives `customer` quiet hours that started an hour ago and end `for_` from now (UTC wall
/// clock, to the second); returns when they end.
async fn quiet_for(
    herald: &TestHerald,
    customer: &str,
    for_: ChronoDuration,
) -> chrono::DateTime<Utc> {
    let now = Utc::now();
    let end = now + for_;
    set_preferences(
        herald,
        customer,
        &json!({ "quiet_hours": {
            "start": (now - ChronoDuration::hours(1)).format("%H:%M:%S").to_string(),
            "end": end.format("%H:%M:%S").to_string(),
            "timezone": "UTC"
        }}),
    )
    .await;
    end
}

async fn notification_json(herald: &TestHerald, id: &str) -> Value {
    herald.get(&format!("/api/v1/notifications/{id}")).await.1
}

/// Replacements of one customer's preferences at once each succeed, and the stored wishes are one
/// request's whole (on PostgreSQL the second one's insert used to collide with the first's: 500).
#[tokio::test]
async fn concurrent_preference_replacements_all_succeed_and_one_wins_whole() {
    let w = world(|_| {}).await;
    add_customers(&w.herald, vec![customer_row("ada", "en", None)]).await;
    let bodies: Vec<Value> = (0..10_u32)
        .map(|i| {
            json!({
                "preferences": [
                    { "category": "marketing", "enabled": i.is_multiple_of(2) },
                    { "category": "marketing", "channel": "email", "enabled": true }
                ],
                "quiet_hours": { "start": format!("22:{i:02}"), "end": "07:00", "timezone": "UTC" }
            })
        })
        .collect();
    let answers = futures::future::join_all(
        bodies
            .iter()
            .map(|body| put_preferences(&w.herald, "ada", body)),
    )
    .await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
    }
    let (_, read) = w.herald.get("/api/v1/customers/ada/preferences").await;
    let start = read["quiet_hours"]["start"].as_str().unwrap_or_default();
    let minute: usize = start
        .strip_prefix("22:")
        .and_then(|m| m.get(..2))
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("one request's quiet hours: {read}"));
    let marketing = read["preferences"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["channel"].is_null()))
        .map(|p| p["enabled"].clone());
    assert_eq!(
        marketing,
        Some(json!(minute.is_multiple_of(2))),
        "preferences and quiet hours of the same request: {read}"
    );
    assert_eq!(
        read["preferences"].as_array().map(Vec::len),
        Some(2),
        "{read}"
    );
}

#[tokio::test]
async fn preferences_round_trip_and_security_cannot_be_opted_out_of() {
    let w = world(|_| {}).await;
    add_customers(&w.herald, vec![customer_row("ada", "en", None)]).await;

    let (status, empty) = w.herald.get("/api/v1/customers/ada/preferences").await;
    assert_eq!(status, StatusCode::OK, "{empty}");
    assert_eq!(empty["preferences"], json!([]));
    assert_eq!(empty["critical_categories"], json!(["security"]));

    let wishes = json!({
        "preferences": [
            { "category": "marketing", "enabled": false },
            { "category": "marketing", "channel": "email", "enabled": true }
        ],
        "quiet_hours": { "start": "22:00", "end": "07:30", "timezone": "Europe/Berlin" }
    });
    set_preferences(&w.herald, "ada", &wishes).await;
    let (_, read) = w.herald.get("/api/v1/customers/ada/preferences").await;
    assert_eq!(
        read["preferences"].as_array().map(Vec::len),
        Some(2),
        "{read}"
    );
    assert_eq!(read["quiet_hours"]["end"], "07:30");
    assert_eq!(read["quiet_hours"]["timezone"], "Europe/Berlin");

    let opt_out_of_security = json!({
        "preferences": [
            { "category": "marketing", "enabled": false },
            { "category": "security", "channel": "email", "enabled": false }
        ]
    });
    let (status, error) = put_preferences(&w.herald, "ada", &opt_out_of_security).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["field"], "preferences[1].enabled");
    assert_eq!(error["code"], "invalid_request");

    let bad_zone =
        json!({ "quiet_hours": { "start": "22:00", "end": "07:00", "timezone": "Mars/Base" } });
    let (status, error) = put_preferences(&w.herald, "ada", &bad_zone).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["field"], "quiet_hours.timezone");

    let (status, _) = put_preferences(&w.herald, "nobody", &wishes).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_opted_out_channel_is_skipped_and_all_out_is_skipped_with_the_reason() {
    let w = world(|_| {}).await;
    let hook = format!("{}/hooks/grace", w.hooks.uri());
    add_customers(&w.herald, vec![customer_row("grace", "en", Some(hook))]).await;
    set_preferences(
        &w.herald,
        "grace",
        &json!({ "preferences": [
            { "category": "transactional", "channel": "webhook", "enabled": false },
            { "category": "marketing", "enabled": false },
            { "category": "security", "enabled": true }
        ]}),
    )
    .await;

    // Webhook opted out: the chain moves on to email.
    let id = w
        .herald
        .send_accepted(&to_customer(
            "grace",
            "transactional",
            &["webhook", "email"],
        ))
        .await;
    let sent = w.herald.wait_status(&id, "sent").await;
    assert_eq!(sent["final_channel"], "email");
    let attempts = sent["attempts"].as_array().expect("attempts");
    assert_eq!(attempts[0]["channel"], "webhook");
    assert_eq!(attempts[0]["status"], "opted_out");
    assert_eq!(attempts[1]["status"], "sent");

    // Marketing opted out everywhere: skipped, with the reason.
    let id = w
        .herald
        .send_accepted(&to_customer("grace", "marketing", &["webhook", "email"]))
        .await;
    let skipped = w.herald.wait_status(&id, "skipped").await;
    let reason = skipped["status_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("opted_out"), "{skipped}");
    assert!(reason.contains("marketing"), "{skipped}");
    assert_eq!(skipped["attempts"].as_array().map(Vec::len), Some(2));

    // Security is critical: delivered on the first channel whatever the preferences.
    let id = w
        .herald
        .send_accepted(&to_customer("grace", "security", &["webhook", "email"]))
        .await;
    let sent = w.herald.wait_status(&id, "sent").await;
    assert_eq!(sent["final_channel"], "webhook");

    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails.len(), 1, "only the transactional one went by email");
    let hooks = w.hooks.received_requests().await.unwrap_or_default();
    assert_eq!(hooks.len(), 1, "only the security alert went by webhook");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn quiet_hours_defer_until_the_window_ends_while_critical_goes_at_once() {
    let w = world(|_| {}).await;
    add_customers(&w.herald, vec![customer_row("linus", "en", None)]).await;
    // Long enough for both sends to be accepted, the deferral recorded and the alert delivered
    // before it ends, even on a slow, busy machine: the held one waits it out.
    let end = quiet_for(&w.herald, "linus", ChronoDuration::seconds(10)).await;

    let held = w
        .herald
        .send_accepted(&to_customer("linus", "transactional", &["email"]))
        .await;
    let alert = w
        .herald
        .send_accepted(&to_customer("linus", "security", &["email"]))
        .await;
    let deferred = eventually("the deferral to be recorded", E2E_TIMEOUT, || async {
        let json = notification_json(&w.herald, &held).await;
        json["status_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("deferred: quiet hours until"))
            .then_some(json)
    })
    .await;
    assert_eq!(deferred["status"], "processing", "{deferred}");
    let sent_alert = w.herald.wait_status(&alert, "sent").await;
    let alert_at = sent_alert["sent_at"].as_str().expect("sent_at").to_string();
    assert!(
        chrono::DateTime::parse_from_rfc3339(&alert_at).expect("time") < end,
        "the security alert did not wait for the window"
    );

    let sent = sent_not_before(&w.herald, &held, end, "window ended").await;
    assert!(
        sent["status_reason"].is_null(),
        "the deferral's reason is history once sent: {sent}"
    );
    w.smtp
        .wait_for_count(2, E2E_TIMEOUT)
        .await
        .expect("both mails");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Quiet hours set without a time zone follow the customer's as it is at delivery: a customer
/// who moves keeps their night where they now live, not where they lived when they set it.
#[tokio::test]
async fn quiet_hours_without_a_zone_follow_the_customer_when_they_move() {
    let w = world(|_| {}).await;
    add_customers(&w.herald, vec![customer_row("mia", "en", None)]).await;
    // A window that started an hour ago and ends in 10 s on Kolkata's clock (UTC+5:30, no
    // daylight saving time), while the customer still lives in UTC. Long enough for the deferral
    // to be seen before the window ends, even on a slow, busy machine.
    let zone = chrono::FixedOffset::east_opt(5 * 3_600 + 1_800).expect("UTC+5:30");
    let now = Utc::now();
    let end = now + ChronoDuration::seconds(10);
    let local = |at: chrono::DateTime<Utc>| at.with_timezone(&zone).format("%H:%M:%S").to_string();
    let body = set_preferences(
        &w.herald,
        "mia",
        &json!({ "quiet_hours": {
            "start": local(now - ChronoDuration::hours(1)),
            "end": local(end),
        }}),
    )
    .await;
    assert!(
        body["quiet_hours"].get("timezone").is_none(),
        "no zone of their own is stored: {body}"
    );
    let moved = w
        .herald
        .http()
        .put(format!("{}/api/v1/customers/mia", w.herald.base()))
        .json(&json!({ "email": "mia@example.com", "timezone": "Asia/Kolkata" }))
        .send()
        .await
        .expect("PUT customer");
    assert_eq!(moved.status(), StatusCode::OK);

    let held = w
        .herald
        .send_accepted(&to_customer("mia", "transactional", &["email"]))
        .await;
    // Held until the end of the night in Kolkata, to the second (the window's end has no
    // fractions): a send that ignored the new zone would never record a deferral, whatever the
    // time it took.
    let until = format!(
        "deferred: quiet hours until {}",
        end.format("%Y-%m-%dT%H:%M:%SZ")
    );
    eventually_showing("the deferral to be recorded", E2E_TIMEOUT, || async {
        let json = notification_json(&w.herald, &held).await;
        if json["status_reason"] == until.as_str() {
            Ok(())
        } else {
            Err(format!("expected {until:?}, got {json}"))
        }
    })
    .await;
    sent_not_before(
        &w.herald,
        &held,
        end,
        "before the night in the customer's new zone ended at",
    )
    .await;
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Commands acknowledged to JetStream but not yet settled, over every dispatch consumer.
async fn commands_held_in_jetstream(w: &World) -> i64 {
    use futures::TryStreamExt;
    let js = async_nats::jetstream::new(w.nats.client().await.expect("nats client"));
    let stream = js.get_stream("NOTIFY").await.expect("stream");
    let names: Vec<String> = stream.consumer_names().try_collect().await.expect("names");
    let mut pending = 0;
    for name in names.iter().filter(|n| n.starts_with("herald-dispatch-")) {
        let info = stream.consumer_info(name).await.expect("consumer info");
        pending += info.num_ack_pending as i64;
    }
    pending
}

#[tokio::test]
async fn a_long_deferral_waits_as_a_scheduled_notification_not_in_jetstream() {
    // Small windows, so that a deferral of seconds counts as long.
    let w = world(|config| {
        config.nats.dedup_window_secs = 2;
        config.scheduler.stale_claim_secs = 1;
        config.dispatch.schedule_deferrals_after_secs = 3;
    })
    .await;
    add_customers(
        &w.herald,
        vec![
            customer_row("nina", "en", None),
            customer_row("otto", "en", None),
        ],
    )
    .await;
    let end = quiet_for(&w.herald, "nina", ChronoDuration::seconds(6)).await;
    quiet_for(&w.herald, "otto", ChronoDuration::seconds(6)).await;
    let held = w
        .herald
        .send_accepted(&to_customer("nina", "transactional", &["email"]))
        .await;
    let withdrawn = w
        .herald
        .send_accepted(&to_customer("otto", "transactional", &["email"]))
        .await;
    for id in [&held, &withdrawn] {
        let scheduled = w.herald.wait_status(id, "scheduled").await;
        let reason = scheduled["status_reason"].as_str().unwrap_or_default();
        assert!(
            reason.starts_with("deferred: quiet hours until"),
            "{scheduled}"
        );
        let due = chrono::DateTime::parse_from_rfc3339(
            scheduled["scheduled_at"].as_str().expect("scheduled_at"),
        )
        .expect("time");
        assert!(
            (due.with_timezone(&Utc) - end).num_milliseconds().abs() < 1_500,
            "due {due}, window ends {end}"
        );
    }
    eventually("the commands to be acknowledged", E2E_TIMEOUT, || async {
        (commands_held_in_jetstream(&w).await == 0).then_some(())
    })
    .await;
    // Waiting as a scheduled notification, it can be cancelled.
    let (status, body) = w
        .herald
        .post(
            &format!("/api/v1/notifications/{withdrawn}/cancel"),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled", "{body}");

    sent_not_before(&w.herald, &held, end, "window ended").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["nina@example.com".to_string()]);
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A deferred notification comes due while its first command (published by the API under the
/// notification's id) is still inside the `NOTIFY` stream's de-duplication window: another
/// instance with a longer `nats.dedup_window_secs` started last and set the stream's window (config
/// drift during a rollout). The Scheduler's release goes out under a message id of its own, so
/// JetStream stores it and the notification is sent; under the notification's id it was dropped
/// as a duplicate, confirmed nonetheless, and the notification stayed `queued` for ever.
#[tokio::test]
async fn a_deferral_due_within_the_streams_dedup_window_of_its_first_command_is_sent() {
    // This instance's window is small enough for a hold of seconds to be scheduled.
    let w = world(|config| {
        config.nats.dedup_window_secs = 2;
        config.scheduler.stale_claim_secs = 1;
        config.dispatch.schedule_deferrals_after_secs = 3;
    })
    .await;
    // Another instance, started after this one, provisioned NOTIFY with a 2-minute window.
    let js = async_nats::jetstream::new(w.nats.client().await.expect("nats client"));
    let mut notify = js.get_stream("NOTIFY").await.expect("NOTIFY");
    let mut widened = notify.info().await.expect("NOTIFY info").config.clone();
    widened.duplicate_window = Duration::from_secs(120);
    js.update_stream(&widened).await.expect("window widened");
    add_customers(&w.herald, vec![customer_row("pia", "en", None)]).await;
    let end = quiet_for(&w.herald, "pia", ChronoDuration::seconds(5)).await;
    let held = w
        .herald
        .send_accepted(&to_customer("pia", "transactional", &["email"]))
        .await;
    let scheduled = w.herald.wait_status(&held, "scheduled").await;
    assert!(
        scheduled["status_reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("deferred: quiet hours until"),
        "{scheduled}"
    );
    // Due seconds after the first command, well inside the stream's 2 minutes.
    sent_not_before(&w.herald, &held, end, "window ended").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["pia@example.com".to_string()]);
    assert_eq!(
        notify
            .info()
            .await
            .expect("NOTIFY info")
            .config
            .duplicate_window,
        Duration::from_secs(120),
        "the stream kept the other instance's window throughout"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// What the Scheduler relies on, against a real JetStream: a command published again under the
/// notification's id within the window is answered as a duplicate (`PubAck.duplicate`), a
/// release under its claim's id is stored beside the first command, the same claim published
/// again is a duplicate (the stale sweep's copy after a crash), and the next claim is new.
#[tokio::test]
async fn the_publisher_tells_a_duplicate_from_a_stored_command() {
    use herald_nats::{Stored, release_msg_id};
    let nats = NatsServer::start().await.expect("nats-server starts");
    let js = async_nats::jetstream::new(nats.client().await.expect("nats client"));
    herald_nats::provision(&js, &herald_nats::StreamSettings::default())
        .await
        .expect("streams provisioned");
    let publisher = herald_nats::Publisher::new(js.clone(), 4);
    let id = Uuid::now_v7();
    let command = herald_tests::email_command(id, "ada@example.com", "Hello.");
    let publish = |msg_id: String| {
        let (publisher, command) = (publisher.clone(), command.clone());
        async move {
            publisher
                .publish_command_as("ada", &command, &msg_id)
                .await
                .expect("acknowledged")
        }
    };
    publisher
        .publish_command("ada", &command)
        .await
        .expect("the first command");
    assert_eq!(
        publish(id.to_string()).await,
        Stored::Duplicate,
        "the first command again"
    );
    let (claim, next) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    assert_eq!(
        publish(release_msg_id(id, &claim)).await,
        Stored::New,
        "a release within the window of the first command"
    );
    assert_eq!(
        publish(release_msg_id(id, &claim)).await,
        Stored::Duplicate,
        "the same claim published again"
    );
    assert_eq!(
        publish(release_msg_id(id, &next)).await,
        Stored::New,
        "the next claim"
    );
    let mut notify = js.get_stream("NOTIFY").await.expect("NOTIFY");
    assert_eq!(
        notify.info().await.expect("NOTIFY info").state.messages,
        3,
        "stored: the first command and two releases"
    );
}

#[tokio::test]
async fn the_fourth_marketing_message_is_dropped_while_transactional_ones_pass() {
    let w = world(|_| {}).await;
    add_customers(&w.herald, vec![customer_row("mia", "en", None)]).await;
    let mut marketing = Vec::new();
    for _ in 0..4 {
        let id = w
            .herald
            .send_accepted(&to_customer("mia", "marketing", &["email"]))
            .await;
        marketing.push(id);
    }
    let mut transactional = Vec::new();
    for _ in 0..5 {
        let id = w
            .herald
            .send_accepted(&to_customer("mia", "transactional", &["email"]))
            .await;
        transactional.push(id);
    }
    for id in &transactional {
        w.herald.wait_status(id, "sent").await;
    }
    let mut outcomes = Vec::new();
    for id in &marketing {
        let done = eventually("a marketing outcome", E2E_TIMEOUT, || async {
            let json = notification_json(&w.herald, id).await;
            matches!(json["status"].as_str(), Some("sent" | "skipped")).then_some(json)
        })
        .await;
        outcomes.push(done);
    }
    let skipped: Vec<&Value> = outcomes
        .iter()
        .filter(|j| j["status"] == "skipped")
        .collect();
    assert_eq!(skipped.len(), 1, "{outcomes:?}");
    let reason = skipped[0]["status_reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("rate_limited"), "{reason}");
    w.smtp
        .wait_for_count(8, E2E_TIMEOUT)
        .await
        .expect("3 + 5 mails");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A marketing notification allowed within the limit whose first round fails for now is sent on
/// its retry, although its customer was allowed 19 other sends meanwhile and the marketing bucket
/// is empty: the retry is the same send and takes no second token. Before, the rate limiter
/// remembered only the user's last 16 grants of any category, so the retry asked as a new
/// notification and was skipped `rate_limited`.
#[tokio::test]
async fn a_retry_behind_many_other_sends_goes_out_on_the_token_it_was_allowed() {
    let w = world(|config| {
        // The first retry comes 5 to 10 s after the failed round: time for the other sends.
        config.dispatch.retry.base_delay_ms = 10_000;
        config.dispatch.retry.max_delay_ms = 10_000;
    })
    .await;
    let flaky = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&flaky)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&flaky)
        .await;
    add_customers(
        &w.herald,
        vec![customer_row("mia", "en", Some(flaky.uri()))],
    )
    .await;
    let retried = w
        .herald
        .send_accepted(&to_customer("mia", "marketing", &["webhook"]))
        .await;
    eventually("the first round to fail for now", E2E_TIMEOUT, || async {
        let json = notification_json(&w.herald, &retried).await;
        (json["attempts"].as_array().map_or(0, Vec::len) == 1).then_some(())
    })
    .await;
    let mut others = Vec::new();
    for _ in 0..2 {
        others.push(
            w.herald
                .send_accepted(&to_customer("mia", "marketing", &["email"]))
                .await,
        );
    }
    for _ in 0..17 {
        others.push(
            w.herald
                .send_accepted(&to_customer("mia", "transactional", &["email"]))
                .await,
        );
    }
    for id in &others {
        w.herald.wait_status(id, "sent").await;
    }
    let json = notification_json(&w.herald, &retried).await;
    assert_eq!(
        json["attempts"].as_array().map_or(0, Vec::len),
        1,
        "the test needs the 19 other sends allowed before the retry: {json}"
    );
    let sent = w.herald.wait_status(&retried, "sent").await;
    assert_eq!(sent["attempts"].as_array().map_or(0, Vec::len), 2, "{sent}");
    assert_eq!(flaky.received_requests().await.map_or(0, |r| r.len()), 2);
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn over_the_limit_with_policy_defer_waits_for_a_token() {
    let w = world(|config| {
        config.rate_limits.0.insert(
            "marketing".into(),
            CategoryLimit {
                capacity: 2,
                per_secs: 2,
                policy: OverLimit::Defer,
            },
        );
    })
    .await;
    add_customers(&w.herald, vec![customer_row("noor", "en", None)]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            w.herald
                .send_accepted(&to_customer("noor", "marketing", &["email"]))
                .await,
        );
    }
    let mut sent_times = Vec::new();
    for id in &ids {
        let sent = w.herald.wait_status(id, "sent").await;
        assert!(
            sent["status_reason"].is_null(),
            "the deferral's reason is history once sent: {sent}"
        );
        // A deferral is not a delivery round: the send that waited for a token is still the
        // chain's first pass, so it keeps every retry the policy allows.
        assert_eq!(
            sent["attempts"][0]["attempt_no"], 1,
            "deferrals do not use up delivery rounds: {sent}"
        );
        let at = sent["sent_at"].as_str().expect("sent_at");
        sent_times.push(chrono::DateTime::parse_from_rfc3339(at).expect("an RFC 3339 time"));
    }
    let first = sent_times.iter().min().expect("three sends");
    let last = sent_times.iter().max().expect("three sends");
    // Two tokens, refilled one a second: the third send had to wait for one.
    assert!(
        *last - *first >= ChronoDuration::milliseconds(500),
        "one had to wait for a token: sent at {sent_times:?}"
    );
    w.smtp
        .wait_for_count(3, E2E_TIMEOUT)
        .await
        .expect("3 mails");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Deliveries of commands so far (first deliveries and redeliveries), over every dispatch
/// consumer.
async fn command_deliveries(w: &World) -> u64 {
    use futures::TryStreamExt;
    let js = async_nats::jetstream::new(w.nats.client().await.expect("nats client"));
    let stream = js.get_stream("NOTIFY").await.expect("stream");
    let names: Vec<String> = stream.consumer_names().try_collect().await.expect("names");
    let mut delivered = 0;
    for name in names.iter().filter(|n| n.starts_with("herald-dispatch-")) {
        let info = stream.consumer_info(name).await.expect("consumer info");
        delivered += info.delivered.consumer_sequence;
    }
    delivered
}

/// Notifications held back by a rate limit each get a slot of their own, one token apart in the
/// order they were held: they go out in that order, each on its second delivery, instead of all
/// coming back together again and again for one token at a time.
#[tokio::test]
async fn notifications_held_by_a_rate_limit_go_out_in_order_each_held_once() {
    const HELD: usize = 6;
    let w = world(|config| {
        config.rate_limits.0.insert(
            "marketing".into(),
            CategoryLimit {
                capacity: 1,
                per_secs: 3,
                policy: OverLimit::Defer,
            },
        );
    })
    .await;
    add_customers(&w.herald, vec![customer_row("pia", "en", None)]).await;
    let message = |n: usize| {
        json!({
            "recipient": { "customer_id": "pia" },
            "category": "marketing",
            "channels": ["email"],
            "content": { "subject": format!("Message {n}"), "text": "In order, please." }
        })
    };
    let first = w.herald.send_accepted(&message(0)).await;
    w.herald.wait_status(&first, "sent").await;
    // Each send is held (the limiter has answered) before the next is made, so the order they
    // are held in is the order they were sent.
    let mut held = Vec::new();
    for n in 1..=HELD {
        let id = w.herald.send_accepted(&message(n)).await;
        eventually(
            "the send to be held by the rate limit",
            E2E_TIMEOUT,
            || async {
                let json = notification_json(&w.herald, &id).await;
                let reason = json["status_reason"].as_str().unwrap_or_default();
                reason.starts_with("deferred: rate limited").then_some(())
            },
        )
        .await;
        held.push(id);
    }
    for id in &held {
        w.herald.wait_status(id, "sent").await;
    }
    let mails = w
        .smtp
        .wait_for_count(HELD + 1, E2E_TIMEOUT)
        .await
        .expect("every mail");
    let subjects: Vec<String> = mails
        .iter()
        .map(|m| m.subject.clone().unwrap_or_default())
        .collect();
    // The first went at once; each held one was delivered twice: held, then sent on its slot.
    // (Coming back all together for one token at a time, they took 1 + 6 + 6 + 5 + … + 1 = 28.)
    let deliveries = command_deliveries(&w).await;
    assert!(
        deliveries <= (1 + 2 * HELD) as u64,
        "{deliveries} deliveries of {} commands",
        HELD + 1
    );
    let expected: Vec<String> = (0..=HELD).map(|n| format!("Message {n}")).collect();
    assert_eq!(subjects, expected, "sent in the order they were held");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_scheduled_notification_is_delivered_after_an_engine_restart_and_cancel_works() {
    let mut w = world(|_| {}).await;
    add_customers(&w.herald, vec![customer_row("olga", "en", None)]).await;
    let mut body = to_customer("olga", "transactional", &["email"]);
    body["scheduled_at"] = json!((Utc::now() + ChronoDuration::seconds(3)).to_rfc3339());
    let (status, accepted) = w.herald.send(&body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["status"], "scheduled");
    let due = accepted["id"].as_str().expect("id").to_string();

    let mut later = to_customer("olga", "transactional", &["email"]);
    later["scheduled_at"] = json!((Utc::now() + ChronoDuration::hours(1)).to_rfc3339());
    let cancelled = w.herald.send_accepted(&later).await;

    // Stop the engine before it is due, start a new one on the same database and NATS.
    let restart_config = w.config(|_| {});
    w.herald.shutdown().await.expect("clean shutdown");
    assert_eq!(w.smtp.count(), 0, "nothing went out early");
    w.herald = TestHerald::start(restart_config).await.expect("restarts");
    let json = notification_json(&w.herald, &due).await;
    assert!(
        matches!(
            json["status"].as_str(),
            Some("scheduled" | "queued" | "processing" | "sent")
        ),
        "{json}"
    );
    let sent = w.herald.wait_status(&due, "sent").await;
    assert!(sent["scheduled_at"].is_string());
    w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");

    let cancel = |id: String| {
        let herald = &w.herald;
        async move {
            herald
                .post(&format!("/api/v1/notifications/{id}/cancel"), &json!({}))
                .await
        }
    };
    let (status, view) = cancel(cancelled.clone()).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["status"], "cancelled");
    assert_eq!(view["status_reason"], "cancelled by API request");
    let (status, error) = cancel(cancelled.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{error}");
    assert_eq!(error["code"], "conflict");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cancelled")
    );
    let (status, error) = cancel(due.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("sent")
    );
    let (status, _) = cancel(Uuid::now_v7().to_string()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A cancelled one never goes out, even once due: the scheduler only takes `scheduled`.
    let mut soon = to_customer("olga", "transactional", &["email"]);
    let soon_due = Utc::now() + ChronoDuration::seconds(3);
    soon["scheduled_at"] = json!(soon_due.to_rfc3339());
    let soon = w.herald.send_accepted(&soon).await;
    let (status, view) = cancel(soon.clone()).await;
    assert_eq!(status, StatusCode::OK, "cancelled before due: {view}");
    // Waiting for a time of day, not for another part: nothing to poll.
    let past_due = (soon_due - Utc::now() + ChronoDuration::milliseconds(500))
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(past_due).await;
    let scheduler = w.herald.app().scheduler().expect("a scheduler");
    let round = scheduler
        .call(
            herald_actors::scheduler::SchedulerMsg::RunNow,
            Some(Duration::from_secs(5)),
        )
        .await;
    assert!(
        matches!(round, Ok(ractor::rpc::CallResult::Success(()))),
        "a scheduler round ran after it was due: {round:?}"
    );
    w.nats.commands_drained(E2E_TIMEOUT).await;
    assert_eq!(w.smtp.count(), 1, "only the uncancelled one went out");
    let view = notification_json(&w.herald, &soon).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A scheduled notification that cannot be read back when due (stored with a category this build
/// does not know) ends `failed`, and observers hear of it on `notify.status.failed`.
#[tokio::test]
async fn an_unreadable_scheduled_notification_fails_and_is_published() {
    let w = world(|_| {}).await;
    let id = w
        .herald
        .send_accepted(&json!({
            "recipient": { "email": "olga@example.com" },
            "category": "transactional",
            "channels": ["email"],
            "content": { "subject": "Later", "text": "An hour from now." },
            "scheduled_at": (Utc::now() + ChronoDuration::hours(1)).to_rfc3339()
        }))
        .await;
    let uuid: Uuid = id.parse().expect("a notification id");
    let changed = notification::Entity::update_many()
        .col_expr(notification::Column::Category, Expr::value("newsletter"))
        .col_expr(
            notification::Column::ScheduledAt,
            Expr::value(Utc::now() - ChronoDuration::seconds(1)),
        )
        .filter(notification::Column::Id.eq(uuid))
        .exec(w.herald.db())
        .await
        .expect("row changed");
    assert_eq!(changed.rows_affected, 1);
    let scheduler = w.herald.app().scheduler().expect("a scheduler");
    let round = scheduler
        .call(
            herald_actors::scheduler::SchedulerMsg::RunNow,
            Some(E2E_TIMEOUT),
        )
        .await;
    assert!(
        matches!(round, Ok(ractor::rpc::CallResult::Success(()))),
        "a scheduler round ran: {round:?}"
    );
    let failed = w.herald.wait_status(&id, "failed").await;
    assert!(
        failed["status_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("unreadable"),
        "{failed}"
    );
    eventually("the failed event", E2E_TIMEOUT, || async {
        (!herald_tests::status_events(&w.nats, "failed", uuid)
            .await
            .is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(w.smtp.count(), 0, "nothing sent");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_bulk_list_sends_once_per_recipient_and_reports_progress() {
    let w = world(|_| {}).await;
    let (status, accepted) = w
        .herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "recipients": [
                    { "email": "a@example.com" },
                    { "email": "b@example.com" },
                    { "email": "a@example.com" }
                ],
                "category": "account",
                "channels": ["email"],
                "content": { "subject": "Terms updated", "text": "We updated our terms." }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["total"], 2, "the repeated recipient counts once");
    let batch = accepted["batch_id"].as_str().expect("batch id").to_string();
    let progress = eventually("the batch to be sent", E2E_TIMEOUT, || async {
        let (_, json) = w.herald.get(&format!("/api/v1/batches/{batch}")).await;
        (json["status"] == "done" && json["counts"] == json!([{ "status": "sent", "count": 2 }]))
            .then_some(json)
    })
    .await;
    assert_eq!(progress["published"], 2);
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    assert_eq!(mails.len(), 2);

    let (status, error) = w
        .herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "recipients": [{ "email": "nope" }],
                "category": "account",
                "content": { "text": "x" }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["field"], "recipients[0].email");
    let (status, _) = w
        .herald
        .get(&format!("/api/v1/batches/{}", Uuid::now_v7()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A bulk filter's locale is a language tag: it selects customers whose locale is the tag or one
/// under it, whatever the case (`de` takes `de-DE`, the form customers are stored with), not a
/// tag that merely starts with the same letters; a malformed tag is refused.
#[tokio::test]
async fn a_bulk_locale_filter_selects_the_language_and_its_regions() {
    let w = world(|_| {}).await;
    let locales = [
        ("c-de", "de"),
        ("c-de-de", "de-DE"),
        ("c-de-at", "DE-at"),
        ("c-den", "den"),
        ("c-en-de", "en-DE"),
    ];
    add_customers(
        &w.herald,
        locales
            .iter()
            .map(|(id, locale)| customer_row(id, locale, None))
            .collect(),
    )
    .await;
    let bulk = |locale: &str| {
        json!({
            "filter": { "locale": locale },
            "category": "marketing",
            "channels": ["email"],
            "content": { "text": "Winter sale" }
        })
    };
    for (locale, selected) in [("de", 3), ("DE", 3), ("de-DE", 1), ("de-at", 1), ("en", 1)] {
        let (status, accepted) = w
            .herald
            .post("/api/v1/notifications/bulk", &bulk(locale))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{locale}: {accepted}");
        assert_eq!(accepted["total"], selected, "{locale}: {accepted}");
    }
    let (status, error) = w
        .herald
        .post("/api/v1/notifications/bulk", &bulk("de_DE"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["field"], "filter.locale", "{error}");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_bulk_send_to_10k_customers_delivers_10k_emails_exactly_once() {
    const CUSTOMERS: usize = 10_000;
    let w = world(|_| {}).await;
    let started = std::time::Instant::now();
    let mut rows: Vec<_> = (0..CUSTOMERS)
        .map(|i| customer_row(&format!("bulk-{i:05}"), "de", None))
        .collect();
    rows.extend((0..50).map(|i| customer_row(&format!("other-{i:02}"), "en", None)));
    add_customers(&w.herald, rows).await;
    let stored = started.elapsed();

    let (status, accepted) = w
        .herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "filter": { "locale": "de" },
                "category": "marketing",
                "channels": ["email"],
                "content": { "subject": "Winter sale", "text": "Everything 20% off." }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["total"], CUSTOMERS);
    let batch = accepted["batch_id"].as_str().expect("batch id").to_string();

    w.smtp
        .wait_for_count(CUSTOMERS, Duration::from_secs(240))
        .await
        .expect("every mail");
    let delivered = started.elapsed();
    let progress = eventually(
        "the batch to be done and sent",
        Duration::from_secs(60),
        || async {
            let (_, json) = w.herald.get(&format!("/api/v1/batches/{batch}")).await;
            (json["status"] == "done"
                && json["counts"] == json!([{ "status": "sent", "count": CUSTOMERS }]))
            .then_some(json)
        },
    )
    .await;
    assert_eq!(progress["published"], CUSTOMERS);
    // Nothing more arrives once every notification is final and no command is left to redeliver.
    w.nats.commands_drained(E2E_TIMEOUT).await;
    let mails = w.smtp.messages();
    assert_eq!(mails.len(), CUSTOMERS, "exactly once");
    let ids: HashSet<_> = mails.iter().filter_map(|m| m.message_id.clone()).collect();
    assert_eq!(ids.len(), CUSTOMERS, "no duplicate Message-IDs");
    let recipients: HashSet<_> = mails.iter().flat_map(|m| m.to.clone()).collect();
    assert_eq!(recipients.len(), CUSTOMERS, "each customer once");
    assert!(
        !recipients.contains("other-00@example.com"),
        "the filter holds"
    );
    eprintln!(
        "bulk: {CUSTOMERS} customers stored in {stored:.2?}; all delivered {:.2?} after start",
        delivered
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_bulk_filter_by_id_prefix_takes_the_prefix_literally() {
    let w = world(|_| {}).await;
    let ids = ["acme_1", "acme-2", "ACME_3", "acmex_4"];
    add_customers(
        &w.herald,
        ids.map(|id| customer_row(id, "en", None)).to_vec(),
    )
    .await;
    let bulk = |prefix: &str| {
        json!({
            "filter": { "external_id_prefix": prefix },
            "category": "account",
            "channels": ["email"],
            "content": { "subject": "Terms updated", "text": "We updated our terms." }
        })
    };
    let (status, upper) = w
        .herald
        .post("/api/v1/notifications/bulk", &bulk("ACME"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{upper}");
    assert_eq!(upper["total"], 1, "the case counts: {upper}");
    let (status, accepted) = w
        .herald
        .post("/api/v1/notifications/bulk", &bulk("acme_"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["total"], 1, "`_` is no wildcard: {accepted}");
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    let mut to: Vec<String> = mails.iter().flat_map(|m| m.to.clone()).collect();
    to.sort();
    assert_eq!(to, ["ACME_3@example.com", "acme_1@example.com"]);
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Batches stored, and notifications of bulk sends.
async fn bulk_rows(herald: &TestHerald) -> (u64, u64) {
    use sea_orm::PaginatorTrait;
    let batches = herald_entities::batch::Entity::find()
        .count(herald.db())
        .await
        .expect("batches counted");
    let notifications = notification::Entity::find()
        .filter(notification::Column::BatchId.is_not_null())
        .count(herald.db())
        .await
        .expect("notifications counted");
    (batches, notifications)
}

/// A bulk send retried with its request id (its answer lost, say) answers the batch stored first
/// with 200, by the body's `request_id` or the `Idempotency-Key` header: one batch, and each
/// recipient gets one mail.
#[tokio::test]
async fn a_repeated_bulk_request_answers_the_first_batch_and_sends_once() {
    let w = world(|_| {}).await;
    let body = json!({
        "request_id": "terms-2026-12",
        "recipients": [{ "email": "a@example.com" }, { "email": "b@example.com" }],
        "category": "account",
        "channels": ["email"],
        "content": { "subject": "Terms updated", "text": "We updated our terms." }
    });
    let (status, first) = w.herald.post("/api/v1/notifications/bulk", &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    let batch = first["batch_id"].as_str().expect("batch id").to_string();
    let (status, again) = w.herald.post("/api/v1/notifications/bulk", &body).await;
    assert_eq!(status, StatusCode::OK, "a repeat: {again}");
    assert_eq!(again["batch_id"], batch.as_str(), "{again}");
    assert_eq!(again["total"], 2, "{again}");

    let mut by_header = body.clone();
    by_header["request_id"] = Value::Null;
    let response = w
        .herald
        .http()
        .post(format!("{}/api/v1/notifications/bulk", w.herald.base()))
        .header("Idempotency-Key", "terms-2026-12")
        .json(&by_header)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::OK, "the header works too");
    let by_header: Value = response.json().await.expect("json");
    assert_eq!(by_header["batch_id"], batch.as_str(), "{by_header}");

    eventually("the batch to be sent", E2E_TIMEOUT, || async {
        let (_, json) = w.herald.get(&format!("/api/v1/batches/{batch}")).await;
        (json["status"] == "done" && json["counts"] == json!([{ "status": "sent", "count": 2 }]))
            .then_some(json)
    })
    .await;
    // Asked once the batch is done: any other batch would have been stored before the answers.
    assert_eq!(
        bulk_rows(&w.herald).await,
        (1, 2),
        "one batch, one notification each"
    );
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    let mut to: Vec<String> = mails.iter().flat_map(|m| m.to.clone()).collect();
    to.sort();
    assert_eq!(to, ["a@example.com", "b@example.com"], "one mail each");

    let mut blank = body.clone();
    blank["request_id"] = json!("  ");
    let (status, error) = w.herald.post("/api/v1/notifications/bulk", &blank).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["field"], "request_id", "{error}");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Identical bulk requests arriving together store one batch: one is accepted (202), every
/// other answers it (200).
#[tokio::test]
async fn concurrent_identical_bulk_requests_store_one_batch() {
    const REQUESTS: usize = 4;
    let w = world(|_| {}).await;
    let body = json!({
        "request_id": "winter-sale",
        "recipients": [{ "email": "a@example.com" }, { "email": "b@example.com" }],
        "category": "marketing",
        "channels": ["email"],
        "content": { "subject": "Winter sale", "text": "Everything 20% off." }
    });
    let answers = futures::future::join_all(
        (0..REQUESTS).map(|_| w.herald.post("/api/v1/notifications/bulk", &body)),
    )
    .await;
    let accepted = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::ACCEPTED)
        .count();
    assert_eq!(accepted, 1, "one accepted: {answers:?}");
    let repeated = answers
        .iter()
        .filter(|(status, _)| *status == StatusCode::OK)
        .count();
    assert_eq!(
        repeated,
        REQUESTS - 1,
        "the others answered it: {answers:?}"
    );
    let ids: HashSet<&str> = answers
        .iter()
        .filter_map(|(_, json)| json["batch_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 1, "one batch id: {answers:?}");
    let batch = ids.into_iter().next().expect("a batch id").to_string();
    eventually("the batch to be sent", E2E_TIMEOUT, || async {
        let (_, json) = w.herald.get(&format!("/api/v1/batches/{batch}")).await;
        (json["status"] == "done" && json["counts"] == json!([{ "status": "sent", "count": 2 }]))
            .then_some(json)
    })
    .await;
    assert_eq!(
        bulk_rows(&w.herald).await,
        (1, 2),
        "one batch, one notification each"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A blank filter condition (a client's variable that came out empty) is refused naming it, not
/// left out to widen the audience; so is a filter with no condition, unless it says
/// `all_customers: true`, which selects everyone.
#[tokio::test]
async fn a_blank_or_empty_bulk_filter_is_refused_and_everyone_must_be_asked_for() {
    let w = world(|_| {}).await;
    add_customers(
        &w.herald,
        vec![
            customer_row("c-1", "de", None),
            customer_row("c-2", "en", None),
        ],
    )
    .await;
    let bulk = |filter: Value| {
        json!({
            "filter": filter,
            "category": "account",
            "channels": ["email"],
            "content": { "subject": "Terms updated", "text": "We updated our terms." }
        })
    };
    for (filter, field) in [
        (json!({ "locale": "" }), "filter.locale"),
        (json!({ "locale": " " }), "filter.locale"),
        (
            json!({ "external_id_prefix": "  " }),
            "filter.external_id_prefix",
        ),
        (
            json!({ "locale": "de", "external_id_prefix": "" }),
            "filter.external_id_prefix",
        ),
        (
            json!({ "all_customers": true, "locale": "" }),
            "filter.locale",
        ),
        (json!({}), "filter"),
        (json!({ "all_customers": false }), "filter"),
        (
            json!({ "all_customers": true, "locale": "de" }),
            "filter.all_customers",
        ),
    ] {
        let (status, error) = w
            .herald
            .post("/api/v1/notifications/bulk", &bulk(filter.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{filter}: {error}");
        assert_eq!(error["field"], field, "{filter}: {error}");
    }
    assert_eq!(bulk_rows(&w.herald).await, (0, 0), "nothing stored");

    let (status, accepted) = w
        .herald
        .post(
            "/api/v1/notifications/bulk",
            &bulk(json!({ "all_customers": true })),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["total"], 2, "{accepted}");
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    let mut to: Vec<String> = mails.iter().flat_map(|m| m.to.clone()).collect();
    to.sort();
    assert_eq!(to, ["c-1@example.com", "c-2@example.com"]);
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A bulk page that keeps failing (every publish refused at once: the command stream is full) is
/// tried ever less often, 1 s, then 2 s, 4 s … after each failure, not every round (100 ms here),
/// and the batch goes on once the stream takes commands again.
#[tokio::test]
async fn a_bulk_page_that_keeps_failing_is_tried_ever_less_often() {
    use async_nats::jetstream::stream::DiscardPolicy;
    use futures::StreamExt;
    /// How long the retries are watched after the first try: a try at once, then 1 s and 2 s
    /// later (and the next 4 s after that, beyond the window).
    const WATCH: Duration = Duration::from_secs(6);
    let w = world(|config| config.scheduler.bulk_lease_secs = 3_600).await;
    let client = w.nats.client().await.expect("NATS client");
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js
        .get_stream(herald_nats::subjects::NOTIFY_STREAM)
        .await
        .expect("command stream");
    let config = stream.info().await.expect("stream info").config.clone();
    // A stream whose every message would exceed its bytes, and that discards new ones, refuses
    // each publish at once ("maximum bytes exceeded").
    js.update_stream(async_nats::jetstream::stream::Config {
        max_bytes: 1,
        discard: DiscardPolicy::New,
        ..config.clone()
    })
    .await
    .expect("stream full");
    // Each try's publish, seen as it goes to the stream.
    let mut tries = client.subscribe("notify.cmd.>").await.expect("subscribed");
    let (status, accepted) = w
        .herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "recipients": [{ "email": "a@example.com" }],
                "category": "account",
                "channels": ["email"],
                "content": { "subject": "Terms updated", "text": "We updated our terms." }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    tokio::time::timeout(E2E_TIMEOUT, tries.next())
        .await
        .expect("a first try in time")
        .expect("subscribed");
    let first = std::time::Instant::now();
    let mut retries = Vec::new();
    while let Ok(Some(_)) = tokio::time::timeout_at((first + WATCH).into(), tries.next()).await {
        retries.push(first.elapsed());
    }
    assert!(
        (1..=3).contains(&retries.len()),
        "within {WATCH:?} after the first try, tries at {retries:?}: \
         expected one after about 1 s and one after about 3 s"
    );
    let gaps: Vec<Duration> = std::iter::once(Duration::ZERO)
        .chain(retries.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .collect();
    assert!(
        gaps.iter().all(|gap| *gap >= Duration::from_millis(900)),
        "tries at least a second apart: {retries:?} after the first"
    );
    assert!(
        gaps.windows(2).all(|pair| pair[1] > pair[0]),
        "each rest longer than the one before: {gaps:?}"
    );
    js.update_stream(config).await.expect("stream restored");
    let batch = accepted["batch_id"].as_str().expect("batch id").to_string();
    eventually("the batch to be sent", E2E_TIMEOUT, || async {
        let (_, json) = w.herald.get(&format!("/api/v1/batches/{batch}")).await;
        (json["status"] == "done" && json["published"] == 1).then_some(())
    })
    .await;
    w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A bulk batch whose pages keep failing (the command stream full) says so while it stays
/// `running`: its `error` gives the failures in a row and the last one's reason, and is cleared
/// once a page goes through.
#[tokio::test]
async fn a_bulk_batch_whose_pages_keep_failing_shows_the_last_error_until_one_goes_through() {
    use async_nats::jetstream::stream::DiscardPolicy;
    let w = world(|config| config.scheduler.bulk_lease_secs = 3_600).await;
    let js = async_nats::jetstream::new(w.nats.client().await.expect("NATS client"));
    let mut stream = js
        .get_stream(herald_nats::subjects::NOTIFY_STREAM)
        .await
        .expect("command stream");
    let config = stream.info().await.expect("stream info").config.clone();
    // Refuses each publish at once (see `a_bulk_page_that_keeps_failing_is_tried_ever_less_often`).
    js.update_stream(async_nats::jetstream::stream::Config {
        max_bytes: 1,
        discard: DiscardPolicy::New,
        ..config.clone()
    })
    .await
    .expect("stream full");
    let (status, accepted) = w
        .herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "recipients": [{ "email": "a@example.com" }],
                "category": "account",
                "channels": ["email"],
                "content": { "subject": "Terms updated", "text": "We updated our terms." }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let batch = accepted["batch_id"].as_str().expect("batch id").to_string();
    // The second failure comes about a second after the first.
    let failing = eventually("the batch to show its failures", E2E_TIMEOUT, || async {
        let (_, json) = w.herald.get(&format!("/api/v1/batches/{batch}")).await;
        json["error"]
            .as_str()
            .is_some_and(|error| error.starts_with("2 failed pages in a row"))
            .then_some(json)
    })
    .await;
    assert_eq!(failing["status"], "running", "{failing}");
    assert_eq!(failing["published"], 0, "{failing}");
    let error = failing["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not published") && error.contains("maximum bytes"),
        "the last failure and its reason: {error}"
    );
    js.update_stream(config).await.expect("stream restored");
    let done = eventually("the batch to be sent", E2E_TIMEOUT, || async {
        let (_, json) = w.herald.get(&format!("/api/v1/batches/{batch}")).await;
        (json["status"] == "done").then_some(json)
    })
    .await;
    assert_eq!(done["published"], 1, "{done}");
    assert!(done.get("error").is_none(), "the error cleared: {done}");
    w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A filter bulk send goes to the customers matching when it was accepted (its `total`), not to
/// one created after: the fan-out, here only after that customer is stored, leaves it out.
#[tokio::test]
async fn a_bulk_filter_leaves_out_customers_created_after_it_was_accepted() {
    use herald_actors::scheduler::SchedulerMsg;
    // No round but those asked for, after the first.
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    let scheduler = w.herald.app().scheduler().expect("scheduler running");
    // The first round is over: none runs until asked.
    scheduler
        .call(SchedulerMsg::RunNow, Some(E2E_TIMEOUT))
        .await
        .expect("a round run");
    add_customers(&w.herald, vec![customer_row("c-before", "de", None)]).await;
    let (status, accepted) = w
        .herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "filter": { "locale": "de" },
                "category": "marketing",
                "channels": ["email"],
                "content": { "subject": "Winter sale", "text": "Everything 20% off." }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["total"], 1, "{accepted}");
    let batch = accepted["batch_id"].as_str().expect("batch id").to_string();
    add_customers(&w.herald, vec![customer_row("c-after", "de", None)]).await;
    scheduler
        .call(SchedulerMsg::RunNow, Some(E2E_TIMEOUT))
        .await
        .expect("a round run");
    let done = eventually("the batch to be fanned out", E2E_TIMEOUT, || async {
        let (_, json) = w.herald.get(&format!("/api/v1/batches/{batch}")).await;
        (json["status"] == "done").then_some(json)
    })
    .await;
    assert_eq!(
        done["published"], 1,
        "only the customer there when accepted: {done}"
    );
    w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    w.nats.commands_drained(E2E_TIMEOUT).await;
    let to: Vec<String> = w
        .smtp
        .messages()
        .iter()
        .flat_map(|m| m.to.clone())
        .collect();
    assert_eq!(to, ["c-before@example.com"]);
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A bulk page whose publish fails gives up the rest of its lease (resting a second instead): the
/// batch goes on as soon as NATS is back, not once the lease (an hour here) has run out.
#[tokio::test]
async fn a_bulk_page_that_failed_to_publish_goes_on_without_waiting_for_its_lease() {
    use herald_entities::repo::batches;
    let w = world(|config| config.scheduler.bulk_lease_secs = 3_600).await;
    // Publishes wait for JetStream's acknowledgement and fail when it does not come.
    w.nats.freeze().expect("SIGSTOP");
    let (status, accepted) = w
        .herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "recipients": [{ "email": "a@example.com" }, { "email": "b@example.com" }],
                "category": "account",
                "channels": ["email"],
                "content": { "subject": "Terms updated", "text": "We updated our terms." }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let batch: Uuid = accepted["batch_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("batch id");
    let db = w.herald.db();
    let lease = || async move {
        batches::find(db, batch)
            .await
            .expect("batch read")
            .expect("batch stored")
            .lease_until
    };
    let first = eventually("the batch to be leased", E2E_TIMEOUT, || async {
        lease().await
    })
    .await;
    eventually(
        "the failed page to give its lease back",
        E2E_TIMEOUT,
        || async { (lease().await != Some(first)).then_some(()) },
    )
    .await;
    w.nats.resume().expect("SIGCONT");
    eventually("the batch to be sent", E2E_TIMEOUT, || async {
        let (_, json) = w.herald.get(&format!("/api/v1/batches/{batch}")).await;
        (json["status"] == "done" && json["published"] == 2).then_some(())
    })
    .await;
    w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// `RunNow` answers once a round that started after it is done: asked while a round is running
/// (here held up publishing), it waits for the next round, which sees what changed meanwhile.
#[tokio::test]
async fn run_now_during_a_round_waits_for_a_round_that_starts_after_it() {
    use herald_actors::scheduler::SchedulerMsg;
    use herald_entities::repo::{notifications, schedule::CLAIM_PREFIX};
    // No round but those asked for, after the first.
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    let scheduler = w.herald.app().scheduler().expect("scheduler running");
    let due = |text: &str| {
        let mut row = herald_tests::queued_notification(None);
        row.status = NotificationStatus::Scheduled;
        row.scheduled_at = Some(Utc::now() - ChronoDuration::seconds(1));
        row.content = json!({ "text": text });
        row
    };
    let db = w.herald.db();
    let stored = move |id: Uuid| async move {
        notification::Entity::find_by_id(id)
            .one(db)
            .await
            .expect("read")
            .expect("stored")
    };
    let first = due("first");
    let first_id = first.id;
    notifications::insert_many(w.herald.db(), vec![first])
        .await
        .expect("first stored");
    // The round that takes the first one waits on its publish until NATS runs again.
    w.nats.freeze().expect("SIGSTOP");
    let running = tokio::spawn({
        let scheduler = scheduler.clone();
        async move {
            scheduler
                .call(SchedulerMsg::RunNow, Some(E2E_TIMEOUT))
                .await
        }
    });
    eventually("a round to claim the first one", E2E_TIMEOUT, || async {
        let row = stored(first_id).await;
        row.status_reason
            .is_some_and(|reason| reason.starts_with(CLAIM_PREFIX))
            .then_some(())
    })
    .await;
    let second = due("second");
    let second_id = second.id;
    notifications::insert_many(w.herald.db(), vec![second])
        .await
        .expect("second stored");
    let (reply, answered) = ractor::concurrency::oneshot();
    scheduler
        .cast(SchedulerMsg::RunNow(reply.into()))
        .expect("asked");
    w.nats.resume().expect("SIGCONT");
    tokio::time::timeout(E2E_TIMEOUT, answered)
        .await
        .expect("RunNow answered in time")
        .expect("RunNow answered");
    assert_ne!(
        stored(second_id).await.status,
        NotificationStatus::Scheduled,
        "the round RunNow waited for saw the notification stored before it was asked"
    );
    let first_answer = running
        .await
        .expect("first RunNow task")
        .expect("scheduler asked");
    assert!(
        matches!(first_answer, ractor::rpc::CallResult::Success(())),
        "the first RunNow answered"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Due notifications beyond `claim_limit` (many quiet-hours deferrals ending in the same second)
/// go out chunk after chunk in one go, not one chunk per `poll_interval_ms` (an hour here: no round
/// but the one asked for follows the first).
#[tokio::test]
async fn due_notifications_beyond_the_claim_limit_go_out_without_waiting_for_the_next_poll() {
    use herald_actors::scheduler::SchedulerMsg;
    use herald_entities::repo::notifications;
    const CLAIM_LIMIT: u64 = 2;
    const DUE: usize = 7;
    let w = world(|config| {
        config.scheduler.poll_interval_ms = 3_600_000;
        config.scheduler.claim_limit = CLAIM_LIMIT;
    })
    .await;
    let scheduler = w.herald.app().scheduler().expect("scheduler running");
    let due_at = Utc::now() - ChronoDuration::seconds(1);
    let rows: Vec<_> = (0..DUE)
        .map(|n| {
            let mut row = herald_tests::queued_notification(None);
            row.status = NotificationStatus::Scheduled;
            row.scheduled_at = Some(due_at);
            row.content = json!({ "text": format!("reminder {n}") });
            row
        })
        .collect();
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    notifications::insert_many(w.herald.db(), rows)
        .await
        .expect("due notifications stored");
    let answer = scheduler
        .call(SchedulerMsg::RunNow, Some(E2E_TIMEOUT))
        .await
        .expect("scheduler asked");
    assert!(
        matches!(answer, ractor::rpc::CallResult::Success(())),
        "RunNow answered"
    );
    let left = notification::Entity::find()
        .filter(notification::Column::Id.is_in(ids))
        .filter(notification::Column::Status.eq(NotificationStatus::Scheduled))
        .all(w.herald.db())
        .await
        .expect("read")
        .len();
    assert_eq!(
        left, 0,
        "{DUE} due with claim_limit {CLAIM_LIMIT}: one round released them all, chunk after chunk"
    );
    w.smtp
        .wait_for_count(DUE, E2E_TIMEOUT)
        .await
        .expect("mails");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn retention_removes_old_final_notifications_and_keeps_recent_ones() {
    let w = world(|config| {
        config.scheduler.retention_days = 7;
        config.scheduler.retention_interval_secs = 1;
    })
    .await;
    let recent = w
        .herald
        .send_accepted(&json!({
            "recipient": { "email": "ada@example.com" },
            "category": "transactional",
            "channels": ["email"],
            "content": { "text": "recent" }
        }))
        .await;
    w.herald.wait_status(&recent, "sent").await;
    let long_ago = Utc::now() - ChronoDuration::days(10);
    // Old but not final: retention leaves them (the scheduled one is due in the future, so the
    // Scheduler leaves it too; the others carry no publish mark to be republished).
    let mut unfinished = Vec::new();
    for status in [
        NotificationStatus::Scheduled,
        NotificationStatus::Queued,
        NotificationStatus::Processing,
    ] {
        let mut row = herald_tests::queued_notification(None);
        row.status = status;
        row.created_at = long_ago;
        if status == NotificationStatus::Scheduled {
            row.scheduled_at = Some(Utc::now() + ChronoDuration::days(30));
        }
        unfinished.push((row.id, status));
        herald_entities::repo::notifications::insert_many(w.herald.db(), vec![row])
            .await
            .expect("old unfinished row");
    }
    let old = Uuid::now_v7();
    notification::Entity::insert(notification::ActiveModel {
        id: Set(old),
        request_id: Set(None),
        request_fingerprint: Set(None),
        customer_id: Set(None),
        recipient_key: Set("old@example.com".into()),
        contacts: Set(json!({ "email": "old@example.com" })),
        category: Set("transactional".into()),
        channels: Set(json!(["email"])),
        content: Set(json!({ "text": "old" })),
        status: Set(NotificationStatus::Sent),
        status_reason: Set(None),
        scheduled_at: Set(None),
        final_channel: Set(Some("email".into())),
        attempts: Set(1),
        error: Set(None),
        created_at: Set(long_ago),
        updated_at: Set(long_ago),
        sent_at: Set(Some(long_ago)),
        batch_id: Set(None),
    })
    .exec_without_returning(w.herald.db())
    .await
    .expect("old row");
    eventually(
        "the old notification to be removed",
        E2E_TIMEOUT,
        || async {
            let (status, _) = w.herald.get(&format!("/api/v1/notifications/{old}")).await;
            (status == StatusCode::NOT_FOUND).then_some(())
        },
    )
    .await;
    let (status, _) = w
        .herald
        .get(&format!("/api/v1/notifications/{recent}"))
        .await;
    assert_eq!(status, StatusCode::OK, "recent ones stay");
    for (id, status) in unfinished {
        let row = notification::Entity::find_by_id(id)
            .one(w.herald.db())
            .await
            .expect("read");
        assert_eq!(
            row.map(|row| row.status),
            Some(status),
            "an old {status:?} notification stays"
        );
    }
    w.herald.shutdown().await.expect("clean shutdown");
}

/// One retention run deletes every old final notification however many there are, batch after
/// batch (it used to stop after 100 batches, so retention fell behind for ever above 100 batches
/// an hour), and leaves the recent and the unfinished ones.
#[tokio::test]
async fn a_retention_run_removes_every_old_final_notification() {
    const OLD: usize = 2_500;
    const BATCH: u64 = 20;
    let database = TestDatabase::from_env().await.expect("database");
    let db = herald_tests::migrated(database.url())
        .await
        .expect("migrated");
    let long_ago = Utc::now() - ChronoDuration::days(10);
    let row = |status: NotificationStatus, created_at| {
        let mut row = herald_tests::queued_notification(None);
        row.status = status;
        row.created_at = created_at;
        row
    };
    let mut rows: Vec<_> = (0..OLD)
        .map(|_| row(NotificationStatus::Sent, long_ago))
        .collect();
    let kept: Vec<_> = [
        row(NotificationStatus::Sent, Utc::now()),
        row(NotificationStatus::Queued, long_ago),
        row(NotificationStatus::Processing, long_ago),
    ]
    .into_iter()
    .collect();
    let kept_ids: HashSet<Uuid> = kept.iter().map(|row| row.id).collect();
    rows.extend(kept);
    herald_entities::repo::notifications::insert_many(&db, rows)
        .await
        .expect("rows stored");

    let cutoff = Utc::now() - ChronoDuration::days(7);
    let stop = tokio_util::sync::CancellationToken::new();
    let removed = herald_actors::scheduler::purge(&db, cutoff, BATCH, &stop)
        .await
        .expect("retention ran");
    assert_eq!(removed, OLD as u64, "every old final notification went");
    let left: HashSet<Uuid> = notification::Entity::find()
        .all(&db)
        .await
        .expect("read")
        .into_iter()
        .map(|row| row.id)
        .collect();
    assert_eq!(left, kept_ids, "the recent and the unfinished ones stay");
}

/// With retention off (`retention_days` 0), the clean-up still runs every
/// `retention_interval_secs` and removes a held receipt that no send will apply (its notification
/// cancelled), keeping every notification.
#[tokio::test]
async fn the_clean_up_removes_stranded_held_receipts_with_retention_off() {
    use herald_entities::held_receipt;
    use sea_orm::PaginatorTrait;
    let w = world(|config| {
        config.scheduler.retention_days = 0;
        config.scheduler.retention_interval_secs = 1;
    })
    .await;
    let mut row = herald_tests::queued_notification(None);
    row.status = NotificationStatus::Cancelled;
    row.created_at = Utc::now() - ChronoDuration::days(400);
    let id = row.id;
    herald_entities::repo::notifications::insert_many(w.herald.db(), vec![row])
        .await
        .expect("cancelled row");
    let now = Utc::now();
    held_receipt::Entity::insert(held_receipt::ActiveModel {
        notification_id: Set(id),
        provider: Set("smtp".into()),
        status: Set(NotificationStatus::Delivered),
        reason: Set("delivery confirmed".into()),
        error: Set(None),
        at: Set(now),
        received_at: Set(now),
    })
    .exec_without_returning(w.herald.db())
    .await
    .expect("held receipt stored");

    eventually(
        "the clean-up to remove the stranded held receipt",
        E2E_TIMEOUT,
        || async {
            let held = held_receipt::Entity::find()
                .filter(held_receipt::Column::NotificationId.eq(id))
                .count(w.herald.db())
                .await
                .expect("held receipts read");
            (held == 0).then_some(())
        },
    )
    .await;
    let kept = notification::Entity::find_by_id(id)
        .one(w.herald.db())
        .await
        .expect("read");
    assert!(
        kept.is_some(),
        "retention off: the old cancelled notification stays"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Retention runs beside the rounds: while a clean-up is held up (on PostgreSQL, by a lock on a
/// row it must delete), a due scheduled notification still goes out. SQLite has one writer, so a
/// held lock would hold up everything there.
#[tokio::test]
async fn due_notifications_go_out_while_retention_is_held_up() {
    use herald_actors::scheduler::SchedulerMsg;
    use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
    let w = world(|config| {
        config.scheduler.retention_days = 7;
        config.scheduler.retention_interval_secs = 1;
    })
    .await;
    if w.db.kind() != DatabaseKind::Postgres {
        eprintln!(
            "skipped on {:?}: a held lock there holds up every writer",
            w.db.kind()
        );
        w.herald.shutdown().await.expect("clean shutdown");
        return;
    }
    // Old enough for retention only some seconds after it is stored: a clean-up (one a second)
    // that ran between the insert and the lock would have deleted it, and none would wait.
    let mut old = herald_tests::queued_notification(None);
    old.status = NotificationStatus::Sent;
    old.created_at = Utc::now() - ChronoDuration::days(7) + ChronoDuration::seconds(5);
    let old_id = old.id;
    herald_entities::repo::notifications::insert_many(w.herald.db(), vec![old])
        .await
        .expect("old row");
    let holder = herald_entities::connect(w.db.url(), 1)
        .await
        .expect("connection");
    let lock = holder.begin().await.expect("transaction");
    let locked = lock
        .query_all_raw(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!("SELECT id FROM notifications WHERE id = '{old_id}' FOR UPDATE"),
        ))
        .await
        .expect("row locked");
    assert_eq!(
        locked.len(),
        1,
        "the row was locked before it was old enough to remove"
    );
    eventually("a clean-up to wait for the lock", E2E_TIMEOUT, || async {
        let waiting = w
            .herald
            .db()
            .query_all_raw(Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT pid FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE 'DELETE FROM \"notifications\"%'",
            ))
            .await
            .expect("activity read");
        (!waiting.is_empty()).then_some(())
    })
    .await;

    let mut due = herald_tests::queued_notification(None);
    due.status = NotificationStatus::Scheduled;
    due.scheduled_at = Some(Utc::now() - ChronoDuration::seconds(1));
    let due_id = due.id;
    herald_entities::repo::notifications::insert_many(w.herald.db(), vec![due])
        .await
        .expect("due row");
    let scheduler = w.herald.app().scheduler().expect("scheduler running");
    let ran = scheduler
        .call(SchedulerMsg::RunNow, Some(Duration::from_secs(10)))
        .await
        .expect("scheduler asked");
    assert!(
        matches!(ran, ractor::rpc::CallResult::Success(())),
        "a round ran while retention waits"
    );
    let row = notification::Entity::find_by_id(due_id)
        .one(w.herald.db())
        .await
        .expect("read")
        .expect("stored");
    assert_ne!(row.status, NotificationStatus::Scheduled, "released");

    lock.rollback().await.expect("lock released");
    eventually("the old one to be removed", E2E_TIMEOUT, || async {
        notification::Entity::find_by_id(old_id)
            .one(w.herald.db())
            .await
            .expect("read")
            .is_none()
            .then_some(())
    })
    .await;
    w.herald.shutdown().await.expect("clean shutdown");
}

/// The dispatcher reads recipients in batches: each customer of a batch gets their own row,
/// preferences and quiet hours, and an id with nothing stored gets an empty answer.
#[tokio::test]
async fn recipients_read_together_keep_their_own_wishes() {
    use herald_entities::repo::{customers, preferences};
    let db = TestDatabase::from_env().await.expect("database");
    let conn = herald_tests::migrated(db.url()).await.expect("migrated");
    for id in ["ada", "cyd"] {
        customer::Entity::insert(customer_row(id, "de", None))
            .exec_without_returning(&conn)
            .await
            .expect("customer stored");
    }
    let opt_out = |category: &str| preferences::NewPreference {
        category: category.into(),
        channel: "email".into(),
        enabled: false,
    };
    let night = preferences::NewQuietHours {
        starts: "22:00".into(),
        ends: "07:00".into(),
        timezone: Some("Europe/Berlin".into()),
    };
    preferences::replace(&conn, "ada", vec![opt_out("marketing")], Some(night))
        .await
        .expect("ada's wishes stored");
    // Wishes may be stored for an id no customer row has.
    preferences::replace(
        &conn,
        "bob",
        vec![opt_out("transactional"), opt_out("marketing")],
        None,
    )
    .await
    .expect("bob's wishes stored");

    let ids: Vec<String> = ["ada", "bob", "cyd", "dan"].map(String::from).into();
    let found = customers::find_many_by_external_id(&conn, &ids)
        .await
        .expect("customers read");
    let mut found_ids: Vec<&str> = found.keys().map(String::as_str).collect();
    found_ids.sort_unstable();
    assert_eq!(found_ids, ["ada", "cyd"]);
    assert_eq!(found["cyd"].external_id, "cyd");

    let wishes = preferences::load_many(&conn, &ids)
        .await
        .expect("wishes read");
    assert_eq!(wishes.len(), 4, "every id asked for has an answer");
    assert_eq!(wishes["ada"].preferences.len(), 1);
    assert_eq!(
        wishes["ada"]
            .quiet_hours
            .as_ref()
            .and_then(|q| q.timezone.as_deref()),
        Some("Europe/Berlin")
    );
    assert_eq!(wishes["bob"].preferences.len(), 2);
    assert!(wishes["bob"].quiet_hours.is_none());
    assert_eq!(wishes["dan"], Default::default());

    // The dispatcher's lookup joins the two reads per id.
    let lookup = herald_actors::lookup::recipients(conn.clone());
    let (ada, bob, dan) = tokio::join!(
        lookup.get("ada".into()),
        lookup.get("bob".into()),
        lookup.get("dan".into())
    );
    let ada = ada.expect("read").expect("every id has an answer");
    assert_eq!(ada.customer.map(|c| c.locale), Some("de".to_string()));
    assert_eq!(ada.wishes.preferences.len(), 1);
    assert!(ada.wishes.quiet_hours.is_some());
    let bob = bob.expect("read").expect("every id has an answer");
    assert!(bob.customer.is_none());
    assert_eq!(
        bob.wishes.preferences.len(),
        2,
        "wishes without a customer row are kept"
    );
    assert_eq!(dan, Ok(Some(Default::default())));
}

/// Rate limiters that start together read their users' send histories in one query: each user
/// gets their own sends, per category, counted within that category's window only.
#[tokio::test]
async fn send_histories_read_together_count_each_users_own_recent_sends() {
    use herald_actors::rate_limit::{DbSendHistory, SendHistory};
    use herald_entities::repo::{notifications, status_batch};
    use herald_nats::Category::{Marketing, Transactional};
    let db = TestDatabase::from_env().await.expect("database");
    let conn = herald_tests::migrated(db.url()).await.expect("migrated");
    let now = Utc::now();
    let sends = [
        ("ada", "marketing", ChronoDuration::hours(1)),
        ("ada", "marketing", ChronoDuration::hours(2)),
        ("ada", "marketing", ChronoDuration::days(2)),
        ("ada", "transactional", ChronoDuration::seconds(10)),
        ("bob", "transactional", ChronoDuration::minutes(2)),
        ("bob", "marketing", ChronoDuration::minutes(5)),
    ];
    for (user, category, ago) in sends {
        let mut row = herald_tests::queued_notification(None);
        row.recipient_key = user.into();
        row.category = category.into();
        let id = row.id;
        notifications::insert_many(&conn, vec![row])
            .await
            .expect("stored");
        let mut sent = status_batch::StatusChange::to(id, NotificationStatus::Sent);
        sent.at = now - ago;
        status_batch::apply(&conn, &[sent], &[])
            .await
            .expect("sent");
    }

    let history = DbSendHistory::new(conn.clone());
    let windows = [
        (Marketing, Duration::from_secs(86_400)),
        (Transactional, Duration::from_secs(60)),
    ];
    let (ada, bob, cyd) = tokio::join!(
        history.sent_within("ada", &windows),
        history.sent_within("bob", &windows),
        history.sent_within("cyd", &windows)
    );
    let ada = ada.expect("ada's history read");
    assert_eq!(
        (ada.get(&Marketing), ada.get(&Transactional)),
        (Some(&2), Some(&1)),
        "ada: two marketing sends within a day (not the one two days ago), one transactional \
         within a minute"
    );
    let bob = bob.expect("bob's history read");
    assert_eq!(
        (bob.get(&Marketing), bob.get(&Transactional)),
        (Some(&1), None),
        "bob: his own marketing send, no transactional one within a minute"
    );
    assert!(
        cyd.expect("cyd's history read").is_empty(),
        "cyd sent nothing"
    );
}

/// The dispatcher claims a notification (marks it `processing`) before it walks the chain, so a
/// cancel that comes while the provider is being called is refused instead of answering
/// `cancelled` for a message that goes out. The StatusWriter's batches here come only every 2 s:
/// a pick-up recorded in them would still read `queued` when the cancel arrives.
#[tokio::test]
async fn a_cancel_while_the_provider_is_called_is_refused_and_the_message_goes_out() {
    let w = world(|config| {
        config.status_writer.flush_interval_ms = 2_000;
        if let Some(webhook) = config.channels.webhook.as_mut() {
            webhook.timeout_ms = 20_000;
        }
    })
    .await;
    let slow_hooks = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(3)))
        .mount(&slow_hooks)
        .await;
    let hook = format!("{}/hooks/hana", slow_hooks.uri());
    add_customers(&w.herald, vec![customer_row("hana", "en", Some(hook))]).await;
    let id = w
        .herald
        .send_accepted(&to_customer("hana", "transactional", &["webhook"]))
        .await;

    eventually("the webhook to be called", E2E_TIMEOUT, || async {
        let received = slow_hooks.received_requests().await.unwrap_or_default();
        (!received.is_empty()).then_some(())
    })
    .await;
    let (status, error) = w
        .herald
        .post(&format!("/api/v1/notifications/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap_or_default()
            .contains("processing"),
        "{error}"
    );

    let sent = w.herald.wait_status(&id, "sent").await;
    assert_eq!(sent["final_channel"], "webhook", "{sent}");
    let calls = slow_hooks.received_requests().await.unwrap_or_default();
    assert_eq!(calls.len(), 1, "sent once");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Stores notifications of `batch` in the given statuses (a `scheduled` one due in an hour),
/// as its fan-out and dispatchers would have left them; answers their ids, in order.
async fn batch_notifications(
    db: &sea_orm::DatabaseConnection,
    batch: Uuid,
    statuses: &[NotificationStatus],
) -> Vec<Uuid> {
    use herald_entities::repo::notifications;
    let rows: Vec<_> = statuses
        .iter()
        .enumerate()
        .map(|(n, status)| notifications::NewNotification {
            recipient_key: format!("held-{n}@example.com"),
            status: *status,
            scheduled_at: (*status == NotificationStatus::Scheduled)
                .then(|| Utc::now() + ChronoDuration::hours(1)),
            ..herald_tests::queued_notification(None)
        })
        .collect();
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    notifications::insert_many(db, rows)
        .await
        .expect("notifications stored");
    notification::Entity::update_many()
        .col_expr(notification::Column::BatchId, Expr::value(batch))
        .filter(notification::Column::Id.is_in(ids.clone()))
        .exec(db)
        .await
        .expect("notifications of the batch");
    ids
}

/// A marketer who sent a campaign to the wrong audience cancels it while it fans out: the batch
/// becomes `cancelled`, its fan-out creates nothing more (not even a page in flight when the
/// cancel landed), and its notifications not yet picked up are cancelled; nothing is sent. A
/// second cancel answers 409 naming the status, an unknown batch 404.
#[tokio::test]
async fn a_running_bulk_send_is_cancelled_with_its_notifications_not_yet_picked_up() {
    use herald_actors::scheduler::SchedulerMsg;
    use herald_entities::{batch, repo::batches};
    use sea_orm::PaginatorTrait;
    // No round but those asked for, after the first.
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    let scheduler = w.herald.app().scheduler().expect("scheduler running");
    scheduler
        .call(SchedulerMsg::RunNow, Some(E2E_TIMEOUT))
        .await
        .expect("a round run");
    let (status, accepted) = w
        .herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "recipients": [
                    { "email": "a@example.com" },
                    { "email": "b@example.com" },
                    { "email": "c@example.com" },
                    { "email": "d@example.com" }
                ],
                "category": "marketing",
                "channels": ["email"],
                "content": { "subject": "Winter sale", "text": "Everything 20% off." }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let id: Uuid = accepted["batch_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("batch id");
    let db = w.herald.db();
    // Running, a page in flight holding its lease: three of its notifications stored, one
    // waiting as scheduled (quiet hours), one queued, one picked up and sent already.
    let held = Utc::now() + ChronoDuration::hours(1);
    batch::Entity::update_many()
        .col_expr(batch::Column::Status, Expr::value("running"))
        .col_expr(batch::Column::LeaseUntil, Expr::value(held))
        .col_expr(batch::Column::Cursor, Expr::value("3"))
        .col_expr(batch::Column::Published, Expr::value(3))
        .filter(batch::Column::Id.eq(id))
        .exec(db)
        .await
        .expect("batch running");
    use NotificationStatus::{Queued, Scheduled, Sent};
    batch_notifications(db, id, &[Scheduled, Queued, Sent]).await;

    let (status, cancelled) = w
        .herald
        .post(&format!("/api/v1/batches/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["cancelled"], 2, "{cancelled}");
    assert_eq!(
        cancelled["counts"],
        json!([{ "status": "cancelled", "count": 2 }, { "status": "sent", "count": 1 }]),
        "{cancelled}"
    );

    // The page in flight stores nothing more and cannot move the batch on.
    let later = || held + ChronoDuration::minutes(1);
    assert_eq!(
        batches::insert_page(db, id, held, later, vec![])
            .await
            .expect("page"),
        None,
        "a page of a cancelled batch is not stored"
    );
    assert!(
        !batches::advance(db, id, held, "4", 4, true, later())
            .await
            .expect("advance"),
        "a cancelled batch does not advance"
    );
    // And no round takes it up again.
    scheduler
        .call(SchedulerMsg::RunNow, Some(E2E_TIMEOUT))
        .await
        .expect("a round run");
    let (_, view) = w.herald.get(&format!("/api/v1/batches/{id}")).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    assert_eq!(view["published"], 3, "no further page: {view}");
    assert!(view.get("cancelled").is_none(), "{view}");
    let of_batch = notification::Entity::find()
        .filter(notification::Column::BatchId.eq(id))
        .count(db)
        .await
        .expect("count");
    assert_eq!(of_batch, 3, "no notification created after the cancel");
    w.nats.commands_drained(E2E_TIMEOUT).await;
    assert!(w.smtp.messages().is_empty(), "nothing sent");

    let (status, again) = w
        .herald
        .post(&format!("/api/v1/batches/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert!(
        again["message"]
            .as_str()
            .is_some_and(|m| m.contains("is cancelled")),
        "{again}"
    );
    let unknown = Uuid::now_v7();
    let (status, missing) = w
        .herald
        .post(&format!("/api/v1/batches/{unknown}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A `done` batch has all its notifications created and queued, not sent: a cancel still
/// cancels those not yet picked up (here one held back to the morning by quiet hours), and the
/// batch becomes `cancelled`. A done batch with none left to cancel answers 409 naming `done`.
#[tokio::test]
async fn a_done_bulk_send_is_cancelled_while_some_of_its_notifications_wait() {
    use herald_entities::batch;
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    let db = w.herald.db();
    let mut ids = Vec::new();
    for held in [true, false] {
        let (status, accepted) = w
            .herald
            .post(
                "/api/v1/notifications/bulk",
                &json!({
                    "recipients": [{ "email": "a@example.com" }],
                    "category": "marketing",
                    "channels": ["email"],
                    "content": { "subject": "Winter sale", "text": "Everything 20% off." }
                }),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let id: Uuid = accepted["batch_id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("batch id");
        batch::Entity::update_many()
            .col_expr(batch::Column::Status, Expr::value("done"))
            .col_expr(batch::Column::Published, Expr::value(1))
            .filter(batch::Column::Id.eq(id))
            .exec(db)
            .await
            .expect("batch done");
        let status = if held {
            NotificationStatus::Scheduled
        } else {
            NotificationStatus::Sent
        };
        batch_notifications(db, id, &[status]).await;
        ids.push(id);
    }
    let (status, cancelled) = w
        .herald
        .post(&format!("/api/v1/batches/{}/cancel", ids[0]), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["cancelled"], 1, "{cancelled}");
    let (status, refused) = w
        .herald
        .post(&format!("/api/v1/batches/{}/cancel", ids[1]), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("is done")),
        "{refused}"
    );
    let (_, view) = w.herald.get(&format!("/api/v1/batches/{}", ids[1])).await;
    assert_eq!(view["status"], "done", "left as it was: {view}");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A bulk send accepted for `email`, left `done` as if its fan-out had finished (the Scheduler's
/// rounds come only when asked, after the first): its id.
async fn done_batch(w: &World) -> Uuid {
    use herald_actors::scheduler::SchedulerMsg;
    use herald_entities::batch;
    let scheduler = w.herald.app().scheduler().expect("scheduler running");
    scheduler
        .call(SchedulerMsg::RunNow, Some(E2E_TIMEOUT))
        .await
        .expect("a round run");
    let (status, accepted) = w
        .herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "recipients": [{ "email": "a@example.com" }],
                "category": "marketing",
                "channels": ["email"],
                "content": { "subject": "Winter sale", "text": "Everything 20% off." }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let id: Uuid = accepted["batch_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("batch id");
    batch::Entity::update_many()
        .col_expr(batch::Column::Status, Expr::value("done"))
        .col_expr(batch::Column::Published, Expr::value(1))
        .filter(batch::Column::Id.eq(id))
        .exec(w.herald.db())
        .await
        .expect("batch done");
    id
}

/// The events on `notify.status.cancelled`, as (notification id, `at`), once there are `n` (or
/// more); panics with what it found when there are fewer after [`E2E_TIMEOUT`].
async fn cancelled_events(nats: &NatsServer, n: usize) -> Vec<(Uuid, String)> {
    use async_nats::jetstream;
    use futures::StreamExt;
    let js = jetstream::new(nats.client().await.expect("client"));
    let stream = js.get_stream("NOTIFY_STATUS").await.expect("status stream");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: "notify.status.cancelled".into(),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + E2E_TIMEOUT;
    while events.len() < n {
        let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, messages.next()).await else {
            panic!(
                "{} cancelled status events of {n} after {E2E_TIMEOUT:?}",
                events.len()
            );
        };
        let event: Value = serde_json::from_slice(&message.payload).expect("a status event");
        let id = event["notification_id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("notification id");
        events.push((id, event["at"].as_str().expect("at").to_string()));
    }
    events
}

/// Observers learn of a batch cancel as of a single one: each notification it cancels has its
/// `cancelled` status event, stamped with the time stored for it, and one it leaves (sent already)
/// has none. (It published none before.) A cancelled batch with notifications still waiting is
/// cancelled again; once none is, it answers 409.
#[tokio::test]
async fn a_bulk_cancel_publishes_a_cancelled_event_for_each_notification_it_cancels() {
    use NotificationStatus::{Queued, Scheduled, Sent};
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    let id = done_batch(&w).await;
    let db = w.herald.db();
    let ids = batch_notifications(db, id, &[Scheduled, Queued, Sent]).await;

    let (status, cancelled) = w
        .herald
        .post(&format!("/api/v1/batches/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["cancelled"], 2, "{cancelled}");

    let events = cancelled_events(&w.nats, 2).await;
    let mut announced: Vec<Uuid> = events.iter().map(|(id, _)| *id).collect();
    announced.sort();
    let mut expected = ids[..2].to_vec();
    expected.sort();
    assert_eq!(
        announced, expected,
        "one event for each cancelled notification"
    );
    for (notification, at) in &events {
        let (_, view) = w
            .herald
            .get(&format!("/api/v1/notifications/{notification}"))
            .await;
        assert_eq!(view["status"], "cancelled", "{view}");
        let stored: chrono::DateTime<Utc> =
            serde_json::from_value(view["updated_at"].clone()).expect("updated_at");
        let announced: chrono::DateTime<Utc> = at.parse().expect("event time");
        assert_eq!(
            announced, stored,
            "the event carries the stored time: {view}"
        );
    }
    assert!(
        herald_tests::status_events(&w.nats, "cancelled", ids[2])
            .await
            .is_empty(),
        "no event for the notification sent already"
    );

    // A cancel that stopped half-way (the database failed after its first transaction) leaves a
    // `cancelled` batch with notifications still waiting: the same request again cancels them.
    let left = batch_notifications(db, id, &[Scheduled]).await;
    let (status, again) = w
        .herald
        .post(&format!("/api/v1/batches/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["cancelled"], 1, "{again}");
    let events = cancelled_events(&w.nats, 3).await;
    assert_eq!(events[2].0, left[0], "the rest announced too");
    let (status, refused) = w
        .herald
        .post(&format!("/api/v1/batches/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("is cancelled")),
        "{refused}"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A batch cancel that stopped half-way (its instance stopped: the request was cut short by the
/// shutdown's grace, or a crash) leaves its lease to lapse; beside its next round, on a task of
/// its own, the Scheduler takes it and cancels the rest, with the request's reason and an event
/// for each notification, and the lease is cleared. A cancel still under way (its lease live) and
/// one done (no lease: the notification of the batch waiting now was picked up before the
/// cancel, and goes out) are left alone. (Before, only the same request made again finished it, and meanwhile the rest of the
/// cancelled campaign went out.)
#[tokio::test]
async fn the_scheduler_finishes_a_batch_cancel_that_stopped_half_way() {
    use NotificationStatus::Scheduled;
    use herald_actors::scheduler::SchedulerMsg;
    use herald_entities::batch;
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    let db = w.herald.db();
    let (stopped, running, done) = (
        done_batch(&w).await,
        done_batch(&w).await,
        done_batch(&w).await,
    );
    let n = 1_500;
    let left = batch_notifications(db, stopped, &vec![Scheduled; n]).await;
    let kept = [
        batch_notifications(db, running, &[Scheduled]).await,
        batch_notifications(db, done, &[Scheduled]).await,
    ]
    .concat();
    let hour = ChronoDuration::hours(1);
    let cancel_lease = |id: Uuid| async move {
        let batch = herald_entities::repo::batches::find(db, id)
            .await
            .expect("read");
        batch.expect("batch").lease_until
    };
    for (id, lease) in [
        (stopped, Some(Utc::now() - hour)),
        (running, Some(Utc::now() + hour)),
        (done, None),
    ] {
        batch::Entity::update_many()
            .col_expr(batch::Column::Status, Expr::value("cancelled"))
            .col_expr(batch::Column::LeaseUntil, Expr::value(lease))
            .filter(batch::Column::Id.eq(id))
            .exec(db)
            .await
            .expect("a cancel begun");
    }

    let scheduler = w.herald.app().scheduler().expect("scheduler running");
    scheduler
        .call(SchedulerMsg::RunNow, Some(E2E_TIMEOUT))
        .await
        .expect("a round run");
    // Finished beside the round, on a task of its own: done once its lease is cleared.
    eventually("the stopped cancel finished", E2E_TIMEOUT, || async {
        cancel_lease(stopped).await.is_none().then_some(())
    })
    .await;
    assert_eq!(
        cancelled_among(db, &left).await,
        n as u64,
        "the rest cancelled"
    );
    assert_eq!(cancel_lease(stopped).await, None, "the cancel is done");
    assert_eq!(
        cancelled_among(db, &kept).await,
        0,
        "a cancel under way, and one done, are left alone"
    );
    let view = notification_json(&w.herald, &left[0].to_string()).await;
    assert_eq!(
        view["status_reason"], "batch cancelled by API request",
        "{view}"
    );
    let events = cancelled_events(&w.nats, n).await;
    let announced: HashSet<Uuid> = events.iter().map(|(id, _)| *id).collect();
    assert_eq!(announced, left.into_iter().collect(), "an event for each");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A batch of 5,000 waiting notifications is cancelled 1,000 at a time, each group in a
/// transaction of its own (its notifications share the time it stored, which their events
/// carry: five times), while a single send made at the same moment is stored and goes out.
/// Every one of the 5,000 has its event. (One UPDATE did them all before, one time stored, and
/// no events.)
#[tokio::test]
async fn a_large_bulk_cancel_goes_in_chunks_while_a_single_send_goes_out() {
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    let id = done_batch(&w).await;
    let statuses = vec![NotificationStatus::Scheduled; 5_000];
    let ids = batch_notifications(w.herald.db(), id, &statuses).await;

    let cancel = async {
        w.herald
            .post(&format!("/api/v1/batches/{id}/cancel"), &json!({}))
            .await
    };
    let send = async {
        let sent = w
            .herald
            .send_accepted(&json!({
                "recipient": { "email": "meanwhile@example.com" },
                "category": "transactional",
                "channels": ["email"],
                "content": { "subject": "Receipt", "text": "Thanks for your order." }
            }))
            .await;
        w.herald.wait_status(&sent, "sent").await
    };
    let ((status, cancelled), sent) = tokio::join!(cancel, send);
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["cancelled"], 5_000, "{cancelled}");
    assert_eq!(sent["status"], "sent", "{sent}");

    let stamped: Vec<chrono::DateTime<Utc>> = notification::Entity::find()
        .select_only()
        .column(notification::Column::UpdatedAt)
        .filter(notification::Column::BatchId.eq(id))
        .filter(notification::Column::Status.eq(NotificationStatus::Cancelled))
        .into_tuple()
        .all(w.herald.db())
        .await
        .expect("cancelled notifications");
    assert_eq!(stamped.len(), 5_000, "all cancelled");
    let transactions: HashSet<_> = stamped.into_iter().collect();
    assert_eq!(
        transactions.len(),
        5,
        "cancelled in five transactions of 1,000: {transactions:?}"
    );
    let events = cancelled_events(&w.nats, 5_000).await;
    let announced: HashSet<Uuid> = events.iter().map(|(id, _)| *id).collect();
    assert_eq!(announced, ids.into_iter().collect(), "an event for each");
    let times: HashSet<chrono::DateTime<Utc>> = events
        .iter()
        .map(|(_, at)| at.parse().expect("event time"))
        .collect();
    assert_eq!(
        times, transactions,
        "each event carries its transaction's time"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A batch cancel whose client goes away before the answer still cancels every notification of
/// the batch: the request, read whole, runs to its end (the README said the cancel stopped with
/// it; it did not). The client closes its connection once the first chunk is committed.
#[tokio::test]
async fn a_bulk_cancel_goes_on_after_its_client_went_away() {
    use tokio::io::AsyncWriteExt;
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    let id = done_batch(&w).await;
    let n = 20_000;
    let statuses = vec![NotificationStatus::Scheduled; n];
    let db = w.herald.db();
    let ids = batch_notifications(db, id, &statuses).await;

    let address = w.herald.base().trim_start_matches("http://").to_string();
    let mut client = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connected");
    let request = format!(
        "POST /api/v1/batches/{id}/cancel HTTP/1.1\r\nHost: {address}\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\n\r\n{{}}",
        w.herald.admin_key()
    );
    client
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    eventually("the cancel's first chunk", E2E_TIMEOUT, || async {
        (cancelled_among(db, &ids).await > 0).then_some(())
    })
    .await;
    drop(client);
    let at_the_cut = cancelled_among(db, &ids).await;
    assert!(
        at_the_cut < n as u64,
        "the cancel was done when its client went away; this tests nothing"
    );
    eventually(
        "every notification of the batch cancelled",
        E2E_TIMEOUT,
        || async { (cancelled_among(db, &ids).await == n as u64).then_some(()) },
    )
    .await;
    w.herald.shutdown().await.expect("clean shutdown");
}

/// How many of the notifications `ids` are `cancelled`.
async fn cancelled_among(db: &sea_orm::DatabaseConnection, ids: &[Uuid]) -> u64 {
    use sea_orm::PaginatorTrait;
    notification::Entity::find()
        .filter(notification::Column::Id.is_in(ids.to_vec()))
        .filter(notification::Column::Status.eq(NotificationStatus::Cancelled))
        .count(db)
        .await
        .expect("count")
}

/// A batch cancel answers only once its notifications' `cancelled` events are published, so that
/// an instance stopped right after the answer (a graceful shutdown waits for the requests in
/// progress, not for tasks they leave behind) has published them all. NATS is frozen while the
/// cancel commits its chunks; the stream is asked for its count the moment the answer is in, on a
/// connection made beforehand. (The answer came at once before, the events following on a task
/// of their own that a process exiting after the answer cut short.)
#[tokio::test]
async fn a_bulk_cancel_answers_once_its_events_are_published() {
    use futures::TryStreamExt;
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    let id = done_batch(&w).await;
    let n = 3_000;
    let statuses = vec![NotificationStatus::Scheduled; n];
    let ids = batch_notifications(w.herald.db(), id, &statuses).await;
    let js = async_nats::jetstream::new(w.nats.client().await.expect("client"));
    let stream = js.get_stream("NOTIFY_STATUS").await.expect("status stream");

    w.nats.freeze().expect("SIGSTOP");
    let cancelling = {
        let http = w.herald.http().clone();
        let url = format!("{}/api/v1/batches/{id}/cancel", w.herald.base());
        tokio::spawn(async move {
            let response = http.post(url).json(&json!({})).send().await;
            let answer = response.expect("answered");
            (
                answer.status(),
                answer.json::<Value>().await.unwrap_or(Value::Null),
            )
        })
    };
    let db = w.herald.db();
    eventually(
        "the batch's notifications cancelled",
        E2E_TIMEOUT,
        || async { (cancelled_among(db, &ids).await == n as u64).then_some(()) },
    )
    .await;
    let counted = tokio::spawn(async move {
        let answer = cancelling.await.expect("the cancel ran");
        let published = stream
            .info_with_subjects("notify.status.cancelled")
            .await
            .expect("messages by subject")
            .try_fold(0, |total, (_, count)| async move { Ok(total + count) })
            .await
            .expect("messages by subject");
        (answer, published)
    });
    w.nats.resume().expect("SIGCONT");
    let ((status, cancelled), published) = counted.await.expect("counted");
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["cancelled"], n, "{cancelled}");
    assert_eq!(
        published, n,
        "every cancelled notification's event published by the time the cancel answers"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// On PostgreSQL a batch cancel does not wait for a row another transaction holds while it holds
/// others: its chunk passes over the rows a dispatcher's claim (one statement locking many rows in
/// its own order) holds, so neither can wait for the other. Here a claim holds one notification
/// of the batch and another transaction a second one, leaving it `queued`: the rest are cancelled
/// (and committed) while both wait; once they commit, the claimed one goes out and the other is
/// cancelled too. The claim then also asks for the cancelled ones, as one of several rows, and
/// finds them final. (The chunk's UPDATE waited for the held row before, holding the others'
/// locks: a claim asking for one of those deadlocked with it.)
#[tokio::test]
async fn a_bulk_cancel_passes_over_rows_a_claim_holds() {
    use NotificationStatus::{Cancelled, Processing, Queued};
    use herald_entities::repo::{batches, notifications};
    use sea_orm::TransactionTrait;
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    if w.db.kind() != DatabaseKind::Postgres {
        eprintln!("skipped on {:?}: it has no row locks", w.db.kind());
        w.herald.shutdown().await.expect("clean shutdown");
        return;
    }
    let id = done_batch(&w).await;
    // A pool of the test's own, so that the engine's is not taken up by the held transactions.
    let db = &herald_entities::connect(w.db.url(), 4).await.expect("db");
    let ids = batch_notifications(db, id, &[Queued; 4]).await;
    let (claimed, held) = (ids[2], ids[3]);
    let claim = db.begin().await.expect("claim's transaction");
    let mine = notifications::claim(&claim, &[claimed])
        .await
        .expect("claimed");
    assert_eq!(
        mine.get(&claimed),
        Some(&notifications::Claimed::Yours { attempts: 0 })
    );
    let other = db.begin().await.expect("other transaction");
    notification::Entity::update_many()
        .col_expr(notification::Column::StatusReason, Expr::value("held"))
        .filter(notification::Column::Id.eq(held))
        .exec(&other)
        .await
        .expect("held");

    let gate = w.herald.app().write_gate();
    let cancelling = {
        let db = w.herald.db().clone();
        tokio::spawn(async move {
            let mut announced = Vec::new();
            let reason = "batch cancelled by API request";
            let cancelled =
                batches::cancel(&db, &gate, id, reason, |chunk| announced.extend(chunk.ids))
                    .await
                    .expect("cancelled");
            (cancelled, announced)
        })
    };
    eventually(
        "the notifications not held cancelled while two are held",
        E2E_TIMEOUT,
        || async { (cancelled_among(db, &ids[..2]).await == 2).then_some(()) },
    )
    .await;
    let mine = notifications::claim(&claim, &[claimed, ids[0], ids[1]])
        .await
        .expect("claimed again");
    assert_eq!(
        mine.get(&ids[0]),
        Some(&notifications::Claimed::Final(Cancelled)),
        "{mine:?}"
    );
    claim.commit().await.expect("claim committed");
    other.commit().await.expect("other committed");

    let (cancelled, mut announced) = cancelling.await.expect("the cancel ran");
    let batches::BatchCancel::Cancelled { notifications, .. } = cancelled else {
        panic!("not cancelled: {cancelled:?}");
    };
    assert_eq!(notifications, 3, "all but the claimed one");
    announced.sort();
    let mut expected = vec![ids[0], ids[1], held];
    expected.sort();
    assert_eq!(announced, expected, "each handed on once committed");
    assert_eq!(herald_tests::stored_status(db, claimed).await, Processing);
    assert_eq!(herald_tests::stored_status(db, held).await, Cancelled);
}

/// A send to `contacts` (no customer id) of `category` over `channels`.
fn to_contacts(contacts: Value, category: &str, channels: &[&str]) -> Value {
    json!({
        "recipient": contacts,
        "category": category,
        "channels": channels,
        "content": { "subject": format!("A {category} message"), "text": "Hello from the shop." }
    })
}

/// A customer who opted out of marketing is not reached by a marketing send that names only
/// their email address (before, the send went out: only sends naming the customer id read the
/// customer's preferences), whatever the case the address is written in.
#[tokio::test]
async fn a_send_to_a_customers_email_honours_their_opt_out() {
    let w = world(|_| {}).await;
    add_customers(&w.herald, vec![customer_row("ada", "en", None)]).await;
    set_preferences(
        &w.herald,
        "ada",
        &json!({ "preferences": [{ "category": "marketing", "enabled": false }] }),
    )
    .await;

    for email in ["ada@example.com", "Ada@Example.COM"] {
        let id = w
            .herald
            .send_accepted(&to_contacts(
                json!({ "email": email }),
                "marketing",
                &["email"],
            ))
            .await;
        let done = eventually("the send to be sent or skipped", E2E_TIMEOUT, || async {
            let json = notification_json(&w.herald, &id).await;
            matches!(json["status"].as_str(), Some("sent" | "skipped")).then_some(json)
        })
        .await;
        assert_eq!(done["status"], "skipped", "to {email}: {done}");
        let reason = done["status_reason"].as_str().unwrap_or_default();
        assert!(reason.starts_with("opted_out"), "{done}");
        assert_eq!(done["attempts"][0]["status"], "opted_out", "{done}");
    }
    assert!(
        w.smtp.messages().is_empty(),
        "nothing was mailed to the customer who opted out"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A customer who opted out of a channel is not reached on it by a send that names their
/// contact: the channel is recorded `opted_out` and the chain moves on, as for a send naming the
/// customer.
#[tokio::test]
async fn a_channel_opted_out_by_the_contacts_customer_moves_a_contact_send_on() {
    let w = world(|_| {}).await;
    add_customers(&w.herald, vec![customer_row("grace", "en", None)]).await;
    set_preferences(
        &w.herald,
        "grace",
        &json!({ "preferences": [
            { "category": "transactional", "channel": "email", "enabled": false }
        ]}),
    )
    .await;

    let hook = format!("{}/hooks/grace", w.hooks.uri());
    let id = w
        .herald
        .send_accepted(&to_contacts(
            json!({ "email": "grace@example.com", "webhook_url": hook }),
            "transactional",
            &["email", "webhook"],
        ))
        .await;
    let sent = w.herald.wait_status(&id, "sent").await;
    assert_eq!(sent["final_channel"], "webhook", "{sent}");
    let attempts = sent["attempts"].as_array().expect("attempts");
    assert_eq!(attempts[0]["channel"], "email", "{sent}");
    assert_eq!(attempts[0]["status"], "opted_out", "{sent}");
    assert!(w.smtp.messages().is_empty(), "no mail to grace");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A contact send's opt-out record says who opted out as far as the send can tell: the customer
/// holding the address when only one does, a customer holding it when several do (one of them
/// opted out), never which one. It used to say "the customer opted out" in both cases.
#[tokio::test]
async fn a_contact_sends_opt_out_says_whether_one_of_several_holders_opted_out() {
    let w = world(|_| {}).await;
    let mut other = customer_row("grace-work", "en", None);
    other.email = Set(Some("grace@example.com".into()));
    add_customers(&w.herald, vec![customer_row("grace", "en", None), other]).await;
    let wishes = [("grace", false), ("grace-work", true)];
    for (customer, enabled) in wishes {
        set_preferences(
            &w.herald,
            customer,
            &json!({ "preferences": [
                { "category": "transactional", "channel": "email", "enabled": enabled }
            ]}),
        )
        .await;
    }

    let hook = format!("{}/hooks/grace", w.hooks.uri());
    let id = w
        .herald
        .send_accepted(&to_contacts(
            json!({ "email": "grace@example.com", "webhook_url": hook }),
            "transactional",
            &["email", "webhook"],
        ))
        .await;
    let sent = w.herald.wait_status(&id, "sent").await;
    let attempts = sent["attempts"].as_array().expect("attempts");
    assert_eq!(attempts[0]["status"], "opted_out", "{sent}");
    assert_eq!(
        attempts[0]["error"],
        "a customer holding this email address opted out of transactional on email",
        "{sent}"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// Waits for notification `id` to be `sent`, asserts it was sent no earlier than `end` (to the
/// second: "sent at …, `what` `end`" otherwise) and answers it.
async fn sent_not_before(
    herald: &TestHerald,
    id: &str,
    end: chrono::DateTime<Utc>,
    what: &str,
) -> Value {
    let sent = herald.wait_status(id, "sent").await;
    let sent_at = chrono::DateTime::parse_from_rfc3339(sent["sent_at"].as_str().expect("sent_at"))
        .expect("time");
    assert!(
        sent_at >= end - ChronoDuration::milliseconds(999),
        "sent at {sent_at}, {what} {end}"
    );
    sent
}

/// Asserts that notification `id` is held back by quiet hours (seen `processing` with that reason)
/// and then sent no earlier than `end`, when they end (to the second).
async fn held_by_quiet_hours_until(herald: &TestHerald, id: &str, end: chrono::DateTime<Utc>) {
    let seen = eventually("a deferral or the send", E2E_TIMEOUT, || async {
        let json = notification_json(herald, id).await;
        let deferred = json["status_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("deferred: quiet hours until"));
        (deferred || json["status"] == "sent").then_some(json)
    })
    .await;
    assert_eq!(seen["status"], "processing", "held, not sent: {seen}");

    sent_not_before(herald, id, end, "the quiet hours ended").await;
}

/// The quiet hours of the one customer holding a send's contact hold the send until they end.
#[tokio::test]
async fn quiet_hours_of_the_contacts_only_customer_defer_a_contact_send() {
    let w = world(|_| {}).await;
    add_customers(&w.herald, vec![customer_row("linus", "en", None)]).await;
    // Long enough for the deferral to be seen before the window ends on a slow, busy machine.
    let end = quiet_for(&w.herald, "linus", ChronoDuration::seconds(10)).await;

    let held = w
        .herald
        .send_accepted(&to_contacts(
            json!({ "email": "linus@example.com" }),
            "transactional",
            &["email"],
        ))
        .await;
    held_by_quiet_hours_until(&w.herald, &held, end).await;
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A contact no customer holds is sent to as before. One several customers hold is kept from a
/// channel any of them opted out of, and is not held when more than one of them set quiet hours
/// (whose night would it be?).
#[tokio::test]
async fn contacts_of_no_customer_go_out_and_shared_ones_follow_every_holders_opt_outs() {
    let w = world(|_| {}).await;
    let shared = |id: &str| {
        let mut row = customer_row(id, "en", None);
        row.email = Set(Some("family@example.com".into()));
        row
    };
    add_customers(&w.herald, vec![shared("sam"), shared("sue")]).await;
    quiet_for(&w.herald, "sam", ChronoDuration::hours(1)).await;
    quiet_for(&w.herald, "sue", ChronoDuration::hours(2)).await;

    let stranger = w
        .herald
        .send_accepted(&to_contacts(
            json!({ "email": "stranger@example.com" }),
            "marketing",
            &["email"],
        ))
        .await;
    w.herald.wait_status(&stranger, "sent").await;
    let family = w
        .herald
        .send_accepted(&to_contacts(
            json!({ "email": "family@example.com" }),
            "transactional",
            &["email"],
        ))
        .await;
    let sent = w.herald.wait_status(&family, "sent").await;
    assert!(sent["status_reason"].is_null(), "{sent}");

    set_preferences(
        &w.herald,
        "sue",
        &json!({ "preferences": [{ "category": "marketing", "enabled": false }] }),
    )
    .await;
    let family = w
        .herald
        .send_accepted(&to_contacts(
            json!({ "email": "family@example.com" }),
            "marketing",
            &["email"],
        ))
        .await;
    let skipped = w.herald.wait_status(&family, "skipped").await;
    assert_eq!(skipped["attempts"][0]["status"], "opted_out", "{skipped}");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// The dispatcher finds the customers holding a send's contacts by each kind of contact (an
/// email address whatever its case, a phone number, a Telegram chat id, one of the push tokens,
/// a webhook URL),
/// only those with stored wishes, each with their own.
#[tokio::test]
async fn the_customers_holding_contacts_are_found_by_each_kind_with_their_wishes() {
    use herald_entities::repo::{customers::ContactSet, preferences};
    let db = TestDatabase::from_env().await.expect("database");
    let conn = herald_tests::migrated(db.url()).await.expect("migrated");
    let mut ada = customer_row("ada", "en", None);
    ada.email = Set(Some("Ada@Example.com".into()));
    ada.phone = Set(Some("+4915112345678".into()));
    ada.telegram_chat_id = Set(Some("4711".into()));
    ada.push_tokens = Set(json!(["token-a1", "token-a2"]));
    ada.webhook_url = Set(Some("https://hooks.example.com/ada".into()));
    // Holds ada's phone, but has no wishes: not found.
    let mut bob = customer_row("bob", "en", None);
    bob.phone = Set(Some("+4915112345678".into()));
    let cyd = customer_row("cyd", "en", None);
    customer::Entity::insert_many([ada, bob, cyd])
        .exec_without_returning(&conn)
        .await
        .expect("customers stored");
    let opt_out = vec![preferences::NewPreference {
        category: "marketing".into(),
        channel: "*".into(),
        enabled: false,
    }];
    for id in ["ada", "cyd"] {
        preferences::replace(&conn, id, opt_out.clone(), None)
            .await
            .expect("wishes stored");
    }

    let lookup = herald_actors::lookup::contact_holders(conn.clone());
    let set = |f: fn(&mut ContactSet)| {
        let mut set = ContactSet::default();
        f(&mut set);
        set
    };
    let asked = [
        set(|s| s.email = Some("ada@example.COM".into())),
        set(|s| s.phone = Some("+4915112345678".into())),
        set(|s| s.telegram_chat_id = Some("4711".into())),
        set(|s| s.push_tokens = vec!["token-x".into(), "token-a2".into()]),
        set(|s| s.webhook_url = Some("https://hooks.example.com/ada".into())),
        set(|s| s.email = Some("nobody@example.com".into())),
    ];
    let answers = futures::future::join_all(asked.iter().map(|set| lookup.get(set.clone()))).await;
    let found: Vec<Vec<String>> = answers
        .into_iter()
        .map(|answer| {
            answer
                .expect("read")
                .unwrap_or_default()
                .into_iter()
                .map(|holder| {
                    assert_eq!(holder.recipient.wishes.preferences.len(), 1);
                    holder.recipient.customer.expect("customer").external_id
                })
                .collect()
        })
        .collect();
    let ada = vec!["ada".to_string()];
    assert_eq!(
        found,
        [
            ada.clone(),
            ada.clone(),
            ada.clone(),
            ada.clone(),
            ada,
            vec![]
        ],
        "found by email, phone, chat id, push token and webhook URL; nobody for an unknown address"
    );
}

/// Waits until `id` is sent or skipped (or another final status) and returns it.
async fn settled(herald: &TestHerald, id: &str) -> Value {
    eventually("the send to be sent or skipped", E2E_TIMEOUT, || async {
        let json = notification_json(herald, id).await;
        matches!(
            json["status"].as_str(),
            Some("sent" | "skipped" | "failed" | "dead")
        )
        .then_some(json)
    })
    .await
}

/// Requests the mock webhook receiver got on `path`.
async fn hooks_on(hooks: &MockServer, path: &str) -> usize {
    hooks
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|request| request.url.path() == path)
        .count()
}

/// A customer who opted out of webhooks is not reached by a send naming only their stored
/// webhook URL, as written (before, webhook URLs were not matched to customers and it went out);
/// the same URL with a trailing slash is another endpoint, no customer's, and goes out.
#[tokio::test]
async fn a_send_to_a_customers_webhook_url_honours_their_opt_out() {
    let w = world(|_| {}).await;
    let hook = format!("{}/hooks/grace", w.hooks.uri());
    add_customers(
        &w.herald,
        vec![customer_row("grace", "en", Some(hook.clone()))],
    )
    .await;
    set_preferences(
        &w.herald,
        "grace",
        &json!({ "preferences": [
            { "category": "marketing", "channel": "webhook", "enabled": false }
        ]}),
    )
    .await;

    let id = w
        .herald
        .send_accepted(&to_contacts(
            json!({ "webhook_url": hook }),
            "marketing",
            &["webhook"],
        ))
        .await;
    let done = settled(&w.herald, &id).await;
    assert_eq!(done["status"], "skipped", "{done}");
    assert_eq!(done["attempts"][0]["status"], "opted_out", "{done}");
    assert_eq!(
        done["attempts"][0]["error"],
        "the customer holding this webhook URL opted out of marketing on webhook",
        "{done}"
    );
    assert_eq!(
        hooks_on(&w.hooks, "/hooks/grace").await,
        0,
        "nothing posted to grace"
    );

    let other = w
        .herald
        .send_accepted(&to_contacts(
            json!({ "webhook_url": format!("{hook}/") }),
            "marketing",
            &["webhook"],
        ))
        .await;
    w.herald.wait_status(&other, "sent").await;
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A send naming a customer and, inline, a contact another customer holds follows that holder's
/// opt-outs on the contact's channel too (before, only the named customer's wishes were read,
/// whatever contacts the send gave); the named customer's own contacts are theirs alone, even
/// when another customer who opted out holds the same address.
#[tokio::test]
async fn a_send_naming_a_customer_and_another_customers_contact_follows_that_holders_opt_out() {
    let w = world(|_| {}).await;
    let mut bob = customer_row("bob", "en", None);
    bob.email = Set(Some("ada@example.com".into()));
    add_customers(
        &w.herald,
        vec![
            customer_row("ada", "en", None),
            customer_row("grace", "en", None),
            bob,
        ],
    )
    .await;
    for opted_out in ["grace", "bob"] {
        set_preferences(
            &w.herald,
            opted_out,
            &json!({ "preferences": [{ "category": "marketing", "enabled": false }] }),
        )
        .await;
    }

    let send = |email: &str| {
        to_contacts(
            json!({ "customer_id": "ada", "email": email }),
            "marketing",
            &["email"],
        )
    };
    let to_grace = w.herald.send_accepted(&send("Grace@example.com")).await;
    let done = settled(&w.herald, &to_grace).await;
    assert_eq!(done["status"], "skipped", "{done}");
    assert_eq!(
        done["attempts"][0]["error"],
        "the customer holding this email address opted out of marketing on email",
        "{done}"
    );
    let to_ada = w.herald.send_accepted(&send("ADA@example.com")).await;
    w.herald.wait_status(&to_ada, "sent").await;
    let mailed: Vec<String> = w
        .smtp
        .messages()
        .iter()
        .flat_map(|m| m.to.clone())
        .collect();
    assert_eq!(mailed, ["ADA@example.com"], "nothing mailed to grace");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A send naming a customer and giving another customer's contact inline waits for that
/// holder's quiet hours to end (before, only the named customer's quiet hours applied, and the
/// holder was reached at night).
#[tokio::test]
async fn a_send_naming_a_customer_and_another_customers_contact_waits_for_that_holders_night() {
    let w = world(|_| {}).await;
    add_customers(
        &w.herald,
        vec![
            customer_row("ada", "en", None),
            customer_row("grace", "en", None),
        ],
    )
    .await;
    // Long enough for the deferral to be seen before the window ends on a slow, busy machine.
    let end = quiet_for(&w.herald, "grace", ChronoDuration::seconds(10)).await;

    let held = w
        .herald
        .send_accepted(&to_contacts(
            json!({ "customer_id": "ada", "email": "grace@example.com" }),
            "transactional",
            &["email"],
        ))
        .await;
    held_by_quiet_hours_until(&w.herald, &held, end).await;
    w.herald.shutdown().await.expect("clean shutdown");
}

/// An email address's non-ASCII letters compare exactly on both databases: `É` is not `é` (before,
/// PostgreSQL's `lower` folded them while SQLite's did not, so the same send was skipped on one
/// and sent on the other); its ASCII letters still compare regardless of case.
#[tokio::test]
async fn an_emails_non_ascii_letters_compare_exactly_on_both_databases() {
    let w = world(|_| {}).await;
    let mut emile = customer_row("emile", "en", None);
    emile.email = Set(Some("Émile@Example.com".into()));
    add_customers(&w.herald, vec![emile]).await;
    set_preferences(
        &w.herald,
        "emile",
        &json!({ "preferences": [{ "category": "marketing", "enabled": false }] }),
    )
    .await;

    let send = |email: &str| to_contacts(json!({ "email": email }), "marketing", &["email"]);
    let same = w.herald.send_accepted(&send("Émile@example.COM")).await;
    let done = settled(&w.herald, &same).await;
    assert_eq!(done["status"], "skipped", "ASCII letters fold: {done}");
    // Not opted out, it reaches the mail provider (whether the sink takes a non-ASCII address
    // is beside the point).
    let other = w.herald.send_accepted(&send("émile@example.com")).await;
    let done = settled(&w.herald, &other).await;
    assert_ne!(done["status"], "skipped", "É is not é: {done}");
    assert_eq!(
        done["attempts"][0]["provider"], "smtp",
        "É is not é: {done}"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A critical send (`security`) to bare contacts goes out without reading whose contacts they are:
/// no opt-out or quiet hours could hold it. Here that read would fail (its table is gone); before,
/// the send waited for it, retried for ever.
#[tokio::test]
async fn a_critical_send_to_bare_contacts_does_not_read_whose_they_are() {
    use sea_orm::ConnectionTrait;
    let w = world(|_| {}).await;
    w.herald
        .db()
        .execute_unprepared("DROP TABLE quiet_hours")
        .await
        .expect("quiet_hours dropped");
    let id = w
        .herald
        .send_accepted(&to_contacts(
            json!({ "email": "linus@example.com" }),
            "security",
            &["email"],
        ))
        .await;
    w.herald.wait_status(&id, "sent").await;
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A chunk of a batch cancel moves at most its limit, on PostgreSQL too, where its read of the
/// rows passes over those other transactions hold (`FOR UPDATE SKIP LOCKED`): as `id IN (…)` such
/// a read may run again for each row the UPDATE changes and choose more rows than its limit.
#[tokio::test]
async fn a_bulk_cancel_chunk_moves_at_most_its_limit() {
    use herald_entities::repo::schedule;
    let w = world(|config| config.scheduler.poll_interval_ms = 3_600_000).await;
    let id = done_batch(&w).await;
    let db = w.herald.db();
    let ids = batch_notifications(db, id, &[NotificationStatus::Scheduled; 6]).await;
    let chunk = schedule::cancel_batch_chunk(db, id, "batch cancelled", 2)
        .await
        .expect("a chunk cancelled");
    let cancelled = cancelled_among(db, &ids).await;
    assert_eq!(
        (chunk.ids.len(), cancelled),
        (2, 2),
        "a chunk of 2 of a batch of 6 (ids answered, rows cancelled)"
    );
    w.herald.shutdown().await.expect("clean shutdown");
}
