//! Provider delivery receipts: `sent → delivered`, or `failed` on a bounce.

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect, sea_query::Expr,
};
use uuid::Uuid;

use crate::{NotificationStatus, RepoError, delivery_attempt, notification};

/// What a receipt did.
#[derive(Debug, Clone, PartialEq)]
pub enum ReceiptOutcome {
    /// The notification moved to the receipt's status; here it is now.
    Applied(notification::Model),
    /// It already had that status (a repeated receipt); nothing changed.
    Unchanged(notification::Model),
    /// Its status does not allow the move (e.g. still `processing`, or already `delivered` and
    /// now reported bounced); nothing changed.
    NotAllowed(notification::Model),
    /// No such notification.
    NotFound,
}

/// The notification a provider's message id belongs to: the one whose successful attempt on
/// `provider` returned that id.
pub async fn find_by_provider_message_id(
    db: &impl ConnectionTrait,
    provider: &str,
    provider_message_id: &str,
) -> Result<Option<Uuid>, RepoError> {
    Ok(delivery_attempt::Entity::find()
        .select_only()
        .column(delivery_attempt::Column::NotificationId)
        .filter(delivery_attempt::Column::Provider.eq(provider))
        .filter(delivery_attempt::Column::ProviderMessageId.eq(provider_message_id))
        .filter(delivery_attempt::Column::Status.eq("sent"))
        .into_tuple::<Uuid>()
        .one(db)
        .await?)
}

/// Moves notification `id` to `status` (`delivered` or `failed`) if it is `sent`, in one
/// conditional UPDATE, so concurrent or repeated receipts cannot move it backwards. A receipt is
/// about a message a provider accepted, so it applies only once the notification is recorded
/// `sent`: a bounce applied earlier would end a queued or scheduled notification `failed`
/// unsent, or one whose `sent` is still on its way to the database `failed` without its
/// channel and time.
pub async fn apply(
    db: &impl ConnectionTrait,
    id: Uuid,
    status: NotificationStatus,
    reason: &str,
    error: Option<&str>,
    at: DateTime<Utc>,
) -> Result<ReceiptOutcome, RepoError> {
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
    Ok(if applied {
        ReceiptOutcome::Applied(now)
    } else if now.status == status {
        ReceiptOutcome::Unchanged(now)
    } else {
        ReceiptOutcome::NotAllowed(now)
    })
}
