//! Tests of the end-to-end harness itself, against the real processes.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use herald_tests::{
    DatabaseKind, HeraldProcess, NatsServer, PgServer, RejectStage, SmtpSink, TestDatabase,
    eventually, eventually_showing, free_port, init_tracing,
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const WAIT: Duration = Duration::from_secs(10);

/// A hand-driven SMTP client: sends one line, reads one (possibly multi-line) reply.
struct RawSmtp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl RawSmtp {
    async fn connect(sink: &SmtpSink) -> Self {
        let stream = TcpStream::connect((sink.host(), sink.port()))
            .await
            .expect("connect to the SMTP sink");
        let (read, writer) = stream.into_split();
        let mut client = Self {
            reader: BufReader::new(read),
            writer,
        };
        let greeting = client.read_reply().await;
        assert!(greeting.starts_with("220 "), "greeting: {greeting:?}");
        client
    }

    /// Reads a reply, joining the lines of a multi-line reply with `\n`.
    async fn read_reply(&mut self) -> String {
        let mut reply = Vec::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(WAIT, self.reader.read_line(&mut line))
                .await
                .expect("the SMTP sink replies within 10 s")
                .expect("read a reply line");
            assert!(read > 0, "connection closed; reply so far: {reply:?}");
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            let last = line.as_bytes().get(3) != Some(&b'-');
            reply.push(line);
            if last {
                return reply.join("\n");
            }
        }
    }

    async fn send_raw(&mut self, bytes: &str) {
        self.writer
            .write_all(bytes.as_bytes())
            .await
            .expect("write to the SMTP sink");
    }

    async fn command(&mut self, line: &str) -> String {
        self.send_raw(&format!("{line}\r\n")).await;
        self.read_reply().await
    }

    async fn expect(&mut self, line: &str, code: &str) -> String {
        let reply = self.command(line).await;
        assert!(
            reply.starts_with(code),
            "{line:?} answered {reply:?}, expected {code}"
        );
        reply
    }
}

