//! `/api/v1/notifications`: send one, read one.

use chrono::{DateTime, Utc};
use herald_entities::{
    NotificationStatus, delivery_attempt, notification,
    repo::notifications::{self as repo, Inserted, NewNotification},
};
use herald_nats::{Category, Channel, Contacts, Content, SCHEMA_VERSION, SendCommand};
use poem_openapi::{
    ApiResponse, Enum, Object, OpenApi, Tags,
    param::{Header, Path},
    payload::Json,
};
use uuid::Uuid;

use crate::{ApiError, AppState};

/// Longest subject accepted.
const MAX_SUBJECT: usize = 998;
/// Longest text or HTML body accepted.
const MAX_BODY: usize = 256 * 1024;
/// Longest request id accepted.
const MAX_REQUEST_ID: usize = 200;

#[derive(Tags)]
enum NotificationTags {
    /// Sending notifications and reading their status.
    Notifications,
}

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "Channel", rename_all = "lowercase")]
pub enum ApiChannel {
    /// Email.
    Email,
    /// Telegram.
    Telegram,
    /// SMS.
    Sms,
    /// Mobile push.
    Push,
    /// Signed webhook.
    Webhook,
}

impl From<ApiChannel> for Channel {
    fn from(c: ApiChannel) -> Self {
        match c {
            ApiChannel::Email => Channel::Email,
            ApiChannel::Telegram => Channel::Telegram,
            ApiChannel::Sms => Channel::Sms,
            ApiChannel::Push => Channel::Push,
            ApiChannel::Webhook => Channel::Webhook,
        }
    }
}

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "Category", rename_all = "lowercase")]
pub enum ApiCategory {
    /// Orders and payments.
    Transactional,
    /// Security alerts (critical).
    Security,
    /// Account matters.
    Account,
    /// Campaigns.
    Marketing,
}

impl From<ApiCategory> for Category {
    fn from(c: ApiCategory) -> Self {
        match c {
            ApiCategory::Transactional => Category::Transactional,
            ApiCategory::Security => Category::Security,
            ApiCategory::Account => Category::Account,
            ApiCategory::Marketing => Category::Marketing,
        }
    }
}

/// Who receives the notification: a known customer, contacts, or both (contacts given here win).
#[derive(Debug, Clone, Default, Object)]
pub struct Recipient {
    /// The customer's external id.
    pub customer_id: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Phone number in E.164 form (`+4915112345678`).
    pub phone: Option<String>,
    /// Telegram chat id.
    pub telegram_chat_id: Option<String>,
    /// Push device tokens.
    #[oai(default)]
    pub push_tokens: Vec<String>,
    /// URL for signed webhooks (http or https).
    pub webhook_url: Option<String>,
}

/// The message to send.
#[derive(Debug, Clone, Object)]
pub struct MessageContent {
    /// Subject (email) or title (push).
    pub subject: Option<String>,
    /// Plain-text body; every channel can carry it.
    pub text: String,
    /// HTML body for email.
    pub html: Option<String>,
    /// Short text for SMS, Telegram and push (at most 1600 characters); `text` when absent.
    pub short: Option<String>,
}

/// A request to send one notification.
#[derive(Debug, Clone, Object)]
pub struct SendRequest {
    /// Your idempotency key: repeating a request with the same id answers the first result and
    /// sends nothing more.
    pub request_id: Option<String>,
    /// Who receives it.
    pub recipient: Recipient,
    /// What it is about; decides the default channel chain.
    pub category: ApiCategory,
    /// Channels to try in order; the category's default chain when absent.
    pub channels: Option<Vec<ApiChannel>>,
    /// The message.
    pub content: MessageContent,
}

/// The answer to an accepted send.
#[derive(Debug, Clone, Object)]
pub struct Accepted {
    /// The notification's id.
    pub id: Uuid,
    /// Its status now (`queued` when new; the current one for a repeated request).
    pub status: String,
}

/// Responses of `POST /api/v1/notifications`.
#[derive(ApiResponse)]
pub enum SendResponse {
    /// Accepted: stored and queued for delivery.
    #[oai(status = 202)]
    Accepted(Json<Accepted>),
    /// A repeat of an earlier request id: the original notification, nothing new sent.
    #[oai(status = 200)]
    Repeated(Json<Accepted>),
}

