//! `api_keys`: who may call the API, with which scopes. Only a hash of each key's secret is stored.

use sea_orm::entity::prelude::*;

/// An API key.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    /// Id (UUIDv7).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// A name for humans (who or what uses the key).
    pub name: String,
    /// The key's public lookup part (the token's middle segment); unique.
    #[sea_orm(unique)]
    pub prefix: String,
    /// Hex SHA-256 of the key's secret part.
    pub secret_hash: String,
    /// Granted scopes, comma-separated (`send,read`).
    pub scopes: String,
    /// When it was created.
    pub created_at: DateTimeUtc,
    /// When it was revoked; a revoked key authenticates nothing.
    pub revoked_at: Option<DateTimeUtc>,
    /// When it was last seen authenticating (updated at most once per cache period).
    pub last_used_at: Option<DateTimeUtc>,
    /// The one provider a `callbacks` key posts receipts for; `None`: every provider.
    pub provider: Option<String>,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
