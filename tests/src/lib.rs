//! End-to-end test harness for Herald: real external parts, one set per test.
//!
//! Each piece is started by the test that needs it and torn down when dropped, so
//! tests run in parallel without sharing state:
//!
//! - [`NatsServer`]: a `nats-server -js` child process on a free loopback port, with
//!   its file store in a temporary directory; it can be killed and restarted on the same
//!   port and store to test recovery.
//! - [`NatsCluster`]: three such servers clustered, for replicated streams whose leaders change.
//! - [`SmtpSink`]: a real SMTP server on `127.0.0.1:0` that keeps every accepted message
//!   ([`ReceivedMail`]), with injectable rejections and outages.
//! - [`TestDatabase`]: a fresh SQLite file or a fresh PostgreSQL database, chosen with
//!   `HERALD_TEST_DB=sqlite|postgres` so the same suite runs against both.
//! - [`DatabaseOutage`]: takes that database away from Herald for a while (a [`TcpProxy`] cut for
//!   PostgreSQL, a held write lock for SQLite).
//! - [`eventually`]: the bounded wait for a state of an external system ([`eventually_showing`]
//!   also reports the last state seen).
//!
//! Waiting is always bounded and fails with a message saying what was awaited; nothing
//! sleeps to synchronise.
//!
//! Environment: `NATS_SERVER_BIN` (default `/usr/sbin/nats-server`), `HERALD_TEST_DB`,
//! `HERALD_TEST_PG_HOST` (default `/var/run/postgresql`), `HERALD_TEST_PG_USER`
//! (default `root`), `RUST_LOG` (default `warn`, see [`init_tracing`]).

pub mod database;
pub mod db_outage;
pub mod herald;
pub mod nats_server;
pub mod process;
pub mod smtp_sink;
pub mod wait;

pub use database::{DatabaseKind, PgServer, TestDatabase, migrated};
pub use db_outage::{DatabaseOutage, TcpProxy, Upstream, WriteHold};
pub use herald::{E2E_TIMEOUT, TestHerald, test_config};
pub use nats_server::{NatsCluster, NatsServer};
pub use process::HeraldProcess;
pub use smtp_sink::{HangUp, ReceivedMail, RejectStage, SmtpSink};
pub use wait::{eventually, eventually_showing, free_port};

use std::sync::Once;

/// Installs a tracing subscriber that writes through the test harness's captured
/// output, filtered by `RUST_LOG` (default `warn`). Safe to call from every test.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        // Another subscriber may already be installed by the test itself: keep it.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

/// The stored status of notification `id`; panics if it is not stored.
pub async fn stored_status(
    db: &sea_orm::DatabaseConnection,
    id: uuid::Uuid,
) -> herald_entities::NotificationStatus {
    herald_entities::repo::notifications::find(db, id)
        .await
        .expect("notification read")
        .expect("notification stored")
        .status
}

/// The events on `notify.status.<status>` about notification `id` that `NOTIFY_STATUS` stores,
/// oldest first (none while the stream does not exist).
pub async fn status_events(
    nats: &NatsServer,
    status: &str,
    id: uuid::Uuid,
) -> Vec<serde_json::Value> {
    let subject = format!("notify.status.{status}");
    all_status_events(nats, id)
        .await
        .into_iter()
        .filter(|(on, _)| *on == subject)
        .map(|(_, event)| event)
        .collect()
}

/// Every event about notification `id` that `NOTIFY_STATUS` stores, with its subject, in the
/// stream's order (none while the stream does not exist).
pub async fn all_status_events(
    nats: &NatsServer,
    id: uuid::Uuid,
) -> Vec<(String, serde_json::Value)> {
    let client = nats.client().await.expect("NATS client");
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream("NOTIFY_STATUS").await else {
        return Vec::new();
    };
    let state = stream
        .info()
        .await
        .expect("NOTIFY_STATUS info")
        .state
        .clone();
    let mut events = Vec::new();
    if state.messages == 0 {
        return events;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream
            .get_raw_message(sequence)
            .await
            .expect("a status event (none is deleted)");
        let event: serde_json::Value =
            serde_json::from_slice(&message.payload).expect("a status event is JSON");
        if event["notification_id"] == id.to_string() {
            events.push((message.subject.to_string(), event));
        }
    }
    events
}

/// How many times JetStream had delivered the message an answer (ack, progress, NAK) is for, with
/// its stream, read from the answer's subject: `$JS.ACK.<stream>.<consumer>.<delivered>.…`, or
/// with a domain and account hash before the stream.
pub fn delivered_of_ack(subject: &str) -> Option<(String, u64)> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let (stream, delivered) = match tokens.len() {
        9 => (tokens[2], tokens[4]),
        n if n >= 11 => (tokens[4], tokens[6]),
        _ => return None,
    };
    Some((stream.to_string(), delivered.parse().ok()?))
}

/// The send command of a transactional email of `text` to `to` for notification `id`, as the
/// API publishes one.
pub fn email_command(id: uuid::Uuid, to: &str, text: &str) -> herald_nats::SendCommand {
    herald_nats::SendCommand {
        v: herald_nats::SCHEMA_VERSION,
        notification_id: id,
        customer_id: None,
        contacts: herald_nats::Contacts {
            email: Some(to.into()),
            ..Default::default()
        },
        category: herald_nats::Category::Transactional,
        channels: vec![herald_nats::Channel::Email],
        content: herald_nats::Content {
            subject: None,
            text: text.into(),
            html: None,
            short: None,
            template: None,
        },
        created_at: chrono::Utc::now(),
    }
}

/// A `queued` email notification for ada@example.com, as the API stores one, ready to insert.
pub fn queued_notification(
    request_id: Option<String>,
) -> herald_entities::repo::notifications::NewNotification {
    herald_entities::repo::notifications::NewNotification {
        id: uuid::Uuid::now_v7(),
        request_id,
        request_fingerprint: None,
        customer_id: None,
        recipient_key: "ada@example.com".into(),
        contacts: serde_json::json!({"email": "ada@example.com"}),
        category: "transactional".into(),
        channels: serde_json::json!(["email"]),
        content: serde_json::json!({"text": "Your order shipped."}),
        status: herald_entities::NotificationStatus::Queued,
        scheduled_at: None,
        status_reason: None,
        created_at: chrono::Utc::now(),
    }
}
