use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// Delivery attempts get an index on the time they finished.
///
/// The dashboard's provider outcomes (`repo::activity::attempt_outcomes`, behind `/channels`)
/// count the attempts since a moment; `delivery_attempts` was indexed only on its notification
/// and its provider's message id, so every page load read the whole table, which grows with every
/// attempt and is never purged under the default retention. `idx_delivery_attempts_created_at`
/// finds the recent ones. Attempts are inserted and never changed: the index costs one entry per
/// attempt.
///
/// Retention's read of old final notifications needs no index of its own: it also asks for
/// `created_at < cutoff` (a row changes no earlier than it is created), which
/// `idx_notifications_created_at` serves.
///
/// Built as in `m20261203_000501`: concurrently on PostgreSQL, outside a transaction, after
/// dropping what an interrupted run left invalid.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index.
const NAME: &str = "idx_delivery_attempts_created_at";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let index = Index::create().col(DeliveryAttempts::CreatedAt).to_owned();
        concurrent_index::create(manager, DeliveryAttempts::Table, NAME, index).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(concurrent_index::drop_index(NAME, DeliveryAttempts::Table))
            .await
    }

    /// `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum DeliveryAttempts {
    Table,
    CreatedAt,
}
