//! Provider delivery receipts: `sent → delivered`, or `failed` on a bounce.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect, sea_query::Expr,
};
use uuid::Uuid;

use crate::{NotificationStatus, RepoError, delivery_attempt, notification};

/// The attempt status of a message a provider accepted.
const SENT: &str = "sent";

/// What a receipt did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiptOutcome {
    /// The notification moved to the receipt's status; here it is now.
    Applied(notification::Model),
    /// It already had that status from an earlier receipt (a repeat); nothing changed.
    Unchanged(notification::Model),
    /// It is not sent yet (`queued`, `scheduled` or `processing`): the receipt may have arrived
    /// before Herald recorded the send; nothing changed.
    NotYetSent(notification::Model),
    /// It ended (`failed`, `skipped`, `cancelled`, `dead`) without any provider accepting it, so
    /// no receipt is about it; nothing changed.
    NeverSent(notification::Model),
    /// It was sent, but not by the receipt's provider: here are the providers that accepted it
    /// (normally one); nothing changed.
    SentByOther(Vec<String>),
    /// It was sent by the receipt's provider, but its status does not allow the move (already
    /// `delivered` and now reported bounced, or already `failed` and now reported delivered);
    /// nothing changed.
    NotAllowed(notification::Model),
    /// No such notification.
    NotFound,
}

/// The notification a provider's message id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageIdMatch {
    /// No successful attempt of the provider returned that id.
    None,
    /// The one notification whose successful attempt(s) of the provider returned that id.
    One(Uuid),
    /// Successful attempts of the provider for several notifications returned that id (provider
    /// ids need not be unique: an SMTP relay's reply text, a Telegram `message_id` is unique only
    /// per chat), so it does not say which one the receipt is about.
    Several,
}

/// The notification whose successful attempt on `provider` returned `provider_message_id`, if
/// exactly one did.
pub async fn find_by_provider_message_id(
    db: &impl ConnectionTrait,
    provider: &str,
    provider_message_id: &str,
) -> Result<MessageIdMatch, RepoError> {
    let sent_as = || {
        delivery_attempt::Entity::find()
            .select_only()
            .column(delivery_attempt::Column::NotificationId)
            .filter(delivery_attempt::Column::ProviderMessageId.eq(provider_message_id))
            .filter(delivery_attempt::Column::Provider.eq(provider))
            .filter(delivery_attempt::Column::Status.eq(SENT))
    };
    // Two lookups that each stop at the first row, rather than a DISTINCT over every attempt
    // with a reply text that a relay gives to all messages.
    let Some(first) = sent_as().into_tuple::<Uuid>().one(db).await? else {
        return Ok(MessageIdMatch::None);
    };
    let another = sent_as()
        .filter(delivery_attempt::Column::NotificationId.ne(first))
        .into_tuple::<Uuid>()
        .one(db)
        .await?;
    Ok(match another {
        Some(_) => MessageIdMatch::Several,
        None => MessageIdMatch::One(first),
    })
}

/// Moves notification `id` to `status` (`delivered` or `failed`) on a receipt from `provider`,
/// if the notification is `sent` and `provider` is the one that accepted it.
///
/// A receipt is about a message a provider accepted, so it applies only to a notification
/// recorded sent (`sent_at` set, which only the move to `sent` does), and only when it comes from
/// the provider whose successful attempt is recorded: a bounce applied earlier would end a queued
/// or scheduled notification `failed` unsent, or one whose `sent` is still on its way to the
/// database `failed` without its channel and time; one from another provider is about some other
/// message. An attempt is written in the transaction that records its notification's status, so
/// a notification recorded sent has its successful attempt recorded.
///
/// The move itself is one conditional UPDATE (from `sent` only), so concurrent or repeated
/// receipts cannot move it backwards.
///
/// The change is dated `at`, but no earlier than the send (`sent_at`, or `updated_at` while still
/// `sent`): a provider's zero time, a replayed webhook or a clock behind would date it before
/// `sent_at`, and retention, which counts from `updated_at`, would purge the row at its next run.
pub async fn apply(
    db: &impl ConnectionTrait,
    id: Uuid,
    provider: &str,
    status: NotificationStatus,
    reason: &str,
    error: Option<&str>,
    at: DateTime<Utc>,
) -> Result<ReceiptOutcome, RepoError> {
    let Some(before) = notification::Entity::find_by_id(id).one(db).await? else {
        return Ok(ReceiptOutcome::NotFound);
    };
    if before.sent_at.is_none() {
        return Ok(if before.status.is_final() {
            ReceiptOutcome::NeverSent(before)
        } else {
            ReceiptOutcome::NotYetSent(before)
        });
    }
    let providers: Vec<String> = delivery_attempt::Entity::find()
        .select_only()
        .column(delivery_attempt::Column::Provider)
        .distinct()
        .filter(delivery_attempt::Column::NotificationId.eq(id))
        .filter(delivery_attempt::Column::Status.eq(SENT))
        .into_tuple()
        .all(db)
        .await?;
    if !providers.iter().any(|p| p == provider) {
        return Ok(ReceiptOutcome::SentByOther(providers));
    }
    let at = sent_floor(&before).map_or(at, |floor| at.max(floor));
    let mut update = notification::Entity::update_many()
        .col_expr(notification::Column::Status, Expr::value(status))
        .col_expr(notification::Column::StatusReason, Expr::value(reason))
        .col_expr(notification::Column::UpdatedAt, Expr::value(at))
        .filter(notification::Column::Id.eq(id))
        .filter(notification::Column::Status.eq(NotificationStatus::Sent));
    if let Some(error) = error {
        update = update.col_expr(notification::Column::Error, Expr::value(error));
    }
    let applied = update.exec(db).await?.rows_affected > 0;
    let Some(now) = notification::Entity::find_by_id(id).one(db).await? else {
        return Ok(ReceiptOutcome::NotFound);
    };
    // Sent, a notification leaves `sent` only by a receipt: having the receipt's status, it had
    // this receipt (or its like) before.
    Ok(if applied {
        ReceiptOutcome::Applied(now)
    } else if now.status == status {
        ReceiptOutcome::Unchanged(now)
    } else {
        ReceiptOutcome::NotAllowed(now)
    })
}

/// The earliest time a receipt may date a change of `row`: when it was sent (its `updated_at`
/// while still `sent`, which the move to `sent` set).
fn sent_floor(row: &notification::Model) -> Option<DateTime<Utc>> {
    let updated = (row.status == NotificationStatus::Sent).then_some(row.updated_at);
    row.sent_at.max(updated)
}