/// One delivery attempt.
#[derive(Debug, Clone, Object)]
pub struct AttemptView {
    /// Attempt number within the notification.
    pub attempt_no: i32,
    /// Channel.
    pub channel: String,
    /// Provider.
    pub provider: String,
    /// `sent`, `failed`, `rejected`, `circuit_open`, `no_contact`, `unavailable`.
    pub status: String,
    /// Error text.
    pub error: Option<String>,
    /// The provider's message id.
    pub provider_message_id: Option<String>,
    /// Provider latency in milliseconds.
    pub latency_ms: i64,
    /// When it finished.
    pub at: DateTime<Utc>,
}

/// A notification with its attempts.
#[derive(Debug, Clone, Object)]
pub struct NotificationView {
    /// Id.
    pub id: Uuid,
    /// The caller's request id.
    pub request_id: Option<String>,
    /// Customer external id.
    pub customer_id: Option<String>,
    /// Category.
    pub category: String,
    /// Channel chain.
    pub channels: Vec<String>,
    /// `queued`, `scheduled`, `processing`, `sent`, `delivered`, `failed`, `skipped`, `cancelled`, `dead`.
    pub status: String,
    /// Why it is in this status (skipped, retrying, dead), in words.
    pub status_reason: Option<String>,
    /// The channel that carried it.
    pub final_channel: Option<String>,
    /// Last error.
    pub error: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When a provider accepted it.
    pub sent_at: Option<DateTime<Utc>>,
    /// Every attempt, in order.
    pub attempts: Vec<AttemptView>,
}

/// Notification endpoints.
pub struct NotificationsApi {
    state: AppState,
}

impl NotificationsApi {
    /// The endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "NotificationTags::Notifications")]
impl NotificationsApi {
    /// Send a notification.
    ///
    /// Validates the request, stores the notification as `queued`, publishes its send command to
    /// NATS and answers 202 with its id. A repeated `request_id` (or `Idempotency-Key` header)
    /// answers 200 with the original notification and sends nothing. If NATS or the database is
    /// unavailable nothing is accepted (503): retry with the same request id.
    #[oai(path = "/notifications", method = "post")]
    async fn send(
        &self,
        body: Json<SendRequest>,
        /// Idempotency key; used when the body has no `request_id`.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
    ) -> Result<SendResponse, ApiError> {
        let mut request = body.0;
        if request.request_id.is_none() {
            request.request_id = idempotency_key.0;
        }
        let accepted = validate(request, &self.state)?;
        let new = accepted.row();
        let command = accepted.command;
        match repo::insert(&self.state.db, new).await? {
            Inserted::Duplicate(existing) => Ok(SendResponse::Repeated(Json(Accepted {
                id: existing.id,
                status: existing.status.as_str().into(),
            }))),
            Inserted::New(row) => {
                if let Err(err) = self
                    .state
                    .publisher
                    .publish_command(&row.recipient_key, &command)
                    .await
                {
                    tracing::warn!(id = %row.id, error = %err, "cannot publish; not accepted");
                    repo::delete_unpublished(&self.state.db, row.id).await?;
                    return Err(ApiError::unavailable(
                        "the message queue is unavailable; nothing was accepted, retry later",
                    ));
                }
                metrics::counter!("herald_notifications_accepted_total").increment(1);
                Ok(SendResponse::Accepted(Json(Accepted {
                    id: row.id,
                    status: row.status.as_str().into(),
                })))
            }
        }
    }

