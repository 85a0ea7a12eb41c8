//! A private `nats-server -js` for a bench run, so the bench never touches a production stream.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

/// A nats-server child process with its store in a temporary folder.
pub struct BenchNats {
    child: Child,
    url: String,
    _store: tempfile::TempDir,
}

impl BenchNats {
    /// Starts `nats-server` (from `PATH` or `NATS_SERVER_BIN`) on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let store = tempfile::tempdir().context("temp dir for the NATS store")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!("cannot start {bin}; install nats-server or pass --nats-url")
            })?;
        let url = format!("nats://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not listen on {port} within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            url,
            _store: store,
        })
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

impl Drop for BenchNats {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
