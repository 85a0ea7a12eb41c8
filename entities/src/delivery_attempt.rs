//! `delivery_attempts`: every try on every channel, successful or not.

use sea_orm::entity::prelude::*;

/// One attempt to deliver a notification on one channel.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "delivery_attempts")]
pub struct Model {
    /// Id (UUIDv7).
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The notification tried.
    pub notification_id: Uuid,
    /// 1 for the first attempt of the notification, counting across channels and retries.
    pub attempt_no: i32,
    /// Channel name.
    pub channel: String,
    /// Provider name (configured instance of the channel).
    pub provider: String,
    /// `sent`, `failed` (transient), `rejected` (permanent), `circuit_open`, `not_started`,
    /// `no_contact`, `unavailable`, `opted_out`, `refused_earlier` (not called: it refused for
    /// good in an earlier round).
    pub status: String,
    /// What went wrong.
    pub error: Option<String>,
    /// The provider's id for the message, when it gave one.
    pub provider_message_id: Option<String>,
    /// How long the provider took, in milliseconds.
    pub latency_ms: i64,
    /// When the attempt finished.
    pub created_at: DateTimeUtc,
}

/// An attempt belongs to a notification.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// The notification.
    #[sea_orm(
        belongs_to = "crate::notification::Entity",
        from = "Column::NotificationId",
        to = "crate::notification::Column::Id",
        on_delete = "Cascade"
    )]
    Notification,
}

impl Related<crate::notification::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Notification.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
