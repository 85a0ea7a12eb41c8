use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Orders::Table)
                    .if_not_exists()
                    .col(pk_uuid(Orders::Id))
                    .col(string_uniq(Orders::OrderNumber))
                    .col(string(Orders::CustomerId))
                    .col(string_len(Orders::Status, 16))
                    .col(big_integer(Orders::TotalMinor))
                    .col(string_len(Orders::Currency, 3))
                    .col(json(Orders::Items))
                    .col(string_null(Orders::TrackingNumber))
                    .col(date_null(Orders::DeliveryEstimate))
                    .col(timestamp_with_time_zone(Orders::CreatedAt))
                    .col(timestamp_with_time_zone(Orders::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_orders_customer")
                    .table(Orders::Table)
                    .col(Orders::CustomerId)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Orders::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Orders {
    Table,
    Id,
    OrderNumber,
    CustomerId,
    Status,
    TotalMinor,
    Currency,
    Items,
    TrackingNumber,
    DeliveryEstimate,
    CreatedAt,
    UpdatedAt,
}
