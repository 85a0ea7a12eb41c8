//! The conditional contact updates the Delivery actor makes when a provider declares a customer's
//! contact dead or moved, against the suite's database (SQLite or PostgreSQL, as `HERALD_TEST_DB`
//! says): each changes the stored contact only while it still holds the value the failed send
//! used, so a contact a `PUT /customers/{id}` wrote meanwhile is kept (`false`), and an unknown
//! customer is no change (`false`).

use herald_entities::customer;
use herald_entities::repo::customers::{self, CustomerFields, WebhookSecretChange};
use herald_tests::{TestDatabase, migrated};
use sea_orm::DatabaseConnection;

/// The customer every test works on.
const ADA: &str = "ada";

/// A customer with a contact on every channel the updates touch.
fn contacts(telegram_chat_id: &str, webhook_url: &str, push_tokens: &[&str]) -> CustomerFields {
    CustomerFields {
        email: Some("ada@example.com".into()),
        telegram_chat_id: Some(telegram_chat_id.into()),
        webhook_url: Some(webhook_url.into()),
        push_tokens: push_tokens.iter().map(|t| t.to_string()).collect(),
        locale: "en".into(),
        timezone: "UTC".into(),
        ..Default::default()
    }
}

/// A migrated database holding [`ADA`] with these contacts.
async fn with_ada(database: &TestDatabase, fields: CustomerFields) -> DatabaseConnection {
    let db = migrated(database.url()).await.expect("database migrated");
    customers::create(&db, ADA, fields)
        .await
        .expect("customer stored")
        .expect("a new customer");
    db
}

/// What a `PUT /customers/{id}` does: replaces the customer's contacts.
async fn put(db: &DatabaseConnection, fields: CustomerFields) -> customer::Model {
    customers::update(db, ADA, fields)
        .await
        .expect("PUT written")
        .expect("the customer exists")
}

async fn stored(db: &DatabaseConnection) -> customer::Model {
    customers::find_by_external_id(db, ADA)
        .await
        .expect("read")
        .expect("the customer exists")
}

#[tokio::test]
async fn a_telegram_chat_id_is_cleared_only_while_the_customer_still_holds_it() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = with_ada(
        &database,
        contacts("100", "https://hooks.example.com/a", &[]),
    )
    .await;
    let changed = put(&db, contacts("200", "https://hooks.example.com/a", &[])).await;

    let cleared = customers::clear_telegram_chat_id(&db, ADA, "100").await;
    assert!(
        !cleared.expect("ran"),
        "the PUT changed the chat id meanwhile"
    );
    assert_eq!(
        stored(&db).await,
        changed,
        "the chat id the PUT wrote is kept"
    );

    let cleared = customers::clear_telegram_chat_id(&db, ADA, "200").await;
    assert!(
        cleared.expect("ran"),
        "the chat id is still the one to clear"
    );
    let after = stored(&db).await;
    assert_eq!(after.telegram_chat_id, None);
    assert_eq!(
        after.webhook_url, changed.webhook_url,
        "other contacts untouched"
    );
    assert!(after.updated_at > changed.updated_at, "{after:?}");

    let unknown = customers::clear_telegram_chat_id(&db, "nobody", "200").await;
    assert!(!unknown.expect("ran"), "no such customer");
}

#[tokio::test]
async fn a_webhook_url_is_cleared_only_while_the_customer_still_holds_it() {
    let (old, new) = (
        "https://hooks.example.com/old",
        "https://hooks.example.com/new",
    );
    let database = TestDatabase::from_env().await.expect("test database");
    let db = with_ada(&database, contacts("100", old, &[])).await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let changed = put(
        &db,
        CustomerFields {
            webhook_secret: WebhookSecretChange::Set(secret.into()),
            ..contacts("100", new, &[])
        },
    )
    .await;
    assert_eq!(changed.webhook_secret.as_deref(), Some(secret));

    let cleared = customers::clear_webhook_url(&db, ADA, old).await;
    assert!(!cleared.expect("ran"), "the PUT changed the URL meanwhile");
    assert_eq!(stored(&db).await, changed, "the URL the PUT wrote is kept");

    let cleared = customers::clear_webhook_url(&db, ADA, new).await;
    assert!(cleared.expect("ran"), "the URL is still the one to clear");
    let after = stored(&db).await;
    assert_eq!(after.webhook_url, None);
    assert_eq!(
        after.webhook_secret, None,
        "the URL's own signing secret goes with it"
    );
    assert_eq!(
        after.telegram_chat_id, changed.telegram_chat_id,
        "other contacts untouched"
    );
    assert!(after.updated_at > changed.updated_at, "{after:?}");

    let unknown = customers::clear_webhook_url(&db, "nobody", new).await;
    assert!(!unknown.expect("ran"), "no such customer");
}

