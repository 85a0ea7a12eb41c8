//! Email over SMTP (lettre), or into a local outbox folder as `.eml` files when no SMTP host is
//! configured, so Herald runs on a laptop without a mail server.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::BoxFuture;
use herald_nats::Channel;
use lettre::{
    Address, AsyncFileTransport, AsyncTransport, Message, Tokio1Executor,
    address::Envelope,
    message::{Mailbox, MultiPart, SinglePart, header::ContentType},
    transport::smtp::{
        TransactionStep,
        authentication::Credentials,
        client::TlsParameters,
        extension::{ClientId, Extension},
    },
};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};

use super::smtp_pool::{Encryption, SmtpPool, SmtpSendError, SmtpServer};
use super::{OutboundMessage, Provider, ProviderError, Receipt};

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain TCP (local relays and test sinks only).
    None,
    /// Upgrade with STARTTLS (port 587).
    #[default]
    Starttls,
    /// Implicit TLS (port 465).
    Tls,
}

impl SmtpSecurity {
    /// The value as the configuration spells it.
    fn setting(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Starttls => "starttls",
            Self::Tls => "tls",
        }
    }
}

/// Email provider configuration.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct EmailConfig {
    /// SMTP host; when unset or blank, mail is written to `outbox_dir` instead (see
    /// [`EmailConfig::relay_host`]).
    pub smtp_host: Option<String>,
    /// SMTP port; defaults by `security` (25, 587, 465).
    pub smtp_port: Option<u16>,
    /// Connection security.
    pub security: SmtpSecurity,
    /// SMTP user name.
    pub username: Option<String>,
    /// SMTP password.
    /// Not serialised: `herald config` omits it.
    #[serde(skip_serializing)]
    pub password: Option<String>,
    /// Sender mailbox, e.g. `Shop <noreply@shop.example>`.
    pub from: String,
    /// Folder for `.eml` files when no SMTP host is set.
    pub outbox_dir: PathBuf,
    /// Longest an SMTP connect may take, and a group of messages sent over one connection (see
    /// `pool_size`), in milliseconds; each send is bounded by its deadline as well.
    pub timeout_ms: u64,
    /// Most SMTP connections open at once. Messages that find them all busy wait, and go out
    /// together over the next one free: up to 64 in one write where the server offers
    /// PIPELINING and CHUNKING.
    pub pool_size: u32,
    /// Use PIPELINING (RFC 2920) where the server offers it; `false` sends one command at a
    /// time (and so no CHUNKING either), for a server or proxy that offers it and mishandles it.
    pub pipelining: bool,
    /// Use CHUNKING (RFC 3030, `BDAT`) where the server offers it with PIPELINING; `false` sends
    /// the message with DATA.
    pub chunking: bool,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            smtp_host: None,
            smtp_port: None,
            security: SmtpSecurity::default(),
            username: None,
            password: None,
            from: "Herald <herald@localhost>".into(),
            outbox_dir: PathBuf::from("data/outbox"),
            timeout_ms: 10_000,
            pool_size: 32,
            pipelining: true,
            chunking: true,
        }
    }
}

impl std::fmt::Debug for EmailConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmailConfig")
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("outbox_dir", &self.outbox_dir)
            .field("timeout_ms", &self.timeout_ms)
            .field("pool_size", &self.pool_size)
            .field("pipelining", &self.pipelining)
            .field("chunking", &self.chunking)
            .finish()
    }
}

impl EmailConfig {
    /// Refuses what [`EmailProvider::new`] refuses (a sender that is not a mailbox, an SMTP host
    /// TLS cannot name, an outbox folder that cannot be created), so that a start refuses them
    /// before it connects to anything: it sets up the same SMTP transport and drops it, opening
    /// no connection, or checks that the outbox folder is one or can be created, without
    /// creating it (a folder of its own is made and removed at once in the nearest folder above
    /// it that exists). Needs a process-wide rustls crypto provider installed.
    pub fn check(&self) -> Result<(), EmailConfigError> {
        self.sender()?;
        match self.relay_host() {
            Some(host) => smtp_transport(host, self).map(drop),
            None => match outbox_problem(&self.outbox_dir) {
                Some(reason) => Err(outbox_error(&self.outbox_dir, reason)),
                None => Ok(()),
            },
        }
    }

