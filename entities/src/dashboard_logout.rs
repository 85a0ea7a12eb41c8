//! `dashboard_logouts`: dashboard sessions ended by **Log out**, refused until their cookies expire.

use sea_orm::entity::prelude::*;

/// A logged-out dashboard session.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "dashboard_logouts")]
pub struct Model {
    /// The session's random id, as its signed cookie carries it.
    #[sea_orm(primary_key, auto_increment = false)]
    pub session_id: Uuid,
    /// When the session's cookie expires; after that the row refuses nothing the expiry does not.
    pub expires_at: DateTimeUtc,
}

/// No relations.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
