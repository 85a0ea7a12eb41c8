//! The email provider's SMTP connection pool against real SMTP servers: connections are reused
//! without a NOOP before every message, never exceed the pool size, and a connection whose session
//! failed or was cut short is not handed to the next message. Messages that wait for a connection
//! go out together in one write, each with its own outcome (a 421 in the middle of a group fails
//! the rest of it, a group never answered fails as a whole after the timeout, a group answered in
//! part fails only the messages still unanswered), and one whose caller gave up while it waited is
//! not sent. A message goes in one round trip (BDAT) to a server offering CHUNKING and
//! PIPELINING, in two (pipelined DATA) to one offering PIPELINING alone, and one command at a
//! time to others; configuration turns either extension off. A pooled connection the relay hung
//! up on since its last message gets its message or group sent again over a fresh one, none
//! failing. A message is written only while its send's deadline leaves room for the reply, and a
//! group is given up once every one of its messages' deadlines has passed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use herald_actors::channel::circuit::{CircuitSettings, CircuitState};
use herald_actors::channel::email::{EmailConfig, EmailProvider, SmtpSecurity};
use herald_actors::channel::smtp_pool::IDLE_CHECK;
use herald_actors::channel::{
    ChannelActor, ChannelArgs, ChannelMsg, ChannelSettings, ChannelSnapshot, NotStartedCause,
    OutboundMessage, Provider, ProviderError, Receipt, SendOutcome,
};
use herald_nats::{Contacts, Content};
use herald_tests::{HangUp, RejectStage, SmtpSink};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use uuid::Uuid;

/// [`Provider::send`] with time to spare: the deadline of the tests that do not test it.
trait SendNow {
    /// Sends `message` with a deadline a minute away.
    fn send_now<'a>(
        &'a self,
        message: &'a OutboundMessage,
    ) -> BoxFuture<'a, Result<Receipt, ProviderError>>;
}

impl SendNow for EmailProvider {
    fn send_now<'a>(
        &'a self,
        message: &'a OutboundMessage,
    ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
        self.send(
            message,
            tokio::time::Instant::now() + Duration::from_secs(60),
        )
    }
}

fn provider(host: &str, port: u16, pool_size: u32) -> EmailProvider {
    EmailProvider::new("smtp".into(), &config(host, port, pool_size)).expect("provider")
}

fn config(host: &str, port: u16, pool_size: u32) -> EmailConfig {
    EmailConfig {
        smtp_host: Some(host.to_string()),
        smtp_port: Some(port),
        security: SmtpSecurity::None,
        pool_size,
        ..EmailConfig::default()
    }
}

fn message(i: usize) -> OutboundMessage {
    OutboundMessage {
        notification_id: Uuid::now_v7(),
        contacts: Contacts {
            email: Some(format!("customer-{i}@example.com")),
            ..Contacts::default()
        },
        content: Content {
            subject: Some(format!("Order #{i}")),
            text: format!("Your order #{i} is confirmed."),
            html: None,
            short: None,
            template: None,
        },
        category: "transactional",
        webhook_secret: None,
    }
}

#[tokio::test]
async fn one_connection_carries_many_messages_without_a_noop_before_each() {
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 4);
    for i in 0..20 {
        email.send_now(&message(i)).await.expect("sent");
    }
    assert_eq!(sink.count(), 20);
    assert_eq!(sink.connection_count(), 1, "one connection, reused");
    assert_eq!(sink.noop_count(), 0, "no NOOP check between messages");
}

/// Sends `count` messages at once through one provider and returns their outcomes in order.
async fn send_at_once(email: &EmailProvider, count: usize) -> Vec<Result<Receipt, ProviderError>> {
    let sends = (0..count).map(|i| async move { email.send_now(&message(i)).await });
    futures::future::join_all(sends).await
}

#[tokio::test]
async fn concurrent_sends_never_open_more_connections_than_the_pool_size() {
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 3);
    let results = send_at_once(&email, 40).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(sink.count(), 40);
    assert!(
        sink.connection_count() <= 3,
        "{} connections for a pool of 3",
        sink.connection_count()
    );
}

#[tokio::test]
async fn sends_that_wait_for_a_connection_go_out_together_in_one_write() {
    // All 40 wait while the one connection opens; the send that gets it takes them all along.
    send_at_once_over_one_connection(40, 20).await;
}

#[tokio::test]
async fn more_messages_than_a_group_holds_all_go_out_over_one_connection() {
    send_at_once_over_one_connection(150, 100).await;
}

/// Sends `count` messages at once through a pool of one connection: all must arrive over that
/// connection, at least `grouped` of them with the next one behind them in the same write.
async fn send_at_once_over_one_connection(count: usize, grouped: u64) {
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 1);
    let results = send_at_once(&email, count).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(sink.count(), count);
    assert_eq!(sink.connection_count(), 1, "one connection, reused");
    assert!(
        sink.grouped_count() >= grouped,
        "{} of {count} messages had the next one behind them in the same write",
        sink.grouped_count()
    );
}

/// A plain SMTP server (no extensions: one command at a time) that accepts every message; its
/// first connection greets 500 ms late.
async fn late_first_greeting_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((stream, _)) = listener.accept().await {
            let late = std::mem::take(&mut first);
            tokio::spawn(async move {
                if late {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                serve_plainly(stream, None).await;
            });
        }
    });
    port
}

/// A plain SMTP server that accepts every message and never answers NOOP, as a connection looks
/// that a NAT dropped while it sat idle; with the connections it accepted and the NOOPs it took.
async fn noop_swallowing_server() -> (u16, tokio::sync::watch::Receiver<usize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (accepted, connections) = tokio::sync::watch::channel(0);
    let noops = Arc::new(AtomicUsize::new(0));
    let swallowed = noops.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.send_modify(|n| *n += 1);
            tokio::spawn(serve_plainly(stream, Some(swallowed.clone())));
        }
    });
    (port, connections, noops)
}

