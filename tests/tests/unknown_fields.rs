//! Request bodies take only the fields the API documents: a field it does not know (a misspelt
//! one, camelCase for snake_case, one another endpoint has) is refused with 400
//! `invalid_request` naming it, and nothing is stored, sent or changed. Ignoring it would do what
//! the caller did not ask for: send a bulk at once that was meant for later, skip a customer's
//! opt-outs, replay every dead letter, wipe quiet hours.

use herald_entities::{batch, notification};
use herald_tests::{NatsServer, SmtpSink, TestDatabase, TestHerald, test_config};
use reqwest::StatusCode;
use sea_orm::{EntityTrait, PaginatorTrait};
use serde_json::{Value, json};

struct World {
    _nats: NatsServer,
    _smtp: SmtpSink,
    _db: TestDatabase,
    herald: TestHerald,
}

async fn world() -> World {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald starts");
    World {
        _nats: nats,
        _smtp: smtp,
        _db: db,
        herald,
    }
}

/// Asserts a 400 `invalid_request` whose `field` is `field` and whose message names it.
fn assert_unknown(status: StatusCode, answer: &Value, field: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(answer["code"], "invalid_request", "{answer}");
    assert_eq!(answer["field"], field, "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("unknown field {field:?}")),
        "the message names the field: {answer}"
    );
}

async fn notifications(herald: &TestHerald) -> u64 {
    notification::Entity::find()
        .count(herald.db())
        .await
        .expect("notifications counted")
}

