//! `notifications`: one row per notification, with its current status.

use sea_orm::entity::prelude::*;

use crate::NotificationStatus;

/// A notification.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "notifications")]
pub struct Model {
    /// Id, time-ordered (UUIDv7, or a UUIDv8 from `herald_nats::ids` for notifications made
    /// from events and bulk sends); also the `Nats-Msg-Id` of its first command and the provider
    /// idempotency key.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The caller's idempotency key; unique.
    #[sea_orm(unique)]
    pub request_id: Option<String>,
    /// A digest of the request that stored it under `request_id` (see
    /// `herald_api::fingerprint`), to tell a repeat from another request reusing the id; none for
    /// rows stored before it was recorded, and for those without a request id or not made by
    /// the API.
    pub request_fingerprint: Option<String>,
    /// The customer's external id, when addressed to a known customer.
    pub customer_id: Option<String>,
    /// The key commands are partitioned by (customer id, or the first inline contact).
    pub recipient_key: String,
    /// Contacts given with the request (JSON object).
    pub contacts: Json,
    /// Category name.
    pub category: String,
    /// Channel chain (JSON array of channel names).
    pub channels: Json,
    /// Subject, text and HTML (JSON object).
    pub content: Json,
    /// Current status.
    pub status: NotificationStatus,
    /// Why it was skipped, deferred or failed, in words.
    pub status_reason: Option<String>,
    /// When a scheduled notification is due.
    pub scheduled_at: Option<DateTimeUtc>,
    /// The channel that carried it.
    pub final_channel: Option<String>,
    /// Delivery attempts made so far.
    pub attempts: i32,
    /// The error that ended the last round over the chain; cleared once it is sent.
    pub error: Option<String>,
    /// When it was accepted.
    pub created_at: DateTimeUtc,
    /// When it last changed.
    pub updated_at: DateTimeUtc,
    /// When a provider accepted it.
    pub sent_at: Option<DateTimeUtc>,
    /// The bulk send it belongs to, if any.
    pub batch_id: Option<Uuid>,
}

/// A notification has many delivery attempts.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// Its attempts.
    #[sea_orm(has_many = "crate::delivery_attempt::Entity")]
    DeliveryAttempts,
}

impl Related<crate::delivery_attempt::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::DeliveryAttempts.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
