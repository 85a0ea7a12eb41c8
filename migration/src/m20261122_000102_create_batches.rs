use sea_orm_migration::{prelude::*, schema::*};

/// Bulk sends: the `batches` table, and `notifications.batch_id` linking a batch's notifications
/// (for its progress).
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Batches::Table)
                    .if_not_exists()
                    .col(pk_uuid(Batches::Id))
                    .col(string(Batches::Status))
                    .col(json(Batches::Spec))
                    .col(big_integer(Batches::Total))
                    .col(big_integer(Batches::Published).default(0))
                    .col(string_null(Batches::Cursor))
                    .col(timestamp_with_time_zone_null(Batches::LeaseUntil))
                    .col(text_null(Batches::Error))
                    .col(timestamp_with_time_zone(Batches::CreatedAt))
                    .col(timestamp_with_time_zone(Batches::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_batches_status")
                    .table(Batches::Table)
                    .col(Batches::Status)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Notifications::Table)
                    .add_column(uuid_null(Notifications::BatchId))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_notifications_batch_status")
                    .table(Notifications::Table)
                    .col(Notifications::BatchId)
                    .col(Notifications::Status)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("idx_notifications_batch_status")
                    .table(Notifications::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Notifications::Table)
                    .drop_column(Notifications::BatchId)
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table(Batches::Table).to_owned())
            .await
    }

    /// All of it or nothing, on SQLite too (which gets no transaction unasked): stopped after the
    /// `ALTER TABLE`, the column stayed, the migration was not recorded, and every later run
    /// failed on adding the column again.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

#[derive(DeriveIden)]
enum Batches {
    Table,
    Id,
    Status,
    Spec,
    Total,
    Published,
    Cursor,
    LeaseUntil,
    Error,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Notifications {
    Table,
    BatchId,
    Status,
}
