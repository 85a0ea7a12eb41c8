//! A small, real SMTP server (RFC 5321 without TLS or AUTH) that keeps every message
//! it accepts, so tests can check what Herald's email provider sent.
//!
//! It speaks EHLO/HELO, MAIL FROM, RCPT TO, DATA (dot-unstuffing, `CRLF.CRLF`), BDAT
//! (RFC 3030 chunks), RSET, NOOP and QUIT, advertises `8BITMIME`, `SIZE`, `PIPELINING` and
//! `CHUNKING` as Postfix does (fewer with [`SmtpSink::start_without_chunking`] and
//! [`SmtpSink::start_without_pipelining`]), answers anything else with 502 and keeps the
//! connection. Failures can be injected: rejected recipients or
//! messages ([`SmtpSink::set_reject_next`]), an outage ([`SmtpSink::set_pause`]), a relay
//! that hangs ([`SmtpSink::set_stall_after`]) and one that restarts, ending its sessions
//! ([`SmtpSink::set_hang_up_after`]).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Largest message the sink accepts, advertised with `SIZE`.
pub const MAX_MESSAGE_SIZE: usize = 10 * 1024 * 1024;
/// Longest command line accepted (RFC 5321 asks for at least 512 octets).
const MAX_COMMAND_LINE: u64 = 4096;
/// Name the sink uses in its greeting and EHLO reply.
const SERVER_NAME: &str = "herald-smtp-sink";

/// One message the sink accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// The envelope sender (`MAIL FROM`), empty for the null sender `<>`.
    pub from: String,
    /// The envelope recipients (`RCPT TO`) that were accepted, in order.
    pub to: Vec<String>,
    /// The raw RFC 5322 message after dot-unstuffing, CRLF line endings kept
    /// (bytes that are not UTF-8 are replaced with U+FFFD).
    pub data: String,
    /// The `Message-ID` header without its angle brackets.
    pub message_id: Option<String>,
    /// The `Subject` header with RFC 2047 encoded words decoded.
    pub subject: Option<String>,
    /// When the sink accepted it (end of `DATA`).
    pub received_at: std::time::Instant,
}

impl ReceivedMail {
    /// Builds a record from the envelope and the raw message, parsing the headers.
    fn new(from: String, to: Vec<String>, data: String) -> Self {
        let parsed = mail_parser::MessageParser::default().parse(data.as_bytes());
        let message_id = parsed
            .as_ref()
            .and_then(|message| message.message_id())
            .map(str::to_owned);
        let subject = parsed
            .as_ref()
            .and_then(|message| message.subject())
            .map(str::to_owned);
        Self {
            from,
            to,
            data,
            message_id,
            subject,
            received_at: std::time::Instant::now(),
        }
    }

    /// Parses the raw message with `mail-parser`, for checks the helpers below lack.
    pub fn parsed(&self) -> Option<mail_parser::Message<'_>> {
        mail_parser::MessageParser::default().parse(self.data.as_bytes())
    }

    /// The first text/plain body, with its transfer encoding (quoted-printable, base64)
    /// and charset decoded; derived from the HTML body when there is no text part.
    pub fn text_body(&self) -> Option<String> {
        let message = self.parsed()?;
        message.body_text(0).map(|body| body.into_owned())
    }

    /// The first text/html body, decoded like [`ReceivedMail::text_body`].
    pub fn html_body(&self) -> Option<String> {
        let message = self.parsed()?;
        message.body_html(0).map(|body| body.into_owned())
    }

    /// The raw (undecoded, unfolded as sent) value of the first header called `name`,
    /// trimmed; the name is case-insensitive.
    pub fn header(&self, name: &str) -> Option<String> {
        let message = self.parsed()?;
        message
            .headers_raw()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim().to_owned())
    }
}

