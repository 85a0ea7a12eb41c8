//! How `herald serve` ends, as a process: SIGTERM is a clean exit (status 0) that finishes the
//! delivery in flight and writes its status first.
//!
//! The other end, exiting with an error once the delivery engine stops on its own
//! (`Herald::engine_stopped`), is tested in process only
//! (`health::a_stopped_engine_turns_readiness_503_and_is_noticed`): nothing outside the process
//! makes the engine's supervisor give up. Only a child whose restart fails, or the channel
//! supervisor stopping, does (see the engine supervisor's docs), and neither follows from a
//! database, NATS or provider fault: the children ride those out rather than stop.

use std::net::SocketAddr;
use std::time::Duration;

use herald_entities::NotificationStatus;
use herald_tests::{
    E2E_TIMEOUT, HeraldProcess, NatsServer, SmtpSink, TestDatabase, eventually, stored_status,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long the test holds the delivery after SIGTERM: longer than the rest of a shutdown takes,
/// well within the grace period (20 s here).
const HELD_AFTER_SIGTERM: Duration = Duration::from_secs(3);

/// The signing secret of the webhook channel (any valid one).
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A webhook receiver that answers 204 to each request only once released, so that a test can
/// hold a delivery in flight.
struct HeldReceiver {
    addr: SocketAddr,
    received: watch::Receiver<usize>,
    release: watch::Sender<bool>,
}

impl HeldReceiver {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("webhook receiver port");
        let addr = listener.local_addr().expect("webhook receiver address");
        let (count, received) = watch::channel(0);
        let release = watch::Sender::new(false);
        let released = release.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (count, released) = (count.clone(), released.subscribe());
                tokio::spawn(answer_when_released(socket, count, released));
            }
        });
        Self {
            addr,
            received,
            release,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/shop-1", self.addr)
    }

    /// Waits until `n` requests have been read.
    async fn wait_for(&self, n: usize) {
        let mut received = self.received.clone();
        tokio::time::timeout(E2E_TIMEOUT, received.wait_for(|&count| count >= n))
            .await
            .unwrap_or_else(|_| panic!("the webhook receiver got no {n} requests in time"))
            .expect("the webhook receiver runs");
    }

    fn count(&self) -> usize {
        *self.received.borrow()
    }

    /// Answers the held requests and those to come.
    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// Reads one HTTP request (headers and a `Content-Length` body), counts it, and answers 204 once
/// released.
async fn answer_when_released(
    mut socket: TcpStream,
    count: watch::Sender<usize>,
    mut released: watch::Receiver<bool>,
) {
    let mut request = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
        if request_complete(&request) {
            break;
        }
    }
    count.send_modify(|count| *count += 1);
    if released.wait_for(|&released| released).await.is_err() {
        return;
    }
    let _ = socket
        .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await;
}

/// Whether `bytes` hold a request's headers and as much body as its `Content-Length` says.
fn request_complete(bytes: &[u8]) -> bool {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let headers = String::from_utf8_lossy(&bytes[..end]);
    let length = headers
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    bytes.len() >= end + 4 + length
}

