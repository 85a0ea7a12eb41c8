//! The email provider's SMTP connections: opened on demand (implicit TLS or STARTTLS, then AUTH,
//! as configured), kept open between messages, at most `pool_size` at once.
//!
//! lettre's own pool checks every connection with a NOOP before each message (a round trip more
//! than the two a pipelined message costs) and, under load, opens connections beyond its size
//! that it closes after a single message: connect, EHLO, STARTTLS, AUTH and QUIT for one mail.
//! This pool (deadpool over lettre's [`AsyncSmtpConnection`]) lets a send wait for a free
//! connection instead, checks a connection with a NOOP only after it sat idle for [`IDLE_CHECK`]
//! (one that does not answer within [`IDLE_CHECK_TIMEOUT`] is dropped, and so, without a check,
//! are those idle as long for a while after; another is taken or opened, within the connect
//! timeout like every session's opening), and never reuses one whose session failed or was cut
//! short: a group of messages given up after its timeout leaves the session at an unknown step,
//! where the next message's commands would be answered by the last one's replies. Messages that
//! wait for a connection go out together over the next one free, in one write where the server
//! pipelines ([`SmtpPool::send`]). A connection taken again from the pool that the server closed
//! meanwhile (a relay restart) fails before any reply; its messages, none of them accepted, go
//! again once over a fresh connection instead of failing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use lettre::address::Envelope;
use lettre::transport::smtp::{
    self,
    authentication::{Credentials, DEFAULT_MECHANISMS},
    client::{AsyncSmtpConnection, TlsParameters},
    extension::{ClientId, Extension},
    response::{Code, Response},
};
use tokio::sync::oneshot::{self, error::RecvError};
use tokio::time::Instant;

use super::provider::{Incident, time_left};

/// A pooled connection idle for this long (since it came back to the pool) is checked with a NOOP
/// before it is used again: the server may have closed it meanwhile (servers end idle sessions
/// after a few minutes).
pub const IDLE_CHECK: Duration = Duration::from_secs(5);

/// The longest the NOOP check of an idle connection may take (less where the connect timeout
/// is shorter). A NOOP is one round trip on an open session; a connection a NAT or firewall
/// dropped silently while idle never answers it, and waiting longer would only stall the message
/// until its own timeout, failing it though nothing was sent. Giving up on a live but slow
/// connection costs a new one.
pub const IDLE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// Longest opening a session may take: the TCP connect, the greeting, EHLO, STARTTLS and
    /// AUTH together.
    pub connect_timeout: Duration,
    /// The name this client gives in EHLO.
    pub hello: ClientId,
    /// Extensions not to use even where the server offers them.
    pub ignored: Vec<Extension>,
}

impl SmtpServer {
    /// Opens a session within [`SmtpServer::connect_timeout`]: a server that accepts the TCP
    /// connection and then stays silent would otherwise hold the send until its own timeout.
    async fn connect(&self) -> Result<AsyncSmtpConnection, ConnectError> {
        tokio::time::timeout(self.connect_timeout, self.open())
            .await
            .map_err(|_| ConnectError::TimedOut(self.connect_timeout))?
            .map_err(ConnectError::Smtp)
    }

    /// How long the NOOP check of an idle connection may take.
    fn check_timeout(&self) -> Duration {
        self.connect_timeout.min(IDLE_CHECK_TIMEOUT)
    }

    async fn open(&self) -> Result<AsyncSmtpConnection, smtp::Error> {
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
}

/// Opens the pool's connections, but only while a message waits for one: the pool hands the room
/// of a closed connection to the next caller in line, whose message another connection may have
/// taken meanwhile.
struct Connector {
    server: SmtpServer,
    queue: Arc<Mutex<Queue>>,
    /// The last connection found silent after sitting idle (see [`Silence`]).
    silence: Mutex<Option<Silence>>,
}

/// A connection that did not answer its NOOP check: how long it had sat idle, and when it was
/// found out. A NAT or firewall drops every connection idle past its limit, so for as long again
/// a connection idle at least as long is taken for silent too and dropped without a check: a send
/// after a quiet spell would otherwise wait out one check per pooled connection, all gone.
#[derive(Clone, Copy)]
struct Silence {
    idle: Duration,
    found: Instant,
}

impl Silence {
    /// Whether a connection idle for `idle` now is presumed silent too.
    fn covers(&self, idle: Duration) -> bool {
        idle >= self.idle && self.found.elapsed() <= self.idle
    }
}

impl Connector {
    /// Whether a connection idle for `idle` is presumed silent after another one was.
    fn presumed_silent(&self, idle: Duration) -> bool {
        lock(&self.silence).is_some_and(|silence| silence.covers(idle))
    }