/// `customerId` for `customer_id` would send without the customer's opt-outs and quiet hours.
#[tokio::test]
async fn a_send_with_an_unknown_field_is_refused_naming_it() {
    let w = world().await;
    let h = &w.herald;
    let (status, answer) = h
        .send(&json!({
            "recipient": { "email": "ada@example.com", "customerId": "c-1" },
            "category": "marketing",
            "channels": ["email"],
            "content": { "text": "Sale!" }
        }))
        .await;
    assert_unknown(status, &answer, "customerId");
    let (status, answer) = h
        .send(&json!({
            "recipient": { "email": "ada@example.com" },
            "category": "marketing",
            "content": { "text": "Sale!" },
            "send_at": "2099-01-01T00:00:00Z"
        }))
        .await;
    assert_unknown(status, &answer, "send_at");
    assert_eq!(notifications(h).await, 0, "nothing was stored");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A bulk send has no `scheduled_at`: taking the request would send to everyone at once.
#[tokio::test]
async fn a_bulk_send_with_an_unknown_field_is_refused_naming_it() {
    let w = world().await;
    let h = &w.herald;
    let bulk = |extra: (&str, Value), recipient: Value| {
        let mut body = json!({
            "recipients": [recipient],
            "category": "marketing",
            "channels": ["email"],
            "content": { "text": "Sale!" }
        });
        body[extra.0] = extra.1;
        body
    };
    let (status, answer) = h
        .post(
            "/api/v1/notifications/bulk",
            &bulk(
                ("scheduled_at", json!("2099-01-01T00:00:00Z")),
                json!({ "email": "ada@example.com" }),
            ),
        )
        .await;
    assert_unknown(status, &answer, "scheduled_at");
    // A recipient's fields are checked too (its contacts and `variables` are one object).
    let (status, answer) = h
        .post(
            "/api/v1/notifications/bulk",
            &bulk(
                ("request_id", json!("bulk-1")),
                json!({ "email": "ada@example.com", "customerId": "c-1" }),
            ),
        )
        .await;
    assert_unknown(status, &answer, "customerId");
    let batches = batch::Entity::find()
        .count(h.db())
        .await
        .expect("batches counted");
    assert_eq!(batches, 0, "no batch was stored");
    assert_eq!(notifications(h).await, 0, "nothing was stored");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A misspelt filter would replay every dead letter.
#[tokio::test]
async fn a_dead_letter_replay_with_an_unknown_filter_is_refused_naming_it() {
    let w = world().await;
    let (status, answer) = w
        .herald
        .post(
            "/api/v1/dlq/replay",
            &json!({ "kind": "events", "resaon": "unknown customer" }),
        )
        .await;
    assert_unknown(status, &answer, "resaon");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A misspelt key in a `PUT` (which replaces everything) would wipe what it meant to set.
#[tokio::test]
async fn preferences_customers_orders_and_templates_refuse_unknown_fields_receipts_do_not() {
    let w = world().await;
    let h = &w.herald;
    let (status, answer) = h
        .post(
            "/api/v1/customers",
            &json!({ "id": "c-1", "email": "ada@example.com", "timezone": "Europe/Berlin" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let wishes = "/api/v1/customers/c-1/preferences";
    let stored = json!({
        "preferences": [{ "category": "marketing", "enabled": false }],
        "quiet_hours": { "start": "22:00", "end": "07:00" }
    });
    let (status, answer) = h.put(wishes, &stored).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, answer) = h
        .put(
            wishes,
            &json!({
                "preferences": [{ "category": "marketing", "enabled": false }],
                "quietHours": { "start": "23:00", "end": "06:00" }
            }),
        )
        .await;
    assert_unknown(status, &answer, "quietHours");
    let (status, answer) = h
        .put(
            wishes,
            &json!({
                "preferences": [{ "category": "marketing", "channel": "email", "enabeld": true }],
                "quiet_hours": { "start": "22:00", "end": "07:00", "tz": "UTC" }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let (_, now) = h.get(wishes).await;
    assert_eq!(
        now["preferences"], stored["preferences"],
        "unchanged: {now}"
    );
    assert_eq!(now["quiet_hours"]["start"], "22:00", "unchanged: {now}");

    let (status, answer) = h
        .put(
            "/api/v1/customers/c-1",
            &json!({ "email": "ada@example.com", "time_zone": "UTC" }),
        )
        .await;
    assert_unknown(status, &answer, "time_zone");
    let (_, customer) = h.get("/api/v1/customers/c-1").await;
    assert_eq!(
        customer["timezone"], "Europe/Berlin",
        "unchanged: {customer}"
    );

    let (status, answer) = h
        .post(
            "/api/v1/orders",
            &json!({
                "order_number": "o-1", "customer_id": "c-1", "total_minor": 100,
                "currency": "EUR", "items": [{ "name": "Tea", "quantity": 1,
                "unit_price_minor": 100, "sku": "T-1" }]
            }),
        )
        .await;
    assert_unknown(status, &answer, "sku");
    let (status, _) = h.get("/api/v1/orders/o-1").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no order was stored");

    let (status, answer) = h
        .put(
            "/api/v1/templates/promo/locales/en",
            &json!({ "text": "Hi", "body": "Hi" }),
        )
        .await;
    assert_unknown(status, &answer, "body");
    let (status, _) = h.get("/api/v1/templates/promo").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no template was stored");

    // Receipts stay open: a provider's webhook may carry fields of its own, and a receipt refused
    // with a 4xx is not sent again. This one is answered for its unknown notification.
    let (status, answer) = h
        .post(
            "/api/v1/providers/smtp/callbacks",
            &json!({ "notification_id": uuid::Uuid::now_v7(), "event": "bounced", "reason": "550" }),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A body of the wrong shape (an unknown enum value, a missing required field) is a 400 whose
/// message names the type at fault, as the README's error table says; poem-openapi's parser does
/// not tell which field held it, so `field` is absent rather than guessed. Nothing is stored.
#[tokio::test]
async fn a_send_of_the_wrong_shape_is_refused_naming_the_type() {
    let w = world().await;
    let h = &w.herald;
    for (body, named) in [
        (
            json!({
                "recipient": { "email": "ada@example.com" },
                "category": "gossip",
                "content": { "text": "Psst" }
            }),
            "Category",
        ),
        (
            json!({ "category": "account", "content": { "text": "Hi" } }),
            "Recipient",
        ),
    ] {
        let (status, answer) = h.send(&body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["code"], "invalid_request", "{answer}");
        assert!(answer.get("field").is_none_or(Value::is_null), "{answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("\"{named}\"")), "{answer}");
    }
    assert_eq!(notifications(h).await, 0, "nothing stored");
}
