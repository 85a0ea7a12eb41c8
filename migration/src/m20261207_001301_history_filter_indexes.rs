use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// Listings by category or by carrying channel get indexes of their own.
///
/// `GET /api/v1/notifications?category=…` (or `?channel=…`) without a customer read rows newest
/// first until a page was full: for a rare category (or a channel seldom used) a walk over the
/// whole table, page after page. `idx_notifications_category` (`category, id`) and
/// `idx_notifications_final_channel` (`final_channel, id`, for rows a channel carried) find them
/// in the order listed. The category is written once, with the row; the channel once, when a
/// channel carries the notification, so a notification not carried has no entry in the second.
///
/// Built as in `m20261203_000501`: concurrently on PostgreSQL, outside a transaction, after
/// dropping what an interrupted run left invalid.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index of the category filter.
const CATEGORY: &str = "idx_notifications_category";
/// The index of the channel filter.
const FINAL_CHANNEL: &str = "idx_notifications_final_channel";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let category = Index::create()
            .col(Notifications::Category)
            .col(Notifications::Id)
            .to_owned();
        concurrent_index::create(manager, Notifications::Table, CATEGORY, category).await?;
        let channel = Index::create()
            .col(Notifications::FinalChannel)
            .col(Notifications::Id)
            .cond_where(Expr::col(Notifications::FinalChannel).is_not_null())
            .to_owned();
        concurrent_index::create(manager, Notifications::Table, FINAL_CHANNEL, channel).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for name in [FINAL_CHANNEL, CATEGORY] {
            manager
                .drop_index(concurrent_index::drop_index(name, Notifications::Table))
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
    Category,
    FinalChannel,
}
