//! `herald bench` run as the binary, on the suite's database: a small run sends every notification
//! once, measures the raw JetStream reference, and writes a report that adds up.

use herald_tests::{E2E_TIMEOUT, TestDatabase, init_tracing, process::herald_bin};

const NOTIFICATIONS: u64 = 300;

#[tokio::test]
async fn a_small_bench_run_sends_everything_once_and_reports_its_cpu_and_the_reference() {
    init_tracing();
    let db = TestDatabase::from_env().await.expect("test database");
    let dir = tempfile::tempdir().expect("temporary folder");
    let json = dir.path().join("bench.json");
    let mut command = tokio::process::Command::new(herald_bin().expect("the herald binary"));
    command
        .args(["bench", "-n", &NOTIFICATIONS.to_string(), "-m", "30"])
        .args(["--database", db.url(), "--json"])
        .arg(&json)
        .kill_on_drop(true);
    let output = tokio::time::timeout(E2E_TIMEOUT, command.output())
        .await
        .expect("herald bench finished within the timeout")
        .expect("herald bench started");
    assert!(
        output.status.success(),
        "herald bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON report is written"))
            .expect("the report is JSON");
    assert_eq!(report["notifications"], NOTIFICATIONS, "{report:#}");
    assert_eq!(report["smtp_accepted"], NOTIFICATIONS, "{report:#}");
    assert_eq!(report["database"], db.kind().to_string(), "{report:#}");
    assert!(
        report["jetstream_reference_per_sec"]
            .as_f64()
            .is_some_and(|rate| rate > 0.0),
        "{report:#}"
    );
    // Herald's part runs for a second or more; the reference's 300 messages may take less than
    // one clock tick (10 ms) of a process's CPU.
    assert_plausible_cpu(&report["cpu"], 1.0);
    assert_plausible_cpu(&report["jetstream_reference_cpu"], 0.0);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("CPU (µs/notif.)    this process "),
        "{stdout}"
    );
    assert!(
        stdout.contains("  CPU (µs/msg)     this process "),
        "{stdout}"
    );
}

/// A report's CPU per notification (or per message): every part read, this process's and the
/// machine's at least `min_us`, the machine's busy share a share.
fn assert_plausible_cpu(cpu: &serde_json::Value, min_us: f64) {
    for (field, at_least) in [
        ("process_us", min_us),
        ("nats_server_us", 0.0),
        ("machine_us", min_us),
    ] {
        assert!(
            cpu[field].as_f64().is_some_and(|us| us >= at_least),
            "{field} should be at least {at_least} µs: {cpu}"
        );
    }
    let busy = cpu["machine_busy"].as_f64();
    assert!(
        busy.is_some_and(|b| (0.0..=1.0).contains(&b)),
        "machine_busy: {cpu}"
    );
}

/// A `--database` that already holds tables (a mistaken production URL) is refused before anything
/// starts: it is neither migrated nor worked on by the bench's engine (scheduler, retention).
#[tokio::test]
async fn the_bench_refuses_a_database_that_is_not_empty_and_leaves_it_untouched() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};

    init_tracing();
    let dir = tempfile::tempdir().expect("temporary folder");
    let url = format!("sqlite://{}", dir.path().join("production.db").display());
    let db = sea_orm::Database::connect(format!("{url}?mode=rwc"))
        .await
        .expect("a new SQLite file");
    db.execute_unprepared("CREATE TABLE precious (x INTEGER)")
        .await
        .expect("a table of its own");
    db.close().await.expect("closed");

    let mut command = tokio::process::Command::new(herald_bin().expect("the herald binary"));
    command
        .args(["bench", "-n", "10", "--no-reference", "--database", &url])
        .kill_on_drop(true);
    let output = tokio::time::timeout(E2E_TIMEOUT, command.output())
        .await
        .expect("herald bench finished within the timeout")
        .expect("herald bench started");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the bench ran on it: {stderr}");
    assert!(stderr.contains("empty database"), "{stderr}");

    let db = sea_orm::Database::connect(&url).await.expect("reopened");
    let tables: Vec<String> = db
        .query_all_raw(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
        ))
        .await
        .expect("tables listed")
        .iter()
        .map(|row| row.try_get_by_index(0).expect("a name"))
        .collect();
    assert_eq!(tables, ["precious"], "nothing migrated into it");
}
