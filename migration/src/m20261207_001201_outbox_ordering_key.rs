use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};
use sea_orm_migration::{prelude::*, schema::*};

use crate::lock_wait::wait_briefly_for_locks;

/// Outbox rows get an ordering key: `outbox_events.ordering_key` (`order:<order number>` for an
/// order's events), with an index over the unpublished rows.
///
/// The orders API published each event at once, even while an older event of the same order was
/// still waiting in the outbox for the relay (its own publish had failed): the customer heard
/// "shipped" before "paid". The API now publishes at once only when no other unpublished row has
/// the event's key, and otherwise leaves the row to the relay, which publishes oldest first and
/// holds back a key's later rows behind a row it holds back. The index serves that check
/// (`repo::outbox::others_waiting` in `herald-entities`); it holds only unpublished rows, a
/// handful unless NATS is down, so published rows cost it nothing.
///
/// Rows unpublished at the upgrade get their key from their payload, so an event stored before
/// it is not overtaken either. Built in the migration's transaction: the outbox keeps published
/// rows for a day, and the index holds only the unpublished ones.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index.
const NAME: &str = "idx_outbox_events_unpublished_key";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        manager
            .alter_table(
                Table::alter()
                    .table(OutboxEvents::Table)
                    .add_column(string_null(OutboxEvents::OrderingKey))
                    .to_owned(),
            )
            .await?;
        let db = manager.get_connection();
        let order_number = match db.get_database_backend() {
            // The payload is JSON in a text column.
            DbBackend::Postgres => "payload::json -> 'data' ->> 'order_number'",
            _ => "json_extract(payload, '$.data.order_number')",
        };
        db.execute_unprepared(&format!(
            "UPDATE outbox_events SET ordering_key = 'order:' || ({order_number}) \
             WHERE published_at IS NULL AND subject LIKE 'events.orders.%'"
        ))
        .await?;
        manager
            .create_index(
                Index::create()
                    .name(NAME)
                    .table(OutboxEvents::Table)
                    .col(OutboxEvents::OrderingKey)
                    .cond_where(Expr::col(OutboxEvents::PublishedAt).is_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        manager
            .drop_index(
                Index::drop()
                    .name(NAME)
                    .table(OutboxEvents::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(OutboxEvents::Table)
                    .drop_column(OutboxEvents::OrderingKey)
                    .to_owned(),
            )
            .await
    }

    /// The column, its values and its index together, on SQLite too (which gets no transaction
    /// unasked).
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

#[derive(DeriveIden)]
enum OutboxEvents {
    Table,
    OrderingKey,
    PublishedAt,
}
