//! The production API end to end: API keys (401 vs 403, CLI-created and revoked keys), history
//! with filters and cursor pagination, stats, provider delivery receipts (and which receipts are
//! refused), and dead-letter listing and replay.

use std::collections::HashSet;
use std::time::Duration;

use herald_actors::channel::telegram::TelegramConfig;
use herald_tests::{
    E2E_TIMEOUT, NatsServer, SmtpSink, TestDatabase, TestHerald, eventually, status_events,
    test_config,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

struct World {
    nats: NatsServer,
    smtp: SmtpSink,
    _db: TestDatabase,
    herald: TestHerald,
}

async fn world_with(tune: impl FnOnce(&mut herald_engine::Config)) -> World {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let mut config = test_config(&nats, &db, &smtp);
    tune(&mut config);
    let herald = TestHerald::start(config).await.expect("herald starts");
    World {
        nats,
        smtp,
        _db: db,
        herald,
    }
}

async fn world() -> World {
    world_with(|_| {}).await
}

fn email(to: &str, customer: Option<&str>, category: &str) -> Value {
    json!({
        "recipient": { "email": to, "customer_id": customer },
        "category": category,
        "channels": ["email"],
        "content": { "subject": "Hello", "text": "Hello there." }
    })
}

async fn new_key(herald: &TestHerald, name: &str, scopes: &str) -> String {
    herald_engine::apikey::create(herald.db(), name, scopes)
        .await
        .expect("key created")
        .token
}

#[tokio::test]
async fn keys_are_required_and_scoped_401_vs_403() {
    let w = world().await;
    let h = &w.herald;
    let list = "/api/v1/notifications";
    let body = email("ada@example.com", None, "transactional");

    // No key, a malformed key, a well-formed unknown key: 401 in the error shape.
    let unknown = format!("hk_{}_{}", "0".repeat(16), "0".repeat(64));
    for key in [None, Some("nonsense"), Some(unknown.as_str())] {
        let (status, answer) = h.request_with_key(Method::GET, list, key, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}: {answer}");
        assert_eq!(answer["code"], "unauthorized", "{answer}");
        assert!(answer["message"].is_string());
    }
    let (status, _) = h
        .request_with_key(Method::POST, list, None, Some(&body))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A key created by the CLI's logic works within its scopes, and only there: 403.
    let reader = new_key(h, "dashboard", "read").await;
    let sender = new_key(h, "shop backend", "send").await;
    let (status, _) = h
        .request_with_key(Method::GET, list, Some(&reader), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = h
        .request_with_key(Method::POST, list, Some(&reader), Some(&body))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert_eq!(answer["code"], "forbidden");
    assert!(
        answer["message"]
            .as_str()
            .unwrap_or_default()
            .contains("send")
    );
    let (status, _) = h
        .request_with_key(Method::POST, list, Some(&sender), Some(&body))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = h
        .request_with_key(Method::GET, list, Some(&sender), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = h
        .request_with_key(Method::POST, "/api/v1/dlq/1/replay", Some(&reader), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "replay needs admin");
    // A wrong secret for an existing prefix is unknown, not forbidden.
    let forged = format!("{}{}", &reader[..reader.len() - 1], "0");
    let forged = if forged == reader {
        format!("{}{}", &reader[..reader.len() - 1], "1")
    } else {
        forged
    };
    let (status, _) = h
        .request_with_key(Method::GET, list, Some(&forged), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // A key's prefix is public: a wrong secret with it does not make an unused key look used.
    let unused = new_key(h, "never used", "read").await;
    let unused_prefix = unused.split('_').nth(1).expect("prefix").to_string();
    let wrong_secret = format!("hk_{unused_prefix}_{}", "0".repeat(64));
    let (status, _) = h
        .request_with_key(Method::GET, list, Some(&wrong_secret), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let last_used = async |prefix: &str| {
        herald_entities::repo::api_keys::find_by_prefix(h.db(), prefix)
            .await
            .expect("key read")
            .expect("key stored")
            .last_used_at
    };
    // A use is recorded beside the request, not before its answer: a real use of another key,
    // made after the forged one, is awaited first, so a forged use would have had its turn too.
    let witness = new_key(h, "witness", "read").await;
    let witness_prefix = witness.split('_').nth(1).expect("prefix").to_string();
    let (status, _) = h
        .request_with_key(Method::GET, list, Some(&witness), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually(
        "the witness key's use to be recorded",
        E2E_TIMEOUT,
        || async { last_used(&witness_prefix).await },
    )
    .await;
    assert_eq!(
        last_used(&unused_prefix).await,
        None,
        "a forged use recorded"
    );
    let (status, _) = h
        .request_with_key(Method::GET, list, Some(&unused), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("a real use to be recorded", E2E_TIMEOUT, || async {
        last_used(&unused_prefix).await
    })
    .await;

    // Revoked by the CLI's logic (by prefix): refused once the short cache period is over.
    let prefix = reader.split('_').nth(1).expect("prefix").to_string();
    herald_engine::apikey::revoke(h.db(), &prefix)
        .await
        .expect("revoked");
    assert!(
        herald_engine::apikey::revoke(h.db(), &prefix)
            .await
            .is_err(),
        "revoking twice says so"
    );
    eventually(
        "the revoked key to be refused",
        Duration::from_secs(10),
        || async {
            let (status, _) = h
                .request_with_key(Method::GET, list, Some(&reader), None)
                .await;
            (status == StatusCode::UNAUTHORIZED).then_some(())
        },
    )
    .await;
    let (status, _) = h
        .request_with_key(Method::GET, list, Some(&sender), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "other keys are untouched");

    // Health, metrics and the spec stay open.
    for open in [
        "/health",
        "/health/ready",
        "/metrics",
        "/api/openapi.json",
        "/api/docs",
    ] {
        let response = h
            .anonymous()
            .get(format!("{}{open}", h.base()))
            .send()
            .await
            .expect("open route");
        assert_eq!(response.status(), StatusCode::OK, "{open} is open");
    }

    let metrics = h
        .anonymous()
        .get(format!("{}/metrics", h.base()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("herald_queue_pending_commands"),
        "queue depth is exported: {metrics}"
    );

    // The spec documents the scheme on every /api/v1 operation, with 401 and 403 answers.
    let (_, spec) = h.get("/api/openapi.json").await;
    assert_eq!(
        spec["components"]["securitySchemes"]["ApiKey"]["scheme"],
        "bearer"
    );
    let paths = spec["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("path item") {
            if path == "/api/v1/providers/twilio/status" {
                // Twilio cannot send a key: its callbacks are authenticated by their signature.
                operations += 1;
                assert!(operation.get("security").is_none(), "{method} {path}");
                let signature = operation["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"] == "X-Twilio-Signature");
                assert_eq!(
                    signature.map(|p| p["in"].clone()),
                    Some(json!("header")),
                    "{method} {path} declares Twilio's signature: {operation}"
                );
                assert!(
                    operation["responses"].get("403").is_some(),
                    "{method} {path} documents 403"
                );
            } else if path.starts_with("/api/v1") {
                operations += 1;
                assert_eq!(
                    operation["security"],
                    json!([{ "ApiKey": [] }]),
                    "{method} {path} declares the key"
                );
                for code in ["401", "403"] {
                    assert!(
                        operation["responses"].get(code).is_some(),
                        "{method} {path} documents {code}"
                    );
                }
            } else {
                assert!(operation.get("security").is_none(), "{path} is open");
            }
        }
    }
    assert!(operations >= 8, "{operations} operations under /api/v1");
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn history_filters_and_cursor_pages_visit_every_row_once() {
    let w = world().await;
    let h = &w.herald;
    let mut a_ids = Vec::new();
    for i in 0..7 {
        a_ids.push(
            h.send_accepted(&email(
                &format!("a{i}@example.com"),
                Some("cust-a"),
                "transactional",
            ))
            .await,
        );
    }
    let mut b_ids = Vec::new();
    for i in 0..3 {
        b_ids.push(
            h.send_accepted(&email(
                &format!("b{i}@example.com"),
                Some("cust-b"),
                "marketing",
            ))
            .await,
        );
    }
    for id in a_ids.iter().chain(&b_ids) {
        h.wait_status(id, "sent").await;
    }

    // Pages of 3 over customer A: every notification exactly once, newest first.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 10, "pagination terminates");
        let mut path = "/api/v1/notifications?customer_id=cust-a&limit=3".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = h.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 3);
        for item in items {
            assert_eq!(item["customer_id"], "cust-a");
            seen.push(item["id"].as_str().expect("id").to_string());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3, "7 rows in pages of 3");
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no row twice: {seen:?}");
    let expected: HashSet<&String> = a_ids.iter().collect();
    assert_eq!(unique, expected, "every row of customer A");
    let mut newest_first = a_ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first, "newest first (UUIDv7 order)");

    // Filters.
    let count = |path: String| async move {
        let (status, page) = h.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {page}");
        page["items"].as_array().expect("items").len()
    };
    assert_eq!(
        count("/api/v1/notifications?category=marketing".into()).await,
        3
    );
    assert_eq!(
        count("/api/v1/notifications?status=sent&channel=email&limit=500".into()).await,
        10
    );
    assert_eq!(count("/api/v1/notifications?status=failed".into()).await, 0);
    assert_eq!(
        count("/api/v1/notifications?customer_id=cust-b&category=transactional".into()).await,
        0
    );
    let (_, first) = h.get(&format!("/api/v1/notifications/{}", a_ids[0])).await;
    let created: chrono::DateTime<chrono::Utc> = first["created_at"]
        .as_str()
        .expect("created_at")
        .parse()
        .expect("time");
    let from = (created + chrono::Duration::microseconds(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let from = from.replace('+', "%2B");
    assert_eq!(
        count(format!(
            "/api/v1/notifications?customer_id=cust-a&created_from={from}"
        ))
        .await,
        6,
        "created_from is inclusive of later rows only"
    );
    assert_eq!(
        count(format!(
            "/api/v1/notifications?customer_id=cust-a&created_to={from}"
        ))
        .await,
        1
    );

    // Bad parameters name the field.
    for (path, field) in [
        ("/api/v1/notifications?limit=501", "limit"),
        ("/api/v1/notifications?limit=0", "limit"),
        ("/api/v1/notifications?cursor=not-a-cursor", "cursor"),
        ("/api/v1/notifications?status=lost", "status"),
        (
            "/api/v1/notifications?created_from=2030-01-02T00:00:00Z&created_to=2030-01-01T00:00:00Z",
            "created_to",
        ),
        ("/api/v1/notifications?customer_id=a%00b", "customer_id"),
    ] {
        let (status, body) = h.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["code"], "invalid_request", "{path}: {body}");
        assert_eq!(body["field"], field, "{path}: {body}");
    }
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn stats_match_what_was_sent() {
    let w = world().await;
    let h = &w.herald;
    let start = chrono::Utc::now() - chrono::Duration::seconds(1);
    w.smtp.set_reject_next(1, 550, "5.1.1 no such user");
    let failed = h
        .send_accepted(&email("nobody@example.com", None, "transactional"))
        .await;
    h.wait_status(&failed, "failed").await;
    let mut sent = Vec::new();
    for i in 0..4 {
        sent.push(
            h.send_accepted(&email(&format!("s{i}@example.com"), None, "account"))
                .await,
        );
    }
    for id in &sent {
        h.wait_status(id, "sent").await;
    }
    let from = start
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .replace('+', "%2B");
    let (status, stats) = h
        .get(&format!("/api/v1/notifications/stats?from={from}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["total"], 5, "{stats}");
    let by_status = |name: &str| {
        stats["by_status"]
            .as_array()
            .expect("by_status")
            .iter()
            .find(|s| s["status"] == name)
            .map(|s| s["count"].as_i64().unwrap_or(-1))
    };
    assert_eq!(by_status("sent"), Some(4));
    assert_eq!(by_status("failed"), Some(1));
    assert_eq!(by_status("dead"), Some(0), "every status is listed");
    assert_eq!(stats["success_rate"], 0.8);
    assert_eq!(
        stats["by_channel"],
        json!([{ "channel": "email", "sent": 4, "delivered": 0, "failed": 0 }])
    );
    assert_eq!(stats["latency"]["sample_size"], 4);
    let p50 = stats["latency"]["p50_ms"].as_i64().expect("p50");
    let p95 = stats["latency"]["p95_ms"].as_i64().expect("p95");
    assert!(0 <= p50 && p50 <= p95 && p95 < 30_000, "{stats}");

    // A range before everything is empty.
    let (_, empty) = h
        .get("/api/v1/notifications/stats?from=2020-01-01T00:00:00Z&to=2020-01-02T00:00:00Z")
        .await;
    assert_eq!(empty["total"], 0);
    assert!(empty["success_rate"].is_null());
    assert!(empty["latency"]["p50_ms"].is_null());
    let (status, body) = h
        .get("/api/v1/notifications/stats?from=2020-01-02T00:00:00Z&to=2020-01-01T00:00:00Z")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "to");
    w.herald.shutdown().await.expect("shutdown");
}

/// A range that selects nothing is refused naming the field the caller sent: `from` alone in the
/// future was refused as "to must not be before from", `to` having been left to default to now;
/// and a dead-letter list or replay over an empty range scanned up to 10 000 entries, one NATS
/// request each, to return nothing.
#[tokio::test]
async fn empty_time_ranges_are_refused_naming_the_field_sent() {
    let w = world().await;
    let h = &w.herald;
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (status, body) = h
        .get(&format!("/api/v1/notifications/stats?from={tomorrow}"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "from", "{body}");
    assert_eq!(
        body["message"], "from must not be after to, which defaults to now",
        "{body}"
    );

    let day = "2026-01-01T00:00:00Z";
    for query in [
        format!("from={day}&to={day}"),
        format!("from={day}&to=2025-12-31T00:00:00Z"),
    ] {
        let (status, body) = h.get(&format!("/api/v1/dlq?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["code"], "invalid_request", "{body}");
        assert_eq!(body["field"], "to", "{body}");
        assert_eq!(body["message"], "to must be after from", "{body}");
    }
    let (status, body) = h
        .post("/api/v1/dlq/replay", &json!({ "from": day, "to": day }))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "to", "{body}");
    assert_eq!(body["message"], "to must be after from", "{body}");
    w.herald.shutdown().await.expect("shutdown");
}

async fn last_status_event(nats: &NatsServer, status: &str) -> Option<Value> {
    let client = nats.client().await.ok()?;
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("NOTIFY_STATUS").await.ok()?;
    let message = stream
        .get_last_raw_message_by_subject(&format!("notify.status.{status}"))
        .await
        .ok()?;
    serde_json::from_slice(&message.payload).ok()
}

#[tokio::test]
async fn a_receipt_moves_sent_to_delivered_and_publishes_the_event() {
    let w = world().await;
    let h = &w.herald;
    let provider_key = new_key(h, "smtp provider webhook", "callbacks").await;
    let callback = "/api/v1/providers/smtp/callbacks";

    let id = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    h.wait_status(&id, "sent").await;
    let receipt =
        json!({ "notification_id": id, "event": "delivered", "timestamp": "2030-01-01T00:00:00Z" });
    let (status, answer) = h
        .request_with_key(Method::POST, callback, Some(&provider_key), Some(&receipt))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "delivered");
    assert_eq!(answer["applied"], true);
    let (_, now) = h.get(&format!("/api/v1/notifications/{id}")).await;
    assert_eq!(now["status"], "delivered");
    let updated: chrono::DateTime<chrono::Utc> = now["updated_at"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("updated_at");
    assert!(
        updated <= chrono::Utc::now(),
        "a provider's clock ahead is not believed: {now}"
    );
    let event = eventually("the delivered event", E2E_TIMEOUT, || async {
        last_status_event(&w.nats, "delivered").await
    })
    .await;
    assert_eq!(event["notification_id"], id.as_str());
    assert_eq!(event["status"], "delivered");
    assert_eq!(event["channel"], "email");

    // A repeat changes nothing, and its event, published again, is the same event (JetStream
    // drops it as a duplicate: answered, the repeat was published); a bounce after delivery is
    // refused.
    let (status, again) = h
        .request_with_key(Method::POST, callback, Some(&provider_key), Some(&receipt))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["applied"], false);
    let uuid: uuid::Uuid = id.parse().expect("a notification id");
    let delivered = status_events(&w.nats, "delivered", uuid).await;
    assert_eq!(
        delivered.len(),
        1,
        "one transition, one event: {delivered:?}"
    );
    let bounce = json!({ "notification_id": id, "event": "bounced", "error": "550 mailbox gone" });
    let (status, body) = h
        .request_with_key(Method::POST, callback, Some(&provider_key), Some(&bounce))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "conflict");

    // A bounce named by the provider's message id fails a sent notification.
    let other = h
        .send_accepted(&email("bob@example.com", None, "transactional"))
        .await;
    let sent = h.wait_status(&other, "sent").await;
    let message_id = sent["attempts"][0]["provider_message_id"]
        .as_str()
        .expect("smtp message id")
        .to_string();
    let bounce = json!({ "provider_message_id": message_id, "event": "bounced", "error": "550 mailbox gone" });
    let (status, answer) = h
        .request_with_key(Method::POST, callback, Some(&provider_key), Some(&bounce))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["notification_id"], other.as_str());
    assert_eq!(answer["status"], "failed");
    let (_, failed) = h.get(&format!("/api/v1/notifications/{other}")).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"], "550 mailbox gone");
    let event = eventually("the failed event", E2E_TIMEOUT, || async {
        last_status_event(&w.nats, "failed").await
    })
    .await;
    assert_eq!(event["notification_id"], other.as_str());
    assert_eq!(event["error"], "550 mailbox gone");

    // A receipt is about a sent message: one for a notification waiting for its time
    // (`scheduled`, no send under way) is refused; one whose send may be under way is held.
    let mut later = email("cy@example.com", None, "transactional");
    later["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let scheduled = h.send_accepted(&later).await;
    let early = json!({ "notification_id": scheduled, "event": "bounced", "error": "550 gone" });
    let (status, body) = h
        .request_with_key(Method::POST, callback, Some(&provider_key), Some(&early))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, still) = h.get(&format!("/api/v1/notifications/{scheduled}")).await;
    assert_eq!(still["status"], "scheduled", "{still}");

    // Unknown provider, unknown notification, nothing named, wrong scope.
    let (status, _) = h
        .request_with_key(
            Method::POST,
            "/api/v1/providers/pigeon/callbacks",
            Some(&provider_key),
            Some(&receipt),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let stranger =
        json!({ "notification_id": "01a20513-0c86-7293-a642-1788284568f8", "event": "delivered" });
    let (status, _) = h
        .request_with_key(Method::POST, callback, Some(&provider_key), Some(&stranger))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = h
        .request_with_key(
            Method::POST,
            callback,
            Some(&provider_key),
            Some(&json!({ "event": "delivered" })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "notification_id");
    let sender = new_key(h, "shop", "send").await;
    let (status, _) = h
        .request_with_key(Method::POST, callback, Some(&sender), Some(&receipt))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The receipt-only key cannot send.
    let (status, _) = h
        .request_with_key(
            Method::POST,
            "/api/v1/notifications",
            Some(&provider_key),
            Some(&email("x@example.com", None, "transactional")),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    w.herald.shutdown().await.expect("shutdown");
}

/// A receipt's provider was looked up by asking every channel actor for a snapshot: one that did
/// not answer (stopped, restarting after a panic, busy) was left out, and its provider's receipts
/// were refused 404 — which providers do not send again, so the bounce was lost. The provider is
/// now checked against the configured ones, without asking any actor.
#[tokio::test]
async fn a_receipt_is_taken_while_its_channel_actor_cannot_answer() {
    let w = world().await;
    let h = &w.herald;
    let key = new_key(h, "smtp provider webhook", "callbacks").await;
    let id = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    h.wait_status(&id, "sent").await;

    // The engine's root supervisor fails, taking the channel actors with it; the API goes on.
    let email = h
        .app()
        .channels()
        .get(herald_nats::Channel::Email)
        .expect("the email actor");
    let mut root = email.get_cell();
    while let Some(supervisor) = root.try_get_supervisor() {
        root = supervisor;
    }
    root.kill();
    tokio::time::timeout(Duration::from_secs(10), h.app().engine_stopped())
        .await
        .expect("the engine stops within 10 s");
    eventually("the email actor to stop", E2E_TIMEOUT, || async {
        (email.get_status() == ractor::ActorStatus::Stopped).then_some(())
    })
    .await;

    let bounce = json!({ "notification_id": id, "event": "bounced", "error": "550 mailbox gone" });
    let (status, body) = h
        .request_with_key(
            Method::POST,
            "/api/v1/providers/smtp/callbacks",
            Some(&key),
            Some(&bounce),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "failed");
    assert_eq!(body["applied"], true);
    // A provider that is not configured is still unknown.
    let (status, body) = h
        .request_with_key(
            Method::POST,
            "/api/v1/providers/telegram/callbacks",
            Some(&key),
            Some(&bounce),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    w.herald.shutdown().await.expect("shutdown");
}

/// Only a receipt dated in the future was clamped: one dated before the send (a provider's zero
/// time, a replayed webhook, a clock behind) dated the change before `sent_at`, so retention,
/// which counts from `updated_at`, purged the row at its next run, and the status event came
/// before the `sent` one. A receipt's time is now at least when the notification was sent.
#[tokio::test]
async fn a_receipt_dated_before_the_send_is_dated_at_the_send() {
    let w = world().await;
    let h = &w.herald;
    let key = new_key(h, "smtp provider webhook", "callbacks").await;
    let id = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    let sent = h.wait_status(&id, "sent").await;
    let time = |row: &Value, field: &str| -> chrono::DateTime<chrono::Utc> {
        row[field]
            .as_str()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{field} in {row}"))
    };
    let sent_at = time(&sent, "sent_at");

    let receipt =
        json!({ "notification_id": id, "event": "delivered", "timestamp": "1970-01-01T00:00:00Z" });
    let (status, body) = h
        .request_with_key(
            Method::POST,
            "/api/v1/providers/smtp/callbacks",
            Some(&key),
            Some(&receipt),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["applied"], true);
    let (_, now) = h.get(&format!("/api/v1/notifications/{id}")).await;
    assert_eq!(now["status"], "delivered", "{now}");
    assert!(
        time(&now, "updated_at") >= sent_at,
        "a receipt is not dated before the send: {now}"
    );
    let uuid: uuid::Uuid = id.parse().expect("a notification id");
    let delivered = status_events(&w.nats, "delivered", uuid).await;
    let at: Vec<chrono::DateTime<chrono::Utc>> =
        delivered.iter().map(|event| time(event, "at")).collect();
    assert!(
        !at.is_empty() && at.iter().all(|at| *at >= sent_at),
        "the delivered event is not dated before the send: {delivered:?}"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// A world with a Telegram provider besides SMTP: a local fake of the Bot API that accepts every
/// message as `message_id` 9 (Telegram's ids are unique only per chat), except to chat
/// `BLOCKED_CHAT`, which it refuses for good.
async fn world_with_telegram() -> (World, MockServer) {
    let telegram = MockServer::start().await;
    let send_message = || Mock::given(method("POST")).and(path("/bot42:TESTTOKEN/sendMessage"));
    send_message()
        .and(body_partial_json(json!({ "chat_id": BLOCKED_CHAT })))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({
            "ok": false, "error_code": 403, "description": "Forbidden: bot was blocked by the user"
        })))
        .with_priority(1)
        .mount(&telegram)
        .await;
    send_message()
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"ok": true, "result": {"message_id": 9}})),
        )
        .mount(&telegram)
        .await;
    let base_url = telegram.uri();
    let w = world_with(|config| {
        config.channels.telegram = Some(TelegramConfig {
            base_url,
            bot_token: "42:TESTTOKEN".into(),
            timeout_ms: 2_000,
            ..TelegramConfig::default()
        });
    })
    .await;
    (w, telegram)
}

/// The chat the Telegram fake of [`world_with_telegram`] refuses.
const BLOCKED_CHAT: &str = "666";

fn telegram_message(chat: &str) -> Value {
    json!({
        "recipient": { "telegram_chat_id": chat },
        "category": "transactional",
        "channels": ["telegram"],
        "content": { "text": "Your order #1001 is on its way." }
    })
}

fn message_of(body: &Value) -> &str {
    body["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_receipt_from_a_provider_that_did_not_send_the_notification_is_refused() {
    let (w, _telegram) = world_with_telegram().await;
    let h = &w.herald;
    let key = new_key(h, "provider webhooks", "callbacks").await;
    let email_id = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    let telegram_id = h.send_accepted(&telegram_message("4242")).await;
    h.wait_status(&email_id, "sent").await;
    h.wait_status(&telegram_id, "sent").await;

    // Telegram reporting a bounce of the email, SMTP a delivery of the Telegram message: 409,
    // and neither notification changes.
    let bounce = json!({ "notification_id": email_id, "event": "bounced", "error": "550 gone" });
    let (status, body) = h
        .request_with_key(
            Method::POST,
            "/api/v1/providers/telegram/callbacks",
            Some(&key),
            Some(&bounce),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "conflict");
    assert!(message_of(&body).contains("smtp"), "{body}");
    let delivered = json!({ "notification_id": telegram_id, "event": "delivered" });
    let (status, body) = h
        .request_with_key(
            Method::POST,
            "/api/v1/providers/smtp/callbacks",
            Some(&key),
            Some(&delivered),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(message_of(&body).contains("telegram"), "{body}");
    let (_, email_now) = h.get(&format!("/api/v1/notifications/{email_id}")).await;
    assert_eq!(email_now["status"], "sent", "{email_now}");
    assert!(email_now["error"].is_null(), "{email_now}");
    let (_, telegram_now) = h.get(&format!("/api/v1/notifications/{telegram_id}")).await;
    assert_eq!(telegram_now["status"], "sent", "{telegram_now}");

    // From the provider that sent it, the same receipt applies.
    let (status, body) = h
        .request_with_key(
            Method::POST,
            "/api/v1/providers/smtp/callbacks",
            Some(&key),
            Some(&bounce),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "failed");
    assert_eq!(body["applied"], true);
    let (status, body) = h
        .request_with_key(
            Method::POST,
            "/api/v1/providers/telegram/callbacks",
            Some(&key),
            Some(&delivered),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "delivered");
    assert_eq!(body["applied"], true);
    w.herald.shutdown().await.expect("shutdown");
}

/// A `callbacks` key bound to a provider (`herald apikey create --scopes callbacks --provider P`)
/// posts that provider's receipts only: one for another provider is refused with 403 naming the
/// key's provider and changes nothing. A key without a binding posts for every provider.
#[tokio::test]
async fn a_callbacks_key_bound_to_a_provider_posts_only_that_providers_receipts() {
    let (w, _telegram) = world_with_telegram().await;
    let h = &w.herald;
    let smtp_key = herald_engine::apikey::create_with_provider(
        h.db(),
        "smtp webhook",
        "callbacks",
        Some("smtp"),
    )
    .await
    .expect("key bound to smtp")
    .token;
    let email_id = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    let telegram_id = h.send_accepted(&telegram_message("4242")).await;
    h.wait_status(&email_id, "sent").await;
    h.wait_status(&telegram_id, "sent").await;

    // SMTP's key marking the Telegram message delivered, or posting for a provider Herald does
    // not have: 403 naming the key's provider; nothing changes.
    let delivered = json!({ "notification_id": telegram_id, "event": "delivered" });
    for provider in ["telegram", "pigeon"] {
        let (status, body) = h
            .request_with_key(
                Method::POST,
                &format!("/api/v1/providers/{provider}/callbacks"),
                Some(&smtp_key),
                Some(&delivered),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{provider}: {body}");
        assert_eq!(body["code"], "forbidden", "{body}");
        assert!(message_of(&body).contains("\"smtp\""), "{body}");
    }
    let (_, telegram_now) = h.get(&format!("/api/v1/notifications/{telegram_id}")).await;
    assert_eq!(telegram_now["status"], "sent", "{telegram_now}");

    // Its own provider's receipt applies.
    let bounce = json!({ "notification_id": email_id, "event": "bounced", "error": "550 gone" });
    let (status, body) = h
        .request_with_key(
            Method::POST,
            "/api/v1/providers/smtp/callbacks",
            Some(&smtp_key),
            Some(&bounce),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "failed");

    // A key without a binding still posts for every provider.
    let any = new_key(h, "provider webhooks", "callbacks").await;
    let (status, body) = h
        .request_with_key(
            Method::POST,
            "/api/v1/providers/telegram/callbacks",
            Some(&any),
            Some(&delivered),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "delivered");

    // Only a callbacks-only key is bound, and only to a provider Herald knows.
    for (scopes, provider) in [
        ("send,callbacks", "smtp"),
        ("admin", "smtp"),
        ("callbacks", "pigeon"),
    ] {
        let refused =
            herald_engine::apikey::create_with_provider(h.db(), "bad", scopes, Some(provider))
                .await;
        assert!(refused.is_err(), "{scopes} for {provider}");
    }
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_provider_message_id_of_several_notifications_is_refused_as_ambiguous() {
    let (w, _telegram) = world_with_telegram().await;
    let h = &w.herald;
    let key = new_key(h, "telegram webhook", "callbacks").await;
    let callback = "/api/v1/providers/telegram/callbacks";
    let first = h.send_accepted(&telegram_message("4242")).await;
    let second = h.send_accepted(&telegram_message("4343")).await;
    for id in [&first, &second] {
        let sent = h.wait_status(id, "sent").await;
        assert_eq!(sent["attempts"][0]["provider_message_id"], "9", "{sent}");
    }

    let bounce = json!({ "provider_message_id": "9", "event": "bounced", "error": "chat gone" });
    let (status, body) = h
        .request_with_key(Method::POST, callback, Some(&key), Some(&bounce))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "conflict");
    assert!(message_of(&body).contains("notification_id"), "{body}");
    for id in [&first, &second] {
        let (_, now) = h.get(&format!("/api/v1/notifications/{id}")).await;
        assert_eq!(now["status"], "sent", "{now}");
    }

    // Named by Herald's id, the bounce applies to that notification alone; its repeat changes
    // nothing.
    let bounce = json!({ "notification_id": second, "event": "bounced", "error": "chat gone" });
    for applied in [true, false] {
        let (status, body) = h
            .request_with_key(Method::POST, callback, Some(&key), Some(&bounce))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "failed");
        assert_eq!(body["applied"], applied, "{body}");
    }
    let (_, untouched) = h.get(&format!("/api/v1/notifications/{first}")).await;
    assert_eq!(untouched["status"], "sent", "{untouched}");
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_receipt_for_a_notification_that_was_never_sent_is_refused() {
    let (w, _telegram) = world_with_telegram().await;
    let h = &w.herald;
    let key = new_key(h, "telegram webhook", "callbacks").await;
    let callback = "/api/v1/providers/telegram/callbacks";
    let id = h.send_accepted(&telegram_message(BLOCKED_CHAT)).await;
    let failed = h.wait_status(&id, "failed").await;
    assert_eq!(failed["attempts"][0]["provider"], "telegram", "{failed}");
    assert_eq!(failed["attempts"][0]["status"], "rejected", "{failed}");
    assert!(failed["sent_at"].is_null(), "{failed}");

    for event in ["bounced", "failed", "delivered"] {
        let receipt = json!({ "notification_id": id, "event": event, "error": "late bounce" });
        let (status, body) = h
            .request_with_key(Method::POST, callback, Some(&key), Some(&receipt))
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{event}: {body}");
        assert_eq!(body["code"], "conflict");
        assert!(message_of(&body).contains("never sent"), "{event}: {body}");
    }
    let (_, now) = h.get(&format!("/api/v1/notifications/{id}")).await;
    assert_eq!(now["status"], "failed", "{now}");
    assert_eq!(
        now["error"], failed["error"],
        "the receipt changed nothing: {now}"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// A world whose sends die after two rounds, with a circuit that cools down quickly.
/// A send naming only channels no provider is configured for could only fail (every attempt
/// `unavailable`): it is refused with the channels that are configured. A chain with one
/// configured channel is accepted and fails over to it.
#[tokio::test]
async fn a_send_over_channels_without_a_provider_is_refused() {
    let w = world().await;
    let h = &w.herald;
    let to = |channels: Value| {
        json!({
            "recipient": { "email": "ada@example.com", "phone": "+4915112345678" },
            "category": "transactional",
            "channels": channels,
            "content": { "subject": "Hello", "text": "Hello there." }
        })
    };
    let (status, refused) = h.send(&to(json!(["push", "sms"]))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "channels", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .ends_with("configured: email"),
        "{refused}"
    );
    let (status, refused) = h
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "recipients": [{ "email": "ada@example.com" }],
                "category": "marketing",
                "channels": ["telegram"],
                "content": { "text": "Winter sale" }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "channels", "{refused}");

    let id = h.send_accepted(&to(json!(["sms", "email"]))).await;
    let sent = h.wait_status(&id, "sent").await;
    assert_eq!(sent["final_channel"], "email", "{sent}");
    w.herald.shutdown().await.expect("shutdown");
}

/// A text within its own limit that JSON escaping makes too large for a send command is refused,
/// by single and bulk sends alike, before anything is stored: a dispatcher would dead-letter such
/// a command unread and the notification would stay `queued`.
#[tokio::test]
async fn content_too_large_as_a_command_is_refused_and_nothing_is_stored() {
    let w = world().await;
    let h = &w.herald;
    // Each field within its 256 KiB; as JSON, each line break and quote takes two bytes.
    let content = json!({
        "text": format!("{}x", "\n".repeat(200_000)),
        "html": "\"".repeat(200_000),
    });
    let limit = format!("the limit is {}", herald_nats::MAX_COMMAND_BYTES);
    let refused_for_size = |status: StatusCode, refused: &Value| {
        assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
        assert_eq!(refused["field"], "content", "{refused}");
        let message = refused["message"].as_str().unwrap_or_default();
        assert!(message.contains(&limit), "{refused}");
    };
    let (status, refused) = h
        .send(&json!({
            "recipient": { "email": "ada@example.com", "customer_id": "too-big" },
            "category": "transactional",
            "content": content,
        }))
        .await;
    refused_for_size(status, &refused);
    for target in [
        json!({ "recipients": [{ "email": "ada@example.com", "customer_id": "too-big" }] }),
        json!({ "filter": { "external_id_prefix": "too-big" } }),
    ] {
        let mut bulk = json!({ "category": "marketing", "content": content });
        if let (Some(bulk), Some(target)) = (bulk.as_object_mut(), target.as_object()) {
            bulk.extend(target.clone());
        }
        let (status, refused) = h.post("/api/v1/notifications/bulk", &bulk).await;
        refused_for_size(status, &refused);
    }
    let (status, page) = h.get("/api/v1/notifications?customer_id=too-big").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"], json!([]), "nothing stored: {page}");

    // The same text without the characters JSON escapes goes out.
    let id = h
        .send_accepted(&json!({
            "recipient": { "email": "ada@example.com", "customer_id": "too-big" },
            "category": "transactional",
            "content": { "text": "x".repeat(200_000), "html": "y".repeat(200_000) },
        }))
        .await;
    h.wait_status(&id, "sent").await;
    w.herald.shutdown().await.expect("shutdown");
}

/// A send whose command is within Herald's limit but larger than the NATS server's `max_payload`
/// is refused with 413 naming `max_payload` and the sizes, and nothing is stored: the server
/// refuses it however often it is tried, so a 503 ("retry later") would have the client retry it
/// for ever. So is a scheduled one, and a bulk send of which some recipient's command could be,
/// at acceptance rather than failing once published; the spec says so for both endpoints.
#[tokio::test]
async fn a_send_larger_than_the_nats_server_takes_is_refused_with_413() {
    let nats = NatsServer::start_with_config("max_payload: 65536", &[])
        .await
        .expect("nats-server starts");
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald starts");
    let refused_for_max_payload = |status: StatusCode, refused: &Value| {
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{refused}");
        assert_eq!(refused["code"], "payload_too_large", "{refused}");
        let message = refused["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("max_payload") && message.contains("65536"),
            "names the server's limit: {refused}"
        );
    };
    let mut send = email("ada@example.com", Some("c-large"), "transactional");
    send["content"]["text"] = json!("x".repeat(80_000));
    send["request_id"] = json!("large-1");
    let (status, refused) = herald.send(&send).await;
    refused_for_max_payload(status, &refused);
    // A scheduled one would be published only when due: it is refused now, not failed then.
    send["request_id"] = json!("large-3");
    send["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let (status, refused) = herald.send(&send).await;
    refused_for_max_payload(status, &refused);
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("bytes as a send command"),
        "the sizes: {refused}"
    );
    // So is a bulk send's, for listed recipients and for a filter.
    let content = json!({ "subject": "Sale", "text": "x".repeat(80_000) });
    for target in [
        json!({ "recipients": [{ "email": "a@example.com" }, { "email": "b@example.com" }] }),
        json!({ "filter": { "all_customers": true } }),
    ] {
        let mut bulk =
            json!({ "category": "marketing", "channels": ["email"], "content": content });
        if let (Some(bulk), Some(target)) = (bulk.as_object_mut(), target.as_object()) {
            bulk.extend(target.clone());
        }
        let (status, refused) = herald.post("/api/v1/notifications/bulk", &bulk).await;
        refused_for_max_payload(status, &refused);
    }
    assert_eq!(stored_rows(&herald).await, (0, 0), "nothing stored");
    // A send the server takes goes out as usual, scheduled or not, and so does a bulk send.
    send["content"]["text"] = json!("x".repeat(1_000));
    send["request_id"] = json!("large-2");
    send["scheduled_at"] = Value::Null;
    let id = herald.send_accepted(&send).await;
    herald.wait_status(&id, "sent").await;
    send["request_id"] = json!("large-4");
    send["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::seconds(1)).to_rfc3339());
    let id = herald.send_accepted(&send).await;
    herald.wait_status(&id, "sent").await;
    let (status, bulk) = herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "category": "marketing",
                "channels": ["email"],
                "recipients": [{ "email": "a@example.com" }],
                "content": { "subject": "Sale", "text": "x".repeat(1_000) },
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{bulk}");
    let batch = bulk["batch_id"].as_str().expect("batch_id").to_string();
    batch_ends(&herald, &batch, json!([{ "status": "sent", "count": 1 }])).await;
    assert_eq!(smtp.count(), 3, "the sends the server took went out");
    let (_, spec) = herald.get("/api/openapi.json").await;
    for path in ["/api/v1/notifications", "/api/v1/notifications/bulk"] {
        let declared = &spec["paths"][path]["post"]["responses"]["413"]["description"];
        assert!(
            declared
                .as_str()
                .unwrap_or_default()
                .contains("max_payload"),
            "{path} documents the 413 for max_payload: {declared}"
        );
    }
    herald.shutdown().await.expect("shutdown");
}

/// A scheduled send, or a bulk send, accepted while the NATS server took its commands, and
/// published only after the server was replaced by one with a lower `max_payload`: the
/// notifications end `failed` with a reason naming `max_payload` instead of being tried again
/// every round, and the batch finishes.
#[tokio::test]
async fn a_scheduled_or_bulk_send_larger_than_a_lowered_max_payload_fails_when_published() {
    let mut nats = NatsServer::start_with_config("max_payload: 1048576", &[])
        .await
        .expect("nats-server starts");
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald starts");
    // Accepted while NATS is away (they are only stored), so that nothing is published before
    // the server comes back with the lower limit.
    nats.stop().await.expect("nats stopped");
    let mut send = email("ada@example.com", Some("c-large"), "transactional");
    send["content"]["text"] = json!("x".repeat(80_000));
    send["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::seconds(1)).to_rfc3339());
    let id = herald.send_accepted(&send).await;
    let (status, bulk) = herald
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "category": "marketing",
                "channels": ["email"],
                "recipients": [{ "email": "a@example.com" }, { "email": "b@example.com" }],
                "content": { "subject": "Sale", "text": "x".repeat(80_000) },
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{bulk}");
    let batch = bulk["batch_id"].as_str().expect("batch_id").to_string();
    std::fs::write(nats.file("nats.conf"), "max_payload: 65536").expect("config rewritten");
    nats.restart()
        .await
        .expect("nats back with a lower max_payload");
    let failed = herald.wait_status(&id, "failed").await;
    let reason = failed["status_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("max_payload") && reason.contains("65536"),
        "names the server's limit: {failed}"
    );
    batch_ends(&herald, &batch, json!([{ "status": "failed", "count": 2 }])).await;
    assert_eq!(smtp.count(), 0, "nothing the server refuses went out");
    herald.shutdown().await.expect("shutdown");
}

/// Waits until batch `batch` is `done` with its notifications' `counts`.
async fn batch_ends(herald: &TestHerald, batch: &str, counts: Value) {
    eventually(
        &format!("batch {batch} to finish with {counts}"),
        E2E_TIMEOUT,
        || async {
            let (_, json) = herald.get(&format!("/api/v1/batches/{batch}")).await;
            (json["status"] == "done" && json["counts"] == counts).then_some(())
        },
    )
    .await;
}

/// Request ids beginning `event:` are the Router's (event and rule): a caller's send may not take
/// one, or the event's own notification would be taken for a repeat and never made.
#[tokio::test]
async fn a_request_id_of_the_router_s_shape_is_refused() {
    let w = world().await;
    let mut send = email("ada@example.com", None, "transactional");
    send["request_id"] = json!(format!("event:{}:order_created", uuid::Uuid::now_v7()));
    let (status, refused) = w.herald.send(&send).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "request_id", "{refused}");
    let key = format!("event:{}:order_created", uuid::Uuid::now_v7());
    let in_header = email("ada@example.com", None, "transactional").to_string();
    let (status, refused) = post_raw(&w.herald, "/api/v1/notifications", &key, &in_header).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "Idempotency-Key", "the header: {refused}");
    send["request_id"] = json!("order-42:event:placed");
    w.herald.send_accepted(&send).await;
    w.herald.shutdown().await.expect("shutdown");
}

/// Notifications stored, and batches.
/// An order whose event is within the Router's limit but larger than the NATS server's
/// `max_payload` is refused with 413 and nothing is stored: stored, its event would wait in the
/// outbox for ever (the server refuses it however often it is published) and hold up every later
/// event of the order behind it, while the API answered 201.
#[tokio::test]
async fn an_order_whose_event_the_nats_server_would_refuse_is_refused_with_413() {
    use sea_orm::{EntityTrait, PaginatorTrait};
    let nats = NatsServer::start_with_config("max_payload: 65536", &[])
        .await
        .expect("nats-server starts");
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald starts");
    let (status, customer) = herald
        .post(
            "/api/v1/customers",
            &json!({ "id": "c-1", "email": "ada@example.com" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{customer}");
    let order = |number: &str, items: usize| {
        let item = json!({ "name": "t".repeat(1_000), "quantity": 1, "unit_price_minor": 100 });
        json!({ "order_number": number, "customer_id": "c-1", "total_minor": 100 * items,
                "currency": "EUR", "items": vec![item; items] })
    };
    let (status, refused) = herald.post("/api/v1/orders", &order("A-1", 100)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{refused}");
    assert_eq!(refused["code"], "payload_too_large", "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the order's event") && message.contains("max_payload of 65536"),
        "{refused}"
    );
    let (status, _) = herald.get("/api/v1/orders/A-1").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the order was not stored");
    let waiting = herald_entities::outbox_event::Entity::find()
        .count(herald.db())
        .await
        .expect("outbox counted");
    assert_eq!(waiting, 0, "no event waits in the outbox");
    // One the server takes is stored, and its event published.
    let (status, created) = herald.post("/api/v1/orders", &order("A-2", 10)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    // Published before the answer (nothing else of the order waits).
    use sea_orm::{ColumnTrait, QueryFilter};
    let unpublished = herald_entities::outbox_event::Entity::find()
        .filter(herald_entities::outbox_event::Column::PublishedAt.is_null())
        .count(herald.db())
        .await
        .expect("outbox counted");
    assert_eq!(unpublished, 0, "the order's event was published");
    herald.shutdown().await.expect("shutdown");
}

async fn stored_rows(herald: &TestHerald) -> (u64, u64) {
    use sea_orm::{EntityTrait, PaginatorTrait};
    let notifications = herald_entities::notification::Entity::find()
        .count(herald.db())
        .await
        .expect("notifications counted");
    let batches = herald_entities::batch::Entity::find()
        .count(herald.db())
        .await
        .expect("batches counted");
    (notifications, batches)
}

/// POSTs `body` as it is written (not re-serialised), with `Idempotency-Key: key`.
async fn post_raw(herald: &TestHerald, path: &str, key: &str, body: &str) -> (StatusCode, Value) {
    let response = herald
        .http()
        .post(format!("{}{path}", herald.base()))
        .header("Idempotency-Key", key)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path} failed: {e}"));
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `body` with the value at `pointer` replaced.
fn changed(body: &Value, pointer: &str, value: Value) -> Value {
    let mut changed = body.clone();
    *changed
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{pointer} in {body}")) = value;
    changed
}

fn assert_reused(status: StatusCode, refused: &Value, request: &Value) {
    assert_reused_as("request_id", status, refused, request);
}

/// A 422 `idempotency_key_reused` naming `field`, the one that carried the request id.
fn assert_reused_as(field: &str, status: StatusCode, refused: &Value, request: &Value) {
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{request}: {refused}"
    );
    assert_eq!(refused["code"], "idempotency_key_reused", "{refused}");
    assert_eq!(refused["field"], field, "{refused}");
}

/// A request id stands for one request. The same request again, however its JSON is written
/// (key order, spacing, spaces around a contact, the key in the header), answers the notification
/// stored first; a different request under the id (another text, recipient, category, channel
/// list or schedule) is refused with 422 `idempotency_key_reused`, and the first notification is
/// left as it was and sent once.
#[tokio::test]
async fn a_request_id_reused_for_a_different_send_is_refused_and_the_first_is_kept() {
    let w = world().await;
    let h = &w.herald;
    let first = json!({
        "request_id": "invoice-77",
        "recipient": { "email": "ada@example.com", "customer_id": "ada" },
        "category": "transactional",
        "channels": ["email"],
        "content": { "subject": "Invoice 77", "text": "Your invoice 77 is ready." }
    });
    let id = h.send_accepted(&first).await;

    let rewritten = r#"{ "content": {"text": "Your invoice 77 is ready.",
          "subject":    "Invoice 77"},
        "channels": [ "email" ], "category": "transactional",
        "recipient": {"customer_id": "ada", "email": "  ada@example.com "} }"#;
    let (status, again) = post_raw(h, "/api/v1/notifications", "invoice-77", rewritten).await;
    assert_eq!(status, StatusCode::OK, "the same request: {again}");
    assert_eq!(again["id"], id.as_str(), "{again}");

    let mut scheduled = first.clone();
    scheduled["scheduled_at"] =
        json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let mut default_chain = first.clone();
    default_chain["channels"] = Value::Null;
    for other in [
        changed(&first, "/content/text", json!("Your invoice 78 is ready.")),
        changed(&first, "/recipient/email", json!("grace@example.com")),
        changed(&first, "/category", json!("account")),
        changed(&first, "/channels", json!(["email", "sms"])),
        scheduled,
        default_chain,
    ] {
        let (status, refused) = h.send(&other).await;
        assert_reused(status, &refused, &other);
    }
    let other = changed(&first, "/content/subject", json!("Invoice 78"));
    let mut without_id = other.clone();
    without_id["request_id"] = Value::Null;
    let (status, refused) = post_raw(
        h,
        "/api/v1/notifications",
        "invoice-77",
        &without_id.to_string(),
    )
    .await;
    assert_reused_as("Idempotency-Key", status, &refused, &other);

    h.wait_status(&id, "sent").await;
    let id = uuid::Uuid::parse_str(&id).expect("a uuid");
    let stored = herald_entities::repo::notifications::find(h.db(), id)
        .await
        .expect("read")
        .expect("the first notification");
    assert_eq!(
        stored.content["text"], "Your invoice 77 is ready.",
        "{stored:?}"
    );
    assert_eq!(stored.recipient_key, "ada", "{stored:?}");
    let fingerprint = stored.request_fingerprint.as_deref().unwrap_or_default();
    assert!(fingerprint.starts_with("v1:"), "{stored:?}");
    // A notification sent after the refusals: once it is out, the sink holds exactly two mails.
    let fence = h
        .send_accepted(&email("grace@example.com", None, "transactional"))
        .await;
    h.wait_status(&fence, "sent").await;
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    let subjects: Vec<_> = mails.iter().filter_map(|m| m.subject.clone()).collect();
    assert_eq!(subjects, ["Invoice 77", "Hello"], "{mails:?}");
    assert_eq!(
        stored_rows(h).await,
        (2, 0),
        "the refused requests stored nothing"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// Requests under one request id arriving at once, half of them one request and half another,
/// go through the insert queue together: one is stored (202), its copies answer it (202 or 200
/// with its id), and every request of the other kind is refused (422). One notification, one mail.
#[tokio::test]
async fn concurrent_different_sends_under_one_request_id_store_one_and_refuse_the_rest() {
    const EACH: usize = 4;
    let w = world().await;
    let h = &w.herald;
    let send = |subject: &str| {
        json!({
            "request_id": "reminder-5",
            "recipient": { "email": "ada@example.com" },
            "category": "account",
            "channels": ["email"],
            "content": { "subject": subject, "text": "A reminder." }
        })
    };
    let requests: Vec<Value> = (0..EACH)
        .flat_map(|_| [send("Reminder A"), send("Reminder B")])
        .collect();
    let answers = futures::future::join_all(requests.iter().map(|body| h.send(body))).await;
    let accepted: Vec<(&Value, &Value)> = requests
        .iter()
        .zip(&answers)
        .filter(|(_, (status, _))| *status == StatusCode::ACCEPTED)
        .map(|(request, (_, answer))| (request, answer))
        .collect();
    assert_eq!(accepted.len(), 1, "one stored: {answers:?}");
    let (winner, stored) = accepted[0];
    let id = stored["id"].as_str().expect("an id").to_string();
    for (request, (status, answer)) in requests.iter().zip(&answers) {
        if request == winner {
            assert!(
                *status == StatusCode::ACCEPTED || *status == StatusCode::OK,
                "{status}: {answer}"
            );
            assert_eq!(answer["id"], id.as_str(), "{answer}");
        } else {
            assert_reused(*status, answer, request);
        }
    }
    h.wait_status(&id, "sent").await;
    assert_eq!(stored_rows(h).await, (1, 0), "one notification");
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(
        mails[0].subject.as_deref(),
        winner["content"]["subject"].as_str(),
        "{mails:?}"
    );
    w.nats.commands_drained(E2E_TIMEOUT).await;
    assert_eq!(w.smtp.count(), 1, "one mail");
    w.herald.shutdown().await.expect("shutdown");
}

/// Two sends under one request id race while the first one's publish fails: the second's insert
/// is skipped for the first one's row, which the first withdraws (503, nothing accepted) before
/// the second reads it back. The second used to answer 500 (the row it repeated not found); it is
/// now stored and sent as if it had come after the withdrawal: 202 with its own notification, the
/// only one under the request id. A trigger stands in for the first request's withdrawal, once,
/// after the second's INSERT statement; PostgreSQL only, as SQLite has no statement triggers (the
/// insert queue's test of the same race runs on both).
#[tokio::test]
async fn a_send_whose_repeated_row_is_withdrawn_before_its_read_back_is_stored_anew() {
    use herald_entities::repo::{notifications, schedule::PUBLISH_PENDING};
    use sea_orm::{ConnectionTrait, DbBackend};
    let w = world().await;
    let h = &w.herald;
    let db = h.db();
    if db.get_database_backend() != DbBackend::Postgres {
        w.herald.shutdown().await.expect("shutdown");
        return;
    }
    // The first request's row, stored and not yet confirmed published.
    let first = notifications::NewNotification {
        status_reason: Some(PUBLISH_PENDING.into()),
        ..herald_tests::queued_notification(Some("raced-1".into()))
    };
    notifications::insert_many(db, vec![first.clone()])
        .await
        .expect("stored");
    for sql in [
        "CREATE TABLE test_armed (armed boolean)",
        "INSERT INTO test_armed VALUES (true)",
        "CREATE FUNCTION test_withdraw() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF EXISTS (SELECT 1 FROM test_armed) THEN DELETE FROM test_armed; \
         DELETE FROM notifications WHERE request_id = 'raced-1'; END IF; RETURN NULL; END $$",
        "CREATE TRIGGER test_withdraw AFTER INSERT ON notifications FOR EACH STATEMENT \
         EXECUTE FUNCTION test_withdraw()",
    ] {
        db.execute_unprepared(sql)
            .await
            .expect("withdrawal installed");
    }
    let mut second = email("ada@example.com", None, "transactional");
    second["request_id"] = json!("raced-1");
    let (status, answer) = h.send(&second).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let id = answer["id"].as_str().expect("an id").to_string();
    assert_ne!(id, first.id.to_string(), "not the withdrawn notification");
    let stored = notifications::find_by_request_id(db, "raced-1")
        .await
        .expect("read")
        .map(|row| row.id.to_string());
    assert_eq!(stored.as_deref(), Some(id.as_str()), "the second's, alone");
    h.wait_status(&id, "sent").await;
    assert_eq!(stored_rows(h).await, (1, 0), "one notification");
    w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(w.smtp.count(), 1, "one mail");
    w.herald.shutdown().await.expect("shutdown");
}

/// The same for bulk sends: two different bulk requests under one request id at once store one
/// batch and refuse the other (422); the stored one's repeat, however written, answers it (200),
/// the other is refused again, and the batch sends what was stored first, once per recipient.
#[tokio::test]
async fn a_bulk_request_id_reused_for_a_different_request_is_refused() {
    let w = world().await;
    let h = &w.herald;
    let bulk = |subject: &str| {
        json!({
            "request_id": "newsletter-12",
            "recipients": [{ "email": "a@example.com" }, { "email": "b@example.com" }],
            "category": "marketing",
            "channels": ["email"],
            "content": { "subject": subject, "text": "News." }
        })
    };
    let (a, b) = (bulk("News A"), bulk("News B"));
    let path = "/api/v1/notifications/bulk";
    let (answer_a, answer_b) = tokio::join!(h.post(path, &a), h.post(path, &b));
    let (winner, stored, loser, refused) = match (answer_a, answer_b) {
        ((StatusCode::ACCEPTED, stored), refused) => (&a, stored, &b, refused),
        (refused, (StatusCode::ACCEPTED, stored)) => (&b, stored, &a, refused),
        answers => panic!("one of the two is accepted: {answers:?}"),
    };
    assert_reused(refused.0, &refused.1, loser);
    let batch = stored["batch_id"].as_str().expect("batch id").to_string();

    let subject = winner["content"]["subject"].as_str().expect("subject");
    let rewritten = format!(
        r#"{{"content": {{"text": "News.", "subject": "{subject}"}}, "channels": ["email"],
            "category": "marketing",
            "recipients": [{{"email": " a@example.com"}}, {{"email": "b@example.com "}}]}}"#
    );
    let (status, again) = post_raw(h, path, "newsletter-12", &rewritten).await;
    assert_eq!(status, StatusCode::OK, "the same request: {again}");
    assert_eq!(again["batch_id"], batch.as_str(), "{again}");
    let fewer = changed(winner, "/recipients", json!([{ "email": "a@example.com" }]));
    let mut filtered = winner.clone();
    if let Some(fields) = filtered.as_object_mut() {
        fields.remove("recipients");
        fields.insert("filter".into(), json!({ "all_customers": true }));
    }
    for other in [loser.clone(), fewer, filtered] {
        let (status, refused) = h.post(path, &other).await;
        assert_reused(status, &refused, &other);
    }
    let mut loser_in_header = loser.clone();
    loser_in_header["request_id"] = Value::Null;
    let body = loser_in_header.to_string();
    let (status, refused) = post_raw(h, path, "newsletter-12", &body).await;
    assert_reused_as("Idempotency-Key", status, &refused, loser);

    eventually("the batch to be sent", E2E_TIMEOUT, || async {
        let (_, json) = h.get(&format!("/api/v1/batches/{batch}")).await;
        (json["status"] == "done" && json["counts"] == json!([{ "status": "sent", "count": 2 }]))
            .then_some(json)
    })
    .await;
    assert_eq!(stored_rows(h).await, (2, 1), "one batch of two");
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    assert!(
        mails.iter().all(|m| m.subject.as_deref() == Some(subject)),
        "{mails:?}"
    );
    w.nats.commands_drained(E2E_TIMEOUT).await;
    assert_eq!(w.smtp.count(), 2, "one mail each");
    w.herald.shutdown().await.expect("shutdown");
}

/// Stores the runtime template `code` (English) with the admin key.
async fn put_template(herald: &TestHerald, code: &str) {
    let template = json!({
        "category": "account",
        "subject": "Receipt for {{ name }}",
        "text": "Thank you, {{ name }}.",
    });
    let (status, body) = herald
        .request_with_key(
            Method::PUT,
            &format!("/api/v1/templates/{code}/locales/en"),
            Some(herald.admin_key()),
            Some(&template),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Deletes the runtime template `code` with the admin key.
async fn delete_template(herald: &TestHerald, code: &str) {
    let (status, body) = herald
        .request_with_key(
            Method::DELETE,
            &format!("/api/v1/templates/{code}"),
            Some(herald.admin_key()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
}

/// A retry whose first answer was lost gets the notification stored first also when the request
/// would be refused now: its template was deleted after it was accepted. The key still stands for
/// the one request (another request under it is refused with 422), a new key with the deleted
/// template is refused as unknown, and nothing new is stored or sent.
#[tokio::test]
async fn a_send_retried_after_its_template_was_deleted_answers_the_first_notification() {
    let w = world().await;
    let h = &w.herald;
    put_template(h, "receipt").await;
    let first = json!({
        "request_id": "receipt-9",
        "recipient": { "email": "ada@example.com" },
        "category": "account",
        "channels": ["email"],
        "template": { "code": "receipt", "variables": { "name": "Ada" } }
    });
    let id = h.send_accepted(&first).await;
    h.wait_status(&id, "sent").await;
    delete_template(h, "receipt").await;

    let (status, again) = h.send(&first).await;
    assert_eq!(status, StatusCode::OK, "the retry: {again}");
    assert_eq!(again["id"], id.as_str(), "{again}");
    assert_eq!(again["status"], "sent", "{again}");
    let mut in_header = first.clone();
    in_header["request_id"] = Value::Null;
    let body = in_header.to_string();
    let (status, again) = post_raw(h, "/api/v1/notifications", "receipt-9", &body).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the retry, keyed in the header: {again}"
    );
    assert_eq!(again["id"], id.as_str(), "{again}");

    let other = changed(&first, "/template/variables/name", json!("Grace"));
    refused_unless_repeated(h, "/api/v1/notifications", &first, &other, "receipt-10").await;

    assert_eq!(stored_rows(h).await, (1, 0), "nothing new stored");
    w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    w.nats.commands_drained(E2E_TIMEOUT).await;
    assert_eq!(w.smtp.count(), 1, "one mail");
    w.herald.shutdown().await.expect("shutdown");
}

/// After its template was deleted, a keyed request `first` is answered only as a repeat: `other`
/// under its key is refused as a reused key (422), and `first` under the new key `new_key` meets
/// the template check (400).
async fn refused_unless_repeated(
    h: &TestHerald,
    path: &str,
    first: &Value,
    other: &Value,
    new_key: &str,
) {
    let (status, refused) = h.post(path, other).await;
    assert_reused(status, &refused, other);
    let new_key = changed(first, "/request_id", json!(new_key));
    let (status, refused) = h.post(path, &new_key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "template.code", "{refused}");
}

/// The same for a bulk send: retried after its template was deleted, it answers the batch stored
/// first (200) and sends nothing again; another request under its key is refused (422).
#[tokio::test]
async fn a_bulk_send_retried_after_its_template_was_deleted_answers_the_first_batch() {
    let w = world().await;
    let h = &w.herald;
    put_template(h, "receipt").await;
    let path = "/api/v1/notifications/bulk";
    let first = json!({
        "request_id": "receipts-3",
        "recipients": [
            { "email": "a@example.com", "variables": { "name": "A" } },
            { "email": "b@example.com", "variables": { "name": "B" } }
        ],
        "category": "account",
        "channels": ["email"],
        "template": { "code": "receipt" }
    });
    let (status, stored) = h.post(path, &first).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{stored}");
    let batch = stored["batch_id"].as_str().expect("batch id").to_string();
    eventually("the batch to be sent", E2E_TIMEOUT, || async {
        let (_, json) = h.get(&format!("/api/v1/batches/{batch}")).await;
        (json["status"] == "done" && json["counts"] == json!([{ "status": "sent", "count": 2 }]))
            .then_some(json)
    })
    .await;
    delete_template(h, "receipt").await;

    let (status, again) = h.post(path, &first).await;
    assert_eq!(status, StatusCode::OK, "the retry: {again}");
    assert_eq!(again["batch_id"], batch.as_str(), "{again}");
    assert_eq!(again["total"], 2, "{again}");
    let other = changed(&first, "/recipients/1/variables/name", json!("C"));
    refused_unless_repeated(h, path, &first, &other, "receipts-4").await;

    assert_eq!(
        stored_rows(h).await,
        (2, 1),
        "one batch of two, nothing new"
    );
    w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    w.nats.commands_drained(E2E_TIMEOUT).await;
    assert_eq!(w.smtp.count(), 2, "one mail each");
    w.herald.shutdown().await.expect("shutdown");
}

/// The errors poem answers before an operation runs have the documented shape, and the spec
/// declares those an operation can meet: 413 (body over 1 MiB) and 415 (a body that is not JSON)
/// beside 422 (a reused request id). 405 (a method the path does not have) has no operation to be
/// declared under; it has the shape all the same. Every operation of a path is under its one key.
#[tokio::test]
async fn errors_before_an_operation_runs_are_declared_and_have_the_error_shape() {
    let w = world().await;
    let h = &w.herald;
    let (status, spec) = h.get("/api/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    for path in ["/api/v1/notifications", "/api/v1/notifications/bulk"] {
        let responses = &spec["paths"][path]["post"]["responses"];
        for code in ["413", "415", "422"] {
            let schema = &responses[code]["content"]["application/json; charset=utf-8"]["schema"];
            assert_eq!(
                schema["$ref"], "#/components/schemas/ErrorBody",
                "{path} declares {code}: {responses}"
            );
        }
    }
    // The send and the history list share a path: the spec holds both under one key (listed
    // twice, a JSON reader kept one of them).
    let raw = h
        .http()
        .get(format!("{}/api/openapi.json", h.base()))
        .send()
        .await
        .expect("spec")
        .text()
        .await
        .expect("spec text");
    assert_eq!(raw.matches(r#""/api/v1/notifications":"#).count(), 1);
    let list = &spec["paths"]["/api/v1/notifications"]["get"];
    assert_eq!(list["tags"], json!(["History"]), "{list}");
    let send = &spec["paths"]["/api/v1/notifications"]["post"];
    assert_eq!(send["tags"], json!(["Notifications"]), "{send}");
    let url = format!("{}/api/v1/notifications", h.base());
    let cases = [
        (
            h.http()
                .post(&url)
                .header("Content-Type", "text/plain")
                .body("hello"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            h.http()
                .post(&url)
                .header("Content-Type", "application/json")
                .body(vec![b' '; herald_api::MAX_BODY_BYTES + 1]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            h.http().delete(&url),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (request, status, code) in cases {
        let response = request.send().await.expect("answered");
        assert_eq!(response.status(), status);
        let body: Value = response.json().await.expect("a JSON body");
        assert_eq!(body["code"], code, "{body}");
        assert!(body["message"].is_string(), "{body}");
    }
    w.herald.shutdown().await.expect("shutdown");
}

/// Settings under which a notification whose provider does not answer is dead after two rounds.
fn dying_fast(config: &mut herald_engine::Config) {
    config.dispatch.retry.max_deliveries = 2;
    config.channels.limits.circuit.cool_down_ms = 200;
}

async fn dead_letter_world() -> World {
    world_with(dying_fast).await
}

#[tokio::test]
async fn dead_letters_are_listed_with_reasons_and_replays_deliver_them() {
    let w = dead_letter_world().await;
    let h = &w.herald;
    w.smtp.set_pause(true);
    let first = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    let second = h
        .send_accepted(&email("bob@example.com", None, "transactional"))
        .await;
    h.wait_status(&first, "dead").await;
    h.wait_status(&second, "dead").await;

    let (status, page) = h.get("/api/v1/dlq").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let items = page["items"].as_array().expect("items").clone();
    assert_eq!(items.len(), 2, "{page}");
    assert!(page["next_after_seq"].is_null(), "{page}");
    let entry_of = |id: &str| {
        items
            .iter()
            .find(|e| e["notification_id"] == id)
            .unwrap_or_else(|| panic!("{id} is listed: {items:?}"))
            .clone()
    };
    let entry = entry_of(&first);
    assert!(
        entry["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("gave up after 2 rounds"),
        "{entry}"
    );
    assert_eq!(entry["deliveries"], 2);
    assert_eq!(entry["replayable"], true);
    assert_eq!(entry["channels"], json!(["email"]));
    assert_eq!(
        entry["providers"],
        json!(["smtp"]),
        "the provider tried is recorded"
    );
    assert!(
        entry["original_subject"]
            .as_str()
            .unwrap_or_default()
            .starts_with("notify.cmd.")
    );
    let seq = entry["seq"].as_u64().expect("seq");
    let (_, filtered) = h.get("/api/v1/dlq?channel=sms").await;
    assert_eq!(filtered["items"], json!([]), "no dead letter for sms");
    let (_, by_provider) = h.get("/api/v1/dlq?provider=telegram").await;
    assert_eq!(by_provider["items"], json!([]), "none tried telegram");
    let (_, by_smtp) = h.get("/api/v1/dlq?provider=smtp").await;
    assert_eq!(
        by_smtp["items"].as_array().map(Vec::len),
        Some(2),
        "{by_smtp}"
    );
    let (_, paged) = h.get("/api/v1/dlq?limit=1").await;
    assert_eq!(paged["items"].as_array().map(Vec::len), Some(1));
    let after = paged["next_after_seq"]
        .as_u64()
        .expect("more after the first");
    let (_, rest) = h.get(&format!("/api/v1/dlq?after_seq={after}")).await;
    assert_eq!(rest["items"].as_array().map(Vec::len), Some(1));
    assert_ne!(rest["items"][0]["seq"], paged["items"][0]["seq"]);

    // Provider back: replaying one entry delivers it, and the entry is gone.
    w.smtp.set_pause(false);
    let (status, replayed) = h
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(replayed["notification_id"], first.as_str());
    assert_eq!(replayed["status"], "queued");
    let delivered = h.wait_status(&first, "sent").await;
    assert_eq!(delivered["final_channel"], "email");
    assert!(
        delivered.get("error").is_none_or(Value::is_null),
        "the error of the rounds that failed is not the sent notification's: {delivered}"
    );
    let (status, again) = h
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{again}");
    let (_, page) = h.get("/api/v1/dlq").await;
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");

    // Replay by filter: the other one.
    let (status, report) = h
        .post(
            "/api/v1/dlq/replay",
            &json!({ "channel": "email", "provider": "smtp" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(
        report["replayed"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(report["replayed"][0]["notification_id"], second.as_str());
    h.wait_status(&second, "sent").await;
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    let mut to: Vec<String> = mails.iter().flat_map(|m| m.to.clone()).collect();
    to.sort();
    assert_eq!(to, vec!["ada@example.com", "bob@example.com"]);
    let (_, page) = h.get("/api/v1/dlq").await;
    assert_eq!(page["items"], json!([]));
    let (status, _) = h.post("/api/v1/dlq/999999/replay", &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    w.herald.shutdown().await.expect("shutdown");
}

/// Publishes `payload` on the dead-letter stream, as a consumer that gave up on it would.
async fn dead_letter(nats: &NatsServer, source: &str, payload: Vec<u8>) {
    let js = async_nats::jetstream::new(nats.client().await.expect("nats client"));
    js.publish(herald_nats::subjects::dlq_subject(source), payload.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

#[tokio::test]
async fn a_filtered_replay_goes_past_entries_it_cannot_replay() {
    let w = dead_letter_world().await;
    let h = &w.herald;
    // Ahead of the one to replay: events the Router gave up on, and a command whose
    // notification is not stored (purged, say).
    for _ in 0..2 {
        dead_letter(&w.nats, "router", br#"{"v":1,"event":"x"}"#.to_vec()).await;
    }
    let orphan = herald_tests::email_command(uuid::Uuid::now_v7(), "gone@example.com", "gone");
    dead_letter(
        &w.nats,
        "dispatch",
        orphan.encode().expect("encoded").to_vec(),
    )
    .await;
    w.smtp.set_pause(true);
    let dead = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    h.wait_status(&dead, "dead").await;
    w.smtp.set_pause(false);

    let (status, first) = h.post("/api/v1/dlq/replay", &json!({ "limit": 1 })).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["replayed"], json!([]), "{first}");
    let skipped = first["skipped"].as_array().expect("skipped");
    assert_eq!(skipped.len(), 1, "only commands are candidates: {first}");
    assert!(
        skipped[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("is not stored"),
        "{first}"
    );
    let after = first["next_after_seq"].as_u64().expect("where to go on");
    let (status, second) = h
        .post(
            "/api/v1/dlq/replay",
            &json!({ "limit": 1, "after_seq": after }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(
        second["replayed"][0]["notification_id"],
        dead.as_str(),
        "{second}"
    );
    h.wait_status(&dead, "sent").await;
    w.herald.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_replayed_notification_that_dies_again_is_dead_lettered_again() {
    let w = dead_letter_world().await;
    let h = &w.herald;
    w.smtp.set_pause(true);
    let id = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    h.wait_status(&id, "dead").await;
    let (_, page) = h.get("/api/v1/dlq").await;
    let first_seq = page["items"][0]["seq"].as_u64().expect("a dead letter");
    assert_eq!(page["items"][0]["notification_id"], id.as_str(), "{page}");

    // Replayed while the provider is still down, well within JetStream's duplicate window: it
    // dies again and must leave a dead letter to replay, not vanish as a duplicate.
    let (status, replayed) = h
        .post(&format!("/api/v1/dlq/{first_seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    let again = h.wait_status(&id, "dead").await;
    let attempts = again["attempts"].as_array().expect("attempts");
    assert_eq!(
        attempts.len(),
        4,
        "the replay had its two rounds again, numbered on: {again}"
    );
    assert_eq!(attempts[3]["attempt_no"], 4, "{again}");
    let (_, page) = h.get("/api/v1/dlq").await;
    let items = page["items"].as_array().expect("items");
    assert_eq!(
        items.len(),
        1,
        "the second death has its dead letter: {page}"
    );
    assert_eq!(items[0]["notification_id"], id.as_str(), "{page}");
    let second_seq = items[0]["seq"].as_u64().expect("seq");
    assert_ne!(second_seq, first_seq, "{page}");

    w.smtp.set_pause(false);
    let (status, replayed) = h
        .post(&format!("/api/v1/dlq/{second_seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    h.wait_status(&id, "sent").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["ada@example.com".to_string()]);
    w.herald.shutdown().await.expect("shutdown");
}

/// A notification dead again after a replay, within the 2 min de-duplication window of
/// `NOTIFY_STATUS`: its second `dead` event was dropped as a duplicate of the first (its
/// `Nats-Msg-Id` was `<id>:dead`), so observers never heard of the second death. Each death is
/// published.
#[tokio::test]
async fn a_notification_dead_again_after_a_replay_is_published_dead_again() {
    let w = dead_letter_world().await;
    let h = &w.herald;
    w.smtp.set_pause(true);
    let id = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    let uuid: uuid::Uuid = id.parse().expect("a notification id");
    h.wait_status(&id, "dead").await;
    eventually("the first dead event", E2E_TIMEOUT, || async {
        (status_events(&w.nats, "dead", uuid).await.len() == 1).then_some(())
    })
    .await;
    let (_, page) = h.get("/api/v1/dlq").await;
    let seq = page["items"][0]["seq"].as_u64().expect("a dead letter");

    let (status, replayed) = h
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    eventually("the second death", E2E_TIMEOUT, || async {
        let (_, now) = h.get(&format!("/api/v1/notifications/{id}")).await;
        let attempts = now["attempts"].as_array().map_or(0, Vec::len);
        (now["status"] == "dead" && attempts == 4).then_some(())
    })
    .await;
    let events = eventually("the second dead event", E2E_TIMEOUT, || async {
        let events = status_events(&w.nats, "dead", uuid).await;
        (events.len() == 2).then_some(events)
    })
    .await;
    assert_ne!(events[0]["at"], events[1]["at"], "{events:?}");
    w.herald.shutdown().await.expect("shutdown");
}

/// A cancel (by the API here; the dashboard's is the same code) is a transition observers are
/// told of like any other, on `notify.status.cancelled`; it used to be published nowhere.
#[tokio::test]
async fn a_cancel_is_published_on_notify_status_cancelled() {
    let w = world().await;
    let h = &w.herald;
    let mut body = email("ada@example.com", None, "transactional");
    body["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let id = h.send_accepted(&body).await;
    let uuid: uuid::Uuid = id.parse().expect("a notification id");
    let (status, cancelled) = h
        .post(&format!("/api/v1/notifications/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let events = eventually("the cancelled event", E2E_TIMEOUT, || async {
        let events = status_events(&w.nats, "cancelled", uuid).await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["status"], "cancelled");
    let at: chrono::DateTime<chrono::Utc> = events[0]["at"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("at");
    let updated: chrono::DateTime<chrono::Utc> = cancelled["updated_at"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("updated_at");
    assert_eq!(at, updated, "dated when it was cancelled");

    // A cancel refused changes and publishes nothing more.
    let (status, refused) = h
        .post(&format!("/api/v1/notifications/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(status_events(&w.nats, "cancelled", uuid).await.len(), 1);
    w.herald.shutdown().await.expect("shutdown");
}

/// A dead-letter world whose Scheduler publishes unconfirmed commands again after a second.
async fn replay_world() -> World {
    world_with(|config| {
        dying_fast(config);
        config.scheduler.stale_claim_secs = 1;
    })
    .await
}

/// A notification dead after its two rounds (the SMTP server paused), the provider back, and the
/// sequence number of its dead letter.
async fn dead_notification(w: &World) -> (String, u64) {
    let h = &w.herald;
    w.smtp.set_pause(true);
    let id = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    h.wait_status(&id, "dead").await;
    let (_, page) = h.get("/api/v1/dlq").await;
    assert_eq!(page["items"][0]["notification_id"], id.as_str(), "{page}");
    let seq = page["items"][0]["seq"].as_u64().expect("a dead letter");
    w.smtp.set_pause(false);
    (id, seq)
}

/// A replay that stopped after putting its notification back to `queued`, before publishing the
/// command (the process died, or the database failed before the requeue could be undone), used to
/// leave it `queued` for good: nothing marked it as unpublished, and its dead letter could not be
/// replayed again (the notification was no longer `dead`). The Scheduler now publishes it, under
/// the replay's own message id (the notification died within the duplicate window of its first
/// command) and with the replay's attempt base (else its rounds would count as spent). (That a
/// late confirmation of the first command leaves the replay's mark is
/// `races::a_late_first_publish_confirmation_leaves_a_replay_s_mark`.)
#[tokio::test]
async fn a_replay_that_stopped_before_publishing_is_finished_by_the_scheduler() {
    use herald_entities::repo::dead_letters::{PendingReplay, requeue_dead};
    let w = replay_world().await;
    let h = &w.herald;
    let (id, seq) = dead_notification(&w).await;
    let uuid: uuid::Uuid = id.parse().expect("a notification id");

    // What the replay does before it publishes; then it stops.
    let requeued = requeue_dead(h.db(), uuid, &PendingReplay::new(seq))
        .await
        .expect("requeued");
    assert!(requeued, "the dead notification is requeued");

    let sent = h.wait_status(&id, "sent").await;
    let attempts = sent["attempts"].as_array().expect("attempts");
    assert_eq!(
        attempts.len(),
        3,
        "a fresh round after the two that failed: {sent}"
    );
    assert_eq!(attempts[2]["status"], "sent", "{sent}");
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["ada@example.com".to_string()]);
    w.herald.shutdown().await.expect("shutdown");
}

/// A replay whose publish reported failure although JetStream stored the command (a lost
/// acknowledgement) put the notification back to `dead`, so the dispatcher dropped the stored
/// copy. Retried within the duplicate window, the replay published under the same message id
/// (`<id>:replay:<seq>`): JetStream took it for that copy and dropped it, the replay answered
/// `queued`, deleted the entry, and the notification stayed `queued` with no command. Every
/// replay now publishes under an id of its own.
#[tokio::test]
async fn a_replay_retried_after_its_stored_copy_was_dropped_is_delivered() {
    let w = replay_world().await;
    let h = &w.herald;
    let (id, seq) = dead_notification(&w).await;

    // The first attempt's copy, stored under the id the replay of this entry used, and dropped
    // by the dispatcher while the notification is `dead`.
    let js = async_nats::jetstream::new(w.nats.client().await.expect("nats client"));
    let letter = herald_nats::DeadLetters::open(&js)
        .await
        .expect("dead-letter stream")
        .get(seq)
        .await
        .expect("read")
        .expect("the dead letter");
    let subject = letter.original_subject.clone().expect("its subject");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{id}:replay:{seq}").as_str());
    headers.insert(herald_nats::subjects::HEADER_REPLAY_BASE, "2");
    js.publish_with_headers(subject, headers, letter.payload.clone())
        .await
        .expect("publish")
        .await
        .expect("stored");
    eventually("the stored copy to be taken", E2E_TIMEOUT, || async {
        let mut stream = js
            .get_stream(herald_nats::subjects::NOTIFY_STREAM)
            .await
            .ok()?;
        let info = stream.info().await.ok()?;
        (info.state.messages == 0).then_some(())
    })
    .await;
    let (_, dropped) = h.get(&format!("/api/v1/notifications/{id}")).await;
    assert_eq!(dropped["status"], "dead", "the copy was dropped: {dropped}");

    // The retry.
    let (status, replayed) = h
        .post(&format!("/api/v1/dlq/{seq}/replay"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(replayed["status"], "queued", "{replayed}");
    h.wait_status(&id, "sent").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, vec!["ada@example.com".to_string()]);
    w.herald.shutdown().await.expect("shutdown");
}

/// A bounce text over several lines (as SMTP bounces often are) or with tabs is kept, its control
/// characters made spaces: refusing it with a 400 would lose the bounce, as providers do not
/// repeat a receipt answered 4xx.
#[tokio::test]
async fn a_receipt_whose_error_has_line_breaks_and_tabs_is_applied() {
    let w = world().await;
    let h = &w.herald;
    let id = h
        .send_accepted(&email("ada@example.com", None, "transactional"))
        .await;
    h.wait_status(&id, "sent").await;
    let bounce = json!({
        "notification_id": id,
        "event": "bounced",
        "error": "550-5.1.1 The email account does not exist.\r\n550 5.1.1\tmailbox unavailable"
    });
    let (status, answer) = h.post("/api/v1/providers/smtp/callbacks", &bounce).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "failed", "{answer}");
    let (_, failed) = h.get(&format!("/api/v1/notifications/{id}")).await;
    assert_eq!(
        failed["error"],
        "550-5.1.1 The email account does not exist.  550 5.1.1 mailbox unavailable",
        "{failed}"
    );
    w.herald.shutdown().await.expect("shutdown");
}

/// A send whose publish failed although its command got out (the acknowledgement lost) and a
/// dispatcher claimed the notification is accepted: the notification is sent, so answering 503
/// ("nothing was accepted") would make the client send it twice. Here the claim is made while
/// NATS is frozen, as a dispatcher that got the command would make it.
#[tokio::test]
async fn a_send_claimed_by_a_dispatcher_while_its_publish_failed_is_accepted() {
    use herald_entities::repo::notifications;
    let w = world().await;
    let h = &w.herald;
    let mut body = email("ada@example.com", None, "transactional");
    body["request_id"] = json!("ack-lost-1");
    w.nats.freeze().expect("SIGSTOP");
    let sending = {
        let http = h.http().clone();
        let url = format!("{}/api/v1/notifications", h.base());
        tokio::spawn(async move {
            let response = http.post(url).json(&body).send().await.expect("answered");
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        })
    };
    let db = h.db();
    let stored = eventually("the send to be stored", E2E_TIMEOUT, || async {
        notifications::find_by_request_id(db, "ack-lost-1")
            .await
            .expect("read")
    })
    .await;
    let claimed = notifications::claim(db, &[stored.id])
        .await
        .expect("claimed");
    assert_eq!(
        claimed.get(&stored.id),
        Some(&notifications::Claimed::Yours { attempts: 0 })
    );
    let (status, answer) = sending.await.expect("the send ran");
    w.nats.resume().expect("SIGCONT");
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["id"], stored.id.to_string(), "{answer}");
    assert_eq!(answer["status"], "processing", "{answer}");
    let kept = notifications::find_by_request_id(db, "ack-lost-1")
        .await
        .expect("read");
    assert!(kept.is_some(), "the claimed notification stays");
    w.herald.shutdown().await.expect("shutdown");
}

/// A repeated request for a `queued` notification whose command was confirmed published
/// publishes nothing, so it is answered while NATS is unavailable; only a command not yet
/// confirmed published is published again.
#[tokio::test]
async fn a_repeat_of_a_confirmed_send_publishes_nothing_and_is_answered_while_nats_is_down() {
    use herald_entities::repo::notifications;
    let w = world().await;
    let h = &w.herald;
    // Stored and confirmed published (no mark) long ago, not yet picked up.
    let row = herald_tests::queued_notification(Some("confirmed-1".into()));
    let id = row.id;
    notifications::insert_many(h.db(), vec![row])
        .await
        .expect("stored");
    w.nats.freeze().expect("SIGSTOP");
    let mut repeat = email("ada@example.com", None, "transactional");
    repeat["request_id"] = json!("confirmed-1");
    let (status, answer) = h.send(&repeat).await;
    w.nats.resume().expect("SIGCONT");
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["id"], id.to_string(), "{answer}");
    assert_eq!(answer["status"], "queued", "{answer}");
    w.herald.shutdown().await.expect("shutdown");
}

/// A POST without a body (a browser sends one without a CORS preflight) and without a key, with
/// `headers` (a browser's fetch metadata and `Origin`; none as curl sends it).
async fn post_as_browser(
    h: &TestHerald,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut request = h.anonymous().post(format!("{}{path}", h.base()));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// With `auth.enabled = false` every request acts as admin, so a page on another site could make
/// the developer's browser cancel a send or replay a dead letter on a local Herald (a POST without
/// a body needs no preflight). Such requests are refused by their fetch metadata or `Origin`;
/// those of clients that are not browsers, and the browser's same-origin ones, still work.
#[tokio::test]
async fn with_auth_disabled_browsers_cannot_post_from_another_site() {
    let w = world_with(|config| config.auth.enabled = false).await;
    let h = &w.herald;
    let mut body = email("ada@example.com", None, "transactional");
    body["scheduled_at"] = json!((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    let id = h.send_accepted(&body).await;
    let cancel = format!("/api/v1/notifications/{id}/cancel");
    let own_origin = h.base().to_string();
    let cross_site: [&[(&str, &str)]; 4] = [
        &[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://evil.example"),
        ],
        &[
            ("sec-fetch-site", "same-site"),
            ("origin", "http://localhost:3000"),
        ],
        &[("sec-fetch-site", "cross-site"), ("origin", &own_origin)],
        &[("origin", "https://evil.example")],
    ];
    for headers in cross_site {
        for path in [cancel.as_str(), "/api/v1/dlq/1/replay"] {
            let (status, answer) = post_as_browser(h, path, headers).await;
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{path} {headers:?}: {answer}"
            );
            assert_eq!(answer["code"], "forbidden", "{answer}");
            let message = answer["message"].as_str().unwrap_or_default();
            assert!(message.contains("cross-origin request refused"), "{answer}");
        }
    }
    let (_, notification) = h.get(&format!("/api/v1/notifications/{id}")).await;
    assert_eq!(notification["status"], "scheduled", "nothing was cancelled");

    // Without fetch metadata or Origin (curl, SDKs), or from Herald's own origin, requests pass:
    // no dead letter 1 (404), the cancel done.
    let (status, answer) = post_as_browser(h, "/api/v1/dlq/1/replay", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let same_origin = [
        ("sec-fetch-site", "same-origin"),
        ("origin", own_origin.as_str()),
    ];
    let (status, answer) = post_as_browser(h, "/api/v1/dlq/1/replay", &same_origin).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let (status, answer) = post_as_browser(h, &cancel, &[("origin", &own_origin)]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "cancelled", "{answer}");
    w.herald.shutdown().await.expect("shutdown");
}

/// With `auth.enabled = false`, a page on evil.example whose name is made to resolve to 127.0.0.1
/// (DNS rebinding) is same-origin to the browser, so no cross-origin check stops it, and every
/// request acts as admin: it could read and drive a local Herald. Requests naming a `Host` that is
/// neither a loopback name nor Herald's own are refused; probes and scrapes still pass.
#[tokio::test]
async fn with_auth_disabled_requests_for_another_host_are_refused() {
    let w = world_with(|config| config.auth.enabled = false).await;
    let h = &w.herald;
    let get_with_host = |path: &'static str, host: String| async move {
        let response = h
            .http()
            .get(format!("{}{path}", h.base()))
            .header("host", host)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status();
        (
            status,
            response.json::<Value>().await.unwrap_or(Value::Null),
        )
    };
    let port = h.base().rsplit(':').next().unwrap_or_default().to_string();
    for host in [
        "evil.example:8080".to_string(),
        format!("evil.example:{port}"),
    ] {
        let (status, answer) = get_with_host("/api/v1/channels", host.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{host}: {answer}");
        assert_eq!(answer["code"], "forbidden", "{answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains("evil.example"), "{answer}");
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "127.1.2.3".to_string(),
    ] {
        let (status, answer) = get_with_host("/api/v1/channels", host.clone()).await;
        assert_eq!(status, StatusCode::OK, "{host}: {answer}");
    }
    let (status, answer) = get_with_host("/health/ready", "evil.example:8080".into()).await;
    assert_eq!(status, StatusCode::OK, "readiness needs no key: {answer}");
    w.herald.shutdown().await.expect("shutdown");
}

/// With authentication on, the API does not look at where a request comes from: a browser sends
/// no key by itself, so another site's page gets 401, and a browser app on another origin that
/// holds a key (with CORS set up in front of Herald) is served.
#[tokio::test]
async fn with_auth_enabled_the_api_serves_other_origins_that_hold_a_key() {
    let w = world().await;
    let h = &w.herald;
    let cross_site = [
        ("sec-fetch-site", "cross-site"),
        ("origin", "https://app.example"),
    ];
    let (status, answer) = post_as_browser(h, "/api/v1/dlq/1/replay", &cross_site).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no key: {answer}");
    let mut request = h.http().post(format!("{}/api/v1/dlq/1/replay", h.base()));
    for (name, value) in cross_site {
        request = request.header(name, value);
    }
    let response = request.send().await.expect("POST with a key");
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "the key's request is served"
    );
    w.herald.shutdown().await.expect("shutdown");
}