    /// The SMTP host mail is sent to, if any: a blank `smtp_host` (an environment variable set
    /// to nothing, as compose's `${SMTP_HOST:-}` gives) is none, as for `username` and
    /// `password`, and email goes to the outbox.
    pub fn relay_host(&self) -> Option<&str> {
        self.smtp_host
            .as_deref()
            .filter(|host| !host.trim().is_empty())
    }

    /// The sender, parsed.
    fn sender(&self) -> Result<Mailbox, EmailConfigError> {
        self.from
            .parse::<Mailbox>()
            .map_err(|e| EmailConfigError::From {
                from: self.from.clone(),
                reason: e.to_string(),
            })
    }
}

/// Why an email provider could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum EmailConfigError {
    /// `from` is not a mailbox.
    #[error("channels.email.from {from:?} is not a valid mailbox: {reason}")]
    From {
        /// The configured value.
        from: String,
        /// The parser's reason.
        reason: String,
    },
    /// The SMTP transport could not be set up.
    #[error("channels.email.smtp_host {host:?}: cannot set up the SMTP transport: {reason}")]
    Transport {
        /// The configured host.
        host: String,
        /// lettre's reason.
        reason: String,
    },
    /// With TLS, the host must be a name (or IP address) the server's certificate is checked
    /// against; lettre refuses any other when it connects, so every send would fail.
    #[error(
        "channels.email.smtp_host {host:?} is not a host name or IP address (without a port; \
         channels.email.smtp_port sets that) that TLS can check the server's certificate against \
         (channels.email.security is \"{security}\")"
    )]
    TlsHost {
        /// The configured host.
        host: String,
        /// The configured security, `starttls` or `tls`.
        security: &'static str,
    },
    /// Only one of `username` and `password` is set.
    #[error(
        "channels.email.username and channels.email.password go together: set both to log in, \
         or neither"
    )]
    HalfCredentials,
    /// The outbox folder could not be created.
    #[error(
        "channels.email.outbox_dir {dir:?} cannot be created (email is written there while \
         channels.email.smtp_host is not set): {reason}"
    )]
    Outbox {
        /// The folder.
        dir: String,
        /// The OS's reason.
        reason: String,
    },
}

enum Transport {
    Smtp(SmtpPool),
    Outbox(AsyncFileTransport<Tokio1Executor>),
}

/// Sends email over SMTP or into the outbox folder.
pub struct EmailProvider {
    name: String,
    from: Mailbox,
    transport: Transport,
}

impl EmailProvider {
    /// Builds the provider; SMTP connections are opened lazily on the first send.
    pub fn new(name: String, config: &EmailConfig) -> Result<Self, EmailConfigError> {
        let from = config.sender()?;
        let transport = match config.relay_host() {
            Some(host) => Transport::Smtp(smtp_transport(host, config)?),
            None => {
                let dir = &config.outbox_dir;
                std::fs::create_dir_all(dir).map_err(|e| {
                    outbox_error(dir, outbox_problem(dir).unwrap_or_else(|| e.to_string()))
                })?;
                // Said at every start: a misspelt SMTP setting would otherwise turn every email
                // into a file, recorded `sent`, without a word.
                tracing::warn!(
                    outbox = %config.outbox_dir.display(),
                    "channels.email.smtp_host is not set: email is written to the outbox folder \
                     as .eml files and recorded sent, not delivered to anyone"
                );
                Transport::Outbox(AsyncFileTransport::new(&config.outbox_dir))
            }
        };
        Ok(Self {
            name,
            from,
            transport,
        })
    }

