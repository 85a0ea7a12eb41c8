//! The one move out of `dead`: a replay from the dead-letter stream puts the notification back to
//! `queued`. It is an explicit operation, not a general transition
//! ([`crate::NotificationStatus::allowed_from`] never leaves `dead`), so only a deliberate replay
//! can revive a notification.
//!
//! A requeued notification carries its replay's mark ([`PendingReplay`]) until the command is
//! confirmed published. If the replay stops in between (the process dies, the database fails
//! before the requeue can be undone), the Scheduler finds the mark after `stale_claim_secs` and
//! publishes the command as the replay would have: under the replay's `Nats-Msg-Id`, with the
//! attempts recorded before it. Each requeue has a `Nats-Msg-Id` of its own, so a replay retried
//! after a publish that reported failure yet stored its copy (which the dispatcher dropped, the
//! notification being `dead` again by then) is not taken for that copy's duplicate.

use chrono::Utc;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, TransactionSession, TransactionTrait,
    sea_query::Expr,
};
use uuid::Uuid;

use super::schedule::{REPLAY_PENDING_PREFIX, REPLAYED};
use crate::{NotificationStatus, RepoError, notification};

/// One requeue of a dead notification for a replay, until its command is confirmed published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingReplay {
    /// `<dead-letter seq>:<token>`, unique to this requeue.
    key: String,
}

impl PendingReplay {
    /// A new replay of the dead letter `seq`.
    pub fn new(seq: u64) -> Self {
        Self {
            key: format!("{seq}:{}", Uuid::new_v4()),
        }
    }

    /// The replay a `queued` notification awaits the confirmation of, read from its mark; `None`
    /// for any other notification.
    pub fn of(row: &notification::Model) -> Option<Self> {
        if row.status != NotificationStatus::Queued {
            return None;
        }
        let key = row
            .status_reason
            .as_deref()?
            .strip_prefix(REPLAY_PENDING_PREFIX)?;
        Some(Self { key: key.into() })
    }

    /// The `status_reason` the notification carries while the replay is unconfirmed.
    pub fn mark(&self) -> String {
        format!("{REPLAY_PENDING_PREFIX}{}", self.key)
    }

    /// The `Nats-Msg-Id` of the replayed command of notification `id`: `<id>:replay:<key>`.
    pub fn msg_id(&self, id: Uuid) -> String {
        format!("{id}:replay:{}", self.key)
    }
}

/// Moves notification `id` from `dead` to `queued` with `replay`'s mark; `false` if it is not dead
/// (never was, or another replay got there first).
pub async fn requeue_dead(
    db: &impl ConnectionTrait,
    id: Uuid,
    replay: &PendingReplay,
) -> Result<bool, RepoError> {
    let moved = notification::Entity::update_many()
        .col_expr(
            notification::Column::Status,
            Expr::value(NotificationStatus::Queued),
        )
        .col_expr(
            notification::Column::StatusReason,
            Expr::value(replay.mark()),
        )
        .col_expr(notification::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(notification::Column::Id.eq(id))
        .filter(notification::Column::Status.eq(NotificationStatus::Dead))
        .exec(db)
        .await?;
    Ok(moved.rows_affected > 0)
}

/// Confirms that `replay`'s command is published: its mark becomes [`REPLAYED`], unless a
/// dispatcher has moved the notification on already (which cleared the mark itself).
pub async fn confirm_replayed(
    db: &impl ConnectionTrait,
    id: Uuid,
    replay: &PendingReplay,
) -> Result<(), RepoError> {
    awaiting(id, replay)
        .col_expr(notification::Column::StatusReason, Expr::value(REPLAYED))
        .exec(db)
        .await?;
    Ok(())
}

/// Undoes [`requeue_dead`] when the replayed command could not be published, so the notification
/// does not wait as `queued` for a command that does not exist; its `status_reason` becomes
/// `reason`. `false` when the notification no longer awaits `replay` (a dispatcher claimed it:
/// the command was stored after all, or the Scheduler published it again): then there is nothing
/// to undo. A receipt held for it meanwhile is dropped in the same transaction (see
/// `receipts::drop_held_of_unsent`).
pub async fn return_to_dead(
    db: &(impl ConnectionTrait + TransactionTrait),
    id: Uuid,
    replay: &PendingReplay,
    reason: &str,
) -> Result<bool, RepoError> {
    let txn = db.begin().await?;
    let moved = awaiting(id, replay)
        .col_expr(
            notification::Column::Status,
            Expr::value(NotificationStatus::Dead),
        )
        .col_expr(notification::Column::StatusReason, Expr::value(reason))
        .col_expr(notification::Column::UpdatedAt, Expr::value(Utc::now()))
        .exec(&txn)
        .await?
        .rows_affected
        > 0;
    if moved {
        super::receipts::drop_held_of_unsent(&txn, &[id]).await?;
    }
    txn.commit().await?;
    Ok(moved)
}

/// An UPDATE of notification `id` while it is `queued` with `replay`'s mark.
fn awaiting(id: Uuid, replay: &PendingReplay) -> sea_orm::UpdateMany<notification::Entity> {
    notification::Entity::update_many()
        .filter(notification::Column::Id.eq(id))
        .filter(notification::Column::Status.eq(NotificationStatus::Queued))
        .filter(notification::Column::StatusReason.eq(replay.mark()))
}
