use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(DeliveryAttempts::Table)
                    .if_not_exists()
                    .col(pk_uuid(DeliveryAttempts::Id))
                    .col(uuid(DeliveryAttempts::NotificationId))
                    .col(integer(DeliveryAttempts::AttemptNo))
                    .col(string(DeliveryAttempts::Channel))
                    .col(string(DeliveryAttempts::Provider))
                    .col(string(DeliveryAttempts::Status))
                    .col(text_null(DeliveryAttempts::Error))
                    .col(string_null(DeliveryAttempts::ProviderMessageId))
                    .col(big_integer(DeliveryAttempts::LatencyMs))
                    .col(timestamp_with_time_zone(DeliveryAttempts::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_delivery_attempts_notification")
                            .from(DeliveryAttempts::Table, DeliveryAttempts::NotificationId)
                            .to(Notifications::Table, Notifications::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_delivery_attempts_notification")
                    .table(DeliveryAttempts::Table)
                    .col(DeliveryAttempts::NotificationId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(DeliveryAttempts::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Notifications {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum DeliveryAttempts {
    Table,
    Id,
    NotificationId,
    AttemptNo,
    Channel,
    Provider,
    Status,
    Error,
    ProviderMessageId,
    LatencyMs,
    CreatedAt,
}