    fn build(&self, message: &OutboundMessage) -> Result<Message, ProviderError> {
        let address = message
            .contacts
            .email
            .as_deref()
            .ok_or(ProviderError::MissingContact(Channel::Email))?;
        let to = recipient_mailbox(address)
            .and_then(ascii_domain)
            .map_err(|e| ProviderError::unsendable(format!("invalid email address: {e}")))?;
        // The envelope given, not derived: lettre would parse the From and To headers it has just
        // written back into addresses (about 1.5% of the engine's CPU in a bench run).
        let envelope = Envelope::new(Some(self.from.email.clone()), vec![to.email.clone()])
            .map_err(|e| ProviderError::unsendable(format!("invalid email envelope: {e}")))?;
        let builder = Message::builder()
            .envelope(envelope)
            .from(self.from.clone())
            .to(to)
            .subject(message.content.subject.clone().unwrap_or_default())
            // The notification id as Message-ID: receivers and relays can drop a resend.
            .message_id(Some(format!(
                "<{}@herald>",
                message.notification_id.as_simple()
            )));
        let text = message.content.text.clone();
        let built = match &message.content.html {
            Some(html) => builder.multipart(MultiPart::alternative_plain_html(text, html.clone())),
            None => builder.singlepart(
                SinglePart::builder()
                    .header(ContentType::TEXT_PLAIN)
                    .body(text),
            ),
        };
        built.map_err(|e| ProviderError::unsendable(format!("cannot build email: {e}")))
    }
}

/// The recipient's mailbox. Contacts are nearly always a bare address, which lettre checks
/// without its RFC 2822 mailbox grammar (that parser was about 1% of the engine's CPU in a bench
/// run); anything else (`Name <user@host>`, surrounding spaces) goes through the full grammar.
fn recipient_mailbox(address: &str) -> Result<Mailbox, lettre::address::AddressError> {
    match address.parse::<Address>() {
        Ok(bare) => Ok(Mailbox::new(None, bare)),
        Err(_) => address.parse::<Mailbox>(),
    }
}

/// `mailbox` with an internationalised domain in its ASCII form (`bücher.de` →
/// `xn--bcher-kva.de`), as every server takes it; only a non-ASCII local part needs a server
/// offering SMTPUTF8.
fn ascii_domain(mailbox: Mailbox) -> Result<Mailbox, lettre::address::AddressError> {
    let domain = mailbox.email.domain();
    if domain.is_ascii() {
        return Ok(mailbox);
    }
    let ascii =
        idna::domain_to_ascii(domain).map_err(|_| lettre::address::AddressError::InvalidDomain)?;
    let email = Address::new(mailbox.email.user(), ascii)?;
    Ok(Mailbox::new(mailbox.name, email))
}

/// Why the outbox folder `dir` cannot be created, if it cannot, found without creating it: it,
/// or the nearest folder above it that exists, must be a folder, and a folder must be possible to
/// create in the latter (tried with one of a name of its own, removed at once, so that nothing is
/// left behind and instances starting together do not meet).
fn outbox_problem(dir: &Path) -> Option<String> {
    for folder in dir.ancestors() {
        // A relative path's last ancestor is the empty one: the working folder.
        let at = if folder.as_os_str().is_empty() {
            Path::new(".")
        } else {
            folder
        };
        match std::fs::metadata(at) {
            Ok(found) if !found.is_dir() => {
                return Some(if folder == dir {
                    "it is a file, not a folder".into()
                } else {
                    format!("{} is a file, not a folder", at.display())
                });
            }
            Ok(_) if folder == dir => return None,
            Ok(_) => {
                let probe = at.join(format!(".herald-check-{}", uuid::Uuid::new_v4().simple()));
                return match std::fs::create_dir(&probe) {
                    Ok(()) => {
                        let _ = std::fs::remove_dir(&probe);
                        None
                    }
                    Err(e) => Some(format!("cannot create a folder in {}: {e}", at.display())),
                };
            }
            // Not there, or under a file: the folder above says which.
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                if std::fs::symlink_metadata(at).is_ok() {
                    return Some(format!("{} is a link to nothing", at.display()));
                }
            }
            Err(e) => return Some(format!("{}: {e}", at.display())),
        }
    }
    None
}

