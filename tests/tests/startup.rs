//! Starting up: what the command line prints, and what a start that cannot finish leaves behind
//! (nothing taken), and what a start with new settings changes on existing NATS consumers.

use std::time::Duration;

use async_nats::jetstream;
use herald_nats::StreamSettings;
use herald_tests::{
    E2E_TIMEOUT, NatsServer, SmtpSink, TestDatabase, init_tracing, process::herald_bin, test_config,
};

/// `KEY=$(herald apikey create …)` (README) captures the key alone: logs go to stderr.
#[tokio::test]
async fn apikey_create_prints_only_the_key_on_stdout() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let mut command = tokio::process::Command::new(herald_bin().expect("the herald binary"));
    command
        .args(["apikey", "create", "--name", "ci", "--scopes", "send,read"])
        .env("HERALD_DATABASE__URL", &url)
        // The migrations it applies log at info.
        .env("HERALD_LOG__LEVEL", "info")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    let output = tokio::time::timeout(E2E_TIMEOUT, command.output())
        .await
        .expect("herald apikey create finished within the timeout")
        .expect("herald apikey create started");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "failed: {stderr}");
    let stdout = String::from_utf8(output.stdout).expect("stdout is UTF-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout holds the key alone: {stdout:?}");
    let key = lines[0];
    assert!(
        key.starts_with("hk_") && !key.contains(char::is_whitespace),
        "stdout holds the key alone: {stdout:?}"
    );
    assert!(
        stderr.to_lowercase().contains("migration"),
        "the migration logs went to stderr: {stderr}"
    );
}

/// Runs `herald <args>` with JSON logs at info and the variables `env`, until it exits.
async fn run_herald(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(herald_bin().expect("the herald binary"));
    command
        .args(args)
        .envs(env.iter().copied())
        .env("HERALD_LOG__FORMAT", "json")
        .env("HERALD_LOG__LEVEL", "info")
        .env_remove("HERALD_CONFIG")
        .env_remove("RUST_LOG")
        .kill_on_drop(true);
    tokio::time::timeout(E2E_TIMEOUT, command.output())
        .await
        .expect("herald finished within the timeout")
        .expect("herald started")
}

/// The field `field` (`message`, `unknown_keys`) of each warning a JSON log holds that has it.
fn warnings(stderr: &str, field: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|log| log["level"] == "WARN")
        .filter_map(|log| log[field].as_str().map(str::to_owned))
        .collect()
}

