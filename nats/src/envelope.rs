//! Versioned wire messages.
//!
//! Every envelope carries `v`, its schema version. A consumer decodes the version first and only
//! then the body, so an unknown version is told apart from a malformed message: both go to the
//! dead-letter stream with a precise reason instead of crashing a consumer.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::versioned::{self, Versioned, VersionedError};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u16 = 1;

/// Largest send command a dispatcher takes; a larger one is dead-lettered unread. Whoever makes a
/// command checks its size ([`SendCommand::check_size`]) before storing the notification, so
/// nothing is stored that could never be sent: the API for a send, the Router for an event's
/// notification, and the bulk API for every recipient of a batch when it accepts it (an upper
/// bound: the fan-out builds commands no larger).
pub const MAX_COMMAND_BYTES: usize = 640 * 1024;

/// A channel chain with each channel kept once, at its first place: a chain is walked in order, and
/// a channel twice in it would be called twice in one round.
pub fn distinct_channels(channels: impl IntoIterator<Item = Channel>) -> Vec<Channel> {
    let mut chain: Vec<Channel> = Vec::new();
    for channel in channels {
        if !chain.contains(&channel) {
            chain.push(channel);
        }
    }
    chain
}

/// A delivery channel; a notification walks a chain of these until one carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Email over SMTP.
    Email,
    /// Telegram Bot API message.
    Telegram,
    /// SMS through a Twilio-compatible API.
    Sms,
    /// Mobile push through an FCM-compatible API.
    Push,
    /// Signed HTTP webhook.
    Webhook,
}

impl Channel {
    /// Every channel, in a stable order.
    pub const ALL: [Channel; 5] = [
        Channel::Email,
        Channel::Telegram,
        Channel::Sms,
        Channel::Push,
        Channel::Webhook,
    ];

    /// The lowercase name used on the wire, in the database and in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Telegram => "telegram",
            Channel::Sms => "sms",
            Channel::Push => "push",
            Channel::Webhook => "webhook",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(name: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a notification is about; preferences, limits and default chains are set per category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// Order placed, shipped, delivered: expected by the customer.
    Transactional,
    /// Security alerts: critical, never opted out of, never delayed.
    Security,
    /// Account matters (welcome, password changed).
    Account,
    /// Campaigns and sales: opt-out-able, rate-limited.
    Marketing,
}

impl Category {
    /// Every category, in a stable order.
    pub const ALL: [Category; 4] = [
        Category::Transactional,
        Category::Security,
        Category::Account,
        Category::Marketing,
    ];

    /// The lowercase name used on the wire and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Transactional => "transactional",
            Category::Security => "security",
            Category::Account => "account",
            Category::Marketing => "marketing",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

/// How to reach a recipient on each channel. Absent contacts make that channel unusable, and the
/// chain moves on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contacts {
    /// Email address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Phone number in E.164 form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    /// Telegram chat id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telegram_chat_id: Option<String>,
    /// Device tokens for push.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push_tokens: Vec<String>,
    /// URL that receives signed webhooks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

impl Contacts {
    /// The key a recipient's sends are partitioned and rate-limited by: its customer id, else its
    /// first contact (email, phone, Telegram chat, push token, webhook URL).
    pub fn recipient_key(&self, customer_id: Option<&str>) -> Option<String> {
        customer_id
            .or(self.email.as_deref())
            .or(self.phone.as_deref())
            .or(self.telegram_chat_id.as_deref())
            .or(self.push_tokens.first().map(String::as_str))
            .or(self.webhook_url.as_deref())
            .map(str::to_string)
    }

    /// Fills every contact missing here from `other`.
    pub fn or(mut self, other: &Contacts) -> Contacts {
        self.email = self.email.or_else(|| other.email.clone());
        self.phone = self.phone.or_else(|| other.phone.clone());
        self.telegram_chat_id = self
            .telegram_chat_id
            .or_else(|| other.telegram_chat_id.clone());
        if self.push_tokens.is_empty() {
            self.push_tokens = other.push_tokens.clone();
        }
        self.webhook_url = self.webhook_url.or_else(|| other.webhook_url.clone());
        self
    }

    /// Whether this set holds a way to reach the recipient on `channel`.
    pub fn reaches(&self, channel: Channel) -> bool {
        match channel {
            Channel::Email => self.email.is_some(),
            Channel::Telegram => self.telegram_chat_id.is_some(),
            Channel::Sms => self.phone.is_some(),
            Channel::Push => !self.push_tokens.is_empty(),
            Channel::Webhook => self.webhook_url.is_some(),
        }
    }
}

/// A template to render at delivery, in the recipient's locale.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRef {
    /// The template's code (a compiled template or a runtime one).
    pub code: String,
    /// Its variables.
    #[serde(default)]
    pub variables: serde_json::Map<String, serde_json::Value>,
    /// A locale that overrides the recipient's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
}

/// The message: a subject for channels that have one, a plain text that every channel can carry,
/// and an optional HTML body for email — or, before delivery, a template that renders to them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    /// Subject line (email, push title).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Plain text body.
    pub text: String,
    /// HTML body for email.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// A short text for SMS, Telegram and push; `text` is used when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short: Option<String>,
    /// A template the dispatcher renders into the fields above at delivery (then `text` is empty
    /// until it has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateRef>,
}