    /// Notes that a connection idle for `idle` did not answer its check.
    fn found_silent(&self, idle: Duration) {
        *lock(&self.silence) = Some(Silence {
            idle,
            found: Instant::now(),
        });
    }
}

/// A connection in the pool, with when it last came back to it.
struct Pooled {
    connection: AsyncSmtpConnection,
    /// When the connection was last given back (or opened): its idle time counts from here, not
    /// from when it was last taken, which a long send would add to.
    returned: Instant,
}

/// Why the pool gave no connection.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    /// Connecting failed, or the server refused the session.
    #[error(transparent)]
    Smtp(#[from] smtp::Error),
    /// The session was not open within the connect timeout.
    #[error("no SMTP session within {} ms", .0.as_millis())]
    TimedOut(Duration),
    /// No message waits for a connection.
    #[error("no message waits for a connection")]
    Unneeded,
}

impl managed::Manager for Connector {
    type Type = Pooled;
    type Error = ConnectError;

    async fn create(&self) -> Result<Pooled, ConnectError> {
        if lock(&self.queue).waiting.is_empty() {
            return Err(ConnectError::Unneeded);
        }
        let connection = self.server.connect().await?;
        Ok(Pooled {
            connection,
            returned: Instant::now(),
        })
    }

    async fn recycle(&self, pooled: &mut Pooled, _: &Metrics) -> RecycleResult<ConnectError> {
        let connection = &mut pooled.connection;
        if connection.has_broken() {
            return Err(RecycleError::message("the SMTP session failed"));
        }
        let idle = pooled.returned.elapsed();
        if idle < IDLE_CHECK {
            return Ok(());
        }
        if self.presumed_silent(idle) {
            return Err(RecycleError::message(
                "idle as long as one that went silent",
            ));
        }
        // A connection that does not answer in time is dropped like a closed one, and the pool
        // hands out another or opens a new one: nothing was sent over it.
        let check = self.server.check_timeout();
        match tokio::time::timeout(check, connection.test_connected()).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(RecycleError::message("closed by the server while idle")),
            Err(_) => {
                self.found_silent(idle);
                Err(RecycleError::message(format!(
                    "no answer to NOOP within {} ms after sitting idle",
                    check.as_millis()
                )))
            }
        }
    }
}