/// Greets, then answers one command at a time, taking every message; NOOP goes unanswered, and is
/// counted, when `swallowed_noops` is given.
async fn serve_plainly(stream: tokio::net::TcpStream, swallowed_noops: Option<Arc<AtomicUsize>>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let _ = write.write_all(b"220 plain ESMTP\r\n").await;
    let mut in_data = false;
    while let Ok(Some(line)) = lines.next_line().await {
        let command = line.to_ascii_uppercase();
        if !in_data
            && command == "NOOP"
            && let Some(noops) = &swallowed_noops
        {
            noops.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let reply: &[u8] = match (in_data, command.as_str()) {
            (true, ".") => {
                in_data = false;
                b"250 queued\r\n"
            }
            (true, _) => continue,
            (false, "DATA") => {
                in_data = true;
                b"354 go ahead\r\n"
            }
            _ => b"250 ok\r\n",
        };
        let _ = write.write_all(reply).await;
    }
}

#[tokio::test]
async fn a_connection_gone_silent_while_idle_is_replaced_instead_of_stalling_the_send() {
    let (port, connections, _) = noop_swallowing_server().await;
    let email = impatient_provider(port, 1_000);
    email.send_now(&message(1)).await.expect("first sent");
    // Idle long enough for the pool to check the connection before its next message (the pool
    // keeps time with the real clock).
    tokio::time::sleep(IDLE_CHECK + Duration::from_millis(100)).await;
    let second = tokio::time::timeout(Duration::from_secs(5), email.send_now(&message(2)))
        .await
        .expect("the send stalled in the check of a connection that never answers");
    assert!(
        second.is_ok(),
        "nothing was sent over the silent connection: {second:?}"
    );
    assert_eq!(
        *connections.borrow(),
        2,
        "the second went over a fresh connection"
    );
}

#[tokio::test]
async fn connections_idle_as_long_as_one_gone_silent_are_not_each_waited_for() {
    let (port, connections, noops) = noop_swallowing_server().await;
    let config = EmailConfig {
        timeout_ms: 1_000,
        ..config("127.0.0.1", port, 4)
    };
    let email = EmailProvider::new("smtp".into(), &config).expect("provider");
    // The server takes one command at a time, so each connection carries one of these at once.
    let results = send_at_once(&email, 4).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let opened = *connections.borrow();
    assert!(opened >= 2, "the sends went over {opened} connection(s)");
    tokio::time::sleep(IDLE_CHECK + Duration::from_millis(100)).await;
    let sent = tokio::time::timeout(Duration::from_secs(10), email.send_now(&message(9)))
        .await
        .expect("the send was answered");
    assert!(sent.is_ok(), "{sent:?}");
    // One check gives the NAT away: the other connections, idle as long, are dropped unchecked
    // instead of each waiting out a NOOP of its own.
    let checks = noops.load(Ordering::SeqCst);
    assert!(
        checks <= 1,
        "{checks} NOOP checks waited out for {opened} connections gone silent at once"
    );
}

/// A plain SMTP server (one command at a time) that takes every message, answers its first
/// message's content [`IDLE_CHECK`] and a little late, and counts the NOOPs it answers.
async fn slow_first_message_server() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let noops = Arc::new(AtomicUsize::new(0));
    let counted = noops.clone();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((stream, _)) = listener.accept().await {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let _ = write.write_all(b"220 slow ESMTP\r\n").await;
            let mut in_data = false;
            while let Ok(Some(line)) = lines.next_line().await {
                let command = line.to_ascii_uppercase();
                let reply: &[u8] = match (in_data, command.as_str()) {
                    (true, ".") => {
                        in_data = false;
                        if std::mem::take(&mut first) {
                            tokio::time::sleep(IDLE_CHECK + Duration::from_millis(300)).await;
                        }
                        b"250 queued\r\n"
                    }
                    (true, _) => continue,
                    (false, "DATA") => {
                        in_data = true;
                        b"354 go ahead\r\n"
                    }
                    (false, "NOOP") => {
                        counted.fetch_add(1, Ordering::SeqCst);
                        b"250 ok\r\n"
                    }
                    _ => b"250 ok\r\n",
                };
                let _ = write.write_all(reply).await;
            }
        }
    });
    (port, noops)
}

/// A connection's idle time counts from when it came back to the pool, not from when it was
/// taken: one that carried a slow message and goes out again at once is not checked with a NOOP.
#[tokio::test]
async fn a_connection_back_from_a_slow_message_is_reused_at_once_without_a_noop() {
    let (port, noops) = slow_first_message_server().await;
    let email = provider("127.0.0.1", port, 1);
    email.send_now(&message(1)).await.expect("first sent");
    email.send_now(&message(2)).await.expect("second sent");
    assert_eq!(
        noops.load(Ordering::SeqCst),
        0,
        "the connection had not sat idle at all"
    );
}

#[tokio::test]
async fn a_server_that_never_greets_fails_the_send_within_its_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        // Accepted and held open, never greeted.
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let email = impatient_provider(port, 500);
    let refused = tokio::time::timeout(Duration::from_secs(5), email.send_now(&message(1)))
        .await
        .expect("the session's opening was not bounded by the timeout");
    assert!(
        matches!(&refused, Err(ProviderError::Transient { .. })),
        "{refused:?}"
    );
}

#[tokio::test]
async fn an_international_domain_goes_in_ascii_and_a_local_part_needing_smtputf8_fails_for_good() {
    // The sink does not offer SMTPUTF8, as many relays do not.
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 1);
    let to = |address: &str| OutboundMessage {
        contacts: Contacts {
            email: Some(address.into()),
            ..Contacts::default()
        },
        ..message(1)
    };
    email.send_now(&to("ada@bücher.de")).await.expect("sent");
    let mails = sink
        .wait_for_count(1, Duration::from_secs(10))
        .await
        .expect("mail");
    assert_eq!(mails[0].to, vec!["ada@xn--bcher-kva.de".to_string()]);
    let refused = email.send_now(&to("josé@example.com")).await;
    assert!(
        matches!(&refused, Err(ProviderError::Permanent { reason, .. }) if reason.contains("SMTPUTF8")),
        "no retry makes this server take it: {refused:?}"
    );
    // lettre refused it before writing a word: not a hang-up of the pooled connection, which
    // stays in use rather than being replaced by a new one for a resend refused alike.
    assert_eq!(sink.connection_count(), 1, "the pooled connection was kept");
    email.send_now(&to("ada@example.com")).await.expect("sent");
    assert_eq!(sink.connection_count(), 1, "and used again");
}

#[tokio::test]
async fn a_server_refusing_the_session_fails_the_message_transiently() {
    // A relay that greets with 554 (RFC 5321: no SMTP service here), as one whose login the
    // account lost would answer AUTH with 535: every message fails alike until someone fixes it.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(b"554 5.3.2 no service for you\r\n").await;
        }
    });
    let email = provider("127.0.0.1", port, 1);
    let refused = tokio::time::timeout(Duration::from_secs(10), email.send_now(&message(1)))
        .await
        .expect("answered");
    assert!(
        matches!(&refused, Err(ProviderError::Transient { reason, .. }) if reason.contains("554")),
        "the session is refused, not the message: {refused:?}"
    );
}

