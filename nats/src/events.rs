//! Domain events: what producers publish on `events.<type>` and the router turns into
//! notifications.
//!
//! On the wire an event is a versioned envelope,
//! `{"v": 1, "id": "<uuid>", "type": "orders.created", "occurred_at": "<RFC 3339>", "data": {...}}`,
//! whose `data` has one shape per `type` (the structs of this module; their JSON Schemas are in
//! `docs/events/`). [`DomainEvent::decode`] reads the envelope (and, when it does not fit, the
//! version alone), then the type, then the data, so every way a message can be wrong gets its own
//! reason on the way to the dead-letter stream. Unknown fields are ignored, so producers may add
//! fields without breaking Herald.

use chrono::{DateTime, NaiveDate, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use uuid::Uuid;

use crate::versioned::{self, Versioned, VersionedError};

/// The event schema version this build writes and reads.
pub const EVENT_SCHEMA_VERSION: u16 = 1;

/// `orders.created`: an order was placed.
pub const ORDER_CREATED: &str = "orders.created";
/// `orders.status_changed`: an order was paid, shipped, delivered or cancelled.
pub const ORDER_STATUS_CHANGED: &str = "orders.status_changed";
/// `customers.created`: a customer signed up.
pub const CUSTOMER_CREATED: &str = "customers.created";
/// `security.login_alert`: a sign-in from a new device or place.
pub const LOGIN_ALERT: &str = "security.login_alert";
/// `marketing.campaign`: a campaign message for one customer.
pub const MARKETING_CAMPAIGN: &str = "marketing.campaign";

/// Every event type this build reads.
pub const EVENT_TYPES: [&str; 5] = [
    ORDER_CREATED,
    ORDER_STATUS_CHANGED,
    CUSTOMER_CREATED,
    LOGIN_ALERT,
    MARKETING_CAMPAIGN,
];

/// Longest external id (a customer id, an order number) in characters, here and in the API.
pub const MAX_EXTERNAL_ID: usize = 200;

/// An external id's pattern in the JSON Schemas: no `/`, and neither blank nor beginning or ending
/// with white space (see [`external_id`]).
const EXTERNAL_ID_PATTERN: &str = r"^[^/\s]([^/]*[^/\s])?$";

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderItem {
    /// Product name.
    pub name: String,
    /// How many.
    pub quantity: u32,
    /// Price of one, in minor units of the order's currency (cents).
    pub unit_price_minor: i64,
}

/// Data of `orders.created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OrderCreated {
    /// The customer's external id.
    #[schemars(length(min = 1, max = 200), regex(pattern = EXTERNAL_ID_PATTERN))]
    pub customer_id: String,
    /// The shop's order number, shown to the customer.
    #[schemars(regex(pattern = r"\S"))]
    pub order_number: String,
    /// Order total in minor units (cents).
    #[schemars(range(min = 0))]
    pub total_minor: i64,
    /// ISO 4217 currency code, e.g. `EUR`.
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub currency: String,
    /// The order's lines.
    #[serde(default)]
    pub items: Vec<OrderItem>,
}

/// The statuses an order can move to after it was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderEventStatus {
    /// Payment received.
    Paid,
    /// Handed to the carrier.
    Shipped,
    /// Delivered to the customer.
    Delivered,
    /// Cancelled.
    Cancelled,
}