/// Why a message was not handed to the server.
#[derive(Debug, thiserror::Error)]
pub enum SmtpSendError {
    /// The server refused the message, or the connection failed while carrying it.
    #[error(transparent)]
    Smtp(#[from] smtp::Error),
    /// No connection could be opened: the server was unreachable, or refused the session or the
    /// login (a 554 greeting, `535` to AUTH). Whatever the reply's code, every message fails alike
    /// until that is fixed, so it is not this message's fault.
    #[error("cannot open an SMTP session: {0}")]
    Connect(smtp::Error),
    /// The server did not open a session within the connect timeout (silent after accepting the
    /// TCP connection, or slow to greet, to answer EHLO, STARTTLS or AUTH).
    #[error("cannot open an SMTP session: no reply within {} ms", .0.as_millis())]
    ConnectTimedOut(Duration),
    /// No connection could be had from the pool.
    #[error("SMTP connection pool: {0}")]
    Pool(String),
    /// The message's send timeout ran out while it waited for a connection; nothing was sent.
    #[error("no SMTP connection was free within the send's timeout; the message was not sent")]
    NoConnectionInTime,
    /// When a connection was free for the message, too little was left of its send timeout for
    /// the server's reply; nothing was sent.
    #[error(
        "not sent: {} ms of the send's timeout were left when an SMTP connection was free, \
         less than the {} ms a message needs",
        .left.as_millis(),
        .room.as_millis()
    )]
    TooLate {
        /// What was left of the send's timeout.
        left: Duration,
        /// What a message needs at least (see [`MIN_ROOM`]).
        room: Duration,
    },
    /// The message was written, but the server's reply had not come by the send's deadline: it
    /// may have been delivered all the same.
    #[error("no SMTP reply within the send's timeout; the message may have been delivered")]
    Unanswered,
    /// The server had closed a pooled connection before answering a group of messages, and no
    /// new session could be opened to send them again: why (the same for each message).
    #[error("{0}")]
    Reopen(String),
    /// `error`, met by the connection that carried a group of messages (it hung past the group's
    /// timeout, was reset, or could not be reopened) and so by every message of the group still
    /// unanswered: one `incident`, counted once against the circuit.
    #[error("{error}")]
    Group {
        /// What the connection met.
        error: Box<SmtpSendError>,
        /// The connection's event, the same for each message it failed.
        incident: Incident,
    },
}

impl SmtpSendError {
    /// Whether this failure of a message in a group is its connection's, not the message's own:
    /// a connection that failed before the server answered (reset, closed, a `421`), was given up
    /// after the group's timeout, or could not be reopened.
    fn of_the_connection(&self) -> bool {
        match self {
            Self::Smtp(err) => !err.is_client() && !server_answered(err),
            Self::Reopen(_) | Self::Pool(_) => true,
            _ => false,
        }
    }
}

/// The most messages one connection carries in one write (see [`SmtpPool::send`]).
pub const MAX_GROUP: usize = 64;

/// The most bytes of messages one write carries (beyond a single message): a group must fit well
/// within `channels.email.timeout_ms` on a slow link, or the messages at its end would time out
/// unanswered, their outcome unknown (retried, they may arrive twice).
pub const MAX_GROUP_BYTES: usize = 1 << 20;

/// The least a message's send timeout must still have when a connection is free for it, for
/// it to be written (or written again, over a fresh connection); less where
/// `channels.email.timeout_ms` is short (half of it). A message written with less could be
/// delivered after its caller was told it timed out, and sent again by the retry.
pub const MIN_ROOM: Duration = Duration::from_secs(1);

/// A message waiting for a connection, and where its outcome goes.
struct Waiting {
    id: u64,
    envelope: Envelope,
    email: Vec<u8>,
    /// When its caller stops waiting for the outcome.
    deadline: Instant,
    reply: oneshot::Sender<Outcome>,
}

impl Waiting {
    /// Whether the message may still be written: its caller waits, with at least `room` left.
    fn has_room(&self, room: Duration) -> bool {
        !self.reply.is_closed() && Instant::now() + room <= self.deadline
    }

    /// Answers the caller of a message that is not written for lack of time.
    fn refuse_late(self, room: Duration) {
        let left = time_left(self.deadline);
        let _ = self.reply.send(Err(SmtpSendError::TooLate { left, room }));
    }
}

/// What became of a message: the server's final reply, or why it was not sent.
type Outcome = Result<Response, SmtpSendError>;

/// The messages waiting for a connection, oldest first.
#[derive(Default)]
struct Queue {
    next_id: u64,
    waiting: VecDeque<Waiting>,
}

/// A pool of SMTP connections to one server.
pub struct SmtpPool {
    pool: Pool<Connector>,
    queue: Arc<Mutex<Queue>>,
    group_timeout: Duration,
    /// What a message's send timeout must still have for it to be written (see [`MIN_ROOM`]).
    room: Duration,
}

