use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// A listing of `scheduled` notifications gets an index in its order.
///
/// `GET /api/v1/notifications?status=scheduled` (and the dashboard feed filtered by `scheduled`)
/// lists newest first, by `id`. The one index of scheduled rows, `(scheduled_at, id)` from
/// `m20261207_001501`, is in the order they are due, so both databases walked the primary key
/// newest first until the page was full: where few notifications are scheduled, the whole table
/// at every page. `idx_notifications_scheduled_id` (`id`, for `scheduled` rows) finds them in the
/// listing's order, as `idx_notifications_queued` does the queued ones. It costs an entry per
/// scheduled notification, written when it is stored and removed when it is published or
/// cancelled; a notification sent at once has none.
///
/// Built as in `m20261203_000501`: concurrently on PostgreSQL, outside a transaction, after
/// dropping what an interrupted run left invalid. `tests/tests/query_plans.rs` checks both
/// databases plan the listing on it.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index.
const NAME: &str = "idx_notifications_scheduled_id";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let index = Index::create()
            .col(Notifications::Id)
            .cond_where(Expr::col(Notifications::Status).eq("scheduled"))
            .to_owned();
        concurrent_index::create(manager, Notifications::Table, NAME, index).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(concurrent_index::drop_index(NAME, Notifications::Table))
            .await
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
    Status,
}
