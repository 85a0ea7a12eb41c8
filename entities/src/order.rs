//! `orders`: the shop's orders, kept so that order events are only ever published for stored
//! orders and status changes follow the allowed transitions.

use sea_orm::{entity::prelude::*, sea_query::StringLen};
use serde::{Deserialize, Serialize};

/// Where an order stands: `placed → paid → shipped → delivered`, or `cancelled` before shipping.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::N(16))")]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Placed, not yet paid.
    #[sea_orm(string_value = "placed")]
    Placed,
    /// Paid.
    #[sea_orm(string_value = "paid")]
    Paid,
    /// Handed to the carrier.
    #[sea_orm(string_value = "shipped")]
    Shipped,
    /// Delivered to the customer.
    #[sea_orm(string_value = "delivered")]
    Delivered,
    /// Cancelled.
    #[sea_orm(string_value = "cancelled")]
    Cancelled,
}

impl OrderStatus {
    /// Every status, in order.
    pub const ALL: [OrderStatus; 5] = [
        Self::Placed,
        Self::Paid,
        Self::Shipped,
        Self::Delivered,
        Self::Cancelled,
    ];

    /// The lowercase name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Paid => "paid",
            Self::Shipped => "shipped",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(name: &str) -> Option<OrderStatus> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The statuses an order may move to `self` from. Cash-on-delivery orders ship before they
    /// are paid, so `placed → shipped` is allowed; nothing leaves `delivered` or `cancelled`.
    pub fn allowed_from(self) -> &'static [OrderStatus] {
        use OrderStatus::*;
        match self {
            Placed => &[],
            Paid => &[Placed],
            Shipped => &[Placed, Paid],
            Delivered => &[Shipped],
            Cancelled => &[Placed, Paid],
        }
    }

    /// Whether an order in `self` may move to `next`.
    pub fn can_become(self, next: OrderStatus) -> bool {
        next.allowed_from().contains(&self)
    }
}

/// An order.
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "orders")]
pub struct Model {
    /// Herald's id.
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// The shop's order number; unique.
    #[sea_orm(unique)]
    pub order_number: String,
    /// The customer's external id.
    pub customer_id: String,
    /// Current status.
    pub status: OrderStatus,
    /// Total in minor units (cents).
    pub total_minor: i64,
    /// ISO 4217 currency code.
    pub currency: String,
    /// The order's lines (JSON array of `{name, quantity, unit_price_minor}`).
    pub items: Json,
    /// The carrier's tracking number, once shipped.
    pub tracking_number: Option<String>,
    /// Expected delivery date, once shipped.
    pub delivery_estimate: Option<Date>,
    /// When the order was placed.
    pub created_at: DateTimeUtc,
    /// When it last changed.
    pub updated_at: DateTimeUtc,
}

/// No relations are navigated from orders.
#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

#[cfg(test)]
mod tests {
    use super::OrderStatus::*;

    #[test]
    fn transitions_follow_the_order_lifecycle() {
        assert!(Placed.can_become(Paid) && Paid.can_become(Shipped));
        assert!(Placed.can_become(Shipped), "cash on delivery");
        assert!(Shipped.can_become(Delivered));
        assert!(Placed.can_become(Cancelled) && Paid.can_become(Cancelled));
        assert!(!Shipped.can_become(Cancelled));
        assert!(!Delivered.can_become(Shipped));
        assert!(!Cancelled.can_become(Paid));
        assert!(!Paid.can_become(Paid), "a repeat is not a transition");
        assert!(!Placed.can_become(Placed));
    }
}
