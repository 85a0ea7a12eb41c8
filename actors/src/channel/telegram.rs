//! Telegram through the Bot API: `POST {base}/bot{token}/sendMessage`.
//!
//! The bot token is part of the URL, so it is kept out of every error and log line: reqwest errors
//! lose their URL before they become reasons, and any reason is scrubbed of the token once more.
//!
//! The Bot API answers 429 "Too Many Requests: retry after N" both to one chat's flood control
//! (about one message a second to a chat, twenty a minute to a group) and to the bot's own limit
//! (about thirty messages a second in all), with nothing in the reply to tell them apart. A 429
//! throttles its chat; 429s for 3 distinct chats within 2 s (`ACCOUNT_WIDE_CHATS`,
//! `ACCOUNT_WIDE_WINDOW`) are taken for the bot's limit, and the last of them throttles the whole
//! bot ([`ProviderError::AccountThrottled`]): the channel then holds every send until its
//! `retry_after` has passed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use herald_nats::Channel;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use super::http;
use super::provider::time_left;
use super::{ContactMove, OutboundMessage, Provider, ProviderError, Receipt};

/// The least time a send must have left to follow a group to its supergroup (or half its
/// `timeout_ms`, when that is less).
const MIN_TIME_TO_FOLLOW: Duration = Duration::from_secs(1);

/// Distinct chats whose 429s within [`ACCOUNT_WIDE_WINDOW`] are taken for the bot's own limit
/// rather than each chat's flood control.
const ACCOUNT_WIDE_CHATS: usize = 3;

/// The window in which 429s for [`ACCOUNT_WIDE_CHATS`] distinct chats are taken for the bot's own
/// limit. A campaign sends one message to each of many chats, far below any chat's flood control:
/// several of them refused within a couple of seconds speak of the bot.
const ACCOUNT_WIDE_WINDOW: Duration = Duration::from_secs(2);

/// Telegram provider configuration.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct TelegramConfig {
    /// Bot API root; a local Bot API server or a test fake can stand in.
    pub base_url: String,
    /// The bot's token from @BotFather.
    /// Not serialised: `herald config` omits it.
    #[serde(skip_serializing)]
    pub bot_token: String,
    /// `parse_mode` sent with every message (`HTML`, `MarkdownV2` or the legacy `Markdown`);
    /// plain text when unset. The text is escaped for it, so it shows as written.
    pub parse_mode: Option<String>,
    /// How long one send may take, in milliseconds: its request, and the second one when it
    /// follows a group to the supergroup it became (within the send's deadline too).
    pub timeout_ms: u64,
}

impl Default for TelegramConfig {
    fn default() -> Self {
        Self {
            base_url: "https://api.telegram.org".into(),
            bot_token: String::new(),
            parse_mode: None,
            timeout_ms: 10_000,
        }
    }
}

impl std::fmt::Debug for TelegramConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramConfig")
            .field("base_url", &self.base_url)
            .field("bot_token", &"<redacted>")
            .field("parse_mode", &self.parse_mode)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl TelegramConfig {
    /// Refuses what [`TelegramProvider::new`] refuses (a missing token, an unknown parse mode, a
    /// client that cannot be built), by building the provider and dropping it, so that a start
    /// refuses them before it connects to anything. Needs a process-wide rustls crypto provider
    /// installed.
    pub fn check(&self) -> Result<(), TelegramConfigError> {
        TelegramProvider::new(String::new(), self.clone()).map(drop)
    }

    /// The parse mode, after checking that the token is set and the base URL usable.
    fn checked_parse_mode(&self) -> Result<Option<ParseMode>, TelegramConfigError> {
        if self.bot_token.trim().is_empty() {
            return Err(TelegramConfigError::MissingToken);
        }
        if let Some(reason) = http::base_url_problem(&self.base_url) {
            return Err(TelegramConfigError::BaseUrl {
                url: self.base_url.clone(),
                reason,
            });
        }
        self.parse_mode.as_deref().map(ParseMode::parse).transpose()
    }
}

/// Why a Telegram provider could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum TelegramConfigError {
    /// `bot_token` is empty.
    #[error("channels.telegram.bot_token is required")]
    MissingToken,
    /// `base_url` is not an `http(s)` URL with a host.
    #[error("channels.telegram.base_url {url:?} is not an http(s) URL: {reason}")]
    BaseUrl {
        /// The configured value.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("channels.telegram: cannot build the HTTP client: {0}")]
    Client(String),
    /// `parse_mode` is not one the Bot API knows.
    #[error("channels.telegram.parse_mode must be HTML, MarkdownV2 or Markdown, not {0:?}")]
    UnknownParseMode(String),
}

/// How the Bot API reads a message's text, and so what the text must escape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParseMode {
    Html,
    MarkdownV2,
    Markdown,
}

impl ParseMode {
    fn parse(name: &str) -> Result<Self, TelegramConfigError> {
        match name {
            "HTML" => Ok(Self::Html),
            "MarkdownV2" => Ok(Self::MarkdownV2),
            "Markdown" => Ok(Self::Markdown),
            other => Err(TelegramConfigError::UnknownParseMode(other.to_string())),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Html => "HTML",
            Self::MarkdownV2 => "MarkdownV2",
            Self::Markdown => "Markdown",
        }
    }

    /// `text` as this mode shows it literally.
    fn escape(self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + text.len() / 8);
        for c in text.chars() {
            match (self, c) {
                (Self::Html, '&') => out.push_str("&amp;"),
                (Self::Html, '<') => out.push_str("&lt;"),
                (Self::Html, '>') => out.push_str("&gt;"),
                (Self::MarkdownV2, '_' | '*' | '[' | ']' | '(' | ')' | '~' | '`' | '>' | '#')
                | (Self::MarkdownV2, '+' | '-' | '=' | '|' | '{' | '}' | '.' | '!' | '\\')
                | (Self::Markdown, '_' | '*' | '`' | '[') => {
                    out.push('\\');
                    out.push(c);
                }
                _ => out.push(c),
            }
        }
        out
    }
}

