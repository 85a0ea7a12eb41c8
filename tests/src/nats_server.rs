//! A real `nats-server` process with JetStream, one per test.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::wait::free_port;

/// Longest [`NatsServer::freeze`] waits for every thread of the process to stop.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether every thread of process `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // `pid (comm) state …`: the state follows the last `)`.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
}

/// Environment variable naming the `nats-server` binary to run.
pub const NATS_SERVER_BIN_ENV: &str = "NATS_SERVER_BIN";
/// Where Debian's `nats-server` package installs the binary.
const DEBIAN_BIN: &str = "/usr/sbin/nats-server";
/// How long a start may take until JetStream answers.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop may take before the process is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How many fresh ports [`NatsServer::start`] tries when the chosen one was taken.
const PORT_ATTEMPTS: usize = 5;
/// How many lines of the server log an error message carries.
const LOG_TAIL_LINES: usize = 30;

/// A `nats-server -js` child process listening on a loopback port, with its
/// JetStream file store and log in a temporary directory that lives as long as this value.
///
/// The process is killed when the value is dropped. [`NatsServer::kill`] and
/// [`NatsServer::restart`] simulate a crash and recovery: the port and the store
/// directory stay the same, so file-backed streams survive.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// A configuration file (`-c`) that may ask clients to authenticate or speak TLS.
    config: Option<PathBuf>,
}

/// Why one attempt to bring the server up failed.
enum StartError {
    /// The port was taken by someone else between choosing and binding it.
    PortInUse(anyhow::Error),
    /// Anything else: not worth retrying.
    Other(anyhow::Error),
}

