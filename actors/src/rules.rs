//! Routing rules: which notifications an event causes.
//!
//! A rule matches an event type and, optionally, fields of the event's data (`status = "shipped"`),
//! and names the template, the category, the channel chain (the category's default chain when
//! absent) and the data field holding the recipient's customer id. Every matching rule makes one
//! notification, whose id is derived from the event id and the rule name, so an event delivered or
//! published twice never notifies twice.
//!
//! Herald ships [`default_rules`]; configuration (`[[routing.rules]]`) adds rules, replaces a
//! default by using its name, or switches one off with `enabled = false`. Events are matched after
//! they are read into their types, so a field the type lacks is never there: [`validate`] refuses
//! a rule naming one, or a value its field never takes, which would never match, and a rule whose
//! compiled template requires a variable its events do not always supply, which would
//! dead-letter them.

use std::collections::BTreeMap;

use crate::templates::{TemplateDef, variables};
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
    /// `false` switches the rule off: a built-in one of that name, or one of one's own kept in
    /// the configuration.
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

    /// The recipient's customer id in `data`; else why the event names none: the field is
    /// missing or not a string, or holds what no customer's id can be (a `/`, see
    /// [`events::external_id`]: the default field is checked when the event is read, another
    /// field only here), which no wait for the customer would mend.
    pub fn recipient_in<'a>(&self, data: &'a Value) -> Result<&'a str, String> {
        let id = data
            .get(&self.recipient)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("the event has no recipient field `{}`", self.recipient))?;
        events::external_id(&self.recipient, id)?;
        Ok(id)
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
    value_text(data.get(field)?)
}