/// Longest message text the Bot API takes, in UTF-16 code units after entities are parsed.
const MAX_TEXT_UTF16: usize = 4_096;

/// Sends Telegram messages through a bot.
pub struct TelegramProvider {
    name: String,
    client: reqwest::Client,
    /// `{base}/bot{token}/sendMessage`; never logged.
    send_url: String,
    token: String,
    parse_mode: Option<ParseMode>,
    /// `timeout_ms`: what one send may take, a followed move's second request included.
    timeout: Duration,
    /// The chats refused with a 429 lately, to tell the bot's limit from a chat's.
    floods: Mutex<FloodWatch>,
}

/// The chats refused with a 429 within the last [`ACCOUNT_WIDE_WINDOW`], oldest first, each once.
#[derive(Debug, Default)]
struct FloodWatch {
    recent: VecDeque<(Instant, String)>,
}

impl FloodWatch {
    /// Records a 429 for `chat` at `now`; whether that makes [`ACCOUNT_WIDE_CHATS`] distinct
    /// chats within the window, the bot's own limit. The chats are then forgotten: after the
    /// channel's hold it takes as many again.
    fn account_wide(&mut self, chat: &str, now: Instant) -> bool {
        while let Some((at, _)) = self.recent.front() {
            if now.saturating_duration_since(*at) > ACCOUNT_WIDE_WINDOW {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        self.recent.retain(|(_, seen)| seen != chat);
        self.recent.push_back((now, chat.to_string()));
        if self.recent.len() < ACCOUNT_WIDE_CHATS {
            return false;
        }
        self.recent.clear();
        true
    }
}

impl std::fmt::Debug for TelegramProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramProvider")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct SendMessage<'a> {
    chat_id: &'a str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parse_mode: Option<&'a str>,
}

/// The Bot API's reply envelope, success or failure.
#[derive(Deserialize)]
struct BotReply {
    ok: bool,
    result: Option<SentMessage>,
    error_code: Option<u16>,
    description: Option<String>,
    parameters: Option<ResponseParameters>,
}

#[derive(Deserialize)]
struct SentMessage {
    message_id: i64,
}

#[derive(Deserialize)]
struct ResponseParameters {
    retry_after: Option<u64>,
    migrate_to_chat_id: Option<i64>,
}

impl TelegramProvider {
    /// Builds the provider. Needs a process-wide rustls crypto provider installed.
    pub fn new(name: String, config: TelegramConfig) -> Result<Self, TelegramConfigError> {
        let parse_mode = config.checked_parse_mode()?;
        let client = http::build_client(http::client_builder(config.timeout_ms))
            .map_err(TelegramConfigError::Client)?;
        let send_url = format!(
            "{}/bot{}/sendMessage",
            config.base_url.trim_end_matches('/'),
            config.bot_token
        );
        Ok(Self {
            name,
            client,
            send_url,
            token: config.bot_token,
            parse_mode,
            timeout: Duration::from_millis(config.timeout_ms),
            floods: Mutex::default(),
        })
    }

    /// Removes the token from a reason, whatever put it there.
    fn scrub(&self, error: ProviderError) -> ProviderError {
        error.map_reason(|reason| reason.replace(&self.token, "<redacted>"))
    }

    /// Sends `message` by `deadline`, and within `timeout_ms`, a followed move included.
    async fn deliver(
        &self,
        message: &OutboundMessage,
        deadline: tokio::time::Instant,
    ) -> Result<Receipt, ProviderError> {
        let chat_id = message
            .contacts
            .telegram_chat_id
            .as_deref()
            .ok_or(ProviderError::MissingContact(Channel::Telegram))?;
        let text = text_of(message);
        let text = super::text::cut(&text, MAX_TEXT_UTF16, char::len_utf16);
        let text = match self.parse_mode {
            Some(mode) => mode.escape(&text),
            None => text.into_owned(),
        };
        let started = Instant::now();
        match self.send_message(chat_id, &text, self.timeout).await? {
            Sent::Accepted { message_id } => Ok(receipt(message_id, Vec::new())),
            Sent::Moved { to, .. } => {
                // The whole send stays within `timeout_ms` and the send's deadline, and the
                // second request starts only with a fair share of that left: one cut off in
                // flight may still reach the group, which the retry would then message again.
                // Not started, it is simply retried.
                let left = self
                    .timeout
                    .saturating_sub(started.elapsed())
                    .min(time_left(deadline));
                if left < (self.timeout / 2).min(MIN_TIME_TO_FOLLOW) {
                    return Err(ProviderError::transient(format!(
                        "the group moved to chat {to}; too little time left to send there"
                    )));
                }
                self.follow_move(chat_id, to, &text, left).await
            }
        }
    }

    /// Sends `text` once more, at once, within `timeout`, to the chat `from` moved to, reporting
    /// the move when it goes out. One hop only: a chat that moved again is refused as its reply
    /// says. A failure is classified as usual, its reason telling of the move; a new chat that is
    /// gone for the bot (kicked from the supergroup) declares the old id dead too, since that is
    /// the one the customer holds.
    async fn follow_move(
        &self,
        from: &str,
        to: String,
        text: &str,
        timeout: Duration,
    ) -> Result<Receipt, ProviderError> {
        let refusal = match self.send_message(&to, text, timeout).await {
            Ok(Sent::Accepted { message_id }) => {
                let moved = ContactMove {
                    from: from.to_string(),
                    to,
                };
                return Ok(receipt(message_id, vec![moved]));
            }
            Ok(Sent::Moved { refusal, .. }) | Err(refusal) => refusal,
        };
        let refusal = match refusal {
            ProviderError::Permanent {
                reason,
                mut dead_contacts,
            } if dead_contacts.contains(&to) => {
                dead_contacts.push(from.to_string());
                ProviderError::Permanent {
                    reason,
                    dead_contacts,
                }
            }
            other => other,
        };
        Err(refusal.map_reason(|reason| {
            format!("{reason} (sent to chat {to}, where the group moved from chat {from})")
        }))
    }

