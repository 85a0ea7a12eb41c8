//! `/api/v1/notifications`: send one, read one.

use std::time::Instant;

use chrono::{DateTime, Utc};
use herald_entities::{
    NotificationStatus, delivery_attempt, notification,
    repo::{
        cancel_events::cancelled_event,
        notifications::{self as repo, Inserted, NewNotification},
        schedule::PUBLISH_PENDING,
    },
};
use herald_nats::{
    Category, Channel, CommandRoom, Contacts, Content, MAX_COMMAND_BYTES, SCHEMA_VERSION,
    SendCommand, distinct_channels,
};
use poem_openapi::{
    ApiResponse, Enum, Object, OpenApi, Tags,
    param::{Header, Path, Query},
    payload::Json,
};
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{
    ApiError, AppState,
    auth::{ReadKey, SendKey},
    history::{self, ApiStatus, HistoryTags, ListQuery, NotificationPage},
    idempotency,
    validate::{self, RawContacts},
};
// The property tests (`notifications_props.rs`) check these shape validators too.
#[cfg(test)]
use crate::validate::{is_e164, looks_like_email};

/// Longest subject accepted.
const MAX_SUBJECT: usize = 998;
/// Longest text or HTML body accepted.
const MAX_BODY: usize = 256 * 1024;
/// Largest template variables object accepted, as JSON.
const MAX_VARIABLES: usize = 64 * 1024;
/// Furthest ahead a send may be scheduled, in days.
const MAX_SCHEDULE_DAYS: i64 = 366;

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
#[oai(deny_unknown_fields)]
pub struct Recipient {
    /// The customer's external id (1 to 200 characters, no `/`; surrounding spaces are dropped).
    pub customer_id: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Phone number in E.164 form (`+4915112345678`).
    pub phone: Option<String>,
    /// Telegram chat id (at most 2,048 characters).
    pub telegram_chat_id: Option<String>,
    /// Push device tokens (at most 20, each at most 2,048 characters).
    #[oai(default)]
    pub push_tokens: Vec<String>,
    /// URL for signed webhooks (http or https with a host, at most 2,048 characters; not an
    /// internal IP address unless `channels.webhook.allow_private_targets`).
    pub webhook_url: Option<String>,
}

/// The message to send.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
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

/// A template to render at delivery instead of literal content.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct TemplateUse {
    /// The template's code (`GET /api/v1/templates` lists them).
    pub code: String,
    /// Its variables, as a JSON object.
    pub variables: Option<Value>,
    /// Locale to render in; the recipient customer's locale, then the default locale, when absent.
    pub locale: Option<String>,
}

/// A request to send one notification.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct SendRequest {
    /// Your idempotency key: repeating a request with the same id answers the first result and
    /// sends nothing more, also when what it was checked against has changed since (its
    /// template deleted, its channels' providers removed). The repeat must be the same request
    /// (key order, whitespace between fields and surrounding spaces of contacts and
    /// `customer_id` aside; spaces inside texts count): another request with a used id is
    /// refused with 422 `idempotency_key_reused`, whose `field` names where the id came from
    /// (`request_id`, or `Idempotency-Key` for the header).
    pub request_id: Option<String>,
    /// Who receives it.
    pub recipient: Recipient,
    /// What it is about; decides the default channel chain.
    pub category: ApiCategory,
    /// Channels to try in order; the category's default chain when absent. `400` when no
    /// provider is configured for any of them (see `GET /api/v1/channels`).
    pub channels: Option<Vec<ApiChannel>>,
    /// The message; give either this or `template`.
    pub content: Option<MessageContent>,
    /// A template rendered at delivery in the recipient's locale; give either this or `content`.
    pub template: Option<TemplateUse>,
    /// Send at this time (RFC 3339) instead of now: stored as `scheduled`, published when due,
    /// cancellable until then. A time not in the future sends at once.
    pub scheduled_at: Option<DateTime<Utc>>,
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
    /// A repeat of an earlier request (its request id, the same request): the original
    /// notification, nothing new sent.
    #[oai(status = 200)]
    Repeated(Json<Accepted>),
}

/// One delivery attempt.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct AttemptView {
    /// Attempt number within the notification.
    pub attempt_no: i32,
    /// Channel.
    pub channel: String,
    /// Provider.
    pub provider: String,
    /// `sent`, `failed` (transient), `rejected` (permanent), `circuit_open`, `not_started` (not
    /// sent: its channel's send queue was too long to finish in time), `no_contact`,
    /// `unavailable` (no provider configured), `opted_out` (the customer opted out of the
    /// category on that channel), `refused_earlier` (not called: it refused the notification for
    /// good, `rejected` or `no_contact`, in an earlier round of its retries).
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
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
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
    /// The error that ended the last round over the chain: while it waits for a retry, or why it
    /// failed or died. Cleared once it is sent (every attempt keeps its own error).
    pub error: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When a provider accepted it.
    pub sent_at: Option<DateTime<Utc>>,
    /// When a scheduled notification is (or was) due.
    pub scheduled_at: Option<DateTime<Utc>>,
    /// The bulk send it belongs to.
    pub batch_id: Option<Uuid>,
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