/// The refusal of the outbox folder `dir`, for `reason`.
fn outbox_error(dir: &Path, reason: String) -> EmailConfigError {
    EmailConfigError::Outbox {
        dir: dir.display().to_string(),
        reason,
    }
}

fn smtp_transport(host: &str, config: &EmailConfig) -> Result<SmtpPool, EmailConfigError> {
    let failed = |reason: String| EmailConfigError::Transport {
        host: host.to_string(),
        reason,
    };
    let tls = || {
        // lettre checks the name only when it connects, and every send would fail on it.
        if ServerName::try_from(host).is_err() {
            return Err(EmailConfigError::TlsHost {
                host: host.to_string(),
                security: config.security.setting(),
            });
        }
        TlsParameters::new(host.to_string()).map_err(|e| failed(e.to_string()))
    };
    let (encryption, default_port) = match config.security {
        SmtpSecurity::None => (Encryption::None, 25),
        SmtpSecurity::Starttls => (Encryption::Starttls(tls()?), 587),
        SmtpSecurity::Tls => (Encryption::Implicit(tls()?), 465),
    };
    // An empty value, as an environment variable set to nothing gives, is none.
    let given = |value: &Option<String>| value.clone().filter(|v| !v.is_empty());
    let credentials = match (given(&config.username), given(&config.password)) {
        (Some(user), Some(password)) => Some(Credentials::new(user, password)),
        (None, None) => None,
        // Without both, no login is tried, and a relay that wants one refuses every message
        // with a permanent 5xx: an outage that would look like failing recipients.
        _ => return Err(EmailConfigError::HalfCredentials),
    };
    let timeout = Duration::from_millis(config.timeout_ms);
    let server = SmtpServer {
        host: host.to_string(),
        port: config.smtp_port.unwrap_or(default_port),
        encryption,
        credentials,
        connect_timeout: timeout,
        hello: ClientId::default(),
        ignored: ignored_extensions(config),
    };
    SmtpPool::new(server, config.pool_size as usize, timeout).map_err(failed)
}