    /// One `sendMessage` of `text` to `chat_id`, answered within `timeout`.
    async fn send_message(
        &self,
        chat_id: &str,
        text: &str,
        timeout: Duration,
    ) -> Result<Sent, ProviderError> {
        let body = SendMessage {
            chat_id,
            text,
            parse_mode: self.parse_mode.map(ParseMode::name),
        };
        let request = self
            .client
            .post(&self.send_url)
            .timeout(timeout)
            .json(&body);
        let http::Reply {
            status,
            retry_after: header_retry_after,
            bytes,
            body_lost,
        } = http::exchange(request).await?;
        let reply = serde_json::from_slice::<BotReply>(&bytes).ok();
        let sent = match reply {
            Some(reply) if !reply.ok => refused(status, reply, header_retry_after, chat_id),
            reply if status.is_success() => Ok(Sent::Accepted {
                message_id: self.sent_id(reply, status),
            }),
            _ => Err(code_error(
                status,
                format!(
                    "HTTP {status}: {}",
                    http::body_snippet(&bytes, body_lost, 200)
                ),
                header_retry_after,
            )),
        };
        sent.map_err(|refusal| self.scoped(refusal, chat_id))
    }

    /// A throttle of `chat_id` made a throttle of the whole bot when it is the
    /// [`ACCOUNT_WIDE_CHATS`]th distinct chat refused with a 429 within [`ACCOUNT_WIDE_WINDOW`];
    /// any other refusal as it is.
    fn scoped(&self, refusal: ProviderError, chat_id: &str) -> ProviderError {
        let ProviderError::Throttled {
            reason,
            retry_after,
            dead_contacts,
        } = refusal
        else {
            return refusal;
        };
        let mut floods = self.floods.lock().unwrap_or_else(|p| p.into_inner());
        if !floods.account_wide(chat_id, Instant::now()) {
            return ProviderError::Throttled {
                reason,
                retry_after,
                dead_contacts,
            };
        }
        ProviderError::AccountThrottled {
            reason: format!(
                "{reason} (the bot's own limit: {ACCOUNT_WIDE_CHATS} chats refused within {} s)",
                ACCOUNT_WIDE_WINDOW.as_secs()
            ),
            retry_after,
            dead_contacts,
        }
    }