impl OrderEventStatus {
    /// The lowercase name, as on the wire and in rule matches.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paid => "paid",
            Self::Shipped => "shipped",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Data of `orders.status_changed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(extend(
    "if" = { "properties": { "status": { "const": "shipped" } } },
    "then" = { "required": ["tracking_number"], "properties": { "tracking_number": { "type": "string", "pattern": "\\S" } } }
))]
pub struct OrderStatusChanged {
    /// The customer's external id.
    #[schemars(length(min = 1, max = 200), regex(pattern = EXTERNAL_ID_PATTERN))]
    pub customer_id: String,
    /// The shop's order number.
    #[schemars(regex(pattern = r"\S"))]
    pub order_number: String,
    /// The new status.
    pub status: OrderEventStatus,
    /// The carrier's tracking number; required when `status` is `shipped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_number: Option<String>,
    /// When the parcel should arrive (`shipped`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_estimate: Option<NaiveDate>,
    /// Where the customer can review the order (`delivered`): an http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub review_url: Option<String>,
    /// Why it was cancelled (`cancelled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Data of `customers.created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CustomerCreated {
    /// The customer's external id.
    #[schemars(length(min = 1, max = 200), regex(pattern = EXTERNAL_ID_PATTERN))]
    pub customer_id: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Data of `security.login_alert`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LoginAlert {
    /// The customer's external id.
    #[schemars(length(min = 1, max = 200), regex(pattern = EXTERNAL_ID_PATTERN))]
    pub customer_id: String,
    /// The IP address the sign-in came from.
    #[schemars(regex(pattern = r"\S"))]
    pub ip: String,
    /// Where that is, roughly (`Berlin, DE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The device or browser (`Firefox on Linux`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// Data of `marketing.campaign`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MarketingCampaign {
    /// The customer's external id.
    #[schemars(length(min = 1, max = 200), regex(pattern = EXTERNAL_ID_PATTERN))]
    pub customer_id: String,
    /// The campaign's id.
    pub campaign_id: String,
    /// Headline (email subject, push title).
    #[schemars(regex(pattern = r"\S"))]
    pub headline: String,
    /// The message.
    #[schemars(regex(pattern = r"\S"))]
    pub body: String,
    /// Where the call to action leads: an http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: Option<String>,
}

/// The typed data of an event; the variant is the event's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventData {
    /// `orders.created`.
    OrderCreated(OrderCreated),
    /// `orders.status_changed`.
    OrderStatusChanged(OrderStatusChanged),
    /// `customers.created`.
    CustomerCreated(CustomerCreated),
    /// `security.login_alert`.
    LoginAlert(LoginAlert),
    /// `marketing.campaign`.
    MarketingCampaign(MarketingCampaign),
}

impl EventData {
    /// The event type, e.g. `orders.created`.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::OrderCreated(_) => ORDER_CREATED,
            Self::OrderStatusChanged(_) => ORDER_STATUS_CHANGED,
            Self::CustomerCreated(_) => CUSTOMER_CREATED,
            Self::LoginAlert(_) => LOGIN_ALERT,
            Self::MarketingCampaign(_) => MARKETING_CAMPAIGN,
        }
    }

    /// The data as a JSON object (what rules match fields against).
    pub fn to_json(&self) -> Value {
        let encoded = match self {
            Self::OrderCreated(d) => serde_json::to_value(d),
            Self::OrderStatusChanged(d) => serde_json::to_value(d),
            Self::CustomerCreated(d) => serde_json::to_value(d),
            Self::LoginAlert(d) => serde_json::to_value(d),
            Self::MarketingCampaign(d) => serde_json::to_value(d),
        };
        // Plain structs of strings and numbers always encode.
        encoded.unwrap_or(Value::Null)
    }

    fn parse(event_type: &str, data: Value) -> Result<EventData, EventDecodeError> {
        let parsed = match event_type {
            ORDER_CREATED => Self::OrderCreated(typed(event_type, data)?),
            ORDER_STATUS_CHANGED => Self::OrderStatusChanged(typed(event_type, data)?),
            CUSTOMER_CREATED => Self::CustomerCreated(typed(event_type, data)?),
            LOGIN_ALERT => Self::LoginAlert(typed(event_type, data)?),
            MARKETING_CAMPAIGN => Self::MarketingCampaign(typed(event_type, data)?),
            other => return Err(EventDecodeError::UnknownType(other.to_string())),
        };
        parsed
            .validate()
            .map_err(|reason| EventDecodeError::InvalidData {
                event_type: event_type.to_string(),
                reason,
            })?;
        Ok(parsed)
    }

    /// Checks what the types cannot say.
    fn validate(&self) -> Result<(), String> {
        plain_texts("", &self.to_json())?;
        let customer_id = match self {
            Self::OrderCreated(d) => &d.customer_id,
            Self::OrderStatusChanged(d) => &d.customer_id,
            Self::CustomerCreated(d) => &d.customer_id,
            Self::LoginAlert(d) => &d.customer_id,
            Self::MarketingCampaign(d) => &d.customer_id,
        };
        external_id("customer_id", customer_id)?;
        match self {
            Self::OrderCreated(d) => {
                non_empty("order_number", &d.order_number)?;
                if d.total_minor < 0 {
                    return Err("total_minor must not be negative".into());
                }
                if !is_currency(&d.currency) {
                    return Err("currency must be an ISO 4217 code such as EUR".into());
                }
            }
            Self::OrderStatusChanged(d) => {
                non_empty("order_number", &d.order_number)?;
                let tracking = d.tracking_number.as_deref().unwrap_or_default();
                if d.status == OrderEventStatus::Shipped && tracking.trim().is_empty() {
                    return Err("a shipped order needs a tracking_number".into());
                }
                http_link("review_url", d.review_url.as_deref())?;
            }
            Self::CustomerCreated(_) => {}
            Self::LoginAlert(d) => non_empty("ip", &d.ip)?,
            Self::MarketingCampaign(d) => {
                non_empty("headline", &d.headline)?;
                non_empty("body", &d.body)?;
                http_link("url", d.url.as_deref())?;
            }
        }
        Ok(())
    }
}

