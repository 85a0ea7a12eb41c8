//! `batches`: bulk sends, fanned out page by page into notifications by the Scheduler.

use sea_orm::entity::prelude::*;

/// A bulk send.
#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "batches")]
pub struct Model {
    /// Id (UUIDv7); notification ids of the batch are derived from it.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The caller's idempotency key; unique: a repeat answers this batch.
    #[sea_orm(unique)]
    pub request_id: Option<String>,
    /// A digest of the request that stored it under `request_id` (see
    /// `herald_api::fingerprint`), to tell a repeat from another request reusing the id; none for
    /// batches stored before it was recorded, and for those without a request id.
    pub request_fingerprint: Option<String>,
    /// `pending`, `running`, `done` or `failed`.
    pub status: String,
    /// What to send and to whom (JSON: category, channels, content, recipients or filter).
    pub spec: Json,
    /// Recipients in the batch (for a filter: counted when the batch was accepted).
    pub total: i64,
    /// Notifications created and published so far.
    pub published: i64,
    /// Where the fan-out stands: the last customer external id (filter) or list index done.
    pub cursor: Option<String>,
    /// An instance working on the batch holds it until then; others leave it alone: while
    /// `pending` or `running`, the fan-out's lease; while `cancelled`, its cancel's, cleared once
    /// the cancel is done (see [`crate::repo::batches::cancel`]).
    pub lease_until: Option<DateTimeUtc>,
    /// Why the batch failed (`failed`); while it is `running`, why its last page failed and how
    /// many failed in a row, until a page goes through (text, unbounded).
    pub error: Option<String>,
    /// When it was accepted; a filter selects the customers created by then.
    pub created_at: DateTimeUtc,
    /// When it last changed.
    pub updated_at: DateTimeUtc,
}

/// No relations are navigated.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
