//! Hostile input: schemathesis (from PyPI) generates requests from `/api/openapi.json` — valid
//! ones and invalid ones — against a running Herald with an admin key. Every answer must be a
//! non-5xx response that matches the spec (`not_a_server_error`, `response_schema_conformance`).
//!
//! `scripts/test.sh` installs schemathesis when missing; `SCHEMATHESIS_BIN` overrides the command.

use std::time::Duration;

use herald_tests::{NatsServer, SmtpSink, TestDatabase, TestHerald, test_config};
use tokio::process::Command;

/// Test cases per operation and phase.
const MAX_EXAMPLES: &str = "25";
/// schemathesis's own time budget, seconds.
const MAX_TIME: &str = "60";
/// Hard limit on the whole subprocess.
const HARD_LIMIT: Duration = Duration::from_secs(150);

#[tokio::test]
async fn the_api_survives_schemathesis() {
    let bin = std::env::var("SCHEMATHESIS_BIN").unwrap_or_else(|_| "schemathesis".into());
    let nats = NatsServer::start().await.expect("nats-server starts");
    let smtp = SmtpSink::start().await.expect("smtp sink starts");
    let db = TestDatabase::from_env().await.expect("database");
    let herald = TestHerald::start(test_config(&nats, &db, &smtp))
        .await
        .expect("herald starts");
    // Real identifiers for the operations that otherwise mostly meet 404s: a sent notification
    // and the configured provider, so generated receipts reach the transition logic.
    let id = herald
        .send_accepted(&serde_json::json!({
            "recipient": { "email": "fuzz@example.com" },
            "category": "transactional",
            "content": { "text": "seed" }
        }))
        .await;
    herald.wait_status(&id, "sent").await;
    let report = tempfile::tempdir().expect("report dir");
    std::fs::write(
        report.path().join("schemathesis.toml"),
        format!(
            "[[operations]]\ninclude-path = \"/api/v1/notifications/{{id}}\"\nparameters = {{ id = \"{id}\" }}\n\n\
             [[operations]]\ninclude-path = \"/api/v1/providers/{{provider}}/callbacks\"\nparameters = {{ provider = \"smtp\" }}\n"
        ),
    )
    .expect("schemathesis config");
    let spec = format!("{}/api/openapi.json", herald.base());
    let auth = format!("Authorization: Bearer {}", herald.admin_key());
    let run = Command::new(&bin)
        .args([
            "run",
            &spec,
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            MAX_EXAMPLES,
            "--max-time",
            MAX_TIME,
            "--seed",
            "20261122",
            // One worker: with two threads, hypothesis's `ast.parse` of its own source hit
            // CPython 3.11's "AST constructor recursion depth mismatch" (python/cpython#106905)
            // and schemathesis reported its crash as an error of the run.
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--suppress-health-check",
            "all",
            "--header",
            &auth,
        ])
        .current_dir(report.path())
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(HARD_LIMIT, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(err)) => panic!(
            "cannot run {bin:?} ({err}); install it with `pip install schemathesis` \
             (scripts/test.sh does) or set SCHEMATHESIS_BIN"
        ),
        Err(_) => panic!("schemathesis ran longer than {HARD_LIMIT:?}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found failures ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // It really exercised the API, not just read the spec.
    assert!(
        stdout.contains("/api/v1/notifications"),
        "schemathesis tested the notification operations:\n{stdout}"
    );
    herald.shutdown().await.expect("shutdown");
}
