//! The email provider's SMTP connections: opened on demand (implicit TLS or STARTTLS, then AUTH,
//! as configured), kept open between messages, at most `pool_size` at once.
//!
//! lettre's own pool checks every connection with a NOOP before each message (a round trip more
//! than the two a pipelined message costs) and, under load, opens connections beyond its size
//! that it closes after a single message: connect, EHLO, STARTTLS, AUTH and QUIT for one mail.
//! This pool (deadpool over lettre's [`AsyncSmtpConnection`]) lets a send wait for a free
//! connection instead, checks a connection with a NOOP only after it sat idle for [`IDLE_CHECK`],
//! and never reuses one whose session failed or was cut short: a send cancelled by its timeout
//! leaves the session at an unknown step, where the next message's commands would be answered by
//! the last one's replies.

use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use lettre::address::Envelope;
use lettre::transport::smtp::{
    self,
    authentication::{Credentials, DEFAULT_MECHANISMS},
    client::{AsyncSmtpConnection, TlsParameters},
    extension::{ClientId, Extension},
    response::Response,
};

/// A pooled connection idle for this long is checked with a NOOP before it is used again: the
/// server may have closed it meanwhile (servers end idle sessions after a few minutes).
pub const IDLE_CHECK: Duration = Duration::from_secs(5);

/// How a connection is secured.
#[derive(Clone)]
pub enum Encryption {
    /// Plain TCP (local relays and test sinks only).
    None,
    /// STARTTLS, required: a server that does not offer it is an error.
    Starttls(TlsParameters),
    /// TLS from the first byte (SMTPS).
    Implicit(TlsParameters),
}

/// The server to connect to, and how.
pub struct SmtpServer {
    /// Host name (also the name the TLS certificate must carry).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Connection security.
    pub encryption: Encryption,
    /// AUTH credentials, if the server wants them.
    pub credentials: Option<Credentials>,
    /// Longest a TCP connect may take.
    pub connect_timeout: Duration,
    /// The name this client gives in EHLO.
    pub hello: ClientId,
    /// Extensions not to use even where the server offers them.
    pub ignored: Vec<Extension>,
}

impl managed::Manager for SmtpServer {
    type Type = AsyncSmtpConnection;
    type Error = smtp::Error;

    async fn create(&self) -> Result<AsyncSmtpConnection, smtp::Error> {
        let implicit = match &self.encryption {
            Encryption::Implicit(tls) => Some(tls.clone()),
            Encryption::None | Encryption::Starttls(_) => None,
        };
        let mut connection = AsyncSmtpConnection::connect_tokio1(
            (self.host.as_str(), self.port),
            Some(self.connect_timeout),
            &self.hello,
            implicit,
            None,
        )
        .await?;
        if let Encryption::Starttls(tls) = &self.encryption {
            connection.starttls(tls.clone(), &self.hello).await?;
        }
        if let Some(credentials) = &self.credentials {
            connection.auth(DEFAULT_MECHANISMS, credentials).await?;
        }
        for extension in &self.ignored {
            connection.ignore_extension(*extension);
        }
        Ok(connection)
    }

    async fn recycle(
        &self,
        connection: &mut AsyncSmtpConnection,
        metrics: &Metrics,
    ) -> RecycleResult<smtp::Error> {
        if connection.has_broken() {
            return Err(RecycleError::message("the SMTP session failed"));
        }
        if metrics.last_used() >= IDLE_CHECK && !connection.test_connected().await {
            return Err(RecycleError::message("closed by the server while idle"));
        }
        Ok(())
    }
}

/// Why a message was not handed to the server.
#[derive(Debug, thiserror::Error)]
pub enum SmtpSendError {
    /// The server refused, or the connection failed.
    #[error(transparent)]
    Smtp(#[from] smtp::Error),
    /// No connection could be had from the pool.
    #[error("SMTP connection pool: {0}")]
    Pool(String),
}

/// A pool of SMTP connections to one server.
pub struct SmtpPool {
    pool: Pool<SmtpServer>,
}

impl SmtpPool {
    /// A pool of at most `size` connections to `server`; none is opened before the first send.
    pub fn new(server: SmtpServer, size: usize) -> Result<Self, String> {
        Pool::builder(server)
            .max_size(size.max(1))
            .build()
            .map(|pool| Self { pool })
            .map_err(|e| e.to_string())
    }

    /// Sends one message over a pooled connection (waiting for one if all are busy) and returns
    /// the server's final reply.
    pub async fn send(&self, envelope: &Envelope, email: &[u8]) -> Result<Response, SmtpSendError> {
        let object = self.pool.get().await.map_err(|err| match err {
            PoolError::Backend(err) => SmtpSendError::Smtp(err),
            other => SmtpSendError::Pool(other.to_string()),
        })?;
        let mut checkout = Checkout(Some(object));
        let reply = checkout.send(envelope, email).await?;
        checkout.release();
        Ok(reply)
    }
}

/// A connection taken from the pool. It goes back only through [`Checkout::release`], after a
/// message went through; dropped otherwise (an error, or the send cancelled half-way), the
/// connection is taken out of the pool and closed.
struct Checkout(Option<Object<SmtpServer>>);

impl Checkout {
    async fn send(&mut self, envelope: &Envelope, email: &[u8]) -> Result<Response, SmtpSendError> {
        let connection = self
            .0
            .as_deref_mut()
            .ok_or_else(|| SmtpSendError::Pool("connection already released".into()))?;
        Ok(connection.send(envelope, email).await?)
    }

    fn release(mut self) {
        // Dropping the object hands it back to the pool.
        drop(self.0.take());
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(Object::take(object));
        }
    }
}
