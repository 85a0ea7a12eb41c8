//! Batched status changes and attempt rows, written in one transaction by the StatusWriter.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, TransactionTrait,
    sea_query::Expr,
};
use uuid::Uuid;

use crate::{NotificationStatus, RepoError, delivery_attempt, notification};

/// Rows per multi-row INSERT; well under SQLite's and PostgreSQL's bind-parameter limits.
const INSERT_CHUNK: usize = 500;

/// A status to move a notification to.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusChange {
    /// The notification.
    pub id: Uuid,
    /// Its new status; applied only if the current one is in [`NotificationStatus::allowed_from`].
    pub status: NotificationStatus,
    /// Why (skipped, deferred, failed), in words.
    pub reason: Option<String>,
    /// The channel that carried it.
    pub final_channel: Option<String>,
    /// The last error.
    pub error: Option<String>,
    /// Attempts made so far, when known.
    pub attempts: Option<i32>,
    /// When the change happened.
    pub at: DateTime<Utc>,
}

impl StatusChange {
    /// A change to `status` now, with nothing else.
    pub fn to(id: Uuid, status: NotificationStatus) -> Self {
        Self {
            id,
            status,
            reason: None,
            final_channel: None,
            error: None,
            attempts: None,
            at: Utc::now(),
        }
    }
}

/// One delivery attempt to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAttempt {
    /// The notification.
    pub notification_id: Uuid,
    /// Number of the attempt within the notification.
    pub attempt_no: i32,
    /// Channel name.
    pub channel: String,
    /// Provider name.
    pub provider: String,
    /// Outcome (`sent`, `failed`, `rejected`, `circuit_open`, `no_contact`).
    pub status: String,
    /// Error text.
    pub error: Option<String>,
    /// Provider's message id.
    pub provider_message_id: Option<String>,
    /// Provider latency in milliseconds.
    pub latency_ms: i64,
    /// When it finished.
    pub at: DateTime<Utc>,
}

/// Writes attempts and applies status changes in one transaction, in the order given.
pub async fn apply(
    db: &DatabaseConnection,
    changes: &[StatusChange],
    attempts: &[NewAttempt],
) -> Result<(), RepoError> {
    let txn = db.begin().await?;
    for chunk in attempts.chunks(INSERT_CHUNK) {
        let rows = chunk.iter().map(|a| delivery_attempt::ActiveModel {
            id: Set(Uuid::now_v7()),
            notification_id: Set(a.notification_id),
            attempt_no: Set(a.attempt_no),
            channel: Set(a.channel.clone()),
            provider: Set(a.provider.clone()),
            status: Set(a.status.clone()),
            error: Set(a.error.clone()),
            provider_message_id: Set(a.provider_message_id.clone()),
            latency_ms: Set(a.latency_ms),
            created_at: Set(a.at),
        });
        delivery_attempt::Entity::insert_many(rows)
            .exec_without_returning(&txn)
            .await?;
    }
    for change in changes {
        let mut update = notification::Entity::update_many()
            .col_expr(notification::Column::Status, Expr::value(change.status))
            .col_expr(notification::Column::UpdatedAt, Expr::value(change.at))
            .filter(notification::Column::Id.eq(change.id))
            .filter(notification::Column::Status.is_in(change.status.allowed_from().to_vec()));
        if let Some(reason) = &change.reason {
            update = update.col_expr(notification::Column::StatusReason, Expr::value(reason));
        }
        if let Some(channel) = &change.final_channel {
            update = update.col_expr(notification::Column::FinalChannel, Expr::value(channel));
        }
        if let Some(error) = &change.error {
            update = update.col_expr(notification::Column::Error, Expr::value(error));
        }
        if let Some(attempts) = change.attempts {
            update = update.col_expr(notification::Column::Attempts, Expr::value(attempts));
        }
        if change.status == NotificationStatus::Sent {
            update = update.col_expr(notification::Column::SentAt, Expr::value(change.at));
        }
        update.exec(&txn).await?;
    }
    txn.commit().await?;
    Ok(())
}
