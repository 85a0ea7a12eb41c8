//! How many notifications a recipient was sent recently, per category: what a rate limiter that
//! starts for a user (on a new instance, or after a partition changed hands) must count as spent.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, ExprTrait, QueryFilter, QuerySelect,
    sea_query::Expr,
};

use crate::{RepoError, notification};

/// Sends to `recipient_key` accepted by a provider since each category's cut-off, by category
/// name. Categories absent from the answer had none.
pub async fn sent_since(
    db: &impl ConnectionTrait,
    recipient_key: &str,
    cutoffs: &[(String, DateTime<Utc>)],
) -> Result<HashMap<String, u32>, RepoError> {
    if cutoffs.is_empty() {
        return Ok(HashMap::new());
    }
    let windows = cutoffs
        .iter()
        .fold(Condition::any(), |any, (category, since)| {
            any.add(
                Condition::all()
                    .add(notification::Column::Category.eq(category.as_str()))
                    .add(notification::Column::SentAt.gte(*since)),
            )
        });
    let rows: Vec<(String, i64)> = notification::Entity::find()
        .select_only()
        .column(notification::Column::Category)
        .column_as(Expr::col(notification::Column::Id).count(), "sends")
        .filter(notification::Column::RecipientKey.eq(recipient_key))
        .filter(windows)
        .group_by(notification::Column::Category)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(category, sends)| (category, u32::try_from(sends).unwrap_or(u32::MAX)))
        .collect())
}
