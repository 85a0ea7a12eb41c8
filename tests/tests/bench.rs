//! `herald bench` run as the binary, on the suite's database: a small run sends every notification
//! once and writes a report that adds up.

use herald_tests::{E2E_TIMEOUT, TestDatabase, init_tracing, process::herald_bin};

const NOTIFICATIONS: u64 = 300;

#[tokio::test]
async fn a_small_bench_run_sends_everything_once_and_reports_its_cpu() {
    init_tracing();
    let db = TestDatabase::from_env().await.expect("test database");
    let dir = tempfile::tempdir().expect("temporary folder");
    let json = dir.path().join("bench.json");
    let mut command = tokio::process::Command::new(herald_bin().expect("the herald binary"));
    command
        .args(["bench", "-n", &NOTIFICATIONS.to_string(), "-m", "30"])
        .args(["--no-reference", "--database", db.url(), "--json"])
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
    let cpu = &report["cpu"];
    for (field, at_least) in [
        ("process_us", 1.0),
        ("nats_server_us", 0.0),
        ("machine_us", 1.0),
    ] {
        let micros = cpu[field].as_f64();
        assert!(
            micros.is_some_and(|us| us >= at_least),
            "cpu.{field} should be at least {at_least} µs per notification: {cpu}"
        );
    }
    let busy = cpu["machine_busy"].as_f64();
    assert!(
        busy.is_some_and(|b| b > 0.0 && b <= 1.0),
        "cpu.machine_busy: {cpu}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("CPU (µs/notif.)    this process "),
        "{stdout}"
    );
}