// Tagged operation by operation: the history list is declared here, as its path is the send's
// (see `history::list`), under its own tag.
#[OpenApi(prefix_path = "/api/v1")]
impl NotificationsApi {
    /// Send a notification.
    ///
    /// Validates the request, stores the notification as `queued`, publishes its send command to
    /// NATS and answers 202 with its id. A repeated `request_id` (or `Idempotency-Key` header)
    /// answers 200 with the original notification and sends nothing new; if the original's
    /// command is not yet confirmed published (it is `queued` and its first request is still
    /// publishing, failed to, or stopped in between), it is published again (JetStream drops it
    /// when the first publish arrived), so a retry completes a send whose first attempt stopped
    /// between storing and publishing; without a retry the Scheduler publishes such a command
    /// after `scheduler.stale_claim_secs`. Otherwise a repeat publishes nothing (and so is
    /// answered also while NATS is unavailable). A send whose publish reports a failure although
    /// its command got out (the acknowledgement lost) and a dispatcher claimed it is answered
    /// 202: it is going out. A repeat is answered so also when the request would be
    /// refused now (its template deleted since, say). A request id used before for a different
    /// request (another recipient, category, channel list, message or schedule) answers 422
    /// `idempotency_key_reused` and changes nothing. A notification whose send command would be
    /// larger than the NATS server's `max_payload`, scheduled or not, answers 413 naming the
    /// sizes and stores nothing (a retry would be refused again). If NATS or the database is
    /// unavailable the answer is 503: usually nothing was accepted, but when the publish fails
    /// and the database cannot withdraw the stored notification either, it stays `queued` and the
    /// Scheduler publishes it after `scheduler.stale_claim_secs` (the message says it may still
    /// be sent). Either way, retry only with the same request id.
    #[oai(
        path = "/notifications",
        method = "post",
        tag = "NotificationTags::Notifications"
    )]
    async fn send(
        &self,
        _auth: SendKey,
        body: Json<SendRequest>,
        /// Idempotency key; used when the body has no `request_id`.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
    ) -> Result<SendResponse, ApiError> {
        let mut request = body.0;
        let request_id = idempotency::request_id(request.request_id.take(), idempotency_key.0)?;
        let checked = check(request)?;
        let key = request_id
            .map(|id| idempotency::Keyed::new(id, &checked.meaning()))
            .transpose()?;
        let accepted = match accept(&self.state, checked).await {
            Ok(accepted) => accepted,
            Err(refusal) => {
                let db = &self.state.db;
                let find = async |id: &str| repo::find_by_request_id(db, id).await;
                let (key, existing) = idempotency::stored_before(key, refusal, find).await?;
                return repeated(&self.state, &key, existing).await;
            }
        };
        let new = accepted.row(key.as_ref());
        let command = accepted.command;
        let scheduled = new.status == NotificationStatus::Scheduled;
        let storing = Instant::now();
        let inserted = self.state.inserts.insert(new).await;
        record_stage("store", storing);
        match inserted? {
            Inserted::Duplicate(existing) => {
                let key = idempotency::of_duplicate(key.as_ref(), existing.id)?;
                repeated(&self.state, key, existing).await
            }
            Inserted::New(row) if scheduled => {
                metrics::counter!("herald_notifications_accepted_total", "source" => "api")
                    .increment(1);
                metrics::counter!("herald_notifications_scheduled_total").increment(1);
                Ok(SendResponse::Accepted(Json(Accepted {
                    id: row.id,
                    status: row.status.as_str().into(),
                })))
            }
            Inserted::New(row) => {
                let published = publish(&self.state, &row.recipient_key, &command).await;
                if let Err(err) = published {
                    return publish_failed(&self.state, row.id, &err).await;
                }
                self.state.inserts.confirm_published(row.id);
                // Counted once accepted for sure: a send that could not be published was removed
                // (not accepted), and a repeated request answers above without counting.
                metrics::counter!("herald_notifications_accepted_total", "source" => "api")
                    .increment(1);
                Ok(SendResponse::Accepted(Json(Accepted {
                    id: row.id,
                    status: row.status.as_str().into(),
                })))
            }
        }
    }

    /// List notifications, newest first, with filters and cursor pagination.
    ///
    /// Filters combine with AND. `channel` is the channel that carried the notification.
    /// `created_from` is inclusive, `created_to` exclusive. Pass the answer's `next_cursor` as
    /// `cursor` for the next page; the filters must stay the same. Every notification that exists
    /// when paging starts is listed exactly once.
    #[allow(clippy::too_many_arguments)]
    #[oai(path = "/notifications", method = "get", tag = "HistoryTags::History")]
    async fn list(
        &self,
        _auth: ReadKey,
        /// Customer external id.
        #[oai(validator(max_length = 200))]
        customer_id: Query<Option<String>>,
        /// Current status.
        status: Query<Option<ApiStatus>>,
        /// The channel that carried it.
        channel: Query<Option<ApiChannel>>,
        /// Category.
        category: Query<Option<ApiCategory>>,
        /// Accepted at or after (RFC 3339).
        created_from: Query<Option<DateTime<Utc>>>,
        /// Accepted before (RFC 3339).
        created_to: Query<Option<DateTime<Utc>>>,
        /// `next_cursor` of the previous page.
        #[oai(validator(max_length = 64))]
        cursor: Query<Option<String>>,
        /// Page size, 1 to 500 (default 50).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u32>>,
    ) -> Result<Json<NotificationPage>, ApiError> {
        let query = ListQuery {
            customer_id: customer_id.0,
            status: status.0,
            channel: channel.0,
            category: category.0,
            created_from: created_from.0,
            created_to: created_to.0,
            cursor: cursor.0,
            limit: limit.0,
        };
        history::list(&self.state, query).await.map(Json)
    }

    /// Read a notification's status and every delivery attempt.
    #[oai(
        path = "/notifications/:id",
        method = "get",
        tag = "NotificationTags::Notifications"
    )]
    async fn get(
        &self,
        _auth: ReadKey,
        id: Path<Uuid>,
    ) -> Result<Json<NotificationView>, ApiError> {
        find_view(&self.state, id.0).await.map(Json)
    }

    /// Cancel a notification before it goes out.
    ///
    /// Only a `scheduled` notification, or a `queued` one no dispatcher has picked up yet, can be
    /// cancelled; any other status answers 409 naming it. A dispatcher marks a notification
    /// `processing` before it sends, so a `cancelled` answer means it is not sent. A notification
    /// held back by the recipient's quiet hours or rate limit stays `processing` while it waits,
    /// and cannot be cancelled, unless the hold is long enough for it to wait as `scheduled`
    /// (`dispatch.schedule_deferrals_after_secs`).
    #[oai(
        path = "/notifications/:id/cancel",
        method = "post",
        tag = "NotificationTags::Notifications"
    )]
    async fn cancel(
        &self,
        _auth: SendKey,
        id: Path<Uuid>,
    ) -> Result<Json<NotificationView>, ApiError> {
        cancel(&self.state, id.0, "cancelled by API request")
            .await
            .map(Json)
    }
}

