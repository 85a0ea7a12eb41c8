use sea_orm_migration::{prelude::*, schema::*};

/// Recipients' wishes: preferences per customer × category × channel, and quiet hours.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Preferences::Table)
                    .if_not_exists()
                    .col(string(Preferences::CustomerId))
                    .col(string(Preferences::Category))
                    .col(string(Preferences::Channel))
                    .col(boolean(Preferences::Enabled))
                    .col(timestamp_with_time_zone(Preferences::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .col(Preferences::CustomerId)
                            .col(Preferences::Category)
                            .col(Preferences::Channel),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(QuietHours::Table)
                    .if_not_exists()
                    .col(string(QuietHours::CustomerId).primary_key())
                    .col(string(QuietHours::Starts))
                    .col(string(QuietHours::Ends))
                    .col(string(QuietHours::Timezone))
                    .col(timestamp_with_time_zone(QuietHours::UpdatedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(QuietHours::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Preferences::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Preferences {
    Table,
    CustomerId,
    Category,
    Channel,
    Enabled,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum QuietHours {
    Table,
    CustomerId,
    Starts,
    Ends,
    Timezone,
    UpdatedAt,
}