impl Content {
    /// The text for short-message channels (SMS, Telegram, push).
    pub fn short_text(&self) -> &str {
        self.short.as_deref().unwrap_or(&self.text)
    }
}

/// A command to deliver one notification, published on `notify.cmd.<partition>` with the
/// notification id as `Nats-Msg-Id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendCommand {
    /// Schema version, [`SCHEMA_VERSION`] when written by this build.
    pub v: u16,
    /// The notification's id; also the provider idempotency key.
    pub notification_id: Uuid,
    /// The customer's external id, when the recipient is a known customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// Contacts given with the request; they take precedence over the customer's stored ones.
    #[serde(default)]
    pub contacts: Contacts,
    /// What the notification is about.
    pub category: Category,
    /// Channels to try, in order.
    pub channels: Vec<Channel>,
    /// The message to send.
    pub content: Content,
    /// When the notification was accepted.
    pub created_at: DateTime<Utc>,
}

/// Counts the bytes written to it.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why a message could not be decoded; the reason goes into the dead letter's headers.
#[derive(Debug, thiserror::Error)]
pub enum CommandDecodeError {
    /// Not JSON, or JSON without a numeric `v`.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// A version this build does not read.
    #[error("unknown schema version {0} (this build reads {SCHEMA_VERSION})")]
    UnknownVersion(u64),
    /// The right version but a body that does not fit it.
    #[error("invalid body for schema version {SCHEMA_VERSION}: {0}")]
    InvalidBody(String),
}

impl SendCommand {
    /// Encodes the command as JSON.
    pub fn encode(&self) -> Result<bytes::Bytes, serde_json::Error> {
        serde_json::to_vec(self).map(bytes::Bytes::from)
    }

    /// The length of [`SendCommand::encode`]'s output, counted without building it. JSON escapes
    /// quotes, backslashes and control characters, so a text's command can be larger than the
    /// text.
    pub fn encoded_len(&self) -> usize {
        let mut counter = ByteCounter(0);
        // Serialising these types cannot fail (string keys only), and the counter never does.
        let _ = serde_json::to_writer(&mut counter, self);
        counter.0
    }

    /// Whether the command is at most [`MAX_COMMAND_BYTES`] long; otherwise its length.
    pub fn check_size(&self) -> Result<(), usize> {
        self.check_len(MAX_COMMAND_BYTES)
    }

    /// Whether the command is at most `limit` bytes long; otherwise its length. One that could
    /// not reach the limit even with every byte of its texts escaped is not encoded to find out.
    pub fn check_len(&self, limit: usize) -> Result<(), usize> {
        if self.most_encoded_len().is_some_and(|most| most <= limit) {
            return Ok(());
        }
        match self.encoded_len() {
            len if len > limit => Err(len),
            _ => Ok(()),
        }
    }

    /// The most [`SendCommand::encoded_len`] can be, counted from the lengths of its texts
    /// (JSON writes a byte as at most six, `\u00XX`) and a margin for its field names, ids and
    /// times; `None` for a template's, whose variables are not counted here.
    fn most_encoded_len(&self) -> Option<usize> {
        if self.content.template.is_some() {
            return None;
        }
        let (content, contacts) = (&self.content, &self.contacts);
        let texts = [
            content.subject.as_deref(),
            Some(content.text.as_str()),
            content.html.as_deref(),
            content.short.as_deref(),
            self.customer_id.as_deref(),
            contacts.email.as_deref(),
            contacts.phone.as_deref(),
            contacts.telegram_chat_id.as_deref(),
            contacts.webhook_url.as_deref(),
        ];
        let bytes: usize = texts.iter().flatten().map(|text| text.len()).sum::<usize>()
            + contacts.push_tokens.iter().map(String::len).sum::<usize>();
        let separators = 3 * contacts.push_tokens.len() + 12 * self.channels.len();
        Some(6 * bytes + separators + 1024)
    }

    /// Decodes a command, telling a malformed message from an unknown version. A command is
    /// parsed once; only one that does not decode is read again for its version, to say why
    /// (reading every command's version first cost about 40% of the decode).
    pub fn decode(payload: &[u8]) -> Result<SendCommand, CommandDecodeError> {
        versioned::decode(payload).map_err(|err| match err {
            VersionedError::Malformed(e) => CommandDecodeError::Malformed(e.to_string()),
            VersionedError::UnknownVersion(v) => CommandDecodeError::UnknownVersion(v),
            VersionedError::InvalidBody(e) => CommandDecodeError::InvalidBody(e.to_string()),
        })
    }
}

impl Versioned for SendCommand {
    const VERSION: u16 = SCHEMA_VERSION;

    fn version(&self) -> u16 {
        self.v
    }
}

