use sea_orm_migration::prelude::*;

use crate::concurrent_index;

/// The customers whose webhook secret was replaced get an index by when: the clean-up forgets a
/// replaced secret once its rotation grace is over.
///
/// A replaced secret (`customers.previous_webhook_secret`, from `m20261207_003091`) signs
/// alongside the new one for `channels.webhook.rotation_grace_secs`, and then never again; it was
/// kept all the same. Every clean-up (`scheduler.retention_interval_secs`) now clears the ones
/// replaced before the grace: `idx_customers_webhook_secret_replaced_at`
/// (`webhook_secret_replaced_at`, for rows that have one) finds them without reading every
/// customer, and costs an entry only per customer in the middle of a rotation.
///
/// Built as in `m20261203_000501`: concurrently on PostgreSQL, outside a transaction, after
/// dropping what an interrupted run left invalid.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index.
const NAME: &str = "idx_customers_webhook_secret_replaced_at";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let index = Index::create()
            .col(Customers::WebhookSecretReplacedAt)
            .cond_where(Expr::col(Customers::WebhookSecretReplacedAt).is_not_null())
            .to_owned();
        concurrent_index::create(manager, Customers::Table, NAME, index).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(concurrent_index::drop_index(NAME, Customers::Table))
            .await
    }

    /// `CREATE INDEX CONCURRENTLY` cannot run inside a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(false)
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Customers {
    Table,
    WebhookSecretReplacedAt,
}
