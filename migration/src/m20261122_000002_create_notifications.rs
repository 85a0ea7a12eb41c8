use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Notifications::Table)
                    .if_not_exists()
                    .col(pk_uuid(Notifications::Id))
                    .col(string_null(Notifications::RequestId).unique_key())
                    .col(string_null(Notifications::CustomerId))
                    .col(string(Notifications::RecipientKey))
                    .col(json(Notifications::Contacts))
                    .col(string(Notifications::Category))
                    .col(json(Notifications::Channels))
                    .col(json(Notifications::Content))
                    .col(string(Notifications::Status))
                    .col(text_null(Notifications::StatusReason))
                    .col(timestamp_with_time_zone_null(Notifications::ScheduledAt))
                    .col(string_null(Notifications::FinalChannel))
                    .col(integer(Notifications::Attempts).default(0))
                    .col(text_null(Notifications::Error))
                    .col(timestamp_with_time_zone(Notifications::CreatedAt))
                    .col(timestamp_with_time_zone(Notifications::UpdatedAt))
                    .col(timestamp_with_time_zone_null(Notifications::SentAt))
                    .to_owned(),
            )
            .await?;
        for (name, columns) in [
            (
                "idx_notifications_customer_status",
                [Notifications::CustomerId, Notifications::Status].as_slice(),
            ),
            (
                "idx_notifications_status_scheduled",
                [Notifications::Status, Notifications::ScheduledAt].as_slice(),
            ),
            (
                "idx_notifications_created_at",
                [Notifications::CreatedAt].as_slice(),
            ),
        ] {
            let mut index = Index::create();
            index.name(name).table(Notifications::Table).if_not_exists();
            for column in columns {
                index.col(column.clone());
            }
            manager.create_index(index.to_owned()).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Notifications::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden, Clone)]
enum Notifications {
    Table,
    Id,
    RequestId,
    CustomerId,
    RecipientKey,
    Contacts,
    Category,
    Channels,
    Content,
    Status,
    StatusReason,
    ScheduledAt,
    FinalChannel,
    Attempts,
    Error,
    CreatedAt,
    UpdatedAt,
    SentAt,
}
