//! `outbox_events`: domain events written in the same transaction as the change they describe,
//! then published to NATS. A row without `published_at` is an event NATS has not confirmed yet;
//! the outbox relay publishes it again until it does.

use sea_orm::entity::prelude::*;

/// An event waiting to be, or already, published.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox_events")]
pub struct Model {
    /// The event's id; also its `Nats-Msg-Id`, so re-publishing is harmless.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The subject to publish on (`events.<type>`).
    pub subject: String,
    /// The event as published (JSON object).
    pub payload: Json,
    /// When it was written.
    pub created_at: DateTimeUtc,
    /// When JetStream confirmed it; `None` while unpublished.
    pub published_at: Option<DateTimeUtc>,
    /// Events with the same key are published in the order they were written (an order's
    /// events: `order:<order number>`); `None` for a row written before keys existed.
    pub ordering_key: Option<String>,
}

/// No relations are navigated from outbox events.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
