//! `/api/v1/orders`: create an order, read it, change its status.
//!
//! Every change is stored together with its domain event (`orders.created`,
//! `orders.status_changed`) in the outbox, in one transaction; the event is then published at once
//! and marked published. If NATS is down the answer is still a success — the order is stored and
//! the engine's outbox relay publishes the event once NATS is back. An event is never published
//! for an order that was not stored, nor ahead of an older event of the same order: while one of
//! the order's events waits in the outbox, the next is left to the relay, which publishes them
//! oldest first.

use chrono::{DateTime, NaiveDate, Utc};
use herald_entities::{
    order::{self, OrderStatus},
    repo::{
        customers, orders as repo,
        orders::{Created, StatusUpdate},
        outbox::{self, NewOutboxEvent},
    },
};
use herald_nats::{
    CommandRoom, DomainEvent, EventData,
    events::{
        self, MAX_EVENT_BYTES, OrderCreated, OrderEventStatus, OrderItem, OrderStatusChanged,
    },
};
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags, param::Path, payload::Json};
use uuid::Uuid;

use crate::{
    ApiError, AppState,
    auth::{ReadKey, SendKey},
    validate,
};

/// Most lines per order.
const MAX_ITEMS: usize = 500;
/// Longest free text (item name, tracking number, reason, URL).
const MAX_TEXT: usize = 1000;

#[derive(Tags)]
enum OrderTags {
    /// Orders: changes publish domain events that notify the customer.
    Orders,
}

/// One line of an order.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct OrderLine {
    /// Product name.
    pub name: String,
    /// How many (at least 1).
    pub quantity: u32,
    /// Price of one in minor units (cents).
    pub unit_price_minor: i64,
}

/// A new order.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct CreateOrder {
    /// Your order number (1 to 200 characters, no `/`); unique.
    pub order_number: String,
    /// The customer's id (they must exist: `POST /api/v1/customers`).
    pub customer_id: String,
    /// Total in minor units (cents).
    pub total_minor: i64,
    /// ISO 4217 currency code (`EUR`).
    pub currency: String,
    /// The order's lines, at most 500; their event (the order as JSON) must stay within 256 KiB.
    #[oai(default)]
    pub items: Vec<OrderLine>,
}

/// A status an order can be moved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "OrderStatusChange", rename_all = "lowercase")]
pub enum ApiOrderStatus {
    /// Paid (from `placed`).
    Paid,
    /// Handed to the carrier (from `placed` or `paid`); needs `tracking_number`.
    Shipped,
    /// Delivered (from `shipped`).
    Delivered,
    /// Cancelled (from `placed` or `paid`).
    Cancelled,
}

impl ApiOrderStatus {
    fn stored(self) -> OrderStatus {
        match self {
            Self::Paid => OrderStatus::Paid,
            Self::Shipped => OrderStatus::Shipped,
            Self::Delivered => OrderStatus::Delivered,
            Self::Cancelled => OrderStatus::Cancelled,
        }
    }

    fn event(self) -> OrderEventStatus {
        match self {
            Self::Paid => OrderEventStatus::Paid,
            Self::Shipped => OrderEventStatus::Shipped,
            Self::Delivered => OrderEventStatus::Delivered,
            Self::Cancelled => OrderEventStatus::Cancelled,
        }
    }
}

/// A status change.
#[derive(Debug, Clone, Object)]
#[oai(deny_unknown_fields)]
pub struct ChangeOrderStatus {
    /// The new status.
    pub status: ApiOrderStatus,
    /// The carrier's tracking number (required for `shipped`).
    pub tracking_number: Option<String>,
    /// Expected delivery date (`shipped`).
    pub delivery_estimate: Option<NaiveDate>,
    /// Where the customer can review the order (`delivered`).
    pub review_url: Option<String>,
    /// Why it was cancelled (`cancelled`).
    pub reason: Option<String>,
}

/// A stored order.
#[derive(Debug, Clone, Object)]
// Absent values are left out, as the spec (no `nullable`) says.
#[oai(skip_serializing_if_is_none)]
pub struct OrderView {
    /// Your order number.
    pub order_number: String,
    /// The customer's id.
    pub customer_id: String,
    /// `placed`, `paid`, `shipped`, `delivered` or `cancelled`.
    pub status: String,
    /// Total in minor units.
    pub total_minor: i64,
    /// Currency code.
    pub currency: String,
    /// The order's lines.
    pub items: Vec<OrderLine>,
    /// Tracking number, once shipped.
    pub tracking_number: Option<String>,
    /// Expected delivery date, once shipped.
    pub delivery_estimate: Option<NaiveDate>,
    /// When it was placed.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// The id of the domain event this request published (create and status change only).
    pub event_id: Option<Uuid>,
}

