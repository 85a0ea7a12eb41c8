//! The pull loop that the Router and the Dispatcher run (`herald_actors::pull`), against a real
//! nats-server: a loop held back by its gate (the Dispatcher's partition lease) or stopped hands
//! its messages back to JetStream once, returns, and delivers them when let through, instead of
//! NAKing them back into its own pull request thousands of times a second. The last tests freeze a
//! whole instance past its lease deadline, and change the leader of a dispatch consumer in a NATS
//! cluster under a running instance.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull, stream};
use futures::StreamExt;
use herald_actors::pull::{Gate, Open, Pull, pull_loop};
use herald_entities::{NotificationStatus, repo};
use herald_nats::NatsError;
use herald_nats::subjects::{self, partition_for};
use herald_tests::{
    HeraldProcess, NatsCluster, NatsServer, SmtpSink, TestDatabase, TestHerald, eventually,
    migrated, queued_notification, stored_status, test_config,
};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);
const STREAM: &str = "PULL_LOOP";
const CONSUMER: &str = "loop";
/// Far longer than any wait here: a message seen again within it was handed back, not timed out.
const ACK_WAIT: Duration = Duration::from_secs(60);
/// Deliveries of one message that a hand-back may cost: the one held back, the one delivered,
/// and one to spare.
const MAX_DELIVERIES: i64 = 3;

/// A message handed on by the loop, with its permit.
type Handed = (Box<jetstream::Message>, OwnedSemaphorePermit);

/// A gate the test opens and closes; it counts how often the loop found it closed.
#[derive(Clone)]
struct Switch {
    open: Arc<watch::Sender<bool>>,
    refusals: Arc<watch::Sender<usize>>,
}

impl Switch {
    fn new(open: bool) -> Self {
        Self {
            open: Arc::new(watch::Sender::new(open)),
            refusals: Arc::new(watch::Sender::new(0)),
        }
    }

    fn set(&self, open: bool) {
        self.open.send_replace(open);
    }

    /// Waits until the loop has found the gate closed at least `times` times.
    async fn refused(&self, times: usize) {
        let mut refusals = self.refusals.subscribe();
        tokio::time::timeout(WAIT, refusals.wait_for(|&n| n >= times))
            .await
            .unwrap_or_else(|_| panic!("the loop never found the gate closed {times} time(s)"))
            .expect("the gate is alive");
    }
}

impl Gate for Switch {
    fn is_open(&self) -> bool {
        let open = *self.open.borrow();
        if !open {
            self.refusals.send_modify(|n| *n += 1);
        }
        open
    }

    fn opened(&self) -> impl Future<Output = ()> + Send {
        let mut open = self.open.subscribe();
        async move {
            let _ = open.wait_for(|&open| open).await;
        }
    }
}

/// A file-backed stream with one durable pull consumer (explicit acks, ack wait [`ACK_WAIT`]).
async fn consumer(nats: &NatsServer) -> (jetstream::Context, PullConsumer) {
    let js = jetstream::new(nats.client().await.expect("nats client"));
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["pull.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream created");
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            ..Default::default()
        })
        .await
        .expect("consumer created");
    (js, consumer)
}

async fn publish(js: &jetstream::Context, count: usize) {
    for i in 0..count {
        js.publish("pull.one", format!("message {i}").into())
            .await
            .expect("published")
            .await
            .expect("stored");
    }
}

/// Starts a loop over `consumer` that sends what it hands on to the returned receiver.
fn start<G: Gate + 'static>(
    consumer: &PullConsumer,
    gate: G,
    permits: usize,
    stop: &CancellationToken,
) -> (JoinHandle<()>, mpsc::UnboundedReceiver<Handed>) {
    let (handed, received) = mpsc::unbounded_channel();
    let bound = consumer.clone();
    let pull = Pull {
        what: "test messages",
        consumer: Some(consumer.clone()),
        bind: move || std::future::ready(Ok::<_, NatsError>(bound.clone())),
        batch: Some(10),
        gate,
        permits: Arc::new(Semaphore::new(permits)),
        stop: stop.clone(),
    };
    let running = tokio::spawn(pull_loop(pull, move |message, permit| {
        handed
            .send((message, permit))
            .map_err(|mpsc::error::SendError((message, _))| message)
    }));
    (running, received)
}

