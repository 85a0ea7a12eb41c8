//! `/api/v1/providers/{provider}/callbacks`: delivery receipts from providers.
//!
//! A receipt from the provider that sent a notification moves it from `sent` to `delivered` (or
//! `failed` on a bounce or a late failure) under the usual transition rules, and publishes the
//! transition on `notify.status.<status>`. A repeated receipt answers 200 with `applied: false`
//! and publishes the event again, dated when the notification moved, so that it is the same
//! event: JetStream drops it as a duplicate if the first got out (within its de-duplication
//! window), and a provider that retries after a failed publish still gets the event out.
//!
//! A receipt can beat Herald's record of the send (the StatusWriter writes `sent` a few
//! milliseconds after the provider answered), and providers do not repeat one refused with a
//! 4xx: a receipt for a notification still `queued` or `processing` is held, answered 202, and
//! applied when the send is recorded, its event published then (see
//! `herald_entities::repo::receipts::apply`).

use chrono::{DateTime, Utc};
use herald_entities::{
    NotificationStatus, notification,
    repo::receipts::{self as repo, MessageIdMatch, ReceiptOutcome},
};
use herald_nats::Channel;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags, param::Path, payload::Json};
use uuid::Uuid;

use crate::{
    ApiError, AppState,
    auth::{CallbackKey, Principal},
    validate::plain_text,
};

/// Longest error text kept from a receipt.
const MAX_ERROR: usize = 2_000;

#[derive(Tags)]
pub(crate) enum ReceiptTags {
    /// Delivery receipts from providers.
    Receipts,
}

/// What the provider reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "ReceiptEvent", rename_all = "lowercase")]
pub enum ReceiptEvent {
    /// Delivered to the recipient: `sent → delivered`.
    Delivered,
    /// Bounced: `sent → failed`.
    Bounced,
    /// Failed after acceptance: `sent → failed`.
    Failed,
}

/// A delivery receipt. Name the notification by `notification_id` (Herald's id, which providers
/// receive as the idempotency key / message id) or by `provider_message_id` (the provider's own
/// id, as recorded on the successful attempt). `notification_id` wins when both are given; it is
/// the reliable one, as a provider's ids need not be unique, and a provider's id is stored only
/// with the record of the send: only a receipt naming `notification_id` is held when it comes
/// before that record. Fields Herald does not know are
/// ignored, unlike in every other request body: a provider's webhook may carry its own, and a
/// receipt refused with a 4xx is not sent again, so its bounce would be lost.
#[derive(Debug, Clone, Object)]
pub struct Receipt {
    /// Herald's notification id.
    pub notification_id: Option<Uuid>,
    /// The provider's message id. If the provider returned it for several notifications (an SMTP
    /// relay's reply text, a Telegram `message_id` is unique only per chat), the receipt is
    /// refused with 409: give `notification_id` instead.
    // As long as Herald stores a provider's id at most
    // (`herald_entities::repo::status_batch::PROVIDER_MESSAGE_ID_MAX_CHARS`).
    #[oai(validator(min_length = 1, max_length = 500))]
    pub provider_message_id: Option<String>,
    /// What happened.
    pub event: ReceiptEvent,
    /// When it happened, by the provider's clock (a time ahead of Herald's counts as now, one
    /// before the notification was sent as that time); now when absent.
    pub timestamp: Option<DateTime<Utc>>,
    /// The provider's error or bounce reason.
    pub error: Option<String>,
}

/// The result of a receipt.
#[derive(Debug, Clone, Object)]
pub struct ReceiptResult {
    /// The notification concerned.
    pub notification_id: Uuid,
    /// Its status now.
    pub status: String,
    /// Whether this receipt changed it (`false` for a repeat, and for a held receipt).
    pub applied: bool,
    /// Whether the receipt is held (answered 202): it came while the notification's send was
    /// under way or not yet recorded (`queued`, `processing`), and is applied, under the same
    /// rules, once Herald records the send.
    pub held: bool,
}

