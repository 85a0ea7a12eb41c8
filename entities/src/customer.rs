//! `customers`: the recipients Herald knows, with their contacts.

use sea_orm::entity::prelude::*;

/// A recipient.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "customers")]
pub struct Model {
    /// Herald's id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The producer's id for this customer; notifications name customers by it.
    #[sea_orm(unique)]
    pub external_id: String,
    /// Display name.
    pub name: Option<String>,
    /// Email address.
    pub email: Option<String>,
    /// Phone number (E.164).
    pub phone: Option<String>,
    /// Telegram chat id.
    pub telegram_chat_id: Option<String>,
    /// Push device tokens (JSON array of strings).
    pub push_tokens: Json,
    /// Webhook URL.
    pub webhook_url: Option<String>,
    /// The customer's own `whsec_…` secret that signs webhooks to `webhook_url` instead of
    /// `channels.webhook.secret`. Write-only through the API: never shown or logged.
    pub webhook_secret: Option<String>,
    /// Preferred locale, e.g. `en`, `de-DE`.
    pub locale: String,
    /// IANA time zone, e.g. `Europe/Berlin`.
    pub timezone: String,
    /// When the row was created.
    pub created_at: DateTimeUtc,
    /// When the row was last changed.
    pub updated_at: DateTimeUtc,
}

/// No relations are navigated from customers.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
