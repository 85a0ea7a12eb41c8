//! Connecting to NATS: the servers, how Herald authenticates, and TLS.
//!
//! A secured NATS deployment asks for one of: a user and password, a token, an NKey (the server
//! knows the public key, the client signs the server's nonce with the seed), or a credentials file
//! (a user JWT and its NKey seed, as `nsc` and Synadia Cloud hand out). TLS can be required, with
//! a private certificate authority and a client certificate for mutual TLS.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::{ConnectOptions, Event, ServerAddr, connection::State};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{MAX_COMMAND_BYTES, NatsError};

/// How Herald authenticates to NATS (`[nats.auth]`); at most one way. Without any, the user and
/// password (or token) of the first server URL that carries them are used
/// (`nats://user:password@host:4222`, `nats://token@host:4222`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct NatsAuth {
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`); `herald config` omits it.
    #[serde(skip_serializing)]
    pub password: Option<String>,
    /// Authentication token; `herald config` omits it.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// A file holding an NKey seed (`SU…`), whose public key the server's configuration names.
    pub nkey_seed_file: Option<PathBuf>,
    /// A credentials file (`.creds`: a user JWT and its NKey seed), for servers in operator mode.
    pub credentials_file: Option<PathBuf>,
}

/// TLS to NATS (`[nats.tls]`). A `tls://` server URL requires TLS too; a server that requires it
/// is met with TLS whatever these say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct NatsTls {
    /// Refuse servers that do not offer TLS.
    pub required: bool,
    /// PEM file of the certificate authorities to trust, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// Where and how to connect.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// Server URL(s) of one cluster, comma-separated.
    pub urls: &'a str,
    /// The client name the server shows in its connection list.
    pub name: &'a str,
    /// Authentication.
    pub auth: &'a NatsAuth,
    /// TLS.
    pub tls: &'a NatsTls,
}

impl<'a> Connection<'a> {
    /// A connection to `urls` with neither authentication nor TLS settings (the URL's own
    /// credentials still apply).
    pub fn plain(urls: &'a str, name: &'a str) -> Self {
        static NO_AUTH: NatsAuth = NatsAuth {
            user: None,
            password: None,
            token: None,
            nkey_seed_file: None,
            credentials_file: None,
        };
        static NO_TLS: NatsTls = NatsTls {
            required: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
        };
        Self {
            urls,
            name,
            auth: &NO_AUTH,
            tls: &NO_TLS,
        }
    }
}

/// Connects with a client name and unlimited reconnects, so the engine rides out a restart of the
/// server instead of failing. Settings that cannot work (two ways of authenticating, a file that
/// cannot be read, a seed that is not one) are refused here, at once, rather than retried, and so
/// is a connection whose login or TLS handshake fails (a certificate either side does not
/// accept): retrying would not change the answer. A server that cannot be reached yet is tried
/// again until it answers, which this waits for (logging every [`STILL_WAITING`]; a server that
/// then answers with a refusal fails it as above): the caller's first requests would otherwise
/// time out. Connection trouble afterwards (a login refused later included) is logged as it
/// happens.
pub async fn connect(connection: Connection<'_>) -> Result<async_nats::Client, NatsError> {
    connect_waiting(connection, None).await
}

/// [`connect`], waiting at most `limit` for a server that cannot be reached (for a command that
/// should fail rather than wait, such as `herald bench`).
pub async fn connect_within(
    connection: Connection<'_>,
    limit: Duration,
) -> Result<async_nats::Client, NatsError> {
    connect_waiting(connection, Some(limit)).await
}

