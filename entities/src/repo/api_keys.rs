//! Queries on `api_keys`.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    sea_query::Expr,
};
use uuid::Uuid;

use crate::{RepoError, api_key};

/// A key to store.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// Name for humans.
    pub name: String,
    /// Public lookup part.
    pub prefix: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// Comma-separated scopes.
    pub scopes: String,
    /// The one provider it posts receipts for; `None`: every provider.
    pub provider: Option<String>,
}

/// Stores a new key and returns its row.
pub async fn insert(
    db: &impl ConnectionTrait,
    new: NewApiKey,
) -> Result<api_key::Model, RepoError> {
    let row = api_key::ActiveModel {
        id: Set(Uuid::now_v7()),
        name: Set(new.name),
        prefix: Set(new.prefix),
        secret_hash: Set(new.secret_hash),
        scopes: Set(new.scopes),
        created_at: Set(Utc::now()),
        revoked_at: Set(None),
        last_used_at: Set(None),
        provider: Set(new.provider),
    };
    Ok(api_key::Entity::insert(row).exec_with_returning(db).await?)
}

/// The key with this lookup prefix, revoked or not.
pub async fn find_by_prefix(
    db: &impl ConnectionTrait,
    prefix: &str,
) -> Result<Option<api_key::Model>, RepoError> {
    Ok(api_key::Entity::find()
        .filter(api_key::Column::Prefix.eq(prefix))
        .one(db)
        .await?)
}

/// Every key, oldest first.
pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<api_key::Model>, RepoError> {
    Ok(api_key::Entity::find()
        .order_by_asc(api_key::Column::Id)
        .all(db)
        .await?)
}

/// Revokes the key with this id or prefix; `false` when no unrevoked key matched.
pub async fn revoke(db: &impl ConnectionTrait, id_or_prefix: &str) -> Result<bool, RepoError> {
    let mut update = api_key::Entity::update_many()
        .col_expr(api_key::Column::RevokedAt, Expr::value(Utc::now()))
        .filter(api_key::Column::RevokedAt.is_null());
    update = match Uuid::parse_str(id_or_prefix) {
        Ok(id) => update.filter(api_key::Column::Id.eq(id)),
        Err(_) => update.filter(api_key::Column::Prefix.eq(id_or_prefix)),
    };
    Ok(update.exec(db).await?.rows_affected > 0)
}

/// Records that the key authenticated a request at `at`.
pub async fn touch(
    db: &impl ConnectionTrait,
    id: Uuid,
    at: DateTime<Utc>,
) -> Result<(), RepoError> {
    api_key::Entity::update_many()
        .col_expr(api_key::Column::LastUsedAt, Expr::value(at))
        .filter(api_key::Column::Id.eq(id))
        .exec(db)
        .await?;
    Ok(())
}
