use sea_orm_migration::{prelude::*, schema::*};

/// Runtime templates: one row per template code and locale, editable through the API.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Templates::Table)
                    .if_not_exists()
                    .col(string(Templates::Code))
                    .col(string(Templates::Locale))
                    .col(text(Templates::Description))
                    .col(string_null(Templates::Category))
                    .col(text_null(Templates::Subject))
                    .col(text(Templates::Text))
                    .col(text_null(Templates::Html))
                    .col(text_null(Templates::Short))
                    .col(json(Templates::Variables))
                    .col(integer(Templates::Version))
                    .col(timestamp_with_time_zone(Templates::CreatedAt))
                    .col(timestamp_with_time_zone(Templates::UpdatedAt))
                    .primary_key(Index::create().col(Templates::Code).col(Templates::Locale))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Templates::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Templates {
    Table,
    Code,
    Locale,
    Description,
    Category,
    Subject,
    Text,
    Html,
    Short,
    Variables,
    Version,
    CreatedAt,
    UpdatedAt,
}