impl SmtpPool {
    /// A pool of at most `size` connections to `server`; none is opened before the first send.
    /// A group of messages sent over one connection is given up (and the connection closed)
    /// after `group_timeout`, failing the messages the server had not answered by then.
    pub fn new(server: SmtpServer, size: usize, group_timeout: Duration) -> Result<Self, String> {
        let queue = Arc::<Mutex<Queue>>::default();
        let connector = Connector {
            server,
            queue: queue.clone(),
            silence: Mutex::new(None),
        };
        Pool::builder(connector)
            .max_size(size.max(1))
            .build()
            .map(|pool| Self {
                pool,
                queue,
                group_timeout,
                room: MIN_ROOM.min(group_timeout / 2),
            })
            .map_err(|e| e.to_string())
    }

    /// Sends one message and returns the server's final reply, by `deadline`: a message still
    /// waiting for a connection then is not sent ([`SmtpSendError::NoConnectionInTime`]), one
    /// written and not answered fails as [`SmtpSendError::Unanswered`]. A message is written only
    /// while its deadline is at least [`MIN_ROOM`] away ([`SmtpSendError::TooLate`] otherwise),
    /// alone or in a group, and a group goes on no longer than its messages' latest deadline.
    ///
    /// The message waits in a queue for a connection. Whoever gets one next takes up to
    /// [`MAX_GROUP`] of the oldest waiting messages with it (its own among them unless another
    /// took it first or the group is full, when it competes for a connection again) and sends
    /// them in one write where the server pipelines (see
    /// [`AsyncSmtpConnection::send_many`]): under load a round trip and a pair of system calls
    /// carry many messages instead of one. Each caller is answered as soon as the reply to its
    /// message is read; a group not done within its timeout fails only the messages still
    /// unanswered. The group runs in a task of its own, so a caller that gives up does not cut
    /// the others' messages short; a caller that gives up while its message still waits takes it
    /// out of the queue, and it is not sent.
    pub async fn send(
        &self,
        envelope: &Envelope,
        email: Vec<u8>,
        deadline: Instant,
    ) -> Result<Response, SmtpSendError> {
        let (reply, mut outcome) = oneshot::channel();
        let queued = Queued::push(&self.queue, envelope.clone(), email, deadline, reply);
        match tokio::time::timeout_at(deadline, self.deliver(&queued, &mut outcome)).await {
            Ok(outcome) => outcome,
            Err(_) if queued.withdraw() => Err(SmtpSendError::NoConnectionInTime),
            Err(_) => Err(SmtpSendError::Unanswered),
        }
    }

    /// [`send`](Self::send) without its deadline: the message `queued`, its outcome to come
    /// from `outcome`.
    async fn deliver(
        &self,
        queued: &Queued<'_>,
        outcome: &mut oneshot::Receiver<Outcome>,
    ) -> Outcome {
        // Compete for a connection until one takes the message, this caller's or another's.
        while queued.is_waiting() {
            let connection = tokio::select! {
                answered = &mut *outcome => return self.answer(answered, queued.deadline),
                connection = self.pool.get() => connection,
            };
            match connection {
                Ok(object) => {
                    if let Some(sent) = self.lead(object, queued).await {
                        return sent;
                    }
                }
                Err(err) if queued.withdraw() => {
                    return Err(match err {
                        PoolError::Backend(ConnectError::Smtp(err)) => SmtpSendError::Connect(err),
                        PoolError::Backend(ConnectError::TimedOut(wait)) => {
                            SmtpSendError::ConnectTimedOut(wait)
                        }
                        other => SmtpSendError::Pool(other.to_string()),
                    });
                }
                // Another caller's connection took the message meanwhile.
                Err(_) => {}
            }
        }
        let answered = outcome.await;
        self.answer(answered, queued.deadline)
    }

    /// A caller's outcome from the group that took its message; none (the group's task ended
    /// without answering it: it panicked or was dropped) is taken as a group given up.
    fn answer(&self, answered: Result<Outcome, RecvError>, deadline: Instant) -> Outcome {
        answered.unwrap_or_else(|_| {
            Err(if Instant::now() >= deadline {
                SmtpSendError::Unanswered
            } else {
                gave_up(self.group_timeout)
            })
        })
    }

