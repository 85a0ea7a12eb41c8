//! Queries on `orders`. Every change is written together with its domain event in the outbox, in
//! one transaction: an event exists exactly when its change does.

use chrono::{NaiveDate, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, EntityTrait, QueryFilter,
    SqlErr, TransactionTrait, sea_query::Expr,
};

use crate::{
    RepoError,
    order::{self, OrderStatus},
    repo::outbox::{self, NewOutboxEvent},
};

/// The outcome of storing a new order.
#[derive(Debug)]
pub enum Created {
    /// Stored, with its event.
    New(order::Model),
    /// An order with this number exists already (nothing was written); here it is.
    Duplicate(order::Model),
}

/// Stores a new order and its `orders.created` event in one transaction. A repeated order number
/// is detected by the unique constraint, so concurrent duplicates resolve to one row.
pub async fn create(
    db: &DatabaseConnection,
    row: order::Model,
    event: NewOutboxEvent,
) -> Result<Created, RepoError> {
    let number = row.order_number.clone();
    let txn = db.begin().await?;
    let inserted = order::Entity::insert(order::ActiveModel::from(row).reset_all())
        .exec_with_returning(&txn)
        .await;
    let stored = match inserted {
        Ok(stored) => stored,
        Err(err) => {
            txn.rollback().await?;
            if let Some(SqlErr::UniqueConstraintViolation(_)) = err.sql_err()
                && let Some(existing) = find_by_number(db, &number).await?
            {
                return Ok(Created::Duplicate(existing));
            }
            return Err(err.into());
        }
    };
    outbox::insert(&txn, event).await?;
    txn.commit().await?;
    Ok(Created::New(stored))
}

/// A status change to write.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    /// The status the order must still be in (read by the caller when it checked the transition).
    pub from: OrderStatus,
    /// The new status.
    pub to: OrderStatus,
    /// Tracking number to record (kept when `None`).
    pub tracking_number: Option<String>,
    /// Delivery estimate to record (kept when `None`).
    pub delivery_estimate: Option<NaiveDate>,
}

/// Moves an order from `update.from` to `update.to` and writes its event, in one transaction.
/// `Ok(None)` when the order is no longer in `update.from` (a concurrent change won), and nothing
/// was written.
pub async fn update_status(
    db: &DatabaseConnection,
    order_number: &str,
    update: StatusUpdate,
    event: NewOutboxEvent,
) -> Result<Option<order::Model>, RepoError> {
    let txn = db.begin().await?;
    let mut change = order::Entity::update_many()
        .col_expr(order::Column::Status, Expr::value(update.to))
        .col_expr(order::Column::UpdatedAt, Expr::value(Utc::now()));
    if let Some(tracking) = update.tracking_number {
        change = change.col_expr(order::Column::TrackingNumber, Expr::value(tracking));
    }
    if let Some(estimate) = update.delivery_estimate {
        change = change.col_expr(order::Column::DeliveryEstimate, Expr::value(estimate));
    }
    let result = change
        .filter(order::Column::OrderNumber.eq(order_number))
        .filter(order::Column::Status.eq(update.from))
        .exec(&txn)
        .await?;
    if result.rows_affected == 0 {
        txn.rollback().await?;
        return Ok(None);
    }
    outbox::insert(&txn, event).await?;
    let updated = find_by_number(&txn, order_number).await?;
    txn.commit().await?;
    Ok(updated)
}

/// The order with this number, if any.
pub async fn find_by_number(
    db: &impl ConnectionTrait,
    order_number: &str,
) -> Result<Option<order::Model>, RepoError> {
    Ok(order::Entity::find()
        .filter(order::Column::OrderNumber.eq(order_number))
        .one(db)
        .await?)
}

/// Fills `status`, timestamps and an empty tracking state for a new order.
pub fn placed(
    id: uuid::Uuid,
    order_number: String,
    customer_id: String,
    total_minor: i64,
    currency: String,
    items: serde_json::Value,
) -> order::Model {
    let now = Utc::now();
    order::Model {
        id,
        order_number,
        customer_id,
        status: OrderStatus::Placed,
        total_minor,
        currency,
        items,
        tracking_number: None,
        delivery_estimate: None,
        created_at: now,
        updated_at: now,
    }
}
