use sea_orm_migration::{prelude::*, schema::*};

use crate::lock_wait::wait_briefly_for_locks;

/// Bulk sends get an idempotency key: `batches.request_id`, unique.
///
/// A bulk send retried after a lost answer was stored again as a new batch, and every recipient
/// got the message twice: notification ids derive from the batch id, which was new each time. A
/// repeated request id now answers the batch stored first, as single sends do; the unique index
/// makes two concurrent repeats store one batch (`ON CONFLICT (request_id) DO NOTHING`). Batches
/// without a request id keep a null, which the index does not compare.
///
/// Built in the migration's transaction rather than concurrently: `batches` holds one row per bulk
/// send (not per recipient), so the index is built in a moment, and the column and its index come
/// and go together.
#[derive(DeriveMigrationName)]
pub struct Migration;

/// The index.
const NAME: &str = "idx_batches_request_id";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Batches::Table)
                    .add_column(string_null(Batches::RequestId))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(NAME)
                    .table(Batches::Table)
                    .col(Batches::RequestId)
                    .unique()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        manager
            .drop_index(Index::drop().name(NAME).table(Batches::Table).to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Batches::Table)
                    .drop_column(Batches::RequestId)
                    .to_owned(),
            )
            .await
    }

    /// The column and its index together, on SQLite too (which gets no transaction unasked).
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

#[derive(DeriveIden)]
enum Batches {
    Table,
    RequestId,
}