#[tokio::test]
async fn a_caller_whose_message_another_connection_did_not_take_still_gets_it_sent() {
    // The first caller's connection greets late, so the second caller's connection takes the
    // oldest waiting message, the first caller's; the second's must still go out.
    let port = late_first_greeting_server().await;
    let email = provider("127.0.0.1", port, 2);
    let results = tokio::time::timeout(Duration::from_secs(3), send_at_once(&email, 2))
        .await
        .expect("both sends answered well before the 10 s timeouts");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[tokio::test]
async fn a_refusal_within_a_group_fails_its_own_message_only() {
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 1);
    sink.set_reject_next_at(RejectStage::Rcpt, 1, 550, "5.1.1 no such user");
    let results = send_at_once(&email, 10).await;
    let refused: Vec<_> = results.iter().filter(|result| result.is_err()).collect();
    assert_eq!(refused.len(), 1, "{results:?}");
    assert!(
        matches!(refused[0], Err(ProviderError::Permanent { .. })),
        "{refused:?}"
    );
    assert_eq!(sink.count(), 9, "the other nine were delivered");
    assert!(sink.grouped_count() >= 5, "they went as a group");
    email.send_now(&message(10)).await.expect("next sent");
    assert_eq!(
        sink.connection_count(),
        2,
        "the session with a refusal was closed after its group, not reused"
    );
}

#[tokio::test]
async fn a_421_within_a_group_fails_the_rest_transiently_and_a_retry_sends_each_once() {
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 1);
    // The fifth recipient is answered 421, and the server closes the connection.
    sink.set_reject_nth(5, 421, "4.3.2 shutting down");
    let results = send_at_once(&email, 10).await;
    let failed: Vec<usize> = (0..10).filter(|&i| results[i].is_err()).collect();
    assert!(
        !failed.is_empty()
            && failed
                .iter()
                .all(|&i| matches!(results[i], Err(ProviderError::Transient { .. }))),
        "{results:?}"
    );
    assert!(
        format!("{:?}", results[failed[0]]).contains("shutting down"),
        "the first failure carries the server's reason: {results:?}"
    );
    assert_eq!(sink.count(), 10 - failed.len(), "the others were delivered");
    assert!(sink.count() >= 4, "the four before the 421 were delivered");
    for &i in &failed {
        email.send_now(&message(i)).await.expect("retry sent");
    }
    let mut subjects: Vec<String> = sink
        .messages()
        .into_iter()
        .filter_map(|m| m.subject)
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 10, "each of the ten arrived exactly once");
    assert_eq!(sink.count(), 10);
}

/// The relay restarted, or shut its sessions down with a 421, after a pooled connection's last
/// message and within [`IDLE_CHECK`], so the connection is reused without a NOOP and its next write
/// fails before any reply. Nothing of that write was accepted: the message goes again, once, over
/// a fresh connection, and does not fail (a failure would count against the email circuit, and
/// one routine restart would pause email).
#[tokio::test]
async fn a_message_on_a_pooled_connection_the_relay_hung_up_goes_again_on_a_fresh_one() {
    for how in [HangUp::Silently, HangUp::With421] {
        let sink = SmtpSink::start().await.expect("sink");
        let email = provider(sink.host(), sink.port(), 1);
        sink.set_hang_up_after(1, how);
        email.send_now(&message(0)).await.expect("first sent");
        let next = email.send_now(&message(1)).await;
        assert!(next.is_ok(), "{how:?}: {next:?}");
        assert_eq!(sink.count(), 2, "{how:?}: both delivered");
        assert_eq!(
            sink.connection_count(),
            2,
            "{how:?}: the second on a fresh one"
        );
    }
}

/// As [`a_message_on_a_pooled_connection_the_relay_hung_up_goes_again_on_a_fresh_one`], for a
/// group: ten messages wait while the one connection carries an eleventh alone, whose session
/// then hangs up; they go together over that connection next, fail before any reply, and go
/// again together over a fresh one, none failing.
#[tokio::test]
async fn a_group_on_a_pooled_connection_the_relay_hung_up_goes_again_on_a_fresh_one() {
    for how in [HangUp::Silently, HangUp::With421] {
        let sink = SmtpSink::start().await.expect("sink");
        let email = provider(sink.host(), sink.port(), 1);
        email.send_now(&message(0)).await.expect("first sent");
        sink.set_hang_up_after(1, how);
        let (alone, group) =
            futures::future::join(email.send_now(&message(100)), send_at_once(&email, 10)).await;
        assert!(alone.is_ok(), "{how:?}: {alone:?}");
        assert!(group.iter().all(Result::is_ok), "{how:?}: {group:?}");
        assert_eq!(sink.count(), 12, "{how:?}: each delivered");
        assert_eq!(
            sink.connection_count(),
            2,
            "{how:?}: the group went again on one fresh connection"
        );
        assert!(
            sink.grouped_count() >= 5,
            "{how:?}: {} messages had the next one behind them in the same write",
            sink.grouped_count()
        );
    }
}

#[tokio::test]
async fn after_a_refused_message_the_next_goes_through_on_a_fresh_session() {
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 1);
    email.send_now(&message(0)).await.expect("first sent");
    sink.set_reject_next(1, 550, "5.1.1 no such user");
    let refused = email.send_now(&message(1)).await;
    assert!(
        matches!(refused, Err(ProviderError::Permanent { .. })),
        "{refused:?}"
    );
    email.send_now(&message(2)).await.expect("next sent");
    let subjects: Vec<Option<String>> = sink.messages().into_iter().map(|m| m.subject).collect();
    assert_eq!(
        subjects,
        vec![Some("Order #0".to_string()), Some("Order #2".to_string())]
    );
    assert_eq!(
        sink.connection_count(),
        2,
        "the refused session was closed, not reused"
    );
}

/// Sends five messages one after another through a pool of one connection; all must arrive.
async fn send_five_on_one_connection(sink: &SmtpSink) {
    send_five_configured(sink, |_| {}).await;
}

