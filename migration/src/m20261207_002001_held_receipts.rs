use sea_orm_migration::{prelude::*, schema::*};

/// Receipts that arrived before their notification was recorded sent: `held_receipts`, at most
/// one per notification and provider (failover can bring receipts from two providers that both
/// took the message), kept until the move to `sent` is written and then applied in that same
/// transaction (see `herald_entities::repo::receipts`).
///
/// A provider's callback can beat the record of the send: the provider answered, the channel
/// actor reported success, but the StatusWriter writes `sent` a few milliseconds later (longer
/// under load). Such a receipt was refused 409, which providers do not send again, so the
/// notification stayed `sent` for ever. The row goes when its receipt is applied, when its
/// notification ends unsent, when the Scheduler's clean-up finds it stranded, or with its
/// notification (retention; the foreign key cascades).
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(HeldReceipts::Table)
                    .if_not_exists()
                    .col(uuid(HeldReceipts::NotificationId))
                    .col(string(HeldReceipts::Provider))
                    .col(string_len(HeldReceipts::Status, 16))
                    .col(text(HeldReceipts::Reason))
                    .col(text_null(HeldReceipts::Error))
                    .col(timestamp_with_time_zone(HeldReceipts::At))
                    .col(timestamp_with_time_zone(HeldReceipts::ReceivedAt))
                    .primary_key(
                        Index::create()
                            .col(HeldReceipts::NotificationId)
                            .col(HeldReceipts::Provider),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_held_receipts_notification")
                            .from(HeldReceipts::Table, HeldReceipts::NotificationId)
                            .to(Notifications::Table, Notifications::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(HeldReceipts::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Notifications {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum HeldReceipts {
    Table,
    NotificationId,
    Provider,
    Status,
    Reason,
    Error,
    At,
    ReceivedAt,
}
