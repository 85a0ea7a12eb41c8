//! The email provider's SMTP connection pool against real SMTP servers: connections are reused
//! without a NOOP before every message, never exceed the pool size, and a connection whose session
//! failed or was cut short is not handed to the next message. A message goes in one round trip
//! (BDAT) to a server offering CHUNKING and PIPELINING, in two (pipelined DATA) to one offering
//! PIPELINING alone, and one command at a time to others; configuration turns either extension
//! off.

use std::time::Duration;

use herald_actors::channel::email::{EmailConfig, EmailProvider, SmtpSecurity};
use herald_actors::channel::{OutboundMessage, Provider, ProviderError};
use herald_nats::{Contacts, Content};
use herald_tests::{RejectStage, SmtpSink};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use uuid::Uuid;

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
    }
}

#[tokio::test]
async fn one_connection_carries_many_messages_without_a_noop_before_each() {
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 4);
    for i in 0..20 {
        email.send(&message(i)).await.expect("sent");
    }
    assert_eq!(sink.count(), 20);
    assert_eq!(sink.connection_count(), 1, "one connection, reused");
    assert_eq!(sink.noop_count(), 0, "no NOOP check between messages");
}

#[tokio::test]
async fn concurrent_sends_never_open_more_connections_than_the_pool_size() {
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 3);
    let sends = (0..40).map(|i| {
        let email = &email;
        async move { email.send(&message(i)).await }
    });
    let results = futures::future::join_all(sends).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(sink.count(), 40);
    assert!(
        sink.connection_count() <= 3,
        "{} connections for a pool of 3",
        sink.connection_count()
    );
}

#[tokio::test]
async fn after_a_refused_message_the_next_goes_through_on_a_fresh_session() {
    let sink = SmtpSink::start().await.expect("sink");
    let email = provider(sink.host(), sink.port(), 1);
    email.send(&message(0)).await.expect("first sent");
    sink.set_reject_next(1, 550, "5.1.1 no such user");
    let refused = email.send(&message(1)).await;
    assert!(
        matches!(refused, Err(ProviderError::Permanent { .. })),
        "{refused:?}"
    );
    email.send(&message(2)).await.expect("next sent");
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
    email.send(&dotted).await.expect("sent");
    for i in 1..5 {
        email.send(&message(i)).await.expect("sent");
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
        email.send(&message(i)).await.expect("sent");
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
    a_greylisted_recipient_is_a_transient_failure(&sink, 0).await;
}

#[tokio::test]
async fn a_refusal_before_a_chunk_is_reported_by_its_own_reply_not_the_chunks() {
    let sink = SmtpSink::start().await.expect("sink");
    a_greylisted_recipient_is_a_transient_failure(&sink, 1).await;
}

/// The recipient is greylisted (451, try later); the DATA or BDAT pipelined behind it is then
/// refused for want of recipients (554), which must not turn the temporary refusal into a
/// permanent one. `chunked` of the two messages come in BDAT chunks (the next one, or none).
async fn a_greylisted_recipient_is_a_transient_failure(sink: &SmtpSink, chunked: u64) {
    let refused =
        refuse_one_then_send_the_next(sink, RejectStage::Rcpt, 451, "4.7.1 greylisted").await;
    assert!(
        matches!(&refused, Err(ProviderError::Transient { .. })),
        "{refused:?}"
    );
    assert_eq!(
        sink.chunked_count(),
        chunked,
        "messages that came in chunks"
    );
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
    let refused = email.send(&message(0)).await;
    email.send(&message(1)).await.expect("next sent");
    let subjects: Vec<Option<String>> = sink.messages().into_iter().map(|m| m.subject).collect();
    assert_eq!(subjects, vec![Some("Order #1".to_string())]);
    assert_eq!(
        sink.connection_count(),
        2,
        "the refused session was closed, not reused"
    );
    refused
}

/// An SMTP server that greets and answers EHLO, then never answers another command; counts the
/// connections it accepted.
async fn stalling_server() -> (u16, tokio::sync::watch::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (connections, seen) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            connections.send_modify(|n| *n += 1);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 stall ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.to_ascii_uppercase().starts_with("EHLO") {
                        let _ = write.write_all(b"250 stall\r\n").await;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test]
async fn a_send_cut_short_by_its_timeout_does_not_leave_its_connection_to_the_next() {
    let (port, mut connections) = stalling_server().await;
    let email = provider("127.0.0.1", port, 1);
    for attempt in 1..=2 {
        let outbound = message(attempt);
        let cut = tokio::time::timeout(Duration::from_millis(300), email.send(&outbound)).await;
        assert!(cut.is_err(), "attempt {attempt} should have stalled");
    }
    // With the first session reused, the second MAIL FROM would have been written into it (and
    // answered later by the reply meant for the first); a fresh session is a second connection.
    tokio::time::timeout(Duration::from_secs(5), connections.wait_for(|n| *n >= 2))
        .await
        .expect("a second connection for the second message")
        .expect("server running");
}