/// Reads `data` into its type; the error names the field it is about (`items[2].quantity: ...`).
fn typed<T: DeserializeOwned>(event_type: &str, data: Value) -> Result<T, EventDecodeError> {
    serde_path_to_error::deserialize(data).map_err(|e| EventDecodeError::InvalidData {
        event_type: event_type.to_string(),
        reason: e.to_string(),
    })
}

/// Fields that identify, match or link (a customer, an order, a code, an address): no control
/// character at all, as the API refuses them in ids.
const ONE_LINE_FIELDS: [&str; 8] = [
    "customer_id",
    "order_number",
    "currency",
    "tracking_number",
    "ip",
    "campaign_id",
    "url",
    "review_url",
];

/// Refuses control characters in the texts of `value` (the data as read into its type): a NUL,
/// which PostgreSQL can neither store nor compare, and the others, which have no place in a text
/// shown to a customer. The texts shown as they are (a name, a reason, a headline, a body) may
/// hold line breaks and tabs, as producers' texts do (the templates make one line of a subject);
/// [`ONE_LINE_FIELDS`] may not. The error names the field (`items[0].name`) below `at`.
fn plain_texts(at: &str, value: &Value) -> Result<(), String> {
    let control = crate::json_strings::first_string(value, at, &mut |at, text| {
        let multi_line = !ONE_LINE_FIELDS.contains(&at);
        text.chars()
            .find(|&c| c.is_control() && !(multi_line && matches!(c, '\n' | '\r' | '\t')))
    });
    match control {
        Some((field, c)) => Err(format!(
            "{field} must not contain control characters (it holds U+{:04X})",
            u32::from(c)
        )),
        None => Ok(()),
    }
}

/// Refuses a customer id the API would refuse or could not have stored: blank, longer than 200
/// characters, holding a `/` (the API puts ids in paths, `/customers/{id}`), or beginning or ending
/// with white space (the API trims ids). No customer can have such an id, so an
/// event naming one could never be routed. The error names `field`. (An order number in an
/// event is only shown, so it is not held to the orders API's rule.)
pub fn external_id(field: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() || value.chars().count() > MAX_EXTERNAL_ID {
        return Err(format!("{field} must be 1 to {MAX_EXTERNAL_ID} characters"));
    }
    if value.contains('/') {
        return Err(format!(
            "{field} must not contain '/' (the API refuses it in ids, so none can have it)"
        ));
    }
    if value.trim() != value {
        return Err(format!(
            "{field} must not begin or end with white space (the API trims ids, so none has it)"
        ));
    }
    Ok(())
}

/// Refuses a link that is not http(s): every template, compiled or an operator's own, may put it
/// in an `href`, where a `javascript:` or `data:` URL would run or show what the producer did
/// not mean.
fn http_link(field: &str, url: Option<&str>) -> Result<(), String> {
    match url {
        Some(url) if !(url.starts_with("https://") || url.starts_with("http://")) => {
            Err(format!("{field} must be an http(s) URL"))
        }
        _ => Ok(()),
    }
}

fn non_empty(field: &str, value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    Ok(())
}

/// Whether `code` looks like an ISO 4217 currency code (three upper-case letters).
pub fn is_currency(code: &str) -> bool {
    code.len() == 3 && code.chars().all(|c| c.is_ascii_uppercase())
}