/// Records how long a stage of `POST /notifications` took (`store`: the insert queue's commit;
/// `publish`: JetStream's acknowledgement, also for a repeated request published again), failed
/// or not, so an operator can tell which one a slow send waits on.
fn record_stage(stage: &'static str, started: Instant) {
    metrics::histogram!("herald_api_send_stage_seconds", "stage" => stage)
        .record(started.elapsed().as_secs_f64());
}

/// Publishes `command` and records the wait for JetStream's acknowledgement as the `publish`
/// stage.
async fn publish(
    state: &AppState,
    recipient_key: &str,
    command: &SendCommand,
) -> Result<(), herald_nats::NatsError> {
    let publishing = Instant::now();
    let published = state
        .publisher
        .publish_command(recipient_key, command)
        .await;
    record_stage("publish", publishing);
    published
}

/// The 503 message when a send's publish failed and its notification could not be withdrawn
/// either (the database unavailable too).
const MAY_STILL_BE_SENT: &str = "the message queue and the database are unavailable; the \
     notification was stored and could not be withdrawn, so it may still be sent; retry only \
     with the same request_id";

/// Answers a send whose publish reported a failure: removes its notification and answers 503
/// (nothing was accepted; 413 when the command is larger than the NATS server's `max_payload`,
/// which no retry mends; a 503 saying it may still be sent when the database cannot remove it
/// either: it stays `queued` and the Scheduler publishes it), unless the notification is no longer there to remove, unconfirmed and
/// `queued`: a dispatcher claimed it (the command got out and only its acknowledgement was
/// lost), a Scheduler claimed it to publish it, or a repeat of the request published it. Then it
/// is going out, so the answer is 202 with it, as for any accepted send; a 503 would have the
/// client send it again.
async fn publish_failed(
    state: &AppState,
    id: Uuid,
    err: &herald_nats::NatsError,
) -> Result<SendResponse, ApiError> {
    let unavailable = || {
        ApiError::unavailable("the message queue is unavailable; nothing was accepted, retry later")
    };
    // Without the database the notification can be neither withdrawn nor read: it stays `queued`
    // and the Scheduler publishes it after `scheduler.stale_claim_secs`, so the answer must not
    // say that nothing was accepted.
    let undecided = |db: herald_entities::RepoError| {
        if !db.is_outage() {
            return ApiError::from(db);
        }
        tracing::warn!(%id, error = %err, db_error = %db, "cannot publish, nor withdraw the notification");
        ApiError::unavailable(MAY_STILL_BE_SENT)
    };
    if repo::delete_unpublished(&state.db, id)
        .await
        .map_err(undecided)?
    {
        tracing::warn!(%id, error = %err, "cannot publish; not accepted");
        return Err(match err {
            herald_nats::NatsError::TooLarge { reason, .. } => {
                ApiError::larger_than_nats_takes(reason)
            }
            _ => unavailable(),
        });
    }
    let Some(row) = repo::find(&state.db, id).await.map_err(undecided)? else {
        tracing::warn!(%id, error = %err, "cannot publish, and the notification is gone");
        return Err(unavailable());
    };
    tracing::warn!(
        %id,
        error = %err,
        status = row.status.as_str(),
        "publish reported a failure, but the notification was claimed or confirmed meanwhile: accepted"
    );
    metrics::counter!("herald_notifications_accepted_total", "source" => "api").increment(1);
    Ok(SendResponse::Accepted(Json(Accepted {
        id: row.id,
        status: row.status.as_str().into(),
    })))
}