    /// Sends the oldest waiting messages over `object`: the caller's own message alone, here,
    /// as a cancellable part of its call (its outcome is returned), or a group in a task of its
    /// own (`None`; the caller's message may be in it, or still wait if the group was full).
    async fn lead(&self, object: Object<Connector>, queued: &Queued<'_>) -> Option<Outcome> {
        let limit = if sends_groups_in_one_write(&object.connection) {
            MAX_GROUP
        } else {
            1
        };
        let mut group = self.take(limit);
        match group.len() {
            1 if group[0].id == queued.id => {
                let alone = group.remove(0);
                let limits = Limits {
                    timeout: self.group_timeout,
                    room: self.room,
                };
                Some(send_alone(Checkout(Some(object)), alone, limits).await)
            }
            0 => None,
            _ => {
                let limits = Limits {
                    timeout: self.group_timeout,
                    room: self.room,
                };
                tokio::spawn(send_group(Checkout(Some(object)), group, limits));
                None
            }
        }
    }

    /// Takes up to `limit` of the oldest waiting messages, and no more than [`MAX_GROUP_BYTES`]
    /// of them unless the first alone is larger. A message on the way whose deadline leaves too
    /// little room (see [`MIN_ROOM`]) is taken out and refused, unsent.
    fn take(&self, limit: usize) -> Vec<Waiting> {
        let mut queue = lock(&self.queue);
        let mut group = Vec::new();
        let mut bytes = 0;
        while group.len() < limit
            && let Some(next) = queue.waiting.pop_front()
        {
            if !next.has_room(self.room) {
                next.refuse_late(self.room);
                continue;
            }
            if !group.is_empty() && bytes + next.email.len() > MAX_GROUP_BYTES {
                queue.waiting.push_front(next);
                break;
            }
            bytes += next.email.len();
            group.push(next);
        }
        group
    }
}

/// Whether `connection` sends a group in one write (the server pipelines and takes chunks);
/// without, a group would go one message after another while other connections could take them.
fn sends_groups_in_one_write(connection: &AsyncSmtpConnection) -> bool {
    let server = connection.server_info();
    server.supports_feature(Extension::Pipelining) && server.supports_feature(Extension::Chunking)
}

/// The time bounds of a write of messages over one connection.
#[derive(Clone, Copy)]
struct Limits {
    /// How long the write may take (`channels.email.timeout_ms`).
    timeout: Duration,
    /// What a message's deadline must leave for it to be written (again).
    room: Duration,
}

/// Sends one message over `checkout`'s connection and gives the connection back if the server
/// accepted it, or lettre refused it before writing anything; on any other error, a timeout or
/// the caller giving up, the connection is closed. A
/// connection taken again from the pool that the server hung up on meanwhile (see
/// [`hung_up_unanswered`]) is replaced by a fresh one, and the message goes again over it, once,
/// within the same timeout, if its deadline leaves room for it.
async fn send_alone(mut checkout: Checkout, message: Waiting, limits: Limits) -> Outcome {
    metrics::histogram!("herald_smtp_group_messages").record(1.0);
    let outcome = tokio::time::timeout(
        limits.timeout,
        send_or_resend(&mut checkout, &message, limits.room),
    )
    .await
    .map_err(|_| gave_up(limits.timeout))?;
    let untouched = match &outcome {
        Ok(_) => true,
        Err(SmtpSendError::Smtp(err)) => err.is_client(),
        Err(_) => false,
    };
    if untouched {
        checkout.release();
    }
    outcome
}

/// Sends `message` over `checkout`'s connection, and once more over a fresh one if the server had
/// hung up on it while it sat in the pool (see [`hung_up_unanswered`]); not when lettre refused
/// it before writing anything (a client error), which a fresh connection would refuse alike.
async fn send_or_resend(checkout: &mut Checkout, message: &Waiting, room: Duration) -> Outcome {
    let reused = checkout.reused();
    let connection = checkout.connection();
    let before = connection.replies_read();
    match connection.send(&message.envelope, &message.email).await {
        Err(err)
            if reused
                && !err.is_client()
                && hung_up_unanswered(connection, before, err.status()) =>
        {
            if !message.has_room(room) {
                let left = time_left(message.deadline);
                return Err(SmtpSendError::TooLate { left, room });
            }
            tracing::debug!(
                error = %err,
                "SMTP connection closed by the server while pooled; sending again over a new one"
            );
            checkout.reconnect().await?;
            let connection = checkout.connection();
            Ok(connection.send(&message.envelope, &message.email).await?)
        }
        sent => Ok(sent?),
    }
}

