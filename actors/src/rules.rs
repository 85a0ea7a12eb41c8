//! Routing rules: which notifications an event causes.
//!
//! A rule matches an event type and, optionally, fields of the event's data (`status = "shipped"`),
//! and names the template, the category, the channel chain (the category's default chain when
//! absent) and the data field holding the recipient's customer id. Every matching rule makes one
//! notification, whose id is derived from the event id and the rule name, so an event delivered or
//! published twice never notifies twice.
//!
//! Herald ships [`default_rules`]; configuration (`[[routing.rules]]`) adds rules, replaces a
//! default by using its name, or switches one off with `enabled = false`.

use std::collections::BTreeMap;

use herald_nats::{Category, Channel, DomainEvent, events};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Namespace of notification ids derived from events (see [`herald_nats::ids`]).
const NOTIFICATION_NAMESPACE: Uuid = Uuid::from_u128(0x6865_7261_6c64_4e6f_7469_6679_4576_7473);

/// One routing rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique name; part of the notification id, so renaming a rule re-notifies replayed events.
    pub name: String,
    /// The event type it reacts to, e.g. `orders.status_changed`.
    pub event: String,
    /// Data fields that must equal these values (strings compare with strings, others by their
    /// JSON text), e.g. `{ status = "shipped" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub when: BTreeMap<String, String>,
    /// Template code: a compiled template, else a runtime one, looked up when an event is routed.
    pub template: String,
    /// Category of the notification.
    pub category: Category,
    /// Channel chain; the category's default chain when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<Channel>>,
    /// The data field holding the recipient's customer id.
    #[serde(default = "default_recipient")]
    pub recipient: String,
    /// `false` switches the rule (usually a default one) off.
    #[serde(default = "enabled")]
    pub enabled: bool,
}

fn default_recipient() -> String {
    "customer_id".into()
}

fn enabled() -> bool {
    true
}

impl Rule {
    /// Whether the rule applies to an event of `event_type` with `data`.
    pub fn matches(&self, event_type: &str, data: &Value) -> bool {
        self.enabled
            && self.event == event_type
            && self
                .when
                .iter()
                .all(|(field, want)| field_text(data, field).as_deref() == Some(want.as_str()))
    }

    /// The recipient's customer id in `data`, if the field is there and a string.
    pub fn recipient_in<'a>(&self, data: &'a Value) -> Option<&'a str> {
        data.get(&self.recipient)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
    }

    /// The id of the notification this rule makes for `event`: the same every time, sorting
    /// among the API's ids at the time the event occurred.
    pub fn notification_id(&self, event: &DomainEvent) -> Uuid {
        herald_nats::ids::derived_id(
            event.occurred_at,
            &NOTIFICATION_NAMESPACE,
            format!("{}:{}", event.id, self.name).as_bytes(),
        )
    }
}