    /// The message id in a 2xx `reply`. Without one (a body that is no Bot API reply, or lost
    /// midway) the message went out all the same: sending it again would duplicate it, so it is
    /// an acceptance without an id.
    fn sent_id(&self, reply: Option<BotReply>, status: StatusCode) -> Option<i64> {
        let id = reply
            .and_then(|reply| reply.result)
            .map(|sent| sent.message_id);
        if id.is_none() {
            tracing::warn!(provider = %self.name, %status, "Telegram message accepted without a message_id in the reply");
        }
        id
    }
}

/// What a `sendMessage` the Bot API answered came to, short of a refusal.
enum Sent {
    /// The message went out.
    Accepted {
        /// Telegram's id for it, if its reply could be read.
        message_id: Option<i64>,
    },
    /// The chat lives on under another id (a group upgraded to a supergroup), given by the reply.
    Moved {
        /// The chat's new id.
        to: String,
        /// The reply as an error, for when the move is not followed.
        refusal: ProviderError,
    },
}

/// The receipt of a message that went out as `message_id`.
fn receipt(message_id: Option<i64>, moved_contacts: Vec<ContactMove>) -> Receipt {
    Receipt {
        moved_contacts,
        ..Receipt::new(message_id.map(|id| id.to_string()))
    }
}

/// An `ok: false` reply: a chat that moved when its 400 gives the new id (`migrate_to_chat_id`),
/// else an error (see [`reply_error`]).
fn refused(
    status: StatusCode,
    reply: BotReply,
    header_retry_after: Option<Duration>,
    chat_id: &str,
) -> Result<Sent, ProviderError> {
    let bad_request = error_status(status, &reply) == StatusCode::BAD_REQUEST;
    let moved_to = reply
        .parameters
        .as_ref()
        .and_then(|p| p.migrate_to_chat_id)
        .filter(|to| bad_request && to.to_string() != chat_id);
    let refusal = reply_error(status, reply, header_retry_after, chat_id);
    match moved_to {
        Some(to) => Ok(Sent::Moved {
            to: to.to_string(),
            refusal,
        }),
        None => Err(refusal),
    }
}

/// The message text: the subject as a first paragraph when there is one.
fn text_of(message: &OutboundMessage) -> String {
    let text = message.content.short_text();
    match message.content.subject.as_deref() {
        Some(subject) if !subject.is_empty() => format!("{subject}\n\n{text}"),
        _ => text.to_string(),
    }
}

/// The status an `ok: false` reply stands for: its `error_code`, else (absent, or not an error
/// status) the HTTP status.
fn error_status(status: StatusCode, reply: &BotReply) -> StatusCode {
    reply
        .error_code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .filter(|code| code.is_client_error() || code.is_server_error())
        .unwrap_or(status)
}

/// Classifies an `ok: false` reply: by `error_code` (the HTTP status when absent), with the
/// `retry_after` Telegram gives on flood control taking precedence over the header. A reply
/// saying the chat is gone declares `chat_id` dead.
fn reply_error(
    status: StatusCode,
    reply: BotReply,
    header_retry_after: Option<Duration>,
    chat_id: &str,
) -> ProviderError {
    let code = error_status(status, &reply);
    let parameters = reply.parameters;
    let retry_after = parameters
        .as_ref()
        .and_then(|p| p.retry_after)
        .map(Duration::from_secs)
        .or(header_retry_after);
    let description = reply.description.as_deref().unwrap_or("no description");
    let mut reason = format!("Telegram {}: {description}", code.as_u16());
    if let Some(chat) = parameters.and_then(|p| p.migrate_to_chat_id) {
        reason.push_str(&format!(" (group moved to chat {chat})"));
    }
    if chat_is_gone(code, description) {
        return ProviderError::Permanent {
            reason,
            dead_contacts: vec![chat_id.to_string()],
        };
    }
    code_error(code, reason, retry_after)
}

/// Classifies a refusal with `code` that declares no chat gone: a 429 throttles the chat, whatever
/// the reply's body (lost midway, or not the Bot API's JSON) and with whatever wait it gives (none
/// leaves it to the retry schedule); a 404 refuses the bot's path (see below); otherwise as a
/// request with the bot's token.
///
/// The Bot API answers 404 "Not Found" to a path it does not know, and the path holds the token
/// (`/bot{token}/sendMessage`): a malformed or mistyped token, or a `base_url` that is not the
/// Bot API, never a chat (a chat that does not exist is a 400). Every send fails alike until the
/// configuration is fixed, so, as a 401, it is transient: it counts against the circuit and the
/// message is retried, then dead-lettered (and can be replayed), instead of ending `failed`.
fn code_error(code: StatusCode, reason: String, retry_after: Option<Duration>) -> ProviderError {
    if code == StatusCode::TOO_MANY_REQUESTS {
        // Flood control: Telegram limits the messages to each chat (about one a second), so a
        // 429 speaks of this chat, unless several chats' do (`TelegramProvider::scoped`).
        return ProviderError::throttled(reason, retry_after);
    }
    if code == StatusCode::NOT_FOUND {
        return ProviderError::transient_after(
            format!("{reason} (the Bot API knows no such path: check the bot token and base_url)"),
            retry_after,
        );
    }
    http::account_status_error(code, reason, retry_after)
}

/// What the Bot API says, with a 403, of a chat this bot cannot reach any more whatever it sends:
/// the user blocked the bot or deleted their account, the bot was removed from the group,
/// supergroup or channel, the group was deleted.
const GONE_CHAT_403: [&str; 4] = [
    "bot was blocked by the user",
    "user is deactivated",
    "bot was kicked from the",
    "the group chat was deleted",
];

/// Whether an error reply says the chat is gone for this bot (`GONE_CHAT_403`), so its id is
/// dead. Not so: a bot-wide refusal (401, a revoked token), which names no chat; a group upgraded
/// to a supergroup, which lives on under the new id its 400 reply gives (`migrate_to_chat_id`),
/// where the message is sent once more and the customer's chat id moved (see
/// [`TelegramProvider::follow_move`]); a user who has not started the bot yet ("can't
/// initiate conversation"), who still can; and a 400 "chat not found", which every chat answers
/// when the configured token is another bot's (a token swapped for a new bot's), so forgetting on
/// it could clear every customer's chat id at once, where each is reachable again as soon as its
/// user starts the new bot.
fn chat_is_gone(code: StatusCode, description: &str) -> bool {
    code == StatusCode::FORBIDDEN && {
        let description = description.to_ascii_lowercase();
        GONE_CHAT_403.iter().any(|gone| description.contains(gone))
    }
}

impl Provider for TelegramProvider {
    fn channel(&self) -> Channel {
        Channel::Telegram
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
            self.deliver(message, deadline)
                .await
                .map_err(|e| self.scrub(e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::provider::tests::SendNow;
    use crate::channel::provider::tests::outbound;
    use wiremock::matchers::{body_json, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const TOKEN: &str = "123456:SECRET-bot-token";
    const SEND_PATH: &str = "/bot123456:SECRET-bot-token/sendMessage";

    fn provider(base_url: &str, timeout_ms: u64) -> TelegramProvider {
        let _ = rustls::crypto::ring::default_provider().install_default();
        TelegramProvider::new(
            "telegram".into(),
            TelegramConfig {
                base_url: format!("{base_url}/"),
                bot_token: TOKEN.into(),
                parse_mode: None,
                timeout_ms,
            },
        )
        .unwrap()
    }

    fn message(chat_id: Option<&str>) -> OutboundMessage {
        let mut message = outbound();
        message.contacts.telegram_chat_id = chat_id.map(str::to_string);
        message
    }

    async fn reply_with(template: ResponseTemplate) -> (MockServer, TelegramProvider) {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .respond_with(template)
            .expect(1)
            .mount(&server)
            .await;
        let provider = provider(&server.uri(), 2_000);
        (server, provider)
    }

    fn assert_no_token(error: &ProviderError) {
        assert!(!error.to_string().contains("SECRET"), "{error}");
        assert!(!format!("{error:?}").contains("SECRET"), "{error:?}");
    }

    #[tokio::test]
    async fn a_2xx_whose_body_is_no_bot_reply_is_sent_without_an_id() {
        // Telegram took the message: a failure would send it again, by retry or the next channel.
        for body in ["<html>bad gateway</html>", "", r#"{"ok": true}"#] {
            let (server, provider) =
                reply_with(ResponseTemplate::new(200).set_body_string(body)).await;
            let sent = provider.send_now(&message(Some("42"))).await;
            assert!(
                matches!(&sent, Ok(receipt) if receipt.provider_message_id.is_none()),
                "a 200 answered with {body:?}: {sent:?}"
            );
            server.verify().await;
        }
    }

    #[tokio::test]
    async fn sends_subject_and_short_text_and_returns_the_message_id() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(header("content-type", "application/json"))
            .and(body_json(serde_json::json!({
                "chat_id": "42",
                "text": "Order shipped\n\nOrder #1001 shipped",
            })))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "ok": true,
                "result": {"message_id": 777, "chat": {"id": 42}, "date": 1700000000}
            })))
            .expect(1)
            .mount(&server)
            .await;
        let receipt = provider(&server.uri(), 2_000)
            .send_now(&message(Some("42")))
            .await
            .unwrap();
        assert_eq!(receipt.provider_message_id.as_deref(), Some("777"));
    }