/// A misspelt key is named in one warning on stderr, by `herald config` too, and stops nothing;
/// variables that are not configuration (the suite's own) are not named.
#[tokio::test]
async fn config_warns_of_unknown_keys_and_still_prints() {
    let output = run_herald(
        &["config"],
        &[
            ("HERALD_DISPATCH__MAX_INFLIGHT", "64"),
            ("HERALD_TEST_DB", "sqlite"),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "failed: {stderr}");
    let named = warnings(&stderr, "unknown_keys");
    assert_eq!(
        named,
        ["dispatch.max_inflight (environment variable HERALD_DISPATCH__MAX_INFLIGHT)"],
        "one warning names the key and its variable: {stderr}"
    );
    assert!(
        !stderr.to_lowercase().contains("test_db"),
        "the suite's variable is not configuration: {stderr}"
    );
    let stdout = String::from_utf8(output.stdout).expect("stdout is UTF-8");
    assert!(
        stdout.contains("max_in_flight = 1024"),
        "the default applies: {stdout}"
    );
}

/// The `[[routing.rules]]` entries of `herald config`'s output, each as its text.
fn printed_rules(stdout: &str) -> Vec<&str> {
    stdout.split("[[routing.rules]]").skip(1).collect()
}

/// `herald config` prints the routing rules in force: the built-in ones when none are
/// configured; a configured rule beside the built-in ones it leaves in force, and one switched off
/// as switched off. A chain naming a channel without a provider is a warning, not a refusal.
#[tokio::test]
async fn config_prints_the_routing_rules_in_force() {
    let output = run_herald(&["config"], &[]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "failed: {stderr}");
    let stdout = String::from_utf8(output.stdout).expect("stdout is UTF-8");
    let rules = printed_rules(&stdout);
    let built_in = herald_actors::rules::default_rules();
    assert_eq!(rules.len(), built_in.len(), "{stdout}");
    for (printed, rule) in rules.iter().zip(&built_in) {
        assert!(
            printed.contains(&format!("name = \"{}\"", rule.name)),
            "{}: {stdout}",
            rule.name
        );
    }
    assert!(
        warnings(&stderr, "message").is_empty(),
        "the defaults warn of nothing: {stderr}"
    );

    let dir = tempfile::tempdir().expect("temporary folder");
    let file = dir.path().join("herald.toml");
    std::fs::write(
        &file,
        r#"
        [routing.default_chains]
        security = ["sms", "email", "push"]

        [[routing.rules]]
        name = "order_review"
        event = "orders.status_changed"
        when = { status = "delivered" }
        template = "order_review"
        category = "marketing"
        channels = ["email"]

        [[routing.rules]]
        name = "marketing_campaign"
        event = "marketing.campaign"
        template = "marketing"
        category = "marketing"
        enabled = false
        "#,
    )
    .expect("configuration file");
    let file = file.to_str().expect("UTF-8 path");
    let output = run_herald(&["config", "--config", file], &[]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "failed: {stderr}");
    let stdout = String::from_utf8(output.stdout).expect("stdout is UTF-8");
    let names: Vec<&str> = printed_rules(&stdout)
        .iter()
        .filter_map(|rule| rule.lines().find_map(|line| line.strip_prefix("name = ")))
        .collect();
    assert_eq!(
        names,
        [
            "\"order_placed\"",
            "\"order_shipped\"",
            "\"order_delivered\"",
            "\"login_alert\"",
            "\"order_review\"",
            "\"marketing_campaign\"",
        ],
        "{stdout}"
    );
    let switched_off = printed_rules(&stdout)
        .into_iter()
        .filter(|rule| rule.contains("enabled = false"))
        .count();
    assert_eq!(switched_off, 1, "{stdout}");
    let warned = warnings(&stderr, "message");
    let unconfigured: Vec<&String> = warned
        .iter()
        .filter(|warning| warning.contains("no provider is configured"))
        .collect();
    assert_eq!(unconfigured.len(), 2, "sms and push: {stderr}");
    assert!(
        unconfigured[0].starts_with("sms is named by routing.default_chains.security")
            && unconfigured[1].starts_with("push is named by routing.default_chains.security"),
        "{stderr}"
    );
}

/// Asserts that `herald config` and `herald serve`, with the variables `env`, stop at once with a
/// refusal holding `refusal`: neither opens the database in `dir` first.
async fn assert_refused_at_once(dir: &std::path::Path, env: &[(&str, &str)], refusal: &str) {
    let db_file = dir.join("herald.db");
    let url = format!("sqlite://{}", db_file.display());
    let mut env = env.to_vec();
    env.extend([
        ("HERALD_DATABASE__URL", url.as_str()),
        // Nothing answers there: a start that went on would fail on it, not the refusal.
        ("HERALD_NATS__URL", "nats://127.0.0.1:1"),
        ("HERALD_HTTP__BIND", "127.0.0.1:0"),
    ]);
    for command in ["config", "serve"] {
        let output = run_herald(&[command], &env).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command} accepted it: {stderr}");
        assert!(stderr.contains(refusal), "{command}: {stderr}");
        assert!(
            !db_file.exists(),
            "{command} opened the database first: {stderr}"
        );
    }
}

/// A provider setting its provider would refuse stops `herald config` and `serve` at once, named
/// by its key: `serve` used to find it only after the migrations and the NATS connection.
#[tokio::test]
async fn a_provider_setting_the_provider_refuses_stops_the_start_at_once() {
    let dir = tempfile::tempdir().expect("temporary folder");
    assert_refused_at_once(
        dir.path(),
        &[("HERALD_CHANNELS__WEBHOOK__SECRET", "whsec_abc")],
        "channels.webhook.secret is not valid base64 after \"whsec_\"",
    )
    .await;
}

/// A routing rule that could never route anything, or an `enabled = false` that would switch
/// nothing off, stops `herald config` and `serve` at once, naming the rule's place and what is
/// allowed: both used to start, and the events went unrouted (or marketing kept going out).
#[tokio::test]
async fn a_rule_that_could_never_work_stops_the_start_at_once() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let cases = [
        (
            r#"[{name = "shipped_sms", event = "orders.status_changed", when = {status = "Shipped"}, template = "order_shipped", category = "transactional"}]"#,
            "routing.rules[0] (\"shipped_sms\"): when.status = \"Shipped\": not a value of \
             status; allowed: \"paid\", \"shipped\", \"delivered\", \"cancelled\"",
        ),
        (
            r#"[{name = "marketing_campain", event = "marketing.campaign", template = "marketing", category = "marketing", enabled = false}]"#,
            "routing.rules[0] (\"marketing_campain\"): enabled = false switches off no built-in \
             rule; did you mean \"marketing_campaign\"?",
        ),
    ];
    for (rules, refusal) in cases {
        assert_refused_at_once(dir.path(), &[("HERALD_ROUTING__RULES", rules)], refusal).await;
    }
}