/// The next message the loop hands on, within [`WAIT`].
async fn handed_on(received: &mut mpsc::UnboundedReceiver<Handed>, what: &str) -> Handed {
    tokio::time::timeout(WAIT, received.recv())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing handed on within {WAIT:?}"))
        .expect("the loop is running")
}

fn deliveries(message: &jetstream::Message) -> i64 {
    message.info().expect("a JetStream message").delivered
}

/// Waits until the loop has a pull request waiting on the server.
async fn wait_pulling(js: &jetstream::Context) {
    let stream = js.get_stream(STREAM).await.expect("stream");
    eventually("the loop's pull request on the server", WAIT, || {
        let stream = stream.clone();
        async move {
            let info = stream.consumer_info(CONSUMER).await.ok()?;
            (info.num_waiting > 0).then_some(())
        }
    })
    .await;
}

async fn ends(running: JoinHandle<()>, what: &str) {
    tokio::time::timeout(WAIT, running)
        .await
        .unwrap_or_else(|_| panic!("{what}: the loop did not return within {WAIT:?}"))
        .expect("the loop did not panic");
}

#[tokio::test]
async fn a_loop_started_while_held_back_delivers_once_let_through() {
    let nats = NatsServer::start().await.expect("nats");
    let (js, consumer) = consumer(&nats).await;
    publish(&js, 1).await;
    let gate = Switch::new(false);
    let stop = CancellationToken::new();
    let (running, mut received) = start(&consumer, gate.clone(), 4, &stop);

    gate.refused(1).await;
    gate.set(true);
    let (message, _permit) = handed_on(&mut received, "after the gate opened").await;
    assert!(
        deliveries(&message) <= MAX_DELIVERIES,
        "delivered {} times: the held-back message went round in a loop",
        deliveries(&message)
    );
    message.ack().await.expect("acked");

    stop.cancel();
    ends(running, "stopped").await;
}

#[tokio::test]
async fn a_message_arriving_while_held_back_is_handed_back_once_and_delivered_later() {
    let nats = NatsServer::start().await.expect("nats");
    let (js, consumer) = consumer(&nats).await;
    let gate = Switch::new(true);
    let stop = CancellationToken::new();
    let (running, mut received) = start(&consumer, gate.clone(), 4, &stop);

    wait_pulling(&js).await;
    // The lease runs out while the loop waits for messages; then one arrives.
    gate.set(false);
    publish(&js, 1).await;
    gate.refused(1).await;
    gate.set(true);

    let (message, _permit) = handed_on(&mut received, "after the gate opened again").await;
    assert!(
        (2..=MAX_DELIVERIES).contains(&deliveries(&message)),
        "delivered {} times: held back once, then delivered",
        deliveries(&message)
    );
    message.ack().await.expect("acked");

    stop.cancel();
    ends(running, "stopped").await;
}

#[tokio::test]
async fn a_held_back_loop_returns_when_stopped() {
    let nats = NatsServer::start().await.expect("nats");
    let (js, consumer) = consumer(&nats).await;
    publish(&js, 1).await;
    let gate = Switch::new(false);
    let stop = CancellationToken::new();
    let (running, _received) = start(&consumer, gate.clone(), 4, &stop);

    gate.refused(1).await;
    stop.cancel();
    ends(running, "stopped while held back").await;
}