#[tokio::test]
async fn a_server_offering_chunking_gets_each_message_in_one_bdat_chunk_as_written() {
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 1);
    // Lines that DATA would have to dot-stuff: BDAT carries them as they are.
    let mut dotted = message(0);
    dotted.content.text = ".leading dot\r\n.\r\nafter a lone dot".to_string();
    email.send_now(&dotted).await.expect("sent");
    for i in 1..5 {
        email.send_now(&message(i)).await.expect("sent");
    }
    let received = sink.messages();
    assert_eq!(received.len(), 5);
    assert_eq!(
        sink.chunked_count(),
        5,
        "every message came in a BDAT chunk"
    );
    assert_eq!(sink.connection_count(), 1, "one connection, reused");
    assert_eq!(
        received[0].text_body().as_deref().map(str::trim_end),
        Some(".leading dot\r\n.\r\nafter a lone dot")
    );
    assert_eq!(received[4].subject.as_deref(), Some("Order #4"));
    // MAIL, RCPT and BDAT go in one write: each is read with the next already buffered.
    assert_pipelined(&sink, 10);
}

/// At least `commands` of the 5 messages' commands arrived ahead of their replies.
fn assert_pipelined(sink: &SmtpSink, commands: u64) {
    assert!(
        sink.pipelined_count() >= commands,
        "only {} commands arrived ahead of their replies for 5 messages",
        sink.pipelined_count()
    );
}

#[tokio::test]
async fn a_server_offering_pipelining_gets_mail_rcpt_and_data_without_waiting_for_replies() {
    let sink = SmtpSink::start_without_chunking().await.expect("sink");
    send_five_on_one_connection(&sink).await;
    assert_eq!(sink.chunked_count(), 0, "DATA, not BDAT");
    // MAIL and RCPT arrive with the commands after them; one write per group, so on loopback
    // both are read with DATA already buffered.
    assert_pipelined(&sink, 5);
}

#[tokio::test]
async fn a_server_without_pipelining_gets_one_command_at_a_time() {
    let sink = SmtpSink::start_without_pipelining().await.expect("sink");
    send_five_on_one_connection(&sink).await;
    assert_eq!(
        sink.pipelined_count(),
        0,
        "a command was sent before its reply"
    );
    assert_eq!(sink.chunked_count(), 0, "DATA, not BDAT");
}

/// Sends five messages one after another through a pool of one connection configured by
/// `configure`; all must arrive.
async fn send_five_configured(sink: &SmtpSink, configure: impl FnOnce(&mut EmailConfig)) {
    let mut config = config(sink.host(), sink.port(), 1);
    configure(&mut config);
    let email = EmailProvider::new("smtp".into(), &config).expect("provider");
    for i in 0..5 {
        email.send_now(&message(i)).await.expect("sent");
    }
    assert_eq!(sink.count(), 5);
}

#[tokio::test]
async fn with_chunking_off_a_server_offering_it_gets_pipelined_data() {
    let sink = SmtpSink::start().await.expect("sink");
    send_five_configured(&sink, |config| config.chunking = false).await;
    assert_eq!(sink.chunked_count(), 0, "DATA, not BDAT");
    assert_pipelined(&sink, 5);
}

#[tokio::test]
async fn with_pipelining_off_a_server_offering_it_gets_one_command_at_a_time() {
    let sink = SmtpSink::start().await.expect("sink");
    send_five_configured(&sink, |config| config.pipelining = false).await;
    assert_eq!(
        sink.pipelined_count(),
        0,
        "a command was sent before its reply"
    );
    assert_eq!(
        sink.chunked_count(),
        0,
        "DATA, not BDAT (it needs pipelining)"
    );
}

#[tokio::test]
async fn a_pipelined_refusal_is_reported_by_its_own_reply_not_the_one_after_it() {
    let sink = SmtpSink::start_without_chunking().await.expect("sink");
    a_greylisted_recipient_is_throttled(&sink, 0).await;
}

#[tokio::test]
async fn a_refusal_before_a_chunk_is_reported_by_its_own_reply_not_the_chunks() {
    let sink = SmtpSink::start().await.expect("sink");
    a_greylisted_recipient_is_throttled(&sink, 1).await;
}

/// The recipient is greylisted (451, try later); the DATA or BDAT pipelined behind it is then
/// refused for want of recipients (554), which must not turn the temporary refusal into a
/// permanent one (nor the recipient's state into a failure of the relay: throttled).
/// `chunked` of the two messages come in BDAT chunks (the next one, or none).
async fn a_greylisted_recipient_is_throttled(sink: &SmtpSink, chunked: u64) {
    let refused =
        refuse_one_then_send_the_next(sink, RejectStage::Rcpt, 451, "4.7.1 greylisted").await;
    assert!(
        matches!(&refused, Err(ProviderError::Throttled { reason, .. }) if reason.contains("greylisted")),
        "{refused:?}"
    );
    assert_eq!(
        sink.chunked_count(),
        chunked,
        "messages that came in chunks"
    );
}

/// Starts a sink offering PIPELINING and CHUNKING (`0`), PIPELINING alone (`1`) or neither, so
/// that a message takes each of the client's paths (BDAT, pipelined DATA, one command at a time).
async fn sink_for_path(path: usize) -> SmtpSink {
    match path {
        0 => SmtpSink::start().await,
        1 => SmtpSink::start_without_chunking().await,
        _ => SmtpSink::start_without_pipelining().await,
    }
    .expect("sink")
}

/// A 4xx to RCPT is about that recipient (an address the relay could not verify yet, a full
/// mailbox): throttled, retried later without counting against the email circuit, on every path a
/// message takes; unless its enhanced code names the relay's own state (4.3.x, 4.4.x). A 421
/// closes the session whatever it answers, and a 4xx to the message is about the server: both
/// stay transient, and count.
#[tokio::test]
async fn a_4xx_to_rcpt_is_throttled_and_a_421_or_a_4xx_to_the_message_is_transient() {
    let cases = [
        (
            RejectStage::Rcpt,
            450,
            "4.1.1 <x>: Recipient address rejected: unverified address",
            true,
        ),
        (RejectStage::Rcpt, 452, "4.2.2 Mailbox full", true),
        (RejectStage::Rcpt, 421, "4.3.2 shutting down", false),
        // The relay's own state, which every recipient meets alike: it counts.
        (
            RejectStage::Rcpt,
            451,
            "4.3.0 Temporary lookup failure",
            false,
        ),
        (
            RejectStage::Rcpt,
            452,
            "4.3.1 Insufficient system storage",
            false,
        ),
        (
            RejectStage::Rcpt,
            451,
            "4.4.3 Directory server failure",
            false,
        ),
        (
            RejectStage::Data,
            451,
            "4.3.0 queue file write error",
            false,
        ),
    ];
    for (stage, code, text, throttled) in cases {
        for path in 0..3 {
            let sink = sink_for_path(path).await;
            let refused = refuse_one_then_send_the_next(&sink, stage, code, text).await;
            let what = format!("{code} to {stage:?} on path {path}: {refused:?}");
            match refused {
                Err(ProviderError::Throttled { reason, .. }) if throttled => {
                    assert!(reason.contains(text), "{what}");
                }
                Err(ProviderError::Transient { reason, .. }) if !throttled => {
                    assert!(reason.contains(text), "{what}");
                }
                _ => panic!("{what}"),
            }
        }
    }
}

