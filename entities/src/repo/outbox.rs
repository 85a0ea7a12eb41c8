//! Queries on `outbox_events`.

use chrono::{DateTime, TimeDelta, Utc};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Select,
    sea_query::{Expr, Query},
};
use uuid::Uuid;

use crate::{RepoError, outbox_event};

/// An event to write into the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOutboxEvent {
    /// The event's id.
    pub id: Uuid,
    /// Subject to publish on.
    pub subject: String,
    /// The event (JSON).
    pub payload: serde_json::Value,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// Events with the same key are published in the order they were written.
    pub ordering_key: String,
}

/// Writes an event into the outbox; call it inside the transaction of the change it describes.
///
/// The relay publishes a key's rows oldest first, so the row is dated after every unpublished row
/// of its key: the transaction's change (an order's status) already waits for any earlier one of
/// the key to commit, but `created_at` comes from the writer's clock, and an API host whose clock
/// is behind another's would date a later event before an earlier one.
pub async fn insert(db: &impl ConnectionTrait, event: NewOutboxEvent) -> Result<(), RepoError> {
    let latest = waiting_dates_query(&event.ordering_key)
        .into_tuple::<DateTime<Utc>>()
        .all(db)
        .await?
        .into_iter()
        .max();
    let created_at = match latest {
        Some(latest) if latest >= event.created_at => latest + TimeDelta::microseconds(1),
        _ => event.created_at,
    };
    outbox_event::Entity::insert(outbox_event::ActiveModel {
        id: Set(event.id),
        subject: Set(event.subject),
        payload: Set(event.payload),
        created_at: Set(created_at),
        published_at: Set(None),
        ordering_key: Set(Some(event.ordering_key)),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}

/// Records that JetStream has stored the event.
pub async fn mark_published(db: &impl ConnectionTrait, id: Uuid) -> Result<(), RepoError> {
    outbox_event::Entity::update_many()
        .col_expr(outbox_event::Column::PublishedAt, Expr::value(Utc::now()))
        .filter(outbox_event::Column::Id.eq(id))
        .filter(outbox_event::Column::PublishedAt.is_null())
        .exec(db)
        .await?;
    Ok(())
}

/// Whether an unpublished event other than `id` has the key `ordering_key`: then `id` must wait
/// for the relay, which publishes them oldest first, lest it overtake an older one.
pub async fn others_waiting(
    db: &impl ConnectionTrait,
    ordering_key: &str,
    id: Uuid,
) -> Result<bool, RepoError> {
    Ok(others_waiting_query(ordering_key, id)
        .into_tuple::<Uuid>()
        .one(db)
        .await?
        .is_some())
}

/// The query of [`others_waiting`], on the index of unpublished rows by key.
pub fn others_waiting_query(ordering_key: &str, id: Uuid) -> Select<outbox_event::Entity> {
    outbox_event::Entity::find()
        .select_only()
        .column(outbox_event::Column::Id)
        .filter(outbox_event::Column::PublishedAt.is_null())
        .filter(outbox_event::Column::OrderingKey.eq(ordering_key))
        .filter(outbox_event::Column::Id.ne(id))
        .limit(1)
}

/// The query for the `created_at` of the unpublished events with the key `ordering_key` (a few
/// at most: one order's events while NATS was down), on the index of unpublished rows by key. Not
/// `MAX(created_at)`: for that SQLite walks every unpublished row by date instead.
pub fn waiting_dates_query(ordering_key: &str) -> Select<outbox_event::Entity> {
    outbox_event::Entity::find()
        .select_only()
        .column(outbox_event::Column::CreatedAt)
        .filter(outbox_event::Column::PublishedAt.is_null())
        .filter(outbox_event::Column::OrderingKey.eq(ordering_key))
}

/// Unpublished events written before `before`, oldest first, at most `limit`.
pub async fn unpublished(
    db: &impl ConnectionTrait,
    before: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<outbox_event::Model>, RepoError> {
    Ok(outbox_event::Entity::find()
        .filter(outbox_event::Column::PublishedAt.is_null())
        .filter(outbox_event::Column::CreatedAt.lt(before))
        .order_by_asc(outbox_event::Column::CreatedAt)
        .limit(limit)
        .all(db)
        .await?)
}

/// Removes up to `limit` events published before `before` (retention); returns how many.
///
/// One bounded round: after downtime a day of published events is due at once, and one DELETE
/// of them all would hold SQLite's only write lock for seconds. The caller repeats it while a
/// round removes `limit`.
pub async fn delete_published_before(
    db: &impl ConnectionTrait,
    before: DateTime<Utc>,
    limit: u64,
) -> Result<u64, RepoError> {
    let round = Query::select()
        .column(outbox_event::Column::Id)
        .from(outbox_event::Entity)
        .and_where(outbox_event::Column::PublishedAt.lt(before))
        .limit(limit)
        .to_owned();
    let result = outbox_event::Entity::delete_many()
        .filter(outbox_event::Column::Id.in_subquery(round))
        .exec(db)
        .await?;
    Ok(result.rows_affected)
}