/// A domain event: who and what happened, when, with an id that makes re-publishing harmless.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    /// Schema version, [`EVENT_SCHEMA_VERSION`] when written by this build.
    pub v: u16,
    /// The event's id, chosen by the producer; also its `Nats-Msg-Id`.
    pub id: Uuid,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// What happened.
    pub data: EventData,
}

/// The envelope as it is on the wire.
#[derive(Serialize, Deserialize)]
struct WireEvent {
    v: u16,
    id: Uuid,
    #[serde(rename = "type")]
    event_type: String,
    occurred_at: DateTime<Utc>,
    data: Value,
}

impl Versioned for WireEvent {
    const VERSION: u16 = EVENT_SCHEMA_VERSION;

    fn version(&self) -> u16 {
        self.v
    }
}

/// Why an event could not be read; the reason goes into the dead letter's headers.
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    /// Not JSON, or JSON without a numeric `v`.
    #[error("malformed event: {0}")]
    Malformed(String),
    /// A version this build does not read.
    #[error("unknown event schema version {0} (this build reads {EVENT_SCHEMA_VERSION})")]
    UnknownVersion(u64),
    /// The right version, but `id`, `type`, `occurred_at` or `data` is missing or mistyped.
    #[error("invalid event envelope: {0}")]
    InvalidEnvelope(String),
    /// A type this build does not know.
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    /// The data does not fit its type.
    #[error("invalid data for {event_type}: {reason}")]
    InvalidData {
        /// The event's type.
        event_type: String,
        /// What is wrong.
        reason: String,
    },
}

/// How the request id of a notification the Router makes from an event begins; the API refuses
/// callers' request ids that begin so ([`router_request_id`]).
pub const ROUTER_REQUEST_ID_PREFIX: &str = "event:";

/// The request id of the notification `rule` makes from the event `event_id`: the event and the
/// rule are its idempotency key, like a caller's request id.
pub fn router_request_id(event_id: Uuid, rule: &str) -> String {
    format!("{ROUTER_REQUEST_ID_PREFIX}{event_id}:{rule}")
}

/// Largest event the Router routes; a larger one is dead-lettered unread. The orders API refuses
/// an order whose event would be larger.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

impl DomainEvent {
    /// A new event of this build's version with a fresh id, happening now.
    pub fn new(data: EventData) -> Self {
        Self {
            v: EVENT_SCHEMA_VERSION,
            id: Uuid::now_v7(),
            occurred_at: Utc::now(),
            data,
        }
    }

    /// The event type, e.g. `orders.created`.
    pub fn event_type(&self) -> &'static str {
        self.data.event_type()
    }

    /// The subject the event is published on: `events.<type>`.
    pub fn subject(&self) -> String {
        crate::subjects::event_subject(self.event_type())
    }

    /// The wire form as a JSON value.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "v": self.v,
            "id": self.id,
            "type": self.event_type(),
            "occurred_at": self.occurred_at,
            "data": self.data.to_json(),
        })
    }

    /// Encodes the event as JSON bytes.
    pub fn encode(&self) -> Result<bytes::Bytes, serde_json::Error> {
        serde_json::to_vec(&self.to_json()).map(bytes::Bytes::from)
    }

    /// Decodes an event, telling a malformed message from an unknown version, an unknown type and
    /// data that does not fit its type.
    pub fn decode(payload: &[u8]) -> Result<DomainEvent, EventDecodeError> {
        let wire: WireEvent = versioned::decode(payload).map_err(|err| match err {
            VersionedError::Malformed(e) => EventDecodeError::Malformed(e.to_string()),
            VersionedError::UnknownVersion(v) => EventDecodeError::UnknownVersion(v),
            VersionedError::InvalidBody(e) => EventDecodeError::InvalidEnvelope(e.to_string()),
        })?;
        Ok(DomainEvent {
            v: wire.v,
            id: wire.id,
            occurred_at: wire.occurred_at,
            data: EventData::parse(&wire.event_type, wire.data)?,
        })
    }
}

