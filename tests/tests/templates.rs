//! Runtime templates end to end: created through the API, named by a send, rendered at delivery in
//! the customer's locale (with fallback to the default locale) and received at the SMTP sink;
//! invalid sources, unknown codes and render errors refused or failed with clear messages;
//! preview and delete.

use herald_tests::{
    E2E_TIMEOUT, NatsServer, SmtpSink, TestDatabase, TestHerald, eventually, test_config,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

struct World {
    _nats: NatsServer,
    smtp: SmtpSink,
    _db: TestDatabase,
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
    tune(&mut config);
    let herald = TestHerald::start(config).await.expect("herald starts");
    World {
        _nats: nats,
        smtp,
        _db: db,
        herald,
    }
}

impl World {
    async fn admin(&self, method: Method, path: &str, body: Option<&Value>) -> (StatusCode, Value) {
        self.herald
            .request_with_key(method, path, Some(self.herald.admin_key()), body)
            .await
    }

    async fn put_variant(&self, code: &str, locale: &str, body: &Value) -> (StatusCode, Value) {
        let path = format!("/api/v1/templates/{code}/locales/{locale}");
        self.admin(Method::PUT, &path, Some(body)).await
    }

    async fn customer(&self, id: &str, email: &str, locale: &str) {
        let (status, body) = self
            .herald
            .post(
                "/api/v1/customers",
                &json!({"id": id, "email": email, "locale": locale}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

fn welcome(subject: &str, greeting: &str) -> Value {
    json!({
        "description": "Welcome a new customer",
        "category": "account",
        "subject": format!("{subject}, {{{{ name }}}}"),
        "text": format!("{greeting} {{{{ name }}}}, your code is {{{{ code }}}}."),
        "html": format!("<p>{greeting} <b>{{{{ name }}}}</b></p>"),
        "short": "Code {{ code }}"
    })
}

/// An `account` email to `customer` of the `welcome` template.
fn templated_send(customer: &str, variables: Value) -> Value {
    send_of("welcome", customer, variables)
}

/// An `account` email to `customer` of the template `code`.
fn send_of(code: &str, customer: &str, variables: Value) -> Value {
    json!({
        "recipient": { "customer_id": customer },
        "category": "account",
        "channels": ["email"],
        "template": { "code": code, "variables": variables }
    })
}

#[tokio::test]
async fn a_runtime_template_is_sent_in_the_customer_locale_with_fallback() {
    let w = world().await;
    let (status, en) = w
        .put_variant("welcome", "en", &welcome("Welcome", "Hi"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{en}");
    assert_eq!(en["version"], 1);
    assert_eq!(en["variables"], json!(["code", "name"]));
    let (status, de) = w
        .put_variant("welcome", "de", &welcome("Willkommen", "Hallo"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{de}");
    // Replacing a variant answers 200 and counts the version up.
    let (status, en) = w
        .put_variant("welcome", "en", &welcome("Welcome aboard", "Hello"))
        .await;
    assert_eq!(status, StatusCode::OK, "{en}");
    assert_eq!(en["version"], 2);

    let (_, list) = w.herald.get("/api/v1/templates").await;
    let listed = list
        .as_array()
        .and_then(|all| all.iter().find(|t| t["code"] == "welcome"))
        .unwrap_or_else(|| panic!("welcome listed: {list}"));
    assert_eq!(listed["kind"], "runtime");
    assert_eq!(listed["locales"], json!(["en", "de"]));
    let names: Vec<&Value> = listed["variables"]
        .as_array()
        .expect("variables")
        .iter()
        .map(|v| &v["name"])
        .collect();
    assert_eq!(names, [&json!("code"), &json!("name")]);
    let (_, compiled) = w.herald.get("/api/v1/templates/order_placed").await;
    assert_eq!(compiled["template"]["kind"], "compiled", "{compiled}");

    w.customer("c-de", "anna@example.com", "de-DE").await;
    w.customer("c-it", "luca@example.com", "it-IT").await;
    let vars = json!({"name": "<Anna>", "code": "X1"});
    let german = w.herald.send_accepted(&templated_send("c-de", vars)).await;
    w.herald.wait_status(&german, "sent").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].to, ["anna@example.com"]);
    assert_eq!(mails[0].subject.as_deref(), Some("Willkommen, <Anna>"));
    let text = mails[0].text_body().unwrap_or_default();
    assert!(text.contains("Hallo <Anna>, your code is X1."), "{text}");
    let html = mails[0].html_body().unwrap_or_default();
    assert!(html.contains("<b>&lt;Anna&gt;</b>"), "{html}");

    // Italian has no variant: the default locale (en), in its latest version.
    let italian = w
        .herald
        .send_accepted(&templated_send(
            "c-it",
            json!({"name": "Luca", "code": "Y2"}),
        ))
        .await;
    w.herald.wait_status(&italian, "sent").await;
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mail");
    let mail = mails
        .iter()
        .find(|m| m.to == ["luca@example.com"])
        .expect("mail to luca");
    assert_eq!(mail.subject.as_deref(), Some("Welcome aboard, Luca"));
    let text = mail.text_body().unwrap_or_default();
    assert!(text.contains("Hello Luca, your code is Y2."), "{text}");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn an_edit_reaches_delivery_once_the_cache_expires() {
    let w = world_with(|c| c.templates.cache_ttl_secs = 1).await;
    let (status, _) = w
        .put_variant("welcome", "en", &welcome("Welcome", "Hi"))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    w.customer("c-1", "ada@example.com", "en").await;
    let send = templated_send("c-1", json!({"name": "Ada", "code": "A"}));
    let id = w.herald.send_accepted(&send).await;
    w.herald.wait_status(&id, "sent").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(mails[0].subject.as_deref(), Some("Welcome, Ada"));

    let (status, _) = w
        .put_variant("welcome", "en", &welcome("Welcome back", "Hi"))
        .await;
    assert_eq!(status, StatusCode::OK);
    // Within the cache's TTL a send may still render the old version; after it, the new one.
    eventually(
        "a send rendered with the edited subject",
        E2E_TIMEOUT,
        || async {
            let id = w.herald.send_accepted(&send).await;
            w.herald.wait_status(&id, "sent").await;
            let latest = w.smtp.messages().last()?.subject.clone();
            (latest.as_deref() == Some("Welcome back, Ada")).then_some(())
        },
    )
    .await;
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_send_can_name_a_compiled_template_too() {
    let w = world().await;
    w.customer("c-de", "anna@example.com", "de-DE").await;
    let send = |variables: Value| {
        json!({
            "recipient": { "customer_id": "c-de" },
            "category": "transactional",
            "channels": ["email"],
            "template": { "code": "order_placed", "variables": variables }
        })
    };
    // Its typed variables are checked when the send is accepted.
    let (status, body) = w.herald.send(&send(json!({"total": "42.00 EUR"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "template.variables.order_number", "{body}");
    // A variable of the wrong type is named too.
    let (status, body) = w
        .herald
        .send(&send(json!({"order_number": 1001, "total": "42.00 EUR"})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "template.variables.order_number", "{body}");

    let id = w
        .herald
        .send_accepted(&send(json!({"order_number": "1001", "total": "42.00 EUR"})))
        .await;
    w.herald.wait_status(&id, "sent").await;
    let mails = w.smtp.wait_for_count(1, E2E_TIMEOUT).await.expect("mail");
    assert_eq!(
        mails[0].subject.as_deref(),
        Some("Ihre Bestellung 1001 ist bestätigt")
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_template_sent_to_a_stored_customer_knows_their_id_and_name() {
    let w = world().await;
    let (status, body) = w
        .put_variant(
            "hello",
            "en",
            &json!({
                "description": "A greeting",
                "subject": "Hello {{ customer_name }}",
                "text": "Your customer id is {{ customer_id }}."
            }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = w
        .herald
        .post(
            "/api/v1/customers",
            &json!({"id": "c-anna", "name": "Anna", "email": "anna@example.com"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let send = |variables: Value| send_of("hello", "c-anna", variables);
    let plain = w.herald.send_accepted(&send(json!({}))).await;
    w.herald.wait_status(&plain, "sent").await;
    // The send's own value wins over the stored one.
    let titled = w
        .herald
        .send_accepted(&send(json!({"customer_name": "Dr. Anna"})))
        .await;
    w.herald.wait_status(&titled, "sent").await;

    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mail");
    let mut subjects: Vec<_> = mails.iter().filter_map(|m| m.subject.clone()).collect();
    subjects.sort();
    assert_eq!(subjects, ["Hello Anna", "Hello Dr. Anna"]);
    let text = mails[0].text_body().unwrap_or_default();
    assert!(text.contains("Your customer id is c-anna."), "{text}");
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_bulk_send_renders_its_template_for_each_recipient_in_their_locale() {
    let w = world().await;
    // Anna's own name wins over the batch's; Luca has no variables of his own.
    let bulk = |template: Value| {
        json!({
            "recipients": [
                { "customer_id": "c-de", "variables": { "name": "Anna" } },
                { "customer_id": "c-it" }
            ],
            "category": "account",
            "channels": ["email"],
            "template": template
        })
    };
    // Refused before anything is stored: an unknown template, content beside a template, a
    // compiled template's variable missing for one recipient, a recipient's variables without a
    // template.
    let welcome_use = json!({ "code": "welcome", "variables": {"name": "friend", "code": "SALE"} });
    let (status, body) = w
        .herald
        .post("/api/v1/notifications/bulk", &bulk(welcome_use.clone()))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "template.code", "{body}");
    let mut both = bulk(welcome_use.clone());
    both["content"] = json!({"text": "hello"});
    let (status, body) = w.herald.post("/api/v1/notifications/bulk", &both).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "content", "{body}");
    let mut orders = bulk(json!({ "code": "order_placed", "variables": {"total": "1 EUR"} }));
    orders["recipients"][0]["variables"] = json!({ "order_number": "1001" });
    let (status, body) = w.herald.post("/api/v1/notifications/bulk", &orders).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "template.variables.order_number", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.ends_with("(recipient c-it)"), "{body}");
    let mut literal = bulk(json!(null));
    literal["content"] = json!({"text": "hello"});
    literal.as_object_mut().expect("object").remove("template");
    let (status, body) = w.herald.post("/api/v1/notifications/bulk", &literal).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "recipients[0].variables", "{body}");

    for (locale, subject, greeting) in [("en", "Welcome", "Hello"), ("de", "Willkommen", "Hallo")] {
        let (status, body) = w
            .put_variant("welcome", locale, &welcome(subject, greeting))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    w.customer("c-de", "anna@example.com", "de-DE").await;
    w.customer("c-it", "luca@example.com", "it-IT").await;
    let (status, accepted) = w
        .herald
        .post("/api/v1/notifications/bulk", &bulk(welcome_use))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let batch = accepted["batch_id"].as_str().expect("batch id").to_string();
    eventually("the batch to be sent", E2E_TIMEOUT, || async {
        let (_, json) = w.herald.get(&format!("/api/v1/batches/{batch}")).await;
        (json["status"] == "done" && json["counts"] == json!([{ "status": "sent", "count": 2 }]))
            .then_some(())
    })
    .await;
    let mails = w.smtp.wait_for_count(2, E2E_TIMEOUT).await.expect("mails");
    let to = |address: &str| {
        mails
            .iter()
            .find(|m| m.to == [address])
            .unwrap_or_else(|| panic!("a mail to {address}"))
    };
    // German for the German customer; the default locale for the Italian one (no variant).
    assert_eq!(
        to("anna@example.com").subject.as_deref(),
        Some("Willkommen, Anna")
    );
    let text = to("anna@example.com").text_body().unwrap_or_default();
    assert!(text.contains("Hallo Anna, your code is SALE."), "{text}");
    assert_eq!(
        to("luca@example.com").subject.as_deref(),
        Some("Welcome, friend")
    );
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn invalid_templates_unknown_codes_and_render_errors_are_clear() {
    let w = world().await;
    let mut broken = welcome("Welcome", "Hi");
    broken["html"] = json!("<p>\n{% if name %}\nno end");
    let (status, body) = w.put_variant("welcome", "en", &broken).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "html", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("syntax error on line"), "{message}");

    let (status, body) = w
        .put_variant("order_placed", "en", &welcome("Welcome", "Hi"))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = w
        .put_variant("welcome", "not a locale", &welcome("Welcome", "Hi"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let reader = herald_engine::apikey::create(w.herald.db(), "reader", "read")
        .await
        .expect("key")
        .token;
    let (status, _) = w
        .herald
        .request_with_key(
            Method::PUT,
            "/api/v1/templates/welcome/locales/en",
            Some(&reader),
            Some(&welcome("Welcome", "Hi")),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    w.customer("c-1", "ada@example.com", "en").await;
    let (status, body) = w
        .herald
        .send(&templated_send("c-1", json!({"name": "Ada"})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "template.code", "{body}");
    let mut both = templated_send("c-1", json!({}));
    both["content"] = json!({"text": "hello"});
    let (status, body) = w.herald.send(&both).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // A variable the template needs is missing: failed at delivery, naming it, not retried.
    let (status, body) = w
        .put_variant("welcome", "en", &welcome("Welcome", "Hi"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = w
        .herald
        .send_accepted(&templated_send("c-1", json!({"name": "Ada"})))
        .await;
    let failed = w.herald.wait_status(&id, "failed").await;
    let reason = failed["status_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("missing variable `code`"), "{failed}");
    assert!(reason.contains("welcome"), "{failed}");
    assert_eq!(failed["attempts"], json!([]), "no channel was tried");
    assert_eq!(w.smtp.count(), 0);
    w.herald.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn preview_renders_runtime_templates_and_delete_removes_them() {
    let w = world().await;
    let (status, _) = w
        .put_variant("welcome", "en", &welcome("Welcome", "Hi"))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = w
        .put_variant("welcome", "de", &welcome("Willkommen", "Hallo"))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // A locale is stored in its usual case, so `de-at` and `de-AT` are one variant.
    let (status, body) = w
        .put_variant("welcome", "de-at", &welcome("Servus", "Servus"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["locale"], "de-AT");
    let (status, _) = w
        .admin(
            Method::DELETE,
            "/api/v1/templates/welcome/locales/de-AT",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let preview = "/api/v1/templates/welcome/preview";
    let (status, body) = w
        .herald
        .post(
            preview,
            &json!({"locale": "fr-FR", "variables": {"name": "A & B", "code": "Z"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["locale"], "en");
    assert_eq!(body["subject"], "Welcome, A & B");
    assert_eq!(body["html"], "<p>Hi <b>A &amp; B</b></p>");
    assert_eq!(body["short"], "Code Z");
    let (_, body) = w
        .herald
        .post(
            preview,
            &json!({"locale": "de-AT", "variables": {"name": "A", "code": "Z"}}),
        )
        .await;
    assert_eq!(body["locale"], "de", "{body}");
    let (status, body) = w
        .herald
        .post(preview, &json!({"variables": {"name": "A"}}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "variables.code", "{body}");

    let (status, _) = w
        .admin(Method::DELETE, "/api/v1/templates/welcome/locales/de", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, detail) = w.herald.get("/api/v1/templates/welcome").await;
    assert_eq!(detail["template"]["locales"], json!(["en"]), "{detail}");
    let (status, _) = w
        .admin(Method::DELETE, "/api/v1/templates/welcome", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = w
        .herald
        .post(preview, &json!({"variables": {"name": "A", "code": "Z"}}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = w
        .admin(Method::DELETE, "/api/v1/templates/order_placed", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = w
        .admin(
            Method::DELETE,
            "/api/v1/templates/order_placed/locales/en",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "conflict", "{body}");
    w.herald.shutdown().await.expect("clean shutdown");
}

/// A customer stored without a locale gets the configured `templates.default_locale`, created
/// or replaced, so a shop whose default is German renders its customers' templates in German.
#[tokio::test]
async fn a_customer_without_a_locale_gets_the_configured_default_locale() {
    let w = world_with(|config| config.templates.default_locale = "de".into()).await;
    let (status, created) = w
        .herald
        .post(
            "/api/v1/customers",
            &json!({"id": "c-default", "email": "default@example.com"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["locale"], "de", "created: {created}");
    let (status, replaced) = w
        .admin(
            Method::PUT,
            "/api/v1/customers/c-default",
            Some(&json!({"email": "default@example.com"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    assert_eq!(replaced["locale"], "de", "replaced: {replaced}");
    w.herald.shutdown().await.expect("clean shutdown");
}
