//! `herald serve` as a separate OS process, configured through `HERALD_*` variables, so tests can
//! kill it with SIGKILL or stop it with SIGTERM like an operator or the kernel would.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::free_port;

/// Path of the `herald` binary built beside the test executable (`target/<profile>/herald`);
/// `HERALD_BIN` overrides it. `scripts/test.sh` builds it before the tests run.
pub fn herald_bin() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("HERALD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/herald
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test executable has no target folder")?;
    let bin = dir.join("herald");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --bin herald` first (scripts/test.sh does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A running `herald serve` child process.
pub struct HeraldProcess {
    child: Child,
    env: Vec<(String, String)>,
    port: u16,
    log: PathBuf,
}

impl HeraldProcess {
    /// Starts `herald serve` with these `HERALD_*` variables (HTTP port chosen here) and waits
    /// until it is ready.
    pub async fn start(env: Vec<(String, String)>, log: PathBuf) -> anyhow::Result<Self> {
        // The readiness client needs the process-wide rustls provider.
        herald_engine::app::process_init();
        let port = free_port()?;
        let child = spawn(&env, port, &log)?;
        let mut process = Self {
            child,
            env,
            port,
            log,
        };
        process.wait_ready().await;
        Ok(process)
    }

    /// The base URL of its API.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its `/proc/<pid>/status` (Linux), for what the kernel says about the process.
    pub fn proc_status(&self) -> anyhow::Result<String> {
        let pid = self.child.id().context("the process has exited")?;
        Ok(std::fs::read_to_string(format!("/proc/{pid}/status"))?)
    }

    /// SIGKILL: no chance to finish anything.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGSTOP: the process is frozen (as a CPU-starved instance or a suspended VM would be)
    /// until [`HeraldProcess::resume`].
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT: a frozen process runs again.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("the process has exited")?;
        kill(Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// SIGTERM and wait for the exit; returns how long the exit took.
    pub async fn terminate(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let started = std::time::Instant::now();
        self.sigterm()?;
        let status = self.wait_exit(limit).await?;
        if !status.success() {
            bail!("herald exited with {status}; log: {}", self.log_tail());
        }
        Ok(started.elapsed())
    }

    /// SIGTERM, without waiting for the exit (see [`HeraldProcess::wait_exit`]).
    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Waits at most `limit` for the process to exit; returns its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .with_context(|| {
                format!(
                    "herald did not exit within {limit:?}; log: {}",
                    self.log_tail()
                )
            })?
            .context("cannot wait for herald")
    }

    /// Starts the same configuration again (same port) after a kill or stop.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child = spawn(&self.env, self.port, &self.log)?;
        self.wait_ready().await;
        Ok(())
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits at most [`READY_TIMEOUT`] until `/health/ready` answers 2xx.
    ///
    /// # Panics
    ///
    /// At once when the process exits meanwhile, with its exit status and the end of its log; on
    /// the timeout, with the last answer (or connection error) and the end of its log.
    async fn wait_ready(&mut self) {
        let url = format!("{}/health/ready", self.base());
        let client = reqwest::Client::new();
        let started = std::time::Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => panic!(
                    "herald on port {} exited with {status} before it was ready; log:\n{}",
                    self.port,
                    self.log_tail()
                ),
                Err(err) => panic!("cannot check herald's process: {err}"),
            }
            let last = match tokio::time::timeout(READY_POLL_LIMIT, client.get(&url).send()).await {
                Ok(Ok(response)) if response.status().is_success() => return,
                Ok(Ok(response)) => format!("/health/ready answered {}", response.status()),
                Ok(Err(err)) => format!("/health/ready: {err}"),
                Err(_) => format!("/health/ready did not answer within {READY_POLL_LIMIT:?}"),
            };
            if started.elapsed() >= READY_TIMEOUT {
                panic!(
                    "timed out after {:.2?} waiting for herald on port {} to be ready; last seen: \
                     {last}; log:\n{}",
                    started.elapsed(),
                    self.port,
                    self.log_tail()
                );
            }
            tokio::time::sleep(READY_POLL_PAUSE).await;
        }
    }
}

/// How long a started `herald serve` may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one readiness request may take.
const READY_POLL_LIMIT: Duration = Duration::from_secs(2);
/// The pause between two readiness polls.
const READY_POLL_PAUSE: Duration = Duration::from_millis(50);

fn spawn(env: &[(String, String)], port: u16, log: &PathBuf) -> anyhow::Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let child = Command::new(herald_bin()?)
        .arg("serve")
        .envs(env.iter().cloned())
        .env("HERALD_HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("HERALD_LOG__FORMAT", "json")
        .env("HERALD_LOG__LEVEL", "info")
        // Herald logs, panics and start-up errors go to stderr. Both streams go to the log.
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start herald")?;
    Ok(child)
}
