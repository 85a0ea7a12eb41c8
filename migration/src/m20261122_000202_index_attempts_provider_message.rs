use sea_orm_migration::prelude::*;

/// Delivery receipts find a notification by the provider's message id.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("idx_delivery_attempts_provider_message")
                    .table(DeliveryAttempts::Table)
                    .col(DeliveryAttempts::ProviderMessageId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("idx_delivery_attempts_provider_message")
                    .table(DeliveryAttempts::Table)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum DeliveryAttempts {
    Table,
    ProviderMessageId,
}