/// What a provider finds only when it is built (a key file it cannot read, an outbox folder it
/// cannot create, an SMTP host TLS cannot name, an HTTP client that cannot be built) stops
/// `herald config` and `serve` at once too: `herald config` used to accept them, and `serve` to
/// find them after the migrations.
#[tokio::test]
async fn what_a_provider_finds_when_it_is_built_stops_the_start_at_once() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let missing_key = dir.path().join("missing-key.json");
    let missing_key = missing_key.to_str().expect("a UTF-8 path");
    let file = dir.path().join("file");
    std::fs::write(&file, "not a folder").expect("a file");
    let file = file.to_str().expect("a UTF-8 path");
    let missing_certificates = dir.path().join("missing-ca.pem");
    let missing_certificates = missing_certificates.to_str().expect("a UTF-8 path");
    let no_certificates = dir.path().join("no-certificates");
    std::fs::create_dir(&no_certificates).expect("an empty folder");
    let no_certificates = no_certificates.to_str().expect("a UTF-8 path");
    let push = ("HERALD_CHANNELS__PUSH__PROJECT_ID", "shop-app");
    let cases: [(&[(&str, &str)], String); 5] = [
        (
            &[
                push,
                ("HERALD_CHANNELS__PUSH__SERVICE_ACCOUNT_FILE", missing_key),
            ],
            format!(
                "channels.push.service_account_file: cannot read service account key \
                 {missing_key}"
            ),
        ),
        (
            // No way of authenticating: an empty variable names no key file.
            &[push, ("GOOGLE_APPLICATION_CREDENTIALS", "")],
            "channels.push.service_account_file (or channels.push.metadata_server, or \
             channels.push.access_token, or a key file named by GOOGLE_APPLICATION_CREDENTIALS) \
             is required"
                .into(),
        ),
        (
            &[("HERALD_CHANNELS__EMAIL__OUTBOX_DIR", file)],
            format!("channels.email.outbox_dir {file:?} cannot be created"),
        ),
        (
            &[("HERALD_CHANNELS__EMAIL__SMTP_HOST", "mail.example.com:587")],
            "channels.email.smtp_host \"mail.example.com:587\" is not a host name or IP address"
                .into(),
        ),
        (
            // The certificates the HTTP clients trust come from this file and folder alone,
            // and there are none: reqwest refuses to build a client.
            &[
                ("HERALD_CHANNELS__TELEGRAM__BOT_TOKEN", "123:abc"),
                ("SSL_CERT_FILE", missing_certificates),
                ("SSL_CERT_DIR", no_certificates),
            ],
            "channels.telegram: cannot build the HTTP client: builder error: unexpected error: \
             No CA certificates were loaded from the system"
                .into(),
        ),
    ];
    for (env, refusal) in cases {
        assert_refused_at_once(dir.path(), env, &refusal).await;
    }
}

/// An SMTP host set to nothing (compose's `${SMTP_HOST:-}`) is no SMTP host: email goes to the
/// outbox, as with the variable absent. It used to stop every command as `smtp_host "" is not a
/// host name`.
#[tokio::test]
async fn an_empty_smtp_host_is_unset() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let outbox = dir.path().join("outbox");
    let outbox = outbox.to_str().expect("a UTF-8 path");
    for security in ["starttls", "tls", "none"] {
        let output = run_herald(
            &["config"],
            &[
                ("HERALD_CHANNELS__EMAIL__SMTP_HOST", ""),
                ("HERALD_CHANNELS__EMAIL__SECURITY", security),
                ("HERALD_CHANNELS__EMAIL__OUTBOX_DIR", outbox),
            ],
        )
        .await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{security}: refused: {stderr}");
    }
}

/// `database.max_connections = 0` stops every command at once, named: each used to wait for a
/// connection the pool could never open and fail after 10 s with "pool timed out".
#[tokio::test]
async fn a_pool_of_no_connections_stops_the_start_at_once() {
    let dir = tempfile::tempdir().expect("temporary folder");
    assert_refused_at_once(
        dir.path(),
        &[("HERALD_DATABASE__MAX_CONNECTIONS", "0")],
        "database.max_connections must be at least 1",
    )
    .await;
}