/// A 5xx to MAIL FROM refuses the account or its sender address (530 authentication required,
/// 550/553 sender not verified or not owned), not the message: every message fails alike until
/// someone fixes it, so it is transient, counting against the email circuit, rather than failing
/// each message for good. A 552 to MAIL (the message's size) stays permanent, as do 5xx replies to
/// RCPT and to the message; on every path a message takes.
#[tokio::test]
async fn a_5xx_to_mail_from_is_transient_and_a_5xx_to_rcpt_or_the_message_permanent() {
    let cases = [
        (
            RejectStage::Mail,
            530,
            "5.7.0 Authentication required",
            true,
        ),
        (
            RejectStage::Mail,
            553,
            "5.7.1 <herald@localhost>: Sender address rejected: not owned by user",
            true,
        ),
        (
            RejectStage::Mail,
            550,
            "5.1.0 <herald@localhost>: Sender address rejected: undeliverable address",
            true,
        ),
        (
            RejectStage::Mail,
            552,
            "5.3.4 Message size exceeds fixed limit",
            false,
        ),
        (RejectStage::Rcpt, 550, "5.1.1 no such user", false),
        (RejectStage::Data, 554, "5.7.1 spam", false),
    ];
    refuse_each_on_every_path(&cases).await;
}

#[tokio::test]
async fn a_refused_chunk_is_a_permanent_failure_and_the_next_message_goes_through() {
    let sink = SmtpSink::start().await.expect("sink");
    let refused = refuse_one_then_send_the_next(&sink, RejectStage::Data, 554, "5.7.1 spam").await;
    assert!(
        matches!(&refused, Err(ProviderError::Permanent { .. })),
        "{refused:?}"
    );
    assert_eq!(sink.chunked_count(), 1, "the next message came in a chunk");
}

/// Refuses one message with each case's `(stage, code, text)` on every path a message takes
/// ([`sink_for_path`]), and checks that the failure is transient when the case says so, permanent
/// otherwise, with the server's text in its reason.
async fn refuse_each_on_every_path(cases: &[(RejectStage, u16, &str, bool)]) {
    for &(stage, code, text, transient) in cases {
        for path in 0..3 {
            let sink = sink_for_path(path).await;
            let refused = refuse_one_then_send_the_next(&sink, stage, code, text).await;
            let what = format!("{code} {text} to {stage:?} on path {path}: {refused:?}");
            match refused {
                Err(ProviderError::Transient { reason, .. }) if transient => {
                    assert!(reason.contains(text), "{what}");
                }
                Err(ProviderError::Permanent { reason, .. }) if !transient => {
                    assert!(reason.contains(text), "{what}");
                }
                _ => panic!("{what}"),
            }
        }
    }
}

/// Makes the sink refuse a message at `stage`, then sends another, which must arrive alone and on
/// a fresh session (the refused one is closed, not reused); returns the refused send's outcome.
async fn refuse_one_then_send_the_next(
    sink: &SmtpSink,
    stage: RejectStage,
    code: u16,
    text: &str,
) -> Result<herald_actors::channel::Receipt, ProviderError> {
    let email = provider(sink.host(), sink.port(), 1);
    sink.set_reject_next_at(stage, 1, code, text);
    let refused = email.send_now(&message(0)).await;
    email.send_now(&message(1)).await.expect("next sent");
    let subjects: Vec<Option<String>> = sink.messages().into_iter().map(|m| m.subject).collect();
    assert_eq!(subjects, vec![Some("Order #1".to_string())]);
    assert_eq!(
        sink.connection_count(),
        2,
        "the refused session was closed, not reused"
    );
    refused
}

/// What a [`stalling_server`] saw: connections accepted, and the command lines read after EHLO.
#[derive(Debug, Default, Clone)]
struct Stalled {
    connections: usize,
    commands: Vec<String>,
}

/// What a [`stalling_server`]'s EHLO offers: PIPELINING alone, so a client writes a message's
/// RCPT along with its MAIL.
const PIPELINING: &[u8] = b"250-stall\r\n250 PIPELINING\r\n";

/// What a [`stalling_server`]'s EHLO offers: PIPELINING and CHUNKING, so a client writes a whole
/// group of messages at once.
const PIPELINING_AND_CHUNKING: &[u8] = b"250-stall\r\n250-PIPELINING\r\n250 CHUNKING\r\n";

/// An SMTP server that greets and answers EHLO with `ehlo`, then never answers another command;
/// reports what it saw.
async fn stalling_server(ehlo: &'static [u8]) -> (u16, tokio::sync::watch::Receiver<Stalled>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (seen, watch) = tokio::sync::watch::channel(Stalled::default());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            seen.send_modify(|stalled| stalled.connections += 1);
            let seen = seen.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 stall ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.to_ascii_uppercase().starts_with("EHLO") {
                        let _ = write.write_all(ehlo).await;
                    } else {
                        seen.send_modify(|stalled| stalled.commands.push(line));
                    }
                }
            });
        }
    });
    (port, watch)
}

/// A provider whose sends are given up after `timeout_ms`.
fn impatient_provider(port: u16, timeout_ms: u64) -> EmailProvider {
    let config = EmailConfig {
        timeout_ms,
        ..config("127.0.0.1", port, 1)
    };
    EmailProvider::new("smtp".into(), &config).expect("provider")
}

#[tokio::test]
async fn a_send_cut_short_by_its_caller_does_not_leave_its_connection_to_the_next() {
    let (port, mut seen) = stalling_server(PIPELINING).await;
    let email = provider("127.0.0.1", port, 1);
    for attempt in 1..=2 {
        let outbound = message(attempt);
        let cut = tokio::time::timeout(Duration::from_millis(300), email.send_now(&outbound)).await;
        assert!(cut.is_err(), "attempt {attempt} should have stalled");
    }
    expect_a_second_connection(&mut seen).await;
}

