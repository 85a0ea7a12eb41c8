use sea_orm_migration::{prelude::*, schema::*};

/// Dashboard sessions that were logged out: `dashboard_logouts`, one row per session ended by
/// **Log out** (the session's random id from its cookie, and when the cookie expires).
///
/// A logout only had the browser delete its cookie, so a copy of the cookie (taken from the
/// browser, a proxy log, a shared machine) kept opening the dashboard until it expired, up to
/// `dashboard.session_ttl_hours` later, unless the whole admin key was revoked. Every dashboard
/// request now looks its session up here, on every instance sharing the database, and a logged-out
/// session is sent to the login page. A row is deleted once its cookie has expired anyway (by a
/// later logout), so the table holds the logouts of the last session lifetime only.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(DashboardLogouts::Table)
                    .if_not_exists()
                    .col(pk_uuid(DashboardLogouts::SessionId))
                    .col(timestamp_with_time_zone(DashboardLogouts::ExpiresAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(DashboardLogouts::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum DashboardLogouts {
    Table,
    SessionId,
    ExpiresAt,
}