async fn connect_waiting(
    connection: Connection<'_>,
    limit: Option<Duration>,
) -> Result<async_nats::Client, NatsError> {
    let servers = server_list(connection.urls)?;
    let connected = Arc::new(Notify::new());
    match options(connection, Some(connected.clone()))
        .await?
        .connect(servers.clone())
        .await
    {
        Ok(client) => return Ok(client),
        Err(e) => match refusal(&e) {
            Some(refused) => return Err(refused),
            None => {
                tracing::warn!(error = %e, "cannot reach NATS yet; trying again until it answers")
            }
        },
    }
    let client = options(connection, Some(connected.clone()))
        .await?
        .retry_on_initial_connect()
        .connect(servers.clone())
        .await
        .map_err(|e| NatsError::Connect(e.to_string()))?;
    let waiting = Waiting {
        connection,
        servers: &servers,
        started: Instant::now(),
        limit,
    };
    waiting.until_connected(&client, &connected).await?;
    Ok(client)
}

/// What to warn of at start when the server takes messages smaller than Herald's largest send
/// command, [`MAX_COMMAND_BYTES`] (`max_payload` from the server's `INFO`; operators lower it below
/// nats-server's default of 1 MB): a command between the two sizes cannot be published (an API
/// send, scheduled or bulk too, is refused; one accepted before the limit was lowered fails; the
/// Router dead-letters the event that renders one). `None` when every command fits.
pub fn max_payload_warning(max_payload: usize) -> Option<String> {
    (max_payload < MAX_COMMAND_BYTES).then(|| {
        format!(
            "the NATS server's max_payload is {max_payload} bytes, below Herald's limit for a \
             send command ({MAX_COMMAND_BYTES} bytes): a notification whose command is larger \
             than max_payload cannot be published (an API send, scheduled or bulk too, is \
             refused with 413; one accepted before max_payload was lowered fails; the Router \
             dead-letters its event); raise max_payload to at least {MAX_COMMAND_BYTES}"
        )
    })
}

/// How often [`connect`] logs that it still waits for a server that cannot be reached, and tries
/// a connection of its own to learn whether one that answers refuses Herald.
pub const STILL_WAITING: Duration = Duration::from_secs(10);

/// How often the wait looks at the client's state besides being told of a connection (the
/// client tells before its state says so).
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// A wait for the first connection of a client that tries again in the background.
struct Waiting<'a> {
    connection: Connection<'a>,
    servers: &'a [ServerAddr],
    started: Instant,
    limit: Option<Duration>,
}

impl Waiting<'_> {
    /// Returns once `client` has connected (`connected` is notified on each connection); fails
    /// when a server answers with a refusal, or after the limit.
    async fn until_connected(
        &self,
        client: &async_nats::Client,
        connected: &Notify,
    ) -> Result<(), NatsError> {
        let mut next_report = self.started + STILL_WAITING;
        while client.connection_state() != State::Connected {
            let _ = tokio::time::timeout(LOOK_EVERY, connected.notified()).await;
            let waited = self.started.elapsed();
            if let Some(limit) = self.limit.filter(|limit| waited >= *limit) {
                return Err(NatsError::Connect(format!(
                    "no NATS server answered within {} s",
                    limit.as_secs()
                )));
            }
            if Instant::now() < next_report {
                continue;
            }
            next_report += STILL_WAITING;
            self.refused().await?;
            tracing::warn!(
                waited_secs = waited.as_secs(),
                "still cannot reach NATS; waiting for it"
            );
        }
        tracing::info!(
            waited_ms = self.started.elapsed().as_millis() as u64,
            "NATS answered"
        );
        Ok(())
    }

    /// Tries a connection of its own: the retrying client only logs a refusal, and would try
    /// again forever.
    async fn refused(&self) -> Result<(), NatsError> {
        let probe = options(self.connection, None)
            .await?
            .connect(self.servers.to_vec())
            .await;
        match probe {
            Err(e) => refusal(&e).map_or(Ok(()), Err),
            Ok(_) => Ok(()),
        }
    }
}

/// The client's options for `connection`: name, reconnects, authentication, TLS and, with
/// `connected` (notified each time the client connects), the event log; a probe's go without.
async fn options(
    connection: Connection<'_>,
    connected: Option<Arc<Notify>>,
) -> Result<ConnectOptions, NatsError> {
    let mut options = ConnectOptions::new()
        .name(connection.name)
        .max_reconnects(None);
    if let Some(connected) = connected {
        options = options.event_callback(move |event| {
            let connected = connected.clone();
            async move {
                if event == Event::Connected {
                    connected.notify_one();
                }
                log_event(&event)
            }
        });
    }
    let options = authenticate(options, connection.auth, connection.urls).await?;
    secure(options, connection.tls)
}

