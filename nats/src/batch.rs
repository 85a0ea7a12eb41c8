//! The stored form of a bulk send (`batches.spec`): written by the API, read by the Scheduler
//! that fans it out. Versioned like the envelopes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{Category, Channel, Contacts, Content};

/// What a batch sends, and to whom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchSpec {
    /// Schema version ([`crate::SCHEMA_VERSION`]).
    pub v: u16,
    /// Category of every notification of the batch.
    pub category: Category,
    /// Channel chain.
    pub channels: Vec<Channel>,
    /// The message.
    pub content: Content,
    /// The recipients.
    pub target: BatchTarget,
}

/// A batch's recipients: a list given with the request, or the customers a filter selects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BatchTarget {
    /// These recipients.
    Recipients {
        /// In request order.
        recipients: Vec<BatchRecipient>,
    },
    /// Every stored customer matching all the given conditions.
    Filter {
        /// Customers with this locale.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        locale: Option<String>,
        /// Customers whose external id starts with this.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        external_id_prefix: Option<String>,
    },
}

/// One listed recipient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecipient {
    /// Its recipient key (customer id, else first contact): partition and notification id.
    pub key: String,
    /// The customer's external id, if named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// Contacts given with the request.
    #[serde(default)]
    pub contacts: Contacts,
    /// Template variables of this recipient, over the batch template's.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub variables: Map<String, Value>,
}

impl Content {
    /// This content for one recipient of a batch: a template's variables with the recipient's
    /// `variables` over them (a variable of both takes the recipient's value). Literal content is
    /// the same for everyone.
    pub fn for_recipient(&self, variables: &Map<String, Value>) -> Content {
        let mut content = self.clone();
        if let Some(template) = &mut content.template {
            template.variables.extend(
                variables
                    .iter()
                    .map(|(name, value)| (name.clone(), value.clone())),
            );
        }
        content
    }
}

/// The id of the batch's notification for a recipient: the same on every run of the fan-out, so
/// a fan-out redone after a restart creates and publishes nothing twice. It sorts among the
/// API's ids at the time the batch was accepted (`accepted_at`).
pub fn batch_notification_id(
    batch_id: Uuid,
    accepted_at: DateTime<Utc>,
    recipient_key: &str,
) -> Uuid {
    crate::ids::derived_id(accepted_at, &batch_id, recipient_key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_batch_and_recipient() {
        let batch = Uuid::now_v7();
        let accepted = Utc::now() - chrono::Duration::milliseconds(1);
        let id = |batch, key| batch_notification_id(batch, accepted, key);
        assert_eq!(id(batch, "c-1"), id(batch, "c-1"));
        assert_ne!(id(batch, "c-1"), id(batch, "c-2"));
        assert_ne!(id(batch, "c-1"), id(Uuid::now_v7(), "c-1"));
        assert!(
            id(batch, "c-1") < Uuid::now_v7(),
            "sorted among the API's ids at the batch's acceptance"
        );
    }

    #[test]
    fn a_recipient_s_variables_win_over_the_batch_s() {
        let shared = serde_json::json!({"name": "friend", "code": "SALE"});
        let content = Content {
            template: Some(crate::TemplateRef {
                code: "welcome".into(),
                variables: shared.as_object().unwrap().clone(),
                locale: None,
            }),
            ..Content::default()
        };
        let own = serde_json::json!({"name": "Anna"});
        let theirs = content.for_recipient(own.as_object().unwrap());
        assert_eq!(
            Value::Object(theirs.template.unwrap().variables),
            serde_json::json!({"name": "Anna", "code": "SALE"})
        );
        assert_eq!(content.for_recipient(&Map::new()), content);
        let literal = Content {
            text: "Sale".into(),
            ..Content::default()
        };
        assert_eq!(literal.for_recipient(own.as_object().unwrap()), literal);
    }

    #[test]
    fn a_spec_without_recipient_variables_reads_as_before() {
        let stored = serde_json::json!({
            "v": 1, "category": "marketing", "channels": ["email"], "content": {"text": "Sale"},
            "target": {"kind": "recipients", "recipients": [{"key": "a@example.com"}]}
        });
        let spec: BatchSpec = serde_json::from_value(stored).unwrap();
        let BatchTarget::Recipients { recipients } = &spec.target else {
            panic!("recipients")
        };
        assert!(recipients[0].variables.is_empty());
        let json = serde_json::to_value(&spec).unwrap();
        assert!(json["target"]["recipients"][0].get("variables").is_none());
    }

    #[test]
    fn spec_round_trips() {
        let spec = BatchSpec {
            v: crate::SCHEMA_VERSION,
            category: Category::Marketing,
            channels: vec![Channel::Email],
            content: Content {
                text: "Sale".into(),
                ..Content::default()
            },
            target: BatchTarget::Filter {
                locale: Some("de".into()),
                external_id_prefix: None,
            },
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["target"]["kind"], "filter");
        assert_eq!(serde_json::from_value::<BatchSpec>(json).unwrap(), spec);
    }
}
