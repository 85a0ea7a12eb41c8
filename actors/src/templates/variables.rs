//! The variables a domain event offers its templates: the event's data in display form, plus the
//! customer's id and name (which every template sent to a stored customer gets, see
//! [`add_customer`]). Money is formatted from minor units; times in the customer's time zone.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use herald_entities::customer;
use herald_nats::{DomainEvent, EventData, events};
use serde_json::{Map, Value, json};

/// Currencies whose minor unit is not a hundredth (ISO 4217 exponents other than 2).
const EXPONENTS: [(&str, u32); 26] = [
    ("BIF", 0),
    ("CLP", 0),
    ("DJF", 0),
    ("GNF", 0),
    ("ISK", 0),
    ("JPY", 0),
    ("KMF", 0),
    ("KRW", 0),
    ("PYG", 0),
    ("RWF", 0),
    ("UGX", 0),
    ("UYI", 0),
    ("VND", 0),
    ("VUV", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("XPF", 0),
    ("BHD", 3),
    ("IQD", 3),
    ("JOD", 3),
    ("KWD", 3),
    ("LYD", 3),
    ("OMR", 3),
    ("TND", 3),
    ("CLF", 4),
    ("UYW", 4),
];

/// `4200, "EUR"` → `42.00 EUR`; `-5, "EUR"` → `-0.05 EUR`; `1200, "JPY"` → `1200 JPY`;
/// `12345, "KWD"` → `12.345 KWD`: as many decimals as the currency's minor unit has.
pub fn format_money(minor: i64, currency: &str) -> String {
    let exponent = EXPONENTS
        .iter()
        .find(|(code, _)| *code == currency)
        .map_or(2, |(_, exponent)| *exponent);
    if exponent == 0 {
        return format!("{minor} {currency}");
    }
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let unit = 10u64.pow(exponent);
    let width = exponent as usize;
    format!("{sign}{}.{:0width$} {currency}", abs / unit, abs % unit)
}

/// `occurred_at` in the customer's time zone (UTC when unknown), e.g. `2026-11-22 14:05 CET`.
pub fn format_time(at: DateTime<Utc>, timezone: &str) -> String {
    match timezone.parse::<chrono_tz::Tz>() {
        Ok(tz) => at
            .with_timezone(&tz)
            .format("%Y-%m-%d %H:%M %Z")
            .to_string(),
        Err(_) => at.format("%Y-%m-%d %H:%M UTC").to_string(),
    }
}

/// Adds what a template may say about a stored `customer` — `customer_id` and, when known,
/// `customer_name` — to `vars`, keeping any value `vars` already has (a `null` is none).
pub fn add_customer(vars: &mut Map<String, Value>, customer: &customer::Model) {
    fill(vars, "customer_id", &customer.external_id);
    if let Some(name) = &customer.name {
        fill(vars, "customer_name", name);
    }
}

/// Sets `name` to `value` unless `vars` has a value for it other than `null`.
fn fill(vars: &mut Map<String, Value>, name: &str, value: &str) {
    if vars.get(name).is_none_or(Value::is_null) {
        vars.insert(name.to_string(), json!(value));
    }
}

/// The variables for rendering `event`'s notifications to `customer`.
pub fn from_event(event: &DomainEvent, customer: &customer::Model) -> Map<String, Value> {
    let mut vars = Map::new();
    add_customer(&mut vars, customer);
    vars.insert("event_id".into(), json!(event.id));
    vars.insert(
        "occurred_at".into(),
        json!(format_time(event.occurred_at, &customer.timezone)),
    );
    let data = match &event.data {
        EventData::OrderCreated(d) => json!({
            "order_number": d.order_number,
            "total": format_money(d.total_minor, &d.currency),
            "items": d.items.iter().map(|i| json!({
                "name": i.name,
                "quantity": i.quantity,
                "price": format_money(i.unit_price_minor.saturating_mul(i64::from(i.quantity)), &d.currency),
            })).collect::<Vec<_>>(),
        }),
        EventData::OrderStatusChanged(d) => json!({
            "order_number": d.order_number,
            "status": d.status.as_str(),
            "tracking_number": d.tracking_number,
            "delivery_estimate": d.delivery_estimate.map(|e| e.format("%Y-%m-%d").to_string()),
            "review_url": d.review_url,
            "reason": d.reason,
        }),
        EventData::CustomerCreated(d) => json!({ "name": d.name }),
        EventData::LoginAlert(d) => json!({
            "ip": d.ip,
            "location": d.location,
            "device": d.device,
        }),
        EventData::MarketingCampaign(d) => json!({
            "campaign_id": d.campaign_id,
            "headline": d.headline,
            "body": d.body,
            "url": d.url,
        }),
    };
    if let Value::Object(data) = data {
        vars.extend(data.into_iter().filter(|(_, v)| !v.is_null()));
    }
    vars
}

/// The variables [`from_event`] sets for every event of `event_type` whose data a rule's `when`
/// (data field → value) matches, whatever the customer: `customer_id`, `event_id`,
/// `occurred_at`, those from the data fields every event of the type has, and those from
/// optional fields the `when` pins (a pinned field is there and not null, as null matches
/// nothing), or that the pinned values require (a `shipped` order has a tracking number: the
/// event is refused without one). Not `customer_name`: a customer may have no name. `None` for an
/// unknown event type.
pub fn supplied(event_type: &str, when: &BTreeMap<String, String>) -> Option<Vec<&'static str>> {
    let (always, optional): (&[&'static str], &[&'static str]) = match event_type {
        events::ORDER_CREATED => (&["order_number", "total", "items"], &[]),
        events::ORDER_STATUS_CHANGED => (
            &["order_number", "status"],
            &[
                "tracking_number",
                "delivery_estimate",
                "review_url",
                "reason",
            ],
        ),
        events::CUSTOMER_CREATED => (&[], &["name"]),
        events::LOGIN_ALERT => (&["ip"], &["location", "device"]),
        events::MARKETING_CAMPAIGN => (&["campaign_id", "headline", "body"], &["url"]),
        _ => return None,
    };
    let shipped = event_type == events::ORDER_STATUS_CHANGED
        && when.get("status").is_some_and(|status| status == "shipped");
    let mut names = vec!["customer_id", "event_id", "occurred_at"];
    names.extend_from_slice(always);
    names.extend(
        optional
            .iter()
            .copied()
            .filter(|name| when.contains_key(*name) || (shipped && *name == "tracking_number")),
    );
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_nats::events::{
        CustomerCreated, LoginAlert, MarketingCampaign, OrderCreated, OrderEventStatus,
        OrderStatusChanged,
    };

    fn nameless_customer() -> customer::Model {
        let now = Utc::now();
        customer::Model {
            id: uuid::Uuid::nil(),
            external_id: "c-1".into(),
            name: None,
            email: None,
            phone: None,
            telegram_chat_id: None,
            push_tokens: json!([]),
            webhook_url: None,
            webhook_secret: None,
            previous_webhook_secret: None,
            webhook_secret_replaced_at: None,
            locale: "en".into(),
            timezone: "UTC".into(),
            created_at: now,
            updated_at: now,
        }
    }

    fn status_changed(status: OrderEventStatus, tracking: Option<&str>) -> EventData {
        EventData::OrderStatusChanged(OrderStatusChanged {
            customer_id: "c-1".into(),
            order_number: "1001".into(),
            status,
            tracking_number: tracking.map(Into::into),
            delivery_estimate: None,
            review_url: None,
            reason: None,
        })
    }

    /// The barest event of each type (no optional field) gets exactly the variables [`supplied`]
    /// promises without a `when`; a shipped order's, those it promises for `status = "shipped"`.
    #[test]
    fn supplied_lists_what_the_barest_event_of_each_type_gets() {
        let barest = [
            EventData::OrderCreated(OrderCreated {
                customer_id: "c-1".into(),
                order_number: "1001".into(),
                total_minor: 0,
                currency: "EUR".into(),
                items: vec![],
            }),
            status_changed(OrderEventStatus::Paid, None),
            EventData::CustomerCreated(CustomerCreated {
                customer_id: "c-1".into(),
                name: None,
            }),
            EventData::LoginAlert(LoginAlert {
                customer_id: "c-1".into(),
                ip: "192.0.2.1".into(),
                location: None,
                device: None,
            }),
            EventData::MarketingCampaign(MarketingCampaign {
                customer_id: "c-1".into(),
                campaign_id: "spring".into(),
                headline: "Spring".into(),
                body: "Sale".into(),
                url: None,
            }),
        ];
        let names = |data: EventData| {
            let vars = from_event(&DomainEvent::new(data), &nameless_customer());
            let mut names: Vec<String> = vars.keys().cloned().collect();
            names.sort();
            names
        };
        let promised = |event_type: &str, when: &[(&str, &str)]| {
            let when = when
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let mut names: Vec<String> = supplied(event_type, &when)
                .expect("a known type")
                .into_iter()
                .map(String::from)
                .collect();
            names.sort();
            names
        };
        for data in barest {
            let event_type = data.event_type();
            assert_eq!(names(data), promised(event_type, &[]), "{event_type}");
        }
        let shipped = status_changed(OrderEventStatus::Shipped, Some("1Z999"));
        let changed = events::ORDER_STATUS_CHANGED;
        assert_eq!(names(shipped), promised(changed, &[("status", "shipped")]));
        assert!(promised(changed, &[("reason", "out of stock")]).contains(&"reason".into()));
        assert_eq!(supplied("orders.exploded", &BTreeMap::new()), None);
    }

    #[test]
    fn the_stored_customer_fills_variables_that_are_absent_or_null_only() {
        let now = Utc::now();
        let customer = customer::Model {
            id: uuid::Uuid::nil(),
            external_id: "c-1".into(),
            name: Some("Ada".into()),
            email: None,
            phone: None,
            telegram_chat_id: None,
            push_tokens: json!([]),
            webhook_url: None,
            webhook_secret: None,
            previous_webhook_secret: None,
            webhook_secret_replaced_at: None,
            locale: "en".into(),
            timezone: "UTC".into(),
            created_at: now,
            updated_at: now,
        };
        let mut vars = Map::new();
        vars.insert("customer_name".into(), Value::Null);
        add_customer(&mut vars, &customer);
        assert_eq!(vars["customer_name"], "Ada", "null is no value");
        assert_eq!(vars["customer_id"], "c-1");
        vars.insert("customer_name".into(), json!("Lady Lovelace"));
        add_customer(&mut vars, &customer);
        assert_eq!(
            vars["customer_name"], "Lady Lovelace",
            "a value given is kept"
        );
    }

    #[test]
    fn money_is_formatted_from_minor_units() {
        assert_eq!(format_money(4200, "EUR"), "42.00 EUR");
        assert_eq!(format_money(5, "USD"), "0.05 USD");
        assert_eq!(format_money(-1999, "EUR"), "-19.99 EUR");
        assert_eq!(format_money(1200, "JPY"), "1200 JPY");
        assert_eq!(format_money(50_000, "PYG"), "50000 PYG");
        assert_eq!(format_money(12_345, "KWD"), "12.345 KWD", "three decimals");
        assert_eq!(format_money(-7, "BHD"), "-0.007 BHD");
        assert_eq!(format_money(10_000, "CLF"), "1.0000 CLF");
        assert_eq!(format_money(i64::MIN, "EUR"), "-92233720368547758.08 EUR");
    }

    #[test]
    fn times_are_shown_in_the_customer_zone() {
        let at = "2026-11-22T13:05:00Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(format_time(at, "Europe/Berlin"), "2026-11-22 14:05 CET");
        assert_eq!(format_time(at, "Nowhere/Else"), "2026-11-22 13:05 UTC");
    }
}
