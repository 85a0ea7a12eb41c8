use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// Three listings stop reading `notifications` whole or sorting all they find.
///
/// - The dashboard feed of one customer (`/?customer=…`) wants the rows its customer column shows
///   as that value: `customer_id = ?`, or `customer_id IS NULL AND recipient_key = ?` (the first
///   inline contact). The second half had no index, so the feed walked the notifications newest
///   first until its page was full: for one with fewer than a page, the whole table, at every
///   refresh. `idx_notifications_inline_recipient` (`recipient_key, id`, for rows without a
///   customer) serves it, beside `idx_notifications_customer_id` for the first half; the feed asks
///   each half for a page of its own, in that order, and merges the two
///   (`repo::history::feed_page` in `herald-entities`). Rows with a customer have no entry.
/// - The dashboard's `/scheduled` lists scheduled rows by `(scheduled_at, id)`, and
///   `idx_notifications_scheduled_due` held `(scheduled_at)` only: both databases sorted every
///   row sharing a `scheduled_at` (a whole bulk send scheduled for one moment) before taking the
///   page. `idx_notifications_scheduled_at_id` (`scheduled_at, id`, for `scheduled` rows)
///   replaces it, and serves the Scheduler's due scan as well.
/// - A listing of `queued` notifications (`GET /api/v1/notifications?status=queued`, the feed
///   filtered by `queued`) found them in no index: a walk of the whole table where few are
///   queued, the usual case. `idx_notifications_queued` (`id`, for `queued` rows) holds only
///   the rows waiting to be processed, at its end: each notification enters it when stored and
///   leaves it when claimed.
///
/// Built as in `m20261203_000501`: the new indexes first, then the old one dropped, each on its
/// own and concurrently on PostgreSQL (outside a transaction), after dropping what an
/// interrupted run left invalid. `tests/tests/query_plans.rs` checks both databases plan the
/// listings on these indexes.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index of the feed's rows addressed by an inline contact.
const INLINE_RECIPIENT: &str = "idx_notifications_inline_recipient";
/// The index of scheduled rows in the order they are due and listed.
const SCHEDULED_AT_ID: &str = "idx_notifications_scheduled_at_id";
/// The index of queued rows.
const QUEUED: &str = "idx_notifications_queued";
/// The index replaced by [`SCHEDULED_AT_ID`] (from `m20261203_000501`).
const SCHEDULED_DUE: &str = "idx_notifications_scheduled_due";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use Notifications::*;
        let inline = Index::create()
            .col(RecipientKey)
            .col(Id)
            .cond_where(Expr::col(CustomerId).is_null())
            .to_owned();
        concurrent_index::create(manager, Table, INLINE_RECIPIENT, inline).await?;
        let scheduled = Index::create()
            .col(ScheduledAt)
            .col(Id)
            .cond_where(Expr::col(Status).eq("scheduled"))
            .to_owned();
        concurrent_index::create(manager, Table, SCHEDULED_AT_ID, scheduled).await?;
        let queued = Index::create()
            .col(Id)
            .cond_where(Expr::col(Status).eq("queued"))
            .to_owned();
        concurrent_index::create(manager, Table, QUEUED, queued).await?;
        manager
            .drop_index(concurrent_index::drop_index(SCHEDULED_DUE, Table))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        use Notifications::*;
        let due = Index::create()
            .col(ScheduledAt)
            .cond_where(Expr::col(Status).eq("scheduled"))
            .to_owned();
        concurrent_index::create(manager, Table, SCHEDULED_DUE, due).await?;
        for name in [QUEUED, SCHEDULED_AT_ID, INLINE_RECIPIENT] {
            manager
                .drop_index(concurrent_index::drop_index(name, Table))
                .await?;
        }
        Ok(())
    }

    /// `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Notifications {
    Table,
    Id,
    CustomerId,
    RecipientKey,
    Status,
    ScheduledAt,
}
