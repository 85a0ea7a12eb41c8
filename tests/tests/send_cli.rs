//! `herald send`, the binary run as an operator would, against a Herald serving on a free port:
//! a send that goes out (exit 0, the notification with its attempts on stdout, the mail in the
//! SMTP sink), one the API refuses (exit 1, its error on stderr, nothing on stdout), one that
//! ends without a send (exit 3), one whose status cannot be read (exit 5), and the API key never
//! shown.

use std::process::Output;

use herald_tests::{
    E2E_TIMEOUT, NatsServer, SmtpSink, TestDatabase, TestHerald, process::herald_bin, test_config,
};
use serde_json::Value;

/// Herald and the servers it uses, kept alive for the test.
struct World {
    _nats: NatsServer,
    smtp: SmtpSink,
    _db: TestDatabase,
    herald: TestHerald,
}

async fn world() -> World {
    let nats = NatsServer::start().await.expect("nats-server starts");
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald starts");
    World {
        _nats: nats,
        smtp,
        _db: db,
        herald,
    }
}

/// Runs `herald send <args>` with the variables `env` (no configuration file, no key in the
/// environment unless `env` sets one), until it exits.
async fn herald_send(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(herald_bin().expect("the herald binary"));
    command
        .arg("send")
        .args(args)
        .env_remove("HERALD_CONFIG")
        .env_remove("HERALD_API_KEY")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .kill_on_drop(true);
    tokio::time::timeout(E2E_TIMEOUT * 2, command.output())
        .await
        .expect("herald send finished within the timeout")
        .expect("herald send started")
}

fn streams(output: &Output) -> (String, String) {
    let stdout = String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8");
    let stderr = String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8");
    (stdout, stderr)
}

/// Asserts that `herald send` exited with `code`; its stdout and stderr.
fn exited(output: &Output, code: i32) -> (String, String) {
    let (stdout, stderr) = streams(output);
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout {stdout}, stderr {stderr}"
    );
    (stdout, stderr)
}

/// The one line of JSON `herald send` prints on stdout.
fn printed_json(stdout: &str) -> Value {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout holds one line of JSON: {stdout:?}");
    serde_json::from_str(lines[0]).expect("stdout is JSON")
}

fn assert_key_hidden(key: &str, output: &Output) {
    let (stdout, stderr) = streams(output);
    assert!(!stdout.contains(key), "the key is on stdout: {stdout}");
    assert!(!stderr.contains(key), "the key is on stderr: {stderr}");
}

/// `--wait` prints the sent notification with its attempts and exits 0; the mail went out.
#[tokio::test]
async fn a_send_that_goes_out_prints_the_sent_notification_and_exits_0() {
    let world = world().await;
    let key = world.herald.admin_key();
    let output = herald_send(
        &[
            "--url",
            world.herald.base(),
            "--key",
            key,
            "--email",
            "ada@example.com",
            "--subject",
            "Hi",
            "--category",
            "transactional",
            "--text",
            "Hello",
            "--wait",
            "30",
        ],
        &[],
    )
    .await;
    let (stdout, _) = exited(&output, 0);
    let view = printed_json(&stdout);
    assert_eq!(view["status"], "sent", "{view}");
    let attempts = view["attempts"].as_array().expect("attempts");
    assert!(
        attempts
            .iter()
            .any(|a| a["channel"] == "email" && a["status"] == "sent"),
        "an email attempt was sent: {view}"
    );
    let mails = world
        .smtp
        .wait_for_count(1, E2E_TIMEOUT)
        .await
        .expect("the mail reached the sink");
    assert_eq!(mails[0].to, ["ada@example.com"]);
    assert_eq!(mails[0].subject.as_deref(), Some("Hi"));
    assert_key_hidden(key, &output);

    // Without `--wait`: the acceptance alone, for `id=$(herald send … | jq -r .id)`.
    let output = herald_send(
        &[
            "--url",
            world.herald.base(),
            "--email",
            "bob@example.com",
            "--category",
            "transactional",
            "--text",
            "Hello",
        ],
        &[("HERALD_API_KEY", key)],
    )
    .await;
    let (stdout, _) = exited(&output, 0);
    let accepted = printed_json(&stdout);
    assert_eq!(accepted["status"], "queued", "{accepted}");
    let id = accepted["id"].as_str().expect("an id");
    world.herald.wait_status(id, "sent").await;
    assert_key_hidden(key, &output);
}