/// The extensions `config` turns off.
fn ignored_extensions(config: &EmailConfig) -> Vec<Extension> {
    [
        (!config.pipelining).then_some(Extension::Pipelining),
        (!config.chunking).then_some(Extension::Chunking),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// What a failed send means for the message and the provider:
///
/// - a `421` (the server closes the session, RFC 5321 section 3.8), whatever it answered:
///   transient, the server's state;
/// - a 4xx to `RCPT TO`: throttled, about that one recipient (greylisting `451`, Postfix's
///   `reject_unverified_recipient` `450`, a full mailbox `452`/`4.2.2`), retried later without
///   counting against the circuit: one recipient's state must not stop email for everyone; but
///   one whose enhanced code names the relay's own state (`4.3.x` mail system, `4.4.x` network
///   or routing: `451 4.3.0` temporary lookup failure, `452 4.3.1` insufficient storage), which
///   every recipient meets alike, is transient;
/// - a 4xx to `MAIL FROM`, `DATA` or `BDAT`: transient;
/// - a 5xx to `MAIL FROM` refuses the account or its sender address (`530` authentication
///   required, `550`/`553`/`554` sender not verified or not owned), not the message: transient,
///   counting against the circuit, as an HTTP provider's `401` is, rather than failing every
///   message for good until someone fixes it; but a `552` or `5.3.4` (`5.2.3`), the message's
///   size, is permanent;
/// - a 5xx to `RCPT TO`, `DATA` or `BDAT` that says it refuses the sender or the account (see
///   [`Refusal::refuses_sender`]: relay access denied, the sender domain's DMARC, SPF or DKIM, an
///   unverified sender identity, a paused account): transient and counting, as at `MAIL FROM`;
/// - any other 5xx to `RCPT TO`, `DATA` or `BDAT`: permanent, this recipient or message is
///   refused (`5.1.1` no such mailbox, `5.1.x` bad address, `5.2.1` disabled, `5.2.2` full,
///   `5.7.1` content refused after the data);
/// - a non-ASCII local part for a server without SMTPUTF8: permanent;
/// - a message that got a connection only when too little of its send's timeout was left
///   ([`SmtpSendError::TooLate`]): not sent, and not the relay's fault, which answered the
///   messages ahead of it ([`ProviderError::NoConnection`]). One whose timeout ran out while it
///   waited ([`SmtpSendError::NoConnectionInTime`]) is transient: it may have waited for its own
///   connection to a relay that does not answer;
/// - anything else (no session, a connection that failed, a reply that was not SMTP, a timeout):
///   transient.
///
/// A failure of the connection that carried a group of messages rather than of the message (see
/// [`SmtpSendError::Group`]) is classified as its error, as part of the connection's
/// [`Incident`](super::Incident): the circuit counts it once for the whole group.
fn classify(error: SmtpSendError, recipients: &[Address]) -> ProviderError {
    if let SmtpSendError::Group { error, incident } = error {
        return classify(*error, recipients).in_incident(incident);
    }
    let error = match error {
        SmtpSendError::Smtp(error) => error,
        SmtpSendError::TooLate { .. } => {
            return ProviderError::NoConnection {
                reason: error.to_string(),
            };
        }
        other => return ProviderError::transient(other.to_string()),
    };
    if needs_smtputf8(&error) {
        return ProviderError::permanent(error.to_string());
    }
    let refusal = Refusal::of(&error);
    match (refusal.code, error.step()) {
        (Some(421), _) | (None, _) => ProviderError::transient(error.to_string()),
        (Some(400..=499), Some(TransactionStep::Rcpt)) if !refusal.names_relay_state() => {
            ProviderError::throttled(error.to_string(), None)
        }
        (Some(500..=599), Some(TransactionStep::Mail)) if !refusal.is_too_big() => {
            ProviderError::transient(error.to_string())
        }
        (Some(500..=599), Some(step)) if refusal.refuses_sender(step, recipients) => {
            ProviderError::transient(error.to_string())
        }
        _ if error.is_permanent() => ProviderError::permanent(error.to_string()),
        _ => ProviderError::transient(error.to_string()),
    }
}

/// Phrases with which servers refuse to relay for the sender (Postfix `Relay access denied`,
/// Exim `relay not permitted`, Sendmail `Relaying denied`, `unable to relay`).
const RELAYING: &[&str] = &[
    "relay access denied",
    "relaying denied",
    "unable to relay",
    "relay not permitted",
];

/// A server's refusal, read once for [`classify`]'s questions about it.
struct Refusal {
    /// The reply code, if the server answered.
    code: Option<u16>,
    /// The enhanced status code (RFC 3463) its text begins with, if it has one.
    enhanced: Option<EnhancedCode>,
    /// Its text (the reply without its code) in lower case, empty if it has none.
    text: String,
}

impl Refusal {
    /// Reads `error`.
    fn of(error: &lettre::transport::smtp::Error) -> Self {
        let text = std::error::Error::source(error)
            .map(ToString::to_string)
            .unwrap_or_default()
            .to_ascii_lowercase();
        Self {
            code: error.status().map(u16::from),
            enhanced: text.split_whitespace().next().and_then(EnhancedCode::parse),
            text,
        }
    }

    /// Whether the text names one of `phrases` (lower case).
    fn names(&self, phrases: &[&str]) -> bool {
        phrases.iter().any(|phrase| self.text.contains(phrase))
    }

    /// Whether it is for the message's size: `552` (RFC 5321: exceeded storage allocation, as
    /// servers answer a `SIZE` over their limit) or an enhanced status `5.3.4` or `5.2.3`
    /// (RFC 3463: message too big for the system, longer than the administrative limit).
    fn is_too_big(&self) -> bool {
        self.code == Some(552)
            || matches!(
                self.enhanced,
                Some(
                    EnhancedCode {
                        class: 5,
                        subject: 3,
                        detail: 4
                    } | EnhancedCode {
                        class: 5,
                        subject: 2,
                        detail: 3
                    }
                )
            )
    }

    /// Whether its enhanced status code (RFC 3463) names the relay's own state rather than the
    /// recipient's: `x.3.x` (mail system) or `x.4.x` (network and routing).
    fn names_relay_state(&self) -> bool {
        self.enhanced
            .is_some_and(|code| matches!(code.subject, 3 | 4))
    }

    /// Whether a 5xx to `step` (`RCPT TO` or the message) refuses the sender or the account rather
    /// than this recipient or message, so that every message would be refused alike until someone
    /// fixes the account or the sender domain. Only where the reply says so:
    ///
    /// | reply | at | meaning |
    /// |---|---|---|
    /// | `x.1.7`, `x.1.8` | any | the sender's address, or its domain, is bad (RFC 3463) |
    /// | `x.7.1` naming relaying or `Sender address rejected` | `RCPT TO` | relay access denied, the sender refused |
    /// | `x.7.8` | any | the account's credentials are invalid (RFC 4954) |
    /// | `x.7.20` to `x.7.27` | any | the sender's DKIM, SPF, reverse DNS or MX fail (RFC 7372) |
    /// | `x.7.x` naming the word DMARC, SPF or DKIM | any | the sender domain's authentication policy |
    /// | no enhanced code, naming relaying ([`RELAYING`]) | `RCPT TO` | as `x.7.1` |
    /// | no enhanced code: `address is not verified` not naming a recipient, `sending paused` | any | Amazon SES: unverified sender identity, account paused |
    ///
    /// Everything else stays the recipient's or the message's: a bad or full mailbox (`5.1.1`,
    /// `5.1.x`, `5.2.1`, `5.2.2`), a `5.7.1` to `RCPT TO` that refuses the recipient (Postfix
    /// `Recipient address rejected: Access denied`, Exchange `not authorized`), SES naming an
    /// unverified recipient (its sandbox), and a `5.7.1` (or other `5.7.x`) to the message, which
    /// is as often its content refused as spam.
    fn refuses_sender(&self, step: TransactionStep, recipients: &[Address]) -> bool {
        let names = |phrases: &[&str]| self.names(phrases);
        let at_rcpt = step == TransactionStep::Rcpt;
        match self.enhanced {
            Some(EnhancedCode {
                subject: 1,
                detail: 7 | 8,
                ..
            }) => true,
            Some(EnhancedCode {
                subject: 7, detail, ..
            }) => {
                (at_rcpt
                    && detail == 1
                    && !names(&["recipient address rejected"])
                    && (names(RELAYING) || names(&["sender address rejected"])))
                    || matches!(detail, 8 | 20..=27)
                    || names_word(&self.text, &["dmarc", "spf", "dkim"])
            }
            Some(_) => false,
            None => {
                (at_rcpt && names(RELAYING))
                    || names(&["sending paused"])
                    || (names(&["address is not verified"])
                        && !recipients
                            .iter()
                            .any(|to| self.text.contains(&to.to_string().to_ascii_lowercase())))
            }
        }
    }
}

/// Whether `text` has one of `words` as a whole word (`spf` in `SPF check failed`, not in
/// `<x@spfoo.com>`).
fn names_word(text: &str, words: &[&str]) -> bool {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| words.contains(&word))
}

/// An enhanced status code (RFC 3463): `class.subject.detail`, as `5.7.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EnhancedCode {
    class: u16,
    subject: u16,
    detail: u16,
}

