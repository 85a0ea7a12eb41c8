use sea_orm_migration::{prelude::*, schema::*};

use crate::lock_wait::wait_briefly_for_locks;

/// Customers get their own webhook signing secret: `customers.webhook_secret`, nullable.
///
/// Every webhook was signed with the one `channels.webhook.secret`, which every receiver that
/// verifies signatures had to hold: one receiver could forge webhooks another would accept, and
/// rotating the secret broke them all at once. A customer with a secret of its own gets webhooks
/// signed with it; the others keep the global secret (a null here).
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Customers::Table)
                    .add_column(string_null(Customers::WebhookSecret))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Customers::Table)
                    .drop_column(Customers::WebhookSecret)
                    .to_owned(),
            )
            .await
    }

    /// `SET LOCAL lock_timeout` holds only within a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

#[derive(DeriveIden)]
enum Customers {
    Table,
    WebhookSecret,
}
