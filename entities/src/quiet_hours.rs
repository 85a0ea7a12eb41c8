//! `quiet_hours`: the daily window in which a customer wants no non-critical notification.

use sea_orm::entity::prelude::*;

/// A customer's quiet hours.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "quiet_hours")]
pub struct Model {
    /// The customer's external id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub customer_id: String,
    /// Local wall-clock start, `HH:MM` or `HH:MM:SS`.
    pub starts: String,
    /// Local wall-clock end, `HH:MM` or `HH:MM:SS`; before `starts` when the window crosses
    /// midnight.
    pub ends: String,
    /// IANA time zone the times are read in, e.g. `Europe/Berlin`; `None` for the customer's own
    /// at delivery time.
    pub timezone: Option<String>,
    /// When it was last set.
    pub updated_at: DateTimeUtc,
}

/// No relations are navigated.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
