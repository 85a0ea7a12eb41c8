use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Customers::Table)
                    .if_not_exists()
                    .col(pk_uuid(Customers::Id))
                    .col(string_uniq(Customers::ExternalId))
                    .col(string_null(Customers::Name))
                    .col(string_null(Customers::Email))
                    .col(string_null(Customers::Phone))
                    .col(string_null(Customers::TelegramChatId))
                    .col(json(Customers::PushTokens))
                    .col(string_null(Customers::WebhookUrl))
                    .col(string(Customers::Locale).default("en"))
                    .col(string(Customers::Timezone).default("UTC"))
                    .col(timestamp_with_time_zone(Customers::CreatedAt))
                    .col(timestamp_with_time_zone(Customers::UpdatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Customers::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Customers {
    Table,
    Id,
    ExternalId,
    Name,
    Email,
    Phone,
    TelegramChatId,
    PushTokens,
    WebhookUrl,
    Locale,
    Timezone,
    CreatedAt,
    UpdatedAt,
}