#[tokio::test]
async fn a_stopped_loop_returns_and_hands_back_what_it_had_fetched() {
    let nats = NatsServer::start().await.expect("nats");
    let (js, consumer) = consumer(&nats).await;
    publish(&js, 3).await;
    let stop = CancellationToken::new();
    // One permit: the loop fetches all three but hands on only the first while it is held.
    let (running, mut received) = start(&consumer, Open, 1, &stop);
    let (first, _permit) = handed_on(&mut received, "the first message").await;

    stop.cancel();
    ends(running, "stopped with fetched messages").await;

    // Another reader gets the two others well before their ack wait: they were handed back.
    let mut rest = consumer
        .stream()
        .max_messages_per_batch(10)
        .messages()
        .await
        .expect("a second reader");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let message = tokio::time::timeout(WAIT, rest.next())
            .await
            .unwrap_or_else(|_| panic!("only {seen:?} handed back within {WAIT:?}"))
            .expect("the second reader is open")
            .expect("a message");
        assert!(
            deliveries(&message) <= MAX_DELIVERIES,
            "{:?} delivered {} times: handed back into the loop's own pull request",
            message.payload,
            deliveries(&message)
        );
        seen.push(String::from_utf8_lossy(&message.payload).into_owned());
        message.ack().await.expect("acked");
    }
    seen.sort();
    assert_eq!(seen, ["message 1", "message 2"]);
    assert_eq!(first.payload.as_ref(), b"message 0");
}

/// Loops stopped one after another while messages keep arriving (a partition handed over under
/// load, a dispatcher restarted): each stopped loop ends its pull requests before it lets go of
/// its subscription, and hands back what was on its way, so every message reaches the next loop
/// well before its ack wait. A loop that merely dropped its subscription lost the messages the
/// server was sending it at that moment until `ack_wait` (a minute here).
#[tokio::test]
async fn loops_stopped_while_messages_arrive_lose_none_to_the_ack_wait() {
    const MESSAGES: usize = 400;
    const LOOPS: usize = 8;
    let nats = NatsServer::start().await.expect("nats");
    let (js, consumer) = consumer(&nats).await;
    let publishing = tokio::spawn({
        let js = js.clone();
        async move { publish(&js, MESSAGES).await }
    });
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..LOOPS {
        let stop = CancellationToken::new();
        let (running, mut received) = start(&consumer, Open, MESSAGES, &stop);
        // Each loop takes a few messages, then is stopped while the publisher goes on.
        for _ in 0..MESSAGES / LOOPS / 2 {
            let (message, _permit) = handed_on(&mut received, &format!("loop {round}")).await;
            message.ack().await.expect("acked");
            seen.insert(message.payload.clone());
        }
        stop.cancel();
        ends(running, &format!("loop {round}")).await;
        // What the loop had handed on before it returned is taken like any delivery.
        while let Ok((message, _permit)) = received.try_recv() {
            message.ack().await.expect("acked");
            seen.insert(message.payload.clone());
        }
    }
    publishing.await.expect("the publisher did not panic");
    let stop = CancellationToken::new();
    let (running, mut received) = start(&consumer, Open, MESSAGES, &stop);
    while seen.len() < MESSAGES {
        let next = tokio::time::timeout(WAIT, received.recv()).await;
        let Ok(Some((message, _permit))) = next else {
            panic!(
                "{} of {MESSAGES} messages delivered within {WAIT:?} of the last stop: the rest \
                 wait out the ack wait ({ACK_WAIT:?}), lost by a stopped loop",
                seen.len()
            );
        };
        message.ack().await.expect("acked");
        seen.insert(message.payload.clone());
    }
    stop.cancel();
    ends(running, "the last loop").await;
}

/// Lease time-to-live of the instance below: short, so its leases run out within the test.
const LEASE_TTL_MS: u64 = 3_000;
/// Command partitions (the default).
const PARTITIONS: u32 = 8;