    /// Read a notification's status and every delivery attempt.
    #[oai(path = "/notifications/:id", method = "get")]
    async fn get(&self, id: Path<Uuid>) -> Result<Json<NotificationView>, ApiError> {
        match repo::find_with_attempts(&self.state.db, id.0).await? {
            Some((row, attempts)) => Ok(Json(view(row, attempts))),
            None => Err(ApiError::not_found(format!("no notification {}", id.0))),
        }
    }
}

/// A validated request, ready to store and publish.
struct ValidSend {
    command: SendCommand,
    request_id: Option<String>,
    recipient_key: String,
}

impl ValidSend {
    fn row(&self) -> NewNotification {
        new_notification(
            &self.command,
            self.recipient_key.clone(),
            self.request_id.clone(),
        )
    }
}

/// The row that records an accepted command as `queued`.
pub fn new_notification(
    command: &SendCommand,
    recipient_key: String,
    request_id: Option<String>,
) -> NewNotification {
    NewNotification {
        id: command.notification_id,
        request_id,
        customer_id: command.customer_id.clone(),
        recipient_key,
        contacts: serde_json::to_value(&command.contacts).unwrap_or_default(),
        category: command.category.as_str().into(),
        channels: serde_json::to_value(&command.channels).unwrap_or_default(),
        content: serde_json::to_value(&command.content).unwrap_or_default(),
        status: NotificationStatus::Queued,
        scheduled_at: None,
        created_at: command.created_at,
    }
}

fn validate(request: SendRequest, state: &AppState) -> Result<ValidSend, ApiError> {
    let request_id = match request.request_id {
        Some(id) if id.trim().is_empty() || id.len() > MAX_REQUEST_ID => {
            return Err(ApiError::invalid(
                "request_id",
                format!("request_id must be 1 to {MAX_REQUEST_ID} characters"),
            ));
        }
        other => other,
    };
    let contacts = validate_recipient(&request.recipient)?;
    let customer_id = request.recipient.customer_id.clone();
    if let Some(id) = &customer_id
        && (id.trim().is_empty() || id.len() > 200)
    {
        return Err(ApiError::invalid(
            "recipient.customer_id",
            "customer_id must be 1 to 200 characters",
        ));
    }
    let recipient_key = customer_id
        .clone()
        .or_else(|| contacts.email.clone())
        .or_else(|| contacts.phone.clone())
        .or_else(|| contacts.telegram_chat_id.clone())
        .or_else(|| contacts.push_tokens.first().cloned())
        .or_else(|| contacts.webhook_url.clone())
        .ok_or_else(|| {
            ApiError::invalid(
                "recipient",
                "name a customer_id or give at least one contact",
            )
        })?;
    let category: Category = request.category.into();
    let channels: Vec<Channel> = match request.channels {
        Some(list) if list.is_empty() => {
            return Err(ApiError::invalid(
                "channels",
                "channels must not be empty; omit it for the category's default chain",
            ));
        }
        Some(list) => dedup(list.into_iter().map(Channel::from)),
        None => state
            .default_chains
            .get(&category)
            .cloned()
            .unwrap_or_else(|| vec![Channel::Email]),
    };
    let content = validate_content(request.content)?;
    Ok(ValidSend {
        command: SendCommand {
            v: SCHEMA_VERSION,
            notification_id: Uuid::now_v7(),
            customer_id,
            contacts,
            category,
            channels,
            content,
            created_at: Utc::now(),
        },
        request_id,
        recipient_key,
    })
}

fn dedup(channels: impl Iterator<Item = Channel>) -> Vec<Channel> {
    let mut out: Vec<Channel> = Vec::new();
    for channel in channels {
        if !out.contains(&channel) {
            out.push(channel);
        }
    }
    out
}

fn validate_recipient(recipient: &Recipient) -> Result<Contacts, ApiError> {
    let trimmed = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let email = trimmed(&recipient.email);
    if let Some(email) = &email
        && (email.len() > 254 || !looks_like_email(email))
    {
        return Err(ApiError::invalid("recipient.email", "not an email address"));
    }
    let phone = trimmed(&recipient.phone);
    if let Some(phone) = &phone
        && !is_e164(phone)
    {
        return Err(ApiError::invalid(
            "recipient.phone",
            "phone must be in E.164 form, e.g. +4915112345678",
        ));
    }
    let webhook_url = trimmed(&recipient.webhook_url);
    if let Some(url) = &webhook_url
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return Err(ApiError::invalid(
            "recipient.webhook_url",
            "webhook_url must be an http(s) URL",
        ));
    }
    let push_tokens: Vec<String> = recipient
        .push_tokens
        .iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    if push_tokens.len() > 20 || push_tokens.iter().any(|t| t.len() > 4096) {
        return Err(ApiError::invalid(
            "recipient.push_tokens",
            "at most 20 push tokens of at most 4096 characters",
        ));
    }
    Ok(Contacts {
        email,
        phone,
        telegram_chat_id: trimmed(&recipient.telegram_chat_id),
        push_tokens,
        webhook_url,
    })
}