/// Whether a send over a connection taken again from the pool failed before the server answered
/// any of its commands: nothing was read since `before` replies (the connection reset, or at its
/// end), or only a `421` (closing the connection) where the first MAIL's reply was due. A server
/// that restarted, or ended its idle sessions, since the connection's last message leaves it
/// looking open in the pool (within [`IDLE_CHECK`] it goes out without a NOOP), and its next
/// write fails so. Nothing of that write was accepted: its messages can go again, unlike those
/// of a connection that failed after a reply, whose outcome is unknown.
///
/// `refused` is the code of the send's refusal, if it was refused: the one reply read, if one was.
fn hung_up_unanswered(
    connection: &AsyncSmtpConnection,
    before: u64,
    refused: Option<Code>,
) -> bool {
    match connection.replies_read().saturating_sub(before) {
        0 => true,
        1 => refused.map(u16::from) == Some(421),
        _ => false,
    }
}

/// Whether `result` tells that the server answered its message's commands (its final reply, or
/// a refusal other than a `421`, which may be a hang-up's only word): the connection was alive.
fn proves_answered(result: &Result<Response, smtp::Error>) -> bool {
    match result {
        Ok(_) => true,
        Err(err) => server_answered(err),
    }
}

/// Whether `err` is the server's answer: a reply other than a `421`, which may be a hang-up's
/// only word.
fn server_answered(err: &smtp::Error) -> bool {
    err.status().is_some_and(|code| u16::from(code) != 421)
}

/// The error of a message whose send (alone or in a group) took longer than `timeout`.
fn gave_up(timeout: Duration) -> SmtpSendError {
    SmtpSendError::Pool(format!(
        "no reply within {} ms; the connection was closed",
        timeout.as_millis()
    ))
}