/// Publishes a stored `queued` notification's command again: its first request may have stopped
/// between storing and publishing (a crash, or NATS and the database failing together; a client
/// that disconnects does not stop it). A command that did arrive is dropped by JetStream's
/// de-duplication within its window, and after it by the dispatcher's claim.
async fn publish_again(state: &AppState, row: &notification::Model) -> Result<(), ApiError> {
    let command = repo::send_command(row).map_err(|err| ApiError::internal(&err))?;
    publish(state, &row.recipient_key, &command)
        .await
        .map_err(|err| {
            tracing::warn!(id = %row.id, error = %err, "cannot publish a repeated request");
            ApiError::unavailable("the message queue is unavailable; retry later")
        })
}

/// Answers a send under the request id that stored `existing`: `200` with it if the send is its
/// repeat, else `422`.
async fn repeated(
    state: &AppState,
    key: &idempotency::Keyed,
    existing: notification::Model,
) -> Result<SendResponse, ApiError> {
    key.check_repeat(existing.request_fingerprint.as_deref(), "notification")?;
    // Not yet confirmed published: the first request may still be publishing, or have failed to
    // and be removing the row, or have stopped in between; publishing again and confirming it at
    // once decides which. Once confirmed (or claimed), the command is out: nothing is published,
    // so a repeat of a request accepted long ago is answered also while NATS is unavailable.
    if awaits_first_publish(&existing) {
        publish_again(state, &existing).await?;
        if !repo::confirm_published_now(&state.db, existing.id).await? {
            return Err(ApiError::unavailable(
                "the first request with this request id could not be published and was \
                 withdrawn; nothing was accepted, retry",
            ));
        }
    }
    Ok(SendResponse::Repeated(Json(Accepted {
        id: existing.id,
        status: existing.status.as_str().into(),
    })))
}

/// Whether `row` is an API send still `queued` with its mark of a command not yet confirmed
/// published ([`PUBLISH_PENDING`]).
fn awaits_first_publish(row: &notification::Model) -> bool {
    row.status == NotificationStatus::Queued
        && row.status_reason.as_deref() == Some(PUBLISH_PENDING)
}

/// A notification with its attempts; 404 when there is none. Shared by the API and the dashboard.
pub(crate) async fn find_view(state: &AppState, id: Uuid) -> Result<NotificationView, ApiError> {
    match repo::find_with_attempts(&state.db, id).await? {
        Some((row, attempts)) => Ok(view(row, attempts)),
        None => Err(ApiError::not_found(format!("no notification {id}"))),
    }
}

/// Cancels a notification before it goes out, recording `reason`, and publishes the transition
/// on `notify.status.cancelled`; shared by the API and the dashboard. 404: no such notification;
/// 409: it is past cancelling.
pub(crate) async fn cancel(
    state: &AppState,
    id: Uuid,
    reason: &str,
) -> Result<NotificationView, ApiError> {
    use herald_entities::repo::schedule::{self, Cancel};
    match schedule::cancel(&state.db, id, reason).await? {
        Cancel::Cancelled(row) => {
            metrics::counter!("herald_notifications_cancelled_total").increment(1);
            publish_cancelled(state, &row).await;
            find_view(state, id).await
        }
        Cancel::NotFound => Err(ApiError::not_found(format!("no notification {id}"))),
        Cancel::NotCancellable(status) => Err(ApiError::conflict(format!(
            "notification {id} is {}; only scheduled notifications and queued ones not yet \
             picked up can be cancelled",
            status.as_str()
        ))),
    }
}