impl EnhancedCode {
    /// `word` read as an enhanced status code: a class digit, then a subject and a detail of one
    /// to three digits each.
    fn parse(word: &str) -> Option<Self> {
        let mut parts = word.split('.');
        let mut number = |most: usize| {
            parts
                .next()
                .filter(|part| (1..=most).contains(&part.len()))
                .filter(|part| part.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|part| part.parse().ok())
        };
        let code = Self {
            class: number(1)?,
            subject: number(3)?,
            detail: number(3)?,
        };
        parts.next().is_none().then_some(code)
    }
}

/// Whether lettre refused the envelope itself: a non-ASCII local part (`josé@…`) for a server
/// that does not offer SMTPUTF8, which no retry changes.
fn needs_smtputf8(error: &lettre::transport::smtp::Error) -> bool {
    error.is_client() && error.to_string().contains("SMTPUTF8")
}

impl Provider for EmailProvider {
    fn channel(&self) -> Channel {
        Channel::Email
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn send<'a>(
        &'a self,
        message: &'a OutboundMessage,
        deadline: tokio::time::Instant,
    ) -> BoxFuture<'a, Result<Receipt, ProviderError>> {
        Box::pin(async move {
            let email = self.build(message)?;
            let provider_message_id = match &self.transport {
                Transport::Smtp(smtp) => {
                    let envelope = email.envelope();
                    let reply = smtp
                        .send(envelope, email.formatted(), deadline)
                        .await
                        .map_err(|error| classify(error, envelope.to()))?;
                    // A bare `250` (the text is optional) names no message.
                    reply
                        .message()
                        .next()
                        .filter(|id| !id.is_empty())
                        .map(str::to_string)
                }
                Transport::Outbox(outbox) => {
                    let id = outbox
                        .send(email)
                        .await
                        .map_err(|e| ProviderError::transient(format!("outbox: {e}")))?;
                    Some(id.to_string())
                }
            };
            Ok(Receipt::new(provider_message_id))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::provider::tests::SendNow;
    use herald_nats::{Contacts, Content};
    use uuid::Uuid;

    fn message(email: Option<&str>, html: Option<&str>) -> OutboundMessage {
        OutboundMessage {
            notification_id: Uuid::now_v7(),
            contacts: Contacts {
                email: email.map(str::to_string),
                ..Contacts::default()
            },
            content: Content {
                subject: Some("Your order #1001".into()),
                text: "Thanks for your order.".into(),
                html: html.map(str::to_string),
                short: None,
                template: None,
            },
            category: "transactional",
            webhook_secret: None,
        }
    }

    fn outbox_provider(dir: &std::path::Path) -> EmailProvider {
        let config = EmailConfig {
            outbox_dir: dir.to_path_buf(),
            ..EmailConfig::default()
        };
        EmailProvider::new("outbox".into(), &config).unwrap()
    }

    #[tokio::test]
    async fn writes_multipart_eml_with_message_id_to_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let provider = outbox_provider(dir.path());
        let msg = message(Some("ada@example.com"), Some("<p>Thanks</p>"));
        let receipt = provider.send_now(&msg).await.unwrap();
        let id = receipt.provider_message_id.unwrap();
        let eml = std::fs::read_to_string(dir.path().join(format!("{id}.eml"))).unwrap();
        assert!(eml.contains("To: ada@example.com"), "{eml}");
        assert!(eml.contains(&format!("{}@herald", msg.notification_id.as_simple())));
        assert!(eml.contains("multipart/alternative"));
        assert!(eml.contains("Subject: Your order #1001"));
    }

    #[tokio::test]
    async fn missing_and_invalid_addresses_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let provider = outbox_provider(dir.path());
        assert_eq!(
            provider.send_now(&message(None, None)).await,
            Err(ProviderError::MissingContact(Channel::Email))
        );
        assert!(matches!(
            provider
                .send_now(&message(Some("not an address"), None))
                .await,
            Err(ProviderError::Unsendable { .. })
        ));
    }