/// The answer to a receipt.
#[derive(ApiResponse)]
pub enum ReceiptResponse {
    /// Applied, or a repeat of an applied receipt (`applied: false`).
    #[oai(status = 200)]
    Done(Json<ReceiptResult>),
    /// Held until Herald records the notification's send, then applied (`held: true`); a
    /// repeat is answered so again.
    #[oai(status = 202)]
    Held(Json<ReceiptResult>),
}

impl From<ReceiptResult> for ReceiptResponse {
    fn from(result: ReceiptResult) -> Self {
        match result.held {
            true => Self::Held(Json(result)),
            false => Self::Done(Json(result)),
        }
    }
}

/// Receipt endpoints.
pub struct ReceiptsApi {
    state: AppState,
}

impl ReceiptsApi {
    /// The endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "ReceiptTags::Receipts")]
impl ReceiptsApi {
    /// Report a delivery receipt (scope `callbacks`).
    ///
    /// `delivered` moves a `sent` notification to `delivered`; `bounced` and `failed` move it to
    /// `failed` with the error. A repeat of an applied receipt answers 200 with `applied: false`.
    ///
    /// 202: the notification is `queued` or `processing` (its send is under way, or done and not
    /// yet recorded: a fast provider's receipt can beat Herald's record of the send). The
    /// receipt is kept and applied, under the same rules, when the send is recorded; the answer
    /// has `held: true` and the notification's status now. A repeat answers 202 again.
    ///
    /// 403 `forbidden`: the key is bound to another provider (`herald apikey create --scopes
    /// callbacks --provider P` posts receipts for `P` only); the message names the key's provider.
    ///
    /// 404 `not_found`: unknown provider, or no notification with this `notification_id` or sent
    /// by this provider as `provider_message_id`.
    ///
    /// 409 `conflict`, nothing changed:
    /// - the notification is `scheduled` (not sent, no send under way);
    /// - another receipt (the other outcome, or another provider's) is held for it already;
    /// - it was never sent (it ended `failed`, `skipped`, `cancelled` or `dead` without a
    ///   provider accepting it);
    /// - it was sent by another provider than `{provider}`;
    /// - it is already `delivered` or `failed` otherwise (a bounce after a delivery, a delivery
    ///   after a bounce);
    /// - `provider_message_id` is ambiguous: the provider returned it for several notifications
    ///   (provider ids need not be unique); name the notification by `notification_id`.
    #[oai(path = "/providers/:provider/callbacks", method = "post")]
    async fn callback(
        &self,
        auth: CallbackKey,
        /// The provider's name, as configured (see `GET /api/v1/channels`).
        #[oai(validator(min_length = 1, max_length = 64))]
        provider: Path<String>,
        body: Json<Receipt>,
    ) -> Result<ReceiptResponse, ApiError> {
        let provider = provider.0;
        check_bound(&auth.0, &provider)?;
        let receipt = body.0;
        let Some(&channel) = self.state.providers.get(&provider) else {
            return Err(ApiError::not_found(format!("no provider {provider:?}")));
        };
        let error = receipt.error.as_deref().map(one_line);
        let id = match (receipt.notification_id, &receipt.provider_message_id) {
            (Some(id), _) => id,
            (None, Some(message_id)) => {
                plain_text("provider_message_id", message_id)?;
                sent_as(&self.state, &provider, message_id).await?
            }
            (None, None) => {
                return Err(ApiError::invalid(
                    "notification_id",
                    "give notification_id or provider_message_id",
                ));
            }
        };
        // A provider's clock ahead of ours must not date the change in the future (retention
        // counts from it); `repo::apply` dates it no earlier than the send.
        let at = receipt
            .timestamp
            .map_or_else(Utc::now, |at| at.min(Utc::now()));
        let outcome = Outcome {
            event: receipt.event,
            at,
            error: error.as_deref(),
        };
        apply(&self.state, &provider, channel, id, outcome)
            .await
            .map(ReceiptResponse::from)
    }
}

/// Refuses (403) a receipt for `provider` posted with a key bound to another provider; a key
/// without a binding posts for every provider.
fn check_bound(key: &Principal, provider: &str) -> Result<(), ApiError> {
    match &key.provider {
        Some(bound) if bound != provider => Err(ApiError::forbidden(format!(
            "this API key posts receipts for provider {bound:?} only, not for {provider:?}"
        ))),
        _ => Ok(()),
    }
}

/// The notification `provider` sent as `message_id`: 404 when none, 409 when several.
pub(crate) async fn sent_as(
    state: &AppState,
    provider: &str,
    message_id: &str,
) -> Result<Uuid, ApiError> {
    match repo::find_by_provider_message_id(&state.db, provider, message_id).await? {
        MessageIdMatch::One(id) => Ok(id),
        // A provider's id is stored with the record of the send: a receipt that may come before
        // it should name the notification, which is then held.
        MessageIdMatch::None => Err(ApiError::not_found(format!(
            "no notification recorded sent by {provider} as {message_id:?}; \
             a receipt that may come before Herald records the send should name notification_id"
        ))),
        MessageIdMatch::Several => Err(ApiError::conflict(format!(
            "{provider} sent several notifications as {message_id:?}; \
             name the notification by notification_id"
        ))),
    }
}

/// What a receipt reports of a notification.
pub(crate) struct Outcome<'a> {
    /// What happened.
    pub event: ReceiptEvent,
    /// When, no later than now.
    pub at: DateTime<Utc>,
    /// The provider's error, as kept (see [`one_line`]).
    pub error: Option<&'a str>,
}