/// The JSON Schema of every event type's envelope, as `(event type, schema)`: what
/// `docs/events/<type>.schema.json` holds.
pub fn json_schemas() -> Vec<(&'static str, Value)> {
    vec![
        envelope_schema(
            ORDER_CREATED,
            "An order was placed.",
            schemars::schema_for!(OrderCreated),
        ),
        envelope_schema(
            ORDER_STATUS_CHANGED,
            "An order was paid, shipped, delivered or cancelled.",
            schemars::schema_for!(OrderStatusChanged),
        ),
        envelope_schema(
            CUSTOMER_CREATED,
            "A customer signed up.",
            schemars::schema_for!(CustomerCreated),
        ),
        envelope_schema(
            LOGIN_ALERT,
            "A sign-in from a new device or place.",
            schemars::schema_for!(LoginAlert),
        ),
        envelope_schema(
            MARKETING_CAMPAIGN,
            "A campaign message for one customer.",
            schemars::schema_for!(MarketingCampaign),
        ),
    ]
}

/// Wraps a data schema in the envelope's; the data schema's definitions move to the top level,
/// where its `#/$defs/...` references point.
fn envelope_schema(
    event_type: &'static str,
    description: &str,
    data: schemars::Schema,
) -> (&'static str, Value) {
    let mut data = data.to_value();
    let defs = data
        .as_object_mut()
        .and_then(|o| {
            o.remove("$schema");
            o.remove("$defs")
        })
        .unwrap_or(Value::Null);
    let mut schema = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("https://herald.example/events/{event_type}.schema.json"),
        "title": event_type,
        "description": format!("{description} Published on `events.{event_type}`."),
        "type": "object",
        "required": ["v", "id", "type", "occurred_at", "data"],
        "properties": {
            "v": { "description": "Schema version.", "const": EVENT_SCHEMA_VERSION },
            "id": {
                "description": "The event's id; also its Nats-Msg-Id. Re-publishing an event with \
                                the same id never notifies twice.",
                "type": "string",
                "format": "uuid"
            },
            "type": { "const": event_type },
            "occurred_at": {
                "description": "When it happened (RFC 3339).",
                "type": "string",
                "format": "date-time"
            },
            "data": data,
        },
    });
    if !defs.is_null()
        && let Some(object) = schema.as_object_mut()
    {
        object.insert("$defs".into(), defs);
    }
    (event_type, schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> DomainEvent {
        DomainEvent::new(EventData::OrderStatusChanged(OrderStatusChanged {
            customer_id: "c-1".into(),
            order_number: "1001".into(),
            status: OrderEventStatus::Shipped,
            tracking_number: Some("1Z999".into()),
            delivery_estimate: NaiveDate::from_ymd_opt(2026, 12, 1),
            review_url: None,
            reason: None,
        }))
    }

    #[test]
    fn events_round_trip() {
        let event = shipped();
        let bytes = event.encode().unwrap();
        assert_eq!(DomainEvent::decode(&bytes).unwrap(), event);
        assert_eq!(event.subject(), "events.orders.status_changed");
        let json = event.to_json();
        assert_eq!(json["type"], "orders.status_changed");
        assert_eq!(json["data"]["status"], "shipped");
        assert_eq!(json["data"]["delivery_estimate"], "2026-12-01");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_field() {
        let decode = |data: &str| {
            let payload = format!(
                r#"{{"v": 1, "id": "{}", "type": "orders.created", "occurred_at": "2026-01-01T00:00:00Z", "data": {data}}}"#,
                Uuid::now_v7()
            );
            DomainEvent::decode(payload.as_bytes())
                .unwrap_err()
                .to_string()
        };
        let total = decode(
            r#"{"customer_id": "c-1", "order_number": "1", "total_minor": "4200", "currency": "EUR"}"#,
        );
        assert_eq!(
            total,
            r#"invalid data for orders.created: total_minor: invalid type: string "4200", expected i64"#
        );
        let quantity = decode(
            r#"{"customer_id": "c-1", "order_number": "1", "total_minor": 1, "currency": "EUR",
                "items": [{"name": "a", "quantity": 1, "unit_price_minor": 1},
                          {"name": "b", "quantity": 1, "unit_price_minor": 1},
                          {"name": "c", "quantity": -2, "unit_price_minor": 1}]}"#,
        );
        assert!(
            quantity.starts_with("invalid data for orders.created: items[2].quantity: "),
            "{quantity}"
        );
    }

    #[test]
    fn decode_names_what_is_wrong() {
        let err = |payload: &str| DomainEvent::decode(payload.as_bytes()).unwrap_err();
        assert!(matches!(err("{oops"), EventDecodeError::Malformed(_)));
        assert!(matches!(
            err(r#"{"type": "x"}"#),
            EventDecodeError::Malformed(_)
        ));
        assert!(matches!(
            err(r#"{"v": 2, "whatever": true}"#),
            EventDecodeError::UnknownVersion(2)
        ));
        assert!(matches!(
            err(
                r#"{"v": 2, "id": "01a2483e-0000-7000-8000-000000000000", "type": "orders.created", "occurred_at": "2026-01-01T00:00:00Z", "data": {}}"#
            ),
            EventDecodeError::UnknownVersion(2)
        ));
        assert!(matches!(
            err(
                r#"{"v": 1, "id": "nope", "type": "orders.created", "occurred_at": "2026-01-01T00:00:00Z", "data": {}}"#
            ),
            EventDecodeError::InvalidEnvelope(_)
        ));
        let id = Uuid::now_v7();
        let with = |event_type: &str, data: &str| {
            format!(
                r#"{{"v": 1, "id": "{id}", "type": "{event_type}", "occurred_at": "2026-01-01T00:00:00Z", "data": {data}}}"#
            )
        };
        assert!(matches!(
            err(&with("orders.refunded", "{}")),
            EventDecodeError::UnknownType(t) if t == "orders.refunded"
        ));
        let missing = err(&with("orders.created", r#"{"customer_id": "c-1"}"#)).to_string();
        assert!(
            missing.contains("orders.created") && missing.contains("order_number"),
            "{missing}"
        );
        let untracked = err(&with(
            "orders.status_changed",
            r#"{"customer_id": "c-1", "order_number": "1", "status": "shipped"}"#,
        ))
        .to_string();
        assert!(untracked.contains("tracking_number"), "{untracked}");
        let currency = err(&with(
            "orders.created",
            r#"{"customer_id": "c-1", "order_number": "1", "total_minor": 1, "currency": "euro"}"#,
        ))
        .to_string();
        assert!(currency.contains("currency"), "{currency}");
        let ok = DomainEvent::decode(
            with(
                "security.login_alert",
                r#"{"customer_id": "c-1", "ip": "192.0.2.1", "future_field": 1}"#,
            )
            .as_bytes(),
        )
        .expect("unknown fields are ignored");
        assert_eq!(ok.event_type(), LOGIN_ALERT);
        // The customer id's limit counts characters, as the schema's maxLength does.
        let alert = |customer_id: String| {
            with(
                "security.login_alert",
                &format!(r#"{{"customer_id": "{customer_id}", "ip": "192.0.2.1"}}"#),
            )
        };
        assert!(DomainEvent::decode(alert("é".repeat(MAX_EXTERNAL_ID)).as_bytes()).is_ok());
        let nul = err(&alert(r"c-1\u0000".into())).to_string();
        assert!(
            nul.contains("customer_id must not contain control characters (it holds U+0000)"),
            "{nul}"
        );
        let order = |number: &str, name: &str| {
            with(
                "orders.created",
                &format!(
                    r#"{{"customer_id": "c-1", "order_number": "{number}", "total_minor": 1,
                        "currency": "EUR", "items": [{{"name": "Tea", "quantity": 1,
                        "unit_price_minor": 1}}, {{"name": "{name}", "quantity": 1,
                        "unit_price_minor": 1}}]}}"#
                ),
            )
        };
        if let Err(err) = DomainEvent::decode(order("1", r"Tea\tparty\nset").as_bytes()) {
            panic!("a name shown as it is may hold tabs and line breaks: {err}");
        }
        let item = err(&order("1", r"Tea\u001bparty")).to_string();
        assert!(
            item.contains("items[1].name") && item.contains("U+001B"),
            "{item}"
        );
        let number = err(&order(r"1\t2", "Tea")).to_string();
        assert!(
            number.contains("order_number") && number.contains("U+0009"),
            "an id holds no tab: {number}"
        );
        let campaign = |body: &str| {
            with(
                "marketing.campaign",
                &format!(
                    r#"{{"customer_id": "c-1", "campaign_id": "x", "headline": "Hi", "body": "{body}"}}"#
                ),
            )
        };
        assert!(
            DomainEvent::decode(campaign(r"Line one\nLine\ttwo").as_bytes()).is_ok(),
            "a body may span lines"
        );
        let bell = err(&campaign(r"Ring\u0007")).to_string();
        let link = |url: &str| {
            with(
                "marketing.campaign",
                &format!(
                    r#"{{"customer_id": "c-1", "campaign_id": "x", "headline": "Hi", "body": "Hi",
                        "url": "{url}"}}"#
                ),
            )
        };
        assert!(DomainEvent::decode(link("https://shop.example/sale").as_bytes()).is_ok());
        let script = err(&link("javascript:alert(1)")).to_string();
        assert!(script.contains("url must be an http(s) URL"), "{script}");
        assert!(bell.contains("body") && bell.contains("U+0007"), "{bell}");
        let long = err(&alert("é".repeat(MAX_EXTERNAL_ID + 1))).to_string();
        assert!(long.contains("customer_id"), "{long}");
    }

    /// Customer ids are refused as the API refuses them (`api::validate::external_id`): no
    /// customer can have a `/` in its id, nor one longer than 200 characters. An order number is
    /// only shown, so a producer's `2026/17` is routed.
    #[test]
    fn customer_ids_follow_the_api_s_rule() {
        let order = |customer_id: &str, order_number: &str| {
            DomainEvent::decode(
                DomainEvent::new(EventData::OrderCreated(OrderCreated {
                    customer_id: customer_id.into(),
                    order_number: order_number.into(),
                    total_minor: 1,
                    currency: "EUR".into(),
                    items: Vec::new(),
                }))
                .encode()
                .unwrap()
                .as_ref(),
            )
        };
        assert!(order("c-1", "A-1").is_ok());
        assert!(order("c-1", "2026/17").is_ok());
        let slash = order("shop/c-1", "A-1").unwrap_err().to_string();
        assert!(
            slash.contains("customer_id must not contain '/'"),
            "{slash}"
        );
        let spaced = order(" c-1", "A-1").unwrap_err().to_string();
        assert!(
            spaced.contains("customer_id must not begin or end with white space"),
            "{spaced}"
        );
        assert!(order("c-1\t", "A-1").is_err());
        assert!(
            order("c 1", "A-1").is_ok(),
            "a space inside is the API's too"
        );
        let long = order(&"9".repeat(MAX_EXTERNAL_ID + 1), "A-1")
            .unwrap_err()
            .to_string();
        assert!(long.contains("customer_id must be 1 to 200"), "{long}");
    }

    /// The committed schema files are what this build generates. Regenerate them with
    /// `HERALD_WRITE_EVENT_SCHEMAS=1 cargo test -p herald-nats schema_files`.
    #[test]
    fn schema_files_are_up_to_date() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/events");
        let write = std::env::var_os("HERALD_WRITE_EVENT_SCHEMAS").is_some();
        for (event_type, schema) in json_schemas() {
            let path = dir.join(format!("{event_type}.schema.json"));
            let generated = format!("{}\n", serde_json::to_string_pretty(&schema).unwrap());
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &generated).unwrap();
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == generated,
                "{} is out of date; regenerate with HERALD_WRITE_EVENT_SCHEMAS=1",
                path.display()
            );
        }
        assert_eq!(json_schemas().len(), EVENT_TYPES.len());
    }

    #[test]
    fn schemas_describe_the_envelope_and_data() {
        let schemas = json_schemas();
        let (_, shipped) = schemas
            .iter()
            .find(|(t, _)| *t == ORDER_STATUS_CHANGED)
            .unwrap();
        assert_eq!(shipped["properties"]["type"]["const"], ORDER_STATUS_CHANGED);
        let data = &shipped["properties"]["data"];
        let required = data["required"].as_array().unwrap();
        assert!(required.contains(&"order_number".into()));
        assert!(!required.contains(&"tracking_number".into()));
        // The status enum is a definition referenced from data.
        let reference = data["properties"]["status"]["$ref"].as_str().unwrap();
        let name = reference.trim_start_matches("#/$defs/");
        assert!(shipped["$defs"][name].is_object(), "{shipped}");
    }
}