/// Where an injected rejection is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectStage {
    /// The reply to `MAIL FROM`: the sender is refused (e.g. 530 authentication required, 553
    /// sender address not owned by the user).
    Mail,
    /// The reply to `RCPT TO`: the recipient is refused (e.g. 451 greylisting, 550 no such user).
    Rcpt,
    /// The final reply after the message content (`CRLF.CRLF`, the last BDAT chunk): the
    /// message is refused and not stored.
    Data,
}

/// How a session the sink hangs up on ends (see [`SmtpSink::set_hang_up_after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HangUp {
    /// The connection is closed at once, without a word, as a relay's process that restarts
    /// ends it.
    Silently,
    /// The client's next command is answered `421` and the connection closed, as a relay
    /// shutting down says (RFC 5321 section 3.8).
    With421,
}

/// A planned answer to a command at `stage`: the injected reply (`code text`), or `None` for
/// the usual one.
#[derive(Debug, Clone)]
struct Planned {
    stage: RejectStage,
    reply: Option<String>,
}

/// State shared by the sink handle, the accept loop and the sessions.
#[derive(Debug)]
struct Shared {
    messages: Mutex<Vec<ReceivedMail>>,
    /// Number of stored messages, for event-driven waits.
    count: watch::Sender<usize>,
    /// The planned answers still to give, in order.
    planned: Mutex<VecDeque<Planned>>,
    paused: AtomicBool,
    /// How many more messages are answered before the sink stops answering (see
    /// [`SmtpSink::set_stall_after`]); `None`: no stall planned.
    stall_after: Mutex<Option<usize>>,
    /// How many more messages are answered before the session that answers the last of them
    /// hangs up, and how (see [`SmtpSink::set_hang_up_after`]).
    hang_up_after: Mutex<Option<(usize, HangUp)>>,
    connections: AtomicU64,
    noops: AtomicU64,
    /// Commands read while the client had already sent the next one (see
    /// [`SmtpSink::pipelined_count`]).
    pipelined: AtomicU64,
    /// Messages stored from BDAT chunks rather than DATA.
    chunked: AtomicU64,
    /// Messages whose chunk had the next transaction behind it (see [`SmtpSink::grouped_count`]).
    grouped: AtomicU64,
    queue_ids: AtomicU64,
    /// What EHLO offers.
    offers: Offers,
}

/// The optional extensions EHLO offers.
#[derive(Debug, Clone, Copy)]
struct Offers {
    pipelining: bool,
    chunking: bool,
}

impl Shared {
    /// Takes the next planned answer for `stage`: the injected reply, if one is due.
    fn take_rejection(&self, stage: RejectStage) -> Option<String> {
        let mut planned = lock(&self.planned);
        if planned.front().is_some_and(|next| next.stage == stage) {
            planned.pop_front().and_then(|answer| answer.reply)
        } else {
            None
        }
    }

    /// Stores a message and wakes the waiters.
    fn store(&self, mail: ReceivedMail) {
        let count = {
            let mut messages = lock(&self.messages);
            messages.push(mail);
            messages.len()
        };
        self.count.send_replace(count);
    }

    /// Whether the sink has stopped answering (see [`SmtpSink::set_stall_after`]).
    fn stalled(&self) -> bool {
        *lock(&self.stall_after) == Some(0)
    }

    /// Counts an accepted message toward a planned stall and a planned hang-up; returns how the
    /// session that answered it hangs up, if this was the last message before it does.
    fn answered_one(&self) -> Option<HangUp> {
        if let Some(left) = lock(&self.stall_after).as_mut() {
            *left = left.saturating_sub(1);
        }
        let mut hang_up = lock(&self.hang_up_after);
        match hang_up.as_mut() {
            Some((left, _)) if *left > 1 => {
                *left -= 1;
                None
            }
            Some(_) => hang_up.take().map(|(_, how)| how),
            None => None,
        }
    }
}