/// Applies a receipt from `provider` (of `channel`) to notification `id` under the transition
/// rules, and publishes the transition (again, for a repeat), or holds it until the send is
/// recorded: the answer of every receipt endpoint.
pub(crate) async fn apply(
    state: &AppState,
    provider: &str,
    channel: Channel,
    id: Uuid,
    outcome: Outcome<'_>,
) -> Result<ReceiptResult, ApiError> {
    let (status, reason) = match outcome.event {
        ReceiptEvent::Delivered => (
            NotificationStatus::Delivered,
            format!("delivery confirmed by {provider}"),
        ),
        ReceiptEvent::Bounced => (NotificationStatus::Failed, format!("bounced ({provider})")),
        ReceiptEvent::Failed => (
            NotificationStatus::Failed,
            format!("failed after acceptance ({provider})"),
        ),
    };
    let receipt = repo::Receipt {
        provider,
        status,
        reason: &reason,
        error: outcome.error,
        at: outcome.at,
    };
    let (row, applied, held) = match repo::apply(&state.db, id, &receipt).await? {
        ReceiptOutcome::Applied(row) => (row, true, false),
        ReceiptOutcome::Unchanged(row) => (row, false, false),
        ReceiptOutcome::Held(row) => (row, false, true),
        ReceiptOutcome::HeldOther(held) => {
            return Err(ApiError::conflict(format!(
                "notification {id} is not recorded sent yet, and a receipt from {} moving it to \
                 {} is held for it already; this receipt does not apply to it",
                held.provider,
                held.status.as_str()
            )));
        }
        ReceiptOutcome::NotYetSent(row) => {
            return Err(ApiError::conflict(format!(
                "notification {id} is {}, not sent yet; no receipt applies to it",
                row.status.as_str()
            )));
        }
        ReceiptOutcome::NeverSent(row) => {
            return Err(ApiError::conflict(format!(
                "notification {id} was never sent (it is {}); no receipt applies to it",
                row.status.as_str()
            )));
        }
        ReceiptOutcome::SentByOther(providers) => {
            let by = match providers.as_slice() {
                [] => String::new(),
                providers => format!(" but by {}", providers.join(", ")),
            };
            return Err(ApiError::conflict(format!(
                "notification {id} was not sent by {provider}{by}; \
                 a receipt applies only to a message its provider accepted"
            )));
        }
        ReceiptOutcome::NotAllowed(row) => {
            return Err(ApiError::conflict(format!(
                "notification {id} is already {}; this receipt does not apply to it",
                row.status.as_str()
            )));
        }
        ReceiptOutcome::NotFound => {
            return Err(ApiError::not_found(format!("no notification {id}")));
        }
    };
    let taken = match (held, applied) {
        (true, _) => "held",
        (false, true) => "true",
        (false, false) => "false",
    };
    count(outcome.event, taken);
    if !held {
        publish(state, &row, Some(channel)).await?;
    }
    Ok(ReceiptResult {
        notification_id: row.id,
        status: row.status.as_str().into(),
        applied,
        held,
    })
}