#[tokio::test]
async fn a_send_the_server_never_answers_fails_after_the_timeout_and_its_connection_is_closed() {
    let (port, mut seen) = stalling_server(PIPELINING).await;
    let email = impatient_provider(port, 300);
    for attempt in 1..=2 {
        let outbound = message(attempt);
        let cut = tokio::time::timeout(Duration::from_secs(5), email.send_now(&outbound))
            .await
            .expect("the send's own timeout answers");
        assert!(
            matches!(cut, Err(ProviderError::Transient { .. })),
            "attempt {attempt}: {cut:?}"
        );
    }
    expect_a_second_connection(&mut seen).await;
}

#[tokio::test]
async fn a_group_the_server_never_answers_fails_every_message_after_the_timeout() {
    let (port, mut seen) = stalling_server(PIPELINING_AND_CHUNKING).await;
    let email = impatient_provider(port, 300);
    // All ten wait while the one connection opens, and go out together over it.
    let results = tokio::time::timeout(Duration::from_secs(5), send_at_once(&email, 10))
        .await
        .expect("the group's timeout answers every caller");
    assert!(
        results
            .iter()
            .all(|result| matches!(result, Err(ProviderError::Transient { .. }))),
        "{results:?}"
    );
    let stalled = seen.borrow().clone();
    let recipients = stalled
        .commands
        .iter()
        .filter(|command| command.starts_with("RCPT TO:"))
        .count();
    assert_eq!(
        (stalled.connections, recipients),
        (1, 10),
        "all ten written unanswered over one connection, as one group"
    );
    let _ = email.send_now(&message(10)).await;
    expect_a_second_connection(&mut seen).await;
}

/// Sends `message` through the channel actor `actor`, and returns what became of it.
async fn send_through(actor: &ActorRef<ChannelMsg>, message: OutboundMessage) -> SendOutcome {
    let wait = Duration::from_secs(30);
    let answer = actor
        .call(
            |reply| ChannelMsg::Send {
                message: Box::new(message),
                answer_by: std::time::Instant::now() + wait,
                reply,
            },
            Some(wait),
        )
        .await
        .expect("actor alive");
    match answer {
        CallResult::Success(report) => report.outcome,
        other => panic!("a send was not answered: {other:?}"),
    }
}

/// A channel actor sending through `email` within `settings`.
async fn email_actor(email: EmailProvider, settings: ChannelSettings) -> ActorRef<ChannelMsg> {
    let (actor, _) = Actor::spawn(
        None,
        ChannelActor,
        ChannelArgs::new(Arc::new(email), settings, None),
    )
    .await
    .expect("channel actor starts");
    actor
}

/// `actor`'s snapshot.
async fn snapshot(actor: &ActorRef<ChannelMsg>) -> ChannelSnapshot {
    actor
        .call(ChannelMsg::Snapshot, Some(Duration::from_secs(30)))
        .await
        .expect("actor alive")
        .expect("snapshot")
}

/// The messages of a group the server never answers fail in one event of their connection,
/// which counts once against the email circuit: one connection that hangs does not open it (and
/// announce it to every instance) while the others may be fine. They used to count once each, and
/// the first group opened it. A server whose every connection hangs still opens it, one
/// connection after another.
#[tokio::test]
async fn a_group_the_server_never_answers_counts_once_against_the_circuit() {
    const THRESHOLD: u32 = 4;
    let (port, seen) = stalling_server(PIPELINING_AND_CHUNKING).await;
    let settings = ChannelSettings {
        circuit: CircuitSettings {
            failure_threshold: THRESHOLD,
            window_ms: 60_000,
            cool_down_ms: 600_000,
            ..CircuitSettings::default()
        },
        ..ChannelSettings::default()
    };
    let actor = email_actor(impatient_provider(port, 300), settings).await;
    // The ten wait while the one connection opens, and go out together over it (the first may
    // take it before the other nine have queued, and go alone: then the nine share the next).
    let outcomes =
        futures::future::join_all((0..10).map(|i| send_through(&actor, message(i)))).await;
    assert!(
        outcomes.iter().all(|outcome| matches!(
            outcome,
            SendOutcome::Failed(ProviderError::Transient { .. })
        )),
        "{outcomes:?}"
    );
    let after_the_group = snapshot(&actor).await;
    let connections = seen.borrow().connections;
    assert!(
        (1..=2).contains(&connections),
        "the ten went out over {connections} connections"
    );
    assert_eq!(
        after_the_group.recent_failures, connections,
        "each hung connection counts once, not each of its messages: {after_the_group:?}"
    );
    assert_eq!(
        after_the_group.circuit,
        CircuitState::Closed,
        "a hung connection opened the circuit: {after_the_group:?}"
    );
    // The server hangs on every connection: each message, alone on a new one, is an event of
    // its own, and they open the circuit.
    let mut sent_alone = 0;
    while snapshot(&actor).await.circuit == CircuitState::Closed {
        assert!(sent_alone < THRESHOLD, "{:?}", snapshot(&actor).await);
        send_through(&actor, message(10)).await;
        sent_alone += 1;
    }
    let events_before = u32::try_from(connections).expect("a few connections");
    assert_eq!(
        sent_alone,
        THRESHOLD - events_before,
        "{:?}",
        snapshot(&actor).await
    );
    actor.stop(None);
}

#[tokio::test]
async fn a_group_answered_in_part_fails_only_its_unanswered_messages_after_the_timeout() {
    let sink = SmtpSink::start().await.expect("sink");
    // The relay takes three messages, then hangs.
    sink.set_stall_after(3);
    let email = impatient_provider(sink.port(), 1_000);
    // All ten wait while the one connection opens, and go out together over it.
    let results = tokio::time::timeout(Duration::from_secs(10), send_at_once(&email, 10))
        .await
        .expect("the group's timeout answers every caller");
    let accepted: Vec<Option<String>> = sink.messages().into_iter().map(|m| m.subject).collect();
    let first_three: Vec<Option<String>> = (0..3).map(|i| Some(format!("Order #{i}"))).collect();
    assert_eq!(accepted, first_three, "the relay took the first three");
    assert!(sink.grouped_count() >= 1, "they went as a group");
    for (i, result) in results.iter().enumerate() {
        if i < 3 {
            assert!(
                result.is_ok(),
                "message {i} was accepted but reported failed (a retry would send it twice): \
                 {result:?}"
            );
        } else {
            assert!(
                matches!(result, Err(ProviderError::Transient { reason, .. })
                    if reason.contains("no reply within")),
                "message {i}, never answered, should fail transiently: {result:?}"
            );
        }
    }
}