    #[tokio::test]
    async fn parse_mode_is_sent_when_configured_and_full_text_alone_without_subject_or_short() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(body_json(serde_json::json!({
                "chat_id": "@shop_news",
                "text": "Your order #1001 is on its way.",
                "parse_mode": "HTML",
            })))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!({"ok": true, "result": {"message_id": 1}})),
            )
            .expect(1)
            .mount(&server)
            .await;
        let provider = TelegramProvider::new(
            "telegram".into(),
            TelegramConfig {
                base_url: server.uri(),
                bot_token: TOKEN.into(),
                parse_mode: Some("HTML".into()),
                timeout_ms: 2_000,
            },
        )
        .unwrap();
        let mut msg = message(Some("@shop_news"));
        msg.content.subject = None;
        msg.content.short = None;
        assert!(provider.send_now(&msg).await.is_ok());
    }

    #[test]
    fn text_is_escaped_for_the_parse_mode_and_unknown_modes_are_refused() {
        assert_eq!(
            ParseMode::Html.escape("Smith & Sons <b>"),
            "Smith &amp; Sons &lt;b&gt;"
        );
        assert_eq!(
            ParseMode::MarkdownV2.escape("Order 1001 (12.50 EUR)!"),
            "Order 1001 \\(12\\.50 EUR\\)\\!"
        );
        assert_eq!(ParseMode::Markdown.escape("a_b*c"), "a\\_b\\*c");
        let config = |mode: &str| TelegramConfig {
            bot_token: TOKEN.into(),
            parse_mode: Some(mode.into()),
            ..TelegramConfig::default()
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let refused = TelegramProvider::new("telegram".into(), config("html"));
        assert!(
            matches!(refused, Err(TelegramConfigError::UnknownParseMode(_))),
            "{refused:?}"
        );
        assert!(TelegramProvider::new("telegram".into(), config("MarkdownV2")).is_ok());
    }

    #[tokio::test]
    async fn a_long_text_goes_out_cut_to_telegrams_limit_then_escaped() {
        let (server, mut provider) = reply_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"ok": true, "result": {"message_id": 1}})),
        )
        .await;
        provider.parse_mode = Some(ParseMode::Html);
        let mut msg = message(Some("42"));
        msg.content.subject = Some("Smith & Sons".into());
        msg.content.short = Some("x".repeat(5_000));
        provider.send_now(&msg).await.expect("sent");
        let requests = server.received_requests().await.expect("recorded");
        let body: serde_json::Value = serde_json::from_slice(&requests[0].body).expect("json");
        let text = body["text"].as_str().expect("text");
        assert!(text.starts_with("Smith &amp; Sons\n\n"), "{}", &text[..40]);
        assert!(text.ends_with('…'), "cut");
        let shown = text.replace("&amp;", "&");
        assert_eq!(shown.encode_utf16().count(), MAX_TEXT_UTF16);
    }

    #[tokio::test]
    async fn flood_control_throttles_the_chat_with_telegrams_retry_after() {
        let (_server, provider) = reply_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "5")
                .set_body_json(serde_json::json!({
                    "ok": false,
                    "error_code": 429,
                    "description": "Too Many Requests: retry after 17",
                    "parameters": {"retry_after": 17}
                })),
        )
        .await;
        let error = provider.send_now(&message(Some("42"))).await.unwrap_err();
        assert_no_token(&error);
        match error {
            ProviderError::Throttled {
                reason,
                retry_after,
                ..
            } => {
                assert_eq!(retry_after, Some(Duration::from_secs(17)));
                assert!(reason.contains("Too Many Requests"), "{reason}");
            }
            other => panic!("expected throttled, got {other:?}"),
        }
    }

    /// A 429 is flood control whatever its body: one lost midway (or a proxy's page) throttles
    /// the chat too, with the `Retry-After` header's wait if it gives one, and an operator reading
    /// the attempt learns that the body was lost.
    #[tokio::test]
    async fn a_429_whose_body_is_lost_or_no_bot_reply_still_throttles_the_chat() {
        let lost_with_wait =
            http::tests::cut_off_reply("HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7").await;
        let lost = http::tests::cut_off_reply("HTTP/1.1 429 Too Many Requests").await;
        let page = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(429).set_body_string("<html>slow down</html>"))
            .expect(1)
            .mount(&page)
            .await;
        for (url, wait, said) in [
            (
                lost_with_wait,
                Some(Duration::from_secs(7)),
                "body was lost",
            ),
            (lost, None, "body was lost"),
            (page.uri(), None, "slow down"),
        ] {
            let error = provider(&url, 2_000)
                .send_now(&message(Some("42")))
                .await
                .unwrap_err();
            assert_no_token(&error);
            assert!(
                matches!(&error, ProviderError::Throttled { reason, retry_after, .. }
                    if *retry_after == wait && reason.contains("429") && reason.contains(said)),
                "{said}: {error:?}"
            );
        }
    }

    #[tokio::test]
    async fn one_flooded_chat_does_not_open_the_circuit_for_the_others() {
        use crate::channel::circuit::CircuitSettings;
        use crate::channel::{ChannelActor, ChannelArgs, ChannelMsg, ChannelSettings, SendOutcome};
        use ractor::{Actor, rpc::CallResult};
        use std::sync::Arc;
        use wiremock::matchers::body_partial_json;

        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(body_partial_json(serde_json::json!({"chat_id": "flooded"})))
            .respond_with(ResponseTemplate::new(429).set_body_json(serde_json::json!({
                "ok": false,
                "error_code": 429,
                "description": "Too Many Requests: retry after 1",
                "parameters": {"retry_after": 1}
            })))
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(body_partial_json(serde_json::json!({"chat_id": "quiet"})))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "ok": true,
                "result": {"message_id": 7}
            })))
            .mount(&server)
            .await;
        let settings = ChannelSettings {
            circuit: CircuitSettings {
                failure_threshold: 2,
                window_ms: 60_000,
                cool_down_ms: 60_000,
                ..CircuitSettings::default()
            },
            ..ChannelSettings::default()
        };
        let args = ChannelArgs::new(Arc::new(provider(&server.uri(), 2_000)), settings, None);
        let (actor, _) = Actor::spawn(None, ChannelActor, args)
            .await
            .expect("channel actor starts");
        let wait = Duration::from_secs(30);
        let send = |chat: &'static str| {
            let actor = actor.clone();
            async move {
                let answer = actor
                    .call(
                        |reply| ChannelMsg::Send {
                            message: Box::new(message(Some(chat))),
                            answer_by: std::time::Instant::now() + wait,
                            reply,
                        },
                        Some(wait),
                    )
                    .await
                    .expect("actor alive");
                match answer {
                    CallResult::Success(report) => report.outcome,
                    other => panic!("a send to {chat} was not answered: {other:?}"),
                }
            }
        };
        for n in 1..=5 {
            let outcome = send("flooded").await;
            assert!(
                matches!(
                    outcome,
                    SendOutcome::Failed(ProviderError::Throttled { .. })
                ),
                "send {n} to the flooded chat: {outcome:?}"
            );
        }
        let outcome = send("quiet").await;
        assert!(
            matches!(outcome, SendOutcome::Accepted(_)),
            "the quiet chat: {outcome:?}"
        );
        actor.stop(None);
    }

    #[test]
    fn refusals_of_three_chats_within_two_seconds_are_the_bot_s_limit() {
        let t0 = Instant::now();
        let mut floods = FloodWatch::default();
        assert!(!floods.account_wide("a", t0));
        assert!(
            !floods.account_wide("a", t0 + Duration::from_millis(100)),
            "the same chat"
        );
        assert!(!floods.account_wide("b", t0 + Duration::from_millis(200)));
        assert!(floods.account_wide("c", t0 + Duration::from_millis(300)));
        assert!(
            !floods.account_wide("d", t0 + Duration::from_millis(400)),
            "forgotten"
        );
        assert!(!floods.account_wide("e", t0 + Duration::from_millis(500)));
        assert!(
            !floods.account_wide("f", t0 + Duration::from_millis(2_401)),
            "d left the window"
        );
        assert!(floods.account_wide("g", t0 + Duration::from_millis(2_402)));
    }

    #[tokio::test]
    async fn refusals_of_several_chats_hold_every_send_until_telegram_s_retry_after() {
        use crate::channel::{ChannelActor, ChannelArgs, ChannelMsg, ChannelSettings, SendOutcome};
        use ractor::{Actor, rpc::CallResult};
        use std::sync::Arc;

        // The bot's own limit: Telegram refuses every chat alike, asking to wait a minute.
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .respond_with(ResponseTemplate::new(429).set_body_json(serde_json::json!({
                "ok": false,
                "error_code": 429,
                "description": "Too Many Requests: retry after 60",
                "parameters": {"retry_after": 60}
            })))
            .mount(&server)
            .await;
        let args = ChannelArgs::new(
            Arc::new(provider(&server.uri(), 2_000)),
            ChannelSettings::default(),
            None,
        );
        let (actor, _) = Actor::spawn(None, ChannelActor, args)
            .await
            .expect("channel actor starts");
        let wait = Duration::from_secs(30);
        let send = |chat: &'static str| {
            let actor = actor.clone();
            async move {
                let answer = actor
                    .call(
                        |reply| ChannelMsg::Send {
                            message: Box::new(message(Some(chat))),
                            answer_by: std::time::Instant::now() + wait,
                            reply,
                        },
                        Some(wait),
                    )
                    .await
                    .expect("actor alive");
                match answer {
                    CallResult::Success(report) => report.outcome,
                    other => panic!("a send to {chat} was not answered: {other:?}"),
                }
            }
        };
        for chat in ["one", "two"] {
            let outcome = send(chat).await;
            assert!(
                matches!(
                    outcome,
                    SendOutcome::Failed(ProviderError::Throttled { .. })
                ),
                "{chat}: one chat's 429 throttles that chat only: {outcome:?}"
            );
        }
        let outcome = send("three").await;
        assert!(
            matches!(
                &outcome,
                SendOutcome::Failed(ProviderError::AccountThrottled { retry_after, .. })
                    if *retry_after == Some(Duration::from_secs(60))
            ),
            "the third chat's 429 throttles the bot: {outcome:?}"
        );
        for chat in ["four", "five", "one"] {
            match send(chat).await {
                SendOutcome::CircuitOpen { cool_down_left } => assert!(
                    cool_down_left > Duration::from_secs(50),
                    "{chat}: held for Telegram's retry_after: {cool_down_left:?}"
                ),
                other => panic!("a send to {chat} reached Telegram: {other:?}"),
            }
        }
        let requests = server.received_requests().await.unwrap_or_default();
        assert_eq!(
            requests.len(),
            3,
            "Telegram was not called while the bot was held"
        );
        actor.stop(None);
    }

    #[tokio::test]
    async fn server_errors_are_transient_even_without_a_json_body() {
        let (_server, provider) =
            reply_with(ResponseTemplate::new(502).set_body_string("<html>Bad Gateway</html>"))
                .await;
        let error = provider.send_now(&message(Some("42"))).await.unwrap_err();
        assert_no_token(&error);
        assert!(
            matches!(&error, ProviderError::Transient { reason, retry_after: None, .. } if reason.contains("502")),
            "{error:?}"
        );
    }

    /// The error reply `status` with `description`, as the Bot API sends it.
    fn bot_error(status: u16, description: &str) -> ResponseTemplate {
        ResponseTemplate::new(status).set_body_json(serde_json::json!({
            "ok": false,
            "error_code": status,
            "description": description,
        }))
    }

    #[tokio::test]
    async fn a_chat_that_is_gone_is_permanent_and_declares_the_chat_id_dead() {
        for (status, description) in [
            (403, "Forbidden: bot was blocked by the user"),
            (403, "Forbidden: user is deactivated"),
            (403, "Forbidden: bot was kicked from the supergroup chat"),
            (403, "Forbidden: the group chat was deleted"),
        ] {
            let (_server, provider) = reply_with(bot_error(status, description)).await;
            let error = provider.send_now(&message(Some("42"))).await.unwrap_err();
            assert_no_token(&error);
            assert!(
                matches!(&error, ProviderError::Permanent { reason, dead_contacts }
                    if reason.contains(description) && dead_contacts == &["42"]),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn other_refusals_are_permanent_but_keep_the_chat_id() {
        for (status, description) in [
            (400, "Bad Request: message text is empty"),
            (400, "Bad Request: chat not found"),
            (
                403,
                "Forbidden: bot can't initiate conversation with a user",
            ),
            (
                400,
                "Bad Request: group chat was upgraded to a supergroup chat",
            ),
        ] {
            let (_server, provider) = reply_with(bot_error(status, description)).await;
            let error = provider.send_now(&message(Some("42"))).await.unwrap_err();
            assert!(
                matches!(&error, ProviderError::Permanent { reason, dead_contacts }
                    if reason.contains(description) && dead_contacts.is_empty()),
                "{error:?}"
            );
        }
    }

    /// Telegram's answer to a send to a group upgraded to a supergroup, whose id is now `to`.
    fn migrated_to(to: i64) -> ResponseTemplate {
        ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "ok": false,
            "error_code": 400,
            "description": "Bad Request: group chat was upgraded to a supergroup chat",
            "parameters": {"migrate_to_chat_id": to}
        }))
    }

    /// Answers sends to `chat` with `template`, expecting `times` of them.
    async fn answer_chat(
        server: &MockServer,
        chat: &str,
        template: ResponseTemplate,
        times: impl Into<wiremock::Times>,
    ) {
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(body_json(serde_json::json!({
                "chat_id": chat,
                "text": "Order shipped\n\nOrder #1001 shipped",
            })))
            .respond_with(template)
            .expect(times)
            .mount(server)
            .await;
    }

    #[tokio::test]
    async fn an_upgraded_group_gets_the_message_at_its_new_id_and_the_move_is_reported() {
        let server = MockServer::start().await;
        answer_chat(&server, "-4242", migrated_to(-1_004_242), 1).await;
        let accepted = ResponseTemplate::new(200)
            .set_body_json(serde_json::json!({"ok": true, "result": {"message_id": 778}}));
        answer_chat(&server, "-1004242", accepted, 1).await;
        let receipt = provider(&server.uri(), 2_000)
            .send_now(&message(Some("-4242")))
            .await
            .expect("sent to the supergroup");
        assert_eq!(receipt.provider_message_id.as_deref(), Some("778"));
        assert_eq!(
            receipt.moved_contacts,
            vec![ContactMove {
                from: "-4242".into(),
                to: "-1004242".into()
            }]
        );
        assert!(receipt.dead_contacts.is_empty(), "{receipt:?}");
    }

    #[tokio::test]
    async fn a_failed_send_to_the_new_chat_is_classified_as_usual_and_mentions_the_move() {
        for (reply, transient, dead) in [
            (bot_error(502, "Bad Gateway"), true, vec![]),
            (
                bot_error(403, "Forbidden: bot was kicked from the supergroup chat"),
                false,
                // The customer holds the old id: it goes too.
                vec!["-1004242".to_string(), "-4242".to_string()],
            ),
        ] {
            let server = MockServer::start().await;
            answer_chat(&server, "-4242", migrated_to(-1_004_242), 1).await;
            answer_chat(&server, "-1004242", reply, 1).await;
            let error = provider(&server.uri(), 2_000)
                .send_now(&message(Some("-4242")))
                .await
                .unwrap_err();
            assert_no_token(&error);
            let reason = error.to_string();
            assert!(
                reason.contains("from chat -4242") && reason.contains("chat -1004242"),
                "the move is told: {reason}"
            );
            match (&error, transient) {
                (ProviderError::Transient { .. }, true) => {}
                (ProviderError::Permanent { dead_contacts, .. }, false) => {
                    assert_eq!(dead_contacts, &dead, "{error:?}")
                }
                _ => panic!("misclassified: {error:?}"),
            }
        }
    }

    /// A send whose first request answered "moved" after `first_ms`, with the second request
    /// answered after `second_ms`: what came of it, with a `timeout_ms` of `timeout_ms`.
    async fn slow_move(
        timeout_ms: u64,
        first_ms: u64,
        second_ms: u64,
        second_requests: impl Into<wiremock::Times>,
    ) -> Result<Receipt, ProviderError> {
        let server = MockServer::start().await;
        let moved = migrated_to(-1_004_242).set_delay(Duration::from_millis(first_ms));
        answer_chat(&server, "-4242", moved, 1).await;
        let accepted = ResponseTemplate::new(200)
            .set_body_json(serde_json::json!({"ok": true, "result": {"message_id": 5}}))
            .set_delay(Duration::from_millis(second_ms));
        answer_chat(&server, "-1004242", accepted, second_requests).await;
        provider(&server.uri(), timeout_ms)
            .send_now(&message(Some("-4242")))
            .await
    }

    #[tokio::test]
    async fn a_move_is_followed_only_within_the_time_of_one_send() {
        let error = slow_move(2_000, 600, 1_600, 0..=1)
            .await
            .expect_err("the second request gets what is left of the send's 2 s, not 2 s more");
        assert!(
            matches!(error, ProviderError::Transient { .. }),
            "{error:?}"
        );
        assert_no_token(&error);
        let error = slow_move(1_000, 900, 0, 0)
            .await
            .expect_err("with under half of the send's 1 s left, no second request is made");
        assert!(
            matches!(&error, ProviderError::Transient { reason, .. } if reason.contains("too little time")),
            "{error:?}"
        );
    }

    /// The send's own deadline (`channels.limits.timeout_ms`, here shorter than the provider's
    /// `timeout_ms`) bounds a followed move too: with too little of it left after the first
    /// request, the second is not made, rather than being cut off by the deadline in flight
    /// (when it may reach the group, and the retry message it again).
    #[tokio::test]
    async fn a_move_is_followed_only_within_the_send_s_deadline() {
        let server = MockServer::start().await;
        let moved = migrated_to(-1_004_242).set_delay(Duration::from_millis(700));
        answer_chat(&server, "-4242", moved, 1).await;
        let accepted = ResponseTemplate::new(200)
            .set_body_json(serde_json::json!({"ok": true, "result": {"message_id": 5}}))
            .set_delay(Duration::from_millis(500));
        answer_chat(&server, "-1004242", accepted, 0).await;
        let telegram = provider(&server.uri(), 10_000);
        let message = message(Some("-4242"));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1_000);
        // Cut at the deadline, as the channel actor cuts a send.
        let sent = tokio::time::timeout_at(deadline, telegram.send(&message, deadline)).await;
        match sent {
            Ok(Err(ProviderError::Transient { reason, .. })) => {
                assert!(reason.contains("too little time"), "{reason}")
            }
            other => panic!("no second request with 300 ms left: {other:?}"),
        }
        // Let a second request, had one been made, reach the server before it is verified.
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.verify().await;
    }

    #[tokio::test]
    async fn only_a_400_naming_another_chat_is_followed() {
        let moved_with = |status: u16, to: i64| {
            ResponseTemplate::new(status).set_body_json(serde_json::json!({
                "ok": false,
                "error_code": status,
                "description": "Bad Request: odd reply",
                "parameters": {"migrate_to_chat_id": to}
            }))
        };
        for (reply, what) in [
            (moved_with(403, -1_004_242), "a 403"),
            (moved_with(400, -4242), "a move to the same chat"),
        ] {
            let server = MockServer::start().await;
            answer_chat(&server, "-4242", reply, 1).await;
            answer_chat(&server, "-1004242", ResponseTemplate::new(200), 0).await;
            let error = provider(&server.uri(), 2_000)
                .send_now(&message(Some("-4242")))
                .await
                .expect_err(what);
            assert!(
                matches!(&error, ProviderError::Permanent { .. }),
                "{what}: {error:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_chat_that_moved_again_is_not_followed_a_second_time() {
        let server = MockServer::start().await;
        answer_chat(&server, "-4242", migrated_to(-1_004_242), 1).await;
        answer_chat(&server, "-1004242", migrated_to(-1_009_999), 1).await;
        let accepted = ResponseTemplate::new(200)
            .set_body_json(serde_json::json!({"ok": true, "result": {"message_id": 1}}));
        answer_chat(&server, "-1009999", accepted, 0).await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(Some("-4242")))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Permanent { reason, dead_contacts }
                if reason.contains("upgraded to a supergroup")
                    && reason.contains("-1009999")
                    && dead_contacts.is_empty()),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_revoked_bot_token_is_transient() {
        let (_server, provider) = reply_with(bot_error(401, "Unauthorized")).await;
        let error = provider.send_now(&message(Some("42"))).await.unwrap_err();
        assert_no_token(&error);
        assert!(
            matches!(&error, ProviderError::Transient { reason, .. } if reason.contains("401")),
            "the account is refused, not the message: {error:?}"
        );
    }

    /// The Bot API answers 404 "Not Found" to a path it does not know: a malformed or revoked
    /// token (it is part of the path), or a `base_url` that is not the Bot API. Every send fails
    /// alike until the configuration is fixed, so it is transient, as a 401 is, whatever its body
    /// (the Bot API's, another server's page, or lost midway), and no chat is declared dead.
    #[tokio::test]
    async fn a_404_for_the_bot_s_path_is_transient() {
        let (_server, bot_api) = reply_with(bot_error(404, "Not Found")).await;
        let error = bot_api.send_now(&message(Some("42"))).await.unwrap_err();
        assert_no_token(&error);
        assert!(
            matches!(&error, ProviderError::Transient { reason, dead_contacts, .. }
                if reason.contains("404") && reason.contains("bot token") && dead_contacts.is_empty()),
            "the bot's path is refused, not the chat: {error:?}"
        );
        let (_page, other) =
            reply_with(ResponseTemplate::new(404).set_body_string("<html>Not Found</html>")).await;
        let error = other.send_now(&message(Some("42"))).await.unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, .. } if reason.contains("404")),
            "another server's 404: {error:?}"
        );
        let lost = http::tests::cut_off_reply("HTTP/1.1 404 Not Found").await;
        let error = provider(&lost, 2_000)
            .send_now(&message(Some("42")))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ProviderError::Transient { reason, .. } if reason.contains("404")),
            "a 404 whose body was lost: {error:?}"
        );
    }

    #[tokio::test]
    async fn timeouts_are_transient_and_do_not_leak_the_token() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
            .mount(&server)
            .await;
        let error = provider(&server.uri(), 100)
            .send_now(&message(Some("42")))
            .await
            .unwrap_err();
        assert_no_token(&error);
        assert!(
            matches!(&error, ProviderError::Transient { reason, .. } if reason.contains("timed out")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn refused_connections_are_transient_and_do_not_leak_the_token() {
        // A port nobody listens on: bound, then released.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let error = provider(&uri, 2_000)
            .send_now(&message(Some("42")))
            .await
            .unwrap_err();
        assert_no_token(&error);
        assert!(
            matches!(error, ProviderError::Transient { .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn missing_chat_id_is_a_missing_contact() {
        let server = MockServer::start().await;
        let error = provider(&server.uri(), 2_000)
            .send_now(&message(None))
            .await
            .unwrap_err();
        assert_eq!(error, ProviderError::MissingContact(Channel::Telegram));
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    #[test]
    fn config_debug_redacts_the_token_and_an_empty_token_is_rejected() {
        let config = TelegramConfig {
            bot_token: TOKEN.into(),
            ..TelegramConfig::default()
        };
        assert!(!format!("{config:?}").contains("SECRET"));
        assert!(matches!(
            TelegramProvider::new("telegram".into(), TelegramConfig::default()),
            Err(TelegramConfigError::MissingToken)
        ));
    }
}