/// Responses of `POST /api/v1/orders`.
#[derive(ApiResponse)]
pub enum CreatedOrder {
    /// Stored; `orders.created` is published.
    #[oai(status = 201)]
    Created(Json<OrderView>),
}

/// Order endpoints.
pub struct OrdersApi {
    state: AppState,
}

impl OrdersApi {
    /// The endpoints over the shared state.
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[OpenApi(prefix_path = "/api/v1", tag = "OrderTags::Orders")]
impl OrdersApi {
    /// Create an order (scope `send`); publishes `orders.created`.
    ///
    /// 409 `conflict` when the order number exists already.
    #[oai(path = "/orders", method = "post")]
    async fn create(
        &self,
        _auth: SendKey,
        body: Json<CreateOrder>,
    ) -> Result<CreatedOrder, ApiError> {
        let data = validate_order(body.0)?;
        if customers::find_by_external_id(&self.state.db, &data.customer_id)
            .await?
            .is_none()
        {
            return Err(ApiError::invalid(
                "customer_id",
                format!("no customer {:?}; create it first", data.customer_id),
            ));
        }
        let event = DomainEvent::new(EventData::OrderCreated(data.clone()));
        within_event_limit(&event, &self.state.publisher.command_room())?;
        let row = repo::placed(
            Uuid::now_v7(),
            data.order_number.clone(),
            data.customer_id.clone(),
            data.total_minor,
            data.currency.clone(),
            serde_json::to_value(&data.items).map_err(|e| ApiError::internal(&e))?,
        );
        let key = ordering_key(&data.order_number);
        match repo::create(&self.state.db, row, outbox_row(&event, &key)).await? {
            Created::New(row) => {
                self.publish_now(&event, &key).await;
                Ok(CreatedOrder::Created(Json(view(row, Some(event.id)))))
            }
            Created::Duplicate(_) => Err(ApiError::conflict(format!(
                "order {:?} exists already",
                data.order_number
            ))),
        }
    }

    /// Read an order (scope `read`).
    #[oai(path = "/orders/:id", method = "get")]
    async fn get(&self, _auth: ReadKey, id: Path<String>) -> Result<Json<OrderView>, ApiError> {
        match repo::find_by_number(&self.state.db, &id.0).await? {
            Some(row) => Ok(Json(view(row, None))),
            None => Err(not_found(&id.0)),
        }
    }