/// Sends `group` over `checkout`'s connection, answers each message's caller as soon as the
/// server's final reply to that message is read, and gives the connection back if its session is
/// still sound.
///
/// Past `limits.timeout`, or the latest of its messages' deadlines (when every caller has stopped
/// waiting), the connection is closed, and only the callers still unanswered get the
/// "no reply" error, as one incident of the connection (`Answers::give_up`): a message whose acceptance was read is
/// never reported failed, and sent again by a retry, because the messages after it went
/// unanswered. One still unanswered may have been delivered all the same (its reply late or
/// lost), which no SMTP client can tell.
///
/// A connection taken again from the pool that the server hung up on meanwhile (see
/// [`hung_up_unanswered`]) is replaced by a fresh one, and the group goes again over it, once,
/// within the same timeout, each message only if its deadline leaves room for it: its failures
/// are held back until a reply shows the connection alive.
async fn send_group(mut checkout: Checkout, group: Vec<Waiting>, limits: Limits) {
    metrics::histogram!("herald_smtp_group_messages").record(group.len() as f64);
    let reused = checkout.reused();
    let started = Instant::now();
    let last_deadline = group.iter().map(|waiting| waiting.deadline).max();
    let by = last_deadline.map_or(started, |last| last.min(started + limits.timeout));
    let mut messages = Vec::with_capacity(group.len());
    let mut replies = Vec::with_capacity(group.len());
    let mut deadlines = Vec::with_capacity(group.len());
    for waiting in group {
        messages.push((waiting.envelope, waiting.email));
        deadlines.push(waiting.deadline);
        replies.push(Some(waiting.reply));
    }
    let mut answers = Answers {
        replies,
        held: Vec::new(),
        holding: reused,
        incident: Incident::new(),
    };
    // Whether the connection was found hung up and left so, none of its messages going again.
    let mut left_hung_up = false;
    let send = async {
        let sending: Vec<(&Envelope, &[u8])> = messages
            .iter()
            .map(|(envelope, email)| (envelope, email.as_slice()))
            .collect();
        let connection = checkout.connection();
        let before = connection.replies_read();
        connection
            .send_many(&sending, |index, result| answers.give(index, result))
            .await;
        // Each failure is held while holding, the one reply read among them, if any.
        let refused = answers
            .held
            .iter()
            .find_map(|(_, result)| result.as_ref().err().and_then(smtp::Error::status));
        let hung_up = answers.holding
            && !answers.held.is_empty()
            && hung_up_unanswered(connection, before, refused);
        if !hung_up {
            answers.flush();
            return;
        }
        tracing::debug!(
            messages = answers.held.len(),
            "SMTP connection closed by the server while pooled; sending again over a new one"
        );
        let held: Vec<usize> = answers.held.drain(..).map(|(index, _)| index).collect();
        answers.holding = false;
        let soonest = Instant::now() + limits.room;
        let (again, late): (Vec<usize>, Vec<usize>) = held
            .into_iter()
            .partition(|&index| answers.waits(index) && soonest <= deadlines[index]);
        for index in late {
            let left = time_left(deadlines[index]);
            let room = limits.room;
            answers.answer(index, Err(SmtpSendError::TooLate { left, room }));
        }
        if again.is_empty() {
            left_hung_up = true;
            return;
        }
        if let Err(err) = checkout.reconnect().await {
            let reason = err.to_string();
            for &index in &again {
                answers.answer(index, Err(SmtpSendError::Reopen(reason.clone())));
            }
            return;
        }
        let sending: Vec<(&Envelope, &[u8])> = again.iter().map(|&index| sending[index]).collect();
        checkout
            .connection()
            .send_many(&sending, |at, result| answers.give(again[at], result))
            .await;
    };
    let finished = tokio::time::timeout_at(by, send).await.is_ok();
    // Held failures are real ones once the time is up.
    answers.flush();
    if !finished {
        answers.give_up(limits.timeout);
    }
    if finished && !left_hung_up && !checkout.connection().has_broken() {
        checkout.release();
    }
}

/// The callers of a group's messages, answered as their outcomes come in.
struct Answers {
    /// Each message's caller, until answered.
    replies: Vec<Option<oneshot::Sender<Outcome>>>,
    /// Failures not passed on yet, with their message's index (see [`Answers::holding`]).
    held: Vec<(usize, Result<Response, smtp::Error>)>,
    /// Whether failures are held back: over a connection taken again from the pool, until an
    /// outcome shows the server answered (see [`proves_answered`]).
    holding: bool,
    /// The event of the connection, shared by the failures that are its own rather than their
    /// message's (see [`SmtpSendError::Group`]).
    incident: Incident,
}

impl Answers {
    /// Takes the outcome of message `index`: held back, or passed on with those held before it. A
    /// refusal of lettre's own, before anything of the message was written (a local part needing
    /// SMTPUTF8 the server lacks), is passed on at once: no hang-up explains it, and it tells
    /// nothing of the connection.
    fn give(&mut self, index: usize, result: Result<Response, smtp::Error>) {
        if let Err(err) = &result
            && err.is_client()
        {
            self.answer(index, result.map_err(SmtpSendError::Smtp));
            return;
        }
        if self.holding && !proves_answered(&result) {
            self.held.push((index, result));
            return;
        }
        self.flush();
        self.answer(index, result.map_err(SmtpSendError::Smtp));
    }

    /// Passes on the failures held back, and holds back no more.
    fn flush(&mut self) {
        self.holding = false;
        for (index, result) in std::mem::take(&mut self.held) {
            self.answer(index, result.map_err(SmtpSendError::Smtp));
        }
    }

    /// Whether message `index`'s caller still waits for its outcome.
    fn waits(&self, index: usize) -> bool {
        self.replies
            .get(index)
            .and_then(Option::as_ref)
            .is_some_and(|reply| !reply.is_closed())
    }

