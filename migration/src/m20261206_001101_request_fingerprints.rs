use sea_orm_migration::{prelude::*, schema::*};

use crate::lock_wait::wait_briefly_for_locks;

/// Notifications and batches record a fingerprint of the request that stored them under a
/// request id: `notifications.request_fingerprint` and `batches.request_fingerprint`, nullable.
///
/// A request id used again for a different request (another recipient, message, category, ...)
/// was answered with the first request's notification or batch as if it were a repeat, and the
/// caller took the second request for accepted while nothing of it was sent. The API now compares
/// the fingerprint of a repeat with the stored one and refuses a different request (422,
/// `idempotency_key_reused`). Rows stored before this migration have none: a request using their
/// request id again is taken for a repeat, as before.
///
/// Adding a nullable column without a default rewrites nothing on either database (PostgreSQL
/// changes its catalog only; SQLite its schema text), so the migration takes a moment on a large
/// `notifications` table too. The two columns come and go together.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        for table in [Tables::Notifications, Tables::Batches] {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(string_null(Tables::RequestFingerprint))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        for table in [Tables::Notifications, Tables::Batches] {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .drop_column(Tables::RequestFingerprint)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    /// Both columns or neither, on SQLite too (which gets no transaction unasked).
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

#[derive(DeriveIden, Clone, Copy)]
enum Tables {
    Notifications,
    Batches,
    RequestFingerprint,
}
