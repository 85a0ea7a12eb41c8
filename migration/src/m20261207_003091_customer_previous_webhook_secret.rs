use sea_orm_migration::{prelude::*, schema::*};

use crate::lock_wait::wait_briefly_for_locks;

/// Customers keep the webhook secret a new one replaced: `customers.previous_webhook_secret` and
/// `customers.webhook_secret_replaced_at`, both nullable.
///
/// Replacing a customer's `webhook_secret` switched the signature at once, so a receiver had to
/// accept both secrets before the `PUT` and every webhook signed in between with the other one
/// was refused if it did not. The replaced secret now signs alongside the new one (Standard
/// Webhooks lists several signatures in `webhook-signature`) for
/// `channels.webhook.rotation_grace_secs` after the replacement.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        // One column per statement: SQLite alters one thing at a time.
        for column in [
            string_null(Customers::PreviousWebhookSecret),
            timestamp_with_time_zone_null(Customers::WebhookSecretReplacedAt),
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Customers::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        for column in [
            Customers::PreviousWebhookSecret,
            Customers::WebhookSecretReplacedAt,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Customers::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    /// `SET LOCAL lock_timeout` holds only within a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

#[derive(DeriveIden)]
enum Customers {
    Table,
    PreviousWebhookSecret,
    WebhookSecretReplacedAt,
}