/// The error to fail with when the server answered and refused (a login it rejects, a TLS
/// handshake that fails, with the certificate problem: "invalid peer certificate:
/// UnknownIssuer"); `None` for a server that could not be reached, which is worth retrying.
fn refusal(error: &async_nats::ConnectError) -> Option<NatsError> {
    use async_nats::ConnectErrorKind::*;
    let reason = match (error.kind(), tls_failure(error)) {
        // The server's own text only repeats it ("nats: authorization violation").
        (AuthorizationViolation, _) => {
            format!("the server refused Herald's login: {}", error.kind())
        }
        (Authentication, _) => format!("the server refused Herald's login: {error}"),
        (Io, Some(tls)) => format!("the TLS handshake with the server failed: {tls}"),
        (Tls, _) => format!("the TLS handshake with the server failed: {error}"),
        _ => return None,
    };
    Some(NatsError::Connect(reason))
}

/// The TLS error behind an I/O error of the client library: a certificate either side does not
/// accept fails the handshake, which async-nats reports as I/O (a reset or a refused connection,
/// also I/O, carries no TLS error).
fn tls_failure(error: &async_nats::ConnectError) -> Option<&async_nats::rustls::Error> {
    let io = std::error::Error::source(error)?.downcast_ref::<std::io::Error>()?;
    io.get_ref()?.downcast_ref::<async_nats::rustls::Error>()
}

/// `"nats://a:4222, nats://b:4222"` → the two servers, as handed to the client library: without
/// the user information (`user:password@`, `token@`) a URL may carry, which the library would
/// print in its debug log at every connection attempt ([`authenticate`] reads the credentials
/// from the URLs themselves). An entry that is not a NATS URL is refused.
fn server_list(urls: &str) -> Result<Vec<ServerAddr>, NatsError> {
    parse_urls(urls)?
        .into_iter()
        .map(without_userinfo)
        .collect()
}

/// `server` without its user and password.
fn without_userinfo(server: ServerAddr) -> Result<ServerAddr, NatsError> {
    let mut url = server.into_inner();
    // Only URLs that cannot be a base (`mailto:`) refuse these; a NATS URL always has a host.
    let stripped = url.set_username("").is_ok() && url.set_password(None).is_ok();
    if !stripped {
        return Err(NatsError::Config(
            "nats.url: an entry has no host to connect to".into(),
        ));
    }
    ServerAddr::from_url(url)
        .map_err(|e| NatsError::Config(format!("nats.url: an entry is not a NATS URL: {e}")))
}

/// The entries of `nats.url`, each with the credentials it carries.
fn parse_urls(urls: &str) -> Result<Vec<ServerAddr>, NatsError> {
    // The error names the entry, not its text: a URL may carry a password.
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .enumerate()
        .map(|(n, url)| {
            url.parse::<ServerAddr>().map_err(|e| {
                NatsError::Config(format!("nats.url: entry {} is not a NATS URL: {e}", n + 1))
            })
        })
        .collect()
}

