use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};
use sea_orm_migration::{prelude::*, schema::*};

use crate::lock_wait::wait_briefly_for_locks;

/// Quiet hours without a time zone of their own follow the customer's.
///
/// `quiet_hours.timezone` was required, so quiet hours set without one stored the customer's
/// time zone of that moment: a customer who moved (`PUT /customers/{id}` with a new time zone)
/// kept a night in the old one. The column may now be null, meaning "the customer's time zone
/// at delivery". Rows stored before keep the zone they have: nothing tells a copied zone from one
/// given on purpose.
///
/// PostgreSQL drops the constraint in place; SQLite cannot, so the table is copied into a new
/// one, in a transaction. Down fills the nulls with the customer's time zone (UTC
/// for wishes without a customer) and makes the column required again.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        set_timezone_required(manager, false).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        wait_briefly_for_locks(manager).await?;
        manager
            .get_connection()
            .execute_unprepared(
                "UPDATE quiet_hours SET timezone = COALESCE((SELECT c.timezone FROM customers c \
                 WHERE c.external_id = quiet_hours.customer_id), 'UTC') WHERE timezone IS NULL",
            )
            .await?;
        set_timezone_required(manager, true).await
    }

    /// SQLite's copy is atomic only in a transaction, which that backend does not get unasked.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// Makes `quiet_hours.timezone` required or nullable.
async fn set_timezone_required(manager: &SchemaManager<'_>, required: bool) -> Result<(), DbErr> {
    if manager.get_database_backend() != DbBackend::Sqlite {
        let change = if required { "SET" } else { "DROP" };
        let sql = format!("ALTER TABLE quiet_hours ALTER COLUMN timezone {change} NOT NULL");
        return manager
            .get_connection()
            .execute_unprepared(&sql)
            .await
            .map(drop);
    }
    let timezone = if required {
        string(QuietHours::Timezone)
    } else {
        string_null(QuietHours::Timezone)
    };
    manager
        .create_table(
            Table::create()
                .table(QuietHours::Rebuilt)
                .col(string(QuietHours::CustomerId).primary_key())
                .col(string(QuietHours::Starts))
                .col(string(QuietHours::Ends))
                .col(timezone)
                .col(timestamp_with_time_zone(QuietHours::UpdatedAt))
                .to_owned(),
        )
        .await?;
    manager
        .get_connection()
        .execute_unprepared(
            "INSERT INTO quiet_hours_rebuilt (customer_id, starts, ends, timezone, updated_at) \
             SELECT customer_id, starts, ends, timezone, updated_at FROM quiet_hours",
        )
        .await?;
    manager
        .drop_table(Table::drop().table(QuietHours::Table).to_owned())
        .await?;
    manager
        .rename_table(
            Table::rename()
                .table(QuietHours::Rebuilt, QuietHours::Table)
                .to_owned(),
        )
        .await
}

#[derive(DeriveIden)]
enum QuietHours {
    Table,
    /// The SQLite copy, renamed to `quiet_hours` once filled.
    #[sea_orm(iden = "quiet_hours_rebuilt")]
    Rebuilt,
    CustomerId,
    Starts,
    Ends,
    Timezone,
    UpdatedAt,
}