fn serve_env(nats: &NatsServer, db: &TestDatabase, smtp: &SmtpSink) -> Vec<(String, String)> {
    [
        ("HERALD_NATS__URL", nats.url()),
        ("HERALD_DATABASE__URL", db.url().to_string()),
        ("HERALD_CHANNELS__EMAIL__SMTP_HOST", smtp.host().to_string()),
        ("HERALD_CHANNELS__EMAIL__SMTP_PORT", smtp.port().to_string()),
        ("HERALD_CHANNELS__EMAIL__SECURITY", "none".to_string()),
        (
            "HERALD_CHANNELS__WEBHOOK__SECRET",
            WEBHOOK_SECRET.to_string(),
        ),
        // The receiver is on the loopback interface.
        (
            "HERALD_CHANNELS__WEBHOOK__ALLOW_PRIVATE_TARGETS",
            "true".to_string(),
        ),
        ("HERALD_DISPATCH__SHUTDOWN_GRACE_SECS", "20".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Whether nothing listens on `base`'s port any more.
async fn refuses_connections(base: &str) -> bool {
    let addr = base.trim_start_matches("http://");
    TcpStream::connect(addr).await.is_err()
}

/// A `herald serve` with one webhook delivery held in flight, and what it runs on.
struct Held {
    nats: NatsServer,
    _smtp: SmtpSink,
    _db: TestDatabase,
    _logs: tempfile::TempDir,
    receiver: HeldReceiver,
    herald: HeraldProcess,
    conn: sea_orm::DatabaseConnection,
    /// The notification being delivered.
    id: uuid::Uuid,
}

/// Starts `herald serve` and sends a notification whose webhook delivery the receiver holds.
async fn held_delivery() -> Held {
    herald_tests::init_tracing();
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let receiver = HeldReceiver::start().await;
    let logs = tempfile::tempdir().expect("log dir");
    let herald = HeraldProcess::start(serve_env(&nats, &db, &smtp), logs.path().join("herald.log"))
        .await
        .expect("herald starts");
    let conn = herald_entities::connect(db.url(), 2).await.expect("db");
    let key = herald_engine::apikey::create(&conn, "shutdown test", "send,read")
        .await
        .expect("API key")
        .token;

    // A fresh connection for the request: an idle pooled one would hold HTTP's shutdown back.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let response = client
        .post(format!("{}/api/v1/notifications", herald.base()))
        .bearer_auth(&key)
        .json(&json!({
            "recipient": { "webhook_url": receiver.url() },
            "category": "transactional",
            "channels": ["webhook"],
            "content": { "subject": "Order shipped", "text": "Your order #1001 is on its way." }
        }))
        .send()
        .await
        .expect("send request");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let body: Value = response.json().await.expect("JSON answer");
    let id: uuid::Uuid = body["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no id in {body}"));
    receiver.wait_for(1).await;
    Held {
        nats,
        _smtp: smtp,
        _db: db,
        _logs: logs,
        receiver,
        herald,
        conn,
        id,
    }
}

/// SIGTERM while a delivery is in flight: HTTP stops at once, the delivery finishes, its status is
/// written and its command acked, and then the process exits with status 0.
#[tokio::test]
async fn sigterm_finishes_the_delivery_in_flight_and_exits_0() {
    let held = held_delivery().await;
    // The servers and the log folder stay in `held` until the end.
    let Held {
        nats,
        receiver,
        mut herald,
        conn,
        id,
        ..
    } = held;

    herald.sigterm().expect("SIGTERM");
    eventually(
        "herald to stop listening after SIGTERM",
        Duration::from_secs(10),
        || async { refuses_connections(&herald.base()).await.then_some(()) },
    )
    .await;
    // It must not exit while the delivery is held: given the time a shutdown that did not wait
    // would take to end, it stays.
    assert!(
        herald.wait_exit(HELD_AFTER_SIGTERM).await.is_err(),
        "herald exited with a delivery in flight; log:\n{}",
        herald.log_tail()
    );
    receiver.release();
    let status = herald
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("herald exits after SIGTERM");
    assert!(
        status.success(),
        "herald exited with {status}; log:\n{}",
        herald.log_tail()
    );

    assert_eq!(
        stored_status(&conn, id).await,
        NotificationStatus::Sent,
        "the delivery's status was written before the exit"
    );
    let js = async_nats::jetstream::new(nats.client().await.expect("NATS client"));
    eventually(
        "the command to be acked, not left to redeliver",
        Duration::from_secs(5),
        || async {
            let stream = js
                .get_stream(herald_nats::subjects::NOTIFY_STREAM)
                .await
                .ok()?;
            (stream.cached_info().state.messages == 0).then_some(())
        },
    )
    .await;
    assert_eq!(receiver.count(), 1, "delivered once");
}

/// A second SIGTERM (or Ctrl-C) during the shutdown exits at once, with an error and a log line
/// saying so, instead of waiting out the delivery in flight: the signal handler installed for the
/// first one used to swallow it.
#[tokio::test]
async fn a_second_sigterm_during_the_shutdown_exits_at_once() {
    let mut held = held_delivery().await;
    let herald = &mut held.herald;
    herald.sigterm().expect("SIGTERM");
    eventually(
        "herald to stop listening after SIGTERM",
        Duration::from_secs(10),
        || async { refuses_connections(&herald.base()).await.then_some(()) },
    )
    .await;
    herald.sigterm().expect("a second SIGTERM");
    // The delivery is held for ever and the grace period is 20 s: only the second signal ends it.
    let status = herald
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("herald exits at once on a second SIGTERM");
    assert!(!status.success(), "exited with {status}: not a clean stop");
    let log = herald.log_tail();
    assert!(
        log.contains("a second signal during the shutdown"),
        "the log says why: {log}"
    );
    assert_eq!(held.receiver.count(), 1, "the delivery was still held");
}