/// A value as `when` compares it: strings as they are, other values as JSON, null as nothing.
fn value_text(value: &Value) -> Option<String> {
    match value {
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

/// The defaults with `overrides` (the configuration's `routing.rules`, in order) applied: a rule
/// named like a default replaces it, others are added; disabled rules are dropped.
///
/// Refuses, naming the override by its place, a name configured twice (the earlier one would be
/// ignored), `enabled = false` under a name that is a default's misspelt (it would switch nothing
/// off), and an enabled override that [`validate`] would refuse. A disabled rule of one's own is
/// not checked: it may wait for a template not created yet.
pub fn with_overrides(defaults: Vec<Rule>, overrides: &[Rule]) -> Result<Vec<Rule>, RuleError> {
    for (index, o) in overrides.iter().enumerate() {
        check_override(&defaults, &overrides[..index], o).map_err(|reason| RuleError {
            rule: o.name.clone(),
            index: Some(index),
            reason,
        })?;
    }
    let mut rules = defaults;
    for o in overrides {
        match rules.iter_mut().find(|r| r.name == o.name) {
            Some(existing) => *existing = o.clone(),
            None => rules.push(o.clone()),
        }
    }
    rules.retain(|r| r.enabled);
    Ok(rules)
}

/// What is wrong with the override `o`, configured after `earlier`.
fn check_override(defaults: &[Rule], earlier: &[Rule], o: &Rule) -> Result<(), String> {
    if let Some(first) = earlier.iter().position(|e| e.name == o.name) {
        return Err(format!(
            "the name is used twice (also routing.rules[{first}])"
        ));
    }
    if o.enabled {
        return check(o);
    }
    if defaults.iter().any(|d| d.name == o.name) {
        return Ok(());
    }
    // A rule of one's own kept switched off is fine; one named almost like a built-in rule is a
    // misspelt attempt to switch that one off, which would leave it on.
    match defaults.iter().find(|d| looks_like(&d.name, &o.name)) {
        Some(builtin) => Err(format!(
            "enabled = false switches off no built-in rule; did you mean {:?}?",
            builtin.name
        )),
        None => Ok(()),
    }
}

/// Whether `name` is `builtin` misspelt: the same but for case, `-` for `_`, or at most two
/// letters changed, added, removed or swapped.
fn looks_like(builtin: &str, name: &str) -> bool {
    let plain = |s: &str| s.to_lowercase().replace('-', "_");
    strsim::damerau_levenshtein(&plain(builtin), &plain(name)) <= 2
}

/// Why a rule set cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", self.place())]
pub struct RuleError {
    /// The rule's name.
    pub rule: String,
    /// The rule's place in the configuration's `routing.rules` (from 0), when it is configured.
    pub index: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl RuleError {
    /// Where the rule is: `routing.rules[1] ("shipped_sms")`, or `routing rule "order_placed"`.
    fn place(&self) -> String {
        match self.index {
            Some(index) => format!("routing.rules[{index}] ({:?})", self.rule),
            None => format!("routing rule {:?}", self.rule),
        }
    }
}

/// Checks that names are unique and every rule names a known event type and a template, matches
/// only data fields the event type has, with values they can take, names a recipient field
/// holding a string, and, when its template is compiled, that every variable the template
/// requires is supplied by each event the rule matches. A template that is not compiled is taken
/// for a runtime one, which may be created after the rules are loaded; until it is, the rule's
/// events are dead-lettered.
pub fn validate(rules: &[Rule]) -> Result<(), RuleError> {
    for (i, r) in rules.iter().enumerate() {
        let twice = rules[..i].iter().any(|other| other.name == r.name);
        let checked = if twice {
            Err("the name is used twice".into())
        } else {
            check(r)
        };
        checked.map_err(|reason| RuleError {
            rule: r.name.clone(),
            index: None,
            reason,
        })?;
    }
    Ok(())
}

/// What is wrong with the rule `r` on its own.
fn check(r: &Rule) -> Result<(), String> {
    if r.name.trim().is_empty() {
        return Err("the name is empty".into());
    }
    let Some(data) = DataSchema::of(&r.event) else {
        return Err(format!(
            "unknown event {:?}; known: {}",
            r.event,
            events::EVENT_TYPES.join(", ")
        ));
    };
    if r.template.trim().is_empty() {
        return Err("the template is empty".into());
    }
    if r.channels.as_ref().is_some_and(Vec::is_empty) {
        return Err("the channel chain is empty".into());
    }
    for (key, want) in &r.when {
        let field = data.field(key).map_err(|known| {
            format!(
                "when.{key}: unknown data field of {}; known: {known}",
                r.event
            )
        })?;
        check_when(key, want, &field)?;
    }
    let recipient = data.field(&r.recipient).map_err(|known| {
        format!(
            "recipient = {:?}: unknown data field of {}; known: {known}",
            r.recipient, r.event
        )
    })?;
    let types = json_types(&recipient);
    if !types.is_empty() && !types.contains(&"string") {
        return Err(format!(
            "recipient = {:?}: the recipient field must hold a string (the customer's id); {} \
             holds {}",
            r.recipient,
            r.recipient,
            describe(&types, &recipient)
        ));
    }
    match crate::templates::find(&r.template) {
        Some(template) => check_variables(r, template),
        None => Ok(()),
    }
}

/// Refuses a rule whose compiled `template` requires a variable that not every event the rule
/// matches supplies ([`variables::supplied`]): each of those events would be dead-lettered for
/// the missing variable. (A runtime template is not checked: it may be created or changed after
/// the rules are loaded.)
fn check_variables(r: &Rule, template: &TemplateDef) -> Result<(), String> {
    let supplied = variables::supplied(&r.event, &r.when).unwrap_or_default();
    let Some(missing) = template
        .variables
        .iter()
        .find(|v| v.required && !supplied.contains(&v.name))
    else {
        return Ok(());
    };
    Err(format!(
        "the built-in template {:?} requires the variable `{}`, which not every {} event{} \
         supplies (each supplies {}): those without it would be dead-lettered; name another \
         template, or a runtime one",
        template.code,
        missing.name,
        r.event,
        if r.when.is_empty() {
            ""
        } else {
            " matching `when`"
        },
        supplied.join(", ")
    ))
}

/// Refuses a `when` value that the field `key`, described by `field`, never has as its text.
fn check_when(key: &str, want: &str, field: &Value) -> Result<(), String> {
    if let Some(allowed) = allowed_values(field) {
        if allowed.iter().any(|a| a == want) {
            return Ok(());
        }
        let quoted: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        return Err(format!(
            "when.{key} = {want:?}: not a value of {key}; allowed: {}",
            quoted.join(", ")
        ));
    }
    let types = json_types(field);
    if types.is_empty() || types.iter().any(|t| text_fits(t, field, want)) {
        return Ok(());
    }
    Err(format!(
        "when.{key} = {want:?} never matches: {key} holds {}",
        describe(&types, field)
    ))
}

/// The top-level fields of an event type's data, as its JSON Schema describes them
/// ([`events::json_schemas`]): what `when` and `recipient` name (they look up no nested paths).
struct DataSchema {
    /// The envelope's schema, whose `$defs` the data's references point into.
    envelope: Value,
}

impl DataSchema {
    /// The schema of `event_type`'s data, if it is a known type.
    fn of(event_type: &str) -> Option<Self> {
        events::json_schemas()
            .into_iter()
            .find(|(t, _)| *t == event_type)
            .map(|(_, envelope)| Self { envelope })
    }

    /// The schema of the data field `name`, its reference resolved; else the known field names.
    fn field(&self, name: &str) -> Result<Value, String> {
        let properties = &self.envelope["properties"]["data"]["properties"];
        let Some(field) = properties.get(name) else {
            let known: Vec<&str> = properties
                .as_object()
                .map(|o| o.keys().map(String::as_str).collect())
                .unwrap_or_default();
            return Err(known.join(", "));
        };
        let definition = field
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
            .and_then(|name| self.envelope["$defs"].get(name));
        Ok(definition.unwrap_or(field).clone())
    }
}

/// The values a field can take as `when` text, when its schema lists them (`const`, `enum`, or a
/// `oneOf`/`anyOf` of `const`s, as for an enum with documented variants).
fn allowed_values(field: &Value) -> Option<Vec<String>> {
    if let Some(value) = field.get("const") {
        return Some(value_text(value).into_iter().collect());
    }
    if let Some(values) = field.get("enum").and_then(Value::as_array) {
        return Some(values.iter().filter_map(value_text).collect());
    }
    let variants = field
        .get("oneOf")
        .or_else(|| field.get("anyOf"))?
        .as_array()?;
    let consts: Option<Vec<&Value>> = variants.iter().map(|v| v.get("const")).collect();
    Some(consts?.into_iter().filter_map(value_text).collect())
}

/// The JSON types a field's schema allows (`"string"`, `["string", "null"]`); none when it does
/// not say, and then any value is taken.
fn json_types(field: &Value) -> Vec<&str> {
    match field.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Whether a value of JSON type `ty` (and the field's `format`) can have `want` as its text.
fn text_fits(ty: &str, field: &Value, want: &str) -> bool {
    match ty {
        "string" if field.get("format").and_then(Value::as_str) == Some("date") => {
            chrono::NaiveDate::parse_from_str(want, "%Y-%m-%d")
                .is_ok_and(|date| date.to_string() == want)
        }
        "string" => true,
        // A null field matches nothing.
        "null" => false,
        _ => serde_json::from_str::<Value>(want).is_ok_and(|value| {
            value_text(&value).as_deref() == Some(want)
                && match ty {
                    "integer" => value.is_i64() || value.is_u64(),
                    "number" => value.is_number(),
                    "boolean" => value.is_boolean(),
                    "array" => value.is_array(),
                    "object" => value.is_object(),
                    _ => false,
                }
        }),
    }
}

/// The types `types` in words, for an error: `an integer, such as "100"`.
fn describe(types: &[&str], field: &Value) -> String {
    let words: Vec<&str> = types
        .iter()
        .filter(|t| **t != "null")
        .map(|t| match *t {
            "string" if field.get("format").and_then(Value::as_str) == Some("date") => {
                "a date, such as \"2026-12-01\""
            }
            "string" => "a string",
            "integer" => "an integer, such as \"100\"",
            "number" => "a number, such as \"1.5\"",
            "boolean" => "\"true\" or \"false\"",
            "array" => "an array",
            "object" => "an object",
            _ => "a value",
        })
        .collect();
    words.join(" or ")
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
            template = "welcome"
            category = "account"
            "#,
        );
        let rules = with_overrides(default_rules(), &config).unwrap();
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

    /// The rules in force with the `[[rules]]` of `text` applied, or the refusal's text.
    fn in_force(text: &str) -> Result<Vec<Rule>, String> {
        with_overrides(default_rules(), &toml_rules(text))
            .and_then(|merged| validate(&merged).map(|()| merged))
            .map_err(|e| e.to_string())
    }

    /// Asserts that `text` is refused with an error holding each of `parts`.
    fn assert_refused(text: &str, parts: &[&str]) {
        let err = in_force(text).expect_err("refused");
        for part in parts {
            assert!(err.contains(part), "{part:?} is not in: {err}");
        }
    }

    #[test]
    fn a_when_key_the_event_data_lacks_is_refused() {
        // A typo, and a nested path: rules match top-level data fields only.
        for (key, text) in [
            ("stauts", r#"when = { stauts = "shipped" }"#),
            ("items.name", r#"when = { "items.name" = "Green tea" }"#),
        ] {
            assert_refused(
                &format!(
                    r#"
                    [[rules]]
                    name = "order_welcome"
                    event = "customers.created"
                    template = "welcome"
                    category = "account"

                    [[rules]]
                    name = "shipped_sms"
                    event = "orders.status_changed"
                    {text}
                    template = "order_shipped"
                    category = "transactional"
                    "#
                ),
                &[
                    "routing.rules[1] (\"shipped_sms\")",
                    &format!("when.{key}: unknown data field of orders.status_changed"),
                    "known: customer_id, delivery_estimate, order_number, reason, review_url, \
                     status, tracking_number",
                ],
            );
        }
    }

    #[test]
    fn a_recipient_field_the_event_data_lacks_or_that_holds_no_id_is_refused() {
        let rule = |recipient: &str| {
            format!(
                r#"
                [[rules]]
                name = "order_placed"
                event = "orders.created"
                template = "order_placed"
                category = "transactional"
                recipient = "{recipient}"
                "#
            )
        };
        assert_refused(
            &rule("customer"),
            &[
                "routing.rules[0] (\"order_placed\")",
                "recipient = \"customer\": unknown data field of orders.created; known: \
                 currency, customer_id, items",
            ],
        );
        assert_refused(
            &rule("total_minor"),
            &[
                "routing.rules[0]",
                "recipient = \"total_minor\": the recipient field must hold a string",
                "total_minor holds an integer",
            ],
        );
        assert!(in_force(&rule("customer_id")).is_ok());
    }

    #[test]
    fn a_recipient_no_customer_id_can_be_is_refused_naming_the_field() {
        let mut campaign = rule(
            "campaign",
            events::MARKETING_CAMPAIGN,
            &[],
            "marketing",
            Category::Marketing,
        );
        campaign.recipient = "campaign_id".into();
        let data = |id: &str| json!({"customer_id": "c-1", "campaign_id": id});
        assert_eq!(campaign.recipient_in(&data("c-2")), Ok("c-2"));
        let slash = campaign.recipient_in(&data("spring/2026")).unwrap_err();
        assert!(
            slash.contains("campaign_id must not contain '/'"),
            "{slash}"
        );
        assert!(campaign.recipient_in(&data(" ")).is_err());
        let missing = campaign.recipient_in(&json!({})).unwrap_err();
        assert!(
            missing.contains("no recipient field `campaign_id`"),
            "{missing}"
        );
    }

    #[test]
    fn a_when_value_the_field_never_takes_is_refused() {
        let rule = |event: &str, when: &str| {
            format!(
                r#"
                [[rules]]
                name = "watch"
                event = "{event}"
                when = {{ {when} }}
                template = "order_watch"
                category = "transactional"
                "#
            )
        };
        let status = events::ORDER_STATUS_CHANGED;
        assert_refused(
            &rule(status, r#"status = "Shipped""#),
            &[
                "routing.rules[0] (\"watch\")",
                "when.status = \"Shipped\": not a value of status; allowed: \"paid\", \
                 \"shipped\", \"delivered\", \"cancelled\"",
            ],
        );
        assert_refused(
            &rule(events::ORDER_CREATED, r#"total_minor = "12.50""#),
            &["when.total_minor = \"12.50\" never matches: total_minor holds an integer"],
        );
        assert_refused(
            &rule(events::ORDER_CREATED, r#"total_minor = "0100""#),
            &["when.total_minor = \"0100\" never matches"],
        );
        assert_refused(
            &rule(status, r#"delivery_estimate = "1 Dec""#),
            &["when.delivery_estimate = \"1 Dec\" never matches: delivery_estimate holds a date"],
        );
        for fine in [
            (status, r#"status = "cancelled""#),
            (status, r#"delivery_estimate = "2026-12-01""#),
            (status, r#"reason = "out of stock""#),
            (events::ORDER_CREATED, r#"total_minor = "100""#),
            (events::ORDER_CREATED, r#"total_minor = "-1""#),
            (events::ORDER_CREATED, r#"items = "[]""#),
        ] {
            assert!(in_force(&rule(fine.0, fine.1)).is_ok(), "{fine:?}");
        }
    }

    #[test]
    fn switching_off_a_misspelt_built_in_rule_is_refused_and_a_parked_rule_is_not() {
        let disabled = |name: &str| {
            format!(
                r#"
                [[rules]]
                name = "{name}"
                event = "marketing.campaign"
                template = "marketing"
                category = "marketing"
                enabled = false
                "#
            )
        };
        for misspelt in [
            "marketing_campain",
            "Marketing-Campaign",
            "marketnig_campaign",
        ] {
            assert_refused(
                &disabled(misspelt),
                &[
                    &format!("routing.rules[0] ({misspelt:?})"),
                    "enabled = false switches off no built-in rule; did you mean \
                     \"marketing_campaign\"?",
                ],
            );
        }
        let in_force = in_force(&disabled("spring_sale")).expect("a rule of one's own, parked");
        assert!(in_force.iter().all(|r| r.name != "spring_sale"));
        assert!(in_force.iter().any(|r| r.name == "marketing_campaign"));
    }

    #[test]
    fn a_built_in_template_needing_a_variable_the_events_lack_is_refused() {
        let rule = |event: &str, when: &str, template: &str| {
            format!(
                r#"
                [[rules]]
                name = "order_placed"
                event = "orders.created"
                template = "order_placed"
                category = "transactional"

                [[rules]]
                name = "mistaken"
                event = "{event}"
                when = {{ {when} }}
                template = "{template}"
                category = "transactional"
                "#
            )
        };
        let changed = events::ORDER_STATUS_CHANGED;
        assert_refused(
            &rule(events::CUSTOMER_CREATED, "", "marketing"),
            &[
                "routing.rules[1] (\"mistaken\")",
                "the built-in template \"marketing\" requires the variable `headline`, which \
                 not every customers.created event supplies (each supplies customer_id, \
                 event_id, occurred_at)",
            ],
        );
        assert_refused(
            &rule(changed, r#"status = "cancelled""#, "order_shipped"),
            &[
                "routing.rules[1] (\"mistaken\")",
                "\"order_shipped\" requires the variable `tracking_number`, which not every \
                 orders.status_changed event matching `when` supplies",
            ],
        );
        assert_refused(
            &rule(changed, "", "order_placed"),
            &["\"order_placed\" requires the variable `total`"],
        );
        // A shipped order always has its tracking number; a runtime template is not checked.
        for fine in [
            (changed, r#"status = "shipped""#, "order_shipped"),
            (changed, r#"status = "cancelled""#, "order_delivered"),
            (events::CUSTOMER_CREATED, "", "welcome"),
        ] {
            assert!(in_force(&rule(fine.0, fine.1, fine.2)).is_ok(), "{fine:?}");
        }
        // Built-in rules are checked as much as configured ones.
        let mut rules = default_rules();
        rules[4].event = events::CUSTOMER_CREATED.into();
        let err = validate(&rules).unwrap_err().to_string();
        assert!(err.contains("routing rule \"marketing_campaign\""), "{err}");
    }

    #[test]
    fn a_name_configured_twice_is_refused() {
        let welcome = r#"
            [[rules]]
            name = "welcome"
            event = "customers.created"
            template = "welcome"
            category = "account"
            "#;
        assert_refused(
            &format!("{welcome}{welcome}"),
            &["routing.rules[1] (\"welcome\"): the name is used twice (also routing.rules[0])"],
        );
    }

    #[test]
    fn the_readme_rule_example_is_valid() {
        let readme = include_str!("../../README.md");
        let example = readme
            .split_once("A rule in the configuration:\n\n```toml\n")
            .and_then(|(_, rest)| rest.split_once("```"))
            .map(|(example, _)| example.replace("[[routing.rules]]", "[[rules]]"))
            .expect("the README's rule example");
        let rules = in_force(&example).expect("valid");
        assert_eq!(rules.len(), default_rules().len(), "it replaces one");
    }

    fn toml_rules(text: &str) -> Vec<Rule> {
        #[derive(Deserialize)]
        struct File {
            rules: Vec<Rule>,
        }
        toml::from_str::<File>(text).unwrap().rules
    }
}