/// Applies the one configured way of authenticating, or the credentials of the first of `urls`
/// that carries them.
async fn authenticate(
    options: ConnectOptions,
    auth: &NatsAuth,
    urls: &str,
) -> Result<ConnectOptions, NatsError> {
    let configured: Vec<&str> = [
        (auth.user.is_some() || auth.password.is_some()).then_some("user/password"),
        auth.token.is_some().then_some("token"),
        auth.nkey_seed_file.is_some().then_some("nkey_seed_file"),
        auth.credentials_file
            .is_some()
            .then_some("credentials_file"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if configured.len() > 1 {
        return Err(NatsError::Config(format!(
            "nats.auth: {} are set; set one of them",
            configured.join(" and ")
        )));
    }
    match auth {
        NatsAuth {
            user: Some(user),
            password: Some(password),
            ..
        } => Ok(options.user_and_password(user.clone(), password.clone())),
        NatsAuth { user: Some(_), .. }
        | NatsAuth {
            password: Some(_), ..
        } => Err(NatsError::Config(
            "nats.auth.user and nats.auth.password go together".into(),
        )),
        NatsAuth {
            token: Some(token), ..
        } => Ok(options.token(token.clone())),
        NatsAuth {
            nkey_seed_file: Some(file),
            ..
        } => Ok(options.nkey(nkey_seed(file)?)),
        NatsAuth {
            credentials_file: Some(file),
            ..
        } => options.credentials_file(file).await.map_err(|e| {
            NatsError::Config(format!(
                "nats.auth.credentials_file {}: {e}",
                file.display()
            ))
        }),
        _ => Ok(from_url(options, &parse_urls(urls)?)),
    }
}

/// The user and password, or the token, of the first server URL that carries them: the client
/// library does not use them by itself.
fn from_url(options: ConnectOptions, servers: &[ServerAddr]) -> ConnectOptions {
    let Some(server) = servers.iter().find(|s| s.username().is_some()) else {
        return options;
    };
    let user = decode(server.username().unwrap_or_default());
    match server.password() {
        Some(password) => options.user_and_password(user, decode(password)),
        None => options.token(user),
    }
}

/// A URL's user or password with its percent-escapes undone (`p%40ss` → `p@ss`).
fn decode(part: &str) -> String {
    percent_encoding::percent_decode_str(part)
        .decode_utf8_lossy()
        .into_owned()
}

/// Reads and checks an NKey seed file.
fn nkey_seed(file: &Path) -> Result<String, NatsError> {
    let shown = file.display();
    let seed = std::fs::read_to_string(file)
        .map_err(|e| NatsError::Config(format!("nats.auth.nkey_seed_file {shown}: {e}")))?;
    let seed = seed.trim().to_string();
    nkeys::KeyPair::from_seed(&seed).map_err(|e| {
        NatsError::Config(format!(
            "nats.auth.nkey_seed_file {shown} holds no NKey seed: {e}"
        ))
    })?;
    Ok(seed)
}

/// Applies the TLS settings; their files must be readable now (the client reads them only when it
/// connects, and would retry a missing file forever).
fn secure(options: ConnectOptions, tls: &NatsTls) -> Result<ConnectOptions, NatsError> {
    let readable = |key: &str, file: &PathBuf| {
        std::fs::File::open(file)
            .map(|_| file.clone())
            .map_err(|e| NatsError::Config(format!("nats.tls.{key} {}: {e}", file.display())))
    };
    let mut options = options.require_tls(tls.required);
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(readable("ca_file", ca)?);
    }
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Ok(options
            .add_client_certificate(readable("cert_file", cert)?, readable("key_file", key)?)),
        (None, None) => Ok(options),
        _ => Err(NatsError::Config(
            "nats.tls.cert_file and nats.tls.key_file go together".into(),
        )),
    }
}