/// A status transition, published on `notify.status.<status>` for observers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusEvent {
    /// Schema version.
    pub v: u16,
    /// The notification concerned.
    pub notification_id: Uuid,
    /// The new status (`sent`, `failed`, `dead`, ...).
    pub status: String,
    /// The channel that carried it, when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Channel>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the transition happened.
    pub at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> SendCommand {
        SendCommand {
            v: SCHEMA_VERSION,
            notification_id: Uuid::now_v7(),
            customer_id: Some("c-1".into()),
            contacts: Contacts {
                email: Some("a@example.com".into()),
                ..Contacts::default()
            },
            category: Category::Transactional,
            channels: vec![Channel::Telegram, Channel::Email],
            content: Content {
                subject: Some("Hi".into()),
                text: "Hello".into(),
                html: None,
                short: Some("Hi!".into()),
                template: None,
            },
            created_at: Utc::now(),
        }
    }

    #[test]
    fn command_round_trips() {
        let cmd = command();
        let bytes = cmd.encode().unwrap();
        assert_eq!(SendCommand::decode(&bytes).unwrap(), cmd);
    }

    #[test]
    fn encoded_len_is_the_encoding_s_length_escapes_included() {
        let mut cmd = command();
        cmd.content.text = "\"line\"\n\u{1}".repeat(1000);
        assert_eq!(cmd.encoded_len(), cmd.encode().unwrap().len());
        assert!(cmd.encoded_len() > cmd.content.text.len() + 1000);
    }

    #[test]
    fn the_most_a_command_can_take_is_at_least_what_it_takes() {
        let mut cmd = command();
        cmd.contacts.push_tokens = vec!["t\"".into(), "\u{7}".into()];
        for text in ["", "plain", "\"\\\n\u{1}\u{1f}", "ünïcødé ✓"] {
            cmd.content.text = text.repeat(100);
            cmd.content.html = Some(text.into());
            let most = cmd.most_encoded_len().expect("literal content");
            assert!(most >= cmd.encoded_len(), "{most} < {}", cmd.encoded_len());
        }
        cmd.content.template = Some(TemplateRef {
            code: "welcome".into(),
            variables: Default::default(),
            locale: None,
        });
        assert_eq!(cmd.most_encoded_len(), None, "variables are not counted");
    }

    #[test]
    fn check_size_refuses_a_command_escaping_beyond_the_limit() {
        let mut cmd = command();
        cmd.content.text = "a".repeat(MAX_COMMAND_BYTES / 2);
        assert_eq!(cmd.check_size(), Ok(()));
        // The same number of characters, each escaped to two bytes.
        cmd.content.text = "\n".repeat(MAX_COMMAND_BYTES / 2);
        let len = cmd.check_size().expect_err("twice as long as JSON");
        assert_eq!(len, cmd.encode().unwrap().len());
    }

    #[test]
    fn decode_tells_malformed_from_unknown_version_from_bad_body() {
        assert!(matches!(
            SendCommand::decode(b"not json"),
            Err(CommandDecodeError::Malformed(_))
        ));
        assert!(matches!(
            SendCommand::decode(br#"{"v": 99, "anything": 1}"#),
            Err(CommandDecodeError::UnknownVersion(99))
        ));
        assert!(matches!(
            SendCommand::decode(br#"{"v": 1, "notification_id": "nope"}"#),
            Err(CommandDecodeError::InvalidBody(_))
        ));
        assert!(matches!(
            SendCommand::decode(&[0xff, 0xfe, 0x00]),
            Err(CommandDecodeError::Malformed(_))
        ));
        // Another version whose body this one would read is still another version.
        let later = SendCommand {
            v: SCHEMA_VERSION + 1,
            ..command()
        };
        let later = later.encode().expect("encoded");
        assert!(matches!(
            SendCommand::decode(&later),
            Err(CommandDecodeError::UnknownVersion(v)) if v == u64::from(SCHEMA_VERSION) + 1
        ));
    }

    #[test]
    fn channel_and_category_names_round_trip() {
        for c in Channel::ALL {
            assert_eq!(Channel::parse(c.as_str()), Some(c));
            assert_eq!(serde_json::to_string(&c).unwrap(), format!("\"{c}\""));
        }
        for c in Category::ALL {
            assert_eq!(Category::parse(c.as_str()), Some(c));
        }
        assert_eq!(Channel::parse("pigeon"), None);
    }

    #[test]
    fn contacts_merge_prefers_own_values() {
        let own = Contacts {
            email: Some("own@example.com".into()),
            ..Contacts::default()
        };
        let stored = Contacts {
            email: Some("stored@example.com".into()),
            phone: Some("+4915100000".into()),
            ..Contacts::default()
        };
        let merged = own.or(&stored);
        assert_eq!(merged.email.as_deref(), Some("own@example.com"));
        assert_eq!(merged.phone.as_deref(), Some("+4915100000"));
        assert!(merged.reaches(Channel::Sms) && !merged.reaches(Channel::Telegram));
    }
}