#[tokio::test]
async fn a_telegram_chat_id_is_moved_only_while_the_customer_still_holds_the_old_one() {
    let hook = "https://hooks.example.com/a";
    let database = TestDatabase::from_env().await.expect("test database");
    let db = with_ada(&database, contacts("-100", hook, &[])).await;
    let before = stored(&db).await;

    let moved = customers::move_telegram_chat_id(&db, ADA, "-100", "-1001").await;
    assert!(
        moved.expect("ran"),
        "the chat id is still the one that moved"
    );
    let after = stored(&db).await;
    assert_eq!(after.telegram_chat_id.as_deref(), Some("-1001"));
    assert_eq!(
        after.webhook_url, before.webhook_url,
        "other contacts untouched"
    );
    assert!(after.updated_at > before.updated_at, "{after:?}");

    // Another send of the old id learns of the move late: the id stored meanwhile is kept.
    let moved = customers::move_telegram_chat_id(&db, ADA, "-100", "-1002").await;
    assert!(!moved.expect("ran"), "the chat id moved meanwhile");
    assert_eq!(stored(&db).await, after, "the id moved to first is kept");

    let changed = put(&db, contacts("300", hook, &[])).await;
    let moved = customers::move_telegram_chat_id(&db, ADA, "-1001", "-1003").await;
    assert!(
        !moved.expect("ran"),
        "the PUT changed the chat id meanwhile"
    );
    assert_eq!(
        stored(&db).await,
        changed,
        "the chat id the PUT wrote is kept"
    );

    let unknown = customers::move_telegram_chat_id(&db, "nobody", "300", "-1003").await;
    assert!(!unknown.expect("ran"), "no such customer");
}

#[tokio::test]
async fn a_dead_push_token_is_removed_only_while_the_customer_still_holds_it() {
    let hook = "https://hooks.example.com/a";
    let database = TestDatabase::from_env().await.expect("test database");
    let db = with_ada(&database, contacts("100", hook, &["dead", "live"])).await;
    let before = stored(&db).await;

    let removed = customers::remove_push_token(&db, ADA, "dead").await;
    assert!(removed.expect("ran"), "the token is still there to remove");
    let after = stored(&db).await;
    assert_eq!(customers::push_tokens(&after), ["live"]);
    assert_eq!(
        after.telegram_chat_id, before.telegram_chat_id,
        "other contacts untouched"
    );
    assert!(after.updated_at > before.updated_at, "{after:?}");

    let removed = customers::remove_push_token(&db, ADA, "dead").await;
    assert!(!removed.expect("ran"), "the token is gone already");
    assert_eq!(stored(&db).await, after, "nothing written");

    let changed = put(&db, contacts("100", hook, &["other"])).await;
    let removed = customers::remove_push_token(&db, ADA, "live").await;
    assert!(
        !removed.expect("ran"),
        "the PUT replaced the tokens meanwhile"
    );
    assert_eq!(
        stored(&db).await,
        changed,
        "the tokens the PUT wrote are kept"
    );

    // A PUT that kept the dead token among new ones: only the dead one goes.
    put(&db, contacts("100", hook, &["dead", "new"])).await;
    let removed = customers::remove_push_token(&db, ADA, "dead").await;
    assert!(removed.expect("ran"), "the dead token is still stored");
    assert_eq!(customers::push_tokens(&stored(&db).await), ["new"]);

    let unknown = customers::remove_push_token(&db, "nobody", "other").await;
    assert!(!unknown.expect("ran"), "no such customer");
}

/// The customers with stored wishes holding `token`, by external id.
async fn holding_token(db: &DatabaseConnection, token: &str) -> Vec<String> {
    let set = customers::ContactSet {
        push_tokens: vec![token.into()],
        ..Default::default()
    };
    customers::with_wishes_holding(db, &[set])
        .await
        .expect("holders read")
        .into_iter()
        .map(|customer| customer.external_id)
        .collect()
}

