//! `preferences`: whether a customer wants a category of notifications on a channel.
//!
//! A row with channel `*` is the customer's choice for the whole category; a row naming a channel
//! overrides it for that channel. Without rows everything is enabled. Critical categories ignore
//! the rows (they cannot be opted out of); the API refuses to store such an opt-out.

use sea_orm::entity::prelude::*;

/// The `channel` value of a row that applies to every channel of its category.
pub const ALL_CHANNELS: &str = "*";

/// One preference of one customer.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "preferences")]
pub struct Model {
    /// The customer's external id (as notifications name customers).
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// Category name.
    #[sea_orm(primary_key, auto_increment = false)]
    pub category: String,
    /// Channel name, or [`ALL_CHANNELS`].
    #[sea_orm(primary_key, auto_increment = false)]
    pub channel: String,
    /// Whether the customer wants it.
    pub enabled: bool,
    /// When it was last set.
    pub updated_at: DateTimeUtc,
}

/// No relations are navigated.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