    /// Change an order's status (scope `send`); publishes `orders.status_changed`.
    ///
    /// Allowed: `placed → paid | shipped | cancelled`, `paid → shipped | cancelled`,
    /// `shipped → delivered`; anything else is 409 `conflict`.
    #[oai(path = "/orders/:id/status", method = "put")]
    async fn change_status(
        &self,
        _auth: SendKey,
        id: Path<String>,
        body: Json<ChangeOrderStatus>,
    ) -> Result<Json<OrderView>, ApiError> {
        let change = validate_change(body.0)?;
        let Some(current) = repo::find_by_number(&self.state.db, &id.0).await? else {
            return Err(not_found(&id.0));
        };
        let next = change.status.stored();
        if !current.status.can_become(next) {
            return Err(ApiError::conflict(format!(
                "order {:?} is {}; it cannot become {}",
                id.0,
                current.status.as_str(),
                next.as_str()
            )));
        }
        let event = DomainEvent::new(EventData::OrderStatusChanged(OrderStatusChanged {
            customer_id: current.customer_id.clone(),
            order_number: current.order_number.clone(),
            status: change.status.event(),
            tracking_number: change
                .tracking_number
                .clone()
                .or(current.tracking_number.clone()),
            delivery_estimate: change.delivery_estimate.or(current.delivery_estimate),
            review_url: change.review_url,
            reason: change.reason,
        }));
        within_event_limit(&event, &self.state.publisher.command_room())?;
        let update = StatusUpdate {
            from: current.status,
            to: next,
            tracking_number: change.tracking_number,
            delivery_estimate: change.delivery_estimate,
        };
        let key = ordering_key(&current.order_number);
        let Some(updated) =
            repo::update_status(&self.state.db, &id.0, update, outbox_row(&event, &key)).await?
        else {
            return Err(ApiError::conflict(format!(
                "order {:?} changed meanwhile; read it and try again",
                id.0
            )));
        };
        self.publish_now(&event, &key).await;
        Ok(Json(view(updated, Some(event.id))))
    }
}

impl OrdersApi {
    /// Publishes a stored event and marks its outbox row; on failure the row stays unpublished
    /// and the engine's outbox relay publishes it later. While another event of the order waits
    /// in the outbox (its publish failed, or a concurrent request's is under way), this one is
    /// not published but left to the relay, which publishes them oldest first: published now, it
    /// would overtake the older one. The check follows the commit, and a row is marked only once
    /// JetStream has stored it, so an older event seen published is in the stream already.
    async fn publish_now(&self, event: &DomainEvent, key: &str) {
        match outbox::others_waiting(&self.state.db, key, event.id).await {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(id = %event.id, key, "another event of the order waits in the outbox; the outbox relay publishes them in order");
                return;
            }
            Err(err) => {
                tracing::warn!(id = %event.id, error = %err, "cannot tell whether another event of the order waits; the outbox relay will publish this one");
                return;
            }
        }
        let published = match event.encode() {
            Ok(payload) => self
                .state
                .publisher
                .publish_event(&event.subject(), &event.id.to_string(), payload)
                .await
                .map_err(|e| e.to_string()),
            Err(err) => Err(err.to_string()),
        };
        match published {
            Ok(()) => {
                if let Err(err) = outbox::mark_published(&self.state.db, event.id).await {
                    // The relay will publish it again; JetStream drops the duplicate.
                    tracing::warn!(id = %event.id, error = %err, "cannot mark an event published");
                }
            }
            Err(err) => {
                tracing::warn!(id = %event.id, error = %err, "event stored; the outbox relay will publish it");
            }
        }
    }
}

/// 400 for an order whose event the Router would refuse as too large (many long item names):
/// stored and published, it would notify nobody. 413 for one within that limit that the NATS
/// server (`room`) would refuse: stored, it would wait in the outbox for ever, and hold up every
/// later event of its order behind it.
fn within_event_limit(event: &DomainEvent, room: &CommandRoom) -> Result<(), ApiError> {
    let size = event.encode().map_err(|e| ApiError::internal(&e))?.len();
    if size > MAX_EVENT_BYTES {
        return Err(ApiError::invalid(
            "items",
            format!(
                "the order is too large to notify about: its event would be {size} bytes, \
                 the limit is {MAX_EVENT_BYTES}; shorten the item names or split the order"
            ),
        ));
    }
    match room.refusal_as(size, "an event") {
        Some(reason) => Err(ApiError::too_large_for_nats("the order's event", &reason)),
        None => Ok(()),
    }
}

fn outbox_row(event: &DomainEvent, key: &str) -> NewOutboxEvent {
    NewOutboxEvent {
        id: event.id,
        subject: event.subject(),
        payload: event.to_json(),
        created_at: event.occurred_at,
        ordering_key: key.to_string(),
    }
}

/// The outbox key of an order's events: they are published in the order they were written.
fn ordering_key(order_number: &str) -> String {
    format!("order:{order_number}")
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no order {id:?}"))
}

/// A one-line plain text, trimmed (blank counts as absent): at most [`MAX_TEXT`] bytes, without
/// control characters.
fn text(field: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    let value = value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty());
    if value
        .as_ref()
        .is_some_and(|v| v.len() > MAX_TEXT || v.contains(['\r', '\n']))
    {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be one line of at most {MAX_TEXT} bytes"),
        ));
    }
    if let Some(value) = &value {
        validate::plain_text(field, value)?;
    }
    Ok(value)
}

