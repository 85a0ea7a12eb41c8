use sea_orm_migration::prelude::*;

/// A rate limiter starting for a user (first use on this instance, or a partition taken over from
/// another instance) counts that user's recent sends by recipient and time.
#[derive(DeriveMigrationName)]
pub struct Migration;

const NAME: &str = "idx_notifications_recipient_sent";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(NAME)
                    .table(Notifications::Table)
                    .col(Notifications::RecipientKey)
                    .col(Notifications::SentAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(NAME)
                    .table(Notifications::Table)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum Notifications {
    Table,
    RecipientKey,
    SentAt,
}
