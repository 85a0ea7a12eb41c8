//! The one move out of `dead`: a replay from the dead-letter stream puts the notification back to
//! `queued`. It is an explicit operation, not a general transition
//! ([`crate::NotificationStatus::allowed_from`] never leaves `dead`), so only a deliberate replay
//! can revive a notification.

use chrono::Utc;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, sea_query::Expr};
use uuid::Uuid;

use crate::{NotificationStatus, RepoError, notification};

/// Moves notification `id` from `dead` to `queued` for a replay; `false` if it is not dead (never
/// was, or another replay got there first).
pub async fn requeue_dead(
    db: &impl ConnectionTrait,
    id: Uuid,
    reason: &str,
) -> Result<bool, RepoError> {
    move_between(
        db,
        id,
        NotificationStatus::Dead,
        NotificationStatus::Queued,
        reason,
    )
    .await
}

/// Undoes [`requeue_dead`] when the replayed command could not be published, so the notification
/// does not wait as `queued` for a command that does not exist.
pub async fn return_to_dead(
    db: &impl ConnectionTrait,
    id: Uuid,
    reason: &str,
) -> Result<bool, RepoError> {
    move_between(
        db,
        id,
        NotificationStatus::Queued,
        NotificationStatus::Dead,
        reason,
    )
    .await
}

async fn move_between(
    db: &impl ConnectionTrait,
    id: Uuid,
    from: NotificationStatus,
    to: NotificationStatus,
    reason: &str,
) -> Result<bool, RepoError> {
    let result = notification::Entity::update_many()
        .col_expr(notification::Column::Status, Expr::value(to))
        .col_expr(notification::Column::StatusReason, Expr::value(reason))
        .col_expr(notification::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(notification::Column::Id.eq(id))
        .filter(notification::Column::Status.eq(from))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}
