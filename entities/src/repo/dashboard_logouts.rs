//! Queries on `dashboard_logouts`.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, sea_query::OnConflict,
};
use uuid::Uuid;

use crate::{RepoError, dashboard_logout};

/// Records that the session `session_id`, whose cookie expires at `expires_at`, was logged out,
/// and deletes the records of sessions whose cookies expired before `forget_before` (they are
/// refused by their expiry). Recording the same session again is no error.
pub async fn record(
    db: &impl ConnectionTrait,
    session_id: Uuid,
    expires_at: DateTime<Utc>,
    forget_before: DateTime<Utc>,
) -> Result<(), RepoError> {
    dashboard_logout::Entity::insert(dashboard_logout::ActiveModel {
        session_id: Set(session_id),
        expires_at: Set(expires_at),
    })
    .on_conflict(
        OnConflict::column(dashboard_logout::Column::SessionId)
            .do_nothing()
            .to_owned(),
    )
    .exec_without_returning(db)
    .await?;
    dashboard_logout::Entity::delete_many()
        .filter(dashboard_logout::Column::ExpiresAt.lt(forget_before))
        .exec(db)
        .await?;
    Ok(())
}

/// Whether the session `session_id` was logged out.
pub async fn is_logged_out(db: &impl ConnectionTrait, session_id: Uuid) -> Result<bool, RepoError> {
    Ok(dashboard_logout::Entity::find_by_id(session_id)
        .one(db)
        .await?
        .is_some())
}
