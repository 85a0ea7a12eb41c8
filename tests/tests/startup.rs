//! Starting up: what the command line prints.

use herald_tests::{E2E_TIMEOUT, process::herald_bin};

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