/// Waits for the second message's connection. With the first session reused, the second MAIL FROM
/// would have been written into it (and answered later by the reply meant for the first); a
/// fresh session is a second connection.
async fn expect_a_second_connection(seen: &mut tokio::sync::watch::Receiver<Stalled>) {
    tokio::time::timeout(
        Duration::from_secs(5),
        seen.wait_for(|s| s.connections >= 2),
    )
    .await
    .expect("a second connection for the second message")
    .expect("server running");
}

#[tokio::test]
async fn a_message_whose_caller_gave_up_while_it_waited_for_a_connection_is_not_sent() {
    let (port, mut seen) = stalling_server(PIPELINING).await;
    let email = impatient_provider(port, 1_000);
    let recipient = |i: usize| format!("RCPT TO:<customer-{i}@example.com>");
    let first = async {
        let _ = email.send_now(&message(1)).await;
    };
    let abandoned = async {
        // Once the first holds the only connection, the second waits for it, and gives up.
        let mut first_seen = seen.clone();
        tokio::time::timeout(
            Duration::from_secs(5),
            first_seen.wait_for(|s| s.commands.contains(&recipient(1))),
        )
        .await
        .expect("the first message's RCPT TO reached the server within 5 s")
        .expect("server running");
        let gave_up =
            tokio::time::timeout(Duration::from_millis(50), email.send_now(&message(2))).await;
        assert!(
            gave_up.is_err(),
            "the second should still have been waiting"
        );
    };
    tokio::join!(first, abandoned);
    let _ = email.send_now(&message(3)).await;
    let seen = tokio::time::timeout(
        Duration::from_secs(5),
        seen.wait_for(|s| s.commands.contains(&recipient(3))),
    )
    .await
    .expect("the third message reached the server")
    .expect("server running")
    .clone();
    assert!(
        !seen.commands.contains(&recipient(2)),
        "the abandoned message was sent: {:?}",
        seen.commands
    );
}

/// Sends `message` by `deadline` as the channel actor does: the send's future is dropped at the
/// deadline, failing it as a timeout.
async fn send_by(
    email: &EmailProvider,
    message: &OutboundMessage,
    deadline: tokio::time::Instant,
) -> Result<Receipt, ProviderError> {
    tokio::time::timeout_at(deadline, email.send(message, deadline))
        .await
        .unwrap_or_else(|_| Err(ProviderError::transient("cut off by its caller's deadline")))
}

/// An SMTP server without PIPELINING that answers the end of every message's data only after
/// `delay` (a relay slow to queue mail), every other command at once; counts the messages whose
/// data it received, before it answers them.
async fn slow_to_accept_server(delay: Duration) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 slow ESMTP\r\n").await;
                let mut in_data = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = if in_data {
                        if line != "." {
                            continue;
                        }
                        in_data = false;
                        count.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        b"250 queued\r\n"
                    } else {
                        match line.get(..4).map(str::to_ascii_uppercase).as_deref() {
                            Some("EHLO") => b"250 slow\r\n",
                            Some("DATA") => {
                                in_data = true;
                                b"354 go on\r\n"
                            }
                            Some("QUIT") => b"221 bye\r\n",
                            _ => b"250 ok\r\n",
                        }
                    };
                    if write.write_all(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, received)
}

/// A message that gets the connection only when its deadline is too near for the server's reply
/// is not written: it fails as not sent, and the relay never sees it, rather than being cut off
/// by its deadline after the relay got it (when its retry would deliver it twice).
#[tokio::test]
async fn a_message_whose_deadline_is_too_near_when_a_connection_frees_is_not_sent() {
    let (port, received) = slow_to_accept_server(Duration::from_millis(600)).await;
    // One connection; the first message holds it for 600 ms.
    let email = provider("127.0.0.1", port, 1);
    let now = tokio::time::Instant::now();
    let first = message(1);
    let second = message(2);
    let (first, second) = futures::future::join(
        send_by(&email, &first, now + Duration::from_secs(10)),
        send_by(&email, &second, now + Duration::from_millis(1_000)),
    )
    .await;
    first.expect("the first message is accepted");
    match second {
        Err(ProviderError::NoConnection { reason }) => {
            assert!(reason.contains("not sent"), "{reason}")
        }
        other => panic!("the second message should fail as not sent: {other:?}"),
    }
    // A message written would have been counted before its reply was due.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        received.load(Ordering::SeqCst),
        1,
        "the relay got only the first message"
    );
}

/// Messages that waited for the one connection of a slow relay until their sends' timeouts were
/// nearly out are not sent, and answered `NotStarted`: the relay answered every message it was
/// given, so they do not count against the email circuit (they used to count as transient
/// failures, and five of them after one accepted message opened it, failing email over on every
/// instance while the relay was fine).
#[tokio::test]
async fn messages_that_got_no_connection_in_time_do_not_open_the_circuit() {
    let (port, received) = slow_to_accept_server(Duration::from_millis(1_800)).await;
    let settings = ChannelSettings {
        timeout_ms: 2_500,
        circuit: CircuitSettings {
            failure_threshold: 3,
            window_ms: 60_000,
            cool_down_ms: 600_000,
            ..CircuitSettings::default()
        },
        ..ChannelSettings::default()
    };
    let actor = email_actor(provider("127.0.0.1", port, 1), settings).await;
    // One connection, without pipelining: the first message holds it for 1.8 s, and the other
    // five then have 0.7 s of their 2.5 s left, less than the 1 s a message needs.
    let outcomes =
        futures::future::join_all((0..6).map(|i| send_through(&actor, message(i)))).await;
    let accepted = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, SendOutcome::Accepted(_)))
        .count();
    let not_started = outcomes
        .iter()
        .filter(|outcome| {
            matches!(
                outcome,
                SendOutcome::NotStarted {
                    cause: NotStartedCause::NoConnection,
                    ..
                }
            )
        })
        .count();
    assert_eq!((accepted, not_started), (1, 5), "{outcomes:?}");
    assert_eq!(
        received.load(Ordering::SeqCst),
        1,
        "the relay got only the accepted message"
    );
    let snapshot = snapshot(&actor).await;
    assert_eq!(snapshot.circuit, CircuitState::Closed, "{snapshot:?}");
    assert_eq!(
        (snapshot.recent_failures, snapshot.failed, snapshot.sent),
        (0, 0, 1),
        "none counted as failed: {snapshot:?}"
    );
    actor.stop(None);
}