/// Publishes the cancel of `row` (now `cancelled`) for observers. The cancel stands whether or not
/// its event gets out: a failure is logged and counted
/// ([`herald_nats::Publisher::publish_statuses`]), not answered as an error, for a cancel
/// repeated would only be refused (409).
async fn publish_cancelled(state: &AppState, row: &notification::Model) {
    let event = cancelled_event(row.id, row.updated_at);
    state
        .publisher
        .publish_statuses(std::slice::from_ref(&event))
        .await;
}

/// A send request checked field by field, before what depends on the state (the providers
/// configured, the templates stored): what its fingerprint is made of.
struct CheckedSend {
    customer_id: Option<String>,
    contacts: Contacts,
    recipient_key: String,
    category: Category,
    /// The channels the request names, in order and each once; the category's default chain
    /// when absent.
    named_channels: Option<Vec<Channel>>,
    content: Content,
    /// As asked, also when no longer in the future.
    scheduled_at: Option<DateTime<Utc>>,
}

impl CheckedSend {
    /// What the request's fingerprint covers.
    fn meaning(&self) -> SendMeaning<'_> {
        SendMeaning {
            customer_id: self.customer_id.as_deref(),
            contacts: &self.contacts,
            category: self.category,
            channels: self.named_channels.as_deref(),
            content: &self.content,
            scheduled_at: self.scheduled_at,
        }
    }
}

/// A validated request, ready to store and publish.
struct ValidSend {
    command: SendCommand,
    scheduled_at: Option<DateTime<Utc>>,
    recipient_key: String,
}

/// What a single send's fingerprint covers: everything that decides what is sent to whom and
/// when, as checked. The channels as named, not the category's default chain (configuration,
/// which may change between a request and its repeat); the schedule as asked, not whether it is
/// still in the future.
#[derive(Serialize)]
struct SendMeaning<'a> {
    customer_id: Option<&'a str>,
    contacts: &'a Contacts,
    category: Category,
    channels: Option<&'a [Channel]>,
    content: &'a Content,
    scheduled_at: Option<DateTime<Utc>>,
}

impl ValidSend {
    /// The row to store, under `key`'s request id and fingerprint when the request has one.
    fn row(&self, key: Option<&idempotency::Keyed>) -> NewNotification {
        let row = NewNotification {
            request_id: key.map(|key| key.request_id.value.clone()),
            request_fingerprint: key.map(|key| key.fingerprint.clone()),
            ..new_notification(&self.command, self.recipient_key.clone())
        };
        match self.scheduled_at {
            Some(at) => NewNotification {
                status: NotificationStatus::Scheduled,
                scheduled_at: Some(at),
                ..row
            },
            // Marked until its command is published, so that a request stopping in between
            // leaves a notification the Scheduler finishes.
            None => NewNotification {
                status_reason: Some(PUBLISH_PENDING.into()),
                ..row
            },
        }
    }
}

/// The row that records an accepted command as `queued`, without a request id (a keyed request's
/// row also needs its fingerprint: see [`crate::fingerprint`]).
pub fn new_notification(command: &SendCommand, recipient_key: String) -> NewNotification {
    NewNotification {
        id: command.notification_id,
        request_id: None,
        request_fingerprint: None,
        customer_id: command.customer_id.clone(),
        recipient_key,
        contacts: serde_json::to_value(&command.contacts).unwrap_or_default(),
        category: command.category.as_str().into(),
        channels: serde_json::to_value(&command.channels).unwrap_or_default(),
        content: serde_json::to_value(&command.content).unwrap_or_default(),
        status: NotificationStatus::Queued,
        scheduled_at: None,
        status_reason: None,
        created_at: command.created_at,
    }
}

/// Checks a send request's fields (the request id apart), without reading the state.
fn check(request: SendRequest) -> Result<CheckedSend, ApiError> {
    let ValidRecipient {
        customer_id,
        contacts,
        key: recipient_key,
    } = validate_recipient(&request.recipient)?;
    let named_channels = named_chain(request.channels)?;
    let content = message(request.content, request.template)?;
    if let Some(at) = request.scheduled_at
        && at > Utc::now() + chrono::Duration::days(MAX_SCHEDULE_DAYS)
    {
        return Err(ApiError::invalid(
            "scheduled_at",
            format!("scheduled_at must be within {MAX_SCHEDULE_DAYS} days"),
        ));
    }
    Ok(CheckedSend {
        customer_id,
        contacts,
        recipient_key,
        category: request.category.into(),
        named_channels,
        content,
        scheduled_at: request.scheduled_at,
    })
}