/// A send the API refuses: exit 1, the API's status and error body on stderr, stdout empty.
#[tokio::test]
async fn a_refused_send_exits_1_with_the_api_error_on_stderr() {
    let world = world().await;
    let key = world.herald.admin_key();
    let output = herald_send(
        &[
            "--url",
            world.herald.base(),
            "--key",
            key,
            "--category",
            "transactional",
            "--text",
            "Hello",
            "--wait",
        ],
        &[],
    )
    .await;
    let (stdout, stderr) = exited(&output, 1);
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    assert!(
        stderr.contains("400") && stderr.contains("\"code\":\"invalid_request\""),
        "the API's status and error body on stderr: {stderr}"
    );
    assert!(
        stderr.contains("name a customer_id or give at least one contact"),
        "the API's own message on stderr: {stderr}"
    );
    assert_key_hidden(key, &output);
    assert_eq!(world.smtp.count(), 0, "nothing was sent");
}

/// A notification that ends without a send (the relay refuses the address for good) exits 3,
/// the failed notification on stdout.
#[tokio::test]
async fn a_send_that_fails_exits_3_with_the_failed_notification() {
    let world = world().await;
    world.smtp.set_reject_next(1, 550, "5.1.1 no such user");
    let output = herald_send(
        &[
            "--url",
            world.herald.base(),
            "--email",
            "nobody@example.com",
            "--channel",
            "email",
            "--category",
            "transactional",
            "--text",
            "Hello",
            "--wait",
            "30",
        ],
        &[("HERALD_API_KEY", world.herald.admin_key())],
    )
    .await;
    let (stdout, stderr) = exited(&output, 3);
    let view = printed_json(&stdout);
    assert_eq!(view["status"], "failed", "{view}");
    assert!(stderr.contains("ended failed"), "{stderr}");
}

/// A key that may send but not read: the send is accepted and goes out, but `--wait` cannot read
/// its status. Exit 5 (not 1, which says nothing was accepted: a script retrying on 1 would send
/// it twice), the acceptance on stdout, the refusal on stderr.
#[tokio::test]
async fn an_accepted_send_whose_status_cannot_be_read_exits_5_with_the_acceptance() {
    let world = world().await;
    let key = herald_engine::apikey::create(world.herald.db(), "send-only", "send")
        .await
        .expect("key created")
        .token;
    let output = herald_send(
        &[
            "--url",
            world.herald.base(),
            "--email",
            "ada@example.com",
            "--category",
            "transactional",
            "--text",
            "Hello",
            "--wait",
            "30",
        ],
        &[("HERALD_API_KEY", &key)],
    )
    .await;
    let (stdout, stderr) = exited(&output, 5);
    let accepted = printed_json(&stdout);
    let id = accepted["id"].as_str().expect("the acceptance's id");
    assert!(
        stderr.contains("was accepted; cannot read its status") && stderr.contains("403"),
        "{stderr}"
    );
    world.herald.wait_status(id, "sent").await;
    assert_key_hidden(&key, &output);
}

/// `--wait` reads through a Herald that answers 503 for a while (restarting behind a proxy, its
/// database briefly away): the notification's final status is printed and the exit is 0.
#[tokio::test]
async fn a_wait_reads_on_through_passing_errors() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let api = MockServer::start().await;
    let id = "0193a6f4-0000-7000-8000-000000000001";
    Mock::given(method("POST"))
        .and(path("/api/v1/notifications"))
        .respond_with(
            ResponseTemplate::new(202)
                .set_body_json(serde_json::json!({ "id": id, "status": "queued" })),
        )
        .mount(&api)
        .await;
    let unavailable = serde_json::json!({ "code": "unavailable", "message": "try again" });
    Mock::given(method("GET"))
        .and(path(format!("/api/v1/notifications/{id}")))
        .respond_with(ResponseTemplate::new(503).set_body_json(unavailable))
        .up_to_n_times(3)
        .with_priority(1)
        .mount(&api)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/api/v1/notifications/{id}")))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "id": id, "status": "sent", "attempts": [] })),
        )
        .mount(&api)
        .await;
    let output = herald_send(
        &[
            "--url",
            &api.uri(),
            "--email",
            "ada@example.com",
            "--category",
            "transactional",
            "--text",
            "Hello",
            "--wait",
            "30",
        ],
        &[("HERALD_API_KEY", "hk_test_secret")],
    )
    .await;
    let (stdout, _) = exited(&output, 0);
    assert_eq!(printed_json(&stdout)["status"], "sent", "{stdout}");
    let reads = api
        .received_requests()
        .await
        .expect("requests recorded")
        .iter()
        .filter(|request| request.method == wiremock::http::Method::GET)
        .count();
    assert_eq!(reads, 4, "three refused reads, then the one that succeeded");
}

