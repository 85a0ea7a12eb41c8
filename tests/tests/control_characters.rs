//! Control characters in requests. A NUL, which PostgreSQL can neither store nor compare in text
//! (SQLSTATE 22021) while SQLite can, is refused anywhere in a request with a 400 naming the field
//! that holds it, alike on both databases; other control characters are refused, naming the
//! field, where a value is stored or looked up as plain text (names, contacts, ids, codes), and
//! kept in template sources; a character the database refuses all the same answers 400, not 500.

use herald_api::ApiError;
use herald_entities::repo;
use herald_tests::{DatabaseKind, NatsServer, SmtpSink, TestDatabase, TestHerald, test_config};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

struct World {
    _nats: NatsServer,
    _smtp: SmtpSink,
    db: TestDatabase,
    herald: TestHerald,
}

/// Herald with the customer `c-1`, its order `A-1` and the runtime template `greeting`.
async fn world() -> World {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let config = test_config(&nats, &db, &smtp);
    let herald = TestHerald::start(config).await.expect("herald starts");
    let w = World {
        _nats: nats,
        _smtp: smtp,
        db,
        herald,
    };
    let customer = json!({"id": "c-1", "email": "ada@example.com"});
    w.accepted(Method::POST, "/api/v1/customers", &customer)
        .await;
    w.accepted(Method::POST, "/api/v1/orders", &order("A-1", "Tea"))
        .await;
    let path = "/api/v1/templates/greeting/locales/en";
    w.accepted(Method::PUT, path, &template("Hello.")).await;
    w
}

impl World {
    /// `method path` with the admin key (every scope) and an optional JSON body.
    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
        let key = Some(self.herald.admin_key());
        self.herald.request_with_key(method, path, key, body).await
    }

    /// Asserts that `method path` with `body` succeeds.
    async fn accepted(&self, method: Method, path: &str, body: &Value) {
        let (status, answer) = self.call(method.clone(), path, Some(body)).await;
        assert!(status.is_success(), "{method} {path} {body}: {answer}");
    }

    /// Asserts that `method path` with `body` is refused with 400 `invalid_request` naming `field`
    /// (none when `None`).
    async fn refused(&self, method: Method, path: &str, body: Option<&Value>, field: Option<&str>) {
        let (status, answer) = self.call(method.clone(), path, body).await;
        let request = format!("{method} {path} {}", body.unwrap_or(&Value::Null));
        assert_eq!(status, StatusCode::BAD_REQUEST, "{request}: {answer}");
        assert_eq!(answer["code"], "invalid_request", "{request}: {answer}");
        assert_eq!(answer["field"], json!(field), "{request}: {answer}");
    }

    /// Asserts that nothing of the refused requests was stored: no customer `c-2`, no order `A-2`,
    /// `A-1` still `placed`, no `account` notification (the order's are `transactional`), no
    /// batch.
    async fn nothing_stored(&self) {
        use herald_entities::notification::Column;
        use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
        for (path, expected) in [
            ("/api/v1/customers/c-2", StatusCode::NOT_FOUND),
            ("/api/v1/orders/A-2", StatusCode::NOT_FOUND),
            ("/api/v1/templates/greeting", StatusCode::OK),
        ] {
            let (status, answer) = self.call(Method::GET, path, None).await;
            assert_eq!(status, expected, "{path}: {answer}");
        }
        let (_, order) = self.call(Method::GET, "/api/v1/orders/A-1", None).await;
        assert_eq!(order["status"], "placed", "{order}");
        let db = self.herald.db();
        let notifications = herald_entities::notification::Entity::find()
            .filter(Column::Category.eq("account"))
            .count(db)
            .await
            .expect("notifications counted");
        let batches = herald_entities::batch::Entity::find()
            .count(db)
            .await
            .expect("batches counted");
        assert_eq!((notifications, batches), (0, 0), "nothing sent");
    }
}

fn order(number: &str, item: &str) -> Value {
    json!({"order_number": number, "customer_id": "c-1", "total_minor": 100, "currency": "EUR",
           "items": [{"name": item, "quantity": 1, "unit_price_minor": 100}]})
}

fn template(text: &str) -> Value {
    json!({"description": "A greeting", "category": "account", "text": text})
}

fn templated_send(code: &str) -> Value {
    json!({
        "recipient": { "email": "ada@example.com" },
        "category": "account",
        "channels": ["email"],
        "template": { "code": code }
    })
}

/// `send` as a bulk send to its one recipient.
fn in_bulk(send: &Value) -> Value {
    let mut bulk = send.clone();
    let recipient = bulk["recipient"].take();
    bulk["recipients"] = json!([recipient]);
    bulk.as_object_mut()
        .map(|fields| fields.remove("recipient"));
    bulk
}

