use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(OutboxEvents::Table)
                    .if_not_exists()
                    .col(pk_uuid(OutboxEvents::Id))
                    .col(string(OutboxEvents::Subject))
                    .col(json(OutboxEvents::Payload))
                    .col(timestamp_with_time_zone(OutboxEvents::CreatedAt))
                    .col(timestamp_with_time_zone_null(OutboxEvents::PublishedAt))
                    .to_owned(),
            )
            .await?;
        // The relay's query: unpublished rows, oldest first.
        manager
            .create_index(
                Index::create()
                    .name("idx_outbox_events_published_created")
                    .table(OutboxEvents::Table)
                    .col(OutboxEvents::PublishedAt)
                    .col(OutboxEvents::CreatedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(OutboxEvents::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum OutboxEvents {
    Table,
    Id,
    Subject,
    Payload,
    CreatedAt,
    PublishedAt,
}