/// A field's value as text: strings as they are, other values as JSON.
fn field_text(data: &Value, field: &str) -> Option<String> {
    match data.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn rule(
    name: &str,
    event: &str,
    when: &[(&str, &str)],
    template: &str,
    category: Category,
) -> Rule {
    Rule {
        name: name.into(),
        event: event.into(),
        when: when
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        template: template.into(),
        category,
        channels: None,
        recipient: default_recipient(),
        enabled: true,
    }
}

/// The rules Herald ships with.
pub fn default_rules() -> Vec<Rule> {
    use Category::*;
    vec![
        rule(
            "order_placed",
            events::ORDER_CREATED,
            &[],
            "order_placed",
            Transactional,
        ),
        rule(
            "order_shipped",
            events::ORDER_STATUS_CHANGED,
            &[("status", "shipped")],
            "order_shipped",
            Transactional,
        ),
        rule(
            "order_delivered",
            events::ORDER_STATUS_CHANGED,
            &[("status", "delivered")],
            "order_delivered",
            Transactional,
        ),
        rule(
            "login_alert",
            events::LOGIN_ALERT,
            &[],
            "security_alert",
            Security,
        ),
        rule(
            "marketing_campaign",
            events::MARKETING_CAMPAIGN,
            &[],
            "marketing",
            Marketing,
        ),
    ]
}

/// The defaults with `overrides` applied: a rule named like a default replaces it, others are
/// added; disabled rules are dropped.
pub fn with_overrides(defaults: Vec<Rule>, overrides: &[Rule]) -> Vec<Rule> {
    let mut rules = defaults;
    for o in overrides {
        match rules.iter_mut().find(|r| r.name == o.name) {
            Some(existing) => *existing = o.clone(),
            None => rules.push(o.clone()),
        }
    }
    rules.retain(|r| r.enabled);
    rules
}

/// Why a rule set cannot work.
#[derive(Debug, thiserror::Error)]
#[error("routing rule {rule:?}: {reason}")]
pub struct RuleError {
    /// The rule.
    pub rule: String,
    /// What is wrong.
    pub reason: String,
}

/// Checks that names are unique and every rule names a known event type and a template. A template
/// that is not compiled is taken for a runtime one, which may be created after the rules are
/// loaded; until it is, the rule's events are dead-lettered.
pub fn validate(rules: &[Rule]) -> Result<(), RuleError> {
    for (i, r) in rules.iter().enumerate() {
        let fail = |reason: String| {
            Err(RuleError {
                rule: r.name.clone(),
                reason,
            })
        };
        if r.name.trim().is_empty() {
            return fail("the name is empty".into());
        }
        if rules[..i].iter().any(|other| other.name == r.name) {
            return fail("the name is used twice".into());
        }
        if !events::EVENT_TYPES.contains(&r.event.as_str()) {
            return fail(format!(
                "unknown event {:?}; known: {}",
                r.event,
                events::EVENT_TYPES.join(", ")
            ));
        }
        if r.template.trim().is_empty() {
            return fail("the template is empty".into());
        }
        if r.channels.as_ref().is_some_and(Vec::is_empty) {
            return fail("the channel chain is empty".into());
        }
    }
    Ok(())
}

/// The rules that apply to an event.
pub fn matching<'a>(rules: &'a [Rule], event_type: &str, data: &Value) -> Vec<&'a Rule> {
    rules
        .iter()
        .filter(|r| r.matches(event_type, data))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn default_rules_are_valid_and_pick_by_status() {
        let rules = default_rules();
        validate(&rules).unwrap();
        let shipped = json!({"customer_id": "c-1", "status": "shipped"});
        let names: Vec<_> = matching(&rules, "orders.status_changed", &shipped)
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["order_shipped"]);
        let paid = json!({"customer_id": "c-1", "status": "paid"});
        assert!(matching(&rules, "orders.status_changed", &paid).is_empty());
        assert_eq!(matching(&rules, "orders.created", &json!({})).len(), 1);
        assert!(matching(&rules, "customers.created", &json!({})).is_empty());
    }

    #[test]
    fn non_string_fields_match_by_their_json_text() {
        let mut r = rule(
            "big",
            events::ORDER_CREATED,
            &[("total_minor", "100")],
            "order_placed",
            Category::Transactional,
        );
        assert!(r.matches("orders.created", &json!({"total_minor": 100})));
        assert!(!r.matches("orders.created", &json!({"total_minor": 101})));
        assert!(!r.matches("orders.created", &json!({})));
        r.enabled = false;
        assert!(!r.matches("orders.created", &json!({"total_minor": 100})));
    }

    #[test]
    fn notification_ids_are_stable_per_event_and_rule() {
        // (A change of how ids are made re-notifies nothing: the event and rule are also the
        // notification's request id, which the insert de-duplicates on.)
        let rules = default_rules();
        let event = |id: Uuid, occurred_at| DomainEvent {
            id,
            occurred_at,
            ..DomainEvent::new(events::EventData::CustomerCreated(
                events::CustomerCreated {
                    customer_id: "ada".into(),
                    name: None,
                },
            ))
        };
        let occurred = chrono::Utc::now() - chrono::Duration::minutes(5);
        let first = event(Uuid::now_v7(), occurred);
        let again = event(first.id, occurred);
        assert_eq!(
            rules[0].notification_id(&first),
            rules[0].notification_id(&again)
        );
        assert_ne!(
            rules[0].notification_id(&first),
            rules[1].notification_id(&first)
        );
        assert_ne!(
            rules[0].notification_id(&first),
            rules[0].notification_id(&event(Uuid::now_v7(), occurred))
        );
        // Newest first means by the time the event occurred, among the API's UUIDv7s.
        let id = rules[0].notification_id(&first);
        assert!(
            Uuid::now_v7() > id,
            "{id} sorts before a notification accepted now"
        );
        let earlier = chrono::Utc::now() - chrono::Duration::minutes(6);
        assert!(rules[0].notification_id(&event(Uuid::now_v7(), earlier)) < id);
    }

    #[test]
    fn overrides_replace_add_and_disable() {
        let config: Vec<Rule> = toml_rules(
            r#"
            [[rules]]
            name = "order_shipped"
            event = "orders.status_changed"
            when = { status = "shipped" }
            template = "order_shipped"
            category = "transactional"
            channels = ["sms", "email"]

            [[rules]]
            name = "marketing_campaign"
            event = "marketing.campaign"
            template = "marketing"
            category = "marketing"
            enabled = false

            [[rules]]
            name = "welcome"
            event = "customers.created"
            template = "marketing"
            category = "account"
            "#,
        );
        let rules = with_overrides(default_rules(), &config);
        validate(&rules).unwrap();
        let shipped = rules.iter().find(|r| r.name == "order_shipped").unwrap();
        assert_eq!(shipped.channels, Some(vec![Channel::Sms, Channel::Email]));
        assert!(rules.iter().all(|r| r.name != "marketing_campaign"));
        assert!(rules.iter().any(|r| r.name == "welcome"));
        assert_eq!(rules.len(), default_rules().len());
    }

    #[test]
    fn bad_rules_are_named() {
        let mut rules = default_rules();
        rules[1].template = " ".into();
        let err = validate(&rules).unwrap_err().to_string();
        assert!(err.contains("order_shipped"), "{err}");
        assert!(err.contains("the template is empty"), "{err}");
        let mut rules = default_rules();
        rules[0].event = "orders.exploded".into();
        assert!(
            validate(&rules)
                .unwrap_err()
                .to_string()
                .contains("orders.exploded")
        );
        let mut rules = default_rules();
        rules.push(rules[0].clone());
        assert!(validate(&rules).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn a_rule_may_name_a_template_that_is_not_compiled() {
        let mut rules = default_rules();
        rules[1].template = "order_note".into();
        assert!(validate(&rules).is_ok());
    }

    fn toml_rules(text: &str) -> Vec<Rule> {
        #[derive(Deserialize)]
        struct File {
            rules: Vec<Rule>,
        }
        toml::from_str::<File>(text).unwrap().rules
    }
}
