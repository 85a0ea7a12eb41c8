//! How many notifications recipients were sent recently, per category: what a rate limiter that
//! starts for a user (on a new instance, or after a partition changed hands) must count as spent.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, ExprTrait, QueryFilter, QuerySelect,
    Select, sea_query::Expr,
};

use crate::{RepoError, notification};

/// Sends accepted by a provider since each category's cut-off, by recipient key, then by
/// category name, for every key of `recipient_keys` with the same cut-offs: one query for all.
/// Recipients and categories absent from the answer had none.
pub async fn sent_since(
    db: &impl ConnectionTrait,
    recipient_keys: &[String],
    cutoffs: &[(String, DateTime<Utc>)],
) -> Result<HashMap<String, HashMap<String, u32>>, RepoError> {
    if recipient_keys.is_empty() || cutoffs.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, String, i64)> = sent_since_query(recipient_keys, cutoffs)
        .into_tuple()
        .all(db)
        .await?;
    let mut sent: HashMap<String, HashMap<String, u32>> = HashMap::new();
    for (recipient_key, category, sends) in rows {
        let sends = u32::try_from(sends).unwrap_or(u32::MAX);
        sent.entry(recipient_key)
            .or_default()
            .insert(category, sends);
    }
    Ok(sent)
}

/// The query of [`sent_since`]: `(recipient_key, category, sends)` rows, planned on the
/// recipient's `(recipient_key, sent_at)` index of sent notifications.
pub fn sent_since_query(
    recipient_keys: &[String],
    cutoffs: &[(String, DateTime<Utc>)],
) -> Select<notification::Entity> {
    let windows = cutoffs
        .iter()
        .fold(Condition::any(), |any, (category, since)| {
            any.add(
                Condition::all()
                    .add(notification::Column::Category.eq(category.as_str()))
                    .add(notification::Column::SentAt.gte(*since)),
            )
        });
    notification::Entity::find()
        .select_only()
        .column(notification::Column::RecipientKey)
        .column(notification::Column::Category)
        .column_as(Expr::col(notification::Column::Id).count(), "sends")
        .filter(notification::Column::RecipientKey.is_in(recipient_keys.iter().map(String::as_str)))
        .filter(windows)
        .group_by(notification::Column::RecipientKey)
        .group_by(notification::Column::Category)
}
