//! Queries on `customers`.

use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter,
    sea_query::Expr,
};

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

/// Removes a push token a provider declared dead (unregistered app, invalid token).
pub async fn remove_push_token(
    db: &impl ConnectionTrait,
    external_id: &str,
    token: &str,
) -> Result<bool, RepoError> {
    let Some(found) = find_by_external_id(db, external_id).await? else {
        return Ok(false);
    };
    let tokens: Vec<String> =
        serde_json::from_value(found.push_tokens.clone()).map_err(|e| RepoError::Json {
            column: "push_tokens",
            reason: e.to_string(),
        })?;
    if !tokens.iter().any(|t| t == token) {
        return Ok(false);
    }
    let kept: Vec<String> = tokens.into_iter().filter(|t| t != token).collect();
    let mut row: customer::ActiveModel = found.into();
    row.push_tokens = Set(serde_json::json!(kept));
    row.updated_at = Set(chrono::Utc::now());
    row.update(db).await?;
    Ok(true)
}

/// Forgets a webhook URL that answered 410 Gone.
pub async fn clear_webhook_url(
    db: &impl ConnectionTrait,
    external_id: &str,
    url: &str,
) -> Result<bool, RepoError> {
    let result = customer::Entity::update_many()
        .col_expr(
            customer::Column::WebhookUrl,
            Expr::value(Option::<String>::None),
        )
        .col_expr(customer::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
        .filter(customer::Column::ExternalId.eq(external_id))
        .filter(customer::Column::WebhookUrl.eq(url))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}
