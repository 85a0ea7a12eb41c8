use sea_orm_migration::{prelude::*, schema::*};

use crate::lock_wait::wait_briefly_for_locks;

/// A `callbacks` key can be bound to one provider: `api_keys.provider`, nullable.
///
/// A `callbacks` key posted receipts for every provider (`/api/v1/providers/{provider}/callbacks`
/// names it in the path), so a key handed to one provider's webhook settings could mark another
/// provider's notifications delivered or failed. A key created with `herald apikey create --scopes
/// callbacks --provider P` now posts receipts for `P` only (403 for another). Keys stored before
/// this migration have none and keep posting for every provider.
///
/// Adding a nullable column without a default rewrites nothing on either database.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(string_null(ApiKeys::Provider))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .drop_column(ApiKeys::Provider)
                    .to_owned(),
            )
            .await
    }

    /// `SET LOCAL lock_timeout` holds only within a transaction.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Provider,
}
