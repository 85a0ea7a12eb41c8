//! `customers`: the recipients Herald knows, with their contacts.

use sea_orm::entity::prelude::*;

/// A recipient. Its `Debug` leaves the webhook secret out.
#[derive(Clone, PartialEq, Eq, DeriveEntityModel)]
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
    /// The secret `webhook_secret` replaced for the same `webhook_url`, which signs alongside it
    /// for `channels.webhook.rotation_grace_secs` after `webhook_secret_replaced_at`, so that the
    /// receiver can switch secrets without refusing a webhook. Never shown or logged either.
    pub previous_webhook_secret: Option<String>,
    /// When `previous_webhook_secret` was replaced (set with it, null without it).
    pub webhook_secret_replaced_at: Option<DateTimeUtc>,
    /// Preferred locale, e.g. `en`, `de-DE`.
    pub locale: String,
    /// IANA time zone, e.g. `Europe/Berlin`.
    pub timezone: String,
    /// When the row was created.
    pub created_at: DateTimeUtc,
    /// When the row was last changed.
    pub updated_at: DateTimeUtc,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("id", &self.id)
            .field("external_id", &self.external_id)
            .field("name", &self.name)
            .field("email", &self.email)
            .field("phone", &self.phone)
            .field("telegram_chat_id", &self.telegram_chat_id)
            .field("push_tokens", &self.push_tokens)
            .field("webhook_url", &self.webhook_url)
            .field("webhook_secret_set", &self.webhook_secret.is_some())
            .field(
                "previous_webhook_secret_set",
                &self.previous_webhook_secret.is_some(),
            )
            .field(
                "webhook_secret_replaced_at",
                &self.webhook_secret_replaced_at,
            )
            .field("locale", &self.locale)
            .field("timezone", &self.timezone)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// No relations are navigated from customers.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