/// Checks a send against the state (a provider for one of its channels, its template) and makes
/// its command.
async fn accept(state: &AppState, checked: CheckedSend) -> Result<ValidSend, ApiError> {
    let channels = chain(state, checked.category, checked.named_channels)?;
    deliverable(
        state,
        "recipient",
        checked.customer_id.as_deref(),
        &checked.contacts,
        &channels,
    )?;
    let command = SendCommand {
        v: SCHEMA_VERSION,
        notification_id: Uuid::now_v7(),
        customer_id: checked.customer_id,
        contacts: checked.contacts,
        category: checked.category,
        channels,
        content: checked.content,
        created_at: Utc::now(),
    };
    check_command_size(&command, &state.publisher.command_room())?;
    if let Some(template) = &command.content.template {
        crate::templates::check_send(state, template).await?;
    }
    Ok(ValidSend {
        scheduled_at: checked.scheduled_at.filter(|at| *at > command.created_at),
        command,
        recipient_key: checked.recipient_key,
    })
}

/// The request field that gave `content`: `template` or `content`.
pub(crate) fn message_field(content: &Content) -> &'static str {
    match content.template {
        Some(_) => "template",
        None => "content",
    }
}

/// Refuses a notification whose send command would be larger than a dispatcher takes
/// ([`MAX_COMMAND_BYTES`], 400): the fields' own limits count characters, while the command is
/// JSON, in which every quote, backslash and line break takes two bytes or more. Within that, one
/// larger with its headers than the NATS server's `max_payload` (`room`) is refused with 413, also
/// when scheduled: its publish would be refused however often it was tried.
pub(crate) fn check_command_size(
    command: &SendCommand,
    room: &CommandRoom,
) -> Result<(), ApiError> {
    // Encoded only when its texts could, escaped, take more than the lower limit.
    let limit = MAX_COMMAND_BYTES.min(room.max_command());
    command
        .check_len(limit)
        .or_else(|len| refuse_command_len(len, &command.content, room, "the notification takes"))
}

/// Refuses a send command of `len` bytes with `content`, described as `subject` ("the
/// notification takes", "a recipient's notification may take"): over [`MAX_COMMAND_BYTES`] with
/// 400 naming the content's field, else over the NATS server's `max_payload` (`room`) with 413.
pub(crate) fn refuse_command_len(
    len: usize,
    content: &Content,
    room: &CommandRoom,
    subject: &str,
) -> Result<(), ApiError> {
    if len > MAX_COMMAND_BYTES {
        let field = message_field(content);
        return Err(ApiError::invalid(
            field,
            format!(
                "{subject} {len} bytes as a send command (JSON, with its quotes, backslashes and \
                 line breaks escaped); the limit is {MAX_COMMAND_BYTES}: shorten the {field}"
            ),
        ));
    }
    match room.refusal(len) {
        Some(reason) => Err(ApiError::larger_than_nats_takes(&format!(
            "{subject} {reason}"
        ))),
        None => Ok(()),
    }
}

/// A request's recipient, checked.
#[derive(Debug)]
pub(crate) struct ValidRecipient {
    /// The stored customer it names, trimmed.
    pub customer_id: Option<String>,
    /// Its inline contacts, trimmed.
    pub contacts: Contacts,
    /// What its sends are partitioned and rate-limited by: the customer id, else the first
    /// contact given.
    pub key: String,
}

/// Checks a recipient; errors name fields under `recipient`.
pub(crate) fn validate_recipient(recipient: &Recipient) -> Result<ValidRecipient, ApiError> {
    let contacts = validate::contacts(
        "recipient.",
        RawContacts {
            email: &recipient.email,
            phone: &recipient.phone,
            telegram_chat_id: &recipient.telegram_chat_id,
            push_tokens: &recipient.push_tokens,
            webhook_url: &recipient.webhook_url,
        },
    )?;
    let customer_id = recipient
        .customer_id
        .as_deref()
        .map(|id| validate::external_id("recipient.customer_id", id))
        .transpose()?;
    let key = contacts
        .recipient_key(customer_id.as_deref())
        .ok_or_else(|| {
            ApiError::invalid(
                "recipient",
                "name a customer_id or give at least one contact",
            )
        })?;
    Ok(ValidRecipient {
        customer_id,
        contacts,
        key,
    })
}

pub(crate) fn validate_content(content: MessageContent) -> Result<Content, ApiError> {
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
        template: None,
    })
}

/// The message of a send: literal `content` or a `template` to render at delivery, exactly one.
/// A template's existence (and a compiled one's variables) is checked apart, by
/// [`crate::templates::check_send`], which reads the database.
pub(crate) fn message(
    content: Option<MessageContent>,
    template: Option<TemplateUse>,
) -> Result<Content, ApiError> {
    match (content, template) {
        (Some(content), None) => validate_content(content),
        (None, Some(template)) => validate_template(template),
        _ => Err(ApiError::invalid(
            "content",
            "give either content or template, not both",
        )),
    }
}

/// A template send: its content is the reference the dispatcher renders.
fn validate_template(template: TemplateUse) -> Result<Content, ApiError> {
    if template.code.trim().is_empty() || template.code.len() > 200 {
        return Err(ApiError::invalid(
            "template.code",
            "code must be 1 to 200 characters",
        ));
    }
    validate::plain_text("template.code", &template.code)?;
    let locale = template
        .locale
        .map(|l| validate::locale("template.locale", &l))
        .transpose()?;
    let variables = variables("template.variables", template.variables)?;
    Ok(Content {
        template: Some(herald_nats::TemplateRef {
            code: template.code,
            variables,
            locale,
        }),
        ..Content::default()
    })
}

