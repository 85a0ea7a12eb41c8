//! Queries on `customers`.

use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};

use crate::{RepoError, customer};

/// The customer with this external id, if any.
pub async fn find_by_external_id(
    db: &impl ConnectionTrait,
    external_id: &str,
) -> Result<Option<customer::Model>, RepoError> {
    Ok(customer::Entity::find()
        .filter(customer::Column::ExternalId.eq(external_id))
        .one(db)
        .await?)
}