/// Counts a receipt taken: `applied` is `true`, `false` (a repeat) or `held`.
fn count(event: ReceiptEvent, applied: &'static str) {
    metrics::counter!(
        "herald_receipts_total",
        "event" => event_name(event),
        "applied" => applied
    )
    .increment(1);
}

/// Publishes the transition `row` records, dated when it was made (`updated_at`: a sent
/// notification changes only by a receipt, and a repeat does not change it), so that a repeat
/// publishes the same event under the same id.
async fn publish(
    state: &AppState,
    row: &notification::Model,
    channel: Option<Channel>,
) -> Result<(), ApiError> {
    let event = repo::receipt_event(row, channel);
    state.publisher.publish_status(&event).await.map_err(|err| {
        tracing::warn!(id = %row.id, error = %err, "receipt recorded but its event not published");
        ApiError::unavailable(
            "the receipt is recorded but its status event could not be published; repeat it",
        )
    })
}

/// A provider's error text as kept: its first [`MAX_ERROR`] characters, each control character
/// (line breaks and tabs of a multi-line SMTP bounce, say) made a space. Refusing such a text
/// would lose the receipt, as providers do not repeat one answered 4xx. (A NUL is refused before,
/// with the whole body: see `body_limit`.)
pub(crate) fn one_line(error: &str) -> String {
    error
        .chars()
        .take(MAX_ERROR)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn event_name(event: ReceiptEvent) -> &'static str {
    match event {
        ReceiptEvent::Delivered => "delivered",
        ReceiptEvent::Bounced => "bounced",
        ReceiptEvent::Failed => "failed",
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_ERROR, check_bound, one_line};
    use crate::{
        ApiError,
        auth::{Principal, Scope},
    };

    #[test]
    fn a_bound_key_posts_receipts_for_its_provider_only() {
        let key = |provider: Option<&str>| Principal {
            key_id: uuid::Uuid::nil(),
            name: "webhook".into(),
            scopes: vec![Scope::Callbacks],
            provider: provider.map(str::to_string),
        };
        assert!(check_bound(&key(None), "smtp").is_ok());
        assert!(check_bound(&key(Some("smtp")), "smtp").is_ok());
        match check_bound(&key(Some("smtp")), "telegram") {
            Err(ApiError::Forbidden(body)) => {
                let message = &body.0.message;
                assert!(message.contains("\"smtp\""), "{message}");
                assert!(message.contains("\"telegram\""), "{message}");
            }
            other => panic!("expected 403, got {other:?}"),
        }
    }

    #[test]
    fn an_error_text_keeps_its_words_on_one_line() {
        assert_eq!(
            one_line("550-5.1.1 no such user\r\n550 5.1.1\tmailbox unavailable\u{85}."),
            "550-5.1.1 no such user  550 5.1.1 mailbox unavailable ."
        );
        assert_eq!(
            one_line(&"é".repeat(MAX_ERROR + 1)).chars().count(),
            MAX_ERROR
        );
    }
}