    #[test]
    fn a_recipient_is_a_bare_address_or_a_named_mailbox() {
        let bare = recipient_mailbox("ada@example.com").unwrap();
        assert_eq!(
            (bare.name, bare.email.to_string()),
            (None, "ada@example.com".into())
        );
        let named = recipient_mailbox("Ada Lovelace <ada@example.com>").unwrap();
        assert_eq!(named.name.as_deref(), Some("Ada Lovelace"));
        assert_eq!(named.email.to_string(), "ada@example.com");
        let padded = recipient_mailbox(" ada@example.com ").unwrap();
        assert_eq!(padded.email.to_string(), "ada@example.com");
        assert!(recipient_mailbox("not an address").is_err());
        assert!(recipient_mailbox("ada@").is_err());
    }

    #[test]
    fn invalid_sender_is_a_config_error_and_password_is_redacted() {
        let config = EmailConfig {
            from: "nope".into(),
            password: Some("hunter2".into()),
            ..EmailConfig::default()
        };
        assert!(matches!(
            EmailProvider::new("smtp".into(), &config),
            Err(EmailConfigError::From { .. })
        ));
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn a_user_name_without_a_password_or_the_reverse_is_refused() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let relay = |username: Option<&str>, password: Option<&str>| EmailConfig {
            smtp_host: Some("smtp.example.com".into()),
            username: username.map(Into::into),
            password: password.map(Into::into),
            ..EmailConfig::default()
        };
        for half in [relay(Some("herald"), None), relay(None, Some("hunter2"))] {
            let err = half.check().expect_err("half the credentials");
            assert!(matches!(err, EmailConfigError::HalfCredentials), "{err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        relay(Some("herald"), Some("hunter2"))
            .check()
            .expect("both set");
        relay(None, None).check().expect("neither set");
        relay(None, Some(""))
            .check()
            .expect("an empty value is none");
    }

    #[test]
    fn an_enhanced_status_code_is_three_numbers() {
        let code = |class, subject, detail| EnhancedCode {
            class,
            subject,
            detail,
        };
        assert_eq!(EnhancedCode::parse("5.7.1"), Some(code(5, 7, 1)));
        assert_eq!(EnhancedCode::parse("5.7.509"), Some(code(5, 7, 509)));
        assert_eq!(EnhancedCode::parse("4.2.2"), Some(code(4, 2, 2)));
        for not_one in [
            "", "5.7", "5.7.1.2", "5.7.1234", "55.7.1", "5..1", "5.x.1", "Relay",
        ] {
            assert_eq!(EnhancedCode::parse(not_one), None, "{not_one:?}");
        }
    }

    /// An SMTP host set to nothing (an environment variable set empty) is none, as the user name
    /// and password are: the outbox, whatever the security.
    #[tokio::test]
    async fn a_blank_smtp_host_is_the_outbox() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        for (host, security) in [
            ("", SmtpSecurity::None),
            ("", SmtpSecurity::Starttls),
            (" ", SmtpSecurity::Tls),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let config = EmailConfig {
                smtp_host: Some(host.into()),
                security,
                outbox_dir: dir.path().to_path_buf(),
                ..EmailConfig::default()
            };
            config.check().expect("a blank host is none");
            let provider = EmailProvider::new("outbox".into(), &config).expect("the outbox");
            let receipt = provider
                .send_now(&message(Some("ada@example.com"), None))
                .await
                .unwrap_or_else(|e| panic!("{host:?} {security:?}: not written: {e:?}"));
            let id = receipt.provider_message_id.expect("the file's id");
            assert!(
                dir.path().join(format!("{id}.eml")).exists(),
                "{security:?}"
            );
        }
    }
}