/// The local NATS port `scripts/run.sh` finds in `herald config`'s output with `nats.url`
/// set to `url` (its `nats_url_of` and `local_nats_port`), or none for a remote URL.
async fn run_sh_local_nats_port(url: &str) -> Option<String> {
    let output = run_herald(&["config"], &[("HERALD_NATS__URL", url)]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{url}: failed: {stderr}");
    let shown = String::from_utf8(output.stdout).expect("stdout is UTF-8");
    let common = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/common.sh");
    let found = tokio::process::Command::new("bash")
        .args(["-c", r#". "$1" && local_nats_port "$(nats_url_of "$2")""#])
        .args(["run.sh", common, &shown])
        .output()
        .await
        .expect("bash runs");
    let port = String::from_utf8(found.stdout).expect("stdout is UTF-8");
    found.status.success().then(|| port.trim().to_string())
}

/// `scripts/run.sh` starts a local nats-server on the port of a local `nats.url`, read from
/// `herald config`, also when the URL logs in: `herald config` shows its login as `***`, which
/// the script's pattern refused, so no server was started and Herald waited for one for ever.
#[tokio::test]
async fn run_sh_finds_the_local_nats_port_behind_a_login() {
    for (url, port) in [
        ("nats://127.0.0.1:4333", "4333"),
        ("nats://herald:s3cret@127.0.0.1:4334", "4334"),
        ("nats://t0ken@localhost:4335", "4335"),
    ] {
        assert_eq!(
            run_sh_local_nats_port(url).await.as_deref(),
            Some(port),
            "{url}"
        );
    }
    assert_eq!(
        run_sh_local_nats_port("nats://herald:s3cret@10.0.0.1:4222").await,
        None,
        "a remote NATS is not started here"
    );
}

/// A listen address in use stops the start before anything is provisioned or leased in NATS, so
/// that the failed process takes no partition from the running ones.
#[tokio::test]
async fn a_listen_address_in_use_stops_the_start_before_the_engine() {
    init_tracing();
    let nats = NatsServer::start().await.expect("nats-server");
    let db = TestDatabase::from_env().await.expect("test database");
    let smtp = SmtpSink::start().await.expect("SMTP sink");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let mut config = test_config(&nats, &db, &smtp);
    config.http.bind = taken.local_addr().expect("its address").to_string();
    herald_engine::app::process_init();
    let err = match herald_engine::Herald::start(config).await {
        Ok(_) => panic!("Herald started on an address in use"),
        Err(err) => format!("{err:#}"),
    };
    assert!(err.contains("cannot listen"), "{err}");
    let js = jetstream::new(nats.client().await.expect("NATS client"));
    assert!(
        js.get_stream(herald_nats::subjects::NOTIFY_STREAM)
            .await
            .is_err(),
        "no stream provisioned"
    );
    assert!(
        js.get_key_value(herald_nats::leases::LEASE_BUCKET)
            .await
            .is_err(),
        "no partition lease bucket opened"
    );
}

/// `nats.ack_wait_secs` and `nats.max_ack_pending` changed reach the consumers a previous start
/// created, which a start used to bind unchanged.
#[tokio::test]
async fn changed_consumer_settings_reach_existing_consumers() {
    init_tracing();
    let nats = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(nats.client().await.expect("NATS client"));
    let before = StreamSettings {
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 1_000,
        ..StreamSettings::default()
    };
    herald_nats::provision(&js, &before)
        .await
        .expect("provision");
    herald_nats::dispatch_consumer(&js, 0, &before)
        .await
        .expect("dispatch consumer");
    let after = StreamSettings {
        ack_wait: Duration::from_secs(60),
        max_ack_pending: 2_000,
        ..before
    };
    herald_nats::provision(&js, &after)
        .await
        .expect("provision");
    herald_nats::dispatch_consumer(&js, 0, &after)
        .await
        .expect("dispatch consumer");
    for (stream, consumer) in [
        (
            herald_nats::subjects::EVENTS_STREAM,
            herald_nats::subjects::ROUTER_CONSUMER.to_string(),
        ),
        (
            herald_nats::subjects::NOTIFY_STREAM,
            herald_nats::subjects::dispatch_consumer(0),
        ),
    ] {
        let info = js
            .get_stream(stream)
            .await
            .expect("stream")
            .consumer_info(&consumer)
            .await
            .expect("consumer info")
            .clone();
        assert_eq!(info.config.ack_wait, Duration::from_secs(60), "{consumer}");
        assert_eq!(info.config.max_ack_pending, 2_000, "{consumer}");
    }
}
