use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// The send-history index holds sent notifications only.
///
/// `idx_notifications_recipient_sent` (`recipient_key, sent_at`) serves the read of a starting
/// rate limiter, which counts a user's sends since a cutoff. It held every row, so each insert
/// wrote an entry with no `sent_at`, and the update to `sent` deleted it and wrote another. Its
/// keys are recipients, spread over the whole index: a batch of inserts or status changes touches
/// one page of it per notification or so, where the other indexes of `notifications`, keyed by
/// time or by ids in time order, take their new entries on their last page. Now it holds rows
/// with a `sent_at` (`idx_notifications_recipient_sent_at`), so an insert leaves it alone and a
/// notification gets one entry, when it is sent. Measured on SQLite, 50,000 notifications for
/// 5,000 recipients inserted 1,000 to a transaction, claimed 250 and marked sent 500 to one:
/// 1.27 → 0.90 pages written to the write-ahead log per notification (−29%). The rate limiter's
/// read is unchanged: every window it asks for (`sent_at >= cutoff`) implies the index's
/// condition, and both databases plan it on the new index (`tests/tests/query_plans.rs`).
///
/// The new index is built before the old one goes, as in `m20261203_000501`: concurrently on
/// PostgreSQL, outside a transaction, after dropping what an interrupted run left invalid.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index replaced.
const OLD: &str = "idx_notifications_recipient_sent";

/// The index that replaces it.
const NEW: &str = "idx_notifications_recipient_sent_at";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        concurrent_index::drop_invalid(manager, Notifications::Table, &[NEW]).await?;
        let mut new = recipient_sent(NEW);
        new.cond_where(Expr::col(Notifications::SentAt).is_not_null());
        manager.create_index(new).await?;
        manager
            .drop_index(concurrent_index::drop_index(OLD, Notifications::Table))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        concurrent_index::drop_invalid(manager, Notifications::Table, &[OLD]).await?;
        manager.create_index(recipient_sent(OLD)).await?;
        manager
            .drop_index(concurrent_index::drop_index(NEW, Notifications::Table))
            .await
    }

    /// `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}

/// `CREATE INDEX IF NOT EXISTS name ON notifications (recipient_key, sent_at)`, concurrently on
/// PostgreSQL.
fn recipient_sent(name: &str) -> IndexCreateStatement {
    Index::create()
        .name(name)
        .table(Notifications::Table)
        .col(Notifications::RecipientKey)
        .col(Notifications::SentAt)
        .if_not_exists()
        .concurrently()
        .to_owned()
}

#[derive(DeriveIden, Clone, Copy)]
enum Notifications {
    Table,
    RecipientKey,
    SentAt,
}