/// A wrong key is refused with 401 and shown nowhere, nor is the key of `HERALD_API_KEY` in
/// `--help`.
#[tokio::test]
async fn the_api_key_is_never_printed() {
    let world = world().await;
    let wrong = "hk_0123456789abcdef_not-a-real-secret";
    let output = herald_send(
        &[
            "--url",
            world.herald.base(),
            "--email",
            "ada@example.com",
            "--category",
            "transactional",
            "--text",
            "Hello",
        ],
        &[("HERALD_API_KEY", wrong)],
    )
    .await;
    let (_, stderr) = exited(&output, 1);
    assert!(stderr.contains("401"), "the refusal on stderr: {stderr}");
    assert_key_hidden(wrong, &output);

    let help = herald_send(&["--help"], &[("HERALD_API_KEY", wrong)]).await;
    let (stdout, _) = streams(&help);
    assert!(
        stdout.contains("HERALD_API_KEY"),
        "the help names the variable: {stdout}"
    );
    assert_key_hidden(wrong, &help);
}

/// A send that is not answered as accepted (here a 503, as while the database is away; a timeout
/// or a reset connection may follow an accepted one) exits 1 naming the request id it went with,
/// a new UUID when `--request-id` is absent; the retry it suggests repeats that id, which Herald
/// answers with the first notification if that one was stored, instead of sending it twice.
#[tokio::test]
async fn a_failed_send_names_its_request_id_for_a_retry_that_cannot_send_twice() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let api = MockServer::start().await;
    let unavailable = serde_json::json!({
        "code": "unavailable",
        "message": "the database is unavailable; retry with the same request id",
    });
    Mock::given(method("POST"))
        .and(path("/api/v1/notifications"))
        .respond_with(ResponseTemplate::new(503).set_body_json(unavailable))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&api)
        .await;
    let id = "0193a6f4-0000-7000-8000-000000000002";
    Mock::given(method("POST"))
        .and(path("/api/v1/notifications"))
        .respond_with(
            ResponseTemplate::new(202)
                .set_body_json(serde_json::json!({ "id": id, "status": "queued" })),
        )
        .mount(&api)
        .await;
    let uri = api.uri();
    let mut args = vec![
        "--url",
        &uri,
        "--email",
        "ada@example.com",
        "--category",
        "transactional",
        "--text",
        "Hello",
    ];
    let env = [("HERALD_API_KEY", "hk_test_secret")];
    let sent_request_ids = async || -> Vec<Option<String>> {
        api.received_requests()
            .await
            .expect("requests recorded")
            .iter()
            .map(|request| {
                let body: Value = serde_json::from_slice(&request.body).expect("a JSON body");
                body["request_id"].as_str().map(str::to_string)
            })
            .collect()
    };

    let (stdout, stderr) = exited(&herald_send(&args, &env).await, 1);
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    assert!(
        stderr.contains("503"),
        "the API's answer on stderr: {stderr}"
    );
    let sent = sent_request_ids().await;
    let request_id = sent[0]
        .clone()
        .unwrap_or_else(|| panic!("the send carries a request id: {sent:?}"));
    assert!(
        uuid::Uuid::parse_str(&request_id).is_ok(),
        "a new UUID: {request_id}"
    );
    let retry = format!("retry with --request-id {request_id}");
    assert!(stderr.contains(&retry), "{retry:?} on stderr: {stderr}");

    // The retry it suggests, answered.
    args.extend(["--request-id", &request_id]);
    let (stdout, _) = exited(&herald_send(&args, &env).await, 0);
    assert_eq!(printed_json(&stdout)["id"], id, "{stdout}");
    assert_eq!(
        sent_request_ids().await,
        [Some(request_id.clone()), Some(request_id)],
        "the retry repeats the request id"
    );
}

/// A send Herald refuses (invalid, or a reused request id) is not worth repeating: no retry hint.
#[tokio::test]
async fn a_refused_send_suggests_no_retry() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let api = MockServer::start().await;
    let reused = serde_json::json!({
        "code": "idempotency_key_reused",
        "message": "the request id was used for a different request",
    });
    Mock::given(method("POST"))
        .and(path("/api/v1/notifications"))
        .respond_with(ResponseTemplate::new(422).set_body_json(reused))
        .mount(&api)
        .await;
    let uri = api.uri();
    let args = [
        "--url",
        &uri,
        "--email",
        "ada@example.com",
        "--category",
        "transactional",
        "--text",
        "Hello",
    ];
    let (_, stderr) = exited(
        &herald_send(&args, &[("HERALD_API_KEY", "hk_test_secret")]).await,
        1,
    );
    assert!(
        stderr.contains("idempotency_key_reused"),
        "the API's answer on stderr: {stderr}"
    );
    assert!(
        !stderr.contains("retry with --request-id"),
        "no retry suggested for a refusal: {stderr}"
    );
}