fn looks_like_email(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    }
}

fn is_e164(s: &str) -> bool {
    let digits = s.strip_prefix('+').unwrap_or("");
    (8..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit())
}

fn validate_content(content: MessageContent) -> Result<Content, ApiError> {
    if content.text.trim().is_empty() {
        return Err(ApiError::invalid("content.text", "text must not be empty"));
    }
    if content.text.len() > MAX_BODY {
        return Err(ApiError::invalid(
            "content.text",
            format!("text is longer than {MAX_BODY} bytes"),
        ));
    }
    if content.html.as_ref().is_some_and(|h| h.len() > MAX_BODY) {
        return Err(ApiError::invalid(
            "content.html",
            format!("html is longer than {MAX_BODY} bytes"),
        ));
    }
    if let Some(subject) = &content.subject
        && (subject.len() > MAX_SUBJECT || subject.contains(['\r', '\n']))
    {
        return Err(ApiError::invalid(
            "content.subject",
            format!("subject must be one line of at most {MAX_SUBJECT} bytes"),
        ));
    }
    if content
        .short
        .as_ref()
        .is_some_and(|s| s.chars().count() > 1600 || s.trim().is_empty())
    {
        return Err(ApiError::invalid(
            "content.short",
            "short must be 1 to 1600 characters",
        ));
    }
    Ok(Content {
        subject: content.subject,
        text: content.text,
        html: content.html,
        short: content.short,
    })
}

fn view(row: notification::Model, attempts: Vec<delivery_attempt::Model>) -> NotificationView {
    NotificationView {
        id: row.id,
        request_id: row.request_id,
        customer_id: row.customer_id,
        category: row.category,
        channels: serde_json::from_value(row.channels).unwrap_or_default(),
        status: row.status.as_str().into(),
        status_reason: row.status_reason,
        final_channel: row.final_channel,
        error: row.error,
        created_at: row.created_at,
        updated_at: row.updated_at,
        sent_at: row.sent_at,
        attempts: attempts
            .into_iter()
            .map(|a| AttemptView {
                attempt_no: a.attempt_no,
                channel: a.channel,
                provider: a.provider,
                status: a.status,
                error: a.error,
                provider_message_id: a.provider_message_id,
                latency_ms: a.latency_ms,
                at: a.created_at,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_and_phone_checks() {
        assert!(looks_like_email("ada@example.com"));
        assert!(!looks_like_email("ada@example"));
        assert!(!looks_like_email("@example.com"));
        assert!(!looks_like_email("a da@example.com"));
        assert!(is_e164("+4915112345678"));
        assert!(!is_e164("015112345678"));
        assert!(!is_e164("+49 151 1234"));
    }

    #[test]
    fn recipient_needs_a_valid_contact_shape() {
        let bad = Recipient {
            email: Some("nope".into()),
            ..Recipient::default()
        };
        let err = validate_recipient(&bad).unwrap_err();
        assert!(
            matches!(err, ApiError::BadRequest(body) if body.0.field.as_deref() == Some("recipient.email"))
        );
        let ok = Recipient {
            email: Some("  ada@example.com ".into()),
            push_tokens: vec!["".into(), "tok".into()],
            ..Recipient::default()
        };
        let contacts = validate_recipient(&ok).unwrap();
        assert_eq!(contacts.email.as_deref(), Some("ada@example.com"));
        assert_eq!(contacts.push_tokens, vec!["tok".to_string()]);
    }

    #[test]
    fn content_rules() {
        let content = |subject: Option<&str>, text: &str| MessageContent {
            subject: subject.map(str::to_string),
            text: text.into(),
            html: None,
            short: None,
        };
        assert!(validate_content(content(None, "  ")).is_err());
        assert!(validate_content(content(Some("a\r\nBcc: x"), "hi")).is_err());
        assert!(validate_content(content(Some("Order shipped"), "hi")).is_ok());
    }

    #[test]
    fn channel_chain_is_deduplicated_in_order() {
        let chain = dedup([Channel::Telegram, Channel::Email, Channel::Telegram].into_iter());
        assert_eq!(chain, vec![Channel::Telegram, Channel::Email]);
    }
}