/// An SMTP server on `127.0.0.1` (random port) that stores what it receives.
///
/// Connections are served concurrently. Dropping the sink closes the listener and
/// every open connection.
#[derive(Debug)]
pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl SmtpSink {
    /// Binds `127.0.0.1:0` and starts serving, offering PIPELINING and CHUNKING.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_offering(Offers {
            pipelining: true,
            chunking: true,
        })
        .await
    }

    /// Like [`SmtpSink::start`], but EHLO does not offer CHUNKING, so a client sends its
    /// messages with DATA.
    pub async fn start_without_chunking() -> anyhow::Result<Self> {
        Self::start_offering(Offers {
            pipelining: true,
            chunking: false,
        })
        .await
    }

    /// Like [`SmtpSink::start`], but EHLO offers neither PIPELINING nor CHUNKING, so a client
    /// must wait for every reply before its next command.
    pub async fn start_without_pipelining() -> anyhow::Result<Self> {
        Self::start_offering(Offers {
            pipelining: false,
            chunking: false,
        })
        .await
    }

    async fn start_offering(offers: Offers) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the SMTP sink on 127.0.0.1:0")?;
        let addr = listener
            .local_addr()
            .context("reading the SMTP sink address")?;
        let (count, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            messages: Mutex::new(Vec::new()),
            count,
            planned: Mutex::new(VecDeque::new()),
            paused: AtomicBool::new(false),
            stall_after: Mutex::new(None),
            hang_up_after: Mutex::new(None),
            connections: AtomicU64::new(0),
            noops: AtomicU64::new(0),
            pipelined: AtomicU64::new(0),
            grouped: AtomicU64::new(0),
            chunked: AtomicU64::new(0),
            queue_ids: AtomicU64::new(0),
            offers,
        });
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            addr,
            shared,
            accept_task,
        })
    }

    /// The host to connect to, `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The port the sink listens on; it stays the same across pauses.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The socket address the sink listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of every message accepted so far, in arrival order.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        lock(&self.shared.messages).clone()
    }

    /// How many messages were accepted so far.
    pub fn count(&self) -> usize {
        lock(&self.shared.messages).len()
    }

    /// How many TCP connections were accepted so far (to observe connection reuse).
    pub fn connection_count(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// How many NOOP commands were received so far (to observe connection checks).
    pub fn noop_count(&self) -> u64 {
        self.shared.noops.load(Ordering::Relaxed)
    }

    /// How many commands arrived together with the client's next one, i.e. before their reply
    /// was sent: zero for a client that waits for every reply, two per message for a client
    /// that pipelines MAIL, RCPT and DATA or BDAT (a BDAT line, always followed by its chunk, is
    /// not counted itself).
    pub fn pipelined_count(&self) -> u64 {
        self.shared.pipelined.load(Ordering::Relaxed)
    }

    /// How many of the accepted messages came in BDAT chunks (RFC 3030) rather than with DATA.
    pub fn chunked_count(&self) -> u64 {
        self.shared.chunked.load(Ordering::Relaxed)
    }

    /// How many accepted messages had the client's next transaction already behind their chunk,
    /// sent before their reply: zero for a client that sends one message per round trip.
    pub fn grouped_count(&self) -> u64 {
        self.shared.grouped.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` messages were accepted and returns all of them.
    /// Wakes on each stored message (no polling); fails after `timeout` with what did arrive.
    pub async fn wait_for_count(
        &self,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ReceivedMail>> {
        let mut count = self.shared.count.subscribe();
        let reached = tokio::time::timeout(timeout, count.wait_for(|count| *count >= n)).await;
        match reached {
            Ok(Ok(_)) => Ok(self.messages()),
            Ok(Err(_)) => bail!("the SMTP sink stopped while waiting for {n} messages"),
            Err(_) => {
                let messages = self.messages();
                let subjects: Vec<_> = messages
                    .iter()
                    .map(|mail| mail.subject.as_deref().unwrap_or("(no subject)"))
                    .collect();
                Err(anyhow!(
                    "timed out after {timeout:?} waiting for {n} messages in the SMTP sink; got {}: {subjects:?}",
                    messages.len()
                ))
            }
        }
    }

    /// Makes the next `n` `RCPT TO` commands (on any connection) answer `code text`
    /// instead of 250: a 4xx code is a transient failure (e.g. 451), a 5xx code a
    /// permanent one (e.g. 550); a 421 also closes the connection. Replaces any rejection
    /// still pending.
    ///
    /// # Panics
    ///
    /// When `code` is not a 4xx or 5xx reply code.
    pub fn set_reject_next(&self, n: usize, code: u16, text: &str) {
        self.set_reject_next_at(RejectStage::Rcpt, n, code, text);
    }

    /// Like [`SmtpSink::set_reject_next`], choosing where the rejection is answered.
    ///
    /// # Panics
    ///
    /// When `code` is not a 4xx or 5xx reply code.
    pub fn set_reject_next_at(&self, stage: RejectStage, n: usize, code: u16, text: &str) {
        self.plan(stage, 0, n, code, text);
    }

    /// Makes the `n`-th `RCPT TO` command from now (counting from 1, on any connection) answer
    /// `code text`, the ones before it 250 as usual. Replaces any rejection still pending.
    ///
    /// # Panics
    ///
    /// When `code` is not a 4xx or 5xx reply code, or `n` is 0.
    pub fn set_reject_nth(&self, n: usize, code: u16, text: &str) {
        assert!(n > 0, "commands are counted from 1");
        self.plan(RejectStage::Rcpt, n - 1, 1, code, text);
    }

    /// Plans the next `accepted + rejected` answers at `stage`: `accepted` usual ones, then
    /// `rejected` times `code text`.
    fn plan(&self, stage: RejectStage, accepted: usize, rejected: usize, code: u16, text: &str) {
        assert!(
            (400..600).contains(&code),
            "an injected rejection needs a 4xx or 5xx code, got {code}"
        );
        let answer = |reply| Planned { stage, reply };
        let reply = format!("{code} {}", text.replace(['\r', '\n'], " "));
        let mut planned = lock(&self.shared.planned);
        planned.clear();
        planned.extend(std::iter::repeat_n(answer(None), accepted));
        planned.extend(std::iter::repeat_n(answer(Some(reply)), rejected));
    }

    /// Simulates a relay that hangs: the next `n` messages are accepted as usual, and from then
    /// on, until the sink is dropped, every session reads what it is sent and answers nothing
    /// (new connections get no greeting). What a client wrote after the `n`-th message is not
    /// stored.
    pub fn set_stall_after(&self, n: usize) {
        *lock(&self.shared.stall_after) = Some(n);
    }

    /// Simulates a relay that restarts while a client keeps its connection open between
    /// messages: the next `n` messages (`n` at least 1) are accepted as usual, and the session
    /// that accepted the `n`-th then hangs up as `how` says, after its reply to that message;
    /// the sink keeps accepting new connections. Replaces any hang-up still planned.
    ///
    /// # Panics
    ///
    /// When `n` is 0.
    pub fn set_hang_up_after(&self, n: usize, how: HangUp) {
        assert!(n > 0, "messages are counted from 1");
        *lock(&self.shared.hang_up_after) = Some((n, how));
    }

    /// Simulates an outage. `true` resets every new connection at once (as a refused one: no
    /// greeting) and makes open connections answer their next command with 421 and close;
    /// `false` serves again. The port stays this sink's throughout: it used to be released while
    /// paused, and another test's server could bind it and take this one's mail.
    pub fn set_pause(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::SeqCst);
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        // The accept task owns the sessions' JoinSet, so this ends them all.
        self.accept_task.abort();
    }
}

/// Locks a mutex, ignoring poisoning (a panicking test thread must not hide the data).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Accepts connections until the sink is dropped; while paused, resets each at once.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if shared.paused.load(Ordering::SeqCst) => {
                    // Closed with a reset, not a goodbye: the client finds no server there.
                    let _ = stream.set_zero_linger();
                }
                Ok((stream, _)) => {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    sessions.spawn(serve(stream, Arc::clone(&shared)));
                }
                Err(error) => tracing::warn!(%error, "SMTP sink accept failed"),
            },
            Some(finished) = sessions.join_next() => {
                if let Err(error) = finished
                    && error.is_panic()
                {
                    tracing::error!(%error, "SMTP sink session panicked");
                }
            }
        }
    }
}

/// The mail transaction in progress on a connection.
#[derive(Debug, Default)]
struct Transaction {
    from: Option<String>,
    to: Vec<String>,
    /// The BDAT chunks received so far.
    chunks: Vec<u8>,
    /// Whether the chunks outgrew [`MAX_MESSAGE_SIZE`] (the rest is read and dropped).
    too_big: bool,
}

/// Serves one connection until QUIT, EOF, an I/O error or a pause.
async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    if let Err(error) = Session::new(stream, shared).run().await {
        tracing::debug!(error = %format!("{error:#}"), "SMTP sink session ended with an error");
    }
}

/// One SMTP connection.
struct Session {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    greeted: bool,
    transaction: Transaction,
    /// A 421 was answered: the session ends.
    closing: bool,
    /// The session hangs up, as planned with [`SmtpSink::set_hang_up_after`].
    hang_up: Option<HangUp>,
}

/// The command that carried a message's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Data,
    Bdat,
}

/// What the session does after a command.
enum Next {
    Continue,
    Close,
}

impl Session {
    fn new(stream: TcpStream, shared: Arc<Shared>) -> Self {
        // Replies are small and must go out at once.
        let _ = stream.set_nodelay(true);
        let (read, writer) = stream.into_split();
        Self {
            reader: BufReader::new(read),
            writer,
            shared,
            greeted: false,
            transaction: Transaction::default(),
            closing: false,
            hang_up: None,
        }
    }

    async fn run(mut self) -> anyhow::Result<()> {
        if self.shared.stalled() {
            return self.stall().await;
        }
        self.reply(&format!("220 {SERVER_NAME} ESMTP ready"))
            .await?;
        loop {
            if self.shared.stalled() {
                return self.stall().await;
            }
            if self.hang_up == Some(HangUp::Silently) {
                return Ok(());
            }
            let Some(line) = self.read_command_line().await? else {
                return Ok(());
            };
            if self.shared.paused.load(Ordering::SeqCst) || self.hang_up == Some(HangUp::With421) {
                self.reply("421 4.3.2 Service not available, closing transmission channel")
                    .await?;
                return Ok(());
            }
            let Some(line) = line else {
                self.reply("500 5.5.6 Line too long").await?;
                continue;
            };
            // A BDAT line always has its chunk behind it: it counts only through the commands
            // before it.
            let is_bdat = line
                .get(..4)
                .is_some_and(|verb| verb.eq_ignore_ascii_case("BDAT"));
            if !self.reader.buffer().is_empty() && !is_bdat {
                self.shared.pipelined.fetch_add(1, Ordering::Relaxed);
            }
            let next = self.command(&line).await?;
            if matches!(next, Next::Close) || self.closing {
                return Ok(());
            }
        }
    }

    /// Reads and drops whatever the client sends, answering nothing, until it closes the
    /// connection.
    async fn stall(&mut self) -> anyhow::Result<()> {
        tokio::io::copy_buf(&mut self.reader, &mut tokio::io::sink())
            .await
            .context("reading while stalled")?;
        Ok(())
    }

    /// Reads one command line without its line ending. `Ok(None)` on EOF,
    /// `Ok(Some(None))` for a line longer than [`MAX_COMMAND_LINE`] (discarded).
    async fn read_command_line(&mut self) -> anyhow::Result<Option<Option<String>>> {
        let mut bytes = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_COMMAND_LINE)
            .read_until(b'\n', &mut bytes)
            .await
            .context("reading a command")?;
        if read == 0 {
            return Ok(None);
        }
        if bytes.last() != Some(&b'\n') {
            if (read as u64) < MAX_COMMAND_LINE {
                // EOF in the middle of a line.
                return Ok(None);
            }
            let mut rest = Vec::new();
            if self.reader.read_until(b'\n', &mut rest).await? == 0 {
                return Ok(None);
            }
            return Ok(Some(None));
        }
        let text = String::from_utf8_lossy(&bytes);
        Ok(Some(Some(text.trim_end_matches(['\r', '\n']).to_owned())))
    }

    /// Writes a reply; a 421 ends the session after it, as a server shutting down does (RFC 5321
    /// section 3.8).
    async fn reply(&mut self, line: &str) -> anyhow::Result<()> {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .context("writing a reply")?;
        self.closing |= line.starts_with("421");
        Ok(())
    }

    async fn command(&mut self, line: &str) -> anyhow::Result<Next> {
        let (verb, argument) = match line.split_once(' ') {
            Some((verb, argument)) => (verb, argument.trim()),
            None => (line, ""),
        };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" | "HELO" if argument.is_empty() => {
                self.reply(&format!("501 5.5.4 Syntax: {verb} hostname"))
                    .await?;
            }
            "EHLO" => {
                self.greeted = true;
                self.transaction = Transaction::default();
                let offers = self.shared.offers;
                let pipelining = if offers.pipelining {
                    "250-PIPELINING\r\n"
                } else {
                    ""
                };
                let chunking = if offers.chunking {
                    "250-CHUNKING\r\n"
                } else {
                    ""
                };
                let reply = format!(
                    "250-{SERVER_NAME} greets {argument}\r\n250-8BITMIME\r\n{pipelining}{chunking}250 SIZE {MAX_MESSAGE_SIZE}"
                );
                self.reply(&reply).await?;
            }
            "HELO" => {
                self.greeted = true;
                self.transaction = Transaction::default();
                self.reply(&format!("250 {SERVER_NAME}")).await?;
            }
            "MAIL" => self.mail(argument).await?,
            "RCPT" => self.rcpt(argument).await?,
            "DATA" if !argument.is_empty() => {
                self.reply("501 5.5.4 Syntax: DATA takes no argument")
                    .await?;
            }
            "DATA" => self.data().await?,
            "BDAT" if self.shared.offers.chunking => return self.bdat(argument).await,
            "RSET" => {
                self.transaction = Transaction::default();
                self.reply("250 2.0.0 Ok").await?;
            }
            "NOOP" => {
                self.shared.noops.fetch_add(1, Ordering::Relaxed);
                self.reply("250 2.0.0 Ok").await?
            }
            "QUIT" => {
                self.reply("221 2.0.0 Bye").await?;
                return Ok(Next::Close);
            }
            "" => self.reply("500 5.5.2 Syntax error, empty command").await?,
            _ => {
                self.reply("502 5.5.1 Command not implemented").await?;
            }
        }
        Ok(Next::Continue)
    }

    async fn mail(&mut self, argument: &str) -> anyhow::Result<()> {
        if !self.greeted {
            return self.reply("503 5.5.1 Send EHLO or HELO first").await;
        }
        if self.transaction.from.is_some() {
            return self.reply("503 5.5.1 Nested MAIL command").await;
        }
        let Some((address, parameters)) = parse_path(argument, "FROM:") else {
            return self.reply("501 5.5.4 Syntax: MAIL FROM:<address>").await;
        };
        for parameter in parameters.split_whitespace() {
            let (key, value) = parameter.split_once('=').unwrap_or((parameter, ""));
            match key.to_ascii_uppercase().as_str() {
                "SIZE" => match value.parse::<usize>() {
                    Ok(size) if size > MAX_MESSAGE_SIZE => {
                        return self
                            .reply("552 5.3.4 Message size exceeds fixed maximum message size")
                            .await;
                    }
                    Ok(_) => {}
                    Err(_) => return self.reply("501 5.5.4 Bad SIZE parameter").await,
                },
                "BODY"
                    if value.eq_ignore_ascii_case("7BIT")
                        || value.eq_ignore_ascii_case("8BITMIME") => {}
                _ => {
                    return self
                        .reply("555 5.5.4 MAIL FROM parameters not recognized or not implemented")
                        .await;
                }
            }
        }
        if let Some(reply) = self.shared.take_rejection(RejectStage::Mail) {
            return self.reply(&reply).await;
        }
        self.transaction.from = Some(address);
        self.reply("250 2.1.0 Ok").await
    }

    async fn rcpt(&mut self, argument: &str) -> anyhow::Result<()> {
        if self.transaction.from.is_none() {
            return self.reply("503 5.5.1 Need MAIL command first").await;
        }
        let Some((address, parameters)) = parse_path(argument, "TO:") else {
            return self.reply("501 5.5.4 Syntax: RCPT TO:<address>").await;
        };
        if address.is_empty() {
            return self.reply("501 5.1.3 Empty recipient address").await;
        }
        if !parameters.is_empty() {
            return self
                .reply("555 5.5.4 RCPT TO parameters not recognized or not implemented")
                .await;
        }
        if let Some(reply) = self.shared.take_rejection(RejectStage::Rcpt) {
            return self.reply(&reply).await;
        }
        self.transaction.to.push(address);
        self.reply("250 2.1.5 Ok").await
    }

    async fn data(&mut self) -> anyhow::Result<()> {
        let Some(from) = self.transaction.from.clone() else {
            return self.reply("503 5.5.1 Need MAIL command first").await;
        };
        if !self.transaction.chunks.is_empty() {
            // RFC 3030 section 2: DATA may not follow BDAT in a transaction.
            self.transaction = Transaction::default();
            return self.reply("503 5.5.1 DATA after BDAT").await;
        }
        if self.transaction.to.is_empty() {
            return self.reply("554 5.5.1 No valid recipients").await;
        }
        self.reply("354 End data with <CR><LF>.<CR><LF>").await?;
        let mut message = Vec::new();
        let mut too_big = false;
        loop {
            let mut line = Vec::new();
            if self
                .reader
                .read_until(b'\n', &mut line)
                .await
                .context("reading message content")?
                == 0
            {
                bail!("connection closed in the middle of DATA");
            }
            if line == b".\r\n" || line == b".\n" {
                break;
            }
            // Dot-unstuffing (RFC 5321 4.5.2): a leading dot was doubled by the client.
            let content = line.strip_prefix(b".").unwrap_or(&line);
            if message.len() + content.len() > MAX_MESSAGE_SIZE {
                too_big = true;
            } else if !too_big {
                message.extend_from_slice(content);
            }
        }
        let to = std::mem::take(&mut self.transaction.to);
        self.transaction = Transaction::default();
        self.finish(from, to, &message, too_big, Command::Data)
            .await
    }

    /// `BDAT <size> [LAST]` (RFC 3030): reads the chunk's `size` octets as they are, whatever
    /// the state of the transaction (the client does not wait for a reply before sending them),
    /// then answers; the last chunk completes the message as the end of DATA does. A malformed
    /// BDAT leaves the chunk's end unknown, so the connection is closed.
    async fn bdat(&mut self, argument: &str) -> anyhow::Result<Next> {
        let mut words = argument.split_whitespace();
        let size = words.next().and_then(|size| size.parse::<u64>().ok());
        let last = words.next().map(|word| word.eq_ignore_ascii_case("LAST"));
        let (Some(size), None | Some(true), None) = (size, last, words.next()) else {
            self.reply("501 5.5.4 Syntax: BDAT size [LAST]").await?;
            return Ok(Next::Close);
        };
        let room = MAX_MESSAGE_SIZE.saturating_sub(self.transaction.chunks.len()) as u64;
        let mut content = (&mut self.reader).take(size);
        let read = if size > room {
            tokio::io::copy_buf(&mut content, &mut tokio::io::sink()).await
        } else {
            let chunks = &mut self.transaction.chunks;
            content.read_to_end(chunks).await.map(|read| read as u64)
        }
        .context("reading a BDAT chunk")?;
        if read < size {
            bail!("connection closed in the middle of a BDAT chunk");
        }
        self.transaction.too_big |= size > room;

        let Some(from) = self.transaction.from.clone() else {
            self.transaction = Transaction::default();
            self.reply("503 5.5.1 Need MAIL command first").await?;
            return Ok(Next::Continue);
        };
        if self.transaction.to.is_empty() {
            self.transaction = Transaction::default();
            self.reply("554 5.5.1 No valid recipients").await?;
            return Ok(Next::Continue);
        }
        if last.is_none() {
            self.reply(&format!("250 2.0.0 {size} octets received"))
                .await?;
            return Ok(Next::Continue);
        }
        let transaction = std::mem::take(&mut self.transaction);
        self.finish(
            from,
            transaction.to,
            &transaction.chunks,
            transaction.too_big,
            Command::Bdat,
        )
        .await?;
        Ok(Next::Continue)
    }

    /// Answers a complete message (end of DATA, last BDAT chunk): refuses it if it was too big
    /// or a rejection is pending, stores and counts it otherwise (before the reply, so a client
    /// that has its reply finds it counted).
    async fn finish(
        &mut self,
        from: String,
        to: Vec<String>,
        message: &[u8],
        too_big: bool,
        command: Command,
    ) -> anyhow::Result<()> {
        if too_big {
            return self
                .reply("552 5.3.4 Message size exceeds fixed maximum message size")
                .await;
        }
        if let Some(reply) = self.shared.take_rejection(RejectStage::Data) {
            return self.reply(&reply).await;
        }
        if command == Command::Bdat {
            self.shared.chunked.fetch_add(1, Ordering::Relaxed);
            if !self.reader.buffer().is_empty() {
                self.shared.grouped.fetch_add(1, Ordering::Relaxed);
            }
        }
        let data = String::from_utf8_lossy(message).into_owned();
        self.shared.store(ReceivedMail::new(from, to, data));
        let queue_id = self.shared.queue_ids.fetch_add(1, Ordering::Relaxed) + 1;
        self.reply(&format!("250 2.0.0 Ok: queued as {queue_id:08X}"))
            .await?;
        if let Some(how) = self.shared.answered_one() {
            self.hang_up = Some(how);
        }
        Ok(())
    }
}

/// Parses `FROM:<address> params` / `TO:<address> params` (prefix case-insensitive,
/// spaces after the colon tolerated). Returns the address without brackets and the
/// parameter text.
fn parse_path<'a>(argument: &'a str, prefix: &str) -> Option<(String, &'a str)> {
    let head = argument.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = argument[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    let address = &rest[..end];
    if address.contains(char::is_whitespace) {
        return None;
    }
    // A source route (`@a,@b:user@c`) is obsolete; keep only the mailbox.
    let address = match address.split_once(':') {
        Some((route, mailbox)) if route.starts_with('@') => mailbox,
        _ => address,
    };
    Some((address.to_owned(), rest[end + 1..].trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_path_reads_address_and_parameters() {
        assert_eq!(
            parse_path("FROM:<a@b.c> SIZE=10 BODY=8BITMIME", "FROM:"),
            Some(("a@b.c".to_owned(), "SIZE=10 BODY=8BITMIME"))
        );
        assert_eq!(parse_path("from: <>", "FROM:"), Some((String::new(), "")));
        assert_eq!(
            parse_path("TO:<@relay.example:u@d.example>", "TO:"),
            Some(("u@d.example".to_owned(), ""))
        );
        assert_eq!(parse_path("TO:u@d.example", "TO:"), None);
        assert_eq!(parse_path("FROM:<a@b.c>", "TO:"), None);
        assert_eq!(parse_path("T", "TO:"), None);
    }
}