#[tokio::test]
async fn nats_server_starts_and_acks_a_jetstream_publish() {
    init_tracing();
    let server = NatsServer::start().await.expect("start nats-server");
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));

    let js = jetstream::new(server.client().await.expect("connect"));
    js.create_stream(stream::Config {
        name: "HARNESS".into(),
        subjects: vec!["harness.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream");
    let ack = js
        .publish("harness.one", "hello".into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
    assert_eq!(ack.stream, "HARNESS");
    assert_eq!(ack.sequence, 1);
}

#[tokio::test]
async fn nats_file_store_survives_kill_and_restart() {
    init_tracing();
    let mut server = NatsServer::start().await.expect("start nats-server");
    let port = server.port();
    {
        let js = jetstream::new(server.client().await.expect("connect"));
        js.create_stream(stream::Config {
            name: "DURABLE".into(),
            subjects: vec!["durable.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create stream");
        js.publish("durable.kept", "kept across a crash".into())
            .await
            .expect("publish")
            .await
            .expect("publish ack");
    }

    server.kill().await.expect("kill");
    assert!(!server.is_running());
    let refused = TcpStream::connect(("127.0.0.1", port)).await;
    assert!(
        refused.is_err(),
        "the killed server still accepts connections"
    );

    server.restart().await.expect("restart");
    assert_eq!(server.port(), port, "restart keeps the port");
    let js = jetstream::new(server.client().await.expect("reconnect"));
    let mut stream = js.get_stream("DURABLE").await.expect("stream survives");
    assert_eq!(stream.info().await.expect("stream info").state.messages, 1);
    let message = stream.get_raw_message(1).await.expect("message survives");
    assert_eq!(message.subject.as_str(), "durable.kept");
    assert_eq!(&message.payload[..], b"kept across a crash");
}

#[tokio::test]
async fn nats_server_stops_gracefully() {
    init_tracing();
    let mut server = NatsServer::start().await.expect("start nats-server");
    server.stop().await.expect("stop");
    assert!(!server.is_running());
    assert!(
        TcpStream::connect(("127.0.0.1", server.port()))
            .await
            .is_err(),
        "the stopped server still accepts connections"
    );
    assert!(
        server.log_tail(50).contains("Server Exiting"),
        "log does not show a graceful exit:\n{}",
        server.log_tail(50)
    );

    server.restart().await.expect("restart after a stop");
    assert!(server.is_running());
    server.client().await.expect("connect after the restart");
}

#[tokio::test]
async fn smtp_sink_receives_a_message_and_unstuffs_dots() {
    init_tracing();
    let sink = SmtpSink::start().await.expect("start sink");
    let mut smtp = RawSmtp::connect(&sink).await;
    let ehlo = smtp.expect("EHLO client.test", "250").await;
    assert!(ehlo.contains("8BITMIME"), "EHLO reply: {ehlo}");
    assert!(ehlo.contains("SIZE "), "EHLO reply: {ehlo}");
    smtp.expect(
        "MAIL FROM:<sender@herald.test> BODY=8BITMIME SIZE=400",
        "250",
    )
    .await;
    smtp.expect("RCPT TO:<first@example.test>", "250").await;
    smtp.expect("RCPT TO:<second@example.test>", "250").await;
    smtp.expect("DATA", "354").await;
    // Two lines starting with a dot, stuffed by the client as RFC 5321 requires; a
    // quoted-printable body and an RFC 2047 subject ("Grüße").
    smtp.send_raw(concat!(
        "From: Herald <sender@herald.test>\r\n",
        "To: first@example.test, second@example.test\r\n",
        "Subject: =?UTF-8?B?R3LDvMOfZQ==?=\r\n",
        "Message-ID: <abc.123@herald.test>\r\n",
        "MIME-Version: 1.0\r\n",
        "Content-Type: text/plain; charset=utf-8\r\n",
        "Content-Transfer-Encoding: quoted-printable\r\n",
        "\r\n",
        "caf=C3=A9\r\n",
        "..hidden line\r\n",
        "..\r\n",
        "end\r\n",
    ))
    .await;
    let queued = smtp.expect(".", "250").await;
    assert!(queued.contains("queued"), "{queued}");
    smtp.expect("QUIT", "221").await;

    let mails = sink.wait_for_count(1, WAIT).await.expect("one message");
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.from, "sender@herald.test");
    assert_eq!(mail.to, ["first@example.test", "second@example.test"]);
    assert_eq!(mail.subject.as_deref(), Some("Grüße"));
    assert_eq!(mail.message_id.as_deref(), Some("abc.123@herald.test"));
    assert!(
        mail.data
            .ends_with("caf=C3=A9\r\n.hidden line\r\n.\r\nend\r\n"),
        "dot-unstuffing: {:?}",
        mail.data
    );
    assert!(!mail.data.contains(".."), "{:?}", mail.data);
    let body = mail.text_body().expect("text body");
    assert!(body.starts_with("café\r\n.hidden line"), "{body:?}");
    assert_eq!(
        mail.header("content-transfer-encoding").as_deref(),
        Some("quoted-printable")
    );
    assert_eq!(sink.count(), 1);
    assert_eq!(sink.connection_count(), 1);
}

#[tokio::test]
async fn smtp_sink_answers_bad_sequences_and_unknown_commands_without_closing() {
    init_tracing();
    let sink = SmtpSink::start().await.expect("start sink");
    let mut smtp = RawSmtp::connect(&sink).await;
    smtp.expect("MAIL FROM:<a@b.test>", "503").await;
    smtp.expect("HELO client.test", "250").await;
    smtp.expect("RCPT TO:<c@d.test>", "503").await;
    smtp.expect("STARTTLS", "502").await;
    smtp.expect("AUTH PLAIN AGFiYwBjZGU=", "502").await;
    smtp.expect("MAIL FROM:a@b.test", "501").await;
    smtp.expect("MAIL FROM:<>", "250").await;
    smtp.expect("MAIL FROM:<a@b.test>", "503").await;
    smtp.expect("DATA", "554").await;
    smtp.expect("RSET", "250").await;
    smtp.expect("NOOP", "250").await;
    smtp.expect(&format!("x{}", "y".repeat(5000)), "500").await;
    smtp.expect("MAIL FROM:<a@b.test> SIZE=999999999999", "552")
        .await;
    smtp.expect("QUIT", "221").await;
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn smtp_sink_rejects_as_injected() {
    init_tracing();
    let sink = SmtpSink::start().await.expect("start sink");
    let mut smtp = RawSmtp::connect(&sink).await;
    smtp.expect("EHLO client.test", "250").await;

    sink.set_reject_next(2, 451, "4.7.1 Greylisted, try later");
    smtp.expect("MAIL FROM:<s@herald.test>", "250").await;
    let first = smtp.expect("RCPT TO:<a@example.test>", "451").await;
    assert_eq!(first, "451 4.7.1 Greylisted, try later");
    smtp.expect("RCPT TO:<b@example.test>", "451").await;
    smtp.expect("RCPT TO:<c@example.test>", "250").await;

    sink.set_reject_next_at(RejectStage::Data, 1, 554, "5.7.1 Content rejected");
    smtp.expect("DATA", "354").await;
    smtp.send_raw("Subject: refused\r\n\r\nbody\r\n").await;
    smtp.expect(".", "554").await;
    assert_eq!(sink.count(), 0, "a rejected message must not be stored");

    // The rejection is used up: the same transaction now goes through.
    smtp.expect("MAIL FROM:<s@herald.test>", "250").await;
    smtp.expect("RCPT TO:<c@example.test>", "250").await;
    smtp.expect("DATA", "354").await;
    smtp.send_raw("Subject: accepted\r\n\r\nbody\r\n").await;
    smtp.expect(".", "250").await;
    let mails = sink.wait_for_count(1, WAIT).await.expect("one message");
    assert_eq!(mails[0].subject.as_deref(), Some("accepted"));
    assert_eq!(mails[0].to, ["c@example.test"]);
}

#[tokio::test]
async fn smtp_sink_pause_refuses_and_resume_accepts() {
    init_tracing();
    let sink = SmtpSink::start().await.expect("start sink");
    let mut open = RawSmtp::connect(&sink).await;
    open.expect("EHLO client.test", "250").await;

    sink.set_pause(true);
    let accepted_before = sink.connection_count();
    // A paused sink keeps its port (so that no other test's server takes it and this one's mail)
    // but resets each new connection at once: no greeting is ever read from it.
    let mut stray = TcpStream::connect((sink.host(), sink.port()))
        .await
        .expect("the port is still the sink's");
    let mut greeting = Vec::new();
    let read = tokio::time::timeout(WAIT, stray.read_to_end(&mut greeting))
        .await
        .expect("the paused sink closes the connection at once");
    assert!(
        greeting.is_empty(),
        "a paused sink greeted: {read:?} {:?}",
        String::from_utf8_lossy(&greeting)
    );
    open.expect("NOOP", "421").await;
    assert_eq!(
        sink.connection_count(),
        accepted_before,
        "a paused sink served a connection"
    );

    sink.set_pause(false);
    let mut again = RawSmtp::connect(&sink).await;
    again.expect("EHLO client.test", "250").await;
}

#[tokio::test]
async fn smtp_sink_serves_concurrent_connections() {
    init_tracing();
    let sink = SmtpSink::start().await.expect("start sink");
    let clients = 16;
    let mut tasks = Vec::new();
    for i in 0..clients {
        let mut smtp = RawSmtp::connect(&sink).await;
        tasks.push(tokio::spawn(async move {
            smtp.expect("EHLO client.test", "250").await;
            smtp.expect("MAIL FROM:<s@herald.test>", "250").await;
            smtp.expect(&format!("RCPT TO:<user{i}@example.test>"), "250")
                .await;
            smtp.expect("DATA", "354").await;
            smtp.send_raw(&format!("Subject: mail {i}\r\n\r\nhi\r\n"))
                .await;
            smtp.expect(".", "250").await;
            smtp.expect("QUIT", "221").await;
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    let mails = sink.wait_for_count(clients, WAIT).await.expect("all mails");
    let mut subjects: Vec<_> = mails.iter().filter_map(|m| m.subject.clone()).collect();
    subjects.sort();
    let mut expected: Vec<_> = (0..clients).map(|i| format!("mail {i}")).collect();
    expected.sort();
    assert_eq!(subjects, expected);
    assert_eq!(sink.connection_count(), clients as u64);
}

#[tokio::test]
async fn smtp_sink_wait_for_count_times_out_with_a_clear_error() {
    let sink = SmtpSink::start().await.expect("start sink");
    let error = sink
        .wait_for_count(1, Duration::from_millis(50))
        .await
        .expect_err("no mail was sent");
    assert!(
        error.to_string().contains("waiting for 1 messages"),
        "{error}"
    );
}

#[tokio::test]
async fn sqlite_database_is_a_fresh_file() {
    let db = TestDatabase::sqlite().await.expect("sqlite database");
    assert_eq!(db.kind(), DatabaseKind::Sqlite);
    let path = db.sqlite_path().expect("a sqlite path").to_owned();
    assert_eq!(db.url(), format!("sqlite://{}", path.display()));
    assert!(db.url().starts_with("sqlite:///"), "{}", db.url());
    assert!(path.parent().expect("a parent dir").is_dir());
    assert!(path.is_file());
    drop(db);
    assert!(
        !path.exists(),
        "the temporary directory outlived the database"
    );
}

#[tokio::test]
async fn postgres_database_is_created_and_dropped() {
    let server = PgServer::from_env();
    let db = TestDatabase::postgres().await.expect("postgres database");
    assert_eq!(db.kind(), DatabaseKind::Postgres);
    let name = db.postgres_name().expect("a database name").to_owned();
    assert!(name.starts_with("herald_test_"), "{name}");
    assert_eq!(db.url(), server.url(&name));
    let exists = format!("SELECT 1 FROM pg_database WHERE datname = '{name}'");
    assert_eq!(server.admin_query(&exists).await.expect("query"), "1");

    drop(db);
    assert_eq!(server.admin_query(&exists).await.expect("query"), "");
}

#[tokio::test]
async fn database_from_env_defaults_to_a_known_kind() {
    let db = TestDatabase::from_env().await.expect("database from env");
    let expected = match std::env::var("HERALD_TEST_DB").as_deref() {
        Ok("postgres" | "postgresql" | "pg") => DatabaseKind::Postgres,
        _ => DatabaseKind::Sqlite,
    };
    assert_eq!(db.kind(), expected);
}

#[tokio::test]
async fn eventually_returns_the_first_value() {
    let mut polls = 0;
    let value = eventually("the third poll", WAIT, || {
        polls += 1;
        let ready = (polls >= 3).then_some(polls);
        async move { ready }
    })
    .await;
    assert_eq!(value, 3);
}

#[tokio::test]
#[should_panic(expected = "waiting for a condition that never holds")]
async fn eventually_panics_naming_what_it_waited_for() {
    eventually(
        "a condition that never holds",
        Duration::from_millis(50),
        || async { None::<()> },
    )
    .await;
}

#[tokio::test]
#[should_panic(expected = "waiting for the fifth poll; last seen: poll 2")]
async fn eventually_showing_panics_with_the_last_state_seen() {
    let mut polls = 0;
    eventually_showing("the fifth poll", Duration::from_secs(2), || {
        polls += 1;
        let seen = if polls <= 2 {
            Err(format!("poll {polls}"))
        } else {
            // A poll still running at the deadline leaves the last state seen as it was.
            return futures::future::Either::Left(std::future::pending());
        };
        futures::future::Either::Right(async move { seen })
    })
    .await
}

#[tokio::test]
async fn a_herald_process_that_exits_while_starting_is_reported_at_once() {
    let logs = tempfile::tempdir().expect("logs");
    // No backtrace: the log's last lines are the error itself.
    let env = [
        ("HERALD_DISPATCH__MAX_IN_FLIGHT", "not a number"),
        ("RUST_BACKTRACE", "0"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec();
    let started = std::time::Instant::now();
    let start = tokio::spawn(HeraldProcess::start(env, logs.path().join("herald.log")));
    let panic = start
        .await
        .err()
        .and_then(|err| err.try_into_panic().ok())
        .and_then(|panic| panic.downcast::<String>().ok())
        .expect("start panics");
    assert!(panic.contains("exited with"), "{panic}");
    assert!(
        panic.contains("MAX_IN_FLIGHT") || panic.contains("max_in_flight"),
        "{panic}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "reported after {:?}",
        started.elapsed()
    );
}

#[test]
fn free_port_is_bindable() {
    let port = free_port().expect("free port");
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the free port");
}

#[tokio::test]
async fn smtp_sink_works_with_a_pooled_lettre_transport() {
    use lettre::message::header::ContentType;
    use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};

    init_tracing();
    let sink = SmtpSink::start().await.expect("start sink");
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(sink.host())
        .port(sink.port())
        .build();
    let message = |i: usize| {
        Message::builder()
            .from("Herald <noreply@herald.test>".parse().expect("from"))
            .to(format!("user{i}@example.test").parse().expect("to"))
            .subject(format!("Grüße {i}"))
            .message_id(Some(format!("<m{i}@herald.test>")))
            .header(ContentType::TEXT_PLAIN)
            .body(format!(".leading dot and ünïcode {i}\n"))
            .expect("message")
    };

    for i in 0..3 {
        transport.send(message(i)).await.expect("send");
    }
    let mails = sink.wait_for_count(3, WAIT).await.expect("three mails");
    assert_eq!(mails[2].subject.as_deref(), Some("Grüße 2"));
    assert_eq!(mails[2].message_id.as_deref(), Some("m2@herald.test"));
    assert_eq!(mails[2].to, ["user2@example.test"]);
    assert_eq!(
        mails[2].text_body().expect("text body").trim_end(),
        ".leading dot and ünïcode 2"
    );
    // lettre returns a connection to its pool on a spawned task, so how many
    // connections three sequential sends use is not deterministic: not asserted.

    sink.set_reject_next(1, 451, "4.3.0 Try again later");
    let error = transport.send(message(3)).await.expect_err("rejected");
    assert!(error.is_transient(), "{error:?}");
    sink.set_reject_next(1, 550, "5.1.1 No such user");
    let error = transport.send(message(4)).await.expect_err("rejected");
    assert!(error.is_permanent(), "{error:?}");
    transport
        .send(message(5))
        .await
        .expect("send after rejections");
    assert_eq!(sink.wait_for_count(4, WAIT).await.expect("four").len(), 4);
}