/// Logs what happens to the connection, so that a refused login or a lost server shows in the
/// log rather than only as requests that time out.
fn log_event(event: &Event) {
    match event {
        Event::Connected => tracing::info!("connected to NATS"),
        Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
        Event::LameDuckMode => tracing::warn!("the NATS server is shutting down (lame duck mode)"),
        Event::ServerError(err) => tracing::error!(error = %err, "NATS server error"),
        Event::ClientError(err) => tracing::error!(error = %err, "cannot connect to NATS"),
        Event::SlowConsumer(_) | Event::Draining | Event::Closed => {
            tracing::debug!(%event, "NATS connection event")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comma_separated_list_names_every_server() {
        let list = server_list("nats://n1:4222, nats://n2:4222,,tls://n3:4222").expect("valid");
        let hosts: Vec<&str> = list.iter().map(|s| s.host()).collect();
        assert_eq!(hosts, ["n1", "n2", "n3"]);
        let err = server_list("nats://n1:4222, http://user:s3cret@n2").unwrap_err();
        assert!(err.to_string().contains("entry 2"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    /// The client library logs each server's address at debug level at every connection attempt:
    /// the addresses it is given carried the URL's password.
    #[test]
    fn the_servers_handed_to_the_client_carry_no_credentials() {
        let urls = "nats://herald:s3cret@n1:4222, tls://t0ken@n2:4222, nats://n3:4222";
        let list = server_list(urls).expect("valid");
        for server in &list {
            assert_eq!(server.username(), None, "{server:?}");
            assert_eq!(server.password(), None, "{server:?}");
            let shown = format!("{server:?}");
            assert!(
                !shown.contains("s3cret") && !shown.contains("t0ken"),
                "{shown}"
            );
        }
        let hosts: Vec<(&str, u16)> = list.iter().map(|s| (s.host(), s.port())).collect();
        assert_eq!(hosts, [("n1", 4222), ("n2", 4222), ("n3", 4222)]);
        assert!(list[1].tls_required(), "the scheme stays");
    }

    #[test]
    fn a_max_payload_below_the_command_limit_is_warned_of_naming_both() {
        let warning = max_payload_warning(65_536).expect("a warning");
        assert!(
            warning.contains("65536") && warning.contains(&MAX_COMMAND_BYTES.to_string()),
            "{warning}"
        );
        assert_eq!(max_payload_warning(MAX_COMMAND_BYTES), None);
        assert_eq!(
            max_payload_warning(1024 * 1024),
            None,
            "nats-server's default"
        );
    }

    #[test]
    fn url_credentials_are_decoded() {
        assert_eq!(decode("p%40ss%3Aword"), "p@ss:word");
        assert_eq!(decode("plain"), "plain");
        assert_eq!(decode("100%"), "100%", "a lone percent sign stays");
    }

    #[tokio::test]
    async fn two_ways_of_authenticating_are_refused() {
        let auth = NatsAuth {
            token: Some("t".into()),
            nkey_seed_file: Some("seed.nk".into()),
            ..NatsAuth::default()
        };
        let err = authenticate(ConnectOptions::new(), &auth, "")
            .await
            .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "invalid NATS settings: nats.auth: token and nkey_seed_file are set; set one of them"
        );
        let half = NatsAuth {
            user: Some("herald".into()),
            ..NatsAuth::default()
        };
        let err = authenticate(ConnectOptions::new(), &half, "")
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("go together"), "{err}");
    }

    #[test]
    fn unreadable_files_and_bad_seeds_are_refused_at_once() {
        let dir = std::env::temp_dir().join(format!("herald-nats-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let seed = dir.join("seed.nk");
        std::fs::write(&seed, "not a seed\n").expect("write");
        let err = nkey_seed(&seed).unwrap_err();
        assert!(err.to_string().contains("holds no NKey seed"), "{err}");
        let tls = NatsTls {
            ca_file: Some(dir.join("absent-ca.pem")),
            ..NatsTls::default()
        };
        let err = secure(ConnectOptions::new(), &tls).expect_err("refused");
        assert!(err.to_string().contains("nats.tls.ca_file"), "{err}");
        let lone = NatsTls {
            cert_file: Some(seed.clone()),
            ..NatsTls::default()
        };
        let err = secure(ConnectOptions::new(), &lone).expect_err("refused");
        assert!(err.to_string().contains("go together"), "{err}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn secrets_are_not_shown() {
        let auth = NatsAuth {
            user: Some("herald".into()),
            password: Some("s3cret".into()),
            token: Some("t0ken".into()),
            ..NatsAuth::default()
        };
        let shown = serde_json::to_string(&auth).expect("serialize");
        assert!(
            !shown.contains("s3cret") && !shown.contains("t0ken"),
            "{shown}"
        );
        assert!(shown.contains("herald"), "{shown}");
    }
}
