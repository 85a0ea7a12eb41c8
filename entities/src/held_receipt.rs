//! `held_receipts`: delivery receipts that arrived before their notification was recorded sent,
//! kept until it is (see [`crate::repo::receipts`]).

use sea_orm::entity::prelude::*;

use crate::NotificationStatus;

/// A receipt waiting for the record of its notification's send.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "held_receipts")]
pub struct Model {
    /// The notification it is about; one held receipt per notification and provider.
    #[sea_orm(primary_key, auto_increment = false)]
    pub notification_id: Uuid,
    /// The provider that reported it; it applies only if that provider accepted the message.
    #[sea_orm(primary_key, auto_increment = false)]
    pub provider: String,
    /// The status it moves the notification to: `delivered` or `failed`.
    pub status: NotificationStatus,
    /// Why, in words (`delivery confirmed by twilio`, `bounced (smtp)`, …).
    pub reason: String,
    /// The provider's error, as kept.
    pub error: Option<String>,
    /// When it happened, by the provider's clock (no later than its arrival).
    pub at: DateTimeUtc,
    /// When Herald received it.
    pub received_at: DateTimeUtc,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