/// Requests that carry `c` in a plain-text field that is stored or looked up (a customer's name
/// and contacts, an order's item name, tracking number and reason, a send's template code and
/// request id, single and bulk), with the field each refusal must name.
fn plain_text_cases(c: char) -> Vec<(Method, &'static str, Value, &'static str)> {
    let customer = |field: &str, value: String| {
        let mut body = json!({"id": "c-2", "email": "ada@example.com"});
        body[field] = json!(value);
        body
    };
    let mut cases = Vec::new();
    for (field, value) in [
        ("name", format!("Ada{c}Lovelace")),
        ("telegram_chat_id", format!("4{c}2")),
        ("webhook_url", format!("https://example.com/{c}/hook")),
    ] {
        let body = customer(field, value);
        cases.push((Method::POST, "/api/v1/customers", body.clone(), field));
        // A replacement has no `id` (the path names the customer): that field would be refused.
        let mut replacement = body;
        replacement
            .as_object_mut()
            .map(|fields| fields.remove("id"));
        cases.push((Method::PUT, "/api/v1/customers/c-1", replacement, field));
    }
    cases.push((
        Method::POST,
        "/api/v1/orders",
        order("A-2", &format!("Tea{c}bags")),
        "items[0].name",
    ));
    let status = "/api/v1/orders/A-1/status";
    for (body, field) in [
        (
            json!({"status": "shipped", "tracking_number": format!("1Z{c}9")}),
            "tracking_number",
        ),
        (
            json!({"status": "cancelled", "reason": format!("changed{c}mind")}),
            "reason",
        ),
    ] {
        cases.push((Method::PUT, status, body, field));
    }
    let coded = templated_send(&format!("greeting{c}"));
    // The template is unknown: the refusal then looks for a request stored under the id.
    let mut keyed = templated_send("unknown");
    keyed["request_id"] = json!(format!("retry{c}1"));
    // Accepted but for its id, a bulk send would store it.
    let mut acceptable = keyed.clone();
    acceptable["template"] = json!({"code": "greeting"});
    for (send, field) in [
        (coded, "template.code"),
        (keyed, "request_id"),
        (acceptable, "request_id"),
    ] {
        let bulk = in_bulk(&send);
        cases.push((Method::POST, "/api/v1/notifications", send, field));
        cases.push((Method::POST, "/api/v1/notifications/bulk", bulk, field));
    }
    cases
}

/// A NUL anywhere in a request is refused before the endpoint runs, naming the body field or query
/// parameter that holds it (a path has no field), and nothing is stored; PostgreSQL, which cannot
/// hold it, is never asked.
#[tokio::test]
async fn a_nul_in_a_request_is_refused_naming_the_field_that_holds_it() {
    let w = world().await;
    for (method, path, body, field) in plain_text_cases('\0') {
        w.refused(method, path, Some(&body), Some(field)).await;
    }
    let path = "/api/v1/templates/greeting/locales/de";
    for (body, field) in [
        (template("Hallo\0"), "text"),
        (
            json!({"description": "\0", "text": "Hallo."}),
            "description",
        ),
        (json!({"text": "Hallo.", "html": "<p>\0</p>"}), "html"),
    ] {
        w.refused(Method::PUT, path, Some(&body), Some(field)).await;
    }
    let tokens = json!({"push_tokens": ["token", "token\0"]});
    let customer = "/api/v1/customers/c-1";
    w.refused(Method::PUT, customer, Some(&tokens), Some("push_tokens[1]"))
        .await;
    let variables = json!({"variables": {"name\0": "Ada"}});
    let preview = "/api/v1/templates/greeting/preview";
    w.refused(Method::POST, preview, Some(&variables), Some("variables"))
        .await;
    for path in [
        "/api/v1/customers/c-1%00",
        "/api/v1/customers/c-1%00/preferences",
        "/api/v1/orders/A-1%00",
        "/api/v1/templates/greeting%00",
    ] {
        w.refused(Method::GET, path, None, None).await;
    }
    w.refused(Method::DELETE, "/api/v1/templates/greeting%00", None, None)
        .await;
    w.nothing_stored().await;
    w.herald.shutdown().await.expect("shutdown");
}

/// Other control characters (a tab here) are refused in the same plain-text fields, naming them,
/// and in a request id given as the `Idempotency-Key` header; a template's sources keep their
/// line breaks and tabs.
#[tokio::test]
async fn other_control_characters_in_plain_text_are_refused_naming_the_field() {
    let w = world().await;
    for (method, path, body, field) in plain_text_cases('\t') {
        w.refused(method, path, Some(&body), Some(field)).await;
    }
    let tokens = json!({"push_tokens": ["token\ttoken"]});
    let customer = "/api/v1/customers/c-1";
    w.refused(Method::PUT, customer, Some(&tokens), Some("push_tokens"))
        .await;
    let response = w
        .herald
        .http()
        .post(format!("{}/api/v1/notifications", w.herald.base()))
        .header("Idempotency-Key", "retry\t1")
        .json(&templated_send("unknown"))
        .send()
        .await
        .expect("POST /api/v1/notifications");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let answer: Value = response.json().await.expect("JSON error");
    assert_eq!(answer["field"], "Idempotency-Key", "{answer}");
    w.nothing_stored().await;

    let sources = template("Hallo,\n\tAda.");
    let path = "/api/v1/templates/greeting/locales/de";
    let (status, answer) = w.call(Method::PUT, path, Some(&sources)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    assert_eq!(answer["text"], "Hallo,\n\tAda.", "{answer}");
    w.herald.shutdown().await.expect("shutdown");
}

/// The net under the checks: a NUL that reaches PostgreSQL in a query all the same is refused by
/// it (SQLSTATE 22021), and that refusal answers 400 `invalid_request`, not 500. SQLite compares
/// it and finds nothing.
#[tokio::test]
async fn a_text_the_database_refuses_is_a_400_not_a_500() {
    let w = world().await;
    let looked_up = repo::customers::find_by_external_id(w.herald.db(), "c-1\0").await;
    match (w.db.kind(), looked_up) {
        (DatabaseKind::Sqlite, found) => {
            assert!(matches!(found, Ok(None)), "SQLite compares it: {found:?}")
        }
        (DatabaseKind::Postgres, Ok(found)) => {
            panic!("PostgreSQL refuses a NUL, yet answered {found:?}")
        }
        (DatabaseKind::Postgres, Err(err)) => {
            let refusal = ApiError::from(err);
            let (status, body) = refusal.status_and_body();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}");
            assert_eq!(body.code, "invalid_request", "{body:?}");
        }
    }
    w.herald.shutdown().await.expect("shutdown");
}