/// Template variables given as `field`: a JSON object of at most [`MAX_VARIABLES`] bytes; none
/// when absent.
pub(crate) fn variables(field: &str, value: Option<Value>) -> Result<Map<String, Value>, ApiError> {
    let variables = match value {
        None => Map::new(),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(ApiError::invalid(field, "variables must be a JSON object")),
    };
    if serde_json::to_vec(&variables).map_or(0, |v| v.len()) > MAX_VARIABLES {
        return Err(ApiError::invalid(
            field,
            format!("variables are larger than {MAX_VARIABLES} bytes of JSON"),
        ));
    }
    Ok(variables)
}

/// The channels a send names, in order and each once; `None` when it names none (the
/// category's default chain). `400` for an empty list.
pub(crate) fn named_chain(
    requested: Option<Vec<ApiChannel>>,
) -> Result<Option<Vec<Channel>>, ApiError> {
    match requested {
        Some(list) if list.is_empty() => Err(ApiError::invalid(
            "channels",
            "channels must not be empty; omit it for the category's default chain",
        )),
        other => Ok(other.map(|list| distinct_channels(list.into_iter().map(Channel::from)))),
    }
}

/// The channel chain of a send: the one the request names ([`named_chain`]), or the category's
/// default chain. `400` (field `channels`) when no channel of it has a provider configured, a
/// named chain and a default one alike: such a send could only fail.
pub(crate) fn chain(
    state: &AppState,
    category: Category,
    named: Option<Vec<Channel>>,
) -> Result<Vec<Channel>, ApiError> {
    let (channels, which) = match named {
        Some(channels) => (channels, "these channels".to_string()),
        None => (
            state
                .default_chains
                .get(&category)
                .cloned()
                .unwrap_or_else(|| vec![Channel::Email]),
            format!(
                "the {} default chain (routing.default_chains.{}; name channels to use others)",
                category.as_str(),
                category.as_str()
            ),
        ),
    };
    if !channels
        .iter()
        .any(|c| state.configured_channels.contains(c))
    {
        return Err(ApiError::invalid(
            "channels",
            format!(
                "no provider is configured for any channel of {which}: {}; configured: {}",
                names(&channels),
                configured(state).join(", ")
            ),
        ));
    }
    Ok(channels)
}

/// The configured channels, sorted by name.
fn configured(state: &AppState) -> Vec<&'static str> {
    let mut configured: Vec<&str> = state
        .configured_channels
        .iter()
        .map(|c| c.as_str())
        .collect();
    configured.sort_unstable();
    configured
}

fn names(channels: &[Channel]) -> String {
    channels
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Refuses (`400`) a recipient (named `field`: `recipient`, `recipients[i]`) its sends could never
/// reach: a webhook URL the webhook provider refuses ([`validate::webhook_target`]), or, without
/// a customer id, contacts that reach no channel of `channels` with a provider ([`reachable`]).
pub(crate) fn deliverable(
    state: &AppState,
    field: &str,
    customer_id: Option<&str>,
    contacts: &Contacts,
    channels: &[Channel],
) -> Result<(), ApiError> {
    validate::webhook_target(
        &format!("{field}.webhook_url"),
        contacts,
        state.allow_private_webhook_targets,
    )?;
    reachable(state, field, customer_id, contacts, channels)
}

/// Refuses (`400` naming `field`, the recipient) a send without a customer id whose contacts reach
/// no channel of `channels` that has a provider: each attempt would find no contact or no
/// provider, and the send could only fail. With a customer id the stored customer's contacts are
/// read at delivery, so nothing is refused here.
fn reachable(
    state: &AppState,
    field: &str,
    customer_id: Option<&str>,
    contacts: &Contacts,
    channels: &[Channel],
) -> Result<(), ApiError> {
    if customer_id.is_some() {
        return Ok(());
    }
    let usable: Vec<Channel> = channels
        .iter()
        .copied()
        .filter(|c| state.configured_channels.contains(c))
        .collect();
    if usable.iter().any(|c| contacts.reaches(*c)) {
        return Ok(());
    }
    let needed: Vec<&str> = usable.iter().map(|c| contact_name(*c)).collect();
    Err(ApiError::invalid(
        field,
        format!(
            "the recipient's contacts reach none of the channels with a provider in the chain \
             ({}): give {}, or a customer_id",
            names(&usable),
            needed.join(" or ")
        ),
    ))
}

/// The contact a channel sends to, as a recipient names it.
fn contact_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Email => "email",
        Channel::Sms => "phone",
        Channel::Telegram => "telegram_chat_id",
        Channel::Push => "push_tokens",
        Channel::Webhook => "webhook_url",
    }
}