impl NatsServer {
    /// Starts a server on a free loopback port and waits (at most 10 s) until it
    /// accepts connections and JetStream answers an account query.
    ///
    /// The binary is `$NATS_SERVER_BIN`, else `/usr/sbin/nats-server` when it exists,
    /// else `nats-server` from `PATH`.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_in(Self::scratch_dir()?, None).await
    }

    /// Starts a server that also reads `config` (nats-server's configuration format: say, an
    /// `authorization` or `tls` block; the command line's address, port and store win). `files`
    /// are written beside it first (name, contents), and `{dir}` in `config` names their
    /// directory. Such a server may refuse plain clients, so it counts as ready once its log says
    /// so.
    pub async fn start_with_config(config: &str, files: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = Self::scratch_dir()?;
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents)
                .with_context(|| format!("writing {name} for nats-server"))?;
        }
        let path = dir.path().join("nats.conf");
        let config = config.replace("{dir}", &dir.path().display().to_string());
        std::fs::write(&path, config).context("writing the nats-server configuration")?;
        Self::start_in(dir, Some(path)).await
    }

    /// A file in the server's directory (as written by [`NatsServer::start_with_config`]).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn scratch_dir() -> anyhow::Result<TempDir> {
        tempfile::Builder::new()
            .prefix("herald-nats-")
            .tempdir()
            .context("creating a temporary directory for nats-server")
    }

    async fn start_in(dir: TempDir, config: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut server = Self {
            bin: server_binary(),
            port: 0,
            dir,
            child: None,
            config,
        };
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port()?;
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(StartError::PortInUse(error)) => last_error = Some(error),
                Err(StartError::Other(error)) => return Err(error),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "nats-server found no free port in {PORT_ATTEMPTS} attempts"
            )))
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The loopback port the server listens on; it stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (`-sd`), kept across restarts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The file that collects the server's stdout and stderr across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The last `lines` lines of the server log (empty when there is none yet).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }

    /// Connects a plain client to the server.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .with_context(|| format!("connecting to nats-server at {}", self.url()))
    }

    /// How many messages stream `stream` holds on subjects matching `subject` (a filter, wildcards
    /// allowed), from the stream's own state: unlike reading the messages with a consumer, a slow
    /// stream cannot make this count short, so negative checks ("no dead letter") use it.
    ///
    /// # Panics
    ///
    /// When the stream does not exist or the server does not answer.
    pub async fn subject_messages(&self, stream: &str, subject: &str) -> usize {
        use futures::TryStreamExt as _;
        let js = async_nats::jetstream::new(self.client().await.expect("a NATS client"));
        let stream = js
            .get_stream(stream)
            .await
            .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
        stream
            .info_with_subjects(subject)
            .await
            .unwrap_or_else(|e| panic!("messages on {subject}: {e}"))
            .try_fold(0, |total, (_, count)| async move { Ok(total + count) })
            .await
            .unwrap_or_else(|e| panic!("messages on {subject}: {e}"))
    }

    /// Waits at most `within` until the work-queue stream `NOTIFY` holds no message: every send
    /// command published so far was acknowledged, so every mail it caused, duplicates included,
    /// has reached its provider. Tests count duplicates after this, not before: a command whose
    /// ack was lost is redelivered only after `nats.ack_wait_secs`.
    ///
    /// # Panics
    ///
    /// When `within` elapses first, with the number of messages last seen.
    pub async fn commands_drained(&self, within: Duration) {
        let js = async_nats::jetstream::new(self.client().await.expect("a NATS client"));
        crate::eventually_showing(
            "every send command to be acknowledged (NOTIFY empty)",
            within,
            || {
                let js = &js;
                async move {
                    let mut stream = js
                        .get_stream(herald_nats::subjects::NOTIFY_STREAM)
                        .await
                        .map_err(|e| format!("stream NOTIFY: {e}"))?;
                    let messages = stream
                        .info()
                        .await
                        .map_err(|e| format!("stream NOTIFY info: {e}"))?
                        .state
                        .messages;
                    (messages == 0)
                        .then_some(())
                        .ok_or_else(|| format!("{messages} messages in NOTIFY"))
                }
            },
        )
        .await;
    }

    /// Waits at most `within` until every consumer of `NOTIFY` has delivered every command (some
    /// may still await their acks). Unlike [`NatsServer::commands_drained`], this holds after the
    /// server was killed: a killed server may keep messages in the stream that its consumers had
    /// acknowledged (they are never delivered again). Nor does it wait for every ack: after the
    /// server's SIGKILL one delivery was seen awaiting its ack for a whole 30 s wait with an
    /// `ack_wait` of 3 s (once in CI, not reproduced; whether the server kept a delivery it could
    /// not redeliver or the engine never settled one is not known).
    ///
    /// # Panics
    ///
    /// When `within` elapses first, with what each consumer still had to deliver.
    pub async fn commands_delivered(&self, within: Duration) {
        let js = async_nats::jetstream::new(self.client().await.expect("a NATS client"));
        let what = "every consumer of NOTIFY to deliver its commands";
        crate::eventually_showing(what, within, || {
            let js = &js;
            async move {
                let stream = js
                    .get_stream(herald_nats::subjects::NOTIFY_STREAM)
                    .await
                    .map_err(|e| format!("stream NOTIFY: {e}"))?;
                let mut names = stream.consumer_names();
                let mut unsettled = Vec::new();
                let mut consumers = 0;
                while let Some(name) = futures::StreamExt::next(&mut names).await {
                    let name = name.map_err(|e| format!("consumers of NOTIFY: {e}"))?;
                    let info = stream
                        .consumer_info(&name)
                        .await
                        .map_err(|e| format!("consumer {name}: {e}"))?;
                    consumers += 1;
                    if info.num_pending > 0 {
                        unsettled.push(format!(
                            "{name}: {} to deliver, {} awaiting ack",
                            info.num_pending, info.num_ack_pending
                        ));
                    }
                }
                if consumers == 0 {
                    return Err("no consumer on NOTIFY".into());
                }
                unsettled
                    .is_empty()
                    .then_some(())
                    .ok_or_else(|| unsettled.join("; "))
            }
        })
        .await;
    }

    /// Whether the server process is running (it was started and has not exited).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Freezes the process (SIGSTOP): it holds its connections open and answers nothing, as a
    /// node that hangs or is cut off would, until [`NatsServer::resume`]. Returns once every
    /// thread of it is stopped (`kill` only queues the stop), at most 5 s later.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)?;
        let pid = self.pid()?;
        let deadline = std::time::Instant::now() + FREEZE_TIMEOUT;
        while !all_threads_stopped(pid) {
            if std::time::Instant::now() >= deadline {
                bail!("nats-server {pid} not stopped within {FREEZE_TIMEOUT:?} of SIGSTOP");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid()?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("sending {signal} to nats-server"))
    }

    fn pid(&self) -> anyhow::Result<i32> {
        let pid = self
            .child
            .as_ref()
            .and_then(Child::id)
            .context("nats-server is not running")?;
        i32::try_from(pid).context("nats-server pid does not fit in i32")
    }

    /// Kills the process with SIGKILL, as a crash would, and waits until it has exited.
    /// Does nothing when the server is not running.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("killing nats-server")?;
        }
        Ok(())
    }

    /// Stops the process gracefully (SIGINT: nats-server flushes and exits) and waits
    /// until it has exited; kills it if it is still running after 10 s.
    /// Does nothing when the server is not running.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            let pid = i32::try_from(pid).context("nats-server pid does not fit in i32")?;
            // ESRCH means it already exited; wait() below reaps it either way.
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
            Ok(status) => {
                status.context("waiting for nats-server to exit")?;
                Ok(())
            }
            Err(_) => {
                child.kill().await.context("killing nats-server")?;
                bail!(
                    "nats-server did not stop within {STOP_TIMEOUT:?} of SIGINT and was killed; log tail:\n{}",
                    self.log_tail(LOG_TAIL_LINES)
                )
            }
        }
    }

    /// Starts the server again on the same port with the same store directory, after
    /// stopping it gracefully if it is still running, and waits until JetStream answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        let mut last_error = None;
        // The old socket is closed, but a client elsewhere may grab the port in the
        // short window; a few attempts make a transient clash visible in the error.
        for _ in 0..3 {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                Err(StartError::PortInUse(error)) => last_error = Some(error),
                Err(StartError::Other(error)) => return Err(error),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!("restarting nats-server on port {}", self.port)))
    }

    /// Spawns the process on `self.port` and waits until JetStream answers.
    async fn spawn_and_wait(&mut self) -> Result<(), StartError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("opening {}", self.log_path().display()))
            .map_err(StartError::Other)?;
        let log_start = log
            .metadata()
            .map(|metadata| metadata.len())
            .unwrap_or_default();
        let stderr = log
            .try_clone()
            .context("duplicating the log file handle")
            .map_err(StartError::Other)?;
        let mut command = Command::new(&self.bin);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.store_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "spawning {} (install Debian's nats-server package or set {NATS_SERVER_BIN_ENV})",
                    self.bin.display()
                )
            })
            .map_err(StartError::Other)?;
        self.child = Some(child);
        match self.wait_ready(log_start).await {
            Ok(()) => Ok(()),
            Err(exited) => {
                // Never leave a half-started process behind.
                if let Some(mut child) = self.child.take() {
                    let _ = child.kill().await;
                }
                let new_log = log_since(&self.log_path(), log_start);
                let error = anyhow!(
                    "nats-server on port {} did not become ready: {exited}; log tail:\n{}",
                    self.port,
                    self.log_tail(LOG_TAIL_LINES)
                );
                if new_log.contains("address already in use") {
                    Err(StartError::PortInUse(error))
                } else {
                    Err(StartError::Other(error))
                }
            }
        }
    }

    /// Polls until the log written since `log_start` says the server is ready and (but for a
    /// server with a configuration file, which may refuse plain clients) a client can connect and
    /// query the JetStream account, the process exits, or [`READY_TIMEOUT`] passes. The error is a
    /// short reason. The log comes first: a port taken between [`free_port`] and this process's
    /// bind is another test's server, which would answer for a process about to exit with
    /// "address already in use".
    async fn wait_ready(&mut self, log_start: u64) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut backoff = Duration::from_millis(10);
        let mut last_failure = String::from("not tried");
        loop {
            if let Some(status) = self.exit_status() {
                return Err(format!("the process exited with {status}"));
            }
            if !log_since(&self.log_path(), log_start).contains("Server is ready") {
                last_failure = "the log does not say \"Server is ready\" yet".into();
            } else if self.config.is_some() {
                return Ok(());
            } else {
                match tokio::time::timeout_at(deadline, jetstream_answers(&self.url())).await {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(error)) => last_failure = format!("{error:#}"),
                    Err(_) => {}
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no JetStream answer within {READY_TIMEOUT:?} (last failure: {last_failure})"
                ));
            }
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// The exit status when the process has exited.
    fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }
}

