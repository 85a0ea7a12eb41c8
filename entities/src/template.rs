//! `templates`: runtime templates, one row per template code and locale, created and edited
//! through the API (the compiled templates are not stored here).

use sea_orm::entity::prelude::*;

/// One locale variant of a runtime template.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "templates")]
pub struct Model {
    /// The code notifications name it by, e.g. `welcome`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub code: String,
    /// The locale of this variant (`en`, `de-DE`).
    #[sea_orm(primary_key, auto_increment = false)]
    pub locale: String,
    /// What it is for.
    #[sea_orm(column_type = "Text")]
    pub description: String,
    /// The category it is meant for, informative.
    pub category: Option<String>,
    /// Subject source (email subject, push title).
    #[sea_orm(column_type = "Text", nullable)]
    pub subject: Option<String>,
    /// Plain-text source.
    #[sea_orm(column_type = "Text")]
    pub text: String,
    /// HTML source (auto-escaped when rendered).
    #[sea_orm(column_type = "Text", nullable)]
    pub html: Option<String>,
    /// Short-text source (SMS, Telegram, push).
    #[sea_orm(column_type = "Text", nullable)]
    pub short: Option<String>,
    /// The variables the sources use (JSON array of names), derived when it was saved.
    pub variables: Json,
    /// 1 when created, incremented by every update.
    pub version: i32,
    /// When it was created.
    pub created_at: DateTimeUtc,
    /// When it last changed.
    pub updated_at: DateTimeUtc,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
