use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// Delivered notifications get an index of their own.
///
/// A listing by `delivered` without a customer read rows newest first until a page was full: a
/// walk over the whole table where few notifications are ever delivered (providers that report
/// no receipts). `idx_notifications_delivered` (`id`, for `delivered` rows) finds them directly.
/// It costs one entry per delivered notification, written by the receipt that delivers it; a
/// notification that is never delivered has none.
///
/// Built as in `m20261203_000501`: concurrently on PostgreSQL, outside a transaction, after
/// dropping what an interrupted run left invalid.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index.
const NAME: &str = "idx_notifications_delivered";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let index = Index::create()
            .col(Notifications::Id)
            .cond_where(Expr::col(Notifications::Status).eq("delivered"))
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