/// The production case: an instance frozen past its lease deadline (starved of CPU, a suspended
/// VM) while a command waits in its partition's pull request. Once it runs again its pull loop
/// finds the lease not renewed and hands the command back; it must deliver it once the lease is
/// renewed, rather than NAK it back into its own pull request for ever while the lease keeper
/// keeps the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_frozen_past_its_lease_delivers_the_waiting_command_once_it_runs_again() {
    let nats = NatsServer::start().await.expect("nats");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    let logs = tempfile::tempdir().expect("logs");
    let env = [
        ("HERALD_NATS__URL", nats.url()),
        ("HERALD_DATABASE__URL", db.url().to_string()),
        ("HERALD_CHANNELS__EMAIL__SMTP_HOST", smtp.host().to_string()),
        ("HERALD_CHANNELS__EMAIL__SMTP_PORT", smtp.port().to_string()),
        ("HERALD_CHANNELS__EMAIL__SECURITY", "none".to_string()),
        // Far longer than the waits below: only a hand-back can bring the command round again.
        ("HERALD_NATS__ACK_WAIT_SECS", ACK_WAIT.as_secs().to_string()),
        ("HERALD_CLUSTER__LEASE_TTL_MS", LEASE_TTL_MS.to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .to_vec();
    let instance = HeraldProcess::start(env, logs.path().join("herald.log"))
        .await
        .expect("herald starts");
    let conn = migrated(db.url()).await.expect("database");
    let js = jetstream::new(nats.client().await.expect("nats client"));

    let notification = queued_notification(None);
    let (id, partition) = (
        notification.id,
        partition_for(&notification.recipient_key, PARTITIONS),
    );
    let consumer_name = subjects::dispatch_consumer(partition);
    let commands = js
        .get_stream(subjects::NOTIFY_STREAM)
        .await
        .expect("commands stream");
    eventually("the instance pulling the partition", WAIT, || {
        let commands = commands.clone();
        let name = consumer_name.clone();
        async move {
            let info = commands.consumer_info(&name).await.ok()?;
            (info.num_waiting > 0).then_some(())
        }
    })
    .await;
    repo::notifications::insert(&conn, notification)
        .await
        .expect("notification stored");

    instance.freeze().expect("SIGSTOP");
    let command = herald_tests::email_command(id, "ada@example.com", "Your order shipped.");
    js.publish(
        subjects::command_subject(partition),
        command.encode().expect("encoded"),
    )
    .await
    .expect("published")
    .await
    .expect("stored");
    eventually(
        "the command sent into the frozen instance's pull request",
        WAIT,
        || {
            let commands = commands.clone();
            let name = consumer_name.clone();
            async move {
                let info = commands.consumer_info(&name).await.ok()?;
                (info.num_ack_pending == 1).then_some(())
            }
        },
    )
    .await;
    // Its lease runs out of the bucket while it is frozen.
    let leases = js
        .get_key_value(herald_nats::leases::LEASE_BUCKET)
        .await
        .expect("lease bucket");
    eventually("the frozen instance's lease to expire", WAIT, || {
        let leases = leases.clone();
        async move {
            let key = herald_nats::leases::partition_key(partition);
            matches!(leases.get(&key).await, Ok(None)).then_some(())
        }
    })
    .await;
    instance.resume().expect("SIGCONT");

    eventually("the command sent once the instance runs again", WAIT, || {
        let conn = conn.clone();
        async move { (stored_status(&conn, id).await == NotificationStatus::Sent).then_some(()) }
    })
    .await;
    let info = commands
        .consumer_info(&consumer_name)
        .await
        .expect("consumer info");
    assert!(
        info.delivered.consumer_sequence <= MAX_DELIVERIES as u64,
        "the command was delivered {} times",
        info.delivered.consumer_sequence
    );
    assert_eq!(smtp.messages().len(), 1, "sent once");
}

/// The NATS node leading a dispatch consumer (and perhaps the commands stream and the lease
/// bucket) hangs while the dispatcher waits on it: the other nodes elect new leaders, and the
/// instance goes on delivering the partition's commands without a restart. (On nats-server 2.9
/// the open pull request survives the change: the new leader answers it with idle heartbeats, so
/// the loop's rebinding after two missed ones is not what this exercises.)
#[tokio::test]
async fn the_dispatcher_pulls_again_after_its_consumer_leader_hangs() {
    let cluster = NatsCluster::start().await.expect("nats cluster");
    let smtp = SmtpSink::start().await.expect("smtp");
    let db = TestDatabase::from_env().await.expect("db");
    // Herald talks to node n0 only, which stays up; the consumer's leader is moved off it.
    let mut config = test_config(cluster.node(0), &db, &smtp);
    config.nats.replicas = NatsCluster::NODES;
    let herald = TestHerald::start(config).await.expect("herald");
    let send = json!({
        "recipient": { "email": "ada@example.com" },
        "category": "transactional",
        "channels": ["email"],
        "content": { "subject": "Order shipped", "text": "Your order #1001 is on its way." }
    });
    let first = herald.send_accepted(&send).await;
    herald.wait_status(&first, "sent").await;

    let partition = partition_for("ada@example.com", PARTITIONS);
    let consumer_name = subjects::dispatch_consumer(partition);
    let client = cluster.client().await.expect("nats client");
    let commands = jetstream::new(client.clone())
        .get_stream(subjects::NOTIFY_STREAM)
        .await
        .expect("commands stream");
    let leader_of = |commands: stream::Stream, name: String| async move {
        let info = commands.consumer_info(&name).await.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        Some((leader, info.num_waiting))
    };
    let stepdown = format!(
        "$JS.API.CONSUMER.LEADER.STEPDOWN.{}.{consumer_name}",
        subjects::NOTIFY_STREAM
    );
    let leader = eventually(
        "the consumer led off n0 with the partition's pull request open",
        WAIT,
        || {
            let (commands, name, client, stepdown) = (
                commands.clone(),
                consumer_name.clone(),
                client.clone(),
                stepdown.clone(),
            );
            async move {
                let (leader, waiting) = leader_of(commands, name).await?;
                if leader == "n0" {
                    // A new leader is chosen at random among the others.
                    let _ = client.request(stepdown, "".into()).await;
                    return None;
                }
                (waiting > 0).then_some(leader)
            }
        },
    )
    .await;
    let hung = cluster.node_named(&leader).expect("the leader is a node");
    hung.freeze().expect("SIGSTOP");
    let frozen = std::time::Instant::now();
    // The commands stream and the lease bucket may have been led by the hung node too.
    let js = jetstream::new(client.clone());
    eventually(
        "the other nodes to elect new leaders for the consumer, its stream and the leases",
        Duration::from_secs(30),
        || {
            let (js, commands, name, hung) = (
                js.clone(),
                commands.clone(),
                consumer_name.clone(),
                leader.clone(),
            );
            async move {
                let (consumer, _) = leader_of(commands, name).await?;
                let mut leaders = vec![consumer];
                for stream in [
                    subjects::NOTIFY_STREAM.to_string(),
                    format!("KV_{}", herald_nats::leases::LEASE_BUCKET),
                ] {
                    let info = js.get_stream(stream).await.ok()?.cached_info().clone();
                    leaders.push(info.cluster?.leader?);
                }
                leaders.iter().all(|leader| *leader != hung).then_some(())
            }
        },
    )
    .await;

    let second = herald.send_accepted(&send).await;
    // Two missed heartbeats (30 s), the loop's backoff, and a margin for a loaded machine.
    eventually(
        "the send after the leader hung to be sent",
        Duration::from_secs(90),
        || async {
            let (_, body) = herald.get(&format!("/api/v1/notifications/{second}")).await;
            (body["status"] == "sent").then_some(())
        },
    )
    .await;
    println!(
        "sent {:.1?} after the consumer's leader hung",
        frozen.elapsed()
    );
    let mails = smtp.wait_for_count(2, WAIT).await.expect("mails");
    assert_eq!(mails.len(), 2, "each send once");
    herald.shutdown().await.expect("clean shutdown");
    hung.resume().expect("SIGCONT");
}