fn validate_order(body: CreateOrder) -> Result<OrderCreated, ApiError> {
    let order_number = validate::external_id("order_number", &body.order_number)?;
    let customer_id = validate::external_id("customer_id", &body.customer_id)?;
    if body.total_minor < 0 {
        return Err(ApiError::invalid(
            "total_minor",
            "total_minor must not be negative",
        ));
    }
    if !events::is_currency(&body.currency) {
        return Err(ApiError::invalid(
            "currency",
            "currency must be an ISO 4217 code such as EUR",
        ));
    }
    if body.items.len() > MAX_ITEMS {
        return Err(ApiError::invalid(
            "items",
            format!("at most {MAX_ITEMS} items"),
        ));
    }
    let mut items = Vec::with_capacity(body.items.len());
    for (i, line) in body.items.into_iter().enumerate() {
        let name = text(&format!("items[{i}].name"), Some(line.name))?
            .ok_or_else(|| ApiError::invalid(&format!("items[{i}].name"), "name is empty"))?;
        if line.quantity == 0 || line.unit_price_minor < 0 {
            return Err(ApiError::invalid(
                &format!("items[{i}]"),
                "quantity must be at least 1 and unit_price_minor not negative",
            ));
        }
        items.push(OrderItem {
            name,
            quantity: line.quantity,
            unit_price_minor: line.unit_price_minor,
        });
    }
    Ok(OrderCreated {
        customer_id,
        order_number,
        total_minor: body.total_minor,
        currency: body.currency,
        items,
    })
}

fn validate_change(body: ChangeOrderStatus) -> Result<ChangeOrderStatus, ApiError> {
    let tracking_number = text("tracking_number", body.tracking_number)?;
    if body.status == ApiOrderStatus::Shipped && tracking_number.is_none() {
        return Err(ApiError::invalid(
            "tracking_number",
            "a shipped order needs a tracking_number",
        ));
    }
    let review_url = text("review_url", body.review_url)?;
    if review_url
        .as_ref()
        .is_some_and(|u| !(u.starts_with("https://") || u.starts_with("http://")))
    {
        return Err(ApiError::invalid(
            "review_url",
            "review_url must be an http(s) URL",
        ));
    }
    Ok(ChangeOrderStatus {
        status: body.status,
        tracking_number,
        delivery_estimate: body.delivery_estimate,
        review_url,
        reason: text("reason", body.reason)?,
    })
}

fn view(row: order::Model, event_id: Option<Uuid>) -> OrderView {
    let items: Vec<OrderItem> = serde_json::from_value(row.items).unwrap_or_default();
    OrderView {
        order_number: row.order_number,
        customer_id: row.customer_id,
        status: row.status.as_str().into(),
        total_minor: row.total_minor,
        currency: row.currency,
        items: items
            .into_iter()
            .map(|i| OrderLine {
                name: i.name,
                quantity: i.quantity,
                unit_price_minor: i.unit_price_minor,
            })
            .collect(),
        tracking_number: row.tracking_number,
        delivery_estimate: row.delivery_estimate,
        created_at: row.created_at,
        updated_at: row.updated_at,
        event_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> CreateOrder {
        CreateOrder {
            order_number: "1001".into(),
            customer_id: "c-1".into(),
            total_minor: 4200,
            currency: "EUR".into(),
            items: vec![OrderLine {
                name: "Tea".into(),
                quantity: 2,
                unit_price_minor: 2100,
            }],
        }
    }

    fn field(result: Result<impl std::fmt::Debug, ApiError>) -> Option<String> {
        match result {
            Err(ApiError::BadRequest(body)) => body.0.field,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn orders_are_checked_field_by_field() {
        assert_eq!(validate_order(order()).unwrap().items.len(), 1);
        let mut bad = order();
        bad.currency = "eur".into();
        assert_eq!(field(validate_order(bad)).as_deref(), Some("currency"));
        let mut bad = order();
        bad.items[0].quantity = 0;
        assert_eq!(field(validate_order(bad)).as_deref(), Some("items[0]"));
        let mut bad = order();
        bad.order_number = "a/b".into();
        assert_eq!(field(validate_order(bad)).as_deref(), Some("order_number"));
        let mut bad = order();
        bad.items[0].name = "Tea\tbags".into();
        assert_eq!(field(validate_order(bad)).as_deref(), Some("items[0].name"));
    }

    #[test]
    fn shipping_needs_a_tracking_number() {
        let change = ChangeOrderStatus {
            status: ApiOrderStatus::Shipped,
            tracking_number: Some("  ".into()),
            delivery_estimate: None,
            review_url: None,
            reason: None,
        };
        assert_eq!(
            field(validate_change(change)).as_deref(),
            Some("tracking_number")
        );
    }
}