    /// Answers every caller still unanswered once the group was given up after `timeout`.
    fn give_up(&mut self, timeout: Duration) {
        for index in 0..self.replies.len() {
            self.answer(index, Err(gave_up(timeout)));
        }
    }

    /// Answers message `index`'s caller, unless it was answered already; a failure of the
    /// connection's rather than the message's as part of the connection's event.
    fn answer(&mut self, index: usize, outcome: Outcome) {
        if let Some(reply) = self.replies.get_mut(index).and_then(Option::take) {
            let incident = self.incident;
            let _ = reply.send(outcome.map_err(|error| {
                if error.of_the_connection() {
                    SmtpSendError::Group {
                        error: Box::new(error),
                        incident,
                    }
                } else {
                    error
                }
            }));
        }
    }
}

/// A caller's message in the queue: taken out again when the caller gives up before a connection
/// took it.
struct Queued<'a> {
    queue: &'a Mutex<Queue>,
    id: u64,
    deadline: Instant,
}

impl<'a> Queued<'a> {
    fn push(
        queue: &'a Mutex<Queue>,
        envelope: Envelope,
        email: Vec<u8>,
        deadline: Instant,
        reply: oneshot::Sender<Outcome>,
    ) -> Self {
        let mut locked = lock(queue);
        let id = locked.next_id;
        locked.next_id += 1;
        locked.waiting.push_back(Waiting {
            id,
            envelope,
            email,
            deadline,
            reply,
        });
        Self {
            queue,
            id,
            deadline,
        }
    }

    /// Whether the message still waits for a connection.
    fn is_waiting(&self) -> bool {
        lock(self.queue)
            .waiting
            .iter()
            .any(|waiting| waiting.id == self.id)
    }

    /// Takes the message out of the queue; `false` if a connection took it already.
    fn withdraw(&self) -> bool {
        let mut queue = lock(self.queue);
        match queue
            .waiting
            .iter()
            .position(|waiting| waiting.id == self.id)
        {
            Some(at) => queue.waiting.remove(at).is_some(),
            None => false,
        }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.withdraw();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // What these mutexes guard is consistent between statements: a panic elsewhere cannot leave
    // it half-changed.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A connection taken from the pool. It goes back only through [`Checkout::release`], after a
/// message went through; dropped otherwise (an error, or the send cancelled half-way), the
/// connection is taken out of the pool and closed.
struct Checkout(Option<Object<Connector>>);

impl Checkout {
    /// The connection, held from the checkout until it is released or dropped.
    fn connection(&mut self) -> &mut AsyncSmtpConnection {
        &mut self
            .0
            .as_deref_mut()
            .expect("a checkout holds its connection until it is released")
            .connection
    }

    /// Whether the connection was taken from the pool before, rather than opened for this
    /// checkout.
    fn reused(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|object| Object::metrics(object).recycle_count > 0)
    }

    /// Replaces the connection with a new one, opened as the pool opens one (within the connect
    /// timeout); the old one, failed, is dropped. The checkout keeps its room in the pool.
    async fn reconnect(&mut self) -> Result<(), SmtpSendError> {
        let object = self
            .0
            .as_mut()
            .expect("a checkout holds its connection until it is released");
        let pool = Object::pool(object)
            .ok_or_else(|| SmtpSendError::Pool("the pool was closed".into()))?;
        let fresh = pool
            .manager()
            .server
            .connect()
            .await
            .map_err(|err| match err {
                ConnectError::Smtp(err) => SmtpSendError::Connect(err),
                ConnectError::TimedOut(wait) => SmtpSendError::ConnectTimedOut(wait),
                other @ ConnectError::Unneeded => SmtpSendError::Pool(other.to_string()),
            })?;
        object.connection = fresh;
        Ok(())
    }

    /// Gives the connection back to the pool, noting when (its idle time counts from now).
    fn release(mut self) {
        if let Some(mut object) = self.0.take() {
            object.returned = Instant::now();
            // Dropping the object hands it back to the pool.
            drop(object);
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(Object::take(object));
        }
    }
}