pub(crate) fn view(
    row: notification::Model,
    attempts: Vec<delivery_attempt::Model>,
) -> NotificationView {
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
        scheduled_at: row.scheduled_at,
        batch_id: row.batch_id,
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
#[path = "notifications_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fingerprint;

    /// Pins what a single send's fingerprint is made of (its fields and how the NATS types they
    /// borrow serialise): a repeat across a deploy must keep its fingerprint. If this fails, the
    /// fingerprint changed: bump `fingerprint::VERSION` (rows of the old one are then taken for
    /// repeats), do not just update the expected value.
    #[test]
    fn a_send_fingerprint_is_stable() {
        let contacts = Contacts {
            email: Some("ada@example.com".into()),
            push_tokens: vec!["device-1".into()],
            ..Contacts::default()
        };
        let content = Content {
            subject: Some("Order shipped".into()),
            text: "Your order #1001 is on its way.".into(),
            ..Content::default()
        };
        let scheduled_at = DateTime::parse_from_rfc3339("2026-12-06T10:00:00+01:00")
            .expect("a time")
            .with_timezone(&Utc);
        let meaning = SendMeaning {
            customer_id: Some("cust-1"),
            contacts: &contacts,
            category: Category::Transactional,
            channels: Some(&[Channel::Email, Channel::Sms]),
            content: &content,
            scheduled_at: Some(scheduled_at),
        };
        assert_eq!(
            fingerprint::of(&meaning).expect("a fingerprint"),
            "v1:76e54e45a1b6fff5c30b8aff9c960d085f83ca3263d68c31b0a37a85372a9afc"
        );
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
        let valid = validate_recipient(&ok).unwrap();
        assert_eq!(valid.contacts.email.as_deref(), Some("ada@example.com"));
        assert_eq!(valid.contacts.push_tokens, vec!["tok".to_string()]);
        assert_eq!(valid.key, "ada@example.com");
    }

    #[test]
    fn a_customer_id_is_trimmed_and_checked_as_an_external_id() {
        let named = |id: &str| Recipient {
            customer_id: Some(id.into()),
            email: Some("ada@example.com".into()),
            ..Recipient::default()
        };
        let valid = validate_recipient(&named(" c-1 ")).unwrap();
        assert_eq!(valid.customer_id.as_deref(), Some("c-1"));
        assert_eq!(
            valid.key, "c-1",
            "the customer's key, as its stored sends have"
        );
        for bad in ["  ", "a/b", "tab\there", &"x".repeat(201)] {
            let err = validate_recipient(&named(bad)).err();
            assert!(
                matches!(&err, Some(ApiError::BadRequest(body))
                    if body.0.field.as_deref() == Some("recipient.customer_id")),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn contacts_that_key_a_recipient_fit_an_index_entry() {
        let long = format!("https://hooks.example.com/{}", "x".repeat(2048));
        let hook = Recipient {
            webhook_url: Some(long),
            ..Recipient::default()
        };
        let err = validate_recipient(&hook).err();
        assert!(
            matches!(&err, Some(ApiError::BadRequest(body))
                if body.0.field.as_deref() == Some("recipient.webhook_url")),
            "{err:?}"
        );
        let chat = Recipient {
            telegram_chat_id: Some("1".repeat(2049)),
            ..Recipient::default()
        };
        assert!(validate_recipient(&chat).is_err());
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
    fn a_command_over_max_payload_is_413_and_over_herald_s_own_limit_400() {
        let room = CommandRoom {
            max_payload: 65_536,
            headers: 63,
        };
        let command = |text: String| SendCommand {
            v: SCHEMA_VERSION,
            notification_id: Uuid::nil(),
            customer_id: None,
            contacts: Contacts::default(),
            category: Category::Transactional,
            channels: vec![Channel::Email],
            content: Content {
                text,
                ..Content::default()
            },
            created_at: Utc::now(),
        };
        assert!(check_command_size(&command("x".repeat(1_000)), &room).is_ok());
        let over_nats = check_command_size(&command("x".repeat(80_000)), &room).err();
        assert!(
            matches!(&over_nats, Some(ApiError::PayloadTooLarge(body))
                if body.0.message.contains("max_payload of 65536")),
            "{over_nats:?}"
        );
        let over_own = check_command_size(&command("\n".repeat(MAX_COMMAND_BYTES / 2)), &room);
        assert!(
            matches!(&over_own, Err(ApiError::BadRequest(body))
                if body.0.field.as_deref() == Some("content")),
            "Herald's own limit comes first: {over_own:?}"
        );
    }

    #[test]
    fn channel_chain_is_deduplicated_in_order() {
        let chain = distinct_channels([Channel::Telegram, Channel::Email, Channel::Telegram]);
        assert_eq!(chain, vec![Channel::Telegram, Channel::Email]);
    }
}