/// A group whose callers' deadlines have all passed is given up then, not at the group's own
/// (longer) `timeout_ms`: its connection is closed, and the next message does not wait for it.
#[tokio::test]
async fn a_group_is_given_up_once_its_messages_deadlines_have_passed() {
    let (port, mut seen) = stalling_server(PIPELINING_AND_CHUNKING).await;
    let email = impatient_provider(port, 20_000);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1_500);
    let messages: Vec<OutboundMessage> = (0..5).map(message).collect();
    let results = futures::future::join_all(
        messages
            .iter()
            .map(|outbound| send_by(&email, outbound, deadline)),
    )
    .await;
    assert!(
        results
            .iter()
            .all(|result| matches!(result, Err(ProviderError::Transient { .. }))),
        "{results:?}"
    );
    let next = message(5);
    let _ = send_by(
        &email,
        &next,
        tokio::time::Instant::now() + Duration::from_secs(3),
    )
    .await;
    expect_a_second_connection(&mut seen).await;
}

/// An SMTP server offering PIPELINING and CHUNKING that takes every message (`BDAT <size> LAST`
/// and the chunk) and answers each chunk with `reply`, every other command `250 ok`; counts the
/// messages it took, over all connections.
async fn chunking_server(reply: &'static [u8]) -> (u16, tokio::sync::watch::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (taken, watch) = tokio::sync::watch::channel(0);
    let taken = Arc::new(taken);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_chunks(stream, reply, taken.clone()));
        }
    });
    (port, watch)
}

/// A [`chunking_server`]'s session.
async fn serve_chunks(
    stream: tokio::net::TcpStream,
    chunk_reply: &'static [u8],
    taken: Arc<tokio::sync::watch::Sender<usize>>,
) {
    use tokio::io::AsyncReadExt;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let _ = write.write_all(b"220 chunks ESMTP\r\n").await;
    let mut line = String::new();
    loop {
        line.clear();
        if !matches!(read.read_line(&mut line).await, Ok(1..)) {
            return;
        }
        let command = line.trim_end().to_ascii_uppercase();
        let size = command
            .strip_prefix("BDAT ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|size| size.parse::<usize>().ok());
        let reply: &[u8] = match (command.get(..4), size) {
            (_, Some(size)) => {
                let mut chunk = vec![0; size];
                if read.read_exact(&mut chunk).await.is_err() {
                    return;
                }
                taken.send_modify(|taken| *taken += 1);
                chunk_reply
            }
            (Some("EHLO"), _) => b"250-chunks\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
            (Some("QUIT"), _) => b"221 bye\r\n",
            _ => b"250 ok\r\n",
        };
        if write.write_all(reply).await.is_err() {
            return;
        }
    }
}

/// A reply code without text (`250`, RFC 5321: the text is optional) is a reply: a message so
/// accepted is sent, not failed (and sent again), nor are the messages behind it in its group.
#[tokio::test]
async fn a_reply_code_without_text_accepts_the_message() {
    let (port, taken) = chunking_server(b"250\r\n").await;
    let email = provider("127.0.0.1", port, 1);
    // All five wait while the one connection opens, and go out together over it.
    let results = send_at_once(&email, 5).await;
    assert!(
        results.iter().all(|result| result
            .as_ref()
            .is_ok_and(|receipt| receipt.provider_message_id.is_none())),
        "{results:?}"
    );
    assert_eq!(*taken.borrow(), 5, "each message went once");
}

/// A 5xx to RCPT or to the message that refuses the sender or the account, as its enhanced code
/// (RFC 3463) or a known phrase says (relay access denied, the sender domain's DMARC, SPF or DKIM,
/// an unverified sender identity, a paused account), fails every message alike until someone
/// fixes it: transient, counting against the circuit, as a 5xx to MAIL FROM. A bad or full
/// mailbox, a `5.7.1` refusing the recipient (not relaying nor the sender), an unverified
/// recipient, content refused, and `spf` inside a domain name stay permanent; on every path a
/// message takes.
#[tokio::test]
async fn a_5xx_refusing_the_sender_or_the_account_is_transient_at_any_step() {
    let cases = [
        (
            RejectStage::Rcpt,
            554,
            "5.7.1 <customer-0@example.com>: Relay access denied",
            true,
        ),
        (RejectStage::Rcpt, 550, "Relay access denied", true),
        (
            RejectStage::Rcpt,
            550,
            "5.7.1 <customer-0@example.com>: relay not permitted",
            true,
        ),
        (
            RejectStage::Rcpt,
            554,
            "5.7.1 <herald@localhost>: Sender address rejected: Access denied",
            true,
        ),
        (
            RejectStage::Data,
            554,
            "Message rejected: Email address is not verified. The following identities failed \
             the check in region EU-WEST-1: herald@localhost",
            true,
        ),
        (
            RejectStage::Data,
            554,
            "Sending paused for this account. For more information, see the console.",
            true,
        ),
        (
            RejectStage::Data,
            550,
            "5.7.26 Unauthenticated email from localhost is not accepted due to domain's DMARC \
             policy",
            true,
        ),
        (
            RejectStage::Data,
            550,
            "5.7.1 Email rejected per DMARC policy for localhost",
            true,
        ),
        (
            RejectStage::Rcpt,
            550,
            "5.7.23 SPF validation failed for localhost",
            true,
        ),
        (
            RejectStage::Rcpt,
            553,
            "5.1.8 <herald@localhost>: Sender address rejected: Domain not found",
            true,
        ),
        // The recipient's or the message's own.
        (
            RejectStage::Rcpt,
            550,
            "5.1.1 <x>: Recipient address rejected",
            false,
        ),
        (
            RejectStage::Rcpt,
            554,
            "5.7.1 <customer-0@example.com>: Recipient address rejected: Access denied",
            false,
        ),
        (
            RejectStage::Rcpt,
            550,
            "5.7.1 Client does not have permissions to send as this sender: not authorized",
            false,
        ),
        (
            RejectStage::Data,
            554,
            "5.7.1 content refused: links to spfoo.com",
            false,
        ),
        (
            RejectStage::Data,
            554,
            "Message rejected: Email address is not verified. The following identities failed \
             the check in region EU-WEST-1: customer-0@example.com",
            false,
        ),
        (RejectStage::Rcpt, 550, "5.2.1 mailbox disabled", false),
        (RejectStage::Rcpt, 552, "5.2.2 mailbox full", false),
        (
            RejectStage::Data,
            554,
            "5.7.1 message content rejected as spam",
            false,
        ),
        (RejectStage::Data, 550, "no such user here", false),
    ];
    refuse_each_on_every_path(&cases).await;
}
