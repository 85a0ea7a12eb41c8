//! Sends and customers the API must refuse up front because they could only fail at delivery,
//! and request ids measured as documented.

use herald_actors::channel::webhook::WebhookConfig;
use herald_tests::{NatsServer, SmtpSink, TestDatabase, TestHerald, test_config};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A Herald on a fresh NATS server, SMTP sink and database, kept alive together.
struct World {
    _nats: NatsServer,
    _smtp: SmtpSink,
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
        _nats: nats,
        _smtp: smtp,
        _db: db,
        herald,
    }
}

/// A transactional send to `recipient` over `channels` (the default chain when `None`).
fn send_to(recipient: Value, channels: Option<Value>) -> Value {
    let mut send = json!({
        "recipient": recipient,
        "category": "transactional",
        "content": { "subject": "Hello", "text": "Hello there." }
    });
    if let Some(channels) = channels {
        send["channels"] = channels;
    }
    send
}

fn with_webhook(url: &str) -> Value {
    send_to(
        json!({ "email": "ada@example.com", "webhook_url": url }),
        Some(json!(["email"])),
    )
}

/// Webhook URLs that cannot be parsed, have no host, another scheme, or name an internal IP
/// address are refused naming the field, by sends and by customers alike; a public one is taken.
/// (A host name is not resolved by the API: the provider refuses an internal one when sending,
/// see `channels::a_webhook_to_an_internal_address_is_refused_unless_allowed`.)
#[tokio::test]
async fn webhook_urls_that_could_never_be_delivered_to_are_refused() {
    let w = world_with(|_| {}).await;
    let h = &w.herald;
    for url in [
        "https://",
        "https://exa mple.com/h",
        "http://[::1",
        "ftp://example.com/h",
        "http://169.254.169.254/x",
        "http://127.0.0.1:8080/h",
        "http://[::1]/h",
        "http://10.0.0.7/h",
    ] {
        let (status, refused) = h.send(&with_webhook(url)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {refused}");
        assert_eq!(
            refused["field"], "recipient.webhook_url",
            "{url}: {refused}"
        );
        let customer = json!({ "id": "c-hook", "email": "ada@example.com", "webhook_url": url });
        let (status, refused) = h.post("/api/v1/customers", &customer).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {refused}");
        assert_eq!(refused["field"], "webhook_url", "{url}: {refused}");
    }
    h.send_accepted(&with_webhook("https://hooks.example.com/h"))
        .await;
    let (status, answer) = h
        .post(
            "/api/v1/customers",
            &json!({ "id": "c-hook", "webhook_url": "https://hooks.example.com/h" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    w.herald.shutdown().await.expect("shutdown");
}

/// A customer's own webhook secret is checked as `channels.webhook.secret` is (refused naming
/// the field, without repeating it), never returned (`webhook_secret_set` says whether there is
/// one), kept by a `PUT` without it while the webhook URL stays, dropped with a new URL, and
/// removed by `""`.
#[tokio::test]
async fn a_customers_webhook_secret_is_checked_and_never_shown() {
    let w = world_with(|_| {}).await;
    let h = &w.herald;
    let secret = "whsec_c2hvcC1hIGtlZXBzIGl0cyBvd24gMzItYnl0ZSBrZXk=";
    let url = "https://hooks.example.com/a";
    for bad in [
        "c2hvcC1hIGtlZXBzIGl0cyBvd24gMzItYnl0ZSBrZXk=",
        "whsec_not base64!",
        "whsec_dG9vIHNob3J0IGtleQ==",
    ] {
        let customer = json!({ "id": "c-sec", "webhook_url": url, "webhook_secret": bad });
        let (status, refused) = h.post("/api/v1/customers", &customer).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {refused}");
        assert_eq!(refused["field"], "webhook_secret", "{bad}: {refused}");
        assert!(!refused.to_string().contains(bad), "{refused}");
    }
    let customer = json!({ "id": "c-sec", "webhook_url": url, "webhook_secret": secret });
    let (status, created) = h.post("/api/v1/customers", &customer).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let shown = |customer: &Value| {
        assert!(customer.get("webhook_secret").is_none(), "{customer}");
        customer["webhook_secret_set"].clone()
    };
    assert_eq!(shown(&created), true);
    let (_, read) = h.get("/api/v1/customers/c-sec").await;
    assert_eq!(shown(&read), true);

    let put = |body: Value| async move {
        let response = h
            .http()
            .put(format!("{}/api/v1/customers/c-sec", h.base()))
            .json(&body)
            .send()
            .await
            .expect("PUT");
        assert_eq!(response.status(), StatusCode::OK);
        response.json::<Value>().await.expect("JSON answer")
    };
    let kept = put(json!({ "webhook_url": url, "email": "ada@example.com" })).await;
    assert_eq!(shown(&kept), true, "the same URL keeps the secret");
    let moved = put(json!({ "webhook_url": "https://hooks.example.com/b" })).await;
    assert_eq!(shown(&moved), false, "another URL drops it");
    let set = put(json!({ "webhook_url": url, "webhook_secret": secret })).await;
    assert_eq!(shown(&set), true);
    let removed = put(json!({ "webhook_url": url, "webhook_secret": "" })).await;
    assert_eq!(shown(&removed), false, "\"\" removes it");
    w.herald.shutdown().await.expect("shutdown");
}

/// With `channels.webhook.allow_private_targets` the webhook provider sends to internal
/// addresses, so the API takes them.
#[tokio::test]
async fn internal_webhook_urls_are_taken_when_private_targets_are_allowed() {
    let w = world_with(|c| {
        c.channels.webhook = Some(WebhookConfig {
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
            allow_private_targets: true,
            ..WebhookConfig::default()
        });
    })
    .await;
    w.herald
        .send_accepted(&with_webhook("http://127.0.0.1:9/h"))
        .await;
    let (status, refused) = w.herald.send(&with_webhook("https://")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "still a URL: {refused}");
    w.herald.shutdown().await.expect("shutdown");
}

/// A send without a customer id whose contacts reach no configured channel of its chain is
/// refused naming the recipient; with a customer id the stored contacts count, so it is taken.
#[tokio::test]
async fn a_send_whose_contacts_reach_no_configured_channel_is_refused() {
    let w = world_with(|_| {}).await;
    let h = &w.herald;
    let phone_only = json!({ "phone": "+4915112345678" });
    for channels in [Some(json!(["sms", "email"])), None] {
        let (status, refused) = h.send(&send_to(phone_only.clone(), channels.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{channels:?}: {refused}");
        assert_eq!(refused["field"], "recipient", "{channels:?}: {refused}");
        let message = refused["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("email"),
            "names what is missing: {refused}"
        );
    }
    h.send_accepted(&send_to(
        json!({ "customer_id": "c-1", "phone": "+4915112345678" }),
        Some(json!(["email"])),
    ))
    .await;
    h.send_accepted(&send_to(
        json!({ "email": "ada@example.com", "phone": "+4915112345678" }),
        Some(json!(["sms", "email"])),
    ))
    .await;
    w.herald.shutdown().await.expect("shutdown");
}

/// A send that names no channels, in a category whose default chain has no configured provider,
/// is refused like one naming that chain; so is such a bulk send.
#[tokio::test]
async fn a_default_chain_without_a_provider_is_refused() {
    let w = world_with(|c| {
        c.routing
            .default_chains
            .insert("marketing".into(), vec!["sms".into()]);
    })
    .await;
    let h = &w.herald;
    let mut send = send_to(
        json!({ "email": "ada@example.com", "phone": "+4915112345678" }),
        None,
    );
    send["category"] = json!("marketing");
    let (status, refused) = h.send(&send).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "channels", "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("sms") && message.contains("configured: email"),
        "{refused}"
    );
    let (status, refused) = h
        .post(
            "/api/v1/notifications/bulk",
            &json!({
                "recipients": [{ "email": "ada@example.com" }],
                "category": "marketing",
                "content": { "text": "Winter sale" }
            }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "channels", "{refused}");
    send["channels"] = json!(["email"]);
    h.send_accepted(&send).await;
    w.herald.shutdown().await.expect("shutdown");
}

/// A request id is measured in characters, as documented: 200 two-byte characters are taken,
/// 201 are not.
#[tokio::test]
async fn a_request_id_is_measured_in_characters() {
    let w = world_with(|_| {}).await;
    let h = &w.herald;
    let mut send = send_to(
        json!({ "email": "ada@example.com" }),
        Some(json!(["email"])),
    );
    send["request_id"] = json!("é".repeat(200));
    let first = h.send_accepted(&send).await;
    let (status, repeated) = h.send(&send).await;
    assert_eq!(status, StatusCode::OK, "the repeat: {repeated}");
    assert_eq!(repeated["id"], first.as_str(), "{repeated}");
    send["request_id"] = json!("é".repeat(201));
    let (status, refused) = h.send(&send).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["field"], "request_id", "{refused}");
    w.herald.shutdown().await.expect("shutdown");
}