/// The lookup of whose push token a send names finds the customer by the tokens they hold now:
/// as stored, as a `PUT` replaced them and as a dead one was removed (on SQLite the tokens are
/// found in `customer_push_tokens`, which triggers keep).
#[tokio::test]
async fn a_push_token_is_found_on_the_customer_holding_it_now() {
    let database = TestDatabase::from_env().await.expect("test database");
    let db = with_ada(
        &database,
        contacts("100", "https://hooks.example.com/a", &["t1"]),
    )
    .await;
    let opt_out = vec![herald_entities::repo::preferences::NewPreference {
        category: "marketing".into(),
        channel: "*".into(),
        enabled: false,
    }];
    herald_entities::repo::preferences::replace(&db, ADA, opt_out, None)
        .await
        .expect("wishes stored");
    assert_eq!(holding_token(&db, "t1").await, [ADA], "as stored");

    put(
        &db,
        contacts("100", "https://hooks.example.com/a", &["t2", "t3"]),
    )
    .await;
    assert!(holding_token(&db, "t1").await.is_empty(), "replaced");
    assert_eq!(holding_token(&db, "t3").await, [ADA], "as the PUT wrote");

    assert!(
        customers::remove_push_token(&db, ADA, "t3")
            .await
            .expect("removed")
    );
    assert!(holding_token(&db, "t3").await.is_empty(), "removed as dead");
    assert_eq!(
        holding_token(&db, "t2").await,
        [ADA],
        "the other token kept"
    );
}

/// A secret replaced for the same webhook URL is kept with the time of its replacement, to sign
/// alongside the new one during the rotation grace; only the last one replaced is kept. Setting
/// the same secret again changes nothing. Another URL, `""` and a URL that answered 410 Gone
/// drop both secrets: a secret belongs to its endpoint.
#[tokio::test]
async fn a_replaced_webhook_secret_is_kept_for_its_url_only() {
    let (a, b) = ("https://hooks.example.com/a", "https://hooks.example.com/b");
    let database = TestDatabase::from_env().await.expect("test database");
    let db = with_ada(&database, contacts("100", a, &[])).await;
    let set = |url: &str, secret: &str| CustomerFields {
        webhook_secret: WebhookSecretChange::Set(secret.into()),
        ..contacts("100", url, &[])
    };
    let secrets = |row: &customer::Model| {
        (
            row.webhook_secret.clone(),
            row.previous_webhook_secret.clone(),
            row.webhook_secret_replaced_at.is_some(),
        )
    };
    let some = |s: &str| Some(s.to_string());

    let first = put(&db, set(a, "whsec_one")).await;
    assert_eq!(secrets(&first), (some("whsec_one"), None, false));
    let before = chrono::Utc::now();
    let rotated = put(&db, set(a, "whsec_two")).await;
    let after = chrono::Utc::now();
    assert_eq!(
        secrets(&rotated),
        (some("whsec_two"), some("whsec_one"), true)
    );
    let replaced_at = rotated.webhook_secret_replaced_at.expect("dated");
    assert!(
        (before..=after).contains(&replaced_at),
        "{replaced_at} within {before}..{after}"
    );
    let kept = put(&db, contacts("100", a, &[])).await;
    assert_eq!(
        (secrets(&kept), kept.webhook_secret_replaced_at),
        (secrets(&rotated), Some(replaced_at)),
        "a PUT without a secret keeps both"
    );
    let again = put(&db, set(a, "whsec_two")).await;
    assert_eq!(
        (secrets(&again), again.webhook_secret_replaced_at),
        (secrets(&rotated), Some(replaced_at)),
        "the same secret again is no rotation"
    );
    let third = put(&db, set(a, "whsec_three")).await;
    assert_eq!(
        secrets(&third),
        (some("whsec_three"), some("whsec_two"), true),
        "only the last secret replaced is kept"
    );

    let moved = put(&db, contacts("100", b, &[])).await;
    assert_eq!(
        secrets(&moved),
        (None, None, false),
        "another URL drops both"
    );
    put(&db, set(b, "whsec_one")).await;
    let moved_with_secret = put(&db, set(a, "whsec_two")).await;
    assert_eq!(
        secrets(&moved_with_secret),
        (some("whsec_two"), None, false),
        "a secret for another URL replaces none"
    );
    put(&db, set(a, "whsec_three")).await;
    let removed = put(
        &db,
        CustomerFields {
            webhook_secret: WebhookSecretChange::Remove,
            ..contacts("100", a, &[])
        },
    )
    .await;
    assert_eq!(secrets(&removed), (None, None, false), "\"\" drops both");

    put(&db, set(a, "whsec_one")).await;
    put(&db, set(a, "whsec_two")).await;
    let gone = customers::clear_webhook_url(&db, ADA, a).await;
    assert!(gone.expect("ran"), "the URL is the one to clear");
    assert_eq!(
        secrets(&stored(&db).await),
        (None, None, false),
        "a URL that is gone takes both its secrets"
    );
}