/// Three `nats-server -js` processes clustered on loopback ports: streams and consumers created
/// with three replicas have a leader that can change (a stepdown, a lost node) while clients run.
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Nodes in the cluster.
    pub const NODES: usize = 3;

    /// Starts the three nodes and waits (at most 30 s) until JetStream answers on each, which
    /// it does once the nodes have elected a meta leader.
    pub async fn start() -> anyhow::Result<Self> {
        let routes: Vec<u16> = (0..Self::NODES)
            .map(|_| free_port())
            .collect::<anyhow::Result<_>>()?;
        let route_urls = routes
            .iter()
            .map(|port| format!("nats-route://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut servers = Vec::new();
        for (node, port) in routes.iter().enumerate() {
            let config = format!(
                "server_name: n{node}\n\
                 cluster {{\n  name: herald\n  listen: 127.0.0.1:{port}\n  routes: [{route_urls}]\n}}\n"
            );
            servers.push(
                NatsServer::start_with_config(&config, &[])
                    .await
                    .with_context(|| format!("cluster node n{node}"))?,
            );
        }
        let cluster = Self { servers };
        let deadline = Instant::now() + Duration::from_secs(30);
        for server in &cluster.servers {
            let mut backoff = Duration::from_millis(50);
            while let Err(error) = jetstream_answers(&server.url()).await {
                if Instant::now() >= deadline {
                    bail!(
                        "JetStream of the cluster node on port {} did not answer within 30 s: \
                         {error:#}; log tail:\n{}",
                        server.port(),
                        server.log_tail(LOG_TAIL_LINES)
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
        Ok(cluster)
    }

    /// Connects a plain client to the first node.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        self.node(0).client().await
    }

    /// The node `n` (0, 1 or 2; panics beyond).
    pub fn node(&self, n: usize) -> &NatsServer {
        &self.servers[n]
    }

    /// The node named `name` (`n0`, `n1`, `n2`: the names JetStream reports leaders by).
    pub fn node_named(&self, name: &str) -> Option<&NatsServer> {
        let n: usize = name.strip_prefix('n')?.parse().ok()?;
        self.servers.get(n)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // kill_on_drop would do it too; this makes the intent explicit.
            let _ = child.start_kill();
        }
    }
}

/// Connects once and asks JetStream for the account info.
///
/// The raw `$JS.API.INFO` request is used rather than `query_account()`: async-nats
/// 0.51 cannot deserialise the account info of nats-server 2.9.
async fn jetstream_answers(url: &str) -> anyhow::Result<()> {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(url)
        .await
        .context("connect")?;
    let reply = client
        .request("$JS.API.INFO", "".into())
        .await
        .context("JetStream account info request")?;
    let info: serde_json::Value =
        serde_json::from_slice(&reply.payload).context("JetStream account info reply")?;
    if let Some(error) = info.get("error") {
        bail!("JetStream answered with an error: {error}");
    }
    Ok(())
}

/// `$NATS_SERVER_BIN`, else Debian's path when it exists, else `nats-server` from `PATH`.
fn server_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os(NATS_SERVER_BIN_ENV).filter(|bin| !bin.is_empty()) {
        return PathBuf::from(bin);
    }
    if Path::new(DEBIAN_BIN).exists() {
        return PathBuf::from(DEBIAN_BIN);
    }
    PathBuf::from("nats-server")
}

/// The last `lines` lines of the file at `path`, or a note when it cannot be read.
fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

/// The log written after byte offset `start`, i.e. by the latest process.
fn log_since(path: &Path, start: u64) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut text = String::new();
    if let Ok(mut file) = File::open(path)
        && file.seek(SeekFrom::Start(start)).is_ok()
    {
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_ok() {
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}
